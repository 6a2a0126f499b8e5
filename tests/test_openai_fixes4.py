"""The ``openai`` upstream as a probe found it: a request landing as the server closed an idle kept connection
failed; a SIGHUP was refused for an upstream file missing for a moment (a revoked token stayed valid); a ca_file
renewed in place was never read again; a JSON answer's stall bound capped its whole body; a FIFO as api_key_file
froze the daemon; messages that said "ClientConnectorError", showed Python reprs or named no URL or limit; and a
base_url in capitals, or ending in /chat/completions, and an Authorization header beside a key source."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
import ssl
import struct
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tokenwire.daemon import upstream_config, upstream_openai
from tokenwire.daemon.config import ConfigError, load_config, parse_config
from tokenwire.daemon.reload_decisions import upstream_file_warnings
from tokenwire.daemon.upstream_config import upstream_file_problems
from tokenwire.daemon.upstream_openai import KEEPALIVE_S, OpenAIUpstream, _stale
from tokenwire.transport.errors import ErrorCode, RequestError
from tokenwire.transport.tls import make_self_signed

from .test_loopback import run
from .test_openai_upstream import FAST, REQ, FakeOpenAI, _serve, chunk, generate

ANSWER = (f"data: {json.dumps(chunk('Hi', finish='stop'))}\n\ndata: [DONE]\n\n").encode()

# what a raw server does with one request: ("answer",) answers it and keeps the connection; ("close",) reads it
# and closes (FIN); ("partial",) reads it, sends the start of a status line and closes; ("reset",) reads it and
# resets the connection (RST)
Script = list[str]


class RawServer:
    """An HTTP/1.1 server speaking bytes, so that a connection can be closed exactly where a test needs: each new
    connection takes the next script of ``scripts`` (the last one repeats), one action per request on it."""

    def __init__(self, scripts: list[Script]) -> None:
        self.scripts = scripts
        self.connections = 0
        self.requests: list[tuple[int, str]] = []  # (connection number, action) per request read

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        script = self.scripts[min(number, len(self.scripts)) - 1]
        try:
            for action in script:
                if not await self._read_request(reader):
                    return
                self.requests.append((number, action))
                if action == "answer":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                 b"Content-Length: %d\r\n\r\n" % len(ANSWER) + ANSWER)
                    await writer.drain()
                    continue
                if action == "partial":
                    writer.write(b"HTTP/1.1 2")
                    await writer.drain()
                if action == "reset":
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                break
            await asyncio.sleep(0)  # nothing more: the connection closes (FIN)
        finally:
            writer.close()

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader) -> bool:
        line = await reader.readline()
        if not line:
            return False
        length = 0
        while (header := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = header.decode().partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        await reader.readexactly(length)
        return True


async def _with_raw(server: RawServer, body: Callable[[OpenAIUpstream], Awaitable[object]], **opts) -> object:
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    up = OpenAIUpstream("vllm", base_url=f"http://127.0.0.1:{port}/v1", **opts)
    try:
        return await body(up)
    finally:
        await up.close()
        srv.close()


async def _ask(up: OpenAIUpstream) -> str:
    got: list[str] = []
    await up.generate(REQ, got.append)
    return "".join(got)


async def _ask_twice(up: OpenAIUpstream) -> tuple[str, str | RequestError]:
    first = await _ask(up)
    try:
        return first, await _ask(up)
    except RequestError as exc:
        return first, exc


# ------------------------------------------------------------------------------- 1. a stale kept connection
def test_a_request_on_a_kept_connection_the_server_closed_is_sent_again_on_a_new_one():
    """The server closes its idle kept connection as the next request is sent on it (uvicorn after 5 s, while
    aiohttp kept connections 15 s): 10 of 150 requests failed "cannot reach the server". It is sent once more, on
    a new connection."""
    server = RawServer([["answer", "close"], ["answer"]])
    first, second = run(_with_raw(server, _ask_twice), timeout=30)
    assert first == second == "Hi"
    assert server.requests == [(1, "answer"), (1, "close"), (2, "answer")]


@pytest.mark.parametrize(("action", "words"), [
    ("partial", "the connection was closed by the server before its answer's headers were complete"),
    ("reset", "the connection was closed by the server before it answered"),
])
def test_a_kept_connection_closed_after_an_answer_may_have_started_is_not_sent_again(action, words):
    """Never again once a byte of an answer may have come: a partial status line, or a reset (which does not say
    whether bytes came before it). Each was "cannot reach the server", of a server that had been reached."""
    server = RawServer([["answer", action], ["answer"]])
    first, second = run(_with_raw(server, _ask_twice), timeout=30)
    assert first == "Hi" and isinstance(second, RequestError)
    assert second.code == ErrorCode.UPSTREAM_ERROR and str(second) == f"upstream 'vllm': {words}"
    assert server.requests == [(1, "answer"), (1, action)]  # asked once


def test_a_new_connection_closed_before_the_answer_is_not_sent_again_and_hints_at_https():
    """Not a stale kept connection: the server took the request and hung up (as a TLS server does on plain
    HTTP). Said so, with the scheme to check, where it was "cannot reach the server: ServerDisconnectedError"."""
    server = RawServer([["close"]])
    with pytest.raises(RequestError) as info:
        run(_with_raw(server, _ask), timeout=30)
    assert str(info.value) == ("upstream 'vllm': the connection was closed by the server before it answered (if "
                               "it serves HTTPS, base_url must say https://)")
    assert server.requests == [(1, "close")]


def test_a_request_that_could_not_be_written_on_a_kept_connection_counts_as_stale():
    """The probe's case ("Can not write request body"): the request never reached the server whole. A reset
    while waiting for the answer, a partial answer, or a new connection do not count."""
    written = aiohttp.ClientOSError(errno.EPIPE, "Can not write request body for http://h/v1/chat/completions")
    assert _stale(written, reused=True) and not _stale(written, reused=False)
    assert _stale(aiohttp.ServerDisconnectedError(), reused=True)
    assert not _stale(aiohttp.ClientOSError(errno.ECONNRESET, "Connection reset by peer"), reused=True)
    assert not _stale(aiohttp.ServerDisconnectedError(), reused=False)


def test_kept_connections_are_dropped_before_common_servers_drop_them():
    """aiohttp kept an idle connection 15 s; uvicorn (vLLM) closes it after 5 s."""
    async def connector_keepalive(up: OpenAIUpstream) -> float:
        connector = up._pooled().connector
        assert isinstance(connector, aiohttp.TCPConnector)
        return float(connector._keepalive_timeout)  # type: ignore[attr-defined]  # (aiohttp keeps it private)

    up = OpenAIUpstream("vllm", base_url="http://127.0.0.1:9/v1")
    assert run(connector_keepalive(up), timeout=10) == KEEPALIVE_S < 5.0


# ------------------------------------------------------------------------------- 2. upstream files at SIGHUP
ALICE, BOB = "alice-token-fixes4-0123456789", "bob-token-fixes4-0123456789"


def _tokens(*names_and_tokens: tuple[str, str]) -> str:
    import hashlib

    return "".join(f'[[auth.tokens]]\nname = "{n}"\nsha256 = "{hashlib.sha256(t.encode()).hexdigest()}"\n'
                   for n, t in names_and_tokens)


def _daemon_file(tmp_path: Path, upstream_keys: str, tokens: str) -> Path:
    path = tmp_path / "tokenwire.toml"
    path.write_text('[server]\nlisten = ["127.0.0.1:0"]\n[metrics]\nlisten = ""\n'
                    f'[[upstreams]]\nname = "vllm"\ntype = "openai"\n{upstream_keys}'
                    '[[routes]]\nmodel = "*"\nupstream = "vllm"\n' + tokens)
    return path


def _daemon(path: Path):
    from tokenwire.daemon.service import Daemon

    from .test_daemon_reload import _Notes

    notes = _Notes()
    return Daemon(load_config(path), notifier=notes), notes  # type: ignore[arg-type]


@pytest.mark.parametrize("broken", ["api_key_file missing", "ca_file missing", "ca_file junk"])
def test_a_reload_revokes_a_token_though_an_upstream_file_is_missing_or_bad(tmp_path, caplog, broken):
    """A key rotation in progress (the file briefly absent) refused the SIGHUP that revoked bob's token, though
    upstream settings are never applied at a reload: bob stayed in. Now the reload applies, and warns."""
    key, ca = tmp_path / "key.txt", tmp_path / "ca.pem"
    key.write_text("sk-test\n")
    make_self_signed(("127.0.0.1",)).write(ca, tmp_path / "ca.key")
    keys = f'base_url = "https://127.0.0.1:1/v1"\napi_key_file = "{key}"\nca_file = "{ca}"\n'
    path = _daemon_file(tmp_path, keys, _tokens(("alice", ALICE), ("bob", BOB)))
    d, notes = _daemon(path)
    if broken == "api_key_file missing":
        key.unlink()
    elif broken == "ca_file missing":
        ca.unlink()
    else:
        ca.write_text("junk\n")
    _daemon_file(tmp_path, keys, _tokens(("alice", ALICE)))
    with caplog.at_level(logging.WARNING, logger="tokenwire.daemon"):
        assert d.reload() is True
    assert [t.name for t in d.config.auth.tokens] == ["alice"]
    assert notes.sent[-1][1].startswith("reloaded")
    warned = "\n".join(r.getMessage() for r in caplog.records)
    if broken == "api_key_file missing":
        assert (f"reload: upstreams[0].api_key_file: {key} does not exist: upstream 'vllm' reads it at each request"
                in warned)
    else:  # the upstream's reread says it, once
        assert warned.count(f"reload: upstream 'vllm': ca_file {ca}") == 1 and "kept" in warned
        assert d.status_line().startswith("TLS files refused at the last reload")
    # at start and in `config check` (the same load) they stay errors
    with pytest.raises(ConfigError, match=r"upstreams\[0\]\.(api_key_file|ca_file): "):
        load_config(path)


def test_reload_warnings_name_a_new_path_as_a_restarts_problem(tmp_path):
    """A changed path is a restart's (its upstream runs on the old one); the running key file is read at each
    request; the running ca_file is the upstream's own reread to report."""
    base = {"name": "vllm", "type": "openai", "base_url": "https://h/v1"}
    running = parse_config({"upstreams": [{**base, "api_key_file": str(tmp_path / "k"),
                                           "ca_file": str(tmp_path / "c")}]}, tls_may_be_missing=True)
    moved = parse_config({"upstreams": [{**base, "api_key_file": str(tmp_path / "k2"),
                                         "ca_file": str(tmp_path / "c")}]}, tls_may_be_missing=True)
    assert upstream_file_warnings(running, upstream_file_problems(running)) == [
        f"reload: upstreams[0].api_key_file: {tmp_path / 'k'} does not exist: upstream 'vllm' reads it at each "
        "request, which fails until it is fixed; a restart would refuse it"]
    assert upstream_file_warnings(running, upstream_file_problems(moved)) == [
        f"reload: upstreams[0].api_key_file: {tmp_path / 'k2'} does not exist: a restart would refuse it "
        "(upstreams change only at a restart)"]


