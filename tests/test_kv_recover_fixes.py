"""Fixes: a chunk whose parent is gone stayed stored. After a crash the local store's start removed a chunk whose
source was truncated (its metadata and levels with it), but the chunks after it in its context stayed, unreachable
(every fetch of the context: "0 of 3 chunks found") and counted in tokenwire_kv_store_bytes until LRU took them:
their links were learned from the metadata left, where their parent's name no longer was. A fetch that found a
chunk without its source left the chunks after it the same way, on both stores."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.test_kv_channel import CHUNK, MODEL, _fetch, make_kv, run
from tests.test_kv_ingest_fixes3 import _rot
from tests.test_kv_store import make_store, redis_server, redis_url  # noqa: F401  (the fixtures)
from tests.test_kv_store_fixes2 import _collected
from tests.test_kv_store_fixes4 import _disk_bytes, _prefix, _put_chunk, _stored
from tokenwire.daemon import kv_service, kv_store, kv_store_local
from tokenwire.daemon.kv_service import KVService
from tokenwire.daemon.kv_store import ChunkStore, StoreError, chain_root, chain_step, object_key, wrap
from tokenwire.daemon.kv_store_local import LocalChunkStore
from tokenwire.daemon.kv_store_redis import RedisChunkStore
from tokenwire.transport.errors import ErrorCode, RemoteError
from tokenwire.transport.frames import KvFetch
from tokenwire.transport.kv_channel import KVNotFound

ALL = ("src", "meta", "low")


def _put_three(root: Path) -> tuple[list[int], list[str]]:
    """A context of three chunks, a level of each prewarmed, in a local store at ``root``, closed."""
    ids = list(range(3 * CHUNK))
    svc = KVService(LocalChunkStore(root, 64 << 20), chunk_tokens=CHUNK)
    hashes = svc.ingest_sync(MODEL, ids, make_kv(len(ids)), prewarm=["low"])
    svc.close()
    return ids, hashes


def _file(root: Path, h: str, kind: str) -> Path:
    return root / h[:2] / object_key(h, kind)


def _objects(root: Path) -> list[str]:
    """The names of the store's object files (its lock file aside)."""
    return sorted(f.name for f in root.rglob("*") if f.is_file() and f.name != ".lock")


# -- at the local store's start ----------------------------------------------------------------------------------
@pytest.mark.parametrize("lost", [0, 1])
def test_a_truncated_source_takes_the_chunks_after_it_at_start(tmp_path: Path, lost: int):
    """The probe: chunk 0's source truncated by a crash. The start removed chunk 0 (its metadata and level for want
    of a source) and kept chunks 1 and 2 whole (827,724 of 1,444,172 bytes), that no fetch could use."""
    root = tmp_path / "kv"
    ids, hashes = _put_three(root)
    os.truncate(_file(root, hashes[lost], "src"), 100)
    svc = KVService(LocalChunkStore(root, 64 << 20), chunk_tokens=CHUNK)
    try:
        store = svc.store
        assert [any(_stored(store, h, ALL)) for h in hashes] == [True] * lost + [False] * (3 - lost)
        assert _objects(root) == sorted(object_key(hashes[i], k) for i in range(lost) for k in ALL)  # files too
        assert store.used_bytes == _disk_bytes(root)
        assert store.stats.unsourced == 1  # the chunk without its source
        assert store.stats.evictions == 3 * (2 - lost)  # the chunks after it: unreachable, as while running
        assert _collected(svc)["tokenwire_kv_store_evictions_total"] == 3 * (2 - lost)
        assert not any(c in store._parent or c in store._kids for c in hashes[lost:])  # no link left to them
        if lost:
            assert _prefix(svc, ids) == [CHUNK]
        svc.ingest_sync(MODEL, ids, make_kv(len(ids)))  # put again: whole again
        assert _prefix(svc, ids) == [CHUNK] * 3
    finally:
        svc.close()


def test_chunks_after_a_chunk_gone_whole_go_at_start(tmp_path: Path, caplog):
    """Chunk 0's source and metadata both truncated: nothing of it is left to link its children to, and they
    stayed for good (every fetch: "0 of 3 chunks found")."""
    root = tmp_path / "kv"
    _, hashes = _put_three(root)
    for kind in ("src", "meta"):
        os.truncate(_file(root, hashes[0], kind), 10)
    store = LocalChunkStore(root, 64 << 20)
    try:
        assert store.used_bytes == 0 and _objects(root) == []
        assert store.stats.unsourced == 1  # (chunk 0's level, without its source)
        assert store.stats.evictions == 6
        assert "removed 2 chunks that follow a chunk that is gone" in caplog.text
    finally:
        store.close()


