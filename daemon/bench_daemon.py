"""``tokenwire bench daemon``: the real daemon under N concurrent SDK sessions on loopback.

The daemon runs as a subprocess (demo upstream at ``--rate`` tokens/s per session, without the demo's 100-400 ms
pauses: a fixed pause per 100 tokens held every rate near 400 tokens/s at most, ``--rate 5000 --seconds 4`` ran
54 s); ``--client-procs`` client processes (default 2) share ``--sessions`` connections, each streaming
``--answers`` concurrent answers (default 1) of ``rate x seconds`` tokens: many answers on one connection is where
per-connection work (a transmit builds datagrams over every stream of its connection) shows. A session waits (up to
30 s) for the daemon to acknowledge its answers' ends before it closes: closed at once, a session whose last packets
the loaded daemon's socket dropped stayed open in the daemon, and a run with every token delivered ended in the
daemon's warning about clients that had not ended their requests.
Reported: sessions that could not connect (apart: their tokens are not "lost", nor their digests failed; a session
the daemon refused at its handshake, over its limits, is one of them), tokens delivered, tokens lost or delivered
twice to the application, digest failures (answers whose end came with a digest that did not match), answers
unfinished (failed or refused before their end: lost whole, no digest checked), the daemon's CPU
time per delivered token, and token delay (render time minus generation time; client and daemon share
the host's monotonic clock, so the delay is absolute). Unlike the other benchmarks it has no same-run
baseline: these are absolute numbers under load (the per-packet cost against raw aioquic is
``tokenwire bench transport``'s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from tokenwire.daemon.bench_cli import die_with_parent
from tokenwire.daemon.config import MAX_LIVE_ANSWERS, MAX_REQUESTS_PER_CONNECTION, MAX_SESSIONS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "daemon", help="the real daemon under N concurrent SDK sessions on loopback",
        description="Starts the real daemon (demo upstream at --rate tokens/s, without the demo's pauses) and "
        "client processes that open --sessions connections to it on 127.0.0.1, each streaming --answers answers "
        "at once, and reports sessions that could not connect, tokens delivered, lost or "
        "duplicated, digest failures, unfinished answers, the daemon's CPU time per token and the token delay. "
        "There is no same-run baseline: these are absolute numbers under load (the cost against raw aioquic is "
        "`bench transport`'s).",
    )
    p.add_argument("--sessions", type=int, default=200, help="concurrent client sessions (default: 200)")
    p.add_argument("--rate", type=float, default=20.0, help="tokens per second per session (default: 20)")
    p.add_argument("--seconds", type=float, default=20.0, help="answer length in seconds of generation (default: 20)")
    p.add_argument("--scheme", choices=("chatterbox", "stream", "duplicate"), default="chatterbox",
                   help="how every answer's tokens are sent (the scheme each session asks the daemon for)")
    p.add_argument("--answers", type=int, default=1,
                   help="concurrent answers per session, all on its one connection (default: 1)")
    p.add_argument("--client-procs", type=int, default=2, help="client processes sharing the sessions (default: 2)")
    p.add_argument("--port", type=int, default=0,
                   help="the daemon's UDP port on 127.0.0.1 (default: 0, any free one), to keep runs in a port range")
    p.add_argument("--metrics-listen", default="", metavar="HOST:PORT",
                   help="serve the daemon's Prometheus metrics there during the run (default: off)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON here (- for stdout)")
    p.set_defaults(handler=run_cli)


def _cpu_seconds(pid: int) -> float:
    """CPU time of a process, all its threads (those that ended too), in nanoseconds' resolution: its
    process CPU clock (Linux's ``clock_getcpuclockid``, ``CPUCLOCK_SCHED``). /proc's utime + stime count clock
    ticks (10 ms): a short run's ``cpu_us_per_token`` came out as exactly 533.33, 5000 or 10000. /proc stays
    the fallback where that clock cannot be read."""
    try:
        return time.clock_gettime((~pid << 3) | 2)
    except OSError:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _udp_rcvbuf_errors() -> int:
    """Host-wide UDP receive-buffer drops (/proc/net/snmp): loss on loopback means an overloaded reader."""
    lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines() if ln.startswith("Udp:")]
    return int(lines[1][lines[0].index("RcvbufErrors")])


# the daemon's bounds (one session per client; an answer per request of a connection)
MAX_ANSWERS = MAX_REQUESTS_PER_CONNECTION
LIVE_ANSWERS_MARGIN = 64  # answers the daemon may run beyond the benchmark's own (its warm-ups)
READY_TIMEOUT_S = 30.0
PROGRESS_S = 5.0  # between the progress lines on stderr
# A client's connect timeout: the daemon's HANDSHAKE_PROVEN_TIMEOUT_S, what it gives a handshake under load (its
# 10 s for an unproven address does not apply then: it has Retry on, and every client comes back with a token)
CONNECT_TIMEOUT_S = 30.0
HANDSHAKE_STAGGER_S = 0.01  # between a worker's sessions' starts
FIRST_TOKEN_MS = 150.0  # the demo upstream's wait before an answer's first token, written in the daemon's config


# How long a session waits, once its answers have ended, for the daemon to acknowledge their ends (its FINs), and
# how often it looks: a loaded daemon acknowledges late (round trips of 7-11 s on a 2-core host at load 5, where a
# 5-s bound still left 104 answers to its stop warning; this one is CONNECT_TIMEOUT_S's, what a handshake under load
# gets), and ends still unacknowledged at the timeout are counted (request_ends_unacknowledged). Unacknowledged after
# CONFIRM_PING_AFTER_S, it sends PINGs (see confirm_ends), again after twice as long each time: a PING every look
# from 200 sessions added 2,000 packets/s to a loaded daemon
CONFIRM_TIMEOUT_S = 30.0
CONFIRM_POLL_S = 0.05
CONFIRM_PING_AFTER_S = 0.2
CONFIRM_PINGS = 3  # aioquic's packet threshold: a packet is lost once one sent 3 after it is acknowledged
CONFIRM_PING_UID = -1  # (aioquic's own ping() waiters use id() values, tokenwire's keepalives small counters)


def _daemon_command(cfg: Path) -> list[str]:
    """The real daemon, started through this module's ``--daemon`` entry: the demo upstream without its pauses."""
    return [sys.executable, "-m", "tokenwire.daemon.bench_daemon", "--daemon", str(cfg)]


def _daemon_main(cfg: str) -> int:
    """``tokenwire daemon --config CFG`` with the demo upstream's pauses off (:func:`set_default_pause_prob`): the
    benchmark's schedule is then ``--rate`` tokens/s, and the serving span is compared with that schedule."""
    from tokenwire.daemon.cli import main
    from tokenwire.daemon.demo_upstream import set_default_pause_prob

    set_default_pause_prob(0.0)
    return main(["daemon", "--config", cfg])


def unacknowledged_ends(quic: Any, stream_ids: list[int]) -> int:
    """How many of these request streams the server has not acknowledged this side's end (FIN) of. aioquic marks a
    stream's sender finished once its FIN is acknowledged, and drops the stream once both sides are; the server
    handles what a packet carries before it acknowledges it, so an acknowledged FIN is a request it has ended."""
    unacked = 0
    for sid in stream_ids:
        stream = quic._streams.get(sid)
        if stream is not None and not stream.sender.is_finished:
            unacked += 1
    return unacked


async def confirm_ends(conn: Any, streams: list[Any], timeout: float | None = None) -> int:
    """Wait until the daemon has acknowledged the end of every answer that reached its end (its FIN went out with
    it), the connection closed, or ``timeout``; the ends still unacknowledged. Left at once, the close (sent once,
    never again) and a FIN the daemon's full socket dropped were lost for good: the daemon held the session and its
    answers until its idle timeout, and a 200-session run with every token delivered ended "closing with 197
    generated answers whose clients had not ended their requests".

    An end still unacknowledged after a while gets PINGs, each in a packet of its own: the handshake storm's late
    acknowledgements had taught the client a round trip of ~9 s (a 46-s PTO), and the FIN was the last packet it had
    to send, so nothing after it could show it lost. Acknowledged PINGs past it do (aioquic's packet threshold), and
    the FIN is sent again."""
    from tokenwire.transport.path_recovery import window_full

    protocol = conn._protocol
    quic = protocol._quic
    ids = [s.stream_id for s in streams if s.outcome is not None and s.stream_id is not None]
    start = time.monotonic()
    deadline = start + (CONFIRM_TIMEOUT_S if timeout is None else timeout)
    wait = CONFIRM_PING_AFTER_S
    ping_at = start + wait
    while True:
        left = unacknowledged_ends(quic, ids)
        now = time.monotonic()
        if not left or conn.closed or now >= deadline:
            return left
        if now >= ping_at:
            for _ in range(CONFIRM_PINGS):
                quic.send_ping(CONFIRM_PING_UID)
                if window_full(quic):  # (as the keepalive does: a full window held the PING back for a PTO)
                    quic._send_probe()
                protocol.transmit()
            wait *= 2
            ping_at = now + wait
        await asyncio.sleep(CONFIRM_POLL_S)


def _stderr_tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:]) if text else "(nothing on stderr)"


