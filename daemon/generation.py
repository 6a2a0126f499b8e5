"""An answer's generation task: an upstream's ``generate()`` fed into the answer's
:class:`~tokenwire.daemon.transcripts.LiveRequest`, and each way it can end turned into the answer's end (its
finish reason, ``length`` at the transcript's bound, ``cancelled``, the client's typed error, or UPSTREAM_ERROR
for an upstream's bug).

Split out of ``service.py``: the task's body needs nothing of the daemon's but a token counter, so it is a plain
coroutine with explicit arguments; :class:`~tokenwire.daemon.service.Daemon` starts it, holds the task
(``limits.max_live_answers``, the orphan timeout) and does its bookkeeping when it is done (``Daemon._fed``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from tokenwire.transport.errors import ErrorCode, RequestError
from tokenwire.transport.server import ChatRequest

from .cli import printable
from .transcripts import GenerationLimit, LiveRequest
from .upstreams import Upstream

# the daemon's logger (not this module's name): operators and tests filter the daemon's lines by it
log = logging.getLogger("tokenwire.daemon")


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
        cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""  # the detail stays in the log
        # the upstream's words: raw, a line break forged a log line and escapes reached the operator's terminal
        log.warning("request %s failed: %s", live.request_id.hex(), printable(f"{exc}{cause}"))
        live.fail(exc.code, str(exc), time.monotonic())
    except Exception:
        log.exception("upstream %s failed", upstream.name)
        live.fail(ErrorCode.UPSTREAM_ERROR, f"upstream {upstream.name!r} failed", time.monotonic())
