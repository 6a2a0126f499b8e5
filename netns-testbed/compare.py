"""``tokenwire testbed compare``: every scheme end to end through the same emulated path.

For each seed and each scheme a fresh testbed is built (fresh namespaces: no TCP metrics or QUIC state
carried over), the scheme's server starts in the server namespace and its client in the client namespace,
the client opens its connection, the emulator's trace and loss clocks restart (``origin``) and the client
sends its request. With one seed every scheme therefore meets the same capacity trace and the same loss
pattern, counted from that origin.

Metrics come from :mod:`tokenwire.transport.metrics` (the one definition): generation times are stamped by
the server, render times by the client, both on the host's monotonic clock. Bytes per token and the oracle
use the emulator's per-packet log of the down direction from the moment the request reached the server:
the oracle renders each token at the first delivered down packet sent after it was generated, per scheme
and over the union of all schemes' packets (aligned on the emulator origin).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tokenwire.transport import metrics

from .child import Child, ChildError, ExitWatch, exit_status
from .endpoints import ALL_SCHEMES
from .netns import run_folder
from .path_config import PathConfig, check_answers, check_schemes
from .pktlog import read_packet_log
from .tokens import answer
from .topology import Testbed, TestbedError
from .traffic import parse_cross, start_cross, watch_senders

PORT = 8443


class CompareError(ChildError):
    """A scheme run failed (a stuck or crashed endpoint is a bug to report, not a result to average)."""


@dataclass
class CompareConfig(PathConfig):
    schemes: list[str] = field(default_factory=lambda: list(ALL_SCHEMES))
    tokens: int = 400
    rate: float = 30.0
    seed: int = 0
    runs: int = 1
    sse_cc: str = "cubic"
    backend: str = "auto"
    timeout_s: float | None = None
    cross: list[str] = field(default_factory=list)

    def validate(self) -> None:
        check_schemes(self.schemes, ALL_SCHEMES)
        check_answers(self.tokens, self.runs, self.rate)
        for spec in self.cross:
            parse_cross(spec)
        self.validate_path()

    def run_timeout(self) -> float:
        """Deadline for one scheme's answer: generous, but a stuck run does fail."""
        if self.timeout_s is not None:
            return self.timeout_s
        return 60.0 + 4.0 * self.tokens / self.rate


@dataclass
class SchemeRun:
    scheme: str
    seed: int
    origin: float
    request_time: float
    request_arrival: float
    gen: list[float]
    render: list[float]
    text_ok: bool
    wire_bytes: int
    down_packets: int
    down_lost: int
    deliveries: list[tuple[float, float]]
    lost_times: list[float]
    emulator: dict[str, Any]
    wire_known: bool = True
    stats: metrics.StreamStats | None = None
    oracle_stall_ratio: float = math.nan
    cc: str | None = None
    base_delay: float = 0.0
    backend: str = "userspace"
    backend_reason: str = ""


def _endpoint_argv(role: str, scheme: str, host: str, out: str, cfg: CompareConfig, seed: int) -> list[str]:
    return [
        sys.executable, "-m", "tokenwire.testbed.endpoints", role, "--scheme", scheme, "--host", host,
        "--port", str(PORT), "--out", out, "--tokens", str(cfg.tokens), "--rate", str(cfg.rate),
        "--seed", str(seed), "--cc", cfg.sse_cc, "--timeout", str(cfg.run_timeout()),
    ]  # fmt: skip


def _start(tb: Testbed, ns: str, role: str, scheme: str, out: str, cfg: CompareConfig, seed: int,
           workdir: str, tag: str, watches: Sequence[ExitWatch] = (), kept: bool = False) -> Child:
    err_path = os.path.join(workdir, f"{tag}.{role}.stderr")
    with open(err_path, "w") as err:
        argv = _endpoint_argv(role, scheme, tb.server_addr, out, cfg, seed)
        pipe = subprocess.PIPE
        proc = tb.popen(ns, argv, stdin=pipe, stdout=pipe, stderr=err, text=True, bufsize=1)
    return Child(proc, f"{scheme} {role}", err_path, watches, stderr_kept=kept)


