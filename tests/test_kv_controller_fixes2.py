"""Fixes from a KV channel probe on the slow traces: the controller's infeasible-deadline rule (a level many times
slower than text), the link prior of a connection with a few slow rates, the client's stall timeout measured
from the last progress, and the ingest messages for a missing prewarm list or an unknown dtype."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest

from tokenwire.daemon import kv_ingest
from tokenwire.daemon.kv_meta import KVIngestError
from tokenwire.daemon.kv_service import KVService
from tokenwire.daemon.kv_store_local import LocalChunkStore
from tokenwire.transport.kv_channel import KVChunkNeeded, ServerTuning
from tokenwire.transport.kv_client import STALL_POLL_S, _wait_while_progressing
from tokenwire.transport.kv_controller import INFEASIBLE_MARGIN, LEVELS, PRIOR_LOW, TEXT, ChunkOptions, KVController
from tokenwire.transport.kv_server_session import LINK_MIN_SAMPLES

from .test_kv_channel import CHUNK, MODEL, make_kv
from .test_kv_ingest_socket import _Writer


# -- 1. the infeasible-deadline rule --------------------------------------------------------------------------------
def _chunks(n: int, low: int, recompute_s: float) -> list[ChunkOptions]:
    return [ChunkOptions({"low": low, "medium": int(low * 1.35), "high": int(low * 1.92)}, 256, recompute_s)
            for _ in range(n)]


def test_an_infeasible_deadline_does_not_send_a_level_many_times_slower_than_text():
    """A measured 150 kbit/s link, 4 chunks of 64 tokens: the lowest level costs 9.5 s at the median, text 0.88 s.
    Once the deadline is lost, sending the level gambled 9.5 s on the link beating its forecast (Verizon-EVDO,
    1-s deadline: 4.6-44.9 s per fetch where all-text took 3.5 s); text is sent."""
    four = _chunks(4, 178_000, 0.877)
    c = KVController("tokenwire")
    for left in (1.0, 3.0):  # 4 x 0.88 s of text does not fit either
        d = c.choose(four, time_left_s=left, inflight_bytes=0, median_bps=150e3, low_bps=70e3)
        assert d.level == TEXT, (left, d)
    # with room, text as before
    assert c.choose(four, time_left_s=10.0, inflight_bytes=0, median_bps=150e3, low_bps=70e3).level == TEXT


def test_an_infeasible_deadline_still_sends_the_lowest_level_where_it_costs_about_what_text_does():
    """The rule's own case (Verizon-LTE, 128-token chunks at 17.7 ms/token: 2.26 s of recompute): the level at
    1.0-1.9 times text's cost at the median, the deadline lost at the median; only bytes on the wire can profit
    from a link that recovers, and all-low fetches so made their deadline (v6 data: rounds at up to 1.49)."""
    three = _chunks(3, 360_000, 2.26)
    c = KVController("tokenwire")
    text_s = 2.26 + 256 * 8 / 1e6
    for ratio in (1.05, 1.49, 0.99 * INFEASIBLE_MARGIN):
        med = 360_000 * 8 / (ratio * text_s)
        d = c.choose(three, time_left_s=5.0, inflight_bytes=0, median_bps=med, low_bps=0.45 * med)
        assert d.level == "low", (ratio, d)
    med = 360_000 * 8 / (1.01 * INFEASIBLE_MARGIN * text_s)  # just past the margin: text
    assert c.choose(three, time_left_s=5.0, inflight_bytes=0, median_bps=med, low_bps=0.45 * med).level == TEXT


# -- 2. the link prior of a connection with fewer than LINK_MIN_SAMPLES rates ------------------------------------------
def _evdo_fetch(tuning: ServerTuning, rates: list[float], deadline_ms: int = 6000) -> tuple[Any, Any]:
    """A server session whose connection has measured ``rates`` (bit/s), and a fetch of 4 chunks of 64 tokens
    (the probe's Verizon-EVDO context: 178/240/342 KB per level, 0.88 s of recompute as text) accepted at t = 0."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    from tokenwire.transport.frames import KvFetch, StreamDecoder
    from tokenwire.transport.kv_channel import ContextPlan, KVServerSession, ServerFetch

    quic = QuicConnection(configuration=QuicConfiguration(is_client=True))
    quic._loss._rtt_min, quic._loss._rtt_smoothed, quic._loss._rtt_initialized = 0.04, 0.04, True
    session = KVServerSession(quic, tuning=tuning)
    session.link_rates.extend(rates)
    sizes = {"low": 178_000, "medium": 240_000, "high": 342_000}
    plan = ContextPlan(256, [64] * 4, [64 * 11520] * 4, [dict(sizes) for _ in range(4)], (30, 3, 64), 0, "float16")
    f = ServerFetch(0, KvFetch(model=MODEL, deadline_ms=deadline_ms, token_ids=[1] * 256,
                               recompute_us_per_token=13710), StreamDecoder(), 0.0)
    session.fetches[0] = f
    session.start(0, plan, 0.0)
    return session, f


def test_a_few_slow_rates_cap_the_configured_prior():
    """Fewer than LINK_MIN_SAMPLES rates: their lower median caps the configured prior (a link measured slow is
    not planned as a 5 Mbit/s one); faster ones leave it; link_prior=False ignores them."""
    session, _ = _evdo_fetch(ServerTuning(forecaster="ewma", prior_bps=5e6), [])
    assert session.link_prior() == (5e6, PRIOR_LOW)
    session.link_rates.extend([0.4e6, 0.1e6, 0.3e6, 0.2e6])  # the probe's warm-up: 0.1-0.4 Mbit/s
    assert session.link_prior() == (0.2e6, PRIOR_LOW)  # the lower median of four
    session.link_rates.clear()
    session.link_rates.append(0.7e6)
    assert session.link_prior() == (0.7e6, PRIOR_LOW)  # one rate: itself
    session.link_rates.clear()
    session.link_rates.extend([20e6, 40e6])
    assert session.link_prior() == (5e6, PRIOR_LOW)  # faster than the prior: not raised on two samples
    session.link_rates.clear()
    session.link_rates.extend([0.2e6] * 3)
    session.tuning.link_prior = False
    assert session.link_prior() == (5e6, PRIOR_LOW)
    assert LINK_MIN_SAMPLES > 4  # the case above is the "few rates" one


def test_a_connection_that_measured_a_slow_link_does_not_plan_its_first_chunk_high():
    """Verizon-EVDO: the warm-up measured 0.1-0.4 Mbit/s (4 rates), the next fetch planned on the 5 Mbit/s prior
    sent its first chunk high (342 KB: 29 s) and took 62.8 s for a 6-s deadline; all text takes 3.5 s."""
    session, f = _evdo_fetch(ServerTuning(forecaster="ewma", prior_bps=5e6), [0.4e6, 0.1e6, 0.3e6, 0.2e6])
    assert f.controller.prior_bps == 0.2e6
    [ev] = session.poll(0.0)
    assert isinstance(ev, KVChunkNeeded) and ev.level == TEXT and f.probe is None
    # without measurements the configured prior plans as before (a level, not text)
    session, f = _evdo_fetch(ServerTuning(forecaster="ewma", prior_bps=5e6), [])
    [ev] = session.poll(0.0)
    assert ev.level in LEVELS


# -- 3. the client's stall timeout ------------------------------------------------------------------------------------
class _FakeLoop:
    """A fake clock and event wait for _wait_while_progressing: progress changes at the given times, the fetch ends
    at ``end_at``; each wait advances the clock by its timeout or to the end."""

    def __init__(self, progress_at: list[float], end_at: float | None = None) -> None:
        self.now, self.progress_at, self.end_at = 0.0, progress_at, end_at

    def clock(self) -> float:
        return self.now

    def progress(self) -> int:
        return sum(t <= self.now for t in self.progress_at)

    async def wait(self, timeout_s: float) -> bool:
        assert timeout_s > 0
        if self.end_at is not None and self.end_at <= self.now + timeout_s:
            self.now = self.end_at
            return True
        self.now += timeout_s
        return False

    def run(self, deadline_s: float, quiet_s: float) -> tuple[str, float]:
        pf = SimpleNamespace(event=asyncio.Event())

        async def go() -> str:
            try:
                await _wait_while_progressing(pf, self.progress, deadline_s, quiet_s, clock=self.clock, wait=self.wait)
            except TimeoutError:
                return "timed out"
            return "done"

        return asyncio.run(go()), self.now


@pytest.mark.parametrize("deadline_s", [1.0, 5.0])
def test_a_fetch_stalled_after_its_meta_fails_one_quiet_period_after_its_deadline(deadline_s):
    """KV_META at 0.15 s, then a stalled server: the fetch fails at deadline + max(2 s, deadline) as documented
    (3 s and 10 s), not a whole quiet period later (5 s and 15 s): KV_META counted as progress at the first
    check, and the next quiet period ran from that check."""
    quiet = max(2.0, deadline_s)
    outcome, at = _FakeLoop([0.15]).run(deadline_s, quiet)
    assert outcome == "timed out" and at == pytest.approx(deadline_s + quiet)
    outcome, at = _FakeLoop([]).run(deadline_s, quiet)  # nothing at all: the same
    assert outcome == "timed out" and at == pytest.approx(deadline_s + quiet)


def test_quiet_time_runs_from_the_last_progress_after_the_deadline():
    """Progress after the deadline: the fetch fails ``quiet`` after it (to within one sample), however the
    samples fall; a fetch that keeps progressing ends normally, however late."""
    outcome, at = _FakeLoop([0.15, 2.6, 3.9]).run(1.0, 2.0)
    step = min(STALL_POLL_S, 2.0 / 4)
    assert outcome == "timed out" and 3.9 + 2.0 <= at <= 3.9 + 2.0 + step
    outcome, at = _FakeLoop([0.5 * k for k in range(1, 40)], end_at=19.7).run(1.0, 2.0)
    assert (outcome, at) == ("done", 19.7)


# -- 4. ingest messages -----------------------------------------------------------------------------------------------
def test_a_missing_prewarm_list_and_an_unknown_level_are_told_apart(tmp_path):
    svc = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=CHUNK)
    ids = list(range(CHUNK))
    try:
        with pytest.raises(KVIngestError, match=r"prewarm must be a list of levels \(low, medium, high\), got None"):
            svc.ingest_sync(MODEL, ids, make_kv(len(ids)), prewarm=None)  # type: ignore[arg-type]
        with pytest.raises(KVIngestError, match=r"prewarm: unknown level 'ultra'; levels are low, medium, high"):
            svc.ingest_sync(MODEL, ids, make_kv(len(ids)), prewarm=["ultra"])
    finally:
        svc.close()


