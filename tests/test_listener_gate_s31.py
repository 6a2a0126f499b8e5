"""A listener made gated (``serve_quic(accepting=False)``, ``serve_kv(accepting=False)``) drops every datagram from
its first on. The daemon used to set ``accepting = False`` after ``serve_quic`` returned: a datagram read in the
loop turn between (the ECN transport's first read, scheduled at its creation) started a connection during the
KV warm-up, where a stop signal cut it with no drain."""

from __future__ import annotations

import time

import pytest
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from tokenwire.transport.frames import ALPN, KV_ALPN
from tokenwire.transport.kv_channel import serve_kv
from tokenwire.transport.quic_io import serve_quic
from tokenwire.transport.tls import server_configuration

from .test_loopback import run

PORTS = iter(range(62700, 62760))  # (this helper's range)
PEER = ("127.0.0.1", 62999)  # (nothing listens there: what the listeners answer goes nowhere)


def _initial(alpn: str) -> bytes:
    """A client's first datagram: an Initial that starts a connection on any listener that reads it."""
    quic = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=[alpn],
                                                          server_name="localhost"))
    quic.connect(("127.0.0.1", 4433), now=time.monotonic())
    ((data, _),) = quic.datagrams_to_send(now=time.monotonic())
    return data


@pytest.mark.parametrize("ecn", [False, True])
def test_a_chat_listener_made_gated_drops_a_datagram_read_before_its_owner_acts(ecn):
    """Right after serve_quic returns (nothing of the caller's in between), an Initial is dropped unread; the same
    Initial on an ungated listener starts a connection (what the gate is for)."""
    initial = _initial(ALPN)

    async def go() -> tuple[int, int, bool]:
        config = server_configuration()
        gated = await serve_quic("127.0.0.1", next(PORTS), configuration=config,
                                 create_protocol=QuicConnectionProtocol, ecn=ecn, accepting=False)
        opened = await serve_quic("127.0.0.1", next(PORTS), configuration=config,
                                  create_protocol=QuicConnectionProtocol, ecn=ecn)
        try:
            gated.datagram_received(initial, PEER)
            opened.datagram_received(initial, PEER)
            return len(gated._protocols), len(opened._protocols), gated.accepting
        finally:
            gated.close()
            opened.close()

    n_gated, n_open, accepting = run(go(), 30)
    assert (n_gated, accepting) == (0, False)
    assert n_open > 0  # (one entry per connection ID)


def test_a_kv_endpoint_made_gated_drops_datagrams_until_its_accessor_opens_it():
    """serve_kv(accepting=False): KVServer.accepting (the public gate start_kv and KVRuntime use) is False from the
    start and an Initial is dropped; set True, the next one starts a connection."""
    initial = _initial(KV_ALPN)

    async def go() -> tuple[bool, int, bool, int]:
        server = await serve_kv(object(), "127.0.0.1", next(PORTS), accepting=False)  # type: ignore[arg-type]
        try:
            listener = server._quic_server
            listener.datagram_received(initial, PEER)
            before = (server.accepting, len(listener._protocols))
            server.accepting = True
            listener.datagram_received(initial, PEER)
            return (*before, listener.accepting, len(listener._protocols))
        finally:
            server.close()

    accepting, n_before, opened, n_after = run(go(), 30)
    assert (accepting, n_before) == (False, 0)
    assert opened and n_after > 0
