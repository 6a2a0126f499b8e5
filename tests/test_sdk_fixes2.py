"""SDK client fixes: ``ChatStream.cancel()`` once the answer has ended keeps what was not read yet, a request's
argument errors name the argument (not the wire's ``request.mt``), and a prompt over the request size limit says
so in bytes of UTF-8. Then: leaving ``connect`` closes the socket whatever drives the loop, a peer's close ends the
session within a bound however inflated the RTT estimate, one task reads an answer at a time, every error the SDK
raises on purpose is a ``TokenwireError``, ``chat_sync`` names its parameters, and the editable install is visible
to type checkers."""

from __future__ import annotations

import asyncio
import gc
import inspect
import socket
import warnings

import pytest
import uvloop
from aioquic.quic.connection import QuicConnection

from tokenwire.transport import client as client_module
from tokenwire.transport import quic_io
from tokenwire.transport.client import ChatStream, PromptTooLarge, chat_sync, connect
from tokenwire.transport.errors import ConnectError, ConnectTimeout, ErrorCode, RemoteError, TokenwireError
from tokenwire.transport.frames import MAX_STREAM_FRAME
from tokenwire.transport.quic_io import HandshakeError

from .test_sdk_edges import _socket_fds
from .test_sdk_server import T, client_kwargs, endless_source, failure, run, served, server_in_thread

WORDS = ["one", " two", " three", " four"]


async def words(request):
    for w in WORDS:
        yield w


async def broken(request):
    yield "half"
    raise RuntimeError("the model fell over")


def _on_end(stream: ChatStream) -> asyncio.Event:
    """An event set once the stream has taken in the end of its answer (FINISHED or an error): the test waits on
    it instead of sleeping."""
    ended = asyncio.Event()
    for name in ("_finished", "_failed"):
        real = getattr(stream, name)

        def hook(arg, real=real):
            real(arg)
            ended.set()

        setattr(stream, name, hook)
    return ended


# -- cancel() once the answer has ended ------------------------------------------------------------------------
def test_cancel_after_the_answer_ended_keeps_the_text_not_read_yet():
    """cancel() set ``_done`` unconditionally: once FINISHED had come, the deltas still queued were thrown away
    (``async for`` ended after the first word), though the docstring says it is a no-op then."""
    async def go():
        async with served(words) as server:
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                stream = conn.chat("q")
                ended = _on_end(stream)
                first = await stream.__anext__()
                await asyncio.wait_for(ended.wait(), 10)
                await stream.cancel()
                rest = [d async for d in stream]
            return first, rest, stream.stats, server.stats

    first, rest, stats, server_stats = run(go())
    assert first + "".join(rest) == "".join(WORDS)
    assert stats is not None and stats.digest_verified
    assert (server_stats.completed, server_stats.cancelled) == (1, 0), server_stats


def test_cancel_after_the_answer_failed_still_raises_its_error():
    """The same for an answer that ended with an error: the reader gets the error, not a silent end."""
    async def go():
        async with served(broken) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            stream = conn.chat("q")
            ended = _on_end(stream)
            await asyncio.wait_for(ended.wait(), 10)
            await stream.cancel()
            with pytest.raises(RemoteError):
                async for _ in stream:
                    pass

    run(go())


def test_cancel_while_the_answer_is_open_still_ends_the_reader():
    """What cancel() is for is unchanged: an open answer is abandoned, and the reader's loop ends."""
    async def forever(request):
        yield "start"
        await asyncio.Event().wait()
        yield "never"

    async def go():
        async with served(forever) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            stream = conn.chat("q")
            assert await stream.__anext__() == "start"
            await stream.cancel()
            return [d async for d in stream]

    assert run(go()) == []


