"""limits.unauthorized_memory_mb: what connections that have not authorized yet may make the daemon hold, together.

Each such connection may hold about 3 x max_request_bytes (ReadCredit.hold_until_authorized); with max_sessions of
them (10,000 by default) clients without a token could make the daemon hold ~30 GB.
"""

from __future__ import annotations

import contextlib

from aioquic.quic import events as qe

from tokenwire.transport.client import connect
from tokenwire.transport.errors import ErrorCode

from .test_auth_fixes2 import ALICE, MAX_REQUEST, _almost_whole, _daemon
from .test_handshake_limits import until, value
from .test_hostile_clients import _raw
from .test_loopback import run


def _closed_by_server(raw) -> qe.ConnectionTerminated | None:
    return next((e for e in raw.events if isinstance(e, qe.ConnectionTerminated)), None)


def test_connections_without_a_token_hold_at_most_the_budget_together_and_the_largest_goes_first():
    async def go():
        async with _daemon(tokens=True, max_request_bytes=MAX_REQUEST, unauthorized_memory_mb=1) as daemon, \
                contextlib.AsyncExitStack() as stack:
            budget = 1 << 20
            small = await stack.enter_async_context(_raw(daemon))
            await until(lambda: len(daemon.admission.unauthorized) == 1, 10)
            small._quic.send_stream_data(small._quic.get_next_available_stream_id(), b"\x00\x00\x01\x00" + bytes(99))
            small.transmit()
            unauthorized = daemon.admission.unauthorized
            await until(lambda: unauthorized.held_by(next(iter(unauthorized))) == 103, 10)
            big = []
            for n in range(12):  # each holds ~128 KiB (its window: 2 x 64 KiB): ~1.5 MiB in all, over the budget
                raw = await stack.enter_async_context(_raw(daemon))
                await until(lambda n=n: value(daemon, "tokenwire_sessions_total") == n + 2, 10)
                _almost_whole(raw._quic, 4, MAX_REQUEST)
                raw.transmit()
                big.append(raw)
                peak = daemon.admission.unauthorized.held
                assert peak <= budget, peak  # (checked on every datagram: never past it once it is read)
            await until(lambda: value(daemon, "tokenwire_handshakes_refused_total", {"reason": "memory"}) >= 3, 30)
            await until(lambda: sum(_closed_by_server(raw) is not None for raw in big)
                        == value(daemon, "tokenwire_handshakes_refused_total", {"reason": "memory"}), 10)
            ends = [_closed_by_server(raw) for raw in big if _closed_by_server(raw) is not None]
            held = daemon.admission.unauthorized.held
            recount = sum(daemon.admission.unauthorized.held_by(p) for p in daemon.admission.unauthorized)
            # a token holder is served meanwhile, and its connection never counts
            async with connect("127.0.0.1", daemon.addresses[0][1], verify=False, auth_token=ALICE) as alice:
                answer = await alice.chat("x", max_tokens=2).collect()
            return ends, held, recount, _closed_by_server(small), answer, len(daemon.admission.unauthorized)

    ends, held, recount, small_end, answer, left = run(go(), 90)
    assert ends and all(e.error_code == ErrorCode.LIMIT_EXCEEDED and "before authorization" in e.reason_phrase
                        for e in ends)
    assert held == recount and 0 < held <= 1 << 20
    assert small_end is None  # the largest holders went first, not the oldest connection
    assert answer and left >= 1


def test_what_a_connection_held_stops_counting_when_it_authorizes_or_ends():
    async def go():
        async with _daemon(tokens=True, max_request_bytes=MAX_REQUEST) as daemon:
            async with _raw(daemon) as raw:
                await until(lambda: len(daemon.admission.unauthorized) == 1, 10)
                _almost_whole(raw._quic, 2, MAX_REQUEST)
                raw.transmit()
                await until(lambda: daemon.admission.unauthorized.held > MAX_REQUEST, 10)
                during = daemon.admission.unauthorized.held
            await until(lambda: not daemon.admission.unauthorized, 10)
            after_end = daemon.admission.unauthorized.held
            async with connect("127.0.0.1", daemon.addresses[0][1], verify=False, auth_token=ALICE) as alice:
                assert await alice.chat("x" * 5000, max_tokens=2).collect()
                after_auth = daemon.admission.unauthorized.held
            return during, after_end, after_auth

    during, after_end, after_auth = run(go(), 60)
    assert during > MAX_REQUEST and after_end == 0 and after_auth == 0
