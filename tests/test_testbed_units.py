"""Non-root pieces of the testbed: spec parsing, packet-log flows, the per-seed base delay, the CLI surface."""

import math
import os
import shutil
import subprocess
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP

from tokenwire.testbed.compare import CompareConfig, SchemeRun, finalize, path_base_delay, union_oracle
from tokenwire.testbed.pktlog import flow_of
from tokenwire.testbed.topology import link_subnet
from tokenwire.testbed.traffic import parse_cross


def test_cross_traffic_specs():
    assert parse_cross("tcp:cubic") == ("tcp", "cubic")
    assert parse_cross("UDP-ECT1:2mbps") == ("udp-ect1", "2mbps")
    for bad in ("tcp:vegas", "udp-ect1:fast", "icmp:1", "udp-ect1:1e9mbps", "onoff-ect1:1e9mbps:100:100"):
        with pytest.raises(ValueError, match="cross traffic"):
            parse_cross(bad)


def test_flow_of_reads_ports():
    assert flow_of(bytes(IP() / TCP(sport=1234, dport=8443))) == (6, 1234, 8443)
    assert flow_of(bytes(IP(ihl=6, options=b"\x01\x01\x01\x01") / UDP(sport=7, dport=9))) == (17, 7, 9)
    assert flow_of(None) == ("", "", "")


def test_link_subnets_are_private_30s_inside_the_pool():
    nets = {str(link_subnet(f"tw{i:06x}")) for i in range(0, 0xFFFFFF, 0x10001)}
    assert all(n.startswith("10.213.") and n.endswith("/30") for n in nets)


def test_compare_config_validation():
    CompareConfig(down_trace="12mbps", up_trace="12mbps").validate()
    with pytest.raises(ValueError, match="unknown scheme"):
        CompareConfig(down_trace="12mbps", up_trace="12mbps", schemes=["quic-magic"]).validate()
    with pytest.raises(ValueError):
        CompareConfig(down_trace="12mbps", up_trace="12mbps", tokens=0).validate()
    with pytest.raises(ValueError, match="cross traffic"):
        CompareConfig(down_trace="12mbps", up_trace="12mbps", cross=["tcp:vegas"]).validate()


def _run(gen, render, deliveries, origin=0.0):
    return SchemeRun(
        scheme="x",
        seed=0,
        origin=origin,
        request_time=0.0,
        request_arrival=0.0,
        gen=gen,
        render=render,
        text_ok=True,
        wire_bytes=1000,
        down_packets=len(deliveries),
        down_lost=0,
        deliveries=deliveries,
        lost_times=[],
        emulator={},
        base_delay=0.040,
    )


def test_base_delay_is_shared_per_seed_and_never_below_the_configured_delay():
    a = _run([0.0, 0.1, 0.2], [0.0415, 0.1425, 0.30], [(0.0, 0.0415), (0.1, 0.1425), (0.2, 0.30)])
    b = _run([0.0, 0.1, 0.2], [0.0430, 0.1430, 0.2430], [(0.0, 0.043), (0.1, 0.143), (0.2, 0.243)])
    assert path_base_delay([a, b], 0.040) == pytest.approx(0.0415)
    assert path_base_delay([a, b], 0.050) == 0.050
    finalize([a, b])
    assert a.base_delay == b.base_delay == pytest.approx(0.0415)
    # a: token 1 is 1 ms and token 2 58.5 ms late; b: every token 1.5 ms over the base
    assert a.stats.stall_ratio == pytest.approx((0.001 + 0.0585) / (0.30 - 0.0415), rel=1e-6)
    assert b.stats.stall_ratio < a.stats.stall_ratio
    assert a.stats.bytes_per_token == pytest.approx(1000 / 3)
    # the union oracle may use b's packets for a's tokens: never worse than either scheme's own oracle
    assert union_oracle([a, b]) <= min(a.oracle_stall_ratio, b.oracle_stall_ratio) + 1e-12
    assert not math.isnan(union_oracle([a, b]))


