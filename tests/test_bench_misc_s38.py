"""``bench predictor``, ``bench emulator`` and ``kv bench``: the baseline timed beside its subject, the JSON written
before the table, the emulator's delivered rate and "sustained" rate, provenance, and kv bench's signals, progress
and precision. Fake clocks, fake forecasters and scripted sender/sink reports: no timing is asserted."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tokenwire.daemon.cli import main

PROVENANCE_KEYS = {"started_utc", "wall_s", "cpus", "load_average", "git_commit", "libraries"}


@pytest.fixture
def gone_reader(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], None]]:
    """Makes stdout a pipe whose reader has gone (`| head -1`, after its line), line-buffered: a printed line is a
    BrokenPipeError at once. Called in the test: pytest's capture takes stdout back once the fixtures are set up."""
    r, w = os.pipe()
    os.close(r)
    stream = os.fdopen(w, "w", buffering=1)
    yield lambda: monkeypatch.setattr(sys, "stdout", stream)
    monkeypatch.undo()
    with contextlib.suppress(OSError):
        stream.close()


# -- bench predictor: the baseline timed beside the subject, repeat by repeat
class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Forecaster:
    """Each call logs (name, what) and moves the fake clock by its cost."""

    def __init__(self, name: str, log: list[tuple[str, str]], clock: _FakeClock, cost: float) -> None:
        self.name, self.log, self.clock, self.cost = name, log, clock, cost
        self.path, self.window, self.digest = f"{name}.onnx", 64, "0" * 64  # (digest: the JSON's provenance)

    def _tick(self, what: str) -> None:
        if not self.log or self.log[-1] != (self.name, what):  # one entry per run of calls
            self.log.append((self.name, what))
        self.clock.now += self.cost

    def observe(self, sample: Any) -> None:
        if self.log is not None and getattr(self, "timing", False):
            self._tick("observe")

    def predict(self, now: float) -> tuple[float, float]:
        self._tick("predict")
        return (1.0, 1.0)

    def predict_batch(self, nows: list[float]) -> None:
        self._tick(f"batch {len(nows)}")


