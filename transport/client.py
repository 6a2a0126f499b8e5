"""Client side of the SDK: stream a chatbot answer over QUIC, text in order as it becomes renderable.

Example (runnable against ``python -m tokenwire.transport.server``)::

    import asyncio
    from tokenwire.transport.client import connect

    async def main():
        async with connect("127.0.0.1", 4433, verify=False) as conn:   # verify=False: dev certificate
            stream = conn.chat("Why do chatbots stall on trains?")
            async for delta in stream:
                print(delta, end="", flush=True)
            print()
            print(stream.stats)          # TTFT, stall ratio, token count, digest verified, ...

    asyncio.run(main())

For scripts without asyncio, :func:`chat_sync` makes one request and returns a :class:`ChatResult`::

    from tokenwire.transport.client import chat_sync

    result = chat_sync("127.0.0.1", 4433, "Hello", verify=False)
    print(result.text)
    print(result.stats)

:class:`ResumingChat` reads one answer across lost connections: it reconnects and resumes where the text stopped
(the tokenwire daemon keeps answers across connections), the policy ``tokenwire chat --retries`` uses.

Every answer ends with the server's FINISHED frame (token count and SHA-256 of the text). The client
keeps asking for missing ranges until it holds every token, then checks the digest; a mismatch raises
:class:`DigestMismatch` rather than returning wrong text.

Every error the SDK raises on purpose is a :class:`TokenwireError` (its kinds are exported here, and listed in
:class:`~tokenwire.transport.errors.TokenwireError`'s docstring); after one, ``conn.closed`` says whether the
connection still takes requests.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from aioquic.quic.congestion.base import _factories as _congestion_factories
from aioquic.quic.connection import QuicConnection

from .chat_stats import ChatStats, stats_from_outcome
from .client_session import AnswerComplete, ClientSession
from .errors import ConnectError, ConnectRefused, ConnectTimeout, ErrorCode, RemoteError, TokenwireError
from .frames import CHAT_ALPNS, MAX_STREAM_FRAME, SCHEMES, Request, check_outgoing, encode_frame
from .quic_io import HandshakeError, SessionProtocol, open_client, port_argument
from .resuming import BusyRetries, Reconnect, Reconnecting, ResumingChat
from .session_events import (
    ConnectionEnded,
    RequestFailed,
    RequestFinished,
    RequestStarted,
    SessionEvent,
    TokensRendered,
    closed_error,
    idle_timeout_in_force,
)
from .session_outcome import ChatOutcome
from .tls import CertificateFileError, client_configuration

log = logging.getLogger("tokenwire.client")


class DigestMismatch(TokenwireError):
    """The received text does not match the server's digest: never returned as if it were right."""

    code = ErrorCode.INTERNAL


# how PromptTooLarge names a field other than the prompt
_FIELD_LABELS = {"params": "params", "auth_token": "the auth token (connect(auth_token=))", "model": "model"}


class PromptTooLarge(TokenwireError, ValueError):
    """The request would be larger than any server takes (``MAX_STREAM_FRAME``, 1 MiB): refused before sending.

    The limit is in bytes of the encoded request, so a prompt's size counts in bytes of UTF-8 (an ``é`` is two,
    an emoji four), not in characters. ``size``: the encoded request; ``text_bytes``: its messages' text;
    ``limit``: the bytes a request may take. A daemon may take less (its ``limits.max_request_bytes``): it refuses
    a larger request with LIMIT_EXCEEDED, that request alone.

    ``field`` names the argument that takes the most of the request (``"prompt"``, ``"params"``, ``"model"`` or
    ``"auth_token"``, connect()'s) and ``field_bytes`` its encoded size: the message blames it, not the prompt, when
    a large ``params`` or auth token is what is over (a 3-byte prompt with 2 MB of params was "prompt too large:
    its text is 3 bytes"). The name stays ``PromptTooLarge``, as callers catch it.

    A ``TokenwireError`` with code ``LIMIT_EXCEEDED`` (the size depends on what the end user typed: an application
    catching tokenwire's errors catches this one too), and a ``ValueError`` as before. The connection lives on.
    """

    code = ErrorCode.LIMIT_EXCEEDED

    def __init__(self, size: int, text_bytes: int, limit: int = MAX_STREAM_FRAME, *, field: str = "prompt",
                 field_bytes: int | None = None) -> None:
        tail = (f"over the limit of {limit:,} bytes per request (a daemon's limits.max_request_bytes may be "
                "lower)")
        if field == "prompt":
            message = (f"prompt too large: its text is {text_bytes:,} bytes of UTF-8 and the request {size:,} bytes "
                       f"encoded, {tail}")
        else:
            label = _FIELD_LABELS.get(field, field)
            message = (f"request too large: {label} makes up {field_bytes or 0:,} of its {size:,} bytes encoded (the "
                       f"prompt's text is {text_bytes:,} bytes of UTF-8), {tail}")
        super().__init__(message)
        self.size = size
        self.text_bytes = text_bytes
        self.limit = limit
        self.field = field
        self.field_bytes = text_bytes if field_bytes is None else field_bytes


