"""The swiftqueue evaluation without root: policy decisions, the oracle estimate, vsim runs, JSON, CLI."""

from __future__ import annotations

import json
import math
import time

import pytest

from tokenwire.testbed.link import Link
from tokenwire.testbed.packet import ECT0, ECT1, NOT_ECT
from tokenwire.testbed.queue_oracle import OracleBoard, estimate_queue_delays
from tokenwire.testbed.queues import Packet, parse_queue
from tokenwire.testbed.swiftqueue_eval import (
    METRIC_KEYS,
    PerQueueEwmaForecaster,
    SwiftQueueConfig,
    SwiftQueueEvalError,
    parse_cross_spec,
    parse_flow_spec,
    run_virtual_all,
)
from tokenwire.testbed.trace import trace_from_spec
from tokenwire.testbed.traffic import parse_cross
from tokenwire.transport.marking import LatencySample, SwiftQueuePolicy


class Scripted:
    """A forecaster whose prediction the test sets."""

    def __init__(self, pred):
        self.pred = pred

    def observe(self, sample):
        pass

    def predict(self, now):
        return self.pred


def sample(t, latency, queue_l):
    return LatencySample(sent_at=t - 0.05, ack_at=t, latency_ms=latency, size=200, queue_l=queue_l, ce=False)


# ------------------------------------------------------------------------------------------- policy
def test_probes_go_to_the_unused_queue_only_when_the_current_one_is_slow_and_stale():
    f = Scripted((20.0, 20.0))
    p = SwiftQueuePolicy(f, margin_ms=1.0, hysteresis_ms=1.0, probe_interval_s=0.25)
    p.on_sample(sample(0.0, 20.0, True))  # the floor: 20 ms
    # L at the floor: nothing to gain anywhere, so no probe however stale C is
    assert [p.codepoint(t / 10) for t in range(1, 30)] == [ECT1] * 29
    assert p.decisions["probe"] == 0
    f.pred = (45.0, 46.5)  # L slow (25 ms over the floor), C about as slow: inside the band, stay in L ...
    assert p.codepoint(3.0) == ECT0  # ... but one probe into C right away (C's last sample: never)
    assert p.codepoint(3.01) == ECT1  # rate-limited: no second probe within the interval
    assert p.codepoint(3.2) == ECT1
    assert p.codepoint(3.26) == ECT0  # next interval
    p.on_sample(sample(3.3, 44.0, False))  # a fresh C sample: no probe until it is stale again
    assert p.codepoint(3.52) == ECT1 and p.codepoint(3.56) == ECT0
    assert p.decisions["probe"] == 3


def test_policy_leaves_a_slow_l_queue_and_returns_when_it_recovers():
    f = Scripted((20.0, 20.0))
    p = SwiftQueuePolicy(f, margin_ms=1.0, hysteresis_ms=1.0, probe_interval_s=0.0)
    assert p.codepoint(0.0) == ECT1
    f.pred = (80.0, 25.0)  # L spikes: gain = 25 - 81 = -56 < -1
    assert p.codepoint(0.1) == ECT0
    f.pred = (23.5, 25.0)  # gain 0.5: inside the band, stay classic
    assert p.codepoint(0.2) == ECT0
    f.pred = (22.0, 25.0)  # gain 2 > 1: back to L
    assert p.codepoint(0.3) == ECT1
    with pytest.raises(ValueError):
        SwiftQueuePolicy(f, margin_ms=-1)


def test_per_queue_ewma_double_keeps_queues_apart():
    f = PerQueueEwmaForecaster(alpha=0.5)
    assert f.predict(0) is None
    f.observe(sample(0, 10.0, True))
    assert f.predict(0) == (10.0, 10.0)  # C unseen: assumed like L
    f.observe(sample(0, 30.0, False))
    f.observe(sample(0, 20.0, True))
    assert f.predict(0) == (15.0, 30.0)


# ------------------------------------------------------------------------------------------- oracle
def _link(rate="12mbps", queue="dualpi2"):
    return Link(trace_from_spec(rate), parse_queue(queue), delay=0.01, start=0.0)


