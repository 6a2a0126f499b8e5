"""ICMP errors and the client's UDP socket.

The client connected its socket so that a dead port's ICMP refusal ended ``connect()`` at once; a refusal arriving
later, in a live connection, then made uvloop's ECN transport deaf for good (uvloop stops polling a descriptor on
POLLERR), and the connection died of its idle timeout. Now the association lasts until the server's first datagram,
and the ECN transport watches its socket afresh after an error. ``connect_kv`` now fails on a refusal as ``connect``
does, and a refusal that a send picks up is passed on instead of being counted and dropped.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import sys
import time
from typing import Any

import pytest

from tokenwire.transport import ecn_socket, quic_io
from tokenwire.transport.client import connect
from tokenwire.transport.ecn_socket import EcnDatagramTransport, dissolve_association, open_udp_socket
from tokenwire.transport.errors import ConnectRefused, ConnectTimeout
from tokenwire.transport.kv_client import connect_kv

from .test_sdk_server import T, client_kwargs, run, served

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="Linux reports ICMP refusals to connected sockets")
N_TOKENS = 40


async def counted(request: Any):
    for i in range(N_TOKENS):
        await asyncio.sleep(0.01)  # (spread out: the forged ICMP lands while the answer is still coming)
        yield f"t{i} "


def _dead_port() -> int:
    """A UDP port on loopback that nobody holds (the kernel answers a datagram to it with port unreachable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _forge_port_unreachable(client_port: int, server_port: int) -> None:
    """Send the loopback client an ICMP port unreachable for a datagram it sent to the server (a raw socket: root)."""
    udp = struct.pack("!HHHH", client_port, server_port, 8 + 100, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + 100, 0, 0, 64, socket.IPPROTO_UDP, 0,
                     socket.inet_aton("127.0.0.1"), socket.inet_aton("127.0.0.1"))
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    icmp = struct.pack("!BBH", 3, 3, 0) + b"\0\0\0\0" + ip + udp  # type 3 code 3: port unreachable
    icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as raw:
        raw.sendto(icmp, ("127.0.0.1", 0))


def _client_socket(conn: Any) -> Any:
    return conn._protocol._transport.get_extra_info("socket")


# -- 1. a refusal in a live connection: the answer still arrives ---------------------------------------------
@linux_only
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="forging ICMP needs a raw socket (root)")
@pytest.mark.parametrize("association", ["dissolved", "kept"])
def test_a_uvloop_ecn_client_hears_the_whole_answer_through_an_icmp_refusal(association, monkeypatch):
    """On uvloop with ECN one ICMP refusal mid-answer left the client deaf: "no packet from the server for 3 s".

    ``dissolved`` (the default): the socket is no longer connected once the server spoke, so the ICMP never reaches
    the client. ``kept``: the association is left in place, so the refusal does reach the ECN transport, which has to
    keep reading after it.
    """
    uvloop = pytest.importorskip("uvloop")
    if association == "kept":
        monkeypatch.setattr(quic_io.SessionProtocol, "_dissolve_association", lambda self: None, raising=False)

    async def go() -> tuple[str, list[Exception]]:
        async with served(counted) as server, connect("127.0.0.1", server.port, ecn=True, idle_timeout=3.0,
                                                      **client_kwargs()) as conn:
            assert isinstance(conn._protocol._transport, EcnDatagramTransport)
            errors: list[Exception] = []
            received = conn._protocol.error_received
            conn._protocol.error_received = lambda exc: (errors.append(exc), received(exc))  # type: ignore[method-assign]
            pieces = []
            async for piece in conn.chat("go"):
                if not pieces:  # the answer has begun: refuse the client's next datagram, as a dying host would
                    _forge_port_unreachable(_client_socket(conn).getsockname()[1], server.port)
                pieces.append(piece)
            return "".join(pieces), errors

    async def bounded() -> tuple[str, list[Exception]]:
        async with asyncio.timeout(30):
            return await go()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        text, errors = runner.run(bounded())
    assert text.split() == [f"t{i}" for i in range(N_TOKENS)]
    if association == "dissolved":
        assert errors == []  # (not delivered at all: the socket no longer has a peer)
    else:
        assert errors and all(isinstance(e, ConnectionRefusedError) for e in errors)


