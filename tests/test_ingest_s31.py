"""Ingest defects an engine-integration probe found: ended answers forgotten within max_open ("unknown id" for
one just cancelled), an INFO line per client cancel, pushes refused for memory in no metric, and a line limit one
byte off."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from tokenwire.daemon import ingest
from tokenwire.daemon.ingest import (
    MAX_LINE,
    TOO_LONG,
    IngestAPI,
    IngestConnection,
    _read_line,
)
from tokenwire.daemon.transcripts import TranscriptStore

from .test_handshake_limits import value
from .test_ingest_edges import _daemon
from .test_loopback import run

CANCELLED = "every client attached to it cancelled it"


def _api(max_bytes: int = 1 << 26, **kw: Any) -> IngestAPI:
    return IngestAPI(TranscriptStore(max_bytes=max_bytes, retain_s=600), max_tokens=lambda: 100_000, **kw)


def _open(api: IngestAPI, conn: IngestConnection) -> str:
    reply = api.handle({"op": "open"}, conn, 0)
    assert reply["ok"] is True, reply
    return str(reply["id"])


def _cancelled(api: IngestAPI, conn: IngestConnection, n: int) -> list[str]:
    """``n`` answers opened on ``conn``, each cancelled by its (last) client."""
    ids = []
    for _ in range(n):
        ids.append(_open(api, conn))
        assert api.cancel(bytes.fromhex(ids[-1]), 1, CANCELLED)
    return ids


# ------------------------------------------------------------------------------ 1: ended ids remembered per connection
def test_an_engine_told_of_every_cancel_within_twice_max_open():
    """An engine with 1,024 answers open (the default max_open) whose clients all cancelled heard "unknown id" for
    all but the last 256: it could not tell a cancel from its own bug."""
    api, conn = _api(), IngestConnection()
    assert api.max_open == 1024
    ids = _cancelled(api, conn, 2 * api.max_open)
    for rid in (ids[0], ids[-1]):
        reply = api.handle({"op": "push", "id": rid, "text": "x"}, conn, 2)
        assert reply == {"ok": False, "error": f"this answer is already finished (cancelled: {CANCELLED})"}


def test_an_id_forgotten_says_it_may_have_ended_long_ago():
    api, conn = _api(max_open=4), IngestConnection()
    assert api.finished_kept == ingest.FINISHED_KEPT  # at least that many, whatever a small max_open
    ids = _cancelled(api, conn, api.finished_kept + 1)
    assert len(conn.finished) == api.finished_kept
    error = api.handle({"op": "push", "id": ids[0], "text": "x"}, conn, 2)["error"]
    assert error.startswith("unknown id on this connection")
    assert f"or it ended long ago (the last {api.finished_kept} ended answers of a connection are remembered)" in error
    assert "already finished" in api.handle({"op": "push", "id": ids[1], "text": "x"}, conn, 2)["error"]


def test_the_ended_ids_kept_are_bounded_per_connection_and_in_all():
    """Twice a max_open of up to 1,000,000 per connection, on up to 4,096 connections, would be GBs of ids."""
    assert _api(max_open=1_000_000).finished_kept == ingest.MAX_FINISHED_KEPT
    assert _api(max_open=3000).finished_kept == 6000


def test_past_the_total_a_connection_keeps_only_its_last_few(monkeypatch):
    monkeypatch.setattr(ingest, "FINISHED_TOTAL", 200)
    monkeypatch.setattr(ingest, "FINISHED_KEPT", 120)
    monkeypatch.setattr(ingest, "MIN_FINISHED_KEPT", 10)
    api = _api(max_open=4)
    first, second = IngestConnection(), IngestConnection()
    _cancelled(api, first, 250)
    assert len(first.finished) == api.finished_kept == 120  # under the total: its own bound only
    for _ in range(100):  # past 200 in all, second is cut to its last 10 at each new end: the total holds
        _cancelled(api, second, 1)
        assert api._finished_total == len(first.finished) + len(second.finished) <= 200
    assert len(first.finished) == 120 and 10 <= len(second.finished) <= 80
    # the same reason for every answer is one string, not one each
    assert len({id(reason) for reason in first.finished.values()}) == 1
    api.disconnected(first, 3)  # a connection gone takes its ids out of the total
    assert api._finished_total == len(second.finished) and not first.finished
    _cancelled(api, second, 200)
    assert len(second.finished) == api.finished_kept  # its own bound again
    assert api._finished_total == len(second.finished)


# ------------------------------------------------------------------------------ 2: a client's cancel is DEBUG
def test_a_cancel_by_the_clients_is_logged_at_debug_only(caplog):
    """645 of 687 lines of a probe's log were these (a chat answer its clients cancel writes none); the metric
    tokenwire_ingest_answers_failed_total{reason="cancelled"} counts them."""
    caplog.set_level(logging.DEBUG, "tokenwire")
    api, conn = _api(), IngestConnection()
    _cancelled(api, conn, 3)
    lines = [r for r in caplog.records if "cancelled: " + CANCELLED in r.getMessage()]
    assert len(lines) == 3 and {r.levelno for r in lines} == {logging.DEBUG}


# ------------------------------------------------------------------------------ 3: pushes refused, a metric
def test_a_push_refused_for_memory_is_counted_once_each():
    reasons: list[str] = []
    api, conn = _api(max_bytes=4096, on_push_refused=reasons.append), IngestConnection()
    rid = _open(api, conn)
    for _ in range(2):  # a retried push counts again
        reply = api.handle({"op": "push", "id": rid, "text": "x" * 8192}, conn, 1)
        assert "transcript memory full" in reply["error"]
    assert api.handle({"op": "push", "id": rid, "text": 5}, conn, 1)["ok"] is False  # the app's bug: not counted
    assert api.handle({"op": "push", "id": rid, "text": "x"}, conn, 1)["ok"] is True
    assert reasons == ["memory", "memory"]


def test_the_daemon_counts_pushes_refused_for_memory(tmp_path):
    async def go() -> tuple[float, float]:
        async with _daemon(tmp_path) as daemon:
            api, conn = daemon._ingest_api, IngestConnection()
            assert api is not None
            before = value(daemon, "tokenwire_ingest_pushes_refused_total", {"reason": "memory"})
            assert daemon.metrics.registry.get_sample_value(  # a series from the start, at 0
                "tokenwire_ingest_pushes_refused_total", {"reason": "memory"}) == 0
            rid = api.handle({"op": "open"}, conn, time.monotonic())["id"]
            daemon.store.max_bytes = daemon.store.live_bytes + 100
            reply = api.handle({"op": "push", "id": rid, "text": "x" * 1000}, conn, time.monotonic())
            assert "transcript memory full" in reply["error"]
            return before, value(daemon, "tokenwire_ingest_pushes_refused_total", {"reason": "memory"})

    assert run(go(), 30) == (0, 1)


# ------------------------------------------------------------------------------ 4: the line limit, exactly
def _lines_read(data: bytes) -> list[bytes | None]:
    async def go() -> list[bytes | None]:
        reader = asyncio.StreamReader(limit=MAX_LINE)  # as the server's (unix_sockets.serve's limit=MAX_LINE)
        reader.feed_data(data)
        reader.feed_eof()
        return [await _read_line(reader) for _ in range(3)]

    return run(go(), 30)


@pytest.mark.parametrize("end", [b"\n", b""])
def test_a_line_of_max_line_bytes_is_read_and_one_byte_more_is_too_long(end):
    """1,048,577 bytes and a newline were accepted: the first byte was read alone, the reader's limit bounded the
    rest. ``end``: with its newline, or a last line without one."""
    fits = b'"' + b"x" * (MAX_LINE - 2) + b'"'
    assert _lines_read(fits + b"\n" + b"{}\n") == [fits + b"\n", b"{}\n", None]
    over = b'"' + b"x" * (MAX_LINE - 1) + b'"'
    assert _lines_read(over + b"\n" + b"{}\n") == [TOO_LONG, b"{}\n", None]
    assert _lines_read(b"{}\n" + over + end) == [b"{}\n", TOO_LONG, None]
    assert _lines_read(b"{}\n" + fits + end) == [b"{}\n", fits + end, None]
