"""Small fixes (s33): the reload's restart lines say what is new, ``tokenwire demo --port``, kv_client's
CertificateFileError, run_kv_virtual interrupted from Python, and a FIFO trace read twice in one process."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tests.ports import free_udp_port
from tokenwire.daemon.config import load_config
from tokenwire.daemon.service import Daemon

# ------------------------------------------------------------------ 1. a reload with a restart already pending
BASE = '[server]\nlisten = ["127.0.0.1:0"]\n[metrics]\nlisten = ""\n'
IDLE_30 = BASE.replace("[metrics]", "idle_timeout_s = 30\n[metrics]")


def _reload(d: Daemon, caplog, path: Path, text: str) -> list[tuple[int, str]]:
    path.write_text(text)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tokenwire.daemon"):
        assert d.reload() is True
    return [(r.levelno, r.getMessage()) for r in caplog.records if "restart" in r.getMessage()
            and not r.getMessage().startswith("reloaded")]


def test_a_reload_with_the_same_restart_pending_says_so_once_at_info(tmp_path, caplog):
    """Each SIGHUP, the file untouched, logged "changes to server need a restart and were not applied" again at
    WARNING: it read as if new changes had been refused."""
    path = tmp_path / "tokenwire.toml"
    path.write_text(BASE)
    d = Daemon(load_config(path))
    first = _reload(d, caplog, path, IDLE_30)
    assert [lv for lv, _ in first] == [logging.WARNING, logging.WARNING]
    assert "changes to server need a restart and were not applied" in first[0][1]
    again = _reload(d, caplog, path, IDLE_30)
    assert len(again) == 1 and again[0][0] == logging.INFO, again
    assert "restart still pending: server.idle_timeout_s" in again[0][1]
    assert "need a restart and were not applied" not in caplog.text
    # a reloadable change beside it is not a restart-needing one
    same = _reload(d, caplog, path, IDLE_30 + "[limits]\nmax_tokens = 5\n")
    assert [lv for lv, _ in same] == [logging.INFO]
    assert d.status_line().startswith("restart pending: server.idle_timeout_s (see the log); ")


def test_a_reload_that_changes_the_pending_set_names_what_changed(tmp_path, caplog):
    path = tmp_path / "tokenwire.toml"
    path.write_text(BASE)
    d = Daemon(load_config(path))
    _reload(d, caplog, path, IDLE_30)
    # a new key: a WARNING naming it alone as new, then the whole pending set
    both = IDLE_30.replace("[metrics]", 'congestion = "cubic"\n[metrics]')
    lines = _reload(d, caplog, path, both)
    assert lines[0] == (logging.WARNING, "reload: new changes to server.congestion need a restart and were "
                                         "not applied"), lines
    assert lines[1][0] == logging.WARNING
    assert "restart pending: server.congestion, server.idle_timeout_s" in lines[1][1]
    # the same key changed again: new too
    lines = _reload(d, caplog, path, both.replace("idle_timeout_s = 30", "idle_timeout_s = 40"))
    assert lines[0] == (logging.WARNING, "reload: new changes to server.idle_timeout_s need a restart and were "
                                         "not applied"), lines
    # one reverted: said at INFO, the other still pending (not new)
    lines = _reload(d, caplog, path, BASE.replace("[metrics]", 'congestion = "cubic"\n[metrics]'))
    assert [lv for lv, _ in lines] == [logging.INFO, logging.INFO], lines
    assert lines[0][1].startswith("reload: server.idle_timeout_s back to what runs: no longer pending a restart")
    assert "restart still pending: server.congestion" in lines[1][1]
    # all reverted
    lines = _reload(d, caplog, path, BASE)
    assert lines == [(logging.INFO, "reload: server.congestion back to what runs: no longer pending a "
                                    "restart (none is now)")]
    assert d.status_line().startswith("listening on ")


# ------------------------------------------------------------------------------------------ 2. demo --port
RELAY = ["demo", "--link", "relay", "--quiet", "--delay-ms", "0", "--rate", "10000", "--loss", "none",
         "--tokens", "5", "--schemes", "stream"]


def test_demo_listens_on_the_port_given_and_says_so(capsys):
    from tokenwire.daemon.cli import main

    port = free_udp_port()
    assert main([*RELAY, "--port", str(port)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert f"on udp/127.0.0.1:{port};" in first, first


def test_demo_port_taken_is_a_one_line_error_naming_the_option(capsys):
    import socket

    from tokenwire.daemon.cli import main

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        assert main([*RELAY, "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"tokenwire demo: error: --port {port}: server.listen: cannot listen on "
                          f"udp/127.0.0.1:{port}"), err


def test_demo_port_out_of_range_is_refused_at_parsing(capsys):
    import pytest

    from tokenwire.daemon.cli import main

    with pytest.raises(SystemExit) as exc:
        main([*RELAY, "--port", "70000"])
    assert exc.value.code == 2
    assert "--port: port 70000 is not a UDP port number (0 to 65535)" in capsys.readouterr().err


# ------------------------------------------------------------------ 3. kv_client exports CertificateFileError
def test_kv_client_exports_the_certificate_error_connect_kv_raises(tmp_path):
    """connect_kv raised tls.CertificateFileError, which the KV client module did not export (client.py does)."""
    import asyncio

    import pytest

    from tokenwire.transport import kv_client, tls

    assert kv_client.CertificateFileError is tls.CertificateFileError
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")

    async def connect() -> None:
        async with kv_client.connect_kv("127.0.0.1", 9, cafile=bad, warm=False, timeout=5):
            pass  # pragma: no cover

    with pytest.raises(kv_client.CertificateFileError):
        asyncio.run(connect())


# ------------------------------------------------------- 4. run_kv_virtual interrupted from Python (not the CLI)
_KV_CALLER = """
import multiprocessing, sys
from tokenwire.testbed import kv_vsim
from tokenwire.testbed.kv_eval import KVEvalConfig

