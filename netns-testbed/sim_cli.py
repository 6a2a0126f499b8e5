"""``tokenwire sim``: compare token-streaming schemes in virtual time on the real protocol stack."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from tokenwire.daemon.cli import cell, positive_int, seed_arg, write_json
from tokenwire.testbed.path_config import START_MODES

MAX_SIM_CHATS = 200
"""``--chats`` at most: ``testbed contention``'s bound (its ``MAX_CHATS``), so that the two take the same runs."""

LONG_RUN_TOKENS = 5_000
"""Tokens simulated in all (``--tokens`` x schemes x runs) from which progress is printed: 1.5-2 s on the
development VM (the default, 400 x 3, takes half a second and prints none)."""


def count_width(rows: Iterable[dict]) -> int:
    """Digits of the largest ``tokens_sent``/``tokens_rendered`` of a table's rows, at least 4: a fixed 4/4 cell
    overflowed at 5 digits ("20000/20000") and shifted the columns after it."""
    return max([4] + [len(str(d[k])) for d in rows for k in ("tokens_sent", "tokens_rendered")])


def lower_or_higher(value: float, reference: float) -> str | None:
    """``value`` against ``reference`` as "12.3% lower" or "3.8% higher", the one wording of a comparison line
    (``sim``, ``testbed swiftqueue``, ``predictor eval``): a worse value read "-3.8% lower" in one of them. None
    where no ratio exists: a reference that is not > 0, or a NaN or infinite side."""
    if not (reference > 0 and math.isfinite(reference) and math.isfinite(value)):
        return None
    change = 100.0 * (1.0 - value / reference)
    return f"{abs(change):.1f}% {'higher' if round(change, 1) < 0 else 'lower'}"  # -0.04: "0.0% lower"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sim",
        help="compare chatterbox/stream/duplicate in virtual time over a lossy channel or a trace",
        description="Runs the real sans-I/O stack (aioquic + tokenwire sessions) of each scheme over a channel "
        "with one-way delay and loss, or over the testbed's trace-driven link (--down-trace), in virtual time, "
        "and reports stall ratio, TTFT, token delay and bytes.",
    )
    p.add_argument("--schemes", default="chatterbox,stream,duplicate", help="comma-separated (default: all three)")
    p.add_argument("--tokens", type=int, default=400, help="tokens per answer (default: 400)")
    p.add_argument("--rate", type=float, default=30.0, help="generation rate, tokens/s (default: 30)")
    p.add_argument("--delay-ms", type=float, default=50.0, help="one-way delay in ms (default: 50)")
    p.add_argument(
        "--loss",
        default="none",
        help="none | iid:P | ge:P_GOOD_TO_BAD,P_BAD_TO_GOOD[,LOSS_IN_BAD] (GE stepped per ms; default none)",
    )
    p.add_argument("--loss-direction", choices=("both", "down", "up"), default="both",
                   help="lossy directions (up: the client's packets only, as when a cell's uplink fails)")
    p.add_argument("--down-trace", metavar="SPEC", help="replay a mahimahi trace file or a fixed rate like 12mbps "
                   "(server -> client) through the testbed's link model; --delay-ms and --loss apply on top")
    p.add_argument("--up-trace", metavar="SPEC", help="trace file or rate of the client -> server direction "
                   "(default: the same as --down-trace)")
    p.add_argument("--queue-packets", type=positive_int, metavar="N", help="drop-tail queue of each traced "
                   "direction, in packets (default: 1000, as testbed compare's --queue)")
    # seed_arg, as every other --seed: a plain int took -1 and 2**70, seeds the testbed and predictor refuse
    p.add_argument("--seed", type=seed_arg, default=1, help="first seed, an integer >= 0 (default: 1)")
    p.add_argument("--runs", type=int, default=1, help="seeds to run: seed, seed+1, ... (default: 1)")
    p.add_argument("--first-token-ms", type=float, default=150.0, help="generator prefill delay (default: 150)")
    p.add_argument("--chats", type=positive_int, default=1, metavar="N",
                   help="chats at once sharing the one channel (each direction's trace and queue), 1 to "
                   f"{MAX_SIM_CHATS} (default: 1): testbed contention in virtual time, without its CPU limits; chat i "
                   "gets the demo schedule of seed + i, and the table reports per-flow percentiles")
    p.add_argument("--start", choices=START_MODES, default="settled",
                   help="when the answers of --chats N start, as testbed contention's --start: settled (the "
                   "default), once the links have carried the handshakes' packets away, or connected, as soon as "
                   "every chat is connected, behind those packets (a flash crowd); one chat's request goes as its "
                   "handshake completes either way")
    p.add_argument("--cross", action="append", metavar="SPEC",
                   help="cross traffic server -> client on the --down-trace link (repeatable), testbed contention's "
                   "forms: udp-ect1:RATE (paced, 1200-byte packets) | onoff-ect1:RATE:ON_MS:OFF_MS (the same, on "
                   "for ON_MS then silent for OFF_MS, from the start) | tcp:reno | tcp:cubic (both a Reno AIMD "
                   "model; no tcp:bbr in virtual time). It runs from time 0, through the handshakes and every "
                   "answer, and its packets are dropped where they are delivered; the drop-tail queue ignores the "
                   "ECT(1) mark. The link's figures (util, the JSON's cross_delivered_bytes and chats_utilisation) "
                   "count its packets from the answers' start to their end only, not those of the handshakes' time. "
                   "The simulator takes ON_MS of 1 ms or more and OFF_MS 0 or 1 ms or more")
    p.add_argument("--json", type=Path, help="write the results here")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from tokenwire.daemon.cli import CLIError, repeated
    from tokenwire.daemon.config import MAX_ANSWER_TOKENS
    from tokenwire.daemon.demo_upstream import rate_problem
    from tokenwire.testbed.cli import sigterm_as_ctrl_c
    from tokenwire.testbed.loss import LossSpecError, parse_loss
    from tokenwire.testbed.sim import SimConfig, compare, end_spread, first_seed_past_cap
    from tokenwire.transport.frames import SCHEMES

    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    bad = [s for s in schemes if s not in SCHEMES]
    if bad or not schemes:
        raise CLIError(f"unknown scheme(s) {', '.join(bad) or '(none)'}; choose from {', '.join(SCHEMES)}")
    twice = sorted(repeated(schemes))
    if twice:  # the summary is keyed by scheme: a second listing counted every run twice
        raise CLIError(f"--schemes: {', '.join(twice)} listed twice")
    try:
        parse_loss(args.loss)
    except LossSpecError as exc:
        raise CLIError(str(exc)) from None
    # one option at a time, by name: "--tokens and --runs must be >= 1, --delay-ms and --first-token-ms >= 0"
    # left the user to find which of the four it meant
    for option, value, least in (("--tokens", args.tokens, 1), ("--runs", args.runs, 1),
                                 ("--delay-ms", args.delay_ms, 0), ("--first-token-ms", args.first_token_ms, 0)):
        if value < least:
            raise CLIError(f"{option} {value:g} must be >= {least}")
    if not 1 <= args.chats <= MAX_SIM_CHATS:
        raise CLIError(f"--chats {args.chats}: 1 to {MAX_SIM_CHATS}")
    check_cross(args)
    check_traces(args)
    if args.tokens > MAX_ANSWER_TOKENS:  # as `testbed compare` and `bench daemon` refuse it: no answer is longer
        raise CLIError(f"--tokens {args.tokens}: at most {MAX_ANSWER_TOKENS:,} (the daemon's bound on an answer)")
    # --rate 1e308 was a traceback from the schedule, 1e20 a table of an answer that took no time
    problem = rate_problem(args.rate, f"--rate {args.rate:g}")
    if problem:
        raise CLIError(problem)
    cfg = SimConfig(
        tokens=args.tokens,
        rate=args.rate,
        delay_ms=args.delay_ms,
        loss=args.loss,
        loss_direction=args.loss_direction,
        seed=args.seed,
        first_token_ms=args.first_token_ms,
        down_trace=args.down_trace,
        up_trace=args.up_trace,
        chats=args.chats,
        start=args.start,
        cross=list(args.cross or []),
    )
    if args.queue_packets is not None:
        cfg.queue_packets = args.queue_packets
    # SIGTERM or SIGHUP (kill, a timeout, a closed terminal) takes Ctrl-C's path: "interrupted", exit 130 (it
    # died silently with 143)
    with sigterm_as_ctrl_c():
        # chat i of run k gets the schedule of seed + k + i: every one of them must end within the cap
        seeds = args.runs + args.chats - 1
        past = first_seed_past_cap(cfg, seeds, _seed_check_progress(seeds))
        if past is not None:  # a run past the cap fails only at the cap, every cell NaN
            seed, _ = past
            mean, _ = end_spread(cfg)
            raise CLIError(f"--tokens {args.tokens} at --rate {args.rate:g}/s, --first-token-ms "
                           f"{args.first_token_ms:g} and 4 x --delay-ms {args.delay_ms:g} end past the simulator's "
                           f"cap of {cfg.max_virtual_s:.0f} s of virtual time (seed {seed}; about {mean:,.0f} s on "
                           "average over seeds)")

        def progress(msg: str) -> None:
            print(f"  simulating {msg} ...", file=sys.stderr, flush=True)

        started = time.monotonic()

        def run_progress(msg: str) -> None:
            print(f"    {msg}, {time.monotonic() - started:.0f} s elapsed", file=sys.stderr, flush=True)

        # a line per scheme and seed once the run is long: by its count of runs, or by its tokens (one seed of three
        # schemes at --tokens 20000 ran 13.5 s without a word), and lines within a long run
        long_run = (args.runs * len(schemes) > 3
                    or args.tokens * args.runs * len(schemes) * args.chats >= LONG_RUN_TOKENS)
        cfg.progress = run_progress if long_run else None
        result = compare(schemes, cfg, runs=args.runs, progress=progress if long_run else None)
    if args.chats > 1:
        print(format_chats_table(result))
        if args.json:
            write_json(result, args.json)
        return 1 if any(d["flows_finished"] == 0 for d in result["schemes"].values()) else 0
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
    return 1 if any(d["runs_finished"] == 0 for d in result["schemes"].values()) else 0


