"""Fixes from a KV store probe: a full disk, a read-only mount, objects and metadata of another tokenwire version,
two daemons racing on one Redis, a Redis that evicts or fills up, and store objects removed without a trace."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import uuid
from pathlib import Path
from types import SimpleNamespace

import msgpack  # type: ignore[import-untyped]
import pytest

from tests.test_kv_channel import CHUNK, MODEL, _fetch, make_kv, run
from tests.test_kv_store import make_store, redis_server, redis_url  # noqa: F401  (the fixtures)
from tokenwire.daemon import kv_store
from tokenwire.daemon.kv_ingest import put_kv_unix, serve_kv_ingest
from tokenwire.daemon.kv_meta import KVIngestError
from tokenwire.daemon.kv_metrics import _KVCollector
from tokenwire.daemon.kv_service import KVService
from tokenwire.daemon.kv_store import MAGIC, ReportEvery, StoreError, StoreFullError, object_key, wrap
from tokenwire.daemon.kv_store_local import LocalChunkStore
from tokenwire.daemon.kv_store_redis import RedisChunkStore
from tokenwire.transport.cachegen import codec
from tokenwire.transport.cachegen.codec import decode_chunk
from tokenwire.transport.frames import KvFetch
from tokenwire.transport.kv_channel import KVNotFound


def _max_error(payload: bytes, kv, first: int = 0) -> float:
    """Largest error of an encoded chunk against ``kv``'s tokens from ``first`` (one chunk of them)."""
    got = decode_chunk(payload)
    return max(float((g.float() - w[:, :, first : first + CHUNK].float()).abs().max())
               for pair_g, pair_w in zip(got, kv, strict=True) for g, w in zip(pair_g, pair_w, strict=True))


def _fail_under(monkeypatch, root: Path, call: str, err: int) -> None:
    """``os.<call>`` fails with ``err`` for files under ``root`` (a full disk, a read-only mount), and only there."""
    real = getattr(os, call)
    root = root.resolve()

    def target(first) -> Path:
        if isinstance(first, int):  # a file descriptor: what it is open on
            return Path(os.readlink(f"/proc/self/fd/{first}"))
        return Path(first).resolve()

    def fake(first, *args, **kwargs):
        if target(first).is_relative_to(root):
            raise OSError(err, os.strerror(err))
        return real(first, *args, **kwargs)

    monkeypatch.setattr(os, call, fake)


# -- 1. a full disk -----------------------------------------------------------------------------------------------
def test_a_full_disk_is_a_typed_error_and_leaves_no_partial_file(tmp_path, monkeypatch, caplog):
    """ENOSPC was a raw OSError (the engine heard "ingest failed: OSError", the log got a traceback) and left the
    partial ``.tmp`` file behind, uncounted by used_bytes, until the next start."""
    root = tmp_path / "kv"
    s = LocalChunkStore(root, 1 << 20)
    s.put("aa.src", b"x" * 1000)
    used = s.used_bytes
    _fail_under(monkeypatch, root, "write", errno.ENOSPC)
    for _ in range(2):
        with pytest.raises(StoreFullError, match=rf"no space left on the device of {root} \(kv.directory\)"):
            s.put("bb.src", b"y" * 5000)
    assert not list(root.rglob("*.tmp")) and not s.contains("bb.src") and s.used_bytes == used
    assert len([r for r in caplog.records if "cannot write bb.src" in r.getMessage()]) == 1  # once a minute
    monkeypatch.undo()
    s.put("bb.src", b"y" * 5000)  # room again: the store works on
    assert s.get("bb.src") == b"y" * 5000
    s.close()


