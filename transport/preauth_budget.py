"""What connections not yet authorized may make a server hold, all together (sans-I/O): :class:`PreauthBudget`.

Before its first authorized request a connection may make the server hold its flow-control window's worth of bytes
(:class:`~.read_credit.ReadCredit`'s hold) and its first stream's frame: ~3 MB on the daemon's chat port, ~2 MB on
the KV endpoint. Over ``limits.max_sessions`` connections (10,000 by default) clients without a token could make the
daemon hold 20-30 GB. Both ports keep one of these: each connection is counted from its handshake's end until it
authorizes or ends, and past the budget the largest holders are chosen to be closed. The chat port
(``Admission.account_unauthorized`` in daemon/admission.py) and the KV endpoint (``KVServer.account_unauthorized``)
had a copy each of this arithmetic; the closes themselves, their counters and their log lines stay theirs.

No asyncio, no clock, no logging: the owner says what each connection holds (:meth:`PreauthBudget.account`) and
closes the connections it is handed back.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

H = TypeVar("H", bound=Hashable)


@dataclass(frozen=True)
class Shed(Generic[H]):
    """A holder chosen to be closed for what it held: already out of the budget when its owner hears of it."""

    holder: H
    held: int  # bytes it held, as last counted, when it was chosen
    budget: int  # the bound all holders together were over (its owner's log line names it)


@dataclass
class _Holding:
    held: int  # bytes, as last counted
    allowance: int  # what it may hold on its own, as granted when it was counted (add)


class PreauthBudget(Generic[H]):
    """Connections not yet authorized, oldest first, with the bytes each holds and the allowance it was granted.

    ``limit()``: the configured bound on what they hold together, in bytes (read at each count: a reload applies).
    What is enforced, :meth:`budget`, is never below the largest allowance a connection still counted was granted:
    below it a lone client was closed for what its own window let it send, before its token could be read.

    ``measure(holder)``, if given: what a holder holds now. Past the budget every holder is counted afresh with it
    before any is closed: another's count is from its last datagram, and what it held may be gone since (a stream
    refused by a timer), which would have a token holder closed in its place.
    """

    def __init__(self, limit: Callable[[], int], *, measure: Callable[[H], int] | None = None) -> None:
        self.limit = limit
        self.measure = measure
        self._holdings: dict[H, _Holding] = {}  # oldest first: dicts keep their order
        self._held = 0
        # holders by allowance: the floor is the largest key, a max over the few allowances ever granted (one per
        # max_request_bytes a reload set) instead of over every holder at each datagram (591 us at 10,000 holders)
        self._allowances: Counter[int] = Counter()

    # ------------------------------------------------------------------------------------------------ the holders
    def add(self, holder: H, allowance: int) -> None:
        """Count ``holder`` from now on, holding nothing yet. ``allowance``: what it may hold alone under the
        limits it was given (its window and its first stream's frame); a later reload lowering them must not
        shrink the floor under it (it keeps the window it was granted)."""
        if allowance < 0:
            raise ValueError(f"a connection's allowance cannot be negative: {allowance}")
        if holder in self._holdings:
            raise ValueError(f"{holder!r} is counted already")
        self._holdings[holder] = _Holding(0, allowance)
        self._allowances[allowance] += 1

    def forget(self, holder: H) -> int:
        """``holder`` is authorized, closed or gone: out of the budget, what it held no longer counted (0 for one
        not counted). Returns what it held."""
        holding = self._holdings.pop(holder, None)
        if holding is None:
            return 0
        self._held -= holding.held
        self._allowances[holding.allowance] -= 1
        if not self._allowances[holding.allowance]:
            del self._allowances[holding.allowance]
        return holding.held

    def held_by(self, holder: H) -> int:
        """What ``holder`` held at its last count (0 for one not counted)."""
        holding = self._holdings.get(holder)
        return 0 if holding is None else holding.held

    def oldest(self) -> H | None:
        """The holder counted longest (the one to make room for a new client past max_sessions), or None."""
        return next(iter(self._holdings), None)

    @property
    def held(self) -> int:
        """What all holders held together, as last counted."""
        return self._held

    def __contains__(self, holder: object) -> bool:
        return holder in self._holdings

    def __iter__(self) -> Iterator[H]:
        """The holders, oldest first."""
        return iter(list(self._holdings))  # (a copy: a close while iterating may forget one)

    def __len__(self) -> int:
        return len(self._holdings)

    # ------------------------------------------------------------------------------------------------ the bound
    def floor(self) -> int:
        """The largest allowance of the holders counted now (0 with none)."""
        return max(self._allowances, default=0)

    def budget(self) -> int:
        """What the holders may hold together: ``limit()``, but never below :meth:`floor`."""
        return max(self.limit(), self.floor())

    def account(self, holder: H, held: int) -> list[Shed[H]]:
        """``holder`` now holds ``held`` bytes. Past :meth:`budget` for all holders together (after a recount with
        ``measure``), the one holding the most (the oldest of equals) is chosen and forgotten, then the next,
        until they are under it again: returned in that order, for the owner to close. A holder not counted (never
        added, authorized, gone) changes nothing: []."""
        if held < 0:
            raise ValueError(f"a connection cannot hold a negative number of bytes: {held}")
        holding = self._holdings.get(holder)
        if holding is None:
            return []
        self._held += held - holding.held
        holding.held = held
        budget = self.budget()
        if self._held <= budget:
            return []
        if self.measure is not None:
            for h, other in self._holdings.items():
                other.held = self.measure(h)
            self._held = sum(h.held for h in self._holdings.values())
        shed: list[Shed[H]] = []
        if self._held <= budget:
            return shed
        # largest first, one sort for all the victims (a max() over every holder for each of them made one datagram
        # that shed 1,607 of 2,000 connections stall the loop ~1 s); the sort is stable and the dict oldest first,
        # so the oldest of equals goes first
        for victim in sorted(self._holdings, key=lambda h: self._holdings[h].held, reverse=True):
            if self._held <= budget:
                break
            shed.append(Shed(victim, self._holdings[victim].held, budget))
            self.forget(victim)
        return shed