# -- argument errors name the argument -------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_tokens": 0}, "invalid request: max_tokens: 0 out of range [1, 1000000]"),
    ({"max_tokens": 2_000_000}, "invalid request: max_tokens: 2000000 out of range"),
    ({"max_tokens": True}, "invalid request: max_tokens: expected an integer, got bool"),
    ({"max_tokens": 1.5}, "invalid request: max_tokens: expected an integer, got float"),
    ({"model": "m" * 200}, "invalid request: model: string of 200 characters exceeds 128"),
    ({"params": {"k": [1]}}, "invalid request: params: parameter 'k' must be a number"),
    ({"params": {"k" * 70: 1}}, "invalid request: params: parameter names must be strings of at most 64"),
    ({"prompt": [{"role": "bot", "content": "x"}]}, "invalid request: prompt: role must be system, user"),
    ({"prompt": []}, "invalid request: prompt: expected a non-empty list of {role, content} messages"),
    ({"resume": (b"short", [])}, "invalid request: resume: "),
], ids=["max_tokens=0", "max_tokens-big", "max_tokens-bool", "max_tokens-float", "model", "params-value",
        "params-name", "role", "no-messages", "resume"])
def test_a_refused_chat_argument_is_named_as_the_caller_wrote_it(kwargs, message):
    """The errors named the wire's fields ("request.mt: 0 out of range", "request.p", "request.m"), which the
    caller never sees; fetch_kv already named its own arguments."""
    async def go():
        async with served(words) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            args = dict(kwargs)
            prompt = args.pop("prompt", "hi")
            with pytest.raises(ValueError) as exc:
                conn.chat(prompt, **args)
            return str(exc.value), await conn.chat("after").collect()

    text, after = run(go())
    assert text.startswith(message) and "request." not in text.removeprefix("invalid request"), text
    assert after == "".join(WORDS)  # refused locally: the connection lives on


def test_a_refused_attach_names_its_request_id_argument():
    async def go():
        async with served(words) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            with pytest.raises(ValueError) as exc:
                conn.attach(b"short")
            return str(exc.value)

    text = run(go())
    assert text.startswith("invalid request: request_id: "), text


# -- the request size limit, in bytes of UTF-8 -----------------------------------------------------------------
@pytest.mark.parametrize(("prompt", "text_bytes"), [
    ("a" * MAX_STREAM_FRAME, MAX_STREAM_FRAME),  # as many characters as the limit: over it with the framing
    ("é" * 600_000, 1_200_000),  # 600,000 characters, under the limit in characters, 1.2 MB of UTF-8
    ("😀" * 300_000, 1_200_000),
], ids=["ascii-1MiB", "accented", "emoji"])
def test_a_prompt_over_the_request_limit_says_so_in_bytes_of_utf8(prompt, text_bytes):
    """It said "invalid request: frame of 1048623 bytes exceeds the limit of 1048576": no word of the prompt,
    of UTF-8, nor of a daemon's lower limit."""
    async def go():
        async with served(words) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            with pytest.raises(PromptTooLarge) as exc:
                conn.chat(prompt)
            return exc.value, await conn.chat("after").collect()

    err, after = run(go())
    assert isinstance(err, ValueError)  # what chat() documents for a refused argument
    assert (err.text_bytes, err.limit) == (text_bytes, MAX_STREAM_FRAME) and err.size > text_bytes
    assert str(err) == (f"prompt too large: its text is {text_bytes:,} bytes of UTF-8 and the request {err.size:,} "
                        "bytes encoded, over the limit of 1,048,576 bytes per request (a daemon's "
                        "limits.max_request_bytes may be lower)")
    assert after == "".join(WORDS)


def test_a_prompt_just_under_the_limit_is_sent():
    """The boundary: the size check is the frame's own, not a stricter guess."""
    async def echo_length(request):
        yield str(len(request.prompt))

    async def go():
        async with served(echo_length) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            return await conn.chat("a" * (MAX_STREAM_FRAME - 100)).collect()

    assert run(go()) == str(MAX_STREAM_FRAME - 100)


# -- leaving connect() closes the socket before it returns, whatever drives the loop ------------------------------
def _slow_rtt(quic: QuicConnection) -> None:
    """The RTT estimate of a connection whose loop (either end's) stalled for a minute: a PTO of 5 minutes, so
    QUIC's closing or draining period (3 PTO) lasts 15 (a daemon's loop that lagged under 64 answers had 37 s)."""
    quic._loss._rtt_smoothed = quic._loss._rtt_variance = 60.0


