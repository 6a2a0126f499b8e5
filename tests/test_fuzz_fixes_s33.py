"""Fixes for what the s33 fuzz probe found: stored KV metadata read back by exact type and the wire's bounds,
frame decoding bounded per frame, upstream error text made printable, trace lines of plain digits, and the
metrics endpoint's malformed-request counter."""

from __future__ import annotations

import math
import struct

import msgpack  # type: ignore[import-untyped]
import pytest

from tokenwire.daemon.kv_meta import ChunkMeta
from tokenwire.daemon.kv_service import KVService
from tokenwire.daemon.kv_store import object_key
from tokenwire.daemon.kv_store_local import LocalChunkStore
from tokenwire.transport import frames as F
from tokenwire.transport.frames import KvFetch
from tokenwire.transport.kv_channel import KVError, KVNotFound

from .test_kv_channel import CHUNK, MODEL, make_kv

# ---------------------------------------------------------------------------------------------------------
# 1. ChunkMeta.unpack
# ---------------------------------------------------------------------------------------------------------

_GOOD = {"m": "m", "fp": 1, "g": [1, 1, 8], "dt": "float16", "i": 0, "ids": [1, 2], "src": bytes(24)}


def _meta(**patch: object) -> bytes:
    doc = {**_GOOD, **patch}
    return msgpack.packb({k: v for k, v in doc.items() if v is not _DROP})


_DROP = object()


def test_well_formed_metadata_at_the_bounds_is_read() -> None:
    m = ChunkMeta.unpack(_meta(fp=(1 << 64) - 1, g=[65535, 1, 65535], i=4095, ids=[0, (1 << 31) - 1],
                               m="x" * 128))
    assert (m.fingerprint, m.layers, m.head_dim, m.index, m.token_ids) == ((1 << 64) - 1, 65535, 65535, 4095,
                                                                          (0, (1 << 31) - 1))
    assert ChunkMeta.unpack(m.pack()) == m and ChunkMeta.unpack(_meta(src=_DROP)).source is None


@pytest.mark.parametrize("patch", [
    {"fp": math.inf}, {"fp": -math.inf}, {"fp": math.nan}, {"g": [math.inf, 1, 1]},  # OverflowError before
    {"fp": -5}, {"fp": -(1 << 63)}, {"fp": "77"}, {"fp": 1.0}, {"fp": True},
    {"g": "123"}, {"g": [1.9, 1, 8]}, {"g": ["1", "1", "8"]}, {"g": [1, 1, 65536]}, {"g": [1, 8]}, {"g": [0, 1, 8]},
    {"i": -3}, {"i": 4096}, {"i": 0.0},
    {"m": 5}, {"m": ""}, {"m": "x" * 129}, {"m": b"m"},
    {"ids": "abc"}, {"ids": {"a": 1}}, {"ids": []}, {"ids": [1.5]}, {"ids": [-1]}, {"ids": [1 << 31]},
    {"ids": [True]}, {"ids": [0] * ((1 << 15) + 1)},
    {"dt": ["float16"]}, {"dt": "int8"}, {"src": bytes(5)}, {"src": "x" * 24},
    {"m": _DROP}, {"ids": _DROP},
], ids=lambda p: repr(p)[:40])
def test_out_of_range_metadata_is_a_typed_error(patch: dict[str, object]) -> None:
    """Each was accepted (coerced by int(), or left as it was to break a fetch later) or raised an untyped
    OverflowError; now a KVError, which every reader takes as a miss."""
    with pytest.raises(KVError, match="unreadable chunk metadata"):
        ChunkMeta.unpack(_meta(**patch))


@pytest.mark.parametrize("data", [b"\x92\x01\x02", msgpack.packb("m"), b"\xc1", b"", b"\x81"])
def test_metadata_that_is_no_map_is_a_typed_error(data: bytes) -> None:
    with pytest.raises(KVError):
        ChunkMeta.unpack(data)


@pytest.mark.parametrize("patch", [{"fp": math.inf}, {"fp": -5}, {"ids": "abcdefgh"}, {"g": [4.0, 2, 16]},
                                   {"g": [4, 2, 65536]}, {"i": -1}], ids=repr)
