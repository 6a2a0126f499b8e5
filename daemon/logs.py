"""Logging for the service: human-readable text or one JSON object per line (for journald/log shippers).

When stderr is the journal (systemd's ``JOURNAL_STREAM``), each line starts with the sd-daemon priority prefix
``<N>`` (sd-daemon(3)) and text lines leave out the timestamp, which the journal records itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
from typing import Any, TextIO

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def shown_url(url: str) -> str:
    """A URL for messages and the log, its userinfo (``user:password@``, Redis's ``:secret@``) masked: all of the
    authority up to its *last* '@', where urllib (and redis-py, aiohttp with it) ends the userinfo, the authority
    ending at the first '/', '?' or '#' after ``//``. Masked up to the first '@', a password with an '@' in it
    (``redis://:x@Secret@host``, which redis-py reads as ``x@Secret``) was logged from that '@' on.

    An '@' after the authority is most likely a password's own: one with an unencoded '/', '?' or '#' ends the
    authority early (``redis://:s3cr@t/x@host/0``, ``redis://:pa?ss@host``), and its rest was logged. Then all up
    to the URL's last '@' is masked (``config check`` refuses such a ``kv.redis_url``; a path with an '@' of its own
    shows less of its URL: safe, and rare). Not when the authority has an '@' of its own and ended at a '/', and
    only a query or fragment holds one (``https://u:p@host/v1?mail=a@b``): its userinfo was found, the rest is not
    a password's. A URL with no authority (``unix:///run/redis@main/redis.sock``) has no password to hide."""
    head, sep, rest = url.partition("//")
    if not sep:
        return url
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    authority, after = rest[:end], rest[end:]
    path = after[:min((i for i in map(after.find, "?#") if i >= 0), default=len(after))]
    if authority and "@" in after and ("@" not in authority or not after.startswith("/") or "@" in path):
        return f"{head}//***@{rest.rpartition('@')[2]}"
    if "@" not in authority:
        return url
    return f"{head}//***@{authority.rpartition('@')[2]}{after}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value if isinstance(value, str | int | float | bool | None) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


# aioquic's per-connection warnings (a failed handshake, "Packet contains no CRYPTO frame" from a client that gave up)
# pass once per kind, then are counted: one line at most this often says how many more came
QUIC_WARNINGS_LOG_S = 60.0
_QUIC_PREFIX = re.compile(r"^\[[0-9a-f]*\] ")  # aioquic's connection-ID prefix ("[5d0f4e950500c347] ")
_QUIC_KINDS_MAX = 64  # distinct messages tracked; past it, the rest share one count


class QuicWarningLimiter(logging.Filter):
    """Rate-limits aioquic's (logger ``quic``) records: the first of each message (its connection ID stripped)
    passes, the rest are counted, and the next one after QUIC_WARNINGS_LOG_S passes with how many were held back.
    A burst of refused handshakes logged a line per connection (101 in one probe run); the README says such refusals
    are counted, not logged one by one. Nothing is hidden for good: a kind's count comes with its next line, or
    else :meth:`flush` writes it once QUIC_WARNINGS_LOG_S has passed (a timer on the running event loop)."""

    def __init__(self, interval: float = QUIC_WARNINGS_LOG_S, clock: Any = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self.clock = clock
        self._kinds: dict[str, tuple[float, int]] = {}  # message -> (when its last line passed, held back since)
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flush_loop: asyncio.AbstractEventLoop | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "quic" and not record.name.startswith("quic."):
            return True
        kind = _QUIC_PREFIX.sub("", record.getMessage())
        if kind not in self._kinds and len(self._kinds) >= _QUIC_KINDS_MAX:
            kind = "(other aioquic warnings)"
        now = self.clock()
        passed, held = self._kinds.get(kind, (None, 0))
        if passed is not None and now - passed < self.interval:
            self._kinds[kind] = (passed, held + 1)
            self._flush_later(passed + self.interval - now)
            return False
        if held and passed is not None:
            since = now - passed
            record.msg = f"{record.getMessage()} ({held} more like it in the last {since:.0f} s, not logged one by one)"
            record.args = None
        self._kinds[kind] = (now, 0)
        return True

    def flush(self, logger: logging.Logger | None = None) -> None:
        """One line per kind whose held-back count is QUIC_WARNINGS_LOG_S old (no new record came to carry it)."""
        now = self.clock()
        for kind, (passed, held) in list(self._kinds.items()):
            if now - passed < self.interval:
                continue
            if held:
                (logger or logging.getLogger("tokenwire.daemon")).warning(
                    "aioquic: %d more like %r in the last %.0f s, not logged one by one", held, kind, now - passed)
            self._kinds.pop(kind, None)  # (the next one passes, as a first)
        waiting = [passed + self.interval - now for passed, held in self._kinds.values() if held]
        if waiting:
            self._flush_later(min(waiting))

    def _flush_later(self, delay: float) -> None:
        """Have :meth:`flush` run in ``delay`` seconds on the running loop (none running: the next line carries the
        count)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._flush_timer is not None and self._flush_loop is loop:
            return  # (one pending; a timer of a loop since gone, as in tests, is replaced)
        self._flush_loop = loop
        self._flush_timer = loop.call_later(max(0.0, delay), self._flush_due)

    def _flush_due(self) -> None:
        self._flush_timer = None
        self.flush()


quic_warnings = QuicWarningLimiter()  # the daemon's, on its log handler


def journal_priority(levelno: int) -> int:
    """The syslog priority of a record's level for the journal: critical 2, error 3, warning 4, info 6, debug 7
    (a level between two takes the lower one's: Python has no notice, 5)."""
    for floor, priority in ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6)):
        if levelno >= floor:
            return priority
    return 7


def stream_is_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is connected to the journal: systemd sets ``JOURNAL_STREAM`` to the ``<dev>:<ino>`` of
    the stream it connects stdout/stderr to (systemd.exec(5)). A process whose stderr was redirected elsewhere
    (a shell, a child under ``2> file``) still inherits the variable, so the descriptor's own identity decides."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # unset or malformed; no descriptor (a test's capture)
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class JournalFormatter(logging.Formatter):
    """Another formatter's lines, each prefixed with its record's priority ``<N>`` for the journal (sd-daemon(3)).

    Without it journald stored every line at priority 6 (info): ``journalctl -p warning`` showed nothing, errors
    included. journald reads the prefix per line, and a line without one is info, so every line of a multi-line
    record (a traceback) carries it too: the traceback stays with its error under ``-p err`` (journalctl shows the
    lines without the prefix, as before).
    """

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{journal_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


# The daemon's own loggers follow [logging] level; every other library's (numba, torch, onnxruntime, aiohttp,
# asyncio, aioquic's "quic", ...) logs from WARNING up whatever that level, unless the operator names it here
# (comma- or space-separated logger names, e.g. in a drop-in: Environment=TOKENWIRE_LOG_LIBRARIES=numba): with
# level = "debug" and [kv], numba's compiler alone wrote ~16,000 lines in 4 s at a first start, past journald's
# default rate limit (10,000 in 30 s), which then dropped the daemon's own lines.
OWN_LOGGERS = ("tokenwire",)
LIBRARY_LOGGERS_ENV = "TOKENWIRE_LOG_LIBRARIES"
LIBRARY_FLOOR = logging.WARNING
# libraries whose records cost their time even when the handler drops them (numba builds a bytecode dump per
# record): held at the floor by their logger's level too, not by the handler alone
_HELD_BY_LEVEL = ("quic", "numba")


def _within(name: str, roots: tuple[str, ...]) -> bool:
    """Whether logger ``name`` is one of ``roots`` or below one of them (``numba.core.ssa`` is below ``numba``)."""
    return any(name == root or name.startswith(root + ".") for root in roots)


def named_libraries() -> tuple[str, ...]:
    """The logger names :data:`LIBRARY_LOGGERS_ENV` asks to follow [logging] level, as the daemon's own do."""
    return tuple(n for n in re.split(r"[\s,]+", os.environ.get(LIBRARY_LOGGERS_ENV, "")) if n)


class LibraryFilter(logging.Filter):
    """On the daemon's handler: passes a record of the daemon's own loggers (:data:`OWN_LOGGERS`) or of one the
    operator named (:func:`named_libraries`) at any level the loggers let through, anyone else's from
    :attr:`floor` up (WARNING, or the configured level when that is higher). A handler filter covers every
    library, those that give their loggers a level of their own included; :func:`set_log_level` sets it."""

    def __init__(self) -> None:
        super().__init__()
        self.floor = LIBRARY_FLOOR
        self.named: tuple[str, ...] = ()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.floor or _within(record.name, OWN_LOGGERS + self.named)


library_records = LibraryFilter()  # the daemon's, on its log handler


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Log to ``stream`` (stderr) in ``fmt`` (text or json) from ``level`` on; journald priorities when it is the
    journal (:func:`stream_is_journal`)."""
    out = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(out)
    handler.addFilter(library_records)
    handler.addFilter(quic_warnings)
    journal = stream_is_journal(out)
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter()
    elif journal:  # the journal stamps each line itself
        formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(JournalFormatter(formatter) if journal else formatter)
    logging.getLogger().handlers[:] = [handler]
    set_log_level(level)


_levelled: set[str] = set()  # loggers set_log_level gave a level of their own (reset at the next call)


def set_log_level(level: str) -> None:
    """The root logger's level, and the rule for other libraries' records (:class:`LibraryFilter`): from WARNING
    up unless named in :data:`LIBRARY_LOGGERS_ENV` (the process's environment: a changed drop-in needs a
    restart). aioquic's (``quic``: its INFO lines are per packet) and numba's loggers are held there by their
    level too; a named logger below one of them (``numba.core.ssa``) gets the configured level itself, or its
    parent's would still hold it."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    named = named_libraries()
    library_records.named = named
    library_records.floor = max(LIBRARY_FLOOR, root.level)
    for name in _levelled:
        logging.getLogger(name).setLevel(logging.NOTSET)
    _levelled.clear()
    for name in _HELD_BY_LEVEL:
        if not _within(name, named):
            logging.getLogger(name).setLevel(library_records.floor)
            _levelled.add(name)
    for name in named:
        if _within(name, tuple(n for n in _levelled if n != name)):
            logging.getLogger(name).setLevel(root.level)
            _levelled.add(name)
