"""ChatStream.on_started: an answer's id as soon as the server's STARTED says it, before any token."""

from __future__ import annotations

import asyncio
import logging

from tokenwire.transport.client import connect

from .test_sdk_fixes2 import WORDS, words
from .test_sdk_server import client_kwargs, run, served


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
