"""The KV server's link knowledge across a client's moves between hosts (session 37).

A connection's chunk rates (``link_rates``: the link prior a fetch's first chunks are planned on) and its bandwidth
forecasters describe the path they were measured on. A phone that moves from Wi-Fi to LTE takes its connection to
another path, whose congestion state the session already switches per host (:mod:`tokenwire.transport.path_reset`);
the KV session now switches its link knowledge with it: a new host starts with none, a return takes back that host's
own, a port-only change (a NAT rebinding) keeps it, and a fetch running across a move plans the rest on the new path.

Sans-I/O: the real KV sessions on a hand-driven in-memory wire whose downlink is a FIFO served at the rate of the host
the client is on (so a chunk's KV_ACK measures that rate), with a fixed one-way delay each way.
"""

from __future__ import annotations

import heapq

import pytest
from aioquic.quic.connection import QuicConnection

from tokenwire.transport import session as session_module
from tokenwire.transport.frames import KvAck, KvFetch
from tokenwire.transport.kv_channel import (
    ContextPlan,
    KVChunkNeeded,
    KVChunkReceived,
    KVDoneReceived,
    KVFetchClosed,
    KVFetchRequested,
    KVServerSession,
    ServerTuning,
)
from tokenwire.transport.kv_controller import PRIOR_LOW
from tokenwire.transport.kv_server_session import LINK_MIN_SAMPLES, MOVE_HOLD_S

from .test_kv_channel_refusals import _ewma, new_kv_client, new_kv_server

SERVER = ("10.0.0.1", 4435)
WIFI = ("10.0.0.2", 1234)
LTE = ("10.0.0.3", 40000)
PRIOR_BPS = 5e6
DELAY_S = 0.01  # one way
SIZES = {"low": 150_000, "medium": 200_000, "high": 300_000}  # bytes per chunk
TOKENS = 64
GEOMETRY = (32, 4, 64)  # layers, heads, head dim: 2 * 32 * 4 * 64 KV elements a token
ELEMENTS = 2 * 32 * 4 * 64 * TOKENS  # a chunk's (21 ms of decode at the default 50 M elements/s)
RECOMPUTE_US = 20_000  # per token: 1.28 s a chunk, so text is never the cheaper option here


def _plan(chunks: int) -> ContextPlan:
    return ContextPlan(TOKENS, [TOKENS] * chunks, [ELEMENTS] * chunks, [dict(SIZES) for _ in range(chunks)],
                       GEOMETRY, 0, "float16")