async def _one_answer(port: int) -> str:
    async with connect("127.0.0.1", port, **client_kwargs()) as conn:
        return await asyncio.wait_for(conn.chat("q").collect(), T)


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_a_loop_its_owner_closes_keeps_no_socket_or_task_of_a_connection(new_loop, caplog):
    """``run_until_complete`` then ``loop.close()`` (thread workers, older frameworks): each connection left a UDP
    socket and a pending task behind (the closing period's, held in a module-global set), "Task was destroyed but
    it is pending!", and "Event loop is closed" from the socket's transport; only asyncio.run's sweep ended it."""
    with server_in_thread(words) as server:
        gc.collect()  # (what earlier tests left is not this test's)
        before = _socket_fds()
        pending = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                loop = new_loop()
                try:
                    assert loop.run_until_complete(_one_answer(server.port)) == "".join(WORDS)
                    pending += asyncio.all_tasks(loop)
                finally:
                    loop.close()
            gc.collect()
        after = _socket_fds()
    assert not pending, pending
    assert after == before
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]
    assert "Task was destroyed" not in caplog.text and "Event loop is closed" not in caplog.text


@pytest.mark.parametrize("ecn", [False, True])
def test_leaving_connect_closes_the_socket_before_returning_without_the_closing_period(ecn):
    """The socket stayed open for the closing period (3 PTO, minutes with a stalled loop's RTT estimate), closed by a
    background task; now it is closed when the exit returns, and the end is the local close's (not a socket
    failure's); the server has the close at once."""

    async def go():
        async with served(words) as server:
            async with connect("127.0.0.1", server.port, ecn=ecn, **client_kwargs()) as conn:
                assert await asyncio.wait_for(conn.chat("q").collect(), T) == "".join(WORDS)
                proto = conn._protocol
                (peer,) = server.protocols
                sock = proto._transport.get_extra_info("socket")
                _slow_rtt(proto._quic)
            fileno = sock.fileno()
            await asyncio.wait_for(peer.wait_closed(), T)
            return fileno, proto.terminated, conn.closed, peer.terminated

    fileno, ended, closed, seen = run(go())
    assert fileno == -1
    assert ended is not None and (ended.error_code, ended.reason_phrase) == (0, "") and closed
    assert seen is not None and seen.error_code == 0


# -- QUIC's closing and draining periods are bounded ----------------------------------------------------------
def test_a_clients_close_ends_the_servers_session_soon_however_inflated_its_rtt_estimate(monkeypatch):
    """aioquic hands the peer's close over at the end of the draining period (3 PTO): a daemon whose RTT estimate a
    lagging loop had inflated (srtt 37 s, PTO 186 s) kept a closed client's session, its requests and its session
    slot for 9 minutes after an app crashed out of ``async with connect()`` with 64 answers open. The period now
    ends within CLOSE_PERIOD_MAX_S (made short here) of its start."""
    monkeypatch.setattr(quic_io, "CLOSE_PERIOD_MAX_S", 0.2)

    async def go():
        started = asyncio.Event()
        stopped: list[bool] = []
        async with served(endless_source(started, lambda: stopped.append(True))) as server:
            with pytest.raises(RuntimeError, match="app crash"):
                async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                    conn.chat("q")
                    await asyncio.wait_for(started.wait(), T)
                    (peer,) = server.protocols
                    _slow_rtt(peer._quic)
                    pto = peer._quic._loss.get_probe_timeout()
                    raise RuntimeError("app crash")
            await asyncio.wait_for(peer.wait_closed(), T)  # the draining period's end: 3 PTO would be 15 minutes
            return pto, peer.terminated, peer in server.protocols, dict(peer.tasks)

    pto, ended, kept, tasks = run(go())
    assert pto > 100
    assert ended is not None and ended.error_code == 0  # the client's close, not the idle timeout
    assert not kept and not tasks  # the server let go of the connection and cancelled its answer


def test_a_servers_close_fails_the_clients_answers_soon_however_inflated_its_rtt_estimate(monkeypatch):
    """The same on the client: a server's close (here its shutdown) failed the answers only at the end of the
    client's draining period, and ``conn.closed`` stayed False meanwhile."""
    monkeypatch.setattr(quic_io, "CLOSE_PERIOD_MAX_S", 0.2)

    async def go():
        started = asyncio.Event()
        async with (served(endless_source(started, lambda: None)) as server,
                    connect("127.0.0.1", server.port, **client_kwargs()) as conn):
            stream = conn.chat("q")
            await asyncio.wait_for(started.wait(), T)
            _slow_rtt(conn._protocol._quic)
            server.close()
            err = await failure(stream)  # (bounded by T)
            return err, conn.closed

    err, closed = run(go())
    assert isinstance(err, RemoteError) and err.code == ErrorCode.SHUTTING_DOWN, err
    assert closed


