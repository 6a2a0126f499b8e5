"""A connection's end must not stall the daemon for a time that grows with the sessions still alive.

The daemon ran a full ``gc.collect()`` within GC_INTERVAL_S of every connection's end (aioquic's QuicConnection is a
reference cycle, which only a full collection frees), and a full collection walks every live session: one close
stalled the loop, /healthz included, 0.45 s at 2000 sessions and 0.6-1 s at 3000. Now the ended connection's buffers
are emptied at its end (freed by refcounting), the small cycle left waits for a collection amortized over the
connections alive, and a daemon run by ``run()`` freezes what is alive at READY so no collection walks it again.
No timing is asserted: what is freed is seen through weak references, the collections by counting them.
"""

from __future__ import annotations

import asyncio
import time
import types
import weakref
from typing import Any

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from tokenwire.daemon import gc_pacing
from tokenwire.daemon.config import parse_config
from tokenwire.daemon.service import Daemon
from tokenwire.transport.client import connect
from tokenwire.transport.quic_io import RELEASED_AT_END

from .test_handshake_limits import until
from .test_hostile_clients import _daemon
from .test_loopback import run


class _GcRecorder:
    """Stands for the ``gc`` module as gc_pacing.py sees it: records the calls, collects and freezes nothing."""

    def __init__(self, frozen: int = 0) -> None:
        self.calls: list[str] = []
        self.callbacks: list[Any] = []  # (gc.callbacks: what freeze_started registers)
        self.frozen = frozen
        self.at_freeze: list[tuple[bool, bool]] = []  # (a chat listener accepting, serving) when freeze() came
        self.daemon: Daemon | None = None

    def collect(self, *args: Any) -> int:
        self.calls.append("collect")
        return 0

    def get_freeze_count(self) -> int:
        return self.frozen

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")

    def freeze(self) -> None:
        self.calls.append("freeze")
        if self.daemon is not None:
            self.at_freeze.append((any(s.accepting for s in self.daemon._servers), self.daemon.serving))


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> _GcRecorder:
    rec = _GcRecorder()
    monkeypatch.setattr(gc_pacing, "gc", types.SimpleNamespace(
        collect=rec.collect, get_freeze_count=rec.get_freeze_count, freeze=rec.freeze,
        unfreeze=rec.unfreeze, callbacks=rec.callbacks))
    return rec




def a_daemon() -> Daemon:
    return Daemon(parse_config({"server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": ""}}))


# ------------------------------------------------------------------------------ 1. the ended connection's state
def test_an_ended_connections_streams_keys_and_handshake_buffers_are_freed_without_a_collection(
        no_automatic_collection):
    """A client closing in the middle of an answer: its request stream (its buffers), the handshake's streams and
    the keys of the server's QuicConnection waited for a full collection, being in its cycle. Emptied at the end,
    refcounting frees them at once."""

    async def go() -> tuple[list[weakref.ref], list[tuple[str, Any]] | None]:
        async with _daemon() as daemon:
            daemon.gc_pacing.collected_at = time.monotonic() + 1000  # the housekeeping task collects nothing here
            async with connect("127.0.0.1", daemon.addresses[0][1], verify=False) as conn:
                answer = conn.chat("x" * 5000, max_tokens=400)
                await answer.__anext__()  # streaming: the request stream is open on both sides
                quic = next(iter(daemon.protocols))._quic
                assert quic._streams  # (else this test checks nothing about the streams)
                held = [weakref.ref(o) for o in (*quic._streams.values(), *quic._crypto_streams.values(),
                                                 *quic._cryptos.values(), *quic._cryptos_initial.values())]
                ended = weakref.ref(quic)
                del quic
            await until(lambda: not daemon.protocols, 10)
            quic = ended()  # (still there: a cycle, which the collector frees later, as small as it now is)
            return held, None if quic is None else [(name, getattr(quic, name)) for name in RELEASED_AT_END]

    held, left = run(go(), 60)
    assert [r for r in held if r() is not None] == []
    assert left is None or [name for name, value in left if value] == []


def test_aioquic_still_has_the_attributes_released_at_a_connections_end():
    """Pins aioquic's private names (pyproject: aioquic==1.7.2) that SessionProtocol._release_ended empties: one
    renamed by an upgrade would be left holding its buffers again, silently."""
    quic = QuicConnection(configuration=QuicConfiguration(is_client=True))
    quic.connect(("127.0.0.1", 4433), now=0.0)  # (its TLS state and keys are made here)
    for name in RELEASED_AT_END:
        assert isinstance(getattr(quic, name), (dict, list)), name
    for name in ("_crypto_buffers", "_crypto_streams", "_cryptos", "_cryptos_initial",
                 "_QuicConnection__frame_handlers"):
        assert getattr(quic, name), name  # (what it holds while alive)


