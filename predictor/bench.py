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

The yardstick is only one if both sides see the same machine. Each repeat times ONNX and EWMA back to back, phase
by phase (in alternating order), and EWMA makes enough calls to run about as long as ONNX did on the same phase
(:func:`baseline_calls`, from a calibration round that is also the warm-up, left out of the results). Run one
forecaster after the other, with EWMA's 2 000 calls lasting 0.2 ms against ONNX's 0.5 s, a preemption hit ONNX
alone and the ratio swung from 2 503x to 4 007x over five runs. Each entry keeps every repeat
(``us_per_call_runs``) and their range, and ``onnx_vs_ewma_runs`` the ratio of each repeat with its range.

EWMA answers a burst with one ``predict()``: its estimate does not depend on the send time, so batch n costs
one prediction. Its ``predict_batch`` (``predict`` + ``np.tile``) timed numpy's array handling instead (7 µs
at batch 8, more than the prediction itself 40 times over), which the table showed as EWMA's batch cost.
Its batch 8 and 64 entries are therefore batch 1's timing, not measurements of their own: each says
``"derived": true`` and has no ``calls`` (measured entries say ``"derived": false``).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenwire.daemon.bench_cli import spread

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

    p = sub.add_parser(
        "predictor", help="µs per latency prediction (ONNX vs EWMA), batch 1/8/64, vs 17k pkt/s",
        description="Times the SwiftQueue latency model (onnxruntime, one thread) and the EWMA forecaster back to "
        "back on one core: microseconds per prediction at batches of 1, 8 and 64, the cost of observing an ack, "
        "and the packet rate one core sustains when it predicts per packet or per burst, against the target of "
        "200 Mbit/s of 1500-byte packets (16,667 packets/s). Medians of --repeats; EWMA in the same run is the "
        "yardstick.",
    )
    p.add_argument("--model", help="ONNX model (default: the shipped one)")
    p.add_argument("--calls", type=positive_int, default=2000,
                   help="inference calls per measurement of batch 1 and of observe (default: 2000); a batch of B "
                        "makes max(4 x calls / B, 50) calls, each B predictions (the JSON records each count); "
                        "EWMA's batches 8 and 64 make none: one predict() answers a burst, so they are batch 1's "
                        "time, marked derived")
    p.add_argument("--repeats", type=positive_int, default=5, help="measurements; medians are reported (default: 5)")
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
    history of its own), as the one line to exit with, or None when it runs.

    The model loaded (its trial on zeros passed) but may fail on real windows: measure() then ended in
    onnxruntime's traceback and exit 1, where a model that does not load is one line and exit 2. One that fails
    only at a batch above 1 (a batch axis fixed at 1) was said to make the daemon mark like l4s, which it does
    not: the daemon asks one window at a time."""
    from .runtime import inference_failure

    probe = forecaster.fresh()
    _, now = _history(probe)
    try:
        probe.predict(now)
    except Exception as exc:  # onnxruntime's own untyped exceptions
        return (f"{forecaster.path}: inference failed on a real window ({type(exc).__name__}: "
                f"{str(exc).strip()[:200]}); the daemon would mark like l4s with this model")
    for bs in BATCHES:
        try:
            probe.predict_batch(_burst(now, bs))
        except Exception as exc:
            return (f"{inference_failure(forecaster, bs, exc=exc)}; the daemon, which asks one window at a time, "
                    "runs it, but no batch can be timed")
    return None


Clock = Callable[[], float]
_clock: Clock = time.perf_counter
"""The clock every phase is timed with (a test swaps in a fake one)."""


def _time_per_call(fn: Callable[[], Any], calls: int, clock: Clock | None = None) -> float:
    """Seconds per call of ``fn`` over ``calls`` calls."""
    clock = clock or _clock
    t0 = clock()
    for _ in range(calls):
        fn()
    return (clock() - t0) / calls


def _phase(what: str) -> None:
    """One progress line per phase on stderr, as ``bench emulator`` prints: the default run takes ~20 s, and it
    used to print nothing until the whole table."""
    print(f"  {what} ...", file=sys.stderr, flush=True)


BATCH_BY_PREDICT_BATCH = "predict_batch(): one inference call for the burst"
BATCH_BY_ONE_PREDICT = "one predict() answers the burst (the estimate does not depend on the send time)"
DERIVED_FROM_BATCH_1 = "batch 1's timed predict(), which answers the whole burst; not timed at this batch"
OBSERVE = "observe"
MAX_BASELINE_CALLS = 5_000_000
"""Upper bound on a baseline phase's calls (~0.5 s of EWMA's 0.1-µs predict): a subject much slower than ONNX
would otherwise have EWMA spin for minutes."""


def _phases(forecaster: Any, calls: int, one_predict_per_batch: bool) -> dict[str, tuple[Callable[[], Any], int]]:
    """The timed phases of ``forecaster``, in order: batch sizes ("1", "8", "64"; EWMA's above 1 are not timed) and
    ``observe``; each its call and its number of calls per measurement."""
    samples, now = _history(forecaster)
    out: dict[str, tuple[Callable[[], Any], int]] = {"1": (lambda: forecaster.predict(now), calls)}
    if not one_predict_per_batch:
        for bs in BATCHES[1:]:
            nows = _burst(now, bs)
            out[str(bs)] = (functools.partial(forecaster.predict_batch, nows), batch_calls(calls, bs))
    it = itertools.cycle(samples)
    out[OBSERVE] = (lambda: forecaster.observe(next(it)), calls)
    return out


def baseline_calls(subject_s: float, baseline_s: float, floor: int) -> int:
    """Calls of a baseline phase so that it runs about as long as the subject's (``subject_s`` seconds in all,
    against ``baseline_s`` per baseline call), at least ``floor`` and at most :data:`MAX_BASELINE_CALLS`."""
    if baseline_s <= 0 or not math.isfinite(subject_s / baseline_s):
        return max(floor, 1)
    return int(min(MAX_BASELINE_CALLS, max(floor, round(subject_s / baseline_s))))


def _order(repeat: int) -> tuple[int, int]:
    """Subject first on even repeats, baseline first on odd ones: a drift of the machine's speed during a repeat
    does not always favour the same side."""
    return (0, 1) if repeat % 2 == 0 else (1, 0)


def _interleaved(sides: list[dict[str, tuple[Callable[[], Any], int]]], repeats: int,
                 progress: Callable[[str], None] | None, clock: Clock | None) -> list[dict[str, list[float]]]:
    """Seconds per call of each side's phases, ``repeats`` times: each repeat times every phase of side 0 next to
    the same phase of side 1 (when it has it), in :func:`_order`."""
    runs: list[dict[str, list[float]]] = [{key: [] for key in side} for side in sides]
    for r in range(repeats):
        if progress:
            progress(f"repeat {r + 1}/{repeats}" + (": every phase of both, side by side" if len(sides) > 1 else ""))
        for key in sides[0]:
            for i in _order(r) if len(sides) > 1 else (0,):
                if key in sides[i]:
                    fn, n = sides[i][key]
                    runs[i][key].append(_time_per_call(fn, n, clock))
    return runs


def _result(runs: dict[str, list[float]], calls: dict[str, int], one_predict_per_batch: bool) -> dict[str, Any]:
    """A forecaster's entry of the JSON from its per-repeat seconds per call (``runs``) and ``calls`` per phase."""
    res: dict[str, Any] = {"batches": {},
                           "batch_method": BATCH_BY_ONE_PREDICT if one_predict_per_batch else BATCH_BY_PREDICT_BATCH}
    for bs in BATCHES:
        entry: dict[str, Any]
        if str(bs) in runs:
            rs = runs[str(bs)]
            per_call = statistics.median(rs)
            entry = {"derived": False, "calls": calls[str(bs)], "us_per_call_runs": [x * 1e6 for x in rs],
                     "us_per_call_min": min(rs) * 1e6, "us_per_call_max": max(rs) * 1e6}
        else:
            # batch 1's predict() answers the whole burst: nothing is timed here, and the entry says so. It used to
            # sit in the same fields as the measured ones, with batch 1's ``calls`` (not max(4 x calls / B, 50))
            per_call = statistics.median(runs["1"])
            entry = {"derived": True, "derived_from": DERIVED_FROM_BATCH_1}
        res["batches"][str(bs)] = {"us_per_call": per_call * 1e6, "us_per_prediction": per_call * 1e6 / bs,
                                   "predictions_per_s": bs / per_call, **entry}
    obs = statistics.median(runs[OBSERVE])
    res["us_per_observe"] = obs * 1e6
    res["observe_calls"] = calls[OBSERVE]
    res["us_per_observe_runs"] = [x * 1e6 for x in runs[OBSERVE]]
    one = res["batches"]["1"]["us_per_call"] / 1e6
    res["per_ack_pps"] = 1.0 / (obs + one)  # every packet: one ack observed, one prediction
    res["per_batch_pps"] = {str(bs): 1.0 / (obs + res["batches"][str(bs)]["us_per_call"] / 1e6 / bs)
                            for bs in BATCHES}
    # one predict() per burst of n packets, its answer reused for the whole burst (same history)
    res["per_burst_pps"] = {str(n): n / (n * obs + one) for n in (1, 8, 16, 32, 64)}
    return res


