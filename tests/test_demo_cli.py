"""``tokenwire demo``: its bounds, its errors and its verdict line (relay runs: few tokens, a high rate)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tokenwire.daemon import demo_cli
from tokenwire.daemon.cli import main
from tokenwire.transport.errors import RemoteError

RELAY = ["demo", "--link", "relay", "--quiet", "--delay-ms", "0", "--rate", "10000"]


def test_tokens_beyond_the_daemons_bound_are_refused_at_parsing(capsys: pytest.CaptureFixture[str]) -> None:
    for tokens in ("2000000", "0"):
        with pytest.raises(SystemExit) as exc:  # was a ConfigError traceback from the daemon's configuration
            main([*RELAY, "--tokens", tokens])
        assert exc.value.code == 2
        assert "--tokens: expected an integer in [1, 1000000]" in capsys.readouterr().err


def test_more_tokens_than_the_daemons_default_limit_all_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenwire.daemon import demo_upstream, upstreams

    # without the generator's pauses (1 % of tokens, 0.1-0.4 s each: 40 s here), 16400 tokens take 2 s (patched
    # where the demo upstream calls it: patched in demo_upstream, it changed nothing and the test took 40 s)
    monkeypatch.setattr(upstreams, "schedule", functools.partial(demo_upstream.schedule, pause_prob=0.0))
    out = tmp_path / "demo.json"
    tokens = 16_384 + 16  # one past limits.max_tokens' default cut the answer short, silently
    assert main([*RELAY, "--tokens", str(tokens), "--loss", "none", "--schemes", "stream", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["tokens"] == doc["schemes"]["stream"]["tokens"] == tokens
    assert doc["schemes"]["stream"]["finish_reason"] == "length"  # (--tokens asked for: a limit, not the text's end)


def test_a_link_the_handshake_cannot_cross_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo_cli, "HANDSHAKE_S", 0.3)
    assert main([*RELAY, "--tokens", "5", "--loss", "iid:1.0"]) == 2  # was a ConnectionError traceback
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (the daemon may have logged lines before it)
    assert err.startswith("tokenwire demo: error: chatterbox: no QUIC handshake")
    assert "too lossy for a QUIC handshake" in err


def test_a_connection_lost_mid_answer_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Lost:
        def __aiter__(self) -> Lost:
            return self

        async def __anext__(self) -> str:
            raise RemoteError("connection lost (idle timeout)")

    class Conn:
        def chat(self, *args: Any, **kwargs: Any) -> Lost:
            return Lost()

    @contextlib.asynccontextmanager
    async def connect(*args: Any, **kwargs: Any) -> AsyncIterator[Conn]:
        yield Conn()

    monkeypatch.setattr("tokenwire.transport.client.connect", connect)
    assert main([*RELAY, "--tokens", "5", "--schemes", "stream"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (the daemon may have logged lines before it)
    assert err.startswith("tokenwire demo: error: stream: the connection failed mid-answer (connection lost (idle")


def test_timing_noise_is_not_reported_as_a_difference() -> None:
    row = {"longest_stall_ms": 2.0, "ttft_ms": 150.0, "p99_token_delay_ms": 1.0, "tokens": 90,
           "bytes_down": 9000, "digest_verified": True}

    def verdict(cb: float, st: float) -> str:
        text = demo_cli.format_results({"chatterbox": {**row, "stall_ratio": cb}, "stream": {**row, "stall_ratio": st}},
                                       argparse.Namespace())
        return text.splitlines()[-2]

    # a lossless link (--loss none): a few ms of jitter read "Chatterbox spent 30% less time stalled"
    assert "stalled as much on this link" in verdict(0.007, 0.010)
    assert "stalled as much on this link" in verdict(0.012, 0.006)
    assert "Chatterbox spent 23% less time stalled" in verdict(0.10, 0.13)  # recovery still counts
    assert "Chatterbox spent" not in verdict(0.05, 0.0)  # no percentage of nothing (nor a ZeroDivisionError)


def test_sigterm_removes_the_relay_demos_temporary_folder(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenwire.daemon.cli", "demo", "--link", "relay", "--quiet", "--tokens", "200",
         "--rate", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("tokenwire demo:")  # the daemon runs: its folder exists
        assert list(tmp_path.glob("tokenwire-demo-*/cert.pem"))
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and err.strip() == "interrupted", err  # was killed outright (-15), folder left
    assert not list(tmp_path.glob("tokenwire-demo-*"))


def test_the_live_answer_says_where_tokens_cut_it_and_an_interrupt_ends_its_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The live answer stopped mid-word with no marker (read as text lost on the way), and "interrupted" was
    glued onto it: "...in an elevatorinterrupted"."""
    live = [a for a in RELAY if a != "--quiet"]
    assert main([*live, "--tokens", "20", "--loss", "none", "--schemes", "chatterbox"]) == 0
    out = capsys.readouterr().out
    assert " [... the demo answer cut at --tokens 20]\n" in out
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenwire.daemon.cli", "demo", "--link", "relay", "--tokens", "400", "--rate", "20",
         "--schemes", "chatterbox"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        while not proc.stdout.readline().startswith(b"--- chatterbox (live)"):
            pass
        head = proc.stdout.read(20)  # mid-answer
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and err.decode().strip().endswith("interrupted")
    assert (head + rest).endswith(b"\n"), rest  # "interrupted" (stderr) starts a line of its own


def test_the_json_says_which_link_ran(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--link auto` that fell back to the relay read "link": "auto", "rate_mbps": "12mbps" in the JSON: a relay run
    (no rate applied, another B/token) looked like a namespace run to whoever read the JSON alone."""
    from tokenwire.testbed import topology

    monkeypatch.setattr(topology, "unavailable_reason", lambda: "not root (a test)")
    out = tmp_path / "demo.json"
    argv = [*RELAY[:1], "--quiet", "--delay-ms", "0", "--rate", "10000", "--tokens", "5", "--loss", "none"]
    assert main([*argv, "--schemes", "stream", "--json", str(out)]) == 0  # (--link auto: the default)
    config = json.loads(out.read_text())["config"]
    assert (config["link"], config["link_asked"], config["rate_mbps"]) == ("relay", "auto", None)