def test_a_level_the_full_disk_cannot_keep_is_still_sent(tmp_path, monkeypatch):
    """A context stored before the disk filled failed to fetch ("store failure: OSError"): its level's encode was
    stored first. A level is a cache (the docs: a level the capacity cannot keep is still sent)."""
    root = tmp_path / "kv"
    svc = KVService(LocalChunkStore(root, 64 << 20), chunk_tokens=CHUNK)
    ids = list(range(2 * CHUNK))
    kv = make_kv(len(ids), 3)
    hashes = svc.ingest_sync(MODEL, ids, kv)
    _fail_under(monkeypatch, root, "write", errno.ENOSPC)
    try:
        res, _ = run(_fetch(svc, ids, deadline_ms=5000, controller="fixed-L3"))
        assert res.report.levels == ["high", "high"] and res.prefix_kv()[1] == len(ids)
        assert not any(svc.store.contains(object_key(h, "high")) for h in hashes)  # sent, not kept
        with pytest.raises(StoreFullError, match="no space left"):
            svc.ingest_sync(MODEL, list(range(500, 500 + CHUNK)), make_kv(CHUNK, 4))
    finally:
        svc.close()


def test_a_put_on_a_full_disk_tells_the_engine_why(tmp_path, monkeypatch):
    svc = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=CHUNK)
    sock = tmp_path / "ingest.sock"
    _fail_under(monkeypatch, tmp_path / "kv", "write", errno.ENOSPC)

    async def go():
        srv = await serve_kv_ingest(sock, svc)
        try:
            loop = asyncio.get_running_loop()
            with pytest.raises(KVIngestError, match=r"^KV store full: no space left on the device of "):
                await loop.run_in_executor(None, lambda: put_kv_unix(sock, MODEL, list(range(40)), make_kv(40)))
        finally:
            srv.close()

    try:
        run(go())
    finally:
        svc.close()


# -- 2. a read-only store -----------------------------------------------------------------------------------------
def test_a_read_only_store_serves_its_hits(tmp_path, monkeypatch, caplog):
    """Every hit failed: the LRU touch (os.utime) caught FileNotFoundError only, EROFS went up to the fetch."""
    root = tmp_path / "kv"
    svc = KVService(LocalChunkStore(root, 64 << 20), chunk_tokens=CHUNK)
    ids = list(range(2 * CHUNK))
    svc.ingest_sync(MODEL, ids, make_kv(len(ids), 5), prewarm=["high"])
    _fail_under(monkeypatch, root, "utime", errno.EROFS)
    try:
        for _ in range(2):
            res, _ = run(_fetch(svc, ids, deadline_ms=5000, controller="fixed-L3"))
            assert res.report.levels == ["high", "high"]
        assert svc.encodes == 2  # read, never encoded again
        assert len([r for r in caplog.records if "cannot record an object's use" in r.getMessage()]) == 1
    finally:
        svc.close()


def test_a_corrupt_object_on_a_read_only_store_is_a_miss(tmp_path, monkeypatch):
    """The corrupt object's unlink raised EROFS: the fetch failed instead of missing."""
    root = tmp_path / "kv"
    s = LocalChunkStore(root, 1 << 20)
    s.put("cc.low", b"z" * 100)
    path = root / "cc" / "cc.low"
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    _fail_under(monkeypatch, root, "unlink", errno.EROFS)
    assert s.get("cc.low") is None and s.stats.corrupt == 1
    with pytest.raises(StoreError, match="Read-only file system"):  # one typed line, not a raw OSError
        s.delete("cc.src")
    s.close()


# -- 3. another tokenwire version ---------------------------------------------------------------------------------
def _other_version(payload: bytes) -> bytes:
    """An object as a later version might write it: another version number, and a longer header than ours."""
    blob = bytearray(wrap(payload))
    blob[4] = kv_store.VERSION + 1
    return bytes(blob[:20] + bytes(8) + blob[20:])


