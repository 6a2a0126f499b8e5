"""The token source every scheme streams in the testbed, with generation times recorded.

Texts and timing are the project's one demo answer model (:mod:`tokenwire.daemon.demo_upstream`: word
pieces, a prefill delay, gamma-distributed gaps and occasional generator pauses), identical for every scheme
under one seed, the same as ``tokenwire sim`` uses. :class:`PacedTokens` replays them in real time from when
the request reached the server and stamps each token with ``time.monotonic()`` as it leaves the generator:
that stamp is ``g_i`` for the metrics (one clock for every process on the host).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator


def answer(n: int, rate: float, seed: int) -> tuple[list[str], list[float]]:
    """Token texts and generation offsets (seconds after the request arrived) of the demo answer."""
    from tokenwire.daemon.demo_upstream import answer_tokens, schedule

    texts = answer_tokens(n)
    return texts, schedule(len(texts), rate=rate, seed=seed)


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