def _fake_forecasters(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """ONNX (100 µs a call) and EWMA (0.1 µs) on a fake clock, in place of the real ones; their call log."""
    from tokenwire.predictor import bench, runtime

    log: list[tuple[str, str]] = []
    clock = _FakeClock()
    onnx = _Forecaster("onnx", log, clock, 100e-6)
    ewma = _Forecaster("ewma", log, clock, 0.1e-6)
    for fc in (onnx, ewma):
        fc.timing = True
    monkeypatch.setattr(bench, "_clock", clock, raising=False)
    monkeypatch.setattr(runtime, "load_forecaster", lambda model: onnx)
    monkeypatch.setattr(runtime, "EwmaLatencyForecaster", lambda: ewma)
    monkeypatch.setattr(bench, "model_failure", lambda fc: None)
    return log


def test_bench_predictor_times_ewma_beside_onnx_in_every_repeat(monkeypatch, tmp_path, capsys):
    """ONNX's phases all ran first and EWMA's after them (its 2 000 calls lasting 0.2 ms against ONNX's 0.5 s), so a
    preemption hit one side only: the ratio swung 2 503x-4 007x over five runs."""
    log = _fake_forecasters(monkeypatch)
    out = tmp_path / "p.json"
    assert main(["bench", "predictor", "--calls", "3", "--repeats", "2", "--json", str(out)]) == 0
    timed = log[log.index(("ewma", "observe")) + 1:]  # after both histories were fed
    # calibration, then each repeat: every phase of the two next to each other, in alternating order
    calibration = [("onnx", "predict"), ("ewma", "predict"), ("onnx", "observe"), ("ewma", "observe")]
    subject_first = [("onnx", "predict"), ("ewma", "predict"), ("onnx", "batch 8"), ("onnx", "batch 64"),
                     ("onnx", "observe"), ("ewma", "observe")]
    baseline_first = [("ewma", "predict"), ("onnx", "predict"), ("onnx", "batch 8"), ("onnx", "batch 64"),
                      ("ewma", "observe"), ("onnx", "observe")]
    assert timed == calibration + subject_first + baseline_first, log
    doc = json.loads(out.read_text())
    one_onnx, one_ewma = doc["onnx"]["batches"]["1"], doc["ewma"]["batches"]["1"]
    # EWMA runs as long as ONNX did: 3 calls of 100 µs = 300 µs, so 3 000 calls of 0.1 µs
    assert one_onnx["calls"] == 3 and one_ewma["calls"] == 3000
    assert doc["onnx"]["observe_calls"] == 3 and doc["ewma"]["observe_calls"] == 3000  # (observe: as predict)
    for side in (one_onnx, one_ewma):
        assert len(side["us_per_call_runs"]) == 2
        assert side["us_per_call_min"] == min(side["us_per_call_runs"]) <= side["us_per_call"]
        assert side["us_per_call"] <= side["us_per_call_max"] == max(side["us_per_call_runs"])
    assert one_onnx["us_per_call"] == pytest.approx(100.0) and one_ewma["us_per_call"] == pytest.approx(0.1)
    runs = doc["onnx_vs_ewma_runs"]["us_per_prediction"]["1"]
    assert runs["runs"] == pytest.approx([1000.0, 1000.0]) and runs["min"] <= runs["median"] <= runs["max"]
    assert doc["onnx_vs_ewma"]["us_per_prediction"]["1"] == pytest.approx(1000.0)
    assert doc["interleaved"] is True
    assert set(doc["onnxruntime_threads"]) >= {"intra_op", "inter_op"}
    assert set(doc["provenance"]) >= PROVENANCE_KEYS


def test_baseline_calls_last_as_long_as_the_subject_within_bounds():
    from tokenwire.predictor.bench import MAX_BASELINE_CALLS, baseline_calls

    assert baseline_calls(0.5, 1e-7, 2000) == 5_000_000 == MAX_BASELINE_CALLS
    assert baseline_calls(0.5, 1e-3, 2000) == 2000  # never fewer than the subject's calls
    assert baseline_calls(0.01, 1e-6, 20) == 10_000
    assert baseline_calls(0.5, 0.0, 20) == 20  # a clock too coarse to see a call


def test_onnxruntime_threads_are_the_sessions_own():
    pytest.importorskip("onnxruntime")
    from tokenwire.predictor.bench import onnx_threads
    from tokenwire.predictor.runtime import load_forecaster

    threads = onnx_threads(load_forecaster(None))
    assert threads["intra_op"] == 1 and threads["inter_op"] == 1
    assert threads["providers"] == ["CPUExecutionProvider"]


def test_bench_predictor_writes_its_json_before_the_table(monkeypatch, tmp_path, gone_reader):
    """`bench predictor --json p.json | head -1` lost the JSON: the table came first, then a BrokenPipeError."""
    _fake_forecasters(monkeypatch)
    out = tmp_path / "p.json"
    gone_reader()
    main(["bench", "predictor", "--calls", "3", "--repeats", "1", "--json", str(out)])  # (status: the CLI's rule)
    doc = json.loads(out.read_text())
    assert doc["onnx"]["batches"]["1"]["calls"] == 3


# -- bench emulator
def _report(sent: int, pps: float, elapsed: float) -> dict[str, Any]:
    return {"sent": sent, "pps": pps, "elapsed": elapsed, "errors": 0}


def test_emulator_delivered_rate_is_over_the_senders_span(monkeypatch):
    """"veth 62,406 pkt/s delivered (offered 40,791)": the sink's rate was over its first-to-last read, and a sink
    that read late drained its buffer at once."""
    from tokenwire.testbed import bench

    sent = _report(40_791, 40_791.0, 1.0)
    got = {"received": 40_000, "pps": 62_406.0}  # read in 0.64 s
    monkeypatch.setattr(bench, "_run_pair", lambda *a: (sent, got))
    flood = bench._flood(None, 1.0)
    assert flood["delivered_pps"] == pytest.approx(40_000.0) and flood["delivered_pps"] <= flood["sent_pps"]
    assert flood["sink_read_pps"] == 62_406.0
    trial = bench._trial(None, 40_000, 1.0)
    assert trial["delivered_pps"] == pytest.approx(40_000.0) and trial["delivered_pps"] <= trial["offered_pps"]


def _scripted_ladder(monkeypatch: pytest.MonkeyPatch, script: dict[int, tuple[float, float]]) -> None:
    from tokenwire.testbed import bench

    def pair(tb: Any, sink_args: list[str], send_args: list[str], timeout: float) -> tuple[dict, dict]:
        target = int(send_args[send_args.index("--rate") + 1])
        offered, loss = script[target]
        n = round(offered)
        return _report(n, offered, 1.0), {"received": round(n * (1 - loss)), "pps": 2 * offered}

    monkeypatch.setattr(bench, "_run_pair", pair)


def test_emulator_sustained_is_the_highest_passing_rungs_median(monkeypatch, capsys):
    """It was the largest delivered rate of any passing rung, not the documented median of the highest one; and the
    rungs, named by what the sender offered, read out of order ("33k, 33k, 79k, 51k, 83k")."""
    from tokenwire.testbed import bench

    _scripted_ladder(monkeypatch, {10_000: (10_000, 0.0), 20_000: (20_000, 0.0), 40_000: (33_000, 0.0),
                                   60_000: (33_000, 0.0), 80_000: (79_000, 0.0), 100_000: (51_000, 0.009),
                                   120_000: (83_000, 0.05)})
    lad = bench._ladder(None, 1.0, 1)  # (one trial a rung: the report lists no trials)
    assert [s["target_pps"] for s in lad["steps"]] == list(bench.LADDER_PPS)
    assert lad["sustained_pps"] == pytest.approx(51_000 * (1 - 0.009), abs=1)  # the 100 k rung's
    assert lad["sender_limited"]
    flood = {"sent_pps": 1000.0, "delivered_pps": 900.0, "loss": 0.1, "emulator_forwarded_pps": 950.0,
             "lost_before_emulator": 0.0, "lost_in_emulator": 0.05, "lost_after_emulator": 0.05}
    probes = {"one_way_p50_ms": 0.1, "one_way_p99_ms": 0.2, "configured_delay_ms": 20.0, "error_p50_ms": 0.1,
              "error_p99_ms": 0.2, "error_max_ms": 0.3}
    core = {q: {"pps": 1.0} for q in ("droptail", "dualpi2")}
    bench.print_report({"core_virtual_time": core, "veth_baseline": {"flood": flood, "probes": probes},
                        "emulator": {"flood": flood, "ladder": lad, "probes_no_delay": probes,
                                     "probes_delay": probes}})
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("sustained"))
    cells = line.split("->loss ", 1)[1]
    assert cells.startswith("10k->0.0%, 20k->0.0%, 40k (offered 33k)->0.0%, 60k (offered 33k)->0.0%, 80k->0.0%, "
                            "100k (offered 51k)->0.9%, 120k (offered 83k)->5.0%"), line


