"""Benchmarks and research commands at their edges: kills that left children behind, bounds that did not hold,
labels and columns that said the wrong thing, progress that was missing or printed per worker."""

from __future__ import annotations

import argparse
import json
import math
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tokenwire.daemon.cli import CLIError, check_outputs, main
from tokenwire.daemon.config import MAX_ANSWER_TOKENS


def _child(script: str, **kwargs) -> subprocess.Popen:
    """A Python child running ``script`` (its own session: the signals the test sends reach it alone)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _stop(proc: subprocess.Popen, *pids: int) -> None:
    """Cleanup of a failed test: nothing of ours keeps running."""
    for pid in pids:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


# -- 1. bench daemon: SIGTERM/SIGHUP take the Ctrl-C path; the children die with the benchmark
_BENCH_DAEMON_KILLED = """
    import os, signal, socket, sys, tempfile, time
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as under a terminal, whatever the test runner ignores
    tempfile.tempdir = sys.argv[1]
    from tokenwire.daemon import bench_daemon
    from tokenwire.daemon.cli import main

    daemon = (
        "import os, socket, time\\n"
        "open(os.path.join(%r, 'daemon.pid'), 'w').write(str(os.getpid()))\\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\\n"
        "s.sendto(b'READY=1\\\\nSTATUS=listening on udp/127.0.0.1:9', os.environ['NOTIFY_SOCKET'])\\n"
        "time.sleep(60)\\n" % sys.argv[1]
    )
    bench_daemon._daemon_command = lambda cfg: [sys.executable, "-c", daemon]

    def workers(*args):
        print("running", flush=True)
        for _ in range(600):  # in slices: a signal landing just before one long sleep's syscall waits it out
            time.sleep(0.1)

    bench_daemon._run_workers = workers
    sys.exit(main(["bench", "daemon", "--sessions", "2", "--rate", "10", "--seconds", "1"]))
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_bench_daemon_killed_stops_its_daemon_and_removes_its_folder(tmp_path: Path, signum: int):
    """A kill left the daemon child running for good (reparented to PID 1) and /tmp/tokenwire-bench-* behind."""
    proc = _child(_BENCH_DAEMON_KILLED.replace("sys.argv[1]", repr(str(tmp_path))))
    assert proc.stdout is not None
    pid = 0
    try:
        assert proc.stdout.readline() == "running\n", proc.stderr.read() if proc.stderr else ""
        pid = int((tmp_path / "daemon.pid").read_text())
        proc.send_signal(signum)
        proc.wait(30)  # not communicate(): a daemon left behind holds the pipes open
        assert proc.returncode == 130  # the Ctrl-C path
        assert proc.stderr is not None and "interrupted" in proc.stderr.read()
        assert _gone(pid)  # stopped and reaped before the benchmark exited
        assert not list(tmp_path.glob("tokenwire-bench-*"))
    finally:
        _stop(proc, *([pid] if pid else []))


def test_a_benchmark_child_dies_with_a_killed_benchmark():
    """PR_SET_PDEATHSIG: a SIGKILL of the benchmark, where no finally runs, no longer leaves its children."""
    if not hasattr(os, "pidfd_open"):
        pytest.skip("needs os.pidfd_open (Linux)")
    proc = _child("""
        import subprocess, sys, time
        from tokenwire.daemon.bench_cli import die_with_parent
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=die_with_parent())
        print(child.pid, flush=True)
        time.sleep(60)
    """)
    assert proc.stdout is not None
    pid = int(proc.stdout.readline())
    fd = os.pidfd_open(pid)
    try:
        proc.kill()
        proc.wait()
        readable, _, _ = select.select([fd], [], [], 10)  # a pidfd turns readable when its process exits
        assert readable, "the child outlived the SIGKILLed benchmark"
    finally:
        os.close(fd)
        _stop(proc, pid)


