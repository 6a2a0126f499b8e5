"""The KV server's chunk-rate windows when chunks finish out of the order they were written (session 38).

A KV_ACK closes a rate window that counts every byte of the fetch delivered in it (``tests/test_kv_rate_s37.py``).
A chunk written before the one finishing and still arriving started at a time the server does not know until its own
KV_ACK. Left to that KV_ACK, its bytes were charged to the few ms after the later chunk's end (a first-written
chunk finishing last read 30x the link); counted from the previous window's end, the window took in the link idle
before the chunk's first byte (0.10x). Now such a window is held until the earlier chunk's first byte is known, and
closes as one. And a KV_ACK's cost is the chunks in flight, not every chunk written since the host change.

Sans-I/O: crafted KV_ACKs on a bare ``KVServerSession`` (``test_kv_rate_s37._fetch``), with the QUIC acknowledged
bytes of each chunk stream set by the test, on a fluid 50 Mbit/s link (6.25 bytes a microsecond) shared fairly.
"""

from __future__ import annotations

import pytest

from tokenwire.transport.frames import KvAck

from .test_kv_rate_s37 import HEADER, LINK_BPS, _fetch

BYTES_PER_US = LINK_BPS / 8e6
LAG = 2 * 1200  # QUIC's ACK of the last two packets not yet at the server when a KV_ACK arrives


def test_first_written_chunk_finishing_last_reads_the_link() -> None:
    """Chunks 0 (300 KB) and 1 (290 KB) written at once share the link: chunk 1 is done at 92.8 ms, chunk 0's last
    10 KB take 1.6 ms more. The old sampler left chunk 0's bytes to its own KV_ACK and counted all 300 KB over those
    1.6 ms (1500 Mbit/s, 30x the link; chunk 1 alone read 0.5x); now one window, first byte to last, reads the
    link, and every byte of the fetch is counted once."""
    sizes = [300_000, 290_000]
    session, f, spy, acked = _fetch(sizes)
    s0, s1 = (sid for sid, _ in f.chunk_streams)
    done1 = round(2 * sizes[1] / BYTES_PER_US)  # 92_800
    done0 = done1 + round((sizes[0] - sizes[1]) / BYTES_PER_US)  # 94_400
    acked.update({s0: sizes[1] - LAG, s1: sizes[1] + HEADER})
    session._on_ack(f, KvAck(1, sizes[1], 100, done1), 1.0)
    acked[s0] = sizes[0] + HEADER
    session._on_ack(f, KvAck(0, sizes[0], 0, done0), 1.1)
    assert f.samples >= 1
    assert max(session.link_rates) <= 1.1 * LINK_BPS
    assert min(session.link_rates) >= 0.9 * LINK_BPS
    assert sum(b for b, _ in spy.seen) == pytest.approx(sum(sizes), abs=3 * HEADER)
    assert sum(s for _, s in spy.seen) == pytest.approx(done0 / 1e6)  # the time measured once


def test_three_chunks_at_once_finishing_newest_first() -> None:
    """Chunks 0 (220 KB), 1 (210 KB) and 2 (200 KB) written at once at the fetch's start share the link: 2 is done
    at 96 ms, 1 at 99.2 ms, 0 at 100.8 ms. The old sampler read 0.33x and 21x the link (chunk 1's whole 210 KB and
    chunk 0's first 208 KB over chunk 1's last 3.2 ms); now no sample is off by more than 10 %, and each byte and
    each microsecond is counted once."""
    sizes = [220_000, 210_000, 200_000]
    session, f, spy, acked = _fetch(sizes)
    sids = [sid for sid, _ in f.chunk_streams]
    acked.update({sids[0]: 200_000 - LAG, sids[1]: 200_000 - LAG, sids[2]: sizes[2] + HEADER})
    session._on_ack(f, KvAck(2, sizes[2], 200, 96_000), 1.0)
    acked.update({sids[0]: 210_000 - LAG, sids[1]: sizes[1] + HEADER})
    session._on_ack(f, KvAck(1, sizes[1], 100, 99_200), 1.1)
    acked[sids[0]] = sizes[0] + HEADER
    session._on_ack(f, KvAck(0, sizes[0], 0, 100_800), 1.2)
    assert f.samples >= 1
    assert max(session.link_rates) <= 1.1 * LINK_BPS
    assert min(session.link_rates) >= 0.9 * LINK_BPS
    assert sum(b for b, _ in spy.seen) == pytest.approx(sum(sizes), abs=4 * HEADER)
    assert sum(s for _, s in spy.seen) == pytest.approx(0.1008)


