"""Per-packet ECN marking policies: which DualQ queue each outgoing packet asks for.

A DualQ Coupled AQM (RFC 9332) puts ECT(1) and CE packets in the low-latency L queue and Not-ECT/ECT(0)
in the classic C queue. Policies:

* ``classic``: every packet Not-ECT (or ECT(0) with ``ect0=True``);
* ``l4s``: every packet ECT(1), today's per-flow choice;
* ``swiftqueue``: per packet, ECT(1) when the predicted L latency plus a margin is below the predicted C
  latency, with hysteresis so decisions do not flap (SwiftQueue, arXiv 2410.06112: "route it to whichever
  queue has lower predicted latency - even if packets within the same flow end up in different queues");
* ``oracle``: the testbed only; asks the emulator which queue is faster right now (an upper bound).

A policy sees every acknowledged packet as a :class:`LatencySample` (latency, which queue it used, CE)
and answers :meth:`MarkingPolicy.codepoint` for the next packet(s). Sans-I/O: time is passed in.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .ecn_socket import CE, ECT0, ECT1, NOT_ECT

POLICIES = ("classic", "l4s", "swiftqueue", "oracle")

log = logging.getLogger("tokenwire.transport.marking")


@dataclass(slots=True)
class LatencySample:
    """One acknowledged packet, as the sender learns it from an ACK datagram."""

    sent_at: float  # sender clock (s) when the packet left
    ack_at: float  # sender clock (s) when its ack arrived
    latency_ms: float  # one-way, from the ACK's timestamps; a client clock's offset removed (one_way_delay.py)
    size: int  # bytes of the acked packet
    queue_l: bool  # it was sent ECT(1): the L queue
    ce: bool  # it arrived CE-marked


class LatencyForecaster(Protocol):
    """Predicts the latency the next packet would see in each queue (``tokenwire.predictor`` implements it)."""

    def observe(self, sample: LatencySample) -> None: ...

    def predict(self, now: float) -> tuple[float, float] | None:
        """(L ms, C ms), or None while there is too little history."""
        ...


class MarkingPolicy(Protocol):
    name: str

    def codepoint(self, now: float) -> int: ...

    def on_sample(self, sample: LatencySample) -> None: ...

    def path_changed(self) -> None:
        """The peer moved to another host (QUIC connection migration): what the policy learnt of the old path's
        queues says nothing of the new one's. A no-op for policies that keep no history (the session also skips a
        policy from outside this package that has no such method: ``path_reset.policy_path_changed``)."""
        ...


class ClassicPolicy:
    name = "classic"

    def __init__(self, ect0: bool = False) -> None:
        self._cp = ECT0 if ect0 else NOT_ECT

    def codepoint(self, now: float) -> int:
        return self._cp

    def on_sample(self, sample: LatencySample) -> None:
        pass

    def path_changed(self) -> None:
        pass


class L4SPolicy:
    name = "l4s"

    def codepoint(self, now: float) -> int:
        return ECT1

    def on_sample(self, sample: LatencySample) -> None:
        pass

    def path_changed(self) -> None:
        pass


REFUGE_MEMORY_S = 10.0
"""How long a C-queue sample counts for swiftqueue's refuge rule (SwiftQueuePolicy._c_is_a_refuge), and the least
time between two of its refuge probes.

Seconds, not round trips: the backlog the rule avoids is a classic flow's standing queue, which lasts as long as the
flow, and a flow in L sees an L burst only every few seconds. Virtual testbed, fixed 12 Mbit/s, B (L bursts every
2 s, a classic flow 2 s on / 2 s off), P99 vs l4s, seeds 0/1: no bound +0/+0 %; 1 s +24/+19 %, 2 s +20/+40 % (the
flow fled into the classic backlog, as without the rule); 5 s +5/+1 %; 10 s +1/+1 %. A and Verizon-LTE A unchanged
or better at 10 s (-73.2/-74.8 %; -10.1 -> -12.5, +1.2 -> -2.0 %)."""


REFUGE_SHARE = 0.25
"""How much of L's queueing C's may show and still count as a refuge (SwiftQueuePolicy._c_queue_is_small).

