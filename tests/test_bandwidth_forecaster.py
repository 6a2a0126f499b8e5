"""The KV channel's bandwidth forecaster: ONNX export agrees with torch; the shipped model behaves."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tokenwire.predictor.bandwidth import (
    N_FEATURES,
    WINDOW,
    EwmaForecaster,
    OnnxForecaster,
    OnnxRunner,
    default_model_path,
    features,
)


def test_onnx_export_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from tokenwire.predictor.bandwidth_train import build_model, export_onnx

    torch.manual_seed(3)
    model = build_model()
    path = tmp_path / "bw.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, path)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, N_FEATURES)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out = OnnxRunner(path)(x)
    assert out.shape == (37, 2)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_features_are_scale_free_and_padded():
    r = np.array([4e6, 5e6, 6e6])
    d = np.array([0.2, 0.3, 0.25])
    a, b = features(r, d), features(10 * r, d)
    np.testing.assert_allclose(a[:-1], b[:-1])  # only the magnitude term differs
    assert a[-1] < b[-1]
    assert a[2 * WINDOW : 3 * WINDOW].sum() == 3  # validity mask: three samples
    assert features(np.ones(20) * 1e6, np.ones(20)).shape == (N_FEATURES,)


def test_shipped_model_forecasts_sensibly():
    assert default_model_path().is_file()
    f = OnnxForecaster()
    assert f.forecast() is None
    for _ in range(WINDOW):
        f.observe(1_250_000, 1.0)  # a steady 10 Mbit/s
    fc = f.forecast()
    assert fc is not None and 0 < fc.low_bps <= fc.median_bps
    assert 5e6 < fc.median_bps < 20e6
    assert fc.low_bps < 10e6  # the low quantile is below a steady rate


def test_ewma_baseline():
    e = EwmaForecaster(alpha=0.5, low_fraction=0.75)
    assert e.forecast() is None
    e.observe(1_000_000, 1.0)
    e.observe(2_000_000, 1.0)
    fc = e.forecast()
    assert fc.median_bps == pytest.approx(12e6) and fc.low_bps == pytest.approx(9e6)
    e.observe(0, 1.0)  # empty samples are ignored
    assert e.forecast().median_bps == pytest.approx(12e6)
