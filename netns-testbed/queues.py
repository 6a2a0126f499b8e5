"""Bottleneck queues of the link emulator: infinite, drop-tail and DualPI2, driven by explicit ``now``.

Spec syntax (``--queue``)::

    infinite
    droptail:packets=N            drop arrivals once N packets are queued
    droptail:bytes=N              ... once N bytes are queued, N >= 1500 (both limits may be given)
    dualpi2[:key=value,...]       RFC 9332 DualQ Coupled AQM with the Linux 6.18 defaults

DualPI2 keys (defaults from ``dualpi2_reset_default()`` in Linux 6.18 ``net/sched/sch_dualpi2.c`` and
``tc-dualpi2(8)``): ``target=15ms tupdate=16ms alpha=0.16 beta=3.2 k=2 step=1ms c_protection=10
limit=10000 drop_overload=1 seed=0``. Durations accept ``ms``/``us``/``s`` suffixes.

The queues never look at a clock: every call carries the virtual time ``now`` in seconds, the PI controller
runs from :meth:`Queue.next_timer`/:meth:`Queue.on_timer`, and random decisions come from a seeded RNG, so a
run is reproducible bit for bit.
"""

from __future__ import annotations

import math
import random
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .packet import CE, NOT_ECT, set_ce

MTU = 1500


class QueueSpecError(ValueError):
    """A queue specification that cannot be parsed; the message says what is wrong."""


class Packet:
    """One packet inside the emulator, with everything the per-packet log reports.

    ``data`` is the IP packet (``None`` when the core runs in pure virtual time with sizes only). Times are
    virtual seconds; ``None`` means "did not happen".
    """

    __slots__ = (
        "arrival",
        "data",
        "delivery",
        "departure",
        "dequeue",
        "ecn_in",
        "ecn_out",
        "fate",
        "meta",
        "queue",
        "seq",
        "size",
        "step_ok",
    )

    def __init__(self, size: int, ecn: int, data: bytes | None = None, meta: object = None) -> None:
        self.data = data
        self.size = size
        self.ecn_in = ecn
        self.ecn_out = ecn
        self.meta = meta
        self.seq = -1
        self.arrival = 0.0
        self.dequeue: float | None = None
        self.departure: float | None = None
        self.delivery: float | None = None
        self.queue = "-"
        self.fate = "queued"
        self.step_ok = True

    def mark_ce(self) -> bool:
        """Set CE (rewriting the bytes and IPv4 checksum when present); False for Not-ECT packets."""
        if self.ecn_out == NOT_ECT:
            return False
        if self.ecn_out != CE:
            self.ecn_out = CE
            if self.data is not None:
                self.data = set_ce(self.data)
        return True

    @property
    def sojourn(self) -> float | None:
        """Time from arrival to the start of transmission (queueing delay), seconds."""
        return None if self.dequeue is None else self.dequeue - self.arrival

    def __repr__(self) -> str:
        return f"Packet(seq={self.seq}, size={self.size}, q={self.queue}, fate={self.fate})"


DropSink = Callable[[Packet, float, str], None]


def _ignore_drop(pkt: Packet, now: float, reason: str) -> None:
    pass


class Queue:
    """Interface every bottleneck queue implements (FIFO by default, no limit)."""

    spec = "infinite"

    def __init__(self) -> None:
        self._q: deque[Packet] = deque()
        self.backlog_bytes = 0
        self.drop_sink: DropSink = _ignore_drop

    def __len__(self) -> int:
        return len(self._q)

    def enqueue(self, pkt: Packet, now: float) -> bool:
        """Add ``pkt`` arriving at ``now``; False (and ``pkt.fate`` set) when it was dropped instead."""
        pkt.queue = "C"
        self._q.append(pkt)
        self.backlog_bytes += pkt.size
        return True

    def dequeue(self, now: float) -> Packet | None:
        """The packet to transmit at ``now`` (dropping on the way whatever the AQM decides), or None."""
        if not self._q:
            return None
        pkt = self._q.popleft()
        self.backlog_bytes -= pkt.size
        return pkt

    def next_timer(self) -> float | None:
        """Virtual time of the next internal timer (the PI update), None when none is pending."""
        return None

    def on_timer(self, now: float) -> None:
        """Run the timer due at ``now``."""


