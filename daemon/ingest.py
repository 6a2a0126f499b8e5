"""The ingest API: a local application pushes the tokens of an answer it owns; clients stream it by id.

Newline-delimited JSON over a Unix stream socket (any language, or ``socat``, can speak it). One reply
line per request line::

    {"op": "open", "model": "my-app", "principal": "alice", "max_tokens": 4096}
        -> {"ok": true, "id": "<32 hex digits>"}       give the id to the client (the SDK's
        ``Connection.attach`` takes the id's bytes, ``bytes.fromhex(id)``; ``tokenwire chat --attach`` the hex)
        (model and principal: at most 128 characters each, a model without control characters, as every model
        name; at most ``[ingest] max_open`` answers open at once per connection, 1024 by default; the
        principal must be one a client can have: with auth tokens a token's name, with ``server.client_ca``
        only ``cert:`` and a certificate's name, else none; refused while the daemon drains, past
        ``limits.max_live_answers``, which counts open ingest answers too, and while the answers being
        generated fill ``limits.transcript_memory_mb``)
    {"op": "push", "id": "...", "text": " Hello"}       -> {"ok": true, "tokens": 1}
        (a push's text is cut into tokens of at most 256 bytes of UTF-8, each a token of the answer:
        "tokens" is how many the answer holds now, and max_tokens counts these, so bounds its bytes to
        256 x max_tokens; text past the answer's max_tokens is cut and the answer finishes: the reply then
        adds "finished": "length", "cut": true, and later ops on the id say it is finished. A push that
        would take the answers being generated past ``limits.transcript_memory_mb`` is refused, nothing
        of it added, and the answer stays open: finish or fail it, or push again once other answers end)
    {"op": "finish", "id": "...", "reason": "stop"}     -> {"ok": true, "tokens": 12}
        (reason: 1 to 32 printable characters, what FINISHED's ``fr`` carries; "stop" by default)
    {"op": "fail", "id": "...", "message": "model crashed"}  -> {"ok": true}
        (clients get UPSTREAM_ERROR with the message's first 300 characters; "application failed"
        when it is null, left out or "")

Errors come back as ``{"ok": false, "error": "..."}`` and the connection stays open. The application must read
every reply line: the daemon reads no further op from a connection while the replies it wrote there wait
unread (past the socket's buffers), and fails its answers when that lasts ``[ingest] stall_timeout_s`` ("the
application did not read its replies"). An answer belongs to the connection that opened it: only it may push,
finish or fail the answer, which fails when that connection closes (an application that reconnects, after a
crash say, opens new answers). Text that is not valid
Unicode (JSON can carry a lone surrogate, ``"\\ud83d"``) is refused wherever it would reach a client. An
application that disconnects with answers still open fails them (``UPSTREAM_ERROR``), so no client waits
forever; so does an answer with no op on it for ``[ingest] stall_timeout_s`` (``UPSTREAM_TIMEOUT``; later ops
on it say it timed out). An answer nobody reads is cancelled, as the daemon cancels its upstreams' answers:
when the last client attached to it cancels, or when no client has been attached for
``limits.orphan_timeout_s`` (from its open, or since its last client's connection was lost); the next op on
it answers ``{"ok": false, "error": "this answer is already finished (cancelled: ...)"}``. When the daemon
stops (a drain's end) it fails the answers still open and writes one last line, ``{"ok": false, "error":
"daemon shutting down ..."}``, before closing the connection: the reply an application reads for its next (or
unanswered) op. Clients attach with
``Connection.attach(request_id)`` (a resume from index 0); only the principal named at open may attach.

For engine authors. ``model`` in an open is a label kept with the answer (it counts in the answer's memory): it
is not checked against ``[[routes]]`` or an ``ingest`` upstream, and no client sees it (a client attaches by id
alone). A push of ``""`` adds nothing and counts as an op, so it keeps an answer alive against
``stall_timeout_s`` through a long thinking phase. Replies carry no id: they come one per line read, in order,
and a pipelining engine pairs them by position; a blank line is a line too, answered with an error, so it must
send none. Each push is at least one token of the answer, and a probe measured about 13,300 pushes a second on
one connection through the daemon (2 cores): an engine that produces faster merges what it has into one push,
and clients then see fewer, larger tokens (a push's text is one token up to 256 bytes; max_tokens counts
these). JSON carries characters, not bytes: an engine whose tokens split a UTF-8 character holds its bytes until
the character is whole (a lone surrogate is refused). A line is at most MAX_LINE (1 MiB) bytes before its
newline; a longer one is skipped and answered with an error. An op on an id that is not open says whether the
answer is finished and how, for the last ``finished_kept`` answers that ended on the connection (2,048, or
twice ``max_open``, up to 16,384; only the last 256 while every connection together remembers 524,288); an
older one gets "unknown id".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from tokenwire.transport.errors import ErrorCode
from tokenwire.transport.frames import (  # what a QUIC request may name/have
    MAX_MODEL_CHARS,
    REQUEST_ID_BYTES,
    model_name_problem,
)

from . import unix_sockets
from .cli import printable
from .config import MAX_PRINCIPAL_CHARS, AuthConfig, IngestConfig
from .transcripts import GenerationLimit, LiveRequest, TranscriptStore, request_bytes

if TYPE_CHECKING:  # (at run time only with a log passed in: `config check` imports this module without aioquic)
    from tokenwire.transport.handshake_guard import ReasonLog, RefusalLog

log = logging.getLogger("tokenwire.ingest")
MAX_LINE = 1 << 20
DEFAULT_MAX_OPEN = IngestConfig.max_open  # answers one connection may hold open at once
# ended answers a connection still recognises by id (a later op on one says how it ended): at least twice
# max_open, since an engine with 1,024 answers open and 256 remembered was told "unknown id" for one it had
# just been cancelled. Each costs ~185 bytes (a 16-byte id, the ordered dict's entry; the reason is interned), so:
FINISHED_KEPT = 2 * DEFAULT_MAX_OPEN  # at the least (2,048: ~370 KiB for a busy connection)
MAX_FINISHED_KEPT = 1 << 14  # at the most, however large max_open is (~3 MiB)
# across every connection (~90 MiB): past it, a connection that ends an answer keeps only its last
# MIN_FINISHED_KEPT, so 4,096 busy connections (the socket's bound) hold ~290 MB at worst, as 256 each did before,
# not 1.5 GB (or 12 GB with max_open at 1,000,000)
FINISHED_TOTAL = 1 << 19
MIN_FINISHED_KEPT = 256
DEFAULT_STALL_TIMEOUT_S = IngestConfig.stall_timeout_s
MAX_REASON_CHARS = 32  # FINISHED's "fr": a str of at most 32 (docs/protocol.md); a longer one failed the client
MAX_MESSAGE_CHARS = 300  # of a fail's message, in the ERROR clients get
# a line begun must end within this: 300 connections each holding a 1 MiB line without its newline held 300 MB.
# The wait for a line's first byte is not bounded: an application may hold its connection idle between answers
LINE_TIMEOUT_S = 30.0
# how an ingest answer ended (the outcome on_done hears, tokenwire_ingest_answers_failed_total's reason)
FAILED_OUTCOMES = ("app_failed", "app_gone", "stalled", "drain", "cancelled", "orphaned")
# why an open was refused (on_open_refused, tokenwire_ingest_opens_refused_total's reason); a malformed open is not
# counted (the application's bug, in its reply)
OPEN_REFUSAL_REASONS = ("busy", "memory", "principal", "max_open", "draining")
# why a push was refused by the daemon's say (on_push_refused, tokenwire_ingest_pushes_refused_total's reason): only
# the transcript memory; a malformed push, or one to an answer not open, is the application's bug, in its reply
PUSH_REFUSAL_REASONS = ("memory",)


@dataclass
class IngestConnection:
    """One application connection: the answers it opened and has not finished, and how those it finished
    ended (by id: a later op on one says so; bounded, and no transcript is held here, the store's memory bound
    covers those)."""

    open: dict[bytes, LiveRequest] = field(default_factory=dict)
    finished: OrderedDict[bytes, str] = field(default_factory=OrderedDict)
    # since when the daemon waits to write a reply the application has not read (None: it does not): it reads no
    # op meanwhile, and the stall timeout blamed the application for sending nothing
    writing_since: float | None = None


def _request_id(value: Any) -> bytes | None:
    """The request id an op names (``value``, its "id"), or None when it is not one: a string of 32 hex digits.
    A 1-byte "00" got "unknown id on this connection", which sent the application looking for a lost connection."""
    if not isinstance(value, str) or len(value) != 2 * REQUEST_ID_BYTES:
        return None
    try:
        rid = bytes.fromhex(value)
    except ValueError:
        return None
    return rid if len(rid) == REQUEST_ID_BYTES else None  # (fromhex skips spaces)


class OpenRefusal(NamedTuple):
    """The daemon's no to an open (``IngestAPI.refuse_open``): ``reason``, one of OPEN_REFUSAL_REASONS (the
    metric's label), and ``text``, the application's reply."""

    reason: str
    text: str


def _invalid_unicode(text: str) -> bool:
    """JSON can carry a lone surrogate ("\\ud83d"); UTF-8, and with it every frame to a client, cannot: one in a
    fail's message broke the QUIC connection of every client attached to the answer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def principal_problem(principal: str | None, auth: AuthConfig, *, certificates: bool) -> str | None:
    """Why no client could ever attach as ``principal`` under ``auth`` (the running configuration's), or None.

    A client's principal (``Daemon.on_request``): with auth tokens, its token's name (a certificate's ``cert:``
    name gives way to it); without, ``cert:`` and its certificate's name when ``server.client_ca`` is set
    (``certificates``: a certificate is then required), else none. Such an answer was opened, and every attach
    got NOT_FOUND "unknown or expired request id"."""
    if auth.required:
        if principal is None:
            return "principal required: auth tokens are configured, and a client attaches as its token's name"
        if not auth.by_name(principal):  # (a lookup: a scan of every token per open blocked the loop)
            return f"principal {principal!r} is not the name of an auth token: no client could attach to it"
        return None
    if certificates:
        if principal is None or not principal.startswith("cert:"):
            return ("principal must be \"cert:\" and a client certificate's name: without auth tokens, clients "
                    "attach as their certificate (server.client_ca)")
        if not is_cert_principal(principal):
            return (f"principal {principal!r} is not one a client certificate can have: \"cert:\" and its name "
                    "(printable, no '~'), or a shortened name ending in '~' and 16 hex digits, as "
                    "tokenwire.daemon.certificates.cert_principal(name) gives it")
        return None
    if principal is not None:
        return "no principal may be named: auth is off, so clients have none and could not attach to it"
    return None


