"""A fetch sent to a server that has gone silent (session 45): before KV_META the client waited
``max(10 s, 3 x max(deadline, 2 s))`` for the server's typed answer about a hung store, even when the server
acknowledged none of the pings sent while the fetch was pending: a 500-ms fetch on a connection whose server had
been killed failed after 10.5 s. Such a silence now ends the wait ``max(2 s, deadline)`` past the deadline, as after
KV_META."""

from __future__ import annotations

import asyncio
import time

import pytest

from tokenwire.transport import kv_client
from tokenwire.transport.errors import ErrorCode
from tokenwire.transport.kv_channel import KVError, ServerTuning, connect_kv, serve_kv

from .test_kv_channel import MODEL, make_kv, service  # noqa: F401  # (service: a fixture)
from .test_kv_outage_s35 import Relay
from .test_loopback import run

PORTS = iter(range(23450, 23480, 3))  # this file's ports: server, relay front, relay upstream


class _Never:
    """``pf`` of a fetch that never ends, with no progress."""

    def __init__(self) -> None:
        self.t = 0.0

    def clock(self) -> float:
        return self.t

    async def wait(self, timeout: float) -> bool:
        self.t += timeout
        return False


def _gives_up_at(silent: object, deadline_s: float = 0.5) -> float:
    fake = _Never()
    quiet, first = kv_client._stall_bounds(deadline_s)
    with pytest.raises(TimeoutError):
        asyncio.run(kv_client._wait_while_progressing(
            None, lambda: 0, deadline_s, quiet, first_quiet_s=first, silent=silent,  # type: ignore[arg-type]
            clock=fake.clock, wait=fake.wait))
    return fake.t


def test_a_silent_server_ends_the_wait_for_kv_meta_at_the_quiet_not_the_store_bound() -> None:
    """Pings unanswered since the fetch began: fail max(2 s, deadline) past the deadline (2.5 s), not at 10.5 s."""
    def silent_since_long_ago() -> float:
        return 60.0  # (the silence began before this fetch: only the part since it began counts)

    assert _gives_up_at(silent_since_long_ago) == pytest.approx(2.5, abs=0.3)
    assert _gives_up_at(lambda: None) == pytest.approx(10.5, abs=0.3)  # a server that answers: the store bound
    assert _gives_up_at(None) == pytest.approx(10.5, abs=0.3)


def test_an_old_silence_of_an_idle_connection_is_not_this_fetchs() -> None:
    """An idle connection hears nothing between fetches: a silence that began before the fetch must not fail it at
    once, only once the fetch itself has gone unanswered for the quiet."""
    assert _gives_up_at(lambda: 45.0, deadline_s=3.0) == pytest.approx(6.0, abs=0.3)


def test_a_fetch_to_a_server_gone_silent_fails_within_the_quiet(service) -> None:  # noqa: F811
    ids = list(range(500, 564))
    service.ingest_sync(MODEL, ids, make_kv(len(ids), seed=45), prewarm=["medium"])

    async def go() -> tuple[KVError, float]:
        base = next(PORTS)
        front, up = base + 1, base + 2
        server = await serve_kv(service, "127.0.0.1", base, tuning=ServerTuning(forecaster="ewma"))
        relay = Relay(("127.0.0.1", base))
        try:
            await relay.start(front, up)
            async with connect_kv("127.0.0.1", front, verify=False) as conn:
                await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=2000, controller="fixed-L2")
                relay.drop = True  # the server (or the path) is gone
                t0 = time.monotonic()
                with pytest.raises(KVError) as info:
                    await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=500, controller="fixed-L2")
                return info.value, time.monotonic() - t0
        finally:
            relay.close()
            server.close()

    err, took = run(go(), 30)
    assert err.code == ErrorCode.UPSTREAM_TIMEOUT
    assert "no KV_META" in str(err) and "server or path gone" in str(err), err
    assert took < 4.0, (took, err)  # 10.5 s before