def test_an_object_of_another_version_is_a_miss_left_in_place(make_store, tmp_path):  # noqa: F811
    """A newer daemon's object was deleted as corrupt by an older one on the same Redis (a rolling upgrade)."""
    s = make_store()
    s.put("dd.src", b"ours")
    if make_store.kind == "local":
        path = tmp_path / "store" / "dd" / "dd.src"
        path.write_bytes(_other_version(b"theirs"))
    else:
        s._r.set(s._k("dd.src"), _other_version(b"theirs"))
    assert s.get("dd.src") is None and s.get("dd.src") is None
    assert s.contains("dd.src") and s.stats.corrupt == 0 and s.stats.foreign == 2
    if make_store.kind == "local":  # the start's recovery agrees with the read: kept, and counted
        s.close()
        again = make_store()
        assert again.contains("dd.src") and again.stats.recovered_partial == 0 and again.used_bytes > 0
        assert again.get("dd.src") is None and path.exists()


def test_metadata_this_version_cannot_read_is_a_miss_for_its_chunk(tmp_path):
    """A field renamed by another version made ChunkMeta.unpack raise INTERNAL through every fetch, a prefix
    fetch's earlier chunks with it ("unreadable chunk metadata: 'ids'")."""
    store = LocalChunkStore(tmp_path / "kv", 64 << 20)
    svc = KVService(store, chunk_tokens=CHUNK)
    ids = list(range(3 * CHUNK))
    hashes = svc.ingest_sync(MODEL, ids, make_kv(len(ids), 6))
    key = object_key(hashes[1], "meta")
    meta = msgpack.unpackb(store.get(key))
    meta["tokens"] = meta.pop("ids")
    store.put(key, msgpack.packb(meta))
    fresh = KVService(store, chunk_tokens=CHUNK)  # (nothing cached: as after a restart)
    with pytest.raises(KVNotFound, match="1 of 3 chunks found"):
        fresh.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids))
    plan = fresh.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids, prefix=True))
    assert plan.token_counts == [CHUNK] and plan.rest_tokens == 2 * CHUNK
    assert store.contains(key)  # left for the version that reads it
    svc.close()


# -- 4. two daemons on one Redis ----------------------------------------------------------------------------------
def test_put_if_stores_only_while_the_guard_holds(make_store):  # noqa: F811
    s = make_store()
    s.put("ee.meta", b"M1")
    assert s.put_if("ee.low", b"L1", guard="ee.meta", expected=b"M1") and s.get("ee.low") == b"L1"
    s.put("ee.meta", b"M2")
    assert not s.put_if("ee.high", b"L", guard="ee.meta", expected=b"M1") and not s.contains("ee.high")
    s.delete("ee.meta")
    assert not s.put_if("ee.high", b"L", guard="ee.meta", expected=b"M2") and not s.contains("ee.high")


def _two_daemons(url: str) -> tuple[KVService, KVService]:
    prefix = f"tw-race-{uuid.uuid4().hex}:"
    return (KVService(RedisChunkStore(url, 64 << 20, prefix=prefix), chunk_tokens=CHUNK),
            KVService(RedisChunkStore(url, 64 << 20, prefix=prefix), chunk_tokens=CHUNK))


def test_a_level_encoded_from_a_replaced_source_is_never_stored(redis_url, monkeypatch):  # noqa: F811
    """B encoded a level from the old source while A replaced the chunk, then stored it under A's new metadata;
    a re-put with that metadata kept it, so the context never fetched again (3 runs in 4 of the probe's)."""
    a, b = _two_daemons(redis_url)
    ids = list(range(CHUNK))
    v1, v2 = make_kv(CHUNK, 1), make_kv(CHUNK, 2)
    (h,) = a.ingest_sync(MODEL, ids, v1, fingerprint=1)
    real = codec.encode_chunk

    def encode_then_replace(*args, **kwargs):
        out = real(*args, **kwargs)
        monkeypatch.setattr(codec, "encode_chunk", real)
        a.ingest_sync(MODEL, ids, v2, fingerprint=2)  # A's re-put lands while B encodes
        return out

    monkeypatch.setattr(codec, "encode_chunk", encode_then_replace)
    try:
        assert _max_error(b.encoded_sync(h, "high"), v1) < 0.5  # B's fetch gets the KV it read: consistent
        assert not b.store.contains(object_key(h, "high"))  # ...but it is not kept under A's metadata
        a.ingest_sync(MODEL, ids, v2, fingerprint=2)  # the engine puts it again: identical, kept
        assert _max_error(b.encoded_sync(h, "high"), v2) < 0.5
        assert _max_error(b.store.get(object_key(h, "high")), v2) < 0.5
    finally:
        a.close()
        b.close()


