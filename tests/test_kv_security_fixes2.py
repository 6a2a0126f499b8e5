"""The KV channel's endpoint under hostile clients, as the chat port is: with a client CA a client must present a
verified certificate (and none of its fetches is resolved otherwise), half-open handshakes meet the chat port's
deadlines, bound and Retry, and a bandwidth forecaster that cannot be made falls back to ewma instead of failing
every fetch's start."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aioquic.asyncio import QuicConnectionProtocol
from aioquic.asyncio import connect as aioquic_connect
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from tokenwire.transport import tls
from tokenwire.transport.errors import ErrorCode, RemoteError
from tokenwire.transport.frames import KV_ALPN, KvFetch, encode_stream_frame
from tokenwire.transport.kv_channel import (
    ContextPlan,
    KVNotFound,
    KVServerSession,
    ServerFetch,
    ServerTuning,
    connect_kv,
    kv_quic_config,
    serve_kv,
)
from tokenwire.transport.kv_client import KVConnection
from tokenwire.transport.kv_controller import LEVELS
from tokenwire.transport.kv_server import KVServer
from tokenwire.transport.quic_io import open_client

from .test_handshake_limits import half_open as chat_half_open
from .test_handshake_limits import until
from .test_loopback import run

MODEL = "tenant-a-model"
IDS = list(range(1000, 1016))


class Provider:
    """A store that knows no context; counts what it was asked (a resolve is an answer about the store)."""

    def __init__(self) -> None:
        self.resolved: list[KvFetch] = []

    async def resolve(self, fetch: KvFetch) -> ContextPlan:
        self.resolved.append(fetch)
        raise KVNotFound("no such context")

    async def chunk(self, plan: ContextPlan, index: int, level: str) -> bytes:
        raise AssertionError("no chunk of an unknown context")


class TextProvider(Provider):
    """One stored chunk of IDS, sent as text (the token ids: no codec on either end)."""

    async def resolve(self, fetch: KvFetch) -> ContextPlan:
        self.resolved.append(fetch)
        n = len(IDS)
        # sizes no deadline could carry: the controller sends the chunk as text
        return ContextPlan(n, [n], [2 * n], [dict.fromkeys(LEVELS, 1 << 40)], (1, 1, 1), 0, "float16")

    async def chunk(self, plan: ContextPlan, index: int, level: str) -> bytes:
        assert level == "text"
        return b"".join(t.to_bytes(4, "little") for t in IDS)


class Raw(QuicConnectionProtocol):
    """A client on bare aioquic: keeps every event, writes what the test writes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[qe.QuicEvent] = []

    def quic_event_received(self, event: qe.QuicEvent) -> None:
        self.events.append(event)

    def closed_with(self) -> int:
        ends = [e for e in self.events if isinstance(e, qe.ConnectionTerminated)]
        assert ends, self.events
        return ends[0].error_code


def _fetch_frame() -> bytes:
    return encode_stream_frame(KvFetch(model=MODEL, deadline_ms=5000, token_ids=IDS))


async def fetch_with_finished(port: int, **client: Any) -> Raw:
    """A KV fetch queued before the handshake completed, so it leaves in the flight of the client's Finished and
    the server reads it in the same datagram; returns once the server has closed the connection."""
    cfg = kv_quic_config(tls.client_configuration(verify=False, **client))
    async with aioquic_connect("127.0.0.1", port, configuration=cfg, create_protocol=Raw,
                               wait_connected=False) as raw:
        assert isinstance(raw, Raw)
        raw._quic.send_stream_data(0, _fetch_frame())
        raw.transmit()
        await asyncio.wait_for(raw.wait_closed(), 10)
    return raw


@contextlib.asynccontextmanager
async def kv_client(port: int, **client: Any) -> AsyncIterator[KVConnection]:
    """A KV connection with a client certificate, through open_client (no warm-up, short timeout)."""
    cfg = kv_quic_config(tls.client_configuration(verify=False, **client))
    make = functools.partial(KVConnection, warm=False)
    async with open_client("127.0.0.1", port, configuration=cfg, create_protocol=make, timeout=5) as conn:
        assert isinstance(conn, KVConnection)
        yield conn


