"""The daemon's metrics HTTP server (aiohttp) on the event loop."""

from __future__ import annotations

import asyncio
import logging

from tokenwire.daemon.telemetry import Metrics, serve_metrics


async def _request(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


def test_a_malformed_request_is_one_warning_line_and_the_server_keeps_serving(caplog):
    """aiohttp logged each one at ERROR with a ten-line traceback (a port scan filled the journal)."""

    async def go():
        runner = await serve_metrics(Metrics(), "127.0.0.1", 0, lambda: True)
        try:
            port = runner.addresses[0][1]
            bad = await _request(port, b"GET /metrics HTTP/1.1\r\n\r\n")  # HTTP/1.1 without Host
            good = await _request(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return bad, good
        finally:
            await runner.cleanup()

    with caplog.at_level(logging.INFO):
        bad, good = asyncio.run(go())
    assert bad.startswith(b"HTTP/1.0 400") and good.startswith(b"HTTP/1.1 200")
    assert b"tokenwire_sessions_open" in good
    records = [r for r in caplog.records if "Host" in r.getMessage()]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING and records[0].exc_info is None
    assert "Missing 'Host' header" in records[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
