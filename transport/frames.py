"""The tokenwire frame codec: every frame of protocol ``tokenwire/1``, encoded as msgpack maps.

Why msgpack maps with short keys: self-describing and strictly checkable (unknown keys are an error),
compact enough for token datagrams, and decoded by a C extension. A frame is ``{"t": TYPE, ...fields}``.
On QUIC streams frames are prefixed with a 4-byte big-endian length (:class:`StreamDecoder`); a DATAGRAM
carries exactly one frame.

Decoding is the trust boundary: :func:`decode_frame` validates types, sizes, ranges and field names, and
raises only :class:`~tokenwire.transport.errors.FrameError` (or a subclass) on bad input.

Tokens travel as raw UTF-8 *bytes* pieces, because one model token can end in the middle of a code point;
the client decodes incrementally.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar

import msgpack  # type: ignore[import-untyped]  # msgpack ships no hints

from .errors import FrameError, FrameTooLarge, UnsupportedVersion

PROTOCOL_VERSION = 1
ALPN = "tokenwire/1"
ALPN_GEN_TIMES = ALPN + "+gt"
"""The same protocol, with FINISHED's generation times in a GEN_TIMES frame after it (:class:`GenTimes`): a
client offers it ahead of ``ALPN`` and a server that knows it prefers it, so neither end's older peer ever sees the
new frame (an older client closes the connection on a frame type it does not know, an older server on a REQUEST
key it does not know: a REQUEST field could not ask for it)."""
CHAT_ALPNS = (ALPN_GEN_TIMES, ALPN)  # either end's offer, in the server's order of preference

SCHEMES = ("chatterbox", "stream", "duplicate")

MAX_DATAGRAM_FRAME = 1500  # larger datagram frames are rejected before decoding
MAX_STREAM_FRAME = 1 << 20  # default limit for one length-prefixed stream frame
REPORT_MS_MAX = 1 << 32  # REPORT's times in ms: the field's upper bound
MAX_MODEL_CHARS = 128  # a model name, in a REQUEST or a KV_FETCH (the daemon's ingest socket takes the same)
MAX_CHUNK_TOKENS = 1 << 15  # tokens in one KV chunk (the [kv] chunk_tokens setting's bound too)
MAX_TOKEN_BYTES = 256  # one token piece; longer upstream pieces are split by the sender
MAX_TOKENS_PER_FRAME = 4096
MAX_INDEX = (1 << 40) - 1
MAX_HANDLE = (1 << 62) - 1
MAX_TIMESTAMP_US = (1 << 63) - 1
REQUEST_ID_BYTES = 16
DIGEST_BYTES = 32
MAX_MESSAGES = 512
MAX_AUTH_CHARS = 512  # an auth token (a REQUEST's and a KV_FETCH's "a")
MAX_TEXT = 1 << 20
MAX_PARAMS = 32
MAX_GEN_TIMES = 200_000  # a FINISHED's generation times (longer answers omit them)

_LEN = struct.Struct(">I")

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # Unicode's control characters (category Cc): C0, DEL, C1
_SURROGATE = re.compile("[\ud800-\udfff]")  # (only text from JSON or surrogateescape holds one)


def model_name_problem(name: str) -> str | None:
    """What is wrong with ``name`` as a model name, worded to follow "model " (None: nothing): a lone surrogate
    (no UTF-8 can carry it) or a control character (a NUL or a line break was stored as a KV context no engine
    means, and logged mangled). The one rule wherever a model name enters: REQUEST and KV_FETCH frames (so the
    SDK's own check before sending, :func:`check_outgoing`), the chat ingest's open, a KV put. Lengths stay each
    carrier's own bound."""
    if _SURROGATE.search(name):
        return "is not valid Unicode (a lone surrogate)"
    bad = _CONTROL.search(name)
    if bad:
        return f"must be a name without control characters ({bad.group()!r} at index {bad.start()})"
    return None


class FrameType(IntEnum):
    REQUEST = 1
    STARTED = 2
    TOKENS = 3
    ACK = 4
    FINISHED = 5
    REPAIR = 6
    ERROR = 7
    REPORT = 8
    KV_FETCH = 9
    KV_META = 10
    KV_CHUNK = 11
    KV_ACK = 12
    KV_DONE = 13
    GEN_TIMES = 14


# ---------------------------------------------------------------------------------------------------------
# field validators: each takes the raw decoded value and returns it (possibly normalised) or raises
# ---------------------------------------------------------------------------------------------------------


def _fail(frame: str, key: str, why: str) -> FrameError:
    return FrameError(f"{frame}.{key}: {why}")


def _int(lo: int, hi: int):
    def check(frame: str, key: str, v: Any) -> int:
        if type(v) is not int:  # bool is an int subclass: reject it too
            raise _fail(frame, key, f"expected an integer, got {type(v).__name__}")
        if not lo <= v <= hi:
            raise _fail(frame, key, f"{v} out of range [{lo}, {hi}]")
        return v

    return check


def _bool(frame: str, key: str, v: Any) -> bool:
    if type(v) is not bool:
        raise _fail(frame, key, f"expected a boolean, got {type(v).__name__}")
    return v


def _shown(value: Any, limit: int = 40) -> str:
    """A peer's value inside an error message (which the server logs): escaped by ``repr``, so a newline cannot
    forge a log line, and short, so a 1-MiB key cannot make a 1-MiB one."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _str(max_len: int, choices: tuple[str, ...] | None = None):
    def check(frame: str, key: str, v: Any) -> str:
        if type(v) is not str:
            raise _fail(frame, key, f"expected a string, got {type(v).__name__}")
        if len(v) > max_len:
            raise _fail(frame, key, f"string of {len(v)} characters exceeds {max_len}")
        if choices is not None and v not in choices:
            raise _fail(frame, key, f"{_shown(v)} is not one of {', '.join(choices)}")
        return v

    return check


def _model(frame: str, key: str, v: Any) -> str:
    """A model name: a str of at most MAX_MODEL_CHARS, and :func:`model_name_problem`'s rule."""
    name = _str(MAX_MODEL_CHARS)(frame, key, v)
    problem = model_name_problem(name)
    if problem is not None:
        raise _fail(frame, key, problem)
    return name


def _bytes(min_len: int, max_len: int):
    def check(frame: str, key: str, v: Any) -> bytes:
        if type(v) is not bytes:
            raise _fail(frame, key, f"expected bytes, got {type(v).__name__}")
        if not min_len <= len(v) <= max_len:
            raise _fail(frame, key, f"{len(v)} bytes, expected {min_len}..{max_len}")
        return v

    return check


def _tokens(frame: str, key: str, v: Any) -> list[bytes]:
    if type(v) is not list:
        raise _fail(frame, key, f"expected a list of tokens, got {type(v).__name__}")
    if len(v) > MAX_TOKENS_PER_FRAME:
        raise _fail(frame, key, f"{len(v)} tokens exceed {MAX_TOKENS_PER_FRAME}")
    for tok in v:
        if type(tok) is not bytes or len(tok) > MAX_TOKEN_BYTES:
            raise _fail(frame, key, f"each token must be bytes of at most {MAX_TOKEN_BYTES}")
    return v


def _run(frame: str, key: str, v: Any) -> tuple[int, list[bytes]]:
    if type(v) is not list or len(v) != 2:
        raise _fail(frame, key, "expected [first_index, [tokens]]")
    return _int(0, MAX_INDEX)(frame, key, v[0]), _tokens(frame, key, v[1])


def _int_list(max_items: int, lo: int, hi: int):
    check_int = _int(lo, hi)

    def check(frame: str, key: str, v: Any) -> list[int]:
        if type(v) is not list:
            raise _fail(frame, key, f"expected a list, got {type(v).__name__}")
        if len(v) > max_items:
            raise _fail(frame, key, f"{len(v)} items exceed {max_items}")
        for x in v:
            check_int(frame, key, x)
        return v

    return check


def _messages(frame: str, key: str, v: Any) -> list[dict[str, str]]:
    if type(v) is not list or not v:
        raise _fail(frame, key, "expected a non-empty list of {role, content} messages")
    if len(v) > MAX_MESSAGES:
        raise _fail(frame, key, f"{len(v)} messages exceed {MAX_MESSAGES}")
    total = 0
    for m in v:
        if type(m) is not dict or set(m) != {"role", "content"}:
            raise _fail(frame, key, "each message must be a map with exactly 'role' and 'content'")
        role, content = m["role"], m["content"]
        if type(role) is not str or role not in ("system", "user", "assistant", "tool"):
            raise _fail(frame, key, f"role must be system, user, assistant or tool, got {_shown(role)}")
        if type(content) is not str:
            raise _fail(frame, key, "content must be a string")
        total += len(content)
    if total > MAX_TEXT:
        raise _fail(frame, key, f"{total} characters of messages exceed {MAX_TEXT}")
    return v


def _params(frame: str, key: str, v: Any) -> dict[str, Any]:
    if type(v) is not dict:
        raise _fail(frame, key, "expected a map of generation parameters")
    if len(v) > MAX_PARAMS:
        raise _fail(frame, key, f"{len(v)} parameters exceed {MAX_PARAMS}")
    for k, x in v.items():
        if type(k) is not str or len(k) > 64:
            raise _fail(frame, key, "parameter names must be strings of at most 64 characters")
        if x is not None and type(x) not in (int, float, str, bool):
            raise _fail(frame, key, f"parameter {_shown(k)} must be a number, string, boolean or null")
        if type(x) is str and len(x) > 1024:
            raise _fail(frame, key, f"parameter {_shown(k)} is longer than 1024 characters")
        if type(x) is float and not math.isfinite(x):
            # NaN and infinities have no JSON spelling: an openai upstream was sent "temperature": NaN
            raise _fail(frame, key, f"parameter {_shown(k)} must be a finite number, got {x!r}")
    return v


_u_index = _int(0, MAX_INDEX)
_u_handle = _int(0, MAX_HANDLE)
_u_ts = _int(0, MAX_TIMESTAMP_US)
_version = _int(0, 0xFFFF)


# ---------------------------------------------------------------------------------------------------------
# frames
# ---------------------------------------------------------------------------------------------------------


FieldSpec = dict[str, tuple[str, Any, bool]]


class Frame:
    """Base class. ``FIELDS`` maps wire key -> (attribute, validator, required)."""

    __slots__ = ()
    TYPE: ClassVar[FrameType]
    FIELDS: ClassVar[FieldSpec]

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": int(self.TYPE)}
        for key, (attr, _, _) in self.FIELDS.items():
            value = getattr(self, attr)
            if value is not None:
                out[key] = value
        return out


@dataclass(slots=True)
class Request(Frame):
    """Client -> server, first frame of a request stream."""

    TYPE = FrameType.REQUEST
    messages: list[dict[str, str]] | None = None
    scheme: str = "chatterbox"
    version: int = PROTOCOL_VERSION
    model: str | None = None
    max_tokens: int | None = None
    auth: str | None = None
    resume_id: bytes | None = None
    resume_from: int | None = None
    params: dict[str, Any] | None = None

    FIELDS: ClassVar[FieldSpec] = {
        "v": ("version", _version, True),
        "m": ("messages", _messages, False),
        "s": ("scheme", _str(16, SCHEMES), False),
        "model": ("model", _model, False),
        "mt": ("max_tokens", _int(1, 1_000_000), False),
        "a": ("auth", _str(MAX_AUTH_CHARS), False),
        "rid": ("resume_id", _bytes(REQUEST_ID_BYTES, REQUEST_ID_BYTES), False),
        "rf": ("resume_from", _u_index, False),
        "p": ("params", _params, False),
    }


@dataclass(slots=True)
class Started(Frame):
    """Server -> client: the request is accepted. ``handle`` names it in datagrams of this connection."""

    TYPE = FrameType.STARTED
    handle: int
    request_id: bytes
    scheme: str
    first_index: int = 0
    version: int = PROTOCOL_VERSION

    FIELDS: ClassVar[FieldSpec] = {
        "v": ("version", _version, True),
        "r": ("handle", _u_handle, True),
        "id": ("request_id", _bytes(REQUEST_ID_BYTES, REQUEST_ID_BYTES), True),
        "s": ("scheme", _str(16, SCHEMES), True),
        "i": ("first_index", _u_index, True),
    }


@dataclass(slots=True)
class Tokens(Frame):
    """Token packet: a run of tokens from ``first``, optionally a second run ``extra`` = (first, tokens).

    ``total`` is set once the answer is complete (the final flag, carrying the count). ``sent_us`` is
    the sender's clock at build time, echoed by acks for latency samples.
    """

    TYPE = FrameType.TOKENS
    handle: int
    first: int
    tokens: list[bytes]
    sent_us: int | None = None
    total: int | None = None
    extra: tuple[int, list[bytes]] | None = None

    FIELDS: ClassVar[FieldSpec] = {
        "r": ("handle", _u_handle, True),
        "i": ("first", _u_index, True),
        "k": ("tokens", _tokens, True),
        "s": ("sent_us", _u_ts, False),
        "n": ("total", _u_index, False),
        "x": ("extra", _run, False),
    }

    def runs(self) -> list[tuple[int, list[bytes]]]:
        out = [(self.first, self.tokens)]
        if self.extra is not None:
            out.append((self.extra[0], self.extra[1]))
        return out


@dataclass(slots=True)
class Ack(Frame):
    """Client -> server datagram (UDP-Prague style): cumulative next index and a latency/ECN sample.

    ``ecn`` counts received token packets per ECN codepoint [Not-ECT, ECT(1), ECT(0), CE] (cumulative).
    """

    TYPE = FrameType.ACK
    handle: int
    next_index: int
    echo_us: int | None = None
    recv_us: int | None = None
    ecn: list[int] | None = None

    FIELDS: ClassVar[FieldSpec] = {
        "r": ("handle", _u_handle, True),
        "n": ("next_index", _u_index, True),
        "e": ("echo_us", _u_ts, False),
        "g": ("recv_us", _u_ts, False),
        "c": ("ecn", _int_list(4, 0, MAX_INDEX), False),
    }


@dataclass(slots=True)
class Finished(Frame):
    """Server -> client, reliable, last frame: total count, SHA-256 of the text, generation times.

    ``gen_us`` holds each token's generation time in microseconds after the first token's, delta-coded
    (element i is g_i - g_{i-1}); it lets the client compute its stall ratio. Omitted for huge answers.
    ``first_gen_us`` is token 0's generation time on the sender's clock (meaningful to a client on the
    same host, e.g. benchmarks measuring absolute token delay).
    """

    TYPE = FrameType.FINISHED
    total: int
    digest: bytes
    reason: str = "stop"
    gen_us: list[int] | None = None
    first_gen_us: int | None = None

    FIELDS: ClassVar[FieldSpec] = {
        "n": ("total", _u_index, True),
        "d": ("digest", _bytes(DIGEST_BYTES, DIGEST_BYTES), True),
        "fr": ("reason", _str(32), True),
        "g": ("gen_us", _int_list(MAX_GEN_TIMES, 0, MAX_TIMESTAMP_US), False),
        "t0": ("first_gen_us", _u_ts, False),
    }


@dataclass(slots=True)
class GenTimes(Frame):
    """Server -> client on the request stream, after FINISHED, with ``ALPN_GEN_TIMES`` only: FINISHED's ``g``.

    Apart so that FINISHED stays small: with ~2 KB of times for 600 tokens it made the packet of an answer's last
    tokens too big for the last send slot of a slow path, and those tokens waited a second for the next one. The
    answer (text, digest) is complete at FINISHED; only the statistics wait for this frame. One per token from
    index 0, as FINISHED's ``g``; not sent beyond :data:`MAX_GEN_TIMES` tokens.
    """

    TYPE = FrameType.GEN_TIMES
    gen_us: list[int]

    FIELDS: ClassVar[FieldSpec] = {
        "g": ("gen_us", _int_list(MAX_GEN_TIMES, 0, MAX_TIMESTAMP_US), True),
    }


@dataclass(slots=True)
class Repair(Frame):
    """Client -> server on the request stream: send tokens [first, end) again, reliably on this stream."""

    TYPE = FrameType.REPAIR
    first: int
    end: int

    FIELDS: ClassVar[FieldSpec] = {
        "i": ("first", _u_index, True),
        "j": ("end", _u_index, True),
    }


@dataclass(slots=True)
class Error(Frame):
    """Either direction: a typed error for this request (code from :class:`ErrorCode`)."""

    TYPE = FrameType.ERROR
    code: int
    message: str = ""

    FIELDS: ClassVar[FieldSpec] = {
        "c": ("code", _int(0, (1 << 62) - 1), True),
        "msg": ("message", _str(1024), True),
    }


def _ratio(frame: str, key: str, v: Any) -> float:
    if type(v) not in (float, int) or type(v) is bool or not 0.0 <= v <= 1.0:
        raise _fail(frame, key, "expected a number within [0, 1]")
    return float(v)


@dataclass(slots=True)
class Report(Frame):
    """Client -> server on the request stream, before its FIN: what the reader experienced (for metrics)."""

    TYPE = FrameType.REPORT
    stall_ratio: float | None = None
    longest_stall_ms: int | None = None
    ttft_ms: int | None = None

    FIELDS: ClassVar[FieldSpec] = {
        "sr": ("stall_ratio", _ratio, False),
        "ls": ("longest_stall_ms", _int(0, REPORT_MS_MAX), False),
        "tt": ("ttft_ms", _int(0, REPORT_MS_MAX), False),
    }


# ---------------------------------------------------------------------------------------------------------
# KV channel (ALPN ``tokenwire-kv/1``): fetch on a bidirectional stream, one chunk per unidirectional stream
# ---------------------------------------------------------------------------------------------------------

KV_ALPN = "tokenwire-kv/1"
KV_CONTROLLERS = ("tokenwire", "tokenwire-ewma", "even-split", "fixed-L1", "fixed-L2", "fixed-L3")
KV_LEVELS = ("text", "low", "medium", "high")
MAX_KV_TOKENS = 1 << 17  # token ids in one fetch (128 Ki)
MAX_KV_CHUNKS = 4096
MAX_TOKEN_ID = (1 << 31) - 1  # a token id: int32 on the text level's wire (and at ingest)
MAX_GEOMETRY = 65535  # each of a KV_META's layers, kv heads and head_dim
MAX_FINGERPRINT = (1 << 64) - 1  # a model fingerprint (uint64)
CHUNK_HASH_BYTES = 16
MAX_KV_CHUNK_BYTES = 1 << 30  # payload bytes announced by one KV_CHUNK header
MAX_DEADLINE_MS = 3_600_000
MAX_RECOMPUTE_US = 10_000_000  # per token: 10 s, far beyond any engine's prefill
# a client's measured decode rate, KV elements per second: 1,000 (a 1-M-element chunk in 17 min) to 10^12 (far
# beyond any codec), so the server's decode times stay finite and its plan's sums free of NaN
MIN_DECODE_RATE = 1e3
MAX_DECODE_RATE = 1e12


def _decode_rate(frame: str, key: str, v: Any) -> float:
    if type(v) not in (int, float) or not MIN_DECODE_RATE <= v <= MAX_DECODE_RATE:  # (NaN fails the range too)
        raise _fail(frame, key, f"expected a decode rate in [{MIN_DECODE_RATE:g}, {MAX_DECODE_RATE:g}] "
                                f"elements/s, got {v!r}")
    return float(v)


def _hash_list(frame: str, key: str, v: Any) -> list[bytes]:
    if type(v) is not list or not v:
        raise _fail(frame, key, "expected a non-empty list of chunk hashes")
    if len(v) > MAX_KV_CHUNKS:
        raise _fail(frame, key, f"{len(v)} chunk hashes exceed {MAX_KV_CHUNKS}")
    for h in v:
        if type(h) is not bytes or len(h) != CHUNK_HASH_BYTES:
            raise _fail(frame, key, f"each chunk hash must be {CHUNK_HASH_BYTES} bytes")
    return v


def _geometry(frame: str, key: str, v: Any) -> list[int]:
    if type(v) is not list or len(v) != 3:
        raise _fail(frame, key, "expected [layers, kv_heads, head_dim]")
    for x in v:
        _int(1, MAX_GEOMETRY)(frame, key, x)
    return v


def _level_list(frame: str, key: str, v: Any) -> list[str]:
    if type(v) is not list or len(v) > MAX_KV_CHUNKS:
        raise _fail(frame, key, f"expected a list of at most {MAX_KV_CHUNKS} levels")
    for x in v:
        _str(8, KV_LEVELS)(frame, key, x)
    return v


@dataclass(slots=True)
class KvFetch(Frame):
    """Client -> server, first frame of a KV fetch stream: a context by token ids or by chunk hashes.

    ``recompute_us_per_token`` is the client engine's prefill cost (it decides when text beats KV);
    ``controller`` selects a level policy (baselines for evaluation; ``tokenwire`` by default); ``prefix``
    asks for the longest stored prefix when the whole context is not stored (a conversation's next turn).
    ``decode_elements_per_s`` is the client's measured decode rate (the server plans each chunk's decode with
    it); a client sends it only to a server that negotiated ``KV_ALPN_DECODE_RATE`` (kv_protocol), since older
    servers refuse any field they do not know.
    """

    TYPE = FrameType.KV_FETCH
    model: str
    deadline_ms: int
    token_ids: list[int] | None = None
    hashes: list[bytes] | None = None
    controller: str = "tokenwire"
    recompute_us_per_token: int | None = None
    auth: str | None = None
    prefix: bool | None = None
    decode_elements_per_s: float | None = None
    version: int = PROTOCOL_VERSION

    FIELDS: ClassVar[FieldSpec] = {
        "v": ("version", _version, True),
        "model": ("model", _model, True),
        "dl": ("deadline_ms", _int(1, MAX_DEADLINE_MS), True),
        "ids": ("token_ids", _int_list(MAX_KV_TOKENS, 0, MAX_TOKEN_ID), False),
        "hs": ("hashes", _hash_list, False),
        "ctl": ("controller", _str(32, KV_CONTROLLERS), False),
        "rc": ("recompute_us_per_token", _int(0, MAX_RECOMPUTE_US), False),
        "a": ("auth", _str(MAX_AUTH_CHARS), False),
        "px": ("prefix", _bool, False),
        "dr": ("decode_elements_per_s", _decode_rate, False),
    }


@dataclass(slots=True)
class KvMeta(Frame):
    """Server -> client on the fetch stream: what will arrive (chunk count and sizes, KV geometry)."""

    TYPE = FrameType.KV_META
    chunks: int
    chunk_tokens: int
    tokens: int
    geometry: list[int]
    fingerprint: int
    dtype: str

    FIELDS: ClassVar[FieldSpec] = {
        "n": ("chunks", _int(1, MAX_KV_CHUNKS), True),
        "ct": ("chunk_tokens", _int(1, MAX_CHUNK_TOKENS), True),
        "tok": ("tokens", _int(1, MAX_KV_TOKENS * 8), True),
        "geo": ("geometry", _geometry, True),
        "fp": ("fingerprint", _int(0, MAX_FINGERPRINT), True),
        "dt": ("dtype", _str(16, ("float16", "bfloat16", "float32")), True),
    }


@dataclass(slots=True)
class KvChunk(Frame):
    """Server -> client, first frame of a unidirectional stream; ``size`` raw payload bytes follow, then FIN.

    The payload is one self-contained CacheGen bitstream, or for ``level == "text"`` the chunk's token ids
    as little-endian int32. ``crc`` is the CRC-32 of the payload.
    """

    TYPE = FrameType.KV_CHUNK
    fetch: int
    index: int
    level: str
    size: int
    crc: int
    tokens: int
    sent_us: int | None = None

    FIELDS: ClassVar[FieldSpec] = {
        "r": ("fetch", _u_handle, True),
        "i": ("index", _int(0, MAX_KV_CHUNKS - 1), True),
        "lv": ("level", _str(8, KV_LEVELS), True),
        "n": ("size", _int(0, MAX_KV_CHUNK_BYTES), True),
        "crc": ("crc", _int(0, (1 << 32) - 1), True),
        "tk": ("tokens", _int(1, MAX_CHUNK_TOKENS), True),
        "s": ("sent_us", _u_ts, False),
    }


@dataclass(slots=True)
class KvAck(Frame):
    """Client -> server on the fetch stream: chunk ``index`` fully received (client clock, for throughput)."""

    TYPE = FrameType.KV_ACK
    index: int
    size: int
    first_us: int
    done_us: int
    ecn: list[int] | None = None  # received packets per codepoint, cumulative (CE feedback for Prague)

    FIELDS: ClassVar[FieldSpec] = {
        "i": ("index", _int(0, MAX_KV_CHUNKS - 1), True),
        "n": ("size", _int(0, MAX_KV_CHUNK_BYTES), True),
        "f": ("first_us", _u_ts, True),
        "d": ("done_us", _u_ts, True),
        "c": ("ecn", _int_list(4, 0, MAX_INDEX), False),
    }


@dataclass(slots=True)
class KvDone(Frame):
    """Server -> client on the fetch stream: every chunk stream has been written (levels in index order)."""

    TYPE = FrameType.KV_DONE
    chunks: int
    levels: list[str]

    FIELDS: ClassVar[FieldSpec] = {
        "n": ("chunks", _int(1, MAX_KV_CHUNKS), True),
        "lv": ("levels", _level_list, True),
    }



FRAME_CLASSES: dict[int, type[Frame]] = {
    int(cls.TYPE): cls
    for cls in (Request, Started, Tokens, Ack, Finished, Repair, Error, Report, KvFetch, KvMeta, KvChunk, KvAck,
                KvDone, GenTimes)
}

# the longest array any frame carries (a FINISHED's or GEN_TIMES's times; a KV_FETCH's ids next): the decoder's
# bound on one array header's claim, before the field checks hold each list to its own bound
MAX_ARRAY_ITEMS = max(MAX_GEN_TIMES, MAX_KV_TOKENS, MAX_TOKENS_PER_FRAME, MAX_KV_CHUNKS, MAX_MESSAGES)


def _post_validate(frame: Frame) -> None:
    """Cross-field checks that single-field validators cannot express."""
    if isinstance(frame, Request):  # (its version is checked first, in decode_frame)
        if (frame.resume_from is not None) != (frame.resume_id is not None):
            raise FrameError("request: resume_from and resume id must come together")
        if frame.messages is None and frame.resume_id is None:
            raise FrameError("request: messages are required unless resuming an existing request")
    elif isinstance(frame, KvFetch):
        if (frame.token_ids is None) == (frame.hashes is None):
            raise FrameError("kvfetch: exactly one of token ids and chunk hashes is required")
        if frame.token_ids is not None and not frame.token_ids:
            raise FrameError("kvfetch: empty token id list")
    elif isinstance(frame, KvAck):
        if frame.done_us < frame.first_us:
            raise FrameError("kvack: done before first byte")
    elif isinstance(frame, KvDone):
        if len(frame.levels) != frame.chunks:
            raise FrameError("kvdone: one level per chunk")
    elif isinstance(frame, Started):
        if frame.version != PROTOCOL_VERSION:
            raise UnsupportedVersion(f"protocol version {frame.version} is not supported (this peer speaks 1)")
    elif isinstance(frame, Repair):
        if frame.end <= frame.first:
            raise FrameError(f"repair: empty range [{frame.first}, {frame.end})")
    elif isinstance(frame, Tokens):
        end = frame.first + len(frame.tokens)
        if frame.extra is not None and frame.extra[0] < end:
            raise FrameError("tokens: the extra run must start after the main run")
        if end > MAX_INDEX or (frame.extra is not None and frame.extra[0] + len(frame.extra[1]) > MAX_INDEX):
            raise FrameError("tokens: run extends past the largest index")


# ---------------------------------------------------------------------------------------------------------
# encode / decode
# ---------------------------------------------------------------------------------------------------------

_packer = msgpack.Packer(use_bin_type=True, autoreset=True)


def encode_frame(frame: Frame) -> bytes:
    """Encode one frame (no length prefix)."""
    wire = frame.to_wire()
    if isinstance(frame, Tokens) and frame.extra is not None:
        wire["x"] = [frame.extra[0], frame.extra[1]]
    return _packer.pack(wire)


# the largest TOKENS datagram that carries one token: a peer whose max_datagram_frame_size cannot take it gets
# the stream scheme (a chatterbox answer to a peer allowing 16-byte datagrams arrived all at once, by REPAIR)
MIN_TOKENS_DATAGRAM = len(encode_frame(Tokens(handle=MAX_HANDLE, first=MAX_INDEX - 1,
                                              tokens=[bytes(MAX_TOKEN_BYTES)], sent_us=MAX_TIMESTAMP_US,
                                              total=MAX_INDEX)))
# ...and the largest ACK datagram, a client's (below it, its acks would silently never leave)
MIN_ACK_DATAGRAM = len(encode_frame(Ack(handle=MAX_HANDLE, next_index=MAX_INDEX, echo_us=MAX_TIMESTAMP_US,
                                        recv_us=MAX_TIMESTAMP_US, ecn=[MAX_INDEX] * 4)))


def encode_stream_frame(frame: Frame) -> bytes:
    """Encode one frame with its 4-byte length prefix, for QUIC streams."""
    body = encode_frame(frame)
    return _LEN.pack(len(body)) + body


def _map_without_duplicates(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A msgpack map as a dict, refusing a key that appears twice: the last copy won, while a decoder that keeps
    the first (common in other languages) read ``{"t": 6, ..., "t": 1}`` as another frame than this one did."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[Any] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"the key {_shown(twice)} appears twice in one map")
    return out


def _items_present(data: bytes) -> None:
    """Walks ``data``'s first object without building it (msgpack's skip allocates nothing): OutOfData when a
    header claims more than the frame holds, StackError when nested too deeply."""
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(data), 1))
    unpacker.feed(data)
    unpacker.skip()