During an L burst DualPI2 serves C at its WRR share only, so even an empty C answers a few ms above the floor (at
12 Mbit/s ~9 L packets of 1 ms go before each C packet): the floor test alone rejected every refuge probe, which is
only sent during a burst, and a flow back in L stayed there (namespaces, fixed 12 Mbit/s, A: -0.9 and +0.4 % P99
against l4s in two of three runs). A classic flow's standing queue, drained at that share, answers far above L
instead. Virtual fixed A with the flow forced into L and C's samples lapsed (at 20/25/30.5/40 s, seeds 0/1): it
left L 10-20 s later or never; now 60 ms after the probe in 7 of 8 runs (the 8th: the probe left as L drained, and
the next one 10 s later). The 16 scenarios x seeds 0-3: fixed A -73.2 % as before, UMTS unchanged; fixed B median
0.0 -> +2.1 % (+1.5 ... +4.3): an empty C between the classic flow's on-periods is now a refuge, and the flow meets
the next L burst there, C drained at its share."""

REFUGE_PAIR_S = 0.1
"""How far apart in sending time an L packet and a C packet may be to count as seeing the queues at the same moment
(SwiftQueuePolicy._c_queue_is_small): a few token packets; an L burst changes its queue by ~30 ms per 100 ms."""

REFUGE_EVIDENCE_S = 0.2
"""How long a C sample judged against its L neighbours counts (SwiftQueuePolicy._c_queue_is_small): what C and L
showed together holds while the burst that made it lasts, not for REFUGE_MEMORY_S. Virtual TMobile-UMTS B, seed
0: a C sample judged 2.2 s after it arrived moved the flow into C, P99 against l4s -3.4 -> +55 %; at 0.2 s -3.4 %."""


PREDICT_INTERVAL_S = 0.02
"""How long the daemon's swiftqueue reuses a prediction (``predict_interval_s``; SwiftQueuePolicy._reusable).

