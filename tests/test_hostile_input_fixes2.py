"""Hostile input found by a fuzzing probe: a KV put header that froze the event loop, KV fetches held incomplete
for ever, the KV endpoint's silent protocol violations and its log flood of refused fetches, a lone surrogate as a
KV put's model, datasets that escaped DatasetError, store keys that are no regular file, empty frame-decoder
messages, and an ingest ``fail`` whose message was any JSON value."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aioquic.quic.connection import QuicConnection

from tokenwire.daemon import kv_ingest
from tokenwire.daemon.ingest import IngestAPI, IngestConnection
from tokenwire.daemon.kv_ingest import put_kv_unix, serve_kv_ingest
from tokenwire.daemon.kv_meta import KVIngestError
from tokenwire.daemon.kv_service import KVService
from tokenwire.daemon.kv_store import wrap
from tokenwire.daemon.kv_store_local import LocalChunkStore
from tokenwire.daemon.transcripts import TranscriptStore
from tokenwire.predictor.dataset import COLUMNS, FORMAT_VERSION, DatasetError, load, save
from tokenwire.transport.errors import ErrorCode, FrameError
from tokenwire.transport.frames import MAX_KV_TOKENS, KvFetch, Request, decode_frame, encode_stream_frame
from tokenwire.transport.kv_channel import KVFetchRefused, kv_quic_config
from tokenwire.transport.kv_server import KVServer, KVServerProtocol
from tokenwire.transport.server_session import MIN_REQUEST_RATE, REQUEST_TIMEOUT_S
from tokenwire.transport.session_events import ConnectionEnded
from tokenwire.transport.tls import server_configuration

from .test_kv_channel_refusals import KVPair
from .test_kv_ingest_socket import _Writer


def _service(tmp_path: Path) -> KVService:
    return KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=16)


def _ingest(svc: KVService, data: bytes) -> dict[str, Any]:
    """The reply to the puts in ``data`` on one ingest connection (its last line)."""

    async def go() -> bytes:
        reader, writer = asyncio.StreamReader(), _Writer()
        reader.feed_data(data)
        reader.feed_eof()
        await asyncio.wait_for(kv_ingest._handle_ingest(svc, reader, writer), 60)  # type: ignore[arg-type]
        return writer.data

    return json.loads(asyncio.run(go()).splitlines()[-1])


def _header(**fields: Any) -> bytes:
    head = {"op": "put", "model": "m", "token_ids": [1, 2, 3, 4], "shape": [1, 2, 1, 4, 8], "dtype": "float16"}
    return json.dumps({**head, **fields}).encode() + b"\n"


# ------------------------------------------------------------------------------ 1: a KV put header's shape and size
@pytest.mark.parametrize(("shape", "says"), [
    ([10**18] * 2000, "shape must be 5 integers: [layers, 2, kv_heads, tokens, head_dim]"),
    ([10**1000] * 5, "the body would exceed the ingest limit of 8 GiB"),
    ([1, 2, 1, 4, "8"], "shape must be 5 integers: [layers, 2, kv_heads, tokens, head_dim]"),
    ([1, 2, 0, 4, 8], "shape must be positive integers"),
], ids=["many-entries", "huge-entries", "a-string", "zero"])
def test_a_put_header_shape_is_checked_before_it_is_multiplied_and_no_huge_number_is_formatted(tmp_path, shape, says):
    """A shape of 80,000 entries of 10**18 held the event loop 13 s multiplying them, and the refusal was Python's
    "Exceeds the limit (4300 digits) for integer string conversion" (formatting the product)."""
    svc = _service(tmp_path)
    reply = _ingest(svc, _header(shape=shape))
    assert reply == {"ok": False, "error": f"bad header: {says}"}
    assert svc.ingest_errors == 1
    svc.close()


def test_the_ingest_header_limit_fits_the_largest_put_and_refuses_a_longer_line(tmp_path):
    """The header line could be 16 MiB of JSON for the event loop to parse (and twice that read ahead per
    connection); a put's header needs its token ids, at most MAX_KV_TOKENS, and little else."""
    largest = json.dumps({"op": "put", "model": "\U0001f600" * 128, "token_ids": [2**31 - 1] * MAX_KV_TOKENS,
                          "shape": [65535, 2, 65535, MAX_KV_TOKENS, 65535], "dtype": "bfloat16",
                          "fingerprint": 2**64 - 1, "prewarm": ["low", "medium", "high"]}).encode() + b"\n"
    assert len(largest) <= kv_ingest.MAX_HEADER_BYTES < 3 << 20
    svc = _service(tmp_path)
    sock = tmp_path / "kv.sock"

    async def go() -> bytes:
        srv = await serve_kv_ingest(sock, svc)
        try:
            reader, writer = await asyncio.open_unix_connection(str(sock))
            writer.write(b"x" * (3 << 20) + b"\n")  # over the limit: not parsed as JSON at all
            answer = await asyncio.wait_for(reader.readline(), 30)
            writer.close()
            return answer
        finally:
            srv.close()

    answer = json.loads(asyncio.run(go()))
    assert answer == {"ok": False, "error": f"header line too long (over {kv_ingest.MAX_HEADER_BYTES >> 10} KiB: a put "
                                            f"carries at most {MAX_KV_TOKENS} token ids)"}
    svc.close()


