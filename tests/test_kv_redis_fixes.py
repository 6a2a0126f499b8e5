"""Fixes from a probe of two daemons sharing one Redis KV store: a source under another put's metadata (served as
the wrong KV, or a reshape's RuntimeError on every fetch), a password with '@' in the log, redis URLs that
config check let through, evictions counted twice, a password-protected Redis's raw error, and daemons that
disagree on kv.chunk_tokens or kv.capacity_mb."""

from __future__ import annotations

import dataclasses
import functools
import logging
import uuid

import msgpack  # type: ignore[import-untyped]
import pytest

from tests.test_cli_fixes2 import _config
from tests.test_kv_channel import CHUNK, MODEL, make_kv
from tests.test_kv_ingest_fixes3 import _rot
from tests.test_kv_store import make_store, redis_server, redis_url  # noqa: F401  (the fixtures)
from tokenwire.daemon import kv_store_redis
from tokenwire.daemon.config import ConfigError, load_config
from tokenwire.daemon.kv_config import KVConfig
from tokenwire.daemon.kv_meta import ChunkMeta, source_id
from tokenwire.daemon.kv_runtime import open_store
from tokenwire.daemon.kv_service import KVService
from tokenwire.daemon.kv_store import StoreError, object_key
from tokenwire.daemon.kv_store_local import LocalChunkStore
from tokenwire.daemon.kv_store_redis import RedisChunkStore
from tokenwire.daemon.logs import shown_url
from tokenwire.transport.cachegen.codec import decode_chunk
from tokenwire.transport.frames import KvFetch
from tokenwire.transport.kv_channel import KVError, KVNotFound


def _error(payload: bytes, kv, first: int = 0) -> float:
    """Largest error of an encoded chunk against ``kv``'s tokens from ``first`` (one chunk of them)."""
    got = decode_chunk(payload)
    return max(float((g.float() - w[:, :, first : first + CHUNK].float()).abs().max())
               for pair_g, pair_w in zip(got, kv, strict=True) for g, w in zip(pair_g, pair_w, strict=True))


def _two_daemons(url: str) -> tuple[KVService, KVService]:
    """Two services on one Redis store, each with its own client: two daemons, as far as the store can tell."""
    prefix = f"tw-fixes-{uuid.uuid4().hex}:"
    return (KVService(RedisChunkStore(url, 64 << 20, prefix=prefix), chunk_tokens=CHUNK),
            KVService(RedisChunkStore(url, 64 << 20, prefix=prefix), chunk_tokens=CHUNK))


def _race(monkeypatch, a: KVService, b: KVService, ids, kv_a, kv_b, **b_kw) -> str:
    """A puts ``kv_a`` (fingerprint 111) while B puts the same tokens with ``kv_b``: B's whole put lands between
    A's source and A's metadata (the probe's interleaving), leaving B's source under A's metadata. The hash."""
    real_put = a.store.put

    def put_then_other_daemon(key: str, data: bytes) -> None:
        real_put(key, data)
        if key.endswith(".src"):
            monkeypatch.setattr(a.store, "put", real_put)
            b.ingest_sync(MODEL, ids, kv_b, **b_kw)

    monkeypatch.setattr(a.store, "put", put_then_other_daemon)
    (h,) = a.ingest_sync(MODEL, ids, kv_a, fingerprint=111)
    assert msgpack.unpackb(a.store.get(object_key(h, "meta")))["fp"] == 111  # A's metadata, B's source
    return h


# -- 1. one put's source under another put's metadata -------------------------------------------------------------
def test_a_source_under_another_puts_metadata_is_a_miss_and_a_re_put_repairs_it(redis_url, monkeypatch):  # noqa: F811
    """The probe's t3: after the race a re-put of A said ok, every chunk's metadata read A's fingerprint, and the
    fetch served B's KV for a chunk (error 5.9 against A's KV where the level's own is ~0.15)."""
    a, b = _two_daemons(redis_url)
    ids = list(range(CHUNK))
    kv_a, kv_b = make_kv(CHUNK, 1), make_kv(CHUNK, 2)
    try:
        h = _race(monkeypatch, a, b, ids, kv_a, kv_b, fingerprint=222)
        fetch = KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids)
        plan = b.resolve_sync(fetch)
        with pytest.raises(KVNotFound, match="another put's"):  # never B's KV under A's fingerprint
            b.chunk_sync(plan, 0, "high")
        assert b.store.stats.mismatched == 1 and b.store.stats.unsourced == 1
        assert not b.store.contains(object_key(h, "meta")) and not b.store.contains(object_key(h, "high"))
        with pytest.raises(KVNotFound, match="0 of 1 chunks found"):  # now a plain miss
            b.resolve_sync(fetch)
        a.ingest_sync(MODEL, ids, kv_a, fingerprint=111)  # A's engine puts it again: replaced, not kept
        plan = b.resolve_sync(fetch)
        assert plan.fingerprint == 111 and _error(b.chunk_sync(plan, 0, "high"), kv_a) < 0.5
    finally:
        a.close()
        b.close()


