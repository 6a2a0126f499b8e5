"""An ended connection is freed by refcounting alone (session 34). After its buffers were emptied at its end
(test_gc_stall_fixes), ~120 objects a connection still waited for a full collection, in cycles: aioquic's server
handlers on the protocol, the scheduler's clock closure over the session, the datagram hook's writer on the
connection, aioquic's TLS and loss-recovery callbacks. A full collection walks every live session (0.3 s at 2,000
sessions); and the daemon freezes what survives one, where a cycle is never collected."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from tokenwire.daemon import gc_pacing
from tokenwire.daemon.gc_pacing import GcPacing
from tokenwire.transport.client import connect
from tokenwire.transport.server import serve

from .test_gc_stall_fixes import recorder  # noqa: F401  # (a fixture)
from .test_handshake_limits import until
from .test_loopback import client_kwargs, run, slow_source


def test_an_ended_connection_leaves_nothing_for_the_collector(no_automatic_collection) -> None:
    async def go() -> tuple[list[str], list[str]]:
        server = await serve(slow_source, host="127.0.0.1", port=0)
        try:
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                answer = conn.chat("hi", scheme="chatterbox")
                await answer.__anext__()  # streaming: the request stream is open on both sides
                proto = next(iter(server.protocols))
                refs = {"protocol": weakref.ref(proto), "connection": weakref.ref(proto._quic),
                        "session": weakref.ref(proto.session), "scheduler": weakref.ref(proto.session.scheduler),
                        "tls": weakref.ref(proto._quic.tls)}
                del proto
            await until(lambda: not server.protocols, 10)
            for _ in range(3):
                await asyncio.sleep(0)  # (the end's callbacks already ran: nothing is waited for here)
            alive = [name for name, ref in refs.items() if ref() is not None]
        finally:
            server.close()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            # aioquic's and the server side's (the client's request objects are a cycle of their own, of the
            # application's process: its answer object holds them)
            kinds = sorted({type(o).__name__ for o in gc.garbage if type(o).__module__.startswith(
                ("aioquic", "tokenwire.transport.server", "tokenwire.transport.quic_io",
                 "tokenwire.transport.session", "tokenwire.transport.datagram_hook"))})
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        return alive, kinds

    alive, cyclic = run(go(), 60)
    assert alive == [], alive  # freed when the connection ended, with no collection
    assert cyclic == [], cyclic


def test_a_client_that_leaves_its_connection_leaves_nothing_for_the_collector(no_automatic_collection) -> None:
    """The client's side too (an application, an engine opening a KV connection per request): its transport kept
    its protocol after closing, and each request's ack source a closure over its session, so ~180 objects of
    every `async with connect(...)` waited for a full collection."""

    async def go() -> list[str]:
        server = await serve(slow_source, host="127.0.0.1", port=0)
        try:
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                answer = conn.chat("hi", scheme="chatterbox")
                await answer.__anext__()
                proto = conn._protocol
                refs = {"protocol": weakref.ref(proto), "connection": weakref.ref(proto._quic),
                        "session": weakref.ref(proto.session), "transport": weakref.ref(proto._transport)}
                del proto
            del conn, answer
            for _ in range(3):
                await asyncio.sleep(0)  # (the transport's close runs in the next turn of the loop)
            return [name for name, ref in refs.items() if ref() is not None]
        finally:
            server.close()

    assert run(go(), 60) == []


# ------------------------------------------------------------------------------ what survives is frozen
MANY = gc_pacing.FREEZE_MIN_OBJECTS + 5_000


def _frozen_pacing_or_skip(loop: asyncio.AbstractEventLoop) -> GcPacing:
    if gc.get_freeze_count():
        pytest.skip("the heap is frozen already (by an earlier test): nothing for a daemon to freeze")
    pacing = GcPacing()
    pacing.freeze_started(loop)
    assert pacing.froze_heap
    return pacing


def test_what_survives_a_full_collection_is_frozen_on_the_loop_and_given_back_at_the_end() -> None:
    """CPython's own full collections (each time the heap grew by a quarter) walked every live session: 0.3 s of
    CPU at 2,000 sessions, which no pacing of ours bounded. What survives one is frozen now, so the next walks
    only what is newer; never inside the collection, and a younger generation's collection freezes nothing."""

    async def go() -> tuple[int, int, int, int]:
        pacing = _frozen_pacing_or_skip(asyncio.get_running_loop())
        try:
            at_start = gc.get_freeze_count()
            survivors = [[i] for i in range(MANY)]  # tracked, alive: a ramp of sessions' worth
            gc.collect(1)
            await asyncio.sleep(0)
            after_young = gc.get_freeze_count()
            gc.collect()  # a full collection
            inside = gc.get_freeze_count()  # (the freeze waits for the loop)
            await asyncio.sleep(0)
            after_full = gc.get_freeze_count()
            assert len(survivors) == MANY
            return at_start, after_young, inside, after_full
        finally:
            pacing.unfreeze()

    at_start, after_young, inside, after_full = asyncio.run(go())
    # (the count is not monotonic: frozen objects freed meanwhile leave it, a few each turn of the loop)
    assert after_young < at_start + 100 and inside < at_start + 100  # the survivors not frozen then
    assert after_full > at_start + MANY - 100  # and frozen now
    assert gc.get_freeze_count() == 0 and not [cb for cb in gc.callbacks if getattr(cb, "__self__", None)
                                               and isinstance(cb.__self__, GcPacing)]