def test_a_refused_header_line_that_came_whole_ends_the_connection_at_once(tmp_path, monkeypatch):
    """Its newline already read, readline had dropped the whole line: the discard then waited for another newline,
    holding the connection BODY_QUIET_S (or eating the next put's header)."""
    monkeypatch.setattr(kv_ingest, "BODY_QUIET_S", 600.0)
    svc = _service(tmp_path)
    sock = tmp_path / "kv.sock"

    async def go() -> tuple[bytes, bytes]:
        srv = await serve_kv_ingest(sock, svc)
        try:
            reader, writer = await asyncio.open_unix_connection(str(sock))
            writer.write(b"x" * (kv_ingest.MAX_HEADER_BYTES + 100) + b"\n")  # its newline within the read that overran
            answer = await asyncio.wait_for(reader.readline(), 30)
            rest = await asyncio.wait_for(reader.read(), 30)  # the daemon closes: not after BODY_QUIET_S
            writer.close()
            return answer, rest
        finally:
            srv.close()

    answer, rest = asyncio.run(go())
    assert b"header line too long" in answer and rest == b""
    svc.close()


# ------------------------------------------------------------------------------------------ 5: a lone surrogate
def test_a_kv_put_whose_model_is_a_lone_surrogate_is_refused_with_a_typed_error(tmp_path):
    """It reached the fingerprint's encode: an ERROR traceback in the log and "ingest failed: UnicodeEncodeError"."""
    svc = _service(tmp_path)
    body = np.zeros(64, dtype=np.float16).tobytes()  # [1, 2, 1, 4, 8]
    reply = _ingest(svc, _header(model="\ud800") + body)
    assert reply == {"ok": False, "error": "model is not valid Unicode (a lone surrogate)"}
    assert svc.ingest_errors == 1
    svc.close()
    with pytest.raises(KVIngestError, match=r"model is not valid Unicode \(a lone surrogate\)"):
        put_kv_unix(tmp_path / "no.sock", "a\udc80", [1, 2], [])  # refused before it connects


# ------------------------------------------------------------------- 2: KV fetches that never arrive whole
def _partial_fetch(pair: KVPair, n_ids: int = 1000) -> tuple[int, int]:
    """A KV_FETCH sent but for its last byte, on a stream of the client's; (stream id, frame bytes)."""
    body = encode_stream_frame(KvFetch(model="m", deadline_ms=5000, token_ids=list(range(n_ids))))
    quic = pair.client.quic
    sid = quic.get_next_available_stream_id()
    quic.send_stream_data(sid, body[:-1])
    return sid, len(body) - 4