def test_a_re_put_never_keeps_a_source_that_is_not_its_metadatas(redis_url, monkeypatch):  # noqa: F811
    """The re-put came straight after the race (no fetch in between): it checked the source's CRC only, kept B's
    source under A's metadata, and said ok."""
    a, b = _two_daemons(redis_url)
    ids = list(range(CHUNK))
    kv_a, kv_b = make_kv(CHUNK, 1), make_kv(CHUNK, 2)
    try:
        h = _race(monkeypatch, a, b, ids, kv_a, kv_b, fingerprint=222)
        a.ingest_sync(MODEL, ids, kv_a, fingerprint=111)
        plan = b.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids))
        assert plan.fingerprint == 111 and _error(b.chunk_sync(plan, 0, "high"), kv_a) < 0.5  # A's KV, not B's
        meta = ChunkMeta.unpack(a.store.get(object_key(h, "meta")))
        assert meta.fingerprint == 111 and meta.source == source_id(a.store.get(object_key(h, "src")))
        assert a.store.stats.mismatched == 1
    finally:
        a.close()
        b.close()


# -- 2. a source of another length under the metadata -------------------------------------------------------------
def test_an_other_dtypes_source_under_the_metadata_is_a_miss_not_a_reshape_error(redis_url, monkeypatch):  # noqa: F811
    """t12: an fp16 source under fp32 metadata: every fetch was INTERNAL "store failure: RuntimeError" with a
    traceback (the reshape), and B's re-put of its fp32 context said ok without repairing it."""
    a, b = _two_daemons(redis_url)
    ids = list(range(CHUNK))
    kv_a = [(k.float(), v.float()) for k, v in make_kv(CHUNK, 1)]  # fp32
    kv_b = make_kv(CHUNK, 2)  # fp16
    try:
        h = _race(monkeypatch, a, b, ids, kv_a, kv_b)
        fetch = KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids)
        plan = b.resolve_sync(fetch)
        with pytest.raises(KVNotFound, match="holds 16384 bytes where its metadata's float32"):
            b.chunk_sync(plan, 0, "medium")
        a.ingest_sync(MODEL, ids, kv_a, fingerprint=111)
        plan = b.resolve_sync(fetch)
        assert plan.dtype == "float32" and _error(b.chunk_sync(plan, 0, "high"), kv_a) < 0.5
        assert b.store.contains(object_key(h, "high"))
    finally:
        a.close()
        b.close()


def test_a_source_that_does_not_encode_is_a_miss_not_a_store_failure(tmp_path, monkeypatch):
    """Any codec or shape failure on a stored chunk was INTERNAL "store failure: <Error>" on every fetch."""
    svc = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=CHUNK)
    ids = list(range(2 * CHUNK))
    kv = make_kv(len(ids))
    hashes = svc.ingest_sync(MODEL, ids, kv)
    fetch = KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids, prefix=True)
    plan = svc.resolve_sync(fetch)

    def broken(*args, **kwargs):
        raise RuntimeError("shape '[4, 2, 64, 32]' is invalid for input of size 8192")

    monkeypatch.setattr("tokenwire.transport.cachegen.codec.encode_chunk", broken)
    with pytest.raises(KVNotFound, match=r"does not encode \(RuntimeError"):
        svc.chunk_sync(plan, 1, "low")
    monkeypatch.undo()
    assert not svc.store.contains(object_key(hashes[1], "meta"))
    assert svc.resolve_sync(fetch).token_counts == [CHUNK]  # a prefix miss at it, until put again
    svc.ingest_sync(MODEL, ids, kv)
    assert svc.resolve_sync(fetch).token_counts == [CHUNK, CHUNK]
    svc.close()


