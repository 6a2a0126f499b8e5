"""The daemon's ``[marking]`` section through the real daemon subprocess: codepoints on the wire, metrics."""

from __future__ import annotations

import pytest

from tokenwire.daemon.config import ConfigError, parse_config
from tokenwire.daemon.demo_upstream import answer_tokens
from tokenwire.transport.client import connect
from tokenwire.transport.ecn_socket import ECT0, ECT1, NOT_ECT

from .daemon_proc import DaemonProcess
from .test_daemon import metric_value, metrics
from .test_loopback import run


def chat_once(d: DaemonProcess, n: int = 80) -> tuple[str, list[int]]:
    """One answer over an ECN-reading client; returns the text and the codepoints the client received."""

    async def go() -> tuple[str, list[int]]:
        async with connect("127.0.0.1", d.port, ecn=True, **d.client_kwargs()) as conn:
            text = await conn.chat("hi", max_tokens=n).collect()
            return text, list(conn._protocol._transport.received_by_codepoint)

    return run(go())


@pytest.mark.parametrize(
    ("policy", "expect"),
    [("l4s", ECT1), ("classic", ECT0)],
)
def test_daemon_marks_every_packet_with_the_configured_policy(tmp_path, policy, expect):
    d = DaemonProcess(tmp_path, f'[marking]\npolicy = "{policy}"\n')
    try:
        text, counts = chat_once(d)
        assert text == "".join(answer_tokens(80))
        others = [c for cp, c in enumerate(counts) if cp != expect]
        assert counts[expect] > 20 and sum(others) == 0, counts
        m = metrics(d)
        label = {ECT1: "ect1", ECT0: "ect0"}[expect]
        sent = metric_value(m, f'tokenwire_ecn_packets_total{{codepoint="{label}"}}')
        assert sent >= counts[expect]  # the daemon counted at least what this client received
        assert metric_value(m, 'tokenwire_ecn_packets_total{codepoint="not-ect"}') == 0
        assert metric_value(m, "tokenwire_ecn_l_share") == (1.0 if expect == ECT1 else 0.0)
        assert metric_value(m, f'tokenwire_marking_policy{{policy="{policy}"}}') == 1
        assert metric_value(m, 'tokenwire_ecn_received_total{codepoint="not-ect"}') > 0  # client acks
        if policy == "l4s":
            assert "ECN marking: policy l4s" in d.log()
    finally:
        assert d.stop() == 0


def test_swiftqueue_with_a_corrupt_model_falls_back_to_l4s_with_a_warning(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is not an onnx model")
    d = DaemonProcess(tmp_path, f'[marking]\npolicy = "swiftqueue"\nmodel = "{bad}"\n')
    try:
        text, counts = chat_once(d, 40)
        assert text == "".join(answer_tokens(40))
        assert counts[ECT1] > 10 and counts[NOT_ECT] == 0 and counts[ECT0] == 0
        log = d.log()
        assert "falling back to the l4s policy" in log and "WARNING" in log.upper()
        assert metric_value(metrics(d), 'tokenwire_marking_policy{policy="l4s"}') == 1
    finally:
        assert d.stop() == 0


def test_without_marking_the_daemon_keeps_the_plain_socket(tmp_path):
    d = DaemonProcess(tmp_path)
    try:
        text, counts = chat_once(d, 30)
        assert text == "".join(answer_tokens(30))
        assert counts[NOT_ECT] > 10 and counts[ECT1] == 0
        m = metrics(d)  # no ECN families at all: all-zero counters read as "no datagrams sent"
        assert "tokenwire_ecn_" not in m and "tokenwire_marking_" not in m
        assert "tokenwire_token_packets_total" in m  # the other families are there
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"marking": {"polcy": "l4s"}}, "marking.polcy: unknown key (did you mean 'policy'?)"),
        ({"marking": {"policy": "ecn"}}, "marking.policy: expected one of classic, l4s, swiftqueue"),
        ({"marking": {"policy": "swiftqueue", "margin_ms": -1}}, "marking.margin_ms"),
        ({"marking": {"policy": "l4s", "model": "m.onnx"}}, "marking.model: only the swiftqueue policy"),
        ({"marking": {"policy": "l4s"}, "server": {"congestion": "cubic"}}, "server.congestion: 'cubic'"),
        ({"marking": {"classic_codepoint": "ce"}}, "marking.classic_codepoint"),
        ({"marking": {"policy": "swiftqueue", "refuge_only": "yes"}}, "marking.refuge_only: expected true or false"),
    ],
)
def test_marking_config_errors_name_the_key(doc, message):
    with pytest.raises(ConfigError) as err:
        parse_config(doc)
    assert message in str(err.value)


