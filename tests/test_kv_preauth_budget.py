"""What KV connections that have made no authorized fetch may make the endpoint hold, all together.

Each such connection may hold ~2 MB of fetch streams (its UNAUTHORIZED_WINDOW, two of the largest KV_FETCHes, beside
its first stream's); the endpoint bounded them only by max_connections (limits.max_sessions, 10,000 by default), so
clients without a token could make the daemon hold ~20 GB. Now they hold at most ``unauthorized_memory`` together
(the daemon's limits.unauthorized_memory_mb, as on the chat port), and past it the one holding the most is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from pathlib import Path
from typing import Any

from aioquic.quic import events as qe

from tokenwire.transport.errors import ErrorCode
from tokenwire.transport.frames import MAX_KV_TOKENS, KvFetch, encode_stream_frame
from tokenwire.transport.handshake_guard import REFUSALS_LOG_S
from tokenwire.transport.kv_client import connect_kv
from tokenwire.transport.kv_protocol import MAX_KV_FETCH_BYTES
from tokenwire.transport.kv_server import (
    UNAUTHORIZED_CONNECTION_BYTES,
    UNAUTHORIZED_MEMORY_BYTES,
    KVServer,
    KVServerProtocol,
)

from .test_handshake_limits import until
from .test_kv_preauth_fixes2 import MODEL, TOKEN, IdsProvider, _almost_whole, _raw, _settled, kv_server
from .test_kv_security_fixes2 import kv_daemon
from .test_loopback import run

BUDGET = 2 << 20  # room for one connection's two fetch streams short of their last byte (1.3 MB), not two


def _closed_by_server(raw: Any) -> qe.ConnectionTerminated | None:
    """The server's CONNECTION_CLOSE, as soon as the client has read it (not at the end of its draining period)."""
    return raw._quic._close_event


def _done(raw: Any) -> bool:
    return _closed_by_server(raw) is not None or _settled(raw._quic)


def _proto(server: KVServer, n: int) -> KVServerProtocol:
    """The server's side of its ``n``-th connection (in the order they were made)."""
    return sorted(server.protocols, key=lambda p: p._handshake_began)[n]


def _recount(server: KVServer) -> int:
    """What every open connection with no authorized fetch holds now, counted afresh."""
    return sum(p.held_bytes() for p in server.protocols if not p.authorized and not p.closing)


def _authorize(raw: Any) -> None:
    quic = raw._quic
    quic.send_stream_data(quic.get_next_available_stream_id(),
                          encode_stream_frame(KvFetch(model="m", deadline_ms=5000, token_ids=[1, 2, 3], auth=TOKEN)),
                          end_stream=True)
    raw.transmit()


def test_kv_connections_without_a_token_hold_at_most_the_budget_together_and_the_largest_goes_first(caplog):
    """Six token-less connections, each making the server hold 1.3 MB (7.9 MB in all, 13 GB over 10,000), beside a
    small one and a token holder holding 5 MB past its authorized fetch: the token-less ones hold at most the budget
    together, the largest holders are closed with LIMIT_EXCEEDED and told why, counted under evicted, logged once
    and summed up; the small one and the token holder are served on."""
    caplog.set_level(logging.WARNING, logger="tokenwire.kv")

    async def go() -> dict[str, Any]:
        async with kv_server(lambda token: token == TOKEN, unauthorized_memory=BUDGET) as server, \
                contextlib.AsyncExitStack() as stack:
            counted = _watch(server)
            holder = await stack.enter_async_context(_raw(server.port))
            await until(lambda: server.connections == 1, 10)
            _authorize(holder)
            await until(lambda: _proto(server, 0).authorized, 10)
            _almost_whole(holder._quic, 8)  # (its full window: all 8 come)
            holder.transmit()
            await until(lambda: _proto(server, 0).held_bytes() >= 8 * MAX_KV_FETCH_BYTES, 30)
            small = await stack.enter_async_context(_raw(server.port))
            await until(lambda: server.connections == 2, 10)
            small._quic.send_stream_data(small._quic.get_next_available_stream_id(),
                                         struct.pack(">I", 256) + bytes(99))
            small.transmit()
            await until(lambda: server.unauthorized_held == 103, 10)
            holder_held = _proto(server, 0).held_bytes()
            flood = []
            peak = 0
            for _ in range(6):
                before = set(server.protocols)
                raw = await stack.enter_async_context(_raw(server.port))
                await until(lambda before=before: any(p.established for p in server.protocols - before), 10)
                _almost_whole(raw._quic, 16)
                raw.transmit()
                flood.append(raw)
                await until(lambda: all(_done(r) for r in flood), 60)
                peak = max(peak, server.unauthorized_held, _recount(server))
            await until(lambda: sum(_closed_by_server(r) is not None for r in flood) == server.stats["evicted"], 10)
            return {"peak": peak, "counted_peak": max(counted), "counts": len(counted),
                    "held": server.unauthorized_held, "recount": _recount(server),
                    "ends": [_closed_by_server(r) for r in flood], "stats": dict(server.stats),
                    "small": _closed_by_server(small), "holder": _closed_by_server(holder),
                    "holder_held": holder_held, "holder_authorized": _proto(server, 0).authorized,
                    "warned": [r.getMessage() for r in caplog.records if "closing KV connection" in r.getMessage()],
                    "flushed": _flushed(server, caplog)}

    out = run(go(), 180)
    assert out["peak"] <= BUDGET, out["peak"]  # 7.9 MB before
    assert out["counted_peak"] <= BUDGET and out["counts"] > 6, out  # never past it after a datagram is read
    assert out["held"] == out["recount"] and 2 * MAX_KV_FETCH_BYTES <= out["held"] <= BUDGET  # (one is left)
    closed = [e for e in out["ends"] if e is not None]
    assert len(closed) == 5 and out["stats"]["evicted"] == out["stats"]["evicted_memory"] == len(closed)
    assert all(e.error_code == ErrorCode.LIMIT_EXCEEDED and "before authorization" in e.reason_phrase
               for e in closed)
    assert out["small"] is None  # the largest holders went first, not the oldest connection
    assert out["holder"] is None and out["holder_authorized"] and out["holder_held"] > BUDGET  # never counted
    assert len(out["warned"]) == 1 and "limits.unauthorized_memory_mb" in out["warned"][0]
    assert f"closed {len(closed) - 1} more KV connections" in out["flushed"]


