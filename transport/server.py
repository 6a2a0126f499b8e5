"""Server side of the SDK: serve chat requests from any async iterator of text tokens.

Example (runnable: ``python -m tokenwire.transport.server``)::

    import asyncio
    from tokenwire.transport.server import serve

    async def answer(request):                 # any async iterator of text pieces, e.g. an LLM's output
        for word in ["Hello", ",", " world", "!"]:
            await asyncio.sleep(0.05)
            yield word

    async def main():
        server = await serve(answer, host="127.0.0.1", port=4433)   # a dev certificate unless given files
        async with server:          # leaving it (Ctrl-C cancels main) closes the server: clients get SHUTTING_DOWN
            await server.wait_closed()

    asyncio.run(main())

Every token the source yields is put on the wire at once, with the scheme the client asked for
(``chatterbox`` by default, ``stream`` or ``duplicate`` as baselines). The transcript of each answer
stays in memory until the client confirms it holds everything, so any lost range can be sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aioquic.quic.connection import QuicConnection

from .client import check_congestion
from .errors import ErrorCode, RequestError
from .frames import Request
from .marking import MarkingPolicy
from .quic_io import SessionProtocol, ValidatingQuicServer, port_argument, serve_quic, tune_socket
from .server_session import REQUEST_TIMEOUT_S, ServerSession
from .session_events import (
    ConnectionEnded,
    RequestCancelled,
    RequestCompleted,
    RequestReceived,
    RequestRefused,
    SessionEvent,
)
from .tls import CertPair, check_seconds, server_configuration

log = logging.getLogger("tokenwire.server")

NO_RESUME = "this server cannot resume answers (resume and attach need the tokenwire daemon)"
"""The NOT_FOUND refusal of a request with a resume id: the SDK server keeps no answer beyond its connection."""


@dataclass
class ChatRequest:
    """What a token source sees of one request.

    ``finish_reason``: how the answer ends when the source ends it before ``max_tokens``: "stop" unless the
    source sets another reason before it ends (a content filter, say). An answer that reaches ``max_tokens``
    ends with "length", as an LLM reports an answer that its limit stopped.
    """

    messages: list[dict[str, str]]
    model: str | None
    max_tokens: int | None
    params: dict[str, Any]
    scheme: str
    request_id: bytes
    peer: Any = None
    finish_reason: str | None = None

    @property
    def prompt(self) -> str:
        """The last user message (what simple sources answer)."""
        for m in reversed(self.messages):
            if m["role"] == "user":
                return m["content"]
        return ""


TokenSource = Callable[[ChatRequest], AsyncIterator[str]]
Authorizer = Callable[[str | None], bool | Awaitable[bool]]


@dataclass
class ServerStats:
    """What the server has seen. Each request counts once in ``requests`` and, once it has ended, once in
    exactly one of ``completed`` (FINISHED sent; the client confirmed, or its connection ended without a
    word against it), ``cancelled`` (the client abandoned it, its connection was lost first, or the server's
    own :meth:`TokenServer.close` cut it off before the client confirmed it), ``failed`` (the source or the
    server failed it, or ``authorize`` did) and ``refused`` (answered with an ERROR before its source ran: too
    many at once, too large, a resume or attach, an unauthorized connection)."""

    connections: int = 0
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    tokens: int = 0
    protocol_errors: int = 0
    refused: int = 0


class ServerProtocol(SessionProtocol):
    """One QUIC connection on the server: runs a task per request that feeds the source's tokens in."""

    def __init__(self, quic: QuicConnection, stream_handler: Any = None, *, app: TokenServer) -> None:
        super().__init__(
            quic,
            stream_handler,
            session_factory=lambda q: ServerSession(
                q,
                max_requests=app.max_requests_per_connection,
                max_redundant_tokens=app.max_redundant_tokens,
                request_timeout=app.request_timeout,
                marking=app.marking() if app.marking is not None else None,
            ),
        )
        self.app = app
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.authorized = app.authorize is None
        self.shut_down = False  # the server's close() closed this connection
        self._unsettled: set[int] = set()  # requests counted in stats.requests without an outcome yet
        app.stats.connections += 1
        app.protocols.add(self)

    @property
    def server_session(self) -> ServerSession:
        assert isinstance(self.session, ServerSession)
        return self.session

    def handle_session_events(self, events: list[SessionEvent]) -> None:
        for ev in events:
            if isinstance(ev, RequestReceived):
                self._on_request(ev.stream_id, ev.request)
            elif isinstance(ev, RequestCancelled):
                self._settle(ev.stream_id, "cancelled")
                task = self.tasks.pop(ev.stream_id, None)
                if task is not None:
                    task.cancel()
            elif isinstance(ev, RequestCompleted):
                self._settle(ev.stream_id, "completed")
            elif isinstance(ev, RequestRefused):
                self.app.stats.requests += 1  # the session refused it before it became a request
                self.app.stats.refused += 1
                log.warning("refused request stream %d: %s", ev.stream_id, ev.reason)
            elif isinstance(ev, ConnectionEnded):
                if not ev.by_peer:
                    self.app.stats.protocol_errors += 1
                    log.warning("closed connection: %s (code %#x)", ev.reason, ev.error_code)
                for task in self.tasks.values():
                    task.cancel()
                self.tasks.clear()
                # the session cancelled every request the connection cut off (RequestCancelled, above): what
                # has no outcome yet is an answer sent whole (FINISHED) whose client closed before confirming,
                # or that the server's own close() cut off before the client could confirm it
                for sid in list(self._unsettled):
                    self._settle(sid, "cancelled" if self.shut_down else "completed")
                self.app.protocols.discard(self)

    def _settle(self, stream_id: int, outcome: str) -> None:
        """Count a request's outcome once: a cancel after an ERROR or a lost connection after a refusal is
        not a second one, and a stream that never counted as a request has none."""
        if stream_id in self._unsettled:
            self._unsettled.discard(stream_id)
            setattr(self.app.stats, outcome, getattr(self.app.stats, outcome) + 1)

    def _on_request(self, stream_id: int, request: Request) -> None:
        sess = self.server_session
        self.app.stats.requests += 1
        self._unsettled.add(stream_id)
        if stream_id not in sess.requests:  # the client's FIN came in the same read: its RequestCancelled follows
            return
        if self.app.closing:  # close() has begun (the connection is closing and cancels it): start nothing
            return
        if not self.authorized:
            assert self.app.authorize is not None
            try:
                verdict = self.app.authorize(request.auth)
            except Exception:  # a broken check must not leave the client waiting for an answer
                log.exception("authorize() failed; closing the connection")
                self._auth_failed(stream_id)
                return
            if inspect.isawaitable(verdict):
                # an async check (a database, a token service) runs in the request's task: the connection, and
                # every other one, goes on meanwhile; cancelling the request or closing cancels the check too
                check = asyncio.ensure_future(verdict)
                task = asyncio.ensure_future(self._start_when_authorized(stream_id, request, check))
                task.add_done_callback(lambda _: _drop_check(check))
                self.tasks[stream_id] = task
                return
            if not self._authorize(stream_id, verdict):
                return
        self._start(stream_id, request)

    async def _start_when_authorized(self, stream_id: int, request: Request, check: asyncio.Future[Any]) -> None:
        """Await an async ``authorize``'s verdict, then start the request as :meth:`_on_request` would have."""
        task = asyncio.current_task()
        failed = False
        try:
            verdict = await check
        except asyncio.CancelledError:
            if task is not None and task.cancelling():
                raise  # the request or the connection ended first (its event settled the request)
            log.error("authorize() was cancelled; closing the connection")
            failed = True
        except Exception:
            log.exception("authorize() failed; closing the connection")
            failed = True
        self.tasks.pop(stream_id, None)
        if failed:
            self._auth_failed(stream_id)
            return
        if self._quic._close_event is not None or stream_id not in self.server_session.requests:
            return  # the connection is closing (another request was unauthorized, close()): start nothing
        if self._authorize(stream_id, verdict):  # (its own verdict even if another request let the connection in)
            self._start(stream_id, request)

    def _authorize(self, stream_id: int, verdict: object) -> bool:
        """Act on ``authorize``'s verdict: True lets the connection in; False, or anything that is not a bool (a
        truthy object is no yes: ``bool()`` of an un-awaited coroutine let every token in), refuses the request
        and closes the connection."""
        if verdict is True:
            self.authorized = True
            return True
        if verdict is not False:  # fail closed: a check that says neither yes nor no is not a yes
            if not self.app._warned_verdict:
                self.app._warned_verdict = True
                log.error("authorize() returned %r, not True or False: every such request is refused (this is "
                          "logged once)", type(verdict).__name__)
            self._auth_failed(stream_id)
            return False
        log.warning("unauthorized request; closing the connection")
        self._settle(stream_id, "refused")
        self.server_session.close(ErrorCode.UNAUTHORIZED, "missing or invalid auth token")
        self.transmit()
        return False

    def _auth_failed(self, stream_id: int) -> None:
        """``authorize`` raised or gave no verdict: the request fails and the connection closes (nothing checked
        the client's token, so it is not let in)."""
        self._settle(stream_id, "failed")
        self.server_session.close(ErrorCode.INTERNAL, "the server could not check the auth token")
        self.transmit()

    def _start(self, stream_id: int, request: Request) -> None:
        """Answer an authorized request: refuse a resume, else run the source in a task of its own."""
        sess = self.server_session
        if request.resume_id is not None:
            # resume= and attach() name an answer by id; this server keeps no answer beyond its connection, and
            # running the source again would give other text (or none: an attach has no messages)
            self._settle(stream_id, "refused")
            sess.reject(stream_id, ErrorCode.NOT_FOUND, NO_RESUME)
            self.transmit()
            return
        transcript = sess.accept(stream_id)
        req = sess.requests[stream_id]
        assert request.messages is not None  # decode_frame requires them in a request that resumes nothing
        chat = ChatRequest(
            messages=request.messages,
            model=request.model,
            max_tokens=request.max_tokens,
            params=dict(request.params or {}),
            scheme=req.scheme,
            request_id=req.request_id,
            peer=self._quic._network_paths[0].addr if self._quic._network_paths else None,
        )
        self.transmit()
        task = asyncio.ensure_future(self._feed(stream_id, chat, transcript))
        self.tasks[stream_id] = task

    async def _feed(self, stream_id: int, chat: ChatRequest, transcript) -> None:
        sess = self.server_session
        source: AsyncIterator[str] | None = None
        try:
            source = aiter(self.app.source(chat))
            reason = await self._pump(stream_id, source, chat.max_tokens, transcript) or _source_reason(chat)
            await _aclose(source)  # before FINISHED: a source cut at max_tokens releases what it holds first
            source = None
            try:
                sess.finish(stream_id, reason)
            except Exception as exc:
                raise _SendFailed from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                return  # this task is being cancelled (the client gave up, the server closes): nobody to answer
            # the source's own await was cancelled (an engine dropped the request): the answer ends here
            self._settle(stream_id, "failed")
            log.warning("token source was cancelled for request %s", chat.request_id.hex())
            sess.fail(stream_id, ErrorCode.UPSTREAM_ERROR, "token source was cancelled")
        except RequestError as exc:
            self._settle(stream_id, "failed")
            sess.fail(stream_id, exc.code, str(exc))
        except _SendFailed:
            # this connection's packet path broke (session, marking, socket), not the source: it was reported as
            # "token source failed" and answered through the same broken path; the connection is closed instead
            self._settle(stream_id, "failed")
            log.exception("connection failed while sending request %s; closing it", chat.request_id.hex())
            self._close_broken()
            return  # (after the finally)
        except Exception as exc:  # a broken source must not take the server down
            self._settle(stream_id, "failed")
            log.exception("token source failed for request %s", chat.request_id.hex())
            sess.fail(stream_id, ErrorCode.UPSTREAM_ERROR, f"token source failed: {exc.__class__.__name__}")
        finally:
            self.tasks.pop(stream_id, None)
            if source is not None:
                await _aclose(source)  # stopped early (cancelled, failed): run the source's cleanup now
        try:
            self.transmit()
        except Exception:  # the FINISHED or ERROR could not be sent: this connection's fault, as above
            log.exception("connection failed while sending the end of request %s; closing it",
                          chat.request_id.hex())
            self._close_broken()

    def _close_broken(self) -> None:
        """Close a connection whose packet path raised; the close itself may fail the same way."""
        with contextlib.suppress(Exception):
            self.server_session.close(ErrorCode.INTERNAL, "server error while sending")
            self.transmit()

    async def _pump(self, stream_id: int, source: AsyncIterator[str], limit: int | None, transcript) -> str | None:
        """Put the source's pieces on the wire until it ends (None: the source's own reason) or the answer has
        ``limit`` tokens ("length")."""
        sess = self.server_session
        task = asyncio.current_task()
        while (piece := await _next_piece(source)) is not None:
            if task is not None and task.cancelling():  # a source that swallowed our cancellation
                raise asyncio.CancelledError
            before = len(transcript)
            try:
                sess.push(stream_id, piece, self.clock(), max_total=limit)
                self.app.stats.tokens += len(transcript) - before  # tokens, not pieces: a long piece is several
                self.transmit()
            except Exception as exc:
                raise _SendFailed from exc
            if limit is not None and len(transcript) >= limit:
                return "length"
        return None


