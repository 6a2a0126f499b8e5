"""The namespace demo says at once when its daemon dies at start, and `tokenwire chat --param` carries request
parameters (the demo's netns link streamed seed 0's generator whatever --seed said)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tokenwire.daemon.chat_cli import _params
from tokenwire.daemon.cli import CLIError
from tokenwire.daemon.demo_cli import _wait_ready


def test_a_daemon_that_dies_at_start_is_reported_at_once_with_its_last_words(tmp_path):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    errors = tmp_path / "daemon.err"
    with open(errors, "wb") as err:
        daemon = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit('error: no such upstream')"],
                                  stderr=err)
    with pytest.raises(CLIError, match=r"exited at start \(status 1\); it said:\n  error: no such upstream"):
        _wait_ready(notify, daemon, errors)  # (it waited 30 s for a bare TimeoutError)
    notify.close()


def test_the_ready_message_is_returned(tmp_path):
    path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(path)
    daemon = subprocess.Popen([sys.executable, "-c", (
        "import socket, time; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
        f"s.sendto(b'STATUS=starting', {path!r}); s.sendto(b'READY=1\\nSTATUS=udp/10.0.0.1:4433', {path!r}); "
        "time.sleep(5)")])
    try:
        assert "udp/10.0.0.1:4433" in _wait_ready(notify, daemon, tmp_path / "none.err")
    finally:
        daemon.kill()
        daemon.wait()
        notify.close()


def test_chat_params_are_json_values_or_strings():
    assert _params(["seed=3", "temperature=0.2", "stop=[\"\\n\"]", "style=terse", "empty="]) == {
        "seed": 3, "temperature": 0.2, "stop": ["\n"], "style": "terse", "empty": ""}
    with pytest.raises(CLIError, match="KEY=VALUE"):
        _params(["seed"])
    with pytest.raises(CLIError, match="seed given twice"):
        _params(["seed=1", "seed=2"])