# -- 2. bench transport: SIGTERM stops the server subprocess
_BENCH_TRANSPORT_KILLED = """
    import asyncio, subprocess, sys
    from tokenwire.daemon.cli import main
    from tokenwire.transport import bench_transport

    real = subprocess.Popen

    def popen(*args, **kwargs):
        proc = real(*args, **kwargs)
        if "--serve" in args[0]:  # not ctypes' look-up of libc
            print("server", proc.pid, flush=True)
        return proc

    async def client(*args):
        print("running", flush=True)
        await asyncio.sleep(60)

    bench_transport.subprocess.Popen = popen
    bench_transport._client_run = client
    sys.exit(main(["bench", "transport", "--modes", "raw", "--repeats", "1"]))
"""


def test_bench_transport_killed_stops_its_server():
    """`bench transport` killed with SIGTERM left `python -m ...bench_transport --serve` serving for good."""
    proc = _child(_BENCH_TRANSPORT_KILLED)
    assert proc.stdout is not None
    pid = 0
    try:
        first = proc.stdout.readline().split()
        assert first[0] == "server", proc.stderr.read() if proc.stderr else ""
        pid = int(first[1])
        assert proc.stdout.readline() == "running\n"  # the server answered its port: the client runs
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)  # not communicate(): a server left behind holds stderr open
        assert proc.returncode == 130
        assert _gone(pid)  # killed and reaped by _one's finally
    finally:
        _stop(proc, *([pid] if pid else []))


# -- 3. testbed swiftqueue --virtual: the RATE x --seconds bound holds there too
@pytest.mark.parametrize("flow,seconds", [("tokens:1e9", 2), ("tokens:50", 1e9), ("tokens:inf", 2)])
def test_virtual_swiftqueue_refuses_an_answer_longer_than_the_bound(flow, seconds):
    """Virtual time keeps a record per token: tokens:1e9 grew 100 MB/s to a MemoryError, --seconds 1e9 never
    ended."""
    from tokenwire.testbed.swiftqueue_eval import SwiftQueueConfig, SwiftQueueEvalError

    cfg = SwiftQueueConfig(down_trace="12mbps", policies=["l4s"], flow=flow, seconds=seconds, virtual=True)
    with pytest.raises(SwiftQueueEvalError, match=f"tokens: at most {MAX_ANSWER_TOKENS}"):
        cfg.validate()
    SwiftQueueConfig(down_trace="12mbps", policies=["l4s"], flow="rt:2mbps", seconds=2, virtual=True).validate()


# -- 4. model files: only regular ones, and not beyond a bound
def test_read_model_refuses_a_file_beyond_the_bound_and_a_folder(tmp_path: Path):
    from tokenwire.predictor.onnx_session import MAX_MODEL_BYTES, ModelError, read_model

    big = tmp_path / "big.onnx"
    with big.open("wb") as f:
        f.truncate(MAX_MODEL_BYTES + 1)  # sparse: nothing written
    with pytest.raises(ModelError, match=r"big\.onnx: 67,108,865 bytes, larger than a model can be \(64 MiB"):
        read_model(big)
    with pytest.raises(ModelError, match="not a regular file"):
        read_model(tmp_path)
    small = tmp_path / "small.onnx"
    small.write_bytes(b"\x08\x07")
    assert read_model(small) == b"\x08\x07"


def test_read_model_refuses_a_device_and_a_fifo_without_reading(tmp_path: Path):
    """`--model /dev/zero` read until the memory ran out; a FIFO blocked on open. In a child under a memory cap
    and a timeout, so that the old behaviour fails the test instead of the machine."""
    fifo = tmp_path / "model.fifo"
    os.mkfifo(fifo)
    script = f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from pathlib import Path
        from tokenwire.predictor.onnx_session import ModelError, read_model
        for path in ("/dev/zero", {str(fifo)!r}):
            try:
                read_model(Path(path))
            except ModelError as exc:
                print(exc)
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                         timeout=30)
    assert out.stdout.splitlines() == ["/dev/zero: not a regular file (a model is one)",
                                       f"{fifo}: not a regular file (a model is one)"], out.stderr