def _refused(pair: KVPair, sid: int) -> list[KVFetchRefused]:
    return [e for e in pair.server_events if isinstance(e, KVFetchRefused) and e.stream_id == sid]


def test_a_kv_fetch_not_whole_within_the_request_timeout_is_refused_alone():
    """16 streams a connection each held ~655 KB of a KV_FETCH short of its last byte, kept alive by pings, for
    ever; the chat port refuses such a request after limits.request_timeout_s."""
    pair = KVPair()
    pair.serve = False
    sid, size = _partial_fetch(pair)
    pair.exchange(rounds=40)
    assert pair.server is not None and sid in pair.server.fetches and not _refused(pair, sid)
    pair.now += REQUEST_TIMEOUT_S + size / MIN_REQUEST_RATE + 0.5  # its deadline, with its size at 32 KiB/s
    pair.exchange(rounds=40)
    refused = _refused(pair, sid)
    assert len(refused) == 1 and refused[0].code == ErrorCode.LIMIT_EXCEEDED
    assert refused[0].reason.startswith("KV_FETCH not complete within 10 s (limits.request_timeout_s 10 s")
    assert sid not in pair.server.fetches
    pair.assert_connection_up()  # the connection and its next fetch go on


def test_a_large_kv_fetch_has_its_size_at_32_kib_per_second_beyond_the_timeout():
    """~655 KB is what a fetch of MAX_KV_TOKENS ids past 65,535 takes (5 bytes each in msgpack): legitimate, and
    over a slow uplink it may take longer than the flat timeout."""
    pair = KVPair()
    pair.serve = False
    sid, size = _partial_fetch(pair, n_ids=40_000)
    pair.exchange(rounds=40)
    assert pair.server is not None and size > 2 * MIN_REQUEST_RATE
    pair.now += REQUEST_TIMEOUT_S + 0.5  # past the flat timeout, not past its size's share: no refusal yet
    pair.server_events += pair.server.handle_timer(pair.now)
    assert not _refused(pair, sid) and sid in pair.server.fetches
    pair.now += size / MIN_REQUEST_RATE
    pair.server_events += pair.server.handle_timer(pair.now)
    assert len(_refused(pair, sid)) == 1 and sid not in pair.server.fetches


def test_a_fetch_stream_whose_first_byte_never_comes_is_refused_and_its_buffer_dropped():
    """aioquic buffers what follows a withheld first byte (up to the 64-MiB stream window), which no fetch's
    deadline covered: held for as long as the client liked."""
    pair = KVPair()
    pair.serve = False
    quic = pair.client.quic
    sid = quic.get_next_available_stream_id()
    quic.send_stream_data(sid, b"x" * 5000)
    quic._streams[sid].sender._pending.subtract(0, 1)  # the first byte never goes
    pair.exchange(rounds=40)
    assert pair.server is not None
    assert len(pair.server.quic._streams[sid].receiver._buffer) > 0 and not _refused(pair, sid)
    pair.now += REQUEST_TIMEOUT_S + 0.5
    pair.exchange(rounds=40)
    refused = _refused(pair, sid)
    assert len(refused) == 1 and "its first bytes never came" in refused[0].reason
    stream = pair.server.quic._streams.get(sid)
    assert stream is None or len(stream.receiver._buffer) == 0
    pair.assert_connection_up()


def test_a_fetch_stream_reset_behind_a_withheld_first_byte_is_dropped_and_ended():
    """Reset before any of it was delivered, the stream kept aioquic's buffer and stayed open on our side (never
    discarded), while the read credit counted it read."""
    pair = KVPair()
    pair.serve = False
    quic = pair.client.quic
    sid = quic.get_next_available_stream_id()
    quic.send_stream_data(sid, b"x" * 5000)
    quic._streams[sid].sender._pending.subtract(0, 1)
    pair.exchange(rounds=40)
    quic.reset_stream(sid, ErrorCode.CANCELLED)
    pair.exchange(rounds=100)
    assert pair.server is not None
    stream = pair.server.quic._streams.get(sid)
    assert stream is None or (len(stream.receiver._buffer) == 0 and stream.sender._reset_error_code is not None)
    assert sid not in pair.server._undelivered
    pair.assert_connection_up()


