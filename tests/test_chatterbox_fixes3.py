"""Chatterbox repeats against the congestion window and the request stream: FINISHED is not kept out of the
packets by repeats, and repeats of tokens too recent to be acknowledged keep to the window's share."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import tokenwire.testbed.sim as sim
from tokenwire.testbed.loss import LossModel, NoLoss
from tokenwire.transport.chatterbox import NEEDS_ROOM, STREAM_FRAME_OVERHEAD, TokenSender
from tokenwire.transport.frames import Ack, Tokens, decode_datagram
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


# ------------------------------------------------------------------ repeats too recent to help
def _long_path_sender(n_young: int, n_old: int = 0) -> tuple[Transcript, TokenSender]:
    """A 2-s round trip with acks flowing: ``n_old`` tokens sent long ago, ``n_young`` within the last RTT."""
    tr, s = make(0, initial_rtt=2.0)
    for i in range(n_old):
        tr.append(f"o{i} ".encode(), 0.0)
    if n_old:
        build(s, 0.0)
    for i in range(n_young):
        t = 3.0 + i * 0.03
        tr.append(f"y{i} ".encode(), t)
        build(s, t)
    s.on_ack(Ack(7, 0, None, 4_900_000), 4.9)  # acks flow (nothing in order yet): no ack silence
    tr.append(b"NEW ", 5.0)
    return tr, s


def test_repeats_of_tokens_not_yet_due_keep_to_the_windows_share_while_acks_flow():
    """1-s one-way delay, no loss: ~60 unacknowledged tokens rode in every packet, filled the window and held
    new tokens back (loopback relay: stall 0.107-0.130, in-order streaming 0.023-0.031)."""
    _tr, s = _long_path_sender(60)
    frame, _ = build(s, 5.0, window=(20_000, 12_000))  # more than half the window in flight
    assert frame.runs() == [(60, [b"NEW "])]
    assert s.stats.repeats_trimmed == 1
    _tr, s = _long_path_sender(60)
    frame, _ = build(s, 5.0, window=(20_000, 2_000))  # room in the first half: they still ride
    assert frame.first == 0 and len(frame.tokens) == 61


def test_overdue_tokens_are_repeated_whatever_the_window():
    """Tokens older than a round trip and unacknowledged are presumably lost: they still ride in every packet
    (after an outage aioquic collapses the window, and the lost tokens must not wait for it)."""
    _tr, s = _long_path_sender(40, n_old=10)
    frame, _ = build(s, 5.0, window=(20_000, 12_000))
    runs = frame.runs()
    assert runs[0] == (0, [f"o{i} ".encode() for i in range(10)])  # the overdue ones, and not the young
    assert runs[-1] == (50, [b"NEW "])


def test_a_long_delay_path_streams_without_stalls():
    """Loss-free 1-s one-way delay (tokenwire sim): chatterbox stalled 0.080 where in-order streaming had 0."""
    result = sim.run_scheme("chatterbox", sim.SimConfig(tokens=300, delay_ms=1000.0, seed=1))
    assert result.digest_ok
    assert result.stats.stall_ratio < 0.01


def test_the_last_tokens_repeats_ride_in_full_once_nothing_new_can_come():
    """The share rule keeps the window for new tokens; after the last one there are none, and the tail's
    repeats must ride behind FINISHED (sim, 25-ms outages, seed 2: trimmed, stall 0.033 -> 0.040)."""
    tr, s = _long_path_sender(60)
    build(s, 5.0, window=(20_000, 2_000))  # the last token leaves
    tr.finish()
    out = s.build(5.05, CAP, piggyback=True, window=(20_000, 12_000))  # an ACK leaving, the window over half
    assert out is not None and out is not NEEDS_ROOM
    frame = decode_datagram(out[0])  # type: ignore[index]
    assert isinstance(frame, Tokens) and frame.first == 0 and len(frame.tokens) == 61


def test_first_send_times_of_acknowledged_tokens_are_dropped():
    """A first send time per token, kept for the whole answer: 8 MB for a 1,000,000-token one."""
    from tokenwire.transport.chatterbox import FIRST_SENT_TRIM

    tr, s = make()
    for i in range(5 * FIRST_SENT_TRIM):
        tr.append(f"t{i} ".encode(), i * 0.001)
        build(s, i * 0.001)
        s.on_ack(Ack(7, s.next_new), i * 0.001)
    assert s.floor == 5 * FIRST_SENT_TRIM
    assert len(s._first_sent) <= FIRST_SENT_TRIM + 1
