"""An OpenAI-compatible chat-completions server as an upstream (vLLM, llama.cpp server, TGI, ...).

Streams ``POST {base_url}/chat/completions`` with ``stream: true`` and reads the server-sent events:
``data: {chat.completion.chunk}`` lines carrying ``choices[0].delta.content``, ending with
``data: [DONE]`` (or, from servers that never send it, the end of the body after a ``finish_reason``).
aiohttp does the HTTP; the SSE line protocol is parsed here (a dozen lines, no library needed for it). A server
that ignores ``stream`` and answers one ``application/json`` completion is read as that completion.

Every failure reaches the client as a typed error: HTTP errors and error events as ``UPSTREAM_ERROR``
(with the upstream's own message, truncated, the configured secrets in it redacted), as is a refused or failed
connection; no connection within ``connect_timeout_s``, no first token within ``connect_timeout_s +
first_token_timeout_s`` of the request or no token for ``stall_timeout_s`` as ``UPSTREAM_TIMEOUT``. Both are
absolute deadlines (from the request's start, then from the last token), so keep-alive comments and empty
deltas cannot put them off. A stream that stalls after its ``finish_reason`` ends normally, FINISHED_GRACE_S
later; the reason is made printable (clients print it; a lone surrogate could not be sent). Clients hear the
upstream's name, never its URL; the log gets the URL with its userinfo masked.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import ssl
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.http_exceptions import LineTooLong
from yarl import URL

from tokenwire.transport.errors import ErrorCode, RequestError
from tokenwire.transport.server import ChatRequest

from .cli import printable
from .config import api_key_problem, read_api_key
from .logs import shown_url
from .upstreams import Emit

PASSTHROUGH_PARAMS = ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty", "n")
ERROR_BODY_LIMIT = 64 * 1024  # plenty for an error message; a proxy's endless page is not read to its end
JSON_ANSWER_LIMIT = 16 * 1024 * 1024  # a whole non-streamed completion
REDACTED = "[redacted]"
FINISHED_GRACE_S = 2.0  # after a finish_reason, the wait for [DONE] or the stream's end (a usage chunk may come)
# an extra_headers value shorter than this is no secret (X-Priority: 1), and redacting it would garble messages
SECRET_MIN_CHARS = 8


def _upstream_error(name: str, message: str) -> RequestError:
    return RequestError(f"upstream {name!r}: {message[:300]}", code=ErrorCode.UPSTREAM_ERROR)


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


def _why(exc: aiohttp.ClientError) -> str:
    """Why a connection failed, in words without the address (aiohttp's message names the host and port)."""
    os_error = getattr(exc, "os_error", None)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "its TLS certificate is not trusted"
    if isinstance(os_error, socket.gaierror):
        return "its host name does not resolve"
    if isinstance(os_error, ConnectionRefusedError):
        return "connection refused"
    return exc.__class__.__name__


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
        self._session: aiohttp.ClientSession | None = None
        # the system's trust store, or only ca_file's CAs (read once, at start: a restart picks up a new bundle)
        self._tls: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
        url = URL(self.url)
        secrets = [v for v in self.extra_headers.values() if len(v) >= SECRET_MIN_CHARS]
        if url.password:  # and the Basic credentials aiohttp sends it in (latin-1, as aiohttp encodes them)
            basic = f"{url.user or ''}:{url.password}".encode("latin-1", errors="replace")
            secrets += [url.password, base64.b64encode(basic).decode()]
        self._static_secrets = tuple(secrets)

    def _secrets(self, key: str | None) -> tuple[str, ...]:
        """What upstream text passed on must not contain: this request's API key and the other credentials; the
        longest first, so a secret inside another is not left half redacted."""
        return tuple(sorted({*self._static_secrets, *([key] if key else [])}, key=len, reverse=True))

    def _detail(self, exc: BaseException, secrets: tuple[str, ...]) -> UpstreamDetail:
        detail = UpstreamDetail(f"{self.shown_url}: {_scrub(str(exc), secrets)}")
        detail.__cause__ = exc
        return detail

    def _api_key(self) -> str | None:
        """Read at each request, so a rotated key file or environment takes effect without a restart. A key that
        cannot go in a header (a line break inside it) is a typed error: aiohttp's was a traceback per request."""
        if self.api_key_file is not None:
            try:
                key = read_api_key(self.api_key_file)
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
            return None
        return key or None

    def _model(self, request: ChatRequest) -> str | None:
        """The upstream's model name: ``models`` maps the client's; a client that names none gets ``model``, else
        the field is left out (``"model": ""`` made strict servers answer 404)."""
        name = request.model or ""
        if name in self.models:
            return self.models[name] or None
        return name or self.model

    def _body(self, request: ChatRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"messages": request.messages, "stream": True}
        model = self._model(request)
        if model:
            body["model"] = model
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        for key in PASSTHROUGH_PARAMS:
            if key in request.params:
                body[key] = request.params[key]
        return body

    async def generate(self, request: ChatRequest, emit: Emit) -> str:
        if self._session is None:
            # limit=0: aiohttp's default pool of 100 connections made answer 101+ wait for a free one, and that
            # wait counted against the first-token deadline; the daemon's own limits bound concurrency
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ssl=self._tls),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s),
            )
        headers = {"Accept": "text/event-stream", **self.extra_headers}
        key = self._api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        secrets = self._secrets(key)
        body = self._body(request)
        # One deadline, from the request's start, for the connection, the headers and the first token: the
        # headers used to get connect + first-token time and the first token that much again.
        waited = self.connect_timeout_s + self.first_token_timeout_s
        first_deadline = asyncio.get_running_loop().time() + waited
        try:
            async with asyncio.timeout_at(first_deadline):
                # never redirected: aiohttp's default followed a 307 to any origin with the API key, the
                # extra_headers (Azure's api-key) and the prompt; a 3xx is an error below
                resp = await self._session.post(self.url, json=body, headers=headers, allow_redirects=False)
        except aiohttp.ServerTimeoutError as exc:  # sock_connect, TLS handshake included; a TimeoutError as well
            message = f"cannot connect within {self.connect_timeout_s:g} s"
            raise _timeout(self.name, message) from self._detail(exc, secrets)
        except TimeoutError:
            raise _timeout(self.name, f"no response within {waited:g} s") from None
        except aiohttp.ClientError as exc:
            raise _upstream_error(self.name, f"cannot reach the server: {_why(exc)}") from self._detail(exc, secrets)
        except Exception as exc:  # aiohttp refusing the request (a ValueError): a log line, not a traceback each time
            message = f"the request could not be sent ({exc.__class__.__name__})"
            raise _upstream_error(self.name, message) from self._detail(exc, secrets)
        async with resp:
            if resp.status >= 400:
                raise await self._http_error(resp, secrets)
            if 300 <= resp.status < 400:
                raise self._redirect_error(resp, secrets)
            if resp.content_type == "application/json" or resp.content_type.endswith("+json"):
                return await self._read_json(resp, emit, secrets)
            return await self._read_events(resp, emit, first_deadline, secrets)

    async def _http_error(self, resp: aiohttp.ClientResponse, secrets: tuple[str, ...]) -> RequestError:
        """UPSTREAM_ERROR with the status and the upstream's message. The body is read with a time and size bound
        and decoded leniently: ``resp.text()`` hung on a body that never came and raised on non-UTF-8 or cut-short
        ones, so the client got a vague error and the log a traceback."""
        try:
            async with asyncio.timeout(self.stall_timeout_s):
                raw = await _read_body(resp, ERROR_BODY_LIMIT)
        except TimeoutError:
            detail = f"(no error body within {self.stall_timeout_s:g} s)"
        except aiohttp.ClientError as exc:
            detail = f"(error body cut short: {exc.__class__.__name__})"
        else:
            detail = _error_text(_decode(raw[:ERROR_BODY_LIMIT], resp.charset), secrets)
        return _upstream_error(self.name, f"HTTP {resp.status}: {detail}")

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
        try:
            async with asyncio.timeout(self.stall_timeout_s):
                raw = await _read_body(resp, JSON_ANSWER_LIMIT)
        except TimeoutError:
            raise _timeout(self.name, f"the JSON answer stalled for {self.stall_timeout_s:g} s") from None
        except aiohttp.ClientError as exc:
            raise _upstream_error(self.name, f"answer broke: {exc.__class__.__name__}") from exc
        if len(raw) > JSON_ANSWER_LIMIT:
            raise _upstream_error(self.name, f"JSON answer larger than {JSON_ANSWER_LIMIT} bytes")
        doc = self._document(_decode(raw, resp.charset), "answer", secrets)
        picked = self._choice_zero(doc, "message")
        if not picked:  # not a completion at all: an empty success would hide it
            raise _upstream_error(self.name, "malformed answer (no choice 0)")
        reason = "stop"
        for content, finish, _ in picked:
            if content:
                emit(content)
            if finish:
                reason = printable(str(finish))[:32]
        return reason

    async def _read_events(
        self, resp: aiohttp.ClientResponse, emit: Emit, first_deadline: float, secrets: tuple[str, ...]
    ) -> str:
        loop = asyncio.get_running_loop()
        deadline = first_deadline  # then the last token's time + stall_timeout_s; nothing else moves it
        started = False  # a token came (content, or reasoning the client is not sent)
        reason: str | None = None  # the last finish_reason
        event = ""  # the current event's type (``event:`` line); a blank line ends the event
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    line = await resp.content.readline()
            except TimeoutError:
                if reason is not None:  # the whole answer came, then neither [DONE] nor the end: it is done
                    resp.close()  # not back to the pool: that stream may still send
                    return reason
                if started:
                    raise _timeout(self.name, f"the stream stalled for {self.stall_timeout_s:g} s") from None
                waited = self.connect_timeout_s + self.first_token_timeout_s
                raise _timeout(self.name, f"no first token within {waited:g} s") from None
            except aiohttp.ClientError as exc:
                raise _upstream_error(self.name, f"stream broke: {exc.__class__.__name__}") from exc
            except (LineTooLong, ValueError):  # over aiohttp's line limit (ValueError before aiohttp 3.10)
                raise _upstream_error(self.name, "event line too long") from None
            if not line:
                if reason is not None:  # TGI (before mid-2024), ik_llama.cpp, llama-box end without [DONE]
                    return reason
                raise _upstream_error(self.name, "stream ended without [DONE]")
            text = line.decode("utf-8", errors="replace").strip()
            if not text:
                event = ""
                continue
            field, _, value = text.partition(":")
            value = value.strip()
            if field == "event":
                event = value
                continue
            if field != "data":
                continue  # comments (":" lines), id:, retry:
            if event == "error":
                raise _upstream_error(self.name, _error_text(value, secrets) if value else "error event")
            if value == "[DONE]":
                return reason or "stop"
            chunk = self._document(value, "event", secrets)
            for content, finish, progress in self._choice_zero(chunk):
                if content:
                    emit(content)
                if progress:
                    started = True
                    deadline = loop.time() + self.stall_timeout_s
                if finish:
                    reason = printable(str(finish))[:32]
                    # the answer is whole: [DONE] or the end is due at once, not a stall timeout later
                    deadline = min(deadline, loop.time() + FINISHED_GRACE_S)

    def _document(self, text: str, what: str, secrets: tuple[str, ...]) -> Any:
        """A JSON answer or event; UPSTREAM_ERROR for one that is not JSON or that carries the upstream's error."""
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):  # JSONDecodeError, an integer over 4300 digits, deep nesting
            raise _upstream_error(self.name, f"malformed {what} (not JSON)") from None
        if _is_error(doc):
            raise _upstream_error(self.name, _error_text(text, secrets))
        return doc

    def _choice_zero(self, chunk: Any, key: str = "delta") -> list[tuple[str | None, Any, bool]]:
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
            progress = bool(content or delta.get("reasoning_content") or delta.get("reasoning"))
            out.append((content, choice.get("finish_reason"), progress))
        return out

    def refusal(self, model: str | None, params: dict[str, Any]) -> str | None:
        """None: the upstream itself judges the parameters (its error reaches the client as UPSTREAM_ERROR)."""
        return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _read_body(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """At most ``limit`` + 1 bytes of the body (one more than allowed tells the caller it was too long)."""
    buf = bytearray()
    while len(buf) <= limit:
        data = await resp.content.read(limit + 1 - len(buf))
        if not data:
            break
        buf += data
    return bytes(buf)


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


def _decode(raw: bytes, charset: str | None) -> str:
    """The body as text: its declared charset, else UTF-8; bad bytes replaced (an HTML error page in Latin-1
    raised UnicodeDecodeError)."""
    try:
        return raw.decode(charset or "utf-8", errors="replace")
    except LookupError:  # an unknown charset name
        return raw.decode("utf-8", errors="replace")


def _is_error(doc: Any) -> bool:
    """An OpenAI-style ``{"error": ...}`` or vLLM's ``{"object": "error", "message": ...}``."""
    return isinstance(doc, dict) and (doc.get("error") is not None or doc.get("object") == "error")


def _error_text(body: str, secrets: tuple[str, ...]) -> str:
    """The upstream's error message from an OpenAI-style error body, else the body itself; ``secrets`` redacted
    before it is cut short (a cut through a key would leave its start)."""
    try:
        data = json.loads(body)
        err = data.get("error", data)
        text = str(err.get("message") or err) if isinstance(err, dict) else str(err)
    except (ValueError, RecursionError, AttributeError):  # not JSON (a huge integer, deep nesting) or no object
        return _scrub(body.strip(), secrets)[:300] or "(empty body)"
    return _scrub(text, secrets)[:300]