def test_cli_lists_the_testbed_commands():
    from tokenwire.daemon.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["testbed", "compare", "--down-trace", "12mbps", "--schemes", "sse-tcp"])
    assert args.handler.__name__ == "cmd_compare" and args.tokens == 400 and args.queue.startswith("droptail")
    args = parser.parse_args(["bench", "emulator", "--seconds", "1"])
    assert args.handler.__name__ == "cmd_bench"
    with pytest.raises(SystemExit):
        parser.parse_args(["testbed", "up", "--up-trace", "x", "--up-mbps", "3"])  # mutually exclusive


def test_sigterm_dropped_by_python_is_raised_again():
    """A SIGTERM that lands in an at-fork hook or a ``__del__`` has its KeyboardInterrupt dropped by Python
    ("Exception ignored"); the run must still unwind (it went on streaming with its namespaces up before)."""
    import os
    import signal
    import sys
    import time

    from tokenwire.testbed.cli import sigterm_as_ctrl_c

    class SignalledInDel:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler's exception cannot leave __del__

    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGALRM), sys.unraisablehook)
    unraisable = []
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt), sigterm_as_ctrl_c():
        quiet = sys.unraisablehook  # the block's: drops interrupts silently; record what reaches it
        sys.unraisablehook = lambda u: (unraisable.append(u.exc_type), quiet(u))
        SignalledInDel()  # dropped at once
        assert unraisable == [KeyboardInterrupt]  # Python did drop the first one
        while time.monotonic() - started < 10:  # the retry has to interrupt this loop
            time.sleep(0.01)
    assert time.monotonic() - started < 5
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGALRM), sys.unraisablehook) == before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_sigterm_during_the_teardown_does_not_interrupt_it():
    """Once the run unwinds, a second SIGTERM (or the retry timer) must not break the teardown, even while the
    teardown handles an exception of its own (a process already gone, say)."""
    import os
    import signal

    from tokenwire.testbed.cli import sigterm_as_ctrl_c

    finished = []
    with pytest.raises(KeyboardInterrupt), sigterm_as_ctrl_c():
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the first one: unwinds
            for _ in range(10_000_000):  # (the handler runs before this loop gets far)
                pass
        finally:
            try:
                raise ProcessLookupError("teardown: the child had already exited")
            except ProcessLookupError:
                os.kill(os.getpid(), signal.SIGTERM)  # a repeat while the teardown handles its own error
                for _ in range(1000):
                    pass
            finished.append(True)
    assert finished == [True]


@pytest.mark.parametrize("signame", ["SIGINT", "SIGHUP"])
def test_a_second_ctrl_c_or_a_hangup_during_the_teardown_does_not_interrupt_it(signame):
    """Ctrl-C twice in quick succession: Python's own SIGINT handler raised inside the teardown of the first
    and left the namespaces behind; a closed terminal (SIGHUP) killed the run without any teardown."""
    import os
    import signal

    from tokenwire.testbed.cli import sigterm_as_ctrl_c

    sig = getattr(signal, signame)
    before = signal.getsignal(sig)
    signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    try:
        finished = []
        with pytest.raises(KeyboardInterrupt), sigterm_as_ctrl_c():
            try:
                os.kill(os.getpid(), sig)  # the first: unwinds (SIGHUP's default would have killed us)
                for _ in range(10_000_000):
                    pass
            finally:
                os.kill(os.getpid(), sig)  # the second, during the teardown
                for _ in range(1000):
                    pass
                finished.append(True)
        assert finished == [True]
    finally:
        signal.signal(sig, before)


