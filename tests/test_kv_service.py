"""The daemon's KV service without the network: what ingest accepts, replaces and refuses, and how the
store's capacity is kept without leaving a context half stored."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest
import torch

from tokenwire.daemon import kv_service as kvs
from tokenwire.daemon.kv_ingest import put_kv_unix, serve_kv_ingest
from tokenwire.daemon.kv_meta import KVIngestError
from tokenwire.daemon.kv_service import KVService
from tokenwire.daemon.kv_store import chunk_hashes, object_key
from tokenwire.daemon.kv_store_local import LocalChunkStore
from tokenwire.transport.cachegen.codec import decode_chunk
from tokenwire.transport.errors import ErrorCode
from tokenwire.transport.frames import KvFetch
from tokenwire.transport.kv_channel import KVError, KVNotFound

from .test_kv_channel import CHUNK, MODEL, make_kv


def _service(tmp_path, capacity=64 << 20) -> KVService:
    return KVService(LocalChunkStore(tmp_path / "kv", capacity), chunk_tokens=CHUNK)


def _decoded_error(svc: KVService, h: str, kv, level="high") -> float:
    """Largest error of chunk ``h`` at ``level`` against ``kv``'s first chunk."""
    got = decode_chunk(svc.encoded_sync(h, level))
    return max(float((g.float() - w[:, :, :CHUNK].float()).abs().max())
               for pair_g, pair_w in zip(got, kv, strict=True) for g, w in zip(pair_g, pair_w, strict=True))


@pytest.mark.parametrize("change", ["fingerprint", "dtype", "geometry"])
def test_reingesting_the_same_tokens_with_other_kv_replaces_the_chunk(tmp_path, change):
    """The source was kept and the new metadata written over it: bf16 metadata over fp16 bytes, or the old
    KV served under a fine-tune's fingerprint, with no error."""
    svc = _service(tmp_path)
    ids = list(range(CHUNK))
    old = make_kv(CHUNK, seed=1)
    (h,) = svc.ingest_sync(MODEL, ids, old, fingerprint=111, prewarm=["high"])
    new, fp = make_kv(CHUNK, seed=2), 111
    if change == "fingerprint":
        fp = 222
    elif change == "dtype":
        new = [(k.to(torch.bfloat16), v.to(torch.bfloat16)) for k, v in new]
    else:
        new = [(k.reshape(1, 4, CHUNK, 8), v.reshape(1, 4, CHUNK, 8)) for k, v in make_kv(CHUNK, seed=2)]
    svc.ingest_sync(MODEL, ids, new, fingerprint=fp)
    plan = svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids))
    assert plan.fingerprint == fp and plan.dtype == str(new[0][0].dtype).removeprefix("torch.")
    assert _decoded_error(svc, h, new) < 0.5  # the new KV (quantized: ~0.13 on N(0, 1)); the old one is ~5 off
    svc.close()


def test_reingesting_identical_kv_keeps_what_is_stored(tmp_path):
    svc = _service(tmp_path)
    ids = list(range(CHUNK))
    (h,) = svc.ingest_sync(MODEL, ids, make_kv(CHUNK), prewarm=["low"])
    encodes = svc.encodes
    svc.ingest_sync(MODEL, ids, make_kv(CHUNK))
    assert svc.store.contains(object_key(h, "low"))  # not thrown away and encoded again
    svc.encoded_sync(h, "low")
    assert svc.encodes == encodes
    svc.close()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"fingerprint": -5}, "fingerprint must be an integer in"),  # was stored, then broke every fetch's KV_META
    ({"ids": [2**40, *range(7)]}, "token ids must be integers in [0, 2**31)"),
    ({"model": ""}, "model must be a name of 1 to 128"),
    ({"model": "m" * 129}, "model must be a name of 1 to 128"),
])
def test_ingest_refuses_what_no_fetch_could_name(tmp_path, kwargs, message):
    svc = _service(tmp_path)
    ids = kwargs.pop("ids", list(range(8)))
    with pytest.raises(KVIngestError) as info:
        svc.ingest_sync(kwargs.pop("model", MODEL), ids, make_kv(8), **kwargs)
    assert message in str(info.value)
    svc.close()


