"""A KV connection kept across an engine's turns (session 34, a mobility probe): one idle for the idle timeout
ended, both ends silent, the next fetch failed at once, and the error said "server or path gone" though nothing
was asked. connect_kv(keepalive=True) pings between fetches, as the chat client's keepalive does; without it the
error says why."""

from __future__ import annotations

import asyncio

from tokenwire.transport.kv_channel import ServerTuning, connect_kv, serve_kv

from .test_kv_channel import service  # noqa: F401  # (a fixture)
from .test_loopback import run

IDLE_S = 0.5  # the server's idle timeout here: the one in force is the smaller of the two ends'


def _idle(service, keepalive: bool):  # noqa: F811
    async def go():
        server = await serve_kv(service, "127.0.0.1", 0, tuning=ServerTuning(forecaster="ewma"))
        server.quic_configuration.idle_timeout = IDLE_S
        try:
            async with connect_kv("127.0.0.1", server.port, verify=False, keepalive=keepalive, warm=False) as conn:
                await asyncio.sleep(4 * IDLE_S)  # an engine's user thinking: four idle timeouts with no fetch
                return conn.close_error
        finally:
            server.close()

    return run(go(), 30)


def test_keepalive_keeps_an_idle_kv_connection(service) -> None:  # noqa: F811
    assert _idle(service, keepalive=True) is None


def test_without_keepalive_the_idle_end_says_nothing_was_asked(service) -> None:  # noqa: F811
    err = _idle(service, keepalive=False)
    assert err is not None and getattr(err, "path_lost", False)
    assert "no request was open" in str(err) and "keepalive=True" in str(err), err
    assert "server or path gone" not in str(err)
