"""The chat port's budget for connections not yet authorized is never below what one of them may hold; the daemon's
housekeeping sums up the metrics port's malformed requests; the drain deadline's line has no "1 answers"."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aioquic.quic import events as qe

from tokenwire.daemon.config import parse_config
from tokenwire.daemon.connection import UNAUTHORIZED_CREDIT_REQUESTS
from tokenwire.daemon.service import Daemon
from tokenwire.transport.client import connect
from tokenwire.transport.errors import ErrorCode
from tokenwire.transport.handshake_guard import REFUSALS_LOG_S

from .test_auth_fixes2 import ALICE, _almost_whole, _daemon
from .test_handshake_limits import until, value
from .test_hostile_clients import _raw
from .test_loopback import run
from .test_telemetry_fixes3 import MALFORMED, _flood

MAX_REQUEST = 1 << 20  # limits.max_request_bytes' default
# what one connection not yet authorized may hold: its window (two maximal requests) and its first stream's request
ONE_CONNECTION = (UNAUTHORIZED_CREDIT_REQUESTS + 1) * MAX_REQUEST + 4


def _closed_by_server(raw: Any) -> qe.ConnectionTerminated | None:
    return next((e for e in raw.events if isinstance(e, qe.ConnectionTerminated)), None)


# ------------------------------------------------------------------------ 1: the chat port's unauthorized budget
def test_a_lone_token_holder_is_never_closed_for_its_own_first_requests():
    """limits.unauthorized_memory_mb = 1 (its minimum) with max_request_bytes 1 MiB: a token holder sending two
    600-KB prompts at once on a new connection was closed every time with LIMIT_EXCEEDED ("too much held before
    authorization"), its requests not yet whole so its token not yet read. The budget is never below what one
    connection may hold (~3 x max_request_bytes)."""

    async def go() -> tuple[list[Any], float]:
        async with _daemon(tokens=True, unauthorized_memory_mb=1) as daemon:
            async with connect("127.0.0.1", daemon.addresses[0][1], verify=False, auth_token=ALICE) as alice:
                answers = await asyncio.gather(*(alice.chat("x" * 600_000, max_tokens=2).collect() for _ in range(2)),
                                               return_exceptions=True)
            return answers, value(daemon, "tokenwire_handshakes_refused_total", {"reason": "memory"})

    answers, shed = run(go(), 60)
    assert all(isinstance(a, str) and a for a in answers), answers
    assert shed == 0


def test_connections_without_a_token_are_still_held_to_one_connections_allowance_together():
    """The floor is one connection's allowance, not none: two connections each holding two 1-MiB requests short of
    their last byte (~2 MiB each) are past it together, and the one holding the most is closed."""

    async def go() -> tuple[list[qe.ConnectionTerminated | None], int, float]:
        async with _daemon(tokens=True, unauthorized_memory_mb=1) as daemon, \
                contextlib.AsyncExitStack() as stack:
            raws = []
            for n in (1, 2):
                raw = await stack.enter_async_context(_raw(daemon))
                await until(lambda n=n: value(daemon, "tokenwire_sessions_total") == n, 10)
                _almost_whole(raw._quic, 2, MAX_REQUEST)
                raw.transmit()
                raws.append(raw)
            await until(lambda: any(map(_closed_by_server, raws)), 30)
            shed = value(daemon, "tokenwire_handshakes_refused_total", {"reason": "memory"})
            return [_closed_by_server(r) for r in raws], daemon.admission.unauthorized.held, shed

    ends, held, shed = run(go(), 60)
    closed = [e for e in ends if e is not None]
    assert len(closed) == 1 == shed and closed[0].error_code == ErrorCode.LIMIT_EXCEEDED
    assert "before authorization" in closed[0].reason_phrase
    assert 0 < held <= ONE_CONNECTION  # the other, alone, is kept


# ------------------------------------------------------------------------ 2: the metrics port's summary line
def test_the_daemons_housekeeping_sums_up_the_metrics_ports_malformed_requests(caplog):
    """Daemon._log_refusals (once a second) flushes the metrics port's held-back lines too: without it the summary
    of a flood of malformed HTTP requests waited for the next malformed request, possibly for ever."""
    daemon = Daemon(parse_config({"server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": ""}}))
    with caplog.at_level(logging.INFO):
        _flood(daemon.metrics, [MALFORMED[0], MALFORMED[1], MALFORMED[2]])  # one warning, two counted
        daemon._log_refusals(time.monotonic() + REFUSALS_LOG_S + 1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("metrics:")]
    assert len(lines) == 2, lines
    assert lines[1].startswith("metrics: 2 more malformed HTTP requests in the last"), lines[1]


# ------------------------------------------------------------------------ 3: the drain deadline's line
def test_the_drain_deadline_line_counts_the_answers_it_cuts_without_a_broken_plural(caplog):
    """It said "drain deadline reached with 1 answers still streaming"; now as the second signal's line."""
    caplog.set_level(logging.WARNING, "tokenwire.daemon")

    async def go() -> None:
        async with _daemon(drain_timeout_s=0) as daemon, \
                connect("127.0.0.1", daemon.addresses[0][1], verify=False) as conn:
            running = conn.chat("long", max_tokens=2000, params={"rate": 20})  # 100 s of answer
            await running.__anext__()  # streaming
            await daemon.drain()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(running.collect(), 15)

    run(go(), 60)
    lines = [r.getMessage() for r in caplog.records if "drain deadline" in r.getMessage()]
    assert lines == ["drain deadline reached; answers still streaming, cut: 1"], lines

