"""Where tokens come from: the upstreams a route can name.

An upstream implements ``generate(request, emit)``: it calls ``emit(text)`` for every piece of the answer
as it arrives and returns the finish reason. Failures are typed: ``RequestError`` with
``UPSTREAM_ERROR`` or ``UPSTREAM_TIMEOUT`` (the message says what went wrong without leaking internals).

* ``demo``: the built-in source (no LLM needed);
* ``openai``: any OpenAI-compatible chat-completions server, read as server-sent events
  (:mod:`tokenwire.daemon.upstream_openai`);
* ``ingest``: answers pushed by a local application over the Unix-socket API
  (:mod:`tokenwire.daemon.ingest`); clients attach to them by request id.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

from tokenwire.transport.errors import ErrorCode, RequestError
from tokenwire.transport.server import ChatRequest

from .config import Config
from .demo_upstream import answer_tokens, rate_problem, schedule
from .upstream_config import UpstreamConfig

Emit = Callable[[str], None]


class Upstream(Protocol):
    name: str

    def refusal(self, model: str | None, params: dict[str, Any]) -> str | None:
        """Why a request cannot be served at all (BAD_REQUEST), checked before STARTED: raised from
        ``generate``, the refusal came after STARTED, under a request id the client could resume for nothing."""
        ...

    async def generate(self, request: ChatRequest, emit: Emit) -> str: ...

    async def close(self) -> None: ...


class DemoUpstream:
    """The recorded-style demo answer at a realistic rate. A request may ask for ``params.rate`` and ``params.seed``.

    The answer is the demo text once, ending "stop"; a request's larger ``max_tokens`` gets it repeated to that
    length, ending "length". ``max_tokens`` here is the upstream's own limit on an answer: one it cuts ends
    "length" too. The default answer was the text repeated to this limit (2000 tokens, 71 s at 30 tokens/s), cut
    mid-sentence, and its end read "stop"."""

    def __init__(self, name: str, rate: float = 30.0, first_token_ms: float = 150.0, max_tokens: int = 2000) -> None:
        self.name = name
        self.rate = rate
        self.first_token_s = first_token_ms / 1000.0
        self.max_tokens = max_tokens

    def refusal(self, model: str | None, params: dict[str, Any]) -> str | None:
        problem = rate_problem(params.get("rate", self.rate), "params.rate")
        # (bool is an int to Python; JSON's true is no seed) seed=abc and seed=1.5 ran silently as seed 0
        if problem is None and "seed" in params and type(params["seed"]) is not int:
            problem = "params.seed must be an integer (the seed of the demo upstream's token timing)"
        return problem

    async def generate(self, request: ChatRequest, emit: Emit) -> str:
        problem = self.refusal(request.model, request.params)
        if problem is not None:  # (the daemon checked before STARTED; a direct caller may not have)
            raise RequestError(problem, code=ErrorCode.BAD_REQUEST)
        rate = request.params.get("rate", self.rate)
        seed = request.params.get("seed", 0)
        whole = len(answer_tokens())  # the text once: the answer when no max_tokens is asked for
        n = min(self.max_tokens, request.max_tokens or whole)
        tokens = answer_tokens(n)
        offsets = schedule(len(tokens), rate=float(rate), seed=seed, first_token_s=self.first_token_s)
        start = time.monotonic()
        for tok, at in zip(tokens, offsets, strict=True):
            delay = start + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            emit(tok)
        # "stop" only for the text's own end (a max_tokens of exactly its length included): a limit (the request's
        # max_tokens, or this upstream's) cut the rest
        return "stop" if n == whole else "length"

    async def close(self) -> None:
        pass


class IngestUpstream:
    """Answers of this route are opened by a local application through the ingest socket, not by clients."""

    def __init__(self, name: str) -> None:
        self.name = name

    def refusal(self, model: str | None, params: dict[str, Any]) -> str | None:
        # a request with no model took a route's default to here, and was told "model None is served by ..."
        what = f"model {model!r}" if model is not None else f"a request naming no model (upstream {self.name!r})"
        return (f"{what} is served by an application through the ingest API: attach to its answer with "
                "the request id it gave you")

    async def generate(self, request: ChatRequest, emit: Emit) -> str:
        raise RequestError(self.refusal(request.model, request.params) or "", code=ErrorCode.BAD_REQUEST)

    async def close(self) -> None:
        pass


def build_upstream(cfg: UpstreamConfig) -> Upstream:
    if cfg.type == "demo":
        return DemoUpstream(cfg.name, **cfg.options)
    if cfg.type == "openai":
        from .upstream_openai import OpenAIUpstream

        return OpenAIUpstream(cfg.name, **cfg.options)
    if cfg.type == "ingest":
        return IngestUpstream(cfg.name)
    raise ValueError(f"unknown upstream type {cfg.type!r}")


def build_upstreams(config: Config) -> dict[str, Upstream]:
    return {u.name: build_upstream(u) for u in config.upstreams}
