"""The chunk store contract, run against the local directory store and a real Redis server."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tokenwire.daemon.kv_store import StoreError, chunk_hashes, object_key, unwrap, wrap
from tokenwire.daemon.kv_store_local import LocalChunkStore
from tokenwire.daemon.kv_store_redis import RedisChunkStore


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[tuple[Any, str]]:
    """A redis-server of the test's own on a free loopback port, storing nothing on disk: (a client, its URL) once
    it answers; stopped at the end. Skips the test where redis-server is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port)
    try:
        for _ in range(200):  # (it answers within ~50 ms; the loop only bounds a server that never starts)
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.02)
        yield client, f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    url = os.environ.get("TOKENWIRE_TEST_REDIS_URL")
    if url:
        yield url
        return
    with redis_server(tmp_path_factory.mktemp("redis")) as (_, url):
        yield url


@pytest.fixture(params=["local", "redis"])
def make_store(request, tmp_path):
    created = []

    def make(capacity=10_000, root=None):
        if request.param == "local":
            s = LocalChunkStore(root or tmp_path / "store", capacity)
        else:
            url = request.getfixturevalue("redis_url")
            prefix = getattr(make, "prefix", None) or f"test:{uuid.uuid4().hex}:"
            make.prefix = prefix
            s = RedisChunkStore(url, capacity, prefix=prefix)
        created.append(s)
        return s

    make.kind = request.param
    yield make
    for s in created:
        s.close()


def test_round_trip_and_miss(make_store):
    s = make_store()
    s.put("aa.L1", b"hello")
    assert s.get("aa.L1") == b"hello" and s.contains("aa.L1")
    assert s.get("bb.L1") is None
    assert s.stats.hits == 1 and s.stats.misses == 1
    assert s.contains_many(["bb.L1", "aa.L1", "cc.L1"]) == [False, True, False] and s.contains_many([]) == []


def test_eviction_is_least_recently_used_and_bounded(make_store):
    s = make_store(capacity=3 * (100 + 20) + 10)  # room for three 100-byte objects with envelopes
    for k in ("a1", "a2", "a3"):
        s.put(f"{k}.L1", bytes(100))
    assert s.get("a1.L1") is not None  # a1 is now the most recent
    s.put("a4.L1", bytes(100))
    assert s.get("a2.L1") is None  # the least recently used went
    assert all(s.get(f"{k}.L1") is not None for k in ("a1", "a3", "a4"))
    assert s.used_bytes <= s.capacity_bytes and s.stats.evictions == 1


def test_eviction_takes_encoded_levels_first_then_whole_chunks(make_store):
    """Plain per-object LRU let a fetch's own encodings evict its context's sources and metadata (orphans)."""
    obj = 100 + 20  # 100-byte payload in its envelope
    s = make_store(capacity=6 * obj + 10)
    for key in ("a.src", "a.meta", "b.src", "b.meta", "b.low", "c.src"):
        s.put(key, bytes(100))
    s.put("c.meta", bytes(100))  # over by one object: the oldest *encoded level* goes, not a's source
    assert not s.contains("b.low")
    assert all(s.contains(k) for k in ("a.src", "a.meta", "b.src", "b.meta", "c.src", "c.meta"))
    s.put("c.low", bytes(100))  # no other level to take: the new level itself goes, never a source
    assert not s.contains("c.low")
    assert all(s.contains(k) for k in ("a.src", "a.meta", "b.src", "b.meta", "c.src", "c.meta"))
    s.put("d.src", bytes(100))  # an ingest: the least recently used whole chunk goes
    assert not s.contains("a.src") and not s.contains("a.meta")  # together: never one without the other
    assert all(s.contains(k) for k in ("b.src", "b.meta", "c.src", "c.meta", "d.src"))
    assert s.used_bytes <= s.capacity_bytes


def test_a_chunk_in_use_outlives_an_idle_one(make_store):
    """Chunks were ranked by their least recently used object, the metadata nobody reads again after ingest,
    so the context fetched over and over went before an idle one."""
    obj = 100 + 20
    s = make_store(capacity=4 * obj + 10)
    for key in ("hot.meta", "hot.src", "idle.meta", "idle.src"):
        s.put(key, bytes(100))
    assert s.get("hot.src") is not None  # a fetch reads it (its metadata stays untouched)
    s.put("new.src", bytes(100))
    assert s.contains("hot.src") and s.contains("hot.meta")
    assert not s.contains("idle.src") and not s.contains("idle.meta")


def test_object_larger_than_capacity_is_refused(make_store):
    s = make_store(capacity=50)
    with pytest.raises(StoreError, match="exceeds"):
        s.put("big.L1", bytes(100))


