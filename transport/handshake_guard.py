"""Defences of a QUIC listener against handshake floods and unverified clients, shared by the daemon's chat port
and the KV channel's endpoint (the KV port had none of them: 3,000 half-open Initials held ~90 KB each, +271 MiB,
for the whole 60-s idle timeout, and a client without a certificate was served with ``server.client_ca`` set).

aioquic makes a connection's state for every Initial datagram, which anyone can send from any (spoofed) address.
A :class:`HandshakeGuard` watches the handshakes of one or more listeners (:class:`GuardedProtocol` connections):

* a **deadline**: a handshake from an unproven address is closed after ``timeout_s``; one whose client has proven
  its address (our Retry's token, or a Handshake packet: it had our first flight), or any while Retry is on, may
  take ``proven_timeout_s`` from its start (loaded clients finish late);
* a **bound**: past ``limit()`` handshakes in progress a new one is closed at once;
* **Retry** (RFC 9000 8.1.2): from ``retry_threshold()`` handshakes in progress, new clients must prove their
  address first (one round trip more), so spoofed Initials create no state; off again once the load has stayed
  below half of that for a whole ``timeout_s``.

:func:`verify_peer_certificate` is the client-certificate check both ports make when the handshake completes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from aioquic.quic import events as qe
from aioquic.quic.connection import QuicConnection

from .errors import ErrorCode
from .quic_io import SessionProtocol, ValidatingQuicServer
from .session_events import AIOQUIC_IDLE_REASON
from .tls import ClientCertVerifier

log = logging.getLogger("tokenwire.transport")

# A handshake from an unproven address (maybe spoofed: no Retry token, no Handshake packet from it) is closed after
# this; the SDK client's own connect timeout is 10 s too
HANDSHAKE_TIMEOUT_S = 10.0
# One whose client has proven its address, or any while Retry is on, may take until this since it began. 10 s for all
# closed handshakes that loaded clients had finished on their side (1,000 at once on 2 busy cores: 822 "connected",
# then closed before their first request). Unproven ones cannot pile up meanwhile: with Retry on, every new
# connection comes with a token.
HANDSHAKE_PROVEN_TIMEOUT_S = 30.0
# With this many handshakes in progress (or half of the bound, if fewer), new clients must prove their address first
RETRY_ABOVE = 64
RELAX_EVERY_S = 1.0  # how often a guard that runs its own timer checks whether Retry may go off
# Refusals a flood repeats (past the connection limit, unauthorized clients, evictions): the first is a warning, the
# rest are counted and summed up at most this often (RefusalLog)
REFUSALS_LOG_S = 60.0
# Why a guard closed or lost a handshake (HandshakeGuard.refused, the metrics' reason label): past the bound; not
# completed within its deadline, or by the QUIC idle timeout (server.idle_timeout_s may be shorter than the
# deadline); ended otherwise before it completed (a TLS error such as no common ALPN, a client that rejected the
# certificate or gave up and closed). Every handshake that does not complete is counted under one of them, once.
HANDSHAKE_REFUSAL_REASONS = ("too_many", "timeout", "failed")
# An upper bound of one packet of a handshake's CONNECTION_CLOSE, without its reason phrase: a long header with
# 20-byte connection IDs (~54 B), the close frame (1 + 3 varints) and the AEAD tag (16 B)
CLOSE_PACKET_BYTES_MAX = 128


def retry_threshold(limit: int, above: int = RETRY_ABOVE) -> int:
    """Handshakes in progress that turn Retry on: ``above``, or half of ``limit`` when that is less (handshakes in
    progress never exceed the limit: with a small one, Retry never came on and spoofed Initials held every slot)."""
    return max(1, min(above, limit // 2))


class HandshakeGuard:
    """The handshakes in progress on a set of listeners (:attr:`servers`), their bound, and address validation.

    ``limit``: the most handshakes in progress (read at each new one: a reload may change it). ``threshold``: what
    turns Retry on (default :func:`retry_threshold` of ``limit()``). ``on_refused(reason)``: a handshake closed or
    lost, one of HANDSHAKE_REFUSAL_REASONS (for a metric); ``on_retry(active)``: Retry went on or off.
    ``relax_every``: the guard checks on its own timer whether Retry may go off; None where the owner calls
    :meth:`relax` itself.
    """

    def __init__(self, limit: Callable[[], int], *, name: str = "QUIC", timeout_s: float = HANDSHAKE_TIMEOUT_S,
                 proven_timeout_s: float = HANDSHAKE_PROVEN_TIMEOUT_S, threshold: Callable[[], int] | None = None,
                 on_refused: Callable[[str], None] | None = None, on_retry: Callable[[bool], None] | None = None,
                 relax_every: float | None = RELAX_EVERY_S) -> None:
        self.limit = limit
        self.name = name  # in log lines: which port's handshakes
        self.timeout_s = timeout_s
        self.proven_timeout_s = proven_timeout_s
        self._threshold = threshold
        self._on_refused = on_refused
        self._on_retry = on_retry
        self._relax_every = relax_every
        self.servers: list[ValidatingQuicServer] = []
        self.handshaking = 0
        self.retrying_since: float | None = None  # Retry is on
        self.refused: Counter[str] = Counter()  # handshakes closed, by reason
        self._calm_since: float | None = None  # while Retry is on: since when the load has been low
        self._retry_handler: Any = None  # aioquic's QuicRetryTokenHandler, made on first need (an RSA key)
        self._relax_timer: asyncio.TimerHandle | None = None

    def add_server(self, server: ValidatingQuicServer) -> None:
        """Guard ``server`` too (Retry goes on and off on every guarded listener at once)."""
        self.servers.append(server)
        if self.retrying_since is not None:
            server.retry_handler, server.issue_retry = self._retry_handler, True

    def retry_threshold(self) -> int:
        return self._threshold() if self._threshold is not None else retry_threshold(self.limit())

    def refused_handshake(self, reason: str) -> None:
        self.refused[reason] += 1
        if self._on_refused is not None:
            self._on_refused(reason)

    def pressure(self) -> None:
        """Many handshakes in progress: turn on address validation (Retry) on every listener."""
        if self.retrying_since is not None or self.handshaking < self.retry_threshold():
            return
        if self._retry_handler is None:
            from aioquic.quic.retry import QuicRetryTokenHandler

            self._retry_handler = QuicRetryTokenHandler()
        for server in self.servers:
            server.retry_handler = self._retry_handler
            server.issue_retry = True
        self.retrying_since = time.monotonic()
        self._calm_since = None
        if self._on_retry is not None:
            self._on_retry(True)
        log.warning("%d %s handshakes in progress: new clients must validate their address (Retry) until the load "
                    "passes", self.handshaking, self.name)
        if self._relax_every is not None and self._relax_timer is None:
            self._relax_timer = asyncio.get_running_loop().call_later(self._relax_every, self._tick)

    def relax(self, now: float) -> None:
        """Retry off once the handshakes in progress have stayed below half the threshold for a whole handshake
        timeout (tokens from Retries sent before are still checked: :class:`ValidatingQuicServer`)."""
        if self.retrying_since is None:
            return
        if self.handshaking >= max(1, self.retry_threshold() // 2):
            self._calm_since = None
            return
        if self._calm_since is None:
            self._calm_since = now
        if now - self._calm_since < self.timeout_s:
            return
        for server in self.servers:
            server.issue_retry = False
        self.retrying_since = None
        if self._on_retry is not None:
            self._on_retry(False)
        log.info("%s handshakes back to %d: address validation (Retry) off", self.name, self.handshaking)

    def _tick(self) -> None:
        self._relax_timer = None
        self.relax(time.monotonic())
        if self.retrying_since is not None and self._relax_every is not None:
            self._relax_timer = asyncio.get_running_loop().call_later(self._relax_every, self._tick)

    def close(self) -> None:
        """Stop the guard's own timer (the listeners are closing)."""
        if self._relax_timer is not None:
            self._relax_timer.cancel()
            self._relax_timer = None


