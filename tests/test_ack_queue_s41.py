"""The client sends no ack datagrams while the path from the server queues (client_session.ACK_QUEUE_S)."""

from __future__ import annotations

import statistics
from typing import Any

import pytest
from aioquic.tls import Epoch

from tests.quicpair import SERVER, accepted_chat, run_answer
from tokenwire.testbed.sim import SimConfig, run_chats
from tokenwire.transport.ack_timing import ACK_HOLD_S
from tokenwire.transport.client_session import (
    ACK_QUEUE_HOLD_S,
    ACK_QUEUE_QUIC_HOLD_S,
    ACK_QUEUE_S,
    ClientSession,
)
from tokenwire.transport.rtt_floor import RTT_FLOOR_WINDOW_S, SLOTS
from tokenwire.transport.server_session import ServerSession

BASE_S = 0.040  # the path's one-way delay


class _Chat:
    """An accepted chat whose server's token datagrams reach the client ``delay`` after they leave."""

    def __init__(self, scheme: str = "chatterbox") -> None:
        self.pair, self.server, self.sid = accepted_chat(scheme)
        self.server.datagrams_to_send(self.pair.now)  # STARTED (delivered by the pair before: not needed here)
        self.client: ClientSession = self.pair.client
        self.n = 0

    def token(self, at: float, delay: float) -> bool:
        """Token ``n`` leaves at ``at`` and arrives ``delay`` later; whether the client then wants to ack it."""
        self.server.push(self.sid, f"t{self.n} ", at)
        self.n += 1
        out = [d for d, _ in self.server.datagrams_to_send(at)]
        assert out
        for data in out:
            self.client.receive_datagram(data, SERVER, at + delay)
        ack = self.client.requests[self.sid].ack_source
        assert ack is not None
        return ack.wants_send()

    def ack_left(self, at: float) -> None:
        """What the client sends leaves (its ack datagram, if it wants one)."""
        self.client.datagrams_to_send(at)


def test_a_token_datagram_delayed_past_the_threshold_stops_the_ack_datagrams_for_a_while() -> None:
    chat = _Chat()
    t = chat.pair.now + 0.1
    assert chat.token(t, BASE_S)  # the first sets the connection's smallest delay: acked
    chat.ack_left(t + BASE_S)
    assert chat.client.ack_timing is not None and chat.client.ack_timing.hold == ACK_HOLD_S
    t += 0.033
    assert not chat.token(t, BASE_S + ACK_QUEUE_S + 0.002)  # a queue: no ack datagram
    assert chat.client.path_queues()
    assert chat.client.ack_timing.hold == ACK_QUEUE_QUIC_HOLD_S  # its QUIC ACK goes at once instead
    queued_at = t + BASE_S + ACK_QUEUE_S + 0.002
    t += 0.033
    assert not chat.token(t, BASE_S)  # the queue gone, but within the hold: still none
    # past the hold, the next token is acknowledged again (all the tokens held so far: the ack is cumulative)
    t = queued_at + ACK_QUEUE_HOLD_S + 0.01
    assert chat.token(t, BASE_S)
    assert not chat.client.path_queues() and chat.client.ack_timing.hold == ACK_HOLD_S


@pytest.mark.parametrize("jitter_s", [0.0, 0.006, ACK_QUEUE_S - 0.0005])
def test_delays_within_the_threshold_are_acknowledged_as_always(jitter_s: float) -> None:
    """The 1-Mbit/s trace's 1500-byte slots, 12 ms apart, delay one chat's datagrams by 0-12 ms: no queue."""
    chat = _Chat()
    t = chat.pair.now + 0.1
    for k in range(4):
        assert chat.token(t, BASE_S + (jitter_s if k % 2 else 0.0))
        chat.ack_left(t + BASE_S + jitter_s)
        t += 0.033
    assert not chat.client.path_queues()


def test_a_client_without_ack_datagrams_keeps_its_ack_timing() -> None:
    chat = _Chat()
    chat.client.send_acks = False
    t = chat.pair.now + 0.1
    chat.token(t, BASE_S)
    chat.token(t + 0.033, BASE_S + ACK_QUEUE_S + 0.01)
    assert chat.client.ack_timing is not None and chat.client.ack_timing.hold == ACK_HOLD_S


@pytest.mark.parametrize("counts", [[25, 1, 0, 0], [25, 0, 1, 0], [25, 0, 0, 1]])
def test_a_connection_whose_packets_arrive_ecn_capable_keeps_its_ack_datagrams(counts: list[int]) -> None:
    """A server that marks (ECT(1), ECT(0); CE: a marked packet on the way) takes its latency samples and ECN counts
    from the ack datagrams, most of all while a queue builds: they go on, and the QUIC ACK hold stays."""
    chat = _Chat()
    chat.client.ecn_counts = lambda: list(counts)
    t = chat.pair.now + 0.1
    assert chat.token(t, BASE_S)
    chat.ack_left(t + BASE_S)
    assert chat.token(t + 0.033, BASE_S + ACK_QUEUE_S + 0.01)
    assert chat.client.path_queues() and not chat.client.holds_acks()
    assert chat.client.ack_timing is not None and chat.client.ack_timing.hold == ACK_HOLD_S


def test_not_ect_counts_are_no_reason_to_keep_them() -> None:
    chat = _Chat()
    chat.client.ecn_counts = lambda: [40, 0, 0, 0]  # an ECN socket that read only Not-ECT packets
    t = chat.pair.now + 0.1
    assert chat.token(t, BASE_S)
    chat.ack_left(t + BASE_S)
    assert not chat.token(t + 0.033, BASE_S + ACK_QUEUE_S + 0.01)
    assert chat.client.holds_acks()


