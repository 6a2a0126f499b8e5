"""The render instant on a clean link (session 46): what the reader of an answer waits for after its text arrives.

The SDK client used to build and send its acknowledgements of a token datagram (an ack datagram, a QUIC ACK: ~0.3-0.8
ms of CPU and sendmsg on the test host) before the task reading the answer ran: every token reached the application
that much after it had arrived. ``testbed compare`` stamped the QUIC schemes' render in the SDK's event handling,
before the reader, and sse-tcp's in its reader: it now stamps every scheme in its reader (``endpoints.reader_times``).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tokenwire.testbed import endpoints
from tokenwire.transport.client import connect

from .test_sdk_server import T, client_kwargs, run, served


async def _paced(request):
    for piece in ("one", " two", " three", " four"):
        await asyncio.sleep(0.03)  # the reader waits for each piece, as a chat page does
        yield piece


@pytest.mark.parametrize("scheme", ["chatterbox", "stream"])
def test_the_reader_has_a_tokens_text_before_the_client_acknowledges_it(scheme):
    """chatterbox: the client answers each token datagram with an ack datagram at once (it failed here before);
    stream: on loopback its QUIC ACK waits for its timer, so nothing is sent right after its frames (a guard)."""
    async def go() -> list[str]:
        order: list[str] = []
        async with served(_paced) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            proto = conn._protocol
            receive, build = proto.datagram_received, proto.session.datagrams_to_send

            def datagram_received(data, addr):
                order.append("recv")
                receive(data, addr)

            def datagrams_to_send(now):
                out = build(now)
                if out:
                    order.append("send")
                return out

            proto.datagram_received = datagram_received
            proto.session.datagrams_to_send = datagrams_to_send
            async with asyncio.timeout(T):
                async for _delta in conn.chat("x", scheme=scheme):
                    order.append("read")
        return order

    order = run(go())
    reads = [i for i, ev in enumerate(order) if ev == "read"]
    assert len(reads) == 4, order
    for i in reads:
        last = max(k for k in range(i) if order[k] == "recv")  # the datagram that brought the text
        # before: recv, send, read (the acks were built and sent first); now recv, read, send
        assert "send" not in order[last:i], order
        assert "send" in order[i:], order  # the acks still leave


def test_reader_times_are_when_the_reader_had_each_tokens_text():
    tokens = [b"Hel", b"lo", b" w", b"\xc3", b"\xa9", b"!"]  # one character split over two tokens
    reads = [(1.0, 5), (2.0, 7), (3.0, 8), (4.0, 9)]  # the reader had "Hello" at 1, " w" at 2, "é" at 3, "!" at 4
    assert endpoints.reader_times(tokens, reads) == [1.0, 1.0, 2.0, 3.0, 3.0, 4.0]
    assert endpoints.reader_times(tokens, reads[:2]) == [1.0, 1.0, 2.0]  # not read yet: left out


def test_a_quic_endpoints_render_is_its_readers_not_the_sdks_stamp(monkeypatch):
    """What ``testbed compare`` measures for the QUIC schemes: the instant the reader had the text, as sse-tcp's."""
    from tokenwire.transport import client as client_module

    read_at: list[float] = []
    anext_ = client_module.ChatStream.__anext__

    async def timed(self):
        piece = await anext_(self)
        read_at.append(time.monotonic())
        return piece

    monkeypatch.setattr(client_module.ChatStream, "__anext__", timed)

    async def go() -> dict:
        async with served(_paced) as server:
            args = endpoints.build_parser().parse_args(
                ["client", "--scheme", "chatterbox", "--host", "127.0.0.1", "--port", str(server.port), "--out", "-"])

            async def go_now() -> None:
                pass

            return await endpoints._quic_client(args, go_now, lambda k: None)

    result = run(go())
    assert len(result["render"]) == 4 == len(result["sdk_render"])
    # stamped by the reader (just after it got the piece), like sse-tcp's; the pieces are 30 ms apart
    assert all(any(0 <= r - a < 0.005 for a in read_at) for r in result["render"]), (result, read_at)
    assert all(r >= s for r, s in zip(result["render"], result["sdk_render"], strict=True))
