"""KV codec: round trips, error bounds, bitstream validation and typed errors on bad input."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

from tokenwire.transport.cachegen import (  # noqa: E402
    CorruptBitstream,
    InvalidInput,
    KVCodecError,
    ModelMismatch,
    TruncatedBitstream,
    UnsupportedVersion,
    bitstream,
    codec,
    levels,
)
from tokenwire.transport.cachegen.quant import step_value  # noqa: E402

FP = 0x1234_5678_9ABC_DEF0


def make_kv(layers=3, heads=2, tokens=37, dim=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        offset = torch.randn(1, heads, 1, dim, generator=g) * 4
        k = torch.randn(1, heads, tokens, dim, generator=g) * 3 + offset
        v = torch.randn(1, heads, tokens, dim, generator=g) * torch.rand(1, 1, tokens, 1, generator=g)
        out.append((k.to(dtype), v.to(dtype)))
    return out


def roundtrip(kv, level="medium", raw=0, backend="auto", **kw):
    data = codec.encode_chunk(kv, level, fingerprint=FP, raw_tokens=raw, backend=backend, **kw)
    return data, codec.decode_chunk(data, expect_fingerprint=FP, backend=backend)


def max_rel_error(kv, out, start=0):
    worst = 0.0
    for (k, v), (k2, v2) in zip(kv, out, strict=True):
        for a, b in ((k, k2), (v, v2)):
            a, b = a[..., start:, :].float(), b[..., start:, :].float()
            amax = a.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-30)  # per-token scale lower bound
            worst = max(worst, float(((a - b).abs() / amax).max()))
    return worst


@pytest.mark.parametrize("level", ["low", "medium", "high"])
def test_error_is_within_half_a_step(level):
    kv = make_kv()
    _, out = roundtrip(kv, level)
    lv = levels.get_level(level)
    prof = levels.uniform_profile(3, 16)
    d = max(step_value(int(c)) for c in prof.step_codes(lv).ravel())
    # |x - x_hat| <= step/2 = d * s_t / 2 with s_t <= 2 * abs-max (one-byte scale rounds up by < 1/16)
    assert max_rel_error(kv, out) <= d * (1 + 1 / 16) / 2 + 1e-6


def test_finer_levels_are_more_accurate_and_larger():
    kv = make_kv(tokens=64)
    sizes, errs = [], []
    for lv in levels.LADDER:
        data, out = roundtrip(kv, lv.name)
        sizes.append(len(data))
        errs.append(sum(float((a - b).pow(2).sum()) for pa, pb in zip(kv, out, strict=True)
                        for a, b in zip(pa, pb, strict=True)))
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert errs == sorted(errs, reverse=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes_round_trip_to_same_dtype(dtype):
    kv = make_kv(dtype=dtype)
    data, out = roundtrip(kv, "high", raw=1)
    assert bitstream.read_header(data).dtype == str(dtype).removeprefix("torch.")
    for (k, v), (k2, v2) in zip(kv, out, strict=True):
        assert k2.dtype == dtype and k2.shape == k.shape and v2.shape == v.shape
        # raw (sink) token kept exactly (to fp16 precision)
        assert torch.allclose(k2[..., 0, :].float(), k[..., 0, :].float(), rtol=1e-3, atol=1e-3)


def test_numba_and_torch_backends_produce_identical_bytes_and_values():
    kv = make_kv(layers=2, tokens=50)
    a, out_a = roundtrip(kv, "medium", raw=1, backend="numba")
    b, out_b = roundtrip(kv, "medium", raw=1, backend="torch")
    assert a == b
    for x, y in zip(out_a, out_b, strict=True):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    assert codec.encode_chunk(kv, "medium", fingerprint=FP, raw_tokens=1) == a  # deterministic


def test_header_fields():
    kv = make_kv(layers=4, heads=2, tokens=9, dim=8)
    data = codec.encode_chunk(kv, "low", fingerprint=FP, raw_tokens=1)
    h = bitstream.read_header(data)
    assert (h.level_id, h.fingerprint, h.n_layers, h.n_heads, h.head_dim, h.n_tokens, h.raw_tokens) == (
        1, FP, 4, 2, 8, 9, 1)
    assert h.total_bytes == len(data)
    assert data[:4] == b"TWKV"
    assert struct.unpack("<I", data[-4:])[0] == zlib.crc32(data[:-4])


@pytest.mark.parametrize("tokens", [0, 1, 2])
def test_tiny_chunks(tokens):
    kv = make_kv(tokens=tokens)
    for raw in {0, min(1, tokens)}:
        _, out = roundtrip(kv, "medium", raw=raw)
        assert all(k.shape[-2] == tokens for k, _ in out)
        if tokens:
            assert max_rel_error(kv, out) < 0.1


def test_constant_and_zero_kv():
    for value in (0.0, 2.5, -1e-3):
        kv = [(torch.full((1, 2, 20, 8), value), torch.full((1, 2, 20, 8), value)) for _ in range(2)]
        _, out = roundtrip(kv, "low")
        for k, v in out:
            assert torch.allclose(k, torch.full_like(k, value), rtol=0.1, atol=1e-6)
            assert torch.allclose(v, torch.full_like(v, value), rtol=0.1, atol=1e-6)
    zero = [(torch.zeros(1, 2, 20, 8), torch.zeros(1, 2, 20, 8))]
    assert len(codec.encode_chunk(zero, "high", fingerprint=FP)) < 600


def test_extreme_magnitudes_and_large_raw_token():
    kv = make_kv(layers=1, tokens=12)
    big = [(kv[0][0] * 1e6, kv[0][1] * 1e-20)]
    data, out = roundtrip(big, "high", raw=1)
    assert bitstream.read_header(data).flags & bitstream.FLAG_RAW_F32  # 1e6 does not fit fp16
    assert torch.allclose(out[0][0][..., 0, :], big[0][0][..., 0, :])
    assert max_rel_error(big, out) < 0.05


def test_sequence_split_and_join():
    kv = make_kv(tokens=70)
    chunks = codec.encode_sequence(kv, "medium", fingerprint=FP, chunk_tokens=32)
    assert [bitstream.read_header(c).n_tokens for c in chunks] == [32, 32, 6]
    assert [bitstream.read_header(c).raw_tokens for c in chunks] == [1, 0, 0]
    out = codec.decode_sequence(chunks, expect_fingerprint=FP)
    assert out[0][0].shape == kv[0][0].shape
    assert max_rel_error(kv, out, start=1) < 0.1


def test_bad_encoder_input_raises_invalid_input():
    kv = make_kv(layers=1, tokens=5)
    nan = [(kv[0][0].clone(), kv[0][1])]
    nan[0][0][0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidInput):
        codec.encode_chunk(nan, "medium", fingerprint=FP)
    with pytest.raises(InvalidInput):
        codec.encode_chunk([(kv[0][0], kv[0][1][..., :4, :])], "medium", fingerprint=FP)
    with pytest.raises(InvalidInput):
        codec.encode_chunk(kv, "text", fingerprint=FP)
    with pytest.raises(InvalidInput):
        codec.encode_chunk(kv, "ultra", fingerprint=FP)
    with pytest.raises(InvalidInput):
        codec.encode_chunk(kv, "medium", fingerprint=FP, raw_tokens=6)
    with pytest.raises(InvalidInput):
        codec.encode_chunk([], "medium", fingerprint=FP)
    with pytest.raises(InvalidInput):
        codec.encode_chunk([(kv[0][0].long(), kv[0][1].long())], "medium", fingerprint=FP)
    assert issubclass(InvalidInput, ValueError) and issubclass(InvalidInput, KVCodecError)


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("level", [*(lv.name for lv in levels.LADDER), "code=16"])
def test_finite_fp16_near_its_max_decodes_finite(level, backend):
    """The token scale rounds 65000 up to 2**16: the reconstruction must saturate at fp16's max, not be inf."""
    fp16_max = torch.finfo(torch.float16).max
    full = [(torch.full((1, 2, 6, 8), 65000.0, dtype=torch.float16),) * 2]
    one = make_kv(layers=2, tokens=20, dtype=torch.float16)
    one[1][0][0, 1, 7, 3] = 65000.0
    one[0][1][0, 0, 2, 5] = -65000.0
    for kv in (full, one):
        d = max(step_value(int(c)) for c in levels.uniform_profile(len(kv), 16).step_codes(
            levels.get_level(level)).ravel())
        _, out = roundtrip(kv, level, backend=backend)
        for (k, v), (k2, v2) in zip(kv, out, strict=True):
            for a, b in ((k, k2), (v, v2)):
                assert b.dtype == torch.float16 and bool(torch.isfinite(b).all())
                assert float(b.abs().max()) <= fp16_max
                # half a step at the token scale 2**16 (saturation only brings values closer)
                assert float((a.float() - b.float()).abs().max()) <= d * 2.0**16 / 2 + 32


