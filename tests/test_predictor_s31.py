"""Predictor pipeline fixes of round s31: eval refuses a model answering NaN/inf, a full disk while saving a
checkpoint is an OSError, checkpoints of one seed are byte-identical, clearer model refusals, and eval's
training-data warning covers the AR baseline and files of the same trace and seed."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from tokenwire.daemon.cli import main

CROSS = "reno:on=1,off=1+cbr-l:rate=120%,on=0.3,off=0.7"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """One 3-s dataset with a few hundred prediction points (window 64)."""
    out = tmp_path_factory.mktemp("data") / "a.npz"
    assert main(["predictor", "collect", "--down-trace", "6mbps", "--seconds", "3", "--probe-pps", "150",
                 "--cross", CROSS, "--seed", "1", "--out", str(out)]) == 0
    return out


# ------------------------------------------------------------------------------ 1. NaN/inf predictions in eval
def test_nonfinite_points_counts_rows_with_any_nan_or_inf():
    from tokenwire.predictor.harness import nonfinite_points

    pred = np.array([[1.0, 2.0], [np.nan, 2.0], [1.0, np.inf], [np.nan, np.nan], [3.0, 4.0]])
    assert nonfinite_points(pred) == 3
    assert nonfinite_points(np.zeros((0, 2))) == 0


def test_eval_refuses_a_model_answering_nan_on_some_points(dataset, monkeypatch, capsys):
    from tokenwire.predictor import evaluate

    def nan_on_first_three(fc, chunk=1024, log=None):  # stands in for an ONNX model that answers NaN on slow windows
        def run(p):
            out = p.base[:, :2].astype(np.float64).copy()
            out[:3, 0] = np.nan
            return out
        return run

    monkeypatch.setattr(evaluate, "onnx_predictor", nan_on_first_three)
    with pytest.raises(evaluate.ModelError) as caught:
        evaluate.run_eval([str(dataset)], log=lambda _: None)
    msg = str(caught.value)
    n = len(evaluate.Points.concat([p for _, p in evaluate.file_points([str(dataset)], 64, lambda _: None)]))
    assert f"the transformer model answers NaN/inf on 3 of {n} points" in msg, msg
    assert "\n" not in msg
    assert main(["predictor", "eval", "--data", str(dataset)]) == 2  # the CLI: one line, exit 2, no table
    err = capsys.readouterr().err
    assert "answers NaN/inf on 3 of" in err and "MAE ms" not in err


def test_eval_records_zero_nonfinite_points_for_finite_models(dataset):
    from tokenwire.predictor.evaluate import run_eval

    doc = run_eval([str(dataset)], log=lambda _: None)
    assert doc["points"] > 0
    assert all(m["n_nonfinite"] == 0 for m in doc["models"].values())


def _model(mae: float, n: int = 10, **extra) -> dict:
    return {"mae_ms": mae, "rmse_ms": mae, "spike_mae_ms": mae, "n": n, "n_spike": 0, **extra}


@pytest.mark.parametrize(("t", "e", "why"), [
    (_model(float("nan"), n_nonfinite=4), _model(58.67), "the transformer answered NaN/inf on 4 points"),
    (_model(5.0), _model(0.0), "ewma's MAE is 0: a constant latency"),
    (_model(float("nan"), n=0), _model(float("nan"), n=0), "no known targets"),
    (_model(5.0), _model(float("nan")), "ewma has no MAE"),
])
def test_the_ratio_line_names_the_side_without_a_ratio(t, e, why):
    from tokenwire.predictor.cli import format_table

    text = format_table({"models": {"transformer": t, "ewma": e}})
    assert f"transformer MAE vs ewma: no ratio ({why})" in text, text


# ------------------------------------------------------------------------- 2./3. saving checkpoints
def _gru_and_cfg():
    from tokenwire.predictor.models import build
    from tokenwire.predictor.train import TrainConfig

    pytest.importorskip("torch")
    import torch

    torch.manual_seed(0)
    return build("gru", {"window": 8, "hidden": 4}), TrainConfig(kind="gru", window=8)


def _statvfs_with_free(free_bytes: int):
    class St:
        f_bavail = free_bytes // 4096
        f_frsize = 4096

    return lambda _path: St()


@pytest.mark.parametrize(("free", "want_errno"), [(0, errno.ENOSPC), (10 << 30, None)])
def test_a_torch_save_runtime_error_becomes_a_one_line_oserror(tmp_path, monkeypatch, free, want_errno):
    import torch

    from tokenwire.predictor import train

    model, cfg = _gru_and_cfg()
    path = tmp_path / "gru.pt"
    path.write_bytes(b"the earlier checkpoint")

    def full_disk(obj, f, *a, **kw):  # a file object or a name, as torch.save takes either
        if isinstance(f, str | Path):
            Path(f).write_bytes(b"PK\x03\x04 part of an archive")
        else:
            f.write(b"PK\x03\x04 part of an archive")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 86912 vs 86800\nframe #0")

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(os, "statvfs", _statvfs_with_free(free))
    with pytest.raises(OSError) as caught:
        train.save_checkpoint(path, model, cfg, [])
    exc = caught.value
    assert exc.errno == want_errno and exc.filename == str(path)
    if want_errno is None:
        assert "unexpected pos 86912 vs 86800" in exc.strerror and "frame #0" not in exc.strerror
    else:
        assert "No space left on device" in exc.strerror
    assert path.read_bytes() == b"the earlier checkpoint"  # as it was, and no temporary file left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gru.pt"]


def test_train_cli_reports_the_full_disk_in_one_line(tmp_path, dataset, monkeypatch, capsys):
    import torch

    def full_disk(obj, f, *a, **kw):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 86912 vs 86800")

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(os, "statvfs", _statvfs_with_free(0))
    threads = torch.get_num_threads()
    try:
        rc = main(["predictor", "train", "--data", str(dataset), "--kinds", "gru", "--epochs", "1",
                   "--out-dir", str(tmp_path / "ck")])
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert rc == 2 and "gru.pt: No space left on device" in err and "Traceback" not in err, err


def test_the_same_state_saved_twice_gives_identical_bytes(tmp_path):
    from tokenwire.predictor.train import load_checkpoint, save_checkpoint

    model, cfg = _gru_and_cfg()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        save_checkpoint(tmp_path / d / "gru.pt", model, cfg, [{"epoch": 1, "val_loss": 0.5}], best_epoch=1)
    one, two = (tmp_path / "a" / "gru.pt").read_bytes(), (tmp_path / "b" / "gru.pt").read_bytes()
    assert hashlib.sha256(one).hexdigest() == hashlib.sha256(two).hexdigest()
    _, ck = load_checkpoint(tmp_path / "a" / "gru.pt")  # still a checkpoint load_checkpoint takes
    assert ck["best_epoch"] == 1


# ------------------------------------------------------------------------------------ 4./6. messages
def _shipped_with_meta(tmp_path: Path, **changes) -> str:
    import onnx

    from tokenwire.predictor.runtime import shipped_model_path

    proto = onnx.load(str(shipped_model_path()))
    for prop in proto.metadata_props:
        if prop.key == "tokenwire":
            prop.value = json.dumps({**json.loads(prop.value), **changes})
    out = tmp_path / "m.onnx"
    onnx.save(proto, str(out))
    return str(out)


def test_another_features_version_is_named_with_the_expected_one(tmp_path):
    from tokenwire.predictor.features import FEATURES, FEATURES_VERSION
    from tokenwire.predictor.runtime import ModelError, load_forecaster

    with pytest.raises(ModelError) as caught:
        load_forecaster(_shipped_with_meta(tmp_path, features_version=FEATURES_VERSION - 1))
    assert f"features_version {FEATURES_VERSION - 1}, expected {FEATURES_VERSION}" in str(caught.value)
    swapped = [FEATURES[1], FEATURES[0], *FEATURES[2:]]
    with pytest.raises(ModelError) as caught:
        load_forecaster(_shipped_with_meta(tmp_path, features=swapped))
    assert f"features {swapped!r}, expected {list(FEATURES)!r}" in str(caught.value)
    assert "features_version " not in str(caught.value)  # only what differs


def test_the_bandwidth_model_given_as_a_latency_model_is_named(capsys):
    from tokenwire.predictor.bandwidth import default_model_path
    from tokenwire.predictor.runtime import ModelError, load_forecaster

    with pytest.raises(ModelError) as caught:
        load_forecaster(str(default_model_path()))
    assert "tokenwire's KV bandwidth model" in str(caught.value) and "not a latency model" in str(caught.value)


def test_a_config_that_does_not_fit_the_weights_keeps_the_first_mismatch(tmp_path):
    import torch

    from tokenwire.predictor.runtime import ModelError
    from tokenwire.predictor.train import load_checkpoint, save_checkpoint

    model, cfg = _gru_and_cfg()
    path = tmp_path / "gru.pt"
    save_checkpoint(path, model, cfg, [])
    ck = torch.load(path, weights_only=True)
    ck["config"]["hidden"] = 6
    torch.save(ck, path)
    with pytest.raises(ModelError) as caught:
        load_checkpoint(path)
    msg = str(caught.value)
    assert "size mismatch for " in msg and "more)" in msg and "\n" not in msg, msg


# ----------------------------------------------------------------------------- 5. training-data warnings
def _meta_only(path: Path, trace: str, seed: int, seconds: float) -> str:
    """A file holding a dataset's meta member alone: what the run comparison reads."""
    meta = {"trace_name": trace, "config": {"seed": seed, "seconds": seconds}}
    np.savez(path, meta=np.array(json.dumps(meta)))
    return str(path)


