"""ONNX export of a trained forecaster, validated against torch (``tokenwire predictor export``).

The graph takes ``x`` ``(batch, W, F)`` float32 and ``ref`` ``(batch, 3)`` float32 and returns
``latency_ms`` ``(batch, 2)``; the batch axis is dynamic. A JSON blob in the model's metadata (key
``tokenwire``) names the format, the feature list, the window and the training provenance, so the runtime can
refuse a model built for other inputs. The file is written to a temporary file
(:func:`tokenwire.daemon.cli.output_file`: next to the destination), run with onnxruntime on random and
(optionally) real windows at batch sizes 1, 8 and 64 and compared with the torch outputs, and only then put
in place: a model that fails validation is never left where a daemon or ``eval`` would load it. In place
means as for every output: a regular file is replaced atomically and keeps its permissions, a symlink's
target is replaced, a device or FIFO (or ``-``, stdout) is written through.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import cast

import numpy as np

from .features import FEATURES, FEATURES_VERSION, N_FEATURES
from .onnx_session import ModelError, open_session, read_model
from .runtime import MODEL_FORMAT

OPSET = 17


def export_onnx(model: object, path: str | Path, extra_meta: dict | None = None,
                check_x: np.ndarray | None = None, check_ref: np.ndarray | None = None) -> dict:
    """Write ``model`` to ``path`` as ONNX once it has been validated; returns the validation report.

    :class:`ModelError` (and nothing written at ``path``) when onnxruntime and torch disagree or either
    answers a non-finite value.
    """
    import onnx
    import torch

    from tokenwire.daemon.cli import output_file

    window = model.config["window"]  # type: ignore[attr-defined]
    x = torch.zeros(2, window, N_FEATURES)
    b = torch.zeros(2, 3)
    with output_file(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(cast(torch.nn.Module, model), (x, b), str(tmp), input_names=["x", "ref"],
                              output_names=["latency_ms"],
                              dynamic_axes={"x": {0: "batch"}, "ref": {0: "batch"}, "latency_ms": {0: "batch"}},
                              opset_version=OPSET, dynamo=False, do_constant_folding=True)
        proto = onnx.load(str(tmp))
        meta = {"format": MODEL_FORMAT, "kind": model.kind, "features": list(FEATURES),  # type: ignore[attr-defined]
                "features_version": FEATURES_VERSION, "window": window,
                "config": model.config, **(extra_meta or {})}  # type: ignore[attr-defined]
        entry = proto.metadata_props.add()
        entry.key = "tokenwire"
        entry.value = json.dumps(meta)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        report = validate(model, tmp, check_x, check_ref, label=str(path))
    return report


def validate(model: object, path: str | Path, check_x: np.ndarray | None = None,
             check_ref: np.ndarray | None = None, atol_ms: float = 0.05, label: str | None = None) -> dict:
    """Max |onnxruntime - torch| (ms) at batch 1, 8 and 64; :class:`ModelError` beyond ``atol_ms`` or when
    either answers NaN or infinity (``max`` would skip a NaN difference and call such a model valid)."""
    import torch

    label = label or str(path)
    sess = open_session(read_model(Path(path)), label)
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
        for who, out in (("onnxruntime", got), ("torch", want)):
            if not np.all(np.isfinite(out)):
                raise ModelError(f"{label}: {who} answers non-finite latencies (NaN or infinity) at batch {bs}: "
                                 "the weights are broken (did training diverge?)")
        diff = float(np.max(np.abs(got - want)))
        if not math.isfinite(diff):
            raise ModelError(f"{label}: onnxruntime and torch differ by {diff} at batch {bs}")
        report[f"batch_{bs}_max_abs_diff_ms"] = diff
        worst = max(worst, diff)
    if worst > atol_ms:
        raise ModelError(f"{label}: onnxruntime and torch disagree by {worst:.4f} ms (> {atol_ms})")
    report["ok"] = True
    return report
