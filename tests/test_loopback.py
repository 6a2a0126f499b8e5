"""Real aioquic connections on loopback: exact delivery, injected loss, and hostile peers."""

from __future__ import annotations

import asyncio

import pytest
from aioquic.asyncio import connect as quic_connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events as qe

from tokenwire.daemon.cli import main
from tokenwire.testbed.udp_relay import UdpRelay
from tokenwire.transport.client import connect
from tokenwire.transport.errors import ErrorCode, RemoteError
from tokenwire.transport.frames import Ack, Repair, Request, Tokens, encode_frame, encode_stream_frame
from tokenwire.transport.server import serve
from tokenwire.transport.tls import client_configuration, dev_cert

WORDS = [f" w{i}" if i % 7 else f" ü{i}\n" for i in range(400)]  # multi-byte text too


def run(coro, timeout: float = 60.0):
    async def bounded():
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


async def word_source(request):
    n = request.max_tokens or len(WORDS)
    for w in WORDS[:n]:
        await asyncio.sleep(0.002)
        yield w


async def slow_source(request):
    for w in WORDS[:150]:
        await asyncio.sleep(0.01)
        yield w


def client_kwargs():
    return {"cadata": dev_cert().cert_pem, "server_name": "localhost"}


@pytest.mark.parametrize("scheme", ["chatterbox", "stream", "duplicate"])
def test_every_token_arrives_exactly_once_in_order(scheme):
    async def go():
        server = await serve(word_source, host="127.0.0.1", port=0)
        try:
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                stream = conn.chat("hi", scheme=scheme)
                deltas = [d async for d in stream]
            return deltas, stream
        finally:
            server.close()

    deltas, stream = run(go())
    assert "".join(deltas) == "".join(WORDS)
    assert stream.tokens == [w.encode() for w in WORDS]
    assert stream.stats.digest_verified and stream.stats.tokens == len(WORDS)
    assert stream.stats.scheme == scheme


@pytest.mark.parametrize("scheme", ["chatterbox", "stream", "duplicate"])
@pytest.mark.parametrize("loss", ["iid:0.15", "ge:0.01,0.1"])
def test_exact_text_under_injected_loss(scheme, loss):
    async def go():
        server = await serve(word_source, host="127.0.0.1", port=0)
        relay = await UdpRelay(("127.0.0.1", server.port), delay_ms=5, loss=loss, seed=2).start()
        try:
            async with connect("127.0.0.1", relay.port, timeout=20, **client_kwargs()) as conn:
                stream = conn.chat("hi", scheme=scheme, max_tokens=200)
                text = await stream.collect()
            return text, stream, relay.down.dropped
        finally:
            relay.close()
            server.close()

    text, stream, dropped = run(go())
    assert dropped > 0
    assert text == "".join(WORDS[:200])
    assert stream.stats.digest_verified and stream.stats.finish_reason == "length"


def test_max_tokens_and_concurrent_requests_on_one_connection():
    async def go():
        server = await serve(word_source, host="127.0.0.1", port=0)
        try:
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                streams = [
                    conn.chat("q", scheme=s, max_tokens=n)
                    for s, n in [("chatterbox", 50), ("stream", 80), ("duplicate", 120), ("chatterbox", 400)]
                ]
                return await asyncio.gather(*(s.collect() for s in streams))
        finally:
            server.close()

    texts = run(go())
    assert texts == ["".join(WORDS[:n]) for n in (50, 80, 120, 400)]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_tokens": 0}, "max_tokens: 0 out of range"),
    ({"model": "m" * 200}, "model: string of 200 characters"),
    ({"resume": (b"short", [])}, "resume: "),
], ids=["max_tokens", "model", "resume_id"])
def test_invalid_request_is_refused_locally_and_the_connection_lives_on(kwargs, message):
    """The server closes the whole connection on a malformed request (every other request on it dies too):
    the SDK refuses it before sending, with the same check, and the connection keeps working."""
    async def go():
        server = await serve(word_source, host="127.0.0.1", port=0)
        try:
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                running = conn.chat("first", max_tokens=30)
                with pytest.raises(ValueError, match=message):
                    conn.chat("q", **kwargs)
                return await running.collect(), await conn.chat("after", max_tokens=5).collect()
        finally:
            server.close()

    assert run(go()) == ("".join(WORDS[:30]), "".join(WORDS[:5]))


