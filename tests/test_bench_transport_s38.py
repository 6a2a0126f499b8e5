"""``bench transport``: CPU per token over the tokens that moved, raw aioquic's "done" after its frames, repeated
flood answers, and raw/mode pairs interleaved per repeat with each ratio taken within its pair."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from typing import Any

import pytest

from tokenwire.daemon.cli import main
from tokenwire.transport import bench_transport
from tokenwire.transport.bench_transport import _figures


def _run(n: int, cpu: float, *, sent: int | None = None, delivered: int | None = None) -> dict[str, Any]:
    """One run's figures without a server."""
    sent = n if sent is None else sent
    server = {"tokens": sent, "datagrams": n, "token_packets": n, "cpu_s": cpu, "wall_s": 1.0}
    client = {"tokens": sent if delivered is None else delivered, "datagrams": n, "cpu_s": cpu, "wall_s": 1.0}
    return _figures(server, client, n)


# -- 1. --tokens 40000 was cut at serve()'s 16,384 and its CPU divided by 40,000 (chatterbox read 0.56x raw)
def test_cpu_per_token_divides_by_the_tokens_sent_and_delivered():
    f = _figures({"tokens": 16_384, "datagrams": 400, "token_packets": 400, "cpu_s": 1.0, "wall_s": 4.0},
                 {"tokens": 16_000, "datagrams": 400, "cpu_s": 0.5, "wall_s": 4.0}, 40_000)
    assert f["server_us_per_token"] == pytest.approx(1e6 / 16_384)
    assert f["client_us_per_token"] == pytest.approx(0.5e6 / 16_000)
    assert (f["tokens_requested"], f["tokens_sent"], f["tokens_delivered"], f["tokens_lost"]) == (
        40_000, 16_384, 16_000, 384)
    assert f["complete"] is False
    assert _run(100, 1.0)["complete"] is True


def test_the_bench_server_sends_more_than_serves_default_limit():
    """A real paced chatterbox run past 16,384 tokens: every token sent and delivered."""
    r = bench_transport._one("chatterbox", 16_500, 10_000.0)
    assert r["tokens"] == 16_500  # 16,384 before: serve()'s default limit ended the answer ("length")
    assert r["tokens_delivered"] == r["tokens_sent"] == 16_500 and r["complete"]


def _fake_one(mode: str, n: int, rate: float) -> dict[str, Any]:
    short = mode == "chatterbox" and rate > 0  # the paced chatterbox run stops at 16,384, as serve()'s default did
    lossy = mode == "raw" and rate <= 0  # raw aioquic's flood loses 5 DATAGRAM frames
    return _run(n, 1.0, sent=min(n, 16_384) if short else None, delivered=n - 5 if lossy else None)


def test_a_short_run_is_flagged_and_the_command_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_transport, "_one", _fake_one)
    out = tmp_path / "bt.json"
    assert main(["bench", "transport", "--modes", "raw,chatterbox", "--repeats", "2", "--tokens", "40000",
                 "--rate", "10000", "--flood-tokens", "100", "--json", str(out)]) == 1
    doc = json.loads(out.read_text())
    assert doc["complete"] is False
    assert [(s["mode"], s["workload"], s["repeat"], s["tokens_sent"]) for s in doc["short_runs"]] == [
        ("chatterbox", "paced", 1, 16_384), ("chatterbox", "paced", 2, 16_384)]  # raw's lost frames are no failure
    assert doc["modes"]["raw"]["tokens_lost"] == 10 and doc["modes"]["chatterbox"]["tokens_lost"] == 0
    assert doc["modes"]["chatterbox"]["tokens_sent"] == 2 * (16_384 + 100)
    assert "SHORT RUN: chatterbox paced (repeat 1): 40000 tokens requested, 16384 sent" in capsys.readouterr().err


def test_tokens_past_the_protocols_bound_are_refused(monkeypatch, capsys):
    monkeypatch.setattr(bench_transport, "_one", lambda *a: pytest.fail("the run started"))
    assert main(["bench", "transport", "--tokens", "1000001", "--rate", "10000"]) == 2
    assert "--tokens 1000001: at most 1,000,000" in capsys.readouterr().err


