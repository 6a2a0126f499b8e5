"""Fixes from the review of session 44's SDK, admission and daemon changes: a ResumingChat closed from another task,
orphans cancelled for a request they could not make room for, an ingest open refused for its principal, and a client's
first burst of requests held back without auth."""

from __future__ import annotations

import asyncio
from typing import Any

from tokenwire.daemon.config import parse_config
from tokenwire.daemon.service import Daemon
from tokenwire.transport.client import ResumingChat, connect

from .test_answers_s34 import Endless, answers, limits, settle, start
from .test_auth_fixes2 import _daemon as _auth_daemon
from .test_handshake_limits import until, value
from .test_hostile_clients import _raw
from .test_loopback import run
from .test_sdk_audit_s44 import _daemon
from .test_sdk_server import T


def test_a_resuming_chat_closed_from_another_task_ends_its_reader_and_cancels_the_answer():
    """A "stop" button runs in another task than the reader: ``aclose()`` raised "asynchronous generator is already
    running", the reader got all 400 tokens and the daemon generated them for nobody."""
    async def go() -> tuple[int, float]:
        async with _daemon() as daemon:
            port = daemon.addresses[0][1]
            chat = ResumingChat(lambda: connect("127.0.0.1", port, verify=False), "tell me", retries=1,
                                max_tokens=400, params={"rate": 60})
            deltas: list[str] = []

            async def read() -> None:
                async with chat:
                    async for delta in chat:
                        deltas.append(delta)

            reader = asyncio.create_task(read())
            await until(lambda: len(deltas) >= 3, T)
            await chat.aclose()
            await asyncio.wait_for(reader, T)
            await until(lambda: value(daemon, "tokenwire_requests_ended_total", {"outcome": "cancelled"}) == 1, T)
            return len(deltas), value(daemon, "tokenwire_requests_ended_total", {"outcome": "completed"})

    read, completed = run(go())
    assert 3 <= read < 400 and completed == 0


def test_orphans_are_not_cancelled_for_a_request_they_cannot_make_room_for():
    """After a reload lowered max_live_answers to 2 under 3 live answers, one of them orphaned: a request cancelled
    the orphan (a client could have resumed it) and was refused all the same."""
    async def go() -> tuple[str | None, float, bool]:
        ans = answers(limits(max_live_answers=2))
        start(ans, Endless()), start(ans, Endless())
        orphan = start(ans, Endless())
        ans.unattended(orphan, cancel=False)
        why = ans.busy()
        await settle()
        counted = ans.metrics.orphans_cancelled.labels(reason="busy")._value.get()
        done = orphan.done
        ans.cancel_all()
        await settle()
        return why, counted, done

    why, counted, done = run(go(), 10)
    assert why is not None and why.startswith("server busy: 3 answers")
    assert counted == 0 and not done


def test_an_ingest_open_refused_for_its_principal_cancels_no_orphan():
    """The busy check, which cancels orphans at the bound to make room, came before the principal's: an open refused
    for its principal had cancelled an answer for nothing."""
    async def go() -> tuple[Any, bool]:
        daemon = Daemon(parse_config({
            "server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": ""}, "limits": {"max_live_answers": 1},
            "auth": {"tokens": [{"name": "alice", "sha256": "0" * 64}]}}))
        orphan = start(daemon.answers, Endless())
        daemon.answers.unattended(orphan, cancel=False)
        refusal = daemon._ingest_refusal("bob")
        await settle()
        done = orphan.done
        daemon.answers.cancel_all()
        await settle()
        return refusal, done

    refusal, done = run(go(), 10)
    assert refusal is not None and refusal.reason == "principal" and not done


def test_without_auth_a_new_connection_may_open_every_stream_at_once():
    """Without auth a connection is held to a small window of request bytes until a request of its starts; it was
    held to two request streams as well, and a client's first burst of eight chats waited a round trip for six of
    them (55-82 ms over a 50-ms path), hidden from their TTFT. With auth tokens it is still two."""
    async def advertised(tokens: bool) -> int:
        async with _auth_daemon(tokens=tokens) as daemon, _raw(daemon) as raw:
            return raw._quic._remote_max_streams_bidi

    assert run(advertised(False)) >= 64 and run(advertised(True)) == 2
