"""ChatStream.on_started: an answer's id as soon as the server's STARTED says it, before any token.

Then fixes of a probe's findings: the request limit as QUIC stream credit, a server's port released by
wait_closed, a deliberate close cancelling its answers at the server, errors raised again with bounded tracebacks,
the idle timeout's code, and chat_sync's keywords and its refusal inside a running loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import socket
import threading
import traceback
import warnings
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aioquic.buffer import Buffer
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import pull_quic_header

from tokenwire.daemon.config import parse_config
from tokenwire.daemon.service import Daemon
from tokenwire.transport.client import ChatStream, Connection, chat_sync, connect
from tokenwire.transport.errors import ErrorCode, RemoteError, TokenwireError
from tokenwire.transport.frames import Request
from tokenwire.transport.server import serve
from tokenwire.transport.server_session import ServerSession
from tokenwire.transport.session_events import (
    ConnectionEnded,
    RequestCancelled,
    RequestFinished,
    RequestReceived,
    RequestRefused,
    closed_error,
)
from tokenwire.transport.tls import server_configuration

from .quicpair import CLIENT, SERVER, Pair
from .test_handshake_limits import until, value
from .test_sdk_fixes2 import WORDS, broken, words
from .test_sdk_server import T, client_kwargs, run, served


def test_on_started_gives_the_request_id_before_the_first_token_and_at_once_when_late(caplog):
    """`tokenwire chat` wrapped the stream's private _started to learn the id of an answer a model was still
    thinking about (a client killed then had nothing to attach with); the SDK had no public hook for it."""
    gate = asyncio.Event()

    async def held(request):
        await gate.wait()  # no token until the test has seen the id
        async for w in words(request):
            yield w

    async def go():
        async with served(held) as server:
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                stream = conn.chat("q")
                seen: list[bytes] = []
                started = asyncio.Event()
                stream.on_started(lambda rid: (seen.append(rid), started.set()))
                stream.on_started(lambda rid: 1 / 0)  # an application's bug: logged, the answer goes on
                await asyncio.wait_for(started.wait(), 10)
                tokens_then = list(stream.tokens)
                late: list[bytes] = []
                stream.on_started(late.append)  # after STARTED: called at once
                gate.set()
                text = await stream.collect()
            return seen, tokens_then, late, text, stream.request_id

    with caplog.at_level(logging.ERROR, logger="tokenwire.client"):
        seen, tokens_then, late, text, request_id = run(go())
    assert seen == late == [request_id] and request_id is not None
    assert tokens_then == []
    assert text == "".join(WORDS)
    assert "a ChatStream.on_started callback raised" in caplog.text

# -- 1. the request limit is QUIC's stream limit: a request past it waits, it is not refused ----------------------
class _LimitedPair(Pair):
    """A :class:`Pair` whose server takes ``max_requests`` requests at once (from the start, as the daemon's
    connections are made)."""

    def __init__(self, max_requests: int) -> None:
        self.max_requests = max_requests
        super().__init__()

    def _server_for(self, data: bytes) -> ServerSession:
        if self.server is None:
            header = pull_quic_header(Buffer(data=data), host_cid_length=8)
            quic = QuicConnection(configuration=server_configuration(),
                                  original_destination_connection_id=header.destination_cid)
            self.server = ServerSession(quic, max_requests=self.max_requests)
        return self.server


def _ask(text: str) -> Request:
    return Request(messages=[{"role": "user", "content": text}])


def _finished(pair: Pair, sid: int) -> RequestFinished | None:
    return next((e for e in pair.client_events if isinstance(e, RequestFinished) and e.stream_id == sid), None)


def _answer(pair: Pair, sid: int) -> None:
    assert pair.server is not None
    pair.server.accept(sid)
    for i in range(3):
        pair.server.push(sid, f"t{i} ", pair.now)
    pair.server.finish(sid)


def test_a_request_past_the_limit_waits_for_a_lost_fin_instead_of_being_refused():
    """The README's advice (a semaphore of max_requests_per_connection around each chat) got requests refused on a
    lossy path: an answer read whole frees the semaphore while the FIN that frees the server's slot travels apart,
    and a new request overtook a lost FIN (120 chats at 8, 15 % loss: 19 LIMIT_EXCEEDED). The limit is now the
    client's QUIC stream credit: its stack holds the request until the server has the FIN and says so."""
    pair = _LimitedPair(2)
    pair.exchange(rounds=40)  # the handshake
    assert pair.server is not None
    first, second = (pair.client.start_request(_ask(t), pair.now) for t in ("a", "b"))
    pair.exchange(rounds=40)
    assert [e.stream_id for e in pair.server_events if isinstance(e, RequestReceived)] == [first, second]
    _answer(pair, first)
    _answer(pair, second)
    pair.now += 0.005
    for data, _ in pair.server.datagrams_to_send(pair.now):  # both answers reach the client whole ...
        pair.client_events += pair.client.receive_datagram(data, SERVER, pair.now)
    assert _finished(pair, first) and _finished(pair, second)
    assert pair.client.datagrams_to_send(pair.now)  # ... and its FINs (with its acks) are lost on the way back

    third = pair.client.start_request(_ask("c"), pair.now)  # the semaphore let the next chat go
    asked = pair.now
    pair.exchange(rounds=400)  # the FINs sent again, the server's FINs, then MAX_STREAMS lets the third leave
    assert not [e for e in pair.server_events if isinstance(e, RequestRefused)]
    assert [e.stream_id for e in pair.server_events if isinstance(e, RequestReceived)] == [first, second, third]
    _answer(pair, third)
    pair.exchange(rounds=200)
    done = _finished(pair, third)
    assert done is not None and done.result.digest_ok
    # its time counts from when it could leave, not from the wait behind the other answers (its TTFT, the REPORT)
    assert done.result.request_time > asked