# -- 2. raw aioquic's "done" overtook its queued DATAGRAM frames; one flood answer lasted ~50 ms
class _CongestedQuic:
    """The parts of a QuicConnection the raw answer uses; its congestion window lets 45 frames out a transmit()."""

    def __init__(self) -> None:
        self._datagrams_pending: deque[bytes] = deque()
        self.on_wire = 0
        self.done: tuple[int, bytes, bool] | None = None  # frames on the wire when "done" was queued, its bytes

    def send_datagram_frame(self, data: bytes) -> None:
        self._datagrams_pending.append(data)

    def send_stream_data(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        self.done = (self.on_wire, data, end_stream)


class _Proto:
    def __init__(self) -> None:
        self._quic = _CongestedQuic()

    def transmit(self) -> None:
        for _ in range(min(45, len(self._quic._datagrams_pending))):
            self._quic._datagrams_pending.popleft()
            self._quic.on_wire += 1


def test_raw_answer_sends_done_only_after_its_datagrams():
    proto = _Proto()
    assert asyncio.run(bench_transport._raw_answer(proto, 3, 2000, 0.0)) == 2000
    assert proto._quic.done == (2000, b"done 2000", True)  # every frame out before "done" was queued


@pytest.mark.parametrize("mode", ["raw", "stream"])
def test_a_flood_run_repeats_its_answers_for_its_time(mode):
    r = bench_transport._one(mode, 200, 0.0, flood_s=0.2)
    assert r["answers"] > 1 and r["wall_s"] >= 0.2  # answers until they lasted flood_s (on the client's clock)
    assert r["tokens_requested"] == r["tokens_sent"] == 200 * r["answers"]
    assert r["tokens_delivered"] + r["tokens_lost"] == r["tokens_sent"]
    if mode != "raw":  # (raw aioquic's DATAGRAM frames may be lost; a tokenwire mode delivers all)
        assert r["complete"]


# -- 3. raw ran all its repeats first: the baseline absorbed none of the machine's drift
def test_runs_interleave_raw_with_each_mode_and_flip_every_other_repeat(monkeypatch):
    calls: list[tuple[str, str]] = []

    def one(mode: str, n: int, rate: float) -> dict[str, Any]:
        calls.append((mode, "paced" if rate > 0 else "flood"))
        return _run(n, 1.0)

    monkeypatch.setattr(bench_transport, "_one", one)
    assert main(["bench", "transport", "--modes", "raw,chatterbox,stream", "--repeats", "2", "--tokens", "10",
                 "--flood-tokens", "10"]) == 0
    order = [m for m, w in calls if w == "paced"]
    assert order == ["raw", "chatterbox", "raw", "stream", "chatterbox", "raw", "stream", "raw"]
    assert [w for _, w in calls] == ["paced", "flood"] * 8  # each run: its paced workload, then its flood


def test_each_ratio_is_taken_within_its_pair_and_the_median_reported(tmp_path, monkeypatch):
    """The machine gets 3x slower every two runs: within a pair chatterbox costs twice raw, across pairs not."""
    paced = [0]

    def one(mode: str, n: int, rate: float) -> dict[str, Any]:
        load = 3.0 ** (paced[0] // 2)
        if rate > 0:
            paced[0] += 1
        return _run(n, (2.0 if mode == "chatterbox" else 1.0) * load)

    monkeypatch.setattr(bench_transport, "_one", one)
    out = tmp_path / "bt.json"
    assert main(["bench", "transport", "--modes", "raw,chatterbox", "--repeats", "3", "--tokens", "10",
                 "--flood-tokens", "10", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["ratios_vs_raw_aioquic"]["chatterbox"]["server_cpu_per_token_vs_raw"] == pytest.approx(2.0)
    spread = doc["ratios_spread"]["chatterbox"]["server_cpu_per_token_vs_raw"]
    assert spread["per_repeat"] == pytest.approx([2.0, 2.0, 2.0])
    assert (spread["min"], spread["median"], spread["max"]) == pytest.approx((2.0, 2.0, 2.0))
    assert doc["run_order"] == [["raw", "chatterbox"], ["chatterbox", "raw"], ["raw", "chatterbox"]]
    assert [r["repeat"] for r in doc["modes"]["raw"]["runs"]] == [1, 2, 3]
    assert "median" in doc["figures"]
    prov = doc["provenance"]
    assert {"started_utc", "git_commit", "load_average", "libraries", "cpus"} <= set(prov)
