"""Fixes from an application developer's KV probe, store side: a chunk whose source was gone still counted as
stored (its metadata and levels stayed), so every prefix fetch of its context failed mid-way; and eviction took a
context's first chunks first, leaving the rest of it unusable dead weight."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest

from tests.test_kv_channel import CHUNK, MODEL, _fetch, make_kv, run
from tests.test_kv_ingest_fixes3 import _rot
from tests.test_kv_store import make_store, redis_url  # noqa: F401  (the fixtures)
from tests.test_kv_store_fixes2 import _collected
from tokenwire.daemon.kv_service import KVService
from tokenwire.daemon.kv_store import ChunkStore, chunk_hashes, object_key, wrap
from tokenwire.daemon.kv_store_local import LocalChunkStore
from tokenwire.daemon.kv_store_redis import RedisChunkStore
from tokenwire.transport.frames import KvFetch
from tokenwire.transport.kv_channel import KVNotFound


def _disk_bytes(root: Path) -> int:
    """What the store's objects take on disk (its lock file aside)."""
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and f.name != ".lock")


def _prefix(svc: KVService, ids: list[int]) -> list[int]:
    """The chunk lengths a prefix fetch of ``ids`` would get."""
    return svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids, prefix=True)).token_counts


def _stored(store: ChunkStore, h: str, kinds: tuple[str, ...] = ("src", "meta", "low")) -> list[bool]:
    return store.contains_many([object_key(h, kind) for kind in kinds])


# -- 1. a chunk without its source ---------------------------------------------------------------------------------
def test_a_source_truncated_before_a_restart_takes_its_chunks_metadata_and_levels_with_it(tmp_path: Path):
    """The start removed the truncated source alone: the chunk's metadata and its prewarmed level stayed, the chunk
    counted as stored, and the prefix fetch failed mid-way ("chunk ... is no longer stored", counted failed) where
    it should have got chunk 0 and the rest as missing_token_ids."""
    root = tmp_path / "kv"
    ids = list(range(3 * CHUNK))
    svc = KVService(LocalChunkStore(root, 64 << 20), chunk_tokens=CHUNK)
    hashes = svc.ingest_sync(MODEL, ids, make_kv(len(ids)), prewarm=["low"])
    svc.close()
    os.truncate(root / hashes[1][:2] / object_key(hashes[1], "src"), 100)  # a crash, a full disk
    svc = KVService(LocalChunkStore(root, 64 << 20), chunk_tokens=CHUNK)
    try:
        assert _stored(svc.store, hashes[1]) == [False, False, False]
        assert not list(root.rglob(f"{hashes[1]}.*"))  # the files too
        assert _stored(svc.store, hashes[2]) == [False, False, False]  # unreachable without chunk 1: removed too
        assert svc.store.used_bytes == _disk_bytes(root)
        assert svc.store.stats.recovered_partial == 1 and svc.store.stats.unsourced == 1
        assert _collected(svc)["tokenwire_kv_store_unsourced_total"] == 1  # (in a metric, as the recovered are)
        assert _prefix(svc, ids) == [CHUNK]
        res, server = run(_fetch(svc, ids, deadline_ms=5000, controller="fixed-L3", prefix=True))
        assert res.prefix_kv()[1] == CHUNK and res.missing_token_ids == ids[CHUNK:]
        assert server.stats["failed"] == 0
    finally:
        svc.close()


