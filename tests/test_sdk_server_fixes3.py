"""The SDK server (``serve``, ``TokenServer``) as an application developer meets it: shutting down with sources that
clean up slowly or ignore their cancellation, sources that never await, marking factories that fail, and the
arguments ``serve`` takes (its bounds, its idle timeout, callables, an async ``authorize`` that never answers).

New names of ``tokenwire.transport.server`` are read inside the tests, so that each test fails on its own defect
against the code before the fix rather than the whole module failing to import."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import Any

import pytest

from tokenwire.daemon import config as daemon_config
from tokenwire.transport import server as server_module
from tokenwire.transport.client import connect
from tokenwire.transport.errors import ErrorCode, RemoteError, TokenwireError
from tokenwire.transport.marking import L4SPolicy, make_policy
from tokenwire.transport.server import serve

from .test_sdk_server import T, client_kwargs, endless_source, failure, run, served


async def words(request: Any):
    yield "hi"


def stubborn_source(started: asyncio.Event, release: asyncio.Event, cancels: list[int]):
    """A source that swallows its cancellation (a buggy engine wrapper) until ``release`` is set."""

    async def source(request: Any):
        yield "a"
        started.set()
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                cancels.append(1)

    return source


async def read_quietly(task: asyncio.Future[Any]) -> None:
    """Await a reader whose answer the server's close cut off."""
    with contextlib.suppress(TokenwireError):
        await asyncio.wait_for(task, T)


# -- 1. close() cancels a source once, and wait_closed() waits for its cleanup ---------------------------------
def test_close_cancels_a_source_once_and_wait_closed_waits_for_its_cleanup():
    """close() cancelled the sources but left them to the connection's end, which cancelled them again 3 PTO later,
    inside their ``finally``: wait_closed() returned after 0.1 s with the cleanup (a GPU slot's release) cut."""

    async def go():
        started, release = asyncio.Event(), asyncio.Event()
        log: list[str] = []

        async def source(request: Any):
            try:
                yield "a"
                started.set()
                await asyncio.Event().wait()
            finally:
                log.append("cleanup")
                try:
                    await release.wait()  # e.g. telling the engine to free the request's slot
                    log.append("cleaned")
                except asyncio.CancelledError:
                    log.append("cleanup cancelled")
                    raise

        server = await serve(source, host="127.0.0.1", port=0)
        async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            reader = asyncio.ensure_future(conn.chat("x").collect())
            await asyncio.wait_for(started.wait(), T)
            (proto,) = server.protocols
            server.close()
            closing = asyncio.ensure_future(server.wait_closed())
            await asyncio.wait_for(proto.wait_closed(), T)  # the connection's end: where the second cancel came
            during = (list(log), closing.done())
            release.set()
            await asyncio.wait_for(closing, T)
            await read_quietly(reader)
        return during, log

    during, after = run(go())
    assert during == (["cleanup"], False)
    assert after == ["cleanup", "cleaned"]


def test_wait_closed_waits_for_the_cleanup_of_a_source_whose_connection_ended_before_close():
    """Only the sources of connections still open at close() were waited for: one whose client had left, its
    cleanup still running, ran on after wait_closed() returned."""

    async def go():
        started, cleaning, release = asyncio.Event(), asyncio.Event(), asyncio.Event()
        log: list[str] = []

        async def source(request: Any):
            try:
                yield "a"
                started.set()
                await asyncio.Event().wait()
            finally:
                cleaning.set()
                await release.wait()
                log.append("cleaned")

        server = await serve(source, host="127.0.0.1", port=0)
        async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            reader = asyncio.ensure_future(conn.chat("x").collect())
            await asyncio.wait_for(started.wait(), T)
            (proto,) = server.protocols
        await read_quietly(reader)
        await asyncio.wait_for(proto.wait_closed(), T)  # the client's close ended it: its source is cancelled
        await asyncio.wait_for(cleaning.wait(), T)
        server.close()
        closing = asyncio.ensure_future(server.wait_closed())
        assert server._quic_server is not None
        await asyncio.wait_for(server._quic_server.socket_closed.wait(), T)  # what wait_closed() waited for last
        done, _ = await asyncio.wait({closing}, timeout=0.2)
        release.set()
        await asyncio.wait_for(closing, T)
        return bool(done), log

    assert run(go()) == (False, ["cleaned"])


