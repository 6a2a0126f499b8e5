"""The path's base round trip as a windowed minimum of aioquic's RTT samples, for the chat server's queue signals.

:class:`~.server_session.ServerSession` reads the path's queue as aioquic's smoothed round trip above a floor: the
congestion cap (chatterbox.QUEUE_DELAY_S), the piggyback gate (chatterbox.PIGGYBACK_QUEUE_S) and the wait for shared
packets (chatterbox.COALESCE_QUEUE_S). aioquic's minimum RTT never expires, so a path whose base delay grows without a
move to another host (a new route, a cellular handover behind the same carrier NAT, a NAT rebinding onto a longer
path: :mod:`.path_reset` starts afresh only on a new host) read the growth as a queue for the rest of the connection.
:class:`WindowedMin` keeps the minimum of the samples of the last :data:`RTT_FLOOR_WINDOW_S` instead, as BBR does for
its min_rtt (without ProbeRTT: the chat server does not drain its path to measure it).

Bounded: samples are kept as the minimum of each of :data:`SLOTS` time slots of ``window / SLOTS`` (a client could
otherwise grow a list with a rising series of round trips), so the minimum spans between ``window`` and ``window *
(1 + 1 / SLOTS)`` of samples: an old sample is forgotten a little late, never early (a floor at most that much
lower: the direction of aioquic's own minimum). Sans-I/O: every method takes ``now``.
"""

from __future__ import annotations

import math
from collections import deque

RTT_FLOOR_WINDOW_S = 10.0
"""How long an RTT sample can stand as the path's base round trip (see the module doc); BBR's min_rtt window too.
``tokenwire sim``, one chat whose one-way delay steps up 10 s into an 80-s answer (2 % loss, 5 seeds; stall after the
step, against its new base): 20 -> 150 ms, where the 260 ms "queue" made new tokens wait to share packets
(COALESCE_MAX_S), stall 0.73 with aioquic's minimum, 0.11 / 0.31 / 0.60 with a window of 10 / 30 / 60 s (0.019 on a
150-ms path from the start); 20 -> 60 ms (gate and cap only) 0.045 -> 0.021 / 0.029 / 0.039 (0.017); TMobile LTE
with bursty loss, 20 -> 150 ms, 0.88 -> 0.37 / 0.63 / 0.88 (0.24). The cost is in overload: once chats queue a
shared link for longer than the window, the queue becomes the floor and the congestion cap lets go. 34 to 36 chats on
1 Mbit/s (``sim --chats``, collapsed with either floor: stall 0.80 / 0.93 / 0.98) kept their stall within 0.01 but
dropped 2.5 to 7 times as many packets (10 s; with 30 s about the same as before for 40-s answers, 2 times over
80-s ones). Below that the queue drains often enough for the minimum to recur: 30 to 33 chats, one chat on the fixed
channel (four loss models) or on the LTE, EVDO and UMTS traces measured the same with 10, 30 or 60 s as before (the
same JSON but for 30 chats' 40-s answers: median stall 0.2275 -> 0.2274, bursty loss 0.2777 -> 0.2779)."""

SLOTS = 10
"""Time slots of a window: the windowed minimum keeps one sample per slot at most (see the module doc)."""


class WindowedMin:
    """The minimum of the samples of the last ``window`` seconds (up to a slot more, see the module doc). With no
    sample that recent, the latest slot's minimum: a path gone quiet keeps the floor it had, as aioquic's does."""

    def __init__(self, window: float = RTT_FLOOR_WINDOW_S, slots: int = SLOTS) -> None:
        if not 0 < window < math.inf or slots < 1:  # (NaN fails the first test too)
            raise ValueError(f"window must be > 0 and slots >= 1, got {window}, {slots}")
        self.window = window
        self.slot_s = window / slots
        # (slot number, the minimum of its samples), oldest first; minima rise from front to back (a slot whose
        # minimum a later sample beats can never be the window's minimum again, so it goes)
        self._slots: deque[tuple[int, float]] = deque()

    def add(self, value: float, now: float) -> None:
        slot = math.floor(now / self.slot_s)
        q = self._slots
        while q and q[-1][1] >= value:
            q.pop()
        if q and q[-1][0] >= slot:  # (a later slot than now's: a clock that went back counts as now)
            return  # its slot holds a smaller one already
        q.append((slot, value))
        self._expire(slot)

    def value(self, now: float) -> float:
        """The windowed minimum; ``inf`` before the first sample."""
        if not self._slots:
            return math.inf
        self._expire(math.floor(now / self.slot_s))
        return self._slots[0][1]

    def clear(self) -> None:
        self._slots.clear()

    def __len__(self) -> int:
        return len(self._slots)

    def _expire(self, slot: int) -> None:
        q, oldest = self._slots, slot - round(self.window / self.slot_s)
        while len(q) > 1 and q[0][0] < oldest:
            q.popleft()

