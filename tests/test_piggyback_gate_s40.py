"""Repeats ride packets that leave anyway only while the path does not queue (chatterbox.PIGGYBACK_QUEUE_S)."""

from __future__ import annotations

import pytest

from tests.quicpair import Pair, accepted_chat
from tokenwire.testbed.sim import SimConfig, run_chats
from tokenwire.transport.chatterbox import PIGGYBACK_QUEUE_S, TokenSender
from tokenwire.transport.server_session import ServerSession

MIN_RTT = 0.080


def _token_unacknowledged(excess_s: float | None, *, lost_lately: bool = False,
                          ) -> tuple[Pair, ServerSession, TokenSender]:
    """A chat whose first token left and is not acknowledged, on a path whose smoothed round trip stands
    ``excess_s`` above its minimum (None: no round-trip sample yet); ``lost_lately``: a token datagram of the
    connection was declared lost just before (chatterbox.QUIET_LOSS_S)."""
    pair, server, sid = accepted_chat()
    server.datagrams_to_send(pair.now)  # STARTED
    loss = server.quic._loss
    if excess_s is None:
        loss._rtt_initialized = False
    else:
        loss._rtt_initialized, loss._rtt_min, loss._rtt_smoothed = True, MIN_RTT, MIN_RTT + excess_s
    sender = server.requests[sid].sender
    assert sender is not None
    if lost_lately:
        server._token_losses.at = pair.now
    server.push(sid, "a0 ", pair.now)
    assert server.datagrams_to_send(pair.now)  # the token's packet, never delivered
    assert sender.can_piggyback() and not sender.wants_send()
    return pair, server, sender


def _ping_leaves(pair: Pair, server: ServerSession) -> None:
    """A packet that leaves anyway (a PING: what a lone ACK or FINISHED is to the sender)."""
    server.quic.send_ping(7)
    assert server.datagrams_to_send(pair.now + 0.002)


@pytest.mark.parametrize("excess_ms", [None, 0.0, 2.0, PIGGYBACK_QUEUE_S * 1000 - 0.1])
def test_without_a_queue_the_unacknowledged_tokens_ride_a_packet_leaving_anyway(excess_ms: float | None) -> None:
    pair, server, sender = _token_unacknowledged(None if excess_ms is None else excess_ms / 1000)
    _ping_leaves(pair, server)
    assert sender.stats.piggybacks == 1


@pytest.mark.parametrize("excess_ms", [PIGGYBACK_QUEUE_S * 1000 + 1.0, 20.0, 100.0])
def test_a_path_that_queues_carries_no_piggyback(excess_ms: float) -> None:
    pair, server, sender = _token_unacknowledged(excess_ms / 1000)
    _ping_leaves(pair, server)
    assert sender.stats.piggybacks == 0
    # the repeats that go with new tokens are another rule's (CONGESTED_REPEATS): a new token still takes the old
    # one along (counted as one repeat, though the two make one run)
    server.push(sender.handle, "a1 ", pair.now + 0.004)
    before = (sender.stats.packets, sender.stats.redundant_tokens)
    assert server.datagrams_to_send(pair.now + 0.004)
    assert (sender.stats.packets, sender.stats.redundant_tokens) == (before[0] + 1, before[1] + 1)
    assert sender.floor == 0 and sender.next_new == 2


def test_new_tokens_that_wait_to_share_a_packet_still_ride_one_leaving_anyway() -> None:
    """Far past the gate (a lossy path queueing 300 ms: COALESCE_MAX_S), a new token waits to share a packet; a
    packet that leaves meanwhile takes it, as its own packet would have, repeats or not."""
    pair, server, sender = _token_unacknowledged(0.300, lost_lately=True)
    server.push(sender.handle, "a1 ", pair.now + 0.001)
    assert sender.holds_new_tokens() and not sender.wants_send()  # a1 waits
    _ping_leaves(pair, server)
    assert sender.next_new == 2 and not sender.holds_new_tokens()


def test_chats_that_fill_a_shared_link_keep_its_queue_short() -> None:
    """Ten chats at 30 tokens/s through one 330-kbit/s link (30 chats on 1 Mbit/s, scaled). With repeats on every
    lone ACK they offered ~89 % of its capacity at ~158 bytes per token, and its queue stood at ~75 ms (median
    stall 0.92); without them ~78 % at ~138 bytes, ~15 ms (0.56)."""
    cfg = SimConfig(chats=10, down_trace="330kbps", delay_ms=40, queue_packets=200, loss="iid:0.02",
                    loss_direction="down", tokens=100, rate=30, seed=0)
    run = run_chats("chatterbox", cfg)
    assert all(f.finished for f in run.flows)
    assert run.down["sojourn_ms_p50"] < 30.0
    sent = sum(f.run.wire_bytes for f in run.flows if f.run is not None)
    assert sent / (10 * 100) < 145
