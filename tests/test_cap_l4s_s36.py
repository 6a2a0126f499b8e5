"""The congestion cap of Chatterbox's repeats (chatterbox.CONGESTED_REPEATS) on L4S paths: an L queue's CE marks alone
do not cap (server_session.ServerSession._note_ce, chatterbox.L4S_CE_WINDOW_SHARE), and the virtual SwiftQueue model
(testbed swiftqueue_eval.MarkedPacedFlow) caps as the real sender does."""

from __future__ import annotations

import math
from typing import Any

import pytest

from tests.quicpair import Pair, set_rtt
from tokenwire.testbed import swiftqueue_eval as se
from tokenwire.testbed.swiftqueue_eval import MarkedPacedFlow, SwiftQueueConfig
from tokenwire.transport.chatterbox import (
    CONGESTED_REPEATS,
    L4S_CE_WINDOW_SHARE,
    QUEUE_DELAY_S,
    QUEUE_DELAY_SHARE,
)
from tokenwire.transport.ecn_socket import ECT0, ECT1, NOT_ECT
from tokenwire.transport.frames import Ack, Request
from tokenwire.transport.marking import L4SPolicy
from tokenwire.transport.server_session import ServerSession


# ------------------------------------------------------------------------------------------------ the real session
def _chat() -> tuple[Pair, ServerSession, int, int]:
    """A connection with a Chatterbox answer under way: (pair, server, stream id, a sent packet's send time in us)."""
    pair = Pair()
    pair.exchange(rounds=40)
    sid = pair.client.start_request(Request(messages=[{"role": "user", "content": "x"}], scheme="chatterbox"),
                                    pair.now)
    pair.exchange(rounds=20)
    server = pair.server
    assert server is not None
    server.accept(sid)
    server.push(sid, "hello ", pair.now)
    server.datagrams_to_send(pair.now)
    sender = server.requests[sid].sender
    assert sender is not None and sender.sent_meta
    server.datagrams_sent = 1000  # the ECN counts below stay within what was "sent"
    return pair, server, sid, next(reversed(sender.sent_meta))


def _path(server: ServerSession, *, srtt: float = 0.050, floor: float = 0.040, in_flight: int = 0,
          cwnd: int = 12000) -> None:
    """aioquic's view of the path: no queue to speak of (10 ms over a 40-ms minimum), the window as given."""
    set_rtt(server, srtt=srtt, floor=floor)
    cc = server.quic._loss._cc
    cc.bytes_in_flight, cc.congestion_window = in_flight, cwnd


def _ack_with_ce(server: ServerSession, sid: int, echo_us: int | None, codepoint: int, now: float) -> None:
    """An ack reporting one new CE mark; the packet it echoes left with ``codepoint``."""
    sender = server.requests[sid].sender
    assert sender is not None
    if echo_us is not None:
        sender.sent_meta[echo_us] = (100, codepoint)
    server._on_datagram(Ack(sid, 0, echo_us, None, [0, 10, 0, 0]), now - 0.001)
    server._on_datagram(Ack(sid, 0, echo_us, None, [0, 19, 0, 1]), now)


def test_an_l_queue_mark_does_not_cap_the_repeats_of_a_flow_whose_window_is_free():
    """Scalable cross flows keep an L queue at ~1 ms and marking: that is no queue of ours to drain, and capping on
    it cost stall on lossy paths (virtual model, 100-ms round trip, 2 % loss: 8.3 -> 10.3 % at 12 Mbit/s)."""
    pair, server, sid, echo = _chat()
    _path(server, in_flight=1000, cwnd=12000)
    _ack_with_ce(server, sid, echo, ECT1, pair.now)
    assert not server._path_congested(pair.now + 0.01)
    assert server._l_ce_at == pair.now and server._ce_at == -math.inf
    # the same marks while our own sending fills the window (Prague cuts it on each): repeats would take the room
    # that new tokens need, so they are capped
    _path(server, in_flight=int(L4S_CE_WINDOW_SHARE * 12000), cwnd=12000)
    assert server._path_congested(pair.now + 0.01)
    assert not server._path_congested(pair.now + 0.06)  # one smoothed round trip later the mark is stale


@pytest.mark.parametrize("codepoint", [ECT0, NOT_ECT, None])
def test_a_classic_mark_or_one_on_an_unknown_packet_caps_at_once(codepoint):
    """A classic AQM marks where it would drop; an ack that echoes no packet we know is judged the old way."""
    pair, server, sid, echo = _chat()
    _path(server, in_flight=0)
    _ack_with_ce(server, sid, echo if codepoint is not None else None, codepoint or NOT_ECT, pair.now)
    assert server._ce_at == pair.now
    assert server._path_congested(pair.now + 0.01)
    assert not server._path_congested(pair.now + 0.06)


def test_without_ce_marks_the_decisions_are_the_round_trip_rule_alone():
    """The 1-Mbit/s droptail contention (no ECN on the path: no CE ever counted) keeps its decisions: congested
    exactly when the smoothed round trip exceeds the minimum by max(QUEUE_DELAY_S, QUEUE_DELAY_SHARE * min)."""
    pair, server, sid, echo = _chat()
    for counts in (None, [5, 0, 0, 0], [9, 0, 0, 0]):  # acks without counts, or not-ECT arrivals only
        server._on_datagram(Ack(sid, 0, echo, None, counts), pair.now)
    assert server._ce_at == -math.inf  # (nothing to note)
    for floor in (0.010, 0.040, 0.080, 0.200):
        for excess in (0.0, 0.02, 0.039, 0.041, 0.09, 0.11, 0.5):
            for in_flight in (0, 12000):
                _path(server, srtt=floor + excess, floor=floor, in_flight=in_flight, cwnd=12000)
                want = excess > max(QUEUE_DELAY_S, QUEUE_DELAY_SHARE * floor)
                assert server._path_congested(pair.now) is want, (floor, excess, in_flight)


