"""Benchmarks' child processes under a terminal's Ctrl-C, and options refused up front instead of ignored."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .terminal import default_signals


def _interrupt_group(proc: subprocess.Popen) -> tuple[int, str]:
    """SIGINT to the child's whole process group, as a terminal's Ctrl-C sends it; (exit status, stderr)."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the child did not exit on SIGINT")
    return proc.returncode, err


def test_bench_daemon_worker_exits_quietly_on_ctrl_c(tmp_path: Path):
    """Each client worker printed a KeyboardInterrupt traceback under the parent's single "interrupted"."""
    from tokenwire.daemon import bench_daemon
    from tokenwire.transport.tls import dev_cert

    cafile = tmp_path / "cert.pem"
    cafile.write_bytes(dev_cert().cert_pem)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:  # a "server" that never answers
        sink.bind(("127.0.0.1", 0))
        sink.settimeout(30)
        port = sink.getsockname()[1]
        proc = subprocess.Popen(
            bench_daemon._worker_command(port, cafile, 2, 10, "chatterbox", 1, tmp_path / "out.json"),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
            preexec_fn=default_signals)
        sink.recvfrom(2048)  # its first QUIC Initial: the worker is inside its event loop
        rc, err = _interrupt_group(proc)
    assert "Traceback" not in err, err
    assert rc == 130
    assert not (tmp_path / "out.json").exists()  # no partial results


def test_bench_transport_server_exits_quietly_on_ctrl_c():
    proc = subprocess.Popen([sys.executable, "-m", "tokenwire.transport.bench_transport", "--serve", "raw"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=default_signals)
    assert proc.stdout is not None
    assert "port" in proc.stdout.readline()  # serving
    rc, err = _interrupt_group(proc)
    assert "Traceback" not in err, err
    assert rc == 130


def test_testbed_kv_refuses_workers_without_virtual(capsys):
    """`--workers N` only sizes the virtual run's process pool; the namespace run ignored it silently."""
    from tokenwire.daemon.cli import main

    assert main(["testbed", "kv", "--down-trace", "8mbps", "--workers", "2"]) == 2
    assert "--workers: only the virtual-time run (--virtual)" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--controllers", "fixed-L1,fixed-L1"], ["--chunk-tokens", "100000"]])
def test_testbed_kv_refuses_what_would_fail_or_collapse_later(argv, capsys):
    from tokenwire.daemon.cli import main

    assert main(["testbed", "kv", "--virtual", "--down-trace", "8mbps", *argv]) == 2
    assert argv[0] in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--layers", "3"], ["--heads", "2"], ["--head-dim", "16", "--layers", "2"]])
def test_kv_bench_refuses_a_geometry_with_text(flags, tmp_path, capsys, monkeypatch):
    """`kv bench --text F --layers 3` benchmarked the model's 30 layers and said nothing of the 3."""
    from tokenwire.daemon.cli import main
    from tokenwire.transport.cachegen import bench

    monkeypatch.setattr(bench, "run_bench", lambda **kw: pytest.fail(f"ran with {kw}"))
    text = tmp_path / "t.txt"
    text.write_text("Packets get lost; tokens should not. " * 50)
    assert main(["kv", "bench", "--text", str(text), *flags]) == 2
    err = capsys.readouterr().err
    assert flags[0] in err and "--text" in err


def test_kv_bench_passes_only_the_geometry_given(monkeypatch, capsys):
    from tokenwire.daemon.cli import main
    from tokenwire.transport.cachegen import bench

    seen = []
    monkeypatch.setattr(bench, "run_bench", lambda **kw: seen.append(kw) or {})
    assert main(["kv", "bench", "--layers", "2", "--json", "-"]) == 0
    assert seen[-1]["layers"] == 2 and "heads" not in seen[-1]  # run_bench's own defaults for the rest
    assert main(["kv", "bench", "--json", "-"]) == 0
    assert not {"layers", "heads", "head_dim"} & set(seen[-1])