@pytest.fixture
def pki(tmp_path: Path) -> tuple[tls.ClientCertVerifier, dict[str, Path], dict[str, Path]]:
    """A client CA's verifier, a client pair it signed, and one from another CA (paths for client_configuration)."""
    ca, other = tls.make_ca(), tls.make_ca("someone else's CA")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    tls.make_client_cert(ca, "carol").write(tmp_path / "carol.pem", tmp_path / "carol.key")
    tls.make_client_cert(other, "mallory").write(tmp_path / "mallory.pem", tmp_path / "mallory.key")
    return (tls.ClientCertVerifier(tmp_path / "ca.pem"),
            {"certfile": tmp_path / "carol.pem", "keyfile": tmp_path / "carol.key"},
            {"certfile": tmp_path / "mallory.pem", "keyfile": tmp_path / "mallory.key"})


# ----------------------------------------------------------------------------------------- 1: client certificates
def test_with_a_client_ca_the_kv_port_serves_only_verified_certificates(pki):
    """The chat port refused a client without a certificate; the KV port served it every context and answered
    prefix probes. Now: closed with UNAUTHORIZED at the handshake's end, its fetch never reaches the store, and a
    certificate of another CA is refused the same way; carol's is served."""
    verifier, carol, mallory = pki
    seen: list[tuple[str, str]] = []

    async def go():
        provider = Provider()
        server = await serve_kv(provider, "127.0.0.1", 0, client_verifier=verifier,
                                on_unauthorized=lambda peer, why, closing=True: seen.append((peer, why)),
                                tuning=ServerTuning(forecaster="ewma"))
        try:
            certless = await fetch_with_finished(server.port)
            wrong_ca = await fetch_with_finished(server.port, **mallory)
            refused = (certless.closed_with(), wrong_ca.closed_with(), len(provider.resolved))
            async with kv_client(server.port, **carol) as conn:
                with pytest.raises(KVNotFound):  # the store was asked: carol is served
                    await conn.fetch_kv(model=MODEL, token_ids=IDS, deadline_ms=5000)
            return refused, len(provider.resolved), dict(server.stats)
        finally:
            server.close()

    refused, resolved, stats = run(go(), 30)
    assert refused == (ErrorCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED, 0)
    assert resolved == 1
    assert stats["unauthorized"] == 2 and stats["refused"] == 3  # the two early fetches, and carol's NOT_FOUND
    assert "no client certificate presented" in seen[0][1] and "rejected" in seen[1][1]


def test_a_kv_client_without_a_certificate_hears_why(pki):
    verifier, _, _ = pki

    async def go():
        server = await serve_kv(Provider(), "127.0.0.1", 0, client_verifier=lambda: verifier,
                                on_unauthorized=lambda peer, why, closing=True: None,
                                tuning=ServerTuning(forecaster="ewma"))
        try:
            async with connect_kv("127.0.0.1", server.port, verify=False, warm=False, timeout=5) as conn:
                with pytest.raises(RemoteError, match="client certificate required") as info:
                    await conn.fetch_kv(model=MODEL, token_ids=IDS, deadline_ms=5000)
                return info.value.code
        finally:
            server.close()

    assert run(go(), 30) == ErrorCode.UNAUTHORIZED


def _kv_daemon_config(tmp_path: Path, **server: Any) -> Any:
    from tokenwire.daemon.config import parse_config

    return parse_config({"server": {"listen": ["127.0.0.1:0"], **server}, "metrics": {"listen": ""},
                         "kv": {"enabled": True, "listen": "127.0.0.1:0", "directory": str(tmp_path / "kv"),
                                "forecaster": "ewma"}}, tmp_path / "tw.toml")


