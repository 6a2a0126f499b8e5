"""Marking defects found by a probe of the daemon (fixM1):

1. ECN validation ran once per connection: a chatterbox answer validated it, and a ``stream`` answer after it (no ack
   datagrams) or a path that began clearing the codepoint kept ECT(1) marks whose CE nobody heard;
2. swiftqueue's refuge rule kept C-queue samples forever: one C backlog seen held a flow in L through 600 s of bursts;
3. swiftqueue ran one model inference per token packet on the event loop.

And by an operator's probe of swiftqueue (fixA, /tmp/xp/s30/pA):

4. a model answering NaN for every input was accepted and kept swiftqueue "cold" (never leaving its queue) on every
   packet, asked at every packet, with no warning and tokenwire_marking_model_errors_total 0;
5. ``bench predictor`` ended in onnxruntime's traceback (exit 1) on a model that loads but fails on real windows;
6. ``server.congestion = "prague"`` added to an l4s config (prague in effect already) said "restart pending";
7. a path re-marking ECT(1) to ECT(0) passed ECN validation (604 ECT(1) sent, 604 ECT(0) counted).
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from tokenwire.transport.ecn_socket import CE, ECT0, ECT1, NOT_ECT
from tokenwire.transport.frames import Request
from tokenwire.transport.marking import (
    ECN_VALIDATION_PACKETS,
    PREDICT_INTERVAL_S,
    REFUGE_MEMORY_S,
    EcnValidation,
    L4SPolicy,
    LatencySample,
    SwiftQueuePolicy,
)

from .test_marking_fixes2 import CountingPolicy, MarkedPair, _stream_answer, answer_on


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
    assert p.codepoint(t) == ECT0  # C's samples are stale: one packet asks C (a refuge probe, session 36)
    assert p.decisions["probe"] == 1 and p._current == ECT1  # the flow itself stays in L until C answers
    _sample(p, t + 0.05, 20.0, False)  # C answers at the floor: a refuge now
    assert p.codepoint(t + 0.06) == ECT0 and p._current == ECT0


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


# ------------------------------------------------------------------------------------------------ 4. NaN models
def _nan_model(path: Path, *, window: int = 2, nan_above_ms: float | None = None) -> Path:
    """A model with the runtime's signature and metadata that answers NaN: for every input (``nan_above_ms`` None:
    log(-(|ref| + 1)), as the probe's nan_out.onnx), or only for windows whose scale (ref[:, 2], their median
    latency) is above ``nan_above_ms`` (else the last L and C latencies: ref[:, :2] + 0 * log(T - scale))."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from tokenwire.predictor.features import FEATURES, FEATURES_VERSION, N_FEATURES

    def ints(name: str, values: list[int]) -> Any:
        return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)

    def floats(name: str, values: list[float]) -> Any:
        return helper.make_tensor(name, TensorProto.FLOAT, [len(values)], values)

    node = helper.make_node
    init = [ints("s0", [0]), ints("s2", [2]), ints("s3", [3]), ints("a1", [1])]
    nodes = [node("Slice", ["ref", "s0", "s2", "a1"], ["last"])]
    if nan_above_ms is None:
        init.append(floats("one", [1.0]))
        nodes += [node("Abs", ["last"], ["ab"]), node("Add", ["ab", "one"], ["ab1"]), node("Neg", ["ab1"], ["ng"]),
                  node("Log", ["ng"], ["y"])]
    else:
        init += [floats("t", [nan_above_ms]), floats("zero", [0.0])]
        nodes += [node("Slice", ["ref", "s2", "s3", "a1"], ["scale"]), node("Sub", ["t", "scale"], ["room"]),
                  node("Log", ["room"], ["lg"]), node("Mul", ["lg", "zero"], ["nan_or_0"]),
                  node("Add", ["last", "nan_or_0"], ["y"])]
    graph = helper.make_graph(
        nodes, "nan", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", window, N_FEATURES]),
                       helper.make_tensor_value_info("ref", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    entry = model.metadata_props.add()
    entry.key = "tokenwire"
    entry.value = json.dumps({"format": "tokenwire-swiftqueue", "kind": "transformer", "features": list(FEATURES),
                              "features_version": FEATURES_VERSION, "window": window})
    onnx.save(model, str(path))
    return path


def _acks(n: int, ms: float, start: float = 0.0, gap_s: float = 0.025) -> list[LatencySample]:
    """``n`` acks of ``ms`` each, ``gap_s`` apart (every third through C)."""
    return [LatencySample(sent_at=start + (i + 1) * gap_s - ms / 1000, ack_at=start + (i + 1) * gap_s,
                          latency_ms=ms, size=1200, queue_l=i % 3 != 0, ce=False) for i in range(n)]


def test_a_model_answering_nan_for_every_input_is_refused_at_load(tmp_path: Path, caplog) -> None:
    """nan_out.onnx loaded (the trial checked shape and type only); now refused like a model ``export`` refuses."""
    from tokenwire.predictor.runtime import ModelError, load_forecaster, make_swiftqueue_policy

    path = str(_nan_model(tmp_path / "nan_out.onnx"))
    with pytest.raises(ModelError, match=re.escape("trial inference answers non-finite latencies (NaN or infinity)")):
        load_forecaster(path)
    with caplog.at_level(logging.WARNING, logger="tokenwire.predictor"):
        assert isinstance(make_swiftqueue_policy(path), L4SPolicy)
    assert "falling back to the l4s policy" in caplog.text
    assert load_forecaster().window == 64  # the shipped model answers NaN on the zeros trial: not what is judged
    assert load_forecaster(str(_nan_model(tmp_path / "odd.onnx", nan_above_ms=100.0))).window == 2


class _Answers:
    """An inference session stand-in: answers ``value`` for both queues, whatever the window."""

    def __init__(self) -> None:
        self.value = 20.0
        self.runs = 0

    def get_inputs(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name="x"), SimpleNamespace(name="ref")]

    def get_outputs(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name="y")]

    def run(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.runs += 1
        return [np.full((len(feed["ref"]), 2), self.value, np.float32)]


def test_non_finite_answers_are_none_for_one_odd_sample_and_an_error_past_its_stay_in_the_window() -> None:
    """A sample stays in the forecaster's ring for window + 1 acks: NaN answers while it may be the cause are None
    (a "cold" decision); NaN answers for every window after it has left are the model's fault."""
    from tokenwire.predictor.runtime import ModelError, OnnxLatencyForecaster

    sess = _Answers()
    fc = OnnxLatencyForecaster(sess, 4, {}, "m.onnx")  # a ring of 5 acks
    acks = iter(_acks(100, 20.0))

    def ack() -> float:
        sample = next(acks)
        fc.observe(sample)
        return sample.ack_at

    for _ in range(5):
        now = ack()
    for _ in range(2):
        sess.value = math.nan
        for _ in range(5):  # five windows in a row: every one may hold the odd sample
            assert fc.predict(now) is None and fc.predict(now + 0.001) is None  # the same window, asked again
            now = ack()
        sess.value = 20.0
        assert fc.predict(now) == (20.0, 20.0)  # the sample has left: finite again, the count starts afresh
        now = ack()
    sess.value = math.inf
    for _ in range(5):
        assert fc.predict(now) is None
        now = ack()
    with pytest.raises(ModelError, match=re.escape("m.onnx: answers non-finite latencies (NaN or infinity) for "
                                                   "every window of the last 5 acks")):
        fc.predict(now)


def test_a_model_that_answers_nan_on_real_windows_falls_back_to_l4s_like_one_that_raises(tmp_path: Path, caplog):
    """The probe's daemon: every decision "cold", the model asked at every packet, no warning, 0 model errors."""
    from tokenwire.daemon.marking import MarkingConfig, MarkingService
    from tokenwire.daemon.telemetry import Metrics

    model = _nan_model(tmp_path / "nan_on_data.onnx", nan_above_ms=100.0)  # finite on the load trial's window
    metrics = Metrics()
    svc = MarkingService(MarkingConfig(policy="swiftqueue", model=model), metrics)
    svc.start()
    a, b = svc.new_policy(), svc.new_policy()
    assert isinstance(a, SwiftQueuePolicy) and isinstance(b, SwiftQueuePolicy)
    assert svc.effective_policy == "swiftqueue"
    with caplog.at_level(logging.WARNING, logger="tokenwire.daemon.marking"):
        for sample in _acks(10, 200.0):  # a 200 ms path: the model answers NaN for every window
            a.on_sample(sample)
            for k in range(4):  # packets 5 ms apart between two acks 25 ms apart
                assert a.codepoint(sample.ack_at + 0.005 * k) == ECT1
    assert a.failed is not None and "non-finite latencies" in a.failed
    # asked at every packet while the window filled (2 acks: no inference), then once per ack until the 3 acks of the
    # first NaN window had left the ring: not at every packet; then never
    assert a.predictions == 2 * 4 + 4
    assert a.decisions["fallback"] > 0 and "another connection" in (b.failed or "")
    assert isinstance(svc.new_policy(), L4SPolicy) and svc.effective_policy == "l4s"
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "latency model failed on the packet path (ModelError: " in warned[0]
    assert metrics.registry.get_sample_value("tokenwire_marking_model_errors_total") == 1
    assert metrics.registry.get_sample_value("tokenwire_marking_policy", {"policy": "l4s"}) == 1


def test_a_none_from_a_forecaster_with_a_full_window_is_reused_for_the_interval() -> None:
    """Reused like a prediction (a NaN answer is an inference); a forecaster still filling its window (no ``ready``,
    or ``ready`` False) is asked again at once, as before."""
    f = StubForecaster(None)
    f.ready = True  # type: ignore[attr-defined]
    p = SwiftQueuePolicy(f, predict_interval_s=0.02)
    assert [p.codepoint(t) for t in (0.0, 0.005, 0.01, 0.025)] == [ECT1] * 4
    assert f.calls == 2 and p.decisions["cold"] == 4
    f.ready = False  # type: ignore[attr-defined]
    p.codepoint(0.05)
    p.codepoint(0.051)
    assert f.calls == 4


# ------------------------------------------------------------------------------------------------ 5. bench predictor
def test_bench_predictor_on_a_model_that_fails_on_real_windows_is_one_line_and_exit_2(tmp_path: Path, capsys):
    """runtime_fail.onnx: onnxruntime's traceback and exit 1, where a model that does not load is one line, exit 2."""
    from tokenwire.daemon.cli import main

    from .test_predictor_runtime import tiny_model

    model = tiny_model(tmp_path / "runtime_fail.onnx", cols_on_zeros=2, cols_on_data=3)
    out = tmp_path / "bench.json"
    assert main(["bench", "predictor", "--model", str(model), "--calls", "1", "--repeats", "1",
                 "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tokenwire bench predictor: error: {model}: inference failed on a "
                                               "real window (")
    assert "Traceback" not in err[0] and not out.exists()


# ------------------------------------------------------------------------------------------------ 6. reload
@pytest.mark.parametrize("policy", ["l4s", "swiftqueue"])
def test_an_explicit_congestion_equal_to_the_one_in_effect_is_no_restart(policy: str) -> None:
    """repro_congestion_reload.sh: "changes to server need a restart" + "restart pending: server.congestion" for
    ``congestion = "prague"`` where the policy ran prague already (unset compared as written: "reno")."""
    from tokenwire.daemon.config import parse_config, restart_changes
    from tokenwire.daemon.reload_decisions import restart_settings

    derived = parse_config({"marking": {"policy": policy}})
    explicit = parse_config({"server": {"congestion": "prague"}, "marking": {"policy": policy}})
    assert derived.server.congestion == explicit.server.congestion == "prague"
    for old, new in ((derived, explicit), (explicit, derived)):
        assert restart_changes(old, new) == [] and restart_settings(old, new) == []
    off = parse_config({})
    assert restart_changes(off, derived) == ["marking"]  # derived from [marking]: its change, as before
    assert restart_changes(off, parse_config({"server": {"congestion": "reno"}})) == []  # the default, written
    assert restart_settings(off, parse_config({"server": {"congestion": "cubic"}})) == ["server.congestion"]
    assert restart_changes(off, explicit) == ["server", "marking"]  # written, and another controller in effect


# ------------------------------------------------------------------------------------------------ 7. re-marking
def _remarking(pair: MarkedPair, frm: int, to: int) -> None:
    """The path turns every ``frm`` packet into ``to``: the client's counts say so."""
    def counts() -> list[int]:
        c = list(pair.sent)
        c[to] += c[frm]
        c[frm] = 0
        return c

    pair.client.ecn_counts = counts


def test_a_path_re_marking_ect1_to_ect0_fails_validation(caplog) -> None:
    """run_relay.sh --remark-ect0: the client counted 604 ECT(0) for the daemon's 604 ECT(1) packets, validation
    passed (any marked arrival did) and tokenwire_ecn_validation_failed_total stayed 0."""
    pair = MarkedPair(CountingPolicy(ECT1), client_reports_ecn=True)
    _remarking(pair, ECT1, ECT0)
    with caplog.at_level(logging.DEBUG, logger="tokenwire.transport.marking"):
        _stream_answer(pair, 40)
    srv = pair.server
    assert srv is not None and srv.ecn.state == "failed" and srv.ecn.failures == 1
    marks = [cp for cp, _ in pair.batches]
    assert marks[-1] == NOT_ECT and marks.count(NOT_ECT) > marks.count(ECT1)
    assert "grew in ECT(0) only: the path changes the codepoint (RFC 9000 §13.4.2.1)" in caplog.text


def test_a_path_re_marking_ect0_to_ect1_fails_a_classic_sender_too() -> None:
    pair = MarkedPair(CountingPolicy(ECT0), client_reports_ecn=True)
    _remarking(pair, ECT0, ECT1)
    _stream_answer(pair, 40)
    srv = pair.server
    assert srv is not None and srv.ecn.state == "failed" and srv.ecn.failures == 1


def test_a_sender_moving_between_queues_on_a_clean_path_stays_validated() -> None:
    """swiftqueue's moves: ECT(0) packets still in flight arrive after the first ECT(1) ones left, and the other
    way round; each run of packets is validated by arrivals of its own codepoint."""
    pair = MarkedPair(CountingPolicy(*[ECT1] * 13, *[ECT0] * 13), client_reports_ecn=True)
    _stream_answer(pair, 120)
    srv = pair.server
    assert srv is not None and srv.ecn.failures == 0 and srv.ecn.state == "capable"
    assert {cp for cp, _ in pair.batches} == {ECT0, ECT1}


def test_validation_counts_only_arrivals_of_the_codepoint_sent_or_ce() -> None:
    v = EcnValidation()
    v.on_counts([0, 0, 3, 0])  # before anything counted (the handshake): any marked arrival
    assert v.state == "capable"
    v.on_sent(ECT1, 10, 20)
    v.on_counts([0, 0, 9, 0])  # ECT(0) arrivals only, for ECT(1) packets: do not restart the count
    assert v.on_acked(19) and v.state == "failed" and v.failures == 1
    v.on_counts([0, 0, 14, 0])  # more of them (in flight when it failed): still failed
    assert v.state == "failed" and not v.marking_allowed
    v.on_counts([0, 0, 14, 1])  # CE: the path carries marks
    assert v.state == "capable"
    v.on_sent(ECT1, 30, 35)
    v.on_counts([0, 1, 15, 1])  # ECT(1) and ECT(0): ECT(1) arrived
    v.on_sent(ECT1, 35, 44)
    v.on_counts([0, 1, 20, 1])
    assert not v.on_acked(43) and v.state == "capable"
    v.on_sent(ECT0, 44, 45)  # a run of both codepoints: either validates it
    v.on_counts([0, 1, 21, 1])
    assert not v.on_acked(44) and v.state == "capable"


def test_a_re_marking_path_is_still_detected_after_the_codepoint_switches() -> None:
    """Validated with ECT(0), then moved to ECT(1) (swiftqueue into L) on a path that re-marks ECT(1) to ECT(0):
    the codepoints of packets before the validation must not count for those after it, or those ECT(0) arrivals
    validate the ECT(1) packets and the re-marking is never seen."""
    v = EcnValidation(packets=10)
    v.on_sent(ECT0, 0, 10)
    v.on_counts([0, 0, 10, 0])  # ECT(0) arrivals for ECT(0) packets: capable
    assert v.state == "capable"
    v.on_sent(ECT1, 10, 20)
    v.on_counts([0, 0, 20, 0])  # the ECT(1) packets arrive as ECT(0)
    assert v.on_acked(19) and v.state == "failed" and v.failures == 1
