"""``tokenwire testbed contention``: N chats at once through one emulated bottleneck, per scheme.

``compare`` serves one request per scheme; whether a scheme keeps its lead when many chats share a link, and what
that link then looks like (how full, how deep its queue, how fairly it is shared), needs N clients at once. For
each run (seed) and scheme a fresh testbed is built; the real daemon (demo upstream) starts in the server
namespace, client workers (:mod:`.contention_client`) open N SDK connections in the client namespace, the path's
queues carry the handshakes away (:func:`settle`), the emulator's clocks restart (``origin``) and every answer starts
together. Flow ``i`` asks the demo for seed ``seed + i``, so every scheme serves the same answers on the same trace
and loss pattern. ``--cross`` adds ``compare``'s cross traffic (:mod:`.traffic`) to every run; a run that fails or is
interrupted midway hands on what finished, in ``compare``'s partial shape (:func:`partial_summary`).

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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from tokenwire.daemon.cli import CLIError, cell, positive_int

from .cli import ctrl_c_throughout
from .path_config import GO_SETTLE_S, START_MODES, PathConfig, check_answers, check_schemes
from .traffic import CROSS_HELP, parse_cross

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
SETTLE_MAX_S = 10.0
"""The longest wait for the path's queues to carry the handshakes away before "go" (:func:`settle`), or its first
settling step where that is longer (four one-way delays past 2.5 s); a run whose queues still hold packets then starts
anyway, and its JSON says so (``settle_s`` null)."""


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
    cross: list[str] = field(default_factory=list)
    """Cross traffic server -> client (:func:`.traffic.parse_cross` specs), as ``compare --cross``."""
    start: str = "settled"
    """When the answers start: ``settled`` once the path's queues carried the handshakes away (:func:`settle`), as
    ``sim --chats``; ``connected`` as soon as every chat is connected, behind the handshakes' packets (a flash crowd:
    docs/testbed.md, "Why the namespaces collapsed where the simulator held")."""

    def validate(self) -> None:
        check_schemes(self.schemes, CONTENTION_SCHEMES)
        if not 1 <= self.chats <= MAX_CHATS:
            raise ValueError(f"--chats {self.chats}: 1 to {MAX_CHATS}")
        check_answers(self.tokens, self.runs, self.rate)
        if self.start not in START_MODES:
            raise ValueError(f"start {self.start!r}: one of {', '.join(START_MODES)}")
        for spec in self.cross:
            parse_cross(spec)
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
                      server_port: int = PORT, until: float | None = None) -> dict[str, Any]:
    """The down link from the emulator's packet log, from ``origin`` (the trace's restart) on, up to ``until``
    (the answers' end, on the same clock; None: the whole log). Cross traffic runs until the testbed goes down:
    without the bound its packets after the chats stretched the span and filled it.

    ``utilisation``: IP bytes delivered (the chats' and any cross traffic's) over the trace's capacity from the
    origin to the last delivery's departure (the link's byte budget: a small packet leaves the rest of its
    opportunity to the next one); ``chats_utilisation``: the daemon's share of it alone. ``sojourn_ms_*``:
    queueing of the delivered packets. ``bytes_by_port``: IP bytes the daemon sent to each client port, as
    ``compare`` counts them (every packet offered to the link, delivered or not: what the scheme spent).
    """
    packets = lost = dropped = delivered_bytes = chats_bytes = 0
    last_departure: float | None = None
    sojourns: list[float] = []
    by_port: dict[int, int] = {}
    for row in rows:
        arrival = float(row["arrival"])
        if row["dir"] != "down" or arrival < origin or (until is not None and arrival >= until):
            continue
        packets += 1
        size = int(row["size"])
        daemon = row["proto"] == UDP and row["sport"] == str(server_port) and bool(row["dport"])
        if daemon:
            port = int(row["dport"])
            by_port[port] = by_port.get(port, 0) + size
        if row["fate"] == "delivered":
            delivered_bytes += size
            chats_bytes += size if daemon else 0
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
        "chats_delivered_bytes": chats_bytes, "span_s": span, "capacity_bytes": capacity,
        "utilisation": delivered_bytes / capacity if capacity else None,
        "chats_utilisation": chats_bytes / capacity if capacity else None,
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


def flows_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A run's figures over its flows (rows with ``finished``), as this module and ``sim --chats`` report them:
    flows finished, digests verified, and the stall and TTFT percentiles over the finished flows."""
    done = [r for r in rows if r["finished"]]
    return {
        "flows_finished": len(done),
        "digests_verified": sum(1 for r in rows if r.get("digest_verified")),
        "stall_ratio_p50": percentile((r.get("stall_ratio") for r in done), 0.5),
        "stall_ratio_p90": percentile((r.get("stall_ratio") for r in done), 0.9),
        "ttft_ms_p50": percentile((r.get("ttft_ms") for r in done), 0.5),
        "ttft_ms_p90": percentile((r.get("ttft_ms") for r in done), 0.9),
    }


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
    delivered = sum(r.get("tokens_rendered") or 0 for r in rows)
    sent = sum(by_port.values())
    return {
        "flows": rows,
        **flows_summary(rows),
        "jain_goodput": jain_index(r["goodput_tps"] for r in rows),
        "tokens_delivered": delivered,
        "bytes_per_token": sent / delivered if delivered else None,
        "link": {k: v for k, v in link.items() if k != "bytes_by_port"},
    }


