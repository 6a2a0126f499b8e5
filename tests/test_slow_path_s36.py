"""Chatterbox on a slow path that queues: new tokens wait at the sender to share a packet (chatterbox.COALESCE_MAX_S,
server_session.ServerSession._queue_delay) instead of queueing one packet, one ack datagram and one QUIC ACK per
token behind a link that cannot carry them. Only after a token datagram was declared lost (chatterbox.QUIET_LOSS_S:
tests/test_quiet_path_s38.py), so these tests declare one."""

from __future__ import annotations

import pytest

from tests.quicpair import accepted_chat, set_rtt
from tokenwire.transport.chatterbox import COALESCE_MAX_S, COALESCE_QUEUE_S, NEEDS_ROOM, QUEUE_DELAY_S, TokenSender
from tokenwire.transport.frames import Tokens, decode_datagram
from tokenwire.transport.server_session import ServerSession
from tokenwire.transport.transcript import Transcript


def _sender(queue: list[float]) -> tuple[Transcript, TokenSender]:
    """A sender told the path's queueing delay by ``queue[0]`` (a list, so a test can change it)."""
    tr = Transcript()
    tr.append(b"t0 ", 0.0)
    s = TokenSender(5, tr)
    s.queue_delay = lambda now: queue[0]
    s.losses.at = 0.0  # a datagram was just lost: the wait applies (chatterbox.QUIET_LOSS_S)
    return tr, s


def _new_tokens(sender: TokenSender, now: float, *, piggyback: bool = False) -> list[int]:
    """Build the next packet; the indices of the tokens it carries for the first time."""
    before = sender.next_new
    out = sender.build(now, 1162, piggyback=piggyback)
    assert out is not None and out is not NEEDS_ROOM
    frame = decode_datagram(out[0])
    assert isinstance(frame, Tokens)
    return [i for first, toks in frame.runs() for i in range(first, first + len(toks)) if i >= before]


def test_on_a_queueing_path_new_tokens_wait_to_share_the_next_packet():
    queue = [0.0]
    tr, s = _sender(queue)
    assert _new_tokens(s, 0.0) == [0]
    tr.append(b"t1 ", 0.03)
    assert s.wants_send()  # no queue: every token leaves at once, as before
    queue[0] = 0.06
    assert _new_tokens(s, 0.03) == [1]  # the first one after the queue grew leaves at once ...
    tr.append(b"t2 ", 0.06)
    tr.append(b"t3 ", 0.08)
    assert not s.wants_send()  # ... and the next wait for the queue's delay
    assert s.next_timer() == pytest.approx(0.03 + 0.06)
    s.on_timer(0.07)
    assert not s.wants_send()
    s.on_timer(0.09)
    assert s.wants_send()
    assert _new_tokens(s, 0.09) == [2, 3]  # one packet for both


def test_the_wait_is_bounded_and_the_last_tokens_still_leave():
    tr, s = _sender([5.0])  # seconds of queue: the wait stays at COALESCE_MAX_S
    _new_tokens(s, 0.0)
    tr.append(b"t1 ", 0.01)
    tr.finish()
    assert not s.wants_send()
    assert s.next_timer() == pytest.approx(COALESCE_MAX_S)
    s.on_timer(COALESCE_MAX_S)
    assert _new_tokens(s, COALESCE_MAX_S) == [1]
    assert s.next_timer() is not None  # (the idle repair of the unacknowledged tail, not a wait: nothing is new)
    assert not s.wants_send()


def test_a_packet_leaving_anyway_takes_the_waiting_tokens_along():
    tr, s = _sender([0.06])
    _new_tokens(s, 0.0)
    tr.append(b"t1 ", 0.02)
    assert not s.wants_send()
    assert _new_tokens(s, 0.03, piggyback=True) == [1]  # an ACK's packet: the tokens ride it, no packet of their own
    assert s.next_timer() != pytest.approx(0.06)  # the wait starts again from that packet


# ------------------------------------------------------------------------------------------------ the real session
def _path(server: ServerSession, srtt: float, floor: float) -> None:
    set_rtt(server, srtt=srtt, floor=floor)


def test_the_server_tells_the_queue_only_well_past_the_round_trip_rule():
    _pair, server, sid = accepted_chat()
    sender = server.requests[sid].sender
    assert sender is not None and sender.queue_delay is not None
    _path(server, 0.080 + QUEUE_DELAY_S + 0.01, 0.080)  # past the congestion cap's threshold: repeats are capped ...
    assert server._path_congested(0.0) and sender.queue_delay(0.0) == 0.0  # ... but no token waits
    _path(server, 0.080 + COALESCE_QUEUE_S, 0.080)
    assert sender.queue_delay(0.0) == 0.0
    _path(server, 0.400, 0.080)
    assert sender.queue_delay(0.0) == pytest.approx(0.320)
    _pair, server, sid = accepted_chat("duplicate")
    sender = server.requests[sid].sender
    assert sender is not None and sender.queue_delay is None  # the duplicate baseline sends as the paper's did


def test_a_queued_path_sends_fewer_token_packets_for_the_same_tokens():
    """Server side of a real connection, tokens every 33 ms: 6 tokens leave in 3 packets, not 6."""
    pair, server, sid = accepted_chat()
    sender = server.requests[sid].sender
    assert sender is not None
    server.datagrams_to_send(pair.now)  # STARTED
    _path(server, 0.400, 0.080)  # 320 ms of queue
    sender.srtt = 0.400  # (as the client's acks would have told it: no idle repair is due within the test)
    now = pair.now
    sender.losses.at = now  # a datagram was just lost: the wait applies (chatterbox.QUIET_LOSS_S)
    for i in range(6):
        now += 0.033
        server.push(sid, f"w{i} ", now)
        t = server._session_timer()  # (the session's own timers: aioquic's are not under test)
        if t is not None and t <= now:
            server._on_session_timer(now)
        server.datagrams_to_send(now)
    # the first token left alone and the next four, 100 ms later, in one packet; the last one waits
    assert sender.next_new == 5 and sender.stats.packets == 2
    t = server._session_timer()
    assert t is not None and t <= now + COALESCE_MAX_S
    server._on_session_timer(t)
    server.datagrams_to_send(t)
    assert sender.next_new == 6 and sender.stats.packets == 3