def test_fingerprint_outside_u64_is_invalid_input():
    kv = make_kv(layers=1, tokens=4)
    for fp in (-1, 2**64, 1.5, "1"):
        with pytest.raises(InvalidInput, match="fingerprint"):
            codec.encode_chunk(kv, "medium", fingerprint=fp)
    data = codec.encode_chunk(kv, "medium", fingerprint=2**64 - 1)
    assert bitstream.read_header(data).fingerprint == 2**64 - 1


def test_empty_sequences_are_invalid_input():
    with pytest.raises(InvalidInput):
        codec.encode_sequence([], "medium", fingerprint=FP)
    with pytest.raises(InvalidInput):
        codec.decode_sequence([])


def test_mixed_dtypes_are_refused():
    kv = make_kv(layers=2, tokens=4)
    with pytest.raises(InvalidInput, match="float16"):  # V in another dtype than K
        codec.encode_chunk([(kv[0][0], kv[0][1].half()), kv[1]], "low", fingerprint=FP)
    with pytest.raises(InvalidInput, match="layer 1"):  # a layer in another dtype than layer 0
        codec.encode_chunk([kv[0], (kv[1][0].half(), kv[1][1].half())], "low", fingerprint=FP)


def test_decode_sequence_refuses_chunks_of_another_model():
    base = codec.encode_chunk(make_kv(layers=2, heads=2, tokens=4), "low", fingerprint=FP)
    other_geometry = codec.encode_chunk(make_kv(layers=2, heads=1, tokens=4), "low", fingerprint=FP)
    other_model = codec.encode_chunk(make_kv(layers=2, heads=2, tokens=4), "low", fingerprint=FP + 1)
    other_dtype = codec.encode_chunk(make_kv(layers=2, heads=2, tokens=4, dtype=torch.float16), "low",
                                     fingerprint=FP)
    for bad in (other_geometry, other_model, other_dtype):
        with pytest.raises(ModelMismatch):
            codec.decode_sequence([base, bad])
    assert codec.decode_sequence([base, base])[0][0].shape[-2] == 8


