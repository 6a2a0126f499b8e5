"""``tokenwire predictor eval``: every model on the same prediction points, onnxruntime + numpy only.

The transformer and the GRU run from their ONNX files (what the daemon would run), the AR baseline from its
fitted coefficients (``ar.json``), last value and EWMA from the harness. Defaults are the shipped files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .baselines import AR_LAGS, LinearAR
from .harness import Points, Predictor, baseline_predictors, evaluate, file_points
from .runtime import (
    ModelError,
    OnnxLatencyForecaster,
    fixed_batch,
    inference_failure,
    load_forecaster,
    model_file,
    shipped_model_path,
    unfinished_run,
)


def onnx_predictor(fc: OnnxLatencyForecaster, chunk: int = 1024,
                   log: Callable[[str], None] | None = None) -> Callable[[Points], np.ndarray]:
    """The model's answers at every point, ``chunk`` windows per inference call (one when its batch axis is fixed:
    the load check's one-window trial passed, so fixed means 1); :class:`ModelError` when a call raises or answers
    another shape.

    The load checks run one window of zeros and one of steady acks, so a model that fails only on real windows
    loads: eval then ended in onnxruntime's or numpy's traceback with exit 1, where ``bench predictor`` and the
    daemon say what is wrong. A model whose batch axis is fixed (a ``torch.onnx.export`` without
    ``dynamic_axes``) was refused as well, though the daemon, one window at a time, runs a model fixed at 1:
    eval scores what the daemon would run, one call per window (slower), and ``log`` says so."""
    sess = fc._session
    fixed = fixed_batch(fc)
    step = fixed if fixed is not None and fixed > 0 else chunk
    if fixed is not None and log is not None:
        log(f"note: {fc.path}: its batch axis is fixed at {fixed}: scored {fixed} window{'s' if fixed != 1 else ''} "
            "per inference call (slower; `tokenwire predictor export` writes a dynamic one)")

    def call(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
        try:
            y = sess.run(None, {"x": x, "ref": ref})[0]
        except Exception as exc:  # onnxruntime's own untyped exceptions
            raise ModelError(inference_failure(fc, len(x), exc=exc)) from None
        if not isinstance(y, np.ndarray) or y.shape != (len(x), 2):
            raise ModelError(inference_failure(fc, len(x), answered=y))
        return y

    def run(p: Points) -> np.ndarray:
        outs = [call(p.x[i:i + step], p.base[i:i + step].astype(np.float32)) for i in range(0, len(p), step)]
        return np.concatenate(outs).astype(np.float64) if outs else np.zeros((0, 2))

    return run


def run_eval(data: list[str], model: str | None = None, baselines: str | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Score the transformer (``model``, default shipped) and the baselines on the datasets ``data``.

    ``baselines`` names a folder with ``gru.onnx`` and ``ar.json``; when given, both must be there (a
    folder named on purpose that silently lacks one gave a table without it). The shipped folder is the
    default, and a file missing there is skipped with a note.

    The document's ``provenance`` says which bytes were scored (each model file's path and sha256, the baselines
    folder) and with which code, as a ``testbed swiftqueue`` JSON does: a table of MAEs named a ``model`` path
    and nothing else, so a model exported again over that path, or another ``--baselines`` folder, read as
    the same results.
    """
    from tokenwire.daemon.run_provenance import RunProvenance, run_provenance

    started = RunProvenance()
    fc = load_forecaster(model)
    _check_kind(fc, "transformer", "--model takes the transformer; the gru is read from the --baselines folder")
    seen = _training_data_check(data, log)
    seen("transformer", fc)
    _warn_unfinished("transformer", fc, log)
    window = fc.window
    predictors = {"transformer": onnx_predictor(fc, log=log), **baseline_predictors()}
    files = {"transformer": model_file(fc)}
    if baselines is None:
        try:
            predictors.update(_baselines(shipped_model_path().parent, window, log, seen, files))
        except ModelError as exc:  # the shipped baselines are for the shipped window
            raise ModelError(f"{exc}; the shipped baselines do not fit this --model: give --baselines a folder "
                             f"with a gru.onnx and an ar.json trained with --window {window} "
                             "(`tokenwire predictor train --kinds gru,ar`, then export the gru)") from None
    else:
        predictors.update(_baselines(_checked_baselines(Path(baselines)), window, log, seen, files))
    pts = Points.concat([p for _, p in file_points(list(data), window, log)])
    doc = evaluate(pts, predictors)
    base_dir = shipped_model_path().parent if baselines is None else Path(baselines)
    sources = {"transformer": fc.path, "gru": str(base_dir / "gru.onnx"), "ar": str(base_dir / "ar.json")}
    _refuse_nonfinite(doc, sources)
    doc["data"] = list(data)
    doc["model"] = fc.path
    doc["window"] = window
    doc["provenance"] = {**run_provenance(started), "models": files, "baselines": str(base_dir)}
    return doc


