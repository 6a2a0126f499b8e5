"""What one hostile or broken client can make the server do: nothing that grows without bound, nothing that
reaches other clients' metrics, and no stream state left behind (sans-I/O, on the in-memory pair; then the
daemon in this process, against clients on bare aioquic)."""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events as qe
from aioquic.quic.packet import QuicErrorCode

from tokenwire.daemon import gc_pacing, service
from tokenwire.daemon.config import parse_config
from tokenwire.daemon.service import Daemon
from tokenwire.daemon.transcripts import STREAMING_GRACE_S, TranscriptStore
from tokenwire.transport import tls
from tokenwire.transport.client import connect
from tokenwire.transport.errors import ErrorCode, RemoteError
from tokenwire.transport.frames import (
    Error,
    Finished,
    Repair,
    Report,
    Request,
    Started,
    StreamDecoder,
    Tokens,
    encode_stream_frame,
)
from tokenwire.transport.quic_io import connect_quic
from tokenwire.transport.server_session import MIN_REQUEST_RATE
from tokenwire.transport.session_events import (
    ClientReport,
    ConnectionEnded,
    RequestCancelled,
    RequestReceived,
    RequestRefused,
)

from .quicpair import Pair
from .test_handshake_limits import until, value
from .test_loopback import run
from .test_session_refusals import _assert_connection_up, _connected, _received, _request

# a flush "REFUSALS_LOG_S after the last line", as the tests call it, must be a little past it: (at + 60) - at rounds
# below 60 for about 0.3 % of monotonic clock values, and the flush then logged nothing (a flaky test)
FLUSH_SLACK_S = 0.25


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
    """10,000 REPORT frames after one request added 10,000 observations to the stall and TTFT metrics. (Only once
    the server has sent FINISHED does one count: the answer is finished first.)"""
    pair, sid = _accepted("a b c")
    pair.server.finish(sid)
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


def _withholding(pair: Pair, size: int) -> int:
    """A client stream of ``size`` bytes whose first byte is never sent (everything after it is)."""
    quic = pair.client.quic
    sid = quic.get_next_available_stream_id()
    quic.send_stream_data(sid, b"x" * size)
    quic._streams[sid].sender._pending.subtract(0, 1)
    return sid


def test_a_stream_missing_its_first_byte_holds_no_more_than_its_window():
    """aioquic doubled a stream's credit whenever the highest offset received passed half of it: a client that
    withheld a stream's first byte had all it sent after the gap buffered (RSS 107 -> 312 MB in 14 s)."""
    pair = _connected()
    sid = _withholding(pair, 3 * tls.REQUEST_STREAM_WINDOW)
    pair.exchange(rounds=300)
    stream = pair.server.quic._streams[sid]
    assert stream.max_stream_data_local == tls.REQUEST_STREAM_WINDOW  # nothing read: no more credit
    assert len(stream.receiver._buffer) <= tls.REQUEST_STREAM_WINDOW
    assert pair.client.quic._streams[sid].sender.highest_offset == tls.REQUEST_STREAM_WINDOW  # it sent all it could
    _assert_connection_up(pair)


def test_a_stream_whose_first_byte_never_comes_is_refused_at_the_request_deadline():
    """Nothing of such a stream reaches the session, so no request, and no request deadline, covered it: 2 MiB a
    stream, 8 MiB a connection, held for as long as the client pinged."""
    pair = _connected()
    pair.server.request_timeout = 2.0
    sid = _withholding(pair, 100_000)
    opened = pair.now
    pair.exchange(rounds=100, quiet_after=0.5)  # (not on to the deadline's timer)
    assert pair.now < opened + 2.0 and not pair.server_events
    assert len(pair.server.quic._streams[sid].receiver._buffer) > 90_000  # buffered behind the gap
    pair.exchange(rounds=600, quiet_after=30.0)
    refused = [e for e in pair.server_events if isinstance(e, RequestRefused)]
    assert [(e.stream_id, e.code) for e in refused] == [(sid, ErrorCode.LIMIT_EXCEEDED)]
    assert "its first bytes never came" in refused[0].reason and pair.now >= opened + 2.0
    stream = pair.server.quic._streams.get(sid)
    assert stream is None or not stream.receiver._buffer  # let go of
    _assert_connection_up(pair)


def test_a_reset_stream_lets_go_of_what_it_buffered_at_once():
    """ReadCredit counts a reset stream read, so its buffer must go with it: aioquic kept it until the stream was
    discarded (once the client acked our reset), and a client that never did got fresh credit per stream."""
    pair = _connected()
    sid = _withholding(pair, 1 << 20)
    pair.exchange(rounds=100)
    stream = pair.server.quic._streams[sid]
    assert len(stream.receiver._buffer) > 900_000
    pair.client.quic.reset_stream(sid, ErrorCode.CANCELLED)
    for data, _ in pair.client.datagrams_to_send(pair.now):  # the reset reaches the server; nothing goes back
        pair.server_events.extend(pair.server.receive_datagram(data, ("127.0.0.1", 1), pair.now))
    assert stream.receiver.is_finished and not stream.receiver._buffer
    _assert_connection_up(pair)


