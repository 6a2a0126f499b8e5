"""A KV fetch the server refuses or ends early ends alone: the connection and its other fetches go on.

The client keeps sending on such a fetch stream until it sees the server's ERROR (the rest of a KV_FETCH of
many token ids, a KV_ACK that crossed the ERROR); none of it may read as a new fetch or a protocol violation.
And either side must survive the other's STOP_SENDING on a fetch stream it still writes on.

Sans-I/O: real aioquic connections and the real KV sessions, on a hand-driven in-memory wire.
"""

from __future__ import annotations

import pytest
from aioquic.buffer import Buffer
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import pull_quic_header

from tokenwire.transport.errors import ErrorCode
from tokenwire.transport.frames import KvFetch
from tokenwire.transport.kv_channel import (
    ContextPlan,
    KVChunkNeeded,
    KVChunkReceived,
    KVClientSession,
    KVDoneReceived,
    KVFetchClosed,
    KVFetchFailed,
    KVFetchRefused,
    KVFetchRequested,
    KVNotFound,
    KVServerSession,
    ServerTuning,
    kv_quic_config,
)
from tokenwire.transport.kv_controller import LEVELS
from tokenwire.transport.session_events import ConnectionEnded
from tokenwire.transport.tls import client_configuration, dev_cert, server_configuration

CLIENT = ("10.0.0.2", 1234)
SERVER = ("10.0.0.1", 4434)
CHUNK_BYTES = 3000


def _ewma(kind: str):
    from tokenwire.predictor.bandwidth import make_forecaster

    return make_forecaster("ewma")


def new_kv_client() -> KVClientSession:
    """A KV client session of the in-memory pairs (the dev certificate), not yet connected."""
    cfg = kv_quic_config(client_configuration(cadata=dev_cert().cert_pem, server_name="localhost"))
    return KVClientSession(QuicConnection(configuration=cfg))


def new_kv_server(first_datagram: bytes, tuning: ServerTuning) -> KVServerSession:
    """The server session the client's first datagram opens (its destination connection id), with ewma
    forecasters."""
    header = pull_quic_header(Buffer(data=first_datagram), host_cid_length=8)
    quic = QuicConnection(configuration=kv_quic_config(server_configuration()),
                          original_destination_connection_id=header.destination_cid)
    return KVServerSession(quic, tuning=tuning, forecaster_factory=_ewma)


def _plan(chunks: int) -> ContextPlan:
    return ContextPlan(16, [16] * chunks, [1000] * chunks, [dict.fromkeys(LEVELS, CHUNK_BYTES)] * chunks,
                       (1, 1, 1), 0, "float16")


