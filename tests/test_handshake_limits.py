"""The daemon's session limit against half-open QUIC handshakes: a session counts once its handshake is done,
handshakes have a deadline and a bound, and many at once turn on address validation (Retry)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from tokenwire.daemon import service
from tokenwire.daemon.config import parse_config
from tokenwire.daemon.service import Daemon
from tokenwire.transport.client import connect
from tokenwire.transport.frames import ALPN

from .test_loopback import run


def half_open(port: int, n: int, alpn: str = ALPN) -> list[socket.socket]:
    """``n`` clients that send their first flight (one Initial datagram each) and never answer."""
    socks = []
    for _ in range(n):
        quic = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=[alpn],
                                                              server_name="localhost"))
        quic.connect(("127.0.0.1", port), now=time.monotonic())
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for data, addr in quic.datagrams_to_send(now=time.monotonic()):
            sock.sendto(data, addr)
        socks.append(sock)
    return socks


async def until(check, timeout: float = 10.0) -> None:
    """Wait for ``check()`` (an event in the daemon's loop), failing after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


def value(daemon: Daemon, name: str, labels: dict[str, str] | None = None) -> float:
    return daemon.metrics.registry.get_sample_value(name, labels or {}) or 0.0


@contextlib.asynccontextmanager
async def flooded(n: int, **limits: int) -> AsyncIterator[tuple[Daemon, int]]:
    """A daemon on loopback (its port) after ``n`` half-open handshakes; stopped, and their sockets closed."""
    daemon = Daemon(parse_config({"server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": ""},
                                  "limits": limits}))
    await daemon.start()
    port = daemon.addresses[0][1]
    socks = half_open(port, n)
    try:
        yield daemon, port
    finally:
        for s in socks:
            s.close()
        await daemon.stop()


async def chat(port: int) -> str:
    """A real client's short answer (through a Retry, if one comes)."""
    async with connect("127.0.0.1", port, verify=False, timeout=5) as conn:
        return await asyncio.wait_for(conn.chat("x", max_tokens=3).collect(), 10)


def test_half_open_handshakes_neither_take_sessions_nor_lock_clients_out(monkeypatch):
    """60 Initials (0.1 s of a script, spoofable) filled max_sessions until the idle timeout: every real client
    was refused with "too many sessions", and the sessions gauge counted them."""
    monkeypatch.setattr(service, "HANDSHAKE_TIMEOUT_S", 1.0)
    monkeypatch.setattr(Daemon, "retry_threshold", lambda self: 1000)  # the bound and deadline alone (no Retry)

    async def go():
        async with flooded(5, max_sessions=3) as (daemon, port):
            await until(lambda: daemon.handshake_guard.handshaking + value(daemon, "tokenwire_handshakes_refused_total",
                                                            {"reason": "too_many"}) >= 5)
            assert daemon.admission.established == 0 and value(daemon, "tokenwire_sessions_open") == 0
            assert daemon.handshake_guard.handshaking == 3  # the bound: max_sessions; the two past it closed at once
            assert value(daemon, "tokenwire_handshakes_refused_total", {"reason": "too_many"}) == 2
            await until(lambda: daemon.handshake_guard.handshaking == 0, 5)  # the deadline closes the three
            assert value(daemon, "tokenwire_handshakes_refused_total", {"reason": "timeout"}) == 3
            async with connect("127.0.0.1", port, verify=False) as conn:  # a real client is served
                text = await asyncio.wait_for(conn.chat("x", max_tokens=3).collect(), 10)
                assert daemon.admission.established == 1 and value(daemon, "tokenwire_sessions_open") == 1
            return text

    assert len(run(go(), 30)) > 0