def test_a_client_that_sends_past_its_credit_is_closed():
    pair = _connected()
    sid = _withholding(pair, 2 * tls.REQUEST_STREAM_WINDOW)
    pair.client.quic._streams[sid].max_stream_data_remote = 1 << 40  # it ignores the server's limits
    pair.client.quic._remote_max_data = 1 << 40
    pair.exchange(rounds=300)
    ended = [e for e in pair.client_events if isinstance(e, ConnectionEnded)]
    assert ended and ended[0].error_code == QuicErrorCode.FLOW_CONTROL_ERROR


def test_credit_follows_what_the_server_reads(monkeypatch):
    """Credit grows with what is read, on each stream and on the connection: requests go on arriving long past
    the first window's worth, a stream held up by a missing byte stops only itself, and a request as large as
    max_request_bytes allows fits a stream's window."""
    monkeypatch.setattr(tls, "REQUEST_STREAM_WINDOW", 64 << 10)
    monkeypatch.setattr(tls, "REQUEST_CONNECTION_WINDOW", 128 << 10)
    pair = _connected()
    assert pair.server.quic.configuration.max_data == 128 << 10
    _withholding(pair, 200 << 10)  # holds half the connection's window for good
    sids = []
    for i in range(12):  # 360 KB in all, 30 KB each (the stream's window is 64 KB)
        sids.append(pair.client.start_request(_request(f"{i}" * 30_000), pair.now))
        pair.exchange(rounds=60)
    assert _received(pair) == sids
    monkeypatch.undo()
    pair = _connected()
    big = pair.client.start_request(_request("z" * (pair.server.max_request_bytes - 100)), pair.now)
    pair.exchange(rounds=300)
    assert _received(pair) == [big]


def test_a_request_not_whole_within_the_timeout_is_refused_and_forgotten():
    """A slow-loris client: 64 streams a connection, each announcing a ~1 MiB REQUEST and sending all but its last
    byte, held ~64 MiB per connection for as long as it kept pinging."""
    pair = _connected()
    pair.server.request_timeout = 2.0
    answered = pair.client.start_request(_request(), pair.now)  # a request that came whole: no deadline
    pair.exchange(rounds=40)
    pair.server.accept(answered)
    quic = pair.client.quic
    slow = quic.get_next_available_stream_id()
    quic.send_stream_data(slow, encode_stream_frame(_request("z" * 50_000))[:-1])
    opened = pair.now
    pair.exchange(rounds=40, quiet_after=0.5)  # (the client pings each second while its answer is awaited)
    assert slow in pair.server.requests and pair.now < opened + 2.0  # held, until its deadline
    pair.exchange(rounds=400)
    refused = [e for e in pair.server_events if isinstance(e, RequestRefused)]
    assert [(e.stream_id, e.code) for e in refused] == [(slow, ErrorCode.LIMIT_EXCEEDED)]
    # the timeout plus the request's size at MIN_REQUEST_RATE: a big prompt on a slow uplink gets the time it needs
    allowance = len(encode_stream_frame(_request("z" * 50_000))) - 4
    assert "not complete within 4 s (limits.request_timeout_s 2 s" in refused[0].reason
    assert pair.now >= opened + 2.0 + allowance / MIN_REQUEST_RATE > opened + 3.5
    assert slow not in pair.server.requests and slow not in pair.server.quic._streams  # its buffers are gone
    assert not pair.server._ended  # STOP_SENDING made the client reset its side
    assert answered in pair.server.requests  # the deadline is the request's arrival only
    _assert_connection_up(pair)


@pytest.mark.parametrize("how", ["reset", "bare FIN"])
def test_streams_ended_before_their_request_give_their_credit_back(how):
    """A RESET_STREAM before any of a request came (a cancel before it left), or a FIN on an empty stream, left
    the server's side open: the stream was never discarded, and after 128 of them the connection could open no
    more requests."""
    pair = _connected()
    quic = pair.client.quic
    ended = []
    for _ in range(150):  # past the 128 streams the server grants at first
        sid = quic.get_next_available_stream_id()
        if how == "reset":
            quic.reset_stream(sid, ErrorCode.CANCELLED)
        else:
            quic.send_stream_data(sid, b"", end_stream=True)
        ended.append(sid)
        pair.exchange(rounds=4)
    pair.exchange(rounds=100)
    assert not set(ended) & set(pair.server.quic._streams)  # both directions ended: aioquic discarded them
    assert not [e for e in pair.server_events if isinstance(e, RequestReceived | RequestRefused)]
    _assert_connection_up(pair)


