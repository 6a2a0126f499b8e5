"""Documented simulator rows that had gone stale without a test to say so (session 44's audit): the uplink-outage
table in the README's "Simulator" section. The simulator is deterministic, so each row is exactly what ``sim``
prints, rounded once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenwire.daemon.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _row(first_cell: str) -> list[str]:
    """The README table row whose first cell starts with ``first_cell``, its cells stripped."""
    line = next(line for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
                if line.startswith(f"| {first_cell}"))
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["ge:0.0001,0.000125", "ge:0.00005,0.0000625"])
def test_the_uplink_outage_rows_are_what_sim_prints_today(spec: str, tmp_path: Path, capsys) -> None:
    """They said 0.015 and 0.063 (stream 0.061, 0.069), measured before the server's ACKs rode its token packets;
    `sim` prints 0.026 and 0.074 (0.062, 0.071)."""
    out = tmp_path / "up.json"
    assert main(["sim", "--loss-direction", "up", "--loss", spec, "--tokens", "900", "--runs", "5",
                 "--schemes", "chatterbox,stream", "--json", str(out)]) == 0
    capsys.readouterr()
    doc = json.loads(out.read_text())
    chatterbox, stream = (doc["schemes"][s]["stall_ratio"] for s in ("chatterbox", "stream"))
    cells = _row(f"`{spec}`")
    assert cells[4] == f"**{chatterbox:.3f}**"
    assert cells[5].split()[0] == f"{stream:.3f}"