def mean_known(values: Iterable[float | None]) -> float | None:
    """The mean of the known values (None and NaN left out); None when none is known."""
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
        "bytes_per_token": mean_known(r["bytes_per_token"] for r in runs),
        "utilisation": mean_known(r["link"]["utilisation"] for r in runs),
        "chats_utilisation": mean_known(r["link"].get("chats_utilisation") for r in runs),
        "sojourn_ms_p50": mean_known(r["link"]["sojourn_ms_p50"] for r in runs),
        "sojourn_ms_p99": mean_known(r["link"]["sojourn_ms_p99"] for r in runs),
        "jain_goodput": mean_known(r["jain_goodput"] for r in runs),
        "daemon_cpu_share": mean_known(r.get("daemon_cpu_share") for r in runs),
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


def settle(stats: Callable[[], dict[str, Any]], delay_ms: float, *, cross: bool,
           sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
           max_wait_s: float = SETTLE_MAX_S) -> float | None:
    """Wait, once every chat is connected, until the emulated path's queues are empty (``stats``: the emulator's, with
    each direction's ``backlog``), as ``sim --chats`` does (:data:`.path_config.GO_SETTLE_S`); the seconds waited, or
    None when they still held packets after ``max_wait_s``. 40 handshakes at once left ~390 ms of Initials on a
    1-Mbit/s uplink and a 330-ms queue down; answers started behind them measured the startup burst, not the sharing
    (TTFT 600-800 ms against the simulator's 250), and every server's minimum round trip was learned inside that queue
    (208 ms against 88). With cross traffic (``--cross``) the queues need not empty: the settling time only."""
    start = clock()
    step = max(GO_SETTLE_S, 4 * delay_ms / 1000.0)
    sleep(step)
    if cross:
        return clock() - start
    while True:
        now = stats()
        if not any((now.get(d) or {}).get("backlog") for d in ("down", "up")):
            return clock() - start
        if clock() - start + step > max_wait_s:
            return None
        sleep(step)


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
            scratch: str | None = None, note: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One scheme's run through a fresh testbed: :func:`run_summary` plus the daemon's and emulator's CPU share.
    ``note`` hears how many chats connected (the wait for them, up to :data:`CONNECT_WAIT_S`, was silent)."""
    from .child import ChildError, ExitWatch, exit_status, last_error_line
    from .compare import _watching_emulator
    from .netns import TestbedError
    from .pktlog import read_packet_log
    from .topology import Testbed
    from .trace import trace_from_spec
    from .traffic import start_cross, watch_senders

    tag = f"{scheme}.seed{seed}"
    # absolute: the daemon resolves its config's certificate paths from the config's folder, and a relative
    # --keep DIR made them DIR/<tag>/DIR/<tag>/cert.pem ("does not exist": every run failed at start)
    folder = os.path.abspath(os.path.join(workdir, tag))
    os.makedirs(folder, exist_ok=True)
    log_path = os.path.join(folder, "pktlog.csv")
    total = cfg.chats * cfg.tokens
    try:
        with (Testbed(cfg.emulator_config(seed, log_path), backend="userspace", scratch=scratch,
                      emulator_stderr=os.path.join(folder, "emulator.stderr")) as tb,
              _watching_emulator(tb, scheme, seed) as watches,
              socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify,
              _short_folder(folder) as notify_folder):
            cross = []
            if cfg.cross:  # as compare: through the handshakes and every answer; stopped with the testbed
                cross = start_cross(tb, cfg.cross, READY_S + CONNECT_WAIT_S + cfg.run_timeout() + 60.0)
            conf, cafile = _daemon_config(tb, folder, cfg)
            notify_path = os.path.join(notify_folder, "notify.sock")
            notify.bind(notify_path)
            err_path = os.path.join(folder, "daemon.stderr")
            with open(err_path, "w") as err:
                daemon = tb.popen(tb.server_ns, [sys.executable, "-m", "tokenwire.daemon.cli", "daemon", "--config",
                                                 conf], env={**os.environ, "NOTIFY_SOCKET": notify_path},
                                  stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT)
            _wait_ready(notify, daemon, err_path, watches)

            def daemon_failed(status: int) -> ChildError:
                # its last error line: the folder of a run without --keep is gone by the time the error is read
                why = ""
                with contextlib.suppress(OSError), open(err_path, errors="replace") as fh:
                    why = last_error_line(fh.read())
                # (the ContentionError it becomes, below, names the scheme and seed)
                return ChildError(f"the daemon exited ({exit_status(status)}) mid-run" + (f": {why}" if why else "")
                                  + (f"; see {err_path}" if scratch is None else ""))

            daemon_watch = ExitWatch(daemon, daemon_failed)
            # a cross sender sends for longer than the run can last: its exit is a failure (a refused congestion
            # control, say), which otherwise left a run "with cross traffic" without any
            cross_watches = watch_senders(cross)  # (a sender that exits fails the run)
            try:
                workers = _start_workers(tb, cfg, scheme, seed, folder, cafile,
                                         [*watches, daemon_watch, *cross_watches])
                deadline = time.monotonic() + CONNECT_WAIT_S
                connected = sum(int(w.wait_for("connected", deadline - time.monotonic())["connected"])
                                for w in workers)
                if connected == 0:
                    raise ContentionError(f"{scheme} seed {seed}: no chat connected to the daemon")
                if note:
                    note(f"    {scheme}: {connected}/{cfg.chats} chats connected"
                         + ("" if connected == cfg.chats else " (the others count as failed flows)"))
                settled = (settle(tb.stats, cfg.delay_ms, cross=bool(cfg.cross)) if cfg.start == "settled"
                           else 0.0)
                if settled is None and note:
                    note(f"    {scheme}: the handshakes' packets still queued after {SETTLE_MAX_S:.0f} s; "
                         "the answers start anyway")
                origin = tb.origin()
                cpu0, emu0, t0 = _cpu_seconds(daemon.pid), _emulator_cpu(tb), time.monotonic()
                for w in workers:
                    w.send("go")
                _await_workers(workers, scheme, total, cfg.run_timeout(), progress)
                end = time.monotonic()
                wall = end - t0
                cpu1, emu1 = _cpu_seconds(daemon.pid), _emulator_cpu(tb)
            finally:
                for w in (daemon_watch, *cross_watches):
                    w.close()
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
    link = down_link_summary(read_packet_log(log_path), trace_from_spec(cfg.down_trace), origin, until=end)
    run = run_summary(flows, link, cfg.tokens)
    run.update(scheme=scheme, seed=seed, chats=cfg.chats, settle_s=settled, wall_s=wall,
               daemon_cpu_share=(cpu1 - cpu0) / wall,
               emulator_cpu_share=None if emu0 is None or emu1 is None else (emu1 - emu0) / wall)
    return run


@contextlib.contextmanager
def _short_folder(folder: str) -> Iterator[str]:
    """``folder``, or a temporary one where a socket's path in it would pass the kernel's limit on an AF_UNIX
    path (108 bytes): a deep --keep DIR failed with "AF_UNIX path too long"."""
    from tokenwire.daemon.unix_sockets import MAX_PATH_BYTES

    if len(os.path.join(folder, "notify.sock").encode()) < MAX_PATH_BYTES:  # (room for its terminating NUL)
        yield folder
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tw-contention-") as short:
        yield short


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
                   log: Callable[[str], None] | None = None, note: Callable[[str], None] | None = None,
                   on_partial: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every scheme for ``cfg.runs`` seeds; the JSON document (:func:`summarize`).

    As ``compare``'s :func:`.compare.run_compare`: a failure or an interrupt after at least one finished run first
    hands ``on_partial`` what finished (:func:`partial_summary`), then propagates. Ctrl-C at the sixth of six
    10-minute runs threw the five finished ones away."""
    from .netns import run_folder

    cfg.validate()
    finished: list[dict[str, Any]] = []
    current: tuple[str, int] | None = None  # the run under way: the one a failure or an interrupt stopped
    try:
        with run_folder(workdir, "tw-contention-") as (wd, scratch):
            for k in range(cfg.runs):
                seed = cfg.seed + k
                for s in cfg.schemes:
                    if log:
                        log(f"seed {seed}: {s}, {cfg.chats} chats")
                    current = (s, seed)
                    finished.append(run_one(s, cfg, seed, wd, progress, scratch=scratch, note=note))
                    current = None
    except BaseException as exc:
        if finished:
            from .compare import offer_partial

            offer_partial(exc, on_partial, lambda e: partial_summary(cfg, finished, current, e))
        raise
    return summarize(cfg, finished)


