"""The client's decode rate in KV_FETCH, and the server's plan of the client's one-thread decode pipeline.

The server priced every chunk's decode at the configured 50 M elements/s where this SDK decodes 1.3-2.85 M on a CPU,
and counted only the last chunk's decode: a slow client's decode queue was invisible to the plan.
"""

from __future__ import annotations

import math

import msgpack
import pytest

from tests.test_kv_channel import CHUNK, MODEL, kv_client, make_kv, run, service  # noqa: F401  (the fixture)
from tokenwire.transport.errors import FrameError
from tokenwire.transport.frames import (
    MAX_AUTH_CHARS,
    MAX_DEADLINE_MS,
    MAX_KV_TOKENS,
    MAX_MODEL_CHARS,
    MAX_RECOMPUTE_US,
    FrameType,
    KvFetch,
    decode_frame,
    encode_frame,
)
from tokenwire.transport.kv_channel import ServerTuning
from tokenwire.transport.kv_controller import ChunkOptions, KVController
from tokenwire.transport.kv_protocol import MAX_KV_FETCH_BYTES
from tokenwire.transport.kv_server_session import KVServerSession

from .test_kv_channel import _accepted_fetch


# -- protocol ------------------------------------------------------------------------------------------------
def test_kv_fetch_carries_the_decode_rate_and_goes_without_it():
    with_rate = KvFetch(model=MODEL, deadline_ms=1000, token_ids=[1, 2, 3], decode_elements_per_s=2.5e6)
    assert decode_frame(encode_frame(with_rate)) == with_rate
    without = KvFetch(model=MODEL, deadline_ms=1000, token_ids=[1, 2, 3])
    assert "dr" not in without.to_wire()  # absent on the wire: what an older client sends
    assert decode_frame(encode_frame(without)).decode_elements_per_s is None


def test_the_largest_kv_fetch_bound_counts_the_decode_rate():
    from tokenwire.transport.frames import MAX_DECODE_RATE

    longest = "\U0010ffff"
    biggest = KvFetch(model=longest * MAX_MODEL_CHARS, deadline_ms=MAX_DEADLINE_MS, token_ids=[(1 << 31) - 1] *
                      MAX_KV_TOKENS, controller="tokenwire-ewma", recompute_us_per_token=MAX_RECOMPUTE_US,
                      auth=longest * MAX_AUTH_CHARS, prefix=True, decode_elements_per_s=MAX_DECODE_RATE * 0.999)
    assert len(encode_frame(biggest)) <= MAX_KV_FETCH_BYTES


@pytest.mark.parametrize("bad", [0, -1.0, 0.5, math.nan, math.inf, 1e13, True, "5e6", None, [1e6]])
def test_a_bad_decode_rate_is_a_typed_frame_error(bad):
    wire = {"t": int(FrameType.KV_FETCH), "v": 1, "model": MODEL, "dl": 1000, "ids": [1], "dr": bad}
    with pytest.raises(FrameError, match="decode rate"):
        decode_frame(msgpack.packb(wire, use_bin_type=True))


# -- the server's plan -----------------------------------------------------------------------------------------
def _decide(decode_elements_per_s):
    """The first decision for 4 chunks of 1 M elements each, 0.1 s at high over the 8 Mbit/s prior, 3 s."""
    tuning = ServerTuning(forecaster="ewma", prior_bps=8e6, recompute_us_per_token=100_000)  # text: 1.6 s a chunk
    _, session, f = _accepted_fetch(tuning, {"low": 50_000, "medium": 70_000, "high": 100_000}, 4, 3000)
    f.plan.elements[:] = [1_000_000] * 4
    f.fetch.decode_elements_per_s = decode_elements_per_s
    session.poll(0.0)
    return f.decisions[0]


def test_the_server_plans_with_the_clients_decode_rate():
    fast = _decide(None)  # the configured 50 M elements/s: 20 ms a chunk, every chunk fits at high
    assert fast["decode_elements_per_s"] == 50e6 and fast["level"] == "high"
    slow = _decide(1e6)  # 1 s a chunk, one after another: 4 s of decoding for a 3-s deadline
    assert slow["decode_elements_per_s"] == 1e6
    assert slow["level"] == "low"


def test_decode_work_still_queued_at_the_client_counts():
    """Chunks already sent at a slow client's rate leave its decode thread busy: the backlog reaches the plan."""
    tuning = ServerTuning(forecaster="ewma", prior_bps=8e6)
    _, _, f = _accepted_fetch(tuning, {"low": 50_000, "medium": 70_000, "high": 100_000}, 4, 3000)
    f.plan.elements[:] = [1_000_000] * 4
    f.fetch.decode_elements_per_s = 1e6
    f.levels, f.first_sent_at = ["high", "high"], 0.5  # 2 s of decoding sent from t = 0.5
    assert KVServerSession._decode_backlog(f, 1.0, 1e6) == pytest.approx(1.5)
    f.levels.append("text")  # text has nothing to decode
    assert KVServerSession._decode_backlog(f, 1.0, 1e6) == pytest.approx(1.5)
    assert KVServerSession._decode_backlog(f, 9.0, 1e6) == 0.0


# -- the pipeline model ----------------------------------------------------------------------------------------
def test_the_last_decode_waits_for_the_queue_before_it():
    from tokenwire.transport.kv_controller import decode_finish

    # decoding (1 s) slower than the link (0.1 s a chunk): each chunk adds its whole decode
    finishes = [decode_finish([0.1] * n, [1.0] * n) for n in range(1, 6)]
    assert finishes == pytest.approx([0.1 + n * 1.0 for n in range(1, 6)])
    # (the previous model: transfers plus the last decode, 0.1 n + 1)
    assert finishes[-1] > 5 * 0.1 + 1.0 + 3
    # decoding faster than the link: the transfers plus the last decode, as before
    assert decode_finish([1.0] * 4, [0.1] * 4) == pytest.approx(4.1)
    # work queued before: the thread is busy that long first
    assert decode_finish([0.1, 0.1], [1.0, 1.0], busy_s=3.0) == pytest.approx(5.0)
    assert decode_finish([0.5], [0.0], busy_s=3.0) == pytest.approx(3.0)


