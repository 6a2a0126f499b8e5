"""``tokenwire bench daemon --answers N``: N concurrent answers on each session's one connection.

The benchmark measured one answer per connection, so it could not show per-connection costs (a transmit per token
built datagrams over every stream of a connection: 4x the daemon's CPU with 64 answers on one connection). Each
answer is checked on its own: its tokens, its digest, and a refused or failed answer counts whole as lost.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenwire.daemon import bench_daemon
from tokenwire.daemon.cli import main
from tokenwire.daemon.config import parse_config
from tokenwire.daemon.service import Daemon
from tokenwire.transport.tls import dev_cert

from .test_loopback import run


def test_every_answer_of_every_session_is_delivered_and_verified(tmp_path: Path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "daemon", "--sessions", "2", "--answers", "3", "--rate", "200", "--seconds", "0.1",
            "--client-procs", "1", "--json", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["answers_per_session"] == 3
    assert result["tokens_expected"] == result["tokens_delivered"] == 2 * 3 * 20
    assert (result["lost_tokens"], result["duplicate_tokens"], result["digest_failures"]) == (0, 0, 0)
    assert "2 sessions x 3 answers x 20 tokens" in capsys.readouterr().err


def test_an_answer_the_daemon_refuses_is_lost_whole_and_named(tmp_path: Path):
    """Three answers where the daemon generates two at a time: the third is refused, and the session's record says
    so instead of passing the two that arrived off as the whole run."""
    cafile, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    dev_cert().write(cafile, key)  # the benchmark's clients verify the daemon's certificate, as the CLI's do
    cfg = parse_config({"server": {"listen": ["127.0.0.1:0"], "certificate": str(cafile), "private_key": str(key)},
                        "metrics": {"listen": ""}, "limits": {"max_live_answers": 2}})

    async def go():
        daemon = Daemon(cfg)
        await daemon.start()
        try:
            return await bench_daemon._clients(daemon.addresses[0][1], cafile, 1, 5, "chatterbox", answers=3)
        finally:
            await daemon.stop()

    (rec,) = run(go(), 60)
    assert rec["tokens"] == 10 and rec["lost"] == 5
    assert rec["digests_ok"] == 2 and rec["answers"] == 3
    assert rec["error"].startswith("1 of 3 answers failed, the first: ")


def test_answers_beyond_the_daemons_bound_are_refused_before_anything_starts(capsys):
    assert main(["bench", "daemon", "--answers", "10001", "--seconds", "1"]) == 2
    assert "--answers must be in [1, 10,000] (the daemon's limits.max_requests_per_connection), got 10001" in \
        capsys.readouterr().err


def test_sessions_times_answers_beyond_the_daemons_live_answers_are_refused_up_front(capsys):
    """--sessions 101 --answers 10000 made the daemon refuse "limits.max_live_answers: ... got 1010064", a setting
    the user never wrote (the benchmark derives it)."""
    from tokenwire.daemon.bench_daemon import LIVE_ANSWERS_MARGIN, MAX_LIVE_ANSWERS
    from tokenwire.daemon.config import ConfigError

    assert parse_config({"limits": {"max_live_answers": MAX_LIVE_ANSWERS}}).limits.max_live_answers == MAX_LIVE_ANSWERS
    with pytest.raises(ConfigError):
        parse_config({"limits": {"max_live_answers": MAX_LIVE_ANSWERS + 1}})
    assert main(["bench", "daemon", "--sessions", "101", "--answers", "10000", "--seconds", "1"]) == 2
    limit = MAX_LIVE_ANSWERS - LIVE_ANSWERS_MARGIN
    assert f"--sessions x --answers: at most {limit:,} answers at once (the daemon's limits.max_live_answers), " \
           "got 1,010,000" in capsys.readouterr().err