def _watch(server: KVServer) -> list[int]:
    """What the connections not yet authorized hold together after each datagram counted (each call of
    ``account_unauthorized``, as it returns)."""
    seen: list[int] = []
    count = server.account_unauthorized

    def counting(proto: KVServerProtocol, held: int) -> None:
        count(proto, held)
        seen.append(server.unauthorized_held)

    server.account_unauthorized = counting  # type: ignore[method-assign]
    return seen


def _flushed(server: KVServer, caplog: Any) -> str:
    """The line summing up the closes held back since the first one's warning ("" with none logged)."""
    caplog.clear()
    at = server.memory_sheds.logged_at
    if at is None:
        return ""
    server.flush_logs(at + REFUSALS_LOG_S + 0.25)
    return "\n".join(r.getMessage() for r in caplog.records)


def test_what_a_kv_connection_held_stops_counting_when_it_authorizes_or_ends():
    async def go() -> tuple[int, int, int, int]:
        async with kv_server(lambda token: token == TOKEN, unauthorized_memory=BUDGET) as server:
            async with _raw(server.port) as raw:
                await until(lambda: server.connections == 1, 10)
                _almost_whole(raw._quic, 1)
                raw.transmit()
                await until(lambda: server.unauthorized_held >= MAX_KV_FETCH_BYTES, 30)
                during = server.unauthorized_held
            await until(lambda: not server.protocols, 10)
            after_end = server.unauthorized_held
            async with _raw(server.port) as raw:
                await until(lambda: server.connections == 1, 10)
                _almost_whole(raw._quic, 1)
                raw.transmit()
                await until(lambda: server.unauthorized_held >= MAX_KV_FETCH_BYTES, 30)
                _authorize(raw)  # (its second stream: the first still short of its last byte)
                await until(lambda: _proto(server, 0).authorized, 10)
                after_auth = server.unauthorized_held
                assert _closed_by_server(raw) is None
            return during, after_end, after_auth, server.stats["evicted"]

    during, after_end, after_auth, evicted = run(go(), 90)
    assert MAX_KV_FETCH_BYTES <= during <= BUDGET and after_end == 0 and after_auth == 0 and evicted == 0


async def _two_holding(server: KVServer, stack: contextlib.AsyncExitStack) -> list[Any]:
    """Two connections with no token, each holding two of the largest fetch streams short of their last byte
    (1.3 MB each, 2.6 MB together: more than one connection may hold, UNAUTHORIZED_CONNECTION_BYTES), once the
    server has counted them."""
    raws = []
    for n in (1, 2):
        raw = await stack.enter_async_context(_raw(server.port))
        await until(lambda n=n: server.connections == n, 10)
        _almost_whole(raw._quic, 2)
        raw.transmit()
        raws.append(raw)
    await until(lambda: server.unauthorized_held >= 4 * MAX_KV_FETCH_BYTES or any(map(_closed_by_server, raws)), 30)
    return raws


