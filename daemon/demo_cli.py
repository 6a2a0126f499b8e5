"""``tokenwire demo``: stream the built-in answer over QUIC through a lossy link, live, then compare schemes.

The tokenwire daemon (in this process, with the demo upstream) and a client run on loopback, with a
userspace relay between them that adds one-way delay and bursty loss. The answer renders live with
Chatterbox; then the same answer is streamed with the ``stream`` and ``duplicate`` baselines on the same
loss pattern, and a table compares them. No root needed.

B/token is the UDP payload the server sent towards the client (QUIC handshake included) per token, on either
link: the relay counted UDP payload and the namespace link IP bytes, so the same answer read 143/73/160 bytes
per token on one and 196/112/243 on the other. The down direction alone, as ``tokenwire sim`` and ``testbed
compare`` count bytes per token; the JSON also has ``bytes_up`` (the client's acks and the handshake).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TextIO

from .config import MAX_ANSWER_TOKENS

if TYPE_CHECKING:
    import socket
    import subprocess

    from tokenwire.testbed.topology import Testbed
    from tokenwire.transport.chat_stats import ChatStats
    from tokenwire.transport.client import ChatStream

DEFAULT_LOSS = "ge:0.004,0.04"  # bad ~9 % of the time, outages of 25 ms on average
MAX_TOKENS = MAX_ANSWER_TOKENS  # the daemon's bound on upstreams[].max_tokens and limits.max_tokens
HANDSHAKE_S = 10.0  # the client's handshake timeout, plus the link's delay (a module value: tests shorten it)
SAME_STALL = 0.02
MAX_DELAY_MS = 10_000.0  # --delay-ms: one-way delay of the link, in ms
PROGRESS_S = 5.0
"""Seconds between two progress lines on stderr while a scheme's answer streams unrendered (--quiet, and the
schemes after the first), as ``tokenwire sim`` prints them: ``--quiet --tokens 3000`` said nothing for minutes."""
DEFAULT_LINK_RATE = "12mbps"
READY_S = 60.0  # how long the namespace demo waits for its daemon's READY=1 (a first start compiles nothing: ~1 s)
"""Stall ratios closer than this read as "stalled as much". On a lossless link the ratio measures only timing
jitter (many sub-ms gaps; ratios of 0.005-0.05, differing between schemes by up to 0.006 on an idle machine and
0.013 on a busy one), which a relative test blew up to "33% less"; recovering from loss differs by ~0.2 on the
default link. Not a stalled time in ms: the jitter adds up with the run's length (25 ms in 3 s, 270 ms in 8 s)."""


class TestbedUnbuilt(Exception):
    """The namespace testbed could not be built though the host looked able to (root, capabilities, pyroute2): a
    container whose AppArmor or seccomp profile refuses the namespace's mount. ``--link auto`` falls back."""

    __test__ = False  # not a pytest test class, despite the name


