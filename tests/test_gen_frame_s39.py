"""GEN_TIMES (ALPN ``tokenwire/1+gt``): FINISHED without its generation times, which follow in a frame of their own.

With ~2 KB of times for 600 tokens, FINISHED made the packet of an answer's last tokens too big for the last send
slot of a slow path (EVDO), and those tokens left a second later. These tests hold the split to its rules: only
when both ends offer the ALPN (either older end still gets ``g`` in FINISHED), the times after every token, the
answer complete at FINISHED and the statistics at GEN_TIMES, and never a hang when GEN_TIMES does not come.
"""

from __future__ import annotations

import asyncio
import math

import pytest
from aioquic.buffer import Buffer
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import pull_quic_header

from tests.quicpair import Pair
from tokenwire.transport import client_session as cs
from tokenwire.transport.client import ChatStream
from tokenwire.transport.client_session import GEN_TIMES_WAIT_S, AnswerComplete, ClientSession
from tokenwire.transport.errors import ErrorCode, RemoteError
from tokenwire.transport.frames import (
    ALPN,
    ALPN_GEN_TIMES,
    CHAT_ALPNS,
    Finished,
    GenTimes,
    Request,
    decode_frame,
    encode_frame,
)
from tokenwire.transport.server_session import ServerSession
from tokenwire.transport.session_events import (
    ClientReport,
    ConnectionEnded,
    RequestCancelled,
    RequestCompleted,
    RequestFailed,
    RequestFinished,
    RequestReceived,
)
from tokenwire.transport.session_outcome import ChatOutcome
from tokenwire.transport.tls import client_configuration, dev_cert, server_configuration

TOKENS = 600  # FINISHED's g: ~2 KB


class AlpnPair(Pair):
    """The in-memory pair with each end's ALPN offer chosen (both ``CHAT_ALPNS`` by default); every frame the server
    writes is kept in ``sent``, in order."""

    def __init__(self, client_alpns=CHAT_ALPNS, server_alpns=CHAT_ALPNS) -> None:
        self.server_alpns = list(server_alpns)
        self.sent: list = []
        cfg = client_configuration(cadata=dev_cert().cert_pem, server_name="localhost")
        cfg.alpn_protocols = list(client_alpns)
        self.client = ClientSession(QuicConnection(configuration=cfg))
        self.server = None
        self.now = 0.0
        self.client_events = []
        self.server_events = []
        self.down_batches = []
        self.client.quic.connect(("10.0.0.1", 4433), now=self.now)

    def _server_for(self, data: bytes) -> ServerSession:
        if self.server is None:
            header = pull_quic_header(Buffer(data=data), host_cid_length=8)
            config = server_configuration()
            config.alpn_protocols = self.server_alpns
            quic = QuicConnection(configuration=config, original_destination_connection_id=header.destination_cid)
            self.server = ServerSession(quic)
            send = self.server._send

            def keep(stream_id, frame, end=False):
                self.sent.append(frame)
                send(stream_id, frame, end)

            self.server._send = keep  # type: ignore[method-assign]
        return self.server

    def answer(self, n: int = TOKENS, *, scheme: str = "chatterbox", finish_after: bool = True) -> int:
        """Open a request, accept it, push ``n`` tokens and (``finish_after``) finish; returns its stream id."""
        self.exchange(rounds=20)
        sid = self.client.start_request(Request(messages=[{"role": "user", "content": "hi"}], scheme=scheme),
                                        self.now)
        self.exchange(rounds=5)
        assert any(isinstance(e, RequestReceived) for e in self.server_events)
        self.server.accept(sid)
        for i in range(n):
            self.server.push(sid, f"w{i} ", self.now + i * 1e-3)
        if finish_after:
            self.server.finish(sid)
        return sid

    def of(self, kind) -> list:
        return [e for e in self.client_events if isinstance(e, kind)]


def _finished_frames(pair: AlpnPair) -> list[Finished]:
    return [f for f in pair.sent if isinstance(f, Finished)]


