"""The ingest sockets under a probe's attack: a bound on the connections each Unix socket holds (abandoned ones took
every fd), a half-written chat ingest line closes its connection, a last op without its newline is answered, a
push without an id says so, the application's fail ops are logged at a bounded rate, and the transcript memory
accounting counts what answers really cost."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import resource
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from tokenwire.daemon import ingest, unix_sockets
from tokenwire.daemon.ingest import IngestAPI, IngestConnection, serve_ingest
from tokenwire.daemon.kv_ingest import serve_kv_ingest
from tokenwire.daemon.transcripts import REQUEST_OVERHEAD_BYTES, TOKEN_OVERHEAD_BYTES, TranscriptStore

from .test_kv_ingest_socket import _service
from .test_loopback import run


def _api() -> tuple[TranscriptStore, IngestAPI]:
    store = TranscriptStore(max_bytes=1 << 24, retain_s=10)
    return store, IngestAPI(store, max_tokens=lambda: 100)


async def _send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes) -> dict[str, Any]:
    writer.write(line + b"\n")
    await writer.drain()
    reply: dict[str, Any] = json.loads(await reader.readline())
    return reply


# (1) the connection bound


def test_the_default_bound_follows_the_fd_limit():
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    bound = unix_sockets.connection_bound()
    assert unix_sockets.MIN_CONNECTIONS <= bound <= unix_sockets.MAX_CONNECTIONS_CAP
    if soft != resource.RLIM_INFINITY and soft >= 4 * unix_sockets.MIN_CONNECTIONS:
        assert bound <= soft // 4  # the two sockets together leave half the fds to the rest of the daemon


async def _bound_holds(path: Path, start: Any) -> list[bytes]:
    """Two connections to the socket ``start()`` serves at ``path`` (bound 2), a third refused; once one ends, a
    fourth is let in. What the third and the fourth read."""
    server = await start()
    first = await asyncio.open_unix_connection(str(path))
    second = await asyncio.open_unix_connection(str(path))
    third_reader, third_writer = await asyncio.open_unix_connection(str(path))
    refused = await third_reader.read()  # its line, then end of input: closed at once
    third_writer.close()
    first[1].write_eof()  # the first one ends: its handler closes the socket, which is counted out before the EOF
    assert await first[0].read() == b""
    fourth_reader, fourth_writer = await asyncio.open_unix_connection(str(path))
    fourth_writer.write(b"\n")  # an empty line: both protocols answer it (an error), and the answer shows it let in
    await fourth_writer.drain()
    fourth = await fourth_reader.readline()
    for writer in (first[1], second[1], fourth_writer):
        writer.close()
    server.close()
    return [refused, fourth]


def test_the_chat_ingest_socket_holds_a_bounded_number_of_connections(tmp_path, monkeypatch, caplog):
    """20,000 silent connections took every fd the daemon had: /healthz reset, the KV store's files failed to
    open, new KV puts were closed unanswered, and nothing was logged."""
    monkeypatch.setattr(unix_sockets, "connection_bound", lambda: 2)
    _, api = _api()
    path = tmp_path / "ingest.sock"
    with caplog.at_level(logging.WARNING, logger="tokenwire.daemon"):
        refused, fourth = run(_bound_holds(path, lambda: serve_ingest(path, api)))
    reply = json.loads(refused)
    assert reply["ok"] is False and "too many connections" in reply["error"] and "2" in reply["error"]
    assert json.loads(fourth)["ok"] is False  # answered: "not valid JSON", not refused
    assert "too many" not in fourth.decode()
    lines = [r.getMessage() for r in caplog.records if "connection refused" in r.getMessage()]
    assert len(lines) == 1 and "ingest.socket" in lines[0] and " 2 connections" in lines[0]


def test_the_kv_ingest_socket_has_the_bound_too(tmp_path, monkeypatch):
    """kv_ingest starts its socket through unix_sockets.serve: the bound applies there without a change of its
    own."""
    monkeypatch.setattr(unix_sockets, "connection_bound", lambda: 2)
    svc = _service(tmp_path)
    path = tmp_path / "kv.sock"
    try:
        refused, fourth = run(_bound_holds(path, lambda: serve_kv_ingest(path, svc)))
    finally:
        svc.close()
    assert "too many connections" in json.loads(refused)["error"]
    assert "bad header" in json.loads(fourth)["error"]


def test_refusals_past_the_first_are_counted_not_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(unix_sockets, "connection_bound", lambda: 1)
    _, api = _api()
    path = tmp_path / "ingest.sock"

    async def go() -> None:
        server = await serve_ingest(path, api)
        held = await asyncio.open_unix_connection(str(path))
        for _ in range(5):
            reader, writer = await asyncio.open_unix_connection(str(path))
            assert b"too many connections" in await reader.read()
            writer.close()
        held[1].close()
        server.close()

    with caplog.at_level(logging.WARNING, logger="tokenwire.daemon"):
        run(go())
    assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 1


# (5) a half-written line


def test_a_half_written_line_closes_its_connection(tmp_path, monkeypatch):
    """300 connections each holding a 1 MiB line without its newline held 300 MB, for as long as they liked."""
    monkeypatch.setattr(ingest, "LINE_TIMEOUT_S", 0.2)
    store, api = _api()
    path = tmp_path / "ingest.sock"

    async def go() -> tuple[bytes, dict[str, Any], str]:
        server = await serve_ingest(path, api)
        reader, writer = await asyncio.open_unix_connection(str(path))
        rid = (await _send(reader, writer, b'{"op": "open"}'))["id"]
        await asyncio.sleep(0.4)  # idle between ops, past the line bound: not cut (no line was begun)
        pushed = await _send(reader, writer, json.dumps({"op": "push", "id": rid, "text": "hi"}).encode())
        writer.write(b'{"op": "push", "id": "' + rid.encode())  # and nothing more
        await writer.drain()
        rest = await reader.read()  # the daemon's last line, then its close
        writer.close()
        server.close()
        return rest, pushed, rid

    rest, pushed, rid = run(go(), timeout=20)
    assert pushed["ok"] is True
    assert "not completed within 0.2 s" in json.loads(rest)["error"]
    req = store.get(bytes.fromhex(rid))
    assert req is not None and req.error is not None and "not completed" in req.error[1]


# (8a) a last op without its newline


def test_a_last_op_without_its_newline_is_answered(tmp_path):
    """`printf '...' | socat`: the finish was dropped, unanswered, and the client's answer failed ("the application
    disconnected before finishing")."""
    store, api = _api()
    path = tmp_path / "ingest.sock"

    async def go() -> tuple[str, bytes]:
        server = await serve_ingest(path, api)
        reader, writer = await asyncio.open_unix_connection(str(path))
        rid = (await _send(reader, writer, b'{"op": "open"}'))["id"]
        writer.write(json.dumps({"op": "finish", "id": rid}).encode())
        writer.write_eof()
        rest = await reader.read()
        writer.close()
        server.close()
        return rid, rest

    rid, rest = run(go())
    assert json.loads(rest) == {"ok": True, "tokens": 0}
    req = store.get(bytes.fromhex(rid))
    assert req is not None and req.error is None and req.transcript.finished


