"""The predictor's third round of fixes: SIGTERM during collect-many and train took no cleanup path, a kind given
twice to ``train --kinds``, an interrupted train that did not name the checkpoint it kept, datasets holding values
no run records, model options given a checkpoint/dataset/JSON file, and ``testbed swiftqueue --model`` unused."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tokenwire.daemon.cli import main
from tokenwire.predictor.dataset import DatasetError, load, save

TINY_NET = {"d_model": 8, "heads": 2, "layers": 1, "ff": 8}


# -- 1. SIGTERM takes Ctrl-C's path: the new --out-dir goes, the summary is printed, "interrupted" and 130
_HELD = """
    import sys, time
    from tokenwire.daemon.cli import main
    from tokenwire.predictor import cli, train

    def held(*args, **kwargs):
        print("running", flush=True)
        for _ in range(1200):  # until the test's SIGTERM; in slices, as a real step's loop: a signal landing just
            time.sleep(0.1)  # before one long sleep's syscall was handled only once it ended (1 run in many)
        raise AssertionError("SIGTERM did not arrive")

    cli._run_collect = held  # collect-many's first dataset
    train.train_net = held  # train's first model
    sys.exit(main(sys.argv[1:]))
"""


def _terminated(args: list[str], cwd: Path) -> tuple[int, str]:
    """Run ``tokenwire ARGS`` in ``cwd`` (a command makes missing folders only below it) in a child whose long step
    holds; SIGTERM it once it is there: (status, stderr)."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_HELD), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=cwd)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "running\n", proc.communicate(timeout=60)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err


def test_sigterm_during_collect_many_removes_the_new_folder_and_prints_the_summary(tmp_path):
    """SIGTERM (timeout, systemd) killed it outright: cmT/ was left holding index.json = [] and no word was said,
    while Ctrl-C removed the folder and said "stopped after 0 of 3 datasets"."""
    rc, err = _terminated(["predictor", "collect-many", "--traces", "6mbps", "--seeds", "1-3", "--seconds", "3",
                           "--out-dir", "new/cm"], tmp_path)
    assert rc == 130, err
    assert "stopped after 0 of 3 datasets: none completed; 3 not written" in err and err.endswith("interrupted\n")
    assert not (tmp_path / "new").exists()


def test_sigterm_during_train_removes_the_new_folder(small, tmp_path):
    """ckTERM/ was left with train.json "models": {} and "finished": false; Ctrl-C removed it."""
    rc, err = _terminated(["predictor", "train", "--data", str(small), "--kinds", "transformer", "--epochs", "1",
                           "--out-dir", "ck"], tmp_path)
    assert rc == 130, err
    assert "transformer: interrupted before its first epoch ended: no checkpoint of it written" in err
    assert err.endswith("interrupted\n") and not (tmp_path / "ck").exists()


# -- 2. a kind given twice
@pytest.mark.parametrize("kinds", ["ar,ar", "transformer,gru,transformer"])
def test_train_refuses_a_kind_given_twice(small, tmp_path, capsys, kinds):
    """It trained the kind twice, the second run overwriting the first's checkpoint."""
    twice = kinds.split(",")[0]
    assert main(["predictor", "train", "--data", str(small), "--kinds", kinds, "--out-dir", str(tmp_path / "m")]) == 2
    assert f"--kinds: {twice} given more than once; give each kind once" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


# -- 3. an interrupted train names the checkpoint it kept
def _tiny_checkpoint(path: Path, *, best_epoch: int, epochs: int, finished: bool) -> None:
    """A transformer checkpoint as train_net saves it at an improvement (``epochs`` epochs in its history)."""
    pytest.importorskip("torch")
    from tokenwire.predictor.models import build
    from tokenwire.predictor.train import TrainConfig, save_checkpoint

    cfg = TrainConfig(kind="transformer", window=64, net=TINY_NET)
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 2.0 / e, "val_mae_ms": 3.0}
               for e in range(1, epochs + 1)]
    save_checkpoint(path, build("transformer", {"window": 64, **TINY_NET}), cfg, history, best_epoch=best_epoch,
                    finished=finished)


def test_an_interrupted_train_names_the_checkpoint_it_kept_and_logs_it_unfinished(small, tmp_path, monkeypatch,
                                                                                 capsys):
    """After Ctrl-C it said only "interrupted", though transformer.pt held epoch 2's weights, and train.json
    listed no model: the checkpoint looked lost."""
    from tokenwire.predictor import train as train_mod

    def two_epochs_then_ctrl_c(cfg: Any, train: Any, val: Any, checkpoint: Path, **kwargs: Any) -> Any:
        _tiny_checkpoint(checkpoint, best_epoch=2, epochs=2, finished=False)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train_net", two_epochs_then_ctrl_c)
    m = tmp_path / "m"
    assert main(["predictor", "train", "--data", str(small), "--kinds", "transformer,gru,ar", "--out-dir",
                 str(m)]) == 130
    err = capsys.readouterr().err
    kept = m / "transformer.pt"
    assert (f"transformer: interrupted; kept {kept} with the weights of epoch 2 (the best so far; training did not "
            "finish, recorded so in train.json): `tokenwire predictor export --checkpoint") in err, err
    assert "not trained: gru, ar" in err and err.endswith("interrupted\n")
    log = json.loads((m / "train.json").read_text())
    assert log["finished"] is False
    assert log["models"]["transformer"]["finished"] is False and log["models"]["transformer"]["best_epoch"] == 2
    assert len(log["models"]["transformer"]["history"]) == 2 and log["models"]["transformer"]["best_val_loss"] == 1.0
    assert main(["predictor", "export", "--checkpoint", str(kept), "--out", str(m / "transformer.onnx")]) == 0
    assert "did not finish" in capsys.readouterr().err