# -- 5. bench emulator: where the flood's packets were lost, from the emulator's own counters
class _CountingTestbed:
    """The emulator's cumulative counters, before and after a flood."""

    def __init__(self, *snapshots: dict) -> None:
        self.snapshots = list(snapshots)

    def stats(self) -> dict:
        arrived, delivered, write_errors = self.snapshots.pop(0)
        return {"down": {"arrived_packets": arrived, "delivered_packets": delivered}, "write_errors": write_errors}


def test_emulator_flood_splits_its_loss_where_it_happened(monkeypatch, capsys):
    """Every packet the emulator read it forwarded, yet the report said "lost before/in the emulator" for the
    losses behind it (the client's kernel, the sink's socket)."""
    from tokenwire.testbed import bench

    sent = {"sent": 1000, "pps": 1000.0}
    got = {"received": 700, "pps": 700.0}  # over 1 s: the sink's first to last packet
    monkeypatch.setattr(bench, "_run_pair", lambda *a: (sent, got))
    tb = _CountingTestbed((10, 10, 0), (910, 810, 0))  # 900 read, 800 forwarded during the flood
    flood = bench._flood(tb, 1.0, emulated=True)
    assert flood["loss"] == pytest.approx(0.3)
    assert flood["lost_before_emulator"] == pytest.approx(0.1)
    assert flood["lost_in_emulator"] == pytest.approx(0.1)
    assert flood["lost_after_emulator"] == pytest.approx(0.1)
    assert flood["emulator_forwarded_pps"] == pytest.approx(800.0)
    assert bench._loss_split(100, 100, 95, 90) == pytest.approx(  # a failed write is lost in the emulator
        {"lost_before_emulator": 0.0, "lost_in_emulator": 0.05, "lost_after_emulator": 0.05})

    probes = {"one_way_p50_ms": 0.1, "one_way_p99_ms": 0.2, "configured_delay_ms": 20.0, "error_p50_ms": 0.1,
              "error_p99_ms": 0.2, "error_max_ms": 0.3}
    res = {"core_virtual_time": {"droptail": {"pps": 1.0}, "dualpi2": {"pps": 1.0}},
           "veth_baseline": {"flood": {"sent_pps": 1000.0, "delivered_pps": 1000.0, "loss": 0.0}, "probes": probes},
           "emulator": {"flood": flood, "ladder": {"steps": [], "sustained_pps": 0.0, "sender_limited": False},
                        "probes_no_delay": probes, "probes_delay": probes}}
    bench.print_report(res)
    out = capsys.readouterr().out
    assert "before/in the emulator" not in out
    assert ("the emulator forwarded 800 pkt/s; 30.0% lost end to end: 10.0% before the emulator, 10.0% in it, "
            "10.0% after it") in out


# -- 6. testbed compare: the union oracle is a lower bound
def _scheme_run(gen: list[float], deliveries: list[tuple[float, float]]):
    from tokenwire.testbed.compare import SchemeRun

    return SchemeRun(scheme="x", seed=0, origin=0.0, request_time=0.0, request_arrival=0.0, gen=gen,
                     render=[a for _, a in deliveries], text_ok=True, wire_bytes=1000,
                     down_packets=len(deliveries), down_lost=0, deliveries=deliveries, lost_times=[], emulator={},
                     base_delay=0.040)


