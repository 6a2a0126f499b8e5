"""``tokenwire testbed swiftqueue``: per-packet L4S marking policies against each other on one DualPI2 path.

One *marked flow* crosses a DualPI2 bottleneck together with cross traffic; the only thing that changes
between runs is the marking policy that picks each of its packets' ECN codepoint (``classic``, ``l4s``,
``swiftqueue``, ``oracle``; :mod:`tokenwire.transport.marking` — the same objects the daemon uses). Per
policy the JSON reports the marked flow's one-way packet latency percentiles, throughput, share of packets
sent to L, CE and drop rates, and the stall ratio when the flow is a Chatterbox token stream.

Two backends run the same policies:

* **virtual** (``--virtual``): :mod:`.vsim` in virtual time — deterministic for a seed, no root, seconds per
  run. The marked flow is a model (:class:`MarkedPacedFlow` / :class:`MarkedBulkFlow`), the cross traffic
  :mod:`.vsim` flows (kernel TCP is modelled as Reno there).
* **namespaces** (default): a real tokenwire QUIC Chatterbox stream with the policy on the ECN socket,
  through the emulator's DualPI2, with cross traffic from :mod:`.traffic`; latencies come from the
  emulator's per-packet log (see :mod:`.swiftqueue_netns`).

Cross-traffic specs (``--cross``, repeatable)::

    tcp:cubic | tcp:bbr | tcp:reno        bulk classic flow (C queue; virtual time: a Reno model, no bbr)
    udp-ect1:RATE                         unresponsive paced UDP marked ECT(1) (L queue)
    onoff-ect1:RATE:ON_MS:OFF_MS          the same, on for ON_MS then silent for OFF_MS, repeating
    scalable[:N]                          N bulk DCTCP/Prague-like flows marked ECT(1)   (virtual only)
    scalable-burst:N:ON_MS:OFF_MS         N such flows started afresh every cycle       (virtual only)
    tcp-onoff:ON_MS:OFF_MS[:DELAY_MS]     a classic bulk flow (Reno model) started afresh every cycle,
                                          the first after DELAY_MS                      (virtual only)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from tokenwire.daemon.cli import repeated
from tokenwire.daemon.config import MAX_ANSWER_TOKENS, Limits
from tokenwire.daemon.run_provenance import RunProvenance
from tokenwire.transport import metrics
from tokenwire.transport.chatterbox import CONGESTED_REPEATS, QUEUE_DELAY_S, QUEUE_DELAY_SHARE, path_queues
from tokenwire.transport.ecn_socket import ECT0, ECT1
from tokenwire.transport.marking import (
    POLICIES,
    REFUGE_MEMORY_S,
    ClassicPolicy,
    L4SPolicy,
    LatencyForecaster,
    LatencySample,
    MarkingPolicy,
    OraclePolicy,
    SwiftQueuePolicy,
)

from .link import Link
from .loss import parse_loss
from .packet import CE, NOT_ECT
from .queue_oracle import estimate_queue_delays
from .queues import DualPI2, Packet, parse_queue
from .trace import generator_bps, trace_from_spec
from .vsim import MAX_VIRTUAL_S, MIN_ONOFF_MS, CbrFlow, Flow, RenoFlow, ScalableFlow, Simulation

log = logging.getLogger("tokenwire.testbed.swiftqueue")

CROSS_KINDS = ("tcp", "udp-ect1", "onoff-ect1", "scalable", "scalable-burst", "tcp-onoff")
VIRTUAL_ONLY = ("scalable", "scalable-burst", "tcp-onoff")
METRIC_KEYS = ("p50_ms", "p95_ms", "p99_ms", "p999_ms", "throughput_mbps", "l_share", "ce_rate", "drop_rate")


DUALQ_NEEDED = ("--queue {queue}: the swiftqueue evaluation needs a DualQ queue, dualpi2[:key=value,...]: its "
                "policies choose per packet between the L and C queues")


class SwiftQueueEvalError(ValueError):
    """A bad evaluation setting (the message names the option)."""


@dataclass(frozen=True)
class CrossSpec:
    kind: str
    rate_bps: float = 0.0
    cc: str = ""
    n: int = 1
    on_s: float = 0.0
    off_s: float = 0.0
    text: str = ""


def _periods_problem(spec: str, *periods: float) -> str | None:
    """Why the ON_MS, OFF_MS (and DELAY_MS) of ``spec``, in seconds, cannot run, or None."""
    on, off, *rest = (p * 1000.0 for p in periods)
    if not all(math.isfinite(p) for p in (on, off, *rest)):
        return f"--cross {spec!r}: ON_MS, OFF_MS and DELAY_MS must be finite numbers"
    if on < MIN_ONOFF_MS or 0 < off < MIN_ONOFF_MS:
        return (f"--cross {spec!r}: ON_MS must be at least {MIN_ONOFF_MS:g} ms, and OFF_MS 0 or at least "
                f"{MIN_ONOFF_MS:g} ms")
    return None


def parse_cross_spec(spec: str) -> CrossSpec:
    """Parse one ``--cross`` spec (module docstring); :class:`SwiftQueueEvalError` names what is wrong."""
    parsed = _parse_cross_spec(spec)
    if parsed.kind in ("tcp-onoff", "scalable-burst"):  # (onoff-ect1's: SwiftQueueConfig.validate, when virtual)
        delay = (parsed.rate_bps,) if parsed.kind == "tcp-onoff" else ()  # (rate_bps: tcp-onoff's first start)
        problem = _periods_problem(spec, parsed.on_s, parsed.off_s, *delay)
        if problem is not None:
            raise SwiftQueueEvalError(problem)
    return parsed


def _parse_cross_spec(spec: str) -> CrossSpec:
    parts = spec.strip().lower().split(":")
    kind, args = parts[0], parts[1:]
    try:
        if kind == "tcp" and len(args) == 1 and args[0] in ("cubic", "bbr", "reno"):
            return CrossSpec("tcp", cc=args[0], text=spec)
        if kind == "udp-ect1" and len(args) == 1 and (bps := generator_bps(args[0])) is not None:
            return CrossSpec("udp-ect1", rate_bps=bps, text=spec)
        if kind == "onoff-ect1" and len(args) == 3 and (bps := generator_bps(args[0])) is not None:
            on, off = float(args[1]) / 1000.0, float(args[2]) / 1000.0
            if on > 0 and off >= 0:
                return CrossSpec("onoff-ect1", rate_bps=bps, on_s=on, off_s=off, text=spec)
        if kind == "scalable" and len(args) <= 1:
            n = int(args[0]) if args else 1
            if n >= 1:
                return CrossSpec("scalable", n=n, text=spec)
        if kind == "tcp-onoff" and len(args) in (2, 3):
            on, off = float(args[0]) / 1000.0, float(args[1]) / 1000.0
            first = float(args[2]) / 1000.0 if len(args) == 3 else 0.0
            if on > 0 and off >= 0 and first >= 0:
                return CrossSpec("tcp-onoff", on_s=on, off_s=off, rate_bps=first, text=spec)
        if kind == "scalable-burst" and len(args) == 3:
            n, on, off = int(args[0]), float(args[1]) / 1000.0, float(args[2]) / 1000.0
            if n >= 1 and on > 0 and off >= 0:
                return CrossSpec("scalable-burst", n=n, on_s=on, off_s=off, text=spec)
    except ValueError:
        pass
    raise SwiftQueueEvalError(
        f"--cross {spec!r}: expected tcp:cubic|bbr|reno, udp-ect1:RATE, onoff-ect1:RATE:ON_MS:OFF_MS, "
        "scalable[:N], scalable-burst:N:ON_MS:OFF_MS or tcp-onoff:ON_MS:OFF_MS[:DELAY_MS] (RATE up to 100gbps)"
    )


@dataclass(frozen=True)
class FlowSpec:
    kind: str  # tokens | rt | bulk
    rate: float = 0.0  # tokens/s or bit/s


def parse_flow_spec(spec: str) -> FlowSpec:
    """``tokens:RATE`` (Chatterbox stream, tokens/s), ``rt:RATE`` (paced 1200-B packets), ``bulk``."""
    kind, _, arg = spec.strip().lower().partition(":")
    if kind == "tokens":
        try:
            rate = float(arg or 50)
        except ValueError:
            rate = -1.0
        if rate > 0:
            return FlowSpec("tokens", rate)
    elif kind == "rt" and (bps := generator_bps(arg)) is not None:
        return FlowSpec("rt", bps)
    elif kind == "bulk" and not arg:
        return FlowSpec("bulk")
    raise SwiftQueueEvalError(f"--flow {spec!r}: expected tokens:RATE (tokens/s), rt:RATE (e.g. rt:2mbps, up to "
                              "100gbps) or bulk")


@dataclass
class SwiftQueueConfig:
    down_trace: str
    up_trace: str | None = None
    delay_ms: float = 20.0
    loss: str = "none"
    up_loss: str = "none"
    queue: str = "dualpi2"
    cross: list[str] = field(default_factory=list)
    policies: list[str] = field(default_factory=lambda: list(POLICIES))
    seconds: float = 30.0
    seed: int = 0
    flow: str = "tokens:50"
    margin_ms: float = 1.0
    hysteresis_ms: float = 3.0
    probe_interval_s: float = 0.0
    refuge_only: bool = True  # swiftqueue: leave L only for a C queue that looks empty (SwiftQueuePolicy)
    model: str | None = None
    warmup_s: float = 1.0
    virtual: bool = False

    def validate(self) -> None:
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown or not self.policies:
            raise SwiftQueueEvalError(f"--policies: unknown {unknown}; choose from {', '.join(POLICIES)}")
        twice = sorted(repeated(self.policies))
        if twice:  # the results are keyed by policy: a second run would overwrite the first
            raise SwiftQueueEvalError(f"--policies: {', '.join(twice)} listed twice")
        if self.seconds <= self.warmup_s:
            raise SwiftQueueEvalError(f"--seconds must be > the {self.warmup_s:g} s warm-up")
        if self.delay_ms < 0:
            raise SwiftQueueEvalError("--delay-ms must be >= 0")
        if min(self.margin_ms, self.hysteresis_ms, self.probe_interval_s) < 0:
            raise SwiftQueueEvalError("--margin-ms, --hysteresis-ms and --probe-interval must be >= 0")
        for spec in self.cross:
            c = parse_cross_spec(spec)
            if c.kind in VIRTUAL_ONLY and not self.virtual:
                raise SwiftQueueEvalError(f"--cross {spec!r} exists only in virtual time (add --virtual)")
            problem = _periods_problem(spec, c.on_s, c.off_s) if c.kind == "onoff-ect1" and self.virtual else None
            if problem is not None:  # (each period is an event: the namespace run's sender sleeps in real time)
                raise SwiftQueueEvalError(problem)
        flow = parse_flow_spec(self.flow)
        if flow.kind != "tokens" and not self.virtual:
            raise SwiftQueueEvalError("--flow: the namespace run streams a real Chatterbox answer (tokens:RATE)")
        tokens = flow.rate * self.seconds
        if flow.kind == "tokens" and not tokens <= MAX_ANSWER_TOKENS:  # (not <=: a NaN too)
            # the namespace endpoint builds the whole answer first (tokens:1e9 grew ~0.8 GB/s) and the virtual run
            # keeps a record per token (~100 MB/s, then a MemoryError); --seconds 1e9 at tokens:50 never ended
            raise SwiftQueueEvalError(f"--flow {self.flow} for --seconds {self.seconds:g} is {tokens:.3g} tokens: at "
                                      f"most {MAX_ANSWER_TOKENS} (the daemon's bound on an answer)")
        if self.virtual and not self.seconds <= MAX_VIRTUAL_S:  # `--flow bulk --seconds 1e5` ran until killed
            raise SwiftQueueEvalError(f"--seconds {self.seconds:g}: a virtual run is at most {MAX_VIRTUAL_S:g} "
                                      "virtual s (the simulator's cap, as `sim` and `predictor collect` have)")
        kind = self.queue.strip().partition(":")[0].strip().lower()
        if kind != "dualpi2":
            # the kind first: "--queue droptail" asked for packets=N, and once given them was refused anyway
            raise SwiftQueueEvalError(DUALQ_NEEDED.format(queue=self.queue))
        try:
            trace_from_spec(self.down_trace)
            if self.up_trace:
                trace_from_spec(self.up_trace)
            queue = parse_queue(self.queue)
            parse_loss(self.loss)
            parse_loss(self.up_loss)
        except ValueError as exc:
            raise SwiftQueueEvalError(str(exc)) from None
        if not isinstance(queue, DualPI2):
            # a single queue has no L queue: the policies' choice changed nothing and "L share" was meaningless
            raise SwiftQueueEvalError(DUALQ_NEEDED.format(queue=self.queue))
        if self.model is not None and "swiftqueue" in self.policies:
            # A model named on purpose that cannot load is a mistake, not a fallback: the run would mark like
            # l4s and report swiftqueue at 0 % against it. (The shipped model's fallback stays, as in the daemon.)
            from tokenwire.predictor.runtime import ModelError, load_forecaster

            try:
                load_forecaster(self.model)
            except ModelError as exc:
                raise SwiftQueueEvalError(f"--model {exc}") from None

    def answer_tokens(self) -> int:
        """Tokens of the namespace run's answer: ``tokens:RATE`` for ``seconds`` (bounded by :meth:`validate`)."""
        return max(1, int(parse_flow_spec(self.flow).rate * self.seconds))


