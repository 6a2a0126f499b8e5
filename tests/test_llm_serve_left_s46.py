"""``tokenwire llm serve``, session 46: a stream's ``usage`` chunk, fields that would change the answer refused or
honoured (presence and frequency penalties), answers in flight cut at a stop with an error event, and a slow
client's headers and body bounded in time. The fake model is tests/test_llm_server.py's."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tokenwire.daemon.llm_server import (
    BadRequest,
    ChatParams,
    LLMService,
    cut_answers,
    parse_chat_request,
    start_server,
)
from tokenwire.daemon.upstream_openai import OpenAIUpstream
from tokenwire.transport.errors import ErrorCode, RequestError
from tokenwire.transport.server import ChatRequest

from .test_llm_server import EOS, GOOD, FakeLM, _events, engine, served
from .test_loopback import run


@asynccontextmanager
async def serving(lm: FakeLM, max_queue: int = 8) -> AsyncIterator[tuple[LLMService, str, web.Application]]:
    """tests/test_llm_server.py's ``served``, with the runner's application (what :func:`cut_answers` takes)."""
    service = LLMService(engine(lm), max_queue, "fake")
    runner, port = await start_server(service, "127.0.0.1", 0)
    try:
        yield service, f"http://127.0.0.1:{port}/v1", runner.app
    finally:
        await runner.cleanup()
        await asyncio.to_thread(service.close)


# ------------------------------------------------------------------------------------------------ 1a: usage
def test_a_stream_asked_for_usage_ends_with_a_usage_chunk_that_counts_as_the_whole_answer_does():
    """Streamed answers carried no usage: OpenAI sends a last chunk of no choice with it, on request."""
    async def go() -> tuple[list[Any], list[Any], Any]:
        async with served(FakeLM([1, 2, 3, 4, EOS])) as (_, url), aiohttp.ClientSession() as s:
            ask = {**GOOD, "stream": True, "stream_options": {"include_usage": True}}
            async with s.post(f"{url}/chat/completions", json=ask) as resp:
                asked = [e async for e in _events(resp)]
            async with s.post(f"{url}/chat/completions", json={**GOOD, "stream": True}) as resp:
                plain = [e async for e in _events(resp)]
            async with s.post(f"{url}/chat/completions", json=GOOD) as resp:
                whole = await resp.json()
            return asked, plain, whole

    asked, plain, whole = run(go(), 20)
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert whole["usage"] == usage
    assert asked[-1] is None and asked[-2]["choices"] == [] and asked[-2]["usage"] == usage
    assert asked[-3]["choices"][0]["finish_reason"] == "stop"
    assert all(e["usage"] is None for e in asked[:-2])  # OpenAI's form: null in every other chunk
    assert all("usage" not in e for e in plain[:-1]) and plain[-2]["choices"][0]["finish_reason"] == "stop"


def test_usage_counts_the_tokens_generated_at_a_stop_string_and_at_the_limit():
    pieces: list[str] = []
    result = engine(FakeLM([1, 9, 11, 12, 2, 9])).run(ChatParams(messages=[], stop=("STOP",)), pieces.append,
                                                       threading.Event())
    assert "".join(pieces) == "Hi!" and result.completion_tokens == 4  # "ST" "OP" were generated (and paid for)
    result = engine(FakeLM(endless=True), max_tokens=6).run(ChatParams(messages=GOOD["messages"]), pieces.append,
                                                             threading.Event())
    assert (result.prompt_tokens, result.completion_tokens) == (3, 6)


@pytest.mark.parametrize("options", [{"include_usage": "yes"}, ["include_usage"]])
def test_bad_stream_options_are_refused(options):
    with pytest.raises(BadRequest) as bad:
        parse_chat_request({**GOOD, "stream": True, "stream_options": options})
    assert bad.value.param == "stream_options"
    with pytest.raises(BadRequest):  # (OpenAI: only with stream true)
        parse_chat_request({**GOOD, "stream_options": {"include_usage": True}})
    assert parse_chat_request({**GOOD, "stream": True, "stream_options": {"include_usage": True}}).include_usage


# ------------------------------------------------------------------------------------ 1b: fields not ignored
@pytest.mark.parametrize(("field", "value"), [
    ("logit_bias", {"50256": -100}),
    ("logprobs", True),
    ("top_logprobs", 2),
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "required"),
    ("functions", [{"name": "f"}]),
    ("function_call", {"name": "f"}),
    ("response_format", {"type": "json_object"}),
    ("top_k", 5),  # (vLLM's: unknown here, and it would change the answer)
    ("n", 2),
    ("n", True),
])
def test_a_field_that_would_change_the_answer_is_refused_naming_it_not_ignored(field, value):
    with pytest.raises(BadRequest) as bad:
        parse_chat_request({**GOOD, field: value})
    assert bad.value.param == field and str(bad.value).startswith(field), str(bad.value)


def test_fields_asking_for_nothing_and_bookkeeping_fields_pass():
    p = parse_chat_request({**GOOD, "logprobs": False, "tools": [], "tool_choice": "none", "logit_bias": {},
                            "response_format": {"type": "text"}, "user": "u1", "metadata": {"a": "b"},
                            "store": False, "n": 1, "top_logprobs": 0})
    assert p.messages == GOOD["messages"]


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
def test_penalties_are_bounded_as_openai_documents_them(field):
    assert getattr(parse_chat_request({**GOOD, field: -2}), field) == -2.0
    for bad in (2.5, -3, "1"):
        with pytest.raises(BadRequest) as refused:
            parse_chat_request({**GOOD, field: bad})
        assert refused.value.param == field


def test_the_penalties_reach_the_model():
    lm = FakeLM([1, EOS])
    engine(lm).run(ChatParams(messages=GOOD["messages"], presence_penalty=0.5, frequency_penalty=-1.0),
                   lambda _: None, threading.Event())
    assert lm.penalties == {"presence_penalty": 0.5, "frequency_penalty": -1.0}


def test_presence_and_frequency_penalties_follow_openais_formula():
    """mu[j] - c[j] * frequency - (c[j] > 0) * presence over the tokens generated so far (not the prompt's)."""
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from tokenwire.daemon.llm_server import TorchLM

    base = [1.0, 5.0, 3.0, 4.5]

    class Tiny:
        config = SimpleNamespace(max_position_embeddings=64)

        def forward(self, input_ids: Any = None, use_cache: bool = True, past_key_values: Any = None) -> Any:
            return SimpleNamespace(logits=torch.tensor([[base]]), past_key_values=None)

        __call__ = forward

    def reference(presence: float, frequency: float, n: int) -> list[int]:
        counts = [0] * len(base)
        out = []
        for _ in range(n):
            mu = [m - c * frequency - (c > 0) * presence for m, c in zip(base, counts, strict=True)]
            token = max(range(len(mu)), key=lambda j: (mu[j], -j))  # (argmax: the first of equal ones)
            counts[token] += 1
            out.append(token)
        return out

    for presence, frequency in [(0.0, 0.0), (0.7, 0.0), (0.0, 0.9), (0.3, 0.4), (2.0, 2.0)]:
        tokens = TorchLM(Tiny()).tokens([1, 1, 1], temperature=0.0, top_p=1.0, seed=1,
                                        presence_penalty=presence, frequency_penalty=frequency)
        got = [next(tokens) for _ in range(12)]
        assert got == reference(presence, frequency, 12), (presence, frequency)
    assert reference(0.0, 0.0, 3) == [1, 1, 1] and len(set(reference(0.3, 0.4, 12))) > 2  # (they do differ)


# ------------------------------------------------------------------------------- 1c: answers cut at a stop
def test_a_stop_ends_answers_in_flight_with_an_error_event_or_a_503_and_logs_them(caplog):
    lm = FakeLM(endless=True, delay=0.01)

    async def go() -> tuple[list[Any], tuple[int, Any], tuple[int, Any], int]:
        async with serving(lm, max_queue=2) as (service, url, app), aiohttp.ClientSession() as s:
            async with s.post(f"{url}/chat/completions", json={**GOOD, "stream": True}) as resp:
                events: list[Any] = []
                async for event in _events(resp):
                    events.append(event)
                    if len(events) == 3:  # a second request waits behind this one; then the stop
                        waiting = asyncio.create_task(s.post(f"{url}/chat/completions", json=GOOD))
                        while service.waiting < 1:
                            await asyncio.sleep(0.01)
                        cutting = asyncio.create_task(cut_answers(app))
            cut = await cutting
            async with await waiting as answer:
                queued = answer.status, await answer.json()
            async with s.post(f"{url}/chat/completions", json=GOOD) as resp:
                late = resp.status, await resp.json()
            return events, queued, late, cut

    with caplog.at_level(logging.INFO, logger="tokenwire.llm"):
        events, queued, late, cut = run(go(), 20)
    assert events[-1] == {"error": {"message": "the server is shutting down: the answer was cut",
                                    "type": "server_error", "param": None, "code": None}}
    assert all("choices" in e for e in events[:-1]) and None not in events  # no finish_reason, no [DONE]
    assert queued[0] == 503 and "shutting down" in queued[1]["error"]["message"]
    assert late[0] == 503 and cut == 2
    assert "stopped: 2 answers in flight cut" in caplog.text
    assert caplog.text.count("cut (the server stopped)") == 2 and "the client left" not in caplog.text


def test_the_daemons_openai_upstream_turns_the_cut_into_a_typed_upstream_error():
    lm = FakeLM(endless=True, delay=0.01)
    req = ChatRequest(messages=[{"role": "user", "content": "hi"}], model="smol", max_tokens=5000, params={},
                      scheme="chatterbox", request_id=b"x" * 16)

    async def go() -> tuple[list[str], BaseException | None]:
        async with serving(lm) as (_, url, app):
            up = OpenAIUpstream("smol", base_url=url)
            out: list[str] = []
            task = asyncio.create_task(up.generate(req, out.append))
            while not out:
                await asyncio.sleep(0.01)
            await cut_answers(app)
            try:
                await task
                return out, None
            except RequestError as exc:
                return out, exc
            finally:
                await up.close()

    out, exc = run(go(), 20)
    assert out and isinstance(exc, RequestError) and exc.code == ErrorCode.UPSTREAM_ERROR
    assert str(exc) == "upstream 'smol': the server is shutting down: the answer was cut"


def test_sigterm_to_llm_serve_cuts_the_stream_with_an_error_event_and_logs_one_line(caplog):
    from tokenwire.daemon.llm_cli import _serve, bind_listeners

    lm = FakeLM(endless=True, delay=0.01)
    service = LLMService(engine(lm), 2, "fake")
    socks = bind_listeners("127.0.0.1", 0)
    port = socks[0].getsockname()[1]

    async def go() -> list[Any]:
        serving = asyncio.create_task(_serve(service, socks, "127.0.0.1"))
        url = f"http://127.0.0.1:{port}/v1"
        events: list[Any] = []
        async with aiohttp.ClientSession() as s:
            for _ in range(200):  # (the server starts listening)
                try:
                    async with s.get(f"{url}/models") as resp:
                        await resp.read()
                    break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.02)
            async with s.post(f"{url}/chat/completions", json={**GOOD, "stream": True}) as resp:
                async for event in _events(resp):
                    events.append(event)
                    if len(events) == 2:
                        os.kill(os.getpid(), signal.SIGTERM)
        await serving
        return events

    try:
        with caplog.at_level(logging.INFO, logger="tokenwire.llm"):
            events = run(go(), 20)
    finally:
        for sock in socks:
            sock.close()
        service.close()
    assert events[-1]["error"]["message"] == "the server is shutting down: the answer was cut"
    assert "stopped: 1 answer in flight cut" in caplog.text


