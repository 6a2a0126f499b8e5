"""An ended connection is freed by refcounting alone (session 34). After its buffers were emptied at its end
(test_gc_stall_fixes), ~120 objects a connection still waited for a full collection, in cycles: aioquic's server
handlers on the protocol, the scheduler's clock closure over the session, the datagram hook's writer on the
connection, aioquic's TLS and loss-recovery callbacks. A full collection walks every live session (0.3 s at 2,000
sessions); and the daemon freezes what survives one, where a cycle is never collected."""

from __future__ import annotations

import asyncio
import gc
import weakref

from tokenwire.transport.client import connect
from tokenwire.transport.server import serve

from .test_handshake_limits import until
from .test_loopback import client_kwargs, run, slow_source


def test_an_ended_connection_leaves_nothing_for_the_collector(no_automatic_collection) -> None:
    async def go() -> tuple[list[str], list[str]]:
        server = await serve(slow_source, host="127.0.0.1", port=0)
        try:
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                answer = conn.chat("hi", scheme="chatterbox")
                await answer.__anext__()  # streaming: the request stream is open on both sides
                proto = next(iter(server.protocols))
                refs = {"protocol": weakref.ref(proto), "connection": weakref.ref(proto._quic),
                        "session": weakref.ref(proto.session), "scheduler": weakref.ref(proto.session.scheduler),
                        "tls": weakref.ref(proto._quic.tls)}
                del proto
            await until(lambda: not server.protocols, 10)
            for _ in range(3):
                await asyncio.sleep(0)  # (the end's callbacks already ran: nothing is waited for here)
            alive = [name for name, ref in refs.items() if ref() is not None]
        finally:
            server.close()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            # aioquic's and the server side's (the client's request objects are a cycle of their own, of the
            # application's process: its answer object holds them)
            kinds = sorted({type(o).__name__ for o in gc.garbage if type(o).__module__.startswith(
                ("aioquic", "tokenwire.transport.server", "tokenwire.transport.quic_io",
                 "tokenwire.transport.session", "tokenwire.transport.datagram_hook"))})
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        return alive, kinds

    alive, cyclic = run(go(), 60)
    assert alive == [], alive  # freed when the connection ended, with no collection
    assert cyclic == [], cyclic
