"""The mahimahi trace reader and fixed-rate traces."""

import os

import pytest

from tokenwire.testbed.trace import (
    OPPORTUNITY_BYTES,
    TraceError,
    fixed_rate_trace,
    load_trace,
    parse_rate,
    trace_from_spec,
)

SHARED_TRACES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "traces")


def write(tmp_path, text, name="t.trace"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_repeats_with_last_timestamp_as_period(tmp_path):
    tr = load_trace(write(tmp_path, "0\n0\n3\n5\n"))
    assert tr.period_ms == 5
    assert [tr.opportunity_ms(k) for k in range(8)] == [0, 0, 3, 5, 5, 5, 8, 10]


def test_single_line_one_is_twelve_mbps(tmp_path):
    tr = load_trace(write(tmp_path, "1\n"))
    assert tr.mean_mbps == pytest.approx(12.0)
    assert [tr.opportunity_ms(k) for k in range(3)] == [1, 2, 3]


def test_first_index_after_is_strict(tmp_path):
    tr = load_trace(write(tmp_path, "2\n2\n4\n"))
    # opportunities at 2, 2, 4, 6, 6, 8, ...
    assert tr.first_index_after(1.9) == 0
    assert tr.first_index_after(2.0) == 2  # both opportunities at exactly 2 ms are not after 2
    assert tr.first_index_after(4.0) == 3
    assert tr.first_index_after(5.5) == 3
    assert tr.bytes_between(0, 8) == 6 * OPPORTUNITY_BYTES


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty trace"),
        ("1\nabc\n", "expected an integer"),
        ("5\n3\n", "must not decrease"),
        ("-1\n2\n", "negative"),
        ("0\n0\n", "last timestamp must be > 0"),
        ("1\n99999999999999999999\n", "beyond 1000000000000 ms"),  # was an OverflowError traceback
    ],
)
def test_bad_trace_files_raise_clear_errors(tmp_path, text, message):
    with pytest.raises(TraceError, match=message):
        load_trace(write(tmp_path, text))


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(TraceError, match="no such trace file"):
        load_trace(tmp_path / "nope")
    p = tmp_path / "bin"
    p.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TraceError, match="non-ASCII"):
        load_trace(p)


@pytest.mark.parametrize("mbps", [12, 24, 0.5, 5, 1.5, 100, 7.3])
def test_fixed_rate_traces_have_the_requested_rate(mbps):
    tr = fixed_rate_trace(mbps)
    assert tr.mean_mbps == pytest.approx(mbps, rel=1e-3)
    stamps = list(tr.stamps_ms)
    assert stamps == sorted(stamps) and stamps[0] >= 1


def test_rate_specs():
    assert parse_rate("12mbps") == 12e6
    assert parse_rate("800kbps") == 800e3
    assert parse_rate("1.5Mbit") == 1.5e6
    assert parse_rate("traces/x.down") is None
    assert trace_from_spec("24mbps").mean_mbps == pytest.approx(24)
    with pytest.raises(TraceError):
        fixed_rate_trace(0)
    with pytest.raises(TraceError, match="beyond the emulator"):  # 1e9mbps built 8 GB of stamps and hung
        trace_from_spec("1e9mbps")
    assert trace_from_spec("100gbps").mean_mbps == pytest.approx(100_000)


@pytest.mark.skipif(not os.path.isdir(SHARED_TRACES), reason="shared traces not present")
def test_reads_the_shared_cellular_traces():
    tr = load_trace(os.path.join(SHARED_TRACES, "Verizon-LTE-short.down"))
    # README of the shared traces: 140 s, 5.0 Mbit/s mean
    assert tr.period_ms / 1000 == pytest.approx(140, abs=2)
    assert tr.mean_mbps == pytest.approx(5.0, abs=0.2)