# --- decoding untrusted bytes ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chunk():
    return codec.encode_chunk(make_kv(layers=2, tokens=40), "medium", fingerprint=FP, raw_tokens=1)


def test_empty_and_short_inputs(chunk):
    with pytest.raises(TruncatedBitstream):
        codec.decode_chunk(b"")
    with pytest.raises(TruncatedBitstream):
        codec.decode_chunk(b"TW")
    with pytest.raises(CorruptBitstream):
        codec.decode_chunk(b"NOPE" + bytes(100))
    with pytest.raises(TruncatedBitstream):
        codec.decode_chunk(chunk[:30])


def test_every_truncation_is_typed(chunk):
    for cut in sorted({*range(0, 60), *range(60, len(chunk), 97), len(chunk) - 1}):
        with pytest.raises(TruncatedBitstream):
            codec.decode_chunk(chunk[:cut])
    with pytest.raises(CorruptBitstream):
        codec.decode_chunk(chunk + b"\0")


def test_bit_flips_fail_the_crc(chunk):
    rng = np.random.default_rng(0)
    for pos in [*range(0, 36), *rng.integers(36, len(chunk), 60)]:
        bad = bytearray(chunk)
        bad[int(pos)] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(KVCodecError):
            codec.decode_chunk(bytes(bad))