def decode_frame(data: bytes, *, max_size: int = MAX_STREAM_FRAME) -> Frame:
    """Decode and validate one frame. Raises :class:`FrameError` (or a subclass) on any bad input, and
    :class:`UnsupportedVersion` for a well-formed REQUEST or KV_FETCH of another protocol version (its own
    error code, so that a peer can tell "upgrade" from "broken"); both are :class:`ProtocolError`."""
    if len(data) > max_size:
        raise FrameTooLarge(f"frame of {len(data)} bytes exceeds the limit of {max_size}")
    try:
        # First a pass that builds nothing: msgpack allocates an array's list when it reads its header, so a
        # 5,000-byte frame of 1,000 nested headers each claiming 200,000 items cost 62 ms and 65 MiB before the
        # bytes ran out. Every item takes a byte at least, so once the claims are known to be present, what the
        # decode below allocates is bounded by the frame's size. Only a frame with an array16/array32 header byte
        # somewhere can claim more than 15 items per array (a fixarray's most): the pass cost a TOKENS datagram
        # 1 us of its 4.5, and the byte scan is C speed.
        if b"\xdc" in data or b"\xdd" in data:
            _items_present(data)
        wire = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_bin_len=max_size,
            max_str_len=max_size,
            max_array_len=min(MAX_ARRAY_ITEMS, len(data)),
            max_map_len=64,
            max_ext_len=0,
            object_pairs_hook=_map_without_duplicates,
        )
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        # msgpack's StackError and FormatError carry no text: the peer read "StackError: " and nothing more
        why = str(exc) or ("nested too deeply" if isinstance(exc, msgpack.StackError) else
                           "an invalid type byte" if isinstance(exc, msgpack.FormatError) else "no detail given")
        if isinstance(exc, msgpack.OutOfData):
            why = "it ends inside a value (a header claims more items or bytes than follow it)"
        raise FrameError(f"not a valid msgpack frame: {exc.__class__.__name__}: {why}") from None
    if type(wire) is not dict:
        raise FrameError(f"a frame must be a msgpack map, got {type(wire).__name__}")
    t = wire.pop("t", None)
    if type(t) is not int:
        raise FrameError("frame has no integer type field 't'")
    cls = FRAME_CLASSES.get(t)
    if cls is None:
        raise FrameError(f"unknown frame type {t}")
    name = cls.__name__.lower()
    version = wire.get("v")
    if cls in (Request, KvFetch) and type(version) is int and version != PROTOCOL_VERSION:
        # before the field checks: another version's REQUEST or KV_FETCH may well have fields this one lacks,
        # and "upgrade" must not read as "malformed"
        raise UnsupportedVersion(f"protocol version {version} is not supported (this peer speaks {PROTOCOL_VERSION})")
    unknown = set(wire) - set(cls.FIELDS)
    if unknown:
        shown = [_shown(k) for k in sorted(unknown, key=str)[:5]]
        raise FrameError(f"{name}: unknown field(s) {', '.join(shown)}{' ...' if len(unknown) > 5 else ''}")
    kwargs: dict[str, Any] = {}
    for key, (attr, check, required) in cls.FIELDS.items():
        if key in wire:
            kwargs[attr] = check(name, key, wire[key])
        elif required:
            raise FrameError(f"{name}: missing required field {key!r}")
    frame = cls(**kwargs)
    _post_validate(frame)
    return frame



