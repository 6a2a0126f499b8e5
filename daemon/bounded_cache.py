"""A least-recently-used map bounded by entries and by an estimate of the bytes its values hold.

The KV service caches what its store holds (chunk metadata, encoded sizes) and sees every chunk it ever stored,
evicted ones included: nothing tells it of an eviction on a shared store. Bounded by entries alone (65,536), the
metadata cache grew by ~11 KB per 256-token chunk put (the token ids as Python ints) for the first 65,536 chunks,
about 745 MB, while the store itself stayed at its 1 MB capacity (soak, session 33). Not thread-safe: the owner
holds its lock around every call, as it did around the OrderedDict this replaces.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["BoundedCache"]

K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """``max_entries`` and ``max_bytes`` (by ``cost(value)``, an estimate) at once: the least recently put or
    read entries go first once either is exceeded. A value costing more than ``max_bytes`` alone is not kept."""

    def __init__(self, max_entries: int, max_bytes: int, cost: Callable[[V], int]) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._cost = cost
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.bytes = 0  # the estimate of what the kept values hold

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def get(self, key: K) -> V | None:
        """The value, now the most recently used; None when not kept."""
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: K, value: V) -> None:
        self.pop(key)
        cost = self._cost(value)
        if cost > self.max_bytes:
            return
        self._items[key] = (value, cost)
        self.bytes += cost
        while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
            _, (_, old) = self._items.popitem(last=False)
            self.bytes -= old

    def pop(self, key: K) -> V | None:
        item = self._items.pop(key, None)
        if item is None:
            return None
        self.bytes -= item[1]
        return item[0]

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0