class RefusalLog:
    """Refusals of one kind that a flood of clients repeats: the first is a warning, those within REFUSALS_LOG_S of
    the last line are counted, and one line on ``logger`` sums them up (with the next one logged, or from
    :meth:`flush`, which a housekeeping loop may call). A line per refusal flooded the log (200 wrong tokens, 200
    lines). The daemon's chat port and the KV endpoint both log their admission refusals through it; routine events
    (orphaned answers cancelled) too, with their summary at ``level`` INFO."""

    def __init__(self, logger: logging.Logger, summary: Callable[[int, float], str], *,
                 level: int = logging.WARNING) -> None:
        self.logger = logger
        self.summary = summary  # the summing-up line, of how many were counted over how many seconds
        self.level = level  # the summing-up line's
        self.logged_at: float | None = None  # the last line about this kind
        self.unlogged = 0  # counted since that line

    def hold(self, now: float) -> bool:
        """True: this refusal is counted, not logged; False: the caller logs it now (after what was held back)."""
        if self.logged_at is not None and now - self.logged_at < REFUSALS_LOG_S:
            self.unlogged += 1
            return True
        self.flush(now)
        self.logged_at = now
        return False

    def flush(self, now: float, *, final: bool = False) -> None:
        """The line summing up what was counted, once the last line is REFUSALS_LOG_S old; ``final``: now, however
        recent that line (the daemon is stopping: what was held back was never written, and the metrics that
        counted it were gone with the process)."""
        at = self.logged_at
        if not self.unlogged or at is None or (now - at < REFUSALS_LOG_S and not final):
            return
        self.logger.log(self.level, "%s", self.summary(self.unlogged, now - at))
        self.unlogged = 0
        self.logged_at = now


