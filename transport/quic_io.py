"""Thin asyncio shell between a UDP socket and a sans-I/O tokenwire session.

aioquic's ``QuicConnectionProtocol`` already moves datagrams and QUIC timers; this subclass adds the
session: every QUIC event goes to the session, session timers (Chatterbox idle repair, client gap
repair) share the one loop timer, and every QUIC call uses one clock, ``time.monotonic()`` (uvloop's
``loop.time()`` has only millisecond resolution; mixing the two would skew RTT samples).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import socket
import sys
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.buffer import Buffer
from aioquic.quic import events as qe
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE
from aioquic.quic.connection import END_STATES, NetworkAddress, QuicConnection, QuicConnectionState
from aioquic.quic.packet import QuicErrorCode, QuicPacketType, pull_quic_header

from .ecn_socket import EcnDatagramTransport, dissolve_association, ecn_supported, open_udp_socket
from .errors import ConnectError, ConnectRefused, ConnectTimeout
from .session import _SessionBase
from .session_events import AIOQUIC_IDLE_REASON, SessionEvent, handshake_refusal
from .stateless_reset import MIN_RESET_SIZE, RESET_REASON, Resetter, is_reset, private_key_der, static_key
from .tls import check_seconds

log = logging.getLogger("tokenwire.transport")
# A library's loggers get a NullHandler (the logging HOWTO's advice): an application that set up no logging
# had aioquic's own warning about a failed handshake on stderr ("Error: 298, reason: self-signed
# certificate") beside the HandshakeError the SDK raises. Configured logging (the daemon's, an app's) still
# sees every record: the handler does not stop propagation.
logging.getLogger("quic").addHandler(logging.NullHandler())
logging.getLogger("tokenwire").addHandler(logging.NullHandler())

# Datagrams a QUIC server of this process dropped before any connection saw them, by reason: malformed (no QUIC
# header: junk on the port), unknown_connection (a header no connection's ID matches and that cannot open one: a
# short or long packet for a connection gone or never made, an Initial under 1,200 bytes), not_accepting (the port
# is bound but not serving yet: the daemon's start). aioquic drops them without a word (a flood of junk moved no
# metric); Version Negotiation and Retry answers are not drops. One process-wide table: the daemon's QUIC ports
# together (telemetry exports it as tokenwire_datagrams_dropped_total).
DROP_REASONS = ("malformed", "unknown_connection", "not_accepting")
datagrams_dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
# Stateless Resets (RFC 9000 10.3) the QUIC servers of this process sent, in answer to a short-header datagram of a
# connection they do not know (one of a process before them: a restart), and those their send limit held back
# (ValidatingQuicServer._answer_unknown; telemetry exports "sent" as tokenwire_stateless_resets_sent_total)
stateless_resets: dict[str, int] = {"sent": 0, "limited": 0}

RECV_BUFFER_BYTES = 4 << 20  # the default 208 KiB overflowed on loopback bursts (research notes)
CLOSE_PERIOD_MAX_S = 5.0
"""The longest QUIC closing or draining period (3 PTO otherwise): see :meth:`SessionProtocol._bound_close_period`."""
# What a terminated aioquic (==1.7.2) QuicConnection holds and no longer reads, emptied at the connection's end
# (SessionProtocol._release_ended): its streams (their send and receive buffers: in the table, the send queue and the
# blocked lists), its TLS send buffers (3 x 16 KiB), its handshake streams, its keys and its frame handlers (bound
# methods). tests/test_gc_stall_fixes.py pins the names.
RELEASED_AT_END = ("_streams", "_streams_queue", "_streams_blocked_bidi", "_streams_blocked_uni", "_crypto_streams",
                   "_crypto_buffers", "_cryptos", "_cryptos_initial", "_QuicConnection__frame_handlers")


def _ignore(*args: object) -> None:
    """What an ended connection's callbacks become (see SessionProtocol._release_ended)."""


def check_port(port: int, *, listening: bool = False) -> None:
    """ValueError naming ``port`` unless it is a UDP port number: 1..65535 to connect to, 0..65535 to listen on
    (0: any free one). The socket layer took it modulo 65536 (port 70000 listened on, or called, 4464)."""
    low = 0 if listening else 1
    if isinstance(port, bool) or not isinstance(port, int) or not low <= port <= 65535:
        raise ValueError(f"port {port!r} is not a UDP port number ({low} to 65535)")


def port_argument(text: str, *, listening: bool = False) -> int:
    """argparse ``type`` of a ``--port`` option: :func:`check_port`'s message instead of a wrapped port."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    try:
        check_port(port, listening=listening)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return port


def tune_socket(transport: asyncio.BaseTransport | None) -> None:
    """Raise the UDP receive/send buffers of the endpoint behind ``transport`` (best effort)."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, RECV_BUFFER_BYTES)
        except OSError as exc:  # pragma: no cover - unusual kernels
            log.debug("could not raise socket buffer %s: %s", opt, exc)


def _read_outcome(fut: asyncio.Future) -> None:
    """Mark a future's exception as seen (it is expected and reported another way)."""
    if not fut.cancelled():
        fut.exception()


class HandshakeError(ConnectError):
    """The server answered but the handshake failed; ``tls_alert`` is set when TLS refused (a certificate,
    no common ALPN). A :class:`~.errors.ConnectError`: a ``TokenwireError`` and a ``ConnectionError``."""

    def __init__(self, message: str, tls_alert: int | None) -> None:
        super().__init__(message)
        self.tls_alert = tls_alert


