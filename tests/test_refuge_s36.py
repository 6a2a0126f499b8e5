"""swiftqueue's refuge probe (session 36): when C's samples lapse (``REFUGE_MEMORY_S``), one packet asks C before
the flow may leave L, instead of moving on the predictions alone.

Moving on the predictions walked a flow in L into a backlogged C queue once per ``REFUGE_MEMORY_S`` (virtual
TMobile-UMTS A, P99 against ``l4s`` +416 % at seed 0, median of seeds 0-3 of the four UMTS scenarios +1 … +17 %).
"""

from __future__ import annotations

from tokenwire.transport.ecn_socket import ECT0, ECT1
from tokenwire.transport.marking import REFUGE_MEMORY_S, LatencySample, SwiftQueuePolicy

from .test_marking_fixes2 import MarkedPair, _request

FLOOR_MS = 20.0
BURST_MS = 100.0


class StubForecaster:
    """Answers ``pred`` (L ms, C ms) whatever it observed."""

    def __init__(self, pred: tuple[float, float]) -> None:
        self.pred = pred

    def observe(self, sample: LatencySample) -> None:
        pass

    def predict(self, now: float) -> tuple[float, float] | None:
        return self.pred


def _sample(policy: SwiftQueuePolicy, at: float, ms: float, queue_l: bool) -> None:
    policy.on_sample(LatencySample(sent_at=at - 0.05, ack_at=at, latency_ms=ms, size=1200, queue_l=queue_l, ce=False))


class CountedPolicy(SwiftQueuePolicy):
    """Counts its decisions (``MarkedPair`` reads ``calls``)."""

    calls = 0

    def codepoint(self, now: float) -> int:
        self.calls += 1
        return super().codepoint(now)


def _lapsed(cls: type[SwiftQueuePolicy] = SwiftQueuePolicy) -> tuple[SwiftQueuePolicy, float]:
    """A flow in L whose C samples (a backlog, 60 ms, at t = 1 s) lapsed; now L bursts and the model expects C
    80 ms faster. Returns the policy and the time its L samples are off the floor and C's are stale."""
    p = cls(StubForecaster((BURST_MS, FLOOR_MS)), margin_ms=1.0, hysteresis_ms=3.0, classic=ECT0)
    for i in range(5):
        _sample(p, i * 0.02, FLOOR_MS, True)
    for i in range(3):
        _sample(p, 1 + i * 0.02, 60.0, False)
    t = 1.04 + REFUGE_MEMORY_S + 0.5
    for i in range(3):  # L's last three samples off the floor: the floor rule lets the flow leave
        _sample(p, t - 0.06 + i * 0.02, BURST_MS, True)
    return p, t


def _in_queue(p: SwiftQueuePolicy, start: float, seconds: float, step: float = 0.02) -> list[int]:
    """The codepoints of a packet every ``step`` seconds, L's samples staying in the burst."""
    out = []
    for k in range(round(seconds / step)):
        now = start + k * step
        out.append(p.codepoint(now))
        _sample(p, now, BURST_MS, True)
    return out


def test_lapsed_c_samples_send_one_packet_to_c_and_keep_the_flow_in_l_until_it_answers():
    p, t = _lapsed()
    assert p.codepoint(t) == ECT0  # the refuge probe
    assert p.decisions["probe"] == 1
    # its ack is a round trip away: the flow stays in L meanwhile (HEAD moved it to C with the probe's packet)
    assert _in_queue(p, t + 0.02, 0.1) == [ECT1] * 5
    assert p.decisions["probe"] == 1 and p.decisions["c"] == 0


def test_a_probe_answer_at_the_floor_moves_the_flow_to_c():
    p, t = _lapsed()
    assert p.codepoint(t) == ECT0
    assert p.codepoint(t + 0.02) == ECT1  # waiting for the answer
    _sample(p, t + 0.05, FLOOR_MS + 1.0, False)  # C is empty after all
    assert _in_queue(p, t + 0.06, 0.1) == [ECT0] * 5
    assert p.decisions["probe"] == 1


def test_a_backlogged_probe_answer_keeps_the_flow_in_l_and_c_is_asked_again_one_memory_later():
    p, t = _lapsed()
    assert p.codepoint(t) == ECT0
    answered = t + 0.05
    _sample(p, answered, 80.0, False)  # C holds a classic flow's standing queue: no refuge
    seen = _in_queue(p, t + 0.06, REFUGE_MEMORY_S - 0.1, step=0.1)
    assert set(seen) == {ECT1} and p.decisions["probe"] == 1  # no second probe while the answer counts
    later = answered + REFUGE_MEMORY_S + 0.01
    _sample(p, later - 0.02, BURST_MS, True)
    assert p.codepoint(later) == ECT0  # the answer lapsed: one more probe
    assert p.codepoint(later + 0.02) == ECT1
    assert p.decisions["probe"] == 2


def test_a_lost_probe_is_not_followed_by_a_move_nor_by_another_probe_before_the_memory_passes():
    p, t = _lapsed()
    assert p.codepoint(t) == ECT0  # never answered (dropped in C)
    assert set(_in_queue(p, t + 0.02, REFUGE_MEMORY_S - 0.1, step=0.1)) == {ECT1}
    assert p.decisions["probe"] == 1
    _sample(p, t + REFUGE_MEMORY_S - 0.01, BURST_MS, True)
    assert p.codepoint(t + REFUGE_MEMORY_S) == ECT0
    assert p.decisions["probe"] == 2


def test_the_daemon_sends_the_refuge_probe_as_one_ect0_datagram_among_ect1_ones():
    """ServerSession asks the policy once per datagrams_to_send call; a token a call (the daemon's pace) gives one
    datagram per decision, so the probe is one ECT(0) datagram and the flow's others stay ECT(1)."""
    p, t = _lapsed(CountedPolicy)
    pair = MarkedPair(p, client_reports_ecn=True)
    pair.now = t
    # the in-memory wire measures ~0 ms: a floor below it keeps every L sample of this pair off the floor, and the
    # flow's stale C samples stay stale (the pair's clock starts after them)
    _sample(p, t - REFUGE_MEMORY_S, -50.0, True)
    pair.exchange(rounds=40)  # handshake
    sid = pair.client.start_request(_request("chatterbox"), pair.now)
    pair.exchange(rounds=20)
    srv = pair.server
    assert srv is not None
    srv.accept(sid)
    sender = srv.requests[sid].sender
    assert sender is not None
    before = set(sender.sent_meta)
    for i in range(30):
        srv.push(sid, f"t{i} ", pair.now)
        pair.exchange(rounds=2)
    marks = [cp for k, (_, cp) in sender.sent_meta.items() if k not in before]
    assert len(marks) >= 30
    assert marks.count(ECT0) == 1 and p.decisions["probe"] == 1  # HEAD: the flow moved, ECT(0) from there on
    assert [cp for cp, n in pair.batches if cp == ECT0] == [ECT0]
    assert [n for cp, n in pair.batches if cp == ECT0] == [1]
