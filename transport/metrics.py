"""Token-streaming quality metrics, the one definition used by the simulator, the SDK, tests and testbed.

For token i: generation time ``g_i``, render time ``r_i`` at the client, one-way base delay ``D`` and ideal
render time ``e_i = g_i + D``. The stall of token i is ``max(0, r_i - max(e_i, r_{i-1}))``: the time the
reader waited for it beyond what the network's base delay and the previous token already imposed. The
**stall ratio** is ``sum(stall) / (r_last - e_first)``, the share of the rendering period spent waiting
(the rebuffering ratio of video QoE; Chatterbox, arXiv 2401.12961, "proportion of token rendering wait
time"). The period counts as at least ``MIN_PERIOD_S`` (100 ms): an answer generated at once and rendered
within a millisecond read as 97 % stalled, microseconds of processing jitter over a microsecond period. No
answer of the simulator, testbed or demo renders that fast, so their numbers are the plain definition.

An answer whose generation times span less than ``MIN_PERIOD_S`` (a cached answer, a source that yields without
awaiting) was not streamed: every token exists at ``e_first``, and the ratio measures only how long the path took to
carry the whole text (0.05 to 0.49 for 1,000 such tokens on a clean loopback, from run to run), not a reader
waiting on a stream. :func:`generated_at_once` tells such an answer; the SDK's statistics give it no stall ratio
(n/a), as a resumed one, and keep its TTFT and token delays, which do measure that transfer. The simulator and
testbed keep the plain definition (their sources stream).

The **oracle** renders token i at the arrival of the first delivered packet sent at or after ``g_i``: the
best any scheme could do on that packet schedule, given that a token cannot leave before it exists.

All times are seconds on one clock; reported values use milliseconds where the name says ``_ms``.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * min(max(q, 0.0), 100.0) / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    frac = pos - lo
    return float(xs[lo] + (xs[hi] - xs[lo]) * frac)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


def rendered_prefix(render: Sequence[float | None]) -> list[float]:
    """Render times of the tokens rendered so far (rendering is in order, so they form a prefix)."""
    out: list[float] = []
    for r in render:
        if r is None or math.isnan(r):
            break
        out.append(float(r))
    return out


def stall_times(gen: Sequence[float], render: Sequence[float], base_delay: float) -> list[float]:
    """Per-token stall ``max(0, r_i - max(e_i, r_{i-1}))`` for the rendered prefix."""
    out: list[float] = []
    prev = -math.inf
    for g, r in zip(gen, render, strict=False):
        ideal = g + base_delay
        out.append(max(0.0, r - max(ideal, prev)))
        prev = r
    return out


MIN_PERIOD_S = 0.1


def generated_at_once(gen: Sequence[float]) -> bool:
    """Whether the answer was generated within ``MIN_PERIOD_S`` (all its tokens at about one time, one token
    included): not a stream, so a stall ratio would measure the transfer alone (see the module docstring)."""
    return bool(gen) and max(gen) - min(gen) < MIN_PERIOD_S


def stall_ratio(gen: Sequence[float], render: Sequence[float], base_delay: float) -> float:
    """Share of the rendering period (at least ``MIN_PERIOD_S``) spent stalled, see the module docstring;
    NaN when no token rendered."""
    render = rendered_prefix(render)
    if not render:
        return math.nan
    stalls = stall_times(gen, render, base_delay)
    return sum(stalls) / max(render[-1] - (gen[0] + base_delay), MIN_PERIOD_S)


def oracle_render_times(gen: Sequence[float], deliveries: Iterable[tuple[float, float]]) -> list[float]:
    """Render times of the oracle on a delivered packet schedule ``[(send_time, arrival_time), ...]``.

    Token i renders at the earliest arrival among delivered packets sent at or after ``g_i`` (and never
    before token i-1). Tokens after the last delivered packet cannot render: they get NaN.
    """
    pkts = sorted(deliveries)
    sends = [s for s, _ in pkts]
    # suffix minimum of arrival times: earliest arrival among packets sent at index >= k
    suffix = [math.inf] * (len(pkts) + 1)
    for k in range(len(pkts) - 1, -1, -1):
        suffix[k] = min(pkts[k][1], suffix[k + 1])
    out: list[float] = []
    prev = -math.inf
    for g in gen:
        k = bisect.bisect_left(sends, g - 1e-9)
        r = max(suffix[k], prev)
        if math.isinf(r):
            out.extend([math.nan] * (len(gen) - len(out)))
            break
        out.append(r)
        prev = r
    return out


@dataclass
class StreamStats:
    """Per-request quality summary (milliseconds where named ``_ms``)."""

    tokens_sent: int
    tokens_rendered: int
    stall_ratio: float
    ttft_ms: float
    p50_token_delay_ms: float
    p95_token_delay_ms: float
    p99_token_delay_ms: float
    p50_gap_ms: float
    p95_gap_ms: float
    p99_gap_ms: float
    longest_stall_ms: float
    stalls_over_200ms: int
    bytes_per_token: float

    def to_dict(self) -> dict[str, float | int | None]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def summarize(
    gen: Sequence[float],
    render: Sequence[float | None],
    *,
    base_delay: float,
    request_time: float | None = None,
    wire_bytes: int | None = None,
) -> StreamStats:
    """Compute every metric of one token stream.

    ``request_time`` is when the client sent the request (for TTFT; without it TTFT is measured from the
    first token's generation). ``wire_bytes`` is what the scheme put on the wire for this stream.
    """
    rendered = rendered_prefix(render)
    n = len(rendered)
    stalls = stall_times(gen, rendered, base_delay)
    delays = [(r - g) * 1000.0 for g, r in zip(gen, rendered, strict=False)]
    gaps = [(b - a) * 1000.0 for a, b in itertools.pairwise(rendered)]
    start = request_time if request_time is not None else (gen[0] if gen else math.nan)
    ttft = (rendered[0] - start) * 1000.0 if rendered else math.nan
    return StreamStats(
        tokens_sent=len(gen),
        tokens_rendered=n,
        stall_ratio=stall_ratio(gen, rendered, base_delay),
        ttft_ms=ttft,
        p50_token_delay_ms=percentile(delays, 50),
        p95_token_delay_ms=percentile(delays, 95),
        p99_token_delay_ms=percentile(delays, 99),
        p50_gap_ms=percentile(gaps, 50),
        p95_gap_ms=percentile(gaps, 95),
        p99_gap_ms=percentile(gaps, 99),
        longest_stall_ms=max(stalls, default=0.0) * 1000.0,
        stalls_over_200ms=sum(1 for s in stalls if s > 0.2),
        bytes_per_token=(wire_bytes / len(gen)) if wire_bytes is not None and gen else math.nan,
    )
