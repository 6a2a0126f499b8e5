"""``netns.list_runs`` as the one judge of a run whose state file cannot be read (the CLI kept its own copy), no pid a
state file names signalled without its recorded start time, ``testbed swiftqueue`` refusing trace gaps as the other
testbed commands do, and every ``--seed`` taken by ``seed_arg`` (``sim`` took any int)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tokenwire.daemon.cli import MAX_SEED, build_parser, main, seed_arg
from tokenwire.testbed import cli, netns, swiftqueue_eval, swiftqueue_netns, topology


# -- 1. list_runs salvages an unreadable state file; no unproven pid is ever signalled ---------------------------
@pytest.fixture
def fake_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A state folder and a namespace folder of plain files (namespaces "removed" by unlinking them), and a guard
    that fails the test instead of signalling a process it did not start."""
    state, ns_dir = tmp_path / "state", tmp_path / "netns"
    state.mkdir()
    ns_dir.mkdir()
    monkeypatch.setattr(netns, "STATE_DIR", str(state))
    monkeypatch.setattr(netns, "NETNS_DIR", str(ns_dir))
    monkeypatch.setattr(netns, "check_root", lambda: None)
    monkeypatch.setattr(netns, "remove_netns", lambda name: os.unlink(ns_dir / name))
    monkeypatch.setattr(cli, "_remove_links", lambda run_id: [])
    signalled: list[int] = []
    real_terminate = netns.terminate_pids

    def only_ours(pids: list[int], timeout: float = 3.0) -> None:
        strangers = [pid for pid in pids if _parent_of(pid) != os.getpid()]
        assert not strangers, f"would signal processes this test did not start: {strangers}"
        signalled.extend(pids)
        real_terminate(pids, timeout)

    monkeypatch.setattr(netns, "terminate_pids", only_ours)
    return SimpleNamespace(state=state, ns=ns_dir, signalled=signalled)


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


@pytest.fixture
def sleeper() -> Any:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _dead_pid() -> int:
    dead = subprocess.Popen(["true"])
    dead.wait()
    return dead.pid


def test_list_runs_itself_salvages_the_proven_live_owner_and_the_scratch_folder(fake_host, sleeper):
    """It reported owner pid 0 and no scratch folder; `status` and `down` each corrected that in the CLI."""
    scratch = tempfile.mkdtemp(prefix="tw-compare-")
    try:
        (fake_host.state / "tw5f4f01.json").write_text(json.dumps(
            {"run_id": "tw5f4f01", "owner_pid": sleeper.pid, "owner_start": netns.start_time(sleeper.pid),
             "newer_key": 1, "info": {"scratch": scratch}}))
        (fake_host.ns / "tw5f4f01-srv").write_text("")
        [run] = netns.list_runs()
        assert run.owner_pid == sleeper.pid and run.owner_alive
        assert run.namespaces == ["tw5f4f01-srv"] and run.info["scratch"] == scratch
        assert run.info["unreadable_state"].startswith("TypeError: ")
    finally:
        os.rmdir(scratch)


def test_list_runs_salvages_what_a_truncated_state_file_still_holds(fake_host, sleeper):
    text = json.dumps({"run_id": "tw5f4f02", "owner_pid": sleeper.pid,
                       "owner_start": netns.start_time(sleeper.pid), "info": {"scratch": "/tmp/tw-x"}})
    (fake_host.state / "tw5f4f02.json").write_text(text[:-2])
    [run] = netns.list_runs()
    assert run.owner_alive and run.owner_pid == sleeper.pid and run.info["scratch"] == "/tmp/tw-x"
    assert run.info["unreadable_state"].startswith("JSONDecodeError: ")


