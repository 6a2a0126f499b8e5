"""Baselines in the evaluation harness (numpy): last value, EWMA (SRTT, alpha = 1/8), linear AR.

Each answers, for every prediction point of a dataset, the (L, C) latency in ms of the next packet, from the
same information the learned models get (the ack log up to that point). ``ewma`` follows the whole ack history
per queue, exactly what :class:`~tokenwire.predictor.runtime.EwmaLatencyForecaster` does online; ``last`` (in
:mod:`.harness`) is the window's reference, the last latency per queue among the newest ``window`` acks, the
other queue's where one is absent from the window (:func:`~.features.queue_bases`), not the last over the whole
history; ``ar`` is a linear model on the feature window (fitted on the training split with the networks'
Huber loss, its ridge chosen by validation: :class:`LinearAR`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

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
    return np.concatenate([_lag_columns(x), np.ones((x.shape[0], 1))], axis=1)


def _lag_columns(x: np.ndarray) -> np.ndarray:
    """:func:`ar_design` without its bias column, float64."""
    return x[:, -AR_LAGS:, :].reshape(x.shape[0], -1).astype(np.float64)


AR_HUBER_MS = 2.0
"""Huber transition (ms) of the AR fit, the networks' default (``train --huber-ms``). Least squares fitted the
conditional *mean* of a heavy-tailed change (a few outage samples of seconds) while the metric is MAE: even
on the training traces its MAE was worse than the last value's, whose answer (no change) is near the median."""
AR_RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
"""Ridge strengths the fit chooses from (standardized columns; see :class:`LinearAR`), weakest first."""
AR_FOLDS = 4
"""Contiguous (time-ordered) blocks of the training points in the ridge's blocked cross-validation."""
AR_MIN_FOLD_POINTS = 50
"""Fewer training points per fold than this: no validation, :data:`AR_DEFAULT_RIDGE` instead."""
AR_DEFAULT_RIDGE = 1e-2
AR_FORMAT = 2
"""``format`` of the ``ar.json`` :meth:`LinearAR.to_dict` writes. 1 (no ``format`` key): ridge least squares on
the raw design; 2: Huber fit on the standardized design with the ridge chosen by validation. Both store
coefficients on the raw :func:`ar_design`, so :meth:`LinearAR.predict` reads either the same way."""
_IRLS_MAX_ITER = 100
_IRLS_TOL = 1e-6


class _Standardizer:
    """Column centring and scaling of the lag columns, from the points a model is fitted on.

    The raw columns range from 0/1 flags to times clipped at 20 with standard deviations near 6, and several
    are almost linear in others (``age`` of consecutive acks differs by their ``ack_gap``): a ridge on the raw
    design barely touched the time columns, whose large, cancelling coefficients stopped cancelling on
    slower links (most ``age`` values clipped at 20 on the held-out traces, 14 % in training). A ridge on
    standardized columns shrinks every direction alike. A column constant in the fit points (``size``, at a
    fixed probe size) carries no information there and gets no coefficient, rather than a 1/0 scaling.
    """

    def __init__(self, a: np.ndarray) -> None:
        self.mu = a.mean(axis=0)
        sd = a.std(axis=0)
        self.keep = sd > 1e-9 * np.maximum(1.0, np.abs(self.mu))
        self.sd = np.where(self.keep, sd, 1.0)

    def z(self, a: np.ndarray) -> np.ndarray:
        """The standardized design: kept columns, then a bias column (last)."""
        z = (a[:, self.keep] - self.mu[self.keep]) / self.sd[self.keep]
        return np.concatenate([z, np.ones((a.shape[0], 1))], axis=1)

    def raw(self, c: np.ndarray) -> np.ndarray:
        """Coefficients ``c`` of :meth:`z` as coefficients of :func:`ar_design` (same predictions)."""
        out = np.zeros(self.mu.shape[0] + 1)
        w = c[:-1] / self.sd[self.keep]
        out[:-1][self.keep] = w
        out[-1] = c[-1] - float(w @ self.mu[self.keep])
        return out


