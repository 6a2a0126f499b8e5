"""``testbed down`` over unreadable state files, cross-traffic rates too low to pace, atomic ``--plot`` files,
absurd delays and trace gaps refused up front, the emulator's owner dying under a reply, a progress line for
large traces, the testbed's ``--seed`` as ``predictor collect`` takes it, a SIGTERM'd emulator's quiet exit,
``status`` agreeing with ``down`` about runs whose state file cannot be read, SIGTERM as Ctrl-C from a command's
start (its trace parse included), ``status`` without addresses, the docs' synopses, and ``up --detach`` letting go
of the run it leaves up."""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tokenwire.daemon.cli import main
from tokenwire.testbed import cli, emulator, netns, topology, traffic
from tokenwire.testbed.emulator import DirectionConfig, EmulatorConfig
from tokenwire.testbed.trace import TraceError

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="needs root (network namespaces)")


# -- 1. `testbed down` over state files it cannot read ---------------------------------------------------------
@pytest.fixture
def fake_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A state folder and a namespace folder of plain files (namespaces "removed" by unlinking them)."""
    state, ns_dir = tmp_path / "state", tmp_path / "netns"
    state.mkdir()
    ns_dir.mkdir()
    monkeypatch.setattr(netns, "STATE_DIR", str(state))
    monkeypatch.setattr(netns, "NETNS_DIR", str(ns_dir))
    monkeypatch.setattr(netns, "check_root", lambda: None)
    monkeypatch.setattr(netns, "remove_netns", lambda name: os.unlink(ns_dir / name))
    monkeypatch.setattr(cli, "_remove_links", lambda run_id: [], raising=False)  # (not in every version)
    real_terminate = netns.terminate_pids

    def only_ours(pids: list[int], timeout: float = 3.0) -> None:
        """A defect (or a mutant) that takes a stranger's pid for an owner fails the test instead of signalling
        that process: the hand-made files here name pid 1."""
        strangers = [pid for pid in pids if _parent_of(pid) != os.getpid()]
        assert not strangers, f"would signal processes this test did not start: {strangers}"
        real_terminate(pids, timeout)

    monkeypatch.setattr(netns, "terminate_pids", only_ours)
    return SimpleNamespace(state=state, ns=ns_dir)


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _scratch() -> str:
    return tempfile.mkdtemp(prefix="tw-compare-")


def test_down_cleans_runs_whose_state_file_cannot_be_read_and_the_runs_after_them(fake_host, capsys):
    """A truncated state file and one with a key of another version: `down` ended in a JSONDecodeError (or
    TypeError) traceback, removed nothing, and stopped the cleanup of every crashed run after it."""
    truncated_scratch, other_scratch = _scratch(), _scratch()
    try:
        # truncated after the scratch folder (the order RunState writes its fields in puts info last)
        text = json.dumps({"run_id": "tw5d5d5d", "owner_pid": 1, "info": {"scratch": truncated_scratch}})
        (fake_host.state / "tw5d5d5d.json").write_text(text[:-2])
        (fake_host.state / "tw5d5d5e.json").write_text(json.dumps(
            {"run_id": "tw5d5d5e", "owner_pid": 1, "namespaces": ["tw5d5d5e-srv"], "tun_fds": [3],
             "info": {"scratch": other_scratch}}))
        dead = subprocess.Popen(["true"])
        dead.wait()
        netns.RunState("tw5d5d5f", dead.pid, ["tw5d5d5f-srv"]).save()  # readable, crashed, listed after them
        for name in ("tw5d5d5d-srv", "tw5d5d5d-cli", "tw5d5d5e-srv", "tw5d5d5f-srv", "tw111111-srv"):
            (fake_host.ns / name).write_text("")

        assert cli.cmd_down(argparse.Namespace(run_ids=[], all=False)) == 0

        out = capsys.readouterr().out
        assert sorted(os.listdir(fake_host.ns)) == ["tw111111-srv"]  # only what carries their ids
        assert os.listdir(fake_host.state) == []
        assert not os.path.exists(truncated_scratch) and not os.path.exists(other_scratch)
        lines = out.splitlines()
        assert lines[0].startswith("tw5d5d5d: its state file could not be read (JSONDecodeError: ")
        assert ": removed it, namespace tw5d5d5d-cli, namespace tw5d5d5d-srv, folder " in lines[0]
        assert "namespace tw5d5d5d-cli" in lines[0] and "namespace tw5d5d5d-srv" in lines[0]
        assert lines[1].startswith("tw5d5d5e: its state file could not be read (TypeError")
        assert "namespace tw5d5d5e-srv" in lines[1] and f"folder {os.path.realpath(other_scratch)}" in lines[1]
        assert lines[2] == "tw5d5d5f: namespace tw5d5d5f-srv"
    finally:
        for path in (truncated_scratch, other_scratch):
            shutil.rmtree(path, ignore_errors=True)


def test_down_by_id_cleans_a_run_whose_state_file_cannot_be_read(fake_host, capsys):
    (fake_host.state / "tw5d5d5d.json").write_text('{"run_id": "tw5d5d5d", "owner_pid": 1, "namesp')
    (fake_host.ns / "tw5d5d5d-srv").write_text("")
    assert cli.cmd_down(argparse.Namespace(run_ids=["tw5d5d5d"], all=False)) == 0
    assert os.listdir(fake_host.ns) == [] and os.listdir(fake_host.state) == []
    assert "its state file could not be read" in capsys.readouterr().out


def test_plain_down_leaves_a_live_run_whose_state_file_has_keys_of_another_version(fake_host, capsys):
    """Its owner is alive and provably the writer (pid and start time): a running testbed of a newer version, not a
    crashed one; only `down ID` (or --all) stops it."""
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (fake_host.state / "tw5d5d60.json").write_text(json.dumps(
            {"run_id": "tw5d5d60", "owner_pid": owner.pid, "owner_start": netns.start_time(owner.pid),
             "namespaces": ["tw5d5d60-srv"], "new_key": 1}))
        (fake_host.ns / "tw5d5d60-srv").write_text("")
        assert cli.cmd_down(argparse.Namespace(run_ids=[], all=False)) == 0
        assert capsys.readouterr().out == "nothing to clean up\n"
        assert os.listdir(fake_host.ns) == ["tw5d5d60-srv"] and owner.poll() is None

        assert cli.cmd_down(argparse.Namespace(run_ids=["tw5d5d60"], all=False)) == 0
        assert owner.wait(timeout=30) is not None  # terminated first, as a readable run's live owner is
        assert os.listdir(fake_host.ns) == [] and os.listdir(fake_host.state) == []
    finally:
        owner.kill()
        owner.wait()


def test_a_salvaged_pid_without_its_start_time_is_never_signalled(fake_host, monkeypatch):
    """A bare pid (1 in a hand-made file) may belong to anybody: it is not taken for the run's owner."""
    signalled: list[Any] = []
    monkeypatch.setattr(netns, "terminate_pids", lambda pids, timeout=3.0: signalled.append(pids))
    (fake_host.state / "tw5d5d61.json").write_text('{"run_id": "tw5d5d61", "owner_pid": 1, "x": 1}')
    assert cli.cmd_down(argparse.Namespace(run_ids=["tw5d5d61"], all=False)) == 0
    assert signalled == [] and os.listdir(fake_host.state) == []


