"""The token source every scheme streams: the same texts at the same pace, with generation times recorded.

Texts are deterministic per seed and shaped like LLM output tokens (mostly a leading space plus a short
word, some punctuation), so bytes per token are comparable across schemes. Token i is generated at
``start + offsets[i]`` where ``start`` is when the request reached the server; the time it actually left the
generator (``time.monotonic()``) is what the metrics use as ``g_i``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

_WORDS = (
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "was", "on", "be", "by",
    "this", "are", "or", "an", "at", "from", "which", "but", "not", "have", "network", "packet",
    "latency", "token", "stream", "model", "queue", "link", "stall", "render", "client", "server",
    "loss", "delay", "rate", "window", "congestion", "marking", "predict", "transformer", "cache",
    "chunk", "bandwidth", "deadline", "quality", "trace", "cellular", "user", "answer", "question",
    "because", "however", "therefore", "example", "result", "measure", "compare", "scheme",
)
_PUNCT = (",", ".", ":", ";", "?", "!", "\n")


def token_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` token strings, identical for every scheme given the same seed."""
    rng = random.Random(f"tokens:{seed}")
    out: list[str] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.08:
            out.append(rng.choice(_PUNCT))
        elif r < 0.2:  # word pieces without a leading space, as BPE produces
            w = rng.choice(_WORDS)
            out.append(w[: max(1, len(w) // 2)])
        else:
            out.append(" " + rng.choice(_WORDS))
    return out


def even_schedule(n: int, rate: float) -> list[float]:
    """Generation offsets (seconds after the request arrived) of ``n`` tokens at a steady ``rate``."""
    if rate <= 0:
        raise ValueError("rate must be > 0 tokens/s")
    return [i / rate for i in range(n)]


class PacedTokens:
    """Async iterator yielding ``texts[i]`` at ``start + offsets[i]``; ``start`` is the first ``__anext__``.

    ``gen_times[i]`` is the monotonic time token i was yielded. Pacing uses absolute deadlines, so a late
    wake-up does not shift later tokens (it only makes that one token late, as a busy model server would).
    """

    def __init__(self, texts: list[str], offsets: list[float]) -> None:
        if len(offsets) != len(texts):
            raise ValueError("one offset per token")
        self.texts = texts
        self.offsets = offsets
        self.gen_times: list[float] = []
        self.start: float | None = None

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        i = len(self.gen_times)
        if i >= len(self.texts):
            raise StopAsyncIteration
        if self.start is None:
            self.start = time.monotonic()
        delay = self.start + self.offsets[i] - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        self.gen_times.append(time.monotonic())
        return self.texts[i]