# (8c) a missing or malformed id


@pytest.mark.parametrize("msg, says", [
    ({"op": "push", "text": "x"}, "push needs an 'id'"),
    ({"op": "finish"}, "finish needs an 'id'"),
    ({"op": "push", "id": "00", "text": "x"}, "id must be the 32 hex digits"),
    ({"op": "push", "id": "", "text": "x"}, "id must be the 32 hex digits"),
    ({"op": "fail", "id": 7}, "id must be the 32 hex digits"),
    ({"op": "push", "id": "zz" * 16, "text": "x"}, "id must be the 32 hex digits"),
    ({"op": "push", "id": "0011 " * 6 + "00", "text": "x"}, "id must be the 32 hex digits"),
])
def test_a_missing_or_malformed_id_is_named(msg, says):
    """They said "unknown id on this connection ...", which sent the application looking for a lost connection."""
    _, api = _api()
    reply = api.handle(msg, IngestConnection(), 0)
    assert reply["ok"] is False and says in reply["error"] and "unknown id" not in reply["error"]


def test_a_well_formed_unknown_id_is_still_unknown():
    _, api = _api()
    reply = api.handle({"op": "push", "id": "ab" * 16, "text": "x"}, IngestConnection(), 0)
    assert "unknown id on this connection" in reply["error"]


