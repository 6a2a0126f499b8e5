"""The ``openai`` upstream against a local HTTP server speaking the OpenAI streaming format."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading

import pytest
from aiohttp import web

from tokenwire.daemon.config import ConfigError, parse_config
from tokenwire.daemon.upstream_openai import OpenAIUpstream
from tokenwire.transport.errors import ErrorCode, RequestError
from tokenwire.transport.server import ChatRequest

from .test_loopback import run


def chunk(content=None, finish=None, index=0, key="content"):
    delta = {} if content is None else {key: content}
    return {"object": "chat.completion.chunk", "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}


KEEP_ALIVE = {"ping": b": ping\n\n", "empty": f"data: {json.dumps(chunk(''))}\n\n".encode()}


class FakeOpenAI:
    """Serves /v1/chat/completions; ``mode`` selects the behaviour under test."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.seen: list[dict] = []
        self.headers: list[dict] = []
        self.active = self.peak = 0  # "hold" streams open at once, and the most of them
        self.hung_up = asyncio.Event()  # "finish_hold": the client closed the stream it kept open

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append(body)
        self.headers.append(dict(request.headers))
        if self.mode == "http500":
            return web.json_response({"error": {"message": "model overloaded", "type": "server_error"}}, status=500)
        if self.mode.startswith("echo401:"):  # a proxy repeating the credentials it refused, after N characters
            said = f"invalid credentials: {request.headers.get('Authorization')} {request.headers.get('X-Token')}"
            return web.json_response({"error": {"message": "x" * int(self.mode[8:]) + said}}, status=401)
        if self.mode == "forge":  # an error message that writes a log line of its own and clears the terminal
            forged = "boom\n2026-12-05 10:00:00,000 CRITICAL tokenwire.daemon: FORGED\x1b[2J"
            return web.json_response({"error": {"message": forged}}, status=500)
        if self.mode == "http500_bignum":  # JSON Python refuses with a plain ValueError (over 4300 digits)
            return web.Response(status=500, text='{"error": ' + "1" * 5000 + "}", content_type="application/json")
        if self.mode == "error_body_late":  # the headers of a 500, its body only 3 s later
            resp = web.StreamResponse(status=500, headers={"Content-Type": "application/json"})
            resp.content_length = 7
            await resp.prepare(request)
            await asyncio.sleep(3)
            await resp.write(b'"late"\n')
            return resp
        if self.mode == "error_body_latin1":  # an HTML error page, not UTF-8, no charset
            return web.Response(status=502, body=b"<html>Fehler: \xfcberlastet</html>", content_type="text/html")
        if self.mode == "error_body_cut":  # the connection closes 90 bytes short of the body
            resp = web.StreamResponse(status=502, headers={"Content-Type": "text/html"})
            resp.content_length = 100
            await resp.prepare(request)
            await resp.write(b"<html>bad ")
            request.transport.close()
            return resp
        if self.mode == "json_answer":  # a server that ignores stream: true
            message = {"role": "assistant", "content": "Whole answer."}
            return web.json_response({"object": "chat.completion", "choices": [
                {"index": 0, "message": message, "finish_reason": "length"}]})
        if self.mode == "json_error":
            return web.json_response({"error": {"message": "quota exceeded"}})  # status 200
        if self.mode == "json_other":
            return web.json_response({"object": "list", "data": []})
        if self.mode == "hang_before_headers":
            await asyncio.sleep(30)
        if self.mode == "late_headers":  # headers after 1.2 s, the first token 0.6 s later
            await asyncio.sleep(1.2)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(obj):
            await resp.write(f"data: {json.dumps(obj)}\n\n".encode())

        if self.mode == "hold":  # a first token, then the stream stays open 1.2 s
            self.active += 1
            self.peak = max(self.peak, self.active)
            try:
                await send(chunk("Hi"))
                await asyncio.sleep(1.2)
                await send(chunk(None, finish="stop"))
                await resp.write(b"data: [DONE]\n\n")
            finally:
                self.active -= 1
            return resp
        if self.mode.startswith("finish_hold"):  # the whole answer, then neither [DONE] nor the end of the body
            await send(chunk("Hello", finish="stop" if self.mode == "finish_hold" else "st\udc80op\x1b[2J"))
            try:
                await asyncio.sleep(30)
            finally:
                self.hung_up.set()
            return resp
        if self.mode.startswith("raw:"):  # one event line exactly as given, after a good first token
            await send(chunk("Hi"))
            await resp.write(self.mode[4:].encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            return resp
        if self.mode == "no_first_token":
            await resp.write(b": keep-alive comment\n\n")
            await asyncio.sleep(30)
        if self.mode == "late_headers":
            await asyncio.sleep(0.6)
        if self.mode.endswith("_first"):  # 3 s of keep-alives before any token
            await self.keep_alive(resp, self.mode.split("_")[0])
        if self.mode == "reasoning":  # 1.5 s of thinking, streamed as reasoning deltas (vLLM's reasoning parser)
            for _ in range(15):
                await send(chunk("hmm", key="reasoning_content"))
                await asyncio.sleep(0.1)
        await send({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        for piece in ["Hel", "lo", ", wor", "ld"]:
            await send(chunk(piece))
            await send(chunk("IGNORED", index=1))  # other choices are not this answer
        if self.mode == "stall":
            await asyncio.sleep(30)
        if self.mode.endswith("_mid"):
            await self.keep_alive(resp, self.mode.split("_")[0])
        if self.mode == "error_event":
            await send({"error": {"message": "context length exceeded"}})
            return resp
        if self.mode == "no_done":
            return resp
        await send(chunk(None, finish="length" if self.mode in ("length", "finish_no_done") else "stop"))
        if self.mode == "finish_no_done":  # TGI before mid-2024, ik_llama.cpp, llama-box
            return resp
        await send({"object": "chat.completion.chunk", "choices": [], "usage": {"completion_tokens": 4}})
        await resp.write(b"data: [DONE]\n\n")
        return resp

    @staticmethod
    async def keep_alive(resp: web.StreamResponse, kind: str) -> None:
        """3 s of an upstream that is alive but produces nothing: comments or empty deltas every 0.1 s."""
        for _ in range(30):
            await resp.write(KEEP_ALIVE[kind])
            await asyncio.sleep(0.1)


@pytest.fixture
def fake():
    return FakeOpenAI()


async def _serve(fake: FakeOpenAI, ssl_context=None):
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.2, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, port


REQ = ChatRequest(
    messages=[{"role": "user", "content": "hi"}],
    model="small",
    max_tokens=50,
    params={"temperature": 0.5, "rate": 3},
    scheme="chatterbox",
    request_id=b"x" * 16,
)


def generate(fake: FakeOpenAI, mode: str, tmp_path=None, req: ChatRequest = REQ, userinfo: str = "", **opts):
    fake.mode = mode

    async def go():
        runner, port = await _serve(fake)
        up = OpenAIUpstream("vllm", base_url=f"http://{userinfo}127.0.0.1:{port}/v1", **opts)
        out: list[str] = []
        try:
            reason = await up.generate(req, out.append)
            return out, reason
        finally:
            await up.close()
            await runner.cleanup()

    return run(go(), timeout=30)


def test_streams_content_and_maps_model_and_params(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_KEY", "sk-test")
    out, reason = generate(fake, "ok", api_key_env="TEST_KEY", models={"small": "org/model-7b"})
    assert "".join(out) == "Hello, world" and reason == "stop"
    body = fake.seen[0]
    assert body["model"] == "org/model-7b" and body["stream"] is True and body["max_tokens"] == 50
    assert body["temperature"] == 0.5 and "rate" not in body  # only OpenAI parameters pass through
    assert fake.headers[0]["Authorization"] == "Bearer sk-test"


def test_api_key_from_file(fake, tmp_path):
    key = tmp_path / "key"
    key.write_text("sk-file\n")
    generate(fake, "ok", api_key_file=key)
    assert fake.headers[0]["Authorization"] == "Bearer sk-file"


def test_finish_reason_length(fake):
    assert generate(fake, "length")[1] == "length"


@pytest.mark.parametrize(
    "mode, code, text",
    [
        ("http500", ErrorCode.UPSTREAM_ERROR, "HTTP 500: model overloaded"),
        ("error_event", ErrorCode.UPSTREAM_ERROR, "context length exceeded"),
        ("no_done", ErrorCode.UPSTREAM_ERROR, "without [DONE]"),
        ("stall", ErrorCode.UPSTREAM_TIMEOUT, "stalled"),
        ("no_first_token", ErrorCode.UPSTREAM_TIMEOUT, "no first token"),
        ("hang_before_headers", ErrorCode.UPSTREAM_TIMEOUT, "no response"),
    ],
)
def test_failures_are_typed(fake, mode, code, text):
    with pytest.raises(RequestError) as info:
        generate(fake, mode, connect_timeout_s=0.5, first_token_timeout_s=0.5, stall_timeout_s=0.5)
    assert info.value.code == code
    assert text in str(info.value)


@pytest.mark.parametrize("line", [
    "data: []", "data: 42", 'data: {"choices": "x"}', 'data: {"choices": [null]}',
    'data: {"choices": [{"delta": "text"}]}', 'data: {"choices": [{"delta": {"content": ["a", "b"]}}]}',
    'data: {"error": null, "choices": 3}',
])
def test_an_event_of_the_wrong_shape_is_a_typed_upstream_error(fake, line):
    """Valid JSON of another shape was an AttributeError (or a list pushed as text): a traceback in the log
    and an untyped failure; now it is UPSTREAM_ERROR saying what was wrong."""
    with pytest.raises(RequestError) as info:
        generate(fake, "raw:" + line)
    assert info.value.code == ErrorCode.UPSTREAM_ERROR
    assert "malformed event" in str(info.value)


@pytest.mark.parametrize("mode, text", [
    ('raw:data: {"x": ' + "1" * 5000 + "}", "malformed event (not JSON)"),  # a plain ValueError in json.loads
    ("raw:data: " + "[" * 100_000, "malformed event (not JSON)"),  # RecursionError
    ("raw:event: error\ndata: {\"n\": " + "1" * 5000 + "}", '{"n": 111'),  # the body itself, as for non-JSON
    ("raw:event: error\ndata: " + "[" * 100_000, "[[["),
    ("http500_bignum", 'HTTP 500: {"error": 111'),
], ids=["bignum", "deep", "error_event_bignum", "error_event_deep", "http_error_bignum"])
def test_json_python_cannot_parse_is_a_typed_upstream_error(fake, mode, text):
    """Only JSONDecodeError was caught: a 5000-digit integer or deep nesting from the upstream was a generic
    failure with an ERROR traceback in the daemon's log instead of a typed UPSTREAM_ERROR."""
    with pytest.raises(RequestError) as info:
        generate(fake, mode, **FAST)
    assert info.value.code == ErrorCode.UPSTREAM_ERROR and text in str(info.value)


def test_more_than_a_hundred_concurrent_streams(fake):
    """aiohttp's default pool holds 100 connections: answer 101 waited for a free one, and the wait counted
    against the first-token deadline ("no response within ..." though the request never left)."""
    fake.mode = "hold"

    async def go() -> list:
        runner, port = await _serve(fake)
        up = OpenAIUpstream("vllm", base_url=f"http://127.0.0.1:{port}/v1", connect_timeout_s=0.4,
                            first_token_timeout_s=0.4, stall_timeout_s=5)
        try:
            return await asyncio.gather(*(up.generate(REQ, lambda s: None) for _ in range(120)),
                                        return_exceptions=True)
        finally:
            await up.close()
            await runner.cleanup()

    results = run(go(), timeout=30)
    assert [r for r in results if r != "stop"] == []
    assert fake.peak == 120  # all of them open at once


def test_an_api_key_rotated_to_two_lines_is_a_typed_error(fake, tmp_path, monkeypatch):
    """The file is read at each request: one rewritten with a line break inside the key failed every request
    with aiohttp's header traceback; now each is a typed UPSTREAM_ERROR (and nothing reaches the server)."""
    key = tmp_path / "key"
    key.write_text("sk-one\nsk-two\n")
    with pytest.raises(RequestError) as info:
        generate(fake, "ok", api_key_file=key)
    assert info.value.code == ErrorCode.UPSTREAM_ERROR and "API key file contains a line break" in str(info.value)
    monkeypatch.setenv("TEST_KEY", "sk-env\r\nX-Injected: 1")
    with pytest.raises(RequestError, match=r"the API key in \$TEST_KEY contains a line break"):
        generate(fake, "ok", api_key_env="TEST_KEY")
    assert fake.seen == []


def test_a_long_event_line_streams_intact_and_a_null_error_is_no_error(fake):
    out, reason = generate(fake, "raw:data: " + json.dumps({**chunk("x" * 300_000), "error": None}))
    assert out == ["Hi", "x" * 300_000] and reason == "stop"


FAST = {"connect_timeout_s": 0.5, "first_token_timeout_s": 0.5, "stall_timeout_s": 0.5}


@pytest.mark.parametrize(
    "mode, text",
    [
        ("ping_first", "no first token within 1 s"),
        ("empty_first", "no first token within 1 s"),
        ("ping_mid", "stalled for 0.5 s"),
        ("empty_mid", "stalled for 0.5 s"),
    ],
)
def test_keep_alives_do_not_put_off_the_timeouts(fake, mode, text):
    """Each line read restarted the timer, so comments or empty deltas every 0.1 s kept a tokenless upstream
    alive forever; now the deadlines run from the request's start and from the last token."""
    with pytest.raises(RequestError) as info:
        generate(fake, mode, **FAST)
    assert info.value.code == ErrorCode.UPSTREAM_TIMEOUT and text in str(info.value)


def test_the_first_token_deadline_counts_from_the_request(fake):
    """Headers at 1.2 s and the first token 0.6 s later miss the one 1.5 s deadline (connect + first token);
    the headers used to get 1.5 s and the first token another 1 s."""
    with pytest.raises(RequestError) as info:
        generate(fake, "late_headers", connect_timeout_s=0.5, first_token_timeout_s=1.0, stall_timeout_s=5)
    assert info.value.code == ErrorCode.UPSTREAM_TIMEOUT and "no first token within 1.5 s" in str(info.value)


def test_reasoning_deltas_are_tokens_not_a_stall(fake):
    """A reasoning model thinks for longer than the first-token deadline: its reasoning deltas are not sent to
    the client, but they are tokens, so the strict deadlines must not cut the thinking short."""
    out, reason = generate(fake, "reasoning", **FAST)
    assert "".join(out) == "Hello, world" and reason == "stop"


@pytest.mark.parametrize(
    "mode, text",
    [
        ("error_body_late", "HTTP 500: (no error body within 0.5 s)"),  # resp.text() waited for it
        ("error_body_latin1", "HTTP 502, text/html page: Fehler: \ufffdberlastet"),  # was UnicodeDecodeError
        ("error_body_cut", "HTTP 502: (error body cut short: ClientPayloadError)"),  # was ClientPayloadError
        ("raw:data: " + json.dumps(chunk("x" * 1_100_000)), "event line too long"),  # was LineTooLong
    ],
    ids=["late", "latin1", "cut", "long_line"],
)
def test_unreadable_error_bodies_and_overlong_lines_are_typed(fake, mode, text):
    with pytest.raises(RequestError) as info:
        generate(fake, mode, **FAST)
    assert info.value.code == ErrorCode.UPSTREAM_ERROR and text in str(info.value)


def test_eof_after_a_finish_reason_is_a_normal_end(fake):
    """TGI (before mid-2024), ik_llama.cpp and llama-box end a finished stream without [DONE]."""
    out, reason = generate(fake, "finish_no_done")
    assert "".join(out) == "Hello, world" and reason == "length"


def test_a_json_answer_to_a_streaming_request_is_read(fake):
    """A server that ignores ``stream`` answers one chat completion: it is the answer, not a broken stream."""
    assert generate(fake, "json_answer") == (["Whole answer."], "length")
    with pytest.raises(RequestError) as info:
        generate(fake, "json_error")
    assert info.value.code == ErrorCode.UPSTREAM_ERROR and "quota exceeded" in str(info.value)
    with pytest.raises(RequestError, match="malformed answer"):
        generate(fake, "json_other")


@pytest.mark.parametrize("line, text", [
    ('event: error\ndata: {"message": "CUDA out of memory", "type": "server_error"}', "CUDA out of memory"),
    ("event:error\ndata: worker died", "worker died"),
    ('data: {"object": "error", "message": "vLLM mid-stream failure", "code": 400}', "vLLM mid-stream failure"),
], ids=["event_error", "event_error_text", "vllm_object_error"])
def test_error_events_fail_the_answer(fake, line, text):
    """``event: error`` and vLLM's ``{"object": "error"}`` were skipped, and the answer ended as a success."""
    with pytest.raises(RequestError) as info:
        generate(fake, "raw:" + line)
    assert info.value.code == ErrorCode.UPSTREAM_ERROR and text in str(info.value)


def test_a_client_without_a_model_gets_the_configured_one_or_none(fake):
    """``"model": ""`` made strict servers answer 404: the upstream's ``model`` stands in, else none is sent."""
    nameless = dataclasses.replace(REQ, model=None, max_tokens=None)
    generate(fake, "ok", req=nameless)
    generate(fake, "ok", req=nameless, model="org/default")
    generate(fake, "ok", req=nameless, model="org/default", models={"": "org/mapped"})
    generate(fake, "ok", model="org/default")  # a client that names one keeps it
    assert [b.get("model") for b in fake.seen] == [None, "org/default", "org/mapped", "small"]
    assert "max_tokens" not in fake.seen[0]


def test_the_model_key_is_validated():
    def cfg(**keys):
        return parse_config({"upstreams": [{"name": "v", "type": "openai", "base_url": "http://h/v1", **keys}]})

    assert cfg(model="org/default").upstreams[0].options["model"] == "org/default"
    assert cfg().upstreams[0].options["model"] is None
    for bad in ("", 3):
        with pytest.raises(ConfigError, match=r"upstreams\[0\]\.model: expected"):
            cfg(model=bad)


def test_unreachable_upstream():
    """The client heard the URL, password and all ("cannot reach http://admin:S3cret@..."); now it hears the
    upstream's name and why, and the log (the cause) gets the URL with its userinfo masked."""
    async def go():
        up = OpenAIUpstream("gone", base_url="http://admin:S3cret@127.0.0.1:9/v1", connect_timeout_s=1)
        try:
            await up.generate(REQ, lambda s: None)
        finally:
            await up.close()

    with pytest.raises(RequestError) as info:
        run(go())
    assert info.value.code == ErrorCode.UPSTREAM_ERROR
    assert str(info.value) == "upstream 'gone': cannot reach the server: connection refused"
    logged = str(info.value.__cause__)  # what the daemon logs after the client's message
    assert logged.startswith("http://***@127.0.0.1:9/v1/chat/completions: Cannot connect") and "S3cret" not in logged


def test_a_connect_timeout_is_no_first_token_timeout():
    """A TLS handshake (or a TCP connect) that never completes hit aiohttp's sock_connect timeout, whose
    exception is a TimeoutError too: it was reported as "no response within 20.3 s" after 0.3 s."""
    async def go():
        accepted: list[asyncio.StreamWriter] = []
        # accepts, never speaks TLS (what it accepted is closed at the end: left open, the garbage collector found it
        # in a later test)
        silent = await asyncio.start_server(lambda r, w: accepted.append(w), "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        up = OpenAIUpstream("tls", base_url=f"https://127.0.0.1:{port}/v1", connect_timeout_s=0.3,
                            first_token_timeout_s=20)
        try:
            await up.generate(REQ, lambda s: None)
        finally:
            await up.close()
            silent.close()
            for writer in accepted:
                writer.close()
            await silent.wait_closed()

    with pytest.raises(RequestError) as info:
        run(go(), timeout=10)
    assert info.value.code == ErrorCode.UPSTREAM_TIMEOUT  # a timeout, with its own words
    assert str(info.value) == "upstream 'tls': cannot connect within 0.3 s"


@pytest.mark.parametrize("pad", [0, 242], ids=["short", "key_across_the_cut"])  # the key at 270 of 300
def test_credentials_the_upstream_echoes_are_redacted(fake, monkeypatch, pad):
    """A proxy saying "invalid credentials: Bearer sk-..." sent the daemon's own key to every client and into
    the log; the key, long extra_headers values and base_url's password (and its Basic form) are redacted,
    before the message is cut at 300 characters (a key across the cut kept its start)."""
    monkeypatch.setenv("TEST_KEY", "sk-live-" + "0123456789" * 4)
    with pytest.raises(RequestError) as info:
        generate(fake, f"echo401:{pad}", api_key_env="TEST_KEY", extra_headers={"X-Token": "tenant-secret-42"})
    text = str(info.value)
    assert info.value.code == ErrorCode.UPSTREAM_ERROR and "HTTP 401: " in text
    assert "sk-live" not in text and "tenant-secret" not in text
    if not pad:
        assert text.endswith("invalid credentials: Bearer [redacted] [redacted]")
        with pytest.raises(RequestError) as basic:
            generate(fake, "echo401:0", userinfo="admin:S3cret-pass@", extra_headers={"X-Token": "S3cret-pass"})
        assert str(basic.value).endswith("invalid credentials: Basic [redacted] [redacted]")


def test_credentials_in_the_url_and_an_authorization_header_do_not_mix(fake, tmp_path):
    """aiohttp refuses user:password@ in the URL together with an Authorization header: every request failed
    with its ValueError traceback while config check said ok. The config refuses it, and any such refusal
    by aiohttp is a typed error (one log line), not a traceback."""
    def cfg(**keys):
        return parse_config({"upstreams": [{"name": "v", "type": "openai", "base_url": "http://u:p@h/v1", **keys}]})

    key = tmp_path / "key"
    key.write_text("sk-file\n")
    for keys, named in [({"api_key_env": "TEST_KEY"}, "api_key_env"), ({"api_key_file": str(key)}, "api_key_file"),
                        ({"extra_headers": {"authorization": "Bearer x"}}, "extra_headers.authorization")]:
        with pytest.raises(ConfigError, match=rf"upstreams\[0\]: base_url has credentials .* so does {named};"):
            cfg(**keys)
    assert cfg(extra_headers={"X-Tenant": "a"}).upstreams[0].options["base_url"] == "http://u:p@h/v1"
    with pytest.raises(RequestError) as info:
        generate(fake, "ok", userinfo="u:p@", extra_headers={"Authorization": "Bearer x"})
    assert info.value.code == ErrorCode.UPSTREAM_ERROR
    assert str(info.value) == "upstream 'vllm': the request could not be sent (ValueError)"
    assert "Cannot combine AUTHORIZATION header" in str(info.value.__cause__) and fake.seen == []


def test_an_api_key_env_with_a_line_break_fails_config_check(monkeypatch):
    """Only the key file was checked at load: a two-line key in the variable passed config check and the daemon
    started, then failed every request. A variable unset when the config is loaded is not checked."""
    def cfg():
        return parse_config({"upstreams": [{"name": "v", "type": "openai", "base_url": "http://h/v1",
                                            "api_key_env": "TW_TEST_KEY"}]})

    monkeypatch.delenv("TW_TEST_KEY", raising=False)
    assert cfg().upstreams[0].options["api_key_env"] == "TW_TEST_KEY"
    monkeypatch.setenv("TW_TEST_KEY", "sk-one\nsk-two")
    with pytest.raises(ConfigError, match=r"upstreams\[0\]\.api_key_env: the key in \$TW_TEST_KEY contains a line"):
        cfg()


def test_a_stall_after_the_finish_reason_ends_the_answer(fake):
    """A server that sent finish_reason "stop" and then neither [DONE] nor the end of the body: the whole answer
    had come, yet it failed as "the stream stalled". Now it ends with that reason, the connection closed."""
    async def go():
        runner, port = await _serve(fake)
        up = OpenAIUpstream("vllm", base_url=f"http://127.0.0.1:{port}/v1", **FAST)
        out: list[str] = []
        try:
            reason = await up.generate(REQ, out.append)
            await asyncio.wait_for(fake.hung_up.wait(), 5)  # closed by generate, not by the session's close
            return out, reason
        finally:
            await up.close()
            await runner.cleanup()

    fake.mode = "finish_hold"
    assert run(go(), timeout=30) == (["Hello"], "stop")


def test_after_the_finish_reason_the_answer_ends_soon_and_its_reason_is_printable(fake, monkeypatch):
    """A whole answer held open by its server ended only a stall timeout later (30 s by default), counted all
    that time against max_live_answers; a finish reason with a lone surrogate could not be sent to clients.
    (FINISHED_GRACE_S, 2 s, shortened here: the wait it bounds is what is checked, not its length.)"""
    from tokenwire.daemon import upstream_openai

    monkeypatch.setattr(upstream_openai, "FINISHED_GRACE_S", 0.3)

    async def go():
        runner, port = await _serve(fake)
        up = OpenAIUpstream("vllm", base_url=f"http://127.0.0.1:{port}/v1", stall_timeout_s=120)
        try:
            return await up.generate(REQ, lambda s: None)
        finally:
            await up.close()
            await runner.cleanup()

    fake.mode = "finish_hold_odd"
    reason = run(go(), timeout=30)  # FINISHED_GRACE_S (0.3 s here) after the finish_reason, not 120 s
    assert reason == "st\\udc80op\\x1b[2J" and reason.isprintable()


@contextlib.contextmanager
def daemon_on(fake: FakeOpenAI, tmp_path, upstream_keys: str = "", extra_toml: str = ""):
    """The daemon subprocess with one ``openai`` upstream: ``fake``, served from a thread of its own."""
    from .daemon_proc import DaemonProcess

    loop = asyncio.new_event_loop()
    runner, port = loop.run_until_complete(_serve(fake))
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    d = None
    try:
        d = DaemonProcess(
            tmp_path,
            extra_toml,
            upstream_toml=f"""
[[upstreams]]
name = "vllm"
type = "openai"
base_url = "http://127.0.0.1:{port}/v1"
{upstream_keys}
[[routes]]
model = "*"
upstream = "vllm"
""",
        )
        yield d
    finally:
        if d is not None:
            d.stop()
        # the fake's listening socket and the loop closed: left open, the garbage collector found them in a later test
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        loop.close()


def test_daemon_routes_to_openai_upstream_and_reports_errors(tmp_path, fake):
    """End to end: the daemon subprocess streams from the fake server; its failures reach the client typed."""
    from tokenwire.transport.client import connect
    from tokenwire.transport.errors import RemoteError

    with daemon_on(fake, tmp_path, "stall_timeout_s = 0.5") as d:

        async def go():
            async with connect("127.0.0.1", d.port, **d.client_kwargs()) as conn:
                ok = await conn.chat("hi", model="small").collect()
                fake.mode = "stall"
                with pytest.raises(RemoteError) as stalled:
                    await conn.chat("hi", model="small").collect()
                fake.mode = "http500"
                with pytest.raises(RemoteError) as failed:
                    await conn.chat("hi", model="small").collect()
                fake.mode = "ok"
                again = await conn.chat("hi", model="small").collect()
                return ok, stalled.value, failed.value, again

        ok, stalled, failed, again = run(go())
        assert ok == again == "Hello, world"
        assert stalled.code == ErrorCode.UPSTREAM_TIMEOUT
        assert failed.code == ErrorCode.UPSTREAM_ERROR and "model overloaded" in str(failed)
        log = d.log()  # the operator sees each failure too, with the id the client was given
        assert "upstream 'vllm': HTTP 500" in log and "model overloaded" in log
        assert "upstream 'vllm': the stream stalled" in log, log


def test_daemon_logs_the_upstreams_words_on_one_printable_line(tmp_path, fake):
    """The upstream's error message went into the text log as it was: a line break in it forged a log line and
    escape sequences reached the operator's terminal."""
    from tokenwire.transport.client import connect
    from tokenwire.transport.errors import RemoteError

    fake.mode = "forge"
    with daemon_on(fake, tmp_path) as d:

        async def go():
            async with connect("127.0.0.1", d.port, **d.client_kwargs()) as conn:
                with pytest.raises(RemoteError, match="boom"):
                    await conn.chat("hi", model="small").collect()

        run(go())
        log = d.log()
    assert "\x1b" not in log and not any("FORGED" in line and "boom" not in line for line in log.splitlines())
    assert "HTTP 500: boom\\n2026-12-05 10:00:00,000 CRITICAL tokenwire.daemon: FORGED\\x1b[2J" in log, log


def test_daemon_sends_the_clamped_max_tokens_and_the_default_model(tmp_path, fake):
    """The upstream got the client's max_tokens unclamped (vLLM refuses one past the context with a 400); a
    client that names none sends none (the daemon's cap still cuts), and a nameless request gets ``model``."""
    from tokenwire.transport.client import connect

    with daemon_on(fake, tmp_path, 'model = "org/default"', "[limits]\nmax_tokens = 1000\n") as d:

        async def go():
            async with connect("127.0.0.1", d.port, **d.client_kwargs()) as conn:
                await conn.chat("hi", model="small", max_tokens=100_000).collect()
                await conn.chat("hi", max_tokens=20).collect()
                await conn.chat("hi").collect()

        run(go())
    assert [(b.get("model"), b.get("max_tokens")) for b in fake.seen] == [
        ("small", 1000), ("org/default", 20), ("org/default", None)]


def test_an_https_upstream_behind_a_private_ca_is_trusted_through_ca_file(fake, tmp_path):
    """A vLLM with its own CA was refused at every request ("certificate is not trusted") and no setting could
    say otherwise: ca_file names the CAs to trust. A file that holds no certificate is a config error."""
    import ssl

    from tokenwire.transport.tls import make_self_signed

    pair = make_self_signed(("127.0.0.1",))
    pair.write(tmp_path / "up.pem", tmp_path / "up.key")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(tmp_path / "up.pem", tmp_path / "up.key")

    async def ask(**opts):
        runner, port = await _serve(fake, server_tls)
        up = OpenAIUpstream("private", base_url=f"https://127.0.0.1:{port}/v1", **opts)
        got: list[str] = []
        try:
            return await up.generate(REQ, got.append), "".join(got)
        finally:
            await up.close()
            await runner.cleanup()

    reason, text = run(ask(ca_file=tmp_path / "up.pem"), timeout=20)
    assert reason == "stop" and text
    with pytest.raises(RequestError, match="TLS certificate is not trusted"):
        run(ask(), timeout=20)  # the system's trust store does not know it

    (tmp_path / "junk.pem").write_text("not a certificate\n")

    def config(url, ca):
        return parse_config({"upstreams": [{"name": "v", "type": "openai", "base_url": url, "ca_file": str(ca)}]})

    with pytest.raises(ConfigError, match=r"upstreams\[0\]\.ca_file: .*junk.pem: no PEM certificate"):
        config("https://h/v1", tmp_path / "junk.pem")
    with pytest.raises(ConfigError, match=r"ca_file: only for an https:// base_url"):
        config("http://h/v1", tmp_path / "up.pem")
    assert config("https://h/v1", tmp_path / "up.pem").upstreams[0].options["ca_file"] == tmp_path / "up.pem"
