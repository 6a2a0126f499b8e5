"""Sans-I/O Chatterbox sender/receiver, driven in virtual time with no sockets."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzzing import examples
from tokenwire.transport.chatterbox import NEEDS_ROOM, TokenReceiver, TokenSender
from tokenwire.transport.frames import Ack, Tokens, decode_datagram
from tokenwire.transport.transcript import Transcript


def make(n=0, scheme="chatterbox", **kw):
    tr = Transcript()
    for i in range(n):
        tr.append(f"t{i} ".encode(), i * 0.03)
    return tr, TokenSender(7, tr, scheme=scheme, **kw)


def build(sender, now=0.0, cap=1162, window=None):
    out = sender.build(now, cap, window=window)
    assert out is not None and out is not NEEDS_ROOM
    payload, pkt = out
    assert len(payload) <= cap
    frame = decode_datagram(payload)
    assert isinstance(frame, Tokens)
    return frame, pkt


def test_new_tokens_then_oldest_unacked():
    tr, s = make(3)
    f1, p1 = build(s)
    assert f1.runs() == [(0, [b"t0 ", b"t1 ", b"t2 "])]
    tr.append(b"t3 ", 0.1)
    f2, _p2 = build(s, 0.1)
    # packet 1 not acked yet: the new token plus all unacked ones, contiguous from the oldest
    assert f2.first == 0 and len(f2.tokens) == 4 and f2.extra is None
    s.on_delivery(p1.pid, True, 0.2)
    assert s.floor == 3
    tr.append(b"t4 ", 0.2)
    f3, _ = build(s, 0.2)
    assert f3.first == 3 and f3.tokens == [b"t3 ", b"t4 "]


def test_packets_never_exceed_capacity_and_new_tokens_claim_first():
    tr, s = make(0, max_redundant_tokens=1000)
    for i in range(500):
        tr.append(b"x" * 20, i * 0.01)
    for cap in (80, 200, 1162):
        frame, _ = build(s, 1.0, cap)
        assert len(frame.tokens) >= 1
    # with a backlog of unacked tokens and new ones, a small packet holds new ones first
    tr2, s2 = make(0, max_redundant_tokens=1000)
    for _ in range(40):
        tr2.append(b"y" * 20, 0.0)
    build(s2, 0.0, 1162)  # sends 0..39, unacked
    tr2.append(b"NEW", 0.1)
    frame, _ = build(s2, 0.1, 100)
    runs = frame.runs()
    assert runs[-1][0] == 40 and runs[-1][1] == [b"NEW"]  # the new token made it
    if len(runs) == 2:
        assert runs[0][0] == 0  # the rest is the oldest unacked


def test_needs_room_when_nothing_fits():
    _tr, s = make(1)
    assert s.build(0.0, 10) is NEEDS_ROOM
    build(s, 0.0, 1162)
    assert s.build(0.0, 1162) is None  # nothing new, no repair wanted


def test_redundancy_is_bounded():
    tr, s = make(0, max_redundant_tokens=8)
    for i in range(100):
        tr.append(b"a", i * 0.01)
        frame, _ = build(s, i * 0.01)
        carried = sum(len(t) for _, t in frame.runs())
        assert carried <= 8 + 1


def test_lost_packet_triggers_repair_only_when_nothing_later_in_flight():
    tr, s = make(2)
    _, p1 = build(s)
    tr.append(b"z", 0.05)
    _, p2 = build(s, 0.05)
    s.on_delivery(p1.pid, False, 0.1)
    assert not s.wants_send()  # p2 still in flight and carries tokens 0..1
    s.on_delivery(p2.pid, False, 0.2)
    assert s.wants_send()
    f, p3 = build(s, 0.2)
    assert f.first == 0 and len(f.tokens) == 3 and p3.repair


def test_client_ack_advances_floor_and_rtt():
    _tr, s = make(5, initial_rtt=0.1)
    f, _ = build(s, 1.0)
    s.on_ack(Ack(7, next_index=5, echo_us=f.sent_us), 1.02)
    assert s.floor == 5 and s.unacked == 0
    assert abs(s.srtt - (0.875 * 0.1 + 0.125 * 0.02)) < 1e-9


def test_idle_repair_with_backoff():
    _tr, s = make(3, initial_rtt=0.1)
    build(s, 0.0)
    t1 = s.next_timer()
    assert t1 is not None and abs(t1 - 0.15) < 1e-9
    s.on_timer(t1)
    assert s.wants_send()
    f, pkt = build(s, t1)
    assert pkt.repair and f.first == 0
    t2 = s.next_timer()
    assert abs((t2 - t1) - 0.3) < 1e-9  # doubled
    s.on_delivery(pkt.pid, True, t1 + 0.1)
    assert s.next_timer() is None  # everything acked


def test_duplicate_scheme_copies_and_retransmits():
    _tr, s = make(3, scheme="duplicate")
    _f, p = build(s)
    assert p.copies == 2
    s.on_delivery(p.pid, False, 0.1)
    assert not s.wants_send()  # one copy may still arrive
    s.on_delivery(p.pid, False, 0.1)
    assert s.wants_send()
    f2, _ = build(s, 0.1)
    assert f2.first == 0 and len(f2.tokens) == 3


def test_receiver_renders_contiguous_prefix():
    r = TokenReceiver()
    assert r.on_run(2, [b"c", b"d"], 1.0) == []
    assert r.missing() == (0, 2)
    assert r.on_run(0, [b"a", b"b"], 1.1) == [b"a", b"b", b"c", b"d"]
    assert r.render_times == [1.1] * 4
    assert r.on_run(1, [b"b", b"c", b"d", b"e"], 1.2) == [b"e"]
    assert r.duplicate_tokens == 3
    r.set_total(6)
    assert r.missing() == (5, 6) and not r.complete


@settings(max_examples=examples(60), deadline=None)
@given(
    loss=st.floats(0.0, 0.6),
    n=st.integers(1, 300),
    seed=st.integers(0, 10_000),
    scheme=st.sampled_from(["chatterbox", "duplicate"]),
)
def test_every_token_arrives_exactly_once_in_order_over_a_lossy_channel(loss, n, seed, scheme):
    """Virtual channel: random loss, QUIC-like verdicts one RTT later, idle/lost repairs; no stream repair."""
    rng = random.Random(seed)
    tr = Transcript()
    s = TokenSender(1, tr, scheme=scheme, initial_rtt=0.05)
    r = TokenReceiver()
    rendered = []
    now = 0.0
    inflight = []  # (verdict_time, pid, delivered)
    for step in range(20000):
        now = step * 0.01
        if len(tr) < n and step % 3 == 0:
            tr.append(f"<{len(tr)}>".encode(), now)
            if len(tr) == n:
                tr.finish()
        for item in [x for x in inflight if x[0] <= now]:
            inflight.remove(item)
            s.on_delivery(item[1], item[2], now)
        s.on_timer(now)
        while s.wants_send():
            out = s.build(now, 300)
            assert out is not NEEDS_ROOM and out is not None
            payload, pkt = out
            for _ in range(s.copies):
                ok = rng.random() >= loss
                if ok:
                    rendered += r.on_frame(decode_datagram(payload), now + 0.025)
                inflight.append((now + 0.05 + (0 if ok else 0.03), pkt.pid, ok))
        if r.complete and s.unacked == 0 and len(tr) == n:
            break
    assert rendered == tr.tokens
    assert r.complete


def _silent_backlog(n_unacked=64, at=0.8):
    """A sender with ``n_unacked`` tokens out and no acknowledgement since, then a new token at ``at``."""
    tr, s = make(n_unacked)
    build(s, 0.0)  # tokens 0..n-1 leave; no ack ever comes back
    tr.append(b"NEW ", at)
    return tr, s


def test_repeats_stay_in_the_first_half_of_the_window_while_acks_are_silent():
    """Uplink-only outage: the path delivers, acks are lost. Full repeats filled aioquic's window in 3 s and
    then blocked every new token (tokenwire sim, 8-s uplink outage: stall 0.229 -> 0.000)."""
    _tr, s = _silent_backlog()
    frame, _ = build(s, 0.8, window=(20_000, 12_000))  # more than half the window in flight
    assert frame.runs() == [(64, [b"NEW "])]  # the new token only
    assert s.stats.repeats_trimmed == 1  # counted for the daemon's tokenwire_repeats_trimmed_total
    _tr, s = _silent_backlog()
    frame, _ = build(s, 0.8, window=(20_000, 9_800))  # room for a few repeats below the half
    runs = frame.runs()
    assert runs[0][0] == 0 and 0 < len(runs[0][1]) < 64 and runs[-1] == (64, [b"NEW "])


def test_no_repeats_ride_with_new_tokens_while_the_client_is_silent_too():
    """Acks silent and not a packet from the client either (its pings come every quarter second in a downlink
    outage): the uplink is out, every token arrives, and repeats would only spend the window that new tokens
    need (tokenwire sim, 8-s uplink-only outages, 900 tokens, seeds 1-5: stall 0.074 -> 0.015)."""
    _tr, s = _silent_backlog()
    s.on_peer_packet(0.1)  # the client's last packet; nothing since
    frame, _ = build(s, 0.8, window=(20_000, 2_000))  # the window has room for repeats
    assert frame.runs() == [(64, [b"NEW "])] and s.stats.repeats_trimmed == 1
    _tr, s = _silent_backlog()
    s.on_peer_packet(0.6)  # a ping came: a downlink outage, where the half-window rule keeps some repeats
    frame, _ = build(s, 0.8, window=(20_000, 2_000))
    assert frame.first == 0 and len(frame.tokens) == 65
    _tr, s = _silent_backlog()  # a driver that never reports the client's packets keeps the half-window rule
    frame, _ = build(s, 0.8, window=(20_000, 2_000))
    assert frame.first == 0 and len(frame.tokens) == 65


def test_one_packet_at_1_2_4_8_seconds_of_silence_carries_the_full_repeats():
    """A downlink outage followed at once by an uplink one: the downlink is back, acks cannot say so, and
    without these packets the gap's tokens rode in none for 3 s (namespace testbed, instrumented)."""
    tr, s = make(64)
    build(s, 0.0)
    full = []
    for t in (0.8, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0):
        tr.append(b"x ", t)
        frame, _ = build(s, t, window=(20_000, 15_000))
        full.append(frame.first == 0)
    assert full == [False, True, False, True, False, True, False, True]
    s.on_ack(Ack(7, 0, None, 8_500_000), 8.5)  # heard again: the next silence starts the schedule over
    tr.append(b"y ", 9.2)
    assert build(s, 9.2, window=(20_000, 15_000))[0].first != 0
    tr.append(b"z ", 9.6)
    assert build(s, 9.6, window=(20_000, 15_000))[0].first == 0