class ReasonLog(RefusalLog):
    """A :class:`RefusalLog` of failures that each have a reason: its summing-up line ends with the last reason held
    back (``summary`` gives the rest). An upstream's failed answers and an ingest connection's stalled ones."""

    def __init__(self, logger: logging.Logger, summary: Callable[[int, float], str]) -> None:
        super().__init__(logger, lambda n, secs: f"{summary(n, secs)}: {self.last}")
        self.last = ""  # the last reason held back

    def note(self, now: float, reason: str) -> bool:
        """:meth:`hold`, keeping ``reason`` when it is held back (after hold(): a summary it writes is of the
        earlier ones)."""
        held = self.hold(now)
        if held:
            self.last = reason
        return held


class GuardedProtocol(SessionProtocol):
    """A server connection whose handshake a :class:`HandshakeGuard` bounds. The subclass calls
    :meth:`guard_handshake` once its session exists, and :meth:`_handshake_done` when the handshake completes
    and when the connection ends; a connection that ends in its handshake is counted as refused here
    (:meth:`_handshake_lost`), before the subclass hears of its end."""

    handshake_guard: HandshakeGuard
    _handshake_timer: asyncio.TimerHandle | None = None
    # a refusal made before the connection's first datagram was read (past the bound, in __init__): its debug line
    # waits for that datagram's address (it said "from ?", the connection having no path yet)
    _refusal_unlogged: str | None = None

    def guard_handshake(self, guard: HandshakeGuard) -> None:
        """Count this handshake, turn Retry on under pressure, arm the deadline; close it past the bound."""
        self.handshake_guard = guard
        self._handshake_began = time.monotonic()
        guard.handshaking += 1
        guard.pressure()
        self._handshake_timer = asyncio.get_running_loop().call_later(guard.timeout_s, self._handshake_expired)
        if guard.handshaking > guard.limit():
            self._refuse_handshake("too_many", "too many handshakes in progress")

    @property
    def peer(self) -> str:
        paths = self._quic._network_paths
        return f"{paths[0].addr[0]}:{paths[0].addr[1]}" if paths else "?"

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        why = self._refusal_unlogged
        if why is not None:  # (the first datagram: aioquic hands it over right after making the connection)
            self._refusal_unlogged = None
            log.debug("closing %s connection from %s:%s: %s", self.handshake_guard.name, addr[0], addr[1], why)
        super().datagram_received(data, addr)

    def _handshake_done(self) -> None:
        """The handshake is over (completed, refused, or its connection ended): no longer counted, no deadline."""
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
            self.handshake_guard.handshaking -= 1

    def quic_event_received(self, event: qe.QuicEvent) -> None:
        if isinstance(event, qe.ConnectionTerminated):
            self._handshake_lost(event)
        super().quic_event_received(event)

    def _handshake_lost(self, event: qe.ConnectionTerminated) -> None:
        """The connection ended with its handshake still in progress (a refusal or a stop has ended the guard's
        count already): counted as refused, ``timeout`` for QUIC's idle timeout, else ``failed``. Only the count
        in progress went down: half-open handshakes cut by a server.idle_timeout_s under the deadline, and TLS
        failures, were in no metric and no log line."""
        if self._handshake_timer is None:
            return
        self._handshake_done()
        timed_out = event.reason_phrase == AIOQUIC_IDLE_REASON
        self.handshake_guard.refused_handshake("timeout" if timed_out else "failed")
        log.debug("%s handshake from %s ended before it completed: %s (code %#x)", self.handshake_guard.name,
                  self.peer, event.reason_phrase or "no reason given", event.error_code)

    def _refuse_handshake(self, label: str, why: str) -> None:
        """Close a connection still in its handshake: counted, and logged at debug level only (a flood of them would
        flood the log). Silently, without a CONNECTION_CLOSE, where one would take the unvalidated address past
        its anti-amplification allowance (:meth:`_close_would_amplify`)."""
        self._handshake_done()
        self.handshake_guard.refused_handshake(label)
        if self._quic._network_paths:
            log.debug("closing %s connection from %s: %s", self.handshake_guard.name, self.peer, why)
        else:
            self._refusal_unlogged = why
        if not self.quic_closing and self._close_would_amplify(why):
            self._end_silently(why)
            return
        self.session.close(ErrorCode.LIMIT_EXCEEDED, why)
        self.transmit()

    def _close_would_amplify(self, why: str) -> bool:
        """Whether a CONNECTION_CLOSE now would take an unvalidated client address past RFC 9000 8.1's limit of 3
        times the bytes received from it. aioquic sends a close whatever the limit: one 1200-B Initial from a
        source that never answered (a spoofed victim) got the 3,600 B it allows, then at the handshake deadline a
        161-B close, 3.13x. The close's size is bounded from above: one packet per epoch with keys (Initial,
        Handshake, 1-RTT), each a header, a close frame and an AEAD tag, the reason only in the 1-RTT one."""
        paths = self._quic._network_paths
        if not paths or paths[0].is_validated:  # (none yet: the datagram that comes next is counted first)
            return False
        return not paths[0].can_send(CLOSE_PACKET_BYTES_MAX * 3 + len(why.encode()))

    def _end_silently(self, why: str) -> None:
        """End the connection without a packet (its address is not validated and its allowance is spent): what
        the client hears is the silence a lost close would leave. The session sees the end, with ``why``, as any
        other (:meth:`~.quic_io.SessionProtocol._end_without_packet`)."""
        self._end_without_packet(int(ErrorCode.LIMIT_EXCEEDED), why)

    def address_proven(self) -> bool:
        """Whether the client is not half-open: it came back with our Retry's token, or a Handshake packet came from
        it (aioquic validates the path then, RFC 9000 8.1), which needs the keys of our first flight."""
        quic = self._quic
        return quic._retry_source_connection_id is not None or any(p.is_validated for p in quic._network_paths)

    def _handshake_expired(self) -> None:
        """The handshake deadline: ``timeout_s``, or ``proven_timeout_s`` since the start for a client that has proven
        its address, and while Retry is on (the listener is loaded: answers come late)."""
        if self._handshake_timer is None:
            return
        guard = self.handshake_guard
        if not self.address_proven() and guard.retrying_since is None:
            took = time.monotonic() - self._handshake_began  # (timeout_s; more where Retry went off meanwhile)
            self._refuse_handshake("timeout", f"handshake not completed within {max(took, guard.timeout_s):.0f} s")
            return
        left = self._handshake_began + guard.proven_timeout_s - time.monotonic()
        if left > 0:
            self._handshake_timer = asyncio.get_running_loop().call_later(left, self._handshake_expired)
        else:
            self._refuse_handshake("timeout", f"handshake not completed within {guard.proven_timeout_s:g} s")


class ClientCertificateError(ValueError):
    """A client's certificate is missing or does not verify; ``close_reason`` is what its connection is closed
    with (``required`` told a client that had presented a certificate to pass one)."""

    def __init__(self, message: str, close_reason: str) -> None:
        super().__init__(message)
        self.close_reason = close_reason


def verify_peer_certificate(quic: QuicConnection, verifier: ClientCertVerifier) -> str:
    """The verified common name of the certificate the client presented in ``quic``'s completed handshake (aioquic
    requests one, :func:`~.tls.request_client_certificate`, but never checks it); :class:`ClientCertificateError`
    when there is none or its chain does not verify."""
    tls = quic.tls
    leaf = tls._peer_certificate
    try:
        return verifier.verify(leaf, tls._peer_certificate_chain)
    except ValueError as exc:
        reason = "client certificate required" if leaf is None else "client certificate rejected"
        raise ClientCertificateError(str(exc), reason) from None
