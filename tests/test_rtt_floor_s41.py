"""The chat server's queue signals read the path's base round trip as a windowed minimum (transport/rtt_floor.py)."""

from __future__ import annotations

import math

import pytest

from tests.quicpair import accepted_chat
from tokenwire.testbed import sim
from tokenwire.transport.chatterbox import PIGGYBACK_QUEUE_S
from tokenwire.transport.rtt_floor import RTT_FLOOR_WINDOW_S, SLOTS, WindowedMin
from tokenwire.transport.server_session import ServerSession


def test_the_minimum_of_the_window() -> None:
    w = WindowedMin(10.0, slots=10)
    assert math.isinf(w.value(0.0))
    w.add(0.050, 0.0)
    w.add(0.080, 3.0)
    w.add(0.060, 6.0)
    assert w.value(6.0) == 0.050
    assert w.value(10.9) == 0.050  # (up to a slot late: never early)
    assert w.value(11.0) == 0.060  # the 50 ms left the window; 60 ms came later than 80 ms and is smaller
    assert w.value(16.5) == 0.060
    assert w.value(17.0) == 0.060  # the latest kept with no sample since (a path gone quiet keeps its floor)
    w.add(0.070, 17.0)
    assert w.value(17.0) == 0.070
    w.add(0.040, 17.5)
    assert w.value(17.5) == 0.040


@pytest.mark.parametrize("window", [0.0, -1.0, math.inf, math.nan])
def test_a_window_that_is_no_length_is_refused(window: float) -> None:
    with pytest.raises(ValueError, match="window"):
        WindowedMin(window)


def test_a_rising_series_keeps_one_sample_per_slot() -> None:
    """A client that makes each round trip longer than the last cannot grow the filter past its slots."""
    w = WindowedMin(10.0, slots=SLOTS)
    for i in range(10_000):
        w.add(0.010 + i * 1e-5, i * 0.01)
    assert len(w) <= SLOTS + 1
    assert w.value(99.99) == pytest.approx(0.010 + 8900 * 1e-5, abs=2e-5)  # (the first sample of slot 89)


def test_a_host_change_forgets_the_old_paths_samples() -> None:
    _pair, server, _sid = accepted_chat()
    assert len(server.rtt_floor) > 0  # the handshake's samples
    loss = server.quic._loss
    server._on_host_changed("a", "b")
    assert len(server.rtt_floor) == 0
    assert server._rtt() == (loss._rtt_smoothed, loss._rtt_min)  # aioquic's own until the new path's samples


def test_the_floor_is_aioquics_minimum_on_a_steady_path() -> None:
    """Within the window, on a path whose base does not move, the floor is aioquic's minimum (every sample aioquic
    takes is at least its minimum of the time), so the queue signals read what they read before."""
    _pair, server, _sid = accepted_chat()
    loss = server.quic._loss
    assert server._rtt() == (loss._rtt_smoothed, loss._rtt_min)


def _stepped_chat(d0_ms: float, d1_ms: float, step_s: float, tokens: int, check_from_s: float,
                  ) -> list[tuple[float, bool, bool, float]]:
    """One chat over the sim's fixed channel (no loss) whose one-way delay steps from ``d0_ms`` to ``d1_ms`` in both
    directions ``step_s`` after the request (a new route, no move to another host); the server session's queue
    signals every 0.5 s from ``check_from_s`` after the request: (queue estimate, piggyback gate open, congested,
    shared-packet wait)."""
    cfg = sim.SimConfig(tokens=tokens, delay_ms=d0_ms, loss="none", seed=3)
    chats = sim._Chats("chatterbox", cfg)
    checks: list[tuple[float, bool, bool, float]] = []
    go = chats._go

    def step() -> None:
        for wire in (chats.down, chats.up):
            assert isinstance(wire, sim._Wire)
            wire.delay = d1_ms / 1000.0

    def check() -> None:
        sess = chats.flows[0].server.session
        assert isinstance(sess, ServerSession)
        now = chats.loop.now
        rtt = sess._rtt()
        assert rtt is not None
        checks.append((rtt[0] - rtt[1], sess._piggyback_welcome(), sess._path_congested(now), sess._queue_delay(now)))
        if chats.flows[0].outcome is None:
            chats.loop.at(now + 0.5, check)

    def go_then_step() -> None:
        go()
        chats.loop.at(chats.loop.now + step_s, step)
        chats.loop.at(chats.loop.now + check_from_s, check)

    chats._go = go_then_step  # type: ignore[method-assign]
    chats.run(None, 1e9, lambda: 0.0)
    assert chats.flows[0].outcome is not None and chats.flows[0].outcome.digest_ok
    return checks


def test_a_base_delay_that_grows_is_no_queue_once_the_window_passed() -> None:
    """A route 80 ms longer each way mid-answer (one-way 20 -> 100 ms). With aioquic's minimum, which never expires,
    the 160 ms it added read as a queue for the rest of the connection: the piggyback gate shut, the repeats capped
    (chatterbox.CONGESTED_REPEATS) at every check. Once the window has passed the step, none of them."""
    slot = RTT_FLOOR_WINDOW_S / SLOTS
    checks = _stepped_chat(20.0, 100.0, 2.0, tokens=int((RTT_FLOOR_WINDOW_S + 9) * 30), check_from_s=2.0
                           + RTT_FLOOR_WINDOW_S + slot + 1.0)
    assert len(checks) >= 8
    assert max(q for q, *_ in checks) < PIGGYBACK_QUEUE_S
    assert all(open_ and not congested and wait == 0.0 for _q, open_, congested, wait in checks)


def test_the_step_reads_as_a_queue_within_the_window() -> None:
    """The window is what it says: until it has passed, the step still reads as a queue (the floor never rises
    sooner, so a standing queue of the window's length keeps the gate shut)."""
    checks = _stepped_chat(20.0, 100.0, 2.0, tokens=int((RTT_FLOOR_WINDOW_S - 1) * 30), check_from_s=4.0)
    assert len(checks) >= 8
    assert checks and all(not open_ and congested for _q, open_, congested, _w in checks)
