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
import sys
import time
from typing import TYPE_CHECKING, Any

from aioquic.quic import events as qe
from aioquic.quic.connection import QuicConnection

from tokenwire.transport.chatterbox import SenderStats
from tokenwire.transport.errors import ErrorCode
from tokenwire.transport.handshake_guard import ClientCertificateError, GuardedProtocol, verify_peer_certificate
from tokenwire.transport.quic_io import RELEASED_AT_END as RELEASED_AT_END  # (re-exported: moved there)
from tokenwire.transport.read_credit import ReadCredit
from tokenwire.transport.server_session import ServerRequest, ServerSession
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
        self.refusal_logged = False  # its first was logged (not summed up with other connections'): Daemon
        # its requests' session state, kept for their end's DEBUG line (only at that level: Daemon.request_ended)
        self.opened: dict[int, ServerRequest] = {}
        # With server.client_ca, not before the handshake's certificate check: True from the start (no tokens), a
        # request in the same datagram as a certless client's Finished started an answer for nobody
        self._authorized = not daemon.config.auth.required and daemon.client_verifier is None
        # With no auth at all (no tokens, no client CA) it is let in but not admitted until a request of its starts
        # (Admission.request_started): until then it is held and counted as a connection not yet authorized is
        # (eviction past max_sessions, limits.unauthorized_memory_mb). 30 connections that never sent a request held
        # every slot of max_sessions = 30 for good, and 16 with partial requests made the daemon hold 130 MB.
        self._awaiting_request = self._authorized
        # Admitted since (a request of its started) with no auth configured: past max_sessions, once idle the
        # longest (no answer open), it makes room for a new client (Admission.note_idle, evict_idle)
        self.admitted_without_auth = False
        if (daemon.config.auth.required or self._awaiting_request) and isinstance(quic, ReadCredit):  # (the session's)
            # Without auth only the bytes are held, not the streams: a client's first burst of requests (8 chats
            # opened at once) waited a round trip for all but two of them, hidden from its TTFT, which counts from
            # when the stream is let out. The window bounds what the connection makes the daemon hold either way.
            quic.hold_until_authorized(UNAUTHORIZED_CREDIT_REQUESTS * limits.max_request_bytes,
                                       streams=UNAUTHORIZED_CREDIT_REQUESTS if daemon.config.auth.required
                                       else sys.maxsize)  # (sys.maxsize: every stream the session advertises)
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
        self._initial_host: str | None = None  # (peer_host)
        self._handshake_only: set[Any] = set()  # paths of another host, validated by a Handshake packet alone
        self._reported = SenderStats()
        self._reported_acks = 0
        self._reported_ce = 0
        self._reported_unvalidated = 0  # ECN validation failures of this connection, counted so far
        self._reported_path_changes = 0  # its peer's moves to another address or port, counted so far
        self._reported_drains = 0  # the drains of a standing queue its session began, counted so far
        self.datagrams_in = 0  # datagrams received (with the session's datagrams_sent: add_counters' skip)
        self._counted_at: tuple[int, int] | None = None  # (datagrams_in, datagrams_sent) when last counted
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
            self.daemon.admission.forget_unauthorized(self)
            if isinstance(self._quic, ReadCredit):
                self._quic.release_credit()

    @property
    def peer_host(self) -> str:
        """The peer's address now, without its port ("?" before its first datagram): whom an answer counts toward
        with no auth (limits.max_live_answers_per_client; answers.client_key)."""
        # the first validated path: aioquic promotes a path to [0] on any non-probing packet from a new address,
        # before validating it, so a forged source address would otherwise pick the key (and evade or fill a cap).
        # Not a path validated only by a Handshake packet from another host than the first Initial's: aioquic takes
        # any Handshake packet's source as proven, but only the address the server's Initial went to is (a client
        # that forges its Finished's source address picked the key that way): such a path keys as the Initial's.
        for path in self._quic._network_paths:
            if path.is_validated and path.addr not in self._handshake_only:
                return str(path.addr[0])
        return self._initial_host or "?"

    @property
    def closing(self) -> bool:
        """Closed, or closing (by this side or the peer): nothing may start on it any more."""
        return self.ended or self.quic_closing

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        self.datagrams_in += 1  # (what moves its counters: see add_counters)
        if self._initial_host is None:  # the first Initial's source: where the server's Initial goes
            self._initial_host = str(addr[0])
        super().datagram_received(data, addr)
        if self in self.daemon.admission.unauthorized:  # what it may make the daemon hold, before it authorizes
            self.daemon.admission.account_unauthorized(self, self.held_bytes())
        # (an admitted connection's note_idle ran in the transmit that ends every datagram_received)

    def answering(self) -> bool:
        """Whether an answer of its is open: a request read whole whose answer has not gone out whole (its FINISHED
        not sent yet, or tokens of it never sent yet: a datagram scheme's sender paces them, and a resume of a
        finished answer has FINISHED out at its start). A connection without one is idle (Admission.evict_idle),
        though a request of its may still be arriving (half a prompt sent again every limits.request_timeout_s would
        keep it from ever being idle, at no cost), or an answer sent whole may wait for its client's acks, repairs
        and FIN (held back, the same; an honest client is done within round trips: IDLE_EVICTION_FLOOR_S is its
        time)."""
        return any(r.request is not None and (not r.finished_sent
                                              or (r.sender is not None and r.sender.holds_new_tokens()))
                   for r in self.server_session.requests.values())

    def transmit_soon(self) -> None:
        """Send what this connection's answers queued once per event-loop turn, not once per token of each.

        A transmit builds datagrams over every stream of the connection: with one per token of each of 64 answers
        the work grew with the square of the answers, the daemon's loop stalled 2-6.5 s (a probe, 64 chats on one
        connection on 2 cores), its RTT estimates grew to 37 s, and a client's close held the session for minutes
        (QUIC's draining period is 3 PTO). A transmit that raises closes this connection alone (INTERNAL).
        """
        if self._transmit_task is None:
            self._transmit_task = self._loop.call_soon(self._transmit_queued)

    def transmit(self) -> None:
        super().transmit()
        if getattr(self, "admitted_without_auth", False):  # (False until __init__ has set it)
            # an answer that just went out whole makes it idle from now, even if its client sends nothing more
            # (note_idle ran only on datagrams: a client silent after its request held its slot, never closed for
            # room, until the QUIC idle timeout). Every send path: the loop turn's (transmit_soon), the QUIC
            # timer's (tokens held for coalescing or window room go out after FINISHED), a request's end
            self.daemon.admission.note_idle(self, time.monotonic())

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
        (what :attr:`Admission.unauthorized` counts, at each datagram and afresh past its budget)."""
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
        self._handshake_only = {p.addr for p in self._quic._network_paths
                                if p.is_validated and str(p.addr[0]) != self._initial_host}
        d = self.daemon
        if d.client_verifier is not None:
            try:  # (the KV channel's endpoint makes the same check: verify_peer_certificate)
                name = verify_peer_certificate(self._quic, d.client_verifier)
            except ClientCertificateError as exc:
                d.admission.unauthorized_client(self.peer, str(exc))
                self.server_session.close(ErrorCode.UNAUTHORIZED, exc.close_reason)
                return
            self.principal = cert_principal(name)
            if not d.config.auth.required:
                self.authorized = True
        # past max_sessions: the oldest connection not yet admitted makes room, else (no auth configured: a new
        # connection awaits its first request only then) the one idle the longest, else the new client is refused
        if d.admission.established >= d.config.limits.max_sessions and not (
                d.admission.evict_unauthorized()
                or (self._awaiting_request and d.admission.evict_idle(time.monotonic()))):
            d.admission.session_refused(self.peer)
            self.server_session.close(ErrorCode.LIMIT_EXCEEDED, "too many sessions")
            return
        self.established = True
        d.admission.established += 1
        d.metrics.sessions.inc()
        d.metrics.sessions_total.inc()
        if not self.authorized or self._awaiting_request:  # what it holds counts from now, oldest first
            d.admission.count_unauthorized(self, awaiting_request=self._awaiting_request)

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
                # a second, each a warning line: a log flood); the total is logged when the connection ends.
                # Across connections, a flood limiter (Daemon.request_refused)
                self.refused += 1
                d.request_refused(self, ev.reason)
                d.metrics.errors.labels(code=hex(ev.code)).inc()
                self._request_ended(ev.stream_id, "refused")
            elif isinstance(ev, ConnectionEnded):
                d.on_connection_end(self, ev)  # (SessionProtocol empties the ended connection after this call)
        self.transmit()

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
        self.daemon.request_ended(self, sid, outcome)

    def add_counters(self, into: CounterDeltas) -> None:
        """Add this connection's counters since the last time to ``into`` (the housekeeping's sum over every
        connection); nothing, reading nothing, when it has neither received nor sent a datagram since.

        Each second the daemon flushed every connection's counters: its totals() (every running request's sender
        stats), six Prometheus inc() calls (a lock each) and two marking calls, 27-148 ms a tick at 3,000 idle
        sessions. What they count moves only with a datagram: acks, ECN reports and repair requests come in one
        (datagram_received), token packets and ECN validation's verdict (taken as the packets are built, or on an
        acknowledgement: in the transmit that follows the datagram) go out in one (the session's datagrams_sent), so
        a connection quiet since the last flush has nothing to add. The sum is counted once per metric
        (:meth:`CounterDeltas.flush`)."""
        mark = (self.datagrams_in, self.server_session.datagrams_sent)
        if mark == self._counted_at:
            return
        self._counted_at = mark
        _add_counters(self, into)

    def flush_counters(self) -> None:
        """Add this connection's packet counters since the last flush to the Prometheus counters (at its end: every
        one, whatever moved it)."""
        deltas = CounterDeltas()
        _add_counters(self, deltas)
        deltas.flush(self.daemon)


class CounterDeltas:
    """What the connections' counters moved since their last flush, summed: each metric is counted once a tick,
    not once per connection."""

    __slots__ = ("acks", "ce", "drains", "packets", "path_changes", "redundant_bytes", "repairs", "repeats_capped",
                 "repeats_trimmed", "unvalidated")

    def __init__(self) -> None:
        self.packets = self.redundant_bytes = self.repairs = self.repeats_trimmed = self.repeats_capped = 0
        self.acks = self.ce = self.unvalidated = self.path_changes = self.drains = 0

    def flush(self, daemon: Daemon) -> None:
        """Count the sums in the daemon's metrics (a metric that did not move is not touched)."""
        m = daemon.metrics
        for counter, n in ((m.packets, self.packets), (m.redundant_bytes, self.redundant_bytes),
                           (m.repairs, self.repairs), (m.repeats_trimmed, self.repeats_trimmed),
                           (m.repeats_capped, self.repeats_capped),
                           (m.acks, self.acks), (m.path_changes, self.path_changes), (m.path_drains, self.drains)):
            if n:
                counter.inc(n)
        daemon.marking.add_ce(self.ce)
        daemon.marking.add_validation_failures(self.unvalidated)


