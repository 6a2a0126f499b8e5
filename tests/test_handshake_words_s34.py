"""What a client is told when a loaded server does not accept its Retry token (session 34: a gc probe's handshake
storm read "no reason given (code 0xb)")."""

from __future__ import annotations

from aioquic.quic import events as qe
from aioquic.quic.packet import QuicErrorCode, QuicFrameType

from tokenwire.transport.quic_io import HandshakeError, _handshake_failure


def test_a_refused_retry_token_says_what_happened_and_to_retry() -> None:
    # aioquic's server closes such an Initial with a transport close naming PADDING as the frame type
    ended = qe.ConnectionTerminated(error_code=QuicErrorCode.INVALID_TOKEN, frame_type=QuicFrameType.PADDING,
                                    reason_phrase="")
    err = _handshake_failure("edge.example", 4433, ended)
    assert isinstance(err, HandshakeError) and err.tls_alert is None
    assert "did not accept the Retry token" in str(err) and "retry (QUIC INVALID_TOKEN 0xb)" in str(err)
    assert "no reason given" not in str(err)


def test_an_invalid_token_close_with_words_of_its_own_keeps_them() -> None:
    ended = qe.ConnectionTerminated(error_code=QuicErrorCode.INVALID_TOKEN, frame_type=QuicFrameType.PADDING,
                                    reason_phrase="token expired")
    assert str(_handshake_failure("h", 1, ended)) == "QUIC handshake with h:1 failed: token expired (code 0xb)"
