"""Virtual-time traffic through a :class:`~tokenwire.testbed.link.Link`: simple senders and an event loop.

The emulator core is tested (and later issues generate latency training data) without sockets: these flows
send :class:`Packet` objects with sizes and ECN codepoints only, receive per-packet acknowledgements after a
fixed return delay, and react the way their congestion controllers would. They are models, deliberately
small, not TCP implementations:

* :class:`RenoFlow` — classic AIMD (RFC 5681 congestion avoidance; halve once per round trip on a loss or,
  when ECN-capable, on CE as RFC 3168 asks).
* :class:`ScalableFlow` — DCTCP-style scalable control (RFC 8257: ``alpha <- (1-g)*alpha + g*F``
  per round trip with g = 1/16, ``cwnd <- cwnd*(1 - alpha/2)`` on marks), marked ECT(1) as L4S senders are
  (RFC 9331); the behaviour L4S expects from Prague-like senders.
* :class:`CbrFlow` — unresponsive constant bit rate.

Losses are detected when a packet sent later is acknowledged (a three-packet reordering window) or on a
retransmission timeout; lost data is not resent (these are bulk flows whose bytes are interchangeable).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from .link import Link
from .packet import CE, ECT1, NOT_ECT
from .queues import Packet

MSS = 1500
MAX_VIRTUAL_S = 3600.0
"""The longest virtual run a command takes (``sim``'s cap, ``predictor collect --seconds``): an hour of virtual
time is minutes of CPU; ``collect --seconds 1e300`` was accepted and would have run until killed."""
MIN_ONOFF_MS = 1.0
"""The shortest ON_MS (and nonzero OFF_MS) of an on/off cross flow in virtual time: each period is an event, and
shorter ones only stall a run (``tokenwire sim``'s ``onoff-ect1:...:0.000001:0.000001`` ran for ever without a packet;
``testbed swiftqueue --virtual``'s ``tcp-onoff:1e-300:0`` added flows without end)."""


@dataclass
class FlowStats:
    sent: int = 0
    acked: int = 0
    ce_acked: int = 0
    lost: int = 0


class Flow:
    """Base class: owns a window, sends into the simulation, handles acks and losses."""

    def __init__(self, *, ecn: int = NOT_ECT, ack_delay: float = 0.02, start: float = 0.0,
                 stop: float = math.inf, size: int = MSS, name: str | None = None) -> None:
        self.ecn = ecn
        self.ack_delay = ack_delay
        self.start = start
        self.stop = stop
        self.size = size
        self.name = name or type(self).__name__
        self.stats = FlowStats()
        self.sim: Simulation | None = None
        self.fid = -1
        self.cwnd = 2.0
        self.ssthresh = math.inf
        self._next_seq = 0
        self._inflight: dict[int, float] = {}  # seq -> send time
        self._highest_acked = -1
        self._recover_until = -1  # no further reduction until a packet sent after this seq is acked
        self.srtt: float | None = None
        self._rto_timer: int | None = None

    # -- sending ---------------------------------------------------------------------------------------------
    def on_start(self, now: float) -> None:
        self._fill(now)

    def _fill(self, now: float) -> None:
        if now >= self.stop:
            return
        while len(self._inflight) < int(self.cwnd):
            self._send(now)
        self._arm_rto(now)

    def _send(self, now: float) -> None:
        assert self.sim is not None
        seq = self._next_seq
        self._next_seq += 1
        self._inflight[seq] = now
        self.stats.sent += 1
        self.sim.send(self, Packet(self.size, self.ecn, meta=(self.fid, seq, now)), now)

    def _arm_rto(self, now: float) -> None:
        assert self.sim is not None
        if self._inflight and self._rto_timer is None:
            rto = max(0.2, 2.0 * (self.srtt or 0.1))
            self._rto_timer = self.sim.call_at(now + rto, self._on_rto)

    def _on_rto(self, now: float) -> None:
        self._rto_timer = None
        if not self._inflight:
            return
        self.stats.lost += len(self._inflight)
        self._inflight.clear()
        self.ssthresh = max(self.cwnd / 2, 2.0)
        self.cwnd = 1.0
        self._recover_until = self._next_seq - 1
        self._fill(now)

    # -- feedback --------------------------------------------------------------------------------------------
    def on_ack(self, seq: int, sent: float, ce: bool, now: float) -> None:
        if self._inflight.pop(seq, None) is None:
            return  # already declared lost
        st = self.stats
        st.acked += 1
        st.ce_acked += ce
        rtt = now - sent
        self.srtt = rtt if self.srtt is None else 0.875 * self.srtt + 0.125 * rtt
        self._highest_acked = max(self._highest_acked, seq)
        lost = []
        for s in self._inflight:  # insertion order is sequence order
            if s >= seq - 3:
                break
            lost.append(s)
        for s in lost:
            del self._inflight[s]
        st.lost += len(lost)
        self.on_feedback(seq, ce, bool(lost), now)
        if self._rto_timer is not None and self.sim is not None:
            self.sim.cancel(self._rto_timer)
            self._rto_timer = None
        self._fill(now)

    def _congestion_event(self, seq: int) -> bool:
        """True at most once per round trip (no reduction while recovering from the previous one)."""
        if seq <= self._recover_until:
            return False
        self._recover_until = self._next_seq - 1
        return True

    def on_feedback(self, seq: int, ce: bool, lost: bool, now: float) -> None:  # pragma: no cover
        raise NotImplementedError


class RenoFlow(Flow):
    """Classic AIMD window (slow start, +1 MSS per RTT, halve on loss or on CE if ECN-capable)."""

    def on_feedback(self, seq: int, ce: bool, lost: bool, now: float) -> None:
        if lost or (ce and self.ecn != NOT_ECT):
            if self._congestion_event(seq):
                self.ssthresh = max(self.cwnd / 2, 2.0)
                self.cwnd = self.ssthresh
            return
        if self.cwnd < self.ssthresh:
            self.cwnd += 1.0
        else:
            self.cwnd += 1.0 / self.cwnd


class ScalableFlow(Flow):
    """DCTCP/Prague-like scalable window, ECT(1) by default (see module docstring)."""

    g = 1.0 / 16

    def __init__(self, **kw: object) -> None:
        kw.setdefault("ecn", ECT1)
        super().__init__(**kw)  # type: ignore[arg-type]
        self.alpha = 1.0
        self._win_end = -1
        self._win_acked = 0
        self._win_marked = 0

    def on_feedback(self, seq: int, ce: bool, lost: bool, now: float) -> None:
        self._win_acked += 1
        self._win_marked += ce
        if seq > self._win_end:  # one observation window (about one RTT) ended
            frac = self._win_marked / max(self._win_acked, 1)
            self.alpha = (1 - self.g) * self.alpha + self.g * frac
            self._win_acked = self._win_marked = 0
            self._win_end = self._next_seq - 1
        if lost:
            if self._congestion_event(seq):
                self.ssthresh = max(self.cwnd / 2, 2.0)
                self.cwnd = self.ssthresh
            return
        if ce:
            if self._congestion_event(seq):
                self.ssthresh = max(self.cwnd * (1 - self.alpha / 2), 2.0)
                self.cwnd = self.ssthresh
            return
        if self.cwnd < self.ssthresh:
            self.cwnd += 1.0
        else:
            self.cwnd += 1.0 / self.cwnd


class CbrFlow(Flow):
    """Unresponsive sender at a constant bit rate (acks only counted).

    It keeps nothing per packet: an ack is counted as it comes, and a packet the bottleneck dropped is never
    heard of again (no loss detection, no timeout). Its :attr:`_inflight` entries were removed by acks only, so a
    long run through a slow link kept one for every drop to its end (``predictor collect``, ``testbed swiftqueue
    --virtual`` with CBR cross traffic)."""

    def __init__(self, rate_bps: float, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        if rate_bps <= 0:
            raise ValueError("rate_bps must be > 0")
        self.interval = self.size * 8 / rate_bps

    def on_start(self, now: float) -> None:
        self._tick(now)

    def _tick(self, now: float) -> None:
        if now >= self.stop or self.sim is None:
            return
        self._send(now)
        self.sim.call_at(now + self.interval, self._tick)

    def _send(self, now: float) -> None:
        assert self.sim is not None
        seq = self._next_seq
        self._next_seq += 1
        self.stats.sent += 1
        self.sim.send(self, Packet(self.size, self.ecn, meta=(self.fid, seq, now)), now)

    def on_ack(self, seq: int, sent: float, ce: bool, now: float) -> None:
        self.stats.acked += 1  # (the link delivers a packet once: each ack is of a packet not yet counted)
        self.stats.ce_acked += ce

    def _arm_rto(self, now: float) -> None:
        pass


class Simulation:
    """Discrete-event loop moving flows' packets through one bottleneck link and acks back."""

    def __init__(self, link: Link, *, keep: Callable[[Packet], bool] | None = None) -> None:
        """``keep`` picks the packets :attr:`records` holds (default: all of them). A caller that reads only a few
        flows' packets passes it: every packet of a run, cross traffic included, was held until the end (about 2
        MB per virtual second at 100 Mbit/s, gigabytes for a long run), though ``predictor collect`` reads only
        its probe's. The link's own ``on_record`` still sees every packet."""
        self.link = link
        self.flows: list[Flow] = []
        self.records: list[Packet] = []
        self.keep = keep
        self._events: list[tuple[float, int, Callable[[float], None]]] = []
        self._ids = itertools.count()
        self._cancelled: set[int] = set()
        self.now = link.start
        prev = link.on_record

        def record(pkt: Packet) -> None:
            if self.keep is None or self.keep(pkt):
                self.records.append(pkt)
            if prev is not None:
                prev(pkt)

        link.on_record = record

    def add(self, flow: Flow) -> Flow:
        flow.sim = self
        flow.fid = len(self.flows)
        self.flows.append(flow)
        self.call_at(flow.start, flow.on_start)
        return flow

    def call_at(self, t: float, fn: Callable[[float], None]) -> int:
        eid = next(self._ids)
        heapq.heappush(self._events, (t, eid, fn))
        return eid

    def cancel(self, eid: int) -> None:
        self._cancelled.add(eid)

    def send(self, flow: Flow, pkt: Packet, now: float) -> None:
        self.link.enqueue(pkt, now)

    def _deliver(self, pkt: Packet) -> None:
        fid, seq, sent = cast("tuple[int, int, float]", pkt.meta)  # (fid, seq, sent at): as every flow sends
        flow = self.flows[fid]
        ce = pkt.ecn_out == CE
        assert pkt.delivery is not None
        self.call_at(pkt.delivery + flow.ack_delay, lambda now: flow.on_ack(seq, sent, ce, now))

    def run(self, until: float) -> None:
        """Process events up to virtual time ``until``."""
        link = self.link
        while True:
            t_link = link.next_event_time()
            t_ev = self._events[0][0] if self._events else math.inf
            t = min(t_ev, t_link if t_link is not None else math.inf)
            if t > until:
                break
            self.now = t
            for pkt in link.dequeue_ready(t):
                self._deliver(pkt)
            while self._events and self._events[0][0] <= t:
                _, eid, fn = heapq.heappop(self._events)
                if eid in self._cancelled:
                    self._cancelled.discard(eid)
                    continue
                fn(t)
        link.advance(until)
        self.now = until
