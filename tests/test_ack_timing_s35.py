"""QUIC ACKs of a chat connection ride the next packet with data (transport/ack_timing.py), and Chatterbox repeats
fewer tokens on a congested path (transport/chatterbox.py CONGESTED_REPEATS)."""

from __future__ import annotations

import pytest
from aioquic.tls import Epoch

from tests.quicpair import CLIENT, Pair
from tests.test_path_recovery import logged_wires
from tokenwire.testbed import sim
from tokenwire.transport.ack_timing import ACK_HOLD_S
from tokenwire.transport.chatterbox import CONGESTED_REPEATS, NEEDS_ROOM, TokenSender
from tokenwire.transport.frames import Tokens, decode_datagram
from tokenwire.transport.server_session import ServerSession
from tokenwire.transport.transcript import Transcript


def _space(session):
    return session.quic._spaces[Epoch.ONE_RTT]


def _established() -> Pair:
    pair = Pair()
    pair.exchange()
    assert pair.server is not None and pair.client.datagrams_ok
    # quiet: nothing pending on either side
    pair.now += 1.0
    for sess in (pair.client, pair.server):
        sess.handle_timer(pair.now)
    pair.exchange(rounds=10)
    return pair


def _client_ping(pair: Pair) -> list[bytes]:
    pair.client.quic.send_ping(1)
    return [d for d, _ in pair.client.datagrams_to_send(pair.now)]


def test_the_hold_stays_within_the_max_ack_delay_the_server_advertises():
    pair = _established()
    # the client's recovery reads the server's max_ack_delay (aioquic advertises 25 ms) into its probe timeout
    assert pair.client.quic._loss.max_ack_delay > ACK_HOLD_S


def _holding() -> tuple[Pair, ServerSession]:
    """A quiet connection whose server has just received a client's PING (an ACK to send)."""
    pair = _established()
    server = pair.server
    assert server is not None
    (ping,) = _client_ping(pair)
    server.receive_datagram(ping, CLIENT, pair.now)
    return pair, server


def test_an_ack_eliciting_packet_is_acknowledged_after_the_hold_not_after_one_millisecond():
    pair, server = _holding()
    assert _space(server).ack_at == pytest.approx(pair.now + ACK_HOLD_S)  # aioquic alone: now + 1 ms
    assert server.datagrams_to_send(pair.now + 0.002) == []  # nothing to ride with, nothing sent yet
    out = server.datagrams_to_send(pair.now + ACK_HOLD_S)
    assert len(out) == 1 and _space(server).ack_at is None  # the ACK left alone once due


def test_a_second_ack_eliciting_packet_or_a_gap_makes_the_ack_due_at_once():
    pair = _established()
    server = pair.server
    assert server is not None
    (first,) = _client_ping(pair)
    server.receive_datagram(first, CLIENT, pair.now)
    pair.now += 0.003
    (second,) = _client_ping(pair)
    server.receive_datagram(second, CLIENT, pair.now)
    assert _space(server).ack_at == pair.now  # RFC 9000 §13.2.2: at least every second ack-eliciting packet
    server.datagrams_to_send(pair.now)
    # a gap: the next packet the server sees skips one (lost on the way)
    pair.now += 0.003
    _client_ping(pair)  # lost
    (after_gap,) = _client_ping(pair)
    server.receive_datagram(after_gap, CLIENT, pair.now)
    assert _space(server).ack_at == pair.now  # §13.2.1: without delay, for the peer's loss detection


def test_a_packet_that_elicits_no_ack_neither_counts_nor_moves_the_held_ack():
    pair = _established()
    server, client = pair.server, pair.client
    assert server is not None
    # the server's ping and the client's cross; the client's ACK of the server's ping then waits for the hold and
    # leaves alone, after the client's ping
    server.quic.send_ping(7)
    (down,) = [d for d, _ in server.datagrams_to_send(pair.now)]
    (ping,) = _client_ping(pair)
    client.receive_datagram(down, ("10.0.0.1", 4433), pair.now)
    assert client.datagrams_to_send(pair.now) == []
    (ack_only,) = [d for d, _ in client.datagrams_to_send(pair.now + ACK_HOLD_S)]
    pair.now += ACK_HOLD_S + 0.001
    server.receive_datagram(ping, CLIENT, pair.now)
    held = _space(server).ack_at
    assert held == pytest.approx(pair.now + ACK_HOLD_S)
    # in order, not ack-eliciting: no second packet to count, the held ACK stays held
    server.receive_datagram(ack_only, CLIENT, pair.now + 0.001)
    assert _space(server).ack_at == held


