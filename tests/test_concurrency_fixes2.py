"""A connection shared between tasks whose owner is cancelled ends for every task at once (chat and KV clients),
each connection's end is delivered exactly once, and the KV forecaster's model is loaded at the daemon's start,
off the event loop, instead of on it at the first fetch."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import pytest

from tokenwire.transport.client import connect
from tokenwire.transport.errors import ErrorCode, RemoteError, TokenwireError
from tokenwire.transport.kv_channel import KVError, ServerTuning, connect_kv, serve_kv
from tokenwire.transport.server import serve
from tokenwire.transport.session_events import ConnectionEnded

from .test_sdk_edges import _on_connection_lost
from .test_sdk_server import T, client_kwargs, run, served


async def endless(request):
    """An answer that never ends by itself (the server's source waits on nothing the test sets)."""
    yield "first"
    await asyncio.Event().wait()


def count_ends(protocol) -> list[ConnectionEnded]:
    """The ConnectionEnded events ``protocol`` hands its subclass, as they come."""
    seen: list[ConnectionEnded] = []
    real = protocol.handle_session_events

    def handle(events):
        seen.extend(ev for ev in events if isinstance(ev, ConnectionEnded))
        real(events)

    protocol.handle_session_events = handle
    return seen


async def read_all(stream, first: asyncio.Event | None = None) -> BaseException:
    """What ends reading ``stream``: the exception (the answer here never ends on its own); ``first`` is set at
    the first delta."""
    try:
        async for _ in stream:
            if first is not None:
                first.set()
    except Exception as exc:
        return exc
    raise AssertionError("the endless answer ended without an error")


# -- 1. the owner of `async with connect()` is cancelled: readers in other tasks end at once ---------------------
def test_cancelling_the_owner_of_a_connection_fails_the_answers_read_in_other_tasks():
    """The socket was closed before aioquic delivered the local close (it queues it for the end of the closing
    period, on a timer the socket's loss cancelled): the other task's answer waited for ever, ``conn.closed``
    stayed False and a later ``chat`` was sent on a dead connection."""

    async def go():
        async with served(endless) as server:
            held: dict = {}
            ready = asyncio.Event()

            async def owner():
                async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                    held["conn"] = conn
                    held["ends"] = count_ends(conn._protocol)
                    held["stream"] = conn.chat("hi")
                    ready.set()
                    await asyncio.Event().wait()

            task = asyncio.ensure_future(owner())
            await asyncio.wait_for(ready.wait(), T)
            first = asyncio.Event()
            reader = asyncio.ensure_future(read_all(held["stream"], first))
            await asyncio.wait_for(first.wait(), T)  # the answer is under way in the reader's task
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            err = await asyncio.wait_for(reader, T)  # a hang here is the defect
            conn = held["conn"]
            with pytest.raises(TokenwireError) as later:
                conn.chat("again")
            await asyncio.wait_for(conn.close(), T)  # the connection has ended: nothing left to wait for
            return err, conn.closed, later.value, held["ends"]

    err, closed, later, ends = run(go())
    assert isinstance(err, TokenwireError) and err.code == ErrorCode.CANCELLED and "closed locally" in str(err)
    assert closed and "closed locally" in str(later)
    assert len(ends) == 1


class NeverResolves:
    """A KV provider whose plan never comes: a fetch stays open until its connection ends."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()

    async def resolve(self, fetch):
        self.asked.set()
        await asyncio.Event().wait()

    async def chunk(self, plan, index, level):  # pragma: no cover - no plan, no chunk
        raise AssertionError("no chunk without a plan")


@pytest.mark.parametrize("cancelled", [True, False])
def test_the_end_of_the_owner_of_a_kv_connection_fails_a_fetch_of_another_task_as_a_local_close(cancelled):
    """Cancelled, the fetch waited out its deadline and quiet time and failed as "KV fetch timed out"
    (UPSTREAM_TIMEOUT); a normal exit failed it as the server's "no reason given (code 0x0)": both were this
    side's close."""

    async def go():
        provider = NeverResolves()
        server = await serve_kv(provider, "127.0.0.1", 0, tuning=ServerTuning(forecaster="ewma"))
        try:
            held: dict = {}
            ready, leave = asyncio.Event(), asyncio.Event()

            async def owner():
                async with connect_kv("127.0.0.1", server.port, verify=False, warm=False) as conn:
                    held["conn"] = conn
                    held["ends"] = count_ends(conn)
                    ready.set()
                    await leave.wait()

            task = asyncio.ensure_future(owner())
            await asyncio.wait_for(ready.wait(), T)
            fetch = asyncio.ensure_future(held["conn"].fetch_kv(model="m", token_ids=[1, 2, 3], deadline_ms=60_000))
            await asyncio.wait_for(provider.asked.wait(), T)
            if cancelled:
                task.cancel()
            else:
                leave.set()
            await asyncio.gather(task, return_exceptions=True)
            with pytest.raises(KVError) as failed:
                await asyncio.wait_for(fetch, T)  # (the defect: 60 s deadline + quiet time)
            return failed.value, held["conn"].closed, held["ends"]
        finally:
            server.close()

    err, closed, ends = run(go())
    assert err.code == ErrorCode.CANCELLED and "KV connection closed locally" in str(err)
    assert closed and len(ends) == 1


# -- exactly once: an end aioquic delivered is not followed by a made-up one -----------------------------------
def test_an_end_delivered_by_aioquic_is_not_repeated_when_the_socket_closes():
    """The closing period ran to its end (aioquic's ConnectionTerminated) before the socket closed; and a second
    ``connection_lost`` (a transport that reports its loss twice) delivers nothing more."""

    async def go():
        async with served(endless) as server:
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                proto = conn._protocol
                ends = count_ends(proto)
                lost = _on_connection_lost(proto)
            await asyncio.wait_for(lost.wait(), T)  # the closing period ended, then the socket closed
            proto.connection_lost(None)
            return ends

    ends = run(go())
    assert len(ends) == 1 and ends[0].error_code == 0


def test_a_socket_closed_under_an_open_connection_ends_it_with_a_reason():
    """No close at all (the socket closed or failed under the connection): the answer fails saying so instead of
    waiting, and a server's or close()'s reason is not claimed."""

    async def go():
        server = await serve(endless, host="127.0.0.1", port=0)
        try:
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                stream = conn.chat("hi")
                reader = asyncio.ensure_future(read_all(stream))
                ends = count_ends(conn._protocol)
                conn._protocol._transport.close()
                err = await asyncio.wait_for(reader, T)
                return err, conn.closed, ends
        finally:  # (no close reached the server: served() would wait for its idle timeout)
            server.close()
            await asyncio.wait_for(server.wait_closed(), T)

    err, closed, ends = run(go())
    assert isinstance(err, RemoteError) and "socket closed before the connection ended" in str(err)
    assert closed and len(ends) == 1 and ends[0].by_peer


# -- 2. the KV forecaster's model is loaded at start, on a thread ------------------------------------------------
@pytest.fixture
def fresh_runners(monkeypatch):
    """No shared ONNX session yet (as in a new daemon process); which threads open one."""
    from tokenwire.predictor import bandwidth

    monkeypatch.setattr(bandwidth.OnnxRunner, "_shared", {})
    opened: list[int] = []
    real = bandwidth.open_session

    def open_session(data, label):
        opened.append(threading.get_ident())
        return real(data, label)

    monkeypatch.setattr(bandwidth, "open_session", open_session)
    return opened


def start_kv_with(tmp_path: Path, monkeypatch, forecaster: str):
    """The daemon's KV start (its codec compile stubbed out: the subject is the forecaster), then its close."""
    from tokenwire.daemon import kv_runtime
    from tokenwire.daemon.config import parse_config

    async def no_compile() -> None:
        return None

    monkeypatch.setattr(kv_runtime, "warm_up_codec", no_compile)
    cfg = parse_config({"kv": {"enabled": True, "listen": "127.0.0.1:0", "directory": str(tmp_path / "kv"),
                               "forecaster": forecaster}}, tmp_path / "tw.toml")

    async def go():
        runtime = await kv_runtime.start_kv(cfg.kv)
        runtime.close()

    run(go())


def test_the_daemons_kv_start_loads_the_onnx_forecaster_off_the_loop(tmp_path, monkeypatch, fresh_runners):
    """The first fetch imported onnxruntime and loaded the model on the event loop (~150-200 ms without serving
    any connection); after the start a forecaster costs no load."""
    from tokenwire.predictor import bandwidth

    start_kv_with(tmp_path, monkeypatch, "onnx")
    assert len(fresh_runners) == 1 and fresh_runners[0] != threading.get_ident()  # on a worker thread
    assert str(bandwidth.default_model_path()) in bandwidth.OnnxRunner._shared

    def no_load(data, label):
        raise AssertionError("a model load at the first fetch")

    monkeypatch.setattr(bandwidth, "open_session", no_load)
    forecaster = bandwidth.make_forecaster("onnx")
    forecaster.observe(100_000, 0.1)
    assert forecaster.forecast() is not None


def test_the_ewma_forecaster_loads_no_model_at_start(tmp_path, monkeypatch, fresh_runners):
    start_kv_with(tmp_path, monkeypatch, "ewma")
    assert fresh_runners == []


def test_a_model_that_cannot_load_at_start_is_logged_and_does_not_stop_the_start(tmp_path, monkeypatch,
                                                                               fresh_runners, caplog):
    """As before, the start goes on (fetches with the onnx forecaster meet the same failure as ever); now one log
    line says so at once, with the cure."""
    from tokenwire.predictor import bandwidth

    monkeypatch.setattr(bandwidth, "default_model_path", lambda: tmp_path / "gone.onnx")
    with caplog.at_level(logging.INFO, logger="tokenwire.kv"):
        start_kv_with(tmp_path, monkeypatch, "onnx")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    text = errors[0].getMessage()
    assert "bandwidth model cannot be loaded" in text and "gone.onnx" in text and 'forecaster = "ewma"' in text
    assert bandwidth.OnnxRunner._shared == {}  # not cached: the first fetch tries again, as before


def test_preload_refuses_an_unknown_forecaster():
    from tokenwire.predictor.bandwidth import preload

    with pytest.raises(ValueError, match="unknown forecaster 'lstm'"):
        preload("lstm")