def _ready_port(msg: str) -> int:
    """The first QUIC port in READY's STATUS (``listening on udp/127.0.0.1:P`` or ``udp/[::1]:P``)."""
    found = re.search(r"udp/(?:\[[^\]]*\]|[^\s:,;]+):(\d+)", msg)
    if found is None:
        raise ValueError(f"no udp/HOST:PORT in the daemon's READY status: {msg!r}")
    return int(found.group(1))


def _ready_metrics(msg: str) -> str | None:
    """The metrics URL in READY's STATUS (``metrics on http://HOST:PORT/metrics``), None when metrics are off."""
    found = re.search(r"metrics on (\S+)", msg)
    return found.group(1) if found else None


def _start_daemon(
    tmp: Path, sessions: int, rate: float, tokens: int, ready_timeout: float = READY_TIMEOUT_S, answers: int = 1,
    port: int = 0, metrics_listen: str = "",
) -> tuple[subprocess.Popen, int, socket.socket, str]:
    """Start the daemon and wait for its READY; :class:`CLIError` (the child killed) if it exits or hangs first.
    Returns the daemon, its QUIC port, the notify socket and READY's STATUS (the metrics URL is there)."""
    from tokenwire.daemon.cli import CLIError
    from tokenwire.transport.tls import dev_cert

    cert, key = tmp / "cert.pem", tmp / "key.pem"
    dev_cert().write(cert, key)
    cfg = tmp / "tokenwire.toml"
    cfg.write_text(
        textwrap.dedent(f"""
        [server]
        listen = ["127.0.0.1:{port}"]
        certificate = "{cert}"
        private_key = "{key}"
        [metrics]
        listen = {json.dumps(metrics_listen)}
        [limits]
        max_sessions = {min(sessions + 10, MAX_SESSIONS)}
        max_requests_per_connection = {max(64, answers)}
        max_live_answers = {sessions * answers + LIVE_ANSWERS_MARGIN}
        max_tokens = {max(tokens, 16_384)}
        [logging]
        level = "warning"
        [[upstreams]]
        name = "demo"
        type = "demo"
        rate = {rate}
        first_token_ms = {FIRST_TOKEN_MS}
        max_tokens = {tokens}
        """)
    )
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify.sock"))
    notify.settimeout(0.1)  # short waits: a daemon that exits is noticed at once, not after the whole timeout
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp / "notify.sock")}
    err_path = tmp / "daemon.stderr"
    proc: subprocess.Popen | None = None
    try:
        # stderr to a file, not a pipe: a daemon that logs a lot during the run must never block on it
        with err_path.open("wb") as err:
            proc = subprocess.Popen(_daemon_command(cfg), env=env, stderr=err, preexec_fn=die_with_parent())
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                msg = notify.recv(4096).decode(errors="replace")
            except TimeoutError:
                msg = ""
            if "READY=1" in msg:
                return proc, _ready_port(msg), notify, msg
            status = proc.poll()
            if status is not None:
                raise CLIError(f"the daemon exited with status {status} before it was ready; its stderr:\n"
                               f"{_stderr_tail(err_path)}")
            if time.monotonic() > deadline:
                raise CLIError(f"the daemon did not report READY within {ready_timeout:g} s (killed); its "
                               f"stderr:\n{_stderr_tail(err_path)}")
    except BaseException:
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait()
        notify.close()
        raise