def test_oracle_estimate_follows_the_queue_that_holds_the_backlog():
    idle = _link()
    l_ms, c_ms = estimate_queue_delays(idle, 0.0)
    assert l_ms == pytest.approx(c_ms, abs=1.0) and 10.0 <= l_ms < 12.5  # delay + about one opportunity

    l_busy = _link()
    for _ in range(60):  # 90 kB of ECT(1) at once: ~60 ms of L backlog at 12 Mbit/s
        l_busy.enqueue(Packet(1500, ECT1), 0.0)
    l_ms, c_ms = estimate_queue_delays(l_busy, 0.0)
    assert l_ms > 60.0 and c_ms < 25.0  # C is served through the WRR share while L drains

    c_busy = _link()
    for _ in range(60):
        c_busy.enqueue(Packet(1500, ECT0), 0.0)
    l_ms, c_ms = estimate_queue_delays(c_busy, 0.0)
    assert c_ms > 60.0 and l_ms < 15.0  # L goes first

    fifo = _link(queue="infinite")
    for _ in range(60):
        fifo.enqueue(Packet(1500, NOT_ECT), 0.0)
    l_ms, c_ms = estimate_queue_delays(fifo, 0.0)
    assert l_ms == c_ms > 60.0  # one FIFO: no queue to choose


def test_oracle_board_round_trip_and_staleness(tmp_path):
    w = OracleBoard(str(tmp_path / "b"), create=True)
    r = OracleBoard(str(tmp_path / "b"), create=False)
    assert r.read() is None  # nothing published yet
    w.publish(time.monotonic(), 3.5, 40.0)
    assert r.read() == (3.5, 40.0)
    w.publish(time.monotonic() - 1.0, 1.0, 2.0)
    assert r.read(max_age_s=0.05) is None  # stale: the emulator stopped publishing
    w.close()
    r.close()


# ------------------------------------------------------------------------------------------- specs
def test_cross_and_flow_specs():
    assert parse_cross_spec("onoff-ect1:16mbps:300:1700").on_s == pytest.approx(0.3)
    assert parse_cross_spec("scalable").n == 1 and parse_cross_spec("scalable-burst:4:200:800").n == 4
    assert parse_cross_spec("tcp-onoff:1000:1000:500").rate_bps == pytest.approx(0.5)
    for bad in ("tcp:vegas", "udp-ect1:fast", "onoff-ect1:1mbps:0:10", "scalable:0", "bogus",
                "udp-ect1:1e9mbps", "onoff-ect1:1e9mbps:100:100"):  # the last two seemed to hang
        with pytest.raises(SwiftQueueEvalError, match="--cross"):
            parse_cross_spec(bad)
    assert parse_flow_spec("tokens:30").rate == 30 and parse_flow_spec("rt:2mbps").rate == 2e6
    for bad in ("tokens:-1", "rt:1e9mbps"):
        with pytest.raises(SwiftQueueEvalError, match="--flow"):
            parse_flow_spec(bad)
    assert parse_cross("onoff-ect1:8mbps:500:1500") == ("onoff-ect1", "8mbps:500:1500")  # namespaces too
    with pytest.raises(SwiftQueueEvalError, match="only in virtual time"):
        SwiftQueueConfig(down_trace="12mbps", cross=["scalable:2"]).validate()
    with pytest.raises(SwiftQueueEvalError, match="--policies"):
        SwiftQueueConfig(down_trace="12mbps", policies=["fastest"], virtual=True).validate()
    with pytest.raises(SwiftQueueEvalError, match="l4s listed twice"):  # its second run replaced the first
        SwiftQueueConfig(down_trace="12mbps", policies=["l4s", "oracle", "l4s"], virtual=True).validate()


def test_a_named_model_that_cannot_load_is_refused_not_replaced_by_l4s(tmp_path):
    """It used to run with the l4s fallback and report swiftqueue 0 % against l4s; the shipped model's
    fallback (the daemon's behaviour) is unchanged, and a model for a run without swiftqueue is not read."""
    bad = tmp_path / "m.onnx"
    bad.write_bytes(b"not onnx")
    for path, why in ((bad, "not a usable ONNX model"), (tmp_path / "none.onnx", "no such model file")):
        with pytest.raises(SwiftQueueEvalError, match=f"--model .*{why}"):
            SwiftQueueConfig(down_trace="12mbps", policies=["l4s", "swiftqueue"], model=str(path),
                             virtual=True).validate()
    SwiftQueueConfig(down_trace="12mbps", policies=["l4s", "classic"], model=str(bad), virtual=True).validate()


