"""A fetch in progress pins its chunks against eviction: a put that evicted them failed the fetch mid-way ("chunk
... is no longer stored", 8 % of fetches in a KV-under-load probe, after ~10 s of transfer). The pins end when the
fetch ends, however it ends."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
from typing import Any

import pytest

from tests.test_kv_channel import CHUNK, MODEL, kv_client, make_kv, run
from tests.test_kv_store import make_store, redis_url  # noqa: F401  (the fixtures)
from tests.test_kv_store_fixes4 import CAPACITY
from tokenwire.daemon.kv_service import KVService
from tokenwire.daemon.kv_store import object_key
from tokenwire.daemon.kv_store_local import LocalChunkStore
from tokenwire.transport.frames import KvFetch
from tokenwire.transport.kv_channel import KVNotFound


def _whole(svc: KVService, hashes: list[str]) -> list[bool]:
    return [all(svc.store.contains_many([object_key(h, "src"), object_key(h, "meta")])) for h in hashes]


def test_a_fetch_in_progress_completes_through_a_put_that_would_evict_its_chunks(make_store):  # noqa: F811
    """The probe's failure, through the KV channel: context B is put while A's fetch is between chunks, into a
    store with room for about six chunks; A's tail was evicted for B and the fetch failed at chunk 2."""
    svc = KVService(make_store(capacity=CAPACITY), chunk_tokens=CHUNK)
    a, b = list(range(4 * CHUNK)), list(range(5000, 5000 + 4 * CHUNK))
    ha = svc.ingest_sync(MODEL, a, make_kv(len(a), 1))
    real_chunk = svc.chunk
    during: list[int] = []

    async def put_b_during_the_fetch(plan: Any, index: int, level: str) -> bytes:
        if index == 1:
            during.append(len(svc.store.pins))
            await asyncio.get_running_loop().run_in_executor(
                svc.ingest_pool, lambda: svc.ingest_sync(MODEL, b, make_kv(len(b), 2)))
        return await real_chunk(plan, index, level)

    svc.chunk = put_b_during_the_fetch  # type: ignore[method-assign]

    async def go() -> Any:
        async with kv_client(svc) as (conn, server):
            res = await conn.fetch_kv(model=MODEL, token_ids=a, deadline_ms=20_000, controller="fixed-L1")
        return res, server

    try:
        res, server = run(go())
        assert res.prefix_kv()[1] == len(a) and server.stats["failed"] == 0
        assert during == [4]  # A's chunks were pinned while it was sent
        assert _whole(svc, ha) == [True] * 4
        assert svc.store.used_bytes <= svc.store.capacity_bytes  # B's put was trimmed, not the capacity
        assert len(svc.store.pins) == 0  # released when the fetch ended
        svc.ingest_sync(MODEL, b, make_kv(len(b), 2))  # unpinned, A is evicted from its tail as before
        assert _whole(svc, ha)[-1] is False
    finally:
        svc.close()


def test_a_put_into_a_store_full_of_pinned_chunks_trims_itself(make_store, caplog):  # noqa: F811
    """Every chunk that could make room is pinned: the chunk being written goes itself (its put keeps the prefix
    it stored), never a pinned one, and the store stays within its capacity. The put says how much is stored
    (``stored``) and a warning says it was trimmed: it answered every hash with nothing said, and fetches missed."""
    caplog.set_level(logging.WARNING, "tokenwire")
    svc = KVService(make_store(capacity=CAPACITY), chunk_tokens=CHUNK)
    a, b = list(range(4 * CHUNK)), list(range(5000, 5000 + 3 * CHUNK))
    ha = svc.ingest_sync(MODEL, a, make_kv(len(a), 1))
    plan = svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=a), pin=True)
    try:
        hb = svc.ingest_sync(MODEL, b, make_kv(len(b), 2))
        assert _whole(svc, ha) == [True] * 4
        kept = _whole(svc, hb)
        assert kept[0] and not kept[-1] and kept == sorted(kept, reverse=True), kept  # a prefix of B
        assert hb.stored == sum(kept) < len(hb) == 3
        assert any(f"first {hb.stored} of 3 chunks only" in r.getMessage() for r in caplog.records)
        assert svc.store.used_bytes <= svc.store.capacity_bytes
        for i in range(4):
            svc.chunk_sync(plan, i, "low")
    finally:
        plan.end()
        svc.close()
    assert len(svc.store.pins) == 0


def test_a_lookup_that_fails_or_stops_short_keeps_no_pins(tmp_path):
    store = LocalChunkStore(tmp_path / "kv", 64 << 20)
    svc = KVService(store, chunk_tokens=CHUNK)
    ids = list(range(3 * CHUNK))
    svc.ingest_sync(MODEL, ids[: 2 * CHUNK], make_kv(2 * CHUNK, 1))
    try:
        with pytest.raises(KVNotFound, match="2 of 3 chunks"):
            svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids), pin=True)
        assert len(store.pins) == 0
        plan = svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids, prefix=True), pin=True)
        assert store.pins.snapshot() == frozenset(plan.handle) and len(plan.handle) == 2  # what it got, only
        plan.end()
        plan.end()  # (idempotent: a second end must not unpin another fetch's hold)
        assert len(store.pins) == 0
        first = svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids, prefix=True), pin=True)
        second = svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids, prefix=True), pin=True)
        first.end()
        first.end()
        assert store.pins.snapshot() == frozenset(second.handle)  # still held by the other fetch
        del second
        gc.collect()
        assert len(store.pins) == 0  # a plan dropped without its end unpins when collected
    finally:
        svc.close()