CERT_PREFIX = "cert:"
CERT_DIGEST_CHARS = 16  # hex digits of the name's SHA-256 after the '~' of a shortened certificate principal
# the longest printable prefix a shortened one keeps (certificates.cert_principal: 128 in all)
CERT_SHOWN_CHARS = MAX_PRINCIPAL_CHARS - len(CERT_PREFIX) - 1 - CERT_DIGEST_CHARS
_HEX_DIGITS = frozenset("0123456789abcdef")


def is_cert_principal(principal: str) -> bool:
    """Whether some client certificate's name gives ``principal`` (``certificates.cert_principal``): any
    ``cert:...`` was accepted at open, e.g. ``cert:ca~rol``, which no certificate has, and every attach got
    "unknown or expired request id". Its two forms: ``cert:`` and a name that is printable, has no ``~`` and fits
    128 characters; or a shortened one, ``cert:``, a printable prefix of the name (unprintable characters shown as
    ``?``), ``~`` and 16 hex digits, which only a name that needed it has: one that had a ``~`` or an unprintable
    character (in the prefix, then), or a long one (whose prefix is then CERT_SHOWN_CHARS long)."""
    if not principal.startswith(CERT_PREFIX) or len(principal) > MAX_PRINCIPAL_CHARS:
        return False
    name = principal[len(CERT_PREFIX):]
    if not name.isprintable():
        return False
    if "~" not in name:
        return True
    shown, _, digest = name.rpartition("~")
    if len(digest) != CERT_DIGEST_CHARS or not set(digest) <= _HEX_DIGITS:
        return False
    return len(shown) == CERT_SHOWN_CHARS or "~" in shown or "?" in shown


