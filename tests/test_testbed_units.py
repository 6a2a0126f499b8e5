"""Non-root pieces of the testbed: spec parsing, packet-log flows, the per-seed base delay, the CLI surface."""

import math
import os
import shutil
import subprocess

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


def test_a_signal_during_namespace_creation_takes_effect_once_it_exists(monkeypatch, tmp_path):
    """pyroute2 makes the namespace in a forked child; a SIGTERM while the owner waited for it unwound the run
    first and the child made the namespace after the teardown had looked: a leftover now and then."""
    import os
    import signal

    from pyroute2 import netns as pr_netns

    from tokenwire.testbed import netns
    from tokenwire.testbed.cli import sigterm_as_ctrl_c

    made = []

    def create(name):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while "the child" is still at work
        for _ in range(1000):  # bytecode on which Python would run the handler if the signal got through
            pass
        made.append(name)

    monkeypatch.setattr(pr_netns, "create", create)
    monkeypatch.setattr(netns, "netns_exists", lambda name: False)
    with pytest.raises(KeyboardInterrupt), sigterm_as_ctrl_c():
        netns.create_netns("tw000000-srv")
    assert made == ["tw000000-srv"]  # created, then unwound: the teardown finds it and removes it
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == set()  # nothing left blocked
