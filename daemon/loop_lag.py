"""How late the daemon's event loop runs: :class:`LoopLag`.

Everything the daemon does for every connection (each token packet, each ack, each handshake) waits for its one
event loop. When the loop is held (a long garbage collection, a burst of CPU work, a host short of CPU), every
connection's packets wait as long, and no metric said so: a many-chat probe found the daemon's CPU limiting its
chats before the link did, visible only from outside. A timer is due every INTERVAL_S; how late the loop runs it
is observed in ``tokenwire_event_loop_lag_seconds``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

INTERVAL_S = 0.1  # ten timers a second: a pause of 0.1 s or more is seen whenever it happens


class LoopLag:
    """Observes, with ``observe``, how late the loop ran a timer due every INTERVAL_S (0 when on time)."""

    def __init__(self, observe: Callable[[float], None], interval_s: float = INTERVAL_S) -> None:
        self.observe = observe
        self.interval_s = interval_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._schedule(loop.time())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._loop = None

    def _schedule(self, now: float) -> None:
        assert self._loop is not None
        self._due = now + self.interval_s
        self._handle = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        if self._loop is None:
            return
        now = self._loop.time()
        self.observe(max(0.0, now - self._due))
        self._schedule(now)  # from now: a long pause is one late timer, not a burst of them
