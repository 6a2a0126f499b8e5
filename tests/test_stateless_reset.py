"""QUIC Stateless Reset (RFC 9000 10.3): a client of a server that restarted learns in one round trip that its
connection is gone, instead of waiting out the idle timeout (60 s by default).

aioquic (==1.7.2) neither sends resets nor detects them, and gives its connection IDs random tokens; the servers
(``quic_io.ValidatingQuicServer``: the daemon's chat listeners, its KV endpoint, the SDK's ``serve``) now give them
tokens derived from a key of their TLS private key and answer a short header of an unknown connection with a reset,
and the clients (``SessionProtocol``) end the connection on one. The core is ``transport.stateless_reset``.

A "restart" here is a server whose every outgoing datagram is dropped from the moment it is stopped (its
CONNECTION_CLOSE lost, as a crashed or killed process sends none), then a new one on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from typing import Any

import pytest
from aioquic.quic.connection import END_STATES, QuicConnection, QuicConnectionState

from tokenwire.daemon.config import parse_config
from tokenwire.daemon.service import Daemon
from tokenwire.daemon.telemetry import Metrics
from tokenwire.transport import quic_io
from tokenwire.transport.client import connect
from tokenwire.transport.client_session import ClientSession
from tokenwire.transport.errors import RemoteError
from tokenwire.transport.kv_channel import ServerTuning, connect_kv, serve_kv
from tokenwire.transport.quic_io import ValidatingQuicServer, give_reset_tokens, serve_quic
from tokenwire.transport.server import serve
from tokenwire.transport.server_session import ServerSession
from tokenwire.transport.stateless_reset import (
    MIN_RESET_SIZE,
    RESET_REASON,
    Resetter,
    TokenBucket,
    build_reset,
    is_reset,
    min_packet_size,
    private_key_der,
    reset_size,
    reset_token,
    static_key,
)
from tokenwire.transport.tls import client_configuration, dev_cert, make_self_signed, server_configuration

from .quicpair import Pair
from .test_kv_security_fixes2 import IDS, MODEL, TextProvider
from .test_loopback import run
from .test_sdk_server import client_kwargs

PORTS = iter(range(23600, 23700))  # (this file's range)
KEY = bytes(range(32))
CID = bytes.fromhex("0102030405060708")


def short_header(size: int, cid: bytes = CID) -> bytes:
    """A short-header datagram of ``size`` bytes for connection ID ``cid`` (random after it)."""
    return bytes([0x40 | 0x01]) + cid + os.urandom(size - 1 - len(cid))


# --------------------------------------------------------------------------------------------------- the core
def test_tokens_are_a_keyed_function_of_the_connection_id():
    assert reset_token(KEY, CID) == reset_token(KEY, CID)
    assert len(reset_token(KEY, CID)) == 16
    assert reset_token(KEY, CID) != reset_token(KEY, CID[:-1] + b"\x09")
    assert reset_token(KEY, CID) != reset_token(bytes(32), CID)


def test_the_static_key_is_the_tls_keys_and_the_endpoints():
    """The same private key and address give the same key (a restart); another key, another address (RFC 9000
    21.11: a second listener or the KV port must not hand out a chat connection's token), or no key, another."""
    der = private_key_der(dev_cert().private_key)
    assert der is not None
    assert static_key(der, "::|4433") == static_key(der, "::|4433")
    assert static_key(der, "::|4433") != static_key(der, "::|4434")
    other = private_key_der(make_self_signed(("localhost",)).private_key)
    assert static_key(other, "::|4433") != static_key(der, "::|4433")
    assert static_key(None, "::|4433") != static_key(None, "::|4433")  # random, per call
    assert private_key_der(None) is None


def test_the_static_key_is_the_hosts():
    """Hosts of a fleet with one key file and the same ``listen`` address (the default ``[::]:4433``) have keys of
    their own (RFC 9000 21.11: another host would answer a connection's ID with the reset that ends it): the host's
    name is in the key, the same name (a restart) gives the same key. None: this host's name."""
    der = private_key_der(dev_cert().private_key)
    assert der is not None
    assert static_key(der, "::|4433", "node-a") == static_key(der, "::|4433", "node-a")
    assert static_key(der, "::|4433", "node-a") != static_key(der, "::|4433", "node-b")
    assert static_key(der, "::|4433") == static_key(der, "::|4433", socket.gethostname())
    assert static_key(der, "::|4433", "a") != static_key(der, ":|4433", "a:")  # (no two pairs give the same bytes)


def test_a_reset_is_a_short_header_with_the_token_last():
    token = reset_token(KEY, CID)
    for size in (MIN_RESET_SIZE, 28, 43, 100):
        reset = build_reset(token, size)
        assert len(reset) == size and reset[-16:] == token
        assert reset[0] >> 6 == 0b01  # header form 0, fixed bit 1
    assert len({build_reset(token, 28)[:12] for _ in range(8)}) == 8  # the bits before the token are unpredictable
    with pytest.raises(ValueError):
        build_reset(token, MIN_RESET_SIZE - 1)


def test_a_reset_is_smaller_than_its_trigger_and_small_datagrams_get_none():
    """RFC 9000 10.3.3: smaller than the trigger, at least 21 bytes; under the smallest packet a server with this
    connection ID length can read (29 bytes for 8-byte IDs) nothing is answered, and every reset is under it: a
    reset never draws a reset (no loop)."""
    assert min_packet_size(8) == 29
    assert reset_size(28, 8) is None and reset_size(MIN_RESET_SIZE, 8) is None
    assert reset_size(29, 8) == 28
    assert reset_size(1200, 8) == 28
    for trigger in range(29, 1500):
        size = reset_size(trigger, 8)
        assert size is not None and MIN_RESET_SIZE <= size < trigger and reset_size(size, 8) is None
    assert reset_size(22, 0) == MIN_RESET_SIZE and reset_size(MIN_RESET_SIZE, 0) is None  # (zero-length IDs)
    assert reset_size(40, 20) is None and reset_size(41, 20) == 40


def test_detection_compares_the_last_16_bytes_of_a_short_header():
    token = reset_token(KEY, CID)
    reset = build_reset(token, 28)
    assert is_reset(reset, [token])
    assert is_reset(reset, [b"", os.urandom(16), token])  # any of the tokens held; an empty one never matches
    assert not is_reset(reset, [])
    assert not is_reset(reset, [os.urandom(16)])  # a random token
    assert not is_reset(reset, [reset_token(KEY, b"\x09" * 8)])  # another connection ID's
    assert not is_reset(bytes([reset[0] | 0x80]) + reset[1:], [token])  # a long header
    assert not is_reset(reset[-20:], [token])  # under 21 bytes
    assert not is_reset(b"", [token])


def test_the_send_limit_is_a_token_bucket():
    bucket = TokenBucket(rate=10.0, burst=3)
    assert [bucket.allow(100.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.allow(100.05)  # half a token back
    assert bucket.allow(100.2)
    assert [bucket.allow(200.0) for _ in range(4)] == [True, True, True, False]  # refilled to the burst, no more
    assert not bucket.allow(199.0)  # (a clock that went back gives nothing)
    with pytest.raises(ValueError):
        TokenBucket(rate=0.0)
    resetter = Resetter(KEY, 8, TokenBucket(rate=1.0, burst=2))
    replies = [resetter.reply(short_header(40), 5.0) for _ in range(3)]
    assert [r is not None for r in replies] == [True, True, False]
    assert (resetter.sent, resetter.limited) == (2, 1)


def test_a_resetter_answers_short_headers_of_unknown_connections_only():
    resetter = Resetter(KEY, 8)
    reset = resetter.reply(short_header(40), 0.0)
    assert reset is not None and len(reset) == 28 and reset[-16:] == reset_token(KEY, CID)
    long_header = bytes([0xE0]) + b"\x00\x00\x00\x01" + b"\x08" + CID + b"\x08" + CID + bytes(1200)  # a Handshake
    assert resetter.reply(long_header, 0.0) is None
    assert resetter.reply(short_header(28), 0.0) is None
    assert resetter.reply(reset, 0.0) is None  # its own reset: no loop
    assert Resetter(bytes(32), 8).reply(reset, 0.0) is None  # nor another server's
    assert resetter.sent == 1


# --------------------------------------------------------------------------- aioquic's names (1.7.2): pinned
class TokenedPair(Pair):
    """The in-memory pair, its server connection given a resetter's tokens before its first datagram (as
    ValidatingQuicServer's create_protocol does)."""

    resetter = Resetter(KEY, 8)

    def _server_for(self, data: bytes) -> ServerSession:
        if self.server is None:
            server = super()._server_for(data)
            give_reset_tokens(server.quic, self.resetter)
        return super()._server_for(data)


def test_a_servers_tokens_reach_its_client_in_the_transport_parameters_and_new_connection_ids():
    """The client holds, for every connection ID the server gave it, the token the server's key gives that ID: the
    first in the transport parameters (aioquic writes them when it reads the first Initial), the others in
    NEW_CONNECTION_ID frames (``_replenish_connection_ids``, replaced on the instance). Pins the aioquic names
    this relies on: ``_host_cids`` (``cid``, ``stateless_reset_token``, ``was_sent``), ``_replenish_connection_ids``,
    and on the client ``_peer_cid`` and ``_peer_cid_available``."""
    pair = TokenedPair()
    pair.exchange(rounds=40)
    client, server = pair.client.quic, pair.server.quic  # type: ignore[union-attr]
    assert "_replenish_connection_ids" in vars(server)
    assert len(server._host_cids) > 1 and all(c.was_sent for c in server._host_cids)
    for cid in server._host_cids:
        assert cid.stateless_reset_token == reset_token(KEY, cid.cid)
    held = [client._peer_cid, *client._peer_cid_available]
    assert len(held) == len(server._host_cids)
    for cid in held:
        assert cid.stateless_reset_token == reset_token(KEY, cid.cid)
    assert QuicConnection._replenish_connection_ids is not None


# -------------------------------------------------------------------------------------------- the servers
class _FakeTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


PEER = ("::ffff:10.0.0.2", 5555, 0, 0)


def _listener(**kwargs: Any) -> tuple[ValidatingQuicServer, _FakeTransport]:
    server = ValidatingQuicServer(configuration=server_configuration(), create_protocol=lambda *a, **k: None,
                                  resetter=Resetter(KEY, 8, **kwargs))
    transport = _FakeTransport()
    server.connection_made(transport)  # type: ignore[arg-type]
    return server, transport


def test_a_listener_resets_unknown_short_headers_and_nothing_else():
    """One reset for a short header of an unknown connection ID, counted; none for a long header (a Handshake of a
    connection gone, an Initial under 1,200 bytes), none for its own reset (loop), none under 29 bytes; one while
    the port is not accepting yet (the daemon's start: only a process before it can have had that connection)."""

    async def go() -> tuple[list[tuple[bytes, Any]], dict[str, int]]:
        server, transport = _listener()
        before = dict(quic_io.stateless_resets)
        server.datagram_received(short_header(60), PEER)
        handshake = bytes([0xE0]) + b"\x00\x00\x00\x01" + b"\x08" + CID + b"\x08" + CID + b"\x40\x20" + bytes(32)
        server.datagram_received(handshake, PEER)
        initial = bytes([0xC0]) + b"\x00\x00\x00\x01" + b"\x08" + CID + b"\x08" + CID + b"\x00\x40\x20" + bytes(32)
        server.datagram_received(initial, PEER)
        server.datagram_received(transport.sent[0][0], PEER)  # its own reset, reflected back
        server.datagram_received(short_header(28), PEER)
        server.accepting = False
        server.datagram_received(short_header(30, b"\x07" * 8), PEER)
        server.datagram_received(handshake, PEER)
        return transport.sent, {k: quic_io.stateless_resets[k] - before[k] for k in before}

    sent, delta = run(go(), 30)
    assert [(len(d), a) for d, a in sent] == [(28, PEER), (28, PEER)]
    assert sent[0][0][-16:] == reset_token(KEY, CID) and sent[1][0][-16:] == reset_token(KEY, b"\x07" * 8)
    assert delta == {"sent": 2, "limited": 0}
    exported = Metrics().registry.get_sample_value("tokenwire_stateless_resets_sent_total")
    assert exported == quic_io.stateless_resets["sent"]


def test_a_listener_limits_its_resets():
    async def go() -> tuple[int, dict[str, int]]:
        server, transport = _listener(limit=TokenBucket(rate=1.0, burst=5))
        before = dict(quic_io.stateless_resets)
        for _ in range(50):  # a flood from one forged address: 5 answered
            server.datagram_received(short_header(1200), PEER)
        return len(transport.sent), {k: quic_io.stateless_resets[k] - before[k] for k in before}

    n, delta = run(go(), 30)
    assert n == 5 and delta == {"sent": 5, "limited": 45}


def test_serve_quic_derives_the_key_from_the_tls_key_and_keeps_it():
    """The same certificate and port, a later start: the same key (a restart); another certificate: another key.
    A certificate reloaded into the running configuration leaves the key as it was."""
    port = next(PORTS)

    async def key_of(config: Any) -> bytes:
        server = await serve_quic("127.0.0.1", port, configuration=config, create_protocol=lambda *a, **k: None)
        try:
            assert server.resetter is not None
            key = server.resetter.key
            config.private_key = make_self_signed(("localhost",)).private_key  # (what a reload does)
            assert server.resetter.key == key
            return key
        finally:
            server.close()
            await server.wait_released()

    async def go() -> tuple[bytes, bytes, bytes]:
        return (await key_of(server_configuration()), await key_of(server_configuration()),
                await key_of(server_configuration(cert=make_self_signed(("localhost",)))))

    first, again, other = run(go(), 30)
    assert first == again and other != first


def test_serve_quic_puts_the_host_name_in_the_key(monkeypatch):
    """The same certificate and address on a host of another name (a fleet, or this host renamed): another key;
    the same name again (a restart): the same key."""
    port = next(PORTS)
    cert = dev_cert()

    async def key_on(host_name: str) -> bytes:
        monkeypatch.setattr(quic_io.socket, "gethostname", lambda: host_name)
        server = await serve_quic("127.0.0.1", port, configuration=server_configuration(cert=cert),
                                  create_protocol=lambda *a, **k: None)
        try:
            assert server.resetter is not None
            return server.resetter.key
        finally:
            server.close()
            await server.wait_released()

    async def go() -> list[bytes]:
        return [await key_on(name) for name in ("node-a", "node-b", "node-a")]

    a, b, a_again = run(go(), 30)
    der = private_key_der(cert.private_key)
    assert a == a_again == static_key(der, f"127.0.0.1|{port}", "node-a") and b != a


# ------------------------------------------------------------------------------ a restart, end to end (loopback)
class _Mute:
    """A transport that sends nothing: a stopped server's last datagrams (its CONNECTION_CLOSE) never arrive."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def sendto(self, *args: Any, **kwargs: Any) -> None:
        pass

    def sendto_ecn(self, *args: Any, **kwargs: Any) -> None:  # (the ECN-capable transport's)
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


async def _crash(server: Any) -> None:
    """Stop ``server`` (the SDK's or the KV endpoint's) without a word to its clients, and free its port."""
    for proto in list(server.protocols):
        proto._transport = _Mute(proto._transport)
    server.close()
    if hasattr(server, "wait_closed"):
        await server.wait_closed()
    else:
        await server._quic_server.wait_released()


IDLE_S = 10.0


async def _words(request: Any):
    for word in ("a", "b", "c"):
        yield word


@contextlib.asynccontextmanager
async def _connected(port: int, *, idle: float = IDLE_S):
    """A server on ``port`` and a client connected to it that has had one answer: (connection, server)."""
    server = await serve(_words, host="127.0.0.1", port=port, idle_timeout=idle)
    try:
        async with connect("127.0.0.1", port, idle_timeout=idle, **client_kwargs()) as conn:
            assert "".join([p async for p in conn.chat("hi", max_tokens=5)]) == "abc"
            yield conn, server
    finally:
        server.close()
        await server.wait_closed()


async def _fail_time(answer: Any) -> tuple[float, BaseException]:
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as caught:
        _ = [p async for p in answer]
    return time.monotonic() - t0, caught.value


def test_after_a_restart_the_next_request_fails_at_once():
    """The next request on a connection to a server that restarted (same key): the new server resets it, and the
    request fails with the lost connection's error (``path_lost``) naming the reset, within a round trip, not after
    the 10 s idle timeout (it took 9.8-9.9 s before)."""
    port = next(PORTS)

    async def go() -> tuple[float, BaseException, bool]:
        async with _connected(port) as (conn, server):
            await _crash(server)
            again = await serve(_words, host="127.0.0.1", port=port, idle_timeout=IDLE_S)
            try:
                elapsed, err = await _fail_time(conn.chat("hi", max_tokens=5))
                return elapsed, err, conn.closed
            finally:
                again.close()
                await again.wait_closed()

    elapsed, err, closed = run(go(), 60)
    assert elapsed < 1.0, elapsed
    assert isinstance(err, RemoteError) and err.path_lost and RESET_REASON in str(err)
    assert closed


def test_after_a_restart_an_answer_in_flight_fails_within_a_ping():
    """An answer streaming when its server crashed: the client's next ping (a second at most while it waits for
    tokens) draws the new server's reset, and the answer fails then, not after the idle timeout."""
    port = next(PORTS)
    first_word = asyncio.Event()

    async def slow(request: Any):
        yield "a"
        first_word.set()
        await asyncio.sleep(3600)
        yield "b"

    async def go() -> tuple[float, BaseException]:
        server = await serve(slow, host="127.0.0.1", port=port, idle_timeout=IDLE_S)
        again = None
        try:
            async with connect("127.0.0.1", port, idle_timeout=IDLE_S, **client_kwargs()) as conn:
                answer = conn.chat("hi", max_tokens=5)
                assert await answer.__anext__() == "a"
                await _crash(server)
                again = await serve(_words, host="127.0.0.1", port=port, idle_timeout=IDLE_S)
                return await _fail_time(answer)
        finally:
            for s in (server, again):
                if s is not None:
                    s.close()
                    await s.wait_closed()

    elapsed, err = run(go(), 60)
    assert elapsed < 3.0, elapsed  # (the client pings after 0.25-1 s of silence)
    assert isinstance(err, RemoteError) and err.path_lost and RESET_REASON in str(err)


def test_a_restart_with_another_key_still_waits_for_the_idle_timeout():
    """A new server with another key (an ephemeral certificate: a key made at each start) sends resets whose
    token the client does not hold: ignored, the request fails at the idle timeout as before."""
    port = next(PORTS)

    async def go() -> tuple[float, BaseException]:
        async with _connected(port, idle=2.0) as (conn, server):
            await _crash(server)
            again = await serve(_words, host="127.0.0.1", port=port, idle_timeout=2.0,
                                cert=make_self_signed(("localhost",)))
            sent = quic_io.stateless_resets["sent"]
            try:
                elapsed, err = await _fail_time(conn.chat("hi", max_tokens=5))
                assert quic_io.stateless_resets["sent"] > sent  # (it did answer: with tokens of its own key)
                return elapsed, err
            finally:
                again.close()
                await again.wait_closed()

    elapsed, err = run(go(), 60)
    assert elapsed > 1.5, elapsed
    assert isinstance(err, RemoteError) and err.path_lost and "idle timeout" in str(err)


def test_a_forged_reset_closes_nothing():
    """Datagrams from the server's address that end in a random token, or in the token of another connection's
    ID, do not end a connection: both connections still answer."""
    port = next(PORTS)

    async def go() -> list[str]:
        server = await serve(_words, host="127.0.0.1", port=port, idle_timeout=IDLE_S)
        try:
            async with connect("127.0.0.1", port, **client_kwargs()) as one, \
                    connect("127.0.0.1", port, **client_kwargs()) as two:
                texts = []
                for c in (one, two):
                    texts.append("".join([p async for p in c.chat("hi", max_tokens=5)]))
                resetter = server._quic_server.resetter  # type: ignore[union-attr]
                assert resetter is not None
                p1, p2 = one._protocol, two._protocol
                addr = p2._quic._network_paths[0].addr
                p2.datagram_received(build_reset(os.urandom(16), 28), addr)
                other_token = resetter.token(p1._quic._peer_cid.cid)  # one's token, sent to two
                p2.datagram_received(build_reset(other_token, 28), addr)
                own_token = resetter.token(p2._quic._peer_cid.cid)
                p2.datagram_received(build_reset(own_token, 28), ("::ffff:10.9.9.9", 4433, 0, 0))  # another address
                p2.datagram_received(bytes([0xC0]) + build_reset(own_token, 40)[1:], addr)  # a long header
                assert not two.closed and not one.closed
                for c in (one, two):
                    texts.append("".join([p async for p in c.chat("hi", max_tokens=5)]))
                return texts
        finally:
            server.close()
            await server.wait_closed()

    assert run(go(), 60) == ["abc"] * 4


def test_a_kv_fetch_after_a_restart_fails_at_once():
    """The KV client: a fetch on a connection to a KV endpoint that restarted (same key) fails with the lost
    connection's error, naming the reset, at once."""
    port = next(PORTS)

    async def go() -> tuple[float, BaseException]:
        server = await serve_kv(TextProvider(), "127.0.0.1", port, tuning=ServerTuning(forecaster="ewma"))
        again = None
        try:
            async with connect_kv("127.0.0.1", port, verify=False, warm=False, timeout=5) as conn:
                res = await conn.fetch_kv(model=MODEL, token_ids=IDS, deadline_ms=5000)
                assert res.report.levels == ["text"]
                await _crash(server)
                again = await serve_kv(TextProvider(), "127.0.0.1", port, tuning=ServerTuning(forecaster="ewma"))
                t0 = time.monotonic()
                with pytest.raises(RemoteError) as caught:
                    await conn.fetch_kv(model=MODEL, token_ids=IDS, deadline_ms=5000)
                return time.monotonic() - t0, caught.value
        finally:
            for s in (server, again):
                if s is not None:
                    s.close()
                    await s._quic_server.wait_released()

    elapsed, err = run(go(), 60)
    assert elapsed < 1.0, elapsed
    assert isinstance(err, RemoteError) and err.path_lost and RESET_REASON in str(err)


@pytest.mark.parametrize("key_file", [True, False], ids=["key_file", "ephemeral"])
def test_a_restarted_daemon_resets_its_old_connections(tmp_path, key_file):
    """The daemon (in-process), its certificate and key from files: a client connected to it, the daemon stopped
    without its closes reaching the client (as a killed process), a new daemon with the same files on the same
    port: the client's next request fails at once, with the reset's reason. With the ephemeral self-signed
    certificate (no server.certificate) each start has a key of its own: the request waits for the idle timeout
    (2 s here), as before."""
    cafile, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    dev_cert().write(cafile, key)
    port = next(PORTS)
    server: dict[str, Any] = {"listen": [f"127.0.0.1:{port}"], "idle_timeout_s": 2.0}
    if key_file:
        server.update(certificate=str(cafile), private_key=str(key))
    cfg = parse_config({"server": server, "metrics": {"listen": ""}})
    trust: dict[str, Any] = {"cadata": cafile.read_bytes()} if key_file else {"verify": False}

    async def go() -> tuple[float, BaseException]:
        daemon = Daemon(cfg)
        await daemon.start()
        again = None
        try:
            async with connect("127.0.0.1", port, server_name="localhost", idle_timeout=2.0, **trust) as conn:
                assert [p async for p in conn.chat("hi", max_tokens=2)]
                for listener in daemon._servers:
                    for proto in set(listener._protocols.values()):
                        proto._transport = _Mute(proto._transport)
                await daemon.stop()
                for listener in daemon._servers:  # (stop() only schedules the sockets' close)
                    await listener.wait_released()
                again = Daemon(cfg)
                await again.start()
                return await _fail_time(conn.chat("hi", max_tokens=2))
        finally:
            for d in (daemon, again):
                if d is not None:
                    await d.stop()

    elapsed, err = run(go(), 60)
    assert isinstance(err, RemoteError) and err.path_lost
    if key_file:
        assert elapsed < 1.0, elapsed
        assert RESET_REASON in str(err)
    else:
        assert elapsed > 1.5, elapsed
        assert "idle timeout" in str(err)


# ------------------------------------------------------------- a live connection's IDs are never reset by its server
class _ServerProtocol(quic_io.SessionProtocol):
    def __init__(self, quic: QuicConnection, stream_handler: Any = None) -> None:
        super().__init__(quic, stream_handler, session_factory=ServerSession)


CLIENT_ADDR = ("::ffff:10.0.0.2", 5555, 0, 0)
SERVER_ADDR = ("::ffff:10.0.0.1", 4433, 0, 0)


class _Wire:
    """A :class:`ValidatingQuicServer` on a fake transport and an aioquic client connection, moved by hand: what
    reaches the server, and when, is the test's (no socket, no timer)."""

    def __init__(self) -> None:
        self.server = ValidatingQuicServer(configuration=server_configuration(), create_protocol=_ServerProtocol,
                                           resetter=Resetter(KEY, 8))
        self.transport = _FakeTransport()
        self.server.connection_made(self.transport)  # type: ignore[arg-type]
        self.client = QuicConnection(configuration=client_configuration(cadata=dev_cert().cert_pem,
                                                                        server_name="localhost"))
        self.now = time.monotonic()
        self.client.connect(SERVER_ADDR, now=self.now)

    def up(self) -> None:
        """The client's datagrams to the server."""
        for data, _ in self.client.datagrams_to_send(now=self.now):
            self.server.datagram_received(data, CLIENT_ADDR)

    def down(self) -> list[bytes]:
        """What the server sent since the last call, read by the client."""
        sent = [data for data, _ in self.transport.sent]
        self.transport.sent.clear()
        for data in sent:
            self.client.receive_datagram(data, SERVER_ADDR, now=self.now)
        return sent

    def exchange(self, rounds: int = 6) -> None:
        for _ in range(rounds):
            self.now += 0.001
            self.up()
            self.down()


def test_a_client_that_moves_to_a_just_issued_id_at_once_is_not_reset():
    """RFC 9000 5.1.1: a client may move to a new connection ID at any time. The client retires the ID it uses, the
    server's answer carries a NEW_CONNECTION_ID in its place, and the client's next datagram goes to that ID before
    the server read anything else: aioquic (1.7.2) adds an issued ID to its server's table only at the connection's
    next event processing, so the datagram missed the table and the server reset its own live connection
    (``SessionProtocol.transmit`` now registers the IDs a send issued before the datagrams leave)."""

    async def go() -> None:
        wire = _Wire()
        wire.exchange()
        assert wire.client._handshake_complete
        table = wire.server._table
        (protocol,) = set(table.values())
        issued = {c.cid for c in protocol._quic._host_cids}
        before = dict(quic_io.stateless_resets)
        wire.client.change_connection_id()  # retire the ID in use: the server issues one more in its place
        wire.now += 0.001
        wire.up()
        new = {c.cid for c in protocol._quic._host_cids} - issued
        assert len(new) == 1 and all(c.was_sent for c in protocol._quic._host_cids)
        (fresh,) = new
        assert fresh in table  # in the table before the datagram that carries it reaches the client
        wire.down()
        held = [c for c in wire.client._peer_cid_available if c.cid == fresh]
        assert held
        wire.client._peer_cid_available.remove(held[0])
        wire.client._peer_cid_available.insert(0, held[0])
        wire.client.change_connection_id()  # at once, to the ID just issued
        assert wire.client._peer_cid.cid == fresh
        wire.client.send_ping(1)
        wire.now += 0.001
        wire.up()
        assert table.found is True
        assert {k: quic_io.stateless_resets[k] - before[k] for k in before} == {"sent": 0, "limited": 0}
        assert all(len(data) > 28 for data in wire.down())  # (the answer: no reset among what the server sent)
        wire.exchange()
        assert wire.client._state not in END_STATES and table.get(fresh) is protocol
        assert len(table) == len(table.ids_of(protocol))  # (registered twice: one entry each, in step)

    run(go(), 30)


def test_a_port_that_stops_accepting_for_a_while_resets_no_live_connection():
    """A live connection's datagrams while its server is not accepting (``KVServer.accepting`` set False, then True
    again) are dropped, not reset: the connection goes on once the port accepts again (every short header was
    answered with a reset, live connections' included). An ID the server does not know is still reset."""

    async def go() -> None:
        wire = _Wire()
        wire.exchange()
        table = wire.server._table
        (protocol,) = set(table.values())
        before = dict(quic_io.stateless_resets)
        wire.server.accepting = False
        wire.client.send_ping(1)
        wire.now += 0.001
        wire.up()
        assert wire.down() == []
        wire.server.datagram_received(short_header(60, b"\x07" * 8), CLIENT_ADDR)  # (an ID nobody has)
        assert [len(data) for data in wire.down()] == [28]
        assert {k: quic_io.stateless_resets[k] - before[k] for k in before} == {"sent": 1, "limited": 0}
        wire.server.accepting = True
        wire.client.send_ping(2)
        wire.exchange()
        assert wire.client._state not in END_STATES and protocol._quic._state not in END_STATES
        assert quic_io.stateless_resets["sent"] - before["sent"] == 1

    run(go(), 30)


def _client_protocol(wire: _Wire) -> quic_io.SessionProtocol:
    """The shell of a client (:meth:`~quic_io.SessionProtocol._stateless_reset`) around the wire's connected client."""
    protocol = quic_io.SessionProtocol(wire.client, session_factory=ClientSession)
    protocol.connection_made(_FakeTransport())  # type: ignore[arg-type]
    return protocol


def test_a_client_ignores_the_tokens_of_ids_it_has_not_used():
    """RFC 9000 10.3.1: a client compares a datagram with the tokens of the connection IDs it sends to, not those
    it holds unused (``_peer_cid_available``, issued by NEW_CONNECTION_ID): a reset with such a token, from the
    server's address, ends nothing; the one of the ID in use does."""

    async def go() -> None:
        wire = _Wire()
        wire.exchange()
        protocol = _client_protocol(wire)
        unused = wire.client._peer_cid_available
        assert unused and all(c.cid != wire.client._peer_cid.cid for c in unused)
        for cid in unused:
            protocol.datagram_received(build_reset(reset_token(KEY, cid.cid), 28), SERVER_ADDR)
        assert wire.client._state not in END_STATES and protocol.terminated is None
        protocol.datagram_received(build_reset(reset_token(KEY, wire.client._peer_cid.cid), 28), SERVER_ADDR)
        assert protocol.terminated is not None and protocol.terminated.reason_phrase == RESET_REASON

    run(go(), 30)


def test_a_closing_client_takes_no_reset():
    """A connection already closing (or draining) is not ended by a reset, even a valid one: it ends as it was
    ending, with its own close's reason, when its closing period is over (RFC 9000 10.3.1 is about a connection
    in use; aioquic drops what comes in that state)."""

    async def go() -> None:
        wire = _Wire()
        wire.exchange()
        protocol = _client_protocol(wire)
        wire.client.close(error_code=0, reason_phrase="done here")
        protocol.transmit()
        assert wire.client._state in END_STATES
        reset = build_reset(reset_token(KEY, wire.client._peer_cid.cid), 28)
        assert not protocol._stateless_reset(reset, SERVER_ADDR)
        protocol.datagram_received(reset, SERVER_ADDR)
        assert wire.client._state is not QuicConnectionState.TERMINATED and protocol.terminated is None
        assert wire.client._close_event is not None and wire.client._close_event.reason_phrase == "done here"
        wire.client._close_end()  # (its closing period over)
        protocol._process_events()
        assert protocol.terminated is not None and protocol.terminated.reason_phrase == "done here"

    run(go(), 30)
