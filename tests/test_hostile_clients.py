"""What one hostile or broken client can make the server do: nothing that grows without bound, nothing that
reaches other clients' metrics, and no stream state left behind (sans-I/O, on the in-memory pair)."""

from __future__ import annotations

from tokenwire.transport.frames import Repair, Report, Tokens
from tokenwire.transport.session import ClientReport, RequestCancelled

from .quicpair import Pair
from .test_session_refusals import _connected, _request


def _accepted(*pieces: str) -> tuple[Pair, int]:
    """A connected pair with one request accepted by the server, ``pieces`` pushed (not yet exchanged)."""
    pair = _connected()
    sid = pair.client.start_request(_request(), pair.now)
    pair.exchange(rounds=40)
    pair.server.accept(sid)
    for piece in pieces:
        pair.server.push(sid, piece, pair.now)
    return pair, sid


def test_repeated_repairs_put_each_token_on_the_stream_once():
    """22-byte REPAIR frames for [0, 2^40 - 1) each queued the whole transcript on the stream again: 41 MB of
    send buffer for 10,000 of them."""
    pair, sid = _accepted(*(f"t{i} " for i in range(500)))
    server = pair.server
    on_stream: list[int] = []
    real = server._send

    def counting(stream_id, frame):
        if isinstance(frame, Tokens):
            on_stream.extend(range(frame.first, frame.first + len(frame.tokens)))
        return real(stream_id, frame)

    server._send = counting
    for _ in range(200):
        pair.client._send(sid, Repair(0, (1 << 40) - 1))
    pair.client._send(sid, Repair(100, 120))
    pair.exchange(rounds=40)
    assert sorted(on_stream) == list(range(500))  # every token once, however often asked
    assert server.requests[sid].repairs == 201


def test_one_report_per_answer_counts():
    """10,000 REPORT frames after one request added 10,000 observations to the stall and TTFT metrics."""
    pair, sid = _accepted("a b c")
    for _ in range(50):
        pair.client._send(sid, Report(stall_ratio=0.5, longest_stall_ms=900, ttft_ms=100))
    pair.exchange(rounds=40)
    assert len([e for e in pair.server_events if isinstance(e, ClientReport)]) == 1


def test_a_request_the_client_resets_frees_its_stream():
    """A reset (quic-go's CancelWrite) left the server's side of the stream open: the stream was never
    discarded, its credit never returned, and after 128 cancels the connection could open no more requests."""
    pair, sid = _accepted("partial")
    pair.exchange(rounds=20)
    pair.client.quic.reset_stream(sid, 0x10D)
    pair.exchange(rounds=60)
    assert any(isinstance(e, RequestCancelled) and e.stream_id == sid for e in pair.server_events)
    assert sid not in pair.server.quic._streams  # both directions ended: aioquic discarded it