def test_an_ignored_hangup_stays_ignored():
    """nohup: the run must outlive its terminal, not unwind on SIGHUP."""
    import signal

    from tokenwire.testbed.cli import sigterm_as_ctrl_c

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with sigterm_as_ctrl_c():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_run_with_an_unreadable_state_file_is_listed_as_crashed_with_its_namespaces(tmp_path, monkeypatch):
    """It was skipped: `status` said "no testbed runs" and `down` "nothing to clean up" over its namespaces."""
    from tokenwire.testbed import netns

    state, ns_dir = tmp_path / "state", tmp_path / "netns"
    state.mkdir()
    ns_dir.mkdir()
    monkeypatch.setattr(netns, "STATE_DIR", str(state))
    monkeypatch.setattr(netns, "NETNS_DIR", str(ns_dir))
    (state / "tw00beef.json").write_text('{"run_id": "tw00be')  # cut short
    (state / "notes.json").write_text("{")  # not a run's: no id to go by
    for name in ("tw00beef-srv", "tw00beef-cli", "tw111111-srv"):
        (ns_dir / name).write_text("")
    (run,) = netns.list_runs()
    assert run.run_id == "tw00beef" and not run.owner_alive
    assert run.namespaces == ["tw00beef-cli", "tw00beef-srv"]
    assert "JSONDecodeError" in run.info["unreadable_state"]


def test_down_removes_a_crashed_runs_temporary_folder_and_nothing_else(tmp_path, monkeypatch, capsys):
    """After SIGKILL a `testbed compare` left its /tmp/tw-compare-* folder (packet logs, results): `testbed
    down` removed the namespaces and the state, not the folder. It goes now, if it is one of ours."""
    import argparse
    import tempfile

    from tokenwire.testbed import cli, netns

    state = tmp_path / "state"
    monkeypatch.setattr(netns, "STATE_DIR", str(state))
    monkeypatch.setattr(netns, "check_root", lambda: None)
    ours = tempfile.mkdtemp(prefix="tw-compare-")
    try:
        (open(os.path.join(ours, "chatterbox.seed0.pktlog.csv"), "w")).close()
        kept = tmp_path / "tw-compare-keep"  # a --keep folder is never recorded; one elsewhere is not ours
        kept.mkdir()
        dead = subprocess.Popen(["true"])
        dead.wait()
        for run_id, scratch in (("tw0000aa", ours), ("tw0000bb", str(kept))):
            st = netns.RunState(run_id, dead.pid, [])
            st.info = {"scratch": scratch}
            st.save()
        assert cli.cmd_down(argparse.Namespace(run_ids=[], all=False)) == 0
        out = capsys.readouterr().out
        assert not os.path.exists(ours) and f"folder {os.path.realpath(ours)}" in out
        assert kept.is_dir() and netns.list_runs() == []
    finally:
        shutil.rmtree(ours, ignore_errors=True)


@pytest.mark.parametrize("other_thread", [False, True])
def test_a_signal_during_namespace_creation_takes_effect_once_it_exists(monkeypatch, other_thread):
    """pyroute2 makes the namespace in a forked child; a SIGTERM while the owner waited for it unwound the run
    first and the child made the namespace after the teardown had looked: a leftover now and then. With
    another thread alive (numpy's), a signal mask would not hold it: the handlers are held instead."""
    import os
    import signal
    import threading
    import time

    from pyroute2 import netns as pr_netns

    from tokenwire.testbed import netns
    from tokenwire.testbed.cli import sigterm_as_ctrl_c

    made = []
    stop = threading.Event()
    if other_thread:  # a thread that does not block the signal: the kernel may deliver it there
        threading.Thread(target=stop.wait, daemon=True).start()

    def create(name):
        if not made:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while "the child" is still at work
        time.sleep(0.05)  # the child at work; the handler would run in between if the signal got through
        made.append(name)

    monkeypatch.setattr(pr_netns, "create", create)
    monkeypatch.setattr(netns, "netns_exists", lambda name: False)
    try:
        with pytest.raises(KeyboardInterrupt), sigterm_as_ctrl_c():
            netns.create_netns("tw000000-srv")
    finally:
        stop.set()
    assert made == ["tw000000-srv"]  # created, then unwound: the teardown finds it and removes it
    with sigterm_as_ctrl_c():
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        netns.create_netns("tw000000-cli")  # no signal: nothing raised, the handlers are back
        assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert made == ["tw000000-srv", "tw000000-cli"]


