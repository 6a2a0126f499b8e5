"""``tokenwire testbed contention``: N chats at once through one emulated bottleneck, per scheme.

``compare`` serves one request per scheme; whether a scheme keeps its lead when many chats share a link, and what
that link then looks like (how full, how deep its queue, how fairly it is shared), needs N clients at once. For
each run (seed) and scheme a fresh testbed is built; the real daemon (demo upstream) starts in the server
namespace, client workers (:mod:`.contention_client`) open N SDK connections in the client namespace, the
emulator's clocks restart (``origin``) and every answer starts together. Flow ``i`` asks the demo for seed
``seed + i``, so every scheme serves the same answers on the same trace and loss pattern.

The aggregation (:func:`percentile`, :func:`jain_index`, :func:`down_link_summary`, :func:`run_summary`,
:func:`scheme_summary`) is pure: it takes the workers' flow records and the emulator's packet log rows.

Only the standard library at import time (the testbed CLI's rule): the run imports the testbed when it starts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from tokenwire.daemon.cli import CLIError, cell, positive_int

from .cli import ctrl_c_throughout
from .path_config import PathConfig, check_answers

if TYPE_CHECKING:
    from .topology import Testbed
    from .trace import Trace

CONTENTION_SCHEMES = ("chatterbox", "stream", "duplicate")
"""The daemon's schemes (``sse-tcp`` is no daemon scheme: compare runs its own server for it)."""
MAX_CHATS = 200
CHATS_PER_WORKER = 15
"""Chats one client process holds: the clients' CPU spread over processes, as the daemon's is not."""
PORT = 8443
UDP = "17"  # a packet log row's ``proto`` (the IP protocol number)
READY_S = 60.0
CONNECT_WAIT_S = 90.0  # the workers' connects (30 s each, concurrent) and their start


class ContentionError(RuntimeError):
    """A run failed (a daemon or worker that exits, never connects or stops answering)."""


@dataclass
class ContentionConfig(PathConfig):
    chats: int = 10
    schemes: list[str] = field(default_factory=lambda: ["chatterbox", "stream"])
    tokens: int = 300
    rate: float = 30.0
    seed: int = 0
    runs: int = 1
    timeout_s: float | None = None

    def validate(self) -> None:
        unknown = [s for s in self.schemes if s not in CONTENTION_SCHEMES]
        if unknown or not self.schemes:
            raise ValueError(f"--schemes: unknown scheme(s) {unknown}; choose from {', '.join(CONTENTION_SCHEMES)}")
        twice = sorted({s for s in self.schemes if self.schemes.count(s) > 1})
        if twice:
            raise ValueError(f"--schemes: {', '.join(twice)} listed twice")
        if not 1 <= self.chats <= MAX_CHATS:
            raise ValueError(f"--chats {self.chats}: 1 to {MAX_CHATS}")
        check_answers(self.tokens, self.runs, self.rate)
        self.validate_path()

    def run_timeout(self) -> float:
        """Deadline for one run's answers from "go": generous (a congested link may take several times the
        generation time), but a stuck run does fail."""
        if self.timeout_s is not None:
            return self.timeout_s
        return 90.0 + 4.0 * self.tokens / self.rate + 0.5 * self.chats


# --- the pure part: aggregation --------------------------------------------------------------------------


def percentile(values: Iterable[float | None], q: float) -> float | None:
    """The ``q`` quantile (0..1, linear between ranks: ``metrics.percentile``) of the known values; None without any
    (None and NaN are unknown: a flow that failed, or a stall ratio the SDK could not measure)."""
    from tokenwire.transport.metrics import percentile as linear

    xs = [float(v) for v in values if v is not None and not math.isnan(v)]
    return linear(xs, 100.0 * q) if xs else None


def jain_index(values: Iterable[float | None]) -> float | None:
    """Jain's fairness index (sum x)^2 / (n sum x^2): 1 when every flow gets the same, 1/n when one gets all.
    None without a known value; 1 for all-zero (equally nothing)."""
    xs = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not xs:
        return None
    squares = sum(x * x for x in xs)
    return 1.0 if squares == 0 else sum(xs) ** 2 / (len(xs) * squares)


