"""Benchmarks and the simulator, a probe's findings: sessions refused at the handshake read as lost data, a cap
check that drew the whole schedule, commands that died silently on SIGTERM (and left workers running), long runs
without progress, and bounds that did not hold."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import pytest

from tokenwire.daemon import bench_daemon
from tokenwire.daemon.cli import main
from tokenwire.daemon.config import parse_config
from tokenwire.daemon.service import Daemon
from tokenwire.testbed import sim
from tokenwire.transport.errors import ErrorCode, RemoteError
from tokenwire.transport.session_events import QUIC_APPLICATION_ERROR, closed_error
from tokenwire.transport.tls import dev_cert

from .test_loopback import run


# -- 1. bench daemon: a session the daemon refuses at its handshake never connected, and lost no token
def _daemon_config(tmp_path: Path, **limits: int):
    cafile, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    dev_cert().write(cafile, key)
    cfg = parse_config({"server": {"listen": ["127.0.0.1:0"], "certificate": str(cafile), "private_key": str(key)},
                        "metrics": {"listen": ""}, "limits": limits})
    return cfg, cafile


def _bench_clients(tmp_path: Path, sessions: int, tokens: int, answers: int = 1, **limits: int) -> list[dict]:
    cfg, cafile = _daemon_config(tmp_path, **limits)

    async def go():
        daemon = Daemon(cfg)
        await daemon.start()
        try:
            return await bench_daemon._clients(daemon.addresses[0][1], cafile, sessions, tokens, "chatterbox",
                                               answers=answers)
        finally:
            await daemon.stop()

    return run(go(), 120)


def test_sessions_over_the_daemons_max_sessions_count_as_failed_to_connect(tmp_path: Path):
    """connect() returns once the client's side of the handshake is done; the daemon then refused the session
    (over max_sessions): each such session was counted as connected, 600 tokens lost and a digest failure."""
    # 90 tokens at the demo's 30/s: the two admitted sessions hold their slots for 3 s, the others come within 30 ms
    results = _bench_clients(tmp_path, 4, 90, max_sessions=2)
    counts = bench_daemon.session_counts(results)
    assert counts["sessions_connected"] <= 2 and counts["sessions_failed_to_connect"] >= 2
    assert sum(counts.values()) == 4
    for rec in results:
        if "connect_s" in rec:
            assert (rec["lost"], rec["digest_failures"], rec["unfinished"], rec["digests_ok"]) == (0, 0, 0, 1)
        else:
            assert (rec["lost"], rec["digest_failures"], rec["unfinished"], rec["tokens"]) == (0, 0, 0, 0)
            # (refused after connect() returned, the case that was miscounted, or, on a slow host, within it)
            assert "too many sessions" in rec["error"] or "refused it during its handshake" in rec["error"]


def _conn(closed: bool = True) -> SimpleNamespace:
    return SimpleNamespace(closed=closed)


def _stream(started: bool = False) -> SimpleNamespace:
    return SimpleNamespace(request_id=b"r" * 16 if started else None, tokens=[b"t"] if started else [])


def test_a_close_without_reason_before_any_answer_started_is_a_refusal_at_the_handshake():
    """Under load the daemon refuses in its handshake, and the close goes out as QUIC's APPLICATION_ERROR with no
    reason (RFC 9000 10.2.3): the probe's 5 sessions "refused it during its handshake" read as 3000 lost tokens."""
    refused = closed_error(QUIC_APPLICATION_ERROR, "", 30.0)
    assert bench_daemon.refused_at_handshake(_conn(), [_stream()], [refused])
    too_many = closed_error(ErrorCode.LIMIT_EXCEEDED, "too many sessions", 30.0)
    assert bench_daemon.refused_at_handshake(_conn(), [_stream()], [too_many, too_many])
    # an answer had started (or the connection lives on, or it closed for another reason): a real failure
    assert not bench_daemon.refused_at_handshake(_conn(), [_stream(started=True)], [refused])
    assert not bench_daemon.refused_at_handshake(_conn(closed=False), [_stream()], [refused])
    internal = closed_error(ErrorCode.INTERNAL, "server error while sending", 30.0)
    assert not bench_daemon.refused_at_handshake(_conn(), [_stream()], [internal])
    assert not bench_daemon.refused_at_handshake(_conn(), [_stream()], [RemoteError("idle", code=ErrorCode.NO_ERROR)])


