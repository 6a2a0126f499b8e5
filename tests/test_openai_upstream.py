"""The ``openai`` upstream against a local HTTP server speaking the OpenAI streaming format."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from tokenwire.daemon.upstream_openai import OpenAIUpstream
from tokenwire.transport.errors import ErrorCode, RequestError
from tokenwire.transport.server import ChatRequest

from .test_loopback import run


def chunk(content=None, finish=None, index=0):
    delta = {} if content is None else {"content": content}
    return {"object": "chat.completion.chunk", "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}


class FakeOpenAI:
    """Serves /v1/chat/completions; ``mode`` selects the behaviour under test."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.seen: list[dict] = []
        self.headers: list[dict] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append(body)
        self.headers.append(dict(request.headers))
        if self.mode == "http500":
            return web.json_response({"error": {"message": "model overloaded", "type": "server_error"}}, status=500)
        if self.mode == "hang_before_headers":
            await asyncio.sleep(30)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(obj):
            await resp.write(f"data: {json.dumps(obj)}\n\n".encode())

        if self.mode.startswith("raw:"):  # one event line exactly as given, after a good first token
            await send(chunk("Hi"))
            await resp.write(self.mode[4:].encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            return resp
        if self.mode == "no_first_token":
            await resp.write(b": keep-alive comment\n\n")
            await asyncio.sleep(30)
        await send({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        for piece in ["Hel", "lo", ", wor", "ld"]:
            await send(chunk(piece))
            await send(chunk("IGNORED", index=1))  # other choices are not this answer
        if self.mode == "stall":
            await asyncio.sleep(30)
        if self.mode == "error_event":
            await send({"error": {"message": "context length exceeded"}})
            return resp
        if self.mode == "no_done":
            return resp
        await send(chunk(None, finish="length" if self.mode == "length" else "stop"))
        await send({"object": "chat.completion.chunk", "choices": [], "usage": {"completion_tokens": 4}})
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture
def fake():
    return FakeOpenAI()


async def _serve(fake: FakeOpenAI):
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.2, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
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


def generate(fake: FakeOpenAI, mode: str, tmp_path=None, **opts):
    fake.mode = mode

    async def go():
        runner, port = await _serve(fake)
        up = OpenAIUpstream("vllm", base_url=f"http://127.0.0.1:{port}/v1", **opts)
        out: list[str] = []
        try:
            reason = await up.generate(REQ, out.append)
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


def test_a_long_event_line_streams_intact_and_a_null_error_is_no_error(fake):
    out, reason = generate(fake, "raw:data: " + json.dumps({**chunk("x" * 300_000), "error": None}))
    assert out == ["Hi", "x" * 300_000] and reason == "stop"


def test_unreachable_upstream():
    async def go():
        up = OpenAIUpstream("gone", base_url="http://127.0.0.1:9/v1", connect_timeout_s=1)
        try:
            await up.generate(REQ, lambda s: None)
        finally:
            await up.close()

    with pytest.raises(RequestError) as info:
        run(go())
    assert info.value.code == ErrorCode.UPSTREAM_ERROR and "cannot reach" in str(info.value)
    assert "127.0.0.1:9" in str(info.value.__cause__)  # the detail the daemon logs (the client gets the class)


def test_daemon_routes_to_openai_upstream_and_reports_errors(tmp_path, fake):
    """End to end: the daemon subprocess streams from the fake server; its failures reach the client typed."""
    from tokenwire.transport.client import connect
    from tokenwire.transport.errors import RemoteError

    from .daemon_proc import DaemonProcess

    async def start_fake():
        return await _serve(fake)

    loop = asyncio.new_event_loop()
    _runner, port = loop.run_until_complete(start_fake())
    import threading

    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    d = DaemonProcess(
        tmp_path,
        upstream_toml=f"""
[[upstreams]]
name = "vllm"
type = "openai"
base_url = "http://127.0.0.1:{port}/v1"
stall_timeout_s = 0.5
[[routes]]
model = "*"
upstream = "vllm"
""",
    )
    try:

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
    finally:
        d.stop()
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
