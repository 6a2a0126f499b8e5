"""SwiftQueue predictor: datasets, features, baselines, harness metrics, model size."""

import json
import math
import re
import warnings

import numpy as np
import pytest

from tokenwire.predictor.baselines import LinearAR, per_queue_ewma
from tokenwire.predictor.crossspec import CrossSpecError, parse_cross_spec, plan_flows
from tokenwire.predictor.dataset import COLUMNS, CollectConfig, DatasetError, ack_log, collect, load, save, summary
from tokenwire.predictor.features import N_FEATURES, R_LAT, build_windows, window_features
from tokenwire.predictor.harness import evaluate, metrics, points, spike_mask

CROSS = "reno:on=1,off=1+scalable:on=0.5,off=0.5+cbr-l:rate=120%,on=0.3,off=0.7"


@pytest.fixture(scope="module")
def tiny():
    return collect(CollectConfig(down_trace="6mbps", cross=CROSS, seconds=4.0, seed=3, probe_pps=150))


def test_dataset_shape_and_ground_truth(tiny):
    n = tiny["sent_at"].shape[0]
    assert 400 < n < 800  # Poisson at 150/s for 4 s
    for c in COLUMNS:
        assert tiny[c].shape == (n,)
    assert np.all(np.diff(tiny["sent_at"]) > 0)
    meta = json.loads(tiny["meta"])
    assert meta["version"] == 1 and meta["cross_flows"] >= 3
    # the shadow of the probe's own queue sees (nearly) what the probe packet saw: it went just ahead of it
    ok = ~np.isnan(tiny["latency_ms"])
    own = np.where(tiny["queue_l"] > 0.5, tiny["target_l_ms"], tiny["target_c_ms"])[ok]
    diff = tiny["latency_ms"][ok] - own
    good = ~np.isnan(diff)
    assert np.median(np.abs(diff[good])) < 2.5  # one 1500-B opportunity at 6 Mbit/s is 2 ms
    assert np.all(tiny["latency_ms"][ok] >= 10.0)  # one-way delay 10 ms
    # both queues are used and the cross traffic makes them differ
    assert 0.2 < tiny["queue_l"].mean() < 0.8
    both = ~np.isnan(tiny["target_l_ms"]) & ~np.isnan(tiny["target_c_ms"])
    assert np.mean(np.abs(tiny["target_l_ms"][both] - tiny["target_c_ms"][both]) > 5) > 0.05
    # acks: n_acked counts acks strictly available at send time
    acks = ack_log(tiny)
    assert np.all(np.diff(acks[:, 1]) >= 0)
    k = np.flatnonzero(tiny["n_acked"] > 0)[5]
    assert acks[int(tiny["n_acked"][k]) - 1, 1] <= tiny["sent_at"][k]


def test_dataset_is_deterministic_per_seed(tiny, tmp_path):
    again = collect(CollectConfig(down_trace="6mbps", cross=CROSS, seconds=4.0, seed=3, probe_pps=150))
    other = collect(CollectConfig(down_trace="6mbps", cross=CROSS, seconds=4.0, seed=4, probe_pps=150))
    for c in COLUMNS:
        np.testing.assert_array_equal(tiny[c], again[c])
    assert tiny["sent_at"].shape != other["sent_at"].shape or not np.array_equal(tiny["sent_at"], other["sent_at"])
    save(tmp_path / "d.npz", tiny)
    back = load(tmp_path / "d.npz")
    for c in COLUMNS:
        np.testing.assert_array_equal(back[c], tiny[c])
    assert back["meta"]["config"]["seed"] == 3


def test_collect_refuses_a_probe_rate_it_cannot_send():
    for kw in ({"probe_pps": 0.0}, {"probe_share": 1.5}, {"probe_share": -0.1}):
        with pytest.raises(ValueError, match="probe rate"):
            collect(CollectConfig(down_trace="6mbps", cross=CROSS, seconds=1.0, **kw))


def test_dataset_load_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such"):
        load(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DatasetError):
        load(tmp_path / "bad.npz")


