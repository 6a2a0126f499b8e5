"""testbed swiftqueue's JSON says what its results depend on beyond ``config`` (netns-testbed/swiftqueue_eval.py
provenance): a constant added later (the refuge memory) changed 12 of 16 documented scenarios while their files'
settings stayed the same, and nothing in the files said why."""

from __future__ import annotations

import hashlib

from tokenwire.predictor.runtime import shipped_model_path
from tokenwire.testbed.swiftqueue_eval import SwiftQueueConfig, run_virtual_all
from tokenwire.transport import chatterbox, marking


def _summary(policies: list[str]) -> dict:
    cfg = SwiftQueueConfig(down_trace="12mbps", up_trace="12mbps", policies=policies, seconds=2.0, virtual=True)
    summary, _ = run_virtual_all(cfg)
    return summary


def test_the_model_bytes_and_the_constants_are_recorded() -> None:
    prov = _summary(["l4s", "swiftqueue"])["provenance"]
    shipped = shipped_model_path()
    assert prov["model"] == {"path": str(shipped), "sha256": hashlib.sha256(shipped.read_bytes()).hexdigest()}
    assert prov["refuge_memory_s"] == marking.REFUGE_MEMORY_S
    assert prov["congested_repeats"] == chatterbox.CONGESTED_REPEATS and prov["congestion_cap"] is True
    assert isinstance(prov["tokenwire_version"], str) and prov["tokenwire_version"]


def test_no_model_without_swiftqueue() -> None:
    assert _summary(["classic", "l4s"])["provenance"]["model"] is None