# ------------------------------------------------------------------------------------------- forecasters
class PerQueueEwmaForecaster:
    """Test double / fallback: an EWMA of each queue's own latency samples (SRTT-style, ``alpha``).

    Used when :mod:`tokenwire.predictor.runtime` is not installed in this checkout; the JSON names it.
    """

    name = "ewma-per-queue"

    def __init__(self, alpha: float = 0.25) -> None:
        self.alpha = alpha
        self.est: dict[bool, float | None] = {True: None, False: None}

    def observe(self, sample: LatencySample) -> None:
        prev = self.est[sample.queue_l]
        x = sample.latency_ms
        self.est[sample.queue_l] = x if prev is None else (1 - self.alpha) * prev + self.alpha * x

    def predict(self, now: float) -> tuple[float, float] | None:
        l_ms, c_ms = self.est[True], self.est[False]
        if l_ms is None and c_ms is None:
            return None
        # a queue never tried yet is assumed as good as the other (so the policy keeps its current choice)
        return (l_ms if l_ms is not None else c_ms), (c_ms if c_ms is not None else l_ms)  # type: ignore[return-value]


def load_predictor_forecaster(model: str | None) -> tuple[LatencyForecaster | None, str]:
    """The shipped (or ``model``) forecaster of :mod:`tokenwire.predictor.runtime`, and a description.

    Returns ``(None, why)`` when the model cannot be loaded: the ``swiftqueue`` policy then falls back to
    ``l4s`` with a logged warning, exactly as the daemon does.
    """
    from tokenwire.predictor.runtime import ModelError, load_forecaster

    try:
        fc = load_forecaster(model)
    except ModelError as exc:
        log.warning("swiftqueue: cannot load the latency model (%s); falling back to the l4s policy", exc)
        return None, f"none: {exc}"
    return fc, f"{type(fc).__name__} ({model or 'shipped model'})"