def test_ingest_takes_numpy_token_ids(tmp_path):
    svc = _service(tmp_path)
    ids = np.arange(8, dtype=np.int64)  # a tokenizer's array
    assert svc.ingest_sync(MODEL, ids, make_kv(8)) == chunk_hashes(list(range(8)), model=MODEL, chunk_tokens=CHUNK)
    svc.close()


def test_a_context_larger_than_the_store_is_refused_not_half_stored(tmp_path):
    svc = _service(tmp_path, capacity=20_000)  # the 4-chunk context's sources alone are 64 KiB
    with pytest.raises(KVIngestError, match="does not fit the store's capacity"):
        svc.ingest_sync(MODEL, list(range(4 * CHUNK)), make_kv(4 * CHUNK))
    assert svc.store.used_bytes == 0
    svc.close()


@pytest.mark.parametrize("spare", [0, 10_000])
def test_encoding_levels_in_a_full_store_keeps_every_context_whole(tmp_path, spare):
    """A full store holding the oldest context Y and two newer ones: fetching Y encoded its chunk 0, which
    evicted Y's chunk 1 ("chunk ... is no longer stored"); with no spare room even the first fetch of a
    freshly ingested context failed."""
    ids = {name: list(range(base, base + 2 * CHUNK)) for name, base in (("Y", 0), ("Z1", 1000), ("Z2", 2000))}
    probe = _service(tmp_path / "probe")
    for name, t in ids.items():
        probe.ingest_sync(MODEL, t, make_kv(2 * CHUNK, seed=len(name)))
    full = probe.store.used_bytes
    probe.close()
    svc = _service(tmp_path, capacity=full + spare)
    hashes = {name: svc.ingest_sync(MODEL, t, make_kv(2 * CHUNK, seed=len(name))) for name, t in ids.items()}
    for _ in range(2):  # a second fetch too: nothing the first did may have broken a context
        for level in ("medium", "high"):
            plan = svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids["Y"]))
            for i in range(len(hashes["Y"])):
                assert svc.chunk_sync(plan, i, level)
    for hs in hashes.values():
        for h in hs:
            assert svc.store.contains(object_key(h, "src")) and svc.store.contains(object_key(h, "meta"))
    assert svc.store.used_bytes <= svc.store.capacity_bytes
    svc.close()


def test_a_replacement_failing_half_way_leaves_a_miss_not_wrong_kv(tmp_path):
    """The new source was written under the old metadata before the new metadata: a failing write (disk
    full) in between left bf16 bytes served as fp16, with no error."""
    from tokenwire.daemon.kv_store import StoreError
    from tokenwire.transport.kv_channel import KVNotFound

    svc = _service(tmp_path)
    ids = list(range(CHUNK))
    svc.ingest_sync(MODEL, ids, make_kv(CHUNK, seed=1))
    real_put = svc.store.put

    def disk_full_at_meta(key, data):
        if key.endswith(".meta"):
            raise StoreError("no space left on device")
        real_put(key, data)

    svc.store.put = disk_full_at_meta
    bf16 = [(k.to(torch.bfloat16), v.to(torch.bfloat16)) for k, v in make_kv(CHUNK, seed=2)]
    with pytest.raises(StoreError):
        svc.ingest_sync(MODEL, ids, bf16)
    fresh = KVService(svc.store, chunk_tokens=CHUNK)  # no cached metadata: what the store says
    with pytest.raises(KVNotFound):
        fresh.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids))
    svc.close()


