"""The ingest API's bounds and its socket's robustness: names and open answers per connection are bounded, a
line Python's JSON parser refuses is an error reply, and a daemon stopping with an app connected is quiet."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tokenwire.daemon.config import parse_config
from tokenwire.daemon.ingest import (
    DEFAULT_MAX_OPEN,
    MAX_MODEL_CHARS,
    MAX_PRINCIPAL_CHARS,
    IngestAPI,
    IngestConnection,
    serve_ingest,
)
from tokenwire.daemon.transcripts import TranscriptStore
from tokenwire.transport.errors import ErrorCode
from tokenwire.transport.frames import Request

from .test_loopback import run


def _api(**kw: Any) -> tuple[TranscriptStore, IngestAPI]:
    store = TranscriptStore(max_bytes=1 << 22, retain_s=10)
    return store, IngestAPI(store, max_tokens=lambda: 100, **kw)


def test_the_model_limit_is_the_quic_requests():
    """The ingest limit is the one a QUIC request's model field has (transport/frames.py)."""
    check = Request.FIELDS["model"][1]
    assert check("request", "model", "m" * MAX_MODEL_CHARS)
    with pytest.raises(Exception, match=str(MAX_MODEL_CHARS)):
        check("request", "model", "m" * (MAX_MODEL_CHARS + 1))


@pytest.mark.parametrize("key, limit", [("model", MAX_MODEL_CHARS), ("principal", MAX_PRINCIPAL_CHARS)])
def test_long_names_are_refused(key, limit):
    """1000 opens with 1 MiB model names took the daemon from 0.28 to 1.26 GB, outside transcript_memory_mb."""
    store, api = _api()
    conn = IngestConnection()
    assert api.handle({"op": "open", key: "n" * limit}, conn, 0)["ok"] is True
    reply = api.handle({"op": "open", key: "n" * (limit + 1)}, conn, 0)
    assert reply == {"ok": False, "error": f"{key} longer than {limit} characters"}
    assert store.live_count == 1 and len(conn.open) == 1


def test_model_and_principal_count_in_the_store_memory():
    store, api = _api()
    conn = IngestConnection()
    api.handle({"op": "open"}, conn, 0)
    bare = store.memory_bytes
    api.handle({"op": "open", "model": "m" * 100, "principal": "é" * 10}, conn, 0)
    assert store.memory_bytes == 2 * bare + 100 + 20  # UTF-8 bytes of both names
    # a lone surrogate (JSON can carry one) was counted too; it is refused now (no client could be sent it)
    assert api.handle({"op": "open", "model": "\ud83d"}, conn, 0)["ok"] is False
    assert store.memory_bytes == 2 * bare + 120


def test_open_answers_per_connection_are_bounded():
    """One app held 200k answers open; past max_open an open is refused until one ends."""
    store, api = _api(max_open=3)
    conn, other = IngestConnection(), IngestConnection()
    ids = [api.handle({"op": "open"}, conn, 0)["id"] for _ in range(3)]
    refused = api.handle({"op": "open"}, conn, 0)
    assert refused["ok"] is False and "3 answers already open" in refused["error"] and "max_open" in refused["error"]
    assert api.handle({"op": "open"}, other, 0)["ok"] is True  # the bound is per connection
    api.handle({"op": "finish", "id": ids[0]}, conn, 0)
    assert api.handle({"op": "open"}, conn, 0)["ok"] is True
    assert store.live_count == 4
    assert IngestAPI(store, max_tokens=lambda: 1).max_open == DEFAULT_MAX_OPEN


def test_max_open_config_key():
    assert parse_config({}).ingest.max_open == DEFAULT_MAX_OPEN
    assert parse_config({"ingest": {"max_open": 5}}).ingest.max_open == 5
    with pytest.raises(ValueError, match=r"ingest\.max_open: expected an integer"):
        parse_config({"ingest": {"max_open": 0}})