def test_a_collection_in_a_worker_thread_freezes_through_the_loop() -> None:
    """A worker thread's allocation (the KV codec, the store) may run a full collection: the callback runs there,
    and hands the freeze to the loop thread-safely."""

    async def go() -> tuple[int, int]:
        pacing = _frozen_pacing_or_skip(asyncio.get_running_loop())
        try:
            at_start = gc.get_freeze_count()
            survivors = [[i] for i in range(MANY)]
            await asyncio.to_thread(gc.collect)
            for _ in range(3):
                await asyncio.sleep(0)
            assert len(survivors) == MANY
            return at_start, gc.get_freeze_count()
        finally:
            pacing.unfreeze()

    at_start, after = asyncio.run(go())
    assert after > at_start + MANY - 100


def test_a_full_collection_with_few_new_survivors_freezes_nothing() -> None:
    """What is alive at a freeze and dies in a cycle later stays frozen until the next walk of the whole heap
    (an upstream failure's traceback, in flight): survivors are frozen only once there are enough of them to matter
    (a ramp of sessions), not at every full collection of a steady daemon."""

    async def go() -> tuple[int, int]:
        pacing = _frozen_pacing_or_skip(asyncio.get_running_loop())
        try:
            at_start = gc.get_freeze_count()
            few = [[i] for i in range(gc_pacing.FREEZE_MIN_OBJECTS // 4)]
            gc.collect()
            for _ in range(3):
                await asyncio.sleep(0)
            assert len(few) == gc_pacing.FREEZE_MIN_OBJECTS // 4
            return at_start, gc.get_freeze_count()
        finally:
            pacing.unfreeze()

    at_start, after = asyncio.run(go())
    assert after < at_start + 100


def test_the_frozen_heap_is_walked_again_whether_connections_ended_or_not(recorder) -> None:  # noqa: F811
    """A cycle that became garbage while frozen is never collected: collect_ended unfreezes for its collection
    once every GC_UNFREEZE_INTERVAL_S, and freezes again at once; a daemon of long-lived connections, which ends
    none, too (a review's failure storm froze ~4,300 such objects a minute on 8 long-lived connections)."""
    pacing = GcPacing()
    pacing.froze_heap, pacing.unfrozen_at = True, 1000.0  # (as freeze_started leaves it)
    pacing.ended_connections = 1
    pacing.collect_ended(1000.0 + gc_pacing.GC_INTERVAL_S, alive=0)
    assert recorder.calls == ["collect"]
    recorder.calls.clear()
    pacing.collect_ended(1000.0 + gc_pacing.GC_UNFREEZE_INTERVAL_S - 1, alive=8)  # nothing ended: nothing yet
    assert recorder.calls == []
    pacing.collect_ended(1000.0 + gc_pacing.GC_UNFREEZE_INTERVAL_S, alive=8)  # nothing ended: the walk all the same
    assert recorder.calls == ["unfreeze", "collect", "freeze"]
    assert pacing.unfrozen_at == 1000.0 + gc_pacing.GC_UNFREEZE_INTERVAL_S