def test_fetch_by_hashes_needs_the_chain_in_order(tmp_path):
    svc = _service(tmp_path)
    ids = list(range(2 * CHUNK))
    h0, h1 = svc.ingest_sync(MODEL, ids, make_kv(2 * CHUNK))
    ok = svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, hashes=[bytes.fromhex(h0), bytes.fromhex(h1)]))
    assert ok.handle == [h0, h1]
    # swapped chunks were served as a context: a chain listed out of order is a bad request
    with pytest.raises(KVError) as info:
        svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, hashes=[bytes.fromhex(h1), bytes.fromhex(h0)]))
    assert info.value.code == ErrorCode.BAD_REQUEST
    # so was a chain's tail; it is now a miss, as for a chunk of another principal's scope, which a fetch cannot
    # tell from an absent one (tests/test_kv_scope_s37.py)
    with pytest.raises(KVNotFound, match="0 of 1 chunks found"):
        svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, hashes=[bytes.fromhex(h1)]))
    svc.close()


def test_the_in_memory_caches_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(kvs, "CACHE_ENTRIES", 5)
    svc = _service(tmp_path)
    for n in range(12):
        h = svc.ingest_sync(MODEL, [n] * 8, make_kv(8), prewarm=["low"])[0]
        svc.encoded_sync(h, "low")
    assert len(svc._meta) <= 5 and len(svc._sizes) <= 5
    svc.close()


def test_the_ingest_socket_answers_a_put_that_fails_unexpectedly(tmp_path, monkeypatch):
    """A non-KV exception in the worker was an unhandled callback error and a connection closed unanswered."""
    svc = _service(tmp_path)
    sock = tmp_path / "ingest.sock"

    def broken(*a, **k):
        raise struct_error("argument out of range")

    struct_error = type("error", (Exception,), {})
    monkeypatch.setattr(svc, "ingest_raw_sync", broken)

    async def go():
        srv = await serve_kv_ingest(sock, svc)
        try:
            loop = asyncio.get_running_loop()
            with pytest.raises(KVIngestError) as info:
                await loop.run_in_executor(None, lambda: put_kv_unix(sock, MODEL, list(range(8)), make_kv(8)))
            return str(info.value)
        finally:
            srv.close()

    assert asyncio.run(go()) == "ingest failed: error"
    svc.close()


def test_put_kv_unix_refuses_a_dtype_the_daemon_cannot_store(tmp_path):
    """It sent the bytes anyway and reported the daemon's closed socket as a BrokenPipeError."""
    kv = [(k.double(), v.double()) for k, v in make_kv(8)]
    with pytest.raises(KVIngestError, match="unsupported dtype float64"):
        put_kv_unix(tmp_path / "none.sock", MODEL, list(range(8)), kv)


def test_the_ingest_socket_is_not_taken_from_a_live_daemon_nor_removed_when_another_bound_it(tmp_path):
    from tokenwire.daemon import unix_sockets

    svc = _service(tmp_path)
    live = tmp_path / "live.sock"
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(live))
    other.listen()
    with pytest.raises(OSError, match="another process is listening"):  # it was unlinked and taken over
        asyncio.run(serve_kv_ingest(live, svc))
    ident = unix_sockets.identity(live)
    other.close()
    live.unlink()
    later = socket.socket(socket.AF_UNIX)  # a later process binds the same path
    later.bind(str(live))
    unix_sockets.release(live, ident)  # our exit: not our socket any more
    assert live.is_socket()
    later.close()
    svc.close()


def test_the_ingest_socket_never_deletes_a_file_that_is_not_a_socket(tmp_path):
    svc = _service(tmp_path)
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    with pytest.raises(OSError, match="other than a socket"):
        asyncio.run(serve_kv_ingest(precious, svc))
    assert precious.read_text() == "keep me"
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()

    async def go():
        srv = await serve_kv_ingest(stale, svc)  # a stale socket of an earlier run is replaced
        srv.close()

    asyncio.run(go())
    svc.close()


