"""An OpenAI-compatible chat-completions server as an upstream (vLLM, llama.cpp server, TGI, ...).

Streams ``POST {base_url}/chat/completions`` with ``stream: true`` and reads the server-sent events:
``data: {chat.completion.chunk}`` lines carrying ``choices[0].delta.content``, ending with
``data: [DONE]`` (or, from servers that never send it, the end of the body after a ``finish_reason``).
aiohttp does the HTTP; the SSE line protocol is parsed here (:class:`_EventStream`, the spec's line rules). A
server that ignores ``stream`` and answers one ``application/json`` completion is read as that completion; an
answer of another Content-Type is read as events only when it starts like them (a proxy's HTML login page is an
error quoting its start; an HTML page, there or in an HTTP error, is quoted by its title and text). A choice's
first ``finish_reason`` ends its answer: content after it is dropped.

Every failure reaches the client as a typed error: HTTP errors and error events as ``UPSTREAM_ERROR``
(with the upstream's own message, truncated, the configured secrets in it redacted), as is a refused or failed
connection; no connection within ``connect_timeout_s``, no first token within ``connect_timeout_s +
first_token_timeout_s`` of the request or no token for ``stall_timeout_s`` as ``UPSTREAM_TIMEOUT``. Both are
absolute deadlines (from the request's start, then from the last token), so keep-alive comments and empty
deltas cannot put them off. A stream that stalls after its ``finish_reason`` ends normally, FINISHED_GRACE_S
later; the reason is made printable (clients print it; a lone surrogate could not be sent). Clients hear the
upstream's name, never its URL; the log gets the URL with its userinfo masked (HTTP errors too). Every text made
here is UTF-8 encodable: an emoji's UTF-16 halves sent in two events are joined, other lone surrogates become U+FFFD.

Connections are kept for KEEPALIVE_S between requests, under the idle timeouts servers use (uvicorn, so vLLM: 5 s),
and a request on a kept connection that the server closed before a byte of its answer came is sent once more, on a
new connection (:func:`_stale`). ``ca_file`` is read again at SIGHUP (:meth:`OpenAIUpstream.reload_ca`); the API
key file at each request, only when it changed, without blocking the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import errno
import json
import logging
import math
import os
import re
import socket
import ssl
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from tokenwire.transport.errors import RETRY_AFTER_MARK, ErrorCode, RequestError, retry_after_note
from tokenwire.transport.server import ChatRequest

from .cli import printable, well_formed
from .logs import shown_url
from .upstream_config import FileProblem, api_key_absence, api_key_problem, read_api_key, upstream_ca_context
from .upstreams import Emit

log = logging.getLogger("tokenwire.daemon")

PASSTHROUGH_PARAMS = ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty", "n")
ERROR_BODY_LIMIT = 64 * 1024  # plenty for an error message; a proxy's endless page is not read to its end
JSON_ANSWER_LIMIT = 16 * 1024 * 1024  # a whole non-streamed completion
REDACTED = "[redacted]"
FINISHED_GRACE_S = 2.0  # after a finish_reason, the wait for [DONE] or the stream's end (a usage chunk may come)
# an extra_headers value shorter than this is no secret (X-Priority: 1), and redacting it would garble messages
SECRET_MIN_CHARS = 8
# an upstream's answer that means "busy, try again later", not "broken": its error always ends with the
# Retry-After suffix (RemoteError.retry_after), DEFAULT_RETRY_AFTER_S when the upstream names no time (openai-python
# waits 0.5 s, doubling, then)
BUSY_STATUSES = (429, 503)
DEFAULT_RETRY_AFTER_S = 1
MESSAGE_LIMIT = 300  # characters of an error's text after "upstream 'name': " (docs/protocol.md)
# one SSE line, and one event's data: the bound aiohttp's readline had (twice its 256 KiB read buffer), now ours
EVENT_LINE_LIMIT = 512 * 1024
BODY_START_LIMIT = 200  # characters of an answer of an unexpected Content-Type quoted in its error
SSE_FIELDS = (b"data:", b"event:", b":", b"id:", b"retry:")  # how an event stream's first line starts
SSE_SNIFF_BYTES = 6  # enough of a body's start (past blanks) to tell whether it is one
BOM = b"\xef\xbb\xbf"
# how long a connection is kept for the next request: under the idle timeouts of common servers (uvicorn's, so
# vLLM's, 5 s; aiohttp kept it 15 s), so that a request rarely lands as the server closes it (see _stale)
KEEPALIVE_S = 4.0
# a key file whose last change is younger than this is read again at the next request, whatever its stat says:
# timestamps are coarse (a tick of milliseconds, seconds on some file systems), so a same-size rewrite within one
# tick of the last read would look unchanged
KEY_FILE_SETTLED_S = 2.0
_LINE_END = re.compile(rb"\r\n|\r|\n")


def _upstream_error(name: str, message: str, notes: str = "") -> RequestError:
    """UPSTREAM_ERROR ``upstream 'name': message`` then this daemon's own ``notes``. The message quotes the
    upstream's words, so a Retry-After suffix in them is defused (``;`` becomes ``,``): a 500 whose text ended
    "; Retry-After: 999999 s" set the client's ``RemoteError.retry_after``, which only the daemon's own note may."""
    text = well_formed(message).replace(RETRY_AFTER_MARK, ", Retry-After:")  # (words may hold lone surrogates)
    return RequestError(f"upstream {name!r}: {(text + notes)[:MESSAGE_LIMIT]}", code=ErrorCode.UPSTREAM_ERROR)


def _timeout(name: str, message: str) -> RequestError:
    return RequestError(f"upstream {name!r}: {message}", code=ErrorCode.UPSTREAM_TIMEOUT)


class UpstreamDetail(Exception):
    """The cause chained to a client's error: what the daemon logs after it (the URL, userinfo masked, and the
    HTTP client's own words), which the client is not sent."""


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    """``text`` with every secret in it redacted: a proxy's "invalid credentials: Bearer sk-..." echoed the
    daemon's own key to every client and into the log."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


def _why(exc: aiohttp.ClientError, https: bool = False) -> str:
    """Why a connection failed, in words without the address (aiohttp's message names the host and port).
    ``https``: the base_url's scheme; an https one pointing at a plain-HTTP server was only "ClientConnectorError"."""
    os_error = getattr(exc, "os_error", None)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "its TLS certificate is not trusted"
    if isinstance(os_error, socket.gaierror):
        return "its host name does not resolve"
    if isinstance(os_error, ConnectionRefusedError):
        return "connection refused"
    plain = "does it speak plain HTTP? base_url says https://"
    if https and isinstance(exc, aiohttp.ClientConnectorSSLError):  # (a plain-HTTP answer: WRONG_VERSION_NUMBER)
        reason = getattr(os_error, "reason", None) or os_error.__class__.__name__
        return f"the TLS handshake failed ({reason}): {plain}"
    handshake_cut = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, ssl.SSLEOFError)
    if https and isinstance(exc, aiohttp.ClientConnectorError) and isinstance(os_error, handshake_cut):
        return f"the connection was closed during the TLS handshake: {plain}"
    return exc.__class__.__name__