# -- 4. values no run records
def _changed(src: Path, dst: Path, col: str, change: Any) -> Path:
    data = load(src)
    data["meta"] = json.dumps(data["meta"])
    data[col] = change(data[col].copy())
    save(dst, data)
    return dst


def _negated(v: np.ndarray) -> np.ndarray:
    return -v


def _set_first_known(value: float) -> Any:
    def change(v: np.ndarray) -> np.ndarray:
        v[np.flatnonzero(~np.isnan(v))[0]] = value
        return v

    return change


@pytest.mark.parametrize(("col", "change", "says"), [
    ("latency_ms", _negated, "a latency in ms cannot be negative"),
    ("target_l_ms", _set_first_known(-0.5), "a latency in ms cannot be negative"),
    ("target_c_ms", _negated, "a latency in ms cannot be negative"),
    ("queue_l", lambda v: 3 * v, "a flag is 0 or 1"),
    ("ce", lambda v: np.full_like(v, 0.5), "a flag is 0 or 1"),
    ("size", _set_first_known(0.0), "a packet size in bytes is positive"),
    ("ack_at", _set_first_known(-1.0), "an ack cannot reach the sender before its packet was sent"),
], ids=["neg-latency", "neg-target-l", "neg-target-c", "queue-3", "ce-half", "size-0", "ack-before-send"])
def test_load_refuses_values_no_run_records(small, tmp_path, col, change, says):
    """A sign-flipped file loaded, and eval scored it ("52.4% lower (target >= 45% lower)"); a queue_l of 3 or a
    CE of 0.5 was read as some queue and some mark."""
    with pytest.raises(DatasetError, match=rf"{col}\[\d+\] = \S+ \(\d+ of \d+ rows\): {says}"):
        load(_changed(small, tmp_path / "bad.npz", col, change))


def test_eval_refuses_a_sign_flipped_dataset_and_real_ones_still_load(small, tmp_path, capsys):
    bad = _changed(small, tmp_path / "neg.npz", "latency_ms", _negated)
    assert main(["predictor", "eval", "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "latency_ms[" in err and "a latency in ms cannot be negative" in err
    zero_delay = tmp_path / "zero.npz"  # no propagation delay: latencies near 0, none below
    assert main(["predictor", "collect", "--down-trace", "12mbps", "--delay-ms", "0", "--seconds", "3",
                 "--out", str(zero_delay)]) == 0
    assert np.nanmin(load(zero_delay)["latency_ms"]) >= 0 and load(small)["sent_at"].size > 0


# -- 5. a model option given a checkpoint, a dataset or a JSON result
@pytest.fixture(scope="module")
def not_models(tmp_path_factory, small) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("notmodels")
    _tiny_checkpoint(d / "transformer.pt", best_epoch=1, epochs=1, finished=True)
    (d / "eval.json").write_text(json.dumps({"models": {"ewma": {"mae_ms": 1.0}}}))
    return {"checkpoint": d / "transformer.pt", "dataset": small, "json": d / "eval.json"}


@pytest.mark.parametrize(("what", "says"), [
    ("checkpoint", "not a usable ONNX model: a torch checkpoint, what `tokenwire predictor train` writes; run "
                   "`tokenwire predictor export --checkpoint {path} --out MODEL.onnx` first"),
    ("dataset", "not a usable ONNX model: a zip archive of numpy arrays (an .npz dataset?); give the .onnx of a "
                "trained model"),
    ("json", "not a usable ONNX model: a JSON file; give the .onnx of a trained model"),
])
def test_a_model_option_names_what_the_file_is(not_models, what, says):
    """They read "INVALID_PROTOBUF : Failed to load model because protobuf parsing failed"."""
    from tokenwire.predictor.onnx_session import ModelError
    from tokenwire.predictor.runtime import load_forecaster

    path = not_models[what]
    with pytest.raises(ModelError) as exc:
        load_forecaster(str(path))
    assert str(exc.value).startswith(f"{path}: " + says.format(path=path)), exc.value
    assert "INVALID_PROTOBUF" not in str(exc.value)


def test_swiftqueue_model_given_a_checkpoint_says_to_export_it(not_models, capsys):
    path = not_models["checkpoint"]
    assert main(["testbed", "swiftqueue", "--virtual", "--down-trace", "12mbps", "--policies", "l4s,swiftqueue",
                 "--seconds", "2", "--model", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"--model {path}: not a usable ONNX model: a torch checkpoint" in err and "predictor export" in err, err


def test_an_onnx_file_that_fails_keeps_onnxruntimes_reason(tmp_path):
    """Binary bytes that are none of the predictor's files: onnxruntime's own reason, as before."""
    from tokenwire.predictor.onnx_session import ModelError, open_session

    garbage = tmp_path / "g.onnx"
    garbage.write_bytes(b"\x08\x07\x00\xff binary, no model")
    with pytest.raises(ModelError, match=r"not a usable ONNX model \(InvalidProtobuf: .*INVALID_PROTOBUF"):
        open_session(garbage.read_bytes(), str(garbage))


# -- 6. testbed swiftqueue --model without the swiftqueue policy
def test_swiftqueue_refuses_a_model_without_the_swiftqueue_policy(tmp_path, capsys):
    """`--policies l4s --model nope.onnx` exited 0: the model, missing too, was never loaded."""
    assert main(["testbed", "swiftqueue", "--virtual", "--down-trace", "12mbps", "--policies", "l4s,classic",
                 "--seconds", "2", "--model", str(tmp_path / "nope.onnx")]) == 2
    assert ("--model is the swiftqueue policy's latency model, and --policies l4s,classic runs no swiftqueue: add "
            "swiftqueue to --policies or drop --model") in capsys.readouterr().err