def test_bench_daemon_reports_refused_sessions_apart_not_as_lost_tokens(tmp_path: Path, monkeypatch, capsys):
    """The README's promise, end to end: sessions that never connect are counted apart (exit 1 for them), with no
    lost token and no digest failure. The benchmark's daemon is given room for 11 sessions, 14 come."""
    real = bench_daemon._start_daemon
    monkeypatch.setattr(bench_daemon, "_start_daemon", lambda tmp, sessions, *a, **k: real(tmp, 1, *a, **k))
    out = tmp_path / "daemon.json"
    assert main(["bench", "daemon", "--sessions", "14", "--rate", "30", "--seconds", "3", "--client-procs", "1",
                 "--json", str(out)]) == 1
    result = json.loads(out.read_text())
    assert result["sessions_connected"] <= 11 and result["sessions_failed_to_connect"] >= 3
    assert (result["lost_tokens"], result["digest_failures"], result["answers_unfinished"]) == (0, 0, 0)
    assert result["tokens_delivered"] == 90 * result["sessions_connected"]
    err = capsys.readouterr().err
    assert f"bench daemon: {result['sessions_failed_to_connect']} of 14 sessions could not connect" in err
    assert "tokens lost" not in err


def test_digest_failures_are_answers_whose_digest_was_checked(tmp_path: Path, capsys):
    """An answer the daemon refused (max_live_answers) has no digest to check: it counted as a digest failure. It
    is an unfinished answer now, lost whole, and the verdict names it so."""
    (rec,) = _bench_clients(tmp_path, 1, 5, answers=3, max_live_answers=2)
    assert rec["tokens"] == 10 and rec["lost"] == 5
    assert (rec["digests_checked"], rec["digest_failures"], rec["unfinished"]) == (2, 0, 1)
    out = {"sessions": 1, **bench_daemon.session_counts([rec]), "lost_tokens": rec["lost"], "duplicate_tokens": 0,
           "digest_failures": rec["digest_failures"], "answers_unfinished": rec["unfinished"]}
    assert bench_daemon.verdict(out) == 1
    assert "5 tokens lost, 0 duplicated, 0 digest failures, 1 answer unfinished" in capsys.readouterr().err


def test_a_digest_that_does_not_match_is_a_digest_failure(tmp_path: Path, monkeypatch):
    from tokenwire.transport import client_session

    monkeypatch.setattr(client_session, "text_digest", lambda tokens: b"\0" * 32)  # the client's side only
    (rec,) = _bench_clients(tmp_path, 1, 5, answers=2)
    assert (rec["digests_checked"], rec["digest_failures"], rec["unfinished"], rec["digests_ok"]) == (2, 2, 0, 0)


# -- 2. sim: the cap check in O(1) memory, and O(1) time where no seed comes near the cap
@pytest.mark.parametrize("seed,rate,first_ms", [(0, 30.0, 150.0), (7, 0.1, 0.0), (3, 9999.5, 40.0)])
def test_offsets_are_the_demo_schedule_bit_for_bit(seed, rate, first_ms):
    from tokenwire.daemon.demo_upstream import schedule

    n = 2000
    expected = schedule(n, rate=rate, seed=seed, first_token_s=first_ms / 1000)
    assert list(sim._offsets(n, rate=rate, seed=seed, first_token_s=first_ms / 1000)) == expected
    cfg = sim.SimConfig(tokens=n, rate=rate, seed=seed, first_token_ms=first_ms, delay_ms=25.0)
    assert sim.earliest_end_s(cfg, stop_after=1e12) == 4 * 0.025 + expected[-1]  # exact, as before


def test_earliest_end_of_a_huge_answer_needs_no_schedule_in_memory():
    """--tokens 50000000 took 97 s and 2 GB to be refused (the whole schedule drawn first); 1e9 ran out of memory.
    It stops at the cap now: a lower bound past it, in constant memory."""
    cfg = sim.SimConfig(tokens=2_000_000)
    tracing = tracemalloc.is_tracing()  # (a run under -X tracemalloc keeps its tracing)
    if not tracing:
        tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        end = sim.earliest_end_s(cfg)
        _, peak = tracemalloc.get_traced_memory()
        peak -= base
    finally:
        if not tracing:
            tracemalloc.stop()
    assert end > cfg.max_virtual_s
    assert peak < 1 << 20  # the list of 2 M offsets alone is 16 MB of pointers


def test_the_closed_form_spread_matches_the_seeds():
    import statistics

    cfg = sim.SimConfig(tokens=2000, rate=30.0)
    ends = [sim.earliest_end_s(sim.SimConfig(tokens=2000, rate=30.0, seed=s)) for s in range(300)]
    mean, sd = sim.end_spread(cfg)
    assert statistics.fmean(ends) == pytest.approx(mean, abs=3 * sd / 300**0.5)
    assert statistics.stdev(ends) == pytest.approx(sd, rel=0.15)


