"""The predictor pipeline's second round of fixes: a SIGHUP after the swiftqueue model file changed, outputs that
would overwrite inputs, duplicate and training ``--data`` files, progress without a terminal, the thread count in
``train_config``, and clearer messages (checkpoints, ``bench predictor --calls``, ``--cross``, ``--seeds``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from tokenwire.daemon.cli import main
from tokenwire.predictor import crossspec
from tokenwire.predictor.crossspec import CrossSpecError, parse_cross_spec
from tokenwire.predictor.runtime import shipped_model_path

from .test_marking_fixes2 import _Notes

CROSS = "reno:on=1,off=1+cbr-l:rate=120%,on=0.3,off=0.7"
TINY_NET = '{"d_model": 8, "heads": 2, "layers": 1, "ff": 8}'


def _collect(out: Path, seed: int = 1) -> int:
    return main(["predictor", "collect", "--down-trace", "6mbps", "--seconds", "3", "--probe-pps", "150",
                 "--cross", CROSS, "--seed", str(seed), "--out", str(out)])


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Two 3-s datasets (seeds 1 and 2) with a few hundred prediction points each."""
    d = tmp_path_factory.mktemp("data")
    assert _collect(d / "a.npz", 1) == 0 and _collect(d / "b.npz", 2) == 0
    return d / "a.npz", d / "b.npz"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, datasets):
    """A tiny transformer trained on a.npz (one epoch, 2 threads), its checkpoint folder and its ONNX export."""
    torch = pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("ck")
    threads = torch.get_num_threads()
    try:
        assert main(["predictor", "train", "--data", str(datasets[0]), "--kinds", "transformer", "--epochs", "1",
                     "--net", TINY_NET, "--threads", "2", "--out-dir", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # (the CLI sets it process-wide)
    assert main(["predictor", "export", "--checkpoint", str(out / "transformer.pt"), "--out",
                 str(out / "transformer.onnx")]) == 0
    return out


# ------------------------------------------------------------------------------------------------ 1. SIGHUP
def _started_daemon(tmp_path: Path, model: Path):
    from tokenwire.daemon import service

    path = tmp_path / "tokenwire.toml"
    path.write_text(f'[marking]\npolicy = "swiftqueue"\nmodel = "{model}"\n')
    d = service.Daemon(service.load_config(path), notifier=_Notes())  # type: ignore[arg-type]
    d.marking.start()  # what the daemon's start does with [marking]: load the model (or fall back to l4s)
    return d


def _reload(d) -> None:
    async def run() -> None:
        d.model_check = None
        assert d.reload() is True
        assert d.model_check is not None  # checked on a worker thread
        with contextlib.suppress(Exception):
            await d.model_check

    asyncio.run(run())


def _second_model() -> Path:
    other = shipped_model_path().parent / "gru.onnx"  # loads as a latency model too, with other bytes
    if not shipped_model_path().exists() or not other.exists():
        pytest.skip("no shipped models in this checkout")
    return other


def test_a_reload_says_the_model_file_was_replaced_and_the_old_one_still_runs(tmp_path, caplog):
    pytest.importorskip("onnxruntime")
    other = _second_model()
    model = tmp_path / "live.onnx"
    shutil.copy(shipped_model_path(), model)
    d = _started_daemon(tmp_path, model)
    assert d.marking.effective_policy == "swiftqueue"
    with caplog.at_level(logging.WARNING, logger="tokenwire.daemon"):
        _reload(d)  # the same file: nothing to say
        assert "marking.model" not in caplog.text
        shutil.copy(other, model)  # model B exported over model A's path
        _reload(d)
    assert f"reload: marking.model: {model} changed since start" in caplog.text, caplog.text
    assert "keeps the model it loaded then: restart to use this one" in caplog.text
    assert "running now: swiftqueue" in caplog.text


def test_a_reload_says_a_model_that_did_not_load_at_start_loads_now(tmp_path, caplog):
    pytest.importorskip("onnxruntime")
    _second_model()
    model = tmp_path / "live.onnx"
    model.write_bytes(b"not a model")
    d = _started_daemon(tmp_path, model)
    assert d.marking.effective_policy == "l4s"  # fell back at start
    with caplog.at_level(logging.WARNING, logger="tokenwire.daemon"):
        _reload(d)  # still bad: the warning that was there before
        assert "a restart would fall back to the l4s policy" in caplog.text
        caplog.clear()
        shutil.copy(shipped_model_path(), model)  # a good model copied over the bad one
        _reload(d)
    assert f"reload: marking.model: {model} loads now but did not at start" in caplog.text, caplog.text
    assert "restart to use the swiftqueue policy with it" in caplog.text and "running now: l4s" in caplog.text


# ------------------------------------------------------------------------------------------------ 2. outputs
def test_outputs_that_are_inputs_are_refused_and_the_inputs_kept(tmp_path, datasets, capsys):
    data = tmp_path / "victim.npz"
    shutil.copy(datasets[0], data)
    before = data.read_bytes()
    assert main(["predictor", "eval", "--data", str(data), "--json", str(tmp_path / "." / "victim.npz")]) == 2
    assert "--json" in capsys.readouterr().err
    assert data.read_bytes() == before

    trace = tmp_path / "vtrace.down"
    trace.write_text("1\n2\n3\n")
    assert main(["predictor", "collect", "--down-trace", str(trace), "--seconds", "1", "--out", str(trace)]) == 2
    err = capsys.readouterr().err
    assert f"--out {trace} is the trace file" in err and "virtual s" not in err  # refused before the run
    assert trace.read_text() == "1\n2\n3\n"

    index = tmp_path / "many" / "index.json"
    index.parent.mkdir()
    index.write_text("1\n2\n3\n")  # a trace file that happens to sit where collect-many writes its index
    assert main(["predictor", "collect-many", "--traces", str(index), "--seeds", "1", "--seconds", "1",
                 "--out-dir", str(index.parent)]) == 2
    assert "is the trace file" in capsys.readouterr().err and index.read_text() == "1\n2\n3\n"

    model = tmp_path / "m.onnx"
    shutil.copy(shipped_model_path(), model)
    assert main(["bench", "predictor", "--model", str(model), "--json", str(model), "--calls", "1"]) == 2
    assert f"--json {model} is the --model" in capsys.readouterr().err
    assert model.read_bytes() == shipped_model_path().read_bytes()


def test_export_refuses_to_write_over_its_checkpoint(tmp_path, trained, capsys):
    ck = tmp_path / "victim.pt"
    shutil.copy(trained / "transformer.pt", ck)
    before = ck.read_bytes()
    assert main(["predictor", "export", "--checkpoint", str(ck), "--out", str(ck)]) == 2
    assert f"--out {ck} is the --checkpoint" in capsys.readouterr().err
    assert ck.read_bytes() == before


def test_train_refuses_an_out_dir_whose_files_are_its_data(tmp_path, datasets, capsys):
    folder = tmp_path / "ck"
    folder.mkdir()
    data = folder / "train.json"  # a dataset under the name of the log train writes there
    shutil.copy(datasets[0], data)
    before = data.read_bytes()
    assert main(["predictor", "train", "--data", str(data), "--kinds", "ar", "--out-dir", str(folder)]) == 2
    assert "--out-dir" in capsys.readouterr().err and data.read_bytes() == before


# ------------------------------------------------------------------------------------------------ 3. --data
def test_a_data_file_given_twice_is_refused(tmp_path, datasets, capsys):
    a = str(datasets[0])
    link = tmp_path / "same.npz"
    link.symlink_to(datasets[0])
    assert main(["predictor", "eval", "--data", a, a]) == 2
    assert f"--data: {a} given twice" in capsys.readouterr().err
    assert main(["predictor", "eval", "--data", a, str(link)]) == 2
    assert f"{a} and {link} are the same file" in capsys.readouterr().err
    assert main(["predictor", "train", "--data", a, a, "--kinds", "ar", "--out-dir", str(tmp_path / "ck")]) == 2
    assert "given twice" in capsys.readouterr().err and not (tmp_path / "ck").exists()


def test_the_checkpoint_and_the_export_record_the_training_files_and_threads(trained, datasets):
    import hashlib

    import torch

    from tokenwire.predictor.runtime import load_forecaster

    recorded = [{"path": str(datasets[0]), "sha256": hashlib.sha256(datasets[0].read_bytes()).hexdigest()}]
    ck = torch.load(trained / "transformer.pt", weights_only=True)
    assert ck["train_config"]["data_files"] == recorded
    assert ck["train_config"]["threads"] == 2
    meta = load_forecaster(str(trained / "transformer.onnx")).meta
    assert meta["train_config"]["data_files"] == recorded and meta["train_config"]["threads"] == 2


def test_eval_warns_on_the_files_the_model_was_trained_on_and_only_those(tmp_path, trained, datasets, capsys):
    a, b = datasets
    copy = tmp_path / "renamed.npz"  # the same bytes under another name: still training data
    shutil.copy(a, copy)
    model = str(trained / "transformer.onnx")
    assert main(["predictor", "eval", "--data", str(copy), str(b), "--model", model]) == 0
    err = capsys.readouterr().err
    assert f"warning: {copy}: the transformer was trained and validated on this file" in err, err
    assert "evaluating on training data: MAE is optimistic" in err
    assert f"warning: {b}" not in err
    assert main(["predictor", "eval", "--data", str(b), "--model", model]) == 0
    assert "training data" not in capsys.readouterr().err


def test_eval_of_a_model_without_the_record_says_nothing_about_training_data(datasets, capsys):
    assert main(["predictor", "eval", "--data", str(datasets[0])]) == 0  # the shipped model: no data_files
    assert "training data" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ 4. progress
def test_training_without_a_terminal_prints_plain_progress_lines(datasets, monkeypatch):
    pytest.importorskip("torch")
    import io

    from tokenwire.predictor.train import TrainConfig, load_points, train_net

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # no terminal (a log file, systemd)
    train, val = load_points([str(datasets[0])], 64, 0.2, log=lambda _: None)
    lines: list[str] = []
    cfg = TrainConfig(kind="gru", epochs=1, batch=64, patience=1)
    train_net(cfg, train, val, log=lines.append, progress_every_s=0.0)  # every batch: no waiting on the clock
    steps = -(-len(train) // 64)
    progress = [line for line in lines if "batches, running loss" in line]
    assert progress[0].startswith(f"  epoch 1/1: 1/{steps} batches, running loss ") and progress[0].endswith(" s")
    assert len(progress) == steps
    assert "\r" not in sys.stderr.getvalue()  # nothing drawn for a terminal


def test_collect_reports_progress_by_time_not_by_probe_packets():
    from tokenwire.predictor.dataset import CollectConfig, collect

    cfg = CollectConfig(down_trace="6mbps", cross="reno", seconds=2.0, probe_pps=100.0)
    shares: list[float] = []
    data = collect(cfg, shares.append, progress_every_s=0.0)  # due at every probe packet (2000 were needed)
    assert len(shares) == len(data["sent_at"]) > 100
    assert shares == sorted(shares) and 0.0 <= shares[0] < shares[-1] < 1.0
    quiet = collect(cfg)  # the clock changes nothing in the run
    assert all(np.array_equal(data[c], quiet[c], equal_nan=True) for c in data if c != "meta")


def test_cross_flow_counts_are_bounded():
    assert crossspec.MAX_CROSS_FLOWS == 1000
    assert parse_cross_spec("reno*1000")[0].copies == 1000
    with pytest.raises(CrossSpecError, match=r"\*100000 is more than the 1000 cross flows"):
        parse_cross_spec("reno*100000")
    with pytest.raises(CrossSpecError, match="1200 flows in all, more than 1000"):
        parse_cross_spec("reno*600+scalable*600")


# ------------------------------------------------------------------------------------------------ 6. messages
def test_export_says_what_a_json_or_truncated_file_is(tmp_path, trained, capsys):
    ar = tmp_path / "ar.json"
    ar.write_text(json.dumps({"ridge": 1e-3, "coef": [[0.0]]}))
    other = tmp_path / "notes.json"
    other.write_text('{"a": 1}')
    cut = tmp_path / "cut.pt"
    cut.write_bytes((trained / "transformer.pt").read_bytes()[:5000])
    onnx_file = trained / "transformer.onnx"
    for path, says in ((ar, "a JSON file: the AR baseline's coefficients (ar.json), which need no export"),
                       (other, "a JSON file; train writes binary .pt files"),
                       (cut, "a truncated or damaged zip archive of 5,000 bytes"),
                       (onnx_file, "an ONNX model, what export writes: it is exported already")):
        assert main(["predictor", "export", "--checkpoint", str(path), "--out", str(tmp_path / "x.onnx")]) == 2
        err = capsys.readouterr().err
        assert says in err, err
        assert "Python objects" not in err and "Errno" not in err


def test_bench_predictor_makes_the_calls_its_help_says(capsys):
    from tokenwire.predictor.bench import batch_calls, measure

    with pytest.raises(SystemExit):
        main(["bench", "predictor", "--help"])
    assert "max(4 x calls / B, 50)" in " ".join(capsys.readouterr().out.split())  # (wherever the lines wrap)
    assert batch_calls(2000, 64) == 125 and batch_calls(2000, 8) == 1000 and batch_calls(10, 64) == 50

    class Instant:
        def observe(self, sample) -> None:
            pass

        def predict(self, now: float):
            return (1.0, 1.0)

        def predict_batch(self, nows):
            return None

    res = measure(Instant(), 2000, 1)
    assert {bs: b["calls"] for bs, b in res["batches"].items()} == {"1": 2000, "8": 1000, "64": 125}


def test_a_cross_key_given_twice_is_refused():
    with pytest.raises(CrossSpecError, match="rate= given more than once"):
        parse_cross_spec("cbr-c:rate=2mbps,rate=3mbps")
    with pytest.raises(CrossSpecError, match="on= given more than once"):
        parse_cross_spec("reno:on=1,off=1,ON=2")


@pytest.mark.parametrize("seeds", ["1,,2", "1,", ",1"])
def test_seeds_with_an_empty_item_are_refused(tmp_path, seeds, capsys):
    assert main(["predictor", "collect-many", "--traces", "6mbps", "--seeds", seeds, "--seconds", "1",
                 "--out-dir", str(tmp_path / "d")]) == 2
    assert f"--seeds: {seeds!r} has an empty item" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
