"""The SDK's own server (``serve``) and client (``connect``) on loopback: how answers end, what the server
counts, how it shuts down, and the errors a caller sees."""

from __future__ import annotations

import asyncio
import contextlib
import os
import textwrap
import threading

import pytest

from tokenwire.transport import client as client_module
from tokenwire.transport.client import chat_sync, connect
from tokenwire.transport.errors import ErrorCode, RemoteError, TokenwireError
from tokenwire.transport.server import serve
from tokenwire.transport.tls import dev_cert

T = 10.0  # generous bound on every wait: a hang fails the test instead of blocking the run


def run(coro, timeout: float = 30.0):
    async def bounded():
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def client_kwargs():
    return {"cadata": dev_cert().cert_pem, "server_name": "localhost"}


@contextlib.asynccontextmanager
async def served(source, **kwargs):
    server = await serve(source, host="127.0.0.1", port=0, **kwargs)
    try:
        yield server
        await clients_gone(server)
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), T)


async def clients_gone(server) -> None:
    """Wait (bounded) until the server has taken in its connections' ends. Leaving ``connect()`` sends the close
    and returns at once: a server closed right after, on the same loop, had not yet read what its clients sent
    last (a confirmation, the close), which a server in another process would have."""
    waits = [asyncio.ensure_future(p.wait_closed()) for p in list(server.protocols)]
    if waits:
        _, pending = await asyncio.wait(waits, timeout=T)
        for w in pending:
            w.cancel()


def endless_source(started: asyncio.Event, stopped):
    """A token source that yields "a", sets ``started``, then a dot every 5 ms until it is closed or cancelled,
    when it calls ``stopped()``."""

    async def source(request):
        try:
            yield "a"
            started.set()
            while True:
                await asyncio.sleep(0.005)
                yield "."
        finally:
            stopped()

    return source


async def failure(stream) -> TokenwireError:
    """The error that ends ``stream`` (the test fails if it ends without one)."""
    with pytest.raises(TokenwireError) as info:
        await asyncio.wait_for(stream.collect(), T)
    return info.value


# -- 1. a CancelledError raised inside the token source ------------------------------------------------------
def test_a_cancelled_error_from_inside_the_source_fails_the_request():
    """An engine that aborts the request's future raises CancelledError in the source: the server used to
    take it for its own task being cancelled and sent neither FINISHED nor ERROR (the client hung)."""

    async def source(request):
        yield "partial "
        fut = asyncio.get_running_loop().create_future()
        fut.cancel()  # e.g. a batching engine drops the request
        await fut
        yield "never"

    async def go():
        async with served(source) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            stream = conn.chat("x")
            err = await failure(stream)
            return err, stream.text, server.stats

    err, text, stats = run(go())
    assert isinstance(err, RemoteError) and err.code == ErrorCode.UPSTREAM_ERROR
    assert "cancelled" in str(err)
    assert text == "partial "
    assert stats.failed == 1 and stats.cancelled == 0


def test_a_request_the_client_cancels_stops_the_source_without_counting_a_failure():
    """The other CancelledError: the client abandons the answer, the server cancels the source's task."""

    async def go():
        first, stopped = asyncio.Event(), asyncio.Event()
        source = endless_source(first, stopped.set)
        async with served(source) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            stream = conn.chat("x")
            await asyncio.wait_for(first.wait(), T)
            await stream.cancel()
            await asyncio.wait_for(stopped.wait(), T)
            return server.stats

    stats = run(go())
    assert stats.cancelled == 1 and stats.failed == 0


# -- 2. resume and attach: the SDK server keeps no answers ---------------------------------------------------
def test_resume_and_attach_are_refused_with_a_typed_error_and_the_source_never_runs():
    seen = []

    async def source(request):
        seen.append(request.messages)
        yield "fresh answer"

    async def go():
        async with served(source) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            attached = await failure(conn.attach(os.urandom(16)))
            resumed_stream = conn.chat("real question", resume=(os.urandom(16), [b"Hel", b"lo"]))
            resumed = await failure(resumed_stream)
            after = await asyncio.wait_for(conn.chat("next").collect(), T)  # the connection lives on
            return attached, resumed, after, server.stats

    attached, resumed, after, stats = run(go())
    for err in (attached, resumed):
        assert isinstance(err, RemoteError) and err.code == ErrorCode.NOT_FOUND
        assert "daemon" in str(err) and "resume" in str(err)
    assert after == "fresh answer"
    assert seen == [[{"role": "user", "content": "next"}]]  # only the plain request reached the source
    assert stats.failed == 0 and stats.completed == 1