def test_a_request_refused_locally_does_not_use_up_the_auth_token():
    """The token goes with the first request of a connection only. A first request refused locally used to
    count as that one: the next request went without the token and the server closed with UNAUTHORIZED."""
    async def go():
        server = await serve(word_source, host="127.0.0.1", port=0, authorize=lambda token: token == "t")
        try:
            async with connect("127.0.0.1", server.port, auth_token="t", **client_kwargs()) as conn:
                with pytest.raises(ValueError, match=r"max_tokens: 0 out of range"):
                    conn.chat("q", max_tokens=0)
                with pytest.raises(ValueError, match=r"request_id: "):
                    conn.attach(b"short")
                return await conn.chat("after", max_tokens=5).collect()
        finally:
            server.close()

    assert run(go()) == "".join(WORDS[:5])


def test_the_auth_token_survives_the_loss_of_the_first_request():
    """Streams are independent: when the datagram of a connection's first request is lost, the second
    request reaches the server first. It used to go without the token (only the first carried it), and
    the server closed the connection with UNAUTHORIZED. Requests now carry it until one is answered."""
    async def go():
        server = await serve(word_source, host="127.0.0.1", port=0, authorize=lambda token: token == "t")
        relay = await UdpRelay(("127.0.0.1", server.port)).start()
        decide, drops = relay.up.decide, []

        def drop_first_after_handshake(elapsed, size):
            if armed and not drops:
                drops.append(size)
                return None
            return decide(elapsed, size)

        relay.up.decide = drop_first_after_handshake
        armed = False
        try:
            async with connect("127.0.0.1", relay.port, auth_token="t", **client_kwargs()) as conn:
                armed = True  # the next client datagram carries the first request only
                first = conn.chat("one", max_tokens=20)
                second = conn.chat("two", max_tokens=10)
                texts = await asyncio.gather(first.collect(), second.collect())
                third = await conn.chat("three", max_tokens=5).collect()
            return texts, third, drops
        finally:
            relay.close()
            server.close()

    texts, third, drops = run(go())
    assert len(drops) == 1
    assert texts == ["".join(WORDS[:20]), "".join(WORDS[:10])] and third == "".join(WORDS[:5])


class RawProtocol(QuicConnectionProtocol):
    """A hostile or broken peer: speaks QUIC with our ALPN but sends whatever the test wants."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.terminated: qe.ConnectionTerminated | None = None
        self.stream_data = b""

    def quic_event_received(self, event):
        if isinstance(event, qe.ConnectionTerminated):
            self.terminated = event
        elif isinstance(event, qe.StreamDataReceived):
            self.stream_data += event.data


async def hostile(port: int, action, **tls) -> qe.ConnectionTerminated:
    config = client_configuration(**(tls or client_kwargs()))
    async with quic_connect("127.0.0.1", port, configuration=config, create_protocol=RawProtocol) as proto:
        action(proto)
        proto.transmit()
        await asyncio.wait_for(proto.wait_closed(), 10)
        return proto._quic._close_event


def raw_client(port: int):
    """A plain aioquic connection with our ALPN, for sending what the SDK never would."""
    config = client_configuration(**client_kwargs())
    return quic_connect("127.0.0.1", port, configuration=config, create_protocol=RawProtocol)


def _stream(proto, data: bytes):
    sid = proto._quic.get_next_available_stream_id()
    proto._quic.send_stream_data(sid, data)


GOOD_REQUEST = Request(messages=[{"role": "user", "content": "x"}])
ATTACKS = {
    "garbage on a request stream": (lambda p: _stream(p, b"\x00\x00\x00\x05hello"), ErrorCode.MALFORMED_FRAME),
    # (an oversized request, or one of another protocol version, is refused alone; an oversized frame after
    # one closes: test_session_refusals.py)
    "repair before any request": (lambda p: _stream(p, encode_stream_frame(Repair(0, 5))), ErrorCode.MALFORMED_FRAME),
    "garbage datagram": (lambda p: p._quic.send_datagram_frame(b"\xc1\xc1\xc1"), ErrorCode.MALFORMED_FRAME),
    "token datagram from a client": (
        lambda p: p._quic.send_datagram_frame(encode_frame(Tokens(0, 0, [b"x"]))),
        ErrorCode.MALFORMED_FRAME,
    ),
    "request on a unidirectional stream": (
        lambda p: p._quic.send_stream_data(
            p._quic.get_next_available_stream_id(is_unidirectional=True), encode_stream_frame(GOOD_REQUEST)
        ),
        ErrorCode.MALFORMED_FRAME,
    ),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_bad_peers_get_a_typed_close_and_others_keep_streaming(name):
    action, code = ATTACKS[name]

    async def go():
        server = await serve(slow_source, host="127.0.0.1", port=0)
        try:
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                good = conn.chat("hi")
                good_task = asyncio.ensure_future(good.collect())
                await asyncio.sleep(0.1)  # the good answer is mid-flight
                close = await hostile(server.port, action)
                text = await good_task
            return close, text, good.stats, server.stats
        finally:
            server.close()

    close, text, stats, server_stats = run(go())
    assert close is not None and close.error_code == code, close
    assert close.frame_type is None  # an application close, not a transport error
    assert text == "".join(WORDS[:150]) and stats.digest_verified
    assert server_stats.protocol_errors == 1


def test_a_request_cancelled_in_the_same_packet_is_no_error_in_the_server(caplog):
    """REQUEST and the client's FIN in one packet: the session reports it received and cancelled at once, and
    the server's accept() raised KeyError in the event loop (the cancel behind it was never handled)."""

    async def go():
        server = await serve(slow_source, host="127.0.0.1", port=0)
        try:
            async with raw_client(server.port) as proto:
                sid = proto._quic.get_next_available_stream_id()
                proto._quic.send_stream_data(sid, encode_stream_frame(GOOD_REQUEST), end_stream=True)
                proto.transmit()
                async with asyncio.timeout(10):
                    while server.stats.cancelled < 1:
                        await asyncio.sleep(0.01)
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                return server.stats, await conn.chat("next", max_tokens=3).collect()
        finally:
            server.close()

    stats, text = run(go())
    # both requests counted (the first was not: cancelled outnumbered requests), the first as cancelled
    assert stats.requests == 2 and stats.cancelled == 1 and text == "".join(WORDS[:3])
    assert not [r for r in caplog.records if r.exc_info]  # nothing escaped into the event loop