def test_sim_with_a_million_runs_checks_the_cap_without_drawing_each_seed(monkeypatch, capsys):
    """--runs 1000000 spent over 30 s silent drawing every seed's schedule before its first run."""
    def drawn(*a, **k):
        raise AssertionError("a seed's schedule was drawn for the cap check")

    class Started(Exception):
        pass

    def compare(*a, **k):
        raise Started

    monkeypatch.setattr(sim, "earliest_end_s", drawn)
    monkeypatch.setattr(sim, "compare", compare)
    with pytest.raises(Started):
        main(["sim", "--runs", "1000000"])


def test_sim_refuses_more_tokens_than_an_answer_has_at_once(capsys):
    assert main(["sim", "--tokens", "1000001"]) == 2
    assert "--tokens 1000001: at most 1,000,000 (the daemon's bound on an answer)" in capsys.readouterr().err


def test_sim_refuses_an_answer_past_the_cap_with_its_expected_end(capsys):
    assert main(["sim", "--tokens", "1000000", "--schemes", "chatterbox"]) == 2
    err = capsys.readouterr().err
    mean, _ = sim.end_spread(sim.SimConfig(tokens=1_000_000))
    assert f"end past the simulator's cap of 3600 s of virtual time (seed 1; about {mean:,.0f} s on average" in err


# -- 4. sim: progress within one scheme's run, on stderr
def test_run_scheme_reports_progress_within_the_run_and_runs_the_same():
    """`sim --tokens 100000 --rate 10000 --schemes chatterbox` ran 49 s without a word."""
    cfg = sim.SimConfig(tokens=60, rate=100.0, seed=2)
    lines: list[str] = []
    ticks = iter(range(0, 10**9, 10))  # a clock 10 s further on at every look: a line at each chance
    quiet = sim.run_scheme("chatterbox", cfg)
    loud = sim.run_scheme("chatterbox", cfg, lines.append, progress_every_s=10.0, clock=lambda: next(ticks))
    assert lines and lines[-1].startswith("chatterbox: ") and "/60 tokens generated, " in lines[-1]
    assert lines[-1].endswith(" s of virtual time")
    assert any(" 60/60 tokens generated" in ln for ln in lines)
    assert (loud.gen, loud.render, loud.wire_bytes) == (quiet.gen, quiet.render, quiet.wire_bytes)