async def _bad_op_then_more(tmp_path: Path, api: IngestAPI,
                            bad_line: Callable[[str], bytes]) -> tuple[dict[str, Any], ...]:
    """Open an answer, send ``bad_line(id)``, then a push and a finish on the same connection: the replies."""
    server = await serve_ingest(tmp_path / "ingest.sock", api)
    reader, writer = await _connect(tmp_path / "ingest.sock")
    rid = (await _send(reader, writer, b'{"op": "open"}'))["id"]
    bad = await _send(reader, writer, bad_line(rid))
    pushed = await _send(reader, writer, json.dumps({"op": "push", "id": rid, "text": "still here"}).encode())
    finished = await _send(reader, writer, json.dumps({"op": "finish", "id": rid}).encode())
    writer.close()
    server.close()
    return bad, pushed, finished


async def _connect(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(str(path), limit=1 << 22)


async def _send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> dict[str, Any]:
    writer.write(raw + b"\n")
    await writer.drain()
    return json.loads(await asyncio.wait_for(reader.readline(), 10))


def test_a_number_over_pythons_digit_limit_is_an_error_reply(tmp_path):
    """Python 3.11 refuses integers of over 4300 digits with a plain ValueError: it killed the connection,
    failed every answer it had open and logged an unhandled exception."""
    _store, api = _api()

    bad, pushed, finished = run(_bad_op_then_more(
        tmp_path, api, lambda rid: b'{"op": "push", "id": "%s", "n": %s}' % (rid.encode(), b"1" * 5000)), timeout=30)
    assert bad["ok"] is False and bad["error"].startswith("not valid JSON")
    assert pushed == {"ok": True, "tokens": 1} and finished == {"ok": True, "tokens": 1}


def test_stopping_with_an_app_connected_is_quiet(tmp_path):
    """At daemon exit the connection's task is cancelled; Python 3.11's stream server then logged "ERROR
    asyncio: Exception in callback ... CancelledError" with a traceback. The app's open answers still fail,
    as at a disconnect."""
    store, api = _api()
    errors: list[dict[str, Any]] = []

    async def go() -> str:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        server = await serve_ingest(tmp_path / "ingest.sock", api)
        reader, writer = await _connect(tmp_path / "ingest.sock")
        rid = (await _send(reader, writer, b'{"op": "open"}'))["id"]
        server.close()
        me = asyncio.current_task()
        others = [t for t in asyncio.all_tasks() if t is not me]  # what asyncio.run does at the daemon's exit
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        for _ in range(5):  # the done callbacks run on the next turns of the loop
            await asyncio.sleep(0)
        # the daemon's side says why in a last line, then closes the connection
        assert await asyncio.wait_for(reader.read(), 5) == \
            b'{"ok": false, "error": "daemon shutting down: 1 open answer failed"}\n'
        writer.close()
        return rid

    rid = asyncio.run(go())
    assert errors == []
    req = store.get(bytes.fromhex(rid))
    assert req.error is not None and req.error[0] == ErrorCode.UPSTREAM_ERROR and "stopped" in req.error[1]


def test_a_failure_of_ours_is_an_error_reply_and_the_connection_lives(tmp_path, caplog):
    """An exception inside the handling of one op dropped the application's connection and failed every answer
    it had open."""
    _store, api = _api()
    real = api.handle

    def flaky(msg, conn, now):
        if msg.get("op") == "push" and msg.get("text") == "boom":
            raise RuntimeError("a bug of ours")
        return real(msg, conn, now)

    api.handle = flaky

    bad, pushed, finished = run(_bad_op_then_more(
        tmp_path, api, lambda rid: json.dumps({"op": "push", "id": rid, "text": "boom"}).encode()), timeout=30)
    assert bad == {"ok": False, "error": "internal error (the daemon's log has it)"}
    assert pushed == {"ok": True, "tokens": 1} and finished == {"ok": True, "tokens": 1}
    assert "ingest: handling op 'push' failed" in caplog.text