class DropTail(Queue):
    """FIFO that drops arrivals beyond a packet and/or byte limit (mahimahi's ``droptail``)."""

    def __init__(self, packets: int | None = None, bytes_: int | None = None) -> None:
        super().__init__()
        if packets is None and bytes_ is None:
            raise QueueSpecError("droptail needs packets=N or bytes=N")
        self.max_packets = packets
        self.max_bytes = bytes_
        parts = ([f"packets={packets}"] if packets is not None else []) + (
            [f"bytes={bytes_}"] if bytes_ is not None else []
        )
        self.spec = "droptail:" + ",".join(parts)

    def enqueue(self, pkt: Packet, now: float) -> bool:
        if (self.max_packets is not None and len(self._q) + 1 > self.max_packets) or (
            self.max_bytes is not None and self.backlog_bytes + pkt.size > self.max_bytes
        ):
            pkt.queue = "C"
            self.drop_sink(pkt, now, "drop_tail")
            return False
        return super().enqueue(pkt, now)


@dataclass
class DualPI2Params:
    """DualPI2 parameters; defaults are Linux 6.18's (see module docstring)."""

    target: float = 0.015  # s, classic queue delay target
    tupdate: float = 0.016  # s, PI update interval
    alpha: float = 0.16  # Hz, integral gain (41/256 in Linux)
    beta: float = 3.2  # Hz, proportional gain (819/256 in Linux)
    k: float = 2.0  # coupling factor: p_L = k * p'
    step: float = 0.001  # s, L-queue step marking threshold on sojourn time
    c_protection: int = 10  # %, WRR weight of the classic queue
    limit: int = 10_000  # packets over both queues
    drop_overload: bool = True  # on overload drop L packets classically instead of marking them all
    seed: int = 0