def demo_tokens(text: str) -> int:
    """``type=`` of ``--tokens``: the daemon refused more than :data:`MAX_TOKENS` with a ConfigError traceback."""
    value = int(text)
    if not 1 <= value <= MAX_TOKENS:
        raise argparse.ArgumentTypeError(f"expected an integer in [1, {MAX_TOKENS}], got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    from tokenwire.daemon.cli import seed_arg  # (imported here: cli imports this module)

    p = sub.add_parser(
        "demo",
        help="stream a demo answer over QUIC through a lossy link, live, then compare schemes",
        description="Starts the tokenwire daemon with the built-in demo answer and a client behind an emulated "
        "link that adds delay and bursty loss (as root: two network namespaces joined by the link emulator; "
        "otherwise a loopback UDP relay); renders the answer live, then compares schemes.",
    )
    p.add_argument("--tokens", type=demo_tokens, default=240,
                   help=f"answer length in tokens, at most {MAX_TOKENS} (default: 240)")
    p.add_argument("--rate", type=float, default=30.0, help="tokens per second (default: 30)")
    p.add_argument("--delay-ms", type=float, default=40.0, help="one-way delay of the link (default: 40)")
    p.add_argument("--loss", default=DEFAULT_LOSS, help=f"loss spec, as in `tokenwire sim` (default: {DEFAULT_LOSS})")
    p.add_argument("--seed", type=seed_arg, default=3, help="loss pattern seed, an integer >= 0 (default: 3)")
    p.add_argument("--schemes", default="chatterbox,stream,duplicate",
                   help="comma-separated; the first one renders live (default: chatterbox,stream,duplicate)")
    p.add_argument("--quiet", action="store_true", help="do not render the answer live")
    p.add_argument(
        "--link",
        choices=("auto", "netns", "relay"),
        default="auto",
        help="netns: daemon and client in network namespaces with the link emulator (needs root); relay: a "
        "loopback UDP relay; auto (default): netns when possible. Both count B/token alike: UDP payload bytes "
        "from the server to the client, handshake included, per token",
    )
    p.add_argument("--rate-mbps", default=None,
                   help="netns link: a rate in Mbit/s (12, or 12mbps, 500kbps) or a mahimahi trace file "
                        f"(default: {DEFAULT_LINK_RATE}; the loopback relay applies no rate)")
    p.add_argument("--port", type=listen_port, default=None,
                   help="the UDP port the daemon listens on, 0 for a free one (default: a free one on the loopback "
                        f"relay, {NETNS_PORT} in the namespace testbed's own network); the first line says where")
    p.add_argument("--relay-port", type=listen_port, default=None,
                   help="the UDP port of the loopback relay the client reaches the daemon through, 0 for a free one "
                        "(default: a free one; the namespace testbed has no relay): with --port, the demo keeps to "
                        "two ports of your choice")
    p.add_argument("--json", type=Path, help="also write the comparison here")
    p.set_defaults(handler=run)


NETNS_PORT = 4433
"""The daemon's port in the server namespace unless ``--port`` says otherwise: that network is the demo's own."""


def listen_port(text: str) -> int:
    """``--port``: 0 to 65535, the SDK's check (imported here: aioquic is not loaded for every command's help)."""
    from tokenwire.transport.quic_io import port_argument

    return port_argument(text, listening=True)


def link_rate(text: str) -> str:
    """``--rate-mbps`` as the emulator's trace spec: a bare number is Mbit/s, as the option's name says (``12``
    was read as a file name, and the missing file was a traceback once the namespaces were built)."""
    from tokenwire.daemon.cli import CLIError
    from tokenwire.testbed.trace import TraceError, parse_rate, trace_from_spec

    spec = f"{text.strip()}mbps" if re.fullmatch(r"\s*(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*", text) else text
    negated = text.strip().removeprefix("-") if text.strip().startswith("-") else None
    if negated is not None and not os.path.exists(text) and (
            re.fullmatch(r"(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)", negated) or parse_rate(negated) is not None):
        # a negative rate was looked up as a file: "-3: no such trace file"
        raise CLIError(f"--rate-mbps: the rate must be positive, got {text.strip()}")
    try:
        trace_from_spec(spec)
    except (TraceError, ValueError) as exc:
        raise CLIError(f"--rate-mbps: {exc}") from None
    return spec


def run(args: argparse.Namespace) -> int:
    from tokenwire.daemon.cli import CLIError, repeated, write_json
    from tokenwire.daemon.demo_upstream import rate_problem
    from tokenwire.testbed.loss import LossSpecError, parse_loss
    from tokenwire.transport.frames import SCHEMES

    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    if not schemes or any(s not in SCHEMES for s in schemes):
        raise CLIError(f"--schemes takes a comma-separated subset of {', '.join(SCHEMES)}")
    twice = sorted(repeated(schemes))
    if twice:  # as `testbed compare` refuses: results are keyed by scheme, so it ran twice and showed the second
        raise CLIError(f"--schemes: {', '.join(twice)} listed twice")
    try:
        parse_loss(args.loss)
    except LossSpecError as exc:
        raise CLIError(str(exc)) from None
    # (--tokens: demo_tokens, at parsing); each option by name, as sim's: one message named both
    problem = rate_problem(args.rate, f"--rate {args.rate:g}")
    if problem:
        raise CLIError(problem)
    if not 0 <= args.delay_ms <= MAX_DELAY_MS:
        raise CLIError(f"--delay-ms {args.delay_ms:g} must be in [0, {MAX_DELAY_MS:g}]")
    rate_given = args.rate_mbps  # (None: the default, which needs no warning where it does not apply)
    args.rate_mbps = link_rate(rate_given if rate_given is not None else DEFAULT_LINK_RATE)
    use_netns = False
    if args.link in ("auto", "netns"):
        from tokenwire.testbed.topology import unavailable_reason

        reason = unavailable_reason()
        if reason is None:
            use_netns = True
        elif args.link == "netns":
            raise CLIError(f"the namespace testbed is unavailable: {reason}")
        else:
            print(f"(namespace testbed unavailable: {reason}; using the loopback relay)", file=sys.stderr)
    if use_netns:
        try:
            results = _demo_netns(args, schemes)
        except TestbedUnbuilt as exc:
            if args.link == "netns":
                raise CLIError(f"the namespace testbed could not be built: {exc}") from None
            print(f"(namespace testbed could not be built: {exc}; using the loopback relay)", file=sys.stderr)
            use_netns = False
    if use_netns and args.relay_port:
        print(f"(--relay-port {args.relay_port} is ignored: the namespace testbed has no relay)", file=sys.stderr)
    if not use_netns:
        if rate_given is not None:  # it was silently ignored, with --link relay and when auto fell back alike
            print(f"(--rate-mbps {rate_given} is ignored: the loopback relay adds delay and loss but applies no "
                  "rate limit; the namespace link applies it, --link netns as root)", file=sys.stderr)
        results = _demo_relay(args, schemes)
    for r in results.values():  # the table's B/token, in the JSON too
        r["bytes_per_token"] = bytes_per_token(r)
    print(format_results(results, args))
    if args.json:
        config = vars_for_json(args)
        # what ran, not what was asked: `auto` that fell back to the relay (which applies no --rate-mbps) read as
        # "link": "auto", "rate_mbps": "12mbps" in the JSON, its B/token and stalls taken for a namespace run's
        config["link"] = "netns" if use_netns else "relay"
        config["link_asked"] = args.link
        if not use_netns:
            config["rate_mbps"] = None
        write_json({"config": config, "schemes": results}, args.json)
    bad = [s for s, r in results.items() if not r["digest_verified"]]
    return 1 if bad else 0


def _demo_relay(args: argparse.Namespace, schemes: list[str]) -> dict[str, dict]:
    """:func:`_demo` on uvloop, Ctrl-C, SIGTERM and SIGHUP cancelling it (chat's :func:`run_interruptible`): its
    ``finally`` blocks stop the daemon and remove the temporary folder (cert, key), then main()'s "interrupted"
    (130). SIGTERM's default action (exit 143) left the folder behind; uvloop.run's own Ctrl-C handling raised
    KeyboardInterrupt at the second Ctrl-C wherever Python was (tracebacks, or death by the signal, 4 runs in 8);
    ``sigterm_as_ctrl_c``'s KeyboardInterrupt could land inside aioquic's connect and fail its cleanup too."""
    import uvloop

    from tokenwire.daemon.chat_cli import run_interruptible

    return run_interruptible(_demo(args, schemes), uvloop.new_event_loop, exiting=True)


def scheme_heading(scheme: str, k: int, live: bool) -> str:
    """The line above scheme number ``k``'s run: "the same answer" from the second on (under --quiet the first
    said "the same answer" too, with no answer before it)."""
    if live:
        return f"--- {scheme} (live) " + "-" * 50
    if k == 0:
        return f"--- {scheme}: streaming the answer (not rendered) on the lossy link ..."
    return f"--- {scheme}: streaming the same answer on the same loss pattern ..."


def progress_line(scheme: str, elapsed_s: float, received: int | None = None, tokens: int | None = None) -> str:
    """A progress line of an unrendered scheme's run, as ``tokenwire sim`` words its own."""
    got = f"{received}/{tokens} tokens received, " if received is not None else "streaming, "
    return f"    {scheme}: {got}{elapsed_s:.0f} s elapsed"


def _say_progress(line: str) -> None:
    """``line`` on stderr; a stderr that cannot be written (closed, a full disk) costs the line, not the demo."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass


async def _progress(scheme: str, stream: ChatStream, tokens: int) -> None:
    """Print :func:`progress_line` (the tokens ``stream`` holds) on stderr every :data:`PROGRESS_S` until cancelled
    (the run's end)."""
    import asyncio
    import time

    started = time.monotonic()
    while True:
        await asyncio.sleep(PROGRESS_S)
        _say_progress(progress_line(scheme, time.monotonic() - started, len(stream.tokens), tokens))


def cut_note(tokens: int) -> str:
    """What ends the live answer: a marker where ``--tokens`` cut the demo answer short (it ended mid-word, and
    read as text lost on the way; only the digest column said otherwise)."""
    from tokenwire.daemon.demo_upstream import answer_tokens

    return f" [... the demo answer cut at --tokens {tokens}]" if tokens < len(answer_tokens()) else ""


def vars_for_json(args: argparse.Namespace) -> dict:
    # (command_path: the parser's name for error lines, not a setting of the run)
    return {k: v for k, v in vars(args).items() if k not in ("handler", "json", "verbose", "command_path")}


async def _warm_up(host: str, port: int, cafile: Path) -> None:
    """One unmeasured one-token answer straight from the daemon (no link in between): its first connection and
    request run cold code paths (~0.1 s), which delayed only the first scheme's answer against the loss pattern
    every scheme replays. Its outcome does not matter: the measured runs follow."""
    import asyncio
    import contextlib

    from tokenwire.transport.client import connect
    from tokenwire.transport.errors import RemoteError, TokenwireError

    with contextlib.suppress(ConnectionError, RemoteError, TokenwireError, TimeoutError):
        async with asyncio.timeout(20), connect(host, port, cafile=cafile, server_name="localhost",
                                                timeout=HANDSHAKE_S) as conn:
            async for _ in conn.chat("warm-up", max_tokens=1):
                pass


async def stream_scheme(host: str, port: int, cafile: Path, scheme: str, args: argparse.Namespace, *, live: bool,
                        out: TextIO, aligned: Callable[[str], Awaitable[None] | None],
                        progress: bool) -> ChatStats:
    """Connect, send the request and stream the answer (rendered on ``out`` when ``live``); its statistics, or
    ``CLIError``.

    ``aligned(phase)`` restarts the link's loss pattern (the relay's, or the emulator's origin) right before each
    of three moments: ``connect`` (the handshake), ``request`` (after the handshake, immediately before the
    request leaves) and ``close`` (the answer is whole; the connection closes). So every scheme's request meets
    the same point of the pattern, as ``tokenwire testbed compare`` does it: restarted before the connection
    only, the pattern ran on during the handshake (and the client process's start-up on the namespace link),
    hundreds of ms that varied from run to run, and the first scheme, whose start was slowest, met another stretch
    of it (TTFT 0.7-1.9 s in 5 of 14 first runs, 0.24 s for the others). The handshake gets its own restart
    because on the namespace link a handshake packet lost at a random point (a 1.4-s TTFT) was as unfair; the
    close, because a close lost in an outage left the daemon probing the departed client until its idle timeout,
    and those packets counted in the next scheme's B/token (stream 95-101 instead of 74 after chatterbox).
    """
    import asyncio

    from tokenwire.daemon.cli import CLIError
    from tokenwire.transport.client import connect
    from tokenwire.transport.errors import RemoteError

    connected = False
    try:
        await _phase(aligned, "connect")
        # the handshake's packets cross the link's delay several times (and may be lost)
        async with connect(host, port, cafile=cafile, server_name="localhost",
                           timeout=HANDSHAKE_S + 8 * args.delay_ms / 1000) as conn:
            connected = True
            await _phase(aligned, "request")
            # max_tokens: the demo upstream's answer is its text once unless a request asks for more
            stream = conn.chat("Why do chatbots stall on trains?", scheme=scheme, max_tokens=args.tokens,
                               params={"seed": args.seed})
            ticker = asyncio.ensure_future(_progress(scheme, stream, args.tokens)) if progress else None
            try:
                async for delta in stream:
                    if live:
                        out.write(delta)
                        out.flush()
            except asyncio.CancelledError:  # Ctrl-C or SIGTERM: "interrupted" on a line of its own
                if live:
                    print(file=out)
                raise
            finally:
                if ticker is not None:
                    ticker.cancel()
            if live:
                print(cut_note(args.tokens) + "\n", file=out)
            st = stream.stats
            assert st is not None
            await _phase(aligned, "close")
            return st
    except BrokenPipeError:  # `tokenwire demo | head`: the CLI's own handling
        raise
    except (ConnectionError, RemoteError) as exc:  # was a traceback (an OSError without a file name)
        if not connected:
            raise CLIError(f"{scheme}: {exc}: the link (--loss {args.loss}) is too lossy for a QUIC "
                           "handshake; try less loss") from None
        raise CLIError(f"{scheme}: the connection failed mid-answer ({exc}); the link (--loss "
                       f"{args.loss}) may be too lossy; try less loss") from None


async def _phase(aligned: Callable[[str], Awaitable[None] | None], phase: str) -> None:
    waited = aligned(phase)
    if waited is not None:
        await waited


async def _demo(args: argparse.Namespace, schemes: list[str]) -> dict[str, dict]:
    import tempfile
    from pathlib import Path

    from tokenwire.daemon.cli import CLIError
    from tokenwire.daemon.config import parse_config
    from tokenwire.daemon.service import Daemon
    from tokenwire.daemon.startup import StartupError
    from tokenwire.testbed.udp_relay import UdpRelay
    from tokenwire.transport.tls import dev_cert

    out = sys.stdout
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="tokenwire-demo-") as tmp:
        cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        dev_cert().write(cert, key)
        config = parse_config(
            {
                # --port: a fixed one to watch or let through a firewall; by default a free one (two demos, or a
                # demo and a test, on one machine)
                "server": {"listen": [f"127.0.0.1:{args.port or 0}"], "certificate": str(cert),
                           "private_key": str(key)},
                "metrics": {"listen": ""},
                # the daemon's own limit too (16384 by default): it cut a longer --tokens short, silently
                "limits": {"max_tokens": args.tokens},
                "upstreams": [{"name": "demo", "type": "demo", "rate": args.rate, "max_tokens": args.tokens}],
            }
        )
        daemon = Daemon(config)
        try:
            await daemon.start()
        except StartupError as exc:  # --port taken (by another demo, say): its one line, not a traceback
            raise CLIError(f"--port {args.port}: {exc}" if args.port else str(exc)) from None
        port = daemon.addresses[0][1]
        relay = UdpRelay(("127.0.0.1", port), delay_ms=args.delay_ms, loss=args.loss, seed=args.seed,
                         port=args.relay_port or 0)
        try:
            await relay.start()
        except OSError as exc:  # --relay-port taken (by the daemon's --port, another demo): one line
            await daemon.stop()
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc  # (uvloop wraps the errno's)
            raise CLIError(f"--relay-port {args.relay_port}: cannot listen on udp/127.0.0.1:{args.relay_port}: "
                           f"{cause.strerror or cause}") from None
        print(
            f"tokenwire demo: the tokenwire daemon (demo upstream, {args.rate:g} tokens/s) on udp/127.0.0.1:{port}; "
            f"the client reaches it through a relay on udp/127.0.0.1:{relay.port} adding {args.delay_ms:g} ms "
            f"one-way delay and loss {args.loss} (seed {args.seed}).\n",
            file=out,
        )
        try:
            await _warm_up("127.0.0.1", port, cert)  # straight to the daemon: no delay, no loss
            for k, scheme in enumerate(schemes):
                live = k == 0 and not args.quiet
                print(scheme_heading(scheme, k, live), file=out, flush=True)

                def aligned(phase: str) -> None:
                    """The pattern's start at each of stream_scheme's phases; fresh counters at its connection."""
                    if phase == "connect":
                        relay.reset(args.seed)
                    else:  # (the handshake's packets still count in B/token)
                        relay.restart(args.seed)

                st = await stream_scheme("127.0.0.1", relay.port, cert, scheme, args, live=live, out=out,
                                         aligned=aligned, progress=not live)
                results[scheme] = {
                    **st.to_dict(),
                    "link_loss_down": relay.down.dropped / max(1, relay.down.packets),
                    "packets_down": relay.down.packets,
                    "bytes_down": relay.down.bytes,  # UDP payload, as the netns link counts it
                    "bytes_up": relay.up.bytes,
                }
        finally:
            relay.close()
            await daemon.stop()
    return results


def _demo_netns(args: argparse.Namespace, schemes: list[str]) -> dict[str, dict]:
    """The daemon in the server namespace, the client in the client namespace, the emulator between them."""
    import contextlib
    import functools
    import os
    import re
    import socket
    import subprocess
    import tempfile
    from pathlib import Path

    from tokenwire.daemon.cli import CLIError
    from tokenwire.testbed.cli import sigterm_as_ctrl_c
    from tokenwire.testbed.emulator import DirectionConfig, EmulatorConfig
    from tokenwire.testbed.netns import TestbedError
    from tokenwire.testbed.topology import Testbed
    from tokenwire.transport.tls import dev_cert

    out = sys.stdout
    py = sys.executable
    half = args.delay_ms
    config = EmulatorConfig(
        down=DirectionConfig(trace=args.rate_mbps, delay_ms=half, loss=args.loss, queue="droptail:packets=200"),
        up=DirectionConfig(trace=args.rate_mbps, delay_ms=half, loss=args.loss, queue="droptail:packets=200"),
        seed=args.seed,
    )
    results: dict[str, dict] = {}
    # SIGTERM (kill, a timeout) unwinds like Ctrl-C so the namespaces go too
    with sigterm_as_ctrl_c(), tempfile.TemporaryDirectory(prefix="tokenwire-demo-") as tmp, \
            contextlib.ExitStack() as stack:
        try:  # (a failed build has torn down what it made)
            tb = stack.enter_context(Testbed(config, scratch=tmp))
        except TestbedError as exc:
            raise TestbedUnbuilt(str(exc)) from exc
        tmpdir = Path(tmp)
        cert, key = tmpdir / "cert.pem", tmpdir / "key.pem"
        dev_cert().write(cert, key)
        cfg = tmpdir / "tokenwire.toml"
        listen = f"{tb.server_addr}:{NETNS_PORT if args.port is None else args.port}"  # (0: READY says which)
        cfg.write_text(
            f'[server]\nlisten = ["{listen}"]\ncertificate = "{cert}"\nprivate_key = "{key}"\n'
            f'[metrics]\nlisten = ""\n[logging]\nlevel = "warning"\n'
            f'[limits]\nmax_tokens = {args.tokens}\n'  # the default 16384 cut a longer --tokens short
            f'[[upstreams]]\nname = "demo"\ntype = "demo"\nrate = {args.rate}\nmax_tokens = {args.tokens}\n'
        )
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(tmpdir / "notify.sock"))
        env = {**os.environ, "NOTIFY_SOCKET": str(tmpdir / "notify.sock")}
        errors = tmpdir / "daemon.err"
        with open(errors, "wb") as err:
            daemon = tb.popen(tb.server_ns, [py, "-m", "tokenwire.daemon.cli", "daemon", "--config", str(cfg)],
                              env=env, stderr=err)
        msg = _wait_ready(notify, daemon, errors)
        port = int(re.findall(r"udp/[^:]+:(\d+)", msg)[0])

        def run_client(scheme: str, tokens: int, live: bool, stdout: int | None, stderr: int | None,
                       stats_path: Path, limit_s: float = 600.0) -> tuple[int, list[dict]]:
            """:func:`netns_client` in the client namespace, driven to its exit: its status, and the emulator's
            counters as they were at each origin it asked for."""
            client = {"host": tb.server_addr, "port": port, "cafile": str(cert), "scheme": scheme,
                      "stats": str(stats_path), "live": live, "tokens": tokens, "seed": args.seed,
                      "delay_ms": args.delay_ms, "loss": args.loss}
            ready_r, ready_w = os.pipe()
            try:
                proc = tb.popen(tb.client_ns, [py, "-c", NETNS_CLIENT, json.dumps(client), str(ready_w)],
                                stdout=stdout, stderr=stderr, stdin=subprocess.PIPE, pass_fds=(ready_w,))
            finally:
                os.close(ready_w)  # (the child's copy alone: its exit reads as EOF)
            restarted: list[dict] = []
            with open(ready_r, "rb") as ready:
                status = _drive_client(proc, ready, scheme, progress=not live and stderr is None, limit_s=limit_s,
                                       aligned=functools.partial(_restart_origin, tb, restarted))
            return status, restarted

        # one unmeasured one-token answer first, through the link (the client namespace reaches the daemon only
        # through it): the daemon's first connection and request run cold code paths (~0.1 s), which delayed only
        # the first scheme's answer against the loss pattern. Its outcome does not matter (the link may lose it);
        # its close is aligned like the schemes' (stream_scheme), so no lost close leaves the daemon probing it.
        with contextlib.suppress(subprocess.TimeoutExpired):  # (killed after a minute: the runs follow anyway)
            run_client("stream", 1, False, subprocess.DEVNULL, subprocess.DEVNULL, tmpdir / "warm-up.json", 60.0)
        print(
            f"tokenwire demo: the tokenwire daemon runs in namespace {tb.server_ns} ({tb.server_addr}:{port}), the "
            f"client in {tb.client_ns}; the link emulator between them ({tb.backend}) adds {half:g} ms each way, "
            f"{args.rate_mbps}, loss {args.loss} (seed {args.seed}).\n",
            file=out,
        )
        for k, scheme in enumerate(schemes):
            live = k == 0 and not args.quiet
            stats_path = tmpdir / f"{scheme}.json"
            before = tb.stats()
            print(scheme_heading(scheme, k, live), file=out, flush=True)
            # the live answer where this command's own prints go: with --json -, stderr (a child inherits the
            # real stdout, which redirect_stdout cannot move, and put the answer ahead of the JSON)
            to = (2 if str(args.json) == "-" else None) if live else subprocess.DEVNULL  # fd 2: stderr
            status, restarted = run_client(scheme, args.tokens, live, to, None, stats_path)
            if status != 0:
                # its own one-line error is above (a link too lossy for a handshake): no traceback under it
                raise CLIError(f"the {scheme} client failed (exit status {status})")
            after = tb.stats()
            st = json.loads(stats_path.read_text())
            results[scheme] = {**st, **netns_link_counts(before, after, restarted)}
        notify.close()
    return results