# -- an endpoint that never connects: one line naming the scheme or policy, exit 2 (was a ChildError traceback)
class _FakeTestbed:
    """Stands in for :class:`Testbed` (no namespaces): the endpoints below never touch it."""

    server_ns, client_ns, server_addr = "tw000000-srv", "tw000000-cli", "10.213.0.1"
    backend, backend_reason = "userspace", ""
    enter_error: Exception | None = None

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        if self.enter_error is not None:
            raise self.enter_error
        return self

    def __exit__(self, *exc):
        return None

    def origin(self):
        return 0.0

    def stats(self):
        return {}


class _FakeEndpoint:
    """The server answers; the client exits before it connects (what `--loss iid:1` does, minus the 30-s wait)."""

    def __init__(self, name):
        self.name = name

    def wait_for(self, key, timeout):
        from tokenwire.testbed.child import ChildError

        if self.name.endswith("client"):
            raise ChildError(f"{self.name} exited (status 1):\n  TimeoutError: no handshake")
        return {key: True}

    def send(self, line):
        pass

    def event(self, deadline):
        return {"done": True}


def test_compare_names_the_scheme_whose_client_never_connects(monkeypatch, tmp_path, capsys):
    from tokenwire.daemon.cli import main
    from tokenwire.testbed import compare, netns

    monkeypatch.setattr(compare, "Testbed", _FakeTestbed)
    monkeypatch.setattr(compare, "_start", lambda tb, ns, role, scheme, *a: _FakeEndpoint(f"{scheme} {role}"))
    cfg = CompareConfig(down_trace="12mbps", up_trace="12mbps", schemes=["sse-tcp"], tokens=5)
    with pytest.raises(compare.CompareError, match=r"^sse-tcp \(seed 0\): sse-tcp client exited"):
        compare.run_scheme("sse-tcp", cfg, 0, str(tmp_path))
    monkeypatch.setattr(netns, "check_root", lambda: None)
    rc = main(["testbed", "compare", "--down-trace", "12mbps", "--delay-ms", "10", "--loss", "iid:1",
               "--schemes", "sse-tcp", "--tokens", "5"])
    err = capsys.readouterr().err
    assert rc == 2 and "\ntokenwire testbed compare: error: sse-tcp (seed 0): sse-tcp client exited" in err, err
    assert "Traceback" not in err


