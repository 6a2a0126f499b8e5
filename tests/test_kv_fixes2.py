"""Fixes from a KV probe: the controller's probe where the prior says text (a LAN never used KV), the codec's
empty sequence and unusable devices, and the SDK's connect_kv/fetch_kv arguments."""

from __future__ import annotations

import pytest
import torch

from tests.test_kv_channel import make_kv, run
from tokenwire.daemon.kv_service import KVService
from tokenwire.daemon.kv_store_local import LocalChunkStore
from tokenwire.transport.cachegen import codec
from tokenwire.transport.cachegen.errors import InvalidInput
from tokenwire.transport.kv_channel import ServerTuning, connect_kv, serve_kv
from tokenwire.transport.kv_controller import LEVELS, SAMPLE_MIN_BYTES, TEXT, ChunkOptions, KVController
from tokenwire.transport.kv_server_session import LINK_MIN_SAMPLES

MB = 1_000_000
MODEL = "tiny-test"


# -- the probe: the sans-I/O controller ------------------------------------------------------------------------
def chunk(low=600_000, recompute_s=0.5, decode_s=0.0):
    """A 256-token chunk whose text (0.5 s of recompute) beats its lowest level (0.96 s) at a 5 Mbit/s prior."""
    return ChunkOptions({"low": int(low), "medium": int(low * 1.35), "high": int(low * 1.85)}, 1024, recompute_s,
                        dict.fromkeys(LEVELS, decode_s))


COLD = dict(inflight_bytes=0, median_bps=None, low_bps=None)  # nothing measured on this fetch: the prior plans


def test_a_cold_decision_for_text_probes_the_link_where_the_deadline_leaves_room():
    """Text chunks give no rate sample: a prior that makes recomputing look cheaper than sending was never
    corrected, whatever the deadline. With ``explore`` the chunk goes at the lowest level, as a probe, when the
    probe and every later chunk at its cheapest (text here) fit the time left at the prior's firm guard rate
    (5 Mbit/s * PRIOR_LOW**2 = 1.25 Mbit/s: 3.84 s for the probe, 2 x 0.507 s for the two text chunks)."""
    c = KVController("tokenwire", prior_bps=5e6)
    three = [chunk()] * 3
    assert c.choose(three, time_left_s=60, **COLD).level == TEXT  # no exploring: text forever
    d = c.choose(three, time_left_s=4.9, **COLD, explore=True)
    assert (d.level, d.probe, d.planned) == ("low", True, ("low", TEXT, TEXT))
    d = c.choose(three, time_left_s=4.8, **COLD, explore=True)  # no room at the guard rate: text
    assert (d.level, d.probe) == (TEXT, False)
    # recompute dearer than the lowest level but cheaper than the best: text is the plan's top rung; a fast
    # link would drop it from the ladder, so a probe is worth it there too (1.2 s of recompute: 5 x 1.2066 s)
    assert c.choose([chunk(recompute_s=1.2)] * 3, time_left_s=60, **COLD).level == TEXT
    assert c.choose([chunk(recompute_s=1.2)] * 3, time_left_s=60, **COLD, explore=True).probe


def test_no_probe_where_no_measurement_could_change_the_choice():
    c = KVController("tokenwire", prior_bps=5e6)
    kw = dict(time_left_s=60, **COLD, explore=True)
    # recomputing for free: text is cheaper than any level at any rate
    assert c.choose([chunk(recompute_s=0.0)] * 3, **kw).level == TEXT
    # a chunk too small to give a rate sample
    small = ChunkOptions({"low": SAMPLE_MIN_BYTES - 1, "medium": SAMPLE_MIN_BYTES, "high": 2 * SAMPLE_MIN_BYTES},
                         64, 0.05, {})
    assert c.choose([small] * 3, **kw).level == TEXT
    # the connection has measured the link already, and it is slow: recomputing still beats the best level
    assert c.choose([chunk()] * 3, **kw, measured_bps=4e6).level == TEXT
    # ...or fast: probe, priced at that measurement (25 Mbit/s guard: 3 x 0.19 s of low), not at the prior
    d = c.choose([chunk()] * 3, **dict(kw, time_left_s=2.0), measured_bps=100e6)
    assert (d.level, d.probe) == ("low", True)
    assert not c.choose([chunk()] * 3, **dict(kw, time_left_s=2.0)).probe  # the prior's guard: 4.85 s
    # a fetch with a measurement of its own (a forecast) plans on it: no probe
    warm = c.choose([chunk()] * 3, time_left_s=60, inflight_bytes=0, median_bps=4e6, low_bps=3e6, explore=True)
    assert (warm.level, warm.probe) == (TEXT, False)
    # CacheGen's rule and the legacy rule are left as they are (baselines and ablations)
    for other in (KVController("even-split", prior_bps=5e6), KVController("tokenwire", prior_bps=5e6, legacy=True)):
        assert not other.choose([chunk()] * 3, **kw).probe