@contextlib.asynccontextmanager
async def kv_daemon(monkeypatch, cfg: Any) -> AsyncIterator[Any]:
    """The daemon with [kv] in this process (the codec's compile stubbed out: the subject is the endpoint)."""
    from tokenwire.daemon import kv_runtime
    from tokenwire.daemon.service import Daemon

    async def no_compile() -> None:
        return None

    monkeypatch.setattr(kv_runtime, "warm_up_codec", no_compile)
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


def test_the_daemons_kv_port_checks_client_certificates_against_server_client_ca(tmp_path, monkeypatch, pki):
    """/tmp/pr26D/mtls.toml + kv_nocert.py: the daemon's KV port served a client without a certificate."""
    _, carol, _ = pki

    async def go():
        async with kv_daemon(monkeypatch, _kv_daemon_config(tmp_path, client_ca=str(tmp_path / "ca.pem"))) as d:
            port, service = d.kv.server.port, d.kv.server.provider
            asked: list[KvFetch] = []
            store_resolve = service.resolve

            async def resolve(fetch: KvFetch) -> ContextPlan:
                asked.append(fetch)
                return await store_resolve(fetch)

            monkeypatch.setattr(service, "resolve", resolve)
            certless = await fetch_with_finished(port)
            store_asked = len(asked)
            async with kv_client(port, **carol) as conn:
                with pytest.raises(KVNotFound):
                    await conn.fetch_kv(model=MODEL, token_ids=IDS, deadline_ms=5000)
            errors = d.metrics.registry.get_sample_value("tokenwire_errors_total",
                                                         {"code": hex(ErrorCode.UNAUTHORIZED)})
            return certless.closed_with(), store_asked, len(asked), errors

    closed, certless_asked, asked, errors = run(go(), 60)
    assert closed == ErrorCode.UNAUTHORIZED
    assert certless_asked == 0 and asked == 1  # the store heard of carol's fetch alone
    assert errors == 1  # counted (and logged) as the chat port's certificate refusals are


# ------------------------------------------------------------------------------------------------ 2: handshakes
def half_open(port: int, n: int) -> list[socket.socket]:
    """``n`` KV clients that send their first flight (one Initial datagram each) and never answer."""
    return chat_half_open(port, n, alpn=KV_ALPN)


@contextlib.asynccontextmanager
async def kv_server(**kwargs: Any) -> AsyncIterator[KVServer]:
    server = await serve_kv(TextProvider(), "127.0.0.1", 0, tuning=ServerTuning(forecaster="ewma"), **kwargs)
    try:
        yield server
    finally:
        server.close()


async def fetch_text(port: int) -> list[str]:
    async with connect_kv("127.0.0.1", port, verify=False, warm=False, timeout=5) as conn:
        res = await conn.fetch_kv(model=MODEL, token_ids=IDS, deadline_ms=5000)
        return res.report.levels


def test_a_flood_of_initials_turns_on_retry_on_the_kv_port():
    """3,000 half-open Initials held 3,000 KV connections (~90 KB each) for the idle timeout. From the threshold
    (half of max_connections here) new clients get a Retry: no state for a spoofed source; a real client follows
    it and is served; the handshakes in progress meet their deadline, and Retry goes off once the load passed."""

    async def go():
        async with kv_server(max_connections=10) as server:
            guard = server.guard
            guard.timeout_s, guard.proven_timeout_s = 0.5, 1.0
            listener = server._quic_server
            received = [0]
            receive = listener.datagram_received

            def counted(data: bytes, addr: Any) -> None:
                received[0] += 1
                receive(data, addr)

            listener.datagram_received = counted  # type: ignore[method-assign]
            socks = half_open(server.port, 30)
            try:
                await until(lambda: received[0] >= 30)  # the whole flood read
                assert guard.retrying_since is not None
                held = len(server.protocols)
                levels = await fetch_text(server.port)  # through the Retry
                await until(lambda: guard.handshaking == 0, 5)  # the deadlines close the half-open ones
                now = time.monotonic()
                guard.relax(now)
                guard.relax(now + guard.timeout_s)  # calm for a whole handshake timeout
                return held, levels, guard.refused["timeout"], guard.retrying_since, server.connections
            finally:
                for s in socks:
                    s.close()

    held, levels, timeouts, retrying, connections = run(go(), 30)
    assert held == 5  # the threshold (10 // 2); the other 25 Initials made no connection
    assert levels == ["text"]
    assert timeouts == 5 and retrying is None and connections == 0


