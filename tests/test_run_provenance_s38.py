"""The provenance block every bench JSON carries (session 38: a bench probe found four of five bench JSONs without
the commit, the host's CPUs or its load, so a loaded run could not be told from a quiet one)."""

from __future__ import annotations

import json
import os

from tokenwire.daemon import run_provenance as rp


def test_the_load_is_read_before_and_after_the_measurement(monkeypatch) -> None:
    loads = iter([(5.0, 4.0, 3.0), (0.5, 1.0, 2.0)])
    monkeypatch.setattr(os, "getloadavg", lambda: next(loads))
    started = rp.RunProvenance()  # the measurement starts under load 5 and ends under 0.5
    doc = rp.run_provenance(started)
    assert doc["load_average"] == {"start": [5.0, 4.0, 3.0], "end": [0.5, 1.0, 2.0]}
    assert doc["cpus"] == os.cpu_count() and doc["cpus_usable"] >= 1
    assert doc["libraries"]["aioquic"] and doc["python"].count(".") == 2
    json.dumps(doc)  # (it goes into a JSON file as it is)


def test_a_host_without_a_load_average_or_git_still_gets_a_block(monkeypatch) -> None:
    def no_load() -> tuple[float, float, float]:
        raise OSError("no load average here")

    def no_git(*a: object, **kw: object) -> None:
        raise FileNotFoundError("git")

    monkeypatch.setattr(os, "getloadavg", no_load)
    monkeypatch.setattr(rp.subprocess, "run", no_git)
    doc = rp.run_provenance()
    assert doc["load_average"] == {"start": None, "end": None} and doc["git_commit"] is None
