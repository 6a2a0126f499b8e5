"""Baselines in the evaluation harness (numpy): last value, EWMA (SRTT, alpha = 1/8), linear AR.

Each answers, for every prediction point of a dataset, the (L, C) latency in ms of the next packet, from the
same information the learned models get (the ack log up to that point). ``last`` and ``ewma`` follow the
whole ack history per queue, exactly what :class:`~tokenwire.predictor.runtime.EwmaLatencyForecaster`
does online; ``ar`` is a least-squares linear model on the feature window (fitted on the training split).
"""

from __future__ import annotations

import numpy as np

from .features import N_FEATURES, R_LAT, R_QL

AR_LAGS = 16
"""Newest acks of the window the AR model regresses on (all feature columns of each)."""


def per_queue_ewma(acks: np.ndarray, alpha: float) -> np.ndarray:
    """``(N_acks + 1, 2)``: the per-queue estimate after 0, 1, ... N acks (alpha = 1: last value).

    A queue not seen yet borrows the other queue's estimate (NaN before the first ack).
    """
    n = acks.shape[0]
    est = np.full((n + 1, 2), np.nan)
    cur = [np.nan, np.nan]
    lat = acks[:, R_LAT]
    ql = acks[:, R_QL] > 0.5
    for i in range(n):
        j = 0 if ql[i] else 1
        cur[j] = lat[i] if np.isnan(cur[j]) else cur[j] + alpha * (lat[i] - cur[j])
        est[i + 1] = cur
    for j in (0, 1):
        est[:, j] = np.where(np.isnan(est[:, j]), est[:, 1 - j], est[:, j])
    return est


def ar_design(x: np.ndarray) -> np.ndarray:
    """Design matrix of the AR model: the newest ``AR_LAGS`` feature rows flattened, plus a bias column."""
    lags = x[:, -AR_LAGS:, :].reshape(x.shape[0], -1).astype(np.float64)
    return np.concatenate([lags, np.ones((x.shape[0], 1))], axis=1)


class LinearAR:
    """Ridge least squares from :func:`ar_design` to the per-queue change ``(target - base) / scale``.

    ``ref`` is the window reference of :mod:`.features` (last L, last C, scale), as for the networks.
    """

    kind = "ar"

    def __init__(self, ridge: float = 1e-3) -> None:
        self.ridge = ridge
        self.coef: np.ndarray | None = None

    def fit(self, x: np.ndarray, ref: np.ndarray, target: np.ndarray) -> LinearAR:
        a = ar_design(x)
        coef = np.zeros((a.shape[1], 2))
        for j in (0, 1):
            ok = ~np.isnan(target[:, j])
            aj = a[ok]
            yj = (target[ok, j] - ref[ok, j]) / ref[ok, 2]
            gram = aj.T @ aj + self.ridge * len(aj) * np.eye(a.shape[1])
            coef[:, j] = np.linalg.solve(gram, aj.T @ yj)
        self.coef = coef
        return self

    def predict(self, x: np.ndarray, ref: np.ndarray) -> np.ndarray:
        if self.coef is None:
            raise RuntimeError("LinearAR.predict before fit")
        return ref[:, :2] + ref[:, 2:3] * (ar_design(x) @ self.coef)

    def to_dict(self) -> dict:
        return {"ridge": self.ridge, "coef": None if self.coef is None else self.coef.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> LinearAR:
        """The model :meth:`to_dict` wrote; ValueError saying what is wrong for anything else (no coefficients,
        a shape :func:`ar_design` cannot multiply, non-finite values), so a bad ``ar.json`` fails at load,
        not in the middle of an evaluation."""
        if not isinstance(d, dict) or "coef" not in d or "ridge" not in d:
            raise ValueError("expected an object with 'ridge' and 'coef' (as `tokenwire predictor train` writes)")
        if d["coef"] is None:
            raise ValueError("no coefficients (coef is null: the model was never fitted)")
        try:
            coef = np.asarray(d["coef"], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError("coef is not a numeric matrix") from None
        if coef.ndim != 2 or coef.shape[1] != 2 or coef.shape[0] < 2 or (coef.shape[0] - 1) % N_FEATURES:
            raise ValueError(f"coef has shape {coef.shape}; expected (lags x {N_FEATURES} features + 1, 2)")
        if not np.all(np.isfinite(coef)):
            raise ValueError("coef holds NaN or infinite values")
        m = cls(d["ridge"])
        m.coef = coef
        return m

    @property
    def lags(self) -> int:
        """How many of the window's newest acks the coefficients regress on."""
        if self.coef is None:
            raise RuntimeError("LinearAR.lags before fit")
        return (self.coef.shape[0] - 1) // N_FEATURES
