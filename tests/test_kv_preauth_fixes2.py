"""What a KV client without a token can make the server hold, as on the chat port.

A probe (no token, [auth] tokens configured) opened 16 fetch streams per KV connection, each a KV_FETCH length prefix
of 1 MiB - 16 and the whole body but its last byte: +23 MiB RSS a connection for 42 s, bound only by max_sessions.
Now a KV connection gets connection-level credit of two of the largest legal KV_FETCHes (plus its first stream's)
and two fetch streams at once until one of its fetches is authorized, and a fetch stream's frames may be no larger
than the largest legal KV_FETCH (658,001 bytes: 30 s to arrive with the default timeout, not 42 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aioquic.quic.connection import QuicConnection

from tokenwire.transport import tls
from tokenwire.transport.errors import ErrorCode, FrameError
from tokenwire.transport.frames import (
    KV_CONTROLLERS,
    MAX_CHUNK_TOKENS,
    MAX_DEADLINE_MS,
    MAX_DECODE_RATE,
    MAX_KV_TOKENS,
    MAX_MODEL_CHARS,
    MAX_RECOMPUTE_US,
    KvFetch,
    decode_frame,
    encode_frame,
)
from tokenwire.transport.kv_channel import ContextPlan, ServerTuning, connect_kv, serve_kv
from tokenwire.transport.kv_controller import LEVELS
from tokenwire.transport.kv_protocol import FLOW_WINDOW, MAX_AUTH_CHARS, MAX_KV_FETCH_BYTES, kv_quic_config
from tokenwire.transport.kv_server import UNAUTHORIZED_WINDOW, KVServer, KVServerProtocol
from tokenwire.transport.quic_io import connect_quic
from tokenwire.transport.read_credit import ReadCredit
from tokenwire.transport.server_session import MIN_REQUEST_RATE, REQUEST_TIMEOUT_S
from tokenwire.transport.session_events import ConnectionEnded

from .test_handshake_limits import until
from .test_kv_channel_refusals import KVPair
from .test_kv_security_fixes2 import Raw, kv_daemon  # (Raw: a client on bare aioquic, never a token)
from .test_loopback import run

TOKEN = "good-token"
MODEL = "m"
# what an unauthorized connection may make the server hold: its window, and its first stream's KV_FETCH (the stream
# ReadCredit exempts so that a fetch always completes), with room for a packet's worth of rounding
HOLD_BOUND = UNAUTHORIZED_WINDOW + 4 + MAX_KV_FETCH_BYTES + 4096


def _largest_fetch(**change: Any) -> KvFetch:
    longest = "\U0010ffff"  # 4 bytes in UTF-8
    fields: dict[str, Any] = {"model": longest * MAX_MODEL_CHARS, "deadline_ms": MAX_DEADLINE_MS,
                              "token_ids": [(1 << 31) - 1] * MAX_KV_TOKENS, "controller": max(KV_CONTROLLERS, key=len),
                              "recompute_us_per_token": MAX_RECOMPUTE_US, "auth": longest * MAX_AUTH_CHARS,
                              "prefix": True, "decode_elements_per_s": float(MAX_DECODE_RATE)}
    return KvFetch(**{**fields, **change})


# ------------------------------------------------------------------------------ 1: a fetch stream's frame bound
def test_the_bound_is_the_largest_legal_kv_fetch():
    """Every field at its longest decodes, and one character more in either string is no KV_FETCH at all: the bound
    follows frames.py's field limits (MAX_AUTH_CHARS is the auth field's)."""
    body = encode_frame(_largest_fetch())
    assert len(body) == MAX_KV_FETCH_BYTES == 658_001
    assert isinstance(decode_frame(body), KvFetch)
    hashes = encode_frame(KvFetch(model="\U0010ffff" * MAX_MODEL_CHARS, deadline_ms=MAX_DEADLINE_MS,
                                  hashes=[bytes(16)] * 4096, auth="\U0010ffff" * MAX_AUTH_CHARS))
    assert len(hashes) < MAX_KV_FETCH_BYTES  # (by hashes: the smaller of the two ways to name a context)
    for longer in ({"model": "x" * (MAX_MODEL_CHARS + 1)}, {"auth": "x" * (MAX_AUTH_CHARS + 1)}):
        with pytest.raises(FrameError):
            decode_frame(encode_frame(_largest_fetch(**longer)))


@pytest.mark.parametrize("announced", [MAX_KV_FETCH_BYTES + 1, (1 << 20) - 16])
def test_a_fetch_stream_announcing_more_than_the_largest_kv_fetch_is_closed_at_its_length_prefix(announced):
    """The probe's 1 MiB - 16 was buffered (to its last byte but one) and given 42 s to complete."""
    pair = KVPair()
    pair.serve = False
    quic = pair.client.quic
    quic.send_stream_data(quic.get_next_available_stream_id(), struct.pack(">I", announced) + bytes(1000))
    pair.exchange(rounds=40)
    ended = [e for e in pair.server_events if isinstance(e, ConnectionEnded)]
    assert len(ended) == 1 and ended[0].error_code == ErrorCode.FRAME_TOO_LARGE
    assert str(MAX_KV_FETCH_BYTES) in ended[0].reason


