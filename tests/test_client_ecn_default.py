"""The SDK's clients report ECN by default: a server marking ECT(1) for L4S queues needs the counts to answer CE
marks, and the default clients sent none (a probe: 170 CE marks on a chat, tokenwire_ecn_ce_total 0)."""

from __future__ import annotations

import asyncio

import pytest

from tokenwire.transport.client import connect
from tokenwire.transport.ecn_socket import ECT1, EcnDatagramTransport, ecn_supported
from tokenwire.transport.marking import L4SPolicy
from tokenwire.transport.server import serve
from tokenwire.transport.tls import dev_cert

pytestmark = pytest.mark.skipif(not ecn_supported(), reason="no per-datagram ECN on this platform")


async def _llm(request):
    for piece in ["one", " two", " three"]:
        await asyncio.sleep(0.01)
        yield piece


async def _chat(**kwargs):
    server = await serve(_llm, host="127.0.0.1", port=0, marking=L4SPolicy)
    try:
        async with connect("127.0.0.1", server.port, cadata=dev_cert().cert_pem, server_name="localhost",
                           **kwargs) as conn:
            transport = conn._protocol._transport
            text = await conn.chat("hi").collect()
            # what the client's ack datagrams told the server: cumulative counts (Not-ECT, ECT(1), ECT(0), CE)
            reported = [p.server_session._last_ecn for p in server.protocols]
            return text, transport, reported
    finally:
        server.close()
        await server.wait_closed()


def test_connect_reads_and_reports_ecn_by_default():
    text, transport, reported = asyncio.run(_chat())
    assert text == "one two three"
    assert isinstance(transport, EcnDatagramTransport)
    assert transport.received_by_codepoint[ECT1] > 0  # the server's ECT(1) packets were read as such...
    assert len(reported) == 1 and reported[0] is not None and reported[0][ECT1] > 0  # ...and reported back


def test_ecn_false_keeps_the_plain_socket():
    text, transport, reported = asyncio.run(_chat(ecn=False))
    assert text == "one two three"
    assert not isinstance(transport, EcnDatagramTransport)
    assert reported == [None]  # no counts came