def test_repeats_are_unlimited_while_acks_flow_and_in_a_probe():
    # acks flowing: after aioquic collapsed the window, the lost tokens must still ride in every packet
    tr, s = make(64)
    build(s, 0.0)
    s.on_ack(Ack(7, 0, None, 700_000), 0.7)  # the client's ack datagram: nothing arrived in order yet
    tr.append(b"NEW ", 0.8)
    frame, _ = build(s, 0.8, window=(2_400, 2_000))
    assert frame.first == 0 and len(frame.tokens) == 65
    assert s.stats.repeats_trimmed == 0
    # silent, but the window is full: this packet is a probe, the one that crosses after an outage
    _tr, s = _silent_backlog()
    frame, _ = build(s, 0.8, window=(20_000, 20_000))
    assert frame.first == 0 and len(frame.tokens) == 65


def test_a_repair_carries_the_newest_unacked_tokens_after_the_oldest():
    """Acks stopped at token 0 while the path delivered 0..299 and then failed: the repair used to carry
    0..63 only, all delivered, every few seconds (namespace testbed: a 16-s stall on the last 50 tokens)."""
    tr, s = make(300)
    tr.finish()
    while s.next_new < 300:
        build(s, 0.0)
    s.on_timer(5.0)  # idle repair due
    frame, pkt = build(s, 5.0)
    assert pkt.repair
    runs = frame.runs()
    assert runs[0][0] == 0 and len(runs[0][1]) == 64
    assert runs[1][0] + len(runs[1][1]) == 300 and runs[1][0] > 64  # the tail, up to the newest token
    # with room for everything the two runs meet and become one
    tr2, s2 = make(80)
    tr2.finish()
    build(s2, 0.0)
    s2.on_timer(5.0)
    frame2, _ = build(s2, 5.0)
    assert frame2.runs() == [(0, [f"t{i} ".encode() for i in range(80)])]


@settings(max_examples=examples(200), deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(1, 5)), max_size=40), st.integers(0, 80))
def test_missing_is_the_first_gap_whatever_the_arrival_order(runs, total):
    """missing() keeps the smallest out-of-order index in a heap (it rescanned every held token per frame:
    quadratic); the gap it names is the brute-force one after any sequence of runs."""
    rx = TokenReceiver()
    rx.set_total(total)
    for first, n in runs:
        rx.on_run(first, [b"t"] * n, 0.0)
        known_end = max(rx.high, rx.total or 0)
        held = set(range(rx.next_index)) | set(rx._pending)
        if rx.next_index >= known_end:
            assert rx.missing() is None
        else:
            later = [i for i in held if i > rx.next_index]
            assert rx.missing() == (rx.next_index, min(later) if later else known_end)