def test_cross_spec_parsing_and_plans():
    items = parse_cross_spec("reno*2:on=2,off=1+cbr-l:rate=40%+udp-ect1:2mbps+tcp:cubic")
    assert [i.kind for i in items] == ["reno", "cbr-l", "cbr-l", "reno"]
    assert items[0].copies == 2 and items[1].rate == "40%"
    plans = plan_flows(items, seconds=10, mean_bps=10e6, seed=1)
    assert len(plans) == 5
    assert plans[2].rate_bps == pytest.approx(4e6) and plans[3].rate_bps == pytest.approx(2e6)
    assert all(0 <= a < b <= 10 for p in plans for a, b in p.periods)
    assert plan_flows(items, seconds=10, mean_bps=10e6, seed=1)[0].periods == plans[0].periods
    # the last four ran: a billion-packet simulation that seemed to hang, or a crash inside it
    for bad in ("bogus", "cbr-l", "reno:rate=2mbps", "reno:on=1", "reno*0", "cbr-c:rate=fast",
                "udp-ect1:1e9mbps", "cbr-l:rate=1e9mbps", "cbr-l:rate=100000%", "reno:on=inf,off=1"):
        with pytest.raises(CrossSpecError):
            parse_cross_spec(bad)


def test_vectorised_windows_match_the_runtime_definition(tiny):
    acks = ack_log(tiny)
    w = 16
    n_acked = tiny["n_acked"].astype(int)
    sel = np.flatnonzero(n_acked >= w + 1)[:40]
    x, ref = build_windows(acks, tiny["sent_at"][sel], n_acked[sel], w)
    assert x.shape == (sel.size, w, N_FEATURES) and ref.shape == (sel.size, 3)
    for k, i in enumerate(sel):
        raw = acks[n_acked[i] - w:n_acked[i]]
        prev = acks[n_acked[i] - w - 1]
        fx, fr = window_features(raw, tiny["sent_at"][i], prev[1], prev[0])
        np.testing.assert_allclose(fx, x[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fr, ref[k])
        assert fr[2] == pytest.approx(np.median(raw[:, R_LAT]))


def test_ewma_and_last_on_a_synthetic_series():
    # L acks at 10, 20, 30 ms, then one C ack at 100 ms
    acks = np.array([[0, 0.1, 10, 1500, 1, 0], [0, 0.2, 20, 1500, 1, 0], [0, 0.3, 30, 1500, 1, 0],
                     [0, 0.4, 100, 1500, 0, 0]], dtype=float)
    last = per_queue_ewma(acks, 1.0)
    assert np.isnan(last[0]).all()
    np.testing.assert_allclose(last[3], [30, 30])  # C not seen yet: borrows L
    np.testing.assert_allclose(last[4], [30, 100])
    ew = per_queue_ewma(acks, 0.125)
    l2 = 10 + 0.125 * (20 - 10)
    np.testing.assert_allclose(ew[3, 0], l2 + 0.125 * (30 - l2))
    np.testing.assert_allclose(ew[4, 1], 100.0)


def test_linear_ar_recovers_a_linear_rule():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 20, N_FEATURES)).astype(np.float32)
    ref = np.column_stack([rng.uniform(10, 50, 2000), rng.uniform(10, 50, 2000), rng.uniform(5, 20, 2000)])
    # the true change: +0.5 * latency of the newest ack (in scale units) for L, -0.25 * its CE bit for C
    target = ref[:, :2] + ref[:, 2:3] * np.column_stack([0.5 * x[:, -1, 0], -0.25 * x[:, -1, 5]])
    ar = LinearAR(ridge=1e-6).fit(x, ref, target)
    np.testing.assert_allclose(ar.predict(x, ref), target, atol=1e-3)
    back = LinearAR.from_dict(json.loads(json.dumps(ar.to_dict())))
    np.testing.assert_allclose(back.predict(x, ref), target, atol=1e-3)


def test_spike_mask_and_metrics():
    s = np.array([10.0, 12.0, 40.0, 41.0, 100.0, 95.0, np.nan, 200.0, 215.0])
    np.testing.assert_array_equal(spike_mask(s), [False, False, True, False, True, False, False, False, False])
    # +15 on 200 is > 20 %? no (7.5 %); +28 on 12 is > 20 ms and > 20 %
    target = np.array([[10.0, np.nan], [30.0, 50.0]])
    pred = np.array([[12.0, 0.0], [26.0, 50.0]])
    m = metrics(pred, target, np.array([[False, False], [True, False]]))
    assert m["n"] == 3 and m["n_spike"] == 1
    assert m["mae_ms"] == pytest.approx(2.0) and m["spike_mae_ms"] == pytest.approx(4.0)
    assert m["rmse_ms"] == pytest.approx(np.sqrt((4 + 16 + 0) / 3))


def test_points_cover_sends_with_enough_history(tiny):
    p = points(tiny, 32)
    assert len(p) > 100
    assert p.x.shape[1:] == (32, N_FEATURES)
    assert np.all(np.isfinite(p.x)) and np.all(np.abs(p.x) <= 20.0)
    assert np.all(tiny["n_acked"][np.isin(tiny["sent_at"], p.sent_at)] >= 33)


