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
    """A URL for messages and the log, its userinfo (``user:password@``, Redis's ``:secret@``) masked."""
    return re.sub(r"//[^@/]*@", "//***@", url)


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


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Log to ``stream`` (stderr) in ``fmt`` (text or json) from ``level`` on; journald priorities when it is the
    journal (:func:`stream_is_journal`)."""
    out = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(out)
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


def set_log_level(level: str) -> None:
    """The root logger's level, and aioquic's (``quic``) never below WARNING: its INFO lines are per packet."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    logging.getLogger("quic").setLevel(max(logging.WARNING, root.level))
