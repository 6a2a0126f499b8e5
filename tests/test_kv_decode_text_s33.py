"""Text against a level with the client's decode counted, and the virtual client's decode rate.

The controller weighed text against a level by the level's transfer alone: a client decoding 1 M elements/s (this
SDK on a CPU: 1.3-2.85 M) was planned to wait seconds for the decodes of chunks whose text it recomputes faster,
and text was never the cheaper option for it. The virtual testbed modelled every client at 50 M elements/s and
reported no rate, so it could not show the difference.
"""

from __future__ import annotations

import pytest

from tokenwire.testbed.kv_eval import KVEvalConfig
from tokenwire.transport.kv_controller import LEVELS, TEXT, ChunkOptions, KVController

SIZES = {"low": 50_000, "medium": 70_000, "high": 100_000}  # 0.05 / 0.07 / 0.1 s at 8 Mbit/s
LINK = 8e6
RECOMPUTE_S = 0.3  # the chunk's text: its recompute (plus 64 bytes of ids)


def chunks(n: int, decode_s: float, recompute_s: float = RECOMPUTE_S) -> list[ChunkOptions]:
    return [ChunkOptions(dict(SIZES), 64, recompute_s, dict.fromkeys(LEVELS, decode_s)) for _ in range(n)]


def choose(opts: list[ChunkOptions], time_left_s: float) -> str:
    ctl = KVController("tokenwire", prior_bps=LINK)
    return ctl.choose(opts, time_left_s=time_left_s, inflight_bytes=0, median_bps=LINK, low_bps=LINK,
                      sample_age_s=0.0).level


@pytest.mark.parametrize("n", [1, 4])
def test_a_slow_decoder_gets_text_where_recompute_beats_the_lowest_levels_transfer_and_decode(n):
    slow, fast = 1.0, 0.02  # 1 M elements at 1 M/s (a CPU client) and at 50 M/s (the configured default)
    low_s = SIZES["low"] * 8 / LINK
    assert low_s + slow > RECOMPUTE_S  # text is the cheaper way to get this chunk into the slow client's cache
    assert low_s < RECOMPUTE_S  # and only because of the decode: the transfer alone is cheaper than text
    # the same bytes over the same link, room for all-high at either decode rate (4 x 0.1 + 4 x 1 s = 4.4 s)
    assert choose(chunks(n, slow), time_left_s=6.0) == TEXT
    assert choose(chunks(n, fast), time_left_s=6.0) == "high"


def test_the_cheapest_option_counts_the_decode_when_nothing_else_fits():
    """4 chunks in 1.3 s: all-text (1.2 s) fits a 1 M elements/s client, all-low (0.05 + 4 x 1 s) does not. The
    plan starts from each chunk's cheapest option; without the decode that was low, and the deadline was lost."""
    assert choose(chunks(4, 1.0), time_left_s=1.3) == TEXT
    assert choose(chunks(4, 0.02), time_left_s=1.3) == "high"  # 0.4 + 0.02 s


def test_the_infeasible_deadline_gamble_is_not_taken_on_a_level_whose_decode_outlasts_the_text():
    """Nothing fits even at the median (0.01 s left): rule 4 sends the lowest level rather than text where its
    transfer costs at most twice the text (0.05 s against 0.03 s here), betting on the link. A decode is no bet:
    at 1 s it outlasts the text whatever the link does."""
    assert choose(chunks(1, 1.0, recompute_s=0.03), time_left_s=0.01) == TEXT
    assert choose(chunks(1, 0.02, recompute_s=0.03), time_left_s=0.01) == "low"  # the gamble, as before


def test_decode_shorter_than_the_transfer_leaves_the_ladder_as_it_was():
    """The comparison moves only where a decode outlasts the transfer: the default's decisions stay as they were."""
    c = chunks(1, 0.02, recompute_s=0.08)[0]  # text (0.08 s) between medium (0.07) and high (0.1) transfers
    assert [r[0] for r in KVController._ladder(c, LINK)] == ["low", "medium", TEXT]
    c = chunks(1, 0.09, recompute_s=0.08)[0]  # a decode of 0.09 s makes low and medium cost 0.09 in the pipeline
    assert [r[0] for r in KVController._ladder(c, LINK)] == [TEXT]
    assert [r[1] for r in KVController._ladder(chunks(1, 0.09)[0], LINK)] == pytest.approx([0.05, 0.07, 0.1])


