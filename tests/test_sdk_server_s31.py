"""``serve()``'s answer-length cap (``max_tokens``) and the token sources it refuses up front."""

from __future__ import annotations

import asyncio
import functools

import pytest

from tokenwire.transport.client import connect
from tokenwire.transport.server import MAX_TOKENS, ChatRequest, serve

from .test_sdk_server import T, client_kwargs, run


def endless(seen: list[ChatRequest], closed: list[bool]):
    """A source that never stops on its own (an engine with no limit of its own), recording what it saw."""

    async def source(request: ChatRequest):
        seen.append(request)
        try:
            i = 0
            while True:
                yield f"t{i} "
                i += 1
        finally:
            closed.append(True)

    return source


async def _answer(cap: int | None, asked: int | None):
    seen: list[ChatRequest] = []
    closed: list[bool] = []
    kwargs = {} if cap is None else {"max_tokens": cap}
    server = await serve(endless(seen, closed), host="127.0.0.1", port=0, **kwargs)
    try:
        async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            stream = conn.chat("go", max_tokens=asked)
            await asyncio.wait_for(stream.collect(), T)
            return stream.stats, server.stats.tokens, seen[0].max_tokens, closed
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), T)


@pytest.mark.parametrize(("cap", "asked", "tokens", "source_sees"), [
    (40, None, 40, None),  # no limit asked: the server's cap ends it (it streamed for ever)
    (40, 1000, 40, 40),  # asked for more than the cap: the cap, and the source is told so
    (40, 25, 25, 25),  # asked for less: the request's own limit, as before
], ids=["none-asked", "asked-more", "asked-less"])
def test_an_answer_stops_at_the_lower_of_the_servers_cap_and_its_requests_limit(cap, asked, tokens, source_sees):
    """A request without max_tokens to a source that never stopped streamed 1.28 M tokens in 40 s (both ends'
    memory growing); now it ends at serve(max_tokens=) with "length", its source closed, as a request's own
    limit ends it."""
    stats, server_tokens, seen_limit, closed = run(_answer(cap, asked))
    assert stats.finish_reason == "length"
    assert stats.tokens == server_tokens == tokens and stats.digest_verified
    assert seen_limit == source_sees
    assert closed == [True]


def test_the_default_cap_is_the_daemons_limits_max_tokens():
    stats, server_tokens, seen_limit, _ = run(_answer(None, None), timeout=60.0)
    assert MAX_TOKENS == 16_384
    assert stats.finish_reason == "length" and stats.tokens == server_tokens == MAX_TOKENS
    assert seen_limit is None


async def _words(request: ChatRequest):
    yield "hi"


@pytest.mark.parametrize("value", [0, -1, 1_000_001, 2.5, True, "100", None])
def test_serve_refuses_a_max_tokens_outside_the_protocols_bound(value):
    with pytest.raises(ValueError, match=r"max_tokens must be an int from 1 to 1,000,000"):
        run(serve(_words, host="127.0.0.1", port=0, max_tokens=value))


# -- sources that can never give an async iterator ---------------------------------------------------------------
async def _returns(request: ChatRequest):  # an async def without yield: its call gives a coroutine
    return "hello"


def _sync_gen(request: ChatRequest):  # a plain generator function: no async iterator
    yield "hello"


class _Engine:
    async def answer(self, request: ChatRequest):
        return "hello"


@pytest.mark.parametrize(("source", "message"), [
    (_returns, "source is an async def that returns"),
    (_Engine().answer, "source is an async def that returns"),
    (functools.partial(_returns), "source is an async def that returns"),
    (_sync_gen, "source is a sync generator function"),
], ids=["async-def", "bound-method", "partial", "sync-generator"])
def test_serve_refuses_a_source_that_can_never_yield(source, message):
    """Each request to such a source failed with "token source failed: TypeError" and a traceback in the log
    (and "coroutine was never awaited"); serve() accepted it without a word."""
    with pytest.raises(TypeError, match=message):
        run(serve(source, host="127.0.0.1", port=0))


def test_a_plain_function_returning_an_async_iterator_is_still_a_source():
    """The documented contract: a callable that returns an async iterator (not only an async generator function)."""

    def source(request: ChatRequest):
        return _words(request)

    async def go():
        server = await serve(source, host="127.0.0.1", port=0)
        try:
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                return await asyncio.wait_for(conn.chat("x").collect(), T)
        finally:
            server.close()
            await asyncio.wait_for(server.wait_closed(), T)

    assert run(go()) == "hi"