# ------------------------------------------------------------------------------------------- marked flows
@dataclass
class SentRecord:
    """What the sender remembers about each marked packet (the queue it asked for, for CE semantics)."""

    t: float
    ecn: int
    size: int
    runs: tuple[tuple[int, int], ...] = ()  # token streams: the [first, end) token runs the packet carries


# The token packet model: msgpack header + ~8 B per typical short token, in packets of at most 1200 B.
TOKEN_PACKET_HEADER_B = 60
TOKEN_B = 8
TOKEN_PACKET_MAX_B = 1200
TOKENS_PER_PACKET = (TOKEN_PACKET_MAX_B - TOKEN_PACKET_HEADER_B) // TOKEN_B
# The real sender's idle-repair timer (transport.chatterbox.TokenSender's defaults): 1.5 smoothed RTTs (at least
# 10 ms, at first RTT 0.1 s), doubling per repair up to 2 s, reset when the acknowledged floor moves.
REPAIR_INITIAL_RTT_S = 0.1
REPAIR_MIN_S = 0.01
REPAIR_MAX_S = 2.0
REPAIR_MAX_BACKOFF = 8
DRAIN_S = 1.0  # virtual time run after the last generated token, for the packets in flight (and repairs)


class _MarkedMixin:
    """Per-packet codepoints from a policy, latency samples to it, and a per-packet record."""

    policy: MarkingPolicy
    sent_log: dict[int, SentRecord]
    ack_delay: float

    def _sample(self, seq: int, sent: float, ce: bool, now: float) -> None:
        rec = self.sent_log.get(seq)
        if rec is None:
            return
        latency = (now - self.ack_delay - sent) * 1000.0
        self.policy.on_sample(LatencySample(sent, now, latency, rec.size, rec.ecn == ECT1, ce))