# -- the virtual testbed ----------------------------------------------------------------------------------------
SLOW = 5e5  # elements/s


def config(**kw):
    # 128-token chunks of 4,096 elements a token (524,288 elements): 0.13 s at low over 8 Mbit/s (high: 0.23 s),
    # 0.51 s of recompute (4 ms a token); decoding takes 10 ms at 50 M elements/s, 1.05 s at SLOW
    base = dict(down_trace="8mbps", up_trace="8mbps", delay_ms=10, context_tokens=512, chunk_tokens=128,
                deadline_ms=8000, controllers=["tokenwire", "fixed-L1"], repeats=1, recompute_us_per_token=4000,
                synthetic=(8, 4, 64))
    base.update(kw)
    return KVEvalConfig(**base)


@pytest.fixture(scope="module")
def runs():
    from tokenwire.testbed.kv_vsim import run_kv_virtual

    return {rate: run_kv_virtual(config(), workers=1, decode_rate=rate) for rate in (None, SLOW)}


def test_the_virtual_clients_decode_rate_reaches_the_controller(runs):
    slow = runs[SLOW]
    assert slow["client_decode_elements_per_s"] == SLOW and slow["decode_rate_reported"]
    (fetch,) = slow["fetches"]["tokenwire"]
    assert fetch["decisions"] and all(d["decode_elements_per_s"] == SLOW for d in fetch["decisions"])
    assert fetch["levels"] == [TEXT] * 4  # 0.51 s of recompute against 1.05 s of decoding a chunk
    assert fetch["deadline_met"]
    default = runs[None]
    assert default["client_decode_elements_per_s"] == 50e6 and not default["decode_rate_reported"]
    (fetch,) = default["fetches"]["tokenwire"]
    assert all(d["decode_elements_per_s"] == 50e6 for d in fetch["decisions"])  # the server's configured rate
    assert TEXT not in fetch["levels"]


def test_the_virtual_client_decodes_at_its_rate(runs):
    (fast,) = runs[None]["fetches"]["fixed-L1"]
    (slow,) = runs[SLOW]["fetches"]["fixed-L1"]
    # four chunks of 524,288 elements decoded one after another: 4.2 s at SLOW, however fast the link
    assert slow["fetch_ms"] > 4 * 524_288 / SLOW * 1e3 > 2 * fast["fetch_ms"]


def test_an_out_of_range_decode_rate_is_refused_before_a_run(capsys):
    from tokenwire.daemon.cli import main
    from tokenwire.testbed.kv_vsim import check_decode_rate

    with pytest.raises(ValueError, match="decode rate"):
        check_decode_rate(0.5)
    check_decode_rate(None)
    assert main(["testbed", "kv", "--virtual", "--down-trace", "8mbps", "--decode-rate", "0"]) == 2
    assert "--decode-rate" in capsys.readouterr().err
    assert main(["testbed", "kv", "--down-trace", "8mbps", "--decode-rate", "1e6"]) == 2  # namespaces: the SDK's
    assert "--virtual" in capsys.readouterr().err


def test_no_probe_where_the_decode_alone_outlasts_the_recompute():
    """A cold decision for text on a connection with no rate of its own probes the link at the lowest level
    (explore), to find out whether a level beats the text: not where the level's decode alone takes longer than
    the recompute, which no link can change."""
    ctl = KVController("tokenwire", prior_bps=5e6)

    def cold(decode_s: float):  # text (0.05 s) beats low (0.08 s at the 5 Mbit/s prior) on the link alone
        return ctl.choose(chunks(1, decode_s, recompute_s=0.05), time_left_s=3.0, inflight_bytes=0,
                          median_bps=None, low_bps=None, sample_age_s=float("inf"), explore=True)

    fast = cold(0.02)
    assert (fast.level, fast.probe) == ("low", True)
    slow = cold(1.0)
    assert (slow.level, slow.probe) == (TEXT, False)
