"""The KV codec and the KV client's decode path against hostile bitstreams, and the encoder on odd inputs.

A probe found: the client decoded a chunk in full before comparing its token count with KV_CHUNK's (an
8-token chunk whose bitstream said 16384 tokens expanded to 188 M elements, +3 GB) and never compared the
bitstream's level with KV_CHUNK's; a chunk of 0 tokens decoded its side sections (1.6 MB: 15 s, +4.3 GB for an
empty output); decoding peaked at ~17 bytes per element; any stream layout was accepted (the torch decoder
steps through a stream one Python iteration per symbol); ``fetch_kv(timeout_s=...)`` did not bound decoding;
the encoder crashed on KV that requires grad and raised untyped errors for some odd inputs.
"""

from __future__ import annotations

import asyncio
import threading
import time
import tracemalloc
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

from tokenwire.transport.cachegen import (  # noqa: E402
    CorruptBitstream,
    InvalidInput,
    bitstream,
    codec,
    rans,
)
from tokenwire.transport.cachegen.bitstream import Chunk, pack  # noqa: E402
from tokenwire.transport.errors import ErrorCode  # noqa: E402
from tokenwire.transport.frames import KvDone, KvFetch, KvMeta  # noqa: E402
from tokenwire.transport.kv_channel import KVCorruptChunk, KVError, max_codec_chunk_bytes  # noqa: E402

from .test_kv_client_hostile import _Hostile, _hostile, _run  # noqa: E402

FP = 1234
GEO = [2, 2, 16]  # layers, kv heads, head dim
CT = 8  # tokens of the one chunk the hostile servers send


