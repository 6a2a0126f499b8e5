"""``testbed compare``: a dead link emulator is named at once (not the client, 60 s later), an endpoint's error is its
exception's line (not eight lines of traceback), and a run that stops after finished runs hands them over."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from typing import Any

import pytest

from tokenwire.testbed import compare
from tokenwire.testbed.child import Child, ChildError, ExitWatch, last_error_line
from tokenwire.testbed.compare import CompareConfig, CompareError, SchemeRun
from tokenwire.testbed.netns import TestbedError

# an endpoint stand-in speaking the harness's protocol: the server is ready at once, the client connects, takes
# "go" and then never answers (what a client does whose path went: it waits out its QUIC idle timeout)
_ENDPOINT = r"""
import json, sys
role = sys.argv[1]
print(json.dumps({"ready": True} if role == "server" else {"connected": True}), flush=True)
for line in sys.stdin:
    if role == "server" and line.strip() == "stop":
        print(json.dumps({"stopped": True}), flush=True)
"""


class _EmulatorTestbed:
    """Stands in for :class:`Testbed` (no namespaces) with a real emulator process, which ``origin()`` (called
    just before the client's "go") kills: the link emulator dying mid-run."""

    server_ns, client_ns, server_addr = "tw000000-srv", "tw000000-cli", "10.213.0.1"
    backend, backend_reason = "userspace", ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.children: list[subprocess.Popen] = []
        self.emulator: subprocess.Popen | None = None

    def emulator_failure(self) -> str:
        return ""  # (a SIGKILL leaves no error line)

    def __enter__(self) -> _EmulatorTestbed:
        self.emulator = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                                         stdin=subprocess.PIPE)
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in [*self.children, self.emulator]:
            assert proc is not None
            proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()

    def popen(self, ns: str, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        role = "server" if ns == self.server_ns else "client"
        proc = subprocess.Popen([sys.executable, "-c", _ENDPOINT, role], **kwargs)
        self.children.append(proc)
        return proc

    def origin(self) -> float:
        assert self.emulator is not None
        self.emulator.kill()
        return 0.0


def test_the_emulators_exit_ends_the_run_at_once_and_is_the_error(monkeypatch, tmp_path):
    """The emulator killed mid-run: compare waited out the client's 60-s QUIC idle timeout, then blamed the client
    ("chatterbox client exited (status 1): ... RemoteError: no packet from the server for 60 s"). Here the client
    never answers: without the watch on the emulator this ends at the run's deadline, with the client's error."""
    monkeypatch.setattr(compare, "Testbed", _EmulatorTestbed)
    cfg = CompareConfig(down_trace="12mbps", up_trace="12mbps", schemes=["chatterbox"], tokens=5, timeout_s=20.0)
    with pytest.raises(CompareError) as info:
        compare.run_scheme("chatterbox", cfg, 0, str(tmp_path))
    assert str(info.value) == ("testbed: link emulator exited (status -9: killed by SIGKILL) during chatterbox "
                               "seed 0")


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polled"])
def test_a_watched_exit_ends_a_wait_on_another_process(monkeypatch, pidfd):
    """The watched process exits during the wait (once it is in poll(), on the client's pipe): the wait ends with
    the watched process's error, through its pidfd, or where ``pidfd_open`` is missing by polling it. Without
    either the wait went on until the client spoke (here: "connected", 10 s later) and the exit went unnoticed."""
    import select

    if not pidfd:
        monkeypatch.delattr(os, "pidfd_open")
    sleeper = [sys.executable, "-c", "import sys; sys.stdin.read()"]
    late = [sys.executable, "-c", "import json, sys, time; time.sleep(10); "
            "sys.stdout.write(json.dumps({'connected': True}) + '\\n')"]  # one write: the line whole
    real_poll = select.poll
    with (subprocess.Popen(sleeper, stdin=subprocess.PIPE) as emu,
          subprocess.Popen(late, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as client):

        class ExitThenPoll:  # select.poll(), whose first wait makes the emulator exit (after the wait began)
            def __init__(self) -> None:
                self.poller = real_poll()

            def register(self, *args: Any) -> None:
                self.poller.register(*args)

            def poll(self, *args: Any) -> Any:
                if emu.poll() is None:
                    emu.send_signal(signal.SIGTERM)
                    emu.wait()
                return self.poller.poll(*args)

        watch = ExitWatch(emu, lambda status: ChildError(f"emulator gone ({status})"))
        assert (watch.fd is not None) == pidfd
        monkeypatch.setattr(select, "poll", ExitThenPoll)
        try:
            with pytest.raises(ChildError, match=r"^emulator gone \(-15\)$"):
                Child(client, "x client", watches=[watch]).wait_for("connected", 60)
        finally:
            monkeypatch.undo()
            client.kill()
            watch.close()


def _failing_child(tmp_path, code: str, *, kept: bool) -> str:
    err = tmp_path / "client.stderr"
    with (open(err, "w") as fh,
          subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=fh,
                           text=True) as proc,
          pytest.raises(ChildError) as info):
        Child(proc, "chatterbox client", str(err), stderr_kept=kept).wait_for("connected", 30)
    return str(info.value)


def test_an_endpoints_error_is_its_exceptions_line_not_its_traceback(tmp_path):
    """child.py put the last 8 stderr lines (a traceback) into the error, which the CLI escaped onto one line."""
    code = ("def connect():\n    raise __import__('json').JSONDecodeError('no packet from the server', 'x', 0)\n"
            "connect()\n")
    msg = _failing_child(tmp_path, code, kept=False)
    assert msg == ("chatterbox client exited (status 1): JSONDecodeError: no packet from the server: line 1 "
                   "column 1 (char 0)")
    # with --keep the file with the whole traceback outlives the run: the error says where it is
    msg = _failing_child(tmp_path, code, kept=True)
    assert msg.endswith(f"(char 0) (its stderr: {tmp_path / 'client.stderr'})") and "\n" not in msg
    assert "Traceback" in (tmp_path / "client.stderr").read_text()


def test_the_error_line_of_an_exception_group_and_of_plain_stderr(tmp_path):
    """asyncio's TaskGroup ends a process with an exception group: its last lines are frames ("+----"), not
    the error; and a child whose stderr is no traceback keeps its last line as it is."""
    code = "raise ExceptionGroup('unhandled errors in a TaskGroup', [OSError(101, 'Network is unreachable')])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stderr.rstrip().endswith("+------------------------------------")
    assert last_error_line(proc.stderr) == "OSError: [Errno 101] Network is unreachable"
    assert last_error_line("warning: x.y\nharness went away before 'go'\n\n") == "harness went away before 'go'"
    assert last_error_line("") == ""


def test_the_quic_clients_sdk_errors_are_one_line(monkeypatch):
    """The QUIC client let the SDK's RemoteError (the idle timeout) escape as a traceback; sse-tcp's client
    already reported its failures as one line ({"error": ...})."""
    import argparse

    from tokenwire.testbed import endpoints
    from tokenwire.transport import client as sdk_client
    from tokenwire.transport.errors import RemoteError

    def connect(*args: Any, **kwargs: Any) -> Any:
        raise RemoteError("no packet from the server for 60 s (QUIC idle timeout): server or path gone")

    monkeypatch.setattr(sdk_client, "connect", connect)
    args = argparse.Namespace(host="10.213.0.1", port=8443, scheme="chatterbox", marking=None)

    async def go() -> None:
        pass

    with pytest.raises(endpoints.EndpointFailed) as info:
        asyncio.run(endpoints._quic_client(args, go, lambda k: None))
    assert str(info.value) == ("RemoteError: no packet from the server for 60 s (QUIC idle timeout): server or "
                               "path gone")


class _FailingTestbed(_EmulatorTestbed):
    def __enter__(self) -> _EmulatorTestbed:
        raise TestbedError("emulator exited (status 1)")


def test_a_testbed_that_does_not_come_up_names_scheme_and_seed(monkeypatch, tmp_path):
    monkeypatch.setattr(compare, "Testbed", _FailingTestbed)
    cfg = CompareConfig(down_trace="12mbps", up_trace="12mbps", schemes=["stream"], tokens=5)
    with pytest.raises(CompareError, match=r"^stream \(seed 3\): testbed: emulator exited \(status 1\)$"):
        compare.run_scheme("stream", cfg, 3, str(tmp_path))


# -- a failure or an interrupt after finished runs: they are handed over, marked incomplete
def _run(scheme: str, seed: int, delay: float) -> SchemeRun:
    gen = [0.1 * i for i in range(10)]
    return SchemeRun(scheme=scheme, seed=seed, origin=0.0, request_time=0.0, request_arrival=0.0, gen=gen,
                     render=[g + delay for g in gen], text_ok=True, wire_bytes=0, down_packets=10, down_lost=0,
                     deliveries=[(g, g + delay) for g in gen], lost_times=[], emulator={}, base_delay=0.05)


def _fake_runs(monkeypatch, stop_at: int, exc: BaseException) -> None:
    """run_scheme: the first ``stop_at`` runs finish, the next raises ``exc``."""
    calls = [0]

    def fake_run_scheme(scheme, cfg, seed, wd, progress=None, *, scratch=None):
        calls[0] += 1
        if calls[0] > stop_at:
            raise exc
        return _run(scheme, seed, 0.06 if scheme == "chatterbox" else 0.08)

    monkeypatch.setattr(compare, "run_scheme", fake_run_scheme)


def test_an_interrupt_at_the_last_run_hands_over_the_finished_ones(monkeypatch, tmp_path):
    """Ctrl-C at run [4/4] of `--runs 2` threw the three finished runs away (no JSON)."""
    from tokenwire.daemon.cli import save_json

    _fake_runs(monkeypatch, 3, KeyboardInterrupt())
    cfg = CompareConfig(down_trace="12mbps", up_trace="12mbps", delay_ms=50.0, schemes=["chatterbox", "stream"],
                        tokens=10, runs=2)
    got: list[dict[str, Any]] = []
    with pytest.raises(KeyboardInterrupt):  # still an interrupt (the CLI's 130)
        compare.run_compare(cfg, workdir=str(tmp_path / "keep"), on_partial=got.append)
    [doc] = got
    assert doc["complete"] is False and doc["stopped_by"] == "interrupt" and doc["error"] == "interrupted"
    # no top-level schemes/comparison/oracle: nothing that reads the complete JSON takes this one for it
    assert not {"schemes", "comparison", "oracle", "base_delay_ms"} & set(doc)
    assert doc["stopped_at"] == {"scheme": "stream", "seed": 1}
    assert doc["runs_missing"] == [{"scheme": "stream", "seed": 1, "why": "interrupted"}]
    rows = [(r["scheme"], r["seed"], r["seed_complete"]) for r in doc["runs_finished"]]
    assert rows == [("chatterbox", 0, True), ("stream", 0, True), ("chatterbox", 1, False)]
    assert all(r["tokens_rendered"] == 10 and r["digest_ok"] for r in doc["runs_finished"])
    seeds = doc["complete_seeds"]
    assert seeds["seeds"] == [0] and set(seeds["schemes"]) == {"chatterbox", "stream"}
    assert seeds["comparison"]["vs"]["stream"]["stall_ratio_change_per_seed"] is not None
    assert seeds["base_delay_ms"] == pytest.approx([60.0])  # the least delay of that seed's schemes
    assert compare.describe_partial(doc) == "3 of 4 runs finished (stopped at stream seed 1)"
    save_json(tmp_path / "partial.json", doc)  # strict JSON (NaN as null), as --json writes
    assert json.loads((tmp_path / "partial.json").read_text())["complete"] is False


def test_a_failure_in_the_second_scheme_hands_over_the_first(monkeypatch, tmp_path):
    """The trace deleted while compare runs: the 2nd scheme's emulator failed and the 1st scheme's run was lost."""
    err = CompareError("stream (seed 0): testbed: emulator exited (status 1)")
    _fake_runs(monkeypatch, 1, err)
    cfg = CompareConfig(down_trace="12mbps", up_trace="12mbps", schemes=["chatterbox", "stream", "sse-tcp"],
                        tokens=10)
    got: list[dict[str, Any]] = []
    with pytest.raises(CompareError) as info:
        compare.run_compare(cfg, workdir=str(tmp_path / "keep"), on_partial=got.append)
    assert info.value is err
    [doc] = got
    assert doc["stopped_by"] == "error" and doc["error"] == str(err) and doc["complete_seeds"] is None
    assert doc["runs_missing"] == [
        {"scheme": "stream", "seed": 0, "why": str(err)},
        {"scheme": "sse-tcp", "seed": 0, "why": "not run: the run stopped before it"},
    ]
    [row] = doc["runs_finished"]
    assert row["scheme"] == "chatterbox" and not row["seed_complete"] and row["stall_ratio"] is not None


def test_nothing_is_handed_over_before_a_run_finished(monkeypatch, tmp_path):
    _fake_runs(monkeypatch, 0, CompareError("chatterbox (seed 0): testbed: emulator exited (status 1)"))
    cfg = CompareConfig(down_trace="12mbps", up_trace="12mbps", schemes=["chatterbox"], tokens=10)
    got: list[dict[str, Any]] = []
    with pytest.raises(CompareError):
        compare.run_compare(cfg, workdir=str(tmp_path / "keep"), on_partial=got.append)
    assert got == []


def test_a_complete_runs_json_says_complete(monkeypatch, tmp_path):
    """A complete JSON is the same document plus "complete": true, the key a partial one has false."""
    _fake_runs(monkeypatch, 4, AssertionError("no fifth run"))
    cfg = CompareConfig(down_trace="12mbps", up_trace="12mbps", schemes=["chatterbox", "stream"], tokens=10,
                        runs=2)
    summary, runs = compare.run_compare(cfg, workdir=str(tmp_path / "keep"), on_partial=pytest.fail)
    assert summary["complete"] is True
    assert set(summary) == {"schemes", "comparison", "oracle", "config", "backend", "backend_reason",
                            "base_delay_ms", "complete"}
    assert [len(rs) for rs in runs.values()] == [2, 2]


def test_the_emulators_error_line_comes_from_its_stderr_file(tmp_path):
    """The emulator's traceback went to the terminal and the error said only "emulator exited (status 1)": its
    stderr goes to a file, and the error ends with the file's last error line."""
    from tokenwire.testbed.topology import Testbed

    err = tmp_path / "emulator.stderr"
    err.write_text('Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n'
                   "tokenwire.testbed.trace.TraceError: tm.trace: no such trace file\n")
    assert Testbed(emulator_stderr=str(err)).emulator_failure() == ": TraceError: tm.trace: no such trace file"
    assert Testbed(emulator_stderr=str(tmp_path / "none")).emulator_failure() == ""
    assert Testbed().emulator_failure() == ""