# what a write to a connection the server has closed raises (aiohttp's words for it, before any response)
_WRITE_FAILED = "Can not write request body"
_CLOSED_ERRNOS = (errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED)


def _closed_early(exc: BaseException) -> bool:
    """Whether the server closed the connection before its answer's headers were complete (after the connection
    was made): "cannot reach the server" blamed a server that had been reached."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return True
    if isinstance(exc, aiohttp.ClientConnectorError) or not isinstance(exc, aiohttp.ClientOSError):
        return False
    return exc.errno in _CLOSED_ERRNOS or str(exc.strerror or "").startswith(_WRITE_FAILED)


def _stale(exc: BaseException, reused: bool) -> bool:
    """Whether a request that failed with ``exc`` met a kept connection the server closed while it was idle, so
    that it may be sent again on a new one: only on a connection ``reused`` from the pool, and only where no byte
    of an answer can have come (the request may have been processed, but a chat completion no byte of which came
    back was not answered, and asking again is safe). So: the server's end of the connection before a byte came
    (aiohttp's parser hands over a partial response: then no retry), or the request could not be written (it
    never reached the server whole). A reset while waiting for the answer is not retried: bytes of an answer may
    have come before it, and it does not say."""
    if not reused:
        return False
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return isinstance(exc.message, str)  # none of a response parsed (else its RawResponseMessage)
    return (isinstance(exc, aiohttp.ClientOSError) and not isinstance(exc, aiohttp.ClientConnectorError)
            and str(exc.strerror or "").startswith(_WRITE_FAILED))


class _Attempt:
    """One request's trace context: whether its connection was taken from the pool (a kept one)."""

    def __init__(self) -> None:
        self.reused = False


async def _note_reuse(session: aiohttp.ClientSession, ctx: Any, params: Any) -> None:
    """aiohttp's on_connection_reuseconn: the request goes on a kept connection."""
    if isinstance(ctx.trace_request_ctx, _Attempt):
        ctx.trace_request_ctx.reused = True


def _size(n: int) -> str:
    return f"{n >> 10} KiB" if n >= 1024 and n % 1024 == 0 else f"{n} bytes"


class _Surrogates:
    """Joins an emoji's UTF-16 halves sent in two events (``"\\ud83d"``, then ``"\\ude00 end"``: valid JSON, from
    proxies that slice text by UTF-16 unit): a high surrogate ending one piece waits for the next piece, and what
    is passed on is well-formed (:func:`well_formed`)."""

    def __init__(self) -> None:
        self._held = ""

    def feed(self, text: str) -> str:
        text, self._held = self._held + text, ""
        if text and "\ud800" <= text[-1] <= "\udbff":
            text, self._held = text[:-1], text[-1]
        return well_formed(text)

    def flush(self) -> str:
        """At the answer's end: a high surrogate still held (no low one came) as U+FFFD, else nothing."""
        held, self._held = self._held, ""
        return "\ufffd" if held else ""


class _TooLong(Exception):
    """An SSE line, or one event's data, over :data:`EVENT_LINE_LIMIT` (``args[0]``: what, in words, with the
    limit: "event line too long" alone did not say which bound, nor that it is the daemon's)."""


