"""Fixes from a probe of the research commands (predictor, sim, testbed): a checkpoint that is any file, the
wording of a worse model, a swiftqueue run that measured nothing, where outputs may create folders, token
rates, the early-stop line, bench predictor's progress, collect's length and datasets out of send order."""

from __future__ import annotations

import argparse
import json
import math
import random
import re

import numpy as np
import pytest

from tokenwire.daemon.cli import CLIError, check_outputs, main, output_file
from tokenwire.predictor.dataset import DatasetError, load, save

# -- 1. `predictor export --checkpoint /etc/passwd`: an IndexError traceback from torch's unpickler


def test_a_text_file_as_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    pytest.importorskip("torch")
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n")  # 'r': IndexError
    assert main(["predictor", "export", "--checkpoint", str(passwd), "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tokenwire predictor export: error: {passwd}: not a checkpoint written by "
                          "`tokenwire predictor train`") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.onnx").exists()


def test_any_damaged_or_foreign_checkpoint_is_a_model_error(tmp_path):
    """Random bytes and mutated copies of a real checkpoint raised UnpicklingError, RuntimeError, IndexError,
    UnicodeDecodeError, EOFError, struct.error...; what unpickles may still be no checkpoint at all."""
    torch = pytest.importorskip("torch")
    from tokenwire.predictor.models import build
    from tokenwire.predictor.onnx_session import ModelError
    from tokenwire.predictor.train import load_checkpoint

    gru = build("gru", {"window": 8, "hidden": 4})
    good = tmp_path / "good.pt"
    torch.save({"kind": "gru", "config": gru.config, "state_dict": gru.state_dict()}, good)
    load_checkpoint(good)
    raw = good.read_bytes()
    rng = random.Random(7)
    files = []
    for i in range(120):
        data = bytearray(raw[:rng.randrange(len(raw))] if i % 3 == 0 else raw)
        if i % 3:
            for _ in range(1 + i % 4):
                data[rng.randrange(len(data))] = rng.randrange(256)
        if i % 10 == 0:
            data = bytearray(rng.randbytes(rng.randrange(1, 300)))
        files.append(bytes(data))
    foreign = [[1, 2], torch.zeros(3), {"kind": "lstm", "config": {}, "state_dict": {}},
               {"kind": "transformer", "config": {"heads": 0}, "state_dict": {}},  # ZeroDivisionError in build
               {"kind": "gru", "config": {"nope": 1}, "state_dict": gru.state_dict()},
               {"kind": "gru", "config": {"window": 8, "hidden": 5}, "state_dict": gru.state_dict()},
               {"kind": "gru", "config": gru.config, "state_dict": [1]}]
    for k, obj in enumerate(foreign):
        torch.save(obj, tmp_path / f"f{k}.pt")
    for k, data in enumerate(files):
        (tmp_path / f"m{k}.pt").write_bytes(data)
    for path in sorted(tmp_path.glob("[fm]*.pt")):
        try:
            load_checkpoint(path)
        except ModelError as exc:
            assert str(exc).startswith(f"{path}: not a checkpoint written by"), exc
            assert "\n" not in str(exc)
    for k in range(len(foreign)):
        with pytest.raises(ModelError):
            load_checkpoint(tmp_path / f"f{k}.pt")


# -- 2. "transformer MAE vs ewma: -3.8% lower" for a worse model


def _doc(transformer_mae, ewma_mae):
    row = {"mae_ms": transformer_mae, "rmse_ms": 1.0, "spike_mae_ms": math.nan, "n": 5, "n_spike": 0}
    return {"models": {"transformer": row, "ewma": {**row, "mae_ms": ewma_mae}}, "references": {}}


def test_eval_says_higher_when_the_model_is_worse():
    from tokenwire.predictor.cli import format_table

    assert "transformer MAE vs ewma: 3.8% higher (target >= 45% lower)" in format_table(_doc(10.38, 10.0))
    assert "transformer MAE vs ewma: 45.0% lower (target >= 45% lower)" in format_table(_doc(5.5, 10.0))
    assert "no ratio" in format_table(_doc(1.0, 0.0)) and "no ratio" in format_table(_doc(math.nan, 1.0))


def test_one_wording_of_a_comparison():
    from tokenwire.testbed.sim_cli import lower_or_higher

    assert lower_or_higher(3.0, 4.0) == "25.0% lower"
    assert lower_or_higher(5.0, 4.0) == "25.0% higher"
    assert lower_or_higher(4.0, 4.0) == lower_or_higher(4.0001, 4.0) == "0.0% lower"  # never "0.0% higher"
    assert lower_or_higher(1.0, 0.0) is None and lower_or_higher(math.nan, 1.0) is None
    assert lower_or_higher(1.0, math.inf) is None


# -- 3. testbed swiftqueue --virtual exited 0 when the marked flow delivered nothing


def test_virtual_swiftqueue_fails_like_sim_when_a_policy_measured_nothing(tmp_path, capsys):
    out = tmp_path / "sq.json"
    argv = ["testbed", "swiftqueue", "--virtual", "--down-trace", "12mbps", "--seconds", "2",
            "--policies", "l4s,classic", "--json", str(out)]
    assert main([*argv, "--loss", "iid:1"]) == 1
    text = capsys.readouterr().out
    assert "l4s: FAILED: the marked flow delivered no packet of " in text, text
    assert "classic: FAILED: the marked flow delivered no packet" in text
    assert "P99 vs l4s: comparison unavailable (l4s delivered no packet)" in text
    doc = json.loads(out.read_text())  # the results are still kept, as sim keeps them
    assert doc["policies"]["l4s"]["p99_ms"] is None and doc["policies"]["l4s"]["drop_rate"] == 1.0
    assert main(argv) == 0  # the same run without loss
    assert "FAILED" not in capsys.readouterr().out


# -- 4. output folders: made only below the current directory, never left behind empty


def test_a_missing_folder_outside_the_current_directory_is_refused_and_nothing_is_made(tmp_path, capsys):
    target = tmp_path / "nonexistent" / "dir" / "x.json"
    assert main(["sim", "--tokens", "10", "--json", str(target)]) == 2
    err = capsys.readouterr().err
    assert err == (f"tokenwire sim: error: --json {target}: folder {target.parent} does not exist; create it "
                   "first (a command makes missing folders only below the current directory)\n")
    assert not (tmp_path / "nonexistent").exists()
    for option in ("--out-dir", "--keep"):  # a folder option: its parent must exist
        with pytest.raises(CLIError, match=f"{option} .*: folder {re.escape(str(tmp_path / 'nonexistent'))} does not"):
            check_outputs(argparse.Namespace(**{option[2:].replace("-", "_"): str(tmp_path / "nonexistent" / "d")}))
    check_outputs(argparse.Namespace(out_dir=str(tmp_path / "new")))  # its own folder is what it makes
    assert not (tmp_path / "nonexistent").exists() and not (tmp_path / "new").exists()  # checked, nothing made


def test_below_the_current_directory_folders_are_made_as_the_docs_use_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["sim", "--tokens", "10", "--schemes", "chatterbox", "--json", "out/sim/x.json"]) == 0
    assert json.loads((tmp_path / "out" / "sim" / "x.json").read_text())["schemes"]["chatterbox"]["tokens_sent"] == 10


