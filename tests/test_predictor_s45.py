"""Session 45, a predictor user's audit of `predictor eval`, `bench predictor` and the dataset loader:

1. ``predictor eval --model`` (or a ``--baselines`` gru.onnx) that loads but fails on real windows or answers another
   shape there: onnxruntime's or numpy's traceback and exit 1, where ``bench predictor`` and the daemon say what is
   wrong. One with its batch axis fixed at 1 (a ``torch.onnx.export`` without ``dynamic_axes``) was refused too,
   though the daemon runs it; since session 46 eval scores it one window per call.
2. ``bench predictor`` on a model with a batch axis fixed at 1 said "the daemon would mark like l4s with this
   model"; the daemon asks one window at a time and runs it (``config check`` accepts it).
3. A dataset whose ``n_acked`` counts more acks than had reached the sender by the send loaded: the windows held
   acks from after the prediction time and every model's MAE came out lower, exit 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tokenwire.daemon.cli import main
from tokenwire.predictor.dataset import DatasetError, load, save
from tokenwire.predictor.features import FEATURES, FEATURES_VERSION

from .test_predictor_runtime import tiny_model


def _fixed_batch(path: Path) -> Path:
    """``path``'s model with its batch axis (inputs and output) fixed at 1, as an export without dynamic axes."""
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(path))
    for value in [*model.graph.input, *model.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_param")
        dim.dim_value = 1
    out = path.with_name(f"fixed-{path.name}")
    onnx.save(model, str(out))
    return out


@pytest.mark.parametrize(("flaw", "says"), [
    ({"cols_on_zeros": 2, "cols_on_data": 3}, "failed (Fail: "),  # raises on real windows
    ({"cols_on_zeros": 2, "cols_on_data": 1}, "failed (answered float32 ("),  # answers another shape there
])
def test_eval_of_a_model_that_fails_on_real_windows_is_one_line_and_exit_2(small, tmp_path, capsys, flaw, says):
    model = tiny_model(tmp_path / "m.onnx", **flaw)
    out = tmp_path / "eval.json"
    assert main(["predictor", "eval", "--data", str(small), "--model", str(model), "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"tokenwire predictor eval: error: {model}: inference on ") and says in last, last
    assert not out.exists()


def test_eval_names_the_baselines_gru_that_fails(small, tmp_path, capsys):
    base = tmp_path / "base"
    base.mkdir()
    meta = {"format": "tokenwire-swiftqueue", "kind": "gru", "features": list(FEATURES),
            "features_version": FEATURES_VERSION, "window": 64}
    tiny_model(base / "gru.onnx", meta=meta, cols_on_zeros=2, cols_on_data=3)
    shipped_ar = Path(__file__).resolve().parents[1] / "predictor" / "shipped" / "ar.json"
    (base / "ar.json").write_text(shipped_ar.read_text())
    assert main(["predictor", "eval", "--data", str(small), "--baselines", str(base)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"tokenwire predictor eval: error: {base / 'gru.onnx'}: inference on "), last


def test_eval_scores_a_fixed_batch_model_as_the_daemon_runs_it(small, tmp_path, capsys):
    """A model exported without a dynamic batch axis is run by the daemon (one window at a time); eval scores it one
    window per call, with the same numbers as the same model with a dynamic axis (it used to refuse it)."""
    dynamic = tiny_model(tmp_path / "m.onnx")
    fixed = _fixed_batch(dynamic)
    scores = {}
    for model in (dynamic, fixed):
        out = tmp_path / f"{model.stem}.json"
        assert main(["predictor", "eval", "--data", str(small), "--model", str(model), "--json", str(out)]) == 0
        scores[model] = json.loads(out.read_text())["models"]["transformer"]
    err = capsys.readouterr().err
    assert f"note: {fixed}: its batch axis is fixed at 1: scored 1 window per inference call" in err, err
    assert f"note: {dynamic}:" not in err
    assert scores[fixed]["n"] == scores[dynamic]["n"] > 100
    assert scores[fixed]["mae_ms"] == pytest.approx(scores[dynamic]["mae_ms"], rel=1e-6)


def test_bench_on_a_fixed_batch_model_does_not_say_the_daemon_falls_back(tmp_path, capsys):
    from tokenwire.predictor.runtime import make_swiftqueue_policy

    model = _fixed_batch(tiny_model(tmp_path / "m.onnx"))
    assert type(make_swiftqueue_policy(str(model))).__name__ == "SwiftQueuePolicy"  # the daemon's path runs it
    assert main(["bench", "predictor", "--model", str(model), "--calls", "1", "--repeats", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith(f"tokenwire bench predictor: error: {model}: inference on 8 real windows failed (")
    assert "batch axis is fixed at 1" in err[0] and "would mark like l4s" not in err[0], err[0]


def _with_acked(src: Path, dst: Path, change) -> Path:
    data = load(src)
    data["meta"] = json.dumps(data["meta"])
    data["n_acked"] = change(data["n_acked"].copy())
    save(dst, data)
    return dst


def test_n_acked_ahead_of_the_acks_received_by_the_send_is_refused(small, tmp_path, capsys):
    data = load(small)
    acks = int(np.count_nonzero(~np.isnan(data["ack_at"])))
    ahead = _with_acked(small, tmp_path / "ahead.npz", lambda v: np.minimum(v + 2, acks))
    with pytest.raises(DatasetError, match=r"n_acked\[0\] = 2 but 0 acks had reached the sender by sent_at\[0\] = "
                                           r".*\(\d+ rows like it\): n_acked counts the acks received by the send"):
        load(ahead)
    assert main(["predictor", "eval", "--data", str(ahead)]) == 2
    assert "more would show the model acks from after it" in capsys.readouterr().err
    lagging = _with_acked(small, tmp_path / "lag.npz", lambda v: np.maximum(v - 2, 0))
    assert load(lagging)["n_acked"].sum() < data["n_acked"].sum()  # a staler window is no view of the future
    assert load(small)["n_acked"].size == data["n_acked"].size  # the file as collect wrote it loads


def test_eval_warns_about_a_model_from_an_unfinished_training_run(small, tmp_path, capsys):
    """export warned once as it wrote the file; eval scored the model of an interrupted run without a word."""
    def meta(finished: bool) -> dict:
        return {"format": "tokenwire-swiftqueue", "kind": "transformer", "features": list(FEATURES),
                "features_version": FEATURES_VERSION, "window": 64, "best_epoch": 2, "epochs_run": 3,
                "finished": finished}

    cut = tiny_model(tmp_path / "cut.onnx", meta=meta(False))
    assert main(["predictor", "eval", "--data", str(small), "--model", str(cut)]) == 0
    assert (f"warning: {cut}: the transformer is from a training run that did not finish (interrupted, or still "
            "running when exported): best epoch 2 of 3 run; scored anyway") in capsys.readouterr().err
    done = tiny_model(tmp_path / "done.onnx", meta=meta(True))
    assert main(["predictor", "eval", "--data", str(small), "--model", str(done)]) == 0
    assert "did not finish" not in capsys.readouterr().err


@pytest.mark.parametrize("kinds", ["transformer,,gru", ",", "ar,"])
def test_an_empty_item_in_kinds_is_refused(small, tmp_path, capsys, kinds):
    """`transformer,,gru` trained as `transformer,gru` and `,` said "unknown []" (--seeds refuses both)."""
    out = tmp_path / "m"
    assert main(["predictor", "train", "--data", str(small), "--kinds", kinds, "--out-dir", str(out)]) == 2
    assert f"--kinds {kinds!r}: an empty item" in capsys.readouterr().err
    assert not out.exists()
