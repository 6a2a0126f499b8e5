"""A client that opens a stream past the request limit (QUIC's stream limit, which the server offers) is closed by
aioquic itself with STREAM_LIMIT_ERROR: the daemon logged only aioquic's line (no peer, no limit), counted it in
no metric, and counted the answers already started on that connection "lost", generating them for a resume until
limits.orphan_timeout_s. Any transport error aioquic closes a connection with for a client's packets follows the
same rule now, as the session's own closes for a protocol error do (sans-I/O on the in-memory pair; then the
daemon, against a client on bare aioquic)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aioquic.asyncio import connect as aioquic_connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.events import ConnectionTerminated as QuicConnectionTerminated
from aioquic.quic.events import QuicEvent
from aioquic.quic.packet import QuicErrorCode

from tokenwire.daemon.service import Daemon
from tokenwire.daemon.telemetry import QUIC_ERROR_CODES_SENT, REQUEST_OUTCOMES, Metrics, transport_error_label
from tokenwire.transport import tls
from tokenwire.transport.frames import SCHEMES, Request, encode_stream_frame
from tokenwire.transport.handshake_guard import REFUSALS_LOG_S
from tokenwire.transport.server_session import ServerSession
from tokenwire.transport.session_events import ConnectionEnded, RequestCancelled, RequestReceived

from .quicpair import Pair
from .test_handshake_limits import until, value
from .test_loopback import run
from .test_observability_fixes2 import serving
from .test_session_refusals import _connected, _request

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
TOKEN = "stream-limit-token"
AUTH = {"tokens": [{"name": "a", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}]}
LIMIT = 4  # limits.max_requests_per_connection of the daemon tests
FLUSH_SLACK_S = 0.25  # (see test_hostile_clients)


def _past_the_stream_limit(pair: Pair) -> None:
    """The client's QUIC stack told it may open any number of streams: one request stream each past what is open
    (the server offered ``max_requests``), one byte each."""
    quic = pair.client.quic
    assert pair.server is not None
    quic._remote_max_streams_bidi = 10_000
    for _ in range(pair.server.max_requests):
        quic.send_stream_data(quic.get_next_available_stream_id(), b"\x00")


def _with_an_answer() -> tuple[Pair, int]:
    """A connected pair with one answer started and streaming."""
    pair = _connected()
    sid = pair.client.start_request(_request(), pair.now)
    pair.exchange(rounds=40)
    assert pair.server is not None
    pair.server.accept(sid)
    pair.server.push(sid, "a b c", pair.now)
    pair.exchange(rounds=20)
    return pair, sid


# ------------------------------------------------------------------------------------------------ sans-I/O
def test_a_stream_past_the_limit_is_the_sessions_close_for_the_clients_fault():
    """aioquic closes it on its own: the session notes it after the datagram, reports the end as its own close
    (``by_peer`` False, as for a malformed frame) with the code's name and the limit, and the started answer
    ends cancelled, not lost (nothing to resume for a client that broke the protocol)."""
    pair, sid = _with_an_answer()
    seen = len(pair.server_events)
    _past_the_stream_limit(pair)
    pair.exchange(rounds=400, quiet_after=60)
    server = pair.server
    assert server is not None and server.transport_error is not None
    assert server.transport_error.transport_code == QuicErrorCode.STREAM_LIMIT_ERROR
    events = pair.server_events[seen:]
    assert not [e for e in events if isinstance(e, RequestReceived)], events  # what came with it is not used
    (end,) = [e for e in events if isinstance(e, ConnectionEnded)]
    assert (end.error_code, end.by_peer) == (QuicErrorCode.STREAM_LIMIT_ERROR, False)
    assert end.reason.startswith("QUIC STREAM_LIMIT_ERROR (0x4): ")
    assert ("the client opened a stream past its stream limit, 64 request streams at once (the server's "
            "max_requests_per_connection)") in end.reason, end.reason
    assert [(e.stream_id, e.lost) for e in events if isinstance(e, RequestCancelled)] == [(sid, False)]


def test_any_transport_error_of_the_clients_packets_follows_the_same_rule():
    """One rule for every transport error aioquic raises for what the client sent: a HANDSHAKE_DONE frame from a
    client is PROTOCOL_VIOLATION."""
    pair, sid = _with_an_answer()
    pair.client.quic._handshake_done_pending = True  # (a client's QUIC stack never sends one)
    pair.exchange(rounds=400, quiet_after=60)
    ends = [e for e in pair.server_events if isinstance(e, ConnectionEnded)]
    assert [(e.error_code, e.by_peer) for e in ends] == [(QuicErrorCode.PROTOCOL_VIOLATION, False)]
    assert "PROTOCOL_VIOLATION (0xa)" in ends[0].reason and "HANDSHAKE_DONE" in ends[0].reason
    assert [(e.stream_id, e.lost) for e in pair.server_events if isinstance(e, RequestCancelled)] == [(sid, False)]


def test_a_protocol_error_of_tokenwires_own_ends_the_started_answers_cancelled_too():
    """The session's own close for a protocol violation (here a datagram that is not an ack) reported the started
    answers "lost", as a cut path: the same rule as aioquic's closes."""
    pair, sid = _with_an_answer()
    pair.client.quic.send_datagram_frame(b"\x7f not an ack")
    pair.exchange(rounds=400, quiet_after=60)
    ends = [e for e in pair.server_events if isinstance(e, ConnectionEnded)]
    assert len(ends) == 1 and not ends[0].by_peer and pair.server is not None
    assert pair.server.transport_error is None  # (tokenwire's, not QUIC's)
    assert [(e.stream_id, e.lost) for e in pair.server_events if isinstance(e, RequestCancelled)] == [(sid, False)]


