"""Admission without auth past max_sessions: the admitted connection idle the longest makes room (the s45 audit).

With no auth configured a connection is admitted once a request of its starts, and only connections not admitted yet
made room for new clients. So N connections that each sent one cheap request (max_tokens=1), then only pinged
(keepalive), held every slot of max_sessions = N for good, and an honest client got LIMIT_EXCEEDED "too many
sessions". Now, with no connection not yet admitted left to close, the admitted one idle the longest (no answer open
on it for at least ``IDLE_EVICTION_FLOOR_S``) is closed instead (reason ``idle``); token holders and certificate
clients are accountable and are never closed so.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from types import SimpleNamespace
from typing import Any

import pytest
from aioquic.quic import events as qe

from tokenwire.daemon import admission
from tokenwire.daemon.admission import Admission
from tokenwire.daemon.config import load_config
from tokenwire.daemon.connection import DaemonProtocol
from tokenwire.daemon.service import Daemon
from tokenwire.daemon.telemetry import Metrics
from tokenwire.transport.client import connect
from tokenwire.transport.errors import ErrorCode, RemoteError
from tokenwire.transport.frames import Finished, Request, encode_stream_frame

from .test_answers_s34 import limits
from .test_auth_fixes2 import ALICE, _daemon
from .test_handshake_limits import until, value
from .test_hostile_clients import _raw
from .test_loopback import run

IDLE_REASON = "too many sessions: idle connection closed to admit another client (limits.max_sessions); connect again"
FLOOR_S = 0.3  # (the floor in these tests: the real one is 2 s)


@pytest.fixture
def short_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admission, "IDLE_EVICTION_FLOOR_S", FLOOR_S)


def _refused(daemon: Any, reason: str) -> float | None:
    """The refusal series (None: no such label, as before the ``idle`` reason)."""
    return daemon.metrics.registry.get_sample_value("tokenwire_handshakes_refused_total", {"reason": reason})


async def _admitted(daemon: Any, stack: contextlib.AsyncExitStack, n: int, **kw: Any) -> Any:
    """An SDK connection (the ``n``th session) that has had one short chat: admitted, idle from the chat's end."""
    conn = await stack.enter_async_context(connect("127.0.0.1", daemon.addresses[0][1], verify=False, **kw))
    await until(lambda: value(daemon, "tokenwire_sessions_total") == n, 5)
    assert await conn.chat("x", max_tokens=1).collect()
    return conn


# ---------------------------------------------------------------------------- the repro
def test_connections_that_chatted_once_then_only_ping_make_room_for_an_honest_client(short_floor, caplog):
    """3 of max_sessions = 3 held by connections that each had one 1-token chat, then idled with keepalive: the
    honest client was refused ("too many sessions"); now the longest idle is closed, with a reason its next chat
    raises, counted under reason ``idle`` and logged once (the next such close summed up)."""
    caplog.set_level(logging.WARNING, "tokenwire.daemon")

    async def go() -> tuple[Any, ...]:
        async with _daemon(max_sessions=3) as daemon, contextlib.AsyncExitStack() as stack:
            at_start = _refused(daemon, "idle")
            squatters = [await _admitted(daemon, stack, n + 1, keepalive=True) for n in range(3)]
            assert not daemon.admission.unauthorized and daemon.admission.established == 3
            await asyncio.sleep(FLOOR_S + 0.2)
            async with connect("127.0.0.1", daemon.addresses[0][1], verify=False) as honest:
                answer = await honest.chat("hello", max_tokens=3).collect()
                await until(lambda: squatters[0].closed, 5)
                closed = [c.closed for c in squatters]
                with pytest.raises(RemoteError) as info:  # what the SDK client sees on its next chat
                    await squatters[0].chat("again", max_tokens=1).collect()
                async with connect("127.0.0.1", daemon.addresses[0][1], verify=False) as second:
                    assert await second.chat("hi", max_tokens=1).collect()  # the next longest idle goes in turn
            await until(lambda: squatters[1].closed, 5)
            return (at_start, answer, closed, info.value, _refused(daemon, "idle"),
                    _refused(daemon, "max_sessions"), _refused(daemon, "evicted"))

    at_start, answer, closed, err, idle, refused, evicted = run(go(), 60)
    assert at_start == 0.0  # the series exists from the start (rate() sees the first close)
    assert answer and closed == [True, False, False]  # the longest idle, not the others
    assert err.code == ErrorCode.LIMIT_EXCEEDED and IDLE_REASON in str(err), str(err)
    assert (idle, refused, evicted) == (2.0, 0.0, 0.0)
    lines = [r.getMessage() for r in caplog.records if "to admit a new client" in r.getMessage()]
    assert len(lines) == 1 and "idle for" in lines[0] and "reason idle" in lines[0], lines


