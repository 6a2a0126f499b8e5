"""A request the server refuses or ends early ends alone: the connection and its other answers go on.

The client keeps sending on such a stream until it sees the server's ERROR (the rest of a long request, a
REPAIR or REPORT that crossed the ERROR); none of it may read as a new request or a protocol violation.
"""

from tokenwire.transport.errors import ErrorCode
from tokenwire.transport.frames import Repair, Request
from tokenwire.transport.session_events import (
    ConnectionEnded,
    RequestFailed,
    RequestFinished,
    RequestReceived,
    RequestRefused,
    TokensRendered,
)

from .quicpair import Pair


def _request(text: str = "x") -> Request:
    return Request(messages=[{"role": "user", "content": text}])


def _connected() -> Pair:
    pair = Pair()
    pair.exchange(rounds=40)  # handshake
    assert pair.server is not None and pair.client.datagrams_ok
    return pair


def _answer(pair: Pair, sid: int, n: int) -> None:
    pair.server.accept(sid)
    for i in range(n):
        pair.server.push(sid, f"t{i} ", pair.now)
    pair.server.finish(sid)


def _received(pair: Pair) -> list[int]:
    return [e.stream_id for e in pair.server_events if isinstance(e, RequestReceived)]


def _outcome(pair: Pair, sid: int):
    for e in pair.client_events:
        if isinstance(e, RequestFinished | RequestFailed) and e.stream_id == sid:
            return e
    return None


def _assert_connection_up(pair: Pair) -> None:
    assert not any(isinstance(e, ConnectionEnded) for e in pair.client_events + pair.server_events)
    sid = pair.client.start_request(_request("after"), pair.now)
    pair.exchange(rounds=40)
    _answer(pair, sid, 3)
    pair.exchange(rounds=200)
    done = _outcome(pair, sid)
    assert isinstance(done, RequestFinished) and done.result.digest_ok


def test_a_long_request_over_the_concurrency_limit_is_refused_alone():
    pair = _connected()
    pair.server.max_requests = 1
    running = pair.client.start_request(_request(), pair.now)
    pair.exchange(rounds=40)
    pair.server.accept(running)
    pair.server.push(running, "first ", pair.now)
    # a request of ~20 packets: the refusal goes out after the first, and the rest keeps arriving
    refused = pair.client.start_request(_request("z" * 25_000), pair.now)
    pair.exchange(rounds=300)

    failed = _outcome(pair, refused)
    assert isinstance(failed, RequestFailed) and failed.error.code == ErrorCode.LIMIT_EXCEEDED
    # the limit and what to do: an application sharing one connection among many chats could not tell
    assert "1 already open on this connection" in str(failed.error) and "another connection" in str(failed.error)
    assert [e.stream_id for e in pair.server_events if isinstance(e, RequestRefused)] == [refused]
    assert _received(pair) == [running]  # the tail of the refused request never became a request
    assert not pair.server._ended  # STOP_SENDING made the client reset its side: nothing left to track
    for i in range(5):
        pair.server.push(running, f"t{i} ", pair.now)
    pair.server.finish(running)
    pair.exchange(rounds=200)
    done = _outcome(pair, running)
    assert isinstance(done, RequestFinished) and done.result.digest_ok
    _assert_connection_up(pair)


def test_a_request_over_max_request_bytes_is_refused_alone():
    pair = _connected()
    pair.server.max_request_bytes = 2048
    running = pair.client.start_request(_request(), pair.now)
    big = pair.client.start_request(_request("z" * 3000), pair.now)
    pair.exchange(rounds=100)

    failed = _outcome(pair, big)
    assert isinstance(failed, RequestFailed) and failed.error.code == ErrorCode.LIMIT_EXCEEDED
    assert "request too large" in str(failed.error)
    assert _received(pair) == [running]
    _answer(pair, running, 4)
    pair.exchange(rounds=200)
    assert isinstance(_outcome(pair, running), RequestFinished)
    _assert_connection_up(pair)