def _huber_ridge(z: np.ndarray, y: np.ndarray, s: np.ndarray, ridge: float, huber_ms: float,
                 c: np.ndarray | None = None) -> np.ndarray:
    """Coefficients minimising ``mean(huber(s * (z @ c - y))) / (huber_ms * mean(s)) + ridge / 2 * |c|^2``.

    ``y`` is the change in window-scale units and ``s`` the scale (ms), so the loss is in ms like the metric
    and the networks' loss; the first term is then about MAE / mean scale, which makes ``ridge`` unitless. The
    bias (``z``'s last column) is not penalised. Iteratively reweighted least squares (each step solves a
    weighted ridge with weight ``min(1, huber_ms / |residual ms|)`` and never increases the objective),
    started from ``c`` (a neighbouring ridge's answer) when given, until the objective falls by less than
    :data:`_IRLS_TOL` relative (the MAE is then within ~1e-5 of converged, at a fraction of the steps).
    """
    n, k = z.shape
    s_mean = float(np.mean(s))
    pen = ridge * n * huber_ms * s_mean * np.eye(k)
    pen[-1, -1] = 0.0
    c = np.zeros(k) if c is None else c
    prev = math.inf
    for _ in range(_IRLS_MAX_ITER):
        a = np.abs(s * (z @ c - y))
        obj = (float(np.mean(np.where(a <= huber_ms, 0.5 * a * a, huber_ms * (a - 0.5 * huber_ms))))
               / (huber_ms * s_mean) + 0.5 * ridge * float(c[:-1] @ c[:-1]))
        if prev - obj <= _IRLS_TOL * obj:
            break
        prev = obj
        w = s * np.sqrt(huber_ms / np.maximum(a, huber_ms))
        zw = z * w[:, None]  # the gram as zw.T @ zw: a symmetric product, several times faster than zw.T @ z
        c = np.linalg.solve(zw.T @ zw + pen, zw.T @ (w * y))
    return c