class _Gated(LocalChunkStore):
    """Holds the fetch worker in its first look for a source once ``armed``, until ``gate`` is set."""

    armed = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entered, self.gate = threading.Event(), threading.Event()

    def contains(self, key: str) -> bool:
        if self.armed and key.endswith(".src") and not self.gate.is_set():
            self.entered.set()
            self.gate.wait(20)
        return super().contains(key)


def test_a_fetch_cancelled_during_its_lookup_releases_the_pins_the_lookup_took(tmp_path):
    """The lookup runs on to its end on the worker after its fetch is cancelled (a connection that closed): the plan
    it makes then has no fetch to end it."""
    store = _Gated(tmp_path / "kv", 64 << 20)
    svc = KVService(store, chunk_tokens=CHUNK)
    ids = list(range(2 * CHUNK))
    svc.ingest_sync(MODEL, ids, make_kv(len(ids), 1))
    store.armed = True

    async def go() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(svc.resolve(KvFetch(model=MODEL, deadline_ms=20_000, token_ids=ids)))
        assert await loop.run_in_executor(None, store.entered.wait, 20)
        while_looking = len(store.pins)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        store.gate.set()
        await loop.run_in_executor(None, lambda: svc.pool.submit(lambda: None).result(20))  # the lookup ended
        for _ in range(500):  # (its outcome reaches the loop a step or two later; bounded, not timed)
            if not len(store.pins):
                break
            await asyncio.sleep(0.01)
        return while_looking, len(store.pins)

    try:
        assert run(go()) == (2, 0)
    finally:
        store.gate.set()
        svc.close()


def test_a_fetch_that_fails_or_is_refused_through_the_channel_keeps_no_pins(tmp_path):
    store = LocalChunkStore(tmp_path / "kv", 64 << 20)
    svc = KVService(store, chunk_tokens=CHUNK)
    ids = list(range(3 * CHUNK))
    svc.ingest_sync(MODEL, ids, make_kv(len(ids), 1))
    real_chunk = svc.chunk
    held: list[int] = []

    async def failing(plan: Any, index: int, level: str) -> bytes:
        held.append(len(store.pins))
        if index == 1:
            raise KVNotFound("chunk gone (a test)")
        return await real_chunk(plan, index, level)

    svc.chunk = failing  # type: ignore[method-assign]

    async def go() -> Any:
        async with kv_client(svc) as (conn, server):
            with pytest.raises(KVNotFound, match="a test"):
                await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=20_000, controller="fixed-L1")
            with pytest.raises(KVNotFound, match="context not stored"):
                await conn.fetch_kv(model=MODEL, token_ids=list(range(9000, 9000 + CHUNK)), deadline_ms=20_000)
        return server

    try:
        server = run(go())
        assert held and held[0] == 3 and server.stats["failed"] == 1
        assert len(store.pins) == 0
    finally:
        svc.close()


# -- the session's side: every way a fetch ends, ends its plan ----------------------------------------------------
def _session_with_a_plan() -> tuple[Any, list[int], Any]:
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    from tokenwire.transport.frames import StreamDecoder
    from tokenwire.transport.kv_channel import ContextPlan, KVServerSession, ServerFetch

    session = KVServerSession(QuicConnection(configuration=QuicConfiguration(is_client=True)))
    ended: list[int] = []
    plan = ContextPlan(32, [16, 16], [1000, 1000], [{"low": 100}, {"low": 100}], (1, 1, 1), 0, "float16",
                       on_end=lambda: ended.append(1))
    session.fetches[0] = ServerFetch(0, KvFetch(model=MODEL, deadline_ms=1000, token_ids=[1] * 32),
                                     StreamDecoder(), 0.0)
    return session, ended, plan


@pytest.mark.parametrize("how", ["rejected", "reset", "stop_sending", "connection ended", "given up",
                                 "gone before start", "start failed"])
def test_every_way_a_fetch_ends_ends_its_plan(how: str):
    from aioquic.quic import events as qe

    session, ended, plan = _session_with_a_plan()
    if how == "gone before start":
        session.fetches.clear()
    if how == "start failed":
        session._connection_forecaster = lambda *a: (_ for _ in ()).throw(RuntimeError("broken"))
        with pytest.raises(RuntimeError):
            session.start(0, plan, 0.0)
    else:
        session.start(0, plan, 0.0)
    assert ended == ([1] if how in ("gone before start", "start failed") else [])
    if how == "rejected":
        session.reject(0, 0x103, "a test")
    elif how == "reset":
        session._on_stream_reset(0, 0)
    elif how == "stop_sending":
        session._on_stop_sending(0)
    elif how == "connection ended":
        session._on_terminated(qe.ConnectionTerminated(error_code=0, frame_type=None, reason_phrase=""))
    elif how == "given up":
        session._on_stream_data(0, b"", True, 0.0)
    elif how == "start failed":
        session.reject(0, 0x1, "server error")  # (what the driver does then)
    assert ended and 0 not in session.fetches


def test_a_fetch_whose_kv_done_is_sent_ends_its_plan_before_the_clients_fin():
    """Once KV_DONE is sent every chunk is with QUIC and the store is not read for the fetch again: its pins go
    then. They waited for the client's FIN, which the SDK sends after decoding everything (and a client keeping its
    streams open never sends), while every put meeting them was trimmed."""
    session, ended, plan = _session_with_a_plan()
    session.start(0, plan, 0.0)
    f = session.fetches[0]
    f.next_index = len(plan.token_counts)  # (every chunk handed to QUIC)
    f.pending = False
    session.poll(1.0)
    assert f.done_sent and ended == [1]
    assert 0 in session.fetches  # (the fetch itself lives on until the client's FIN)