def make_kv(layers: int = 2, heads: int = 2, tokens: int = CT, dim: int = 16, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [tuple((torch.randn(1, heads, tokens, dim, generator=g) * 3).to(dtype) for _ in "KV")
            for _ in range(layers)]


def const_chunk(layers: int, heads: int, dim: int, tokens: int, *, g: int | None = None) -> bytes:
    """A valid chunk that costs almost nothing to send: every payload stream is constant (6 bytes)."""
    n_c = heads * dim
    g = bitstream.stream_channels_for(tokens, n_c) if g is None else g
    n_streams = 0 if tokens == 0 else 2 * layers * n_c // g
    freq = np.zeros((1 if tokens else 0, 256), np.uint32)
    freq[:, 128] = 4096
    zeros = np.zeros((layers, 2, n_c), np.uint8)
    return pack(Chunk(2, FP, layers, heads, dim, tokens, "float32", 0, g, zeros + 16, np.zeros((layers, 2), np.int8),
                      np.zeros((layers, 2, tokens), np.uint8), zeros.view(np.int8), zeros, zeros, freq,
                      np.zeros((0, layers, 2, n_c), np.float16), np.full(n_streams, 2, np.uint16),
                      np.tile(np.array([0, 1], np.uint16), n_streams)))


# ------------------------------------------------------------------------------------------------- the client
def _serve_one(payload: bytes, level: str, dtype: str = "float32"):
    async def serve_it(p: _Hostile, sid: int, req: KvFetch) -> None:
        p.send(sid, KvMeta(1, CT, CT, list(GEO), FP, dtype))
        p.chunk(sid, 0, payload, level=level, tokens=CT)
        await asyncio.sleep(0.05)
        p.send(sid, KvDone(1, [level]), end=True)

    return serve_it


async def _fetch_one(scenario, **kw):
    async with _hostile(scenario) as conn:
        return await conn.fetch_kv(model="m", token_ids=list(range(CT)), deadline_ms=5000, **kw)


@pytest.fixture(autouse=True)
def _warmed_up(monkeypatch):
    """These tests spy on or stall the codec's decode: connect_kv's warm-up (a tiny chunk decoded once per
    process, awaited before the connection is handed over) is taken as done, so it neither counts nor stalls."""
    from concurrent.futures import Future

    from tokenwire.transport import kv_client

    warmed: Future[float] = Future()
    warmed.set_result(0.0)
    monkeypatch.setattr(kv_client, "_warm_up", warmed)


@pytest.fixture
def decodes(monkeypatch):
    """The ``max_elements`` of every ``decode_chunk`` call the client makes."""
    seen: list[int] = []
    real = codec.decode_chunk

    def spy(data, **kw):
        seen.append(kw.get("max_elements", bitstream.DEFAULT_MAX_ELEMENTS))
        return real(data, **kw)

    monkeypatch.setattr(codec, "decode_chunk", spy)
    return seen


@pytest.mark.parametrize(("case", "message"), [
    ("tokens", "chunk 0: 4096 tokens, header says 8"),
    ("geometry", r"chunk 0 has geometry \[2, 2, 8\], KV_META says \[2, 2, 16\]"),
    ("dtype", "chunk 0 is float16, KV_META says float32"),
    ("level", "chunk 0 is sent as high, its bitstream has level id 2"),
])
def test_the_client_checks_a_chunks_bitstream_header_before_decoding_it(decodes, case, message):
    """The token count was compared after the whole chunk had been decoded (a 72-KB chunk of "8 tokens" that
    said 16384 decoded 188 M elements first), and the level not at all (a medium chunk sent as high returned
    as high). Each mismatch is now a KVCorruptChunk without a decode."""
    if case == "tokens":
        payload = const_chunk(*GEO, 4096)  # 0.5 M elements for a few KB: within an 8-token chunk's bound
        assert len(payload) <= max_codec_chunk_bytes(GEO, CT)
    else:
        payload = codec.encode_chunk(make_kv(dim=8 if case == "geometry" else 16,
                                             dtype=torch.float16 if case == "dtype" else torch.float32),
                                     "medium", fingerprint=FP)
    with pytest.raises(KVCorruptChunk, match=message):
        _run(_fetch_one(_serve_one(payload, "high" if case == "level" else "medium")))
    assert decodes == []


def test_the_client_decodes_an_honest_chunk_with_an_element_budget_of_exactly_that_chunk(decodes):
    payload = codec.encode_chunk(make_kv(), "medium", fingerprint=FP)
    res = _run(_fetch_one(_serve_one(payload, "medium")))
    assert res.chunks[0].kv[0][0].shape == (1, 2, CT, 16)
    assert decodes == [2 * 2 * 2 * 16 * CT]  # 2 L H D T, not the codec's default of 2**29


def test_fetch_kv_timeout_bounds_decoding_too(monkeypatch):
    """``timeout_s`` bounded the receipt only: a decode that never ended kept ``fetch_kv`` waiting."""
    release = threading.Event()
    real = codec.decode_chunk

    def stuck(data, **kw):
        release.wait(10)  # a decode far slower than the timeout (released at the end of the test)
        return real(data, **kw)

    monkeypatch.setattr(codec, "decode_chunk", stuck)
    payload = codec.encode_chunk(make_kv(), "medium", fingerprint=FP)

    async def go() -> float:
        t0 = time.monotonic()
        try:
            with pytest.raises(KVError, match=r"timed out: 1 chunks received of 1 \(0 decoded\)") as ei:
                await asyncio.wait_for(_fetch_one(_serve_one(payload, "medium"), timeout_s=0.5), 5)
        finally:
            release.set()
        assert ei.value.code == ErrorCode.UPSTREAM_TIMEOUT
        return time.monotonic() - t0

    assert _run(go()) < 2


# -------------------------------------------------------------------------------------------------- the codec
def test_a_chunk_of_no_tokens_decodes_none_of_its_side_information(monkeypatch):
    """0 tokens: the 4 per-channel side sections (2 L C bytes each) were rANS-decoded and converted for an
    empty output. Now they are stepped over: no symbol decoded, no allocation of their size."""
    layers, heads, dim = 16, 64, 128  # 2 L C = 262144 side bytes per section
    data = const_chunk(layers, heads, dim, 0)
    decoded: list[int] = []
    real = rans.decode
    monkeypatch.setattr(rans, "decode", lambda words, counts, n, *a: (decoded.append(len(counts) * n),
                                                                      real(words, counts, n, *a))[1])
    codec.decode_chunk(const_chunk(1, 1, 8, 0))  # numpy's first-use allocations, outside the measurement
    tracemalloc.start()
    try:
        out = codec.decode_chunk(data, expect_geometry=(layers, heads, dim))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(decoded) == 0
    assert peak < 2 * layers * heads * dim // 8, peak
    assert len(out) == layers and all(t.shape == (1, heads, 0, dim) for kv in out for t in kv)
    # what the encoder writes for no tokens still round-trips, and the skipped sections are still checked
    enc = codec.encode_chunk(make_kv(tokens=0), "medium", fingerprint=FP)
    assert [t.shape for t in codec.decode_chunk(enc)[0]] == [(1, 2, 0, 16)] * 2
    body_len = int.from_bytes(data[32:36], "little")
    longer = data[:32] + (body_len + 1).to_bytes(4, "little") + data[36:-4] + b"\0"
    with pytest.raises(CorruptBitstream, match="unexplained bytes"):
        codec.decode_chunk(longer + zlib.crc32(longer).to_bytes(4, "little"))


def test_decoding_dequantizes_one_layer_at_a_time(monkeypatch):
    """Dequantizing the whole chunk at once held int16 and fp32 temporaries of every element (peak ~17 bytes
    per element; the output is 2-4). Counted here in elements per dequantize call; values are unchanged
    (tests/test_kv_codec_golden.py)."""
    layers, heads, tokens, dim = 6, 2, 40, 8
    kv = make_kv(layers, heads, tokens, dim)
    data = codec.encode_chunk(kv, "high", fingerprint=FP, raw_tokens=1)
    sizes: list[int] = []
    real = codec.dequantize
    monkeypatch.setattr(codec, "dequantize", lambda sym, *a: (sizes.append(sym.numel()), real(sym, *a))[1])
    for dtype in (None, torch.float16):
        out = codec.decode_chunk(data, dtype=dtype)
        assert max(sizes) <= 2 * heads * tokens * dim  # one layer's K and V
        sink = kv[-1][1][..., 0, :].half().to(out[-1][1].dtype)  # stored as fp16
        assert torch.equal(out[-1][1][..., 0, :], sink)
        sizes.clear()


def test_the_stream_layout_is_the_formats_not_the_senders():
    """Any divisor of C with g·T <= 65533 was accepted: a sender could make streams ~30x longer than the
    encoder's 2048 symbols, and the torch decoder takes one Python step per symbol of a stream."""
    layers, heads, dim, tokens = 1, 2, 16, 8
    assert bitstream.stream_channels_for(tokens, heads * dim) == 32
    assert len(codec.decode_chunk(const_chunk(layers, heads, dim, tokens))) == layers
    for g in (1, 16):
        with pytest.raises(CorruptBitstream, match=f"bad stream layout \\({g} channels per stream, the format's is 32"):
            codec.decode_chunk(const_chunk(layers, heads, dim, tokens, g=g))
    # the check runs on untrusted headers: bounded by 2048 candidates, not by C (counted, not timed: a time
    # bound measured the host's load as well)
    tried: list[int] = []

    class Channels(int):
        """C as a header states it, counting the candidates tried against it (stopping a scan over all of C)."""

        def __mod__(self, g: int) -> int:
            tried.append(g)
            if len(tried) > 2048:
                raise AssertionError(f"more than 2048 candidates tried against C = {int(self)}")
            return int(self) % g

    assert bitstream.stream_channels_for(1, Channels(2**28)) == 2048 and len(tried) <= 2048
    tried.clear()
    assert bitstream.stream_channels_for(4096, Channels(2**28)) == 1 and len(tried) <= 1


def test_kv_that_requires_grad_encodes():
    """K/V from a forward pass outside torch.no_grad() require grad: encoding raised RuntimeError ("Can't call
    numpy() on Tensor that requires grad")."""
    w = torch.randn(16, 16, requires_grad=True)
    kv = [(k @ w, v @ w) for k, v in make_kv(tokens=20)]
    plain = [(k.detach(), v.detach()) for k, v in kv]
    assert codec.encode_chunk(kv, "medium", fingerprint=FP) == codec.encode_chunk(plain, "medium", fingerprint=FP)
    assert (codec.encode_sequence(kv, "low", fingerprint=FP, chunk_tokens=8)
            == codec.encode_sequence(plain, "low", fingerprint=FP, chunk_tokens=8))
    assert kv[0][0].requires_grad  # the caller's tensors are left as they were


@pytest.mark.parametrize(("kv", "level", "raw"), [
    ([(torch.zeros(1, 0, 4, 8),) * 2], "medium", 0),  # no heads: decoding refuses such a chunk
    ([(torch.zeros(1, 2, 4, 0),) * 2], "medium", 0),  # no head dims
    (None, None, 0),  # AttributeError
    (None, 5, 0),  # AttributeError
    (None, "medium", 1.0),  # TypeError (the range check let floats through)
], ids=["zero-heads", "zero-head-dim", "level-None", "level-int", "raw-tokens-float"])
def test_odd_encoder_inputs_are_invalid_input(kv, level, raw):
    with pytest.raises(InvalidInput):
        codec.encode_chunk(kv or make_kv(tokens=4), level, fingerprint=FP, raw_tokens=raw)
