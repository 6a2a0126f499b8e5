"""The events a tokenwire session returns to its driver, and what a connection's end means.

:class:`SessionEvent` and its subclasses are what :class:`~.server_session.ServerSession` and
:class:`~.client_session.ClientSession` hand back from each call (the KV sessions return their own, built on
the same base); :func:`closed_error`, :func:`handshake_refusal` and :func:`idle_timeout_in_force` turn a
:class:`ConnectionEnded` (or aioquic's close) into an error a client can act on, and are shared by the token
and KV clients and by :mod:`.quic_io`. They are apart from the sessions so that drivers, the SDK and the KV side
can read events without pulling in either side's state machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from aioquic.quic.connection import QuicConnection

from .errors import ErrorCode, RemoteError, TokenwireError, known_code
from .frames import Report, Request, Started
from .session_outcome import ChatOutcome
from .stateless_reset import RESET_REASON


@dataclass
class SessionEvent:
    pass


@dataclass
class RequestReceived(SessionEvent):
    """Server: a client asked for an answer. The driver calls ``accept`` or ``reject``."""

    stream_id: int
    request: Request


@dataclass
class RequestCancelled(SessionEvent):
    """Server: the client abandoned a request (FIN or reset before FINISHED), or its connection ended.

    ``lost`` tells the two apart: an explicit cancel should stop generation, a lost connection should not
    (the client may come back and resume).
    """

    stream_id: int
    reason: str
    lost: bool = False


@dataclass
class ClientReport(SessionEvent):
    """Server: what the client says it experienced for this request (stall ratio, TTFT)."""

    stream_id: int
    report: Report


@dataclass
class RequestRefused(SessionEvent):
    """Server: the session itself refused a request stream (too many at once, request too large) with an
    ERROR; the connection and its other requests go on. For the driver's logs and counters only."""

    stream_id: int
    code: int
    reason: str


@dataclass
class RequestCompleted(SessionEvent):
    """Server: the client confirmed it holds the whole answer."""

    stream_id: int


@dataclass
class RequestStarted(SessionEvent):
    stream_id: int
    started: Started


@dataclass
class TokensRendered(SessionEvent):
    """Client: tokens that became renderable, in order, at ``now``."""

    stream_id: int
    tokens: list[bytes]
    now: float


@dataclass
class RequestFinished(SessionEvent):
    """Client: every token is here and the digest matched (or did not: ``digest_ok``)."""

    stream_id: int
    result: ChatOutcome


@dataclass
class RequestFailed(SessionEvent):
    stream_id: int
    error: TokenwireError


@dataclass
class ConnectionEnded(SessionEvent):
    error_code: int
    reason: str
    by_peer: bool
    requests_open: bool = True  # some request had not ended: it fails with this (an idle close then means trouble)


AIOQUIC_IDLE_REASON = "Idle timeout"
"""The reason aioquic gives its ConnectionTerminated when its idle timer fires (a test pins it)."""


def idle_timeout_in_force(quic: QuicConnection) -> float:
    """The idle timeout that closes ``quic``: ours or the peer's, whichever is shorter (aioquic closes on the
    minimum; the peer's is known once its transport parameters have come)."""
    remote = getattr(quic, "_remote_max_idle_timeout", None)
    own = quic.configuration.idle_timeout
    return min(own, remote) if remote else own


def closed_error(error_code: int, reason: str, idle_timeout: float, what: str = "connection",
                 awaiting: bool = True) -> RemoteError:
    """Why a connection ended, for the client's requests; the idle timer's close says what it means. With
    nothing ``awaiting`` (a chat app between turns), neither end had anything to say: the server is not gone.

    The idle timeout's error has code NO_ERROR and ``path_lost``: QUIC closes silently (RFC 9000, 10.1), so no
    end sent a code, and none failed. aioquic reports its own timer as transport INTERNAL_ERROR (0x1), which maps
    to no tokenwire code and so read as INTERNAL, "a failure of the server itself": an application dispatching on
    the code took a network blip (or a chat left idle between turns) for a server bug. A Stateless Reset's end
    (:data:`~.stateless_reset.RESET_REASON`: the server lost the connection, a restart) is the same error, with
    its reason: it is what such a client waited out the idle timeout for before."""
    if reason == AIOQUIC_IDLE_REASON:
        why = ("server or path gone" if awaiting else
               "no request was open, so neither end sent anything; connect again, or connect with keepalive=True")
        err = RemoteError(f"no packet from the server for {idle_timeout:g} s (QUIC idle timeout): {why}",
                          code=ErrorCode.NO_ERROR)
        err.path_lost = True  # nobody closed it: a request on it may resume on a new connection
        return err
    if reason == RESET_REASON:
        # the server's Stateless Reset (RFC 9000 10.3): it no longer has the connection (a restart); the same error
        # as the idle timeout's, which is what the client waited for before
        err = RemoteError(f"{what} lost: {RESET_REASON}; connect again", code=ErrorCode.NO_ERROR)
        err.path_lost = True
        return err
    refused = handshake_refusal(error_code, reason)
    if refused is not None:
        return RemoteError(f"{what} closed: {refused}", code=known_code(error_code))
    return RemoteError(f"{what} closed: {reason or 'no reason given'} (code {error_code:#x})",
                       code=known_code(error_code))


QUIC_APPLICATION_ERROR = 0xC


def handshake_refusal(error_code: int, reason: str) -> str | None:
    """What a close with QUIC's APPLICATION_ERROR and no reason means, else None. A server's close before its
    handshake is done goes out that way (RFC 9000 10.2.3 has the reason cleared), so every refusal of a tokenwire
    server in the handshake read "no reason given (code 0xc)", which said nothing a client could act on."""
    if error_code != QUIC_APPLICATION_ERROR or reason:
        return None
    return ("the server refused it during its handshake, over its limits (too many handshakes in progress or "
            "sessions open, a handshake that took too long) or stopping; retry later (QUIC APPLICATION_ERROR 0xc: "
            "a close before the handshake completes carries no reason)")