def test_corrupt_stored_metadata_is_a_miss_that_the_next_put_repairs(tmp_path, patch) -> None:
    """A fetch of a chunk whose stored metadata is corrupt misses (it failed with an OverflowError, or served a
    plan with a negative fingerprint), and a put of the same context replaces it (the re-put failed the same
    way, so the context could never be repaired)."""
    svc = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=CHUNK)
    try:
        ids = list(range(2 * CHUNK))
        kv = make_kv(2 * CHUNK)
        hashes = svc.ingest_sync(MODEL, ids, kv, fingerprint=7)
        for h in hashes:  # all alike: one chunk unlike the others was already a miss
            key = object_key(h, "meta")
            svc.store.put(key, msgpack.packb({**msgpack.unpackb(svc.store.get(key)), **patch}))
        svc._meta.clear()  # what another process reading the store would see
        fetch = KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids)
        with pytest.raises(KVNotFound):
            svc.resolve_sync(fetch)
        assert svc.ingest_sync(MODEL, ids, kv, fingerprint=7) == hashes
        plan = svc.resolve_sync(fetch)
        assert plan.fingerprint == 7
        text = svc.chunk_sync(plan, 0, "text")
        assert list(struct.unpack(f"<{CHUNK}i", text)) == ids[:CHUNK]
    finally:
        svc.close()


# ---------------------------------------------------------------------------------------------------------
# 2. decode_frame: array headers claiming more than the frame holds
# ---------------------------------------------------------------------------------------------------------


def _peak_bytes_while(fn) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize(("data", "decode"), [
    (b"\xdd\x00\x03\x0d\x40" * 1000, F.decode_frame),  # 5,000 bytes: 1,000 headers claiming 200,000 items each
    (b"\xdd\x00\x00\xff\xff" * 1000, F.decode_frame),
    (b"\xdd\x00\x03\x0d\x40" * 299, F.decode_datagram),
    (b"\x82\xa1t\x01\xa1x" + b"\xdc\xff\xff" * 1000, F.decode_frame),  # a field of a map, 16-bit claims
], ids=["stream", "stream-65535", "datagram", "in-map"])
def test_nested_array_claims_are_refused_before_anything_is_allocated(data, decode) -> None:
    """Each header's list was allocated as it was read (1,000 lists of 200,000 slots: 62 ms and +65 MiB) and
    the frame refused only when its bytes ran out; now a pass that builds nothing refuses it first."""
    refused: list[str] = []

    def refuse() -> None:
        with pytest.raises(F.FrameError) as exc:
            decode(data)
        refused.append(str(exc.value))

    assert _peak_bytes_while(refuse) < 1 << 20  # (before: 24 to 80 MB traced)
    assert "claims more items or bytes than follow it" in refused[0]


@pytest.mark.parametrize("frame", [
    F.KvFetch(model="m", deadline_ms=1, token_ids=[F.MAX_TOKEN_ID] * F.MAX_KV_TOKENS),
    F.KvFetch(model="m", deadline_ms=1, hashes=[bytes(16)] * F.MAX_KV_CHUNKS),
    F.Finished(total=1, digest=bytes(32), gen_us=[1] * F.MAX_GEN_TIMES),
    F.GenTimes(gen_us=[1] * F.MAX_GEN_TIMES),
    F.Tokens(handle=1, first=0, tokens=[b"x"] * F.MAX_TOKENS_PER_FRAME, extra=(F.MAX_TOKENS_PER_FRAME, [b"y"] * 9)),
    F.KvDone(chunks=F.MAX_KV_CHUNKS, levels=["low"] * F.MAX_KV_CHUNKS),
    F.Request(messages=[{"role": "user", "content": "x"}] * F.MAX_MESSAGES, params={f"p{i}": i for i in range(32)}),
], ids=lambda f: type(f).__name__)
def test_frames_with_their_longest_lists_still_decode(frame) -> None:
    assert F.decode_frame(F.encode_frame(frame)) == frame


@pytest.mark.parametrize(("data", "says"), [(b"\x92\x01", "ValueError: Unpack failed: incomplete input"),
                                            (b"\x81\xa1t", "ValueError: Unpack failed: incomplete input"),
                                            (b"\x81\xa1t\xdd\x00\x00\x00\x05", "OutOfData: it ends inside"),
                                            (b"\x91" * 100_000, "StackError: nested too deeply"),
                                            (b"\xc1", "FormatError: an invalid type byte"),
                                            (b"\x81\xa1t\x01\x00", "ExtraData")])
def test_malformed_msgpack_is_still_a_frame_error(data, says) -> None:
    with pytest.raises(F.FrameError, match=f"not a valid msgpack frame: {says}"):
        F.decode_frame(data)