def test_the_controller_downgrades_when_the_decode_queue_misses_the_deadline():
    """4 chunks, high 0.1 s each at 8 Mbit/s, 0.5 s of decoding each: the previous model (0.4 s of transfers plus
    the last decode, 0.9 s) fitted high into 1.5 s; the client's one thread needs 0.1 + 4 x 0.5 = 2.1 s."""
    opts = [ChunkOptions({"low": 50_000, "medium": 70_000, "high": 100_000}, 64, 10.0,
                         dict.fromkeys(("low", "medium", "high"), 0.5)) for _ in range(4)]
    ctl = KVController("tokenwire", prior_bps=8e6)
    d = ctl.choose(opts, time_left_s=1.5, inflight_bytes=0, median_bps=8e6, low_bps=8e6, sample_age_s=0.0)
    assert d.level == "low"
    roomy = ctl.choose(opts, time_left_s=3.0, inflight_bytes=0, median_bps=8e6, low_bps=8e6, sample_age_s=0.0)
    assert roomy.level == "high"
    busy = ctl.choose(opts, time_left_s=3.0, inflight_bytes=0, median_bps=8e6, low_bps=8e6, sample_age_s=0.0,
                      decode_busy_s=1.5)
    assert busy.level == "low"


# -- the client's estimate ---------------------------------------------------------------------------------------
def test_the_decode_rate_is_the_median_of_recent_chunks_within_the_frames_bounds():
    from tokenwire.transport.kv_client_session import DecodeRate

    r = DecodeRate(window=3)
    assert r.rate() is None
    r.observe(1_000_000, 0.5)
    assert r.rate() == 2e6
    r.observe(1_000_000, 10.0)  # one slow outlier
    r.observe(1_000_000, 0.4)
    assert r.rate() == 2e6  # median of 0.1, 2, 2.5 M
    r.observe(0, 1.0)
    r.observe(10, 0.0)  # ignored
    assert r.rate() == 2e6
    r.observe(1, 1e6)
    r.observe(1, 1e6)
    r.observe(1, 1e6)
    assert r.rate() == 1e3  # clamped to what KV_FETCH accepts


def rates_received(monkeypatch) -> list:
    """The decode rate of every KV_FETCH the server receives from now on (None: none sent), in order."""
    seen: list = []
    on_frame = KVServerSession._on_frame

    def spy(self, f, frame, now):
        if isinstance(frame, KvFetch):
            seen.append(frame.decode_elements_per_s)
        return on_frame(self, f, frame, now)

    monkeypatch.setattr(KVServerSession, "_on_frame", spy)
    return seen


def test_a_fetch_tells_the_server_the_rate_measured_on_this_connections_decodes(service, monkeypatch):  # noqa: F811
    ids = list(range(100, 100 + 3 * CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(len(ids)), prewarm=["medium"])
    seen = rates_received(monkeypatch)

    async def go():
        async with kv_client(service) as (conn, _):
            first = await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L2")
            measured = conn.kv.decode_rate.rate()
            second = await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L2")
            return first, measured, second

    first, measured, second = run(go())
    assert first.report.levels == second.report.levels == ["medium"] * 3
    assert measured is not None and measured > 0
    assert seen == [None, measured]  # nothing before any decode; then this connection's figure


def test_a_new_connection_tells_the_server_the_rate_its_process_measured(service, monkeypatch):  # noqa: F811
    """The rate is the host's and the codec's: per connection, a connection's first fetch (every fetch of a client
    opening a connection per fetch) told the server nothing, planned at the configured 50 M elements/s."""
    ids = list(range(100, 100 + 3 * CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(len(ids)), prewarm=["medium"])
    seen = rates_received(monkeypatch)

    async def go():
        async with kv_client(service) as (conn, _):
            await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L2")
            measured = conn.kv.decode_rate.rate()
        async with kv_client(service) as (conn, _):  # a new connection: its first fetch
            await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L2")
        return measured

    measured = run(go())
    assert measured is not None and seen == [None, measured]


def test_a_server_that_does_not_read_the_rate_never_gets_it(service, monkeypatch):  # noqa: F811
    """An older server offers KV_ALPN alone and refuses unknown KV_FETCH fields (closing the connection)."""
    from tokenwire.transport import kv_server
    from tokenwire.transport.frames import KV_ALPN

    real = kv_server.kv_quic_config

    def old_alpn(config):
        real(config).alpn_protocols = [KV_ALPN]
        return config

    monkeypatch.setattr(kv_server, "kv_quic_config", old_alpn)
    ids = list(range(100, 100 + 2 * CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(len(ids)), prewarm=["medium"])

    async def go():
        async with kv_client(service) as (conn, _):
            conn.kv.decode_rate.observe(1_000_000, 0.5)
            assert not conn.kv.sends_decode_rate
            sent = []
            real_send = conn.kv._send
            conn.kv._send = lambda sid, frame, **kw: (sent.append(frame), real_send(sid, frame, **kw))[1]
            res = await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L2")
            return res, sent

    res, sent = run(go())
    assert res.report.levels == ["medium"] * 2
    assert [f.decode_elements_per_s for f in sent if isinstance(f, KvFetch)] == [None]
