"""Marking defects found by a probe of the daemon (fixM1):

1. ECN validation ran once per connection: a chatterbox answer validated it, and a ``stream`` answer after it (no ack
   datagrams) or a path that began clearing the codepoint kept ECT(1) marks whose CE nobody heard;
2. swiftqueue's refuge rule kept C-queue samples forever: one C backlog seen held a flow in L through 600 s of bursts;
3. swiftqueue ran one model inference per token packet on the event loop.
"""

from __future__ import annotations

import pytest

from tokenwire.transport.ecn_socket import CE, ECT0, ECT1, NOT_ECT
from tokenwire.transport.frames import Request
from tokenwire.transport.marking import (
    ECN_VALIDATION_PACKETS,
    PREDICT_INTERVAL_S,
    REFUGE_MEMORY_S,
    EcnValidation,
    LatencySample,
    SwiftQueuePolicy,
)

from .test_marking_fixes2 import CountingPolicy, MarkedPair, answer_on


# ------------------------------------------------------------------------------------------------ helpers
class StubForecaster:
    """Answers ``pred`` and counts its calls."""

    def __init__(self, pred: tuple[float, float] | None) -> None:
        self.pred = pred
        self.calls = 0

    def observe(self, sample: LatencySample) -> None:
        pass

    def predict(self, now: float) -> tuple[float, float] | None:
        self.calls += 1
        return self.pred


def _sample(policy: SwiftQueuePolicy, at: float, ms: float, queue_l: bool) -> None:
    policy.on_sample(LatencySample(sent_at=at - 0.05, ack_at=at, latency_ms=ms, size=1200, queue_l=queue_l, ce=False))


def _validated_pair() -> MarkedPair:
    """A connection whose first (chatterbox) answer validated ECN: the client reports its counts."""
    pair = MarkedPair(CountingPolicy(ECT1), client_reports_ecn=True)
    pair.exchange(rounds=40)  # handshake
    answer_on(pair, "chatterbox", 30)
    assert pair.server is not None and pair.server.ecn.state == "capable"
    return pair


# ------------------------------------------------------------------------------------------------ 1. validation
def test_a_stream_answer_after_a_validated_one_stops_marking_and_counts_a_failure():
    """mixed.py: 308 ECT(1) packets CE-marked by the path after validation, tokenwire_ecn_ce_total frozen."""
    pair = _validated_pair()
    srv = pair.server
    assert srv is not None
    start = len(pair.batches)
    answer_on(pair, "stream", 40)
    assert srv.ecn.state == "failed" and srv.ecn.failures == 1
    marks = [cp for cp, _ in pair.batches[start:]]
    assert marks[-1] == NOT_ECT and marks.count(NOT_ECT) > marks.count(ECT1)


def test_a_path_that_starts_clearing_the_codepoint_mid_connection_stops_marking():
    """midbleach.sh: the path bleaches after the first answer; the client's counts now grow in Not-ECT only."""
    pair = _validated_pair()
    srv = pair.server
    assert srv is not None
    real = pair.client.ecn_counts
    assert real is not None
    bleached_from = list(real())

    def bleached() -> list[int]:  # every datagram from now on arrives Not-ECT
        now = real()
        return [bleached_from[0] + sum(now) - sum(bleached_from), *bleached_from[1:]]

    pair.client.ecn_counts = bleached
    answer_on(pair, "chatterbox", 40)
    assert srv.ecn.state == "failed" and srv.ecn.failures == 1
    assert pair.batches[-1][0] == NOT_ECT


def test_a_validated_connection_keeps_marking_through_answers_and_quiet_periods():
    """Continuous validation must not fail a healthy connection: more answers, and a long quiet period between them
    (nothing sent; then only the ACKs that answer a client's pings, which no client reports on)."""
    pair = _validated_pair()
    srv = pair.server
    assert srv is not None
    for _ in range(3):
        answer_on(pair, "chatterbox", 30)
        pair.now += 300.0  # quiet: no packet at all (no failure can come from time alone)
        for i in range(2 * ECN_VALIDATION_PACKETS):  # a client's keepalive pings: the server's ACKs are ECT(1)
            pair.client.quic.send_ping(1000 + i)
            pair.exchange(rounds=4)
    assert srv.ecn.state == "capable" and srv.ecn.failures == 0
    assert {cp for cp, _ in pair.batches} == {ECT1}


