"""The daemon sends what a connection's answers queued once per event-loop turn (DaemonProtocol.transmit_soon).

A transmit per token of each answer built datagrams over every stream each time: with 64 answers on one connection
the daemon used 4.1 s of CPU where it now uses 1.0 s (an A/B in the closing note), its loop stalled for
seconds on 2 cores, and the inflated RTT estimates kept a closed client's session for minutes.
"""

from __future__ import annotations

import asyncio
import contextlib

from tokenwire.transport.client import connect
from tokenwire.transport.errors import ErrorCode

from .test_handshake_limits import until
from .test_hostile_clients import _daemon
from .test_loopback import run


def test_many_requests_to_send_in_one_loop_turn_are_one_transmit():
    async def go():
        async with _daemon() as daemon, connect("127.0.0.1", daemon.addresses[0][1], verify=False) as conn:
            assert await conn.chat("x", max_tokens=2).collect()
            (proto,) = daemon.protocols
            calls = []
            real = proto.transmit
            proto.transmit = lambda: (calls.append(1), real())[1]  # type: ignore[method-assign]
            handles = set()
            for _ in range(10):
                proto.transmit_soon()
                handles.add(proto._transmit_task)
            queued = len(calls)
            await until(lambda: proto._transmit_task is None, 5)  # it ran, on the loop
            return queued, len(handles), len(calls) >= 1

    assert run(go(), 30) == (0, 1, True)  # nothing sent in the calls, one transmit scheduled for all ten


def test_answers_sharing_a_connection_arrive_whole_with_batched_transmits():
    async def go():
        async with _daemon() as daemon, connect("127.0.0.1", daemon.addresses[0][1], verify=False) as conn:
            streams = [conn.chat(f"q{i}", max_tokens=50) for i in range(16)]
            texts = await asyncio.gather(*[s.collect() for s in streams])
            return texts, [s.stats.digest_verified for s in streams]

    texts, verified = run(go(), 60)
    assert all(texts) and all(verified)


def test_a_deferred_transmit_that_raises_closes_that_connection_alone():
    async def go():
        async with _daemon() as daemon, contextlib.AsyncExitStack() as stack:
            port = daemon.addresses[0][1]
            async with connect("127.0.0.1", port, verify=False) as bad:
                assert await bad.chat("x", max_tokens=2).collect()
                (broken,) = daemon.protocols
                good = await stack.enter_async_context(connect("127.0.0.1", port, verify=False))
                assert await good.chat("x", max_tokens=2).collect()
                real = broken.transmit

                def failing() -> None:
                    broken.transmit = real  # the close that follows sends through the real one
                    raise RuntimeError("packet path failed")

                broken.transmit = failing  # type: ignore[method-assign]
                broken.transmit_soon()
                await until(lambda: broken._quic._close_event is not None, 10)
                code = broken._quic._close_event.error_code
                answer = await good.chat("y", max_tokens=3).collect()
                return code, answer

    code, answer = run(go(), 30)
    assert code == ErrorCode.INTERNAL and answer


def test_a_direct_transmit_takes_over_a_pending_deferred_one():
    """A datagram's transmit between two answers' notifies left the first deferred transmit pending and let the
    second schedule another: two in one turn, where the first had nothing left to send."""

    async def go():
        async with _daemon() as daemon, connect("127.0.0.1", daemon.addresses[0][1], verify=False) as conn:
            assert await conn.chat("x", max_tokens=2).collect()
            (proto,) = daemon.protocols
            proto.transmit_soon()
            first = proto._transmit_task
            proto.transmit()  # (what a received datagram does)
            proto.transmit_soon()
            second = proto._transmit_task
            return first is not None and first.cancelled(), second is not None and second is not first

    assert run(go(), 30) == (True, True)