class ShapedPair:
    """A KV client and server; what the server sends reaches the client through a FIFO served at
    ``rates[client host]`` bit/s. The pair serves fetches as the asyncio shell does (a plan of ``chunks`` chunks,
    each chunk sent when asked for) and the client acknowledges each chunk, and ends a fetch once it is done."""

    def __init__(self, rates: dict[str, float], chunks: int = 2) -> None:
        self.client = new_kv_client()
        self.server: KVServerSession | None = None
        self.rates = rates
        self.addr = WIFI
        self.chunks = chunks
        self.now = 0.0
        self._busy_until = 0.0
        self._seq = 0
        self._down: list[tuple[float, int, bytes]] = []
        self._up: list[tuple[float, int, bytes, tuple[str, int]]] = []
        self.closed: list[KVFetchClosed] = []
        self.ack_chunks = True  # the client acknowledges each chunk it receives
        self.done: set[int] = set()  # fetches whose KV_DONE and every chunk have arrived
        self.asked: list[tuple[float, int]] = []  # (when, chunk index) of each chunk the server decided
        self.lost_to: set[str] = set()  # hosts the server's datagrams never reach (an address that cannot validate)
        self._got: dict[int, set[int]] = {}
        self._chunks: dict[int, int] = {}
        self.client.quic.connect(SERVER, now=self.now)
        self.run(0.5)
        assert self.server is not None and self.server.datagrams_ok is not None

    def _server_for(self, data: bytes) -> KVServerSession:
        if self.server is None:
            self.server = new_kv_server(data, ServerTuning(forecaster="ewma", prior_bps=PRIOR_BPS))
        return self.server

    def _on_server(self, events: list) -> None:
        assert self.server is not None
        for ev in events:
            if isinstance(ev, KVFetchRequested):
                self.server.start(ev.stream_id, _plan(self.chunks), self.now)
                self._on_server(self.server.poll(self.now))
            elif isinstance(ev, KVChunkNeeded):
                self.asked.append((self.now, ev.index))
                self.server.send_chunk(ev.stream_id, ev.index, ev.level, b"k" * SIZES.get(ev.level, 4 * TOKENS),
                                       self.now)
            elif isinstance(ev, KVFetchClosed):
                self.closed.append(ev)

    def _on_client(self, events: list) -> None:
        for ev in events:
            if isinstance(ev, KVChunkReceived):
                if self.ack_chunks:
                    self.client.ack(ev.stream_id, ev.header, ev.first_at, ev.done_at)
                self._got.setdefault(ev.stream_id, set()).add(ev.header.index)
            elif isinstance(ev, KVDoneReceived):
                self._chunks[ev.stream_id] = ev.done.chunks
        for sid, n in self._chunks.items():
            if len(self._got.get(sid, ())) == n:
                self.done.add(sid)

    def _send_down(self, data: bytes) -> None:
        rate = self.rates[self.addr[0]]
        start = max(self.now, self._busy_until)
        self._busy_until = start + len(data) * 8 / rate
        self._seq += 1
        heapq.heappush(self._down, (self._busy_until + DELAY_S, self._seq, data))

    def step(self, dt: float = 0.001) -> None:
        self.now += dt
        while self._up and self._up[0][0] <= self.now:
            _, _, data, addr = heapq.heappop(self._up)
            self._on_server(self._server_for(data).receive_datagram(data, addr, self.now))
        while self._down and self._down[0][0] <= self.now:
            _, _, data = heapq.heappop(self._down)
            self._on_client(self.client.receive_datagram(data, SERVER, self.now))
        for sess, sink in ((self.client, self._on_client), (self.server, self._on_server)):
            t = sess.get_timer() if sess is not None else None
            if t is not None and t <= self.now:
                sink(sess.handle_timer(self.now))  # type: ignore[union-attr]
        for data, _ in self.client.datagrams_to_send(self.now):
            self._seq += 1
            heapq.heappush(self._up, (self.now + DELAY_S, self._seq, data, self.addr))
        if self.server is not None:
            for data, addr in self.server.datagrams_to_send(self.now):
                if addr[0] not in self.lost_to:
                    self._send_down(data)

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            self.step()

    def fetch(self, deadline_ms: int = 5000, limit_s: float = 20.0) -> KVFetchClosed:
        """One fetch, run to its end (the client's FIN once every chunk is in); what the server recorded of it."""
        sid = self.client.fetch(KvFetch(model="m", deadline_ms=deadline_ms, token_ids=list(range(TOKENS * self.chunks)),
                                        recompute_us_per_token=RECOMPUTE_US))
        end = self.now + limit_s
        while sid not in self.done and self.now < end:
            self.step()
        assert sid in self.done, "the fetch did not complete (a hang)"
        self.client.finish(sid)
        while not any(c.stream_id == sid for c in self.closed) and self.now < end:
            self.step()
        closed = [c for c in self.closed if c.stream_id == sid]
        assert closed and closed[0].complete
        return closed[0]

    def move(self, addr: tuple[str, int]) -> None:
        """The client's packets come from ``addr`` from now on; returns once the server has validated it."""
        assert self.server is not None
        changes = self.server.path_changes
        self.addr = addr
        self.client.quic.send_ping(self._seq + 1000)
        end = self.now + 2.0
        while self.server.path_changes == changes and self.now < end:
            self.step()
        assert self.server.path_changes == changes + 1 and self.server._path == addr