@contextlib.contextmanager
def _watching_emulator(tb: Testbed, scheme: str, seed: int) -> Iterator[list[ExitWatch]]:
    """The link emulator's exit ends every wait on the endpoints at once, as the error: the client noticed
    only at its 60-s QUIC idle timeout, and the error blamed it ("no packet from the server")."""
    # None with the kernel backend (its qdiscs are no process); getattr: the tests' stand-in testbed has none
    emulator = getattr(tb, "emulator", None)
    if emulator is None:
        yield []
        return

    def failure(status: int) -> CompareError:
        return CompareError(f"testbed: link emulator exited ({exit_status(status)}) during {scheme} seed {seed}"
                            f"{tb.emulator_failure()}")

    watch = ExitWatch(emulator, failure)
    try:
        yield [watch]
    finally:
        watch.close()


Progress = Callable[[str, int, int], None]


def run_scheme(scheme: str, cfg: CompareConfig, seed: int, workdir: str,
               progress: Progress | None = None, *, scratch: str | None = None) -> SchemeRun:
    """One request of ``scheme`` through a fresh testbed; raises :class:`CompareError` naming the scheme if
    it fails (an endpoint that exits, never connects or stops answering: a :class:`ChildError`)."""
    try:
        return _run_scheme(scheme, cfg, seed, workdir, progress, scratch=scratch)
    except TestbedError as exc:  # its emulator failed to start, or answer
        raise CompareError(f"{scheme} (seed {seed}): testbed: {exc}") from None
    except CompareError:
        raise
    except ChildError as exc:
        raise CompareError(f"{scheme} (seed {seed}): {exc}") from None


def _run_scheme(scheme: str, cfg: CompareConfig, seed: int, workdir: str, progress: Progress | None, *,
                scratch: str | None) -> SchemeRun:
    tag = f"{scheme}.seed{seed}"
    log_path = os.path.join(workdir, f"{tag}.pktlog.csv")
    srv_out = os.path.join(workdir, f"{tag}.server.json")
    cli_out = os.path.join(workdir, f"{tag}.client.json")
    kept = scratch is None  # the folder outlives the run (--keep): an endpoint's error names its stderr file
    emulator_stderr = os.path.join(workdir, f"{tag}.emulator.stderr")
    with (Testbed(cfg.emulator_config(seed, log_path), backend=cfg.backend, scratch=scratch,
                  emulator_stderr=emulator_stderr) as tb,
          _watching_emulator(tb, scheme, seed) as watches,
          contextlib.ExitStack() as stack):
        cross = []
        if cfg.cross:  # running through the handshake and the whole answer; stopped with the testbed
            cross = start_cross(tb, cfg.cross, cfg.run_timeout() + 60)
        cross_watches = watch_senders(cross)  # a sender's exit ends the run with its error
        stack.callback(lambda: [w.close() for w in cross_watches])
        watches = [*watches, *cross_watches]
        srv = _start(tb, tb.server_ns, "server", scheme, srv_out, cfg, seed, workdir, tag, watches, kept)
        srv.wait_for("ready", 30)
        cli = _start(tb, tb.client_ns, "client", scheme, cli_out, cfg, seed, workdir, tag, watches, kept)
        cli.wait_for("connected", 30)
        origin = tb.origin()
        cli.send("go")
        deadline = time.monotonic() + cfg.run_timeout()
        while True:
            ev = cli.event(deadline)
            if "progress" in ev and progress:
                progress(scheme, int(ev["progress"]), cfg.tokens)
            if ev.get("done"):
                break
        srv.send("stop")
        srv.wait_for("stopped", 15)
        emu = tb.stats()
        backend, backend_reason = tb.backend, tb.backend_reason
    with open(srv_out) as fh:
        requests = json.load(fh)["requests"]
    with open(cli_out) as fh:
        result = json.load(fh)
    if len(requests) != 1:
        raise CompareError(f"{scheme}: the server saw {len(requests)} requests, expected 1")
    req = requests[0]
    gen = [float(g) for g in req["gen"]]
    render = [float(r) for r in result["render"]]
    arrival = float(req["request_arrival"])
    down_sent = 0
    down_lost = 0
    wire = 0
    deliveries: list[tuple[float, float]] = []
    lost_times: list[float] = []
    if backend == "userspace":
        for row in read_packet_log(log_path):
            if row["dir"] != "down" or float(row["arrival"]) < arrival or row["sport"] != str(PORT):
                continue  # only the scheme's own packets (not cross traffic), from the request on
            down_sent += 1
            wire += int(row["size"])
            if row["fate"] == "delivered":
                deliveries.append((float(row["arrival"]), float(row["delivery"])))
            else:
                down_lost += 1
                if row["fate"] == "lost" and row["departure"]:
                    lost_times.append(float(row["departure"]))
    return SchemeRun(
        scheme=scheme, seed=seed, origin=origin, request_time=float(result["request_time"]),
        request_arrival=arrival, gen=gen, render=render, base_delay=cfg.delay_ms / 1000.0,
        text_ok=result.get("text") == "".join(answer(cfg.tokens, cfg.rate, seed)[0]) and len(render) == cfg.tokens,
        wire_bytes=wire, down_packets=down_sent, down_lost=down_lost, deliveries=deliveries,
        lost_times=lost_times, emulator=emu, wire_known=backend == "userspace", cc=req.get("cc"),
        backend=backend, backend_reason=backend_reason,
    )  # fmt: skip


