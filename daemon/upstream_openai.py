"""An OpenAI-compatible chat-completions server as an upstream (vLLM, llama.cpp server, TGI, ...).

Streams ``POST {base_url}/chat/completions`` with ``stream: true`` and reads the server-sent events:
``data: {chat.completion.chunk}`` lines carrying ``choices[0].delta.content``, ending with
``data: [DONE]``. aiohttp does the HTTP; the SSE line protocol is parsed here (a dozen lines, no library
needed for it).

Every failure reaches the client as a typed error: HTTP errors and error events as ``UPSTREAM_ERROR``
(with the upstream's own message, truncated), no connection within ``connect_timeout_s``, no first token
within ``first_token_timeout_s`` or a silence longer than ``stall_timeout_s`` as ``UPSTREAM_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import aiohttp

from tokenwire.transport.errors import ErrorCode, RequestError
from tokenwire.transport.server import ChatRequest

from .upstreams import Emit

PASSTHROUGH_PARAMS = ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty", "n")


def _upstream_error(name: str, message: str) -> RequestError:
    return RequestError(f"upstream {name!r}: {message[:300]}", code=ErrorCode.UPSTREAM_ERROR)


def _timeout(name: str, message: str) -> RequestError:
    return RequestError(f"upstream {name!r}: {message}", code=ErrorCode.UPSTREAM_TIMEOUT)


class OpenAIUpstream:
    def __init__(
        self,
        name: str,
        *,
        base_url: str,
        api_key_env: str | None = None,
        api_key_file: Path | None = None,
        models: dict[str, str] | None = None,
        connect_timeout_s: float = 10.0,
        first_token_timeout_s: float = 60.0,
        stall_timeout_s: float = 30.0,
        extra_headers: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.url = f"{base_url}/chat/completions"
        self.api_key_env = api_key_env
        self.api_key_file = api_key_file
        self.models = models or {}
        self.connect_timeout_s = connect_timeout_s
        self.first_token_timeout_s = first_token_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.extra_headers = extra_headers or {}
        self._session: aiohttp.ClientSession | None = None

    def _api_key(self) -> str | None:
        """Read at each request, so a rotated key file or environment takes effect without a restart."""
        if self.api_key_file is not None:
            try:
                return self.api_key_file.read_text().strip() or None
            except OSError as exc:
                raise _upstream_error(self.name, f"cannot read the API key file: {exc.strerror}") from None
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or None
        return None

    def _body(self, request: ChatRequest) -> dict[str, Any]:
        model = self.models.get(request.model or "", request.model or "")
        body: dict[str, Any] = {"model": model, "messages": request.messages, "stream": True}
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        for key in PASSTHROUGH_PARAMS:
            if key in request.params:
                body[key] = request.params[key]
        return body

    async def generate(self, request: ChatRequest, emit: Emit) -> str:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s)
            )
        headers = {"Accept": "text/event-stream", **self.extra_headers}
        key = self._api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        try:
            async with asyncio.timeout(self.connect_timeout_s + self.first_token_timeout_s):
                resp = await self._session.post(self.url, json=self._body(request), headers=headers)
        except TimeoutError:
            waited = self.connect_timeout_s + self.first_token_timeout_s
            raise _timeout(self.name, f"no response within {waited:g} s") from None
        except aiohttp.ClientError as exc:
            raise _upstream_error(self.name, f"cannot reach {self.url}: {exc.__class__.__name__}") from exc
        async with resp:
            if resp.status >= 400:
                raise _upstream_error(self.name, f"HTTP {resp.status}: {_error_text(await resp.text())}")
            return await self._read_events(resp, emit)

    async def _read_events(self, resp: aiohttp.ClientResponse, emit: Emit) -> str:
        reason = "stop"
        first = True
        while True:
            limit = self.first_token_timeout_s if first else self.stall_timeout_s
            try:
                async with asyncio.timeout(limit):
                    line = await resp.content.readline()
            except TimeoutError:
                what = "no first token" if first else "the stream stalled"
                raise _timeout(self.name, f"{what} for {limit:g} s") from None
            except aiohttp.ClientError as exc:
                raise _upstream_error(self.name, f"stream broke: {exc.__class__.__name__}") from exc
            if not line:
                raise _upstream_error(self.name, "stream ended without [DONE]")
            text = line.decode("utf-8", errors="replace").strip()
            if not text.startswith("data:"):
                continue  # comments, event:, id:, retry: and blank separators
            data = text[5:].strip()
            if data == "[DONE]":
                return reason
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                raise _upstream_error(self.name, "malformed event (not JSON)") from None
            if isinstance(chunk, dict) and chunk.get("error") is not None:
                raise _upstream_error(self.name, _error_text(json.dumps(chunk)))
            for content, finish in self._choice_zero(chunk):
                if content:
                    first = False
                    emit(content)
                if finish:
                    reason = str(finish)[:32]

    def _choice_zero(self, chunk: Any) -> list[tuple[str | None, Any]]:
        """(content, finish_reason) of the answer's choice (index 0) in one chunk; UPSTREAM_ERROR naming what is
        wrong for JSON of another shape (it was an AttributeError traceback, or a list pushed as text)."""
        def bad(what: str) -> RequestError:
            return _upstream_error(self.name, f"malformed event ({what})")

        if not isinstance(chunk, dict):
            raise bad(f"a JSON {type(chunk).__name__}, not an object")
        choices = chunk.get("choices") or []
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise bad("choices is not a list of objects")
        out = []
        for choice in choices:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict):
                raise bad("delta is not an object")
            content = delta.get("content")
            if content is not None and not isinstance(content, str):
                raise bad(f"delta.content is a {type(content).__name__}, not text")
            out.append((content, choice.get("finish_reason")))
        return out

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _error_text(body: str) -> str:
    """The upstream's error message from an OpenAI-style error body, else the body itself."""
    try:
        data = json.loads(body)
        err = data.get("error", data)
        if isinstance(err, dict):
            return str(err.get("message") or err)[:300]
        return str(err)[:300]
    except (json.JSONDecodeError, AttributeError):
        return body.strip()[:300] or "(empty body)"
