"""The KV ingest socket and the KV service's shutdown: what the daemon's event loop sees while they stop, what
the socket client refuses before sending, and how refused puts are counted."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from tokenwire.daemon import kv_ingest
from tokenwire.daemon.kv_ingest import put_kv_unix, serve_kv_ingest
from tokenwire.daemon.kv_meta import KVIngestError
from tokenwire.daemon.kv_service import KVService
from tokenwire.daemon.kv_store import chunk_hashes, object_key
from tokenwire.daemon.kv_store_local import LocalChunkStore

from .test_kv_channel import CHUNK, MODEL, make_kv


def _service(tmp_path) -> KVService:
    return KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=CHUNK)


async def _max_gap(stop: asyncio.Event) -> float:
    """The longest the event loop went without running this task (how long something blocked it)."""
    gap, last = 0.0, time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(0.01)
        now = time.monotonic()
        gap, last = max(gap, now - last), now
    return gap


def test_aclose_never_blocks_the_loop_and_a_put_stops_at_a_chunk_boundary(tmp_path):
    """close() joined the workers on the event loop: SIGTERM during a 60k-token put blocked the daemon (healthz,
    the second SIGTERM) 17-19 s past its drain timeout."""
    svc = _service(tmp_path)
    writing, gate = threading.Event(), threading.Event()
    real_put = svc.store.put

    def slow_put(key: str, data: bytes) -> None:
        writing.set()
        gate.wait(20)  # a chunk write still going on when the daemon stops
        real_put(key, data)

    svc.store.put = slow_put  # type: ignore[method-assign]
    ids = list(range(4 * CHUNK))

    async def go() -> tuple[bool, float, float, BaseException | None]:
        stop = asyncio.Event()
        ticker = asyncio.ensure_future(_max_gap(stop))
        put = asyncio.ensure_future(svc.ingest(MODEL, ids, make_kv(len(ids)), prewarm=["low"]))
        await asyncio.to_thread(writing.wait, 10)
        t0 = time.monotonic()
        done = await svc.aclose(timeout=0.3)  # the worker is inside a write: not waited for past the timeout
        took = time.monotonic() - t0
        gate.set()
        try:
            await asyncio.wait_for(put, 10)
            err = None
        except KVIngestError as exc:
            err = exc
        stop.set()
        return done, took, await ticker, err

    done, took, gap, err = asyncio.run(go())
    # not waited for past its 0.3-s timeout: the write it would wait for is held for 20 s (the gate); the bound is
    # far from 0.3 s so that a loaded host does not fail it
    assert done is False and took < 10, (done, took)
    assert gap < 0.25, f"the event loop was blocked for {gap:.2f} s"
    assert err is not None and "stopping" in str(err), err  # the put ended at the next chunk, not 4 chunks later
    svc.close()  # blocking close still works (and closes the store)
    # the chunk being written is whole (source, then metadata); the rest were never written
    store = LocalChunkStore(tmp_path / "kv", 64 << 20)
    hashes = chunk_hashes(ids, model=MODEL, chunk_tokens=CHUNK)
    assert [store.contains(object_key(h, "meta")) for h in hashes] == [True, False, False, False]
    assert all(store.contains(object_key(h, "src")) == store.contains(object_key(h, "meta")) for h in hashes)
    store.close()


def test_aclose_returns_once_idle_workers_end_and_closes_the_store(tmp_path):
    svc = _service(tmp_path)
    svc.ingest_sync(MODEL, list(range(CHUNK)), make_kv(CHUNK))
    assert asyncio.run(svc.aclose(timeout=5)) is True
    LocalChunkStore(tmp_path / "kv", 64 << 20).close()  # the directory's lock was released


@pytest.mark.parametrize("kv, message", [
    ([(torch.zeros(2, 2, CHUNK, 16, dtype=torch.float16),) * 2] * 2, "batch size must be 1"),
    ([(torch.zeros(2, CHUNK, 16, dtype=torch.float16), torch.zeros(2, CHUNK, 16))] * 2,
     "every tensor must be torch.float16"),
    ([(torch.zeros(2, CHUNK, 16, dtype=torch.float16),) * 2, (torch.zeros(2, CHUNK, 16),) * 2],
     "every tensor must be torch.float16"),
])
def test_put_kv_unix_refuses_what_ingest_refuses(tmp_path, kv, message):
    """The socket client stored a [2, H, T, D] batch as its element 0 and promoted mixed dtypes to float32, KV
    that ingest() refuses."""
    svc = _service(tmp_path)
    with pytest.raises(KVIngestError) as api:
        svc.ingest_sync(MODEL, list(range(CHUNK)), kv)
    svc.close()
    with pytest.raises(KVIngestError) as unix:  # refused before connecting: no daemon listens here
        put_kv_unix(tmp_path / "none.sock", MODEL, list(range(CHUNK)), kv)
    assert message in str(api.value)
    assert str(unix.value) == str(api.value)


def test_an_idle_ingest_connection_ends_quietly_at_shutdown(tmp_path):
    """Each idle engine connection logged "Exception in callback ... CancelledError" when the daemon stopped."""
    svc = _service(tmp_path)
    sock = tmp_path / "kv.sock"
    errors: list[dict] = []

    async def go() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        srv = await serve_kv_ingest(sock, svc)
        _, writer = await asyncio.open_unix_connection(str(sock))
        for _ in range(100):  # until the server's handler task runs
            handlers = [t for t in asyncio.all_tasks() if t.get_coro().__name__ == "_handle_ingest"]
            if handlers:
                break
            await asyncio.sleep(0.01)
        assert handlers
        for t in handlers:  # what asyncio.run does to the tasks left at shutdown
            t.cancel()
        for _ in range(5):
            await asyncio.sleep(0.01)
        srv.close()
        writer.close()

    asyncio.run(go())
    svc.close()
    assert errors == []


class _Writer:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_header_line_too_long_counts_as_a_refused_ingest(tmp_path):
    """Bad JSON counted in tokenwire_kv_ingests_total{outcome="refused"}; an over-long header did not."""
    svc = _service(tmp_path)

    async def go() -> bytes:
        reader = asyncio.StreamReader(limit=64)
        reader.feed_data(b"x" * 200 + b"\n")
        reader.feed_eof()
        writer = _Writer()
        await kv_ingest._handle_ingest(svc, reader, writer)  # type: ignore[arg-type]
        return writer.data

    assert b"header line too long" in asyncio.run(go())
    assert svc.ingest_errors == 1
    svc.close()




def test_a_put_body_that_stalls_is_given_up(tmp_path, monkeypatch):
    """Eight engines that declared 1-GiB puts, sent 100 MB and stalled held 800 MB for good (no read timeout)."""
    import json

    monkeypatch.setattr(kv_ingest, "BODY_QUIET_S", 0.2)
    svc = _service(tmp_path)

    async def go() -> bytes:
        reader = asyncio.StreamReader()
        header = {"op": "put", "model": "m", "token_ids": [1, 2], "shape": [1, 2, 1, 2, 4], "dtype": "float16"}
        reader.feed_data(json.dumps(header).encode() + b"\n" + b"\0" * 10)  # 10 of 32 bytes, then nothing
        writer = _Writer()
        await asyncio.wait_for(kv_ingest._handle_ingest(svc, reader, writer), 10)  # type: ignore[arg-type]
        return writer.data

    reply = asyncio.run(go())
    assert b"put body stalled: nothing for 0.2 s after 10 of 32 bytes" in reply
    assert svc.ingest_errors == 1
    svc.close()


def test_a_put_body_that_trickles_is_given_up_by_the_rate_rule(tmp_path, monkeypatch):
    """Only a silence ended a body: an engine sending a byte every few seconds held its share of
    kv.ingest_memory_mb, and every put queued behind it, for as long as it liked (review)."""
    import json

    monkeypatch.setattr(kv_ingest, "BODY_QUIET_S", 0.2)
    monkeypatch.setattr(kv_ingest, "MIN_BODY_RATE", 100)  # bytes/s: slower on average past 0.4 s (2 x quiet) closes it
    svc = _service(tmp_path)

    async def go() -> tuple[bytes, int]:
        reader = asyncio.StreamReader()
        header = {"op": "put", "model": "m", "token_ids": [1, 2], "shape": [1, 2, 1, 2, 4], "dtype": "float16"}
        reader.feed_data(json.dumps(header).encode() + b"\n")
        writer = _Writer()
        task = asyncio.ensure_future(kv_ingest._handle_ingest(svc, reader, writer))  # type: ignore[arg-type]
        fed = 0
        while not task.done() and fed < 31:  # a byte every 0.1 s: never a 0.2-s silence, never the whole body
            reader.feed_data(b"\0")
            fed += 1
            await asyncio.sleep(0.1)
        await asyncio.wait_for(task, 10)
        return writer.data, fed

    # given up while the bytes still came (the overall deadline, ~0.7 s: 7 or 8 bytes), not by a silence once the
    # test stopped feeding after 31 of the 32 bytes ("nothing for 0.2 s"): an observable, not a time bound
    reply, fed = asyncio.run(go())
    assert b"put body stalled: slower than" in reply and fed < 31, (reply, fed)
    assert svc.ingest_errors == 1
    svc.close()


def test_puts_past_the_ingest_memory_budget_wait_for_room_and_a_larger_one_is_refused(tmp_path):
    """Every put's body was read whole at once, however many engines put at the same time (eight 1-GiB puts
    held 8 GiB). Bodies now hold kv.ingest_memory_mb between them: a put that does not fit waits before its
    body is read (its engine's writes block), and one larger than the whole budget is refused at its header."""
    import json

    import numpy as np

    n = 2 * CHUNK
    shape = [1, 2, 1, n, 8]
    size = 2 * int(np.prod(shape))  # float16
    svc = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=CHUNK, put_memory_bytes=size + 10)

    def header(model: str, dims: list[int] = shape) -> bytes:
        return json.dumps({"op": "put", "model": model, "token_ids": list(range(dims[3])), "shape": dims,
                           "dtype": "float16"}).encode() + b"\n"

    body = np.random.default_rng(0).standard_normal(size // 2).astype(np.float16).tobytes()

    async def go() -> tuple[bytes, bytes, bytes]:
        first, second, big = asyncio.StreamReader(), asyncio.StreamReader(), asyncio.StreamReader()
        w1, w2, w3 = _Writer(), _Writer(), _Writer()
        first.feed_data(header("a") + body[:100])  # the first put's body: still arriving
        t1 = asyncio.ensure_future(kv_ingest._handle_ingest(svc, first, w1))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        assert svc.put_memory.used == size
        second.feed_data(header("b") + body)  # all of it sent: it does not fit beside the first
        second.feed_eof()
        t2 = asyncio.ensure_future(kv_ingest._handle_ingest(svc, second, w2))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        assert svc.put_memory.waiting == 1 and w2.data == b""
        assert len(second._buffer) == size  # its body is left in the socket's buffer, not copied out
        first.feed_data(body[100:])
        first.feed_eof()
        await asyncio.wait_for(asyncio.gather(t1, t2), 30)
        big.feed_data(header("c", [1, 2, 1, 4 * n, 8]))
        big.feed_eof()
        await asyncio.wait_for(kv_ingest._handle_ingest(svc, big, w3), 10)  # type: ignore[arg-type]
        return w1.data, w2.data, w3.data

    r1, r2, r3 = asyncio.run(go())
    assert json.loads(r1)["ok"] and json.loads(r2)["ok"], (r1, r2)
    assert json.loads(r3) == {"ok": False, "error": f"bad header: {4 * size} bytes exceed kv.ingest_memory_mb (0 MiB)"}
    assert svc.put_memory.used == 0 and svc.ingests == 2 and svc.ingest_errors == 1
    svc.close()


def test_a_put_waiting_for_room_at_shutdown_hears_why_and_a_vanished_one_is_counted(tmp_path):
    """Puts waiting for kv.ingest_memory_mb when the daemon stopped got no reply (the engine saw "no answer from
    the KV ingest socket"), and a put whose engine went away mid-body left no trace in the counters."""
    import json

    svc = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=CHUNK, put_memory_bytes=64)
    header = json.dumps({"op": "put", "model": "m", "token_ids": [1, 2], "shape": [1, 2, 1, 2, 8],
                         "dtype": "float16"}).encode() + b"\n"  # 64 bytes: the whole budget

    async def go() -> tuple[bytes, bytes]:
        holder, waiter = asyncio.StreamReader(), asyncio.StreamReader()
        wh, ww = _Writer(), _Writer()
        holder.feed_data(header + b"\0" * 10)  # holds the budget, its body still arriving
        t1 = asyncio.ensure_future(kv_ingest._handle_ingest(svc, holder, wh))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        waiter.feed_data(header)
        t2 = asyncio.ensure_future(kv_ingest._handle_ingest(svc, waiter, ww))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        assert svc.put_memory.waiting == 1
        t2.cancel()  # the daemon stops
        holder.feed_eof()  # the holder's engine goes away mid-body
        await asyncio.gather(t1, t2, return_exceptions=True)
        return wh.data, ww.data

    held, waited = asyncio.run(go())
    assert json.loads(waited) == {"ok": False, "error": "the daemon is stopping; put the context again"}
    # the holder's end of stream is all the daemon sees of it (a half-close, or gone): it is answered, in case the
    # engine still reads (test_kv_ingest_left_s45), and counted once
    assert json.loads(held) == {"ok": False, "error": "put body cut short: the engine closed its side after 10 of "
                                                      "64 bytes; nothing was stored"}
    assert svc.ingest_errors == 2  # both puts counted as refused
    svc.close()


def test_a_stalled_put_whose_engine_is_gone_is_counted_once(tmp_path, monkeypatch):
    """The stall's reply could not be drained (the engine had gone): the outer handler counted the same refused
    put a second time (review)."""
    import json

    monkeypatch.setattr(kv_ingest, "BODY_QUIET_S", 0.1)
    svc = _service(tmp_path)

    class GoneWriter(_Writer):
        async def drain(self) -> None:
            raise ConnectionResetError("the engine went away")

    async def go() -> None:
        reader = asyncio.StreamReader()
        header = {"op": "put", "model": "m", "token_ids": [1, 2], "shape": [1, 2, 1, 2, 4], "dtype": "float16"}
        reader.feed_data(json.dumps(header).encode() + b"\n" + b"\0" * 10)
        await asyncio.wait_for(kv_ingest._handle_ingest(svc, reader, GoneWriter()), 10)  # type: ignore[arg-type]

    asyncio.run(go())
    assert svc.ingest_errors == 1
    svc.close()
