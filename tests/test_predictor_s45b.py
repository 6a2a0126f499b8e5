"""Session 45, predictor follow-ups:

1. ``predictor eval --json`` named the transformer's path and nothing else: no sha256 of the models scored, nor
   the ``--baselines`` folder; ``bench predictor --json`` no sha256 of its model (a ``testbed swiftqueue`` JSON
   records both). A model exported again over the same path read as the same results.
2. The README's pipeline trained with the defaults (30 epochs, patience 5, 200 000 points), not the shipped
   models' settings of the model card (6, 2, 60 000): another model, and a much longer run, without a word.
3. docs: the ``last`` baseline is the last latency per queue within the window (the other queue's when one is
   absent from it), not "the last latency seen in each queue".
4. A model exported from an interrupted training run (``finished`` false): ``export`` and ``eval`` warn, but
   ``config check`` and the daemon's start said nothing while the daemon marked with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

from tokenwire.daemon.cli import main
from tokenwire.predictor.features import FEATURES, FEATURES_VERSION
from tokenwire.predictor.runtime import shipped_model_path

from .test_predictor_runtime import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _meta(finished: bool, kind: str = "transformer") -> dict:
    return {"format": "tokenwire-swiftqueue", "kind": kind, "features": list(FEATURES),
            "features_version": FEATURES_VERSION, "window": 64, "best_epoch": 2, "epochs_run": 3,
            "finished": finished}


# ------------------------------------------------------------------------------------------------ 1. provenance
def test_eval_json_records_each_model_files_sha256_and_the_baselines_folder(small, tmp_path):
    pytest.importorskip("onnxruntime")
    shipped = shipped_model_path().parent
    if not (shipped / "gru.onnx").exists() or not (shipped / "ar.json").exists():
        pytest.skip("no shipped baselines in this checkout")
    out = tmp_path / "eval.json"
    assert main(["predictor", "eval", "--data", str(small), "--json", str(out)]) == 0
    prov = json.loads(out.read_text())["provenance"]
    assert prov["baselines"] == str(shipped)
    assert prov["models"] == {name: {"path": str(shipped / file), "sha256": _sha256(shipped / file)}
                              for name, file in (("transformer", "swiftqueue.onnx"), ("gru", "gru.onnx"),
                                                 ("ar", "ar.json"))}
    assert {"git_commit", "tokenwire_version", "load_average", "libraries"} <= set(prov)  # run_provenance's block

    base = tmp_path / "base"  # another --baselines folder, another transformer over the same path
    base.mkdir()
    shutil.copy(shipped / "gru.onnx", base / "gru.onnx")
    shutil.copy(shipped / "ar.json", base / "ar.json")
    model = tmp_path / "m.onnx"
    tiny_model(model)
    assert main(["predictor", "eval", "--data", str(small), "--model", str(model), "--baselines", str(base),
                 "--json", str(out)]) == 0
    prov = json.loads(out.read_text())["provenance"]
    assert prov["baselines"] == str(base)
    assert prov["models"]["transformer"] == {"path": str(model), "sha256": _sha256(model)}
    assert prov["models"]["gru"] == {"path": str(base / "gru.onnx"), "sha256": _sha256(base / "gru.onnx")}
    assert prov["models"]["ar"]["path"] == str(base / "ar.json")
    first = prov["models"]["transformer"]["sha256"]
    tiny_model(model, meta=_meta(True))  # exported again over the same path: other bytes
    assert main(["predictor", "eval", "--data", str(small), "--model", str(model), "--baselines", str(base),
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["provenance"]["models"]["transformer"]["sha256"] not in (first, None)


def test_bench_predictor_json_records_its_models_sha256(tmp_path):
    pytest.importorskip("onnxruntime")
    model = tiny_model(tmp_path / "m.onnx")
    out = tmp_path / "p.json"
    assert main(["bench", "predictor", "--model", str(model), "--calls", "3", "--repeats", "1",
                 "--json", str(out)]) == 0
    prov = json.loads(out.read_text())["provenance"]
    assert prov["model"] == {"path": str(model), "sha256": _sha256(model)}  # as testbed swiftqueue's JSON has it
    assert "git_commit" in prov


def test_the_documented_eval_and_bench_schemas_name_the_new_keys():
    text = " ".join((ROOT / "docs" / "swiftqueue.md").read_text().split())
    assert '"provenance": {..., "models": {"transformer"|"gru"|"ar": {"path", "sha256"}}, "baselines":' in text
    assert '`provenance` (with `"model": {"path", "sha256"}` of the model timed' in text


# ------------------------------------------------------------------------------------------------ 2. README
def _train_flags(command: str) -> dict[str, str]:
    words = shlex.split(command.replace("\\\n", " "), comments=True)
    return {w: words[i + 1] for i, w in enumerate(words) if w in ("--epochs", "--patience", "--max-points", "--seed")}


def test_the_readme_pipeline_trains_with_the_model_cards_settings_and_says_how_long():
    readme = (ROOT / "README.md").read_text()
    card = (ROOT / "predictor" / "shipped" / "model_card.md").read_text()
    pattern = r"tokenwire predictor train (?:[^\n]*\\\n)*[^\n]*"
    ours, theirs = re.search(pattern, readme).group(0), re.search(pattern, card).group(0)
    assert _train_flags(ours) == _train_flags(theirs) == {"--epochs": "6", "--patience": "2",
                                                          "--max-points": "60000", "--seed": "1"}
    prose = " ".join(readme.split())
    assert "The `train` line is the shipped models' recipe" in prose and "about 5 minutes for the transformer" in prose
    assert "`train` runs its defaults (30, 5, 200000)" in prose


# ------------------------------------------------------------------------------------------------ 3. last
def test_last_is_the_windows_last_per_queue_and_the_docs_say_so():
    """Behaviour kept (the shipped figures rest on it); the docs said "last latency seen in each queue"."""
    from tokenwire.predictor.features import R_LAT, R_QL, queue_bases

    raw = np.zeros((4, 6))
    raw[:, R_LAT] = [10.0, 20.0, 30.0, 40.0]
    raw[:, R_QL] = [1, 1, 1, 1]  # no C ack in the window: C borrows L's last, whatever older C acks said
    assert queue_bases(raw).tolist() == [40.0, 40.0]
    raw[:, R_QL] = [1, 0, 1, 0]
    assert queue_bases(raw).tolist() == [30.0, 40.0]
    row = next(line for line in (ROOT / "docs" / "swiftqueue.md").read_text().splitlines()
               if line.startswith("| `last` |"))
    assert "last latency in each queue within the model's window" in row
    assert "a queue absent from the window borrows the other queue's" in row


# ------------------------------------------------------------------------------------------------ 4. unfinished
def test_config_check_warns_of_a_model_from_an_unfinished_training_run(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    cut = tiny_model(tmp_path / "cut.onnx", meta=_meta(False))
    done = tiny_model(tmp_path / "done.onnx", meta=_meta(True))
    for model in (cut, done):
        (tmp_path / f"{model.stem}.toml").write_text(f'[marking]\npolicy = "swiftqueue"\nmodel = "{model}"\n')
    assert main(["config", "check", str(tmp_path / "cut.toml")]) == 0  # a valid configuration: the daemon runs it
    out, err = capsys.readouterr()
    assert err.strip() == (f"warning: marking.model: {cut} is from a training run that did not finish (interrupted, "
                           "or still running when exported): best epoch 2 of 3 run; the daemon would mark with it "
                           "anyway")
    assert f"marking: swiftqueue ({cut}, window 64, UNFINISHED;" in out
    assert main(["config", "check", str(tmp_path / "done.toml")]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "UNFINISHED" not in out


def _started_daemon(tmp_path: Path, model: Path):
    from tokenwire.daemon import service

    from .test_marking_fixes2 import _Notes

    path = tmp_path / "tokenwire.toml"
    path.write_text(f'[marking]\npolicy = "swiftqueue"\nmodel = "{model}"\n')
    d = service.Daemon(service.load_config(path), notifier=_Notes())  # type: ignore[arg-type]
    d.marking.start()  # what the daemon's start does with [marking]
    return d


def test_the_daemon_warns_at_start_and_reload_of_a_model_from_an_unfinished_run(tmp_path, caplog):
    pytest.importorskip("onnxruntime")
    from .test_predictor_fixes2 import _reload

    model = tiny_model(tmp_path / "live.onnx", meta=_meta(False))
    with caplog.at_level(logging.INFO, logger="tokenwire.daemon"):
        d = _started_daemon(tmp_path, model)
    assert d.marking.effective_policy == "swiftqueue"  # used, as export and eval use it
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.name for r in warnings] == ["tokenwire.daemon.marking"], caplog.text
    assert warnings[0].getMessage() == (
        f"marking.policy = swiftqueue but the latency model {model} is from a training run that did not finish "
        "(interrupted, or still running when exported): best epoch 2 of 3 run; marking with it anyway")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tokenwire.daemon"):
        _reload(d)  # the same bytes: start said it
        assert "did not finish" not in caplog.text
        tiny_model(model, meta={**_meta(False), "best_epoch": 1})  # another unfinished export over it
        _reload(d)
    assert f"reload: marking.model: {model} changed since start" in caplog.text, caplog.text
    assert ("restart to use this one; it is from a training run that did not finish (interrupted, or still running "
            "when exported): best epoch 1 of 3 run (running now: swiftqueue)") in caplog.text

    caplog.clear()
    finished = tiny_model(tmp_path / "done.onnx", meta=_meta(True))
    with caplog.at_level(logging.WARNING, logger="tokenwire.daemon"):
        _started_daemon(tmp_path, finished)
    assert caplog.text == ""
