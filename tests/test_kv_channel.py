"""KV channel end to end on loopback: real daemon-side service and store, real QUIC, the SDK client.

Tiny synthetic KV (4 layers x 2 heads x 16 dims) keeps this fast; the codec itself is tested elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sys
import time
import urllib.request

import pytest
import torch

from tokenwire.daemon.kv_ingest import put_kv_unix, serve_kv_ingest
from tokenwire.daemon.kv_meta import KVIngestError
from tokenwire.daemon.kv_service import KVService
from tokenwire.daemon.kv_store import object_key
from tokenwire.daemon.kv_store_local import LocalChunkStore
from tokenwire.transport.cachegen.codec import decode_chunk
from tokenwire.transport.errors import ErrorCode, RemoteError
from tokenwire.transport.kv_channel import (
    KVCorruptChunk,
    KVError,
    KVNotFound,
    ServerTuning,
    connect_kv,
    serve_kv,
)

MODEL = "tiny-test"
CHUNK = 32


def make_kv(n_tokens: int, seed: int = 0, layers: int = 4, heads: int = 2, dim: int = 16):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, heads, n_tokens, dim, generator=g, dtype=torch.float32).to(torch.float16),
             torch.randn(1, heads, n_tokens, dim, generator=g, dtype=torch.float32).to(torch.float16))
            for _ in range(layers)]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.fixture
def service(tmp_path):
    svc = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=CHUNK)
    yield svc
    svc.close()


@contextlib.asynccontextmanager
async def kv_client(service, tuning=None, congestion="reno"):
    """A KV server over ``service`` on loopback (EWMA forecaster unless told) and one connection to it."""
    server = await serve_kv(service, "127.0.0.1", 0, congestion=congestion,
                            tuning=tuning or ServerTuning(forecaster="ewma"))
    try:
        async with connect_kv("127.0.0.1", server.port, verify=False) as conn:
            yield conn, server
        # leaving connect_kv sends the close and returns at once: let the server take in what the client sent last
        # (a fetch's end, the close) before it closes, as a server in another process would
        waits = [asyncio.ensure_future(p.wait_closed()) for p in list(server.protocols)]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=10)
            for w in pending:
                w.cancel()
    finally:
        server.close()


async def _fetch(service, ids, tuning=None, **kw):
    async with kv_client(service, tuning) as (conn, server):
        return await conn.fetch_kv(model=MODEL, token_ids=ids, **kw), server


def test_fetch_returns_decoded_stored_chunks(service):
    ids = list(range(100, 100 + 3 * CHUNK + 7))  # 4 chunks, the last one partial
    kv = make_kv(len(ids))
    hashes = service.ingest_sync(MODEL, ids, kv, prewarm=["medium"])  # encode (and JIT) outside the deadline
    assert len(hashes) == 4
    res, server = run(_fetch(service, ids, deadline_ms=5000, controller="fixed-L2"))
    assert res.report.levels == ["medium"] * 4
    assert res.report.deadline_met and res.report.fetch_ms > 0
    for i, c in enumerate(res.chunks):
        stored = service.store.get(object_key(hashes[i], "medium"))
        expect = decode_chunk(stored)
        assert c.token_ids is None
        for (k, v), (ek, ev) in zip(c.kv, expect, strict=True):
            assert k.dtype == torch.float16 and k.shape == ek.shape
            assert torch.equal(k, ek) and torch.equal(v, ev)
    full, n = res.prefix_kv()
    assert n == len(ids) and full[0][0].shape == (1, 2, len(ids), 16)
    err = (full[0][0].float() - kv[0][0].float()).abs().mean() / kv[0][0].float().abs().mean()
    assert err < 0.2  # lossy but close: the medium level of the real codec
    assert server.stats["completed"] == 1 and server.stats["chunks"] == 4


def test_a_chunk_that_overtakes_kv_meta_is_decoded_against_it(service, monkeypatch):
    """Chunks travel on their own streams: when the packet with KV_META is lost, a chunk can arrive first.
    Its decode used to start at once, without the model fingerprint and geometry checks (no meta yet)."""
    from tokenwire.transport import kv_channel as kc

    ids = list(range(2 * CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(len(ids), 4), prewarm=["low"])
    held: list = []
    seen_meta: list[bool] = []
    handle, decode = kc.KVConnection.handle_session_events, kc.KVConnection._decode

    def reorder(self, events):  # what the wire does when KV_META's packet is lost: the chunk comes first
        out = []
        for ev in events:
            if isinstance(ev, kc.KVMetaReceived) and not held:
                held.append(ev)
                continue
            out.append(ev)
            if isinstance(ev, kc.KVChunkReceived) and held and held[0] not in out:
                out.append(held[0])
        handle(self, out)

    def recording_decode(self, pf, hdr, payload):
        seen_meta.append(pf.meta is not None)
        return decode(self, pf, hdr, payload)

    monkeypatch.setattr(kc.KVConnection, "handle_session_events", reorder)
    monkeypatch.setattr(kc.KVConnection, "_decode", recording_decode)
    res, _ = run(_fetch(service, ids, deadline_ms=5000, controller="fixed-L1"))
    assert res.report.levels == ["low", "low"] and len(held) == 1
    assert seen_meta == [True, True]


def test_text_fallback_when_recompute_is_cheaper(service):
    ids = list(range(2 * CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(len(ids), 1))
    # recomputing costs nothing here: the controller must prefer exact text over any codec level
    res, _ = run(_fetch(service, ids, deadline_ms=5000, controller="tokenwire-ewma", recompute_us_per_token=0))
    assert res.report.levels == ["text", "text"]
    assert [c.token_ids for c in res.chunks] == [ids[:CHUNK], ids[CHUNK:]]
    assert res.prefix_kv() == (None, 0) and res.text_token_ids() == ids


def test_missing_context_is_typed_error_and_server_keeps_serving(service):
    ids = list(range(CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(CHUNK, 2))

    async def go():
        async with kv_client(service) as (conn, _):
            with pytest.raises(KVNotFound) as ei:
                await conn.fetch_kv(model=MODEL, token_ids=[7] * CHUNK, deadline_ms=1000)
            assert ei.value.code == ErrorCode.NOT_FOUND
            return await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L1")

    res = run(go())
    assert res.report.levels == ["low"]


def test_a_prefix_fetch_returns_the_stored_turns_kv_and_leaves_the_new_tokens_to_the_engine(service):
    """A conversation's next turn: the store holds the previous prompt (its last chunk partial), the engine asks
    for the whole new context. Without ``prefix`` that is a miss; with it, the stored chunks come as KV, the
    shorter last one too (found through its parent's tail list: the new context's chain hashes that position
    over a whole chunk), and the new tokens are the engine's."""
    turn1 = list(range(500, 500 + 2 * CHUNK + 7))
    kv = make_kv(len(turn1), 8)
    service.ingest_sync(MODEL, turn1, kv, prewarm=["high"])
    turn2 = turn1 + list(range(9000, 9000 + CHUNK + 5))
    nothing = [3] * (2 * CHUNK)

    async def go():
        async with kv_client(service) as (conn, server):
            with pytest.raises(KVNotFound):
                await conn.fetch_kv(model=MODEL, token_ids=turn2, deadline_ms=5000)
            with pytest.raises(KVNotFound):  # not even the first chunk: still a miss
                await conn.fetch_kv(model=MODEL, token_ids=nothing, deadline_ms=5000, prefix=True)
            res = await conn.fetch_kv(model=MODEL, token_ids=turn2, deadline_ms=5000, controller="fixed-L3",
                                      prefix=True)
            whole = await conn.fetch_kv(model=MODEL, token_ids=turn1, deadline_ms=5000, controller="fixed-L3",
                                        prefix=True)  # stored whole: the same as without prefix
            return res, whole, dict(server.stats)

    res, whole, stats = run(go())
    n_stored = len(turn1)
    assert res.report.levels == ["high", "high", "high"] and res.stored_tokens == n_stored
    assert res.missing_token_ids == turn2[n_stored:] and res.text_token_ids() == turn2[n_stored:]
    pkv, n = res.prefix_kv()
    assert n == n_stored and pkv[0][0].shape == (1, 2, n_stored, 16)
    err = (pkv[0][0].float() - kv[0][0].float()).abs().mean() / kv[0][0].float().abs().mean()
    assert err < 0.1
    assert whole.missing_token_ids == [] and whole.stored_tokens == len(turn1) and len(whole.chunks) == 3
    assert whole.text_token_ids() == []
    assert stats["prefix_hits"] == 1 and stats["refused"] == 2