def test_a_peer_close_and_the_idle_timeout_are_not_a_transport_error():
    """The client's own close, and a connection gone quiet, are no violation: its answer is lost (resumable)."""
    pair, sid = _with_an_answer()
    pair.client.close(0, "bye")
    pair.exchange(rounds=400, quiet_after=60)
    assert pair.server is not None and pair.server.transport_error is None
    assert [(e.stream_id, e.lost) for e in pair.server_events if isinstance(e, RequestCancelled)] == [(sid, True)]
    ends = [e for e in pair.server_events if isinstance(e, ConnectionEnded)]
    assert [e.by_peer for e in ends] == [True]


def test_the_clients_own_transport_close_is_not_taken_for_one_of_aioquics():
    """A client may close with a transport code and a frame type itself (its stack found fault with us): aioquic
    then holds the client's close event, not a pending close of its own, and the answer stays lost (resumable),
    uncounted as a violation. (Without the pending-close guard this was counted quic:0xa and cancelled.)"""
    pair, sid = _with_an_answer()
    pair.client.quic.close(error_code=QuicErrorCode.PROTOCOL_VIOLATION, frame_type=0x8, reason_phrase="our own")
    pair.exchange(rounds=400, quiet_after=60)
    assert pair.server is not None and pair.server.transport_error is None
    assert [(e.stream_id, e.lost) for e in pair.server_events if isinstance(e, RequestCancelled)] == [(sid, True)]
    assert [e.by_peer for e in pair.server_events if isinstance(e, ConnectionEnded)] == [True]


def test_a_close_aioquic_makes_during_the_handshake_is_left_to_the_handshake_guard():
    """During the handshake the guard counts a failure as a failed handshake (docs/metrics.md): the session takes
    aioquic's pending close for a transport error only once the handshake is complete."""
    pair, _ = _with_an_answer()
    server = pair.server
    assert server is not None
    quic = server.quic
    quic._close_event = QuicConnectionTerminated(
        error_code=QuicErrorCode.PROTOCOL_VIOLATION, frame_type=0x8, reason_phrase="bad frame")
    quic._close_pending = True
    quic._handshake_complete = False
    server._note_transport_close()
    assert server.transport_error is None
    quic._handshake_complete = True  # (the same close after the handshake is one)
    server._note_transport_close()
    assert server.transport_error is not None
    assert server.transport_error.transport_code == QuicErrorCode.PROTOCOL_VIOLATION


class _HeldPair(Pair):
    """A pair whose server holds its client to fewer request streams until it authorizes, as the daemon does
    with auth tokens (ReadCredit.hold_until_authorized)."""

    def _server_for(self, data: bytes) -> ServerSession:
        fresh = self.server is None
        server = super()._server_for(data)
        if fresh:
            server.quic.hold_until_authorized(1 << 20)  # type: ignore[attr-defined]
        return server


def test_the_close_names_the_limit_the_client_was_told_before_it_authorized():
    pair = _HeldPair()
    pair.exchange(rounds=40)
    assert pair.server is not None
    _past_the_stream_limit(pair)
    pair.exchange(rounds=400, quiet_after=60)
    (end,) = [e for e in pair.server_events if isinstance(e, ConnectionEnded)]
    assert ("a stream past its stream limit, 2 request streams at once before its first authorized request (the "
            "server's max_requests_per_connection: 64 after it)") in end.reason, end.reason


# ------------------------------------------------------------------------------------------------ the daemon
class _Mute(QuicConnectionProtocol):
    """Reads nothing: aioquic's protocol makes a stream writer for a stream it hears of, and that writer, dropped,
    FINs the stream (a client's cancel of the answer this test keeps streaming)."""

    def quic_event_received(self, event: QuicEvent) -> None:
        pass