def test_sim_prints_progress_within_a_long_run_to_stderr(monkeypatch, capsys):
    from tokenwire.testbed import sim_cli

    monkeypatch.setattr(sim_cli, "LONG_RUN_TOKENS", 40)
    real = sim.run_scheme  # a line at every event: a short run shows them
    monkeypatch.setattr(sim, "run_scheme", lambda s, c: real(s, c, progress_every_s=0.0))
    assert main(["sim", "--tokens", "40", "--schemes", "chatterbox", "--json", "-"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["config"]["tokens"] == 40  # stdout: the JSON alone
    assert "    chatterbox: 40/40 tokens generated, " in err and " s elapsed\n" in err


def test_sim_table_says_no_run_finished_instead_of_averaging_none():
    result = {"config": {"tokens": 10, "rate": 30.0, "delay_ms": 50.0, "loss": "iid:1", "loss_direction": "both",
                         "seed": 1, "runs": 1},
              "oracle": {"stall_ratio": float("nan"), "reference_scheme": "stream"},
              "schemes": {"stream": {"stall_ratio": float("nan"), "oracle_stall_ratio": float("nan"),
                                     "ttft_ms": float("nan"), "p99_token_delay_ms": float("nan"),
                                     "bytes_per_token": float("nan"), "tokens_sent": 0, "tokens_rendered": 0,
                                     "digest_ok": None, "runs_finished": 0,
                                     "failed_runs": [{"seed": 1, "error": "stream: no completion"}]}}}
    from tokenwire.testbed.sim_cli import format_table

    text = format_table(result)
    assert "stream: seed 1 FAILED (no completion); no run finished, so the row has no numbers" in text
    assert "0 run(s)" not in text


# -- 3. SIGTERM takes Ctrl-C's path: "interrupted", exit 130, and no child left behind
def _child(script: str) -> subprocess.Popen:
    """A Python child running ``script`` in its own session: the signal the test sends reaches it alone."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _wait_for(stream, needle: str) -> list[str]:
    """Lines of ``stream`` up to and including the first with ``needle`` (all of them if it never comes)."""
    seen = []
    for line in stream:
        seen.append(line)
        if needle in line:
            break
    return seen


def _terminated(proc: subprocess.Popen, stream, needle: str) -> str:
    """SIGTERM once ``needle`` has been printed; the child's stderr after. It must exit 130, saying so."""
    seen = _wait_for(stream, needle)
    assert needle in seen[-1], "".join(seen)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(seen) + err
    assert "interrupted" in err
    return err


_SIGHUP_DEFAULT = "import signal; signal.signal(signal.SIGHUP, signal.SIG_DFL)\n"


@pytest.mark.parametrize("argv,needle", [
    (["sim", "--tokens", "20000", "--schemes", "chatterbox"], "simulating seed 1: chatterbox"),
    (["bench", "predictor", "--calls", "200000"], "onnx: batch 1"),
    (["testbed", "swiftqueue", "--virtual", "--down-trace", "12mbps", "--seconds", "3600", "--policies", "l4s"],
     "[1/1] l4s"),
], ids=["sim", "bench-predictor", "swiftqueue-virtual"])
def test_sigterm_takes_the_ctrl_c_path(argv, needle):
    """They died on SIGTERM with status 143 and not a word."""
    proc = _child(_SIGHUP_DEFAULT + f"import sys\nfrom tokenwire.daemon.cli import main\nsys.exit(main({argv!r}))\n")
    try:
        _terminated(proc, proc.stderr, needle)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


_KV_VIRTUAL = """
    import multiprocessing, os, signal, sys
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    from tokenwire.daemon.cli import main
    from tokenwire.testbed import kv_vsim

    real = kv_vsim.run_kv_virtual

    def synthetic(cfg, **kw):  # no model to load: the synthetic context of tests/test_kv_vsim.py
        cfg.synthetic = (8, 4, 64)
        cfg.recompute_us_per_token = 50_000
        return real(cfg, **kw)

    real_wait = kv_vsim.wait

    def wait(futures, **kw):  # the pool's workers are started: say so (once)
        if not said:
            said.append(print("workers", *[p.pid for p in multiprocessing.active_children()], flush=True))
        return real_wait(futures, **kw)

    said = []

    kv_vsim.run_kv_virtual = synthetic
    kv_vsim.wait = wait
    sys.exit(main(["testbed", "kv", "--virtual", "--down-trace", "8mbps", "--delay-ms", "10", "--context-tokens",
                   "512", "--chunk-tokens", "128", "--controllers", "tokenwire,fixed-L1,fixed-L3", "--repeats",
                   "5000", "--workers", "2"]))
"""


def test_sigterm_to_kv_virtual_stops_its_workers_and_takes_the_ctrl_c_path():
    """SIGTERM killed `testbed kv --virtual` alone (143): its worker processes and their resource tracker ran on,
    reparented to PID 1."""
    proc = _child(_KV_VIRTUAL)
    fds: list[int] = []
    try:
        seen = _wait_for(proc.stdout, "workers")
        assert seen and seen[-1].startswith("workers "), "".join(seen) + (proc.stderr.read() if proc.stderr else "")
        workers = [int(p) for p in seen[-1].split()[1:]]
        kids = set(_children(proc.pid)) | set(workers)  # the resource tracker too
        assert len(workers) == 2 and len(kids) >= 3
        fds = [os.pidfd_open(pid) for pid in kids]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "interrupted" in err
        for fd in fds:  # a pidfd turns readable when its process exits
            readable, _, _ = select.select([fd], [], [], 30)
            assert readable, "a child of `testbed kv --virtual` outlived it"
    finally:
        for fd in fds:
            os.close(fd)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for pid in locals().get("kids", ()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# -- minor: bounds of bench transport and bench emulator
@pytest.mark.parametrize("argv,message", [
    (["bench", "transport", "--rate", "1e12"], "--rate 1e+12: a paced rate is within [0.1, 10000] tokens/s"),
    (["bench", "transport", "--rate", "0.1"], "--tokens 1500 at --rate 0.1/s: a paced run of 15,000 s, at most 3600"),
    (["bench", "emulator", "--rate", "1e9"], "--rate 1e+09: at most 20,000 probe packets/s"),
    (["bench", "emulator", "--seconds", "1e9"], "--seconds 1e+09: at most 600 (the length of each flood and probe"),
])
def test_benchmarks_refuse_absurd_rates_and_lengths_up_front(argv, message, capsys):
    """They were accepted: --rate 1e12 made the paced run a second flood, reported as paced numbers."""
    assert main(argv) == 2
    assert message in capsys.readouterr().err