# ------------------------------------------------------------------------------- 3. ca_file renewed in place
def test_sighup_rereads_a_ca_file_renewed_in_place_and_keeps_the_running_one_when_bad(tmp_path, caplog):
    """The SSL context was built once: after the upstream's certificate and the CA bundle were renewed in place,
    every request was "not trusted" until a restart."""
    cert, key, ca = tmp_path / "up.pem", tmp_path / "up.key", tmp_path / "ca.pem"
    make_self_signed(("127.0.0.1",)).write(cert, key)
    ca.write_bytes(cert.read_bytes())
    fake = FakeOpenAI()

    async def go() -> None:
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(cert, key)
        runner, port = await _serve(fake, server_tls)
        path = _daemon_file(tmp_path, f'base_url = "https://127.0.0.1:{port}/v1"\nca_file = "{ca}"\n', "")
        d, _ = _daemon(path)
        up = d.upstreams["vllm"]
        try:
            assert await up.generate(REQ, lambda _: None) == "stop"
            make_self_signed(("127.0.0.1",)).write(cert, key)  # renewed: new key, new certificate
            server_tls.load_cert_chain(cert, key)  # (the server's new handshakes serve it)
            await up.close()  # (no kept connection: each request below makes a handshake)
            with pytest.raises(RequestError, match="not trusted"):
                await up.generate(REQ, lambda _: None)
            ca.write_bytes(cert.read_bytes())  # the bundle renewed in place
            assert d.reload() is True
            await up.close()
            assert await up.generate(REQ, lambda _: None) == "stop"
            ca.write_text("junk\n")  # a bad bundle: logged, the running one kept
            with caplog.at_level(logging.WARNING, logger="tokenwire.daemon"):
                assert d.reload() is True
            assert f"reload: upstream 'vllm': ca_file {ca}: no PEM certificate in it" in caplog.text
            await up.close()
            assert await up.generate(REQ, lambda _: None) == "stop"
        finally:
            await up.close()
            await runner.cleanup()

    run(go(), timeout=60)