@pytest.mark.parametrize("owner_start", ["missing", None, "a string", True, "wrong"])
def test_a_readable_state_file_without_its_owners_start_time_names_no_live_owner(owner_start, fake_host, sleeper,
                                                                                  capsys):
    """RunState's __post_init__ filled the missing start time with the live process's own, so `down ID` took any
    process holding the pid for the owner and SIGTERMed it (pid 1 in a hand-made file)."""
    fields: dict[str, Any] = {"run_id": "tw5f4f03", "owner_pid": sleeper.pid, "namespaces": ["tw5f4f03-srv"]}
    started = netns.start_time(sleeper.pid)
    assert started is not None
    if owner_start != "missing":
        fields["owner_start"] = {"a string": str(started), "wrong": started + 1}.get(owner_start, owner_start)
    (fake_host.state / "tw5f4f03.json").write_text(json.dumps(fields))
    (fake_host.ns / "tw5f4f03-srv").write_text("")
    [run] = netns.list_runs()
    assert not run.owner_alive and "unreadable_state" not in run.info

    assert cli.cmd_status(argparse.Namespace(json=False)) == 0
    assert capsys.readouterr().out.startswith("tw5f4f03  CRASHED")
    assert cli.cmd_down(argparse.Namespace(run_ids=["tw5f4f03"], all=False)) == 0
    assert capsys.readouterr().out == "tw5f4f03: namespace tw5f4f03-srv\n"
    assert sleeper.poll() is None and fake_host.signalled == []  # never signalled


def test_an_emulator_pid_without_its_start_time_is_never_signalled(fake_host, sleeper, capsys):
    """destroy_run SIGTERMed a state file's emulator pid on a plain `down`, proven by nothing."""
    (fake_host.state / "tw5f4f04.json").write_text(json.dumps(
        {"run_id": "tw5f4f04", "owner_pid": _dead_pid(), "owner_start": 1, "emulator_pid": sleeper.pid}))
    [run] = netns.list_runs()
    assert not run.emulator_alive
    assert cli.cmd_down(argparse.Namespace(run_ids=[], all=False)) == 0
    assert capsys.readouterr().out == "tw5f4f04: removed\n"
    assert sleeper.poll() is None and fake_host.signalled == [] and os.listdir(fake_host.state) == []


def test_a_readable_runs_proven_owner_and_emulator_are_still_stopped(fake_host, sleeper, capsys):
    """The other side: a live owner with its own start time is a running testbed, stopped by `down ID`."""
    emulator = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        netns.RunState("tw5f4f05", sleeper.pid, [], emulator_pid=emulator.pid,
                       emulator_start=netns.start_time(emulator.pid)).save()
        [run] = netns.list_runs()
        assert run.owner_alive and run.emulator_alive
        assert cli.cmd_down(argparse.Namespace(run_ids=[], all=False)) == 0
        assert capsys.readouterr().out == "nothing to clean up\n" and sleeper.poll() is None
        assert cli.cmd_down(argparse.Namespace(run_ids=["tw5f4f05"], all=False)) == 0
        assert sleeper.wait(timeout=30) is not None and emulator.wait(timeout=30) is not None
        assert sorted(fake_host.signalled) == sorted([sleeper.pid, emulator.pid])
    finally:
        emulator.kill()
        emulator.wait()


@pytest.mark.parametrize("text", ["[]", '"tw5f4f06"', '{"run_id": "tw5f4f06", "owner_pid": "1"}',
                                  '{"run_id": "tw5f4f06", "owner_pid": -1}',
                                  '{"run_id": "tw5f4f06", "owner_pid": 0, "emulator_pid": "1"}',
                                  '{"run_id": "tw5f4f06", "owner_pid": 0, "namespaces": [1]}',
                                  '{"run_id": "tw5f4f06", "owner_pid": 0, "info": []}'])
def test_a_state_file_of_the_wrong_shape_is_listed_as_unreadable_not_a_traceback(text, fake_host, capsys):
    """`[]` ended `status` in an AttributeError, a string pid in a TypeError from os.kill; a negative pid would have
    named a process group to it."""
    (fake_host.state / "tw5f4f06.json").write_text(text)
    (fake_host.ns / "tw5f4f06-srv").write_text("")
    [run] = netns.list_runs()
    assert run.owner_pid == 0 and run.info["unreadable_state"] and run.namespaces == ["tw5f4f06-srv"]
    assert cli.cmd_status(argparse.Namespace(json=False)) == 0
    assert capsys.readouterr().out.startswith("tw5f4f06  CRASHED")
    assert cli.cmd_down(argparse.Namespace(run_ids=[], all=False)) == 0
    assert capsys.readouterr().out.startswith("tw5f4f06: its state file could not be read")
    assert os.listdir(fake_host.ns) == [] and fake_host.signalled == []


