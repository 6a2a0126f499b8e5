"""An answer that survives lost connections: reconnect, resume after the tokens held, back off while no server answers.

Example (against the tokenwire daemon, which keeps answers across connections)::

    from tokenwire.transport.client import ResumingChat, connect

    async def main():
        chat = ResumingChat(lambda: connect("chat.example.com", 4433), "Why do chatbots stall on trains?",
                            retries=3)
        async with chat:                     # leaving it early cancels the answer at the server
            async for delta in chat:         # the whole answer once: no text lost or repeated across reconnects
                print(delta, end="", flush=True)
        print(chat.stats)

What counts as lost: a connection that went silent for its ``idle_timeout`` (``RemoteError.path_lost``: nobody
closed it, the daemon keeps the answer) once the answer has its id, and then a reconnect that finds no server
(no handshake, no name lookup). Anything else is raised at once, without a retry: an ERROR for the answer
(``NOT_FOUND``, ``UPSTREAM_ERROR`` ...), a close by the server (``UNAUTHORIZED``, ``SHUTTING_DOWN``: a stopping
daemon ends the answers it holds in memory, a resume after its restart would get ``NOT_FOUND``), a handshake TLS
refused, a refused argument; but with ``retry_busy_s`` a new request the server refused as busy (its ERROR names a
Retry-After: ``RemoteError.retry_after``) before any token came is sent again after that wait (:class:`BusyRetries`).
This module imports no aioquic at import time (``tokenwire chat --help`` reads its
constants).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from .errors import ErrorCode, RemoteError

if TYPE_CHECKING:
    from .chat_stats import ChatStats
    from .client import ChatStream, Connection

RECONNECT_S = 300.0
"""How long reconnecting goes on after one lost connection before it gives up: the daemon keeps an answer nobody is
attached to for ``limits.orphan_timeout_s`` (300 s by default), counted from when its end of the connection timed
out, about when the client noticed. The attempts used to follow one another back to back, each bounded only by the
10-s handshake timeout (or the idle timeout): a 120-s outage both ways gave up at 95 s with the answer still at the
daemon, and with an idle timeout of 3 s and 5 retries the retries were gone 12 s into an outage."""
RETRY_FIRST_S = 1.0
"""The wait before an outage's second reconnect attempt (the first goes at once), doubling with each one after."""
RETRY_CAP_S = 15.0
"""The longest wait between reconnect attempts: the answer resumes at most this long (plus a handshake) after the
path returns, and a failing name lookup (a network gone: it fails at once) costs one attempt per 15 s."""
RETRY_JITTER = 0.2
"""Each wait is shortened by up to this fraction at random: clients cut off together (a server's or a cell's
outage) do not come back in lockstep."""
BUSY_MIN_WAIT_S = 0.5
"""The shortest wait before a request a busy server refused goes again: an upstream's Retry-After may say 0 s (an
HTTP date already past), and asking again at once would spend the whole budget on refusals."""
BUSY_JITTER = 0.2
"""A busy wait is lengthened by up to this fraction at random (Retry-After is a least): clients refused together
do not all come back in the same instant, to be refused again but one."""