# -- 2. a source that ignores its cancellation cannot hold wait_closed() -----------------------------------------
def test_a_cancelled_wait_closed_returns_at_once_and_cancels_no_source_again():
    """asyncio.wait_for(server.wait_closed(), 3) never returned: wait_closed gathered the sources, and the cancel of
    the gather went on to the one that swallowed cancellations."""

    async def go():
        started, release = asyncio.Event(), asyncio.Event()
        cancels: list[int] = []
        server = await serve(stubborn_source(started, release, cancels), host="127.0.0.1", port=0)
        async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            reader = asyncio.ensure_future(conn.chat("x").collect())
            await asyncio.wait_for(started.wait(), T)
            server.close()
            waiting = asyncio.ensure_future(server.wait_closed())
            for _ in range(3):
                await asyncio.sleep(0)  # (it is waiting for the source now)
            waiting.cancel()
            done, _ = await asyncio.wait({waiting}, timeout=T)
            outcome = (bool(done) and waiting.cancelled(), len(cancels))
            release.set()  # (the source ends: no FINISHED goes out on the closed connection, no "failed")
            await asyncio.wait_for(server.wait_closed(), T)
            await read_quietly(reader)
        return outcome, (server.stats.cancelled, server.stats.failed)

    assert run(go()) == ((True, 1), (1, 0))


def test_wait_closed_gives_up_on_a_source_that_ignores_its_cancellation_after_stop_timeout(caplog):
    async def go():
        started, release = asyncio.Event(), asyncio.Event()
        server = await serve(stubborn_source(started, release, []), host="127.0.0.1", port=0, stop_timeout=0.2)
        async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            stream = conn.chat("x")
            reader = asyncio.ensure_future(stream.collect())
            await asyncio.wait_for(started.wait(), T)
            server.close()
            waiting = asyncio.ensure_future(server.wait_closed())
            done, _ = await asyncio.wait({waiting}, timeout=T)
            left = list(server._running)
            release.set()
            await asyncio.wait(left, timeout=T)
            await read_quietly(reader)
        return bool(done), len(left), stream.request_id

    with caplog.at_level(logging.ERROR, logger="tokenwire.server"):
        returned, left, rid = run(go())
    assert returned and left == 1
    assert "1 token source(s) still running 0.2 s after close()" in caplog.text
    assert rid is not None and f"request {rid.hex()}" in caplog.text


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), True])
def test_stop_and_authorize_timeouts_must_be_positive_seconds(value):
    for name in ("stop_timeout", "authorize_timeout"):
        with pytest.raises(ValueError, match=name):
            run(serve(words, host="127.0.0.1", port=0, **{name: value}))


# -- 3. a source that never awaits shares the loop -----------------------------------------------------------------
def test_a_source_that_never_awaits_lets_the_loop_turn_and_its_pieces_go_out_batched():
    """``for w in words: yield w`` (a cached answer) never let the loop run: 20,000 pieces froze every other
    client for 1.2 s, with a transmit per piece."""
    n = 5000

    async def go():
        turns = 0

        async def ticker() -> None:  # counts the loop's turns
            nonlocal turns
            while True:
                await asyncio.sleep(0)
                turns += 1

        holder: dict[str, Any] = {}
        seen: dict[str, int] = {}

        async def source(request: Any):
            (proto,) = holder["server"].protocols
            sends = 0
            real = proto.transmit

            def counting() -> None:
                nonlocal sends
                sends += 1
                real()

            proto.transmit = counting
            first = turns
            for _ in range(n):
                yield "x"
            seen["turns"], seen["transmits"] = turns - first, sends
            del proto.transmit

        tick = asyncio.ensure_future(ticker())
        try:
            async with served(source) as server:
                holder["server"] = server
                async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                    text = await asyncio.wait_for(conn.chat("x").collect(), T)
        finally:
            tick.cancel()
        return text, seen

    text, seen = run(go())
    assert text == "x" * n
    assert seen["turns"] >= n // 64 // 2  # (0 before: the loop never ran while the source yielded)
    assert seen["transmits"] <= n // 10  # (one per piece before)


