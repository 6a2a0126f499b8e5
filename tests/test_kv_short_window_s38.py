"""The KV server's chunk-rate windows when chunks finish within a few ms of each other (session 38).

A window counts the fetch's bytes QUIC had acknowledged when its KV_ACK came (``tests/test_kv_rate_s37.py``). QUIC's
view runs a few ms behind the client's (its ACK delay, the client's event loop, ACKs bunched on the path), and by a
different amount at each KV_ACK: a window closed with the view 3 ms behind leaves those bytes to the next one. Over
a window of 100 ms that is a few per cent; over the 0.17 ms between two chunks' ends it was most of the sample (a
reviewer's randomized check: 15.9x the link at seed 170, 2.0x over a 2.1 ms window at seed 51). Now a window too
short for the bytes QUIC acknowledged is held and merged into the next, and one held at the fetch's end is never
left waiting.

Sans-I/O: crafted KV_ACKs on a bare ``KVServerSession`` (``test_kv_rate_s37._fetch``, no RTT sample yet: the
shortest window is MIN_WINDOW_S), on a fluid 50 Mbit/s link shared fairly by chunks all written at t=0.
"""

from __future__ import annotations

from itertools import pairwise

import pytest

from tokenwire.transport.frames import KvAck
from tokenwire.transport.kv_server_session import MIN_WINDOW_S, KVServerSession, ServerFetch

from .test_kv_rate_s37 import HEADER, LINK_BPS, Spy, _fetch

BYTES_PER_US = LINK_BPS / 8e6


def _fair(sizes: list[int]) -> tuple[list[float], list[list[tuple[float, float]]]]:
    """Each chunk's end (us) and its delivered bytes' breakpoints [(t, bytes)], the chunks (payload and header)
    sharing the link equally from t=0."""
    left = {i: float(s + HEADER) for i, s in enumerate(sizes)}
    done = [0.0] * len(sizes)
    points: list[list[tuple[float, float]]] = [[(0.0, 0.0)] for _ in sizes]
    t = 0.0
    while left:
        share = BYTES_PER_US / len(left)
        step = min(left.values()) / share
        t += step
        for i in list(left):
            left[i] -= share * step
            points[i].append((t, sizes[i] + HEADER - max(left[i], 0.0)))
            if left[i] <= 1e-6:
                done[i] = t
                del left[i]
    return done, points


def _at(points: list[tuple[float, float]], t: float) -> int:
    """Bytes delivered by ``t`` (us), from :func:`_fair`'s breakpoints."""
    for (t0, b0), (t1, b1) in pairwise(points):
        if t <= t1:
            return int(b0 + (b1 - b0) * (max(t, t0) - t0) / (t1 - t0))
    return int(points[-1][1])


def _ack(session: KVServerSession, f: ServerFetch, acked: dict[int, int], sizes: list[int], i: int,
         behind_us: float, done: list[float], points: list[list[tuple[float, float]]], now: float) -> None:
    """Chunk ``i``'s KV_ACK, with QUIC's view of the other chunk streams ``behind_us`` behind the client's."""
    for j, (sid, _size) in enumerate(f.chunk_streams):
        if j != i and j not in f.acked and j < len(points):  # (a chunk written later: none yet)
            acked[sid] = _at(points[j], done[i] - behind_us)
    acked[f.chunk_streams[i][0]] = sizes[i] + HEADER
    session._on_ack(f, KvAck(i, sizes[i], 0, round(done[i])), now)


def _in_band(session: KVServerSession) -> None:
    assert session.link_rates
    assert max(session.link_rates) <= 1.25 * LINK_BPS, [round(r / LINK_BPS, 2) for r in session.link_rates]
    assert min(session.link_rates) >= 0.8 * LINK_BPS, [round(r / LINK_BPS, 2) for r in session.link_rates]


def _time(spy: Spy) -> float:
    return sum(s for _, s in spy.seen)


