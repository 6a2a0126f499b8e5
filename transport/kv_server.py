"""The KV channel's server, asyncio shell: :func:`serve_kv` runs a :class:`KVServer` that drives one
:class:`~.kv_server_session.KVServerSession` per connection and asks its :class:`~.kv_server_session.KVProvider`
(the daemon's KV service) for plans and chunks on tasks of its own."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aioquic.quic import events as qe
from aioquic.quic.connection import QuicConnection

from .errors import ErrorCode, TokenwireError
from .frames import KvFetch
from .handshake_guard import (
    REFUSALS_LOG_S,
    ClientCertificateError,
    GuardedProtocol,
    HandshakeGuard,
    RefusalLog,
    verify_peer_certificate,
)
from .kv_protocol import MAX_KV_FETCH_BYTES, KVError, kv_quic_config
from .kv_server_session import (
    FETCH_PRINCIPAL,
    KVChunkNeeded,
    KVFetchClosed,
    KVFetchRefused,
    KVFetchRequested,
    KVProvider,
    KVServerSession,
    ServerTuning,
)
from .marking import MarkingPolicy
from .preauth_budget import PreauthBudget
from .quic_io import serve_quic, tune_socket
from .read_credit import ReadCredit
from .server_session import REQUEST_TIMEOUT_S
from .session_events import ConnectionEnded, SessionEvent
from .tls import CertPair, ClientCertVerifier, request_client_certificate, server_configuration

log = logging.getLogger("tokenwire.kv")

_T = TypeVar("_T")

# KV connections past their handshake (serve_kv's max_connections; the daemon passes limits.max_sessions), and the
# bound on handshakes in progress: the chat port's default max_sessions
MAX_CONNECTIONS = 10_000
# With tokens, until a fetch of it authorizes, a connection gets connection-level credit of this many of the largest
# KV_FETCHes (length prefix included), plus its first stream's fetch, and two fetch streams at once
# (ReadCredit.hold_until_authorized, as the chat port's connections): one without a token had 16 fetch streams each
# hold a 1-MiB KV_FETCH short of its last byte in the 64-MiB window (+23 MiB RSS a connection, for 42 s). Now ~2 MB
# at most; two of the largest fetches sent at once still come whole, and the full window follows the first
# authorized fetch.
UNAUTHORIZED_CREDIT_FETCHES = 2
UNAUTHORIZED_WINDOW = UNAUTHORIZED_CREDIT_FETCHES * (4 + MAX_KV_FETCH_BYTES)
# ...and what all such connections may make the endpoint hold of their fetch streams together (the daemon's
# limits.unauthorized_memory_mb, whose default this is): ~2 MB each over max_connections (10,000) let clients
# without a token make the daemon hold ~20 GB. Past it the connection holding the most is closed (KVServer.
# account_unauthorized, with the chat port's PreauthBudget)
UNAUTHORIZED_MEMORY_BYTES = 256 << 20
# ...and what ONE such connection may make it hold (KVServerProtocol.held_bytes): its window (aioquic's receive
# buffers, and every fetch stream's decoder but the first's, ReadCredit) and its first stream's decoder, the largest
# KV_FETCH with its length prefix. The budget is never below it (KVServer.count_unauthorized): at the setting's
# minimum (1 MiB) a lone token holder whose two fetches of 128 Ki ids were not whole yet (~1.3 MB, not yet
# authorized) was closed every time
UNAUTHORIZED_CONNECTION_BYTES = UNAUTHORIZED_WINDOW + 4 + MAX_KV_FETCH_BYTES  # 1,974,015 bytes


class KVServerProtocol(GuardedProtocol):
    """One KV connection: its handshake bounded like the chat port's (deadline, bound, Retry under load: the KV port
    held 3,000 half-open Initials, +271 MiB, for the idle timeout), its client certificate verified when the server
    has a client CA, and its fetches resolved by the provider only once both checks passed."""

    def __init__(self, quic: QuicConnection, stream_handler: Any = None, *, app: KVServer) -> None:
        super().__init__(quic, stream_handler, session_factory=lambda q: KVServerSession(
            q, tuning=app.tuning, marking=app.marking() if app.marking is not None else None,
            request_timeout=app.request_timeout()))
        self.app = app
        self.tasks: set[asyncio.Task[None]] = set()
        self.established = False  # past its handshake and its checks: counted in app.connections
        self.authorized = app.authorize is None  # a fetch of it passed the token check (or none is made)
        # held to UNAUTHORIZED_WINDOW until authorized: only then does what it holds count toward the endpoint's
        # unauthorized_memory (one not held, with no tokens to check, authorizes with any fetch, as a chat connection
        # without [auth] tokens is authorized from the start)
        self.held_back = False
        self.cert_name: str | None = None  # the verified client certificate's name (with a client CA)
        if app.authorize is not None and app.hold_unauthorized() and isinstance(quic, ReadCredit):  # (the session's)
            quic.hold_until_authorized(UNAUTHORIZED_WINDOW)
            self.held_back = True
        if app.client_verifier is not None:
            request_client_certificate(quic)
        app.protocols.add(self)
        self.guard_handshake(app.guard)

    @property
    def kv(self) -> KVServerSession:
        assert isinstance(self.session, KVServerSession)
        return self.session

    def quic_event_received(self, event: qe.QuicEvent) -> None:
        super().quic_event_received(event)
        if isinstance(event, qe.HandshakeCompleted):
            self._on_handshake()

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        super().datagram_received(data, addr)
        if self.held_back and self in self.app.unauthorized:  # what it may make the server hold, before it authorizes
            self.app.account_unauthorized(self, self.held_bytes())

    def held_bytes(self) -> int:
        """Bytes of its fetch streams held: in aioquic's receive buffers, and read into the fetch decoders."""
        return (sum(len(s.receiver._buffer) for s in self._quic._streams.values())
                + sum(f.decoder.pending for f in self.kv.fetches.values()))

    @property
    def closing(self) -> bool:
        """Closed, or closing (by either side): nothing more it sends is read."""
        return self.kv.closed or self.quic_closing

    def _on_handshake(self) -> None:
        """The chat port's checks at the handshake's end: the client's certificate (with a client CA), then the
        connection limit. The KV port checked neither: with ``server.client_ca`` a client without a certificate
        fetched every context and probed prefixes."""
        self._handshake_done()
        app = self.app
        if app.client_verifier is not None:
            verifier = app.client_verifier()
            try:
                if verifier is None:  # (fail closed: a client CA configured and none loaded)
                    raise ClientCertificateError("no client CA loaded", "client certificate rejected")
                self.cert_name = verify_peer_certificate(self._quic, verifier)
            except ClientCertificateError as exc:
                app.stats["unauthorized"] += 1
                if app.on_unauthorized is not None:
                    app.on_unauthorized(self.peer, str(exc), closing=True)
                else:
                    log.warning("closing KV connection from %s: %s", self.peer, exc)
                self.kv.close(ErrorCode.UNAUTHORIZED, exc.close_reason)
                return
        if app.connections >= app.max_connections() and not app.evict_unauthorized():
            app.stats["connections_refused"] += 1
            app.log_refusal(f"refusing KV connection from {self.peer}: {app.connections} KV connections open "
                            "(limits.max_sessions)")
            self.kv.close(ErrorCode.LIMIT_EXCEEDED, "too many KV connections")
            return
        self.established = True
        app.connections += 1
        if not self.authorized:  # what it holds counts from now (KVServer.account_unauthorized), oldest first
            app.count_unauthorized(self)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def handle_session_events(self, events: list[SessionEvent]) -> None:
        for ev in events:
            if isinstance(ev, KVFetchRequested):
                self.app.stats["fetches"] += 1
                if not self.established:
                    # read with the datagram of a Finished whose certificate failed (or past the connection limit),
                    # after the check closed the connection: never resolved, nothing about the store answered
                    self._fail_fetch(ev.stream_id, "refused", ErrorCode.UNAUTHORIZED,
                                     "fetch before the connection's checks completed")
                    continue
                self._spawn(self._resolve(ev.stream_id, ev.fetch))
            elif isinstance(ev, KVChunkNeeded):
                self._spawn(self._chunk(ev))
            elif isinstance(ev, KVFetchRefused):
                self.app.stats["refused"] += 1
                self.app.log_fetch_refusal(self.peer, ev)
            elif isinstance(ev, KVFetchClosed):
                self.app.stats["completed" if ev.complete else "abandoned"] += 1
                if self.app.on_fetch_closed is not None:
                    self.app.on_fetch_closed(ev)
                for listener in self.app.fetch_closed_listeners:
                    listener(ev)
            elif isinstance(ev, ConnectionEnded):
                if not ev.by_peer and ev.error_code not in (ErrorCode.NO_ERROR, ErrorCode.SHUTTING_DOWN):
                    self.app.protocol_error(self.peer, ev)
                for t in list(self.tasks):
                    t.cancel()
                self.app.protocols.discard(self)
                self.app.forget_unauthorized(self)
                self.app.stats["ecn_unvalidated"] += self.kv.ecn.failures  # (live ones: KVServer.ecn_unvalidated)
                self.app.stats["path_changes"] += self.kv.path_changes  # (live ones: KVServer.path_changes)
                self._handshake_done()  # ended in its handshake
                if self.established:
                    self.established = False
                    self.app.connections -= 1

    def _fail_fetch(self, sid: int, outcome: str, code: int, message: str) -> None:
        """End a fetch with an ERROR and count its ``outcome`` (``refused`` at resolve, ``failed`` at a chunk; a
        store failure is one too: it was counted nowhere). One the client gave up meanwhile has its outcome
        already (abandoned: it was counted twice)."""
        f = self.kv.fetches.get(sid)
        if f is None or f.closed:
            return
        self.app.stats[outcome] += 1
        self.kv.reject(sid, code, message)

    async def _resolve(self, sid: int, fetch: KvFetch) -> None:
        try:
            if self.app.draining:  # the daemon is stopping: running fetches finish, new ones are refused
                raise KVError("server shutting down", code=ErrorCode.SHUTTING_DOWN)
            if self.app.authorize is not None and not self.app.authorize(fetch.auth):
                # counted and logged as the chat port's wrong tokens are (0x105; it was the fetch outcome alone)
                if self.app.on_unauthorized is not None:
                    self.app.on_unauthorized(self.peer, "missing or invalid auth token on a KV fetch", closing=False)
                raise KVError("missing or invalid auth token", code=ErrorCode.UNAUTHORIZED)
            if not self.authorized:  # its client holds a token: never evicted to admit another, nor for memory
                self.authorized = True
                self.app.forget_unauthorized(self)
                if isinstance(self._quic, ReadCredit):  # the full window and every fetch stream, at once: the
                    self._quic.release_credit()  # store's answer may take a while, and other fetches wait for it
                    self.transmit()
            # the principal a fetch resolves with (its scope's contexts, beside the shared ones): asked of the
            # owner per fetch, as its token is checked per fetch; set in this fetch's own task (_spawn) alone
            if self.app.principal is not None:
                FETCH_PRINCIPAL.set(self.app.principal(fetch.auth, self.cert_name))
            plan = await self.app.provider.resolve(fetch)
        except TokenwireError as exc:
            self._fail_fetch(sid, "refused", exc.code, str(exc))
        except Exception as exc:  # a broken provider fails this fetch, never the server
            log.exception("KV resolve failed")
            self._fail_fetch(sid, "refused", ErrorCode.INTERNAL, f"store failure: {exc.__class__.__name__}")
        else:
            try:
                self.kv.start(sid, plan, self.clock())
            except Exception as exc:  # (a bug of the session's): this fetch fails with INTERNAL, never the task
                log.exception("KV fetch start failed")  # unseen ("Task exception was never retrieved"), no KV_META
                self._fail_fetch(sid, "refused", ErrorCode.INTERNAL, f"server error: {exc.__class__.__name__}")
            else:
                if plan.rest_tokens:
                    self.app.stats["prefix_hits"] += 1
                events = self.kv.poll(self.clock())
                self.handle_session_events(events)
        self.transmit()

    async def _chunk(self, ev: KVChunkNeeded) -> None:
        f = self.kv.fetches.get(ev.stream_id)
        if f is None or f.plan is None:
            return
        try:
            payload = await self.app.provider.chunk(f.plan, ev.index, ev.level)
        except TokenwireError as exc:  # a chunk gone since the fetch began (evicted, corrupt, re-put)
            self._fail_fetch(ev.stream_id, "failed", exc.code, str(exc))
        except Exception as exc:
            log.exception("KV chunk %d failed", ev.index)
            self._fail_fetch(ev.stream_id, "failed", ErrorCode.INTERNAL, f"store failure: {exc.__class__.__name__}")
        else:
            self.kv.send_chunk(ev.stream_id, ev.index, ev.level, payload, self.clock())
            self.app.stats["chunks"] += 1
            self.app.stats[f"chunks_{ev.level}"] = self.app.stats.get(f"chunks_{ev.level}", 0) + 1
            self.app.stats["bytes"] += len(payload)
        self.transmit()


