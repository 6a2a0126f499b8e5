"""SwiftQueue runtime: onnxruntime forecaster without torch, typed errors, l4s fallback, ONNX vs torch."""

import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from tokenwire.predictor.runtime import (
    EwmaLatencyForecaster,
    ModelError,
    OnnxLatencyForecaster,
    load_forecaster,
    make_swiftqueue_policy,
    shipped_model_path,
)
from tokenwire.transport.ecn_socket import ECT1
from tokenwire.transport.errors import TokenwireError
from tokenwire.transport.marking import L4SPolicy, LatencySample, SwiftQueuePolicy


def samples(n, *, l_ms=20.0, c_ms=40.0, start=0.0):
    out = []
    t = start
    for i in range(n):
        t += 0.005
        ql = i % 3 != 0
        lat = l_ms if ql else c_ms
        out.append(LatencySample(sent_at=t - lat / 1000 - 0.01, ack_at=t, latency_ms=lat + (i % 5) * 0.2,
                                 size=1200, queue_l=ql, ce=False))
    return out


def test_runtime_does_not_import_torch():
    code = ("import sys\n"
            "from tokenwire.predictor.runtime import load_forecaster, make_swiftqueue_policy\n"
            "f = load_forecaster()\n"
            "assert make_swiftqueue_policy().name == 'swiftqueue'\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_shipped_model_is_small_and_predicts_after_a_full_window():
    path = shipped_model_path()
    assert path.exists() and path.stat().st_size < 1_000_000
    fc = load_forecaster()
    assert isinstance(fc, OnnxLatencyForecaster) and 64 <= fc.window <= 128
    hist = samples(fc.window + 1)
    for s in hist[:-1]:
        fc.observe(s)
        assert fc.predict(s.ack_at) is None  # cold start: too little history
    fc.observe(hist[-1])
    now = hist[-1].ack_at + 0.001
    pred = fc.predict(now)
    assert pred is not None
    l_ms, c_ms = pred
    # a steady history of L ~ 20 ms and C ~ 40 ms: the prediction stays in that neighbourhood, L below C
    assert 10 < l_ms < 35 and 25 < c_ms < 60 and l_ms < c_ms
    batch = fc.predict_batch([now, now + 0.002, now + 0.004])
    assert batch.shape == (3, 2)
    np.testing.assert_allclose(batch[0], pred, rtol=1e-5)
    for k, t in enumerate((now + 0.002, now + 0.004), 1):
        np.testing.assert_allclose(batch[k], fc.predict(t), rtol=1e-4, atol=1e-3)


def test_non_finite_samples_are_ignored():
    fc = load_forecaster()
    hist = samples(fc.window + 1)
    for s in hist:
        fc.observe(s)
    now = hist[-1].ack_at + 0.001
    before = fc.predict(now)
    fc.observe(LatencySample(now, now, float("nan"), 1200, True, False))
    fc.observe(LatencySample(now, float("inf"), 20.0, 1200, False, False))
    assert fc.predict(now) == before
    ew = EwmaLatencyForecaster()
    ew.observe(LatencySample(0.0, 0.0, float("nan"), 1200, True, False))
    assert ew.predict(0.0) is None


def test_ring_buffer_keeps_the_newest_window():
    fc = load_forecaster()
    for s in samples(300, l_ms=80.0, c_ms=90.0):
        fc.observe(s)
    fresh = load_forecaster()
    tail = samples(300, l_ms=80.0, c_ms=90.0)[-(fc.window + 1):]
    for s in tail:
        fresh.observe(s)
    now = tail[-1].ack_at + 0.001
    np.testing.assert_allclose(fc.predict(now), fresh.predict(now), rtol=1e-6)


def test_ewma_forecaster_is_srtt_per_queue():
    f = EwmaLatencyForecaster()
    assert f.predict(0.0) is None
    f.observe(LatencySample(0.0, 0.01, 10.0, 1200, True, False))
    assert f.predict(0.02) == (10.0, 10.0)  # C unseen: borrows L
    f.observe(LatencySample(0.0, 0.02, 18.0, 1200, True, False))
    f.observe(LatencySample(0.0, 0.03, 50.0, 1200, False, False))
    assert f.predict(0.04) == pytest.approx((11.0, 50.0))
    assert f.predict_batch([0.04, 0.05]).shape == (2, 2)


def test_missing_and_corrupt_model_files_raise_a_typed_error(tmp_path):
    with pytest.raises(ModelError, match="no such model file") as exc:
        load_forecaster(str(tmp_path / "nope.onnx"))
    assert isinstance(exc.value, TokenwireError)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 50)
    with pytest.raises(ModelError):
        load_forecaster(str(bad))
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(shipped_model_path().read_bytes()[:5000])
    with pytest.raises(ModelError):
        load_forecaster(str(truncated))


def test_policy_falls_back_to_l4s_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tokenwire.predictor"):
        pol = make_swiftqueue_policy(str(tmp_path / "nope.onnx"))
    assert isinstance(pol, L4SPolicy) and pol.codepoint(0.0) == ECT1
    assert any("falling back to the l4s policy" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tokenwire.predictor"):
        ok = make_swiftqueue_policy(margin_ms=2.0)
    assert isinstance(ok, SwiftQueuePolicy) and ok.margin_ms == 2.0
    assert not caplog.records


def test_policy_marks_for_the_faster_queue():
    pol = make_swiftqueue_policy()
    assert isinstance(pol, SwiftQueuePolicy)
    for s in samples(200, l_ms=120.0, c_ms=25.0):  # L congested, C fast
        pol.on_sample(s)
    now = 1.001 + 200 * 0.005
    pred = pol.forecaster.predict(now)
    assert pred[0] > pred[1] + 5
    assert pol.codepoint(now) != ECT1


def test_onnx_export_agrees_with_torch_and_is_refused_for_other_features(tmp_path):
    torch = pytest.importorskip("torch")
    from tokenwire.predictor.export import export_onnx
    from tokenwire.predictor.models import GRUForecaster, TransformerForecaster

    torch.manual_seed(0)
    for model in (TransformerForecaster(window=64), GRUForecaster(window=64)):
        model.eval()
        path = tmp_path / f"{model.kind}.onnx"
        report = export_onnx(model, path)
        assert report["ok"] and max(v for k, v in report.items() if k != "ok") < 1e-3
        fc = load_forecaster(str(path))
        for s in samples(80):
            fc.observe(s)
        x, ref = fc._inputs([samples(80)[-1].ack_at]).values()
        with torch.no_grad():
            want = model(torch.from_numpy(x), torch.from_numpy(ref)).numpy()
        np.testing.assert_allclose(fc.predict(samples(80)[-1].ack_at), want[0], rtol=1e-4, atol=1e-3)
    # same graph, metadata claiming other features: refused
    import onnx

    proto = onnx.load(str(tmp_path / "gru.onnx"))
    meta = json.loads(proto.metadata_props[0].value)
    meta["features"] = ["latency"]
    proto.metadata_props[0].value = json.dumps(meta)
    onnx.save(proto, str(tmp_path / "other.onnx"))
    with pytest.raises(ModelError, match="other inputs"):
        load_forecaster(str(tmp_path / "other.onnx"))
