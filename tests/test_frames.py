"""The frame codec: round trips, strict validation with typed errors, and fuzzing."""

import struct

import msgpack
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.fuzzing import examples
from tokenwire.transport.errors import ErrorCode, FrameError, FrameTooLarge, UnsupportedVersion
from tokenwire.transport.frames import (
    MAX_DATAGRAM_FRAME,
    MAX_TOKEN_BYTES,
    Ack,
    Error,
    Finished,
    FrameType,
    GenTimes,
    Repair,
    Request,
    Started,
    StreamDecoder,
    Tokens,
    decode_datagram,
    decode_frame,
    encode_frame,
    encode_stream_frame,
)

SAMPLES = [
    Request(
        messages=[{"role": "user", "content": "héllo"}],
        scheme="stream",
        model="m",
        max_tokens=5,
        auth="tok",
        resume_id=b"r" * 16,
        resume_from=3,
        params={"temperature": 0.2, "stop": None},
    ),
    Started(handle=4, request_id=b"x" * 16, scheme="chatterbox", first_index=7),
    Tokens(handle=0, first=9, tokens=[b"a", b"\xe2\x82"], sent_us=12345678901, total=20, extra=(15, [b"z"])),
    Ack(handle=8, next_index=4, echo_us=1, recv_us=2, ecn=[1, 2, 3, 0]),
    Finished(total=3, digest=b"d" * 32, reason="length", gen_us=[0, 10, 20]),
    Finished(total=3, digest=b"d" * 32, first_gen_us=7),  # ALPN_GEN_TIMES: its g comes in GEN_TIMES
    GenTimes(gen_us=[0, 10, 20]),
    Repair(first=2, end=9),
    Error(code=ErrorCode.UNAUTHORIZED, message="nope"),
]

# What a decoder may raise on hostile input: FrameError, or UnsupportedVersion for a well-formed REQUEST or
# KV_FETCH of another version (hypothesis found {"t": 1, "v": 0}); the sessions close with either's code.
DECODE_ERRORS = (FrameError, UnsupportedVersion)


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda f: type(f).__name__)
def test_round_trip(frame):
    assert decode_frame(encode_frame(frame)) == frame
    dec = StreamDecoder()
    assert dec.feed(encode_stream_frame(frame)) == [frame]


def test_stream_decoder_reassembles_byte_by_byte():
    data = b"".join(encode_stream_frame(f) for f in SAMPLES)
    dec = StreamDecoder()
    out = []
    for i in range(len(data)):
        out += dec.feed(data[i : i + 1])
    assert out == SAMPLES and dec.pending == 0


def test_stream_decoder_rejects_oversized_prefix_before_buffering():
    dec = StreamDecoder(max_frame=1000)
    with pytest.raises(FrameTooLarge):
        dec.feed(struct.pack(">I", 1001))


def test_truncated_frame_is_pending():
    body = encode_stream_frame(SAMPLES[0])
    dec = StreamDecoder()
    assert dec.feed(body[:-1]) == []
    assert dec.pending == len(body) - 1


def _raw(d):
    return msgpack.packb(d, use_bin_type=True)


@pytest.mark.parametrize(
    "raw, match",
    [
        (b"\xc1", "msgpack"),
        (_raw([1, 2]), "must be a msgpack map"),
        (_raw({"x": 1}), "type field"),
        (_raw({"t": 99}), "unknown frame type"),
        (_raw({"t": 6, "i": 1, "j": 2, "zz": 0}), "unknown field"),
        (_raw({"t": 6, "i": 1}), "missing required field"),
        (_raw({"t": 6, "i": 5, "j": 5}), "empty range"),
        (_raw({"t": 6, "i": -1, "j": 5}), "out of range"),
        (_raw({"t": 6, "i": True, "j": 5}), "expected an integer"),
        (_raw({"t": 3, "r": 0, "i": 0, "k": [b"x" * (MAX_TOKEN_BYTES + 1)]}), "at most"),
        (_raw({"t": 3, "r": 0, "i": 0, "k": ["text, not bytes"]}), "bytes"),
        (_raw({"t": 3, "r": 0, "i": 5, "k": [b"a"], "x": [3, [b"b"]]}), "extra run"),
        (_raw({"t": 1, "v": 1, "m": [{"role": "user"}]}), "role"),
        (_raw({"t": 1, "v": 1, "m": [{"role": "god", "content": ""}]}), "role"),
        (_raw({"t": 1, "v": 1, "m": [{"role": "user", "content": "x"}], "s": "carrier-pigeon"}), "not one of"),
        (_raw({"t": 1, "v": 1, "m": [{"role": "user", "content": "x"}], "rf": 3}), "together"),
        (_raw({"t": 5, "n": 1, "d": b"short", "fr": "stop"}), "bytes"),
        (_raw({"t": 14}), "gentimes: missing required field 'g'"),
        (_raw({"t": 14, "g": [0, -1]}), "out of range"),
        (_raw({"t": 14, "g": [0, 2**63]}), "out of range"),
        (_raw({"t": 14, "g": [0, 1.5]}), "expected an integer"),
        (_raw({"t": 14, "g": [0, True]}), "expected an integer"),
        (_raw({"t": 14, "g": b"\x00"}), "expected a list"),
        (_raw({"t": 14, "g": [0], "n": 1}), "unknown field"),
        (_raw({"t": 14, "g": [0] * 200_001}), "exceeds max_array_len"),
        (_raw({"t": 1, "v": 1, "m": [{"role": "user", "content": "x"}], "p": {"k": [1]}}), "parameter"),
        (b"\x81\xa1t\x07" + b"\x00", "msgpack"),  # trailing garbage
    ],
)
def test_invalid_frames_raise_frame_error(raw, match):
    with pytest.raises(FrameError, match=match):
        decode_frame(raw)