def test_a_parent_far_from_its_child_in_mtime_order_is_found_and_kept(tmp_path: Path):
    """A shared first chunk used since by many other contexts is far from an old child in mtime order (past the
    metadata the start looks at next to it): the child is linked to it, not taken for unreachable."""
    root = tmp_path / "kv"
    store = LocalChunkStore(root, 10 << 20)
    shared, own = list(range(8)), list(range(100, 108))
    p0 = chain_step(chain_root("m"), shared)
    x1 = chain_step(p0, own)
    _put_chunk(store, p0, 0, shared)
    _put_chunk(store, x1, 1, own)
    others = [chain_step(chain_root("m"), [1000 + i]) for i in range(kv_store.CHAIN_MEMORY + 6)]
    for i, h in enumerate(others):
        _put_chunk(store, h, 0, [1000 + i])
    store.close()
    t = 1_700_000_000
    for n, hs in enumerate(([x1], *([h] for h in others), [p0])):  # x1, then the others, then p0 (used last)
        for h in hs:
            for kind in ("src", "meta"):
                os.utime(_file(root, h, kind), (t + n, t + n))
    store = LocalChunkStore(root, 10 << 20)
    try:
        assert all(_stored(store, x1, ("src", "meta"))) and store._parent.get(x1) == p0
        assert store.stats.evictions == 0
    finally:
        store.close()


def test_the_search_for_parents_at_start_is_bounded(tmp_path: Path, monkeypatch):
    """Past its bound the start keeps a chunk whose parent it did not look for: it may be stored (a start with many
    unlinked chunks would hash each against every chunk before it)."""
    root = tmp_path / "kv"
    _, hashes = _put_three(root)
    for kind in ("src", "meta"):
        os.truncate(_file(root, hashes[0], kind), 10)
    monkeypatch.setattr(kv_store_local, "RECOVER_SEARCH_STEPS", 0)
    store = LocalChunkStore(root, 64 << 20)
    try:
        assert [all(_stored(store, h, ALL)) for h in hashes[1:]] == [True, True] and store.stats.evictions == 0
    finally:
        store.close()


# -- at a fetch that finds a chunk without its source --------------------------------------------------------------
def _objects_bytes(store: ChunkStore, h: str) -> int:
    return sum(len(wrap(store.get(object_key(h, kind)) or b"")) for kind in ALL)


def test_a_fetch_that_drops_an_unsourced_chunk_takes_the_chunks_after_it(make_store):  # noqa: F811
    """The fetch removed the chunk without its source (metadata and levels) and left the chunks after it in its
    context: unreachable, counted in the store's bytes, and on Redis still counted as its children."""
    store = make_store(capacity=64 << 20)
    svc = KVService(store, chunk_tokens=CHUNK)
    ids = list(range(3 * CHUNK))
    hashes = svc.ingest_sync(MODEL, ids, make_kv(len(ids)), prewarm=["low"])
    first = _objects_bytes(store, hashes[0])
    _rot(store, object_key(hashes[1], "src"))
    assert store.get(object_key(hashes[1], "src")) is None  # found corrupt: deleted
    assert _prefix(svc, ids) == [CHUNK]
    assert [any(_stored(store, h, ALL)) for h in hashes] == [True, False, False]
    assert store.used_bytes == first
    assert store.stats.unsourced == 1 and store.stats.evictions == 3
    if isinstance(store, RedisChunkStore):  # no bookkeeping left of them
        r = store._r
        assert r.hmget(store._parents, hashes[1:]) == [None, None]
        assert r.hmget(store._kid_counts, hashes) == [None, None, None]
        assert [r.zscore(store._lru_chunks, h) is not None for h in hashes] == [True, False, False]
    else:
        assert store.used_bytes == _disk_bytes(store.root)
        assert not any(h in store._parent or h in store._kids for h in hashes[1:])
    with pytest.raises(KVNotFound, match=r"1 of 3 chunks found \(prefix=True fetches the 1 stored\)$"):
        svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids))
    svc.ingest_sync(MODEL, ids, make_kv(len(ids)))
    assert _prefix(svc, ids) == [CHUNK] * 3
    svc.close()


