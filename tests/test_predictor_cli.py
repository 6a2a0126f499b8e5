"""``tokenwire predictor`` and ``tokenwire bench predictor`` end to end on a tiny dataset (seconds, not minutes)."""

import importlib.util
import json
import re
import shutil

import pytest

from tokenwire.daemon.cli import main
from tokenwire.predictor.dataset import load
from tokenwire.predictor.runtime import shipped_model_path

CROSS = "reno:on=1,off=1+cbr-l:rate=120%,on=0.3,off=0.7"


def test_collect_train_export_eval(tmp_path, capsys):
    pytest.importorskip("torch")
    d = tmp_path / "data"
    assert main(["predictor", "collect-many", "--traces", "6mbps", "--seeds", "1-2", "--seconds", "3",
                 "--probe-pps", "150", "--cross", CROSS, "--out-dir", str(d)]) == 0
    files = sorted(str(p) for p in d.glob("*.npz"))
    assert len(files) == 2 and len(json.loads((d / "index.json").read_text())) == 2
    m = tmp_path / "m"
    assert main(["predictor", "train", "--data", *files, "--out-dir", str(m), "--epochs", "1", "--window", "64",
                 "--net", '{"d_model": 16, "ff": 32}']) == 0
    assert {p.name for p in m.iterdir()} >= {"transformer.pt", "gru.pt", "ar.json", "train.json"}
    for kind in ("transformer", "gru"):
        assert main(["predictor", "export", "--checkpoint", str(m / f"{kind}.pt"), "--out", str(m / f"{kind}.onnx"),
                     "--check-data", files[0]]) == 0
    out = tmp_path / "eval.json"
    assert main(["predictor", "eval", "--data", files[1], "--model", str(m / "transformer.onnx"),
                 "--baselines", str(m), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["models"]) == {"transformer", "last", "ewma", "ar", "gru"}
    for res in doc["models"].values():
        assert res["n"] > 50 and res["mae_ms"] >= 0 and res["rmse_ms"] >= res["mae_ms"]
        assert set(res) >= {"mae_ms", "rmse_ms", "spike_mae_ms", "n"}
    assert "transformer" in capsys.readouterr().out


def test_eval_defaults_to_the_shipped_model(tmp_path):
    f = tmp_path / "d.npz"
    assert main(["predictor", "collect", "--down-trace", "6mbps", "--seconds", "3", "--probe-pps", "150",
                 "--cross", CROSS, "--out", str(f)]) == 0
    out = tmp_path / "e.json"
    assert main(["predictor", "eval", "--data", str(f), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["model"].endswith("swiftqueue.onnx") and {"transformer", "ewma", "last"} <= set(doc["models"])
    assert set(doc["references"]) == {"newest_acked", "clairvoyant_prev", "interpolated"}
    for ref in doc["references"].values():
        assert 0 < ref["n"] <= doc["models"]["ewma"]["n"] and ref["mae_ms"] >= 0
        assert set(ref["models_mae_ms_same_targets"]) == set(doc["models"])


def test_probe_rate_as_a_share_of_the_capacity(tmp_path, capsys):
    f = tmp_path / "s.npz"
    assert main(["predictor", "collect", "--down-trace", "6mbps", "--seconds", "3", "--probe-share", "0.25",
                 "--cross", CROSS, "--out", str(f)]) == 0
    meta = load(f)["meta"]
    assert meta["probe_pps"] == pytest.approx(0.25 * 6e6 / (8 * 1200))  # 156.25 packets/s of 1200 bytes
    assert 0.7 * 3 * 156.25 < meta["probe_packets"] < 1.3 * 3 * 156.25
    assert main(["predictor", "collect", "--down-trace", "6mbps", "--seconds", "1", "--probe-share", "1.5",
                 "--out", str(tmp_path / "x.npz")]) == 2
    assert "--probe-share must be within (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one way to give the rate, not two
        main(["predictor", "collect", "--down-trace", "6mbps", "--probe-share", "0.2", "--probe-pps", "9",
              "--out", str(tmp_path / "x.npz")])


def test_bad_input_is_a_clean_cli_error(tmp_path, capsys):
    assert main(["predictor", "collect", "--down-trace", str(tmp_path / "none"), "--seconds", "1",
                 "--out", str(tmp_path / "x.npz")]) == 2
    assert main(["predictor", "collect", "--down-trace", "6mbps", "--cross", "warp:9", "--seconds", "1",
                 "--out", str(tmp_path / "x.npz")]) == 2
    assert main(["predictor", "collect", "--down-trace", "6mbps", "--delay-ms", "-3", "--seconds", "1",
                 "--out", str(tmp_path / "x.npz")]) == 2  # was a ValueError traceback from the link model
    assert main(["predictor", "eval", "--data", str(tmp_path / "none.npz")]) == 2
    assert main(["bench", "predictor", "--model", str(tmp_path / "none.onnx")]) == 2
    err = capsys.readouterr().err
    assert "no such trace" in err and "unknown kind" in err and "no such dataset" in err
    assert "--delay-ms must be >= 0" in err


def test_bench_predictor_reports_every_batch_size(tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", "predictor", "--calls", "40", "--repeats", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    for name in ("onnx", "ewma"):
        assert set(doc[name]["batches"]) == {"1", "8", "64"}
        assert doc[name]["per_ack_pps"] > 0
    assert doc["target_pps"] == pytest.approx(16666.7, rel=1e-3)


def test_export_refuses_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)  # a valid torch file, but not one `train` wrote
    for path, says in ((tmp_path / "missing.pt", "no such checkpoint"), (junk, "not a checkpoint written by"),
                       (foreign, "not a checkpoint written by")):
        assert main(["predictor", "export", "--checkpoint", str(path), "--out", str(tmp_path / "x.onnx")]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err
    assert not (tmp_path / "x.onnx").exists()


def test_collect_fails_before_the_run_not_after_it(tmp_path, capsys):
    """A bad trace or an unwritable folder is reported before any simulation runs (a 900 s collect-many
    used to stop at the first bad trace after the others had run, or at the very end for its folder)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["predictor", "collect", "--down-trace", "6mbps", "--seconds", "1",
                 "--out", str(blocker / "d.npz")]) == 2
    err = capsys.readouterr().err
    assert "--out " in err and "cannot write there" in err and "virtual s" not in err  # no progress: never ran
    out = tmp_path / "many"
    assert main(["predictor", "collect-many", "--traces", "6mbps", str(tmp_path / "missing.down"),
                 "--seeds", "1", "--seconds", "1", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "missing.down" in err and "virtual s" not in err
    assert not list(out.glob("*.npz"))  # the good trace was not run either


@pytest.mark.parametrize(("argv", "message"), [
    (["--net", "[1]"], "--net must be a JSON object"),
    (["--net", '{"nope": 3}'], "--net: unknown key 'nope'"),
    (["--net", '{"d_model": "x"}'], "--net: d_model must be a positive integer"),
    (["--net", '{"d_model": 30}'], "--net: d_model (30) must be a multiple of heads (4)"),
    (["--net", '{"dropout": 1.5}'], "--net: dropout must be a number in [0, 1)"),
    (["--window", "1"], "--window must be at least 2"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--huber-ms", "0"], "--huber-ms must be > 0"),  # torch refused it after the data had loaded
    (["--alpha", "-2"], "--alpha must be >= 0"),  # trained, with negative weights on the sharp changes
    (["--kinds", "gru,ar", "--net", '{"d_model": 16}'], "--net configures the transformer, and --kinds gru,ar "
                                                         "trains none"),  # was silently ignored
])
def test_train_refuses_a_network_it_cannot_build(argv, message, tmp_path, capsys):
    """Each of these was a torch traceback (d_model 30 with 4 heads only at the first forward pass)."""
    pytest.importorskip("torch")
    data = tmp_path / "d.npz"
    data.write_bytes(b"")  # never read: the arguments are checked first
    assert main(["predictor", "train", "--data", str(data), "--out-dir", str(tmp_path / "m"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_net_override_defaults_match_the_model():
    """check_net_overrides validates against a copy of the constructor's defaults: keep them in step."""
    import inspect

    pytest.importorskip("torch")
    from tokenwire.predictor.models import TransformerForecaster
    from tokenwire.predictor.train import TRANSFORMER_DEFAULTS

    params = inspect.signature(TransformerForecaster.__init__).parameters
    assert {k: params[k].default for k in TRANSFORMER_DEFAULTS} == TRANSFORMER_DEFAULTS


def test_collect_many_refuses_runs_that_would_overwrite_each_other(tmp_path, capsys):
    """Same file name in two folders, a repeated trace or a repeated seed: the later run overwrote the
    earlier file while the summary said "wrote 2 datasets" and index.json listed both."""
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "link.down").write_text("".join(f"{ms}\n" for ms in range(1, 1001)))
    a, b = str(tmp_path / "a" / "link.down"), str(tmp_path / "b" / "link.down")
    out = tmp_path / "many"
    for traces, seeds, says in (([a, b], "1", f"{a}, {b} would be written to the same files link_down-sN.npz"),
                                (["6mbps", "6mbps"], "1", "--traces: 6mbps given more than once"),
                                (["6mbps"], "1,1", "--seeds: 1 given more than once"),
                                (["6mbps"], "1-3,2", "--seeds: 2 given more than once")):
        assert main(["predictor", "collect-many", "--traces", *traces, "--seeds", seeds, "--seconds", "1",
                     "--out-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert says in err and "virtual s" not in err, err  # refused before any run
    assert not list(out.glob("*.npz")) and not (out / "index.json").exists()


def test_eval_needs_both_baselines_in_a_folder_named_on_purpose(small, tmp_path, capsys):
    """--baselines DIR that is missing, or lacks gru.onnx / ar.json (train writes gru.pt), used to print
    "skipping" and score without them, exit 0."""
    shipped = shipped_model_path().parent
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "gru.pt").write_bytes(b"")  # what train leaves: the checkpoint, not the ONNX file
    bare = tmp_path / "bare"
    bare.mkdir()
    for folder, says in (
            (tmp_path / "missing", "no such baselines folder"),
            (ckpt, f"make it with `tokenwire predictor export --checkpoint {ckpt}/gru.pt --out {ckpt}/gru.onnx`"),
            (bare, f"train it with `tokenwire predictor train --data ... --kinds gru --out-dir {bare}`")):
        assert main(["predictor", "eval", "--data", str(small), "--baselines", str(folder)]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err
    assert "ar.json: fit it with `tokenwire predictor train --data ... --kinds ar" in err
    shutil.copy(shipped / "gru.onnx", ckpt / "gru.onnx")
    assert main(["predictor", "eval", "--data", str(small), "--baselines", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "ar.json" in err and "gru.onnx" not in err, err
    shutil.copy(shipped / "ar.json", ckpt / "ar.json")
    out = tmp_path / "e.json"
    assert main(["predictor", "eval", "--data", str(small), "--baselines", str(ckpt), "--json", str(out)]) == 0
    assert {"ar", "gru"} <= set(json.loads(out.read_text())["models"])


def test_eval_refuses_a_model_of_the_wrong_kind(small, tmp_path, capsys):
    """A GRU given as --model was scored and labelled "transformer"; a transformer as gru.onnx, "gru"."""
    shipped = shipped_model_path().parent
    assert main(["predictor", "eval", "--data", str(small), "--model", str(shipped / "gru.onnx")]) == 2
    assert "gru.onnx: a gru model where a transformer is expected" in capsys.readouterr().err
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    shutil.copy(shipped / "swiftqueue.onnx", swapped / "gru.onnx")
    shutil.copy(shipped / "ar.json", swapped / "ar.json")
    assert main(["predictor", "eval", "--data", str(small), "--baselines", str(swapped)]) == 2
    assert "gru.onnx: a transformer model where a gru is expected" in capsys.readouterr().err


def test_datasets_without_prediction_points_are_one_clear_line(small, tmp_path, capsys):
    """Fewer acks than the window + 1 at every send: eval and train crashed with a numpy reshape error or
    torch's "Expected positive integer total_steps"."""
    short = tmp_path / "short.npz"
    assert main(["predictor", "collect", "--down-trace", "6mbps", "--seconds", "0.3", "--probe-pps", "100",
                 "--cross", CROSS, "--out", str(short)]) == 0
    assert "train and eval need more than the window (default 64)" in capsys.readouterr().err
    argvs = [["eval", "--data", str(short)], ["train", "--data", str(short), "--kinds", "ar", "--out-dir",
                                               str(tmp_path / "m")]]
    if importlib.util.find_spec("torch") is not None:
        argvs.append(["train", "--data", str(short), "--kinds", "gru", "--epochs", "1",
                      "--out-dir", str(tmp_path / "m")])
    for argv in argvs:
        assert main(["predictor", *argv]) == 2
        err = capsys.readouterr().err
        assert f"no prediction points in {short}" in err and "needs more than 64 acks" in err, err
        assert "Traceback" not in err
    assert main(["predictor", "train", "--data", str(short), str(small), "--kinds", "ar",
                 "--out-dir", str(tmp_path / "m")]) == 0  # the file with points is used, the other skipped
    assert f"warning: skipping {short}" in capsys.readouterr().err
    assert (tmp_path / "m" / "ar.json").exists()


def test_truncated_dataset_is_a_clean_error(small, tmp_path, capsys):
    """A zip cut short raised zipfile.BadZipFile through eval, train and export --check-data."""
    cut = tmp_path / "cut.npz"
    cut.write_bytes(small.read_bytes()[:3000])
    assert main(["predictor", "eval", "--data", str(cut)]) == 2
    assert main(["predictor", "train", "--data", str(cut), "--kinds", "ar", "--out-dir", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.count(f"{cut}: not a latency dataset") == 2 and "Traceback" not in err, err


def test_collect_refuses_a_run_where_nothing_got_through(tmp_path, capsys):
    """1 kbit/s delivers no 1200-byte packet in 2 s: the run was saved with a NaN summary and exit 0."""
    out = tmp_path / "dead.npz"
    assert main(["predictor", "collect", "--down-trace", "1kbps", "--seconds", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "none of the" in err and "probe packets got through in 2 virtual s" in err and "nan" not in err, err
    assert not out.exists()


def test_eval_json_has_null_where_a_metric_has_no_targets(tmp_path, monkeypatch, capsys):
    """A spike MAE over a set without spikes is NaN; the file said NaN, which strict JSON parsers refuse."""
    import math

    from tokenwire.predictor import evaluate

    row = {"mae_ms": 1.0, "rmse_ms": 1.0, "spike_mae_ms": math.nan, "n": 5, "n_spike": 0, "bias_ms": 0.0,
           "median_ae_ms": 1.0, "l_mae_ms": 1.0, "c_mae_ms": 1.0}
    monkeypatch.setattr(evaluate, "run_eval", lambda *a, **k: {"models": {"transformer": row, "ewma": row},
                                                              "references": {}})
    out = tmp_path / "e.json"
    assert main(["predictor", "eval", "--data", "x.npz", "--json", str(out)]) == 0
    assert "NaN" not in out.read_text()
    assert json.loads(out.read_text())["models"]["ewma"]["spike_mae_ms"] is None


def test_collect_many_index_is_rewritten_after_each_dataset_strict_and_true_on_interrupt(tmp_path, monkeypatch,
                                                                                        capsys):
    """index.json was written once at the end: after Ctrl-C an old one contradicted the files, and a run
    without known C-faster shares wrote the token NaN into it."""
    from tokenwire.predictor import cli

    out = tmp_path / "many"
    out.mkdir()
    stale = [{"trace": "0.05mbps", "seed": 2, "path": str(out / "0_05mbps-s2.npz"), "packets": 999},
             {"trace": "other", "seed": 7, "path": str(out / "other-s7.npz"), "packets": 5}]
    (out / "index.json").write_text(json.dumps(stale))
    # the probe's repro: 15 packets on 50 kbit/s, no (packet, queue) pair with both targets known -> NaN shares
    assert main(["predictor", "collect-many", "--traces", "0.05mbps", "--seeds", "2", "--seconds", "4",
                 "--probe-pps", "3", "--out-dir", str(out)]) == 0
    text = (out / "index.json").read_text()
    assert "NaN" not in text
    index = json.loads(text)
    assert [(e["trace"], e["seed"]) for e in index] == [("other", 7), ("0.05mbps", 2)]  # stale entry replaced
    assert index[1]["packets"] == 15 and index[1]["share_c_faster"] is None
    capsys.readouterr()

    real = cli._run_collect
    calls = []

    def interrupted_on_the_second(cfg, path, label):
        calls.append(path)
        if len(calls) == 2:
            assert [e["seed"] for e in json.loads((out / "index.json").read_text())] == [7, 1]  # the first is in
            raise KeyboardInterrupt
        return real(cfg, path, label)

    monkeypatch.setattr(cli, "_run_collect", interrupted_on_the_second)
    assert main(["predictor", "collect-many", "--traces", "0.05mbps", "--seeds", "1-3", "--seconds", "4",
                 "--probe-pps", "3", "--out-dir", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"stopped after 1 of 3 datasets: completed {out / '0_05mbps-s1.npz'}" in err, err
    assert f"2 not written: {out / '0_05mbps-s2.npz'}, {out / '0_05mbps-s3.npz'}" in err
    # seed 2's file from the first run is still on disk, but about to be rewritten when the run began: dropped
    assert [(e["trace"], e["seed"]) for e in json.loads((out / "index.json").read_text())] == [("other", 7),
                                                                                            ("0.05mbps", 1)]


@pytest.mark.parametrize("cmd", [["collect", "--down-trace", "6mbps", "--seconds", "0.1", "--out", "{tmp}/x.npz"],
                                 ["train", "--data", "{tmp}/x.npz", "--out-dir", "{tmp}/m"]])
def test_seeds_are_non_negative_everywhere(cmd, tmp_path, capsys):
    """train --seed -5 was a numpy traceback after the data had loaded; collect took it, collect-many not."""
    with pytest.raises(SystemExit) as exc:
        main(["predictor", *(a.format(tmp=tmp_path) for a in cmd), "--seed", "-5"])
    assert exc.value.code == 2
    assert "--seed: -5 is negative; seeds are integers >= 0" in capsys.readouterr().err


def test_train_reports_divergence_as_a_clean_error(small, tmp_path, capsys):
    """--lr 1e8: NaN losses, then an AssertionError from train.py."""
    pytest.importorskip("torch")
    assert main(["predictor", "train", "--data", str(small), "--kinds", "transformer", "--epochs", "2",
                 "--lr", "1e8", "--out-dir", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "transformer: training diverged (non-finite loss at epoch 1); lower --lr" in err and "Traceback" not in err


def test_train_log_is_written_after_each_model_and_checkpoints_say_whether_they_finished(small, tmp_path,
                                                                                        monkeypatch, capsys):
    """train.json was written only at the end: Ctrl-C left the new checkpoints next to the previous run's
    train.json and lost the log of the models already trained."""
    torch = pytest.importorskip("torch")
    from tokenwire.predictor import train as train_mod

    m = tmp_path / "m"
    m.mkdir()
    (m / "train.json").write_text(json.dumps({"command": "an earlier run", "models": {"transformer": {}}}))
    real = train_mod.train_net

    def interrupt_the_transformer(cfg, *a, **k):
        if cfg.kind == "transformer":
            raise KeyboardInterrupt
        return real(cfg, *a, **k)

    monkeypatch.setattr(train_mod, "train_net", interrupt_the_transformer)
    assert main(["predictor", "train", "--data", str(small), "--kinds", "ar,gru,transformer", "--epochs", "2",
                 "--out-dir", str(m)]) == 130
    log = json.loads((m / "train.json").read_text())
    assert log["finished"] is False and log["kinds"] == ["ar", "gru", "transformer"]
    assert set(log["models"]) == {"ar", "gru"} and len(log["models"]["gru"]["history"]) >= 1
    ck = torch.load(m / "gru.pt", weights_only=True)
    assert ck["finished"] is True and ck["best_epoch"] == log["models"]["gru"]["best_epoch"]
    monkeypatch.setattr(train_mod, "train_net", real)
    assert main(["predictor", "train", "--data", str(small), "--kinds", "gru", "--epochs", "1",
                 "--out-dir", str(m)]) == 0
    assert json.loads((m / "train.json").read_text())["finished"] is True


def _gru_checkpoint(path, history, **fields):
    """A GRU checkpoint as `train` writes it, with the given log (``fields``: best_epoch, finished)."""
    torch = pytest.importorskip("torch")
    from tokenwire.predictor.models import GRUForecaster
    from tokenwire.predictor.train import TrainConfig, save_checkpoint

    torch.manual_seed(0)
    model = GRUForecaster(window=64)
    save_checkpoint(path, model, TrainConfig(kind="gru"), history, **fields)
    if not fields:  # as checkpoints were before they recorded best_epoch and finished
        ck = torch.load(path, weights_only=True)
        del ck["best_epoch"], ck["finished"]
        torch.save(ck, path)
    return model


def _meta(path):
    from tokenwire.predictor.runtime import load_forecaster

    return load_forecaster(str(path)).meta


HISTORY = [{"epoch": e, "train_loss": 1.0, "val_loss": v, "val_mae_ms": 10.0} for e, v in ((1, 0.5), (2, 0.3),
                                                                                          (3, 0.4), (4, 0.45))]


def test_export_stamps_the_best_epoch_and_warns_about_unfinished_checkpoints(tmp_path, capsys):
    """best_epoch was len(history), the epochs run (the shipped model says 4, its card epoch 2)."""
    def export(ck, out):
        return main(["predictor", "export", "--checkpoint", str(ck), "--out", str(out)])

    _gru_checkpoint(tmp_path / "new.pt", HISTORY[:2], best_epoch=2, finished=False)  # saved mid-run
    assert export(tmp_path / "new.pt", tmp_path / "a.onnx") == 0
    assert "new.pt is from a training run that did not finish" in capsys.readouterr().err
    assert _meta(tmp_path / "a.onnx")["best_epoch"] == 2
    _gru_checkpoint(tmp_path / "done.pt", HISTORY, best_epoch=2, finished=True)
    assert export(tmp_path / "done.pt", tmp_path / "b.onnx") == 0
    assert "did not finish" not in capsys.readouterr().err
    meta = _meta(tmp_path / "b.onnx")
    assert (meta["best_epoch"], meta["epochs_run"], meta["finished"]) == (2, 4, True)
    _gru_checkpoint(tmp_path / "old.pt", HISTORY)  # no best_epoch recorded: the lowest validation loss
    assert export(tmp_path / "old.pt", tmp_path / "c.onnx") == 0
    assert _meta(tmp_path / "c.onnx")["best_epoch"] == 2


def test_shipped_model_metadata_names_the_epoch_early_stopping_kept():
    """The card says early stopping kept epoch 2 (of 4 run with --patience 2); the metadata said 4."""
    card = (shipped_model_path().parent / "model_card.md").read_text()
    kept = int(re.search(r"early stopping kept epoch (\d+)", card).group(1))
    assert _meta(shipped_model_path())["best_epoch"] == kept == 2


def test_export_refuses_a_model_that_fails_validation_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """A NaN model was "validated" (max() keeps 0.0 over a NaN difference); a model that failed validation
    was a ModelError traceback and stayed at --out, loadable."""
    torch = pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)  # out/ below the current directory: a folder the command may make
    model = _gru_checkpoint(tmp_path / "nan.pt", HISTORY, best_epoch=2, finished=True)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    ck = torch.load(tmp_path / "nan.pt", weights_only=True)
    ck["state_dict"] = model.state_dict()
    torch.save(ck, tmp_path / "nan.pt")
    out = tmp_path / "out" / "nan.onnx"
    assert main(["predictor", "export", "--checkpoint", str(tmp_path / "nan.pt"), "--out", "out/nan.onnx"]) == 2
    err = capsys.readouterr().err
    assert "answers non-finite latencies" in err and "not written to out/nan.onnx" in err and "Traceback" not in err
    assert not out.parent.exists()  # nothing written: no temporary file left, and the folder made for it removed
    out.parent.mkdir()
    out.write_bytes(b"the previous model")
    assert main(["predictor", "export", "--checkpoint", str(tmp_path / "nan.pt"), "--out", str(out)]) == 2
    assert out.read_bytes() == b"the previous model"


def test_export_check_data_without_prediction_points_is_refused(tmp_path, capsys):
    """The comparison silently fell back to random windows only."""
    pytest.importorskip("torch")
    _gru_checkpoint(tmp_path / "g.pt", HISTORY, best_epoch=2, finished=True)
    short = tmp_path / "short.npz"
    assert main(["predictor", "collect", "--down-trace", "6mbps", "--seconds", "0.3", "--probe-pps", "100",
                 "--cross", CROSS, "--out", str(short)]) == 0
    capsys.readouterr()
    assert main(["predictor", "export", "--checkpoint", str(tmp_path / "g.pt"), "--out", str(tmp_path / "g.onnx"),
                 "--check-data", str(short)]) == 2
    err = capsys.readouterr().err
    assert f"--check-data: no prediction points in {short}" in err and not (tmp_path / "g.onnx").exists()


def test_eval_checks_ar_json_and_says_to_give_baselines_for_another_window(small, tmp_path, capsys):
    """A null or mis-shaped ar.json failed in the middle of eval; a model of another window with the default
    (shipped, 64-ack) baselines said only that the windows differ."""
    from .test_predictor_runtime import tiny_model

    shipped = shipped_model_path().parent
    for coef, says in ((None, "no coefficients (coef is null"), ([[1, 2], [3, 4]], "coef has shape (2, 2)")):
        folder = tmp_path / f"b{len(str(coef))}"
        folder.mkdir()
        shutil.copy(shipped / "gru.onnx", folder / "gru.onnx")
        (folder / "ar.json").write_text(json.dumps({"ridge": 0.001, "coef": coef}))
        assert main(["predictor", "eval", "--data", str(small), "--baselines", str(folder)]) == 2
        err = capsys.readouterr().err
        assert f"ar.json: unusable AR coefficients ({says}" in err and "Traceback" not in err, err
    model = tiny_model(tmp_path / "w32.onnx", window=32)
    assert main(["predictor", "eval", "--data", str(small), "--model", str(model)]) == 2
    err = capsys.readouterr().err
    assert "window 64 differs from the transformer's 32" in err and "give --baselines a folder" in err, err


def test_train_caps_the_blas_threads_of_the_ar_fit_at_threads(small, tmp_path, monkeypatch):
    """The AR fit ran numpy's BLAS on a thread per core whatever --threads said; on a shared machine the spinning
    threads cost 8-14 s of CPU where one spends 1.8 s. conftest.py sets one BLAS thread for the whole suite, so
    --threads 2 shows the cap is train's own doing."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from tokenwire.predictor.baselines import LinearAR

    blas = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
    if not blas:
        pytest.skip("numpy's BLAS is not one threadpoolctl can see")
    seen: list[set[int]] = []
    real_fit = LinearAR.fit

    def fit(self, *args, **kwargs):
        seen.append({p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"})
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(LinearAR, "fit", fit)
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        assert main(["predictor", "train", "--data", str(small), "--kinds", "ar", "--threads", "2",
                     "--out-dir", str(tmp_path / "m")]) == 0
        assert seen == [{2}]
        # and put back afterwards: a library caller's own setting survives the command
        assert {p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"} == {1}
