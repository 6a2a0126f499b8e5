"""A KV fetch that runs into an outage (session 35; a mobility probe in session 34): the path drops everything
after a few chunks. The fetch failed with "KV fetch timed out: 3 chunks received of 8 after 2.5 s", which a slow
server gives too, and the chunks already decoded went with it. The error now says how long the server has been
silent (or that it still answers), and carries the decoded leading chunks as ``partial``.

Loopback: the SDK's KV server and client, with a UDP relay between them that drops both directions on command.
The server holds chunk K until the client has decoded chunks 0..K-1 (the relay starts dropping then), so the
outage always comes after exactly K chunks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch

from tokenwire.daemon.kv_store import object_key
from tokenwire.transport import kv_client
from tokenwire.transport.cachegen.codec import decode_chunk
from tokenwire.transport.errors import ErrorCode, RemoteError
from tokenwire.transport.kv_channel import KVError, ServerTuning, connect_kv, serve_kv

from .test_kv_channel import CHUNK, MODEL, make_kv, service  # noqa: F401  # (service: a fixture)
from .test_loopback import run

K = 3  # chunks that arrive before the outage
N = 8  # chunks in the context
LEVEL = "medium"  # fixed-L2's level for every chunk: prewarmed, so the deadline is not spent encoding
PORTS = iter(range(35600, 35990, 10))  # this file's ports: server, relay front, relay upstream


class Relay:
    """client <-> relay front ... relay upstream <-> server; ``drop`` drops every datagram, both ways."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.client: Any = None
        self.drop = False
        self.front: Any = None
        self.up: Any = None

    async def start(self, front_port: int, up_port: int) -> None:
        loop = asyncio.get_running_loop()
        relay = self

        class Front(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                relay.client = addr
                if not relay.drop:
                    relay.up.sendto(data, relay.server)

        class Up(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                if not relay.drop and relay.client is not None:
                    relay.front.sendto(data, relay.client)

        self.front, _ = await loop.create_datagram_endpoint(Front, local_addr=("127.0.0.1", front_port))
        self.up, _ = await loop.create_datagram_endpoint(Up, local_addr=("127.0.0.1", up_port))

    def close(self) -> None:
        for t in (self.front, self.up):
            if t is not None:
                t.close()


@contextlib.asynccontextmanager
async def outage_after_k(service, monkeypatch, *, drop: bool = True,  # noqa: F811
                         idle_s: float | None = None) -> AsyncIterator[tuple[Any, Relay]]:
    """A connection through a relay; the server holds chunk K on (the slow server: for good) until the client has
    decoded chunks 0..K-1, and then, with ``drop``, the relay drops everything. ``idle_s``: the server's idle
    timeout (the one in force: the smaller end's)."""
    base = next(PORTS)
    release = asyncio.Event()
    chunk = service.chunk

    async def held_chunk(plan: Any, index: int, level: str) -> bytes:
        if index >= K:
            await release.wait()
        return await chunk(plan, index, level)

    monkeypatch.setattr(service, "chunk", held_chunk)
    decoded = kv_client.KVConnection._decoded

    def on_decoded(self: Any, pf: Any, hdr: Any, fut: Any) -> None:
        decoded(self, pf, hdr, fut)
        if drop and not relay.drop and all(i in pf.decodes and pf.decodes[i].done() for i in range(K)):
            relay.drop = True
            release.set()  # (into the outage: the rest of the fetch is lost on the way)

    monkeypatch.setattr(kv_client.KVConnection, "_decoded", on_decoded)
    server = await serve_kv(service, "127.0.0.1", base, tuning=ServerTuning(forecaster="ewma"))
    if idle_s is not None:
        server.quic_configuration.idle_timeout = idle_s
    relay = Relay(("127.0.0.1", base))
    try:
        await relay.start(base + 1, base + 2)
        async with connect_kv("127.0.0.1", base + 1, verify=False) as conn:
            yield conn, relay
    finally:
        release.set()
        relay.close()
        server.close()


def _context(service) -> tuple[list[int], list[str], Any]:  # noqa: F811
    ids = list(range(500, 500 + N * CHUNK))
    kv = make_kv(len(ids), seed=35)
    hashes = service.ingest_sync(MODEL, ids, kv, prewarm=[LEVEL])  # encoded (and compiled) before the fetch
    return ids, hashes, kv


def _check_partial(service, res: Any, ids: list[int] | None, hashes: list[str]) -> None:  # noqa: F811
    """``res`` holds chunks 0..K-1 as a successful fetch would, and leaves the rest of the context to prefill."""
    assert res is not None
    assert [c.index for c in res.chunks] == list(range(K))
    assert res.report.levels == [LEVEL] * K and len(res.report.chunks) == K
    for i, c in enumerate(res.chunks):  # the very tensors the stored chunk decodes to
        expect = decode_chunk(service.store.get(object_key(hashes[i], LEVEL)))
        for (k, v), (ek, ev) in zip(c.kv, expect, strict=True):
            assert torch.equal(k, ek) and torch.equal(v, ev)
    kv, n = res.prefix_kv()
    assert n == K * CHUNK and kv[0][0].shape == (1, 2, K * CHUNK, 16)
    assert res.geometry == (4, 2, 16)
    assert res.report.prefill_tokens == (N - K) * CHUNK and not res.report.deadline_met
    if ids is not None:
        assert res.missing_token_ids == ids[K * CHUNK:]
        assert res.text_token_ids() == ids[K * CHUNK:]  # with prefix_kv(), the whole context
        assert res.missing_chunks == 0
    else:
        assert res.missing_chunks == N - K and res.missing_token_ids == []


def test_an_outage_mid_fetch_says_the_server_went_silent_and_keeps_the_decoded_chunks(service,  # noqa: F811
                                                                                     monkeypatch) -> None:
    """No ``timeout_s``: the stall timer fails the fetch (2 s after its last chunk). It said only "timed out: 3
    chunks received of 8", and the 3 decoded chunks were lost."""
    ids, hashes, _kv = _context(service)

    async def go() -> KVError:
        async with outage_after_k(service, monkeypatch) as (conn, relay):
            with pytest.raises(KVError) as info:
                await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=300, controller="fixed-L2")
            assert relay.drop
            return info.value

    err = run(go(), 30)
    assert err.code == ErrorCode.UPSTREAM_TIMEOUT
    assert f"{K} chunks received of {N}" in str(err)
    assert "no packet from the server for" in str(err) and "server or path gone" in str(err), err
    assert err.silent_s is not None and err.silent_s >= 1.0
    _check_partial(service, err.partial, ids, hashes)


def test_the_idle_timeout_mid_fetch_keeps_the_decoded_chunks(service, monkeypatch) -> None:  # noqa: F811
    """An outage longer than the idle timeout: the connection's end (``path_lost``) fails the fetch. The error is
    the fetch's own (the connection's ``close_error`` is shared by every fetch, and must not hold one's tensors)."""
    ids, hashes, _kv = _context(service)

    async def go() -> tuple[RemoteError, Any]:
        async with outage_after_k(service, monkeypatch, idle_s=0.6) as (conn, _relay):
            with pytest.raises(RemoteError) as info:
                await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=300, controller="fixed-L2")
            return info.value, conn.close_error

    err, closed = run(go(), 30)
    assert err.path_lost and "QUIC idle timeout" in str(err) and err.code == ErrorCode.NO_ERROR
    assert err.silent_s is not None and err.silent_s >= 0.5
    _check_partial(service, err.partial, ids, hashes)
    assert closed is not None and closed is not err and str(closed) == str(err)
    assert closed.partial is None


@pytest.mark.parametrize("by", ["ids", "hashes"])
def test_a_slow_server_is_told_from_a_lost_path(service, monkeypatch, by) -> None:  # noqa: F811
    """The server holds chunk K (a stuck encode) while the path works: ``timeout_s`` fails the fetch, and says the
    server still answers (the client's pings are acknowledged), not that it went silent; the chunks that came are
    kept here too, by hashes as well (``missing_chunks``)."""
    ids, hashes, _kv = _context(service)

    async def go() -> KVError:
        async with outage_after_k(service, monkeypatch, drop=False) as (conn, relay):
            kw: dict[str, Any] = {"token_ids": ids} if by == "ids" else {"hashes": hashes}
            with pytest.raises(KVError) as info:
                await conn.fetch_kv(model=MODEL, deadline_ms=300, controller="fixed-L2", timeout_s=1.5, **kw)
            assert not relay.drop
            return info.value

    err = run(go(), 30)
    assert err.code == ErrorCode.UPSTREAM_TIMEOUT
    assert "the server still answers" in str(err) and "server or path gone" not in str(err), err
    assert err.silent_s is None
    _check_partial(service, err.partial, ids if by == "ids" else None, hashes)