def test_a_queued_transmit_that_raises_closes_that_connection_alone(caplog):
    """The pieces' transmit runs on the loop now: one that raises fails the answer and closes its connection with
    INTERNAL, as a push that raises does, and reaches no exception handler of the loop."""
    holder: dict[str, Any] = {}

    async def source(request: Any):
        if request.prompt == "after":
            yield "fine"
            return
        yield "a"
        (proto,) = holder["server"].protocols

        def broken() -> None:
            del proto.transmit  # (once: the close that follows is sent)
            raise RuntimeError("the socket broke")

        proto.transmit = broken
        yield "b"
        await asyncio.Event().wait()

    async def go():
        unhandled: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: unhandled.append(ctx))
        async with served(source) as server:
            holder["server"] = server
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                err = await failure(conn.chat("x"))
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                after = await asyncio.wait_for(conn.chat("after").collect(), T)
        return err, after, server.stats, unhandled

    err, after, stats, unhandled = run(go())
    assert isinstance(err, RemoteError) and err.code == ErrorCode.INTERNAL, err
    assert "server error while sending" in str(err)
    assert after == "fine" and stats.failed == 1 and not unhandled
    assert "connection failed while sending" in caplog.text


# -- 4. a marking factory that fails -------------------------------------------------------------------------------
def test_a_marking_factory_that_fails_is_an_error_of_serve():
    """``functools.partial(make_policy, "swiftqueue")`` without a forecaster was accepted, then broke every
    handshake silently (a traceback per Initial in the loop's handler, a client's ConnectTimeout)."""

    async def go():
        with pytest.raises(ValueError, match="needs a latency forecaster"):
            server = await serve(words, host="127.0.0.1", port=0, marking=functools.partial(make_policy, "swiftqueue"))
            server.close()
            await server.wait_closed()
        with pytest.raises(TypeError, match="not a marking policy"):
            server = await serve(words, host="127.0.0.1", port=0, marking=lambda: "l4s")
            server.close()
            await server.wait_closed()

    run(go())


def test_a_connection_whose_marking_policy_fails_is_closed_with_the_reason(caplog):
    failing = False

    def factory() -> L4SPolicy:
        if failing:
            raise RuntimeError("the model file is gone")
        return L4SPolicy()

    async def go():
        nonlocal failing
        unhandled: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: unhandled.append(ctx))
        async with served(words, marking=factory) as server:
            failing = True  # (after serve's own call: it fails for the connections)
            async with connect("127.0.0.1", server.port, timeout=5, **client_kwargs()) as conn:
                try:
                    stream = conn.chat("x")
                except TokenwireError as exc:  # (the close may have come already)
                    err = exc
                else:
                    err = await failure(stream)
        return err, unhandled

    err, unhandled = run(go())
    assert isinstance(err, RemoteError) and err.code == ErrorCode.INTERNAL, err
    assert "ECN marking policy failed (RuntimeError)" in str(err)
    assert "the marking policy factory failed" in caplog.text and not unhandled


# -- 5. max_requests_per_connection has a bound ------------------------------------------------------------------
@pytest.mark.parametrize("n", [10_001, 2**60, 2**60 + 1, 2**62])
def test_max_requests_per_connection_past_the_bound_is_a_valueerror(n):
    """2**60 + 1 broke every handshake, 2**62 raised inside aioquic, and close() then raised KeyError and leaked
    the socket."""
    with pytest.raises(ValueError, match="max_requests_per_connection must be an int from 1 to 10000"):
        run(serve(words, host="127.0.0.1", port=0, max_requests_per_connection=n))


