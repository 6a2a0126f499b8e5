"""``tokenwire predictor ...``: collect datasets, train, export, evaluate the SwiftQueue latency models.

Top level imports argparse only; numpy, torch and onnxruntime load inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tokenwire.daemon.cli import MAX_SEED, repeated, seed_arg
from tokenwire.testbed.cli import ctrl_c_throughout

DEFAULT_WINDOW = 64
"""``train --window``'s default, the shipped models' window: a dataset needs more acks for any point."""


def _err(msg: str) -> Exception:
    from tokenwire.daemon.cli import CLIError

    return CLIError(msg)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# SIGTERM (and SIGHUP) unwinding like Ctrl-C, as the testbed's long commands do: by default a SIGTERM (``timeout``,
# systemd, a batch scheduler) killed ``collect-many`` and ``train`` outright, leaving a new ``--out-dir`` that held
# only an empty index.json/train.json, a temporary file of a write cut short, and no word of what was done; Ctrl-C's
# path cleans up, prints the summary, then "interrupted" (130). The testbed's own decorator, not a copy of it.
_sigterm_as_ctrl_c = ctrl_c_throughout


@contextmanager
def _new_out_dir(out: Path, logs: frozenset[str]) -> Iterator[None]:
    """Remove ``--out-dir`` again (and the folders made for it) when this run made it and fails while it holds
    nothing but this run's own ``logs`` (index.json, train.json): no dataset, no checkpoint.

    The arguments and the input data are checked before anything is written; a failure after that (the first
    dataset's run, a model that diverges at once, Ctrl-C, or SIGTERM: :func:`_sigterm_as_ctrl_c`) left a folder
    holding a log of nothing. A folder that existed before the run is never touched."""
    from tokenwire.daemon.cli import missing_folders, remove_empty_folders

    made = missing_folders(Path(os.path.realpath(out)))
    try:
        yield
    except BaseException:
        if made and made[0].is_dir() and {p.name for p in made[0].iterdir()} <= logs:
            for name in logs:
                (made[0] / name).unlink(missing_ok=True)
            remove_empty_folders(made)
        raise


def file_key(path: str | os.PathLike[str]) -> tuple[int, int] | str:
    """What names one file: its device and inode when it exists (``./x`` and ``x``, a symlink or a hard link to
    it are one file, as :func:`os.path.samefile` says), else its resolved path."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # missing or unreadable: the paths decide
        return os.path.realpath(path)
    return (st.st_dev, st.st_ino)


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether ``a`` and ``b`` name one file (:func:`file_key`)."""
    return file_key(a) == file_key(b)


def check_output(flag: str, out: str | os.PathLike[str], inputs: Iterable[tuple[str, str | os.PathLike[str]]]) -> None:
    """Refuse, in one line and before anything runs, an output path that is one of the command's ``inputs``
    (``(what, path)`` pairs): ``eval --data x.npz --json x.npz``, ``export --checkpoint m.pt --out m.pt`` and
    ``collect --down-trace t --out t`` replaced the input with their output. ``-`` (stdout) is no file."""
    if str(out) == "-":
        return
    for what, path in inputs:
        if same_file(out, path):
            same = "" if str(path) == str(out) else f" ({path})"
            raise _err(f"{flag} {out} is {what}{same}: writing there would destroy it; choose another path")


def _check_distinct(flag: str, paths: list[str]) -> None:
    """Refuse a file given twice (also as ``./a.npz`` and ``a.npz``, or through a link): its points were counted
    twice, doubling eval's ``n`` and the weight of that file in training, without a word."""
    groups = repeated(paths, key=file_key)
    if groups:  # the first file named twice, by its first two names
        earlier, path = next(iter(groups.values()))[:2]
        what = f"{path} given twice" if path == earlier else f"{earlier} and {path} are the same file"
        raise _err(f"{flag}: {what}; give each file once (its points would count twice)")


def _write_json(path: Path, doc: Any) -> None:
    from tokenwire.daemon.cli import save_json

    save_json(path, doc, indent=2)


def register(sub: argparse._SubParsersAction) -> None:
    from .crossspec import DEFAULT_CROSS

    parser = sub.add_parser(
        "predictor", help="SwiftQueue latency predictor: collect, train, export, eval",
        description="Build and check the latency model SwiftQueue marks packets with: collect per-packet datasets "
        "in virtual time, train the networks (and fit the AR baseline), export them to ONNX, and score every "
        "model on held-out datasets. A trained model is used by the daemon's [marking] model and by `testbed "
        "swiftqueue --model`. Training and export need the ml extras. Details in docs/swiftqueue.md.",
    )
    psub = parser.add_subparsers(dest="predictor_cmd", metavar="STEP")
    psub.required = True

    def collect_args(p: argparse.ArgumentParser) -> None:
        shown = DEFAULT_CROSS.replace("%", "%%")  # argparse %-formats help text
        p.add_argument("--cross", default=DEFAULT_CROSS, help=f"cross traffic (default: {shown!r}; "
                       "grammar in docs/swiftqueue.md)")
        p.add_argument("--seconds", type=float, default=60.0, help="virtual seconds per run (default: 60)")
        p.add_argument("--delay-ms", type=float, default=10.0, help="one-way propagation delay (default: 10)")
        rate = p.add_mutually_exclusive_group()
        rate.add_argument("--probe-pps", type=float, help="probe packets/s (default: 8%% of the trace's 1500-byte "
                          "delivery opportunities, i.e. 6.4%% of its bits, within 5-300 packets/s; at most the "
                          "trace's mean capacity in probe packets)")
        rate.add_argument("--probe-share", type=float, metavar="F",
                          help="probe rate as a share (0-1] of the trace's mean capacity in bits")
        p.add_argument("--p-switch", type=float, default=0.08, help="probe queue switch probability per packet")

    p = psub.add_parser(
        "collect", help="one virtual-time DualPI2 run over a trace -> per-packet dataset (.npz)",
        description="Runs a probe flow and cross traffic through a DualPI2 bottleneck replaying the trace, in "
        "virtual time, and writes one row per probe packet: what the sender saw from its acks, and as ground "
        "truth the latency a packet sent at that moment would have had in each queue, L and C. These files are "
        "what `predictor train` and `predictor eval` read.",
    )
    p.add_argument("--down-trace", required=True, help="mahimahi trace file or a rate like 12mbps")
    p.add_argument("--seed", type=seed_arg, default=1,
                   help="seed of the run's AQM decisions, cross traffic, and the probe's send times and queue "
                   "switches, an integer >= 0 (default: 1)")
    p.add_argument("--out", required=True, help="the dataset file to write (.npz)")
    collect_args(p)
    p.set_defaults(handler=_collect)

    p = psub.add_parser(
        "collect-many", help="datasets for several traces x seeds, with progress",
        description="Runs `predictor collect` for every trace and seed, one after the other, and keeps an index of "
        "the finished datasets (index.json, with each run's settings and summary), so an interrupted run leaves "
        "a true index of what it wrote.",
    )
    p.add_argument("--traces", nargs="+", required=True, help="trace files (or rates)")
    p.add_argument("--seeds", default="1-3", help="integers >= 0, e.g. 1-4 or 1,5,9 (default: 1-3)")
    p.add_argument("--out-dir", required=True,
                   help="folder for the datasets, TRACE-sSEED.npz (the trace's file name, dots as _), and index.json; "
                   "other files in it are kept")
    collect_args(p)
    p.set_defaults(handler=_collect_many)

    p = psub.add_parser(
        "train", help="train transformer/gru (torch) and fit the AR baseline",
        description="Trains the transformer and GRU latency models (torch, CPU) on datasets from `predictor "
        "collect`, validating on the last 20% of each file in time and keeping the weights of the best "
        "validation loss (early stopping), and fits the linear AR baseline. Writes a checkpoint per model and "
        "train.json; an earlier run's checkpoints are moved to .previous.",
    )
    p.add_argument("--data", nargs="+", required=True, help="training datasets (.npz); validation = last 20%% "
                   "of each in time")
    p.add_argument("--kinds", default="transformer,gru,ar", help="subset of transformer,gru,ar")
    p.add_argument("--out-dir", required=True, help="checkpoints: transformer.pt, gru.pt, ar.json, train.json")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                   help="acks of history each prediction sees, the models' input length: a send is a prediction "
                   "point only with more acks than this before it (default: %(default)s, the shipped models')")
    p.add_argument("--epochs", type=int, default=30,
                   help="most training epochs of each network; early stopping (--patience) may end it sooner")
    p.add_argument("--batch", type=int, default=256, help="training points per optimizer step")
    p.add_argument("--lr", type=float, default=2e-3,
                   help="peak learning rate of the networks' one-cycle schedule (AdamW); lower it if training "
                   "diverges")
    p.add_argument("--alpha", type=float, default=4.0, help="extra loss weight of sharp changes (default: 4)")
    p.add_argument("--huber-ms", type=float, default=2.0, help="Huber transition in ms (default: 2)")
    p.add_argument("--patience", type=int, default=5, help="early stopping patience in epochs")
    p.add_argument("--seed", type=seed_arg, default=1,
                   help="seed of the networks' initial weights, batch order and --max-points sample, an integer "
                   ">= 0 (default: 1)")
    p.add_argument("--max-points", type=int, default=200_000,
                   help="at most this many training points per network, a random sample when the datasets hold more "
                   "(validation points and the AR fit take all)")
    p.add_argument("--net", default="{}", help='JSON overrides of the transformer\'s network, e.g. '
                   '\'{"d_model": 32}\' (the transformer only: refused when --kinds has no transformer)')
    p.add_argument("--threads", type=int, default=1,
                   help="threads of torch and of numpy's BLAS (the AR fit), default 1: a BLAS thread per core spins "
                   "on a shared machine; recorded in the checkpoint, as a seed retrains bit for bit only with the "
                   "same count")
    p.set_defaults(handler=_train)

    p = psub.add_parser(
        "export", help="checkpoint -> ONNX (dynamic batch), validated against torch",
        description="Converts a checkpoint of `predictor train` to the ONNX model the daemon and `predictor eval` "
        "run, and writes it only once onnxruntime's answers match torch's (within 0.05 ms at batches of 1, 8 and "
        "64). A checkpoint of an unfinished training run is exported with a warning.",
    )
    p.add_argument("--checkpoint", required=True,
                   help="a network's checkpoint from `predictor train` (transformer.pt or gru.pt)")
    p.add_argument("--out", required=True, help="the ONNX file to write")
    p.add_argument("--check-data", help="a dataset whose windows are also used for the torch/ONNX comparison")
    p.set_defaults(handler=_export)

    p = psub.add_parser(
        "eval", help="MAE/RMSE/spike error of every model on datasets (held-out traces)",
        description="Scores the transformer (ONNX), the GRU (ONNX), the AR baseline, the last value and EWMA on the "
        "same prediction points of the datasets: MAE, RMSE and the error at latency spikes, per queue. Give it "
        "datasets of traces the models were not trained on; it warns when given a training file.",
    )
    p.add_argument("--data", nargs="+", required=True,
                   help="datasets (.npz) from `predictor collect`, of traces held out from training")
    p.add_argument("--model", help="transformer ONNX (default: the shipped model)")
    p.add_argument("--baselines", help="directory with gru.onnx and ar.json (default: the shipped ones)")
    p.add_argument("--json", help="write the results here")
    p.set_defaults(handler=_eval)