# ---------------------------------------------------------------------------------------------------------
# 3. upstream_openai: an error event's words made printable; a finish_reason that is no text refused
# ---------------------------------------------------------------------------------------------------------


class _Body:
    """What ``_read_events`` reads of an aiohttp response: the body's pieces, then its end (no network)."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = list(pieces)
        self.content = self

    async def readany(self) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""

    def close(self) -> None:
        pass


def _read(*pieces: bytes) -> tuple[list[str], str]:
    import asyncio

    from tokenwire.daemon.upstream_openai import OpenAIUpstream

    up = OpenAIUpstream("vllm", base_url="http://127.0.0.1:26501/v1")  # (never connected to)
    out: list[str] = []

    async def go() -> str:
        first = asyncio.get_running_loop().time() + 30
        return await up._read_events(_Body(*pieces), out.append, first, ())  # type: ignore[arg-type]

    return out, asyncio.run(go())


def _chunk(**choice: object) -> bytes:
    import json

    return f"data: {json.dumps({'choices': [{'index': 0, **choice}]})}\n\n".encode()


def json_text(text: str) -> bytes:
    import json

    return json.dumps(text).encode()


_NASTY = "bad\x00 news\n\x1b[2J\x1b]0;pwned\x07 \u202eend"


@pytest.mark.parametrize("pieces", [
    # not JSON: the text itself (a line feed would end its data line)
    (b"event: error\ndata: " + _NASTY.replace("\n", " ").encode() + b"\n\n",),
    (b'event: error\ndata: {"error": {"message": ' + json_text(_NASTY) + b"}}\n\n",),
    (_chunk(delta={"content": "Hi"}), b'data: {"error": {"message": ' + json_text(_NASTY) + b"}}\n\n"),
], ids=["event-text", "event-json", "error-object"])
def test_an_upstreams_error_words_reach_the_client_printable(pieces) -> None:
    from tokenwire.transport.errors import RequestError

    with pytest.raises(RequestError) as info:
        _read(*pieces)
    text = str(info.value)
    assert text.isprintable() and "\x1b" not in text and "\\x1b[2J" in text and "\\x00" in text, text


@pytest.mark.parametrize("finish", [{"x": [1, 2, 3]}, [1, 2], 7, True])
def test_a_finish_reason_that_is_no_text_is_a_malformed_event(finish) -> None:
    """A JSON object became the client's reason as a Python repr ("{'x': [1, 2, 3]}")."""
    from tokenwire.transport.errors import RequestError

    with pytest.raises(RequestError, match="malformed event \\(finish_reason is a "):
        _read(_chunk(delta={"content": "Hi"}, finish_reason=finish), b"data: [DONE]\n\n")


def test_a_text_finish_reason_is_still_printable_and_null_is_no_finish() -> None:
    out, reason = _read(_chunk(delta={"content": "Hi"}, finish_reason=None),
                        _chunk(delta={"content": "!"}, finish_reason="len\ngth"), b"data: [DONE]\n\n")
    assert out == ["Hi", "!"] and reason == "len\\ngth"


# ---------------------------------------------------------------------------------------------------------
# 4. trace files: plain decimal digits only
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("lines", "bad"), [
    (["1", "1_0", "20"], 2), (["+20"], 1), (["5", " +7 "], 2), (["1", "2", "0x10"], 3), (["3", "1__0"], 2),
    (["2", "-0"], 2),
])
@pytest.mark.parametrize("many", [False, True], ids=["short", "in-a-long-block"])
def test_trace_lines_take_plain_digits_only(tmp_path, lines, bad, many) -> None:
    """int() took "1_0" as 10 and "+20" as 20 (on the fast path over a whole block and line by line)."""
    from tokenwire.testbed.trace import TraceError, load_trace

    head = [str(i) for i in range(1000)] if many else []
    bad += len(head)
    path = tmp_path / "t.trace"
    path.write_text("\n".join(head + [str(1000 + i) if many and x.isdigit() else x for i, x in enumerate(lines)])
                    + "\n")
    with pytest.raises(TraceError, match=rf"t\.trace:{bad}: (expected an integer ms timestamp|negative)"):
        load_trace(path)


