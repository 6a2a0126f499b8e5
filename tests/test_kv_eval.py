"""The KV evaluation's bookkeeping without namespaces: per-fetch metrics and the per-controller summary."""

from __future__ import annotations

import math

from tokenwire.testbed.kv_eval import fetch_metrics, summarize, timed_out_metrics

TOP1 = {"low": 0.9, "medium": 0.95, "high": 0.98, "text": 1.0}


def result(levels, fetch_ms, deadline_ms=1000, tokens=10):
    chunks = [{"level": lv, "tokens": tokens, "bytes": 100, "first_byte_ms": 1.0, "received_ms": 2.0,
               "decoded_ms": 3.0} for lv in levels]
    return {"result": {"chunks": chunks, "fetch_ms": fetch_ms, "deadline_ms": deadline_ms,
                       "payload_bytes": 100 * len(levels), "levels": levels}}


def test_text_chunks_are_charged_their_recompute():
    m = fetch_metrics(result(["low", "text"], 900.0), elements=800, recompute_us_per_token=20_000, top1=TOP1)
    assert m["fetch_ms"] == 900.0 + 10 * 20.0  # 10 text tokens at 20 ms each
    assert not m["deadline_met"] and math.isclose(m["quality_top1"], 0.95)
    assert m["bits_per_element"] == 200 * 8 / 800


def test_a_timed_out_fetch_is_a_miss_without_quality():
    ok = fetch_metrics(result(["high", "high"], 500.0), elements=800, recompute_us_per_token=0, top1=TOP1)
    lost = timed_out_metrics({"elapsed_s": 160.0, "sent_at": 5.0})
    s = summarize({"tokenwire": [ok, lost]})["tokenwire"]
    assert s["deadline_attainment"] == 0.5 and s["timed_out"] == 1 and s["fetches"] == 2
    assert math.isclose(s["mean_quality_top1"], 0.98)  # quality over the fetches that completed
    assert s["p95_fetch_ms"] == 160_000.0