def test_swiftqueue_names_the_policy_whose_client_never_connects(monkeypatch, capsys):
    from tokenwire.daemon.cli import main
    from tokenwire.testbed import netns, swiftqueue_netns
    from tokenwire.testbed.swiftqueue_eval import SwiftQueueConfig

    monkeypatch.setattr(swiftqueue_netns, "Testbed", _FakeTestbed)
    monkeypatch.setattr(swiftqueue_netns, "_endpoint", lambda tb, role, policy, *a: _FakeEndpoint(f"{policy} {role}"))
    monkeypatch.setattr(netns, "check_root", lambda: None)
    argv = ["testbed", "swiftqueue", "--down-trace", "12mbps", "--loss", "iid:1", "--policies", "classic",
            "--seconds", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "tokenwire testbed swiftqueue: error: classic: classic client exited" in err and "Traceback" not in err, err
    # a testbed that fails to come up is named by its policy too
    monkeypatch.setattr(_FakeTestbed, "enter_error", netns.TestbedError("emulator exited (status 1)"))
    cfg = SwiftQueueConfig(down_trace="12mbps", policies=["l4s"], seconds=2)
    with pytest.raises(swiftqueue_netns.SwiftQueueRunError, match=r"^l4s: testbed: emulator exited"):
        swiftqueue_netns.run_netns_policy(cfg, "l4s", "/nonexistent")


def test_swiftqueue_refuses_a_queue_without_an_l_queue(monkeypatch, capsys):
    """Through drop-tail the policies' choice changes nothing, yet the table reported an "L share"."""
    from tokenwire.daemon.cli import main
    from tokenwire.testbed import netns, swiftqueue_netns

    def must_not_run(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(netns, "check_root", lambda: None)
    monkeypatch.setattr(swiftqueue_netns, "run_netns_all", must_not_run)
    for queue in ("droptail:packets=100", "infinite"):
        assert main(["testbed", "swiftqueue", "--down-trace", "12mbps", "--queue", queue, "--seconds", "2"]) == 2
        assert "needs a DualQ queue" in capsys.readouterr().err


# -- `up --detach`: the background child is stopped when the launcher gives up or is interrupted
FAKE_UP = r"""
import json, os, signal, sys, time
mark, mode, run_id = sys.argv[1:4]
def term(*_):
    with open(mark, "a") as fh:
        fh.write("terminated\n")
    sys.exit(130)
signal.signal(signal.SIGTERM, term)
with open(mark, "a") as fh:
    fh.write(f"pid {os.getpid()}\n")
if mode == "interrupt":
    os.kill(os.getppid(), signal.SIGINT)  # Ctrl-C at the launcher while it waits
if mode in ("slow", "stall", "kernel"):
    from tokenwire.testbed.netns import RunState, start_time
    if mode == "slow":
        time.sleep(0.8)  # parsing a large trace: no state yet
    st = RunState(run_id, os.getpid(), [])
    if mode == "kernel":  # up on the kernel's qdiscs: no emulator process at all
        st.backend = "kernel"
        st.info = {"run_id": run_id, "backend": "kernel", "server_ns": run_id + "-srv",
                   "client_ns": run_id + "-cli", "server_addr": "10.213.0.1", "client_addr": "10.213.0.2",
                   "ready": True}
    if mode == "slow":  # up: this process plays the emulator as well
        st.emulator_pid, st.emulator_start = os.getpid(), start_time(os.getpid())
        st.info = {"run_id": run_id, "backend": "userspace", "server_ns": run_id + "-srv",
                   "client_ns": run_id + "-cli", "server_addr": "10.213.0.1", "client_addr": "10.213.0.2",
                   "ready": True}
    st.save()
print("fake up running", flush=True)
time.sleep(60)
"""


def _detach(monkeypatch, tmp_path, mode, **limits):
    import sys

    from tokenwire.daemon.cli import build_parser
    from tokenwire.testbed import cli, netns

    state = tmp_path / "state"
    monkeypatch.setattr(netns, "STATE_DIR", str(state))
    monkeypatch.setattr(netns, "check_root", lambda: None)  # --detach checks root before it starts its child
    monkeypatch.setenv("TOKENWIRE_TESTBED_STATE", str(state))  # the fake child's RunState
    mark = tmp_path / "mark"
    monkeypatch.setattr(cli, "_detach_argv", lambda args, run_id: [sys.executable, "-c", FAKE_UP, str(mark), mode,
                                                                   run_id])
    for name, value in limits.items():
        monkeypatch.setattr(cli, name, value)
    args = build_parser().parse_args(["testbed", "up", "--detach", "--json"])
    return args, mark, state


def _fake_pid(mark):
    return int(mark.read_text().split()[1])


@pytest.mark.parametrize(("mode", "limits"), [
    ("parsing", {"DETACH_STEP_S": 0.3, "DETACH_MAX_S": 1.0}),  # parsing has no step limit, only the overall one
    ("stall", {"DETACH_STEP_S": 0.3, "DETACH_MAX_S": 30.0}),  # stuck after its state: the step limit
])
def test_detach_stops_a_child_that_does_not_come_up(monkeypatch, tmp_path, mode, limits):
    """It went on in the background after the launcher's error, and came up later with nobody told."""
    from tokenwire.daemon.cli import CLIError
    from tokenwire.testbed import cli, netns

    args, mark, state = _detach(monkeypatch, tmp_path, mode, **limits)
    with pytest.raises(CLIError) as info:
        cli.cmd_up(args)
    msg = str(info.value)
    step = "parsing its traces" if mode == "parsing" else "building the namespaces"
    assert f"still {step}" in msg and "stopped" in msg and "in the foreground" in msg, msg
    assert "fake up running" in msg  # its last output
    assert mark.read_text().endswith("terminated\n")  # SIGTERM: the child's teardown path
    assert not netns.pid_alive(_fake_pid(mark))  # and waited for
    assert list(state.iterdir()) == []  # neither its log nor (killed without teardown) its state is left


def test_detach_waits_for_a_slow_start_while_the_child_works(monkeypatch, tmp_path, capsys):
    """A large trace took longer than the fixed 20 s to parse: the launcher failed though the child was fine."""
    import json
    import signal

    from tokenwire.testbed import cli

    args, mark, _ = _detach(monkeypatch, tmp_path, "slow", DETACH_STEP_S=0.2, DETACH_MAX_S=30.0)
    try:
        assert cli.cmd_up(args) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["server_ns"].endswith("-srv") and info["client_addr"] == "10.213.0.2"
        assert "terminated" not in mark.read_text()  # up: left running, as --detach means
    finally:
        pid = _fake_pid(mark)
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)


def test_detach_takes_a_kernel_backend_run_as_up_without_an_emulator(monkeypatch, tmp_path, capsys):
    """Readiness asked for a live emulator, which a kernel-backend run does not have: the launcher stopped a
    testbed that was up."""
    import json
    import signal

    from tokenwire.testbed import cli

    args, mark, _ = _detach(monkeypatch, tmp_path, "kernel", DETACH_STEP_S=0.5, DETACH_MAX_S=10.0)
    try:
        assert cli.cmd_up(args) == 0
        assert json.loads(capsys.readouterr().out)["backend"] == "kernel"
        assert "terminated" not in mark.read_text()
    finally:
        pid = _fake_pid(mark)
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)