class _EventStream:
    """The body's server-sent events, by the SSE rules (WHATWG HTML, "Interpreting an event stream"): a line ends
    in CRLF, LF or CR; an event's ``data:`` lines are joined with "\n"; a blank line dispatches it. aiohttp's
    readline knew LF only: a CR-only stream was one endless line, and an event whose JSON came over two data
    lines was refused line by line as not JSON. Each line and each event's data is bounded by ``limit``."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._line = bytearray()  # the line not ended yet
        self._after_cr = False  # the last chunk ended in CR: an LF starting the next one is that line's end
        self._started = False  # (a UTF-8 byte-order mark at the stream's start is dropped)
        self._head = b""  # the first bytes while they may still be a byte-order mark's start
        self._type = ""
        self._data: list[str] = []
        self._size = 0

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        """The events ``chunk`` completes: (event type, data)."""
        if not chunk:
            return []
        if not self._started:  # (a byte-order mark split over the first reads is still one)
            chunk, self._head = self._head + chunk, b""
            if len(chunk) < len(BOM) and BOM.startswith(chunk):
                self._head = chunk
                return []
            self._started = True
            chunk = chunk.removeprefix(BOM)
        pos = 1 if self._after_cr and chunk.startswith(b"\n") else 0
        self._after_cr = False
        events: list[tuple[str, str]] = []
        while (end := _LINE_END.search(chunk, pos)) is not None:
            if len(self._line) + end.start() - pos > self._limit:
                raise self._too_long("event line")
            line = bytes(self._line) + chunk[pos:end.start()]
            self._line.clear()
            self._after_cr = end.group() == b"\r" and end.end() == len(chunk)
            pos = end.end()
            events += self._take(line)
        self._line += chunk[pos:]
        if len(self._line) > self._limit:  # checked as it grows: a line that never ends is not buffered whole
            raise self._too_long("event line")
        return events

    def _too_long(self, what: str) -> _TooLong:
        data = " of data" if what == "event" else ""
        return _TooLong(f"{what} too long: over {_size(self._limit)}{data}, the daemon's limit for one server-sent "
                        f"{what}")

    def end(self) -> list[tuple[str, str]]:
        """The body ended: its last line and event count without a line end or blank line after them (a server
        that ends with a bare ``data: [DONE]`` was read so)."""
        head, self._head, self._started = self._head, b"", True
        events = self.feed(head.removeprefix(BOM)) if head else []
        line, self._line = bytes(self._line), bytearray()
        return events + (self._take(line) if line else []) + self._take(b"")

    def _take(self, raw: bytes) -> list[tuple[str, str]]:
        text = raw.decode("utf-8", errors="replace")
        if not text.strip():  # a blank line (of spaces too, as it was read before)
            data, kind = self._data, self._type
            self._data, self._type, self._size = [], "", 0
            return [(kind, "\n".join(data))] if data else []
        if text.startswith(":"):  # a comment: keep-alives
            return []
        field, _, value = text.partition(":")
        value = value.removeprefix(" ")
        field = field.strip()
        if field == "event":
            self._type = value.strip()
        elif field == "data":
            events = []
            if len(self._data) == 1 and _whole_document(self._data[0]):
                # a server that ends its events with one line feed, not a blank line (outside the SSE rules, read
                # before them: its events were joined into one text that is not JSON, and none came before the end).
                # Its events are one line each: only an event's first line is parsed for this, once (every line
                # parsed with all before it made a 256-KB event of 16,000 lines take 9.6 s of the event loop)
                events.append((self._type, self._data[0]))
                self._data, self._type, self._size = [], "", 0
            self._size += len(value) + 1
            if self._size > self._limit:
                raise self._too_long("event")
            self._data.append(value)
            return events
        return []  # id:, retry:, and lines of no field the stream defines


def _whole_document(data: str) -> bool:
    """Whether an event's first data line is a whole JSON document (or ``[DONE]``): another ``data:`` line after it
    starts a new event."""
    text = data.strip()
    if text == "[DONE]":
        return True
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


class OpenAIUpstream:
    def __init__(
        self,
        name: str,
        *,
        base_url: str,
        api_key_env: str | None = None,
        api_key_file: Path | None = None,
        models: dict[str, str] | None = None,
        model: str | None = None,
        connect_timeout_s: float = 10.0,
        first_token_timeout_s: float = 60.0,
        stall_timeout_s: float = 30.0,
        extra_headers: dict[str, str] | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.name = name
        self.url = f"{base_url}/chat/completions"
        self.shown_url = shown_url(self.url)
        self.api_key_env = api_key_env
        self.api_key_file = api_key_file
        self.models = models or {}
        self.model = model or None
        self.connect_timeout_s = connect_timeout_s
        self.first_token_timeout_s = first_token_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.extra_headers = extra_headers or {}
        self.ca_file = ca_file
        self._session: aiohttp.ClientSession | None = None  # kept connections (KEEPALIVE_S)
        self._fresh_session: aiohttp.ClientSession | None = None  # a new connection per request: the retry's
        # the system's trust store, or only ca_file's CAs (read again at SIGHUP: reload_ca)
        self._tls: ssl.SSLContext | bool = True
        self._ca_data = b""
        if ca_file is not None:
            self._tls, self._ca_data = upstream_ca_context(ca_file)
        # the key file's stat when its key was read, and that key: a stat per request, not an open and a read
        self._key_cache: tuple[tuple[int, ...], str] | None = None
        url = URL(self.url)
        secrets = [v for v in self.extra_headers.values() if len(v) >= SECRET_MIN_CHARS]
        if url.password:  # and the Basic credentials aiohttp sends it in (latin-1, as aiohttp encodes them)
            basic = f"{url.user or ''}:{url.password}".encode("latin-1", errors="replace")
            secrets += [url.password, base64.b64encode(basic).decode()]
        self._static_secrets = tuple(secrets)
        # said once at start (the daemon builds its upstreams then): an empty key source sent no Authorization
        # header without a word, and the user saw only the server's 401
        absent = api_key_absence(api_key_env, api_key_file)
        if absent is not None:
            source = "api_key_file" if api_key_file is not None else "api_key_env"
            log.warning("upstream %r: %s (%s): its requests carry no API key, and its server may answer 401",
                        name, printable(absent), source)

    def _secrets(self, key: str | None) -> tuple[str, ...]:
        """What upstream text passed on must not contain: this request's API key and the other credentials; the
        longest first, so a secret inside another is not left half redacted."""
        return tuple(sorted({*self._static_secrets, *([key] if key else [])}, key=len, reverse=True))

    def _detail(self, exc: BaseException, secrets: tuple[str, ...]) -> UpstreamDetail:
        detail = UpstreamDetail(f"{self.shown_url}: {_scrub(str(exc), secrets)}")
        detail.__cause__ = exc
        return detail

    def reload_ca(self) -> bool:
        """SIGHUP: take up a ``ca_file`` renewed in place (at the running path: a changed path needs a restart),
        as the server's certificate and client CA are. The bundle was read once, at start, and a renewed one never
        again: the upstream's renewed certificate was "not trusted" until a restart. One that cannot be used is
        logged and the running one kept: False then. Connections already made stay as they were verified."""
        if self.ca_file is None:
            return True
        try:
            context, data = upstream_ca_context(self.ca_file)
        except (OSError, ValueError) as exc:  # FileProblem and "no PEM certificate" are ValueErrors
            if isinstance(exc, FileProblem):
                why = f"{self.ca_file} {exc}"
            elif isinstance(exc, OSError):
                why = f"{self.ca_file}: {exc.strerror or exc.__class__.__name__}"
            else:
                why = f"{self.ca_file}: {exc}"
            log.warning("reload: upstream %r: ca_file %s; the CA bundle read before is kept", self.name, why)
            return False
        if data != self._ca_data:
            self._tls, self._ca_data = context, data
            log.info("reload: upstream %r: ca_file %s changed: its new connections trust the CAs in it now",
                     self.name, self.ca_file)
        return True

    def _read_key_file(self, path: Path) -> str:
        """:func:`read_api_key`, again only when the file changed (its stat: device, inode, size, times; a key
        rotated by renaming a new file into place, or rewritten in place, is read at the next request). A file
        changed within KEY_FILE_SETTLED_S is not cached (a same-size rewrite within a timestamp's tick)."""
        st = os.stat(path)  # (does not block on a FIFO; read_api_key refuses one)
        signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if self._key_cache is not None and self._key_cache[0] == signature:
            return self._key_cache[1]
        self._key_cache = None
        key = read_api_key(path)
        if time.time() - max(st.st_mtime, st.st_ctime) >= KEY_FILE_SETTLED_S:
            self._key_cache = (signature, key)
        return key

    def _api_key(self) -> tuple[str | None, str | None]:
        """(the key, or None; why a configured source yielded none, for a 401's message). Read at each request
        (when it changed), so a rotated key file or environment takes effect without a restart. A key that cannot
        go in a header (a line break inside it) is a typed error: aiohttp's was a traceback per request. The file
        is read without blocking the event loop: a FIFO in its place froze the daemon (read_regular_file)."""
        if self.api_key_file is not None:
            try:
                key = self._read_key_file(self.api_key_file)
            except OSError as exc:
                raise _upstream_error(self.name, f"cannot read the API key file: {exc.strerror}") from None
            except UnicodeDecodeError:
                raise _upstream_error(self.name, "the API key file is not UTF-8 text") from None
            except ValueError as exc:
                raise _upstream_error(self.name, f"the API key file {exc}") from None
        elif self.api_key_env:
            key = os.environ.get(self.api_key_env, "")
            problem = api_key_problem(key)
            if problem is not None:
                raise _upstream_error(self.name, f"the API key in ${self.api_key_env} {problem}")
        else:
            return None, None
        if key.strip():
            return key, None
        return None, api_key_absence(self.api_key_env, self.api_key_file, show_path=False)

    def _model(self, request: ChatRequest) -> str | None:
        """The upstream's model name: ``models`` maps the client's; a client that names none gets ``model``, else
        the field is left out (``"model": ""`` made strict servers answer 404)."""
        name = request.model or ""
        if name in self.models:
            return self.models[name] or None
        return name or self.model

    def _body(self, request: ChatRequest) -> bytes:
        """The request body, as strict JSON. A non-finite parameter is refused (BAD_REQUEST), never sent: json's
        default (aiohttp's ``json=``) wrote ``"temperature": NaN``, which no JSON parser of an upstream accepts."""
        body: dict[str, Any] = {"messages": request.messages, "stream": True}
        model = self._model(request)
        if model:
            body["model"] = model
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        for key in PASSTHROUGH_PARAMS:
            if key in request.params:
                body[key] = request.params[key]
        try:
            return json.dumps(body, allow_nan=False).encode()
        except ValueError:
            bad = [k for k, v in body.items() if isinstance(v, float) and not math.isfinite(v)]
            raise RequestError(f"upstream {self.name!r}: parameter {', '.join(bad) or '?'} is not a finite number "
                               "(JSON has no NaN or infinity)", code=ErrorCode.BAD_REQUEST) from None

    def _pooled(self) -> aiohttp.ClientSession:
        if self._session is None:
            trace = aiohttp.TraceConfig()  # tells _stale whether a request went on a kept connection
            trace.on_connection_reuseconn.append(_note_reuse)
            # limit=0: aiohttp's default pool of 100 connections made answer 101+ wait for a free one, and that
            # wait counted against the first-token deadline; the daemon's own limits bound concurrency
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s),
                trace_configs=[trace],
            )
        return self._session

    def _fresh(self) -> aiohttp.ClientSession:
        """Where a request that met a stale kept connection goes again: a new connection (another kept one, as
        idle as the first, may be as stale)."""
        if self._fresh_session is None:
            self._fresh_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, force_close=True),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s),
            )
        return self._fresh_session

    async def _post(self, session: aiohttp.ClientSession, body: bytes, headers: dict[str, str],
                    attempt: _Attempt) -> aiohttp.ClientResponse:
        # never redirected: aiohttp's default followed a 307 to any origin with the API key, the extra_headers
        # (Azure's api-key) and the prompt; a 3xx is an error. The TLS context per request: reload_ca replaces it
        return await session.post(self.url, data=body, headers=headers, allow_redirects=False, ssl=self._tls,
                                  trace_request_ctx=attempt)

    def _failure(self, exc: aiohttp.ClientError, new_connection: bool, retried: bool) -> str:
        """A connection's failure in words: the server closing it ("cannot reach the server" said otherwise of a
        server that had been reached), else why it could not be reached."""
        https = URL(self.url).scheme == "https"
        if not _closed_early(exc):
            return f"cannot reach the server: {_why(exc, https)}"
        partial = isinstance(exc, aiohttp.ServerDisconnectedError) and not isinstance(exc.message, str)
        text = "the connection was closed by the server " + (
            "before its answer's headers were complete" if partial else "before it answered")
        if retried:
            return text + " (on a new connection too)"
        if new_connection and not https:  # a TLS server hangs up on plain HTTP
            return text + " (if it serves HTTPS, base_url must say https://)"
        return text

    async def generate(self, request: ChatRequest, emit: Emit) -> str:
        headers = {"Accept": "text/event-stream", **self.extra_headers}
        if not any(name.lower() == "content-type" for name in headers):  # the body goes as bytes: see _body
            headers["Content-Type"] = "application/json"
        key, no_key = self._api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        secrets = self._secrets(key)
        body = self._body(request)
        # One deadline, from the request's start, for the connection, the headers and the first token: the
        # headers used to get connect + first-token time and the first token that much again.
        waited = self.connect_timeout_s + self.first_token_timeout_s
        first_deadline = asyncio.get_running_loop().time() + waited
        attempt, retried = _Attempt(), False
        try:
            async with asyncio.timeout_at(first_deadline):
                try:
                    resp = await self._post(self._pooled(), body, headers, attempt)
                except aiohttp.ClientError as exc:
                    # a request that lands as the server closes an idle kept connection: 10 in 150 failed "cannot
                    # reach the server" with requests spaced at the server's keep-alive timeout
                    if not _stale(exc, attempt.reused):
                        raise
                    log.debug("upstream %r: a kept connection was closed by the server (%s); sending the request "
                              "again on a new one", self.name, exc.__class__.__name__)
                    retried = True
                    resp = await self._post(self._fresh(), body, headers, _Attempt())
        except aiohttp.ServerTimeoutError as exc:  # sock_connect, TLS handshake included; a TimeoutError as well
            message = f"cannot connect within {self.connect_timeout_s:g} s"
            raise _timeout(self.name, message) from self._detail(exc, secrets)
        except TimeoutError:
            raise _timeout(self.name, f"no response within {waited:g} s") from None
        except aiohttp.ClientError as exc:
            message = self._failure(exc, retried or not attempt.reused, retried)
            raise _upstream_error(self.name, message) from self._detail(exc, secrets)
        except Exception as exc:  # aiohttp refusing the request (a ValueError): a log line, not a traceback each time
            message = f"the request could not be sent ({exc.__class__.__name__})"
            raise _upstream_error(self.name, message) from self._detail(exc, secrets)
        async with resp:
            try:
                return await self._answer(resp, emit, first_deadline, secrets, no_key)
            except RequestError as exc:
                if isinstance(exc.__cause__, UpstreamDetail):
                    raise
                # the log's line for an HTTP error, a broken or malformed answer named no URL (a connection's
                # failure did): the URL (userinfo masked, no query: base_url has none) and the status
                cause = exc.__cause__
                said = f"{self.shown_url}: HTTP {resp.status}" + (f": {cause}" if cause is not None else "")
                detail = UpstreamDetail(_scrub(said, secrets))
                detail.__cause__ = cause
                raise exc from detail

    async def _answer(self, resp: aiohttp.ClientResponse, emit: Emit, first_deadline: float,
                      secrets: tuple[str, ...], no_key: str | None) -> str:
        """The answer of a response, by its status and Content-Type."""
        if resp.status >= 400:
            raise await self._http_error(resp, secrets, no_key)
        if 300 <= resp.status < 400:
            raise self._redirect_error(resp, secrets)
        if resp.content_type == "application/json" or resp.content_type.endswith("+json"):
            return await self._read_json(resp, emit, secrets)
        if resp.content_type == "text/event-stream":
            return await self._read_events(resp, emit, first_deadline, secrets)
        head = await self._events_start(resp, first_deadline, secrets)
        return await self._read_events(resp, emit, first_deadline, secrets, head)

    async def _http_error(
        self, resp: aiohttp.ClientResponse, secrets: tuple[str, ...], no_key: str | None = None
    ) -> RequestError:
        """UPSTREAM_ERROR with the status and the upstream's message. The body is read with a time and size bound
        and decoded leniently: ``resp.text()`` hung on a body that never came and raised on non-UTF-8 or cut-short
        ones, so the client got a vague error and the log a traceback. Notes follow the message, kept whole
        through the cut (the message is shortened): the Retry-After of a 429 or 503 (it was dropped), and for a
        401 or 403 that no key was sent because ``no_key`` (an unset variable, an empty file)."""
        try:
            async with asyncio.timeout(self.stall_timeout_s):
                raw = await _read_body(resp, ERROR_BODY_LIMIT)
        except TimeoutError:
            detail = f"(no error body within {self.stall_timeout_s:g} s)"
        except aiohttp.ClientError as exc:
            detail = f"(error body cut short: {exc.__class__.__name__})"
        else:
            body = _decode(raw[:ERROR_BODY_LIMIT], resp.charset)
            if _is_page(resp, body):  # an HTML error page (a proxy's, a plain web server's): its title and words
                what = f"{resp.content_type} page" if "Content-Type" in resp.headers else "HTML page (no Content-Type)"
                words = _page_words(body, secrets)  # ("title": text, or the text alone)
                return self._error_with_notes(resp, f"HTTP {resp.status}, {what}", words, no_key,
                                              sep=" " if words.startswith('"') else ": ")
            detail = _error_text(body, secrets)
        return self._error_with_notes(resp, f"HTTP {resp.status}", detail, no_key)

    def _error_with_notes(self, resp: aiohttp.ClientResponse, head: str, detail: str, no_key: str | None,
                          sep: str = ": ") -> RequestError:
        """UPSTREAM_ERROR ``head: detail; notes`` (``sep`` between head and detail), the detail shortened so that
        the notes survive the cut."""
        notes = []
        seconds, shown = _retry_after(resp.headers.get("Retry-After"))
        # the suffix RemoteError.retry_after reads (docs/protocol.md, Errors): a 429 or 503, or a server error that
        # names a time (a proxy's 502); never a 4xx the client caused (a 400 or 401 sent again fails again)
        if resp.status in BUSY_STATUSES or (resp.status >= 500 and seconds is not None):
            if seconds is not None:
                notes.append(retry_after_note(seconds))
            else:  # busy all the same: a client is told it may retry, and when
                why = "the upstream named none" if shown is None else f"the upstream's {shown!r} is not a time"
                notes.append(retry_after_note(DEFAULT_RETRY_AFTER_S, why))
        elif seconds is not None or shown is not None:  # not busy: said, but never as the suffix (no client resends
            notes.append(f"its Retry-After header: {shown if seconds is None else seconds}")  # a 400 or a 401)
        if no_key is not None and resp.status in (401, 403):
            notes.append(f"no API key was sent: {no_key}")
        head, tail = f"{head}{sep}", "".join(f"; {note}" for note in notes)
        return _upstream_error(self.name, head + detail[:max(0, MESSAGE_LIMIT - len(head) - len(tail))], tail)

    async def _events_start(
        self, resp: aiohttp.ClientResponse, first_deadline: float, secrets: tuple[str, ...]
    ) -> bytes:
        """The start of an answer that is neither an event stream nor JSON by its Content-Type (or has none):
        returned, to be read as events, when it starts like them (a server that mislabels its stream), else
        UPSTREAM_ERROR naming the type and quoting the start. A proxy's HTML login page (status 200) was read as
        events: "stream ended without [DONE]", or no first token for the whole deadline if it never ended."""
        head = b""
        try:
            async with asyncio.timeout_at(first_deadline):
                while len(head.removeprefix(BOM).lstrip()) < SSE_SNIFF_BYTES:
                    data = await resp.content.readany()
                    if not data:
                        break
                    head += data
        except TimeoutError:
            if not head.removeprefix(BOM).strip():
                waited = self.connect_timeout_s + self.first_token_timeout_s
                raise _timeout(self.name, f"no first token within {waited:g} s") from None
        except aiohttp.ClientError as exc:
            raise _upstream_error(self.name, _broke(exc, 0, secrets)) from exc
        if head.removeprefix(BOM).lstrip().startswith(SSE_FIELDS):
            return head
        try:  # what else came already, never waited for (a page that never ends is quoted as far as it came)
            head += resp.content.read_nowait(ERROR_BODY_LIMIT)
        except aiohttp.ClientError:
            pass
        shown = printable(resp.headers.get("Content-Type", "(none)"))[:100]
        text = _decode(head[:ERROR_BODY_LIMIT], resp.charset)
        start = _page_words(text, secrets) if _is_page(resp, text) else _body_start(head, resp.charset, secrets)
        raise _upstream_error(self.name, f"unexpected Content-Type {shown}: {start}")

    def _redirect_error(self, resp: aiohttp.ClientResponse, secrets: tuple[str, ...]) -> RequestError:
        """UPSTREAM_ERROR naming the status and where it points. Redirects are not followed: the request carries
        the API key, ``extra_headers`` secrets and the prompt, which a redirect would hand to another origin; an
        operator who means the new place sets ``base_url`` to it."""
        location = resp.headers.get("Location")
        if location is None:
            return _upstream_error(self.name, f"HTTP {resp.status} without a Location (redirects are not followed)")
        # the Location last: a long one is what the 300-character cut shortens
        return _upstream_error(self.name, f"HTTP {resp.status}: a redirect, not followed (set base_url to where it "
                                          f"points): {_shown_location(self.url, location, secrets)}")

    async def _read_json(self, resp: aiohttp.ClientResponse, emit: Emit, secrets: tuple[str, ...]) -> str:
        """A server that ignores ``stream`` answers one JSON document: the whole completion (emitted as one piece)
        or an error (even with status 200). Both were dropped as "stream ended without [DONE]"."""
        try:  # each read within stall_timeout_s of the last, as a stream's tokens (the whole body was bounded so)
            raw = await _read_body(resp, JSON_ANSWER_LIMIT, idle_s=self.stall_timeout_s)
        except TimeoutError:
            raise _timeout(self.name, f"the JSON answer stalled for {self.stall_timeout_s:g} s") from None
        except aiohttp.ClientError as exc:
            raise _upstream_error(self.name, _broke(exc, None, secrets)) from exc
        if len(raw) > JSON_ANSWER_LIMIT:
            raise _upstream_error(self.name, f"JSON answer larger than {JSON_ANSWER_LIMIT} bytes")
        doc = self._document(_decode(raw, resp.charset), "answer", secrets)
        picked = self._choice_zero(doc, "message")
        if not picked:  # not a completion at all: an empty success would hide it
            raise _upstream_error(self.name, "malformed answer (no choice 0)")
        reason: str | None = None
        for content, finish, _ in picked:
            if reason is not None:  # the finish is final
                break
            if content:
                emit(well_formed(content))
            if finish:
                reason = printable(finish)[:32]
        return reason or "stop"

    async def _read_events(
        self, resp: aiohttp.ClientResponse, emit: Emit, first_deadline: float, secrets: tuple[str, ...],
        head: bytes = b"",
    ) -> str:
        """The answer from the event stream (``head``: its start, already read). Content after the choice's
        finish_reason is dropped: the finish is final (it was appended to the whole answer)."""
        loop = asyncio.get_running_loop()
        deadline = first_deadline  # then the last token's time + stall_timeout_s; nothing else moves it
        started = False  # a token came (content, or reasoning the client is not sent)
        tokens = 0  # the events that carried one (a server's event is a token, or a few)
        reason: str | None = None  # the finish_reason: the first one ends the answer
        answered = False  # an event carried the answer's choice (index 0): a stream of none answered nothing
        stream = _EventStream(EVENT_LINE_LIMIT)
        surrogates = _Surrogates()

        def done(reason: str) -> str:
            if not answered:  # ({"id": 1} then [DONE] was an empty answer, exit 0; a JSON answer so is refused)
                raise _upstream_error(self.name, "malformed stream (no event carried choice 0)")
            tail = surrogates.flush()
            if tail:
                emit(tail)
            return reason

        while True:
            if head:
                data, head = head, b""
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        data = await resp.content.readany()
                except TimeoutError:
                    if reason is not None:  # the whole answer came, then neither [DONE] nor the end: it is done
                        resp.close()  # not back to the pool: that stream may still send
                        return done(reason)
                    if started:
                        raise _timeout(self.name, f"the stream stalled for {self.stall_timeout_s:g} s") from None
                    waited = self.connect_timeout_s + self.first_token_timeout_s
                    raise _timeout(self.name, f"no first token within {waited:g} s") from None
                except aiohttp.ClientError as exc:
                    raise _upstream_error(self.name, _broke(exc, tokens, secrets)) from exc
            try:
                events = stream.feed(data) if data else stream.end()
            except _TooLong as exc:
                raise _upstream_error(self.name, str(exc)) from None
            for event, value in events:
                value = value.strip()
                if event == "error":
                    raise _upstream_error(self.name, _error_text(value, secrets) if value else "error event")
                if value == "[DONE]":
                    return done(reason or "stop")
                # without the line feeds that joined its data lines: in JSON each is white space (dropped, the same
                # document) or, where a server cut its JSON inside a string or a number ("c" / "hoices"), an error
                chunk = self._document(value.replace("\n", ""), "event", secrets)
                for content, finish, progress in self._choice_zero(chunk):
                    answered = True
                    if reason is not None:
                        continue  # after the finish: neither content nor a token that puts off the end
                    if content:
                        piece = surrogates.feed(content)
                        if piece:
                            emit(piece)
                    if progress:
                        started = True
                        tokens += 1
                        deadline = loop.time() + self.stall_timeout_s
                    if finish:
                        reason = printable(finish)[:32]
                        # the answer is whole: [DONE] or the end is due at once, not a stall timeout later
                        deadline = min(deadline, loop.time() + FINISHED_GRACE_S)
            if not data:
                if reason is not None:  # TGI (before mid-2024), ik_llama.cpp, llama-box end without [DONE]
                    return done(reason)
                raise _upstream_error(self.name, "stream ended without [DONE]")

    def _document(self, text: str, what: str, secrets: tuple[str, ...]) -> Any:
        """A JSON answer or event; UPSTREAM_ERROR for one that is not JSON or that carries the upstream's error."""
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):  # JSONDecodeError, an integer over 4300 digits, deep nesting
            raise _upstream_error(self.name, f"malformed {what} (not JSON)") from None
        if _is_error(doc):
            raise _upstream_error(self.name, _error_text(text, secrets))
        return doc

    def _choice_zero(self, chunk: Any, key: str = "delta") -> list[tuple[str | None, str | None, bool]]:
        """(content, finish_reason, whether a token came) of the answer's choice (index 0) in one chunk (``key``
        "delta") or a whole completion ("message"); a reasoning delta is a token though it is not content, so a
        long think is no stall. UPSTREAM_ERROR naming what is wrong for JSON of another shape (it was an
        AttributeError traceback, or a list pushed as text)."""
        def bad(what: str) -> RequestError:
            return _upstream_error(self.name, f"malformed {'event' if key == 'delta' else 'answer'} ({what})")

        if not isinstance(chunk, dict):
            raise bad(f"a JSON {type(chunk).__name__}, not an object")
        choices = chunk.get("choices") or []
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise bad("choices is not a list of objects")
        out = []
        for choice in choices:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get(key) or {}
            if not isinstance(delta, dict):
                raise bad(f"{key} is not an object")
            content = delta.get("content")
            if content is not None and not isinstance(content, str):
                raise bad(f"{key}.content is a {type(content).__name__}, not text")
            finish = choice.get("finish_reason")
            if finish is not None and not isinstance(finish, str):  # an object became its Python repr
                raise bad(f"finish_reason is a {type(finish).__name__}, not text")
            progress = bool(content or delta.get("reasoning_content") or delta.get("reasoning"))
            out.append((content, finish, progress))
        return out

    def refusal(self, model: str | None, params: dict[str, Any]) -> str | None:
        """None: the upstream itself judges the parameters (its error reaches the client as UPSTREAM_ERROR)."""
        return None

    async def close(self) -> None:
        for session in (self._session, self._fresh_session):
            if session is not None:
                await session.close()
        self._session = self._fresh_session = None


