"""Answers the daemon is producing or has produced, shared by every connection that streams them.

A request's answer outlives the connection that asked for it: when a client's connection dies, the
upstream keeps generating into the transcript, and the client reconnects with the request id and the index
it holds to receive the rest (resumption). Finished answers are kept for ``retain_s`` seconds, within a
memory bound, oldest evicted first (those still streaming to a client last); answers still being generated
are never evicted. The bytes of those are kept as a running total (:attr:`TranscriptStore.live_bytes`), so that
an ingest push is checked against the bound without summing every answer (:meth:`LiveRequest.growth`), and
refused past it.

Sans-I/O: no event loop here. Listeners are plain callbacks the service registers; ``now`` is explicit.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from tokenwire.transport.frames import REQUEST_ID_BYTES
from tokenwire.transport.transcript import Transcript, split_piece

# What an answer costs beyond its tokens' bytes, measured (Python 3.11, x86-64) by creating, filling and finishing
# answers in a TranscriptStore (tests/test_ingest_fixes5.py repeats it): per token 74 B under tracemalloc and
# 94 B of RSS (bytes object, two list slots, generation-time float, allocator slack); per answer, however short,
# 690 B under tracemalloc and 960 B of RSS (LiveRequest, Transcript, its lists, dicts, the store's entries, and
# the SHA-256 state that OpenSSL allocates outside tracemalloc's view). The bound is on the process's memory: the
# RSS figures. 72 and 256 counted a third of it: 100,000 empty answers grew the daemon by 68 MB while
# tokenwire_transcript_bytes said 23.8 MiB.
TOKEN_OVERHEAD_BYTES = 96
REQUEST_OVERHEAD_BYTES = 960


def _text_bytes(text: str | None) -> int:
    # surrogatepass: JSON can carry a lone surrogate ("\ud83d"), which plain UTF-8 refuses to encode
    return len(text.encode("utf-8", "surrogatepass")) if text else 0


def request_bytes(model: str | None, principal: str | None) -> int:
    """The :attr:`LiveRequest.memory_bytes` of an answer with no token yet: what an ingest open is checked for."""
    return _text_bytes(model) + _text_bytes(principal) + REQUEST_OVERHEAD_BYTES


class GenerationLimit(Exception):
    """Raised by :meth:`LiveRequest.push` when text did not fit the answer's token limit (``args[0]``: the
    tokens of it that were added)."""


@dataclass
class LiveRequest:
    request_id: bytes
    principal: str | None
    max_tokens: int
    created: float
    transcript: Transcript = field(default_factory=Transcript)
    finished_at: float | None = None
    error: tuple[int, str] | None = None
    listeners: dict[Hashable, Callable[[], None]] = field(default_factory=dict)
    model: str | None = None
    evicted: bool = False  # dropped past the memory bound while clients streamed it: they are told, and let go
    # model and principal count in memory_bytes too (unbounded ingest names once grew the daemon by a GB outside
    # that bound); they never change, so their size is taken once, not at every housekeeping pass
    _name_bytes: int = field(init=False, repr=False, default=0)
    # told the bytes each push adds while the request is one of its store's live answers (None: it is not), so the
    # store keeps their total without summing every answer at each ingest push (O(answers) a token)
    _grew: Callable[[int], None] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        self._name_bytes = _text_bytes(self.model) + _text_bytes(self.principal)

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    @property
    def memory_bytes(self) -> int:
        tr = self.transcript
        return tr.total_bytes + TOKEN_OVERHEAD_BYTES * len(tr) + self._name_bytes + REQUEST_OVERHEAD_BYTES

    def growth(self, piece: str | bytes) -> int:
        """The bytes of :attr:`memory_bytes` that pushing ``piece`` would add (what fits under ``max_tokens``):
        an ingest push is checked against the store's bound with it before anything is added."""
        if self.done or not piece:
            return 0
        data = piece.encode("utf-8") if isinstance(piece, str) else piece
        toks = split_piece(data)[: max(0, self.max_tokens - len(self.transcript))]
        return sum(map(len, toks)) + TOKEN_OVERHEAD_BYTES * len(toks)

    def _notify(self) -> None:
        for callback in list(self.listeners.values()):
            callback()

    def push(self, piece: str | bytes, now: float) -> int:
        """Append generated text; returns the tokens added. Raises GenerationLimit when some of it did not fit
        (the answer is cut at ``max_tokens``). An answer that ends exactly at the limit is not cut: it keeps
        its own finish reason (it used to be reported "length", and the ingest app's own finish refused)."""
        if self.done or not piece:
            return 0
        data = piece.encode("utf-8") if isinstance(piece, str) else piece
        before = self.transcript.total_bytes
        added = self.transcript.extend(data, now, max_total=self.max_tokens)  # 256-byte tokens, cut at the limit
        if added:
            if self._grew is not None:
                self._grew(self.transcript.total_bytes - before + TOKEN_OVERHEAD_BYTES * added)
            self._notify()
        if added < len(split_piece(data)):
            raise GenerationLimit(added)
        return added

    def finish(self, reason: str, now: float) -> None:
        if self.done:
            return
        self.transcript.finish(reason)
        self.finished_at = now
        self._notify()

    def fail(self, code: int, message: str, now: float) -> None:
        """The upstream failed: every listener (and every later resume) gets this typed error."""
        if self.done:
            return
        self.error = (code, message)
        self.finished_at = now
        self._notify()