class IngestAPI:
    """Sans-I/O handling of ingest messages against the transcript store."""

    def __init__(
        self,
        store: TranscriptStore,
        *,
        max_tokens: Callable[[], int],
        on_open: Callable[[LiveRequest], None] = lambda r: None,
        on_done: Callable[[LiveRequest, str], None] = lambda r, outcome: None,
        on_tokens: Callable[[int], None] = lambda n: None,
        max_open: int = DEFAULT_MAX_OPEN,
        refuse_open: Callable[[str | None], OpenRefusal | None] = lambda principal: None,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
        orphan_log: RefusalLog | None = None,
        fail_log: RefusalLog | None = None,
        on_open_refused: Callable[[str], None] = lambda reason: None,
        on_push_refused: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.store = store
        self.max_tokens = max_tokens
        self.max_open = max_open  # per connection: one app opened 200k answers, each held until it ends
        # ended ids each connection remembers (FINISHED_KEPT's comment), and how many all of them hold now
        self.finished_kept = max(FINISHED_KEPT, min(2 * max_open, MAX_FINISHED_KEPT))
        self._finished_total = 0
        self.on_open = on_open
        self.on_done = on_done  # with the outcome: "finished" or one of FAILED_OUTCOMES
        self.on_tokens = on_tokens  # tokens added (the daemon's tokenwire_tokens_total)
        # the daemon's say on an open, given its principal: why not (draining, too many answers live, a principal
        # no client can have), or None
        self.refuse_open = refuse_open
        self.on_open_refused = on_open_refused  # one of OPEN_REFUSAL_REASONS, once per refused open (a metric)
        # one of PUSH_REFUSAL_REASONS, once per refused push: pushes refused for memory were in no metric
        self.on_push_refused = on_push_refused
        self.stall_timeout_s = stall_timeout_s
        # the orphan timeout's cancellations: one line, then those of the next REFUSALS_LOG_S counted and summed
        # up (the daemon passes the log its own answers' go through, which its housekeeping flushes); a line each
        # wrote hundreds when many clients vanished at once. None: a line each (a bare API, as in tests)
        self.orphan_log = orphan_log
        # the application's fail ops: a line each wrote 15,000 warnings a minute for an app that failed its answers
        # in a loop; one line, then a summary (flushed by expire_stalled, which the daemon's housekeeping calls)
        from tokenwire.transport.handshake_guard import RefusalLog  # (aioquic: not for `config check`)

        if fail_log is None:
            fail_log = RefusalLog(log, lambda n, secs: f"ingest: {n} more answers failed by their application "
                                  f"over {secs:.0f} s (tokenwire_ingest_answers_failed_total{{reason=\"app_failed\"}})")
        self.fail_log = fail_log
        # connections that ended with answers open: a line each wrote ~2,300 warnings a minute for an app that
        # reconnected in a loop (probe); one line, then a summary (flushed by expire_stalled, as fail_log's)
        self.gone_log = RefusalLog(log, lambda n, secs: f"ingest: {n} more application connections ended with "
                                   f"answers open over {secs:.0f} s, their open answers failed "
                                   f"(tokenwire_ingest_answers_failed_total)")
        # answers failed by the stall timeout, per connection (by id(conn)) with the last one's reason: a line each
        # let one stalled connection write up to max_open (1,024) warnings at once; one line, then a summary
        self._stall_logs: dict[int, ReasonLog] = {}
        # every connection's open answers, with their connection and last op: a hung application held its
        # attached clients for ever (nothing else ends an ingest answer; keepalives keep the clients' connections)
        self._open: dict[bytes, tuple[IngestConnection, float]] = {}
        # answers a push was refused for past transcript_memory_mb: logged once each, not at every retried push
        self._memory_refused: set[bytes] = set()

    @property
    def live_count(self) -> int:
        """Answers open on every connection (they count toward ``limits.max_live_answers``)."""
        return len(self._open)

    def handle(self, msg: Any, conn: IngestConnection, now: float) -> dict[str, Any]:
        if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
            return {"ok": False, "error": "expected a JSON object with an 'op'"}
        op = msg["op"]
        req: LiveRequest | None
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
            if principal is not None and _invalid_unicode(principal):
                return {"ok": False, "error": "principal is not valid Unicode (a lone surrogate)"}
            problem = None if model is None else model_name_problem(model)  # (the rule of every model name)
            if problem is not None:
                return {"ok": False, "error": f"model {problem}"}
            if len(conn.open) >= self.max_open:
                self.on_open_refused("max_open")
                return {"ok": False, "error": f"{len(conn.open)} answers already open on this connection "
                        "(ingest.max_open): finish or fail one first"}
            refused = self.refuse_open(principal)
            if refused is not None:
                self.on_open_refused(refused.reason)
                return {"ok": False, "error": refused.text}
            need = request_bytes(model, principal)
            if self.store.live_bytes + need > self.store.max_bytes:
                self.on_open_refused("memory")
                return {"ok": False, "error": self._memory_full(need, "open")}
            req = self.store.create(principal, limit, now, model=model)
            conn.open[req.request_id] = req
            self._open[req.request_id] = (conn, now)
            self.on_open(req)
            return {"ok": True, "id": req.request_id.hex()}
        if op not in ("push", "finish", "fail"):
            return {"ok": False, "error": f"unknown op {op!r} (open, push, finish, fail)"}
        if "id" not in msg:  # ("" went on to "unknown id on this connection", as if the app had reconnected)
            return {"ok": False, "error": f"{op} needs an 'id': the hex request id open returned"}
        rid = _request_id(msg["id"])
        if rid is None:
            return {"ok": False, "error": f"id must be the {2 * REQUEST_ID_BYTES} hex digits of a request id, as "
                    "open returned it"}
        req = conn.open.get(rid)
        if req is None:
            ended = conn.finished.get(rid)
            if ended is not None:
                return {"ok": False, "error": f"this answer is already finished ({ended})"}
            if rid in self._open:
                return {"ok": False, "error": "this answer is open on another connection: only the connection that "
                        "opened an answer may push, finish or fail it"}
            # the app that reconnects after a crash: its old answers failed with the connection that opened them
            return {"ok": False, "error": "unknown id on this connection: an answer belongs to the connection that "
                    "opened it, and fails when that connection closes (open a new one), or this is not an id "
                    f"open returned, or it ended long ago (the last {self.finished_kept} ended answers of a "
                    "connection are remembered)"}
        self._open[rid] = (conn, now)  # a sign of life, whatever the op (an empty push keeps an answer open)
        if op == "push":
            text = msg.get("text")
            if not isinstance(text, str):
                return {"ok": False, "error": "push needs a 'text' string"}
            if _invalid_unicode(text):
                return {"ok": False, "error": "text is not valid Unicode (a lone surrogate)"}
            need = req.growth(text)
            if need and self.store.live_bytes + need > self.store.max_bytes:
                self.on_push_refused("memory")
                return {"ok": False, "error": self._memory_full(need, "push", req)}
            try:
                self.on_tokens(req.push(text, now))
            except GenerationLimit as cut:
                self.on_tokens(cut.args[0])
                req.finish("length", now)
                self._done(req, conn, "finished")
                return {"ok": True, "tokens": len(req.transcript), "finished": "length", "cut": True}
            return {"ok": True, "tokens": len(req.transcript)}
        if op == "finish":
            reason = msg.get("reason", "stop")
            # printable too, a policy of ours: a reason is a word like "stop", and clients print it
            if not isinstance(reason, str) or not 0 < len(reason) <= MAX_REASON_CHARS or not reason.isprintable():
                return {"ok": False, "error": f"reason must be 1 to {MAX_REASON_CHARS} printable characters "
                        "(a finish reason such as \"stop\")"}
            req.finish(reason, now)
            self._done(req, conn, "finished")
            return {"ok": True, "tokens": len(req.transcript)}
        message = msg.get("message")
        if message is not None and not isinstance(message, str):  # str() of any JSON value became the error text
            return {"ok": False, "error": "message must be a string (or null for a default text)"}
        if not message:  # "" as null: clients got a bare "upstream error" for one, "application failed" for the other
            message = "application failed"
        message = message[:MAX_MESSAGE_CHARS]
        if _invalid_unicode(message):
            return {"ok": False, "error": "message is not valid Unicode (a lone surrogate)"}
        if not self.fail_log.hold(now):
            from tokenwire.transport.handshake_guard import REFUSALS_LOG_S  # (loaded: fail_log is one of its)

            log.warning("ingest: request %s failed by the application: %s; more such failures are counted "
                        "(tokenwire_ingest_answers_failed_total) and logged at most every %g s", rid.hex(),
                        printable(message), REFUSALS_LOG_S)
        req.fail(ErrorCode.UPSTREAM_ERROR, message, now)
        self._done(req, conn, "app_failed")
        return {"ok": True}

    def _memory_full(self, need: int, op: str, req: LiveRequest | None = None) -> str:
        """The refusal of an open or a push (``op``; ``req``: the pushed answer) that would take the answers being
        generated past ``limits.transcript_memory_mb``: finished answers are evicted to make room (oldest first),
        open ones cannot be, and one application connection held 750 MB of open answers against a 256 MiB bound
        (the bound then pushed finished answers out within seconds of their end). Refused, not waited on: the
        application is never blocked, it decides. A push's refusals are logged once per answer."""
        mib = 1 << 20
        live, bound = self.store.live_bytes / mib, self.store.max_bytes / mib
        if req is not None and req.request_id not in self._memory_refused:
            self._memory_refused.add(req.request_id)
            log.warning("ingest: a push to request %s refused: the answers being generated hold %.1f MiB, and "
                        "limits.transcript_memory_mb is %g MiB (later refusals for this answer are not logged)",
                        req.request_id.hex(), live, bound)
        then = ("nothing of it was added and the answer stays open: finish or fail it, or push again once other "
                "answers have ended") if req is not None else "open again once answers have ended"
        return (f"transcript memory full: the answers being generated hold {live:.1f} MiB of "
                f"limits.transcript_memory_mb = {bound:g} MiB, and this {op} needs {need} bytes more; {then}")

    def _done(self, req: LiveRequest, conn: IngestConnection, outcome: str, ended: str | None = None) -> None:
        # remembered by how it ended (``ended``, else its finish reason or "failed"), so that a later op on it says
        # it is finished (it said "unknown id"); the oldest go beyond finished_kept (MIN_FINISHED_KEPT while all
        # connections hold FINISHED_TOTAL), a long-lived app connection opens answers without end. Interned: the
        # same few reasons, each a string of its own per answer, cost more than the ids
        conn.open.pop(req.request_id, None)
        self._open.pop(req.request_id, None)
        self._memory_refused.discard(req.request_id)
        if req.request_id not in conn.finished:
            self._finished_total += 1
        conn.finished[req.request_id] = sys.intern(
            ended or (req.transcript.reason if req.error is None else "failed"))
        keep = self.finished_kept if self._finished_total <= FINISHED_TOTAL else MIN_FINISHED_KEPT
        while len(conn.finished) > keep:
            conn.finished.popitem(last=False)
            self._finished_total -= 1
        self.store.mark_finished(req)
        self.on_done(req, outcome)

    def disconnected(
        self, conn: IngestConnection, now: float, why: str = "the application disconnected before finishing",
        outcome: str = "app_gone",
    ) -> int:
        """Fail the answers ``conn`` still has open (``outcome``: app_gone, or drain when the daemon stops);
        how many."""
        failed = list(conn.open.values())
        for req in failed:
            req.fail(ErrorCode.UPSTREAM_ERROR, why, now)
            self._done(req, conn, outcome)
        # its ended ids leave the total with it (the connection is gone: no op will name them again)
        self._finished_total -= len(conn.finished)
        conn.finished.clear()
        stalls = self._stall_logs.pop(id(conn), None)
        if stalls is not None:  # the connection's story is over: its stalls held back are summed up now
            stalls.flush(now, final=True)
        return len(failed)

    def flush_logs(self, now: float, *, final: bool = False) -> None:
        """The summary lines of the failures held back (fail ops, connections gone with answers open, stalls),
        once their minute is over, or at once when ``final`` (the daemon is stopping)."""
        self.fail_log.flush(now, final=final)
        self.gone_log.flush(now, final=final)
        for stalls in self._stall_logs.values():
            stalls.flush(now, final=final)

    def _stall_log(self, conn: IngestConnection, rid: bytes) -> ReasonLog:
        """``conn``'s log of stalled answers (made at its first, ``rid``), its summary ending with the last reason
        held back."""
        found = self._stall_logs.get(id(conn))
        if found is None:
            from tokenwire.transport.handshake_guard import ReasonLog  # (loaded: a daemon's housekeeping calls)

            found = self._stall_logs[id(conn)] = ReasonLog(log, lambda n, secs: (
                f"ingest: {n} more answers failed in the last {secs:.0f} s on the application connection of request "
                f"{rid.hex()}"))
        return found

    def is_open(self, request_id: bytes) -> bool:
        return request_id in self._open

    def cancel(self, request_id: bytes, now: float, why: str, outcome: str = "cancelled") -> bool:
        """End an open answer nobody reads (``outcome``: cancelled, its last client cancelled it; orphaned, no
        client for ``limits.orphan_timeout_s``): finished as ``cancelled``, and the application's next op on it
        says why, so it can stop generating (every push had answered ok, to nobody). False: not open."""
        entry = self._open.get(request_id)
        if entry is None:
            return False
        conn = entry[0]
        req = conn.open[request_id]
        if outcome != "orphaned":
            # DEBUG: a line each was 645 of 687 in a probe's log; a chat answer its clients cancel writes none, and
            # tokenwire_ingest_answers_failed_total{reason="cancelled"} counts them
            log.debug("ingest: request %s cancelled: %s", request_id.hex(), why)
        elif self.orphan_log is None:
            log.info("ingest: request %s cancelled: %s", request_id.hex(), why)
        elif not self.orphan_log.hold(now):
            from tokenwire.transport.handshake_guard import REFUSALS_LOG_S  # (loaded: orphan_log is one of its)

            log.info("ingest: request %s cancelled: %s; more such cancellations are counted "
                     "(tokenwire_orphans_cancelled_total) and logged at most every %g s", request_id.hex(), why,
                     REFUSALS_LOG_S)
        req.finish("cancelled", now)
        self._done(req, conn, outcome, f"cancelled: {why}")
        return True

    def expire_stalled(self, now: float) -> int:
        """Fail, with UPSTREAM_TIMEOUT, the answers with no op on them for ``stall_timeout_s``; how many.

        While the daemon waits for the application to read a reply (``writing_since``) it reads none of that
        connection's ops, so its answers' clocks count from then, and the failure says the application did not
        read: it said "the application sent nothing" of one that pushed on and never read a reply."""
        from tokenwire.transport.handshake_guard import REFUSALS_LOG_S  # (loaded: fail_log is one of its)

        # the summaries of the fail ops, of the connections that ended with answers open, of the stalls held back
        self.flush_logs(now)
        timeout = self.stall_timeout_s
        stalled = [(rid, conn) for rid, (conn, last) in self._open.items()
                   if now - (last if conn.writing_since is None else max(last, conn.writing_since)) >= timeout]
        for rid, conn in stalled:
            req = conn.open[rid]
            if conn.writing_since is None:
                why = f"the application sent nothing for {timeout:g} s (ingest.stall_timeout_s)"
                ended = f"timed out: no op on it for {timeout:g} s, ingest.stall_timeout_s"
            else:
                why = (f"the application did not read its replies for {timeout:g} s (ingest.stall_timeout_s): the "
                       "daemon reads no more ops from it until it does")
                ended = f"timed out: the application did not read its replies for {timeout:g} s, ingest.stall_timeout_s"
            if not self._stall_log(conn, rid).note(now, why):
                log.warning("ingest: request %s failed: %s; more on this connection are counted "
                            "(tokenwire_ingest_answers_failed_total{reason=\"stalled\"}) and logged at most every "
                            "%g s", rid.hex(), why, REFUSALS_LOG_S)
            req.fail(ErrorCode.UPSTREAM_TIMEOUT, why, now)
            self._done(req, conn, "stalled", ended)
        return len(stalled)


TOO_LONG = b"<too long>"
"""What :func:`_read_line` returns for a line over ``MAX_LINE`` (it is consumed, the stream stays usable)."""


class LineTimeout(TimeoutError):
    """A line was begun and not completed within ``LINE_TIMEOUT_S``: its connection is closed."""


async def _read_line(reader: asyncio.StreamReader) -> bytes | None:
    """The next line, ``TOO_LONG`` for an over-long one (skipped up to its newline), None at end of input; a last
    line without its newline counts (``printf '...' | socat``: it was dropped, unanswered). ``LineTimeout`` when
    a line's first byte is not followed by its newline within ``LINE_TIMEOUT_S``.

    Skipping instead of closing keeps the connection, and with it the answers it owns, alive.
    """
    first = await reader.read(1)  # not bounded in time: the application may be idle between ops
    if not first:
        return None
    if first == b"\n":
        return first
    try:
        async with asyncio.timeout(LINE_TIMEOUT_S):
            return await _rest_of_line(reader, first)
    except TimeoutError:
        raise LineTimeout(f"a line not completed within {LINE_TIMEOUT_S:g} s") from None


async def _rest_of_line(reader: asyncio.StreamReader, first: bytes) -> bytes | None:
    """:func:`_read_line` after its ``first`` byte. The reader's limit (MAX_LINE) bounds what follows ``first``,
    so a line of MAX_LINE + 1 bytes got through: the length is checked here, for a limit of MAX_LINE exactly."""
    try:
        line = first + await reader.readuntil(b"\n")
        return line if len(line) <= MAX_LINE + 1 else TOO_LONG  # (+ 1: its newline)
    except asyncio.IncompleteReadError as exc:  # end of input: the last line, unless it is only blanks
        line = first + exc.partial
        if len(line) > MAX_LINE:
            return TOO_LONG
        return line if line.strip() else None
    except asyncio.LimitOverrunError as exc:
        overrun = exc
    while True:  # drop what is buffered (up to the newline if it has arrived), then look again
        try:
            await reader.readexactly(overrun.consumed)
            await reader.readuntil(b"\n")
            return TOO_LONG
        except asyncio.IncompleteReadError:  # an over-long last line: answered as any other
            return TOO_LONG
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


def check_paths(cfg: IngestConfig) -> tuple[list[str], list[str]]:
    """What the daemon's start would make of ``ingest.socket`` (``config check``: it said ok for a socket the
    daemon refused) and ``ingest.socket_group``: (its error lines, warnings), :func:`unix_sockets.socket_checks`."""
    return unix_sockets.socket_checks(cfg.socket, cfg.socket_group, "ingest.socket")


async def serve_ingest(
    path: Path, api: IngestAPI, *, clients: set[asyncio.Task[None]] | None = None, group: str | None = None,
    start_serving: bool = True,
) -> asyncio.Server:
    """Listen on the Unix socket ``path`` (mode 0660, given to ``group``, ``ingest.socket_group``, when set; a
    stale socket file is replaced). ``clients``: where each connection's task is kept while it runs, for
    :func:`close_clients`. ``start_serving=False``: bound, nothing accepted until ``server.start_serving()``
    (the daemon's start gate, :func:`unix_sockets.serve`)."""

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = IngestConnection()
        why, outcome = "the application disconnected before finishing", "app_gone"
        task = asyncio.current_task()
        if clients is not None and task is not None:
            clients.add(task)
        try:
            while True:
                line = await _read_line(reader)
                if line is None:
                    break
                error: str | None
                if line is TOO_LONG:
                    msg, error = None, f"line longer than {MAX_LINE} bytes (skipped)"
                else:
                    msg, error = _decoded(line)
                reply = {"ok": False, "error": error} if error else _handled(api, msg, conn)
                writer.write(json.dumps(reply).encode() + b"\n")
                conn.writing_since = time.monotonic()  # (seen by the stall timer only while drain() waits)
                try:
                    await writer.drain()
                finally:
                    conn.writing_since = None
        except LineTimeout as exc:  # (before OSError: a TimeoutError is one)
            why = f"the application left {exc}: the daemon closed its connection"
            with contextlib.suppress(Exception):
                writer.write(json.dumps({"ok": False, "error": f"{exc}: the connection is closed"}).encode() + b"\n")
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # the daemon is stopping. Returned, not re-raised: Python 3.11's stream server calls
            # task.exception() on the finished task, which raises for a cancelled one, and asyncio logged that
            # as an ERROR with a traceback on every normal shutdown with an app connected
            why, outcome = "the daemon stopped before the application finished", "drain"
        finally:
            ids = [rid.hex() for rid in conn.open]  # for the log line: the app_failed and stalled lines name theirs
            failed = api.disconnected(conn, time.monotonic(), why, outcome)
            if outcome == "drain":
                # a last line, the reply to the app's next (or unanswered) op: its connection was cut with none,
                # and pushes just before had had plain ok replies
                note = f": {failed} open answer{'s' if failed > 1 else ''} failed" if failed else ""
                with contextlib.suppress(Exception):
                    writer.write(json.dumps({"ok": False, "error": f"daemon shutting down{note}"}).encode() + b"\n")
            if failed and (outcome == "drain" or not api.gone_log.hold(time.monotonic())):
                shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
                log.warning("ingest: %s failed: %s (%s)%s", f"{failed} open answers" if failed > 1 else
                            "1 open answer", why, shown, "" if outcome == "drain" else
                            "; more such connections are counted and summed up at most every minute")
            writer.close()  # (what was written still goes out first)
            if clients is not None and task is not None:
                clients.discard(task)

    return await unix_sockets.serve(path, client, limit=MAX_LINE, group=group, setting="ingest.socket_group",
                                    start_serving=start_serving)


async def close_clients(clients: set[asyncio.Task[None]], timeout: float = 1.0) -> None:
    """End every application connection in ``clients`` (the daemon is stopping): each fails the answers it has
    open and tells the application so in a last line, then closes."""
    tasks = list(clients)
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)