# ------------------------------------------------------------------------------ 2. the collection, amortized
def test_one_end_among_many_live_connections_starts_no_full_collection(recorder):
    """One end, with 40 connections alive: no collection (it walked them all, for one small leftover cycle); one
    once the ended are a quarter of those alive, not again within GC_INTERVAL_S; and with none alive, the first
    end collects."""
    daemon = a_daemon()
    live: set[Any] = {object() for _ in range(40)}
    daemon.protocols = live  # (only counted)
    now = 1000.0
    daemon.gc_pacing.collected_at = now - gc_pacing.GC_INTERVAL_S
    daemon.gc_pacing.ended_connections = 1
    daemon.gc_pacing.collect_ended(now, len(daemon.protocols))
    assert recorder.calls == []
    daemon.gc_pacing.ended_connections = 9
    daemon.gc_pacing.collect_ended(now, len(daemon.protocols))
    assert recorder.calls == []
    daemon.gc_pacing.ended_connections = int(40 * gc_pacing.GC_ENDED_FRACTION)
    daemon.gc_pacing.collect_ended(now, len(daemon.protocols))
    pacing = daemon.gc_pacing
    assert recorder.calls == ["collect"] and pacing.ended_connections == 0 and pacing.collected_at == now
    daemon.gc_pacing.ended_connections = 40
    daemon.gc_pacing.collect_ended(now + gc_pacing.GC_INTERVAL_S / 2, len(daemon.protocols))  # too soon after it
    assert recorder.calls == ["collect"]
    live.clear()
    daemon.gc_pacing.ended_connections = 1
    daemon.gc_pacing.collect_ended(now + gc_pacing.GC_INTERVAL_S, len(daemon.protocols))
    assert recorder.calls == ["collect", "collect"]


def test_a_close_beside_live_sessions_collects_nothing_and_the_last_close_does(recorder):
    """With real connections: nine clients held, one closes: the housekeeping's pass makes no full collection
    (it made one within GC_INTERVAL_S of any end); once they have all closed, it does."""

    async def go() -> tuple[list[str], list[str]]:
        async with _daemon() as daemon:
            daemon.gc_pacing.collected_at = time.monotonic() + 1000  # (the housekeeping task's own passes: none here)
            held: list[Any] = []
            for _ in range(9):
                held.append(connect("127.0.0.1", daemon.addresses[0][1], verify=False))
                conn = await held[-1].__aenter__()
                await conn.chat("x", max_tokens=2).collect()
            await held.pop().__aexit__(None, None, None)
            await until(lambda: len(daemon.protocols) == 8, 10)
            now = time.monotonic()
            daemon.gc_pacing.collected_at = now - gc_pacing.GC_INTERVAL_S
            daemon.gc_pacing.collect_ended(now, len(daemon.protocols))
            after_one = list(recorder.calls)
            daemon.gc_pacing.collected_at = now + 1000
            while held:
                await held.pop().__aexit__(None, None, None)
            await until(lambda: not daemon.protocols, 10)
            daemon.gc_pacing.collected_at = now - gc_pacing.GC_INTERVAL_S
            daemon.gc_pacing.collect_ended(now, len(daemon.protocols))
            return after_one, list(recorder.calls)

    after_one, after_all = run(go(), 60)
    assert after_one == []
    assert after_all == ["collect"]


# ------------------------------------------------------------------------------ 3. gc.freeze() once started
def _start_and_stop(daemon: Daemon) -> None:
    """Start ``daemon`` and stop it again, its signal handlers not installed (the test process keeps its own)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler = lambda *a: None  # type: ignore[method-assign]
        await daemon.start()
        await daemon.stop()

    run(main())


def test_the_daemon_run_by_run_freezes_its_heap_before_letting_clients_in(recorder):
    """Under run() (the process is the daemon's) what is alive once started is collected, then frozen, before the
    chat listeners accept: every full collection walked the imports again (~52,000 objects; torch and numba with
    [kv]), and a connection frozen would never be freed."""
    daemon = a_daemon()
    daemon._handle_signals = True  # (what run() sets)
    recorder.daemon = daemon

    _start_and_stop(daemon)
    # stop() gives the heap back (a process that goes on after its daemon: a test run)
    assert recorder.calls == ["collect", "freeze", "unfreeze"]
    assert recorder.at_freeze == [(False, False)]


@pytest.mark.parametrize("handle_signals, frozen", [(False, 0), (True, 3)])
def test_a_daemon_in_someone_elses_process_or_a_frozen_one_freezes_nothing(recorder, handle_signals, frozen):
    """start() called by an application (its heap is not the daemon's to freeze), or a heap frozen already (by the
    application, or a daemon before in the same process): nothing frozen again."""
    daemon = a_daemon()
    daemon._handle_signals = handle_signals
    recorder.frozen = frozen

    _start_and_stop(daemon)
    assert "freeze" not in recorder.calls and "unfreeze" not in recorder.calls  # (not its freeze to undo)
