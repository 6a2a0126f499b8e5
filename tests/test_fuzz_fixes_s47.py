"""Fixes for what the s47 fuzz campaign found: rate and duration specs of thousands of digits (a plain ValueError
from int(), and seconds of regex backtracking per spec), an ONNX model whose tokenwire metadata is nested too
deeply (a RecursionError where a ModelError belongs), and an upstream whose Content-Type names a charset that
takes no errors="replace" (a UnicodeError out of the upstream, where an UPSTREAM_ERROR belongs), and an `llm serve`
request with a lone surrogate in a message or its model (a 500 and a traceback, or a stream cut after its 200,
where a 400 belongs), and `testbed swiftqueue --virtual` on/off cross flows of sub-millisecond or infinite periods
(a loop adding flows for ever, memory without end), and a DualPI2 duration written as an infinite number (the
AQM silently disabled, as the NaN its numbers already refuse)."""

from __future__ import annotations

import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.fuzzing import examples
from tokenwire.daemon.llm_server import BadRequest, parse_chat_request
from tokenwire.daemon.upstream_openai import _body_start, _decode, _error_text
from tokenwire.predictor.crossspec import CrossSpecError
from tokenwire.predictor.crossspec import parse_cross_spec as predictor_cross
from tokenwire.predictor.onnx_session import ModelError
from tokenwire.predictor.runtime import load_forecaster
from tokenwire.testbed.queues import QueueSpecError, parse_queue
from tokenwire.testbed.swiftqueue_eval import SwiftQueueConfig, SwiftQueueEvalError, parse_cross_spec
from tokenwire.testbed.trace import TraceError, generator_bps, parse_rate, trace_from_spec
from tokenwire.testbed.traffic import parse_cross

from .test_predictor_runtime import tiny_model

_LONG = ["1" * 5000 + "mbps", "0." + "0" * 5000 + "1mbps", "." + "1" * 4400 + "kbps", "1" * 4301 + "e3bps",
         "1e" + "0" * 5000 + "1mbps"]


@pytest.mark.parametrize("spec", _LONG, ids=["ones", "zeros", "point", "mantissa", "exponent"])
def test_a_rate_of_thousands_of_digits_is_no_rate_not_a_value_error(spec: str) -> None:
    assert parse_rate(spec) is None and generator_bps(spec) is None
    with pytest.raises(TraceError, match="out of range"):
        trace_from_spec(spec)
    with pytest.raises(ValueError, match="cross traffic"):  # (parse_cross's documented error)
        parse_cross(f"udp-ect1:{spec}")
    with pytest.raises(CrossSpecError):
        predictor_cross(f"cbr-l:rate={spec}")


def test_a_rate_written_with_up_to_100_characters_still_reads() -> None:
    assert parse_rate("0" * 99 + "5mbps") == 5e6
    assert parse_rate("1." + "0" * 98 + "kbps") == 1e3


@settings(max_examples=examples(30), deadline=None)
@given(st.integers(2000, 20000), st.sampled_from(["", "x", "mbps!", "ms!", ".", "e"]))
@example(5000, "")  # 2.8 s in trace_from_spec (three regexes, each quadratic in the digits)
def test_a_long_number_in_a_spec_is_refused_in_linear_time(digits: int, tail: str) -> None:
    spec = "1" * digits + tail
    began = time.perf_counter()
    for parse, errors in ((trace_from_spec, (TraceError, OSError)), (parse_queue, (QueueSpecError,))):
        try:
            parse(spec if parse is trace_from_spec else f"dualpi2:target={spec}")
        except errors:
            pass
    assert time.perf_counter() - began < 0.5


@pytest.mark.parametrize("text", ["12mbps", ".5mbps", "1.5e3kbps", "0.5 Gbps", "7 bit/s"])
def test_rates_the_grammar_took_still_read(text: str) -> None:
    assert parse_rate(text) == {"12mbps": 12e6, ".5mbps": 5e5, "1.5e3kbps": 1.5e6, "0.5 Gbps": 5e8,
                                "7 bit/s": 7.0}[text]


@pytest.mark.parametrize("text", ["5.mbps", "mbps", "1..5mbps", "-1mbps"])
def test_what_was_no_rate_is_still_none(text: str) -> None:
    assert parse_rate(text) is None


@pytest.mark.parametrize("meta", ["[" * 100_000, "{\"a\":" * 50_000])
def test_onnx_metadata_nested_too_deeply_is_a_model_error(tmp_path, meta: str) -> None:
    with pytest.raises(ModelError, match="nested too deeply"):
        load_forecaster(str(tiny_model(tmp_path / "deep.onnx", meta=meta)))


_BODY = b'{"error": {"message": "busy \xff"}}'


