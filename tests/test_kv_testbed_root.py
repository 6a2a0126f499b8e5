"""``tokenwire testbed kv`` end to end through the namespaces (root only; tiny synthetic KV, fixed-rate link)."""

from __future__ import annotations

import os

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no TUN device"),
]


def test_kv_eval_smoke(tmp_path):
    from tokenwire.testbed.kv_eval import KVEvalConfig, run_kv_eval
    cfg = KVEvalConfig(down_trace="8mbps", up_trace="8mbps", delay_ms=10, context_tokens=96, chunk_tokens=32,
                       deadline_ms=2000, controllers=["tokenwire", "fixed-L1"], repeats=1,
                       recompute_us_per_token=100_000, synthetic=(4, 2, 16))
    import glob
    import tempfile

    stores = os.path.join(tempfile.gettempdir(), "tw-kvstore-*")
    before = set(glob.glob(stores))
    summary = run_kv_eval(cfg, workdir=str(tmp_path))
    for name in ("tokenwire", "fixed-L1"):
        d = summary["controllers"][name]
        assert d["fetches"] == 1
        assert set(d) >= {"deadline_attainment", "mean_quality_top1", "mean_bits_per_element", "p95_fetch_ms",
                          "goodput_fraction"}
        assert 0 < d["mean_bits_per_element"] < 16 and d["p95_fetch_ms"] > 10  # crossed a 10 ms path
    assert summary["controllers"]["fixed-L1"]["level_counts"]["low"] == 3
    # the server's decision inputs ride along with every fetch (one per chunk)
    decisions = summary["fetches"]["tokenwire"][0]["decisions"]
    assert [d["index"] for d in decisions] == [0, 1, 2]
    assert [d["level"] for d in decisions] == summary["fetches"]["tokenwire"][0]["levels"]
    # the server's chunk store lived in the working folder and is gone (each run left one in /tmp)
    assert not list(tmp_path.glob("tw-kvstore-*")) and set(glob.glob(stores)) <= before


def test_emulator_origin_offset_moves_the_trace():
    from tokenwire.testbed.emulator import DirectionConfig, EmulatorConfig
    from tokenwire.testbed.topology import Testbed

    with Testbed(EmulatorConfig(down=DirectionConfig("12mbps"), up=DirectionConfig("12mbps")),
                 backend="userspace") as tb:
        import time

        before = time.monotonic()
        origin = tb.origin(5.0)
        assert before - 5.0 <= origin <= time.monotonic() - 5.0  # the trace origin, 5 s in the past
