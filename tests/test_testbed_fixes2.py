"""Testbed teardown under signals, missing capabilities, ``testbed up`` interrupted while it builds, and
``demo --schemes`` listing a scheme twice."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tokenwire.daemon.cli import main
from tokenwire.testbed import netns, topology
from tokenwire.testbed.cli import sigterm_as_ctrl_c
from tokenwire.testbed.emulator import DirectionConfig, EmulatorConfig

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                                reason="needs root (network namespaces)")


def _sigterm_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


class _EmulatorSignalledWhileStopped:
    """The emulator process as ``down()`` sees it; a SIGTERM lands while it is being stopped (the handler runs at
    the next bytecode, before the namespaces' removal, which comes last)."""

    stdin = stdout = None
    pid = 4242

    def poll(self) -> int:
        _sigterm_self()
        return 0

    def wait(self, timeout: float | None = None) -> int:
        return 0


class _ChildSignalledWhileKilled:
    """A child in a namespace whose kill is where the SIGTERM lands (DirectLink's first teardown step)."""

    def poll(self) -> int:
        _sigterm_self()
        return 0

    def wait(self, timeout: float | None = None) -> int:
        return 0


# -- 1. a signal during the teardown of a normal finish: held until the teardown is done, then it takes effect
def test_a_sigterm_during_the_teardown_after_a_normal_finish_waits_for_the_namespaces_removal(monkeypatch):
    destroyed: list[Any] = []
    monkeypatch.setattr(topology, "destroy_run", destroyed.append)
    tb = topology.Testbed(EmulatorConfig())
    state = netns.RunState("tw00c0de", os.getpid(), [])
    tb._state = state
    tb.emulator = _EmulatorSignalledWhileStopped()  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt), sigterm_as_ctrl_c():
        tb.__exit__(None, None, None)  # the `with` block ended normally
    assert destroyed == [state]  # raised half-way before: the namespaces and the state file stayed
    assert tb._state is None and tb.emulator is None


def test_directlink_teardown_waits_for_a_sigterm_too(monkeypatch):
    destroyed: list[Any] = []
    monkeypatch.setattr(topology, "destroy_run", destroyed.append)
    link = topology.DirectLink()
    state = netns.RunState(link.run_id, os.getpid(), [])
    link._state = state
    link._children = [_ChildSignalledWhileKilled()]  # type: ignore[list-item]
    with pytest.raises(KeyboardInterrupt), sigterm_as_ctrl_c():
        link.__exit__(None, None, None)
    assert destroyed == [state] and link._children == []


def test_a_failing_teardown_step_does_not_skip_the_namespaces_removal(monkeypatch):
    class Broken(_EmulatorSignalledWhileStopped):
        def poll(self) -> int:
            raise OSError("the emulator's pipe is gone")

    destroyed: list[Any] = []
    monkeypatch.setattr(topology, "destroy_run", destroyed.append)
    tb = topology.Testbed(EmulatorConfig())
    state = netns.RunState("tw00c0df", os.getpid(), [])
    tb._state = state
    tb.emulator = Broken()  # type: ignore[assignment]
    with pytest.raises(OSError, match="pipe is gone"):
        tb.down()
    assert destroyed == [state] and tb._state is None  # the error is reported after every step ran


def test_a_teardown_interrupted_before_it_held_the_signals_is_run_again(monkeypatch):
    """A signal can land in ``__exit__`` before ``down()`` holds the signals: the teardown is retried once."""
    destroyed: list[Any] = []
    monkeypatch.setattr(topology, "destroy_run", destroyed.append)
    tb = topology.Testbed(EmulatorConfig())
    state = netns.RunState("tw00c0e0", os.getpid(), [])
    tb._state = state
    real_down, calls = tb.down, []

    def down() -> None:
        calls.append(True)
        if len(calls) == 1:
            raise KeyboardInterrupt  # landed before anything was torn down
        real_down()

    monkeypatch.setattr(tb, "down", down)
    with pytest.raises(KeyboardInterrupt):
        tb.__exit__(None, None, None)
    assert destroyed == [state] and len(calls) == 2