def test_a_window_takes_no_idle_link_before_an_earlier_chunk() -> None:
    """Chunk 0 alone (0 to 100 ms); the link idles 800 ms; chunks 1 (300 KB) and 2 (290 KB) are written at once
    and share it, 2 finishing first. The old sampler started chunk 2's window at chunk 0's end, the link idle for
    most of it (0.10x the link); now the window starts at chunk 1's first byte."""
    sizes = [625_000, 300_000, 290_000]
    session, f, spy, acked = _fetch(sizes)
    sids = [sid for sid, _ in f.chunk_streams]
    acked[sids[0]] = sizes[0] + HEADER
    session._on_ack(f, KvAck(0, sizes[0], 0, 100_000), 1.0)
    t = 900_000  # chunks 1 and 2's first bytes
    done2 = t + round(2 * sizes[2] / BYTES_PER_US)
    done1 = done2 + round((sizes[1] - sizes[2]) / BYTES_PER_US)
    acked.update({sids[1]: sizes[2] - LAG, sids[2]: sizes[2] + HEADER})
    session._on_ack(f, KvAck(2, sizes[2], t + 50, done2), 2.0)
    acked[sids[1]] = sizes[1] + HEADER
    session._on_ack(f, KvAck(1, sizes[1], t, done1), 2.1)
    assert f.samples == 2
    assert list(session.link_rates) == pytest.approx([LINK_BPS] * 2, rel=0.05)
    assert spy.seen[1][1] == pytest.approx((done1 - t) / 1e6)  # the idle 800 ms are not in it


def test_a_held_window_closes_at_a_text_chunks_ack() -> None:
    """A text chunk (too small for a sample of its own) written before a KV chunk and finishing after it: the KV
    chunk's window, held for the text chunk's first byte, closes at its KV_ACK instead of waiting for ever. (The
    old sampler passes too: it never held a window.)"""
    sizes = [8_000, 290_000]
    session, f, _spy, acked = _fetch(sizes)
    s0, s1 = (sid for sid, _ in f.chunk_streams)
    acked.update({s0: 4_000, s1: sizes[1] + HEADER})
    session._on_ack(f, KvAck(1, sizes[1], 0, 47_000), 1.0)
    acked[s0] = sizes[0] + HEADER
    session._on_ack(f, KvAck(0, sizes[0], 0, 47_600), 1.1)
    assert f.samples == 1
    assert list(session.link_rates) == pytest.approx([LINK_BPS], rel=0.05)


class _CountingSet(set[int]):
    """A set that counts membership tests: the sampler's walk over chunks."""

    lookups = 0

    def __contains__(self, item: object) -> bool:
        _CountingSet.lookups += 1
        return super().__contains__(item)


def test_a_kv_ack_costs_the_chunks_in_flight_not_the_fetch() -> None:
    """A fetch of 4096 chunks written three ahead of the one arriving: the sampler looked at every chunk written
    so far at each KV_ACK (8.4 million membership tests, about 0.3 s of the event loop); now a few per KV_ACK. The
    samples are each chunk's own, as before."""
    n, size, ahead = 4096, 20_000, 3
    session, f, spy, acked = _fetch([size] * n)
    f.acked = _CountingSet()
    f.next_index = ahead
    sids = [sid for sid, _ in f.chunk_streams]
    span = round(size / BYTES_PER_US)
    _CountingSet.lookups = 0
    for i in range(n):
        f.next_index = min(n, i + ahead)
        acked[sids[i]] = size + HEADER
        session._on_ack(f, KvAck(i, size, i * span, (i + 1) * span), 1.0 + i)
    assert f.samples == n
    assert spy.seen[-1] == (size, span / 1e6)
    assert _CountingSet.lookups < 8 * n