# ------------------------------------------------------------------------------------------------ the daemon
@contextlib.asynccontextmanager
async def _daemon(**limits: Any) -> AsyncIterator[Daemon]:
    """The daemon in this process, on a loopback port of its own (the demo upstream); stopped after."""
    daemon = Daemon(parse_config({"server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": ""},
                                  "limits": limits}))
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


class _Raw(QuicConnectionProtocol):
    """A client on bare aioquic: writes what the test writes, keeps every event, ends nothing by itself."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[qe.QuicEvent] = []
        self.frames: dict[int, list] = {}  # what the server wrote on each stream, decoded
        self._decoders: dict[int, StreamDecoder] = {}

    def quic_event_received(self, event: qe.QuicEvent) -> None:
        self.events.append(event)
        if isinstance(event, qe.StreamDataReceived):
            decoder = self._decoders.setdefault(event.stream_id, StreamDecoder())
            self.frames.setdefault(event.stream_id, []).extend(decoder.feed(event.data))


def _raw(daemon: Daemon):
    return connect_quic("127.0.0.1", daemon.addresses[0][1], create_protocol=_Raw,
                        configuration=tls.client_configuration(verify=False))


def test_a_slow_request_is_refused_by_the_daemon_counted_and_logged_once(caplog):
    caplog.set_level(logging.WARNING, "tokenwire.daemon")

    async def go():
        async with _daemon(request_timeout_s=1) as daemon, _raw(daemon) as raw:
            quic = raw._quic
            for _ in range(3):  # each all but its last byte
                sid = quic.get_next_available_stream_id()
                quic.send_stream_data(sid, encode_stream_frame(_request("z" * 9000))[:-1])
            raw.transmit()
            started = time.monotonic()
            await until(lambda: value(daemon, "tokenwire_errors_total", {"code": "0x106"}) == 3, 10)
            waited = time.monotonic() - started
            await until(lambda: sum(isinstance(e, qe.StopSendingReceived) for e in raw.events) == 3, 5)
            return waited

    assert run(go(), 30) >= 0.9
    lines = [r.getMessage() for r in caplog.records if "refused a request" in r.getMessage()]
    assert len(lines) == 1 and "not complete within 1 s" in lines[0]


def test_finished_answers_still_streaming_count_against_the_memory_bound():
    """Oldest first, those no client streams before those still streaming: the latter's listeners hear of it."""
    store = TranscriptStore(max_bytes=10_000, retain_s=600)
    heard: list[int] = []
    answers = []
    for k in range(5):
        r = store.create("a", 1000, now=0)
        for _ in range(20):
            r.push("y" * 100, now=0)  # ~3.7 kB each
        r.finish("stop", now=k)
        store.mark_finished(r)
        if k < 4:  # streaming to a client that never ends its request
            r.listeners[k] = functools.partial(heard.append, k)
        answers.append(r)
    store.evict(now=5)  # a client still reading an answer finished seconds ago is left to finish it
    assert store.get(answers[4].request_id) is None  # the newest, but no client streams it: first to go
    assert heard == [] and store.memory_bytes > 10_000
    store.evict(now=4 + STREAMING_GRACE_S)  # the streaming ones, once they have had their grace
    assert store.memory_bytes <= 10_000
    assert heard == [0, 1] and [a.evicted for a in answers[:4]] == [True, True, False, False]
    assert store.get(answers[3].request_id) is not None


def test_the_daemon_keeps_finished_answers_within_transcript_memory_when_clients_never_end_them():
    """A client that read every token (QUIC acked it all) but never FINed its requests pinned 4.9 MB of finished
    answers against a 1 MiB transcript_memory_mb: answers streaming to a client were never evicted, and the
    connection held each answer's tokens too."""
    bound = 100_000  # (the store's bound, in bytes: a smaller one than transcript_memory_mb's 1 MiB least)

    async def go():
        async with _daemon() as daemon, _raw(daemon) as raw:
            quic = raw._quic
            sids = []
            for _ in range(6):  # ~39 kB each
                sids.append(quic.get_next_available_stream_id())
                request = Request(messages=[{"role": "user", "content": "x"}], scheme="stream",
                                  params={"rate": 10_000}, max_tokens=500)
                quic.send_stream_data(sids[-1], encode_stream_frame(request))
            raw.transmit()
            await until(lambda: daemon.store.finished_count == 6 and not daemon.answers.tasks, 20)
            await until(lambda: sum(isinstance(f, Finished) for fs in raw.frames.values() for f in fs) == 6, 10)
            assert daemon.store.memory_bytes > 2 * bound
            daemon.store.max_bytes = bound
            stream_of = {f.request_id: sid for sid in sids for f in raw.frames[sid] if isinstance(f, Started)}
            oldest_first = [stream_of[rid] for rid in daemon.store._finished]  # in finishing order
            held = [weakref.ref(r) for r in daemon.store._finished.values()]
            evicted = daemon.store.evict(time.monotonic() + STREAMING_GRACE_S)  # past their grace

            def ended_now() -> set[int]:
                return {sid for sid in sids if any(isinstance(f, Error) and f.code == ErrorCode.LIMIT_EXCEEDED
                                                   for f in raw.frames[sid])}

            await until(lambda: len(ended_now()) >= evicted, 10)  # each evicted answer's client has heard
            ended = ended_now()
            proto = next(iter(daemon.protocols))
            return (daemon.store.memory_bytes, ended, oldest_first, sum(r() is not None for r in held),
                    len(proto.attached), value(daemon, "tokenwire_errors_total", {"code": "0x106"}))

    memory, ended, oldest_first, alive, attached, counted = run(go(), 60)
    assert memory <= bound
    assert ended and ended == set(oldest_first[: len(ended)])  # the oldest went, each client's request ended
    assert alive == attached == 6 - len(ended) and counted == len(ended)  # let go: freed by refcounting