def down_link_summary(rows: Iterable[dict[str, str]], trace: Trace, origin: float,
                      server_port: int = PORT) -> dict[str, Any]:
    """The down link from the emulator's packet log, from ``origin`` (the trace's restart) on.

    ``utilisation``: IP bytes delivered over the trace's capacity from the origin to the last delivery's departure
    (the link's byte budget: a small packet leaves the rest of its opportunity to the next one). ``sojourn_ms_*``:
    queueing of the delivered packets. ``bytes_by_port``: IP bytes the daemon sent to each client port, as
    ``compare`` counts them (every packet offered to the link, delivered or not: what the scheme spent).
    """
    packets = lost = dropped = delivered_bytes = 0
    last_departure: float | None = None
    sojourns: list[float] = []
    by_port: dict[int, int] = {}
    for row in rows:
        if row["dir"] != "down" or float(row["arrival"]) < origin:
            continue
        packets += 1
        size = int(row["size"])
        if row["proto"] == UDP and row["sport"] == str(server_port) and row["dport"]:
            port = int(row["dport"])
            by_port[port] = by_port.get(port, 0) + size
        if row["fate"] == "delivered":
            delivered_bytes += size
            if row["departure"]:
                dep = float(row["departure"])
                last_departure = dep if last_departure is None else max(last_departure, dep)
            if row["sojourn_ms"]:
                sojourns.append(float(row["sojourn_ms"]))
        elif row["fate"] == "lost":
            lost += 1
        else:
            dropped += 1
    span = None if last_departure is None else max(0.0, last_departure - origin)
    capacity = trace.bytes_between(0.0, span * 1000.0) if span else 0
    return {
        "packets": packets, "lost": lost, "dropped": dropped, "delivered_bytes": delivered_bytes,
        "span_s": span, "capacity_bytes": capacity,
        "utilisation": delivered_bytes / capacity if capacity else None,
        "sojourn_ms_p50": percentile(sojourns, 0.5), "sojourn_ms_p99": percentile(sojourns, 0.99),
        "bytes_by_port": by_port,
    }  # fmt: skip


def flow_finished(flow: dict[str, Any], tokens: int) -> bool:
    """The whole answer arrived, digest verified: the flow counts in the stall and TTFT percentiles."""
    return "error" not in flow and flow.get("tokens") == tokens and bool(flow.get("digest_verified"))


def goodput_tps(flow: dict[str, Any]) -> float | None:
    """Tokens rendered per second from the request to the last render. 0 for a flow that rendered nothing (starved,
    or never connected): left out, it made Jain's index read 1.0 exactly when a flow got nothing. None when a flow
    rendered tokens but lacks a time to divide by."""
    start, last, n = flow.get("request_time"), flow.get("last_render"), flow.get("tokens_rendered")
    if not n:
        return 0.0
    if start is None or last is None or last <= start:
        return None
    return float(n) / (float(last) - float(start))


def run_summary(flows: list[dict[str, Any]], link: dict[str, Any], tokens: int) -> dict[str, Any]:
    """One run of one scheme: its flows (with their wire bytes and goodput added) and its link figures."""
    by_port = link["bytes_by_port"]
    rows = []
    for f in sorted(flows, key=lambda f: f.get("flow", 0)):
        row = {**f, "finished": flow_finished(f, tokens), "goodput_tps": goodput_tps(f)}
        wire = by_port.get(f.get("port")) if f.get("port") is not None else None
        row["wire_bytes"] = wire
        n = f.get("tokens_rendered") or 0
        row["bytes_per_token"] = wire / n if wire is not None and n else None
        rows.append(row)
    done = [r for r in rows if r["finished"]]
    delivered = sum(r.get("tokens_rendered") or 0 for r in rows)
    sent = sum(by_port.values())
    return {
        "flows": rows,
        "flows_finished": len(done),
        "digests_verified": sum(1 for r in rows if r.get("digest_verified")),
        "stall_ratio_p50": percentile((r.get("stall_ratio") for r in done), 0.5),
        "stall_ratio_p90": percentile((r.get("stall_ratio") for r in done), 0.9),
        "ttft_ms_p50": percentile((r.get("ttft_ms") for r in done), 0.5),
        "ttft_ms_p90": percentile((r.get("ttft_ms") for r in done), 0.9),
        "jain_goodput": jain_index(r["goodput_tps"] for r in rows),
        "tokens_delivered": delivered,
        "bytes_per_token": sent / delivered if delivered else None,
        "link": {k: v for k, v in link.items() if k != "bytes_by_port"},
    }