# aioquic (==1.7.2) words a certificate issued for other names with service_identity's reprs: "hostname 'foo'
# doesn't match either of DNSPattern(pattern=b'localhost'), IPAddressPattern(pattern=IPv4Address('127.0.0.1'))".
# The names in plain text: "... doesn't match the certificate's names: localhost, 127.0.0.1"
_NAME_MISMATCH = re.compile(r"(hostname '.*' doesn't match) (?:either of )?(.*)", re.DOTALL)
_PATTERN_REPRS = (
    (re.compile(r"DNSPattern\(pattern=b'([^']*)'\)"), r"\1"),
    (re.compile(r"IPAddressPattern\(pattern=IPv[46](?:Address|Network)\('([^']*)'\)\)"), r"\1"),
    (re.compile(r"URIPattern\(protocol_pattern=b'([^']*)', dns_pattern=([^,)]*)\)"), r"\1:\2"),
    (re.compile(r"SRVPattern\(name_pattern=b'([^']*)', dns_pattern=([^,)]*)\)"), r"_\1.\2"),
)


def plain_certificate_names(reason: str) -> str:
    """``reason`` with aioquic's name-mismatch wording (pattern reprs) turned into the names in plain text."""
    found = _NAME_MISMATCH.fullmatch(reason)
    if found is None:
        return reason
    names = found.group(2)
    for pattern, plain in _PATTERN_REPRS:
        names = pattern.sub(plain, names)
    if "Pattern(" in names:  # a form this does not know: leave it whole
        return reason
    return f"{found.group(1)} the certificate's name{'s' if ', ' in names else ''}: {names}"


def _handshake_failure(host: str, port: int, ended: qe.ConnectionTerminated) -> HandshakeError:
    """Why a handshake failed, in words (from the close that ended it)."""
    code = ended.error_code
    reason = plain_certificate_names(ended.reason_phrase or "no reason given")
    # QUIC CRYPTO_ERROR is 0x100 + the TLS alert (RFC 9001, 4.8), a transport close; application closes
    # (tokenwire's own codes share the numbers) carry no frame type
    if ended.frame_type is not None and 0x100 <= code <= 0x1FF:
        alert = code - 0x100
        return HandshakeError(f"TLS handshake with {host}:{port} failed (TLS alert {alert}): {reason}", alert)
    refused = handshake_refusal(code, ended.reason_phrase) if ended.frame_type is not None else None
    if refused is not None:  # (an application's close carries no frame type; this one was converted)
        return HandshakeError(f"QUIC handshake with {host}:{port} failed: {refused}", None)
    if ended.frame_type is not None and code == QuicErrorCode.INVALID_TOKEN and not ended.reason_phrase:
        # a loaded server's answer to a Retry token it cannot accept (RFC 9000 8.1.3); it read "no reason given
        # (code 0xb)" in a handshake storm
        return HandshakeError(f"QUIC handshake with {host}:{port} failed: the server did not accept the Retry token "
                              "this client sent back (the server is under handshake load and asks clients to prove "
                              "their address; the token came back too late, or from another address or port): "
                              "retry (QUIC INVALID_TOKEN 0xb)", None)
    return HandshakeError(f"QUIC handshake with {host}:{port} failed: {reason} (code {code:#x})", None)