real_wait = kv_vsim.wait
said = []

def wait(futures, **kw):  # the pool's workers are started: say which (once)
    if not said:
        said.append(print("workers", *[p.pid for p in multiprocessing.active_children()], flush=True))
    return real_wait(futures, **kw)

kv_vsim.wait = wait
# three controllers on two workers, each ~0.7 s a fetch: hours of work, one controller queued
cfg = KVEvalConfig(down_trace="8mbps", up_trace="8mbps", delay_ms=10, context_tokens=512, chunk_tokens=128,
                   deadline_ms=8000, controllers=["tokenwire", "fixed-L1", "fixed-L3"], repeats=5000,
                   recompute_us_per_token=50_000, synthetic=(8, 4, 64))
try:
    kv_vsim.run_kv_virtual(cfg, workers=2)
except KeyboardInterrupt:
    print("interrupted; children left:", len(multiprocessing.active_children()), flush=True)
"""


def test_a_python_callers_ctrl_c_ends_run_kv_virtuals_workers_and_returns(tmp_path):
    """Called from Python, run_kv_virtual's KeyboardInterrupt waited in the pool's shutdown for every controller,
    running and queued, to run to its end (here hours); only the CLI's signal handler terminated the workers."""
    import contextlib
    import os
    import select
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _KV_CALLER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # (its own session: the SIGINT reaches it alone)
    fds: list[int] = []
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("workers "), line + (proc.stderr.read() if proc.stderr else "")
        workers = [int(p) for p in line.split()[1:]]
        assert len(workers) == 2
        fds = [os.pidfd_open(pid) for pid in workers]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)  # (a bound on a hang: it returns within a second or two)
        assert proc.returncode == 0, err
        assert "interrupted; children left: 0" in out, out + err
        for fd in fds:  # a pidfd turns readable once its process has exited
            readable, _, _ = select.select([fd], [], [], 0)
            assert readable, "a worker of run_kv_virtual outlived its interrupt"
    finally:  # the workers first: they hold the child's stdout, which its communicate() reads to the end
        for fd in fds:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# ------------------------------------------------------------- 5. a FIFO fed again by a new writer, same process
def _write_once(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)  # (waits for a reader: that wait is all a reader could ever see of it)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def test_a_fifo_fed_again_is_read_again_after_forget_trace(tmp_path):
    """Two experiments in one process from one FIFO path, each fed by a new writer: the second got the first
    parse back and its writer stayed blocked in open(2) forever. forget_trace is the caller's way to say so."""
    import threading

    from tokenwire.testbed.trace import forget_trace, load_trace

    fifo = str(tmp_path / "t.fifo")
    os.mkfifo(fifo)
    writers: list[threading.Thread] = []

    def feed(data: bytes) -> threading.Thread:
        writers.append(threading.Thread(target=_write_once, args=(fifo, data), daemon=True))
        writers[-1].start()
        return writers[-1]

    try:
        first_writer = feed(b"".join(b"%d\n" % k for k in range(1, 101)))
        first = load_trace(fifo)
        first_writer.join(10)
        assert len(first) == 100
        assert load_trace(fifo) is first  # the same run's second look: read once (no writer comes again)
        assert forget_trace(fifo) is True
        second_writer = feed(b"5\n10\n")
        second = load_trace(fifo)
        second_writer.join(10)
        assert not second_writer.is_alive()  # it was let in, not left blocked
        assert list(second.stamps_ms) == [5, 10]
        assert load_trace(fifo) is second
        assert forget_trace(str(tmp_path / "missing")) is False
    finally:
        for w in writers:  # one left blocked in its open: a reader lets it in, and it ends on the closed pipe
            if w.is_alive():
                fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
                w.join(1)
                os.close(fd)
                w.join(10)
