"""`tokenwire daemon` after its "stopped" line: stop signals ignored, logs flushed, the process gone at once.

Python's own exit took 0.2-5 s more (torch and numba teardown; ~10 s when stopped during the [kv] warm-up) with
the loop's signal handlers gone, and a SIGHUP in that window killed the daemon with status 129."""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest

from tokenwire.daemon import cli, daemon_cli, service

from .daemon_proc import DaemonProcess

STOP_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)


class _Exited(BaseException):
    """What the stand-in for os._exit raises (BaseException: no handler on the way out catches it)."""


@pytest.fixture
def saved_signals():
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


def test_the_cli_ignores_stop_signals_flushes_the_logs_then_exits_once_the_daemon_stopped(
        tmp_path, monkeypatch, saved_signals):
    """The whole CLI path in-process, a real daemon: started, SIGTERM, drained, "stopped"; then finish_process
    must find SIGHUP/SIGTERM/SIGINT ignored and the logs shut down before it ends the process with status 0."""
    config = tmp_path / "tokenwire.toml"
    config.write_text('[server]\nlisten = ["127.0.0.1:0"]\n[metrics]\nlisten = ""\n')
    events: list[object] = []
    monkeypatch.setattr(logging, "shutdown", lambda: events.append("logging.shutdown"))

    def exit_(code: int) -> None:
        events.append({sig: signal.getsignal(sig) for sig in STOP_SIGNALS})
        events.append(("exit", code))
        raise _Exited

    monkeypatch.setattr(os, "_exit", exit_)
    real_start = service.Daemon.start

    async def start_then_term(self: service.Daemon) -> None:
        await real_start(self)  # (its handlers are in: the TERM drains)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(service.Daemon, "start", start_then_term)
    stopped: list[bool] = []
    real_stop = service.Daemon.stop

    async def stop(self: service.Daemon) -> None:
        await real_stop(self)
        stopped.append(True)

    monkeypatch.setattr(service.Daemon, "stop", stop)
    with pytest.raises(_Exited):
        cli.main(["daemon", "--config", str(config)])
    assert stopped == [True]
    assert events == ["logging.shutdown", dict.fromkeys(STOP_SIGNALS, signal.SIG_IGN), ("exit", 0)]


def test_service_run_daemon_calls_when_stopped_on_its_loop_after_the_daemon_stopped(
        tmp_path, monkeypatch, caplog, saved_signals):
    """Called before the loop's close: with the [kv] warm-up's thread still compiling, the close joined it for
    seconds first. Here the loop must still be running when the hook runs."""
    import asyncio

    config = tmp_path / "tokenwire.toml"
    config.write_text('[server]\nlisten = ["127.0.0.1:0"]\n[metrics]\nlisten = ""\n')
    from tokenwire.daemon.config import load_config

    real_start = service.Daemon.start

    async def start_then_term(self: service.Daemon) -> None:
        await real_start(self)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(service.Daemon, "start", start_then_term)
    seen: list[tuple[bool, bool]] = []

    def when_stopped() -> None:
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        seen.append((on_loop, "stopped" in caplog.text))

    with caplog.at_level(logging.INFO, logger="tokenwire.daemon"):
        service.run_daemon(load_config(config), when_stopped=when_stopped)
    assert seen == [(True, True)]


def test_a_sighup_right_after_stopped_does_not_kill_the_daemon(tmp_path):
    """The probe's case as a process: SIGTERM, "stopped" in the log, then SIGHUP (a reload racing the stop).
    It was status 129 (-SIGHUP here) whenever the HUP came before the interpreter's slow exit ended."""
    d = DaemonProcess(tmp_path)
    try:
        d.signal(signal.SIGTERM)
        d.wait_for("STOPPING")  # systemd hears it before the end
        deadline = time.monotonic() + 20
        while "stopped" not in d.log():
            assert d.proc.poll() is None, d.log()  # it exits only after saying so
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.005)
        if d.proc.poll() is None:
            d.signal(signal.SIGHUP)
        code = d.proc.wait(20)  # (a generous bound on a hang; it is at once now)
        log = d.log()
    finally:
        d.stop()
    assert code == 0, log
    assert log.rstrip().endswith("stopped"), log  # flushed, and nothing after it


def test_finish_process_waits_for_a_kv_worker_still_writing_a_chunk(monkeypatch, saved_signals):
    """stop() gives the KV workers a bound; one still inside a chunk's write past it was waited for by the
    interpreter's exit, and still is (its chunk lands whole)."""
    import threading

    monkeypatch.setattr(logging, "shutdown", lambda: None)
    release = threading.Event()
    done: list[str] = []

    def work(name: str) -> None:
        release.wait(30)
        done.append(name)

    worker = threading.Thread(target=work, args=("kv",), name=f"{daemon_cli.KV_WORKER_PREFIX}store_0")
    worker.start()
    exits: list[list[str]] = []

    def exit_(code: int) -> None:
        exits.append(list(done))
        raise _Exited

    monkeypatch.setattr(os, "_exit", exit_)
    timer = threading.Timer(0.2, lambda: (done.append("released"), release.set()))
    timer.start()
    try:
        with pytest.raises(_Exited):
            daemon_cli.finish_process(0)
    finally:
        release.set()
        worker.join(30)
        timer.cancel()
    assert exits and "kv" in exits[0]


def test_finish_process_waits_for_a_stuck_kv_worker_a_bounded_time(monkeypatch, saved_signals):
    """With the stop signals ignored, a worker stuck in a write must not hold the process for ever."""
    import threading

    monkeypatch.setattr(logging, "shutdown", lambda: None)
    monkeypatch.setattr(daemon_cli, "KV_WORKER_WAIT_S", 0.05)
    release = threading.Event()
    worker = threading.Thread(target=release.wait, args=(30,), name=f"{daemon_cli.KV_WORKER_PREFIX}ingest_0")
    worker.start()
    alive: list[bool] = []

    def exit_(code: int) -> None:
        alive.append(worker.is_alive())
        raise _Exited

    monkeypatch.setattr(os, "_exit", exit_)
    try:
        with pytest.raises(_Exited):
            daemon_cli.finish_process(0)
    finally:
        release.set()
        worker.join(30)
    assert alive == [True]  # it exited without it


def test_the_exits_wait_for_a_kv_worker_is_in_what_systemd_is_asked_for():
    """finish_process may wait KV_WORKER_WAIT_S after "stopped", signals ignored: STOPPING's extension counts it
    (else systemd's SIGKILL at the extension's end failed the stop)."""
    from tokenwire.daemon import daemon_cli, service

    assert daemon_cli.KV_WORKER_WAIT_S == service.KV_WORKER_WAIT_S > 0