def test_the_bound_is_the_daemons_and_serves():
    assert server_module.MAX_REQUESTS_PER_CONNECTION == daemon_config.MAX_REQUESTS_PER_CONNECTION

    async def go():
        async with (served(words, max_requests_per_connection=10_000) as server,
                    connect("127.0.0.1", server.port, **client_kwargs()) as conn):
            return await asyncio.wait_for(conn.chat("x").collect(), T)

    assert run(go()) == "hi"


# -- 6. serve(idle_timeout=) ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0.5, 3601, float("nan"), float("inf"), True, "60"])
def test_serve_checks_idle_timeout_as_the_daemon_checks_server_idle_timeout_s(value):
    with pytest.raises(ValueError, match=r"idle_timeout must be a number of seconds from 1 to 3600"):
        run(serve(words, host="127.0.0.1", port=0, idle_timeout=value))


def test_a_vanished_clients_source_stops_after_serves_idle_timeout():
    """serve() had no idle_timeout: a client that vanished kept its source generating for 60 s."""

    async def go():
        started, stopped = asyncio.Event(), asyncio.Event()
        async with served(endless_source(started, stopped.set), idle_timeout=1.0) as server:
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                reader = asyncio.ensure_future(conn.chat("x").collect())
                await asyncio.wait_for(started.wait(), T)
                transport = conn._protocol._transport
                transport.sendto = lambda *args: None  # the client vanishes: nothing of it reaches the server again
                if hasattr(transport, "sendto_ecn"):
                    transport.sendto_ecn = lambda *args: None
                await asyncio.wait_for(stopped.wait(), T)
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, TokenwireError):
                    await reader
            return server.stats.cancelled

    assert run(go()) == 1


# -- 7. bytes pieces and arguments that are not callables --------------------------------------------------------
def test_a_source_that_yields_bytes_fails_its_request_as_any_non_str():
    """Bytes were sent as they came (invalid UTF-8 rendered as U+FFFD) while TokenSource and the error said str."""

    async def source(request: Any):
        yield "ok "
        yield b"\xff"

    async def go():
        async with served(source) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            err = await failure(conn.chat("x"))
        return err, server.stats.failed

    err, failed = run(go())
    assert isinstance(err, RemoteError) and err.code == ErrorCode.UPSTREAM_ERROR, err
    assert "TypeError" in str(err) and failed == 1


async def _answer_gen(request: Any):
    yield "x"


@pytest.mark.parametrize("kwargs, message", [
    ({"source": None}, "source must be a callable that takes a ChatRequest"),
    ({"source": "hello"}, "not str"),
    ({"source": _answer_gen(None)}, "pass the async generator function, not what calling it returned"),
    ({"authorize": True}, "authorize must be a callable or None, not bool"),
    ({"authorize": "secret-token"}, "authorize must be a callable or None, not str"),
    ({"marking": "swiftqueue"}, "marking must be a callable or None, not str"),
])
def test_serve_refuses_arguments_that_are_not_callables(kwargs, message):
    """source=None or a str, authorize=True or a str, marking="swiftqueue" were accepted without complaint."""
    kwargs = {"source": words, **kwargs}
    with pytest.raises(TypeError, match=message):
        run(serve(host="127.0.0.1", port=0, **kwargs))


# -- 8. an async authorize that never answers ----------------------------------------------------------------------
def test_an_async_authorize_that_never_answers_fails_the_request_after_authorize_timeout(caplog):
    async def never(token: str | None) -> bool:
        await asyncio.Event().wait()
        return True

    async def go():
        async with (served(words, authorize=never, authorize_timeout=0.2) as server,
                    connect("127.0.0.1", server.port, auth_token="t", **client_kwargs()) as conn):
            err = await failure(conn.chat("x"))
        return err, server.stats

    err, stats = run(go())
    assert isinstance(err, RemoteError) and err.code == ErrorCode.INTERNAL, err
    assert "could not check the auth token" in str(err)
    assert stats.failed == 1 and "authorize() gave no verdict within 0.2 s" in caplog.text