def test_trace_lines_with_blanks_around_digits_still_load(tmp_path) -> None:
    from tokenwire.testbed.trace import load_trace

    path = tmp_path / "t.trace"
    path.write_text(" 1\n\t2 \r\n\n3\x0c\n  \n40\n")
    assert list(load_trace(path).stamps_ms) == [1, 2, 3, 40]


# ---------------------------------------------------------------------------------------------------------
# 5. metrics: the metrics port's malformed requests, and datagrams dropped before any connection
# ---------------------------------------------------------------------------------------------------------

_PORTS = iter(range(26520, 26560))  # (this helper's range)
_PEER = ("127.0.0.1", 26999)  # (nothing listens there)


def _scrape_value(metrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    assert value is not None, name
    return value


def test_malformed_requests_on_the_metrics_port_are_counted_in_a_series() -> None:
    """Its log line said they were counted; /metrics had no series for them."""
    import asyncio

    from tokenwire.daemon.telemetry import Metrics, serve_metrics

    from .test_metrics_audit_s34 import ask_raw as ask

    metrics = Metrics()

    async def go() -> list[bytes]:
        port = next(_PORTS)
        runner = await serve_metrics(metrics, "127.0.0.1", port, lambda: True)
        try:
            bad = [await ask(port, b"GET /metrics HTTP/1.1\r\nNoColonHere\r\n\r\n") for _ in range(3)]
            good = await ask(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return [*bad, good]
        finally:
            await runner.cleanup()

    answers = asyncio.run(asyncio.wait_for(go(), 30))
    assert [a[:12] for a in answers] == [b"HTTP/1.0 400"] * 3 + [b"HTTP/1.1 200"]
    assert _scrape_value(metrics, "tokenwire_metrics_malformed_requests_total") == 3
    assert b"tokenwire_metrics_malformed_requests_total 3.0" in metrics.exposition()


def _client_datagrams(n: int) -> list[bytes]:
    """A client's first ``n`` datagrams (its Initial first): what opens a connection on a server."""
    import time

    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    quic = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=[F.ALPN],
                                                          server_name="localhost"))
    quic.connect(("127.0.0.1", 4433), now=time.monotonic())
    return [data for data, _ in quic.datagrams_to_send(now=time.monotonic())][:n]


def test_datagrams_dropped_before_any_connection_are_counted_by_reason() -> None:
    """Junk on a QUIC port moved no counter: aioquic drops it without a word."""
    import asyncio
    import os

    from aioquic.asyncio.protocol import QuicConnectionProtocol

    from tokenwire.daemon.telemetry import Metrics
    from tokenwire.transport import quic_io
    from tokenwire.transport.tls import server_configuration

    (initial,) = _client_datagrams(1)
    version = initial[1:5]
    junk = [
        b"\x00" * 30,  # no fixed bit: no QUIC header
        b"",
        b"\x40" + os.urandom(8) + bytes(40),  # a 1-RTT packet for no connection of this server
        b"\xc0" + version + b"\x08" + os.urandom(8) + b"\x08" + os.urandom(8) + bytes(60),  # an Initial < 1,200 B
    ]
    unsupported = b"\xc0\x1a\x2a\x3a\x4a\x08" + os.urandom(8) + b"\x08" + os.urandom(8) + bytes(1200)

    async def go() -> tuple[dict[str, int], int, int]:
        config = server_configuration()
        server = await quic_io.serve_quic("127.0.0.1", next(_PORTS), configuration=config,
                                          create_protocol=QuicConnectionProtocol)
        try:
            before = dict(quic_io.datagrams_dropped)
            for data in junk:
                server.datagram_received(data, _PEER)
            server.datagram_received(unsupported, _PEER)  # answered with a Version Negotiation: no drop
            server.datagram_received(initial, _PEER)  # opens a connection: no drop
            opened = len(server._protocols)
            server.datagram_received(initial, _PEER)  # the same connection's again: found, no drop
            server.accepting = False
            server.datagram_received(initial, _PEER)
            return ({k: quic_io.datagrams_dropped[k] - before[k] for k in before}, opened, len(server._protocols))
        finally:
            server.close()

    delta, opened, after = asyncio.run(asyncio.wait_for(go(), 30))
    assert delta == {"malformed": 2, "unknown_connection": 2, "not_accepting": 1}
    assert opened > 0 and after == opened
    metrics = Metrics()
    for reason, n in quic_io.datagrams_dropped.items():
        assert _scrape_value(metrics, "tokenwire_datagrams_dropped_total", {"reason": reason}) == n
