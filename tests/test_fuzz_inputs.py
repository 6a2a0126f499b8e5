"""Property tests of the inputs without a generated test before: a KV ingest header, an ``llm serve`` request
body, an upstream's declared charset, the configuration file as bytes, a bearer token, ONNX model metadata, a
predictor dataset, rates and trace specs, and the loss, queue and cross-traffic grammars. Each property: a result,
or the path's own typed error (what the caller turns into a reply, an exit status or a refused reload), never
another exception; what is taken is usable (finite numbers, valid Unicode). tests/test_fuzz_decoders_s33.py has
the ingest lines, the upstream event stream, KV chunk metadata, trace files and the parsed configuration."""

from __future__ import annotations

import encodings.aliases
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzzing import ODD, examples, mutated
from tokenwire.daemon import kv_ingest
from tokenwire.daemon.config import AuthConfig, ConfigError, TokenEntry, hash_token, load_config
from tokenwire.daemon.kv_meta import KVIngestError, _check_context, _check_prewarm
from tokenwire.daemon.llm_server import BadRequest, parse_chat_request
from tokenwire.daemon.upstream_openai import _body_start
from tokenwire.predictor import dataset, runtime
from tokenwire.predictor.crossspec import CrossSpecError
from tokenwire.predictor.crossspec import parse_cross_spec as predictor_cross
from tokenwire.predictor.onnx_session import ModelError
from tokenwire.testbed.loss import LossSpecError, parse_loss
from tokenwire.testbed.queues import QueueSpecError, parse_queue
from tokenwire.testbed.sim import cross_problem
from tokenwire.testbed.swiftqueue_eval import SwiftQueueEvalError, parse_cross_spec, parse_flow_spec
from tokenwire.testbed.trace import TraceError, generator_bps, parse_rate, trace_from_spec
from tokenwire.testbed.traffic import parse_cross

pytestmark = pytest.mark.fuzz

ROOT = Path(__file__).resolve().parent.parent
# (the tests writing a file take tmp_path: the same file for every example, rewritten)
FEW = settings(max_examples=examples(60), deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _json_bytes(doc: Any) -> bytes:
    """``doc`` as a JSON line as a client could send it (lone surrogates included), or ``{}`` if it has no JSON."""
    try:
        return json.dumps(doc).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError):
        return b"{}"


def _patched(good: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """``good`` with up to 3 keys set to odd values (or an unknown key added) and up to 2 dropped."""
    def apply(edit: tuple[dict[str, Any], list[str]]) -> dict[str, Any]:
        doc = {**good, **edit[0]}
        for key in edit[1]:
            doc.pop(key, None)
        return doc
    values = ODD | st.lists(st.integers(-2, 2**40), max_size=6)
    return st.tuples(st.dictionaries(st.sampled_from([*good, "x"]), values, max_size=3),
                     st.lists(st.sampled_from(list(good)), max_size=2)).map(apply)


# ------------------------------------------------------------------------------------------ KV ingest header
_GOOD_PUT = {"op": "put", "model": "m", "token_ids": [1, 2, 3], "shape": [2, 2, 1, 3, 8], "dtype": "float16",
             "fingerprint": 7, "prewarm": ["low"], "scope": "a"}


@FEW
@given(st.one_of(_patched(_GOOD_PUT).map(_json_bytes), mutated(json.dumps(_GOOD_PUT).encode(), 4),
                 st.binary(max_size=40),
                 st.sampled_from([b"[" * 100_000, b"9" * 5000, b'{"shape": [' + b"1e308," * 4 + b"1e308]}",
                                  b'{"shape": [' + b",".join([b"99999999999999999999"] * 5) + b"]}"])))
def test_a_kv_ingest_header_is_read_and_checked_or_is_a_kv_ingest_error(line: bytes) -> None:
    """The checks a KV put's header goes through before its body is read: each refuses with a message."""
    try:
        msg = kv_ingest._parse_header(line)
        if not isinstance(msg, dict):
            return
        shape = msg.get("shape")
        if isinstance(shape, list):
            kv_ingest._body_bytes(shape, 2)
        ids = msg.get("token_ids")
        _check_context(msg.get("model"), ids if isinstance(ids, list) else [], msg.get("fingerprint"), 256)
        _check_prewarm(msg.get("prewarm", []))
    except KVIngestError as exc:
        assert str(exc)


# ------------------------------------------------------------------------------------------ llm serve request
_GOOD_CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 10,
              "temperature": 0.7, "top_p": 0.9, "stop": ["x"], "seed": 1, "presence_penalty": 0.1,
              "frequency_penalty": 0.0, "stream_options": {"include_usage": True}, "n": 1, "logprobs": False,
              "tools": [], "response_format": {"type": "text"}, "max_completion_tokens": 5, "user": "u"}
