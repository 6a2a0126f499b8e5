"""Fixes from an application developer's KV probe, ``tokenwire kv`` side: ``kv calibrate`` under
``timeout -s TERM`` wrote no ``.partial`` profile in 2 of 4 runs (a second signal cut the profile's build or its
write), and ``kv bench --level code=99`` printed its chunk line before refusing the level."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

# The child: `tokenwire kv calibrate` or `kv eval` on a stand-in model (no SmolLM2), which prints "WAITING <n>" and
# then reads a line of stdin at two points: (1) in the run, where the test's first SIGTERM interrupts it, and (2) in
# the window that the second SIGTERM (timeout's own second one, or the handler's retry) used to cut: the calibration
# profile's build, or the write of the partial result. The test sends the second SIGTERM and then the line.
CHILD = r'''
import select
import sys

import torch

from tokenwire.daemon.cli import main
from tokenwire.transport.cachegen import cli, evaluate

command, window, out, text = sys.argv[1:5]
waits = [0]


def wait_here():
    waits[0] += 1
    print(f"WAITING {waits[0]}", flush=True)
    # in slices, as a real step's loop: a SIGTERM landing just before one blocking read() was handled only when the
    # read returned, never here (the test writes nothing): the child hung, 1 run in many
    while not select.select([sys.stdin], [], [], 0.1)[0]:
        pass
    sys.stdin.readline()


class LM:
    """Logits that depend on the KV (gradients flow); its second forward pass is where the run is interrupted."""

    name, fingerprint, calls = "stand-in", 7, 0

    @property
    def model(self):
        return self

    def forward(self, ids, past_key_values=None):
        LM.calls += 1
        if LM.calls == 2:
            wait_here()
        k, v = past_key_values[0]
        w = torch.arange(6, dtype=torch.float32)
        return type("Out", (), {"logits": (k.sum() * w - v.pow(2).sum() * w.flip(0)).expand(1, ids.shape[1], 6)})()

    __call__ = forward


def setup(*args, **kwargs):
    gen = torch.Generator().manual_seed(3)
    kv = [(torch.randn(1, 2, 4, 3, generator=gen), torch.randn(1, 2, 4, 3, generator=gen))]
    return evaluate.Setup(lm=LM(), kv=kv, score_ids=torch.zeros(1, 5, dtype=torch.long),
                          ref_logits=torch.randn(5, 6, generator=gen), prefix=4,
                          prefix_ids=torch.zeros(1, 4, dtype=torch.long))


def level(setup, name, chunk_tokens, backend="auto"):
    if name == "medium":
        wait_here()
    return {"bits_per_element": 1.0, "top1": 0.9, "kl": 0.01, "ppl": 5.0}


def wrap(function):
    def waiting(*args, **kwargs):
        wait_here()
        return function(*args, **kwargs)
    return waiting


evaluate.prepare = setup
evaluate.cache_from_kv = lambda kv: kv
evaluate.eval_level = level
evaluate.profile_for = lambda *a: type("P", (), {"name": "p"})()
if window == "build":
    evaluate.offsets_from_sensitivity = wrap(evaluate.offsets_from_sensitivity)
else:
    cli._write_json = wrap(cli._write_json)
if command == "calibrate":
    argv = ["kv", "calibrate", "--text", text, "--samples", "8", "--json", out]
else:
    argv = ["kv", "eval", "--text", text, "--levels", "low,medium,high", "--json", out]
sys.exit(main(argv))
'''


def _wait_for(proc: subprocess.Popen, line: str) -> None:
    assert proc.stdout is not None
    got = proc.stdout.readline().strip()  # (EOF, "", when the child died: the assertion says so)
    assert got == line, f"the child said {got!r}, not {line!r}; stderr: {proc.stderr.read() if proc.stderr else ''}"


@pytest.mark.parametrize(("command", "window"), [("calibrate", "build"), ("calibrate", "write"), ("eval", "write")])
def test_a_second_sigterm_does_not_cost_the_partial_result(tmp_path: Path, command: str, window: str):
    """`timeout -s TERM` signals the command twice (the process, then its group), and the interrupt handler raises
    again 0.5 s later: the calibration built its profile after the first interrupt was handled, so a repeat there
    was a plain interrupt ("interrupted", no file); and both commands wrote after SIGTERM was back at its default,
    so a repeat there killed the process. The repeat comes here at each of those points, after the first."""
    pytest.importorskip("torch")
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    text = tmp_path / "t.txt"
    text.write_text("words")
    out = tmp_path / "result.json"
    proc = subprocess.Popen([sys.executable, str(child), command, window, str(out), str(text)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    watchdog = threading.Timer(120, proc.kill)  # a bound on a hung child, not a timing assertion
    watchdog.start()
    try:
        _wait_for(proc, "WAITING 1")
        proc.send_signal(signal.SIGTERM)
        _wait_for(proc, "WAITING 2")
        proc.send_signal(signal.SIGTERM)
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        _, err = proc.communicate()
    finally:
        watchdog.cancel()
        proc.kill()
    written = tmp_path / ("result.json.partial" if command == "calibrate" else "result.json")
    assert proc.returncode == 130, err
    doc = json.loads(written.read_text())
    assert doc["interrupted"] is True
    if command == "calibrate":
        assert doc["calibration"]["fisher_samples"] == 1 and "a profile from the 1 of 8 samples" in err
    else:
        assert list(doc["levels"]) == ["low"] and "the 1 of 3 levels" in err


def test_kv_bench_refuses_a_bad_level_before_building_its_chunk(capsys):
    from tokenwire.daemon.cli import main

    assert main(["kv", "bench", "--level", "code=99"]) == 2
    err = capsys.readouterr().err
    assert "--level code=99: custom step code must be 0..63" in err and "[kv bench]" not in err
