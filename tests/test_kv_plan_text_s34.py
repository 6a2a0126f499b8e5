"""The plan prices a text chunk's recompute where the client does it: after the last decode.

The client's engine prefills the text chunks once every chunk is received *and* decoded (``FetchReport``:
``fetch_ms + prefill_ms``, the same in the virtual testbed), on top of its one decode thread's queue. The
controller counted the recompute as link time instead, during which that queue drained: for a slow decoder, or
a chunk sent behind queued decode work, a plan with text in it was predicted to finish early by up to the
queued decode work, and the chunk that made the fetch late was chosen as if it fitted.
"""

from __future__ import annotations

import random

import pytest

from tokenwire.transport.frames import KvChunk
from tokenwire.transport.kv_client import FetchReport
from tokenwire.transport.kv_controller import LEVELS, TEXT, ChunkOptions, KVController, _rungs_finish, decode_finish

LINK = 8e6  # bits/s: low / medium / high below cross it in 0.05 / 0.07 / 0.1 s
SIZES = {"low": 50_000, "medium": 70_000, "high": 100_000}
TOKENS = 100
RECOMPUTE_US = 800  # 0.08 s a chunk's text: between the medium and high transfers


def opts(decode_s: float, sizes: dict[str, int] | None = None, recompute_us: int = RECOMPUTE_US) -> ChunkOptions:
    return ChunkOptions(dict(sizes or SIZES), 4 * TOKENS, TOKENS * recompute_us / 1e6, dict.fromkeys(LEVELS, decode_s))


def client_finish(chunks: list[ChunkOptions], levels: list[str], bw: float, busy_s: float = 0.0,
                  recompute_us: int = RECOMPUTE_US) -> float:
    """When the client is done with ``chunks`` sent back to back at ``levels`` over a ``bw`` link, as the virtual
    client orders it (one decode thread, a chunk's decode once it has arrived and the thread is free; a text
    chunk has nothing to decode) and as the SDK's ``FetchReport`` accounts it (the prefill after it all)."""
    received, decoded = {}, {}
    t, free = 0.0, busy_s
    for i, (c, lv) in enumerate(zip(chunks, levels, strict=True)):
        size = c.text_bytes if lv == TEXT else c.sizes[lv]
        t += size * 8 / bw
        received[i] = (KvChunk(fetch=0, index=i, level=lv, size=size, crc=0, tokens=TOKENS), t, t)
        start = max(t, free)
        free = start + (0.0 if lv == TEXT else c.decode_s[lv])
        decoded[i] = (start, free)
    end = max(max(e for _, e in decoded.values()), busy_s)
    report = FetchReport.from_timings(deadline_ms=1, controller="tokenwire", sent_at=0.0, end=end, received=received,
                                      decode_times=decoded, recompute_us_per_token=recompute_us)
    return (report.fetch_ms + report.prefill_ms) / 1e3


def rung(c: ChunkOptions, level: str, bw: float = LINK) -> tuple[str, float, float]:
    """A ladder's rung as ``KVController._ladder`` makes it: a level's transfer, or text's recompute plus its ids."""
    if level == TEXT:
        return TEXT, c.recompute_s + c.text_bytes * 8 / bw, 1.0
    return level, c.sizes[level] * 8 / bw, 0.0


def test_a_level_then_text_for_a_slow_decoder():
    """The worked example: a level (0.05 s on the link, 1 s to decode), then a text chunk (0.08 s of recompute).
    The client has the level's KV at 1.05 s and only then prefills the text: 1.13 s. The old model put the
    recompute on the link at 0.05-0.13 s, under the decode, and predicted 1.05 s."""
    chunks = [opts(1.0), opts(1.0)]
    levels = ["low", TEXT]
    want = client_finish(chunks, levels, LINK)
    assert want == pytest.approx(0.05 + 1.0 + 0.08)
    assert _rungs_finish(chunks, [rung(c, lv) for c, lv in zip(chunks, levels, strict=True)]) == pytest.approx(want)


def test_decode_finish_adds_the_recompute_after_the_queue():
    assert decode_finish([0.05, 0.0], [1.0, 0.0], recompute_s=0.08) == pytest.approx(1.13)
    assert decode_finish([0.1], [0.0], busy_s=2.0, recompute_s=0.5) == pytest.approx(2.5)  # behind earlier work
    assert decode_finish([0.1, 0.1], [0.0, 0.0], recompute_s=0.3) == pytest.approx(0.5)  # no queue: a plain sum