class KVPair:
    """A KV client and server session; ``exchange`` moves datagrams until both sides are quiet.

    With ``serve`` on, the pair answers the server's events the way the asyncio shell does: a fetch is
    started with a plan of ``chunks`` chunks and every chunk asked for is sent at once; the client acks each
    chunk it receives. Tests that need a fetch held at some point turn it off and drive the sessions by hand.
    """

    def __init__(self, *, max_fetches: int = 16, chunks: int = 2) -> None:
        self.client = new_kv_client()
        self.server: KVServerSession | None = None
        self.max_fetches = max_fetches
        self.chunks = chunks
        self.serve = True
        self.now = 0.0
        self.client_events: list = []
        self.server_events: list = []
        self.client.quic.connect(SERVER, now=self.now)
        self.exchange(rounds=40)  # handshake
        assert self.server is not None

    def _server_for(self, data: bytes) -> KVServerSession:
        if self.server is None:
            self.server = new_kv_server(data, ServerTuning(forecaster="ewma"))
            # lowered after the client was told the default (QUIC's stream limit): the refusal is the backstop's
            self.server.max_fetches = self.max_fetches
        return self.server

    def _on_server(self, events: list) -> None:
        self.server_events += events
        if not self.serve:
            return
        assert self.server is not None
        for ev in events:
            if isinstance(ev, KVFetchRequested):
                self.server.start(ev.stream_id, _plan(self.chunks), self.now)
                self._on_server(self.server.poll(self.now))
            elif isinstance(ev, KVChunkNeeded):
                self.server.send_chunk(ev.stream_id, ev.index, ev.level, b"k" * CHUNK_BYTES, self.now)

    def _on_client(self, events: list) -> None:
        self.client_events += events
        if not self.serve:
            return
        for ev in events:
            if isinstance(ev, KVChunkReceived):
                self.client.ack(ev.stream_id, ev.header, ev.first_at, ev.done_at)

    def exchange(self, rounds: int = 50, dt: float = 0.005) -> None:
        for _ in range(rounds):
            self.now += dt
            moved = False
            # timers first: the sessions' own (the server's chunk poll) are due POLL_S after their last event
            for sess, sink in ((self.client, self._on_client), (self.server, self._on_server)):
                t = sess.get_timer() if sess is not None else None
                if t is not None and t <= self.now:
                    sink(sess.handle_timer(self.now))
                    moved = True
            for data, _ in self.client.datagrams_to_send(self.now):
                moved = True
                srv = self._server_for(data)
                self._on_server(srv.receive_datagram(data, CLIENT, self.now))
            if self.server is not None:
                for data, _ in self.server.datagrams_to_send(self.now):
                    moved = True
                    self._on_client(self.client.receive_datagram(data, SERVER, self.now))
            if not moved:
                timers = [t for t in (self.client.get_timer(), self.server and self.server.get_timer()) if t]
                if not timers or min(timers) > self.now + 5.0:
                    return  # quiet: only the idle timeout is left
                self.now = max(self.now, min(timers) - dt)

    def fetch(self, n_ids: int = 32) -> int:
        return self.client.fetch(KvFetch(model="m", deadline_ms=5000, token_ids=list(range(n_ids))))

    def outcome(self, sid: int):
        """KVDoneReceived once the fetch completed (every chunk in), the KVFetchFailed if it failed, else None."""
        for e in self.client_events:
            if isinstance(e, KVFetchFailed) and e.stream_id == sid:
                return e
        got = {e.header.index for e in self.client_events if isinstance(e, KVChunkReceived) and e.stream_id == sid}
        for e in self.client_events:
            if isinstance(e, KVDoneReceived) and e.stream_id == sid and len(got) == e.done.chunks:
                return e
        return None

    def requested(self) -> list[int]:
        return [e.stream_id for e in self.server_events if isinstance(e, KVFetchRequested)]

    def assert_connection_up(self) -> None:
        assert not any(isinstance(e, ConnectionEnded) for e in self.client_events + self.server_events)
        self.serve = True
        sid = self.fetch()
        self.exchange(rounds=200)
        assert isinstance(self.outcome(sid), KVDoneReceived)
        self.client.finish(sid)
        self.exchange(rounds=100)


def test_a_long_fetch_over_the_concurrency_limit_is_refused_alone():
    pair = KVPair(max_fetches=1)
    running = pair.fetch()
    pair.exchange(rounds=100)
    assert isinstance(pair.outcome(running), KVDoneReceived)  # done, but open until the client's FIN
    # a KV_FETCH of ~60 packets: the refusal goes out after its first, and the rest keeps arriving
    refused = pair.fetch(n_ids=15_000)
    pair.exchange(rounds=300)

    failed = pair.outcome(refused)
    assert isinstance(failed, KVFetchFailed) and failed.error.code == ErrorCode.LIMIT_EXCEEDED
    assert [(e.stream_id, e.code) for e in pair.server_events if isinstance(e, KVFetchRefused)] == [
        (refused, ErrorCode.LIMIT_EXCEEDED)]
    assert pair.requested() == [running]  # the tail of the refused fetch never became a fetch
    assert not pair.server._ended and not pair.client._sending - {running}  # the stream is closed both ways
    pair.client.finish(running)
    pair.exchange(rounds=100)
    closed = [e for e in pair.server_events if isinstance(e, KVFetchClosed)]
    assert [(e.stream_id, e.complete) for e in closed] == [(running, True)]
    pair.assert_connection_up()