def _warn_unfinished(name: str, fc: OnnxLatencyForecaster, log: Callable[[str], None]) -> None:
    """Warn when the model was exported from a training run that did not finish (``finished`` false in its metadata).

    ``export`` warns once, as it writes the file; ``eval`` then scored it, and a user picking the model to ship by
    that table had no word that its weights are those of an interrupted run (the best epoch before the stop)."""
    note = unfinished_run(fc)
    if note is not None:
        log(f"warning: {fc.path}: the {name} is {note}; scored anyway")


def _refuse_nonfinite(doc: dict, sources: dict[str, str]) -> None:
    """:class:`ModelError` when a model answered NaN or infinity on any point (``n_nonfinite`` of
    :func:`~.harness.evaluate`).

    Its MAE came out NaN, shown as "-" beside a full ``n``, with a ratio line that blamed EWMA and ``null``s in
    the JSON, and the command succeeded. The daemon does not run such a model either (its load check refuses it,
    falling back to ``l4s``), so a score of its finite answers alone would describe nothing that runs."""
    n = doc.get("points", 0)
    bad = [f"{sources.get(name, name)}: the {name} model answers NaN/inf on {m['n_nonfinite']} of {n} points"
           for name, m in doc["models"].items() if m.get("n_nonfinite")]
    if bad:
        raise ModelError(f"{'; '.join(bad)}; not scored (a forecaster must answer a finite latency at every point)")


def trained_on(fc: OnnxLatencyForecaster | dict) -> dict[str, str]:
    """sha256 -> path of the files the model was trained and validated on, as ``train`` records them in
    ``train_config.data_files`` (exported into the model's metadata; in ``ar.json``, ``fc`` being its document,
    at the top level); empty for a model from before that record, or with a record in another shape (nothing
    to compare: no warning, no error)."""
    files = _record(fc, "data_files")
    return {f["sha256"]: str(f.get("path", "")) for f in files
            if isinstance(f, dict) and isinstance(f.get("sha256"), str)}


def _record(model: OnnxLatencyForecaster | dict, key: str) -> list:
    """The list ``train`` recorded under ``key`` for a model: in an ONNX model's ``train_config`` metadata, or at
    the top of an ``ar.json`` document; empty when absent or not a list."""
    if isinstance(model, dict):
        found = model.get(key)
    else:
        tc = model.meta.get("train_config")
        found = tc.get(key) if isinstance(tc, dict) else None
    return found if isinstance(found, list) else []


def _same_run(run: dict, recorded: list) -> dict | None:
    """The first of the ``recorded`` training runs with ``run``'s trace and seed, else None."""
    for r in recorded:
        if isinstance(r, dict) and r.get("trace") == run["trace"] and r.get("seed") == run["seed"]:
            return r
    return None