def test_a_fetch_does_not_wait_behind_another_engines_ingest(tmp_path, monkeypatch):
    """One worker for both: a small encoded context's fetch waited for a long ingest (1.3 s, deadline missed)."""
    import threading

    svc = _service(tmp_path)
    ids = list(range(CHUNK))
    svc.ingest_sync(MODEL, ids, make_kv(CHUNK), prewarm=["low"])
    gate = threading.Event()
    real = svc.ingest_sync

    def long_ingest(*a, **k):
        gate.wait(20)  # an ingest that is still running
        return real(*a, **k)

    monkeypatch.setattr(svc, "ingest_sync", long_ingest)

    async def go():
        other = asyncio.ensure_future(svc.ingest(MODEL, list(range(1000, 1000 + CHUNK)), make_kv(CHUNK, seed=3)))
        try:
            plan = await asyncio.wait_for(svc.resolve(KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids)), 5)
            return await asyncio.wait_for(svc.chunk(plan, 0, "low"), 5)
        finally:
            gate.set()
            await other

    assert asyncio.run(go())
    svc.close()


def test_kv_fetches_need_a_token_in_force_now(tmp_path):
    """connect_kv had no way to send a token (every fetch of an [auth] daemon was UNAUTHORIZED), and the KV
    check kept the tokens of the daemon's start: one revoked by SIGHUP kept fetching."""
    from tokenwire.daemon.config import hash_token, load_config
    from tokenwire.daemon.service import Daemon
    from tokenwire.transport.errors import RemoteError
    from tokenwire.transport.kv_channel import connect_kv

    sock, path = tmp_path / "kv.sock", tmp_path / "tokenwire.toml"

    def write(names):
        tokens = ", ".join(f'{{ name = "{n}", sha256 = "{hash_token(n + "-token")}" }}' for n in names)
        path.write_text(f'[server]\nlisten = ["127.0.0.1:0"]\n[metrics]\nlisten = ""\n[auth]\ntokens = [{tokens}]\n'
                        f'[kv]\nenabled = true\nlisten = "127.0.0.1:0"\ndirectory = "{tmp_path / "store"}"\n'
                        f'chunk_tokens = {CHUNK}\ningest_socket = "{sock}"\nforecaster = "ewma"\n')

    write(["alice"])
    ids = list(range(40))

    async def fetch(port, token):
        async with connect_kv("127.0.0.1", port, verify=False, auth_token=token) as conn:
            try:
                res = await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L1")
                return res.prefix_kv()[1]
            except RemoteError as exc:
                return exc.code

    async def go():
        daemon = Daemon(load_config(path))
        await daemon.start()
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, lambda: put_kv_unix(sock, MODEL, ids, make_kv(40)))
            port = daemon.kv.server.port
            before = [await fetch(port, "alice-token"), await fetch(port, None)]
            write(["bob"])
            assert daemon.reload()
            return [*before, await fetch(port, "alice-token"), await fetch(port, "bob-token")]
        finally:
            await daemon.stop()

    assert asyncio.run(go()) == [40, ErrorCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED, 40]


from tests.test_kv_store import redis_url  # noqa: E402, F401  (the real-server fixture)


def test_daemons_sharing_redis_see_each_others_reingest(redis_url):  # noqa: F811
    """Cached metadata was trusted while the key existed: after another daemon re-ingested a chunk (a new
    fingerprint and dtype), this one encoded the new source under its old metadata."""
    import uuid

    from tokenwire.daemon.kv_store_redis import RedisChunkStore

    prefix = f"tw-test-{uuid.uuid4().hex}:"
    a = KVService(RedisChunkStore(redis_url, 64 << 20, prefix=prefix), chunk_tokens=CHUNK)
    b = KVService(RedisChunkStore(redis_url, 64 << 20, prefix=prefix), chunk_tokens=CHUNK)
    try:
        ids = list(range(CHUNK))
        fetch = KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids)
        (h,) = a.ingest_sync(MODEL, ids, make_kv(CHUNK, seed=1), fingerprint=111)
        assert a.resolve_sync(fetch).fingerprint == 111
        new = [(k.to(torch.bfloat16), v.to(torch.bfloat16)) for k, v in make_kv(CHUNK, seed=2)]
        b.ingest_sync(MODEL, ids, new, fingerprint=222)
        plan = a.resolve_sync(fetch)
        assert (plan.fingerprint, plan.dtype) == (222, "bfloat16")
        assert _decoded_error(a, h, new) < 0.5
    finally:
        a.close()
        b.close()


