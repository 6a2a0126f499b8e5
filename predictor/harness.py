"""One evaluation harness for every forecaster: prediction points, targets, spike masks and metrics.

A *prediction point* is a probe packet send of a dataset at which the sender had at least ``window + 1``
acks; the forecaster sees the acks received by then and predicts the latency of that packet in each queue
(the dataset's shadow ground truth). Errors are pooled over both queues (``n`` counts (packet, queue)
targets; a target whose shadow was dropped is left out).

Spike (DESIGN.md, Metrics): the target of a queue changes from the previous probe packet's by more than
20 ms *and* more than 20 %; ``spike_mae_ms`` is the MAE over those targets only.

Next to the forecasters, :func:`evaluate` scores three *references* that are not forecasters. Each answers
with true latencies (shadows) a sender does not have, and together they put numbers on what "X % below
EWMA" can reasonably mean on a given dataset (yardsticks, not strict bounds):

* ``newest_acked``: the true latency in each queue at the send of the newest packet the sender has an ack
  for. A perfect last-value with the sender's own freshness (its newest sample is a round trip old), for
  both queues at once (a sender only samples the queue each packet used).
* ``clairvoyant_prev``: the true latency at the previous probe send, information a sender gets a round
  trip later if at all. What is left is change between two consecutive packets.
* ``interpolated``: the mean of the previous and the *next* probe send's truth. It looks into the future;
  what is left is change that not even the neighbouring packets' latencies explain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .baselines import per_queue_ewma
from .dataset import DatasetError, ack_log, load
from .features import N_FEATURES, build_windows

SPIKE_ABS_MS = 20.0
SPIKE_REL = 0.20


@dataclass
class Points:
    """Everything the models and the metrics need at the prediction points of one or more datasets."""

    x: np.ndarray  # (K, W, F) float32
    base: np.ndarray  # (K, 3) ms: last latency per queue, window scale (the models' reference input)
    ewma: np.ndarray  # (K, 2) ms, SRTT per queue over the whole history
    target: np.ndarray  # (K, 2) ms, NaN = unknown
    spike: np.ndarray  # (K, 2) bool
    sent_at: np.ndarray  # (K,)
    prev_target: np.ndarray  # (K, 2) ms: the previous probe send's targets (references), NaN = unknown
    next_target: np.ndarray  # (K, 2) ms: the next probe send's targets (references), NaN = unknown
    newest_target: np.ndarray  # (K, 2) ms: the targets at the send of the newest acked packet (references)

    def __len__(self) -> int:
        return self.x.shape[0]

    @staticmethod
    def concat(parts: list[Points]) -> Points:
        return Points(*(np.concatenate([getattr(p, f) for p in parts]) for f in Points.__dataclass_fields__))

    def take(self, idx: np.ndarray) -> Points:
        return Points(*(getattr(self, f)[idx] for f in Points.__dataclass_fields__))


def spike_mask(series: np.ndarray) -> np.ndarray:
    """True where a target jumps from the previous one by > 20 ms and > 20 % (NaN neighbours: False)."""
    prev = np.concatenate([[np.nan], series[:-1]])
    d = np.abs(series - prev)
    with np.errstate(invalid="ignore"):
        return (d > SPIKE_ABS_MS) & (d > SPIKE_REL * prev)


def points(data: dict, window: int) -> Points:
    """Prediction points of one dataset (see module docstring)."""
    acks = ack_log(data)
    n_acked = data["n_acked"].astype(np.int64)
    sel = np.flatnonzero(n_acked >= window + 1)
    target_all = np.stack([data["target_l_ms"], data["target_c_ms"]], axis=1)
    spike_all = np.stack([spike_mask(data["target_l_ms"]), spike_mask(data["target_c_ms"])], axis=1)
    if sel.size == 0:
        empty = np.zeros((0, 2))
        return Points(np.zeros((0, window, N_FEATURES), np.float32), np.zeros((0, 3)), empty, empty,
                      empty.astype(bool), np.zeros(0), empty, empty, empty)
    x, base = build_windows(acks, data["sent_at"][sel], n_acked[sel], window)
    ewma = per_queue_ewma(acks, 0.125)[n_acked[sel]]
    gap = np.full((1, 2), np.nan)
    prev = np.concatenate([gap, target_all[:-1]])
    nxt = np.concatenate([target_all[1:], gap])
    delivered = ~np.isnan(data["ack_at"])  # the sends behind the ack log's rows, in its (stable) order
    acked_seq = np.flatnonzero(delivered)[np.argsort(data["ack_at"][delivered], kind="stable")]
    newest = target_all[acked_seq[n_acked[sel] - 1]]
    return Points(x, base, ewma, target_all[sel], spike_all[sel], data["sent_at"][sel], prev[sel], nxt[sel],
                  newest)


def file_points(paths: list[str], window: int, log: Callable[[str], None] = print) -> list[tuple[str, Points]]:
    """Prediction points of each dataset file, leaving out (with a warning) files that have none.

    A file has none when its sender never held more than ``window`` acks at a send (a short run or a slow
    link); pooled with others it would only be skipped, but alone it used to surface as a numpy reshape
    error in the AR baseline or an empty optimizer schedule. :class:`DatasetError` when no file has any.
    """
    kept, empty = [], []
    for i, path in enumerate(paths, 1):
        data = load(path)
        pts = points(data, window)
        # the tables' n counts targets (each point has one per queue, L and C; unknown ones left out), not points
        known = int(np.count_nonzero(~np.isnan(pts.target)))
        log(f"  [{i}/{len(paths)}] {path}: {len(pts)} prediction points ({known} known targets over the L and C "
            "queues)")
        if len(pts):
            kept.append((path, pts))
        else:
            empty.append(f"{path} (at most {int(np.max(data['n_acked'], initial=0))} acks at a send)")
    why = (f"a prediction point needs more than {window} acks (the window) at a send: collect longer runs "
           "(--seconds) or more probe packets (--probe-pps)")
    if not kept:
        raise DatasetError(f"no prediction points in {', '.join(empty)}; {why}")
    if empty:
        log(f"warning: skipping {', '.join(empty)}: no prediction points; {why}")
    return kept


def dataset_run(path: str) -> dict | None:
    """The run a dataset file was collected from: ``{"path", "trace", "seed", "seconds"}`` from its meta; None
    when the file or its meta cannot be read as a dataset's (callers only compare runs, they never need one).

    Two collections of one trace and seed that differ in ``--seconds`` have different bytes (sha256) but the
    same first rows; ``eval`` compares runs to warn about that overlap with a model's training files."""
    import json

    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:  # the meta member alone
            meta = json.loads(str(z["meta"]))
        cfg = meta["config"]
        trace, seed, seconds = meta["trace_name"], cfg["seed"], cfg["seconds"]
    except Exception:  # anything unreadable: loading the file says what is wrong, here there is nothing to compare
        return None
    if not (isinstance(trace, str) and isinstance(seed, int) and isinstance(seconds, int | float)):
        return None
    return {"path": str(path), "trace": trace, "seed": seed, "seconds": seconds}