def test_references_are_the_neighbouring_and_newest_acked_sends_truth(tiny):
    p = points(tiny, 32)
    idx = np.flatnonzero(np.isin(tiny["sent_at"], p.sent_at))
    truth = np.stack([tiny["target_l_ms"], tiny["target_c_ms"]], axis=1)
    np.testing.assert_array_equal(p.prev_target, truth[idx - 1])
    np.testing.assert_array_equal(p.next_target[:-1], truth[idx[:-1] + 1])
    # newest acked send, found the slow way: the latest ack by the send time (ties: the later send)
    for k in range(0, len(p), 37):
        got = [(tiny["ack_at"][j], j) for j in range(len(tiny["ack_at"])) if tiny["ack_at"][j] <= p.sent_at[k]]
        np.testing.assert_array_equal(p.newest_target[k], truth[max(got)[1]])
    doc = evaluate(p, {"ewma": lambda q: q.ewma, "last": lambda q: q.base[:, :2]})
    assert set(doc["models"]) == {"ewma", "last"}  # the references are not ranked among the forecasters
    answers = {"newest_acked": p.newest_target, "clairvoyant_prev": p.prev_target,
               "interpolated": (p.prev_target + p.next_target) / 2}
    assert set(doc["references"]) == set(answers)
    for name, answer in answers.items():
        ref = doc["references"][name]
        ok = ~np.isnan(answer) & ~np.isnan(p.target)
        assert ref["n"] == int(ok.sum()) > 100, name
        assert ref["mae_ms"] == pytest.approx(np.mean(np.abs(answer - p.target)[ok])), name
        assert ref["ewma_mae_ms_same_targets"] == pytest.approx(np.mean(np.abs(p.ewma - p.target)[ok]))
        assert ref["models_mae_ms_same_targets"]["last"] == pytest.approx(
            np.mean(np.abs(p.base[:, :2] - p.target)[ok]))
    # looking into the future helps: the interpolation beats the previous send's truth on these data
    assert doc["references"]["interpolated"]["mae_ms"] < doc["references"]["clairvoyant_prev"]["mae_ms"]


def test_transformer_within_the_parameter_budget():
    torch = pytest.importorskip("torch")
    from tokenwire.predictor.models import GRUForecaster, TransformerForecaster, n_params

    for window in (64, 128):
        t = TransformerForecaster(window=window)
        assert n_params(t) <= 100_000
        y = t(torch.zeros(3, window, N_FEATURES), torch.tensor([[10.0, 20.0, 5.0]] * 3))
        assert y.shape == (3, 2)
    assert n_params(GRUForecaster()) < n_params(TransformerForecaster())


def test_change_focused_loss_upweights_sharp_changes_and_masks_nan():
    torch = pytest.importorskip("torch")
    from tokenwire.predictor.models import change_focused_loss

    pred = torch.tensor([[10.0, 10.0], [10.0, 10.0]])
    target = torch.tensor([[15.0, float("nan")], [10.0, 10.0]])
    plain = change_focused_loss(pred, target, torch.ones(2, 2))
    focused = change_focused_loss(pred, target, torch.tensor([[5.0, 1.0], [1.0, 1.0]]))
    assert torch.isfinite(plain) and focused > plain


