"""swiftqueue's refuge probe during an L burst (session 39): the probe is sent only while L is predicted slower, when
DualPI2 serves C at its WRR share, so even an empty C answers several ms above the floor. Judged by the floor test
alone every probe failed and a flow back in L never left it (namespaces, fixed 12 Mbit/s, A: -0.9 and +0.4 % P99
against ``l4s`` where the docs have -69 ... -77 %). C now also counts as a refuge when its queueing is small against
what the L packets sent beside it queued; a classic flow's standing queue is not.
"""

from __future__ import annotations

import pytest

from tokenwire.transport.ecn_socket import ECT0, ECT1
from tokenwire.transport.marking import REFUGE_EVIDENCE_S, REFUGE_MEMORY_S, LatencySample, SwiftQueuePolicy

from .test_refuge_s36 import StubForecaster

FLOOR_MS = 20.0
BURST_MS = 80.0  # L's one-way latency during the burst: 60 ms of queueing
RETURN_S = 0.02  # the ack's way back


def _ack(p: SwiftQueuePolicy, sent: float, ms: float, queue_l: bool) -> float:
    """The ack of a packet sent at ``sent`` that took ``ms`` one way; returns when it arrived."""
    at = sent + ms / 1000 + RETURN_S
    p.on_sample(LatencySample(sent_at=sent, ack_at=at, latency_ms=ms, size=1200, queue_l=queue_l, ce=False))
    return at


def _probing_in_a_burst() -> tuple[SwiftQueuePolicy, StubForecaster, float]:
    """A flow in L whose C samples (at the floor) lapsed, in an L burst the model sees: the refuge probe leaves at
    the returned time (asserted)."""
    f = StubForecaster((BURST_MS, FLOOR_MS))
    p = SwiftQueuePolicy(f, margin_ms=1.0, hysteresis_ms=3.0, classic=ECT0)
    for i in range(5):
        _ack(p, i * 0.02, FLOOR_MS, True)
    for i in range(3):
        _ack(p, 1.0 + i * 0.02, FLOOR_MS, False)
    t = 1.1 + REFUGE_MEMORY_S + 0.5
    for i in range(3):  # the burst: L's last samples far off the floor, so the floor rule lets the flow leave
        _ack(p, t - 0.2 + i * 0.02, BURST_MS, True)
    assert p.codepoint(t) == ECT0 and p.decisions["probe"] == 1  # the refuge probe
    return p, f, t


def _next_packets(p: SwiftQueuePolicy, start: float, n: int = 5) -> list[int]:
    return [p.codepoint(start + k * 0.02) for k in range(n)]


def test_an_empty_c_answering_9_ms_above_the_floor_during_an_l_burst_is_a_refuge():
    p, _, t = _probing_in_a_burst()
    answered = _ack(p, t, FLOOR_MS + 9.0, False)  # ~9 L packets of 1 ms went first: C's 10 % WRR share
    assert p.codepoint(answered + 0.001) == ECT1  # no L packet sent beside the probe acked yet: L meanwhile
    beside = _ack(p, t + 0.02, BURST_MS, True)  # the next token packet, in L, queued 60 ms
    assert _next_packets(p, beside + 0.001) == [ECT0] * 5  # 9 ms against 60: the flow leaves L (HEAD: stayed)
    assert p.decisions["probe"] == 1


@pytest.mark.parametrize("c_ms", [FLOOR_MS + 20.0, 160.0])
def test_a_c_standing_queue_answering_the_probe_is_no_refuge(c_ms):
    """A classic flow's standing queue (15 ms or more) drained at 10 % during the burst: no refuge."""
    p, _, t = _probing_in_a_burst()
    _ack(p, t, c_ms, False)
    beside = _ack(p, t + 0.02, BURST_MS, True)
    assert _next_packets(p, beside + 0.001) == [ECT1] * 5
    assert p.decisions["probe"] == 1  # and no second probe while the answer counts


def test_a_probe_that_left_as_l_drained_is_no_refuge():
    """The L packets beside the probe found L at the floor: C's few ms are then more than L's, not less."""
    p, _, t = _probing_in_a_burst()
    _ack(p, t, FLOOR_MS + 9.0, False)
    beside = _ack(p, t + 0.02, FLOOR_MS + 1.0, True)
    assert _next_packets(p, beside + 0.001) == [ECT1] * 5


def test_the_comparison_counts_only_while_the_burst_it_was_made_in_lasts():
    """A small answer whose burst ended before the flow could act on it does not send the flow into C at a later
    burst: C may hold a classic flow's queue by then (virtual UMTS B moved on 2-s-old C samples: +55 % P99)."""
    p, f, t = _probing_in_a_burst()
    _ack(p, t, FLOOR_MS + 9.0, False)
    f.pred = (FLOOR_MS, FLOOR_MS)  # the burst ends before the L packet beside the probe is acked
    beside = _ack(p, t + 0.02, BURST_MS, True)
    assert p.codepoint(beside + 0.001) == ECT1
    later = beside + REFUGE_EVIDENCE_S + 1.0  # the next burst, well within REFUGE_MEMORY_S of the answer
    for i in range(3):
        _ack(p, later - 0.2 + i * 0.02, BURST_MS, True)
    f.pred = (BURST_MS, FLOOR_MS)
    assert _next_packets(p, later) == [ECT1] * 5
    assert p.decisions["probe"] == 1


def test_c_samples_with_no_l_packet_beside_them_are_judged_by_the_floor_alone():
    """Samples the flow took while it sat in C saw no L packet at the same moment: 10 ms above the floor is no
    refuge, however slow L is a moment later (the floor test as before; L's latest samples are no measure of L's
    queue when those C packets left)."""
    f = StubForecaster((FLOOR_MS, FLOOR_MS))
    p = SwiftQueuePolicy(f, margin_ms=1.0, hysteresis_ms=3.0, classic=ECT0)
    for i in range(5):
        _ack(p, i * 0.02, FLOOR_MS, True)
    t = 5.0
    for i in range(3):  # the flow sat in C; its last C packets were acked within REFUGE_EVIDENCE_S of t
        _ack(p, t - 0.245 + i * 0.005, FLOOR_MS + 10.0, False)
    for i in range(3):  # back in L more than REFUGE_PAIR_S later, L bursts
        _ack(p, t - 0.12 + i * 0.01, BURST_MS, True)
    f.pred = (BURST_MS, FLOOR_MS)
    assert p.codepoint(t) == ECT1
    assert p.decisions["probe"] == 0


def test_a_new_path_forgets_which_l_packets_went_beside_which_c_ones():
    p, _, t = _probing_in_a_burst()
    _ack(p, t - 0.01, BURST_MS, True)
    p.path_changed()
    assert not p._c_beside and not p._l_sent