def test_a_prefix_fetch_by_hashes_says_how_many_chunks_were_missing(service):
    ids = list(range(3 * CHUNK))
    stored = service.ingest_sync(MODEL, ids[:2 * CHUNK], make_kv(2 * CHUNK, 9))
    from tokenwire.daemon.kv_store import chunk_hashes

    asked = chunk_hashes(ids, model=MODEL, chunk_tokens=CHUNK)
    assert asked[:2] == stored

    async def go():
        async with kv_client(service) as (conn, _):
            with pytest.raises(KVNotFound):
                await conn.fetch_kv(model=MODEL, hashes=asked, deadline_ms=5000)
            return await conn.fetch_kv(model=MODEL, hashes=asked, deadline_ms=5000, controller="fixed-L1",
                                       prefix=True)

    res = run(go())
    assert len(res.chunks) == 2 and res.missing_chunks == 1 and res.missing_token_ids == []
    assert res.prefix_kv()[1] == 2 * CHUNK


def test_prefix_kv_and_text_token_ids_are_always_the_whole_context():
    """The controller can send a chunk as KV after one sent as text (a slow link prior, then a fast measured
    link: text, high, high, high). Its ids were in neither list: the engine prefilled a shorter context."""
    from tokenwire.transport.kv_channel import ChunkResult, FetchReport, KVFetchResult

    def kv(n):
        return [(torch.zeros(1, 2, n, 16), torch.zeros(1, 2, n, 16))]

    report = FetchReport.from_timings(deadline_ms=1000, controller="x", sent_at=0.0, end=0.1, received={},
                                      decode_times={})
    chunks = [ChunkResult(0, "high", kv(2), None), ChunkResult(1, "text", None, [12, 13]),
              ChunkResult(2, "high", kv(2), None)]
    ids = [10, 11, 12, 13, 14, 15, 16]  # a prefix fetch: 16 was not stored
    res = KVFetchResult(chunks, report, (1, 2, 16), missing_token_ids=[16], token_ids=ids)
    assert res.prefix_kv()[1] == 2 and res.text_token_ids() == [12, 13, 14, 15, 16]
    by_hashes = KVFetchResult(chunks, report, (1, 2, 16), missing_chunks=1)
    with pytest.raises(ValueError, match="chunk 2 came as KV after a text chunk"):
        by_hashes.text_token_ids()
    text_tail = KVFetchResult(chunks[:2], report, (1, 2, 16))
    assert text_tail.text_token_ids() == [12, 13]