def _restart_origin(tb: Testbed, snapshots: list[dict], phase: str) -> None:
    """The namespace client reached one of :func:`stream_scheme`'s phases: the emulator's pattern starts over, as
    compare restarts it between its client's "connected" and its "go". The origin zeroes the emulator's counters,
    so they are read first (into ``snapshots``)."""
    snapshots.append(tb.stats())
    tb.origin()


def _drive_client(proc: subprocess.Popen, ready: BinaryIO, scheme: str, *, progress: bool,
                  aligned: Callable[[str], None], limit_s: float = 600.0) -> int:
    """Run the namespace client (:func:`netns_client`) to its exit, its status: each phase it names on ``ready``
    gets ``aligned(phase)``, then "go" on its stdin; with ``progress``, a :func:`progress_line` on stderr every
    :data:`PROGRESS_S` (the client in the other namespace reports no token count until its end)."""
    import contextlib
    import select
    import subprocess
    import time

    assert proc.stdin is not None
    started = last = time.monotonic()
    pending = b""
    while True:
        now = time.monotonic()
        if now - started >= limit_s:
            proc.kill()
            raise subprocess.TimeoutExpired(proc.args, limit_s)
        wait = min(max(0.0, last + PROGRESS_S - now), max(0.0, started + limit_s - now))
        if select.select([ready], [], [], wait)[0]:
            chunk = os.read(ready.fileno(), 256)
            if not chunk:  # it exited (a failed handshake: its one-line error on stderr)
                break
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                aligned(line.decode())
                with contextlib.suppress(BrokenPipeError):  # (it exited meanwhile: its status says how)
                    proc.stdin.write(b"go\n")
                    proc.stdin.flush()
        elif time.monotonic() - last >= PROGRESS_S:
            last = time.monotonic()
            if progress:
                _say_progress(progress_line(scheme, last - started))
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.close()
    return proc.wait(timeout=max(1.0, started + limit_s - time.monotonic()))