def test_the_largest_kv_fetch_has_30_s_to_arrive():
    """The docs' figure: the request timeout plus its size at 32 KiB/s."""
    pair = KVPair()
    pair.serve = False
    quic = pair.client.quic
    sid = quic.get_next_available_stream_id()
    quic.send_stream_data(sid, struct.pack(">I", MAX_KV_FETCH_BYTES) + bytes(1000))
    pair.exchange(rounds=40)
    assert pair.server is not None
    f = pair.server.fetches[sid]
    allowed = pair.server._fetch_deadline(f) - f.opened_at
    assert allowed == REQUEST_TIMEOUT_S + MAX_KV_FETCH_BYTES / MIN_REQUEST_RATE
    assert 30 < allowed < 30.1


# ------------------------------------------------------------------------ 2: the credit of a connection held
class IdsProvider:
    """Any context, as text: the fetch's own token ids in chunks of MAX_CHUNK_TOKENS (no codec on either end)."""

    async def resolve(self, fetch: KvFetch) -> ContextPlan:
        ids = fetch.token_ids or []
        counts = [min(MAX_CHUNK_TOKENS, len(ids) - i) for i in range(0, len(ids), MAX_CHUNK_TOKENS)]
        # sizes no deadline could carry: every chunk goes as text
        return ContextPlan(MAX_CHUNK_TOKENS, counts, [2 * n for n in counts], [dict.fromkeys(LEVELS, 1 << 40)] * len(
            counts), (1, 1, 1), 0, "float16", handle=ids)

    async def chunk(self, plan: ContextPlan, index: int, level: str) -> bytes:
        assert level == "text"
        start = index * plan.chunk_tokens
        return b"".join(t.to_bytes(4, "little") for t in plan.handle[start:start + plan.token_counts[index]])


@contextlib.asynccontextmanager
async def kv_server(authorize: Callable[[str | None], bool] | None, **kwargs: Any) -> AsyncIterator[KVServer]:
    server = await serve_kv(IdsProvider(), "127.0.0.1", 0, tuning=ServerTuning(forecaster="ewma"),
                            authorize=authorize, **kwargs)
    try:
        yield server
    finally:
        server.close()


def _raw(port: int) -> Any:
    return connect_quic("127.0.0.1", port, configuration=kv_quic_config(tls.client_configuration(verify=False)),
                        create_protocol=Raw)


def _held(proto: KVServerProtocol) -> int:
    """Bytes of fetch streams the server holds: aioquic's stream buffers and the fetch decoders'."""
    return (sum(len(s.receiver._buffer) for s in proto._quic._streams.values())
            + sum(f.decoder.pending for f in proto.kv.fetches.values()))


def _almost_whole(quic: QuicConnection, streams: int) -> None:
    """The probe: ``streams`` fetch streams, each the largest KV_FETCH's length prefix and all but its last byte."""
    for _ in range(streams):
        quic.send_stream_data(quic.get_next_available_stream_id(),
                              struct.pack(">I", MAX_KV_FETCH_BYTES) + bytes(MAX_KV_FETCH_BYTES - 1))


def _settled(quic: QuicConnection) -> bool:
    """Every stream sent whole, waiting for MAX_STREAMS, or out of the server's credit; and nothing in flight."""
    blocked = {id(s) for s in quic._streams_blocked_bidi}
    waiting = quic._remote_max_data_used >= quic._remote_max_data or all(
        id(s) in blocked or s.sender.highest_offset == s.sender._buffer_stop for s in quic._streams.values())
    return waiting and quic._loss.bytes_in_flight == 0