def test_a_source_replaced_between_its_reads_is_not_sent_under_the_old_metadata(redis_url, monkeypatch):  # noqa: F811
    """B read the old metadata, then A's new source: the new KV was encoded and sent under the old fingerprint,
    which no check of the client's could tell from the right KV."""
    a, b = _two_daemons(redis_url)
    ids = list(range(CHUNK))
    (h,) = a.ingest_sync(MODEL, ids, make_kv(CHUNK, 1), fingerprint=1)
    real_get = b.store.get

    def get_then_replace(key):
        out = real_get(key)
        if key == object_key(h, "src"):
            monkeypatch.setattr(b.store, "get", real_get)
            a.ingest_sync(MODEL, ids, make_kv(CHUNK, 2), fingerprint=2)
        return out

    monkeypatch.setattr(b.store, "get", get_then_replace)
    try:
        with pytest.raises(KVNotFound, match="stored again with other KV during this fetch"):
            b.encoded_sync(h, "high")
        assert not b.store.contains(object_key(h, "high"))
    finally:
        a.close()
        b.close()


# -- 5. a Redis that evicts or is full ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    """A Redis of this module's own, since its tests change its configuration (maxmemory, policy, ACL users)."""
    with redis_server(tmp_path_factory.mktemp("redis-own")) as (client, url):
        yield client, url