def path_base_delay(batch: list[SchemeRun], configured: float) -> float:
    """One base delay per seed for every scheme: the fastest any token of any scheme crossed this path.

    The configured propagation delay alone would count the link's own transmission time (waiting for the
    next delivery opportunity, about half a millisecond) and the host stack as stall for every token of
    every scheme. Taking the minimum over all schemes keeps one yardstick for all of them.
    """
    diffs = (r - g for run in batch for g, r in zip(run.gen, run.render, strict=False))
    best = min(diffs, default=configured)
    return max(configured, best)


def finalize(batch: list[SchemeRun]) -> None:
    """Compute each run's metrics and oracle with the shared base delay of its seed."""
    configured = batch[0].base_delay
    base = path_base_delay(batch, configured)
    for run in batch:
        run.base_delay = base
        run.stats = metrics.summarize(run.gen, run.render, base_delay=base, request_time=run.request_time,
                                      wire_bytes=run.wire_bytes if run.wire_known else None)
        run.oracle_stall_ratio = (
            metrics.stall_ratio(run.gen, metrics.oracle_render_times(run.gen, run.deliveries), base)
            if run.deliveries else math.nan
        )


def union_oracle(runs: list[SchemeRun]) -> float:
    """The least oracle stall ratio of a seed: on each scheme's generation schedule, over every scheme's delivered
    packets (aligned on each run's emulator origin), and never above any scheme's own oracle: a lower bound no
    single scheme offers. (With the first run's generation times alone it came out above the oracle of a scheme
    whose tokens were generated at better moments of the trace.)

    The scheme's own oracle is a candidate too: more packets render every token no later and never add stall,
    but a last token rendered earlier also shortens the period the ratio divides by."""
    deliveries = [(s - r.origin, a - r.origin) for r in runs for s, a in r.deliveries]
    if not deliveries:
        return math.nan
    candidates = [r.oracle_stall_ratio for r in runs]
    for r in runs:
        gen = [g - r.origin for g in r.gen]
        candidates.append(metrics.stall_ratio(gen, metrics.oracle_render_times(gen, deliveries), r.base_delay))
    finite = [c for c in candidates if not math.isnan(c)]
    return min(finite, default=math.nan)


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.fmean(xs) if xs else math.nan


def relative_change(value: float | None, reference: float | None) -> float | None:
    """``value / reference - 1``: -0.58 is "58 % lower", the sign of the docs' "vs stream" columns. None where no
    ratio exists (a missing, NaN or infinite side, or a reference that is not > 0: a baseline without a stall),
    rather than a ZeroDivisionError or an infinite change in the JSON."""
    if value is None or reference is None or not (math.isfinite(value) and math.isfinite(reference)):
        return None
    if reference <= 0:
        return None
    return value / reference - 1.0


COMPARISON_REFERENCE = "chatterbox"
COMPARISON_METRICS = (("stall_ratio", "stall_ratio", "stall ratio"),
                      ("p99_token_delay_ms", "p99_token_delay", "p99 token delay"))
"""(the scheme's summary key, the comparison keys' prefix, the printed name) of each compared metric."""