def check_outgoing(frame: Frame, what: str) -> None:
    """``ValueError`` when the peer's decoder would refuse ``frame``: its own check, run before sending.

    A server answers a malformed request or fetch by closing the whole connection, and every other request
    on it dies too; the SDK's clients refuse such a frame locally instead. (A well-formed request over the
    server's own size limit is refused alone: the client cannot know that limit.)
    """
    try:
        data = encode_frame(frame)
    except UnicodeEncodeError as exc:  # a lone surrogate (bytes decoded with surrogateescape)
        raise ValueError(f"invalid {what}: its text is not valid Unicode ({exc.reason} at position "
                         f"{exc.start})") from None
    except (TypeError, OverflowError, ValueError) as exc:  # msgpack: an object it has no encoding for
        raise ValueError(f"invalid {what}: cannot encode it ({exc}); params take numbers, strings, booleans "
                         "and null") from None
    try:
        decode_frame(data)
    except FrameError as exc:
        raise ValueError(f"invalid {what}: {exc}") from None

def decode_datagram(data: bytes) -> Frame:
    """Decode a DATAGRAM payload: one frame of a type that may travel in datagrams."""
    frame = decode_frame(data, max_size=MAX_DATAGRAM_FRAME)
    if not isinstance(frame, Tokens | Ack):
        raise FrameError(f"{type(frame).__name__.lower()} frames may not travel in datagrams")
    return frame


