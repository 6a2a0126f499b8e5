"""Fixes to three benchmarks' reports: ``bench transport`` without raw in ``--modes``, ``kv bench``'s threads,
ratios, load and spread, and ``bench predictor``'s EWMA batch entries that were derived, not measured."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tokenwire.daemon.cli import main


# -- 1. bench transport --modes chatterbox: the raw baseline silently disappeared ("ratios_vs_raw_aioquic": {})
def _fake_one(mode: str, n: int, rate: float) -> dict[str, Any]:
    """One run's figures without a server: raw costs 1 s of CPU, the tokenwire modes 2 s (ratio 2)."""
    from tokenwire.transport.bench_transport import _figures

    cpu = 1.0 if mode == "raw" else 2.0
    server = {"tokens": n, "datagrams": n, "token_packets": n, "cpu_s": cpu, "wall_s": 1.0}
    client = {"tokens": n, "datagrams": n, "cpu_s": cpu, "wall_s": 1.0}
    return _figures(server, client, n)


def test_transport_always_measures_the_raw_baseline(tmp_path, monkeypatch, capsys):
    from tokenwire.transport import bench_transport

    measured: list[str] = []

    def one(mode: str, n: int, rate: float) -> dict[str, Any]:
        measured.append(mode)
        return _fake_one(mode, n, rate)

    monkeypatch.setattr(bench_transport, "_one", one)
    out = tmp_path / "bt.json"
    assert main(["bench", "transport", "--modes", "chatterbox", "--repeats", "1", "--tokens", "10",
                 "--flood-tokens", "10", "--json", str(out)]) == 0
    assert measured == ["raw", "raw", "chatterbox", "chatterbox"]  # paced and flood, the baseline first
    doc = json.loads(out.read_text())
    assert list(doc["modes"]) == ["raw", "chatterbox"]
    assert doc["ratios_vs_raw_aioquic"]["chatterbox"]["server_cpu_per_token_vs_raw"] == pytest.approx(2.0)
    err = capsys.readouterr().err
    assert err.count("raw aioquic added as the same-run baseline") == 1


def test_transport_with_raw_listed_adds_nothing(monkeypatch, capsys):
    from tokenwire.transport import bench_transport

    measured: list[str] = []
    monkeypatch.setattr(bench_transport, "_one",
                        lambda mode, n, rate: measured.append(mode) or _fake_one(mode, n, rate))
    assert main(["bench", "transport", "--modes", "stream,raw", "--repeats", "1", "--tokens", "10",
                 "--flood-tokens", "10"]) == 0
    assert measured == ["stream", "stream", "raw", "raw"]
    assert "added" not in capsys.readouterr().err


# -- 2. kv bench: numba threads null when NUMBA_NUM_THREADS is unset; no ratio to zstd-1; no load, no spread
def test_kv_bench_reports_threads_ratios_load_and_each_repeat(monkeypatch):
    numba = pytest.importorskip("numba")
    from tokenwire.transport.cachegen import bench

    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    loads = iter([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # start, end: told apart
    monkeypatch.setattr(bench.os, "getloadavg", lambda: tuple(next(loads)))
    doc = bench.run_bench(layers=1, heads=1, head_dim=8, tokens=16, repeats=3)
    assert doc["threads"]["numba"] == numba.get_num_threads() >= 1
    assert doc["threads"]["numba_threading_layer"] == numba.threading_layer()  # a parallel loop has run
    rat = doc["ratios_vs_zstd1"]
    assert rat["encode_MBps"] == pytest.approx(doc["encode_MBps"] / doc["zstd1_encode_MBps"])
    assert rat["decode_MBps"] == pytest.approx(doc["decode_MBps"] / doc["zstd1_decode_MBps"])
    assert rat["bits_per_symbol"] == pytest.approx(doc["rans_bits_per_symbol"] / doc["zstd1_bits_per_symbol"])
    assert doc["load_average"]["start"] == [1.0, 2.0, 3.0] and doc["load_average"]["end"] == [4.0, 5.0, 6.0]
    for key in ("encode", "decode", "zstd1_encode", "zstd1_decode", "codec_encode", "codec_decode"):
        spread = doc["repeats_MBps"][key]
        assert len(spread["runs"]) == 3
        assert spread["min"] == min(spread["runs"]) <= doc[f"{key}_MBps"] <= spread["max"] == max(spread["runs"])
    assert "encode_MBps" in doc and doc["threads"]["torch"] >= 1  # the existing keys stay


def test_kv_bench_without_a_load_average_says_none(monkeypatch):
    # (the kv bench reads the load through run_provenance since session 38)
    from tokenwire.daemon import run_provenance

    def unsupported() -> tuple[float, float, float]:
        raise OSError("no load average here")

    monkeypatch.setattr(run_provenance.os, "getloadavg", unsupported)
    assert run_provenance._load() is None


# -- 3. bench predictor: EWMA's batch 8/64 figures were batch 1's, in the fields of measured ones
class _Counting:
    """A forecaster that counts its predict() calls (no timing is asserted)."""

    def __init__(self) -> None:
        self.predicts = 0

    def observe(self, sample: object) -> None:
        pass

    def predict(self, now: float) -> tuple[float, float]:
        self.predicts += 1
        return (1.0, 1.0)

    def predict_batch(self, nows: list[float]) -> None:
        pytest.fail("EWMA's bursts are answered by one predict()")


def test_ewma_batches_above_one_are_marked_derived_and_make_no_calls():
    from tokenwire.predictor.bench import measure

    fc = _Counting()
    res = measure(fc, 20, 2, one_predict_per_batch=True)
    one, eight, sixty_four = (res["batches"][bs] for bs in ("1", "8", "64"))
    assert one["derived"] is False and one["calls"] == 20
    for derived in (eight, sixty_four):
        assert derived["derived"] is True and "calls" not in derived
        assert "not timed" in derived["derived_from"]
        assert derived["us_per_call"] == one["us_per_call"]
    assert fc.predicts == 2 * 20  # batch 1's repeats only: nothing was timed for 8 and 64


def test_measured_batches_say_so_and_the_table_marks_derived_rows(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "p.json"
    assert main(["bench", "predictor", "--calls", "10", "--repeats", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    for bs in ("1", "8", "64"):
        assert doc["onnx"]["batches"][bs]["derived"] is False and doc["onnx"]["batches"][bs]["calls"] > 0
    assert [doc["ewma"]["batches"][bs]["derived"] for bs in ("1", "8", "64")] == [False, True, True]
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("ewma ") and "derived" in ln]
    assert [ln.split()[1] for ln in rows] == ["8", "64"]