def comparison_block(runs: dict[str, list[metrics.StreamStats]], means: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Chatterbox against every other scheme of the same run: the targets (stall -60 % vs stream, -70 % vs sse-tcp)
    are judged by these ratios, and the table alone left every reader to work them out by hand.

    ``runs`` holds each scheme's per-seed stats in seed order (the same seeds for every scheme), ``means`` each
    scheme's summary row. Per metric three figures, each named by how it is pooled: ``*_change_per_seed`` (seed
    k of chatterbox against seed k of the other: the same trace and loss pattern), ``*_change_median_of_seeds``
    (their median: one odd seed does not carry it) and ``*_change_of_means`` (the row means against each other,
    what the docs' tables quote).
    """
    block: dict[str, Any] = {"reference_scheme": COMPARISON_REFERENCE, "change": "chatterbox / other - 1 "
                             "(negative: chatterbox lower, i.e. better)", "vs": {}}
    if COMPARISON_REFERENCE not in runs:
        return block
    ref_runs = runs[COMPARISON_REFERENCE]
    for other, other_runs in runs.items():
        if other == COMPARISON_REFERENCE:
            continue
        d: dict[str, Any] = {}
        for key, prefix, _label in COMPARISON_METRICS:
            per_seed = [relative_change(getattr(a, key), getattr(b, key))
                        for a, b in zip(ref_runs, other_runs, strict=True)]
            known = [c for c in per_seed if c is not None]
            d[f"{prefix}_change_per_seed"] = per_seed
            d[f"{prefix}_change_median_of_seeds"] = statistics.median(known) if known else None
            d[f"{prefix}_change_of_means"] = relative_change(means[COMPARISON_REFERENCE][key], means[other][key])
        block["vs"][other] = d
    return block


def comparison_lines(summary: dict[str, Any]) -> list[str]:
    """The lines under ``testbed compare``'s table, one per compared scheme, from the JSON's ``comparison``
    block, in ``tokenwire sim``'s wording ("stall ratio 57.7% lower")."""
    from .sim_cli import lower_or_higher

    block = summary.get("comparison") or {}
    ref = block.get("reference_scheme", COMPARISON_REFERENCE)
    lines = []
    for other, d in (block.get("vs") or {}).items():
        n = len(d["stall_ratio_change_per_seed"])
        parts = []
        for _key, prefix, label in COMPARISON_METRICS:
            of_means, median = d[f"{prefix}_change_of_means"], d[f"{prefix}_change_median_of_seeds"]
            if of_means is None:
                parts.append(f"{label}: no ratio (a side unknown, or {other}'s is 0)")
                continue
            text = f"{label} {lower_or_higher(1.0 + of_means, 1.0)}"
            if n > 1:
                per_seed = "n/a" if median is None else lower_or_higher(1.0 + median, 1.0)
                text += f" (of the {n}-seed means; per-seed median {per_seed})"
            parts.append(text)
        lines.append(f"{ref} vs {other}: " + ", ".join(parts))
    return lines


SUMMARY_KEYS = ("stall_ratio", "ttft_ms", "p50_token_delay_ms", "p99_token_delay_ms", "bytes_per_token",
                "longest_stall_ms", "stalls_over_200ms")


def summarize_runs(cfg: CompareConfig, per_scheme: dict[str, list[SchemeRun]], oracles: list[float],
                   backend: str, backend_reason: str) -> dict[str, Any]:
    """The JSON document (same shape as ``tokenwire sim`` plus ``backend`` and ``comparison``)."""
    schemes: dict[str, Any] = {}
    for s, rs in per_scheme.items():
        stats = [r.stats for r in rs if r.stats is not None]
        assert len(stats) == len(rs)  # finalize() has summarized every run
        d: dict[str, Any] = {k: _mean([getattr(st, k) for st in stats]) for k in SUMMARY_KEYS}
        d["tokens_sent"] = round(_mean([st.tokens_sent for st in stats]))
        d["tokens_rendered"] = round(_mean([st.tokens_rendered for st in stats]))
        d["oracle_stall_ratio"] = _mean([r.oracle_stall_ratio for r in rs])
        d["digest_ok"] = all(r.text_ok for r in rs)
        d["down_loss_rate"] = _mean([r.down_lost / max(1, r.down_packets) for r in rs])
        d["per_seed_stall_ratio"] = [st.stall_ratio for st in stats]
        if s == "sse-tcp":
            d["tcp_congestion_control"] = rs[0].cc
        schemes[s] = _nan_to_none(d)
    reference = "chatterbox" if "chatterbox" in schemes else next(iter(schemes))
    seed_stats = {s: [r.stats for r in rs if r.stats is not None] for s, rs in per_scheme.items()}
    return {
        "schemes": schemes,
        "comparison": comparison_block(seed_stats, schemes),
        # Same block as `tokenwire sim`: the headline is the oracle on the reference scheme's own packets;
        # each scheme has its own (``oracle_stall_ratio``); the union of every scheme's packets (on the best
        # scheme's generation schedule, :func:`union_oracle`) is a lower bound no single scheme's offers.
        "oracle": {
            "stall_ratio": schemes[reference]["oracle_stall_ratio"],
            "reference_scheme": reference,
            "per_scheme": {s: d["oracle_stall_ratio"] for s, d in schemes.items()},
            "union_stall_ratio": _mean(oracles),
            "union_per_seed": oracles,
        },
        "config": asdict(cfg),
        "backend": backend,
        "backend_reason": backend_reason,
    }


def run_compare(
    cfg: CompareConfig,
    *,
    workdir: str | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    on_partial: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], dict[str, list[SchemeRun]]]:
    """Run every scheme for ``cfg.runs`` seeds; returns the JSON summary and the raw runs (for plots).

    A failure or an interrupt (KeyboardInterrupt) after at least one finished run first hands ``on_partial``
    the finished runs (:func:`partial_summary`), then propagates: a late failure, or Ctrl-C at the last run
    of ``--runs 2``, threw every finished run away."""
    cfg.validate()
    per_scheme: dict[str, list[SchemeRun]] = {s: [] for s in cfg.schemes}
    oracles: list[float] = []
    base_delays: list[float] = []
    backend = reason = ""
    finished: list[SchemeRun] = []
    current: tuple[str, int] | None = None  # the run under way: the one a failure or an interrupt stopped
    try:
        # no temporary folder with --keep: one made anyway was recorded nowhere, and a SIGKILL left it behind
        with run_folder(workdir, "tw-compare-") as (wd, scratch):
            for k in range(cfg.runs):
                seed = cfg.seed + k
                batch = []
                for s in cfg.schemes:
                    if log:
                        log(f"seed {seed}: {s}")
                    current = (s, seed)
                    r = run_scheme(s, cfg, seed, wd, progress, scratch=scratch)
                    current = None
                    finished.append(r)
                    per_scheme[s].append(r)
                    batch.append(r)
                    backend, reason = r.backend, r.backend_reason
                finalize(batch)
                oracles.append(union_oracle(batch))
                base_delays.append(batch[0].base_delay * 1000.0)
    except BaseException as exc:
        if finished:
            offer_partial(exc, on_partial, lambda e: partial_summary(cfg, finished, current, e))
        raise
    summary = summarize_runs(cfg, per_scheme, oracles, backend, reason)
    summary["base_delay_ms"] = base_delays
    # a partial run's JSON says "complete": false (partial_summary), so a reader can tell them apart
    summary["complete"] = True
    return summary, per_scheme