One inference per token packet (~0.4-0.5 ms on the event loop) cost four 100-token/s answers 1,220 inferences and
doubled their stall ratio against ``l4s``; a client acks every token packet, so the ack rate is the packet rate and
re-predicting per ack would save nothing. A queue change shows in the ack history a round trip late at best, so a
prediction 20 ms old is as good: virtual testbed, 50 tokens/s, 20 ms one-way, seed 0, 0 -> 20 ms: 3000 -> 1706
inferences, P99 vs l4s A -73.2 -> -73.2 %, B +1.3 -> +2.1 %, Verizon-LTE A -12.5 -> -11.6 % (40 ms: 1143, -73.2 /
+2.1 / -12.8 %). The class's own default stays 0 (a prediction per packet, the evaluation's setting)."""


class SwiftQueuePolicy:
    """ECT(1) when ``pred_L + margin < pred_C``, with a hysteresis band of ``hysteresis_ms`` around it.

    Two rules on measured samples keep it from moving where it cannot gain: a queue at the path's floor is
    never left (:meth:`_worth_moving`), and L is left only for a C queue that looks empty
    (:meth:`_c_is_a_refuge`; when C's samples are too old to tell, one packet asks C first: a refuge probe,
    counted in ``decisions["probe"]``).

    The forecaster runs on the packet path: an exception from it (a model that loaded but cannot run on
    real inputs) must not reach the transport, which would send nothing and stall the connection. The
    policy then answers like ``l4s`` (ECT(1)) for the rest of its life, stops calling the forecaster, and
    reports the error once: to ``on_failure`` when given (the daemon counts it and switches to ``l4s``), as a
    logged warning otherwise. ``failed`` holds the error's text, ``decisions["fallback"]`` the packets
    marked that way.
    """

    name = "swiftqueue"

    def __init__(
        self,
        forecaster: LatencyForecaster,
        *,
        margin_ms: float = 0.5,
        hysteresis_ms: float = 0.5,
        classic: int = ECT0,
        cold_start: int = ECT1,
        probe_interval_s: float = 0.0,
        refuge_only: bool = True,
        refuge_memory_s: float = REFUGE_MEMORY_S,
        predict_interval_s: float = 0.0,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        if margin_ms < 0 or hysteresis_ms < 0 or probe_interval_s < 0:
            raise ValueError("margin_ms, hysteresis_ms and probe_interval_s must be >= 0")
        if not refuge_memory_s > 0:
            raise ValueError(f"refuge_memory_s must be > 0, got {refuge_memory_s}")
        if not 0 <= predict_interval_s < math.inf:
            raise ValueError(f"predict_interval_s must be >= 0 and finite, got {predict_interval_s}")
        self.forecaster = forecaster
        self.refuge_only = refuge_only
        self.refuge_memory_s = refuge_memory_s
        self.predict_interval_s = predict_interval_s
        self.predictions = 0  # forecaster.predict calls (inferences); decisions count packets
        self._predicted_at = -math.inf  # when last_prediction was made
        self._none_when_ready = False  # the last answer was None from a forecaster with a full window (_reusable)
        self.margin_ms = margin_ms
        self.hysteresis_ms = hysteresis_ms
        self.classic = classic
        self.probe_interval_s = probe_interval_s
        self._cold_start = cold_start
        self._current = cold_start
        self.decisions = {"l": 0, "c": 0, "cold": 0, "probe": 0, "fallback": 0}
        self.last_prediction: tuple[float, float] | None = None
        self.on_failure = on_failure
        self.failed: str | None = None  # the forecaster's error, once it raised: marking like l4s since
        # when the last latency sample of each queue arrived, and when we last probed (see _probe)
        self._last_sample = {True: -math.inf, False: -math.inf}
        self._last_probe = -math.inf
        self._refuge_probe_at = -math.inf  # when the last refuge probe left (_c_is_a_refuge)
        self._floor_ms = math.inf  # lowest latency sample seen: the path's propagation floor
        # the last few samples of each queue as (ack time, latency ms): the floor and refuge rules read them
        self._recent: dict[bool, deque[tuple[float, float]]] = {True: deque(maxlen=3), False: deque(maxlen=3)}
        # C's last samples as [ack time, send time, latency, best latency of the L packets sent beside it (inf: none
        # yet)], and L's last samples as (send time, latency): _c_queue_is_small compares what both saw at one moment
        self._c_beside: deque[list[float]] = deque(maxlen=3)
        self._l_sent: deque[tuple[float, float]] = deque(maxlen=8)

    def codepoint(self, now: float) -> int:
        pred = None
        if self.failed is None and self._reusable(now):
            pred = self.last_prediction
        elif self.failed is None:
            try:
                self.predictions += 1
                pred = self.forecaster.predict(now)
                self._predicted_at = now
                self._none_when_ready = pred is None and bool(getattr(self.forecaster, "ready", False))
            except Exception as exc:  # whatever the model raises, the packet must leave
                self._give_up(exc)
        if self.failed is not None:
            self.decisions["fallback"] += 1
            return ECT1  # the l4s policy's decision
        self.last_prediction = pred
        if pred is None:
            self.decisions["cold"] += 1
            return self._current
        pred_l, pred_c = pred
        gain = pred_c - (pred_l + self.margin_ms)  # > 0: L is expected to be faster by more than the margin
        in_l = self._current == ECT1
        if self._worth_moving(in_l):
            if in_l and gain < -self.hysteresis_ms:
                refuge = self._c_is_a_refuge(now)
                if refuge is None:  # C's samples are too old to tell: this one packet asks C, the flow stays in L
                    self.decisions["probe"] += 1
                    return self.classic
                if refuge:
                    self._current = self.classic
            elif not in_l and gain > self.hysteresis_ms:
                self._current = ECT1
        current_ms = pred_l if self._current == ECT1 else pred_c
        if self._probe(now, current_ms):
            self.decisions["probe"] += 1
            return self.classic if self._current == ECT1 else ECT1
        self.decisions["l" if self._current == ECT1 else "c"] += 1
        return self._current

    def _reusable(self, now: float) -> bool:
        """Whether the last prediction still answers for a packet leaving at ``now``: made less than
        ``predict_interval_s`` ago (and not None: a forecaster still filling its window is asked again, cheaply).

        A None from a forecaster whose window is full (it says so in ``ready``) is an inference that answered NaN or
        infinity: reused like an answer, or a model doing so was run for every packet, the interval defeated."""
        answered = self.last_prediction is not None or self._none_when_ready
        return answered and 0.0 <= now - self._predicted_at < self.predict_interval_s

    def _worth_moving(self, in_l: bool) -> bool:
        """Only a queue measured slower than the path's floor (+ margin + hysteresis) is worth leaving.

        No queue can beat the fastest latency the flow has ever seen, so while the current queue's recent
        samples sit at that floor a move can only lose: it would trade a queue that is fast now for one that
        merely looks fast, and a flow that fled a bursting L queue into an idle C queue would walk back into
        the next burst. Measured samples, not predictions, decide this (a model's bias of a few ms would
        hide the floor); the best of the last few samples, so one late packet does not count as a trend.
        Without samples of the current queue the predictions decide alone.
        """
        return not self._at_floor(in_l)

    def _at_floor(self, queue_l: bool, since: float = -math.inf) -> bool:
        """The best of the queue's last few samples (those acknowledged at ``since`` or later) is within margin +
        hysteresis of the path's floor."""
        recent = [ms for at, ms in self._recent[queue_l] if at >= since]
        return bool(recent) and min(recent) <= self._floor_ms + self.margin_ms + self.hysteresis_ms

    def _c_is_a_refuge(self, now: float) -> bool | None:
        """Leave L for C only while C's recent samples were at the floor; None: ask C first (a refuge probe).

        While L is backlogged DualPI2 serves C with its WRR share only (10 % by default), so anything queued
        in C drains ten times slower during an L burst: a C queue with a backlog is no refuge, and the flow's
        packets wait longer there than in the burst it fled (a classic flow's standing queue did exactly that
        in testbed scenario B). An empty C queue shows as samples at the floor. ``refuge_only=False``
        restores the plain rule (move on the predictions alone). A C queue never sampled: the predictions decide,
        and the move brings C samples within a round trip.

        C's samples count for ``refuge_memory_s``. A flow in L takes no C samples (with ``probe_interval_s = 0``,
        the default), so they lapse while it stays there. Moving on the predictions then walked into a backlogged C
        once per ``refuge_memory_s`` (virtual UMTS A, P99 vs ``l4s`` +416 % at seed 0); keeping them for ever held a
        flow in L through 600 s of L bursts after one backlogged C sample. Instead one packet goes to C (the caller
        marks it classic and the flow stays in L), at most one per ``refuge_memory_s``, and its ack decides by the
        same test. Virtual, the 16 scenarios x seeds 0-3, median P99 vs ``l4s``: UMTS A/B/C/D +1.0/+17.1/-2.7/
        +1.2 % -> +0.1/-1.7/+3.6/+2.2 %, fixed B +2.7 -> 0.0 %, worst of the 64 runs +416 -> +14 %, fixed A -73.2 %
        as before. (Judging that answer more leniently, as a refuge whenever it beat L's last samples by margin +
        hysteresis, fled into B's backlogged C again: +15 … +25 %.) In the daemon the probe is what one
        ``datagrams_to_send`` call builds: one token datagram at an answer's pace.

        The floor test alone could never pass a probe: it is sent only while L is predicted slower, i.e. during an L
        burst, when even an empty C answers ~8-9 ms above the floor (C's WRR share), so a flow that walked back into
        L under jitter stayed there; C's samples also count as a refuge when they are small against L's at the
        same moment (:meth:`_c_queue_is_small`).
        """
        if not self.refuge_only:
            return True
        recent_c = self._recent[False]
        if not recent_c:
            return True
        since = now - self.refuge_memory_s
        if not any(at >= since for at, _ in recent_c):
            if now - self._refuge_probe_at < self.refuge_memory_s:
                return False  # the probe's answer is on its way (or the probe was lost): L meanwhile
            self._refuge_probe_at = now
            return None
        return self._at_floor(False, since) or self._c_queue_is_small(now, since)

    def _c_queue_is_small(self, now: float, since: float) -> bool:
        """Every C sample acked at ``since`` or later arrived within ``REFUGE_EVIDENCE_S`` and queued at most
        ``REFUGE_SHARE`` of what the L packets sent beside it (within ``REFUGE_PAIR_S``) queued, each minus the floor.

        Queueing against queueing at the same moment tells an empty C served at its WRR share (a few ms while L
        queues tens) from a classic flow's standing queue drained at that share (far above L); only what both
        queues showed together counts, so a C sample with no L packet beside it (the flow sat in C) never does,
        nor one older than the burst it was compared in.
        """
        fresh = [(at, ms, l_ms) for at, _, ms, l_ms in self._c_beside if at >= since]
        if not fresh:
            return False
        for at, ms, l_ms in fresh:
            if at < now - REFUGE_EVIDENCE_S or not math.isfinite(l_ms):
                return False
            if ms - self._floor_ms > REFUGE_SHARE * (l_ms - self._floor_ms):
                return False
        return True

    def _probe(self, now: float, current_ms: float) -> bool:
        """One packet into the unused queue when its latest sample is older than ``probe_interval_s``.

        Every ack teaches the forecaster only about the queue its packet used; without an occasional probe
        the prediction for the other queue would stay frozen at whatever it was when the flow left it, and a
        flow that fled a congested L queue would never come back. A probe can only pay off when the current
        queue is predicted slower than the fastest latency this flow has ever seen (the path's floor) by more
        than margin + hysteresis; otherwise no queue can beat it and probing would only add tail latency.
        Probes are rate-limited to one per interval.
        """
        if self.probe_interval_s <= 0 or current_ms <= self._floor_ms + self.margin_ms + self.hysteresis_ms:
            return False
        other_is_l = self._current != ECT1
        if now - self._last_sample[other_is_l] < self.probe_interval_s:
            return False
        if now - self._last_probe < self.probe_interval_s:
            return False
        self._last_probe = now
        return True

    def on_sample(self, sample: LatencySample) -> None:
        self._last_sample[sample.queue_l] = max(self._last_sample[sample.queue_l], sample.ack_at)
        self._floor_ms = min(self._floor_ms, sample.latency_ms)
        self._recent[sample.queue_l].append((sample.ack_at, sample.latency_ms))
        if sample.queue_l:
            self._l_sent.append((sample.sent_at, sample.latency_ms))
            for entry in self._c_beside:  # an L packet sent beside a C one, acked after it
                if abs(sample.sent_at - entry[1]) <= REFUGE_PAIR_S:
                    entry[3] = min(entry[3], sample.latency_ms)
        else:
            near = [ms for sent, ms in self._l_sent if abs(sent - sample.sent_at) <= REFUGE_PAIR_S]
            self._c_beside.append([sample.ack_at, sample.sent_at, sample.latency_ms, min(near, default=math.inf)])
        if self.failed is None:
            try:
                self.forecaster.observe(sample)
            except Exception as exc:  # see codepoint()
                self._give_up(exc)

    def path_changed(self) -> None:
        """Start over as on a new connection (the peer moved to another host): the old path's floor, its last
        samples per queue and the forecaster's ack history would judge the new path's queues by the old one's. Under
        a Wi-Fi path's floor (5 ms, say) every sample of a slower LTE path reads as above the floor, so the floor rule
        would never hold the flow in its queue, and the refuge rule would read the old path's C samples for up to
        ``refuge_memory_s``. The forecaster is replaced by a ``fresh()`` one of the same model where it offers that
        (the ONNX forecaster: its window refills in ``window + 1`` acks, the cold-start codepoint meanwhile); one
        without ``fresh`` keeps its history. The counters (decisions, predictions) and a model failure stay."""
        fresh = getattr(self.forecaster, "fresh", None)
        if callable(fresh):
            self.forecaster = fresh()
        self._current = self._cold_start
        self.last_prediction = None
        self._predicted_at = -math.inf
        self._none_when_ready = False
        self._last_sample = {True: -math.inf, False: -math.inf}
        self._last_probe = -math.inf
        self._refuge_probe_at = -math.inf
        self._floor_ms = math.inf
        for recent in self._recent.values():
            recent.clear()
        self._c_beside.clear()
        self._l_sent.clear()

    def fall_back(self, reason: str) -> None:
        """Mark like ``l4s`` from now on without asking the forecaster again, and without reporting (the
        daemon calls it on every open connection once one of them met an error from the model they share)."""
        if self.failed is None:
            self.failed = reason
            self.last_prediction = None

    def _give_up(self, exc: BaseException) -> None:
        """The forecaster raised: mark like ``l4s`` from now on and report it once (see the class doc)."""
        self.failed = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
        self.last_prediction = None
        if self.on_failure is not None:
            try:
                self.on_failure(exc)
            except Exception:  # the report must not break the packet path either
                log.exception("swiftqueue: on_failure callback failed")
        else:
            log.warning("swiftqueue: the latency forecaster failed (%s); marking like l4s (ECT(1)) from now on",
                        self.failed)