def test_fit_ar_records_the_training_files(tmp_path, dataset):
    from tokenwire.predictor.harness import dataset_run, file_points
    from tokenwire.predictor.train import fit_ar

    ((_, pts),) = file_points([str(dataset)], 64, log=lambda _: None)
    files = [{"path": str(dataset), "sha256": "ab" * 32}]
    runs = [dataset_run(str(dataset))]
    assert runs[0] is not None and runs[0]["seed"] == 1 and runs[0]["seconds"] == 3
    fit_ar(pts, tmp_path / "ar.json", files, runs)
    doc = json.loads((tmp_path / "ar.json").read_text())
    assert doc["data_files"] == files and doc["data_runs"] == runs


def test_eval_warns_about_the_ars_training_file_and_a_run_of_the_same_trace_and_seed(tmp_path):
    from tokenwire.predictor.evaluate import _training_data_check

    trained = _meta_only(tmp_path / "train.npz", "T.down", 7, 20.0)
    longer = _meta_only(tmp_path / "longer.npz", "T.down", 7, 21.0)  # other bytes, the same run
    other_seed = _meta_only(tmp_path / "other.npz", "T.down", 8, 20.0)
    said: list[str] = []
    check = _training_data_check([trained, longer, other_seed], said.append)
    ar_doc = {"coef": [], "data_files": [{"path": trained, "sha256": hashlib.sha256(Path(trained).read_bytes())
                                          .hexdigest()}],
              "data_runs": [{"path": trained, "trace": "T.down", "seed": 7, "seconds": 20.0}]}
    check("ar", ar_doc)
    assert len(said) == 2, said
    assert said[0].startswith(f"warning: {trained}: the ar was trained and validated on this file")
    assert said[1].startswith(f"warning: {longer}: the same trace (T.down) and seed (7) as the ar's training file")
    assert "21 s vs 20 s" in said[1]
    assert not any(other_seed in s for s in said)