def test_a_source_deleted_as_corrupt_at_run_time_makes_its_chunk_a_miss(make_store):  # noqa: F811
    """The read that finds a source corrupt deletes it; its metadata and levels stayed (bytes still counted), and
    with a level stored the chunk counted as stored: every later prefix fetch failed at it."""
    store = make_store(capacity=64 << 20)
    svc = KVService(store, chunk_tokens=CHUNK)
    ids = list(range(7, 7 + 3 * CHUNK))
    hashes = svc.ingest_sync(MODEL, ids, make_kv(len(ids), 2), prewarm=["low"])
    h = hashes[1]
    sizes = sum(len(wrap(store.get(object_key(c, kind)) or b"")) for c in hashes[1:]  # chunk 2 goes with it
                for kind in ("src", "meta", "low"))
    used = store.used_bytes
    _rot(store, object_key(h, "src"))
    plan = svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids))
    with pytest.raises(KVNotFound, match="no longer stored"):  # found now, mid-fetch: nothing else could know
        svc.chunk_sync(plan, 1, "high")
    assert _stored(store, h) == [False, True, True]  # the store deleted the source alone
    assert _prefix(svc, ids) == [CHUNK]  # a miss: the prefix ends before it, at once
    assert _stored(store, h) == [False, False, False] and store.used_bytes == used - sizes
    assert store.stats.unsourced == 1
    assert _prefix(svc, ids) == [CHUNK]  # and stays one, until put again
    svc.ingest_sync(MODEL, ids, make_kv(len(ids), 2))
    assert _prefix(svc, ids) == [CHUNK] * 3
    svc.close()


# -- 2. eviction from a context's tail ------------------------------------------------------------------------------
def _a_then_b(svc: KVService) -> tuple[list[int], list[str], list[int], list[str]]:
    """Put context A (4 chunks), then B (4 other chunks), into a store with room for about six chunks."""
    a, b = list(range(4 * CHUNK)), list(range(5000, 5000 + 4 * CHUNK))
    ha = svc.ingest_sync(MODEL, a, make_kv(len(a), 1))
    hb = svc.ingest_sync(MODEL, b, make_kv(len(b), 2))
    return a, ha, b, hb


def _check_a_usable_prefix(svc: KVService, a: list[int], ha: list[str], b: list[int]) -> None:
    kept = [all(_stored(svc.store, h, ("src", "meta"))) for h in ha]
    n = kept.count(True)
    assert 0 < n < len(ha) and kept == [True] * n + [False] * (len(ha) - n), kept  # a prefix, none of its tail
    assert _prefix(svc, a) == [CHUNK] * n
    assert _prefix(svc, b) == [CHUNK] * 4
    assert svc.store.used_bytes <= svc.store.capacity_bytes


CAPACITY = 6 * (2 * (2 * 4 * 2 * 16 * CHUNK) + 400)  # six chunks of make_kv's fp16 sources, with their metadata


def test_eviction_takes_a_context_from_its_tail(make_store):  # noqa: F811
    """A's chunks were evicted first chunk first (a put and a fetch use them in chain order: chunk 0 is the least
    recent), and the chunks left of it were dead weight: a chunk is usable only with every chunk before it."""
    svc = KVService(make_store(capacity=CAPACITY), chunk_tokens=CHUNK)
    a, ha, b, _ = _a_then_b(svc)
    _check_a_usable_prefix(svc, a, ha, b)
    assert svc.store.stats.evictions > 0
    svc.close()


def test_eviction_takes_a_fetched_context_from_its_tail(make_store):  # noqa: F811
    """A fetch touches a context's chunks in chain order as its put does: after one, chunk 0 was again the first
    to go."""
    svc = KVService(make_store(capacity=CAPACITY), chunk_tokens=CHUNK)
    a = list(range(4 * CHUNK))
    ha = svc.ingest_sync(MODEL, a, make_kv(len(a), 1))
    plan = svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=a))
    for i in range(4):
        svc.chunk_sync(plan, i, "low")
    b = list(range(5000, 5000 + 4 * CHUNK))
    svc.ingest_sync(MODEL, b, make_kv(len(b), 2))
    _check_a_usable_prefix(svc, a, ha, b)
    svc.close()


