"""Typed errors of the tokenwire protocol and their QUIC application error codes.

Every decoder raises one of these (never a bare ``ValueError`` or a msgpack exception), so a shell can map
any failure to a precise close code and keep serving everyone else.
"""

from __future__ import annotations

import re
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (for the annotation only: the SDK imports this module)
    from .kv_client import KVFetchResult


class ErrorCode(IntEnum):
    """Application error codes, used in ERROR frames and as QUIC CONNECTION_CLOSE codes."""

    NO_ERROR = 0x0
    INTERNAL = 0x100
    MALFORMED_FRAME = 0x101
    FRAME_TOO_LARGE = 0x102
    UNSUPPORTED_VERSION = 0x103
    BAD_REQUEST = 0x104
    UNAUTHORIZED = 0x105
    LIMIT_EXCEEDED = 0x106
    UNKNOWN_REQUEST = 0x107
    UPSTREAM_ERROR = 0x108
    UPSTREAM_TIMEOUT = 0x109
    NO_DATAGRAMS = 0x10A
    SHUTTING_DOWN = 0x10B
    NOT_FOUND = 0x10C
    CANCELLED = 0x10D


def known_code(code: int) -> ErrorCode | None:
    """The peer's error code as an :class:`ErrorCode`, None for one this side does not know."""
    return ErrorCode(code) if code in ErrorCode._value2member_map_ else None


class TokenwireError(Exception):
    """Base of every error tokenwire raises on purpose. ``code`` says which, ``str()`` says why.

    What the SDK client raises, all catchable as ``TokenwireError``:

    * :class:`RemoteError`: the server refused or failed one request (an ERROR: ``LIMIT_EXCEEDED``,
      ``NOT_FOUND``, ``BAD_REQUEST``, ``UPSTREAM_ERROR``, ...; the connection takes more requests), or the
      connection ended (the server's close, the idle timeout: every answer open on it fails the same way).
      ``Connection.closed`` tells the two apart.
    * :class:`ConnectError` (also a ``ConnectionError``): no connection was made; :class:`ConnectTimeout`
      (nobody answered within ``timeout``) and :class:`~.quic_io.HandshakeError` (the server answered and the
      handshake failed) and :class:`ConnectRefused` (nothing listens there: a refusal seen at once) are its kinds.
    * ``DigestMismatch`` (the text does not match the server's digest), ``PromptTooLarge`` (also a
      ``ValueError``: over the size of a request, refused before sending), and a plain ``TokenwireError`` with
      code ``CANCELLED`` for the answers the application's own close cut off.

    Not tokenwire errors: mistakes in the calling code, raised before anything is sent (``ValueError`` for an
    argument out of range, ``CertificateFileError`` for a CA file without a certificate, ``RuntimeError`` for a
    second task reading an answer another task reads).
    """

    code: ErrorCode = ErrorCode.INTERNAL
    # Set only on what ``KVConnection.fetch_kv`` raises once its fetch was sent (None on every other error):
    # ``partial``, the result of the chunks that arrived and decoded, leading ones only (the engine prefills the
    # rest: a deadline met with what came instead of nothing); ``silent_s``, how long nothing had come from the
    # server when it failed, if long enough to mean the server or the path is gone rather than slow.
    partial: KVFetchResult | None = None
    silent_s: float | None = None

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ProtocolError(TokenwireError):
    """The peer broke the protocol; the connection is closed with ``code``."""

    code = ErrorCode.MALFORMED_FRAME


class FrameError(ProtocolError):
    """A frame that does not decode or does not validate (type, size, range, unknown field)."""

    code = ErrorCode.MALFORMED_FRAME


class FrameTooLarge(FrameError):
    code = ErrorCode.FRAME_TOO_LARGE
    decoded: list = []  # noqa: RUF012 - frames a stream decoder completed in the same read, before this one