def test_both_ends_new_finished_goes_without_times_and_gen_times_follows_it() -> None:
    pair = AlpnPair()
    sid = pair.answer()
    assert pair.server.quic.tls.alpn_negotiated == ALPN_GEN_TIMES
    (fin,) = _finished_frames(pair)
    assert fin.gen_us is None and fin.first_gen_us is not None  # small: n, d, fr, t0
    assert len(encode_frame(fin)) < 80
    assert not any(isinstance(f, GenTimes) for f in pair.sent)  # not with FINISHED: it follows the tokens
    pair.exchange(rounds=200)
    times = [f for f in pair.sent if isinstance(f, GenTimes)]
    assert len(times) == 1 and len(times[0].gen_us) == TOKENS
    assert pair.sent.index(times[0]) > pair.sent.index(fin)
    (answered,) = pair.of(AnswerComplete)
    (done,) = pair.of(RequestFinished)
    assert pair.client_events.index(answered) < pair.client_events.index(done)
    assert answered.result.digest_ok and answered.result.gen_offsets is None and answered.stream_id == sid
    assert done.result.gen_offsets is not None and len(done.result.gen_offsets) == TOKENS
    assert done.result.gen_offsets[-1] == pytest.approx((TOKENS - 1) * 1e-3, abs=1e-5)
    assert not pair.of(RequestFailed)


def test_the_packet_that_carries_finished_stays_small() -> None:
    """The point of the split: FINISHED (and what rides with it) no longer adds ~2 KB of times to the packets of the
    answer's last tokens: the flight with the last token and FINISHED was 1,970 bytes, now 132."""
    pair = AlpnPair()
    sid = pair.answer(TOKENS - 1, finish_after=False)
    pair.exchange(rounds=200)
    assert pair.client.requests[sid].receiver.next_index == TOKENS - 1
    pair.server.push(sid, "last", pair.now)
    pair.server.finish(sid)
    flight = pair.server.datagrams_to_send(pair.now)  # the last token and FINISHED
    assert any(isinstance(f, Finished) for f in pair.sent)
    assert 0 < sum(len(d) for d, _ in flight) < 600


@pytest.mark.parametrize("scheme", ["stream", "duplicate"])
def test_every_scheme_gets_its_times_after_finished(scheme) -> None:
    pair = AlpnPair()
    pair.answer(50, scheme=scheme)
    pair.exchange(rounds=200)
    (done,) = pair.of(RequestFinished)
    assert done.result.digest_ok and len(done.result.gen_offsets) == 50
    assert [type(f).__name__ for f in pair.sent if f.__class__.__name__ != "Tokens"][-2:] == ["Finished",
                                                                                                  "GenTimes"]


@pytest.mark.parametrize(("client_alpns", "server_alpns"), [
    ((ALPN,), CHAT_ALPNS),   # an older client: it closes the connection on a frame type it does not know
    (CHAT_ALPNS, (ALPN,)),   # an older server: FINISHED carries g as ever
])
def test_an_older_end_on_either_side_gets_the_times_in_finished(client_alpns, server_alpns) -> None:
    pair = AlpnPair(client_alpns, server_alpns)
    pair.answer()
    pair.exchange(rounds=200)
    assert pair.server.quic.tls.alpn_negotiated == ALPN
    (fin,) = _finished_frames(pair)
    assert fin.gen_us is not None and len(fin.gen_us) == TOKENS
    assert not any(isinstance(f, GenTimes) for f in pair.sent)
    assert not pair.of(AnswerComplete)
    (done,) = pair.of(RequestFinished)
    assert len(done.result.gen_offsets) == TOKENS


def _without_gen_times(pair: AlpnPair) -> None:
    pair._server_for(b"")  # (made by the handshake's first datagram already)
    pair.server._send_gen_times = lambda: None  # type: ignore[method-assign]  # a server that never sends it


def test_gen_times_that_never_come_end_the_statistics_after_the_wait_without_them() -> None:
    pair = AlpnPair()
    sid = _answered_without_gen_times(pair)
    (answered,) = pair.of(AnswerComplete)
    assert sid in pair.client.requests  # open: keepalive pings go on, the stream is not ended yet
    pair.exchange(rounds=400, dt=0.05, quiet_after=GEN_TIMES_WAIT_S + 5)
    (done,) = pair.of(RequestFinished)
    assert done.result is answered.result and done.result.gen_offsets is None and done.result.digest_ok
    assert sid not in pair.client.requests
    assert not pair.of(RequestFailed)


def test_a_connection_that_closes_before_gen_times_ends_the_statistics_without_them_not_as_a_failure() -> None:
    pair = AlpnPair()
    _answered_without_gen_times(pair)
    pair.server.close(ErrorCode.SHUTTING_DOWN, "bye")
    pair.exchange(rounds=50)
    (done,) = pair.of(RequestFinished)
    assert done.result.gen_offsets is None and done.result.digest_ok
    assert not pair.of(RequestFailed)
    assert pair.of(ConnectionEnded)


