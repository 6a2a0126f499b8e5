"""SwiftQueue runtime: onnxruntime forecaster without torch, typed errors, l4s fallback, ONNX vs torch."""

import json
import logging
import re
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
from tokenwire.transport.ecn_socket import ECT0, ECT1
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


def tiny_model(path, *, window=64, ref_dim=3, out_dim=2, x_type="float", out_type="float", meta=None,
               cols_on_zeros=None, cols_on_data=None):
    """A small ONNX model with the runtime's signature, or a chosen flaw in it (ms of work, no torch).

    It answers the last L and C latency of ``ref`` ("last value"). With ``cols_on_zeros``/``cols_on_data``
    the answer is reshaped, at run time, to that many columns when ``x`` is all zeros (the load-time trial)
    / when it is not (real windows): a shape onnxruntime cannot know from the graph, so a model that passes
    every static check and fails (or answers another shape) only when it runs.
    """
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from tokenwire.predictor.features import FEATURES, FEATURES_VERSION, N_FEATURES

    types = {"float": TensorProto.FLOAT, "double": TensorProto.DOUBLE}
    wr = np.zeros((ref_dim, out_dim), np.float32)
    for i in range(min(ref_dim, out_dim, 2)):
        wr[i, i] = 1.0
    consts = {"Wr": wr, "Wx": np.zeros((N_FEATURES, out_dim), np.float32), "neg1": np.array([-1], np.int64),
              "ax0": np.array([0], np.int64), "one": np.array(1.0, np.float32)}
    node = helper.make_node
    nodes = [node("ReduceMean", ["x"], ["xm"], axes=[1], keepdims=0),
             node("Cast", ["xm"], ["xf"], to=TensorProto.FLOAT), node("MatMul", ["ref", "Wr"], ["a"]),
             node("MatMul", ["xf", "Wx"], ["b"]), node("Add", ["a", "b"], ["y"])]
    last = "y"
    if cols_on_zeros is not None:  # cols = zeros + (data - zeros) * k, k = 0 for an all-zero x, else 1
        consts["zc"] = np.array([cols_on_zeros], np.int64)
        consts["dc"] = np.array([cols_on_data - cols_on_zeros], np.int64)
        nodes += [node("Abs", ["xf"], ["xa"]), node("ReduceMax", ["xa"], ["xmax"], keepdims=0),
                  node("Min", ["xmax", "one"], ["xc"]), node("Ceil", ["xc"], ["xce"]),
                  node("Cast", ["xce"], ["k"], to=TensorProto.INT64), node("Unsqueeze", ["k", "ax0"], ["k1"]),
                  node("Mul", ["dc", "k1"], ["dk"]), node("Add", ["zc", "dk"], ["cols"]),
                  node("Concat", ["neg1", "cols"], ["shape"], axis=0), node("Reshape", ["y", "shape"], ["yr"])]
        last = "yr"
    nodes.append(node("Cast", [last], ["latency_ms"], to=types[out_type]))
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", types[x_type], ["batch", window, N_FEATURES]),
         helper.make_tensor_value_info("ref", TensorProto.FLOAT, ["batch", ref_dim])],
        [helper.make_tensor_value_info("latency_ms", types[out_type], ["batch", out_dim])],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if meta is None:
        meta = {"format": "tokenwire-swiftqueue", "kind": "transformer", "features": list(FEATURES),
                "features_version": FEATURES_VERSION, "window": window}
    entry = model.metadata_props.add()
    entry.key = "tokenwire"
    entry.value = meta if isinstance(meta, str) else json.dumps(meta)
    onnx.save(model, str(path))
    return path


def test_tiny_model_is_usable(tmp_path):
    fc = load_forecaster(str(tiny_model(tmp_path / "ok.onnx")))
    hist = samples(fc.window + 1)
    for s in hist:
        fc.observe(s)
    last_l = next(s.latency_ms for s in reversed(hist) if s.queue_l)
    last_c = next(s.latency_ms for s in reversed(hist) if not s.queue_l)
    assert fc.predict(10.0) == pytest.approx((last_l, last_c))


