"""Property tests for the decoders that read what others wrote and had no generated tests: the ingest socket's
lines, an OpenAI upstream's event stream and error bodies, stored KV chunk metadata, netns trace files and the
daemon's configuration. Each property is the same: a valid object or the module's own typed error, never
another exception (an untyped one is a traceback in the daemon, a dropped connection, or a context that can
never be stored again). Example counts are small: the s33 fuzz probe ran the long campaigns."""

from __future__ import annotations

import copy
import json
import math
import re
import tomllib
from pathlib import Path

import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzzing import examples
from tokenwire.daemon import ingest
from tokenwire.daemon import upstream_openai as oai
from tokenwire.daemon.config import ConfigError, parse_config
from tokenwire.daemon.kv_meta import ChunkMeta
from tokenwire.daemon.transcripts import TranscriptStore
from tokenwire.testbed.trace import MAX_STAMP_MS, TraceError, load_trace
from tokenwire.transport.errors import RequestError
from tokenwire.transport.kv_channel import KVError

ROOT = Path(__file__).resolve().parent.parent
QUICK = settings(max_examples=examples(300), deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# values of every JSON / msgpack type, the awkward ones over-represented
ODD = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
    st.sampled_from([math.inf, -math.inf, math.nan, -0.0, 2**63, -1, 0, "", "\x00", "\ud800", "x" * 200]),
    st.text(max_size=12), st.lists(st.integers(-3, 300), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


# ------------------------------------------------------------------------------------ the ingest socket's lines
_OPS = st.sampled_from(["open", "push", "finish", "fail", "nope", ""]) | ODD
_MESSAGE = st.fixed_dictionaries({"op": _OPS}, optional={
    "id": st.sampled_from(["<last>", "0" * 32, "ab" * 16, " " + "ab" * 16]) | ODD,
    "text": st.text(max_size=80) | ODD, "reason": st.text(max_size=40) | ODD, "message": ODD,
    "max_tokens": st.integers(-5, 200) | ODD, "model": ODD, "principal": ODD,
})
_LINE = st.one_of(
    _MESSAGE,
    st.sampled_from([b"", b"[]", b"null", b"1e999", b"NaN", b'{"op": "open", "op": 1}', b"{" * 3000, b"9" * 5000,
                     b'"\\ud800"', b"\xff\xfe{", b'{"op": "push", "text": "\\udfff"}']),
    st.binary(max_size=40),
)


@QUICK
@given(st.lists(st.tuples(st.integers(0, 1), _LINE), max_size=20))
def test_ingest_lines_get_a_reply_or_a_reason_and_leave_nothing_behind(session) -> None:
    store = TranscriptStore(max_bytes=100_000, retain_s=60)
    api = ingest.IngestAPI(store, max_tokens=lambda: 40, max_open=3, stall_timeout_s=5)
    conns = [ingest.IngestConnection(), ingest.IngestConnection()]
    ids: list[str] = []
    now = 100.0
    for which, item in session:
        now += 1
        if isinstance(item, bytes):
            line = item
        else:
            msg = dict(item)
            if msg.get("id") == "<last>":
                msg["id"] = ids[-1] if ids else "1" * 32
            try:
                line = json.dumps(msg).encode("utf-8", "surrogatepass")
            except ValueError:  # (NaN is allowed by json.dumps; only a key it cannot write lands here)
                continue
        decoded, why = ingest._decoded(line)
        if why is not None:
            assert decoded is None and isinstance(why, str)
            continue
        reply = api.handle(decoded, conns[which], now)
        assert type(reply.get("ok")) is bool
        json.dumps(reply, allow_nan=False).encode("utf-8")  # what the socket writes back must encode
        if reply["ok"] and "id" in reply:
            ids.append(reply["id"])
        assert len(conns[which].open) <= 3
    for conn in conns:
        api.disconnected(conn, now + 1)
    assert api.live_count == 0 and store.live_bytes == 0


# --------------------------------------------------------------------------- an OpenAI upstream's event stream
class _Named:
    name = "up"


_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["choices", "delta", "message", "content", "finish_reason", "index", "error", "object",
                         "detail", "msg", "loc", "reasoning"]) | st.text(max_size=4), inner, max_size=3),
    max_leaves=15)
