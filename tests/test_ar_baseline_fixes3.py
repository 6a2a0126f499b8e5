"""The linear AR baseline (``predictor/baselines.py``) as a fair yardstick.

It used to lose to the last value on held-out traces by a wide margin (MAE 40.9 against 32.8 ms on the
shipped card's held-out data), although all-zero coefficients *are* the last value: a least-squares fit pulled
by rare, huge changes (outage samples) onto the time columns, with a tiny ridge on unstandardized columns.
"""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest

from tokenwire.predictor.baselines import AR_DEFAULT_RIDGE, AR_FORMAT, AR_LAGS, AR_RIDGES, LinearAR
from tokenwire.predictor.features import N_FEATURES

AGE = 7  # the "age" feature column (time since the ack, in window-scale units)


def _outage_data(n: int, share_old: float, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Windows whose change to the last value is a small, median-zero noise, except a rare huge jump on
    points with a stale newest sample (``age`` above 10), as after an outage; ``share_old`` of the points
    have such an age (15 % in training, most on a slower held-out link)."""
    x = rng.normal(0.0, 1.0, size=(n, AR_LAGS, N_FEATURES)).astype(np.float32)
    x[:, :, 3] = 0.8  # a fixed probe size: a constant column
    age = np.where(rng.random(n) < share_old, rng.uniform(10, 20, n), rng.uniform(0, 10, n))
    x[:, -1, AGE] = age
    ref = np.column_stack([rng.uniform(10, 50, n), rng.uniform(10, 50, n), rng.uniform(10, 30, n)])
    change = rng.laplace(0.0, 0.05, size=(n, 2))
    change[(age > 10) & (rng.random(n) < 0.05)] += 30.0
    return x, ref, ref[:, :2] + ref[:, 2:3] * change


def _mae(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean(np.abs(pred - target)))


def test_ar_does_not_lose_to_last_value_on_held_out_data():
    """A least-squares fit followed the rare outage jumps' *mean* onto ``age`` and, on held-out data where
    most samples are stale, predicted jumps that did not come: MAE 42 against the last value's 27 here. The
    Huber fit (the networks' loss) tracks the median change, which is no change."""
    rng = np.random.default_rng(1)
    x, ref, target = _outage_data(4000, 0.15, rng)
    xh, refh, targeth = _outage_data(2000, 0.8, rng)
    ar = LinearAR().fit(x, ref, target)
    last = _mae(refh[:, :2], targeth)
    assert _mae(ar.predict(xh, refh), targeth) <= 1.02 * last, (_mae(ar.predict(xh, refh), targeth), last)
    assert _mae(ar.predict(x, ref), target) <= _mae(ref[:, :2], target)  # and no worse in sample either


def test_ridge_acts_alike_on_every_column_whatever_its_units():
    """The ridge was applied to raw columns: a column in small units (a time in seconds rather than in window
    scales) needed large coefficients, which the same ridge crushed. The design is standardized now, so
    rescaling a column does not change the predictions."""
    rng = np.random.default_rng(2)
    n = 3000
    x = rng.normal(0.0, 1.0, size=(n, AR_LAGS, N_FEATURES)).astype(np.float32)
    ref = np.column_stack([rng.uniform(10, 50, n), rng.uniform(10, 50, n), rng.uniform(5, 20, n)])
    change = np.column_stack([0.5 * x[:, -1, 0] + 0.3 * x[:, -1, 2], -0.4 * x[:, -1, 2]])
    target = ref[:, :2] + ref[:, 2:3] * (change + rng.laplace(0.0, 0.02, size=(n, 2)))
    small = x.copy()
    small[:, :, 2] *= 1e-3
    a = LinearAR(ridge=1.0).fit(x, ref, target).predict(x, ref)
    b = LinearAR(ridge=1.0).fit(small, ref, target).predict(small, ref)
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


def test_ridge_is_chosen_by_validation():
    """No validation chose the ridge; now the fit scores each candidate on held-out contiguous blocks and
    keeps the best: the strongest on pure noise (any fit of 145 columns to 600 points is overfitting), the
    weakest on a clean linear rule (shrinking it only adds error)."""
    rng = np.random.default_rng(3)
    n = 600
    x = rng.normal(0.0, 1.0, size=(n, AR_LAGS, N_FEATURES)).astype(np.float32)
    ref = np.column_stack([rng.uniform(10, 50, n), rng.uniform(10, 50, n), rng.uniform(5, 20, n)])
    noise = LinearAR().fit(x, ref, ref[:, :2] + ref[:, 2:3] * rng.laplace(0.0, 0.5, size=(n, 2)))
    assert noise.validation_mae_ms is not None and set(noise.validation_mae_ms) == set(AR_RIDGES)
    assert noise.ridge == max(AR_RIDGES), noise.validation_mae_ms
    rule = np.column_stack([0.5 * x[:, -1, 0] - 0.2 * x[:, -3, 1], 0.3 * x[:, -1, 5]])
    clean = LinearAR().fit(x, ref, ref[:, :2] + ref[:, 2:3] * (rule + rng.normal(0.0, 1e-3, size=(n, 2))))
    assert clean.validation_mae_ms is not None
    assert clean.ridge == min(AR_RIDGES), clean.validation_mae_ms
    assert clean.ridge == min(clean.validation_mae_ms, key=lambda r: clean.validation_mae_ms[r])


def test_too_few_points_to_validate_and_a_queue_without_targets():
    """Too few points for the folds: the default ridge, no validation record. A queue with no known target
    was a "Singular matrix" from numpy; now a ValueError naming the queue."""
    rng = np.random.default_rng(4)
    x = rng.normal(0.0, 1.0, size=(40, AR_LAGS, N_FEATURES)).astype(np.float32)
    ref = np.column_stack([rng.uniform(10, 50, 40), rng.uniform(10, 50, 40), rng.uniform(5, 20, 40)])
    target = ref[:, :2] + rng.normal(0.0, 1.0, size=(40, 2))
    ar = LinearAR().fit(x, ref, target)
    assert ar.ridge == AR_DEFAULT_RIDGE and ar.validation_mae_ms is None
    target[:, 1] = np.nan
    with pytest.raises(ValueError, match="no known target of the C queue"):
        LinearAR().fit(x, ref, target)
    with pytest.raises(ValueError, match="ridge must be a finite number > 0"):
        LinearAR(ridge=0.0)


def test_old_and_new_ar_json_load():
    """An ``ar.json`` of before (no ``format``: least squares) still loads and predicts from its coefficients;
    the new one round-trips how it was fitted; a format from a later version is refused at load."""
    rng = np.random.default_rng(5)
    coef = rng.normal(0.0, 0.01, size=(AR_LAGS * N_FEATURES + 1, 2))
    x = rng.normal(0.0, 1.0, size=(10, AR_LAGS, N_FEATURES)).astype(np.float32)
    ref = np.column_stack([rng.uniform(10, 50, 10), rng.uniform(10, 50, 10), rng.uniform(5, 20, 10)])
    old = LinearAR.from_dict({"ridge": 0.001, "coef": coef.tolist()})
    assert old.format == 1 and old.huber_ms is None and old.lags == AR_LAGS
    design = np.concatenate([x.reshape(10, -1), np.ones((10, 1))], axis=1).astype(np.float64)
    np.testing.assert_allclose(old.predict(x, ref), ref[:, :2] + ref[:, 2:3] * (design @ coef))

    fitted = LinearAR().fit(*_outage_data(800, 0.2, rng)[:3])
    doc = json.loads(json.dumps(fitted.to_dict()))
    assert doc["format"] == AR_FORMAT and doc["huber_ms"] == 2.0 and doc["standardized"] is True
    back = LinearAR.from_dict(doc)
    assert (back.format, back.ridge, back.huber_ms) == (AR_FORMAT, fitted.ridge, 2.0)
    assert back.validation_mae_ms == fitted.validation_mae_ms
    np.testing.assert_array_equal(back.predict(x, ref), fitted.predict(x, ref))
    with pytest.raises(ValueError, match="format 3 is not one this version reads"):
        LinearAR.from_dict({**doc, "format": 3})
    with pytest.raises(ValueError, match="huber_ms is None"):
        LinearAR.from_dict({**doc, "huber_ms": None})


def test_shipped_ar_is_the_validated_huber_fit():
    """The shipped ``ar.json`` was the least-squares fit whose held-out MAE the model card compared the
    transformer against; it is refitted (same training data) with the ridge its validation chose."""
    doc = json.loads((resources.files("tokenwire.predictor") / "shipped" / "ar.json").read_text())
    ar = LinearAR.from_dict(doc)
    assert ar.format == AR_FORMAT and ar.lags == AR_LAGS
    assert ar.validation_mae_ms is not None and set(ar.validation_mae_ms) == set(AR_RIDGES)
    assert ar.ridge == min(ar.validation_mae_ms, key=lambda r: ar.validation_mae_ms[r])