def metrics(pred: np.ndarray, target: np.ndarray, spike: np.ndarray) -> dict[str, float | int]:
    """MAE, RMSE, spike MAE, mean signed error, median absolute error (ms) and n over the known targets.

    Both queues pooled. The mean signed error says whether a model is biased (a held-out link slower than
    any training link shows up there first); the median, how much of the MAE is a few large misses.
    """
    ok = ~np.isnan(target)
    err = (pred - target)[ok]
    sp = (pred - target)[ok & spike]
    return {
        "mae_ms": float(np.mean(np.abs(err))) if err.size else float("nan"),
        "rmse_ms": float(np.sqrt(np.mean(err**2))) if err.size else float("nan"),
        "spike_mae_ms": float(np.mean(np.abs(sp))) if sp.size else float("nan"),
        "bias_ms": float(np.mean(err)) if err.size else float("nan"),  # > 0: predicts too high
        "median_ae_ms": float(np.median(np.abs(err))) if err.size else float("nan"),
        "n": int(err.size),
        "n_spike": int(sp.size),
    }


Predictor = Callable[[Points], np.ndarray]


def nonfinite_points(pred: np.ndarray) -> int:
    """How many prediction points (rows of ``pred``) have a NaN or infinite latency in either queue.

    Counted on every point, known target or not: the MAE of such a model is NaN, which the table shows as
    "-" next to an ``n`` that looks complete, so callers refuse the model by this count instead."""
    if pred.size == 0:
        return 0
    return int(np.count_nonzero(~np.all(np.isfinite(pred.reshape(len(pred), -1)), axis=1)))


def _scored(pred: np.ndarray, target: np.ndarray, spike: np.ndarray) -> dict:
    """:func:`metrics` pooled over both queues, plus each queue's MAE."""
    m = metrics(pred, target, spike)
    for j, q in enumerate(("l", "c")):
        m[f"{q}_mae_ms"] = metrics(pred[:, j], target[:, j], spike[:, j])["mae_ms"]
    return m


def references(pts: Points) -> dict[str, np.ndarray]:
    """The references' answers (module docstring), NaN where one has none."""
    return {"newest_acked": pts.newest_target, "clairvoyant_prev": pts.prev_target,
            "interpolated": (pts.prev_target + pts.next_target) / 2.0}


def evaluate(pts: Points, predictors: dict[str, Predictor]) -> dict:
    """``{"models": {name: metrics + per-queue breakdown}, "references": {name: ...}}``.

    Every predictor runs on the same points. A reference is scored on the targets where it has an answer
    (the first and last sends of a run have no neighbour; a dropped shadow leaves a gap), so its ``n`` can
    be a few smaller; it carries every model's MAE on exactly those targets (``models_mae_ms_same_targets``)
    and EWMA's under its own key, for like-for-like ratios. Each model also gets ``n_nonfinite``
    (:func:`nonfinite_points`) out of ``points`` (``len(pts)``), for the caller to refuse on.
    """
    preds = {name: fn(pts) for name, fn in predictors.items()}
    out = {name: _scored(pred, pts.target, pts.spike) for name, pred in preds.items()}
    for name, pred in preds.items():
        out[name]["n_nonfinite"] = nonfinite_points(pred)  # points whose prediction is NaN/inf (eval refuses)
    refs = {}
    for name, answer in references(pts).items():
        target = np.where(np.isnan(answer), np.nan, pts.target)  # only where the reference has an answer
        refs[name] = _scored(answer, target, pts.spike)
        refs[name]["ewma_mae_ms_same_targets"] = metrics(pts.ewma, target, pts.spike)["mae_ms"]
        refs[name]["models_mae_ms_same_targets"] = {
            m: metrics(pred, target, pts.spike)["mae_ms"] for m, pred in preds.items()}
    return {"models": out, "references": refs, "points": len(pts)}


def baseline_predictors() -> dict[str, Predictor]:
    """``last``: the window's reference (the last latency per queue among the window's acks, the other queue's
    where one is absent; not the last over the whole history: the shipped figures were scored so); ``ewma``: the
    per-queue SRTT over the whole history."""
    return {"last": lambda p: p.base[:, :2], "ewma": lambda p: p.ewma}