@pytest.mark.parametrize("mtimes", ["as written", "all equal"])
def test_eviction_after_a_restart_takes_a_context_from_its_tail(tmp_path: Path, mtimes: str):
    """The chain's links are learned again from the metadata at start (in their mtimes' order, a parent looked
    for both ways: a coarse file system clock gives a put's files one mtime, and the name orders them): without
    them, a restarted store evicted by mtime alone, chunk 0 first."""
    root = tmp_path / "kv"
    svc = KVService(LocalChunkStore(root, CAPACITY), chunk_tokens=CHUNK)
    a = list(range(4 * CHUNK))
    ha = svc.ingest_sync(MODEL, a, make_kv(len(a), 1))
    svc.close()
    if mtimes == "all equal":
        for f in root.rglob("*.*"):
            os.utime(f, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))
    svc = KVService(LocalChunkStore(root, CAPACITY), chunk_tokens=CHUNK)
    try:
        assert svc.store._parent == {ha[i]: ha[i - 1] for i in range(1, 4)}  # every link, whatever the name order
        b = list(range(5000, 5000 + 4 * CHUNK))
        svc.ingest_sync(MODEL, b, make_kv(len(b), 2))
        _check_a_usable_prefix(svc, a, ha, b)
    finally:
        svc.close()


def test_a_shared_prefix_stays_while_a_context_that_continues_it_is_stored(make_store):  # noqa: F811
    """Two contexts share their first chunk (a system prompt): it is evicted only after both contexts' later
    chunks, whichever of them is the least recent."""
    svc = KVService(make_store(capacity=CAPACITY), chunk_tokens=CHUNK)
    shared = list(range(CHUNK))
    a, c = shared + list(range(100, 100 + 2 * CHUNK)), shared + list(range(300, 300 + 2 * CHUNK))
    ha = svc.ingest_sync(MODEL, a, make_kv(len(a), 1))
    hc = svc.ingest_sync(MODEL, c, make_kv(len(c), 3))
    assert ha[0] == hc[0]
    b = list(range(5000, 5000 + 4 * CHUNK))
    svc.ingest_sync(MODEL, b, make_kv(len(b), 2))  # 9 chunks for room for 6: three go, from the tails
    assert all(_stored(svc.store, ha[0], ("src", "meta")))  # LRU took it third, and c's chunks were dead weight
    assert len(_prefix(svc, a)) + len(_prefix(svc, c)) == 1 + 1 + 1  # the shared one, and one more of a or c
    for ctx, hs in ((a, ha), (c, hc)):
        kept = [all(_stored(svc.store, h, ("src", "meta"))) for h in hs]
        assert kept == [True] * kept.count(True) + [False] * kept.count(False), kept
        assert _prefix(svc, ctx) == [CHUNK] * kept.count(True)
    svc.close()


# -- 3. a chunk whose parent is gone is never kept (review of the tail-first eviction) -----------------------------
def _raw_meta(i: int, ids: list[int]) -> bytes:
    """Metadata as kv_meta.ChunkMeta packs it (chain_entry reads ``i`` and ``ids``)."""
    return msgpack.packb({"m": "m", "fp": 1, "g": [1, 1, 1], "dt": "f16", "i": i, "ids": ids})


def _put_chunk(store: ChunkStore, h: str, i: int, ids: list[int], size: int = 1000) -> None:
    """One chunk in ingest order: its source, then its metadata."""
    store.put(object_key(h, "src"), b"x" * size)
    store.put(object_key(h, "meta"), _raw_meta(i, ids))


def _kept(store: ChunkStore, hs: list[str]) -> list[int]:
    return [i for i, h in enumerate(hs) if store.contains(object_key(h, "src"))]


def test_a_context_larger_than_the_store_keeps_a_usable_prefix(make_store):  # noqa: F811
    """10 chunks for room for ~5: chunk 5's source evicted chunk 4 (the tail), then chunk 5's metadata linked it
    to the gone 4, and from then on 5, 6, 7... were each "needed" by the next while the prefix's tail went: kept
    [5..9], a usable prefix of 0 chunks. A chunk whose parent is gone is unreachable and is removed at once."""
    store = make_store(capacity=5 * 1100)
    toks = list(range(40))
    hs = chunk_hashes(toks, model="m", chunk_tokens=4)
    for i, h in enumerate(hs):
        _put_chunk(store, h, i, toks[4 * i : 4 * i + 4])
    kept = _kept(store, hs)
    assert kept == list(range(len(kept))) and len(kept) >= 4, kept  # a prefix; nothing whose parent is gone
    assert not any(store.contains(object_key(h, "meta")) for h in hs[len(kept) :])
    assert store.used_bytes <= store.capacity_bytes and store.stats.evictions > 0


