"""Pins the aioquic 1.7.2 internals the datagram hook relies on (private API: any upgrade must pass these)."""

import aioquic
import pytest
from aioquic.quic import events as qe

from tokenwire.transport.chatterbox import NEEDS_ROOM
from tokenwire.transport.frames import MIN_TOKENS_DATAGRAM, Request, Tokens, decode_datagram, encode_frame
from tokenwire.transport.session_events import RequestFinished, RequestReceived

from .quicpair import Pair


def test_aioquic_version_is_the_pinned_one():
    assert aioquic.__version__ == "1.7.2"


class Recorder:
    """A DatagramSource that emits numbered datagrams of about ``size`` bytes and records verdicts."""

    copies = 1

    def __init__(self, n, size=100):
        self.n, self.size, self.sent, self.verdicts = n, size, 0, {}
        self.windows = []

    def wants_send(self):
        return self.sent < self.n

    def build(self, now, capacity, piggyback=False, window=None):
        self.windows.append(window)  # the connection's (congestion window, bytes in flight)
        if not self.wants_send():
            return None
        if capacity < self.size:
            return NEEDS_ROOM
        self.sent += 1
        # a valid token frame for a handle the client does not know (the client session ignores it)
        payload = encode_frame(Tokens(handle=999, first=self.sent, tokens=[b"x" * (self.size - 20)]))
        assert len(payload) <= self.size
        return payload, self.sent

    def on_delivery(self, cookie, acked, now):
        assert cookie not in self.verdicts, "a datagram was resolved twice"
        self.verdicts[cookie] = acked


def handshake(pair):
    pair.exchange(rounds=40)
    assert pair.client.datagrams_ok and pair.server.datagrams_ok


def test_every_lazy_datagram_gets_exactly_one_verdict_and_losses_are_reported():
    pair = Pair()
    handshake(pair)
    src = Recorder(300)
    dropped = set()

    def drop(data):
        # drop every 7th UDP datagram the server sends
        drop.count += 1
        if drop.count % 7 == 0:
            dropped.add(drop.count)
            return True
        return False

    drop.count = 0
    pair.server.scheduler.schedule(src)
    pair.exchange(rounds=2000, drop_down=drop)
    assert src.sent == 300
    assert len(src.verdicts) == 300, "every datagram must be resolved"
    # aioquic's recovery state reaches the source (Chatterbox sizes its repeats by it during ack silence)
    assert all(w is not None and w[0] >= 2 * 1200 and w[1] >= 0 for w in src.windows)
    assert max(w[1] for w in src.windows) > 0
    lost = [k for k, ok in src.verdicts.items() if not ok]
    assert dropped and lost, "drops must be reported as LOST"
    received = [e for e in pair.client_events if isinstance(e, qe.DatagramFrameReceived)]
    assert received == []  # the session consumes datagram events itself, none leak


def test_oversized_raw_datagram_never_blocks_later_ones():
    pair = Pair()
    handshake(pair)
    q = pair.server.quic
    q.send_datagram_frame(b"x" * 5000)  # could never fit a packet
    src = Recorder(3, size=40)
    pair.server.scheduler.schedule(src)
    pair.exchange(rounds=100)
    assert len(src.verdicts) == 3 and all(src.verdicts.values())


def test_duplicate_copies_travel_in_different_packets():
    pair = Pair()
    handshake(pair)
    sid = pair.client.start_request(Request(messages=[{"role": "user", "content": "x"}], scheme="duplicate"), 0)
    pair.exchange(rounds=20)
    assert any(isinstance(e, RequestReceived) for e in pair.server_events)
    pair.server.accept(sid)
    pair.down_batches.clear()
    for i in range(20):
        pair.server.push(sid, f" w{i}", pair.now)
        pair.exchange(rounds=3)
    pair.server.finish(sid)
    pair.exchange(rounds=200)
    assert any(isinstance(e, RequestFinished) for e in pair.client_events)
    # payloads are encrypted on the wire; count token datagrams per UDP datagram via the sender's stats:
    sender_stats = pair.server.requests.get(sid)
    assert sender_stats is None  # request completed and dropped
    finished = next(e for e in pair.client_events if isinstance(e, RequestFinished))
    assert finished.result.scheme == "duplicate" and finished.result.digest_ok
    # every token packet arrived twice (no loss): the receiver saw as many repeats as first copies
    assert finished.result.duplicate_tokens >= 20


def test_lazy_payload_never_exceeds_the_room_left_in_the_packet():
    pair = Pair()
    handshake(pair)
    sid = pair.client.start_request(Request(messages=[{"role": "user", "content": "x"}]), 0)
    pair.exchange(rounds=20)
    tr = pair.server.accept(sid)
    for i in range(2000):
        tr.append(f"tok{i:05d} ".encode(), pair.now)  # a burst far larger than a packet
    pair.server.notify(sid)
    sizes = []
    orig = pair.server.scheduler._emit

    def spy(builder, frame_type, payload, handler, args):
        sizes.append((len(payload), builder.remaining_flight_space))
        decoded = decode_datagram(payload)
        assert isinstance(decoded, Tokens)
        return orig(builder, frame_type, payload, handler, args)

    pair.server.scheduler._emit = spy
    pair.server.finish(sid)
    pair.exchange(rounds=400)
    assert sizes and all(size + 3 <= room for size, room in sizes)
    assert max(s for s, _ in sizes) > 900  # bursts fill packets
    fin = next(e for e in pair.client_events if isinstance(e, RequestFinished))
    assert fin.result.total == 2000 and fin.result.digest_ok


@pytest.mark.parametrize(("limit", "scheme"), [(None, "stream"), (24, "stream"), (MIN_TOKENS_DATAGRAM + 2, "stream"),
                                             (MIN_TOKENS_DATAGRAM + 3, "chatterbox")])
def test_peer_without_room_for_a_token_datagram_gets_the_stream_scheme(limit, scheme):
    """A client allowing 16-byte datagrams got chatterbox, no datagram could carry a token, and the whole answer
    came by REPAIR after FINISHED."""
    pair = Pair(client_datagrams=limit is not None, datagram_limit=limit)
    pair.exchange(rounds=40)
    assert pair.server.datagrams_ok is (scheme == "chatterbox")
    sid = pair.client.start_request(Request(messages=[{"role": "user", "content": "x"}]), 0)
    pair.exchange(rounds=20)
    pair.server.accept(sid)
    pair.server.push(sid, "hello", pair.now)
    pair.server.finish(sid)
    pair.exchange(rounds=100)
    fin = next(e for e in pair.client_events if isinstance(e, RequestFinished))
    assert fin.result.scheme == scheme and fin.result.digest_ok
    assert b"".join(fin.result.tokens) == b"hello"
