"""CacheGen-style KV-cache codec: per-chunk quantization + multi-stream rANS; one bitstream per chunk+level.

Importing this package is cheap (no torch); the codec API loads on first use::

    from tokenwire.transport.cachegen import encode_sequence, decode_sequence
    chunks = encode_sequence(kv, "medium", fingerprint=fp, chunk_tokens=256)
    kv_hat = decode_sequence(chunks, expect_fingerprint=fp)

Modules: ``quant`` (torch quantizer), ``tables`` (integer-only frequency tables), ``rans`` (numba CPU coder),
``rans_torch`` (vectorized GPU/CPU twin), ``bitstream`` (byte format, numpy only), ``levels`` (ladder and
profiles), ``codec`` (the pipeline), ``errors``; ``smollm``/``evaluate``/``bench``/``cli`` for measurements.
See docs/kv_codec.md.
"""

from __future__ import annotations

from typing import Any

from .errors import (
    CorruptBitstream,
    InvalidInput,
    KVCodecError,
    ModelMismatch,
    TruncatedBitstream,
    UnsupportedVersion,
)

_LAZY = {
    "encode_chunk": "codec",
    "decode_chunk": "codec",
    "encode_sequence": "codec",
    "decode_sequence": "codec",
    "split_tokens": "codec",
    "concat_tokens": "codec",
    "check_device": "codec",
    "LADDER": "levels",
    "LEVEL_NAMES": "levels",
    "TEXT": "levels",
    "get_level": "levels",
    "read_header": "bitstream",
}

__all__ = [
    "CorruptBitstream",
    "InvalidInput",
    "KVCodecError",
    "ModelMismatch",
    "TruncatedBitstream",
    "UnsupportedVersion",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
