"""Session 44's operator/hostile-client audit: the handshake deadline's close kept within the anti-amplification
limit (RFC 9000 8.1), refused requests logged through a flood limiter across connections, a DEBUG line per request
end, and client REPORTs counted only once the answer was sent whole."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from typing import Any

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from tokenwire.daemon import service
from tokenwire.daemon.config import parse_config
from tokenwire.daemon.service import Daemon
from tokenwire.transport.client import connect
from tokenwire.transport.frames import ALPN, Report
from tokenwire.transport.session_events import ClientReport

from .test_handshake_limits import until, value
from .test_hostile_clients import _daemon, _raw
from .test_loopback import run
from .test_session_refusals import _connected, _request


class _Heard(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[tuple[float, int]] = []

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.got.append((time.monotonic(), len(data)))


async def _initial_alone(port: int) -> tuple[asyncio.DatagramTransport, _Heard, int]:
    """A client's first flight sent to ``port`` from a socket that never answers (a spoofed victim's address): the
    socket, what it hears, and the bytes sent."""
    loop = asyncio.get_running_loop()
    transport, heard = await loop.create_datagram_endpoint(_Heard, local_addr=("127.0.0.1", 0))
    quic = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=[ALPN],
                                                          server_name="localhost"))
    quic.connect(("127.0.0.1", port), now=time.monotonic())
    sent = 0
    for data, _ in quic.datagrams_to_send(now=time.monotonic()):
        transport.sendto(data, ("127.0.0.1", port))
        sent += len(data)
    return transport, heard, sent


# -- F6: anti-amplification at the handshake deadline -------------------------------------------------------------

def test_a_handshake_deadline_sends_an_unvalidated_address_no_more_than_three_times_what_it_sent(monkeypatch):
    """One real 1200-B Initial from a source that never answers (a spoofed victim) got the 3 x 1200 B that RFC 9000
    8.1 allows, then at the handshake deadline a 161-B CONNECTION_CLOSE: 3,761 B, 3.13x."""
    monkeypatch.setattr(service, "HANDSHAKE_TIMEOUT_S", 1.0)
    monkeypatch.setattr(Daemon, "retry_threshold", lambda self: 1000)  # (no Retry: the deadline alone)

    async def go() -> tuple[int, int, int, int]:
        async with _daemon() as daemon:
            transport, heard, sent = await _initial_alone(daemon.addresses[0][1])
            try:
                await until(lambda: value(daemon, "tokenwire_handshakes_refused_total", {"reason": "timeout"}) == 1, 5)
                await asyncio.sleep(0.3)  # (a close would be on its way)
                assert daemon.handshake_guard.handshaking == 0
                return sent, sum(n for _, n in heard.got), len(heard.got), len(daemon.protocols)
            finally:
                transport.close()

    sent, back, datagrams, left = run(go(), 20)
    assert sent >= 1200 and datagrams >= 3  # (the first flight and its retransmissions came)
    assert back <= 3 * sent, f"{back} B back for {sent} B: {back / sent:.2f}x"
    assert left == 0  # ended at once (no closing period to wait out: nothing was sent)


def test_a_handshake_deadline_with_allowance_left_still_sends_its_close(monkeypatch):
    """Where the address's allowance is not spent, the deadline's close goes out as before (the client hears why)."""
    monkeypatch.setattr(service, "HANDSHAKE_TIMEOUT_S", 0.1)  # (before the first retransmission: 1200 of 3600 B)
    monkeypatch.setattr(Daemon, "retry_threshold", lambda self: 1000)

    async def go() -> list[tuple[float, int]]:
        async with _daemon() as daemon:
            transport, heard, _sent = await _initial_alone(daemon.addresses[0][1])
            try:
                await until(lambda: value(daemon, "tokenwire_handshakes_refused_total", {"reason": "timeout"}) == 1, 5)
                await asyncio.sleep(0.3)
                return heard.got
            finally:
                transport.close()

    got = run(go(), 20)
    assert any(n < 1200 for _, n in got), got  # the close (an unpadded datagram)


# -- F4: refused requests through a flood limiter across connections ---------------------------------------------

def test_refused_requests_of_many_connections_are_one_warning_then_a_summary(caplog):
    """300 connections each sending 2 oversized frames wrote 600 warnings (a refusal and an end line each); the
    first is still logged in full, the others are counted and summed up in one line."""
    caplog.set_level(logging.WARNING, "tokenwire.daemon")
    conns, each = 5, 2

    async def go() -> Daemon:
        async with _daemon(max_request_bytes=1024) as daemon:
            async with contextlib.AsyncExitStack() as stack:
                for _ in range(conns):
                    raw = await stack.enter_async_context(_raw(daemon))
                    quic = raw._quic
                    for _ in range(each):  # a length prefix past max_request_bytes: refused alone
                        quic.send_stream_data(quic.get_next_available_stream_id(), b"\xff\xff\xff\xff")
                    raw.transmit()
                await until(lambda: value(daemon, "tokenwire_errors_total", {"code": "0x106"}) == conns * each, 10)
            await until(lambda: not daemon.protocols, 10)  # (each connection's end: its line, if any)
            return daemon  # (its stop writes the summary at once: what was held back is not lost)

    run(go(), 30)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    refused = [m for m in lines if m.startswith("refused a request from")]
    assert len(refused) == 1 and "request too large" in refused[0] and "max_request_bytes" in refused[0], lines
    ends = [m for m in lines if "of its requests were refused" in m]
    assert ends == [] or (len(ends) == 1 and f"{each} of its requests were refused" in ends[0]), ends
    summary = [m for m in lines if m.startswith("refused ") and "more requests" in m]
    assert len(summary) == 1 and summary[0].startswith(f"refused {(conns - 1) * each} more requests in the last ")
    assert summary[0].endswith(" s (over a request limit: tokenwire_errors_total by code)"), summary
    assert len(refused) + len(ends) + len(summary) <= 3


# -- F5: a DEBUG line per request end -----------------------------------------------------------------------------

def test_each_request_end_is_one_debug_line_with_its_id_peer_outcome_and_no_secret(caplog):
    caplog.set_level(logging.DEBUG, "tokenwire.daemon")
    token, prompt = "s3cret-token-value", "a prompt nobody may read in the log"
    sha = hashlib.sha256(token.encode()).hexdigest()

    async def go() -> bytes:
        daemon = Daemon(parse_config({"server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": ""},
                                      "auth": {"tokens": [{"name": "alice", "sha256": sha}]}}))
        await daemon.start()
        try:
            port = daemon.addresses[0][1]
            async with connect("127.0.0.1", port, verify=False, auth_token=token) as conn:
                stream = conn.chat(prompt, max_tokens=5)
                text = await asyncio.wait_for(stream.collect(), 10)
                assert text
                await until(lambda: value(daemon, "tokenwire_requests_ended_total", {"outcome": "completed"}) == 1, 5)
                assert stream.request_id is not None
                return stream.request_id
        finally:
            await daemon.stop()

    rid = run(go(), 30)
    ends = [r for r in caplog.records if r.levelno == logging.DEBUG and r.getMessage().startswith("request ")
            and "tokens sent" in r.getMessage()]
    assert len(ends) == 1, [r.getMessage() for r in ends]
    line = ends[0].getMessage()
    assert line.startswith(f"request {rid.hex()} (stream 0) from 127.0.0.1:") and ": completed, scheme chatterbox, " \
        in line and " 5 tokens sent, " in line and line.endswith(" s"), line
    every = " ".join(r.getMessage() for r in caplog.records)
    assert token not in every and sha not in every and prompt not in every


def test_a_refused_request_has_its_debug_line_and_nothing_is_kept_at_info(caplog):
    caplog.set_level(logging.DEBUG, "tokenwire.daemon")

    async def go() -> None:
        async with _daemon(max_request_bytes=1024) as daemon, _raw(daemon) as raw:
            quic = raw._quic
            quic.send_stream_data(quic.get_next_available_stream_id(), b"\xff\xff\xff\xff")
            raw.transmit()
            await until(lambda: value(daemon, "tokenwire_requests_ended_total", {"outcome": "refused"}) == 1, 10)
            logging.getLogger("tokenwire.daemon").setLevel(logging.INFO)  # (debug off: nothing kept for the line)
            port = daemon.addresses[0][1]
            async with connect("127.0.0.1", port, verify=False) as conn:
                stream = conn.chat("x", max_tokens=50, params={"rate": 20})
                async for _ in stream:  # (an answer running: nothing kept for its end's line)
                    assert not any(p.opened for p in daemon.protocols)
                    break

    run(go(), 30)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and r.getMessage().startswith(
        "request ")]
    assert lines == [lines[0]] and lines[0].startswith("request - (stream 0) from 127.0.0.1:") and lines[0].endswith(
        ": refused before it was read"), lines


# -- F8: a REPORT counts once the answer was sent whole ----------------------------------------------------------

def test_a_report_before_finished_is_not_counted_and_one_after_it_is_once():
    """A REPORT right after REQUEST (sr 1.0, ls 2^32) went into the client stall and TTFT histograms: the daemon
    counted two TTFTs for one completed request."""
    pair = _connected()
    sid = pair.client.start_request(_request(), pair.now)
    pair.exchange(rounds=40)
    pair.server.accept(sid)
    pair.server.push(sid, "a ", pair.now)
    pair.client._send(sid, Report(stall_ratio=1.0, longest_stall_ms=2**32, ttft_ms=0))  # early: its answer runs
    pair.exchange(rounds=40)
    assert not [e for e in pair.server_events if isinstance(e, ClientReport)]
    pair.server.finish(sid)  # FINISHED goes out: from now on a REPORT counts, once (the client's own follows)
    for _ in range(3):
        pair.client._send(sid, Report(stall_ratio=0.0, longest_stall_ms=10, ttft_ms=50))
    pair.exchange(rounds=80)
    reports = [e for e in pair.server_events if isinstance(e, ClientReport)]
    assert len(reports) == 1 and reports[0].report.ttft_ms == 50
