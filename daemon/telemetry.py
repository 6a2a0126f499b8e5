"""Prometheus metrics of the daemon, served over HTTP on a local address (``/metrics``, ``/healthz``).

prometheus_client owns the metric types and the exposition format; aiohttp serves them on the daemon's own
event loop (no extra thread).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aioquic.quic.packet import QuicErrorCode
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tokenwire.transport.errors import ErrorCode
from tokenwire.transport.frames import SCHEMES
from tokenwire.transport.handshake_guard import HANDSHAKE_REFUSAL_REASONS, REFUSALS_LOG_S, RefusalLog
from tokenwire.transport.quic_io import DROP_REASONS, datagrams_dropped, stateless_resets

from .ingest import FAILED_OUTCOMES, OPEN_REFUSAL_REASONS, PUSH_REFUSAL_REASONS

disable_created_metrics()  # the *_created series only add noise for a long-running daemon

# The label values of the labelled series, each created at 0 with its metric: a series that first appears with its
# first event is invisible to rate() and increase() for that event (a dashboard showed no refusal, no error).
# tokenwire_handshakes_refused_total: the guard's reasons, then the daemon's own past the handshake
REFUSAL_REASONS = (*HANDSHAKE_REFUSAL_REASONS, "max_sessions", "evicted", "idle", "memory")
# tokenwire_orphans_cancelled_total: after limits.orphan_timeout_s; early, past limits.max_live_answers
ORPHAN_CANCEL_REASONS = ("timeout", "busy")
# tokenwire_errors_total: the codes the daemon sends (ERROR frames, its CONNECTION_CLOSEs), as hex(code); CANCELLED
# only resets streams, UNKNOWN_REQUEST and NO_DATAGRAMS are reserved (docs/protocol.md)
ERROR_CODES_SENT = tuple(hex(c) for c in ErrorCode if c not in (
    ErrorCode.NO_ERROR, ErrorCode.CANCELLED, ErrorCode.UNKNOWN_REQUEST, ErrorCode.NO_DATAGRAMS))


def transport_error_label(code: int) -> str:
    """tokenwire_errors_total's ``code`` of a QUIC transport error (RFC 9000 20.1) that the daemon's QUIC stack closed
    a connection with for what its client sent: "quic:" and the code in hex. Transport codes are a space of their
    own (another close frame on the wire), and CRYPTO_ERROR, 0x100 + a TLS alert, overlaps tokenwire's: as a bare
    hex code a client's bad CRYPTO frame (alert 10, 0x10a) would read as NO_DATAGRAMS."""
    return f"quic:{code:#x}"


# tokenwire_errors_total: the transport errors aioquic closes a connection with for a client's packets once the
# handshake is done (TRANSPORT_PARAMETER_ERROR is the handshake's: a failed handshake is counted as one)
QUIC_ERROR_CODES_SENT = tuple(transport_error_label(c) for c in (
    QuicErrorCode.FLOW_CONTROL_ERROR, QuicErrorCode.STREAM_LIMIT_ERROR, QuicErrorCode.STREAM_STATE_ERROR,
    QuicErrorCode.FINAL_SIZE_ERROR, QuicErrorCode.FRAME_ENCODING_ERROR, QuicErrorCode.CONNECTION_ID_LIMIT_ERROR,
    QuicErrorCode.PROTOCOL_VIOLATION, QuicErrorCode.CRYPTO_BUFFER_EXCEEDED))
# tokenwire_requests_ended_total: how each request stream the daemon read as a request ended, exactly one of these.
# completed: the client confirmed it holds the whole answer; cancelled: the client abandoned it (FIN, reset or
# STOP_SENDING before the end, or a protocol violation that closed its connection: no path was lost); lost: its
# connection ended first (the client may resume it); failed: accepted, then ended by an ERROR (the upstream failed,
# the answer was evicted, a server error while sending); refused: ended before any answer started: by an ERROR
# (auth, limits, bad parameters, unknown id, draining), by its connection's close (malformed, a wrong token, a
# request not yet whole), or by its client before its request was whole or answered. completed + cancelled + lost
# + failed = tokenwire_requests_total once no request is open
REQUEST_OUTCOMES = ("completed", "cancelled", "lost", "failed", "refused")
# tokenwire_upstream_failures_total: by the failed answer's code (answers.failure_reason); its series exist at 0 for
# each configured upstream (the daemon creates them: this module does not know the upstreams)
UPSTREAM_FAILURE_REASONS = ("timeout", "error", "refused")

