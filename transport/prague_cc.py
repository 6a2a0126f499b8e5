"""A scalable (DCTCP/Prague-style) congestion controller for aioquic, reacting to CE marks.

A sender that marks ECT(1) enters the L4S queue, whose AQM marks CE early and often (RFC 9331 §4.3): it
must respond in proportion to the marking rate, not halve like Reno, or it would either starve or be
starved. aioquic reads no ECN at all (ACK_ECN counts are discarded), so CE feedback arrives from the
application: the client's ACK datagrams carry cumulative per-codepoint counters, and the session calls
:meth:`PragueCongestionControl.on_ecn_feedback` with the deltas.

Response (DCTCP, RFC 8257 §3.3, with the Prague defaults of L4STeam/udp_prague): per observation window of
one RTT, ``F`` = fraction of packets marked; ``alpha <- (1 - g) * alpha + g * F`` with ``g = 1/16``; if any
mark was seen in the window, ``cwnd <- cwnd * (1 - alpha / 2)`` once per window and slow start ends.
Losses are handled exactly like Reno (the controller subclasses aioquic's). Registered as ``"prague"``.
"""

from __future__ import annotations

from aioquic.quic.congestion.base import K_MINIMUM_WINDOW, register_congestion_control
from aioquic.quic.congestion.reno import RenoCongestionControl

from .classic_ecn_cc import INITIAL_RTT  # (importing it registers "reno-ecn" and "cubic-ecn" too)

G = 1.0 / 16.0


class PragueCongestionControl(RenoCongestionControl):
    def __init__(self, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self.alpha = 0.0
        # smoothed RTT, the observation window's length; the first sample sets it (RFC 6298 §2.2): from a start at
        # 0.1 s, a 1-ms path still had an 88-ms window after its first sample, and CE reactions were ~100x too rare
        self.srtt: float | None = None
        self._window_end = 0.0
        self._window_packets = 0
        self._window_marked = 0
        self._reduced_in_window = False
        self.ce_events = 0
        self.marked_total = 0

    def on_rtt_measurement(self, *, now: float, rtt: float) -> None:
        super().on_rtt_measurement(now=now, rtt=rtt)
        self.srtt = rtt if self.srtt is None else 0.875 * self.srtt + 0.125 * rtt

    def on_ecn_feedback(self, *, now: float, packets: int, marked: int) -> None:
        """``packets`` newly acknowledged (by the application's ack), ``marked`` of them CE."""
        if packets <= 0:
            return
        marked = min(marked, packets)
        self.marked_total += marked
        self._window_packets += packets
        self._window_marked += marked
        if marked and not self._reduced_in_window:
            # react at once to the first mark of the window, with the alpha learned so far (at least 1/16:
            # a first mark after a long clean period must still cut)
            factor = 1.0 - max(self.alpha, G) / 2.0
            self.congestion_window = max(
                int(self.congestion_window * factor), K_MINIMUM_WINDOW * self._max_datagram_size
            )
            self.ssthresh = self.congestion_window
            self._reduced_in_window = True
            self.ce_events += 1
        if now >= self._window_end:
            fraction = self._window_marked / self._window_packets
            self.alpha = (1.0 - G) * self.alpha + G * fraction
            self._window_packets = self._window_marked = 0
            self._reduced_in_window = False
            rtt = self.srtt if self.srtt is not None else INITIAL_RTT  # no sample yet: aioquic's initial RTT
            self._window_end = now + max(rtt, 0.001)

    def get_log_data(self) -> dict:
        data = super().get_log_data()
        data["alpha"] = self.alpha
        return data


register_congestion_control("prague", PragueCongestionControl)