class MarkedPacedFlow(_MarkedMixin, Flow):
    """App-limited marked flow: a Chatterbox token stream (``tokens``) or paced 1200-B packets (``rt``).

    Token stream model, as :class:`tokenwire.transport.chatterbox.TokenSender` builds packets (DESIGN.md): one
    packet per generated token, carrying that token and then the *oldest* unacknowledged ones, from the
    acknowledged floor up, at most ``max_redundant`` (the daemon's ``limits.max_redundant_tokens``). The floor
    rides in every packet until it is acknowledged, so a token lost in an outage of any length is delivered by
    the first packet that gets through afterwards. (The model carried the newest ``max_redundant`` tokens
    instead: one outage longer than their span, 0.64 s at 50 tokens/s, lost a token for good and the rest of
    the answer never rendered: 835 of 3000 tokens on TMobile-UMTS-driving.) With tokens unacknowledged and
    nothing sent for an idle-repair timeout (``REPAIR_*``), a repair packet carries the floor's run and, when
    that does not reach the newest token, the newest unacknowledged tokens newest first, as the real one does
    after generation ends with a tail lost. While the path is congested, a packet with a new token repeats at most
    the ``chatterbox.CONGESTED_REPEATS`` oldest unacknowledged tokens (a repair is not capped), judged as
    :meth:`tokenwire.transport.server_session.ServerSession._path_congested` judges it: the smoothed round trip
    (aioquic's rule: the first sample, then 7/8 old + 1/8 new) above the lowest one by more than
    ``QUEUE_DELAY_S`` or ``QUEUE_DELAY_SHARE`` of it, or a CE mark acknowledged within one smoothed round trip on
    a packet not sent ECT(1). (CE on ECT(1), an L queue's routine mark, counts there only while the bytes in flight
    fill ``chatterbox.L4S_CE_WINDOW_SHARE`` of the congestion window; this flow has no window, so never.)
    (The docs/swiftqueue.md tables of session 35 and before were made without the cap.) :attr:`congestion_cap`
    switches it off.
    Not modelled: the congestion window's half-window rule for repeats during ack silence (vsim's paced flow has
    no window; its acks are never lost), the client's ack delay in the round-trip samples, and the daemon's
    handling of a path queueing past ``COALESCE_QUEUE_S`` (new tokens wait up to ``COALESCE_MAX_S`` to share a
    packet after a recent loss, and leave at once without repeats while QUIC has declared none for
    ``QUIET_LOSS_S``). Counted on the 16 documented scenarios at seed 0, that path state held for 9-14 % of the
    token packets on TMobile-UMTS-driving (A, B) and for none on the LTE traces or the fixed path, so only the UMTS
    rows, an overload regime and no measure of the policies, would move.
    """

    congestion_cap = True  # the cap of repeats on a congested path (False: the sender before it, for comparison)

    def __init__(self, policy: MarkingPolicy, spec: FlowSpec, *, max_redundant: int = Limits.max_redundant_tokens,
                 **kw: Any) -> None:
        super().__init__(**kw)
        if max_redundant < 1:
            raise SwiftQueueEvalError(f"max_redundant must be >= 1, got {max_redundant}")
        self.policy = policy
        self.spec = spec
        self.sent_log: dict[int, SentRecord] = {}
        self.max_redundant = max_redundant
        if spec.kind == "tokens":
            self.interval = 1.0 / spec.rate
        else:
            self.interval = 1200 * 8 / spec.rate
        self.gen: list[float] = []
        self.repairs = 0  # repair packets (no new token) sent
        self._ticks = 0  # packets sent on the pacing schedule (repairs come on top)
        self._floor = 0  # every token below is acknowledged
        self._acked_above: set[int] = set()  # acknowledged tokens above the floor (out of order)
        self._srtt = REPAIR_INITIAL_RTT_S
        self._backoff = 0
        self._last_send = -math.inf
        self._repair_timer: int | None = None
        # the congestion cap's view of the path, as aioquic's recovery and ServerSession keep it
        self._rtt_min = math.inf
        self._rtt_smoothed: float | None = None
        self._ce_at = -math.inf  # when an acknowledgement last carried a CE mark on a packet not sent ECT(1)
        self.repeats_capped = 0  # packets whose repeats the cap cut

    def on_start(self, now: float) -> None:
        self._tick(now)

    def _tick(self, now: float) -> None:
        # send times from the tick index (start + k * interval): no float drift over a long run, and repair
        # packets in between do not move the schedule
        if now >= self.stop - 1e-9 or self.sim is None:
            return
        self._ticks += 1
        self._send(now)
        self.sim.call_at(self.start + self._ticks * self.interval, self._tick)

    def path_congested(self, now: float) -> bool:
        """The real session's verdict (``ServerSession._path_congested``) from this flow's acknowledgements."""
        srtt = self._rtt_smoothed
        if srtt is None:
            return False
        if path_queues(srtt, self._rtt_min):
            return True
        return now - self._ce_at < srtt

    def _token_runs(self, repair: bool, *, congested: bool = False) -> tuple[tuple[int, int], ...]:
        """The runs of the packet leaving now (after a new token, if any, was appended to ``gen``); ``congested``:
        the cap applies (:meth:`path_congested`)."""
        sent_end = len(self.gen)  # tokens generated so far (all sent at least once after this packet)
        new_first = sent_end if repair else sent_end - 1
        room = TOKENS_PER_PACKET - (sent_end - new_first)  # new tokens claim the packet first
        old_first = self._floor
        old_end = min(new_first, old_first + self.max_redundant, old_first + room)
        if congested and not repair and old_end > old_first + CONGESTED_REPEATS:
            old_end = old_first + CONGESTED_REPEATS  # (TokenSender.build: only packets with a new token)
            self.repeats_capped += 1
        runs: list[tuple[int, int]] = [(old_first, old_end)] if old_first < old_end else []
        if repair and runs and old_end < sent_end:
            # a repair also carries the newest unacknowledged tokens, newest first (TokenSender.build, step 3)
            tail_first = max(old_end, sent_end - (room - (old_end - old_first)))
            if tail_first == old_end:
                runs = [(old_first, sent_end)]
            elif tail_first < sent_end:
                runs.append((tail_first, sent_end))
        if not repair:
            if runs and runs[-1][1] == new_first:
                runs[-1] = (runs[-1][0], sent_end)
            else:
                runs.append((new_first, sent_end))
        return tuple(runs)

    def _send(self, now: float, repair: bool = False) -> None:
        assert self.sim is not None
        seq = self._next_seq
        self._next_seq += 1
        cp = self.policy.codepoint(now)
        if self.spec.kind == "tokens":
            if not repair:
                self.gen.append(now)
            runs = self._token_runs(repair, congested=self.congestion_cap and not repair and self.path_congested(now))
            size = TOKEN_PACKET_HEADER_B + TOKEN_B * sum(e - f for f, e in runs)
            rec = SentRecord(now, cp, size, runs)
        else:
            size = 1200
            rec = SentRecord(now, cp, size)
        self.sent_log[seq] = rec
        self._inflight[seq] = now
        self.stats.sent += 1
        self.sim.send(self, Packet(size, cp, meta=(self.fid, seq, now)), now)
        if self.spec.kind == "tokens":
            self._last_send = now
            self._arm_repair()

    # -- idle repair (TokenSender.next_timer / on_timer) ---------------------------------------------------------
    def _arm_repair(self) -> None:
        assert self.sim is not None
        if self._repair_timer is not None:
            self.sim.cancel(self._repair_timer)
            self._repair_timer = None
        if self._floor < len(self.gen):
            timeout = min(REPAIR_MAX_S, max(REPAIR_MIN_S, 1.5 * self._srtt) * 2**self._backoff)
            self._repair_timer = self.sim.call_at(self._last_send + timeout, self._on_repair_timer)

    def _on_repair_timer(self, now: float) -> None:
        self._repair_timer = None
        if self._floor >= len(self.gen):
            return
        self._backoff = min(self._backoff + 1, REPAIR_MAX_BACKOFF)
        self.repairs += 1
        self._send(now, repair=True)

    def on_ack(self, seq: int, sent: float, ce: bool, now: float) -> None:
        if self._inflight.pop(seq, None) is None:
            return
        self.stats.acked += 1
        self.stats.ce_acked += ce
        self._sample(seq, sent, ce, now)
        rec = self.sent_log[seq]
        if not rec.runs:
            return
        self._srtt = 0.875 * self._srtt + 0.125 * (now - sent)  # as the sender's echo-based SRTT
        sample = now - sent  # aioquic's smoothed and lowest round trip, for the congestion cap
        self._rtt_min = min(self._rtt_min, sample)
        self._rtt_smoothed = sample if self._rtt_smoothed is None else 0.875 * self._rtt_smoothed + 0.125 * sample
        if ce and rec.ecn != ECT1:  # (an L-queue mark alone is no congestion: ServerSession._note_ce)
            self._ce_at = now
        floor = self._floor
        for first, end in rec.runs:
            self._acked_above.update(range(max(first, self._floor), end))
        while self._floor in self._acked_above:
            self._acked_above.discard(self._floor)
            self._floor += 1
        if self._floor > floor:  # progress: the repair timer starts over from its shortest timeout
            self._backoff = 0
            self._arm_repair()

    def _arm_rto(self, now: float) -> None:
        pass


