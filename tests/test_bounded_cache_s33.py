"""The KV service's metadata cache is bounded by bytes, not only by entries (daemon/bounded_cache.py): a soak saw the
daemon grow ~11 KB per distinct 256-token chunk put, the token ids of chunks the store had long evicted."""
from __future__ import annotations

import pytest

from tokenwire.daemon.bounded_cache import BoundedCache


def test_the_least_recent_go_once_entries_or_bytes_are_exceeded():
    c: BoundedCache[str, str] = BoundedCache(max_entries=3, max_bytes=10, cost=len)
    c.put("a", "xxxx")
    c.put("b", "xxxx")
    assert c.get("a") == "xxxx"  # now the most recent
    c.put("c", "xxx")  # 11 bytes: the least recent (b) goes
    assert "b" not in c and c.bytes == 7 and len(c) == 2
    c.put("d", "")
    c.put("e", "")  # 4 entries: a, the least recent, goes
    assert "a" not in c and len(c) == 3 and c.bytes == 3
    c.put("c", "x")  # replacing a value re-counts it
    assert c.bytes == 1 and c.get("c") == "x"
    c.put("big", "x" * 11)  # more than the bound alone: not kept, nothing else lost
    assert "big" not in c and len(c) == 3
    assert c.pop("c") == "x" and c.pop("c") is None and c.bytes == 0
    c.clear()
    assert len(c) == 0 and c.bytes == 0


def test_distinct_puts_past_the_store_capacity_keep_the_metadata_cache_within_its_bytes(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from tokenwire.daemon import kv_service as kvs
    from tokenwire.daemon.kv_service import KVService
    from tokenwire.daemon.kv_store_local import LocalChunkStore

    from .test_kv_channel import CHUNK, MODEL, make_kv

    per_chunk = 400 + 40 * CHUNK
    monkeypatch.setattr(kvs, "META_CACHE_BYTES", 5 * per_chunk)
    svc = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=CHUNK)
    try:
        for n in range(12):  # 12 distinct chunks: by entries (65,536) every one was kept
            svc.ingest_sync(MODEL, [n] * CHUNK, make_kv(CHUNK))
        assert len(svc._meta) == 5 and svc._meta.bytes <= 5 * per_chunk
    finally:
        svc.close()


def test_an_evicted_chunks_cached_metadata_is_dropped_when_read(tmp_path):
    pytest.importorskip("torch")
    from tokenwire.daemon.kv_service import KVService
    from tokenwire.daemon.kv_store import object_key
    from tokenwire.daemon.kv_store_local import LocalChunkStore

    from .test_kv_channel import CHUNK, MODEL, make_kv

    svc = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=CHUNK)
    try:
        h = svc.ingest_sync(MODEL, list(range(CHUNK)), make_kv(CHUNK))[0]
        assert h in svc._meta
        for kind in ("meta", "src"):  # as the store's eviction removes them
            svc.store.delete(object_key(h, kind))
        assert svc._meta_read(h) is None
        assert h not in svc._meta
    finally:
        svc.close()


def test_a_local_stores_evictions_take_the_chunks_cached_entries(tmp_path):
    """A small local store evicting as distinct contexts are put: the service's caches keep only chunks it holds
    (before, every chunk ever put stayed cached, up to 65,536 of them)."""
    pytest.importorskip("torch")
    from tokenwire.daemon.kv_service import KVService
    from tokenwire.daemon.kv_store import object_key
    from tokenwire.daemon.kv_store_local import LocalChunkStore

    from .test_kv_channel import CHUNK, MODEL, make_kv

    store = LocalChunkStore(tmp_path / "kv", 64 << 10)  # (about three chunks)
    svc = KVService(store, chunk_tokens=CHUNK)
    try:
        for n in range(12):
            h = svc.ingest_sync(MODEL, [n] * CHUNK, make_kv(CHUNK), prewarm=["low"])[0]
            svc.encoded_sync(h, "low")
        assert store.stats.evictions > 0
        assert 0 < len(svc._meta) < 12
        assert all(store.contains(object_key(h, "meta")) for h in list(svc._meta._items))
        assert all(store.contains(object_key(h, lv)) for h, lv in list(svc._sizes._items))
    finally:
        svc.close()
