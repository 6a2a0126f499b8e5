"""The KV server's last rate window of a fetch when it is short (session 39).

A window too short for the bytes QUIC acknowledged is held and merged into the next (``test_kv_short_window_s38``);
the fetch's last has no next, and closed as a sample however short. QUIC's view of the other chunk streams runs a
few ms behind each KV_ACK, so the bytes it kept from the window before all land in that last one: chunk 1 done 1.9
ms after chunk 0 with QUIC 3.4 ms behind read 1.88x the link (4 ms: 1.42x; real sockets at 50 Mbit/s: 1.6x). Now,
where the fetch already has a sample, the last window's rate is taken over that sample's window and its own (its
time its own, the earlier sample as it was); where it would be the fetch's only sample it still closes alone.

Sans-I/O, on ``test_kv_short_window_s38``'s fluid 50 Mbit/s link shared fairly by chunks all written at t=0.
"""

from __future__ import annotations

import pytest

from tokenwire.transport.frames import KvAck
from tokenwire.transport.kv_server_session import MIN_WINDOW_S

from .test_kv_rate_s37 import HEADER, LINK_BPS, _fetch
from .test_kv_short_window_s38 import _ack, _fair, _in_band


@pytest.mark.parametrize(("sizes", "behind_us"), [([200_000, 212_000], 3_400), ([200_000, 225_000], 3_400),
                                                  ([300_000, 300_000, 312_000], 3_400)])
def test_a_short_last_window_is_read_with_the_sample_before(sizes: list[int], behind_us: int) -> None:
    """Chunks written at once, the second-to-last KV_ACKed with QUIC ``behind_us`` behind, the last done 1.9 or
    4 ms later: its window read 1.88x, 1.42x (and 1.59x after two chunks done together) the link. Now it reads the
    link, the sample before it is left as it was, and the time is measured once."""
    session, f, spy, acked = _fetch(sizes)
    done, points = _fair(sizes)
    assert done[-1] - done[-2] < MIN_WINDOW_S * 1e6
    for i in range(len(sizes) - 1):
        _ack(session, f, acked, sizes, i, behind_us, done, points, 1.0 + i / 10)
    before = list(spy.seen)
    assert len(before) == 1
    _ack(session, f, acked, sizes, len(sizes) - 1, 0, done, points, 2.0)
    assert spy.seen[:1] == before
    assert f.samples == 2
    _in_band(session)
    assert session.link_rates[-1] == pytest.approx(LINK_BPS, rel=0.02)
    assert sum(s for _, s in spy.seen) == pytest.approx(done[-1] / 1e6, rel=1e-3)
    assert f.held is None and not f.held_for


def test_a_short_last_window_is_the_sample_where_the_fetch_has_none() -> None:
    """Three 20-KB chunks written at once on a fast path (the probe and the chunks after it), each done within a
    fraction of a ms of the others: every window is short and none is a chunk alone, so each is held and merged
    into the next. The last, with no sample before it to be read with, is the fetch's one sample of the link, over
    all three chunks' bytes."""
    sizes = [20_000, 20_000, 20_000]
    session, f, spy, acked = _fetch(sizes)
    sids = [sid for sid, _ in f.chunk_streams]
    ends = [480, 500, 520]  # us; 60 KB in 0.52 ms is about 0.92 Gbit/s
    for i, end in enumerate(ends):
        for j in range(i + 1, len(sizes)):
            acked[sids[j]] = 19_000  # (the rest arrives with the chunk's own KV_ACK)
        acked[sids[i]] = sizes[i] + HEADER
        session._on_ack(f, KvAck(i, sizes[i], 0, end), 1.0 + i / 10)
    assert f.samples == 1 and len(spy.seen) == 1
    nbytes, seconds = spy.seen[0]
    assert nbytes == pytest.approx(sum(sizes), abs=3 * HEADER)
    assert seconds == pytest.approx(ends[-1] / 1e6)
    assert f.held is None and not f.held_for


def test_a_short_last_window_after_an_idle_link_is_its_own_sample() -> None:
    """Chunk 0 alone (64 ms at 50 Mbit/s), the link idle, then chunks 1 and 2 written together on a fast path and
    done within 0.5 ms, QUIC in step: no bytes crossed from chunk 0's window into theirs, so their window, short,
    is a sample alone (0.64 Gbit/s, the path's rate then), not read with chunk 0's of another moment."""
    sizes = [400_000, 20_000, 20_000]
    session, f, spy, acked = _fetch(sizes)
    sids = [sid for sid, _ in f.chunk_streams]
    acked[sids[0]] = sizes[0] + HEADER
    session._on_ack(f, KvAck(0, sizes[0], 0, 64_000), 1.0)
    acked[sids[1]], acked[sids[2]] = sizes[1] + HEADER, 19_000
    session._on_ack(f, KvAck(1, sizes[1], 500_000, 500_480), 1.5)
    acked[sids[2]] = sizes[2] + HEADER
    session._on_ack(f, KvAck(2, sizes[2], 500_000, 500_500), 1.6)
    assert f.samples == 2
    assert spy.seen[1] == pytest.approx((sizes[1] + sizes[2] + 2 * HEADER, 500e-6), rel=0.01)
