"""The KV ingest socket's byte budget (``daemon/memory_budget.py``): room, arrival order, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from tokenwire.daemon.memory_budget import MemoryBudget


async def _holder(budget: MemoryBudget, n: int, log: list[str], name: str, release: asyncio.Event) -> None:
    async with budget.hold(n):
        log.append(name)
        await release.wait()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_holders_wait_for_room_in_arrival_order():
    async def go() -> None:
        budget = MemoryBudget(100)
        log: list[str] = []
        ev = {k: asyncio.Event() for k in "abcd"}
        tasks = [asyncio.ensure_future(_holder(budget, 60, log, "a", ev["a"]))]
        await _settle()
        tasks.append(asyncio.ensure_future(_holder(budget, 70, log, "b", ev["b"])))  # does not fit beside a
        await _settle()
        tasks.append(asyncio.ensure_future(_holder(budget, 10, log, "c", ev["c"])))  # fits, but b came first
        await _settle()
        assert log == ["a"] and budget.used == 60 and budget.waiting == 2
        ev["a"].set()
        await _settle()
        assert log == ["a", "b", "c"] and budget.used == 80 and budget.waiting == 0
        ev["b"].set()
        ev["c"].set()
        await asyncio.gather(*tasks)
        assert budget.used == 0

    asyncio.run(go())


def test_one_holder_alone_always_fits():
    """The per-put limit is the header check's: the budget never deadlocks a put larger than itself."""
    async def go() -> None:
        budget = MemoryBudget(10)
        async with budget.hold(1000):
            assert budget.used == 1000
        assert budget.used == 0

    asyncio.run(go())


@pytest.mark.parametrize("when", ["waiting", "at-its-turn", "granted"])
def test_a_cancelled_waiter_leaves_the_budget_as_it_was(when):
    """A waiter cancelled while waiting must not block the ones behind it; one cancelled just as its turn came
    must give its bytes back."""
    async def go() -> None:
        budget = MemoryBudget(100)
        log: list[str] = []
        release_a, release_c = asyncio.Event(), asyncio.Event()
        a = asyncio.ensure_future(_holder(budget, 90, log, "a", release_a))
        await _settle()
        b = asyncio.ensure_future(_holder(budget, 50, log, "b", asyncio.Event()))
        await _settle()
        c = asyncio.ensure_future(_holder(budget, 10, log, "c", release_c))
        await _settle()
        if when == "waiting":  # b's task handles its cancellation before a leaves
            b.cancel()
            await _settle()
        elif when == "at-its-turn":  # a leaves first: b heads the queue, cancelled, its task not run yet
            release_a.set()
            b.cancel()
        else:  # a leaves and b is granted, then cancelled before its task runs
            release_a.set()
            await asyncio.sleep(0)
            b.cancel()
        release_a.set()
        await _settle()
        assert b.cancelled() and "b" not in log
        assert log == ["a", "c"] and budget.used == 10 and budget.waiting == 0
        release_c.set()
        await asyncio.gather(a, c)
        assert budget.used == 0

    asyncio.run(go())
