"""Per-request statistics as the client sees them (used by the SDK and by the client's REPORT frame)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from . import metrics
from .frames import MAX_GEN_TIMES
from .session_outcome import ChatOutcome, estimated_base_delay, outcome_timelines


@dataclass
class ChatStats:
    """Per-request statistics, measured at the client (milliseconds where named ``_ms``).

    ``p50_token_delay_ms`` / ``p99_token_delay_ms`` are token delays *beyond the smallest one of this answer*
    (r - g - min(r - g)): the client's and the server's clocks are not synchronised, so the path's one-way delay
    is unknown here and taken as that minimum (the stall ratio uses the same base). ``tokenwire sim`` and
    ``testbed compare`` report r - g on one clock (DESIGN.md's token delay) under the same key names: compare
    them with each other, not with these (a 40 ms link: sim's p50 is ~40 ms, this one's ~1 ms).

    ``ttft_ms`` and ``stall_ratio`` (with ``longest_stall_ms`` and the token delays) are ``float('nan')``, not
    None, for a resumed or attached answer, whose first tokens were generated before this request (and the
    delays when the server sent no generation times): test with ``math.isnan``; :meth:`to_dict` gives None.
    ``stall_ratio`` and ``longest_stall_ms`` alone are NaN for an answer generated at once (within 100 ms: a
    cached one, see :func:`~.metrics.generated_at_once`), and for a cancelled answer's partial statistics;
    :meth:`stall_unknown` says which case it is.
    """

    scheme: str
    tokens: int
    digest_verified: bool
    ttft_ms: float
    stall_ratio: float
    longest_stall_ms: float
    p50_token_delay_ms: float
    p99_token_delay_ms: float
    p99_gap_ms: float
    packets: int
    duplicate_tokens: int
    repairs_requested: int
    finish_reason: str
    request_id: str

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``tokenwire chat --json-stats`` writes it): NaN (a resumed answer's
        TTFT and stall ratio, see above) becomes None, which JSON can carry."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}

    def stall_unknown(self) -> str | None:
        """Why ``stall_ratio`` is NaN, in words (None when it is a number). Told from the other fields: a
        cancelled answer (partial: no generation times came), a resumed or attached one (no TTFT either), an answer
        generated at once (its token delays are measured), or one whose generation times did not come (FINISHED or
        GEN_TIMES hold them for :data:`GEN_TIMES_MAX` tokens at most; a whole answer left before its GEN_TIMES)."""
        if not math.isnan(self.stall_ratio):
            return None
        if self.finish_reason == "cancelled" and not self.digest_verified:
            return "cancelled: no generation times came"
        if not math.isnan(self.p50_token_delay_ms):
            return "generated at once, not streamed"
        if self.tokens == 0:
            return "no tokens"
        if math.isnan(self.ttft_ms):
            return "resumed or attached"
        if self.tokens > GEN_TIMES_MAX:
            return f"over {GEN_TIMES_MAX:,} tokens: the server sends no generation times for them"
        # (an old server's FINISHED without them, or GEN_TIMES not here yet: the answer was left or cancelled once
        # whole, the connection closed, or 10 s passed)
        return "no generation times came"

    def __str__(self) -> str:
        unknown = self.stall_unknown()
        stall = (f"stall ratio n/a ({unknown})" if unknown is not None
                 else f"stall ratio {self.stall_ratio:.3f} (longest {self.longest_stall_ms:.0f} ms)")
        ttft = "TTFT n/a" if math.isnan(self.ttft_ms) else f"TTFT {self.ttft_ms:.0f} ms"
        ended = "" if self.finish_reason in ("stop", None) else f", ended: {self.finish_reason}"  # cut short
        # (a cancelled answer's partial stats: no digest came to check, which is no mismatch)
        digest = ("verified" if self.digest_verified else
                  "not checked" if self.finish_reason == "cancelled" else "MISMATCH")
        return (
            f"{self.tokens} tokens via {self.scheme}{ended}, {ttft}, {stall}, "
            f"digest {digest}"
        )


GEN_TIMES_MAX = MAX_GEN_TIMES
"""The most tokens whose generation times a FINISHED frame carries (``frames.Finished``'s ``g``, or the GEN_TIMES
frame after it with ``frames.ALPN_GEN_TIMES``): a longer answer's statistics have no stall ratio."""


def stats_from_outcome(outcome: ChatOutcome) -> ChatStats:
    """Compute client-side statistics; the base delay is estimated as the smallest render-generation gap."""
    tl = outcome_timelines(outcome)
    nan = math.nan
    if tl is not None:
        gen, render = tl
        d = estimated_base_delay(gen, render)
        s = metrics.summarize(gen, render, base_delay=d, request_time=outcome.request_time)
        at_once = metrics.generated_at_once(outcome.gen_offsets or gen)  # (the whole answer's generation)
        stall, longest, p50, p99, gap = (
            nan if at_once else s.stall_ratio,
            nan if at_once else s.longest_stall_ms,
            s.p50_token_delay_ms - d * 1000.0,
            s.p99_token_delay_ms - d * 1000.0,
            s.p99_gap_ms,
        )
    else:
        stall = longest = p50 = p99 = gap = nan
    # a resumed or attached answer's first token may have been generated long before this request (attaching
    # to a finished one "took" 1 ms): no time to first token, as no stall ratio
    ttft = (outcome.render_times[0] - outcome.request_time) * 1000.0 if outcome.render_times and not (
        outcome.resumed) else nan
    return ChatStats(
        scheme=outcome.scheme,
        tokens=outcome.total,
        digest_verified=outcome.digest_ok,
        ttft_ms=ttft,
        stall_ratio=stall,
        longest_stall_ms=longest,
        p50_token_delay_ms=p50,
        p99_token_delay_ms=p99,
        p99_gap_ms=gap,
        packets=outcome.packets,
        duplicate_tokens=outcome.duplicate_tokens,
        repairs_requested=outcome.repairs_requested,
        finish_reason=outcome.finish_reason,
        request_id=outcome.request_id.hex(),
    )