NETNS_CLIENT = "import sys; from tokenwire.daemon.demo_cli import netns_client; sys.exit(netns_client(sys.argv[1:]))"
"""The namespace demo's client process (``python -c``): not ``tokenwire chat``, which sends its request as soon as
it has connected, while the emulator's pattern must restart between the two (:func:`stream_scheme`)."""


def netns_client(argv: list[str]) -> int:
    """``argv``: the run as JSON and a pipe's fd. :func:`stream_scheme`, writing the name of each of its phases on
    the pipe and waiting for ``go`` on stdin (the demo restarts the emulator's origin meanwhile); the statistics
    go to the JSON's ``stats`` file, as ``tokenwire chat --json-stats`` writes them."""
    import asyncio

    import uvloop

    from tokenwire.daemon.cli import CLIError

    run = json.loads(argv[0])
    ready_fd = int(argv[1])
    args = argparse.Namespace(tokens=run["tokens"], seed=run["seed"], delay_ms=run["delay_ms"], loss=run["loss"])

    async def aligned(phase: str) -> None:
        os.write(ready_fd, phase.encode() + b"\n")
        said = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.readline)
        if said.strip() != b"go":
            raise CLIError("the demo did not say go")

    try:
        st = uvloop.run(stream_scheme(run["host"], run["port"], Path(run["cafile"]), run["scheme"], args,
                                      live=run["live"], out=sys.stdout, aligned=aligned, progress=False))
    except CLIError as exc:
        print(f"tokenwire demo: error: {exc}", file=sys.stderr)
        return 2
    Path(run["stats"]).write_text(json.dumps(st.to_dict()))
    return 0