@pytest.mark.root
@needs_root
def test_sigterm_during_a_real_teardown_leaves_nothing_behind(monkeypatch):
    """The probe's repro: SIGTERM while a testbed that finished normally is torn down (compare and swiftqueue
    build one per scheme or policy)."""
    real = topology.destroy_run

    def signalled_destroy(state: netns.RunState) -> list[str]:
        _sigterm_self()  # lands as the removal starts (before: KeyboardInterrupt here, nothing removed)
        return real(state)

    monkeypatch.setattr(topology, "destroy_run", signalled_destroy)
    cfg = EmulatorConfig(down=DirectionConfig("12mbps", delay_ms=10), up=DirectionConfig("12mbps", delay_ms=10))
    tb = topology.Testbed(cfg)
    try:
        with pytest.raises(KeyboardInterrupt), sigterm_as_ctrl_c(), tb:
            assert netns.netns_exists(tb.server_ns)
        assert not netns.netns_exists(tb.server_ns) and not netns.netns_exists(tb.client_ns)
        assert not os.path.exists(netns.RunState(tb.run_id, 0).path)
    finally:  # the test failed: leave nothing behind
        path = netns.RunState(tb.run_id, 0).path
        if os.path.exists(path):
            real(netns.RunState.load(path))


# -- 2. root without CAP_SYS_ADMIN / CAP_NET_ADMIN (a default Docker container)
def _status_file(tmp_path: Path, cap_eff: int) -> str:
    path = tmp_path / "status"
    path.write_text(f"Name:\tpython\nCapInh:\t0000000000000000\nCapEff:\t{cap_eff:016x}\nCapBnd:\t{cap_eff:016x}\n")
    return str(path)


def test_missing_capabilities_reads_the_effective_set(tmp_path):
    assert netns.missing_capabilities(_status_file(tmp_path, 0x1FFFEFFFFFF)) == []
    assert netns.missing_capabilities(_status_file(tmp_path, 0)) == ["CAP_SYS_ADMIN", "CAP_NET_ADMIN"]
    assert netns.missing_capabilities(_status_file(tmp_path, 1 << 12)) == ["CAP_SYS_ADMIN"]
    assert netns.missing_capabilities(str(tmp_path / "absent")) == []  # unknown: the namespace operation says


def test_root_without_cap_sys_admin_is_unavailable_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns, "PROC_STATUS", _status_file(tmp_path, 0xA80425FB))  # Docker's default set
    reason = topology.unavailable_reason()
    assert reason is not None and "lacks CAP_SYS_ADMIN and CAP_NET_ADMIN" in reason and "\n" not in reason
    with pytest.raises(netns.TestbedError, match="lacks CAP_SYS_ADMIN and CAP_NET_ADMIN"):
        netns.check_root()
    monkeypatch.setattr(netns, "PROC_STATUS", _status_file(tmp_path, 0xA80425FB | 1 << 12))  # --cap-add NET_ADMIN
    assert "lacks CAP_SYS_ADMIN (" in (topology.unavailable_reason() or "")


def test_a_refused_namespace_creation_is_a_testbed_error(monkeypatch):
    """Capabilities present but the mount refused (an AppArmor profile): pyroute2's PermissionError was a
    traceback; as a TestbedError the commands say it in one line."""
    from pyroute2 import netns as pr_netns  # type: ignore[import-untyped]

    def create(name: str) -> None:
        raise PermissionError(1, "mount rundir failed")

    monkeypatch.setattr(pr_netns, "create", create)
    monkeypatch.setattr(netns, "netns_exists", lambda name: False)
    with pytest.raises(netns.TestbedError, match="cannot create network namespace tw000001-srv: mount rundir"):
        netns.create_netns("tw000001-srv")


_NO_CAPS = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-m", "tokenwire.daemon.cli"]
needs_setpriv = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                   reason="needs root and setpriv (drops the capabilities)")


@pytest.mark.root
@needs_setpriv
@pytest.mark.parametrize("argv", [["testbed", "up"], ["testbed", "compare", "--down-trace", "12mbps"],
                                  ["bench", "emulator"], ["demo", "--link", "netns"]],
                         ids=["up", "compare", "bench", "demo-netns"])