@dataclass
class KVServer:
    """A running KV channel endpoint (see :func:`serve_kv`)."""

    provider: KVProvider
    tuning: ServerTuning = field(default_factory=ServerTuning)
    authorize: Callable[[str | None], bool] | None = None
    marking: Callable[[], MarkingPolicy] | None = None
    on_fetch_closed: Callable[[KVFetchClosed], None] | None = None
    fetch_closed_listeners: list[Callable[[KVFetchClosed], None]] = field(default_factory=list)  # e.g. metrics
    stats: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("fetches", "completed", "abandoned", "refused", "failed", "prefix_hits", "chunks", "bytes",
         "unauthorized", "connections_refused", "evicted", "evicted_memory", "ecn_unvalidated", "protocol_errors",
         "path_changes"),
        0))
    # (unauthorized, connections_refused, evicted: connections closed by the admission checks, at the handshake's
    # end, to make room for a new client, or for the bytes they held before authorization (of evicted, those are
    # evicted_memory too: the KV metric's evicted label counts both); ecn_unvalidated: ended connections whose ECN
    # validation failed; protocol_errors: connections this server closed because their client broke the protocol,
    # 0x101/0x102 ...; path_changes: ended connections' moves to another client address or port)
    protocols: set[KVServerProtocol] = field(default_factory=set)
    draining: bool = False  # set by the owner's drain: new fetches are refused with SHUTTING_DOWN
    # with a client CA: the verifier in force (the daemon's SIGHUP may replace it), asked at each handshake's end
    client_verifier: Callable[[], ClientCertVerifier | None] | None = None
    # (peer, why, closing=True) of a refused certificate, or (closing=False) a fetch's wrong token; else a warning
    on_unauthorized: Callable[..., None] | None = None
    max_connections: Callable[[], int] = lambda: MAX_CONNECTIONS  # read at each handshake's end (a reload)
    # a KV_FETCH must be whole this many seconds after its first bytes, plus its size at 32 KiB/s (the chat port's
    # limits.request_timeout_s); read as each connection starts (a reload)
    request_timeout: Callable[[], float] = lambda: REQUEST_TIMEOUT_S
    # with authorize: whether a new connection is held to UNAUTHORIZED_WINDOW until a fetch of it is authorized; read
    # as each connection starts (the daemon's check lets every token through while no [auth] tokens are configured,
    # and a reload may add the first)
    hold_unauthorized: Callable[[], bool] = lambda: True
    # (a fetch's token, its connection's verified certificate name) -> the principal it fetches as, or None; asked
    # after authorize passed it. The daemon's: the token's name with [auth] tokens, else the certificate's "cert:"
    # principal, else none. None: no fetch has a principal (only shared contexts are found)
    principal: Callable[[str | None, str | None], str | None] | None = None
    connections: int = 0  # past their handshake and checks
    guard: HandshakeGuard = field(init=False)  # the handshakes in progress: deadline, bound, Retry
    # with tokens (authorize): connections past their checks that have made no authorized fetch, oldest first.
    # Past max_connections the oldest makes room (as on the chat port): tokens are checked per fetch, and five
    # idle token-less connections held every slot of max_sessions = 5 until their idle timeout, 60 s at a time
    unauthorized: PreauthBudget[KVServerProtocol] = field(init=False)
    # what those of them held to UNAUTHORIZED_WINDOW hold of their fetch streams, all together (unauthorized_held),
    # and the bound on it (bytes; read at each count: a reload applies). The daemon gives the chat port's
    # limits.unauthorized_memory_mb in full, not a share of one budget: each port has its own admission (its own
    # max_sessions connections and handshakes too), so a flood on one never closes the other's clients before they
    # authorize, and the daemon's worst case is twice the knob, not ~2 MB x max_sessions (~20 GB). What is enforced
    # is unauthorized.budget(): never below what one connection may hold (count_unauthorized)
    unauthorized_memory: Callable[[], int] = lambda: UNAUTHORIZED_MEMORY_BYTES
    # refusals and evictions past max_connections: a warning, then counted and summed up at most once a minute
    refusals: RefusalLog = field(init=False)
    # fetch streams refused (too many at once, another version, not whole in time) and connections closed for a
    # protocol violation: a warning, then counted and summed up at most once a minute. One client's 500 refused
    # fetches were 500 warning lines in 3 s; its protocol violations were in no log line and no counter
    fetch_refusals: RefusalLog = field(init=False)
    violations: RefusalLog = field(init=False)
    # connections closed for what they held before authorization: a warning, then summed up at most once a minute
    memory_sheds: RefusalLog = field(init=False)
    _quic_server: Any = None

    def __post_init__(self) -> None:
        self.guard = HandshakeGuard(lambda: self.max_connections(), name="KV channel")
        # (the bound read through the attribute at each count: the owner may replace the callable)
        self.unauthorized = PreauthBudget(lambda: self.unauthorized_memory(), measure=_held_now)
        # the limit, not the connections open: read when the line is written, a minute on, that count said "0 open"
        # of refusals made at the limit
        self.refusals = RefusalLog(log, lambda n, s: (
            f"refused or closed {n} more KV connections in the last {s:.0f} s at the connection limit "
            f"(limits.max_sessions = {self.max_connections()})"))
        self.fetch_refusals = RefusalLog(log, lambda n, s: (
            f"refused {n} more KV fetch streams in the last {s:.0f} s (too many at once on their connection, "
            "another protocol version, or a KV_FETCH not whole within limits.request_timeout_s)"))
        self.violations = RefusalLog(log, lambda n, s: (
            f"closed {n} more KV connections in the last {s:.0f} s for breaking the protocol"))
        self.memory_sheds = RefusalLog(log, lambda n, s: (
            f"closed {n} more KV connections in the last {s:.0f} s, which had made no authorized fetch, for the fetch "
            f"bytes they held (limits.unauthorized_memory_mb; tokenwire_kv_connections_refused_total reason evicted)"))

    def ecn_unvalidated(self) -> int:
        """KV connections that stopped marking because their client reported no ECN counts (ECN validation), ended
        or open: the chat port's sessions report theirs to tokenwire_ecn_validation_failed_total, these went
        uncounted."""
        return self.stats["ecn_unvalidated"] + sum(p.kv.ecn.failures for p in self.protocols)

    def path_changes(self) -> int:
        """Times KV connections, ended or open, moved to another client address or port (QUIC migration): a move
        re-plans the fetches running on it (kv_server_session._replan_on_new_path), and before this count only a
        debug log line showed one; the chat port's moves are tokenwire_path_changes_total."""
        return self.stats["path_changes"] + sum(p.kv.path_changes for p in self.protocols)

    def evict_unauthorized(self) -> bool:
        """Past max_connections: close the oldest connection that has made no authorized fetch, to admit a new
        client (its slot is free at once); False when there is none."""
        victim = self.unauthorized.oldest()
        if victim is None:
            return False
        self.forget_unauthorized(victim)
        if victim.established:
            victim.established = False
            self.connections -= 1
        self.stats["evicted"] += 1
        self.log_refusal(f"closing KV connection from {victim.peer}, which made no authorized fetch, to admit a "
                         f"new client ({self.connections + 1} KV connections open, limits.max_sessions)")
        victim.kv.close(ErrorCode.LIMIT_EXCEEDED, "too many KV connections: this connection had made no authorized "
                        "fetch and was closed to admit another client; connect again")
        victim.transmit()
        return True

    @property
    def unauthorized_held(self) -> int:
        """What the connections held to UNAUTHORIZED_WINDOW hold of their fetch streams, together, as last counted."""
        return self.unauthorized.held

    def count_unauthorized(self, proto: KVServerProtocol) -> None:
        """``proto``, past its checks, has made no authorized fetch yet: one of :attr:`unauthorized` (the newest).
        One held to UNAUTHORIZED_WINDOW may hold UNAUTHORIZED_CONNECTION_BYTES alone: the budget is never below it
        while it is counted (below it a lone client was closed for what its own window let it send, before its
        token could be read: a budget of 1 MiB closed every token holder whose two fetches of 128 Ki ids were on
        their way). One not held is out of every count (any fetch of it authorizes it): no allowance."""
        self.unauthorized.add(proto, UNAUTHORIZED_CONNECTION_BYTES if proto.held_back else 0)

    def forget_unauthorized(self, proto: KVServerProtocol) -> None:
        """``proto`` is authorized, closed or gone: no longer one of :attr:`unauthorized`, and what it held no
        longer counts toward :attr:`unauthorized_memory`."""
        self.unauthorized.forget(proto)

    def account_unauthorized(self, proto: KVServerProtocol, held: int) -> None:
        """``proto``, past its checks with no authorized fetch yet, now holds ``held`` bytes of its fetch streams.
        Past the budget (:attr:`unauthorized_memory`, never below one connection's allowance) for all such
        connections together, every count is taken afresh, then the one holding the most (the oldest of equals) is
        closed with LIMIT_EXCEEDED until they are under it again: a client's first fetch is usually far smaller than
        the 1.3 to 2 MB a token-less flood holds on each connection, so a token holder sending one is closed only
        when it holds more than every connection that never authorizes, and never while it is the only one. An
        authorized connection is never one of them (forget_unauthorized, before its fetch is resolved)."""
        for shed in self.unauthorized.account(proto, held):
            self._shed(shed.holder, shed.held, shed.budget)

    def _shed(self, victim: KVServerProtocol, held: int, budget: int) -> None:
        """Close ``victim`` (out of the budget already), which has made no authorized fetch, for the ``held`` bytes
        it held past ``budget``: its slot is free at once (not at the end of its closing period); counted under
        ``evicted`` (and ``evicted_memory``). One already closing (a protocol error, its client's close) reads
        nothing more: its slot alone."""
        if victim.established:
            victim.established = False
            self.connections -= 1
        if victim.closing:
            return
        self.stats["evicted"] += 1
        self.stats["evicted_memory"] += 1
        if not self.memory_sheds.hold(time.monotonic()):
            log.warning("closing KV connection from %s, which made no authorized fetch, holding %d KiB of fetch "
                        "streams: KV connections not yet authorized held more than %d KiB together "
                        "(limits.unauthorized_memory_mb); more such closes are counted "
                        "(tokenwire_kv_connections_refused_total reason evicted) and logged at most every %g s",
                        victim.peer, held >> 10, budget >> 10, REFUSALS_LOG_S)
        victim.kv.close(ErrorCode.LIMIT_EXCEEDED, "too much held before authorization: this connection had made no "
                        "authorized fetch and its fetch streams held more than the server allows; connect again and "
                        "authorize first")
        victim.transmit()

    def log_refusal(self, line: str) -> None:
        """A warning for a connection refused or evicted past max_connections, then at most one a minute saying
        how many more (a flood was a line per client, and the refusals had been logged at debug level only)."""
        if not self.refusals.hold(time.monotonic()):
            log.warning("%s; more are counted (tokenwire_kv_connections_refused_total) and logged at most every %g s",
                        line, REFUSALS_LOG_S)

    def log_fetch_refusal(self, peer: str, ev: KVFetchRefused) -> None:
        """A fetch stream the session refused: a warning, then at most one line a minute saying how many more (the
        rest at debug level); each is counted in ``stats["refused"]`` (tokenwire_kv_fetches_total)."""
        if self.fetch_refusals.hold(time.monotonic()):
            log.debug("refused KV fetch stream %d from %s: %s", ev.stream_id, peer, ev.reason)
            return
        log.warning("refused KV fetch stream %d from %s: %s; more refused fetch streams are counted "
                    "(tokenwire_kv_fetches_total{outcome=\"refused\"}) and logged at most every %g s", ev.stream_id,
                    peer, ev.reason, REFUSALS_LOG_S)

    def protocol_error(self, peer: str, ev: ConnectionEnded) -> None:
        """A connection this server closed because its client broke the protocol (garbage, a chat REQUEST, a
        unidirectional stream, a KV_ACK for a chunk never sent): counted in ``stats["protocol_errors"]``, and logged
        as the chat port logs them but rate-limited (a client can make them as fast as it can connect)."""
        self.stats["protocol_errors"] += 1
        if self.violations.hold(time.monotonic()):
            log.debug("closed KV connection from %s: %s (code %#x)", peer, ev.reason, ev.error_code)
            return
        log.warning("closed KV connection from %s: %s (code %#x); more such closes are counted and logged at most "
                    "every %g s", peer, ev.reason, ev.error_code, REFUSALS_LOG_S)

    def flush_logs(self, now: float, *, final: bool = False) -> None:
        """The lines summing up refusals counted since their last line, once that is REFUSALS_LOG_S old (for the
        owner's housekeeping: otherwise they come with the next refusal of their kind); ``final``: at once (the
        owner is stopping: they were never written)."""
        for refusals in (self.refusals, self.fetch_refusals, self.violations, self.memory_sheds):
            refusals.flush(now, final=final)

    def open_fetches(self, *, unsent_only: bool = False) -> int:
        """Fetches being served, or (``unsent_only``) those with chunks not yet on the wire: what a drain waits
        for, then gives a short grace to be delivered."""
        return sum(1 for p in self.protocols for f in p.kv.fetches.values()
                   if not unsent_only or f.plan is None or f.next_index < len(f.plan.token_counts))

    @property
    def port(self) -> int:
        return int(self._quic_server._transport.get_extra_info("sockname")[1])

    @property
    def accepting(self) -> bool:
        """Whether the endpoint reads its datagrams (False: each is dropped unread, and a client's Initial is sent
        again): the owner's start gate (:func:`serve_kv`'s ``accepting``), as on the daemon's chat port."""
        return bool(self._quic_server.accepting)

    @accepting.setter
    def accepting(self, value: bool) -> None:
        self._quic_server.accepting = value

    @property
    def quic_configuration(self) -> Any:
        """The listener's configuration, read at each new connection (the daemon's SIGHUP renews its certificate)."""
        return self._quic_server._configuration

    def close(self) -> None:
        self.guard.close()
        for p in list(self.protocols):
            for t in list(p.tasks):  # now, not at the connection's end: the store's workers are going away too
                t.cancel()  # (a chunk task then failed with "cannot schedule new futures", a traceback each)
            p._handshake_done()  # its deadline has nothing left to close
            with contextlib.suppress(Exception):
                p.close(ErrorCode.SHUTTING_DOWN, "server shutting down")
        if self._quic_server is not None:
            self._quic_server.close()


