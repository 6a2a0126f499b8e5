"""``tokenwire daemon``: the edge service that terminates QUIC from chat clients and streams LLM tokens.

One asyncio (uvloop) process. Per connection a :class:`DaemonProtocol` drives a sans-I/O
:class:`~tokenwire.transport.server_session.ServerSession`; per answer a :class:`LiveRequest` in the
:class:`TranscriptStore` is fed by an upstream task and streamed to every connection attached to it. So an
answer survives its connection: a client that reconnects with the request id and the index it holds gets
the rest (resumption), and an application's ingested answer can be attached to by id.

Operations: sd_notify READY/STATUS/WATCHDOG/RELOADING/STOPPING; SIGHUP reloads auth tokens, limits,
logging and TLS files renewed in place (a bad file is refused and the running configuration kept; a
connection whose token it removed, or let in without one when it adds the first, gets UNAUTHORIZED on its next
request); SIGTERM/SIGINT drain: new requests are
refused with SHUTTING_DOWN, running answers finish within ``limits.drain_timeout_s``, then connections
close; a second SIGTERM/SIGINT stops at once.

This module keeps :class:`Daemon`'s orchestration (listeners, answers, reload, drain). Beside it: the per-connection
shell (``connection.py``: :class:`DaemonProtocol`), the session slots and the connections not yet authorized
(``admission.py``), the answers being generated and the orphan timeout (``answers.py``), the pacing of the full
garbage collections (``gc_pacing.py``), the certificate files (``certificates.py``), SIGHUP's decisions
(``reload_decisions.py``) and its steps on the running parts (``reload_steps.py``), the upstreams' words made sendable
(``sendable_upstream.py``) and an answer's generation task (``generation.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from aioquic.quic.configuration import QuicConfiguration

from tokenwire.transport.errors import ErrorCode
from tokenwire.transport.frames import Request
from tokenwire.transport.handshake_guard import (
    HANDSHAKE_PROVEN_TIMEOUT_S,
    HANDSHAKE_TIMEOUT_S,
    REFUSALS_LOG_S,
    RETRY_ABOVE,
    HandshakeGuard,
    RefusalLog,
    retry_threshold,
)
from tokenwire.transport.quic_io import ValidatingQuicServer, serve_quic, tune_socket
from tokenwire.transport.session_events import ConnectionEnded

from . import unix_sockets
from .admission import Admission
from .answers import LiveAnswers, client_key
from .certificates import cert_principal, client_verifier, server_tls
from .config import (
    Config,
    ConfigError,
    hash_token,
    load_config,
)
from .connection import UNAUTHORIZED_CREDIT_REQUESTS as UNAUTHORIZED_CREDIT_REQUESTS  # (re-exported)
from .connection import CounterDeltas, DaemonProtocol
from .gc_pacing import GcPacing
from .generation import flush_failure_logs
from .ingest import IngestAPI, OpenRefusal, close_clients, principal_problem, serve_ingest
from .logs import set_log_level, setup_logging
from .loop_lag import LoopLag
from .marking import MarkingService
from .reload_decisions import auth_off_refusal, opened_auth_warning, plan_reload, restart_note, upstream_file_warnings
from .reload_steps import (
    ModelCheck,
    check_marking_model,
    log_reloaded,
    recheck_auth,
    reload_tls_files,
    reload_upstream_cas,
)
from .sd_notify import Notifier
from .sendable_upstream import SendableUpstream
from .startup import StartupError, addr, cannot_listen
from .telemetry import METRICS_CLOSE_MAX_S, UPSTREAM_FAILURE_REASONS, Metrics, serve_metrics, transport_error_label
from .transcripts import LiveRequest, TranscriptStore
from .upstream_config import upstream_file_problems
from .upstreams import Upstream, build_upstreams

log = logging.getLogger("tokenwire.daemon")
# The handshake deadlines and the Retry threshold are transport/handshake_guard.py's (HANDSHAKE_TIMEOUT_S,
# HANDSHAKE_PROVEN_TIMEOUT_S, RETRY_ABOVE), imported as this module's values: the daemon's guard reads them here when
# it is made (tests shorten them)
KV_CLOSE_S = 5.0  # at stop, how long the KV store's workers may take to end their chunk (well under WatchdogSec)
STOP_MARGIN_S = 10.0  # asked of systemd beyond the drain and the KV close: closing connections, the process's exit
# `tokenwire daemon`'s wait, after "stopped", for a KV worker still inside a chunk's write (daemon_cli.finish_process,
# signals ignored by then): asked of systemd too, else its SIGKILL at the end of the extension failed the stop
KV_WORKER_WAIT_S = 10.0


def stop_extension_s(drain_timeout_s: float) -> float:
    """What STOPPING=1 asks systemd for (EXTEND_TIMEOUT_USEC): every bounded wait between the first stop signal and
    the process's exit, summed (the drain, the KV store's close, the metrics endpoint's, the exit's wait for a KV
    worker, a margin); a wait missing here (the metrics close's, 120 s) was SIGKILLed at the extension's end."""
    return drain_timeout_s + KV_CLOSE_S + METRICS_CLOSE_MAX_S + KV_WORKER_WAIT_S + STOP_MARGIN_S


# UNAUTHORIZED for a token of another principal than the connection's (Daemon._authorize; docs/protocol.md)
ANOTHER_PRINCIPAL = ("auth token of another principal: a connection keeps the principal of its first authorized "
                     "request (open a new connection for another)")


class Daemon:
    def __init__(
        self, config: Config, *, notifier: Notifier | None = None, log_format_override: str | None = None
    ) -> None:
        self.config = config
        self.log_format_override = log_format_override  # --log-format: wins over the file on reload too
        self.metrics = Metrics()
        self.marking = MarkingService(config.marking, self.metrics)
        self.store = TranscriptStore(
            max_bytes=int(config.limits.transcript_memory_mb * (1 << 20)), retain_s=config.limits.transcript_retain_s
        )
        self.upstreams: dict[str, Upstream] = build_upstreams(config)
        for up in config.upstreams:  # each upstream's series at 0 (an ingest route's answers fail as ingest answers)
            if up.type != "ingest":
                for reason in UPSTREAM_FAILURE_REASONS:
                    self.metrics.upstream_failures.labels(upstream=up.name, reason=reason)
        self.protocols: set[DaemonProtocol] = set()
        # the session slots (max_sessions) and the connections holding one not yet authorized (admission.py), which
        # each connection (connection.py) takes, accounts for and gives back
        self.admission = Admission(lambda: self.config.limits, self.metrics)
        # connections in their handshake: a deadline, bounded by max_sessions too, Retry under load (the KV channel's
        # endpoint has a guard of its own); housekeeping turns Retry off (HandshakeGuard.relax)
        self.handshake_guard = HandshakeGuard(
            lambda: self.config.limits.max_sessions, timeout_s=HANDSHAKE_TIMEOUT_S,
            proven_timeout_s=HANDSHAKE_PROVEN_TIMEOUT_S, threshold=lambda: self.retry_threshold(),
            on_refused=lambda reason: self.metrics.handshakes_refused.labels(reason=reason).inc(),
            on_retry=lambda active: self.metrics.retry_active.set(int(active)), relax_every=None)
        # connections closed for a protocol error (a malformed request), the way refusals past max_sessions are: a
        # line per connection let 200 clients without a token write 200 warnings
        self._protocol_closes = RefusalLog(log, lambda n, s: (
            f"closed {n} more connections for protocol errors in the last {s:.0f} s (tokenwire_errors_total by "
            f"code)"))
        # requests the sessions refused (too large, too slow, too many at once): the first one of a connection is a
        # warning, unless another connection's was within REFUSALS_LOG_S (300 connections, 2 each: 600 lines)
        self._request_refusals = RefusalLog(log, lambda n, s: (
            f"refused {n} more requests in the last {s:.0f} s (over a request limit: tokenwire_errors_total by "
            f"code)"))
        # the answers being generated (upstreams' tasks, ingest answers), their bound and the orphan timeout
        # (answers.py): requests start answers there, and tell it when one has a listener again or none left
        self.answers = LiveAnswers(lambda: self.config.limits, self.metrics, self.store)
        self.gc_pacing = GcPacing()  # the heap frozen once started, full collections after connections ended
        self.notifier = notifier or Notifier()
        # the bundle's digest, from the same read: SIGHUP rereads the bundle when its bytes change
        self.client_verifier, self._client_ca_digest = client_verifier(config)
        self._quic_config: Any = None  # the listeners' shared configuration: SIGHUP replaces its certificate
        self.draining = False
        self._handle_signals = False
        self.reload_note = ""  # the start of STATUS while the last reload's files were refused (status_line)
        # settings the file changed that only a restart applies, by key (status_line): until a restart, or a reload
        # of a file that reverts them
        self.restart_pending: list[str] = []
        self._restart_read: Config | None = None  # the file as the last applied reload read it (None: as running)
        self.model_check: ModelCheck | None = None  # the last reload's check of the marking model, on a worker thread
        # started: the chat listeners read their datagrams and /healthz is 200 (while not draining) from then on
        self.serving = False
        self._closing_start = False  # start() is being undone (a failure or a stop signal): run()'s signals wait
        self._cut = asyncio.Event()  # a second SIGTERM/SIGINT: stop draining now
        self._drain_task: asyncio.Task[None] | None = None
        self.addresses: list[tuple[str, int]] = []
        self.metrics_address: tuple[str, int] | None = None
        self._servers: list[ValidatingQuicServer] = []
        self._metrics_runner: Any = None
        self._ingest: asyncio.Server | None = None
        self._ingest_ident: tuple[int, int, int] | None = None
        self._ingest_api: IngestAPI | None = None
        self._ingest_clients: set[asyncio.Task[None]] = set()  # the applications' connections, ended at stop
        self.kv: Any = None  # KVRuntime when [kv] is enabled
        self._housekeeping: asyncio.Task[None] | None = None
        self.loop_lag = LoopLag(self.metrics.loop_lag.observe)  # (started with the housekeeping)
        self._stopped = asyncio.Event()

    # ----------------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Open every listener; :class:`StartupError` (with what was opened closed again) if one cannot. Any
        other exception closes what was opened too, then propagates: only StartupError and a cancel did, and an
        OSError or a bug in a later step left the UDP listeners, their sockets and the housekeeping task open."""
        try:
            await self._start()
        except (Exception, asyncio.CancelledError):  # cancelled: a stop signal during the start (run())
            # (not BaseException: KeyboardInterrupt/SystemExit go on untouched, as asyncio expects of them)
            self._closing_start = True  # (run(): a later stop signal must not cut this cleanup short)
            await self.stop()
            raise

    async def _start(self) -> None:
        cfg = self.config
        quic_config, tls_kwargs = server_tls(cfg)
        self._quic_config = quic_config
        self.metrics.served_certificate(quic_config.certificate)  # (tokenwire_tls_cert_expiry_seconds)
        factory = functools.partial(DaemonProtocol, daemon=self)
        self.marking.start()
        for host, port in cfg.server.listen:
            try:
                # bound now (a port in use fails the start at once, not after the KV warm-up), served once ready: a
                # client served during the warm-up had its answer cut by a stop signal there (no drain before READY).
                # Gated from its first datagram: gated after serve_quic returned, one read in between was served
                server = await serve_quic(host, port, configuration=quic_config, create_protocol=factory,
                                          ecn=cfg.marking.enabled, accepting=False)
            except OSError as exc:
                raise cannot_listen("server.listen", exc, host, port) from None
            self._servers.append(server)  # at once: stop() closes only what is in the list, whatever raises next
            tune_socket(server._transport)
            self.marking.add_transport(server._transport)
            self.handshake_guard.add_server(server)
            sockname = server._transport.get_extra_info("sockname")  # type: ignore[union-attr]  # set: serving
            self.addresses.append((sockname[0], sockname[1]))
        if cfg.metrics.listen is not None:
            host, port = cfg.metrics.listen
            try:
                self._metrics_runner = await serve_metrics(
                    self.metrics, host, port, lambda: self.serving and not self.draining,
                    why_not=lambda: "draining" if self.serving else "starting")
            except OSError as exc:
                raise cannot_listen("metrics.listen", exc, host, port, tcp=True) from None
            site = next(iter(self._metrics_runner.sites))
            self.metrics_address = site._server.sockets[0].getsockname()[:2]
        if cfg.ingest.socket is not None:
            api = self._ingest_api = self.answers.ingest = IngestAPI(
                self.store,
                max_tokens=lambda: self.config.limits.max_tokens,
                on_open=self.answers.ingest_opened,
                on_done=self.answers.ingest_done,
                on_tokens=self.metrics.tokens.inc,
                max_open=cfg.ingest.max_open,
                orphan_log=self.answers.orphan_cancels,  # one line, then a summary, for chat and ingest answers alike
                refuse_open=self._ingest_refusal,
                on_open_refused=lambda reason: self.metrics.ingest_opens_refused.labels(reason=reason).inc(),
                on_push_refused=lambda reason: self.metrics.ingest_pushes_refused.labels(reason=reason).inc(),
                stall_timeout_s=cfg.ingest.stall_timeout_s,
            )
            try:
                # bound now, served once ready, as the chat port (an app's connection waits in the backlog)
                self._ingest = await serve_ingest(cfg.ingest.socket, api, clients=self._ingest_clients,
                                                  group=cfg.ingest.socket_group, start_serving=False)
                self._ingest_ident = unix_sockets.identity(cfg.ingest.socket)
            except OSError as exc:
                raise StartupError(f"ingest.socket: cannot listen on {cfg.ingest.socket}: "
                                   f"{exc.strerror or exc}") from None
        if cfg.kv.enabled:  # the KV channel: its own endpoint and store (torch only loads when KV is used)
            from .kv_metrics import KVMetrics
            from .kv_runtime import start_kv

            # registered before the warm-up (seconds), at 0: a scrape then had none of the KV families
            kv_metrics = KVMetrics(self.metrics.registry, capacity_bytes=cfg.kv.capacity_bytes)
            self.notifier.status("starting: the KV codec's kernels (a first start takes ~10 s)")
            # the chat port's checks on the KV port too: tokens per fetch, with server.client_ca a verified client
            # certificate (the one in force: SIGHUP may renew the bundle), and max_sessions connections
            self.kv = await start_kv(
                cfg.kv, authorize=self._kv_authorized, on_unauthorized=self.admission.unauthorized_client,
                client_verifier=(lambda: self.client_verifier) if self.client_verifier is not None else None,
                max_connections=lambda: self.config.limits.max_sessions,
                request_timeout=lambda: self.config.limits.request_timeout_s,
                unauthorized_memory=lambda: int(self.config.limits.unauthorized_memory_mb * (1 << 20)),
                principal=self._kv_principal, check_scope=self._kv_scope_problem,
                serve=False, **tls_kwargs)  # (bound, gated: served at READY, below)
            kv_metrics.attach(self.kv)
        self._housekeeping = asyncio.ensure_future(self._housekeep())
        self.loop_lag.start(asyncio.get_running_loop())
        # before the serving signal handlers go in: a failure past them (start() undoing it all) would leave
        # on_stop_signal installed to drain a daemon that start() is already stopping
        status = self.ready_status()
        if self._handle_signals:
            # before READY: systemd may reload or stop the daemon the moment it is ready, and a SIGHUP that
            # came before the handler killed it (the default action), a SIGTERM skipped the drain
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, self.reload)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.on_stop_signal)
        if self._handle_signals:  # the process is this daemon's (run()): frozen before any client is let in
            self.gc_pacing.freeze_started(asyncio.get_running_loop())
        # the start gate opens: every listener was bound above and served nothing during the KV warm-up, where a
        # stop signal cut what was served with no drain (the ingest sockets' and the KV port's too)
        for server in self._servers:
            server.accepting = True
        if self._ingest is not None:
            await self._ingest.start_serving()
        if self.kv is not None:
            await self.kv.start_serving()
        self.serving = True
        log.info("%s", status)
        self.notifier.ready(status)

    def _flush_counters(self) -> None:
        """Every connection's packet counters into the metrics: those that moved since the last tick, summed, and
        each metric counted once (DaemonProtocol.add_counters: 27-148 ms a tick at 3,000 idle sessions, each
        recomputed and counted alone). Its own function: a loop variable in the housekeeping coroutine held the
        last connection (and megabytes of its buffers) until the next one."""
        deltas = CounterDeltas()
        for proto in self.protocols:  # (nothing in the loop adds or drops a connection)
            proto.add_counters(deltas)
        deltas.flush(self)

    def _log_refusals(self, now: float, *, final: bool = False) -> None:
        """The refusals counted since the last line about them, once REFUSALS_LOG_S has passed; ``final``: at once
        (stop(): those held back were never written, though their metrics had counted them)."""
        adm = self.admission
        for refusals in (adm.session_refusals, adm.auth_refusals, adm.evictions, adm.idle_closes,
                         self._protocol_closes, self._request_refusals, self.answers.busy_refusals, adm.memory_sheds,
                         self.answers.orphan_cancels, self.answers.orphan_reclaims, self.answers.client_refusals):
            refusals.flush(now, final=final)
        self.metrics.flush_logs(now, final=final)  # the metrics port's malformed requests
        if self.kv is not None:  # the KV endpoint's refused fetches and protocol violations
            self.kv.server.flush_logs(now, final=final)
        flush_failure_logs(self.upstreams.values(), now, final=final)  # the upstreams' failed answers
        if final and self._ingest_api is not None:  # (else its expire_stalled, in housekeeping, flushes them)
            self._ingest_api.flush_logs(now, final=True)
        unix_sockets.flush_logs(now, final=final)  # the ingest sockets' connections refused past their bound

    def retry_threshold(self) -> int:
        """Handshakes in progress that turn Retry on: RETRY_ABOVE, or half of max_sessions when that is less (the
        handshakes in progress never exceed max_sessions: with a small one, Retry never came on and spoofed
        Initials held every handshake slot)."""
        return retry_threshold(self.config.limits.max_sessions, RETRY_ABOVE)

    def listening(self) -> str:
        """The QUIC listeners (and the KV channel's), ``udp/[::]:4433`` style: IPv6 hosts in brackets, then the
        ingest sockets, ``unix:/run/tokenwire/ingest.sock`` (the start-up line and STATUS never named them, and
        an application developer had to read the configuration to find where to connect)."""
        out = ", ".join(f"udp/{addr(h, p)}" for h, p in self.addresses)
        if self._ingest is not None and self.config.ingest.socket is not None:
            out += f"; ingest on unix:{self.config.ingest.socket}"
        if self.kv is not None:
            out += f"; KV channel on udp/{addr(self.config.kv.listen[0], self.kv.server.port)}"
            if self.kv.ingest is not None and self.kv.ingest_path is not None:
                out += f", KV ingest on unix:{self.kv.ingest_path}"
        return out

    def ready_status(self) -> str:
        """READY's STATUS: every listening address, the metrics URL included."""
        status = "listening on " + self.listening()
        if self.metrics_address:
            status += f"; metrics on http://{addr(*self.metrics_address)}/metrics"
        return status

    def _kv_authorized(self, token: str | None) -> bool:
        """The KV channel's check, against the tokens in force now: a SIGHUP that revokes one (or adds the
        first) applies to KV fetches too; a closure over the start-up tokens kept revoked ones working."""
        auth = self.config.auth
        return not auth.required or auth.principal(token) is not None

    def _kv_principal(self, token: str | None, cert_name: str | None) -> str | None:
        """The principal a KV fetch (already authorized) resolves with, as a chat client's: its token's name with
        [auth] tokens (a certificate gives way to it), else its certificate's ``cert:`` principal with
        server.client_ca, else none."""
        auth = self.config.auth
        if auth.required:
            return auth.principal(token)
        return cert_principal(cert_name) if cert_name is not None else None

    def _kv_scope_problem(self, scope: str) -> str | None:
        """Why no KV fetch could have principal ``scope`` under the auth in force (an ingest open's check), or None:
        a put scoped to it is refused."""
        return principal_problem(scope, self.config.auth, certificates=self.client_verifier is not None)

    def _ingest_refusal(self, principal: str | None) -> OpenRefusal | None:
        """Why an application may not open an answer now, or None: the daemon drains (every attach would get
        SHUTTING_DOWN), answers are at ``limits.max_live_answers`` (ingest answers are never evicted: open ones
        count), or no client could attach as ``principal`` under the auth in force now (SIGHUP changes it)."""
        if self.draining:
            return OpenRefusal("draining", "daemon shutting down")
        problem = principal_problem(principal, self.config.auth, certificates=self.client_verifier is not None)
        if problem is not None:
            return OpenRefusal("principal", problem)
        busy = self.answers.busy()  # (last: at the bound it cancels orphans to make room, for an open that goes on)
        if busy is not None:
            self.answers.busy_refused("an answer opened on the ingest socket")
            return OpenRefusal("busy", busy)
        return None

    def drain_status(self) -> str:
        return f"draining {self.streaming_count()} answers"

    def status_line(self) -> str:
        """The periodic STATUS (``systemctl status``): what the last reload refused (until one succeeds: the
        files on disk are not what runs, which had vanished from the status 10 s after the reload), the
        listening addresses, then the load."""
        return (
            f"{self.reload_note}{restart_note(self.restart_pending)}listening on {self.listening()}; "
            f"{self.admission.established} sessions, "
            f"{self.store.live_count} answers "
            f"running, {self.store.finished_count} retained"
        )

    async def _housekeep(self) -> None:
        interval = 1.0
        if self.notifier.watchdog_s:
            interval = min(interval, self.notifier.watchdog_s / 3)
        last_status = 0.0
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            expired, evicted = self.store.expired, self.store.evicted
            self.store.evict(now)
            self.metrics.expired.inc(self.store.expired - expired)
            self.metrics.evicted.inc(self.store.evicted - evicted)
            self.metrics.transcript_bytes.set(self.store.memory_bytes)
            self._flush_counters()
            self.handshake_guard.relax(now)  # Retry off once handshakes have been calm a while
            self._log_refusals(now)
            self.gc_pacing.collect_ended(now, len(self.protocols))
            self.answers.cancel_orphans(now)
            if self._ingest_api is not None:
                self._ingest_api.expire_stalled(now)

            self.notifier.watchdog()
            if now - last_status >= 10:
                # while draining, STATUS keeps saying so (it said "listening on" again 10 s into a drain)
                self.notifier.status(self.drain_status() if self.draining else self.status_line())
                last_status = now

    def reload(self) -> bool:
        """SIGHUP: apply new auth tokens, limits and logging from the same file, and a certificate, client CA
        bundle or upstream ca_file renewed in place; a bad file changes nothing. systemd hears READY=1 after
        RELOADING=1 whatever happens (an unexpected error left the unit "reloading" until its timeout). Ignored while
        draining: the daemon is on its way out, and a READY=1 after STOPPING=1 told systemd otherwise."""
        if self.draining:
            log.warning("reload ignored: the daemon is draining")
            return False
        self.notifier.reloading()
        status = "reload failed part-way (see the log)"
        self.reload_note = "the last reload failed part-way (see the log); "
        try:
            status, ok = self._reload()
            return ok
        except Exception:  # a bug here must not take down a serving daemon, nor leave systemd waiting
            # (what it applied before the failure stays applied: auth and limits are swapped in one step)
            log.exception("reload failed part-way")
            return False
        finally:
            # the gauges say what STATUS says: reload_note is empty only after a reload that applied everything
            self.metrics.config_reload_ok.set(0 if self.reload_note else 1)
            self.metrics.restart_pending.set(1 if self.restart_pending else 0)
            self.metrics.served_certificate(self._quic_config.certificate if self._quic_config is not None else None)
            self.notifier.ready(status)

    def _reload(self) -> tuple[str, bool]:
        try:
            # a TLS file missing (mid-renewal) is _reload_tls's to report, the running one kept: it refused the
            # whole file, and a token revoked in the same SIGHUP stayed valid
            new = load_config(self.config.path, tls_may_be_missing=True)
            refusal = auth_off_refusal(self.config.auth, new.auth)  # (reload_decisions.py)
            if refusal is not None:
                raise ConfigError(f"{self.config.path}: {refusal}")
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            self.reload_note = "the last reload was refused (see the log); "
            return f"reload refused: {exc}", False
        # what it applies: reload_decisions.py (and what it says of the restart-needing changes: only what is new)
        plan = plan_reload(self.config, new, self.log_format_override, pending=self.restart_pending,
                           last_read=self._restart_read)
        logging_cfg = plan.config.logging
        if plan.reformat:  # replaces the root handlers: only on a change
            setup_logging(self.config.logging.level, logging_cfg.format)  # the new level once the reload is logged
        self.restart_pending = plan.restart_pending
        self._restart_read = new
        # upstream files a start would refuse: read leniently, warned of (a missing key file refused the reload)
        for warning in upstream_file_warnings(self.config, upstream_file_problems(new)):
            log.warning("%s", warning)
        check = check_marking_model(self.marking, new)  # (reload_steps.py, as the steps below)
        if check is not None:
            self.model_check = check
        running_auth = self.config.auth
        self.config = plan.config
        self.store.max_bytes = plan.transcript_max_bytes
        self.store.retain_s = plan.transcript_retain_s
        opened = opened_auth_warning(
            running_auth, new.auth, certificates=self.client_verifier is not None,
            holding=sum(1 for p in self.protocols if p.authorized and p.token is not None))
        removed, now_required = recheck_auth(self.protocols, new.auth)
        tls_ok = self._reload_tls(new)
        tls_ok = reload_upstream_cas(self.upstreams.values()) and tls_ok  # (both run: each logs what it refused)
        set_log_level(plan.announce_level)  # the more verbose of the two levels (see ReloadPlan.announce_level)
        log_reloaded(plan, new, opened, removed, now_required)
        set_log_level(new.logging.level)  # aioquic's logger too, as at start
        self.reload_note = "" if tls_ok else "TLS files refused at the last reload (see the log); "
        return f"reloaded; {self.status_line()}", True

    def _reload_tls(self, new: Config | None = None) -> bool:
        """Take up a certificate or client CA bundle changed in place (at the running paths: changed paths need
        a restart). One that cannot be used, or is missing, is logged and the running one kept; False then.
        ``new``: the file's configuration, whose TLS files at other paths than the running ones are checked to
        exist (a restart would fail without them; the reload read them leniently): reload_steps.reload_tls_files."""
        configs: list[QuicConfiguration] = []  # those serving the certificate: none before the listeners open
        if self.config.server.certificate is not None and self._quic_config is not None:
            configs.append(self._quic_config)
            if self.kv is not None:
                configs.append(self.kv.server.quic_configuration)
        done = reload_tls_files(self.config.server, new, configs, self._client_ca_digest)
        if done.client_ca is not None:
            self.client_verifier, self._client_ca_digest = done.client_ca
        return done.ok

    def streaming_count(self) -> int:
        return sum(len(p.attached) for p in self.protocols)

    def on_stop_signal(self) -> None:
        """SIGTERM/SIGINT: the first drains; a second one (an operator who will not wait up to
        ``drain_timeout_s``) ends the drain at once, cutting what still streams as the deadline would."""
        if self._drain_task is None:  # not self.draining: two signals in one loop turn are first and second
            self._drain_task = asyncio.ensure_future(self.drain())
            self._drain_task.add_done_callback(self._drained)
        elif not self._cut.is_set():
            log.warning("second signal: stopping now; answers still streaming, cut: %d", self.streaming_count())
            self._cut.set()

    def _drained(self, task: asyncio.Task[None]) -> None:
        """The drain ended: if it raised, say so (the daemon holds the task, so asyncio never logs it) and let
        ``run()`` return; ``drain()`` has run ``stop()`` in any case."""
        if not task.cancelled() and task.exception() is not None:
            log.error("draining failed; stopping", exc_info=task.exception())
        self._stopped.set()

    async def drain(self) -> None:
        """SIGTERM: refuse new requests, let running answers finish (bounded), then close everything."""
        if self.draining:
            return
        self.draining = True
        kv = self.kv.server if self.kv is not None else None
        if kv is not None:  # the KV channel drains too: new fetches refused, running ones finish (they were cut)
            kv.draining = True
        deadline = time.monotonic() + self.config.limits.drain_timeout_s
        try:
            # systemd's TimeoutStopSec (45 s in the unit) would SIGKILL a longer drain mid-way: ask for the drain's
            # own bound and every later wait's (stop_extension_s; sd_notify(3), EXTEND_TIMEOUT_USEC)
            self.notifier.stopping(self.drain_status(),
                                   extend_s=stop_extension_s(self.config.limits.drain_timeout_s))
            log.info("draining: no new requests; waiting up to %.0f s (signal again to stop now)",
                     self.config.limits.drain_timeout_s)
            # first let every attached answer finish generating (and every KV fetch put its chunks on the wire),
            # then give clients a short grace for the tail (a client that vanished without closing must not hold
            # the shutdown for the whole deadline)
            while time.monotonic() < deadline and (
                    any(not r.done for p in self.protocols for r in p.attached.values())
                    or (kv is not None and kv.open_fetches(unsent_only=True))):
                if await self._cut_within(0.05):
                    break
            tail_deadline = min(deadline, time.monotonic() + 2.0)
            while time.monotonic() < tail_deadline and (any(p.attached for p in self.protocols)
                                                        or (kv is not None and kv.open_fetches())):
                if await self._cut_within(0.05):
                    break
            left = self.streaming_count()
            if left and not self._cut.is_set():  # a second signal has said how many it cut
                if time.monotonic() >= deadline:
                    log.warning("drain deadline reached; answers still streaming, cut: %d", left)
                else:  # every answer is generated; these clients did not take the rest within the grace
                    # (unknown whether they hold every token: a client that did but never sent its FIN counts)
                    log.warning("closing with %d generated answer%s whose clients had not ended their requests "
                                "within 2 s", left, "s" if left > 1 else "")
        finally:  # whatever the wait raised, everything is closed
            await self.stop()

    async def _cut_within(self, seconds: float) -> bool:
        """Wait up to ``seconds``; True as soon as a second stop signal came."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._cut.wait(), seconds)
        return self._cut.is_set()

    async def stop(self) -> None:
        """Close everything. Each step runs on its own and ``run()`` returns in the end whatever raises: a
        connection whose packet path failed made ``server.close()`` raise, the later steps never ran, and the
        daemon waited forever (only SIGKILL ended it)."""
        try:
            for proto in list(self.protocols):
                with _logged("closing a connection"):
                    proto._handshake_done()  # its deadline has nothing left to close
                    proto.close(ErrorCode.SHUTTING_DOWN, "server shutting down")
            await asyncio.sleep(0.05)  # let the CONNECTION_CLOSE frames leave
            self.answers.cancel_all()
            for server in self._servers:
                with _logged("closing a listener"):
                    server.close()
            if self._ingest is not None:
                with _logged("closing the ingest socket"):
                    self._ingest.close()
                    if self.config.ingest.socket is not None:  # Python 3.11's unix server leaves it on disk
                        unix_sockets.release(self.config.ingest.socket, self._ingest_ident)
            with _logged("closing the applications' ingest connections"):
                await close_clients(self._ingest_clients)  # each hears why, in a last line
            if self.kv is not None:
                with _logged("closing the KV channel"):
                    # awaited, bounded: joining its workers on the loop held a SIGTERM during a long put 17-19 s
                    # past drain_timeout_s (a put cut there is refused whole-or-in-chunks, never half a chunk)
                    await self.kv.aclose(KV_CLOSE_S)
            if self._metrics_runner is not None:
                with _logged("closing the metrics endpoint"):
                    # bounded: a scrape still being served is waited for at most METRICS_CLOSE_MAX_S
                    await self._metrics_runner.cleanup()
            if self._housekeeping is not None:
                self._housekeeping.cancel()
            for up in self.upstreams.values():
                with _logged(f"closing upstream {up.name!r}"):
                    await up.close()
            with _logged("summing up the refusals and failures held back"):
                self._log_refusals(time.monotonic(), final=True)  # (else lost: 3 refusals, 1 line, no summary)
            with _logged("telling systemd"):
                self.notifier.close()
        finally:
            self.loop_lag.stop()
            self.gc_pacing.unfreeze()  # (a process that goes on after its daemon, a test run, gets its heap back)
            self._stopped.set()

    async def run(self, *, sighup_before: Callable[[], bool] | None = None) -> None:
        """Start, then serve until SIGTERM/SIGINT (drain) with SIGHUP reloading. ``sighup_before``: whether a
        SIGHUP came before this was called (``tokenwire daemon`` records one from its start on): handled as one
        during the start, a reload once started."""
        self._handle_signals = True  # start() installs the handlers before it says READY
        loop = asyncio.get_running_loop()
        starting = asyncio.ensure_future(self.start())
        reload_due = False

        def reload_later() -> None:
            nonlocal reload_due
            reload_due = True
            log.info("SIGHUP while starting: reloading once started")

        def stop_starting() -> None:
            if self._closing_start:  # cancelled once, or failing: its cleanup (stop()) runs to its end
                return
            self._closing_start = True
            # (a KV codec compile under way is not waited for: `tokenwire daemon` ends the process once stopped,
            # an in-process caller's loop joins its thread at its close, a few seconds)
            log.warning("stop signal while starting: stopping")
            # systemd hears it too ("deactivating", not "activating" while the start is undone); the stop() that
            # follows has nothing to drain, so no extension is asked for
            self.notifier.stopping("stopping: a stop signal during the start")
            starting.cancel()

        # a start can take seconds (the KV codec's compile): a SIGHUP then killed the daemon without a word
        # (its default action) and a SIGTERM too; start() replaces these with the serving handlers
        loop.add_signal_handler(signal.SIGHUP, reload_later)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_starting)
        # read once the loop's handler is in: a SIGHUP before it (imports, the config's load: ~1.5 s) is in the
        # record, one after it reaches reload_later, so none is lost between the two
        if sighup_before is not None and sighup_before():
            reload_later()
        try:
            await starting
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # run() itself was cancelled, not the start by a signal
            log.info("stopped")
            return
        if reload_due:
            self.reload()
        await self._stopped.wait()
        log.info("stopped")

    # ----------------------------------------------------------------------------------------- requests
    def _reject(self, proto: DaemonProtocol, sid: int, code: ErrorCode, message: str, outcome: str = "refused") -> None:
        """End request ``sid`` with an ERROR: counted by code, and by ``outcome`` (refused: no answer had started;
        failed: its answer had)."""
        self.metrics.errors.labels(code=hex(code)).inc()
        self._request_ended(proto, sid, outcome)
        proto.server_session.reject(sid, code, message)

    def _request_ended(self, proto: DaemonProtocol, sid: int, outcome: str, *, closing: bool = False) -> None:
        """Count how a request the daemon ends itself ended (tokenwire_requests_ended_total), once: only one the
        session still holds (those it has ended, it reports: DaemonProtocol.handle_session_events). ``closing``:
        ended by closing its connection, so the session reports it "lost" at the end; that is not counted again."""
        if sid not in proto.server_session.requests or sid in proto.outcome_counted:
            return
        self.request_ended(proto, sid, outcome)
        if closing:
            proto.outcome_counted.add(sid)

    def request_ended(self, proto: DaemonProtocol, sid: int, outcome: str) -> None:
        """Count request ``sid``'s end by ``outcome`` (tokenwire_requests_ended_total; callers count each once) and,
        at level DEBUG, log it: what ties a request to its outcome (its id, peer, scheme, tokens sent, duration;
        never its prompt nor a token)."""
        self.metrics.requests_ended.labels(outcome=outcome).inc()
        req = proto.opened.pop(sid, None)  # (kept only at DEBUG: on_request)
        if not log.isEnabledFor(logging.DEBUG):
            return
        if req is None:
            req = proto.server_session.requests.get(sid)
        if req is None:  # refused by the session before it was read (too large, too many at once)
            log.debug("request - (stream %d) from %s: %s before it was read", sid, proto.peer, outcome)
            return
        scheme = req.scheme if req.started else (req.request.scheme if req.request is not None else "-")
        log.debug("request %s (stream %d) from %s: %s, scheme %s, %d tokens sent, %.3f s",
                  req.request_id.hex() or "-", sid, proto.peer, outcome, scheme, req.tokens_sent,
                  max(0.0, time.monotonic() - req.opened_at))

    def request_refused(self, proto: DaemonProtocol, reason: str) -> None:
        """The session refused one of ``proto``'s requests (``proto.refused`` counts them): the first refusal of a
        connection is a warning, those of other connections within REFUSALS_LOG_S of it are counted and summed up,
        and a logged connection's further refusals are counted in its end's line (a line per connection before:
        300 connections refused twice each wrote 600 warnings)."""
        if proto.refused == 1 and not self._request_refusals.hold(time.monotonic()):
            proto.refusal_logged = True
            log.warning("refused a request from %s: %s; requests refused on other connections are counted "
                        "(tokenwire_errors_total by code) and logged at most every %g s", proto.peer, reason,
                        REFUSALS_LOG_S)
            return
        if proto.refused > 1 and not proto.refusal_logged:  # (its first was summed up: its others with it)
            self._request_refusals.unlogged += 1
        log.debug("refused a request from %s: %s", proto.peer, reason)

    def on_request(self, proto: DaemonProtocol, sid: int, request: Request) -> None:
        sess = proto.server_session
        if log.isEnabledFor(logging.DEBUG) and sid in sess.requests:  # its end's line (request_ended)
            proto.opened[sid] = sess.requests[sid]
        # The client's FIN came in the same read: cancelled before it began. Its token is checked all the same: it
        # returned before the check, so a wrong token got a bare FIN (no UNAUTHORIZED close, log line or count).
        cancelled = sid not in sess.requests
        if not self._authorize(proto, sid, request, cancelled=cancelled):
            return
        if (request.auth is not None and proto.token is None and proto.sent_token_sha256 is None
                and not self.config.auth.required):
            # no tokens configured: nothing checks the one it sent, but a reload adding that token must find it
            # (the SDK sends it until an answer starts: the next request, without one, was closed "auth token revoked")
            proto.sent_token_sha256 = hash_token(request.auth)
        if cancelled:
            return
        if self.draining:
            self._reject(proto, sid, ErrorCode.SHUTTING_DOWN, "server is shutting down; retry elsewhere")
            return
        now = time.monotonic()
        first = 0
        by_id: str | None = None  # a request by id: "attach" or "resume"
        if request.resume_id is not None:
            live = self.store.get(request.resume_id)
            if live is None or live.principal != proto.principal:
                self._reject(proto, sid, ErrorCode.NOT_FOUND, "unknown or expired request id")
                return
            first = request.resume_from or 0
            if first > len(live.transcript):  # more than it could have been sent: a client's bug, not a race
                so_far = "its end" if live.done else "the tokens generated so far"
                self._reject(proto, sid, ErrorCode.BAD_REQUEST,
                             f"resume index {first} is past {so_far} ({len(live.transcript)})")
                return
            # conn.attach, not a reconnect; counted once it has started, as tokenwire_requests_total is (which
            # counts both too: new answers are that total minus these two)
            by_id = "attach" if first == 0 and self.answers.is_ingested(live) else "resume"
        else:
            try:
                route = self.config.route(request.model)
            except LookupError as exc:
                self._reject(proto, sid, ErrorCode.BAD_REQUEST, str(exc))
                return
            upstream = SendableUpstream(self.upstreams[route.name])  # its words, made sendable once
            problem = upstream.refusal(request.model, request.params or {})
            if problem is not None:
                self._reject(proto, sid, ErrorCode.BAD_REQUEST, problem)
                return
            # one client's share first: a client at its cap is refused without reclaiming anyone's orphans for it
            client = client_key(proto.principal, proto.peer_host)
            busy = self.answers.client_busy(client)
            if busy is not None:
                self.answers.client_refused(f"a request from {proto.peer}", client)
                self._reject(proto, sid, ErrorCode.LIMIT_EXCEEDED, busy)
                return
            busy = self.answers.busy()
            if busy is not None:
                self.answers.busy_refused(f"a request from {proto.peer}")
                self._reject(proto, sid, ErrorCode.LIMIT_EXCEEDED, busy)
                return
            live = self.answers.start(request, upstream, route.name, principal=proto.principal, peer=proto.peer,
                                      now=now, client=client)
        try:
            sess.accept(sid, transcript=live.transcript, request_id=live.request_id, first_index=first)
        except Exception:  # a frame of the answer's the encoder refuses: this request ends, not its connection
            log.exception("request %s from %s: sending its start failed", live.request_id.hex(), proto.peer)
            self._end_request(proto, sid, "refused")  # no answer started (nor counted in requests_total)
            self.answers.unsent(live, now)  # generating for nobody: the orphan timeout ends it
            return
        self.admission.request_started(proto)  # (no auth configured: admitted from now on)
        self.metrics.requests.labels(scheme=sess.requests[sid].scheme).inc()
        if by_id is not None:
            (self.metrics.attaches if by_id == "attach" else self.metrics.resumes).inc()
        self._attach(proto, sid, live)

    def _authorize(self, proto: DaemonProtocol, sid: int, request: Request, *, cancelled: bool) -> bool:
        """Whether request ``sid`` may go on as far as authorization goes; if not, it is refused (ERROR) or its
        connection closed (UNAUTHORIZED). ``cancelled``: its client's FIN came with it (nothing to answer on).

        A connection's principal is fixed by its first request a token authorized: a token on a later request must
        be one of that principal's tokens in force. Any valid token used to be taken: after a reload revoked bob's
        token, alice's made bob's connection alice's, and a request with bob's revoked token was then served (an
        authorized connection's tokens were not looked at)."""
        auth = self.config.auth
        if not auth.required:
            if not proto.authorized:  # a reload removed every token: opened before it, let in now
                proto.authorized, proto.revoked = True, None
            return True
        entry = auth.entry(request.auth)
        # (a connection no token has authorized yet, or one let in while none was required, has no principal to keep)
        others = entry is not None and proto.token is not None and entry.name != proto.principal
        if proto.authorized:
            if request.auth is None or (entry is not None and not others):
                return True
            why = ANOTHER_PRINCIPAL if others else "invalid auth token (this connection stays authorized)"
            self._refuse_unauthorized(proto, sid, why, cancelled=cancelled)
            return False
        if entry is not None and not others:
            proto.authorized, proto.token, proto.principal = True, entry, entry.name
            proto.revoked = None
            return True
        why = ANOTHER_PRINCIPAL if others else proto.revoked or "missing or invalid auth token"
        if proto.revoked and proto.attached:
            # a reload removed its token (or added the first ones); the answers it streams may finish, this request
            # may not
            self._refuse_unauthorized(proto, sid, why, cancelled=cancelled, streaming=True)
            return False
        # a wrong token, or a revoked one with nothing left streaming: closed, as ever
        self.admission.unauthorized_client(proto.peer, why)
        self._request_ended(proto, sid, "refused", closing=True)
        proto.server_session.close(ErrorCode.UNAUTHORIZED, why)
        return False

    def _refuse_unauthorized(self, proto: DaemonProtocol, sid: int, why: str, *, cancelled: bool,
                             streaming: bool = False) -> None:
        """Refuse request ``sid`` alone with UNAUTHORIZED (its connection stays): logged as refusals of
        unauthorized clients are. ``cancelled``: its client ended it already, so no ERROR goes out."""
        if not self.admission.auth_refusals.hold(time.monotonic()):
            who = f" ({proto.principal})" if proto.principal else ""
            log.warning("client %s%s: %s; refusing a request%s", proto.peer, who, why,
                        " (its answers streaming finish)" if streaming else "")
        if not cancelled:
            self._reject(proto, sid, ErrorCode.UNAUTHORIZED, why)

    def _attach(self, proto: DaemonProtocol, sid: int, live: LiveRequest) -> None:
        proto.attached[sid] = live
        self.answers.attached(live.request_id)
        key = (proto, sid)

        def notify() -> None:
            try:
                if live.error is not None:
                    code, message = live.error
                    self.metrics.errors.labels(code=hex(code)).inc()
                    self._request_ended(proto, sid, "failed")
                    self.detach(proto, sid, cancel=False)  # (a failed answer is done: nothing more to do there)
                    proto.server_session.fail(sid, code, message)
                elif live.evicted:  # past transcript_memory_mb: the session lets go of it too (else it is not freed)
                    self.detach(proto, sid, cancel=False)
                    self._reject(proto, sid, ErrorCode.LIMIT_EXCEEDED,
                                 "answer evicted: the server's transcript memory is full (limits.transcript_memory_mb)",
                                 "failed")
                else:
                    proto.server_session.notify(sid)
                proto.transmit_soon()  # one transmit per loop turn for all of the connection's answers
            except Exception:
                # this runs inside the upstream's emit(): a failure of this one connection's packet path was
                # blamed on the upstream ("upstream demo failed") and failed the answer for every listener
                log.exception("connection from %s failed while sending", proto.peer)
                self.detach(proto, sid, cancel=False)  # an answer nobody else streams: the orphan timeout ends it
                self._end_request(proto, sid)

        live.listeners[key] = notify
        if live.error is not None:
            notify()

    def _end_request(self, proto: DaemonProtocol, sid: int, outcome: str = "failed") -> None:
        """Sending a request's answer raised: end that request alone with INTERNAL (a frame the encoder refuses,
        an upstream's finish reason with a lone surrogate, closed the whole connection and every other answer on
        it); when even that fails, the connection's packet path is broken, and the connection is closed.
        ``outcome``: "failed" once its answer had started, "refused" when its start could not be sent (counted
        "failed", it was an end without a start: more ends than tokenwire_requests_total)."""
        self.metrics.errors.labels(code=hex(ErrorCode.INTERNAL)).inc()
        try:
            self._request_ended(proto, sid, outcome)
            proto.server_session.reject(sid, ErrorCode.INTERNAL, "server error while sending this answer")
            proto.transmit()
        except Exception:
            if sid in proto.server_session.requests:  # counted above: the close reports it again, not counted twice
                proto.outcome_counted.add(sid)
            with contextlib.suppress(Exception):
                proto.close(ErrorCode.INTERNAL, "server error while sending")

    def detach(self, proto: DaemonProtocol, sid: int, *, cancel: bool) -> None:
        live = proto.attached.pop(sid, None)
        if live is None:
            return
        live.listeners.pop((proto, sid), None)
        self.answers.unattended(live, cancel=cancel)

    def on_report(self, report: Any) -> None:
        if report.stall_ratio is not None:
            self.metrics.client_stall.observe(report.stall_ratio)
        if report.longest_stall_ms is not None and report.longest_stall_ms > 200:
            self.metrics.client_stalls_long.inc()
        if report.ttft_ms is not None:
            self.metrics.client_ttft.observe(report.ttft_ms / 1000.0)

    def on_connection_end(self, proto: DaemonProtocol, ev: ConnectionEnded) -> None:
        if proto.ended:
            return
        proto.ended = True
        if not ev.by_peer and ev.error_code not in (ErrorCode.NO_ERROR, ErrorCode.SHUTTING_DOWN):
            # (by_peer is False only for the session's own close: the client broke the protocol). A close aioquic
            # made for a QUIC transport error in the client's packets (a stream past the request limit:
            # STREAM_LIMIT_ERROR) is counted under its transport code, "quic:0x4": a bare hex reads as tokenwire's
            # code space, where CRYPTO_ERROR's 0x100 + alert collides. It was in no metric, and only aioquic's line
            # (no peer, no limit) told of it
            transport = proto.server_session.transport_error
            label = hex(ev.error_code) if transport is None else transport_error_label(transport.transport_code)
            self.metrics.errors.labels(code=label).inc()
            if not self._protocol_closes.hold(time.monotonic()):
                log.warning("closed connection from %s: %s (code %s); more connections closed for protocol errors "
                            "are counted (tokenwire_errors_total by code) and logged at most every %g s", proto.peer,
                            ev.reason, label, REFUSALS_LOG_S)
        if proto.refused > 1 and proto.refusal_logged:  # (the others: in request_refused's summary)
            log.warning("connection from %s ended; %d of its requests were refused (the first one logged)",
                        proto.peer, proto.refused)
        for sid in list(proto.attached):
            # answers sent whole whose client had not confirmed them (the session reported the others lost already)
            self.request_ended(proto, sid, "lost")
            self.detach(proto, sid, cancel=False)  # lost, not cancelled: the client may resume
        proto.opened.clear()
        proto.flush_counters()
        self.protocols.discard(proto)
        self.gc_pacing.connection_ended()
        proto._handshake_done()  # ended in its handshake
        self.admission.ended(proto)

@contextlib.contextmanager
def _logged(what: str) -> Iterator[None]:
    """One step of a shutdown: an exception is logged and the shutdown goes on."""
    try:
        yield
    except Exception:
        log.exception("stopping: %s failed", what)


def run_daemon(config: Config, *, log_format_override: str | None = None,
               sighup_before: Callable[[], bool] | None = None,
               when_stopped: Callable[[], None] | None = None) -> None:
    """Blocking entry point of ``tokenwire daemon`` (uvloop). ``sighup_before``: see :meth:`Daemon.run`.
    ``when_stopped``: called once the daemon has stopped, still on its loop (whose signal handlers are still in):
    the CLI's ends the process there, before the loop's close joins a KV warm-up's thread (seconds)."""
    import uvloop

    async def main() -> None:
        await Daemon(config, log_format_override=log_format_override).run(sighup_before=sighup_before)
        if when_stopped is not None:
            when_stopped()

    # uvloop's close leaves the loop's signal handlers in: a Python caller's SIGINT, SIGTERM and SIGHUP stayed bound
    # to the closed loop after the daemon returned (stopped, or failed to start), and its Ctrl-C did nothing
    main_thread = threading.current_thread() is threading.main_thread()
    handled = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)  # (Daemon.run's and start()'s)
    previous = {sig: signal.getsignal(sig) for sig in handled} if main_thread else {}
    try:
        uvloop.run(main())
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # (None: installed outside Python, cannot be given back)
                signal.signal(sig, handler)
