"""``tokenwire bench predictor``: cost of a latency prediction on one core, against the 17 k packets/s target.

Measures, in one process pinned to one onnxruntime thread, the shipped model (or ``--model``) and the EWMA
forecaster in the same run:

* µs per inference call and predictions/s at batch sizes 1, 8 and 64 (``predict_batch``: one call answers
  for ``batch`` packets leaving together);
* ``observe`` cost per ack (the ring buffer), and the packet rate one core sustains when the sender
  (a) observes every ack and predicts for every packet (per-ack marking) and
  (b) observes every ack and predicts once per burst of ``batch`` packets;
* (c) observes every ack and runs one single-row prediction per burst of n packets that leave together,
  reusing it for the whole burst (they share the same ack history; only their staleness differs by the
  burst's duration);
* the target: 200 Mbit/s of 1500-byte packets = 16 667 packets/s.

Medians of ``--repeats`` timed runs; the machines are shared, so the EWMA numbers of the same run are the
yardstick: the JSON records ``calls`` and ``repeats`` and the ONNX/EWMA ratios (``onnx_vs_ewma``).

EWMA answers a burst with one ``predict()``: its estimate does not depend on the send time, so batch n costs
one prediction. Its ``predict_batch`` (``predict`` + ``np.tile``) timed numpy's array handling instead (7 µs
at batch 8, more than the prediction itself 40 times over), which the table showed as EWMA's batch cost.
Its batch 8 and 64 entries are therefore batch 1's timing, not measurements of their own: each says
``"derived": true`` and has no ``calls`` (measured entries say ``"derived": false``).
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runtime import OnnxLatencyForecaster

TARGET_PPS = 200e6 / (1500 * 8)
BATCHES = (1, 8, 64)


def batch_calls(calls: int, batch: int) -> int:
    """Inference calls per measurement at a batch of ``batch`` > 1: max(4 x calls / B, 50), rounded down, as
    ``--help`` says (the code computed calls // B x 4: 124 calls at batch 64 where the help promised 125)."""
    return max(4 * calls // batch, 50)


def register(sub: argparse._SubParsersAction) -> None:
    from tokenwire.daemon.cli import positive_int

    p = sub.add_parser("predictor", help="µs per latency prediction (ONNX vs EWMA), batch 1/8/64, vs 17k pkt/s")
    p.add_argument("--model", help="ONNX model (default: the shipped one)")
    p.add_argument("--calls", type=positive_int, default=2000,
                   help="inference calls per measurement of batch 1 and of observe (default 2000); a batch of B "
                        "makes max(4 x calls / B, 50) calls, each B predictions (the JSON records each count); "
                        "EWMA's batches 8 and 64 make none: one predict() answers a burst, so they are batch 1's "
                        "time, marked derived")
    p.add_argument("--repeats", type=positive_int, default=5, help="measurements; medians are reported (default 5)")
    p.add_argument("--json", type=Path, help="write results here")
    p.set_defaults(handler=run_cli)


def _samples(n: int) -> list:
    from tokenwire.transport.marking import LatencySample

    out = []
    t = 0.0
    for i in range(n):
        t += 0.0006
        lat = 20.0 + 10.0 * ((i * 7919) % 13) / 13
        out.append(LatencySample(sent_at=t - lat / 1000 - 0.01, ack_at=t, latency_ms=lat, size=1500,
                                 queue_l=i % 4 != 0, ce=i % 9 == 0))
    return out


def _history(forecaster: Any) -> tuple[list, float]:
    """Feed ``forecaster`` the benchmark's ack history; (the samples, the time its predictions are asked for)."""
    samples = _samples(256)
    for s in samples:
        forecaster.observe(s)
    return samples, samples[-1].ack_at + 0.001


def _burst(now: float, batch: int) -> list[float]:
    """Send times of a burst of ``batch`` packets leaving at ``now``."""
    return [now + 1e-5 * i for i in range(batch)]


def model_failure(forecaster: OnnxLatencyForecaster) -> str | None:
    """Why the ONNX ``forecaster`` raises on the windows :func:`measure` times (each call it makes once, on a
    history of its own), or None when it runs.

    The model loaded (its trial on zeros passed) but may fail on real windows: measure() then ended in
    onnxruntime's traceback and exit 1, where a model that does not load is one line and exit 2."""
    probe = forecaster.fresh()
    _, now = _history(probe)
    try:
        probe.predict(now)
        for bs in BATCHES:
            probe.predict_batch(_burst(now, bs))
    except Exception as exc:  # onnxruntime's own untyped exceptions
        return f"{type(exc).__name__}: {str(exc).strip()[:200]}"
    return None


def _median_time(fn, calls: int, repeats: int) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` runs of ``calls`` calls."""
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t0) / calls)
    return statistics.median(runs)


def _phase(what: str) -> None:
    """One progress line per phase on stderr, as ``bench emulator`` prints: the default run takes ~20 s, and it
    used to print nothing until the whole table."""
    print(f"  {what} ...", file=sys.stderr, flush=True)


BATCH_BY_PREDICT_BATCH = "predict_batch(): one inference call for the burst"
BATCH_BY_ONE_PREDICT = "one predict() answers the burst (the estimate does not depend on the send time)"
DERIVED_FROM_BATCH_1 = "batch 1's timed predict(), which answers the whole burst; not timed at this batch"


def measure(forecaster, calls: int, repeats: int, progress: Callable[[str], None] | None = None, *,
            one_predict_per_batch: bool = False) -> dict:
    """The numbers of one forecaster; ``progress`` is told each phase (a batch size, the observe cost) first.

    ``one_predict_per_batch``: a batch costs one ``predict()`` (EWMA), not a timed ``predict_batch()``; its
    entries above batch 1 are batch 1's time, marked ``"derived": true`` and without ``calls``.
    """
    samples, now = _history(forecaster)
    res: dict = {"batches": {},
                 "batch_method": BATCH_BY_ONE_PREDICT if one_predict_per_batch else BATCH_BY_PREDICT_BATCH}
    single = math.nan
    for bs in BATCHES:  # (batch 1 first: the others may reuse it)
        if progress:
            progress(f"batch {bs}")
        entry: dict[str, Any]
        if bs == 1:
            single = per_call = _median_time(lambda: forecaster.predict(now), calls, repeats)
            entry = {"derived": False, "calls": calls}
        elif one_predict_per_batch:
            # batch 1's predict() answers the whole burst: nothing is timed here, and the entry says so. It used to
            # sit in the same fields as the measured ones, with batch 1's ``calls`` (not max(4 x calls / B, 50))
            per_call = single
            entry = {"derived": True, "derived_from": DERIVED_FROM_BATCH_1}
        else:
            nows = _burst(now, bs)
            n_calls = batch_calls(calls, bs)
            per_call = _median_time(lambda nows=nows: forecaster.predict_batch(nows), n_calls, repeats)
            entry = {"derived": False, "calls": n_calls}
        res["batches"][str(bs)] = {"us_per_call": per_call * 1e6, "us_per_prediction": per_call * 1e6 / bs,
                                   "predictions_per_s": bs / per_call, **entry}
    if progress:
        progress("observe per ack")
    it = itertools.cycle(samples)
    obs = _median_time(lambda: forecaster.observe(next(it)), calls, repeats)
    res["us_per_observe"] = obs * 1e6
    per_ack = obs + res["batches"]["1"]["us_per_call"] / 1e6
    res["per_ack_pps"] = 1.0 / per_ack  # every packet: one ack observed, one prediction
    res["per_batch_pps"] = {str(bs): 1.0 / (obs + res["batches"][str(bs)]["us_per_call"] / 1e6 / bs)
                            for bs in BATCHES}
    # one predict() per burst of n packets, its answer reused for the whole burst (same history)
    one = res["batches"]["1"]["us_per_call"] / 1e6
    res["per_burst_pps"] = {str(n): n / (n * obs + one) for n in (1, 8, 16, 32, 64)}
    return res


def ratios(onnx: dict, ewma: dict) -> dict:
    """ONNX against the same run's EWMA (the yardstick on a shared machine): time ratios > 1 = ONNX slower."""
    return {
        "us_per_prediction": {bs: onnx["batches"][bs]["us_per_prediction"] / ewma["batches"][bs]["us_per_prediction"]
                              for bs in onnx["batches"]},
        "us_per_observe": onnx["us_per_observe"] / ewma["us_per_observe"],
        "per_ack_pps": onnx["per_ack_pps"] / ewma["per_ack_pps"],
    }


def run_cli(args: argparse.Namespace) -> int:
    from tokenwire.predictor.runtime import EwmaLatencyForecaster, ModelError, load_forecaster, shipped_model_path
    from tokenwire.testbed.cli import sigterm_as_ctrl_c

    from .cli import check_output

    if args.json:  # before the run: the results would replace the model they were measured on
        check_output("--json", args.json, [("the --model", args.model or shipped_model_path())])
    from tokenwire.daemon.cli import CLIError

    try:
        onnx_fc = load_forecaster(args.model)
    except ModelError as exc:
        raise CLIError(str(exc)) from None
    failure = model_failure(onnx_fc)
    if failure is not None:
        raise CLIError(f"{onnx_fc.path}: inference failed on a real window ({failure}); the daemon would mark like "
                       "l4s with this model")
    doc: dict[str, Any] = {"target_pps": TARGET_PPS, "model": onnx_fc.path, "window": onnx_fc.window,
                           "calls": args.calls, "repeats": args.repeats, "statistic": "median of the repeats"}
    batched = ", ".join(f"batch {bs}: {batch_calls(args.calls, bs)}" for bs in BATCHES if bs > 1)
    print(f"bench predictor: {args.calls} calls ({batched}) x {args.repeats} repeats per phase, the ONNX model "
          "then EWMA", file=sys.stderr, flush=True)
    # SIGTERM or SIGHUP (kill, a timeout, a closed terminal) takes Ctrl-C's path, "interrupted" and exit 130: it
    # died silently with 143
    with sigterm_as_ctrl_c():
        for name, fc in (("onnx", onnx_fc), ("ewma", EwmaLatencyForecaster())):
            def progress(what: str, name: str = name) -> None:  # (the default binds this forecaster's name, B023)
                _phase(f"{name}: {what}")

            doc[name] = measure(fc, args.calls, args.repeats, progress, one_predict_per_batch=name == "ewma")
    doc["onnx_vs_ewma"] = ratios(doc["onnx"], doc["ewma"])
    head = f"{'forecaster':<10} {'batch':>5} {'µs/call':>9} {'µs/pred':>9} {'pred/s':>10}"
    lines = [f"{head} {'pkt/s (observe+pred)':>21}"]
    for name in ("onnx", "ewma"):
        r = doc[name]
        for bs in BATCHES:
            b = r["batches"][str(bs)]
            lines.append(f"{name:<10} {bs:>5} {b['us_per_call']:>9.1f} {b['us_per_prediction']:>9.2f} "
                         f"{b['predictions_per_s']:>10.0f} {r['per_batch_pps'][str(bs)]:>21.0f}"
                         + ("  (derived from batch 1, not timed)" if b["derived"] else ""))
        lines.append(f"{name:<10} observe {r['us_per_observe']:.2f} µs/ack; per-ack marking sustains "
                     f"{r['per_ack_pps']:.0f} pkt/s ({r['per_ack_pps'] / TARGET_PPS:.2f}x the {TARGET_PPS:.0f} target)")
        lines.append(f"{name:<10} one prediction per burst of n packets: " + ", ".join(
            f"n={n} {pps:.0f} pkt/s" for n, pps in r["per_burst_pps"].items()))
    lines.append(f"ewma batch n: {BATCH_BY_ONE_PREDICT}")
    rat = doc["onnx_vs_ewma"]
    lines.append("onnx/ewma (same run): µs per prediction " + ", ".join(
        f"batch {bs} {rat['us_per_prediction'][str(bs)]:.0f}x" for bs in BATCHES)
        + f"; observe {rat['us_per_observe']:.1f}x; per-ack pkt/s {rat['per_ack_pps']:.3g}x")
    # with --json -, stdout is the JSON document alone (parseable); the table goes to stderr
    print("\n".join(lines))  # with --json -: on stderr (cli.main)
    if args.json:
        from tokenwire.daemon.cli import save_json

        save_json(args.json, doc)
        if str(args.json) != "-":
            print(f"wrote {args.json}", file=sys.stderr)
    return 0