@pytest.mark.parametrize(("flaw", "says"), [
    ({"ref_dim": 5}, "expected x (batch, 64, 9) and ref (batch, 3)"),
    ({"out_dim": 1}, "unexpected model output"),
    ({"out_dim": 3}, "unexpected model output"),
    ({"x_type": "double"}, "unexpected model input types"),
    ({"out_type": "double"}, "unexpected model output"),
    ({"cols_on_zeros": 3, "cols_on_data": 2}, "trial inference failed"),  # every declared shape is right
    ({"cols_on_zeros": 1, "cols_on_data": 2}, "trial inference answered float32 (2, 1)"),
])
def test_models_that_would_fail_on_the_packet_path_are_refused_at_load(tmp_path, caplog, flaw, says):
    """Only the metadata and x's shape were checked: these loaded (and made the swiftqueue policy) and then
    raised on the daemon's first prediction, every packet."""
    path = str(tiny_model(tmp_path / "m.onnx", **flaw))
    with pytest.raises(ModelError, match=re.escape(says)):
        load_forecaster(path)
    with caplog.at_level(logging.WARNING, logger="tokenwire.predictor"):
        assert isinstance(make_swiftqueue_policy(path), L4SPolicy)


@pytest.mark.parametrize(("meta", "says"), [
    ("[1]", "metadata is a JSON list, not an object"),
    ('"text"', "metadata is a JSON str, not an object"),
    ("window", "metadata window must be an integer >= 2, got 'abc'"),
    ("window64.0", "metadata window must be an integer >= 2, got 64.0"),
    ("features", "model was built for other inputs"),
])
def test_malformed_metadata_is_a_model_error(tmp_path, meta, says):
    """Valid JSON that is not an object raised AttributeError, a window of 'abc' ValueError: the daemon did
    not fall back to l4s and `config check` printed a traceback."""
    from tokenwire.predictor.features import FEATURES, FEATURES_VERSION

    good = {"format": "tokenwire-swiftqueue", "kind": "transformer", "features": list(FEATURES),
            "features_version": FEATURES_VERSION, "window": 64}
    doc = {"window": {**good, "window": "abc"}, "window64.0": {**good, "window": 64.0},
           "features": {**good, "features": 3}}.get(meta, meta)
    with pytest.raises(ModelError, match=re.escape(says)):
        load_forecaster(str(tiny_model(tmp_path / "m.onnx", meta=doc)))


class _Broken:
    """A forecaster whose model raises, as onnxruntime does for a graph that cannot run on real inputs."""

    def __init__(self, fail_observe=False):
        self.calls = 0
        self.fail_observe = fail_observe

    def observe(self, sample):
        if self.fail_observe:
            raise ValueError("observe broke")

    def predict(self, now):
        self.calls += 1
        raise RuntimeError("Got invalid dimensions for input: ref")


def test_swiftqueue_policy_marks_like_l4s_once_the_forecaster_raises(caplog):
    """The exception went up into the transport: the connection sent nothing, 127 tracebacks, a stalled
    chat, and a daemon that SIGTERM could not stop."""
    fc = _Broken()
    pol = SwiftQueuePolicy(fc, cold_start=ECT0)
    with caplog.at_level(logging.WARNING, logger="tokenwire.transport.marking"):
        for i in range(5):
            pol.on_sample(samples(1, start=i)[0])
            assert pol.codepoint(float(i)) == ECT1
    assert fc.calls == 1  # not asked again
    assert pol.decisions["fallback"] == 5 and "Got invalid dimensions" in pol.failed
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "marking like l4s" in warned[0].getMessage()
    seen = []
    pol = SwiftQueuePolicy(_Broken(fail_observe=True), cold_start=ECT0, on_failure=seen.append)
    pol.on_sample(samples(1)[0])
    assert pol.codepoint(1.0) == ECT1 and pol.codepoint(2.0) == ECT1
    assert [str(e) for e in seen] == ["observe broke"]  # reported once, to the callback


def test_a_model_that_fails_on_real_windows_falls_back_in_the_policy(tmp_path, caplog):
    """End to end through the runtime: the model passes the load-time trial, then raises on real data."""
    pol = make_swiftqueue_policy(str(tiny_model(tmp_path / "f.onnx", window=2, cols_on_zeros=2, cols_on_data=3)))
    assert isinstance(pol, SwiftQueuePolicy)
    with caplog.at_level(logging.WARNING, logger="tokenwire.transport.marking"):
        for s in samples(10):
            pol.on_sample(s)
            assert pol.codepoint(s.ack_at) == ECT1
    assert pol.failed and pol.decisions["fallback"] > 0