def test_a_busy_live_ingest_socket_is_not_taken_for_a_stale_one(tmp_path):
    """A daemon whose backlog is full makes connect() fail with EAGAIN, not ECONNREFUSED: that was read as
    "nobody listens" and its socket file deleted."""
    from tokenwire.daemon import unix_sockets

    path = tmp_path / "busy.sock"
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(path))
    live.listen(1)  # and never accepts
    waiting = []
    try:
        for _ in range(8):
            c = socket.socket(socket.AF_UNIX)
            c.setblocking(False)
            waiting.append(c)
            try:
                c.connect(str(path))
            except BlockingIOError:
                break
        with pytest.raises(OSError, match="cannot tell whether it is in use"):
            unix_sockets.claim(path)
        assert path.is_socket()
    finally:
        for c in waiting:
            c.close()
        live.close()


def test_kv_metrics_scrape_survives_an_unreachable_store_and_counts_ingests(tmp_path, caplog):
    """A scrape while Redis is down loses only the usage gauge (logged), not every other metric; puts are
    counted stored or refused once each, by the Python API too."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest

    from tokenwire.daemon.kv_metrics import KVMetrics
    from tokenwire.transport.kv_channel import KVServer

    svc = _service(tmp_path)
    try:
        svc.ingest_sync(MODEL, list(range(40)), make_kv(40))
        with pytest.raises(KVIngestError, match="prewarm"):
            svc.ingest_sync(MODEL, list(range(40)), make_kv(40), prewarm=["bogus"])
        with pytest.raises(KVIngestError):
            svc.ingest_raw_sync(MODEL, [1], [1, 2, 1, 1, 1], "float16", b"")
        server = KVServer(provider=svc)
        registry = CollectorRegistry()
        KVMetrics(registry, SimpleNamespace(server=server, service=svc))
        text = generate_latest(registry).decode()
        assert "tokenwire_kv_store_bytes " in text
        assert 'tokenwire_kv_ingests_total{outcome="stored"} 1.0' in text
        assert 'tokenwire_kv_ingests_total{outcome="refused"} 2.0' in text
        assert "tokenwire_kv_ingested_tokens_total 40.0" in text

        class Down(type(svc.store)):
            @property
            def used_bytes(self):
                raise ConnectionError("redis: connection refused")

        svc.store.__class__ = Down
        text = generate_latest(registry).decode()
        assert "tokenwire_kv_store_bytes " not in text and 'outcome="stored"} 1.0' in text
        assert "KV store usage unavailable: redis: connection refused" in caplog.text
    finally:
        svc.close()


def test_a_store_that_stops_answering_does_not_hold_up_the_scrape(tmp_path, caplog, monkeypatch):
    """A frozen Redis held every scrape for its 10-s socket timeout (Prometheus then lost every metric): the
    scrape leaves the usage gauge out after USAGE_WAIT_S, and a later scrape takes the read's result."""
    import threading
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest

    from tokenwire.daemon import kv_metrics
    from tokenwire.transport.kv_channel import KVServer

    monkeypatch.setattr(kv_metrics, "USAGE_WAIT_S", 0.05)
    svc = _service(tmp_path)
    answer = threading.Event()
    reads = []
    try:
        svc.ingest_sync(MODEL, list(range(40)), make_kv(40))
        stored = svc.store.used_bytes

        class Frozen(type(svc.store)):
            @property
            def used_bytes(self):
                reads.append(1)
                answer.wait(30)  # released only once the first scrapes have returned
                return stored

        svc.store.__class__ = Frozen
        registry = CollectorRegistry()
        kv_metrics.KVMetrics(registry, SimpleNamespace(server=KVServer(provider=svc), service=svc))
        first = generate_latest(registry).decode()
        # the first scrape waited in vain: the next ones do not wait again (each waited its 2 s, and scrapes at
        # once queued in the executor's few threads past Prometheus's timeout), however long they may
        monkeypatch.setattr(kv_metrics, "USAGE_WAIT_S", 30.0)
        second = generate_latest(registry).decode()
        assert answer.is_set() is False  # both scrapes returned while the store was still silent
        assert "tokenwire_kv_store_bytes " not in first + second
        assert 'tokenwire_kv_ingests_total{outcome="stored"} 1.0' in first + second
        assert caplog.text.count("no answer within") == 1
        answer.set()  # the store answers now: once its read has ended, the next scrape takes its result
        for reader in [t for t in threading.enumerate() if t.name == "kv-store-usage"]:
            reader.join(30)
        assert f"tokenwire_kv_store_bytes {float(stored)}" in generate_latest(registry).decode()
        assert len(reads) == 1  # one read for the three scrapes, not one stuck thread per scrape
    finally:
        answer.set()
        svc.close()


