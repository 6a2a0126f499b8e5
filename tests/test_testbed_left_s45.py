"""The testbed's leftovers of the session-45 audit: a detached run that ends on its own leaves a short record of why
(its teardown removed its log, and `status` said only "no testbed runs"), which `status` shows and `down` removes;
SIGQUIT (Ctrl-\\) takes Ctrl-C's path (it killed the run and left its namespaces and state)."""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tokenwire.daemon.cli import CLIError, build_parser
from tokenwire.testbed import cli, netns, topology

from .test_testbed_fixes4 import fake_host  # noqa: F401  # (a fixture)

RUN = "tw5e5e01"


@pytest.fixture
def state_dir(fake_host: SimpleNamespace) -> Path:  # noqa: F811
    """test_testbed_fixes4's fake host (a state and a namespace folder of its own, no process it did not start
    signalled): its state folder."""
    return fake_host.state


# -- F5: how a detached run ended ----------------------------------------------------------------------------
class _State:
    """The run state `up` updates (its file is not this test's concern)."""

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}

    def save(self) -> None:
        pass


class _DyingTestbed:
    """Stands in for :class:`Testbed`: up, then its emulator is found dead at the first stats."""

    def __init__(self, *args: Any, run_id: str | None = None, **kwargs: Any) -> None:
        self.run_id = run_id or "tw000000"
        self._state = _State()
        self.torn_down = False

    def __enter__(self) -> _DyingTestbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.torn_down = True

    def describe(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "backend": "userspace", "server_ns": f"{self.run_id}-srv",
                "client_ns": f"{self.run_id}-cli", "server_addr": "10.213.0.1", "client_addr": "10.213.0.2"}

    def stats(self) -> dict[str, Any]:
        raise netns.TestbedError("emulator exited (status -9)")


def _up_args(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["testbed", "up", "--json", *extra])