# the names chat() and attach() take for the REQUEST fields their arguments fill: the frame check names the wire's
# short keys (``request.mt``), which the caller never sees
_CHAT_ARGUMENTS = {"m": "prompt", "s": "scheme", "model": "model", "mt": "max_tokens", "a": "connect(auth_token=)",
                   "rid": "resume", "rf": "resume", "p": "params"}
_ATTACH_ARGUMENTS = {**_CHAT_ARGUMENTS, "rid": "request_id", "rf": "held"}


def _as_arguments(message: str, names: dict[str, str]) -> str:
    """The frame check's message with ``request.<key>`` replaced by the argument that set the field (``max_tokens: 0
    out of range``, not ``request.mt: 0 out of range``), as ``fetch_kv`` does for ``kvfetch.*``."""
    return re.sub(r"\brequest\.(\w+)", lambda m: names.get(m[1], m[0]), message)


def _text_bytes(request: Request) -> int:
    """The UTF-8 bytes of the request's message contents: the prompt's size as the limit counts it."""
    return sum(len(m["content"].encode("utf-8")) for m in request.messages or ()
               if isinstance(m, dict) and isinstance(m.get("content"), str))


def _largest_field(request: Request) -> tuple[str, int]:
    """The argument whose field takes the most bytes of the encoded request, and those bytes: what to blame for a
    request over the limit. Each is measured as the encoding of a request holding that field alone, less an empty
    request's, so a field's framing counts as the wire counts it."""
    empty = len(encode_frame(Request()))
    sizes: dict[str, int] = {}
    for name, only in (("prompt", Request(messages=request.messages)), ("params", Request(params=request.params)),
                       ("auth_token", Request(auth=request.auth)), ("model", Request(model=request.model))):
        try:
            sizes[name] = len(encode_frame(only)) - empty
        except (TypeError, OverflowError, ValueError):  # (unencodable: not what made the request too large)
            sizes[name] = 0
    name = max(sizes, key=lambda k: sizes[k])  # (the first of equals: the prompt)
    return name, sizes[name]


def _check_request(request: Request, names: dict[str, str]) -> None:
    """The frame check of ``request``, its errors in the caller's words: :class:`PromptTooLarge` for a request
    over the size every server refuses (it said "frame of 1048623 bytes exceeds the limit of 1048576"), and
    ``ValueError`` naming the argument at fault for the rest."""
    try:
        check_outgoing(request, "request")
    except ValueError as exc:
        try:
            size = len(encode_frame(request))
        except (TypeError, OverflowError, ValueError):  # unencodable: check_outgoing's message says so
            size = 0
        if size > MAX_STREAM_FRAME:
            field, field_bytes = _largest_field(request)
            raise PromptTooLarge(size, _text_bytes(request), field=field, field_bytes=field_bytes) from None
        raise ValueError(_as_arguments(str(exc), names)) from None


def _argument_error(name: str, problem: str) -> ValueError:
    """A refused argument, in the words of the frame check's errors (``invalid request: max_tokens: ...``)."""
    return ValueError(f"invalid request: {name}: {problem}")


def _messages_argument(prompt: object) -> list[dict[str, str]]:
    """``prompt`` as the request's messages: a str is the user's message; a sequence (or another iterable) of
    mappings, each copied to a dict. What is neither is refused naming ``prompt`` before the frame check met it:
    ``None`` or a number said "'NoneType' object is not iterable", bytes and one message not wrapped in a list
    (its keys iterated) "each message must be a map with exactly 'role' and 'content'"."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Mapping):
        raise _argument_error("prompt", "one message given as a mapping: wrap it in a list ([message]), or pass "
                                        "its text as a str")
    if isinstance(prompt, bytes | bytearray | memoryview):
        raise _argument_error("prompt", f"expected a str or a sequence of {{role, content}} messages, got "
                                        f"{type(prompt).__name__} (decode it to str)")
    if not isinstance(prompt, Iterable):
        raise _argument_error("prompt", f"expected a str or a sequence of {{role, content}} messages, got "
                                        f"{type(prompt).__name__}")
    # (anything else the frame check refuses: "each message must be a map with exactly 'role' and 'content'")
    return [dict(m) if isinstance(m, Mapping) and type(m) is not dict else m for m in prompt]


def _params_argument(params: object) -> dict[str, Any] | None:
    """``params`` as the request's map, its names checked here: msgpack refuses a map with a key that is not a
    str only when it decodes one, and the error said "not a valid msgpack frame: ValueError: int is not allowed
    for map key when strict_map_key=True"."""
    if params is None:
        return None
    if not isinstance(params, Mapping):
        raise _argument_error("params", f"expected a mapping of generation parameters, got {type(params).__name__}")
    for key in params:
        if not isinstance(key, str):
            raise _argument_error("params", f"parameter names must be strings, got {type(key).__name__} {key!r}")
    return dict(params)