def _held_now(proto: KVServerProtocol) -> int:
    """What ``proto`` holds of its fetch streams now, for the budget's recount: a count from its last datagram may
    be stale (a fetch stream refused since by its deadline, a timer, no datagram of its own). One not held back
    (started while no tokens were configured) is out of every count."""
    return proto.held_bytes() if proto.held_back else 0


def _callable(value: _T | Callable[[], _T]) -> Callable[[], _T]:
    """``value`` as a callable that gives what is in force (a fixed value: itself)."""
    if callable(value):
        return value
    return lambda: value


async def serve_kv(provider: KVProvider, host: str = "::", port: int = 4434, *, cert: CertPair | None = None,
                   certfile: str | Path | None = None, keyfile: str | Path | None = None,
                   congestion: str = "prague", marking: Callable[[], MarkingPolicy] | None = None,
                   tuning: ServerTuning | None = None, authorize: Callable[[str | None], bool] | None = None,
                   client_verifier: ClientCertVerifier | Callable[[], ClientCertVerifier | None] | None = None,
                   on_unauthorized: Callable[[str, str], None] | None = None,
                   max_connections: int | Callable[[], int] = MAX_CONNECTIONS,
                   request_timeout: float | Callable[[], float] = REQUEST_TIMEOUT_S,
                   hold_unauthorized: bool | Callable[[], bool] = True,
                   unauthorized_memory: int | Callable[[], int] = UNAUTHORIZED_MEMORY_BYTES,
                   principal: Callable[[str | None, str | None], str | None] | None = None,
                   accepting: bool = True) -> KVServer:
    """Serve ``provider``'s contexts on UDP ``host:port`` (ALPN ``tokenwire-kv/1``).

    Bulk KV traffic should mark ECT(1) (``marking=L4SPolicy``) and use the scalable ``prague`` controller;
    :func:`kv_congestion` picks the controller that matches a marking policy.

    ``client_verifier`` (a :class:`~.tls.ClientCertVerifier`, or a callable giving the one in force): every client
    must present a certificate that verifies against it, as on the daemon's chat port with ``server.client_ca``;
    one that does not is closed with UNAUTHORIZED when its handshake completes (``on_unauthorized(peer, why,
    closing=True)`` is told, else a warning is logged) and none of its fetches is resolved. ``authorize`` checks
    each fetch's token on top (a refused one: ``on_unauthorized(peer, why, closing=False)``); with it, a connection's
    flow-control window is ``UNAUTHORIZED_WINDOW`` (two of the largest KV_FETCHes, ~1.3 MB, beside its first
    stream's) with two fetch streams at once until one of its fetches is authorized, unless ``hold_unauthorized``
    (or what a callable gives as the connection starts) is False; all connections so held together may hold at
    most ``unauthorized_memory`` bytes of their fetch streams (a callable is read at each count; never less than one
    connection may hold, ``UNAUTHORIZED_CONNECTION_BYTES``, ~2 MB), past which the one holding the most is closed
    with LIMIT_EXCEEDED (counted in ``stats["evicted"]``). ``max_connections``:
    KV connections open at once (a callable is read at each handshake's end); with ``authorize``, past it the
    oldest connection that has made no authorized fetch is closed to admit a new client. Handshakes in progress
    are bounded by it too, have the chat port's deadlines, and from 64 in progress (or half the bound) new
    clients must answer a QUIC Retry first (:mod:`.handshake_guard`). ``request_timeout`` (seconds, or a callable
    read as each connection starts): a KV_FETCH must have arrived whole this long after its stream's first bytes,
    plus its size at 32 KiB/s, as a chat request within ``limits.request_timeout_s``; else that fetch stream alone
    is refused with LIMIT_EXCEEDED. ``accepting=False``: the port is bound but its datagrams are dropped unread until
    the owner sets :attr:`KVServer.accepting` (a start gate: clients' Initials are resent meanwhile).
    ``principal(token, certificate name)``: the principal an authorized fetch resolves with (the provider looks in
    its scope beside the shared contexts; :attr:`KVServer.principal`).
    """
    server = KVServer(provider, tuning or ServerTuning(), authorize, marking,
                      client_verifier=_callable(client_verifier) if client_verifier is not None else None,
                      on_unauthorized=on_unauthorized, max_connections=_callable(max_connections),
                      request_timeout=_callable(request_timeout), hold_unauthorized=_callable(hold_unauthorized),
                      unauthorized_memory=_callable(unauthorized_memory), principal=principal)
    config = kv_quic_config(server_configuration(cert=cert, certfile=certfile, keyfile=keyfile,
                                                 congestion=congestion))
    server._quic_server = await serve_quic(host, port, configuration=config,
                                           create_protocol=functools.partial(KVServerProtocol, app=server),
                                           ecn=marking is not None, accepting=accepting)
    server.guard.add_server(server._quic_server)
    tune_socket(server._quic_server._transport)
    return server
