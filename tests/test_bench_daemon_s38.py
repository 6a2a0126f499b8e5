"""``tokenwire bench daemon``: the summary says what was delivered and what it cost, the demo's pauses do not set the
rate, the JSON says where and when it was measured, and a session closes only once the daemon has its requests' ends.

A run without ``--json`` printed delays alone; ``--rate 5000 --seconds 4`` ran 54 s (1 % of tokens paused 0.1-0.4 s);
and a 200-session run with every token delivered ended in the daemon's "closing with 197 generated answers whose
clients had not ended their requests": the clients closed at once, and a FIN the loaded daemon's socket dropped was
never sent again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tokenwire.daemon import bench_cli, bench_daemon, demo_upstream
from tokenwire.daemon.config import parse_config
from tokenwire.daemon.service import Daemon
from tokenwire.transport import session as session_mod
from tokenwire.transport.tls import dev_cert

from .test_loopback import run


def _out(**over: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "cpu_us_per_token": 108.03, "daemon_cpu_share_of_wall": 0.273, "client_cpu_share_of_wall": 0.256,
        "wall_s": 31.7, "client_procs": 2, "tokens_delivered": 79_990, "tokens_expected": 80_000, "lost_tokens": 10,
        "duplicate_tokens": 3, "digest_failures": 1, "answers_unfinished": 2, "sessions_connected": 198,
        "sessions_failed_to_connect": 2, "p50_connect_ms": 884.5, "max_connect_ms": 2225.4, "p50_answer_s": 23.8,
        "max_answer_s": 26.5, "udp_receive_buffer_drops": 5544, "request_ends_unacknowledged": 0,
    }
    return {**out, **over}


def test_the_summary_says_what_was_delivered_lost_and_what_it_cost():
    lines = bench_daemon.summary_lines(_out())
    text = "\n".join(lines)
    assert lines[0].startswith("daemon CPU: 108.0 us per delivered token (27 % of one core over 31.7 s")
    assert "79,990 of 80,000 delivered; 10 lost, 3 duplicated; 1 digest failures, 2 answers unfinished" in text
    assert "198 connected, 2 failed to connect; connect p50 884.5 ms, max 2,225.4 ms" in text
    assert "UDP receive-buffer drops on the host (any process's): 5,544" in text
    assert "not acknowledged" not in text  # (said only when some were)
    assert "token delay (render - generation)" in text  # the delay lines stay, after these
    flagged = "\n".join(bench_daemon.summary_lines(_out(request_ends_unacknowledged=7)))
    assert "7 answer ends unacknowledged by the daemon when their session closed" in flagged


def test_a_summary_of_a_run_where_nothing_connected_has_no_none_in_it():
    nan = float("nan")
    text = "\n".join(bench_daemon.summary_lines(_out(cpu_us_per_token=nan, p50_connect_ms=None, max_connect_ms=None)))
    assert "None" not in text and "nan" not in text
    assert "daemon CPU: - us per delivered token" in text


def test_the_pauses_are_the_demos_default_and_off_for_the_bench():
    """The demo keeps its pauses (the same schedule as before, bit for bit); with them off an answer at 5000/s is
    scheduled over ~4 s, not 54 s, and the bench's banner says so."""
    with_pauses = demo_upstream.schedule(20_000, rate=5000.0)
    assert with_pauses == demo_upstream.schedule(20_000, rate=5000.0, pause_prob=0.01)
    assert with_pauses[-1] > 40.0  # (the cap near 400 tokens/s the probe found)
    without = demo_upstream.schedule(20_000, rate=5000.0, pause_prob=0.0)
    assert without[-1] < 5.0
    rate = bench_daemon.scheduled_rate(without)
    assert rate == pytest.approx(5000.0, rel=0.05)
    line = bench_daemon.banner(7, 9, 1, 1, 20_000, 5000.0, "chatterbox", without)
    assert "20000 tokens at 5000/s (chatterbox); each answer scheduled over 4.1" in line
    assert "its first token after 150 ms, then 5,0" in line
    assert bench_daemon.scheduled_rate([0.15]) is None
    assert "then" not in bench_daemon.banner(7, 9, 1, 1, 1, 20.0, "stream", [0.15])


