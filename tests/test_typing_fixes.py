"""Bugs that mypy found (the package ships py.typed: applications type-check against these hints).

``RemoteError.code`` is annotated :class:`ErrorCode`, but the token client's errors carried the peer's raw
int: ``err.code.name`` (fine for a type checker) raised AttributeError. The KV client already mapped codes
through ``known_code``; the token client now does too (a code this side does not know reads as INTERNAL, as
it does for KV; the message still says the raw code).
"""

from __future__ import annotations

from tokenwire.transport.errors import ErrorCode, RemoteError
from tokenwire.transport.frames import Request
from tokenwire.transport.session_events import RequestFailed, closed_error

from .quicpair import Pair


def test_a_connection_close_error_carries_an_error_code_member():
    err = closed_error(int(ErrorCode.UNAUTHORIZED), "client certificate required", 30.0)
    assert isinstance(err, RemoteError)
    assert type(err.code) is ErrorCode and err.code.name == "UNAUTHORIZED"


def test_an_unknown_close_code_reads_as_internal_and_the_message_keeps_it():
    err = closed_error(0xA, "protocol violation", 30.0)
    assert type(err.code) is ErrorCode and err.code is ErrorCode.INTERNAL
    assert "(code 0xa)" in str(err)


def test_an_idle_close_still_carries_an_error_code_member():
    err = closed_error(0, "Idle timeout", 30.0)
    assert err.path_lost and type(err.code) is ErrorCode


def test_a_refused_request_fails_with_an_error_code_member():
    pair = Pair()
    pair.exchange(rounds=40)  # handshake
    assert pair.server is not None
    sid = pair.client.start_request(Request(messages=[{"role": "user", "content": "x"}]), pair.now)
    pair.exchange(rounds=40)
    pair.server.reject(sid, ErrorCode.NOT_FOUND, "no such answer")
    pair.exchange(rounds=100)
    failed = [e for e in pair.client_events if isinstance(e, RequestFailed) and e.stream_id == sid]
    assert len(failed) == 1
    code = failed[0].error.code
    assert type(code) is ErrorCode and code.name == "NOT_FOUND"