def test_plots_and_packet_logs_get_their_folders_below_the_current_directory(tmp_path, monkeypatch, capsys):
    """matplotlib and the emulator write these, not output_file: with check_outputs making nothing, `testbed
    swiftqueue --virtual ... --plot newdir/x.png` ran the whole experiment, then failed with no plot."""
    monkeypatch.chdir(tmp_path)
    assert main(["testbed", "swiftqueue", "--virtual", "--down-trace", "12mbps", "--seconds", "2",
                 "--policies", "classic,l4s", "--plot", "newdir/x.png"]) == 0
    assert (tmp_path / "newdir" / "x.png").stat().st_size > 0
    args = argparse.Namespace(log="logs/down.csv", pcap="caps/run", plot=None)
    check_outputs(args)
    assert (tmp_path / "logs").is_dir() and (tmp_path / "caps").is_dir()


def test_a_failed_write_removes_the_folders_it_made(tmp_path):
    with pytest.raises(RuntimeError), output_file(tmp_path / "a" / "b" / "x.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("the writer failed")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep.txt").write_text("a user's")
    with pytest.raises(RuntimeError), output_file(tmp_path / "a" / "b" / "x.bin"):
        raise RuntimeError("the writer failed")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["keep.txt"]  # only what it made, only empty


def test_failed_commands_leave_no_out_dir(tmp_path, monkeypatch, small, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["predictor", "collect-many", "--traces", "12mbps", "--seeds", "3-1", "--seconds", "1",
                 "--out-dir", "dd"]) == 2
    assert main(["predictor", "train", "--data", "/nope.npz", "--out-dir", "ck2", "--epochs", "1"]) == 2
    assert not (tmp_path / "dd").exists() and not (tmp_path / "ck2").exists()

    from tokenwire.predictor import dataset

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset, "collect", interrupted)  # after index.json was written
    assert main(["predictor", "collect-many", "--traces", "12mbps", "--seeds", "1", "--seconds", "1",
                 "--out-dir", "data/new"]) == 130
    assert not (tmp_path / "data").exists()  # nor the parent made for it
    (tmp_path / "old").mkdir()
    assert main(["predictor", "collect-many", "--traces", "12mbps", "--seeds", "1", "--seconds", "1",
                 "--out-dir", "old"]) == 130
    assert (tmp_path / "old" / "index.json").exists()  # a folder that was there is the user's: kept as it is


