"""Train the KV channel's bandwidth forecaster (torch, offline) and export it to ONNX.

Run: ``python -m tokenwire.predictor.bandwidth_train --traces ../shared/traces --out predictor/models``.

Data: chunk-throughput series replayed on the mahimahi traces. A backlogged sender moves chunks of ``B`` bytes
(one size per series, drawn log-uniformly, each chunk varied by ±35 % as levels change) back to back from a
random start; each chunk's sample is (bytes, seconds between its first opportunity and its last). The target
is the throughput over the next :data:`HORIZON` chunks. Train and test are split **by trace**: the held-out
traces never contribute a sample to training.

Model: an MLP (25 -> 64 -> 64 -> 2) with pinball loss for the median and the 10 % quantile of
log(future rate / newest rate). Compared on the held-out traces with the last value and EWMAs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

from tokenwire.daemon.cli import seed_arg
from tokenwire.testbed.trace import OPPORTUNITY_BYTES, Trace, load_trace

from .bandwidth import HORIZON, MODEL_FILE, N_FEATURES, QUANTILES, WINDOW, features

TEST_TRACES = ("TMobile-UMTS-driving.down", "Verizon-LTE-short.down")


def chunk_series(trace: Trace, start_ms: float, sizes: list[int]) -> list[tuple[int, float]]:
    """(bytes, seconds) of chunks of ``sizes`` sent back to back from ``start_ms`` over ``trace``."""
    out = []
    t = start_ms
    for b in sizes:
        k = trace.first_index_after(t)
        n = -(-b // OPPORTUNITY_BYTES)
        end = trace.opportunity_ms(k + n - 1)
        out.append((b, max(end - t, 1.0) / 1000.0))
        t = end
    return out


def examples(trace: Trace, n_series: int, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    length = WINDOW + HORIZON + 8
    for _ in range(n_series):
        base = math.exp(rng.uniform(math.log(24_000), math.log(1_500_000)))
        sizes = [max(1500, int(base * rng.uniform(0.65, 1.35))) for _ in range(length)]
        ser = chunk_series(trace, rng.uniform(0, trace.period_ms), sizes)
        rates = np.array([b * 8 / s for b, s in ser])
        durs = np.array([s for _, s in ser])
        for k in range(1, length - HORIZON + 1):
            fut = ser[k : k + HORIZON]
            target = sum(b for b, _ in fut) * 8 / sum(s for _, s in fut)
            xs.append(features(rates[:k], durs[:k]))
            ys.append(math.log(max(target, 1.0) / max(rates[k - 1], 1.0)))
    return np.stack(xs), np.array(ys, np.float32)


def baselines(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Log-error MAE of the last value and of EWMAs, recomputed from the features (same histories)."""
    out: dict[str, float] = {"last_value": float(np.mean(np.abs(y)))}
    logr = x[:, :WINDOW]  # log(rate_j / newest); 0 where padded
    mask = x[:, 2 * WINDOW : 3 * WINDOW]
    for alpha in (0.3, 0.5):
        est = np.zeros(len(x))
        seen = np.zeros(len(x), bool)
        for j in range(WINDOW):
            r = np.exp(logr[:, j])
            m = mask[:, j] > 0
            est = np.where(m & seen, alpha * r + (1 - alpha) * est, np.where(m, r, est))
            seen |= m
        out[f"ewma_{alpha}"] = float(np.mean(np.abs(y - np.log(est))))
        out[f"ewma_{alpha}_x0.75_below_target"] = float(np.mean(np.log(0.75 * est) <= y))
    return out


def build_model():
    """The forecaster: an MLP from the features to (median, 10 % quantile) of log(future / newest rate)."""
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(N_FEATURES, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
        torch.nn.Linear(64, len(QUANTILES)),
    )


def export_onnx(model, path: str | Path) -> None:
    """ONNX with a dynamic batch axis (what :class:`~tokenwire.predictor.bandwidth.OnnxRunner` loads)."""
    import torch

    from tokenwire.daemon.cli import output_file

    model.eval()
    with output_file(path) as tmp:  # an interrupted export leaves the old model, never half of one
        torch.onnx.export(model, (torch.zeros(1, N_FEATURES),), str(tmp), input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
                          opset_version=17, dynamo=False)