def test_the_budget_is_read_at_each_count():
    """A callable (the daemon's reload of limits.unauthorized_memory_mb): a smaller budget applies at the next
    datagram counted (here the setting's minimum, 1 MiB: in force as one connection's allowance, ~2 MB)."""
    budget = [4 << 20]

    async def go() -> tuple[list[qe.ConnectionTerminated | None], int, int]:
        async with kv_server(lambda token: token == TOKEN, unauthorized_memory=lambda: budget[0]) as server, \
                contextlib.AsyncExitStack() as stack:
            raws = await _two_holding(server, stack)
            before = server.stats["evicted"]
            budget[0] = 1 << 20
            raws[1]._quic.send_ping(1)  # (the next datagram counted)
            raws[1].transmit()
            await until(lambda: any(map(_closed_by_server, raws)), 30)
            return [_closed_by_server(r) for r in raws], server.unauthorized_held, before

    ends, held, before = run(go(), 60)
    closed = [e for e in ends if e is not None]
    assert before == 0 and len(closed) == 1 and closed[0].error_code == ErrorCode.LIMIT_EXCEEDED
    assert 2 * MAX_KV_FETCH_BYTES <= held <= UNAUTHORIZED_CONNECTION_BYTES  # the other one, alone, is kept


def test_a_lone_token_holder_is_never_closed_for_its_own_fetches():
    """At the setting's minimum (1 MiB), an SDK client with a valid token fetching two contexts of 128 Ki token ids
    at once on a new connection was closed every time with LIMIT_EXCEEDED ("too much held before authorization"):
    its two KV_FETCHes (~1.3 MB) were not whole yet, so not yet authorized. The budget is never below what one
    connection may hold."""
    ids = [(1 << 31) - 1 - i for i in range(MAX_KV_TOKENS)]

    async def go() -> tuple[list[Any], dict[str, int]]:
        async with kv_server(lambda token: token == TOKEN, unauthorized_memory=1 << 20) as server:
            async with connect_kv("127.0.0.1", server.port, verify=False, auth_token=TOKEN) as conn:
                results = await asyncio.gather(*(conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=60000,
                                                               timeout_s=60) for _ in range(2)),
                                               return_exceptions=True)
            return results, dict(server.stats)

    results, stats = run(go(), 120)
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert stats["evicted_memory"] == 0 and stats["evicted"] == 0


def test_a_lone_connection_holding_all_it_may_is_never_closed():
    """A connection with no token sending 16 of the largest fetch streams short of their last byte holds what its
    window lets it (UNAUTHORIZED_CONNECTION_BYTES at most, by every count) and is not closed for it, whatever the
    setting: alone, it is the legitimate client whose token is not read yet as much as a flood's. Its request
    deadline ends those streams (not checked here)."""

    async def go() -> tuple[qe.ConnectionTerminated | None, int, list[int], int]:
        async with kv_server(lambda token: token == TOKEN, unauthorized_memory=1 << 20) as server, \
                _raw(server.port) as raw:
            counted = _watch(server)
            await until(lambda: server.connections == 1, 10)
            _almost_whole(raw._quic, 16)
            raw.transmit()
            await until(lambda: _settled(raw._quic) or _closed_by_server(raw) is not None, 60)
            return _closed_by_server(raw), _proto(server, 0).held_bytes(), counted, server.stats["evicted"]

    end, held, counted, evicted = run(go(), 90)
    assert end is None and evicted == 0
    assert 2 * MAX_KV_FETCH_BYTES < held <= UNAUTHORIZED_CONNECTION_BYTES
    assert counted and max(counted) <= UNAUTHORIZED_CONNECTION_BYTES


class _Stale:
    """A connection not yet authorized, as KVServer counts it: what it held at its last datagram (``held``), and
    what it holds now (``now``, given by held_bytes()). Closing one records the close."""

    def __init__(self, now: int) -> None:
        self.now = now
        self.held_back = True
        self.established = True
        self.closing = False
        self.peer = "192.0.2.1:4433"
        self.closed: list[tuple[int, str]] = []
        self.kv = self

    def held_bytes(self) -> int:
        return self.now

    def close(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))

    def transmit(self) -> None:
        pass