def test_kv_handshakes_in_progress_are_bounded_and_have_a_deadline(monkeypatch):
    """Without Retry (a threshold never reached), the bound and the deadline alone: past max_connections a new
    handshake is closed at once, and the rest are closed at the deadline; a real client is served after."""
    from tokenwire.transport.handshake_guard import HandshakeGuard

    monkeypatch.setattr(HandshakeGuard, "retry_threshold", lambda self: 1000)

    async def go():
        async with kv_server(max_connections=3) as server:
            guard = server.guard
            guard.timeout_s = 0.5
            socks = half_open(server.port, 5)
            try:
                await until(lambda: guard.handshaking + guard.refused["too_many"] >= 5)
                bounded = (guard.handshaking, guard.refused["too_many"])
                await until(lambda: guard.handshaking == 0, 5)
                levels = await fetch_text(server.port)
                return bounded, guard.refused["timeout"], levels
            finally:
                for s in socks:
                    s.close()

    assert run(go(), 30) == ((3, 2), 3, ["text"])


def test_kv_connections_past_the_limit_are_closed_and_their_fetches_never_resolved():
    async def go():
        async with kv_server(max_connections=1) as server, \
                connect_kv("127.0.0.1", server.port, verify=False, warm=False, timeout=5) as first:
            await first.fetch_kv(model=MODEL, token_ids=IDS, deadline_ms=5000)
            resolved = len(server.provider.resolved)  # type: ignore[attr-defined]
            second = await fetch_with_finished(server.port)
            return (second.closed_with(), len(server.provider.resolved) - resolved,  # type: ignore[attr-defined]
                    server.connections, server.stats["connections_refused"])

    assert run(go(), 30) == (ErrorCode.LIMIT_EXCEEDED, 0, 1, 1)


# ------------------------------------------------------------------------------------------------ 3: forecaster
class Unloadable:
    """A forecaster factory whose ``onnx`` cannot be made (a missing model), as ModelError says it."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __call__(self, kind: str) -> Any:
        from tokenwire.predictor.bandwidth import make_forecaster
        from tokenwire.predictor.onnx_session import ModelError

        self.asked.append(kind)
        if kind == "onnx":
            raise ModelError("/nowhere/bandwidth.onnx: no such model file")
        return make_forecaster(kind)


def _session(tuning: ServerTuning, factory: Any) -> KVServerSession:
    quic = QuicConnection(configuration=QuicConfiguration(is_client=True))
    return KVServerSession(quic, tuning=tuning, forecaster_factory=factory)


def _start(session: KVServerSession, sid: int, now: float = 1.0) -> ServerFetch:
    from tokenwire.transport.frames import StreamDecoder

    f = ServerFetch(sid, KvFetch(model=MODEL, deadline_ms=1000, token_ids=IDS), StreamDecoder(), now)
    session.fetches[sid] = f
    plan = ContextPlan(16, [16], [1000], [dict.fromkeys(LEVELS, 100)], (1, 1, 1), 0, "float16")
    session.start(sid, plan, now)
    return f


def test_a_forecaster_that_cannot_be_made_falls_back_to_ewma_once(caplog):
    """ModelError escaped the fetch's start: no KV_META, "Task exception was never retrieved", and each later
    timer tick raised AttributeError ('NoneType' has no attribute 'forecast'); the load was tried at every
    connection's first fetch. Now: planned with ewma, one warning, and no further attempt (the tuning is the
    server's, shared by its sessions)."""
    from tokenwire.predictor.bandwidth import EwmaForecaster

    caplog.set_level(logging.WARNING, "tokenwire.kv")
    tuning, factory = ServerTuning(forecaster="onnx"), Unloadable()
    first = _start(_session(tuning, factory), 0)
    other_connection = _start(_session(tuning, factory), 0)
    assert isinstance(first.forecaster, EwmaForecaster) and first.plan is not None
    assert isinstance(other_connection.forecaster, EwmaForecaster)
    assert factory.asked == ["onnx", "ewma", "ewma"] and tuning.forecaster == "ewma"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no such model file" in warnings[0] and "ewma" in warnings[0]