def measure(forecaster: Any, calls: int, repeats: int, progress: Callable[[str], None] | None = None, *,
            one_predict_per_batch: bool = False, clock: Clock | None = None) -> dict:
    """The numbers of one forecaster alone (no baseline beside it); ``progress`` is told each repeat first.

    ``one_predict_per_batch``: a batch costs one ``predict()`` (EWMA), not a timed ``predict_batch()``; its
    entries above batch 1 are batch 1's time, marked ``"derived": true`` and without ``calls``.
    """
    phases = _phases(forecaster, calls, one_predict_per_batch)
    runs = _interleaved([phases], repeats, progress, clock)[0]
    return _result(runs, {k: n for k, (_, n) in phases.items()}, one_predict_per_batch)


PHASE_NAMES = {OBSERVE: "observe per ack", **{str(bs): f"batch {bs}" for bs in BATCHES}}


def measure_pair(subject: Any, baseline: Any, calls: int, repeats: int,
                 progress: Callable[[str], None] | None = None, *, names: tuple[str, str] = ("onnx", "ewma"),
                 clock: Clock | None = None) -> tuple[dict, dict]:
    """The numbers of ``subject`` (ONNX: every batch timed) and of ``baseline`` (EWMA: one predict() per burst),
    timed side by side in each repeat (:func:`_interleaved`).

    First a calibration round (also the warm-up, not in the results) times each phase the two share (batch 1,
    observe) with ``calls`` calls; the baseline's phases then make :func:`baseline_calls` calls each, so that a
    preemption or a slower spell of the shared machine lands on both sides alike.
    """
    subj = _phases(subject, calls, False)
    base = _phases(baseline, calls, True)
    for key, (b_fn, b_n) in base.items():  # (only the phases with a baseline: the default run stays under ~1 min)
        if progress:
            progress(f"{names[0]}: {PHASE_NAMES[key]} and {names[1]}: {PHASE_NAMES[key]} (calibration and warm-up)")
        fn, n = subj[key]
        subject_s = _time_per_call(fn, n, clock) * n
        base[key] = (b_fn, baseline_calls(subject_s, _time_per_call(b_fn, b_n, clock), b_n))
    runs = _interleaved([subj, base], repeats, progress, clock)
    return (_result(runs[0], {k: n for k, (_, n) in subj.items()}, False),
            _result(runs[1], {k: n for k, (_, n) in base.items()}, True))