def check_cross(args: argparse.Namespace) -> None:
    """Refuse ``--cross`` the simulator cannot run, as :class:`CLIError`: without ``--down-trace`` (the fixed channel
    has no queue to share), a spec outside ``testbed contention``'s grammar, ``tcp:bbr`` (no model in virtual time)
    or a paced RATE past :data:`.sim.MAX_CROSS_BPS` (:func:`.sim.cross_problem`)."""
    from tokenwire.daemon.cli import CLIError
    from tokenwire.testbed.sim import cross_problem

    if not args.cross:
        return
    if args.down_trace is None:
        raise CLIError("--cross: only with --down-trace (the fixed-delay channel has no queue for it to share)")
    for spec in args.cross:
        problem = cross_problem(spec)
        if problem is not None:
            raise CLIError(f"--cross: {problem}")


def check_traces(args: argparse.Namespace) -> None:
    """Refuse a bad trace before any run, as :class:`CLIError` (one line, exit 2): each trace is parsed here (a
    large file announced first, as ``testbed`` does), and the runs take the parse from the trace cache. A trace
    that ``testbed``'s commands refuse as too sparse for a handshake (:func:`.testbed.cli.crossable`) is refused
    too: the simulator waits out any handshake, and ``--down-trace 1kbps`` ran to a stall of 1.0 where
    ``testbed compare`` names the problem; with ``--chats N`` a trace too sparse for N handshakes at once, as
    ``testbed contention`` (20 at 3 kbit/s all failed at the idle timeout). The trace options without
    ``--down-trace`` would be ignored, so they are refused too."""
    from tokenwire.daemon.cli import CLIError
    from tokenwire.testbed.cli import crossable, note_large_traces
    from tokenwire.testbed.trace import TraceError

    if args.down_trace is None:
        given = [o for o, v in (("--up-trace", args.up_trace), ("--queue-packets", args.queue_packets))
                 if v is not None]
        if given:
            raise CLIError(f"{' and '.join(given)}: only with --down-trace (without it the channel has no trace)")
        return
    up = args.up_trace if args.up_trace is not None else args.down_trace
    note_large_traces(args.down_trace, up)
    checks = {"--down-trace": args.down_trace}
    if up != args.down_trace:  # the same spec (the default): one parse and one check
        checks["--up-trace"] = up
    for option, spec in checks.items():
        try:
            # the parse (a malformed trace's error), then the gap and opportunity rules, for --chats handshakes
            crossable(spec, chats=args.chats)()
        except TraceError as exc:
            raise CLIError(f"{option}: {exc}") from None