def test_union_oracle_is_never_above_a_schemes_own():
    """With the first run's generation times alone the union came out above the oracle of a scheme whose tokens
    were generated at better moments: a's last token waits for the slow packet, b's never do."""
    from tokenwire.testbed.compare import finalize, union_oracle

    a = _scheme_run([0.0, 0.1, 0.2], [(0.0, 0.04), (0.1, 0.14), (0.2, 0.5)])
    b = _scheme_run([0.3, 0.4, 0.5], [(0.3, 0.34), (0.4, 0.44), (0.5, 0.54)])
    finalize([a, b])
    assert b.oracle_stall_ratio == pytest.approx(0.0, abs=1e-12) and a.oracle_stall_ratio > 0.5
    for runs in ([a, b], [b, a]):  # was 0.33 with a's times first
        assert union_oracle(runs) == pytest.approx(0.0, abs=1e-12)
    # where the union helps, it is below every scheme's own: c's packets carry the first tokens in time, d's the last
    c = _scheme_run([0.0, 0.1, 0.2], [(0.0, 0.04), (0.1, 0.14), (0.2, 0.5)])
    d = _scheme_run([0.0, 0.1, 0.2], [(0.0, 0.3), (0.1, 0.31), (0.2, 0.24)])
    finalize([c, d])
    assert min(c.oracle_stall_ratio, d.oracle_stall_ratio) > 0.5
    assert union_oracle([c, d]) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(union_oracle([_scheme_run([0.0], [])]))


# -- 7. only --json takes "-"
def test_plot_dash_is_refused_before_any_work(monkeypatch, capsys, tmp_path):
    """`--plot -` ran the whole evaluation, wrote ./-.png and said "wrote -"."""
    from tokenwire.testbed import swiftqueue_eval

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(swiftqueue_eval, "run_virtual_all", lambda *a, **k: pytest.fail("the run started"))
    assert main(["testbed", "swiftqueue", "--virtual", "--down-trace", "12mbps", "--seconds", "2", "--policies",
                 "l4s", "--plot", "-"]) == 2
    err = capsys.readouterr().err
    assert err == ("tokenwire testbed swiftqueue: error: --plot -: this option cannot write to stdout (--json - can); "
                   "name a file\n")
    assert not list(tmp_path.iterdir())
    with pytest.raises(CLIError, match=r"--keep -: .* name a folder"):
        check_outputs(argparse.Namespace(keep="-"))
    check_outputs(argparse.Namespace(json="-", out="-"))  # stdout, through output_file


