"""One-way delay from ACK timestamps when the two ends' clocks may disagree (sans-I/O).

An ACK echoes the packet's send time on the server's clock (``e``) and adds its receive time on the client's
clock (``g``), so ``g - e`` is the one-way delay plus the offset between the two clocks. In the testbed both
ends share one clock and the offset is 0; across the Internet it is whatever the two hosts' clocks say (NTP:
about a millisecond; a phone without it: seconds, either sign), and SwiftQueue's features (log latency over
the window's level, latency over the queue's base) are meaningless on a shifted scale.

Like LEDBAT's base delay (RFC 6817, 3.4.2) this keeps the minimum of ``g - e`` over recent minutes: the
least-queued packet's delay plus the offset. A sample's queueing is its excess over that base. The base
itself stands for the path's propagation delay when it is plausible as one, between 0 and the smallest
round trip of the same window (a one-way delay cannot exceed the round trip it is part of); then the samples
are returned as measured, unchanged. When it is not (the clocks disagree by more than that), half the
smallest round trip stands in for it, exact on a symmetric path. (An offset that crosses that boundary, an
NTP step, moves the samples by at most half a round trip.) Minute buckets let the base follow a route change
and a clock drift: a drift that raises the offset lags by up to the window (5 minutes here, half RFC 6817's
10: a quartz clock's 20 ppm is 1.2 ms a minute, so up to 6 ms); one that lowers it is followed at once.
"""

from __future__ import annotations

from collections import deque

BUCKET_S = 60.0  # per-minute minima, as RFC 6817 ...
BUCKETS = 5  # ... over the last 5 minutes (RFC 6817: 10): the lag behind a drifting offset


class OneWayDelay:
    """Turns ``(sent_at, ack_at, raw_ms)`` (raw: receiver minus sender timestamp) into a one-way delay on the
    sender's scale; ``offset_corrected`` says whether the clocks disagreed by more than a round trip.

    The smallest raw delay and the smallest round trip are kept in the same buckets and expire together: on
    one clock the window's raw minimum is then never above its round-trip minimum (each packet's one-way
    delay is part of its own round trip), so samples on one clock are always returned as measured, a
    standing queue included (a round-trip minimum kept for ever made a queue that stood 5 minutes look like
    an offset, and hid it)."""

    def __init__(self) -> None:
        self._buckets: deque[list[float]] = deque()  # [bucket start, min raw ms, min RTT ms]
        self.offset_corrected = False

    def _minima(self) -> tuple[float, float]:
        return min(b[1] for b in self._buckets), min(b[2] for b in self._buckets)

    def latency_ms(self, sent_at: float, ack_at: float, raw_ms: float) -> float:
        """One sample's one-way delay (ms). ``sent_at``/``ack_at``: sender clock (s)."""
        rtt_ms = max(0.0, (ack_at - sent_at) * 1000.0)
        while self._buckets and ack_at - self._buckets[0][0] >= BUCKETS * BUCKET_S:
            self._buckets.popleft()  # by age, not count: a connection idle for an hour keeps no old minima
        if not self._buckets or ack_at - self._buckets[-1][0] >= BUCKET_S:
            self._buckets.append([ack_at, raw_ms, rtt_ms])
        else:
            last = self._buckets[-1]
            last[1], last[2] = min(last[1], raw_ms), min(last[2], rtt_ms)
        base, min_rtt = self._minima()
        self.offset_corrected = not 0.0 <= base <= min_rtt
        if not self.offset_corrected:
            return raw_ms  # one clock, or two that agree within a round trip: as measured
        return raw_ms - base + min_rtt / 2.0