@pytest.mark.parametrize("while_full", [1, 0], ids=["some-while-full", "all-after"])
def test_the_tail_of_a_refused_fetch_is_dropped_when_a_slot_frees_meanwhile(while_full):
    """The rest of a refused KV_FETCH arrives after another fetch ended. It was parsed as a new fetch (a length
    prefix from the middle of a token list: FRAME_TOO_LARGE, the whole connection closed); while the limit
    still held, it raised RuntimeError (an ERROR written after the stream's FIN) out of the event handler."""
    pair = KVPair(max_fetches=1)
    pair.serve = False
    running = pair.fetch()
    pair.exchange(rounds=40)
    assert pair.requested() == [running]
    pair.server.start(running, _plan(1), pair.now)
    refused = pair.fetch(n_ids=15_000)
    flight: list[bytes] = []
    for _ in range(20):  # what the client sends before it hears anything back (paced, then cwnd-limited)
        pair.now += 0.001
        flight += [data for data, _ in pair.client.datagrams_to_send(pair.now)]
    assert len(flight) >= 3  # part of the fetch only: ~75 kB

    def deliver(datagrams: list[bytes]) -> list:
        events = []
        for data in datagrams:
            events += pair.server.receive_datagram(data, CLIENT, pair.now)
        pair.server_events += events
        return events

    first = deliver(flight[:1])
    later = deliver(flight[1 : 1 + while_full])  # more of it, while the limit still holds
    pair.server.reject(running, ErrorCode.NOT_FOUND, "gone")  # a slot frees
    later += deliver(flight[1 + while_full :])
    pair.exchange(rounds=300)

    for sid, code in ((running, ErrorCode.NOT_FOUND), (refused, ErrorCode.LIMIT_EXCEEDED)):
        failed = pair.outcome(sid)
        assert isinstance(failed, KVFetchFailed) and failed.error.code == code
    assert later == [] and pair.requested() == [running]
    assert first == [KVFetchRefused(refused, ErrorCode.LIMIT_EXCEEDED,
                                    "too many concurrent fetches (at most 1 on a connection)")]
    assert not pair.server._ended and not pair.client._sending  # both streams closed both ways
    pair.assert_connection_up()


def test_a_kv_ack_crossing_the_servers_error_is_dropped():
    """The server rejects a fetch mid-way (a chunk evicted: NOT_FOUND) while the client's KV_ACK for the chunk
    it already has is on its way; that KV_ACK was read as a new fetch's first frame and closed the connection."""
    pair = KVPair()
    pair.serve = False
    sid, other = pair.fetch(), pair.fetch()
    pair.exchange(rounds=40)
    assert pair.requested() == [sid, other]  # the other one waits (for its store, say)
    pair.server.start(sid, _plan(2), pair.now)
    pair.server.send_chunk(sid, 0, "low", b"k" * CHUNK_BYTES, pair.now)
    pair.exchange(rounds=40)
    got = [e for e in pair.client_events if isinstance(e, KVChunkReceived) and e.stream_id == sid]
    assert len(got) == 1
    # both ends act before either hears the other
    pair.server.reject(sid, ErrorCode.NOT_FOUND, "chunk 1 is no longer stored (evicted or corrupt)")
    pair.client.ack(sid, got[0].header, got[0].first_at, got[0].done_at)
    pair.exchange(rounds=100)

    failed = pair.outcome(sid)
    assert isinstance(failed, KVFetchFailed) and isinstance(failed.error, KVNotFound)
    assert not pair.server._ended and sid not in pair.client._sending  # the stream is closed both ways
    pair.serve = True  # the other fetch carries on
    pair.server.start(other, _plan(2), pair.now)
    pair.exchange(rounds=200)
    assert isinstance(pair.outcome(other), KVDoneReceived)
    pair.assert_connection_up()


