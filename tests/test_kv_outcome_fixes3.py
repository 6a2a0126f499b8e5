"""A KV fetch the client failed or gave up on is abandoned on the server, never completed.

The SDK FIN'd the fetch stream on every exit, and the server reads a FIN after KV_DONE as "the client decoded every
chunk": a fetch that timed out with its chunks received but none decoded was counted
``tokenwire_kv_fetches_total{outcome="completed"}`` and observed in ``tokenwire_kv_fetch_deadline_ratio`` as done in
time. Now only a fully decoded fetch ends with the FIN; any other exit resets the stream (RESET_STREAM CANCELLED),
and the server also wants a KV_ACK for every chunk before it counts a FIN as completed (older clients).
"""

from __future__ import annotations

import asyncio
import threading
import zlib
from collections.abc import Awaitable, Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.test_kv_channel import CHUNK, MODEL, kv_client, make_kv, run
from tests.test_kv_channel_refusals import KVPair
from tokenwire.daemon.kv_metrics import KVMetrics
from tokenwire.daemon.kv_service import KVService
from tokenwire.daemon.kv_store_local import LocalChunkStore
from tokenwire.transport import kv_server_session
from tokenwire.transport.errors import ErrorCode
from tokenwire.transport.kv_channel import KVCorruptChunk, KVError, KVFetchClosed, KVServerSession
from tokenwire.transport.kv_client import KVConnection

RESET = f"reset {int(ErrorCode.CANCELLED):#x}"


@pytest.fixture
def service(tmp_path: Any) -> Iterator[KVService]:
    svc = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=CHUNK)
    yield svc
    svc.close()


