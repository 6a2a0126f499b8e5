"""Tokens a REPAIR brought on the stream count as acknowledged for the token sender once QUIC acknowledged them
(server_session.ServerSession._note_stream_acks), also while the client holds its ack datagrams back
(client_session.ACK_QUEUE_S)."""

from __future__ import annotations

from typing import Any

from tests.quicpair import accepted_chat, run_answer
from tokenwire.transport.chatterbox import TokenSender
from tokenwire.transport.transcript import Transcript

BASE_S = 0.040  # the path's one-way delay
QUEUE_S = 0.060  # a standing queue on the path from the server, from the fifth token on
OUTAGE = (1.0, 2.0)  # every packet from the server lost then (from the first token's time)


def _answer(tokens: int = 150, drop_after: float | None = None) -> dict[str, Any]:
    """``tokens`` tokens at 30/s through the queue and the outage (and one more packet lost at ``drop_after``):
    the repeated tokens the client held from the stream when they left, and each token's delay to its rendering."""
    pair, server, sid = accepted_chat()
    server.datagrams_to_send(pair.now)
    sender = server.requests[sid].sender
    assert sender is not None
    client_req = pair.client.requests[sid]
    rx = client_req.receiver
    from_stream: set[int] = set()
    out = {"repeats_held_from_stream": 0, "acks_held": 0}
    build = sender.build

    def counting_build(now: float, capacity: int, **kw: Any) -> Any:
        new_first = sender.next_new
        res = build(now, capacity, **kw)
        if isinstance(res, tuple):
            for f, e in res[1].runs:
                out["repeats_held_from_stream"] += sum(1 for i in range(f, min(e, new_first)) if i in from_stream)
        return res

    sender.build = counting_build  # type: ignore[method-assign]
    on_stream = pair.client._on_stream_data

    def noting_stream(stream_id: int, data: bytes, end: bool, now: float) -> Any:
        before = set(range(rx.next_index)) | set(rx._pending)
        res = on_stream(stream_id, data, end, now)
        from_stream.update(i for i in list(range(rx.next_index)) + list(rx._pending) if i not in before)
        return res

    pair.client._on_stream_data = noting_stream  # type: ignore[method-assign]
    t0 = pair.now + 0.1
    pushed: list[float] = []
    drop = [drop_after]

    def down(now: float) -> float | None:
        if t0 + OUTAGE[0] <= now < t0 + OUTAGE[1]:
            return None
        if drop[0] is not None and now >= t0 + drop[0]:
            drop[0] = None
            return None
        return BASE_S + (0.0 if now - t0 < 5 * 0.033 else QUEUE_S)

    def held(now: float) -> None:
        out["acks_held"] += pair.client.holds_acks()

    run_answer(pair, server, sid, tokens, start=t0, until=t0 + 0.033 * tokens + 5.0, down=down, up_s=BASE_S,
               finish=True, on_push=pushed.append, on_to_client=held)
    assert len(rx.render_times) == tokens
    out["repairs"] = client_req.repairs_requested
    out["from_stream"] = len(from_stream)
    out["acks_received"] = server.acks_received
    out["lag_after"] = max(r - g for r, g in zip(rx.render_times, pushed, strict=True) if g > t0 + OUTAGE[1] + 0.5)
    return out


def test_repeats_leave_the_tokens_a_repair_brought_once_quic_acknowledged_them() -> None:
    """A 1-s outage behind a 60-ms queue: the client holds its ack datagrams, and the repeats, capped to two a packet
    on the congested path, fill the gap too slowly: it asks for the rest on the stream. Only the ack datagrams' index
    told the sender of those, and its repeats walked through them two tokens a round trip, each packet for two
    seconds repeating tokens the client had (118 repeated tokens, against 2 with the fix)."""
    run = _answer()
    assert run["acks_held"] > 100 and run["acks_received"] < 10  # the client held its ack datagrams back
    assert run["repairs"] >= 1 and run["from_stream"] >= 10  # and the gap came on the stream
    assert run["repeats_held_from_stream"] <= 6  # (those that left before the stream's ACK came back)


def test_a_loss_after_the_repair_rides_the_next_packets() -> None:
    """The capped repeats carry the oldest unacknowledged tokens: stuck in the repaired range, they left a datagram
    lost after it to the client's own REPAIR, 3 round trips later (the token 558 ms late instead of 199 ms: the path's
    100 ms, an interval between packets, the queue's round trip)."""
    run = _answer(drop_after=2.6)
    assert run["lag_after"] < 0.35


def test_a_stream_delivery_acknowledges_what_was_sent() -> None:
    tr = Transcript()
    for w in "abcdef":
        tr.extend(w, 0.0)
    s = TokenSender(0, tr)
    s.build(0.0, 1200)
    assert s.next_new == 6 and s.floor == 0
    s.on_stream_delivery(2, 4)
    assert s.floor == 0 and s.unacked == 6  # (out of order: held aside)
    s.on_stream_delivery(0, 2)
    assert s.floor == 4
    s.on_stream_delivery(4, 100)  # (past what the datagrams carried: no further than that)
    assert s.floor == 6 == s.next_new