# ------------------------------------------------------------------------------------------- vsim
ONOFF = SwiftQueueConfig(down_trace="12mbps", cross=["onoff-ect1:16mbps:300:1700"], seconds=8.0, seed=3,
                         virtual=True, policies=["classic", "l4s", "swiftqueue", "oracle"])


@pytest.fixture(scope="module")
def onoff_summary():
    return run_virtual_all(ONOFF)


def test_virtual_run_has_the_documented_json_shape(onoff_summary):
    summary, _runs = onoff_summary
    assert summary["backend"] == "virtual" and summary["config"]["cross"] == ONOFF.cross
    assert list(summary["policies"]) == ONOFF.policies
    for d in summary["policies"].values():
        assert set(METRIC_KEYS) <= set(d)
        assert 0.0 <= d["stall_ratio"] < 1.0 and d["tokens"] == 400
        assert d["p50_ms"] <= d["p95_ms"] <= d["p99_ms"] <= d["p999_ms"]
    pol = summary["policies"]
    assert pol["l4s"]["l_share"] == 1.0 and pol["classic"]["l_share"] == 0.0
    assert set(summary["comparison"]) == {"classic", "swiftqueue", "oracle"}
    json.dumps(summary, allow_nan=False)  # plain JSON: no NaN leaks


def test_bursting_l4s_cross_traffic_makes_l_worse_and_the_oracle_avoids_it(onoff_summary):
    summary, _runs = onoff_summary
    pol = summary["policies"]
    assert pol["l4s"]["p99_ms"] > 60.0  # the bursts build an L queue of tens of ms
    assert pol["oracle"]["p99_ms"] < 0.5 * pol["l4s"]["p99_ms"]
    assert 0.3 < pol["oracle"]["l_share"] < 0.95  # it really switches, both ways
    # throughput of the app-limited token stream does not depend on the queue
    assert pol["oracle"]["throughput_mbps"] == pytest.approx(pol["l4s"]["throughput_mbps"], rel=0.1)


def test_virtual_runs_are_deterministic():
    cfg = SwiftQueueConfig(down_trace="12mbps", cross=["tcp:cubic", "udp-ect1:2mbps"], seconds=3.0, seed=7,
                           virtual=True, policies=["l4s", "oracle"], flow="rt:1mbps")
    a, _ = run_virtual_all(cfg)
    b, _ = run_virtual_all(cfg)
    for doc in (a, b):  # the run's own circumstances: when, how long, under what load
        for key in ("started_utc", "wall_s", "load_average"):
            assert key in doc["provenance"]
            del doc["provenance"][key]
    assert a == b


def test_bulk_marked_flow_fills_the_link():
    cfg = SwiftQueueConfig(down_trace="12mbps", seconds=4.0, virtual=True, policies=["l4s", "classic"], flow="bulk")
    summary, _ = run_virtual_all(cfg)
    pol = summary["policies"]
    assert pol["l4s"]["throughput_mbps"] > 6.0 and pol["l4s"]["ce_rate"] > 0.0  # scalable: marked, still busy
    assert pol["l4s"]["p99_ms"] < pol["classic"]["p99_ms"]  # L keeps its own queue short
    assert not any(math.isnan(v) for v in pol["l4s"].values() if isinstance(v, float))


