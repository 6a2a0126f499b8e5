"""What KV connections that have made no authorized fetch may make the endpoint hold, all together.

Each such connection may hold ~2 MB of fetch streams (its UNAUTHORIZED_WINDOW, two of the largest KV_FETCHes, beside
its first stream's); the endpoint bounded them only by max_connections (limits.max_sessions, 10,000 by default), so
clients without a token could make the daemon hold ~20 GB. Now they hold at most ``unauthorized_memory`` together
(the daemon's limits.unauthorized_memory_mb, as on the chat port), and past it the one holding the most is closed.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from pathlib import Path
from typing import Any

from aioquic.quic import events as qe

from tokenwire.transport.errors import ErrorCode
from tokenwire.transport.frames import KvFetch, encode_stream_frame
from tokenwire.transport.handshake_guard import REFUSALS_LOG_S
from tokenwire.transport.kv_protocol import MAX_KV_FETCH_BYTES
from tokenwire.transport.kv_server import UNAUTHORIZED_MEMORY_BYTES, KVServer, KVServerProtocol

from .test_handshake_limits import until
from .test_kv_preauth_fixes2 import TOKEN, _almost_whole, _raw, _settled, kv_server
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


def test_the_budget_is_read_at_each_count():
    """A callable (the daemon's reload of limits.unauthorized_memory_mb): a smaller budget applies at the next
    datagram counted."""
    budget = [BUDGET]

    async def go() -> tuple[qe.ConnectionTerminated | None, int]:
        async with kv_server(lambda token: token == TOKEN, unauthorized_memory=lambda: budget[0]) as server, \
                _raw(server.port) as raw:
            await until(lambda: server.connections == 1, 10)
            _almost_whole(raw._quic, 1)
            raw.transmit()
            await until(lambda: server.unauthorized_held >= MAX_KV_FETCH_BYTES, 30)
            budget[0] = 1 << 20
            _almost_whole(raw._quic, 1)
            raw.transmit()
            await until(lambda: _closed_by_server(raw) is not None, 30)
            return _closed_by_server(raw), server.unauthorized_held

    end, held = run(go(), 60)
    assert end is not None and end.error_code == ErrorCode.LIMIT_EXCEEDED and held == 0


def test_the_daemons_kv_port_has_the_budget_and_counts_its_closes(tmp_path: Path, monkeypatch):
    """start_kv gives the endpoint limits.unauthorized_memory_mb's default when the daemon names none (never
    unbounded), and a close for memory is in tokenwire_kv_connections_refused_total{reason="evicted"}."""
    import hashlib

    from tokenwire.daemon.config import Limits, parse_config

    auth = {"tokens": [{"name": "alice", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}]}
    cfg = parse_config({"server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": ""}, "auth": auth,
                        "kv": {"enabled": True, "listen": "127.0.0.1:0", "directory": str(tmp_path / "kv"),
                               "forecaster": "ewma"}}, tmp_path / "tw.toml")

    async def go() -> tuple[int, float]:
        async with kv_daemon(monkeypatch, cfg) as d:
            server = d.kv.server
            default = server.unauthorized_memory()
            server.unauthorized_memory = lambda: 1 << 20  # (a small one: one connection's ~2 MB is past it)
            async with _raw(server.port) as raw:
                await until(lambda: server.connections == 1, 10)
                _almost_whole(raw._quic, 3)
                raw.transmit()
                await until(lambda: _closed_by_server(raw) is not None, 30)
            refused = d.metrics.registry.get_sample_value("tokenwire_kv_connections_refused_total",
                                                          {"reason": "evicted"})
            return default, refused or 0.0

    default, refused = run(go(), 90)
    assert default == UNAUTHORIZED_MEMORY_BYTES == int(Limits.unauthorized_memory_mb * (1 << 20))
    assert refused == 1


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