def test_a_detached_run_whose_emulator_dies_records_why_after_its_teardown(state_dir, monkeypatch, capsys):
    monkeypatch.setattr(topology, "Testbed", _DyingTestbed)
    monkeypatch.setattr(cli.time, "sleep", lambda s: None)
    with pytest.raises(CLIError, match=r"^emulator exited \(status -9\)$"):
        cli.cmd_up(_up_args("--run-id", RUN))  # what `up --detach` runs in the background
    (record,) = netns.ended_runs()
    assert (record.run_id, record.reason) == (RUN, "emulator exited (status -9)")
    assert abs(record.ended - time.time()) < 60
    capsys.readouterr()
    assert cli.cmd_status(argparse.Namespace(json=False)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "no testbed runs"
    stamp = time.strftime("%H:%M:%S", time.localtime(record.ended))
    assert lines[1] == f"{RUN} ended {stamp}: emulator exited (status -9)"
    assert "`tokenwire testbed down` removes" in lines[2]


def test_a_foreground_run_leaves_no_record_its_terminal_shows_why(state_dir, monkeypatch):
    monkeypatch.setattr(topology, "Testbed", _DyingTestbed)
    monkeypatch.setattr(cli.time, "sleep", lambda s: None)
    with pytest.raises(CLIError, match=r"emulator exited"):
        cli.cmd_up(_up_args())
    assert netns.ended_runs() == []


def test_the_records_are_one_line_each_cut_short_and_only_the_newest_kept(state_dir):
    ids = [f"tw5e5e{i:02x}" for i in range(netns.ENDED_KEEP + 3)]
    for i, run_id in enumerate(ids):
        netns.record_ended(run_id, "emulator exited (status 1): Traceback\n  line\n" + "x" * 1000)
        os.utime(state_dir / f"{run_id}.ended", (1000.0 + i, 1000.0 + i))  # (mtimes in order, whatever the clock)
    records = netns.ended_runs()
    assert [r.run_id for r in records] == ids[-netns.ENDED_KEEP:]  # the oldest three went
    assert sorted(os.listdir(state_dir)) == sorted(f"{i}.ended" for i in ids[-netns.ENDED_KEEP:])
    assert all("\n" not in r.reason and len(r.reason) == netns.ENDED_REASON_MAX for r in records)
    assert records[0].reason.startswith("emulator exited (status 1): Traceback line xxx")
    assert records[0].reason.endswith("...")


def test_an_unreadable_record_is_shown_and_removed_not_a_traceback(state_dir, capsys):
    (state_dir / f"{RUN}.ended").write_text("{not json")
    assert cli.cmd_status(argparse.Namespace(json=False)) == 0
    assert f"{RUN} ended at an unknown time: its record cannot be read" in capsys.readouterr().out
    assert cli.cmd_down(argparse.Namespace(run_ids=[], all=False)) == 0
    assert os.listdir(state_dir) == []


def test_down_removes_the_records_a_named_one_alone_and_then_has_nothing_left(state_dir, capsys):
    other = "tw5e5e02"
    netns.record_ended(RUN, "emulator exited (status -9)")
    netns.record_ended(other, "emulator exited (status 1)")
    # a run id that only a record names is known to `down ID` (it said "no testbed run")
    assert cli.cmd_down(argparse.Namespace(run_ids=[RUN], all=False)) == 0
    assert capsys.readouterr().out == f"removed the record of how {RUN} ended\n"
    assert [r.run_id for r in netns.ended_runs()] == [other]
    with pytest.raises(CLIError, match=f"no testbed run {RUN}"):
        cli.cmd_down(argparse.Namespace(run_ids=[RUN], all=False))
    assert cli.cmd_down(argparse.Namespace(run_ids=[], all=False)) == 0  # a plain down: every record goes
    assert capsys.readouterr().out == f"removed the record of how {other} ended\n"
    assert os.listdir(state_dir) == []
    assert cli.cmd_down(argparse.Namespace(run_ids=[], all=True)) == 0
    assert capsys.readouterr().out == "nothing to clean up\n"
    cli.cmd_status(argparse.Namespace(json=False))
    assert capsys.readouterr().out == "no testbed runs\n"


def test_status_json_still_lists_runs_only(state_dir, capsys):
    netns.record_ended(RUN, "emulator exited (status -9)")
    assert cli.cmd_status(argparse.Namespace(json=True)) == 0
    assert capsys.readouterr().out.strip() == "[]"


# -- F6: SIGQUIT -----------------------------------------------------------------------------------------------
@pytest.fixture
def sigquit_seen() -> Any:
    """SIGQUIT recorded instead of its default action (a core dump would end the test run): a run that does not
    take it over leaves this handler in place."""
    seen: list[int] = []
    before = signal.signal(signal.SIGQUIT, lambda signum, frame: seen.append(signum))
    try:
        yield seen
    finally:
        signal.signal(signal.SIGQUIT, before)


def test_sigquit_unwinds_a_run_like_ctrl_c_and_a_repeat_spares_the_teardown(sigquit_seen):
    finished = []
    with pytest.raises(KeyboardInterrupt), cli.sigterm_as_ctrl_c():
        try:
            os.kill(os.getpid(), signal.SIGQUIT)
            for _ in range(10_000_000):  # (the handler runs before this loop gets far)
                pass
        finally:
            os.kill(os.getpid(), signal.SIGQUIT)  # Ctrl-\ again, during the teardown
            for _ in range(1000):
                pass
            finished.append(True)
    assert finished == [True]
    assert sigquit_seen == []  # the run's handler took both
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_an_ignored_sigquit_stays_ignored():
    before = signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    try:
        with cli.sigterm_as_ctrl_c():
            assert signal.getsignal(signal.SIGQUIT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGQUIT, before)


def test_a_sigquit_during_namespace_creation_waits_until_it_is_done(sigquit_seen):
    """signals_deferred holds the unwinding signals while pyroute2 makes a namespace: SIGQUIT among them."""
    with netns.signals_deferred():
        os.kill(os.getpid(), signal.SIGQUIT)
        for _ in range(100_000):
            pass
        assert sigquit_seen == []
    assert sigquit_seen == [signal.SIGQUIT]


def test_kv_virtual_stops_its_workers_on_sigquit_too():
    """``testbed kv --virtual`` swaps the unwinding handlers for one that stops its worker processes first."""
    assert signal.SIGQUIT in cli.UNWIND_AS_CTRL_C
    assert signal.SIGINT in cli.UNWIND_AS_CTRL_C and signal.SIGHUP in cli.UNWIND_AS_CTRL_C
