"""testbed swiftqueue's JSON records the host and its load, and the commit whose code ran (session 39: the docs call
the namespace results "a quiet-host figure", yet the JSON held no load average; and a commit made during a run was
recorded as the run's, with -dirty, because the commit was read at the end)."""

from __future__ import annotations

import os

from tokenwire.daemon import run_provenance as rp
from tokenwire.testbed.swiftqueue_eval import SwiftQueueConfig, run_virtual_all


def test_the_json_has_the_host_its_load_before_and_after_and_the_commit_at_the_start(monkeypatch) -> None:
    loads = iter([(4.0, 3.0, 2.0), (0.25, 0.5, 0.75)])
    monkeypatch.setattr(os, "getloadavg", lambda: next(loads))
    commits = iter(["a" * 40, "b" * 40 + "-dirty"])  # at the start, then (a commit made meanwhile) at the end
    monkeypatch.setattr(rp, "git_commit", lambda: next(commits))
    cfg = SwiftQueueConfig(down_trace="12mbps", up_trace="12mbps", policies=["l4s"], seconds=2.0, virtual=True)
    prov = run_virtual_all(cfg)[0]["provenance"]
    assert prov["load_average"] == {"start": [4.0, 3.0, 2.0], "end": [0.25, 0.5, 0.75]}
    assert prov["git_commit"] == "a" * 40
    assert prov["host"] and prov["cpus"] == os.cpu_count() and prov["wall_s"] >= 0
    assert prov["refuge_memory_s"] > 0 and "model" in prov  # the testbed's own keys beside the common block