def test_the_kv_server_gives_each_connection_its_request_timeout():
    async def go() -> float:
        server = KVServer(provider=None, request_timeout=lambda: 3.5)  # type: ignore[arg-type]
        return _protocol(server).kv.request_timeout

    assert asyncio.run(go()) == 3.5
    assert KVServer(provider=None).request_timeout() == REQUEST_TIMEOUT_S  # type: ignore[arg-type]


# ------------------------------------------------------------- 3 and 4: the KV endpoint's violations and refusals
def _protocol(server: KVServer) -> KVServerProtocol:
    """A KV connection of ``server``'s that no packet reaches (its events are fed by the test); in a running loop."""
    quic = QuicConnection(configuration=kv_quic_config(server_configuration()),
                          original_destination_connection_id=os.urandom(8))
    return KVServerProtocol(quic, app=server)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tokenwire.kv" and r.levelno >= logging.WARNING]


def test_refused_kv_fetches_are_one_warning_then_a_summary(caplog):
    """One client's 500 refused fetch streams were 500 warning lines in 3 s."""
    caplog.set_level(logging.DEBUG, logger="tokenwire.kv")

    async def go() -> KVServer:
        server = KVServer(provider=None)  # type: ignore[arg-type]
        proto = _protocol(server)
        proto.handle_session_events([KVFetchRefused(4 * i, int(ErrorCode.LIMIT_EXCEEDED),
                                                    "too many concurrent fetches") for i in range(500)])
        server.guard.close()
        return server

    server = asyncio.run(go())
    warned = _warnings(caplog)
    assert len(warned) == 1 and warned[0].startswith("refused KV fetch stream 0 from ")
    assert "too many concurrent fetches" in warned[0] and server.stats["refused"] == 500
    server.flush_logs(server.fetch_refusals.logged_at + 61)  # type: ignore[operator]
    assert _warnings(caplog)[1].startswith("refused 499 more KV fetch streams in the last 61 s")


def _violations() -> list[ConnectionEnded]:
    """The ConnectionEnded a KV server session reports for each of three protocol violations (sans-I/O)."""
    ends = []
    for bad in ("garbage", "request", "uni"):
        pair = KVPair()
        pair.serve = False
        quic = pair.client.quic
        if bad == "uni":
            sid = quic.get_next_available_stream_id(is_unidirectional=True)
            quic.send_stream_data(sid, b"hello", end_stream=True)
        else:
            data = b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1" if bad == "garbage" else encode_stream_frame(
                Request(messages=[{"role": "user", "content": "hi"}]))  # a chat REQUEST, on the KV port
            quic.send_stream_data(quic.get_next_available_stream_id(), data)
        pair.exchange(rounds=200)
        ends += [e for e in pair.server_events if isinstance(e, ConnectionEnded)]
    return ends


def test_kv_protocol_violations_are_counted_and_logged_rate_limited(caplog):
    """Closes for garbage, a chat REQUEST on the KV port or a unidirectional stream (0x101/0x102) were in no log
    line and no counter; the chat port logs and counts its own."""
    caplog.set_level(logging.DEBUG, logger="tokenwire.kv")
    ends = _violations()
    assert len(ends) == 3 and all(not e.by_peer for e in ends)
    assert {e.error_code for e in ends} <= {ErrorCode.MALFORMED_FRAME, ErrorCode.FRAME_TOO_LARGE}
    others = [ConnectionEnded(int(ErrorCode.NO_ERROR), "Idle timeout", True),
              ConnectionEnded(int(ErrorCode.SHUTTING_DOWN), "server shutting down", False)]

    async def go() -> KVServer:
        server = KVServer(provider=None)  # type: ignore[arg-type]
        for ev in [*ends, *others]:
            _protocol(server).handle_session_events([ev])
        server.guard.close()
        return server

    server = asyncio.run(go())
    assert server.stats["protocol_errors"] == 3  # the idle close and the server's own stop are none
    warned = _warnings(caplog)
    assert len(warned) == 1 and warned[0].startswith("closed KV connection from ")
    assert f"(code {ends[0].error_code:#x})" in warned[0]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG
             and r.getMessage().startswith("closed KV connection from ")]
    assert len(debug) == 2
    server.flush_logs(server.violations.logged_at + 61)  # type: ignore[operator]
    assert _warnings(caplog)[1] == "closed 2 more KV connections in the last 61 s for breaking the protocol"