async def _read_body(resp: aiohttp.ClientResponse, limit: int, idle_s: float | None = None) -> bytes:
    """At most ``limit`` + 1 bytes of the body (one more than allowed tells the caller it was too long).
    ``idle_s``: TimeoutError when a read brings nothing for that long (a body still coming is not cut)."""
    buf = bytearray()
    while len(buf) <= limit:
        async with asyncio.timeout(idle_s):
            data = await resp.content.read(limit + 1 - len(buf))
        if not data:
            break
        buf += data
    return bytes(buf)


BROKE_DETAIL_LIMIT = 120  # characters of aiohttp's own words quoted when a stream breaks


def _broke(exc: aiohttp.ClientError, tokens: int | None, secrets: tuple[str, ...]) -> str:
    """A stream that broke mid-answer (``tokens``: the events with a token read before; None: a whole JSON
    answer's body), in words for a person: "stream broke: ClientPayloadError" said neither what happened (the
    upstream closed the connection, or died, before the answer's end) nor how far the answer had come. The
    exception's type stays in, for code and searches, with the start of its message."""
    said = _scrub(printable(" ".join(str(exc).split())), secrets)
    if len(said) > BROKE_DETAIL_LIMIT:
        said = said[:BROKE_DETAIL_LIMIT] + "..."
    why = f"{exc.__class__.__name__}: {said}" if said else exc.__class__.__name__
    if tokens is None:
        return f"the upstream closed its JSON answer before its end ({why})"
    when = f"after {tokens} token{'' if tokens == 1 else 's'}" if tokens else "before its first token"
    return f"the upstream closed the answer mid-stream {when} ({why})"