# -- the probe: the server session (sans-I/O) ---------------------------------------------------------------------
def _session(tuning, chunks=3, deadline_ms=10_000, sizes=None):
    """A server session with one accepted fetch of ``chunks`` 256-token chunks whose text beats the lowest level
    at the default 5 Mbit/s prior (2 ms/token: 0.51 s against 0.96 s)."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    from tokenwire.transport.frames import KvFetch, StreamDecoder
    from tokenwire.transport.kv_channel import ContextPlan, KVServerSession, ServerFetch

    quic = QuicConnection(configuration=QuicConfiguration(is_client=True))
    quic._loss._rtt_min, quic._loss._rtt_smoothed, quic._loss._rtt_initialized = 0.001, 0.001, True
    session = KVServerSession(quic, tuning=tuning)
    sizes = sizes or {"low": 600_000, "medium": 810_000, "high": 1_110_000}
    plan = ContextPlan(256 * chunks, [256] * chunks, [256 * 11520] * chunks, [dict(sizes) for _ in range(chunks)],
                       (30, 3, 64), 0, "float16")
    f = ServerFetch(0, KvFetch(model=MODEL, deadline_ms=deadline_ms, token_ids=[1] * 256 * chunks,
                               recompute_us_per_token=2000), StreamDecoder(), 0.0)
    session.fetches[0] = f
    session.start(0, plan, 0.0)
    return quic, session, f


def _send(quic, session, f, index, level, now):
    """Write chunk ``index`` as the driver would; returns its stream's sender (to acknowledge bytes by hand)."""
    size = f.plan.sizes[index][level] if level != TEXT else 4 * f.plan.token_counts[index]
    session.send_chunk(0, index, level, b"x" * size, now)
    sid, written = f.chunk_streams[-1]
    sender = quic._streams[sid].sender
    sender.highest_offset = written  # all of it handed to the network: nothing unsent
    return sender, written


def test_the_session_probes_then_waits_for_the_probes_own_rate_and_plans_on_it():
    from aioquic.quic.packet_builder import QuicDeliveryState

    from tokenwire.transport.kv_channel import KVChunkNeeded

    quic, session, f = _session(ServerTuning(forecaster="ewma"))
    [ev] = session.poll(0.0)
    assert isinstance(ev, KVChunkNeeded) and ev.level == "low"  # 5 Mbit/s prior: text, but a probe fits 10 s
    assert f.decisions[0]["probe"] is True and f.probe == 0
    sender, written = _send(quic, session, f, 0, "low", 0.0)
    # all but 10 kB acknowledged, 20 ms in: the usual look-ahead would decide now, before any rate exists
    # (FRESH_MIN_S of ACKs), cold again, and go text; the session holds until the probe is measured
    sender.on_data_delivery(QuicDeliveryState.ACKED, 0, written - 10_000, False)
    assert session._unacked(f) <= session._lookahead(f, 0.02)
    assert session.poll(0.02) == [] and session.poll(0.03) == []
    sender.on_data_delivery(QuicDeliveryState.ACKED, written - 10_000, written, False)
    [ev] = session.poll(0.041)
    d = f.decisions[1]
    # the probe's whole-chunk rate: its bytes over the 41 ms since its write, less the 1 ms min-RTT (~120 Mbit/s)
    assert d["fresh"] and d["median_bps"] == pytest.approx(written * 8 / 0.040)
    assert ev.level in LEVELS and ev.level != "low" and not d["probe"]  # a fast link: more than the lowest level