class DualPI2(Queue):
    """DualQ Coupled AQM (RFC 9332) modelled on Linux ``sch_dualpi2`` (6.18), in virtual time.

    * Classification (RFC 9331): ECT(1) and CE go to the L queue, ECT(0) and Not-ECT to the C queue.
    * A PI controller updates the base probability ``p'`` every ``tupdate`` from the larger head-of-line
      sojourn of the two queues: ``p' += alpha*(qdelay - target) + beta*(qdelay - qdelay_prev)``, clamped to
      [0, 1] (RFC 9332 Appendix A pseudocode; Linux uses the larger of the L and C head delays).
    * At dequeue (Linux default ``drop_dequeue``), and only while at least 2 MTU stay backlogged: a C packet
      is marked (ECN) or dropped (Not-ECT) with ``p_C = p'^2`` (two independent rolls); an L packet is marked
      with the coupled ``p_CL = k*p'``. When ``k*p' > 1`` the queue is overloaded and L packets are treated
      like classic ones (dropped with ``p'^2``, Linux ``drop_on_overload``), protecting latency.
    * L packets whose sojourn exceeds ``step`` (1 ms) are CE-marked by the native step AQM (Not-ECT ones in
      L are dropped).
    * Scheduling: a WRR credit between the queues gives L priority but lets C have ``c_protection`` % of the
      bytes under contention (Linux: credit starts at MTU*(wc-wl), +wc*len per L packet sent while C waits,
      -wl*len per C packet sent while L waits; L is served while the credit is <= 0).
    """

    def __init__(self, params: DualPI2Params | None = None) -> None:
        super().__init__()
        self.p = params or DualPI2Params()
        if self.p.k <= 0 or self.p.tupdate <= 0 or not 0 <= self.p.c_protection <= 100 or self.p.limit < 1:
            raise QueueSpecError(f"dualpi2: invalid parameters {self.p}")
        self._l: deque[Packet] = deque()  # self._q is the C queue
        self._rng = random.Random(f"dualpi2:{self.p.seed}")
        self.prob = 0.0  # the base probability p'
        self.l_bytes = 0  # bytes waiting in the L queue (the rest of backlog_bytes is in C)
        self._last_qdelay = 0.0
        self._wc = self.p.c_protection
        self._wl = 100 - self.p.c_protection
        self._credit_init = MTU * (self._wc - self._wl)
        self._credit = self._credit_init
        self._next_update: float | None = None
        self._origin: float | None = None
        # statistics
        self.packets_in_l = 0
        self.packets_in_c = 0
        self.pi_marks = 0
        self.step_marks = 0
        self.aqm_drops = 0
        self.tail_drops = 0
        self.spec = "dualpi2"

    def __len__(self) -> int:
        return len(self._q) + len(self._l)

    @property
    def l_len(self) -> int:
        return len(self._l)

    @property
    def c_len(self) -> int:
        return len(self._q)

    # -- enqueue -------------------------------------------------------------------------------------------
    def enqueue(self, pkt: Packet, now: float) -> bool:
        if self._origin is None:
            self._origin = now
            self._next_update = now + self.p.tupdate
        elif self._next_update is None:
            # the controller was idle at p' = 0 (see next_timer); resume on the original tick grid
            ticks = int((now - self._origin) / self.p.tupdate) + 1
            self._next_update = self._origin + ticks * self.p.tupdate
        is_l = bool(pkt.ecn_in & 0b01)
        pkt.queue = "L" if is_l else "C"
        if len(self) + 1 > self.p.limit:
            self.tail_drops += 1
            self.drop_sink(pkt, now, "drop_tail")
            return False
        if is_l:
            self._l.append(pkt)
            self.l_bytes += pkt.size
            self.packets_in_l += 1
        else:
            self._q.append(pkt)
            self.packets_in_c += 1
        self.backlog_bytes += pkt.size
        return True

    # -- PI controller -------------------------------------------------------------------------------------
    def next_timer(self) -> float | None:
        return self._next_update

    def head_age(self, now: float, *, l_queue: bool) -> float:
        """How long the head packet of the L (or C) queue has waited so far; 0 when that queue is empty."""
        q = self._l if l_queue else self._q
        return now - q[0].arrival if q else 0.0

    def _head_delay(self, now: float) -> float:
        dl = now - self._l[0].arrival if self._l else 0.0
        dc = now - self._q[0].arrival if self._q else 0.0
        return max(dl, dc)

    def on_timer(self, now: float) -> None:
        qdelay = self._head_delay(now)
        p = self.prob + self.p.alpha * (qdelay - self.p.target) + self.p.beta * (qdelay - self._last_qdelay)
        self._last_qdelay = qdelay
        p = min(max(p, 0.0), 1.0)
        if not self.p.drop_overload:
            p = min(p, 1.0 / self.p.k)
        self.prob = p
        if p == 0.0 and qdelay == 0.0 and not self._l and not self._q:
            # idle with nothing to decay: later ticks would change nothing until the next arrival
            self._next_update = None
        else:
            assert self._next_update is not None
            self._next_update += self.p.tupdate

    # -- dequeue -------------------------------------------------------------------------------------------
    def _roll(self, prob: float) -> bool:
        return self._rng.random() < prob

    def _must_drop(self, pkt: Packet) -> bool:
        """PI-based mark/drop decision (Linux ``must_drop``); marks in place, True means drop."""
        if self.backlog_bytes < 2 * MTU:
            return False
        p = self.prob
        p_l = p * self.p.k
        overload = p_l > 1.0
        if pkt.queue == "C":
            if self._roll(p) and self._roll(p):
                if overload or pkt.ecn_out == NOT_ECT:
                    return True
                if pkt.mark_ce():
                    self.pi_marks += 1
            return False
        if overload:
            if self.p.drop_overload and self._roll(p) and self._roll(p):
                return True
            if pkt.mark_ce():
                self.pi_marks += 1
            return False
        if self._roll(p_l):
            if pkt.ecn_out == NOT_ECT:
                return True
            if pkt.mark_ce():
                self.pi_marks += 1
        return False

    def dequeue(self, now: float) -> Packet | None:
        while True:
            c_len = len(self._q)
            if self._l and (not c_len or self._credit <= 0):
                pkt = self._l.popleft()
                self.l_bytes -= pkt.size
                credit_change = self._wc if c_len else 0
            elif c_len:
                pkt = self._q.popleft()
                credit_change = -self._wl if self._l else 0
            else:
                self._credit = self._credit_init
                return None
            self.backlog_bytes -= pkt.size
            if self._must_drop(pkt):
                self.aqm_drops += 1
                self.drop_sink(pkt, now, "drop_aqm")
                continue
            if pkt.queue == "L" and pkt.step_ok and now - pkt.arrival > self.p.step:
                if not pkt.mark_ce():
                    self.aqm_drops += 1
                    self.drop_sink(pkt, now, "drop_step")
                    continue
                self.step_marks += 1
            self._credit += credit_change * pkt.size
            return pkt