def summarize(cfg: ContentionConfig, finished: list[dict[str, Any]]) -> dict[str, Any]:
    """The complete document from every run (:func:`run_one`'s dicts, any order): per scheme its runs in seed
    order, their :func:`scheme_summary` and chatterbox's :func:`comparison_block`."""
    per_scheme = {s: sorted((r for r in finished if r["scheme"] == s), key=lambda r: r["seed"]) for s in cfg.schemes}
    schemes = {s: scheme_summary(rs, cfg.tokens) for s, rs in per_scheme.items()}
    return {"schemes": schemes, "comparison": comparison_block(schemes), "runs": per_scheme, "config": asdict(cfg),
            "complete": True}


def partial_summary(cfg: ContentionConfig, finished: list[dict[str, Any]], stopped: tuple[str, int] | None,
                    exc: BaseException) -> dict[str, Any]:
    """The JSON of a run that did not finish, in ``compare``'s shape (:func:`.compare.partial_summary`).

    No top-level ``schemes`` or ``comparison``, so no reader of the complete document takes a few runs for the
    whole. ``"complete": false``; ``stopped_by`` ("error" or "interrupt") and ``error`` (the error, or
    "interrupted"); ``stopped_at`` (the run under way, ``{scheme, seed}``; null between runs); ``runs_finished``
    (each finished run as the complete document's ``runs`` hold it, with ``seed_complete``: every scheme of its
    seed finished); ``runs_missing`` (scheme, seed, why); ``complete_seeds`` (``schemes`` and ``comparison`` over
    the seeds every scheme finished, with their ``seeds``; null without one); ``config``.
    """
    from .compare import _stopped_by

    why = _stopped_by(exc)
    done = {(r["scheme"], r["seed"]) for r in finished}
    seeds = range(cfg.seed, cfg.seed + cfg.runs)
    whole = [seed for seed in seeds if all((s, seed) in done for s in cfg.schemes)]
    missing = [
        {"scheme": s, "seed": seed, "why": why if (s, seed) == stopped else "not run: the run stopped before it"}
        for seed in seeds for s in cfg.schemes if (s, seed) not in done
    ]
    complete_seeds: dict[str, Any] | None = None
    if whole:
        doc = summarize(cfg, [r for r in finished if r["seed"] in whole])
        complete_seeds = {"seeds": whole, "schemes": doc["schemes"], "comparison": doc["comparison"]}
    return {
        "complete": False,
        "stopped_by": "interrupt" if isinstance(exc, KeyboardInterrupt) else "error",
        "error": why,
        "stopped_at": None if stopped is None else {"scheme": stopped[0], "seed": stopped[1]},
        "runs_finished": [{**r, "seed_complete": r["seed"] in whole} for r in finished],
        "runs_missing": missing,
        "complete_seeds": complete_seeds,
        "config": asdict(cfg),
    }