# (8d) the fail op's warning


def test_fail_ops_log_one_line_then_a_summary(caplog):
    """An application failing its answers in a loop wrote 15,387 warnings in a minute."""
    _, api = _api()
    conn = IngestConnection()
    with caplog.at_level(logging.INFO, logger="tokenwire.ingest"):
        for k in range(4):
            rid = api.handle({"op": "open"}, conn, k)["id"]
            assert api.handle({"op": "fail", "id": rid, "message": f"crash {k}"}, conn, k) == {"ok": True}
        api.expire_stalled(10.0)  # within the minute: nothing more yet
        held = [r.getMessage() for r in caplog.records if "failed by" in r.getMessage()]
        api.expire_stalled(100.0)  # the daemon's housekeeping, a minute on
    lines = [r.getMessage() for r in caplog.records if "failed by" in r.getMessage()]
    assert len(held) == 1 and "crash 0" in held[0]
    assert len(lines) == 2 and "3 more answers failed by their application" in lines[1]


def test_connections_ending_with_answers_open_log_one_line_then_a_summary(tmp_path, caplog):
    """An application reconnecting in a loop with answers open wrote ~2,300 warnings a minute, one per connection."""
    _, api = _api()

    async def go() -> None:
        server = await serve_ingest(tmp_path / "ingest.sock", api)
        try:
            for _ in range(3):
                reader, writer = await asyncio.open_unix_connection(str(tmp_path / "ingest.sock"))
                await _send(reader, writer, b'{"op": "open"}')
                writer.close()
                await reader.read()  # (the daemon's side closed too: its line is written)
        finally:
            server.close()

    with caplog.at_level(logging.INFO, logger="tokenwire.ingest"):
        run(go(), timeout=30)
        held = [r.getMessage() for r in caplog.records if "open answer" in r.getMessage()]
        api.expire_stalled(1e9)  # the daemon's housekeeping, a minute on
    lines = [r.getMessage() for r in caplog.records if "open answer" in r.getMessage()]
    assert len(held) == 1 and "1 open answer failed: the application disconnected" in held[0]
    assert len(lines) == 2 and "2 more application connections ended with answers open" in lines[1]


# (7) the transcript memory accounting


def _traced_per_answer(answers: int, tokens: int) -> tuple[float, float]:
    """(bytes tracemalloc sees per answer, bytes the store accounts per answer) for ``answers`` finished answers of
    ``tokens`` distinct tokens each, generated at distinct times (as real ones are)."""
    store = TranscriptStore(max_bytes=1 << 40, retain_s=1e9)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(answers):
            req = store.create(None, 1 << 20, float(i))
            for j in range(tokens):
                req.push(f"t{j}", i + j * 1e-3)
            req.finish("stop", float(i))
            store.mark_finished(req)
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return used / answers, store.memory_bytes / answers


def test_the_accounting_covers_what_answers_hold():
    """tokenwire_transcript_bytes (what limits.transcript_memory_mb bounds) counted a third of the memory: 100,000
    empty answers grew the daemon by 68 MB and the gauge by 23.8 MiB. tracemalloc misses the SHA-256 state that
    OpenSSL allocates, so the accounting must be at least what it sees."""
    measured, accounted = _traced_per_answer(5000, 0)
    assert accounted == REQUEST_OVERHEAD_BYTES >= measured
    measured_tok, accounted_tok = _traced_per_answer(500, 40)
    per_token = (measured_tok - measured) / 40
    assert per_token <= TOKEN_OVERHEAD_BYTES + 2.9  # (2.9: the tokens' own bytes, "t0" to "t39", counted apart)
    assert accounted_tok >= measured_tok