def _training_data_check(data: list[str], log: Callable[[str], None]) -> Callable[[str, OnnxLatencyForecaster | dict],
                                                                                  None]:
    """A check, for each model loaded, that warns about the ``data`` files it was trained or validated on: its MAE
    there was scored on points it was fitted to, and read as held-out.

    A file is training data when it has a training file's sha256, or when it was collected from the same trace
    and seed as one (``data_runs``): a run of another ``--seconds`` has other bytes but the same first rows, so
    the overlap went unnoticed. Every kind is checked, the AR baseline through its ``ar.json`` record."""
    from .dataset import file_digest
    from .harness import dataset_run

    digests: dict[str, str] = {}
    runs: dict[str, dict] = {}
    for path in data:
        try:
            digests[path] = file_digest(path)
        except OSError:  # loading it says what is wrong
            pass
        run = dataset_run(path)
        if run is not None:
            runs[path] = run

    def check(name: str, model: OnnxLatencyForecaster | dict) -> None:
        trained = trained_on(model)
        recorded = _record(model, "data_runs")
        for path in data:
            if digests.get(path) in trained:
                log(f"warning: {path}: the {name} was trained and validated on this file (same sha256 as its "
                    f"training file {trained[digests[path]]}); evaluating on training data: MAE is optimistic")
                continue
            same = _same_run(runs[path], recorded) if path in runs else None
            if same is not None:
                mine, theirs = runs[path]["seconds"], same.get("seconds")
                how = (f"collected for {mine:g} s vs {theirs:g} s: the same probe send times over the same link, "
                       "many rows identical" if isinstance(theirs, int | float) and theirs != mine else
                       "other bytes: collected with other settings?")
                log(f"warning: {path}: the same trace ({same['trace']}) and seed ({same['seed']}) as the {name}'s "
                    f"training file {same.get('path', '?')} ({how}); not held-out data: MAE may be optimistic")

    return check


def _check_kind(fc: OnnxLatencyForecaster, kind: str, hint: str) -> None:
    """Refuse a model whose export metadata names another kind: it would be scored under a wrong label."""
    got = fc.meta.get("kind")
    if got is not None and got != kind:
        raise ModelError(f"{fc.path}: a {got} model where a {kind} is expected ({hint})")


def _checked_baselines(base_dir: Path) -> Path:
    """A folder the user named: it must exist and hold both baselines; the error says how to make each."""
    if not base_dir.is_dir():
        raise ModelError(f"{base_dir}: no such baselines folder (it should hold gru.onnx and ar.json)")
    missing = []
    gru_pt, gru_onnx = base_dir / "gru.pt", base_dir / "gru.onnx"
    export = f"`tokenwire predictor export --checkpoint {gru_pt} --out {gru_onnx}`"
    if not gru_onnx.exists():
        missing.append(f"no {gru_onnx}: make it with {export}" if gru_pt.exists() else
                       f"no {gru_onnx} (nor {gru_pt}): train it with `tokenwire predictor train --data ... "
                       f"--kinds gru --out-dir {base_dir}`, then {export}")
    if not (base_dir / "ar.json").exists():
        missing.append(f"no {base_dir / 'ar.json'}: fit it with `tokenwire predictor train --data ... --kinds ar "
                       f"--out-dir {base_dir}`")
    if missing:
        raise ModelError("; ".join(missing))
    return base_dir


