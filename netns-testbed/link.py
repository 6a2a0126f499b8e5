"""One direction of the emulated path: queue -> trace-driven link -> loss -> one-way delay (sans-I/O).

Delivery model (mahimahi's ``LinkQueue::rationalize``): each trace opportunity may carry 1500 bytes; a packet
that does not fit continues in the next opportunities (bytes carry over) and leaves when its last byte is
sent; opportunities that find the queue empty are wasted. An opportunity at exactly the arrival time of a
packet is used before that packet arrives.

The queue hands its head packet to the link as soon as the link is free (when the previous packet's last
byte left, or at once when a packet reaches an idle link), like a qdisc feeding a one-packet driver ring;
that packet then waits for the next opportunity "in transmission". Departure times are exactly mahimahi's;
what this changes is that AQM decisions and the sojourn time they use exclude the wait for the next
delivery opportunity, as Linux's qdisc sojourn excludes the NIC's transmission. Otherwise a slow fixed-rate
link (one opportunity every 6 ms at 2 Mbit/s) would make DualPI2 step-mark every packet on an idle link.

A packet that left the link is lost with the loss model (stepped in channel time, so every scheme meets the
same outages) or delivered ``delay`` seconds later (mm-delay).

All decisions happen in virtual time computed from the trace, never from when a timer fired: a shell calls
:meth:`Link.enqueue` with the arrival time, :meth:`Link.dequeue_ready` whenever it wakes up, and sleeps until
:meth:`Link.next_event_time`. The same object runs a pure simulation when the caller supplies the times.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .loss import LossModel, NoLoss
from .packet import ecn_of
from .queues import Packet, Queue
from .trace import OPPORTUNITY_BYTES, Trace

RecordSink = Callable[[Packet], None]


UDP = 17


def udp_payload_len(pkt: bytes | bytearray | memoryview) -> int:
    """Bytes of UDP payload in an IPv4 or IPv6 packet (past the IP header, its options and the 8-byte UDP
    header); 0 for anything else (TCP, ICMP, IPv6 with extension headers, a truncated packet)."""
    if len(pkt) < 1:
        return 0
    version = pkt[0] >> 4
    if version == 4 and len(pkt) >= 20 and pkt[9] == UDP:
        header = (pkt[0] & 0x0F) * 4 + 8
    elif version == 6 and len(pkt) >= 48 and pkt[6] == UDP:
        header = 40 + 8
    else:
        return 0
    return max(0, len(pkt) - header)


@dataclass
class LinkStats:
    """Counters of one direction (bytes are IP bytes, except ``arrived_udp_payload_bytes``)."""

    arrived_packets: int = 0
    arrived_bytes: int = 0
    # UDP payload of the arriving IP packets, what a UDP relay counts (the demo's bytes per token on either
    # link); 0 in virtual time, where packets come as sizes, not IP bytes
    arrived_udp_payload_bytes: int = 0
    delivered_packets: int = 0
    delivered_bytes: int = 0
    tail_drops: int = 0
    aqm_drops: int = 0
    lost_packets: int = 0
    ce_marked: int = 0
    by_queue: dict[str, int] = field(default_factory=lambda: {"L": 0, "C": 0})

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


class Link:
    """A unidirectional emulated link; see module docstring for the model.

    ``trace=None`` means unlimited rate (delay and loss only). ``start`` is the virtual time at which the
    trace and the loss model's channel clock begin. ``on_record`` receives every packet once its fate is
    final (delivered, dropped or lost) — the per-packet log.
    """

    def __init__(
        self,
        trace: Trace | None,
        queue: Queue | None = None,
        *,
        delay: float = 0.0,
        loss: LossModel | None = None,
        start: float = 0.0,
        on_record: RecordSink | None = None,
        name: str = "link",
    ) -> None:
        if delay < 0 or math.isnan(delay):
            raise ValueError(f"delay must be >= 0 s, got {delay}")
        self.trace = trace
        self.queue = queue if queue is not None else Queue()
        self.queue.drop_sink = self._on_drop
        self.delay = delay
        self.loss = loss if loss is not None else NoLoss()
        self.start = start
        self.name = name
        self.on_record = on_record
        self.stats = LinkStats()
        self._seq = 0
        self._now = start
        self._opp = 0  # index of the next opportunity of the trace
        self._transit: Packet | None = None  # packet partly sent, bytes carried over
        self._transit_left = 0
        self._delay_line: deque[Packet] = deque()

    # -- time helpers ----------------------------------------------------------------------------------------
    def _opp_time(self, k: int) -> float:
        assert self.trace is not None
        return self.start + self.trace.opportunity_ms(k) / 1000.0

    def restart(self, start: float) -> None:
        """Move the trace origin and loss clock to ``start`` (queued packets stay; used to align runs)."""
        self.start = start
        self._now = max(self._now, start)
        if self.trace is not None:
            self._opp = self.trace.first_index_after((self._now - start) * 1000.0)

    @property
    def backlog(self) -> int:
        """Packets waiting in the queue or partly transmitted."""
        return len(self.queue) + (1 if self._transit is not None else 0)

    # -- input -----------------------------------------------------------------------------------------------
    def enqueue(self, pkt: bytes | Packet, now: float) -> Packet:
        """A packet (IP bytes, or a :class:`Packet` in virtual-time use) reaches the bottleneck at ``now``."""
        if not isinstance(pkt, Packet):
            # (IP bytes only: a Packet's data may be anything, kv_vsim's is the UDP payload itself)
            self.stats.arrived_udp_payload_bytes += udp_payload_len(pkt)
            pkt = Packet(len(pkt), ecn_of(pkt), bytes(pkt))
        self.advance(now)
        now = self._now  # a caller with a stale clock gets the model's time: it never runs backwards
        pkt.seq = self._seq
        self._seq += 1
        pkt.arrival = now
        st = self.stats
        st.arrived_packets += 1
        st.arrived_bytes += pkt.size
        if self.trace is None:
            # unlimited rate: no queueing at all, straight to loss and delay
            pkt.queue = "C" if not pkt.ecn_in & 1 else "L"
            pkt.dequeue = now
            self._depart(pkt, now, now - self.start)
            return pkt
        if self.queue.enqueue(pkt, now) and self._transit is None:
            # opportunities that passed while the link was idle were wasted
            self._opp = max(self._opp, self.trace.first_index_after((now - self.start) * 1000.0))
            self._pull(now)
        return pkt

    # -- the model -------------------------------------------------------------------------------------------
    def advance(self, now: float) -> None:
        """Run every opportunity and queue timer up to and including ``now``, in time order."""
        if now < self._now:
            now = self._now  # time never runs backwards; late callers see the already computed state
        q = self.queue
        while True:
            t_timer = q.next_timer()
            t_opp = math.inf
            if self.trace is not None and (self._transit is not None or len(q)):
                t_opp = self._opp_time(self._opp)
            if t_timer is not None and t_timer <= now and t_timer <= t_opp:
                q.on_timer(t_timer)
                continue
            if t_opp <= now:
                self._opportunity(t_opp, self.trace.opportunity_ms(self._opp))  # type: ignore[union-attr]
                continue
            break
        self._now = now

    def _pull(self, t: float) -> bool:
        """The link is free at ``t``: the queue hands over its next packet (AQM decisions happen now)."""
        pkt = self.queue.dequeue(t)
        if pkt is None:
            return False
        pkt.dequeue = t
        self._transit = pkt
        self._transit_left = pkt.size
        return True

    def _opportunity(self, t: float, t_ms: int) -> None:
        self._opp += 1
        budget = OPPORTUNITY_BYTES
        if self._transit is None and not self._pull(t):
            return
        while budget > 0 and self._transit is not None:
            sent = min(budget, self._transit_left)
            self._transit_left -= sent
            budget -= sent
            if self._transit_left == 0:
                pkt, self._transit = self._transit, None
                # channel time from the integer trace time (mid-millisecond: immune to float rounding)
                self._depart(pkt, t, (t_ms + 0.5) / 1000.0)
                self._pull(t)

    def _depart(self, pkt: Packet, t: float, channel_t: float) -> None:
        pkt.departure = t
        st = self.stats
        if pkt.ecn_out != pkt.ecn_in:
            st.ce_marked += 1
        if pkt.queue in st.by_queue:
            st.by_queue[pkt.queue] += 1
        if self.loss.lost(channel_t):
            pkt.fate = "lost"
            st.lost_packets += 1
            self._record(pkt)
            return
        pkt.delivery = t + self.delay
        self._delay_line.append(pkt)

    def _on_drop(self, pkt: Packet, now: float, reason: str) -> None:
        pkt.fate = reason
        if reason == "drop_tail":
            self.stats.tail_drops += 1
        else:
            pkt.dequeue = now
            self.stats.aqm_drops += 1
        self._record(pkt)

    def _record(self, pkt: Packet) -> None:
        if self.on_record is not None:
            self.on_record(pkt)

    # -- output ----------------------------------------------------------------------------------------------
    def dequeue_ready(self, now: float) -> list[Packet]:
        """Packets whose delivery time is <= ``now``, in delivery order."""
        self.advance(now)
        out: list[Packet] = []
        line = self._delay_line
        st = self.stats
        while line and line[0].delivery <= now:  # type: ignore[operator]
            pkt = line.popleft()
            pkt.fate = "delivered"
            st.delivered_packets += 1
            st.delivered_bytes += pkt.size
            self._record(pkt)
            out.append(pkt)
        return out

    def next_event_time(self) -> float | None:
        """Earliest virtual time at which :meth:`dequeue_ready` may return a packet; None when idle.

        Packets still in the queue can leave no earlier than the next opportunity plus the delay. (The AQM
        may drop them then, in which case the caller simply asks again.)
        """
        t = self._delay_line[0].delivery if self._delay_line else None
        if self.trace is not None and (self._transit is not None or len(self.queue)):
            t_q = max(self._opp_time(self._opp), self._now) + self.delay
            t = t_q if t is None or t_q < t else t
        return t