def test_ctrl_c_while_waiting_for_a_detached_child_stops_it(monkeypatch, tmp_path):
    from tokenwire.testbed import cli, netns

    args, mark, state = _detach(monkeypatch, tmp_path, "interrupt", DETACH_STEP_S=30.0, DETACH_MAX_S=30.0)
    with pytest.raises(KeyboardInterrupt):
        cli.cmd_up(args)
    assert mark.read_text().endswith("terminated\n")
    assert not netns.pid_alive(_fake_pid(mark))
    assert list(state.iterdir()) == []


def test_ctrl_c_just_after_the_detached_child_started_stops_it(monkeypatch, tmp_path):
    """An interrupt between Popen and the wait loop's try (reopening the log) left the child running."""
    import builtins

    from tokenwire.testbed import cli, netns

    args, mark, state = _detach(monkeypatch, tmp_path, "parsing", DETACH_STEP_S=30.0, DETACH_MAX_S=30.0)

    def interrupted_open(file, mode="r", *a, **kw):
        if mode == "r":  # the launcher's own reader of the child's log, opened right after Popen
            for _ in range(500):  # let the child run far enough to say who it is
                if mark.exists() and mark.read_text().startswith("pid "):
                    break
                time.sleep(0.01)
            raise KeyboardInterrupt
        return builtins.open(file, mode, *a, **kw)

    monkeypatch.setattr(cli, "open", interrupted_open, raising=False)
    with pytest.raises(KeyboardInterrupt):
        cli.cmd_up(args)
    assert mark.read_text().endswith("terminated\n")
    assert not netns.pid_alive(_fake_pid(mark))
    assert list(state.iterdir()) == []


# -- the emulator may take long to parse a large trace: waited for while it lives, not a fixed 10 s
FAKE_EMULATOR = r"""
import json, sys, time
mode = sys.argv[1]
if mode == "exit":
    sys.exit(3)
if mode == "slow":
    time.sleep(0.5)
    print(json.dumps({"ready": True}), flush=True)
sys.stdin.readline()  # stop (or EOF)
print(json.dumps({"stopped": True}), flush=True)
"""


