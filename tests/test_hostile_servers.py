"""What a lying or broken server can make the SDK client do: end with a typed error, not a hang, and never
send a frame its own peer would refuse (sans-I/O, on the in-memory pair)."""

from __future__ import annotations

import pytest

from tokenwire.transport.client_session import _report
from tokenwire.transport.errors import FrameError
from tokenwire.transport.frames import Finished, Request, Tokens, check_outgoing, encode_stream_frame
from tokenwire.transport.session_outcome import ChatOutcome
from tokenwire.transport.transcript import text_digest

from .quicpair import Pair


def _started_request(pair: Pair) -> int:
    sid = pair.client.start_request(Request(messages=[{"role": "user", "content": "x"}]), pair.now)
    pair.exchange(rounds=40)
    pair.server.accept(sid)
    pair.exchange(rounds=40)
    return sid


@pytest.mark.parametrize("lie", ["datagram total", "tokens past it", "twice"])
def test_a_finished_that_contradicts_what_came_before_is_a_protocol_error(lie):
    """A TOKENS datagram announcing 10^9 tokens, then FINISHED n=4 with the right digest: set_total kept the
    larger total and the answer never completed; the client waited forever (a live server answers pings)."""
    pair = Pair()
    pair.exchange(rounds=40)
    sid = _started_request(pair)
    client = pair.client
    toks = [b"a", b"b", b"c", b"d"]
    sent = toks[:2] if lie == "twice" else toks  # (twice: the answer is still incomplete after the first)
    client._on_datagram(Tokens(handle=sid, first=0, tokens=sent, total=10**9 if lie == "datagram total" else None),
                        pair.now)
    if lie == "tokens past it":
        client._on_datagram(Tokens(handle=sid, first=10, tokens=[b"z"]), pair.now)
    fin = encode_stream_frame(Finished(total=4, digest=text_digest(toks)))
    if lie == "twice":
        client._on_stream_data(sid, fin, False, pair.now)
    with pytest.raises(FrameError, match="finished"):
        client._on_stream_data(sid, fin, False, pair.now)


def test_the_report_stays_within_its_fields_range_whatever_the_server_claimed():
    """Absurd generation times (FINISHED g = [2^62] * 4) made a REPORT the server's decoder refuses: it closed
    the connection, and every other answer on it, as malformed."""
    outcome = ChatOutcome(tokens=[b"a"] * 4, first_index=0, total=4, digest_ok=True, scheme="chatterbox",
                          request_id=b"\0" * 16, finish_reason="stop", request_time=0.0,
                          render_times=[0.0, 0.1, 0.2, 0.3], gen_offsets=[0.0, 2.0**62, 2.0**63, 2.0**64],
                          packets=4, duplicate_tokens=0, repairs_requested=0)
    report = _report(outcome)
    check_outgoing(report, "report")  # the server's own check


def test_tokens_past_the_requests_max_tokens_are_a_protocol_error():
    """2,000,000 tokens were taken (and held) for a max_tokens of 10."""
    pair = Pair()
    pair.exchange(rounds=40)
    sid = pair.client.start_request(Request(messages=[{"role": "user", "content": "x"}], max_tokens=10), pair.now)
    pair.exchange(rounds=40)
    pair.server.accept(sid)
    pair.exchange(rounds=40)
    pair.client._on_datagram(Tokens(handle=sid, first=0, tokens=[b"a"] * 10), pair.now)  # the limit: fine
    with pytest.raises(FrameError, match="past the request's max_tokens"):
        pair.client._on_datagram(Tokens(handle=sid, first=10, tokens=[b"b"]), pair.now)


def test_nothing_a_server_sends_after_a_protocol_error_completes_a_request():
    """Tokens past max_tokens were kept before the check raised, and the FINISHED after them still completed the
    request ("digest verified") over tokens the application never received."""
    from tokenwire.transport.frames import Started, encode_frame
    from tokenwire.transport.session_events import RequestFailed, RequestFinished, TokensRendered

    pair = Pair()
    pair.exchange(rounds=40)
    sid = pair.client.start_request(Request(messages=[{"role": "user", "content": "x"}], max_tokens=10), pair.now)
    pair.exchange(rounds=40)
    toks = [b"t"] * 12
    quic = pair.server.quic  # the server's side written by hand: a datagram past the limit, then FINISHED
    quic.send_stream_data(sid, encode_stream_frame(Started(request_id=b"\1" * 16, scheme="chatterbox",
                                                           handle=sid)))
    pair.exchange(rounds=40)
    quic.send_datagram_frame(encode_frame(Tokens(handle=sid, first=0, tokens=toks)))
    quic.send_stream_data(sid, encode_stream_frame(Finished(total=12, digest=text_digest(toks))))
    pair.exchange(rounds=200)
    kinds = [type(e) for e in pair.client_events]
    assert RequestFinished not in kinds and TokensRendered not in kinds
    failed = [e for e in pair.client_events if isinstance(e, RequestFailed)]
    assert len(failed) == 1 and "past the request's max_tokens (10)" in str(failed[0].error)


def test_a_started_at_another_index_than_asked_is_a_protocol_error():
    """The client never compared STARTED's index with its resume point: a server starting elsewhere had its
    tokens taken for others (and the digest check then failed, or passed over the wrong tokens)."""
    from tokenwire.transport.frames import Started

    pair = Pair()
    pair.exchange(rounds=40)
    sid = pair.client.start_request(Request(resume_id=b"\1" * 16, resume_from=3), pair.now,
                                    prefix=[b"a", b"b", b"c"])
    pair.exchange(rounds=40)
    with pytest.raises(FrameError, match="started at token 0, asked from 3"):
        pair.client._on_stream_data(sid, encode_stream_frame(Started(sid, b"\1" * 16, "chatterbox", 0)), False,
                                    pair.now)


def test_a_tokens_frame_whose_second_run_passes_the_largest_index_is_malformed():
    from tokenwire.transport.frames import MAX_INDEX, decode_frame, encode_frame

    ok = Tokens(handle=1, first=0, tokens=[b"a"], extra=(MAX_INDEX - 1, [b"b"]))
    assert decode_frame(encode_frame(ok)).extra == (MAX_INDEX - 1, [b"b"])
    with pytest.raises(FrameError, match="past the largest index"):
        decode_frame(encode_frame(Tokens(handle=1, first=0, tokens=[b"a"], extra=(MAX_INDEX - 1, [b"b", b"c"]))))