class BusyRetries:
    """The budget of waiting for a busy server: ``budget_s`` seconds in all (0: none), for one answer.

    :meth:`wait_for` says how long to wait before sending a refused request again: the refusal's ``retry_after``
    (at least :data:`BUSY_MIN_WAIT_S`, lengthened by up to :data:`BUSY_JITTER`), cut to what is left of the budget,
    or None (raise the refusal): it names no Retry-After (broken or refused, not busy), or more than the whole
    budget (an upstream's "Retry-After: 86400" had a 30-s budget waited out for a sure refusal), or none is left.
    (A Retry-After within the budget but past what is left is cut to it: the daemon's own is an estimate.)
    ``rng`` (in [0, 1): the jitter) is for tests."""

    def __init__(self, budget_s: float, *, rng: Callable[[], float] = random.random) -> None:
        if isinstance(budget_s, bool) or not isinstance(budget_s, int | float) or not 0 <= budget_s < math.inf:
            raise ValueError(f"retry_busy_s: expected seconds >= 0, got {budget_s!r}")
        self.budget_s = float(budget_s)
        self.rng = rng
        self.waited_s = 0.0  # planned waits so far (each counted whole, cut short by a stop or not)
        self.waits = 0

    def wait_for(self, error: BaseException) -> float | None:
        """Seconds to wait before asking again after ``error``, or None: raise it (a note says why, once waited)."""
        after = getattr(error, "retry_after", None) if isinstance(error, RemoteError) else None
        if after is None:
            return None
        left = self.budget_s - self.waited_s
        if left <= 1e-6 or after > self.budget_s:  # (more than the whole budget: a sure refusal at its end)
            waited = f"{self.waits} wait{'s' if self.waits > 1 else ''}"
            if after > self.budget_s and left > 1e-6:
                error.add_note(f"tokenwire: not waited for: the server asks for {after:g} s, more than the whole "
                               f"retry_busy_s={self.budget_s:g}" + (f" ({waited}, {self.waited_s:.1f} s, before)"
                                                                    if self.waits else ""))
            elif self.waits:
                error.add_note(f"tokenwire: the server was still busy after {self.waited_s:.1f} s of waiting "
                               f"({waited}, retry_busy_s={self.budget_s:g})")
            return None
        wait = min(left, max(after, BUSY_MIN_WAIT_S) * (1.0 + BUSY_JITTER * self.rng()))
        self.waited_s += wait
        self.waits += 1
        return wait


class Reconnecting:
    """The retry budget and backoff of one answer: how many lost connections are left to resume, and when an
    outage's next reconnect attempt goes.

    A connection that was up and is lost mid-answer spends one retry (``retries`` in all) and starts an outage; its
    first reconnect attempt goes at once. Attempts that find no server (no handshake, no name lookup) spend no
    retry: the next one follows after ``first_s``, doubling up to ``cap_s`` (each shortened by up to ``jitter`` at
    random), for ``window_s`` after the loss. Counting every attempt as a retry spent them back to back, seconds
    into an outage the daemon outlives. ``clock`` and ``rng`` (in [0, 1): the jitter) are for tests."""

    def __init__(self, retries: int, *, first_s: float = RETRY_FIRST_S, cap_s: float = RETRY_CAP_S,
                 window_s: float = RECONNECT_S, jitter: float = RETRY_JITTER,
                 clock: Callable[[], float] = time.monotonic, rng: Callable[[], float] = random.random) -> None:
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries: expected an integer >= 0, got {retries!r}")
        self.retries = retries
        self.first_s, self.cap_s, self.window_s, self.jitter = first_s, cap_s, window_s, jitter
        self.clock = clock
        self.rng = rng
        self.used = 0  # lost connections resumed, or being reconnected
        self.attempts = 0  # reconnect attempts in the current outage (the one under way included)
        self.lost_at = 0.0  # (the clock's) when the current outage's connection was lost

    def lost(self) -> bool:
        """A connection that was up is lost: whether a retry is left (it is spent now, and an outage starts)."""
        if self.used >= self.retries:
            return False
        self.used += 1
        self.attempts = 1
        self.lost_at = self.clock()
        return True

    def failed(self) -> float | None:
        """The current outage's reconnect attempt failed: seconds to wait before the next one, or None when it
        would start past ``window_s`` since the loss (then give up)."""
        wait = min(self.cap_s, self.first_s * 2.0 ** min(self.attempts - 1, 30))
        wait *= 1.0 - self.jitter * self.rng()
        if self.reconnecting_for() + wait > self.window_s:
            return None
        self.attempts += 1
        return wait

    def reconnecting_for(self) -> float:
        """Seconds since the current outage's connection was lost."""
        return self.clock() - self.lost_at


@dataclass(frozen=True)
class Reconnect:
    """What :class:`ResumingChat`'s ``on_reconnect`` hears before each reconnect attempt: ``error`` ended the
    connection (``attempt`` 1: a lost connection, a retry spent; the attempt goes at once) or the previous attempt
    (no server reached: ``attempt`` 2 and up, after ``wait_s``). ``request_id`` and ``tokens_held``: where the
    answer resumes; ``retries_used`` of ``retries``; ``since_loss_s``: seconds since the connection was lost."""

    error: BaseException
    request_id: bytes
    tokens_held: int
    retries_used: int
    retries: int
    attempt: int
    wait_s: float
    since_loss_s: float