def test_many_handshakes_at_once_turn_on_address_validation(monkeypatch):
    """Past RETRY_ABOVE handshakes in progress, a new client gets a Retry (no state for a spoofed source) and
    a real one still connects; once the load passes, Retry goes off again."""
    monkeypatch.setattr(service, "RETRY_ABOVE", 4)
    monkeypatch.setattr(service, "HANDSHAKE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(service, "HANDSHAKE_PROVEN_TIMEOUT_S", 1.0)  # (what a handshake gets while Retry is on)

    async def go():
        async with flooded(4) as (daemon, port):
            await until(lambda: daemon.handshake_guard.retrying_since is not None)
            assert value(daemon, "tokenwire_quic_retry_active") == 1
            before = len(daemon.protocols)
            more = half_open(port, 3)  # answered with a Retry: no connection state made for them
            text = await chat(port)  # the real client follows the Retry
            for sock in more:
                sock.close()
            assert len(daemon.protocols) <= before + 1
            await until(lambda: daemon.handshake_guard.handshaking == 0, 5)
            now = time.monotonic()
            daemon.handshake_guard.relax(now)  # calm from now on: not yet off
            assert daemon.handshake_guard.retrying_since is not None
            daemon.handshake_guard.relax(now + service.HANDSHAKE_TIMEOUT_S)  # calm for a whole handshake timeout
            assert daemon.handshake_guard.retrying_since is None and value(daemon, "tokenwire_quic_retry_active") == 0
            return text

    assert len(run(go(), 30)) > 0


def test_a_connection_the_client_closes_in_its_handshake_is_no_session_and_no_refusal():
    """Bookkeeping: a handshake that ends (the client gave up) leaves neither a handshake nor a session counted,
    and its deadline does not fire on it later."""

    def give_up(port: int) -> None:
        quic = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=[ALPN],
                                                              server_name="localhost"))
        addr = ("127.0.0.1", port)
        quic.connect(addr, now=time.monotonic())
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for data, to in quic.datagrams_to_send(now=time.monotonic()):
                sock.sendto(data, to)
            sock.settimeout(5)
            data, _ = sock.recvfrom(65536)  # the server's first flight
            quic.receive_datagram(data, addr, now=time.monotonic())
            quic.close(error_code=0, reason_phrase="gave up")
            for data, to in quic.datagrams_to_send(now=time.monotonic()):
                sock.sendto(data, to)

    async def go():
        daemon = Daemon(parse_config({"server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": ""}}))
        await daemon.start()
        try:
            await asyncio.get_running_loop().run_in_executor(None, give_up, daemon.addresses[0][1])
            await until(lambda: not daemon.protocols)
            return (daemon.handshake_guard.handshaking, daemon.admission.established,
                    value(daemon, "tokenwire_sessions_open"),
                    value(daemon, "tokenwire_handshakes_refused_total", {"reason": "timeout"}))
        finally:
            await daemon.stop()

    assert run(go(), 30) == (0, 0, 0, 0)


def test_with_few_sessions_allowed_retry_comes_on_at_half_of_them(monkeypatch):
    """Handshakes in progress never exceed max_sessions: with max_sessions under RETRY_ABOVE (64), Retry never
    came on, and max_sessions spoofed Initials every 10 s locked every client out."""
    monkeypatch.setattr(service, "HANDSHAKE_TIMEOUT_S", 5.0)

    async def go():
        async with flooded(10, max_sessions=10) as (daemon, port):
            await until(lambda: daemon.handshake_guard.retrying_since is not None)
            assert daemon.retry_threshold() == 5
            return await chat(port)  # past the Retry

    assert len(run(go(), 30)) > 0


def test_a_token_from_an_earlier_retry_is_checked_after_retry_went_off():
    """Turning Retry off made aioquic ignore the token of a client between our Retry and its next Initial: its
    handshake failed ("original_destination_connection_id does not match")."""
    from aioquic.quic.retry import QuicRetryTokenHandler

    from tokenwire.transport.quic_io import ValidatingQuicServer
    from tokenwire.transport.tls import server_configuration

    def initial(token: bytes) -> bytes:
        quic = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=[ALPN],
                                                              server_name="localhost"))
        quic._peer_token = token  # what aioquic's client sends after a Retry
        quic.connect(("127.0.0.1", 4433), now=time.monotonic())
        return quic.datagrams_to_send(now=time.monotonic())[0][0]

    async def go():
        server = ValidatingQuicServer(configuration=server_configuration(), create_protocol=lambda *a, **k: None)
        server.retry_handler = QuicRetryTokenHandler()
        seen = []
        for issue, token in ((False, b"from our Retry"), (False, b""), (True, b"")):
            server.issue_retry = issue
            server.choose_retry(initial(token))
            seen.append(server._retry is server.retry_handler)
        return seen

    # checked / let in without a Retry / sent a Retry
    assert run(go(), 30) == [True, False, True]
