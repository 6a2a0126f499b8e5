"""When the daemon runs Python's full garbage collections: :class:`GcPacing`.

Split out of ``service.py``: the heap frozen once started (the process is the daemon's), what survives each full
collection frozen too, and a full collection after connections ended, paced by how many ended against how many
are alive. It knows only counts and the clock; the daemon owns one, tells it of each connection's end, and its
housekeeping asks it to collect. ``gc`` is looked up in this module (tests stand a recorder in for it here).
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

# A full garbage collection after connections ended (see GcPacing.collect_ended): at most this often, and only once
# those ended since the last one are at least this fraction of the connections alive
GC_INTERVAL_S = 30.0
GC_ENDED_FRACTION = 0.25
# What is frozen after full collections (GcPacing._refreeze) is walked again this often, whatever else happens, for
# cycles that became garbage while frozen (an upstream failure's traceback alive at the freeze): a frozen cycle is
# otherwise never freed (a review's failure storm on long-lived connections froze ~4,300 such objects a minute)
GC_UNFREEZE_INTERVAL_S = 600.0
# Survivors are frozen only when at least this many are not yet: the point is the long-lived session state added
# since the last freeze (~300 objects a session, ~65 sessions), not every full collection's in-flight objects
FREEZE_MIN_OBJECTS = 20_000


class GcPacing:
    """The daemon's full garbage collections: its heap frozen at start and after each full collection,
    collections after connections ended."""

    def __init__(self) -> None:
        self.ended_connections = 0  # since the last garbage collection (see collect_ended)
        self.froze_heap = False  # freeze_started() froze what was alive then (gc.freeze): unfreeze() gives it back
        self.collected_at = -GC_INTERVAL_S
        self.unfrozen_at = 0.0  # (time.monotonic, collect_ended's clock) the last walk of all of the frozen heap
        self._loop: asyncio.AbstractEventLoop | None = None

    def freeze_started(self, loop: asyncio.AbstractEventLoop) -> None:
        """The process is this daemon's (run()), and what is alive now (imports; torch and numba with [kv]) lives
        as long as it: frozen, no full collection walks it again (~52,000 objects, ~25 ms of each; with [kv]
        0.1-0.25 s). Collected first, and before any client is let in (chat, ingest, KV), so that no garbage
        and no connection is frozen (a frozen cycle is never freed). Nothing when the heap is frozen already (by
        the application, or a daemon before in the same process). What survives each later full collection is
        frozen as well, on ``loop`` (:meth:`_refreeze`)."""
        if not gc.get_freeze_count():
            gc.collect()
            gc.freeze()
            self.froze_heap = True
            self.unfrozen_at = time.monotonic()
            self._loop = loop
            gc.callbacks.append(self._refreeze)

    def unfreeze(self) -> None:
        """The daemon stopped: a process that goes on after it (a test run) gets its heap back, if it froze it."""
        if self.froze_heap:
            self.froze_heap = False
            self._loop = None
            gc.callbacks.remove(self._refreeze)
            gc.unfreeze()

    def _refreeze(self, phase: str, info: dict[str, Any]) -> None:
        """``gc.callbacks``: after a full collection (CPython's own, each time the heap grew by a quarter, or ours),
        freeze what survived it once FREEZE_MIN_OBJECTS survivors are unfrozen, so that the next one walks only what
        is newer. The freeze at start covered the imports alone: CPython's own collections walked every live session
        as sessions were added, 0.3 s of CPU at 2,000 sessions and 0.5-1.7 s of stalled loop at 3,000 (a gc probe's
        measurements), and no pacing of ours bounded those. Safe because an ended connection leaves no cycle
        (``SessionProtocol._release_ended``): refcounting frees a frozen session at its end as any other; what
        was in flight at a freeze and dies in a cycle later waits for :meth:`collect_ended`'s walk of the whole
        heap. Scheduled on the loop, never inside the collection, thread-safely: a worker thread's allocation may
        run a collection too."""
        if phase == "stop" and info.get("generation") == 2 and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._freeze_survivors)
            except RuntimeError:  # the loop closed (a process ending): nothing more to freeze
                pass

    def _freeze_survivors(self) -> None:
        if not self.froze_heap:  # (not after unfreeze())
            return
        if len(gc.get_objects(generation=2)) < FREEZE_MIN_OBJECTS:  # (the unfrozen survivors: cheap beside a walk)
            return
        gc.collect(1)  # the young generations' garbage, not frozen with the survivors
        gc.freeze()

    def connection_ended(self) -> None:
        """A connection ended: what it left for the next full collection (collect_ended), if anything."""
        self.ended_connections += 1

    def collect_ended(self, now: float, alive: int) -> None:
        """A full garbage collection once the connections ended since the last one are at least GC_ENDED_FRACTION of
        those ``alive``, at most every GC_INTERVAL_S.

        An ended connection left a reference cycle (aioquic's ``QuicConnection`` and its bound methods) that only
        a full collection freed; since its cycles are broken at its end (``SessionProtocol._release_ended``) this
        is for the cycles of anything else its end left. A collection after every end stalled the loop, /healthz
        included, 0.45 s at 2000 sessions and 0.6-1 s at 3000 after any one close: it walked every live session
        (~300 objects each). Paced, each end pays for the walk of at most 1/GC_ENDED_FRACTION live sessions; with
        the heap frozen (``_refreeze``) it walks only what is newer than the last full collection, and all of the
        frozen heap again every GC_UNFREEZE_INTERVAL_S, whether connections ended or not (a daemon of long-lived
        connections ends none), for cycles that became garbage while frozen."""
        if self.froze_heap and now - self.unfrozen_at >= GC_UNFREEZE_INTERVAL_S:
            self.unfrozen_at = self.collected_at = now
            self.ended_connections = 0
            gc.unfreeze()
            gc.collect()
            gc.freeze()  # (at once: not left for _refreeze's turn of the loop)
            return
        ended = self.ended_connections
        if not ended or now - self.collected_at < GC_INTERVAL_S or ended < GC_ENDED_FRACTION * alive:
            return
        self.ended_connections = 0
        self.collected_at = now
        gc.collect()
