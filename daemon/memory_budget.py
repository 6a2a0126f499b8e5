"""A byte budget shared by the KV ingest socket's puts: how much put data the daemon holds at once.

Each put's body is read whole into memory, then chunked, encoded and stored on the ingest worker; without a
bound, engines putting large contexts at once could hold any amount (eight 1-GiB puts held 8 GiB). A put
that does not fit waits before its body is read, so its engine's writes block on the socket (backpressure,
no error), and puts are let in in arrival order, so a large one is not passed for ever by small ones. A put
alone always fits: the limit bounds concurrency, the per-put limit is checked where the header is read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


class MemoryBudget:
    """At most ``limit`` bytes held at once by the holders of :meth:`hold` (one event loop)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the budget must be at least one byte")
        self.limit = limit
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        """Puts waiting for room (their engines are blocked on the socket)."""
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        """Hold ``nbytes`` of the budget for the block, waiting (in arrival order) until they fit."""
        await self._acquire(nbytes)
        try:
            yield
        finally:
            self._release(nbytes)

    def _fits(self, nbytes: int) -> bool:
        return self.used == 0 or self.used + nbytes <= self.limit

    async def _acquire(self, nbytes: int) -> None:
        if not self._waiters and self._fits(nbytes):
            self.used += nbytes
            return
        entry = (nbytes, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry[1].done() and not entry[1].cancelled():  # granted as it was cancelled: give it back
                self._release(nbytes)
            else:
                with contextlib.suppress(ValueError):  # _wake may have dropped it already
                    self._waiters.remove(entry)
                self._wake()  # it may have been the head that held the others back
            raise

    def _release(self, nbytes: int) -> None:
        self.used -= nbytes
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            nbytes, fut = self._waiters[0]
            if fut.cancelled():  # its task is being cancelled and will not take it
                self._waiters.popleft()
                continue
            if not self._fits(nbytes):
                break
            self._waiters.popleft()
            self.used += nbytes
            fut.set_result(None)