_DURATION_RE = re.compile(r"^\s*((?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)(?:e[+-]?[0-9]+)?)\s*(us|ms|s)?\s*$", re.I)


def _duration(text: str, key: str, spec: str) -> float:
    m = _DURATION_RE.match(text)
    if not m:
        raise QueueSpecError(f"queue spec {spec!r}: {key}={text!r} is not a duration like 15ms")
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, None: 1e-3}[(m.group(2) or "").lower() or None]
    value = float(m.group(1)) * scale
    if not math.isfinite(value):  # "1e999ms": tupdate=inf never updated p, target=inf and step=inf never marked
        raise QueueSpecError(f"queue spec {spec!r}: {key}={text!r} is not a finite duration")
    return value


def _number(text: str, key: str, spec: str, kind: type = float) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise QueueSpecError(f"queue spec {spec!r}: {key}={text!r} is not a {kind.__name__}") from None
    if not math.isfinite(value):  # nan compares false with every bound: alpha=nan silently disabled the AQM
        raise QueueSpecError(f"queue spec {spec!r}: {key}={text!r} is not a finite number")
    if value < 0:
        raise QueueSpecError(f"queue spec {spec!r}: {key} must not be negative")
    return value


def _pairs(args: str, spec: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise QueueSpecError(f"queue spec {spec!r}: expected key=value, got {item!r}")
        out[key.strip().lower()] = value.strip()
    return out


def parse_queue(spec: str, seed: int = 0) -> Queue:
    """Build a queue from its spec (see module docstring); raises :class:`QueueSpecError`."""
    text = spec.strip()
    kind, _, args = text.partition(":")
    kind = kind.lower()
    kv = _pairs(args, spec)
    if kind in ("infinite", "fifo", "none"):
        if kv:
            raise QueueSpecError(f"queue spec {spec!r}: infinite takes no arguments")
        return Queue()
    if kind == "droptail":
        unknown = set(kv) - {"packets", "bytes"}
        if unknown:
            raise QueueSpecError(f"queue spec {spec!r}: unknown droptail key(s) {sorted(unknown)}")
        packets = int(_number(kv["packets"], "packets", spec, int)) if "packets" in kv else None
        nbytes = int(_number(kv["bytes"], "bytes", spec, int)) if "bytes" in kv else None
        if packets is None and nbytes is None:
            raise QueueSpecError(f"queue spec {spec!r}: droptail needs packets=N or bytes=N")
        if packets == 0 or nbytes == 0:
            raise QueueSpecError(f"queue spec {spec!r}: a zero limit would drop everything")
        if nbytes is not None and nbytes < MTU:
            # bytes=100 was taken, and every 1228-byte QUIC packet was tail-dropped: runs failed ~30 s later
            raise QueueSpecError(f"queue spec {spec!r}: bytes={nbytes} is below one {MTU}-byte packet and would "
                                 f"drop every full-size packet (bytes must be >= {MTU})")
        return DropTail(packets, nbytes)
    if kind == "dualpi2":
        p = DualPI2Params(seed=seed)
        for key, value in kv.items():
            if key in ("target", "tupdate", "step"):
                setattr(p, key, _duration(value, key, spec))
            elif key in ("alpha", "beta", "k"):
                setattr(p, key, _number(value, key, spec))
            elif key in ("c_protection", "limit", "seed"):
                setattr(p, key, int(_number(value, key, spec, int)))
            elif key == "drop_overload":
                if value not in ("0", "1"):
                    raise QueueSpecError(f"queue spec {spec!r}: drop_overload is 0 or 1")
                p.drop_overload = value == "1"
            else:
                raise QueueSpecError(f"queue spec {spec!r}: unknown dualpi2 key {key!r}")
        if p.tupdate <= 0 or p.k <= 0 or p.limit < 1 or p.c_protection > 100:
            raise QueueSpecError(
                f"queue spec {spec!r}: tupdate and k must be > 0, limit >= 1, c_protection <= 100"
            )
        q = DualPI2(p)
        q.spec = text
        return q
    raise QueueSpecError(f"queue spec {spec!r}: unknown queue {kind!r} (use infinite, droptail or dualpi2)")
