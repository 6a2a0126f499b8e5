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


def test_half_sent_requests_are_dropped_and_connections_capped(monkeypatch, caplog):
    """Half-sent requests were held for ever: 300 of them held 300 file descriptors (the daemon's fd limit,
    within reach of anyone who can reach the port). Now a connection must complete a request within
    REQUEST_DEADLINE_S, and over MAX_CONNECTIONS the oldest that has not goes (not the newest: reopened idle
    connections would keep a scraper out); a served keep-alive connection stays, a 404's too."""
    from tokenwire.daemon import telemetry

    monkeypatch.setattr(telemetry, "REQUEST_DEADLINE_S", 0.4)
    monkeypatch.setattr(telemetry, "MAX_CONNECTIONS", 4)

    async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
        try:
            return await asyncio.wait_for(reader.read(), seconds) == b""
        except TimeoutError:
            return False

    async def ask(conn, path: bytes) -> bytes:
        conn[1].write(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(conn[0].readuntil(b"\r\n\r\n"), 5)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await conn[0].readexactly(length)  # the body: the next response starts after it
        return head

    async def go():
        runner = await serve_metrics(Metrics(), "127.0.0.1", 0, lambda: True)
        try:
            port = runner.addresses[0][1]
            scraper = await asyncio.open_connection("127.0.0.1", port)
            lost = await asyncio.open_connection("127.0.0.1", port)  # asks for a path that is not there
            heads = [await ask(scraper, b"/healthz"), await ask(lost, b"/nothing")]
            slow = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            for _, w in slow:
                w.write(b"GET /metrics HTTP/1.1\r\nHo")  # and nothing more
            await asyncio.sleep(0.05)
            newest = await asyncio.open_connection("127.0.0.1", port)  # the fifth: over the cap
            first_slow_went = await closed_within(slow[0][0], 0.3)  # the oldest unserved one made room
            heads.append(await ask(newest, b"/healthz"))  # the newcomer was not the one closed
            rest_went = await closed_within(slow[1][0], 2)  # unserved past the deadline
            heads += [await ask(scraper, b"/healthz"), await ask(lost, b"/nothing")]  # served: kept alive
            extra = await asyncio.open_connection("127.0.0.1", port)
            heads.append(await ask(extra, b"/healthz"))
            # every connection served now (4 of 4): a fifth closes the one idle longest (newest), not itself
            fifth = await asyncio.open_connection("127.0.0.1", port)
            heads.append(await ask(fifth, b"/healthz"))
            idlest_went = await closed_within(newest[0], 0.3)
            for _, w in [scraper, lost, *slow, newest, extra, fifth]:
                w.close()
            return heads, first_slow_went, rest_went, idlest_went
        finally:
            await runner.cleanup()

    with caplog.at_level(logging.WARNING):
        heads, first_slow_went, rest_went, idlest_went = asyncio.run(go())
    # a transport closed inside aiohttp's connection_made failed its handler's task: an ERROR and a traceback
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    ok, missing = b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found"
    assert [h.split(b"\r\n")[0] for h in heads] == [ok, missing, ok, ok, missing, ok, ok]
    assert first_slow_went and rest_went and idlest_went
