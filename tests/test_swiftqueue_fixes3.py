"""``testbed swiftqueue`` and ``config check`` fixes (probe /tmp/xp/s27/pI):

1. a model that loads but fails on the packet path made swiftqueue mark like l4s while the run reported
   "swiftqueue: P99 0.0% lower than l4s" and exited 0 (virtual and namespace runs);
2. ``--backend kernel`` was refused for the oracle's sake even with ``--policies l4s``;
3. ``--queue droptail`` first asked for packets=N, then refused the queue kind anyway;
4. ``config check`` named the congestion controller of l4s and swiftqueue but not classic's (reno-ecn).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tokenwire.daemon.cli import main
from tokenwire.testbed.swiftqueue_eval import SwiftQueueConfig, SwiftQueueEvalError, run_virtual_all
from tokenwire.transport.marking import ECT1, LatencySample, SwiftQueuePolicy

SQ = ["testbed", "swiftqueue", "--down-trace", "12mbps", "--delay-ms", "20"]


def failing_model(path: Path) -> Path:
    """A model that passes the load-time trial (all-zero windows) but raises on real ones: its output is
    reshaped to ``[-1, 2 + (max(x) > 0)]`` (as /tmp/xp/s27/pI/mkfail.py builds it)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from tokenwire.predictor.runtime import shipped_model_path

    shipped = onnx.load(str(shipped_model_path()))

    def ints(name: str, values: list[int]) -> Any:
        return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)

    node = helper.make_node
    nodes = [node("Slice", ["ref", "s0", "s2", "a1"], ["y0"]),
             node("ReduceMax", ["x"], ["mx"], keepdims=0),
             node("Constant", [], ["zero"], value=helper.make_tensor("z", TensorProto.FLOAT, [], [0.0])),
             node("Greater", ["mx", "zero"], ["g"]),
             node("Cast", ["g"], ["gi"], to=TensorProto.INT64),
             node("Unsqueeze", ["gi", "a0"], ["gi1"]),
             node("Add", ["two", "gi1"], ["w"]),
             node("Concat", ["m1", "w"], ["shape"], axis=0),
             node("Reshape", ["y0", "shape"], ["y"])]
    graph = helper.make_graph(
        nodes, "fails-on-data",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64, 9]),
         helper.make_tensor_value_info("ref", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        initializer=[ints("s0", [0]), ints("s2", [2]), ints("a1", [1]), ints("a0", [0]), ints("two", [2]),
                     ints("m1", [-1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = shipped.ir_version
    for prop in shipped.metadata_props:
        model.metadata_props.append(onnx.StringStringEntryProto(key=prop.key, value=prop.value))
    onnx.save(model, str(path))
    return path


# ------------------------------------------------------------------------------------------- 1. fallback
def test_virtual_run_says_swiftqueue_fell_back_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = failing_model(tmp_path / "failrun.onnx")
    out = tmp_path / "sq.json"
    rc = main([*SQ, "--virtual", "--cross", "onoff-ect1:16mbps:300:1700", "--policies", "l4s,swiftqueue",
               "--seconds", "4", "--model", str(model), "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 1  # the results are written, the status says the run did not measure swiftqueue
    fb = json.loads(out.read_text())["policies"]["swiftqueue"]["fallback"]
    assert fb["to"] == "l4s" and fb["stage"] == "run" and "Reshape" in fb["reason"]
    assert 0 < fb["packets"] < fb["of_packets"] and 0.0 < fb["at_s"] < 4.0  # cold packets came first
    rows = text.splitlines()
    sq_row = next(i for i, line in enumerate(rows) if line.startswith("swiftqueue "))
    assert rows[sq_row + 1].startswith("  ^ swiftqueue: FELL BACK to l4s at ")  # right under its row
    assert f"{fb['packets']} of {fb['of_packets']} packets marked like l4s" in rows[sq_row + 1]
    assert f"(swiftqueue FELL BACK to l4s for {fb['packets']} of {fb['of_packets']} packets)" in text
    assert "(FAILED: swiftqueue fell back to l4s)" in text


def test_virtual_run_with_an_unloadable_shipped_model_reports_the_fallback_from_the_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenwire.predictor import runtime

    def unloadable(model: str | None = None, **kw: Any) -> Any:
        raise runtime.ModelError("shipped model: truncated")

    monkeypatch.setattr(runtime, "load_forecaster", unloadable)
    cfg = SwiftQueueConfig(down_trace="12mbps", seconds=3.0, virtual=True, policies=["l4s", "swiftqueue"])
    summary, _ = run_virtual_all(cfg)
    fb = summary["policies"]["swiftqueue"]["fallback"]
    assert fb["stage"] == "load" and "truncated" in fb["reason"] and fb["at_s"] == 0.0
    assert fb["packets"] == fb["of_packets"] > 0
    assert "fallback" not in summary["policies"]["l4s"]


def test_a_working_model_reports_no_fallback() -> None:
    pytest.importorskip("onnxruntime")
    cfg = SwiftQueueConfig(down_trace="12mbps", cross=["onoff-ect1:16mbps:300:1700"], seconds=3.0, virtual=True,
                           policies=["swiftqueue"])
    summary, _ = run_virtual_all(cfg)
    assert "fallback" not in summary["policies"]["swiftqueue"]


def _sample(i: int) -> LatencySample:
    return LatencySample(sent_at=i * 0.02, ack_at=i * 0.02 + 0.05, latency_ms=20.0 + i % 7, size=200,
                         queue_l=i % 3 != 0, ce=False)


def test_namespace_server_records_when_its_model_failed_and_the_harness_reports_it(tmp_path: Path) -> None:
    from tokenwire.testbed.endpoints import build_parser
    from tokenwire.testbed.swiftqueue_netns import endpoint_policy_factory, server_fallback

    model = failing_model(tmp_path / "failrun.onnx")
    args = build_parser().parse_args(["server", "--scheme", "chatterbox", "--host", "10.0.0.1", "--port", "4433",
                                      "--out", "x.json", "--marking", "swiftqueue", "--model", str(model)])
    factory, _cc, info = endpoint_policy_factory(args)
    policy = factory()
    assert isinstance(policy, SwiftQueuePolicy)
    origin = time.monotonic()
    for i in range(200):  # until the window is full and the model meets real inputs
        policy.on_sample(_sample(i))
        assert policy.codepoint(i * 0.02) == ECT1
    assert policy.failed is not None and "fallback" in info  # what the server writes into its JSON
    json.dumps(info)
    fb = server_fallback(json.loads(json.dumps(info)), origin, 300)
    assert fb is not None and fb["stage"] == "run" and "Reshape" in fb["reason"]
    assert fb["packets"] == policy.decisions["fallback"] > 0 and fb["of_packets"] == 200
    assert fb["at_s"] >= 0.0
    assert "fallback" in info["policy"]  # the JSON's server_policy says so too


def test_namespace_harness_reports_a_model_that_did_not_load() -> None:
    from tokenwire.testbed.swiftqueue_netns import server_fallback

    marking = {"policy": "l4s (fallback: no model)", "decisions": {}, "forecaster": "none: no such model file"}
    fb = server_fallback(marking, 100.0, 250)
    assert fb == {"to": "l4s", "stage": "load", "reason": "no such model file", "at_s": 0.0, "packets": 250,
                  "of_packets": 250}
    assert server_fallback({"policy": "swiftqueue", "decisions": {"l": 3}, "forecaster": "x"}, 0.0, 3) is None


def test_namespace_table_and_exit_status_use_the_fallback_block(capsys: pytest.CaptureFixture[str]) -> None:
    """The namespace run prints through the same table; its summary carries the block from server_fallback."""
    from tokenwire.testbed.swiftqueue_cli import fallen_back, print_table

    row = {"p50_ms": 20.0, "p95_ms": 30.0, "p99_ms": 40.0, "p999_ms": 41.0, "throughput_mbps": 0.1,
           "l_share": 1.0, "ce_rate": 0.0, "drop_rate": 0.0, "packets": 10}
    fb = {"to": "l4s", "stage": "run", "reason": "Fail: x", "at_s": 2.5, "packets": 7, "of_packets": 10}
    summary = {"policies": {"l4s": dict(row), "swiftqueue": {**row, "fallback": fb, "forecaster": "Onnx (m)"}},
               "comparison": {"swiftqueue": {"p99_reduction_vs_l4s": 0.0}}, "backend": "userspace"}
    print_table(summary)
    text = capsys.readouterr().out
    assert "  ^ swiftqueue: FELL BACK to l4s at 2.500 s: the latency model failed on the packet path (Fail: x)" in text
    assert fallen_back(summary) == ["swiftqueue"]


# ------------------------------------------------------------------------------------------- 2. --backend kernel
def test_backend_kernel_is_refused_for_the_real_reason(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*SQ, "--backend", "kernel", "--policies", "l4s"]) == 2
    err = capsys.readouterr().err
    assert "per-packet log" in err and "oracle" not in err  # no oracle was asked for
    assert main([*SQ, "--backend", "kernel", "--policies", "l4s,oracle"]) == 2
    err = capsys.readouterr().err
    assert "per-packet log" in err and "the oracle policy reads the emulator's queue state" in err
    assert main([*SQ, "--virtual", "--backend", "kernel", "--policies", "l4s"]) == 2
    assert "virtual time runs in the simulator" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- 3. --queue kind first
@pytest.mark.parametrize("queue", ["droptail", "droptail:packets=100", "infinite", "infinite:x=1", "codel"])
def test_a_queue_without_an_l_queue_is_refused_by_its_kind_first(queue: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*SQ, "--virtual", "--queue", queue, "--policies", "l4s"]) == 2
    err = capsys.readouterr().err
    assert "needs a DualQ queue" in err and "packets=N" not in err
    with pytest.raises(SwiftQueueEvalError, match="needs a DualQ queue"):
        SwiftQueueConfig(down_trace="12mbps", queue=queue, virtual=True).validate()


def test_a_bad_dualpi2_spec_still_names_its_key() -> None:
    with pytest.raises(SwiftQueueEvalError, match="unknown dualpi2 key"):
        SwiftQueueConfig(down_trace="12mbps", queue="dualpi2:bogus=1", virtual=True).validate()


# ------------------------------------------------------------------------------------------- 4. config check
@pytest.mark.parametrize(("marking", "server", "says"), [
    ('policy = "classic"', "", "marking: classic; reno-ecn congestion control"),
    ('policy = "classic"', 'congestion = "cubic"', "marking: classic; cubic-ecn congestion control"),
    ('policy = "classic"\nclassic_codepoint = "not-ect"', "", "marking: classic; reno congestion control"),
    ('policy = "l4s"', "", "marking: l4s; prague congestion control"),
])
def test_config_check_names_the_congestion_controller_of_every_policy(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], marking: str, server: str, says: str) -> None:
    path = tmp_path / "tw.toml"
    path.write_text(f'[server]\nlisten = ["127.0.0.1:50950"]\n{server}\n[metrics]\nlisten = "127.0.0.1:50951"\n'
                    f"[marking]\n{marking}\n")
    assert main(["config", "check", str(path)]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("marking:")]
    assert lines == [says]  # and named once (l4s's came from the summary already)


def test_config_check_without_marking_names_no_controller(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tw.toml"
    path.write_text('[server]\nlisten = ["127.0.0.1:50952"]\n[metrics]\nlisten = "127.0.0.1:50953"\n')
    assert main(["config", "check", str(path)]) == 0
    assert "  marking: off\n" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- 5. the docs' figure
def test_docs_quote_the_measured_virtual_run_time_not_the_old_20_s() -> None:
    """docs/swiftqueue.md said "~20 s per 60-s run with the ONNX model"; all four policies take ~3 s now (a
    figure re-measured by hand: no timing assertion here), and the example it annotates must still run."""
    import shlex

    from tokenwire.daemon.cli import build_parser
    from tokenwire.testbed.swiftqueue_cli import _config

    text = (Path(__file__).resolve().parents[1] / "docs" / "swiftqueue.md").read_text()
    assert "~20 s per 60-s run" not in text
    block = text[text.index("# virtual time (vsim)"):]
    comment, _, rest = block.partition("tokenwire testbed swiftqueue")
    assert "~3 s for all four policies" in comment
    command = "tokenwire testbed swiftqueue" + rest[:rest.index("\n#")].replace("\\\n", " ")
    args = build_parser().parse_args(shlex.split(command)[1:])
    cfg = _config(args)
    assert cfg.virtual and cfg.seconds == 60 and cfg.policies == ["classic", "l4s", "swiftqueue", "oracle"]
