"""An upstream as the daemon calls it (:class:`SendableUpstream`): what it says reaches clients in a sendable form.

Split out of ``service.py``: the text an upstream hands over (a refusal, a typed failure's message, a finish
reason) is made sendable in one place, whatever upstream it is, and nothing here knows of connections or answers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tokenwire.transport.errors import RequestError
from tokenwire.transport.server import ChatRequest

from .cli import printable, well_formed
from .upstreams import Upstream

MAX_FINISH_REASON_CHARS = 32  # FINISHED's "fr" (docs/protocol.md): a longer one failed the client's decoder


def sendable_reason(reason: object) -> str:
    """An upstream's finish reason as FINISHED can carry it: sendable, printable (clients print it) and cut to
    MAX_FINISH_REASON_CHARS; ``TypeError`` (an upstream's bug: UPSTREAM_ERROR) for one that is not a str."""
    if not isinstance(reason, str):
        raise TypeError(f"the upstream returned a finish reason of type {type(reason).__name__}, expected a str")
    return printable(well_formed(reason))[:MAX_FINISH_REASON_CHARS]


class SendableUpstream:
    """An upstream as the service calls it: the text it hands over that reaches clients (a refusal, a typed
    failure's message, a finish reason) made sendable here, once, whatever upstream it is (a custom one too): the
    ERROR or FINISHED then goes out as the upstream meant it, to every listener and every resume alike."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.name = well_formed(str(upstream.name))

    def refusal(self, model: str | None, params: dict[str, Any]) -> str | None:
        problem = self.upstream.refusal(model, params)
        return None if problem is None else well_formed(str(problem))

    async def generate(self, request: ChatRequest, emit: Callable[[str], None]) -> str:
        try:
            reason = await self.upstream.generate(request, emit)
        except RequestError as exc:
            message = well_formed(str(exc))
            if message == str(exc):
                raise
            raise RequestError(message, code=exc.code) from exc.__cause__  # (the cause: the log's detail)
        return sendable_reason(reason)

    async def close(self) -> None:
        await self.upstream.close()