def test_a_kv_client_without_a_token_makes_the_server_hold_little():
    """16 streams of the largest KV_FETCH short of its last byte on one connection: all ~10.5 MB were held (the
    probe's 1-MiB frames: 23 MiB). Now its window and its first stream's fetch at most, two streams at once."""

    async def go():
        async with kv_server(lambda token: token == TOKEN) as server, _raw(server.port) as raw:
            await until(lambda: server.connections == 1, 10)
            proto = next(iter(server.protocols))
            quic = raw._quic
            _almost_whole(quic, 16)
            raw.transmit()
            await until(lambda: _settled(quic), 60)
            return _held(proto), quic._remote_max_data, len(quic._streams_blocked_bidi), proto.authorized

    held, granted, waiting, authorized = run(go(), 90)
    assert MAX_KV_FETCH_BYTES <= held <= HOLD_BOUND, held
    assert granted <= HOLD_BOUND, granted  # the credit it was given (64 MiB before)
    assert waiting == 14 and not authorized  # two fetch streams at once while held


def test_a_token_holder_fetches_the_largest_contexts_at_once_right_after_connecting():
    """Three fetches of MAX_KV_TOKENS ids (~655 KB each) sent together on a new connection: two of the largest fit
    the held window beside the first stream's, and the full window follows the first authorized fetch."""
    ids = list(range(1 << 20, (1 << 20) + MAX_KV_TOKENS))  # past 65,535: 5 bytes each in msgpack

    async def go():
        async with kv_server(lambda token: token == TOKEN) as server, \
                connect_kv("127.0.0.1", server.port, verify=False, warm=False, timeout=10, auth_token=TOKEN) as conn:
            held = conn._quic._remote_max_data  # (the transport parameter: no fetch has gone yet)
            results = await asyncio.gather(*[conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=30_000,
                                                           recompute_us_per_token=0) for _ in range(3)])
            proto = next(iter(server.protocols))
            assert isinstance(proto._quic, ReadCredit)
            return held, results, proto._quic._unauthorized_window, conn._quic._remote_max_data, proto.authorized

    held, results, window, granted, authorized = run(go(), 120)
    assert held == UNAUTHORIZED_WINDOW  # it started held, as any connection does before its first fetch
    assert len(encode_frame(KvFetch(model=MODEL, deadline_ms=30_000, token_ids=ids, recompute_us_per_token=0,
                                    auth=TOKEN))) > 655_000
    for res in results:
        assert res.report.levels == ["text"] * 4
        assert res.text_token_ids() == ids
    assert window is None and authorized and granted > FLOW_WINDOW  # released


@pytest.mark.parametrize("server", [{"authorize": None}, {"authorize": lambda token: True, "hold_unauthorized": False},
                                    {"authorize": lambda token: True, "hold_unauthorized": lambda: False}],
                         ids=["no check", "hold_unauthorized=False", "hold_unauthorized gives False"])
def test_a_kv_connection_is_held_only_with_a_token_check_that_asks_for_it(server):
    """Nothing to authorize, or an owner whose check lets every fetch through for now (the daemon without [auth]
    tokens): the full window from the start."""

    async def go():
        async with kv_server(**server) as kv, _raw(kv.port) as raw:
            await until(lambda: kv.connections == 1, 10)
            proto = next(iter(kv.protocols))
            assert isinstance(proto._quic, ReadCredit)
            return proto._quic._unauthorized_window, raw._quic._remote_max_data

    window, granted = run(go(), 30)
    assert window is None and granted == FLOW_WINDOW


@pytest.mark.parametrize("tokens", [True, False], ids=["auth tokens", "no tokens"])
def test_the_daemons_kv_port_holds_a_connection_only_with_auth_tokens(tmp_path: Path, monkeypatch, tokens):
    """The daemon's wiring: start_kv holds a KV connection while a token-less fetch would be refused (its check,
    which lets every token through without [auth] tokens, reads the [auth] in force as each connection starts)."""
    from tokenwire.daemon.config import parse_config

    auth = {"tokens": [{"name": "alice", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}]} if tokens else {}
    cfg = parse_config({"server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": ""}, "auth": auth,
                        "kv": {"enabled": True, "listen": "127.0.0.1:0", "directory": str(tmp_path / "kv"),
                               "forecaster": "ewma"}}, tmp_path / "tw.toml")

    async def go():
        async with kv_daemon(monkeypatch, cfg) as d, _raw(d.kv.server.port) as raw:
            await until(lambda: d.kv.server.connections == 1, 10)
            return raw._quic._remote_max_data

    granted = run(go(), 60)
    assert granted == (UNAUTHORIZED_WINDOW if tokens else FLOW_WINDOW)