def test_a_fetch_whose_start_fails_is_not_left_half_started():
    """With a plan set and no forecaster, the session's timer polled the fetch and _decide raised at every tick."""

    def broken(kind: str) -> Any:
        raise RuntimeError("no forecaster at all")

    session = _session(ServerTuning(forecaster="ewma"), broken)
    with pytest.raises(RuntimeError):
        _start(session, 0)
    f = session.fetches[0]
    assert f.plan is None and f.controller is None and session._session_timer() is None  # (no poll timer)
    assert session.poll(2.0) == []  # nothing asked for on its behalf


def test_a_fetch_over_the_kv_port_with_an_unloadable_onnx_model_is_served(monkeypatch):
    """End to end: `[kv] forecaster = "onnx"` with a model that cannot load; the client got no KV_META and
    timed out. Any failure of the session's start now fails that fetch alone with INTERNAL, at once."""
    from tokenwire.predictor import bandwidth
    from tokenwire.predictor.onnx_session import ModelError

    real = bandwidth.make_forecaster

    def make(kind: str) -> Any:
        if kind == "onnx":
            raise ModelError("/nowhere/bandwidth.onnx: no such model file")
        return real(kind)

    monkeypatch.setattr(bandwidth, "make_forecaster", make)

    async def go():
        loop = asyncio.get_running_loop()
        unhandled: list[dict] = []
        loop.set_exception_handler(lambda _loop, ctx: unhandled.append(ctx))
        server = await serve_kv(TextProvider(), "127.0.0.1", 0, tuning=ServerTuning(forecaster="onnx"))
        try:
            levels = await fetch_text(server.port)

            def broken_start(*args: Any) -> None:
                raise AssertionError("a bug in the session's start")

            monkeypatch.setattr(KVServerSession, "start", broken_start)
            with pytest.raises(RemoteError) as info:
                await fetch_text(server.port)
            return levels, info.value.code, server.tuning.forecaster, unhandled
        finally:
            server.close()

    levels, code, forecaster, unhandled = run(go(), 30)
    assert levels == ["text"] and forecaster == "ewma"
    assert code == ErrorCode.INTERNAL and unhandled == []


def test_the_daemons_kv_start_plans_with_ewma_when_the_model_cannot_load(tmp_path, monkeypatch):
    """The start's one error line said fetches "will fail"; they now run on ewma, with no load tried at each
    connection's first fetch."""
    from tokenwire.daemon import kv_runtime
    from tokenwire.daemon.config import parse_config
    from tokenwire.predictor import bandwidth

    async def no_compile() -> None:
        return None

    monkeypatch.setattr(kv_runtime, "warm_up_codec", no_compile)
    monkeypatch.setattr(bandwidth.OnnxRunner, "_shared", {})
    monkeypatch.setattr(bandwidth, "default_model_path", lambda: tmp_path / "gone.onnx")
    cfg = parse_config({"kv": {"enabled": True, "listen": "127.0.0.1:0", "directory": str(tmp_path / "kv"),
                               "forecaster": "onnx"}}, tmp_path / "tw.toml")

    async def go():
        runtime = await kv_runtime.start_kv(cfg.kv)
        try:
            return runtime.server.tuning.forecaster
        finally:
            runtime.close()

    assert run(go(), 30) == "ewma"