# ---------------------------------------------------------------------------- what is never closed
def test_a_connection_with_an_answer_open_is_never_closed_for_room_even_the_oldest(monkeypatch):
    """max_sessions = 2: the oldest connection streams a slow answer, the other chatted once and idles. A new client
    closes the idle one, never the streaming one; a second new client, while every other is younger than the floor
    or streaming, is refused."""
    monkeypatch.setattr(admission, "IDLE_EVICTION_FLOOR_S", 1.0)  # (the late client's handshake takes less)

    async def go() -> tuple[Any, ...]:
        async with _daemon(max_sessions=2) as daemon, contextlib.AsyncExitStack() as stack:
            port = daemon.addresses[0][1]
            streamer = await stack.enter_async_context(connect("127.0.0.1", port, verify=False))
            streamer.chat("x", max_tokens=5000, params={"rate": 5})  # (read by nobody: it streams on)
            await until(lambda: daemon.answers.count() == 1, 5)
            idler = await _admitted(daemon, stack, 2)
            await asyncio.sleep(1.2)  # the streamer opened its answer long before: the oldest
            newcomer = await stack.enter_async_context(connect("127.0.0.1", port, verify=False))
            assert await newcomer.chat("y", max_tokens=1).collect()
            await until(lambda: idler.closed, 5)
            late = await stack.enter_async_context(connect("127.0.0.1", port, verify=False))
            with pytest.raises(RemoteError) as info:  # newcomer idle for less than the floor, streamer streaming
                await late.chat("z", max_tokens=1).collect()
            alive = not streamer.closed and not newcomer.closed and daemon.answers.count() == 1
            return alive, info.value, _refused(daemon, "idle"), _refused(daemon, "max_sessions")

    alive, err, idle, refused = run(go(), 60)
    assert alive
    assert err.code == ErrorCode.LIMIT_EXCEEDED and "too many sessions (code 0x106)" in str(err), str(err)
    assert (idle, refused) == (1.0, 1.0)


def test_an_idle_connection_younger_than_the_floor_stays_and_the_new_client_is_refused(monkeypatch):
    """The floor: a client between two requests of a burst is not churned; past it, the same connection goes."""
    monkeypatch.setattr(admission, "IDLE_EVICTION_FLOOR_S", 1.0)

    async def go() -> tuple[Any, ...]:
        async with _daemon(max_sessions=1) as daemon, contextlib.AsyncExitStack() as stack:
            port = daemon.addresses[0][1]
            first = await _admitted(daemon, stack, 1)
            idle_at = time.monotonic()
            early = await stack.enter_async_context(connect("127.0.0.1", port, verify=False))
            with pytest.raises(RemoteError) as info:
                await early.chat("y", max_tokens=1).collect()
            assert time.monotonic() - idle_at < 1.0, "too slow a host for this test's floor"
            kept = not first.closed and await first.chat("again", max_tokens=1).collect()  # its next turn
            await asyncio.sleep(1.2)
            later = await stack.enter_async_context(connect("127.0.0.1", port, verify=False))
            served = await later.chat("z", max_tokens=1).collect()
            await until(lambda: first.closed, 5)
            return info.value, kept, served, _refused(daemon, "idle"), _refused(daemon, "max_sessions")

    err, kept, served, idle, refused = run(go(), 60)
    assert err.code == ErrorCode.LIMIT_EXCEEDED and "too many sessions (code 0x106)" in str(err)
    assert kept and served and (idle, refused) == (1.0, 1.0)