# -- 3. ServerStats.tokens counts tokens ----------------------------------------------------------------------
def test_server_stats_count_tokens_not_pieces():
    # 1000 bytes: 4 tokens of at most 256 bytes; empty pieces: none; 600 bytes of "ü": 3 tokens
    pieces = ["x" * 1000, "", "", "a", "ü" * 300]

    async def source(request):
        for p in pieces:
            yield p

    async def go():
        async with served(source) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            whole = conn.chat("x")
            await asyncio.wait_for(whole.collect(), T)
            after_whole = server.stats.tokens
            cut = conn.chat("x", max_tokens=3)
            await asyncio.wait_for(cut.collect(), T)
            return whole.stats.tokens, after_whole, cut.stats.tokens, server.stats.tokens - after_whole

    client_whole, server_whole, client_cut, server_cut = run(go())
    assert client_whole == server_whole == 8
    assert client_cut == server_cut == 3


# -- 4. wait_closed waits for everything close started --------------------------------------------------------
def test_wait_closed_returns_only_after_the_sources_have_stopped():
    async def go():
        started = asyncio.Event()
        state = {"finalized": False}
        source = endless_source(started, lambda: state.update(finalized=True))
        server = await serve(source, host="127.0.0.1", port=0)
        async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            stream = conn.chat("x")
            await asyncio.wait_for(started.wait(), T)
            server.close()
            await asyncio.wait_for(server.wait_closed(), T)
            finalized = state["finalized"]
            running = [t for p in server.protocols for t in p.tasks.values() if not t.done()]
            err = await failure(stream)
        return finalized, running, err

    finalized, running, err = run(go())
    assert finalized, "the token source was still running after wait_closed() returned"
    assert running == []
    assert isinstance(err, RemoteError) and err.code == ErrorCode.SHUTTING_DOWN


# -- 5. finish_reason and the source's cleanup at max_tokens -----------------------------------------------------
WORDS = [f"w{i} " for i in range(10)]
SOURCES = {
    "words": WORDS,
    "big": ["x" * 1000],  # one piece of 4 tokens
    "trailing": ["a", "b", "", ""],  # empty pieces after the last token
}


@pytest.mark.parametrize(("name", "max_tokens", "reason", "tokens"), [
    ("words", 5, "length", 5),
    ("words", 10, "length", 10),  # the limit is reached: "length", as an LLM stopped by max_tokens says
    ("words", 11, "stop", 10),
    ("big", 2, "length", 2),  # its only piece was cut
    ("big", 5, "stop", 4),
    ("trailing", 3, "stop", 2),
])
def test_finish_reason_is_length_at_the_limit_and_the_source_closes_before_finished(name, max_tokens, reason, tokens):
    closed = []

    async def source(request):
        try:
            for p in SOURCES[request.prompt]:
                yield p
        finally:
            closed.append(request.prompt)

    async def go():
        async with served(source) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            stream = conn.chat(name, max_tokens=max_tokens)
            text = await asyncio.wait_for(stream.collect(), T)
            return text, stream.stats, server.stats.tokens, list(closed)

    text, stats, server_tokens, closed_at_finish = run(go())
    assert stats.finish_reason == reason
    assert stats.tokens == server_tokens == tokens and stats.digest_verified
    assert text.encode() == b"".join(p.encode() for p in SOURCES[name])[: len(text.encode())]
    assert closed_at_finish == [name]  # the source was closed before FINISHED went out


# -- 6. the chat_sync example of the client's docstring ------------------------------------------------------
def _chat_sync_example() -> str:
    """The chat_sync example in the module docstring of ``tokenwire.transport.client``."""
    lines = (client_module.__doc__ or "").splitlines()
    i = next(i for i, line in enumerate(lines) if "chat_sync(" in line)
    if "``" in lines[i]:  # an inline literal
        return lines[i].split("``")[1]
    indent = len(lines[i]) - len(lines[i].lstrip())
    block = [lines[i]]
    for line in lines[i + 1:]:
        if line.strip() and len(line) - len(line.lstrip()) < indent:
            break
        block.append(line)
    return textwrap.dedent("\n".join(block))


def test_the_chat_sync_example_of_the_docstring_runs(capsys):
    async def source(request):
        yield "Hi"
        yield " there"

    with server_in_thread(source) as server:
        code = _chat_sync_example().replace("4433", str(server.port))
        exec(code, {"chat_sync": chat_sync})  # chat_sync runs its own event loop: outside any loop
    assert "Hi there" in capsys.readouterr().out