def train(args: argparse.Namespace) -> dict:
    import torch

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    rng = random.Random(args.seed)
    if not Path(args.traces).is_dir():
        raise SystemExit(f"--traces {args.traces}: not a folder of .down/.up traces")
    files = sorted(p for p in Path(args.traces).iterdir() if p.suffix in (".down", ".up"))
    train_files = [p for p in files if p.name not in TEST_TRACES]
    test_files = [p for p in files if p.name in TEST_TRACES]
    if not train_files or not test_files:
        raise SystemExit(f"need traces for both splits in {args.traces}")
    print(f"train: {[p.name for p in train_files]}\ntest:  {[p.name for p in test_files]}", file=sys.stderr)
    parts = [examples(load_trace(p), args.series, rng) for p in train_files]
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    tparts = {p.name: examples(load_trace(p), max(200, args.series // 3), rng) for p in test_files}
    xte = np.concatenate([p[0] for p in tparts.values()])
    yte = np.concatenate([p[1] for p in tparts.values()])
    print(f"{len(xtr)} training and {len(xte)} test examples", file=sys.stderr)

    model = build_model()
    q = torch.tensor(QUANTILES)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)[:, None]
    t0 = time.monotonic()
    for step in range(args.steps):
        idx = torch.randint(0, len(xt), (1024,))
        err = yt[idx] - model(xt[idx])
        loss = torch.maximum(q * err, (q - 1) * err).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0:
            print(f"step {step}/{args.steps} pinball {loss.item():.4f} ({time.monotonic() - t0:.0f} s)",
                  file=sys.stderr)
    model.eval()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    export_onnx(model, out_dir / MODEL_FILE)
    with torch.no_grad():
        pred = model(torch.from_numpy(xte)).numpy()
    report = {
        "train_traces": [p.name for p in train_files],
        "test_traces": [p.name for p in test_files],
        "train_examples": len(xtr),
        "test_examples": len(xte),
        "parameters": sum(p.numel() for p in model.parameters()),
        "test_log_mae": {"onnx_median": float(np.mean(np.abs(yte - pred[:, 0]))), **baselines(xte, yte)},
        "test_low_quantile_below_target": float(np.mean(pred[:, 1] <= yte)),
        "per_test_trace": {},
    }
    for name, (x, y) in tparts.items():
        with torch.no_grad():
            p = model(torch.from_numpy(x)).numpy()
        report["per_test_trace"][name] = {"onnx_median": float(np.mean(np.abs(y - p[:, 0]))),
                                          **baselines(x, y), "low_below_target": float(np.mean(p[:, 1] <= y))}
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tokenwire.predictor.bandwidth_train",
                                 description=__doc__.split("\n\n")[0])
    # the shared traces beside the source tree (../shared/traces from the repository), wherever it is checked out
    ap.add_argument("--traces", default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "traces"),
                    help="the folder of cellular *.down traces (default: ../shared/traces beside the source tree)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "shipped"),
                    help="where bandwidth.onnx goes (default: the package's shipped/ folder, replacing its model)")
    ap.add_argument("--series", type=int, default=1500, help="series per training trace")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--seed", type=seed_arg, default=0, help="an integer from 0 to 2**32 - 1 (default: 0)")
    ap.add_argument("--json", help="write the evaluation report here")
    args = ap.parse_args(argv)
    # an installed copy has no ../shared/traces, nor torch without the ml extra: one line each, before any work
    if not Path(args.traces).is_dir():
        ap.error(f"--traces: {args.traces} is not a folder of traces (run from the source tree, or name one)")
    if importlib.util.find_spec("torch") is None:
        from tokenwire.daemon.cli import EXTRA_INSTALL

        ap.error(f"needs torch, from the 'ml' extra: {EXTRA_INSTALL['ml']}")
    report = train(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        from tokenwire.daemon.cli import save_json

        save_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
