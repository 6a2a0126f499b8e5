"""Property test of the KV codec's decoder on garbled bitstreams: real chunks (four geometries, levels and dtypes)
with bytes mutated, header fields set to any value of their width, and the CRC made right again (else nearly every
input stops at the CRC). A chunk comes from a peer or a store: it decodes to keys and values of one shape, or is a
KVCodecError, within an element budget. tests/test_kv_codec_hostile.py has the hand-written hostile cases."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzzing import examples, mutated

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

from tokenwire.transport.cachegen import KVCodecError, bitstream, codec  # noqa: E402

pytestmark = pytest.mark.fuzz

FINGERPRINT = 0x1234


def _chunks() -> list[bytes]:
    """Small encoded chunks: one of no tokens, raw tokens, bfloat16 and float16 among them."""
    g = torch.Generator().manual_seed(1)
    out = []
    for layers, heads, tokens, dim, raw, level, dtype in [(2, 2, 9, 8, 0, "medium", torch.float32),
                                                          (1, 1, 3, 4, 1, "low", torch.float16),
                                                          (2, 1, 0, 8, 0, "high", torch.float32),
                                                          (3, 2, 17, 4, 2, "high", torch.bfloat16)]:
        kv = [((torch.randn(1, heads, tokens, dim, generator=g) * 3).to(dtype),
               torch.randn(1, heads, tokens, dim, generator=g).to(dtype)) for _ in range(layers)]
        out.append(codec.encode_chunk(kv, level, fingerprint=FINGERPRINT, raw_tokens=raw))
    return out


_CHUNKS = _chunks()
_WIDTHS = {"B": 8, "H": 16, "I": 32, "Q": 64}
_FIELDS = [c for c in bitstream.HEADER.format if c.isalpha()]


@st.composite
def _header_edited(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with 1 to 3 of its header's numeric fields set to a value of their width (an edge one often)."""
    fields = list(bitstream.HEADER.unpack_from(data, 0))
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(1, len(fields) - 1))  # (not the magic)
        top = (1 << _WIDTHS[_FIELDS[i]]) - 1
        fields[i] = draw(st.integers(0, top) | st.sampled_from([0, 1, top, min(fields[i] + 1, top),
                                                                max(fields[i] - 1, 0)]))
    return bitstream.HEADER.pack(*fields) + data[bitstream.HEADER.size:]


def _crc_fixed(data: bytes) -> bytes:
    return data if len(data) < 8 else data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


_GARBLED = st.one_of(
    st.sampled_from(_CHUNKS).flatmap(lambda b: mutated(b, 3)).map(_crc_fixed),
    st.sampled_from(_CHUNKS).flatmap(_header_edited).map(_crc_fixed),
    st.sampled_from(_CHUNKS).flatmap(lambda b: _header_edited(b).flatmap(lambda h: mutated(h, 2))).map(_crc_fixed),
    st.sampled_from(_CHUNKS).flatmap(lambda b: mutated(b, 2)),
    st.binary(max_size=80),
)


@settings(max_examples=examples(60), deadline=None)
@given(_GARBLED, st.booleans())
def test_a_garbled_chunk_decodes_to_keys_and_values_alike_or_is_a_codec_error(data: bytes, expect: bool) -> None:
    try:
        kv = codec.decode_chunk(data, expect_fingerprint=FINGERPRINT if expect else None, max_elements=1 << 22)
    except KVCodecError:
        return
    for keys, values in kv:
        assert keys.shape == values.shape