def _held_tokens(tokens: object, name: str) -> list[bytes]:
    """Tokens already held (``resume``'s second item, ``attach``'s ``held``) as a list of bytes, each checked: a
    str among them was a bare "sequence item 0: expected a bytes-like object, str found"."""
    if isinstance(tokens, str | bytes | bytearray) or not isinstance(tokens, Iterable):
        raise _argument_error(name, f"the tokens held must be a list of bytes (as stream.resume_point() gives "
                                    f"them), got {type(tokens).__name__}")
    held = list(tokens)
    for i, token in enumerate(held):
        if type(token) is not bytes:
            raise _argument_error(name, f"the tokens held must be bytes (as stream.resume_point() gives them), "
                                        f"token {i} is {type(token).__name__}")
    return held


def _chat_request(prompt: object, *, scheme: str, model: str | None, max_tokens: int | None, params: object,
                  resume: object, auth: str | None) -> tuple[Request, list[bytes]]:
    """The request :meth:`Connection.chat` sends and the tokens held before it (a resume's), every argument
    checked (``ValueError`` naming it, or :class:`PromptTooLarge`): :func:`chat_sync` checks them so before it
    connects."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    messages = _messages_argument(prompt)
    rid: object = None
    prefix: list[bytes] = []
    if resume is not None:
        if not isinstance(resume, tuple | list) or len(resume) != 2:
            raise _argument_error("resume", "expected (request_id, tokens_held), as stream.resume_point() returns "
                                            "them")
        rid, tokens = resume
        if rid is None:
            raise _argument_error("resume", "the request id is None (an answer that had not started yet: send it "
                                            "again without resume)")
        prefix = _held_tokens(tokens, "resume")
    request = Request(
        messages=messages,
        scheme=scheme,
        model=model,
        max_tokens=max_tokens,
        auth=auth,
        resume_id=rid,  # type: ignore[arg-type]  # (checked by the frame check: 16 bytes)
        resume_from=len(prefix) if rid is not None else None,
        params=_params_argument(params),
    )
    _check_request(request, _CHAT_ARGUMENTS)
    return request, prefix


_END = object()

CONCURRENT_READ = ("a ChatStream is read by one task at a time, and another task is already waiting on this answer "
                   "(async for or collect()); read it there, and use stream.text once that task has read it whole")


class _Reraise:
    """Raises one stored error object as often as it is read, its traceback bounded.

    Raised bare again and again (every read of a failed answer, every ``chat()`` on a closed connection), the one
    object gathered the frames of every raise in its traceback: 1,000 reads, 3,000 frames, each holding its
    frame's locals. The first raise starts from an empty traceback (an error every open answer shares may carry
    another reader's); each later one shows its own frames on top of the first raise's, kept for debugging.
    The same object each time: ``except`` clauses and ``is`` see the error the answer ended with.
    """

    __slots__ = ("_first", "_raised")

    def __init__(self) -> None:
        self._raised = False
        self._first: TracebackType | None = None

    def __call__(self, error: BaseException) -> BaseException:
        if not self._raised:
            self._raised = True
            return error.with_traceback(None)
        if self._first is None:
            self._first = error.__traceback__  # the first raise's, as it unwound to where it was caught
        return error.with_traceback(self._first)


def check_congestion(name: str) -> None:
    """Refuse a congestion controller aioquic does not know (it would raise a bare Exception from inside the
    connection). The names are aioquic's registry: ``reno`` and ``cubic``, and tokenwire's ``prague``."""
    names = sorted(_congestion_factories)
    if name not in names:
        raise ValueError(f"unknown congestion controller {name!r}; choose from {', '.join(names)}")


def closed_locally_error() -> TokenwireError:
    """What the answers still in flight, and later requests, get once this side closed its connection."""
    return TokenwireError(
        "connection closed locally (Connection.close() or the end of `async with connect(...)`)",
        code=ErrorCode.CANCELLED)


class ChatStream:
    """One answer: an async iterator of text deltas; ``stats`` and ``text`` are set when it ends.

    One task reads it at a time (``async for`` or :meth:`collect`): a second task that starts reading while the
    first waits for the next delta gets ``RuntimeError`` at once. (Two readers split the deltas between them, and
    the end reached one of them only: ``gather(s.collect(), s.collect())`` hung for ever.) Once the answer has
    ended, every read gets its end again: ``collect()`` returns the text, or raises the error it ended with.

    ``stats.ttft_ms`` and ``stats.stall_ratio`` (and the token delays) are NaN for a resumed or attached answer,
    whose tokens were generated before this request; ``stats.to_dict()`` gives them as None. The stall ratio alone
    is NaN for an answer generated at once (not streamed) and after :meth:`cancel` (partial statistics).
    """

    def __init__(self, conn: Connection, request: Request, prefix: list[bytes]) -> None:
        self._conn = conn
        self._request = request
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: list[str] = []
        self.prefix = prefix
        self.tokens: list[bytes] = list(prefix)
        self.stats: ChatStats | None = None
        self.outcome: ChatOutcome | None = None
        self.request_id: bytes | None = request.resume_id
        self.scheme: str | None = None
        self.stream_id: int | None = None
        self._done = False
        self._failure: BaseException | None = None  # the error the answer ended with: every later read raises it
        self._raise_failure = _Reraise()
        self._reader: asyncio.Task[Any] | None = None  # the task waiting for the next delta: one at a time
        self._on_started: list[Callable[[bytes], None]] = []
        self._answer: ChatOutcome | None = None  # whole and checked, its generation times awaited (_answered)
        if prefix:
            self._parts.append(self._decoder.decode(b"".join(prefix)))

    @property
    def text(self) -> str:
        """The text rendered so far (the whole answer once iteration has ended)."""
        return "".join(self._parts)

    def resume_point(self) -> tuple[bytes, list[bytes]] | None:
        """(request id, tokens held) to resume this answer on a new connection after a failure."""
        if self.request_id is None:
            return None
        return self.request_id, list(self.tokens)

    def on_started(self, callback: Callable[[bytes], None]) -> None:
        """Call ``callback(request_id)`` when the server's STARTED arrives (at once if it already has): the answer
        has its id then, maybe long before its first token (a model that thinks), and a client that dies meanwhile
        can still be re-attached by it. It runs in the connection's event handling: it must be quick, and an
        exception it raises is logged, not raised."""
        self._on_started.append(callback)
        if self.scheme is not None and self.request_id is not None:
            self._call_started(callback, self.request_id)

    @staticmethod
    def _call_started(callback: Callable[[bytes], None], request_id: bytes) -> None:
        try:
            callback(request_id)
        except Exception:  # an application's bug must not break the connection's other answers
            log.exception("a ChatStream.on_started callback raised")

    # events from the protocol
    def _started(self, request_id: bytes, scheme: str) -> None:
        self.request_id = request_id
        self.scheme = scheme
        for callback in list(self._on_started):
            self._call_started(callback, request_id)

    def _tokens(self, toks: list[bytes]) -> None:
        self.tokens.extend(toks)
        text = self._decoder.decode(b"".join(toks))
        if text:
            self._parts.append(text)
            self._queue.put_nowait(text)

    @property
    def answered(self) -> bool:
        """Whether the whole text is here and its digest checked. With a server that sends the generation times
        after FINISHED (``ALPN_GEN_TIMES``) that is a little before the iteration ends: it ends once ``stats`` are
        complete, so that a reader of ``stats`` after ``async for`` gets a stall ratio."""
        return self._answer is not None

    def _answered(self, outcome: ChatOutcome) -> None:
        """Every token and the digest: the text's last delta (or the mismatch) goes out now; the end waits for
        :meth:`_finished`, with the generation times."""
        self._answer = self.outcome = outcome
        tail = self._decoder.decode(b"", final=True)
        if tail:
            self._parts.append(tail)
            self._queue.put_nowait(tail)
        if not outcome.digest_ok:
            self._queue.put_nowait(DigestMismatch("received text does not match the server's digest"))

    def _finished(self, outcome: ChatOutcome) -> None:
        if self._answer is None:
            self._answered(outcome)
        self.outcome = outcome
        self.stats = stats_from_outcome(outcome)
        self._queue.put_nowait(_END)

    def _failed(self, error: TokenwireError) -> None:
        if self._answer is not None:  # only the generation times were missing: statistics without them
            self._finished(self._answer)
            return
        self._queue.put_nowait(error)

    # async iteration
    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        if self._done:
            if self._failure is not None:
                # (it ended with an error: a later reader must not take its text for whole)
                raise self._raise_failure(self._failure)
            raise StopAsyncIteration
        if self._reader is not None:
            raise RuntimeError(CONCURRENT_READ)
        self._reader = asyncio.current_task()
        try:
            item = await self._queue.get()
        finally:
            self._reader = None
        if item is _END:
            self._done = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._done = True
            self._failure = item
            raise self._raise_failure(item)
        return item

    async def collect(self) -> str:
        """Consume the whole answer and return its text (what was not read yet, or all of it). Raises the error
        the answer ended with, as often as it is called; ``RuntimeError`` while another task reads it."""
        async for _ in self:
            pass
        return self.text

    async def cancel(self) -> None:
        """Abandon the answer (the server stops generating it). A no-op once the answer has ended: the text
        received and not read yet can still be read (it was thrown away). A reader waiting in another task
        (``async for``) ends its loop: a "stop" button runs elsewhere than the reader.

        ``stats`` then holds what was measured before the cancel (None if the server had not started the answer):
        ``finish_reason`` ``"cancelled"``, ``tokens`` the tokens rendered, the TTFT; partial, so no stall ratio
        (NaN: the server's generation times come with its end) and ``digest_verified`` False (no digest came).
        ``outcome`` is the partial outcome they were computed from.

        Once the last delta has arrived (:attr:`answered`) the answer is whole, and a cancel (or leaving ``async
        with``, or closing the connection) keeps it so: the answer ends as it would had the generation times not
        come, the deltas not read yet still read, ``stats`` complete but for the stall ratio, and the server
        gets the client's REPORT."""
        proto = self._conn._protocol
        if self.stream_id is not None and self._answer is not None:
            if proto.streams.pop(self.stream_id, None) is not None:
                whole = proto.client_session.cancel(self.stream_id)  # (its REPORT and FIN; no GEN_TIMES wait)
                self._finished(whole if whole is not None else self._answer)
                proto.transmit()
            return
        if self.stream_id is not None and proto.streams.pop(self.stream_id, None) is not None:
            # still open: what is queued is dropped with the rest of the answer
            self._done = True
            partial = proto.client_session.cancel(self.stream_id)
            if partial is not None:  # (the TTFT measured was lost with the rest: stats stayed None)
                self.outcome = partial
                self.stats = stats_from_outcome(partial)
            proto.transmit()
            self._queue.put_nowait(_END)

    aclose = cancel  # for contextlib.aclosing(), as with async generators

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Leaving ``async with conn.chat(...) as stream`` early (a ``break``, an exception) cancels the answer:
        ``async for`` alone cannot tell the server that nobody reads any more."""
        await self.cancel()


class ClientProtocol(SessionProtocol):
    def __init__(self, quic: QuicConnection, stream_handler: Any = None, *, keepalive: bool = False) -> None:
        super().__init__(quic, stream_handler, session_factory=lambda q: ClientSession(q, keepalive=keepalive))
        self.streams: dict[int, ChatStream] = {}
        self.close_error: TokenwireError | None = None
        self.closed_locally = False  # close() ended the connection, not the server, the path or an error
        self.close_error_pending: TokenwireError | None = None  # (what a request gets between close() and its end)
        self.answered = False  # the server has started an answer: it has checked this connection's token

    @property
    def client_session(self) -> ClientSession:
        assert isinstance(self.session, ClientSession)
        return self.session

    def close(self, *args: Any, **kwargs: Any) -> None:
        # aioquic ignores a close once one has begun (the server's, a protocol error's): only this one is ours
        if self._quic._close_event is None and not self.session.closed:
            self.closed_locally = True
            # the application ends its open answers (they fail here with CANCELLED): the server must hear so, in
            # the flight ahead of the close, or it keeps generating them for a client it takes for lost
            if self.client_session.abandon_open():
                self.transmit()
        super().close(*args, **kwargs)

    def handle_session_events(self, events: list[SessionEvent]) -> None:
        for ev in events:
            if isinstance(ev, TokensRendered):
                s = self.streams.get(ev.stream_id)
                if s is not None:
                    s._tokens(ev.tokens)
            elif isinstance(ev, RequestStarted):
                self.answered = True
                s = self.streams.get(ev.stream_id)
                if s is not None:
                    s._started(ev.started.request_id, ev.started.scheme)
            elif isinstance(ev, AnswerComplete):
                s = self.streams.get(ev.stream_id)
                if s is not None:
                    s._answered(ev.result)
            elif isinstance(ev, RequestFinished):
                s = self.streams.pop(ev.stream_id, None)
                if s is not None:
                    s._finished(ev.result)
            elif isinstance(ev, RequestFailed):
                # (not "answered": a request refused before the server read it, too large or of another version,
                # authorized nothing, and the next one without the token was closed "missing or invalid auth token")
                s = self.streams.pop(ev.stream_id, None)
                if s is not None:
                    # after our own close nothing more is received: the failure is the close's, not the server's
                    s._failed(closed_locally_error() if self.closed_locally else ev.error)
            elif isinstance(ev, ConnectionEnded):
                self.close_error = (closed_locally_error() if self.closed_locally else
                                    closed_error(ev.error_code, ev.reason, idle_timeout_in_force(self._quic),
                                                 # (a stream still being read counts: the session may have
                                                 # closed its request, the application not read its end)
                                                 awaiting=ev.requests_open or bool(self.streams)))
                for s in self.streams.values():
                    s._failed(self.close_error)
                self.streams.clear()


class Connection:
    """An open tokenwire connection; make requests with :meth:`chat`."""

    def __init__(self, protocol: ClientProtocol, auth_token: str | None) -> None:
        self._protocol = protocol
        self._auth = auth_token
        self._raise_closed = _Reraise()

    def _check_open(self) -> None:
        """Raise why the connection ended, once it has, or the local-close error once a close has begun here: a new
        request cannot go out (one after a cancelled ``await conn.close()`` was accepted, then failed)."""
        error = self._protocol.close_error
        if error is None and self._protocol.closed_locally:
            error = self._protocol.close_error_pending = (self._protocol.close_error_pending
                                                          or closed_locally_error())
        if error is not None:
            raise self._raise_closed(error)

    @property
    def closed(self) -> bool:
        """The connection has ended (closed by either side, or idle), or this side has begun to close it
        (:meth:`close`, even one cancelled before its end, or the end of ``async with connect(...)``): a new
        request raises why; connect again."""
        return self._protocol.close_error is not None or self._protocol.closed_locally

    @property
    def datagrams(self) -> bool:
        """Whether the server accepts datagrams (else every scheme falls back to ``stream``)."""
        return bool(self._protocol.session.datagrams_ok)

    def chat(
        self,
        prompt: str | Sequence[Mapping[str, object]],
        *,
        scheme: str = "chatterbox",
        model: str | None = None,
        max_tokens: int | None = None,
        params: Mapping[str, Any] | None = None,
        resume: tuple[bytes, Sequence[bytes]] | None = None,
    ) -> ChatStream:
        """Ask for an answer. ``prompt``: the user's text, or the conversation as a sequence of messages (mappings
        with exactly ``role`` and ``content``: dicts, TypedDicts; a list or a tuple). ``resume=(request_id,
        tokens_held)`` continues one after a lost connection (``stream.resume_point()``; :class:`ResumingChat` does
        it by itself); only the tokenwire daemon keeps answers across connections (the SDK's ``serve()`` refuses a
        resume with NOT_FOUND). A resumed answer streams as first asked for: the daemon keeps generating it to the
        original request's ``max_tokens`` and ignores the resume's.

        An argument the protocol refuses, or of the wrong type, raises ``ValueError`` naming it (``max_tokens: 0
        out of range``; a prompt that is neither text nor a sequence of messages, one message not wrapped in a
        list, parameter names that are not strings, held tokens that are not bytes); nothing is sent and the
        connection lives on. A request past the server's limit of answers open at once (its
        ``max_requests_per_connection``, which it gives as QUIC's stream limit) waits until one of them has ended,
        then leaves: its stream's statistics count from then. A prompt over the limit of a request (1 MiB, counted
        in bytes of UTF-8 with some 50 bytes of framing) raises :class:`PromptTooLarge`, a ``ValueError`` too; so
        do ``params`` or an auth token that make the request too large, and the error names which."""
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
        self._check_open()
        request, prefix = _chat_request(prompt, scheme=scheme, model=model, max_tokens=max_tokens, params=params,
                                        resume=resume, auth=self._auth_to_send())
        return self._start(request, prefix)

    def attach(self, request_id: bytes | str, *, scheme: str = "chatterbox",
               held: Sequence[bytes] | None = None) -> ChatStream:
        """Stream an existing answer by id (one an application opened through ingest) from its start, or after
        the tokens ``held`` already (an attach that lost its connection: ``stream.resume_point()[1]``). Needs the
        tokenwire daemon, which keeps answers by id; the SDK's ``serve()`` refuses an attach with NOT_FOUND.

        ``request_id``: its 16 bytes, or the 32 hex digits ingest's ``open`` returns (a str: passing it as
        ``id.encode()`` gave "32 bytes, expected 16..16")."""
        self._check_open()
        if isinstance(request_id, str):
            try:
                request_id = bytes.fromhex(request_id)
            except ValueError:
                raise ValueError(f"request id {request_id!r}: 32 hex digits, as ingest's open returns them, "
                                 "or 16 bytes") from None
        prefix = _held_tokens(held or [], "held")
        request = Request(
            scheme=scheme,
            auth=self._auth_to_send(),
            resume_id=request_id,
            resume_from=len(prefix),
        )
        _check_request(request, _ATTACH_ARGUMENTS)
        return self._start(request, prefix)

    def _auth_to_send(self) -> str | None:
        """The token, on every request until the server has started an answer to one. An ERROR is no proof: a
        request refused before it was read (over ``limits.max_request_bytes``, another version) checked no token
        (docs/protocol.md, Auth tokens).

        The server checks the first request it *receives*. Streams are independent, so when the datagram
        of the first request sent is lost, a later one arrives first; if only the first carried the token,
        the server would close the connection with UNAUTHORIZED.
        """
        return None if self._protocol.answered else self._auth

    def _start(self, request: Request, prefix: list[bytes]) -> ChatStream:
        """Send ``request`` (checked: :func:`_chat_request`, :func:`_check_request`)."""
        stream = ChatStream(self, request, list(prefix))
        sid = self._protocol.client_session.start_request(request, self._protocol.clock(), prefix=list(prefix))
        stream.stream_id = sid
        self._protocol.streams[sid] = stream
        self._protocol.transmit()
        return stream

    async def close(self) -> None:
        """Close the connection and wait until it has ended (QUIC's closing period: 3 PTO, 5 s at most): the answers
        still open end with a local-close error first. Leaving ``async with connect(...)`` closes without that wait."""
        self._protocol.close()
        await self._protocol.wait_closed()


@contextlib.asynccontextmanager
async def connect(
    host: str,
    port: int,
    *,
    server_name: str | None = None,
    cafile: str | Path | None = None,
    cadata: bytes | str | None = None,
    verify: bool = True,
    auth_token: str | None = None,
    certfile: str | Path | None = None,
    keyfile: str | Path | None = None,
    congestion: str = "reno",
    timeout: float = 10.0,
    ecn: bool | None = None,
    idle_timeout: float = 60.0,
    keepalive: bool = False,
) -> AsyncIterator[Connection]:
    """Open a tokenwire connection (QUIC, ALPN ``tokenwire/1+gt`` or ``tokenwire/1``, DATAGRAM enabled).

    ``idle_timeout``: seconds without any packet from the server after which the connection (and every
    answer on it) ends with an error: how long a dead server or a dark path takes to notice. QUIC uses the
    smaller of the two ends' values. A live server answers the client's keepalive pings, so an upstream that
    thinks longer than this before its first token is fine. Between answers nobody sends anything, so a
    connection kept for a chat's next turn ends after ``idle_timeout`` unless ``keepalive`` pings the server
    (every third of the idle timeout) while no answer is open.

    ``certfile``/``keyfile``: a client certificate, for daemons configured with ``server.client_ca``.
    ``ecn``: read the ECN codepoint of every received packet and report the counts in ACK datagrams: the
    feedback a server that marks packets ECT needs to answer congestion marks (CE). The default (None) turns it
    on where the platform can (Linux, BSDs, macOS); ``False`` sends no counts, and a server that validates ECN
    then stops marking this connection's packets.
    ``congestion``: aioquic's ``reno`` or ``cubic``, or ``prague`` (tokenwire's, for ECN marking); any other
    name raises ``ValueError``, as do a port outside 1..65535, ``keyfile`` without ``certfile``, and a
    ``timeout`` or ``idle_timeout`` that is not a positive number of seconds.
    ``cafile``/``cadata``: the CAs to trust, a PEM file or PEM text (bytes or str); one without a certificate
    raises :class:`~tokenwire.transport.tls.CertificateFileError`.

    Errors: :class:`~tokenwire.transport.errors.ConnectTimeout` (no answer within ``timeout``),
    :class:`~.errors.ConnectRefused` (on Linux: the host answered the first packet with ICMP port unreachable,
    nothing listens there; raised at once, not after ``timeout``), :class:`HandshakeError` (the server answered,
    the handshake failed), :class:`~.errors.ConnectError` (the name does not resolve): all ``TokenwireError`` and
    ``ConnectionError``.

    Leaving the ``async with`` block sends CONNECTION_CLOSE and closes the socket before it returns, however the
    loop is driven (``asyncio.run``, or ``run_until_complete`` then ``loop.close()``): no task or socket is left
    behind. QUIC's closing period is not waited out (aioquic answers nothing in it); a server that lost the close
    keeps the session until its idle timeout.
    """
    check_congestion(congestion)
    config = client_configuration(
        server_name=server_name or host,
        cafile=cafile,
        cadata=cadata,
        verify=verify,
        congestion=congestion,
        certfile=certfile,
        keyfile=keyfile,
        idle_timeout=idle_timeout,
    )
    # offer the generation times apart from FINISHED (frames.ALPN_GEN_TIMES); a server without them picks tokenwire/1
    config.alpn_protocols = list(CHAT_ALPNS)

    def make(*args: Any, **kwargs: Any) -> ClientProtocol:
        return ClientProtocol(*args, keepalive=keepalive, **kwargs)

    async with open_client(host, port, configuration=config, ecn=ecn, timeout=timeout,
                           create_protocol=make) as protocol:
        yield Connection(protocol, auth_token)  # type: ignore[arg-type]


@dataclass
class ChatResult:
    """What :func:`chat_sync` returns: the whole answer's ``text`` (its digest verified) and its ``stats``."""

    text: str
    stats: ChatStats


