"""``tokenwire testbed swiftqueue``: argument parsing, progress output, table, JSON and plot.

Only argparse at import time (the testbed CLI's rule); the evaluation imports its modules when run.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from tokenwire.daemon.cli import CLIError, cell

from .sim_cli import lower_or_higher

POLICY_NAMES = ("classic", "l4s", "swiftqueue", "oracle")


def register_swiftqueue(tsub: argparse._SubParsersAction) -> None:
    from .cli import add_path_args

    p = tsub.add_parser(
        "swiftqueue", help="per-packet ECN marking policies against each other through DualPI2",
        description="Sends one marked flow through a DualPI2 bottleneck with cross traffic, once per marking "
        "policy (classic: every packet in the C queue; l4s: every packet ECT(1), in the L queue; swiftqueue: per "
        "packet, the queue its latency model predicts faster; oracle: the queue the emulator says is faster now, "
        "an upper bound), and reports the flow's one-way latency percentiles, throughput, share of packets in L, "
        "CE and drop rates, and the stall ratio of a token stream. Needs root, or --virtual for virtual time.",
    )
    add_path_args(p, down_required=True)
    p.set_defaults(queue="dualpi2", delay_ms=20.0)
    for action in p._actions:
        if action.dest == "queue":
            action.help = ("the DualQ bottleneck of both directions: dualpi2[:key=value,...] (a policy chooses "
                           "between its L and C queues per packet; a single queue is refused)")
    p.add_argument("--cross", action="append", metavar="SPEC",
                   help="cross traffic (repeatable): tcp:cubic|bbr|reno, udp-ect1:RATE, "
                   "onoff-ect1:RATE:ON_MS:OFF_MS; virtual only: scalable[:N], scalable-burst:N:ON_MS:OFF_MS, "
                   "tcp-onoff:ON_MS:OFF_MS[:DELAY_MS]")
    p.add_argument("--policies", default=",".join(POLICY_NAMES),
                   help=f"comma-separated, from {', '.join(POLICY_NAMES)}")
    p.add_argument("--seconds", type=float, default=30.0, metavar="S", help="length of each policy's run")
    p.add_argument("--flow", default="tokens:50", metavar="SPEC",
                   help="the marked flow: tokens:RATE (Chatterbox stream, tokens/s); virtual only: rt:RATE "
                   "(paced 1200-B packets), bulk (scalable window)")
    p.add_argument("--margin-ms", type=float, default=1.0, help="swiftqueue: L must win by this much")
    p.add_argument("--hysteresis-ms", type=float, default=3.0,
                   help="swiftqueue: switching band: the flow changes queue only when the predicted gain, after "
                   "--margin-ms, exceeds it, so decisions do not flap")
    p.add_argument("--probe-interval", type=float, default=0.0, metavar="S",
                   help="swiftqueue: at most one probe packet per interval into the unused queue (0: never)")
    p.add_argument("--no-refuge-rule", dest="refuge_only", action="store_false",
                   help="swiftqueue: leave L for C on the predictions alone, even when C's last samples show a "
                   "backlog (by default only an empty-looking C queue counts as a refuge)")
    p.add_argument("--model", metavar="PATH", help="swiftqueue: ONNX latency model (default: the shipped one)")
    p.add_argument("--virtual", action="store_true", help="virtual time (vsim): no root, deterministic, fast")
    p.add_argument("--json", metavar="PATH", help="write the summary JSON here")
    p.add_argument("--plot", metavar="PATH", help="write a PNG (latency CDF per policy + L/C timeline)")
    p.add_argument("--keep", metavar="DIR", help="namespaces: keep packet logs and endpoint outputs in DIR")
    p.set_defaults(handler=cmd_swiftqueue)


def _config(args: argparse.Namespace) -> Any:
    from .cli import check_path, up_spec
    from .loss import NoLoss, parse_loss
    from .swiftqueue_eval import SwiftQueueConfig, parse_cross_spec

    cfg = SwiftQueueConfig(
        down_trace=args.down_trace, up_trace=up_spec(args), delay_ms=args.delay_ms, queue=args.queue,
        loss=args.loss, up_loss=args.up_loss,
        cross=args.cross or [], policies=[s.strip() for s in args.policies.split(",") if s.strip()],
        seconds=args.seconds, seed=args.seed, flow=args.flow, margin_ms=args.margin_ms,
        hysteresis_ms=args.hysteresis_ms, probe_interval_s=args.probe_interval, refuge_only=args.refuge_only,
        model=args.model, virtual=args.virtual,
    )  # fmt: skip
    # the testbed's path checks (a trace gap over 30 s, a large trace announced), as `compare` and `kv` take them:
    # cfg.validate alone let a trace with a minute-long gap build the namespaces and fail later
    check_path(cfg.down_trace, cfg.up_trace, cfg.validate)
    if args.model is not None and "swiftqueue" not in cfg.policies:
        # the model is the swiftqueue policy's alone: without that policy it was never loaded, so a file that does
        # not exist exited 0 and the table read as if the model had been measured (as train refuses --net when
        # --kinds has no transformer)
        raise CLIError(f"--model is the swiftqueue policy's latency model, and --policies {args.policies} runs no "
                       "swiftqueue: add swiftqueue to --policies or drop --model")
    if args.virtual and (not isinstance(parse_loss(args.up_loss), NoLoss) or args.up_trace or args.up_mbps):
        # vsim returns each ack after a fixed delay: an up-link option would be accepted and ignored
        raise CLIError("--up-trace, --up-mbps and --up-loss need the namespace run: in virtual time acks return "
                       "after the one-way delay, without a modelled up link")
    if args.virtual and any(parse_cross_spec(c).cc == "bbr" for c in cfg.cross):
        # as in `predictor collect`: BBR paces at its bandwidth estimate, which no virtual-time sender models;
        # taken as Reno it was a different experiment under the same name
        raise CLIError("--cross tcp:bbr needs the namespace run (kernel TCP): virtual time has no rate-based "
                       "sender; use tcp:reno or tcp:cubic there")
    if args.backend == "kernel":
        # every policy's latencies, queues and CE marks come from the emulator's per-packet log, which kernel
        # qdiscs do not keep: the oracle (blamed alone before, even for --policies l4s) is only a second reason
        raise CLIError("--backend kernel: " + ("virtual time runs in the simulator, with no backend to choose"
                       if args.virtual else kernel_refusal(cfg.policies)))
    return cfg


def kernel_refusal(policies: list[str]) -> str:
    """Why the namespace run cannot use kernel qdiscs, for these policies."""
    why = ("the swiftqueue run reads each marked packet's queue, ECN marks and latency from the userspace "
           "emulator's per-packet log, which kernel qdiscs do not keep")
    if "oracle" in policies:
        why += "; and the oracle policy reads the emulator's queue state"
    return why + " (use --backend userspace or auto)"


def cmd_swiftqueue(args: argparse.Namespace) -> int:
    from .cli import require_plotting, sigterm_as_ctrl_c, write_results

    cfg = _config(args)
    require_plotting(args)
    tty = sys.stderr.isatty()
    started = time.monotonic()
    last = [0.0]

    def log(msg: str) -> None:
        print(("\n" if tty else "") + msg, file=sys.stderr, flush=True)

    def progress(policy: str, t: float, total: float) -> None:
        now = time.monotonic()
        line = f"    {policy}: {t:.0f}/{total:.0f} s ({t / total:.0%}), {now - started:.0f} s elapsed"
        if tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif now - last[0] >= 5.0 or t >= total:
            last[0] = now
            print(line, file=sys.stderr, flush=True)

    if cfg.virtual:
        from .swiftqueue_eval import run_virtual_all

        with sigterm_as_ctrl_c():  # as the namespace run: SIGTERM said nothing and exited 143
            summary, runs = run_virtual_all(cfg, log_fn=log, progress=progress)
    else:
        from .child import ChildError
        from .netns import TestbedError, check_root
        from .swiftqueue_netns import SwiftQueueRunError, run_netns_all

        try:
            check_root()
        except TestbedError as exc:
            raise CLIError(f"{exc} (or add --virtual for the virtual-time run)") from None
        try:
            with sigterm_as_ctrl_c():
                summary, runs = run_netns_all(cfg, workdir=args.keep, log_fn=log, progress=progress)
        except (SwiftQueueRunError, TestbedError, ChildError) as exc:
            raise CLIError(str(exc)) from None
    if tty:
        print(file=sys.stderr)
    print_table(summary)

    def plot() -> None:
        from .swiftqueue_plot import plot_swiftqueue

        plot_swiftqueue(summary, runs, args.plot)

    write_results(summary, args, plot)
    # as `sim` does for a scheme without a finished run: the results are kept (table, JSON, plot), the exit status
    # says that a policy measured nothing (--loss iid:1 exited 0 with every cell '-' and no comparison), or that
    # swiftqueue measured l4s instead (its model failed: the run exited 0 reporting "P99 0.0% lower than l4s")
    return 1 if silent_policies(summary) or fallen_back(summary) else 0


def fallen_back(summary: dict[str, Any]) -> list[str]:
    """The policies that marked like ``l4s`` instead of themselves for some packets (their ``fallback`` block)."""
    return [name for name, d in summary["policies"].items() if d.get("fallback")]


def fallback_line(name: str, fb: dict[str, Any]) -> str:
    """The table's line under a policy's row that fell back: what failed, when, for how many packets."""
    what = "could not be loaded" if fb.get("stage") == "load" else "failed on the packet path"
    at = f" at {fb['at_s']:.3f} s" if isinstance(fb.get("at_s"), int | float) else ""
    reason = str(fb.get("reason", ""))
    reason = reason if len(reason) <= 160 else reason[:157] + "..."
    return (f"  ^ {name}: FELL BACK to {fb.get('to', 'l4s')}{at}: the latency model {what} ({reason}); "
            f"{fb.get('packets')} of {fb.get('of_packets')} packets marked like {fb.get('to', 'l4s')}, "
            "so this row is not a swiftqueue result")


def silent_policies(summary: dict[str, Any]) -> list[str]:
    """The policies whose marked flow delivered no packet after the warm-up: no latency, nothing to compare."""
    return [name for name, d in summary["policies"].items() if d.get("p99_ms") is None]


def rendered_cell(d: dict[str, Any], width: int) -> str:
    """``rendered/generated`` tokens (the stall ratio covers all of them; a run that rendered 835 of 3000 showed
    only its ratio), ``-`` for a flow that is not a token stream."""
    if d.get("tokens") is None:
        return f"{'-':>{width}}"
    return f"{d.get('tokens_rendered', 0)}/{d['tokens']}".rjust(width)


def print_table(summary: dict[str, Any]) -> None:
    f = cell
    pol = summary["policies"]
    w = max([8] + [len(rendered_cell(d, 0)) for d in pol.values()])
    print(f"{'policy':<11} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'p99.9 ms':>8} {'Mbit/s':>7} {'L share':>7} "
          f"{'CE':>6} {'drop':>6} {'stall':>7} {'rendered':>{w}}")
    for name, d in pol.items():
        print(f"{name:<11} {f(d['p50_ms'], '7.1f')} {f(d['p95_ms'], '7.1f')} {f(d['p99_ms'], '7.1f')} "
              f"{f(d['p999_ms'], '8.1f')} {f(d['throughput_mbps'], '7.3f')} {f(d['l_share'], '7.1%')} "
              f"{f(d['ce_rate'], '6.1%')} {f(d['drop_rate'], '6.1%')} {f(d.get('stall_ratio'), '7.2%')} "
              f"{rendered_cell(d, w)}")
        if d.get("fallback"):
            print(fallback_line(name, d["fallback"]))
    for name, c in summary.get("comparison", {}).items():
        change = lower_or_higher(pol[name]["p99_ms"], pol["l4s"]["p99_ms"])
        parts = [f"{name}: P99 {change} than l4s"]
        for key, label in (("throughput_ratio_vs_l4s", "throughput (Mbit/s)"),
                           ("goodput_ratio_vs_l4s", "token goodput (tokens rendered/s)")):
            if c.get(key) is not None:
                parts.append(f"{label} x{c[key]:.3f}")
        fb = pol[name].get("fallback")
        print(", ".join(parts) + (f" ({name} FELL BACK to {fb.get('to', 'l4s')} for {fb.get('packets')} of "
                                  f"{fb.get('of_packets')} packets)" if fb else ""))
    silent = silent_policies(summary)
    warmup = summary.get("config", {}).get("warmup_s")
    after = f" after the {warmup:g} s warm-up" if isinstance(warmup, int | float) else ""
    for name in silent:
        d = pol[name]
        lost = f" of {d['packets']} sent ({cell(d['drop_rate'], '.0%')} dropped)" if d.get("packets") else ""
        print(f"{name}: FAILED: the marked flow delivered no packet{lost}{after}; no latency to report")
    if "l4s" in silent and len(pol) > 1:
        print("P99 vs l4s: comparison unavailable (l4s delivered no packet)")
    sq = summary["policies"].get("swiftqueue", {})
    fc = sq.get("forecaster")
    failed = " (FAILED: swiftqueue fell back to l4s)" if sq.get("fallback") else ""
    print(f"backend {summary['backend']}" + (f"; swiftqueue forecaster: {fc}{failed}" if fc else ""))
