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

Every token the source yields is put on the wire at once (those it yields in one turn of the event loop together),
with the scheme the client asked for
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

from aioquic.quic import events as qe
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

MAX_REQUESTS_PER_CONNECTION = 10_000
"""The bound of ``max_requests_per_connection``: the daemon's (``daemon.config.MAX_REQUESTS_PER_CONNECTION``). Each
open answer holds its transcript and a QUIC stream; unbounded, 2**60 + 1 broke every handshake (a stream limit QUIC
cannot encode), 2**62 raised inside aioquic, and a close then raised KeyError and leaked the socket."""

MAX_TOKENS = 16_384
"""``serve``'s default ``max_tokens``, the daemon's ``limits.max_tokens``: the most tokens one answer may have, whatever
its request asks. Uncapped, a request without max_tokens to a source that never stopped streamed 1.28 M tokens in
40 s, both ends' memory growing ~80 B a token (the transcript is kept until the client confirms it)."""

MAX_TOKENS_BOUND = 1_000_000
"""The bound of ``max_tokens``: the protocol's own bound on a request's max_tokens (and the daemon's
``limits.max_tokens``)."""

IDLE_TIMEOUT_RANGE_S = (1.0, 3600.0)
"""The bounds of ``idle_timeout``: the daemon's ``server.idle_timeout_s``."""

AUTHORIZE_TIMEOUT_S = 10.0
"""How long an async ``authorize`` may take for a verdict: one that never returned left its client waiting for
ever. Past it the request fails and the connection closes with INTERNAL, as for an ``authorize`` that raised."""

STOP_TIMEOUT_S = 10.0
"""How long :meth:`TokenServer.wait_closed` waits for the cancelled token sources to stop (their ``finally``
blocks run): a source that swallowed its cancellation kept ``wait_closed``, and leaving ``async with server``,
waiting for ever. Past it the sources still running are logged and left running."""

PIECES_PER_TURN = 64
TURN_S = 0.005
"""A source that yields without awaiting (a cached answer: ``for w in words: yield w``) gives the event loop a turn
after this many pieces or seconds: it never let the loop run, and 20,000 such pieces froze every other client for
1.2 s. Its pieces go out in one transmit per turn, as the daemon's do."""