class LinearAR:
    """Linear model from :func:`ar_design` to the per-queue change ``(target - base) / scale``.

    ``ref`` is the window reference of :mod:`.features` (last L, last C, scale), as for the networks. All-zero
    coefficients answer the last value, so the fit is a yardstick *for* it; it used to lose to the last value
    on held-out traces (MAE 40.9 against 32.8 ms) for two reasons fixed here: least squares, which a heavy
    tail pulls away from the median the MAE rewards (now the networks' Huber loss, :data:`AR_HUBER_MS`), and a
    tiny ridge on unstandardized, collinear columns (now :class:`_Standardizer` and a ridge chosen by
    validation). ``ridge=None`` chooses it from :data:`AR_RIDGES` by blocked cross-validation over
    :data:`AR_FOLDS` contiguous stretches of the (time-ordered) training points, on pooled MAE in ms; a
    number fixes it.
    """

    kind = "ar"

    def __init__(self, ridge: float | None = None, huber_ms: float = AR_HUBER_MS) -> None:
        # > 0: the standardized design can hold collinear columns, which a zero ridge leaves singular
        if ridge is not None and not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge > 0):
            raise ValueError(f"ridge must be a finite number > 0, not {ridge!r}")
        if not (isinstance(huber_ms, (int, float)) and math.isfinite(huber_ms) and huber_ms > 0):
            raise ValueError(f"huber_ms must be a finite number > 0, not {huber_ms!r}")
        self.ridge = ridge
        self.choose_ridge = ridge is None
        """Whether :meth:`fit` chooses the ridge (every time: a refit on other data chooses again)."""
        self.huber_ms: float | None = float(huber_ms)
        """None for a format-1 model loaded by :meth:`from_dict` (least squares); :meth:`fit` then uses
        :data:`AR_HUBER_MS`."""
        self.validation_mae_ms: dict[float, float] | None = None
        """Blocked cross-validation MAE (ms) per candidate ridge of the last :meth:`fit` that chose one."""
        self.format = AR_FORMAT
        self.coef: np.ndarray | None = None

    def fit(self, x: np.ndarray, ref: np.ndarray, target: np.ndarray,
            progress: Callable[[str], None] | None = None) -> LinearAR:
        """Fit on the points; ``progress`` is told of each step (the cross-validation's folds, the final fit):
        on a full training set the fit takes minutes, which ``train`` spent without a line."""
        a = _lag_columns(x)
        for j, q in enumerate("LC"):
            if not np.any(~np.isnan(target[:, j])):
                raise ValueError(f"no known target of the {q} queue to fit the AR on (all NaN)")
        if self.huber_ms is None:
            self.huber_ms = AR_HUBER_MS
        if self.choose_ridge or self.ridge is None:
            ridge, self.validation_mae_ms = self._choose_ridge(a, ref, target, progress)
        else:
            ridge, self.validation_mae_ms = float(self.ridge), None
        if progress is not None:
            progress(f"final fit with ridge {ridge:g}")
        self.coef = self._fit(a, ref, target, [ridge])[ridge]
        self.ridge = ridge
        self.format = AR_FORMAT
        return self

    def _fit(self, a: np.ndarray, ref: np.ndarray, target: np.ndarray, ridges: list[float],
             ) -> dict[float, np.ndarray]:
        """Raw-design coefficients ``(columns + 1, 2)`` for each ridge, strongest first (each warm-starts the
        next), on the points ``a``/``ref``/``target``."""
        huber_ms = AR_HUBER_MS if self.huber_ms is None else self.huber_ms
        st = _Standardizer(a)
        z = st.z(a)
        out = {r: np.zeros((a.shape[1] + 1, 2)) for r in ridges}
        for j in (0, 1):
            ok = ~np.isnan(target[:, j])
            if not ok.any():  # a validation fold's training part can lack one queue; the full fit cannot
                continue
            y = (target[ok, j] - ref[ok, j]) / ref[ok, 2]
            c = None
            for r in sorted(ridges, reverse=True):
                c = _huber_ridge(z[ok], y, ref[ok, 2], r, huber_ms, c)
                out[r][:, j] = st.raw(c)
        return out

    def _choose_ridge(self, a: np.ndarray, ref: np.ndarray, target: np.ndarray,
                      progress: Callable[[str], None] | None = None) -> tuple[float, dict[float, float] | None]:
        """The ridge of :data:`AR_RIDGES` with the least pooled MAE (ms) on held-out contiguous blocks.

        Contiguous blocks, not a shuffle: neighbouring prediction points share most of their window, so a
        shuffled fold would validate on near copies of training points and favour the weakest ridge. Too few
        points to validate: :data:`AR_DEFAULT_RIDGE`.
        """
        n = a.shape[0]
        if n < AR_FOLDS * AR_MIN_FOLD_POINTS:
            return AR_DEFAULT_RIDGE, None
        err = dict.fromkeys(AR_RIDGES, 0.0)
        count = 0
        for fold, held in enumerate(np.array_split(np.arange(n), AR_FOLDS), 1):
            if progress is not None:
                progress(f"choosing the ridge: fold {fold}/{AR_FOLDS} of the cross-validation "
                         f"({len(AR_RIDGES)} ridges)")
            fit_rows = np.ones(n, dtype=bool)
            fit_rows[held] = False
            coefs = self._fit(a[fit_rows], ref[fit_rows], target[fit_rows], list(AR_RIDGES))
            known = ~np.isnan(target[held])
            count += int(known.sum())
            design = np.concatenate([a[held], np.ones((held.size, 1))], axis=1)
            for r, coef in coefs.items():
                pred = ref[held, :2] + ref[held, 2:3] * (design @ coef)
                err[r] += float(np.abs(pred - target[held])[known].sum())
        mae = {r: e / max(count, 1) for r, e in err.items()}
        return min(AR_RIDGES, key=lambda r: (mae[r], -r)), mae

    def predict(self, x: np.ndarray, ref: np.ndarray) -> np.ndarray:
        if self.coef is None:
            raise RuntimeError("LinearAR.predict before fit")
        return ref[:, :2] + ref[:, 2:3] * (ar_design(x) @ self.coef)

    def to_dict(self) -> dict:
        val = None if self.validation_mae_ms is None else [[r, m] for r, m in self.validation_mae_ms.items()]
        return {"format": self.format, "ridge": self.ridge, "huber_ms": self.huber_ms, "standardized": True,
                "folds": AR_FOLDS if val is not None else None, "validation_mae_ms": val,
                "coef": None if self.coef is None else self.coef.tolist()}

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
        fmt = d.get("format", 1)
        if fmt not in (1, AR_FORMAT) or isinstance(fmt, bool):
            raise ValueError(f"format {fmt!r} is not one this version reads (1, {AR_FORMAT}): "
                             "refit it with `tokenwire predictor train --kinds ar`")
        ridge = d["ridge"]
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge <= 0:
            raise ValueError(f"ridge is {ridge!r}; expected a finite number > 0")
        # format 1 was a least-squares fit: no Huber transition; both formats predict from ``coef`` alone
        huber = d.get("huber_ms") if fmt == AR_FORMAT else None
        if fmt == AR_FORMAT and (isinstance(huber, bool) or not isinstance(huber, (int, float))
                                 or not math.isfinite(huber) or huber <= 0):
            raise ValueError(f"huber_ms is {huber!r}; expected a finite number > 0")
        m = cls(float(ridge))
        m.format = fmt
        m.huber_ms = None if huber is None else float(huber)
        m.validation_mae_ms = _validation_record(d.get("validation_mae_ms"))
        m.coef = coef
        return m

    @property
    def lags(self) -> int:
        """How many of the window's newest acks the coefficients regress on."""
        if self.coef is None:
            raise RuntimeError("LinearAR.lags before fit")
        return (self.coef.shape[0] - 1) // N_FEATURES


def _validation_record(v: object) -> dict[float, float] | None:
    """``validation_mae_ms`` of an ``ar.json`` (``[[ridge, MAE ms], ...]``) back as a dict; None when absent or
    not in that shape (it documents how the ridge was chosen; predictions do not depend on it)."""
    if not isinstance(v, list):
        return None
    out: dict[float, float] = {}
    for item in v:
        if not (isinstance(item, list) and len(item) == 2
                and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in item)):
            return None
        out[float(item[0])] = float(item[1])
    return out