def _stopped_by(exc: BaseException) -> str:
    """Why a run stopped, in one line: its error, or "interrupted" (Ctrl-C, or SIGTERM/SIGHUP, which the CLI
    turns into KeyboardInterrupt)."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return str(exc) or type(exc).__name__


def _nan_to_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def _run_row(run: SchemeRun, seed_complete: bool) -> dict[str, Any]:
    """One finished run's figures (the summary's per-scheme keys, for this run alone)."""
    st = run.stats
    assert st is not None  # finalize() has summarized it
    row: dict[str, Any] = {"scheme": run.scheme, "seed": run.seed}
    row.update({k: getattr(st, k) for k in SUMMARY_KEYS})
    row.update(tokens_sent=st.tokens_sent, tokens_rendered=st.tokens_rendered,
               oracle_stall_ratio=run.oracle_stall_ratio, digest_ok=run.text_ok,
               down_loss_rate=run.down_lost / max(1, run.down_packets), base_delay_ms=run.base_delay * 1000.0,
               seed_complete=seed_complete)
    if run.scheme == "sse-tcp":
        row["tcp_congestion_control"] = run.cc
    return _nan_to_none(row)


def offer_partial(exc: BaseException, on_partial: Callable[[dict[str, Any]], None] | None,
                  build: Callable[[BaseException], dict[str, Any]]) -> None:
    """Hand ``on_partial`` the document of the runs that finished before ``exc`` stopped a command (``build``
    makes it from ``exc``; ``compare`` and ``contention`` share this). A failure in summarizing them is added to
    ``exc`` as a note, never raised instead of it: the caller re-raises ``exc``."""
    if on_partial is None:
        return
    try:
        doc = build(exc)
    except Exception as err:
        exc.add_note(f"(the finished runs could not be summarized: {err!r})")
    else:
        on_partial(doc)


def partial_summary(cfg: CompareConfig, finished: list[SchemeRun], stopped: tuple[str, int] | None,
                    exc: BaseException) -> dict[str, Any]:
    """The JSON of a run that did not finish: what did finish, and which runs are missing and why.

    Not the complete document's shape on purpose: it has no top-level ``schemes``, ``comparison`` or ``oracle``,
    so no reader of the complete JSON takes a few seeds' (or schemes') figures for the whole run. Instead:
    ``"complete": false``; ``runs_finished`` (one row per finished run, the summary's keys for that run;
    ``seed_complete`` false where another scheme of its seed is missing: its base delay is then the least of the
    finished schemes' only, see :func:`path_base_delay`); ``stopped_at`` (the run under way, ``{scheme, seed}``;
    null when it stopped between runs); ``runs_missing`` (scheme, seed, why: the error or "interrupted" for the
    run that stopped, "not run: ..." for the rest); ``complete_seeds`` (the complete document's
    ``schemes``, ``comparison``, ``oracle`` and ``base_delay_ms`` over the seeds every scheme finished, with
    their ``seeds``; null without one); and ``config``, ``backend``, ``backend_reason`` as in the complete one.
    """
    why = _stopped_by(exc)
    by_seed: dict[int, list[SchemeRun]] = {}
    for run in finished:
        by_seed.setdefault(run.seed, []).append(run)
    for runs in by_seed.values():  # again from the configured delay: the failure may have come before finalize()
        for run in runs:
            run.base_delay = cfg.delay_ms / 1000.0
        finalize(runs)
    whole = [seed for seed, runs in by_seed.items() if len(runs) == len(cfg.schemes)]
    done = {(run.scheme, run.seed) for run in finished}
    missing = [
        {"scheme": s, "seed": seed, "why": why if (s, seed) == stopped else "not run: the run stopped before it"}
        for seed in range(cfg.seed, cfg.seed + cfg.runs) for s in cfg.schemes if (s, seed) not in done
    ]
    last = finished[-1]
    complete_seeds: dict[str, Any] | None = None
    if whole:
        per_scheme = {s: [r for seed in whole for r in by_seed[seed] if r.scheme == s] for s in cfg.schemes}
        doc = summarize_runs(cfg, per_scheme, [union_oracle(by_seed[seed]) for seed in whole], last.backend,
                             last.backend_reason)
        complete_seeds = {"seeds": whole, "schemes": doc["schemes"], "comparison": doc["comparison"],
                          "oracle": doc["oracle"],
                          "base_delay_ms": [by_seed[seed][0].base_delay * 1000.0 for seed in whole]}
    return {
        "complete": False,
        "stopped_by": "interrupt" if isinstance(exc, KeyboardInterrupt) else "error",
        "error": why,
        "stopped_at": None if stopped is None else {"scheme": stopped[0], "seed": stopped[1]},
        "runs_finished": [_run_row(run, run.seed in whole) for run in finished],
        "runs_missing": missing,
        "complete_seeds": complete_seeds,
        "config": asdict(cfg),
        "backend": last.backend,
        "backend_reason": last.backend_reason,
    }


def describe_partial(doc: dict[str, Any]) -> str:
    """One line on a partial document, for stderr: how many runs finished, and where it stopped (the error line
    that follows says why)."""
    finished, missing, at = doc["runs_finished"], doc["runs_missing"], doc["stopped_at"]
    where = f" (stopped at {at['scheme']} seed {at['seed']})" if at else ""
    return f"{len(finished)} of {len(finished) + len(missing)} runs finished{where}"