def _baselines(base_dir: Path, window: int, log: Callable[[str], None],
               seen: Callable[[str, OnnxLatencyForecaster | dict], None] | None = None,
               files: dict[str, dict[str, str]] | None = None) -> dict[str, Predictor]:
    """The AR and GRU predictors from ``base_dir``; one whose file is missing is skipped with a note. ``files``
    gets the path and sha256 of each one loaded (for ``eval``'s provenance)."""
    from .dataset import file_digest

    out: dict[str, Predictor] = {}
    ar_path = base_dir / "ar.json"
    if ar_path.exists():
        try:
            ar_doc = json.loads(ar_path.read_text())
            ar = LinearAR.from_dict(ar_doc)
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{ar_path}: unusable AR coefficients ({exc})") from None
        if ar.lags != min(AR_LAGS, window):
            raise ModelError(f"{ar_path}: AR coefficients for {ar.lags} acks; a window of {window} needs "
                             f"{min(AR_LAGS, window)}")
        if seen is not None:
            seen("ar", ar_doc)
        why = stale_ar(base_dir, ar_doc)
        if why:
            log(f"warning: {why}")
        out["ar"] = lambda p: ar.predict(p.x, p.base)
        if files is not None:
            files["ar"] = {"path": str(ar_path), "sha256": file_digest(ar_path)}
    else:
        log(f"no {ar_path}: skipping ar")
    gru_path = base_dir / "gru.onnx"
    if gru_path.exists():
        gru = load_forecaster(str(gru_path))
        _check_kind(gru, "gru", "the baselines folder's gru.onnx is scored as the gru")
        if gru.window != window:
            raise ModelError(f"{gru_path}: window {gru.window} differs from the transformer's {window}")
        if seen is not None:
            seen("gru", gru)
        _warn_unfinished("gru", gru, log)
        why = stale_gru(base_dir, gru.meta)
        if why:
            log(f"warning: {why}")
        out["gru"] = onnx_predictor(gru, log=log)
        if files is not None:
            files["gru"] = model_file(gru)
    else:
        log(f"no {gru_path}: skipping gru")
    return out


def _json_same(value: object) -> object:
    """``value`` as it reads back from JSON (tuples become lists), to compare a checkpoint's record with the
    copy export wrote into the model's metadata."""
    return json.loads(json.dumps(value, default=str))


def _newer(a: Path, b: Path) -> bool:
    """Whether file ``a`` was modified after file ``b`` (False when either cannot be read)."""
    try:
        return a.stat().st_mtime_ns > b.stat().st_mtime_ns
    except OSError:
        return False


