"""The daemon's ``[marking]`` section: per-packet ECN marking of token packets, and its metrics.

Kept out of ``config.py``/``service.py`` (which only call :func:`parse_marking` and
:class:`MarkingService`) so the ECN path stays one module::

    [marking]
    policy = "swiftqueue"        # "" (off: plain UDP socket) | classic | l4s | swiftqueue
    model = ""                   # ONNX latency model; "" = the one shipped with tokenwire.predictor
    margin_ms = 1.0              # swiftqueue: ECT(1) when pred_L + margin < pred_C ...
    hysteresis_ms = 3.0          # ... leaving the current queue only when the gain passes this band
    probe_interval_s = 0.0       # swiftqueue: at most one packet per interval into the unused queue (0: off;
                                 # the shipped model predicts both queues from the ack window, it needs none)
    refuge_only = true           # swiftqueue: leave L only for a C queue whose last samples were at the floor
    classic_codepoint = "ect0"   # what classic packets carry: ect0 | not-ect

With a policy the daemon's QUIC sockets are the ECN-capable transport (``sendmsg`` + ``IP_TOS`` per
packet, ``IP_RECVTOS``); policies that send ECT(1) (``l4s``, ``swiftqueue``) run the scalable ``prague``
congestion controller, which is chosen automatically (an explicit other ``server.congestion`` is an error).
``classic`` with ECT(0) runs the classic ECN response (``reno-ecn``, or ``cubic-ecn`` for ``server.congestion =
"cubic"``: CE halves the window like a loss, once per RTT); ``prague`` is refused there. A connection whose client
never reports ECN counts stops marking (ECN validation, ``transport.marking.EcnValidation``).
``swiftqueue`` loads the latency model once at start; a missing or corrupt model logs a warning and the
daemon marks like ``l4s`` instead (it keeps serving). A model that loads but then raises on the packet path
does the same at run time: one warning, every connection (open or new) marks like ``l4s`` until restart,
``tokenwire_marking_policy`` moves from ``swiftqueue`` to ``l4s`` and ``tokenwire_marking_model_errors_total``
counts the errors. A SIGHUP reload loads the model as configured again (off the event loop) and warns when
it would not load, or when it differs from the running one (replaced in place, or loadable now where it was not
at start): the running daemon keeps what it loaded, and a restart takes up the new file.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config_values import ConfigError, Section

if TYPE_CHECKING:
    from tokenwire.transport.marking import MarkingPolicy

    from .telemetry import Metrics

log = logging.getLogger("tokenwire.daemon.marking")

POLICIES = ("classic", "l4s", "swiftqueue")
ECT1_POLICIES = ("l4s", "swiftqueue")
CODEPOINT_LABELS = ("not-ect", "ect1", "ect0", "ce")  # index = ECN codepoint value
KEYS = ("policy", "model", "margin_ms", "hysteresis_ms", "probe_interval_s", "refuge_only", "classic_codepoint")


@dataclass(frozen=True)
class MarkingConfig:
    policy: str | None = None  # None: marking off, the plain UDP socket
    model: Path | None = None
    margin_ms: float = 1.0
    hysteresis_ms: float = 3.0
    probe_interval_s: float = 0.0
    refuge_only: bool = True
    classic_codepoint: str = "ect0"

    @property
    def enabled(self) -> bool:
        return self.policy is not None

    @property
    def marks_ect1(self) -> bool:
        return self.policy in ECT1_POLICIES

    @property
    def ect(self) -> str | None:
        """The ECN-capable codepoint the policy sends: ``"ect1"``, ``"ect0"`` (classic), or None (Not-ECT)."""
        if self.marks_ect1:
            return "ect1"
        return "ect0" if self.policy == "classic" and self.classic_codepoint == "ect0" else None


def parse_marking(table: Any, base: Path | None) -> MarkingConfig:
    """Validate ``[marking]`` (relative paths: to ``base``, the config file's folder)."""
    s = Section("marking", table, KEYS)
    policy = s.str("policy", "") or None
    if policy is not None and policy not in POLICIES:
        raise ConfigError(f"marking.policy: expected one of {', '.join(POLICIES)} (or \"\" for off), got {policy!r}")
    # existence is checked when the daemon starts: a missing or corrupt model is logged and falls back to l4s
    model = s.path("model", base, must_exist=False)
    if model is not None and policy != "swiftqueue":
        raise ConfigError("marking.model: only the swiftqueue policy uses a model (set marking.policy)")
    return MarkingConfig(
        policy=policy,
        model=model,
        margin_ms=s.num("margin_ms", 1.0, 0.0, 1000.0),
        hysteresis_ms=s.num("hysteresis_ms", 3.0, 0.0, 1000.0),
        probe_interval_s=s.num("probe_interval_s", 0.0, 0.0, 60.0),
        refuge_only=s.bool("refuge_only", True),
        classic_codepoint=s.str("classic_codepoint", "ect0", ("ect0", "not-ect")) or "ect0",
    )


def effective_congestion(marking: MarkingConfig, explicit: str | None) -> str | None:
    """The congestion controller the marking policy needs, or None to keep ``server.congestion``."""
    what = f"marking.policy = {marking.policy!r}"
    if marking.ect == "ect0":
        what += " with classic_codepoint = 'ect0'"
    return ecn_congestion(marking.ect, explicit, "server.congestion", what, ConfigError)


def ecn_congestion(ect: str | None, explicit: str | None, setting: str, marking: str,
                   error_cls: type[Exception]) -> str | None:
    """The congestion controller a sender of ``ect`` (``"ect1"``, ``"ect0"``, None for Not-ECT) needs, or None to
    keep ``explicit``; ``error_cls`` naming ``setting`` and the ``marking`` that asks for it when ``explicit`` cannot
    carry such packets.

    ECT(1) needs ``prague`` (:func:`ect1_congestion`). ECT(0) needs the classic response to CE, a halving like a
    loss's at most once per RTT (RFC 3168 §6.1.2): aioquic's Reno and CUBIC read no ECN and ignored every mark, so
    they become ``reno-ecn`` / ``cubic-ecn`` (``transport.classic_ecn_cc``), and ``prague`` is refused: its
    scalable response answers a classic AQM's marks with cuts of a few percent. The QUIC listeners ([marking]) and
    the KV channel ([kv]) both decide through here.
    """
    if ect == "ect1":
        return ect1_congestion(True, explicit, setting, marking, error_cls)
    if ect != "ect0":
        return None
    from tokenwire.transport.classic_ecn_cc import CLASSIC_ECN

    chosen = CLASSIC_ECN.get(explicit or "reno")
    if chosen is None:
        raise error_cls(f"{setting}: {explicit!r} cannot carry ECT(0) packets ({marking}): a classic ECN sender must "
                        f"halve its window on CE like on a loss (RFC 3168); use \"reno\" or \"cubic\", or leave it "
                        "unset")
    return chosen


def ect1_congestion(marks_ect1: bool, explicit: str | None, setting: str, marking: str,
                    error_cls: type[Exception]) -> str | None:
    """``"prague"`` for a sender that marks ECT(1), None for one that does not; an ``explicit`` other
    controller for an ECT(1) sender is ``error_cls`` naming ``setting`` and the ``marking`` that asks for it.

    ECT(1) packets land in the L queue, whose AQM marks CE early and often: only a scalable response
    (``prague``) keeps such a flow from collapsing its own window (RFC 9331 §4.3). The QUIC listeners
    ([marking]) and the KV channel ([kv]) both decide through here.
    """
    if not marks_ect1:
        return None
    if explicit is not None and explicit != "prague":
        raise error_cls(f"{setting}: {explicit!r} cannot carry ECT(1) packets ({marking}); use \"prague\" or "
                        "leave it unset")
    return "prague"


class MarkingService:
    """Builds each connection's policy and exports the ECN counters as Prometheus metrics.

    Codepoint counters are read from the sockets when Prometheus scrapes (a collector, not a timer), so a
    scrape always sees every packet sent so far.
    """

    def __init__(self, cfg: MarkingConfig, metrics: Metrics) -> None:
        from prometheus_client import Counter, Gauge

        self.cfg = cfg
        self.effective_policy = cfg.policy
        self._factory: Callable[[], MarkingPolicy] | None = None
        self.transports: list[Any] = []
        # the ECN families only with [marking] (as the README says): without it the sockets count nothing, and
        # all-zero codepoint counters beside tokenwire_token_packets_total read as "no datagrams sent"
        r = metrics.registry if cfg.enabled else None
        if r is not None:
            r.register(_EcnCollector(self))
        self.ce = Counter("tokenwire_ecn_ce_total", "Sent packets that clients reported as CE-marked",
                          registry=r)
        self.policy_info = Gauge("tokenwire_marking_policy", "The marking policy in use (1 for the active one)",
                                 ["policy"], registry=r)
        # every policy's series from the start, at 0 (docs/metrics.md): only the active one's was exported, so a
        # query for another policy (swiftqueue on a daemon that fell back to l4s at start) found no series, not a 0
        self._show_policy(None)
        self.model_errors = Counter("tokenwire_marking_model_errors", "Exceptions the swiftqueue latency model "
                                    "raised on the packet path (the daemon then marks like l4s)", registry=r)
        self.unvalidated = Counter("tokenwire_ecn_validation_failed", "Times connections stopped marking (Not-ECT) "
                                   "because 10 of their ECT packets carrying data were acknowledged with no new "
                                   "arrival of the codepoint they carried, or CE, in the client's counts (a path "
                                   "re-marking ECT(1) to ECT(0) too); a connection may count more than once",
                                   registry=r)
        self._swiftqueue: weakref.WeakSet[Any] = weakref.WeakSet()  # the open connections' swiftqueue policies
        # what start() made of the swiftqueue model, for the reload's comparison with the file on disk (a model
        # replaced in place and a SIGHUP said nothing while the daemon kept the old model, or kept l4s):
        # None before start() (or without swiftqueue); else whether it loaded and the sha256 of its bytes
        self.model_loaded: bool | None = None
        self.model_path = ""
        self.model_digest = ""

    # -- policies ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Load what the policy needs (the latency model), once; fall back to ``l4s`` if it cannot load."""
        from tokenwire.transport.ecn_socket import ECT0, NOT_ECT
        from tokenwire.transport.marking import PREDICT_INTERVAL_S, ClassicPolicy, L4SPolicy, SwiftQueuePolicy

        cfg = self.cfg
        classic = ECT0 if cfg.classic_codepoint == "ect0" else NOT_ECT
        if cfg.policy == "classic":
            self._factory = lambda: ClassicPolicy(ect0=classic == ECT0)
        elif cfg.policy == "l4s":
            self._factory = L4SPolicy
        elif cfg.policy == "swiftqueue":
            first = _first_forecaster(cfg.model)
            self.model_loaded = first is not None
            if first is None:
                self.effective_policy = "l4s"
                self._factory = L4SPolicy
            else:
                self.model_path, self.model_digest = first.path, first.digest
                loader = first.fresh

                def swiftqueue() -> MarkingPolicy:
                    pol = SwiftQueuePolicy(
                        loader(), margin_ms=cfg.margin_ms, hysteresis_ms=cfg.hysteresis_ms,
                        probe_interval_s=cfg.probe_interval_s, refuge_only=cfg.refuge_only, classic=classic,
                        on_failure=self.forecaster_failed,
                        predict_interval_s=PREDICT_INTERVAL_S,  # not an inference per token packet on the event loop
                    )  # fmt: skip
                    self._swiftqueue.add(pol)
                    return pol

                self._factory = swiftqueue
        if self.effective_policy:
            self._show_policy(self.effective_policy)
            log.info("ECN marking: policy %s%s", self.effective_policy,
                     "" if self.effective_policy == cfg.policy else f" (configured {cfg.policy}; model unavailable)")

    def forecaster_failed(self, exc: BaseException) -> None:
        """A connection's swiftqueue policy met an exception from the model and now marks like ``l4s``.

        The model is one inference session shared by every connection, so the whole daemon falls back until
        restart: one warning, the policy gauge says ``l4s``, the open connections' policies stop asking the
        model, new connections get :class:`L4SPolicy`.
        """
        from tokenwire.transport.marking import L4SPolicy

        self.model_errors.inc()
        if self.effective_policy != "swiftqueue":
            return
        why = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
        log.warning("marking.policy = swiftqueue but the latency model failed on the packet path (%s); "
                    "falling back to the l4s policy until restart", why)
        self.effective_policy = "l4s"
        self._factory = L4SPolicy
        self._show_policy("l4s")
        for pol in list(self._swiftqueue):
            pol.fall_back(f"the latency model failed on another connection ({why})")

    def _show_policy(self, active: str | None) -> None:
        """``tokenwire_marking_policy``: 1 for ``active``, 0 for every other policy (all of them: None).

        The policy only changes at start and on the model's failure: [marking] is one of the sections a SIGHUP
        reload does not apply (config.RESTART_SECTIONS), so the reload leaves this as it is."""
        for policy in POLICIES:
            self.policy_info.labels(policy=policy).set(int(policy == active))

    def new_policy(self) -> MarkingPolicy | None:
        """A fresh policy for one connection (its forecaster keeps that connection's history)."""
        return self._factory() if self._factory is not None else None

    def model_on_disk(self, model: Path | None) -> tuple[str | None, str | None]:
        """The reload's check of the swiftqueue model as configured now (``model``, None: the shipped one): (why it
        would not load or None, what differs from the model this daemon runs or None). A full load and trial
        inference (:func:`model_problem`'s): run it off the event loop.

        Without the second part, a model replaced in place (or a corrupt one fixed) and a SIGHUP said nothing, and
        the daemon went on with the model it loaded at start, or with l4s, as if it used the file on disk.
        """
        from tokenwire.predictor.runtime import ModelError, load_forecaster, unfinished_run

        try:
            now = load_forecaster(str(model) if model else None)
        except ModelError as exc:
            return str(exc), None
        change = self._model_change(now.path, now.digest)
        note = unfinished_run(now)
        if change is not None and note is not None:  # what a restart would take up (the running one: start said it)
            change += f"; it is {note}"
        return None, change

    def _model_change(self, path: str, digest: str) -> str | None:
        """What differs between the model that loads now from ``path`` (sha256 ``digest``) and the one start()
        loaded; None when they are the same bytes, or when start() loaded none for swiftqueue (not started, or
        another policy: a policy change is one of the [marking] changes the reload already says need a restart)."""
        if self.cfg.policy != "swiftqueue" or self.model_loaded is None:
            return None
        if not self.model_loaded:
            return (f"{path} loads now but did not at start, so the daemon marks like l4s (the fallback); restart "
                    "to use the swiftqueue policy with it")
        if digest == self.model_digest:
            return None
        if path != self.model_path:  # marking.model names another file now
            return (f"{path} is not the model the daemon loaded at start ({self.model_path}) and it keeps that one: "
                    "restart to use this one")
        return (f"{path} changed since start (sha256 {digest[:12]} now, {self.model_digest[:12]} loaded at start); "
                "the daemon keeps the model it loaded then: restart to use this one")

    # -- metrics -------------------------------------------------------------------------------------------
    def add_transport(self, transport: Any) -> None:
        if hasattr(transport, "sent_by_codepoint"):
            self.transports.append(transport)

    def totals(self) -> tuple[list[int], list[int]]:
        """Datagrams sent and received per codepoint over every ECN socket of the daemon."""
        sent, recv = [0, 0, 0, 0], [0, 0, 0, 0]
        for t in self.transports:
            for cp in range(4):
                sent[cp] += t.sent_by_codepoint[cp]
                recv[cp] += t.received_by_codepoint[cp]
        return sent, recv

    def add_ce(self, n: int) -> None:
        if n > 0:
            self.ce.inc(n)

    def add_validation_failures(self, n: int) -> None:
        """Count connections whose ECN validation failed (a session's ``ecn.failures`` since the last flush)."""
        if n > 0:
            self.unvalidated.inc(n)


class _EcnCollector:
    """Prometheus collector: per-codepoint datagram counters and the L share, read at scrape time."""

    def __init__(self, service: MarkingService) -> None:
        self.service = service

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        sent, recv = self.service.totals()
        for name, doc, counts in (
            ("tokenwire_ecn_packets", "UDP datagrams sent, by ECN codepoint", sent),
            ("tokenwire_ecn_received", "UDP datagrams received, by ECN codepoint", recv),
        ):
            fam = CounterMetricFamily(name, doc, labels=["codepoint"])
            for cp, label in enumerate(CODEPOINT_LABELS):
                fam.add_metric([label], counts[cp])
            yield fam
        total = sum(sent)
        yield GaugeMetricFamily("tokenwire_ecn_l_share", "Share of sent datagrams marked ECT(1) (the L queue)",
                                value=sent[1] / total if total else 0.0)


def model_problem(model: Path | None) -> str | None:
    """Why the swiftqueue model ``model`` (None: the shipped one) would not load, in the words the daemon's start
    and ``config check`` use; None when it loads. A full load and trial inference: ~40 ms with onnxruntime already
    imported, ~0.5 s when not (run it off the event loop)."""
    from tokenwire.predictor.runtime import ModelError, load_forecaster

    try:
        load_forecaster(str(model) if model else None)
    except ModelError as exc:
        return str(exc)
    return None


def _first_forecaster(model: Path | None) -> Any | None:
    """The forecaster loaded at start (its ``fresh()`` makes the per-connection ones, sharing its inference
    session; its ``digest`` is that of the bytes loaded), or None (warned)."""
    from tokenwire.predictor.runtime import ModelError, load_forecaster, unfinished_run

    try:
        first = load_forecaster(str(model) if model else None)  # load and validate once, at start
    except ModelError as exc:  # missing file, corrupt model, other inputs
        log.warning("marking.policy = swiftqueue but the latency model cannot be loaded (%s); "
                    "falling back to the l4s policy", exc)
        return None
    log.info("swiftqueue latency model: %s", first.path or "shipped")
    note = unfinished_run(first)
    if note is not None:  # export and eval warn of it; the daemon marked with it in silence
        log.warning("marking.policy = swiftqueue but the latency model %s is %s; marking with it anyway",
                    first.path, note)
    return first