# ------------------------------------------------------------------------------------------------ 6: datasets
def _dataset(tmp_path: Path) -> Path:
    n = 20
    data: dict[str, Any] = {c: np.arange(n, dtype=np.float64) for c in COLUMNS}
    data["n_acked"] = np.zeros(n)
    data["queue_l"] = data["ce"] = np.arange(n) % 2.0  # flags are 0 or 1 (load refuses others)
    data["size"] = np.full(n, 1200.0)
    data["meta"] = json.dumps({"format": "tokenwire-latency-dataset", "version": FORMAT_VERSION})
    path = tmp_path / "good.npz"
    save(path, data)
    load(path)  # (a dataset that loads: each case changes one thing)
    return path


def _npy(shape: tuple[int, ...], descr: str = "<f8") -> bytes:
    head = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    head += b" " * (63 - (len(head) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head


def _with_member(good: Path, out: Path, name: str, blob: bytes) -> Path:
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, blob if info.filename == name else src.read(info.filename))
    return out


def _with_arrays(good: Path, out: Path, **arrays: Any) -> Path:
    with np.load(good) as z:
        data = {k: z[k] for k in z.files}
    np.savez(out, **{**data, **arrays})
    return out


def _encrypted_flag(good: Path, out: Path) -> Path:
    """The archive with the 'encrypted' bit of its first member's flags set (a flipped bit)."""
    blob = bytearray(good.read_bytes())
    central = blob.index(b"PK\x01\x02")
    flags = struct.unpack_from("<H", blob, central + 8)[0]
    struct.pack_into("<H", blob, central + 8, flags | 1)
    out.write_bytes(bytes(blob))
    return out


@pytest.mark.parametrize(("make", "says"), [
    (lambda g, o: _with_arrays(g, o, meta=np.array("[" * 100_000)), "meta is nested too deeply"),
    (_encrypted_flag, "File 'sent_at.npy' is encrypted, password required for extraction"),
    (lambda g, o: _with_member(g, o, "sent_at.npy", _npy((10**13,)) + bytes(64)),
     "sent_at: its header declares a (10000000000000,) array of float64, more than the 64 bytes"),
    (lambda g, o: _with_member(g, o, "meta.npy", _npy((), "<U100000000") + bytes(64)),
     "meta: its header declares a () array of <U100000000, more than the 64 bytes"),
    (lambda g, o: _with_arrays(g, o, sent_at=np.zeros(20, dtype=[("a", "f8"), ("b", "i4")])),
     "sent_at holds structured records, not real numbers"),
    (lambda g, o: _with_arrays(g, o, latency_ms=np.arange(20) + 1j), "latency_ms holds complex numbers, not real"),
    (lambda g, o: _with_arrays(g, o, size=np.array(["1.5"] * 20)), "size holds text, not real numbers"),
    (lambda g, o: _with_arrays(g, o, meta=np.arange(3.0)), "meta holds "),
], ids=["deep-meta", "encrypted-bit", "huge-shape", "huge-meta", "structured", "complex", "text", "meta-numbers"])
def test_a_hostile_dataset_is_a_dataset_error(tmp_path, make, says):
    """RecursionError, RuntimeError (a flag bit), MemoryError (a 72.8-TiB allocation from a 2-KB file) and
    TypeError escaped load(); a complex column loaded with its imaginary part dropped, a text one as numbers."""
    bad = make(_dataset(tmp_path), tmp_path / "bad.npz")
    with pytest.raises(DatasetError, match="not a latency dataset") as exc:
        load(bad)
    assert says in str(exc.value)


# ----------------------------------------------------------------------------------------- 7: the local store
def _key(c: str) -> str:
    return f"{c * 32}.src"


def test_a_store_key_that_is_no_regular_file_is_a_miss_and_never_blocks(tmp_path):
    """A directory with a key's name raised IsADirectoryError; a FIFO blocked the store's worker for ever (every
    fetch and put behind it waited); a symlink was followed (one to /dev/zero would read for ever)."""
    store = LocalChunkStore(tmp_path / "kv", 1 << 20)
    outside = tmp_path / "outside"
    outside.write_bytes(wrap(b"not this store's"))
    for c in "abc":
        (tmp_path / "kv" / (c * 2)).mkdir()
    (tmp_path / "kv" / "aa" / _key("a")).mkdir()
    os.mkfifo(tmp_path / "kv" / "bb" / _key("b"))
    (tmp_path / "kv" / "cc" / _key("c")).symlink_to(outside)
    pool = ThreadPoolExecutor(max_workers=1)
    fifo = pool.submit(store.get, _key("b"))
    try:
        from_fifo = fifo.result(timeout=20)
    except FutureTimeout:  # (its reader waits in open() for a writer: this gives it one, so the test can end)
        os.close(os.open(tmp_path / "kv" / "bb" / _key("b"), os.O_WRONLY | os.O_NONBLOCK))
        raise
    finally:
        pool.shutdown(wait=True)
    assert from_fifo is None
    assert store.get(_key("a")) is None and store.get(_key("c")) is None
    assert store.stats.misses == 3 and store.stats.corrupt == 0
    assert (tmp_path / "kv" / "cc" / _key("c")).is_symlink()  # not ours: left where it is
    store.put(_key("d"), b"payload")
    assert store.get(_key("d")) == b"payload"  # regular files read as before
    store.close()


# ----------------------------------------------------------------------------------------------- 8: messages
@pytest.mark.parametrize(("data", "says"), [(b"\x91" * 100_000, "StackError: nested too deeply"),
                                            (b"\xc1", "FormatError: an invalid type byte")])
def test_msgpack_errors_without_text_are_named(data, says):
    """The peer read "not a valid msgpack frame: StackError: " and nothing more."""
    with pytest.raises(FrameError) as exc:
        decode_frame(data)
    assert str(exc.value) == f"not a valid msgpack frame: {says}"


@pytest.mark.parametrize("message", [{"a": 1}, ["x"], 42, True])
def test_an_ingest_fail_takes_only_a_string_message(message):
    """str() of any JSON value (a dict, a list, a number) became the text every attached client was shown."""
    store = TranscriptStore(max_bytes=1 << 22, retain_s=10)
    api = IngestAPI(store, max_tokens=lambda: 100)
    conn = IngestConnection()
    rid = api.handle({"op": "open"}, conn, 0)["id"]
    reply = api.handle({"op": "fail", "id": rid, "message": message}, conn, 0)
    assert reply == {"ok": False, "error": "message must be a string (or null for a default text)"}
    assert not store.get(bytes.fromhex(rid)).done  # the answer stays open: the application may fail it properly
    assert api.handle({"op": "fail", "id": rid, "message": None}, conn, 0) == {"ok": True}
    req = store.get(bytes.fromhex(rid))
    assert req.done and req.error is not None and "application failed" in str(req.error)


def test_an_ingest_fail_message_string_is_kept():
    store = TranscriptStore(max_bytes=1 << 22, retain_s=10)
    api = IngestAPI(store, max_tokens=lambda: 100)
    conn = IngestConnection()
    rid = api.handle({"op": "open"}, conn, 0)["id"]
    assert api.handle({"op": "fail", "id": rid, "message": "model crashed"}, conn, 0) == {"ok": True}
    assert "model crashed" in str(store.get(bytes.fromhex(rid)).error)