# -- 8. tokenwire sim: progress on a long single-seed run, a rendered column as wide as its counts
def test_sim_prints_progress_for_many_tokens_on_one_seed(monkeypatch, capsys):
    from tokenwire.testbed import sim_cli

    monkeypatch.setattr(sim_cli, "LONG_RUN_TOKENS", 40)
    assert main(["sim", "--tokens", "20", "--schemes", "chatterbox,stream", "--json", "-"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["config"]["tokens"] == 20  # stdout: the JSON alone
    assert "  simulating seed 1: chatterbox ...\n  simulating seed 1: stream ...\n" in err
    assert main(["sim", "--tokens", "10", "--schemes", "chatterbox,stream"]) == 0
    assert "simulating" not in capsys.readouterr().err  # short: quiet, as before


def test_sim_table_columns_stay_aligned_at_five_digit_counts():
    """"20000/20000" overflowed the 9-wide rendered column and pushed the digest column right."""
    from tokenwire.testbed.sim import SimConfig, compare
    from tokenwire.testbed.sim_cli import format_table

    result = compare(["chatterbox", "stream"], SimConfig(tokens=10), runs=1)
    result["schemes"]["chatterbox"].update(tokens_sent=20000, tokens_rendered=20000)
    result["schemes"]["stream"].update(tokens_sent=20000, tokens_rendered=999)
    header, *rows = format_table(result).splitlines()[1:4]
    assert len({len(header), *(len(r) for r in rows)}) == 1
    assert header.index("digest") + len("digest") == len(rows[0])
    assert "20000/20000" in rows[0] and "  999/20000" in rows[1]


def test_compare_table_columns_stay_aligned_at_five_digit_counts(capsys):
    from tokenwire.testbed.cli import print_table

    row = {"stall_ratio": 0.1, "oracle_stall_ratio": 0.05, "ttft_ms": 250.0, "p50_token_delay_ms": 50.0,
           "p99_token_delay_ms": 90.0, "bytes_per_token": 200.0, "down_loss_rate": 0.01}
    print_table({"schemes": {"chatterbox": {**row, "tokens_sent": 20000, "tokens_rendered": 20000},
                             "stream": {**row, "tokens_sent": 20000, "tokens_rendered": 7}},
                 "oracle": {"reference_scheme": "chatterbox", "stall_ratio": 0.05, "union_stall_ratio": 0.04},
                 "backend": "userspace"})
    header, *rows = capsys.readouterr().out.splitlines()[:3]
    assert len({len(header), *(len(r) for r in rows)}) == 1
    assert "20000/20000" in rows[0] and "    7/20000" in rows[1]


# -- 9. bench emulator: a delay that cannot fit is refused up front; a line per phase
def test_bench_emulator_refuses_a_delay_beyond_the_probe_deadline(monkeypatch, capsys):
    """--delay-ms 60000 ran every phase (~14 s) and then failed in the last, every number lost."""
    from tokenwire.testbed import bench, netns

    monkeypatch.setattr(netns, "check_root", lambda: pytest.fail("the run started"))
    assert main(["bench", "emulator", "--delay-ms", "60000"]) == 2
    err = capsys.readouterr().err
    assert f"--delay-ms 60000: at most {bench.MAX_DELAY_MS:g}" in err and len(err.splitlines()) == 1


def test_bench_emulator_prints_a_line_per_phase(monkeypatch, capsys):
    from tokenwire.testbed import bench, topology

    class FakeTestbed:
        backend = "userspace"

        def __init__(self, *args, **kwargs) -> None:
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

        def stats(self) -> dict:
            return {"release_late_ms": {}}

    monkeypatch.setattr(topology, "Testbed", FakeTestbed)
    monkeypatch.setattr(topology, "DirectLink", FakeTestbed)
    monkeypatch.setattr(bench, "bench_core", lambda: {})
    for name in ("_flood", "_probes", "_ladder"):
        monkeypatch.setattr(bench, name, lambda *a, **k: {})
    bench.run_bench(1.0, 20.0, 1000.0)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 5 and all(ln.startswith("  ") and ln.endswith(" ...") for ln in lines)
    assert "20 ms delay" in lines[-1]


# -- 10. bench transport: one clock for the flood columns; no ratio that does not compare; no mode twice
def test_transport_flood_rates_divide_the_same_clock():
    from tokenwire.transport.bench_transport import _figures, _ratios

    server = {"tokens": 100, "datagrams": 150, "token_packets": 100, "cpu_s": 0.02, "wall_s": 1.0}  # sending time
    client = {"tokens": 100, "datagrams": 160, "cpu_s": 0.01, "wall_s": 2.0}  # to the answer's end
    f = _figures(server, client, 100)
    assert f["packets_per_s"] == pytest.approx(50.0) and f["tokens_per_s"] == pytest.approx(50.0)
    raw = {"server_us_per_token": 1.0, "client_us_per_token": 1.0, "server_us_per_packet": 1.0,
           "client_us_per_packet": 1.0, "flood_packets_per_s": 10.0, "flood_tokens_per_s": 90.0}
    assert "flood_packets_per_s_vs_raw" not in _ratios({"raw": raw, "stream": raw})["stream"]


def test_transport_refuses_a_mode_listed_twice(monkeypatch, capsys):
    from tokenwire.transport import bench_transport

    monkeypatch.setattr(bench_transport, "_one", lambda *a: pytest.fail("the run started"))
    assert main(["bench", "transport", "--modes", "raw,stream,raw"]) == 2
    assert "--modes: raw listed twice" in capsys.readouterr().err


# -- 11. bench daemon: CPU time finer than clock ticks; one progress line for all workers
def test_daemon_cpu_time_is_finer_than_clock_ticks():
    """/proc's 10-ms ticks made a short run's cpu_us_per_token exactly 533.33, 5000 or 10000."""
    from tokenwire.daemon.bench_daemon import _cpu_seconds

    samples = set()
    start = time.process_time()
    while time.process_time() - start < 0.03:  # 30 ms of CPU: at most 4 distinct values in ticks
        samples.add(_cpu_seconds(os.getpid()))
    assert len(samples) > 10


def test_daemon_workers_progress_is_one_line_for_all_sessions(tmp_path, monkeypatch, capsys):
    """Each worker printed its own line: "5 s: 0/2 sessions finished" twice for --sessions 4."""
    from tokenwire.daemon import bench_daemon

    worker = ("import json, os, sys, time\n"
              "out = sys.argv[1]\n"
              "open(out + '.progress', 'w').write('1')\n"
              "time.sleep(0.5)\n"
              "open(out, 'w').write(json.dumps({'results': [], 'cpu_s': 0.0}))\n")
    monkeypatch.setattr(bench_daemon, "_worker_command", lambda *a: [sys.executable, "-c", worker, str(a[-1])])
    monkeypatch.setattr(bench_daemon, "PROGRESS_S", 0.1)
    t0 = time.monotonic()
    assert bench_daemon._run_workers(9, tmp_path / "cert.pem", 4, 10, "chatterbox", 2) == ([], 0.0)
    ticks = (time.monotonic() - t0) / 0.1
    lines = capsys.readouterr().err.splitlines()
    assert lines and len(lines) <= ticks + 1  # one per tick, not one per worker
    assert all(ln.endswith(("0/4 sessions finished, 0/40 tokens received",
                            "1/4 sessions finished, 0/40 tokens received",
                            "2/4 sessions finished, 0/40 tokens received")) for ln in lines), lines
    assert bench_daemon._progress_line(5.0, [tmp_path / "worker0.json.progress", tmp_path / "nothing"], 4) == \
        "      5 s: 1/4 sessions finished"


def test_daemon_workers_progress_counts_the_tokens_received_before_sessions_end(tmp_path):
    """Sessions end together at the end of a run: "0/200 sessions finished" for 30 s said nothing of how it went."""
    from tokenwire.daemon import bench_daemon

    one, two = tmp_path / "w0.json.progress", tmp_path / "w1.json.progress"
    bench_daemon._write_progress(one, 0, 1500)
    bench_daemon._write_progress(two, 1, 2500)
    assert bench_daemon._progress_line(5.0, [one, two], 4, 8000) == \
        "      5 s: 1/4 sessions finished, 4,000/8,000 tokens received"


def test_sim_union_oracle_is_never_above_a_schemes_own():
    """`tokenwire sim`'s union oracle took the first run's generation times alone, as compare's did: with
    a's times first it came out 0.33 while b's own oracle is 0."""
    from tokenwire.testbed.sim import SimRun, union_oracle
    from tokenwire.transport import metrics

    def run(gen, deliveries):
        render = [a for _, a in deliveries]
        oracle = metrics.stall_ratio(gen, metrics.oracle_render_times(gen, deliveries), 0.040)
        return SimRun(scheme="x", gen=gen, render=render, request_time=0.0, request_arrival=0.0, base_delay=0.040,
                      wire_bytes=1000, deliveries=deliveries, digest_ok=True,
                      stats=metrics.summarize(gen, render, base_delay=0.040, request_time=0.0, wire_bytes=1000),
                      oracle_stall_ratio=oracle, packets_down=len(deliveries), packets_lost_down=0)

    a = run([0.0, 0.1, 0.2], [(0.0, 0.04), (0.1, 0.14), (0.2, 0.5)])
    b = run([0.3, 0.4, 0.5], [(0.3, 0.34), (0.4, 0.44), (0.5, 0.54)])
    assert b.oracle_stall_ratio == pytest.approx(0.0, abs=1e-12) and a.oracle_stall_ratio > 0.5
    for runs in ([a, b], [b, a]):
        assert union_oracle(runs) == pytest.approx(0.0, abs=1e-12)