def test_queued_requests_are_released_in_order_without_a_walk_of_them_all(monkeypatch):
    """Each packet received walked every queued request, and each timer update every open one: 2,000 chats
    started at once cost 16 s of client CPU (8.4 ms a chat; 5.2 ms walking to the first still blocked)."""
    from tokenwire.transport.client_session import ClientSession

    pair = _LimitedPair(2)
    pair.exchange(rounds=40)  # the handshake
    sids = [pair.client.start_request(_ask(f"q{i}"), pair.now) for i in range(300)]
    assert list(pair.client._queued) == sids[2:]  # past the limit: queued, in stream order
    looked = []
    blocked = ClientSession._stream_blocked
    monkeypatch.setattr(ClientSession, "_stream_blocked", lambda self, sid: looked.append(sid) or blocked(self, sid))
    pair.client._on_peer_packet(pair.now)
    assert looked == [sids[2]]  # the first still blocked holds every later one back
    assert [r.stream_id for r in pair.client._awaited()] == sids[:3]  # the open ones and the first queued


def test_a_sdk_connection_gets_the_servers_request_limit_as_its_stream_limit():
    """serve(max_requests_per_connection=) is what the client's QUIC stack may open (aioquic's default was 128)."""

    async def go() -> int:
        async with served(words, max_requests_per_connection=3) as server, \
                connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            limit = conn._protocol._quic._remote_max_streams_bidi
            await conn.chat("q").collect()
            return limit

    assert run(go()) == 3


# -- 2. wait_closed returns once the port can be bound again ------------------------------------------------------
def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_a_closed_server_has_let_go_of_its_port_when_wait_closed_returns():
    """close() then wait_closed() (or leaving ``async with server``) returned while the UDP socket was still bound:
    a server started again at once on the same port failed with "Address already in use"."""

    async def go() -> tuple[bool, bool, bool]:
        server = await serve(words, host="127.0.0.1", port=0)
        port = server.port
        server.close()
        await server.wait_closed()
        after_wait = _bindable(port)
        again = await serve(words, host="127.0.0.1", port=port)  # the same port, at once
        async with again:
            pass
        after_block = _bindable(port)
        third = await serve(words, host="127.0.0.1", port=port)
        third.close()
        await asyncio.gather(third.wait_closed(), third.wait_closed())  # two waiters: both return
        return after_wait, after_block, _bindable(port)

    assert run(go()) == (True, True, True)


# -- 3. a deliberate close cancels its open answers at the server -------------------------------------------------
@contextlib.asynccontextmanager
async def _daemon() -> AsyncIterator[Daemon]:
    """The daemon in this process on a loopback port (the demo upstream, no auth); stopped at the end."""
    daemon = Daemon(parse_config({"server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": ""},
                                  "limits": {"orphan_timeout_s": 60}}))
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


def _ended(daemon: Daemon, outcome: str) -> float:
    return value(daemon, "tokenwire_requests_ended_total", {"outcome": outcome})


