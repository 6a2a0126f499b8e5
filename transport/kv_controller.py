"""Per-chunk level choice for the KV channel (sans-I/O: every input is an argument, no clock, no socket).

Before each chunk the server asks :meth:`KVController.choose` for a level, given the chunks still to send
(predicted bytes per level, recompute time of their text), the time left to the deadline, the bytes already
written but not yet confirmed by the client, and the bandwidth forecast. Policies, all in this one class so
that comparisons are fair:

* ``tokenwire`` (ONNX forecaster) / ``tokenwire-ewma`` (EWMA forecaster): a *guarded* plan, re-made before
  every chunk with what is actually left. (1) Plan the whole remainder at the forecast's *median*, as a
  knapsack: start every remaining chunk at its cheapest option (lowest level, or text where recomputing is
  faster than the lowest level's transfer or, the longer of the two, its decode at the client:
  :meth:`KVController._coded_s`), then upgrade, one rung at a time, the chunk with the best quality gain per
  second (the last chunk weighs ``TAIL_WEIGHT``: recency; ties go to the *earlier* chunk, which is sent while
  the later ones can still be downgraded). (2) Guard the chunk about to be sent: it keeps its planned level only
  if, at the *guard rate* (below the forecast's calibrated low quantile, ``GUARD_WEIGHT``), it plus
  every later chunk at its cheapest option still fits the time left; otherwise it is downgraded until that
  holds. The tail risk is thus priced once, on the bytes not yet committed, and a wrong guess early is paid for
  by cheaper chunks later, not by a missed deadline. Where no later chunk can pay for it (the last chunk, and a
  first chunk planned on the prior) the guard is firmer (``FIRM_GUARD_WEIGHT``). Both weights are above 1: the
  guard rate is the low quantile discounted once more by the forecast's own spread (see ``GUARD_WEIGHT``), since
  the deadlines missed at the low quantile itself were fetches whose link fell further than it. Bytes in flight
  (what QUIC has not seen acknowledged) are priced at the median (they are on the wire, what the link does to
  them is what the median forecasts).
  (3) Until the fetch has a measurement of its own (its QUIC delivery rate, see
  ``kv_server_session.KVServerSession.fresh_rate``, or a chunk's KV_ACK) the prior is the forecast: the connection's
  link prior (median and low quantile of its past chunk rates, ``KVServerSession.link_prior``) or, before it
  has one, the configured prior with ``PRIOR_LOW`` of it as its low quantile. An earlier fetch's forecast
  describes another moment of the link (measured: ``high`` sent on one into a capacity drop missed the
  deadline where only all-``low`` made it); the link's range over many fetches does not.
  (4) Text only where something fits: when even the cheapest plan misses at the median, the next chunk goes
  at the lowest level rather than as text, since only bytes on the wire can profit from a link that beats its
  forecast, unless that level costs more than ``INFEASIBLE_MARGIN`` times the text at the median (the gamble
  would then cost far more time than it can win) or its decode alone costs more than the text (no link can win
  that back).
  (5) A *probe* where the prior alone would choose text: text chunks carry no rate sample, so a configured
  prior that makes recomputing look cheaper than sending (5 Mbit/s on a LAN) would never be corrected.
  With ``explore`` (the connection has no link prior of its own), a cold decision that picks text
  sends the chunk at the lowest level instead when a measurement could change the choice and the probe fits
  the time left at the guard rate with every later chunk at its cheapest (:meth:`KVController._probe_fits`).
  ``legacy=True`` restores the previous rule (whole plan at the low quantile, ``RESERVE`` kept
  back), ``prior_low=None`` the forced probe (cheapest option until measured), ``guard_weight=1,
  firm_guard_weight=1`` v5's guard (at the low quantile), ``guard_weight=0.5`` v4's blend for the middle chunks.
* ``even-split``: CacheGen's rule: per-chunk budget = remaining time / remaining chunks; the highest level whose
  size over the current (EWMA) throughput fits it; text if none fits and recomputing the chunk does; else the
  lowest level.
* ``fixed-L1`` / ``fixed-L2`` / ``fixed-L3``: always low / medium / high.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

LEVELS = ("low", "medium", "high")  # codec rungs, smallest first
TEXT = "text"
FIXED = {"fixed-L1": "low", "fixed-L2": "medium", "fixed-L3": "high"}
POLICIES = ("tokenwire", "tokenwire-ewma", "even-split", *FIXED)

# Top-1 agreement with the exact cache, mean of the three texts measured in docs/kv_codec.md (SmolLM2-135M,
# prefix 1024, 256-token chunks): low 93.0/93.0/91.4, medium 95.3/95.7/97.7, high 99.6/97.3/97.7 %.
# Text is recomputed exactly.
LEVEL_TOP1 = {"low": 0.9247, "medium": 0.9623, "high": 0.9820, TEXT: 1.0}
# Bits per element of each level on SmolLM2 (same tables): the size prediction for chunks not yet encoded.
LEVEL_BITS = {"low": 1.82, "medium": 2.47, "high": 3.38}
TAIL_WEIGHT = 1.5  # the last chunk's quality weight (recency: docs/kv_codec.md, "Observations")
STALE_S = 1.0  # a forecast whose newest sample is older than this describes another moment of the link...
STALE_FACTOR = 0.75  # ...so the legacy rule discounts it (the guarded rule probes instead)
RESERVE = 0.0  # share of the time left kept back (the guard is the margin; legacy used 0.05)
LEGACY_RESERVE = 0.05
PRIOR_LOW = 0.5  # the prior's low quantile, as a share of it (the ONNX forecaster's spread is 0.45-0.55)
# The guard's bandwidth: low**w * median**(1-w). For w <= 1 a geometric blend of the low quantile and the median;
# for w > 1 the low quantile discounted once more by the forecast's own spread, low * (low/median)**(w-1), so a
# forecaster unsure of the link is held further back. The v3/v4 controllers used w = 0.5 for the middle chunks,
# v5 w = 1. v6 (this one) takes the min-RTT, not the queue-inflated smoothed RTT, off the time left
# (kv_server_session.KVServerSession._path_rtt), which with w = 1 met 279 of 300 TMobile-LTE deadlines (kv_vsim
# seeds 100, 200); w = 1.5, with the firm guard below at 2, met 295 (v5: 290) at -1.3 points of top-1, and
# Verizon-LTE 293 (v5: 290), -1.1 points; every TMobile miss left is one that fixed-L1 misses too
# (docs/kv_channel.md, v6 tuning).
GUARD_WEIGHT = 1.5
# The guard of a chunk whose error no later decision of the fetch absorbs: the first one, planned on the prior before
# anything was measured, and the last one. Neither alone held the gain (measured with v5's accounting and w = 1 for
# the middle chunks, TMobile + Verizon of 300 + 300: the first only at 2, 291 + 292; the last only, 289 + 291; both,
# 294 + 293; neither, 290 + 290).
FIRM_GUARD_WEIGHT = 2.0
PLAN_WINDOW = 64  # chunks planned rung by rung at each decision (see KVController._median_plan)
# A chunk smaller than this gives no usable throughput sample (its transfer is a few packets of the initial
# window): the KV channel ignores such a chunk's rate, and a probe this small would measure nothing.
SAMPLE_MIN_BYTES = 16 * 1024
EARLY_TIE = 0.05  # gains within 5 % count as equal (encoded chunks differ a little in size)
# Once even the cheapest plan misses at the median, the next chunk goes at the lowest level instead of as text only
# where the level's transfer at the median is at most this many times the text's cost (KVController._gamble_pays):
# every such decision in the v6 Verizon-LTE data (seeds 700, 800) was at 1.02-1.89, and the fetches it helped at
# <= 1.49; on UMTS (13.7 ms/token) and EVDO the level cost 2-43 times the text, and all-low fetches took 5-51 s.
INFEASIBLE_MARGIN = 2.0


def check_tuning(*, stale_factor: float = STALE_FACTOR, reserve: float | None = None,
                 guard_weight: float = GUARD_WEIGHT, firm_guard_weight: float = FIRM_GUARD_WEIGHT,
                 prior_bps: float | None = None) -> None:
    """``ValueError`` naming the first configured knob out of range, where a tuning is made (not at a fetch).

    A negative reserve or a stale factor above 1 would plan on more time or bandwidth than there is, a
    negative guard weight would guard *above* the median, and a NaN passes every comparison in ``choose``.
    Measured inputs (the link's prior, the path's RTT) are not checked here: they are the session's.
    """
    def bad(name: str, value: float, ok: bool, want: str) -> None:
        if not ok or value != value:
            raise ValueError(f"{name} must be {want}, got {value}")

    bad("stale_factor", stale_factor, 0 < stale_factor <= 1, "in (0, 1]")
    if reserve is not None:
        bad("reserve", reserve, 0 <= reserve < 1, "in [0, 1)")
    bad("guard_weight", guard_weight, 0 <= guard_weight < math.inf, ">= 0")
    bad("firm_guard_weight", firm_guard_weight, 0 <= firm_guard_weight < math.inf, ">= 0")
    if prior_bps is not None:
        bad("prior_bps", prior_bps, 0 < prior_bps < math.inf, "> 0")


def decode_finish(costs: Sequence[float], decodes: Sequence[float], busy_s: float = 0.0,
                  recompute_s: float = 0.0) -> float:
    """Seconds from now until the client has decoded the last of these chunks, sent back to back: chunk i arrives
    after the costs of chunks 0..i, and its decode starts once it has arrived *and* the decode before it is done.

    Why not the last chunk's decode after the transfers (the previous model): the client decodes on one worker
    thread, chunk after chunk, so where decoding is slower than the link the queue grows and the last chunk waits
    for every decode before it (measured: a 1.3-2.85 M elements/s client took 26-35 s for a fetch planned to end
    within its deadline). ``busy_s``: decode work already queued at the client (chunks sent earlier). Where every
    decode is shorter than the next chunk's transfer this is the previous model's sum plus the last decode.
    ``recompute_s``: the text chunks' recompute, which the client's engine does after the last byte *and* the last
    decode (its ``FetchReport``: ``fetch_ms + prefill_ms``), so it is added at the end. Counted as link time
    instead (until v9), it overlapped the decode queue, and a slow decoder's plan mixing levels and text came out
    early by up to the queued decode work."""
    arrived, done = 0.0, busy_s
    for cost, dec in zip(costs, decodes, strict=True):
        arrived += cost
        done = max(done, arrived) + dec
    return max(done, arrived) + recompute_s


def _rungs_finish(chunks: Sequence[ChunkOptions], rungs: Sequence[tuple[str, float, float]],
                  busy_s: float = 0.0) -> float:
    """:func:`decode_finish` of ``chunks`` sent at ``rungs`` (one (level, cost, quality) of each chunk's ladder):
    a level's cost on the link and its decode at the client; a text rung's ids on the link and its recompute
    (the rest of its cost, :meth:`KVController._ladder`) after the last decode."""
    link, decodes, recompute = [], [], 0.0
    for c, (lv, cost, _q) in zip(chunks, rungs, strict=True):
        if lv == TEXT:
            link.append(max(0.0, cost - c.recompute_s))
            decodes.append(0.0)
            recompute += c.recompute_s
        else:
            link.append(cost)
            decodes.append(c.decode_s.get(lv, 0.0))
    return decode_finish(link, decodes, busy_s, recompute)


@dataclass(frozen=True)
class ChunkOptions:
    """What sending one chunk costs: bytes per codec level, and the recompute time if sent as text."""

    sizes: dict[str, int]  # level -> payload bytes (exact when already encoded, predicted otherwise)
    text_bytes: int
    recompute_s: float
    decode_s: dict[str, float] = field(default_factory=dict)  # level -> decode time at the client (decode_finish)


@dataclass(frozen=True)
class Decision:
    level: str
    planned: tuple[str, ...]  # the plan for this and every later chunk (tokenwire policies)
    # The rate the choice was checked against, recorded as a decision's ``guard_bps``: tokenwire's guard rate
    # (low**w * median**(1-w), on the prior when cold), the legacy rule's discounted low quantile, even-split's
    # median; the fixed levels use none and carry the median (0.0 without one).
    bandwidth_bps: float
    budget_s: float
    probe: bool = False  # sent at the lowest level to measure the link where text was the choice (explore)


class KVController:
    """See module docstring. ``safety`` scales the planning bandwidth (1.0 = the forecast's low quantile)."""

    def __init__(self, policy: str, *, prior_bps: float = 5e6, safety: float = 1.0, rtt_s: float = 0.0,
                 stale_factor: float = STALE_FACTOR, reserve: float | None = None, legacy: bool = False,
                 prior_low: float | None = PRIOR_LOW, guard_weight: float = GUARD_WEIGHT,
                 firm_guard_weight: float = FIRM_GUARD_WEIGHT) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown KV controller {policy!r}; choose from {', '.join(POLICIES)}")
        check_tuning(stale_factor=stale_factor, reserve=reserve, guard_weight=guard_weight,
                     firm_guard_weight=firm_guard_weight)
        self.policy = policy
        self.prior_bps = prior_bps
        self.safety = safety
        self.rtt_s = rtt_s
        self.stale_factor = stale_factor
        self.legacy = legacy
        self.prior_low = prior_low
        self.guard_weight = guard_weight
        self.firm_guard_weight = firm_guard_weight
        self.reserve = (LEGACY_RESERVE if legacy else RESERVE) if reserve is None else reserve

    # -- the decision ---------------------------------------------------------------------------------------
    def choose(self, remaining: Sequence[ChunkOptions], *, time_left_s: float, inflight_bytes: int,
               median_bps: float | None, low_bps: float | None, sample_age_s: float = 0.0,
               explore: bool = False, measured_bps: float | None = None, decode_busy_s: float = 0.0) -> Decision:
        """Level for ``remaining[0]`` (the next chunk).

        ``sample_age_s``: age of the forecast's newest sample (infinite while the fetch has none of its own).
        ``explore``: the prior is only the configured guess (the connection has no link prior of its own), so a
        cold decision for text may send a probe instead (tokenwire policies; see :meth:`_probe_fits`);
        ``measured_bps``: what the connection has measured so far all the same (the median of its few chunk
        rates), None if nothing. ``decode_busy_s``: decode work of chunks already sent that the client has yet to do
        (its one decode thread is busy that long before ``remaining[0]`` can decode; tokenwire policies).
        """
        if not remaining:
            raise ValueError("no chunk left to choose for")
        if self.policy in FIXED:
            lv = FIXED[self.policy]
            return Decision(lv, (lv,) * len(remaining), median_bps or 0.0, time_left_s)
        if self.policy == "even-split":
            bw = median_bps or self.prior_bps
            budget = (time_left_s - inflight_bytes * 8 / bw) / len(remaining)
            c = remaining[0]
            for lv in reversed(LEVELS):
                if c.sizes[lv] * 8 / bw + c.decode_s.get(lv, 0.0) <= budget:
                    return Decision(lv, (lv,), bw, budget)
            if c.recompute_s + c.text_bytes * 8 / bw <= budget:
                return Decision(TEXT, (TEXT,), bw, budget)
            return Decision(LEVELS[0], (LEVELS[0],), bw, budget)
        if self.legacy:
            return self._choose_legacy(remaining, time_left_s, inflight_bytes, median_bps, low_bps, sample_age_s)
        return self._choose_guarded(remaining, time_left_s, inflight_bytes, median_bps, low_bps, sample_age_s,
                                    explore, measured_bps, max(0.0, decode_busy_s))

    def _choose_guarded(self, remaining: Sequence[ChunkOptions], time_left_s: float, inflight_bytes: int,
                        median_bps: float | None, low_bps: float | None, sample_age_s: float,
                        explore: bool = False, measured_bps: float | None = None, busy_s: float = 0.0) -> Decision:
        """Plan at the median, then downgrade the next chunk until the low-quantile fallback fits (``busy_s``: the
        client's decode work already queued, :func:`decode_finish`)."""
        cold = low_bps is None or sample_age_s > STALE_S  # nothing measured on this fetch yet
        if cold and self.prior_low is not None:  # the configured prior, PRIOR_LOW of it as its low quantile
            median_bps, low_bps = self.prior_bps, self.prior_bps * self.prior_low
        med = (median_bps if median_bps is not None else self.prior_bps) * self.safety
        low = (low_bps if low_bps is not None else self.prior_bps) * self.safety
        low = min(low, med)
        # no later decision corrects the first chunk planned on the prior, nor the last chunk: guarded firmer
        firm = (cold and self.prior_low is not None) or len(remaining) == 1
        w = self.firm_guard_weight if firm else self.guard_weight
        low = low**w * med ** (1 - w)
        avail = time_left_s * (1 - self.reserve) - inflight_bytes * 8 / med - self.rtt_s / 2
        plan = self._median_plan(remaining, med, avail, busy_s)
        guard = self._ladder(remaining[0], low, med)
        names = [r[0] for r in guard]
        later = [self._ladder(c, low, med)[0] for c in remaining[1:]]
        k = names.index(plan[0]) if plan[0] in names else 0
        if cold and self.prior_low is None:  # the forced probe: cheapest until measured
            k = 0
        while k > 0:
            if _rungs_finish(remaining, [guard[k], *later], busy_s) <= avail:
                break
            k -= 1
        plan[0] = names[k]
        if (plan[0] == TEXT and k == 0 and not self._cheapest_fits(remaining, med, avail, busy_s)
                and self._gamble_pays(remaining[0], med)):
            # Nothing fits even at the median: the deadline is met only if the link beats the forecast, and a
            # recompute cannot profit from that; the lowest level can (measured: Verizon-LTE seed 7, a slow
            # probe then three recomputes, 6.8 s, where the link recovered and all-low made it). Only where the
            # level costs about what text does, though (see _gamble_pays).
            plan[0] = LEVELS[0]
        elif plan[0] == TEXT and cold and explore and self._probe_fits(remaining, avail, measured_bps, busy_s):
            plan[0] = LEVELS[0]
            return Decision(plan[0], tuple(plan), low, avail, probe=True)
        return Decision(plan[0], tuple(plan), low, avail)

    @staticmethod
    def _gamble_pays(c: ChunkOptions, med: float) -> bool:
        """Whether a chunk whose deadline is already lost at the median goes at the lowest level rather than as
        text: only where that level's transfer at the median costs at most ``INFEASIBLE_MARGIN`` times the text's
        (its recompute plus its ids). Past that margin the gamble on a link beating its forecast costs more than
        it can win: unbounded, the rule sent a 178 KB chunk at 150 kbit/s (9.5 s at the median) instead of 0.88 s
        of recompute, and Verizon-EVDO fetches with a 1-s deadline took 4.6-44.9 s where all-text took 3.5 s.
        And only where the level's decode is shorter than the text: the gamble is on the link, and a decode is
        as certain a cost as a recompute, so a level whose decode alone outlasts the text loses on any link."""
        text_s = c.recompute_s + c.text_bytes * 8 / med
        return (c.sizes[LEVELS[0]] * 8 / med <= INFEASIBLE_MARGIN * text_s
                and c.decode_s.get(LEVELS[0], 0.0) < text_s)

    def _probe_fits(self, remaining: Sequence[ChunkOptions], avail: float, measured_bps: float | None,
                    busy_s: float = 0.0) -> bool:
        """Whether a cold decision for text sends ``remaining[0]`` at the lowest level instead, to measure the link.

        Text chunks give no rate sample: a prior under which recomputing looks cheaper than sending the lowest
        level (the configured 5 Mbit/s on a LAN, SmolLM2 at 2.25 ms/token of prefill) was never corrected, and
        every fetch of the connection went text whatever its deadline. A probe is sent when all of these hold:

        * a measurement could change the choice: recomputing costs something (at 0 s/token text is cheaper
          than any level at any rate; above it, a fast enough link makes recomputing dearer than sending even
          the best level, and text drops out of the ladder) and more than the lowest level's decode (a decode
          that outlasts the recompute keeps text the cheaper option on any link), the lowest level carries a
          usable rate sample (``SAMPLE_MIN_BYTES``), and ``measured_bps`` (the connection's few chunk rates, their
          median), if there is one, is such a link: a link measured slow is not probed again;
        * it fits: the lowest level plus every later chunk at its cheapest option (text where the probe finds
          the link slow) fits the time left at the *firm guard* rate of the prior it is planned on
          (``measured_bps``, else the configured prior; ``PRIOR_LOW`` of it as its low quantile), the same
          deadline risk the controller takes with any first chunk sent on a prior.

        The cost is bounded: one chunk per fetch at the lowest level instead of exact text (a top-1 of 92.5 %
        instead of 100 % on that chunk), and its transfer time instead of its recompute time, within the deadline
        at the guard rate; once the connection has a link prior of its own the session stops exploring.
        """
        c = remaining[0]
        size = c.sizes[LEVELS[0]]
        if c.recompute_s <= 0 or size < SAMPLE_MIN_BYTES or c.decode_s.get(LEVELS[0], 0.0) >= c.recompute_s:
            return False
        if measured_bps is not None and TEXT in (r[0] for r in self._ladder(c, measured_bps)):
            return False
        med = (measured_bps if measured_bps is not None else self.prior_bps) * self.safety
        low_share = self.prior_low if self.prior_low is not None else PRIOR_LOW  # as _choose_guarded prices a prior
        guard = med * low_share**self.firm_guard_weight  # low**w * med**(1-w) with low = low_share * med
        later = [self._ladder(x, guard, med)[0] for x in remaining[1:]]
        probe = (LEVELS[0], size * 8 / guard, LEVEL_TOP1[LEVELS[0]])
        return _rungs_finish(remaining, [probe, *later], busy_s) <= avail

    def _median_plan(self, remaining: Sequence[ChunkOptions], med: float, avail: float,
                     busy_s: float = 0.0) -> list[str]:
        """The plan at the median rate. A remainder longer than ``PLAN_WINDOW`` chunks plans its first
        ``PLAN_WINDOW`` with their share of the slack (in proportion to their cheapest costs): re-planned
        whole at every chunk, the plan cost O(n^2) per decision on the event loop (158 ms at 512 chunks, 2.5 s
        at 2048; a 131,072-token fetch took 27 s of planning). Only the next chunk's level is used, and the
        guard in :meth:`_choose_guarded` still checks it against every remaining chunk."""
        if len(remaining) <= PLAN_WINDOW:
            return self.plan(remaining, med, avail, text_bw=med, early_first=True, busy_s=busy_s)
        cheapest = [self._ladder(c, med, med)[0] for c in remaining]
        base = [r[1] for r in cheapest]
        total = _rungs_finish(remaining, cheapest, busy_s)
        head = sum(base[:PLAN_WINDOW])
        budget = head + (avail - total) * head / max(total, 1e-12)
        return self.plan(remaining[:PLAN_WINDOW], med, budget, text_bw=med, early_first=True, tail_is_last=False)

    def _cheapest_fits(self, remaining: Sequence[ChunkOptions], bw: float, budget_s: float,
                       busy_s: float = 0.0) -> bool:
        """Whether every remaining chunk at its cheapest option (text where that is cheaper) fits at ``bw``."""
        return _rungs_finish(remaining, [self._ladder(c, bw, bw)[0] for c in remaining], busy_s) <= budget_s

    def _choose_legacy(self, remaining: Sequence[ChunkOptions], time_left_s: float, inflight_bytes: int,
                       median_bps: float | None, low_bps: float | None, sample_age_s: float) -> Decision:
        """The previous rule: the whole remainder planned at the low quantile (measured too conservative)."""
        first = low_bps is None
        bw = (low_bps if low_bps is not None else self.prior_bps) * self.safety
        if sample_age_s > STALE_S:
            bw *= self.stale_factor
        budget = time_left_s * (1 - self.reserve) - inflight_bytes * 8 / bw - self.rtt_s / 2
        text_bw = median_bps or bw
        plan = self.plan(remaining, bw, budget, text_bw=text_bw)
        if first:
            plan[0] = self._ladder(remaining[0], bw, text_bw)[0][0]
        return Decision(plan[0], tuple(plan), bw, budget)

    # -- the tokenwire planner --------------------------------------------------------------------------------
    @staticmethod
    def _ladder(c: ChunkOptions, bw: float, text_bw: float | None = None) -> list[tuple[str, float, float]]:
        """(option, seconds it costs at ``bw``, quality) from cheapest up.

        Text is a rung only above the levels it beats at the *expected* rate ``text_bw`` (the median): its cost
        is a certain, large recompute, so a pessimistic bandwidth must not turn every chunk into text.
        A level is weighed against text at what it costs the client's decode pipeline
        (:meth:`_coded_s`: its transfer or its decode, the longer), so a slow decoder makes text the cheaper
        option where recomputing beats decoding; the rung's cost stays the transfer, the link time that
        :func:`decode_finish` adds the decodes to. A text rung's cost is its recompute plus its ids' transfer,
        which :func:`_rungs_finish` takes apart: the ids on the link, the recompute after the last decode.
        """
        tb = text_bw or bw
        text_s = c.recompute_s + c.text_bytes * 8 / bw
        rungs = [(lv, c.sizes[lv] * 8 / bw, LEVEL_TOP1[lv]) for lv in LEVELS]
        if text_s < KVController._coded_s(c, LEVELS[-1], tb):  # exact, and cheaper than the best level
            text = (TEXT, text_s, LEVEL_TOP1[TEXT])
            rungs = [r for r in rungs if KVController._coded_s(c, r[0], tb) < text_s] + [text]
        return rungs

    @staticmethod
    def _coded_s(c: ChunkOptions, level: str, bw: float) -> float:
        """What sending ``c`` at ``level`` costs the fetch's finish, to weigh against its text: the longer of its
        transfer at ``bw`` and its decode. The client decodes on one thread while the next chunks cross the link,
        so chunk after chunk the slower of the two stages sets the pace (:func:`decode_finish`): with a decode
        shorter than the transfer (the configured 50 M elements/s below ~90 Mbit/s) this is the transfer, the
        comparison before decode was counted, and with a decode longer than it (a 1.3-2.85 M elements/s CPU
        client) the decode. The pipeline's first transfer and last decode are not counted (a lone chunk costs
        both): the plan's fit, :func:`decode_finish`, prices them."""
        return max(c.sizes[level] * 8 / bw, c.decode_s.get(level, 0.0))

    def plan(self, remaining: Sequence[ChunkOptions], bw: float, budget_s: float, *,
             lowest_only: bool = False, text_bw: float | None = None, early_first: bool = False,
             tail_is_last: bool = True, busy_s: float = 0.0) -> list[str]:
        """Levels for every remaining chunk that fit ``budget_s`` at ``bw``, maximizing weighted quality.

        Equal gains go to the later chunk, or with ``early_first`` to the earlier one (upgrade what is sent now,
        while later chunks can still absorb a surprise). ``tail_is_last=False``: ``remaining`` is the head of a
        longer remainder, so its last chunk neither weighs ``TAIL_WEIGHT`` nor pays the final decode. ``busy_s``: the
        client's decode work already queued (:func:`decode_finish`).
        """
        ladders = [self._ladder(c, bw, text_bw) for c in remaining]
        pick = [0] * len(remaining)
        n = len(remaining)

        def cost() -> float:  # when the last chunk is decoded, the client's one decode thread working in order
            if not tail_is_last:  # (a head of the remainder: its decodes overlap the transfers of what follows)
                return sum(ladders[i][pick[i]][1] for i in range(n))
            return _rungs_finish(remaining, [ladders[i][pick[i]] for i in range(n)], busy_s)

        if not lowest_only:
            spent = cost()
            capped = [False] * n  # an upgrade to text that did not fit after all (see below)
            while True:
                best_i, best_gain = -1, 0.0
                for i in range(n):
                    if pick[i] + 1 >= len(ladders[i]) or capped[i]:
                        continue
                    dt = ladders[i][pick[i] + 1][1] - ladders[i][pick[i]][1]
                    dq = ladders[i][pick[i] + 1][2] - ladders[i][pick[i]][2]
                    if spent + dt > budget_s:
                        continue
                    w = TAIL_WEIGHT if i == n - 1 and tail_is_last else 1.0
                    gain = w * dq / max(dt, 1e-9)
                    # with early_first a near-tie stays with the earlier chunk
                    tie = best_gain * (1 + EARLY_TIE) if early_first and best_i >= 0 else best_gain
                    if gain > tie or (gain == tie and not early_first):
                        best_i, best_gain = i, gain
                if best_i < 0:
                    break
                pick[best_i] += 1
                after = cost()
                if after > budget_s + 1e-9 and after > spent:
                    # The step's dt can fall short only for an upgrade to text: its recompute lands after the last
                    # decode, and where that queue, not this chunk's transfer, sets the finish, the level's transfer
                    # saved is not time saved. (A level's step never overshoots: a transfer moves the finish by at
                    # most itself.) Undone, and the chunk stays where it was.
                    pick[best_i] -= 1
                    capped[best_i] = True
                else:
                    spent = after
        return [ladders[i][pick[i]][0] for i in range(n)]


def predicted_size(level: str, elements: int) -> int:
    """Bytes of a chunk at ``level`` before it has been encoded (measured bits per element, +5 %)."""
    return int(elements * LEVEL_BITS[level] / 8 * 1.05) + 512
