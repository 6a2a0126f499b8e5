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
from pathlib import Path
from typing import TYPE_CHECKING

from .config import MAX_ANSWER_TOKENS

if TYPE_CHECKING:
    import socket
    import subprocess

    from tokenwire.transport.client import ChatStream

DEFAULT_LOSS = "ge:0.004,0.04"  # bad ~9 % of the time, outages of 25 ms on average
MAX_TOKENS = MAX_ANSWER_TOKENS  # the daemon's bound on upstreams[].max_tokens and limits.max_tokens
HANDSHAKE_S = 10.0  # the client's handshake timeout, plus the link's delay (a module value: tests shorten it)
SAME_STALL = 0.02
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
                   help=f"answer length in tokens, at most {MAX_TOKENS} (default 240)")
    p.add_argument("--rate", type=float, default=30.0, help="tokens per second (default 30)")
    p.add_argument("--delay-ms", type=float, default=40.0, help="one-way delay of the link (default 40)")
    p.add_argument("--loss", default=DEFAULT_LOSS, help=f"loss spec, as in `tokenwire sim` (default {DEFAULT_LOSS})")
    p.add_argument("--seed", type=seed_arg, default=3, help="loss pattern seed, an integer >= 0 (default 3)")
    p.add_argument("--schemes", default="chatterbox,stream,duplicate",
                   help="comma-separated; the first one renders live (default chatterbox,stream,duplicate)")
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
                        f"(default {DEFAULT_LINK_RATE}; the loopback relay applies no rate)")
    p.add_argument("--port", type=listen_port, default=None,
                   help="the UDP port the daemon listens on, 0 for a free one (default: a free one on the loopback "
                        f"relay, {NETNS_PORT} in the namespace testbed's own network); the first line says where")
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

    spec = f"{text.strip()}mbps" if re.fullmatch(r"\s*[0-9]*\.?[0-9]+\s*", text) else text
    negated = text.strip().removeprefix("-") if text.strip().startswith("-") else None
    if negated is not None and not os.path.exists(text) and (
            re.fullmatch(r"[0-9]*\.?[0-9]+", negated) or parse_rate(negated) is not None):
        # a negative rate was looked up as a file: "-3: no such trace file"
        raise CLIError(f"--rate-mbps: the rate must be positive, got {text.strip()}")
    try:
        trace_from_spec(spec)
    except (TraceError, ValueError) as exc:
        raise CLIError(f"--rate-mbps: {exc}") from None
    return spec


def run(args: argparse.Namespace) -> int:
    from tokenwire.daemon.cli import CLIError, write_json
    from tokenwire.testbed.loss import LossSpecError, parse_loss
    from tokenwire.transport.frames import SCHEMES

    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    if not schemes or any(s not in SCHEMES for s in schemes):
        raise CLIError(f"--schemes takes a comma-separated subset of {', '.join(SCHEMES)}")
    twice = sorted({s for s in schemes if schemes.count(s) > 1})
    if twice:  # as `testbed compare` refuses: results are keyed by scheme, so it ran twice and showed the second
        raise CLIError(f"--schemes: {', '.join(twice)} listed twice")
    try:
        parse_loss(args.loss)
    except LossSpecError as exc:
        raise CLIError(str(exc)) from None
    if not 0.1 <= args.rate <= 10_000 or not 0 <= args.delay_ms <= 10_000:  # (--tokens: demo_tokens, at parsing)
        raise CLIError("expected --rate in [0.1, 10000] (the demo upstream's range), --delay-ms in [0, 10000]")
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

    return run_interruptible(_demo(args, schemes), uvloop.new_event_loop)


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


async def _demo(args: argparse.Namespace, schemes: list[str]) -> dict[str, dict]:
    import asyncio
    import tempfile
    from pathlib import Path

    from tokenwire.daemon.cli import CLIError
    from tokenwire.daemon.config import parse_config
    from tokenwire.daemon.service import Daemon
    from tokenwire.daemon.startup import StartupError
    from tokenwire.testbed.udp_relay import UdpRelay
    from tokenwire.transport.client import connect
    from tokenwire.transport.errors import RemoteError
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
        relay = await UdpRelay(("127.0.0.1", port), delay_ms=args.delay_ms, loss=args.loss, seed=args.seed).start()
        print(
            f"tokenwire demo: the tokenwire daemon (demo upstream, {args.rate:g} tokens/s) on udp/127.0.0.1:{port}; "
            f"the client reaches it through a relay on udp/127.0.0.1:{relay.port} adding {args.delay_ms:g} ms "
            f"one-way delay and loss {args.loss} (seed {args.seed}).\n",
            file=out,
        )
        try:
            for k, scheme in enumerate(schemes):
                live = k == 0 and not args.quiet
                relay.reset(args.seed)  # the same outages for every scheme
                connected = False
                try:
                    # the handshake's packets cross the relay's delay several times (and may be lost)
                    async with connect("127.0.0.1", relay.port, cafile=cert, server_name="localhost",
                                       timeout=HANDSHAKE_S + 8 * args.delay_ms / 1000) as conn:
                        connected = True
                        # max_tokens: the demo upstream's answer is its text once unless a request asks for more
                        stream = conn.chat("Why do chatbots stall on trains?", scheme=scheme, max_tokens=args.tokens,
                                           params={"seed": args.seed})
                        print(scheme_heading(scheme, k, live), file=out, flush=True)
                        ticker = None if live else asyncio.ensure_future(
                            _progress(scheme, stream, args.tokens))
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
                        results[scheme] = {
                            **st.to_dict(),
                            "link_loss_down": relay.down.dropped / max(1, relay.down.packets),
                            "packets_down": relay.down.packets,
                            "bytes_down": relay.down.bytes,  # UDP payload, as the netns link counts it
                            "bytes_up": relay.up.bytes,
                        }
                except BrokenPipeError:  # `tokenwire demo | head`: the CLI's own handling
                    raise
                except (ConnectionError, RemoteError) as exc:  # was a traceback (an OSError without a file name)
                    if not connected:
                        raise CLIError(f"{scheme}: {exc}: the link (--loss {args.loss}) is too lossy for a QUIC "
                                       "handshake; try less loss") from None
                    raise CLIError(f"{scheme}: the connection failed mid-answer ({exc}); the link (--loss "
                                   f"{args.loss}) may be too lossy; try less loss") from None
        finally:
            relay.close()
            await daemon.stop()
    return results