# ------------------------------------------------------------------------------- 4. a JSON answer's stall
class TrickledJSON:
    """A whole JSON completion sent a few bytes at a time: ``pieces`` writes, one every ``every_s``."""

    def __init__(self, pieces: int, every_s: float) -> None:
        self.pieces, self.every_s = pieces, every_s

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        doc = json.dumps({"object": "chat.completion", "choices": [
            {"index": 0, "message": {"content": "slow but steady"}, "finish_reason": "stop"}]}).encode()
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(doc)
        await resp.prepare(request)
        step = -(-len(doc) // self.pieces)
        for i in range(0, len(doc), step):
            await resp.write(doc[i:i + step])
            await asyncio.sleep(self.every_s)
        return resp


def test_a_json_answer_still_coming_is_not_cut_by_the_stall_bound():
    """``stall_timeout_s`` capped the whole non-streamed body, and the message said "stalled" of an answer that
    never stopped coming: now each read is due within it of the last, as a stream's tokens are. (The pieces
    come 0.1 s apart, far inside the 1 s bound, for 2 s in all.)"""
    server = TrickledJSON(pieces=20, every_s=0.1)

    async def go() -> tuple[str, list[str]]:
        runner, port = await _serve(server)  # type: ignore[arg-type]  # (any object with .handle)
        up = OpenAIUpstream("vllm", base_url=f"http://127.0.0.1:{port}/v1", stall_timeout_s=1.0)
        got: list[str] = []
        try:
            return await up.generate(REQ, got.append), got
        finally:
            await up.close()
            await runner.cleanup()

    assert run(go(), timeout=30) == ("stop", ["slow but steady"])


# ------------------------------------------------------------------------------- 5. the API key file
def test_a_fifo_as_the_api_key_file_is_refused_without_blocking_the_daemon(tmp_path):
    """open() of a FIFO waits for a writer: at each request, on the event loop (healthz timed out; the watchdog
    would have killed the daemon). It is opened without blocking and refused as no regular file."""
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)
    outcome: list[BaseException | object] = []

    def ask() -> None:
        try:
            outcome.append(generate(FakeOpenAI(), "ok", api_key_file=fifo))
        except BaseException as exc:  # (handed to the test's thread)
            outcome.append(exc)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():  # blocked in open(): release it, so that the test fails rather than hangs
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(20)
        pytest.fail("reading the API key file blocked on a FIFO")
    [exc] = outcome
    assert isinstance(exc, RequestError) and exc.code == ErrorCode.UPSTREAM_ERROR
    assert str(exc) == "upstream 'vllm': the API key file is not a regular file"