def test_a_request_of_another_protocol_version_is_refused_alone():
    """A client cannot know the server's version in advance: another version's REQUEST, new fields and all,
    closed the whole connection (with MALFORMED_FRAME when it had a field this version lacks)."""
    import msgpack

    from tokenwire.transport.frames import encode_frame

    pair = _connected()
    running = pair.client.start_request(_request(), pair.now)
    v2 = pair.client.start_request(Request(messages=[{"role": "user", "content": "x"}], version=2), pair.now)
    wire = msgpack.unpackb(encode_frame(Request(messages=[{"role": "user", "content": "y"}])))
    wire.update(v=2, future_field=[1, 2])  # raw: a v2 client's request with a field v1 does not know
    raw = msgpack.packb(wire)
    raw_sid = pair.client.quic.get_next_available_stream_id()
    pair.client.quic.send_stream_data(raw_sid, len(raw).to_bytes(4, "big") + raw)
    pair.exchange(rounds=100)

    failed = _outcome(pair, v2)
    assert isinstance(failed, RequestFailed) and failed.error.code == ErrorCode.UNSUPPORTED_VERSION
    assert "protocol version 2 is not supported" in str(failed.error)
    refused = {e.stream_id: e.code for e in pair.server_events if isinstance(e, RequestRefused)}
    assert refused == {v2: ErrorCode.UNSUPPORTED_VERSION, raw_sid: ErrorCode.UNSUPPORTED_VERSION}
    assert _received(pair) == [running]
    _answer(pair, running, 3)
    pair.exchange(rounds=200)
    assert isinstance(_outcome(pair, running), RequestFinished)
    _assert_connection_up(pair)


def test_a_repair_crossing_the_servers_error_is_ignored():
    pair = _connected()
    sid = pair.client.start_request(_request(), pair.now)
    pair.exchange(rounds=40)
    pair.server.accept(sid)
    pair.server.push(sid, "some tokens", pair.now)
    pair.exchange(rounds=40)
    # both ends act before either hears the other: the upstream fails while the client asks for a repair
    pair.server.fail(sid, ErrorCode.UPSTREAM_ERROR, "upstream went away")
    pair.client._send(sid, Repair(0, 1))
    pair.exchange(rounds=100)

    failed = _outcome(pair, sid)
    assert isinstance(failed, RequestFailed) and failed.error.code == ErrorCode.UPSTREAM_ERROR
    assert _received(pair) == [sid]
    assert not pair.server._ended  # the client's FIN closed the books on the stream
    _assert_connection_up(pair)


def test_an_upstream_failure_delivers_every_token_generated_before_it():
    """A source that fails right after a burst: the chatterbox tokens not yet acknowledged travel on the stream
    ahead of the ERROR. They used to die with the sender (62 of 2,000 arrived), because the client drops
    datagrams once it has read the ERROR."""
    pair = _connected()
    sid = pair.client.start_request(_request(), pair.now)
    pair.exchange(rounds=40)
    pair.server.accept(sid)
    assert pair.server.requests[sid].sender is not None  # a datagram scheme
    for i in range(300):
        pair.server.push(sid, f"t{i} ", pair.now)
    pair.server.fail(sid, ErrorCode.UPSTREAM_ERROR, "upstream went away")
    pair.exchange(rounds=200)

    failed = _outcome(pair, sid)
    assert isinstance(failed, RequestFailed) and failed.error.code == ErrorCode.UPSTREAM_ERROR
    rendered = [t for e in pair.client_events if isinstance(e, TokensRendered) and e.stream_id == sid
                for t in e.tokens]
    assert b"".join(rendered) == "".join(f"t{i} " for i in range(300)).encode()
    _assert_connection_up(pair)


def test_an_oversized_frame_after_a_request_is_a_broken_client():
    """Only a request may be large; a huge length prefix after it closes the connection (FRAME_TOO_LARGE)."""
    pair = _connected()
    sid = pair.client.start_request(_request(), pair.now)
    pair.exchange(rounds=40)
    assert _received(pair) == [sid]
    pair.client.quic.send_stream_data(sid, b"\x7f\xff\xff\xff")
    pair.exchange(rounds=40)
    ended = [e for e in pair.server_events if isinstance(e, ConnectionEnded)]
    assert len(ended) == 1 and ended[0].error_code == ErrorCode.FRAME_TOO_LARGE


