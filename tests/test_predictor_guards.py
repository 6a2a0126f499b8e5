"""What the predictor CLI refuses or keeps safe: output files, model input names, non-finite datasets, missing
targets, non-dataset files, eval's table and ``--json -``, stale checkpoints, the progress line, probe rates."""

import io
import json
import logging
import math
import os
import re
import stat
import threading

import numpy as np
import pytest

from tokenwire.daemon.cli import main
from tokenwire.predictor.dataset import DatasetError, load, save
from tokenwire.predictor.runtime import shipped_model_path

CROSS = "reno:on=1,off=1+cbr-l:rate=120%,on=0.3,off=0.7"


def _collect(out, *extra):
    return main(["predictor", "collect", "--down-trace", "6mbps", "--seconds", "3", "--probe-pps", "150",
                 "--cross", CROSS, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 3-s dataset with a few hundred prediction points."""
    f = tmp_path_factory.mktemp("small") / "d.npz"
    assert _collect(f) == 0
    return f


def _variant(src, dst, **columns):
    """``src`` with some columns changed (a function of the old array each), saved as a dataset at ``dst``."""
    data = load(src)
    data["meta"] = json.dumps(data["meta"])
    for col, change in columns.items():
        data[col] = change(data[col].copy())
    save(dst, data)
    return dst


def _read_fifo_in_background(fifo):
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    return reader, got


# 1. output files: atomic for regular files (mode kept), written through devices and FIFOs, symlinks kept


def test_output_file_keeps_mode_symlinks_devices_and_fifos(tmp_path, capsysbinary):
    from tokenwire.daemon.cli import output_file, save_bytes

    regular = tmp_path / "r.bin"
    save_bytes(regular, b"one")
    regular.chmod(0o600)
    save_bytes(regular, b"two")
    assert regular.read_bytes() == b"two" and stat.S_IMODE(regular.stat().st_mode) == 0o600
    with pytest.raises(RuntimeError), output_file(regular) as tmp:  # a writer that fails: old file kept
        tmp.write_bytes(b"half")
        raise RuntimeError
    assert regular.read_bytes() == b"two"
    (tmp_path / "link.bin").symlink_to(regular)
    save_bytes(tmp_path / "link.bin", b"three")
    assert (tmp_path / "link.bin").is_symlink() and regular.read_bytes() == b"three"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader, got = _read_fifo_in_background(fifo)
    save_bytes(fifo, b"through")
    reader.join(10)
    assert got == [b"through"] and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    if os.geteuid() == 0:  # a null device of our own, never the real /dev/null
        null = tmp_path / "null"
        os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        save_bytes(null, b"gone")
        assert stat.S_ISCHR(os.lstat(null).st_mode)
    save_bytes("-", b"out")
    assert capsysbinary.readouterr().out == b"out"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["r.bin", "link.bin", "fifo"] + (["null"] if os.geteuid() == 0 else []))  # no temporary file left


def test_collect_writes_through_a_fifo_and_replaces_a_symlinks_target_keeping_its_mode(tmp_path):
    """collect --out replaced a FIFO, a device or a symlink with a regular file and dropped the old mode."""
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    reader, got = _read_fifo_in_background(fifo)
    assert _collect(fifo) == 0
    reader.join(10)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    (tmp_path / "copy.npz").write_bytes(got[0])
    assert load(tmp_path / "copy.npz")["meta"]["probe_packets"] > 100  # a whole dataset went through
    real = tmp_path / "real" / "d.npz"
    real.parent.mkdir()
    real.write_bytes(b"old")
    real.chmod(0o640)
    (tmp_path / "link.npz").symlink_to(real)
    assert _collect(tmp_path / "link.npz") == 0
    assert (tmp_path / "link.npz").is_symlink() and stat.S_IMODE(real.stat().st_mode) == 0o640
    assert load(real)["meta"]["probe_packets"] > 100


def test_checkpoints_and_exports_go_through_the_same_writer(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from tokenwire.predictor.runtime import load_forecaster
    from tokenwire.predictor.train import TrainConfig, save_checkpoint

    from .test_predictor_cli import HISTORY, _gru_checkpoint

    model = _gru_checkpoint(tmp_path / "g.pt", HISTORY, best_epoch=2, finished=True)
    real = tmp_path / "keep" / "gru.pt"
    real.parent.mkdir()
    real.write_bytes(b"old")
    real.chmod(0o600)
    (tmp_path / "gru.pt").symlink_to(real)
    save_checkpoint(tmp_path / "gru.pt", model, TrainConfig(kind="gru"), HISTORY, best_epoch=2)
    assert (tmp_path / "gru.pt").is_symlink() and stat.S_IMODE(real.stat().st_mode) == 0o600
    assert torch.load(real, weights_only=True)["best_epoch"] == 2
    out = tmp_path / "out"
    out.mkdir()
    fifo = out / "m.onnx"
    os.mkfifo(fifo)
    reader, got = _read_fifo_in_background(fifo)
    assert main(["predictor", "export", "--checkpoint", str(tmp_path / "g.pt"), "--out", str(fifo)]) == 0
    reader.join(20)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and [p.name for p in out.iterdir()] == ["m.onnx"]
    (tmp_path / "copy.onnx").write_bytes(got[0])
    assert load_forecaster(str(tmp_path / "copy.onnx")).meta["kind"] == "gru"
    assert f"wrote {fifo}; onnxruntime vs torch" in capsys.readouterr().err


def test_output_check_looks_where_a_symlink_points(tmp_path, capsys):
    """check_outputs tried the link's folder; the write goes to its target's, which failed after the run."""
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    (tmp_path / "link.npz").symlink_to(blocker / "d.npz")  # its folder would have to be a regular file
    assert _collect(tmp_path / "link.npz") == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'link.npz'}: cannot write there ({blocker}" in err and "virtual s" not in err, err


# 2. model inputs by name


def _renamed_model(path, mapping):
    """The shipped model with its inputs renamed (``mapping``: old -> new, applied at once)."""
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(shipped_model_path()))
    for i in proto.graph.input:
        i.name = mapping.get(i.name, i.name)
    for node in proto.graph.node:
        for k, name in enumerate(node.input):
            node.input[k] = mapping.get(name, name)
    onnx.save(proto, str(path))
    return path


def test_a_model_whose_inputs_are_not_named_x_and_ref_is_refused(small, tmp_path, capsys, caplog):
    """The daemon ran it (binding by position) while eval crashed on it (feeding by name)."""
    from tokenwire.predictor.runtime import ModelError, load_forecaster, make_swiftqueue_policy
    from tokenwire.transport.marking import L4SPolicy

    renamed = _renamed_model(tmp_path / "renamed.onnx", {"x": "window", "ref": "reference"})
    swapped = _renamed_model(tmp_path / "swapped.onnx", {"x": "ref", "ref": "x"})
    for model in (renamed, swapped):
        with pytest.raises(ModelError, match=r"unexpected model inputs .*expected x .* and ref"):
            load_forecaster(str(model))
        with caplog.at_level(logging.WARNING, logger="tokenwire.predictor"):
            assert isinstance(make_swiftqueue_policy(str(model)), L4SPolicy)
        assert "falling back to the l4s policy" in caplog.text
        capsys.readouterr()  # (a stale handler of an earlier in-process test may have printed a logging error)
        assert main(["predictor", "eval", "--data", str(small), "--model", str(model)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # the command's own error line
        assert err.startswith("tokenwire predictor eval: error:") and "unexpected model inputs" in err, err


# 3. non-finite values in a dataset


@pytest.mark.parametrize(("col", "change", "says"), [
    ("latency_ms", lambda v: np.where(np.arange(v.size) == 5, np.nan, v), "latency_ms[5] = nan"),
    ("latency_ms", lambda v: np.where(np.arange(v.size) == 7, np.inf, v), "latency_ms[7] = inf"),
    ("target_l_ms", lambda v: np.where(np.arange(v.size) == 9, np.inf, v), "target_l_ms[9] = inf"),
    ("ack_at", lambda v: np.where(np.arange(v.size) == 3, -np.inf, v), "ack_at[3] = -inf"),
    ("sent_at", lambda v: np.where(np.arange(v.size) == 2, np.nan, v), "sent_at[2] = nan"),
])
def test_non_finite_values_are_refused_naming_column_and_row(small, tmp_path, capsys, col, change, says):
    """train said "training diverged; lower --lr", eval printed nan/inf tables with exit 0."""
    data = load(small)
    assert not np.isnan(data["ack_at"][:10]).any()  # the rows changed are delivered packets
    bad = _variant(small, tmp_path / "bad.npz", **{col: change})
    with pytest.raises(DatasetError, match=re.escape(says) + r" \(1 of \d+ rows\)"):
        load(bad)
    assert main(["predictor", "eval", "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert says in err and "not a usable latency dataset" in err, err


def test_nan_where_the_format_allows_it_still_loads(small, tmp_path):
    """A dropped shadow's target, a lost packet's ack and latency: NaN is the format's 'unknown'."""
    data = load(small)
    ack_at, sent_at = data["ack_at"], data["sent_at"]
    lost = np.arange(ack_at.size) % 5 == 0
    left = np.sort(ack_at[~lost & ~np.isnan(ack_at)])  # the acks still received, counted by each send as collect does
    ok = _variant(small, tmp_path / "ok.npz", target_c_ms=lambda v: np.where(lost, np.nan, v),
                  ack_at=lambda v: np.where(lost, np.nan, v), latency_ms=lambda v: np.where(lost, np.nan, v),
                  n_acked=lambda v: np.searchsorted(left, sent_at, side="right").astype(np.float64))
    data = load(ok)
    assert np.isnan(data["target_c_ms"][lost]).all() and np.isnan(data["latency_ms"][lost]).all()


# 4. a queue without known targets


def test_training_without_known_targets_for_a_queue_is_refused_before_it_starts(small, tmp_path, capsys):
    """Transformer/GRU trained with loss 0 and wrote checkpoints, then the AR fit raised LinAlgError."""
    none_c = _variant(small, tmp_path / "c.npz", target_c_ms=lambda v: np.full_like(v, np.nan))
    none = _variant(small, tmp_path / "n.npz", target_l_ms=lambda v: np.full_like(v, np.nan),
                    target_c_ms=lambda v: np.full_like(v, np.nan))
    for data, says in ((none_c, "no known target_c_ms in the"), (none, "no known target_l_ms or target_c_ms")):
        m = tmp_path / f"m-{data.stem}"
        assert main(["predictor", "train", "--data", str(data), "--kinds", "ar", "--out-dir", str(m)]) == 2
        err = capsys.readouterr().err
        assert says in err and "training needs targets for both queues" in err and "Traceback" not in err, err
        assert not (m / "ar.json").exists()


def test_validation_without_any_known_target_is_refused(small):
    from tokenwire.predictor.train import check_targets, load_points

    train, val = load_points([str(small)], 64, 0.2, log=lambda _: None)
    val.target[:] = np.nan
    with pytest.raises(DatasetError, match=r"no known target in the \d+ validation points \(the last 20%"):
        check_targets(train, val, [str(small)], 0.2)


# 5. files that are not datasets or checkpoints


class _NotWeights:
    """A pickled object a checkpoint never holds."""


def test_npy_pickled_and_object_files_are_not_datasets_and_give_no_unsafe_advice(small, tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.zeros(3))  # np.load gives an ndarray: it was a TypeError traceback
    (tmp_path / "p.npz").write_bytes(b"\x80\x04K\x01.")  # a pickle
    data = dict(np.load(small))
    data["latency_ms"] = np.array([{"a": 1}] * data["latency_ms"].size, dtype=object)
    np.savez(tmp_path / "o.npz", **data)
    for f in ("a.npy", "p.npz", "o.npz"):
        with pytest.raises(DatasetError, match=f"{f}: not a latency dataset") as exc:
            load(tmp_path / f)
        assert "allow_pickle" not in str(exc.value) and "unsafe" not in str(exc.value)
    assert main(["predictor", "eval", "--data", str(tmp_path / "a.npy")]) == 2
    assert "a.npy: not a latency dataset (one .npy array" in capsys.readouterr().err


def test_a_checkpoint_with_other_objects_is_refused_without_torchs_advice(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    torch.save({"kind": "gru", "config": {"window": 64}, "state_dict": _NotWeights()}, tmp_path / "x.pt")
    assert main(["predictor", "export", "--checkpoint", str(tmp_path / "x.pt"), "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "x.pt: not a checkpoint written by `tokenwire predictor train`" in err, err
    assert "it holds Python objects other than tensors and plain data; not loaded" in err, err
    assert "weights_only" not in err and "trust" not in err and "Traceback" not in err


# 6 and 8. eval's table: EWMA MAE 0, JSON first, --json -


def _eval_doc(ewma_mae):
    row = {"mae_ms": 0.0, "rmse_ms": 0.0, "spike_mae_ms": math.nan, "n": 5, "n_spike": 0}
    ref = {**row, "ewma_mae_ms_same_targets": ewma_mae, "models_mae_ms_same_targets": {"transformer": 0.0}}
    return {"models": {"transformer": row, "ewma": {**row, "mae_ms": ewma_mae}}, "references": {"newest_acked": ref}}


def test_eval_with_an_ewma_mae_of_zero_prints_no_ratio_and_writes_json_first(tmp_path, monkeypatch, capsys):
    """ZeroDivisionError in format_table, and the --json was lost as the table was printed first."""
    from tokenwire.predictor import cli, evaluate

    monkeypatch.setattr(evaluate, "run_eval", lambda *a, **k: _eval_doc(0.0))
    out = tmp_path / "e.json"
    assert main(["predictor", "eval", "--data", "x.npz", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "transformer MAE vs ewma: no ratio" in table and "newest_acked" in table, table
    assert json.loads(out.read_text())["models"]["ewma"]["mae_ms"] == 0.0
    out.unlink()

    def broken(doc):
        raise RuntimeError("table")

    monkeypatch.setattr(cli, "format_table", broken)
    with pytest.raises(RuntimeError):
        main(["predictor", "eval", "--data", "x.npz", "--json", str(out)])
    assert json.loads(out.read_text())["models"]["transformer"]["n"] == 5  # written before the table


def test_json_dash_leaves_stdout_to_the_json(monkeypatch, capsys):
    """eval --json - and bench predictor --json - printed the table to stdout before the JSON."""
    from tokenwire.predictor import evaluate

    monkeypatch.setattr(evaluate, "run_eval", lambda *a, **k: _eval_doc(2.0))
    assert main(["predictor", "eval", "--data", "x.npz", "--json", "-"]) == 0
    got = capsys.readouterr()
    assert json.loads(got.out)["models"]["ewma"]["mae_ms"] == 2.0 and "transformer MAE vs ewma" in got.err
    assert main(["bench", "predictor", "--calls", "20", "--repeats", "1", "--json", "-"]) == 0
    got = capsys.readouterr()
    assert set(json.loads(got.out)) >= {"onnx", "ewma"} and "µs/call" in got.err


# 7. an earlier run's checkpoints


def test_a_rerun_moves_aside_the_earlier_runs_checkpoints_of_the_kinds_it_trains(small, tmp_path, monkeypatch,
                                                                                 capsys):
    """Interrupted, a rerun left the old gru.pt (finished) next to a train.json without it; export took it.
    They are moved aside, not deleted (a rerun that fails at once still leaves the earlier model); a symlinked
    one is moved aside as a link (its target, a shared model, was overwritten by the rerun's checkpoint)."""
    pytest.importorskip("torch")
    from tokenwire.predictor import train as train_mod

    m = tmp_path / "m"
    m.mkdir()
    for name in ("gru.pt", "transformer.pt", "ar.json", "gru.onnx"):
        (m / name).write_bytes(b"an earlier run's")
    shared = tmp_path / "best-gru.pt"
    shared.write_bytes(b"the best one")
    (m2 := tmp_path / "m2").mkdir()
    (m2 / "gru.pt").symlink_to(shared)

    def interrupted(cfg, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train_net", interrupted)
    assert main(["predictor", "train", "--data", str(small), "--kinds", "ar,gru", "--out-dir", str(m)]) == 130
    err = capsys.readouterr().err
    assert not (m / "gru.pt").exists() and (m / "ar.json").read_bytes() != b"an earlier run's"
    assert (m / "gru.pt.previous").read_bytes() == (m / "ar.json.previous").read_bytes() == b"an earlier run's"
    assert (m / "transformer.pt").read_bytes() == b"an earlier run's"  # not a kind this run trains
    assert f"warning: {m / 'gru.onnx'} was exported from an earlier run" in err, err
    assert json.loads((m / "train.json").read_text())["models"].keys() == {"ar"}
    assert main(["predictor", "train", "--data", str(small), "--kinds", "gru", "--out-dir", str(m2)]) == 130
    assert (m2 / "gru.pt.previous").is_symlink() and not (m2 / "gru.pt").exists()
    from tokenwire.daemon.cli import save_bytes

    save_bytes(m2 / "gru.pt", b"rerun epoch 1")  # the rerun's first checkpoint, through the checkpoints' writer
    assert shared.read_bytes() == b"the best one"  # untouched (it was overwritten through the link)


# 9. the progress line


class _Tty(io.StringIO):
    def isatty(self):
        return True


def _screen(text):
    """What a terminal shows: each line from its last carriage return, erase-line sequences removed."""
    return [line.rsplit("\r", 1)[-1].replace("\x1b[K", "") for line in text.split("\n")]


def test_epoch_lines_and_interrupted_do_not_land_on_the_progress_line(small, monkeypatch):
    pytest.importorskip("torch")
    import sys

    from tokenwire.predictor import models
    from tokenwire.predictor.train import TrainConfig, load_points, train_net

    train, val = load_points([str(small)], 64, 0.2, log=lambda _: None)
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    cfg = TrainConfig(kind="gru", epochs=1, batch=16, patience=1)
    train_net(cfg, train, val, log=lambda msg: print(msg, file=sys.stderr))
    shown = _screen(tty.getvalue())
    assert "epoch 1 " in tty.getvalue()  # a progress line was drawn
    summary = [line for line in shown if "val MAE" in line]
    assert summary and all(line.startswith("  epoch   1/1") for line in summary), shown

    real = models.change_focused_loss
    calls = []

    def interrupt_on_the_second_step(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(models, "change_focused_loss", interrupt_on_the_second_step)
    tty.seek(0)
    tty.truncate()
    with pytest.raises(KeyboardInterrupt):
        train_net(cfg, train, val, log=lambda msg: print(msg, file=sys.stderr))
    assert "%" in tty.getvalue() and _screen(tty.getvalue())[-1] == ""  # erased: "interrupted" starts clean


# 10. probe rate bound, reversed seed ranges


def test_probe_rate_above_the_links_capacity_and_reversed_seeds_are_refused(tmp_path, capsys):
    """--probe-pps 1e9 ran for minutes; --seeds 3-1 said "no seeds"."""
    assert main(["predictor", "collect", "--down-trace", "6mbps", "--seconds", "1", "--probe-pps", "1e9",
                 "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert "--probe-pps: probe rate 1e+09 packets/s is above the 625 packets/s of 1200 bytes" in err, err
    assert "virtual s" not in err and not (tmp_path / "x.npz").exists()
    assert main(["predictor", "collect-many", "--traces", "6mbps", "1mbps", "--seeds", "1", "--seconds", "1",
                 "--probe-pps", "200", "--out-dir", str(tmp_path / "many")]) == 2
    err = capsys.readouterr().err
    assert "--probe-pps: 1mbps: probe rate 200 packets/s is above the 104.2 packets/s" in err, err
    assert "virtual s" not in err and not list((tmp_path / "many").glob("*.npz"))  # checked before any run
    assert main(["predictor", "collect-many", "--traces", "6mbps", "--seeds", "3-1", "--seconds", "1",
                 "--out-dir", str(tmp_path / "many")]) == 2
    assert "--seeds: '3-1' is a reversed range; write 1-3" in capsys.readouterr().err