# --- the command ------------------------------------------------------------------------------------------


def register_contention(tsub: argparse._SubParsersAction) -> None:
    from .cli import add_path_args

    p = tsub.add_parser(
        "contention", help="N chats at once through one emulated bottleneck, per scheme",
        description="Runs the real daemon (demo upstream) in the server namespace and --chats SDK clients at once "
        "in the client namespace, per scheme and seed on a fresh testbed, every scheme serving the same answers "
        "on the same trace and loss pattern. Reports the spread of stall ratio and TTFT over the chats, bytes per "
        "token, link utilisation, queue sojourn, Jain fairness of goodput, the daemon's CPU share and the "
        "answers finished and verified: whether a scheme keeps its lead when many chats share a link. Needs root.",
    )
    add_path_args(p, down_required=True, kernel=False)
    p.add_argument("--chats", type=positive_int, default=10, metavar="N",
                   help=f"concurrent chats, 1 to {MAX_CHATS} (the daemon, its clients and the emulator share this "
                   "host's CPU: a 2-core host kept up with about 30 chatterbox chats at 30 tokens/s before CPU, not "
                   "the link, set their stall; see docs/testbed.md)")
    p.add_argument("--schemes", default="chatterbox,stream",
                   help=f"comma-separated, from {', '.join(CONTENTION_SCHEMES)}")
    p.add_argument("--tokens", type=positive_int, default=300, metavar="N", help="tokens per answer")
    p.add_argument("--rate", type=float, default=30.0, metavar="R", help="tokens per second of each answer")
    p.add_argument("--runs", type=positive_int, default=1, help="seeds seed, seed+1, ... (flows pooled)")
    p.add_argument("--cross", action="append", metavar="SPEC",
                   help=f"cross traffic server -> client during every run (repeatable): {CROSS_HELP}")
    p.add_argument("--start", choices=START_MODES, default="settled",
                   help="when the answers start: settled, once the link's queues carried the handshakes' packets "
                   "away (as sim --chats does; at most 10 s), or connected, as soon as every chat is connected, behind "
                   "those packets (a flash crowd)")
    p.add_argument("--json", metavar="PATH", help="write the summary JSON (with per-flow rows) here; a run that "
                   'fails or is interrupted writes what finished, marked "complete": false')
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
        rate=args.rate, seed=args.seed, runs=args.runs, cross=args.cross or [], start=args.start,
    )  # fmt: skip
    check_path(cfg.down_trace, cfg.up_trace, cfg.validate, chats=cfg.chats)  # (all of them handshake at once)
    return cfg