@pytest.mark.parametrize("how", ["leave", "cancel"])
def test_leaving_connect_with_an_answer_open_cancels_it_at_the_daemon(how):
    """The SDK ended the answer locally (CANCELLED, "ended, by the application"), but the daemon heard only the
    connection's close, counted the answer lost and generated it for nobody until limits.orphan_timeout_s. The
    resets now go out ahead of the close; a path lost (no close at all) stays resumable."""

    async def go() -> tuple[float, float, float, TokenwireError]:
        async with _daemon() as daemon:
            port = daemon.addresses[0][1]
            reading: list[ChatStream] = []

            async def user() -> None:
                async with connect("127.0.0.1", port, verify=False) as conn:
                    stream = conn.chat("x", max_tokens=2000, params={"rate": 20})
                    reading.append(stream)
                    await stream.__anext__()  # the answer streams
                    if how == "leave":
                        return  # out of `async with connect()`, the answer still open
                    await asyncio.Event().wait()  # until cancelled (a web app's user left)

            task = asyncio.ensure_future(user())
            await until(lambda: bool(reading) and reading[0].tokens, T)
            if how == "cancel":
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with pytest.raises(TokenwireError) as info:
                await reading[0].collect()
            await until(lambda: _ended(daemon, "cancelled") + _ended(daemon, "lost") >= 1, T)
            await until(lambda: not daemon.protocols, T)
            return _ended(daemon, "cancelled"), _ended(daemon, "lost"), daemon.answers.count(), info.value

    cancelled, lost, live, error = run(go())
    assert (cancelled, lost) == (1, 0)
    assert live == 0  # not generated on for nobody
    assert error.code == ErrorCode.CANCELLED  # the application's own close, as before


def test_a_close_resets_the_open_requests_ahead_of_it_but_sends_nothing_of_a_queued_one():
    """ClientSession.abandon_open, then the close, as ClientProtocol.close does: the server reads the reset as the
    client's cancel (not lost), and a request still held back by the server's stream limit, which it never saw,
    neither reaches it nor breaks its stream limit."""
    pair = _LimitedPair(1)
    pair.exchange(rounds=40)
    running = pair.client.start_request(_ask("a"), pair.now)
    queued = pair.client.start_request(_ask("b"), pair.now)
    pair.exchange(rounds=40)
    assert pair.server is not None
    pair.server.accept(running)
    pair.server.push(running, "t ", pair.now)
    pair.exchange(rounds=40)
    assert sorted(pair.client.abandon_open()) == [running, queued]
    assert not pair.client.requests
    pair.now += 0.005
    for data, _ in pair.client.datagrams_to_send(pair.now):  # sent before the close (aioquic's sends nothing else)
        pair.server_events += pair.server.receive_datagram(data, CLIENT, pair.now)
    pair.client.close()
    pair.exchange(rounds=100)
    cancels = [e for e in pair.server_events if isinstance(e, RequestCancelled)]
    assert [(e.stream_id, e.lost) for e in cancels] == [(running, False)]
    assert [e.stream_id for e in pair.server_events if isinstance(e, RequestReceived)] == [running]
    ends = [e for e in pair.server_events if isinstance(e, ConnectionEnded)]
    assert [(e.error_code, e.by_peer) for e in ends] == [(ErrorCode.NO_ERROR, True)]  # the client's own close


# -- 4. an error raised again: its traceback does not grow ---------------------------------------------------------
def _frames(error: BaseException) -> list[str]:
    return [frame.name for frame in traceback.extract_tb(error.__traceback__)]


def test_an_error_read_again_and_again_keeps_a_bounded_traceback_with_its_first_raise():
    """``raise self._failure`` (every read of a failed answer) and ``raise close_error`` (every chat() on a closed
    connection) raised one object again and again: its traceback gathered every raise's frames (1,000 reads: 3,000
    frames, each holding its locals)."""

    async def first_read(stream: ChatStream) -> TokenwireError:
        try:
            await stream.collect()
        except TokenwireError as exc:
            return exc
        raise AssertionError("the answer did not fail")

    async def later_read(stream: ChatStream) -> TokenwireError:
        try:
            await stream.collect()
        except TokenwireError as exc:
            return exc
        raise AssertionError("the answer did not fail")

    def later_chat(conn: Connection) -> TokenwireError:
        try:
            conn.chat("again")
        except TokenwireError as exc:
            return exc
        raise AssertionError("a closed connection took a request")

    async def go() -> tuple[list[TokenwireError], list[TokenwireError], list[str], list[str], list[str]]:
        async with served(broken) as server:
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                stream = conn.chat("q")
                first = await first_read(stream)
                first_frames = _frames(first)
                reads = [first] + [await later_read(stream) for _ in range(1000)]
                await conn.close()
            chats = [later_chat(conn) for _ in range(1000)]
            return reads, chats, first_frames, _frames(reads[-1]), _frames(chats[-1])

    reads, chats, first_frames, read_frames, chat_frames = run(go())
    assert all(e is reads[0] for e in reads) and reads[0].code == ErrorCode.UPSTREAM_ERROR  # the same error
    assert all(e is chats[0] for e in chats) and chats[0].code == ErrorCode.CANCELLED
    assert read_frames.count("later_read") == 1 and read_frames.count("first_read") == 1  # its own, then the first's
    assert len(read_frames) <= 2 * len(first_frames) + 2
    assert chat_frames.count("later_chat") == 2 and len(chat_frames) <= 8


