"""Session 39's small fixes: ``tokenwire sim`` refuses the traces the testbed refuses as too sparse for a QUIC
handshake, and a KV decision records the guard bandwidth the controller planned with, not only the forecast's low
quantile."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tokenwire.daemon.cli import main
from tokenwire.testbed.cli import check_path
from tokenwire.transport.kv_controller import FIRM_GUARD_WEIGHT, GUARD_WEIGHT, PRIOR_LOW

from .test_kv_host_s37 import PRIOR_BPS, WIFI, ShapedPair

# -- sim: the testbed's handshake check -------------------------------------------------------------------------


def _sparse_trace(path: Path) -> Path:
    """A mahimahi trace with one delivery opportunity every 10 s: gaps under 30 s, but only 3 per 30 s."""
    path.write_text("".join(f"{ms}\n" for ms in range(10_000, 60_001, 10_000)))
    return path


@pytest.mark.parametrize("args, option", [
    (["--down-trace", "1kbps"], "--down-trace: 1kbps: only 2 delivery opportunities"),
    (["--down-trace", "12mbps", "--up-trace", "500bps"], "--up-trace: 500bps: only 1 delivery opportunity"),
])
def test_sim_refuses_a_rate_too_slow_for_a_handshake(args: list[str], option: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Before, ``sim --down-trace 1kbps`` ran (a TTFT of 96 s) and reported a stall of 1.0."""
    # refused before any run (a run prints its table), as a malformed trace is: one line, exit status 2
    assert main(["sim", "--tokens", "5", "--schemes", "stream", *args]) == 2
    err = capsys.readouterr()
    assert err.out == ""
    lines = err.err.strip().splitlines()
    assert len(lines) == 1 and option in lines[0] and "a fixed rate needs at least 2 kbit/s" in lines[0]


def test_sim_refuses_what_the_testbed_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same check as ``testbed compare`` (``check_path``), word for word, on a trace file and on a gap."""
    from tokenwire.daemon.cli import CLIError

    sparse = _sparse_trace(tmp_path / "sparse.down")
    gappy = tmp_path / "gappy.down"
    gappy.write_text("".join(f"{ms}\n" for ms in (*range(1, 1001), 40_000)))  # 39 s without an opportunity
    for trace in (sparse, gappy):
        with pytest.raises(CLIError) as testbed:
            check_path(str(trace), str(trace))
        assert main(["sim", "--tokens", "5", "--schemes", "stream", "--down-trace", str(trace)]) == 2
        assert capsys.readouterr().err.strip().endswith(f"--down-trace: {testbed.value}")


def test_sim_still_runs_a_slow_trace_the_testbed_accepts(capsys: pytest.CaptureFixture[str]) -> None:
    """3 kbit/s has 7.5 opportunities per 30 s: the testbed runs it, and so does sim (its stall is the link's)."""
    check_path("3kbps", "3kbps")  # accepted
    assert main(["sim", "--tokens", "3", "--schemes", "stream", "--down-trace", "3kbps"]) == 0
    assert "trace 3kbps" in capsys.readouterr().out


# -- KV: the decision records the guard -------------------------------------------------------------------------


def test_kv_decisions_record_the_guard_they_planned_with() -> None:
    """Each tokenwire decision's ``guard_bps`` is the controller's guard rate: low**w * median**(1-w) of the
    recorded forecast (w firmer on the last chunk), and on a cold first chunk the firm guard of the prior; the
    recorded ``low_bps`` (all there was before) is neither."""
    pair = ShapedPair({WIFI[0]: 20e6}, chunks=3)
    first = pair.fetch()
    second = pair.fetch()
    cold = first.decisions[0]
    assert cold["age_s"] is None  # nothing measured yet: the configured prior, PRIOR_LOW of it as its low quantile
    assert cold["guard_bps"] == pytest.approx(PRIOR_BPS * PRIOR_LOW**FIRM_GUARD_WEIGHT)
    warm = [d for f in (first, second) for d in f.decisions if d["age_s"] is not None]
    assert warm, "no decision on this fetch's own samples"
    for d in warm:
        med, low = d["median_bps"], min(d["low_bps"], d["median_bps"])
        w = FIRM_GUARD_WEIGHT if d["index"] == 2 else GUARD_WEIGHT
        assert d["guard_bps"] == pytest.approx(low**w * med ** (1 - w))
        assert d["guard_bps"] < d["low_bps"] and math.isfinite(d["guard_bps"])