def test_a_closed_connection_is_freed_without_waiting_for_the_garbage_collector():
    """aioquic's QuicConnection was a reference cycle: a closed connection and its buffers waited for a full
    collection, which a daemon with a large heap runs seldom (housekeeping collected after connections ended, at
    most every GC_INTERVAL_S). Its cycles are broken at its end now (quic_io, _release_ended): refcounting frees it
    with no collection; the pacing of the collections still held for anything else's cycles is unchanged."""

    async def one_chat(daemon: Daemon) -> weakref.ref:
        async with connect("127.0.0.1", daemon.addresses[0][1], verify=False) as conn:
            await conn.chat("x", max_tokens=3).collect()
            ref = weakref.ref(next(iter(daemon.protocols))._quic)
        await until(lambda: not daemon.protocols, 10)
        return ref

    async def go():
        async with _daemon() as daemon:
            pacing = daemon.gc_pacing
            pacing.collected_at = time.monotonic() + 1000  # the housekeeping's passes collect nothing here
            first = await one_chat(daemon)
            assert first() is None  # freed at its end, no collection run
            now = time.monotonic()
            pacing.collected_at = now - gc_pacing.GC_INTERVAL_S
            pacing.collect_ended(now, len(daemon.protocols))
            assert pacing.collected_at == now  # a connection ended: collected
            await one_chat(daemon)
            pacing.collect_ended(now + 1, len(daemon.protocols))  # too soon after the last collection
            assert pacing.collected_at == now
            pacing.collect_ended(now + gc_pacing.GC_INTERVAL_S, len(daemon.protocols))
            # nothing ended since: no collection
            pacing.collect_ended(now + 3 * gc_pacing.GC_INTERVAL_S, len(daemon.protocols))
            return pacing.collected_at - now

    gc.disable()
    try:
        # ((now + 30) - now: not exactly 30 for every now)
        assert run(go(), 60) == pytest.approx(gc_pacing.GC_INTERVAL_S)
    finally:
        gc.enable()


def test_clients_refused_past_max_sessions_are_counted_by_reason_and_summed_up_in_the_log(caplog):
    """Each was a warning line (132 from one flood) and counted as an error sent (0x106), not as a refused
    handshake."""
    caplog.set_level(logging.WARNING, "tokenwire.daemon")

    async def refused(daemon: Daemon) -> int:
        async with connect("127.0.0.1", daemon.addresses[0][1], verify=False) as conn:
            with pytest.raises(RemoteError) as info:
                await conn.chat("x", max_tokens=3).collect()
        return info.value.code

    async def go():
        async with _daemon(max_sessions=1) as daemon:
            async with connect("127.0.0.1", daemon.addresses[0][1], verify=False) as first:
                await first.chat("x", max_tokens=3).collect()
                codes = [await refused(daemon) for _ in range(4)]
            logged_at = daemon.admission.session_refusals.logged_at
            daemon._log_refusals(logged_at + service.REFUSALS_LOG_S + FLUSH_SLACK_S)  # ("60 s")
            return (codes, value(daemon, "tokenwire_handshakes_refused_total", {"reason": "max_sessions"}),
                    value(daemon, "tokenwire_errors_total", {"code": "0x106"}))

    codes, refusals, errors = run(go(), 60)
    assert codes == [ErrorCode.LIMIT_EXCEEDED] * 4 and refusals == 4 and errors == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "tokenwire.daemon" and "refus" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("refusing connection from 127.0.0.1:") and "1 sessions open" in lines[0]
    assert lines[1].startswith("refused 3 more connections in the last 60 s")