def test_the_client_survives_stop_sending_on_a_fetch_it_is_still_sending():
    """STOP_SENDING resets the client's side of the fetch stream (aioquic): a KV_ACK or FIN written on it
    after that raised RuntimeError ("Cannot send data after the stream was reset") out of the event handler."""
    pair = KVPair()
    pair.serve = False
    sid = pair.fetch()
    pair.exchange(rounds=40)
    pair.server.start(sid, _plan(2), pair.now)
    pair.server.send_chunk(sid, 0, "low", b"k" * CHUNK_BYTES, pair.now)
    pair.server.quic.stop_stream(sid, ErrorCode.CANCELLED)  # e.g. with its ERROR's packet lost
    pair.exchange(rounds=40)
    got = [e for e in pair.client_events if isinstance(e, KVChunkReceived) and e.stream_id == sid]
    assert len(got) == 1
    pair.client.ack(sid, got[0].header, got[0].first_at, got[0].done_at)  # what the SDK does for each chunk
    pair.client.finish(sid)
    pair.exchange(rounds=100)
    assert sid not in pair.client._sending
    pair.assert_connection_up()


def _two_running_fetches() -> tuple[KVPair, int, int]:
    """Two fetches the server has started, their chunks not yet served (``_serve_on`` serves them)."""
    pair = KVPair()
    stopped, other = pair.fetch(), pair.fetch()
    pair.serve = False
    pair.exchange(rounds=40)
    for s in (stopped, other):
        pair.server.start(s, _plan(2), pair.now)
    return pair, stopped, other


def _serve_on(pair: KVPair) -> None:
    pair.serve = True
    pair._on_server(pair.server.poll(pair.now))
    pair.exchange(rounds=200)


def test_a_fetch_the_client_stops_ends_alone_on_the_server():
    """A client's STOP_SENDING on its fetch stream: the server's KV_DONE (or KV_META, ERROR) on it raised
    RuntimeError out of the server's timer; now that fetch is closed as abandoned and the others go on."""
    pair, stopped, other = _two_running_fetches()
    pair.client.quic.stop_stream(stopped, ErrorCode.CANCELLED)
    _serve_on(pair)

    closed = [(e.stream_id, e.complete) for e in pair.server_events if isinstance(e, KVFetchClosed)]
    assert closed == [(stopped, False)]
    assert isinstance(pair.outcome(other), KVDoneReceived)
    pair.client.finish(stopped)
    pair.client.finish(other)
    pair.exchange(rounds=100)
    assert not pair.server._ended and not pair.server.fetches
    pair.assert_connection_up()


def test_stop_sending_with_a_last_kv_ack_and_fin_in_one_packet_ends_that_fetch_alone():
    """aioquic marks the receive side finished when it parses the FIN, before the data event with it reaches
    the session: the trailing KV_ACK was read as a new fetch ("first frame must be KV_FETCH") and closed the
    connection."""
    from tokenwire.transport.frames import KvAck

    pair, stopped, other = _two_running_fetches()
    pair.client.quic.stop_stream(stopped, ErrorCode.CANCELLED)
    pair.client._send(stopped, KvAck(0, 10, 1, 2))
    pair.client.quic.send_stream_data(stopped, b"", end_stream=True)
    _serve_on(pair)
    assert isinstance(pair.outcome(other), KVDoneReceived)
    pair.assert_connection_up()


def test_a_stop_sending_that_overtakes_its_kv_fetch_drops_the_fetch():
    """The KV_FETCH lost and retransmitted after the client's STOP_SENDING: the server started a fetch on a
    stream whose sending side aioquic had reset, and its KV_META raised."""
    from tokenwire.transport.frames import encode_stream_frame

    pair = KVPair()
    pair.exchange(rounds=40)
    sid = pair.client.quic.get_next_available_stream_id()
    pair.client.quic.send_stream_data(sid, b"")
    pair.client.quic.stop_stream(sid, ErrorCode.CANCELLED)
    pair.exchange(rounds=40)
    fetch = KvFetch(model="m", deadline_ms=5000, token_ids=list(range(8)))
    pair.client.quic.send_stream_data(sid, encode_stream_frame(fetch), end_stream=True)
    pair.exchange(rounds=40)
    assert not [e for e in pair.server_events if isinstance(e, KVFetchRequested) and e.stream_id == sid]
    pair.assert_connection_up()


