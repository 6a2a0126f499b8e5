"""The ``oracle`` marking policy's knowledge: how long a packet arriving now would wait in L and in C.

Sans-I/O estimate from the emulator's own state (both queues' backlogs, the packet in transmission, the
DualPI2 WRR weights) and the *future* of the capacity trace, which only the emulator knows — that is what
makes it an upper bound no sender can reach. Model: L is served first with ``100 - c_protection`` % of the
link while C has packets (all of it otherwise); C gets ``c_protection`` % while L is backlogged and the
whole link after L drained. New arrivals after ``now`` are ignored by that drain model, so each estimate is
at least the age of its queue's head packet (FIFO: a new packet cannot leave before it).

The namespace testbed publishes the estimate through a small shared-memory file (:class:`OracleBoard`,
written by the emulator process after every batch of events, read lock-free by the sender process), so the
oracle sender pays a memory read per packet, not a round trip to the emulator.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import time

from .link import Link
from .queues import DualPI2
from .trace import OPPORTUNITY_BYTES

MAX_HORIZON_S = 10.0


def _time_to_send(link: Link, now: float, nbytes: float) -> float:
    """Seconds from ``now`` until the link's trace has carried ``nbytes`` more bytes."""
    trace = link.trace
    if trace is None or nbytes <= 0:
        return 0.0
    t_ms = (now - link.start) * 1000.0
    k = trace.first_index_after(t_ms)
    need = math.ceil(nbytes / OPPORTUNITY_BYTES)
    last = trace.opportunity_ms(k + need - 1)
    return min(MAX_HORIZON_S, max(0.0, last / 1000.0 + link.start - now))


def estimate_queue_delays(link: Link, now: float, size: int = 1200) -> tuple[float, float]:
    """(L, C) one-way latency in ms a ``size``-byte packet arriving at ``now`` would see (queue + path)."""
    q = link.queue
    transit = float(link._transit_left) if link._transit is not None else 0.0
    if isinstance(q, DualPI2):
        l_bytes = float(q.l_bytes)
        c_bytes = float(q.backlog_bytes - q.l_bytes)
        share_c = q.p.c_protection / 100.0
    else:  # one FIFO: both codepoints wait behind everything
        l_bytes, c_bytes, share_c = float(q.backlog_bytes), 0.0, 0.0
    base = transit
    # L: served ahead of C (a share 1 - share_c of the link while C waits)
    l_need = base + (l_bytes + size) / (1.0 - share_c if c_bytes > 0 and share_c < 1 else 1.0)
    if not isinstance(q, DualPI2):
        c_need = l_need
    elif l_bytes <= 0:
        c_need = base + c_bytes + size
    else:
        # while L drains (l_bytes / (1 - share_c) link bytes), C gets share_c of them
        drain = l_bytes / (1.0 - share_c) if share_c < 1 else l_bytes
        c_served = share_c * drain
        if c_bytes + size <= c_served:
            c_need = base + (c_bytes + size) / share_c if share_c > 0 else base + drain
        else:
            c_need = base + l_bytes + c_bytes + size
    delay_ms = link.delay * 1000.0
    l_ms = _time_to_send(link, now, l_need) * 1000.0
    c_ms = _time_to_send(link, now, c_need) * 1000.0
    # Each queue is FIFO: a packet arriving now leaves after the one at its head, which has already waited
    # this long. That floor catches what the drain model misses: under sustained L overload new L arrivals
    # keep C at its WRR share for seconds, and C's head shows it.
    if isinstance(q, DualPI2):
        l_ms = max(l_ms, q.head_age(now, l_queue=True) * 1000.0)
        c_ms = max(c_ms, q.head_age(now, l_queue=False) * 1000.0)
    return l_ms + delay_ms, c_ms + delay_ms


_LAYOUT = struct.Struct("<Qddd Q")  # seq, monotonic time, L ms, C ms, seq again (torn-read check)


class OracleBoard:
    """Shared-memory slot with the latest (L ms, C ms) estimate; one writer, any number of readers."""

    def __init__(self, path: str, *, create: bool) -> None:
        self.path = path
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        fd = os.open(path, flags, 0o644)
        try:
            if create:
                os.ftruncate(fd, _LAYOUT.size)
            self._mm = mmap.mmap(fd, _LAYOUT.size)
        finally:
            os.close(fd)
        self._seq = 0

    def publish(self, now: float, l_ms: float, c_ms: float) -> None:
        self._seq += 1
        self._mm[:] = _LAYOUT.pack(self._seq, now, l_ms, c_ms, self._seq)

    def read(self, max_age_s: float = 0.05) -> tuple[float, float] | None:
        """The latest estimate, or None when none was published or it is older than ``max_age_s``."""
        for _ in range(4):
            s1, t, l_ms, c_ms, s2 = _LAYOUT.unpack(self._mm[:])
            if s1 == s2:
                if s1 == 0 or time.monotonic() - t > max_age_s:
                    return None
                return l_ms, c_ms
        return None

    def close(self) -> None:
        self._mm.close()