class UnsupportedVersion(ProtocolError):
    code = ErrorCode.UNSUPPORTED_VERSION
    decoded: list  # set by StreamDecoder.feed, as FrameTooLarge's: the frames completed before this one


class RequestError(TokenwireError):
    """A request that the server refuses (bad parameters, limits, auth, upstream). Per request, not fatal."""

    code = ErrorCode.BAD_REQUEST


# The suffix of an ERROR's message that says "busy: try again after N seconds" (docs/protocol.md, Errors): the
# daemon's ``openai`` upstream ends an upstream's 429 or 503 with it. A suffix, not a new ERROR key: tokenwire/1
# closes the connection on an unknown key, so older clients would lose every answer on it; they show it as text.
RETRY_AFTER_SUFFIX = re.compile(r"; Retry-After: (\d{1,12}) s(?: \(.*\))?$")
RETRY_AFTER_MARK = "; Retry-After:"  # what starts the suffix (a sender defuses it in words it quotes)


def retry_after_note(seconds: int, why: str | None = None) -> str:
    """The suffix's words without its leading ``"; "``: ``Retry-After: N s``, then `` (why)``. The one way the
    daemon writes it (its upstreams' 429s and its own busy refusals), so that :data:`RETRY_AFTER_SUFFIX` reads
    every one; ``seconds`` a whole number >= 0."""
    return f"Retry-After: {int(seconds)} s" + (f" ({why})" if why else "")


def with_retry_after(message: str, seconds: int, why: str | None = None) -> str:
    """``message`` ending with the Retry-After suffix (:func:`retry_after_note`): busy, ask again in ``seconds``."""
    return f"{message}; {retry_after_note(seconds, why)}"


def retry_after_of(message: str) -> float | None:
    """The seconds a message's Retry-After suffix asks to wait (:data:`RETRY_AFTER_SUFFIX`), None without one."""
    found = RETRY_AFTER_SUFFIX.search(message)
    return float(found.group(1)) if found else None


class RemoteError(TokenwireError):
    """An ERROR frame or connection close received from the peer, raised on the local side.

    ``retry_after``: the seconds the server asks to wait before sending the request again, when its message ends
    with the Retry-After suffix (busy rather than broken: the daemon at its ``limits.max_live_answers``, an upstream
    answering HTTP 429 or 503); None otherwise.
    A chatbot could tell "busy, retry" from "broken" only by parsing the message; older daemons already sent the
    suffix where the upstream named a Retry-After, and older clients see it as part of the text."""

    path_lost = False  # the connection died of silence (QUIC idle timeout), nobody closed it: resumable
    retry_after: float | None = None

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after_of(message)


class ConnectError(TokenwireError, ConnectionError):
    """No connection was made: the server's name does not resolve, nobody answered, or the handshake failed.

    A ``ConnectionError`` as well, as these were before they became tokenwire errors (``except ConnectionError``
    still catches them). ``code`` is ``INTERNAL``: no tokenwire error code was exchanged.
    """


class ConnectTimeout(ConnectError):
    """Nobody answered the handshake in time (no server on that port, or the path drops everything): was a bare
    ``ConnectionError``, which an application catching ``TokenwireError`` missed."""


class ConnectRefused(ConnectError):
    """Nothing listens at that address: the host answered the client's first packet with ICMP port unreachable
    (``connection refused``) and the server never sent a packet. Raised as soon as the refusal arrives instead of
    after the whole connect timeout (a dead local port cost 3 s to say what the kernel knew at once). A
    :class:`ConnectError`, so retry logic takes it as an attempt that reached no server, as a timeout.

    Only where the refusal can be seen (Linux, whose kernel reports it to the client's connected socket); elsewhere
    the same case ends in :class:`ConnectTimeout`. A refusal after the server has sent anything does not end the
    handshake (a server restarting): QUIC retransmits through it, and the client's socket stops taking ICMP errors
    at all once the server has been heard. ``connect`` and ``connect_kv`` both raise it."""