def test_a_held_ack_rides_the_next_packet_that_carries_data():
    pair, server = _holding()
    assert _space(server).ack_at > pair.now
    server.quic.send_ping(9)  # something ack-eliciting to send: the ACK goes in the same packet
    out = server.datagrams_to_send(pair.now + 0.001)
    assert len(out) == 1 and _space(server).ack_at is None
    assert server.ack_timing is not None and server.ack_timing.ridden >= 1


def _wire_counts(scheme: str, monkeypatch) -> tuple[float, float]:
    wires = logged_wires(monkeypatch)
    run = sim.run_scheme(scheme, sim.SimConfig(tokens=300, loss="none", seed=3))
    assert run.digest_ok and run.stats.tokens_rendered == 300
    down, up = wires
    return len(down.log) / 300, len(up.log) / 300


def test_a_chatterbox_answer_sends_about_one_packet_per_token_each_way(monkeypatch):
    """Before, the server's ACK of each client ack datagram left 1 ms later in a packet of its own (which Chatterbox
    filled with repeats), and the client's ACK of each token packet likewise: 2.01 packets per token down and 2.93
    up (sim, 400 tokens at 30/s, 50 ms each way, no loss, seeds 1-5); now 1.44 and 1.10."""
    down, up = _wire_counts("chatterbox", monkeypatch)
    assert down < 1.6 and up < 1.3


def _sender(n: int, congested: bool | None) -> tuple[Transcript, TokenSender]:
    tr = Transcript()
    for i in range(n):
        tr.append(f"t{i} ".encode(), i * 0.03)
    s = TokenSender(5, tr)
    if congested is not None:
        s.congested = lambda now: congested
    return tr, s


def _repeats(sender: TokenSender, now: float, *, piggyback: bool = False) -> int:
    before = sender.next_new  # tokens below were sent before: carried again, they are repeats
    out = sender.build(now, 1162, piggyback=piggyback)
    assert out is not None and out is not NEEDS_ROOM
    frame = decode_datagram(out[0])
    assert isinstance(frame, Tokens)
    return sum(1 for first, toks in frame.runs() for i in range(first, first + len(toks)) if i < before)


@pytest.mark.parametrize("congested", [None, False, True])
def test_a_congested_path_caps_the_repeats_that_ride_with_new_tokens(congested):
    tr, s = _sender(20, congested)
    s.build(0.0, 1162)  # 20 tokens out, none acknowledged
    tr.append(b"new ", 0.05)
    repeats = _repeats(s, 0.05)
    if congested:
        assert repeats == CONGESTED_REPEATS and s.stats.repeats_capped == 1
    else:
        assert repeats == 20 and s.stats.repeats_capped == 0
    # a piggyback (a packet leaving anyway) is capped the same, and takes no newest tokens from the tail either
    assert _repeats(s, 0.06, piggyback=True) == (CONGESTED_REPEATS if congested else 21)


def test_a_repair_is_not_capped_on_a_congested_path():
    """A packet with no new token leaves only for a loss or an idle tail: it carries what it can."""
    _tr, s = _sender(20, True)
    s.build(0.0, 1162)
    s.on_timer(10.0)  # the idle repair timer: nothing new, tokens unacknowledged
    assert s.wants_send()
    out = s.build(10.0, 1162)
    assert out is not None and out is not NEEDS_ROOM
    assert sum(e - f for f, e in out[1].runs) == 20 and s.stats.repeats_capped == 0


def test_the_server_calls_a_queueing_or_ce_marking_path_congested():
    pair = _established()
    server = pair.server
    assert server is not None
    loss = server.quic._loss
    loss._rtt_initialized, loss._rtt_min, loss._rtt_smoothed = True, 0.080, 0.100
    assert not server._path_congested(pair.now)  # 20 ms of queue on an 80-ms path: below max(40, 40) ms
    loss._rtt_smoothed = 0.125
    assert server._path_congested(pair.now)
    loss._rtt_smoothed = 0.100
    server._ce_at = pair.now - 0.05  # a CE mark within the last round trip
    assert server._path_congested(pair.now)
    assert not server._path_congested(pair.now + 0.2)
