"""Golden vectors: fixed inputs must give these exact bytes on every machine, backend and device.

The inputs are built from integer arithmetic (exact in fp32), so they are the same everywhere. If a change
alters the bitstream on purpose, bump the format version and regenerate these numbers.
The CUDA half runs only where torch sees a GPU.
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

from tokenwire.transport.cachegen import codec, levels, rans, rans_torch, tables  # noqa: E402

FP = 0x0123_4567_89AB_CDEF
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")

# (level, raw tokens) -> (length, sha256 prefix of the chunk, crc32 of the decoded fp32 values)
GOLDEN_CHUNKS = {
    ("low", 0): (1572, "4ddf4bac60441d58", 335898328),
    ("medium", 1): (1866, "89e1bcd0af17db3c", 1317855308),
    ("high", 1): (2262, "3862ae06a144b7c5", 4243604106),
}
GOLDEN_RANS = (158, 2716359975)  # (words, crc32 of the words)


def golden_kv(device: str = "cpu", dtype: torch.dtype = torch.float32):
    layers, heads, tokens, dim = 2, 2, 24, 8
    shape = (layers, 2, heads, tokens, dim)
    i = torch.arange(layers * 2 * heads * tokens * dim, dtype=torch.int64).reshape(shape)
    noise = ((i * 7919 + (i // 13) * 104729) % 2001 - 1000).to(torch.float32) / 256.0
    chan = ((i % dim) - 3).to(torch.float32) * 1.5  # per-channel offsets (keys)
    tok = (1 + (i // dim) % 5).to(torch.float32) / 4  # per-token magnitude swings (values)
    x = torch.stack([noise[:, 0] + chan[:, 0], noise[:, 1] * tok[:, 1]], dim=1)
    x[:, :, :, 0] *= 4  # a strong first token
    return [(x[li, 0][None].to(device, dtype), x[li, 1][None].to(device, dtype)) for li in range(layers)]


def golden_profile():
    return levels.uniform_profile(2, 16)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def values_crc(kv) -> int:
    return zlib.crc32(b"".join(t.float().cpu().numpy().tobytes() for pair in kv for t in pair))


def golden_symbols():
    sym = ((np.arange(6 * 96).reshape(6, 96) * 37 + 11) % 23).astype(np.uint8) + 100
    sym[2] = 105  # a constant stream
    seg = (np.arange(12).reshape(6, 2) % 3).astype(np.int32)
    return sym, seg


@pytest.mark.parametrize(("level", "raw"), list(GOLDEN_CHUNKS))
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_golden_chunk_cpu(level, raw, backend):
    data = codec.encode_chunk(golden_kv(), level, fingerprint=FP, raw_tokens=raw, profile=golden_profile(),
                              backend=backend)
    out = codec.decode_chunk(data, backend=backend)
    assert (len(data), digest(data), values_crc(out)) == GOLDEN_CHUNKS[(level, raw)]


def _t(a: np.ndarray, device: str = "cpu") -> torch.Tensor:
    return torch.from_numpy(a.astype(np.int64) if a.dtype == np.uint32 else a).to(device)


def test_golden_rans_words():
    sym, seg = golden_symbols()
    freq = tables.normalize_counts(tables.histogram(sym, seg, 3))
    words, _ = rans.encode(sym, seg, freq, tables.cumulative(freq))
    tw, _ = rans_torch.encode(_t(sym), _t(seg), _t(freq), _t(tables.cumulative(freq)))
    assert np.array_equal(tw.numpy().astype(np.uint16), words)
    assert (int(words.size), zlib.crc32(words.astype("<u2").tobytes())) == GOLDEN_RANS


@needs_cuda
@pytest.mark.parametrize(("level", "raw"), list(GOLDEN_CHUNKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_bitstreams_match_cpu(level, raw, dtype):
    cpu = codec.encode_chunk(golden_kv("cpu", dtype), level, fingerprint=FP, raw_tokens=raw,
                             profile=golden_profile(), backend="numba")
    gpu = codec.encode_chunk(golden_kv("cuda", dtype), level, fingerprint=FP, raw_tokens=raw,
                             profile=golden_profile(), backend="torch")
    assert gpu == cpu
    if dtype == torch.float32:
        assert digest(gpu) == GOLDEN_CHUNKS[(level, raw)][1]
    out_gpu = codec.decode_chunk(gpu, device="cuda", backend="torch")
    out_cpu = codec.decode_chunk(cpu, backend="numba")
    for a, b in zip(out_gpu, out_cpu, strict=True):
        assert a[0].is_cuda and torch.equal(a[0].cpu(), b[0]) and torch.equal(a[1].cpu(), b[1])


@needs_cuda
def test_cuda_rans_matches_golden():
    sym, seg = golden_symbols()
    freq = tables.normalize_counts(tables.histogram(sym, seg, 3))
    cum = tables.cumulative(freq)
    words, counts = rans_torch.encode(_t(sym, "cuda"), _t(seg, "cuda"), _t(freq), _t(cum))
    w = words.cpu().numpy().astype(np.uint16)
    assert (int(w.size), zlib.crc32(w.astype("<u2").tobytes())) == GOLDEN_RANS
    out, status = rans_torch.decode(words, counts, sym.shape[1], _t(seg, "cuda"), _t(freq), _t(cum),
                                    _t(tables.slot_lut(freq)))
    assert status == rans.OK and np.array_equal(out.cpu().numpy(), sym)