def test_cancel_from_another_task_ends_the_readers_loop():
    """A "stop" button runs in another task than the `async for`: the reader stayed blocked for ever."""

    async def go():
        server = await serve(slow_source, host="127.0.0.1", port=0)
        try:
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                stream = conn.chat("long")
                got = []

                async def read():
                    async for delta in stream:
                        got.append(delta)

                reader = asyncio.ensure_future(read())
                while not got:
                    await asyncio.sleep(0.01)
                await stream.cancel()
                await asyncio.wait_for(reader, 5)
                return len(got)
        finally:
            server.close()

    assert 0 < run(go()) < 150  # ended early, without a timeout


def test_ack_datagram_for_unknown_request_is_ignored():
    async def go():
        server = await serve(slow_source, host="127.0.0.1", port=0)
        try:
            async with raw_client(server.port) as proto:
                proto._quic.send_datagram_frame(encode_frame(Ack(handle=12345, next_index=3)))
                proto.transmit()
                await asyncio.sleep(0.2)
                return proto.terminated
        finally:
            server.close()

    assert run(go()) is None


def test_source_failure_is_a_typed_error_for_that_request_only():
    async def flaky(request):
        if request.prompt == "boom":
            yield "partial"
            raise RuntimeError("model crashed")
        async for w in word_source(request):
            yield w

    async def go():
        server = await serve(flaky, host="127.0.0.1", port=0)
        try:
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                bad = conn.chat("boom")
                good = conn.chat("fine", max_tokens=30)
                with pytest.raises(RemoteError) as info:
                    await bad.collect()
                return info.value, await good.collect()
        finally:
            server.close()

    err, good_text = run(go())
    assert err.code == ErrorCode.UPSTREAM_ERROR and "model crashed" not in str(err)  # no internals leak
    assert good_text == "".join(WORDS[:30])


def test_leaving_an_answer_early_stops_its_generation_and_forgets_it():
    stopped: list[asyncio.Event] = []

    async def endless(request):
        ended = asyncio.Event()
        stopped.append(ended)
        try:
            for i in range(100_000):
                await asyncio.sleep(0.002)
                yield f" e{i}"
        finally:
            ended.set()  # the server cancelled the feeding task: the source is closed

    async def go():
        server = await serve(endless, host="127.0.0.1", port=0)
        try:
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                async with conn.chat("a") as first:  # leaving the block cancels the answer
                    async for _ in first:
                        break
                second = conn.chat("b")
                async for _ in second:
                    break
                await second.cancel()
                await second.cancel()  # twice: harmless
                left = dict(conn._protocol.streams)
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in stopped)), 10)
                sources = len(stopped)
                return left, sources, await conn.chat("c", max_tokens=5).collect()
        finally:
            server.close()

    left, sources, text = run(go())
    assert left == {}  # a cancelled stream is not kept with its text on a long-lived connection
    assert sources == 2  # both generations were stopped (the wait above did not time out)
    assert text == "".join(f" e{i}" for i in range(5))