def test_a_chunk_read_after_its_parent_went_is_removed_with_its_descendants(make_store):  # noqa: F811
    """A chunk whose metadata confirms a parent that is not stored is a miss and goes, and (local store: it knows
    the children) every chunk linked below it goes with it: unusable, they were kept as needed by one another."""
    store = make_store(capacity=1 << 20)
    toks = list(range(12))
    hs = chunk_hashes(toks, model="m", chunk_tokens=4)
    for i, h in enumerate(hs):
        _put_chunk(store, h, i, toks[4 * i : 4 * i + 4])
    store.get(object_key(hs[0], "meta"))  # (a fetch resolves in chain order: chunk 0 is a candidate parent)
    for kind in ("src", "meta"):
        store.delete(object_key(hs[0], kind))
    evictions = store.stats.evictions
    assert store.get(object_key(hs[1], "meta")) is None
    assert not store.contains(object_key(hs[1], "src")) and store.stats.evictions >= evictions + 2
    if make_store.kind == "local":
        assert _kept(store, hs) == [] and store.used_bytes == 0


def test_eviction_walks_up_to_a_passed_parent_before_another_context(make_store):  # noqa: F811
    """A's tail goes, then its chunks before it, each passed over for its child until that child went, before any
    chunk of the more recent context B: B stays whole and A keeps a usable prefix. Without the walk up, B lost its
    tail and A its first chunk, the rest of A dead weight."""
    store = make_store(capacity=6 * 1100)
    a_toks, b_toks = list(range(16)), list(range(500, 508))
    ha, hb = chunk_hashes(a_toks, model="m", chunk_tokens=4), chunk_hashes(b_toks, model="m", chunk_tokens=4)
    for i, h in enumerate(ha):
        _put_chunk(store, h, i, a_toks[4 * i : 4 * i + 4])
    for i, h in enumerate(hb):
        _put_chunk(store, h, i, b_toks[4 * i : 4 * i + 4])
    assert store.stats.evictions == 0
    c = chunk_hashes([900] * 4, model="m", chunk_tokens=4)[0]
    store.put(object_key(c, "src"), b"c" * 3000)  # room for about three chunks
    assert _kept(store, hb) == [0, 1]
    assert _kept(store, ha) == [0]


def test_a_redis_store_learns_a_link_on_a_read(redis_url):  # noqa: F811
    """A link not learned at the put (the parent's metadata was written after its child's) is learned when a fetch
    reads them in chain order, so eviction takes the context from its tail."""
    import redis

    prefix = "tw-test-learn-read:"
    r = redis.Redis.from_url(redis_url)
    store = RedisChunkStore(redis_url, 2 * 1100 + 500, prefix=prefix)
    try:
        toks = list(range(8))
        h0, h1 = chunk_hashes(toks, model="m", chunk_tokens=4)
        for h in (h1, h0):
            store.put(object_key(h, "src"), b"x" * 1000)
        store.put(object_key(h1, "meta"), _raw_meta(1, toks[4:]))
        store.put(object_key(h0, "meta"), _raw_meta(0, toks[:4]))
        assert r.hget(prefix + "parent", h1) is None  # not learned at the put
        store.get(object_key(h0, "meta"))
        store.get(object_key(h1, "meta"))
        assert r.hget(prefix + "parent", h1) == h0.encode()
        other = chunk_hashes([77] * 4, model="m", chunk_tokens=4)[0]
        store.put(object_key(other, "src"), b"o" * 1000)  # one chunk goes: chunk 1 (chunk 0 is the least recent)
        assert store.contains(object_key(h0, "src")) and not store.contains(object_key(h1, "src"))
    finally:
        for k in r.scan_iter(prefix + "*"):
            r.delete(k)
        store.close()
        r.close()