def test_an_answer_sent_whole_whose_client_holds_its_fin_back_does_not_keep_the_connection_busy(short_floor):
    """A bare client that reads FINISHED and never ends its request stream: the answer is out, nothing is open on
    the server's side, so it is idle (else holding the FIN back would keep a slot for good, at no cost)."""

    async def go() -> tuple[Any, ...]:
        async with _daemon(max_sessions=1) as daemon, _raw(daemon) as raw:
            quic = raw._quic
            sid = quic.get_next_available_stream_id()
            request = Request(messages=[{"role": "user", "content": "x"}], max_tokens=1, scheme="stream")
            quic.send_stream_data(sid, encode_stream_frame(request))  # no FIN, ever
            raw.transmit()
            await until(lambda: any(isinstance(f, Finished) for f in raw.frames.get(sid, [])), 5)
            (proto,) = daemon.protocols
            assert sid in proto.server_session.requests  # (open in the session: its FIN never came)
            await asyncio.sleep(FLOOR_S + 0.2)
            async with connect("127.0.0.1", daemon.addresses[0][1], verify=False) as honest:
                served = await honest.chat("hello", max_tokens=1).collect()
            await asyncio.wait_for(raw.wait_closed(), 5)
            end = next(e for e in raw.events if isinstance(e, qe.ConnectionTerminated))
            return served, end.error_code, end.reason_phrase, _refused(daemon, "idle")

    served, code, reason, idle = run(go(), 60)
    assert served and code == ErrorCode.LIMIT_EXCEEDED and reason == IDLE_REASON and idle == 1.0


def test_with_auth_tokens_idle_authorized_connections_are_never_closed_for_room(short_floor):
    """Token holders are accountable: with [[auth.tokens]] an idle authorized connection keeps its slot and the new
    client is refused, as before; the same scene without auth closes the idle one (the new behaviour)."""

    async def scene(tokens: bool) -> tuple[bool, float | None, float | None]:
        kw: dict[str, Any] = {"auth_token": ALICE} if tokens else {}
        async with _daemon(tokens=tokens, max_sessions=1) as daemon, contextlib.AsyncExitStack() as stack:
            alice = await _admitted(daemon, stack, 1, keepalive=True, **kw)
            await asyncio.sleep(FLOOR_S + 0.2)
            newcomer = await stack.enter_async_context(
                connect("127.0.0.1", daemon.addresses[0][1], verify=False, **kw))
            try:
                served = bool(await newcomer.chat("y", max_tokens=1).collect())
            except RemoteError as exc:
                assert exc.code == ErrorCode.LIMIT_EXCEEDED and "too many sessions (code 0x106)" in str(exc)
                served = False
            await asyncio.sleep(0.1)
            assert alice.closed == served
            return served, _refused(daemon, "idle"), _refused(daemon, "max_sessions")

    assert run(scene(tokens=True), 30) == (False, 0.0, 1.0)
    assert run(scene(tokens=False), 30) == (True, 1.0, 0.0)


def test_once_a_reload_configures_tokens_connections_admitted_without_auth_are_not_closed_for_room(tmp_path,
                                                                                                   short_floor):
    """Closing the longest idle is for no auth configured: after a reload adds tokens, a token holder past
    max_sessions is refused as before, not let in by closing a connection admitted while none was required."""
    path = tmp_path / "tokenwire.toml"
    base = '[server]\nlisten = ["127.0.0.1:0"]\n[metrics]\nlisten = ""\n[limits]\nmax_sessions = 1\n'
    path.write_text(base)

    async def go() -> tuple[bool, bool, float | None]:
        daemon = Daemon(load_config(path))
        await daemon.start()
        try:
            async with contextlib.AsyncExitStack() as stack:
                early = await _admitted(daemon, stack, 1, keepalive=True)
                digest = hashlib.sha256(ALICE.encode()).hexdigest()
                path.write_text(base + f'[[auth.tokens]]\nname = "alice"\nsha256 = "{digest}"\n')
                assert daemon.reload() and daemon.config.auth.required
                await asyncio.sleep(FLOOR_S + 0.2)
                alice = await stack.enter_async_context(
                    connect("127.0.0.1", daemon.addresses[0][1], verify=False, auth_token=ALICE))
                with pytest.raises(RemoteError) as info:
                    await alice.chat("y", max_tokens=1).collect()
                await asyncio.sleep(0.1)
                return "too many sessions (code 0x106)" in str(info.value), early.closed, _refused(daemon, "idle")
        finally:
            await daemon.stop()

    assert run(go(), 30) == (True, False, 0.0)