def test_a_base_delay_that_grew_is_no_queue_once_the_window_passed() -> None:
    """A route 50 ms longer from the server mid-answer: held back while the smallest delay is the old route's, for
    at most rtt_floor.RTT_FLOOR_WINDOW_S (with the connection's smallest ever, for the rest of it)."""
    chat = _Chat()
    t0 = t = chat.pair.now + 0.1
    assert chat.token(t, BASE_S)
    chat.ack_left(t + BASE_S)
    longer = BASE_S + 0.050
    wanted = []
    while t < t0 + RTT_FLOOR_WINDOW_S * (1 + 1 / SLOTS) + ACK_QUEUE_HOLD_S + 1.0:
        t += 0.25
        wanted.append(chat.token(t, longer))
        chat.ack_left(t + longer)
    assert not any(wanted[:4 * int(RTT_FLOOR_WINDOW_S) - 4])  # within the window: the old floor, a queue
    assert all(wanted[-4:]) and not chat.client.path_queues()


def test_the_duplicate_baseline_keeps_its_ack_datagrams() -> None:
    """The paper's duplication baseline stays as measured: its token datagrams neither count as queue samples nor
    lose their acks."""
    chat = _Chat("duplicate")
    t = chat.pair.now + 0.1
    assert chat.token(t, BASE_S)
    chat.ack_left(t + BASE_S)
    assert chat.token(t + 0.033, BASE_S + ACK_QUEUE_S + 0.01)
    assert not chat.client.path_queues()
    assert chat.client.ack_timing is not None and chat.client.ack_timing.hold == ACK_HOLD_S


def test_forty_chats_on_one_megabit_stay_out_of_the_collapse() -> None:
    """40 chats of 60 tokens at 30/s through one 1-Mbit/s link: with an ack datagram for every token packet they
    offered it ~137 bytes per token, its 200-packet queue stood at ~108 ms with tail drops, and the median stall was
    0.92; without them while it queues ~110 bytes, ~8 ms, 0.28, no drop."""
    cfg = SimConfig(chats=40, down_trace="1mbps", delay_ms=40, queue_packets=200, loss="iid:0.02",
                    loss_direction="down", tokens=60, rate=30, seed=0)
    run = run_chats("chatterbox", cfg)
    assert all(f.finished for f in run.flows)
    assert run.down["sojourn_ms_p50"] < 30.0 and run.down["dropped"] == 0
    sent = sum(f.run.wire_bytes for f in run.flows if f.run is not None)
    assert sent / (40 * 60) < 120
    assert statistics.median(f.run.stats.stall_ratio for f in run.flows if f.run is not None) < 0.5


def test_the_datagram_that_shows_the_queue_gets_its_quic_ack_at_once() -> None:
    """The QUIC ACK of the very datagram that showed the queue was armed with the usual hold before the datagram's
    frames were read; it is pulled in to ACK_QUEUE_QUIC_HOLD_S."""
    chat = _Chat()
    t = chat.pair.now + 0.1
    assert chat.token(t, BASE_S)
    chat.ack_left(t + BASE_S)
    arrived = t + 0.033 + BASE_S + ACK_QUEUE_S + 0.005
    assert not chat.token(t + 0.033, BASE_S + ACK_QUEUE_S + 0.005)
    assert chat.client.quic._spaces[Epoch.ONE_RTT].ack_at == pytest.approx(arrived + ACK_QUEUE_QUIC_HOLD_S)


def test_the_quic_ack_hold_comes_back_with_the_next_packet_after_the_queue() -> None:
    """Once the ack datagrams may go again, the next packet from the server (whatever it carries) finds the usual
    hold, not the queue's 1 ms: each 1-ms ACK is a packet of its own."""
    chat = _Chat()
    t = chat.pair.now + 0.1
    chat.token(t, BASE_S)
    chat.ack_left(t + BASE_S)
    chat.token(t + 0.033, BASE_S + ACK_QUEUE_S + 0.005)
    assert chat.client.ack_timing is not None and chat.client.ack_timing.hold == ACK_QUEUE_QUIC_HOLD_S
    # a packet with no token datagram in it (a PING, the server's ACK), as a driver feeds it (session.before_datagram)
    chat.client._now = t + 0.033 + ACK_QUEUE_HOLD_S + 5.0
    chat.client.before_datagram()
    assert not chat.client.path_queues() and chat.client.ack_timing.hold == ACK_HOLD_S


def _answer_through_a_growing_queue(pair: Any, server: ServerSession, sid: int, tokens: int) -> None:
    """``tokens`` tokens at 30/s; the path from the server queues from the fifth on, by 6 ms a token up to 200 ms."""
    t0 = pair.now + 0.1

    def down(now: float) -> float:
        k = (now - t0) / 0.033
        return BASE_S + (0.0 if k < 5 else min(0.200, 0.006 * (k - 4)))

    run_answer(pair, server, sid, tokens, start=t0, until=t0 + 5, down=down, up_s=BASE_S)


def test_the_senders_round_trip_follows_the_queue_while_the_acks_are_held() -> None:
    """The sender's round trip (its idle repair's timeout, the silence rule) came from the ack datagrams' echoes
    alone, and stood at its value from before the queue while they were held (0.048 s against aioquic's 0.289: more
    idle repairs into the queue). QUIC's acknowledgements of the token datagrams feed it then
    (chatterbox.ECHO_STALE_RTTS)."""
    pair, server, sid = accepted_chat()
    server.datagrams_to_send(pair.now)
    sender = server.requests[sid].sender
    assert sender is not None
    _answer_through_a_growing_queue(pair, server, sid, 90)
    assert server.quic._loss._rtt_smoothed > 0.2
    assert sender.srtt > 0.6 * server.quic._loss._rtt_smoothed