class MarkedBulkFlow(_MarkedMixin, ScalableFlow):
    """Window-limited marked flow: CE on an L packet is DCTCP feedback, CE on a C packet halves (RFC 3168).

    The sender remembers which queue each packet asked for, because CE means different things in the two
    queues (p_L = k p' against p_C = p'^2; research/swiftqueue_l4s.md §1.3).
    """

    def __init__(self, policy: MarkingPolicy, **kw: Any) -> None:
        super().__init__(**kw)
        self.policy = policy
        self.sent_log: dict[int, SentRecord] = {}

    def _send(self, now: float) -> None:
        assert self.sim is not None
        seq = self._next_seq
        self._next_seq += 1
        cp = self.policy.codepoint(now)
        self.sent_log[seq] = SentRecord(now, cp, self.size)
        self._inflight[seq] = now
        self.stats.sent += 1
        self.sim.send(self, Packet(self.size, cp, meta=(self.fid, seq, now)), now)

    def on_ack(self, seq: int, sent: float, ce: bool, now: float) -> None:
        if seq in self._inflight:
            self._sample(seq, sent, ce, now)
        super().on_ack(seq, sent, ce, now)

    def on_feedback(self, seq: int, ce: bool, lost: bool, now: float) -> None:
        rec = self.sent_log.get(seq)
        if ce and rec is not None and rec.ecn != ECT1:
            # classic CE: halve once per round trip, like Reno
            if self._congestion_event(seq):
                self.ssthresh = max(self.cwnd / 2, 2.0)
                self.cwnd = self.ssthresh
            return
        super().on_feedback(seq, ce, lost, now)


class OnOffCbrFlow(CbrFlow):
    """Unresponsive CBR that is on for ``on_s`` then silent for ``off_s``, repeating (bursty L4S abuse)."""

    def __init__(self, rate_bps: float, on_s: float, off_s: float, **kw: Any) -> None:
        super().__init__(rate_bps, **kw)
        self.on_s = on_s
        self.off_s = off_s

    def _tick(self, now: float) -> None:
        if now >= self.stop or self.sim is None:
            return
        cycle = self.on_s + self.off_s
        k = math.floor((now - self.start) / cycle + 1e-9)
        if now - (self.start + k * cycle) < self.on_s - 1e-9:
            self._send(now)
            self.sim.call_at(now + self.interval, self._tick)
        else:  # next cycle start, computed from the cycle index so float error cannot stall the clock
            self.sim.call_at(self.start + (k + 1) * cycle, self._tick)