def test_cli_virtual_writes_json_and_plot(tmp_path, capsys):
    from tokenwire.daemon.cli import main

    out, png = tmp_path / "sq.json", tmp_path / "sq.png"
    rc = main(["testbed", "swiftqueue", "--virtual", "--down-trace", "12mbps", "--cross",
               "onoff-ect1:16mbps:300:1700", "--seconds", "4", "--policies", "l4s,oracle", "--json", str(out),
               "--plot", str(png)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "oracle: P99" in text and "lower than l4s" in text and "backend virtual" in text
    data = json.loads(out.read_text())
    assert set(data["policies"]) == {"l4s", "oracle"} and png.stat().st_size > 10_000


@pytest.mark.parametrize("option", [["--up-loss", "iid:0.1"], ["--up-mbps", "5"], ["--up-trace", "5mbps"],
                                    ["--cross", "tcp:bbr"]])
def test_cli_virtual_refuses_up_link_options_it_would_ignore(option, capsys):
    """vsim returns acks after a fixed delay: an up-link option ran, silently without effect; and tcp:bbr ran
    as a Reno model under BBR's name."""
    from tokenwire.daemon.cli import main

    assert main(["testbed", "swiftqueue", "--virtual", "--down-trace", "12mbps", *option]) == 2
    assert "the namespace run" in capsys.readouterr().err


def test_a_queue_at_the_path_floor_is_never_left():
    """Predictions may say the other queue is faster, but nothing beats the fastest latency ever seen."""
    f = Scripted((30.0, 15.0))  # a model that (wrongly) expects C to be much faster
    p = SwiftQueuePolicy(f, margin_ms=1.0, hysteresis_ms=1.0)
    p.on_sample(sample(0.0, 20.0, True))  # floor 20 ms, and L's own recent samples are at it
    assert p.codepoint(0.1) == ECT1
    for k in range(3):  # L really slows down: its last three samples are far above the floor
        p.on_sample(sample(0.2 + k / 100, 60.0 + k, True))
    f.pred = (60.0, 21.0)
    assert p.codepoint(0.3) == ECT0
    p.on_sample(sample(0.4, 21.0, False))  # C measured at the floor ...
    f.pred = (10.0, 21.5)  # ... so even a rosy L prediction does not pull the flow back into L
    assert p.codepoint(0.5) == ECT0
    for k in range(3):  # C slows down (a classic flow started): back to L when predicted faster
        p.on_sample(sample(0.6 + k / 100, 45.0, False))
    f.pred = (22.0, 40.0)
    assert p.codepoint(0.7) == ECT1


@pytest.mark.parametrize("refuge_only", [True, False])
def test_l_is_left_only_for_a_c_queue_that_looks_empty(refuge_only):
    """During an L burst DualPI2 serves C at its 10 % WRR share: a C queue with a backlog is no refuge."""
    f = Scripted((20.0, 20.0))
    p = SwiftQueuePolicy(f, margin_ms=1.0, hysteresis_ms=1.0, refuge_only=refuge_only)
    p.on_sample(sample(0.0, 20.0, True))  # floor 20 ms
    for k in range(3):  # the flow sat in C while a classic flow kept a standing queue there
        p.on_sample(sample(0.1 + k / 100, 35.0, False))
    assert p.codepoint(0.2) == ECT1  # (predictions equal: L)
    for k in range(3):  # an L burst: L's samples climb far above the floor, the model expects C faster
        p.on_sample(sample(0.3 + k / 100, 70.0 + k, True))
    f.pred = (70.0, 36.0)
    assert p.codepoint(0.4) == (ECT1 if refuge_only else ECT0)
    if refuge_only:
        p.on_sample(sample(0.5, 20.5, False))  # a C sample at the floor (C drained): now C is a refuge
        assert p.codepoint(0.6) == ECT0


@pytest.mark.parametrize("flag", [[], ["--no-refuge-rule"]])
def test_namespace_endpoint_builds_the_policy_with_the_refuge_setting(flag):
    """The namespace run's server builds its policy from its own argv: the switch must survive that hop."""
    pytest.importorskip("onnxruntime")
    from tokenwire.testbed.endpoints import build_parser
    from tokenwire.testbed.swiftqueue_netns import endpoint_policy_factory

    args = build_parser().parse_args(["server", "--scheme", "chatterbox", "--host", "10.0.0.1", "--port", "4433",
                                      "--out", "x.json", "--marking", "swiftqueue", *flag])
    factory, cc, _ = endpoint_policy_factory(args)
    policy = factory()
    assert cc == "prague" and isinstance(policy, SwiftQueuePolicy)
    assert policy.refuge_only is (not flag)
