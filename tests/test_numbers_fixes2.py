"""Fixes from a numbers audit: the swiftqueue evaluation's token model and metrics, the demo's B/token, and
``bench predictor``'s JSON."""

from __future__ import annotations

import argparse
import json
import math
import struct
from typing import Any

import pytest

from tokenwire.testbed import swiftqueue_eval
from tokenwire.testbed.link import Link
from tokenwire.testbed.loss import LossModel, NoLoss
from tokenwire.testbed.queues import Packet
from tokenwire.testbed.swiftqueue_eval import (
    MarkedPacedFlow,
    PolicyRun,
    SwiftQueueConfig,
    build_summary,
    parse_flow_spec,
    run_virtual,
    summarize_run,
)
from tokenwire.testbed.udp_relay import RelayPath
from tokenwire.transport import metrics
from tokenwire.transport.marking import L4SPolicy


class Outage(LossModel):
    """Every packet leaving the link in ``[start, end)`` (channel time) is lost."""

    def __init__(self, start: float, end: float) -> None:
        self.start, self.end = start, end

    def lost(self, t: float) -> bool:
        return self.start <= t < self.end


def run_with_outage(monkeypatch: pytest.MonkeyPatch, start: float, end: float, seconds: float) -> PolicyRun:
    monkeypatch.setattr(swiftqueue_eval, "parse_loss", lambda spec, seed=0: Outage(start, end))
    cfg = SwiftQueueConfig(down_trace="12mbps", policies=["l4s"], seconds=seconds, virtual=True)
    return run_virtual(cfg, "l4s")


# -- 1. the token model and the stall ratio covered only the rendered prefix


def test_a_token_lost_longer_ago_than_the_repeat_window_is_still_delivered(monkeypatch):
    """An outage longer than max_redundant tokens (1.5 s: 75 tokens at 50/s): the model repeated only the newest
    tokens, so the first token of the outage was never sent again and nothing after it rendered (the real
    sender repeats the oldest unacknowledged ones)."""
    run = run_with_outage(monkeypatch, 1.0, 2.5, seconds=5.0)
    assert len(run.gen) == 250
    assert len(run.render) == 250  # every token, not the ~50 before the outage
    lost_first = next(i for i, g in enumerate(run.gen) if g >= 1.0)
    assert 2.5 <= run.render[lost_first] < 2.7  # with the first packet after the outage
    d = summarize_run(run, warmup_s=1.0)
    assert d["tokens_rendered"] == d["tokens"] == 250


def test_a_lost_tail_is_repaired_after_generation_ends(monkeypatch):
    """The last half second of tokens goes into an outage; the idle-repair timer (TokenSender's) resends them."""
    run = run_with_outage(monkeypatch, 4.5, 5.2, seconds=5.0)
    d = summarize_run(run, warmup_s=1.0)
    assert d["tokens_rendered"] == d["tokens"] == 250
    assert d["repair_packets"] >= 1 and run.render[-1] > 5.2


def test_the_packets_carry_the_floor_first_then_the_new_token():
    """Runs as TokenSender.build picks them: the new token, then the oldest unacknowledged ones (at most
    max_redundant), so the floor rides along however far behind it is."""
    flow = MarkedPacedFlow(L4SPolicy(), parse_flow_spec("tokens:50"), max_redundant=4, stop=1.0)
    flow.gen = [0.0] * 10  # ten tokens sent, none acknowledged; token 9 is the new one
    assert flow._token_runs(repair=False) == ((0, 4), (9, 10))
    flow._floor = 6
    assert flow._token_runs(repair=False) == ((6, 10),)
    flow.gen.append(0.0)
    assert flow._token_runs(repair=True) == ((6, 11),)  # a repair: the floor's run, then the newest ones
    flow._floor = 0
    assert flow._token_runs(repair=True) == ((0, 11),)  # the floor's 4, then the newest 7: all of them
    flow.gen = [0.0] * 200  # a full packet: the floor's run and the newest 138 (142 tokens fit in 1200 B)
    assert flow._token_runs(repair=True) == ((0, 4), (62, 200))


