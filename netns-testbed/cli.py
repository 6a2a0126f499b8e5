"""``tokenwire testbed up|down|status|compare|kv``.

Only argparse at import time; the handlers import the testbed (pyroute2, aiohttp, matplotlib) when run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from tokenwire.daemon.cli import CLIError, cell, finite_float, positive_int, seed_arg, write_json

from .child import ChildError

SCHEME_NAMES = ("chatterbox", "stream", "duplicate", "sse-tcp")


def add_path_args(p: argparse.ArgumentParser, *, down_required: bool = False, kernel: bool = True) -> None:
    """The emulated path, shared by ``up``, ``compare``, ``kv`` and ``contention``. ``kernel``: whether the command
    can run on kernel qdiscs; ``kv`` and ``contention`` cannot (they read the emulator's packet log), and their
    ``--backend`` help says so rather than describe a probe they never make."""
    p.add_argument("--down-trace", required=down_required, default=None if down_required else "12mbps",
                   metavar="F", help="mahimahi trace file or a fixed rate like 12mbps (server -> client)")
    up = p.add_mutually_exclusive_group()
    up.add_argument("--up-trace", metavar="F", help="trace file or rate of the client -> server direction "
                    "(default: the same as --down-trace)")
    up.add_argument("--up-mbps", type=float, metavar="R", help="fixed uplink rate in Mbit/s")
    p.add_argument("--delay-ms", type=delay_ms_arg, default=50.0, metavar="D",
                   help=f"one-way delay, each direction (0 to {MAX_DELAY_MS:g})")
    p.add_argument("--loss", default="none", metavar="SPEC",
                   help="down-link loss: none | iid:P | ge:P_GB,P_BG[,LOSS_IN_BAD] (bursty)")
    p.add_argument("--up-loss", default="none", metavar="SPEC", help="up-link loss (default: none)")
    p.add_argument("--queue", default="droptail:packets=1000", metavar="SPEC",
                   help="bottleneck queue of both directions: infinite | droptail:packets=N | "
                   "droptail:bytes=N | dualpi2[:key=value,...]")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of loss patterns and AQM decisions (integer >= 0)")
    p.add_argument("--backend", choices=("auto", "userspace", "kernel"), default="auto",
                   help="auto: kernel qdiscs if the probe finds netem+dualpi2 and they can express the path"
                   if kernel else "the userspace emulator in every case (its packet log measures the link); "
                   "kernel is refused")


SSE_CONNECT_S = 10.0
"""The sse-tcp client's TCP connect timeout (``sse.sse_client``'s ``sock_connect``): the tightest deadline of a run."""
MAX_DELAY_MS = 4_000.0
"""Largest ``--delay-ms`` (one way). A TCP connect takes one round trip, 8 s at this bound, within
:data:`SSE_CONNECT_S` with 2 s to spare for a busy host; a QUIC handshake (up to two round trips, 16 s) fits the
endpoints' 30 s (``emulator.HANDSHAKE_WAIT_S``). At 10 s, chatterbox still ran and sse-tcp failed to connect; at
1e9 ms every run failed ~30 s after the namespaces were built. (A geostationary satellite hop is ~0.3 s.)"""


def delay_ms_arg(text: str) -> float:
    """argparse type of the testbed's ``--delay-ms``: a finite number from 0 to :data:`MAX_DELAY_MS`. It was bounded
    only below, and ``--delay-ms 1e9`` built the namespaces to fail ~30 s later."""
    value = finite_float(text)
    if not 0 <= value <= MAX_DELAY_MS:
        raise argparse.ArgumentTypeError(
            f"{text}: the one-way delay is 0 to {MAX_DELAY_MS:g} ms (a run's clients connect within "
            f"{SSE_CONNECT_S:g} s: sse-tcp's TCP connect, one round trip)"
        )
    return value


def up_spec(args: argparse.Namespace) -> str:
    if args.up_mbps is not None:
        if args.up_mbps <= 0:
            raise CLIError("--up-mbps must be > 0")
        return f"{args.up_mbps:g}mbps"
    return args.up_trace or args.down_trace


LARGE_TRACE_BYTES = 16_000_000
"""A trace file from this size on is announced before it is parsed: ~1 s of parsing at the ~15 MB/s measured here
(a 20-million-line trace, 158 MB, took 11 s; on a busy host 18-26 s passed without a word)."""


def note_large_traces(*specs: str | None) -> None:
    """Say on stderr, as the other progress lines, that a large trace file is being read: the command was silent
    for the whole parse. Each file once (the up trace is the down trace by default)."""
    from .trace import parse_rate

    for spec in dict.fromkeys(s for s in specs if s is not None):
        if parse_rate(spec) is not None:
            continue
        try:
            size = os.stat(spec).st_size
        except OSError:  # (missing: the parse says so)
            continue
        if size >= LARGE_TRACE_BYTES:
            print(f"reading trace {spec} ({size / 1e6:.0f} MB)...", file=sys.stderr, flush=True)


def emulator_config(args: argparse.Namespace, *, log: str | None = None, pcap: str | None = None) -> Any:
    from .emulator import DirectionConfig, EmulatorConfig

    cfg = EmulatorConfig(
        down=DirectionConfig(args.down_trace, args.delay_ms, args.loss, args.queue),
        up=DirectionConfig(up_spec(args), args.delay_ms, args.up_loss, args.queue),
        seed=args.seed, log_path=log, pcap_prefix=pcap,
    )  # fmt: skip
    check_path(cfg.down.trace, cfg.up.trace, cfg.down.validate, cfg.up.validate)
    return cfg


def check_path(down_trace: str | None, up_trace: str | None, *checks: Callable[[], None], chats: int = 1) -> None:
    """The checks of a testbed command's path, before anything is built, as :class:`CLIError`: the command's own
    ``checks`` (its config's ``validate``), then no trace going longer than :data:`.emulator.MAX_TRACE_GAP_MS`
    without a delivery opportunity nor holding fewer than :data:`.emulator.HANDSHAKE_OPPORTUNITIES` in any 30 s,
    ``chats`` times as many for ``contention``'s chats (:func:`crossable`); a large trace file is announced first,
    as its parse is slow. The one place ``up``, ``compare``, ``kv``, ``swiftqueue`` and ``contention`` take them from:
    ``swiftqueue`` had a check of its own without the gap rule, and a trace with a minute-long gap built the
    namespaces to fail later."""
    note_large_traces(down_trace, up_trace)
    validate(*checks, crossable(down_trace, up_trace, chats=chats))


def crossable(*specs: str | None, chats: int = 1) -> Callable[[], None]:
    """The check, for :func:`validate`, that every trace of ``specs`` offers ``chats`` handshakes at once enough
    delivery opportunities in time (:func:`.emulator.check_trace_usable`): a gap over 30 s, or too few
    opportunities in some 30 s (450 bit/s, 1 kbit/s), built the namespaces and failed 30-90 s later; 20 chats'
    handshakes at 3 kbit/s (enough for one) all timed out."""
    from .emulator import check_trace_usable

    def check() -> None:
        for spec in dict.fromkeys(s for s in specs if s is not None):
            check_trace_usable(spec, chats)

    return check


def validate(*checks: Any) -> None:
    from .loss import LossSpecError
    from .queues import QueueSpecError
    from .trace import TraceError

    for check in checks:
        try:
            check()
        except (TraceError, QueueSpecError, LossSpecError, ValueError) as exc:
            raise CLIError(str(exc)) from None


_OWNER_PID = os.getpid()


_RETRY_S = 0.5
UNWIND_AS_CTRL_C = (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
"""Besides SIGTERM, the signals :func:`sigterm_as_ctrl_c` turns into Ctrl-C's path (unless ignored on entry)."""


def _unwinding() -> bool:
    """A KeyboardInterrupt is being handled: we run inside a ``finally``/``__exit__`` on its way up (also in an
    ``except`` block of the teardown, whose exception then has it as its context)."""
    exc = sys.exc_info()[1]
    for _ in range(64):  # a context chain is short; the bound only guards against cycles
        if exc is None:
            return False
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__context__
    return False


def _interrupt(signum: int, frame: Any) -> None:
    if os.getpid() != _OWNER_PID:
        # a child forked by pyroute2 inherited this handler: die as SIGTERM would, without unwinding
        os._exit(128 + signum)
    if _unwinding():
        return  # a repeat, or the retry below, during the teardown: let it finish
    # Python drops an exception raised where it cannot propagate (an at-fork hook of subprocess.Popen, a
    # __del__): "Exception ignored in ...", and the run went on. Raise again shortly unless unwinding by then.
    signal.setitimer(signal.ITIMER_REAL, _RETRY_S)
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (kill, a CI or systemd timeout) unwinds like Ctrl-C, so a run's namespaces and processes are torn
    down: by default it killed ``testbed kv``/``compare`` outright and left their namespaces behind. Every
    namespace-building command runs under it (``up``, ``demo`` and ``bench emulator`` too)."""
    old = signal.signal(signal.SIGTERM, _interrupt)
    old_alarm = signal.signal(signal.SIGALRM, _interrupt)
    # Ctrl-C too: Python's own handler raised a second KeyboardInterrupt inside the teardown of the first,
    # leaving namespaces behind; SIGHUP (the terminal or ssh session closed) and SIGQUIT (Ctrl-\, whose default
    # killed the run and left its namespaces and state as SIGKILL does) unwind as well. Each is left alone when
    # ignored on entry (nohup, a background job).
    others = {sig: signal.signal(sig, _interrupt) for sig in UNWIND_AS_CTRL_C
              if signal.getsignal(sig) is not signal.SIG_IGN}
    old_hook = sys.unraisablehook

    def quiet(unraisable: Any) -> None:  # a dropped interrupt is retried: no "Exception ignored" traceback
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            old_hook(unraisable)

    sys.unraisablehook = quiet
    try:
        yield
    finally:
        # the signals that arm the retry timer first, then the timer and SIGALRM: the other way round, a
        # Ctrl-C in between re-armed the timer with SIGALRM back at its default ("Alarm clock")
        signal.signal(signal.SIGTERM, old)
        for sig, handler in others.items():
            signal.signal(sig, handler)
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_alarm)
        sys.unraisablehook = old_hook


def ctrl_c_throughout(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a command's ``handler`` under :func:`sigterm_as_ctrl_c` from its first line, for the commands documented
    to turn SIGTERM into Ctrl-C's path (``up``, ``compare``, ``kv``, ``swiftqueue``). Their own blocks began only
    once the path was checked, and parsing a large trace there (seconds: "reading trace F (N MB)...") died on
    SIGTERM with status 143 where Ctrl-C said "interrupted" (130). Off the main thread (no signal handlers can be
    set there) the handler just runs."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        if threading.current_thread() is not threading.main_thread():
            return handler(args)
        with sigterm_as_ctrl_c():
            return handler(args)

    return run


@ctrl_c_throughout
def cmd_up(args: argparse.Namespace) -> int:
    from .netns import RUN_ID_RE, TestbedError
    from .topology import Testbed

    cfg = emulator_config(args, log=args.log, pcap=args.pcap)
    if args.run_id is not None and not RUN_ID_RE.fullmatch(args.run_id):  # internal (--detach's child), but typed
        raise CLIError(f"--run-id {args.run_id!r}: not a run id (tw + 6 hex digits)")
    if args.detach:
        return _launch_detached(args)

    up = False
    try:
        with sigterm_as_ctrl_c(), Testbed(cfg, run_id=args.run_id, backend=args.backend) as tb:
            up = True
            info = tb.describe()
            state = tb._state
            if state is not None:
                state.info.update(info)
                state.info["ready"] = True
                state.save()
            _print_up(info, args.json)
            if not args.json:
                print(f"Ctrl-C (or `tokenwire testbed down {info['run_id']}`) tears it down.", flush=True)
            while True:
                time.sleep(2.0)
                if state is not None:
                    state.info["stats"] = tb.stats()
                    state.save()
    except TestbedError as exc:
        if up:
            _note_detached_end(args, str(exc))
        raise CLIError(str(exc)) from None
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the testbed is torn down
        if not up:  # stopped while it was built: "interrupted", 130, not the silent 0 of a testbed stopped once up
            raise
        return 0
    except Exception as exc:
        if up:
            _note_detached_end(args, f"{exc.__class__.__name__}: {exc}")
        raise


def _note_detached_end(args: argparse.Namespace, reason: str) -> None:
    """A detached run (``--run-id``: the child of ``up --detach``) that ended on its own, once torn down: record
    why for ``testbed status``, since the teardown removed its log (the only place its error went to)."""
    from .netns import record_ended

    if args.run_id is not None:
        with contextlib.suppress(OSError, ValueError):
            record_ended(args.run_id, reason)


DETACH_STEP_S = 20.0
"""``up --detach``: how long the start may stay at a step that parses no trace (building the namespaces, between
the child's state file and the emulator's start). Parsing the traces, in the child before it writes its state
and in the emulator before it answers ready, has no such limit (only :data:`DETACH_MAX_S`): it takes longer the
longer the trace file."""
DETACH_MAX_S = 180.0
"""``up --detach``: the whole start, however large the traces (a child still not up by then is stopped)."""
DETACH_STOP_S = 30.0  # for the stopped child's teardown (emulator, namespaces) before it is killed
_DETACH_STEPS = ("parsing its traces", "building the namespaces", "starting the emulator (it parses its traces)")


def _detach_argv(args: argparse.Namespace, run_id: str) -> list[str]:
    """The command ``--detach`` starts in the background: the foreground ``up`` under a known run id."""
    entry = "import sys; from tokenwire.daemon.cli import main; sys.exit(main())"
    return [sys.executable, "-c", entry, *_up_argv(args), "--run-id", run_id]


def _with_copies(args: argparse.Namespace, copies: str | None) -> argparse.Namespace:
    """``args`` for the child of ``--detach``, a trace read from a pipe (``<(zcat trace.gz)``, a FIFO) given as a
    regular copy in ``copies`` (None: there is no such trace): this process's checks took the pipe's content, and
    the child found it empty."""
    from .trace import child_readable

    if copies is None:
        return args
    child = argparse.Namespace(**vars(args))
    child.down_trace = child_readable(args.down_trace, copies)
    if args.up_mbps is None:
        child.up_trace = child_readable(up_spec(args), copies)
    return child


def _launch_detached(args: argparse.Namespace) -> int:
    """``up --detach``: start the foreground ``up`` in its own session and wait until it is up.

    If it fails, does not come up in time, or the wait is interrupted (Ctrl-C, SIGTERM, SIGHUP, SIGQUIT), the
    child is stopped with SIGTERM (it tears its testbed down like Ctrl-C does), waited for, and only then is the
    error reported: a child left behind came up later with nobody knowing its run id.
    """
    from .netns import STATE_DIR, RunState, TestbedError, check_root, new_run_id

    try:  # the foreground up's own check, before the log file: not root said "/run/tokenwire-testbed/...: denied"
        check_root()
    except TestbedError as exc:
        raise CLIError(str(exc)) from None
    run_id = new_run_id()
    os.makedirs(STATE_DIR, exist_ok=True)
    logfile = os.path.join(STATE_DIR, f"{run_id}.log")
    path = os.path.join(STATE_DIR, f"{run_id}.json")
    from .trace import copies_folder

    # copies of piped traces, if any, live until the child is up (its emulator has read them by then) or stopped
    with sigterm_as_ctrl_c(), copies_folder(args.down_trace, up_spec(args)) as copies:
        proc: subprocess.Popen | None = None
        early_log = None
        try:  # from before the child exists: an interrupt at any point after it stops it
            with open(logfile, "w") as log:
                proc = subprocess.Popen(_detach_argv(_with_copies(args, copies), run_id), stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=log, start_new_session=True)
            # read through our own descriptor: the failing run's teardown removes the log file with its state
            early_log = open(logfile)  # noqa: SIM115 - closed below
            started = time.monotonic()
            step, step_since = _DETACH_STEPS[0], started
            while True:
                now = time.monotonic()
                if proc.poll() is not None:
                    raise CLIError(f"testbed failed to start: {_child_failure(proc, early_log.read())}")
                st = RunState.load(path) if os.path.exists(path) else None
                # a kernel-backend run has no emulator: ready is all it says
                if st is not None and st.info.get("ready") and (st.backend == "kernel" or st.emulator_alive):
                    _print_up(_as_given(st.info, args), args.json)
                    # kept, not dropped: a Popen collected while its child runs warned "ResourceWarning: subprocess
                    # N is still running" in every in-process caller (pytest --leak-check); the CLI exits next
                    _LEFT_RUNNING.append(proc)
                    return 0
                # the step it is at: each gets DETACH_STEP_S, but the two that parse traces take what they take
                now_step = _DETACH_STEPS[0 if st is None else 2 if st.emulator_alive else 1]
                if now_step != step:
                    step, step_since = now_step, now
                slow = step == _DETACH_STEPS[1] and now - step_since > DETACH_STEP_S
                if slow or now - started > DETACH_MAX_S:
                    waited = now - step_since if slow else now - started
                    raise CLIError(
                        f"testbed did not come up: still {step} after {waited:.0f} s, so it was stopped"
                        + _last_line(early_log.read())
                        + ". Run `tokenwire testbed up` with the same options in the foreground to see where it "
                        "stalls; a trace file of hundreds of millions of lines takes minutes to parse: use a "
                        "shorter one"
                    )
                time.sleep(0.05)
        except BaseException:
            if proc is not None:
                _stop_child(proc, path)
            with contextlib.suppress(OSError):
                os.unlink(logfile)  # (a child stopped before it had state: nobody else removes it)
            raise
        finally:
            if early_log is not None:
                early_log.close()


def _as_given(info: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """A detached child's ``info`` with the traces named as the user gave them, not by the copies of piped ones
    the child was given (removed by now)."""
    config = info.get("config")
    if not isinstance(config, dict):
        return info
    shown = {**config}
    for direction, spec in (("down", args.down_trace), ("up", up_spec(args))):
        if isinstance(shown.get(direction), dict):
            shown[direction] = {**shown[direction], "trace": spec}
    return {**info, "config": shown}


_LEFT_RUNNING: list[subprocess.Popen] = []
"""The runs ``up --detach`` started and left running, up: their handles, kept for the life of the process."""


def _lines(log_text: str) -> list[str]:
    return [ln.strip() for ln in log_text.splitlines() if ln.strip()]


def _child_failure(proc: subprocess.Popen, log_text: str) -> str:
    lines = _lines(log_text)
    why = lines[-1] if lines else f"exit status {proc.returncode}"
    cause = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", ln)]
    if cause and cause[-1] not in why:  # the exception behind "emulator exited", say
        why += f" ({cause[-1]})"
    # the child's own "tokenwire testbed up: error: " (CLIError's prefix names the subcommand): said once, by us
    return re.sub(r"^tokenwire testbed(?: [a-z]+)?: error: ", "", why)


def _last_line(log_text: str) -> str:
    lines = _lines(log_text)
    return f" (its last output: {lines[-1]})" if lines else ""


def _stop_child(proc: subprocess.Popen, state_path: str) -> None:
    """SIGTERM a detached child (it tears its testbed down), wait for it; SIGKILL it and remove what its run left
    if it does not exit in time."""
    from .netns import RunState, destroy_run

    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=DETACH_STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if os.path.exists(state_path):  # killed, or it died without its teardown: what `testbed down` would do
        with contextlib.suppress(Exception):
            destroy_run(RunState.load(state_path))


def _up_argv(args: argparse.Namespace) -> list[str]:
    """The foreground ``testbed up`` command equivalent to ``args`` (what ``--detach`` runs)."""
    argv = ["testbed", "up", "--down-trace", args.down_trace, "--up-trace", up_spec(args),
            "--delay-ms", str(args.delay_ms), "--loss", args.loss, "--up-loss", args.up_loss,
            "--queue", args.queue, "--seed", str(args.seed), "--backend", args.backend]
    for flag, value in (("--log", args.log), ("--pcap", args.pcap)):
        if value:
            argv += [flag, os.path.abspath(value)]
    return argv


def _print_up(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(info), flush=True)
        return
    print(f"testbed {info['run_id']} up (backend: {info['backend']}"
          + (f"; {info['backend_reason']}" if info.get("backend_reason") else "") + ")")
    print(f"  server namespace {info['server_ns']}  address {info['server_addr']}")
    print(f"  client namespace {info['client_ns']}  address {info['client_addr']}")
    print(f"  run commands inside: ip netns exec {info['server_ns']} <command>", flush=True)


def cmd_down(args: argparse.Namespace) -> int:
    from .netns import check_root, ended_runs, forget_ended, list_runs, terminate_pids

    try:
        check_root()
    except Exception as exc:
        raise CLIError(str(exc)) from None
    runs = list_runs()
    ended = {r.run_id for r in ended_runs()}
    if args.run_ids:
        wanted = set(args.run_ids)
        unknown = wanted - {r.run_id for r in runs} - ended
        if unknown:
            raise CLIError(f"no testbed run {', '.join(sorted(unknown))} (see `tokenwire testbed status`)")
        runs = [r for r in runs if r.run_id in wanted]
    elif not args.all:
        runs = [r for r in runs if not r.owner_alive]  # crashed runs only
    failed: list[str] = []
    for st in runs:
        if st.owner_pid != os.getpid() and st.owner_alive:
            terminate_pids([st.owner_pid], timeout=10)  # a live owner tears its own run down
        try:
            removed, unreadable = _destroy(st)
        except Exception as exc:  # (OSError, a netlink error...): reported, and the other runs still cleaned
            failed.append(st.run_id)
            print(f"{st.run_id}: not cleaned up: {exc.__class__.__name__}: {exc}", file=sys.stderr, flush=True)
            continue
        if unreadable:  # (removed by its id: the namespaces, processes and links named <id>-*)
            what = f"its state file could not be read ({unreadable}): removed it" + "".join(f", {r}" for r in removed)
        else:
            what = ", ".join(removed) if removed else "removed"
        print(f"{st.run_id}: {what}", flush=True)
    # down leaves nothing behind: the records of how detached runs ended go too (the named ones, given ids); last,
    # after any run it stopped has ended
    forgotten = forget_ended(sorted(set(args.run_ids)) if args.run_ids else None)
    if forgotten:
        print(f"removed the record of how {', '.join(forgotten)} ended", flush=True)
    elif not runs:
        print("nothing to clean up")
    if failed:
        raise CLIError(f"could not clean up {', '.join(failed)} (see above); run `tokenwire testbed down "
                       f"{' '.join(failed)}` again")
    return 0


def _destroy(st: Any) -> tuple[list[str], str | None]:
    """Remove what run ``st`` left (namespaces, processes in them, state file, scratch folder, links named by
    its id); returns what was removed and, for a state file that cannot be read, why."""
    from .netns import destroy_run, read_run, remove_scratch

    target = st
    if os.path.exists(st.path):  # read again: it may have been spoilt since it was listed (then salvaged)
        target = read_run(st.path, st.run_id)
    elif st.info.get("unreadable_state") is None:
        target = None  # gone: its owner, terminated above, tore the run down
    why = target.info.get("unreadable_state") if target is not None else None
    removed = destroy_run(target) if target is not None else []
    scratch = remove_scratch(target) if target is not None else None  # its owner died without removing it
    if scratch is not None:
        removed.append(scratch)
    removed += _remove_links(st.run_id)
    return removed, why


def _remove_links(run_id: str) -> list[str]:
    """Interfaces named by the run id left in this namespace (the kernel backend makes its veths here before it
    moves them into the run's namespaces); usually none, as a veth goes with its peer's namespace."""
    from pyroute2 import IPRoute  # type: ignore[import-untyped]  # no stubs, no py.typed

    removed = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if isinstance(name, str) and name.startswith(run_id + "-"):
                ipr.link("del", index=link["index"])
                removed.append(f"link {name}")
    return removed


def cmd_status(args: argparse.Namespace) -> int:
    from .netns import list_runs, netns_exists

    out: list[dict[str, Any]] = []
    for st in list_runs():
        out.append({
            "run_id": st.run_id, "backend": st.backend, "owner_pid": st.owner_pid,
            "owner_alive": st.owner_alive, "emulator_alive": st.emulator_alive,
            "namespaces": [ns for ns in st.namespaces if netns_exists(ns)],
            "server_addr": st.info.get("server_addr"), "client_addr": st.info.get("client_addr"),
            "stats": st.info.get("stats"), "unreadable_state": st.info.get("unreadable_state"),
        })  # fmt: skip
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    if not out:
        print("no testbed runs")
    for r in out:
        state = "running" if r["owner_alive"] else "CRASHED (clean with `tokenwire testbed down`)"
        names = " ".join(r["namespaces"]) or "-"
        print(f"{r['run_id']}  {state}  backend {r['backend']}  namespaces {names}")
        if r["unreadable_state"]:
            print(f"    its state file cannot be read ({r['unreadable_state']}): namespaces found by its id")
            if r["owner_alive"]:  # (a plain `down` leaves it: say how it is stopped)
                print(f"    its owner, pid {r['owner_pid']}, is alive: `tokenwire testbed down {r['run_id']}` "
                      "stops it")
        else:  # a hand-made or older state file may name no address: the line said "server None  client None"
            print(f"    server {_shown(r['server_addr'])}  client {_shown(r['client_addr'])}")
        line = _stats_line(r["stats"])
        if line:
            print(f"    {line}")
    _print_ended()
    return 0


def _print_ended() -> None:
    """The records of how detached runs ended (their state and log are gone), newest last."""
    from .netns import ended_runs

    records = ended_runs()
    for r in records:
        when = "at an unknown time"
        if r.ended is not None:
            stamp = time.localtime(r.ended)
            today = time.localtime()[:3] == stamp[:3]
            when = time.strftime("%H:%M:%S" if today else "%Y-%m-%d %H:%M:%S", stamp)
        print(f"{r.run_id} ended {when}: {r.reason}")
    if records:
        print("    (detached runs that ended on their own; `tokenwire testbed down` removes these lines)")


def _stats_line(stats: object) -> str | None:
    """The link counters a run's state file holds, as one line; None when it holds none, or none in the shape the
    testbed writes them (a hand-made or damaged file: a KeyError traceback for ``{"down": 1}``)."""
    try:
        d, u = stats["down"], stats["up"]  # type: ignore[index]
        # both directions' losses and drops: "up: 34 delivered" hid the 16 of 50 packets --up-loss iid:0.3 took
        return (f"down: {d['delivered_packets']} pkts delivered, {d['lost_packets']} lost, "
                f"{d['tail_drops'] + d['aqm_drops']} dropped; up: {u['delivered_packets']} delivered, "
                f"{u['lost_packets']} lost, {u['tail_drops'] + u['aqm_drops']} dropped")
    except (KeyError, TypeError, IndexError):
        return None


def _shown(value: object) -> str:
    """A state file's field as ``status`` prints it: ``unknown`` for one the file does not name (not Python's
    ``None``)."""
    return "unknown" if value is None or value == "" else str(value)


def require_plotting(args: argparse.Namespace) -> None:
    """Fail before a long run, not after it, when ``--plot`` cannot be honoured."""
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            from tokenwire.daemon.cli import EXTRA_INSTALL

            # (the extras' one hint: tokenwire is installed from its source tree, not from an index)
            raise CLIError(f"--plot needs matplotlib, from the 'testbed' extra: {EXTRA_INSTALL['testbed']}") from None


def write_results(summary: dict[str, Any], args: argparse.Namespace, plot: Callable[[], None]) -> None:
    """``--json`` and ``--plot`` of an evaluation command (``plot`` draws to ``args.plot``)."""
    if args.json:
        write_json(summary, args.json)
    if args.plot:
        plot()
        print(f"wrote {args.plot}")


@ctrl_c_throughout
def cmd_compare(args: argparse.Namespace) -> int:
    from tokenwire.daemon.cli import save_json

    from .compare import CompareConfig, CompareError, describe_partial, run_compare
    from .netns import TestbedError, check_root

    require_plotting(args)
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    if not schemes:  # `--schemes ''` or `,,`: "unknown scheme(s) []" named nothing wrong
        raise CLIError(f"--schemes: no scheme given; choose from {', '.join(SCHEME_NAMES)}")
    cfg = CompareConfig(
        down_trace=args.down_trace, up_trace=up_spec(args), delay_ms=args.delay_ms, loss=args.loss,
        up_loss=args.up_loss, queue=args.queue, schemes=schemes, tokens=args.tokens, rate=args.rate,
        seed=args.seed, runs=args.runs, sse_cc=args.sse_cc, backend=args.backend, cross=args.cross or [],
    )  # fmt: skip
    check_path(cfg.down_trace, cfg.up_trace, cfg.validate)
    try:  # after the arguments' checks: without root, a wrong argument was reported as "needs root"
        check_root()
    except TestbedError as exc:
        raise CLIError(str(exc)) from None
    tty = sys.stderr.isatty()
    started = time.monotonic()
    last_line = [0.0]
    unshown: list[str | None] = [None]  # without a terminal: the latest progress line the 5-s throttle held back
    total = len(schemes) * args.runs
    done = [0]

    def show_last_progress() -> None:
        """Without a terminal, a run's latest count once it ends: the throttle left the line of up to 5 s earlier
        ("chatterbox: 1/60 tokens rendered (2%)") as the last word on a run that rendered all 60."""
        if unshown[0] is not None:
            print(unshown[0], file=sys.stderr, flush=True)
            unshown[0] = None

    def log(msg: str) -> None:
        show_last_progress()  # (the run before this one has ended)
        done[0] += 1
        print(f"\n[{done[0]}/{total}] {msg}" if tty else f"[{done[0]}/{total}] {msg}", file=sys.stderr,
              flush=True)

    def progress(scheme: str, k: int, n: int) -> None:
        now = time.monotonic()
        line = f"    {scheme}: {k}/{n} tokens rendered ({k / n:.0%}), {now - started:.0f} s elapsed"
        if tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif now - last_line[0] >= 5.0 or k >= n:
            last_line[0] = now
            unshown[0] = None
            print(line, file=sys.stderr, flush=True)
        else:
            unshown[0] = line

    def keep_partial(doc: dict[str, Any]) -> None:
        """A failure or an interrupt after finished runs: they are written, marked "complete": false, not lost."""
        show_last_progress()
        if tty:
            print(file=sys.stderr)  # off the progress line
        if not args.json:
            print(f"testbed compare: {describe_partial(doc)}; not saved (no --json)", file=sys.stderr, flush=True)
            return
        save_json(args.json, doc, indent=1)
        print(f'testbed compare: {describe_partial(doc)}; wrote them to {args.json} ("complete": false)',
              file=sys.stderr, flush=True)

    try:
        with sigterm_as_ctrl_c():
            summary, runs = run_compare(cfg, workdir=args.keep, progress=progress, log=log, on_partial=keep_partial)
    except (CompareError, TestbedError, ChildError) as exc:
        show_last_progress()
        raise CLIError(str(exc)) from None
    show_last_progress()
    if tty:
        print(file=sys.stderr)
    print_table(summary)

    def plot() -> None:
        from .plots import plot_compare

        plot_compare(summary, runs, args.plot, lost={s: rs[0].lost_times for s, rs in runs.items()})

    write_results(summary, args, plot)
    return 0


@ctrl_c_throughout
def cmd_kv(args: argparse.Namespace) -> int:
    from tokenwire.transport.cachegen.smollm import ModelUnavailable

    from .kv_eval import KVEvalConfig, KVEvalError, plot_kv, run_kv_eval
    from .netns import TestbedError, check_root

    if args.workers is not None and not args.virtual:  # it was accepted and ignored
        raise CLIError("--workers: only the virtual-time run (--virtual) uses worker processes")
    if args.decode_rate is not None:
        if not args.virtual:  # the namespace run's client is the SDK, which decodes and reports its own rate
            raise CLIError("--decode-rate: only the virtual-time run (--virtual) models the client's decode")
        from .kv_vsim import check_decode_rate

        try:
            check_decode_rate(args.decode_rate)
        except ValueError as exc:
            raise CLIError(f"--decode-rate: {exc}") from None
    if not args.virtual:
        try:
            check_root()
        except TestbedError as exc:
            raise CLIError(f"{exc} (or add --virtual for the virtual-time run)") from None
    require_plotting(args)
    if args.backend == "kernel":  # it was accepted and ignored
        raise CLIError("--backend kernel: the KV run needs the userspace emulator (its packet log measures "
                       "the link's capacity)")
    cfg = KVEvalConfig(
        down_trace=args.down_trace, up_trace=up_spec(args), delay_ms=args.delay_ms, queue=args.queue,
        loss=args.loss, up_loss=args.up_loss, context_tokens=args.context_tokens, chunk_tokens=args.chunk_tokens,
        deadline_ms=args.deadline_ms,
        controllers=[c.strip() for c in args.controllers.split(",") if c.strip()], repeats=args.repeats,
        seed=args.seed, recompute_us_per_token=args.recompute_us_per_token, prior_mbps=args.prior_mbps,
        stale_factor=args.stale_factor, reserve=args.reserve, legacy_controller=args.legacy_controller,
        guard_weight=args.guard_weight, firm_guard_weight=args.firm_guard_weight,
    )  # fmt: skip
    if args.text:
        cfg.text = args.text
    check_path(cfg.down_trace, cfg.up_trace, cfg.validate)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        if args.virtual:
            import multiprocessing

            from .kv_vsim import KVSimError, run_kv_virtual

            def stop_workers(signum: int, frame: Any) -> None:
                # The worker processes stop first, then Ctrl-C's path: SIGTERM killed this process alone (exit 143)
                # and left its workers and their resource tracker running (reparented to PID 1), and an interrupt
                # that leaves them waits in the pool's shutdown for every controller still queued.
                if os.getpid() == _OWNER_PID:  # (a child that inherited it leaves the workers to the parent)
                    for child in multiprocessing.active_children():
                        child.terminate()
                _interrupt(signum, frame)

            try:
                with sigterm_as_ctrl_c():
                    for sig in (signal.SIGTERM, *UNWIND_AS_CTRL_C):
                        if signal.getsignal(sig) is _interrupt:  # (one ignored on entry stays ignored: nohup)
                            signal.signal(sig, stop_workers)
                    summary = run_kv_virtual(cfg, log=log, workers=args.workers, decode_rate=args.decode_rate)
            except KVSimError as exc:
                raise CLIError(str(exc)) from None
        else:
            with sigterm_as_ctrl_c():
                summary = run_kv_eval(cfg, log=log, workdir=args.keep)
    except (KVEvalError, TestbedError, ChildError, ModelUnavailable) as exc:  # (the last: the ml extras missing)
        raise CLIError(str(exc)) from None
    print(f"{'controller':<15} {'attain':>7} {'top-1':>7} {'bits/el':>8} {'p95 ms':>8} {'goodput':>8}  levels")
    for name, d in summary["controllers"].items():
        lv = " ".join(f"{k}:{v}" for k, v in d["level_counts"].items() if v)
        print(f"{name:<15} {d['deadline_attainment']:7.0%} {d['mean_quality_top1']:7.2%} "
              f"{d['mean_bits_per_element']:8.3f} {d['p95_fetch_ms']:8.0f} {d['goodput_fraction']:8.0%}  {lv}")
    write_results(summary, args, lambda: plot_kv(summary, args.plot))
    return 0


def print_table(summary: dict[str, Any]) -> None:
    from .compare import comparison_lines
    from .sim_cli import count_width

    f = cell
    w = count_width(summary["schemes"].values())
    print(f"{'scheme':<11} {'stall':>7} {'oracle':>7} {'TTFT ms':>8} {'p50 ms':>7} {'p99 ms':>8} "
          f"{'B/token':>8} {'rendered':>{2 * w + 1}} {'loss':>6}")
    for s, d in summary["schemes"].items():
        print(f"{s:<11} {f(d['stall_ratio'], '7.2%')} {f(d['oracle_stall_ratio'], '7.2%')} "
              f"{f(d['ttft_ms'], '8.0f')} {f(d['p50_token_delay_ms'], '7.0f')} "
              f"{f(d['p99_token_delay_ms'], '8.0f')} "
              f"{f(d['bytes_per_token'], '8.0f')} {d['tokens_rendered']:>{w}}/{d['tokens_sent']:<{w}} "
              f"{f(d['down_loss_rate'], '6.1%')}")
    o = summary["oracle"]
    print(
        f"oracle on {o['reference_scheme']}'s packets: stall {f(o['stall_ratio'], '.2%')}; on the union of all "
        f"schemes' packets: {f(o['union_stall_ratio'], '.2%')}; backend {summary['backend']}"
    )
    for line in comparison_lines(summary):  # the targets are judged by these ratios: the table alone left them out
        print(line)


def register(sub: argparse._SubParsersAction) -> None:
    from .traffic import CROSS_HELP  # (the standard library only, like argparse)

    p = sub.add_parser(
        "testbed", help="network-namespace testbed with the trace-driven link emulator",
        description="Real processes and real kernel and QUIC stacks in two Linux network namespaces joined by a "
        "userspace link emulator that replays a capacity trace (mahimahi format, or a fixed rate) with delay, loss "
        "and a bottleneck queue. The namespace commands need root; kv and swiftqueue also run in virtual time "
        "(--virtual), without root. Details in docs/testbed.md.",
    )
    tsub = p.add_subparsers(dest="testbed_cmd", metavar="CMD")
    tsub.required = True

    up = tsub.add_parser(
        "up", help="build server/client namespaces joined by the emulator (until Ctrl-C)",
        description="Builds a server and a client namespace joined by the emulated path and keeps it up until "
        "Ctrl-C or `testbed down RUN_ID` (--detach: in the background), printing the namespace names and "
        "addresses: run your own server and client in them with `ip netns exec NAME COMMAND`. Needs root.",
    )
    add_path_args(up)
    up.add_argument("--log", metavar="CSV", help="write the per-packet log here")
    up.add_argument("--pcap", metavar="PREFIX", help="write PREFIX.{down,up}.{in,out}.pcap")
    up.add_argument("--detach", action="store_true",
                    help="run in the background; stop with `testbed down RUN_ID` (printed)")
    up.add_argument("--json", action="store_true", help="print the namespace names and addresses as JSON")
    up.add_argument("--run-id", help=argparse.SUPPRESS)
    up.set_defaults(handler=cmd_up)

    down = tsub.add_parser(
        "down", help="tear down testbeds (default: leftovers of crashed runs)",
        description="Removes testbed runs: their processes, emulator, namespaces, interfaces, state file and "
        "temporary folder, and the records of how detached runs ended. Without arguments only runs whose owner has "
        "died (crashed, or killed with SIGKILL); name run ids (from `testbed status`) or give --all to stop live "
        "ones too. Needs root.",
    )
    down.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="these runs (running or not)")
    down.add_argument("--all", action="store_true", help="every testbed run on this host, running or not")
    down.set_defaults(handler=cmd_down)

    status = tsub.add_parser(
        "status", help="list testbed runs on this host",
        description="Lists the testbed runs on this host from their state files: run id, running or CRASHED, "
        "backend, namespaces, addresses and the link's packet counters, then how the last detached runs that ended "
        "on their own ended (an emulator that died, say). A crashed run's leftovers, and those records, are "
        "removed by `testbed down`.",
    )
    status.add_argument("--json", action="store_true",
                        help="print the runs as a JSON list (run id, backend, owner and emulator alive, namespaces, "
                        "addresses, link counters) instead of the table")
    status.set_defaults(handler=cmd_status)

    cmp = tsub.add_parser(
        "compare", help="run token-streaming schemes end to end through the same path",
        description="Streams one answer per scheme and seed through a fresh testbed each (a real server in the "
        "server namespace, its client in the client namespace), every scheme meeting the same capacity trace and "
        "loss pattern for a seed, and reports stall ratio, the oracle's stall ratio, TTFT, token delay, bytes per "
        "token and loss. sse-tcp is the baseline outside QUIC: server-sent events over kernel TCP, as chatbots "
        "stream today. Needs root.",
    )
    add_path_args(cmp, down_required=True)
    cmp.add_argument("--schemes", default=",".join(SCHEME_NAMES),
                     help=f"comma-separated, from {', '.join(SCHEME_NAMES)}")
    cmp.add_argument("--tokens", type=int, default=400, metavar="N", help="tokens per answer")
    cmp.add_argument("--rate", type=float, default=30.0, metavar="R", help="tokens per second")
    cmp.add_argument("--runs", type=int, default=1, help="seeds seed, seed+1, ... (results averaged)")
    cmp.add_argument("--sse-cc", default="cubic", choices=("cubic", "bbr", "reno"),
                     help="TCP congestion control of the sse-tcp server")
    cmp.add_argument("--cross", action="append", metavar="SPEC",
                     help=f"cross traffic server -> client during every run (repeatable): {CROSS_HELP}")
    cmp.add_argument("--json", metavar="PATH", help="write the summary JSON here")
    cmp.add_argument("--plot", metavar="PATH", help="write a PNG (delay CDF + stall timeline)")
    cmp.add_argument("--keep", metavar="DIR", help="keep per-run packet logs and endpoint outputs in DIR")
    cmp.set_defaults(handler=cmd_compare)

    kv = tsub.add_parser(
        "kv", help="KV-cache fetches through the emulated path, one row per level controller",
        description="Fetches the real SmolLM2-135M KV cache of a text's first --context-tokens tokens from the "
        "daemon's KV service across the emulated path, each level controller in turn on the same stretch of the "
        "traces, and reports per controller the share of fetches within --deadline-ms, the quality (top-1 "
        "agreement of the levels used), bits per element, p95 fetch time and goodput. Needs the ml and kv-eval "
        "extras with the model, and root unless --virtual, which runs the same stack in virtual time.",
    )
    add_path_args(kv, down_required=True, kernel=False)
    kv.add_argument("--context-tokens", type=int, default=1024, metavar="N",
                    help="the context each fetch gets: the KV of the text's first N tokens")
    kv.add_argument("--chunk-tokens", type=int, default=256, metavar="N",
                    help="tokens per KV chunk, the unit a controller gives a level to (or sends as text); at least 16")
    kv.add_argument("--deadline-ms", type=int, default=3000, metavar="D",
                    help="each fetch's deadline in ms, which the controllers plan against and attainment counts")
    kv.add_argument("--controllers", default="tokenwire,even-split,fixed-L1,fixed-L2,fixed-L3",
                    help="comma-separated: tokenwire, tokenwire-ewma, even-split, fixed-L1, fixed-L2, fixed-L3")
    kv.add_argument("--repeats", type=int, default=5, metavar="K", help="fetches per controller")
    kv.add_argument("--recompute-us-per-token", type=int, metavar="US",
                    help="engine prefill cost of text chunks (default: SmolLM2's prefill measured here)")
    kv.add_argument("--prior-mbps", type=float, default=5.0, help="planning bandwidth before any sample")
    kv.add_argument("--stale-factor", type=float, help="tokenwire: discount of an earlier fetch's forecast")
    kv.add_argument("--reserve", type=float, help="tokenwire: share of the time left kept in reserve")
    kv.add_argument("--legacy-controller", action="store_true",
                    help="tokenwire: the previous rule (whole plan at the low quantile, 5 %% reserve)")
    kv.add_argument("--text", help="text whose first N tokens form the context (default: the shipped prose_harbor.txt)")
    kv.add_argument("--json", metavar="PATH", help="write the summary JSON (with every fetch's row) here")
    kv.add_argument("--plot", metavar="PATH",
                    help="write a plot (quality vs deadline attainment per controller + fetch-time CDF); its "
                    "format is the file's extension, e.g. .png")
    kv.add_argument("--keep", metavar="DIR", help="keep the context file and endpoint logs in DIR")
    kv.add_argument("--guard-weight", type=float, metavar="W",
                    help="tokenwire: guard rate low**W * median**(1-W) (default: the controller's)")
    kv.add_argument("--firm-guard-weight", type=float, metavar="W",
                    help="tokenwire: the same for a fetch's first (cold) and last chunk (default: the controller's)")
    kv.add_argument("--virtual", action="store_true",
                    help="virtual time (kv_vsim): the same stack over the emulator's link model; no root, fast")
    kv.add_argument("--workers", type=positive_int, metavar="N", help="--virtual: processes (default: one per core)")
    kv.add_argument("--decode-rate", type=float, metavar="EPS",
                    help="--virtual: the client's decode speed in elements/s, which it reports in each KV_FETCH as "
                         "the SDK reports its measured one (default: 50e6, not reported: the server's default)")
    kv.set_defaults(handler=cmd_kv)

    from .contention import register_contention

    register_contention(tsub)  # (its handler runs under ctrl_c_throughout, applied in its module)

    from .swiftqueue_cli import register_swiftqueue

    register_swiftqueue(tsub)
    swiftqueue = tsub.choices["swiftqueue"]  # (its handler lives in swiftqueue_cli; wrapped here like the others')
    swiftqueue.set_defaults(handler=ctrl_c_throughout(swiftqueue.get_default("handler")))
