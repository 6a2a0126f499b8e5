"""Fixes from an application developer's KV probe, store side: a chunk whose source was gone still counted as
stored (its metadata and levels stayed), so every prefix fetch of its context failed mid-way; and eviction took a
context's first chunks first, leaving the rest of it unusable dead weight."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.test_kv_channel import CHUNK, MODEL, _fetch, make_kv, run
from tests.test_kv_ingest_fixes3 import _rot
from tests.test_kv_store import make_store, redis_url  # noqa: F401  (the fixtures)
from tests.test_kv_store_fixes2 import _collected
from tokenwire.daemon.kv_service import KVService
from tokenwire.daemon.kv_store import ChunkStore, LocalChunkStore, object_key, wrap
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
        assert _stored(svc.store, hashes[2]) == [True, True, True]  # whole, though unreachable without chunk 1
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
    sizes = sum(len(wrap(store.get(object_key(h, kind)) or b"")) for kind in ("src", "meta", "low"))
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