def _warm(pair: ShapedPair, fetches: int = 5) -> None:
    """Enough chunk rates on the current host for a link prior of its own."""
    assert pair.server is not None
    for _ in range(fetches):
        pair.fetch()
    assert len(pair.server.link_rates) >= LINK_MIN_SAMPLES


def test_a_new_host_starts_without_the_left_hosts_link_knowledge_and_a_return_takes_it_back() -> None:
    """Wi-Fi's chunk rates planned the first fetch on LTE (and the forecaster, shared by the connection's fetches,
    carried Wi-Fi's samples over); now LTE starts as a new connection would, the move back to Wi-Fi takes back
    Wi-Fi's rates and forecaster, and a port-only change keeps what the host has."""
    pair = ShapedPair({WIFI[0]: 50e6, LTE[0]: 3e6})
    server = pair.server
    assert server is not None
    _warm(pair)
    wifi_rates = list(server.link_rates)
    wifi_prior = server.link_prior()
    wifi_forecaster = server._forecasters["ewma"]
    assert min(wifi_rates) > 10e6 and wifi_prior[0] > 10e6  # (measured through the 50 Mbit/s FIFO)
    # a port-only change (a NAT rebinding: the same path through a new mapping) keeps it all
    pair.move((WIFI[0], 5555))
    assert list(server.link_rates) == wifi_rates and server._forecasters["ewma"] is wifi_forecaster

    pair.move(LTE)
    assert list(server.link_rates) == [] and server._forecasters == {}
    assert server.link_prior() == (PRIOR_BPS, PRIOR_LOW)
    first_on_lte = pair.fetch(deadline_ms=1000)
    assert first_on_lte.decisions[0]["median_bps"] is None  # cold: planned on the prior...
    # ...the configured one, not Wi-Fi's (its first chunk went high, 0.8 s at 3 Mbit/s, and the fetch took 1.2 s):
    # the lowest level, and the deadline is met (virtual time)
    assert first_on_lte.levels == ["low", "low"]
    assert first_on_lte.elapsed_s is not None and first_on_lte.elapsed_s < 1.0
    lte_rates = list(server.link_rates)
    assert lte_rates and max(lte_rates) < 4e6  # this host's own, alone

    pair.move(WIFI)
    assert list(server.link_rates) == wifi_rates and server.link_prior() == wifi_prior
    assert server._forecasters["ewma"] is wifi_forecaster
    # planned on Wi-Fi's prior again (on the mix of both hosts' rates, whose 10 % quantile was LTE's, it went low)
    assert pair.fetch(deadline_ms=1000).levels == ["high", "high"]
    pair.move(LTE)  # and LTE's, in turn
    assert list(server.link_rates) == lte_rates and server.link_prior()[0] < 4e6


def test_link_knowledge_is_kept_for_the_hosts_whose_path_state_the_session_keeps(monkeypatch) -> None:
    """Bounded as the session's own per-host state: past MAX_HOSTS_REMEMBERED the host left longest ago is
    forgotten, and a return to it is to a new host."""
    monkeypatch.setattr(session_module, "MAX_HOSTS_REMEMBERED", 1)
    pair = ShapedPair({WIFI[0]: 50e6, LTE[0]: 3e6, "10.0.0.4": 3e6})
    server = pair.server
    assert server is not None
    _warm(pair)
    pair.move(LTE)
    pair.move(("10.0.0.4", 40000))  # Wi-Fi, left longest ago, is dropped
    pair.move(WIFI)
    assert list(server.link_rates) == [] and server.link_prior() == (PRIOR_BPS, PRIOR_LOW)
    assert list(server._saved_links) == list(server._saved_paths) == ["10.0.0.4"]


