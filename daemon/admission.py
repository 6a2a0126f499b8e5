"""Who holds one of the chat port's ``limits.max_sessions`` slots: :class:`Admission`.

A connection takes a slot when its handshake completes (``DaemonProtocol._on_handshake``) and gives it back at its
end, or earlier when it never authorized and is closed to make room (past max_sessions) or for the request bytes it
held (past ``limits.unauthorized_memory_mb``). With no auth configured (no tokens, no client CA) a connection counts
as not yet authorized until a request of its starts an answer: otherwise connections that never sent a request held
every slot, and partial requests ~8 MB each, with no bound; once admitted, the one idle the longest is closed to
make room when no connection not yet admitted is left to close (:meth:`Admission.evict_idle`): connections that sent
one cheap request each, then only pinged, held every slot for good. This class counts the slots, keeps the
connections not yet authorized (a :class:`~tokenwire.transport.preauth_budget.PreauthBudget`), chooses and closes
the ones to let go, and logs the refusals and closes the way a flood must be logged: the first of each kind a
warning, the rest summed up (:class:`~tokenwire.transport.handshake_guard.RefusalLog`).

Split out of ``service.py``, where it was a tenth of :class:`~tokenwire.daemon.service.Daemon`: its state is narrow
(the count, the budget, the idle admitted connections, five refusal logs) and nothing in it looks at answers,
upstreams or listeners. The daemon owns one and forwards the calls ``connection.py`` makes on it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from tokenwire.transport.errors import ErrorCode
from tokenwire.transport.handshake_guard import REFUSALS_LOG_S, RefusalLog
from tokenwire.transport.preauth_budget import PreauthBudget

from .config import Limits
from .connection import UNAUTHORIZED_CREDIT_REQUESTS
from .telemetry import Metrics

if TYPE_CHECKING:
    from .connection import DaemonProtocol

# the daemon's logger (not this module's name): operators and tests filter the daemon's lines by it
log = logging.getLogger("tokenwire.daemon")
# what the log lines say of a connection let in with no auth configured that no request of has started yet
_NO_REQUEST = "no request started yet (no auth configured)"
# With no auth configured, past max_sessions and with no connection not yet admitted to close, the admitted
# connection idle the longest makes room for a new client (evict_idle), once it has been idle at least this long: a
# client between two requests of a burst (the next one sent as the last answer ends; a repair or two after FINISHED
# on a lossy path, a few round trips) is not churned, while connections that sent one cheap request and then only
# pinged (which held every slot for good: an honest client got "too many sessions") go. Far below any keepalive
# period (the SDK pings every third of its 60 s idle timeout), so pings never matter; a constant, not a setting:
# nothing an operator knows better than this about a client's pause, and a larger one only helps such squatters.
IDLE_EVICTION_FLOOR_S = 2.0


class Admission:
    """The chat port's session slots and the connections holding one that have not authorized yet. ``limits``: the
    limits in force (SIGHUP replaces them), read at each use; ``metrics``: the daemon's."""

    def __init__(self, limits: Callable[[], Limits], metrics: Metrics) -> None:
        self._limits = limits
        self.metrics = metrics
        self.established = 0  # connections past their handshake (what max_sessions bounds)
        # clients refused past max_sessions, unauthorized clients and never-authorized connections closed to admit new
        # clients: the first of each kind is a warning, the rest are counted and summed up (RefusalLog)
        # (the limit, not the sessions open: read when the summary is written, a minute on, that said "0 open")
        self.session_refusals = RefusalLog(log, lambda n, s: (
            f"refused {n} more connections in the last {s:.0f} s at the session limit "
            f"(limits.max_sessions = {self._limits().max_sessions})"))
        self.auth_refusals = RefusalLog(log, lambda n, s: (
            f"refused {n} more unauthorized clients in the last {s:.0f} s (a missing, invalid or revoked auth token "
            f"or client certificate; tokenwire_errors_total code 0x105)"))
        self.evictions = RefusalLog(log, lambda n, s: (
            f"closed {n} more never-authorized connections in the last {s:.0f} s to admit new clients "
            f"(limits.max_sessions; tokenwire_handshakes_refused_total reason evicted)"))
        self.idle_closes = RefusalLog(log, lambda n, s: (
            f"closed {n} more idle connections in the last {s:.0f} s to admit new clients (no auth configured; "
            f"limits.max_sessions; tokenwire_handshakes_refused_total reason idle)"))
        self.memory_sheds = RefusalLog(log, lambda n, s: (
            f"closed {n} more never-authorized connections in the last {s:.0f} s for the request bytes they held "
            f"(limits.unauthorized_memory_mb; tokenwire_handshakes_refused_total reason memory)"))
        # established connections that have not been authorized yet (auth tokens configured), oldest first: past
        # max_sessions the oldest makes room for a new client (clients that connected and never sent a request held
        # every slot, and token holders got "too many sessions"); and the request bytes they hold, all together,
        # within limits.unauthorized_memory_mb (count_unauthorized, account_unauthorized; the KV endpoint keeps a
        # budget of its own of the same kind). Past the budget every holder is counted afresh (measure): a count
        # from a connection's last datagram may be stale (a request refused since by its deadline, a timer, with no
        # datagram of its own), and a token holder sending its prompt was closed for bytes no longer held.
        self.unauthorized: PreauthBudget[DaemonProtocol] = PreauthBudget(
            lambda: int(self._limits().unauthorized_memory_mb * (1 << 20)), measure=lambda p: p.held_bytes())
        # those of them let in with no auth configured (no tokens, no client CA): not admitted until a request of
        # theirs starts, and counted as the others are (30 that never sent a request held max_sessions = 30 for
        # good, the honest client refused); only their log lines and close reasons say so apart
        self.awaiting_request: set[DaemonProtocol] = set()
        # those let in with no auth configured and admitted since (a request of theirs started) with no answer open
        # now (DaemonProtocol.answering), and since when: oldest first (a dict keeps insertion order, and each
        # enters when it is first seen idle: note_idle), so past max_sessions the longest idle is the first
        # (evict_idle), found in amortized O(1) at 10,000 sessions, not by a scan of every connection
        self.idle: dict[DaemonProtocol, float] = {}

    def session_refused(self, peer: str) -> None:
        """A client refused past ``limits.max_sessions``: counted by reason, logged when the last line about such
        refusals is REFUSALS_LOG_S old, else summed up later (a flood was a warning line per client: 132 from one).
        Its LIMIT_EXCEEDED close is an admission check's: counted here alone, not in tokenwire_errors_total."""
        self.metrics.handshakes_refused.labels(reason="max_sessions").inc()
        if self.session_refusals.hold(time.monotonic()):
            return
        log.warning("refusing connection from %s: %d sessions open (limits.max_sessions); more such refusals are "
                    "counted (tokenwire_handshakes_refused_total) and logged at most every %g s", peer,
                    self.established, REFUSALS_LOG_S)

    def unauthorized_client(self, peer: str, why: str, *, closing: bool = True) -> None:
        """A client refused for its auth token or certificate: counted (0x105), and logged the way refusals past
        max_sessions are (one warning per wrong token flooded the log: 200 lines for 200 connections)."""
        self.metrics.errors.labels(code=hex(ErrorCode.UNAUTHORIZED)).inc()
        if self.auth_refusals.hold(time.monotonic()):
            return
        log.warning("unauthorized client %s: %s%s; more such refusals are counted (tokenwire_errors_total code "
                    "0x105) and logged at most every %g s", peer, why, "; closing" if closing else "", REFUSALS_LOG_S)

    def evict_unauthorized(self) -> bool:
        """Past max_sessions: close the oldest connection that has never been authorized (with no auth configured:
        none of whose requests has started yet), to make room for a new client; False when there is none. Its slot
        is free at once (not at the end of its closing period). A client that connects early and sends its first
        request much later may be closed so while clients that never authorize (or never send a request) flood the
        daemon: it hears why, and connects again."""
        victim = self.unauthorized.oldest()
        if victim is None:
            return False
        idle = victim in self.awaiting_request
        self._close(
            victim, "evicted", self.evictions,
            f"closing connection from {victim.peer}, {_NO_REQUEST if idle else 'never authorized'}, to admit a new "
            f"client: {self._limits().max_sessions} sessions open (limits.max_sessions); more such closes are "
            f"counted (tokenwire_handshakes_refused_total reason evicted) and logged at most every "
            f"{REFUSALS_LOG_S:g} s",
            f"too many sessions: this connection had sent no {'request that started' if idle else 'authorized request'}"
            " and was closed to admit another client; connect again")
        return True

    def note_idle(self, proto: DaemonProtocol, now: float) -> None:
        """``proto``, let in with no auth configured and admitted since, has just been heard from (its datagram
        handled): one of :attr:`idle` from ``now`` on if no answer of its is open and it was not already, out of it
        while one is. O(its requests): run for each of its datagrams (keepalive pings too, which change nothing)."""
        if proto.answering():
            self.idle.pop(proto, None)
        elif proto not in self.idle and proto.established and not proto.closing:
            self.idle[proto] = now

    def evict_idle(self, now: float) -> bool:
        """Past max_sessions with no auth configured and no connection not yet admitted to close: close the admitted
        connection idle the longest (no answer open on it for at least ``IDLE_EVICTION_FLOOR_S``), to make room for a
        new client; False when there is none (the new client is refused). Connections that sent one cheap request
        each and then only pinged held every slot for good; token holders and certificate clients are accountable,
        and never closed so (they are never in :attr:`idle`). Its client hears why, and connects again.

        Amortized O(1): the first of :attr:`idle` is the longest idle; one found answering after all (a request
        whose datagram this side has not checked since) or gone leaves it here, and enters again when next seen
        idle."""
        while self.idle:
            victim, since = next(iter(self.idle.items()))
            if victim.closing or not victim.established or victim.answering():
                del self.idle[victim]
                continue
            if now - since < IDLE_EVICTION_FLOOR_S:
                return False  # (every other one is idle for less)
            self._close(
                victim, "idle", self.idle_closes,
                f"closing connection from {victim.peer}, idle for {now - since:.1f} s (no answer open; no auth "
                f"configured), to admit a new client: {self._limits().max_sessions} sessions open "
                f"(limits.max_sessions) and none not yet admitted; more such closes are counted "
                f"(tokenwire_handshakes_refused_total reason idle) and logged at most every {REFUSALS_LOG_S:g} s",
                "too many sessions: idle connection closed to admit another client (limits.max_sessions); "
                "connect again")
            return True
        return False

    def _close(self, victim: DaemonProtocol, reason: str, refusals: RefusalLog, warning: str,
               close_reason: str) -> None:
        """Close ``victim``, never authorized (or, with no auth configured, idle: :meth:`evict_idle`), with
        LIMIT_EXCEEDED (``close_reason``): its session slot and what it held are free at once (not at the end of its
        closing period), it is counted under ``reason`` (tokenwire_handshakes_refused_total; an admission check's
        close, so not in tokenwire_errors_total), and the first such close is a warning (``warning``) that
        ``refusals`` sums up after. One already on its way out (a wrong token) frees its slot alone."""
        self.forget_unauthorized(victim)
        self.idle.pop(victim, None)
        if victim.established:
            victim.established = False
            self.established -= 1
            self.metrics.sessions.dec()
        if victim.closing:
            return
        self.metrics.handshakes_refused.labels(reason=reason).inc()
        if not refusals.hold(time.monotonic()):
            log.warning("%s", warning)
        victim.server_session.close(ErrorCode.LIMIT_EXCEEDED, close_reason)
        victim.transmit()

    def count_unauthorized(self, proto: DaemonProtocol, *, awaiting_request: bool = False) -> None:
        """``proto``, established, is not authorized yet (``awaiting_request``: no auth is configured, and no
        request of its has started yet): one of :attr:`unauthorized` (the newest), with the
        allowance its own limits gave it (its window, ``UNAUTHORIZED_CREDIT_REQUESTS`` of its
        ``max_request_bytes``, and its first stream's request with its length prefix). Its session keeps the
        ``max_request_bytes`` it started with, so a reload lowering the setting must not lower the floor under it:
        the floor read the current setting, and a lone connection opened before such a reload was closed for what
        its own window let it send."""
        self.unauthorized.add(proto, (UNAUTHORIZED_CREDIT_REQUESTS + 1) * proto.server_session.max_request_bytes + 4)
        if awaiting_request:
            self.awaiting_request.add(proto)

    def request_started(self, proto: DaemonProtocol) -> None:
        """A request of ``proto``'s started an answer (or attached to one): let in with no auth configured, it is
        admitted now, out of :attr:`unauthorized` (never evicted, nor closed for what it holds) and with its
        connection's full window. Until then it was counted as a connection not yet authorized."""
        if proto in self.awaiting_request:
            proto.admitted_without_auth = True  # (its datagrams keep it in idle or out: note_idle)
            proto.authorized = True  # (its setter forgets it here and releases its connection's credit)

    def forget_unauthorized(self, proto: DaemonProtocol) -> None:
        """``proto`` is authorized, evicted or gone: no longer one of :attr:`unauthorized`, and what it held no
        longer counts toward ``limits.unauthorized_memory_mb``."""
        self.unauthorized.forget(proto)
        self.awaiting_request.discard(proto)

    def account_unauthorized(self, proto: DaemonProtocol, held: int) -> None:
        """``proto``, established and not authorized yet, now holds ``held`` bytes of its requests (in aioquic's
        stream buffers and the request decoders). Past ``limits.unauthorized_memory_mb`` for all such connections
        together, the one holding the most (the oldest of equals) is closed, until they are under it again.

        Each may hold about 3 x ``max_request_bytes`` before it authorizes (:class:`ReadCredit`'s hold), which over
        ``max_sessions`` connections (10,000 by default) let clients without a token make the daemon hold ~30 GB.
        The largest holder goes first: a client's first request is a prompt, commonly kilobytes, so a token holder
        sending one is closed only when it holds more than every connection that never authorizes.

        The budget is never below what one connection counted may hold (:meth:`count_unauthorized`): at the
        setting's minimum (1 MiB) with the default ``max_request_bytes`` (1 MiB), a lone token holder whose two
        600-KB prompts were on their way on a new connection was closed every time, before its token could be read.
        """
        limits = self._limits()
        for shed in self.unauthorized.account(proto, held):
            victim = shed.holder
            idle = victim in self.awaiting_request
            self._close(
                victim, "memory", self.memory_sheds,
                f"closing connection from {victim.peer}, {_NO_REQUEST if idle else 'never authorized'}, holding "
                f"{shed.held >> 10} KiB of "
                f"requests: connections not yet authorized held more than {shed.budget >> 10} KiB together "
                f"(limits.unauthorized_memory_mb, {limits.unauthorized_memory_mb:g} MiB, or what one connection may "
                f"hold if more: ~3 x limits.max_request_bytes); more such closes are counted "
                f"(tokenwire_handshakes_refused_total reason memory) and logged at most every {REFUSALS_LOG_S:g} s",
                ("too much held before a first request started: this connection's requests held more than the "
                 "server allows connections none of whose requests has started; connect again" if idle else
                 "too much held before authorization: this connection had sent no authorized request and its "
                 "requests held more than the server allows such connections; connect again and authorize first"))

    def ended(self, proto: DaemonProtocol) -> None:
        """``proto`` ended: no longer one of :attr:`unauthorized` nor :attr:`idle`, and its slot is free if it held
        one."""
        self.forget_unauthorized(proto)
        self.idle.pop(proto, None)
        if proto.established:
            self.established -= 1
            self.metrics.sessions.dec()