def onnx_threads(forecaster: Any) -> dict[str, Any]:
    """The threads onnxruntime's session runs on, as the session itself reports them (None where unknown): the
    table's "one core" holds only while both are 1."""
    session = getattr(forecaster, "_session", None)
    try:
        opts = session.get_session_options()  # type: ignore[union-attr]
        return {"intra_op": opts.intra_op_num_threads, "inter_op": opts.inter_op_num_threads,
                "execution_mode": str(opts.execution_mode), "providers": session.get_providers()}  # type: ignore[union-attr]
    except AttributeError:
        return {"intra_op": None, "inter_op": None, "execution_mode": None, "providers": None}


def ratio_runs(onnx: dict, ewma: dict) -> dict[str, Any]:
    """The ONNX/EWMA ratio of each repeat (the two sides were timed back to back in it), median and range: the
    spread of the ratio itself, where the medians' ratio hides it."""
    e1 = ewma["batches"]["1"]["us_per_call_runs"]
    pred = {}
    for bs in BATCHES:
        b = onnx["batches"][str(bs)]
        pred[str(bs)] = spread([o / bs / e for o, e in zip(b["us_per_call_runs"], e1, strict=True)], "runs")
    return {"us_per_prediction": pred,
            "us_per_observe": spread([o / e for o, e in zip(onnx["us_per_observe_runs"],
                                                            ewma["us_per_observe_runs"], strict=True)], "runs")}


def ratios(onnx: dict, ewma: dict) -> dict:
    """ONNX against the same run's EWMA (the yardstick on a shared machine): time ratios > 1 = ONNX slower."""
    return {
        "us_per_prediction": {bs: onnx["batches"][bs]["us_per_prediction"] / ewma["batches"][bs]["us_per_prediction"]
                              for bs in onnx["batches"]},
        "us_per_observe": onnx["us_per_observe"] / ewma["us_per_observe"],
        "per_ack_pps": onnx["per_ack_pps"] / ewma["per_ack_pps"],
    }


def _us(x: float) -> str:
    """µs for the table: whole ones from 10 up, three significant digits below (EWMA's 0.1 µs)."""
    return f"{x:,.0f}" if x >= 10 else f"{x:.3g}"


