"""What a metrics audit found (session 34): traffic that is not HTTP at all on the metrics port (what a port scan
sends) went uncounted, though the docs promised each malformed request in a series."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tokenwire.daemon.telemetry import Metrics, serve_metrics

# a TLS ClientHello's first bytes, an SSH banner, NUL bytes, junk: aiohttp's "bad method" on a connection's first
# request, which it logs at DEBUG rather than through log_exception
NOT_HTTP = [b"\x16\x03\x01\x00\x05hello", b"SSH-2.0-OpenSSH_9.0\r\n", b"\x00" * 100, b"GARBAGE\r\n\r\n"]


async def _ask(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    answer = await reader.read(200)
    writer.close()
    return answer


def _malformed(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("tokenwire_metrics_malformed_requests_total", {})
    assert value is not None
    return value


def test_what_a_port_scan_sends_is_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()

    async def go() -> list[bytes]:
        runner = await serve_metrics(metrics, "127.0.0.1", 0, lambda: True)
        try:
            port = runner.addresses[0][1]
            answers = [await _ask(port, raw) for raw in NOT_HTTP]
            answers.append(await _ask(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
            return answers
        finally:
            await runner.cleanup()

    with caplog.at_level(logging.DEBUG, logger="tokenwire"):
        answers = asyncio.run(asyncio.wait_for(go(), 30))
    assert [a[:12] for a in answers[:-1]] == [b"HTTP/1.0 400"] * len(NOT_HTTP)
    assert answers[-1][:12] == b"HTTP/1.1 200"
    assert _malformed(metrics) == len(NOT_HTTP)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "malformed" in r.getMessage()]
    assert len(warned) == 1, warned  # the first; the others wait for the summary line
    assert "HTTPS traffic on an HTTP port" in warned[0], warned  # aiohttp's reason for a ClientHello