# ---------------------------------------------------------------------------- sans-I/O: order, floor, cost
class _Session:
    def __init__(self) -> None:
        self.closed_with: tuple[int, str] | None = None

    def close(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)


class _Proto:
    """What Admission reads of a connection."""

    def __init__(self, name: str) -> None:
        self.peer = name
        self.established = True
        self.closing = False
        self.busy = False
        self.checks = 0
        self.server_session = _Session()

    def answering(self) -> bool:
        self.checks += 1
        return self.busy

    def transmit(self) -> None:
        pass


def _admission(max_sessions: int) -> Admission:
    lim = limits(max_sessions=max_sessions)
    adm = Admission(lambda: lim, Metrics())
    adm.established = max_sessions
    return adm


def test_the_longest_idle_goes_first_answering_ones_are_skipped_and_the_floor_holds():
    adm = _admission(3)
    a, b, c = _Proto("a"), _Proto("b"), _Proto("c")
    for t, p in ((0.0, a), (1.0, b), (2.0, c)):
        adm.note_idle(p, t)  # type: ignore[arg-type]
    adm.note_idle(a, 5.0)  # type: ignore[arg-type]  # (a ping: idle since 0 still)
    b.busy = True
    adm.note_idle(b, 5.0)  # type: ignore[arg-type]  # a request of b's started: out
    b.busy = False
    adm.note_idle(b, 5.5)  # type: ignore[arg-type]  # ... and ended: idle from 5.5, the youngest
    assert list(adm.idle) == [a, c, b]
    a.busy = True  # a request of a's started, its datagram not noted yet: skipped, and out
    assert adm.evict_idle(6.0) and c.server_session.closed_with == (ErrorCode.LIMIT_EXCEEDED, IDLE_REASON)
    assert list(adm.idle) == [b] and adm.established == 2 and not c.established
    assert not adm.evict_idle(6.0 + admission.IDLE_EVICTION_FLOOR_S - 0.6)  # b idle for less than the floor
    assert b.server_session.closed_with is None and adm.established == 2
    assert adm.evict_idle(5.5 + admission.IDLE_EVICTION_FLOOR_S) and not adm.idle
    assert adm.metrics.handshakes_refused.labels(reason="idle")._value.get() == 2


def test_finding_the_longest_idle_among_10000_sessions_reads_a_few_connections_not_all():
    adm = _admission(10_000)
    protos = [_Proto(str(i)) for i in range(10_000)]
    for i, p in enumerate(protos):
        adm.note_idle(p, float(i) / 10_000)  # type: ignore[arg-type]
    for p in protos[:5]:
        p.busy = True  # their requests started since they were last noted
    before = sum(p.checks for p in protos)
    assert adm.evict_idle(10.0) and protos[5].server_session.closed_with is not None
    assert sum(p.checks for p in protos) - before == 6  # the five skipped (and dropped), then the victim
    assert adm.evict_idle(10.0) and protos[6].server_session.closed_with is not None
    assert sum(p.checks for p in protos) - before == 7


def test_an_answer_is_open_until_every_token_and_its_finished_have_gone_out():
    """What keeps a connection from being idle: not a request still arriving, nor an answer sent whole waiting for
    its client's acks or FIN (a client holds those back at no cost), but an answer still to be sent."""

    def sender(holding: bool) -> SimpleNamespace:
        return SimpleNamespace(holds_new_tokens=lambda: holding)

    def answering(*requests: SimpleNamespace) -> bool:
        proto = SimpleNamespace(server_session=SimpleNamespace(requests=dict(enumerate(requests))))
        return DaemonProtocol.answering(proto)  # type: ignore[arg-type]

    arriving = SimpleNamespace(request=None, finished_sent=False, sender=None)
    streaming = SimpleNamespace(request=object(), finished_sent=False, sender=sender(True))
    tail_unsent = SimpleNamespace(request=object(), finished_sent=True, sender=sender(True))  # (a resume's start)
    sent_whole = SimpleNamespace(request=object(), finished_sent=True, sender=sender(False))
    stream_scheme_done = SimpleNamespace(request=object(), finished_sent=True, sender=None)
    assert not answering() and not answering(arriving, sent_whole, stream_scheme_done)
    assert answering(arriving, streaming) and answering(sent_whole, tail_unsent)