def test_unauthorized_connection_is_closed():
    async def go():
        server = await serve(word_source, host="127.0.0.1", port=0, authorize=lambda tok: tok == "s3cret")
        try:
            async with connect("127.0.0.1", server.port, auth_token="wrong", **client_kwargs()) as conn:
                with pytest.raises(RemoteError) as info:
                    await conn.chat("hi").collect()
            async with connect("127.0.0.1", server.port, auth_token="s3cret", **client_kwargs()) as conn:
                ok = await conn.chat("hi", max_tokens=5).collect()
            return info.value, ok
        finally:
            server.close()

    err, ok = run(go())
    assert err.code == ErrorCode.UNAUTHORIZED
    assert ok == "".join(WORDS[:5])


def test_a_failing_authorize_check_ends_the_connection_with_a_typed_error():
    def broken(token):
        raise KeyError("token database unreachable")

    async def go():
        server = await serve(word_source, host="127.0.0.1", port=0, authorize=broken)
        try:
            async with connect("127.0.0.1", server.port, auth_token="t", **client_kwargs()) as conn:
                with pytest.raises(RemoteError) as info:
                    await asyncio.wait_for(conn.chat("hi").collect(), 10)  # before: no answer, ever
            return info.value
        finally:
            server.close()

    err = run(go())
    assert err.code == ErrorCode.INTERNAL and "could not check the auth token" in str(err)


def test_max_tokens_counts_the_tokens_long_pieces_become():
    async def long_pieces(request):
        for c in "abcdef":
            yield c * 2000  # eight 256-byte tokens each

    async def go():
        server = await serve(long_pieces, host="127.0.0.1", port=0)
        try:
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                s = conn.chat("hi", max_tokens=3)
                return await s.collect(), s.stats
        finally:
            server.close()

    text, stats = run(go())
    assert text == "a" * 768
    assert stats.tokens == 3


def test_demo_command_runs_and_verifies(tmp_path, capsys):
    out = tmp_path / "demo.json"
    rc = main(
        ["demo", "--tokens", "40", "--rate", "200", "--delay-ms", "5", "--quiet", "--link", "relay", "--json", str(out)]
    )
    assert rc == 0
    import json

    data = json.loads(out.read_text())
    assert set(data["schemes"]) == {"chatterbox", "stream", "duplicate"}
    assert all(r["digest_verified"] and r["tokens"] == 40 for r in data["schemes"].values())
    assert "stall ratio" in capsys.readouterr().out


@pytest.mark.parametrize("ecn", [False, True], ids=["plain", "ecn"])
def test_handshake_timeout_is_one_clean_connection_error(ecn):
    """A server that never answers: ConnectionError after ``timeout``, and no orphaned future left behind.

    aioquic shields the handshake waiter; cancelled by the timeout, that waiter later got the connection's
    ConnectionError with nobody to read it ("Future exception was never retrieved" on stderr).
    """
    import gc
    import socket

    async def run() -> list[dict]:
        loop = asyncio.get_running_loop()
        seen: list[dict] = []
        loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # receives, never answers
            silent.bind(("127.0.0.1", 0))
            with pytest.raises(ConnectionError, match="no QUIC handshake"):
                async with connect("127.0.0.1", silent.getsockname()[1], verify=False, timeout=0.3, ecn=ecn):
                    pass
        await asyncio.sleep(0)
        gc.collect()
        await asyncio.sleep(0)
        return seen

    assert asyncio.run(run()) == []