def test_the_local_store_takes_every_linked_chunk_after_an_unsourced_one(tmp_path: Path):
    """Two contexts continue one prefix: a fetch of one that finds the prefix's last chunk without its source
    takes the other's chunks after it too (linked in the local store's prefix tree)."""
    svc = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=CHUNK)
    shared = list(range(2 * CHUNK))
    a, b = shared + list(range(500, 500 + CHUNK)), shared + list(range(900, 900 + CHUNK))
    ha = svc.ingest_sync(MODEL, a, make_kv(len(a), 1))
    hb = svc.ingest_sync(MODEL, b, make_kv(len(b), 2))
    assert ha[:2] == hb[:2]
    _rot(svc.store, object_key(ha[1], "src"))
    svc.store.get(object_key(ha[1], "src"))
    assert _prefix(svc, a) == [CHUNK]
    assert [any(_stored(svc.store, h, ("src", "meta"))) for h in (*ha, hb[2])] == [True, False, False, False]
    assert svc.store.used_bytes == _disk_bytes(tmp_path / "kv")
    svc.close()


def test_a_fetch_by_hashes_removes_no_chunk_it_lists_after_an_unsourced_one(make_store):  # noqa: F811
    """Hashes a client lists are checked only once resolved: a chunk listed after one without its source is not
    known to follow it (another context's chunk, named by a client), and stays."""
    store = make_store(capacity=64 << 20)
    svc = KVService(store, chunk_tokens=CHUNK)
    ids, other = list(range(2 * CHUNK)), list(range(7000, 7000 + CHUNK))
    hashes = svc.ingest_sync(MODEL, ids, make_kv(len(ids)))
    (victim,) = svc.ingest_sync(MODEL, other, make_kv(len(other), 3))
    _rot(store, object_key(hashes[0], "src"))
    store.get(object_key(hashes[0], "src"))
    with pytest.raises(KVNotFound):
        svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, hashes=[bytes.fromhex(h) for h in (hashes[0],
                                                                                              victim)]))
    assert all(_stored(store, victim, ("src", "meta")))
    svc.close()


# -- a store that does not answer within a fetch's deadline --------------------------------------------------------
class _Hung(LocalChunkStore):
    """A local store whose lookups wait until ``answer`` is set (at most 5 s: then they answer, as a store that
    answers late does)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.answer = threading.Event()

    def contains(self, key: str) -> bool:
        self.answer.wait(5)
        return super().contains(key)


def test_a_store_that_does_not_answer_within_the_deadline_fails_the_lookup_as_unavailable(tmp_path, monkeypatch):
    """A hung store held the fetch's lookup until its own timeout (Redis: 10 s), past the client's: the client
    heard "KV fetch timed out ... no KV_META", never that the store did not answer."""
    monkeypatch.setattr(kv_service, "RESOLVE_FLOOR_S", 0.05)
    store = _Hung(tmp_path / "kv", 64 << 20)
    store.answer.set()
    svc = KVService(store, chunk_tokens=CHUNK)
    ids = list(range(2 * CHUNK))
    svc.ingest_sync(MODEL, ids, make_kv(len(ids)))
    store.answer.clear()
    try:
        with pytest.raises(StoreError, match=r"KV store unavailable: no answer within the fetch's deadline"):
            asyncio.run(svc.resolve(KvFetch(model=MODEL, deadline_ms=50, token_ids=ids)))
    finally:
        store.answer.set()
        svc.close()
    assert svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=50, token_ids=ids)).token_counts == [CHUNK] * 2


def test_a_stopped_redis_is_reported_to_the_client_within_the_fetch_deadline(tmp_path, monkeypatch):
    """The probe: Redis stopped (SIGSTOP), a fetch with a deadline under the client's timeout."""
    monkeypatch.setattr(kv_service, "RESOLVE_FLOOR_S", 0.3)
    with redis_server(tmp_path) as (client, url):
        svc = KVService(RedisChunkStore(url, 64 << 20, prefix="hung:"), chunk_tokens=CHUNK)
        ids = list(range(2 * CHUNK))
        svc.ingest_sync(MODEL, ids, make_kv(len(ids)))
        pid = int(client.info("server")["process_id"])
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(RemoteError, match="KV store unavailable: no answer") as err:
                run(_fetch(svc, ids, deadline_ms=300, timeout_s=5))
            assert err.value.code == ErrorCode.INTERNAL  # (as every StoreError: "KV store unavailable (Redis ...)")
        finally:
            os.kill(pid, signal.SIGCONT)
            svc.close()


