"""What a leak hunt found left open on error paths: ``Daemon.start`` closed what it had opened only on
StartupError or a cancel (any other exception after the listeners were up left their UDP sockets and the
housekeeping task open), the testbed's ``_stop_processes`` and ``bench transport``'s ``_one`` never closed their
children's pipes (a descriptor or three per run), and ``predictor.dataset.load`` left numpy's file open on a
truncated ``.npz`` (numpy 2.4's NpzFile() raises after np.load handed it the file)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import subprocess
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tokenwire.daemon.config import parse_config
from tokenwire.daemon.service import Daemon
from tokenwire.predictor.dataset import DatasetError, load
from tokenwire.testbed.topology import _stop_processes
from tokenwire.transport import bench_transport

from .test_loopback import run

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def resource_warnings(action: Callable[[], object]) -> list[str]:
    """The ResourceWarnings of whatever ``action`` left unclosed (collected at once, cycles included); what
    earlier tests left is collected first, not blamed on ``action``."""
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        action()
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def a_daemon() -> Daemon:
    return Daemon(parse_config({"server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": ""}}))


# ------------------------------------------------------------------------------ 1. Daemon.start on any exception
def test_start_closes_its_listeners_when_a_later_step_has_a_bug():
    """A ValueError after the listeners opened (here in ready_status) propagated with the UDP listener, its socket
    and the housekeeping task left open."""
    daemon = a_daemon()

    def broken() -> str:
        raise ValueError("a bug after the listeners opened")

    daemon.ready_status = broken  # type: ignore[method-assign]

    async def main() -> None:
        with pytest.raises(ValueError, match="a bug after the listeners opened"):
            await daemon.start()
        assert daemon._servers and all(s._transport.is_closing() for s in daemon._servers)
        assert daemon._housekeeping is not None
        await asyncio.gather(daemon._housekeeping, return_exceptions=True)  # cancelled by stop()
        assert daemon._housekeeping.cancelled()
        assert daemon._stopped.is_set()

    assert resource_warnings(lambda: run(main())) == []


def test_start_closes_a_listener_whose_tuning_raised(monkeypatch):
    """An OSError from a step right after serve_quic (the socket's tuning) propagated, and the listener it was
    tuning was not in the list stop() closes yet."""
    from tokenwire.daemon import service

    tuned: list[Any] = []

    def tune(transport: Any) -> None:
        tuned.append(transport)
        raise OSError("setsockopt refused")

    monkeypatch.setattr(service, "tune_socket", tune)
    daemon = a_daemon()

    async def main() -> None:
        with pytest.raises(OSError, match="setsockopt refused"):
            await daemon.start()
        assert len(tuned) == 1 and tuned[0].is_closing()
        assert daemon._stopped.is_set()

    assert resource_warnings(lambda: run(main())) == []


def test_start_fails_before_the_serving_signal_handlers_go_in(monkeypatch):
    """ready_status() raising after SIGTERM/SIGINT went to on_stop_signal: a stop signal during the cleanup would
    have drained a daemon that start() was stopping already. It runs before they go in now."""
    daemon = a_daemon()
    daemon._handle_signals = True
    installed: list[tuple[int, Any]] = []

    def broken() -> str:
        raise ValueError("no status")

    daemon.ready_status = broken  # type: ignore[method-assign]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(loop, "add_signal_handler", lambda sig, cb, *a: installed.append((sig, cb)))
        with pytest.raises(ValueError, match="no status"):
            await daemon.start()

    run(main())
    assert installed == []


def test_start_still_says_ready_and_serves_once_started():
    """The success path is the same: READY's status, the handlers in, the listeners open until stop()."""
    daemon = a_daemon()
    daemon._handle_signals = True
    installed: list[int] = []
    ready: list[str] = []
    daemon.notifier.ready = lambda status: ready.append(status) or True  # type: ignore[method-assign]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler = lambda sig, cb, *a: installed.append(sig)  # type: ignore[method-assign]
        await daemon.start()
        try:
            assert not daemon._servers[0]._transport.is_closing()
        finally:
            await daemon.stop()

    run(main())
    assert sorted(installed) == sorted([signal.SIGHUP, signal.SIGTERM, signal.SIGINT])
    assert len(ready) == 1 and ready[0].startswith("listening on udp/127.0.0.1:")


# ------------------------------------------------------------------------------ 2. children's pipes
def pipes_of(proc: subprocess.Popen) -> list[Any]:
    return [s for s in (proc.stdin, proc.stdout, proc.stderr) if s is not None]


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen]]:
    """Children with all three pipes; whatever a test leaves is reaped and closed here."""
    made: list[subprocess.Popen] = []
    yield made
    for proc in made:
        if proc.returncode is None:
            proc.kill()
            subprocess.Popen.wait(proc)
        for stream in pipes_of(proc):
            with contextlib.suppress(OSError):  # (a flush into the dead child's stdin)
                stream.close()