class ResumingChat:
    """One answer as an async iterator of text deltas that survives lost connections: when the path goes silent
    mid-answer (``RemoteError.path_lost``), it reconnects with ``connect()`` and resumes after the tokens it holds,
    so the deltas are the whole answer once, none lost or repeated; reconnect attempts that find no server back off
    (:class:`Reconnecting`). Needs the tokenwire daemon, which keeps answers across connections.

    ``connect``: a function opening a connection, called for each one (``lambda: connect(host, port, ...)``);
    ``prompt`` and ``scheme`` .. ``params`` as :meth:`Connection.chat`'s, or ``attach`` (a request id, as
    :meth:`Connection.attach`) instead of a prompt. ``retries``: how many lost connections one answer survives
    (0: none), or a :class:`Reconnecting` for a schedule of one's own. ``on_reconnect`` is called before each
    reconnect attempt with a :class:`Reconnect` (to say so: ``tokenwire chat`` prints a line).

    ``retry_busy_s``: seconds this answer may spend waiting for a busy server (0, the default: none), or a
    :class:`BusyRetries`. A new request (not an attach, not a resume) that the server refuses with a
    ``RemoteError`` whose ``retry_after`` is set (an ERROR: its ``limits.max_live_answers``, an upstream's 429, 503
    or a 5xx naming a time), before any token of the answer came, is sent again on a new connection after
    ``retry_after`` seconds (cut to what is left; no connection is held meanwhile); ``on_busy(error, wait_s)`` is
    called before each wait.
    Refusals without ``retry_after`` are raised at once, as is one asking for more than the whole budget and the
    last one once the budget is spent. A stop (:meth:`aclose`, or a cancelled reader leaving ``async with``) during
    the wait ends it at once; a cancelled read alone does not (its step goes on, as every read's does: the request
    goes again after the wait). An upstream refusing after the answer started (STARTED came, no token) makes the
    retry a new answer: ``on_started`` hears its new id.

    Errors that are not a lost path are raised at once (an ERROR for the answer, the server's close such as
    ``UNAUTHORIZED`` or ``SHUTTING_DOWN``, a TLS refusal, a refused argument), and so is a path lost before the
    answer had its id (nothing to resume: ask again). Out of retries, or with no server reached for ``window_s``
    after a loss, the last error is raised, with a note saying so (``gave_up`` tells which); the answer may still
    be generating at the daemon then: :meth:`resume_point` (or its id, to attach).

    Read it inside ``async with chat:``: leaving the block early (a break, an exception, a cancellation) cancels
    the answer at the server, as a :class:`ChatStream`'s ``async with`` does. One task reads it at a time.
    """

    def __init__(
        self,
        connect: Callable[[], AbstractAsyncContextManager[Connection]],
        prompt: str | Sequence[Mapping[str, object]] | None = None,
        *,
        attach: bytes | str | None = None,
        scheme: str = "chatterbox",
        model: str | None = None,
        max_tokens: int | None = None,
        params: Mapping[str, Any] | None = None,
        retries: int | Reconnecting = 3,
        on_reconnect: Callable[[Reconnect], None] | None = None,
        retry_busy_s: float | BusyRetries = 0.0,
        on_busy: Callable[[RemoteError, float], None] | None = None,
    ) -> None:
        if (prompt is None) == (attach is None):
            raise ValueError("ResumingChat takes a prompt or attach=request_id, one of them")
        if isinstance(attach, str):
            try:
                attach = bytes.fromhex(attach)
            except ValueError:
                raise ValueError(f"attach: {attach!r} is not a request id (32 hex digits, or 16 bytes)") from None
        self._connect = connect
        self._prompt = prompt
        self._attach = attach
        self._scheme, self._model, self._max_tokens, self._params = scheme, model, max_tokens, params
        self.reconnecting = retries if isinstance(retries, Reconnecting) else Reconnecting(retries)
        self.busy = retry_busy_s if isinstance(retry_busy_s, BusyRetries) else BusyRetries(retry_busy_s)
        self._on_busy = on_busy
        self._on_reconnect = on_reconnect
        self._on_started: list[Callable[[bytes], None]] = []
        self._parts: list[str] = []
        self._point: tuple[bytes, list[bytes]] | None = None  # where the next connection resumes
        self._ended_there = False  # the server ended the answer (its ERROR, its shutdown): nothing to resume
        self._gen: AsyncGenerator[str, None] | None = None
        self._failure: BaseException | None = None  # the error the iteration ended with: raised again on a read
        self._failure_tb: TracebackType | None = None
        self._closing = False  # aclose() is under way: nothing may resume
        self._stopped = asyncio.Event()  # set by aclose() from another task: ends a reconnect's wait at once
        self._step: asyncio.Future[tuple[bool, str]] | None = None  # the generator's next step, apart from readers
        self._reader: asyncio.Task[Any] | None = None  # the task waiting on it: one at a time
        self._connecting = False  # a handshake is under way (aclose() cancels it: there is no answer to cancel)
        self.stream: ChatStream | None = None
        """The answer's stream on the current (or last) connection; None until a request went out."""
        self.detached = False
        """Whether the answer lost its connection and may be generating at the server with no client attached:
        from a lost connection (or another error that left it there) until a request for it goes out again.
        False while its stream is open (leaving then cancels it at the server) and once the server ended it."""
        self.gave_up: Literal["retries", "window"] | None = None
        """Why the last error was raised though the path was lost: ``"retries"`` (the connection was lost once
        more than ``retries``), ``"window"`` (no server reached for ``window_s`` after a loss); None otherwise."""

    # -- reading
    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        """The next delta. A cancelled read (``asyncio.wait_for(anext(chat), 5)`` timing out, a relay's keepalive)
        loses nothing: the step it waited on goes on in its own task and the next read gets its delta, as a
        :class:`ChatStream`'s read does. (The generator ran in the reader's task: a timed-out read cancelled the
        answer at the server, and the next read ended the iteration as if the answer were whole.)"""
        if self._failure is not None:  # (its first traceback, not one that grows with every read)
            raise self._failure.with_traceback(self._failure_tb)
        if self._reader is not None:
            raise RuntimeError("a ResumingChat is read by one task at a time, and another task is already waiting "
                               "on it")
        if self._gen is None:
            # (its frame holds the chat weakly: an application that drops a chat its cancelled reader left (no
            # `async with`) frees it at once, and the loop's finalizer closes the generator, cancelling the answer
            # and closing its connection; a strong `self` made a cycle that only the cyclic GC freed, the answer
            # streaming to its end meanwhile, and closed the nested generators in any order)
            self._gen = type(self)._deltas(weakref.proxy(self))
        step = self._step
        if step is None:
            step = self._step = asyncio.ensure_future(self._next(self._gen))
            # (a reader that gave up and left its chat: the step's error is nobody's, not "never retrieved")
            step.add_done_callback(lambda done: None if done.cancelled() else done.exception())
        self._reader = asyncio.current_task()
        try:
            more, delta = await asyncio.shield(step)
        except asyncio.CancelledError:
            if not step.cancelled():
                # this read was cancelled, not the step: it goes on, and what it yields (maybe already: a step
                # done as the read was cancelled) is the next read's
                raise
            if self._step is step:
                self._step = None
            task = asyncio.current_task()
            if self._closing and not (task is not None and task.cancelling()):
                raise StopAsyncIteration from None  # aclose() ended a handshake under way: the loop ends
            raise
        except Exception as exc:  # (every later read raises it too, as a ChatStream's does)
            if self._step is step:
                self._step = None
            self._failure, self._failure_tb = exc, exc.__traceback__
            raise
        finally:
            self._reader = None
        if self._step is step:  # (not aclose()'s, set as this step ended: the next read waits on it)
            self._step = None
        if not more:
            raise StopAsyncIteration
        self._parts.append(delta)
        return delta

    @staticmethod
    async def _next(gen: AsyncGenerator[str, None]) -> tuple[bool, str]:
        """One step of the generator, in a task of its own: (False, "") at its end."""
        try:
            return True, await gen.__anext__()
        except StopAsyncIteration:
            return False, ""

    @staticmethod
    async def _close(gen: AsyncGenerator[str, None]) -> tuple[bool, str]:
        """aclose() of the generator as a step: the reader's next read ends the iteration."""
        await gen.aclose()
        return False, ""

    async def collect(self) -> str:
        """Read the whole answer (what was not read yet) and return all its text."""
        async for _ in self:
            pass
        return self.text

    async def aclose(self) -> None:
        """Stop: an answer still open is cancelled at the server; its connection is closed. From another task than
        the reader (a "stop" button), the reader's loop ends as a :meth:`ChatStream.cancel` ends it, and the
        connection closes as it leaves (an async generator cannot be closed while it runs: ``aclose()`` raised
        "already running" there, and the answer went on).

        While the reader reconnects (the connection lost) no cancellation can reach the server: its loop ends at
        once (a handshake under way is cancelled) and nothing is resumed; the answer stays :attr:`detached` (the
        daemon cancels it after ``limits.orphan_timeout_s``). A stop there was lost: the reader slept out its
        backoff, reconnected and read the rest of the answer."""
        gen = self._gen
        if gen is None:  # (no read yet: a stop before the reader's first read must not ask for the answer after it)
            self._closing = True
            return
        step = self._step
        if step is not None and not step.done():  # a step runs (another task reads, or a read was cancelled)
            self._closing = True  # end its stream, and nothing may resume
            self._stopped.set()
            if self.stream is not None and not self.detached:  # (detached: its connection is gone already)
                await self.stream.cancel()
            if self._connecting:  # a handshake: no answer to cancel yet, and it may last connect's timeout
                step.cancel()
            await asyncio.wait([step])  # it leaves its connection, closing it
            return
        # (a delta a cancelled read left is not read after the stop.) The generator's close awaits the connection's;
        # a reader back from its last delta meanwhile waits on it, and its loop ends (it got "anext(): asynchronous
        # generator is already running" there)
        self._closing = True
        closing = self._step = asyncio.ensure_future(self._close(gen))
        closing.add_done_callback(lambda done: None if done.cancelled() else done.exception())
        await asyncio.shield(closing)

    async def __aenter__(self) -> ResumingChat:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def text(self) -> str:
        """The text read so far (the whole answer once the iteration has ended)."""
        return "".join(self._parts)

    @property
    def stats(self) -> ChatStats | None:
        """The last stream's statistics once the answer has ended (a resumed answer's: no TTFT, no stall ratio)."""
        return self.stream.stats if self.stream is not None else None

    def on_started(self, callback: Callable[[bytes], None]) -> None:
        """``callback(request_id)`` at each STARTED of the answer (:meth:`ChatStream.on_started`, on every
        connection: a resume starts it again)."""
        self._on_started.append(callback)
        if self.stream is not None:
            self.stream.on_started(callback)

    def resume_point(self) -> tuple[bytes, list[bytes]] | None:
        """(request id, tokens held) of the answer, to resume or attach to it elsewhere; None before it has an id."""
        if self.stream is not None:
            point = self.stream.resume_point()
            if point is not None:
                return point
        return self._point

    # -- the loop
    async def _deltas(self) -> AsyncGenerator[str, None]:
        from .quic_io import HandshakeError  # (aioquic: not at this module's import)

        resume: tuple[bytes, list[bytes]] | None = None  # (request id, tokens held) after a lost connection
        while True:
            if self._closing:  # stopped from another task while reconnecting: nothing more is asked for
                return
            stream: ChatStream | None = None
            connected = False
            wait = 0.0  # before the next reconnect attempt, or the next try of a request refused as busy
            try:
                self._connecting = True
                async with self._connect() as conn:
                    self._connecting = False
                    connected = True
                    if self._closing:  # stopped during the handshake: leave (closing it) without resuming
                        return
                    if self._attach is not None:
                        target, held = resume if resume is not None else (self._attach, None)
                        stream = conn.attach(target, scheme=self._scheme, held=held)
                    else:
                        assert self._prompt is not None
                        stream = conn.chat(self._prompt, scheme=self._scheme, model=self._model,
                                           max_tokens=self._max_tokens, params=self._params, resume=resume)
                    for callback in self._on_started:
                        stream.on_started(callback)
                    self.stream = stream
                    self.detached = False
                    try:
                        # in `async with`: leaving early cancels the answer at the server
                        async with stream:
                            async for delta in stream:
                                try:
                                    yield delta
                                except GeneratorExit:  # aclose(): leave, cancelling the answer, whatever comes
                                    with contextlib.suppress(ReferenceError):  # (the chat is gone: see __anext__)
                                        self._closing = True
                                    raise
                    except RemoteError as exc:
                        # an ERROR for this answer, the connection up: ended there; or the daemon's stop, which
                        # ends every answer it holds (in its memory): a resume after its restart is an unknown id
                        self._ended_there = not conn.closed or exc.code == ErrorCode.SHUTTING_DOWN
                        # a new request's ERROR (not a close) before any token came, that says when to ask again
                        # (retry_busy_s): the same request goes again after the wait, on a new connection (a resume
                        # or an attach never: their answer exists, text and all)
                        fresh = not conn.closed and resume is None and self._attach is None and not stream.tokens
                        busy = self.busy.wait_for(exc) if fresh and not self._parts and not self._closing else None
                        if busy is None:
                            raise
                        wait, self._ended_there = busy, False
                        if self._on_busy is not None:
                            self._on_busy(exc, busy)
                    else:
                        return
            except (RemoteError, ConnectionError) as exc:
                self._connecting = False
                # the path went silent mid-answer (nobody closed the connection), or a reconnect found no server
                # (not a TLS refusal): the daemon keeps the answer; continue it where it stopped, on a new connection
                refused = isinstance(exc, HandshakeError) and exc.tls_alert is not None  # TLS said no
                lost = bool(getattr(exc, "path_lost", False)) or (
                    resume is not None and not connected and isinstance(exc, ConnectionError)
                    and not refused and not isinstance(exc, BrokenPipeError))
                point = stream.resume_point() if stream is not None else None
                if point is None and resume is not None:
                    point = resume  # the reconnect itself failed: still where we were
                self._point = point
                self.detached = point is not None and not self._ended_there
                if self._closing and lost:  # the reader was stopped: its loop ends, as a ChatStream's does
                    return
                if resume is not None and connected and getattr(exc, "code", None) == ErrorCode.NOT_FOUND:
                    # (a bare "unknown or expired request id" named an id the application never saw)
                    exc.add_note(f"tokenwire: resuming request {resume[0].hex()} after token {len(resume[1])} "
                                 "(the connection was lost): the server no longer holds the answer (restarted, or "
                                 "it kept it for less time than the outage lasted); the text read is all that came")
                if not lost or point is None:
                    raise
                resume = point
                r = self.reconnecting
                if connected:  # a connection that was up is lost: a retry, its first attempt at once
                    if not r.lost():
                        self.gave_up = "retries"
                        exc.add_note(f"tokenwire: gave up resuming request {point[0].hex()} after token "
                                     f"{len(point[1])}: the connection was lost {r.retries + 1} times "
                                     f"(retries={r.retries})")
                        raise
                else:  # no server reached (the path still dark, the network gone): wait, longer each time
                    pause = r.failed()
                    if pause is None:
                        self.gave_up = "window"
                        exc.add_note(f"tokenwire: gave up resuming request {point[0].hex()}: no server reached in "
                                     f"{r.reconnecting_for():.0f} s and {r.attempts} attempts since the connection "
                                     f"was lost (window_s={r.window_s:g})")
                        raise
                    wait = pause
                if self._on_reconnect is not None:
                    self._on_reconnect(Reconnect(exc, point[0], len(point[1]), r.used, r.retries, r.attempts, wait,
                                                 r.reconnecting_for()))
            # (outside the except: a cancellation here is not chained to the lost path)
            if wait > 0 and not self._stopped.is_set():
                with contextlib.suppress(TimeoutError):  # the backoff, cut short by aclose() from another task
                    async with asyncio.timeout(wait):
                        await self._stopped.wait()


__all__ = ["BUSY_JITTER", "BUSY_MIN_WAIT_S", "RECONNECT_S", "RETRY_CAP_S", "RETRY_FIRST_S", "RETRY_JITTER",
           "BusyRetries", "Reconnect", "Reconnecting", "ResumingChat"]