def format_table(doc: dict[str, Any]) -> list[str]:
    """The table's lines for the result document ``doc``."""
    head = f"{'forecaster':<10} {'batch':>5} {'µs/call':>9} {'µs/pred':>9} {'pred/s':>10}"
    lines = [f"{head} {'pkt/s (observe+pred)':>21}"]
    for name in ("onnx", "ewma"):
        r = doc[name]
        for bs in BATCHES:
            b = r["batches"][str(bs)]
            lines.append(f"{name:<10} {bs:>5} {b['us_per_call']:>9.1f} {b['us_per_prediction']:>9.2f} "
                         f"{b['predictions_per_s']:>10.0f} {r['per_batch_pps'][str(bs)]:>21.0f}"
                         + ("  (derived from batch 1, not timed)" if b["derived"] else
                            f"  (min-max over repeats {_us(b['us_per_call_min'])}-{_us(b['us_per_call_max'])})"))
        lines.append(f"{name:<10} observe {r['us_per_observe']:.2f} µs/ack; per-ack marking sustains "
                     f"{r['per_ack_pps']:.0f} pkt/s ({r['per_ack_pps'] / TARGET_PPS:.2f}x the {TARGET_PPS:.0f} target)")
        lines.append(f"{name:<10} one prediction per burst of n packets: " + ", ".join(
            f"n={n} {pps:.0f} pkt/s" for n, pps in r["per_burst_pps"].items()))
    lines.append(f"ewma batch n: {BATCH_BY_ONE_PREDICT}")
    rat = doc["onnx_vs_ewma"]
    runs = doc["onnx_vs_ewma_runs"]["us_per_prediction"]
    lines.append("onnx/ewma (same run): µs per prediction " + ", ".join(
        f"batch {bs} {rat['us_per_prediction'][str(bs)]:.0f}x" for bs in BATCHES)
        + f"; observe {rat['us_per_observe']:.1f}x; per-ack pkt/s {rat['per_ack_pps']:.3g}x")
    lines.append(f"onnx/ewma per repeat (timed side by side): batch 1 {runs['1']['min']:.0f}-{runs['1']['max']:.0f}x; "
                 f"ewma ran {doc['ewma']['batches']['1']['calls']:,} calls per batch-1 measurement against onnx's "
                 f"{doc['onnx']['batches']['1']['calls']:,}")
    return lines


def run_cli(args: argparse.Namespace) -> int:
    from tokenwire.daemon.run_provenance import RunProvenance, run_provenance
    from tokenwire.predictor.runtime import (
        EwmaLatencyForecaster,
        ModelError,
        load_forecaster,
        model_file,
        shipped_model_path,
    )
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
        raise CLIError(failure)
    doc: dict[str, Any] = {"target_pps": TARGET_PPS, "model": onnx_fc.path, "window": onnx_fc.window,
                           "calls": args.calls, "repeats": args.repeats, "statistic": "median of the repeats",
                           "interleaved": True, "onnxruntime_threads": onnx_threads(onnx_fc)}
    batched = ", ".join(f"batch {bs}: {batch_calls(args.calls, bs)}" for bs in BATCHES if bs > 1)
    print(f"bench predictor: {args.calls} calls ({batched}) x {args.repeats} repeats per phase, the ONNX model and "
          "EWMA side by side in each repeat (EWMA's calls last as long)", file=sys.stderr, flush=True)
    started = RunProvenance()
    # SIGTERM or SIGHUP (kill, a timeout, a closed terminal) takes Ctrl-C's path, "interrupted" and exit 130: it
    # died silently with 143
    with sigterm_as_ctrl_c():
        doc["onnx"], doc["ewma"] = measure_pair(onnx_fc, EwmaLatencyForecaster(), args.calls, args.repeats, _phase)
    doc["onnx_vs_ewma"] = ratios(doc["onnx"], doc["ewma"])
    doc["onnx_vs_ewma_runs"] = ratio_runs(doc["onnx"], doc["ewma"])
    # the model's sha256 beside its path, as a testbed swiftqueue JSON has it: a model exported again over that path
    # gave a JSON that read as the same model's timings
    doc["provenance"] = {**run_provenance(started), "model": model_file(onnx_fc)}
    if args.json:  # first: `... --json p.json | head -1` ended the table with a BrokenPipeError, the JSON unwritten
        from tokenwire.daemon.cli import save_json

        save_json(args.json, doc)
        if str(args.json) != "-":
            print(f"wrote {args.json}", file=sys.stderr)
    # with --json -, stdout is the JSON document alone (parseable); the table goes to stderr (cli.main)
    print("\n".join(format_table(doc)))
    return 0