def test_a_redis_link_is_not_written_for_a_chunk_evicted_meanwhile(redis_url):  # noqa: F811
    """Daemon A reads chunk 1's metadata; daemon B evicts the context before A writes its link: the link was
    written anyway (HSETNX after the read), a ghost child that kept chunk 0 "needed" for good once it was put
    again. The link is written only while both chunks are stored, in one script."""
    import redis

    prefix = "tw-test-ghost:"
    r = redis.Redis.from_url(redis_url)
    a, b = RedisChunkStore(redis_url, 20_000, prefix=prefix), RedisChunkStore(redis_url, 20_000, prefix=prefix)
    try:
        toks = list(range(1, 9))
        h0, h1 = chunk_hashes(toks, model="m", chunk_tokens=4)
        for i, h in enumerate((h0, h1)):
            _put_chunk(a, h, i, toks[4 * i : 4 * i + 4], size=4000)
        a.get(object_key(h0, "meta"))
        orig = a._chain_link

        def racing(key: str, payload: bytes) -> str | None:
            if key == object_key(h1, "meta"):  # B ingests other contexts between A's read and its link
                for j in range(3):
                    b.put(object_key(chunk_hashes([100 + j] * 4, model="m", chunk_tokens=4)[0], "src"), b"o" * 7000)
            return orig(key, payload)

        a._chain_link = racing  # type: ignore[method-assign]
        a.get(object_key(h1, "meta"))
        assert not a.contains(object_key(h0, "src")) and not a.contains(object_key(h1, "src"))
        assert r.hget(prefix + "parent", h1) is None
        a._chain_link = orig  # type: ignore[method-assign]
        _put_chunk(a, h0, 0, toks[:4], size=4000)  # put again alone: nothing needs it
        assert r.hget(prefix + "kids", h0) is None
    finally:
        for k in r.scan_iter(prefix + "*"):
            r.delete(k)
        a.close()
        b.close()
        r.close()


# -- 4. start_kv: a stop while a listener is being opened ----------------------------------------------------------
def test_a_start_cancelled_while_the_ingest_socket_opens_releases_the_store_and_the_port(tmp_path, monkeypatch):
    """A stop signal (a cancel) while serve_kv_ingest was pending left the store's lock and the KV UDP port held:
    the cleanup covered OSError only."""
    import asyncio

    from tokenwire.daemon import kv_runtime
    from tokenwire.daemon.config import parse_config
    from tokenwire.transport import kv_channel

    table = {"enabled": True, "listen": "127.0.0.1:0", "directory": str(tmp_path / "kv"), "forecaster": "ewma",
             "ingest_socket": str(tmp_path / "kv.sock")}
    cfg = parse_config({"kv": table}, tmp_path / "tw.toml").kv
    ports: list[int] = []
    real_serve_kv = kv_channel.serve_kv

    async def serve_kv(*args: Any, **kwargs: Any) -> Any:
        server = await real_serve_kv(*args, **kwargs)
        ports.append(server.port)  # (read now: a closed server's socket has no name)
        return server

    async def go() -> None:
        entered = asyncio.Event()

        async def ingest(*args: Any, **kwargs: Any) -> None:
            entered.set()
            await asyncio.Event().wait()  # pending until cancelled

        monkeypatch.setattr(kv_channel, "serve_kv", serve_kv)
        monkeypatch.setattr(kv_runtime, "serve_kv_ingest", ingest)
        task = asyncio.ensure_future(kv_runtime.start_kv(cfg))
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    LocalChunkStore(tmp_path / "kv", 1 << 20).close()  # not "in use by another process"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", ports[0]))  # the KV port was closed