MAX_SEEDS = 10_000
"""Seeds one ``collect-many`` takes: each is a testbed run per trace (seconds to minutes), so more is a typo."""


def _parse_seeds(text: str) -> list[int]:
    out: list[int] = []
    if not text.strip():
        raise _err("--seeds: no seeds")
    for part in text.split(","):
        if not part.strip():  # "1,,2" and "1," were read as "1,2" and "1"
            raise _err(f"--seeds: {text!r} has an empty item (a comma too many); write N or N-M between commas")
        a, dash, b = part.partition("-")
        try:
            first, last = (int(a), int(b)) if dash else (int(a), int(a))
        except ValueError:
            raise _err(f"--seeds: {part!r} is not N or N-M") from None
        if last < first:  # range() of it is empty: it used to end in "no seeds"
            raise _err(f"--seeds: {part!r} is a reversed range; write {last}-{first}")
        if last > MAX_SEED:  # as every --seed (seed_arg): torch and numpy's legacy generator refuse larger ones
            raise _err(f"--seeds: {last} is too large; seeds are integers from 0 to {MAX_SEED} (2**32 - 1)")
        if len(out) + last - first + 1 > MAX_SEEDS:  # (0-4294967295 built a list of 4 billion ints first)
            raise _err(f"--seeds: {text!r} names more than {MAX_SEEDS} seeds, each a collection run; split it")
        out += list(range(first, last + 1))
    if not out:
        raise _err("--seeds: no seeds")
    return out