@pytest.mark.parametrize(("srtt", "bounded"), [(0.3, False), (60.0, True)], ids=["real-path", "stalled-loop"])
def test_the_closing_period_is_3_pto_up_to_the_bound(srtt, bounded):
    """The bound only shortens a period over it: on a real path's PTO the period is still 3 PTO."""

    async def go():
        async with served(words) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            await asyncio.wait_for(conn.chat("q").collect(), T)
            proto, quic = conn._protocol, conn._protocol._quic
            quic._loss._rtt_smoothed, quic._loss._rtt_variance = srtt, srtt / 3
            now = proto.clock()
            proto.clock = lambda: now  # (one instant: the period's start is exactly known)
            three_pto = 3 * quic._loss.get_probe_timeout()
            conn._protocol.close()  # (what leaving connect() does first)
            return quic._close_at - now, three_pto

    period, three_pto = run(go())
    assert period == pytest.approx(quic_io.CLOSE_PERIOD_MAX_S if bounded else three_pto)  # (float rounding only)
    assert (three_pto > quic_io.CLOSE_PERIOD_MAX_S) is bounded


# -- one task reads an answer at a time; its end stays --------------------------------------------------------
def _gated_words(gate: asyncio.Event):
    async def source(request):
        await gate.wait()
        for w in WORDS:
            yield w

    return source


@pytest.mark.parametrize("first", ["iterate", "collect"])
@pytest.mark.parametrize("second", ["iterate", "collect"])
def test_a_second_task_reading_an_answer_gets_a_clear_error_at_once(first, second):
    """``gather(s.collect(), s.collect())``: the second reader waited for ever (one end, taken by the first; the
    deltas split between them). It now gets RuntimeError at once; the first reads the whole answer, and a read
    after the end gets the same end."""

    async def read(stream, how):
        if how == "collect":
            return await stream.collect()
        return "".join([d async for d in stream])

    async def go():
        gate = asyncio.Event()
        async with served(_gated_words(gate)) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            stream = conn.chat("q")
            reader = asyncio.ensure_future(read(stream, first))
            await asyncio.sleep(0)  # one loop turn: the first reader is waiting for a delta (none can come yet)
            with pytest.raises(RuntimeError, match="read by one task at a time") as info:
                await asyncio.wait_for(read(stream, second), T)
            gate.set()
            text = await asyncio.wait_for(reader, T)
            return str(info.value), text, await stream.collect(), [d async for d in stream]

    message, text, again, more = run(go())
    assert "another task is already waiting on this answer" in message
    assert text == again == "".join(WORDS) and more == []


def test_every_read_after_a_failed_answer_raises_its_error():
    """After the error was read once, a second ``collect()`` returned the partial text as if it were whole (and
    after a digest mismatch, the mismatched text)."""

    async def go():
        async with served(broken) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            stream = conn.chat("q")
            first = await failure(stream)
            second = await failure(stream)
            with pytest.raises(RemoteError):
                async for _ in stream:
                    pass
            return first, second, conn.closed

    first, second, closed = run(go())
    assert second is first and first.code == ErrorCode.UPSTREAM_ERROR
    assert not closed  # a per-request error: the connection takes more requests


