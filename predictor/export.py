"""ONNX export of a trained forecaster, validated against torch (``tokenwire predictor export``).

The graph takes ``x`` ``(batch, W, F)`` float32 and ``ref`` ``(batch, 3)`` float32 and returns
``latency_ms`` ``(batch, 2)``; the batch axis is dynamic. A JSON blob in the model's metadata (key
``tokenwire``) names the format, the feature list, the window and the training provenance, so the runtime can
refuse a model built for other inputs. After writing, the file is run with onnxruntime on random and
(optionally) real windows at batch sizes 1, 8 and 64 and compared with the torch outputs.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from .features import FEATURES, FEATURES_VERSION, N_FEATURES
from .onnx_session import ModelError, open_session, read_model
from .runtime import MODEL_FORMAT

OPSET = 17


def export_onnx(model: object, path: str | Path, extra_meta: dict | None = None,
                check_x: np.ndarray | None = None, check_ref: np.ndarray | None = None) -> dict:
    """Write ``model`` to ``path`` as ONNX and validate it; returns the validation report."""
    import onnx
    import torch

    window = model.config["window"]  # type: ignore[attr-defined]
    x = torch.zeros(2, window, N_FEATURES)
    b = torch.zeros(2, 3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x, b), str(path), input_names=["x", "ref"], output_names=["latency_ms"],
                          dynamic_axes={"x": {0: "batch"}, "ref": {0: "batch"}, "latency_ms": {0: "batch"}},
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    proto = onnx.load(str(path))
    meta = {"format": MODEL_FORMAT, "kind": model.kind, "features": list(FEATURES),
            "features_version": FEATURES_VERSION, "window": window,  # type: ignore[attr-defined]
            "config": model.config, **(extra_meta or {})}  # type: ignore[attr-defined]
    entry = proto.metadata_props.add()
    entry.key = "tokenwire"
    entry.value = json.dumps(meta)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return validate(model, path, check_x, check_ref)


def validate(model: object, path: str | Path, check_x: np.ndarray | None = None,
             check_ref: np.ndarray | None = None, atol_ms: float = 0.05) -> dict:
    """Max |onnxruntime - torch| (ms) at batch 1, 8 and 64; raises :class:`ModelError` beyond ``atol_ms``."""
    import torch

    sess = open_session(read_model(Path(path)), str(path))
    window = model.config["window"]  # type: ignore[attr-defined]
    rng = np.random.default_rng(0)
    worst = 0.0
    report = {}
    for bs in (1, 8, 64):
        if check_x is not None and check_ref is not None and len(check_x) >= bs:
            xb, bb = check_x[:bs].astype(np.float32), check_ref[:bs].astype(np.float32)
        else:
            xb = rng.normal(size=(bs, window, N_FEATURES)).astype(np.float32)
            bb = rng.uniform(10, 200, size=(bs, 3)).astype(np.float32)
        got = sess.run(None, {"x": xb, "ref": bb})[0]
        with torch.no_grad():
            want = model(torch.from_numpy(xb), torch.from_numpy(bb)).numpy()  # type: ignore[operator]
        diff = float(np.max(np.abs(got - want)))
        report[f"batch_{bs}_max_abs_diff_ms"] = diff
        worst = max(worst, diff)
    if worst > atol_ms:
        raise ModelError(f"{path}: onnxruntime and torch disagree by {worst:.4f} ms (> {atol_ms})")
    report["ok"] = True
    return report