def test_truncated_or_corrupt_dataset_is_a_dataset_error(tiny, tmp_path):
    """A zip cut short or with a damaged member raised zipfile.BadZipFile / zlib.error, not DatasetError."""
    save(tmp_path / "d.npz", tiny)
    whole = (tmp_path / "d.npz").read_bytes()
    flipped = bytearray(whole)
    flipped[len(whole) // 2] ^= 0xFF
    for name, blob in (("cut.npz", whole[:3000]), ("flipped.npz", bytes(flipped))):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(DatasetError, match="not a latency dataset"):
            load(tmp_path / name)


def test_save_never_leaves_a_truncated_file(tiny, tmp_path, monkeypatch):
    """An interrupted save wrote half a zip under the final name; now the old file (or none) stays."""
    path = tmp_path / "d.npz"
    save(path, tiny)
    before = path.read_bytes()

    def interrupted(fh, **arrays):
        fh.write(b"PK\x03\x04 half an archive")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez_compressed", interrupted)
    for target in (path, tmp_path / "new.npz"):
        with pytest.raises(KeyboardInterrupt):
            save(target, tiny)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["d.npz"]  # no new.npz, no temporary file left


def test_summary_without_known_latencies_is_nan_without_numpy_warnings():
    """A run where nothing got through printed three numpy RuntimeWarnings before its NaN summary."""
    data = {c: np.full(5, np.nan) for c in COLUMNS}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = summary(data)
    assert s["packets"] == 5 and s["lost"] == 5
    assert all(math.isnan(s[k]) for k in ("l_mean_ms", "c_mean_ms", "l_p99_ms", "c_p99_ms"))


def test_training_needs_a_point_left_after_the_validation_split(tiny, tmp_path):
    """One prediction point in all went to validation and left torch an empty schedule ("total_steps")."""
    from tokenwire.predictor.train import load_points

    k = int(np.flatnonzero(tiny["n_acked"] >= 33)[0])  # the first send with a 32-ack window
    one = {c: tiny[c][:k + 1] for c in COLUMNS}
    one["meta"] = tiny["meta"]
    save(tmp_path / "one.npz", one)
    assert len(points(load(tmp_path / "one.npz"), 32)) == 1
    with pytest.raises(DatasetError, match=r"1 prediction point.* none left for training"):
        load_points([str(tmp_path / "one.npz")], 32, 0.2, log=lambda _: None)


def test_cross_spec_refuses_tcp_it_cannot_model():
    """tcp:bbr (and any tcp:CC) was silently run as the Reno model."""
    assert [i.kind for i in parse_cross_spec("tcp:reno+tcp:cubic")] == ["reno", "reno"]
    for bad, says in (("tcp:bbr", "no BBR sender"), ("tcp:vegas", "unknown congestion control 'vegas'"),
                      ("tcp", "tcp needs :CC")):
        with pytest.raises(CrossSpecError, match=says) as exc:
            parse_cross_spec(f"reno+{bad}")
        assert "supported: reno, scalable, cbr-l, cbr-c; aliases tcp:reno|tcp:cubic" in str(exc.value)


def test_malformed_dataset_files_are_dataset_errors(tiny, tmp_path):
    """meta that is JSON but not an object (AttributeError), 0-d columns (IndexError), and an n_acked beyond
    the ack log (IndexError deep in the harness) got through load()."""
    def write(name, **change):
        arrays = {c: np.asarray(tiny[c], dtype=np.float64) for c in COLUMNS}
        arrays["meta"] = np.array(tiny["meta"])
        arrays.update(change)
        np.savez(tmp_path / name, **arrays)
        return tmp_path / name

    n_acks = int(np.count_nonzero(~np.isnan(tiny["ack_at"])))
    big = np.asarray(tiny["n_acked"], dtype=np.float64).copy()
    big[5] = n_acks + 1
    for path, says in (
            (write("list.npz", meta=np.array("[1, 2]")), "meta is a JSON list, not an object"),
            (write("scalar.npz", sent_at=np.array(1.0)), "columns must be 1-D arrays: sent_at ()"),
            (write("table.npz", ce=np.zeros((3, 3))), "columns must be 1-D arrays: ce (3, 3)"),
            (write("acked.npz", n_acked=big), f"n_acked[5] = {n_acks + 1} is not a count of the {n_acks} acks"),
            (write("neg.npz", n_acked=-np.ones_like(big)), "n_acked[0] = -1 is not a count"),
            (write("frac.npz", n_acked=big * 0 + 0.5), "n_acked[0] = 0.5 is not a count")):
        with pytest.raises(DatasetError, match=re.escape(says)):
            load(path)
    assert len(points(load(write("ok.npz")), 64)) > 0  # the unchanged arrays still load


@pytest.mark.parametrize(("doc", "says"), [
    ([1], "expected an object with 'ridge' and 'coef'"),
    ({"bad": 1}, "expected an object with 'ridge' and 'coef'"),
    ({"ridge": 0.001, "coef": None}, "coef is null"),
    ({"ridge": 0.001, "coef": [[1, 2], [3, 4]]}, "coef has shape (2, 2)"),
    ({"ridge": 0.001, "coef": [1, 2, 3]}, "coef has shape (3,)"),
    ({"ridge": 0.001, "coef": [["a", "b"]] * 19}, "coef is not a numeric matrix"),
    ({"ridge": 0.001, "coef": [[math.inf, 0.0]] * 19}, "coef holds NaN or infinite values"),
])
def test_ar_coefficients_are_checked_when_loaded(doc, says):
    """A null or mis-shaped coef loaded fine and failed in the middle of eval ("LinearAR.predict before
    fit", a matmul shape error)."""
    with pytest.raises(ValueError, match=re.escape(says)):
        LinearAR.from_dict(doc)