def test_a_prefix_fetch_finds_the_stored_contexts_shorter_last_chunk(tmp_path):
    """The previous turn's last chunk is shorter than chunk_tokens, and the next turn's chain hashes that
    position over a whole chunk: without the parent's tail list it was never found (on average half a chunk
    recomputed each turn). Two continuations of one parent, a context shorter than one chunk, a shorter chunk
    that is gone, one of another fingerprint, and many short first turns."""
    svc = _service(tmp_path)
    try:
        base = list(range(1000, 1000 + CHUNK))
        a, b = [*base, 1, 2, 3, 4, 5, 6, 7], base + list(range(50, 62))  # 7 and 12 tokens after one whole chunk
        svc.ingest_sync(MODEL, a, make_kv(len(a), 1))
        hb = svc.ingest_sync(MODEL, b, make_kv(len(b), 2))
        plan = svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=b + [9] * 40, prefix=True))
        assert plan.token_counts == [CHUNK, 12] and plan.handle == hb and plan.rest_tokens == 40
        plan = svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=[*a[:-1], 8, 9], prefix=True))
        assert plan.token_counts == [CHUNK]  # a's tail does not match (its last token differs): whole chunks only
        short = [7, 7, 7]
        (hs,) = svc.ingest_sync(MODEL, short, make_kv(3, 3))
        plan = svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=short + [1] * 50, prefix=True))
        assert plan.token_counts == [3] and plan.handle == [hs]  # the first chunk, chained to the model's root
        for kind in ("meta", "src"):
            svc.store.delete(object_key(hb[1], kind))
        plan = svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=b + [9] * 40, prefix=True))
        assert plan.token_counts == [CHUNK]  # its shorter chunk is gone: no error, the whole chunks
        # another fingerprint (a fine-tune that kept its name) re-ingests the whole chunk: a's shorter chunk,
        # stored with the old one, is not mixed in after it (that failed the fetch as geometry disagreement)
        svc.ingest_sync(MODEL, base, make_kv(CHUNK, 4), fingerprint=12345)
        plan = svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=a + [9] * 40, prefix=True))
        assert plan.token_counts == [CHUNK] and plan.fingerprint == 12345
        # no cap: 20 different short first turns are all found again
        firsts = [[5000 + k] * 3 for k in range(20)]
        for k, ids in enumerate(firsts):
            svc.ingest_sync(MODEL, ids, make_kv(3, 10 + k))
        assert all(svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids + [1] * 9, prefix=True))
                   .token_counts == [3] for ids in firsts)
    finally:
        svc.close()


@pytest.mark.parametrize("change", ["dtype", "geometry"])
def test_a_context_whose_chunks_were_stored_differently_is_not_served_mixed(tmp_path, change):
    """Engine A puts 2 chunks in fp16, engine B re-puts chunk 0 in bf16 (or another geometry): served whole,
    KV_META announced chunk 0's dtype and the chunks came in two (prefix_kv() promoted them to fp32), or the
    fetch failed as INTERNAL. Whole: a miss; prefix: the chunks up to the first that differs from chunk 0."""
    from tokenwire.transport.kv_channel import KVNotFound

    svc = _service(tmp_path)
    try:
        ids = list(range(2 * CHUNK))
        svc.ingest_sync(MODEL, ids, make_kv(2 * CHUNK, 1))
        if change == "dtype":
            first = [(k.to(torch.bfloat16), v.to(torch.bfloat16)) for k, v in make_kv(CHUNK, 2)]
        else:
            first = [(k.reshape(1, 4, CHUNK, 8), v.reshape(1, 4, CHUNK, 8)) for k, v in make_kv(CHUNK, 2)]
        (h0,) = svc.ingest_sync(MODEL, ids[:CHUNK], first)
        with pytest.raises(KVNotFound, match="not stored as one"):
            svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids))
        plan = svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids, prefix=True))
        assert plan.token_counts == [CHUNK] and plan.handle == [h0] and plan.rest_tokens == CHUNK
        assert plan.dtype == ("bfloat16" if change == "dtype" else "float16")
    finally:
        svc.close()