def _wait_ready(notify: socket.socket, daemon: subprocess.Popen, errors: Path) -> str:
    """The daemon's READY=1 notification (its STATUS, with the listening address), checking every 0.1 s that it
    still runs: one that died at start (a config it refused, a broken install) left the demo waiting 30 s for a
    bare TimeoutError. ``CLIError`` with its exit status and its last error lines, or after READY_S."""
    import time

    from tokenwire.daemon.cli import CLIError

    notify.settimeout(0.1)
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        try:
            msg = notify.recv(4096).decode()
        except TimeoutError:
            msg = ""
        if "READY=1" in msg:
            return msg
        if daemon.poll() is not None:
            tail = errors.read_text(errors="replace").strip().splitlines()[-5:]
            said = ("; it said:\n  " + "\n  ".join(tail)) if tail else ""
            raise CLIError(f"the demo's daemon exited at start (status {daemon.returncode}){said}")
    raise CLIError(f"the demo's daemon did not report ready within {READY_S:g} s")


def netns_link_counts(before: dict, after: dict, restarted: Sequence[dict] = ()) -> dict[str, float | int]:
    """The relay's counters (:class:`tokenwire.testbed.udp_relay.RelayPath`) from two emulator ``stats``
    snapshots: bytes are UDP payload, as the relay sees datagrams (the emulator's ``arrived_bytes`` are IP bytes,
    28 more per IPv4 packet: B/token read 196/112/243 here against 143/73/160 through the relay).

    ``restarted``: the snapshots taken just before each ``origin`` between the two (the demo restarts the
    pattern at each of a run's phases), which zeroes the emulator's counters: what moved up to each counts."""
    def moved(direction: str, key: str) -> int:
        points = [before, *restarted, after]
        return int(points[1][direction][key] - before[direction][key]
                   + sum(p[direction][key] for p in points[2:]))

    packets = moved("down", "arrived_packets")
    return {
        "link_loss_down": moved("down", "lost_packets") / max(1, packets),
        "packets_down": packets,
        "bytes_down": moved("down", "arrived_udp_payload_bytes"),
        "bytes_up": moved("up", "arrived_udp_payload_bytes"),
    }


