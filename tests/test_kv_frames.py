"""KV channel frames (types 9-13): round trips, strict validation, fuzzing."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzzing import examples
from tokenwire.transport.errors import FrameError, UnsupportedVersion
from tokenwire.transport.frames import (
    KV_CONTROLLERS,
    KV_LEVELS,
    KvAck,
    KvChunk,
    KvDone,
    KvFetch,
    KvMeta,
    StreamDecoder,
    decode_datagram,
    decode_frame,
    encode_frame,
    encode_stream_frame,
)

SAMPLES = [
    KvFetch(model="smollm2", deadline_ms=2500, token_ids=[1, 2, 3], controller="even-split",
            recompute_us_per_token=2250, auth="tok"),
    KvFetch(model="m", deadline_ms=1, hashes=[b"h" * 16, b"g" * 16]),
    KvMeta(chunks=4, chunk_tokens=256, tokens=1000, geometry=[30, 3, 64], fingerprint=2**64 - 1, dtype="float16"),
    KvChunk(fetch=0, index=3, level="medium", size=123456, crc=0xDEADBEEF, tokens=256, sent_us=99),
    KvChunk(fetch=4, index=0, level="text", size=1024, crc=0, tokens=256),
    KvAck(index=2, size=5, first_us=10, done_us=10, ecn=[1, 2, 3, 4]),
    KvDone(chunks=2, levels=["low", "text"]),
]

# What a decoder may raise on hostile input: FrameError, or UnsupportedVersion for a well-formed REQUEST or
# KV_FETCH of another version (hypothesis found {"t": 1, "v": 0}); the sessions close with either's code.
DECODE_ERRORS = (FrameError, UnsupportedVersion)


def _raw(d):
    return msgpack.packb(d, use_bin_type=True)


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda f: type(f).__name__)
def test_round_trip(frame):
    assert decode_frame(encode_frame(frame)) == frame
    assert StreamDecoder().feed(encode_stream_frame(frame)) == [frame]


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"t": 9, "v": 1, "model": "m", "dl": 5}, "exactly one of"),
        ({"t": 9, "v": 1, "model": "m", "dl": 5, "ids": [1], "hs": [b"x" * 16]}, "exactly one of"),
        ({"t": 9, "v": 1, "model": "m", "dl": 5, "ids": []}, "empty token"),
        ({"t": 9, "v": 1, "model": "m", "dl": 0, "ids": [1]}, "out of range"),
        ({"t": 9, "v": 1, "model": "m", "dl": 5, "ids": [-1]}, "out of range"),
        ({"t": 9, "v": 1, "model": "m", "dl": 5, "hs": [b"short"]}, "16 bytes"),
        ({"t": 9, "v": 1, "model": "m", "dl": 5, "ids": [1], "ctl": "magic"}, "is not one of"),
        ({"t": 9, "v": 1, "model": "m", "dl": 5, "ids": [1], "zz": 1}, "unknown field"),
        ({"t": 10, "n": 1, "ct": 1, "tok": 1, "geo": [1, 2], "fp": 0, "dt": "float16"}, "layers"),
        ({"t": 10, "n": 1, "ct": 1, "tok": 1, "geo": [1, 2, 3], "fp": -1, "dt": "float16"}, "out of range"),
        ({"t": 11, "r": 0, "i": 0, "lv": "ultra", "n": 1, "crc": 0, "tk": 1}, "is not one of"),
        ({"t": 11, "r": 0, "i": 0, "lv": "low", "n": 2**31, "crc": 0, "tk": 1}, "out of range"),
        ({"t": 12, "i": 0, "n": 1, "f": 10, "d": 9}, "done before"),
        ({"t": 13, "n": 2, "lv": ["low"]}, "one level per chunk"),
        ({"t": 13, "n": 1, "lv": [3]}, "expected a string"),
    ],
)
def test_invalid_kv_frames_raise_frame_error(raw, match):
    with pytest.raises(FrameError, match=match):
        decode_frame(_raw(raw))


def test_kv_fetch_version_and_datagrams():
    with pytest.raises(UnsupportedVersion):
        decode_frame(_raw({"t": 9, "v": 2, "model": "m", "dl": 5, "ids": [1]}))
    for f in SAMPLES:  # KV frames never travel in datagrams
        with pytest.raises(FrameError):
            decode_datagram(encode_frame(f))


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=17),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=4),
    max_leaves=12,
)
KV_KEYS = ["t", "v", "model", "dl", "ids", "hs", "ctl", "rc", "a", "n", "ct", "tok", "geo", "fp", "dt", "r", "i",
           "lv", "crc", "tk", "s", "f", "d", "c"]


@settings(max_examples=examples(200), suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KV_KEYS), msgpack_values, max_size=8), st.integers(9, 13))
def test_fuzz_kv_maps_only_raise_frame_errors(fields, t):
    fields = dict(fields)
    fields["t"] = t
    try:
        frame = decode_frame(_raw(fields))
    except DECODE_ERRORS:
        return
    assert decode_frame(encode_frame(frame)) == frame


MODEL_NAMES = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=20)
"""A model name has no control character nor lone surrogate (frames.model_name_problem)."""


@given(
    MODEL_NAMES, st.integers(1, 3_600_000), st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=50),
    st.sampled_from(KV_CONTROLLERS), st.none() | st.integers(0, 10_000_000), st.none() | st.booleans(),
)
def test_kv_fetch_round_trip(model, dl, ids, ctl, rc, prefix):
    f = KvFetch(model=model, deadline_ms=dl, token_ids=ids, controller=ctl, recompute_us_per_token=rc, prefix=prefix)
    assert decode_frame(encode_frame(f)) == f


def test_kv_fetch_prefix_must_be_a_boolean():
    wire = KvFetch(model="m", deadline_ms=10, token_ids=[1]).to_wire() | {"px": 1}
    with pytest.raises(FrameError, match="px"):
        decode_frame(msgpack.packb(wire))


@given(st.integers(0, 4095), st.sampled_from(KV_LEVELS), st.integers(0, 2**30), st.integers(0, 2**32 - 1),
       st.integers(1, 2**15))
def test_kv_chunk_round_trip(i, lv, n, crc, tk):
    f = KvChunk(fetch=8, index=i, level=lv, size=n, crc=crc, tokens=tk)
    assert decode_frame(encode_frame(f)) == f


def test_big_fetch_fits_a_stream_frame():
    f = KvFetch(model="m", deadline_ms=10, token_ids=list(range(2**17 - 1, -1, -1)))
    data = encode_frame(f)
    assert len(data) < 1 << 20 and decode_frame(data) == f