def test_a_fetch_running_across_a_move_plans_the_rest_on_the_new_path() -> None:
    """A fetch's own samples are never stale, so one that had measured Wi-Fi planned its chunks after a move to LTE
    at Wi-Fi's rate. Now it is cold again on the new path: the new host's forecaster and prior, its next decisions
    on what it measures there, and the KV_ACKs of chunks written before the move feed no rate of the new host."""
    pair = ShapedPair({WIFI[0]: 10e6, LTE[0]: 2e6}, chunks=8)
    server = pair.server
    assert server is not None
    _warm(pair, fetches=2)
    sid = pair.client.fetch(KvFetch(model="m", deadline_ms=20_000, token_ids=list(range(TOKENS * 8)),
                                    recompute_us_per_token=RECOMPUTE_US))
    while True:
        pair.step()
        f = server.fetches.get(sid)
        if f is not None and f.samples >= 2:
            break
        assert pair.now < 30
    old_fc = f.forecaster
    written = f.next_index
    assert written < 8 and old_fc.forecast().median_bps > 5e6
    pair.move(LTE)
    assert f.forecaster is server._forecasters["ewma"] is not old_fc and f.forecaster.forecast() is None
    assert f.samples == 0 and f.path_index >= written
    assert (f.controller.prior_bps, f.controller.prior_low) == (PRIOR_BPS, PRIOR_LOW)
    moved_at = len(f.decisions)
    while sid not in pair.done:
        pair.step()
        assert pair.now < 60
    pair.client.finish(sid)
    while not any(c.stream_id == sid for c in pair.closed):
        pair.step()
        assert pair.now < 60
    closed = next(c for c in pair.closed if c.stream_id == sid)
    after = closed.decisions[moved_at:]
    assert after
    # every decision after the move plans on the new path's own measurements (or the prior, while it has none),
    # none on Wi-Fi's ~10 Mbit/s
    assert all(d["median_bps"] is None or d["median_bps"] < 3e6 for d in after), after
    assert server.link_rates and all(r < 3e6 for r in server.link_rates)  # (no Wi-Fi chunk's rate among LTE's)


def test_chunks_written_before_a_move_measure_nothing_of_the_new_path() -> None:
    """Sans-I/O detail of the above: a KV_ACK of a chunk written before the move feeds no forecaster nor the new
    host's rates, and a probe written before it no longer counts (the fetch may probe the new path, and does not wait
    for the old one's rate)."""
    pair = ShapedPair({WIFI[0]: 50e6, LTE[0]: 3e6}, chunks=4)
    server = pair.server
    assert server is not None
    sid = pair.client.fetch(KvFetch(model="m", deadline_ms=20_000, token_ids=list(range(TOKENS * 4)),
                                    recompute_us_per_token=RECOMPUTE_US))
    while (f := server.fetches.get(sid)) is None or f.next_index < 1:
        pair.step()
        assert pair.now < 10
    pair.ack_chunks = False  # the KV_ACKs below are the test's
    f.probe, f.probe_sent_at, f.probe_bps = 0, pair.now, 40e6  # (as if chunk 0 had been a probe, measured)
    pair.move(LTE)
    assert f.path_index == f.next_index >= 1
    assert f.probe is None and f.probe_bps is None and server._probe_rate(f, pair.now) is None
    server._on_ack(f, KvAck(0, 100_000, 0, 20_000, None), pair.now)
    assert f.samples == 0 and not server.link_rates and f.forecaster.forecast() is None
    while f.next_index <= f.path_index:  # a chunk written on LTE
        pair.step()
        assert pair.now < 30
    index = f.path_index
    server._on_ack(f, KvAck(index, 100_000, 20_000, 420_000, None), pair.now)
    assert f.samples == 1 and list(server.link_rates) == pytest.approx([100_000 * 8 / 0.4])