def test_a_run_that_cannot_be_cleaned_does_not_stop_the_others(fake_host, monkeypatch, capsys):
    def refuse(name: str) -> None:
        if name.startswith("tw5d5d62"):
            raise PermissionError(1, "Operation not permitted")
        os.unlink(fake_host.ns / name)

    monkeypatch.setattr(netns, "remove_netns", refuse)
    dead = subprocess.Popen(["true"])
    dead.wait()
    for run_id in ("tw5d5d62", "tw5d5d63"):
        netns.RunState(run_id, dead.pid, [f"{run_id}-srv"]).save()
        (fake_host.ns / f"{run_id}-srv").write_text("")
    with pytest.raises(cli.CLIError, match="could not clean up tw5d5d62"):
        cli.cmd_down(argparse.Namespace(run_ids=[], all=False))
    captured = capsys.readouterr()
    assert "tw5d5d62: not cleaned up: PermissionError" in captured.err
    assert "tw5d5d63: namespace tw5d5d63-srv" in captured.out
    assert os.listdir(fake_host.ns) == ["tw5d5d62-srv"]


@needs_root
def test_down_removes_real_namespaces_of_unreadable_runs(tmp_path):
    """The probe's repro: `tokenwire testbed down ID` on each, through the command, with real namespaces."""
    ids = ["tw" + secrets.token_hex(3) for _ in range(2)]
    (tmp_path / f"{ids[0]}.json").write_text(f'{{"run_id": "{ids[0]}", "owner_pid": 1, "namesp')
    (tmp_path / f"{ids[1]}.json").write_text(json.dumps({"run_id": ids[1], "owner_pid": 1, "tun_fds": [3]}))
    env = {**os.environ, "TOKENWIRE_TESTBED_STATE": str(tmp_path)}
    try:
        for run_id in ids:
            subprocess.run(["ip", "netns", "add", f"{run_id}-srv"], check=True)
        for run_id in ids:
            done = subprocess.run([sys.executable, "-m", "tokenwire.daemon.cli", "testbed", "down", run_id],
                                  env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            assert f"{run_id}: its state file could not be read" in done.stdout
            assert f"namespace {run_id}-srv" in done.stdout
        assert not any(os.path.exists(f"/run/netns/{run_id}-srv") for run_id in ids)
        assert os.listdir(tmp_path) == []
    finally:
        for run_id in ids:
            subprocess.run(["ip", "netns", "del", f"{run_id}-srv"], capture_output=True)


# -- 2. cross traffic too slow to pace -------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["udp-ect1:1bps", "udp-ect1:4bps", "onoff-ect1:1kbps:100:100", "udp-ect1:9.8kbps"])
def test_a_cross_rate_below_one_packet_a_second_is_refused_with_the_minimum(spec):
    with pytest.raises(ValueError, match=r"below the slowest paced flow, 9824 bit/s \(one 1228-byte packet a"):
        traffic.parse_cross(spec)


def test_compare_refuses_a_cross_rate_too_slow_to_pace_before_anything_is_built():
    from tokenwire.testbed.compare import CompareConfig

    with pytest.raises(ValueError, match="slowest paced flow"):
        CompareConfig(down_trace="12mbps", up_trace="12mbps", cross=["udp-ect1:1bps"]).validate()
    traffic.parse_cross("udp-ect1:9824bps")  # the minimum itself


class _RecordingTestbed:
    client_addr, client_ns, server_ns = "10.0.0.2", "tw000000-cli", "tw000000-srv"

    def __init__(self) -> None:
        self.argv: list[list[str]] = []

    def popen(self, ns: str, argv: list[str], **kwargs: Any) -> None:
        self.argv.append(argv)


class _ReadyChild:
    def __init__(self, proc: Any, name: str) -> None:
        pass

    def wait_for(self, key: str, timeout: float) -> dict[str, Any]:
        return {key: True}


@pytest.mark.parametrize("spec", ["udp-ect1:1bps", "onoff-ect1:3bps:100:100", "udp-ect1:2mbps"])
def test_the_sender_gets_the_exact_rate_never_a_rounded_flood(spec, monkeypatch):
    """`--rate` was "%.3f" packets/s: under ~5 bit/s "0.000", the sender's flood."""
    from tokenwire.testbed import child
    from tokenwire.testbed.trace import parse_rate

    monkeypatch.setattr(child, "Child", _ReadyChild)
    tb = _RecordingTestbed()
    traffic.start_cross(tb, [spec], 10.0)
    sender = tb.argv[1]
    rate = float(sender[sender.index("--rate") + 1])
    assert rate > 0 and rate == pytest.approx(parse_rate(spec.split(":")[1]) / (8 * 1228), rel=1e-12)


def test_a_sender_whose_next_packet_is_due_after_the_end_stops_at_the_end():
    """A rate so low that the second packet is due past the run slept until then (time.sleep(1e40) overflowed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sink.bind(("127.0.0.1", 0))
        result = traffic.udp_send(sock, sink.getsockname(), rate_pps=1e-40, size=100, duration=0.05)
    assert result["sent"] == 1 and result["errors"] == 0


# -- 3. --plot written atomically -------------------------------------------------------------------------------
def _compare_plot_args(path: str) -> tuple[Any, ...]:
    stats = SimpleNamespace(stall_ratio=0.01, p99_token_delay_ms=80.0)
    run = SimpleNamespace(gen=[0.0, 0.1, 0.2], render=[0.05, 0.16, 0.3], stats=stats, seed=0, origin=0.0,
                          base_delay=0.05, deliveries=[(0.0, 0.05), (0.1, 0.16)])
    summary = {"config": {"down_trace": "12mbps", "delay_ms": 50, "loss": "none", "queue": "droptail",
                          "tokens": 3, "rate": 10}, "backend": "userspace"}
    return summary, {"chatterbox": [run]}, path


def _swiftqueue_plot_args(path: str) -> tuple[Any, ...]:
    records = [{"t": 0.01 * i, "latency_ms": 20.0 + i % 3, "ecn": i % 2} for i in range(50)]
    summary = {"policies": {"swiftqueue": {"p99_ms": 22.0, "l_share": 0.5}}, "config": {"down_trace": "12mbps"},
               "backend": "userspace"}
    return summary, {"swiftqueue": SimpleNamespace(records=records)}, path


def _kv_plot_args(path: str) -> tuple[Any, ...]:
    summary = {"controllers": {"tokenwire": {"deadline_attainment": 0.9, "mean_quality_top1": 0.95}},
               "fetches": {"tokenwire": [{"fetch_ms": 900.0}, {"fetch_ms": 1200.0}]},
               "config": {"deadline_ms": 3000, "down_trace": "12mbps", "context_tokens": 1024}}
    return summary, path


def _plotters() -> list[tuple[str, Any]]:
    from tokenwire.testbed.kv_eval import plot_kv
    from tokenwire.testbed.plots import plot_compare
    from tokenwire.testbed.swiftqueue_plot import plot_swiftqueue

    return [("compare", lambda p: plot_compare(*_compare_plot_args(p))),
            ("swiftqueue", lambda p: plot_swiftqueue(*_swiftqueue_plot_args(p))),
            ("kv", lambda p: plot_kv(*_kv_plot_args(p)))]


@pytest.mark.parametrize("which", ["compare", "swiftqueue", "kv"])
def test_an_interrupted_plot_leaves_the_previous_file_whole(which, tmp_path, monkeypatch):
    """The PNG was written in place: Ctrl-C while it was written left a truncated image over the good one."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    plot = dict(_plotters())[which]
    path = tmp_path / "plot.png"
    plot(str(path))
    good = path.read_bytes()
    assert good.startswith(b"\x89PNG")

    def interrupted(self: Any, fname: Any, **kwargs: Any) -> None:
        with open(fname, "wb") as fh:
            fh.write(good[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        plot(str(path))
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["plot.png"]  # no temporary file left either


def test_a_plot_takes_the_format_its_extension_names(tmp_path):
    pytest.importorskip("matplotlib")
    plot = dict(_plotters())["compare"]
    plot(str(tmp_path / "plot.svg"))
    plot(str(tmp_path / "plot"))  # none: PNG, at the path given (not "plot.png")
    assert b"<svg" in (tmp_path / "plot.svg").read_bytes()[:1000]
    assert (tmp_path / "plot").read_bytes().startswith(b"\x89PNG")
    assert sorted(os.listdir(tmp_path)) == ["plot", "plot.svg"]


def _no_testbed(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("a testbed was built")


# -- 4. absurd delays and trace gaps, refused before any namespace ----------------------------------------------
@pytest.mark.parametrize("command", ["compare", "up", "kv", "swiftqueue"])
@pytest.mark.parametrize("delay", ["1e9", "4000.5", "-1"])
def test_the_testbed_commands_refuse_an_absurd_delay_as_they_parse_it(command, delay, capsys):
    """`--delay-ms 1e9` built the namespaces and failed ~30 s later with "no answer before the deadline"."""
    from tokenwire.daemon.cli import build_parser

    with pytest.raises(SystemExit) as info:  # the parser alone: a delay accepted would otherwise run the command
        build_parser().parse_args(["testbed", command, "--down-trace", "12mbps", "--delay-ms", delay])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --delay-ms: {delay}: the one-way delay is 0 to {cli.MAX_DELAY_MS:g} ms" in err


def test_the_largest_delay_is_accepted_and_nan_is_still_not_a_number(capsys):
    from tokenwire.daemon.cli import build_parser

    args = build_parser().parse_args(["testbed", "compare", "--down-trace", "12mbps", "--delay-ms", "4000"])
    assert args.delay_ms == cli.MAX_DELAY_MS
    with pytest.raises(SystemExit):
        build_parser().parse_args(["testbed", "compare", "--down-trace", "12mbps", "--delay-ms", "nan"])
    assert "expected a finite number" in capsys.readouterr().err


def test_the_bound_is_the_commands_not_the_emulators():
    """`demo` and `bench emulator` build testbeds with delays up to their own 10 s bound."""
    DirectionConfig("12mbps", 10_000.0).validate()


def test_a_trace_with_a_gap_no_run_survives_is_refused(tmp_path, monkeypatch, capsys):
    """One delivery opportunity per 10 minutes ran ~32 s and failed with "no answer before the deadline"."""
    gap = tmp_path / "gap.trace"
    gap.write_text("600000\n")
    with pytest.raises(TraceError, match=r"600 s without a delivery opportunity, at most 30 s"):
        emulator.check_trace_gaps(str(gap))
    inner = tmp_path / "inner.trace"
    inner.write_text("1\n2\n40003\n40004\n")  # a gap between two opportunities
    with pytest.raises(TraceError, match=r"40\.001 s without"):
        emulator.check_trace_gaps(str(inner))
    with pytest.raises(TraceError, match=r"30\.076 s without"):  # a fixed rate below 400 bit/s has them too
        emulator.check_trace_gaps("399bps")


@pytest.mark.parametrize("command", ["compare", "up", "kv"])
@pytest.mark.parametrize("option", ["--down-trace", "--up-trace"])
def test_the_testbed_commands_refuse_a_gap_no_run_survives_before_building_anything(command, option, tmp_path,
                                                                                      monkeypatch, capsys):
    gap = tmp_path / "gap.trace"
    gap.write_text("600000\n")
    monkeypatch.setattr(netns, "check_root", lambda: None)
    monkeypatch.setattr(topology.Testbed, "__init__", _no_testbed)
    paths = {"--down-trace": "12mbps", "--up-trace": "12mbps", option: str(gap)}
    assert main(["testbed", command, *(w for kv in paths.items() for w in kv)]) == 2
    err = capsys.readouterr().err
    assert f"{gap}: 600 s without a delivery opportunity" in err and len(err.strip().splitlines()) == 1


def test_gaps_up_to_the_limit_and_the_shared_cellular_traces_are_accepted(tmp_path):
    edge = tmp_path / "edge.trace"
    edge.write_text(f"{emulator.MAX_TRACE_GAP_MS}\n")
    emulator.check_trace_gaps(str(edge))
    emulator.check_trace_gaps("400bps")
    for path in glob.glob("/work/shared/traces/*.down") + glob.glob("/work/shared/traces/*.up"):
        emulator.check_trace_gaps(path)  # (their longest gap: 11.6 s)
    DirectionConfig("399bps").validate()  # demo and library callers: their own bounds


# -- 5. the emulator's owner dies under a reply ------------------------------------------------------------------
def test_the_emulator_stops_quietly_when_its_owner_is_gone_before_a_reply(tmp_path):
    """The BrokenPipeError of reply() escaped: "Task exception was never retrieved" and a traceback on stderr."""
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(2)]
    cfg = EmulatorConfig(down=DirectionConfig("12mbps"), up=DirectionConfig("12mbps")).to_json()
    fds = [pairs[0][0].fileno(), pairs[1][0].fileno()]
    err = tmp_path / "emulator.stderr"
    try:
        with open(err, "w") as err_fh:
            proc = subprocess.Popen([sys.executable, "-m", "tokenwire.testbed.emulator", cfg, *map(str, fds)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err_fh, pass_fds=fds,
                                    env={**os.environ, "TOKENWIRE_EMULATOR_RT": "0"})
        assert proc.stdin is not None and proc.stdout is not None
        assert json.loads(proc.stdout.readline())["ready"]
        proc.stdout.close()  # the owner's end: gone, as when it is killed
        proc.stdin.write(b"stats\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0  # it stops (the next command would never come)
        proc.stdin.close()
    finally:
        for a, b in pairs:
            a.close()
            b.close()
    assert err.read_text() == ""


# -- 6. a progress line for large traces --------------------------------------------------------------------------
def test_a_large_trace_is_announced_once_on_stderr(tmp_path, monkeypatch, capsys):
    big, small = tmp_path / "big.trace", tmp_path / "small.trace"
    big.write_text("1\n" * 1000)
    small.write_text("1\n")
    monkeypatch.setattr(cli, "LARGE_TRACE_BYTES", 1000)
    cli.note_large_traces(str(big), str(big), str(small), "12mbps", None, str(tmp_path / "missing"))
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"reading trace {big} (0 MB)...\n"


def test_compare_announces_a_large_trace_before_parsing_it(tmp_path, monkeypatch, capsys):
    """A 20-million-line trace: nothing printed for 18-26 s before "[1/1]"."""
    big = tmp_path / "big.trace"
    big.write_text("1\n" * 1000)
    monkeypatch.setattr(cli, "LARGE_TRACE_BYTES", 1000, raising=False)
    monkeypatch.setattr(netns, "check_root", lambda: None)
    monkeypatch.setattr(topology.Testbed, "__init__", _no_testbed)
    assert main(["testbed", "compare", "--down-trace", str(big), "--tokens", "0"]) == 2  # stopped after it
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"reading trace {big} (0 MB)..." and "--tokens" in err[1]


# -- 7. the testbed's --seed takes what predictor collect takes -------------------------------------------------
@pytest.mark.parametrize("command", ["compare", "up", "kv", "swiftqueue"])
def test_the_testbed_seed_is_an_integer_from_0_like_predictor_collect(command, capsys):
    from tokenwire.daemon.cli import build_parser

    parser = build_parser()  # the parser alone: a seed accepted would otherwise run the command
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["testbed", command, "--down-trace", "12mbps", "--seed", "-1"])
    assert info.value.code == 2
    assert "--seed: -1 is negative; seeds are integers >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["predictor", "collect", "--seed", "-1"])
    assert "--seed: -1 is negative; seeds are integers >= 0" in capsys.readouterr().err
    assert parser.parse_args(["testbed", command, "--down-trace", "12mbps", "--seed", "0"]).seed == 0


# -- 8. a SIGTERM'd emulator exits quietly, and says it was terminated ------------------------------------------
def _start_emulator(err_fh: Any, pairs: list[tuple[socket.socket, socket.socket]],
                    *python_flags: str) -> subprocess.Popen:
    cfg = EmulatorConfig(down=DirectionConfig("12mbps"), up=DirectionConfig("12mbps")).to_json()
    fds = [pairs[0][0].fileno(), pairs[1][0].fileno()]
    proc = subprocess.Popen([sys.executable, *python_flags, "-m", "tokenwire.testbed.emulator", cfg, *map(str, fds)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err_fh, pass_fds=fds,
                            env={**os.environ, "TOKENWIRE_EMULATOR_RT": "0"})
    assert proc.stdout is not None
    assert json.loads(proc.stdout.readline())["ready"]
    return proc


@pytest.mark.parametrize("how", ["SIGTERM", "stop"])
def test_a_stopped_or_terminated_emulator_leaves_nothing_on_stderr(how, tmp_path):
    """SIGTERM mid-run (the owner's control pipe still open): the control task was left pending at loop.close(),
    and "Task was destroyed but it is pending!" on the emulator's stderr became compare's reason for its exit
    ("link emulator exited (status 0) ...: task: <Task pending ...>"). It now exits by SIGTERM (status -15,
    "killed by SIGTERM" in the owner's error) after the same clean shutdown; a normal `stop` still exits 0.
    ResourceWarnings shown: the stdin pipe transport was never closed ("unclosed transport")."""
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(2)]
    err = tmp_path / "emulator.stderr"
    try:
        with open(err, "w") as err_fh:
            proc = _start_emulator(err_fh, pairs, "-W", "always::ResourceWarning")
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"origin\n")  # a command answered first, as in a run
        proc.stdin.flush()
        assert "origin" in json.loads(proc.stdout.readline())
        if how == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
        else:
            proc.stdin.write(b"stop\n")
            proc.stdin.flush()
        status = proc.wait(timeout=60)  # stdin still open: the pipe's EOF does not end it
        final = json.loads(proc.stdout.readline())
        proc.stdin.close()
        proc.stdout.close()
    finally:
        for a, b in pairs:
            a.close()
            b.close()
    assert final["stopped"] is True  # its final stats, in either case
    assert err.read_text() == ""
    assert status == (-signal.SIGTERM if how == "SIGTERM" else 0)


@needs_root
def test_a_testbeds_emulator_terminated_mid_run_leaves_no_false_cause(tmp_path, monkeypatch):
    """Through a real testbed: the owner's error ends with the emulator's last stderr line (emulator_failure),
    which was the asyncio task line; and the teardown after it still removes the namespaces."""
    monkeypatch.setattr(netns, "STATE_DIR", str(tmp_path / "state"))
    run_id = f"tw5b1b{secrets.token_hex(1)}"  # (this file's prefix: tw5b1b)
    err = tmp_path / "emulator.stderr"
    with topology.Testbed(EmulatorConfig(), run_id=run_id, backend="userspace", emulator_stderr=str(err)) as tb:
        assert tb.emulator is not None
        tb.origin()
        tb.emulator.send_signal(signal.SIGTERM)
        assert tb.emulator.wait(timeout=60) == -signal.SIGTERM
        assert tb.emulator_failure() == "" and err.read_text() == ""
    assert not any(netns.netns_exists(ns) for ns in (tb.server_ns, tb.client_ns))


# -- 9. `status` and `down` agree about a run whose state file cannot be read -------------------------------------
def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def test_status_shows_a_live_run_with_an_unreadable_state_file_as_running(fake_host, capsys):
    """The owner is alive and provably the writer (pid and start time): `status` said "CRASHED (clean with
    `tokenwire testbed down`)" from list_runs' owner pid 0, and `down` then said "nothing to clean up"."""
    owner = _sleeper()
    try:
        (fake_host.state / "tw5b1b01.json").write_text(json.dumps(
            {"run_id": "tw5b1b01", "owner_pid": owner.pid, "owner_start": netns.start_time(owner.pid),
             "namespaces": [], "newer_key": 1, "info": {}}))
        (fake_host.ns / "tw5b1b01-srv").write_text("")

        assert cli.cmd_status(argparse.Namespace(json=False)) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == "tw5b1b01  running  backend userspace  namespaces tw5b1b01-srv"
        assert lines[1].startswith("    its state file cannot be read (TypeError: ")
        assert lines[2] == f"    its owner, pid {owner.pid}, is alive: `tokenwire testbed down tw5b1b01` stops it"
        assert cli.cmd_status(argparse.Namespace(json=True)) == 0
        [run] = json.loads(capsys.readouterr().out)
        assert run["owner_alive"] is True and run["owner_pid"] == owner.pid and run["unreadable_state"]

        assert cli.cmd_down(argparse.Namespace(run_ids=[], all=False)) == 0  # agrees: a live run, left alone
        assert capsys.readouterr().out == "nothing to clean up\n" and owner.poll() is None
    finally:
        owner.kill()
        owner.wait()


def test_status_shows_an_unreadable_run_without_a_provable_owner_as_crashed_and_down_cleans_it(fake_host, capsys):
    """The other side of the agreement: a pid without its start time is no proof of a live owner."""
    owner = _sleeper()
    try:
        (fake_host.state / "tw5b1b02.json").write_text(json.dumps(
            {"run_id": "tw5b1b02", "owner_pid": owner.pid, "newer_key": 1}))
        assert cli.cmd_status(argparse.Namespace(json=False)) == 0
        out = capsys.readouterr().out
        assert out.startswith("tw5b1b02  CRASHED (clean with `tokenwire testbed down`)") and "owner" not in out
        assert cli.cmd_down(argparse.Namespace(run_ids=[], all=False)) == 0
        assert capsys.readouterr().out.startswith("tw5b1b02: its state file could not be read")
        assert owner.poll() is None  # cleaned, its pid never signalled
    finally:
        owner.kill()
        owner.wait()


@pytest.mark.parametrize("owner_start", ["wrong", "missing", "a string"])
@pytest.mark.parametrize("how", ["by id", "--all"])
def test_down_never_signals_a_live_pid_an_unreadable_state_file_names_without_its_start_time(owner_start, how,
                                                                                           fake_host, capsys):
    """`down ID` and `down --all` SIGTERM (then SIGKILL) a live owner: a corrupted file's bare pid, or one whose
    start time is not that process's, may belong to anybody and must not be taken for the owner. (The mutant
    `_uint(started) and same_process(pid, started)` -> `True` in netns._salvaged killed this process.)"""
    proc = _sleeper()
    try:
        fields: dict[str, Any] = {"run_id": "tw5b1b03", "owner_pid": proc.pid, "newer_key": 1}
        started = netns.start_time(proc.pid)
        assert started is not None
        if owner_start == "wrong":
            fields["owner_start"] = started + 1
        elif owner_start == "a string":
            fields["owner_start"] = str(started)
        (fake_host.state / "tw5b1b03.json").write_text(json.dumps(fields))
        (fake_host.ns / "tw5b1b03-srv").write_text("")

        args = argparse.Namespace(run_ids=["tw5b1b03"] if how == "by id" else [], all=how == "--all")
        assert cli.cmd_down(args) == 0
        out = capsys.readouterr().out
        assert out.startswith("tw5b1b03: its state file could not be read") and "namespace tw5b1b03-srv" in out
        assert os.listdir(fake_host.ns) == [] and os.listdir(fake_host.state) == []
        assert proc.poll() is None  # still alive: never signalled
    finally:
        proc.kill()
        proc.wait()


# -- 10. SIGTERM takes the Ctrl-C path from a command's start, the parse of its traces included ------------------
_PARSING_COMMANDS = {
    "up": ["testbed", "up"],
    "compare": ["testbed", "compare", "--tokens", "10"],
    "kv": ["testbed", "kv", "--virtual"],
    "swiftqueue": ["testbed", "swiftqueue", "--virtual", "--seconds", "5"],
}


def _writer_once_read(fifo: Path, proc: subprocess.Popen) -> int:
    """The write end of ``fifo``, opened once ``proc`` opened it to read (its trace parse has begun, and blocks
    while this end is open and silent); a command that exits first fails the test with its output, not a hang."""
    opened: list[int] = []
    opener = threading.Thread(target=lambda: opened.append(os.open(fifo, os.O_WRONLY)), daemon=True)
    opener.start()
    while opener.is_alive():
        opener.join(0.1)
        if opener.is_alive() and proc.poll() is not None:
            unblock = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # (lets the opener's open return)
            opener.join()
            os.close(unblock)
            os.close(opened[0])
            out, err = proc.communicate()
            pytest.fail(f"exited ({proc.returncode}) before it read its trace: {out}{err}")
    return opened[0]


@pytest.mark.parametrize("command", list(_PARSING_COMMANDS))
def test_sigterm_while_a_command_parses_its_trace_says_interrupted_and_exits_130(command, tmp_path):
    """SIGTERM while `reading trace F (N MB)...` was on the screen killed `up`, `compare` and `swiftqueue` outright
    (status 143, not a word), where Ctrl-C said "interrupted" (130): their handlers took SIGTERM over only after
    the path's checks, which parse the traces. The trace here is a FIFO, so the command sits in that parse for
    as long as this test holds the FIFO's write end: the signal lands there, whatever the host's speed."""
    fifo = tmp_path / "trace.fifo"
    os.mkfifo(fifo)
    env = {**os.environ, "TOKENWIRE_TESTBED_STATE": str(tmp_path / "state")}  # (nothing gets that far)
    argv = [sys.executable, "-m", "tokenwire.daemon.cli", *_PARSING_COMMANDS[command], "--down-trace", str(fifo)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        writer = _writer_once_read(fifo, proc)
        try:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=120)
        finally:
            os.close(writer)  # (only now: an end of file earlier is an empty trace, an error of its own)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert (proc.returncode, err.strip().splitlines()[-1:]) == (130, ["interrupted"]), (proc.returncode, out, err)
    assert not (tmp_path / "state").exists()


class _AtTheChecks(Exception):
    pass


@pytest.mark.parametrize("words", [["up"], ["compare", "--down-trace", "1mbps"],
                                   ["kv", "--virtual", "--down-trace", "1mbps"],
                                   ["swiftqueue", "--virtual", "--down-trace", "1mbps"]])
def test_the_path_checks_of_every_command_documented_to_take_sigterm_as_ctrl_c_run_under_it(words, monkeypatch):
    """The same, in-process and for every such command: at its path's checks (where the traces are parsed)
    SIGTERM and SIGINT already unwind like Ctrl-C, and the handlers are given back once the command is done."""
    from tokenwire.daemon.cli import build_parser

    seen: list[tuple[Any, Any]] = []

    def at_the_checks(*args: Any) -> None:
        seen.append((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)))
        raise _AtTheChecks

    monkeypatch.setattr(cli, "check_path", at_the_checks)  # (`up` reaches it through emulator_config)
    args = build_parser().parse_args(["testbed", *words])
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(_AtTheChecks):
        args.handler(args)
    assert seen == [(cli._interrupt, cli._interrupt)]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


# -- 11. `status` of a run whose state file names no addresses ----------------------------------------------------
def test_status_says_unknown_for_addresses_a_state_file_does_not_name(fake_host, capsys):
    """A hand-made (or older) state file with a run id and a pid: the line read "server None  client None"."""
    (fake_host.state / "tw5c5c01.json").write_text(json.dumps({"run_id": "tw5c5c01", "owner_pid": 1}))
    (fake_host.state / "tw5c5c02.json").write_text(json.dumps(
        {"run_id": "tw5c5c02", "owner_pid": 1, "info": {"server_addr": "10.213.0.1"}}))
    assert cli.cmd_status(argparse.Namespace(json=False)) == 0
    out = capsys.readouterr().out
    assert "None" not in out
    lines = out.splitlines()
    assert lines[0].startswith("tw5c5c01  CRASHED") and lines[1] == "    server unknown  client unknown"
    assert lines[2].startswith("tw5c5c02  CRASHED") and lines[3] == "    server 10.213.0.1  client unknown"
    assert cli.cmd_status(argparse.Namespace(json=True)) == 0
    first, second = json.loads(capsys.readouterr().out)  # (JSON keeps null: "not known" to a program)
    assert first["server_addr"] is None and second["server_addr"] == "10.213.0.1" and second["client_addr"] is None


def test_status_skips_link_counters_not_in_the_shape_the_testbed_writes(fake_host, capsys):
    """A hand-made or damaged state file's ``info.stats`` ({"down": 1}) was a KeyError traceback in ``status``."""
    for n, stats in enumerate(({"down": 1}, [1, 2], "x", {"down": {}, "up": {}})):
        (fake_host.state / f"tw5c5d0{n}.json").write_text(json.dumps(
            {"run_id": f"tw5c5d0{n}", "owner_pid": 1, "info": {"stats": stats}}))
    good = {"delivered_packets": 5, "lost_packets": 1, "tail_drops": 2, "aqm_drops": 3}
    (fake_host.state / "tw5c5d09.json").write_text(json.dumps(
        {"run_id": "tw5c5d09", "owner_pid": 1, "info": {"stats": {"down": good, "up": good}}}))
    assert cli.cmd_status(argparse.Namespace(json=False)) == 0
    out = capsys.readouterr().out
    assert out.count("CRASHED") == 5
    assert [ln.strip() for ln in out.splitlines() if "delivered" in ln] == [
        "down: 5 pkts delivered, 1 lost, 5 dropped; up: 5 delivered, 1 lost, 5 dropped"]


# -- 12. docs/testbed.md's synopses name every option the commands take -------------------------------------------
def _synopses() -> dict[str, str]:
    """The ``tokenwire testbed CMD ...`` synopses of docs/testbed.md's Commands block, continuation lines joined."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "testbed.md").read_text()
    block = text.split("## Commands", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    out: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        if line.startswith("tokenwire testbed "):
            current = line.split()[2]
            out[current] = line
        elif line.startswith(" ") and current is not None:
            out[current] += line
        else:
            current = None
    return out


@pytest.mark.parametrize("command", ["up", "status", "down", "compare"])
def test_the_docs_synopsis_of_each_testbed_command_names_every_option_of_its_help(command):
    """`up`'s left out `--backend {auto,userspace,kernel}`, which `up --help` shows."""
    from tokenwire.daemon.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    testbed = sub.choices["testbed"]
    tsub = next(a for a in testbed._actions if isinstance(a, argparse._SubParsersAction))
    cmd = tsub.choices[command]
    options = {opt for a in cmd._actions if a.help is not argparse.SUPPRESS for opt in a.option_strings
               if opt.startswith("--") and opt != "--help"}
    documented = set(re.findall(r"--[a-z][a-z0-9-]*", _synopses()[command]))
    assert options - documented == set(), f"docs/testbed.md's `testbed {command}` synopsis lacks them"
    backend = next((a for a in cmd._actions if "--backend" in a.option_strings), None)
    if backend is not None:  # and with the choices the parser takes
        assert "--backend " + "|".join(backend.choices) in _synopses()[command]


# -- 13. `up --detach` lets go of the run it leaves running ------------------------------------------------------
FAKE_DETACHED_UP = r"""
import json, os, sys, time
run_id, state_dir, exit_status = sys.argv[1], sys.argv[2], int(sys.argv[3])
if exit_status >= 0:  # a child that fails before its state
    sys.exit(exit_status)
st = {"run_id": run_id, "owner_pid": os.getpid(), "namespaces": [], "backend": "kernel",
      "info": {"run_id": run_id, "backend": "kernel", "server_ns": run_id + "-srv", "client_ns": run_id + "-cli",
               "server_addr": "10.213.0.1", "client_addr": "10.213.0.2", "ready": True}}
path = os.path.join(state_dir, run_id + ".json")
with open(path + ".tmp", "w") as fh:
    json.dump(st, fh)
os.replace(path + ".tmp", path)  # (whole, as RunState.save writes it: the launcher reads it meanwhile)
print("fake up running", flush=True)
time.sleep(120)
"""


def _detach_args(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exit_status: int = -1) -> tuple[Any, Path]:
    from tokenwire.daemon.cli import build_parser

    state = tmp_path / "state"
    monkeypatch.setattr(netns, "STATE_DIR", str(state))
    monkeypatch.setattr(netns, "check_root", lambda: None)  # --detach checks root before it starts its child
    monkeypatch.setattr(cli, "_detach_argv", lambda args, run_id: [
        sys.executable, "-c", FAKE_DETACHED_UP, run_id, str(state), str(exit_status)])
    return build_parser().parse_args(["testbed", "up", "--detach", "--json"]), state


def test_up_detach_leaves_its_run_up_without_a_subprocess_still_running_warning(tmp_path, monkeypatch, capsys):
    """The launcher dropped the Popen of the child it leaves running: "ResourceWarning: subprocess N is still
    running" in every in-process caller (`pytest --leak-check` flagged two tests of test_testbed_units)."""
    import gc
    import warnings

    args, state = _detach_args(tmp_path, monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        assert cli.cmd_up(args) == 0
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
    info = json.loads(capsys.readouterr().out)
    pid = json.loads((state / f"{info['run_id']}.json").read_text())["owner_pid"]
    try:  # up, as --detach means: running, in its own session, stdin /dev/null, output into its log
        assert netns.pid_alive(pid) and os.getsid(pid) == pid
        assert os.readlink(f"/proc/{pid}/fd/0") == os.devnull
        log = str(state / f"{info['run_id']}.log")
        assert os.readlink(f"/proc/{pid}/fd/1") == os.readlink(f"/proc/{pid}/fd/2") == log
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)  # (a caller that stops the run reaps it: it is still this process's child)


@pytest.mark.parametrize("exit_status", [0, 3])
def test_up_detach_reports_the_exit_status_of_a_child_that_fails_before_its_state(exit_status, tmp_path,
                                                                                  monkeypatch):
    """The child's exit status in the error; nothing is left behind."""
    from tokenwire.daemon.cli import CLIError

    args, state = _detach_args(tmp_path, monkeypatch, exit_status)
    with pytest.raises(CLIError, match=f"^testbed failed to start: exit status {exit_status}$"):
        cli.cmd_up(args)
    assert list(state.iterdir()) == []


STUBBORN_UP = r"""
import json, os, signal, sys, time
run_id, state_dir = sys.argv[1:3]
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # before its state: the launcher's step limit starts with that
path = os.path.join(state_dir, run_id + ".json")
with open(path + ".tmp", "w") as fh:
    json.dump({"run_id": run_id, "owner_pid": os.getpid(), "namespaces": []}, fh)
os.replace(path + ".tmp", path)
time.sleep(120)
"""


def test_up_detach_kills_and_reaps_a_child_that_ignores_sigterm(tmp_path, monkeypatch):
    """The SIGKILL path of stopping a child that does not come up: killed once DETACH_STOP_S passed, reaped (no
    zombie of this process), its state and log removed."""
    from tokenwire.daemon.cli import CLIError

    args, state = _detach_args(tmp_path, monkeypatch)
    stopped: list[tuple[int, int | None]] = []
    monkeypatch.setattr(cli, "_detach_argv", lambda args, run_id: [sys.executable, "-c", STUBBORN_UP, run_id,
                                                                   str(state)])
    real_stop = cli._stop_child

    def stop(proc: Any, path: str) -> None:
        real_stop(proc, path)
        stopped.append((proc.pid, proc.returncode))

    monkeypatch.setattr(cli, "_stop_child", stop)
    monkeypatch.setattr(cli, "DETACH_STEP_S", 0.2)
    monkeypatch.setattr(cli, "DETACH_STOP_S", 0.2)
    with pytest.raises(CLIError, match="still building the namespaces"):
        cli.cmd_up(args)
    [(pid, status)] = stopped
    assert status == -signal.SIGKILL  # (SIGTERM, ignored, then SIGKILL)
    with pytest.raises(ChildProcessError):  # reaped already: no zombie left for this process
        os.waitpid(pid, os.WNOHANG)
    assert list(state.iterdir()) == []