def test_a_state_file_holding_another_runs_state_touches_nothing_of_that_run(fake_host, sleeper, capsys):
    """A copy of tw5f4f08's state saved as tw5f4f07.json was listed as tw5f4f08 twice, and a plain `down` removed
    the namespaces of the live tw5f4f08 (its copy's owner, a dead pid, read as crashed)."""
    live = netns.RunState("tw5f4f08", sleeper.pid, ["tw5f4f08-srv"])
    live.save()
    copy = {**live.__dict__, "owner_pid": _dead_pid(), "owner_start": 1}
    (fake_host.state / "tw5f4f07.json").write_text(json.dumps(copy))
    for name in ("tw5f4f07-srv", "tw5f4f08-srv"):
        (fake_host.ns / name).write_text("")
    runs = {r.run_id: r for r in netns.list_runs()}
    assert sorted(runs) == ["tw5f4f07", "tw5f4f08"] and runs["tw5f4f08"].owner_alive
    assert "the state of run tw5f4f08" in runs["tw5f4f07"].info["unreadable_state"]
    assert runs["tw5f4f07"].namespaces == ["tw5f4f07-srv"]
    assert cli.cmd_down(argparse.Namespace(run_ids=[], all=False)) == 0
    assert capsys.readouterr().out.startswith("tw5f4f07: its state file could not be read")
    assert os.listdir(fake_host.ns) == ["tw5f4f08-srv"] and os.listdir(fake_host.state) == ["tw5f4f08.json"]
    assert sleeper.poll() is None and fake_host.signalled == []


def test_the_cli_keeps_no_salvage_of_its_own():
    """One place judges an unreadable state file (netns.read_run): the CLI's copies went out of step with it."""
    assert not any(hasattr(cli, name) for name in ("_salvaged", "_listed_runs", "_state_fields"))


