"""KV clients' moves are counted (session 38): a KV connection's migration re-plans its running fetches on the host
entered (session 37), but only a debug log line showed that one happened; tokenwire_path_changes_total counts the
chat port's only. ``KVServer.path_changes`` counts open and ended KV connections' moves, read by the KV metrics as
tokenwire_kv_path_changes_total.

Loopback: the SDK's KV server and client with a UDP relay between them whose server-facing socket is replaced by
one on another port mid-connection (a NAT rebinding, as the server sees it)."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import CollectorRegistry

from tokenwire.daemon.kv_metrics import KVMetrics
from tokenwire.transport.kv_channel import ServerTuning, connect_kv, serve_kv

from .test_kv_channel import CHUNK, MODEL, make_kv, service  # noqa: F401  # (service: a fixture)


class RebindingRelay:
    """client <-> front ... upstream <-> server, where :meth:`rebind` gives the upstream side a new port."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.client: Any = None
        self.front: Any = None
        self.up: Any = None
        self.old: list[Any] = []

    async def start(self) -> int:
        relay = self

        class Front(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                relay.client = addr
                relay.up.sendto(data, relay.server)

        self.front, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            Front, local_addr=("127.0.0.1", 0))
        await self.rebind()
        return int(self.front.get_extra_info("sockname")[1])

    async def rebind(self) -> None:
        relay = self

        class Up(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                if relay.client is not None:
                    relay.front.sendto(data, relay.client)

        if self.up is not None:
            self.old.append(self.up)  # (left open: a late answer to the old port reaches nobody, as after a NAT's)
        self.up, _ = await asyncio.get_running_loop().create_datagram_endpoint(Up, local_addr=("127.0.0.1", 0))

    def close(self) -> None:
        for t in (self.front, self.up, *self.old):
            if t is not None:
                t.close()


def _scraped(server: Any) -> float:
    registry = CollectorRegistry()
    KVMetrics(registry, runtime=type("Runtime", (), {"server": server, "service": _NoService(), "started": False}))
    value = registry.get_sample_value("tokenwire_kv_path_changes_total")
    assert value is not None
    return value


class _NoService:
    """What the KV collector reads of a service, none of it counted (this test reads the server's counters)."""

    encodes = ingests = ingest_errors = ingested_tokens = 0
    put_memory = type("Budget", (), {"used": 0, "waiting": 0})()
    store = type("Store", (), {"stats": None, "capacity_bytes": 0})()

    def __init__(self) -> None:
        from tokenwire.daemon.kv_store import StoreStats

        self.store.stats = StoreStats()


def test_a_kv_clients_move_is_counted_open_and_after_its_connection_ends(service) -> None:  # noqa: F811
    ids = list(range(700, 700 + 2 * CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(len(ids), seed=38), prewarm=["low"])

    async def run() -> tuple[int, int, float, int, float]:
        server = await serve_kv(service, "127.0.0.1", 0, tuning=ServerTuning(forecaster="ewma"))
        relay = RebindingRelay(("127.0.0.1", server.port))
        try:
            front = await relay.start()
            async with connect_kv("127.0.0.1", front, verify=False) as conn:
                await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=20000, controller="fixed-L1")
                before = server.path_changes()
                await relay.rebind()
                res = await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=20000, controller="fixed-L1")
                assert len(res.chunks) == 2  # (the fetch went on from the new port)
                moved, scraped_open = server.path_changes(), _scraped(server)
            for _ in range(200):  # the server's side of the close: ConnectionEnded
                if not server.protocols:
                    break
                await asyncio.sleep(0.01)
            assert not server.protocols
            return before, moved, scraped_open, server.path_changes(), _scraped(server)
        finally:
            relay.close()
            server.close()

    before, moved, scraped_open, ended, scraped_ended = asyncio.run(asyncio.wait_for(run(), 60))
    assert before == 0  # (the handshake's path is no move)
    assert moved == 1 and scraped_open == 1  # an open connection's move
    assert ended == 1 and scraped_ended == 1  # kept once the connection ended, not counted twice


def test_the_kv_families_read_no_moves_before_the_kv_runtime_starts() -> None:
    registry = CollectorRegistry()
    KVMetrics(registry, capacity_bytes=1 << 20)
    assert registry.get_sample_value("tokenwire_kv_path_changes_total") == 0