def test_stop_processes_closes_every_pipe_of_a_killed_child(sleepers):
    pipe = subprocess.PIPE
    proc = subprocess.Popen(SLEEPER, stdin=pipe, stdout=pipe, stderr=pipe, text=True)
    sleepers.append(proc)
    assert proc.stdin is not None
    proc.stdin.write("held in the buffer: flushed into a dead child at close")
    children = [proc]
    _stop_processes(children)
    assert children == []
    assert proc.returncode is not None
    assert len(pipes_of(proc)) == 3 and all(s.closed for s in pipes_of(proc))


def test_stop_processes_closes_the_pipes_of_a_child_that_already_exited(sleepers):
    proc = subprocess.Popen([sys.executable, "-c", "pass"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sleepers.append(proc)
    proc.wait()
    _stop_processes([proc])
    assert all(s.closed for s in pipes_of(proc))


def test_stop_processes_closes_the_pipes_when_the_wait_times_out(sleepers):
    """A child the wait gave up on (not reaped within 2 s) is dropped from the list all the same: its pipes too."""

    class Slow(subprocess.Popen):
        def wait(self, timeout: float | None = None) -> int:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)

    proc = Slow(SLEEPER, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sleepers.append(proc)
    _stop_processes([proc])
    assert all(s.closed for s in pipes_of(proc))


def test_stop_processes_closes_the_pipes_when_the_wait_is_interrupted(sleepers):
    class Interrupted(subprocess.Popen):
        def wait(self, timeout: float | None = None) -> int:
            raise KeyboardInterrupt

    proc = Interrupted(SLEEPER, stdout=subprocess.PIPE)
    sleepers.append(proc)
    with pytest.raises(KeyboardInterrupt):
        _stop_processes([proc])
    assert proc.stdout is not None and proc.stdout.closed


def recording_popen(monkeypatch: pytest.MonkeyPatch, cls: type[subprocess.Popen] = subprocess.Popen,
                    ) -> list[subprocess.Popen]:
    """bench_transport's subprocess.Popen (its module only), recording each child it starts."""
    started: list[subprocess.Popen] = []

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen:
        started.append(cls(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(bench_transport, "subprocess", types.SimpleNamespace(Popen=popen, PIPE=subprocess.PIPE))
    return started


def test_bench_transport_run_closes_its_server_pipe(monkeypatch):
    """Each `bench transport` run (a real chatterbox one here) left the server child's stdout pipe open."""
    started = recording_popen(monkeypatch)
    assert resource_warnings(lambda: bench_transport._one("chatterbox", 20, 600.0)) == []
    assert len(started) == 1
    assert started[0].returncode is not None and started[0].stdout is not None and started[0].stdout.closed


def test_bench_transport_run_closes_its_server_pipe_when_the_client_fails(monkeypatch):
    started = recording_popen(monkeypatch)

    async def failing(*args: Any) -> dict[str, Any]:
        raise RuntimeError("the client failed")

    monkeypatch.setattr(bench_transport, "_client_run", failing)

    def one() -> None:
        with pytest.raises(RuntimeError, match="the client failed"):
            bench_transport._one("raw", 5, 0.0)

    assert resource_warnings(one) == []
    assert started[0].returncode is not None and started[0].stdout is not None and started[0].stdout.closed


def test_bench_transport_run_closes_its_server_pipe_when_the_wait_is_interrupted(monkeypatch, sleepers):
    class Interrupted(subprocess.Popen):
        def wait(self, timeout: float | None = None) -> int:
            raise KeyboardInterrupt

    started = recording_popen(monkeypatch, Interrupted)

    async def failing(*args: Any) -> dict[str, Any]:
        raise RuntimeError("the client failed")

    monkeypatch.setattr(bench_transport, "_client_run", failing)
    with pytest.raises(KeyboardInterrupt):
        bench_transport._one("raw", 5, 0.0)
    sleepers.extend(started)  # (the fixture reaps the child the wait left)
    assert started[0].stdout is not None and started[0].stdout.closed


# ------------------------------------------------------------------------------ 3. a truncated .npz
def truncated_npz(tmp_path: Path) -> Path:
    path = tmp_path / "cut.npz"
    with open(path, "wb") as fh:
        np.savez_compressed(fh, a=np.arange(1000.0))
    path.write_bytes(path.read_bytes()[:200])
    return path


def open_on(path: Path) -> list[str]:
    """This process's descriptors open on ``path``."""
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # (the listing's own descriptor, gone by now)
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                fds.append(fd)
    return fds


def test_load_of_a_truncated_npz_closes_the_file(tmp_path: Path):
    """DatasetError as before, and the file closed as it is raised: numpy's file object lived on in the error's
    context (its traceback) and then waited for the garbage collector."""
    path = truncated_npz(tmp_path)
    with pytest.raises(DatasetError) as caught:
        load(path)
    assert open_on(path) == []  # the error (and its context) still alive here
    assert str(caught.value) == f"{path}: not a latency dataset (File is not a zip file)"
    del caught

    def load_it() -> None:
        with pytest.raises(DatasetError):
            load(path)

    assert resource_warnings(load_it) == []


def test_load_of_an_npy_array_still_refused(tmp_path: Path):
    path = tmp_path / "one.npz"
    with open(path, "wb") as fh:
        np.save(fh, np.arange(3.0))
    with pytest.raises(DatasetError, match=r"one \.npy array, not an \.npz archive"):
        load(path)
