"""Gaps a mutation audit of the suite found: the end-to-end digest check could be deleted (in the session, or in the
SDK's stream) and every test still passed, though the README promises "a digest mismatch raises DigestMismatch
instead of returning wrong text"."""

from __future__ import annotations

import asyncio

import pytest

from tokenwire.transport.client import DigestMismatch, chat_sync, connect
from tokenwire.transport.frames import Finished, Request, Started, Tokens, encode_frame, encode_stream_frame
from tokenwire.transport.server_session import ServerSession
from tokenwire.transport.session_events import RequestFinished
from tokenwire.transport.transcript import text_digest

from .quicpair import Pair
from .test_sdk_server import T, client_kwargs, run, served, server_in_thread

TOKENS = [b"one", b" two", b" three", b" four"]
WORDS = [t.decode() for t in TOKENS]


# -- the session's verdict (sans-I/O) ----------------------------------------------------------------------------
@pytest.mark.parametrize(("claimed", "ok"), [
    (TOKENS, True),  # the honest server: the same run's contrast
    ([b"one", b" two", b" three", b" fou"], False),  # the right count, another text
], ids=["honest", "wrong-digest"])
def test_a_finished_whose_digest_is_not_the_tokens_held_is_reported_as_a_mismatch(claimed, ok):
    """``digest_ok`` compared only the token count: a server (or a path) that changed a token's bytes had its text
    reported as verified."""
    pair = Pair()
    pair.exchange(rounds=40)
    sid = pair.client.start_request(Request(messages=[{"role": "user", "content": "x"}]), pair.now)
    pair.exchange(rounds=40)
    quic = pair.server.quic  # the server's side written by hand: STARTED, the tokens, then FINISHED
    quic.send_stream_data(sid, encode_stream_frame(Started(request_id=b"\1" * 16, scheme="chatterbox", handle=sid)))
    pair.exchange(rounds=40)
    quic.send_datagram_frame(encode_frame(Tokens(handle=sid, first=0, tokens=TOKENS)))
    quic.send_stream_data(sid, encode_stream_frame(Finished(total=len(TOKENS), digest=text_digest(claimed))))
    pair.exchange(rounds=200)
    finished = [e for e in pair.client_events if isinstance(e, RequestFinished)]
    assert len(finished) == 1
    outcome = finished[0].result
    assert outcome.tokens == TOKENS and outcome.total == len(TOKENS)
    assert outcome.digest_ok is ok


# -- the SDK: a lying server -------------------------------------------------------------------------------------
async def words(request):
    for w in WORDS:
        yield w


@pytest.fixture
def lying_digest(monkeypatch):
    """The SDK's own server, made to lie in FINISHED only: every token sent as generated, the digest's first byte
    flipped. Patched on ``ServerSession`` (the client computes its digest with ``text_digest``, untouched)."""
    real = ServerSession._send

    def send(self, stream_id, frame, end=False):
        if isinstance(frame, Finished):
            frame = Finished(frame.total, bytes([frame.digest[0] ^ 0xFF]) + frame.digest[1:], frame.reason,
                             frame.gen_us, frame.first_gen_us)
        real(self, stream_id, frame, end)

    monkeypatch.setattr(ServerSession, "_send", send)


def test_the_sdk_raises_digest_mismatch_instead_of_returning_the_text(lying_digest):
    """``ChatStream`` queued the text and ended normally whatever ``digest_ok`` said: ``collect()`` returned text
    the server's digest disowns."""
    async def go():
        async with served(words) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            stream = conn.chat("q")
            deltas: list[str] = []
            with pytest.raises(DigestMismatch, match="does not match the server's digest"):
                async with asyncio.timeout(T):
                    async for delta in stream:
                        deltas.append(delta)
            collected = conn.chat("q")
            with pytest.raises(DigestMismatch):
                await asyncio.wait_for(collected.collect(), T)
            return deltas, stream.stats

    deltas, stats = run(go())
    assert "".join(deltas) == "".join(WORDS)  # every token came: only the digest disagrees
    assert stats is not None and not stats.digest_verified


def test_chat_sync_raises_digest_mismatch_for_a_lying_server(lying_digest):
    with server_in_thread(words) as server, pytest.raises(DigestMismatch):
        chat_sync("127.0.0.1", server.port, "q", **client_kwargs())