def _config(args: argparse.Namespace, trace: str, seed: int) -> Any:
    from .crossspec import CrossSpecError, parse_cross_spec
    from .dataset import CollectConfig

    try:
        parse_cross_spec(args.cross)
    except CrossSpecError as exc:
        raise _err(str(exc)) from None
    from tokenwire.testbed.vsim import MAX_VIRTUAL_S

    if not 0 < args.seconds <= MAX_VIRTUAL_S:  # as `sim` refuses a run past its cap, before running
        raise _err(f"--seconds {args.seconds:g}: must be > 0 and at most {MAX_VIRTUAL_S:g} virtual s (the "
                   "simulator's cap)")
    if not args.delay_ms >= 0:
        raise _err("--delay-ms must be >= 0")
    if args.probe_pps is not None and not args.probe_pps > 0:
        raise _err("--probe-pps must be > 0")
    if args.probe_share is not None and not 0.0 < args.probe_share <= 1.0:
        raise _err("--probe-share must be within (0, 1]")
    if not 0.0 <= args.p_switch <= 1.0:
        raise _err("--p-switch must be within [0, 1]")
    return CollectConfig(down_trace=trace, cross=args.cross, seconds=args.seconds, seed=seed,
                         delay_ms=args.delay_ms, probe_pps=args.probe_pps, probe_share=args.probe_share,
                         p_switch=args.p_switch)


