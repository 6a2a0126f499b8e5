"""One chat client's QUIC connection: :class:`DaemonProtocol`, the thin asyncio shell around a sans-I/O
:class:`~tokenwire.transport.server_session.ServerSession`. It counts the session once its handshake completes (the
client certificate checked, ``limits.max_sessions`` kept), holds its client's authorization state (the token or
certificate it came with, whether a reload revoked it), and hands each session event to its
:class:`~tokenwire.daemon.service.Daemon`, which decides what a request starts and what a connection's end
leaves running.

Split out of ``service.py`` (which re-exports :class:`DaemonProtocol` and ``UNAUTHORIZED_CREDIT_REQUESTS``): the
per-connection shell is a class of its own with one explicit link to the daemon it serves, while the daemon's
module keeps the orchestration of every connection, answer and listener.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

from aioquic.quic import events as qe
from aioquic.quic.connection import QuicConnection, QuicConnectionState

from tokenwire.transport.chatterbox import SenderStats
from tokenwire.transport.errors import ErrorCode
from tokenwire.transport.handshake_guard import ClientCertificateError, GuardedProtocol, verify_peer_certificate
from tokenwire.transport.read_credit import ReadCredit
from tokenwire.transport.server_session import ServerSession
from tokenwire.transport.session_events import (
    ClientReport,
    ConnectionEnded,
    RequestCancelled,
    RequestCompleted,
    RequestReceived,
    RequestRefused,
    SessionEvent,
)
from tokenwire.transport.tls import request_client_certificate

from .certificates import cert_principal
from .config import TokenEntry
from .transcripts import LiveRequest

if TYPE_CHECKING:
    from .service import Daemon

# the daemon's logger (not this module's name): operators and tests filter the daemon's lines by it
log = logging.getLogger("tokenwire.daemon")
# Before its first authorized request, a connection (auth tokens configured) gets connection-level credit of this many
# maximal requests, plus its first stream's request (see ReadCredit.hold_until_authorized): an unauthenticated one
# made the daemon hold 64 streams of 1 MiB requests short of their last byte (+75 MiB RSS for 42 s), and 3 at most
# now. Three maximal first requests sent at once still come whole; the full window follows the first authorized one.
UNAUTHORIZED_CREDIT_REQUESTS = 2
# What a terminated aioquic (==1.7.2) QuicConnection holds and no longer reads, emptied at the connection's end
# (DaemonProtocol._release_ended): its streams (their send and receive buffers: in the table, the send queue and the
# blocked lists), its TLS send buffers (3 x 16 KiB), its handshake streams, its keys and its frame handlers (bound
# methods). tests/test_gc_stall_fixes.py pins the names.
RELEASED_AT_END = ("_streams", "_streams_queue", "_streams_blocked_bidi", "_streams_blocked_uni", "_crypto_streams",
                   "_crypto_buffers", "_cryptos", "_cryptos_initial", "_QuicConnection__frame_handlers")


class DaemonProtocol(GuardedProtocol):
    """One client connection."""

    def __init__(self, quic: QuicConnection, stream_handler: Any = None, *, daemon: Daemon) -> None:
        limits = daemon.config.limits
        super().__init__(
            quic,
            stream_handler,
            session_factory=lambda q: ServerSession(
                q,
                max_requests=limits.max_requests_per_connection,
                max_redundant_tokens=limits.max_redundant_tokens,
                max_request_bytes=limits.max_request_bytes,
                marking=daemon.marking.new_policy(),
                request_timeout=limits.request_timeout_s,
                setting_prefix="limits.",  # its refusals name the daemon's settings
            ),
        )
        self.daemon = daemon
        self.principal: str | None = None
        self.refused = 0  # requests refused by the session (over a limit, too large): logged once, then counted
        # With server.client_ca, not before the handshake's certificate check: True from the start (no tokens), a
        # request in the same datagram as a certless client's Finished started an answer for nobody
        self._authorized = not daemon.config.auth.required and daemon.client_verifier is None
        if daemon.config.auth.required and isinstance(quic, ReadCredit):  # (the session made it one)
            quic.hold_until_authorized(UNAUTHORIZED_CREDIT_REQUESTS * limits.max_request_bytes)
        self.token: TokenEntry | None = None  # the [auth] entry that authorized it, re-checked on SIGHUP
        # the sha256 of the token its client sent while no tokens were configured (nothing checked it then): a
        # reload adding that token keeps it authorized, as the SDK does not send it again once answered
        self.sent_token_sha256: str | None = None
        # why a reload took its authorization away, what its next requests hear (reload_decisions.REVOKED or
        # NOW_REQUIRED); None: it did not. The client does not send a token again
        self.revoked: str | None = None
        self.attached: dict[int, LiveRequest] = {}
        # requests whose outcome (tokenwire_requests_ended_total) the daemon counted when it closed this connection:
        # the session still holds them, and reports them again at the end (Daemon._request_ended)
        self.outcome_counted: set[int] = set()
        if daemon.client_verifier is not None:
            request_client_certificate(quic)
        self.ended = False
        # A session counts (max_sessions, the sessions gauge) once its handshake completes: one Initial
        # datagram each (spoofable: no Retry) held every slot until the idle timeout and locked all clients
        # out. Handshakes in progress have a deadline and a bound of their own.
        self.established = False
        self._reported = SenderStats()
        self._reported_acks = 0
        self._reported_ce = 0
        self._reported_unvalidated = 0  # ECN validation failures of this connection, counted so far
        daemon.protocols.add(self)
        self.guard_handshake(daemon.handshake_guard)  # its deadline, the bound, Retry under load (shared with KV)

    @property
    def server_session(self) -> ServerSession:
        assert isinstance(self.session, ServerSession)
        return self.session

    @property
    def authorized(self) -> bool:
        """Whether its requests may start answers (a valid token, a valid certificate, or no auth configured)."""
        return self._authorized

    @authorized.setter
    def authorized(self, value: bool) -> None:
        self._authorized = value
        if value:  # its client has proven itself: the full flow-control window, and no eviction past max_sessions
            self.daemon.forget_unauthorized(self)
            if isinstance(self._quic, ReadCredit):
                self._quic.release_credit()

    @property
    def closing(self) -> bool:
        """Closed, or closing (by this side or the peer): nothing may start on it any more."""
        return self.ended or self.quic_closing

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        super().datagram_received(data, addr)
        if self in self.daemon.unauthorized:  # what it may make the daemon hold, before it authorizes
            self.daemon.account_unauthorized(self, self.held_bytes())

    def transmit_soon(self) -> None:
        """Send what this connection's answers queued once per event-loop turn, not once per token of each.

        A transmit builds datagrams over every stream of the connection: with one per token of each of 64 answers
        the work grew with the square of the answers, the daemon's loop stalled 2-6.5 s (a probe, 64 chats on one
        connection on 2 cores), its RTT estimates grew to 37 s, and a client's close held the session for minutes
        (QUIC's draining period is 3 PTO). A transmit that raises closes this connection alone (INTERNAL).
        """
        if self._transmit_task is None:
            self._transmit_task = self._loop.call_soon(self._transmit_queued)

    def _transmit_queued(self) -> None:
        try:
            self.transmit()
        except Exception:
            log.exception("connection from %s failed while sending; closing it", self.peer)
            # a server error's close is an error sent, as a protocol violation's is (it was in no metric)
            if not self.closing:
                self.daemon.metrics.errors.labels(code=hex(ErrorCode.INTERNAL)).inc()
            with contextlib.suppress(Exception):
                self.close(ErrorCode.INTERNAL, "server error while sending")

    def held_bytes(self) -> int:
        """Bytes of its request streams held: in aioquic's receive buffers, and read into the request decoders
        (what :attr:`Daemon.unauthorized` counts, at each datagram and afresh past its budget)."""
        quic = self._quic
        return (sum(len(s.receiver._buffer) for s in quic._streams.values())
                + sum(r.decoder.pending for r in self.server_session.requests.values()))

    def quic_event_received(self, event: qe.QuicEvent) -> None:
        super().quic_event_received(event)
        if isinstance(event, qe.HandshakeCompleted):
            self._on_handshake()

    def _on_handshake(self) -> None:
        """Check the client's certificate and the session limit, then count the session."""
        self._handshake_done()
        d = self.daemon
        if d.client_verifier is not None:
            try:  # (the KV channel's endpoint makes the same check: verify_peer_certificate)
                name = verify_peer_certificate(self._quic, d.client_verifier)
            except ClientCertificateError as exc:
                d.unauthorized_client(self.peer, str(exc))
                self.server_session.close(ErrorCode.UNAUTHORIZED, exc.close_reason)
                return
            self.principal = cert_principal(name)
            if not d.config.auth.required:
                self.authorized = True
        if d.established >= d.config.limits.max_sessions and not d.evict_unauthorized():
            d.session_refused(self.peer)
            self.server_session.close(ErrorCode.LIMIT_EXCEEDED, "too many sessions")
            return
        self.established = True
        d.established += 1
        d.metrics.sessions.inc()
        d.metrics.sessions_total.inc()
        if not self.authorized:  # what it holds counts from now (Daemon.account_unauthorized), oldest first
            d.count_unauthorized(self)

    def handle_session_events(self, events: list[SessionEvent]) -> None:
        d = self.daemon
        for ev in events:
            if isinstance(ev, RequestReceived):
                if self.closing:
                    # Requests read with a closing connection's last datagram start nothing, and are not counted: a
                    # certless client's came in the datagram of its Finished, read after the certificate check had
                    # closed the connection (or max_sessions had), or after a request with a wrong token had; each
                    # generated an answer for nobody until orphan_timeout_s, filling max_live_answers.
                    d._request_ended(self, ev.stream_id, "refused", closing=True)
                    continue
                if not self.established:  # (1-RTT data comes after the handshake; 0-RTT, if ever, must wait too)
                    d._reject(self, ev.stream_id, ErrorCode.UNAUTHORIZED, "request before the handshake completed")
                    continue
                d.on_request(self, ev.stream_id, ev.request)
            elif isinstance(ev, RequestCompleted):
                self._request_ended(ev.stream_id, "completed")
                d.detach(self, ev.stream_id, cancel=False)
            elif isinstance(ev, RequestCancelled):
                self._request_ended(ev.stream_id, self._cancel_outcome(ev))
                d.detach(self, ev.stream_id, cancel=not ev.lost)
            elif isinstance(ev, ClientReport):
                d.on_report(ev.report)
            elif isinstance(ev, RequestRefused):
                # one warning per connection, the rest at debug and counted (one client refused 1,770 streams
                # a second, each a warning line: a log flood); the total is logged when the connection ends
                self.refused += 1
                (log.warning if self.refused == 1 else log.debug)(
                    "refused a request from %s: %s", self.peer, ev.reason)
                d.metrics.errors.labels(code=hex(ev.code)).inc()
                self._request_ended(ev.stream_id, "refused")
            elif isinstance(ev, ConnectionEnded):
                d.on_connection_end(self, ev)
                self._release_ended()
        self.transmit()

    def _release_ended(self) -> None:
        """Empty what the terminated QUIC connection holds (:data:`RELEASED_AT_END`), so refcounting frees it now.

        aioquic's ``QuicConnection`` is a reference cycle (its frame handlers, its loss recovery's probe callback and
        its TLS callbacks are its bound methods), and this protocol is in one with it (aioquic's server's terminated
        handler): all they referenced waited for a full collection, ~100 KiB (~300 objects) a connection after a short
        chat, megabytes while its streams' buffers held an answer's data. The daemon collected after every
        connection's end instead, and a full collection walks every live session too: up to ~1 s at 3000 sessions,
        after any one close. Emptied, ~30 KiB (~120 objects) are left for a rare collection (Daemon._collect_ended).
        Nothing reads them once terminated: aioquic returns first in that state (receive_datagram, datagrams_to_send,
        get_timer) and the session has dropped its requests."""
        quic = self._quic
        if quic._state is not QuicConnectionState.TERMINATED:  # (ConnectionEnded comes from its end: never so)
            return
        for name in RELEASED_AT_END:
            held = getattr(quic, name, None)  # (a name an aioquic upgrade dropped: left; the pinning test fails)
            if isinstance(held, (dict, list)):
                held.clear()

    def _cancel_outcome(self, ev: RequestCancelled) -> str:
        """How a request the session reports cancelled ended: "lost" or "cancelled" once its answer had started
        (it is attached: on_request attaches every request it accepts), else "refused", as every request that
        ends before an answer starts. A malformed request, or half a REQUEST and then the close, was counted
        "lost": 8 such connections made completed + cancelled + lost + failed exceed tokenwire_requests_total."""
        if ev.stream_id not in self.attached:
            return "refused"
        return "lost" if ev.lost else "cancelled"

    def _request_ended(self, sid: int, outcome: str) -> None:
        """A request the session reports ended: counted by ``outcome`` (tokenwire_requests_ended_total), unless the
        daemon counted it when it closed the connection (a wrong token's request, "refused", came back cancelled
        with the connection's end)."""
        if sid in self.outcome_counted:
            self.outcome_counted.discard(sid)
            return
        self.daemon.metrics.requests_ended.labels(outcome=outcome).inc()

    def flush_counters(self) -> None:
        """Add this connection's packet counters since the last flush to the Prometheus counters."""
        now = self.server_session.totals()
        m = self.daemon.metrics
        prev = self._reported
        m.packets.inc(max(0, now.packets - prev.packets))
        m.redundant_bytes.inc(max(0, now.redundant_bytes - prev.redundant_bytes))
        m.repairs.inc(max(0, now.repairs + now.piggybacks - prev.repairs - prev.piggybacks))
        m.repeats_trimmed.inc(max(0, now.repeats_trimmed - prev.repeats_trimmed))
        acks = self.server_session.acks_received
        m.acks.inc(max(0, acks - self._reported_acks))
        self._reported, self._reported_acks = now, acks
        ce = self.server_session.ce_reported
        self.daemon.marking.add_ce(ce - self._reported_ce)
        self._reported_ce = max(ce, self._reported_ce)
        failed = self.server_session.ecn.failures
        self.daemon.marking.add_validation_failures(failed - self._reported_unvalidated)
        self._reported_unvalidated = failed