def test_a_server_answering_with_another_contexts_length_is_an_error_not_data(service):
    """The client checks KV_META against what it asked: a server resolving a shorter prefix than asked (without
    ``prefix``), or more tokens than asked, gives no result the engine would take for the context's KV."""
    ids = list(range(2 * CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(len(ids), 10))
    real = service.resolve

    async def prefix_always(fetch):
        fetch.prefix = True
        return await real(fetch)

    async def go():
        async with kv_client(service) as (conn, _):
            service.resolve = prefix_always
            with pytest.raises(KVError, match="sent 64 tokens of KV for a context of 70"):
                await conn.fetch_kv(model=MODEL, token_ids=ids + [1] * 6, deadline_ms=5000, controller="fixed-L1")
            service.resolve = real
            return await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L1")

    assert run(go()).stored_tokens == 2 * CHUNK


def test_chunks_that_do_not_add_up_to_kv_meta_are_an_error(service, monkeypatch):
    """KV_META's token count sets which of the asked ids are missing: chunks that cover fewer tokens than it
    announced would leave a gap between the KV and the ids the engine prefills."""
    from tokenwire.transport.kv_channel import ContextPlan

    ids = list(range(2 * CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(len(ids), 11))
    monkeypatch.setattr(ContextPlan, "tokens", property(lambda self: sum(self.token_counts) + 1))

    async def go():
        async with kv_client(service) as (conn, _):
            with pytest.raises(KVError, match="announced 2 chunks of 65 tokens and sent 2 of 64"):
                await conn.fetch_kv(model=MODEL, token_ids=ids + [1] * 9, deadline_ms=5000, controller="fixed-L1",
                                    prefix=True)

    run(go())


def test_corrupt_store_object_is_reencoded_from_source(service, tmp_path):
    ids = list(range(CHUNK))
    h = service.ingest_sync(MODEL, ids, make_kv(CHUNK, 3), prewarm=["high"])[0]
    path = tmp_path / "kv" / h[:2] / object_key(h, "high")
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0xFF
    path.write_bytes(bytes(blob))
    res, _ = run(_fetch(service, ids, deadline_ms=5000, controller="fixed-L3"))
    assert service.store.stats.corrupt == 1 and service.encodes == 2  # detected, then encoded again
    assert res.report.levels == ["high"]


def test_corrupt_chunk_on_the_wire_is_typed_error(service):
    ids = list(range(2 * CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(len(ids), 4))
    real = service.chunk

    async def corrupting(plan, index, level):
        data = bytearray(await real(plan, index, level))
        if index == 1:
            data[len(data) // 2] ^= 0x40  # valid frame CRC (computed by the sender), broken bitstream
        return bytes(data)

    service.chunk = corrupting

    async def go():
        async with kv_client(service) as (conn, _):
            with pytest.raises(KVCorruptChunk):
                await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L2")
            service.chunk = real
            return await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L2")

    assert run(go()).report.levels == ["medium", "medium"]


def test_fetch_by_chunk_hashes_and_onnx_controller(service):
    ids = list(range(3 * CHUNK))
    hashes = service.ingest_sync(MODEL, ids, make_kv(len(ids), 5))

    async def go():
        async with kv_client(service, ServerTuning(forecaster="onnx"), congestion="prague") as (conn, server):
            server.on_fetch_closed = closed.append
            return await conn.fetch_kv(model=MODEL, hashes=[bytes.fromhex(h) for h in hashes],
                                       deadline_ms=10_000, controller="tokenwire")

    closed = []
    res = run(go())
    assert len(res.chunks) == 3 and all(c.kv is not None for c in res.chunks)
    # the server reports each decision's inputs; the first had no measurement of this fetch (the prior decided)
    assert len(closed) == 1 and closed[0].complete and closed[0].levels == res.report.levels
    decisions = closed[0].decisions
    assert [(d["index"], d["level"]) for d in decisions] == list(enumerate(res.report.levels))
    assert decisions[0]["age_s"] is None and not decisions[0]["fresh"]
    assert all(d["time_left_s"] > 0 and len(d["planned"]) == 3 - d["index"] for d in decisions)


def test_a_fetch_on_an_ended_connection_fails_at_once(service):
    """After the connection ends (here the server shuts down; in the field QUIC's idle timeout) a fetch raises a
    typed error right away instead of waiting for its timeout."""
    ids = list(range(CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(len(ids), 7))

    async def go():
        server = await serve_kv(service, "127.0.0.1", 0, congestion="reno")
        async with connect_kv("127.0.0.1", server.port, verify=False) as conn:
            assert not conn.closed
            server.close()
            await asyncio.wait_for(conn.wait_closed(), 10)
            assert conn.closed
            t0 = time.monotonic()
            with pytest.raises(RemoteError, match="KV connection closed"):
                await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L1")
            return time.monotonic() - t0

    assert run(go()) < 1.0


def test_unix_socket_ingest(service, tmp_path):
    ids = list(range(40))
    kv = make_kv(40, 6)
    sock = tmp_path / "ingest.sock"

    async def go():
        srv = await serve_kv_ingest(sock, service)
        try:
            loop = asyncio.get_running_loop()
            hashes = await loop.run_in_executor(None, lambda: put_kv_unix(sock, MODEL, ids, kv, prewarm=["low"]))
            with pytest.raises(KVIngestError):
                await loop.run_in_executor(None, lambda: put_kv_unix(sock, MODEL, ids[:10], kv))
            return hashes
        finally:
            srv.close()

    hashes = run(go())
    assert len(hashes) == 2 and service.store.contains(object_key(hashes[0], "low"))
    src = service.store.get(object_key(hashes[1], "src"))
    t = torch.frombuffer(bytearray(src), dtype=torch.float16).reshape(4, 2, 8, 32)
    assert torch.equal(t[0, 0], kv[0][0][0, :, 32:40].permute(1, 0, 2).reshape(8, 32))


def test_ingest_rejects_bad_input(service):
    with pytest.raises(KVIngestError):
        service.ingest_sync(MODEL, [1, 2, 3], make_kv(4))
    bad = make_kv(4)
    bad[0][0][0, 0, 0, 0] = float("nan")
    with pytest.raises(KVIngestError):
        service.ingest_sync(MODEL, [1, 2, 3, 4], bad)


def test_kv_channel_imports_no_torch():
    code = ("import sys, tokenwire.transport.kv_channel, tokenwire.transport.kv_controller, "
            "tokenwire.daemon.service, tokenwire.daemon.kv_service, tokenwire.daemon.kv_meta, "
            "tokenwire.daemon.kv_ingest, tokenwire.daemon.kv_runtime, "
            "tokenwire.predictor.bandwidth as b; b.OnnxForecaster().forecast(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    assert os.system(f"{sys.executable} -c \"{code}\"") == 0


def test_daemon_with_kv_section_serves_ingested_context(tmp_path):
    from tokenwire.daemon.config import ConfigError, parse_config
    from tokenwire.daemon.service import Daemon

    sock = tmp_path / "kv.sock"
    cfg = parse_config({"server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": "127.0.0.1:0"},
                        "kv": {"enabled": True, "listen": "127.0.0.1:0", "directory": str(tmp_path / "store"),
                               "capacity_mb": 64, "chunk_tokens": CHUNK, "ingest_socket": str(sock),
                               "forecaster": "ewma"}})
    with pytest.raises(ConfigError, match=r"kv\.redis_url"):
        parse_config({"kv": {"backend": "redis"}})
    with pytest.raises(ConfigError, match=r"kv\.chunk_token"):
        parse_config({"kv": {"chunk_token": 5}})
    ids = list(range(50))

    async def go():
        daemon = Daemon(cfg)
        await daemon.start()
        try:
            loop = asyncio.get_running_loop()
            two_done = asyncio.Event()
            daemon.kv.server.fetch_closed_listeners.append(
                lambda ev: daemon.kv.server.stats["completed"] >= 2 and two_done.set())
            await loop.run_in_executor(None, lambda: put_kv_unix(sock, MODEL, ids, make_kv(50, 7),
                                                                 prewarm=["low"]))
            with pytest.raises(KVIngestError):
                await loop.run_in_executor(None, lambda: put_kv_unix(sock, MODEL, ids, make_kv(49, 7)))
            async with connect_kv("127.0.0.1", daemon.kv.server.port, verify=False) as conn:
                res = await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L1")
                longer = await conn.fetch_kv(model=MODEL, token_ids=ids + [9] * 20, deadline_ms=5000,
                                             controller="fixed-L1", prefix=True)
                with pytest.raises(KVNotFound):
                    await conn.fetch_kv(model=MODEL, token_ids=[5] * 10, deadline_ms=5000)
            await asyncio.wait_for(two_done.wait(), 10)  # a fetch ends at the server when the client's FIN comes
            host, port = daemon.metrics_address
            text = await loop.run_in_executor(None, lambda: urllib.request.urlopen(
                f"http://{host}:{port}/metrics", timeout=5).read().decode())
            return res, longer, text
        finally:
            await daemon.stop()

    res, longer, text = run(go())
    assert res.report.levels == ["low", "low"] and res.prefix_kv()[1] == 50
    assert longer.prefix_kv()[1] == 50 and longer.text_token_ids() == [9] * 20  # the shorter last chunk too
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line.startswith("tokenwire_kv_")}
    assert samples['tokenwire_kv_fetches_total{outcome="completed"}'] == 2
    assert samples['tokenwire_kv_fetches_total{outcome="refused"}'] == 1
    assert samples["tokenwire_kv_prefix_fetches_total"] == 1
    assert samples['tokenwire_kv_chunks_total{level="low"}'] == 4
    assert samples['tokenwire_kv_ingests_total{outcome="stored"}'] == 1
    assert samples['tokenwire_kv_ingests_total{outcome="refused"}'] == 1
    assert samples["tokenwire_kv_ingested_tokens_total"] == 50
    assert samples["tokenwire_kv_encodes_total"] == 2  # the prewarm; the fetches read what it stored
    assert samples["tokenwire_kv_fetch_deadline_ratio_count"] == 2
    assert samples['tokenwire_kv_fetch_deadline_ratio_bucket{le="1.0"}'] == 2
    assert 0 < samples["tokenwire_kv_store_bytes"] <= samples["tokenwire_kv_store_capacity_bytes"] == 64 << 20


from tests.test_kv_store import redis_url  # noqa: E402, F401  (the real-server fixture)


def test_service_on_the_redis_backend(redis_url):  # noqa: F811
    import uuid

    from tokenwire.daemon.kv_store_redis import RedisChunkStore

    svc = KVService(RedisChunkStore(redis_url, 64 << 20, prefix=f"tw-test-{uuid.uuid4().hex}:"), chunk_tokens=CHUNK)
    try:
        ids = list(range(2 * CHUNK))
        svc.ingest_sync(MODEL, ids, make_kv(len(ids), 8))
        res, _ = run(_fetch(svc, ids, deadline_ms=5000, controller="fixed-L2"))
        assert res.report.levels == ["medium", "medium"] and svc.encodes == 2
    finally:
        svc.close()


def test_fresh_rate_comes_from_this_fetchs_quic_acks():
    """The server measures a fetch's delivery rate from QUIC ACKs of its chunk streams (before any KV_ACK)."""
    from types import SimpleNamespace

    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.packet_builder import QuicDeliveryState
    from aioquic.quic.stream import QuicStreamSender

    from tokenwire.transport.frames import StreamDecoder
    from tokenwire.transport.kv_channel import KVServerSession, ServerFetch

    quic = QuicConnection(configuration=QuicConfiguration(is_client=True))
    session = KVServerSession(quic, tuning=ServerTuning(forecaster="ewma"))
    f = ServerFetch(0, None, StreamDecoder(), 0.0)
    session.fetches[0] = f
    sender = QuicStreamSender(3, True)
    sender.write(b"x" * 300_000, end_stream=True)
    quic._streams[3] = SimpleNamespace(sender=sender)
    f.chunk_streams.append((3, 300_000))
    session.poll(0.9)
    assert f.ack_mark is None and session.fresh_rate(f, 0.9) is None  # nothing acknowledged yet
    sender.on_data_delivery(QuicDeliveryState.ACKED, 0, 20_000, False)
    session.poll(1.0)
    assert f.ack_mark == (1.0, 20_000)
    sender.on_data_delivery(QuicDeliveryState.ACKED, 20_000, 120_000, False)
    assert session.fresh_rate(f, 1.05) is None  # spans less than FRESH_MIN_S
    assert session.fresh_rate(f, 1.2) == pytest.approx(100_000 * 8 / 0.2)
    sender.on_data_delivery(QuicDeliveryState.ACKED, 200_000, 250_000, False)  # out of order: counts too
    assert session.fresh_rate(f, 1.2) == pytest.approx(150_000 * 8 / 0.2)
    sender.on_data_delivery(QuicDeliveryState.LOST, 120_000, 200_000, False)  # lost: does not
    assert session.fresh_rate(f, 1.2) == pytest.approx(150_000 * 8 / 0.2)
    f.chunk_streams.append((7, 40_000))  # a stream aioquic has already discarded was delivered in full
    assert session._acked(f) == 210_000
    # written at 1.0: the whole-fetch rate (210 KB in 0.2 s) is the higher one, the since-first-ACK rate stands
    f.first_sent_at = 1.0
    assert session.fresh_rate(f, 1.2) == pytest.approx(190_000 * 8 / 0.2)
    # written at 0.0, first ACK progress only at 1.0 (a stall): the burst after it does not count as the rate
    f.first_sent_at = 0.0
    assert session.fresh_rate(f, 1.2) == pytest.approx(210_000 * 8 / 1.2)


def test_a_fetch_starts_without_an_earlier_fetchs_stale_samples():
    """The connection's forecaster carries on while its samples are recent; older ones are dropped at fetch start."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    from tokenwire.transport.frames import KvFetch, StreamDecoder
    from tokenwire.transport.kv_channel import ContextPlan, KVServerSession, ServerFetch
    from tokenwire.transport.kv_controller import LEVELS, STALE_S

    made = []

    def factory(kind):
        from tokenwire.predictor.bandwidth import make_forecaster

        made.append(make_forecaster(kind))
        return made[-1]

    quic = QuicConnection(configuration=QuicConfiguration(is_client=True))
    session = KVServerSession(quic, tuning=ServerTuning(forecaster="ewma"), forecaster_factory=factory)
    plan = ContextPlan(16, [16], [1000], [dict.fromkeys(LEVELS, 100)], (1, 1, 1), 0, "float16")

    def start(sid, now):
        f = ServerFetch(sid, KvFetch(model=MODEL, deadline_ms=1000, token_ids=[1] * 16), StreamDecoder(), now)
        session.fetches[sid] = f
        session.start(sid, plan, now)
        return f

    a = start(0, 10.0)
    a.forecaster.observe(100_000, 0.1)
    session._sample_at[id(a.forecaster)] = 10.2  # what a chunk's KV_ACK records
    b = start(4, 10.2 + STALE_S / 2)  # recent samples: the same forecaster, history and all
    assert b.forecaster is a.forecaster and b.forecaster.forecast() is not None
    c = start(8, 10.2 + 2 * STALE_S)  # stale: a fresh one
    assert c.forecaster is not a.forecaster and c.forecaster.forecast() is None and len(made) == 2


def test_first_chunks_are_planned_on_the_connections_link_prior():
    """After LINK_MIN_SAMPLES chunk rates, a fetch's prior is their median and low quantile, not the config's;
    before, the config's capped by the rates measured so far."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    from tokenwire.transport.frames import KvAck, KvFetch, StreamDecoder
    from tokenwire.transport.kv_controller import LEVELS, PRIOR_LOW
    from tokenwire.transport.kv_server_session import LINK_MIN_SAMPLES, ContextPlan, KVServerSession, ServerFetch

    quic = QuicConnection(configuration=QuicConfiguration(is_client=True))
    session = KVServerSession(quic, tuning=ServerTuning(forecaster="ewma", prior_bps=5e6))
    plan = ContextPlan(16, [16], [1000], [dict.fromkeys(LEVELS, 100)], (1, 1, 1), 0, "float16")
    rates = [1e6, 2e6, 3e6, 4e6, 6e6, 8e6, 9e6, 10e6, 12e6, 20e6]  # bit/s, one chunk per fetch
    for k, bps in enumerate(rates):
        f = ServerFetch(4 * k, KvFetch(model=MODEL, deadline_ms=1000, token_ids=[1] * 16), StreamDecoder(), k)
        session.fetches[4 * k] = f
        session.start(4 * k, plan, float(k))
        # fewer than LINK_MIN_SAMPLES rates: the configured prior, capped by their lower median
        expect = ((min(5e6, sorted(rates[:k])[(k - 1) // 2]) if k else 5e6, PRIOR_LOW) if k < LINK_MIN_SAMPLES
                  else session.link_prior())
        assert (f.controller.prior_bps, f.controller.prior_low) == pytest.approx(expect, rel=1e-4)
        f.next_index = 1  # the chunk went out
        session._on_ack(f, KvAck(0, 100_000, 0, int(100_000 * 8e6 / bps), None), k + 0.5)
    assert list(session.link_rates) == pytest.approx(rates, rel=1e-4)  # whole microseconds on the wire
    med, low_share = session.link_prior()
    assert med == pytest.approx(8e6, rel=1e-4)  # (upper) median and 10 % quantile of the ten rates
    assert med * low_share == pytest.approx(1e6, rel=1e-4)
    session.tuning.link_prior = False
    assert session.link_prior() == (5e6, PRIOR_LOW)


def test_next_chunk_waits_for_acks_not_just_for_the_send_buffer():
    """With a large congestion window the previous chunk leaves the send buffer at once; the next decision
    waits until QUIC has acknowledged all but a look-ahead of it, so it sees the newest delivery rate."""
    from types import SimpleNamespace

    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.packet_builder import QuicDeliveryState
    from aioquic.quic.stream import QuicStreamSender

    from tokenwire.transport.frames import StreamDecoder
    from tokenwire.transport.kv_channel import KVServerSession, ServerFetch

    quic = QuicConnection(configuration=QuicConfiguration(is_client=True))
    session = KVServerSession(quic, tuning=ServerTuning(forecaster="ewma", prior_bps=8e6))
    f = ServerFetch(0, None, StreamDecoder(), 0.0)
    f.forecaster = session._make_forecaster("ewma")
    sender = QuicStreamSender(3, True)
    sender.write(b"x" * 1_000_000, end_stream=True)
    sender.highest_offset = 1_000_000  # all of it handed to the network: nothing unsent
    quic._streams[3] = SimpleNamespace(sender=sender)
    f.chunk_streams.append((3, 1_000_000))
    f.last_stream = 3
    assert session._unsent(3) == 0
    # no RTT sample: 0.1 s of min-RTT + 0.1 s at the 1 MB/s prior = 200 kB may stay unacknowledged
    assert session._lookahead(f, 0.0) == 200_000
    assert session._unacked(f) == 1_000_000 > session._lookahead(f, 0.0)
    sender.on_data_delivery(QuicDeliveryState.ACKED, 0, 850_000, False)
    assert session._unacked(f) == 150_000 <= session._lookahead(f, 0.0)


def _accepted_fetch(tuning, sizes, chunks, deadline_ms, rtt=None, rest_tokens=0):
    """A server session (sans-I/O, no socket) with one fetch of ``chunks`` 16-token chunks accepted at t = 0;
    ``rtt``: QUIC's (min, smoothed) RTT then."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    from tokenwire.transport.frames import KvFetch, StreamDecoder
    from tokenwire.transport.kv_channel import ContextPlan, KVServerSession, ServerFetch

    quic = QuicConnection(configuration=QuicConfiguration(is_client=True))
    if rtt is not None:
        quic._loss._rtt_min, quic._loss._rtt_smoothed = rtt
        quic._loss._rtt_initialized = True
    session = KVServerSession(quic, tuning=tuning)
    plan = ContextPlan(16 * chunks, [16] * chunks, [1000] * chunks, [dict(sizes) for _ in range(chunks)], (1, 1, 1),
                       0, "float16", rest_tokens=rest_tokens)
    f = ServerFetch(0, KvFetch(model=MODEL, deadline_ms=deadline_ms, token_ids=[1] * 16 * chunks), StreamDecoder(),
                    0.0)
    session.fetches[0] = f
    session.start(0, plan, 0.0)
    return quic, session, f


@pytest.mark.parametrize("legacy", [False, True])
def test_in_flight_bytes_are_what_quic_has_not_acknowledged(legacy):
    """The next chunk is decided before the previous one's KV_ACK; only its unacknowledged bytes are still to
    cross the link (the legacy rule counts the whole chunk until its KV_ACK)."""
    from types import SimpleNamespace

    from aioquic.quic.packet_builder import QuicDeliveryState
    from aioquic.quic.stream import QuicStreamSender

    from tokenwire.transport.kv_channel import KVChunkNeeded

    quic, session, f = _accepted_fetch(ServerTuning(forecaster="ewma", prior_bps=8e6, legacy_controller=legacy),
                                       {"low": 1_000_000, "medium": 1_400_000, "high": 1_900_000}, 2, 3000)
    sender = QuicStreamSender(3, True)  # chunk 0, written and handed to the network
    sender.write(b"x" * 1_000_000, end_stream=True)
    sender.highest_offset = 1_000_000
    quic._streams[3] = SimpleNamespace(sender=sender)
    f.chunk_streams.append((3, 1_000_000))
    f.last_stream, f.next_index, f.bytes_written, f.levels = 3, 1, 1_000_000, ["low"]
    sender.on_data_delivery(QuicDeliveryState.ACKED, 0, 900_000, False)  # all but 100 kB delivered, no KV_ACK
    events = session.poll(1.0)
    assert [type(e) for e in events] == [KVChunkNeeded]
    d = f.decisions[-1]
    assert d["inflight_bytes"] == (1_000_000 if legacy else 100_000)
    if not legacy:  # 2 s left, the in-flight 100 kB priced at the 1 MB/s prior: ~1.9 s for the last chunk
        assert d["budget_s"] == pytest.approx(1.9, abs=0.05)


def test_text_chunks_sent_count_their_recompute_against_the_time_left():
    """A text chunk is recomputed by the client after the transfer: once sent, its recompute is committed time."""
    from tokenwire.transport.kv_channel import KVChunkNeeded
    from tokenwire.transport.kv_controller import TEXT

    _, session, f = _accepted_fetch(ServerTuning(forecaster="ewma", prior_bps=8e6, recompute_us_per_token=100_000),
                                    {"low": 100_000, "medium": 140_000, "high": 190_000}, 3, 5000)  # 1.6 s per chunk
    assert [type(e) for e in session.poll(0.5)] == [KVChunkNeeded]
    assert f.decisions[0]["time_left_s"] == pytest.approx(4.5, abs=0.01)
    f.pending, f.next_index, f.levels = False, 1, [TEXT]  # chunk 0 went out as text (no bytes to wait for)
    assert [type(e) for e in session.poll(1.0)] == [KVChunkNeeded]
    assert f.decisions[1]["time_left_s"] == pytest.approx(4.0 - 1.6, abs=0.01)


def test_a_prefix_fetchs_missing_tokens_count_their_recompute_against_the_time_left():
    """A prefix fetch leaves the tokens the store lacks to the engine, prefilled after the transfer: committed
    time from the first decision on."""
    from tokenwire.transport.kv_channel import KVChunkNeeded

    _, session, f = _accepted_fetch(ServerTuning(forecaster="ewma", prior_bps=8e6, recompute_us_per_token=100_000),
                                    {"low": 100_000, "medium": 140_000, "high": 190_000}, 3, 5000, rest_tokens=10)
    assert [type(e) for e in session.poll(0.5)] == [KVChunkNeeded]
    assert f.decisions[0]["time_left_s"] == pytest.approx(4.5 - 1.0, abs=0.01)  # 10 tokens at 0.1 s each


@pytest.mark.parametrize("legacy", [False, True])
def test_time_left_takes_the_paths_min_rtt_not_a_queue_inflated_smoothed_rtt(legacy):
    """After a fetch filled the bottleneck queue the smoothed RTT still carries that queue (no ACKs between
    fetches); the request's and the last byte's trips are the path's min-RTT (the legacy rule keeps the smoothed)."""
    from tokenwire.transport.kv_channel import KVChunkNeeded

    quic, session, f = _accepted_fetch(ServerTuning(forecaster="ewma", prior_bps=8e6, legacy_controller=legacy),
                                       {"low": 100_000, "medium": 140_000, "high": 190_000}, 2, 3000, rtt=(0.04, 0.6))
    assert [type(e) for e in session.poll(0.5)] == [KVChunkNeeded]
    rtt = 0.6 if legacy else 0.04
    assert f.decisions[0]["time_left_s"] == pytest.approx(2.5 - rtt / 2)
    assert f.controller.rtt_s == rtt  # the controller takes the last byte's half
    # before QUIC has an RTT sample (min-RTT still infinite), the smoothed RTT stands in
    quic._loss._rtt_min = math.inf
    assert session._path_rtt() == 0.6


def test_connect_kv_fails_with_a_reason():
    """The KV client pointed at the token port (another ALPN), or at a silent one: a reason at once, not a
    bare ConnectionError after aioquic's 60 s idle timeout."""
    import socket

    from tokenwire.transport.client import HandshakeError
    from tokenwire.transport.server import serve

    async def nothing(request):
        yield ""

    async def go():
        server = await serve(nothing, host="127.0.0.1", port=0)
        try:
            with pytest.raises(HandshakeError) as wrong_alpn:
                async with connect_kv("127.0.0.1", server.port, verify=False):
                    pass
        finally:
            server.close()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
            silent.bind(("127.0.0.1", 0))
            with pytest.raises(ConnectionError, match="no QUIC handshake") as no_answer:
                async with connect_kv("127.0.0.1", silent.getsockname()[1], verify=False, timeout=0.3):
                    pass
        return wrong_alpn.value, no_answer.value

    wrong_alpn, no_answer = asyncio.run(asyncio.wait_for(go(), 30))
    assert wrong_alpn.tls_alert == 120 and "ALPN" in str(wrong_alpn)  # no_application_protocol
    assert not isinstance(no_answer, HandshakeError)


def test_a_fractional_deadline_rounds_up_to_whole_milliseconds():
    from tokenwire.transport.kv_client import _deadline_ms

    assert [_deadline_ms(x) for x in (0.4, 1500.2, 2000, 0, -0.5)] == [1, 1501, 2000, 0, 0]  # 0: refused later


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"deadline_ms": 0}, r"invalid fetch: deadline_ms: 0 out of range"),  # the argument, not the wire's kvfetch.dl
    ({"deadline_ms": 1000, "controller": "nope"}, "invalid fetch: controller: 'nope' is not one of"),
    ({"deadline_ms": 1000, "token_ids": [-1]}, r"invalid fetch: token_ids: -1 out of range"),
    ({"deadline_ms": float("nan")}, "deadline_ms must be a finite number"),
    ({"deadline_ms": float("inf")}, "deadline_ms must be a finite number"),
    ({"deadline_ms": 1000, "token_ids": [1, 2.0]}, r"token_ids\[1\] is 2.0 \(float\), not an integer"),
    ({"deadline_ms": 1000, "token_ids": [True]}, r"token_ids\[0\] is True \(bool\)"),
    ({"deadline_ms": 1000, "token_ids": None, "hashes": ["not hex"]}, r"hashes\[0\] is not a hex string"),
], ids=["deadline", "controller", "token_id", "deadline-nan", "deadline-inf", "float-id", "bool-id", "bad-hex"])
def test_invalid_fetch_is_refused_locally_and_the_connection_lives_on(service, kwargs, message):
    ids = list(range(CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(CHUNK, 3))

    async def go():
        async with kv_client(service) as (conn, _):
            with pytest.raises(ValueError, match=message):
                await conn.fetch_kv(model=MODEL, **{"token_ids": ids, **kwargs})
            return await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L1")

    assert run(go()).report.levels == ["low"]


@pytest.mark.parametrize("header", [b"\xff\xfe not utf-8", b"[" * 100_000, b"x" * (1 << 24) + b"y"],
                         ids=["utf16-guess", "deep-nesting", "over-long"])
def test_unix_socket_ingest_answers_a_bad_header(service, tmp_path, header):
    """A header the parser chokes on gets an error line before the socket closes (the byte stream is out of
    step). These three escaped the handler: no reply, a traceback in the daemon's log."""
    import json

    sock = tmp_path / "ingest.sock"

    async def go():
        srv = await serve_kv_ingest(sock, service)
        try:
            reader, writer = await asyncio.open_unix_connection(str(sock))
            writer.write(header + b"\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.readline(), 20)
            rest = await asyncio.wait_for(reader.read(), 20)
            writer.close()
            return answer, rest
        finally:
            srv.close()

    answer, rest = run(go())
    assert json.loads(answer)["ok"] is False and rest == b""


def test_fetch_takes_a_tokenizers_numpy_ids_and_the_hex_hashes_ingest_returns(service):
    """numpy integers (a tokenizer's array) failed in msgpack with a TypeError; ingest's hex hash strings were
    refused as "each chunk hash must be 16 bytes"."""
    import numpy as np

    ids = list(range(2 * CHUNK))
    hashes = service.ingest_sync(MODEL, ids, make_kv(len(ids), 9), prewarm=["low"])
    assert all(isinstance(h, str) for h in hashes)

    async def go():
        async with kv_client(service) as (conn, _):
            by_ids = await conn.fetch_kv(model=MODEL, token_ids=np.array(ids, dtype=np.int64), deadline_ms=5000,
                                         controller="fixed-L1")
            by_hashes = await conn.fetch_kv(model=MODEL, hashes=hashes, deadline_ms=np.float64(5000),
                                            controller="fixed-L1")
            return by_ids, by_hashes

    by_ids, by_hashes = run(go())
    for res in (by_ids, by_hashes):
        assert res.report.levels == ["low", "low"] and res.prefix_kv()[1] == len(ids)
    assert torch.equal(by_ids.prefix_kv()[0][0][0], by_hashes.prefix_kv()[0][0][0])


def test_a_fetch_failing_on_one_chunk_leaves_no_unretrieved_decode_errors(service, monkeypatch):
    """When chunk 0 fails to decode, the other chunks' decodes were never awaited: asyncio logged "Future
    exception was never retrieved" for each one that failed too."""
    import gc

    from tokenwire.transport import kv_channel as kc

    ids = list(range(3 * CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(len(ids), 10), prewarm=["low"])

    def broken(self, pf, hdr, payload):
        raise KVCorruptChunk(f"chunk {hdr.index} does not decode")

    monkeypatch.setattr(kc.KVConnection, "_decode", broken)
    reported: list[dict] = []

    async def go():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: reported.append(ctx))
        async with kv_client(service) as (conn, _):
            try:
                await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L1")
            except KVCorruptChunk as exc:
                failed = str(exc)
            # every decode has run (one worker thread, in order) and its outcome reached its future
            await asyncio.get_running_loop().run_in_executor(conn._pool, lambda: None)
            gc.collect()
            return failed

    assert run(go()) == "chunk 0 does not decode"
    assert [c.get("message") for c in reported] == []


def test_fetches_carry_the_auth_token_given_to_connect_kv(service):
    """A server with authorize= checks each fetch's token; the SDK had no way to send one."""
    ids = list(range(CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(CHUNK, 11), prewarm=["low"])
    seen: list[str | None] = []

    def authorize(token):
        seen.append(token)
        return token == "s3cret"

    async def go():
        server = await serve_kv(service, "127.0.0.1", 0, congestion="reno", tuning=ServerTuning(forecaster="ewma"),
                                authorize=authorize)
        try:
            async with connect_kv("127.0.0.1", server.port, verify=False, auth_token="s3cret") as conn:
                levels = [(await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000,
                                               controller="fixed-L1")).report.levels for _ in range(2)]
            refused = []
            for token in (None, "wrong"):
                async with connect_kv("127.0.0.1", server.port, verify=False, auth_token=token) as conn:
                    with pytest.raises(RemoteError) as ei:
                        await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L1")
                    refused.append((ei.value.code, str(ei.value)))
                    assert not conn.closed  # only the fetch is refused
            return levels, refused
        finally:
            server.close()

    levels, refused = run(go())
    assert levels == [["low"], ["low"]]
    assert refused == [(ErrorCode.UNAUTHORIZED, "missing or invalid auth token")] * 2
    assert seen == ["s3cret", "s3cret", None, "wrong"]


def test_a_long_fetch_over_the_servers_limit_fails_alone(service):
    """End to end: a fetch of many token ids (its KV_FETCH spans packets) refused for the concurrency limit.
    The rest of its KV_FETCH raised RuntimeError in the server's event loop (the datagram's other events lost)
    or, once a slot had freed, closed the whole connection (FRAME_TOO_LARGE)."""
    from tokenwire.transport import kv_channel as kc

    ids = list(range(CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(CHUNK, 12), prewarm=["low"])
    real = service.resolve
    resolving, release = asyncio.Event(), asyncio.Event()

    async def held(fetch):  # the first fetch holds its slot until the long one has been refused
        resolving.set()
        await release.wait()
        return await real(fetch)

    service.resolve = held
    reported: list[dict] = []

    async def go():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: reported.append(ctx))
        async with kv_client(service) as (conn, server):
            next(iter(server.protocols)).kv.max_fetches = 1
            first = asyncio.ensure_future(conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000,
                                                        controller="fixed-L1"))
            await resolving.wait()
            with pytest.raises(RemoteError) as ei:
                await conn.fetch_kv(model=MODEL, token_ids=list(range(40_000)), deadline_ms=5000)
            release.set()
            service.resolve = real
            res = await first
            again = await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L1")
            return ei.value.code, res, again, dict(server.stats), next(iter(server.protocols)).kv

    code, res, again, stats, session = run(go())
    assert [c.get("message") for c in reported] == []
    assert code == ErrorCode.LIMIT_EXCEEDED
    assert res.report.levels == again.report.levels == ["low"]
    assert isinstance(session, kc.KVServerSession) and not session._ended  # the client's FIN or reset came
    assert stats["refused"] == 1 and stats["fetches"] == 2  # the long one never became a fetch


def test_a_chunk_in_another_dtype_than_kv_meta_is_a_corrupt_chunk(service):
    """The client checks each chunk's dtype against KV_META: a mix came back from prefix_kv() as whatever
    torch.cat promoted it to (fp32), neither what was put nor what KV_META announced."""
    import dataclasses

    ids = list(range(CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(CHUNK, 13), prewarm=["low"])  # fp16
    real, real_chunk = service.resolve, service.chunk

    async def announcing_bf16(fetch):
        return dataclasses.replace(await real(fetch), dtype="bfloat16")

    async def serving_as_stored(plan, index, level):  # past the server's own check of the plan
        return await real_chunk(dataclasses.replace(plan, dtype="float16"), index, level)

    async def go():
        async with kv_client(service) as (conn, _):
            service.resolve, service.chunk = announcing_bf16, serving_as_stored
            with pytest.raises(KVCorruptChunk, match="chunk 0 is float16, KV_META says bfloat16"):
                await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L1")
            service.resolve, service.chunk = real, real_chunk
            return await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L1")

    assert run(go()).prefix_kv()[0][0][0].dtype == torch.float16


def test_a_stalled_server_fails_the_fetch_soon_after_its_deadline(service, monkeypatch):
    """Without timeout_s the client waited max(60 s, 20 x deadline) for a server that never answers. The quiet
    limits are scaled down (10 s before KV_META, 2 s after: 1.5 s and 0.5 s here; the defaults' bounds are
    tests/test_kv_client_s31.py's, on a fake clock), kept apart so that the pre-KV_META one is seen to apply."""
    from tokenwire.transport import kv_client as kvc

    monkeypatch.setattr(kvc, "PRE_META_QUIET_S", 1.5)
    monkeypatch.setattr(kvc, "SERVER_RESOLVE_FLOOR_S", 0.3)  # (3 x it would otherwise set the pre-KV_META bound)
    monkeypatch.setattr(kvc, "QUIET_FLOOR_S", 0.5)
    ids = list(range(CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(CHUNK, 14), prewarm=["low"])
    real = service.resolve
    release = asyncio.Event()

    async def stalled(fetch):
        await release.wait()
        return await real(fetch)

    async def go():
        async with kv_client(service) as (conn, _):
            service.resolve = stalled
            t0 = time.monotonic()
            try:
                with pytest.raises(KVError, match="timed out: 0 chunks received, no KV_META") as ei:
                    await asyncio.wait_for(conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=100), 25)
                took = time.monotonic() - t0
                with pytest.raises(KVError, match=r"after 0\.3 s"):
                    await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=100, timeout_s=0.3)
            finally:
                release.set()
                service.resolve = real
            again = await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L1")
            return ei.value.code, took, again

    code, took, again = run(go())
    assert code == ErrorCode.UPSTREAM_TIMEOUT and 1.5 <= took < 5.5  # 100 ms + PRE_META_QUIET_S (1.5 s here)
    assert again.report.levels == ["low"]


def test_a_late_fetch_that_keeps_arriving_is_waited_for():
    """The default wait has no fixed bound: progress every 0.2 s (a chunk, or bytes of one big chunk) keeps a
    fetch with a 0.1-s deadline and a 0.5-s quiet limit alive for 1.2 s; stalled after two steps it fails 0.5 s
    later."""
    from types import SimpleNamespace

    from tokenwire.transport.kv_client import _wait_while_progressing

    async def go(stall_after, whole_chunks):
        pf = SimpleNamespace(event=asyncio.Event(), received={}, meta=None)
        state = {"bytes": 0}

        async def server():
            for i in range(6):
                await asyncio.sleep(0.2)
                if i == stall_after:
                    return
                if whole_chunks:
                    pf.received[i] = i
                else:  # one big chunk, still arriving
                    state["bytes"] += 1200
            pf.event.set()

        task = asyncio.ensure_future(server())
        t0 = time.monotonic()
        try:
            await _wait_while_progressing(pf, lambda: (len(pf.received), state["bytes"]), 0.1, 0.5)
            return "done", time.monotonic() - t0
        except TimeoutError:
            return "timed out", time.monotonic() - t0
        finally:
            task.cancel()

    for whole in (True, False):
        outcome, took = run(go(None, whole))
        assert outcome == "done" and took > 1.0
        outcome, took = run(go(2, whole))
        # stalled: fails once a quiet limit passes without progress (about 1.1 s here: the first check, at 0.6 s,
        # saw progress). The lower bound is the behaviour: not before the quiet limit after the last progress
        # (0.4 + 0.5 s; timers only fire late). The upper one only tells a stalled wait that ends from one that
        # never does (run() stops that at 60 s): no timing of the host's
        assert outcome == "timed out" and 0.9 <= took < 10


def test_a_draining_server_refuses_new_fetches_and_lets_running_ones_finish(service):
    """The daemon's drain ignored the KV channel: fetches in flight were cut 0.24 s after SIGTERM, and new ones
    were still accepted while the log said "no new requests"."""
    ids = list(range(2 * CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(len(ids), 21), prewarm=["low"])
    real_chunk = service.chunk
    release = asyncio.Event()

    async def held(plan, index, level):
        await release.wait()
        return await real_chunk(plan, index, level)

    async def go():
        async with kv_client(service) as (conn, server):
            service.chunk = held
            running = asyncio.ensure_future(conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=20000,
                                                          controller="fixed-L1"))
            while not server.open_fetches(unsent_only=True):
                await asyncio.sleep(0.01)
            server.draining = True
            with pytest.raises(RemoteError) as refused:
                await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L1")
            release.set()
            result = await running
            return refused.value, result, dict(server.stats)

    refused, result, stats = run(go())
    assert refused.code == ErrorCode.SHUTTING_DOWN
    assert len(result.chunks) == 2  # the running fetch finished, whole
    assert stats["refused"] == 1


def test_every_fetch_has_an_outcome_in_the_counters(service):
    """A chunk gone after the fetch began (evicted, corrupt, re-put) and a store failure at resolve ended
    fetches with an ERROR that no outcome counted: completed + abandoned + refused fell short of fetches."""
    from tokenwire.transport.kv_channel import KVNotFound

    ids = list(range(CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(len(ids), 22), prewarm=["low"])
    real_resolve = service.resolve

    async def gone(plan, index, level):
        raise KVNotFound("chunk is no longer stored")

    async def broken(fetch):
        raise OSError("the store is down")

    async def go():
        async with kv_client(service) as (conn, server):
            service.chunk = gone
            with pytest.raises(KVNotFound):
                await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L1")
            service.resolve = broken
            with pytest.raises(RemoteError, match="store failure"):
                await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L1")
            service.resolve = real_resolve
            return dict(server.stats)

    stats = run(go())
    assert stats["fetches"] == 2 and stats["failed"] == 1 and stats["refused"] == 1


def test_a_fetch_given_up_at_once_or_never_decoded_has_one_outcome_or_none(service):
    """A KV_FETCH sent with its FIN for a context not stored counted abandoned and refused both; a malformed
    KV_FETCH (which closes the connection) counted as an abandoned fetch, though no fetch was ever asked."""
    from tokenwire.transport.frames import KvFetch, encode_stream_frame

    async def go():
        async with kv_client(service) as (conn, server):
            quic = conn._quic
            sid = quic.get_next_available_stream_id()
            quic.send_stream_data(sid, encode_stream_frame(KvFetch(model="nothing-stored", deadline_ms=1000,
                                                                   token_ids=[1, 2, 3])), end_stream=True)
            conn.transmit()
            async with asyncio.timeout(10):
                while server.stats["fetches"] < 1 or any(p.tasks for p in server.protocols):
                    await asyncio.sleep(0.01)
            first = dict(server.stats)
            bad = quic.get_next_available_stream_id()
            quic.send_stream_data(bad, b"\x00\x00\x00\x03\x81\xa1t")  # a map with no type: malformed
            conn.transmit()
            async with asyncio.timeout(10):
                while server.protocols:
                    await asyncio.sleep(0.01)
            return first, dict(server.stats)

    first, last = run(go())
    assert first["fetches"] == 1 and first["abandoned"] + first["refused"] == 1, first
    assert last["fetches"] == 1 and last["abandoned"] + last["refused"] + last["completed"] == 1, last


def test_the_daemons_drain_lets_a_running_kv_fetch_finish(tmp_path):
    """SIGTERM's drain waited for token answers only: a KV fetch in flight was cut 0.24 s after it."""
    from tokenwire.daemon.config import parse_config
    from tokenwire.daemon.service import Daemon

    sock = tmp_path / "kv.sock"
    cfg = parse_config({"server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": ""},
                        "limits": {"drain_timeout_s": 10},
                        "kv": {"enabled": True, "listen": "127.0.0.1:0", "directory": str(tmp_path / "store"),
                               "capacity_mb": 64, "chunk_tokens": CHUNK, "ingest_socket": str(sock),
                               "forecaster": "ewma"}})
    ids = list(range(2 * CHUNK))

    async def go():
        daemon = Daemon(cfg)
        await daemon.start()
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, lambda: put_kv_unix(sock, MODEL, ids, make_kv(len(ids), 8),
                                                                 prewarm=["low"]))
            provider = daemon.kv.server.provider
            real_chunk, release = provider.chunk, asyncio.Event()

            async def held(plan, index, level):
                await release.wait()
                return await real_chunk(plan, index, level)

            provider.chunk = held
            async with connect_kv("127.0.0.1", daemon.kv.server.port, verify=False) as conn:
                running = asyncio.ensure_future(conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=20000,
                                                              controller="fixed-L1"))
                while not daemon.kv.server.open_fetches(unsent_only=True):
                    await asyncio.sleep(0.01)
                daemon.on_stop_signal()  # SIGTERM
                await asyncio.sleep(0.5)  # the old drain had closed the connection by now
                assert not running.done()
                release.set()
                result = await asyncio.wait_for(running, 10)
            await asyncio.wait_for(daemon._stopped.wait(), 15)
            return result
        finally:
            await daemon.stop()

    assert len(run(go()).chunks) == 2
