"""Cross traffic that dies mid-run fails the run (netns-testbed/traffic.py watch_senders), in compare and contention:
a sender the kernel refused (an unknown congestion control) left a run reported "with cross traffic" without any."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from tokenwire.testbed.child import ChildError
from tokenwire.testbed.traffic import watch_senders


def _proc(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


def test_only_senders_are_watched_and_an_exit_names_the_sender() -> None:
    sender = _proc("import sys; sys.exit(3)")
    sink = _proc("import sys; sys.exit(0)")  # an on/off sink ends by itself after its idle time: no failure
    children = [SimpleNamespace(proc=sink, name="tcp:cubic sink"),
                SimpleNamespace(proc=sender, name="tcp:cubic sender")]
    watches = watch_senders(children)
    try:
        assert [w.proc for w in watches] == [sender]
        sender.wait(10)
        sink.wait(10)
        with pytest.raises(ChildError, match=r"^cross traffic tcp:cubic sender exited \(status 3\) mid-run$"):
            watches[0].check()
    finally:
        for w in watches:
            w.close()


def test_a_running_sender_passes_the_check() -> None:
    sender = _proc("import time; time.sleep(30)")
    watches = watch_senders([SimpleNamespace(proc=sender, name="udp-ect1:2mbps sender")])
    try:
        watches[0].check()  # still running: no error
    finally:
        for w in watches:
            w.close()
        sender.kill()
        sender.wait(10)

