"""An ECN-capable UDP datagram transport for aioquic: per-packet codepoints out, codepoints in.

aioquic never touches the IP header's ECN bits (upstream issue #131, wontfix), and asyncio's datagram
transports expose no ancillary data. This transport owns its socket instead:

* **send**: every datagram goes out with ``sendmsg`` and an ``IP_TOS`` control message whose low two bits
  are the ECN codepoint chosen for that packet (Linux honours it per packet for UDP; for IPv4-mapped
  destinations on a dual-stack socket ``IP_TOS`` works and ``IPV6_TCLASS`` is ignored, so both are set as
  the family requires);
* **receive**: ``IP_RECVTOS`` / ``IPV6_RECVTCLASS`` are enabled and each datagram's codepoint is read from
  ``recvmsg``'s ancillary data and made available as :attr:`EcnDatagramTransport.last_ecn` while the
  protocol handles that datagram.

It implements the asyncio ``DatagramTransport`` interface that aioquic's protocols use (``sendto``,
``get_extra_info``, ``close``), so ``QuicConnectionProtocol`` and ``QuicServer`` run on it unchanged.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger("tokenwire.ecn")

NOT_ECT, ECT1, ECT0, CE = 0, 1, 2, 3
CODEPOINT_NAMES = {NOT_ECT: "Not-ECT", ECT1: "ECT(1)", ECT0: "ECT(0)", CE: "CE"}
RECV_BUFFER_BYTES = 4 << 20
_MAX_DATAGRAM = 65535
_CMSG_SPACE = socket.CMSG_SPACE(4) * 2


def _tos_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancdata:
        if (level == socket.IPPROTO_IP and kind == socket.IP_TOS) or (
            level == socket.IPPROTO_IPV6 and kind == socket.IPV6_TCLASS
        ):
            if not data:
                continue
            return int.from_bytes(data[:4], "little") & 0xFF if len(data) >= 4 else data[0]
    return None


_CLOSED = asyncio.DatagramProtocol()  # what a closed transport reports to: nothing (its methods do nothing)


def _not_ect() -> int:
    return NOT_ECT


class EcnDatagramTransport(asyncio.DatagramTransport):
    """UDP transport with a per-datagram ECN codepoint on send and the received codepoint on receive."""

    def __init__(
        self,
        sock: socket.socket,
        protocol: asyncio.DatagramProtocol,
        *,
        codepoint: Callable[[], int] | None = None,
        dscp: int = 0,
    ) -> None:
        super().__init__()
        self._sock = sock
        self._protocol = protocol
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self.codepoint = codepoint or _not_ect
        self.dscp = dscp & 0xFC
        self.last_ecn: int | None = None
        self.sent_by_codepoint = [0, 0, 0, 0]
        self.received_by_codepoint = [0, 0, 0, 0]
        self.send_errors = 0
        self._v6 = sock.family == socket.AF_INET6
        sock.setblocking(False)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, RECV_BUFFER_BYTES)
            except OSError:  # pragma: no cover
                pass
        self._enable_recvtos()
        self._loop.add_reader(sock.fileno(), self._read_ready)
        self._loop.call_soon(protocol.connection_made, self)

    def _enable_recvtos(self) -> None:
        try:
            self._sock.setsockopt(socket.IPPROTO_IP, socket.IP_RECVTOS, 1)
        except OSError:
            pass  # pure IPv6 socket without v4 mapping
        if self._v6:
            self._sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVTCLASS, 1)

    # ----------------------------------------------------------------------------------- asyncio API
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        if name == "sockname":
            return self._sock.getsockname()
        if name == "peername":
            try:
                return self._sock.getpeername()
            except OSError:
                return default
        return default

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._sock.fileno())
        self._loop.call_soon(self._finish_close)

    def _finish_close(self) -> None:
        try:
            self._protocol.connection_lost(None)
        finally:
            self._sock.close()
            # let go of the protocol and the codepoint callable (a session's), as asyncio's own transports do: a
            # transport that kept them was in a reference cycle with its protocol, and a client's whole connection
            # (~200 objects) waited for a full collection after every `async with connect(...)`
            self._protocol = _CLOSED
            self.codepoint = _not_ect

    def abort(self) -> None:
        self.close()

    def sendto(self, data: bytes | bytearray | memoryview, addr: Any = None) -> None:
        self.sendto_ecn(data, addr, self.codepoint())

    def sendto_ecn(self, data: bytes | bytearray | memoryview, addr: Any, ecn: int) -> None:
        """Send one datagram whose IP header carries ECN codepoint ``ecn``."""
        if self._closing:
            return
        ecn &= 0x3
        tos = self.dscp | ecn
        if addr is not None and self._v6 and len(addr) == 2:
            addr = ("::ffff:" + addr[0], addr[1], 0, 0) if ":" not in addr[0] else addr
        cmsg = [(socket.IPPROTO_IP, socket.IP_TOS, tos.to_bytes(4, "little"))]
        if self._v6 and addr is not None and not str(addr[0]).startswith("::ffff:"):
            cmsg = [(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, tos.to_bytes(4, "little"))]
        try:
            self._sock.sendmsg([data], cmsg, 0, addr) if addr is not None else self._sock.sendmsg([data], cmsg)
            self.sent_by_codepoint[ecn] += 1
        except BlockingIOError:
            self.send_errors += 1  # a full send buffer drops the datagram, as UDP does; QUIC recovers
        except OSError as exc:
            self.send_errors += 1
            if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                log.debug("sendmsg failed: %s", exc)
            if isinstance(exc, ConnectionRefusedError):
                # a connected socket's pending ICMP refusal is handed to whichever call comes first: picked up here,
                # by a retransmit, it was counted and lost, and a dead port cost the whole connect timeout (asyncio's
                # and uvloop's own transports pass it on the same way)
                self._protocol.error_received(exc)

    def _read_ready(self) -> None:
        for n in range(256):  # bounded: let other callbacks run under a flood
            try:
                data, ancdata, _flags, addr = self._sock.recvmsg(_MAX_DATAGRAM, _CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                if n == 0:  # woken with nothing to read: perhaps by an error that a send consumed first
                    self._rearm_reader()
                return
            except OSError as exc:
                try:
                    self._protocol.error_received(exc)
                finally:
                    self._rearm_reader()
                return
            tos = _tos_from_ancillary(ancdata)
            ecn = (tos & 0x3) if tos is not None else None
            self.last_ecn = ecn
            if ecn is not None:
                self.received_by_codepoint[ecn] += 1
            self._protocol.datagram_received(data, addr)
        self.last_ecn = None

    def _rearm_reader(self) -> None:
        """Watch the socket afresh after a socket error (an ICMP refusal on a connected socket: POLLERR).

        uvloop stops polling a descriptor for good on POLLERR: it runs the read callback one last time and closes
        its poll handle without a word, so a client went deaf after one ICMP error in a live connection and died
        of its idle timeout while the server kept sending. Removing the reader drops the dead handle; adding it
        makes a new one. On asyncio's selector loops it changes nothing."""
        if self._closing:
            return
        fd = self._sock.fileno()
        if fd < 0:  # (closed under us)
            return
        self._loop.remove_reader(fd)
        self._loop.add_reader(fd, self._read_ready)


