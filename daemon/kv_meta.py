"""What a stored KV chunk's metadata is, and what it and a put's arguments may hold.

:class:`ChunkMeta` is what the store keeps per chunk (``<hash>.meta``, msgpack), and reading it back checks every
field against the bounds a put was held to (:func:`_meta_problem`); the ingest checks (:func:`_check_context`,
:func:`_check_prewarm`) hold a put's arguments to the same bounds before anything is stored. A module of its own so
that the Python API, the Unix socket's header check and the engine's client (:mod:`.kv_ingest`) refuse by one set of
rules, in one set of words, and so that what a stored chunk may hold reads in one place. It imports no torch.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack  # type: ignore[import-untyped]  # msgpack ships no hints

from tokenwire.transport.errors import ErrorCode
from tokenwire.transport.frames import (
    MAX_CHUNK_TOKENS,
    MAX_FINGERPRINT,
    MAX_GEOMETRY,
    MAX_KV_CHUNKS,
    MAX_KV_TOKENS,
    MAX_MODEL_CHARS,
    MAX_TOKEN_ID,
    model_name_problem,
)
from tokenwire.transport.kv_channel import KVError
from tokenwire.transport.kv_controller import LEVELS

_DTYPES = ("float16", "bfloat16", "float32")


def _itemsize(dtype: str) -> int:
    """Bytes per element of a stored KV dtype (one of :data:`_DTYPES`)."""
    return 4 if dtype == "float32" else 2


class KVIngestError(KVError):
    code = ErrorCode.BAD_REQUEST


def _int_ids(token_ids: Any) -> list[int]:
    """Token ids as ints: numpy or torch integers from a tokenizer too; anything else is refused by position
    (``int()`` cut 504.9 to 504, and took a float tensor's ids and True the same way)."""
    import operator

    try:
        items = list(token_ids)
    except TypeError:
        raise KVIngestError(f"token ids must be integers, one per token: got a {type(token_ids).__name__}") \
            from None
    out: list[int] = []
    for i, t in enumerate(items):
        try:
            if isinstance(t, bool) or str(getattr(t, "dtype", "")) == "torch.bool":  # int-like, never a token id
                raise TypeError
            out.append(operator.index(t))
        except TypeError:
            shape = getattr(t, "shape", None)
            what = (f"a {type(t).__name__} of shape {tuple(shape)} (one context's ids, not a batch of them)"
                    if shape else f"{repr(t)[:40]} ({type(t).__name__})")
            raise KVIngestError(f"token ids must be integers: token_ids[{i}] is {what}") from None
    return out


def _check_context(model: object, token_ids: Sequence[int], fingerprint: object, chunk_tokens: int) -> list[int]:
    """The token ids as ints; refuses at ingest what a fetch could never name or the wire could not carry (a
    negative fingerprint was stored and then closed every fetching connection with a malformed KV_META)."""
    token_ids = _int_ids(token_ids)
    if not isinstance(model, str) or not 1 <= len(model) <= MAX_MODEL_CHARS:
        raise KVIngestError(f"model must be a name of 1 to {MAX_MODEL_CHARS} characters (what a fetch names)")
    # (a lone surrogate, JSON's "\ud800", failed in the fingerprint's encode: a traceback, no typed refusal; a NUL
    # or a line break was stored, under a name no engine means and the daemon's log shows mangled)
    problem = model_name_problem(model)
    if problem is not None:
        raise KVIngestError(f"model {problem}")
    if not token_ids:
        raise KVIngestError("no token ids")
    if len(token_ids) > MAX_KV_TOKENS:
        raise KVIngestError(f"{len(token_ids)} token ids; a fetch carries at most {MAX_KV_TOKENS}")
    if -(-len(token_ids) // chunk_tokens) > MAX_KV_CHUNKS:
        raise KVIngestError(f"{len(token_ids)} tokens make more than {MAX_KV_CHUNKS} chunks of {chunk_tokens}")
    if any(not 0 <= t <= MAX_TOKEN_ID for t in token_ids):
        raise KVIngestError("token ids must be integers in [0, 2**31)")
    if fingerprint is not None and not _int_in(fingerprint, 0, MAX_FINGERPRINT):
        raise KVIngestError("fingerprint must be an integer in [0, 2**64)")
    return token_ids


def _check_prewarm(prewarm: object) -> list[str]:
    """The levels a put asks to encode now, each once, in its order. Every entry cost an encode, or a store read of
    the level the first one wrote, per chunk: a 1.6-MB header of 200,000 "low"s held the one ingest worker 16.7 s
    (every put queued behind it). A list longer than the levels there are is refused, not cut: it is no engine's."""
    # two messages: "must list levels of low, medium, high" for a prewarm of None (JSON null) read as a wrong level
    # name, where the list itself was missing
    if not isinstance(prewarm, list | tuple):
        raise KVIngestError(f"prewarm must be a list of levels ({', '.join(LEVELS)}), "
                            f"got {type(prewarm).__name__} {prewarm!r:.40}")
    if len(prewarm) > len(LEVELS):
        raise KVIngestError(f"prewarm lists {len(prewarm)} entries; there are {len(LEVELS)} levels "
                            f"({', '.join(LEVELS)}): name each at most once")
    if bad := [p for p in prewarm if p not in LEVELS]:
        raise KVIngestError(f"prewarm: unknown level {bad[0]!r:.40}; levels are {', '.join(LEVELS)}")
    return list(dict.fromkeys(prewarm))


_SOURCE_ID = struct.Struct(">Q16s")  # a source's length in bytes, and the first 16 bytes of its SHA-256


class PutHashes(list[str]):
    """A put's chunk hashes (a plain list to callers), with ``kept_other``: how many of its chunks were already
    stored under the same metadata with OTHER KV (an earlier put's source) and kept as they were; and ``stored``:
    how many of its first chunks are stored when the put returns (fewer than all when the store trimmed it: a
    context larger than what could be evicted, every other chunk pinned by fetches in progress). A fetch finds
    only that prefix."""

    def __init__(self, hashes: Sequence[str] = (), *, kept_other: int = 0, stored: int | None = None) -> None:
        super().__init__(hashes)
        self.kept_other = kept_other
        self.stored = len(self) if stored is None else stored


def source_id(source: bytes) -> bytes:
    """The identity of a chunk's source bytes, recorded in its metadata (:attr:`ChunkMeta.source`). SHA-256, not
    the envelope's CRC32: two puts of the same tokens with other KV are what it tells apart, and a 32-bit check
    would let one in 4 billion such races through; SHA-256 costs about what the CRC does (~1 GB/s here)."""
    return _SOURCE_ID.pack(len(source), hashlib.sha256(source).digest()[:16])


def _int_in(v: object, lo: int, hi: int) -> bool:
    """``v`` is an int (never a bool, a float or a numeric string) in [lo, hi]."""
    return type(v) is int and lo <= v <= hi


def _meta_cost(m: ChunkMeta) -> int:
    """About what a cached :class:`ChunkMeta` holds: each token id an int object and a tuple slot (~40 bytes; those
    below 257 are shared, so this is an upper bound), plus the object, its strings and its identity."""
    return 400 + 40 * len(m.token_ids)


def _meta_problem(d: dict[Any, Any]) -> str | None:
    """What is wrong with a decoded metadata map (:meth:`ChunkMeta.pack`'s), None when nothing is: the bounds of
    :func:`_check_context` at ingest and of the KV frames a fetch sends (a dtype torch lacks or a geometry of 0
    once failed the fetch's encode as an INTERNAL "store failure"). Keys it does not know are left alone."""
    if missing := [k for k in ("m", "fp", "g", "dt", "i", "ids") if k not in d]:
        return f"no field {missing[0]!r}"
    m, g, ids, src = d["m"], d["g"], d["ids"], d.get("src")
    if type(m) is not str or not 1 <= len(m) <= MAX_MODEL_CHARS:
        return f"model must be a name of 1 to {MAX_MODEL_CHARS} characters"
    if not _int_in(d["fp"], 0, MAX_FINGERPRINT):
        return "fingerprint must be an integer in [0, 2**64)"
    if type(g) is not list or len(g) != 3 or not all(_int_in(x, 1, MAX_GEOMETRY) for x in g):
        return f"geometry must be 3 integers in [1, {MAX_GEOMETRY}]"
    if d["dt"] not in _DTYPES:  # (a str: a list or map is in no tuple of strings)
        return f"dtype must be one of {', '.join(_DTYPES)}"
    if not _int_in(d["i"], 0, MAX_KV_CHUNKS - 1):
        return f"chunk index must be an integer in [0, {MAX_KV_CHUNKS})"
    if type(ids) is not list or not 1 <= len(ids) <= MAX_CHUNK_TOKENS \
            or set(map(type, ids)) != {int} or min(ids) < 0 or max(ids) > MAX_TOKEN_ID:  # (C speed: 4x faster)
        return f"token ids must be a list of 1 to {MAX_CHUNK_TOKENS} integers in [0, 2**31)"
    if src is not None and (type(src) is not bytes or len(src) != _SOURCE_ID.size):
        return f"source identity out of range (not {_SOURCE_ID.size} bytes)"
    return None


@dataclass(frozen=True)
class ChunkMeta:
    model: str
    fingerprint: int
    layers: int
    heads: int
    head_dim: int
    dtype: str
    index: int
    token_ids: tuple[int, ...]
    # The identity of the source it was written with (:func:`source_id`). Two daemons replacing one chunk of a
    # shared store at once could leave one put's source under the other's metadata: every read of a source is
    # checked against this, so such a pair is a miss, never the wrong KV served under a fingerprint. Left out of
    # ==: a re-put of the same context compares what it would write without it. None: metadata written before
    # it existed (its source cannot be proven its own: a miss, replaced by the next put).
    source: bytes | None = field(default=None, compare=False)

    def pack(self) -> bytes:
        doc: dict[str, Any] = {"m": self.model, "fp": self.fingerprint,
                               "g": [self.layers, self.heads, self.head_dim], "dt": self.dtype, "i": self.index,
                               "ids": list(self.token_ids)}
        if self.source is not None:
            doc["src"] = self.source
        return msgpack.packb(doc)

    @classmethod
    def unpack(cls, data: bytes) -> ChunkMeta:
        """Metadata from a store's payload, or :class:`KVError` (a caller's miss, replaced by the next put).

        Every field is checked by exact type against the bounds a put was held to and the wire carries: int() took
        "77", 1.9 and True, and infinity raised an untyped OverflowError that failed both the fetch and the re-put
        meant to repair it; a negative fingerprint or ids given as a string passed here and broke later, as a
        malformed KV_META that closed the fetching connection or a struct.error in a text chunk."""
        try:
            d = msgpack.unpackb(data)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise KVError(f"unreadable chunk metadata: {exc}", code=ErrorCode.INTERNAL) from None
        if type(d) is not dict:
            raise KVError(f"unreadable chunk metadata: a {type(d).__name__}, not a map", code=ErrorCode.INTERNAL)
        if problem := _meta_problem(d):
            raise KVError(f"unreadable chunk metadata: {problem}", code=ErrorCode.INTERNAL)
        layers, heads, head_dim = d["g"]
        return cls(d["m"], d["fp"], layers, heads, head_dim, d["dt"], d["i"], tuple(d["ids"]), d.get("src"))

    @property
    def elements(self) -> int:
        return 2 * self.layers * self.heads * self.head_dim * len(self.token_ids)

    def source_problem(self, source: bytes) -> str | None:
        """Why ``source`` (a read of this chunk's source) is not the one this metadata was written with; None
        when it is. Checked before any reshape: a source of another length (an fp16 put's under an fp32 put's
        metadata) raised RuntimeError in the reshape on every fetch."""
        if self.source is None:
            return "its metadata records no source identity (written by an earlier tokenwire version)"
        itemsize = _itemsize(self.dtype)
        if len(source) != self.elements * itemsize:
            return (f"its source holds {len(source)} bytes where its metadata's {self.dtype} "
                    f"{[self.layers, 2, len(self.token_ids), self.heads * self.head_dim]} needs "
                    f"{self.elements * itemsize}")
        if source_id(source) != self.source:
            return "its source is another put's (two puts replaced the chunk at once)"
        return None
