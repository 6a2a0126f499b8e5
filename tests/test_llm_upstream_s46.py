"""``tokenwire llm serve`` and the daemon's ``openai`` upstream, session 46 (what a chatbot developer hit): a 429's
counts and its Retry-After, an answer cut inside a multi-byte character, an upstream that dies mid-answer in words
for a person, and "busy, retry later" told from "broken" (``RemoteError.retry_after``). The fake model is
tests/test_llm_server.py's."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tokenwire.daemon.llm_server import (
    IncrementalDecoder,
    LLMService,
    QueueFull,
    Result,
    parse_chat_request,
    retry_after_s,
)
from tokenwire.daemon.upstream_openai import OpenAIUpstream
from tokenwire.transport.errors import ErrorCode, RemoteError, RequestError, retry_after_of

from .test_llm_server import EOS, GOOD, PIECES, FakeLM, FakeTokenizer, _events, engine, generate, served
from .test_loopback import run
from .test_openai_upstream import FAST, REQ, _serve, chunk, daemon_on
from .test_upstream_fixes2 import ev


# ------------------------------------------------------------------------------------------ 1. 429s
def _refusal(max_queue: int, waiting: int, running: bool) -> QueueFull:
    """What ``submit`` raises with the queue as given. The state between two answers (the last one's end has
    set ``running`` False, the worker has not taken the next yet: it still counts as waiting) is where the count
    was off; it lasts microseconds in a real server, so it is set here by hand."""
    service = LLMService(engine(FakeLM([1, EOS])), max_queue, "fake")
    try:
        with service._lock:
            service.waiting, service.running = waiting, running
        with pytest.raises(QueueFull) as refused:
            service.submit(parse_chat_request(GOOD))
        return refused.value
    finally:
        with service._lock:
            service.waiting, service.running = 0, False
        service.close()


@pytest.mark.parametrize(("max_queue", "waiting", "running", "words"), [
    (8, 8, True, "8 requests waiting behind it (--max-queue 8)"),
    (8, 9, False, "8 requests waiting behind it (--max-queue 8)"),  # was "9 requests waiting"
    (1, 1, True, "1 request waiting behind it (--max-queue 1)"),
    (1, 2, False, "1 request waiting behind it (--max-queue 1)"),
    (0, 0, True, "--max-queue 0 lets no request wait behind it"),  # was "0 requests waiting"
    (0, 1, False, "--max-queue 0 lets no request wait behind it"),  # was "1 requests waiting"
], ids=["8-generating", "8-between", "1-generating", "1-between", "0-generating", "0-between"])
def test_a_429_counts_the_requests_waiting_behind_the_answer_being_generated(max_queue, waiting, running, words):
    refused = _refusal(max_queue, waiting, running)
    assert str(refused) == f"server busy: an answer is being generated and {words}"
    assert refused.retry_after_s == 1  # no answer yet to go by


def test_retry_after_is_what_is_left_of_the_answer_being_generated_at_least_1_s():
    assert retry_after_s([], None) == 1 and retry_after_s([], 30.0) == 1  # nothing to go by
    assert retry_after_s([10.0, 20.0], None) == 15  # between two answers: a whole one
    assert retry_after_s([10.0, 20.0], 3.2) == 12  # 15 - 3.2, rounded up
    assert retry_after_s([10.0], 12.0) == 1 and retry_after_s([0.2, 0.3], 0.0) == 1  # overdue, or quick answers


def test_a_burst_over_max_queue_gets_429s_with_one_count_and_a_retry_after_header():
    """With ``--max-queue 0`` a burst got "1 requests waiting" and "0 requests waiting"; no Retry-After."""
    gate = threading.Event()
    lm = FakeLM([1, 2, EOS], gate=gate)

    async def go() -> tuple[int, list[tuple[int, str | None, str]]]:
        async with served(lm, max_queue=0) as (service, url), aiohttp.ClientSession() as s:
            # the last answers took 30 s each (whole ones: a cancelled one does not count)
            service.finished = [Result("stop", seconds=30.0), Result("cancelled", seconds=0.1)]

            async def ask() -> tuple[int, str | None, str]:
                async with s.post(f"{url}/chat/completions", json=GOOD) as resp:
                    return resp.status, resp.headers.get("Retry-After"), (await resp.json())["error"]["message"]

            first = asyncio.create_task(s.post(f"{url}/chat/completions", json=GOOD))
            while not service.running:
                await asyncio.sleep(0.01)
            refused = await asyncio.gather(*(ask() for _ in range(6)))
            gate.set()
            async with await first as resp:
                return resp.status, refused

    status, refused = run(go(), 20)
    assert status == 200
    words = "server busy: an answer is being generated and --max-queue 0 lets no request wait behind it"
    assert {(code, text) for code, _, text in refused} == {(429, words)}
    assert all(retry is not None and 28 <= int(retry) <= 30 for _, retry, _ in refused), refused


# ------------------------------------------------------------------------------- 2. a cut inside a character
def test_an_answer_cut_inside_a_character_drops_its_unfinished_bytes():
    cut = IncrementalDecoder(FakeTokenizer())
    assert [cut.push(2), cut.push(3), cut.flush()] == [" caf", "", ""]  # was "\ufffd": a character never written
    pieces, reason = generate([1, 2, 3, 4, 9], max_tokens=3)  # cut by max_tokens after "\xc3"
    assert "".join(pieces) == "Hi caf" and reason == "length"
    pieces, reason = generate([1, 6, 7, EOS])  # the model's end after 3 of the emoji's 4 bytes
    assert "".join(pieces) == "Hi" and reason == "stop"
    # bytes that can never be a character stay U+FFFD mid-answer; at the end the decode cannot tell a stray byte
    # right before the unfinished character from it, and both go (session 47: the whole trailing run of U+FFFD)
    pieces, reason = generate([1, 7, 9, 7, 3], max_tokens=5)  # "Hi", a stray continuation byte, "!", again, "\xc3"
    assert "".join(pieces) == "Hi\ufffd!" and reason == "length"
    pieces, reason = generate([1, 7, 9, 7, 9], max_tokens=5)  # a stray byte before a whole character stays
    assert "".join(pieces) == "Hi\ufffd!\ufffd!" and reason == "length"


class ByteFallbackTokenizer:
    """A SentencePiece model's byte-fallback tokens as Hugging Face's ByteFallback decoder decodes them: bytes that
    make no character come out as one U+FFFD per byte (byte-level BPE makes one U+FFFD of an unfinished character)."""

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        raw = b"".join(PIECES[i] for i in ids if i != EOS).decode("utf-8", errors="surrogateescape")
        return "".join("\ufffd" if "\udc80" <= ch <= "\udcff" else ch for ch in raw)


def test_a_byte_fallback_tokenizer_cut_inside_a_character_leaves_no_replacement_character():
    tok = ByteFallbackTokenizer()
    assert tok.decode([1, 6]) == "Hi\ufffd\ufffd"  # two of the emoji's four bytes: one U+FFFD each
    cut = IncrementalDecoder(tok)
    assert [cut.push(1), cut.push(6), cut.flush()] == ["Hi", "", ""]  # it ended "\ufffd" (one of the two stripped)
    whole = IncrementalDecoder(tok)
    assert "".join([whole.push(t) for t in [1, 6, 7, 8, 9]] + [whole.flush()]) == "Hi\U0001f642!"


def test_a_streamed_answer_cut_inside_a_character_ends_without_a_replacement_character():
    async def go() -> tuple[list[Any], Any]:
        async with served(FakeLM([1, 2, 3, 4, 9])) as (_, url), aiohttp.ClientSession() as s:
            body = {**GOOD, "stream": True, "max_tokens": 3}
            async with s.post(f"{url}/chat/completions", json=body) as resp:
                events = [e async for e in _events(resp)]
            async with s.post(f"{url}/chat/completions", json={**GOOD, "max_tokens": 3}) as resp:
                return events, await resp.json()

    events, whole = run(go(), 20)
    deltas = [e["choices"][0]["delta"].get("content") for e in events[:-1]]
    assert "".join(d or "" for d in deltas) == "Hi caf" and "\ufffd" not in deltas
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert whole["choices"][0]["message"]["content"] == "Hi caf" and whole["usage"]["completion_tokens"] == 3


# -------------------------------------------------------------------------------- 3. an upstream dies mid-answer
class Dying:
    """An upstream that sends ``tokens`` events, then its connection closes mid-body (``json``: a JSON answer's
    body that stops short of its Content-Length), as a server killed mid-answer."""

    def __init__(self, tokens: int, json: bool = False) -> None:
        self.tokens, self.json = tokens, json

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.json()
        if self.json:
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.content_length = 500
            await resp.prepare(request)
            await resp.write(b'{"choices": [')
        else:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)  # (chunked: the end of a chunked body never comes)
            for i in range(self.tokens):
                await resp.write(ev(chunk(f"w{i} ")))
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()
        return resp


def _died(server: Dying) -> tuple[list[str], RequestError]:
    async def go() -> tuple[list[str], RequestError]:
        runner, port = await _serve(server)  # type: ignore[arg-type]  # (any object with .handle)
        up = OpenAIUpstream("smol", base_url=f"http://127.0.0.1:{port}/v1", **FAST)
        out: list[str] = []
        try:
            with pytest.raises(RequestError) as info:
                await up.generate(REQ, out.append)
            return out, info.value
        finally:
            await up.close()
            await runner.cleanup()

    return run(go(), 20)


@pytest.mark.parametrize(("tokens", "when"), [(3, "after 3 tokens"), (1, "after 1 token"),
                                              (0, "before its first token")])
def test_an_upstream_that_dies_mid_answer_is_told_in_words_for_a_person(tokens, when):
    """It was UPSTREAM_ERROR "stream broke: ClientPayloadError": clear for code, cryptic for a person."""
    out, err = _died(Dying(tokens))
    assert err.code == ErrorCode.UPSTREAM_ERROR and len(out) == tokens
    head = f"upstream 'smol': the upstream closed the answer mid-stream {when} (ClientPayloadError: "
    assert str(err).startswith(head) and str(err).endswith(")"), str(err)
    assert "transfer length" in str(err) or "payload" in str(err).lower()  # aiohttp's words, cut short


def test_a_json_answer_cut_short_is_told_so():
    _, err = _died(Dying(0, json=True))
    assert err.code == ErrorCode.UPSTREAM_ERROR
    assert str(err).startswith("upstream 'smol': the upstream closed its JSON answer before its end ("), str(err)


# ------------------------------------------------------------------------------ 4. busy, retry later vs broken
@pytest.mark.parametrize(("message", "retry"), [
    ("upstream 'vllm': HTTP 429: Rate limit reached; Retry-After: 20 s", 20.0),
    ("upstream 'vllm': HTTP 503: (empty body); Retry-After: 0 s", 0.0),
    ("upstream 'vllm': HTTP 429: (empty body); Retry-After: 1 s (the upstream named none)", 1.0),
    ("upstream 'vllm': HTTP 429: (empty body); Retry-After: 1 s (the upstream's 'soon (ish)' is not a time)", 1.0),
    ("upstream 'vllm': HTTP 500: model overloaded", None),
    ("upstream 'vllm': HTTP 500: (empty body); Retry-After: after lunch", None),  # not busy, and no time
    ("upstream 'vllm': HTTP 429: (empty body); Retry-After: 5 s and more", None),  # not the suffix: text after it
    ("", None),
])
def test_remote_error_retry_after_reads_the_documented_suffix(message, retry):
    assert retry_after_of(message) == retry
    assert RemoteError(message, code=ErrorCode.UPSTREAM_ERROR).retry_after == retry


class Busy:
    """An upstream answering 429 (``retry``: its Retry-After header, None: none) or 500."""

    def __init__(self) -> None:
        self.status, self.retry = 429, "7"

    async def handle(self, request: web.Request) -> web.Response:
        await request.json()
        headers = {} if self.retry is None else {"Retry-After": self.retry}
        return web.json_response({"error": {"message": "slow down"}}, status=self.status, headers=headers)


def test_a_busy_upstream_reaches_the_sdk_with_retry_after_and_a_broken_one_without(tmp_path):
    """End to end (the daemon subprocess): an upstream 429 was UPSTREAM_ERROR like a crash, the wait only in the
    text. The code stays UPSTREAM_ERROR (older clients and daemons: the same frames); ``retry_after`` tells."""
    from tokenwire.transport.client import connect

    busy = Busy()
    with daemon_on(busy, tmp_path) as d:  # type: ignore[arg-type]  # (any object with .handle)

        async def go() -> list[RemoteError]:
            errors = []
            async with connect("127.0.0.1", d.port, **d.client_kwargs()) as conn:
                for status, retry in ((429, "7"), (503, None), (500, None)):
                    busy.status, busy.retry = status, retry
                    with pytest.raises(RemoteError) as info:
                        await conn.chat("hi", model="small").collect()
                    errors.append(info.value)
                assert not conn.closed
            return errors

        seven, unnamed, broken = run(go())
    assert [e.code for e in (seven, unnamed, broken)] == [ErrorCode.UPSTREAM_ERROR] * 3
    assert str(seven) == "upstream 'vllm': HTTP 429: slow down; Retry-After: 7 s" and seven.retry_after == 7.0
    assert str(unnamed).endswith("; Retry-After: 1 s (the upstream named none)") and unnamed.retry_after == 1.0
    assert str(broken) == "upstream 'vllm': HTTP 500: slow down" and broken.retry_after is None


def test_llm_serve_busy_reaches_the_daemons_client_with_its_retry_after():
    """llm serve's 429 through the ``openai`` upstream: the message counts right and ends with its estimate."""
    gate = threading.Event()
    lm = FakeLM([1, 2, EOS], gate=gate)

    async def go() -> RequestError:
        async with served(lm, max_queue=0) as (service, url):
            service.finished = [Result("stop", seconds=12.0)]
            up = OpenAIUpstream("smol", base_url=url)
            first = asyncio.create_task(up.generate(REQ, lambda _: None))
            while not service.running:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            try:
                with pytest.raises(RequestError) as info:
                    await up.generate(REQ, lambda _: None)
                assert time.monotonic() - started < 5
                return info.value
            finally:
                gate.set()
                await first
                await up.close()

    err = run(go(), 20)
    words = "server busy: an answer is being generated and --max-queue 0 lets no request wait behind it"
    assert str(err).startswith(f"upstream 'smol': HTTP 429: {words}; Retry-After: "), str(err)
    retry = RemoteError(str(err), code=err.code).retry_after  # what the daemon's client gets
    assert retry is not None and 10 <= retry <= 12


def test_an_upstreams_own_words_cannot_set_retry_after():
    """The upstream's text is quoted: a 500 (or an error event) whose words end like the suffix set the client's
    retry_after (999,999 s from a broken upstream); only the daemon's own note may."""
    from tokenwire.daemon.upstream_openai import _upstream_error

    spoof = _upstream_error("u", "HTTP 500: oops; Retry-After: 999999 s")
    assert str(spoof) == "upstream 'u': HTTP 500: oops, Retry-After: 999999 s"
    assert RemoteError(str(spoof), code=ErrorCode.UPSTREAM_ERROR).retry_after is None
    own = _upstream_error("u", "HTTP 429: busy; Retry-After: 999999 s", "; Retry-After: 7 s")
    assert str(own).endswith("busy, Retry-After: 999999 s; Retry-After: 7 s")
    assert RemoteError(str(own), code=ErrorCode.UPSTREAM_ERROR).retry_after == 7.0
