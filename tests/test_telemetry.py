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


def test_half_sent_requests_are_dropped_and_connections_capped(monkeypatch):
    """Half-sent requests were held for ever: 300 of them held 300 file descriptors (the daemon's fd limit,
    within reach of anyone who can reach the port). Now a connection must complete a request within
    REQUEST_DEADLINE_S, and at most MAX_CONNECTIONS are open; a scraper's keep-alive connection stays."""
    from tokenwire.daemon import telemetry

    monkeypatch.setattr(telemetry, "REQUEST_DEADLINE_S", 0.3)
    monkeypatch.setattr(telemetry, "MAX_CONNECTIONS", 3)

    async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
        try:
            return await asyncio.wait_for(reader.read(), seconds) == b""
        except TimeoutError:
            return False

    async def go():
        runner = await serve_metrics(Metrics(), "127.0.0.1", 0, lambda: True)
        try:
            port = runner.addresses[0][1]
            scraper = await asyncio.open_connection("127.0.0.1", port)  # served, then kept alive
            scraper[1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(scraper[0].readuntil(b"ok\n"), 5)
            slow = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            for _, w in slow:
                w.write(b"GET /metrics HTTP/1.1\r\nHo")  # and nothing more
            over = await asyncio.open_connection("127.0.0.1", port)  # the fourth: over the cap
            over_closed = await closed_within(over[0], 0.2)
            slow_closed = [await closed_within(r, 2) for r, _ in slow]
            scraper[1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # past the deadline: still served
            again = await asyncio.wait_for(scraper[0].readuntil(b"ok\n"), 5)
            for _, w in [scraper, *slow, over]:
                w.close()
            return head, over_closed, slow_closed, again
        finally:
            await runner.cleanup()

    head, over_closed, slow_closed, again = asyncio.run(go())
    assert head.startswith(b"HTTP/1.1 200") and again.startswith(b"HTTP/1.1 200")
    assert over_closed and slow_closed == [True, True]
