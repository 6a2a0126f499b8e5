"""The daemon serves nothing before it is ready: its chat listeners are bound at once (a port in use fails the start
before the KV codec's warm-up) but read no datagram, and ``/healthz`` says "starting", until READY. A client served
during a ``[kv]`` warm-up had its answer cut by a stop signal there (no drain before READY), and ``/healthz`` was
already 200."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from tokenwire.daemon import service
from tokenwire.daemon.config import parse_config
from tokenwire.daemon.service import Daemon
from tokenwire.transport.client import connect
from tokenwire.transport.frames import ALPN
from tokenwire.transport.quic_io import ValidatingQuicServer
from tokenwire.transport.tls import server_configuration

from .test_loopback import run


def test_a_server_not_accepting_reads_no_datagram():
    """An Initial that would start a connection is dropped unread: no connection, nothing sent back."""
    sent: list[bytes] = []

    class _Transport:
        def sendto(self, data: bytes, addr: object) -> None:
            sent.append(data)

    quic = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=[ALPN],
                                                          server_name="localhost"))
    quic.connect(("127.0.0.1", 4433), now=time.monotonic())
    ((initial, _),) = quic.datagrams_to_send(now=time.monotonic())
    async def go() -> ValidatingQuicServer:  # (aioquic's server takes the running loop)
        server = ValidatingQuicServer(configuration=server_configuration(), create_protocol=lambda *a, **k: None)
        server._transport = _Transport()  # type: ignore[assignment]
        server.accepting = False
        server.datagram_received(initial, ("127.0.0.1", 50000))
        return server

    server = run(go(), 30)
    assert not server._protocols and not sent


def test_nothing_is_served_and_healthz_says_starting_until_the_daemon_is_ready(monkeypatch):
    """A start paused after its listeners and metrics endpoint are up (where the KV warm-up would run): the chat
    port serves no client and /healthz is 503 "starting"; once started, the client that kept trying is served and
    /healthz is 200."""
    gate = asyncio.Event()
    paused = asyncio.Event()
    serve_metrics = service.serve_metrics
    runners: list = []  # (the daemon learns the metrics address only once serve_metrics returns)

    async def then_wait(*args, **kwargs):
        runner = await serve_metrics(*args, **kwargs)
        runners.append(runner)
        paused.set()
        await gate.wait()
        return runner

    monkeypatch.setattr(service, "serve_metrics", then_wait)

    async def healthz() -> tuple[int, str]:
        host, port = next(iter(runners[0].sites))._server.sockets[0].getsockname()[:2]
        async with aiohttp.ClientSession() as http, http.get(f"http://{host}:{port}/healthz") as r:
            return r.status, await r.text()

    async def go() -> tuple[bool, tuple[int, str], float, bool, tuple[int, str]]:
        daemon = Daemon(parse_config({"server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": "127.0.0.1:0"}}))
        starting = asyncio.ensure_future(daemon.start())
        try:
            await asyncio.wait_for(paused.wait(), 30)
            accepting = daemon._servers[0].accepting
            early = await healthz()
            port = daemon.addresses[0][1]

            async def client() -> bool:
                async with connect("127.0.0.1", port, verify=False, timeout=20):
                    return True

            trying = asyncio.ensure_future(client())
            await asyncio.sleep(0.5)  # (its first Initials are out: read, they would have made a connection)
            before = daemon.metrics.registry.get_sample_value("tokenwire_sessions_total")  # (handshakes done)
            gate.set()
            await starting
            served = await asyncio.wait_for(trying, 30)
            return accepting, early, before or 0.0, served, await healthz()
        finally:
            gate.set()
            await asyncio.gather(starting, return_exceptions=True)
            await daemon.stop()

    accepting, early, before, served, late = run(go(), 90)
    assert not accepting and early == (503, "starting\n") and before == 0
    assert served and late == (200, "ok\n")