def test_a_count_past_the_budget_is_checked_against_what_the_others_hold_now():
    """What another connection held at its last datagram may be gone since (a fetch stream refused by its deadline,
    a timer, no datagram of its own): past the budget, every count is taken afresh before anyone is closed. A
    client quiet since its first 1.5 MB were refused would otherwise get a token holder closed for its 1 MB."""
    server = KVServer(IdsProvider(), unauthorized_memory=lambda: 2 << 20)
    quiet, sending = _Stale(now=0), _Stale(now=1 << 20)
    for proto in (quiet, sending):
        server.count_unauthorized(proto)  # type: ignore[arg-type]  # (as _on_handshake counts a connection)
    server.account_unauthorized(quiet, 1_500_000)  # type: ignore[arg-type]
    quiet.now = 0  # its fetch streams refused since, with no datagram of its own to say so
    server.account_unauthorized(sending, 1 << 20)  # type: ignore[arg-type]
    assert not quiet.closed and not sending.closed and server.stats["evicted"] == 0
    assert server.unauthorized_held == 1 << 20 and server.unauthorized.held_by(quiet) == 0  # type: ignore[arg-type]


def test_start_kv_bounds_the_endpoint_by_the_settings_default_when_given_none(tmp_path: Path, monkeypatch):
    """start_kv without unauthorized_memory (a caller other than the daemon): limits.unauthorized_memory_mb's
    default (256 MiB), never an unbounded budget."""
    from tokenwire.daemon import kv_runtime
    from tokenwire.daemon.config import Limits, parse_config

    async def no_compile() -> None:
        return None

    monkeypatch.setattr(kv_runtime, "warm_up_codec", no_compile)
    cfg = parse_config({"kv": {"enabled": True, "listen": "127.0.0.1:0", "directory": str(tmp_path / "kv"),
                               "forecaster": "ewma"}}, tmp_path / "tw.toml")

    async def go() -> int:
        runtime = await kv_runtime.start_kv(cfg.kv, authorize=lambda token: token == TOKEN)
        try:
            return runtime.server.unauthorized_memory()
        finally:
            runtime.close()

    assert run(go(), 30) == int(Limits.unauthorized_memory_mb * (1 << 20)) == 256 << 20


def test_the_daemons_kv_port_has_the_budget_and_counts_its_closes(tmp_path: Path, monkeypatch):
    """start_kv gives the endpoint limits.unauthorized_memory_mb's default when the daemon names none (never
    unbounded), and a close for memory is in tokenwire_kv_connections_refused_total{reason="evicted"}."""
    import hashlib

    from tokenwire.daemon.config import Limits, parse_config

    auth = {"tokens": [{"name": "alice", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}]}
    cfg = parse_config({"server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": ""}, "auth": auth,
                        "kv": {"enabled": True, "listen": "127.0.0.1:0", "directory": str(tmp_path / "kv"),
                               "forecaster": "ewma"}}, tmp_path / "tw.toml")

    async def go() -> tuple[int, int, float]:
        async with kv_daemon(monkeypatch, cfg) as d:
            server = d.kv.server
            default = server.unauthorized_memory()
            server.unauthorized_memory = lambda: 1 << 20  # (a small one: two connections' 2.6 MB are past it)
            async with contextlib.AsyncExitStack() as stack:
                raws = await _two_holding(server, stack)
                await until(lambda: any(map(_closed_by_server, raws)), 30)
                closed = sum(_closed_by_server(r) is not None for r in raws)
            refused = d.metrics.registry.get_sample_value("tokenwire_kv_connections_refused_total",
                                                          {"reason": "evicted"})
            return default, closed, refused or 0.0

    default, closed, refused = run(go(), 90)
    assert default == UNAUTHORIZED_MEMORY_BYTES == int(Limits.unauthorized_memory_mb * (1 << 20))
    assert closed == refused == 1


def test_a_library_endpoint_is_bounded_by_default():
    """serve_kv without unauthorized_memory: the daemon's default budget, not none."""

    async def go() -> int:
        async with kv_server(lambda token: token == TOKEN) as server:
            return server.unauthorized_memory()

    assert run(go(), 30) == UNAUTHORIZED_MEMORY_BYTES == 256 << 20


def test_a_connection_not_held_is_out_of_the_budget():
    """An owner whose check lets every fetch through for now (the daemon without [auth] tokens: hold_unauthorized
    gives False) holds no connection back, and none is closed for what it holds: any fetch of it would authorize
    it, as a chat connection is authorized from the start without tokens."""

    async def go() -> tuple[qe.ConnectionTerminated | None, int, int]:
        async with kv_server(lambda token: True, hold_unauthorized=False, unauthorized_memory=1 << 20) as server, \
                _raw(server.port) as raw:
            await until(lambda: server.connections == 1, 10)
            _almost_whole(raw._quic, 4)
            raw.transmit()
            proto = _proto(server, 0)
            await until(lambda: proto.held_bytes() >= 4 * MAX_KV_FETCH_BYTES, 30)
            return _closed_by_server(raw), server.unauthorized_held, server.stats["evicted"]

    end, held, evicted = run(go(), 60)
    assert end is None and held == 0 and evicted == 0
