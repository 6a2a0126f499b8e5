"""The KV server's poll runs every POLL_S while a fetch sends, however often ACKs arrive.

Its timer was due POLL_S after the last datagram received, so every ACK moved it on: on a fast link, where ACKs come
more often than that, the poll never ran, and the next chunk was decided only once the previous one was acknowledged
whole. The link then idled for a round trip between chunks, and the look-ahead (docs/kv_channel.md) never happened.
"""

from __future__ import annotations

import itertools

from tokenwire.testbed import kv_vsim
from tokenwire.testbed.kv_eval import KVEvalConfig


def test_a_fast_link_gets_the_next_chunk_before_the_previous_one_is_received():
    # 50 Mbit/s, 20 ms each way, four 1.25-MB chunks, all high: 943 ms, where it took 1074 ms for a 1-s deadline with
    # a ~42-ms gap before each chunk's first byte
    cfg = KVEvalConfig(down_trace="50mbps", up_trace="50mbps", delay_ms=20, context_tokens=1024, deadline_ms=1000,
                       repeats=2, seed=900, controllers=["fixed-L3"], recompute_us_per_token=13710)
    rows = kv_vsim.run_kv_virtual(cfg, workers=1)["fetches"]["fixed-L3"]
    for row in rows:
        chunks = row["chunks"]
        assert [c["level"] for c in chunks] == ["high"] * 4
        for prev, nxt in itertools.pairwise(chunks):
            # written while the previous chunk still crosses the link: no idle round trip between them
            assert nxt["first_byte_ms"] < prev["received_ms"], (prev, nxt)
        assert row["fetch_ms"] < cfg.deadline_ms

