"""Packet loss models shared by the simulator, the loopback relay and the link emulator.

One spec syntax everywhere::

    none
    iid:P                                       each packet lost with probability P
    ge:P_GOOD_TO_BAD,P_BAD_TO_GOOD[,LOSS_IN_BAD] Gilbert–Elliott bursty loss (LOSS_IN_BAD defaults to 1)

The Gilbert–Elliott chain is stepped once per millisecond of channel time, not once per packet. The bad
periods are then a property of time alone, so every scheme run with the same seed meets the same outages
whatever packets it sends, which keeps comparisons fair. The mean bad period is ``1/P_BAD_TO_GOOD`` ms and
the stationary share of time spent bad is ``P_GOOD_TO_BAD / (P_GOOD_TO_BAD + P_BAD_TO_GOOD)``.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass


class LossSpecError(ValueError):
    """A loss specification that cannot be parsed; the message says what is wrong."""


class LossModel:
    """Decides, per packet, whether it is lost. ``t`` is channel time in seconds."""

    spec: str = "none"

    def lost(self, t: float) -> bool:  # pragma: no cover - overridden
        return False

    @property
    def mean_loss(self) -> float:
        return 0.0


class NoLoss(LossModel):
    spec = "none"


@dataclass
class IidLoss(LossModel):
    """Independent losses with probability ``p`` (a fresh draw per packet)."""

    p: float
    seed: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(f"iid:{self.seed}")
        self.spec = f"iid:{self.p:g}"

    def lost(self, t: float) -> bool:
        return self._rng.random() < self.p

    @property
    def mean_loss(self) -> float:
        return self.p


@dataclass
class GilbertElliottLoss(LossModel):
    """Two-state bursty loss, stepped per millisecond of channel time (see module docstring)."""

    p_good_to_bad: float
    p_bad_to_good: float
    loss_in_bad: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(f"ge-chain:{self.seed}")
        self._pkt_rng = random.Random(f"ge-packet:{self.seed}")
        # _edges[k] is the first millisecond tick of period k; periods alternate good, bad, good, ...
        self._edges: list[int] = [0]
        self._bad_first = False
        self.spec = f"ge:{self.p_good_to_bad:g},{self.p_bad_to_good:g},{self.loss_in_bad:g}"

    def _duration(self, p_leave: float) -> int:
        """Length in ticks of a period left with probability ``p_leave`` per tick (geometric, >= 1)."""
        if p_leave >= 1.0:
            return 1
        if p_leave <= 0.0:
            return 1 << 62
        u = 1.0 - self._rng.random()  # (0, 1]
        return 1 + int(math.log(u) / math.log1p(-p_leave))

    def is_bad(self, t: float) -> bool:
        tick = int(t * 1000.0) if t > 0 else 0
        while self._edges[-1] <= tick:
            k = len(self._edges) - 1  # the period that starts at _edges[-1]
            bad = (k % 2 == 1) != self._bad_first
            p_leave = self.p_bad_to_good if bad else self.p_good_to_bad
            self._edges.append(self._edges[-1] + self._duration(p_leave))
        k = bisect.bisect_right(self._edges, tick) - 1
        return (k % 2 == 1) != self._bad_first

    def lost(self, t: float) -> bool:
        if not self.is_bad(t):
            return False
        return self.loss_in_bad >= 1.0 or self._pkt_rng.random() < self.loss_in_bad

    @property
    def bad_fraction(self) -> float:
        total = self.p_good_to_bad + self.p_bad_to_good
        return self.p_good_to_bad / total if total > 0 else 0.0

    @property
    def mean_loss(self) -> float:
        return self.bad_fraction * self.loss_in_bad


def _prob(text: str, what: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise LossSpecError(f"loss spec {spec!r}: {what} {text!r} is not a number") from None
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise LossSpecError(f"loss spec {spec!r}: {what} must be within [0, 1], got {value}")
    return value


def parse_loss(spec: str, seed: int = 0) -> LossModel:
    """Build a loss model from its spec string; raises :class:`LossSpecError` with a clear message."""
    text = spec.strip().lower()
    if text in ("", "none", "0"):
        return NoLoss()
    kind, sep, args = text.partition(":")
    if not sep:
        raise LossSpecError(f"loss spec {spec!r}: expected 'none', 'iid:P' or 'ge:P_GB,P_BG[,LOSS_IN_BAD]'")
    parts = args.split(",")
    if kind == "iid":
        if len(parts) != 1:
            raise LossSpecError(f"loss spec {spec!r}: iid takes one probability, e.g. iid:0.05")
        return IidLoss(_prob(parts[0], "P", spec), seed=seed)
    if kind in ("ge", "gilbert", "gilbert-elliott"):
        if len(parts) not in (2, 3):
            raise LossSpecError(f"loss spec {spec!r}: ge takes P_GOOD_TO_BAD,P_BAD_TO_GOOD[,LOSS_IN_BAD]")
        p = _prob(parts[0], "P_GOOD_TO_BAD", spec)
        r = _prob(parts[1], "P_BAD_TO_GOOD", spec)
        if r == 0.0 and p > 0.0:
            raise LossSpecError(f"loss spec {spec!r}: P_BAD_TO_GOOD=0 would stay bad forever")
        h = _prob(parts[2], "LOSS_IN_BAD", spec) if len(parts) == 3 else 1.0
        return GilbertElliottLoss(p, r, h, seed=seed)
    raise LossSpecError(f"loss spec {spec!r}: unknown model {kind!r} (use iid or ge)")