def test_a_probe_encoded_too_small_to_measure_does_not_hold_the_fetch():
    """Its predicted size passed SAMPLE_MIN_BYTES, its encoding came out smaller: no rate could ever come from
    it, and the session waited for one for ever (the fetch hung until its client gave up)."""
    _, session, f = _session(ServerTuning(forecaster="ewma"))
    [ev] = session.poll(0.0)
    assert ev.level == "low" and f.probe == 0
    session.send_chunk(0, 0, "low", b"x" * 8_000, 0.0)  # 8 kB: below MIN_SAMPLE_BYTES
    assert session._awaiting_probe(f, 0.02) is False
    events = []
    for k in range(1, 400):  # the next chunk is decided without the probe's rate
        events += session.poll(k * 0.01)
        if events:
            break
    assert events and len(f.decisions) == 2 and not f.decisions[1]["probe"]


def test_the_session_stops_exploring_once_the_connection_has_measured_its_link():
    from tokenwire.transport.kv_channel import KVChunkNeeded

    # a link prior of its own (LINK_MIN_SAMPLES chunk rates): it plans, and says text is right; no probe
    _, session, f = _session(ServerTuning(forecaster="ewma"))
    session.link_rates.extend([3e6] * LINK_MIN_SAMPLES)
    f.controller.prior_bps, f.controller.prior_low = session.link_prior()  # as start() would have set them
    [ev] = session.poll(0.0)
    assert isinstance(ev, KVChunkNeeded) and ev.level == TEXT and f.probe is None
    # fewer rates, all slow: the configured prior plans, the rates say the probe would change nothing
    _, session, f = _session(ServerTuning(forecaster="ewma"))
    session.link_rates.extend([3e6, 4e6])
    assert session.poll(0.0)[0].level == TEXT and f.probe is None
    # fewer rates, fast: probe (priced at them)
    _, session, f = _session(ServerTuning(forecaster="ewma"), deadline_ms=2000)
    session.link_rates.extend([200e6, 300e6])
    assert session.poll(0.0)[0].level == "low" and f.probe == 0
    # tuning.probe=False: the previous behaviour
    _, session, f = _session(ServerTuning(forecaster="ewma", probe=False))
    assert session.poll(0.0)[0].level == TEXT and f.probe is None


# -- the probe, end to end on loopback ---------------------------------------------------------------------------
@pytest.mark.parametrize("probe", [True, False])
def test_a_fresh_connection_on_a_fast_link_fetches_kv_on_its_first_fetch(tmp_path, probe):
    """A prior for a slow link (1 Mbit/s) on loopback, with model-shaped chunks (4 layers x 8 heads x 64 dims,
    128 tokens: 166 kB at the lowest level, 280 kB at the highest) and a prefill cost (7 ms/token: 0.9 s per
    chunk) under which text beats the lowest level at the prior (1.3 s): every fetch went text (``probe=False``,
    the previous behaviour), as SmolLM2 did at the default 5 Mbit/s. The first chunk now probes the link (it
    fits 10 s at the prior's guard, 0.25 Mbit/s) and the rest are planned on what it measured: above
    2.5 Mbit/s recomputing is dearer than sending the best level (loopback here: tens of Mbit/s and more)."""
    chunk_tokens = 128
    service = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=chunk_tokens)
    ids = list(range(1000, 1000 + 3 * chunk_tokens))
    g = torch.Generator().manual_seed(5)
    kv = [(torch.randn(1, 8, len(ids), 64, generator=g).half(), torch.randn(1, 8, len(ids), 64, generator=g).half())
          for _ in range(4)]
    service.ingest_sync(MODEL, ids, kv, prewarm=list(LEVELS))  # encoded ahead: exact sizes, no encode in the fetch

    async def go():
        server = await serve_kv(service, "127.0.0.1", 0,
                                tuning=ServerTuning(forecaster="ewma", prior_bps=1e6, probe=probe))
        try:
            async with connect_kv("127.0.0.1", server.port, verify=False) as conn:
                return await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=10_000,
                                           recompute_us_per_token=7000)
        finally:
            server.close()

    try:
        res = run(go())
    finally:
        service.close()
    if not probe:
        assert res.report.levels == [TEXT] * 3 and res.prefix_kv() == (None, 0)
        return
    assert res.report.levels[0] == "low" and all(lv in LEVELS for lv in res.report.levels)
    kv_out, n = res.prefix_kv()
    assert n == len(ids) and kv_out is not None and kv_out[0][0].shape == (1, 8, len(ids), 64)