def describe_path(cfg: dict) -> str:
    """The channel of a result's ``config``, for the table's first line."""
    path = f"one-way delay {cfg['delay_ms']:g} ms, loss {cfg['loss']} ({cfg['loss_direction']})"
    if cfg.get("down_trace") is None:
        return path
    traces = (f"trace {cfg['down_trace']}" if cfg["up_trace"] == cfg["down_trace"] else
              f"traces {cfg['down_trace']} down, {cfg['up_trace']} up")
    return f"{traces}, droptail {cfg['queue_packets']} packets, {path}"


def describe_load(cfg: dict) -> str:
    """What a result's ``config`` adds to the path, for the table's first line: the answers' start (when not the
    default) and the cross traffic; nothing for a run without either (its line is what it always was)."""
    out = ""
    if cfg.get("start", "settled") != "settled":
        out += f", answers start {cfg['start']}"
    if cfg.get("cross"):
        out += f", cross traffic {' + '.join(cfg['cross'])}"
    return out


SEED_CHECK_PROGRESS_S = 5.0
"""Wall-clock seconds between two lines of the per-seed check against the cap, where it draws each seed."""


def _seed_check_progress(runs: int) -> Callable[[int], None]:
    """A progress line every :data:`SEED_CHECK_PROGRESS_S` while each seed's schedule is drawn against the cap
    (only near the cap): ``--runs 1000000`` spent over 30 s in that check without a word."""
    started = time.monotonic()
    last = [started]

    def report(checked: int) -> None:
        now = time.monotonic()
        if now - last[0] >= SEED_CHECK_PROGRESS_S:
            last[0] = now
            print(f"  checking each seed's answer against the simulator's cap: {checked:,}/{runs:,} seeds, "
                  f"{now - started:.0f} s elapsed", file=sys.stderr, flush=True)

    return report