_CHOICE = st.fixed_dictionaries({}, optional={
    "index": st.just(0) | _JSON, "delta": st.fixed_dictionaries({}, optional={"content": st.text(max_size=10) | _JSON})
    | _JSON, "message": _JSON, "finish_reason": st.sampled_from(["stop", "length", None]) | _JSON})
_CHUNK = st.fixed_dictionaries({}, optional={"choices": st.lists(_CHOICE, max_size=2) | _JSON, "error": _JSON,
                                             "object": st.sampled_from(["error", "chunk"])})
_SSE_LINE = st.one_of(
    _CHUNK.map(lambda d: b"data: " + json.dumps(d).encode()),
    st.sampled_from([b"data: [DONE]", b"", b": keep-alive", b"event: error", b"event: message", b"data:", b"id: 7",
                     b"retry: 10", oai.BOM, b'data: {"choices":', b"data: [{]", b"data: \x1b[2J\x00"]),
    st.binary(max_size=24),
)
_END = st.sampled_from([b"\n", b"\r\n", b"\r", b"\n\n", b"\r\n\r\n"])


def _events(pieces: list[bytes]) -> list[tuple[str, str]]:
    stream = oai._EventStream(1 << 14)
    out: list[tuple[str, str]] = []
    for piece in pieces:
        out += stream.feed(piece)
    return out + stream.end()


@QUICK
@given(st.lists(st.tuples(_SSE_LINE, _END), max_size=10), st.lists(st.integers(1, 30), max_size=12))
def test_an_event_stream_parses_alike_however_it_is_cut_and_every_event_is_read_or_refused(lines, cuts) -> None:
    body = b"".join(line + end for line, end in lines)
    pieces, at = [], 0
    for n in cuts:
        pieces.append(body[at : at + n])
        at += n
    pieces.append(body[at:])
    try:
        whole = _events([body])
    except oai._TooLong:
        return
    assert _events(pieces) == whole
    for kind, value in whole:
        value = value.strip()
        if kind == "error":
            assert oai._error_text(value, ()).isprintable()
            continue
        if value == "[DONE]":
            continue
        try:
            doc = oai.OpenAIUpstream._document(_Named(), value.replace("\n", ""), "event", ())  # type: ignore[arg-type]
            picked = oai.OpenAIUpstream._choice_zero(_Named(), doc)  # type: ignore[arg-type]
        except RequestError as exc:
            assert str(exc).isprintable()  # (the upstream's words too: made printable)
            continue
        for content, finish, _ in picked:
            assert content is None or type(content) is str
            assert finish is None or type(finish) is str


@QUICK
@given(st.one_of(_JSON.map(json.dumps), _CHUNK.map(json.dumps), st.text(max_size=120)))
def test_an_error_body_or_answer_is_printable_text_or_a_request_error(text) -> None:
    said = oai._error_text(text, ("sk-secret-key",))
    assert type(said) is str and said.isprintable() and len(said) <= 300 and "sk-secret-key" not in said
    for key, what in (("message", "answer"), ("delta", "event")):
        try:
            doc = oai.OpenAIUpstream._document(_Named(), text, what, ())  # type: ignore[arg-type]
            picked = oai.OpenAIUpstream._choice_zero(_Named(), doc, key)  # type: ignore[arg-type]
        except RequestError:
            continue
        assert all(finish is None or type(finish) is str for _, finish, _ in picked)


# ----------------------------------------------------------------------------------- stored KV chunk metadata
_GOOD_META = {"m": "model", "fp": 5, "g": [2, 4, 16], "dt": "float16", "i": 1, "ids": [7, 8, 9], "src": bytes(24)}


@QUICK
@given(st.dictionaries(st.sampled_from([*_GOOD_META, "extra"]), ODD | st.binary(max_size=30), max_size=3),
       st.lists(st.sampled_from(list(_GOOD_META)), max_size=2))