def add_cross_flows(sim: Simulation, specs: list[str], *, ack_delay: float, seconds: float, seed: int) -> None:
    """Add the virtual-time cross flows (kernel TCP is modelled as Reno in virtual time)."""
    import random

    rng = random.Random(f"cross:{seed}")
    for spec in specs:
        c = parse_cross_spec(spec)
        start = rng.uniform(0.0, 0.05)
        common: dict[str, Any] = {"ack_delay": ack_delay, "start": start, "stop": seconds}
        if c.kind == "tcp":
            sim.add(RenoFlow(ecn=NOT_ECT, name=c.text, **common))
        elif c.kind == "udp-ect1":
            sim.add(CbrFlow(c.rate_bps, ecn=ECT1, size=1200, name=c.text, **common))
        elif c.kind == "onoff-ect1":
            sim.add(OnOffCbrFlow(c.rate_bps, c.on_s, c.off_s, ecn=ECT1, size=1200, name=c.text, **common))
        elif c.kind == "scalable":
            for i in range(c.n):
                sim.add(ScalableFlow(name=f"{c.text}#{i}", **{**common, "start": start + 0.01 * i}))
        elif c.kind == "tcp-onoff":
            t = c.rate_bps + start  # rate_bps holds the first start delay for this kind
            while t < seconds:
                sim.add(RenoFlow(ecn=NOT_ECT, ack_delay=ack_delay, start=t, stop=min(seconds, t + c.on_s),
                                 name=f"{c.text}@{t:.1f}"))
                t += c.on_s + c.off_s
        elif c.kind == "scalable-burst":
            t = 0.5 + start
            while t < seconds:
                for i in range(c.n):
                    sim.add(ScalableFlow(ack_delay=ack_delay, start=t + 0.002 * i, stop=min(seconds, t + c.on_s),
                                         name=f"{c.text}@{t:.1f}#{i}"))
                t += c.on_s + c.off_s


# ------------------------------------------------------------------------------------------- one run
@dataclass
class PolicyRun:
    """One policy's run: the marked flow's packets and (token streams) tokens."""

    policy: str
    records: list[dict[str, Any]]  # per marked packet: t, queue, latency_ms (None if lost), ce, size, fate
    gen: list[float] = field(default_factory=list)
    render: list[float] = field(default_factory=list)
    decisions: dict[str, int] = field(default_factory=dict)
    forecaster: str = ""
    base_delay_ms: float = 0.0
    span_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    # when the run ended (the time base of gen/render): tokens never rendered count as stalled until then.
    # None: the later of the last render and the last token's generation plus the base delay
    end_s: float | None = None
    # swiftqueue that marked like l4s instead (:func:`fallback_record`); None when it ran as itself
    fallback: dict[str, Any] | None = None


def fallback_record(stage: str, reason: str, at_s: float | None, packets: int, of_packets: int) -> dict[str, Any]:
    """The per-policy ``fallback`` block: the swiftqueue policy marked like ``l4s`` for ``packets`` of the
    ``of_packets`` it marked, from ``at_s`` (s into the run, None if unknown) on, because its model failed to
    load (``stage`` "load") or raised on the packet path ("run").

    Without it a failed model was one warning among the progress lines, and the run reported
    "swiftqueue: P99 0.0% lower than l4s" with exit status 0: l4s compared with itself under swiftqueue's name.
    """
    return {"to": "l4s", "stage": stage, "reason": reason, "at_s": at_s, "packets": packets,
            "of_packets": of_packets}


def make_policy_for(name: str, cfg: SwiftQueueConfig, oracle: Callable[[float], tuple[float, float] | None] | None,
                    forecaster: LatencyForecaster | None,
                    on_failure: Callable[[BaseException], None] | None = None) -> MarkingPolicy:
    """The policy object of ``name`` (the same classes the daemon uses); ``on_failure``: swiftqueue's model
    raised on the packet path (:class:`SwiftQueuePolicy`)."""
    if name == "classic":
        return ClassicPolicy(ect0=True)
    if name == "l4s":
        return L4SPolicy()
    if name == "oracle":
        if oracle is None:
            raise SwiftQueueEvalError("the oracle policy needs the emulator's queue state")
        return OraclePolicy(oracle, classic=ECT0)
    if forecaster is None:
        log.warning("swiftqueue: no latency model; this run uses the l4s policy")
        return L4SPolicy()
    probe = cfg.probe_interval_s
    if isinstance(forecaster, PerQueueEwmaForecaster) and probe == 0:
        probe = 0.25  # a per-queue EWMA learns nothing about the queue it does not use without probes
    return SwiftQueuePolicy(forecaster, margin_ms=cfg.margin_ms, hysteresis_ms=cfg.hysteresis_ms,
                            probe_interval_s=probe, refuge_only=cfg.refuge_only, on_failure=on_failure)