def format_table(result: dict) -> str:
    cfg = result["config"]
    oracle = result["oracle"]["stall_ratio"]
    w = count_width(result["schemes"].values())
    lines = [
        f"{cfg['tokens']} tokens at {cfg['rate']:g}/s, {describe_path(cfg)}{describe_load(cfg)}, "
        f"seeds {cfg['seed']}..{cfg['seed'] + cfg['runs'] - 1}",
        f"{'scheme':<11} {'stall':>7} {'own-oracle':>10} {'TTFT ms':>8} {'p99 ms':>7} {'B/token':>8} "
        f"{'rendered':>{2 * w + 1}} {'digest':>6}",
    ]
    for name, d in result["schemes"].items():
        lines.append(
            f"{name:<11} {cell(d['stall_ratio'], '>7.4f')} {cell(d['oracle_stall_ratio'], '>10.4f')} "
            f"{cell(d['ttft_ms'], '>8.0f')} {cell(d['p99_token_delay_ms'], '>7.0f')} "
            f"{cell(d['bytes_per_token'], '>8.0f')} "
            f"{d['tokens_rendered']:>{w}}/{d['tokens_sent']:<{w}} "
            f"{ {True: 'ok', False: 'BAD', None: '-'}[d['digest_ok']]:>6}"
        )
    for name, d in result["schemes"].items():
        for f in d["failed_runs"]:
            why = f["error"].removeprefix(f"{name}: ")  # the simulator's errors name the scheme already
            # "the row averages the 0 run(s) that finished" said it averaged something
            row = (f"the row averages the {d['runs_finished']} run(s) that finished" if d["runs_finished"] else
                   "no run finished, so the row has no numbers")
            lines.append(f"{name}: seed {f['seed']} FAILED ({why}); {row}")
    ref = result["oracle"]["reference_scheme"]
    if math.isfinite(oracle):
        lines.append(f"oracle (on {ref}'s packets): stall {oracle:.4f}")
    else:
        lines.append(f"oracle (on {ref}'s packets): unavailable ({ref} had no finished run)")
    if "stream" in result["schemes"] and "chatterbox" in result["schemes"]:
        st = result["schemes"]["stream"]["stall_ratio"]
        ch = result["schemes"]["chatterbox"]["stall_ratio"]
        unfinished = [s for s in ("chatterbox", "stream") if result["schemes"][s]["runs_finished"] == 0]
        if unfinished or not (math.isfinite(st) and math.isfinite(ch)):
            lines.append(f"chatterbox vs stream: comparison unavailable "
                         f"({' and '.join(unfinished) or 'a scheme'} had no finished run)")
        elif (change := lower_or_higher(ch, st)) is not None:  # (stream without a stall: no ratio)
            lines.append(f"chatterbox vs stream: stall ratio {change}")
    return "\n".join(lines)


