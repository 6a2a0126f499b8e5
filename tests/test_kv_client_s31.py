"""The client's stall timer under a busy server (s31): a fetch still being served, with long gaps because one
server worker does every fetch's lookup and encodes in arrival order, is waited for; one whose server went silent
for good still fails within a stated bound."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from tests.test_kv_channel import CHUNK, MODEL, kv_client, make_kv, run
from tests.test_kv_controller_fixes2 import _FakeLoop as _FakeClock
from tokenwire.daemon.kv_service import RESOLVE_FLOOR_S, KVService
from tokenwire.daemon.kv_store_local import LocalChunkStore
from tokenwire.transport import kv_client as kvc
from tokenwire.transport.errors import ErrorCode
from tokenwire.transport.kv_channel import KVError


@pytest.fixture
def service(tmp_path):
    svc = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=CHUNK)
    yield svc
    svc.close()


def _busy_server(service, *, lookup_s: float, chunk_s: float | None):
    """Slow ``service``'s lookup by ``lookup_s`` and each chunk by ``chunk_s`` (None: the chunk never comes), one
    at a time as on the server's single worker."""
    real_resolve, real_chunk = service.resolve, service.chunk
    lock: list[asyncio.Lock] = []

    async def resolve(fetch):
        await asyncio.sleep(lookup_s)
        return await real_resolve(fetch)

    async def chunk(plan, index, level):
        if not lock:
            lock.append(asyncio.Lock())
        async with lock[0]:
            if chunk_s is None:
                await asyncio.Event().wait()
            await asyncio.sleep(chunk_s)
            return await real_chunk(plan, index, level)

    service.resolve, service.chunk = resolve, chunk


def _fetch_one_chunk(service, **busy) -> tuple[object, float]:
    ids = list(range(CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(CHUNK, 31), prewarm=["low"])

    async def go():
        async with kv_client(service) as (conn, _):
            _busy_server(service, **busy)
            t0 = time.monotonic()
            try:
                res: object = await asyncio.wait_for(
                    conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=100, controller="fixed-L1"),
                    45)  # (MAX_GAP_QUIET_S, 30 s, and more: only a hang)
            except KVError as exc:
                res = exc
            return res, time.monotonic() - t0

    return run(go())


@pytest.fixture
def short_quiet(monkeypatch):
    """The quiet floor (2 s: the old fixed quiet time) scaled down to 0.5 s, and the waits below with it; the
    defaults' bounds are test_the_quiet_allowed_scales_with_the_waits_seen's, on a fake clock."""
    monkeypatch.setattr(kvc, "QUIET_FLOOR_S", 0.5)


def test_a_fetch_whose_lookup_waits_past_the_old_quiet_time_completes(service, short_quiet):
    """KV_META 3 s after a 100-ms fetch (its lookup queued on the server): it failed at 2.1 s with "no KV_META".
    Scaled: KV_META 1.2 s after the fetch, past the 0.5-s quiet floor."""
    res, _took = _fetch_one_chunk(service, lookup_s=1.2, chunk_s=0.0)
    assert not isinstance(res, KVError), res
    assert res.report.levels == ["low"]


def test_a_fetch_with_a_long_gap_after_a_slow_start_completes(service, short_quiet):
    """KV_META at 1.5 s, its chunk 3 s later: the client had seen a 1.5-s wait, so a 3-s one is no sign of a dead
    server (allowed 4 x 1.5 s); with the fixed 2 s it failed at 3.5 s with the chunk still coming. Scaled to the
    0.5-s floor: KV_META at 0.6 s, its chunk 1.2 s later (allowed 4 x 0.6 s; the floor alone fails it at 1.1 s)."""
    res, _took = _fetch_one_chunk(service, lookup_s=0.6, chunk_s=1.2)
    assert not isinstance(res, KVError), res
    assert res.report.levels == ["low"]


def test_a_server_silent_for_good_after_its_meta_still_fails(service, short_quiet):
    """KV_META at once, then nothing: the fetch fails with UPSTREAM_TIMEOUT, well within the stated bound (the
    deadline, then max(quiet floor, 4 x the longest wait) at most 30 s); the generous bound only catches a hang."""
    res, took = _fetch_one_chunk(service, lookup_s=0.0, chunk_s=None)
    assert isinstance(res, KVError) and res.code == ErrorCode.UPSTREAM_TIMEOUT, res
    assert "0 chunks received of 1" in str(res)
    assert took < 40  # 30 s past the last progress at most, plus slack


def test_the_pre_meta_bound_outlasts_the_servers_lookup_bound():
    """The server fails a lookup the store does not answer after max(deadline, RESOLVE_FLOOR_S) of the store's time;
    the client waits well past that before KV_META so that the typed "KV store unavailable" comes first."""
    assert kvc.SERVER_RESOLVE_FLOOR_S == RESOLVE_FLOOR_S
    for deadline_s in (0.001, 0.1, 1.0, 2.0, 5.0, 30.0, 300.0):
        quiet, first = kvc._stall_bounds(deadline_s)
        server = max(deadline_s, RESOLVE_FLOOR_S)
        assert first >= server + 5 and first >= 2 * server, deadline_s
        assert quiet == max(2.0, deadline_s)


class _FakeLoop(_FakeClock):
    """test_kv_controller_fixes2's fake clock, run with the bounds fetch_kv now uses (_stall_bounds, the gaps
    seen)."""

    def run_bounds(self, deadline_s: float) -> tuple[str, float]:
        quiet, first = kvc._stall_bounds(deadline_s)

        async def go() -> str:
            try:
                await kvc._wait_while_progressing(
                    SimpleNamespace(event=asyncio.Event()), self.progress, deadline_s, quiet, first_quiet_s=first,
                    gap_factor=kvc.GAP_FACTOR, max_gap_quiet_s=kvc.MAX_GAP_QUIET_S, clock=self.clock, wait=self.wait)
            except TimeoutError:
                return "timed out"
            return "done"

        return asyncio.run(go()), self.now


STEP = kvc.STALL_POLL_S


@pytest.mark.parametrize(("progress_at", "expect_at"), [
    ([], 0.1 + 10.0),  # nothing at all: the deadline, then the pre-META 10 s
    ([0.05], 0.1 + 2.0),  # KV_META at once, then a stall: 2 s after the deadline, as before
    ([3.0], 3.0 + 4 * 3.0),  # KV_META after a 3-s wait: 4 x that
    ([3.0, 4.0, 10.0], 10.0 + 4 * 6.0),  # the longest wait so far (6 s) counts, not the last one
    ([9.0], 9.0 + 30.0),  # the scaled part (36 s) stops at MAX_GAP_QUIET_S
])
def test_the_quiet_allowed_scales_with_the_waits_seen(progress_at, expect_at):
    outcome, at = _FakeLoop(progress_at).run_bounds(0.1)
    assert outcome == "timed out"
    assert expect_at <= at <= expect_at + 2 * STEP


def test_a_fetch_served_with_growing_gaps_is_waited_for():
    """Gaps of 1, 2, 3.5, 6 s after a 0.5-s KV_META (each within 4 x the longest before it): done."""
    assert _FakeLoop([0.5, 1.5, 3.5, 7.0, 13.0], end_at=13.0).run_bounds(0.1) == ("done", 13.0)