def _drop_check(check: asyncio.Future[Any]) -> None:
    """The request's task has ended: stop an async ``authorize`` nobody waits for any more, and mark its failure
    as seen (reported another way, or moot)."""
    if not check.done():
        check.cancel()
    elif not check.cancelled():
        check.exception()


class _SendFailed(Exception):
    """Putting a piece on the wire raised: the connection's fault, not the token source's."""


def _source_reason(chat: ChatRequest) -> str:
    """The finish reason of an answer its source ended: ``chat.finish_reason`` if the source set one."""
    reason = chat.finish_reason
    if reason is None:
        return "stop"
    if not isinstance(reason, str) or not 1 <= len(reason) <= 32:
        raise TypeError(f"token source set finish_reason to {reason!r}, expected a str of 1 to 32 characters")
    return reason


async def _next_piece(source: AsyncIterator[str]) -> bytes | None:
    """The source's next piece, type-checked; None once it has ended."""
    try:
        piece = await anext(source)
    except StopAsyncIteration:
        return None
    if not isinstance(piece, str | bytes):
        raise TypeError(f"token source yielded {type(piece).__name__}, expected str")
    # encoded here, so that text UTF-8 cannot carry (a lone surrogate) is the source's fault, not the sending's
    return piece.encode("utf-8") if isinstance(piece, str) else piece