def test_unsupported_version_is_typed():
    raw = _raw({"t": 1, "v": 2, "m": [{"role": "user", "content": "x"}]})
    with pytest.raises(UnsupportedVersion) as info:
        decode_frame(raw)
    assert info.value.code == ErrorCode.UNSUPPORTED_VERSION


def test_size_limits():
    with pytest.raises(FrameTooLarge):
        decode_frame(b"\x00" * 100, max_size=10)
    with pytest.raises(FrameTooLarge):
        decode_datagram(b"\x00" * (MAX_DATAGRAM_FRAME + 1))


def test_only_tokens_and_acks_travel_in_datagrams():
    with pytest.raises(FrameError, match="datagram"):
        decode_datagram(encode_frame(Repair(1, 2)))
    with pytest.raises(FrameError, match="datagram"):
        decode_datagram(encode_frame(GenTimes([0])))
    assert isinstance(decode_datagram(encode_frame(Ack(0, 1))), Ack)


# ---- fuzzing ---------------------------------------------------------------------------------------------


@settings(max_examples=examples(600), deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_only_raise_frame_errors(data):
    try:
        decode_frame(data)
    except DECODE_ERRORS:
        pass


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=examples(600), deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["t", "v", "m", "r", "i", "k", "x", "n", "d", "s", "j", "c", "msg", "g"]),
        msgpack_values,
        max_size=6,
    ),
    st.sampled_from([*range(1, 9), 14]),
)
@example(fields={"v": 0}, t=1)  # a REQUEST of version 0: UnsupportedVersion, found by this test
def test_fuzz_structured_maps_only_raise_frame_errors(fields, t):
    fields = dict(fields)
    fields["t"] = t
    try:
        frame = decode_frame(_raw(fields))
    except DECODE_ERRORS:
        return
    # anything accepted must survive a round trip unchanged
    assert decode_frame(encode_frame(frame)) == frame


@settings(max_examples=examples(200), deadline=None)
@given(st.binary(max_size=64), st.integers(0, 40))
def test_fuzz_stream_decoder(data, cut):
    dec = StreamDecoder(max_frame=4096)
    try:
        dec.feed(data[:cut])
        dec.feed(data[cut:])
    except DECODE_ERRORS:
        pass


tokens_st = st.lists(st.binary(max_size=MAX_TOKEN_BYTES), max_size=20)


@settings(max_examples=examples(200), deadline=None)
@given(st.integers(0, 2**40), st.integers(0, 2**30), tokens_st, st.none() | st.integers(0, 2**40 - 1))
def test_tokens_round_trip(handle, first, toks, total):
    f = Tokens(handle=handle, first=first, tokens=toks, sent_us=first, total=total)
    assert decode_frame(encode_frame(f)) == f


@pytest.mark.parametrize("value", [object(), {1, 2}, 2**70, {"nested": [object()]}])
def test_a_request_the_sdk_cannot_encode_is_a_value_error_that_says_so(value):
    """params holding an object msgpack has no encoding for raised msgpack's bare TypeError (or
    OverflowError) from deep inside the SDK, not check_outgoing's ValueError."""
    from tokenwire.transport.frames import check_outgoing

    with pytest.raises(ValueError, match="invalid request: cannot encode it"):
        check_outgoing(Request(model="m", messages=[{"role": "user", "content": "x"}], params={"p": value}),
                       "request")


def test_a_request_with_a_lone_surrogate_says_its_text_is_not_unicode():
    from tokenwire.transport.frames import check_outgoing

    with pytest.raises(ValueError, match="its text is not valid Unicode"):
        check_outgoing(Request(model="m", messages=[{"role": "user", "content": "caf\udce9"}]), "request")


def test_a_peers_text_in_an_error_message_cannot_forge_or_flood_a_log_line():
    """An unknown field named "\\n2026-... ERROR ...: FORGED" appeared in the daemon's text log as a line of its
    own, and a 1-MiB name (or role) made a 1-MiB warning line."""
    forged = "x\n2026-12-05 06:00:00,000 ERROR tokenwire.daemon: FORGED LINE"
    base = Request(messages=[{"role": "user", "content": "x"}]).to_wire()
    for wire in ({**base, forged: 1, "y" * 100_000: 2},
                 {**base, "m": [{"role": forged + "z" * 100_000, "content": "x"}]}):
        with pytest.raises(FrameError) as info:
            decode_frame(msgpack.packb(wire))
        assert "\n" not in str(info.value) and len(str(info.value)) < 400, str(info.value)[:500]


def test_a_key_twice_in_one_map_is_malformed():
    """The last copy won: {"t": 6, ..., "t": 1} was a REQUEST here and a REPAIR to a decoder keeping the first
    copy (common elsewhere), and {"mt": 3, "mt": 5} asked for 5 tokens."""
    assert FrameType.REQUEST == 1 and FrameType.REPAIR == 6
    def entries(*pairs):
        return bytes([0x80 | len(pairs)]) + b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in pairs)

    request = [("t", 1), ("v", 1), ("m", [{"role": "user", "content": "x"}]), ("mt", 3)]
    assert decode_frame(entries(*request)).max_tokens == 3
    for extra in (("t", 6), ("mt", 5)):
        with pytest.raises(FrameError, match=f"the key '{extra[0]}' appears twice in one map"):
            decode_frame(entries(*request, extra))
    nested = [("t", 1), ("v", 1), ("m", [{"role": "user", "content": "x"}]), ("p", {"a": 1})]
    raw = entries(*nested).replace(msgpack.packb({"a": 1}), b"\x82" + msgpack.packb("a") + b"\x01"
                                   + msgpack.packb("a") + b"\x02")
    with pytest.raises(FrameError, match="appears twice"):
        decode_frame(raw)