# -- 2. testbed swiftqueue refuses trace gaps before anything is built, through the shared check ------------------
def _nothing_built(monkeypatch: pytest.MonkeyPatch) -> None:
    def built(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a run was started")

    monkeypatch.setattr(netns, "check_root", lambda: None)
    monkeypatch.setattr(topology.Testbed, "__init__", built)
    monkeypatch.setattr(swiftqueue_netns, "run_netns_all", built)
    monkeypatch.setattr(swiftqueue_eval, "run_virtual_all", built)


@pytest.mark.parametrize("extra", [["--down-trace", "{gap}"], ["--down-trace", "12mbps", "--up-trace", "{gap}"],
                                   ["--down-trace", "{gap}", "--virtual"], ["--down-trace", "399bps"]],
                         ids=["down", "up", "virtual", "399bps"])
def test_swiftqueue_refuses_a_gap_no_run_survives_before_building_anything(extra, tmp_path, monkeypatch, capsys):
    """It checked its config only: a trace with a 10-minute gap built the namespaces and failed later."""
    gap = tmp_path / "gap.trace"
    gap.write_text("600000\n")
    _nothing_built(monkeypatch)
    argv = [w.format(gap=gap) for w in extra]
    assert main(["testbed", "swiftqueue", *argv, "--seconds", "5"]) == 2
    err = capsys.readouterr().err
    assert " s without a delivery opportunity, at most 30 s" in err and len(err.strip().splitlines()) == 1


def test_swiftqueue_announces_a_large_trace_as_the_other_commands_do(tmp_path, monkeypatch, capsys):
    big = tmp_path / "big.trace"
    big.write_text("1\n" * 1000)
    monkeypatch.setattr(cli, "LARGE_TRACE_BYTES", 1000)
    _nothing_built(monkeypatch)
    assert main(["testbed", "swiftqueue", "--down-trace", str(big), "--seconds", "0.5"]) == 2  # refused after it
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"reading trace {big} (0 MB)..." and "--seconds" in err[1]


def test_swiftqueue_still_refuses_a_delay_over_the_bound(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["testbed", "swiftqueue", "--down-trace", "12mbps", "--delay-ms", "4001"])
    assert info.value.code == 2 and "the one-way delay is 0 to 4000 ms" in capsys.readouterr().err


# -- 3. every --seed is seed_arg's --------------------------------------------------------------------------------
SEED_COMMANDS = [["sim"], ["testbed", "compare", "--down-trace", "12mbps"], ["testbed", "up"],
                 ["testbed", "kv", "--down-trace", "12mbps"], ["testbed", "swiftqueue", "--down-trace", "12mbps"],
                 ["predictor", "collect", "--down-trace", "12mbps", "--out", "d.npz"],
                 ["predictor", "train", "--data", "d.npz", "--out-dir", "m"]]


@pytest.mark.parametrize("command", SEED_COMMANDS, ids=lambda c: " ".join(c[:2]))
@pytest.mark.parametrize("seed", ["-1", str(2**70), str(MAX_SEED + 1), "x"])
def test_every_seed_option_refuses_what_no_generator_takes(command, seed, capsys):
    """`sim --seed` was a plain int (-1 and 2**70 accepted); `predictor train --seed 2**70` was torch's "Overflow
    when unpacking long long" traceback after loading its data."""
    with pytest.raises(SystemExit) as info:  # the parser alone: a seed accepted would otherwise run the command
        build_parser().parse_args([*command, "--seed", seed])
    assert info.value.code == 2
    assert "argument --seed: " in capsys.readouterr().err


@pytest.mark.parametrize("command", SEED_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_every_seed_option_takes_0_to_max_seed(command):
    for seed in (0, MAX_SEED):
        assert build_parser().parse_args([*command, "--seed", str(seed)]).seed == seed


def test_seed_arg_says_why():
    with pytest.raises(argparse.ArgumentTypeError, match=r"-1 is negative; seeds are integers >= 0"):
        seed_arg("-1")
    with pytest.raises(argparse.ArgumentTypeError, match=rf"{2**32} is too large; seeds are integers from 0 to "
                                                         rf"{MAX_SEED}"):
        seed_arg(str(2**32))


def _seed_options(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for action in parser._actions:
        if "--seed" in action.option_strings:
            out[path] = action.type
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.update(_seed_options(sub, (*path, name)))
    return out


def test_every_seed_option_of_the_cli_is_seed_arg():
    """By walking the parser, so a new --seed cannot be a plain int again (`demo --seed` was one)."""
    options = _seed_options(build_parser())
    assert ("sim",) in options and ("testbed", "swiftqueue") in options
    plain = sorted(" ".join(path) for path, kind in options.items() if kind is not seed_arg)
    assert plain == [], plain


@pytest.mark.parametrize(("seeds", "says"), [
    ("4294967296", "--seeds: 4294967296 is too large; seeds are integers from 0 to 4294967295"),
    ("1-4294967296", "--seeds: 4294967296 is too large"),
    # a range of billions was built as a list before anything was checked (tens of GB)
    ("0-4294967295", "names more than 10000 seeds, each a collection run"),
    ("1-6000,7000-13000", "names more than 10000 seeds"),
])
def test_collect_many_seeds_take_what_every_seed_option_takes(tmp_path, capsys, seeds, says):
    """``--seeds`` of ``predictor collect-many`` had no upper bound (2**70 reached torch as a traceback), and a wide
    range was materialized before any check: bounded by MAX_SEED, and by MAX_SEEDS seeds in one run."""
    assert main(["predictor", "collect-many", "--traces", "6mbps", "--seeds", seeds, "--seconds", "1",
                 "--out-dir", str(tmp_path / "d")]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