def run_virtual(cfg: SwiftQueueConfig, policy_name: str, *, forecaster: LatencyForecaster | None = None,
                forecaster_name: str = "", progress: Callable[[float], None] | None = None) -> PolicyRun:
    """One policy in virtual time (deterministic for ``cfg.seed``)."""
    link = Link(trace_from_spec(cfg.down_trace), parse_queue(cfg.queue, seed=cfg.seed),
                delay=cfg.delay_ms / 1000.0, loss=parse_loss(cfg.loss, seed=cfg.seed), name="down")
    sim = Simulation(link)
    ack_delay = cfg.delay_ms / 1000.0

    def oracle(now: float) -> tuple[float, float]:
        link.advance(now)
        return estimate_queue_delays(link, now)

    failed_at: list[float] = []

    def on_failure(exc: BaseException) -> None:
        # (replaces the policy's own warning, which could not say when): the run's fallback block needs the time
        failed_at.append(sim.now)
        log.warning("swiftqueue: the latency forecaster failed at %.3f s (%s: %s); marking like l4s from now on",
                    sim.now, type(exc).__name__, str(exc).strip()[:300])

    policy = make_policy_for(policy_name, cfg, oracle, forecaster, on_failure)
    spec = parse_flow_spec(cfg.flow)
    flow: Flow
    if spec.kind == "bulk":
        flow = MarkedBulkFlow(policy, ack_delay=ack_delay, stop=cfg.seconds, name="marked")
    else:
        flow = MarkedPacedFlow(policy, spec, ack_delay=ack_delay, stop=cfg.seconds, name="marked", start=0.0)
    sim.add(flow)
    # only the marked flow's packets are read below: the others (cross traffic) were held to the end for nothing
    sim.keep = lambda pkt: cast("tuple[int, int, float]", pkt.meta)[0] == flow.fid
    add_cross_flows(sim, cfg.cross, ack_delay=ack_delay, seconds=cfg.seconds, seed=cfg.seed)
    step = max(1.0, cfg.seconds / 20)
    t = 0.0
    end = cfg.seconds + DRAIN_S
    while t < end:
        before, t = t, min(t + step, end)
        sim.run(t)
        if progress and before < cfg.seconds:  # the last second (in-flight packets landing) is not progress
            progress(min(t, cfg.seconds))
    sent_log: dict[int, SentRecord] = flow.sent_log  # type: ignore[attr-defined]
    records: list[dict[str, Any]] = []
    arrivals: dict[int, float] = {}
    for pkt in sim.records:
        fid, seq, sent = cast("tuple[int, int, float]", pkt.meta)  # (fid, seq, sent at): as every flow sends
        if fid != flow.fid:
            continue
        rec = sent_log[seq]
        delivered = pkt.fate == "delivered" and pkt.delivery is not None
        records.append({
            "t": sent, "queue": pkt.queue, "ecn": rec.ecn, "size": rec.size, "fate": pkt.fate,
            "latency_ms": (pkt.delivery - sent) * 1000.0 if delivered else None,  # type: ignore[operator]
            "ce": pkt.ecn_out == CE,
        })  # fmt: skip
        if delivered:
            arrivals[seq] = pkt.delivery  # type: ignore[assignment]
    records.sort(key=lambda r: r["t"])
    run = PolicyRun(policy_name, records, decisions=dict(getattr(policy, "decisions", {})),
                    forecaster=forecaster_name if policy_name == "swiftqueue" else "",
                    base_delay_ms=cfg.delay_ms, span_s=cfg.seconds - cfg.warmup_s, end_s=end)
    if policy_name == "swiftqueue":
        run.fallback = virtual_fallback(policy, failed_at[0] if failed_at else None, forecaster_name, len(sent_log))
    if isinstance(flow, MarkedPacedFlow) and spec.kind == "tokens":
        run.gen = list(flow.gen)
        run.extra["repair_packets"] = flow.repairs
        run.extra["repeats_capped"] = flow.repeats_capped
        render = [math.inf] * len(flow.gen)
        for seq, t_arr in arrivals.items():
            for a, b in sent_log[seq].runs:
                for i in range(a, b):
                    render[i] = min(render[i], t_arr)
        prev = -math.inf
        out = []
        for r in render:
            if math.isinf(r):
                break
            prev = max(prev, r)
            out.append(prev)
        run.render = out
    q = link.queue
    run.extra |= {"link": link.stats.to_dict(), "queue": {
        "packets_in_l": getattr(q, "packets_in_l", None), "packets_in_c": getattr(q, "packets_in_c", None),
        "step_marks": getattr(q, "step_marks", None), "pi_marks": getattr(q, "pi_marks", None),
        "aqm_drops": getattr(q, "aqm_drops", None),
    }}  # fmt: skip
    return run


def virtual_fallback(policy: MarkingPolicy, at_s: float | None, forecaster_name: str,
                     packets: int) -> dict[str, Any] | None:
    """The ``fallback`` block of a virtual swiftqueue run (:func:`fallback_record`), None when it ran as itself.

    ``policy`` is an :class:`L4SPolicy` when no model loaded (:func:`make_policy_for`): l4s from the first packet.
    """
    if isinstance(policy, SwiftQueuePolicy):
        if policy.failed is None:
            return None
        return fallback_record("run", policy.failed, at_s, policy.decisions["fallback"],
                               sum(policy.decisions.values()))
    return fallback_record("load", forecaster_name.removeprefix("none: ") or "no latency model", 0.0, packets,
                           packets)


# ------------------------------------------------------------------------------------------- summary
def answer_render_times(run: PolicyRun) -> list[float]:
    """Every token's render time, those never rendered at the run's end (:attr:`PolicyRun.end_s`).

    The stall ratio of the rendered prefix alone hid the rest of the answer: 835 of 3000 tokens rendered read
    as a 50 % stall, the 2165 tokens never shown counted for nothing.
    """
    render = list(run.render)
    missing = len(run.gen) - len(render)
    if missing <= 0:
        return render[:len(run.gen)]
    end = run.end_s if run.end_s is not None else run.gen[-1] + run.base_delay_ms / 1000.0
    return render + [max([end, *render[-1:]])] * missing