def dissolve_association(sock: socket.socket) -> bool:
    """Undo ``connect()`` on a UDP socket (Linux: a ``connect`` to an ``AF_UNSPEC`` address), keeping its port.

    Python's ``socket.connect`` cannot say ``AF_UNSPEC``, so libc's is called. The kernel then reports no more ICMP
    errors to the socket (an unconnected socket never gets them), and takes datagrams from any peer again, though
    (Linux 6.x, a dual-stack socket connected to an IPv4-mapped address) only at the local address it used while
    connected: enough for QUIC, whose server answers the address the client sends from.
    Linux also unbinds the local port of a socket bound to port 0 (:func:`bind_locked_port` binds one that stays):
    such a socket is bound to its old port again at once, and False returned if that fails (its next send takes a
    new port). False too where the call is not available or fails: the socket stays as it was."""
    if sys.platform != "linux":
        return False
    libc = _libc()
    if libc is None:
        return False
    name = sock.getsockname()
    unspec = bytes(16)  # a sockaddr whose sa_family is AF_UNSPEC (0); 16 bytes: any family's minimum length
    if libc.connect(sock.fileno(), unspec, len(unspec)) != 0:
        return False
    if sock.getsockname()[1] != name[1]:
        try:
            sock.bind((sock.getsockname()[0], name[1], *name[2:]))
        except OSError:
            return False
    return True


_LIBC: Any = None


def _libc() -> Any:
    """The C library through ctypes, loaded once (None where it cannot be)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            import ctypes.util

            _LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        except (ImportError, OSError):  # pragma: no cover - no ctypes, no libc
            _LIBC = False
    return _LIBC or None


def bind_locked_port(sock: socket.socket, host: str, tries: int = 8) -> None:
    """Bind ``sock`` to ``host`` and an ephemeral port named explicitly, so that the port stays the socket's when its
    association is dissolved (:func:`dissolve_association`): Linux keeps the port of a socket bound to port 0 only
    while it is connected, and a client that lost it would carry on from a new one (a migration to the server).

    The kernel picks the port (a probe socket bound to port 0); another process taking it in between makes the
    bind fail, and another is tried."""
    for attempt in range(tries):
        with socket.socket(sock.family, socket.SOCK_DGRAM) as probe:
            if sock.family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        try:
            sock.bind((host, port))
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or attempt == tries - 1:
                raise


def ecn_supported() -> bool:
    """Whether this platform's sockets give each received datagram's codepoint (``IP_RECVTOS``) and take one per
    sent datagram: what the clients' default ``ecn=None`` turns ECN on for."""
    return sys.platform != "win32" and all(hasattr(socket, o) for o in ("IP_RECVTOS", "IP_TOS", "CMSG_SPACE"))


def open_udp_socket(host: str, port: int, *, locked_port: bool = False) -> socket.socket:
    """A UDP socket bound to ``host:port`` (dual-stack when ``host`` is an IPv6 wildcard). ``locked_port`` with port 0:
    an ephemeral port named in the bind (:func:`bind_locked_port`), which a dissolved association leaves in place."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if locked_port and port == 0:
            bind_locked_port(sock, str(sockaddr[0]))
        else:
            sock.bind(sockaddr)
    except BaseException:
        sock.close()  # (a port in use: the caller reports it; the socket is not left open)
        raise
    return sock