def test_metadata_without_a_source_identity_is_a_miss_left_in_place_and_replaced_by_a_put(make_store):  # noqa: F811
    """Metadata written before this version cannot prove its source its own: a miss, as another version's
    metadata is (left in place for the daemon that wrote it), and the next put replaces the chunk."""
    store = make_store(capacity=64 << 20)
    svc = KVService(store, chunk_tokens=CHUNK)
    ids = list(range(CHUNK))
    kv = make_kv(CHUNK)
    (h,) = svc.ingest_sync(MODEL, ids, kv, prewarm=["low"])
    old = msgpack.unpackb(store.get(object_key(h, "meta")))
    del old["src"]
    store.put(object_key(h, "meta"), msgpack.packb(old))
    fresh = KVService(store, chunk_tokens=CHUNK)  # (nothing cached: as after an upgrade)
    fetch = KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids)
    with pytest.raises(KVNotFound, match="0 of 1 chunks found"):
        fresh.resolve_sync(fetch)
    assert store.contains(object_key(h, "meta")) and store.contains(object_key(h, "low"))
    fresh.ingest_sync(MODEL, ids, kv)
    assert not store.contains(object_key(h, "low"))  # replaced whole: levels of unproven provenance went
    assert ChunkMeta.unpack(store.get(object_key(h, "meta"))).source is not None
    plan = fresh.resolve_sync(fetch)
    assert _error(fresh.chunk_sync(plan, 0, "high"), kv) < 0.5
    svc.close()


def test_a_re_put_of_the_same_context_keeps_what_is_stored(make_store):  # noqa: F811
    """The identity is left out of the comparison: a re-put of the same metadata keeps the chunk (and its
    levels), as before; only its source is read back and checked."""
    store = make_store(capacity=64 << 20)
    svc = KVService(store, chunk_tokens=CHUNK)
    ids = list(range(3 * CHUNK))
    kv = make_kv(len(ids))
    hashes = svc.ingest_sync(MODEL, ids, kv, prewarm=["medium"])
    puts = store.stats.puts
    svc.ingest_sync(MODEL, ids, kv)
    assert store.stats.puts == puts and store.stats.mismatched == 0
    assert all(store.contains(object_key(h, "medium")) for h in hashes)
    meta = ChunkMeta.unpack(store.get(object_key(hashes[0], "meta")))
    assert meta.source == source_id(store.get(object_key(hashes[0], "src")))
    svc.close()


# -- 3. a password with '@' ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:x@TopSecretPart@127.0.0.1:53760/0", "redis://***@127.0.0.1:53760/0"),
    ("redis://user:p@ss@w@rd@redis:6379/0", "redis://***@redis:6379/0"),
    ("unix://:p@ss@/run/redis/redis.sock", "unix://***@/run/redis/redis.sock"),
    ("http://u:p@ss@127.0.0.1:9/v1/chat/completions?x=a@b", "http://***@127.0.0.1:9/v1/chat/completions?x=a@b"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
])
def test_a_password_with_an_at_sign_is_masked_whole(url, shown):
    """Masked up to the first '@': "Redis at redis://***@TopSecretPart@127.0.0.1:53760/0 failed" (redis-py, as
    urllib, reads the password up to the last '@' of the host part)."""
    assert shown_url(url) == shown


# -- 4. redis URLs config check let through -----------------------------------------------------------------------
@pytest.mark.parametrize(("url", "words"), [
    ("redis://", "no host in the URL"),
    ("redis://:secret@/0", "no host in the URL"),
    ("redis://127.0.0.1:6379/abc", "the path must be a database number"),
    ("redis://127.0.0.1:6379/0?socket_timeout=1", "no ?query or #fragment"),
    ("rediss://127.0.0.1:6379/0#x", "no ?query or #fragment"),
])
def test_a_redis_url_the_client_would_read_otherwise_is_a_config_error(tmp_path, url, words):
    """`redis://` used localhost:6379, `/abc` db 0, both silently, and `?socket_timeout=1` overrode the daemon's
    own timeout; the README says config check refuses "no host" and "a query"."""
    with pytest.raises(ConfigError, match=r"kv\.redis_url: ") as caught:
        load_config(_config(tmp_path, f'[kv]\nbackend = "redis"\nredis_url = "{url}"\n'))
    assert words in str(caught.value) and "secret" not in str(caught.value), caught.value


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379", "redis://h/", "redis://h:6379/15", "rediss://u:p@h/%31",
                                 "unix:///run/redis/redis.sock?db=2"])