# -- 5. the idle timeout's code ------------------------------------------------------------------------------------
def test_an_idle_timeout_is_no_error_with_path_lost_not_a_server_failure():
    """aioquic reports its idle timer as transport INTERNAL_ERROR (0x1), which read as INTERNAL (0x100), "a failure of
    the server itself": an application dispatching on the code took a network blip for a server bug."""
    for awaiting in (True, False):
        err = closed_error(0x1, "Idle timeout", 2.0, awaiting=awaiting)
        assert err.code == ErrorCode.NO_ERROR and err.path_lost
    assert closed_error(0x100, "server error while sending", 2.0).code == ErrorCode.INTERNAL  # a real one stays

    async def source(request):
        yield "answer"

    async def go() -> RemoteError:
        async with served(source) as server, connect("127.0.0.1", server.port, idle_timeout=0.5,
                                                     **client_kwargs()) as conn:
            assert await conn.chat("one").collect() == "answer"
            await asyncio.wait_for(conn._protocol.wait_closed(), T)  # nothing open: the idle timer ends it
            with pytest.raises(RemoteError) as info:
                conn.chat("two")
            return info.value

    err = run(go())
    assert err.code == ErrorCode.NO_ERROR and err.path_lost


# -- 6 and 7. chat_sync ----------------------------------------------------------------------------------------------
def _keywords(function: Any, *skip: str) -> dict[str, tuple[object, object, object]]:
    params = inspect.signature(function).parameters.values()
    return {p.name: (p.kind, p.default, p.annotation) for p in params if p.name not in {"self", *skip}}


def test_chat_sync_takes_every_keyword_of_connect_and_chat():
    """README: chat_sync "takes connect's and chat's keyword arguments by name"; it lacked resume= and keepalive=.
    Compared whole (name, keyword-only, default, annotation), so that one added to either cannot be forgotten."""
    own = _keywords(chat_sync, "host", "port", "prompt")
    connect_kw = _keywords(connect.__wrapped__, "host", "port")  # type: ignore[attr-defined]  # (the function)
    chat_kw = _keywords(Connection.chat, "prompt")
    assert not set(connect_kw) & set(chat_kw)
    assert own.pop("retry_busy_s")[1:] == (0.0, "float")  # (its own: waiting for a busy server, ResumingChat's)
    assert own == {**connect_kw, **chat_kw}
    assert all(kind is inspect.Parameter.KEYWORD_ONLY for kind, _, _ in own.values())
    assert list(inspect.signature(chat_sync).parameters)[:3] == ["host", "port", "prompt"]


def test_chat_sync_passes_resume_and_keepalive_on():
    """The resume reaches the server (the SDK's serve() refuses it with NOT_FOUND); keepalive reaches connect."""
    server_box: dict[str, Any] = {}
    ready = threading.Event()
    stop = threading.Event()

    def serve_in_thread() -> None:
        async def main() -> None:
            async with served(words) as server:
                server_box["port"] = server.port
                ready.set()
                while not stop.is_set():
                    await asyncio.sleep(0.01)

        asyncio.run(main())

    thread = threading.Thread(target=serve_in_thread)
    thread.start()
    try:
        assert ready.wait(T)
        port = server_box["port"]
        with pytest.raises(RemoteError) as info:
            chat_sync("127.0.0.1", port, "q", resume=(b"\x01" * 16, []), **client_kwargs())
        result = chat_sync("127.0.0.1", port, "q", keepalive=True, **client_kwargs())
    finally:
        stop.set()
        thread.join(T)
    assert info.value.code == ErrorCode.NOT_FOUND
    assert result.text == "".join(WORDS)


def test_chat_sync_from_a_coroutine_says_so_and_leaves_no_unawaited_coroutine():
    """asyncio's "asyncio.run() cannot be called from a running event loop", and a RuntimeWarning about a coroutine
    never awaited: neither named chat_sync nor what to use instead."""

    async def inside() -> RuntimeError:
        with pytest.raises(RuntimeError) as info:
            chat_sync("127.0.0.1", 9, "q", verify=False)
        return info.value

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        error = asyncio.run(inside())
        gc.collect()  # (an unawaited coroutine warns when it is collected)
    assert "chat_sync() cannot be called from a coroutine" in str(error)
    assert "async with connect(" in str(error) and "collect()" in str(error)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