def summarize_run(run: PolicyRun, warmup_s: float, t0: float = 0.0) -> dict[str, Any]:
    """The per-policy JSON block: keys :data:`METRIC_KEYS` and ``packets``; for token streams also

    * ``stall_ratio``: over the whole answer (:func:`tokenwire.transport.metrics.stall_ratio`), a token never
      rendered counting as stalled until the end of the run (:func:`answer_render_times`);
    * ``tokens``, ``tokens_rendered``: generated, and rendered in order by the end of the run;
    * ``goodput_tokens_per_s``: tokens rendered per second from the first token's generation to the last
      token's render (to the end of the run when some never rendered). Generation is paced alike for every
      policy, so this differs between policies only by how late the answer finishes on screen and by what
      never arrives (it was ``(rendered - 1) / generation span``: 1.000 against ``l4s`` by construction);
    * ``repair_packets`` (virtual runs): packets that carried no new token (the idle-repair timer);
    * ``repeats_capped`` (virtual runs): packets whose repeats the congestion cap cut (:class:`MarkedPacedFlow`).
    """
    rs = [r for r in run.records if r["t"] - t0 >= warmup_s]
    lat = [r["latency_ms"] for r in rs if r["latency_ms"] is not None]
    n = len(rs)
    delivered = len(lat)
    dropped = n - delivered
    bytes_ok = sum(r["size"] for r in rs if r["latency_ms"] is not None)
    out: dict[str, Any] = {
        "p50_ms": metrics.percentile(lat, 50),
        "p95_ms": metrics.percentile(lat, 95),
        "p99_ms": metrics.percentile(lat, 99),
        "p999_ms": metrics.percentile(lat, 99.9),
        "throughput_mbps": bytes_ok * 8 / run.span_s / 1e6 if run.span_s > 0 else math.nan,
        "l_share": sum(1 for r in rs if r["ecn"] & 1) / n if n else math.nan,
        "ce_rate": sum(1 for r in rs if r["ce"] and r["latency_ms"] is not None) / delivered if delivered else math.nan,
        "drop_rate": dropped / n if n else math.nan,
        "packets": n,
    }
    if run.gen:
        render = answer_render_times(run)
        out["stall_ratio"] = metrics.stall_ratio(run.gen, render, run.base_delay_ms / 1000.0)
        out["tokens"] = len(run.gen)
        out["tokens_rendered"] = rendered = min(len(run.render), len(run.gen))
        span = render[-1] - run.gen[0]
        out["goodput_tokens_per_s"] = rendered / span if span > 0 else None
        if "repair_packets" in run.extra:
            out["repair_packets"] = run.extra["repair_packets"]
        if "repeats_capped" in run.extra:
            out["repeats_capped"] = run.extra["repeats_capped"]
    if run.decisions:
        out["decisions"] = run.decisions
    if run.forecaster:
        out["forecaster"] = run.forecaster
    if run.fallback is not None:
        out["fallback"] = run.fallback
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def build_summary(cfg: SwiftQueueConfig, runs: dict[str, PolicyRun], backend: str,
                  backend_reason: str = "", t0: dict[str, float] | None = None,
                  started: RunProvenance | None = None) -> dict[str, Any]:
    """The JSON document: ``{"policies": {name: {...}}, "comparison": {...}, "config", "backend", "provenance"}``
    (``started``: where the runs began, for the provenance's load average and commit)."""
    pol = {name: summarize_run(run, cfg.warmup_s, (t0 or {}).get(name, 0.0)) for name, run in runs.items()}
    comparison: dict[str, Any] = {}

    def ratio(d: dict[str, Any], ref: dict[str, Any], key: str) -> float | None:
        return d[key] / ref[key] if ref.get(key) and d.get(key) is not None else None

    if "l4s" in pol and pol["l4s"]["p99_ms"]:
        ref = pol["l4s"]
        for name, d in pol.items():
            if name == "l4s" or d["p99_ms"] is None:
                continue
            # throughput is the marked flow's delivered bit rate; for a token stream the tokens' own rate is
            # compared apart (goodput_tokens_per_s: when the answer finished on screen, what never arrived)
            comparison[name] = {
                "p99_reduction_vs_l4s": 1.0 - d["p99_ms"] / ref["p99_ms"],
                "throughput_ratio_vs_l4s": ratio(d, ref, "throughput_mbps"),
                "throughput_measure": "throughput_mbps",
            }
            if "goodput_tokens_per_s" in ref:
                comparison[name]["goodput_ratio_vs_l4s"] = ratio(d, ref, "goodput_tokens_per_s")
    return {"policies": pol, "comparison": comparison, "config": asdict(cfg), "backend": backend,
            "backend_reason": backend_reason, "provenance": provenance(cfg, started)}


def provenance(cfg: SwiftQueueConfig, started: RunProvenance | None = None) -> dict[str, Any]:
    """What the results depend on beyond ``config``: the code (tokenwire's version and, run from a git checkout,
    its commit), the latency model's bytes (sha256) and the policy's and token model's constants. ``config`` alone
    could not reproduce them: a constant added later (the refuge memory, commit 8f511d9) changed 12 of 16
    scenarios' swiftqueue rows while the files' settings stayed the same, and nothing in them said why. Also the
    host, its CPUs and its load average before and after (:mod:`tokenwire.daemon.run_provenance`, as every bench
    JSON has): a namespace run's P99 and stall depend on how loaded the host was."""
    import hashlib

    from tokenwire.daemon.run_provenance import run_provenance
    from tokenwire.predictor.runtime import shipped_model_path

    model: dict[str, Any] | None = None
    if "swiftqueue" in cfg.policies:
        path = cfg.model or str(shipped_model_path())
        try:
            with open(path, "rb") as fh:
                model = {"path": path, "sha256": hashlib.sha256(fh.read()).hexdigest()}
        except OSError as exc:
            model = {"path": path, "sha256": None, "error": exc.strerror or str(exc)}
    return {
        **run_provenance(started), "model": model,
        "refuge_memory_s": REFUGE_MEMORY_S, "congestion_cap": MarkedPacedFlow.congestion_cap,
        "congested_repeats": CONGESTED_REPEATS, "queue_delay_s": QUEUE_DELAY_S, "queue_delay_share": QUEUE_DELAY_SHARE,
    }  # fmt: skip


def run_virtual_all(cfg: SwiftQueueConfig, *, log_fn: Callable[[str], None] | None = None,
                    progress: Callable[[str, float, float], None] | None = None,
                    ) -> tuple[dict[str, Any], dict[str, PolicyRun]]:
    """Every policy of ``cfg`` in virtual time; returns the JSON summary and the runs (for the plot)."""
    cfg.validate()
    started = RunProvenance()
    runs: dict[str, PolicyRun] = {}
    for k, name in enumerate(cfg.policies):
        if log_fn:
            log_fn(f"[{k + 1}/{len(cfg.policies)}] {name} (virtual time, {cfg.seconds:g} s)")
        fc, fc_name = (load_predictor_forecaster(cfg.model) if name == "swiftqueue" else (None, ""))
        # (the default binds this policy's name, B023; mypy cannot infer a lambda with one: the ignore)
        runs[name] = run_virtual(
            cfg, name, forecaster=fc, forecaster_name=fc_name,
            progress=(lambda t, n=name: progress(n, t, cfg.seconds)) if progress else None,  # type: ignore[misc]
        )
    return build_summary(cfg, runs, "virtual", "vsim: virtual time, no namespaces", started=started), runs