def test_a_train_that_fails_before_any_model_leaves_no_out_dir(tmp_path, monkeypatch, small, capsys):
    pytest.importorskip("torch")
    from tokenwire.predictor import train as train_mod
    from tokenwire.predictor.train import TrainingDiverged

    def diverged(*a, **k):
        raise TrainingDiverged(1)

    monkeypatch.setattr(train_mod, "train_net", diverged)
    monkeypatch.chdir(tmp_path)
    assert main(["predictor", "train", "--data", str(small), "--kinds", "gru", "--out-dir", "ck"]) == 2
    assert "training diverged" in capsys.readouterr().err and not (tmp_path / "ck").exists()
    assert main(["predictor", "train", "--data", str(small), "--kinds", "ar,gru", "--out-dir", "ck"]) == 2
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["ar.json", "train.json"]  # a result: kept


# -- 5. token rates: --rate 1e308 was a traceback, 1e20 a nonsense table


@pytest.mark.parametrize("rate", ["1e308", "1e20", "0.05", "10000.5"])
def test_sim_refuses_a_rate_outside_the_demo_range(rate, capsys):
    assert main(["sim", "--tokens", "10", "--rate", rate]) == 2
    err = capsys.readouterr().err
    assert err == (f"tokenwire sim: error: --rate {float(rate):g} must be a number of tokens/s in [0.1, 10000] "
                   "(the demo upstream's range)\n")


def test_compare_refuses_a_rate_outside_the_demo_range_before_any_run(monkeypatch, capsys):
    from tokenwire.testbed import compare, netns

    monkeypatch.setattr(netns, "check_root", lambda: None)
    monkeypatch.setattr(compare, "run_scheme", lambda *a, **k: pytest.fail("the run started"))
    assert main(["testbed", "compare", "--down-trace", "12mbps", "--tokens", "10", "--rate", "1e308"]) == 2
    assert capsys.readouterr().err.startswith(
        "tokenwire testbed compare: error: --rate 1e+308 must be a number of tokens/s")
    compare.CompareConfig(down_trace="12mbps", up_trace="12mbps", rate=10_000).validate()