@ctrl_c_throughout
def cmd_contention(args: argparse.Namespace) -> int:
    """Under :func:`.cli.ctrl_c_throughout`: SIGTERM and SIGHUP tear the namespaces down as Ctrl-C does."""
    from tokenwire.daemon.cli import save_json, write_json

    from .child import ChildError
    from .compare import describe_partial
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
    unshown: str | None = None  # the latest line the 5-s throttle held back
    started = time.monotonic()

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def show_last_progress() -> None:
        """A run's latest count once it ends: the throttle left one up to 5 s old as the last word on a run whose
        flows did not all finish (a whole run's last count is always shown)."""
        nonlocal unshown
        if unshown is not None:
            say(unshown)
            unshown = None

    def log(msg: str) -> None:
        show_last_progress()
        done[0] += 1
        say(f"[{done[0]}/{total}] {msg}")

    def progress(scheme: str, k: int, n: int) -> None:
        nonlocal shown_at, shown, unshown
        now = time.monotonic()
        if shown == (scheme, k):
            return
        line = f"    {scheme}: {k}/{n} tokens rendered ({k / n:.0%}), {now - started:.0f} s elapsed"
        if now - shown_at >= 5.0 or k >= n:
            shown_at, shown, unshown = now, (scheme, k), None
            say(line)
        else:
            unshown = line

    def keep_partial(doc: dict[str, Any]) -> None:
        """A failure or an interrupt after finished runs: they are written, marked "complete": false, not lost."""
        show_last_progress()
        if not args.json:
            say(f"testbed contention: {describe_partial(doc)}; not saved (no --json)")
            return
        save_json(args.json, doc, indent=1)
        say(f'testbed contention: {describe_partial(doc)}; wrote them to {args.json} ("complete": false)')

    try:
        summary = run_contention(cfg, workdir=args.keep, progress=progress, log=log, note=say,
                                 on_partial=keep_partial)
    except (ContentionError, TestbedError, ChildError) as exc:
        show_last_progress()
        raise CLIError(str(exc)) from None
    show_last_progress()
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
    cross = summary["config"].get("cross")
    if cross:  # util counts every delivered byte: say how much of it was the chats'
        shares = ", ".join(f"{s} {f(d.get('chats_utilisation'), '.1%')}" for s, d in summary["schemes"].items())
        print(f"cross traffic {' + '.join(cross)}: util counts it too; the chats' own share of the link: {shares}")
    for line in comparison_lines(summary["comparison"]):
        print(line)