def test_the_fresh_rate_of_a_fetch_running_across_a_move_is_the_new_paths() -> None:
    """The fetch's QUIC delivery rate is the lower of the rate since its first ACK progress and the rate over the
    whole fetch; across a move both spans start at the move, or a move from a slow host to a fast one kept the slow
    path's bytes and time in the whole-fetch rate (here 4 Mbit/s where the new path delivers 20)."""
    from types import SimpleNamespace

    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.packet_builder import QuicDeliveryState
    from aioquic.quic.stream import QuicStreamSender

    from tokenwire.transport.frames import StreamDecoder
    from tokenwire.transport.kv_server_session import ServerFetch

    quic = QuicConnection(configuration=QuicConfiguration(is_client=True))
    session = KVServerSession(quic, tuning=ServerTuning(forecaster="ewma"), forecaster_factory=_ewma)
    f = ServerFetch(0, KvFetch(model="m", deadline_ms=20_000, token_ids=list(range(TOKENS * 4))), StreamDecoder(), 0.0)
    session.fetches[0] = f
    session.start(0, _plan(4), 0.0)
    sender = QuicStreamSender(3, True)
    sender.write(b"x" * 1_000_000, end_stream=True)
    quic._streams[3] = SimpleNamespace(sender=sender)
    f.chunk_streams.append((3, 1_000_000))
    f.first_sent_at, f.next_index, f.pending = 0.0, 1, True  # (written at 0; the next chunk is being read)
    sender.on_data_delivery(QuicDeliveryState.ACKED, 0, 100_000, False)  # 100 KB in the first second: 0.8 Mbit/s
    session.poll(1.0)
    session._replan_on_new_path(f, 1.0)  # the client moved at 1.0 (what _on_host_changed does for each fetch)
    assert f.ack_mark is None and f.path_start == (1.0, 100_000)
    session.poll(1.0)
    sender.on_data_delivery(QuicDeliveryState.ACKED, 100_000, 600_000, False)  # 500 KB in 0.2 s on the new path
    assert session.fresh_rate(f, 1.2) == pytest.approx(500_000 * 8 / 0.2)


def test_the_first_fetch_after_an_unannounced_move_is_planned_for_the_host_entered() -> None:
    """The client moves and fetches at once, its KV_FETCH the first packet from the new host (the tests above ping
    first, and wait for the server to validate the address). The session learns of the move at validation, a round
    trip later: the fetch's decisions were made at once, on Wi-Fi's rates (``high, high``, 1.71 s for a 1-s
    deadline; on real sockets ``high`` x3, 2.5 s for 2 s). Now they wait for the validation (MOVE_HOLD_S at most)."""
    pair = ShapedPair({WIFI[0]: 50e6, LTE[0]: 3e6})
    server = pair.server
    assert server is not None
    _warm(pair)
    assert server.link_prior()[0] > 10e6
    changes = server.path_changes
    pair.addr = LTE  # no ping: the fetch's own packet tells the server
    start = pair.now
    closed = pair.fetch(deadline_ms=1000)
    assert server.path_changes == changes + 1 and server._path == LTE
    assert closed.decisions[0]["median_bps"] is None  # cold, on LTE's prior (the configured one), not Wi-Fi's
    assert closed.levels == ["low", "low"]
    assert closed.elapsed_s is not None and closed.elapsed_s < 1.0
    # the hold ended at the validation, not at its bound
    first_decision = min(t for t, i in pair.asked if t >= start and i == 0)
    assert first_decision - start < MOVE_HOLD_S


