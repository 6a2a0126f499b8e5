"""Admission without auth (no [[auth.tokens]], no client CA: the default configuration), and live answers nobody is
attached to, under hostile clients (the s44 audit).

1. 30 handshaked connections that never sent a request (PING every 5 s) held every slot of max_sessions = 30 for
   good: an honest client got "too many sessions (0x106)". A connection now counts as not yet admitted until a
   request of its starts, and the oldest such makes room for a new client, as never-authorized ones do with tokens.
2. Partial requests held ~8 MiB per connection with no bound in connections (16 connections: RSS 60 -> 189 MiB):
   limits.unauthorized_memory_mb now bounds what every connection not yet admitted holds, with tokens or without.
3. Two connections x 64 requests, sockets dropped without a close, held every slot of max_live_answers for
   limits.orphan_timeout_s (300 s), generating for nobody: at the bound, the longest-orphaned answers of the
   upstreams are cancelled to make room (tokenwire_orphans_cancelled_total reason busy).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import pytest
from aioquic.quic import events as qe

from tokenwire.transport.client import connect
from tokenwire.transport.errors import ErrorCode, RemoteError
from tokenwire.transport.frames import Request, encode_stream_frame

from .test_answers_s34 import Endless, answers, limits, settle, start
from .test_auth_fixes2 import MAX_REQUEST, _almost_whole, _daemon
from .test_handshake_limits import until, value
from .test_hostile_clients import _raw
from .test_loopback import run


def _refused(daemon: Any, reason: str) -> float:
    return value(daemon, "tokenwire_handshakes_refused_total", {"reason": reason})


# ---------------------------------------------------------------------------- 1: idle connections make room
def test_without_tokens_connections_that_never_start_a_request_make_room_for_new_clients(caplog):
    caplog.set_level(logging.WARNING, "tokenwire.daemon")

    async def go():
        async with _daemon(max_sessions=2) as daemon, contextlib.AsyncExitStack() as stack:
            port = daemon.addresses[0][1]

            async def join(n: int, **kw: Any) -> Any:
                conn = await stack.enter_async_context(connect("127.0.0.1", port, verify=False, **kw))
                await until(lambda: daemon.metrics.sessions_total._value.get() == n, 5)
                return conn

            alice = await join(1)
            assert await alice.chat("x", max_tokens=2).collect()  # a request started: admitted
            assert not daemon.admission.unauthorized
            squatter = await stack.enter_async_context(_raw(daemon))  # never sends a request
            await until(lambda: daemon.admission.established == 2, 5)
            first = next(iter(daemon.admission.unauthorized))
            await join(3, keepalive=True)  # an SDK client idling before its first request: the squatter goes
            await asyncio.wait_for(squatter.wait_closed(), 5)
            assert first.closing and first not in daemon.admission.unauthorized
            bob = await join(4)  # the idle one makes room in turn (under pressure only)
            assert await bob.chat("x", max_tokens=2).collect() and await alice.chat("y", max_tokens=2).collect()
            assert not daemon.admission.unauthorized and daemon.admission.established == 2
            late = await stack.enter_async_context(connect("127.0.0.1", port, verify=False))
            with pytest.raises(RemoteError) as info:  # both slots hold admitted clients: refused, as before
                await late.chat("x", max_tokens=2).collect()
            end = next(e for e in squatter.events if isinstance(e, qe.ConnectionTerminated))
            return (info.value.code, end.error_code, end.reason_phrase, _refused(daemon, "evicted"),
                    _refused(daemon, "max_sessions"))

    code, squatter_code, squatter_reason, evicted, refused = run(go(), 60)
    assert (code, squatter_code, evicted, refused) == (ErrorCode.LIMIT_EXCEEDED, ErrorCode.LIMIT_EXCEEDED, 2, 1)
    assert squatter_reason.startswith("too many sessions: this connection had sent no request that started")
    lines = [r.getMessage() for r in caplog.records if "to admit a new client" in r.getMessage()]
    assert len(lines) == 1 and "no request started yet (no auth configured)" in lines[0], lines


# ---------------------------------------------------------------------------- 2: their memory, bounded
def test_without_tokens_partial_requests_are_bounded_by_unauthorized_memory_mb():
    async def go():
        async with _daemon(max_request_bytes=MAX_REQUEST, unauthorized_memory_mb=1) as daemon, \
                contextlib.AsyncExitStack() as stack:
            async with connect("127.0.0.1", daemon.addresses[0][1], verify=False) as honest:
                assert await honest.chat("x" * 5000, max_tokens=2).collect()
                assert not daemon.admission.unauthorized  # admitted: never counted again
            big = []
            for n in range(12):  # each may hold ~192 KiB (its window, 2 x 64 KiB, and its first stream)
                raw = await stack.enter_async_context(_raw(daemon))
                await until(lambda n=n: value(daemon, "tokenwire_sessions_total") == n + 2, 5)
                _almost_whole(raw._quic, 8, MAX_REQUEST)  # 8 x 64 KiB short by a byte: 512 KiB unheld
                raw.transmit()
                big.append(raw)
                assert daemon.admission.unauthorized.held <= 1 << 20
            await until(lambda: _refused(daemon, "memory") >= 3, 10)

            def ends() -> list[qe.ConnectionTerminated]:
                return [e for raw in big for e in raw.events if isinstance(e, qe.ConnectionTerminated)]

            await until(lambda: len(ends()) == _refused(daemon, "memory"), 5)
            return ends(), daemon.admission.unauthorized.held

    ends, held = run(go(), 60)
    assert ends and all(e.error_code == ErrorCode.LIMIT_EXCEEDED and "before a first request started" in
                        e.reason_phrase for e in ends)
    assert 0 < held <= 1 << 20


# ---------------------------------------------------------------------------- 3: orphans make room
def test_answers_whose_client_vanished_make_room_past_max_live_answers():
    async def go():
        async with _daemon(max_live_answers=2, server={"idle_timeout_s": 1}) as daemon:
            raw_cm = _raw(daemon)
            raw = await raw_cm.__aenter__()
            quic = raw._quic
            for _ in range(2):
                request = Request(messages=[{"role": "user", "content": "x"}], max_tokens=5000, params={"rate": 5})
                quic.send_stream_data(quic.get_next_available_stream_id(), encode_stream_frame(request))
            raw.transmit()
            await until(lambda: daemon.answers.count() == 2, 5)
            # it vanishes: no close, nothing heard from it again; its idle timeout (1 s) ends its connection
            raw.datagram_received = lambda *a: None  # type: ignore[method-assign]
            raw._transport.sendto = lambda *a: None  # type: ignore[method-assign]
            await until(lambda: len(daemon.answers.orphaned) == 2, 10)
            async with connect("127.0.0.1", daemon.addresses[0][1], verify=False) as honest:
                answer = await honest.chat("x", max_tokens=2).collect()
            await until(lambda: daemon.answers.count() == 1, 5)
            raw._transport.close()
            return answer, {r: value(daemon, "tokenwire_orphans_cancelled_total", {"reason": r})
                            for r in ("busy", "timeout")}

    answer, cancelled = run(go(), 30)
    assert answer and cancelled == {"busy": 1.0, "timeout": 0.0}


def test_only_the_upstreams_orphans_are_cancelled_to_make_room_the_oldest_first(caplog):
    """An ingest answer waits for its client, orphaned from its open on: never cancelled to make room. Answers with
    a client attached are not either: past the bound with no orphan of an upstream's, a request is refused."""
    caplog.set_level(logging.WARNING, logger="tokenwire.daemon")

    async def go() -> tuple[list[bool], str | None, str | None, float, int]:
        ans = answers(limits(max_live_answers=3))
        old, new, held = start(ans, Endless()), start(ans, Endless()), start(ans, Endless())
        held.listeners["client"] = lambda: None
        ans.orphaned[b"ingest-answer"] = 0.0  # (not one of the upstreams' tasks: skipped)
        ans.unattended(old, cancel=False)
        await asyncio.sleep(0.01)
        ans.unattended(new, cancel=False)
        first = ans.busy()  # at the bound: the oldest orphan makes room
        await settle()
        done = [old.done, new.done, held.done]
        ans.unattended(held, cancel=False)  # (still listened to: stays)
        start(ans, Endless())
        second = ans.busy()  # new goes
        start(ans, Endless())
        third = ans.busy()  # none left: refused
        counted = ans.metrics.orphans_cancelled.labels(reason="busy")._value.get()
        ans.cancel_all()
        await settle()
        return done, first, second, counted, len([r for r in caplog.records if "to make room" in r.getMessage()]), \
            third

    done, first, second, counted, lines, third = run(go(), 10)
    assert done == [True, False, False] and first is None and second is None
    assert third is not None and third.startswith("server busy: 3 answers")
    assert counted == 2 and lines == 1
