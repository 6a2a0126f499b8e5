"""Property tests of tokenwire/1 on the wire as a peer may garble it: valid frames mutated (a bit flipped, a cut, a
length at its edge), datagrams, and the stream decoder cut anywhere. What decodes is a frame that encodes back to
itself, with valid Unicode strings and finite floats (what the session then handles, logs and echoes); everything
else is a FrameError or UnsupportedVersion, which close the session with a code. tests/test_frames.py has the
random-bytes and random-map tests; these start from real frames, which reach past the first checks."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzzing import examples, mutated
from tokenwire.transport import frames as F
from tokenwire.transport.errors import ErrorCode, FrameError, FrameTooLarge, UnsupportedVersion

pytestmark = pytest.mark.fuzz

DECODE_ERRORS = (FrameError, UnsupportedVersion)

SAMPLES: list[Any] = [
    F.Request(messages=[{"role": "user", "content": "héllo"}], scheme="stream", model="m", max_tokens=5, auth="tok",
              resume_id=b"r" * 16, resume_from=3, params={"temperature": 0.2, "stop": None}),
    F.Request(messages=[{"role": "system", "content": "a"}, {"role": "user", "content": "b" * 40}],
              params={"stop": ["x", "y"], "seed": 3, "top_p": 0.5}),
    F.Started(handle=4, request_id=b"x" * 16, scheme="chatterbox", first_index=7),
    F.Tokens(handle=0, first=9, tokens=[b"a", b"\xe2\x82"], sent_us=12345678901, total=20, extra=(15, [b"z"])),
    F.Tokens(handle=2**20, first=0, tokens=[b"x" * 20] * 20, sent_us=1),
    F.Ack(handle=8, next_index=4, echo_us=1, recv_us=2, ecn=[1, 2, 3, 0]),
    F.Finished(total=3, digest=b"d" * 32, reason="length", gen_us=[0, 10, 20]),
    F.Finished(total=3, digest=b"d" * 32, first_gen_us=7),
    F.GenTimes(gen_us=[0, 10, 20] * 10),
    F.Repair(first=2, end=9),
    F.Error(code=ErrorCode.UNAUTHORIZED, message="nope"),
    F.Report(stall_ratio=0.5, longest_stall_ms=3, ttft_ms=10),
    F.KvFetch(model="smollm2", deadline_ms=2500, token_ids=list(range(40)), controller="even-split",
              recompute_us_per_token=2250, auth="tok"),
    F.KvFetch(model="m", deadline_ms=1, hashes=[b"h" * 16, b"g" * 16], prefix=True),
    F.KvMeta(chunks=4, chunk_tokens=256, tokens=1000, geometry=[30, 3, 64], fingerprint=2**64 - 1, dtype="float16"),
    F.KvChunk(fetch=0, index=3, level="medium", size=123456, crc=0xDEADBEEF, tokens=256, sent_us=99),
    F.KvAck(index=2, size=5, first_us=10, done_us=10, ecn=[1, 2, 3, 4]),
    F.KvDone(chunks=2, levels=["low", "text"]),
]
_ENCODED = [F.encode_frame(f) for f in SAMPLES]
FRAME_BYTES = st.one_of(st.sampled_from(_ENCODED).flatmap(lambda b: mutated(b, 5)),
                        st.sampled_from(_ENCODED).flatmap(lambda b: mutated(b, 1)), st.binary(max_size=200))


def _check_decoded(frame: Any) -> None:
    """A decoded frame encodes and decodes back to itself; its strings are valid Unicode, its floats finite."""
    assert F.decode_frame(F.encode_frame(frame), max_size=1 << 30) == frame
    for field in dataclasses.fields(frame):
        value = getattr(frame, field.name)
        if isinstance(value, str):
            value.encode("utf-8")
        elif isinstance(value, float):
            assert math.isfinite(value), (field.name, value)


@settings(max_examples=examples(300), deadline=None)
@given(FRAME_BYTES)
def test_a_garbled_frame_decodes_to_one_that_round_trips_or_is_a_frame_error(data: bytes) -> None:
    try:
        frame = F.decode_frame(data)
    except DECODE_ERRORS:
        return
    _check_decoded(frame)


_TOKENS = st.builds(F.Tokens, handle=st.integers(0, F.MAX_HANDLE), first=st.integers(0, 2**20),
                    tokens=st.lists(st.binary(max_size=F.MAX_TOKEN_BYTES), max_size=30),
                    sent_us=st.integers(0, F.MAX_TIMESTAMP_US))
_ACK = st.builds(F.Ack, handle=st.integers(0, F.MAX_HANDLE), next_index=st.integers(0, F.MAX_INDEX),
                 echo_us=st.integers(0, F.MAX_TIMESTAMP_US), recv_us=st.integers(0, F.MAX_TIMESTAMP_US),
                 ecn=st.none() | st.lists(st.integers(0, F.MAX_INDEX), min_size=4, max_size=4))
_DATAGRAM = (_TOKENS | _ACK).map(F.encode_frame)


@settings(max_examples=examples(300), deadline=None)
@given(st.one_of(_DATAGRAM.flatmap(lambda b: mutated(b, 4)), _DATAGRAM, FRAME_BYTES))
def test_a_garbled_datagram_is_tokens_or_an_ack_within_the_datagram_bound_or_a_frame_error(data: bytes) -> None:
    try:
        frame = F.decode_datagram(data)
    except DECODE_ERRORS:
        return
    assert isinstance(frame, F.Tokens | F.Ack)
    assert len(data) <= F.MAX_DATAGRAM_FRAME
    _check_decoded(frame)


_STREAM_SAMPLES = [F.encode_stream_frame(f) for f in SAMPLES]
_STREAM = st.lists(st.sampled_from(_STREAM_SAMPLES), min_size=1, max_size=5).map(b"".join)


def _fed(pieces: list[bytes], max_frame: int) -> tuple[list[Any], str | None, int | None]:
    """What a StreamDecoder makes of ``pieces``: the frames, how it failed (None: it did not), what it still holds."""
    decoder = F.StreamDecoder(max_frame=max_frame)
    frames: list[Any] = []
    try:
        for piece in pieces:
            frames += decoder.feed(piece)
    except FrameTooLarge as exc:
        return frames + list(exc.decoded), "too large", decoder.pending
    except UnsupportedVersion as exc:
        return frames + list(exc.decoded), "version", None
    except FrameError as exc:
        return frames, type(exc).__name__, None
    return frames, None, decoder.pending


@settings(max_examples=examples(200), deadline=None)
@given(st.one_of(_STREAM.flatmap(lambda b: mutated(b, 3)), _STREAM, st.binary(max_size=100)),
       st.lists(st.integers(0, 60), max_size=8), st.sampled_from([F.MAX_STREAM_FRAME, 4096, 1024]))
def test_a_stream_decodes_alike_however_its_bytes_arrive(data: bytes, cuts: list[int], max_frame: int) -> None:
    """QUIC hands a stream over in pieces cut anywhere: the outcome (and, when it succeeds, the frames and what is
    left pending) must not depend on where. The frames before a failure may: it is raised by the piece that
    completes the bad frame."""
    pieces, at = [], 0
    for n in cuts:
        pieces.append(data[at:at + n])
        at += n
    pieces.append(data[at:])
    whole, cut = _fed([data], max_frame), _fed(pieces, max_frame)
    assert whole[1] == cut[1]
    if whole[1] is None:
        assert whole == cut