def test_validation_recounts_from_each_new_marked_arrival():
    v = EcnValidation()
    v.on_counts([0, 3, 0, 0])  # capable
    v.on_sent(ECT1, 19, 30)  # the 10th: 28
    assert not v.on_acked(27) and v.state == "capable"
    v.on_counts([0, 3, 0, 0])  # a report, but nothing new arrived marked: does not restart the count
    v.on_counts([4, 3, 0, 0])  # Not-ECT arrivals only (bleached): neither
    assert v.on_acked(28) and v.state == "failed" and v.failures == 1
    v.on_counts([4, 3, 0, 1])  # a CE arrival later: the path carries marks after all
    assert v.state == "capable"
    v.on_sent(ECT1, 40, 45)
    v.on_counts([4, 4, 1, 1])  # new marked arrivals: count afresh from the next packet sent
    v.on_sent(ECT1, 45, 54)
    assert not v.on_acked(53) and v.state == "capable"
    v.on_sent(ECT0, 54, 55)
    assert v.on_acked(54) and v.failures == 2
    assert (ECT1, ECT0, CE) == (1, 2, 3)  # the counts' layout these lists use (Not-ECT, ECT(1), ECT(0), CE)


def test_validation_waiting_for_a_report_needs_one_after_the_acknowledgement():
    """The KV channel: a KV_ACK comes per chunk, after QUIC acknowledged its packets; it judges at the first report
    that follows the acknowledgement of the packets-th packet, also once validated."""
    kv = EcnValidation(wait_for_report=True)
    kv.reports += 1
    kv.on_counts([0, 50, 0, 0])
    kv.on_sent(ECT1, 100, 400)  # the next chunk
    assert not kv.on_acked(399)  # acknowledged; a report before it does not count
    assert not kv.on_acked(399) and kv.state == "capable"
    kv.reports += 1  # the chunk's KV_ACK
    kv.on_counts([300, 50, 0, 0])  # the chunk arrived Not-ECT
    assert kv.on_acked(399) and kv.state == "failed"


# ------------------------------------------------------------------------------------------------ 2. refuge samples
def test_stale_c_samples_no_longer_keep_a_flow_in_l():
    """stale_refuge.py: C showed 60 ms once; 600 s of L bursts at 100 ms with C predicted at 20 ms kept 30000/30000
    packets in L, since nothing refreshed C's samples while the flow was in L."""
    f = StubForecaster((20.0, 60.0))
    p = SwiftQueuePolicy(f, margin_ms=1.0, hysteresis_ms=3.0, classic=ECT0, predict_interval_s=0.0)
    for i in range(5):
        _sample(p, i * 0.02, 20.0, True)  # the floor: 20 ms
    for i in range(3):
        _sample(p, 1 + i * 0.02, 60.0, False)  # C had a backlog at t = 1 s
    assert p.codepoint(1.1) == ECT1
    f.pred = (100.0, 20.0)  # from now on L bursts, C is predicted empty
    _sample(p, 1.2, 100.0, True)
    assert p.codepoint(1.2) == ECT1  # C's samples are fresh: no refuge (the rule as before)
    t = 1.0 + 0.04 + REFUGE_MEMORY_S + 0.5
    for i in range(3):  # L's last three samples off the floor: the floor rule lets it move
        _sample(p, t - 0.04 + i * 0.02, 100.0, True)
    assert p.codepoint(t) == ECT0  # C's samples are stale: the predictions decide


def test_the_refuge_memory_must_be_positive():
    with pytest.raises(ValueError, match="refuge_memory_s"):
        SwiftQueuePolicy(StubForecaster(None), refuge_memory_s=0.0)


