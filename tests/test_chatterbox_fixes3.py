"""Chatterbox repeats against the request stream: FINISHED is not kept out of the packets by repeats (a rule
that kept repeats of not-yet-due tokens to half the window was tried and reverted: see transport/chatterbox.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from aioquic.quic.packet_builder import QuicDeliveryState

import tokenwire.testbed.sim as sim
from tokenwire.testbed.loss import LossModel, NoLoss
from tokenwire.transport.chatterbox import NEEDS_ROOM, STREAM_FRAME_OVERHEAD, TokenSender
from tokenwire.transport.frames import Tokens, decode_datagram
from tokenwire.transport.transcript import Transcript

CAP = 1162


def make(n: int = 0, **kw) -> tuple[Transcript, TokenSender]:
    tr = Transcript()
    for i in range(n):
        tr.append(f"t{i} ".encode(), i * 0.03)
    return tr, TokenSender(7, tr, **kw)


def build(sender: TokenSender, now: float, window: tuple[int, int] | None = None) -> tuple[Tokens, int]:
    out = sender.build(now, CAP, window=window)
    assert out is not None and out is not NEEDS_ROOM
    payload, _pkt = out  # type: ignore[misc]
    frame = decode_datagram(payload)
    assert isinstance(frame, Tokens)
    return frame, len(payload)


# ------------------------------------------------------------------ FINISHED ahead of the repeats
def test_a_repair_leaves_the_request_streams_waiting_bytes_their_room():
    """aioquic writes DATAGRAM frames before STREAM frames: a repair that filled the packet kept FINISHED out of
    every probe while the window was full (uplink-only outage: the answer ended 14 s after its last token)."""
    tr, s = make(200)
    tr.finish()
    while s.next_new < 200:
        build(s, 0.0)
    s.stream_backlog = lambda: 1_000  # FINISHED waits on the request stream
    s.on_timer(5.0)
    frame, size = build(s, 5.0)
    assert size <= CAP - 1_000 - STREAM_FRAME_OVERHEAD
    assert frame.first == 0  # the oldest unacknowledged tokens still lead what fits
    s.stream_backlog = lambda: 0  # sent: the repairs take the whole packet again
    s.on_timer(10.0)
    _frame, size = build(s, 10.0)
    assert size > CAP - 1_000


def test_new_tokens_still_claim_the_packet_first_and_a_piggyback_gives_way():
    tr, s = make(64)
    build(s, 0.0)
    tr.append(b"NEW ", 0.1)
    s.stream_backlog = lambda: 5_000  # more than a packet: only the new token rides
    frame, _ = build(s, 0.1)
    assert frame.runs() == [(64, [b"NEW "])]
    # a packet leaving anyway (an ACK, a probe) gets no repeats while the stream needs all of it
    assert s.build(0.2, CAP, piggyback=True) is None
    s.stream_backlog = lambda: 0
    out = s.build(0.3, CAP, piggyback=True)
    assert out is not None and out is not NEEDS_ROOM


class _UplinkOut(LossModel):
    spec = "outage"

    def __init__(self, start: float, end: float) -> None:
        self.start, self.end = start, end

    def lost(self, t: float) -> bool:
        return self.start <= t < self.end


def _uplink_outage_run(monkeypatch: pytest.MonkeyPatch, start: float, end: float, cfg: sim.SimConfig):
    """One simulated answer with the client's packets lost from ``start`` to ``end``; returns (run, the
    virtual time at which the client had the answer complete)."""
    wires = iter([NoLoss(), _UplinkOut(start, end)])  # run_scheme builds the downlink's model, then the uplink's
    monkeypatch.setattr(sim, "parse_loss", lambda spec, seed=0: next(wires))
    ended: dict[str, float] = {}
    orig_run: Callable = sim._EventLoop.run

    def run(loop: sim._EventLoop, done, limit: float) -> None:
        orig_run(loop, done, limit)
        ended["at"] = loop.now

    monkeypatch.setattr(sim._EventLoop, "run", run)
    result = sim.run_scheme("chatterbox", cfg)
    return result, ended["at"]


def test_finished_reaches_the_client_with_the_last_token_in_an_uplink_only_outage(monkeypatch):
    """The uplink fails for 25 s and the window fills: the last token arrived at 13.5 s in a probe, and the
    answer ended at 27.2 s when acks returned (probe through the loopback relay: 12.9 s vs 27.0 s)."""
    cfg = sim.SimConfig(tokens=320, delay_ms=1.0, loss="none", seed=1)
    result, ended = _uplink_outage_run(monkeypatch, 2.0, 27.0, cfg)
    assert result.digest_ok
    assert ended < 20.0  # before the uplink returns
    assert ended - result.render[-1] < 0.01  # with the last token, not a probe timeout later


def test_the_backlog_is_the_next_frame_aioquic_writes_not_every_pending_range():
    """aioquic writes one STREAM frame per stream per packet, from its first pending range: the sum of the ranges
    (a lost STARTED's 40 bytes ahead of the rest of a FINISHED) kept repeats out of packets that left room empty."""
    from aioquic.quic.connection import QuicConnection

    from tokenwire.transport.server_session import ServerSession
    from tokenwire.transport.tls import server_configuration

    session = ServerSession(QuicConnection(configuration=server_configuration(),
                                           original_destination_connection_id=bytes(8)))
    session.quic._remote_max_data = 1 << 20
    stream = session.quic._get_or_create_stream_for_send(3)
    stream.max_stream_data_remote = 1 << 20
    stream.is_blocked = False  # (the peer's stream limit, which a handshake would have given)
    stream.sender.write(b"S" * 40)
    stream.sender.get_frame(40)  # STARTED went out ...
    stream.sender.write(b"F" * 1381)  # ... then FINISHED's first 500 bytes, the rest waits
    stream.sender.get_frame(500)
    stream.sender.on_data_delivery(QuicDeliveryState.LOST, 0, 40, False)  # STARTED lost: sent again first
    assert [(r.start, r.stop) for r in stream.sender._pending] == [(0, 40), (540, 1421)]
    assert session._stream_backlog(3) == 40  # (the next frame; it was 40 + 881)