def chat_sync(
    host: str,
    port: int,
    prompt: str | Sequence[Mapping[str, object]],
    *,
    scheme: str = "chatterbox",
    model: str | None = None,
    max_tokens: int | None = None,
    params: Mapping[str, Any] | None = None,
    server_name: str | None = None,
    cafile: str | Path | None = None,
    cadata: bytes | str | None = None,
    verify: bool = True,
    auth_token: str | None = None,
    certfile: str | Path | None = None,
    keyfile: str | Path | None = None,
    congestion: str = "reno",
    timeout: float = 10.0,
    ecn: bool | None = None,
    idle_timeout: float = 60.0,
    keepalive: bool = False,
    resume: tuple[bytes, Sequence[bytes]] | None = None,
    retry_busy_s: float = 0.0,
) -> ChatResult:
    """Blocking helper for scripts: one request on a connection of its own, the whole text and its statistics.

    ``prompt``, ``scheme`` .. ``params`` and ``resume`` are :meth:`Connection.chat`'s, the rest :func:`connect`'s,
    every one of them (named here, so that a type checker sees a misspelt one, and Python's ``TypeError`` names
    ``chat_sync``; a test holds the three signatures together). ``retry_busy_s``: seconds it may spend waiting for a
    busy server (0, the default: none), as :class:`ResumingChat`'s: a request (not a resume) refused with an ERROR
    whose ``RemoteError.retry_after`` is set, before any token came, goes again on a new connection after that
    wait. Raises what they raise; a refused argument of
    ``chat``'s before connecting. It runs its own event loop (``asyncio.run``): called from a coroutine (a running
    loop in this thread: a Jupyter notebook's cell too), it raises ``RuntimeError`` at once and sends nothing; use
    ``async with connect(...)`` and ``await conn.chat(...).collect()`` there, or ``await
    asyncio.to_thread(chat_sync, ...)``.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass  # no loop running in this thread: asyncio.run can make one
    else:
        # before the coroutine exists: asyncio.run refused with its own words ("cannot be called from a running
        # event loop"), which named neither chat_sync nor what to use, and left a "never awaited" RuntimeWarning
        raise RuntimeError(
            "chat_sync() cannot be called from a coroutine or a running event loop (it runs its own, with "
            "asyncio.run); in async code use the async API: `async with connect(...) as conn:` and "
            "`await conn.chat(...).collect()` (in Jupyter, top-level `await` does), or run it in a thread: "
            "`await asyncio.to_thread(chat_sync, ...)`")
    # chat()'s argument checks before connecting (they raised after a handshake); the auth token counts in the size
    _chat_request(prompt, scheme=scheme, model=model, max_tokens=max_tokens, params=params, resume=resume,
                  auth=auth_token)
    busy = BusyRetries(retry_busy_s)  # (its check, before connecting too)

    async def run() -> ChatResult:
        while True:
            async with connect(host, port, server_name=server_name, cafile=cafile, cadata=cadata, verify=verify,
                               auth_token=auth_token, certfile=certfile, keyfile=keyfile, congestion=congestion,
                               timeout=timeout, ecn=ecn, idle_timeout=idle_timeout, keepalive=keepalive) as conn:
                stream = conn.chat(prompt, scheme=scheme, model=model, max_tokens=max_tokens, params=params,
                                   resume=resume)
                try:
                    text = await stream.collect()
                except RemoteError as exc:
                    # an ERROR (not a close) for a new request, before any token came: the same request may go
                    # again, if it says when (no connection is held meanwhile)
                    wait = None if conn.closed or resume is not None or stream.tokens else busy.wait_for(exc)
                    if wait is None:
                        raise
                else:
                    assert stream.stats is not None
                    return ChatResult(text, stream.stats)
            await asyncio.sleep(wait)

    return asyncio.run(run())


async def _main(argv: list[str] | None = None) -> None:  # pragma: no cover - example
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m tokenwire.transport.client",
        description="The SDK's smallest client: ask a server (certificate not verified) and print the answer. "
                    "`tokenwire chat` is the full command-line client.")
    parser.add_argument("prompt", nargs="?", default="Why do chatbots stall on trains?")
    parser.add_argument("--host", default="127.0.0.1", help="the server's address (default: 127.0.0.1)")
    parser.add_argument("--port", type=port_argument, default=4433)
    args = parser.parse_args(argv)
    async with connect(args.host, args.port, verify=False) as conn:
        stream = conn.chat(args.prompt)
        start = time.monotonic()
        async for delta in stream:
            print(delta, end="", flush=True)
        print(f"\n\n{stream.stats} ({time.monotonic() - start:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    """``python -m tokenwire.transport.client``: 0 once the answer is printed; a failure (no server, a refusal)
    is one line on stderr and 1, not a traceback. A reader that goes away (``| head -1``) ends it quietly with 1,
    as ``tokenwire chat``: it was "error: [Errno 32] Broken pipe" (a ``ConnectionError`` too)."""
    import os

    try:
        asyncio.run(_main(argv))
    except BrokenPipeError:
        # stdout now at /dev/null: what its buffer still holds would fail the interpreter's last flush again
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ConnectionError, TokenwireError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["CertificateFileError", "ChatResult", "ChatStats", "ChatStream", "ConnectError", "ConnectRefused",
           "ConnectTimeout", "Connection", "DigestMismatch", "ErrorCode", "HandshakeError", "PromptTooLarge",
           "Reconnect", "Reconnecting", "RemoteError", "ResumingChat", "TokenwireError", "chat_sync", "connect"]