def test_a_stream_end_before_gen_times_ends_the_statistics_without_them() -> None:
    pair = AlpnPair()
    sid = _answered_without_gen_times(pair)
    # the server's FIN (no well-behaved server sends it first: it answers the client's)
    events = pair.client._on_stream_data(sid, b"", True, pair.now)
    (done,) = [e for e in events if isinstance(e, RequestFinished)]
    assert done.result.gen_offsets is None and not [e for e in events if isinstance(e, RequestFailed)]


@pytest.mark.parametrize(("frame", "why"), [
    (GenTimes([0] * 40), "no reason to send"),  # before FINISHED
])
def test_gen_times_before_finished_closes_the_connection_malformed(frame, why) -> None:
    pair = AlpnPair()
    sid = pair.answer(40, finish_after=False)
    pair.server._send(sid, frame)
    pair.exchange(rounds=100, quiet_after=0.5)  # (not into GEN_TIMES_WAIT_S)
    (ended,) = pair.of(ConnectionEnded)
    assert ended.error_code == ErrorCode.MALFORMED_FRAME and why in ended.reason


@pytest.mark.parametrize(("client_alpns", "count", "why"), [
    (CHAT_ALPNS, 39, "39 generation times for 40 tokens"),
    ((ALPN,), 40, "no reason to send"),  # after a FINISHED with g: an older server's, or without the ALPN
])
def test_a_gen_times_the_client_cannot_take_closes_the_connection_malformed(client_alpns, count, why) -> None:
    pair = AlpnPair(client_alpns)
    pair.exchange(rounds=20)
    _without_gen_times(pair)
    sid = pair.answer(40)
    pair.server._send(sid, GenTimes([0] * count))  # right behind FINISHED (an older client's FIN ends the stream)
    pair.exchange(rounds=100, quiet_after=0.5)  # (not into GEN_TIMES_WAIT_S)
    (ended,) = pair.of(ConnectionEnded)
    assert ended.error_code == ErrorCode.MALFORMED_FRAME and why in ended.reason


def _outcome(gen: list[float] | None) -> ChatOutcome:
    return ChatOutcome(tokens=[b"h\xc3", b"\xa9"], first_index=0, total=2, digest_ok=True, scheme="chatterbox",
                       request_id=bytes(16), finish_reason="stop", request_time=0.0, render_times=[0.1, 0.2],
                       gen_offsets=gen, packets=2, duplicate_tokens=0, repairs_requested=0)


def test_the_sdk_stream_ends_once_the_statistics_are_complete() -> None:
    asyncio.run(_ends_once_the_statistics_are_complete())


async def _ends_once_the_statistics_are_complete() -> None:
    """A reader of ``stats`` after ``async for`` (the README's example, chat_sync) gets a stall ratio: the text is
    whole at AnswerComplete, the iteration ends with GEN_TIMES."""
    s = ChatStream(None, Request(messages=[{"role": "user", "content": "x"}]), [])  # type: ignore[arg-type]
    s._tokens([b"h\xc3"])
    s._answered(_outcome(None))
    s._tokens([])  # (nothing more comes)
    assert s.answered and s.text == "h\ufffd" and s.stats is None  # whole (its bytes end mid code point)
    assert await s.__anext__() == "h"
    assert await s.__anext__() == "\ufffd"  # the decoder's tail, at AnswerComplete
    s._finished(_outcome([0.0, 0.1]))
    assert await s.collect() == "h\ufffd"
    assert s.stats is not None and not math.isnan(s.stats.stall_ratio)


def test_the_sdk_stream_whose_connection_fails_after_the_answer_ends_with_statistics_not_an_error() -> None:
    asyncio.run(_fails_after_the_answer())


async def _fails_after_the_answer() -> None:
    s = ChatStream(None, Request(messages=[{"role": "user", "content": "x"}]), [])  # type: ignore[arg-type]
    s._tokens([b"ok"])
    s._answered(_outcome(None))
    s._failed(RemoteError("connection closed", code=ErrorCode.SHUTTING_DOWN))
    assert await s.collect() == "ok"
    assert s.stats is not None and s.stats.digest_verified and math.isnan(s.stats.stall_ratio)


def test_the_sim_runs_in_the_new_mode() -> None:
    """``tokenwire sim`` (and ``testbed compare`` through it) offers the ALPN on both ends."""
    from tokenwire.testbed import sim

    sent: list = []
    orig = ServerSession._send

    def keep(self, stream_id, frame, end=False):
        sent.append(frame)
        orig(self, stream_id, frame, end)

    ServerSession._send = keep  # type: ignore[method-assign]
    try:
        run = sim.run_scheme("chatterbox", sim.SimConfig(tokens=60, delay_ms=20, seed=0))
    finally:
        ServerSession._send = orig  # type: ignore[method-assign]
    assert run.digest_ok
    (fin,) = [f for f in sent if isinstance(f, Finished)]
    assert fin.gen_us is None
    # the run goes on for the times that follow the answer: its bytes per token count them, as they counted FINISHED's
    assert any(isinstance(f, GenTimes) for f in sent[sent.index(fin):])


