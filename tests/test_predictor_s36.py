"""Predictor workflow fixes of round s36: collect (and the virtual swiftqueue run) keep only the packets they read,
eval warns about a baselines folder whose gru.onnx / ar.json are of another training than its gru.pt /
train.json, checkpoints record their input features and export refuses other ones, collect-many keeps a broken
index.json aside and records each run's settings, and train says what its epoch columns and ``*`` mean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenwire.daemon.cli import main

CROSS = "reno:on=1,off=1+cbr-l:rate=120%,on=0.3,off=0.7"


def _collect(out: Path, seed: int, seconds: float = 3.0) -> Path:
    assert main(["predictor", "collect", "--down-trace", "6mbps", "--seconds", str(seconds), "--probe-pps", "150",
                 "--cross", CROSS, "--seed", str(seed), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> tuple[Path, Path]:
    """Two 3-s datasets (seeds 1 and 2), a few hundred prediction points each (window 64)."""
    d = tmp_path_factory.mktemp("data")
    return _collect(d / "a.npz", 1), _collect(d / "b.npz", 2)


def _captured_simulations(monkeypatch) -> list:
    """Every vsim Simulation built from now on (collect and swiftqueue_eval import the class when they run)."""
    from tokenwire.testbed import vsim

    made: list = []
    real = vsim.Simulation

    class Capturing(real):  # type: ignore[misc, valid-type]
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(vsim, "Simulation", Capturing)
    from tokenwire.testbed import swiftqueue_eval  # (imports the class by name)

    monkeypatch.setattr(swiftqueue_eval, "Simulation", Capturing)
    return made


# ------------------------------------------------------------------------------ 1. memory of the virtual runs
def test_simulation_keeps_only_the_records_its_filter_takes_and_the_link_hook_sees_all():
    from tokenwire.testbed.link import Link
    from tokenwire.testbed.trace import trace_from_spec
    from tokenwire.testbed.vsim import CbrFlow, Simulation

    seen: list = []
    link = Link(trace_from_spec("10mbps"), delay=0.005, on_record=seen.append)
    sim = Simulation(link, keep=lambda pkt: pkt.meta[0] == 1)
    sim.add(CbrFlow(2e6, stop=0.5))
    sim.add(CbrFlow(1e6, stop=0.5))
    sim.run(1.0)
    assert sim.records and {p.meta[0] for p in sim.records} == {1}
    assert {p.meta[0] for p in seen} == {0, 1}  # the link's own hook still gets every packet
    assert len(seen) == len(sim.records) + sum(1 for p in seen if p.meta[0] == 0)


def test_collect_holds_no_packet_and_no_rtt_list_to_the_end(monkeypatch):
    """collect held every packet of the run (cross traffic included) and every flow's per-ack RTTs until it
    ended: 171 MB peak for 60 virtual s at 100 Mbit/s, ~2 MB more per virtual s."""
    from tokenwire.predictor.dataset import CollectConfig, collect

    sims = _captured_simulations(monkeypatch)
    data = collect(CollectConfig(down_trace="6mbps", cross=CROSS, seconds=2.0, probe_pps=150, seed=3))
    (sim,) = sims
    assert len(sim.flows) > 2  # cross traffic ran
    assert sim.records == []
    assert all(not hasattr(f.stats, "rtts") for f in sim.flows)  # (vsim keeps no per-ack RTT list at all now)
    assert sum(f.stats.acked for f in sim.flows) > 100  # ...and was acknowledged
    meta = json.loads(data["meta"])
    assert meta["probe_delivered"] > 100


def test_virtual_swiftqueue_run_keeps_only_the_marked_flows_packets(monkeypatch):
    from tokenwire.testbed.swiftqueue_eval import SwiftQueueConfig, run_virtual

    sims = _captured_simulations(monkeypatch)
    cfg = SwiftQueueConfig(down_trace="20mbps", cross=["tcp:reno", "udp-ect1:5mbps"], seconds=3.0,
                           policies=["l4s"], virtual=True)
    run = run_virtual(cfg, "l4s")
    (sim,) = sims
    marked = sim.flows[0]
    assert marked.name == "marked" and len(sim.flows) > 1
    assert sim.records and all(p.meta[0] == marked.fid for p in sim.records)
    assert len(run.records) == len(sim.records)


# ------------------------------------------------------------------------------ 2. stale baselines in eval
@pytest.fixture(scope="module")
def trained(datasets, tmp_path_factory) -> Path:
    """A baselines folder as `train --kinds gru,ar` and `export` leave it: gru.pt, gru.onnx, ar.json, train.json."""
    pytest.importorskip("torch")
    d = tmp_path_factory.mktemp("base")
    assert main(["predictor", "train", "--data", str(datasets[0]), "--kinds", "gru,ar", "--epochs", "1",
                 "--batch", "64", "--out-dir", str(d)]) == 0
    assert main(["predictor", "export", "--checkpoint", str(d / "gru.pt"), "--out", str(d / "gru.onnx")]) == 0
    return d


def _eval_err(data: Path, base: Path, capsys) -> str:
    capsys.readouterr()
    assert main(["predictor", "eval", "--data", str(data), "--baselines", str(base)]) == 0
    return capsys.readouterr().err


def test_eval_says_nothing_of_a_consistent_baselines_folder(trained, datasets, capsys):
    err = _eval_err(datasets[1], trained, capsys)
    assert "is not an export of" not in err and "is older than" not in err, err


def test_eval_warns_when_the_gru_onnx_is_of_an_earlier_training(trained, datasets, tmp_path, capsys):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(trained, base)
    # a second training into the folder, of the gru only and on other data; its export is not redone
    assert main(["predictor", "train", "--data", str(datasets[1]), "--kinds", "gru", "--epochs", "2",
                 "--batch", "64", "--out-dir", str(base)]) == 0
    err = _eval_err(datasets[0], base, capsys)
    assert f"warning: {base / 'gru.onnx'} is not an export of {base / 'gru.pt'}" in err, err
    assert "other training settings (" in err and "gru.pt is newer" in err
    assert f"--checkpoint {base / 'gru.pt'} --out {base / 'gru.onnx'}" in err
    # the ar.json is of the first run (on a.npz); train.json now logs a run on b.npz that fitted no ar
    assert f"warning: {base / 'ar.json'} is older than {base / 'train.json'}" in err, err
    assert f"on {datasets[0]}" in err and "--kinds gru)" in err
    # exported again: the gru warning goes, the ar one stays
    assert main(["predictor", "export", "--checkpoint", str(base / "gru.pt"), "--out", str(base / "gru.onnx")]) == 0
    err = _eval_err(datasets[0], base, capsys)
    assert "is not an export of" not in err and "ar.json is older than" in err, err


def test_stale_gru_compares_with_train_json_when_there_is_no_checkpoint(tmp_path):
    from tokenwire.predictor.evaluate import stale_gru

    history = [{"epoch": e, "val_loss": 1.0 / e} for e in (1, 2, 3)]
    (tmp_path / "train.json").write_text(json.dumps({"kinds": ["gru"], "data": ["x.npz"],
                                                     "models": {"gru": {"best_epoch": 3, "history": history}}}))
    assert stale_gru(tmp_path, {"best_epoch": 3, "epochs_run": 3}) is None
    why = stale_gru(tmp_path, {"best_epoch": 1, "epochs_run": 4})
    assert why is not None and "best epoch 1 of 4 run in the export, 3 of 3 there" in why
    assert str(tmp_path / "train.json") in why
    assert stale_gru(tmp_path, {}) is None  # an export without the record (older): nothing to compare


# ------------------------------------------------------------------------------ 3. features in checkpoints
def _gru_checkpoint(path: Path, **changes) -> None:
    torch = pytest.importorskip("torch")
    from tokenwire.predictor.models import GRUForecaster
    from tokenwire.predictor.train import TrainConfig, save_checkpoint

    torch.manual_seed(0)
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 0.5, "val_mae_ms": 10.0}]
    save_checkpoint(path, GRUForecaster(window=64), TrainConfig(kind="gru"), history, best_epoch=1)
    ck = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if value is None:
            del ck[key]
        else:
            ck[key] = value
    torch.save(ck, path)


def test_checkpoints_record_their_features_and_export_stamps_them(tmp_path):
    torch = pytest.importorskip("torch")
    from tokenwire.predictor.features import FEATURES, FEATURES_VERSION
    from tokenwire.predictor.runtime import load_forecaster

    _gru_checkpoint(tmp_path / "gru.pt")
    ck = torch.load(tmp_path / "gru.pt", weights_only=True)
    assert ck["features"] == list(FEATURES) and ck["features_version"] == FEATURES_VERSION
    assert main(["predictor", "export", "--checkpoint", str(tmp_path / "gru.pt"), "--out",
                 str(tmp_path / "gru.onnx")]) == 0
    assert load_forecaster(str(tmp_path / "gru.onnx")).meta["features_version"] == FEATURES_VERSION


def test_export_refuses_a_checkpoint_of_other_features_naming_the_versions(tmp_path, capsys):
    from tokenwire.predictor.features import FEATURES_VERSION

    _gru_checkpoint(tmp_path / "v2.pt", features_version=FEATURES_VERSION - 1)
    assert main(["predictor", "export", "--checkpoint", str(tmp_path / "v2.pt"), "--out",
                 str(tmp_path / "v2.onnx")]) == 2
    err = capsys.readouterr().err
    assert f"trained on features version {FEATURES_VERSION - 1}; this version builds features version " \
           f"{FEATURES_VERSION}" in err, err
    assert not (tmp_path / "v2.onnx").exists()
    _gru_checkpoint(tmp_path / "swapped.pt", features=["age", "ce"])
    assert main(["predictor", "export", "--checkpoint", str(tmp_path / "swapped.pt"), "--out",
                 str(tmp_path / "s.onnx")]) == 2
    assert "trained on other features (age, ce)" in capsys.readouterr().err


def test_export_of_a_checkpoint_from_before_the_record_says_so(tmp_path, capsys):
    _gru_checkpoint(tmp_path / "old.pt", features=None, features_version=None)
    assert main(["predictor", "export", "--checkpoint", str(tmp_path / "old.pt"), "--out",
                 str(tmp_path / "old.onnx")]) == 2
    err = capsys.readouterr().err
    assert "a checkpoint of an older `tokenwire predictor train` that did not record the input features" in err
    assert "not a checkpoint written by" not in err
    assert not (tmp_path / "old.onnx").exists()


# ------------------------------------------------------------------------------ 4. collect-many's index
def test_collect_many_keeps_a_broken_index_aside_and_records_each_runs_settings(tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    broken = b'[{"trace": "lte.trace", "seed": 1, "path": "lte_trace-s1.npz"}, {"trace": '  # cut short
    (out / "index.json").write_bytes(broken)
    assert main(["predictor", "collect-many", "--traces", "6mbps", "--seeds", "4", "--seconds", "1.5",
                 "--probe-pps", "120", "--delay-ms", "7", "--cross", CROSS, "--out-dir", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {out / 'index.json'}: unreadable (" in err and "moved to index.json.broken" in err, err
    assert (out / "index.json.broken").read_bytes() == broken
    (entry,) = json.loads((out / "index.json").read_text())
    cfg = entry["config"]
    assert (cfg["seconds"], cfg["probe_pps"], cfg["delay_ms"], cfg["seed"], cfg["down_trace"], cfg["cross"]) == \
        (1.5, 120.0, 7.0, 4, "6mbps", CROSS)
    # a second broken index does not replace the first one kept aside
    (out / "index.json").write_text('{"not": "a list"}')
    assert main(["predictor", "collect-many", "--traces", "6mbps", "--seeds", "4", "--seconds", "1.5",
                 "--probe-pps", "120", "--out-dir", str(out)]) == 0
    assert "not a list of datasets; moved to index.json.broken.1" in capsys.readouterr().err
    assert (out / "index.json.broken").read_bytes() == broken
    assert json.loads((out / "index.json.broken.1").read_text()) == {"not": "a list"}


# ------------------------------------------------------------------------------ 5. train's output
def test_train_explains_its_columns_and_the_ar_fit_reports_progress(datasets):
    pytest.importorskip("torch")
    from tokenwire.predictor.train import TrainConfig, fit_ar, load_points, train_net

    train, val = load_points([str(datasets[0])], 64, 0.2, log=lambda _: None)
    lines: list[str] = []
    train_net(TrainConfig(kind="gru", epochs=1, batch=64, huber_ms=3.0), train, val, log=lines.append)
    first_epoch = next(i for i, line in enumerate(lines) if "val MAE" in line)
    legend = "\n".join(lines[:first_epoch])  # before the epoch lines it explains
    assert "train, val = loss" in legend and "units of 100 ms" in legend and "transition at 3 ms" in legend
    assert "* = a new lowest validation loss (not MAE)" in legend, lines
    steps: list[str] = []
    fit_ar(train, None, log=steps.append)
    assert any("fold 1/4" in s for s in steps) and any("final fit" in s for s in steps), steps
    assert all(s.startswith("  ar: ") for s in steps)


def test_stale_ar_compares_the_training_files_by_content(tmp_path) -> None:
    """train.json records the files' sha256 (data_files): an ar.json fitted on data re-collected in place is stale,
    and one fitted on the same file named otherwise (./a.npz, a.npz) is not (both went the other way on paths)."""
    import json
    import os

    from tokenwire.predictor.evaluate import stale_ar

    def verdict(ar_files: list[dict], logged: list[dict]) -> str | None:
        (tmp_path / "ar.json").write_text(json.dumps({"data_files": ar_files}))
        (tmp_path / "train.json").write_text(json.dumps(
            {"kinds": ["transformer"], "data": [f["path"] for f in logged], "data_files": logged}))
        os.utime(tmp_path / "ar.json", (1_000_000, 1_000_000))  # older than the log
        return stale_ar(tmp_path, json.loads((tmp_path / "ar.json").read_text()))

    old, new = "0" * 64, "1" * 64
    assert verdict([{"path": "a.npz", "sha256": old}], [{"path": "a.npz", "sha256": new}]) is not None
    assert verdict([{"path": "./a.npz", "sha256": new}], [{"path": "a.npz", "sha256": new}]) is None