class SessionProtocol(QuicConnectionProtocol):
    """Drives ``self.session`` (built by ``session_factory``) from asyncio; subclasses handle its events."""

    clock: Callable[[], float] = staticmethod(time.monotonic)

    def __init__(
        self,
        quic: QuicConnection,
        stream_handler: Any = None,
        *,
        session_factory: Callable[[QuicConnection], _SessionBase],
    ) -> None:
        super().__init__(quic, stream_handler)
        self.session = session_factory(quic)
        self._session_timer: asyncio.TimerHandle | None = None
        self._session_timer_at: float | None = None
        self.terminated: qe.ConnectionTerminated | None = None
        self._close_period_bounded = False  # (see _bound_close_period)
        # set once the transport has let go of this protocol and closed its socket (connection_lost): what leaving
        # connect_quic waits for, so that no loop, however it is driven or closed, is left holding the socket
        self.socket_closed = asyncio.Event()
        self.heard = False  # a datagram came from the server: a refusal (ICMP) since then may be a restart's blip
        self.connect_refused = False  # the handshake ended on "connection refused" before the server sent anything
        self._associated = False  # connect() connected the UDP socket to the server (see connect)

    @property
    def quic_closing(self) -> bool:
        """The QUIC connection is closing or closed, by either side (a close begun, or an end state): nothing more
        it sends is read. Subclasses add their session's own end (their ``closing``)."""
        quic = self._quic
        return quic._close_event is not None or quic._state in END_STATES

    # -- a client's connection attempt ---------------------------------------------------------------
    def connect(self, addr: NetworkAddress, transmit: bool = True) -> None:
        """Connect the UDP socket to the server's address (on Linux) before the first Initial, so that the kernel
        reports an ICMP port unreachable to it: on an unconnected socket it is dropped, and a dead port cost the
        whole connect timeout. The association lasts until the server's first datagram (:meth:`datagram_received`
        dissolves it): only a refusal before then means anything, and a connected socket that got one later went
        deaf on uvloop's ECN path. Every datagram still goes to the address aioquic names. Where the socket cannot
        be connected (another platform, an odd transport) nothing is reported and the timeout stands."""
        if sys.platform == "linux" and self._transport is not None:
            with contextlib.suppress(OSError, AttributeError, ValueError, TypeError), self._socket_copy() as same:
                same.connect(addr)
                self._associated = True
        super().connect(addr, transmit)

    def _socket_copy(self) -> socket.socket:
        """A duplicate of the transport's socket descriptor, as a plain socket: the transport's own object may be a
        wrapper without ``connect()``. Closing it leaves the transport's open."""
        sock = self._transport.get_extra_info("socket")  # type: ignore[union-attr]  # (callers check for None)
        return socket.fromfd(sock.fileno(), sock.family, socket.SOCK_DGRAM)

    def _dissolve_association(self) -> None:
        """Back to an unconnected socket once the server has been heard: later ICMP errors are not delivered at all
        (a restarting server's, a forged one), as before the socket was connected."""
        self._associated = False
        if self._transport is None or self._transport.is_closing():
            return
        with contextlib.suppress(OSError, AttributeError, ValueError, TypeError), self._socket_copy() as same:
            if not dissolve_association(same):
                log.debug("could not dissolve the client socket's association: ICMP errors still reach it")

    def error_received(self, exc: Exception) -> None:
        """Fail the handshake at once on "connection refused" while the server has sent nothing at all: nothing
        listens on that port (later refusals, or one after a packet came back, are a restarting server's: QUIC
        retransmits through them). :func:`open_client` raises :class:`~.errors.ConnectRefused` for it."""
        if isinstance(exc, ConnectionRefusedError) and not self.heard and not self._connected:
            waiter = self._connected_waiter
            self.connect_refused = True
            if waiter is not None and not waiter.done():
                self._connected_waiter = None
                waiter.set_exception(ConnectionRefusedError("connection refused"))
            return
        super().error_received(exc)

    async def wait_connected(self) -> None:
        """aioquic's, but a cancelled wait (the handshake timeout) leaves no orphaned future behind, and a refusal
        that came before the wait began fails it at once.

        aioquic awaits a shielded waiter; cancelling the wait leaves the waiter to receive the connection's
        ConnectionError at close with nobody to read it ("Future exception was never retrieved").
        """
        if self.connect_refused:
            raise ConnectionRefusedError("connection refused")
        try:
            await super().wait_connected()
        except asyncio.CancelledError:
            waiter = self._connected_waiter
            if waiter is not None:
                waiter.add_done_callback(_read_outcome)
            raise

    # -- events ------------------------------------------------------------------------------------
    def handle_session_events(self, events: list[SessionEvent]) -> None:  # pragma: no cover - overridden
        pass

    def quic_event_received(self, event: qe.QuicEvent) -> None:
        # aioquic's _process_events did its own bookkeeping (CIDs, waiters) before calling us
        if isinstance(event, qe.ConnectionTerminated):
            self.terminated = event  # why, for a failed handshake (aioquic raises a bare ConnectionError)
        try:
            events = self.session.handle_quic_event(event, self.clock())
            if events:
                self.handle_session_events(events)
        finally:
            if isinstance(event, qe.ConnectionTerminated):  # (once the subclass has handled the end: what it reads
                self._release_ended()  # of the connection then is still there)

    def _release_ended(self) -> None:
        """Empty what the terminated QUIC connection holds (:data:`RELEASED_AT_END`), so refcounting frees it now.

        aioquic's ``QuicConnection`` is a reference cycle (its frame handlers, its loss recovery's probe callback and
        its TLS callbacks are its bound methods), and a server's protocol is in one with it (aioquic's server's
        terminated handler): all they referenced waited for a full collection, ~100 KiB (~300 objects) a connection
        after a short chat, megabytes while its streams' buffers held an answer's or a KV chunk's data. Here, at the
        end every connection shares (the daemon's chat port, its KV endpoint, the SDK's server, the clients), not in
        one subclass: the KV endpoint's and the SDK server's kept the whole cycle until a full collection. (A client's
        side is freed as well once its ECN transport lets go of it: ``EcnDatagramTransport._finish_close``.)
        Nothing reads them once terminated: aioquic returns first in that state (receive_datagram,
        datagrams_to_send; get_timer has no timer left), the sessions have dropped their requests and fetches (what
        their drivers call later, a task's late push or chunk, finds none and writes nothing), and no more events
        come."""
        quic = self._quic
        if quic._state is not QuicConnectionState.TERMINATED:  # (ConnectionTerminated comes from its end: never so)
            return
        for name in RELEASED_AT_END:
            held = getattr(quic, name, None)  # (a name an aioquic upgrade dropped: left; the pinning test fails)
            if isinstance(held, (dict, list)):
                held.clear()
        # The rest of the cycles an ended connection is in, so that refcounting frees all of it (~120 objects a
        # connection were left to a full collection, which walks every live session; the daemon freezes what
        # survives one, and a frozen cycle is never collected): aioquic's server stores handlers on its protocol
        # that hold the protocol (partials; all called by now), the session's scheduler clock is a closure over the
        # session, the datagram hook's writer is the scheduler's bound method set on the connection
        # (datagram_hook.py), and aioquic's TLS context and loss recovery hold the connection's bound methods.
        self._connection_id_issued_handler = self._connection_id_retired_handler = _ignore
        self._connection_terminated_handler = _ignore
        self.session.release_cycles()
        quic.__dict__.pop("_write_datagram_frame", None)
        tls = getattr(quic, "tls", None)
        if tls is not None:
            tls.alpn_cb = None
            tls.update_traffic_key_cb = _ignore
        loss = getattr(quic, "_loss", None)
        if loss is not None and hasattr(loss, "_send_probe"):
            loss._send_probe = _ignore

    # -- I/O -----------------------------------------------------------------------------------------
    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        if not self.heard:
            self.heard = True
            if self._associated:
                self._dissolve_association()
        if self._quic._is_client and self._stateless_reset(data, addr):  # type: ignore[arg-type]  # bytes
            return
        now = self.clock()
        self.session.before_datagram()
        self._quic.receive_datagram(data, addr, now=now)  # type: ignore[arg-type]
        self.session.after_datagram(now)
        self._process_events()
        self.transmit()

    def _stateless_reset(self, data: bytes, addr: NetworkAddress) -> bool:
        """End the connection at once if ``data`` is a Stateless Reset from its server (RFC 9000 10.3.1): its
        server no longer knows it (a restart), and would answer nothing on it until the idle timeout.

        A client's check only (aioquic's servers ignore a client's tokens, and tokenwire's clients never send a
        reset). Only a short-header datagram of 21 bytes or more from the server's address is compared, with the
        tokens of the connection IDs this client sends to: the one in use and any a path probe holds (10.3.1: not
        those it has not used, nor retired ones), each in constant time. Checked before aioquic reads the datagram
        (a reset's connection ID is random: aioquic drops it unread), which RFC 9000 allows: the check is a MUST for
        a datagram that cannot be processed and a MAY for one that can. A match ends the connection without another
        packet (the RFC's draining: "MUST NOT send"), and at once, without the draining period's 3 PTO: RFC 9000
        10.2 lets an endpoint that can keep late packets from drawing an answer end it early, and aioquic answers
        none once terminated (a client closes its UDP socket with the connection). The session sees the end with
        :data:`~.stateless_reset.RESET_REASON` (the SDK raises it as a lost connection: ``path_lost``)."""
        quic = self._quic
        if len(data) < MIN_RESET_SIZE or data[0] & 0x80 or quic._state in END_STATES:
            return False
        if all(path.addr != addr for path in quic._network_paths):  # (aioquic drops those: RFC 9000 9)
            return False
        tokens = [quic._peer_cid.stateless_reset_token]
        tokens.extend(path.peer_cid.stateless_reset_token for path in quic._network_paths if path.peer_cid is not None)
        if not is_reset(data, tokens):
            return False
        log.info("stateless reset from %s: the server no longer has this connection", addr[0])
        self._end_without_packet(QuicErrorCode.NO_ERROR, RESET_REASON)
        return True

    def _end_without_packet(self, error_code: int, reason: str) -> None:
        """End the connection here and now, sending nothing (no CONNECTION_CLOSE, no closing period): through
        aioquic's own end path (``_close_end``), so the session sees the end, with ``reason``, as any other, and
        waiters are released. A Stateless Reset's end (the peer must not hear from it again) and a handshake
        refused where a close would break the anti-amplification limit (handshake_guard)."""
        self._quic._close_event = qe.ConnectionTerminated(error_code=error_code, frame_type=None,
                                                          reason_phrase=reason)
        self._quic._close_end()
        self._process_events()
        self.transmit()  # (nothing to send: terminated; drops its timer)

    def transmit(self) -> None:
        if self._transmit_task is not None:  # a deferred transmit (transmit_soon) has nothing left to do: not twice
            self._transmit_task.cancel()
            self._transmit_task = None
        if self._transport is None:
            return
        now = self.clock()
        quic = self._quic
        datagrams = self.session.datagrams_to_send(now)
        if quic._events and not quic._is_client:
            self._register_issued(quic)
        self._bound_close_period(now)
        send_ecn = getattr(self._transport, "sendto_ecn", None)
        if send_ecn is not None:  # an ECN-capable transport: the codepoint the marking policy chose
            ecn = self.session.current_codepoint
            for data, addr in datagrams:
                send_ecn(data, addr, ecn)
        else:
            for data, addr in datagrams:
                self._transport.sendto(data, addr)
        timer_at = self.session.get_timer()
        if self._session_timer is not None and self._session_timer_at != timer_at:
            self._session_timer.cancel()
            self._session_timer = None
        if self._session_timer is None and timer_at is not None:
            self._session_timer = self._loop.call_later(max(0.0, timer_at - now), self._on_timer)
        self._session_timer_at = timer_at

    def _register_issued(self, quic: QuicConnection) -> None:
        """Give the server the connection IDs this ``datagrams_to_send`` call issued before they leave.

        aioquic (==1.7.2) queues ``ConnectionIdIssued`` (what adds an ID to its server's table) as it writes the
        NEW_CONNECTION_ID frame, and the protocol reads it at its next event processing: a client that moved to
        the new ID at once (RFC 9000 5.1.1: "at any time") and whose datagram came in between missed the table,
        and :meth:`ValidatingQuicServer._answer_unknown` reset the live connection. Registered here, from the
        events still queued; the later processing of the same events sets the same entries again
        (:class:`ProtocolTable` keeps both in step: no change). On a server connection only, and only when
        events are queued (most calls: none)."""
        for event in quic._events:
            if isinstance(event, qe.ConnectionIdIssued):
                self._connection_id_issued_handler(event.connection_id)

    def _bound_close_period(self, now: float) -> None:
        """End QUIC's closing or draining period (3 PTO) within :data:`CLOSE_PERIOD_MAX_S` of its start.

        The connection's end reaches the session (and the daemon lets go of the session: its requests, its
        ``max_sessions`` slot, the sessions gauge) only when the period is over, and a PTO grows with the RTT
        estimate, which a lagging event loop at either end inflates: a daemon whose loop lagged for seconds under 64
        answers had an estimate of 37 s (PTO 186 s) and kept a closed client's session for 9 minutes. RFC 9000 10.2
        asks for 3 PTO so that late packets are discarded rather than answered; aioquic answers none in the period
        (it does not even repeat its CONNECTION_CLOSE), and once the connection is gone a server answers a late
        packet for its ID with a Stateless Reset (:meth:`ValidatingQuicServer._answer_unknown`), which a peer that
        saw the close ignores (it is closing or draining) and one that missed it takes as the end it missed: ending
        the period sooner loses nothing. A path's real PTO is far below the bound, and there the period is 3 PTO as
        before.
        """
        quic = self._quic
        if self._close_period_bounded or quic._state not in (QuicConnectionState.CLOSING, QuicConnectionState.DRAINING):
            return
        self._close_period_bounded = True  # (once, from when this side saw it begin)
        if quic._close_at is not None:
            quic._close_at = min(quic._close_at, now + CLOSE_PERIOD_MAX_S)

    def _on_timer(self) -> None:
        self._session_timer = None
        at = self._session_timer_at
        self._session_timer_at = None
        now = self.clock()
        if at is not None:
            now = max(now, at)  # never let a slightly early timer see a time before its deadline
        self._quic.handle_timer(now=now)
        self._process_events()
        events = self.session.run_timers(now)
        if events:
            self.handle_session_events(events)
        self.transmit()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        tune_socket(transport)
        counts = getattr(transport, "received_by_codepoint", None)
        if counts is not None and hasattr(self.session, "ecn_counts"):
            self.session.ecn_counts = lambda: list(counts)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._session_timer is not None:
            self._session_timer.cancel()
            self._session_timer = None
        try:
            self._end_without_transport(exc)
        finally:
            self.socket_closed.set()  # (the transport closes the socket right after this call, in the same callback)

    def _end_without_transport(self, exc: Exception | None) -> None:
        """Deliver the connection's end, once, when its socket goes before aioquic has ended it.

        aioquic queues a local close's ConnectionTerminated for the end of the closing period (its timer, the one
        cancelled above). A socket closed before then (the owner of ``async with connect(...)`` cancelled, the
        loop shutting down) left the session open for ever: another task's answer or fetch waited on, and the
        connection never said it was closed. The end goes through aioquic's own path (``_close_end``), so its
        waiters are released and every subclass sees the ConnectionEnded it handles for any other end; one
        already delivered (state TERMINATED) is not repeated.
        """
        quic = self._quic
        self._process_events()  # (an end aioquic has queued goes out as it is)
        if quic._state is QuicConnectionState.TERMINATED:
            return
        if quic._close_event is None:  # nobody closed it: the socket was closed or failed under the connection
            quic._close_event = qe.ConnectionTerminated(
                error_code=QuicErrorCode.INTERNAL_ERROR, frame_type=None,
                reason_phrase=f"socket closed before the connection ended{f': {exc}' if exc else ''}")
        quic._close_end()
        self._process_events()