def test_gen_times_round_trips_and_checks_its_field() -> None:
    frame = GenTimes([0, 5, 7])
    assert decode_frame(encode_frame(frame)) == frame
    assert cs.GEN_TIMES_WAIT_S > 1.0  # (a slow path's ~2 KB take a second)


# -- an answer that is whole before its GEN_TIMES came stays whole when it is cancelled or its connection closed --

def _answered_without_gen_times(pair: AlpnPair) -> int:
    pair.exchange(rounds=20)
    _without_gen_times(pair)
    sid = pair.answer(40)
    pair.exchange(rounds=100, quiet_after=0.5)  # (not into GEN_TIMES_WAIT_S)
    assert pair.of(AnswerComplete) and not pair.of(RequestFinished)
    return sid


def _server_saw(pair: AlpnPair, sid: int) -> tuple[list[ClientReport], list[type]]:
    reports = [e for e in pair.server_events if isinstance(e, ClientReport) and e.stream_id == sid]
    ends = [type(e) for e in pair.server_events
            if isinstance(e, RequestCompleted | RequestCancelled) and e.stream_id == sid]
    return reports, ends


def test_a_cancel_after_the_answer_is_whole_sends_its_report_and_keeps_it_whole() -> None:
    """The REPORT left with FINISHED before GEN_TIMES; a cancel between the two (the SDK's ``async with`` left
    after the last delta) ended the request with a bare FIN, and the daemon's client stall/TTFT metrics skipped it."""
    pair = AlpnPair()
    sid = _answered_without_gen_times(pair)
    outcome = pair.client.cancel(sid)
    assert outcome is not None and outcome.finish_reason != "cancelled" and outcome.digest_ok
    assert outcome.gen_offsets is None and outcome.total == 40
    assert sid not in pair.client.requests
    pair.exchange(rounds=50, quiet_after=0.5)
    reports, ends = _server_saw(pair, sid)
    assert len(reports) == 1 and reports[0].report.ttft_ms is not None and reports[0].report.stall_ratio is None
    assert ends == [RequestCompleted]


def test_closing_the_connection_after_the_answer_is_whole_sends_its_report_first() -> None:
    pair = AlpnPair()
    sid = _answered_without_gen_times(pair)
    assert pair.client.abandon_open() == [sid]
    assert sid not in pair.client.requests
    pair.exchange(rounds=50, quiet_after=0.5)
    reports, ends = _server_saw(pair, sid)
    assert len(reports) == 1 and reports[0].report.ttft_ms is not None
    assert ends == [RequestCompleted]


class _FakeSession:
    def __init__(self, outcome: ChatOutcome) -> None:
        self.outcome = outcome
        self.cancelled: list[int] = []

    def cancel(self, stream_id: int) -> ChatOutcome:
        self.cancelled.append(stream_id)
        return self.outcome


class _FakeProtocol:
    def __init__(self, session: _FakeSession) -> None:
        self.streams: dict[int, ChatStream] = {}
        self.client_session = session

    def transmit(self) -> None:
        pass


class _FakeConnection:
    def __init__(self, protocol: _FakeProtocol) -> None:
        self._protocol = protocol


def test_the_sdk_streams_cancel_after_the_last_delta_keeps_the_answer_whole() -> None:
    asyncio.run(_cancel_after_the_last_delta())


async def _cancel_after_the_last_delta() -> None:
    """``cancel()`` (``async with`` left) between the last delta and the statistics: the answer ended as a
    cancellation, and the deltas not read yet were thrown away though the text was whole."""
    whole = _outcome(None)
    proto = _FakeProtocol(_FakeSession(whole))
    s = ChatStream(_FakeConnection(proto), Request(messages=[{"role": "user", "content": "x"}]), [])  # type: ignore[arg-type]
    s.stream_id = 4
    proto.streams[4] = s
    s._tokens([b"ok "])
    s._answered(whole)
    await s.cancel()
    assert proto.client_session.cancelled == [4] and 4 not in proto.streams
    assert [d async for d in s] == ["ok "]  # read after the cancel, as a whole answer's would be
    assert s.stats is not None and s.stats.finish_reason == "stop" and s.stats.digest_verified
    assert math.isnan(s.stats.stall_ratio)  # (no generation times)
    await s.cancel()  # a no-op now
    assert proto.client_session.cancelled == [4]