# ------------------------------------------------------------------------------ 1d: a slow client's request
async def _dribble(port: int, head: bytes, then: bytes, every: float, for_s: float) -> tuple[bytes, float]:
    """Send ``head``, then ``then`` a byte at a time every ``every`` s; what came back, and after how long the
    server closed (``for_s`` if it did not)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    writer.write(head)
    got = b""
    try:
        for byte in then:
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                piece = await asyncio.wait_for(reader.read(65536), every)
            except TimeoutError:
                if time.monotonic() - start > for_s:
                    return got, for_s
                continue
            got += piece
            if not piece or got.endswith(b"}"):
                return got, time.monotonic() - start
        return got, for_s
    except ConnectionError:
        return got, time.monotonic() - start
    finally:
        writer.close()


def test_a_client_dribbling_its_headers_or_body_is_cut_off():
    """aiohttp's server has no header or body timeout: such a client held a connection and a handler for ever."""
    service = LLMService(engine(FakeLM([1, EOS])), 2, "fake")

    async def go() -> tuple[tuple[bytes, float], tuple[bytes, float]]:
        runner, port = await start_server(service, "127.0.0.1", 0, header_timeout_s=0.5, body_timeout_s=0.5)
        try:
            headers = await _dribble(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",
                                     b"X-Slow: " + b"a" * 60, 0.1, 4.0)
            body = await _dribble(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                  b"application/json\r\nContent-Length: 200\r\n\r\n", b'{"messages": ' + b" " * 100,
                                  0.1, 4.0)
            return headers, body
        finally:
            await runner.cleanup()

    try:
        (head_got, head_s), (body_got, body_s) = run(go(), 30)
    finally:
        service.close()
    assert head_got == b"" and head_s < 2.0  # closed, no answer
    assert body_got.startswith(b"HTTP/1.1 408") and b"did not come within 0.5 s" in body_got and body_s < 2.0


def test_an_answer_slower_than_the_header_timeout_is_not_cut():
    lm = FakeLM([1, 2, 3, 4, 9, EOS], delay=0.2)
    service = LLMService(engine(lm), 2, "fake")

    async def go() -> list[Any]:
        runner, port = await start_server(service, "127.0.0.1", 0, header_timeout_s=0.3, body_timeout_s=0.3)
        try:
            async with aiohttp.ClientSession() as s, \
                    s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={**GOOD, "stream": True}) as resp:
                return [e async for e in _events(resp)]
        finally:
            await runner.cleanup()

    try:
        events = run(go(), 20)
    finally:
        service.close()
    assert events[-1] is None and "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == \
        "Hi café!"