def _write_progress(path: Path, done: int, tokens: int = 0) -> None:
    """A worker's count of finished sessions and of tokens received, for the parent's one progress line (replaced
    whole: never half)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{done} {tokens}")
    os.replace(tmp, path)


def _read_progress(path: Path) -> tuple[int, int]:
    """(sessions finished, tokens received) of one worker; (0, 0) before it has written any."""
    try:
        fields = [int(f) for f in path.read_text().split()]
    except (OSError, ValueError):  # not written yet
        return 0, 0
    done, tokens = [*fields, 0, 0][:2]  # (an older worker's file holds the sessions alone)
    return done, tokens


def _progress_line(elapsed: float, progress: list[Path], sessions: int, tokens: int = 0) -> str:
    """All workers' sessions in one line: each worker printed its own, "0/2 sessions finished" twice for 4. With
    ``tokens`` (all the sessions' answers), the tokens received so far too: sessions end together at the end of a
    long run, and "0/200 sessions finished" for 30 s said nothing of how it went."""
    counts = [_read_progress(p) for p in progress]
    line = f"  {elapsed:5.0f} s: {sum(c[0] for c in counts)}/{sessions} sessions finished"
    if tokens:
        line += f", {sum(c[1] for c in counts):,}/{tokens:,} tokens received"
    return line


async def _clients(
    port: int, cafile: Path, sessions: int, tokens: int, scheme: str, progress: Path | None = None, answers: int = 1
) -> list[dict[str, Any]]:
    from tokenwire.daemon.demo_upstream import answer_tokens
    from tokenwire.transport.client import DigestMismatch, connect
    from tokenwire.transport.errors import TokenwireError

    expected = [t.encode() for t in answer_tokens(tokens)]
    results: list[dict[str, Any]] = []
    reading: set[Any] = set()  # the answers being read, and the tokens of those read to their end
    received = [0]

    async def read(conn: Any, rec: dict[str, Any], streams: list[Any]) -> None:
        """One answer, read to its end, added to its session's record; an answer that failed raises its error
        after its digest (if its end came) is counted."""
        asked = time.monotonic()  # (the time to first token counts from here: a request queued for credit waits too)
        stream = conn.chat("bench", scheme=scheme, max_tokens=tokens)
        streams.append(stream)
        reading.add(stream)
        try:
            async for _ in stream:
                pass
        finally:
            reading.discard(stream)
            received[0] += len(stream.tokens)
            got = stream.tokens
            out = stream.outcome
            if out is not None:
                # its end (FIN) came, so its digest was checked: only such an answer can fail its digest (every
                # unfinished answer counted as a "digest failure": 5 refused sessions read as 5 corrupted answers)
                rec["digests_checked"] += 1
                rec["digest_failures"] += not out.digest_ok or got != expected
        rec["tokens"] += len(got)
        rec["duplicates"] += max(0, len(got) - len(expected))
        rec["lost"] += sum(1 for a, b in zip(expected, got, strict=False) if a != b) + max(
            0, len(expected) - len(got)
        )
        rec["digests_ok"] += bool(stream.stats and stream.stats.digest_verified) and got == expected
        if out is not None and out.first_gen_us is not None and out.gen_offsets is not None:
            t0 = out.first_gen_us / 1e6
            n = min(len(out.gen_offsets), len(out.render_times))
            rec["timings"].append({
                "first_gen_s": t0,  # the daemon's monotonic clock, the host's: comparable across sessions
                "gen_s": out.gen_offsets[:n],
                "delays_ms": [(r - (t0 + g)) * 1000.0 for g, r in zip(out.gen_offsets, out.render_times, strict=False)],
                "ttft_ms": (out.render_times[0] - asked) * 1000.0 if out.render_times else None,
            })

    async def one(k: int) -> None:
        await asyncio.sleep(k * HANDSHAKE_STAGGER_S)  # stagger the handshakes
        # "lost" and the digests count once connected: a session that never connected is counted apart
        rec: dict[str, Any] = {"tokens": 0, "duplicates": 0, "lost": 0, "digests_ok": 0, "digests_checked": 0,
                               "digest_failures": 0, "unfinished": 0, "answers": answers, "timings": [],
                               "ends_unacknowledged": 0}
        t_start = time.monotonic()
        streams: list[Any] = []
        try:
            async with connect("127.0.0.1", port, cafile=cafile, server_name="localhost",
                               timeout=CONNECT_TIMEOUT_S) as conn:
                rec["connect_s"] = time.monotonic() - t_start
                # an answer that failed left its tokens unread: the whole answer counts as lost, whatever part
                # of it the failure's record holds
                failures = await asyncio.gather(*(read(conn, rec, streams) for _ in range(answers)),
                                                return_exceptions=True)
                for exc in failures:  # a bug, or a cancellation, is no answer's failure
                    if exc is not None and not isinstance(exc, (TokenwireError, ConnectionError, TimeoutError)):
                        raise exc
                errors = [exc for exc in failures if exc is not None]
                if errors and refused_at_handshake(conn, streams, errors):
                    # the client's side of the handshake had ended (connect() returned), then the server refused
                    # the session (over its limits): it never connected, and had no token to lose
                    del rec["connect_s"]
                    rec["error"] = str(errors[0])
                    results.append(rec)
                    return
                rec["lost"] += tokens * len(errors)
                # (a digest mismatch is an answer that reached its end: counted in digest_failures instead)
                rec["unfinished"] += sum(1 for exc in errors if not isinstance(exc, DigestMismatch))
                if errors:
                    rec["error"] = f"{len(errors)} of {answers} answers failed, the first: {errors[0]}"
                rec["answer_s"] = time.monotonic() - t_start - rec["connect_s"]
                rec["end"] = time.monotonic()
                rec["begin"] = t_start
                # (after the answers' end: the serving span and answer times do not include this wait)
                rec["ends_unacknowledged"] = await confirm_ends(conn, streams)
        except (TokenwireError, ConnectionError, TimeoutError) as exc:
            rec["error"] = str(exc)
            if "connect_s" in rec:  # the connection failed under its answers: the unread ones are lost
                rec["lost"] = max(rec["lost"], tokens * answers - rec["tokens"])
                rec["unfinished"] = answers - rec["digests_checked"]
        results.append(rec)

    async def report() -> None:
        while True:
            assert progress is not None
            _write_progress(progress, len(results), received[0] + sum(len(s.tokens) for s in reading))
            await asyncio.sleep(PROGRESS_S / 5)

    reporter = asyncio.ensure_future(report()) if progress is not None else None
    try:
        await asyncio.gather(*(one(k) for k in range(sessions)))
    finally:
        if reporter is not None:
            reporter.cancel()
    if progress is not None:
        _write_progress(progress, len(results), received[0])
    return results


def _worker_main(argv: list[str]) -> None:
    """Client worker: ``--worker PORT CAFILE SESSIONS TOKENS SCHEME ANSWERS OUT``; writes its results to OUT as JSON and
    its count of finished sessions, as they finish, to :func:`_progress_path` of OUT."""
    import uvloop

    # imported before the clock starts: their import (0.16-0.24 s of CPU per worker) was counted as client load
    import tokenwire.daemon.demo_upstream
    import tokenwire.transport.client  # noqa: F401

    port, cafile, sessions, tokens, scheme = int(argv[0]), Path(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    answers, out = int(argv[5]), Path(argv[6])
    cpu0 = time.process_time()
    results = uvloop.run(_clients(port, cafile, sessions, tokens, scheme, _progress_path(out), answers))
    out.write_text(json.dumps({"results": results, "cpu_s": time.process_time() - cpu0}))


def _progress_path(out: Path) -> Path:
    return out.with_name(out.name + ".progress")


def _worker_command(
    port: int, cafile: Path, sessions: int, tokens: int, scheme: str, answers: int, out: Path
) -> list[str]:
    module = "tokenwire.daemon.bench_daemon"
    return [sys.executable, "-m", module, "--worker", str(port), str(cafile), str(sessions), str(tokens), scheme,
            str(answers), str(out)]


def _run_workers(
    port: int, cafile: Path, sessions: int, tokens: int, scheme: str, procs: int, answers: int = 1
) -> tuple[list, float]:
    shares = [n for n in (sessions // procs + (1 if i < sessions % procs else 0) for i in range(procs)) if n > 0]
    outs = [cafile.with_name(f"worker{i}.json") for i in range(len(shares))]
    workers = [
        subprocess.Popen(_worker_command(port, cafile, n, tokens, scheme, answers, out), preexec_fn=die_with_parent())
        for n, out in zip(shares, outs, strict=True)
    ]
    results: list[dict[str, Any]] = []
    cpu = 0.0
    start = time.monotonic()
    next_report = start + PROGRESS_S
    try:
        for w, out in zip(workers, outs, strict=True):
            while True:
                try:
                    status = w.wait(max(0.0, next_report - time.monotonic()))
                    break
                except subprocess.TimeoutExpired:
                    line = _progress_line(time.monotonic() - start, [_progress_path(o) for o in outs], sessions,
                                          sessions * answers * tokens)
                    print(line, file=sys.stderr, flush=True)
                    next_report += PROGRESS_S
            if status != 0:
                raise RuntimeError(f"client worker failed with exit status {w.returncode}")
            data = json.loads(out.read_text())
            results += data["results"]
            cpu += data["cpu_s"]
    finally:
        for w in workers:  # one failed: the others must not outlive the benchmark
            if w.poll() is None:
                w.kill()
                w.wait()
    return results, cpu


def scheduled_rate(scheduled: list[float]) -> float | None:
    """Tokens/s of one answer's schedule from its first token to its last (None for one token): the rate the run
    actually asks of the daemon, which the banner prints beside ``--rate``."""
    if len(scheduled) < 2 or scheduled[-1] <= scheduled[0]:
        return None
    return (len(scheduled) - 1) / (scheduled[-1] - scheduled[0])


def banner(pid: int, port: int, sessions: int, answers: int, tokens: int, rate: float, scheme: str,
           scheduled: list[float], metrics: str | None = None) -> str:
    """The run's first line: what was asked, and the schedule it makes (its length and real rate), so that a rate
    the demo cannot keep is seen before the run, not after it."""
    each = f"{answers} answers" if answers > 1 else "1 answer"
    real = scheduled_rate(scheduled)
    line = (f"daemon pid {pid} on udp/{port}: {sessions} sessions x {each} x {tokens} tokens at {rate:g}/s ({scheme}); "
            f"each answer scheduled over {scheduled[-1]:.2f} s (its first token after {scheduled[0] * 1000:.0f} ms"
            + (f", then {real:,.1f} tokens/s" if real is not None else "") + ")")
    return line + (f"; metrics on {metrics}" if metrics else "")


def run_cli(args: argparse.Namespace) -> int:
    from tokenwire.daemon.cli import CLIError, json_safe, write_json
    from tokenwire.daemon.demo_upstream import rate_problem, schedule
    from tokenwire.daemon.run_provenance import RunProvenance, run_provenance
    from tokenwire.testbed.cli import sigterm_as_ctrl_c
    from tokenwire.transport.metrics import percentile

    if not 1 <= args.sessions <= MAX_SESSIONS:
        raise CLIError(f"--sessions must be in [1, {MAX_SESSIONS:,}] (the daemon's limits.max_sessions), "
                       f"got {args.sessions}")
    problem = rate_problem(args.rate, f"--rate {args.rate:g}")  # each option by name (one message named both)
    if problem:
        raise CLIError(problem)
    if args.seconds <= 0:
        raise CLIError(f"--seconds {args.seconds:g} must be > 0")
    if args.rate * args.seconds > 1_000_000:
        raise CLIError("--rate x --seconds: at most 1,000,000 tokens per answer (limits.max_tokens)")
    if args.client_procs < 1:
        raise CLIError("--client-procs must be at least 1")
    if not 1 <= args.answers <= MAX_ANSWERS:
        raise CLIError(f"--answers must be in [1, {MAX_ANSWERS:,}] (the daemon's "
                       f"limits.max_requests_per_connection), got {args.answers}")
    if args.sessions * args.answers > MAX_LIVE_ANSWERS - LIVE_ANSWERS_MARGIN:
        # the daemon refused the max_live_answers the benchmark wrote for it, in words the user never used
        raise CLIError(f"--sessions x --answers: at most {MAX_LIVE_ANSWERS - LIVE_ANSWERS_MARGIN:,} answers at once "
                       f"(the daemon's limits.max_live_answers), got {args.sessions * args.answers:,}")
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in [0, 65535], got {args.port}")
    if args.metrics_listen:
        from tokenwire.daemon.config import ConfigError, parse_addr

        try:
            parse_addr(args.metrics_listen, "--metrics-listen")
        except ConfigError as exc:
            raise CLIError(str(exc)) from None
    tokens = max(1, round(args.rate * args.seconds))
    # the daemon's demo upstream generates every answer on this schedule (seed 0, no pauses: _daemon_main):
    # generation's lateness is measured against it
    scheduled = schedule(tokens, rate=args.rate, seed=0, first_token_s=FIRST_TOKEN_MS / 1000.0, pause_prob=0.0)
    # SIGTERM or SIGHUP (kill, a timeout, the terminal closed) unwinds like Ctrl-C: the daemon and the client
    # workers are stopped and the folder removed (the default action left the daemon running for good)
    with sigterm_as_ctrl_c(), tempfile.TemporaryDirectory(prefix="tokenwire-bench-") as tmpdir:
        tmp = Path(tmpdir)
        started = RunProvenance()  # (the load average before the daemon and the clients add theirs)
        proc, port, notify, status = _start_daemon(tmp, args.sessions, args.rate, tokens, answers=args.answers,
                                                   port=args.port, metrics_listen=args.metrics_listen)
        try:
            print(banner(proc.pid, port, args.sessions, args.answers, tokens, args.rate, args.scheme, scheduled,
                         _ready_metrics(status)), file=sys.stderr)
            cpu0, wall0, drops0 = _cpu_seconds(proc.pid), time.monotonic(), _udp_rcvbuf_errors()
            procs = max(1, min(args.client_procs, args.sessions))
            results, client_cpu = _run_workers(port, tmp / "cert.pem", args.sessions, tokens, args.scheme, procs,
                                               args.answers)
            cpu1, wall1 = _cpu_seconds(proc.pid), time.monotonic()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            notify.close()
            logged = [ln for ln in (tmp / "daemon.stderr").read_text(errors="replace").splitlines() if ln.strip()]
            for line in logged[-20:]:  # the daemon's warnings during the run (its stderr went to a file)
                print(f"daemon: {line}", file=sys.stderr)
    delivered = sum(r["tokens"] for r in results)
    connected = [r for r in results if "connect_s" in r]
    out = {
        "udp_receive_buffer_drops": _udp_rcvbuf_errors() - drops0,
        "sessions": args.sessions,
        "answers_per_session": args.answers,
        **session_counts(results),
        "rate": args.rate,
        "seconds": args.seconds,
        "scheme": args.scheme,
        "tokens_per_answer": tokens,
        # one answer's schedule: its length (first-token wait included) and its rate from the first token on
        "scheduled_answer_s": scheduled[-1],
        "scheduled_rate": scheduled_rate(scheduled),
        "demo_pauses": False,
        "tokens_expected": tokens * args.sessions * args.answers,
        "tokens_delivered": delivered,
        # of the sessions that connected: one that failed its handshake lost no token, and had no digest to check
        # (237 failed handshakes read as 23,700 lost tokens and 237 digest failures)
        "lost_tokens": sum(r["lost"] for r in connected),
        "duplicate_tokens": sum(r["duplicates"] for r in connected),
        # answers whose end came and whose digest did not verify (or whose tokens differ); the answers that ended
        # without it (refused, failed, cut off) are answers_unfinished: no digest was checked there
        "digest_failures": sum(r["digest_failures"] for r in connected),
        "answers_unfinished": sum(r["unfinished"] for r in connected),
        "session_errors": [r["error"] for r in results if "error" in r][:5],
        # answers whose end (the client's FIN) had no acknowledgement from the daemon when their session closed,
        # after confirm_ends's wait: a daemon seconds behind (an overloaded run) may not have read them before it is
        # stopped, and then warns of "clients [that] had not ended their requests"
        "request_ends_unacknowledged": sum(r.get("ends_unacknowledged", 0) for r in connected),
        "cpu_us_per_token": 1e6 * (cpu1 - cpu0) / max(1, delivered),
        "daemon_cpu_share_of_wall": (cpu1 - cpu0) / max(1e-9, wall1 - wall0),
        "client_cpu_share_of_wall": client_cpu / max(1e-9, wall1 - wall0),
        "client_procs": procs,
        **delay_summary([a for r in results for a in r.get("timings", [])], scheduled),
        "wall_s": wall1 - wall0,
        # first request to last answer's end: the serving span (connection teardown excluded)
        "serving_span_s": max((r["end"] for r in results if "end" in r), default=0.0)
        - min((r["begin"] for r in results if "begin" in r), default=0.0),
        "p50_connect_ms": 1000 * percentile([r["connect_s"] for r in results if "connect_s" in r], 50),
        "max_connect_ms": 1000 * max((r["connect_s"] for r in results if "connect_s" in r), default=0.0),
        # a session's answer time: its last answer's end (its answers run at once)
        "p50_answer_s": percentile([r["answer_s"] for r in results if "answer_s" in r], 50),
        "max_answer_s": max((r["answer_s"] for r in results if "answer_s" in r), default=0.0),
        "scheduled_span_s": scheduled[-1] + HANDSHAKE_STAGGER_S * (-(-args.sessions // procs) - 1),
    }
    reasons = overload_reasons(out)
    out["overloaded"] = bool(reasons)
    out["overload_reasons"] = reasons
    out["meanings"] = MEANINGS
    out["provenance"] = run_provenance(started)
    out = json_safe(out)  # percentiles of no samples (every session failed) are NaN: null in JSON
    if args.json:
        write_json(out, args.json)
    for line in summary_lines(out):  # (stdout, as every benchmark's table: with --json -, cli.main sends it to stderr)
        print(line)
    if reasons:
        print(f"bench daemon: WARNING: the numbers measure a backlog, not latency: lower --rate or --sessions "
              f"({'; '.join(reasons)})", file=sys.stderr)
    return verdict(out)


def refused_at_handshake(conn: Any, streams: list[Any], errors: list[BaseException]) -> bool:
    """Whether the daemon refused this session at its handshake, after the client's connect() had returned: the
    connection closed under every failed answer, no answer started, and the close says refused (QUIC's
    APPLICATION_ERROR without a reason, what a close before the server's handshake is done carries, or
    LIMIT_EXCEEDED, "too many sessions"). The client's side of the handshake ends before the server's does, so
    such a session looked connected: 5 sessions refused under load read as 3000 lost tokens and 5 digest
    failures, as if the daemon had lost data."""
    from tokenwire.transport.errors import ErrorCode, RemoteError
    from tokenwire.transport.session_events import QUIC_APPLICATION_ERROR, handshake_refusal

    if not conn.closed or any(s.request_id is not None or s.tokens for s in streams):
        return False
    refusal = handshake_refusal(QUIC_APPLICATION_ERROR, "")
    return all(isinstance(e, RemoteError)
               and (e.code == ErrorCode.LIMIT_EXCEEDED or bool(refusal and refusal in str(e))) for e in errors)


def session_counts(results: list[dict[str, Any]]) -> dict[str, int]:
    """Sessions that connected, and those that did not (their handshake failed or timed out, or the daemon refused
    them at it)."""
    connected = sum(1 for r in results if "connect_s" in r)
    return {"sessions_connected": connected, "sessions_failed_to_connect": len(results) - connected}


# What each delay figure means, in the JSON beside them: "p99 token delay" alone read as the token path's latency,
# when under load it was the handshake storm's or a backlog's
MEANINGS = {
    "p50_token_delay_ms/p99_token_delay_ms": "every delivered token: its render time minus its generation time",
    "steady_state_p50_token_delay_ms/steady_state_p99_token_delay_ms": (
        "the tokens generated after every answer had begun (its first token generated): the token path without the "
        "handshakes and answer starts of the others; steady_state_after_s is when that was, after the first began"),
    "p50_ttft_ms/p99_ttft_ms": "time to first token: an answer's request sent to its first token rendered",
    "generation_late_p50_ms/generation_late_p99_ms/generation_late_max_ms": (
        "how late the daemon generated a token against its answer's schedule (the demo upstream's offsets), its "
        "answer's most punctual token taken as on time (a lower bound): delays count from the actual "
        "generation time, so this lag is in none of them"),
    "serving_span_s/scheduled_span_s": (
        "first session's start to last answer's end, and what it would be with every answer generated on schedule "
        "(its schedule, first-token wait included, plus the handshakes' stagger)"),
}
# Beyond these the run measured a backlog, not latency: the host could not carry the load asked of it
OVERLOAD_SPAN_RATIO = 1.5  # serving span over the scheduled span...
OVERLOAD_SPAN_SLACK_S = 1.0  # ...and longer by this much (a 0.1-s run's handshakes alone make it 1.5 x)
OVERLOAD_LATE_MS = 250.0  # generation's p99 lateness against its schedule


def delay_summary(timings: list[dict[str, Any]], scheduled: list[float]) -> dict[str, Any]:
    """Token delays overall and in the steady state, the time to first token, and generation's lateness.

    ``timings``: one record per answer that reached its end (``first_gen_s``, the daemon's time of its first token;
    ``gen_s``, each token's generation offset from it; ``delays_ms``, each token's render minus generation time;
    ``ttft_ms``). ``scheduled``: the demo upstream's generation offsets for one answer. The steady state starts when
    the last answer's first token was generated: a tail taken while sessions were still handshaking measured the
    storm of starts (every p99 token of a 200-session run), not the token path."""
    from tokenwire.transport.metrics import percentile

    delays = [d for a in timings for d in a["delays_ms"]]
    starts = [a["first_gen_s"] for a in timings]
    last = max(starts, default=float("nan"))
    steady = [d for a in timings for g, d in zip(a["gen_s"], a["delays_ms"], strict=False)
              if a["first_gen_s"] + g >= last]
    # each token's generation against its schedule, the answer's most punctual token taken as on time (a lower
    # bound: the daemon's start of the answer is not sent; measured from the first token, a late first token made
    # the rest read early): the lag the delays above do not see
    late: list[float] = []
    for a in timings:
        behind = [g - s for g, s in zip(a["gen_s"], scheduled, strict=False)]
        punctual = min(behind, default=0.0)  # (once: taken per token, a 20,000-token answer's summary took 8 s)
        late += [1000.0 * (b - punctual) for b in behind]
    ttft = [a["ttft_ms"] for a in timings if a.get("ttft_ms") is not None]
    return {
        "p50_token_delay_ms": percentile(delays, 50),
        "p99_token_delay_ms": percentile(delays, 99),
        "steady_state_p50_token_delay_ms": percentile(steady, 50),
        "steady_state_p99_token_delay_ms": percentile(steady, 99),
        "steady_state_tokens": len(steady),
        "steady_state_after_s": last - min(starts, default=float("nan")),
        "p50_ttft_ms": percentile(ttft, 50),
        "p99_ttft_ms": percentile(ttft, 99),
        "generation_late_p50_ms": percentile(late, 50),
        "generation_late_p99_ms": percentile(late, 99),
        "generation_late_max_ms": max(late, default=float("nan")),
    }


def overload_reasons(out: dict[str, Any]) -> list[str]:
    """Why the run measured a backlog rather than latency (empty when it did not): the serving span far beyond the
    schedule, or generation itself running late. ``--sessions 4 --answers 64 --rate 400 --seconds 1`` asked for
    ~102,000 tokens/s; its 1-s answers took 4-7 s and its p99 token delay looked fine, as delays count from the
    (late) generation time."""
    reasons = []
    span, scheduled = out.get("serving_span_s"), out.get("scheduled_span_s")
    if span is not None and scheduled and span > OVERLOAD_SPAN_RATIO * scheduled and span - scheduled > \
            OVERLOAD_SPAN_SLACK_S:
        reasons.append(f"serving took {span:.1f} s for a scheduled {scheduled:.1f} s ({span / scheduled:.1f} x)")
    late = out.get("generation_late_p99_ms")
    if late is not None and late == late and late > OVERLOAD_LATE_MS:  # (NaN: no answer ended)
        reasons.append(f"generation ran late of its schedule: p99 {late:,.0f} ms, max "
                       f"{out.get('generation_late_max_ms', late):,.0f} ms")
    return reasons


def summary_lines(out: dict[str, Any]) -> list[str]:
    """The run's figures in words, the table every benchmark prints on stdout: the daemon's CPU per token, what
    was delivered and lost, the sessions and their connects, the host's UDP drops, then the delays. It held the
    delays alone: without ``--json`` a run never said how many tokens arrived, nor what they cost."""
    def ms(key: str) -> str:
        v = out.get(key)
        return "-" if v is None or v != v else f"{v:,.1f}"

    def n(key: str) -> str:
        v = out.get(key)
        return "-" if v is None else f"{v:,}"

    def share(key: str) -> str:
        v = out.get(key)
        return "-" if v is None or v != v else f"{100 * v:.0f} %"

    unacked = out.get("request_ends_unacknowledged") or 0
    return [
        f"daemon CPU: {ms('cpu_us_per_token')} us per delivered token ({share('daemon_cpu_share_of_wall')} of one "
        f"core over {ms('wall_s')} s; the {n('client_procs')} client processes {share('client_cpu_share_of_wall')})",
        f"tokens: {n('tokens_delivered')} of {n('tokens_expected')} delivered; {n('lost_tokens')} lost, "
        f"{n('duplicate_tokens')} duplicated; {n('digest_failures')} digest failures, {n('answers_unfinished')} "
        "answers unfinished",
        f"sessions: {n('sessions_connected')} connected, {n('sessions_failed_to_connect')} failed to connect; "
        f"connect p50 {ms('p50_connect_ms')} ms, max {ms('max_connect_ms')} ms; answers p50 {ms('p50_answer_s')} s, "
        f"max {ms('max_answer_s')} s",
        f"UDP receive-buffer drops on the host (any process's): {n('udp_receive_buffer_drops')}"
        + (f"; {unacked:,} answer ends unacknowledged by the daemon when their session closed (a daemon "
           "that had not read them warns of clients that had not ended their requests)" if unacked else ""),
        f"token delay (render - generation), all tokens: p50 {ms('p50_token_delay_ms')} ms, "
        f"p99 {ms('p99_token_delay_ms')} ms",
        f"  steady state (the {out.get('steady_state_tokens', 0):,} tokens generated after every answer began, "
        f"{ms('steady_state_after_s')} s after the first): p50 {ms('steady_state_p50_token_delay_ms')} ms, "
        f"p99 {ms('steady_state_p99_token_delay_ms')} ms",
        f"time to first token (request to first render): p50 {ms('p50_ttft_ms')} ms, p99 {ms('p99_ttft_ms')} ms",
        f"generation late of its schedule (in no delay above): p50 {ms('generation_late_p50_ms')} ms, "
        f"p99 {ms('generation_late_p99_ms')} ms, max {ms('generation_late_max_ms')} ms; serving span "
        f"{ms('serving_span_s')} s for a scheduled {ms('scheduled_span_s')} s",
    ]


def verdict(out: dict[str, Any]) -> int:
    """The exit status, with a line on stderr saying what went wrong: 1 when tokens were lost or duplicated, a
    digest failed, an answer did not reach its end, or a session could not connect; else 0."""
    problems = []
    if out["sessions_failed_to_connect"]:
        problems.append(f"{out['sessions_failed_to_connect']} of {out['sessions']} sessions could not connect "
                        "(their handshake failed or timed out, or the daemon refused them at it: see session_errors)")
    unfinished = out.get("answers_unfinished", 0)
    if out["lost_tokens"] or out["duplicate_tokens"] or out["digest_failures"] or unfinished:
        line = (f"of the sessions that connected: {out['lost_tokens']} tokens lost, "
                f"{out['duplicate_tokens']} duplicated, {out['digest_failures']} digest failures")
        if unfinished:  # (their tokens are among the lost; their digests were never checked)
            line += (f", {unfinished} answer{'s' if unfinished != 1 else ''} unfinished (failed before their end: "
                     "see session_errors)")
        problems.append(line)
    for line in problems:
        print(f"bench daemon: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__" and sys.argv[1:2] == ["--daemon"]:
    if len(sys.argv) != 3:
        sys.exit(f"usage: python -m tokenwire.daemon.bench_daemon --daemon CONFIG (got {len(sys.argv) - 2} arguments)")
    sys.exit(_daemon_main(sys.argv[2]))

if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    if len(sys.argv) != 9:  # (a caller built by hand, not by _worker_command: it did nothing, and exited 0)
        sys.exit("usage: python -m tokenwire.daemon.bench_daemon --worker PORT CAFILE SESSIONS TOKENS SCHEME ANSWERS "
                 f"OUT (got {len(sys.argv) - 2} arguments)")
    try:
        _worker_main(sys.argv[2:])
    except KeyboardInterrupt:  # a terminal's Ctrl-C reaches the whole process group: the parent reports it
        sys.exit(130)
