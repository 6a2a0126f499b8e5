"""Authorization and session admission under hostile clients: nothing starts on a connection that its handshake's
checks (or a wrong token) closed; an unauthorized connection makes the daemon hold little; clients that never
authorize cannot keep token holders out; refusals of unauthorized clients do not flood the log."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aioquic.asyncio import connect as aioquic_connect
from aioquic.quic import events as qe
from aioquic.quic.connection import QuicConnection

from tokenwire.daemon import service
from tokenwire.daemon.config import parse_config
from tokenwire.daemon.service import Daemon
from tokenwire.transport import tls
from tokenwire.transport.client import connect
from tokenwire.transport.errors import ErrorCode, RemoteError
from tokenwire.transport.frames import Request, encode_stream_frame
from tokenwire.transport.read_credit import ReadCredit
from tokenwire.transport.server_session import ServerSession
from tokenwire.transport.session_events import RequestReceived

from .quicpair import Pair
from .test_handshake_limits import until, value
from .test_hostile_clients import FLUSH_SLACK_S, _Raw, _raw
from .test_loopback import run

ALICE = "alice-token-for-tests"
MAX_REQUEST = 64 << 10  # limits.max_request_bytes in the credit tests: the hold is 2 of them


def _request(text: str = "x", auth: str | None = None) -> Request:
    return Request(messages=[{"role": "user", "content": text}], auth=auth)


@contextlib.asynccontextmanager
async def _daemon(*, tokens: bool = False, server: dict[str, Any] | None = None,
                  **limits: Any) -> AsyncIterator[Daemon]:
    """The daemon in this process on a loopback port of its own (the demo upstream), with alice's token if
    ``tokens``; stopped after."""
    cfg: dict[str, Any] = {"server": {"listen": ["127.0.0.1:0"], **(server or {})}, "metrics": {"listen": ""},
                           "limits": limits}
    if tokens:
        cfg["auth"] = {"tokens": [{"name": "alice", "sha256": hashlib.sha256(ALICE.encode()).hexdigest()}]}
    daemon = Daemon(parse_config(cfg))
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


async def _requests_with_finished(daemon: Daemon, requests: list[Request], **client: Any) -> _Raw:
    """A bare aioquic client whose requests leave in the same flight as its handshake's Finished (queued before the
    handshake completed); returns once the server has closed the connection (it read them all before)."""
    cfg = tls.client_configuration(verify=False, **client)
    async with aioquic_connect("127.0.0.1", daemon.addresses[0][1], configuration=cfg, create_protocol=_Raw,
                               wait_connected=False) as raw:
        assert isinstance(raw, _Raw)
        quic = raw._quic
        for request in requests:
            quic.send_stream_data(quic.get_next_available_stream_id(), encode_stream_frame(request))
        raw.transmit()
        await asyncio.wait_for(raw.wait_closed(), 10)
    return raw


def _closed_with(raw: _Raw) -> int:
    ends = [e for e in raw.events if isinstance(e, qe.ConnectionTerminated)]
    assert ends, raw.events
    return ends[0].error_code


def _started_nothing(daemon: Daemon) -> None:
    assert value(daemon, "tokenwire_requests_total", {"scheme": "chatterbox"}) == 0
    assert value(daemon, "tokenwire_requests_active") == 0
    assert not daemon.answers.tasks and not daemon.store.live_count


# ------------------------------------------------------------------------- 1: nothing starts on a refused connection
def test_a_certless_clients_requests_sent_with_its_finished_start_nothing(tmp_path: Path):
    """With server.client_ca and no tokens a connection was authorized from its creation: requests in the datagram
    of a certless client's Finished were read after the certificate check had closed the connection, and each
    generated an answer for nobody until orphan_timeout_s (max_live_answers filled; certificate holders got
    "server busy")."""
    ca = tls.make_ca()
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    tls.make_client_cert(ca, "carol").write(tmp_path / "carol.pem", tmp_path / "carol.key")

    async def go():
        async with _daemon(server={"client_ca": str(tmp_path / "ca.pem")}, max_live_answers=2) as daemon:
            for _ in range(3):
                raw = await _requests_with_finished(daemon, [_request(), _request()])
                assert _closed_with(raw) == ErrorCode.UNAUTHORIZED
            _started_nothing(daemon)
            assert value(daemon, "tokenwire_errors_total", {"code": hex(ErrorCode.UNAUTHORIZED)}) == 3
            async with connect("127.0.0.1", daemon.addresses[0][1], verify=False, certfile=tmp_path / "carol.pem",
                               keyfile=tmp_path / "carol.key") as conn:  # a certificate holder is served
                return await conn.chat("hi", max_tokens=3).collect()

    assert run(go(), 60)


def test_a_request_sent_with_the_finished_of_a_client_refused_past_max_sessions_starts_nothing():
    async def go():
        async with _daemon(max_sessions=1) as daemon, \
                connect("127.0.0.1", daemon.addresses[0][1], verify=False) as first:
            await first.chat("x", max_tokens=2).collect()
            raw = await _requests_with_finished(daemon, [_request()])
            assert _closed_with(raw) == ErrorCode.LIMIT_EXCEEDED
            return value(daemon, "tokenwire_requests_total", {"scheme": "chatterbox"})

    assert run(go(), 60) == 1  # the first client's alone


def test_requests_after_a_wrong_token_in_the_same_datagram_start_nothing(caplog):
    """A wrong token closes the connection; a valid token read after it (same datagram) started an answer on the
    closing connection, and each further wrong one logged and counted again."""
    caplog.set_level(logging.WARNING, "tokenwire.daemon")

    async def go():
        async with _daemon(tokens=True) as daemon, _raw(daemon) as raw:
            quic = raw._quic
            for auth in ("wrong", ALICE, "wrong again"):  # one packet: one datagram, read in one go
                quic.send_stream_data(quic.get_next_available_stream_id(), encode_stream_frame(_request(auth=auth)))
            raw.transmit()
            await asyncio.wait_for(raw.wait_closed(), 10)
            assert _closed_with(raw) == ErrorCode.UNAUTHORIZED
            _started_nothing(daemon)
            return value(daemon, "tokenwire_errors_total", {"code": hex(ErrorCode.UNAUTHORIZED)})

    assert run(go(), 30) == 1
    assert len([r for r in caplog.records if "unauthorized client" in r.getMessage()]) == 1


# ------------------------------------------------------------------------- 2: what an unauthorized connection holds
class _HeldPair(Pair):
    """A pair whose server connection is held until authorized (as the daemon's are with auth tokens)."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    def _server_for(self, data: bytes) -> ServerSession:
        if self.server is None:
            server = super()._server_for(data)
            assert isinstance(server.quic, ReadCredit)
            server.quic.hold_until_authorized(self.window)
        assert self.server is not None
        return self.server


def _held(quic: QuicConnection, session: ServerSession) -> int:
    """Bytes of request streams the server holds: aioquic's buffers and the request decoders'."""
    return (sum(len(s.receiver._buffer) for s in quic._streams.values())
            + sum(r.decoder.pending for r in session.requests.values()))


def _almost_whole(quic: QuicConnection, streams: int, size: int) -> None:
    """``streams`` request streams, each announcing a ``size``-byte frame and sending all but its last byte."""
    for _ in range(streams):
        quic.send_stream_data(quic.get_next_available_stream_id(), struct.pack(">I", size) + bytes(size - 1))


def test_an_unauthorized_connection_holds_its_window_and_its_first_stream_at_most():
    pair = _HeldPair(2 * MAX_REQUEST)
    pair.exchange(rounds=40)
    assert pair.server is not None and pair.client.quic._remote_max_data == 2 * MAX_REQUEST  # the parameter
    _almost_whole(pair.client.quic, 32, MAX_REQUEST)  # 2 MiB in all
    pair.exchange(rounds=400)
    held = _held(pair.server.quic, pair.server)
    assert MAX_REQUEST <= held <= 3 * MAX_REQUEST + 4096, held
    client = pair.client.quic
    assert client._remote_max_data < 3 * MAX_REQUEST + 4096
    assert len(client._streams_blocked_bidi) == 30  # two streams at once while held: the rest wait (MAX_STREAMS)
    pair.server.quic.release_credit()  # authorized: the full window again, at the next packet
    pair.exchange(rounds=400)
    assert _held(pair.server.quic, pair.server) > 31 * MAX_REQUEST  # (nothing else is read of these streams)


def test_first_requests_sent_at_once_still_come_whole_while_held():
    """The first stream is exempt from the hold: with every stream's reads held, a few large first requests sent
    at once (aioquic's client serves streams in turn) used the whole window and none came whole. Two streams are
    open at once while held; the rest follow once the connection is authorized."""
    pair = _HeldPair(2 * MAX_REQUEST)
    pair.exchange(rounds=40)
    assert pair.server is not None
    sids = [pair.client.start_request(_request("z" * (MAX_REQUEST - 200)), pair.now) for _ in range(8)]
    pair.exchange(rounds=600)
    assert [e.stream_id for e in pair.server_events if isinstance(e, RequestReceived)] == sids[:2]
    pair.server.quic.release_credit()  # (the daemon: its first authorized request)
    pair.exchange(rounds=1200)
    assert [e.stream_id for e in pair.server_events if isinstance(e, RequestReceived)] == sids


def test_holding_credit_after_the_first_datagram_is_refused():
    pair = Pair()
    pair.exchange(rounds=40)
    assert pair.server is not None and isinstance(pair.server.quic, ReadCredit)
    with pytest.raises(RuntimeError, match="after the connection's first datagram"):
        pair.server.quic.hold_until_authorized(1 << 20)


def test_an_unauthenticated_connection_makes_the_daemon_hold_little():
    """A client that never sent a token: 32 streams, each all but the last byte of a maximal request. Every byte
    read into the request decoders moved the connection's credit on: all 2 MiB were held (64 MiB with 1 MiB
    requests, for request_timeout_s)."""

    async def go():
        async with _daemon(tokens=True, max_request_bytes=MAX_REQUEST) as daemon, _raw(daemon) as raw:
            quic = raw._quic
            _almost_whole(quic, 32, MAX_REQUEST)
            raw.transmit()

            def settled() -> bool:  # all sent, or blocked by the server's credit; and nothing left in flight
                sent = all(s.sender.highest_offset == MAX_REQUEST + 3 for s in quic._streams.values())
                blocked = quic._remote_max_data_used >= quic._remote_max_data or bool(quic._streams_blocked_bidi)
                return (sent or blocked) and quic._loss.bytes_in_flight == 0

            await until(settled, 60)
            proto = next(iter(daemon.protocols))
            return _held(proto._quic, proto.server_session)

    held = run(go(), 90)
    assert held <= 3 * MAX_REQUEST + 4096, held


def test_an_authorized_client_sending_large_requests_at_once_is_served():
    """The hold ends with the first authorized request; three maximal first requests at once fit it anyway."""

    async def go():
        async with _daemon(tokens=True, max_request_bytes=MAX_REQUEST) as daemon, \
                connect("127.0.0.1", daemon.addresses[0][1], verify=False, auth_token=ALICE) as conn:
            prompt = "z" * (MAX_REQUEST - 300)
            first = await asyncio.gather(*[conn.chat(prompt, max_tokens=2).collect() for _ in range(3)])
            after = await asyncio.gather(*[conn.chat(prompt, max_tokens=2).collect() for _ in range(6)])
            proto = next(iter(daemon.protocols))
            assert isinstance(proto._quic, ReadCredit)
            return first + after, proto._quic._unauthorized_window

    answers, window = run(go(), 90)
    assert all(answers) and len(answers) == 9 and window is None


# ---------------------------------------------------------------------- 3: the session table and unauthorized clients
def test_connections_that_never_authorize_make_room_for_new_clients():
    """Clients that connected with keepalive and never sent a request held every max_sessions slot, and a token
    holder got "too many sessions": the oldest never-authorized connection is closed for a new client instead. One
    that has authorized is never closed so; with every slot authorized, a new client is refused as before."""

    async def go():
        async with _daemon(tokens=True, max_sessions=2) as daemon, contextlib.AsyncExitStack() as stack:
            port = daemon.addresses[0][1]

            async def join(n: int, **kw: Any) -> Any:
                conn = await stack.enter_async_context(connect("127.0.0.1", port, verify=False, **kw))
                await until(lambda: daemon.metrics.sessions_total._value.get() == n, 10)
                return conn

            alice = await join(1, auth_token=ALICE)
            assert await alice.chat("x", max_tokens=2).collect()
            await join(2, keepalive=True)  # a squatter
            squatter = next(iter(daemon.admission.unauthorized))
            await join(3, keepalive=True)  # another: the first makes room for it
            admission = daemon.admission
            assert squatter.closing and squatter not in admission.unauthorized and admission.established == 2
            assert value(daemon, "tokenwire_handshakes_refused_total", {"reason": "evicted"}) == 1
            bob = await join(4, auth_token=ALICE)  # a token holder: the second squatter makes room
            assert await bob.chat("x", max_tokens=2).collect() and await alice.chat("y", max_tokens=2).collect()
            assert not daemon.admission.unauthorized and daemon.admission.established == 2
            late = await stack.enter_async_context(connect("127.0.0.1", port, verify=False, auth_token=ALICE))
            with pytest.raises(RemoteError) as info:  # both slots authorized: refused, as before
                await late.chat("x", max_tokens=2).collect()
            return (info.value.code, value(daemon, "tokenwire_handshakes_refused_total", {"reason": "evicted"}),
                    value(daemon, "tokenwire_handshakes_refused_total", {"reason": "max_sessions"}))

    assert run(go(), 60) == (ErrorCode.LIMIT_EXCEEDED, 2, 1)


def test_an_evicted_client_hears_why():
    async def go():
        async with _daemon(tokens=True, max_sessions=1) as daemon, _raw(daemon) as squatter:
            await until(lambda: daemon.admission.established == 1, 10)
            async with connect("127.0.0.1", daemon.addresses[0][1], verify=False, auth_token=ALICE) as alice:
                answer = await alice.chat("x", max_tokens=2).collect()
                await asyncio.wait_for(squatter.wait_closed(), 10)
            ends = [e for e in squatter.events if isinstance(e, qe.ConnectionTerminated)]
            return answer, ends[0].error_code, ends[0].reason_phrase

    answer, code, reason = run(go(), 30)
    assert answer and code == ErrorCode.LIMIT_EXCEEDED
    assert reason.startswith("too many sessions: this connection had sent no authorized request")


# ------------------------------------------------------------------------- 4: refusals of unauthorized clients, logged
def test_wrong_tokens_are_one_warning_then_counted_and_summed_up(caplog):
    caplog.set_level(logging.WARNING, "tokenwire.daemon")

    async def go():
        async with _daemon(tokens=True) as daemon:
            for i in range(12):
                with contextlib.suppress(RemoteError):
                    async with connect("127.0.0.1", daemon.addresses[0][1], verify=False,
                                       auth_token=f"wrong-{i}") as conn:
                        await conn.chat("x", max_tokens=2).collect()
            at = daemon.admission.auth_refusals.logged_at
            assert at is not None
            daemon._log_refusals(at + service.REFUSALS_LOG_S + FLUSH_SLACK_S)  # ("60 s")
            return value(daemon, "tokenwire_errors_total", {"code": hex(ErrorCode.UNAUTHORIZED)})

    assert run(go(), 60) == 12
    lines = [r.getMessage() for r in caplog.records if r.name == "tokenwire.daemon" and "unauthorized" in
             r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("unauthorized client 127.0.0.1:") and "missing or invalid auth token" in lines[0]
    assert lines[1].startswith("refused 11 more unauthorized clients in the last 60 s")


def test_the_refusal_log_sums_up_what_it_held_back():
    lines: list[str] = []
    refusals = service.RefusalLog(service.log, lambda n, s: f"{n} in {s:.0f} s")
    now = time.monotonic()
    assert not refusals.hold(now)  # the first: logged by the caller
    assert refusals.hold(now + 1) and refusals.hold(now + 2)  # counted
    refusals.flush(now + 30)  # too early for a summary
    assert refusals.unlogged == 2
    logger = logging.getLogger("tokenwire.daemon")
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        assert not refusals.hold(now + service.REFUSALS_LOG_S + 5)  # the next line, after the summary
    finally:
        logger.removeHandler(handler)
    assert lines == ["2 in 65 s"] and refusals.unlogged == 0


def test_a_token_holders_many_first_requests_at_once_are_all_served():
    """Eight chats of near-maximal prompts started at once right after connecting: aioquic's client spread the held
    connection credit over all eight streams in turn, the first stream's share never completed its request, the
    others' filled the window, and all eight were refused after request_timeout_s (the connection never authorized).
    Two streams at once while held: the first request comes whole, authorizes, and the rest follow."""

    async def go():
        async with _daemon(tokens=True, max_request_bytes=MAX_REQUEST) as daemon, \
                connect("127.0.0.1", daemon.addresses[0][1], verify=False, auth_token=ALICE) as conn:
            prompt = "z" * (MAX_REQUEST - 300)  # (three fitted the hold; four did not)
            answers = await asyncio.gather(*[conn.chat(prompt, max_tokens=2).collect() for _ in range(8)])
            proto = next(iter(daemon.protocols))
            return answers, proto.authorized

    answers, authorized = run(go(), 60)
    assert len(answers) == 8 and all(answers) and authorized


def test_a_first_request_refused_before_it_was_read_does_not_stop_the_sdk_sending_its_token():
    """The SDK stopped sending its token after any ERROR ("a wrong token would have closed the connection"), but a
    request refused before the daemon read it (over limits.max_request_bytes) checked no token: the next request,
    without one, was closed "missing or invalid auth token". It sends the token until an answer has started."""
    async def go() -> tuple[Any, Any, float]:
        async with _daemon(tokens=True, max_request_bytes=4096) as d:
            async with connect("127.0.0.1", d.addresses[0][1], verify=False, auth_token=ALICE) as conn:
                first: Any
                try:
                    first = await conn.chat("x" * 8000, max_tokens=2).collect()
                except RemoteError as exc:
                    first = exc
                second = await conn.chat("hi", max_tokens=2).collect()
            return first, second, value(d, "tokenwire_errors_total", {"code": hex(ErrorCode.UNAUTHORIZED)})

    first, second, unauthorized = run(go(), 60)
    assert isinstance(first, RemoteError) and first.code == ErrorCode.LIMIT_EXCEEDED, first
    assert second, second
    assert unauthorized == 0