@pytest.mark.parametrize("layer", ["triple", "single", "tensor"])
def test_ingest_refuses_a_layer_that_is_not_a_k_v_pair(tmp_path, layer):
    """A (K, V, V) layer raised a bare ValueError ("too many values to unpack") instead of KVIngestError."""
    svc = _service(tmp_path)
    try:
        kv = make_kv(4)
        bad = {"triple": (kv[0][0], kv[0][1], kv[0][1]), "single": (kv[0][0],), "tensor": kv[0][0]}[layer]
        with pytest.raises(KVIngestError, match=r"layer 0 must be a \(K, V\) pair"):
            svc.ingest_sync(MODEL, [1, 2, 3, 4], [bad, *kv[1:]])
    finally:
        svc.close()


def test_a_chunk_re_put_with_other_kv_during_a_fetch_is_refused_not_served(tmp_path):
    """A fetch resolved (KV_META sent: fingerprint 111) and an engine then re-put the context under another
    fingerprint: the fetch's next chunk was encoded from the new source and served into the old fetch."""
    from tokenwire.transport.kv_channel import KVNotFound

    svc = _service(tmp_path)
    try:
        ids = list(range(2 * CHUNK))
        svc.ingest_sync(MODEL, ids, make_kv(2 * CHUNK, 1), fingerprint=111)
        plan = svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids))
        assert len(svc.chunk_sync(plan, 0, "high")) > 0
        svc.ingest_sync(MODEL, ids, make_kv(2 * CHUNK, 2), fingerprint=222)
        for level in ("high", "text"):
            with pytest.raises(KVNotFound, match="stored again with other KV during this fetch"):
                svc.chunk_sync(plan, 1, level)
        again = svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids))
        assert again.fingerprint == 222 and len(svc.chunk_sync(again, 1, "high")) > 0
    finally:
        svc.close()


def test_a_fetch_resolving_while_a_chunk_is_replaced_sees_it_before_or_after(tmp_path):
    """Replacing a chunk deletes its metadata, then writes the new one; a resolve in between answered
    NOT_FOUND for a context that was stored all along. The resolve runs from inside the replacement (the
    store's put of the new source) and must wait for it."""
    import threading

    outcome: list[object] = []

    class Hooked(LocalChunkStore):
        armed = False

        def put(self, key, data):
            if self.armed and key.endswith(".src"):
                self.armed = False
                t = threading.Thread(target=lambda: outcome.append(_resolve()))
                t.start()
                t.join(0.5)  # the old code answered at once; the fixed one waits for this put's chunk
                outcome.append(t)
            super().put(key, data)

    store = Hooked(tmp_path / "kv", 64 << 20)
    svc = KVService(store, chunk_tokens=CHUNK)
    ids = list(range(CHUNK))

    def _resolve():
        try:
            return svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids)).fingerprint
        except Exception as exc:  # the outcome is the assertion
            return exc

    try:
        svc.ingest_sync(MODEL, ids, make_kv(CHUNK, 1), fingerprint=111)
        store.armed = True
        svc.ingest_sync(MODEL, ids, make_kv(CHUNK, 2), fingerprint=222)
        thread = next(o for o in outcome if isinstance(o, threading.Thread))
        thread.join(10)
        got = [o for o in outcome if not isinstance(o, threading.Thread)]
        assert got == [222]
    finally:
        svc.close()