def test_invalid_keys_are_refused(make_store):
    s = make_store()
    for bad in ("../etc.passwd", "a/b", "", "x" * 300):
        with pytest.raises(StoreError):
            s.put(bad, b"x")


def test_corrupted_object_is_never_served(make_store, tmp_path):
    s = make_store()
    s.put("cc.L2", b"precious bytes")
    if make_store.kind == "local":
        path = tmp_path / "store" / "cc" / "cc.L2"
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        s._r.set(s._k("cc.L2"), b"TWKC garbage")
    assert s.get("cc.L2") is None
    assert s.stats.corrupt == 1 and not s.contains("cc.L2")  # deleted, so it is re-encoded next time


def test_concurrent_readers_see_whole_objects(make_store):
    s = make_store(capacity=1 << 22)
    versions = [bytes([v]) * 50_000 for v in range(8)]
    s.put("dd.L1", versions[0])
    seen, errors = set(), []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            got = s.get("dd.L1")
            if got is not None:
                if got not in versions:
                    errors.append(len(got))
                seen.add(got[0])

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for v in versions[1:]:
        s.put("dd.L1", v)
    time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    assert not errors and seen  # every read returned one complete version


def test_crash_mid_write_leaves_nothing_partial(tmp_path):
    """Local store: a partial temp file and a truncated object (a crash mid-write) are gone after restart."""
    root = tmp_path / "store"
    s = LocalChunkStore(root, 1 << 20)
    s.put("ee.L1", b"complete object")
    (root / "ff").mkdir()
    (root / "ff" / "ff.L1.123.456.tmp").write_bytes(wrap(b"half")[:10])  # died before the rename
    full = wrap(b"x" * 1000)
    (root / "gg").mkdir()
    (root / "gg" / "gg.L1").write_bytes(full[:500])  # a torn write on a filesystem without rename atomicity
    s.close()  # the process died: its lock on the directory goes with it
    s2 = LocalChunkStore(root, 1 << 20)
    assert s2.stats.recovered_partial == 2
    assert s2.get("gg.L1") is None and s2.get("ee.L1") == b"complete object"
    assert not list(root.glob("*/*.tmp"))
    assert s2.used_bytes == len(wrap(b"complete object"))


def test_restart_keeps_recency_order(tmp_path):
    root = tmp_path / "store"
    s = LocalChunkStore(root, 3 * 120 + 10)
    for k in ("h1", "h2", "h3"):
        s.put(f"{k}.L1", bytes(100))
        time.sleep(0.01)
    time.sleep(0.01)
    s.get("h1.L1")
    s.close()
    s2 = LocalChunkStore(root, 3 * 120 + 10)
    s2.put("h4.L1", bytes(100))
    assert s2.get("h2.L1") is None and s2.get("h1.L1") is not None


def test_prefix_hash_chain():
    ids = list(range(600))
    a = chunk_hashes(ids, model="m", chunk_tokens=256)
    assert len(a) == 3 and len(set(a)) == 3
    b = chunk_hashes(ids[:512] + [7] * 88, model="m", chunk_tokens=256)
    assert b[:2] == a[:2] and b[2] != a[2]  # a shared prefix shares its chunks
    c = chunk_hashes([9, *ids[1:]], model="m", chunk_tokens=256)
    assert all(x != y for x, y in zip(a, c, strict=True))  # a change early changes every later key
    assert chunk_hashes(ids, model="other")[0] != a[0]
    assert object_key(a[0], "L2").endswith(".L2")


def test_envelope():
    assert unwrap(wrap(b"abc")) == b"abc"
    assert unwrap(wrap(b"abc")[:-1]) is None and unwrap(b"xx") is None


def test_reopening_ignores_what_is_not_ours_and_fits_a_smaller_capacity(tmp_path):
    """A subfolder in a shard made the store fail to open; a file under a name no key has was indexed and
    broke every later eviction; a smaller capacity was only enforced at the next put."""
    s = LocalChunkStore(tmp_path / "store", 10_000)
    for k in ("aa1", "aa2", "aa3"):
        s.put(f"{k}.src", bytes(1000))
    s.close()
    shard = tmp_path / "store" / "aa"
    (shard / "sub").mkdir()
    (shard / "not a key!").write_bytes(wrap(b"x" * 10))
    s = LocalChunkStore(tmp_path / "store", 2_100)  # room for two of the three
    assert s.used_bytes <= 2_100 and not s.contains("aa1.src")
    s.put("aa4.src", bytes(1000))  # an eviction with the foreign file present
    assert (shard / "not a key!").exists() and (shard / "sub").is_dir()  # left alone
    assert s.contains("aa4.src") and s.used_bytes <= 2_100