@dataclass
class StreamDecoder:
    """Sans-I/O reassembly of length-prefixed frames from a QUIC stream's bytes.

    Rejects an oversized frame as soon as its length prefix arrives, before buffering its body.
    """

    max_frame: int = MAX_STREAM_FRAME
    _buf: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while len(self._buf) >= 4:
            (length,) = _LEN.unpack_from(self._buf)
            if length > self.max_frame:
                exc = FrameTooLarge(f"stream frame of {length} bytes exceeds the limit of {self.max_frame}")
                exc.decoded = frames  # what preceded it in this read: a request then a huge frame is no big request
                raise exc
            if len(self._buf) < 4 + length:
                break
            body = bytes(self._buf[4 : 4 + length])
            del self._buf[: 4 + length]
            try:
                frames.append(decode_frame(body, max_size=self.max_frame))
            except UnsupportedVersion as exc:
                exc.decoded = frames  # as above: only a stream's first frame may be refused alone for its version
                raise
        return frames

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet form a whole frame (a truncated frame at stream end)."""
        return len(self._buf)

    @property
    def expected(self) -> int | None:
        """The size of the frame being received, once its length prefix has come (None before)."""
        return _LEN.unpack_from(self._buf)[0] if len(self._buf) >= 4 else None


def token_cost(tok: bytes) -> int:
    """Bytes one token adds to an encoded token list (msgpack bin header + body)."""
    n = len(tok)
    return n + (2 if n < 256 else 3)


def array_header_cost(count: int) -> int:
    return 1 if count < 16 else (3 if count < 65536 else 5)
