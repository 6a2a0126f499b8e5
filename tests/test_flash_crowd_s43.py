"""A queue that stands under the congestion cap's threshold drains the path (chatterbox.STANDING_QUEUE_S): chats
that start together behind a queue learn their minimum round trip inside it, and then never see the queue they keep
standing as one."""

from __future__ import annotations

import statistics

import pytest

from tests.quicpair import Pair, accepted_chat, set_rtt
from tokenwire.testbed import sim
from tokenwire.transport import server_session
from tokenwire.transport.chatterbox import DRAIN_GAP_S, DRAIN_S, STANDING_QUEUE_S, TokenSender
from tokenwire.transport.server_session import ServerSession


def _path(server: ServerSession, floor: float, excess: float) -> None:
    """aioquic's minimum round trip ``floor`` and its smoothed one ``excess`` above it."""
    set_rtt(server, srtt=floor + excess, floor=floor)


def _drains(server: ServerSession, start: float, until: float, step: float = 0.05) -> list[float]:
    """The times (from ``start``, every ``step``) at which the server says its path drains."""
    out = []
    for i in range(round((until - start) / step) + 1):
        if server._draining(start + i * step):
            out.append(round(i * step, 3))
    return out


def test_a_queue_standing_under_the_caps_threshold_drains_the_path_once_a_window() -> None:
    """A 200-ms path whose smoothed round trip stands 60 ms above it: over DRAIN_QUEUE_S, under the cap's 100 ms
    (QUEUE_DELAY_SHARE of the minimum). After STANDING_QUEUE_S it drains for DRAIN_S (longer than the round trip),
    then not again within DRAIN_GAP_S."""
    pair, server, _sid = accepted_chat()
    _path(server, 0.200, 0.060)
    assert not server._path_congested(pair.now)
    t0 = pair.now
    got = _drains(server, t0, t0 + DRAIN_GAP_S - 0.1)
    assert server.drains == 1
    assert got and got[0] == pytest.approx(STANDING_QUEUE_S, abs=0.051) and got[-1] < STANDING_QUEUE_S + DRAIN_S
    assert len(got) == pytest.approx(DRAIN_S / 0.05, abs=1)
    later = _drains(server, t0 + DRAIN_GAP_S, t0 + DRAIN_GAP_S + 2 * STANDING_QUEUE_S)
    assert server.drains == 2 and later  # the next window's


def test_a_drain_lasts_a_round_trip_if_that_is_longer() -> None:
    pair, server, _sid = accepted_chat()
    _path(server, 1.0, 0.3)  # (a 1.3-s round trip, 300 ms over a 1-s minimum: under its 500-ms threshold)
    got = _drains(server, pair.now, pair.now + 5.0)
    assert server.drains == 1 and got[-1] - got[0] == pytest.approx(1.3, abs=0.06)


@pytest.mark.parametrize(("floor", "excess"), [
    (0.200, 0.015),  # a short queue (DRAIN_QUEUE_S)
    (0.200, 0.120),  # past the threshold: the cap's (and the wait's, further on) path
    (0.080, 0.045),  # a minimum of 80 ms or less: the threshold is QUEUE_DELAY_S, and over it the cap's
    (0.050, 0.015),
])
def test_no_drain_where_the_queue_reads_as_one_or_is_short(floor: float, excess: float) -> None:
    pair, server, _sid = accepted_chat()
    _path(server, floor, excess)
    assert _drains(server, pair.now, pair.now + 3 * STANDING_QUEUE_S) == [] and server.drains == 0


def test_a_queue_that_lets_go_starts_the_count_again() -> None:
    pair, server, _sid = accepted_chat()
    _path(server, 0.200, 0.060)
    t0 = pair.now
    assert not server._draining(t0) and not server._draining(t0 + 0.7 * STANDING_QUEUE_S)
    _path(server, 0.200, 0.010)  # (under DRAIN_QUEUE_S)
    assert not server._draining(t0 + 0.8 * STANDING_QUEUE_S)
    _path(server, 0.200, 0.060)
    assert not server._draining(t0 + 1.1 * STANDING_QUEUE_S)  # (standing again since 1.1)
    assert not server._draining(t0 + 2.05 * STANDING_QUEUE_S)
    assert server._draining(t0 + 2.15 * STANDING_QUEUE_S) and server.drains == 1


