"""The server's record of one answer: every token, when it was generated, and its digest.

The transcript is what makes "nothing is lost" true: datagrams may die, but any range can be sent again
from here (repair requests, resumption after a reconnect), and the digest lets the client prove it
rendered exactly this text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from .frames import MAX_TOKEN_BYTES


def split_piece(piece: bytes, limit: int = MAX_TOKEN_BYTES) -> list[bytes]:
    """Split an upstream text piece into tokens of at most ``limit`` bytes (frames cap token size), each cut
    before a UTF-8 character rather than inside one: an answer cut at its token limit after a token that
    ended mid-character ended in invalid UTF-8 (a replacement character in every client)."""
    if len(piece) <= limit:
        return [piece]
    out: list[bytes] = []
    i, n = 0, len(piece)
    while i < n:
        j = min(i + limit, n)
        k = j
        while i < k < n and piece[k] & 0xC0 == 0x80:  # a continuation byte: move the cut to its lead byte
            k -= 1
        j = k if k > i else j  # no lead byte within the limit (not UTF-8): cut at the limit
        out.append(piece[i:j])
        i = j
    return out


@dataclass
class Transcript:
    """Append-only token list with generation times and a running SHA-256."""

    tokens: list[bytes] = field(default_factory=list)
    gen_times: list[float] = field(default_factory=list)
    finished: bool = False
    reason: str = "stop"
    total_bytes: int = 0
    _hash: hashlib._Hash = field(default_factory=hashlib.sha256, repr=False)

    def append(self, token: bytes, now: float) -> int:
        """Add one token (already size-limited) generated at ``now``; returns its index."""
        if self.finished:
            raise RuntimeError("transcript is finished")
        self.tokens.append(token)
        self.gen_times.append(now)
        self.total_bytes += len(token)
        self._hash.update(token)
        return len(self.tokens) - 1

    def extend(self, piece: bytes | str, now: float, *, max_total: int | None = None) -> int:
        """Add an upstream text piece as tokens of at most 256 bytes (a long piece becomes several), none
        beyond ``max_total`` in all; returns how many were added."""
        data = piece.encode("utf-8") if isinstance(piece, str) else piece
        toks = split_piece(data) if data else []
        if max_total is not None:
            toks = toks[: max(0, max_total - len(self.tokens))]
        for tok in toks:
            self.append(tok, now)
        return len(toks)

    def finish(self, reason: str = "stop") -> None:
        self.finished = True
        self.reason = reason

    def __len__(self) -> int:
        return len(self.tokens)

    def digest(self) -> bytes:
        return self._hash.copy().digest()

    def text(self) -> str:
        return b"".join(self.tokens).decode("utf-8", errors="replace")

    def gen_deltas_us(self) -> list[int]:
        """Generation times as microsecond deltas (first element: 0), the FINISHED frame's encoding.

        Deltas of rounded absolute offsets, so rounding never accumulates over a long answer.
        """
        out: list[int] = []
        if not self.gen_times:
            return out
        t0 = self.gen_times[0]
        prev = 0
        for t in self.gen_times:
            cur = max(prev, round((t - t0) * 1e6))
            out.append(cur - prev)
            prev = cur
        return out


def gen_times_from_deltas(deltas_us: list[int]) -> list[float]:
    """Inverse of :meth:`Transcript.gen_deltas_us`, relative to the first token (seconds)."""
    out: list[float] = []
    acc = 0
    for d in deltas_us:
        acc += d
        out.append(acc / 1e6)
    return out


def text_digest(tokens: list[bytes]) -> bytes:
    h = hashlib.sha256()
    for t in tokens:
        h.update(t)
    return h.digest()