# -- review of the above (/tmp/xp/s30/pR) ---------------------------------------------------------------------------
def test_chunks_after_a_chunk_gone_whole_go_at_start_with_nothing_of_it_left(tmp_path: Path, caplog):
    """Chunk 0's source, metadata and level all truncated: no chunk of it is without its source, so only the search
    for the parents of chunks 1 and 2 can tell they are unreachable (in the test above its level is left, and the
    chunks after it went as its descendants)."""
    root = tmp_path / "kv"
    _, hashes = _put_three(root)
    for kind in ALL:
        os.truncate(_file(root, hashes[0], kind), 10)
    store = LocalChunkStore(root, 64 << 20)
    try:
        assert store.used_bytes == 0 and _objects(root) == []
        assert store.stats.unsourced == 0 and store.stats.evictions == 6
        assert "removed 2 chunks that follow a chunk that is gone" in caplog.text
    finally:
        store.close()


def test_the_search_for_parents_at_start_tries_chunks_with_children_first(tmp_path: Path, monkeypatch):
    """Under the search's bound, a shared first chunk (one with a child linked already) is tried before the many
    first chunks without children that come before it in mtime order: its old child is linked to it, not left
    unlinked for want of steps."""
    root = tmp_path / "kv"
    store = LocalChunkStore(root, 10 << 20)
    shared, old, new = list(range(8)), list(range(100, 108)), list(range(200, 208))
    p0 = chain_step(chain_root("m"), shared)
    x1, y1 = chain_step(p0, old), chain_step(p0, new)
    _put_chunk(store, p0, 0, shared)
    _put_chunk(store, x1, 1, old)
    _put_chunk(store, y1, 1, new)
    others = [chain_step(chain_root("m"), [1000 + i]) for i in range(kv_store.CHAIN_MEMORY + 6)]
    for i, h in enumerate(others):
        _put_chunk(store, h, 0, [1000 + i])
    store.close()
    t = 1_700_000_000
    for n, h in enumerate((x1, *others, p0, y1)):  # x1 far from p0; y1 next to it (linked by the mtime order)
        for kind in ("src", "meta"):
            os.utime(_file(root, h, kind), (t + n, t + n))
    monkeypatch.setattr(kv_store_local, "RECOVER_SEARCH_STEPS", 5)  # fewer than the chunks without children before p0
    store = LocalChunkStore(root, 10 << 20)
    try:
        assert store._parent.get(y1) == p0 and store._parent.get(x1) == p0
        assert store.stats.evictions == 0
    finally:
        store.close()


class _DictStore(ChunkStore):
    """A store with the base class's own drop_unsourced (the local and Redis stores have their own): a dict."""

    def __init__(self) -> None:
        self.capacity_bytes = 64 << 20
        self.stats = kv_store.StoreStats()
        self._objects: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self._objects.get(key)

    def put(self, key: str, data: bytes) -> None:
        self._objects[key] = bytes(data)
        self.stats.puts += 1

    def delete(self, key: str) -> None:
        self._objects.pop(key, None)

    def contains(self, key: str) -> bool:
        return key in self._objects

    @property
    def used_bytes(self) -> int:
        return sum(len(v) for v in self._objects.values())


def test_the_base_store_counts_the_chunks_after_an_unsourced_one_as_evictions():
    store = _DictStore()
    svc = KVService(store, chunk_tokens=CHUNK)
    ids = list(range(3 * CHUNK))
    hashes = svc.ingest_sync(MODEL, ids, make_kv(len(ids)), prewarm=["low"])
    store.delete(object_key(hashes[1], "src"))
    assert _prefix(svc, ids) == [CHUNK]
    assert [any(_stored(store, h, ALL)) for h in hashes] == [True, False, False]
    assert store.stats.unsourced == 1 and store.stats.evictions == 3  # chunk 2's source, metadata and level
    svc.close()


class _CountedSlices(list):
    """A list that counts the items its slices copy."""

    copied = 0

    def __getitem__(self, key):  # type: ignore[override]
        got = super().__getitem__(key)
        if isinstance(key, slice):
            self.copied += len(got)
        return got


def test_a_lookup_by_token_ids_slices_the_later_hashes_only_on_a_miss(tmp_path, monkeypatch):
    """The later hashes (those a chunk without its source takes with it) were sliced for every chunk: n*(n-1)/2
    hashes copied per lookup (27 ms at 4,096 chunks), for a miss that seldom comes."""
    svc = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=CHUNK)
    ids = list(range(16 * CHUNK))
    svc.ingest_sync(MODEL, ids, make_kv(len(ids)))
    made: list[_CountedSlices] = []

    def counted(*args, **kwargs) -> _CountedSlices:
        made.append(_CountedSlices(kv_store.chunk_hashes(*args, **kwargs)))
        return made[-1]

    monkeypatch.setattr(kv_service, "chunk_hashes", counted)
    try:
        assert svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids)).token_counts == [CHUNK] * 16
        assert len(made) == 1 and made[0].copied <= 2 * 16  # (the plan's own hashes: one slice of 16)
    finally:
        svc.close()