# ------------------------------------------------------------------------------------------------ 3. inference rate
def test_a_prediction_is_reused_within_the_interval_and_not_per_packet():
    """Four 100-token/s answers ran 1,220 inferences of ~0.5 ms each on the event loop, one per packet."""
    f = StubForecaster((20.0, 30.0))
    p = SwiftQueuePolicy(f, predict_interval_s=0.015)
    for k in range(100):  # a token packet every 10 ms for 1 s, each acknowledged before the next
        now = k * 0.01
        _sample(p, now, 20.0, True)
        assert p.codepoint(now) == ECT1
    assert f.calls == 50 and p.predictions == 50 and sum(p.decisions.values()) == 100
    assert PREDICT_INTERVAL_S == 0.02


def test_a_forecaster_still_filling_its_window_is_asked_again_and_zero_interval_asks_per_packet():
    f = StubForecaster(None)
    p = SwiftQueuePolicy(f, predict_interval_s=1.0)
    p.codepoint(0.0)
    p.codepoint(0.001)
    assert f.calls == 2 and p.decisions["cold"] == 2  # None is no answer to reuse
    f2 = StubForecaster((20.0, 30.0))
    p2 = SwiftQueuePolicy(f2, predict_interval_s=0.0)
    for k in range(5):
        p2.codepoint(0.0 + k * 1e-6)
    assert f2.calls == 5
    with pytest.raises(ValueError, match="predict_interval_s"):
        SwiftQueuePolicy(f2, predict_interval_s=-1.0)


def test_the_daemon_reuses_predictions_for_the_interval():
    from tokenwire.daemon.marking import MarkingConfig, MarkingService
    from tokenwire.daemon.telemetry import Metrics

    svc = MarkingService(MarkingConfig(policy="swiftqueue"), Metrics())  # the shipped model
    svc.start()
    pol = svc.new_policy()
    assert isinstance(pol, SwiftQueuePolicy) and pol.predict_interval_s == PREDICT_INTERVAL_S > 0


# -- validation counts only packets that carry data (a review of the first version of the life-long check)
def _answer_with(pair: MarkedPair, prompt: str, tokens: int) -> int:
    """An answer to ``prompt`` on the pair's connection; the index in ``pair.batches`` where it began."""
    start = len(pair.batches)
    sid = pair.client.start_request(Request(messages=[{"role": "user", "content": prompt}]), pair.now)
    pair.exchange(rounds=60)
    srv = pair.server
    assert srv is not None
    srv.accept(sid)
    pair.exchange(rounds=40)  # the model's prefill: STARTED is out, and acknowledged, before the first token
    for i in range(tokens):
        srv.push(sid, f"t{i} ", pair.now)
        pair.exchange(rounds=2)
    srv.finish(sid)
    pair.exchange(rounds=200)
    return start


def test_the_acks_a_large_prompt_draws_do_not_fail_a_healthy_connection():
    """A 100-KB prompt drew many ACK-only packets from the server, acknowledged by QUIC before any report: the next
    answer's STARTED then failed validation, on every such request, and its first packets left Not-ECT."""
    pair = _validated_pair()
    srv = pair.server
    assert srv is not None
    for _ in range(3):
        start = _answer_with(pair, "x" * 100_000, 20)
        assert srv.ecn.failures == 0 and srv.ecn.state == "capable"
        assert NOT_ECT not in [cp for cp, _ in pair.batches[start:]]


def test_the_pings_of_an_idle_connection_do_not_fail_its_next_answer():
    """A client pinging through a pause between turns (every idle_timeout_s / 3): the server's ACK-only answers
    counted, and the next answer failed validation."""
    pair = _validated_pair()
    srv = pair.server
    assert srv is not None
    for uid in range(15):
        pair.client.quic.send_ping(uid)
        pair.exchange(rounds=5)
    start = _answer_with(pair, "and now?", 20)
    assert srv.ecn.failures == 0
    assert NOT_ECT not in [cp for cp, _ in pair.batches[start:]]