@pytest.mark.parametrize("mode", ["slow", "exit", "silent"])
def test_the_testbed_waits_for_the_emulator_while_it_lives(monkeypatch, mode):
    import sys
    import time

    from tokenwire.testbed.emulator import EmulatorConfig
    from tokenwire.testbed.netns import TestbedError
    from tokenwire.testbed.topology import EMULATOR_READY_CAP_S, Testbed

    assert EMULATOR_READY_CAP_S >= 60 and Testbed(EmulatorConfig()).ready_timeout == EMULATOR_READY_CAP_S
    tb = Testbed(EmulatorConfig(), ready_timeout=1.0 if mode == "silent" else 30.0)
    monkeypatch.setattr(tb, "_emulator_argv", lambda fd_srv, fd_cli: [sys.executable, "-c", FAKE_EMULATOR, mode])
    fd = os.open(os.devnull, os.O_RDONLY)
    started = time.monotonic()
    try:
        if mode == "slow":
            tb._start_emulator(fd, fd)
        else:
            with pytest.raises(TestbedError, match="exited \\(status 3\\)" if mode == "exit" else "within 1.0 s"):
                tb._start_emulator(fd, fd)
    finally:
        os.close(fd)
        tb.down()
    assert time.monotonic() - started < 5  # an exit is reported at once, not at the cap


# -- live --log and --pcap files: complete up to about a second ago, in whole rows and records
def _ip_packet(n=100):
    return bytes(IP(src="10.213.0.1", dst="10.213.0.2") / UDP(sport=8443, dport=9) / (b"x" * n))


def test_the_emulator_writes_out_its_log_and_pcaps_on_a_timer_once_traffic_stops(monkeypatch, tmp_path):
    """Rows reached the file only when a later row came a second after the last write, pcaps only at close."""
    import asyncio
    import socket

    from scapy.utils import RawPcapReader

    from tokenwire.testbed import emulator, pktlog
    from tokenwire.testbed.emulator import EmulatorConfig, EmulatorShell

    monkeypatch.setattr(pktlog, "FLUSH_EVERY_S", 0.05)
    log, prefix = tmp_path / "log.csv", str(tmp_path / "cap")
    srv, srv_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    cli, cli_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.setblocking(False)  # as the TUN fds are
    cli.setblocking(False)
    cli_peer.settimeout(5)
    shell = EmulatorShell(EmulatorConfig(log_path=str(log), pcap_prefix=prefix), srv.fileno(), cli.fileno())
    loop = emulator.new_event_loop()
    try:
        shell.attach(loop)
        srv_peer.send(_ip_packet())  # one packet from the server, then silence
        loop.run_until_complete(asyncio.sleep(0.3))
        assert cli_peer.recv(2000) == _ip_packet()  # it crossed the emulator
        rows = log.read_text().splitlines()
        assert len(rows) == 2 and rows[1].startswith("down,") and ",delivered," in rows[1], rows
        for name in ("down.in", "down.out"):
            with RawPcapReader(f"{prefix}.{name}.pcap") as pcap:  # (closed here, not by the collector)
                assert len(list(pcap)) == 1, name
    finally:
        shell.detach()
        shell.close()
        loop.close()
        for s in (srv, srv_peer, cli, cli_peer):
            s.close()


def test_live_log_and_pcap_files_never_end_mid_record(tmp_path):
    from types import SimpleNamespace

    from tokenwire.testbed.pktlog import CsvPacketLog, PcapTap

    tap = PcapTap(str(tmp_path / "cap"))
    log = CsvPacketLog(tmp_path / "log.csv")
    data = _ip_packet(972)  # a 1000-byte packet: 1016 bytes per pcap record
    pkt = SimpleNamespace(seq=0, size=len(data), arrival=1.0, dequeue=1.0, departure=1.001, delivery=1.011,
                          queue="C", sojourn=0.0, ecn_in=0, ecn_out=0, fate="delivered", data=data)
    try:
        for k in range(100):
            tap.arrived(data, 1.0 + k / 1000)
            pkt.seq = k
            log.record("down", pkt)
            assert (os.path.getsize(tmp_path / "cap.in.pcap") - 24) % (16 + len(data)) == 0
            text = (tmp_path / "log.csv").read_bytes()
            assert text.endswith(b"\r\n"), k
        assert os.path.getsize(tmp_path / "cap.in.pcap") > 24  # written out as it grew, not only at the end
        assert tap.pending and log.pending
        tap.flush()
        log.flush()
        assert not tap.pending and not log.pending
        assert os.path.getsize(tmp_path / "cap.in.pcap") == 24 + 100 * (16 + len(data))
    finally:
        tap.close()
        log.close()
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 101