def test_a_huge_api_key_file_is_refused(tmp_path):
    key = tmp_path / "key"
    key.write_bytes(b"x" * (upstream_config.KEY_FILE_LIMIT + 1))
    with pytest.raises(RequestError, match="the API key file is larger than 64 KiB"):
        generate(FakeOpenAI(), "ok", api_key_file=key)
    with pytest.raises(ConfigError, match=r"upstreams\[0\]\.api_key_file: .* is larger than 64 KiB"):
        parse_config({"upstreams": [{"name": "v", "type": "openai", "base_url": "http://h/v1",
                                     "api_key_file": str(key)}]})


def test_the_api_key_file_is_read_again_only_when_it_changed(tmp_path, monkeypatch):
    """Read at every request (an open and a read each time); now a stat, and a read when the file changed: a
    rewrite in place or a new file renamed into place is still taken up at the next request."""
    key = tmp_path / "key"
    reads: list[Path] = []
    real = upstream_openai.read_api_key

    def counted(path: Path) -> str:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(upstream_openai, "read_api_key", counted)
    # as for keys written long ago: a file changed in the last KEY_FILE_SETTLED_S is read at every request (a
    # same-size rewrite within a timestamp's tick would look unchanged), which the writes below all are
    monkeypatch.setattr(upstream_openai, "KEY_FILE_SETTLED_S", -1e12)
    key.write_text("sk-aaaa\n")
    fake = FakeOpenAI()

    async def go() -> list[str | None]:
        runner, port = await _serve(fake)
        up = OpenAIUpstream("vllm", base_url=f"http://127.0.0.1:{port}/v1", api_key_file=key)
        try:
            await up.generate(REQ, lambda _: None)
            await up.generate(REQ, lambda _: None)  # unchanged: not read
            key.write_text("sk-bbbbb\n")  # rewritten in place
            await up.generate(REQ, lambda _: None)
            new = tmp_path / "key.new"
            new.write_text("sk-ccccc\n")  # (the same size: a new inode)
            new.rename(key)  # renamed into place
            await up.generate(REQ, lambda _: None)
        finally:
            await up.close()
            await runner.cleanup()
        return [h.get("Authorization") for h in fake.headers]

    assert run(go(), timeout=30) == ["Bearer sk-aaaa", "Bearer sk-aaaa", "Bearer sk-bbbbb", "Bearer sk-ccccc"]
    assert len(reads) == 3