# A finished answer still streaming to a client is evicted past the memory bound only this long after it finished:
# an honest slow reader (8-9 s for 3,000 tokens at 0.4 Mbit/s) gets its answer whole, a client that never ends its
# request (it pinned 4.9 MB against a 1 MiB bound) lets go of it then
STREAMING_GRACE_S = 30.0


class TranscriptStore:
    """Live and finished answers by request id, with a memory bound and a retention time."""

    def __init__(self, *, max_bytes: int, retain_s: float) -> None:
        self.max_bytes = max_bytes
        self.retain_s = retain_s
        self._live: dict[bytes, LiveRequest] = {}
        self._finished: OrderedDict[bytes, LiveRequest] = OrderedDict()  # in finishing order
        self.expired = 0  # finished answers dropped after retain_s
        self.evicted = 0  # dropped early, over max_bytes (streaming ones end their requests with LIMIT_EXCEEDED)
        self._live_bytes = 0  # memory_bytes of the answers in _live, kept as they grow (LiveRequest._grew)

    def create(self, principal: str | None, max_tokens: int, now: float, model: str | None = None) -> LiveRequest:
        rid = os.urandom(REQUEST_ID_BYTES)
        req = LiveRequest(rid, principal, max_tokens, now, model=model)
        self._live[rid] = req
        self._live_bytes += req.memory_bytes
        req._grew = self._live_grew
        return req

    def _live_grew(self, added: int) -> None:
        self._live_bytes += added

    def get(self, request_id: bytes) -> LiveRequest | None:
        return self._live.get(request_id) or self._finished.get(request_id)

    def mark_finished(self, req: LiveRequest) -> None:
        """Move a finished (or failed) answer to the retention queue."""
        if self._live.pop(req.request_id, None) is not None:
            self._left_live(req)
            self._finished[req.request_id] = req

    def discard(self, req: LiveRequest) -> None:
        if self._live.pop(req.request_id, None) is not None:
            self._left_live(req)
        self._finished.pop(req.request_id, None)

    def _left_live(self, req: LiveRequest) -> None:
        req._grew = None
        self._live_bytes -= req.memory_bytes

    @property
    def live_bytes(self) -> int:
        """Bytes held by the answers still being generated (open ingest answers and the upstreams' alike), at
        O(1): :meth:`evict` cannot free them, so an ingest push is refused when they would pass ``max_bytes``."""
        return self._live_bytes

    @property
    def memory_bytes(self) -> int:
        return sum(r.memory_bytes for r in self._live.values()) + sum(r.memory_bytes for r in self._finished.values())

    @property
    def live_count(self) -> int:
        return len(self._live)

    @property
    def finished_count(self) -> int:
        return len(self._finished)

    def evict(self, now: float) -> int:
        """Drop expired finished answers, then the oldest ones while over the memory bound: first those no client
        streams, then those still streaming, finished STREAMING_GRACE_S ago or more, whose listeners hear of it
        (``evicted``) and end their requests.
        Skipping the latter let a client that read every token and never ended its requests (or read nothing,
        and pinged) keep 4.9 to 48.8 MB of finished answers against a 1 MiB bound."""
        expired = 0
        for rid, req in list(self._finished.items()):
            if req.finished_at is not None and now - req.finished_at >= self.retain_s and not req.listeners:
                del self._finished[rid]
                expired += 1
        self.expired += expired
        dropped = 0
        total = self.memory_bytes
        for streaming in (False, True):
            for rid, req in list(self._finished.items()):
                if total <= self.max_bytes:
                    break
                if bool(req.listeners) != streaming:
                    continue
                if streaming and (req.finished_at is None or now - req.finished_at < STREAMING_GRACE_S):
                    continue
                del self._finished[rid]
                total -= req.memory_bytes
                dropped += 1
                if streaming:
                    req.evicted = True
                    req._notify()
        self.evicted += dropped
        return expired + dropped