def _shown_location(url: str, location: str, secrets: tuple[str, ...]) -> str:
    """A redirect's target for messages, resolved against the request's ``url``: printable, userinfo masked, the
    query and fragment left out (a signed URL's token lives there) and the configured secrets redacted."""
    try:
        target = URL(url).join(URL(location))
        shown = str(target.with_query(None).with_fragment(None))
        if target.raw_query_string or target.raw_fragment:
            shown += "?..."
    except (ValueError, TypeError):  # a Location yarl cannot parse: shown as it came, cut short
        shown = location[:200]
    return printable(_scrub(shown_url(shown), secrets))


def _retry_after(value: str | None) -> tuple[int | None, str | None]:
    """A Retry-After header: its seconds (an HTTP date as the seconds until it), or None and the value quoted
    (printable, cut short) when it is neither; (None, None) without one."""
    if value is None or not value.strip():
        return None, None
    value = value.strip()
    if value.isascii() and value.isdigit() and len(value) <= 12:
        return int(value), None
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0, round(when.timestamp() - time.time())), None
    except (TypeError, ValueError, OverflowError):  # not a date either
        return None, printable(value[:40])


def _body_start(raw: bytes, charset: str | None, secrets: tuple[str, ...]) -> str:
    """The start of a body for an error: the secrets redacted, its runs of white space as one space (an HTML
    page's line breaks, escaped, would fill it), printable, then cut to BODY_START_LIMIT characters."""
    text = printable(" ".join(_scrub(_decode(raw[:ERROR_BODY_LIMIT], charset), secrets).split()))
    if len(text) > BODY_START_LIMIT:
        return text[:BODY_START_LIMIT] + "..."
    return text or "(empty body)"


