"""The KV server's chunk-rate samples when a fetch's chunks overlap on the wire (session 37).

QUIC interleaves chunk streams written while others are still being sent, so several chunks of one fetch can arrive
over the same stretch of time. Each KV_ACK used to measure its own chunk's bytes over its receive span, cut at the
previous KV_ACK's end: on real sockets, 3 chunks at once on a 50 Mbit/s link gave 17.7, 198.9 and 1633 Mbit/s. A
sample now counts every byte of the fetch delivered in its window (what QUIC has acknowledged of the chunks still
arriving), each byte in one sample only. Sans-I/O: crafted KV_ACKs on a bare ``KVServerSession``, with the QUIC
acknowledged bytes of each chunk stream set by the test.
"""

from __future__ import annotations

from typing import Any

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from tokenwire.transport.frames import KvAck, KvFetch, StreamDecoder
from tokenwire.transport.kv_channel import ServerTuning
from tokenwire.transport.kv_controller import LEVELS
from tokenwire.transport.kv_server_session import ContextPlan, KVServerSession, ServerFetch

HEADER = 40  # a KV_CHUNK frame's bytes before the payload, about
LINK_BPS = 50e6


class Spy:
    """A forecaster that records what it is given."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def observe(self, nbytes: int, seconds: float) -> None:
        self.seen.append((nbytes, seconds))

    def forecast(self) -> Any:
        return None


def _fetch(sizes: list[int]) -> tuple[KVServerSession, ServerFetch, Spy, dict[int, int]]:
    """A session with one fetch whose chunks (payload ``sizes``) are all written; the returned dict is each chunk
    stream's bytes QUIC has acknowledged, which the test moves as the client receives them."""
    quic = QuicConnection(configuration=QuicConfiguration(is_client=True))
    session = KVServerSession(quic, tuning=ServerTuning(forecaster="ewma", prior_bps=5e6))
    n = len(sizes)
    plan = ContextPlan(16, [16] * n, [1000] * n, [dict.fromkeys(LEVELS, s) for s in sizes], (1, 1, 1), 0, "float16")
    f = ServerFetch(0, KvFetch(model="m", deadline_ms=4000, token_ids=[1] * 16 * n), StreamDecoder(), 0.0, plan=plan)
    spy = Spy()
    f.forecaster = spy
    f.chunk_streams = [(3 + 4 * i, s + HEADER) for i, s in enumerate(sizes)]
    f.next_index = n
    session.fetches[0] = f
    acked = {sid: 0 for sid, _ in f.chunk_streams}
    session._stream_acked = lambda sid, size: acked[sid]  # type: ignore[method-assign]
    return session, f, spy, acked


def test_overlapping_chunks_measure_the_link_not_their_share_of_it() -> None:
    """Three chunks written at once share a 50 Mbit/s link fairly (fluid model): 600, 900 and 1200 KB all start at
    t=0; the first is done at 288 ms, the second at 384 ms, the last at 432 ms. Every sample is the link's rate
    (within 5 %, with QUIC's acknowledgments two packets behind each KV_ACK), where the old sampler gave 16.7, 75
    and 200 Mbit/s; and every byte of the fetch is counted exactly once."""
    sizes = [600_000, 900_000, 1_200_000]
    session, f, spy, acked = _fetch(sizes)
    lag = 2 * 1200  # QUIC's ACK of the last two packets not yet at the server when the KV_ACK arrives
    sids = [sid for sid, _ in f.chunk_streams]
    # chunk 0 done at 288 ms: each stream had 600 KB by then
    acked.update({sids[0]: sizes[0] + HEADER, sids[1]: 600_000 - lag, sids[2]: 600_000 - lag})
    session._on_ack(f, KvAck(0, sizes[0], 0, 288_000), 1.0)
    # chunk 1 done at 384 ms: 300 KB more each for chunks 1 and 2
    acked.update({sids[1]: sizes[1] + HEADER, sids[2]: 900_000 - lag})
    session._on_ack(f, KvAck(1, sizes[1], 150, 384_000), 1.1)
    acked[sids[2]] = sizes[2] + HEADER
    session._on_ack(f, KvAck(2, sizes[2], 300, 432_000), 1.2)
    assert f.samples == 3 and len(spy.seen) == 3
    assert list(session.link_rates) == pytest.approx([LINK_BPS] * 3, rel=0.05)
    assert [b * 8 / s for b, s in spy.seen] == pytest.approx(list(session.link_rates))
    assert sum(b for b, _ in spy.seen) == pytest.approx(sum(sizes), abs=3 * HEADER)
    assert sum(s for _, s in spy.seen) == pytest.approx(0.432)  # the time measured once, first byte to last


def test_the_probe_pattern_three_equal_chunks_at_once() -> None:
    """The pattern measured on real sockets: 3 equal chunks written at once arrive together over ~130 ms and finish
    within 4.4 ms. The old sampler gave 17.2, 596 and 3500 Mbit/s; now 50 and 50, and the last chunk's 4 KB tail,
    all its window holds (the rest of its bytes counted in the earlier windows), is too few bytes for a sample."""
    size = 280_000
    session, f, _spy, acked = _fetch([size] * 3)
    sids = [sid for sid, _ in f.chunk_streams]
    # 812.5 KB delivered by 130 ms: chunk 0 whole, 266.25 KB each of the others (one 2 KB ahead in stream order)
    acked.update({sids[0]: size + HEADER, sids[1]: 268_250, sids[2]: 264_250})
    session._on_ack(f, KvAck(0, size, 0, 130_000), 1.0)
    # chunks 1 and 2 at 25 Mbit/s each: chunk 1's last 11.75 KB take 3.76 ms; chunk 2's last 4 KB 0.64 ms more
    acked.update({sids[1]: size + HEADER, sids[2]: 276_000})
    session._on_ack(f, KvAck(1, size, 100, 133_760), 1.1)
    acked[sids[2]] = size + HEADER
    session._on_ack(f, KvAck(2, size, 200, 134_400), 1.2)
    assert f.samples == 2
    assert list(session.link_rates) == pytest.approx([LINK_BPS] * 2, rel=0.01)


def test_chunks_one_after_another_give_the_samples_they_gave_before() -> None:
    """Without overlap a sample is its chunk's bytes over its receive span, as before the change: chunks back to
    back, after an idle gap, a small (text) chunk between them that gives no sample, and a next chunk written but
    with nothing of it acknowledged yet (queued behind the one finishing) that adds nothing."""
    sizes = [400_000, 250_000, 1_000, 800_000, 300_000]
    session, f, spy, acked = _fetch(sizes)
    sids = [sid for sid, _ in f.chunk_streams]
    spans = [(0, 100_000), (100_000, 180_000), (180_500, 181_000), (250_000, 400_000), (400_000, 460_000)]
    for i, (first, done) in enumerate(spans):
        acked[sids[i]] = sizes[i] + HEADER
        session._on_ack(f, KvAck(i, sizes[i], first, done), 1.0 + i)
    expected = [s * 8e6 / (d - a) for s, (a, d) in zip(sizes, spans, strict=True) if s >= 16 * 1024]
    assert list(session.link_rates) == pytest.approx(expected)
    assert spy.seen == [(s, (d - a) / 1e6) for s, (a, d) in zip(sizes, spans, strict=True) if s >= 16 * 1024]
    assert f.samples == 4