class ValidatingQuicServer(QuicServer):
    """aioquic's ``QuicServer`` with address validation (Retry, RFC 9000 8.1.2) switched at run time.

    aioquic decides per server: with a token handler every new client gets a Retry and every token is checked;
    without one a token is ignored. Switching the handler off while a client was between our Retry and its
    Initial with the token made that handshake fail ("original_destination_connection_id does not match").
    Here the handler, once made, stays for tokens: an Initial that carries one is always checked, and one
    without is answered with a Retry only while :attr:`issue_retry` is on.

    With a ``resetter`` (:class:`~.stateless_reset.Resetter`; :func:`serve_quic` makes one for every server) its
    connections' IDs get the tokens its key gives them, and a short-header datagram of a connection it does not
    know is answered with a Stateless Reset (RFC 9000 10.3): the clients of a process before it (a restart with the
    same key) learn in one round trip that their connection is gone, instead of after their idle timeout.
    """

    issue_retry = False
    retry_handler: Any = None  # aioquic's QuicRetryTokenHandler (an RSA key: made by the owner on first need)
    # False: every datagram is dropped unread (its client's Initial is sent again): the owner has bound the port and
    # is not ready to serve yet (the daemon's KV codec warm-up, seconds during which a stop signal could not drain)
    accepting = True

    def __init__(self, *, resetter: Resetter | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.resetter = resetter
        if resetter is not None:  # (aioquic makes each connection, then calls this with it before it reads a datagram)
            self._create_protocol = _WithResetTokens(self._create_protocol, resetter)
        self._table = ProtocolTable()  # (aioquic's plain dict: a connection's end walked every entry)
        self._protocols = self._table
        # set once the transport has let go of the listening socket (it closes it right after connection_lost, in the
        # same callback): what wait_released waits for
        self.socket_closed = asyncio.Event()

    def connection_lost(self, exc: Exception | None) -> None:
        self.socket_closed.set()

    async def wait_released(self) -> None:
        """After :meth:`close`, return once the listening socket is closed, so that its port can be bound again.

        ``close()`` only schedules it (the transport closes the socket on a later loop turn, once its queued
        datagrams, the connections' CONNECTION_CLOSEs, went out): a server closed and waited for, then started again
        on the same port, failed with "Address already in use". Queued datagrams get :data:`SOCKET_FLUSH_S` to go
        out, then are dropped, as a client's are (:func:`close_and_release`).
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SOCKET_FLUSH_S):
                await self.socket_closed.wait()
        if not self.socket_closed.is_set() and self._transport is not None:
            self._transport.abort()  # (what is still queued is dropped: the socket closes on the next loop turn)
            await asyncio.sleep(0)  # that turn: the transport's close callback runs before this task resumes

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        if not self.accepting:
            datagrams_dropped["not_accepting"] += 1
            # a short header's is of a connection of a process before this one, unless the table has its ID: reset
            self._answer_unknown(data, addr)  # type: ignore[arg-type]  # datagrams are bytes
            return
        self.choose_retry(data)
        table = self._table
        table.found = None
        super().datagram_received(data, addr)
        if table.found is not True:  # (the packet path: a connection's datagram costs this test and the lookup's)
            self._count_drop(data, table.found, addr)

    def _count_drop(self, data: bytes | str, found: bool | None, addr: NetworkAddress) -> None:
        """Count ``data`` in :data:`datagrams_dropped` if aioquic dropped it: it reached no connection (``found``:
        False when its lookup missed, None when aioquic returned before it), and answer a short header's with a
        Stateless Reset (:meth:`_answer_unknown`). Parsed again, only here: on a miss or before any lookup, a
        datagram is junk, a new connection's Initial, or one aioquic answered."""
        try:
            header = pull_quic_header(Buffer(data=bytes(data)),  # type: ignore[arg-type]  # datagrams are bytes
                                      host_cid_length=self._configuration.connection_id_length)
        except ValueError:
            datagrams_dropped["malformed"] += 1
            return
        if found is None:
            return  # a version this server lacks: answered with a Version Negotiation
        if header.packet_type != QuicPacketType.INITIAL or len(data) < SMALLEST_MAX_DATAGRAM_SIZE:
            datagrams_dropped["unknown_connection"] += 1
            if header.packet_type == QuicPacketType.ONE_RTT:  # (never a long header's: RFC 9000 10.3)
                self._answer_unknown(data, addr)  # type: ignore[arg-type]  # datagrams are bytes
        # (else a connection was made for it, or it was answered with a Retry or an INVALID_TOKEN close)

    def _answer_unknown(self, data: bytes, addr: NetworkAddress) -> None:
        """Answer a short-header datagram that no connection of this server took with a Stateless Reset, if this
        server has a :attr:`resetter` and its rules allow one (smaller than the datagram, within the send limit:
        :meth:`~.stateless_reset.Resetter.reply`). Counted in :data:`stateless_resets`.

        Never for a connection ID in this server's table: a live connection's datagram that was not read (the port
        not :attr:`accepting` for a while, e.g. ``KVServer.accepting`` set False, which reset every connection) is
        dropped, as any other, and the connection goes on once the port accepts again."""
        resetter = self.resetter
        if resetter is None or self._transport is None:
            return
        if data[1:1 + resetter.cid_length] in self._table:
            return
        limited = resetter.limited
        reset = resetter.reply(data, time.monotonic())
        if reset is None:
            stateless_resets["limited"] += resetter.limited - limited
            return
        stateless_resets["sent"] += 1
        self._transport.sendto(reset, addr)

    def _connection_terminated(self, protocol: QuicConnectionProtocol) -> None:
        """Forget ``protocol``'s connection IDs, and only those. aioquic's walks every ID of every connection for
        each one that ends: 1,500 silent clients timing out together stalled the daemon's loop 15-30 s (a first
        token came after 28 s to a client it was serving), the cost growing with the square of the connections."""
        self._protocols.forget(protocol)  # type: ignore[attr-defined]  # a ProtocolTable: __init__

    def choose_retry(self, data: bytes | str) -> None:
        """Set aioquic's handler for this datagram: on to send a Retry or to check a token, else off."""
        if self.retry_handler is not None:
            retry = self.retry_handler if self.issue_retry or _initial_token(data, self) else None
            self._retry = retry  # type: ignore[assignment]  # aioquic annotates it without None, and tests for None


class _WithResetTokens:
    """A server's ``create_protocol`` that first gives the new connection's IDs the tokens of ``resetter``'s key
    (:func:`give_reset_tokens`)."""

    __slots__ = ("_create", "_resetter")

    def __init__(self, create: Callable[..., QuicConnectionProtocol], resetter: Resetter) -> None:
        self._create = create
        self._resetter = resetter

    def __call__(self, connection: QuicConnection, *args: Any, **kwargs: Any) -> QuicConnectionProtocol:
        give_reset_tokens(connection, self._resetter)
        return self._create(connection, *args, **kwargs)


def give_reset_tokens(quic: QuicConnection, resetter: Resetter) -> None:
    """Give a server connection's IDs the stateless reset tokens of ``resetter``'s key, in place of aioquic's
    (==1.7.2) random ones: its first (sent in the transport parameters, which aioquic writes when it reads the
    client's first Initial: call this before) and those it issues later in NEW_CONNECTION_ID frames (aioquic's
    ``_replenish_connection_ids``, replaced on this instance, as :mod:`.datagram_hook` replaces a writer).
    tests/test_stateless_reset.py pins the aioquic names."""
    for cid in quic._host_cids:
        cid.stateless_reset_token = resetter.token(cid.cid)
    quic._replenish_connection_ids = _Replenish(quic, resetter)  # type: ignore[method-assign]


class _Replenish:
    """aioquic's ``_replenish_connection_ids`` with the new IDs' tokens from a :class:`Resetter`. It holds its
    connection weakly: set on the connection itself, a strong reference would make one more reference cycle for
    the garbage collector (see :meth:`SessionProtocol._release_ended`)."""

    __slots__ = ("_quic", "_resetter")

    def __init__(self, quic: QuicConnection, resetter: Resetter) -> None:
        self._quic = weakref.ref(quic)
        self._resetter = resetter

    def __call__(self) -> None:
        quic = self._quic()
        if quic is None:
            return
        QuicConnection._replenish_connection_ids(quic)
        for cid in quic._host_cids:
            if not cid.was_sent:  # (the new ones: a token already sent is never changed)
                cid.stateless_reset_token = self._resetter.token(cid.cid)


class ProtocolTable(dict[bytes, QuicConnectionProtocol]):
    """aioquic's table of connection IDs to their connections, with each connection's IDs beside it, so that a
    connection's end removes its own IDs without a walk over every connection's (:meth:`forget`). aioquic writes
    the table with ``table[cid] = protocol``, ``del table[cid]`` and ``clear()``, which keep both in step."""

    def __init__(self) -> None:
        super().__init__()
        self._cids: dict[QuicConnectionProtocol, set[bytes]] = {}
        # whether aioquic's lookup of the last datagram's connection found one (None: no lookup since the server
        # reset it); aioquic looks up each datagram once with get(), which this class's own methods do not call
        self.found: bool | None = None

    def get(self, cid: bytes, default: Any = None) -> Any:  # type: ignore[override]  # (dict.get's overloads)
        protocol = dict.get(self, cid, default)
        self.found = protocol is not None
        return protocol

    def __setitem__(self, cid: bytes, protocol: QuicConnectionProtocol) -> None:
        old = dict.get(self, cid)
        if old is not None and old is not protocol:  # (an ID issued again to another connection: moves with it)
            self._drop(cid, old)
        super().__setitem__(cid, protocol)
        self._cids.setdefault(protocol, set()).add(cid)

    def __delitem__(self, cid: bytes) -> None:
        protocol = self[cid]
        super().__delitem__(cid)
        self._drop(cid, protocol)

    def clear(self) -> None:
        super().clear()
        self._cids.clear()

    def forget(self, protocol: QuicConnectionProtocol) -> None:
        """Remove every ID of ``protocol`` (none left for one not in the table)."""
        for cid in self._cids.pop(protocol, ()):
            if dict.get(self, cid) is protocol:
                super().__delitem__(cid)

    def ids_of(self, protocol: QuicConnectionProtocol) -> frozenset[bytes]:
        """The IDs ``protocol`` is found by now."""
        return frozenset(self._cids.get(protocol, ()))

    def _drop(self, cid: bytes, protocol: QuicConnectionProtocol) -> None:
        cids = self._cids.get(protocol)
        if cids is not None:
            cids.discard(cid)
            if not cids:
                del self._cids[protocol]


def _initial_token(data: bytes | str, server: QuicServer) -> bool:
    """Whether ``data`` is an Initial, for no connection yet, that carries a token (a client answering a Retry)."""
    try:
        header = pull_quic_header(Buffer(data=bytes(data)),  # type: ignore[arg-type]  # datagrams are bytes
                                  host_cid_length=server._configuration.connection_id_length)
    except ValueError:
        return False
    return (header.packet_type == QuicPacketType.INITIAL and bool(header.token)
            and header.destination_cid not in server._protocols)


async def serve_quic(
    host: str, port: int, *, configuration: Any, create_protocol: Callable, ecn: bool = False, accepting: bool = True,
    reset_key: bytes | None = None,
) -> ValidatingQuicServer:
    """aioquic's ``serve``, optionally on the ECN-capable transport (per-packet codepoints); ValueError for a
    port outside 0..65535. ``accepting=False``: bound, every datagram dropped unread until the owner sets
    :attr:`ValidatingQuicServer.accepting` (its start gate): set by the caller after this returned, a datagram
    read in the loop turn between (the ECN path awaits one here) was served before the gate closed.

    Stateless Resets (RFC 9000 10.3; :mod:`.stateless_reset`): the server's key is ``reset_key``, else derived
    from ``configuration``'s TLS private key, this host's name (``socket.gethostname()``) and ``host`` and the port
    bound (:func:`~.stateless_reset.static_key`): a restart on the same host with the same key file and address
    answers its clients' old connections with resets, and another host of a fleet with the same key file and
    address has other tokens (no reset oracle across hosts, RFC 9000 21.11). A key made for
    this process (an ephemeral self-signed certificate) gives a key no later process has: its clients wait for
    their idle timeout, as before. The key is made once here: a certificate reloaded later does not change it."""
    check_port(port, listening=True)
    sock = open_udp_socket(host, port)
    try:
        if reset_key is None:
            reset_key = static_key(private_key_der(getattr(configuration, "private_key", None)),
                                   f"{host}|{sock.getsockname()[1]}", socket.gethostname())
        resetter = Resetter(reset_key, configuration.connection_id_length)
    except BaseException:
        sock.close()
        raise

    def make() -> ValidatingQuicServer:
        server = ValidatingQuicServer(configuration=configuration, create_protocol=create_protocol, resetter=resetter)
        server.accepting = accepting  # before its transport exists: gated from the first datagram read
        return server

    if not ecn:
        # our own socket, as on the ECN path: "[::]" is dual-stack whatever net.ipv6.bindv6only says (aioquic's
        # serve took the kernel default, so such a host served IPv6 only unless marking was on)
        try:
            _, server = await asyncio.get_running_loop().create_datagram_endpoint(make, sock=sock)
        except BaseException:
            sock.close()
            raise
        return server
    try:
        server = make()
        EcnDatagramTransport(sock, server)
    except BaseException:
        sock.close()
        raise
    await asyncio.sleep(0)  # connection_made runs on the next loop turn
    return server


@contextlib.asynccontextmanager
async def connect_quic(
    host: str, port: int, *, configuration: Any, create_protocol: Callable, ecn: bool | None = None
) -> AsyncIterator[QuicConnectionProtocol]:
    """aioquic's ``connect``, on the ECN-capable transport (reads received codepoints) when ``ecn`` is True, or
    is None (the default) and the platform can (:func:`~.ecn_socket.ecn_supported`).

    Leaving it sends CONNECTION_CLOSE and closes the socket before it returns (:func:`close_and_release`), without
    waiting out QUIC's closing period; aioquic's ``connect`` waited it out in the caller's time, and leaked the
    socket when that wait was cancelled.
    """
    check_port(port)
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    addr: tuple[Any, ...] = infos[0][4]
    if len(addr) == 2:  # IPv4: talk to it from a dual-stack socket as a v4-mapped address
        addr = ("::ffff:" + addr[0], addr[1], 0, 0)
    if configuration.server_name is None:
        configuration.server_name = host
    protocol = create_protocol(QuicConnection(configuration=configuration))
    sock = open_udp_socket("::", 0, locked_port=True)  # (a port the socket keeps when its association is dissolved)
    transport: asyncio.DatagramTransport | None = None
    try:
        if ecn_supported() if ecn is None else ecn:
            transport = EcnDatagramTransport(sock, protocol)
            await asyncio.sleep(0)  # connection_made
        else:
            transport, _ = await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
    except BaseException:
        if transport is None:
            sock.close()
        else:
            transport.close()
        raise
    try:
        protocol.connect(addr)
        await protocol.wait_connected()
        yield protocol
    finally:
        await close_and_release(protocol, transport)


SOCKET_FLUSH_S = 1.0
"""How long leaving a client connection waits for its transport to close the socket. It closes on the next loop
turn, unless datagrams are still queued in the transport (a full kernel buffer): then they are given this long to
go out, and dropped after it."""


async def close_and_release(protocol: QuicConnectionProtocol, transport: asyncio.DatagramTransport) -> None:
    """Close the connection (CONNECTION_CLOSE goes out in this call) and its socket, returning once the socket is
    closed: nothing is left on the loop for it.

    The closing period ran on in a background task, which closed the socket at its end (3 PTO). Only
    ``asyncio.run``'s shutdown sweep ended that task early: an application driving its own loop
    (``run_until_complete``, then ``loop.close()``) leaked a UDP socket and a pending task per connection
    ("Task was destroyed but it is pending!"). Nothing is lost by not waiting: aioquic ignores every packet in the
    closing state and never repeats its CONNECTION_CLOSE, so the period did no more than keep the socket open, and
    RFC 9000 10.2 lets an endpoint that closes its UDP socket end the closing state early. A server that missed the
    one close (it was lost) holds the session until its idle timeout, as before.
    """
    try:
        protocol.close()
    finally:
        transport.close()  # (once what is queued has gone out: a datagram transport flushes before it closes)
    closed = protocol.socket_closed if isinstance(protocol, SessionProtocol) else None
    if closed is not None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SOCKET_FLUSH_S):
                await closed.wait()
    if closed is None or not closed.is_set():
        transport.abort()  # (what is still queued is dropped: the socket closes on the next loop turn)
        await asyncio.sleep(0)  # that turn: the transport's close callback runs before this task resumes