log = logging.getLogger("tokenwire.daemon")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # the process's own series (process_resident_memory_bytes, process_open_fds, process_cpu_seconds_total,
        # python_gc_*, python_info), as prometheus_client's default registry has them: an operator soaking the
        # daemon read RSS and fds from /proc, as a registry of its own left them out
        for collector in (PROCESS_COLLECTOR, GC_COLLECTOR, PLATFORM_COLLECTOR):
            r.register(collector)
        self.sessions = Gauge("tokenwire_sessions_open", "Open QUIC connections (handshake completed)",
                              registry=r)
        self.sessions_total = Counter("tokenwire_sessions", "QUIC connections accepted (handshake completed)",
                                      registry=r)
        self.handshakes_refused = Counter(
            "tokenwire_handshakes_refused_total",
            "Connections refused or lost before they became sessions, by reason: too_many (handshakes in progress "
            "past limits.max_sessions), timeout (handshake not completed within its deadline or the QUIC idle "
            "timeout), failed (handshake ended otherwise: a TLS error, the client's close), max_sessions (handshake "
            "completed with limits.max_sessions sessions open), evicted (never authorized, closed to admit a new "
            "client), idle (no auth configured: admitted, no answer open, the longest idle, closed to admit a new "
            "client when none was not yet admitted), memory (never authorized, closed for the request bytes it held "
            "past limits.unauthorized_memory_mb); evicted, idle and memory connections were sessions first (counted "
            "in tokenwire_sessions_total too); capacity closes are counted here, not in tokenwire_errors_total",
            ["reason"], registry=r)
        for reason in REFUSAL_REASONS:
            self.handshakes_refused.labels(reason=reason)
        self.retry_active = Gauge("tokenwire_quic_retry_active",
                                  "1 while new clients must validate their address (many handshakes in progress)",
                                  registry=r)
        # One total, not split by a label: dashboards sum it by scheme; new answers are this minus
        # tokenwire_resumes_total and tokenwire_attaches_total, which count only requests that started too
        self.requests = Counter(
            "tokenwire_requests_total",
            "Requests whose answer started streaming, by the scheme serving it: new answers, resumes and attaches "
            "alike (new answers = this - tokenwire_resumes_total - tokenwire_attaches_total); refused requests are "
            "not counted", ["scheme"], registry=r)
        for scheme in SCHEMES:
            self.requests.labels(scheme=scheme)
        self.requests_ended = Counter(
            "tokenwire_requests_ended",
            "Requests by how they ended: completed (the client confirmed the whole answer), cancelled (by the "
            "client, or its protocol violation), lost (the connection ended first; the client may resume), failed "
            "(ended by an ERROR after its answer started), refused (ended before any answer started: an ERROR, a "
            "close, or the client before its request was answered)", ["outcome"], registry=r)
        for outcome in REQUEST_OUTCOMES:
            self.requests_ended.labels(outcome=outcome)
        self.resumes = Counter("tokenwire_resumes_total",
                               "Requests by id other than attaches, once their answer started: resumes after the "
                               "tokens a client holds (reconnects), attaches to an upstream's answer", registry=r)
        self.attaches = Counter("tokenwire_attaches_total",
                                "Requests by id for an ingest answer from its start, once their answer started "
                                "(conn.attach, chat --attach; a client reconnecting before its first token counts "
                                "here too)", registry=r)
        self.ingest_opened = Counter("tokenwire_ingest_answers_opened_total",
                                     "Answers opened by applications on the ingest socket", registry=r)
        self.ingest_finished = Counter("tokenwire_ingest_answers_finished_total",
                                       "Ingest answers finished (by the application, or cut at max_tokens)",
                                       registry=r)
        self.ingest_failed = Counter(
            "tokenwire_ingest_answers_failed_total",
            "Ingest answers failed: app_failed (its fail op), app_gone (its connection ended), stalled "
            "(ingest.stall_timeout_s), drain (the daemon stopped), cancelled (by its last client), orphaned (no "
            "client for limits.orphan_timeout_s)", ["reason"], registry=r)
        for reason in FAILED_OUTCOMES:  # every series from the start, at 0 (cancelled and orphaned were missing)
            self.ingest_failed.labels(reason=reason)
        # opens the daemon turned down: they were in no metric, only in the application's reply
        self.ingest_opens_refused = Counter(
            "tokenwire_ingest_opens_refused_total",
            "Ingest opens refused, once each: busy (limits.max_live_answers), memory (limits.transcript_memory_mb), "
            "principal (one no client could attach as), max_open (ingest.max_open on its connection), draining (the "
            "daemon is stopping)", ["reason"], registry=r)
        for reason in OPEN_REFUSAL_REASONS:
            self.ingest_opens_refused.labels(reason=reason)
        # pushes the daemon turned down (the opens' metric's twin): an application retrying into a full
        # transcript memory showed only in its replies and one log line per answer
        self.ingest_pushes_refused = Counter(
            "tokenwire_ingest_pushes_refused_total",
            "Ingest pushes refused by the daemon, once each: memory (limits.transcript_memory_mb); nothing of such "
            "a push is added and its answer stays open", ["reason"], registry=r)
        for reason in PUSH_REFUSAL_REASONS:
            self.ingest_pushes_refused.labels(reason=reason)
        self.requests_active = Gauge("tokenwire_requests_active", "Answers being generated", registry=r)
        self.tokens = Counter("tokenwire_tokens_total", "Tokens generated by upstreams and pushed by applications "
                              "on the ingest socket", registry=r)
        self.packets = Counter("tokenwire_token_packets_total", "Token datagrams sent", registry=r)
        self.redundant_bytes = Counter(
            "tokenwire_redundant_bytes_total", "Token bytes sent again inside later packets", registry=r
        )
        # (not a loss count: most come from a loss-free link's idle moments, the operator probe's surprise)
        self.repairs = Counter(
            "tokenwire_repairs_total",
            "Token packets that carried no new token, only repeats of unacknowledged ones (sent when a packet was "
            "reported lost, when no ack came in time, or alongside other frames while no new token was ready: they "
            "rise on a loss-free link too), plus clients' REPAIR requests answered with a resend", registry=r)
        self.repeats_trimmed = Counter(
            "tokenwire_repeats_trimmed_total",
            "Token packets whose repeats were cut to half the congestion window while the client's acks were "
            "silent (typically an uplink outage)",
            registry=r,
        )
        # (how often the congestion cap acts: Chatterbox's redundancy backing off on a queueing or CE-marking path)
        self.repeats_capped = Counter(
            "tokenwire_repeats_capped_total",
            "Token packets whose repeats were cut to the two oldest unacknowledged tokens because the path was "
            "congested (its round trip well above its minimum, or CE marks)",
            registry=r,
        )
        self.acks = Counter("tokenwire_acks_total", "Client ack datagrams received", registry=r)
        # a phone's NAT rebinding or its move from Wi-Fi to cellular: QUIC migrates the connection, and nothing
        # showed an operator that it happened (ECN is validated afresh on the new path)
        self.path_changes = Counter("tokenwire_path_changes_total", "Times a chat client's connection moved to "
                                    "another address or port (QUIC connection migration)", registry=r)
        # Chatterbox's drain of a queue that stands under the congestion test's threshold (chatterbox.STANDING_QUEUE_S):
        # frequent drains mean chats keep meeting a standing queue they cannot read as congestion
        self.path_drains = Counter(
            "tokenwire_path_drains_total", "Times a chat connection drained a queue standing under the congestion "
            "test's threshold (0.5 s without repeats, tokens sharing packets; at most once per 10 s)", registry=r)
        # how late the event loop runs (daemon/loop_lag.py): every connection's packets wait as long
        self.loop_lag = Histogram(
            "tokenwire_event_loop_lag_seconds", "How late the daemon's event loop ran a timer due every 0.1 s: time "
            "it was held by other work (a long garbage collection, a burst of CPU work, a host short of CPU), "
            "during which every connection's packets waited", registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        self.client_stall = Histogram(
            "tokenwire_client_stall_ratio",
            "Stall ratio reported by clients",
            buckets=(0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
            registry=r,
        )
        self.client_stalls_long = Counter(
            "tokenwire_client_long_stalls_total", "Answers whose longest stall exceeded 200 ms", registry=r
        )
        self.client_ttft = Histogram(
            "tokenwire_client_ttft_seconds",
            "Time to first token reported by clients",
            buckets=(0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
            registry=r,
        )
        self.errors = Counter("tokenwire_errors_total", "Errors sent to clients (ERROR frames and connection "
                              "closes), by code in hex (0x105: UNAUTHORIZED); quic: and a hex code: a QUIC transport "
                              "error the connection was closed with for the client's packets (quic:0x4: "
                              "STREAM_LIMIT_ERROR, a stream past the request limit)", ["code"], registry=r)
        for code in (*ERROR_CODES_SENT, *QUIC_ERROR_CODES_SENT):
            self.errors.labels(code=code)
        self.transcript_bytes = Gauge("tokenwire_transcript_bytes", "Memory held by transcripts", registry=r)
        # apart: an eviction (memory) can end a slow client's request, an expiry (retention) is routine; one counter
        # had both, so memory pressure could not be told from the daily churn
        self.evicted = Counter("tokenwire_transcripts_evicted_total",
                               "Finished transcripts dropped early, over limits.transcript_memory_mb", registry=r)
        self.expired = Counter("tokenwire_transcripts_expired_total",
                               "Finished transcripts dropped after limits.transcript_retain_s", registry=r)
        self.orphans_cancelled = Counter(
            "tokenwire_orphans_cancelled_total",
            "Answers with no client attached cancelled, by reason: timeout (after limits.orphan_timeout_s), busy "
            "(early, to make room for a new answer at limits.max_live_answers)", ["reason"], registry=r)
        for reason in ORPHAN_CANCEL_REASONS:
            self.orphans_cancelled.labels(reason=reason)
        # requests_ended's refused outcome has no reason, and errors_total 0x106 mixes this with every other limit
        self.client_answers_refused = Counter(
            "tokenwire_client_answers_refused_total",
            "Requests refused (LIMIT_EXCEEDED) because their client had limits.max_live_answers_per_client answers "
            "being generated", registry=r)
        # per failed generation, once: tokenwire_errors_total counts per ERROR delivered (resumes again, none unheard)
        self.upstream_failures = Counter(
            "tokenwire_upstream_failures_total",
            "Answers whose generation failed, once each, by upstream and reason: timeout (UPSTREAM_TIMEOUT), error "
            "(UPSTREAM_ERROR: an error the upstream reported, unreachable, or its bug), refused (another code: the "
            "upstream refused the request after it started)", ["upstream", "reason"], registry=r)
        # the reload's outcome and the served certificate's end, in metrics: they were in STATUS and the log only,
        # where no alert rule sees them
        self.config_reload_ok = Gauge(
            "tokenwire_config_reload_ok",
            "1 after the start or a reload that applied everything; 0 after a reload refused (a bad file), failed "
            "part-way, or whose TLS files were refused", registry=r)
        self.config_reload_ok.set(1)  # (a daemon exists once its configuration loaded)
        self.restart_pending = Gauge(
            "tokenwire_restart_pending",
            "1 while the configuration file has changes that only a restart applies (STATUS names the keys)",
            registry=r)
        self.tls_cert_expiry = Gauge(
            "tokenwire_tls_cert_expiry_seconds",
            "The served certificate's notAfter, as a Unix timestamp (set at start and at each reload)", registry=r)
        # the metrics port's malformed requests (serve_metrics): a flood of them wrote a warning line each; its log
        # line said they were counted, and only its summary line counted them
        self.malformed_http = _MalformedLog(Counter(
            "tokenwire_metrics_malformed_requests_total",
            "Requests on the metrics port that aiohttp could not parse (a port scan, a request without Host)",
            registry=r))
        r.register(_DatagramDrops())
        r.register(_StatelessResets())

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def served_certificate(self, cert: Any) -> None:
        """``cert`` (a cryptography ``x509.Certificate``; None: none served yet) is the one handed to clients now."""
        if cert is not None:
            self.tls_cert_expiry.set(cert.not_valid_after_utc.timestamp())

    def flush_logs(self, now: float, *, final: bool = False) -> None:
        """The line summing up the metrics port's malformed requests held back (``now``: ``time.monotonic()``),
        once the last line about them is REFUSALS_LOG_S old; for the daemon's once-a-second housekeeping, and
        ``final`` (at once) for its stop."""
        self.malformed_http.flush(now, final=final)


class _MalformedLog(RefusalLog):
    """Malformed HTTP requests on the metrics port, as the QUIC ports' refusals: the first is a warning, those
    within REFUSALS_LOG_S of the last line are counted, then summed up in one line with the last one's reason."""

    def __init__(self, total: Counter) -> None:
        super().__init__(log, self._summary)
        self.last = ""  # the last one counted: "from <peer>: <aiohttp's reason>"
        self.total = total  # every one, in tokenwire_metrics_malformed_requests_total

    def _summary(self, n: int, seconds: float) -> str:
        return f"metrics: {n} more malformed HTTP requests in the last {seconds:.0f} s (the last: {self.last})"


class _DatagramDrops:
    """tokenwire_datagrams_dropped_total, read at each scrape from the QUIC servers' process-wide table (transport
    keeps plain integers: one increment on a dropped datagram, nothing on a connection's)."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "tokenwire_datagrams_dropped",
            "UDP datagrams on the QUIC ports dropped before any connection saw them, by reason: malformed (no QUIC "
            "header), unknown_connection (no connection has its ID and it cannot open one), not_accepting (the "
            "port is not serving yet)", labels=["reason"])
        for reason in DROP_REASONS:
            family.add_metric([reason], datagrams_dropped[reason])
        yield family


class _StatelessResets:
    """tokenwire_stateless_resets_sent_total, read at each scrape from the QUIC servers' process-wide count
    (transport.quic_io.stateless_resets, as the drops above)."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "tokenwire_stateless_resets_sent",
            "QUIC Stateless Resets sent (RFC 9000 10.3): answers to a short-header packet of a connection no QUIC "
            "port of this process knows (a client of the process before a restart), rate-limited")
        family.add_metric([], stateless_resets["sent"])
        yield family


class _HttpLog(logging.LoggerAdapter):
    """The metrics server's logger: a malformed request is one warning line with aiohttp's reason, and those that
    follow within REFUSALS_LOG_S are counted into ``refusals``' summary line.

    aiohttp logs each one (a port scan, a scraper's HTTP/1.1 request without ``Host``) at ERROR with a
    ten-line traceback; those are the client's mistakes, not the daemon's. A line each still let a flood of 100
    requests write 100 lines. Other exceptions (the daemon's bugs) keep their traceback, each.
    """

    def __init__(self, logger: logging.Logger, refusals: _MalformedLog) -> None:
        super().__init__(logger, {})
        self.refusals = refusals

    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, HttpProcessingError):
            self._malformed(msg, args, exc)
        else:
            self.logger.exception(msg, *args, exc_info=exc_info, **kwargs)

    def debug(self, msg: object, *args: Any, **kwargs: Any) -> None:
        """aiohttp logs a connection's first request with no HTTP method (a TLS ClientHello, an SSH banner,
        junk: what a port scan sends) at DEBUG instead, where the counter never saw it."""
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            self._malformed(msg, args, exc)
        else:
            self.logger.debug(msg, *args, **kwargs)

    def _malformed(self, msg: object, args: tuple[Any, ...], exc: HttpProcessingError) -> None:
        self.refusals.total.inc()
        what = str(msg) % args if args else str(msg)  # aiohttp's "Error handling request from <peer>"
        reason = " ".join(str(exc.message or exc).split()).rstrip(".")
        if self.refusals.hold(time.monotonic()):  # set after hold(): a summary hold() writes is of earlier ones
            self.refusals.last = f"{what.removeprefix('Error handling request ')}: {reason}"
        else:
            self.logger.warning("metrics: %s: %s; more malformed requests are counted and logged at most every "
                                "%g s (each in tokenwire_metrics_malformed_requests_total)", what, reason,
                                REFUSALS_LOG_S)


# A scraper's connection must complete a request within this, and at most this many are open at once: half-sent
# requests were held for ever (300 of them: 300 file descriptors, the daemon's fd limit within anyone's reach of
# the port). A served connection is then kept alive between scrapes for KEEPALIVE_S (aiohttp's default: an hour).
REQUEST_DEADLINE_S = 10.0
MAX_CONNECTIONS = 64
KEEPALIVE_S = 75.0
# At a stop, how long aiohttp waits for a scrape still being served: for its handler, then (cut) for its task, so
# up to twice this (METRICS_CLOSE_MAX_S). aiohttp's default, 60 s, let a scraper that stopped reading its answer (a
# stalled Prometheus, a partitioned network: the body never leaves the socket) hold the stop 120 s past the drain,
# beyond what STOPPING=1 asked systemd for (SIGKILL). Room for a scrape's wait on the KV store's usage (2 s).
METRICS_CLOSE_S = 3.0
METRICS_CLOSE_MAX_S = 2 * METRICS_CLOSE_S


class _Guard:
    """Bounds the metrics server's connections (see REQUEST_DEADLINE_S) by wrapping the server's own connection
    hooks. Over MAX_CONNECTIONS the oldest connection that has not completed a request goes, or, when every
    one has, the one idle longest, never the newcomer: idle connections reopened every few seconds would
    otherwise keep a scraper and /healthz out for good."""

    def __init__(self, server: web.Server) -> None:
        self.server = server
        self.waiting: dict[Any, asyncio.Transport] = {}  # aiohttp handler -> transport, oldest first
        self.served_at: dict[Any, tuple[float, asyncio.Transport]] = {}  # handler -> (its last answer, transport)
        self._made, self._lost = server.connection_made, server.connection_lost
        self._loop = asyncio.get_running_loop()
        server.connection_made = self._connection_made  # type: ignore[method-assign]
        server.connection_lost = self._connection_lost  # type: ignore[method-assign]

    def served(self, handler: Any) -> None:
        """A request was answered on this connection (any path, a 404 too): keep-alive governs it now."""
        transport = self.waiting.pop(handler, None) or self.served_at.get(handler, (0.0, None))[1]
        if transport is not None:
            self.served_at[handler] = (self._loop.time(), transport)

    def _connection_made(self, handler: Any, transport: asyncio.Transport) -> None:
        self._made(handler, transport)
        self.waiting[handler] = transport
        if len(self.server.connections) > MAX_CONNECTIONS:
            if len(self.waiting) > 1:
                victim = self.waiting.pop(next(iter(self.waiting)))
            elif self.served_at:
                idlest = min(self.served_at, key=lambda h: self.served_at[h][0])
                victim = self.served_at.pop(idlest)[1]
            else:  # (connections neither waiting nor served are on their way out)
                victim = self.waiting.pop(handler)
            # closed on the next turn: aiohttp has not started the handler's task yet, and a transport closed
            # inside connection_made failed it with an ERROR and a traceback
            self._loop.call_soon(victim.close)
        self._loop.call_later(REQUEST_DEADLINE_S, self._expire, handler)

    def _expire(self, handler: Any) -> None:
        transport = self.waiting.pop(handler, None)
        if transport is not None:
            transport.close()  # nothing served within the deadline: a stalled or half-sent request

    def _connection_lost(self, handler: Any, exc: BaseException | None = None) -> None:
        self.waiting.pop(handler, None)
        self.served_at.pop(handler, None)
        self._lost(handler, exc)


async def serve_metrics(metrics: Metrics, host: str, port: int, healthy: Callable[[], bool], *,
                        why_not: Callable[[], str] = lambda: "draining") -> web.AppRunner:
    """``/metrics`` and ``/healthz`` on ``host``:``port``. ``/healthz`` is 200 while ``healthy()``, else 503 with
    ``why_not()`` ("starting", "draining") as its body."""
    guard: list[_Guard] = []

    @web.middleware
    async def mark_served(request: web.Request, handler: Any) -> web.StreamResponse:
        if guard:
            guard[0].served(request.protocol)
        return await handler(request)

    async def handle_metrics(request: web.Request) -> web.Response:
        # on a worker thread: a collector may wait on I/O (the KV store's usage is a round trip to Redis), and
        # the event loop carries every token stream
        body = await asyncio.to_thread(metrics.exposition)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def handle_health(request: web.Request) -> web.Response:
        ok = healthy()
        return web.Response(status=200 if ok else 503, text="ok\n" if ok else f"{why_not()}\n")

    app = web.Application(middlewares=[mark_served])
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/healthz", handle_health)
    runner = web.AppRunner(app, access_log=None, logger=_HttpLog(log, metrics.malformed_http),
                           keepalive_timeout=KEEPALIVE_S, shutdown_timeout=METRICS_CLOSE_S)
    await runner.setup()
    assert runner.server is not None
    guard.append(_Guard(runner.server))
    try:
        # the IPv6 wildcard dual-stack, as the QUIC listeners are: asyncio's create_server sets IPV6_V6ONLY, so
        # "[::]:9464" answered no IPv4 scraper (other hosts: aiohttp's own binding, every address a name has)
        site = (web.SockSite(runner, _dual_stack_listener(port)) if host == "::" else
                web.TCPSite(runner, host, port))
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def _dual_stack_listener(port: int) -> socket.socket:
    """A listening TCP socket on every IPv6 and IPv4 address."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