# ------------------------------------------------------------------------------- 6. messages
def test_an_https_base_url_on_a_plain_http_server_names_tls_and_the_scheme():
    """It said only "cannot reach the server: ClientConnectorError" (or ClientConnectorSSLError)."""
    async def go(serve: Callable[[], Awaitable[tuple[Callable[[], Awaitable[None]], int]]]) -> RequestError:
        stop, port = await serve()
        up = OpenAIUpstream("vllm", base_url=f"https://127.0.0.1:{port}/v1", **FAST)
        try:
            await up.generate(REQ, lambda _: None)
        except RequestError as exc:
            return exc
        finally:
            await up.close()
            await stop()
        raise AssertionError("answered")

    async def http_server() -> tuple[Callable[[], Awaitable[None]], int]:  # answers the ClientHello as HTTP: 400
        runner, port = await _serve(FakeOpenAI())
        return runner.cleanup, port

    async def hangs_up() -> tuple[Callable[[], Awaitable[None]], int]:  # reads the ClientHello and hangs up
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(100)
            writer.transport.abort()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)

        async def stop() -> None:
            srv.close()

        return stop, srv.sockets[0].getsockname()[1]

    answered = run(go(http_server), timeout=30)
    assert str(answered).startswith("upstream 'vllm': cannot reach the server: the TLS handshake failed (")
    assert str(answered).endswith("): does it speak plain HTTP? base_url says https://")
    hung_up = run(go(hangs_up), timeout=30)
    assert str(hung_up) == ("upstream 'vllm': cannot reach the server: the connection was closed during the TLS "
                            "handshake: does it speak plain HTTP? base_url says https://")