@contextlib.asynccontextmanager
async def bare(port: int) -> AsyncIterator[QuicConnectionProtocol]:
    """A bare aioquic client of the chat port: it writes what it likes on its streams."""
    cfg = tls.client_configuration(verify=False)
    async with aioquic_connect("127.0.0.1", port, configuration=cfg, create_protocol=_Mute) as client:
        yield client


async def _one_stream_too_many(daemon: Daemon, port: int, *, answer: bool) -> None:
    """A client that opens one request stream past its limit (with an answer streaming first, if ``answer``);
    returns once the daemon has let go of its connection."""
    started = sum(value(daemon, "tokenwire_requests_total", {"scheme": s}) for s in SCHEMES)
    async with bare(port) as client:
        quic = client._quic
        assert quic._remote_max_streams_bidi == 2  # (what the daemon offers until the first authorized request)
        opened = 0
        if answer:
            request = Request(messages=[{"role": "user", "content": "x"}], max_tokens=5000, auth=TOKEN,
                              params={"rate": 20})
            quic.send_stream_data(quic.get_next_available_stream_id(), encode_stream_frame(request))
            client.transmit()
            opened = 1
            await until(lambda: sum(value(daemon, "tokenwire_requests_total", {"scheme": s})
                                    for s in SCHEMES) == started + 1)
            await until(lambda: quic._remote_max_streams_bidi == LIMIT)  # authorized: the whole limit
        offered = quic._remote_max_streams_bidi
        quic._remote_max_streams_bidi = 10_000  # its QUIC stack no longer holds the next one back
        for _ in range(offered + 1 - opened):
            quic.send_stream_data(quic.get_next_available_stream_id(), b"\x00")
        client.transmit()
        await asyncio.wait_for(client.wait_closed(), 10)
        assert quic._close_event is not None and quic._close_event.error_code == QuicErrorCode.STREAM_LIMIT_ERROR
    await until(lambda: not daemon.protocols, 15)


def test_the_daemon_counts_and_logs_a_stream_past_the_limit_and_cancels_its_answers(caplog):
    async def go() -> tuple[dict[str, float], float, float, int, int, float]:
        async with serving(auth=AUTH, limits={"max_requests_per_connection": LIMIT}) as (daemon, port):
            await _one_stream_too_many(daemon, port, answer=True)
            await _one_stream_too_many(daemon, port, answer=False)  # counted, not logged again
            ended = {o: value(daemon, "tokenwire_requests_ended_total", {"outcome": o}) for o in REQUEST_OUTCOMES}
            generating, orphaned = len(daemon.answers.tasks), len(daemon.answers.orphaned)
            daemon._log_refusals(daemon._protocol_closes.logged_at + REFUSALS_LOG_S + FLUSH_SLACK_S)
            return (ended, value(daemon, "tokenwire_errors_total", {"code": "quic:0x4"}),
                    value(daemon, "tokenwire_errors_total", {"code": "0x4"}), generating, orphaned,
                    value(daemon, "tokenwire_sessions_open"))

    with caplog.at_level(logging.INFO, logger="tokenwire.daemon"):
        ended, counted, bare_code, generating, orphaned, sessions = run(go(), 60)
    assert counted == 2 and bare_code == 0  # under its transport label, once each
    # the answer ended cancelled (its generation stopped), not lost and left generating for a resume
    assert ended == {"completed": 0, "cancelled": 1, "lost": 0, "failed": 0, "refused": 0}, ended
    assert (generating, orphaned, sessions) == (0, 0, 0)
    warned = [r for r in caplog.records if r.getMessage().startswith("closed connection from 127.0.0.1:")]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING, [r.getMessage() for r in warned]
    assert ("QUIC STREAM_LIMIT_ERROR (0x4): Too many streams open (a STREAM frame); the client opened a stream "
            f"past its stream limit, {LIMIT} request streams at once (limits.max_requests_per_connection)"
            in warned[0].getMessage()), warned[0].getMessage()
    summary = [r.getMessage() for r in caplog.records if "more connections for protocol errors" in r.getMessage()]
    assert summary and summary[0].startswith("closed 1 more connections for protocol errors"), summary


def test_the_transport_error_series_exist_at_zero_and_are_documented():
    text = Metrics().exposition().decode()
    for label in QUIC_ERROR_CODES_SENT:
        assert f'tokenwire_errors_total{{code="{label}"}} 0.0' in text, label
    assert transport_error_label(QuicErrorCode.STREAM_LIMIT_ERROR) == "quic:0x4"
    assert "quic:0x4" in QUIC_ERROR_CODES_SENT and "quic:0x8" not in QUIC_ERROR_CODES_SENT
    errors_row = next(line for line in DOC.read_text().splitlines() if line.startswith("| `tokenwire_errors_total`"))
    assert "`quic:0x4`" in errors_row and "STREAM_LIMIT_ERROR" in errors_row
    doc = " ".join(DOC.read_text().split())
    assert "or a protocol violation that closed its connection" in doc
