"""The ingest sockets' "N more connections refused" summary (unix_sockets' per-socket RefusalLog) is part of the
daemon's refusal flushes: its final one at stop, and its housekeeping's once a minute. It was in neither: held
back refusals were written only at the next refusal or a counted connection's close a minute later, so a daemon
that stopped first never wrote them."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import uvloop

from tokenwire.daemon import unix_sockets
from tokenwire.daemon.config import parse_config
from tokenwire.daemon.service import Daemon
from tokenwire.transport.handshake_guard import REFUSALS_LOG_S

SUMMARY = "kv.ingest_socket: 2 more connections refused"


async def _client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()
    writer.close()


async def _three_refused(path: Path, then: object) -> None:
    """A socket that holds one connection, and three more refused (the first logged, two held back); its server
    closed (uvloop's then lets go of the gate), then ``then()`` with the held connection still open."""
    server = await unix_sockets.serve(path, _client, limit=1024, group=None, setting="kv.ingest_socket_group",
                                      max_connections=1)
    _held_reader, held_writer = await asyncio.open_unix_connection(str(path))
    for _ in range(3):
        reader, writer = await asyncio.open_unix_connection(str(path))
        assert b"too many connections" in await reader.read()
        writer.close()
    server.close()
    then()  # type: ignore[operator]
    held_writer.close()


def _run(coro: object) -> None:
    uvloop.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]  # (the daemon's loop)


def _summaries(caplog: object) -> list[str]:
    return [r.getMessage() for r in caplog.records if "more connections refused" in r.getMessage()]  # type: ignore


def test_the_daemons_final_flush_writes_the_ingest_sockets_held_back_refusals(tmp_path, caplog):
    daemon = Daemon(parse_config({"server": {"listen": ["127.0.0.1:62810"]}}))  # (never started)
    with caplog.at_level(logging.INFO, logger="tokenwire.daemon"):
        _run(_three_refused(tmp_path / "kv.sock", lambda: daemon._log_refusals(time.monotonic(), final=True)))
    lines = _summaries(caplog)
    assert len(lines) == 1 and lines[0].startswith(SUMMARY), lines


def test_the_daemons_housekeeping_writes_them_once_a_minute_has_passed(tmp_path, caplog):
    daemon = Daemon(parse_config({"server": {"listen": ["127.0.0.1:62811"]}}))
    with caplog.at_level(logging.INFO, logger="tokenwire.daemon"):
        def twice() -> None:
            daemon._log_refusals(time.monotonic())  # (within the minute: held)
            assert not _summaries(caplog)
            daemon._log_refusals(time.monotonic() + REFUSALS_LOG_S + 1)

        _run(_three_refused(tmp_path / "kv.sock", twice))
    lines = _summaries(caplog)
    assert len(lines) == 1 and lines[0].startswith(SUMMARY), lines


def test_releasing_a_socket_writes_its_summary_once_and_forgets_it(tmp_path, caplog):
    """The daemon releases its sockets before its final flush: the summary comes there, once, and the module
    keeps no gate of a released socket."""
    path = tmp_path / "kv.sock"
    lines: list[str] = []

    def release() -> None:
        unix_sockets.release(path, None)
        lines.extend(_summaries(caplog))  # (what it wrote itself, not a flush of other sockets' gates)

    with caplog.at_level(logging.INFO, logger="tokenwire.daemon"):
        _run(_three_refused(path, release))
    assert len(lines) == 1 and lines[0].startswith(SUMMARY), lines
    assert path not in unix_sockets._gates