def test_a_move_that_never_validates_holds_a_fetch_once_and_for_the_bound_at_most() -> None:
    """An address that never validates (here the server's datagrams to it are all lost; a forged or replayed packet
    from elsewhere does the same) must not hold a fetch for ever, nor again each time the address changes: the fetch
    is decided MOVE_HOLD_S after its hold began, on what the session knows (the host it has validated), and a move to
    a third address while it runs holds it no more."""
    pair = ShapedPair({WIFI[0]: 50e6, LTE[0]: 3e6, "10.0.0.4": 3e6}, chunks=4)
    server = pair.server
    assert server is not None
    _warm(pair)
    pair.lost_to = {LTE[0], "10.0.0.4"}
    pair.addr = LTE
    sid = pair.client.fetch(KvFetch(model="m", deadline_ms=20_000, token_ids=list(range(TOKENS * 4)),
                                    recompute_us_per_token=RECOMPUTE_US))
    while (f := server.fetches.get(sid)) is None or f.plan is None:
        pair.step()
        assert pair.now < 10
    start = pair.now
    while f.next_index < 1:
        pair.step()
        assert pair.now - start < 2.0, "the fetch was held for ever"
    held = pair.now - start
    assert MOVE_HOLD_S <= held < MOVE_HOLD_S + 0.05
    assert server._path == WIFI and f.move_hold_at is not None  # never validated: still Wi-Fi's knowledge
    hold_began = f.move_hold_at
    third = ("10.0.0.4", 40000)
    pair.addr = third  # another address not validated, while the fetch runs
    while not (paths := server.quic._network_paths) or paths[0].addr != third:
        pair.step()
        assert pair.now - start < 4.0
    assert not paths[0].is_validated
    assert not server._held_for_move(f, pair.now) and f.move_hold_at == hold_began  # not held again
    # the third address now answers: the fetch goes on, held by nothing but its look-ahead (with nothing
    # acknowledged, the look-ahead alone stops it: what the rate samples of Wi-Fi's warm-up say it may have out)
    pair.lost_to = set()
    while f.next_index < 4:
        pair.step()
        assert pair.now - start < 6.0, "the fetch was held for ever"
    assert f.move_hold_at == hold_began


def test_no_rate_sample_across_a_move_reads_above_the_link() -> None:
    """A chunk written before a move, acknowledged after it, gave no sample but ended the time measured: the next
    chunk's window was cut to its last few ms and counted all its bytes over them (a move back to 20-Mbit/s Wi-Fi
    mid-fetch: samples of 171 Mbit/s, into the host's link prior). Fetches alternate with fetches that move mid-way
    (Wi-Fi 20 Mbit/s, LTE 4 Mbit/s); every sample is checked against the rate of the host the server is on."""
    rates = {WIFI[0]: 20e6, LTE[0]: 4e6}
    pair = ShapedPair(rates, chunks=6)
    server = pair.server
    assert server is not None
    samples: list[tuple[str, float]] = []
    on_ack = server._on_ack

    def spy(f, ack, now):
        n = len(server.link_rates)
        on_ack(f, ack, now)
        # (the host the server is on when the sample is taken: a chunk received on Wi-Fi, acknowledged while the
        # client's packets already came from LTE but before the server validated that address, measured Wi-Fi)
        assert server._path is not None
        samples.extend((server._path[0], r) for r in list(server.link_rates)[n:])

    server._on_ack = spy  # type: ignore[method-assign]
    moved = 0
    for k in range(8):
        if k % 2 == 0:
            pair.fetch(deadline_ms=5000, limit_s=60)
            continue
        sid = pair.client.fetch(KvFetch(model="m", deadline_ms=5000, token_ids=list(range(TOKENS * 6)),
                                        recompute_us_per_token=RECOMPUTE_US))
        while (f := server.fetches.get(sid)) is None or f.next_index < 2:
            pair.step()
            assert pair.now < 600
        pair.move(LTE if pair.addr[0] == WIFI[0] else WIFI)
        moved += f.path_index > 0
        while sid not in pair.done:
            pair.step()
            assert pair.now < 600, "the fetch did not complete (a hang)"
        pair.client.finish(sid)
        pair.run(0.2)
    assert moved >= 3 and len(samples) >= 30  # the moves happened mid-fetch, and samples were taken
    worst = max(r / rates[host] for host, r in samples)
    assert worst < 1.1, f"a sample read {worst:.2f}x its link"