class _PageText(HTMLParser):
    """An HTML page's ``<title>`` and the rest of its text, scripts and styles left out."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title: list[str] = []
        self.text: list[str] = []
        self._in: list[str] = []  # the open title, script and style elements

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("title", "script", "style"):
            self._in.append(tag)
        self.text.append(" ")  # <p>a</p><p>b</p> is "a b", not "ab"

    def handle_endtag(self, tag: str) -> None:
        if tag in self._in:
            del self._in[len(self._in) - 1 - self._in[::-1].index(tag):]
        self.text.append(" ")

    def handle_data(self, data: str) -> None:
        if not self._in:
            self.text.append(data)
        elif self._in[-1] == "title":
            self.title.append(data)


def _is_page(resp: aiohttp.ClientResponse, text: str) -> bool:
    """Whether a body is an HTML page: by its Content-Type (unless it is JSON: its message is read as JSON), or
    (none, or another one) by its start."""
    start = text.lstrip("\ufeff \t\r\n")[:14].lower()
    if resp.content_type in ("text/html", "application/xhtml+xml"):
        return not start.startswith(("{", "["))
    return start.startswith(("<!doctype html", "<html"))


def _page_words(text: str, secrets: tuple[str, ...]) -> str:
    """An HTML page for an error: its title quoted, then its text (the title's repeat at its start left out: a
    heading usually says it again), runs of white space as one space, printable, cut to BODY_START_LIMIT
    characters. Python's http.server answered a POST with a 501 page that reached users as its raw markup, every
    line break an escaped ``\\n``, cut before its message."""
    page = _PageText()
    page.feed(_scrub(text, secrets))
    page.close()
    title = " ".join("".join(page.title).split())
    words = " ".join("".join(page.text).split())
    if title and words.startswith(title):
        words = words[len(title):].lstrip(" :-")
    shown = (f'"{title}"' + (f": {words}" if words else "")) if title else words
    shown = printable(well_formed(shown))
    if len(shown) > BODY_START_LIMIT:
        return shown[:BODY_START_LIMIT] + "..."
    return shown or "(no text)"


def _decode(raw: bytes, charset: str | None) -> str:
    """The body as text: its declared charset, else UTF-8; bad bytes replaced (an HTML error page in Latin-1
    raised UnicodeDecodeError)."""
    try:
        return raw.decode(charset or "utf-8", errors="replace")
    except (LookupError, ValueError):  # an unknown charset name; a codec that takes no errors="replace" (idna,
        return raw.decode("utf-8", errors="replace")  # punycode, undefined: a UnicodeError out of generate(), no
        # upstream error); a name with a NUL byte


def _is_error(doc: Any) -> bool:
    """An OpenAI-style ``{"error": ...}`` or vLLM's ``{"object": "error", "message": ...}``."""
    return isinstance(doc, dict) and (doc.get("error") is not None or doc.get("object") == "error")


