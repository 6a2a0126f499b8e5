"""``tokenwire predictor eval``: every model on the same prediction points, onnxruntime + numpy only.

The transformer and the GRU run from their ONNX files (what the daemon would run), the AR baseline from its
fitted coefficients (``ar.json``), last value and EWMA from the harness. Defaults are the shipped files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .baselines import LinearAR
from .dataset import load
from .harness import Points, baseline_predictors, evaluate, points
from .runtime import ModelError, OnnxLatencyForecaster, load_forecaster, shipped_model_path


def onnx_predictor(fc: OnnxLatencyForecaster, chunk: int = 1024) -> Callable[[Points], np.ndarray]:
    sess = fc._session

    def run(p: Points) -> np.ndarray:
        outs = [sess.run(None, {"x": p.x[i:i + chunk], "ref": p.base[i:i + chunk].astype(np.float32)})[0]
                for i in range(0, len(p), chunk)]
        return np.concatenate(outs).astype(np.float64) if outs else np.zeros((0, 2))

    return run


def run_eval(data: list[str], model: str | None = None, baselines: str | None = None,
             log: Callable[[str], None] = print) -> dict:
    fc = load_forecaster(model)
    window = fc.window
    base_dir = Path(baselines) if baselines else shipped_model_path().parent
    predictors = {"transformer": onnx_predictor(fc), **baseline_predictors()}
    ar_path = base_dir / "ar.json"
    if ar_path.exists():
        try:
            ar = LinearAR.from_dict(json.loads(ar_path.read_text()))
            predictors["ar"] = lambda p: ar.predict(p.x, p.base)
        except (ValueError, KeyError) as exc:
            raise ModelError(f"{ar_path}: unusable AR coefficients ({exc})") from None
    else:
        log(f"no {ar_path}: skipping ar")
    gru_path = base_dir / "gru.onnx"
    if gru_path.exists():
        gru = load_forecaster(str(gru_path))
        if gru.window != window:
            raise ModelError(f"{gru_path}: window {gru.window} differs from the transformer's {window}")
        predictors["gru"] = onnx_predictor(gru)
    else:
        log(f"no {gru_path}: skipping gru")
    parts = []
    for path in data:
        pts = points(load(path), window)
        log(f"  {path}: {len(pts)} prediction points")
        parts.append(pts)
    pts = Points.concat(parts)
    doc = evaluate(pts, predictors)
    doc["data"] = list(data)
    doc["model"] = fc.path
    doc["window"] = window
    return doc
