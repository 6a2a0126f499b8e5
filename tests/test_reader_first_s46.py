"""The render instant on a clean link (session 46): ``testbed compare`` stamped the QUIC schemes' render in the SDK's
event handling, before the reader's task ran and before the client's acknowledgements (~0.3-0.8 ms of CPU and sendmsg
on the test host), and sse-tcp's in its reader: it now stamps every scheme in its reader (``endpoints.reader_times``).
The acknowledgements stay ahead of the reader (tried the other way round, and reverted: a busy reader held them back),
and an ACK's ``g`` is the echoed packet's arrival time.
"""

from __future__ import annotations

import asyncio
import time

from tokenwire.testbed import endpoints
from tokenwire.transport.client import connect

from .test_sdk_server import T, client_kwargs, run, served


async def _paced(request):
    for piece in ("one", " two", " three", " four"):
        await asyncio.sleep(0.03)  # the reader waits for each piece, as a chat page does
        yield piece


def test_the_clients_acks_do_not_wait_for_a_busy_reader():
    """The client acknowledges a token datagram before the reader's task runs: a reader doing blocking work per delta
    (5 ms here: less than the 30 ms between tokens, so no datagram waits for it) must not hold the acks back. For a
    commit the client sent its acks after the reader instead (0.6 ms sooner text on loopback), and a reader blocking
    20 ms per delta raised the server's one-way latency samples from 0.8 to 21 ms and set off repeats: transport
    timing must not depend on the application's code."""
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
                async for _delta in conn.chat("x", scheme="chatterbox"):
                    order.append("read")
                    time.sleep(0.005)  # the application's own work, blocking the loop
        return order

    order = run(go())
    reads = [i for i, ev in enumerate(order) if ev == "read"]
    assert len(reads) == 4, order
    for i in reads[:-1]:  # (the last token's datagram comes with the answer's end: no ack datagram then)
        last = max(k for k in range(i) if order[k] == "recv")  # the datagram that brought the text
        assert "send" in order[last:i], order  # its ack left before the reader ran


def test_an_ack_says_when_the_echoed_packet_arrived_not_when_it_was_built():
    """ACK ``g`` is the echoed packet's receive time (docs/protocol.md): an ack built later (held while the path
    queues, or behind other work) carried its build time, which the server took as one-way delay."""
    from tokenwire.transport.chatterbox import TokenReceiver
    from tokenwire.transport.client_session import ClientRequest, _AckSource
    from tokenwire.transport.frames import Ack, Request, Tokens, decode_datagram

    req = ClientRequest(stream_id=0, request=Request(messages=[{"role": "user", "content": "x"}]), request_time=0.0,
                        receiver=TokenReceiver())
    req.receiver.on_frame(Tokens(handle=0, first=0, tokens=[b"a"], sent_us=5_000_000), now=10.0)
    built = _AckSource(req).build(10.5, 1200)
    assert isinstance(built, tuple)
    ack = decode_datagram(built[0])
    assert isinstance(ack, Ack) and ack.echo_us == 5_000_000 and ack.recv_us == 10_000_000


def test_reader_times_are_when_the_reader_had_each_tokens_text():
    tokens = [b"Hel", b"lo", b" w", b"\xc3", b"\xa9", b"!"]  # one character split over two tokens
    reads = [(1.0, 5), (2.0, 7), (3.0, 8), (4.0, 9)]  # the reader had "Hello" at 1, " w" at 2, "é" at 3, "!" at 4
    assert endpoints.reader_times(tokens, reads) == [1.0, 1.0, 2.0, 3.0, 3.0, 4.0]
    assert endpoints.reader_times(tokens, reads[:2]) == [1.0, 1.0, 2.0]  # not read yet: left out
    # an answer that ends inside a character: the SDK ends it as U+FFFD, read with the last delta
    assert endpoints.reader_times([b"ab", b"\xe2\x82"], [(1.0, 2), (2.0, 3)]) == [1.0, 2.0]


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
