"""Operator-facing log lines: repeated upstream failures and ingest stalls summed up (a line each flooded the
log), summaries held back written when the daemon stops, summaries that state the limit rather than a count read
a minute late, and the address of a handshake refused past the bound."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import pytest

from tokenwire.daemon import service
from tokenwire.daemon.config import parse_config
from tokenwire.daemon.generation import flush_failure_logs, generate_answer
from tokenwire.daemon.ingest import IngestConnection
from tokenwire.daemon.service import Daemon
from tokenwire.daemon.transcripts import LiveRequest
from tokenwire.daemon.upstream_openai import OpenAIUpstream
from tokenwire.transport.handshake_guard import REFUSALS_LOG_S
from tokenwire.transport.kv_server import KVServer
from tokenwire.transport.server import ChatRequest

from .test_handshake_limits import flooded, until, value
from .test_ingest_fixes4 import _api, _open
from .test_loopback import run


def _closed_port() -> int:
    """A port of this suite's range (59500-59999) with nothing listening on it: connections to it are refused."""
    for port in range(59500, 60000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 59500-59999")


def _lines(caplog: pytest.LogCaptureFixture, name: str, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == name and r.levelno >= level]


def test_failures_of_an_unreachable_upstream_are_one_line_then_a_summary(caplog):
    """100 chats to an unreachable upstream wrote 100 warnings in a second, each with aiohttp's "ssl:default" for
    a plain-HTTP server; now the first is a warning, the rest are summed up with the last reason."""
    caplog.set_level(logging.WARNING, "tokenwire.daemon")
    port = _closed_port()

    async def go() -> list[LiveRequest]:
        up = OpenAIUpstream("dead", base_url=f"http://127.0.0.1:{port}/v1")
        lives = []
        try:
            for i in range(5):
                live = LiveRequest(bytes([i]) * 16, None, 5, 0.0)
                chat = ChatRequest(messages=[{"role": "user", "content": "hi"}], model=None, max_tokens=5,
                                   params={}, scheme="chat", request_id=live.request_id)
                await asyncio.wait_for(generate_answer(live, up, chat, lambda n: None), 30)
                lives.append(live)
            lines = _lines(caplog, "tokenwire.daemon")
            assert len(lines) == 1, lines  # was one per request
            assert lines[0].startswith(f"request {bytes([0]).hex() * 16} failed: upstream 'dead': cannot reach")
            assert f"127.0.0.1:{port}" in lines[0] and "ssl:default" not in lines[0]
            assert "more failures of upstream 'dead' are counted" in lines[0]
            flush_failure_logs([up], time.monotonic() + 1)  # within the minute: nothing yet
            assert len(_lines(caplog, "tokenwire.daemon")) == 1
            flush_failure_logs([up], time.monotonic() + REFUSALS_LOG_S + 1)  # the housekeeping, a minute on
        finally:
            await up.close()
        return lives

    lives = run(go(), 60)
    assert all(live.error is not None for live in lives)  # each answer failed all the same
    lines = _lines(caplog, "tokenwire.daemon")
    assert len(lines) == 2, lines
    assert lines[1].startswith("4 more failures of upstream 'dead' in the last 6") and "connection refused" in lines[1]
    assert "ssl:default" not in lines[1]


def test_answers_stalled_on_one_ingest_connection_are_one_line_then_a_summary(caplog):
    """One connection may hold 1,024 open answers: each one's stall was a warning of its own."""
    caplog.set_level(logging.WARNING, "tokenwire.ingest")
    _, api = _api(stall_timeout_s=10)
    conn, other = IngestConnection(), IngestConnection()
    ids = [_open(api, conn, now=0) for _ in range(20)]
    mine = _open(api, other, now=0)
    assert api.expire_stalled(15) == 21
    lines = _lines(caplog, "tokenwire.ingest")
    assert len(lines) == 2, lines  # one per connection, not one per answer
    assert lines[0].startswith(f"ingest: request {ids[0]} failed") and mine in lines[1]
    assert api.disconnected(conn, 20) == 0  # its connection ends: what it held back is summed up
    lines = _lines(caplog, "tokenwire.ingest")
    assert len(lines) == 3 and lines[2].startswith(f"ingest: 19 more answers failed in the last 5 s on the "
                                                   f"application connection of request {ids[0]}: the application "
                                                   f"sent nothing for 10 s"), lines


def test_refusals_held_back_are_summed_up_when_the_daemon_stops(caplog):
    """3 wrong-token clients, then SIGTERM: one warning and no summary, while tokenwire_errors_total said 3.
    stop() writes what every log held back, the upstreams' and the ingest connections' included."""
    caplog.set_level(logging.INFO, "tokenwire")

    async def go() -> None:
        daemon = Daemon(parse_config({"server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": ""}}))
        await daemon.start()
        try:
            now = time.monotonic()
            held = [daemon.admission.auth_refusals.hold(now) for _ in range(3)]
            assert held == [False, True, True]  # (the first the caller logs)
            assert not daemon.metrics.malformed_http.hold(now) and daemon.metrics.malformed_http.hold(now)
        finally:
            await daemon.stop()

    run(go(), 30)
    lines = _lines(caplog, "tokenwire.daemon", logging.INFO)
    assert any(line.startswith("refused 2 more unauthorized clients in the last 0 s") for line in lines), lines
    assert any(line.startswith("metrics: 1 more malformed HTTP requests") for line in lines), lines


def test_summaries_state_the_limit_not_the_count_when_written():
    """"refused or closed 1 more KV connections in the last 60 s: 0 open (limits.max_sessions)": the count was read
    a minute after the refusals, when the connections had gone."""
    daemon = Daemon(parse_config({"metrics": {"listen": ""}, "limits": {"max_sessions": 4}}))
    chat_line = daemon.admission.session_refusals.summary(3, 60.0)
    assert chat_line == "refused 3 more connections in the last 60 s at the session limit (limits.max_sessions = 4)"
    kv = KVServer(provider=None, max_connections=lambda: 4)  # type: ignore[arg-type]
    assert kv.refusals.summary(1, 60.0) == ("refused or closed 1 more KV connections in the last 60 s at the "
                                           "connection limit (limits.max_sessions = 4)")


def test_a_handshake_refused_past_the_bound_names_its_address(caplog, monkeypatch):
    """"closing QUIC connection from ?: too many handshakes in progress": refused before its first datagram was
    read, the connection had no address yet."""
    caplog.set_level(logging.DEBUG, "tokenwire.transport")
    monkeypatch.setattr(service, "HANDSHAKE_TIMEOUT_S", 5.0)
    monkeypatch.setattr(Daemon, "retry_threshold", lambda self: 1000)  # the bound alone (no Retry)

    async def go() -> None:
        async with flooded(5, max_sessions=3) as (daemon, _):
            await until(lambda: value(daemon, "tokenwire_handshakes_refused_total", {"reason": "too_many"}) >= 2)

    run(go(), 30)
    lines = [line for line in _lines(caplog, "tokenwire.transport", logging.DEBUG)
             if line.endswith("too many handshakes in progress")]
    assert len(lines) == 2, lines
    assert all(line.startswith("closing QUIC connection from 127.0.0.1:") for line in lines), lines