def test_emulator_writes_its_json_before_the_report_and_records_provenance(monkeypatch, tmp_path, gone_reader):
    from tokenwire.testbed import bench, netns, topology

    class FakeTestbed:
        backend = "userspace"

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __enter__(self) -> FakeTestbed:
            return self

        def __exit__(self, *exc: Any) -> None:
            pass

        def stats(self) -> dict:
            return {"release_late_ms": {}}

    monkeypatch.setattr(netns, "check_root", lambda: None)
    monkeypatch.setattr(topology, "Testbed", FakeTestbed)
    monkeypatch.setattr(topology, "DirectLink", FakeTestbed)
    monkeypatch.setattr(bench, "bench_core", lambda: {})
    monkeypatch.setattr(bench, "_flood", lambda *a, **k: {"marker": "flood"})
    monkeypatch.setattr(bench, "_probes", lambda *a, **k: {})
    monkeypatch.setattr(bench, "_ladder", lambda *a, **k: {})
    monkeypatch.setattr(bench, "print_report", lambda res: print("the report"))
    out = tmp_path / "emu.json"
    gone_reader()
    with pytest.raises(BrokenPipeError):  # the report's line, or "wrote emu.json" after the file
        bench.cmd_bench(type("Args", (), {"seconds": 1.0, "delay_ms": 20.0, "rate": 1000.0, "repeats": 1,
                                          "json": str(out)})())
    doc = json.loads(out.read_text())
    assert doc["emulator"]["flood"] == {"marker": "flood"}
    assert set(doc["provenance"]) >= PROVENANCE_KEYS


# -- kv bench
def test_kv_bench_prints_each_phase_the_codec_line_and_small_rates(monkeypatch, capsys):
    pytest.importorskip("numba")
    from tokenwire.transport.cachegen import bench

    doc = bench.run_bench(layers=1, heads=1, head_dim=8, tokens=4, repeats=2)
    err = capsys.readouterr().err.splitlines()
    phases = [ln for ln in err if ln.endswith(" ...")]
    assert len(phases) == 5 and any("rANS encode" in ln for ln in phases), err
    codec_line = next(ln for ln in err if "full codec" in ln and not ln.endswith(" ..."))
    assert "encode" in codec_line and "decode" in codec_line
    # 32 symbols: about 1 MB/s or less (how much less is the host's), once printed "0 MB/s"
    assert not any(" 0 MB/s" in ln or "(runs 0-0)" in ln for ln in err), err
    assert bench.mbps_text(doc["encode_MBps"]) != "0"
    assert bench.mbps_text(0.0421) == "0.0421" and bench.mbps_text(0.985) == "0.985"
    assert bench.mbps_text(38.2) == "38.2" and bench.mbps_text(120.4) == "120"
    assert set(doc["provenance"]) >= PROVENANCE_KEYS
    assert doc["load_average"]["start"] == doc["provenance"]["load_average"]["start"]
    assert doc["load_average"]["end"] == doc["provenance"]["load_average"]["end"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_kv_bench_takes_sigterm_and_sighup_as_ctrl_c(sig):
    """kv bench died with 143 (SIGHUP: 129) and no word; the other benches say "interrupted" and exit 130."""
    pytest.importorskip("numba")
    script = f"""
        import os, signal, sys, time
        from tokenwire.transport.cachegen import bench
        from tokenwire.daemon.cli import main

        def run_bench(**kwargs):
            os.kill(os.getpid(), {int(sig)})
            for _ in range(600):  # a bound on the hang: the handler interrupts the first sleep
                time.sleep(0.05)
            return {{}}

        bench.run_bench = run_bench
        sys.exit(main(["kv", "bench", "--tokens", "4"]))
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 130, (out.returncode, out.stderr)
    assert out.stderr.strip().splitlines()[-1] == "interrupted", out.stderr