class _Slow(LocalChunkStore):
    """A local store whose first lookup after ``slow`` is set takes ``delay`` seconds (a slow, healthy store)."""

    delay = 0.3

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.slow = threading.Event()

    def contains(self, key: str) -> bool:
        if self.slow.is_set():
            self.slow.clear()
            time.sleep(self.delay)
        return super().contains(key)


def test_a_healthy_store_slower_than_a_tiny_deadline_is_not_called_unavailable(tmp_path):
    """The bound has a floor (RESOLVE_FLOOR_S, 2 s): a 1-ms deadline does not make a 0.3-s lookup "unavailable"."""
    store = _Slow(tmp_path / "kv", 64 << 20)
    svc = KVService(store, chunk_tokens=CHUNK)
    ids = list(range(2 * CHUNK))
    svc.ingest_sync(MODEL, ids, make_kv(len(ids)))
    store.slow.set()
    try:
        plan = asyncio.run(svc.resolve(KvFetch(model=MODEL, deadline_ms=1, token_ids=ids)))
        assert plan.token_counts == [CHUNK] * 2 and not store.slow.is_set()  # (the slow lookup was made)
    finally:
        svc.close()


def _stored_service(tmp_path: Path) -> tuple[KVService, list[int]]:
    svc = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=CHUNK)
    ids = list(range(2 * CHUNK))
    svc.ingest_sync(MODEL, ids, make_kv(len(ids)))
    return svc, ids


def test_a_lookup_queued_behind_moving_work_is_served_not_called_unavailable(tmp_path, monkeypatch):
    """resolve_queue.py: the one fetch worker busy with other fetches' work (here six jobs of 0.3 s, each well
    within the 1-s bound, 1.8 s together): the bound counted the time queued, and a healthy store was "KV store
    unavailable: no answer within the fetch's deadline"."""
    monkeypatch.setattr(kv_service, "RESOLVE_FLOOR_S", 1.0)
    svc, ids = _stored_service(tmp_path)
    try:
        ahead = [svc.pool.submit(time.sleep, 0.3) for _ in range(6)]
        plan = asyncio.run(svc.resolve(KvFetch(model=MODEL, deadline_ms=50, token_ids=ids)))
        assert plan.token_counts == [CHUNK] * 2 and all(job.done() for job in ahead)
    finally:
        svc.close()


def _hung_ahead(svc: KVService) -> threading.Event:
    """A job on the fetch worker that runs until the event returned is set (a store call that hangs)."""
    release = threading.Event()
    svc.pool.submit(release.wait, 30)
    return release


def _count_lookups(svc: KVService, monkeypatch) -> list[KvFetch]:
    calls: list[KvFetch] = []
    real = svc.resolve_sync

    def counted(fetch: KvFetch):
        calls.append(fetch)
        return real(fetch)

    monkeypatch.setattr(svc, "resolve_sync", counted)
    return calls


def test_a_lookup_queued_behind_a_hung_job_fails_as_unavailable_and_never_runs(tmp_path, monkeypatch):
    """The point of the bound stays: a job ahead on the worker that has run for the bound (a hung Redis under
    another fetch's chunk) fails the lookups queued behind it as the store not answering, and they are dropped."""
    monkeypatch.setattr(kv_service, "RESOLVE_FLOOR_S", 0.1)
    svc, ids = _stored_service(tmp_path)
    calls = _count_lookups(svc, monkeypatch)
    release = _hung_ahead(svc)
    try:
        with pytest.raises(StoreError, match=r"KV store unavailable: no answer within the fetch's deadline"):
            asyncio.run(svc.resolve(KvFetch(model=MODEL, deadline_ms=50, token_ids=ids)))
    finally:
        release.set()
    svc.pool.submit(lambda: None).result(10)  # the worker is past the hung job and whatever was queued
    assert calls == []
    svc.close()


def test_a_cancelled_fetch_takes_its_queued_lookup_with_it(tmp_path, monkeypatch):
    svc, ids = _stored_service(tmp_path)
    calls = _count_lookups(svc, monkeypatch)
    release = _hung_ahead(svc)

    async def cancel_while_queued() -> None:
        task = asyncio.create_task(svc.resolve(KvFetch(model=MODEL, deadline_ms=5000, token_ids=ids)))
        await asyncio.sleep(0)  # (its job is submitted at its first step)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(cancel_while_queued())
    finally:
        release.set()
    svc.pool.submit(lambda: None).result(10)
    assert calls == []
    svc.close()
