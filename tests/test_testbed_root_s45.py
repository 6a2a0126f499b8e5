"""Root tests of the session-45 leftovers: Ctrl-\\ (SIGQUIT) tears a foreground `testbed up` down, and a detached run
whose emulator dies leaves a record of why that `status` shows and `down` removes (root; CI runs as root)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no TUN device"),
]

from tokenwire.testbed.netns import STATE_DIR, RunState, netns_exists  # noqa: E402
from tokenwire.testbed.topology import wait_for  # noqa: E402

TOKENWIRE = [sys.executable, "-c", "import sys; from tokenwire.daemon.cli import main; sys.exit(main())"]


def _terminal_signals() -> None:
    """A ``preexec_fn``: the signals a terminal's foreground job has at their defaults (a background test run
    passes SIGINT and SIGQUIT down ignored, and an ignored one is rightly left ignored)."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


def _tokenwire(*args: str) -> str:
    return subprocess.run([*TOKENWIRE, *args], capture_output=True, text=True, check=True, timeout=60).stdout


def test_cli_up_tears_down_on_ctrl_backslash():
    """SIGQUIT killed it (status -3) and left both namespaces and the state file, as SIGKILL does."""
    with subprocess.Popen([*TOKENWIRE, "testbed", "up", "--json", "--delay-ms", "5"], stdout=subprocess.PIPE,
                          text=True, preexec_fn=_terminal_signals) as proc:
        try:
            info = json.loads(proc.stdout.readline())
            proc.send_signal(signal.SIGQUIT)
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if "info" in locals():
                subprocess.run([*TOKENWIRE, "testbed", "down", info["run_id"]], capture_output=True, check=False)
    assert not netns_exists(info["server_ns"]) and not netns_exists(info["client_ns"])
    assert not os.path.exists(RunState(info["run_id"], 0).path)


def test_a_detached_run_whose_emulator_dies_says_why_in_status_until_down():
    """It tore itself down with its log, and `status` said "no testbed runs": the reason was lost."""
    info = json.loads(_tokenwire("testbed", "up", "--detach", "--json", "--delay-ms", "5"))
    run_id = info["run_id"]
    record = os.path.join(STATE_DIR, f"{run_id}.ended")
    try:
        os.kill(info["emulator_pid"], signal.SIGKILL)
        wait_for(lambda: os.path.exists(record), 15, "the run's record of how it ended")
        assert not netns_exists(info["server_ns"]) and not netns_exists(info["client_ns"])
        out = _tokenwire("testbed", "status")
        assert re.search(rf"^{run_id} ended \d\d:\d\d:\d\d: emulator exited \(status -9\)$", out, re.M), out
        assert _tokenwire("testbed", "down", run_id) == f"removed the record of how {run_id} ended\n"
        assert run_id not in _tokenwire("testbed", "status")
        assert not os.path.exists(record)
    finally:
        subprocess.run([*TOKENWIRE, "testbed", "down", run_id], capture_output=True, check=False)
