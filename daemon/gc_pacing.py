"""When the daemon runs Python's full garbage collections: :class:`GcPacing`.

Split out of ``service.py``: the heap frozen once started (the process is the daemon's), and a full collection after
connections ended, paced by how many ended against how many are alive. It knows only counts and the clock; the daemon
owns one, tells it of each connection's end, and its housekeeping asks it to collect. ``gc`` is looked up in this
module (tests stand a recorder in for it here).
"""

from __future__ import annotations

import gc

# A full garbage collection after connections ended (see GcPacing.collect_ended): at most this often, and only once
# those ended since the last one are at least this fraction of the connections alive
GC_INTERVAL_S = 30.0
GC_ENDED_FRACTION = 0.25


class GcPacing:
    """The daemon's full garbage collections: its heap frozen at start, collections after connections ended."""

    def __init__(self) -> None:
        self.ended_connections = 0  # since the last garbage collection (see collect_ended)
        self.froze_heap = False  # freeze_started() froze what was alive then (gc.freeze): unfreeze() gives it back
        self.collected_at = -GC_INTERVAL_S

    def freeze_started(self) -> None:
        """The process is this daemon's (run()), and what is alive now (imports; torch and numba with [kv]) lives
        as long as it: frozen, no full collection walks it again (~52,000 objects, ~25 ms of each; with [kv]
        0.1-0.25 s). Collected first, and before any client is let in (chat, ingest, KV), so that no garbage
        and no connection is frozen (a frozen cycle is never freed). Nothing when the heap is frozen already (by
        the application, or a daemon before in the same process)."""
        if not gc.get_freeze_count():
            gc.collect()
            gc.freeze()
            self.froze_heap = True

    def unfreeze(self) -> None:
        """The daemon stopped: a process that goes on after it (a test run) gets its heap back, if it froze it."""
        if self.froze_heap:
            self.froze_heap = False
            gc.unfreeze()

    def connection_ended(self) -> None:
        """A connection ended: one more leftover cycle for the next full collection (collect_ended)."""
        self.ended_connections += 1

    def collect_ended(self, now: float, alive: int) -> None:
        """A full garbage collection once the connections ended since the last one are at least GC_ENDED_FRACTION of
        those ``alive``, at most every GC_INTERVAL_S.

        An ended connection leaves a reference cycle (aioquic's ``QuicConnection`` and its bound methods) that only a
        full collection frees, and a daemon with a large heap runs one seldom. A collection after every end stalled
        the loop, /healthz included, 0.45 s at 2000 sessions and 0.6-1 s at 3000 after any one close: it walks every
        live session (~300 objects each), not only the ended ones. DaemonProtocol._release_ended empties the cycle's
        buffers at the end (~30 KiB of small objects are left of ~100 KiB, or megabytes), so it can wait: each end
        pays for the walk of at most 1/GC_ENDED_FRACTION live sessions, and the leftovers waiting stay below a quarter
        of the connections alive (CPython's own full collections wait for the same 25 % growth of the heap). With no
        connection left, the first end collects (what is walked is then little more than the leftovers)."""
        ended = self.ended_connections
        if not ended or now - self.collected_at < GC_INTERVAL_S or ended < GC_ENDED_FRACTION * alive:
            return
        self.ended_connections = 0
        self.collected_at = now
        gc.collect()