def test_the_schedule_draws_at_any_finite_rate_and_is_unchanged():
    from tokenwire.daemon.demo_upstream import MAX_RATE, MIN_RATE, rate_problem, schedule

    assert schedule(4, rate=1e308) == [0.15] * 4  # was "gammavariate: alpha and beta must be > 0.0"
    assert all(math.isfinite(t) for t in schedule(50, rate=1e300, seed=3))

    def before(n, rate, seed):  # the draw as it was: gammavariate(shape, scale)
        rng = random.Random(f"demo-schedule:{seed}")
        shape = 1.0 / (0.35 * 0.35)
        t, out = 0.15, []
        for i in range(n):
            if i:
                t += rng.gammavariate(shape, 1.0 / (rate * shape))
                if rng.random() < 0.01:
                    t += rng.uniform(0.1, 0.4)
            out.append(t)
        return out

    for rate, seed in ((30.0, 0), (MIN_RATE, 1), (MAX_RATE, 2), (7.3, 11)):
        assert schedule(300, rate=rate, seed=seed) == before(300, rate, seed)  # bit for bit: sim results stay
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="finite number > 0"):
            schedule(3, rate=bad)
    assert rate_problem(MIN_RATE) is None and rate_problem(MAX_RATE) is None
    assert rate_problem(math.nan) and rate_problem(True) and rate_problem("30")


# -- 6. "early stop ... for 1 epochs" after the last planned epoch


@pytest.mark.parametrize(("epochs", "patience", "says"), [
    (2, 1, None),  # the last planned epoch: nothing stopped early
    (3, 1, "early stop: no validation improvement for 1 epoch (best epoch 1; 1 of 3 epochs not run)"),
    (4, 2, "early stop: no validation improvement for 2 epochs (best epoch 1; 1 of 4 epochs not run)"),
])
def test_early_stop_is_said_only_when_epochs_were_left(small, monkeypatch, epochs, patience, says):
    pytest.importorskip("torch")
    from tokenwire.predictor import models
    from tokenwire.predictor.train import TrainConfig, load_points, train_net

    def flat(pred, target, weight, delta_ms=20.0):  # the same loss every epoch: epoch 1 stays the best
        return (pred * 0.0).sum() + 1.0

    monkeypatch.setattr(models, "change_focused_loss", flat)
    train, val = load_points([str(small)], 64, 0.2, log=lambda _: None)
    lines: list[str] = []
    _, info = train_net(TrainConfig(kind="gru", epochs=epochs, batch=16, patience=patience), train, val,
                        log=lines.append)
    stops = [line.strip() for line in lines if "early stop" in line]
    assert stops == ([says] if says else []), lines
    assert info["best_epoch"] == 1


# -- 7. bench predictor printed nothing for ~20 s


def test_bench_predictor_prints_each_phase_on_stderr(capsys):
    pytest.importorskip("onnxruntime")
    assert main(["bench", "predictor", "--calls", "5", "--repeats", "1"]) == 0
    out, err = capsys.readouterr()
    phases = [line.strip() for line in err.splitlines() if line.startswith("  ")]
    # (session 38: both forecasters run side by side in each repeat, after one calibration round)
    assert phases == ["onnx: batch 1 and ewma: batch 1 (calibration and warm-up) ...",
                      "onnx: observe per ack and ewma: observe per ack (calibration and warm-up) ...",
                      "repeat 1/1: every phase of both, side by side ..."], err
    assert "µs/call" in out and "onnx: batch" not in out


# -- 8. collect --seconds had no upper bound