def test_chunk_metadata_is_read_within_the_wire_bounds_or_is_a_kv_error(patch, dropped) -> None:
    doc = {**_GOOD_META, **patch}
    for key in dropped:
        doc.pop(key, None)
    try:
        data = msgpack.packb(doc)
    except (OverflowError, TypeError, ValueError):  # (nothing msgpack can write: no store holds it)
        return
    try:
        meta = ChunkMeta.unpack(data)
    except KVError:
        return
    assert type(meta.model) is str and 1 <= len(meta.model) <= 128
    assert type(meta.fingerprint) is int and 0 <= meta.fingerprint < 2**64
    assert all(type(x) is int and 1 <= x <= 65535 for x in (meta.layers, meta.heads, meta.head_dim))
    assert type(meta.index) is int and 0 <= meta.index < 4096
    assert meta.token_ids and all(type(t) is int and 0 <= t < 2**31 for t in meta.token_ids)
    assert ChunkMeta.unpack(meta.pack()) == meta


@QUICK
@given(st.binary(max_size=60))
def test_any_bytes_as_chunk_metadata_are_read_or_a_kv_error(data) -> None:
    try:
        ChunkMeta.unpack(data)
    except KVError:
        pass


# ---------------------------------------------------------------------------------------------- trace files
_TRACE_LINE = st.one_of(
    st.integers(0, 10**6).map(str), st.integers(-5, 10**20).map(str),
    st.sampled_from(["", " ", "\t12 ", "1_0", "+5", "0x10", "1e3", "5.0", "-0", "٣", "12 13", "\x00", "\x0c7\r",
                     str(MAX_STAMP_MS), str(MAX_STAMP_MS + 1)]),
    st.text(alphabet="0123456789 _+-\t\r", max_size=8),
)


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("traces")


@QUICK
@given(st.lists(_TRACE_LINE, max_size=12))
def test_a_trace_file_loads_as_its_plain_digits_or_is_a_trace_error(trace_dir, lines) -> None:
    path = trace_dir / "t.trace"
    text = "\n".join(lines) + "\n"
    try:
        path.write_bytes(text.encode("utf-8"))  # (bytes: write_text would turn each "\n" into os.linesep)
    except UnicodeEncodeError:
        return
    try:
        trace = load_trace(str(path))
    except TraceError as exc:
        assert str(exc).startswith(str(path))
        return
    stamps = list(trace.stamps_ms)
    # accepted: every line blank or plain decimal digits, in order, and those digits are the stamps
    # (lines as the loader reads them: "\n", "\r\n" and a lone "\r" each end one, as universal newlines do)
    kept = [line.strip() for line in re.split(r"\r\n|\r|\n", text) if line.strip()]
    assert all(x.isascii() and x.isdigit() for x in kept)
    assert stamps == [int(x) for x in kept] == sorted(stamps) and stamps[-1] > 0


# ------------------------------------------------------------------------------------------ the configuration
_BASE = tomllib.loads((ROOT / "systemd" / "tokenwire.toml.example").read_text())


def _paths(node: object, at: tuple = ()) -> list[tuple]:
    out: list[tuple] = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        out.append((*at, key))
        out += _paths(child, (*at, key))
    return out


_EDIT = st.tuples(st.sampled_from(_paths(_BASE)), st.sampled_from(["set", "drop", "wrap-list", "wrap-map"]),
                  ODD | st.sampled_from(["127.0.0.1:0", "[::]:99999", "host:", "unix:/x", "*"]))


@settings(QUICK, max_examples=examples(200))
@given(st.lists(_EDIT, min_size=1, max_size=3))
def test_an_edited_configuration_parses_or_is_a_config_error(edits) -> None:
    doc = copy.deepcopy(_BASE)
    for path, how, value in edits:
        node: object = doc
        try:
            for key in path[:-1]:
                node = node[key]  # type: ignore[index]
            key = path[-1]
            if how == "set":
                node[key] = value  # type: ignore[index]
            elif how == "drop":
                del node[key]  # type: ignore[attr-defined]
            elif how == "wrap-list":
                node[key] = [node[key]]  # type: ignore[index]
            else:
                node[key] = {"x": node[key]}  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            pass  # (an earlier edit removed or replaced what this one names)
    try:
        parse_config(doc, None, tls_may_be_missing=True)
    except ConfigError as exc:
        assert str(exc)


def test_the_example_configuration_parses() -> None:
    parse_config(copy.deepcopy(_BASE), None, tls_may_be_missing=True)
