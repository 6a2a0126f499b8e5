"""The ingest API: a local application pushes the tokens of an answer it owns; clients stream it by id.

Newline-delimited JSON over a Unix stream socket (any language, or ``socat``, can speak it). One reply
line per request line::

    {"op": "open", "model": "my-app", "principal": "alice", "max_tokens": 4096}
        -> {"ok": true, "id": "<32 hex digits>"}       give the id to the client
        (model and principal: at most 128 characters each; at most ``[ingest] max_open`` answers open at
        once per connection, 1024 by default)
    {"op": "push", "id": "...", "text": " Hello"}       -> {"ok": true, "tokens": 1}
        (text past the answer's max_tokens is cut and the answer finishes: the reply then adds
        "finished": "length", "cut": true, and later ops on the id say it is finished)
    {"op": "finish", "id": "...", "reason": "stop"}     -> {"ok": true, "tokens": 12}
    {"op": "fail", "id": "...", "message": "model crashed"}  -> {"ok": true}

Errors come back as ``{"ok": false, "error": "..."}`` and the connection stays open. An application that
disconnects with answers still open fails them (``UPSTREAM_ERROR``), so no client waits forever. Clients
attach with ``Connection.attach(request_id)`` (a resume from index 0); only the principal named at open
(the token name, or none) may attach.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenwire.transport.errors import ErrorCode
from tokenwire.transport.frames import MAX_MODEL_CHARS  # what a QUIC request may name

from . import unix_sockets
from .config import MAX_PRINCIPAL_CHARS, IngestConfig
from .transcripts import GenerationLimit, LiveRequest, TranscriptStore

log = logging.getLogger("tokenwire.ingest")
MAX_LINE = 1 << 20
FINISHED_KEPT = 256  # finished answers an ingest connection still recognises by id
DEFAULT_MAX_OPEN = IngestConfig.max_open  # answers one connection may hold open at once


@dataclass
class IngestConnection:
    """One application connection: the answers it opened and has not finished, and how those it finished
    ended (by id: a later op on one says so; bounded, and no transcript is held here, the store's memory bound
    covers those)."""

    open: dict[bytes, LiveRequest] = field(default_factory=dict)
    finished: OrderedDict[bytes, str] = field(default_factory=OrderedDict)


class IngestAPI:
    """Sans-I/O handling of ingest messages against the transcript store."""

    def __init__(
        self,
        store: TranscriptStore,
        *,
        max_tokens: Callable[[], int],
        on_open: Callable[[LiveRequest], None] = lambda r: None,
        on_done: Callable[[LiveRequest], None] = lambda r: None,
        on_tokens: Callable[[int], None] = lambda n: None,
        max_open: int = DEFAULT_MAX_OPEN,
    ) -> None:
        self.store = store
        self.max_tokens = max_tokens
        self.max_open = max_open  # per connection: one app opened 200k answers, each held until it ends
        self.on_open = on_open
        self.on_done = on_done
        self.on_tokens = on_tokens  # tokens added (the daemon's tokenwire_tokens_total)

    def handle(self, msg: Any, conn: IngestConnection, now: float) -> dict[str, Any]:
        if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
            return {"ok": False, "error": "expected a JSON object with an 'op'"}
        op = msg["op"]
        if op == "open":
            limit = msg.get("max_tokens", self.max_tokens())
            if type(limit) is not int or not 1 <= limit <= self.max_tokens():
                return {"ok": False, "error": f"max_tokens must be an integer in [1, {self.max_tokens()}]"}
            principal = msg.get("principal")
            model = msg.get("model")
            if principal is not None and not isinstance(principal, str):
                return {"ok": False, "error": "principal must be a string"}
            if model is not None and not isinstance(model, str):
                return {"ok": False, "error": "model must be a string"}
            # the limits a QUIC request has: 1 MiB names once took 1 GB of memory outside transcript_memory_mb
            if principal is not None and len(principal) > MAX_PRINCIPAL_CHARS:
                return {"ok": False, "error": f"principal longer than {MAX_PRINCIPAL_CHARS} characters"}
            if model is not None and len(model) > MAX_MODEL_CHARS:
                return {"ok": False, "error": f"model longer than {MAX_MODEL_CHARS} characters"}
            if len(conn.open) >= self.max_open:
                return {"ok": False, "error": f"{len(conn.open)} answers already open on this connection "
                        "(ingest.max_open): finish or fail one first"}
            req = self.store.create(principal, limit, now, model=model)
            conn.open[req.request_id] = req
            self.on_open(req)
            return {"ok": True, "id": req.request_id.hex()}
        if op not in ("push", "finish", "fail"):
            return {"ok": False, "error": f"unknown op {op!r} (open, push, finish, fail)"}
        try:
            rid = bytes.fromhex(msg.get("id", ""))
        except (TypeError, ValueError):
            return {"ok": False, "error": "id must be the hex request id returned by open"}
        req = conn.open.get(rid)
        if req is None:
            ended = conn.finished.get(rid)
            if ended is not None:
                return {"ok": False, "error": f"this answer is already finished ({ended})"}
            return {"ok": False, "error": "unknown id, or not opened on this connection"}
        if op == "push":
            text = msg.get("text")
            if not isinstance(text, str):
                return {"ok": False, "error": "push needs a 'text' string"}
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # JSON can carry lone surrogates ("\ud83d"); UTF-8 cannot
                return {"ok": False, "error": "text is not valid Unicode (a lone surrogate)"}
            try:
                self.on_tokens(req.push(text, now))
            except GenerationLimit as cut:
                self.on_tokens(cut.args[0])
                req.finish("length", now)
                self._done(req, conn)
                return {"ok": True, "tokens": len(req.transcript), "finished": "length", "cut": True}
            return {"ok": True, "tokens": len(req.transcript)}
        if op == "finish":
            reason = msg.get("reason", "stop")
            if not isinstance(reason, str) or not 0 < len(reason) <= 32:
                return {"ok": False, "error": "reason must be a short string"}
            req.finish(reason, now)
            self._done(req, conn)
            return {"ok": True, "tokens": len(req.transcript)}
        message = msg.get("message", "application failed")
        req.fail(ErrorCode.UPSTREAM_ERROR, str(message)[:300], now)
        self._done(req, conn)
        return {"ok": True}

    def _done(self, req: LiveRequest, conn: IngestConnection) -> None:
        # remembered by how it ended, so that a later op on it says it is finished (it said "unknown id"); the
        # oldest go beyond FINISHED_KEPT, a long-lived app connection opens answers without end
        conn.open.pop(req.request_id, None)
        conn.finished[req.request_id] = req.transcript.reason if req.error is None else "failed"
        while len(conn.finished) > FINISHED_KEPT:
            conn.finished.popitem(last=False)
        self.store.mark_finished(req)
        self.on_done(req)

    def disconnected(
        self, conn: IngestConnection, now: float, why: str = "the application disconnected before finishing"
    ) -> None:
        for req in list(conn.open.values()):
            req.fail(ErrorCode.UPSTREAM_ERROR, why, now)
            self._done(req, conn)


TOO_LONG = b"<too long>"
"""What :func:`_read_line` returns for a line over ``MAX_LINE`` (it is consumed, the stream stays usable)."""


async def _read_line(reader: asyncio.StreamReader) -> bytes | None:
    """The next line, ``TOO_LONG`` for an over-long one (skipped up to its newline), None at end of input.

    Skipping instead of closing keeps the connection, and with it the answers it owns, alive.
    """
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError as exc:
        overrun = exc
    while True:  # drop what is buffered (up to the newline if it has arrived), then look again
        try:
            await reader.readexactly(overrun.consumed)
            await reader.readuntil(b"\n")
            return TOO_LONG
        except asyncio.IncompleteReadError:
            return None
        except asyncio.LimitOverrunError as exc:
            overrun = exc


def _decoded(line: bytes) -> tuple[Any, str | None]:
    """``(message, None)`` or ``(None, why not)``. UTF-8 only (json.loads would guess UTF-16 from some bytes),
    and nesting deep enough to exhaust the parser's recursion is an error like any other."""
    try:
        return json.loads(line.decode("utf-8")), None
    except UnicodeDecodeError:
        return None, "not valid UTF-8"
    except RecursionError:
        return None, "JSON nested too deeply"
    except json.JSONDecodeError:
        return None, "not valid JSON"
    except ValueError:  # Python's int limit: a number over 4300 digits (it killed the connection)
        return None, "not valid JSON (a number with too many digits)"