async def _aclose(source: AsyncIterator[str]) -> None:
    """Close an async generator source (its ``finally`` blocks run); a no-op once it has ended."""
    aclose = getattr(source, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:  # its cleanup failed: the answer itself is settled
        log.exception("closing the token source failed")


@dataclass
class TokenServer:
    """A running tokenwire server (returned by :func:`serve`)."""

    source: TokenSource
    authorize: Authorizer | None = None
    max_requests_per_connection: int = 64
    max_redundant_tokens: int = 64
    request_timeout: float = REQUEST_TIMEOUT_S  # a request must be whole this long after its first bytes (+ size)
    marking: Callable[[], MarkingPolicy] | None = None  # per-connection ECN marking policy (ECN transport)
    stats: ServerStats = field(default_factory=ServerStats)
    protocols: set[ServerProtocol] = field(default_factory=set)
    _quic_server: ValidatingQuicServer | None = None
    _closed: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: list[asyncio.Task[None]] = field(default_factory=list, repr=False)  # sources close() cancelled
    _closing_protocols: list[ServerProtocol] = field(default_factory=list, repr=False)  # connections it closed
    _warned_verdict: bool = field(default=False, repr=False)  # authorize() gave a non-bool verdict (logged once)

    def __post_init__(self) -> None:
        limit = self.max_requests_per_connection
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:  # 0 accepted, then refused all
            raise ValueError(f"max_requests_per_connection must be an int of at least 1, not {limit!r}")
        check_seconds("request_timeout", self.request_timeout)

    @property
    def port(self) -> int:
        assert self._quic_server is not None
        sock = self._quic_server._transport.get_extra_info("sockname")  # type: ignore[union-attr]  # set: serving
        return int(sock[1])

    @property
    def closing(self) -> bool:
        """``close()`` has been called."""
        return self._closed.is_set()

    async def start(
        self,
        host: str,
        port: int,
        *,
        cert: CertPair | None = None,
        certfile: str | Path | None = None,
        keyfile: str | Path | None = None,
        congestion: str = "reno",
        idle_timeout: float = 60.0,
    ) -> TokenServer:
        check_congestion(congestion)
        config = server_configuration(
            cert=cert, certfile=certfile, keyfile=keyfile, congestion=congestion, idle_timeout=idle_timeout
        )
        self._quic_server = await serve_quic(
            host,
            port,
            configuration=config,
            create_protocol=functools.partial(ServerProtocol, app=self),
            ecn=self.marking is not None,
        )
        tune_socket(self._quic_server._transport)
        return self

    def close(self) -> None:
        """Stop accepting, close every connection (clients see SHUTTING_DOWN) and cancel every running token
        source; :meth:`wait_closed` waits until all of that has finished."""
        if self._closed.is_set():
            return
        self._closed.set()
        for proto in list(self.protocols):
            tasks = [t for t in proto.tasks.values() if not t.done()]
            # what this close cuts off counts as cancelled, not completed (unless the client's own close came first)
            proto.shut_down = proto._quic._close_event is None
            with contextlib.suppress(Exception):
                proto.close(ErrorCode.SHUTTING_DOWN, "server shutting down")
            for task in tasks:
                task.cancel()
            self._stopping.extend(tasks)
            self._closing_protocols.append(proto)
        if self._quic_server is not None:
            self._quic_server.close()

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` has been called and everything it stopped has stopped: no token source of
        this server and no connection of it runs after this returns, and its UDP socket is closed (a server
        started on the same port at once can bind it)."""
        await self._closed.wait()
        # the sources' cleanup (their finally blocks), then each connection's QUIC closing period (3 PTO)
        await asyncio.gather(*self._stopping, return_exceptions=True)
        await asyncio.gather(*(p.wait_closed() for p in self._closing_protocols), return_exceptions=True)
        if self._quic_server is not None:  # (close() only scheduled the socket's close)
            await self._quic_server.wait_released()

    async def __aenter__(self) -> TokenServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


async def serve(
    source: TokenSource,
    host: str = "::",
    port: int = 4433,
    *,
    cert: CertPair | None = None,
    certfile: str | Path | None = None,
    keyfile: str | Path | None = None,
    authorize: Authorizer | None = None,
    congestion: str = "reno",
    max_requests_per_connection: int = 64,
    marking: Callable[[], MarkingPolicy] | None = None,
    request_timeout: float = REQUEST_TIMEOUT_S,
) -> TokenServer:
    """Start serving ``source`` on UDP ``host:port`` (port 0 picks a free one: see ``server.port``; a port outside
    0..65535 raises ``ValueError``, as does ``max_requests_per_connection`` below 1 and ``keyfile`` without
    ``certfile``).

    ``authorize``: called with a request's auth token (None when it has none) before its source runs, for each
    request of a connection until one has been let in; a plain function or an ``async def`` (awaited in the
    request's own task, so a slow check holds up no other request or connection). It must return exactly
    ``True`` to let the connection in; ``False`` closes it with UNAUTHORIZED. Anything else (None, a truthy
    object, an exception) fails closed: the connection closes with INTERNAL and the request counts as failed
    (a verdict that is not a bool is logged once). With an async check, the requests that come before the first
    verdict are each checked, and any ``False`` closes the connection, answers already let in with it.

    ``max_requests_per_connection``: the answers a connection may have open at once, advertised to its client as
    QUIC's stream limit: the client's QUIC stack holds a request past it back until one of them has ended (a
    queued request, not a refused one).

    ``request_timeout``: a request must have arrived whole this many seconds after its stream's first bytes, plus
    its size at 32 KiB/s (LIMIT_EXCEEDED otherwise; the daemon's ``limits.request_timeout_s``): a client that
    sends a request slowly, or never its last byte, holds the server's memory no longer.

    ``marking``: a factory of per-connection ECN marking policies (``tokenwire.transport.marking``); with
    it the server runs on the ECN-capable transport and sets each packet's codepoint. Pair ECT(1) marking
    with ``congestion="prague"`` (a scalable response to CE).
    """
    server = TokenServer(
        source, authorize=authorize, max_requests_per_connection=max_requests_per_connection, marking=marking,
        request_timeout=request_timeout,
    )
    return await server.start(host, port, cert=cert, certfile=certfile, keyfile=keyfile, congestion=congestion)


def _example_source() -> Callable[[ChatRequest], AsyncIterator[str]]:  # pragma: no cover - example
    async def answer(request: ChatRequest) -> AsyncIterator[str]:
        from tokenwire.daemon.demo_upstream import demo_stream

        async for tok in demo_stream(200):
            yield tok

    return answer


async def _main(argv: list[str] | None = None) -> None:  # pragma: no cover - example
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m tokenwire.transport.server",
        description="The SDK's smallest server: the demo answer on 127.0.0.1 with the development certificate. "
                    "`tokenwire daemon` is the service.")
    parser.add_argument("--port", type=functools.partial(port_argument, listening=True), default=4433)
    args = parser.parse_args(argv)
    try:
        server = await serve(_example_source(), host="127.0.0.1", port=args.port)
    except OSError as exc:  # a port in use (another server, a daemon) was a traceback from the bind
        parser.exit(2, f"{parser.prog}: error: cannot listen on udp/127.0.0.1:{args.port}: {exc.strerror or exc}\n")
    # SIGTERM (kill, systemd, docker stop) closes it as Ctrl-C does: without the close, clients waited out their
    # idle timeout (60 s) and then read "no packet from the server"
    with contextlib.suppress(NotImplementedError):  # (a loop without signal handlers)
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, server.close)
    print(f"serving the demo answer on udp://127.0.0.1:{server.port} (dev certificate); Ctrl-C to stop", flush=True)
    async with server:  # Ctrl-C cancels the wait: leaving the block closes the server (clients get SHUTTING_DOWN)
        await server.wait_closed()


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main())
