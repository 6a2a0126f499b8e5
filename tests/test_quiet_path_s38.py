"""Chatterbox on a queueing path that loses nothing (chatterbox.QUIET_LOSS_S): new tokens leave at once and alone,
as in-order streaming sends them; the first declared loss brings the wait and the repeats back."""

from __future__ import annotations

from tests.quicpair import Pair, accepted_chat
from tokenwire.transport.chatterbox import COALESCE_MAX_S, NEEDS_ROOM, QUIET_LOSS_S, SentPacket, TokenSender
from tokenwire.transport.frames import Request, Tokens, decode_datagram
from tokenwire.transport.server_session import ServerSession
from tokenwire.transport.transcript import Transcript

CAP = 1162


def _sender(queue: float = 0.3) -> tuple[Transcript, TokenSender]:
    """A sender on a path that queues ``queue`` seconds (as the server's COALESCE_QUEUE_S rule reports it)."""
    tr = Transcript()
    tr.append(b"t0 ", 0.0)
    s = TokenSender(5, tr)
    s.queue_delay = lambda now: queue
    return tr, s


def _build(s: TokenSender, now: float, *, piggyback: bool = False) -> tuple[Tokens, SentPacket]:
    out = s.build(now, CAP, piggyback=piggyback)
    assert out is not None and out is not NEEDS_ROOM
    payload, pkt = out  # type: ignore[misc]
    frame = decode_datagram(payload)
    assert isinstance(frame, Tokens)
    return frame, pkt


def _indices(frame: Tokens) -> list[int]:
    return [i for first, toks in frame.runs() for i in range(first, first + len(toks))]


# ------------------------------------------------------------------------------------------------ the sender
def test_a_queueing_path_that_loses_nothing_sends_each_new_token_at_once_and_alone():
    tr, s = _sender()
    assert _indices(_build(s, 0.0)[0]) == [0]
    tr.append(b"t1 ", 0.03)
    assert s.wants_send()  # no wait for a shared packet ...
    frame, _pkt = _build(s, 0.03)
    assert _indices(frame) == [1]  # ... and token 0, unacknowledged, is not repeated
    assert s.stats.redundant_tokens == 0
    assert s.build(0.04, CAP, piggyback=True) is None  # nor does it ride a packet leaving anyway
    assert s.next_timer() != 0.03 + COALESCE_MAX_S  # (only the idle repair is due)


def test_a_declared_loss_brings_the_wait_and_the_repeats_back_for_quiet_loss_s():
    tr, s = _sender()
    _build(s, 0.0)
    tr.append(b"t1 ", 0.03)
    _frame, lost = _build(s, 0.03)
    s.on_delivery(lost, False, 0.5)  # QUIC declares the second packet lost
    tr.append(b"t2 ", 0.5)
    frame, _pkt = _build(s, 0.5)
    assert _indices(frame) == [0, 1, 2]  # the unacknowledged tokens ride with the new one again
    tr.append(b"t3 ", 0.52)
    assert not s.wants_send()  # and the next new token waits to share a packet
    assert s.next_timer() == 0.5 + COALESCE_MAX_S
    assert s.build(0.55, CAP, piggyback=True) is not None  # a packet leaving anyway takes the tokens along
    # QUIET_LOSS_S after that loss (nothing lost since): at once and alone again
    later = 0.5 + QUIET_LOSS_S + 0.01
    s.on_timer(later)
    tr.append(b"t4 ", later)
    frame, _pkt = _build(s, later)
    assert _indices(frame) == [4]
    tr.append(b"t5 ", later + 0.03)
    assert s.wants_send()


def test_a_lost_repair_counts_as_a_loss_too():
    tr, s = _sender()
    _build(s, 0.0)
    s.on_timer(s._idle_timeout() + 0.001)  # no acknowledgement: the idle repair is due
    frame, repair = _build(s, 1.0)
    assert repair.repair and _indices(frame) == [0]  # (a repair carries its repeats on a quiet path too)
    s.on_delivery(repair, False, 1.5)
    tr.append(b"t1 ", 1.6)
    frame, _pkt = _build(s, 1.6)
    assert _indices(frame) == [0, 1]


def test_without_a_queue_the_repeats_stay():
    tr, s = _sender(queue=0.0)  # loss-free too, but no queue: nothing changes
    _build(s, 0.0)
    tr.append(b"t1 ", 0.03)
    assert _indices(_build(s, 0.03)[0]) == [0, 1]


def test_a_token_lost_on_a_quiet_path_is_repaired_at_once_though_a_later_packet_is_in_flight():
    """The later packet left without repeats, so it does not carry the lost token (as it would have before): a repair
    is due at once, not after the idle timeout (1.5 smoothed round trips of a queueing path)."""
    tr, s = _sender()
    _frame, first = _build(s, 0.0)
    tr.append(b"t1 ", 0.03)
    tr.finish()
    _build(s, 0.03)  # token 1 alone, still in flight
    assert not s.wants_send()
    s.on_delivery(first, False, 0.2)
    assert s.wants_send()
    frame, pkt = _build(s, 0.2)
    assert pkt.repair and _indices(frame)[0] == 0


def test_a_token_whose_later_packet_carries_it_waits_for_that_packet():
    """With repeats (a path that lost recently), the later packet in flight carries the floor: no repair yet, as
    before."""
    tr, s = _sender()
    s.losses.at = 0.0
    _frame, first = _build(s, 0.0)
    s.on_timer(COALESCE_MAX_S)
    tr.append(b"t1 ", COALESCE_MAX_S)
    tr.finish()
    frame, _pkt = _build(s, COALESCE_MAX_S)
    assert _indices(frame) == [0, 1]
    s.on_delivery(first, False, 0.3)
    assert not s.wants_send()


# ------------------------------------------------------------------------------------------------ the session
def _chat() -> tuple[Pair, ServerSession, int]:
    pair, server, sid = accepted_chat()
    server.datagrams_to_send(pair.now)  # STARTED
    return pair, server, sid


def test_an_answer_on_a_connection_that_lost_a_datagram_lately_starts_with_the_wait():
    """The quiet is the path's, not one answer's: the next turn on the same connection, 1 s after the previous one's
    loss, shares packets and repeats from its first token."""
    pair, server, first = _chat()
    loss = server.quic._loss
    loss._rtt_initialized, loss._rtt_min, loss._rtt_smoothed = True, 0.080, 0.400
    sender = server.requests[first].sender
    assert sender is not None
    server.push(first, "a0 ", pair.now)
    server.datagrams_to_send(pair.now)
    lost = next(iter(sender._outstanding.values()))
    sender.on_delivery(lost, False, pair.now + 0.5)  # (what the datagram hook does on QUIC's verdict)
    sid = pair.client.start_request(Request(messages=[{"role": "user", "content": "y"}]), pair.now)
    pair.exchange(rounds=20)
    server.accept(sid)
    second = server.requests[sid].sender
    assert second is not None and second is not sender
    now = pair.now + 1.0
    second.srtt = 0.400
    server.push(sid, "b0 ", now)
    server.datagrams_to_send(now)
    server.push(sid, "b1 ", now + 0.03)
    assert second.next_new == 1 and not second.wants_send()  # b1 waits to share the next packet