def _run_collect(cfg: Any, out: str, label: str) -> dict:
    from tokenwire.testbed.trace import TraceError

    from .dataset import ProbeRateError, collect, save, summary

    t0 = time.monotonic()

    def progress(frac: float) -> None:
        _say(f"  {label}: {100 * frac:5.1f}% of {cfg.seconds:g} virtual s")

    try:
        data = collect(cfg, progress)
    except TraceError as exc:
        raise _err(str(exc)) from None
    except ProbeRateError as exc:
        raise _err(f"--probe-pps: {exc}") from None
    _check_acked(data, label, cfg.seconds)
    save(out, data)
    s = summary(data)

    def pct(v: float) -> str:  # NaN: no packet with both targets known
        return f"{100 * v:.1f}%" if v == v else "n/a"

    _say(f"{label}: {s['packets']} probe packets, L mean {s['l_mean_ms']:.1f} ms / C mean {s['c_mean_ms']:.1f} ms, "
         f"C faster {pct(s['share_c_faster'])}, differ >5 ms {pct(s['share_differ_5ms'])} "
         f"({time.monotonic() - t0:.1f} s) -> {out}")
    return s


def _check_acked(data: dict, label: str, seconds: float) -> None:
    """Refuse a run in which no probe packet got through: its file would hold no latency at all (and its
    summary was NaN with numpy warnings); warn when too few did for any prediction point."""
    import numpy as np

    meta = json.loads(data["meta"])
    if meta["probe_delivered"] == 0:
        raise _err(f"{label}: none of the {meta['probe_packets']} probe packets got through in {seconds:g} "
                   f"virtual s (the link delivers {meta['trace_mean_mbps'] * 1000:.3g} kbit/s on average); "
                   "nothing written: use a faster trace or a longer --seconds")
    most = int(np.max(data["n_acked"], initial=0))
    if most <= DEFAULT_WINDOW:
        _say(f"warning: {label}: at most {most} acks at any send; train and eval need more than the window "
             f"(default {DEFAULT_WINDOW}) for a prediction point: collect longer (--seconds) or raise --probe-pps")


def _output_stem(trace: str) -> str:
    """collect-many's file name for a trace, before ``-sSEED.npz``: the trace's file name, dots made ``_``."""
    return Path(trace).name.replace(".", "_")


def _check_jobs(traces: list[str], seeds: list[int]) -> None:
    """Refuse repeated seeds and traces whose output files would coincide: a later run would overwrite an
    earlier one while the summary and index.json still counted both."""
    twice = sorted(repeated(seeds))
    if twice:
        raise _err(f"--seeds: {', '.join(map(str, twice))} given more than once")
    for stem, same in repeated(traces, key=_output_stem).items():
        if len(set(same)) < len(same):
            raise _err(f"--traces: {same[0]} given more than once")
        raise _err(f"--traces: {', '.join(same)} would be written to the same files {stem}-sN.npz (named after "
                   "the file name only); copy or link them to distinct file names")


def _check_traces(traces: list[str], probe_pps: float | None, probe_size: int) -> None:
    """Every trace readable and able to carry ``--probe-pps``, before the first run (not at the third)."""
    from tokenwire.testbed.trace import TraceError, trace_from_spec

    from .dataset import ProbeRateError, check_probe_pps

    for trace in traces:
        try:
            check_probe_pps(probe_pps, probe_size, trace_from_spec(trace).mean_mbps * 1e6)
        except TraceError as exc:
            raise _err(str(exc)) from None
        except ProbeRateError as exc:
            raise _err(f"--probe-pps: {trace}: {exc}") from None


def _trace_inputs(traces: list[str]) -> list[tuple[str, str]]:
    """The traces that are files (the others are rates like ``12mbps``), as :func:`check_output` inputs."""
    return [("the trace file", t) for t in traces if os.path.lexists(t)]


@_sigterm_as_ctrl_c
def _collect(args: argparse.Namespace) -> int:
    check_output("--out", args.out, _trace_inputs([args.down_trace]))
    _run_collect(_config(args, args.down_trace, args.seed), args.out, Path(args.down_trace).name)
    return 0