def _warnings(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


def test_a_redis_policy_that_evicts_tokenwire_keys_is_a_warning_at_start(own_redis, caplog):
    """Under allkeys-lru Redis evicted tokenwire's size hash, total and recency sets: usage overstated by 79 %,
    objects no longer tracked never evicted; nothing said so."""
    client, url = own_redis
    try:
        client.config_set("maxmemory-policy", "allkeys-lru")
        RedisChunkStore(url, 1 << 20, prefix="tw-pol:").close()
        (line,) = _warnings(caplog, "maxmemory-policy")
        assert "allkeys-lru" in line and "set maxmemory-policy noeviction" in line
        caplog.clear()
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", str(10 << 20))
        RedisChunkStore(url, 1 << 20, prefix="tw-pol:").close()
        assert not _warnings(caplog, "KV store")
        RedisChunkStore(url, 64 << 20, prefix="tw-pol:").close()  # a capacity Redis cannot hold
        (line,) = _warnings(caplog, "below kv.capacity_mb")
        assert "maxmemory 10 MiB" in line and "Redis is full (maxmemory)" in line
    finally:
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", "0")


def test_a_redis_that_refuses_config_is_not_checked_and_still_used(own_redis, caplog):
    client, url = own_redis
    client.execute_command("ACL", "SETUSER", "tw-noconfig", "on", ">pw", "~*", "+@all", "-config")
    try:
        client.config_set("maxmemory-policy", "allkeys-lru")  # (not seen by that user)
        s = RedisChunkStore(url.replace("//", "//tw-noconfig:pw@"), 1 << 20, prefix="tw-acl:")
        s.put("ff.src", b"ok")
        assert s.get("ff.src") == b"ok" and not _warnings(caplog, "KV store")
        s.close()
    finally:
        client.config_set("maxmemory-policy", "noeviction")
        client.execute_command("ACL", "DELUSER", "tw-noconfig")


def test_a_full_redis_says_full_and_its_stored_contexts_are_still_served(own_redis):
    """A Redis at its maxmemory (noeviction) was "KV store unavailable (Redis OutOfMemoryError)", and every hit
    failed too (the recency update is a write)."""
    client, url = own_redis
    svc = KVService(RedisChunkStore(url, 64 << 20, prefix=f"tw-full-{uuid.uuid4().hex}:"), chunk_tokens=CHUNK)
    ids = list(range(2 * CHUNK))
    kv = make_kv(len(ids), 7)
    hashes = svc.ingest_sync(MODEL, ids, kv, prewarm=["low"])
    client.config_set("maxmemory", "1")  # full: every write that needs memory is refused
    try:
        with pytest.raises(StoreFullError, match=r"^KV store full: Redis is full \(maxmemory\)$"):
            svc.ingest_sync(MODEL, list(range(900, 900 + CHUNK)), make_kv(CHUNK, 8))
        assert svc.encoded_sync(hashes[0], "low")  # a hit, its LRU touch refused
        assert _max_error(svc.encoded_sync(hashes[1], "high"), kv, CHUNK) < 0.5  # encoded, sent, not kept
        assert not svc.store.contains(object_key(hashes[1], "high"))
    finally:
        client.config_set("maxmemory", "0")
        svc.close()


# -- 6. objects removed without a trace ---------------------------------------------------------------------------
def _collected(svc: KVService) -> dict[str, float]:
    guard = SimpleNamespace(refused={}, retrying_since=None)
    server = SimpleNamespace(stats={}, guard=guard, ecn_unvalidated=lambda: 0, path_changes=lambda: 0)
    collector = _KVCollector(SimpleNamespace(server=server, service=svc))
    return {s.name: s.value for family in collector.collect() for s in family.samples}


def test_objects_removed_at_start_are_a_log_line_and_a_metric(tmp_path, caplog):
    """Truncated objects and partial writes were deleted at start with no log line and in no metric."""
    root = tmp_path / "kv"
    svc = KVService(LocalChunkStore(root, 64 << 20), chunk_tokens=CHUNK)
    ids = list(range(2 * CHUNK))
    hashes = svc.ingest_sync(MODEL, ids, make_kv(len(ids)), prewarm=["low"])
    svc.close()
    for h in hashes:
        os.truncate(root / h[:2] / object_key(h, "src"), 100)  # a crash, a full disk
    (root / hashes[0][:2] / f"{object_key(hashes[0], 'low')}.1.2.tmp").write_bytes(MAGIC)
    svc = KVService(LocalChunkStore(root, 64 << 20), chunk_tokens=CHUNK)
    try:
        (line,) = _warnings(caplog, "at start")
        assert f"KV store {root}: removed 3 partial or truncated objects at start" in line
        assert _collected(svc)["tokenwire_kv_store_recovered_total"] == 3
    finally:
        svc.close()


def test_corrupt_objects_deleted_at_runtime_are_logged_at_most_once_a_minute(tmp_path, caplog):
    root = tmp_path / "kv"
    s = LocalChunkStore(root, 1 << 20)
    for k in ("g1.low", "g2.low"):
        s.put(k, b"v" * 50)
        path = root / k[:2] / k
        path.write_bytes(path.read_bytes()[:-1] + b"!")
    assert s.get("g1.low") is None and s.get("g2.low") is None and s.stats.corrupt == 2
    (line,) = _warnings(caplog, "failed its checksum")
    assert f"KV store {root}: g1.low failed its checksum and was deleted" in line
    s.close()


def test_report_every_lets_one_line_through_per_interval_and_counts_the_rest():
    now = [0.0]
    every = ReportEvery(60.0, clock=lambda: now[0])
    assert every.due() == 0 and every.due() is None and every.due() is None
    now[0] = 59.0
    assert every.due() is None
    now[0] = 60.0
    assert every.due() == 3 and every.due() is None