def _handled(api: IngestAPI, msg: Any, conn: IngestConnection) -> dict[str, Any]:
    """``api.handle``, with a failure of ours answered as one (logged): it dropped the application's connection
    and failed every answer it had open."""
    try:
        return api.handle(msg, conn, time.monotonic())
    except Exception:
        log.exception("ingest: handling op %r failed", msg.get("op") if isinstance(msg, dict) else None)
        return {"ok": False, "error": "internal error (the daemon's log has it)"}


async def serve_ingest(path: Path, api: IngestAPI) -> asyncio.Server:
    """Listen on the Unix socket ``path`` (mode 0660; a stale socket file is replaced)."""

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = IngestConnection()
        why = "the application disconnected before finishing"
        try:
            while True:
                line = await _read_line(reader)
                if line is None:
                    break
                if line is TOO_LONG:
                    msg, error = None, f"line longer than {MAX_LINE} bytes (skipped)"
                else:
                    msg, error = _decoded(line)
                reply = {"ok": False, "error": error} if error else _handled(api, msg, conn)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # the daemon is stopping. Returned, not re-raised: Python 3.11's stream server calls
            # task.exception() on the finished task, which raises for a cancelled one, and asyncio logged that
            # as an ERROR with a traceback on every normal shutdown with an app connected
            why = "the daemon stopped before the application finished"
        finally:
            api.disconnected(conn, time.monotonic(), why)
            writer.close()

    if not path.parent.is_dir():  # a mistyped path made folders anywhere (as root): the setting is named instead
        raise FileNotFoundError(errno.ENOENT, "no such folder", str(path.parent))
    unix_sockets.claim(path)  # a stale socket goes; a live one (another daemon) or a file is an error
    server = await asyncio.start_unix_server(client, path=str(path), limit=MAX_LINE)
    os.chmod(path, 0o660)
    return server