def test_a_level_that_does_not_fit_evicts_only_itself(make_store):
    """The other levels went first and then the new one anyway: one large encode emptied the level cache."""
    s = make_store(capacity=4 * 120 + 2 * 120 + 10)
    for key in ("a.src", "a.meta", "b.src", "b.meta", "a.low", "b.low"):
        s.put(key, bytes(100))
    s.put("a.high", bytes(500))  # the two other levels (240 bytes) cannot make room for it
    assert not s.contains("a.high")
    assert all(s.contains(k) for k in ("a.src", "a.meta", "b.src", "b.meta", "a.low", "b.low"))


def test_old_levels_give_way_to_new_ones_behind_many_older_sources(make_store):
    """On Redis the levels were looked for among the 1024 least recently used objects only: behind more
    sources than that (written at ingest, rarely read again) no level was found, and each new one evicted
    itself while idle old ones stayed."""
    s = make_store(capacity=1300 * 30 + 2 * 120 + 10)
    for i in range(1300):
        s.put(f"c{i:04d}.src", bytes(10))
    s.put("l0.low", bytes(100))
    s.put("l1.low", bytes(100))  # room for it: the store is now full
    s.put("l2.low", bytes(100))
    assert s.contains("l2.low") and not s.contains("l0.low") and s.contains("l1.low")


def test_a_redis_store_of_the_earlier_layout_evicts_its_old_objects_first(redis_url):
    """Written before the level and chunk recency sets existed, its objects were evicted only after every
    newer chunk: each new ingest evicted the previous new one."""
    import redis

    prefix = f"test:{uuid.uuid4().hex}:"
    r = redis.Redis.from_url(redis_url)
    old = {"old1.src": 1.0, "old1.meta": 1.0, "old2.src": 2.0, "old2.meta": 2.0}
    for key in old:  # the earlier layout: objects, their sizes, one LRU of every object
        r.set(prefix + "obj:" + key, wrap(bytes(100)))
        r.hset(prefix + "sizes", key, 120)
    r.zadd(prefix + "lru", old)
    s = RedisChunkStore(redis_url, 5 * 120 + 10, prefix=prefix)
    try:
        s.put("new1.src", bytes(100))
        s.put("new1.meta", bytes(100))  # over capacity: the oldest chunk goes, not another new one
        assert not s.contains("old1.src") and not s.contains("old1.meta")
        assert all(s.contains(k) for k in ("old2.src", "old2.meta", "new1.src", "new1.meta"))
    finally:
        s.close()


def test_redis_keeps_a_running_total_of_its_usage_across_daemons(redis_url):
    """A put summed the whole size hash to know the usage (about 20 ms at 20,000 objects, and again at every
    metrics scrape). The total is now kept by each write, atomically with the hash, by every daemon sharing
    the store; one written before it existed gets it from the hash once."""
    import redis

    prefix = f"test:{uuid.uuid4().hex}:"
    r = redis.Redis.from_url(redis_url)
    r.set(prefix + "obj:aa1.src", wrap(bytes(100)))  # the earlier layout: sizes, no total
    r.hset(prefix + "sizes", "aa1.src", 120)
    a = RedisChunkStore(redis_url, 1 << 20, prefix=prefix)
    b = RedisChunkStore(redis_url, 1 << 20, prefix=prefix)  # a second daemon on the same store
    try:
        assert a.used_bytes == 120
        a.put("bb1.src", bytes(200))
        b.put("bb1.src", bytes(50))  # overwritten by the other daemon: counted once, at its new size
        b.put("cc1.low", bytes(10))
        a.delete("aa1.src")
        b.delete("aa1.src")  # already gone: nothing to take off twice
        r.delete(prefix + "obj:cc1.low")  # gone behind the store's back (Redis' own maxmemory eviction)
        assert a.get("cc1.low") is None  # the miss forgets it, and its size
        expected = sum(int(v) for v in r.hvals(prefix + "sizes"))
        assert a.used_bytes == b.used_bytes == expected == len(wrap(bytes(50)))
        assert int(r.get(prefix + "used")) == expected  # read in O(1), not summed
    finally:
        a.close()
        b.close()