def test_the_bench_daemon_runs_without_the_pauses(tmp_path: Path):
    """The daemon the bench starts runs the demo upstream with its pauses off (and nothing else changed): the entry
    point sets them, then runs ``tokenwire daemon``."""
    cmd = bench_daemon._daemon_command(tmp_path / "x.toml")
    assert cmd[1:4] == ["-m", "tokenwire.daemon.bench_daemon", "--daemon"]
    probe = ("import sys\n"
             "from tokenwire.daemon import bench_daemon, cli, demo_upstream\n"
             "seen = []\n"
             "cli.main = lambda argv: seen.append((argv, demo_upstream.schedule(50, rate=20.0)[-1])) or 0\n"
             "assert bench_daemon._daemon_main('cfg.toml') == 0\n"
             "print(repr(seen))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    without = demo_upstream.schedule(50, rate=20.0, pause_prob=0.0)[-1]
    assert out.stdout.strip() == repr([(["daemon", "--config", "cfg.toml"], without)])
    # (this process: untouched, and the default is the one sim reads)
    assert demo_upstream.schedule.__kwdefaults__["pause_prob"] == 0.01
    assert demo_upstream.schedule(50, rate=20.0)[-1] != without


def test_bench_help_points_to_the_kv_bench(capsys):
    parser = argparse.ArgumentParser(prog="tokenwire")
    bench_cli.register(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--help"])
    assert "tokenwire kv bench" in capsys.readouterr().out


class _Sender:
    def __init__(self, finished: bool) -> None:
        self.is_finished = finished


class _Stream:
    def __init__(self, finished: bool) -> None:
        self.sender = _Sender(finished)


class _Quic:
    def __init__(self, streams: dict[int, _Stream]) -> None:
        self._streams = streams


def test_an_end_is_unacknowledged_until_its_fin_is_or_the_stream_is_gone():
    quic = _Quic({0: _Stream(False), 4: _Stream(True)})
    assert bench_daemon.unacknowledged_ends(quic, [0, 4, 8]) == 1  # 8: dropped by aioquic, both sides done
    assert bench_daemon.unacknowledged_ends(quic, []) == 0


def test_a_run_writes_provenance_and_the_real_schedule(tmp_path: Path, capsys):
    from tokenwire.daemon.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "daemon", "--sessions", "2", "--rate", "200", "--seconds", "0.1", "--client-procs", "1",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    prov = result["provenance"]
    assert prov["cpus"] >= 1 and "start" in prov["load_average"] and prov["wall_s"] > 0
    assert result["demo_pauses"] is False and result["tokens_per_answer"] == 20
    assert result["scheduled_answer_s"] < 0.5  # 20 tokens at 200/s after 150 ms, no pause
    assert result["request_ends_unacknowledged"] == 0
    captured = capsys.readouterr()
    assert "tokens: 40 of 40 delivered; 0 lost, 0 duplicated" in captured.out
    assert "each answer scheduled over" in captured.err


def test_a_session_closes_only_once_the_daemon_has_its_requests_end(tmp_path: Path, monkeypatch):
    """The flight with each client's REPORT and FIN is dropped, and the client has learnt a 9-s round trip (as from
    a loaded daemon's late acknowledgements: a PTO of 13 s). Closing at once, the daemon never heard that the
    requests ended; waiting without PINGs, nothing is sent again within a 5-s wait. The bench's PINGs get the FIN
    declared lost and sent again: the daemon counts both requests completed before the sessions close."""
    cafile, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    dev_cert().write(cafile, key)
    cfg = parse_config({"server": {"listen": ["127.0.0.1:0"], "certificate": str(cafile), "private_key": str(key)},
                        "metrics": {"listen": ""}})
    monkeypatch.setattr(bench_daemon, "CONFIRM_TIMEOUT_S", 5.0)
    dropped = []
    original_fin = session_mod._SessionBase._fin

    def lossy_fin(self: Any, stream_id: int) -> None:
        original_fin(self, stream_id)
        quic = self.quic
        if not quic._is_client:
            return
        quic._loss._rtt_smoothed, quic._loss._rtt_variance = 9.0, 1.0
        send = quic.datagrams_to_send

        def drop_once(now: float) -> list:
            del quic.datagrams_to_send  # (back to the class's method)
            dropped.append(len(send(now=now)))
            return []

        quic.datagrams_to_send = drop_once

    monkeypatch.setattr(session_mod._SessionBase, "_fin", lossy_fin)

    async def go() -> tuple[list, float, float]:
        daemon = Daemon(cfg)
        await daemon.start()
        try:
            results = await bench_daemon._clients(daemon.addresses[0][1], cafile, 2, 5, "chatterbox")
            ended = daemon.metrics.requests_ended
            return (results, ended.labels(outcome="completed")._value.get(),
                    ended.labels(outcome="lost")._value.get())
        finally:
            await daemon.stop()

    results, completed, lost = run(go(), 60)
    assert len(dropped) == 2 and all(dropped)  # each session's flight with its FIN was lost
    assert [r["tokens"] for r in results] == [5, 5]
    assert (completed, lost) == (2, 0)
    assert [r["ends_unacknowledged"] for r in results] == [0, 0]
