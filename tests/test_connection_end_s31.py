"""Every server connection's ended aioquic state is emptied at its end, not only the daemon's chat port's.

aioquic's ``QuicConnection`` is a reference cycle: what it holds (its streams and their buffers, its handshake
streams and TLS send buffers, its keys) waited for a full garbage collection once it ended. The daemon's chat
connections emptied it at their end; the KV endpoint's and the SDK server's kept it all until a collection. The
emptying now sits in ``SessionProtocol``, the end every connection shares. No timing is asserted: what is freed is
seen through weak references, with Python's own collections off.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from tokenwire.transport.client import connect
from tokenwire.transport.kv_channel import ServerTuning, connect_kv, serve_kv
from tokenwire.transport.quic_io import RELEASED_AT_END
from tokenwire.transport.server import serve

from .test_handshake_limits import until
from .test_kv_security_fixes2 import IDS, MODEL, TextProvider
from .test_loopback import run
from .test_sdk_server import client_kwargs


def _held(quic: Any) -> list[weakref.ref]:
    """Weak references to what an ended connection should no longer hold: its streams, handshake streams and keys."""
    assert quic._crypto_streams and quic._cryptos  # (else the test checks nothing)
    return [weakref.ref(o) for o in (*quic._streams.values(), *quic._crypto_streams.values(),
                                     *quic._cryptos.values(), *quic._cryptos_initial.values())]


def _left(quic_ref: weakref.ref) -> list[str]:
    """The containers of RELEASED_AT_END still holding something (none when the connection itself is gone)."""
    quic = quic_ref()
    return [] if quic is None else [name for name in RELEASED_AT_END if getattr(quic, name)]


def test_a_kv_endpoint_connection_is_emptied_at_its_end(no_automatic_collection):
    """A KV fetch, then the client closes: the fetch completed, the server's connection ended (out of its table),
    and what its QuicConnection held is freed at once."""

    async def go() -> tuple[list[str], dict[str, int], list[weakref.ref], list[str], int]:
        server = await serve_kv(TextProvider(), "127.0.0.1", 0, tuning=ServerTuning(forecaster="ewma"))
        try:
            async with connect_kv("127.0.0.1", server.port, verify=False, warm=False, timeout=5) as conn:
                res = await conn.fetch_kv(model=MODEL, token_ids=IDS, deadline_ms=5000)
                (proto,) = server.protocols
                quic = proto._quic
                held = _held(quic)
                quic_ref = weakref.ref(quic)
                del quic, proto
            await until(lambda: not server.protocols, 10)
            return res.report.levels, dict(server.stats), held, _left(quic_ref), server.connections
        finally:
            server.close()

    levels, stats, held, left, connections = run(go(), 60)
    assert levels == ["text"] and stats["completed"] == 1 and stats["abandoned"] == 0  # it ended cleanly
    assert connections == 0
    assert [r for r in held if r() is not None] == []
    assert left == []


def test_an_sdk_server_connection_is_emptied_at_its_end(no_automatic_collection):
    """An answer of serve(), then the client closes: it counted completed, the connection left the server, and what
    its QuicConnection held (the answer's stream while it streamed, the handshake's streams, the keys) is freed at
    once."""
    go_on = asyncio.Event()

    async def source(request: Any):
        yield "a"
        await go_on.wait()
        yield "b"

    async def go() -> tuple[str, Any, list[weakref.ref], list[str]]:
        server = await serve(source, host="127.0.0.1", port=0)
        try:
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                answer = conn.chat("hi", max_tokens=10)
                first = await answer.__anext__()  # streaming: the request stream is open on both sides
                (proto,) = server.protocols
                quic = proto._quic
                assert quic._streams  # (else this test checks nothing about the streams)
                held = _held(quic)
                quic_ref = weakref.ref(quic)
                del quic, proto
                go_on.set()
                text = first + "".join([piece async for piece in answer])
            await until(lambda: not server.protocols, 10)
            return text, server.stats, held, _left(quic_ref)
        finally:
            server.close()
            await asyncio.wait_for(server.wait_closed(), 10)

    text, stats, held, left = run(go(), 60)
    assert text == "ab" and stats.completed == 1 and stats.protocol_errors == 0 and stats.failed == 0
    assert [r for r in held if r() is not None] == []
    assert left == []