def test_collect_refuses_more_than_the_simulators_cap_before_running(tmp_path, monkeypatch, capsys):
    from tokenwire.predictor import dataset
    from tokenwire.testbed.sim import SimConfig
    from tokenwire.testbed.vsim import MAX_VIRTUAL_S

    assert SimConfig().max_virtual_s == MAX_VIRTUAL_S == 3600.0
    monkeypatch.setattr(dataset, "collect", lambda *a, **k: pytest.fail("the run started"))
    for seconds in ("1e300", "3600.5"):
        assert main(["predictor", "collect", "--down-trace", "12mbps", "--seconds", seconds,
                     "--out", str(tmp_path / "x.npz")]) == 2
        assert "at most 3600 virtual s" in capsys.readouterr().err
        assert main(["predictor", "collect-many", "--traces", "12mbps", "--seeds", "1", "--seconds", seconds,
                     "--out-dir", str(tmp_path / "d")]) == 2
        assert "at most 3600 virtual s" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


# -- 9. rows out of send order were loaded without a word


def _saved(src, dst, **changes):
    data = load(src)
    data["meta"] = json.dumps(data["meta"])
    for col, change in changes.items():
        data[col] = change(data[col])
    save(dst, data)
    return dst


def test_load_refuses_rows_out_of_send_order(small, tmp_path):
    reversed_rows = load(small)
    n = reversed_rows["sent_at"].size
    with pytest.raises(DatasetError, match=r"sent_at\[1\] = .* is below sent_at\[0\] = .*rows must be in send order"):
        load(_saved(small, tmp_path / "rev.npz", **{c: (lambda v: v[::-1].copy()) for c in
                                                      ("sent_at", "ack_at", "latency_ms", "n_acked")}))

    def swap(v, i=n // 2):
        v = v.copy()
        v[i], v[i + 1] = v[i + 1], v[i]
        return v

    with pytest.raises(DatasetError, match=rf"sent_at\[{n // 2 + 1}\] = .* \(1 row like it\)"):
        load(_saved(small, tmp_path / "swap.npz", sent_at=swap))
    acked = load(small)["n_acked"]
    k = int(np.flatnonzero(np.diff(acked) > 0)[0])  # a row after which more acks had come
    with pytest.raises(DatasetError, match=rf"n_acked\[{k + 1}\] .* a later send cannot have received fewer acks"):
        load(_saved(small, tmp_path / "acked.npz", n_acked=lambda v: swap(v, k)))
    assert load(_saved(small, tmp_path / "same.npz"))["sent_at"].size == n  # the file as collect wrote it loads


def test_training_of_ten_steps_in_all_runs(small):
    """OneCycleLR's warm-up ended at step 0 (0.1 x 10 steps): `--epochs 10` with one batch per epoch was a
    ZeroDivisionError traceback."""
    pytest.importorskip("torch")
    from tokenwire.predictor.train import TrainConfig, load_points, train_net

    train, val = load_points([str(small)], 64, 0.2, log=lambda _: None)
    for epochs, batch in ((10, len(train)), (5, math.ceil(len(train) / 2))):  # 10 steps in all, both
        _, info = train_net(TrainConfig(kind="gru", epochs=epochs, batch=batch, patience=epochs), train, val,
                            log=lambda _: None)
        assert len(info["history"]) == epochs


@pytest.mark.parametrize("flow", ["bulk", "rt:2mbps"])
def test_a_virtual_swiftqueue_run_is_bounded_like_the_simulator(flow):
    """`--flow bulk --seconds 1e5` (no token count to bound it) ran until killed."""
    from tokenwire.testbed.swiftqueue_eval import SwiftQueueConfig, SwiftQueueEvalError

    cfg = SwiftQueueConfig(down_trace="12mbps", policies=["l4s"], flow=flow, seconds=3600.5, virtual=True)
    with pytest.raises(SwiftQueueEvalError, match="a virtual run is at most 3600 virtual s"):
        cfg.validate()
    SwiftQueueConfig(down_trace="12mbps", policies=["l4s"], flow=flow, seconds=3600, virtual=True).validate()