@linux_only
@pytest.mark.parametrize("ecn", [False, True])
def test_the_client_socket_is_unconnected_once_the_server_has_answered(ecn):
    """Its association is what lets a dead port's refusal through; after the server's first datagram it only lets a
    stray ICMP kill the path. Dissolving it keeps the local port (the server would see a migration otherwise)."""

    async def go() -> tuple[str, tuple[Any, ...]]:
        async with served(counted) as server, connect("127.0.0.1", server.port, ecn=ecn,
                                                      **client_kwargs()) as conn:
            sock = _client_socket(conn)
            before = sock.getsockname()
            text = await conn.chat("go").collect()
            with pytest.raises(OSError) as info:
                sock.getpeername()
            assert info.value.errno == errno.ENOTCONN
            assert sock.getsockname()[1] == before[1]
            return text, server.port

    text, _ = run(go(), timeout=T * 3)
    assert len(text.split()) == N_TOKENS


@linux_only
@pytest.mark.parametrize("bound", ["locked", "port 0"])
def test_a_dissolved_association_keeps_the_port_and_stops_icmp_delivery(bound):
    """A refusal for a datagram sent after the association is dissolved is not delivered; the port stays the same,
    whether the socket was bound to a named port or to port 0 (which Linux unbinds on disconnect)."""
    dead = _dead_port()
    with open_udp_socket("::", 0, locked_port=bound == "locked") as sock:
        sock.setblocking(False)
        port = sock.getsockname()[1]
        sock.connect(("::ffff:127.0.0.1", dead))
        sock.send(b"x")  # connected: the refusal is reported
        with pytest.raises(ConnectionRefusedError):
            _recv_after_loopback_icmp(sock)
        assert dissolve_association(sock)
        assert sock.getsockname()[1] == port
        sock.sendto(b"x", ("::ffff:127.0.0.1", dead))  # unconnected: the same refusal is dropped by the kernel
        with pytest.raises(BlockingIOError):
            _recv_after_loopback_icmp(sock)
        assert sock.getsockname()[1] == port


def _recv_after_loopback_icmp(sock: socket.socket) -> bytes:
    """recv() once the loopback ICMP answer has certainly arrived (it is generated inside the send itself; the poll
    with a generous bound only makes sure of it)."""
    import select

    select.select([sock], [], [sock], 1.0)
    return sock.recv(100)


# -- 2. connect_kv fails like connect ---------------------------------------------------------------------------
@linux_only
@pytest.mark.parametrize("ecn", [False, True])
def test_connect_kv_to_a_dead_port_is_refused_at_once(ecn):
    """It waited out its whole timeout, then said ConnectTimeout, while connect() said ConnectRefused at once."""
    port = _dead_port()

    async def go() -> tuple[BaseException, float]:
        start = time.monotonic()
        with pytest.raises(ConnectRefused) as info:
            async with connect_kv("127.0.0.1", port, verify=False, ecn=ecn, timeout=T, warm=False):
                pass
        return info.value, time.monotonic() - start

    err, elapsed = run(go())
    assert not isinstance(err, ConnectTimeout) and isinstance(err, ConnectionError)
    assert str(err) == f"nothing listening at 127.0.0.1:{port} (connection refused)"
    assert elapsed < T / 2, f"{elapsed:.1f} s for a refusal"  # (a generous bound: it takes milliseconds)


# -- 3. a refusal picked up by a send reaches the protocol ------------------------------------------------------
class _Recorder(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.errors: list[Exception] = []

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)


class _RefusingSocket:
    """The transport's socket, but its sends fail as a connected socket's does with a refusal pending."""

    def __init__(self, real: socket.socket, exc: OSError) -> None:
        self._real = real
        self._exc = exc

    def sendmsg(self, *args: Any) -> int:
        raise self._exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest.mark.parametrize("exc, passed_on", [
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), True),
    (BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable"), False),  # a full buffer: a drop, as UDP's
])
def test_a_refusal_raised_by_sendmsg_reaches_error_received(exc, passed_on):
    """Counted in send_errors and dropped: the handshake then waited for its timeout instead of being refused."""

    async def go() -> tuple[list[Exception], int]:
        protocol = _Recorder()
        transport = EcnDatagramTransport(open_udp_socket("127.0.0.1", 0), protocol)
        real = transport._sock
        try:
            transport._sock = _RefusingSocket(real, exc)  # type: ignore[assignment]
            transport.sendto_ecn(b"initial", ("127.0.0.1", 9), ecn_socket.ECT0)
            return protocol.errors, transport.send_errors
        finally:
            transport._sock = real
            transport.close()
            await asyncio.sleep(0)

    errors, send_errors = run(go())
    assert send_errors == 1
    assert errors == ([exc] if passed_on else [])