@contextlib.contextmanager
def server_in_thread(source, **kwargs):
    """A server on an event loop of its own thread, for code that runs ``asyncio.run`` itself."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(serve(source, host="127.0.0.1", port=0, **kwargs), loop).result(T)
    try:
        yield server
    finally:
        async def stop():
            server.close()
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(T)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(T)
        loop.close()


# -- 7. unknown congestion controllers ----------------------------------------------------------------------------
def test_an_unknown_congestion_controller_is_a_value_error_naming_the_choices():
    async def go():
        async with connect("127.0.0.1", 9, congestion="bogus", timeout=1.0):
            pass

    with pytest.raises(ValueError, match="bogus") as info:
        run(go())
    for name in ("reno", "cubic", "prague"):
        assert name in str(info.value)

    with pytest.raises(ValueError, match="bogus"):
        run(serve(lambda request: None, host="127.0.0.1", port=0, congestion="bogus"))


def test_every_registered_congestion_controller_is_accepted():
    async def source(request):
        yield "ok"

    async def go():
        async with served(source, congestion="prague") as server, connect(
            "127.0.0.1", server.port, congestion="cubic", **client_kwargs()
        ) as conn:
            return await asyncio.wait_for(conn.chat("x").collect(), T)

    assert run(go()) == "ok"


# -- 8. closing one's own connection ----------------------------------------------------------------------------
def test_closing_the_connection_tells_readers_it_was_closed_locally():
    async def go():
        never = asyncio.Event()

        async def source(request):
            yield "first"
            await never.wait()
            yield "never"

        async with served(source) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            streams = [conn.chat("x"), conn.chat("y")]
            for s in streams:
                assert await asyncio.wait_for(anext(s), T) == "first"
            readers = [asyncio.ensure_future(failure(s)) for s in streams]
            await asyncio.wait_for(conn.close(), T)
            errors = await asyncio.wait_for(asyncio.gather(*readers), T)
            with pytest.raises(TokenwireError) as later:
                conn.chat("after close")
            return [*errors, later.value]

    for err in run(go()):
        assert not isinstance(err, RemoteError), f"a local close reported as the peer's: {err!r}"
        assert "locally" in str(err)
        assert err.code == ErrorCode.CANCELLED


def test_a_source_can_set_its_own_finish_reason():
    """A source that ends an answer for a reason of its own (a content filter) says so in ``finish_reason``;
    one that sets a bad value fails the request with a typed error."""

    async def source(request):
        yield "w0 "
        request.finish_reason = "content_filter" if request.prompt == "x" else 7

    async def go():
        async with served(source) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            ok = conn.chat("x", max_tokens=50)
            await asyncio.wait_for(ok.collect(), T)
            bad = conn.chat("y", max_tokens=50)
            with pytest.raises(RemoteError) as info:
                await asyncio.wait_for(bad.collect(), T)
            return ok.stats, info.value

    ok, err = run(go())
    assert (ok.finish_reason, ok.tokens) == ("content_filter", 1)
    assert err.code == ErrorCode.UPSTREAM_ERROR


# -- a connection kept between a chat's turns ------------------------------------------------------------------
@pytest.mark.parametrize("keepalive", [False, True])
def test_a_connection_kept_between_turns_survives_with_keepalive(keepalive):
    """The user thinks for longer than the idle timeout between two turns on one connection: with
    ``keepalive`` the next turn is answered; without it the connection has ended (``closed``), and the error
    says no request was open rather than that the server is gone."""

    async def source(request):
        yield "answer"

    async def go():
        async with served(source) as server, connect("127.0.0.1", server.port, idle_timeout=0.6,
                                                     keepalive=keepalive, **client_kwargs()) as conn:
            assert await asyncio.wait_for(conn.chat("one").collect(), T) == "answer"
            proto = conn._protocol
            idle = asyncio.ensure_future(proto.wait_closed())
            done, _ = await asyncio.wait({idle}, timeout=2.0)  # three idle timeouts of the user thinking
            idle.cancel()
            if keepalive:
                assert not done and not conn.closed
                return await asyncio.wait_for(conn.chat("two").collect(), T)
            assert done and conn.closed
            with pytest.raises(RemoteError) as info:
                conn.chat("two")
            return info.value

    out = run(go())
    if keepalive:
        assert out == "answer"
    else:
        assert out.path_lost and "no request was open" in str(out)


# -- a broken packet path is the connection's fault, not the source's ------------------------------------------
def test_a_connection_whose_sending_breaks_is_closed_and_the_source_is_not_blamed(caplog):
    """Putting a piece on the wire raised inside the server (session, marking policy, socket): reported as
    "token source failed" (UPSTREAM_ERROR) and answered through the same broken path."""
    holder: dict[str, object] = {}

    async def source(request):
        if request.messages[0]["content"] == "after":
            yield "fine"
            return
        yield "a"
        (proto,) = holder["server"].protocols

        def broken(*args, **kwargs):
            raise RuntimeError("the packet path broke")

        proto.server_session.push = broken
        yield "b"

    async def go():
        async with served(source) as server:
            holder["server"] = server
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                err = await failure(conn.chat("x"))
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:  # the server lives on
                after = await asyncio.wait_for(conn.chat("after").collect(), T)
            return err, after, server.stats

    err, after, stats = run(go())
    assert isinstance(err, RemoteError) and err.code == ErrorCode.INTERNAL, err
    assert "server error while sending" in str(err)
    assert after == "fine"
    assert stats.failed == 1
    assert "connection failed while sending" in caplog.text and "token source failed" not in caplog.text


def test_text_utf8_cannot_carry_is_still_the_sources_fault():
    async def source(request):
        yield "ok "
        yield "\ud800"  # a lone surrogate

    async def go():
        async with served(source) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            return await failure(conn.chat("x"))

    err = run(go())
    assert isinstance(err, RemoteError) and err.code == ErrorCode.UPSTREAM_ERROR
    assert "UnicodeEncodeError" in str(err)


# -- ServerStats: each request has exactly one outcome ---------------------------------------------------------
def test_every_request_counts_once_in_exactly_one_outcome():
    """An unauthorized request counted as cancelled (the connection closing cut it off), and an answer the
    client abandoned after its ERROR or whose connection ended after FINISHED could count twice or not at all:
    requests != completed + cancelled + failed + refused."""

    async def source(request):
        what = request.messages[-1]["content"]
        yield "x "
        if what == "fail":
            raise RuntimeError("engine broke")
        if what == "slow":
            await asyncio.sleep(30)
        yield "done"

    def auth(token):
        return token == "good"

    async def go():
        async with served(source, authorize=auth) as server:
            kw = client_kwargs()
            async with connect("127.0.0.1", server.port, auth_token="bad", **kw) as conn:
                unauthorized = await failure(conn.chat("hi"))
            async with connect("127.0.0.1", server.port, auth_token="good", **kw) as conn:
                assert await asyncio.wait_for(conn.chat("ok").collect(), T) == "x done"
                await failure(conn.chat("fail"))
                await failure(conn.attach(os.urandom(16)))
                slow = conn.chat("slow")
                await asyncio.wait_for(slow.__anext__(), T)
                await slow.cancel()
                lost = conn.chat("slow")
                await asyncio.wait_for(lost.__anext__(), T)
            # the connection closed with "slow" running: lost; wait until the server has seen it end
            for _ in range(int(T / 0.01)):
                if not server.protocols:
                    break
                await asyncio.sleep(0.01)
            return unauthorized, server.stats

    unauthorized, stats = run(go())
    assert isinstance(unauthorized, RemoteError) and unauthorized.code == ErrorCode.UNAUTHORIZED
    assert (stats.requests, stats.completed, stats.failed, stats.refused, stats.cancelled) == (6, 1, 1, 2, 2), stats


def test_the_idle_close_names_the_idle_timeout_in_force(monkeypatch):
    """The server's idle timeout was shorter than the client's: the connection closed after the server's, and
    the error quoted the client's own (60 s) for a silence of under a second."""
    from tokenwire.transport import server as server_module

    real = server_module.server_configuration

    def short_idle(*args, **kwargs):
        config = real(*args, **kwargs)
        config.idle_timeout = 0.6
        return config

    monkeypatch.setattr(server_module, "server_configuration", short_idle)

    async def source(request):
        yield "answer"

    async def go():
        async with served(source) as server, connect("127.0.0.1", server.port, idle_timeout=60.0,
                                                     **client_kwargs()) as conn:
            assert await asyncio.wait_for(conn.chat("one").collect(), T) == "answer"
            await asyncio.wait_for(conn._protocol.wait_closed(), T)
            with pytest.raises(RemoteError) as info:
                conn.chat("two")
            return info.value

    err = run(go())
    assert "no packet from the server for 0.6 s" in str(err), err