class OraclePolicy:
    """Testbed only: marks for whichever queue the emulator says is faster for a packet leaving now."""

    name = "oracle"

    def __init__(self, queue_delays: Callable[[float], tuple[float, float] | None], classic: int = ECT0) -> None:
        self.queue_delays = queue_delays
        self.classic = classic
        self.decisions = {"l": 0, "c": 0, "cold": 0, "probe": 0}

    def codepoint(self, now: float) -> int:
        est = self.queue_delays(now)
        if est is None:  # the emulator has not published its state yet
            self.decisions["cold"] += 1
            return ECT1
        l_ms, c_ms = est
        cp = ECT1 if l_ms <= c_ms else self.classic
        self.decisions["l" if cp == ECT1 else "c"] += 1
        return cp

    def on_sample(self, sample: LatencySample) -> None:
        pass

    def path_changed(self) -> None:
        pass  # (it asks the emulator, which knows the path it emulates)


ECN_VALIDATION_PACKETS = 10
"""ECT-marked packets a peer must have acknowledged (QUIC ACK frames, after the handshake) since its
ECN counts last showed a new arrival with their codepoint (or CE) before a connection stops marking: a few round trips
of a token stream, a few packets of a KV chunk; small, so that a flow whose CE marks go unheard leaves the L queue
early."""

