"""The classic ECN response (RFC 3168 §6.1.2) for aioquic's Reno and CUBIC: a CE mark counts as a loss.

A sender that marks ECT(0) joins the classic queue of a DualQ AQM (RFC 9332), or any RFC 3168 AQM, which marks CE
where it would have dropped. aioquic reads no ECN (ACK_ECN counts are discarded), so its Reno and CUBIC never saw
those marks: measured, with every packet arriving CE, a ``classic`` (ECT(0)) connection's Reno window grew from
14,853 to 28,231 bytes. Here the session's application-level feedback (the client's cumulative ECN counts, see
``session._SessionBase._ecn_feedback``) calls :meth:`ClassicEcnResponse.on_ecn_feedback`, which answers new CE marks
with the controller's own loss response (Reno halves; CUBIC cuts by its beta and remembers W_max), at most once per
round trip: marks on packets sent before the last reduction (about one smoothed RTT ago, the counts say nothing
more precise) belong to the congestion event already answered, as a loss of such a packet does in aioquic.

Registered as ``"reno-ecn"`` and ``"cubic-ecn"`` (:data:`CLASSIC_ECN` maps the plain names); without CE feedback
they are exactly aioquic's Reno and CUBIC. The scalable response for ECT(1) is :mod:`.prague_cc`'s.
"""

from __future__ import annotations

import math

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.congestion.base import QuicCongestionControl, register_congestion_control
from aioquic.quic.congestion.cubic import CubicCongestionControl
from aioquic.quic.congestion.reno import RenoCongestionControl
from aioquic.quic.packet import QuicPacketType
from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.tls import Epoch

INITIAL_RTT: float = QuicConfiguration.initial_rtt
"""aioquic's initial RTT (0.1 s): the round trip a controller assumes before its first RTT sample."""


class ClassicEcnResponse(QuicCongestionControl):
    """Mixin before a loss-based aioquic controller: CE marks reduce the window as a loss does, once per RTT."""

    _congestion_recovery_start_time: float  # the controller's (Reno's, CUBIC's): when its last reduction began

    def __init__(self, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self.srtt: float | None = None  # smoothed RTT (RFC 6298: the first sample sets it)
        self.ce_events = 0  # window reductions caused by CE marks
        self.marked_total = 0

    def on_rtt_measurement(self, *, now: float, rtt: float) -> None:
        super().on_rtt_measurement(now=now, rtt=rtt)  # type: ignore[safe-super]  # Reno's or CUBIC's (MRO)
        self.srtt = rtt if self.srtt is None else 0.875 * self.srtt + 0.125 * rtt

    def on_ecn_feedback(self, *, now: float, packets: int, marked: int) -> None:
        """``packets`` newly reported by the peer's ECN counts, ``marked`` of them CE."""
        if packets <= 0 or marked <= 0:
            return
        self.marked_total += min(marked, packets)
        start = self._congestion_recovery_start_time  # 0.0: no reduction yet (or reset by persistent congestion)
        rtt = self.srtt if self.srtt is not None else INITIAL_RTT
        if start > 0.0 and now - rtt <= start:
            return  # the marked packets left before the last reduction: the same congestion event
        # the controller's own loss response, for a zero-byte stand-in packet sent after its recovery period began
        # (zero bytes: nothing leaves bytes_in_flight, which the real packets' acks account for)
        self.on_packets_lost(now=now, packets=[_ce_marked(math.inf)])
        self.ce_events += 1

    def get_log_data(self) -> dict:
        data = super().get_log_data()
        data["ce_events"] = self.ce_events
        return data


def _ce_marked(sent_time: float) -> QuicSentPacket:
    return QuicSentPacket(epoch=Epoch.ONE_RTT, in_flight=False, is_ack_eliciting=False, is_crypto_packet=False,
                          packet_number=-1, packet_type=QuicPacketType.ONE_RTT, sent_time=sent_time, sent_bytes=0)


class RenoEcnCongestionControl(ClassicEcnResponse, RenoCongestionControl):
    """aioquic's New Reno, halving on CE as on a loss (RFC 3168 §6.1.2)."""


class CubicEcnCongestionControl(ClassicEcnResponse, CubicCongestionControl):
    """aioquic's CUBIC, reducing on CE as on a loss (RFC 9438 §4.6 / RFC 3168 §6.1.2)."""


CLASSIC_ECN = {"reno": "reno-ecn", "cubic": "cubic-ecn"}
"""The ECN-reading variant of each loss-based controller: what an ECT(0) sender runs instead."""

register_congestion_control("reno-ecn", RenoEcnCongestionControl)
register_congestion_control("cubic-ecn", CubicEcnCongestionControl)
