"""The KV channel's concurrent-fetch limit: fetches past it wait their turn on the client (QUIC's stream limit, as
chat requests do) instead of being refused with LIMIT_EXCEEDED; the server's check stays as a backstop."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch
from aioquic.quic.connection import QuicConnection

from tokenwire.daemon.kv_service import KVService
from tokenwire.daemon.kv_store_local import LocalChunkStore
from tokenwire.transport.errors import ErrorCode, RemoteError
from tokenwire.transport.kv_channel import KVError, ServerTuning, connect_kv, serve_kv
from tokenwire.transport.kv_protocol import kv_quic_config
from tokenwire.transport.kv_server_session import MAX_FETCHES, KVServerSession
from tokenwire.transport.tls import server_configuration

from .test_kv_channel import kv_client

MODEL = "tiny-test"
CHUNK = 32
IDS = list(range(100, 100 + 2 * CHUNK))


def make_kv(n_tokens: int, layers: int = 2, heads: int = 2, dim: int = 16):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(1, heads, n_tokens, dim, generator=g).to(torch.float16),
             torch.randn(1, heads, n_tokens, dim, generator=g).to(torch.float16)) for _ in range(layers)]


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture
def service(tmp_path):
    svc = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=CHUNK)
    svc.ingest_sync(MODEL, IDS, make_kv(len(IDS)), prewarm=["low"])
    yield svc
    svc.close()


class HeldResolve:
    """Wraps ``service.resolve``: holds every fetch until ``hold`` of them are being resolved at once (so the
    fetches really overlap on the server, however fast loopback is), and records the most at once."""

    def __init__(self, service: KVService, hold: int) -> None:
        self.real, self.hold = service.resolve, hold
        self.active = self.peak = self.arrived = 0
        self.full = asyncio.Event()
        self._came = asyncio.Event()  # set as each fetch comes in
        service.resolve = self  # type: ignore[method-assign]

    async def reached(self, n: int) -> None:
        """Wait until ``n`` fetches have come to the resolve (bounded by run()'s timeout)."""
        while self.arrived < n:
            self._came.clear()
            await self._came.wait()

    async def __call__(self, fetch):
        self.active += 1
        self.arrived += 1
        self.peak = max(self.peak, self.active)
        self._came.set()
        try:
            if self.active >= self.hold:
                self.full.set()
            await self.full.wait()
        finally:
            self.active -= 1
        return await self.real(fetch)


def test_thirty_concurrent_fetches_on_one_connection_all_succeed(service):
    """The 17th concurrent fetch_kv on a connection failed with RemoteError "too many concurrent fetches"
    (LIMIT_EXCEEDED); now it waits for one of the 16 to end, as a chat request past its limit does."""
    held = HeldResolve(service, MAX_FETCHES)

    async def go():
        async with kv_client(service) as (conn, server):
            results = await asyncio.gather(
                *(conn.fetch_kv(model=MODEL, token_ids=IDS, deadline_ms=10_000, controller="fixed-L1")
                  for _ in range(30)), return_exceptions=True)
            return results, dict(server.stats)

    results, stats = run(go())
    errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    assert errors == []
    assert all(r.report.levels == ["low", "low"] and r.prefix_kv()[1] == len(IDS) for r in results)
    assert stats["refused"] == 0 and stats["fetches"] == 30
    assert held.peak == MAX_FETCHES  # as many as the limit at once, never more


def test_the_server_advertises_its_fetch_limit_as_the_stream_limit():
    quic = QuicConnection(configuration=kv_quic_config(server_configuration()),
                          original_destination_connection_id=os.urandom(8))
    KVServerSession(quic, max_fetches=5)
    assert quic._local_max_streams_bidi.value == 5  # what the transport parameter tells the client
    assert MAX_FETCHES == 16


def test_a_fetch_waiting_for_a_slot_counts_against_its_timeout(service):
    """``timeout_s`` bounds the whole call: a fetch that never got a slot fails with UPSTREAM_TIMEOUT, having
    sent nothing, and the fetches ahead of it are untouched."""
    held = HeldResolve(service, MAX_FETCHES + 1)  # the limit's fetches stay held: no slot frees

    async def go():
        async with kv_client(service) as (conn, server):
            ahead = [asyncio.ensure_future(conn.fetch_kv(model=MODEL, token_ids=IDS, deadline_ms=10_000))
                     for _ in range(MAX_FETCHES)]
            await held.reached(MAX_FETCHES)
            with pytest.raises(KVError) as ei:
                await conn.fetch_kv(model=MODEL, token_ids=IDS, deadline_ms=10_000, timeout_s=0.3)
            held.full.set()
            done = await asyncio.gather(*ahead)
            return ei.value, done, dict(server.stats)

    err, done, stats = run(go())
    assert err.code == ErrorCode.UPSTREAM_TIMEOUT and "waiting for a free fetch slot" in str(err)
    assert len(done) == MAX_FETCHES and stats["fetches"] == MAX_FETCHES and stats["refused"] == 0


def test_the_backstop_refusal_names_the_limit(service):
    """A fetch past a limit lowered after the connection opened (the client was told more) is still refused
    alone, and the refusal now says what the limit is."""
    held = HeldResolve(service, 2)  # the first fetch is held until the refused one has been answered

    async def go():
        async with kv_client(service) as (conn, server):
            next(iter(server.protocols)).kv.max_fetches = 1
            first = asyncio.ensure_future(conn.fetch_kv(model=MODEL, token_ids=IDS, deadline_ms=10_000))
            await held.reached(1)
            with pytest.raises(RemoteError) as ei:
                await conn.fetch_kv(model=MODEL, token_ids=IDS, deadline_ms=10_000)
            held.full.set()
            return ei.value, await first

    err, first = run(go())
    assert err.code == ErrorCode.LIMIT_EXCEEDED
    assert "too many concurrent fetches (at most 1 on a connection)" in str(err)
    assert first.prefix_kv()[1] == len(IDS)


def test_fetches_waiting_for_a_slot_fail_when_the_connection_is_closed(service):
    """A fetch waiting its turn must not outlive its connection: leaving ``async with connect_kv`` fails it with
    the local-close error, as the fetches already on the wire."""
    held = HeldResolve(service, MAX_FETCHES + 1)

    async def go():
        server = await serve_kv(service, "127.0.0.1", 0, tuning=ServerTuning(forecaster="ewma"))
        try:
            async with connect_kv("127.0.0.1", server.port, verify=False) as conn:
                fetches = [asyncio.ensure_future(conn.fetch_kv(model=MODEL, token_ids=IDS, deadline_ms=10_000))
                           for _ in range(MAX_FETCHES + 2)]
                await held.reached(MAX_FETCHES)
                waiting = conn._slot_waiters.copy()
            results = await asyncio.wait_for(asyncio.gather(*fetches, return_exceptions=True), 10)
            return len(waiting), results
        finally:
            held.full.set()
            server.close()

    waiting, results = run(go())
    assert waiting == 2
    assert all(isinstance(r, KVError) and r.code == ErrorCode.CANCELLED for r in results), results


def test_a_cancelled_waiting_fetch_passes_its_turn_on(service):
    """The first fetch in line, cancelled while it waits, must not keep the ones behind it waiting."""
    held = HeldResolve(service, MAX_FETCHES + 1)  # every slot's fetch held until released below

    async def go():
        async with kv_client(service) as (conn, _server):
            first = [asyncio.ensure_future(conn.fetch_kv(model=MODEL, token_ids=IDS, deadline_ms=10_000))
                     for _ in range(MAX_FETCHES)]
            await held.reached(MAX_FETCHES)
            cancelled = asyncio.ensure_future(conn.fetch_kv(model=MODEL, token_ids=IDS, deadline_ms=10_000))
            behind = asyncio.ensure_future(conn.fetch_kv(model=MODEL, token_ids=IDS, deadline_ms=10_000))
            await asyncio.sleep(0)  # (one turn: both are in line now)
            in_line = len(conn._slot_waiters)
            cancelled.cancel()
            held.full.set()
            done = await asyncio.gather(*first, behind)
            return in_line, done, cancelled.cancelled()

    in_line, done, was_cancelled = run(go())
    assert in_line == 2 and was_cancelled and len(done) == MAX_FETCHES + 1
    assert all(r.prefix_kv()[1] == len(IDS) for r in done)