def test_connect_kv_presents_a_client_certificate(pki):
    """connect_kv took no certfile/keyfile: with server.client_ca and [kv] set, no SDK KV client could fetch."""
    verifier, carol, _ = pki

    async def go():
        provider = Provider()
        server = await serve_kv(provider, "127.0.0.1", 0, client_verifier=verifier,
                                on_unauthorized=lambda peer, why, closing=True: None,
                                tuning=ServerTuning(forecaster="ewma"))
        try:
            async with connect_kv("127.0.0.1", server.port, verify=False, warm=False, timeout=5, **carol) as conn:
                with pytest.raises(KVNotFound):  # the store was asked: the certificate was verified
                    await conn.fetch_kv(model=MODEL, token_ids=IDS, deadline_ms=5000)
            return len(provider.resolved)
        finally:
            server.close()

    assert run(go(), 30) == 1


def test_the_kv_endpoints_refusals_and_retry_are_metrics():
    """The KV endpoint's guard and certificate check counted refusals where no scrape saw them."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from tokenwire.daemon.kv_metrics import KVMetrics
    from tokenwire.transport.kv_server import KVServer

    server = KVServer(provider=Provider())
    server.guard.refused.update({"timeout": 3, "too_many": 1, "failed": 5})
    server.stats["connections_refused"] += 2
    server.stats["unauthorized"] += 4
    registry = CollectorRegistry()
    # (get_sample_value stops at the first match: the families after these, the store's, are never read)
    service = SimpleNamespace(encodes=0, store=SimpleNamespace(stats=SimpleNamespace()))
    KVMetrics(registry, SimpleNamespace(server=server, service=service))
    value = registry.get_sample_value
    assert [value("tokenwire_kv_connections_refused_total", {"reason": r})
            for r in ("too_many", "timeout", "failed", "max_connections", "unauthorized")] == [1, 3, 5, 2, 4]
    assert value("tokenwire_kv_quic_retry_active") == 0
    server.guard.retrying_since = time.monotonic()
    assert value("tokenwire_kv_quic_retry_active") == 1


def test_idle_kv_connections_without_an_authorized_fetch_make_room_for_a_token_holder():
    """Tokens are checked per fetch: five idle token-less KV connections held every slot of max_sessions = 5, and a
    token holder got "too many KV connections" until their idle timeout, 60 s at a time. The oldest that has made
    no authorized fetch is closed to admit a new client; one with an authorized fetch never is. A fetch with a
    wrong token reaches on_unauthorized (the daemon's 0x105 count and rate-limited log)."""
    told: list[tuple[str, bool]] = []

    async def go():
        async with kv_server(max_connections=2, authorize=lambda token: token == "good",
                             on_unauthorized=lambda peer, why, closing: told.append((why, closing))) as server, \
                contextlib.AsyncExitStack() as stack:
            def enter(**kw: Any) -> Any:
                return stack.enter_async_context(connect_kv("127.0.0.1", server.port, verify=False, warm=False,
                                                            timeout=5, **kw))

            holder = await enter(auth_token="good")
            await holder.fetch_kv(model=MODEL, token_ids=IDS, deadline_ms=5000)  # authorized: never evicted
            idle = await enter()  # no token, no fetch: fills the last slot
            await until(lambda: server.connections == 2)
            with pytest.raises(RemoteError, match="missing or invalid auth token"):
                await (await enter(auth_token="bad")).fetch_kv(model=MODEL, token_ids=IDS, deadline_ms=5000)
            await until(lambda: idle.closed)  # made room for the newcomer
            newcomer = await enter(auth_token="good")
            levels = (await newcomer.fetch_kv(model=MODEL, token_ids=IDS, deadline_ms=5000)).report.levels
            return levels, str(idle.close_error), holder.closed, dict(server.stats)

    levels, why, holder_closed, stats = run(go(), 30)
    assert levels == ["text"] and not holder_closed
    assert "closed to admit another client" in why
    assert stats["evicted"] >= 2 and stats["connections_refused"] == 0  # the idle one, then the bad token's
    assert told == [("missing or invalid auth token on a KV fetch", False)]