def _demo_netns(args: argparse.Namespace, schemes: list[str]) -> dict[str, dict]:
    """The daemon in the server namespace, the client in the client namespace, the emulator between them."""
    import contextlib
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
        # one unmeasured request first: the daemon's first connection ran ~0.1 s slower (cold code paths), which
        # moved the first scheme's request onto another part of the loss pattern that every scheme replays, and
        # only the first scheme lost it (TTFT 1,376 ms against 235 ms for the others, whichever scheme ran first)
        warm = tb.popen(tb.client_ns, [py, "-m", "tokenwire.daemon.cli", "chat", "--host", tb.server_addr, "--port",
                                       str(port), "--cafile", str(cert), "--server-name", "localhost",
                                       "--max-tokens", "1", "--max-time", "20", "warm-up"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        warm.wait(timeout=60)  # (its outcome does not matter: the link may lose it, the measured runs follow)
        print(
            f"tokenwire demo: the tokenwire daemon runs in namespace {tb.server_ns} ({tb.server_addr}:{port}), the "
            f"client in {tb.client_ns}; the link emulator between them ({tb.backend}) adds {half:g} ms each way, "
            f"{args.rate_mbps}, loss {args.loss} (seed {args.seed}).\n",
            file=out,
        )
        for k, scheme in enumerate(schemes):
            live = k == 0 and not args.quiet
            stats_path = tmpdir / f"{scheme}.json"
            tb.origin()  # the same trace phase and loss pattern for every scheme
            before = tb.stats()
            print(scheme_heading(scheme, k, live), file=out, flush=True)
            argv = [
                py,
                "-m",
                "tokenwire.daemon.cli",
                "chat",
                "--host",
                tb.server_addr,
                "--port",
                str(port),
                "--cafile",
                str(cert),
                "--server-name",
                "localhost",
                "--scheme",
                scheme,
                "--json-stats",
                str(stats_path),
                "--param",  # the generator's timing, as on the relay link (it streamed seed 0's whatever --seed)
                f"seed={args.seed}",
                "--max-tokens",  # the demo upstream's answer is its text once unless a request asks for more
                str(args.tokens),
                "Why do chatbots stall on trains?",
            ]
            # the live answer where this command's own prints go: with --json -, stderr (a child inherits the
            # real stdout, which redirect_stdout cannot move, and put the answer ahead of the JSON)
            to = (2 if str(args.json) == "-" else None) if live else subprocess.DEVNULL  # fd 2: stderr
            proc = tb.popen(tb.client_ns, argv, stdout=to)
            if _wait_with_progress(proc, scheme, live=live) != 0:
                # its own one-line error is above (a link too lossy for a handshake): no traceback under it
                raise CLIError(f"the {scheme} client failed (exit status {proc.returncode})")
            after = tb.stats()
            if live:
                print(cut_note(args.tokens), file=out)
            st = json.loads(stats_path.read_text())
            results[scheme] = {**st, **netns_link_counts(before, after)}
        notify.close()
    return results


def _wait_with_progress(proc: subprocess.Popen, scheme: str, *, live: bool, limit_s: float = 600.0) -> int:
    """``proc.wait(timeout=limit_s)``, with a :func:`progress_line` on stderr every :data:`PROGRESS_S` unless the
    answer renders ``live``: the client in the other namespace reports no token count until its end."""
    import subprocess
    import time

    started = time.monotonic()
    while True:
        left = limit_s - (time.monotonic() - started)
        try:
            return proc.wait(timeout=max(0.0, min(PROGRESS_S, left)))
        except subprocess.TimeoutExpired:
            if time.monotonic() - started >= limit_s:
                raise
            if not live:
                _say_progress(progress_line(scheme, time.monotonic() - started))


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


def netns_link_counts(before: dict, after: dict) -> dict[str, float | int]:
    """The relay's counters (:class:`tokenwire.testbed.udp_relay.RelayPath`) from two emulator ``stats``
    snapshots: bytes are UDP payload, as the relay sees datagrams (the emulator's ``arrived_bytes`` are IP bytes,
    28 more per IPv4 packet: B/token read 196/112/243 here against 143/73/160 through the relay)."""
    def moved(direction: str, key: str) -> int:
        return int(after[direction][key] - before[direction][key])

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