def test_a_store_directory_is_one_processs_and_must_be_writable(tmp_path):
    """Two daemons on one directory each kept their own index and capacity (together twice the capacity), and
    one restarting deleted the other's writes in progress. A directory the daemon cannot write in (a
    read-only mount outside the unit's ReadWritePaths) started fine and failed every put; a file in its place
    said "File exists"."""
    import os
    import subprocess
    import sys

    root = tmp_path / "store"
    s = LocalChunkStore(root, 1 << 20)
    other = subprocess.run([sys.executable, "-c", "import sys\nfrom tokenwire.daemon.kv_store import StoreError\n"
                            "from tokenwire.daemon.kv_store_local import LocalChunkStore\ntry:\n"
                            "    LocalChunkStore(sys.argv[1], 1 << 20)\nexcept StoreError as e:\n    print(e)",
                            str(root)],
                           capture_output=True, text=True, check=True)
    assert "in use by another process" in other.stdout
    s.close()
    LocalChunkStore(root, 1 << 20).close()  # free again once the first one is gone
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StoreError, match="is not a directory"):
        LocalChunkStore(tmp_path / "afile", 1 << 20)
    if os.geteuid() == 0:  # root writes anywhere but on a read-only mount; a bind mount would need more setup
        return
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    with pytest.raises(StoreError, match=r"cannot use .*Permission denied"):
        LocalChunkStore(ro, 1 << 20)


def test_a_redis_url_without_its_scheme_is_one_line_from_config_check_and_the_store():
    """`redis_url = "127.0.0.1:6379"` passed `config check`, then the daemon died with redis-py's traceback."""
    from tokenwire.daemon.config import ConfigError
    from tokenwire.daemon.kv_config import parse_kv

    with pytest.raises(ConfigError, match=r"kv\.redis_url: expected a redis://"):
        parse_kv({"backend": "redis", "redis_url": "127.0.0.1:6379"}, None)
    with pytest.raises(StoreError, match="bad Redis URL"):
        RedisChunkStore("http://127.0.0.1:6379", 1 << 20)


def test_kv_congestion_follows_kv_marking():
    """``[kv] marking = "classic"`` still ran prague (the default congestion whatever the marking): a scalable
    sender on a classic queue that never marks CE. The default now follows the marking, as [server]'s does."""
    from tokenwire.daemon.config import ConfigError
    from tokenwire.daemon.kv_config import parse_kv

    assert parse_kv({}, None).congestion == "prague"
    assert parse_kv({"marking": "classic"}, None).congestion == "reno-ecn"  # ECT(0): CE halves the window
    assert parse_kv({"marking": "none", "congestion": "cubic"}, None).congestion == "cubic"
    with pytest.raises(ConfigError, match=r"kv\.congestion: 'prague' cannot carry ECT\(0\) packets"):
        parse_kv({"marking": "classic", "congestion": "prague"}, None)
    with pytest.raises(ConfigError, match=r"kv\.congestion: 'reno' cannot carry ECT\(1\) packets"):
        parse_kv({"congestion": "reno"}, None)


def test_a_store_that_fails_to_open_lets_go_of_its_directory(tmp_path, monkeypatch):
    """An object file the daemon's user cannot read failed the open after the lock was taken: the lock stayed,
    and a retry in the same process said "in use by another process"."""
    def unreadable(self):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr(LocalChunkStore, "_recover", unreadable)
        with pytest.raises(PermissionError):
            LocalChunkStore(tmp_path / "store", 1 << 20)
    LocalChunkStore(tmp_path / "store", 1 << 20).close()


def test_a_redis_that_fails_is_one_line_for_the_client_and_one_warning_in_the_log(redis_url, caplog):
    """A Redis that was down made each failed resolve, chunk or put a traceback in the daemon's log, and the
    client heard only "store failure: ConnectionError"."""
    import logging
    import socket

    import redis

    from tokenwire.daemon.kv_store import StoreError
    from tokenwire.daemon.kv_store_redis import RedisChunkStore

    store = RedisChunkStore(redis_url, 1 << 20, prefix="tw-test-down:")
    with socket.socket() as s:  # a port nobody listens on: Redis is "down"
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    store._r.connection_pool = redis.ConnectionPool(port=dead, socket_timeout=1)  # its scripts' client too
    store.url = f"redis://:s3cret@127.0.0.1:{dead}/0"
    with caplog.at_level(logging.WARNING, logger="tokenwire.kv"):
        for call in (lambda: store.get("a.low"), lambda: store.put("a.low", b"x"), lambda: store.used_bytes):
            with pytest.raises(StoreError, match=r"^KV store unavailable \(Redis ConnectionError\)$"):
                call()
    warnings = [r.getMessage() for r in caplog.records if r.name == "tokenwire.kv"]
    assert len(warnings) == 1 and "ConnectionError" in warnings[0], warnings  # once per 10 s
    assert "s3cret" not in warnings[0] and "//***@127.0.0.1" in warnings[0]
    with pytest.raises(StoreError, match=r"cannot reach the Redis store at redis://\*\*\*@127\.0\.0\.1") as exc:
        RedisChunkStore(store.url, 1 << 20)  # the start-up error masks it too
    assert "s3cret" not in str(exc.value)