FAILED_FLOWS_SHOWN = 5
"""Failed flows named under a ``--chats`` table (the rest counted): every one of 200 would bury the table."""


def format_chats_table(result: dict) -> str:
    """``--chats N``'s table, as ``testbed contention``'s: per scheme the stall and TTFT percentiles over every
    finished flow of every run, bytes per token, the down link's utilisation, queueing (sojourn p50/p99), drops by the
    full queue and losses (per run), finished flows and verified digests; then chatterbox against each scheme."""
    from tokenwire.testbed.contention import comparison_lines

    cfg = result["config"]
    f = cell
    lines = [
        f"{cfg['chats']} chats x {cfg['tokens']} tokens at {cfg['rate']:g}/s, {describe_path(cfg)}"
        f"{describe_load(cfg)}, seeds {cfg['seed']}..{cfg['seed'] + cfg['runs'] - 1} (virtual time: no CPU limits)",
        f"{'scheme':<11} {'stall p50':>9} {'p90':>7} {'TTFT p50':>9} {'p90':>7} {'B/token':>8} {'util':>6} "
        f"{'sojourn p50/p99 ms':>19} {'drop/lost':>10} {'Jain':>6} {'finished':>9} {'digests':>8}",
    ]
    for s, d in result["schemes"].items():
        soj = f"{f(d['sojourn_ms_p50'], '.1f')}/{f(d['sojourn_ms_p99'], '.1f')}"
        drops = f"{f(d['dropped_down'], '.0f')}/{f(d['lost_down'], '.0f')}"
        lines.append(
            f"{s:<11} {f(d['stall_ratio_p50'], '>9.3f')} {f(d['stall_ratio_p90'], '>7.3f')} "
            f"{f(d['ttft_ms_p50'], '>9.0f')} {f(d['ttft_ms_p90'], '>7.0f')} {f(d['bytes_per_token'], '>8.0f')} "
            f"{f(d['utilisation'], '>6.1%')} {soj:>19} {drops:>10} {f(d['jain_goodput'], '>6.3f')} "
            f"{d['flows_finished']:>4}/{d['flows']:<4} {d['digests_verified']:>8}")
    for s, runs in result["runs"].items():
        failed = [(r["seed"], fl) for r in runs for fl in r["flows"] if not fl["finished"]]
        for seed, fl in failed[:FAILED_FLOWS_SHOWN]:
            why = fl.get("error") or "incomplete answer or digest mismatch"
            lines.append(f"{s}: seed {seed} flow {fl['flow']} FAILED ({why})")
        if len(failed) > FAILED_FLOWS_SHOWN:
            lines.append(f"{s}: {len(failed) - FAILED_FLOWS_SHOWN} more failed flows (see --json)")
    if cfg.get("cross"):  # util counts every delivered byte, as contention's: say how much of it was the chats'
        shares = ", ".join(f"{s} {f(d.get('chats_utilisation'), '.1%')}" for s, d in result["schemes"].items())
        lines.append(f"cross traffic: util counts it too; the chats' own share of the link: {shares}")
    lines += comparison_lines(result["comparison"])
    return "\n".join(lines)