# ------------------------------------------------------------------------------------------------ the virtual model
class _Sim:
    """Just enough of vsim's Simulation for a flow's packets to be built and recorded, never delivered."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, flow: Any, pkt: Any, now: float) -> None:
        self.sent.append(pkt)

    def call_at(self, t: float, fn: Any) -> int:
        return 0

    def cancel(self, handle: int) -> None:
        pass


def _model_flow(n: int) -> MarkedPacedFlow:
    """A model token stream that sent ``n`` tokens (one packet each), none acknowledged yet."""
    flow = MarkedPacedFlow(L4SPolicy(), se.parse_flow_spec("tokens:50"), ack_delay=0.02, stop=60.0, name="m")
    flow.sim = _Sim()  # type: ignore[assignment]
    for i in range(n):
        flow._send(i * 0.02)
    return flow


def _repeats_of_next(flow: MarkedPacedFlow, now: float) -> int:
    flow._send(now)
    runs = flow.sent_log[max(flow.sent_log)].runs
    return sum(e - f for f, e in runs) - 1  # (the new token)


@pytest.mark.parametrize("ecn, capped", [(ECT0, True), (ECT1, False)])
def test_the_model_caps_on_a_classic_mark_and_not_on_an_l_queue_mark(ecn, capped):
    flow = _model_flow(10)
    # packet 0 (token 0) acknowledged with CE, 40 ms after it left: the path's first (and lowest) round trip
    flow.sent_log[0].ecn = ecn
    flow.on_ack(0, 0.0, True, 0.04)
    assert _repeats_of_next(flow, 0.05) == (CONGESTED_REPEATS if capped else 9)  # tokens 1..9 unacknowledged
    assert flow.path_congested(0.05) is capped
    assert not flow.path_congested(0.09)  # a smoothed round trip later the mark is stale
    assert flow.repeats_capped == int(capped)


def test_the_model_caps_on_a_queue_and_not_with_the_cap_switched_off(monkeypatch):
    flow = _model_flow(10)
    flow.on_ack(0, 0.0, False, 0.04)  # 40 ms: the lowest round trip
    flow.on_ack(1, 0.02, False, 0.40)  # then 380 ms: srtt 82.5 ms, 42.5 ms over the minimum
    assert _repeats_of_next(flow, 0.41) == CONGESTED_REPEATS
    assert flow.path_congested(0.41)
    monkeypatch.setattr(MarkedPacedFlow, "congestion_cap", False)
    assert _repeats_of_next(flow, 0.42) == 9  # tokens 2..10 (the repair floor moved to 2)
    # a repair packet (no new token) is never capped
    monkeypatch.setattr(MarkedPacedFlow, "congestion_cap", True)
    flow._send(0.43, repair=True)
    assert sum(e - f for f, e in flow.sent_log[max(flow.sent_log)].runs) == 10


SCALABLE_AND_CLASSIC = ["scalable:2", "tcp:cubic"]
BURSTS_AND_CLASSIC = ["onoff-ect1:16mbps:500:1500", "tcp-onoff:2000:2000:1000"]


def _virtual(policy: str, cross: list[str], cap: bool, monkeypatch) -> dict[str, Any]:
    monkeypatch.setattr(MarkedPacedFlow, "congestion_cap", cap, raising=False)
    cfg = SwiftQueueConfig(down_trace="12mbps", delay_ms=50, loss="iid:0.02", cross=cross, policies=[policy],
                           seconds=12, seed=1, virtual=True)
    summary, _ = se.run_virtual_all(cfg)
    return dict(summary["policies"][policy])


def test_a_virtual_run_with_classic_marks_sends_smaller_packets_with_the_cap(monkeypatch):
    """ECT(0) into DualPI2's C queue, coupled to an overloaded L queue, with a classic bulk flow: CE marks come back
    and the cap cuts the repeats."""
    on = _virtual("classic", BURSTS_AND_CLASSIC, True, monkeypatch)
    off = _virtual("classic", BURSTS_AND_CLASSIC, False, monkeypatch)
    assert on["throughput_mbps"] < off["throughput_mbps"]  # the same packets, fewer repeated tokens in them
    assert on["ce_rate"] > 0 and on["repeats_capped"] > 0 and off["repeats_capped"] == 0
    assert _virtual("classic", BURSTS_AND_CLASSIC, True, monkeypatch) == on  # deterministic for a seed


def test_a_virtual_l4s_run_with_scalable_cross_flows_is_not_capped_by_their_marks(monkeypatch):
    """The L queue marks 9 % of the flow's packets (two scalable cross flows), its queue stays short: no cap, the
    packets as without one (the session-35 rule capped whenever a mark came back within a round trip)."""
    on = _virtual("l4s", SCALABLE_AND_CLASSIC, True, monkeypatch)
    off = _virtual("l4s", SCALABLE_AND_CLASSIC, False, monkeypatch)
    assert on["ce_rate"] > 0.05 and on["repeats_capped"] == 0
    assert on["throughput_mbps"] == off["throughput_mbps"] and on["stall_ratio"] == off["stall_ratio"]