def _socket_put(svc: KVService, header: dict[str, Any], body: bytes) -> dict[str, Any]:
    async def go() -> bytes:
        reader, writer = asyncio.StreamReader(), _Writer()
        reader.feed_data(json.dumps(header).encode() + b"\n" + body)
        reader.feed_eof()
        await asyncio.wait_for(kv_ingest._handle_ingest(svc, reader, writer), 30)  # type: ignore[arg-type]
        return writer.data

    return json.loads(asyncio.run(go()).splitlines()[0])


def test_the_ingest_socket_names_the_allowed_dtypes_and_the_prewarm_list(tmp_path):
    """``"dtype": "int8"`` got the generic "put needs model (str), token_ids (ints), shape (5 ints), dtype";
    ``"prewarm": null`` read as a wrong level name."""
    svc = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=CHUNK)
    layers, heads, tokens, dim = 2, 3, 8, 4
    base = {"op": "put", "model": MODEL, "token_ids": list(range(tokens)), "shape": [layers, 2, heads, tokens, dim],
            "dtype": "float16"}
    good = b"\0" * (layers * 2 * heads * tokens * dim * 2)
    try:
        r = _socket_put(svc, {**base, "dtype": "int8"}, good[: len(good) // 2])
        assert r == {"ok": False, "error": "bad header: dtype must be one of float16, bfloat16, float32, got 'int8'"}
        r = _socket_put(svc, {**base, "prewarm": None}, good)
        assert not r["ok"] and r["error"].startswith("prewarm must be a list of levels (low, medium, high)"), r
        r = _socket_put(svc, {k: v for k, v in base.items() if k != "dtype"}, good)  # missing: the generic line
        assert not r["ok"] and "put needs model (str)" in r["error"], r
        assert _socket_put(svc, base, good)["ok"]
    finally:
        svc.close()