def test_a_log_whose_disk_fills_stops_whole_and_the_packet_path_goes_on(tmp_path, monkeypatch, capsys):
    """ENOSPC in the middle of a flush raised into the emulator's packet path (the rest of the read batch was
    never forwarded and its timers not rescheduled) and left a torn row at the end of the file."""
    import errno
    from types import SimpleNamespace

    from tokenwire.testbed import pktlog

    path = tmp_path / "log.csv"
    log = pktlog.CsvPacketLog(path)
    pkt = SimpleNamespace(seq=0, size=100, arrival=1.0, dequeue=1.0, departure=1.001, delivery=1.011,
                          queue="C", sojourn=0.0, ecn_in=0, ecn_out=0, fate="delivered", data=b"")
    for k in range(10):
        pkt.seq = k
        log.record("down", pkt)
    log.flush()
    whole = path.read_bytes()
    real_write = os.write

    def disk_full(fd, data):
        if fd == log._fh.fileno():
            real_write(fd, bytes(data[:37]))  # part of a row reaches the disk, then it is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(pktlog.os, "write", disk_full)
    for k in range(10, 20):
        pkt.seq = k
        log.record("down", pkt)
    log.flush()  # no exception
    for _ in range(20, 30):  # dropped, not gathered
        log.record("down", pkt)
    assert not log.pending
    log.flush()
    monkeypatch.undo()
    log.close()
    assert path.read_bytes() == whole  # the rows up to the failed batch, none torn
    assert log.failures == {str(path): "No space left on device"}
    assert capsys.readouterr().err.count("No space left on device") == 1
    with pytest.raises(OSError, match="cannot write /dev/full"):
        pktlog.CsvPacketLog("/dev/full")


def test_a_capture_that_cannot_open_closes_what_it_opened(tmp_path, monkeypatch):
    """The .in.pcap opened, the .out.pcap failed: the first stayed open (a library caller kept the descriptor)."""
    from tokenwire.testbed import pktlog

    before = set(os.listdir("/proc/self/fd"))
    real = pktlog.WholeRecordFile.__init__

    def second_fails(self, path):
        if str(path).endswith(".out.pcap"):
            raise PermissionError(13, "Permission denied", str(path))
        real(self, path)

    monkeypatch.setattr(pktlog.WholeRecordFile, "__init__", second_fails)
    with pytest.raises(PermissionError):
        pktlog.PcapTap(str(tmp_path / "cap"))
    assert set(os.listdir("/proc/self/fd")) == before


def test_emulator_stats_count_a_packet_that_left_the_queue_out_of_its_backlog():
    """The shell's timer wakes at delivery times, and stats read the links without advancing them: a packet that
    had left the bottleneck stayed in ``backlog`` for the one-way delay after, and contention's settle waited."""
    import socket

    from tokenwire.testbed.emulator import DirectionConfig, EmulatorConfig, EmulatorShell

    srv, cli = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        cfg = EmulatorConfig(down=DirectionConfig(trace="12mbps", delay_ms=500.0))
        shell = EmulatorShell(cfg, srv.fileno(), cli.fileno())
        t0 = shell.down._now
        shell.down.enqueue(_ip_packet(), t0)
        assert shell.stats(now=t0)["down"]["backlog"] == 1  # not yet sent: 12 Mbit/s opportunities are 1 ms apart
        later = shell.stats(now=t0 + 0.1)  # long sent, still 400 ms from the far end
        assert later["down"]["backlog"] == 0 and later["up"]["backlog"] == 0
        assert shell.down.dequeue_ready(t0 + 0.1) == []  # in flight, not delivered early
        shell.close()
    finally:
        srv.close()
        cli.close()