def test_a_good_redis_url_still_loads(tmp_path, url):
    cfg = load_config(_config(tmp_path, f'[kv]\nbackend = "redis"\nredis_url = "{url}"\n'))
    assert cfg.kv.redis_url == url


# -- 6. evictions counted twice -----------------------------------------------------------------------------------
def test_an_eviction_counts_only_what_this_daemon_deleted(redis_url, monkeypatch):  # noqa: F811
    """Two daemons evicting at once both counted the victims the other had already deleted (351 counted, 340
    deleted)."""
    prefix = f"tw-evict-{uuid.uuid4().hex}:"
    a = RedisChunkStore(redis_url, 4 * 120 + 10, prefix=prefix)
    b = RedisChunkStore(redis_url, 4 * 120 + 10, prefix=prefix)
    try:
        for key in ("a1.low", "a2.low", "a3.src", "a4.src"):
            a.put(key, bytes(100))
        real = a._victims

        def other_daemon_first(keep: str, excess: int) -> list[str]:
            victims = real(keep, excess)
            b.delete(victims[0])  # the other daemon's eviction got there first
            return victims

        monkeypatch.setattr(a, "_victims", other_daemon_first)
        a.put("a5.low", bytes(200))  # two levels go
        assert not a.contains("a1.low") and not a.contains("a2.low")
        assert a.stats.evictions == 1
    finally:
        a.close()
        b.close()


# -- 7. a Redis that wants a password -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory):
    """A Redis of this module's own with a password (requirepass), set through the client once it answers."""
    with redis_server(tmp_path_factory.mktemp("redis-auth")) as (client, url):
        client.config_set("requirepass", "s3cret")
        yield url


def test_a_redis_that_wants_a_password_says_so_and_where_it_goes(locked_redis):
    """It was Redis' own words only: "HELLO must be called with the client already authenticated, otherwise the
    HELLO AUTH <user> <pass> option can be used...", naming neither the password nor kv.redis_url."""
    with pytest.raises(StoreError) as caught:
        RedisChunkStore(locked_redis, 1 << 20)
    said = str(caught.value)
    assert said.startswith(f"the Redis store at {locked_redis} requires a password: put it in kv.redis_url ("), said
    assert "Redis said: " in said  # its own reason after ours
    wrong = locked_redis.replace("redis://", "redis://:wrong@")
    with pytest.raises(StoreError, match=r"refused kv\.redis_url's user or password") as caught:
        RedisChunkStore(wrong, 1 << 20)
    assert "wrong" not in str(caught.value)
    RedisChunkStore(locked_redis.replace("redis://", "redis://:s3cret@"), 1 << 20, prefix="tw-auth:").close()


# -- 5. daemons that disagree on their settings -------------------------------------------------------------------
def test_daemons_sharing_a_store_with_other_settings_are_warned_at_start(redis_url, caplog, monkeypatch):  # noqa: F811
    """Puts through a daemon with chunk_tokens 128 were "0 of 4 chunks found" through one with 64, and a put through
    one with 1 MiB evicted the shared store from 1.9 MB to 1.0 MB; nothing said why."""
    prefix = f"tw-settings-{uuid.uuid4().hex}:"  # (this test's keys apart on the shared test Redis)
    monkeypatch.setattr(kv_store_redis, "RedisChunkStore", functools.partial(RedisChunkStore, prefix=prefix))
    first = KVConfig(enabled=True, backend="redis", redis_url=redis_url, chunk_tokens=64, capacity_bytes=4 << 20)
    other = dataclasses.replace(first, chunk_tokens=128, capacity_bytes=1 << 20)
    with caplog.at_level(logging.WARNING, logger="tokenwire.kv"):
        a = open_store(first)
        a.put("aa.src", bytes(1 << 20))
        a.put("bb.src", bytes(1 << 20))
        assert not _said(caplog, "other settings") and not _said(caplog, "over kv.capacity_mb")
        b = open_store(other)
        (line,) = _said(caplog, "other settings")
        assert "kv.chunk_tokens = 64 there, 128 here" in line and "kv.capacity_mb = 4 there, 1 here" in line
        (line,) = _said(caplog, "over kv.capacity_mb")
        assert "holds 2.0 MiB" in line
        caplog.clear()
        open_store(other).close()  # the same settings as the last daemon's: nothing to say
        assert not _said(caplog, "other settings")
    a.close()
    b.close()