@pytest.mark.parametrize("charset", ["idna", "punycode", "undefined", "IDNA", "no-such-charset", None, "latin-1"])
def test_an_upstream_body_in_any_declared_charset_decodes_to_text(charset: str | None) -> None:
    """``Content-Type: application/json; charset=idna`` (an upstream's header): ``bytes.decode`` raised
    UnicodeError (idna and undefined take no errors="replace"; punycode fails on a non-ASCII byte), not the
    LookupError caught for an unknown name, and generate() raised it instead of an UPSTREAM_ERROR."""
    text = _decode(_BODY, charset)
    assert text.startswith('{"error": {"message": "busy ') and len(text) == len(_BODY)
    assert _error_text(text, ()).startswith("busy ")
    assert _body_start(_BODY, charset, ()).startswith('{"error"')


_HI = {"role": "user", "content": "hi"}


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
    ({"messages": [_HI, {"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, "messages[1].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x\ud83d"}, {"type": "text", "text": "y"}]}]},
     "messages[0].content"),
    ({"model": "m\ud800", "messages": [_HI], "stream": True}, "model"),
], ids=["content", "part", "split-pair", "model"])
def test_a_lone_surrogate_in_an_llm_serve_request_is_a_bad_request(body: dict, param: str) -> None:
    """JSON's "\\ud800" parses to a lone surrogate: in a message, SmolLM2's tokenizer raised TypeError (HTTP 500,
    "generation failed", a traceback); as the model, the stream's first chunk failed to encode after its 200."""
    with pytest.raises(BadRequest, match="not valid Unicode") as bad:
        parse_chat_request(body)
    assert bad.value.param == param


@pytest.mark.parametrize("spec", ["tcp-onoff:1e-300:0", "tcp-onoff:0.001:0", "scalable-burst:1:1e-300:0",
                                  "scalable-burst:2:5:0.5", "tcp-onoff:inf:0", "tcp-onoff:5:5:inf", "tcp-onoff:5:inf"])
def test_a_virtual_on_off_cross_flow_of_a_sub_millisecond_or_infinite_period_is_refused(spec: str) -> None:
    """``tcp-onoff:1e-300:0``: add_cross_flows added a Reno flow per period while ``t += 1e-303`` left t as it was
    (a loop without end, memory growing, no error); ``tcp-onoff:0.001:0`` made 30 million flows for 30 s."""
    with pytest.raises(SwiftQueueEvalError, match=r"ON_MS|finite"):
        parse_cross_spec(spec)


def test_onoff_ect1_periods_are_bounded_in_virtual_time_only() -> None:
    spec = "onoff-ect1:2mbps:0.000001:0"  # (each period is an event in virtual time; the namespace run sleeps)
    with pytest.raises(SwiftQueueEvalError, match="ON_MS"):
        SwiftQueueConfig(down_trace="12mbps", cross=[spec], virtual=True).validate()
    SwiftQueueConfig(down_trace="12mbps", cross=[spec], virtual=False).validate()


@pytest.mark.parametrize("spec", ["tcp-onoff:1:0", "tcp-onoff:1000:1000:500", "scalable-burst:4:200:800",
                                  "tcp-onoff:1:1"])
def test_on_off_periods_of_a_millisecond_and_more_still_parse(spec: str) -> None:
    assert parse_cross_spec(spec).on_s >= 0.001


@pytest.mark.parametrize("key", ["target", "tupdate", "step"])
@pytest.mark.parametrize("value", ["1e999ms", "1e400", "9" * 400 + "s"])
def test_an_infinite_dualpi2_duration_is_refused(key: str, value: str) -> None:
    """``tupdate=1e999ms`` (inf s) made the next update never come, ``target=`` and ``step=`` of inf never marked:
    the AQM silently off, as ``alpha=nan`` was before its numbers were held finite."""
    with pytest.raises(QueueSpecError, match="not a finite duration"):
        parse_queue(f"dualpi2:{key}={value}")
    assert parse_queue(f"dualpi2:{key}=20ms") is not None


def test_a_rate_padded_with_zeros_that_change_nothing_is_still_that_rate() -> None:
    """The 100-digit bound counts digits that matter: "12.000...0mbps" loaded before the bound, however long."""
    from tokenwire.testbed.trace import parse_rate

    assert parse_rate("12." + "0" * 100 + "mbps") == 12e6
    assert parse_rate("0" * 150 + "12mbps") == 12e6
    assert parse_rate("1" * 150 + "bps") is None


def test_an_upstream_charset_name_with_a_nul_byte_falls_back_to_utf8() -> None:
    """str.decode refuses such a name with a plain ValueError (aiohttp's parser keeps it out of real headers)."""
    from tokenwire.daemon.upstream_openai import _decode

    assert _decode("é".encode(), "\x00") == "é" and _decode(b"ab", "idna") == "ab"