def test_the_stall_ratio_counts_the_tokens_that_never_rendered():
    """835 of 3000 tokens rendered read as 50.5 % stall over those 835 alone."""
    gen = [0.02 * i for i in range(10)]
    render = [g + 0.02 for g in gen[:5]]
    run = PolicyRun("l4s", records=[], gen=gen, render=render, base_delay_ms=20.0, span_s=1.0)
    run.end_s = 2.0
    d = summarize_run(run, warmup_s=0.0)
    whole = render + [2.0] * 5  # the five missing tokens stalled until the run's end
    assert d["stall_ratio"] == pytest.approx(metrics.stall_ratio(gen, whole, 0.02))
    assert d["stall_ratio"] > 0.9  # the prefix alone had no stall at all
    assert d["tokens_rendered"] == 5 and d["tokens"] == 10


def test_the_table_says_how_many_tokens_rendered(capsys):
    from tokenwire.testbed.swiftqueue_cli import print_table

    row = {"p50_ms": 20.0, "p95_ms": 30.0, "p99_ms": 40.0, "p999_ms": 50.0, "throughput_mbps": 0.03,
           "l_share": 1.0, "ce_rate": 0.0, "drop_rate": 0.4, "stall_ratio": 0.76, "tokens": 3000,
           "tokens_rendered": 835}
    print_table({"policies": {"l4s": row}, "comparison": {}, "backend": "virtual"})
    header, line = capsys.readouterr().out.splitlines()[:2]
    assert header.split()[-1] == "rendered" and line.split()[-1] == "835/3000"


# -- 2. the token goodput ratio was 1.000 by construction


def test_token_goodput_counts_when_the_answer_finished_on_screen():
    """(rendered - 1) / generation span was the same for every policy: generation is paced alike."""
    gen = [0.02 * i for i in range(100)]
    fast = [g + 0.03 for g in gen]
    slow = [*fast[:-1], fast[-1] + 1.98]  # the last token 2 s late
    runs = {name: PolicyRun(name, records=[{"t": 1.0, "ecn": 1, "size": 100, "fate": "delivered",
                                            "latency_ms": 30.0, "ce": False}],
                            gen=gen, render=r, base_delay_ms=20.0, span_s=1.0)
            for name, r in (("l4s", fast), ("swiftqueue", slow))}
    cfg = SwiftQueueConfig(down_trace="12mbps", policies=["l4s", "swiftqueue"], virtual=True)
    summary = build_summary(cfg, runs, "virtual")
    pol, comp = summary["policies"], summary["comparison"]["swiftqueue"]
    assert pol["l4s"]["goodput_tokens_per_s"] == pytest.approx(100 / (fast[-1] - gen[0]))
    assert comp["goodput_ratio_vs_l4s"] == pytest.approx((fast[-1] - gen[0]) / (slow[-1] - gen[0]))
    assert comp["goodput_ratio_vs_l4s"] < 0.6
    assert comp["throughput_measure"] == "throughput_mbps" and comp["throughput_ratio_vs_l4s"] == 1.0


# -- 3. the demo's B/token counted UDP payload through the relay, IP bytes through the namespace link


def ipv4_udp(payload: bytes, options: bytes = b"") -> bytes:
    ihl = (20 + len(options)) // 4
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0x01, 20 + len(options) + 8 + len(payload), 0, 0, 64, 17, 0,
                         b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02") + options
    return header + struct.pack("!HHHH", 4433, 5555, 8 + len(payload), 0) + payload