def test_ect1_policies_run_prague_and_classic_keeps_the_configured_controller():
    def cc(doc):
        return parse_config(doc).server.congestion

    assert cc({"marking": {"policy": "swiftqueue"}}) == "prague"
    assert cc({"marking": {"policy": "l4s"}, "server": {"congestion": "prague"}}) == "prague"
    # classic packets are ECT(0) by default: the controller must read CE (RFC 3168), cubic-ecn for cubic
    assert cc({"marking": {"policy": "classic"}, "server": {"congestion": "cubic"}}) == "cubic-ecn"
    assert not parse_config({}).marking.enabled
    assert parse_config({"marking": {"policy": "swiftqueue"}}).marking.refuge_only is True
    assert parse_config({"marking": {"policy": "swiftqueue", "refuge_only": False}}).marking.refuge_only is False


def test_swiftqueue_runs_the_shipped_model_on_the_packet_path(tmp_path):
    pytest.importorskip("onnxruntime")
    runtime = pytest.importorskip("tokenwire.predictor.runtime")
    if not runtime.shipped_model_path().exists():
        pytest.skip("no shipped model in this checkout")
    d = DaemonProcess(tmp_path, '[marking]\npolicy = "swiftqueue"\n')
    try:
        text, counts = chat_once(d, 200)
        assert text == "".join(answer_tokens(200))
        assert counts[ECT1] + counts[ECT0] > 50 and counts[NOT_ECT] == 0  # only the policy's codepoints
        m = metrics(d)
        assert metric_value(m, 'tokenwire_marking_policy{policy="swiftqueue"}') == 1
        assert "falling back" not in d.log()
    finally:
        assert d.stop() == 0


def test_a_model_that_fails_on_the_packet_path_falls_back_to_l4s_and_the_daemon_still_stops(tmp_path):
    """A model that loads but raises on real windows: every packet raised into the transport (127 tracebacks,
    "upstream demo failed", a stalled chat), and SIGTERM never stopped the daemon: its stop() died on the
    same exception when aioquic's server.close() flushed the connections."""
    import asyncio
    import time

    pytest.importorskip("onnxruntime")
    from .test_predictor_runtime import tiny_model

    model = tiny_model(tmp_path / "fails.onnx", window=2, cols_on_zeros=2, cols_on_data=3)
    d = DaemonProcess(tmp_path, f'[marking]\npolicy = "swiftqueue"\nmodel = "{model}"\n')
    try:
        async def go() -> tuple[str, list[int]]:
            async with connect("127.0.0.1", d.port, ecn=True, **d.client_kwargs()) as conn:
                text = await conn.chat("hi", max_tokens=60).collect()
                return text, list(conn._protocol._transport.received_by_codepoint)

        text, counts = run(asyncio.wait_for(go(), 10))
        assert text == "".join(answer_tokens(60))
        assert counts[ECT1] > 20 and counts[ECT0] == 0 and counts[NOT_ECT] == 0  # l4s's codepoint, always
        log = d.log()
        assert log.count("latency model failed on the packet path") == 1, log
        assert "Traceback" not in log and "upstream demo failed" not in log
        assert "E:onnxruntime" not in log  # onnxruntime's own copy of the error, in colour, outside the log format
        m = metrics(d)
        assert metric_value(m, 'tokenwire_marking_policy{policy="l4s"}') == 1
        assert metric_value(m, 'tokenwire_marking_policy{policy="swiftqueue"}') == 0
        assert metric_value(m, "tokenwire_marking_model_errors_total") == 1
        t0 = time.monotonic()
    finally:
        assert d.stop() == 0
    assert time.monotonic() - t0 < 10


def test_a_model_error_on_one_connection_moves_every_connection_to_l4s(tmp_path, caplog):
    """In-process: the open connections stop asking the broken model too, new ones get the l4s policy."""
    import logging

    pytest.importorskip("onnxruntime")
    from tokenwire.daemon.marking import MarkingConfig, MarkingService
    from tokenwire.daemon.telemetry import Metrics
    from tokenwire.transport.marking import L4SPolicy, SwiftQueuePolicy

    from .test_predictor_runtime import samples, tiny_model

    model = tiny_model(tmp_path / "fails.onnx", window=2, cols_on_zeros=2, cols_on_data=3)
    metrics = Metrics()
    svc = MarkingService(MarkingConfig(policy="swiftqueue", model=model), metrics)
    svc.start()
    a, b = svc.new_policy(), svc.new_policy()
    assert isinstance(a, SwiftQueuePolicy) and isinstance(b, SwiftQueuePolicy)
    with caplog.at_level(logging.WARNING, logger="tokenwire.daemon.marking"):
        for s in samples(5):
            a.on_sample(s)
            assert a.codepoint(s.ack_at) == ECT1
    assert a.failed and "another connection" in b.failed and b.codepoint(1.0) == ECT1
    assert isinstance(svc.new_policy(), L4SPolicy) and svc.effective_policy == "l4s"
    assert [r.getMessage()[:60] for r in caplog.records if r.levelno >= logging.WARNING] == [
        "marking.policy = swiftqueue but the latency model failed on "]
    assert metrics.registry.get_sample_value("tokenwire_marking_model_errors_total") == 1
    assert metrics.registry.get_sample_value("tokenwire_marking_policy", {"policy": "l4s"}) == 1