@_sigterm_as_ctrl_c
def _collect_many(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    seeds = _parse_seeds(args.seeds)
    jobs = [(t, s) for t in args.traces for s in seeds]
    cfg = _config(args, args.traces[0], seeds[0])  # flags checked once and every trace before any run
    _check_jobs(args.traces, seeds)
    _check_traces(args.traces, cfg.probe_pps, cfg.probe_size)
    out_dir = Path(args.out_dir)
    index_path = out_dir / "index.json"
    outs = [str(out_dir / f"{_output_stem(trace)}-s{seed}.npz") for trace, seed in jobs]
    for written in [*outs, str(index_path)]:
        check_output("--out-dir", written, _trace_inputs(args.traces))
    # index.json always describes finished files: entries of an earlier run for the files about to be
    # rewritten go now, each new file is added once it is saved (an interrupted run leaves a true index)
    rerun = {Path(o).name for o in outs}
    index = [e for e in _read_index(index_path) if Path(str(e.get("path", ""))).name not in rerun]
    done: list[str] = []
    with _new_out_dir(out_dir, frozenset({"index.json"})):
        _write_json(index_path, index)
        try:
            for i, ((trace, seed), out) in enumerate(zip(jobs, outs, strict=True), 1):
                run_cfg = _config(args, trace, seed)
                s = _run_collect(run_cfg, out, f"[{i}/{len(jobs)}] {Path(trace).name} seed {seed}")
                # the settings too: the index said which trace and seed, not for how long, with what cross traffic,
                # probe or delay, so files of two collect-many runs with other flags could not be told apart
                index.append({"trace": trace, "seed": seed, "path": out, **s, "config": asdict(run_cfg)})
                _write_json(index_path, index)
                done.append(out)
        except (KeyboardInterrupt, Exception):
            left = len(jobs) - len(done)
            _say(f"stopped after {len(done)} of {len(jobs)} datasets: " +
                 (f"completed {', '.join(done)} (listed in {index_path}); " if done else "none completed; ") +
                 f"{left} not written: {', '.join(outs[len(done):])}")
            raise
    _say(f"wrote {len(jobs)} datasets and index.json to {args.out_dir}")
    return 0


def _read_index(path: Path) -> list[dict]:
    """The entries of an existing index.json; an unreadable one is moved aside (:func:`_keep_broken_index`) and
    a new index started, with a warning."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        _keep_broken_index(path, f"unreadable ({exc})")
        return []
    if not isinstance(doc, list) or not all(isinstance(e, dict) for e in doc):
        _keep_broken_index(path, "not a list of datasets")
        return []
    return doc


def _keep_broken_index(path: Path, why: str) -> None:
    """Move an index.json that cannot be read to ``index.json.broken`` (``.broken.N`` when taken), so the new
    index does not replace it: it was overwritten, and the entries of the datasets already in the folder, which
    a damaged byte had made unreadable, were lost without a word beyond "starting a new index". Refused (before
    any run) when it cannot be moved: then it would be replaced."""
    aside = path.with_name(path.name + ".broken")
    n = 0
    while os.path.lexists(aside):
        n += 1
        aside = path.with_name(f"{path.name}.broken.{n}")
    try:
        path.rename(aside)
    except OSError as exc:
        raise _err(f"{path}: {why}, and it cannot be moved aside ({exc.strerror or exc}); the new index would "
                   "replace it: repair or remove it first") from None
    _say(f"warning: {path}: {why}; moved to {aside.name} (its entries are not in the new index) and starting a "
         "new index")


@_sigterm_as_ctrl_c
def _train(args: argparse.Namespace) -> int:
    from .dataset import DatasetError
    from .train import check_net_overrides, load_points

    kinds = args.kinds.split(",")
    if "" in kinds:  # `transformer,,gru` was read as `transformer,gru`, `,` said "unknown []" (--seeds refuses both)
        raise _err(f"--kinds {args.kinds!r}: an empty item; give kinds separated by single commas, e.g. "
                   "transformer,gru,ar")
    bad = set(kinds) - {"transformer", "gru", "ar"}
    if bad:
        raise _err(f"--kinds: unknown {sorted(bad)}; choose from transformer,gru,ar")
    twice = list(repeated(kinds))
    if twice:  # each was trained again into the same file: the second run replaced the first's checkpoint
        raise _err(f"--kinds: {', '.join(twice)} given more than once; give each kind once")
    try:
        net = check_net_overrides(json.loads(args.net))
    except json.JSONDecodeError:
        raise _err("--net must be a JSON object") from None
    except ValueError as exc:
        raise _err(str(exc)) from None
    if net and "transformer" not in kinds:  # it used to be ignored without a word
        raise _err(f"--net configures the transformer, and --kinds {args.kinds} trains none: add transformer "
                   "to --kinds or drop --net")
    if args.window < 2:
        raise _err("--window must be at least 2")
    for flag, value in (("--epochs", args.epochs), ("--batch", args.batch), ("--patience", args.patience),
                        ("--max-points", args.max_points), ("--threads", args.threads)):
        if value < 1:
            raise _err(f"{flag} must be at least 1")
    if not args.lr > 0:
        raise _err("--lr must be > 0")
    if args.alpha < 0:  # below -1 the sharp changes' weight turns negative and the fit runs away from them
        raise _err("--alpha must be >= 0 (0: no extra weight on sharp changes)")
    if not args.huber_ms > 0:  # torch's huber_loss refuses it, after the datasets have loaded
        raise _err("--huber-ms must be > 0")
    _check_distinct("--data", args.data)
    _check_train_outputs(Path(args.out_dir), kinds, args.data)
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    _say(f"loading {len(args.data)} datasets (window {args.window})")
    try:
        train, val = load_points(args.data, args.window, 0.2, log=_say)
    except DatasetError as exc:
        raise _err(str(exc)) from None
    data_files = _data_files(args.data)
    data_runs = _data_runs(args.data)
    # train.json is rewritten now (an earlier run's would describe checkpoints about to be replaced) and after
    # each model, so an interrupted run keeps the log of the models it finished; "finished" says it completed
    log: dict = {"data": args.data, "data_files": data_files, "command": " ".join(sys.argv), "kinds": kinds,
                 "models": {}, "finished": False}
    # numpy's BLAS starts a thread per core; on a shared or oversubscribed machine they spin and the AR fit's
    # small solves took 8-14 s of CPU against 1.8 s on one thread. threadpoolctl caps them as --threads does torch's.
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]  # no stubs, no py.typed

    with _new_out_dir(out, frozenset({"train.json"})), threadpool_limits(limits=args.threads, user_api="blas"):
        _train_models(args, kinds, net, train, val, log, data_files, data_runs)
    return 0


def _check_train_outputs(out: Path, kinds: list[str], data: list[str]) -> None:
    """Refuse an ``--out-dir`` that is a ``--data`` file, or one whose files train writes or moves aside
    (checkpoints, their ``.previous``, ``train.json``) include a ``--data`` file."""
    inputs = [("the --data file", d) for d in data]
    check_output("--out-dir", out, inputs)
    names = ["train.json"]
    for kind in kinds:
        name = "ar.json" if kind == "ar" else f"{kind}.pt"
        names += [name, f"{name}.previous"]
    for name in names:
        check_output("--out-dir", out / name, inputs)


def _data_files(paths: list[str]) -> list[dict[str, str]]:
    """Each training file's path and sha256, for the checkpoints' ``train_config`` (``eval`` warns when it is
    given one of them: a model scored on the points it was fitted or validated on reads better than it is)."""
    from .dataset import file_digest

    try:
        return [{"path": p, "sha256": file_digest(p)} for p in paths]
    except OSError as exc:  # loaded a moment ago: gone or unreadable since
        raise _err(f"--data: {exc.filename}: cannot read it again ({exc.strerror})") from None


def _data_runs(paths: list[str]) -> list[dict]:
    """The runs the training files were collected from (trace, seed, seconds: :func:`~.harness.dataset_run`),
    for ``eval``'s warning about a file of the same run collected for another ``--seconds``."""
    from .harness import dataset_run

    return [run for run in map(dataset_run, paths) if run is not None]


def _train_models(args: argparse.Namespace, kinds: list[str], net: dict, train: Any, val: Any, log: dict,
                  data_files: list[dict[str, str]], data_runs: list[dict]) -> None:
    """``train``'s models, one after the other, with ``train.json`` (``log``) rewritten after each."""
    from .train import TrainConfig, TrainingDiverged, fit_ar, train_net

    out = Path(args.out_dir)
    log_path = out / "train.json"
    _remove_earlier_outputs(out, kinds)
    _write_json(log_path, log)
    try:
        for kind in kinds:
            if kind == "ar":
                fit_ar(train, out / "ar.json", data_files, data_runs, log=_say)
                log["models"]["ar"] = {"train_points": len(train)}
                _write_json(log_path, log)
                _say(f"ar: fitted on {len(train)} points -> {out / 'ar.json'}")
                continue
            cfg = TrainConfig(kind=kind, window=args.window, epochs=args.epochs, batch=args.batch, lr=args.lr,
                              alpha=args.alpha, huber_ms=args.huber_ms, patience=args.patience, seed=args.seed,
                              max_points=args.max_points, threads=args.threads, data_files=data_files,
                              data_runs=data_runs,
                              net=net if kind == "transformer" else {})
            try:
                _, info = train_net(cfg, train, val, out / f"{kind}.pt", log=_say)
            except TrainingDiverged as exc:
                raise _err(f"{kind}: {exc}") from None
            log["models"][kind] = info
            _write_json(log_path, log)
            _say(f"{kind}: best epoch {info['best_epoch']} -> {out / (kind + '.pt')}")
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the model being trained may have left a usable checkpoint
        left = [k for k in kinds if k not in log["models"]]
        if left and left[0] != "ar":
            _note_interrupted(out, left[0], log)
        if left[1:]:
            _say(f"not trained: {', '.join(left[1:])}")
        raise
    log["finished"] = True
    _write_json(log_path, log)


def _note_interrupted(out: Path, kind: str, log: dict) -> None:
    """Say which checkpoint an interrupted ``kind`` left and record it in train.json, as unfinished.

    train_net saves a checkpoint at every improvement (``finished: false``), so an interrupted run usually
    keeps one that ``export`` takes, with its warning; yet Ctrl-C said only "interrupted", and train.json listed
    no model, as if nothing usable was left. (Any ``<kind>.pt`` here is this run's: an earlier run's was moved
    aside to ``.previous`` at the start.)"""
    from .onnx_session import ModelError
    from .train import checkpoint_best_epoch, read_checkpoint

    path = out / f"{kind}.pt"
    if not path.is_file():
        _say(f"{kind}: interrupted before its first epoch ended: no checkpoint of it written")
        return
    try:
        ck = read_checkpoint(path)
    except ModelError as exc:  # written by this run a moment ago; if it cannot be read, say so and record nothing
        _say(f"warning: {kind}: interrupted; its checkpoint cannot be read back, nothing recorded of it: {exc}")
        return
    history = ck.get("history")
    if not isinstance(history, list):
        return
    best = checkpoint_best_epoch(ck)
    finished = ck.get("finished") is True  # interrupted after its last save: a complete model
    scored = [h for h in history if isinstance(h, dict) and h.get("epoch") == best]
    log["models"][kind] = {"best_epoch": best, "best_val_loss": scored[0].get("val_loss") if scored else None,
                           "history": history, "finished": finished}
    try:
        _write_json(out / "train.json", log)
    except OSError as exc:  # the interrupt stays the outcome (130); the log is the casualty
        _say(f"warning: {out / 'train.json'}: not updated ({exc.strerror or exc})")
    if finished:
        _say(f"{kind}: interrupted after it finished: {path} holds its best epoch {best}")
        return
    _say(f"{kind}: interrupted; kept {path} with the weights of epoch {best} (the best so far; training did not "
         f"finish, recorded so in train.json): `tokenwire predictor export --checkpoint {path} --out "
         f"{out / kind}.onnx` takes it, with a warning that it is unfinished")


def _remove_earlier_outputs(out: Path, kinds: list[str]) -> None:
    """Move aside an earlier run's checkpoints of the kinds about to be trained, as train.json is rewritten.

    Interrupted before its first checkpoint, a rerun left the old ``gru.pt`` (``finished: true``) next to a
    new train.json without it, and ``export`` used it without a word. Each is renamed ``<name>.previous``
    (replacing an older one), not deleted: a rerun that diverges at once still leaves the earlier model. A
    symlink is moved aside as a link, its target untouched (a shared "best" model outside ``--out-dir`` was
    overwritten through it by the rerun's first checkpoint). An earlier export next to them stays, with a
    warning.
    """
    for kind in kinds:
        old = out / ("ar.json" if kind == "ar" else f"{kind}.pt")
        if old.is_symlink() or old.is_file():
            old.replace(old.with_name(old.name + ".previous"))  # a symlink itself, not what it links to
            _say(f"moved {old} of an earlier run to {old.name}.previous")
        exported = out / f"{kind}.onnx"
        if kind != "ar" and exported.exists():
            _say(f"warning: {exported} was exported from an earlier run; export the new {kind}.pt again")


@_sigterm_as_ctrl_c
def _export(args: argparse.Namespace) -> int:
    import torch

    from .dataset import DatasetError
    from .export import export_onnx
    from .harness import file_points
    from .runtime import ModelError
    from .train import check_checkpoint_features, checkpoint_best_epoch, load_checkpoint

    inputs = [("the --checkpoint", args.checkpoint)]
    check_output("--out", args.out, inputs + ([("the --check-data file", args.check_data)] if args.check_data else []))
    torch.set_num_threads(1)
    try:
        model, ck = load_checkpoint(args.checkpoint)
        check_checkpoint_features(args.checkpoint, ck)
    except ModelError as exc:
        raise _err(str(exc)) from None
    cx = cb = None
    if args.check_data:
        try:  # a file without prediction points would leave only random windows to compare on: refused
            ((_, pts),) = file_points([args.check_data], model.config["window"], log=_say)  # type: ignore[attr-defined]
        except DatasetError as exc:
            raise _err(f"--check-data: {exc}") from None
        cx, cb = pts.x, pts.base
    history = ck.get("history") or []
    best_epoch = checkpoint_best_epoch(ck)
    if ck.get("finished") is False:
        _say(f"warning: {args.checkpoint} is from a training run that did not finish (interrupted, or still "
             f"running): best epoch so far {best_epoch} of {len(history)} run; exporting it anyway")
    extra = {"train_config": ck.get("train_config"), "best_epoch": best_epoch, "epochs_run": len(history),
             "finished": ck.get("finished")}
    try:
        report = export_onnx(model, args.out, extra, cx, cb)
    except ModelError as exc:
        raise _err(f"{exc}; not written to {args.out}") from None
    out = Path(args.out)  # a device, a FIFO or "-" was written through: no size to show
    size = f" ({out.stat().st_size / 1024:.0f} KiB)" if str(out) != "-" and out.is_file() else ""
    _say(f"wrote {args.out}{size}; onnxruntime vs torch: " +
         ", ".join(f"{k} {v:.2e}" for k, v in report.items() if k != "ok"))
    return 0


@_sigterm_as_ctrl_c
def _eval(args: argparse.Namespace) -> int:
    from .dataset import DatasetError
    from .evaluate import run_eval
    from .runtime import ModelError, shipped_model_path

    _check_distinct("--data", args.data)
    if args.json:
        base = Path(args.baselines) if args.baselines else shipped_model_path().parent
        check_output("--json", args.json, [*(("the --data file", d) for d in args.data),
                                           ("the --model", args.model or shipped_model_path()),
                                           ("a baseline", base / "gru.onnx"), ("a baseline", base / "ar.json")])
    try:
        doc = run_eval(args.data, args.model, args.baselines, log=_say)
    except (DatasetError, ModelError) as exc:
        raise _err(str(exc)) from None
    if args.json:  # before the table: nothing in printing it can lose the results
        _write_json(Path(args.json), doc)  # a spike MAE over no spikes is NaN: null in the file
        if args.json != "-":
            _say(f"wrote {args.json}")
    # with --json -, stdout is the JSON document alone (parseable); the table goes to stderr
    print(format_table(doc))  # with --json -: on stderr (cli.main)
    return 0


def _below(mae: float, ewma: float) -> str:
    """``mae`` as "% below ewma" (5 wide), ``-`` where no ratio exists: EWMA's MAE 0 (a constant latency),
    or NaN (no targets) on either side."""
    if not (ewma > 0 and mae == mae):
        return f"{'-':>5}"
    return f"{100 * (1 - mae / ewma):5.1f}"


def _no_ratio_why(t: dict, e: dict) -> str:
    """Why the transformer-vs-EWMA line has no ratio, the side that lacks one named: it used to blame EWMA's
    MAE ("is 0, or no targets") also when the transformer's was NaN (non-finite predictions) and EWMA's fine."""
    def finite(v: Any) -> bool:
        return isinstance(v, int | float) and v == v and abs(v) != float("inf")

    if not t.get("n"):
        return "no known targets"
    if not finite(t.get("mae_ms")):
        bad = t.get("n_nonfinite")
        return (f"the transformer answered NaN/inf on {bad} points" if bad else "the transformer has no MAE")
    if not finite(e.get("mae_ms")):
        return "ewma has no MAE"
    return "ewma's MAE is 0: a constant latency"


def format_table(doc: dict) -> str:
    from tokenwire.daemon.cli import cell
    from tokenwire.testbed.sim_cli import lower_or_higher

    # n: the known targets, both queues' (a prediction point has one per queue, L and C)
    lines = [f"{'model':<12} {'MAE ms':>8} {'RMSE ms':>8} {'spike MAE':>10} {'n (L+C)':>8} {'n spike':>8}"]
    for name, m in doc["models"].items():  # NaN (no targets, no spikes): "-"
        lines.append(f"{name:<12} {cell(m['mae_ms'], '>8.2f')} {cell(m['rmse_ms'], '>8.2f')} "
                     f"{cell(m['spike_mae_ms'], '>10.2f')} {m['n']:>8} {m['n_spike']:>8}")
    if "transformer" in doc["models"] and "ewma" in doc["models"]:
        t, e = doc["models"]["transformer"], doc["models"]["ewma"]
        change = lower_or_higher(t["mae_ms"], e["mae_ms"])  # a worse model read "-3.8% lower"
        lines.append(f"transformer MAE vs ewma: {change} (target >= 45% lower)" if change is not None else
                     f"transformer MAE vs ewma: no ratio ({_no_ratio_why(t, e)})")
    said = {"newest_acked": "truth at the newest acked send: the sender's own freshness",
            "clairvoyant_prev": "truth at the previous send",
            "interpolated": "mean of the previous and the next send's truth (uses the future)"}
    refs = {k: v for k, v in doc.get("references", {}).items() if v.get("n")}
    if refs:
        lines.append("references, not forecasters (% below ewma on the targets each can answer):")
    for name, ref in refs.items():
        e = ref["ewma_mae_ms_same_targets"]
        t = ref.get("models_mae_ms_same_targets", {}).get("transformer")
        vs_t = f"(transformer {_below(t, e)}%)" if t is not None else ""
        lines.append(f"  {name:<17}{cell(ref['mae_ms'], '6.2f')} ms {_below(ref['mae_ms'], e)}% {vs_t}  "
                     f"{said.get(name, '')}")
    return "\n".join(lines)