def _error_text(body: str, secrets: tuple[str, ...]) -> str:
    """The upstream's error message from an error body (:func:`_error_words`), else the body itself; ``secrets``
    redacted before it is cut short (a cut through a key would leave its start), and made printable as a finish
    reason is: clients print it, and its NULs, line feeds and escape sequences reached them raw (a lone surrogate
    stays the replacement character that :func:`_upstream_error` made of it)."""
    try:
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError("no object")
        text = _error_words(data.get("error", data))
    except (ValueError, RecursionError):  # not JSON (a huge integer, deep nesting) or no object
        return printable(well_formed(_scrub(body.strip(), secrets)))[:300] or "(empty body)"
    return printable(well_formed(_scrub(text, secrets)))[:300]


def _error_words(err: Any) -> str:
    """An error document's words: OpenAI's ``error.message``, vLLM's ``message``, FastAPI's ``detail`` (a text, or
    its validation errors as ``loc: msg``), else the JSON itself. ``{"detail": "Not Found"}`` was shown as the
    Python repr ``{'detail': 'Not Found'}``."""
    if isinstance(err, dict):
        for key in ("message", "detail", "msg"):
            if err.get(key):
                return _error_words(err[key])
    if isinstance(err, str):
        return err
    if isinstance(err, list) and err and all(isinstance(e, dict) and e.get("msg") for e in err):
        return "; ".join(_validation_error(e) for e in err)
    return json.dumps(err, ensure_ascii=False)  # RecursionError: the caller's fallback, the body


def _validation_error(item: dict[str, Any]) -> str:
    """One of FastAPI's validation errors (``{"loc": ["body", "messages"], "msg": "Field required"}``)."""
    loc = item.get("loc")
    where = ".".join(str(part) for part in loc) if isinstance(loc, list) else ""
    text = _error_words(item["msg"])
    return f"{where}: {text}" if where else text