def test_udp_payload_is_counted_past_the_ip_and_udp_headers():
    from tokenwire.testbed.link import udp_payload_len

    assert udp_payload_len(ipv4_udp(b"x" * 100)) == 100
    assert udp_payload_len(ipv4_udp(b"x" * 100, options=b"\x01" * 8)) == 100
    ipv6 = bytes([0x60, 0, 0, 0, 0, 108, 17, 64]) + b"\x00" * 32 + b"\x00" * 8 + b"y" * 100
    assert udp_payload_len(ipv6) == 100
    tcp = bytearray(ipv4_udp(b"x" * 100))
    tcp[9] = 6
    assert udp_payload_len(bytes(tcp)) == 0 and udp_payload_len(b"") == 0


def test_the_namespace_link_counts_the_bytes_the_relay_counts():
    from tokenwire.daemon.demo_cli import netns_link_counts

    datagrams = {"down": [b"d" * n for n in (1200, 90, 45)], "up": [b"u" * n for n in (1250, 40)]}
    relay = {d: RelayPath(0.0, NoLoss()) for d in datagrams}
    links = {d: Link(None, name=d) for d in datagrams}
    before = {d: links[d].stats.to_dict() for d in links}
    for d, payloads in datagrams.items():
        for i, p in enumerate(payloads):
            relay[d].decide(0.001 * i, len(p))
            links[d].enqueue(ipv4_udp(p), 0.001 * i)
    counts = netns_link_counts(before, {d: links[d].stats.to_dict() for d in links})
    assert counts["bytes_down"] == relay["down"].bytes == 1335
    assert counts["bytes_up"] == relay["up"].bytes == 1290
    assert counts["packets_down"] == relay["down"].packets == 3
    assert links["down"].stats.arrived_bytes == 1335 + 3 * 28  # what was counted before


def test_virtual_time_packets_add_no_udp_payload():
    link = Link(None)
    link.enqueue(Packet(1228, 0, b"\x45" + b"\x00" * 8 + b"\x11" + b"\x00" * 1218), 0.0)  # kv_vsim: payload only
    assert link.stats.arrived_udp_payload_bytes == 0


def test_the_demo_says_what_b_per_token_counts():
    from tokenwire.daemon.demo_cli import format_results

    row = {"longest_stall_ms": 10.0, "ttft_ms": 200.0, "p99_token_delay_ms": 50.0, "tokens": 10,
           "bytes_down": 1000, "bytes_up": 700, "digest_verified": True, "stall_ratio": 0.1}
    text = format_results({"chatterbox": row}, argparse.Namespace())
    line = next(ln for ln in text.splitlines() if ln.startswith("chatterbox"))
    assert line.split()[-2] == "100"
    assert "B/token: UDP payload bytes from the server, handshake included, per token" in text


# -- 4. bench predictor's JSON had neither --calls nor --repeats, nor a ratio against EWMA


def test_bench_predictor_records_its_settings_and_ratios_against_ewma(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from tokenwire.daemon.cli import main

    out = tmp_path / "b.json"
    assert main(["bench", "predictor", "--calls", "20", "--repeats", "2", "--json", str(out)]) == 0
    doc: dict[str, Any] = json.loads(out.read_text())
    assert doc["calls"] == 20 and doc["repeats"] == 2 and "median" in doc["statistic"]
    ewma, onnx, rat = doc["ewma"], doc["onnx"], doc["onnx_vs_ewma"]
    # EWMA answers a burst with one predict(): batch n costs one call (np.tile timed numpy, not the forecaster)
    assert "one predict()" in ewma["batch_method"] and "predict_batch" in onnx["batch_method"]
    assert ewma["batches"]["8"]["us_per_call"] == ewma["batches"]["1"]["us_per_call"]
    for bs in ("1", "8", "64"):
        expected = onnx["batches"][bs]["us_per_prediction"] / ewma["batches"][bs]["us_per_prediction"]
        assert rat["us_per_prediction"][bs] == pytest.approx(expected)
    assert rat["per_ack_pps"] == pytest.approx(onnx["per_ack_pps"] / ewma["per_ack_pps"])
    text = capsys.readouterr().out
    assert "onnx/ewma (same run)" in text and "ewma batch n: one predict() answers the burst" in text
    assert not math.isnan(rat["us_per_observe"])