# -- codec: an empty sequence, an unusable device ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_an_empty_kv_round_trips_as_one_zero_token_chunk(dtype):
    """kv_codec.md: the encoder writes one 0-token chunk for an empty input. It wrote none, and decode_sequence
    refused the empty list ("no chunks")."""
    from tokenwire.transport.cachegen import bitstream

    kv = [(torch.zeros(1, 2, 0, 8, dtype=dtype), torch.zeros(1, 2, 0, 8, dtype=dtype)) for _ in range(3)]
    chunks = codec.encode_sequence(kv, "low", fingerprint=7)
    assert len(chunks) == 1 and bitstream.read_header(chunks[0]).n_tokens == 0
    out = codec.decode_sequence(chunks, expect_fingerprint=7)
    assert len(out) == 3 and all(k.shape == v.shape == (1, 2, 0, 8) and k.dtype == dtype for k, v in out)
    # [H, T, D] input too
    assert codec.decode_sequence(codec.encode_sequence([(k[0], v[0]) for k, v in kv], "high", fingerprint=7)
                                 )[0][0].shape == (1, 2, 0, 8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_decoding_on_a_device_this_torch_lacks_is_a_typed_error_naming_it():
    """On a CPU-only torch, device="cuda" raised a bare AssertionError from the first allocation."""
    chunks = codec.encode_sequence(make_kv(4), "low", fingerprint=1)
    for call in (lambda: codec.decode_sequence(chunks, device="cuda"),
                 lambda: codec.decode_chunk(chunks[0], device="cuda:0")):
        with pytest.raises(InvalidInput, match=r"device 'cuda(:0)?' is not available here: .*CUDA"):
            call()
    with pytest.raises(InvalidInput, match="device 'gpu' is not available here"):  # not a device name at all
        codec.decode_chunk(chunks[0], device="gpu")
    with pytest.raises(InvalidInput, match="holds no data"):
        codec.decode_chunk(chunks[0], device="meta")
    assert codec.decode_chunk(chunks[0], device=torch.device("cpu"))[0][0].shape == (1, 2, 4, 16)


# -- the SDK: connect_kv and fetch_kv arguments ---------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_connect_kv_refuses_a_decode_device_it_cannot_use_before_connecting():
    """It connected, and the first fetch failed ~0.7 s later with torch's bare AssertionError."""

    async def go(device):
        async with connect_kv("127.0.0.1", 9, verify=False, decode_device=device, timeout=0.5):
            pass  # never reached: the check comes before any packet

    for device in ("cuda", "cuda:1", "nope"):
        with pytest.raises(ValueError, match=rf"decode_device: device '{device}' is not available here"):
            run(go(device))


@pytest.fixture
def service(tmp_path):
    svc = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=32)
    yield svc
    svc.close()


def test_connect_kv_takes_cadata_as_connect_does(service, tmp_path):
    """The README's chat example passes ``cadata=dev_cert().cert_pem``; connect_kv had no such argument."""
    from tokenwire.transport.tls import dev_cert

    ids = list(range(32))
    service.ingest_sync(MODEL, ids, make_kv(32, 1))
    cert = dev_cert()

    async def go(cadata):
        server = await serve_kv(service, "127.0.0.1", 0, cert=cert, tuning=ServerTuning(forecaster="ewma"))
        try:
            async with connect_kv("127.0.0.1", server.port, cadata=cadata, server_name="localhost",
                                  timeout=5) as conn:
                return await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L1")
        finally:
            server.close()

    for cadata in (cert.cert_pem, cert.cert_pem.decode()):  # bytes or str, as connect() takes
        assert run(go(cadata)).report.levels == ["low"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"token_ids": []}, r"invalid fetch: token_ids is empty"),
    ({"token_ids": None}, r"invalid fetch: pass exactly one of token_ids and hashes"),
    ({"hashes": ["00" * 16]}, r"invalid fetch: pass exactly one of token_ids and hashes"),
], ids=["empty", "neither", "both"])
def test_a_fetch_without_token_ids_names_the_argument(service, kwargs, message):
    """``token_ids=[]`` said "invalid fetch: kvfetch: empty token id list" (the wire's words)."""

    async def go():
        server = await serve_kv(service, "127.0.0.1", 0, tuning=ServerTuning(forecaster="ewma"))
        try:
            async with connect_kv("127.0.0.1", server.port, verify=False) as conn:
                with pytest.raises(ValueError, match=message):
                    await conn.fetch_kv(model=MODEL, deadline_ms=1000, **{"token_ids": list(range(32)), **kwargs})
        finally:
            server.close()

    run(go())
