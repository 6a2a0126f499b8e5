"""The built-in demo token source: a recorded-style answer replayed at a realistic rate with jitter.

It lets a fresh install, the demo, the simulator and the tests stream a believable chatbot answer with no
LLM behind them. Timing model (one schedule shared by the simulator and the live source):

* time to first token: a prefill delay (default 150 ms);
* inter-token gaps: gamma distributed with the requested mean rate and a coefficient of variation of 0.35,
  the spread seen in decode steps of batched serving;
* occasional stalls of the generator itself (1 % of tokens wait an extra 100-400 ms: batch contention,
  a tool call), which every scheme must render without adding stalls of its own. ``bench daemon`` runs its
  daemon with them off (:func:`set_default_pause_prob`): a fixed pause per 100 tokens capped the real rate near
  400 tokens/s whatever ``--rate`` asked.

Tokens are word pieces of about four characters, like a BPE tokenizer's output on English text.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from collections.abc import AsyncIterator

ANSWER = """\
Great question! Streaming a chatbot's answer over a mobile network is harder than it looks, because the \
network underneath is anything but steady.

When you read a reply token by token, every token depends on the one before it. Classic streaming sends \
the tokens in order over one reliable connection, so a single lost packet holds back everything behind \
it until the retransmission arrives. On a train, in an elevator or at the edge of a cell, that loss is \
frequent and bursty, and the text freezes for a noticeable moment even though later tokens already \
reached your phone.

There are three common ways to soften this:

1. **Send everything twice.** Duplicating each packet hides random, independent losses, but a burst that \
drops one copy usually drops the other as well, and it doubles the traffic.
2. **Retransmit faster.** Tighter timers shorten each freeze a little, yet the reader still waits for the \
missing piece before anything after it can appear.
3. **Make every packet self-sufficient.** Each packet carries the newest tokens together with the oldest \
ones that have not been acknowledged yet. Whichever packet gets through first fills every gap at once, so \
rendering resumes with the very next arrival instead of a timeout later.

The third idea costs only a few extra bytes per token, since tokens are tiny compared with packet headers, \
and it turns a long stall into a short hiccup. It pairs well with low-latency queueing in the network: \
routers that support L4S can keep the delay of such small packets close to the propagation time.

If you want to try it yourself, run the demo with different loss patterns and compare the stall ratio of \
each scheme: the share of the reading time spent staring at a frozen sentence. You should see the \
self-sufficient packets keep the text flowing while in-order streaming stalls after every burst.
"""

PAUSE_PROB = 0.01
"""The share of tokens that wait an extra pause: :func:`schedule`'s default."""

MIN_RATE = 0.1
MAX_RATE = 10_000.0
"""Tokens/s the demo source generates at: the range of the daemon's ``params.rate`` (``upstreams.py``), which
``demo --rate`` and ``bench daemon --rate`` state too, and which ``sim --rate`` and ``testbed compare --rate``
check through :func:`rate_problem`. Beyond it ``sim --rate 1e20`` ran and reported a stall-free answer in no
time, and ``--rate 1e308`` failed inside the random-number call (:func:`schedule` now draws at any finite
rate, but no decoder emits 10^20 tokens/s)."""


def rate_problem(rate: float, what: str = "--rate") -> str | None:
    """Why ``rate`` (tokens/s) is refused, naming ``what``; None for a rate within [MIN_RATE, MAX_RATE]."""
    if type(rate) not in (int, float) or not MIN_RATE <= rate <= MAX_RATE:  # (not <=: NaN too)
        return f"{what} must be a number of tokens/s in [{MIN_RATE:g}, {MAX_RATE:g}] (the demo upstream's range)"
    return None


_PIECE = re.compile(r" ?[A-Za-z]+|\s+|[0-9]+|[^\sA-Za-z0-9]")


def tokenize(text: str, max_piece: int = 6) -> list[str]:
    """Split text into word pieces of at most ``max_piece`` characters (a leading space stays attached)."""
    out: list[str] = []
    for m in _PIECE.finditer(text):
        piece = m.group(0)
        while len(piece) > max_piece:
            out.append(piece[:max_piece])
            piece = piece[max_piece:]
        out.append(piece)
    return out


ANSWER_TOKENS = tokenize(ANSWER)


def answer_tokens(n: int | None = None) -> list[str]:
    """The demo answer's tokens, repeated (paragraph-separated) to reach ``n`` when asked for more."""
    if n is None:
        return list(ANSWER_TOKENS)
    out: list[str] = []
    while len(out) < n:
        if out:
            out.append("\n\n")
        out.extend(ANSWER_TOKENS)
    return out[:n]


def schedule(
    n: int,
    *,
    rate: float = 30.0,
    seed: int = 0,
    first_token_s: float = 0.15,
    cv: float = 0.35,
    pause_prob: float = PAUSE_PROB,
    pause_s: tuple[float, float] = (0.1, 0.4),
) -> list[float]:
    """Generation offsets (seconds after the request arrived) of ``n`` tokens.

    ``pause_prob``: the share of tokens that wait an extra ``pause_s`` (the default: :func:`set_default_pause_prob`).

    Any finite ``rate`` > 0 works (the callers bound it to the demo range, :data:`MAX_RATE`): each gap is
    drawn at unit scale and then scaled: bit for bit what ``gammavariate(shape, scale)`` gave (it returns its
    unit draw times ``scale``), without its refusal of a ``scale`` that underflowed to 0 (``rate=1e308``:
    "alpha and beta must be > 0.0")."""
    if not (rate > 0 and math.isfinite(rate)):  # (`rate <= 0` let a NaN through; inf made every gap 0)
        raise ValueError(f"token rate must be a finite number > 0, got {rate!r}")
    rng = random.Random(f"demo-schedule:{seed}")
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)  # 0 when the product overflows: gaps of 0, not an error
    t = first_token_s
    out: list[float] = []
    for i in range(n):
        if i:
            t += rng.gammavariate(shape, 1.0) * scale
            if rng.random() < pause_prob:
                t += rng.uniform(*pause_s)
        out.append(t)
    return out


def set_default_pause_prob(prob: float) -> None:
    """Make ``prob`` :func:`schedule`'s default ``pause_prob`` in this process, for every caller that passes none
    (the daemon's demo upstream; ``sim`` reads the default too). Only ``bench daemon``'s daemon process calls it,
    with 0: the pauses are the demo's realism, while the benchmark measures the daemon's cost per token at the rate
    it states."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"a pause probability must be in [0, 1], got {prob!r}")
    defaults = schedule.__kwdefaults__
    assert defaults is not None  # (schedule's parameters after * all have defaults)
    defaults["pause_prob"] = prob


async def demo_stream(
    n: int | None = None, *, rate: float = 30.0, seed: int = 0, first_token_s: float = 0.15
) -> AsyncIterator[str]:
    """Yield the demo answer in real time following :func:`schedule` (an async iterator of text)."""
    tokens = answer_tokens(n)
    offsets = schedule(len(tokens), rate=rate, seed=seed, first_token_s=first_token_s)
    start = time.monotonic()
    for tok, at in zip(tokens, offsets, strict=True):
        delay = start + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        yield tok