@dataclass
class ChatRequest:
    """What a token source sees of one request.

    ``finish_reason``: how the answer ends when the source ends it before ``max_tokens``: "stop" unless the
    source sets another reason before it ends (a content filter, say). An answer that reaches ``max_tokens``
    ends with "length", as an LLM reports an answer that its limit stopped.

    ``max_tokens``: the request's limit, lowered to the server's (``serve(max_tokens=)``) when it asks for more;
    None when it asked for none (the answer still stops at the server's limit), as the daemon tells its upstreams.
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
        # why this connection is closed once its handshake is done (set by _new_policy, inside super().__init__)
        self._refusal: str | None = None
        super().__init__(
            quic,
            stream_handler,
            session_factory=lambda q: ServerSession(
                q,
                max_requests=app.max_requests_per_connection,
                max_redundant_tokens=app.max_redundant_tokens,
                request_timeout=app.request_timeout,
                marking=self._new_policy(app),
            ),
        )
        self.app = app
        self._queued_pieces = 0  # pieces pushed since the queued transmit was scheduled (see _queue_transmit)
        self._queued_since = 0.0
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

    def _new_policy(self, app: TokenServer) -> MarkingPolicy | None:
        """This connection's marking policy. A factory that raised broke every handshake silently (a traceback per
        Initial in the loop's exception handler, a client's ConnectTimeout): the connection goes on without a
        policy until its handshake is done, then closes with INTERNAL and the reason (:meth:`quic_event_received`).
        """
        if app.marking is None:
            return None
        try:
            return app.marking()
        except Exception as exc:
            self._refusal = f"server error: its ECN marking policy failed ({type(exc).__name__})"
            if not app._warned_marking:  # the traceback once; each later connection a line
                app._warned_marking = True
                log.exception("the marking policy factory failed; closing the connection")
            else:
                log.error("the marking policy factory failed (%s: %s); closing the connection",
                          type(exc).__name__, exc)
            return None

    def quic_event_received(self, event: qe.QuicEvent) -> None:
        super().quic_event_received(event)
        if self._refusal is not None and isinstance(event, qe.HandshakeCompleted):
            # (closed now, not at once: a close before the handshake is done reaches the client without its reason)
            self.server_session.close(ErrorCode.INTERNAL, self._refusal)

    def _cancel_tasks(self) -> None:
        """Cancel every request's task once, and forget it: close() left them here, and the connection's end (3 PTO
        later) cancelled them again, inside the source's ``finally``, cutting its cleanup short."""
        tasks = list(self.tasks.values())
        self.tasks.clear()
        for task in tasks:
            task.cancel()

    def _spawn(self, stream_id: int, coro: Awaitable[None], label: str) -> None:
        """Run a request's task; the server keeps it until it ends, so that wait_closed() waits for it (a
        connection that ended first, its cleanup still running, is no longer in ``app.protocols``)."""
        task = asyncio.ensure_future(coro)
        self.tasks[stream_id] = task
        self.app._track(task, label)

    def handle_session_events(self, events: list[SessionEvent]) -> None:
        for ev in events:
            if isinstance(ev, RequestReceived):
                self._on_request(ev.stream_id, ev.request)
            elif isinstance(ev, RequestCancelled):
                self._settle(ev.stream_id, "cancelled")
                task = self.tasks.pop(ev.stream_id, None)  # (popped: cancelled once, whatever ends later)
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
                self._cancel_tasks()
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
        if self._refusal is not None:  # (its connection is closing: the marking policy failed)
            self._settle(stream_id, "failed")
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
                self._spawn(stream_id, self._start_when_authorized(stream_id, request, check),
                            f"authorize() of stream {stream_id}")
                self.tasks[stream_id].add_done_callback(lambda _: _drop_check(check))
                return
            if not self._authorize(stream_id, verdict):
                return
        self._start(stream_id, request)

    async def _start_when_authorized(self, stream_id: int, request: Request, check: asyncio.Future[Any]) -> None:
        """Await an async ``authorize``'s verdict, then start the request as :meth:`_on_request` would have."""
        task = asyncio.current_task()
        failed = False
        verdict: object = None
        limit = self.app.authorize_timeout
        try:
            # asyncio.wait, not wait_for: a check that swallows its cancellation cannot hold this task (the done
            # callback of _on_request cancels it once this task ends)
            await asyncio.wait({check}, timeout=limit)
            if check.done():
                verdict = check.result()
            else:  # a check that never answered left its client waiting for ever
                log.error("authorize() gave no verdict within %g s (authorize_timeout); closing the connection", limit)
                failed = True
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
            max_tokens=min(request.max_tokens, self.app.max_tokens) if request.max_tokens else None,
            params=dict(request.params or {}),
            scheme=req.scheme,
            request_id=req.request_id,
            peer=self._quic._network_paths[0].addr if self._quic._network_paths else None,
        )
        self.transmit()
        self._spawn(stream_id, self._feed(stream_id, chat, transcript), f"request {chat.request_id.hex()}")

    async def _feed(self, stream_id: int, chat: ChatRequest, transcript) -> None:
        sess = self.server_session
        source: AsyncIterator[str] | None = None
        try:
            source = aiter(self.app.source(chat))
            # the server's cap bounds an answer whose request set none (an endless source streamed 1.28 M tokens
            # in 40 s, both ends' memory growing), and one whose request asked for more
            limit = self.app.max_tokens if chat.max_tokens is None else min(chat.max_tokens, self.app.max_tokens)
            reason = await self._pump(stream_id, source, limit, transcript) or _source_reason(chat)
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
            now = self.clock()
            try:
                sess.push(stream_id, piece, now, max_total=limit)
            except Exception as exc:
                raise _SendFailed from exc
            self.app.stats.tokens += len(transcript) - before  # tokens, not pieces: a long piece is several
            if limit is not None and len(transcript) >= limit:
                return "length"  # (the FINISHED's transmit sends it)
            if self._queue_transmit(now):
                await asyncio.sleep(0)  # a source that does not await: let the loop send, and serve the others
        if task is not None and task.cancelling():  # one that swallowed it and then ended: no FINISHED to send
            raise asyncio.CancelledError
        return None

    def _queue_transmit(self, now: float) -> bool:
        """Send what the answers pushed on the loop's next turn, once for all of them: a source that awaits between
        pieces has each one sent at once, one that does not has them batched. True when the loop has had no turn
        for :data:`PIECES_PER_TURN` pieces or :data:`TURN_S` seconds: the caller must give it one."""
        if self._transmit_task is None:
            self._transmit_task = self._loop.call_soon(self._transmit_queued)
            self._queued_pieces, self._queued_since = 0, now
        self._queued_pieces += 1
        return self._queued_pieces >= PIECES_PER_TURN or now - self._queued_since >= TURN_S

    def _transmit_queued(self) -> None:
        """The queued transmit; one that raises is this connection's fault (as a push that raises): its requests
        fail and it is closed, and the loop's exception handler sees nothing."""
        try:
            self.transmit()
        except Exception:
            self._transmit_task = None
            if self._quic._close_event is not None:
                return  # closing already (this failure was reported, or the close is under way)
            log.exception("connection failed while sending; closing it")
            for stream_id in list(self.tasks):
                self._settle(stream_id, "failed")
            self._close_broken()


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
    """The source's next piece, type-checked; None once it has ended. Bytes are refused as any other non-str: they
    were sent as they came, invalid UTF-8 rendered as U+FFFD, while the type and the error said str."""
    try:
        piece = await anext(source)
    except StopAsyncIteration:
        return None
    if not isinstance(piece, str):
        hint = " (decode bytes first: a piece is text)" if isinstance(piece, bytes | bytearray) else ""
        raise TypeError(f"token source yielded {type(piece).__name__}, expected str{hint}")
    # encoded here, so that text UTF-8 cannot carry (a lone surrogate) is the source's fault, not the sending's
    return piece.encode("utf-8")


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
    authorize_timeout: float = AUTHORIZE_TIMEOUT_S  # an async authorize's verdict must come within this
    stop_timeout: float = STOP_TIMEOUT_S  # wait_closed() waits this long for the cancelled sources to stop
    max_tokens: int = MAX_TOKENS  # the most tokens an answer may have, whatever its request asks
    stats: ServerStats = field(default_factory=ServerStats)
    protocols: set[ServerProtocol] = field(default_factory=set)
    _quic_server: ValidatingQuicServer | None = None
    _closed: asyncio.Event = field(default_factory=asyncio.Event)
    # every request's task until it ends, whatever cancelled it (its label names it in the log): wait_closed() waits
    _running: dict[asyncio.Task[None], str] = field(default_factory=dict, repr=False)
    _abandoned: set[asyncio.Task[None]] = field(default_factory=set, repr=False)  # still running past stop_timeout
    _closing_protocols: list[ServerProtocol] = field(default_factory=list, repr=False)  # connections it closed
    _warned_verdict: bool = field(default=False, repr=False)  # authorize() gave a non-bool verdict (logged once)
    _warned_marking: bool = field(default=False, repr=False)  # the marking factory failed (traceback logged once)

    def __post_init__(self) -> None:
        # callables checked here: a source of None or "hello", authorize=True or a str, marking="swiftqueue" were
        # accepted and failed each request (or each handshake) later
        if not callable(self.source):
            hint = (" (pass the async generator function, not what calling it returned)"
                    if inspect.isasyncgen(self.source) else "")
            raise TypeError("source must be a callable that takes a ChatRequest and returns an async iterator of str "
                            f"pieces, not {type(self.source).__name__}{hint}")
        _check_source_kind(self.source)
        for name in ("authorize", "marking"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TypeError(f"{name} must be a callable or None, not {type(value).__name__}")
        limit = self.max_requests_per_connection
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_REQUESTS_PER_CONNECTION:
            raise ValueError(f"max_requests_per_connection must be an int from 1 to {MAX_REQUESTS_PER_CONNECTION}, "
                             f"not {limit!r}")
        check_seconds("request_timeout", self.request_timeout)
        check_seconds("authorize_timeout", self.authorize_timeout)
        check_seconds("stop_timeout", self.stop_timeout)
        cap = self.max_tokens
        if isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= MAX_TOKENS_BOUND:
            raise ValueError(f"max_tokens must be an int from 1 to {MAX_TOKENS_BOUND:,} (the protocol's bound), "
                             f"not {cap!r}")

    def _track(self, task: asyncio.Task[None], label: str) -> None:
        self._running[task] = label
        task.add_done_callback(self._untrack)

    def _untrack(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._abandoned.discard(task)

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
        """Bind ``host:port`` and serve (what :func:`serve` does after building the server); ``idle_timeout`` as
        there."""
        check_congestion(congestion)
        check_idle_timeout(idle_timeout)
        if self.marking is not None:
            _try_marking(self.marking)  # before the socket: a factory that fails, fails here and not per handshake
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
        source, once (its ``finally`` blocks run uncut); :meth:`wait_closed` waits until all of that has finished."""
        if self._closed.is_set():
            return
        self._closed.set()
        for proto in list(self.protocols):
            # what this close cuts off counts as cancelled, not completed (unless the client's own close came first)
            proto.shut_down = proto._quic._close_event is None
            with contextlib.suppress(Exception):
                proto.close(ErrorCode.SHUTTING_DOWN, "server shutting down")
            proto._cancel_tasks()  # (once: the connection's end, later, finds none to cancel again)
            self._closing_protocols.append(proto)
        if self._quic_server is not None:
            self._quic_server.close()

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` has been called and everything it stopped has stopped: no token source of
        this server and no connection of it runs after this returns, and its UDP socket is closed (a server
        started on the same port at once can bind it).

        A source that ignores its cancellation (it catches ``CancelledError`` and goes on) is waited for
        ``stop_timeout`` seconds, then logged and left running: it held this wait for ever. Cancelling this wait
        (``asyncio.wait_for``, ``asyncio.timeout``) returns at once and cancels no source a second time."""
        await self._closed.wait()
        # the sources' cleanup (their finally blocks), then each connection's QUIC closing period (3 PTO);
        # asyncio.wait, not gather: a cancel of this wait was passed on to the sources (gather cancels its children)
        running = [t for t in self._running if not t.done() and t not in self._abandoned]
        if running:
            _, late = await asyncio.wait(running, timeout=self.stop_timeout)
            if late:
                self._abandoned.update(late)
                log.error("%d token source(s) still running %g s after close() (they caught their cancellation?), "
                          "left running: %s", len(late), self.stop_timeout,
                          ", ".join(sorted(self._running.get(t, "?") for t in late)))
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
    idle_timeout: float = 60.0,
    authorize_timeout: float = AUTHORIZE_TIMEOUT_S,
    stop_timeout: float = STOP_TIMEOUT_S,
    max_tokens: int = MAX_TOKENS,
) -> TokenServer:
    """Start serving ``source`` on UDP ``host:port`` (port 0 picks a free one: see ``server.port``; a port outside
    0..65535 raises ``ValueError``, as do ``max_requests_per_connection`` outside 1..10,000, ``idle_timeout``
    outside 1..3600, ``max_tokens`` outside 1..1,000,000 and ``keyfile`` without ``certfile``; a ``source``,
    ``authorize`` or ``marking`` that is not callable raises ``TypeError``, as does a ``source`` that is an
    ``async def`` without ``yield`` or a sync generator function).

    ``source``: called with a :class:`ChatRequest`, returns an async iterator of ``str`` pieces (anything else it
    yields, bytes too, fails that request with UPSTREAM_ERROR): an async generator function, or a plain function
    that returns an async iterator. A source that yields many pieces without awaiting
    (a cached answer) is given no more than :data:`PIECES_PER_TURN` pieces or :data:`TURN_S` seconds at a time: the
    other connections are served in between, and its pieces go out batched.

    ``authorize``: called with a request's auth token (None when it has none) before its source runs, for each
    request of a connection until one has been let in; a plain function or an ``async def`` (awaited in the
    request's own task, so a slow check holds up no other request or connection). It must return exactly
    ``True`` to let the connection in; ``False`` closes it with UNAUTHORIZED. Anything else (None, a truthy
    object, an exception) fails closed: the connection closes with INTERNAL and the request counts as failed
    (a verdict that is not a bool is logged once). With an async check, the requests that come before the first
    verdict are each checked, and any ``False`` closes the connection, answers already let in with it. An async
    check that gives no verdict within ``authorize_timeout`` seconds (default 10) fails closed as well (logged).

    ``max_requests_per_connection``: the answers a connection may have open at once, advertised to its client as
    QUIC's stream limit: the client's QUIC stack holds a request past it back until one of them has ended (a
    queued request, not a refused one).

    ``request_timeout``: a request must have arrived whole this many seconds after its stream's first bytes, plus
    its size at 32 KiB/s (LIMIT_EXCEEDED otherwise; the daemon's ``limits.request_timeout_s``): a client that
    sends a request slowly, or never its last byte, holds the server's memory no longer.

    ``marking``: a factory of per-connection ECN marking policies (``tokenwire.transport.marking``); with
    it the server runs on the ECN-capable transport and sets each packet's codepoint. Pair ECT(1) marking
    with ``congestion="prague"`` (a scalable response to CE). ``serve`` calls the factory once before it binds,
    and raises ``ValueError`` if that fails; a connection for which it fails later is closed with INTERNAL, after
    its handshake, with the reason (and the failure is logged).

    ``idle_timeout``: seconds without a packet from a client after which its connection ends and its running
    sources are cancelled (the daemon's ``server.idle_timeout_s``; default 60): a client that vanished, its
    sources generating for nobody, is cut off this soon. A live client's keepalive pings hold its connection open.

    ``stop_timeout``: how long :meth:`TokenServer.wait_closed` waits for the sources ``close()`` cancelled to stop
    (their ``finally`` blocks run); one that ignores its cancellation longer is logged and left running.

    ``max_tokens``: the most tokens one answer may have (default 16,384, the daemon's ``limits.max_tokens``): an
    answer stops at the lower of it and its request's ``max_tokens`` and ends with ``finish_reason`` "length",
    its source closed, as at a request's own limit. A request without ``max_tokens`` is bounded too: a source that
    never stops is not streamed for ever (the transcript of each answer stays in memory until the client confirms
    it). The source sees the request's limit lowered to this one in ``request.max_tokens`` (None if none was asked).
    """
    server = TokenServer(
        source, authorize=authorize, max_requests_per_connection=max_requests_per_connection, marking=marking,
        request_timeout=request_timeout, authorize_timeout=authorize_timeout, stop_timeout=stop_timeout,
        max_tokens=max_tokens,
    )
    return await server.start(host, port, cert=cert, certfile=certfile, keyfile=keyfile, congestion=congestion,
                              idle_timeout=idle_timeout)


def _check_source_kind(source: Callable[..., Any]) -> None:
    """TypeError for a source that can never give an async iterator: an ``async def`` that returns (its call gives a
    coroutine) or a sync generator function. Each request to one failed later with "token source failed:
    TypeError", an ERROR and a traceback in the log, and "coroutine ... was never awaited". A plain function that
    returns an async iterator stays allowed (the documented contract); an async generator function is a source."""
    # (inspect sees through bound methods and functools.partial; a callable object is left to its requests)
    if inspect.isasyncgenfunction(source):
        return
    if inspect.iscoroutinefunction(source):
        raise TypeError("source is an async def that returns: it must yield its str pieces (an async generator "
                        "function: `async def source(request): ... yield piece`), or be a plain function that "
                        "returns an async iterator")
    if inspect.isgeneratorfunction(source):
        raise TypeError("source is a sync generator function: it must be an async generator function (`async def` "
                        "with `yield`), or a plain function that returns an async iterator")


def check_idle_timeout(value: float) -> None:
    """ValueError unless ``value`` is in :data:`IDLE_TIMEOUT_RANGE_S`, the daemon's ``server.idle_timeout_s``."""
    lo, hi = IDLE_TIMEOUT_RANGE_S
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:  # (nan: not in it)
        raise ValueError(f"idle_timeout must be a number of seconds from {lo:g} to {hi:g} (the daemon's "
                         f"server.idle_timeout_s), not {value!r}")


def _try_marking(factory: Callable[[], MarkingPolicy]) -> None:
    """Make one policy with ``factory`` and drop it: a factory that raises (``make_policy("swiftqueue")`` without
    a forecaster) broke every handshake silently; it is a ValueError of ``serve`` now, before anything binds."""
    try:
        policy = factory()
    except Exception as exc:
        raise ValueError(f"marking: the policy factory failed: {type(exc).__name__}: {exc}") from exc
    if not callable(getattr(policy, "codepoint", None)) or not callable(getattr(policy, "on_sample", None)):
        raise TypeError(f"marking: the factory returned {type(policy).__name__}, not a marking policy (one with "
                        "codepoint() and on_sample())")


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
        description="The SDK's smallest server: the demo answer with the development certificate. "
                    "`tokenwire daemon` is the service.")
    # --host: a testbed's server namespace has its own address (docs/testbed.md), which 127.0.0.1 never reached
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=functools.partial(port_argument, listening=True), default=4433)
    args = parser.parse_args(argv)
    try:
        server = await serve(_example_source(), host=args.host, port=args.port)
    except OSError as exc:  # a port in use (another server, a daemon) was a traceback from the bind
        parser.exit(2, f"{parser.prog}: error: cannot listen on udp/{args.host}:{args.port}: {exc.strerror or exc}\n")
    # SIGTERM (kill, systemd, docker stop) closes it as Ctrl-C does: without the close, clients waited out their
    # idle timeout (60 s) and then read "no packet from the server"
    with contextlib.suppress(NotImplementedError):  # (a loop without signal handlers)
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, server.close)
    print(f"serving the demo answer on udp://{args.host}:{server.port} (dev certificate); Ctrl-C to stop", flush=True)
    async with server:  # Ctrl-C cancels the wait: leaving the block closes the server (clients get SHUTTING_DOWN)
        await server.wait_closed()


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main())