def _draining_chat() -> tuple[Pair, ServerSession, TokenSender, float]:
    """A chat on a lossy 200-ms path with a 60-ms standing queue, its first token sent and unacknowledged, whose
    server drains the path from the returned time on."""
    pair, server, sid = accepted_chat()
    server.datagrams_to_send(pair.now)  # STARTED
    _path(server, 0.200, 0.060)
    server._token_losses.at = pair.now  # a token datagram lost lately (QUIET_LOSS_S: the repeats and wait are on)
    sender = server.requests[sid].sender
    assert sender is not None
    sender.srtt = 0.260  # (the path's: no idle repair due within the tests' waits)
    server.push(sid, "a0 ", pair.now)
    assert server.datagrams_to_send(pair.now)  # a0's packet, never delivered
    assert sender.stats.redundant_tokens == 0 and not sender.holds_new_tokens()
    t = pair.now + STANDING_QUEUE_S + 0.01
    assert not server._draining(pair.now + 0.01) and server._draining(t)
    return pair, server, sender, t


def test_while_the_path_drains_new_tokens_carry_no_repeats_and_wait_to_share_a_packet() -> None:
    """Before, a1 took a0 along (the queue under the cap's threshold: every unacknowledged token, as repeats) and
    a2 left at once in a packet of its own that took both."""
    _pair, server, sender, t = _draining_chat()
    server.push(sender.handle, "a1 ", t)
    assert server.datagrams_to_send(t)
    assert sender.next_new == 2 and sender.stats.redundant_tokens == 0  # a1 alone
    server.push(sender.handle, "a2 ", t + 0.01)
    assert not server.datagrams_to_send(t + 0.01) and sender.holds_new_tokens()  # a2 waits the queue's 60 ms
    deadline = sender._hold_until
    assert deadline == pytest.approx(t + 0.060)
    sender.on_timer(deadline)
    assert server.datagrams_to_send(deadline) and sender.next_new == 3 and sender.stats.redundant_tokens == 0


def test_while_the_path_drains_nothing_rides_a_packet_leaving_anyway() -> None:
    _pair, server, sender, t = _draining_chat()
    _path(server, 0.200, 0.004)  # (the gate alone would let the repeats ride now: PIGGYBACK_QUEUE_S)
    server.quic.send_ping(7)
    assert server.datagrams_to_send(t)
    assert sender.stats.piggybacks == 0


def test_a_repair_due_during_a_drain_still_carries_the_lost_token() -> None:
    """A loss declared while a new token waited to share a packet: the repair took the new token, the drain stripped
    its repeats, and the repair was done with it (``_want_repair`` cleared): the lost token waited for the drain's
    end, 0.5 s or a round trip (a review's repro)."""
    _pair, server, sender, t = _draining_chat()
    server.push(sender.handle, "a1 ", t)
    assert server.datagrams_to_send(t)  # a1 alone (the drain)
    server.push(sender.handle, "a2 ", t + 0.01)
    assert not server.datagrams_to_send(t + 0.01) and sender.holds_new_tokens()  # a2 waits to share a packet
    a0 = min(sender._outstanding.values(), key=lambda p: p.pid)
    assert a0.runs == ((0, 1),)
    sender.on_delivery(a0, False, t + 0.02)  # QUIC declares a0's packet lost
    assert sender._want_repair
    before = sender.stats.redundant_tokens
    assert server.datagrams_to_send(t + 0.02)
    newest = max(sender._outstanding.values(), key=lambda p: p.pid)
    assert any(f <= 0 < e for f, e in newest.runs), newest.runs  # a0 rides the repair, with a2
    assert sender.stats.redundant_tokens > before