class FastAPIErrors:
    """FastAPI's error bodies: ``{"detail": "Not Found"}``, and validation errors as a list."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("model") == "missing":
            return web.json_response({"detail": [
                {"type": "missing", "loc": ["body", "messages", 0, "role"], "msg": "Field required", "input": {}},
                {"type": "float_type", "loc": ["body", "temperature"], "msg": "Input should be a valid number"}]},
                status=422)
        if body.get("model") == "odd":
            return web.json_response({"error": {"code": 5, "param": "x"}}, status=400)
        return web.json_response({"detail": "Not Found"}, status=404)


@pytest.mark.parametrize(("model", "text"), [
    ("small", "HTTP 404: Not Found"),
    ("missing", "HTTP 422: body.messages.0.role: Field required; body.temperature: Input should be a valid number"),
    ("odd", 'HTTP 400: {"code": 5, "param": "x"}'),
])
def test_error_bodies_are_text_not_python_reprs_and_the_log_gets_the_url(model, text):
    """``{"detail": "Not Found"}`` was shown as ``{'detail': 'Not Found'}``, and a list detail as a list's repr.
    The log line of an HTTP error named no URL (a connection's failure did): now it does, its userinfo masked."""
    async def go() -> RequestError:
        runner, port = await _serve(FastAPIErrors())  # type: ignore[arg-type]  # (any object with .handle)
        up = OpenAIUpstream("vllm", base_url=f"http://user:secret-pw@127.0.0.1:{port}/v1")
        try:
            await up.generate(REQ.__class__(**{**REQ.__dict__, "model": model}), lambda _: None)
        except RequestError as exc:
            return exc
        finally:
            await up.close()
            await runner.cleanup()
        raise AssertionError("answered")

    exc = run(go(), timeout=30)
    assert str(exc) == f"upstream 'vllm': {text}"
    detail = str(exc.__cause__)
    assert detail.startswith("http://***@127.0.0.1:") and "/v1/chat/completions: HTTP " in detail
    assert "secret-pw" not in detail


# ------------------------------------------------------------------------------- 7. the event line limit
def test_an_overlong_event_says_the_limit():
    """"event line too long" did not say how long is too long, nor that the bound is the daemon's."""
    with pytest.raises(RequestError) as info:
        generate(FakeOpenAI(), "raw:data: " + json.dumps(chunk("x" * 600_000)), **FAST)
    assert str(info.value) == ("upstream 'vllm': event line too long: over 512 KiB, the daemon's limit for one "
                               "server-sent event line")


# ------------------------------------------------------------------------------- 8. config
def _openai(**keys: object) -> dict[str, object]:
    return {"upstreams": [{"name": "v", "type": "openai", **keys}]}


@pytest.mark.parametrize(("url", "stored"), [
    ("HTTP://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
    ("Https://api.example.com/v1/", "https://api.example.com/v1"),
])
def test_a_base_url_scheme_in_capitals_is_a_scheme(url, stored):
    """Schemes are case-insensitive (RFC 3986): "HTTP://..." was refused as not an http(s):// URL."""
    assert parse_config(_openai(base_url=url)).upstreams[0].options["base_url"] == stored


@pytest.mark.parametrize("url", ["http://h:8000/v1/chat/completions", "http://h/v1/chat/completions/",
                                 "http://h/chat/completions"])
def test_a_base_url_ending_in_chat_completions_is_refused(url):
    """Requests went to .../chat/completions/chat/completions (a 404 each)."""
    with pytest.raises(ConfigError, match=r"upstreams\[0\]\.base_url: ends in /chat/completions, which the upstream "
                                          r"appends itself: give the API's root \(path /"):
        parse_config(_openai(base_url=url))


@pytest.mark.parametrize("header", ["Authorization", "authorization"])
@pytest.mark.parametrize("source", ["api_key_env", "api_key_file"])
def test_an_authorization_header_beside_a_key_source_is_refused(tmp_path, header, source):
    """The key's "Bearer KEY" silently replaced the header (or, spelt in lower case, both were sent)."""
    key = tmp_path / "key"
    key.write_text("sk-x\n")
    value = str(key) if source == "api_key_file" else "TW_FIXES4_UNSET"
    with pytest.raises(ConfigError, match=rf"upstreams\[0\]\.extra_headers\.{header}: {source} sends the "
                                          r"Authorization header too \(Bearer KEY\); use one of them"):
        parse_config(_openai(base_url="http://h/v1", extra_headers={header: "Bearer sk-other"}, **{source: value}))
    alone = parse_config(_openai(base_url="http://h/v1", extra_headers={header: "Bearer sk-other"}))
    assert alone.upstreams[0].options["extra_headers"] == {header: "Bearer sk-other"}