def _mean(values: Iterable[float | None]) -> float | None:
    xs = [float(v) for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(xs) if xs else None


def scheme_summary(runs: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    """A scheme over its runs: per-flow percentiles over every finished flow of every run; the runs' means of
    the per-run figures (bytes per token, link, Jain, CPU)."""
    flows = [f for r in runs for f in r["flows"]]
    done = [f for f in flows if f["finished"]]
    return {
        "stall_ratio_p50": percentile((f.get("stall_ratio") for f in done), 0.5),
        "stall_ratio_p90": percentile((f.get("stall_ratio") for f in done), 0.9),
        "ttft_ms_p50": percentile((f.get("ttft_ms") for f in done), 0.5),
        "ttft_ms_p90": percentile((f.get("ttft_ms") for f in done), 0.9),
        "bytes_per_token": _mean(r["bytes_per_token"] for r in runs),
        "utilisation": _mean(r["link"]["utilisation"] for r in runs),
        "sojourn_ms_p50": _mean(r["link"]["sojourn_ms_p50"] for r in runs),
        "sojourn_ms_p99": _mean(r["link"]["sojourn_ms_p99"] for r in runs),
        "jain_goodput": _mean(r["jain_goodput"] for r in runs),
        "daemon_cpu_share": _mean(r.get("daemon_cpu_share") for r in runs),
        "flows": len(flows),
        "flows_finished": len(done),
        "digests_verified": sum(r["digests_verified"] for r in runs),
        "per_run_stall_ratio_p50": [r["stall_ratio_p50"] for r in runs],
    }


COMPARED = (("stall_ratio_p50", "median stall ratio"), ("stall_ratio_p90", "p90 stall ratio"))


def comparison_block(schemes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Chatterbox against each other scheme, as compare's block: ``chatterbox / other - 1`` per run and of the
    runs' pooled figures (negative: chatterbox lower, i.e. better)."""
    from .compare import COMPARISON_REFERENCE, relative_change

    block: dict[str, Any] = {"reference_scheme": COMPARISON_REFERENCE,
                             "change": "chatterbox / other - 1 (negative: chatterbox lower, i.e. better)", "vs": {}}
    ref = schemes.get(COMPARISON_REFERENCE)
    if ref is None:
        return block
    for other, d in schemes.items():
        if other == COMPARISON_REFERENCE:
            continue
        block["vs"][other] = {
            **{f"{key}_change": relative_change(ref[key], d[key]) for key, _ in COMPARED},
            "stall_ratio_p50_change_per_run": [relative_change(a, b) for a, b in
                                               zip(ref["per_run_stall_ratio_p50"], d["per_run_stall_ratio_p50"],
                                                   strict=True)],
        }
    return block


def comparison_lines(block: dict[str, Any]) -> list[str]:
    from .sim_cli import lower_or_higher

    lines = []
    for other, d in block.get("vs", {}).items():
        parts = []
        for key, label in COMPARED:
            change = d[f"{key}_change"]
            said = None if change is None else lower_or_higher(1.0 + change, 1.0)
            parts.append(f"{label} {said}" if said else f"{label}: no ratio (a side unknown, or {other}'s is 0)")
        lines.append(f"{block['reference_scheme']} vs {other}: " + ", ".join(parts))
    return lines


# --- the run ------------------------------------------------------------------------------------------------


Progress = Callable[[str, int, int], None]


def _cpu_seconds(pid: int) -> float:
    from tokenwire.daemon.bench_daemon import _cpu_seconds as cpu

    return cpu(pid)


def _daemon_config(tb: Testbed, folder: str, cfg: ContentionConfig) -> tuple[str, str]:
    """The daemon's config file (demo upstream at ``cfg.rate``, no metrics listener) and its CA file."""
    from pathlib import Path

    from tokenwire.transport.tls import dev_cert

    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    dev_cert().write(Path(cert), Path(key))
    path = os.path.join(folder, "tokenwire.toml")
    with open(path, "w") as fh:
        fh.write(f'[server]\nlisten = ["{tb.server_addr}:{PORT}"]\ncertificate = "{cert}"\nprivate_key = "{key}"\n'
                 f'[metrics]\nlisten = ""\n[logging]\nlevel = "warning"\n'
                 f"[limits]\nmax_tokens = {max(cfg.tokens, 16_384)}\n"
                 f'[[upstreams]]\nname = "demo"\ntype = "demo"\nrate = {cfg.rate}\nmax_tokens = {cfg.tokens}\n')
    return path, cert


def _wait_ready(notify: socket.socket, daemon: subprocess.Popen, err_path: str, watches: Sequence[Any]) -> None:
    from .child import last_error_line

    notify.settimeout(0.1)
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            if "READY=1" in notify.recv(4096).decode(errors="replace"):
                return
        for w in watches:
            w.check()
        if daemon.poll() is not None:
            with open(err_path, errors="replace") as fh:
                why = last_error_line(fh.read())
            raise ContentionError(f"the daemon exited at start (status {daemon.returncode})" + (f": {why}" if why
                                                                                              else ""))
    raise ContentionError(f"the daemon did not report READY within {READY_S:g} s")


def run_one(scheme: str, cfg: ContentionConfig, seed: int, workdir: str, progress: Progress | None = None, *,
            scratch: str | None = None) -> dict[str, Any]:
    """One scheme's run through a fresh testbed: :func:`run_summary` plus the daemon's and emulator's CPU share."""
    from .child import ChildError, ExitWatch, exit_status
    from .compare import _watching_emulator
    from .netns import TestbedError
    from .pktlog import read_packet_log
    from .topology import Testbed
    from .trace import trace_from_spec

    tag = f"{scheme}.seed{seed}"
    folder = os.path.join(workdir, tag)
    os.makedirs(folder, exist_ok=True)
    log_path = os.path.join(folder, "pktlog.csv")
    total = cfg.chats * cfg.tokens
    try:
        with (Testbed(cfg.emulator_config(seed, log_path), backend="userspace", scratch=scratch,
                      emulator_stderr=os.path.join(folder, "emulator.stderr")) as tb,
              _watching_emulator(tb, scheme, seed) as watches,
              socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify):
            conf, cafile = _daemon_config(tb, folder, cfg)
            notify_path = os.path.join(folder, "notify.sock")
            notify.bind(notify_path)
            err_path = os.path.join(folder, "daemon.stderr")
            with open(err_path, "w") as err:
                daemon = tb.popen(tb.server_ns, [sys.executable, "-m", "tokenwire.daemon.cli", "daemon", "--config",
                                                 conf], env={**os.environ, "NOTIFY_SOCKET": notify_path},
                                  stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT)
            _wait_ready(notify, daemon, err_path, watches)
            daemon_watch = ExitWatch(daemon, lambda st: ChildError(f"the daemon exited ({exit_status(st)}) during "
                                                                   f"{scheme} seed {seed}; see {err_path}"))
            try:
                workers = _start_workers(tb, cfg, scheme, seed, folder, cafile, [*watches, daemon_watch])
                deadline = time.monotonic() + CONNECT_WAIT_S
                connected = sum(int(w.wait_for("connected", deadline - time.monotonic())["connected"])
                                for w in workers)
                if connected == 0:
                    raise ContentionError(f"{scheme} seed {seed}: no chat connected to the daemon")
                origin = tb.origin()
                cpu0, emu0, t0 = _cpu_seconds(daemon.pid), _emulator_cpu(tb), time.monotonic()
                for w in workers:
                    w.send("go")
                _await_workers(workers, scheme, total, cfg.run_timeout(), progress)
                wall = time.monotonic() - t0
                cpu1, emu1 = _cpu_seconds(daemon.pid), _emulator_cpu(tb)
            finally:
                daemon_watch.close()
            daemon.terminate()
            try:
                daemon.wait(10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
    except TestbedError as exc:
        raise ContentionError(f"{scheme} (seed {seed}): testbed: {exc}") from None
    except ChildError as exc:
        raise ContentionError(f"{scheme} (seed {seed}): {exc}") from None
    flows: list[dict[str, Any]] = []
    for k in range(len(workers)):
        with open(os.path.join(folder, f"worker{k}.json")) as fh:
            flows += json.load(fh)["flows"]
    link = down_link_summary(read_packet_log(log_path), trace_from_spec(cfg.down_trace), origin)
    run = run_summary(flows, link, cfg.tokens)
    run.update(scheme=scheme, seed=seed, chats=cfg.chats, wall_s=wall, daemon_cpu_share=(cpu1 - cpu0) / wall,
               emulator_cpu_share=None if emu0 is None or emu1 is None else (emu1 - emu0) / wall)
    return run


def _emulator_cpu(tb: Testbed) -> float | None:
    emulator = tb.emulator
    return None if emulator is None else _cpu_seconds(emulator.pid)


def _start_workers(tb: Testbed, cfg: ContentionConfig, scheme: str, seed: int, folder: str, cafile: str,
                   watches: Sequence[Any]) -> list[Any]:
    from .child import Child

    workers = []
    for k, first in enumerate(range(0, cfg.chats, CHATS_PER_WORKER)):
        spec = {"host": tb.server_addr, "port": PORT, "cafile": cafile, "scheme": scheme, "tokens": cfg.tokens,
                "rate": cfg.rate, "seed": seed, "first": first, "chats": min(CHATS_PER_WORKER, cfg.chats - first),
                "out": os.path.join(folder, f"worker{k}.json"), "timeout": cfg.run_timeout()}
        err_path = os.path.join(folder, f"worker{k}.stderr")
        with open(err_path, "w") as err:
            proc = tb.popen(tb.client_ns, [sys.executable, "-m", "tokenwire.testbed.contention_client",
                                           json.dumps(spec)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
        workers.append(Child(proc, f"{scheme} client worker {k}", err_path, watches))
    return workers


def _await_workers(workers: list[Any], scheme: str, total: int, timeout: float, progress: Progress | None) -> None:
    """Every worker's "done"; progress from their reports (each reports about once a second, so a round over
    them takes about that long)."""
    deadline = time.monotonic() + timeout
    rendered = [0] * len(workers)
    pending = set(range(len(workers)))
    while pending:
        for k in sorted(pending):
            ev = workers[k].event(deadline)
            if "progress" in ev:
                rendered[k] = int(ev["progress"])
            if ev.get("done"):
                pending.discard(k)
        if progress:
            progress(scheme, sum(rendered), total)


def run_contention(cfg: ContentionConfig, *, workdir: str | None = None, progress: Progress | None = None,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every scheme for ``cfg.runs`` seeds; the JSON document."""
    from .netns import run_folder

    cfg.validate()
    per_scheme: dict[str, list[dict[str, Any]]] = {s: [] for s in cfg.schemes}
    with run_folder(workdir, "tw-contention-") as (wd, scratch):
        for k in range(cfg.runs):
            seed = cfg.seed + k
            for s in cfg.schemes:
                if log:
                    log(f"seed {seed}: {s}, {cfg.chats} chats")
                per_scheme[s].append(run_one(s, cfg, seed, wd, progress, scratch=scratch))
    schemes = {s: scheme_summary(rs, cfg.tokens) for s, rs in per_scheme.items()}
    return {"schemes": schemes, "comparison": comparison_block(schemes), "runs": per_scheme, "config": asdict(cfg),
            "complete": True}


# --- the command ------------------------------------------------------------------------------------------


def register_contention(tsub: argparse._SubParsersAction) -> None:
    from .cli import add_path_args

    p = tsub.add_parser("contention", help="N chats at once through one emulated bottleneck, per scheme")
    add_path_args(p, down_required=True)
    p.add_argument("--chats", type=positive_int, default=10, metavar="N",
                   help=f"concurrent chats, 1 to {MAX_CHATS} (the daemon, its clients and the emulator share this "
                   "host's CPU: a 2-core host kept up with about 30 chatterbox chats at 30 tokens/s before CPU, not "
                   "the link, set their stall; see docs/testbed.md)")
    p.add_argument("--schemes", default="chatterbox,stream",
                   help=f"comma-separated, from {', '.join(CONTENTION_SCHEMES)}")
    p.add_argument("--tokens", type=positive_int, default=300, metavar="N", help="tokens per answer")
    p.add_argument("--rate", type=float, default=30.0, metavar="R", help="tokens per second of each answer")
    p.add_argument("--runs", type=positive_int, default=1, help="seeds seed, seed+1, ... (flows pooled)")
    p.add_argument("--json", metavar="PATH", help="write the summary JSON (with per-flow rows) here")
    p.add_argument("--keep", metavar="DIR", help="keep packet logs, daemon and worker outputs in DIR")
    p.set_defaults(handler=cmd_contention)


def config_from_args(args: argparse.Namespace) -> ContentionConfig:
    """The run's configuration, its checks done (:class:`CLIError`), before anything is built."""
    from .cli import check_path, up_spec

    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    if not schemes:
        raise CLIError(f"--schemes: no scheme given; choose from {', '.join(CONTENTION_SCHEMES)}")
    if "sse-tcp" in schemes:
        raise CLIError("--schemes: sse-tcp is not a daemon scheme (`testbed compare` runs it, one chat)")
    if args.backend == "kernel":
        raise CLIError("--backend kernel: contention needs the userspace emulator (its packet log measures the link)")
    cfg = ContentionConfig(
        down_trace=args.down_trace, up_trace=up_spec(args), delay_ms=args.delay_ms, loss=args.loss,
        up_loss=args.up_loss, queue=args.queue, chats=args.chats, schemes=schemes, tokens=args.tokens,
        rate=args.rate, seed=args.seed, runs=args.runs,
    )  # fmt: skip
    check_path(cfg.down_trace, cfg.up_trace, cfg.validate)
    return cfg


@ctrl_c_throughout
def cmd_contention(args: argparse.Namespace) -> int:
    """Under :func:`.cli.ctrl_c_throughout`: SIGTERM and SIGHUP tear the namespaces down as Ctrl-C does."""
    from tokenwire.daemon.cli import write_json

    from .child import ChildError
    from .netns import TestbedError, check_root

    cfg = config_from_args(args)
    try:
        check_root()
    except TestbedError as exc:
        raise CLIError(str(exc)) from None
    total = len(cfg.schemes) * cfg.runs
    done = [0]
    shown_at = 0.0
    shown: tuple[str, int] | None = None  # the last progress line's (scheme, count): each worker's report calls
    started = time.monotonic()

    def log(msg: str) -> None:
        done[0] += 1
        print(f"[{done[0]}/{total}] {msg}", file=sys.stderr, flush=True)

    def progress(scheme: str, k: int, n: int) -> None:
        nonlocal shown_at, shown
        now = time.monotonic()
        if (now - shown_at >= 5.0 or k >= n) and shown != (scheme, k):
            shown_at, shown = now, (scheme, k)
            print(f"    {scheme}: {k}/{n} tokens rendered ({k / n:.0%}), {now - started:.0f} s elapsed",
                  file=sys.stderr, flush=True)

    try:
        summary = run_contention(cfg, workdir=args.keep, progress=progress, log=log)
    except (ContentionError, TestbedError, ChildError) as exc:
        raise CLIError(str(exc)) from None
    print_table(summary)
    if args.json:
        write_json(summary, args.json)
    return 0


def print_table(summary: dict[str, Any]) -> None:
    f = cell
    print(f"{'scheme':<11} {'stall p50':>9} {'p90':>7} {'TTFT p50':>9} {'p90':>7} {'B/token':>8} {'util':>6} "
          f"{'sojourn p50/p99 ms':>19} {'Jain':>6} {'CPU':>5} {'finished':>9} {'digests':>8}")
    for s, d in summary["schemes"].items():
        soj = f"{f(d['sojourn_ms_p50'], '.1f')}/{f(d['sojourn_ms_p99'], '.1f')}"
        print(f"{s:<11} {f(d['stall_ratio_p50'], '9.3f')} {f(d['stall_ratio_p90'], '7.3f')} "
              f"{f(d['ttft_ms_p50'], '9.0f')} {f(d['ttft_ms_p90'], '7.0f')} {f(d['bytes_per_token'], '8.0f')} "
              f"{f(d['utilisation'], '6.1%')} {soj:>19} {f(d['jain_goodput'], '6.3f')} "
              f"{f(d['daemon_cpu_share'], '5.2f')} {d['flows_finished']:>4}/{d['flows']:<4} "
              f"{d['digests_verified']:>8}")
    for line in comparison_lines(summary["comparison"]):
        print(line)
