"""A user's audit of the namespace testbed (session 45): ``up --detach`` refuses a process that cannot build
namespaces as the foreground ``up`` does, before it writes anything (not root said "/run/tokenwire-testbed/
twXXXXXX.log: Permission denied"; root without the capabilities said "error: ... tokenwire testbed up: error:
..."), a ``/dev/net/tun`` that cannot make a TUN device is one line (it was a 27-line traceback), and an endpoint
client reports its final count (``compare`` ended a run on "55/60 tokens rendered (92%)"), and ``status`` shows
the up direction's losses (``--up-loss iid:0.3`` read "up: 34 delivered", 16 lost unsaid)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tokenwire.testbed import cli, endpoints, netns

# -- 1. up --detach: the root check first --------------------------------------------------------------------------
NOT_ROOT = "the namespace testbed needs root (network namespaces, TUN devices)"


def test_up_detach_refuses_a_process_without_root_before_it_writes_or_starts_anything(tmp_path, monkeypatch,
                                                                                      capsys):
    from tokenwire.daemon.cli import main

    state = tmp_path / "state"  # missing: the launcher made it, wrote its log there, and started the child
    started: list[list[str]] = []

    def not_root() -> None:
        raise netns.TestbedError(NOT_ROOT)

    monkeypatch.setattr(netns, "STATE_DIR", str(state))
    monkeypatch.setattr(netns, "check_root", not_root)
    monkeypatch.setattr(cli, "DETACH_MAX_S", 2.0)  # (without the check: the child below is given up on soon)
    monkeypatch.setattr(cli, "_detach_argv", lambda args, run_id: started.append([run_id]) or [
        sys.executable, "-c", f"raise SystemExit('tokenwire testbed up: error: {NOT_ROOT}')"])
    rc = main(["testbed", "up", "--detach", "--delay-ms", "5"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip() == f"tokenwire testbed up: error: {NOT_ROOT}"
    assert started == []
    assert not state.exists()


@pytest.mark.parametrize("line", [
    f"tokenwire testbed up: error: {NOT_ROOT}",
    f"tokenwire testbed: error: {NOT_ROOT}",
    NOT_ROOT,
])
def test_a_detached_childs_error_is_reported_without_its_own_prefix(line):
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(2)"])
    proc.wait()
    assert cli._child_failure(proc, f"reading trace x (20 MB)...\n{line}\n") == NOT_ROOT


# -- 2. a /dev/net/tun that makes no TUN device: one line -------------------------------------------------------
@pytest.fixture
def no_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    """``open_tun`` without entering a namespace (the device is opened where the test runs)."""
    monkeypatch.setattr(netns, "in_netns", lambda name: contextlib.nullcontext())
    monkeypatch.setattr(netns, "_write_sysctl", lambda path, value: None)


def test_a_tun_path_that_is_no_tun_device_is_a_testbed_error(tmp_path, monkeypatch, no_namespace):
    fake = tmp_path / "tun"
    fake.write_bytes(b"")  # a regular file where the device should be: TUNSETIFF fails with ENOTTY
    monkeypatch.setattr(netns, "TUN_DEVICE", str(fake))
    with pytest.raises(netns.TestbedError, match=r"cannot create TUN device tw000000-s: Inappropriate ioctl"):
        netns.open_tun("tw000000-srv", "tw000000-s")


def test_a_tun_device_that_cannot_be_opened_is_a_testbed_error(tmp_path, monkeypatch, no_namespace):
    monkeypatch.setattr(netns, "TUN_DEVICE", str(tmp_path))  # a folder: EISDIR, as a device cgroup's EPERM
    with pytest.raises(netns.TestbedError, match=r"cannot open it to create TUN device tw000000-c: Is a directory"):
        netns.open_tun("tw000000-cli", "tw000000-c")


# -- 3. the endpoint client's final count ----------------------------------------------------------------------
class _FastClient:
    """Renders every token at once, reporting each: the endpoint throttles its progress lines to four a second."""

    async def client(self, args: argparse.Namespace, go: Any, progress: Any) -> dict[str, Any]:
        await go()
        for k in range(1, args.tokens + 1):
            progress(k)
        return {"render": [0.0] * args.tokens}


def test_the_endpoint_client_reports_its_final_count_before_done(tmp_path: Path, monkeypatch):
    events: list[dict[str, Any]] = []

    async def go_on_stdin() -> asyncio.StreamReader:
        reader = asyncio.StreamReader()
        reader.feed_data(b"go\n")
        return reader

    monkeypatch.setitem(endpoints.SCHEMES, "stream", _FastClient())
    monkeypatch.setattr(endpoints, "stdin_reader", go_on_stdin)
    monkeypatch.setattr(endpoints, "emit", events.append)
    args = endpoints.build_parser().parse_args(["client", "--scheme", "stream", "--host", "10.213.0.1", "--port",
                                                "4433", "--out", str(tmp_path / "c.json"), "--tokens", "60"])
    assert asyncio.run(endpoints.run_client(args)) == 0
    counts = [ev["progress"] for ev in events if "progress" in ev]
    assert counts[-1] == 60  # was 1: every later count came within 0.25 s of it
    assert events[-1] == {"done": True, "rendered": 60}


# -- 4. status: the up direction's losses and drops ---------------------------------------------------------------
def test_status_shows_the_up_directions_losses_and_drops():
    down = {"delivered_packets": 34, "lost_packets": 0, "tail_drops": 0, "aqm_drops": 0}
    up = {"delivered_packets": 34, "lost_packets": 16, "tail_drops": 2, "aqm_drops": 1}
    assert cli._stats_line({"down": down, "up": up}) == (
        "down: 34 pkts delivered, 0 lost, 0 dropped; up: 34 delivered, 16 lost, 3 dropped")
