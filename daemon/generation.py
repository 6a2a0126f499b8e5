"""An answer's generation task: an upstream's ``generate()`` fed into the answer's
:class:`~tokenwire.daemon.transcripts.LiveRequest`, and each way it can end turned into the answer's end (its
finish reason, ``length`` at the transcript's bound, ``cancelled``, the client's typed error, or UPSTREAM_ERROR
for an upstream's bug).

Split out of ``service.py``: the task's body needs nothing of the daemon's but a token counter, so it is a plain
coroutine with explicit arguments; :class:`~tokenwire.daemon.answers.LiveAnswers` starts it, holds the task
(``limits.max_live_answers``, the orphan timeout) and does its bookkeeping when it is done (``LiveAnswers._fed``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable, Iterable

from tokenwire.transport.errors import ErrorCode, RequestError
from tokenwire.transport.handshake_guard import REFUSALS_LOG_S, ReasonLog
from tokenwire.transport.server import ChatRequest

from .cli import printable
from .transcripts import GenerationLimit, LiveRequest
from .upstreams import Upstream

# the daemon's logger (not this module's name): operators and tests filter the daemon's lines by it
log = logging.getLogger("tokenwire.daemon")


# by upstream object, gone with it (a reload's replaced upstreams, a stopped test daemon's)
_FAILURE_LOGS: weakref.WeakKeyDictionary[Upstream, ReasonLog] = weakref.WeakKeyDictionary()


def _failure_log(upstream: Upstream) -> ReasonLog:
    """``upstream``'s log of failed answers (the first a warning, the rest counted and summed up with the last
    one's reason), made at its first failure. Kept by the upstream object, not its name: each daemon (tests run
    several in one process) and each reload's new upstreams start their own."""
    found = _FAILURE_LOGS.get(upstream)
    if found is None:
        name = upstream.name
        found = _FAILURE_LOGS[upstream] = ReasonLog(log, lambda n, secs: (
            f"{n} more failures of upstream {name!r} in the last {secs:.0f} s"))
    return found


def flush_failure_logs(upstreams: Iterable[Upstream], now: float, *, final: bool = False) -> None:
    """The summary lines of the failures held back for ``upstreams`` (``now``: ``time.monotonic()``), once their
    minute is over, or at once when ``final`` (the daemon is stopping). For the daemon's housekeeping and stop."""
    for upstream in upstreams:
        found = _FAILURE_LOGS.get(upstream)
        if found is not None:
            found.flush(now, final=final)


def _connect_detail(text: str) -> str:
    """aiohttp's "Cannot connect to host H:P ssl:default [...]" for a plain-HTTP URL: the "ssl:default" made
    operators look for a TLS problem on a server spoken to without TLS (host, port and the errno reason stay)."""
    return text.replace(" ssl:default", "", 1) if text.startswith("http://") else text


async def generate_answer(live: LiveRequest, upstream: Upstream, chat: ChatRequest,
                          on_tokens: Callable[[int], object]) -> None:
    """Generate ``chat`` with ``upstream`` into ``live`` until it ends, however it ends (a cancel included: the
    answer ends as cancelled). ``on_tokens``: called with the number of tokens each push added (the metrics)."""
    def emit(text: str) -> None:
        before = len(live.transcript)
        try:
            live.push(text, time.monotonic())
        finally:
            on_tokens(len(live.transcript) - before)

    try:
        reason = await upstream.generate(chat, emit)
        live.finish(reason, time.monotonic())
    except GenerationLimit:
        live.finish("length", time.monotonic())
    except asyncio.CancelledError:
        live.finish("cancelled", time.monotonic())
    except RequestError as exc:  # a typed failure (unreachable, timeout, HTTP error): the client gets it
        # the detail stays in the log
        cause = f" ({_connect_detail(str(exc.__cause__))})" if exc.__cause__ is not None else ""
        # the upstream's words: raw, a line break forged a log line and escapes reached the operator's terminal
        text = printable(f"{exc}{cause}")
        now = time.monotonic()
        # one line per upstream, then a summary: a dead upstream wrote a warning per request (100 in a second)
        if not _failure_log(upstream).note(now, text):
            log.warning("request %s failed: %s; more failures of upstream %r are counted "
                        "(tokenwire_upstream_failures_total) and logged at most every %g s", live.request_id.hex(),
                        text, upstream.name, REFUSALS_LOG_S)
        live.fail(exc.code, str(exc), now)
    except Exception:
        log.exception("upstream %s failed", upstream.name)
        live.fail(ErrorCode.UPSTREAM_ERROR, f"upstream {upstream.name!r} failed", time.monotonic())