def test_a_window_of_a_fraction_of_a_ms_is_no_sample_alone() -> None:
    """The seed-170 pattern: four chunks written at once, chunk 0 done at 192 ms with QUIC's view 3.4 ms behind;
    chunk 1's last bytes come 0.17 ms later. Its window (those 0.17 ms) counted the 17 KB QUIC acknowledged late:
    16x the link. Now it is merged into chunk 2's: every sample within 0.8-1.25x, the time measured once."""
    sizes = [300_000, 300_350, 400_000, 500_000]
    session, f, spy, acked = _fetch(sizes)
    done, points = _fair(sizes)
    assert done[1] - done[0] < 200 < MIN_WINDOW_S * 1e6
    _ack(session, f, acked, sizes, 0, 3_400, done, points, 1.0)
    _ack(session, f, acked, sizes, 1, 0, done, points, 1.1)
    _ack(session, f, acked, sizes, 2, 0, done, points, 1.2)
    _ack(session, f, acked, sizes, 3, 0, done, points, 1.3)
    _in_band(session)
    assert f.held is None and not f.held_for
    assert _time(spy) == pytest.approx(done[3] / 1e6, rel=1e-3)


def test_a_two_ms_window_after_late_acks_is_merged() -> None:
    """The seed-51 pattern: three chunks written at once, chunk 0 done with QUIC's view 3.15 ms behind; chunk 1 done
    2.1 ms later. Its window read 2.0x the link; now it is merged into chunk 2's."""
    sizes = [200_000, 206_562, 400_000]
    session, f, spy, acked = _fetch(sizes)
    done, points = _fair(sizes)
    assert 2_000 < done[1] - done[0] < MIN_WINDOW_S * 1e6
    _ack(session, f, acked, sizes, 0, 3_150, done, points, 1.0)
    _ack(session, f, acked, sizes, 1, 0, done, points, 1.1)
    _ack(session, f, acked, sizes, 2, 0, done, points, 1.2)
    _in_band(session)
    assert f.samples == 2
    assert sum(b for b, _ in spy.seen) == pytest.approx(sum(sizes), abs=4 * HEADER)
    assert _time(spy) == pytest.approx(done[2] / 1e6, rel=1e-3)


def test_a_short_window_held_at_the_fetch_end_is_let_go() -> None:
    """The seed-51 pattern again, then a text chunk (too small for a sample) written after an idle second and
    KV_ACKed last: chunk 1's short window, held for a next window that never comes, is let go at the fetch's last
    KV_ACK, and no sample read it alone (the old sampler: 2.0x)."""
    sizes = [200_000, 206_562, 206_562 + 9_000, 4_000]
    session, f, _spy, acked = _fetch(sizes)
    done, points = _fair(sizes[:3])
    assert done[2] - done[1] < MIN_WINDOW_S * 1e6  # chunk 2's tail (alone on the link) is short too
    _ack(session, f, acked, sizes, 0, 3_150, done, points, 1.0)
    _ack(session, f, acked, sizes, 1, 0, done, points, 1.1)
    text_sid = f.chunk_streams[3][0]
    acked[text_sid] = 0
    f.chunk_streams[3] = (text_sid, sizes[3] + HEADER)
    _ack(session, f, acked, sizes, 2, 0, done, points, 1.2)
    assert f.held is not None  # chunks 1 and 2's few ms, waiting for a next window
    acked[text_sid] = sizes[3] + HEADER
    session._on_ack(f, KvAck(3, sizes[3], 1_000_000, 1_000_700), 2.3)
    assert f.held is None and not f.held_for
    assert len(f.acked) == len(sizes)
    _in_band(session)


@pytest.mark.parametrize("min_rtt_s", [None, 0.1])
def test_the_shortest_window_grows_with_the_path_rtt(min_rtt_s: float | None) -> None:
    """The seed-51 pattern slowed down: chunk 1's window after the late ACKs is 20 ms. Longer than MIN_WINDOW_S, it
    is a sample of its own while QUIC has no RTT sample; on a 100 ms path (half of it the shortest window) it is
    merged into chunk 2's. The old sampler closed it alone either way."""
    sizes = [200_000, 262_500, 400_000]
    session, f, _spy, acked = _fetch(sizes)
    if min_rtt_s is not None:
        session.quic._loss._rtt_min = min_rtt_s
    done, points = _fair(sizes)
    assert MIN_WINDOW_S * 1e6 < done[1] - done[0] < 0.5 * 0.1 * 1e6
    _ack(session, f, acked, sizes, 0, 3_150, done, points, 1.0)
    _ack(session, f, acked, sizes, 1, 0, done, points, 1.1)
    _ack(session, f, acked, sizes, 2, 0, done, points, 1.2)
    _in_band(session)
    assert f.samples == (3 if min_rtt_s is None else 2)