# -- one base for every error the SDK raises on purpose ----------------------------------------------------------
def test_no_answer_within_the_timeout_is_a_tokenwire_error_and_still_a_connection_error():
    """"Daemon not running" was a bare ConnectionError: an app catching TokenwireError missed it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never read: no answer, no ICMP
        silent.bind(("127.0.0.1", 0))

        async def go():
            async with connect("127.0.0.1", silent.getsockname()[1], timeout=0.3, **client_kwargs()):
                pass

        with pytest.raises(TokenwireError) as info:
            run(go())
    err = info.value
    assert isinstance(err, ConnectTimeout) and isinstance(err, ConnectError) and isinstance(err, ConnectionError)
    assert "no QUIC handshake with 127.0.0.1" in str(err) and "within 0.3 s" in str(err)


def test_a_failed_handshake_and_an_unresolvable_name_are_tokenwire_errors(monkeypatch):
    async def untrusted():
        async with served(words) as server:
            with pytest.raises(TokenwireError) as info:
                async with connect("127.0.0.1", server.port, server_name="localhost", timeout=5):  # dev cert: untrusted
                    pass
            return info.value

    err = run(untrusted())
    assert isinstance(err, HandshakeError) and isinstance(err, ConnectionError) and err.tls_alert is not None

    async def no_such_name(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", no_such_name)

    async def unresolvable():
        async with connect("tokenwire.invalid", 4433, timeout=5):
            pass

    with pytest.raises(TokenwireError) as info:
        run(unresolvable())
    assert type(info.value) is ConnectError and isinstance(info.value, ConnectionError)
    assert str(info.value) == "cannot resolve tokenwire.invalid: Name or service not known"


def test_a_host_name_idna_cannot_encode_is_a_connect_error():
    """``bad..name`` or a label over 63 characters: the resolver's IDNA step raised a bare UnicodeError."""

    async def go(host: str):
        async with connect(host, 4433, verify=False, timeout=5):
            pass

    for host in ("bad..name", "a" * 64 + ".example"):
        with pytest.raises(ConnectError, match="not a valid host name"):
            run(go(host))


def test_a_prompt_too_large_is_a_tokenwire_error_of_the_request_alone():
    async def go():
        async with served(words) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            with pytest.raises(TokenwireError) as info:
                conn.chat("a" * MAX_STREAM_FRAME)
            return info.value, conn.closed

    err, closed = run(go())
    assert isinstance(err, PromptTooLarge) and isinstance(err, ValueError)
    assert err.code == ErrorCode.LIMIT_EXCEEDED and not closed


def test_the_error_classes_are_exported_by_the_client_module():
    """TokenwireError and RemoteError, what every answer's failure is, were not in ``client.__all__``."""
    for name in ("TokenwireError", "RemoteError", "ConnectError", "ConnectTimeout", "HandshakeError", "DigestMismatch",
                 "PromptTooLarge", "ErrorCode"):
        assert name in client_module.__all__, name
        assert getattr(client_module, name) is not None
    assert client_module.TokenwireError is TokenwireError and client_module.HandshakeError is HandshakeError
    for name in ("ConnectError", "ConnectTimeout", "HandshakeError", "DigestMismatch", "PromptTooLarge",
                 "RemoteError"):
        assert issubclass(getattr(client_module, name), TokenwireError), name


# -- chat_sync names its parameters --------------------------------------------------------------------------
def test_chat_sync_takes_the_keyword_parameters_of_connect_and_chat():
    """``**kwargs: Any``: mypy let any misspelling through, and Python's TypeError named ``connect()``, raised from
    inside the event loop. (``keepalive`` is left out: chat_sync's connection carries one answer; ``resume`` too.)"""
    sync = inspect.signature(chat_sync).parameters
    connect_params = inspect.signature(client_module.connect.__wrapped__).parameters  # type: ignore[attr-defined]
    chat_params = inspect.signature(client_module.Connection.chat).parameters
    expected = {n: p for n, p in [*connect_params.items(), *chat_params.items()]
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    own = {"retry_busy_s"}  # (chat_sync's own: waiting for a busy server, as ResumingChat's)
    assert {n for n, p in sync.items() if p.kind is inspect.Parameter.KEYWORD_ONLY} == set(expected) | own
    for name, param in expected.items():
        assert (sync[name].default, sync[name].annotation) == (param.default, param.annotation), name
    assert sync["prompt"].annotation == chat_params["prompt"].annotation  # a message list too
    with pytest.raises(TypeError, match=r"chat_sync\(\) got an unexpected keyword argument 'verfy'"):
        chat_sync("127.0.0.1", 4433, "hi", verfy=False)  # type: ignore[call-arg]


def test_chat_sync_takes_a_list_of_messages():
    async def echo(request):
        yield "|".join(f"{m['role']}:{m['content']}" for m in request.messages)

    with server_in_thread(echo) as server:
        result = chat_sync("127.0.0.1", server.port, [{"role": "system", "content": "be brief"},
                                                       {"role": "user", "content": "hi"}], **client_kwargs())
    assert result.text == "system:be brief|user:hi" and result.stats.digest_verified