@pytest.fixture
def client_ends(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """How the client ended each fetch stream, as the server read it: ``(stream, "fin")`` or ``(stream, "reset
    0x...")``."""
    seen: list[tuple[int, str]] = []
    real_data, real_reset = KVServerSession._on_stream_data, KVServerSession._on_stream_reset

    def data(self: KVServerSession, stream_id: int, chunk: bytes, end: bool, now: float) -> list[Any]:
        if end and stream_id % 4 == 0:
            seen.append((stream_id, "fin"))
        return real_data(self, stream_id, chunk, end, now)

    def reset(self: KVServerSession, stream_id: int, code: int) -> list[Any]:
        seen.append((stream_id, f"reset {code:#x}"))
        return real_reset(self, stream_id, code)

    monkeypatch.setattr(KVServerSession, "_on_stream_data", data)
    monkeypatch.setattr(KVServerSession, "_on_stream_reset", reset)
    return seen


def _watch(server: Any) -> tuple[Callable[[], Awaitable[KVFetchClosed]], KVMetrics]:
    """The server's next KVFetchClosed (awaitable), and the daemon's KV metrics fed by the same events."""
    closed: list[KVFetchClosed] = []
    got = asyncio.Event()

    def on_closed(ev: KVFetchClosed) -> None:
        closed.append(ev)
        got.set()

    server.fetch_closed_listeners.append(on_closed)
    metrics = KVMetrics(CollectorRegistry(), SimpleNamespace(server=server))

    async def next_closed() -> KVFetchClosed:
        await asyncio.wait_for(got.wait(), 10)
        assert len(closed) == 1, closed
        return closed[0]

    return next_closed, metrics


def _ratio_count(metrics: KVMetrics) -> float:
    """Observations in tokenwire_kv_fetch_deadline_ratio."""
    (family,) = metrics.deadline_ratio.collect()
    return next(s.value for s in family.samples if s.name.endswith("_count"))


def _stuck_decodes(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Chunk decodes that block (the decode thread) until the returned event is set."""
    release = threading.Event()

    def stuck(self: KVConnection, pf: Any, hdr: Any, payload: bytes) -> Any:
        release.wait(30)
        raise KVCorruptChunk("released by the test")

    monkeypatch.setattr(KVConnection, "_decode", stuck)
    return release


def _abandoned(stats: dict[str, int], ev: KVFetchClosed, metrics: KVMetrics) -> None:
    assert stats["completed"] == 0 and stats["abandoned"] == 1, stats
    assert not ev.complete and ev.elapsed_s is None and ev.deadline_ms is None
    assert _ratio_count(metrics) == 0


def test_a_fetch_that_times_out_before_its_chunks_decode_is_abandoned(service, client_ends, monkeypatch):
    """The probe's repro: every chunk and KV_DONE received, none decoded, the timeout spent: it was counted
    completed and a ratio of 0.006 observed (done in time)."""
    ids = list(range(3 * CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(len(ids), 30), prewarm=["low"])
    release = _stuck_decodes(monkeypatch)

    async def go():
        async with kv_client(service) as (conn, server):
            next_closed, metrics = _watch(server)
            try:
                with pytest.raises(KVError) as info:
                    await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L1",
                                        timeout_s=2)
            finally:
                release.set()
            return info.value, await next_closed(), dict(server.stats), metrics

    err, ev, stats, metrics = run(go())
    # the case itself: the server had sent KV_DONE and the client had it (a FIN before KV_DONE was abandoned anyway)
    assert err.code == ErrorCode.UPSTREAM_TIMEOUT and "3 chunks received of 3 (0 decoded)" in str(err), err
    _abandoned(stats, ev, metrics)
    assert client_ends == [(0, RESET)]


def test_a_fetch_cancelled_while_its_chunks_decode_is_abandoned(service, client_ends, monkeypatch):
    """A task cancelled mid-decode (asyncio.run's answer to Ctrl-C too) left through the same ``finally``: FIN."""
    ids = list(range(2 * CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(len(ids), 31), prewarm=["low"])
    release = _stuck_decodes(monkeypatch)

    async def go():
        async with kv_client(service) as (conn, server):
            next_closed, metrics = _watch(server)
            task = asyncio.ensure_future(conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000,
                                                       controller="fixed-L1"))
            try:
                await asyncio.sleep(0)  # the fetch is sent and registered before its first await
                (pf,) = conn._fetches.values()
                await asyncio.wait_for(pf.event.wait(), 10)  # every chunk and KV_DONE in, decodes stuck
                assert pf.error is None and pf.done is not None
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            finally:
                release.set()
            return await next_closed(), dict(server.stats), metrics

    ev, stats, metrics = run(go())
    _abandoned(stats, ev, metrics)
    assert client_ends == [(0, RESET)]


@pytest.mark.parametrize("failure", ["corrupt bitstream", "decoder bug"])
def test_a_fetch_whose_chunk_fails_to_decode_is_abandoned(service, client_ends, monkeypatch, failure):
    """Decodes are awaited once every chunk and KV_DONE are in: a chunk that does not decode, or a decoder that
    raises anything at all, failed the fetch after KV_DONE, and its FIN counted it completed."""
    ids = list(range(2 * CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(len(ids), 32), prewarm=["medium"])
    if failure == "corrupt bitstream":
        real = service.chunk

        async def corrupting(plan, index, level):
            data = bytearray(await real(plan, index, level))
            if index == 1:
                data[len(data) // 2] ^= 0x40  # the frame's CRC is the sender's: only the bitstream is broken
            return bytes(data)

        monkeypatch.setattr(service, "chunk", corrupting)
        expect: type[BaseException] = KVCorruptChunk
    else:
        def broken(self, pf, hdr, payload):
            raise RuntimeError("decoder bug")

        monkeypatch.setattr(KVConnection, "_decode", broken)
        expect = RuntimeError

    async def go():
        async with kv_client(service) as (conn, server):
            next_closed, metrics = _watch(server)
            with pytest.raises(expect):
                await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L2")
            return await next_closed(), dict(server.stats), metrics

    ev, stats, metrics = run(go())
    _abandoned(stats, ev, metrics)
    assert client_ends == [(0, RESET)]


def test_a_fetch_the_client_session_fails_is_reset_not_fined(service, client_ends, monkeypatch):
    """The client session fails a fetch itself (a chunk whose checksum does not match, the server's ERROR) and
    queues the FIN; the server writes KV_DONE as soon as the last chunk is on the wire, so that FIN could come
    after it and count as completed. It is replaced by a reset before it is sent: the server never reads it."""
    ids = list(range(CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(len(ids), 33), prewarm=["low"])
    monkeypatch.setattr(kv_server_session, "zlib", SimpleNamespace(crc32=lambda data: zlib.crc32(data) ^ 1))

    async def go():
        async with kv_client(service) as (conn, server):
            next_closed, metrics = _watch(server)
            with pytest.raises(KVCorruptChunk, match="checksum"):
                await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L1")
            return await next_closed(), dict(server.stats), metrics

    ev, stats, metrics = run(go())
    assert client_ends == [(0, RESET)]
    _abandoned(stats, ev, metrics)


def test_a_decoded_fetch_still_ends_with_its_fin_and_counts_completed(service, client_ends):
    ids = list(range(2 * CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(len(ids), 34), prewarm=["low"])

    async def go():
        async with kv_client(service) as (conn, server):
            next_closed, metrics = _watch(server)
            res = await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L1")
            return res, await next_closed(), dict(server.stats), metrics

    res, ev, stats, metrics = run(go())
    assert len(res.chunks) == 2
    assert client_ends == [(0, "fin")]
    assert stats["completed"] == 1 and stats["abandoned"] == 0, stats
    assert ev.complete and ev.elapsed_s is not None and ev.deadline_ms == 5000
    assert _ratio_count(metrics) == 1


# -- the server, sans-I/O (tests/test_kv_channel_refusals.KVPair: real aioquic and sessions, an in-memory wire) --
def _fetch_to_done(acks: bool) -> tuple[KVPair, int]:
    """A pair whose one fetch of 2 chunks has every chunk and KV_DONE at the client, KV_ACKed or not."""
    pair = KVPair(chunks=2)
    if not acks:
        pair._on_client = pair.client_events.extend  # type: ignore[method-assign]
    sid = pair.fetch()
    pair.exchange()
    assert pair.outcome(sid) is not None and not any(isinstance(e, KVFetchClosed) for e in pair.server_events)
    return pair, sid


def _server_closed(pair: KVPair) -> KVFetchClosed:
    (ev,) = [e for e in pair.server_events if isinstance(e, KVFetchClosed)]
    return ev


def test_an_old_clients_fin_without_a_kv_ack_for_every_chunk_is_not_completed():
    """Earlier clients FIN'd a fetch they gave up on too: one that did so after KV_DONE with chunks still on
    their way (no KV_ACK for them) was counted completed, its time in the deadline histogram."""
    pair, sid = _fetch_to_done(acks=False)
    pair.client.finish(sid)  # the FIN alone, as those clients sent it
    pair.exchange()
    ev = _server_closed(pair)
    assert not ev.complete and ev.elapsed_s is None and ev.deadline_ms is None

    pair, sid = _fetch_to_done(acks=True)  # every chunk acknowledged: the FIN completes it, as before
    pair.client.finish(sid)
    pair.exchange()
    ev = _server_closed(pair)
    assert ev.complete and ev.elapsed_s is not None and ev.deadline_ms == 5000


def test_a_reset_after_kv_done_is_abandoned_with_the_controllers_decisions():
    """The SDK now resets every fetch it fails, timeouts included: the evaluation records a timed-out fetch's
    decisions from the server's KVFetchClosed, which carried them after a FIN and none after a reset."""
    pair, sid = _fetch_to_done(acks=True)
    pair.client.quic.reset_stream(sid, ErrorCode.CANCELLED)
    pair.client.finish(sid)
    pair.exchange()
    ev = _server_closed(pair)
    assert not ev.complete and ev.elapsed_s is None
    assert [d["index"] for d in ev.decisions] == [0, 1]
    assert pair.server is not None and not pair.server.fetches