def test_namespace_commands_without_capabilities_say_so_in_one_line(argv):
    proc = subprocess.run([*_NO_CAPS, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "lacks CAP_SYS_ADMIN and CAP_NET_ADMIN" in last, proc.stderr


@pytest.mark.root
@needs_setpriv
def test_demo_without_capabilities_falls_back_to_the_relay_and_says_why():
    proc = subprocess.run([*_NO_CAPS, "demo", "--quiet", "--tokens", "5", "--rate", "10000", "--delay-ms", "0",
                           "--loss", "none", "--schemes", "stream"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "lacks CAP_SYS_ADMIN" in proc.stderr and "using the loopback relay" in proc.stderr
    assert "through a relay" in proc.stdout


# -- 3. `testbed up` interrupted before it is up: "interrupted", 130; stopped once up: 0 as documented
class _FakeTestbed:
    """Stands in for :class:`Testbed` in ``cmd_up`` (no namespaces)."""

    interrupt_while_building = False
    _state = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _FakeTestbed:
        if self.interrupt_while_building:
            raise KeyboardInterrupt
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"run_id": "tw000002", "backend": "userspace", "backend_reason": "", "server_ns": "tw000002-srv",
                "client_ns": "tw000002-cli", "server_addr": "10.213.0.9", "client_addr": "10.213.0.10"}


def test_up_interrupted_while_it_builds_says_interrupted(monkeypatch, capsys):
    monkeypatch.setattr(topology, "Testbed", type("Building", (_FakeTestbed,), {"interrupt_while_building": True}))
    assert main(["testbed", "up"]) == 130  # was 0 with nothing printed
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == "interrupted" and captured.out == ""


def test_up_stopped_once_it_is_up_still_exits_0(monkeypatch, capsys):
    import time

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt  # Ctrl-C while it runs

    monkeypatch.setattr(topology, "Testbed", _FakeTestbed)
    monkeypatch.setattr(time, "sleep", interrupted)
    assert main(["testbed", "up"]) == 0
    assert "testbed tw000002 up" in capsys.readouterr().out


# -- 4. demo --schemes: a scheme listed twice ran twice and the table showed the second only
def test_demo_refuses_a_scheme_listed_twice(monkeypatch, capsys):
    from tokenwire.daemon import demo_cli

    def ran(*args: Any) -> None:
        pytest.fail("the demo ran")

    monkeypatch.setattr(demo_cli, "_demo_relay", ran)
    monkeypatch.setattr(demo_cli, "_demo_netns", ran)
    assert main(["demo", "--link", "relay", "--schemes", "chatterbox,stream,chatterbox"]) == 2
    assert capsys.readouterr().err.strip() == "tokenwire demo: error: --schemes: chatterbox listed twice"


def test_every_signal_held_during_a_teardown_is_delivered_after_it(monkeypatch):
    """A SIGINT's KeyboardInterrupt, raised first, left a SIGTERM held after it undelivered: a script using the
    Testbed without the CLI's handlers went on and exited 0."""
    delivered: list[int] = []  # (recorded, not sent: the test process lives on)

    def first_raises(signum: int) -> None:
        delivered.append(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt

    monkeypatch.setattr(netns.signal, "raise_signal", first_raises)
    with pytest.raises(KeyboardInterrupt):
        netns._raise_each([signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
    assert delivered == [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]


# -- a namespace testbed that the host looked able to run, yet refused to build (AppArmor, seccomp)
_DEMO_FAST = ["demo", "--quiet", "--tokens", "5", "--rate", "10000", "--delay-ms", "0", "--loss", "none",
              "--schemes", "stream"]


def _refused_build(monkeypatch) -> None:
    def up(self) -> None:
        raise netns.TestbedError("cannot create network namespace tw000001-srv: Permission denied")

    monkeypatch.setattr(topology, "unavailable_reason", lambda: None)  # root, capabilities and pyroute2 there
    monkeypatch.setattr(topology.Testbed, "up", up)


def test_demo_falls_back_to_the_relay_when_the_namespaces_cannot_be_built(monkeypatch, capsys):
    """A container whose AppArmor profile refuses the namespace mount passed the capability check, and `make demo`
    ended in a TestbedError instead of the relay it uses when namespaces are unavailable."""
    from tokenwire.daemon.cli import main

    _refused_build(monkeypatch)
    assert main(_DEMO_FAST) == 0
    out, err = capsys.readouterr()
    assert "(namespace testbed could not be built: cannot create network namespace tw000001-srv: Permission " \
           "denied; using the loopback relay)" in err
    assert "through a relay" in out


def test_demo_on_the_namespaces_only_says_they_could_not_be_built(monkeypatch, capsys):
    from tokenwire.daemon.cli import main

    _refused_build(monkeypatch)
    assert main([*_DEMO_FAST, "--link", "netns"]) == 2
    err = capsys.readouterr().err
    assert "the namespace testbed could not be built: cannot create network namespace" in err
    assert "relay" not in err