def _forge(data: bytes) -> bytes:
    """Fix the CRC after tampering: what an attacker (or a bug upstream of the CRC) would send."""
    body = bytes(data[:-4])
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_forged_crc_still_gives_typed_errors(chunk, backend):
    """Bytes with a valid CRC but garbage inside: a typed error or a well-formed result, never a crash."""
    rng = np.random.default_rng(1)
    outcomes = {"error": 0, "decoded": 0}
    positions = [*range(8, 36), *rng.integers(36, len(chunk) - 4, 150 if backend == "numba" else 30)]
    for pos in positions:
        bad = bytearray(chunk)
        bad[int(pos)] ^= 1 << int(rng.integers(0, 8))
        try:
            out = codec.decode_chunk(_forge(bytes(bad)), backend=backend)
        except KVCodecError:
            outcomes["error"] += 1
        else:
            outcomes["decoded"] += 1
            assert len(out) >= 1 and all(torch.isfinite(k).all() and torch.isfinite(v).all() for k, v in out)
    assert outcomes["error"] > 0


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("big", [False, True])
def test_forged_non_finite_raw_token_is_corrupt(value, big):
    """The sink token is stored verbatim (fp16, or fp32 when it does not fit): NaN there must not decode."""
    kv = make_kv(layers=1, heads=1, tokens=4)
    if big:
        kv = [(kv[0][0] * 1e6, kv[0][1])]
    data = bytearray(codec.encode_chunk(kv, "medium", fingerprint=FP, raw_tokens=1))
    c = bitstream.unpack(bytes(data))
    assert c.raw.dtype == (np.float32 if big else np.float16)
    raw_at = len(data) - 4 - 2 * len(c.words) - 2 * len(c.counts) - c.raw.nbytes  # raw, counts, words, CRC
    assert data[raw_at:raw_at + c.raw.nbytes] == c.raw.astype(c.raw.dtype.newbyteorder("<")).tobytes()
    data[raw_at:raw_at + c.raw.itemsize] = np.array([value], c.raw.dtype.newbyteorder("<")).tobytes()
    with pytest.raises(CorruptBitstream, match="raw"):
        codec.decode_chunk(_forge(bytes(data)))


def test_header_field_checks(chunk):
    def patched(offset, fmt, value):
        b = bytearray(chunk)
        struct.pack_into(fmt, b, offset, value)
        return _forge(bytes(b))

    with pytest.raises(UnsupportedVersion):
        codec.decode_chunk(patched(4, "<B", 2))  # version
    with pytest.raises(UnsupportedVersion):
        codec.decode_chunk(patched(5, "<B", 9))  # codec id
    with pytest.raises(UnsupportedVersion):
        codec.decode_chunk(patched(7, "<B", 0x80))  # unknown flag
    with pytest.raises(CorruptBitstream):
        codec.decode_chunk(patched(16, "<H", 0))  # zero layers
    with pytest.raises(CorruptBitstream):
        codec.decode_chunk(patched(16, "<H", 3))  # more layers than the body holds
    with pytest.raises(CorruptBitstream):
        codec.decode_chunk(patched(26, "<B", 7))  # dtype code
    with pytest.raises(CorruptBitstream):
        codec.decode_chunk(patched(27, "<B", 41))  # raw tokens > tokens
    with pytest.raises(CorruptBitstream):
        codec.decode_chunk(patched(28, "<H", 7))  # channels per stream does not divide 16
    with pytest.raises(TruncatedBitstream):
        codec.decode_chunk(patched(32, "<I", len(chunk)))  # body longer than the data


def test_decompression_bomb_is_refused():
    """A forged header asking for a huge chunk is refused before allocation, CRC valid or not."""
    b = bytearray(codec.encode_chunk(make_kv(layers=1, tokens=4), "low", fingerprint=FP))
    struct.pack_into("<HHH", b, 16, 4000, 256, 128)  # 4000 layers x 256 heads x 128 dims
    with pytest.raises(CorruptBitstream, match="elements"):
        codec.decode_chunk(_forge(bytes(b)))
    small = codec.encode_chunk(make_kv(layers=2, tokens=40), "low", fingerprint=FP)
    with pytest.raises(CorruptBitstream):
        codec.decode_chunk(small, max_elements=1000)


def test_model_mismatch(chunk):
    with pytest.raises(ModelMismatch):
        codec.decode_chunk(chunk, expect_fingerprint=FP + 1)
    with pytest.raises(ModelMismatch):
        codec.decode_chunk(chunk, expect_geometry=(2, 2, 16))
    assert len(codec.decode_chunk(chunk, expect_fingerprint=FP, expect_geometry=(2, 2, 8))) == 2


def test_package_import_is_light():
    import subprocess
    import sys

    code = ("import sys, tokenwire.transport, tokenwire.transport.cachegen, tokenwire.transport.cachegen.cli;"
            "bad = [m for m in ('torch', 'numba', 'transformers') if m in sys.modules]; print(bad); "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