def test_an_oversized_frame_right_behind_a_request_in_one_read_is_a_broken_client():
    """The decoder raised at the huge length prefix and dropped the request decoded just before it: the
    client was told "request too large" for a request within the limit."""
    from tokenwire.transport.frames import encode_stream_frame

    pair = _connected()
    sid = pair.client.quic.get_next_available_stream_id()
    pair.client.quic.send_stream_data(sid, encode_stream_frame(_request()) + b"\x7f\xff\xff\xff")
    pair.exchange(rounds=40)
    ended = [e for e in pair.server_events if isinstance(e, ConnectionEnded)]
    assert len(ended) == 1 and ended[0].error_code == ErrorCode.FRAME_TOO_LARGE
    assert not [e for e in pair.server_events if isinstance(e, RequestRefused)]


def _two_running_requests(first: Request) -> tuple[Pair, int, int]:
    """Two answers under way (``first`` and a chatterbox one), each with a token out."""
    pair = _connected()
    stopped = pair.client.start_request(first, pair.now)
    other = pair.client.start_request(_request(), pair.now)
    pair.exchange(rounds=40)
    for sid in (stopped, other):
        pair.server.accept(sid)
        pair.server.push(sid, "first ", pair.now)
    pair.exchange(rounds=40)
    return pair, stopped, other


def test_a_client_that_stops_reading_an_answer_cancels_it_alone():
    """STOP_SENDING from the client: aioquic resets our side, and the next TOKENS or FINISHED write raised."""
    from tokenwire.transport.session_events import RequestCancelled

    pair, stopped, other = _two_running_requests(Request(messages=[{"role": "user", "content": "x"}],
                                                         scheme="stream"))
    pair.client.quic.stop_stream(stopped, ErrorCode.CANCELLED)
    pair.exchange(rounds=40)
    for sid in (stopped, other):  # the stopped one: nothing written, nothing raised
        pair.server.push(sid, "more ", pair.now)
        pair.server.finish(sid)
    pair.exchange(rounds=200)
    cancelled = [e.stream_id for e in pair.server_events if isinstance(e, RequestCancelled)]
    assert cancelled == [stopped]
    done = _outcome(pair, other)
    assert isinstance(done, RequestFinished) and done.result.digest_ok
    assert not any(isinstance(e, ConnectionEnded) for e in pair.server_events)


def test_a_stop_sending_that_overtakes_its_request_drops_the_request():
    """The request's packet lost and retransmitted after the client's STOP_SENDING: the request was then
    accepted on a stream whose sending side aioquic had reset, and accept() raised in the event loop."""
    pair = _connected()
    sid = pair.client.quic.get_next_available_stream_id()
    pair.client.quic.send_stream_data(sid, b"")  # the stream exists; its request is "still on its way"
    pair.client.quic.stop_stream(sid, ErrorCode.CANCELLED)
    pair.exchange(rounds=40)
    pair.client._send(sid, _request(), end=True)
    pair.exchange(rounds=40)
    assert _received(pair) == []
    assert not pair.server._ended  # the client's FIN closed the books
    _assert_connection_up(pair)


def test_stop_sending_with_a_last_report_and_fin_in_one_packet_ends_that_request_alone():
    """aioquic marks the receive side finished when it parses the FIN, before the session sees the data that
    came with it: the trailing REPORT read as a new request and closed the connection."""
    from tokenwire.transport.frames import Report

    pair, stopped, other = _two_running_requests(_request())
    pair.client.quic.stop_stream(stopped, ErrorCode.CANCELLED)
    pair.client._send(stopped, Report(stall_ratio=0.0), end=True)
    pair.exchange(rounds=40)
    pair.server.push(other, "more ", pair.now)
    pair.server.finish(other)
    pair.exchange(rounds=200)
    done = _outcome(pair, other)
    assert isinstance(done, RequestFinished) and done.result.digest_ok
    assert not any(isinstance(e, ConnectionEnded) for e in pair.server_events)