@pytest.mark.parametrize("seed", range(4))
def test_rungs_are_priced_in_the_clients_order(seed):
    """Any mix of levels and text, any decode rate, any queue left by earlier chunks: the plan's finish is the
    client's."""
    rng = random.Random(seed)
    for _ in range(200):
        n = rng.randint(1, 5)
        chunks = [opts(rng.choice([0.0, 0.01, 0.3, 1.0, 2.0])) for _ in range(n)]
        levels = [rng.choice([*LEVELS, TEXT]) for _ in range(n)]
        busy = rng.choice([0.0, 0.5, 3.0])
        got = _rungs_finish(chunks, [rung(c, lv) for c, lv in zip(chunks, levels, strict=True)], busy)
        assert got == pytest.approx(client_finish(chunks, levels, LINK, busy)), (levels, busy)


def test_text_behind_queued_decode_work_is_not_free():
    """The last chunk, with 1 s of decoding still queued at the client and 1.05 s left: as text it finishes at
    1 + 0.08 s, late; at medium the client decodes it right after the queue, 1 + 0.03 s. The old model hid the
    recompute under the queue and chose text."""
    c = opts(0.03)
    assert [r[0] for r in KVController._ladder(c, LINK)] == ["low", "medium", TEXT]
    ctl = KVController("tokenwire", prior_bps=LINK)
    d = ctl.choose([c], time_left_s=1.05, inflight_bytes=0, median_bps=LINK, low_bps=LINK, sample_age_s=0.0,
                   decode_busy_s=1.0)
    assert client_finish([c], [TEXT], LINK, busy_s=1.0) > 1.05  # what the old choice cost
    assert d.level == "medium"
    assert client_finish([c], [d.level], LINK, busy_s=1.0) <= 1.05
    # with the queue gone by then, text fits and is the best option, as before
    d = ctl.choose([c], time_left_s=1.05, inflight_bytes=0, median_bps=LINK, low_bps=LINK, sample_age_s=0.0)
    assert d.level == TEXT


@pytest.mark.parametrize("seed", range(3))
def test_every_plan_fits_its_budget_in_the_clients_order(seed):
    """The knapsack's plans, for chunks whose decode ranges from nothing to twice a transfer and whose text costs
    about a level's transfer: wherever the all-cheapest plan fits the budget, the plan returned does too, counted
    as the client runs it. (On the old model about 3 % of these plans were late.)"""
    rng = random.Random(100 + seed)
    ctl = KVController("tokenwire")
    checked = 0
    for _ in range(400):
        n = rng.randint(2, 5)
        low = [rng.randint(200_000, 700_000) for _ in range(n)]
        dec = [rng.uniform(0.05, 2.0) for _ in range(n)]
        rc = rng.randint(2_000, 20_000)  # us per token: 0.2-2 s a chunk's text
        chunks = [opts(d, {"low": lo, "medium": int(lo * 1.36), "high": int(lo * 1.86)}, rc)
                  for lo, d in zip(low, dec, strict=True)]
        budget = rng.uniform(0.5, 8.0)
        if client_finish(chunks, [KVController._ladder(c, LINK, LINK)[0][0] for c in chunks], LINK,
                         recompute_us=rc) > budget:
            continue
        plan = ctl.plan(chunks, LINK, budget, text_bw=LINK, early_first=True)
        assert client_finish(chunks, plan, LINK, recompute_us=rc) <= budget + 1e-9, (plan, budget)
        checked += 1
    assert checked > 100


def test_an_upgrade_to_text_hidden_behind_the_queue_is_undone():
    """2 s of decoding queued, then two chunks, 3 s left. Chunk 1 at low: on the link 0.2-0.7 s, decoded after
    the queue and chunk 0 at 2.5-2.6 s. Its rung's step to text is +0.1 s (0.6 s of recompute for 0.5 s of
    transfer), which says 2.7 s; but the transfer it saves was under the queue, and the recompute comes after it:
    3.1 s. The knapsack took that step; now it undoes it."""
    rc = 6_000  # 0.6 s a chunk's text
    chunks = [opts(0.5, {"low": 200_000, "medium": 272_000, "high": 372_000}, rc),
              opts(0.1, {"low": 500_000, "medium": 680_000, "high": 930_000}, rc)]
    assert client_finish(chunks, ["low", TEXT], LINK, busy_s=2.0, recompute_us=rc) == pytest.approx(3.1)
    plan = KVController("tokenwire").plan(chunks, LINK, 3.0, text_bw=LINK, early_first=True, busy_s=2.0)
    assert plan[1] != TEXT
    assert client_finish(chunks, plan, LINK, busy_s=2.0, recompute_us=rc) <= 3.0