@contextlib.asynccontextmanager
async def open_client(
    host: str, port: int, *, configuration: Any, create_protocol: Callable[..., SessionProtocol],
    ecn: bool | None = None, timeout: float = 10.0,
) -> AsyncIterator[SessionProtocol]:
    """:func:`connect_quic` for the SDK's clients, with errors a caller can act on.

    No answer within ``timeout`` seconds: :class:`~.errors.ConnectTimeout` saying so (aioquic would wait for its
    idle timeout). The server answered but the handshake failed: :class:`HandshakeError` with the reason and
    the TLS alert (aioquic raises a ConnectionError without a message). The host refused the first packet (Linux:
    ICMP port unreachable, nothing listens there) before the server sent anything: :class:`~.errors.ConnectRefused`
    at once, not after ``timeout``. A name that does not resolve, or
    another failure to connect: :class:`~.errors.ConnectError`. All are ``TokenwireError`` and
    ``ConnectionError`` (they were ``ConnectionError`` only, which an application catching ``TokenwireError``
    missed). A port outside 1..65535 or a ``timeout`` that is not a positive number of seconds: ``ValueError``.
    """
    check_seconds("timeout", timeout, finite=False)
    made: list[SessionProtocol] = []

    def make(*args: Any, **kwargs: Any) -> SessionProtocol:
        made.append(create_protocol(*args, **kwargs))
        return made[-1]

    cm = connect_quic(host, port, configuration=configuration, create_protocol=make, ecn=ecn)
    try:
        async with asyncio.timeout(timeout):
            protocol = cast(SessionProtocol, await cm.__aenter__())  # made by make()
    except TimeoutError:
        raise ConnectTimeout(f"no QUIC handshake with {host}:{port} within {timeout:g} s") from None
    except socket.gaierror as exc:  # an OSError, not a ConnectionError: callers catching those saw a traceback
        raise ConnectError(f"cannot resolve {host}: {exc.strerror or exc}") from None
    except UnicodeError as exc:  # a name IDNA cannot encode ("bad..name", a label over 63 characters)
        raise ConnectError(f"cannot resolve {host!r}: not a valid host name ({exc})") from None
    except ConnectionError as exc:
        if made and made[0].connect_refused:
            raise ConnectRefused(f"nothing listening at {host}:{port} (connection refused)") from None
        ended = made[0].terminated if made else None
        if ended is None or exc.args:  # (not the handshake's end: a socket's error, which carries its words)
            raise ConnectError(f"cannot connect to {host}:{port}: {str(exc) or type(exc).__name__}") from exc
        if ended.reason_phrase == AIOQUIC_IDLE_REASON:
            # an idle timeout shorter than ``timeout`` ended the wait: nobody answered (not "handshake failed: Idle
            # timeout", which read as a server's refusal while the path was down)
            raise ConnectTimeout(f"no QUIC handshake with {host}:{port} within {configuration.idle_timeout:g} s "
                                 "(the connection's idle timeout)") from None
        raise _handshake_failure(host, port, ended) from None
    try:
        yield protocol
    finally:
        await cm.__aexit__(None, None, None)