def _said(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


# -- review of the above (/tmp/xp/s30/pR) ---------------------------------------------------------------------------
def test_a_re_put_with_other_kv_under_equal_metadata_replaces_a_chunk_whose_source_rotted(make_store):  # noqa: F811
    """The stored source is unreadable and the put's own KV is not the one the metadata names (an engine whose
    bytes differ run to run, under the same fingerprint): the chunk is replaced whole. Writing the put's source
    under the old metadata said ok, and the next fetch was a miss ("another put's")."""
    store = make_store(capacity=64 << 20)
    svc = KVService(store, chunk_tokens=CHUNK)
    ids = list(range(CHUNK))
    kv_a, kv_b = make_kv(CHUNK, 1), make_kv(CHUNK, 2)
    (h,) = svc.ingest_sync(MODEL, ids, kv_a, fingerprint=111)
    _rot(store, object_key(h, "src"))
    svc.ingest_sync(MODEL, ids, kv_b, fingerprint=111)
    meta = ChunkMeta.unpack(store.get(object_key(h, "meta")))
    assert meta.source == source_id(store.get(object_key(h, "src")))
    plan = svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids))
    assert _error(svc.chunk_sync(plan, 0, "high"), kv_b) < 0.5
    svc.close()


def test_metadata_another_daemon_writes_between_the_read_and_the_drop_is_kept(redis_url, monkeypatch):  # noqa: F811
    """B's fetch finds B's source under A's metadata and drops that metadata; meanwhile another daemon puts the
    chunk again (new metadata, its own source): the drop, one script that compares the metadata first, keeps it."""
    a, b = _two_daemons(redis_url)
    ids = list(range(CHUNK))
    kv_a, kv_b = make_kv(CHUNK, 1), make_kv(CHUNK, 2)
    try:
        h = _race(monkeypatch, a, b, ids, kv_a, kv_b, fingerprint=222)
        fetch = KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids)
        plan = b.resolve_sync(fetch)
        found = b.store.found_mismatched

        def put_again_before_the_drop(chunk: str, problem: str) -> None:
            found(chunk, problem)
            a.ingest_sync(MODEL, ids, kv_b, fingerprint=222)

        monkeypatch.setattr(b.store, "found_mismatched", put_again_before_the_drop)
        with pytest.raises(KVNotFound, match="another put's"):
            b.chunk_sync(plan, 0, "high")
        monkeypatch.setattr(b.store, "found_mismatched", found)
        assert b.store.stats.mismatched == 1 and b.store.stats.unsourced == 0  # nothing dropped
        assert ChunkMeta.unpack(b.store.get(object_key(h, "meta"))).fingerprint == 222
        plan = b.resolve_sync(fetch)
        assert plan.fingerprint == 222 and _error(b.chunk_sync(plan, 0, "high"), kv_b) < 0.5
    finally:
        a.close()
        b.close()


def test_metadata_with_a_source_identity_of_another_length_is_unreadable_and_left_in_place(make_store):  # noqa: F811
    """A source identity that is not 24 bytes (another version's, or damaged) is no identity of ours: the metadata
    is unreadable (a miss, left for the version that wrote it), never read as naming another put's source (then its
    first fetch deleted it as mismatched)."""
    store = make_store(capacity=64 << 20)
    svc = KVService(store, chunk_tokens=CHUNK)
    ids = list(range(CHUNK))
    (h,) = svc.ingest_sync(MODEL, ids, make_kv(CHUNK))
    doc = msgpack.unpackb(store.get(object_key(h, "meta")))
    doc["src"] = doc["src"][:16]
    with pytest.raises(KVError, match="source identity out of range"):
        ChunkMeta.unpack(msgpack.packb(doc))
    store.put(object_key(h, "meta"), msgpack.packb(doc))
    fresh = KVService(store, chunk_tokens=CHUNK)  # (nothing cached)
    with pytest.raises(KVNotFound, match="0 of 1 chunks found"):
        fresh.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids))
    assert store.contains(object_key(h, "meta")) and store.stats.mismatched == 0
    svc.close()
