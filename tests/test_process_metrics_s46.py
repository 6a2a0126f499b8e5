"""The daemon's metrics include the process's own series (session 46's soak): RSS, open fds and CPU had to be read
from /proc, as the daemon's registry of its own left prometheus_client's process and gc collectors out."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from tokenwire.daemon.telemetry import Metrics


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process_* series read /proc")
def test_the_daemons_registry_exports_the_process_and_gc_series():
    metrics = Metrics()
    Metrics()  # (a second registry, as a test or a reload makes: the shared collectors register in both)
    text = generate_latest(metrics.registry).decode()
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(values["process_resident_memory_bytes"]) > 10 * 1024 * 1024
    assert float(values["process_open_fds"]) == pytest.approx(len(os.listdir("/proc/self/fd")), abs=3)
    assert float(values["process_cpu_seconds_total"]) > 0
    assert 'python_gc_objects_collected_total{generation="0"}' in values
    assert any(key.startswith("python_info{") for key in values)
    words = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    for name in ("process_resident_memory_bytes", "process_open_fds", "python_gc_objects_collected_total"):
        assert f"`{name}`" in words
