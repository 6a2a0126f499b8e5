"""``tokenwire testbed contention``: the pure aggregation, the CLI's checks, and one run through the namespaces
(root only)."""

import math
import os

import pytest

from tokenwire.testbed.contention import (
    PORT,
    ContentionConfig,
    comparison_block,
    down_link_summary,
    goodput_tps,
    jain_index,
    percentile,
    run_summary,
    scheme_summary,
)
from tokenwire.testbed.trace import trace_from_spec


def test_percentile_interpolates_and_skips_unknown_values():
    assert percentile([4, 1, 3, 2], 0.5) == 2.5
    assert percentile([1, 2, 3, 4, 5], 0.9) == pytest.approx(4.6)
    assert percentile([None, math.nan, 7.0], 0.5) == 7.0  # a failed flow, an unmeasured stall ratio
    assert percentile([None, math.nan], 0.5) is None
    assert percentile([], 0.99) is None


def test_jain_index_from_equal_to_one_flow_taking_all():
    assert jain_index([3.0, 3.0, 3.0]) == pytest.approx(1.0)
    assert jain_index([8.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    assert jain_index([2.0, 1.0]) == pytest.approx(9 / 10)
    assert jain_index([0.0, 0.0]) == 1.0
    assert jain_index([None]) is None


def _row(direction, arrival, size, fate="delivered", sport=PORT, dport=5000, sojourn=1.0, proto="17"):
    departure = "" if fate != "delivered" else f"{arrival + 0.002:.6f}"
    return {"dir": direction, "arrival": f"{arrival:.6f}", "size": str(size), "fate": fate, "proto": proto,
            "sport": str(sport), "dport": str(dport), "departure": departure,
            "sojourn_ms": f"{sojourn:.3f}" if fate == "delivered" else ""}


def test_down_link_summary_counts_from_the_origin_per_client_port():
    origin = 100.0
    rows = [
        _row("down", 99.9, 1000),  # before the origin: the handshakes
        _row("up", 100.1, 1000, sport=5000, dport=PORT),
        _row("down", 100.1, 1228, sojourn=0.0),
        _row("down", 100.2, 528, dport=5001, sojourn=10.0),
        _row("down", 100.3, 628, fate="lost", dport=5001),  # spent by the scheme, not delivered
        _row("down", 100.4, 300, fate="drop_tail"),
        _row("down", 100.998, 100, sport=9999, dport=7, sojourn=20.0),  # not the daemon's
    ]
    link = down_link_summary(rows, trace_from_spec("12mbps"), origin)
    assert link["packets"] == 5 and link["lost"] == 1 and link["dropped"] == 1
    assert link["bytes_by_port"] == {5000: 1228 + 300, 5001: 528 + 628}  # IP bytes, as compare counts them
    assert link["delivered_bytes"] == 1228 + 528 + 100
    assert link["span_s"] == pytest.approx(1.0)
    # 12 Mbit/s for one second: 1.5 MB of capacity
    assert link["capacity_bytes"] == pytest.approx(1_500_000, rel=0.01)
    assert link["utilisation"] == pytest.approx(1856 / link["capacity_bytes"])
    assert link["sojourn_ms_p50"] == pytest.approx(10.0)
    assert link["sojourn_ms_p99"] == pytest.approx(19.8)


def test_an_empty_log_has_no_utilisation():
    link = down_link_summary([], trace_from_spec("1mbps"), 0.0)
    assert link["utilisation"] is None and link["sojourn_ms_p50"] is None and link["bytes_by_port"] == {}


def _flow(i, port, stall, ttft=300.0, tokens=60, **extra):
    return {"flow": i, "port": port, "tokens": tokens, "digest_verified": True, "stall_ratio": stall,
            "ttft_ms": ttft, "request_time": 10.0, "last_render": 12.0, "tokens_rendered": tokens, **extra}


def test_run_summary_adds_wire_bytes_and_leaves_failed_flows_out_of_the_percentiles():
    link = {"bytes_by_port": {5000: 6000, 5001: 9000, 5002: 300}, "utilisation": 0.5, "sojourn_ms_p50": 1.0,
            "sojourn_ms_p99": 9.0}
    flows = [
        _flow(1, 5001, 0.3, ttft=500.0),
        _flow(0, 5000, 0.1),
        _flow(2, 5002, None, tokens=3, digest_verified=False, error="ConnectionLost: idle", tokens_rendered=3),
        _flow(3, 5003, 0.9, error="TimeoutError: the worker's deadline"),  # whole, but it ended in an error
    ]
    run = run_summary(flows, link, tokens=60)
    assert [f["flow"] for f in run["flows"]] == [0, 1, 2, 3]
    assert run["flows_finished"] == 2 and run["digests_verified"] == 3
    assert run["flows"][3]["wire_bytes"] is None and run["flows"][3]["bytes_per_token"] is None
    assert run["stall_ratio_p50"] == pytest.approx(0.2)
    assert run["ttft_ms_p90"] == pytest.approx(480.0)
    assert run["flows"][0]["bytes_per_token"] == pytest.approx(100.0)
    assert run["tokens_delivered"] == 183
    assert run["bytes_per_token"] == pytest.approx(15300 / 183)
    assert run["jain_goodput"] < 1.0  # the failed flow delivered 3 tokens in the same time
    assert "bytes_by_port" not in run["link"]


def test_goodput_needs_a_request_and_a_last_render():
    assert goodput_tps({"request_time": 1.0, "last_render": 3.0, "tokens_rendered": 60}) == 30.0
    assert goodput_tps({"request_time": 1.0, "last_render": None, "tokens_rendered": 5}) is None
    # a flow that rendered nothing (starved, or never connected) has a goodput of 0, and counts against fairness
    assert goodput_tps({"request_time": 1.0, "last_render": None, "tokens_rendered": 0}) == 0.0
    assert goodput_tps({"port": None, "error": "connect failed"}) == 0.0
    flows = [{"request_time": 0.0, "last_render": 10.0, "tokens_rendered": 300} for _ in range(9)]
    assert jain_index(goodput_tps(f) for f in [*flows, {"tokens_rendered": 0}]) == pytest.approx(0.9)


def _run(stalls, bpt):
    flows = [{**_flow(i, 5000 + i, s), "finished": True} for i, s in enumerate(stalls)]
    return {"flows": flows, "bytes_per_token": bpt, "digests_verified": len(flows), "jain_goodput": 1.0,
            "daemon_cpu_share": 0.1, "stall_ratio_p50": percentile(stalls, 0.5),
            "link": {"utilisation": 0.2, "sojourn_ms_p50": 1.0, "sojourn_ms_p99": 5.0}}


def test_scheme_summary_pools_flows_and_the_comparison_is_chatterbox_against_the_others():
    cb = scheme_summary([_run([0.1, 0.1], 150.0), _run([0.1, 0.3], 140.0)], tokens=60)
    st = scheme_summary([_run([0.2, 0.2], 70.0), _run([0.2, 0.4], 80.0)], tokens=60)
    assert cb["flows"] == 4 and cb["flows_finished"] == 4 and cb["digests_verified"] == 4
    assert cb["stall_ratio_p50"] == pytest.approx(0.1)
    assert cb["bytes_per_token"] == pytest.approx(145.0)
    block = comparison_block({"chatterbox": cb, "stream": st})
    vs = block["vs"]["stream"]
    assert vs["stall_ratio_p50_change"] == pytest.approx(-0.5)
    assert vs["stall_ratio_p50_change_per_run"] == [pytest.approx(-0.5), pytest.approx(0.2 / 0.3 - 1)]
    assert comparison_block({"stream": st})["vs"] == {}


@pytest.mark.parametrize(("argv", "said"), [
    (["--chats", "201"], "--chats 201: 1 to 200"),
    (["--schemes", "sse-tcp"], "sse-tcp is not a daemon scheme"),
    (["--schemes", "chatterbox,warp"], "unknown scheme"),
    (["--schemes", "stream,stream"], "stream listed twice"),
    (["--schemes", ","], "no scheme given"),
    (["--backend", "kernel"], "needs the userspace emulator"),
    (["--rate", "0"], "--rate 0"),
    (["--loss", "iid:2"], "iid"),
])
def test_the_cli_refuses_bad_arguments_before_building_anything(argv, said, capsys, monkeypatch):
    from tokenwire.daemon.cli import main
    from tokenwire.testbed import contention

    monkeypatch.setattr(contention, "run_contention", lambda *a, **k: pytest.fail("ran"))
    assert main(["testbed", "contention", "--down-trace", "2mbps", *argv]) == 2
    assert said in capsys.readouterr().err


def test_chats_must_be_a_positive_count(capsys):
    from tokenwire.daemon.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["testbed", "contention", "--down-trace", "2mbps", "--chats", "0"])
    assert exc.value.code == 2
    assert "--chats" in capsys.readouterr().err


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
@pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no TUN device")
@pytest.mark.timeout(120)
def test_three_chats_per_scheme_through_the_namespaces(tmp_path):
    from tokenwire.testbed.contention import run_contention
    from tokenwire.testbed.netns import list_runs

    cfg = ContentionConfig(down_trace="4mbps", up_trace="4mbps", delay_ms=20.0, chats=3, tokens=60, rate=30.0,
                           queue="droptail:packets=200", schemes=["chatterbox", "stream"], seed=3)
    runs_before = {r.run_id for r in list_runs()}
    doc = run_contention(cfg, workdir=str(tmp_path))
    for scheme in ("chatterbox", "stream"):
        d = doc["schemes"][scheme]
        assert d["flows"] == 3 and d["flows_finished"] == 3 and d["digests_verified"] == 3, d
        assert 0.0 <= d["stall_ratio_p50"] <= d["stall_ratio_p90"] <= 1.0
        assert 0.0 < d["ttft_ms_p50"] < 10_000.0
        assert 20.0 < d["bytes_per_token"] < 2_000.0  # every flow's packets were matched to its port
        assert 0.0 < d["utilisation"] <= 1.0
        assert 0.5 < d["jain_goodput"] <= 1.0 + 1e-9
        assert d["daemon_cpu_share"] >= 0.0
        (run,) = doc["runs"][scheme]
        assert sorted(f["flow"] for f in run["flows"]) == [0, 1, 2]
        assert all(f["wire_bytes"] and f["finished"] for f in run["flows"])
        assert 0.5 <= run["settle_s"] < 10.0  # the answers waited for the handshakes' packets (contention.settle)
    assert "stream" in doc["comparison"]["vs"]
    assert {r.run_id for r in list_runs()} <= runs_before  # the testbeds are gone