def bytes_per_token(r: dict) -> float:
    """UDP payload bytes from the server to the client, handshake included, per token received."""
    return float(r["bytes_down"]) / max(1, r["tokens"])


def format_results(results: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [
        "",
        f"{'scheme':<11} {'stall ratio':>11} {'longest stall':>14} {'TTFT':>8} {'p99 delay':>10} "
        f"{'tokens':>7} {'B/token':>8} {'digest':>9}",
    ]
    from tokenwire.daemon.cli import cell  # "-" for what a run could not measure (nothing rendered: None)

    for name, r in results.items():
        lines.append(
            f"{name:<11} {cell(r['stall_ratio'], '>11.3f')} {cell(r['longest_stall_ms'], '>11.0f')} ms "
            f"{cell(r['ttft_ms'], '>5.0f')} ms {cell(r['p99_token_delay_ms'], '>7.0f')} ms {r['tokens']:>7} "
            f"{bytes_per_token(r):>8.0f} {'verified' if r['digest_verified'] else 'MISMATCH':>9}"
        )
    cb, st = (results.get(s, {}).get("stall_ratio") for s in ("chatterbox", "stream"))
    if cb is not None and st is not None:  # None: the scheme did not run, or rendered nothing
        if abs(cb - st) < SAME_STALL:  # timing jitter, not recovery: "33% less" on a lossless link
            # not "(nothing to recover)": both may have recovered as much on a lossy link
            lines.append("\nChatterbox and in-order streaming stalled as much on this link (within timing noise).")
        elif st > 0:  # no percentage of nothing
            red = 1 - cb / st
            how = f"{100 * red:.0f}% less" if red >= 0 else f"{-100 * red:.0f}% more"  # not "-11% less"
            lines.append(f"\nChatterbox spent {how} time stalled than in-order streaming on this link.")
    suggested = "iid:0.05" if getattr(args, "loss", None) != "iid:0.05" else DEFAULT_LOSS  # not the one just run
    other = f"--loss {suggested} or --seed N"
    lines.append(
        "(stall ratio: share of reading time spent waiting for a token; delays beyond the link's base delay. "
        "B/token: UDP payload bytes from the server, handshake included, per token. "
        f"Try {other}.)"
    )
    return "\n".join(lines)