def test_a_new_host_gets_its_own_drain() -> None:
    """The drain's state outlived a move to another host: a drain begun on the path left went on over the new one,
    whose minimum (fresh, perhaps learned inside a queue) could not drain until DRAIN_GAP_S after the old one's."""
    pair, server, _sid = accepted_chat()
    _path(server, 0.200, 0.060)
    t0 = pair.now
    assert _drains(server, t0, t0 + STANDING_QUEUE_S + 0.1) and server.drains == 1  # the old path drained at ~1 s
    server._on_host_changed("10.0.0.2", "10.9.9.9")  # (as Session._host_changed calls it, after the path reset)
    _path(server, 0.200, 0.060)  # the new path's minimum learned 60 ms into its queue
    t1 = t0 + STANDING_QUEUE_S + 0.15
    assert not server._draining(t1)  # (the old path's drain ended with it)
    assert _drains(server, t1 + 0.6, t1 + 0.6 + 3 * STANDING_QUEUE_S) and server.drains == 2


CROWD_CROSS = "onoff-ect1:200kbps:1200:1000000"
"""The crowd's cross traffic: 200 kbit/s over the run's first 1.2 s (through the handshakes and the answers' first
~0.4 s), then silent for longer than any run."""


def _flash_crowd(loss: str, seed: int) -> list[float]:
    """40 chats on 1 Mbit/s (40 ms each way, droptail 200, 300 tokens at 30/s) whose answers start behind their
    handshakes' packets (``tokenwire sim --start connected``, as the namespace testbed's ``--start connected``), with
    a burst of cross traffic at the start (``--cross`` :data:`CROWD_CROSS`): each chat's stall. (Session 43's test
    reached the same crowd through the simulator's internals.)"""
    cfg = sim.SimConfig(chats=40, down_trace="1mbps", delay_ms=40, queue_packets=200, loss=loss,
                        loss_direction="down", tokens=300, rate=30, seed=seed, start="connected", cross=[CROWD_CROSS])
    run = sim.run_chats("chatterbox", cfg)
    assert all(f.finished for f in run.flows)
    return [f.run.stats.stall_ratio for f in run.flows if f.run is not None]


@pytest.mark.parametrize(("loss", "seed"), [("iid:0.02", 0), ("ge:0.01,0.1", 1)])
def test_a_flash_crowd_gets_out_of_its_standing_queue(loss: str, seed: int) -> None:
    """They learned their minimum inside the handshakes' queue, it stood under the cap's threshold for the whole
    answer, and they stalled 0.974-0.978 (136-137 bytes per token, seeds 0-2, both loss models); draining once each,
    0.39-0.46 (108-110)."""
    stalls = _flash_crowd(loss, seed)
    assert statistics.median(stalls) < 0.5


def test_without_the_drain_the_crowd_collapses(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same crowd with the drain off: the collapse the test above gets out of (so the public options do reach
    it)."""
    monkeypatch.setattr(server_session, "STANDING_QUEUE_S", 1e9)
    stalls = _flash_crowd("iid:0.02", 0)
    assert statistics.median(stalls) > 0.9


@pytest.mark.timeout(120)
def test_a_lone_chat_whose_delay_steps_up_drains_once_and_gets_every_token() -> None:
    """The drain's cost case: one chat whose one-way delay steps 100 -> 130 ms 2 s into a 600-token answer, 2 % iid
    loss down. The step reads as a standing queue until the floor's window passes it: one drain, not one per second,
    and every token arrives. (This seed also hung the in-memory driver before quicpair._next_time: aioquic's loss
    timer stayed at a time it had served, and the driver served it at the same instant for ever.)"""
    import random

    from tests.quicpair import run_answer

    pair, server, sid = accepted_chat()
    rng = random.Random(1)
    start = pair.now + 0.01

    def down(now: float) -> float | None:
        return None if rng.random() < 0.02 else (0.100 if now < start + 2.0 else 0.130)

    rx = pair.client.requests[sid].receiver
    got: dict[int, float] = {}

    def on_rx(now: float) -> None:
        for i in range(len(got), rx.next_index):
            got[i] = now

    run_answer(pair, server, sid, 600, start=start, until=start + 600 / 30 + 30, down=down, up_s=0.100, finish=True,
               on_to_client=on_rx)
    assert len(got) == 600 and server.drains == 1