def test_a_fetch_the_client_resets_frees_its_stream_on_the_server():
    """The KV server dropped a reset fetch but left its own side of the stream open: the stream was never
    discarded and its credit never came back (the token server's reset fix, not carried over)."""
    pair = KVPair()
    pair.serve = False
    sids = [pair.fetch() for _ in range(3)]
    pair.exchange(rounds=40)
    assert sorted(pair.requested()) == sids
    for sid in sids:
        pair.client.quic.reset_stream(sid, 0x10D)
    pair.exchange(rounds=60)
    assert not [sid for sid in sids if sid in pair.server.quic._streams]
    pair.assert_connection_up()


def test_a_fetch_of_another_protocol_version_is_refused_alone():
    """As on the token channel: another version's KV_FETCH closed the whole connection."""
    pair = KVPair()
    running = pair.fetch()
    other = pair.client.fetch(KvFetch(model="m", deadline_ms=5000, token_ids=[1, 2], version=3))
    pair.exchange(rounds=200)
    failed = pair.outcome(other)
    assert isinstance(failed, KVFetchFailed) and failed.error.code == ErrorCode.UNSUPPORTED_VERSION
    assert pair.requested() == [running] and isinstance(pair.outcome(running), KVDoneReceived)
    pair.client.finish(running)
    pair.exchange(rounds=100)
    pair.assert_connection_up()


def test_a_clients_error_frame_ends_no_fetch_and_no_connection():
    """The token channel ignores a client's ERROR (its FIN or reset follows); the KV channel closed the
    connection on it, ending every other fetch."""
    from tokenwire.transport.frames import Error

    pair = KVPair()
    sid = pair.fetch()
    pair.exchange(rounds=200)
    pair.client._send(sid, Error(int(ErrorCode.INTERNAL), "the engine went away"))
    pair.client.finish(sid)
    pair.exchange(rounds=100)
    closed = [e for e in pair.server_events if isinstance(e, KVFetchClosed)]
    assert [(e.stream_id, e.complete) for e in closed] == [(sid, True)]
    pair.assert_connection_up()


def test_the_kv_endpoint_offers_no_datagrams():
    """It advertised DATAGRAM support (max_datagram_frame_size) and then closed the connection on any datagram."""
    pair = KVPair()
    assert pair.server.quic._remote_max_datagram_frame_size is None
    assert pair.client.quic._remote_max_datagram_frame_size is None


def test_a_fetch_stream_that_ends_inside_a_frame_is_a_broken_client():
    """The token server closes on a request stream that ends inside a frame; the KV server dropped a partial
    KV_ACK followed by FIN without a word."""
    pair = KVPair()
    sid = pair.fetch()
    pair.exchange(rounds=200)
    pair.client.quic.send_stream_data(sid, b"\x00\x00\x00\x09\x85", end_stream=True)  # 1 of 9 bytes, then FIN
    pair.exchange(rounds=100)
    ended = [e for e in pair.server_events if isinstance(e, ConnectionEnded)]
    assert ended and ended[0].error_code == ErrorCode.MALFORMED_FRAME and "truncated frame" in ended[0].reason


def test_a_fetch_stream_missing_its_first_byte_holds_no_more_than_its_window(monkeypatch):
    """aioquic doubled a stream's credit from the highest offset received: a client that withheld a fetch stream's
    first byte had everything it sent after it buffered by the KV server, its credit doubling as it came."""
    from tokenwire.transport import kv_protocol

    monkeypatch.setattr(kv_protocol, "FLOW_WINDOW", 256 << 10)  # (64 MiB in use: the same rule, smaller numbers)
    pair = KVPair()
    quic = pair.client.quic
    sid = quic.get_next_available_stream_id()
    quic.send_stream_data(sid, b"x" * (3 * (256 << 10)))
    quic._streams[sid].sender._pending.subtract(0, 1)  # the first byte never goes
    pair.serve = False
    pair.exchange(rounds=400)
    assert pair.server is not None
    stream = pair.server.quic._streams[sid]
    assert stream.max_stream_data_local == 256 << 10 and len(stream.receiver._buffer) <= 256 << 10
    assert not pair.client.closed and not pair.server.closed  # held back, not closed