ECN_RETRY_S = 30.0
"""How long after failing a connection tries ECN again (RFC 9000 §13.4.2: "an endpoint could continue to periodically
attempt validation"), doubled after each retry that fails, up to :data:`ECN_RETRY_MAX_S`. A path that stopped
clearing the codepoint (a connection that migrated, a middlebox reconfigured) got Not-ECT for the rest of a
connection that can last hours. A retry to a client that reads no codepoints sends ECT packets whose CE marks
nobody hears: the validation's ``packets`` and what leaves until the last of them is acknowledged (about a round
trip of sending; on the KV channel until the next KV_ACK)."""
ECN_RETRY_MAX_S = 480.0
_RETRY_DOUBLINGS = 16  # more than the doublings from ECN_RETRY_S to ECN_RETRY_MAX_S


class EcnValidation:
    """Whether a connection may go on marking ECT: ECN validation in the spirit of RFC 9000 §13.4.2, for the
    connection's whole life (§13.4.2.1 judges every ACK, not the first few).

    CE reaches the congestion controller only through the peer's ECN counts, which travel in the application's
    acks (the token client's ack datagrams, the KV client's KV_ACKs). A peer that reads no codepoints (the SDK's
    clients with ``ecn=False``, or on a platform without ``IP_RECVTOS``; they read them by default), the ``stream``
    scheme (no ack datagrams) and a path that clears the codepoint report none, so a flow marked ECT ignored every
    CE an AQM set (probe: ~170 packets CE, ``tokenwire_ecn_ce_total 0``). Judged once per connection, a chatterbox
    answer validated it and a ``stream`` answer after it then sent 308 ECT(1) packets whose CE marks nobody heard;
    a path that began clearing the codepoint mid-connection kept getting ECT(1). States:

    * ``testing`` (at start): the policy's codepoint;
    * ``capable``: the last counts showed new arrivals with a codepoint the packets sent since the previous such
      counts carried (ECT(0) for ECT(0), ECT(1) for ECT(1)), or CE: the policy's codepoint;
    * ``failed``: the peer has acknowledged (QUIC) ``packets`` ECT-marked packets sent after the handshake since
      the counts last grew so (or since the start): Not-ECT, without asking the policy. Counts that show such
      arrivals later (the first acks lost, a client that reports late) make it ``capable`` again;
    * ``retesting``: :meth:`retry` found a failed connection's retry due (:data:`ECN_RETRY_S` after it failed,
      doubling): the policy's codepoint again, judged as in ``testing``. It fails back to ``failed`` without
      counting another failure (the connection stopped marking once), or turns ``capable``.

    Arrivals of another ECT codepoint than the one sent do not count (RFC 9000 §13.4.2.1: validation fails when
    the counts show that the path changed the codepoint): a path re-marking ECT(1) to ECT(0) showed 604 ECT(0)
    arrivals for 604 ECT(1) packets, passed validation, and ``prague`` went on answering the classic queue's CE
    marks with a scalable response. ECT(0) arrivals after ECT(1) packets may also be late packets of a ``swiftqueue``
    move from C to L; they only make the ECT(1) packets that follow wait for arrivals of their own.

    "Long enough" is what the feedback channel can show: a client acks every packet that brings a token, with
    cumulative counts of every datagram it got, so ``packets`` of them acknowledged without the marked counts
    growing means that no report came (no feedback channel) or that the reports saw them arrive unmarked (bleached).
    Packets, not time, and only packets that carry application data (stream data or a datagram; the session
    reports no others): ACK-only, PING and flow-control packets are acknowledged by QUIC before any report can
    say anything (counted, the ACKs that a 100-KB prompt drew, or the PINGs of an idle keepalive connection,
    failed a healthy chatterbox connection at its next answer). A quiet connection never fails.

    With ``wait_for_report`` it fails only once the peer has sent an ack that could carry counts after the
    ``packets``-th packet was acknowledged (the KV channel: a KV_ACK comes after a whole chunk, hundreds of packets
    that QUIC acknowledges first). Sans-I/O: the session reports packet numbers and acknowledgements.
    """

    def __init__(self, packets: int = ECN_VALIDATION_PACKETS, *, wait_for_report: bool = False) -> None:
        if packets < 1:
            raise ValueError(f"ECN validation needs at least 1 packet, got {packets}")
        self.packets = packets
        self.wait_for_report = wait_for_report
        self.state = "testing"
        self.failures = 0  # times it failed (the daemon's counter reads it)
        self.reports = 0  # acks from the peer that could carry ECN counts (with them or not)
        self._counts = [0, 0, 0, 0]  # the latest counts (Not-ECT, ECT(1), ECT(0), CE)
        self._sent_cps: set[int] = set()  # the ECT codepoints of the packets counted since the counts last validated
        self._other_cps: set[int] = set()  # ECT codepoints that arrived meanwhile without any sent (re-marked?)
        self._ect_sent = 0  # ECT-marked packets counted since the counts last validated
        self._check_pn: int | None = None  # the packet number of the packets-th of them
        self._reports_at_check: int | None = None  # reports when that packet was acknowledged (wait_for_report)
        self.retries = 0  # retries since the connection last failed from marking (not retesting)
        self._retry_at: float | None = None  # when the next retry is due; set at the first retry() after a failure

    @property
    def marking_allowed(self) -> bool:
        """False once validation failed: the connection's datagrams go out Not-ECT."""
        return self.state != "failed"

    def counts(self, codepoint: int) -> bool:
        """Whether packets sent now with ``codepoint`` would count (:meth:`on_sent`): not while Not-ECT, failed, or
        waiting for the acknowledgement of the packet that decides. The session skips finding them otherwise."""
        return codepoint != NOT_ECT and self.state != "failed" and self._check_pn is None

    def on_sent(self, codepoint: int, first_pn: int, end_pn: int) -> None:
        """Packets numbered ``[first_pn, end_pn)`` left with ``codepoint`` (after the handshake)."""
        if not self.counts(codepoint) or end_pn <= first_pn:
            return
        needed = self.packets - self._ect_sent
        if end_pn - first_pn >= needed:
            self._check_pn = first_pn + needed - 1
        self._ect_sent += end_pn - first_pn
        self._sent_cps.add(codepoint)

    def on_acked(self, largest_acked: int) -> bool:
        """The peer's largest acknowledged packet number; True when validation fails now."""
        if self.state == "failed" or self._check_pn is None or largest_acked < self._check_pn:
            return False
        if self.wait_for_report:
            if self._reports_at_check is None:
                self._reports_at_check = self.reports
            if self.reports <= self._reports_at_check:
                return False
        if self.state != "retesting":  # a retry that fails stops nothing that was marking for the connection
            self.failures += 1
            self.retries = 0
        self.state = "failed"
        self._retry_at = None
        self._rearm()  # (the codepoints sent stay: only their arrival, or CE, makes the connection capable again)
        if self._other_cps - self._sent_cps:
            log.debug("ECN validation failed: %d packets sent %s acknowledged and the peer's ECN counts grew in %s "
                      "only: the path changes the codepoint (RFC 9000 §13.4.2.1); sending Not-ECT", self.packets,
                      _cp_names(self._sent_cps), _cp_names(self._other_cps - self._sent_cps))
        else:
            log.debug("ECN validation failed: %d ECT-marked packets acknowledged and no ECN counts with a new marked "
                      "arrival from the peer (%d acks that could carry them); sending Not-ECT", self.packets,
                      self.reports)
        return True

    def on_counts(self, counts: list[int]) -> None:
        """The peer's cumulative counts (Not-ECT, ECT(1), ECT(0), CE), already checked by the session."""
        grown = {cp for cp in (ECT1, ECT0, CE) if counts[cp] > self._counts[cp]}
        self._counts = [max(a, b) for a, b in zip(counts, self._counts, strict=True)]
        if not grown:
            return  # nothing new arrived marked: the packets since the last growth keep counting
        if self._sent_cps and not grown & (self._sent_cps | {CE}):
            # only another ECT codepoint than those sent since: re-marked by the path (or late packets of before)
            self._other_cps |= grown
            return
        if self.state == "failed":
            log.debug("ECN counts with new marked arrivals came after validation failed: marking again")
        elif self.state == "retesting":
            log.debug("ECN retry %d passed: marking again", self.retries)
        self._judge_afresh("capable")

    def retry(self, now: float) -> bool:
        """Called with the time while ``failed``: True when a retry starts now (the connection marks again while it
        is judged). The first call after a failure sets the retry's time, so the caller needs no clock of its own
        at the failure: it asks at every send, and the first send after the failure is when it failed."""
        if self.state != "failed":
            return False
        if self._retry_at is None:
            # (the exponent capped: 2.0 ** 1024 overflows, a connection's 1,024th failed retry after ~6 days)
            self._retry_at = now + min(ECN_RETRY_S * 2.0 ** min(self.retries, _RETRY_DOUBLINGS), ECN_RETRY_MAX_S)
            return False
        if now < self._retry_at:
            return False
        self.retries += 1
        self.state = "retesting"
        self._retry_at = None
        self._rearm()
        return True

    def path_changed(self) -> None:
        """The peer moved to a new path (a NAT rebinding, Wi-Fi to cellular: QUIC connection migration): judged
        afresh from the next packet, in ``testing``, as RFC 9000 §13.4.2 validates ECN per path. A connection that
        failed on a path that cleared the codepoint stayed Not-ECT on a clean one until its retry (30 s, doubling
        to 8 minutes), and one capable on a clean path went on marking on one that clears it until its next check.
        Not a failure or a retry: the counts, the failures and the retries' back-off so far stay."""
        if self.state != "testing":
            log.debug("ECN validation: the peer's path changed; validating afresh (was %s)", self.state)
        self._judge_afresh("testing")

    def _judge_afresh(self, state: str) -> None:
        """Enter ``state`` with no retry due and no codepoints counted: what the next packets show decides."""
        self.state = state
        self._retry_at = None
        self._sent_cps.clear()
        self._other_cps.clear()
        self._rearm()

    def _rearm(self) -> None:
        """Count afresh from the next packet sent."""
        self._ect_sent = 0
        self._check_pn = None
        self._reports_at_check = None


def _cp_names(cps: set[int]) -> str:
    """``{ECT1, ECT0}`` as "ECT(0)/ECT(1)", for the log."""
    return "/".join({ECT0: "ECT(0)", ECT1: "ECT(1)", CE: "CE"}.get(cp, str(cp)) for cp in sorted(cps, reverse=True))


def make_policy(name: str, *, forecaster: LatencyForecaster | None = None, **kwargs) -> MarkingPolicy:
    """Build a policy by name; ``swiftqueue`` needs a forecaster, ``oracle`` a ``queue_delays`` callable."""
    if name == "classic":
        return ClassicPolicy(**kwargs)
    if name == "l4s":
        return L4SPolicy()
    if name == "swiftqueue":
        if forecaster is None:
            raise ValueError("the swiftqueue policy needs a latency forecaster")
        return SwiftQueuePolicy(forecaster, **kwargs)
    if name == "oracle":
        return OraclePolicy(**kwargs)
    raise ValueError(f"unknown marking policy {name!r}; choose from {', '.join(POLICIES)}")