_SURROGATES = st.text(st.characters(categories=["Cs", "Ll", "Lu", "Nd", "Zs", "Po"]), max_size=10)
_MESSAGE = st.fixed_dictionaries({
    "role": st.sampled_from(["user", "system", "assistant", "tool", ""]) | ODD,
    "content": _SURROGATES | ODD | st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url"]) | ODD, "text": ODD}), max_size=2)})


def _as_request_json(doc: Any) -> Any:
    """What aiohttp's ``request.json()`` can hand over: JSON values only (NaN and lone surrogates included)."""
    try:
        return json.loads(json.dumps(doc))
    except (TypeError, ValueError, RecursionError):
        return {}


_CHAT_EDITS = st.tuples(
    st.dictionaries(st.sampled_from(list(_GOOD_CHAT)), _SURROGATES | ODD | st.lists(ODD | _MESSAGE, max_size=3),
                    max_size=4),
    st.lists(st.sampled_from(list(_GOOD_CHAT)), max_size=2))


@FEW
@given(st.one_of(_CHAT_EDITS.map(lambda e: {k: v for k, v in {**_GOOD_CHAT, **e[0]}.items() if k not in e[1]}),
                 ODD).map(_as_request_json))
def test_a_chat_request_body_is_usable_params_or_a_bad_request(body: Any) -> None:
    """A BadRequest is the 400; anything else was a 500, or a stream cut after its 200 (a lone surrogate reached
    the tokenizer). What is taken has finite numbers and UTF-8 text."""
    try:
        params = parse_chat_request(body)
    except BadRequest as exc:
        assert str(exc)
        return
    json.dumps(vars(params), default=str, allow_nan=False)
    for message in params.messages:
        message["content"].encode("utf-8")
    if params.model is not None:
        params.model.encode("utf-8")


# every codec name Python knows (and its aliases), as an upstream's Content-Type may declare any; or any text a
# header value can carry (no control characters: the HTTP parser refuses them; a NUL made bytes.decode raise a
# ValueError), lone surrogates included (aiohttp decodes a header's bytes with surrogateescape)
_CHARSETS = sorted(set(encodings.aliases.aliases) | set(encodings.aliases.aliases.values()))
_HEADER_TEXT = st.text(st.characters(exclude_categories=["Cc"]), max_size=12)


@settings(max_examples=examples(100), deadline=None)
@given(st.binary(max_size=60) | st.just('{"error": {"message": "busy é"}}'.encode()),
       st.none() | st.sampled_from(_CHARSETS) | st.sampled_from(["IDNA", "utf_8", "x-unknown"]) | _HEADER_TEXT)
def test_an_upstream_body_in_any_declared_charset_is_printable_text(body: bytes, charset: str | None) -> None:
    """What an error reply quotes of an upstream's body: whatever charset it names (one taking no
    errors="replace", as idna, raised a UnicodeError out of generate(), where an UPSTREAM_ERROR belongs)."""
    text = _body_start(body, charset, ())
    assert text.isprintable()


# ------------------------------------------------------------------------------------------- the config file
_EXAMPLE_CONFIG = (ROOT / "systemd" / "tokenwire.toml.example").read_bytes()


@FEW
@given(mutated(_EXAMPLE_CONFIG, 3))
def test_a_garbled_configuration_file_loads_or_is_a_config_error(tmp_path: Path, data: bytes) -> None:
    """As bytes, before TOML: undecodable text, broken syntax and odd values alike are a ConfigError (a start
    that exits with its message, a reload that keeps the running configuration)."""
    path = tmp_path / "tokenwire.toml"
    path.write_bytes(data)
    try:
        load_config(path, tls_may_be_missing=True)
    except ConfigError as exc:
        assert str(exc)


_AUTH = AuthConfig(tokens=(TokenEntry("a", hash_token("secret")),))


@settings(max_examples=examples(100), deadline=None)
@given(st.text(max_size=100))
def test_any_bearer_token_has_an_owner_or_none(token: str) -> None:
    """Tokens come from decoded frames, valid Unicode strings; the lookup (a hash) takes any of them."""
    assert _AUTH.principal(token) in (None, "a")


# --------------------------------------------------------------------------------------- predictor inputs
class _Session:
    """What ``runtime._check_meta`` reads of an onnxruntime session: the metadata map, one input, one output."""

    class _Port:
        def __init__(self, name: str, shape: list[Any]) -> None:
            self.name, self.shape = name, shape

    def __init__(self, props: dict[str, str]) -> None:
        self.props = props

    def get_modelmeta(self) -> Any:
        return type("Meta", (), {"custom_metadata_map": self.props})()

    def get_inputs(self) -> list[Any]:
        return [self._Port("x", [None, 5])]

    def get_outputs(self) -> list[Any]:
        return [self._Port("y", [None, 3])]


_GOOD_MODEL_META = {"format": runtime.MODEL_FORMAT, "features_version": runtime.FEATURES_VERSION,
                    "features": list(runtime.FEATURES), "window": 8}


@FEW
@given(st.one_of(
    st.dictionaries(st.sampled_from([*_GOOD_MODEL_META, "finished", "best_epoch"]), ODD, max_size=3).map(
        lambda edit: json.dumps({**_GOOD_MODEL_META, **edit}, default=str)),
    mutated(json.dumps(_GOOD_MODEL_META).encode(), 3).map(lambda b: b.decode("utf-8", "replace")),
    st.sampled_from(["[" * 100_000, "9" * 5000, "", "null", "{" * 3000]), st.text(max_size=20),
).map(lambda meta: {"tokenwire": meta}) | st.just({}))
def test_onnx_model_metadata_is_accepted_or_is_a_model_error(props: dict[str, str]) -> None:
    try:
        runtime._check_meta(_Session(props), Path("m.onnx"))
    except ModelError:
        pass


_DATASET_META = json.dumps({"format": "tokenwire-latency-dataset", "version": dataset.FORMAT_VERSION})
_COLUMN_KINDS = ["f8", "i8", "u1", "b1", "f2", "c16", "U3", "2d", "0d", "missing", "nan"]


@st.composite
def _dataset_npz(draw: st.DrawFn) -> bytes:
    """A .npz with each column of some dtype or shape (or missing), and any metadata."""
    arrays: dict[str, Any] = {}
    n = draw(st.integers(0, 5))
    for column in dataset.COLUMNS:
        kind = draw(st.sampled_from(_COLUMN_KINDS))
        if kind == "missing":
            continue
        if kind == "2d":
            arrays[column] = np.zeros((n, 2))
        elif kind == "0d":
            arrays[column] = np.float64(1.0)
        elif kind == "nan":
            arrays[column] = np.full(n, np.nan)
        elif kind == "U3":
            arrays[column] = np.array(["a"] * n)
        else:
            values = draw(st.lists(st.floats(-1e3, 1e3) | st.just(math.inf), min_size=n, max_size=n))
            with np.errstate(invalid="ignore"):  # (inf as an integer: whatever numpy makes of it)
                arrays[column] = np.array(values).astype(kind)
    meta = draw(st.sampled_from([_DATASET_META, "[" * 100_000]) | ODD.map(lambda v: json.dumps(v, default=str)))
    buf = io.BytesIO()
    try:
        np.savez(buf, **arrays, meta=np.array(meta))
    except UnicodeEncodeError:
        return b""
    return buf.getvalue()


@FEW
@given(st.one_of(_dataset_npz(), _dataset_npz().flatmap(lambda b: mutated(b, 2))))
def test_a_dataset_file_loads_or_is_a_dataset_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "d.npz"
    path.write_bytes(data)
    try:
        dataset.load(path)
    except dataset.DatasetError:
        pass


# ------------------------------------------------------------------------------------ rates and spec grammars
_NUMBER = st.one_of(st.from_regex(r"\A[0-9]{0,8}\.?[0-9]{1,8}(e[+-]?[0-9]{1,4})?\Z"),
                    st.sampled_from(["0", "00000000000000000000001", "1" * 5000, "0." + "0" * 5000 + "1", "1e30",
                                     "1e-30", "1e31", "nan", "inf", "-1", "+1", "1" * 4301, "." + "1" * 4400]))
_UNIT = st.sampled_from(["bps", "kbps", "mbps", "gbps", "Mbit", "kbit/s", "b/s", "", "mbps ", " gbps"])


@FEW
@given(st.tuples(_NUMBER, _UNIT).map("".join) | st.text(max_size=12))
def test_a_rate_is_finite_and_a_rate_spec_a_trace_or_a_trace_error(text: str) -> None:
    rate = parse_rate(text)
    assert rate is None or (math.isfinite(rate) and rate >= 0)
    bps = generator_bps(text)
    assert bps is None or 0 < bps <= 1e11
    if "/" in text or "\x00" in text or os.path.exists(text):  # (a path: a trace file, tested on its own)
        return
    try:
        assert len(trace_from_spec(text).stamps_ms) >= 1
    except (TraceError, OSError):
        pass


_NUMBERS = ["0", "1", "0.5", "nan", "inf", "-inf", "1e999", "-0", "1e-999", "2", "-1", "1_0", "0x1", " 1 ", "", "1e3",
            "9" * 5000, "1.0000000000000002", "١"]
_VALUES = st.sampled_from(_NUMBERS) | st.text(max_size=5) | st.sampled_from(
    ["2mbps", "100gbps", "101gbps", "1e-30mbps", "40%", "1001%", "nan%", "inf%", "15ms", "1e999ms", "0us", "1e400s",
     "5", "cubic", "bbr", "reno"])
_HEADS = st.sampled_from(["iid", "ge", "gilbert", "droptail", "dualpi2", "infinite", "tcp", "udp-ect1", "onoff-ect1",
                          "scalable", "tcp-onoff", "scalable-burst", "tokens", "rt", "bulk", "cbr-l", "cbr-c", "reno",
                          "cbr-l*3", "reno*0", "reno*99999999999", "none"])
_KEYS = st.sampled_from(["packets", "bytes", "target", "tupdate", "step", "alpha", "beta", "k", "c_protection",
                         "limit", "seed", "drop_overload", "rate", "on", "off", "rtt"]) | st.text(max_size=3)
_SPEC = st.one_of(
    st.tuples(_HEADS, st.lists(st.tuples(_KEYS, _VALUES).map("=".join), max_size=4).map(",".join)).map(":".join),
    st.tuples(_HEADS, st.lists(_VALUES, max_size=4).map(":".join)).map(":".join),
    st.tuples(_HEADS, st.lists(_VALUES, max_size=3).map(",".join)).map(":".join),
    st.text(max_size=20))
_DUALPI2 = st.lists(st.tuples(st.sampled_from(["target", "tupdate", "step", "alpha", "beta", "k", "limit",
                                               "c_protection"]), st.sampled_from(_NUMBERS),
                              st.sampled_from(["", "ms", "us", "s"])).map(lambda t: f"{t[0]}={t[1]}{t[2]}"),
                    min_size=1, max_size=3).map(lambda kv: "dualpi2:" + ",".join(kv))
_PARSERS: list[tuple[Any, tuple[type[Exception], ...]]] = [
    (parse_loss, (LossSpecError,)), (parse_queue, (QueueSpecError,)), (parse_cross, (ValueError,)),
    (cross_problem, ()), (parse_cross_spec, (SwiftQueueEvalError,)), (parse_flow_spec, (SwiftQueueEvalError,)),
    (predictor_cross, (CrossSpecError,))]


def _numbers_finite(obj: Any) -> None:
    """An accepted spec's numbers are not NaN, and finite but for a queue limit, an "always on" on/off flow's ON
    period, and a tokens flow's rate (SwiftQueueConfig.validate refuses its token count)."""
    if getattr(obj, "kind", None) == "onoff-ect1" or type(obj).__name__ == "FlowSpec":
        return
    for key, value in (vars(obj).items() if hasattr(obj, "__dict__") else ()):
        if isinstance(value, float):
            assert not math.isnan(value), (obj, key)
            assert math.isfinite(value) or key == "limit", (obj, key)


@settings(max_examples=examples(100), deadline=None)
@given(st.one_of(_SPEC, st.lists(_SPEC, min_size=2, max_size=3).map("+".join), _DUALPI2))
def test_a_loss_queue_or_cross_spec_parses_to_finite_numbers_or_is_its_grammars_error(text: str) -> None:
    """Every grammar gets every text (a spec meant for one is garbage to another). cross_problem says what is
    wrong as a string, or None: it raises nothing."""
    for parse, errors in _PARSERS:
        try:
            out = parse(text)
        except errors:
            continue
        for obj in out if isinstance(out, list) else [out]:
            if obj is None or isinstance(obj, str | tuple):
                continue
            _numbers_finite(obj)
            for part in ("p", "params"):
                if hasattr(obj, part):
                    _numbers_finite(getattr(obj, part))