# -- `tokenwire chat`: --max-time or Ctrl-C between the last text and GEN_TIMES leave a whole answer --

@pytest.fixture
def silent_times_server(monkeypatch, tmp_path):
    """A server (``tokenwire/1+gt``) that never sends GEN_TIMES: the chat client's answer is whole and its
    statistics wait (GEN_TIMES_WAIT_S), as they do for a round trip after every answer. Yields (port, cafile)."""
    import threading

    from tests.test_chat_cli import closed, stop_loop_thread
    from tests.test_loopback import word_source
    from tokenwire.transport.server import serve

    monkeypatch.setattr(ServerSession, "_send_gen_times", lambda self: None)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(serve(word_source, host="127.0.0.1", port=0), loop).result(30)
    ca = tmp_path / "dev.pem"
    ca.write_bytes(dev_cert().cert_pem)
    try:
        yield server.port, ca
    finally:
        stop_loop_thread(loop, thread, lambda: closed(server))


def _whole_text(n: int) -> str:
    from tests.test_loopback import WORDS

    return "".join(WORDS[:n]) + "\n"


def test_max_time_after_the_whole_answer_is_a_whole_answer(silent_times_server, capsys) -> None:
    """`--max-time` running out between the last text and the statistics said "no whole answer" (exit 2) after
    printing the whole, digest-checked answer."""
    from tokenwire.daemon.cli import main

    port, ca = silent_times_server
    rc = main(["chat", "--port", str(port), "--cafile", str(ca), "--server-name", "localhost", "--max-tokens", "30",
               "--max-time", "2", "--stats", "hi"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out == _whole_text(30)
    assert "no whole answer" not in err and "request id" in err, err  # --stats: its statistics line


def test_ctrl_c_after_the_whole_answer_is_a_whole_answer(silent_times_server, capsys, monkeypatch) -> None:
    """Ctrl-C between the last text and the statistics said "interrupted" (exit 130) after the whole answer.

    SIGINT's handler is Python's default here, as in a terminal's `tokenwire chat`: an earlier test of the run can
    leave it ignored, and the chat then leaves SIGINT alone (as `nohup` asks): the os.kill below was dropped, and
    the chat passed after waiting out GEN_TIMES_WAIT_S (10 s) with no Ctrl-C taken."""
    import os
    import signal
    import time

    from tokenwire.daemon.cli import main

    answered = ChatStream._answered

    def then_ctrl_c(self, outcome):
        answered(self, outcome)
        os.kill(os.getpid(), signal.SIGINT)  # (the loop's handler takes it: the chat's task is cancelled)

    monkeypatch.setattr(ChatStream, "_answered", then_ctrl_c)
    port, ca = silent_times_server
    taken = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.getsignal(sig) for sig in taken}
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        t0 = time.monotonic()
        rc = main(["chat", "--port", str(port), "--cafile", str(ca), "--server-name", "localhost", "--max-tokens",
                   "30", "--stats", "hi"])
        took = time.monotonic() - t0
    finally:
        for sig in taken:  # (an interrupted chat leaves them ignored for the process's end: not this one's)
            signal.signal(sig, previous[sig])
    out, err = capsys.readouterr()
    assert took < GEN_TIMES_WAIT_S, took  # the Ctrl-C was taken: not the statistics' wait for GEN_TIMES run out
    assert rc == 0, err
    assert out == _whole_text(30)
    assert "interrupted" not in err and "request id" in err, err


def test_gen_times_leaves_right_after_finished_not_a_round_trip_later() -> None:
    """It waited for the client to acknowledge every token: the statistics, and the SDK's loop, ended a round trip
    and the client's ACK hold after the answer (loopback 118 -> 162 ms). Now only a repair or repeat that waits to
    leave right then goes ahead of it (here none: the sender's idle repair is not due within 3 ms)."""
    pair = AlpnPair()
    sid = pair.answer(20)
    req = pair.server.requests[sid]
    for _ in range(3):  # the tokens and FINISHED leave; nothing reaches the client, nothing is acknowledged
        pair.now += 0.001
        pair.server.datagrams_to_send(pair.now)
    assert _finished_frames(pair) and req.sender is not None
    (times,) = [f for f in pair.sent if isinstance(f, GenTimes)]
    assert len(times.gen_us) == 20 and req.sender.floor < 20  # before the client acknowledged its tokens
    assert pair.sent.index(times) > pair.sent.index(_finished_frames(pair)[0])
