"""The answers being generated: :class:`LiveAnswers`.

An answer is live from its start (an upstream's generation task, or an application's open on the ingest socket) to
its end, whoever is attached to it: it outlives its connection, and a client may resume it. This class keeps them:
the upstreams' tasks and their bookkeeping when they end, the ingest answers by id, the bound on them all
(``limits.max_live_answers``, refusals logged as a flood must be), and the answers nobody is attached to, which the
orphan timeout cancels (``limits.orphan_timeout_s``).

Split out of ``service.py``, where it was spread over :class:`~tokenwire.daemon.service.Daemon`: its state is narrow
(the tasks, the orphans, the ingest answers, two refusal logs) and it knows nothing of connections, listeners or
auth. The daemon owns one; a request's handling starts answers on it and tells it when an answer has a listener
again (:meth:`LiveAnswers.attached`) or none left (:meth:`LiveAnswers.unattended`), and the housekeeping runs its
orphan timeout.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import math
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tokenwire.transport.errors import ErrorCode, with_retry_after
from tokenwire.transport.frames import Request
from tokenwire.transport.handshake_guard import REFUSALS_LOG_S, RefusalLog
from tokenwire.transport.server import ChatRequest

from .config import Limits
from .generation import generate_answer
from .ingest import IngestAPI
from .sendable_upstream import SendableUpstream
from .telemetry import Metrics
from .transcripts import LiveRequest, TranscriptStore

# the daemon's logger (not this module's name): operators and tests filter the daemon's lines by it
log = logging.getLogger("tokenwire.daemon")

# The Retry-After of a "server busy" refusal (limits.max_live_answers) is an estimate of when a place frees: the mean
# time between the last BUSY_ENDS_KEPT answer ends, less the time since the last one. Only ends of the last
# BUSY_ENDS_WINDOW_S count (older ones say nothing of the answers live now); with fewer than two there is nothing to
# go by and it says 1 s. Bounded to 1 .. BUSY_RETRY_MAX_S: a refusal costs the daemon little, so a modest hint that
# brings a client back early is cheaper than one that keeps it waiting with a place free (and the answers live now
# may be far longer than the ones that ended).
BUSY_ENDS_KEPT = 20
BUSY_ENDS_WINDOW_S = 60.0
BUSY_RETRY_MAX_S = 10


def busy_retry_after_s(ends: Sequence[float], now: float) -> int:
    """A busy refusal's Retry-After, whole seconds in 1 .. BUSY_RETRY_MAX_S: when the next answer should end, from
    ``ends`` (when answers ended, oldest first; the clock of ``now``). See BUSY_ENDS_KEPT."""
    recent = [t for t in ends if now - t <= BUSY_ENDS_WINDOW_S]
    if len(recent) < 2:
        return 1
    gap = (recent[-1] - recent[0]) / (len(recent) - 1)
    return max(1, min(BUSY_RETRY_MAX_S, math.ceil(gap - (now - recent[-1]))))


# an IPv6 client is its /64: a host is handed a /64 (SLAAC, privacy addresses rotating in it) and may send from any
# of its 2^64 addresses, so a cap per address would be no cap; one /64 is one site or host, as one IPv4 address
# behind a NAT is
CLIENT_IPV6_PREFIX = 64


def client_key(principal: str | None, host: str) -> str:
    """Who ``limits.max_live_answers_per_client`` counts an answer toward: the request's auth ``principal`` (a token's
    name, a certificate's ``cert:`` one) when auth names one, else the peer's address ``host`` (an IPv4-mapped IPv6
    address as its IPv4 one, the same host on a dual-stack socket; an IPv6 one as its /64: CLIENT_IPV6_PREFIX). The
    principal as given ("cert:..." or a token's name; an address key starts with "addr ", so no principal is one)."""
    if principal is not None:
        return principal
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # (a scope id: fe80::1%eth0)
    except ValueError:  # not an IP literal ("?": no path yet): as given
        return f"addr {host}"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is None:
            return f"addr {ipaddress.IPv6Network((ip, CLIENT_IPV6_PREFIX), strict=False)}"
        ip = ip.ipv4_mapped
    return f"addr {ip}"


@dataclass
class ClientAnswers:
    """One client's answers being generated (``limits.max_live_answers_per_client``), and when its last ones ended:
    its refusal's Retry-After (kept while it has answers live: a client at its cap has some)."""

    live: int = 0
    ends: deque[float] = field(default_factory=lambda: deque(maxlen=BUSY_ENDS_KEPT))


def failure_reason(code: int) -> str:
    """tokenwire_upstream_failures_total's reason for a failed answer's error code: ``timeout``
    (UPSTREAM_TIMEOUT), ``error`` (UPSTREAM_ERROR: the upstream's error, an unreachable upstream, an upstream's
    bug), ``refused`` (any other code an upstream chose: it refused the request after it started)."""
    if code == ErrorCode.UPSTREAM_TIMEOUT:
        return "timeout"
    return "error" if code == ErrorCode.UPSTREAM_ERROR else "refused"


class LiveAnswers:
    """The answers being generated, by the upstreams and on the ingest socket. ``limits``: the limits in force
    (SIGHUP replaces them), read at each use; ``metrics``, ``store``: the daemon's. :attr:`ingest` is the ingest
    socket's API once the daemon has one (its open answers are live answers too)."""

    def __init__(self, limits: Callable[[], Limits], metrics: Metrics, store: TranscriptStore) -> None:
        self._limits = limits
        self.metrics = metrics
        self.store = store
        self.ingest: IngestAPI | None = None
        # requests refused past limits.max_live_answers: a line per refusal was none at all before ("server busy"
        # refusals were only counted); the first a warning, the rest summed up
        self.busy_refusals = RefusalLog(log, lambda n, s: (
            f"refused {n} more answers in the last {s:.0f} s: server busy, "
            f"{self._limits().max_live_answers} answers being generated (limits.max_live_answers)"))
        # answers cancelled by the orphan timeout: many clients vanishing at once wrote a line each (196 in a second)
        self.orphan_cancels = RefusalLog(log, lambda n, s: (
            f"cancelled {n} more answers in the last {s:.0f} s with no client attached for "
            f"{self._limits().orphan_timeout_s:g} s (limits.orphan_timeout_s; tokenwire_orphans_cancelled_total)"),
            level=logging.INFO)  # (routine: the summary at INFO, as the first line)
        # answers with no client attached cancelled early to make room past max_live_answers: a warning (the
        # answers' owners vanished, or one source fills the bound), then summed up
        self.orphan_reclaims = RefusalLog(log, lambda n, s: (
            f"cancelled {n} more answers with no client attached in the last {s:.0f} s to make room for new ones "
            f"(limits.max_live_answers; tokenwire_orphans_cancelled_total reason busy)"))
        # requests refused past limits.max_live_answers_per_client: one client's flood, a line then summed up
        self.client_refusals = RefusalLog(log, lambda n, s: (
            f"refused {n} more answers in the last {s:.0f} s: too many for their client, "
            f"{self._limits().max_live_answers_per_client} each at most (limits.max_live_answers_per_client; "
            "tokenwire_client_answers_refused_total)"))
        self.tasks: dict[bytes, asyncio.Task[None]] = {}  # the upstreams' answers being generated, by id
        self.orphaned: dict[bytes, float] = {}  # generating answers with no client attached: since when
        # ingest answers by id, while the store holds them: a request by id for one from index 0 is an attach
        self._ingested: weakref.WeakValueDictionary[bytes, LiveRequest] = weakref.WeakValueDictionary()
        self.ends: deque[float] = deque(maxlen=BUSY_ENDS_KEPT)  # when answers ended: a busy refusal's Retry-After
        # the upstreams' answers by client (limits.max_live_answers_per_client): each counted from its start to its
        # end (_release, once: at its task's end, or at once when reclaimed as an orphan); a client with none left
        # is dropped, so this holds only clients with answers live
        self.clients: dict[str, ClientAnswers] = {}
        self._client_of: dict[bytes, str] = {}  # an upstream's answer's client, while it counts

    # ------------------------------------------------------------------------------ how many, and the bound
    def count(self) -> int:
        """Answers being generated: by the upstreams, and open on the ingest socket."""
        return len(self.tasks) + (self.ingest.live_count if self.ingest is not None else 0)

    def busy(self) -> str | None:
        """Why no answer may start now (``limits.max_live_answers`` are live), for a request and an ingest open.

        At the bound, the upstreams' answers nobody is attached to (their connection was lost: kept only so that
        a client may resume them) are cancelled first, the longest orphaned first, to make room
        (:meth:`reclaim_orphans`): a client opening 64 requests per connection and dropping its sockets without a
        close held every slot for ``limits.orphan_timeout_s`` (300 s), answers generated for nobody, and the next
        honest request heard "server busy"."""
        limit = self._limits().max_live_answers
        live = self.count()
        if live >= limit:
            # the upstreams' orphaned answers, oldest first (an answer orphaned again goes to the end), found in one
            # walk; cancelled only if enough of them get under the bound (else refused with every orphan kept: a
            # reload that lowered the bound cancelled orphans and still refused)
            orphans = [rid for rid in self.orphaned if rid in self.tasks]  # (not ingest answers, nor ended ones)
            live -= self._reclaim_below(orphans, live, limit)
        if live < limit:
            return None
        # (the Retry-After suffix: RemoteError.retry_after, so that a client can wait and ask again by itself)
        return with_retry_after(f"server busy: {live} answers being generated (limits.max_live_answers); retry later",
                                busy_retry_after_s(self.ends, time.monotonic()))

    def client_busy(self, client: str) -> str | None:
        """Why ``client`` may start no answer now: ``limits.max_live_answers_per_client`` of its answers are being
        generated (0: no cap). Its answers with no client attached count until they end (the client may resume them;
        a resume starts no answer, so it is never refused here), or until it asks for a new answer at its cap: then
        they are cancelled to make room, the longest orphaned first, as :meth:`busy` does at the global bound."""
        cap = self._limits().max_live_answers_per_client
        mine = self.clients.get(client)
        if cap == 0 or mine is None or mine.live < cap:
            return None
        # its own answers nobody is attached to, oldest first, make room as busy()'s do (only if enough of them do):
        # a client whose connection was lost and that asks anew instead of resuming (a reloaded page) was refused
        # for limits.orphan_timeout_s by the answers it had orphaned itself
        orphans = [rid for rid in self.orphaned if rid in self.tasks and self._client_of.get(rid) == client]
        if self._reclaim_below(orphans, mine.live, cap):
            return None
        # (its own ends: how soon one of its answers frees a place; the suffix: RemoteError.retry_after)
        return with_retry_after(f"too many answers for this client: {mine.live} being generated "
                                "(limits.max_live_answers_per_client); retry later",
                                busy_retry_after_s(mine.ends, time.monotonic()))

    def client_refused(self, what: str, client: str) -> None:
        """``what`` was refused past ``limits.max_live_answers_per_client``: counted, logged (the first in full, then
        summed up, as the busy refusals)."""
        self.metrics.client_answers_refused.inc()
        if self.client_refusals.hold(time.monotonic()):
            return
        mine = self.clients.get(client)
        log.warning("refusing %s: too many answers for its client %s, %d being generated "
                    "(limits.max_live_answers_per_client = %d); more such refusals are counted "
                    "(tokenwire_client_answers_refused_total) and logged at most every %g s", what, client,
                    mine.live if mine is not None else 0, self._limits().max_live_answers_per_client, REFUSALS_LOG_S)

    def _count_for(self, rid: bytes, client: str) -> None:
        """Answer ``rid`` counts toward ``client`` until :meth:`_release`."""
        self._client_of[rid] = client
        self.clients.setdefault(client, ClientAnswers()).live += 1

    def _release(self, rid: bytes, now: float) -> None:
        """Answer ``rid`` no longer counts toward its client: once, whichever of its task's end and its reclaim as an
        orphan comes first (the reclaim frees its place at once, as it leaves :attr:`tasks` at once)."""
        client = self._client_of.pop(rid, None)
        if client is None:
            return
        mine = self.clients[client]
        mine.live -= 1
        mine.ends.append(now)
        if mine.live <= 0:
            del self.clients[client]

    def _reclaim_below(self, orphans: list[bytes], live: int, limit: int) -> int:
        """Cancel the first of ``orphans`` (oldest first) that take ``live`` answers below ``limit``, only if enough
        of them can (else none: a bound they cannot meet keeps every orphan); how many."""
        if live - len(orphans) >= limit:
            return 0
        return self.reclaim_orphans(orphans[:live - limit + 1], time.monotonic())

    def reclaim_orphans(self, victims: list[bytes], now: float) -> int:
        """Cancel ``victims``, upstream answers with no client attached; how many. Each leaves :attr:`tasks` at once
        (its task ends in a later loop turn), is counted in tokenwire_orphans_cancelled_total with reason ``busy``
        and logged (the first, then summed up). Ingest answers are never victims: an application's answer waits for
        its client to attach, orphaned from its open on."""
        for rid in victims:
            since = self.orphaned.pop(rid)
            self.tasks.pop(rid).cancel()  # (its _fed finds it gone: it ends as cancelled there, as any cancelled task)
            self._release(rid, now)
            self.metrics.orphans_cancelled.labels(reason="busy").inc()
            if not self.orphan_reclaims.hold(now):
                log.warning("request %s: no client for %.0f s; cancelling it to make room for a new answer, %d being "
                            "generated (limits.max_live_answers = %d); more such cancellations are counted "
                            "(tokenwire_orphans_cancelled_total reason busy) and logged at most every %g s",
                            rid.hex(), now - since, self.count() + 1, self._limits().max_live_answers,
                            REFUSALS_LOG_S)
        return len(victims)

    def busy_refused(self, what: str) -> None:
        """``what`` was refused past ``limits.max_live_answers``: logged, the first in full, then summed up (like the
        refusals past max_sessions); such refusals were only counted (tokenwire_errors_total 0x106), never logged."""
        if self.busy_refusals.hold(time.monotonic()):
            return
        log.warning("refusing %s: server busy, %d answers being generated (limits.max_live_answers = %d); more such "
                    "refusals are counted (a request's: tokenwire_errors_total code 0x106) and logged at most every "
                    "%g s", what, self.count(), self._limits().max_live_answers, REFUSALS_LOG_S)

    # ------------------------------------------------------------------------------ the upstreams' answers
    def start(self, request: Request, upstream: SendableUpstream, route: str, *, principal: str | None, peer: str,
              now: float, client: str | None = None) -> LiveRequest:
        """A new answer to ``request`` (from ``principal``'s client at ``peer``), in the store and generated by
        ``upstream`` (its route's name: ``route``) in a task of its own; its max_tokens at most ``limits.max_tokens``.
        ``client``: who it counts toward (:func:`client_key`; None: nobody) until it ends."""
        limits = self._limits()
        limit = min(request.max_tokens or limits.max_tokens, limits.max_tokens)
        live = self.store.create(principal, limit, now, model=request.model)
        chat = ChatRequest(
            messages=request.messages or [],
            model=request.model,
            max_tokens=limit if request.max_tokens else None,  # clamped; none asked, none sent
            params=dict(request.params or {}),
            scheme=request.scheme,
            request_id=live.request_id,
            peer=peer,
        )
        task = asyncio.ensure_future(generate_answer(live, upstream, chat, self.metrics.tokens.inc))
        self.tasks[live.request_id] = task
        if client is not None:
            self._count_for(live.request_id, client)
        self.metrics.requests_active.inc()
        task.add_done_callback(functools.partial(self._fed, live, route))
        return live

    def _fed(self, live: LiveRequest, upstream: str, task: asyncio.Task[None]) -> None:
        """A generation task's end, however it ended: a task cancelled before its first step never runs its body
        (a client's cancel read in the same loop turn as its request), and a ``finally`` there left the answer
        unfinished and its task counted against max_live_answers for good. A failed answer is counted here, once,
        by ``upstream`` (its route's name): tokenwire_errors_total counts each ERROR delivered (a failure with no
        client attached, none; with three resumes, four), so no metric said how often an upstream failed."""
        if not live.done:
            live.finish("cancelled", time.monotonic())
        if live.error is not None:
            self.metrics.upstream_failures.labels(upstream=upstream, reason=failure_reason(live.error[0])).inc()
        self.metrics.requests_active.dec()
        self.ends.append(time.monotonic())
        self._release(live.request_id, self.ends[-1])
        self.store.mark_finished(live)
        self.tasks.pop(live.request_id, None)
        self.orphaned.pop(live.request_id, None)

    def cancel_all(self) -> None:
        """The daemon stops: every upstream's task is cancelled (each ends its answer as cancelled)."""
        for task in list(self.tasks.values()):
            task.cancel()

    # ------------------------------------------------------------------------------ the ingest socket's answers
    def ingest_opened(self, live: LiveRequest) -> None:
        """An application opened ``live`` on the ingest socket: nobody is attached to it yet."""
        self._ingested[live.request_id] = live
        self.orphaned[live.request_id] = time.monotonic()  # until a client attaches (limits.orphan_timeout_s)
        self.metrics.requests_active.inc()
        self.metrics.ingest_opened.inc()

    def ingest_done(self, live: LiveRequest, outcome: str) -> None:
        """An ingest answer ended, by ``outcome`` (finished, or the reason it failed)."""
        self.metrics.requests_active.dec()
        self.ends.append(time.monotonic())
        self.orphaned.pop(live.request_id, None)
        if outcome == "finished":
            self.metrics.ingest_finished.inc()
        else:
            self.metrics.ingest_failed.labels(reason=outcome).inc()

    def is_ingested(self, live: LiveRequest) -> bool:
        """Whether ``live`` is an application's answer (a request for it by id from index 0 attaches to it)."""
        return self._ingested.get(live.request_id) is live

    # ------------------------------------------------------------------------------ listeners, and none
    def attached(self, rid: bytes) -> None:
        """A client is attached to answer ``rid``: not an orphan (any more)."""
        self.orphaned.pop(rid, None)

    def unattended(self, live: LiveRequest, *, cancel: bool) -> None:
        """The last client attached to ``live`` let go of it (if none is left). ``cancel``: it cancelled it, so
        nobody wants it and it stops; otherwise its connection was lost, and the client may come back to resume it
        within ``limits.orphan_timeout_s``."""
        if live.done or live.listeners:
            return
        if not self.generating(live.request_id):
            return
        if cancel:  # the client abandoned it and nobody else streams it
            self.cancel(live.request_id, time.monotonic(), "every client attached to it cancelled it", "cancelled")
        else:  # the connection was lost: the client may come back to resume it, for limits.orphan_timeout_s
            self.orphaned[live.request_id] = time.monotonic()

    def unsent(self, live: LiveRequest, now: float) -> None:
        """The start of ``live`` could not be sent to the client that asked for it: if it is generating for nobody,
        the orphan timeout ends it."""
        if live.request_id in self.tasks and not live.listeners:
            self.orphaned.setdefault(live.request_id, now)

    def generating(self, rid: bytes) -> bool:
        """Whether answer ``rid`` is still being generated: by an upstream's task, or open on the ingest socket."""
        return rid in self.tasks or (self.ingest is not None and self.ingest.is_open(rid))

    def cancel(self, rid: bytes, now: float, why: str, outcome: str) -> None:
        """Stop generating ``rid``: an upstream's task is cancelled; an application's answer ends as cancelled,
        and its next op says ``why`` (it had pushed on, every reply ok, to nobody). ``outcome``: the ingest
        answer's (cancelled, or orphaned)."""
        task = self.tasks.get(rid)
        if task is not None:
            task.cancel()
        elif self.ingest is not None:
            self.ingest.cancel(rid, now, why, outcome)

    def cancel_orphans(self, now: float) -> None:
        """Cancel the answers no client has been attached to for ``limits.orphan_timeout_s``: their clients
        vanished (64 answers per connection, times reconnecting clients, generated to max_tokens for nobody).
        A resume afterwards gets what was generated, then the answer's end as cancelled."""
        timeout = self._limits().orphan_timeout_s
        for rid, since in list(self.orphaned.items()):
            if not self.generating(rid):
                del self.orphaned[rid]
            elif now - since >= timeout:
                del self.orphaned[rid]
                self.metrics.orphans_cancelled.labels(reason="timeout").inc()
                # (the ingest API logs its own answers' cancellations, through the same orphan_cancels)
                if rid in self.tasks and not self.orphan_cancels.hold(now):
                    log.info("request %s: no client for %.0f s; cancelling it; more such cancellations are counted "
                             "(tokenwire_orphans_cancelled_total) and logged at most every %g s", rid.hex(),
                             now - since, REFUSALS_LOG_S)
                self.cancel(rid, now, f"no client attached for {timeout:g} s (limits.orphan_timeout_s)", "orphaned")
