"""What a client knows when an answer ends, and the timelines the metrics need from it."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class ChatOutcome:
    """Everything the client knows at the end of one request, for statistics and verification."""

    tokens: list[bytes]  # the whole answer, including a resumed prefix
    first_index: int
    total: int
    digest_ok: bool
    scheme: str
    request_id: bytes
    finish_reason: str
    request_time: float
    render_times: list[float]  # of tokens first_index..total-1, client clock
    gen_offsets: list[float] | None  # of tokens 0..total-1, seconds after token 0, server clock
    packets: int
    duplicate_tokens: int
    repairs_requested: int
    first_gen_us: int | None = None  # token 0's generation time on the server's clock (same-host use)
    resumed: bool = False  # a resume or attach: part of the answer may predate this request


def outcome_timelines(outcome: ChatOutcome) -> tuple[list[float], list[float]] | None:
    """(generation offsets, render times) of the tokens this client received, for the metrics module.

    Generation offsets are on the server's clock and render times on the client's, so the caller
    estimates the base delay as the smallest difference (see :func:`tokenwire.transport.client`).
    """
    if outcome.resumed or outcome.gen_offsets is None or len(outcome.gen_offsets) < outcome.total:
        # resumed or attached: tokens generated before this request arrive at once, and with two clocks nothing
        # tells them from tokens that stalled (attaching to a finished answer read as a stall ratio of 1)
        return None
    gen = outcome.gen_offsets[outcome.first_index : outcome.total]
    rend = outcome.render_times[: len(gen)]
    if len(rend) != len(gen) or not gen:
        return None
    return gen, rend


def estimated_base_delay(gen: list[float], render: list[float]) -> float:
    """Smallest render-minus-generation difference: the base delay plus the unknown clock offset."""
    return min((r - g for g, r in zip(gen, render, strict=False)), default=math.nan)