def _add_counters(proto: DaemonProtocol, into: CounterDeltas) -> None:
    """Add ``proto``'s counters since its last flush to ``into`` and note them flushed (each delta as the
    per-connection flush counted it: never negative)."""
    sess = proto.server_session
    now = sess.totals()
    prev = proto._reported
    into.packets += max(0, now.packets - prev.packets)
    into.redundant_bytes += max(0, now.redundant_bytes - prev.redundant_bytes)
    into.repairs += max(0, now.repairs + now.piggybacks - prev.repairs - prev.piggybacks)
    into.repeats_trimmed += max(0, now.repeats_trimmed - prev.repeats_trimmed)
    into.repeats_capped += max(0, now.repeats_capped - prev.repeats_capped)
    acks = sess.acks_received
    into.acks += max(0, acks - proto._reported_acks)
    proto._reported, proto._reported_acks = now, acks
    ce = sess.ce_reported
    into.ce += max(0, ce - proto._reported_ce)
    proto._reported_ce = max(ce, proto._reported_ce)
    failed = sess.ecn.failures
    into.unvalidated += max(0, failed - proto._reported_unvalidated)
    proto._reported_unvalidated = failed
    moved = sess.path_changes
    into.path_changes += max(0, moved - proto._reported_path_changes)
    proto._reported_path_changes = moved
    drains = sess.drains
    into.drains += max(0, drains - proto._reported_drains)
    proto._reported_drains = drains