def test_an_idle_timeout_shorter_than_the_connect_timeout_is_no_answer_not_a_failed_handshake():
    """With idle_timeout under timeout, aioquic's idle close ended the wait as HandshakeError "QUIC handshake ...
    failed: Idle timeout": a refusal, in words, while nobody had answered (tokenwire chat printed it at every
    reconnect during an outage)."""
    import socket

    from tokenwire.transport.client import HandshakeError

    async def run() -> BaseException:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
            silent.bind(("127.0.0.1", 0))
            try:
                async with connect("127.0.0.1", silent.getsockname()[1], verify=False, timeout=5, idle_timeout=0.3):
                    pass
            except ConnectionError as exc:
                return exc
        raise AssertionError("connected to a socket that never answers")

    err = asyncio.run(run())
    assert not isinstance(err, HandshakeError), err
    assert str(err).startswith("no QUIC handshake with 127.0.0.1:"), err
    assert "within 0.3 s (the connection's idle timeout)" in str(err)


def test_server_gone_silent_ends_the_answer_after_the_idle_timeout():
    """The path goes dark mid-answer (a dead server looks the same): the answer ends with an error that says
    what happened, after the client's own idle timeout (1.5 s here, not the 60 s default)."""
    import time

    async def go():
        server = await serve(slow_source, host="127.0.0.1", port=0)
        relay = await UdpRelay(("127.0.0.1", server.port)).start()
        try:
            async with connect("127.0.0.1", relay.port, idle_timeout=1.5, **client_kwargs()) as conn:
                stream, got, dark_at = conn.chat("hi"), [], 0.0
                with pytest.raises(RemoteError) as info:
                    async for delta in stream:
                        got.append(delta)
                        if len(got) == 3:
                            relay._forward = lambda *a: None  # nothing crosses either way from now on
                            dark_at = time.monotonic()
                return info.value, time.monotonic() - dark_at, got
        finally:
            relay.close()
            server.close()

    err, waited, got = run(go(), timeout=30)
    assert "no packet from the server for 1.5 s (QUIC idle timeout)" in str(err)
    assert len(got) >= 3 and waited < 20  # the default (60 s) would have outlasted run()'s 30 s bound


def test_a_slow_first_token_outlasts_the_idle_timeout():
    """A model that thinks longer than the idle timeout before its first token: the client keeps the
    connection alive (QUIC PINGs while it waits) and the answer arrives. Before, both ends sat silent and
    the connection died of the idle timeout although nothing was wrong."""
    async def thinker(request):
        await asyncio.sleep(3.0)  # three idle timeouts of silence
        for w in WORDS[:10]:
            yield w

    async def go():
        server = await serve(thinker, host="127.0.0.1", port=0)
        try:
            async with connect("127.0.0.1", server.port, idle_timeout=1.0, **client_kwargs()) as conn:
                return await conn.chat("think first").collect()
        finally:
            server.close()

    assert run(go(), timeout=30) == "".join(WORDS[:10])


def test_handshake_failure_tells_tls_alerts_from_application_closes():
    """tokenwire's application codes (0x100-0x10f) share numbers with QUIC's CRYPTO_ERROR range; only a
    transport close (it has a frame type) carries a TLS alert."""
    from tokenwire.transport.quic_io import _handshake_failure

    tls = _handshake_failure("h", 1, qe.ConnectionTerminated(error_code=0x12A, frame_type=6, reason_phrase="bad"))
    app = _handshake_failure("h", 1, qe.ConnectionTerminated(error_code=0x106, frame_type=None,
                                                             reason_phrase="too many sessions"))
    assert tls.tls_alert == 42 and str(tls) == "TLS handshake with h:1 failed (TLS alert 42): bad"
    assert app.tls_alert is None and str(app) == "QUIC handshake with h:1 failed: too many sessions (code 0x106)"


def test_a_failed_handshake_prints_nothing_in_an_app_without_logging(tmp_path):
    """An application that set up no logging got aioquic's own warning on stderr ("Error: 298, reason:
    self-signed certificate") beside the typed HandshakeError."""
    import subprocess
    import sys
    from pathlib import Path

    from tokenwire.transport.tls import make_self_signed

    ca = tmp_path / "other.pem"
    ca.write_bytes(make_self_signed(("localhost",)).cert_pem)
    script = f"""
import asyncio
from tokenwire.transport.client import HandshakeError, connect
from tokenwire.transport.server import serve
from tests.test_loopback import word_source

async def main():
    srv = await serve(word_source, host="127.0.0.1", port=0)
    try:
        async with connect("127.0.0.1", srv.port, cafile={str(ca)!r}, server_name="localhost"):
            pass
    except HandshakeError as exc:
        print("alert", exc.tls_alert)
    finally:
        srv.close()

asyncio.run(main())
"""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "alert 42" and done.stderr == "", (done.stdout, done.stderr)