def _read_train_log(base_dir: Path) -> dict | None:
    """The folder's ``train.json`` (the log of the last ``train`` run into it), None when absent or unreadable."""
    try:
        doc = json.loads((base_dir / "train.json").read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _checkpoint_record(path: Path) -> dict | None:
    """The training record (best_epoch, epochs run, train_config) of the checkpoint at ``path``, as export
    stamps it; None without torch (nothing to compare with); :class:`ModelError` when it is no checkpoint
    (:func:`~.train.read_checkpoint`, export's reader)."""
    from .train import checkpoint_best_epoch, read_checkpoint

    try:
        ck = read_checkpoint(path)
    except ImportError:  # no torch (eval runs on onnxruntime alone): nothing to compare with
        return None
    history = ck.get("history")
    return {"best_epoch": checkpoint_best_epoch(ck),
            "epochs_run": len(history) if isinstance(history, list) else None,
            "train_config": _json_same(ck.get("train_config"))}


def _differences(exported: dict, trained: dict) -> list[str]:
    """What differs between a model's export metadata and the training record of ``trained`` (fields that
    either side lacks are not compared)."""
    out = []
    be, n = exported.get("best_epoch"), exported.get("epochs_run")
    tbe, tn = trained.get("best_epoch"), trained.get("epochs_run")
    if (None not in (be, tbe) and be != tbe) or (None not in (n, tn) and n != tn):
        out.append(f"best epoch {be} of {n} run in the export, {tbe} of {tn} there")
    tc, ttc = exported.get("train_config"), trained.get("train_config")
    if isinstance(tc, dict) and isinstance(ttc, dict) and tc != ttc:
        keys = sorted(k for k in tc.keys() | ttc.keys() if tc.get(k) != ttc.get(k))
        out.append(f"other training settings ({', '.join(keys)})")
    return out


def stale_gru(base_dir: Path, meta: dict) -> str | None:
    """Why the folder's ``gru.onnx`` (export metadata ``meta``) is not the gru its ``gru.pt`` or ``train.json``
    describe, None when it is (or nothing says otherwise).

    ``train`` moves an earlier ``gru.pt`` aside but leaves the earlier ``gru.onnx`` (with a warning that scrolls
    by), so after a retraining eval scored the old export under the folder's name, next to a newer checkpoint
    and log of another model. Compared: the best epoch, the epochs run and the training settings export stamps.
    A ``gru.pt`` that is no checkpoint (truncated, foreign) is said to be one, as export would say it, when
    ``train.json`` shows no difference either: it was skipped without a word, as if it matched.
    """
    gru_onnx, gru_pt = base_dir / "gru.onnx", base_dir / "gru.pt"
    exported = {"best_epoch": meta.get("best_epoch"), "epochs_run": meta.get("epochs_run"),
                "train_config": meta.get("train_config")}
    redo = f"export it again: `tokenwire predictor export --checkpoint {gru_pt} --out {gru_onnx}`"
    unread = None
    if gru_pt.is_file():
        try:
            ck = _checkpoint_record(gru_pt)
        except ModelError as exc:  # a broken gru.pt is no reason to stop eval: train.json may still tell
            ck, unread = None, f"{exc}; {gru_onnx} was not compared with it"
        diffs = _differences(exported, ck) if ck is not None else []
        if diffs:
            when = f"; {gru_pt.name} is newer" if _newer(gru_pt, gru_onnx) else ""
            return (f"{gru_onnx} is not an export of {gru_pt} ({'; '.join(diffs)}{when}): it comes from another "
                    f"training run, and is what is scored as the gru here; {redo}")
    log = _read_train_log(base_dir)
    model = log.get("models", {}).get("gru") if log is not None and isinstance(log.get("models"), dict) else None
    if isinstance(model, dict):
        history = model.get("history")
        trained = {"best_epoch": model.get("best_epoch"),
                   "epochs_run": len(history) if isinstance(history, list) else None}
        diffs = _differences(exported, trained)
        if diffs:
            train_json = base_dir / "train.json"
            return (f"{gru_onnx} is not an export of the gru that {train_json} logs ({'; '.join(diffs)}): it comes "
                    f"from another training run, and is what is scored as the gru here; {redo}")
    return unread


def stale_ar(base_dir: Path, ar_doc: dict) -> str | None:
    """Why the folder's ``ar.json`` (``ar_doc``) is from an earlier training than its ``train.json``, None when
    it is not (or nothing says so).

    A ``train`` run without ``ar`` in ``--kinds`` leaves an earlier ``ar.json`` in place beside its new log, and
    eval scored that AR (fitted on what data?) as the folder's. Not a warning when the AR records the same
    training files as the log: by content (sha256) where the log records it, else by path (logs of before); the
    paths alone missed data re-collected in place and flagged ``./a.npz`` against ``a.npz``."""
    ar_json, train_json = base_dir / "ar.json", base_dir / "train.json"
    log = _read_train_log(base_dir)
    if log is None or not isinstance(log.get("kinds"), list) or "ar" in log["kinds"]:
        return None
    if not _newer(train_json, ar_json):
        return None
    files = [f for f in ar_doc.get("data_files") or [] if isinstance(f, dict)]
    fitted_on = [f.get("path") for f in files]
    logged = [f for f in log.get("data_files") or [] if isinstance(f, dict)]
    if logged:
        if files and sorted(str(f.get("sha256")) for f in files) == sorted(str(f.get("sha256")) for f in logged):
            return None
    elif fitted_on and fitted_on == log.get("data"):
        return None
    data = f"on {', '.join(map(str, fitted_on))}" if fitted_on else "on data it does not record"
    kinds = ",".join(map(str, log["kinds"]))
    return (f"{ar_json} is older than {train_json}, whose run (--kinds {kinds}) fitted no ar: it comes from an "
            f"earlier training ({data}), and is what is scored as the ar here; refit it on this run's data with "
            f"`tokenwire predictor train --data ... --kinds ar --out-dir {base_dir}`")
