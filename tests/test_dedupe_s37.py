"""One check for values listed twice, one reader of predictor checkpoints, and CBR flows that keep no dropped
packet (session 37)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from tokenwire.daemon.cli import CLIError


# ------------------------------------------------------------------------------ 1. values listed twice
def test_repeated_groups_the_values_named_more_than_once_in_order():
    from tokenwire.daemon.cli import repeated

    assert repeated([]) == {}
    assert repeated(["a", "b", "c"]) == {}
    # keys in order of first appearance, each with every value that has it, in order
    assert repeated(["b", "a", "c", "a", "b", "a"]) == {"b": ["b", "b"], "a": ["a", "a", "a"]}
    assert list(repeated(["gru", "ar", "ar", "gru"])) == ["gru", "ar"]
    assert repeated([3, 1, 3]) == {3: [3, 3]}
    # a key says when two spellings are one thing
    assert repeated(["A", "b", "a"], key=str.lower) == {"a": ["A", "a"]}
    assert repeated(iter(["x", "x"])) == {"x": ["x", "x"]}  # any iterable, read once


def test_every_listing_option_refuses_a_repeat_with_its_own_error(tmp_path):
    from tokenwire.daemon import demo_cli
    from tokenwire.testbed import sim_cli
    from tokenwire.testbed.kv_eval import KVEvalConfig
    from tokenwire.testbed.swiftqueue_eval import SwiftQueueConfig, SwiftQueueEvalError
    from tokenwire.transport import bench_transport

    def parsed(register, argv):
        p = argparse.ArgumentParser()
        register(p.add_subparsers(dest="cmd"))
        return p.parse_args(argv)

    with pytest.raises(CLIError, match=r"^--schemes: chatterbox, stream listed twice$"):
        sim_cli.run(parsed(sim_cli.register, ["sim", "--schemes", "stream,chatterbox,stream,chatterbox"]))
    with pytest.raises(CLIError, match=r"^--schemes: stream listed twice$"):
        demo_cli.run(parsed(demo_cli.register, ["demo", "--schemes", "stream,chatterbox,stream"]))
    with pytest.raises(CLIError, match=r"^--modes: raw listed twice$"):
        bench_transport.run_cli(argparse.Namespace(modes="raw,stream,raw"))
    with pytest.raises(SwiftQueueEvalError, match=r"^--policies: l4s listed twice$"):
        SwiftQueueConfig(down_trace="12mbps", policies=["l4s", "classic", "l4s"]).validate()
    with pytest.raises(ValueError, match=r"^--controllers: tokenwire listed twice$"):
        KVEvalConfig(down_trace="12mbps", up_trace="12mbps", controllers=["tokenwire", "tokenwire"]).validate()


def test_predictor_options_refuse_repeats_by_value_and_files_by_identity(tmp_path, monkeypatch, capsys):
    from tokenwire.daemon.cli import main
    from tokenwire.predictor.cli import _check_distinct, _check_jobs, file_key, same_file

    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    (tmp_path / "link.npz").symlink_to(a)
    monkeypatch.chdir(tmp_path)
    _check_distinct("--data", ["a.npz", "b.npz"])
    with pytest.raises(CLIError, match=r"^--data: a\.npz given twice; give each file once"):
        _check_distinct("--data", ["a.npz", "b.npz", "a.npz"])
    with pytest.raises(CLIError, match=r"^--data: a\.npz and \./a\.npz are the same file"):
        _check_distinct("--data", ["a.npz", "./a.npz"])
    with pytest.raises(CLIError, match=r"^--data: link\.npz and \./a\.npz are the same file"):
        _check_distinct("--data", ["b.npz", "link.npz", "./a.npz"])
    # missing files are one when their resolved paths are (and same_file says what file_key says)
    with pytest.raises(CLIError, match=r"are the same file"):
        _check_distinct("--data", ["gone.npz", "sub/../gone.npz"])
    assert same_file("a.npz", "link.npz") and not same_file("a.npz", "b.npz")
    assert file_key("gone.npz") == os.path.realpath("gone.npz")
    with pytest.raises(CLIError, match=r"^--seeds: 2, 7 given more than once$"):
        _check_jobs(["t"], [7, 2, 7, 2, 1])
    with pytest.raises(CLIError, match=r"^--traces: x/t\.down given more than once$"):
        _check_jobs(["x/t.down", "x/t.down"], [1])
    with pytest.raises(CLIError, match=r"^--traces: x/t\.down, y/t\.down would be written to the same files"):
        _check_jobs(["x/t.down", "y/t.down"], [1])
    capsys.readouterr()
    assert main(["predictor", "train", "--data", "a.npz", "--kinds", "gru,ar,ar,gru", "--out-dir", "o"]) == 2
    assert "--kinds: gru, ar given more than once; give each kind once" in capsys.readouterr().err


# ------------------------------------------------------------------------------ 2. one checkpoint reader
@pytest.fixture
def checkpoint(tmp_path):
    """A real checkpoint as train writes it (save_checkpoint), with its history."""
    pytest.importorskip("torch")
    from tokenwire.predictor.models import GRUForecaster
    from tokenwire.predictor.train import TrainConfig, save_checkpoint

    path = tmp_path / "gru.pt"
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 0.5, "val_mae_ms": 10.0}]
    save_checkpoint(path, GRUForecaster(window=8), TrainConfig(kind="gru"), history, best_epoch=1)
    return path


def _broken(checkpoint: Path) -> dict[str, Path]:
    """One file per way a checkpoint can be broken or not be one."""
    import torch

    folder = checkpoint.parent
    raw = checkpoint.read_bytes()
    files = {"truncated": raw[: len(raw) // 2], "empty": b"", "json": b'{"kind": "gru"}\n',
             "text": b"hello\n" * 20, "garbage": bytes(range(256)) * 4}
    out = {}
    for name, data in files.items():
        out[name] = folder / f"{name}.pt"
        out[name].write_bytes(data)
    ck = torch.load(checkpoint, weights_only=True)
    for name, obj in {"a_list": [1, 2], "a_tensor": torch.zeros(3),
                      "no_weights": {k: v for k, v in ck.items() if k != "state_dict"},
                      "no_kind": {k: v for k, v in ck.items() if k != "kind"}}.items():
        out[name] = folder / f"{name}.pt"
        torch.save(obj, out[name])
    return out


def test_read_checkpoint_refuses_each_broken_file_with_one_typed_line(checkpoint):
    from tokenwire.predictor.onnx_session import ModelError
    from tokenwire.predictor.train import load_checkpoint, read_checkpoint

    ck = read_checkpoint(checkpoint)
    assert ck["kind"] == "gru" and ck["history"][0]["epoch"] == 1
    with pytest.raises(ModelError, match="no such checkpoint"):
        read_checkpoint(checkpoint.parent / "missing.pt")
    for name, path in _broken(checkpoint).items():
        for reader in (read_checkpoint, load_checkpoint):
            with pytest.raises(ModelError) as info:
                reader(path)
            text = str(info.value)
            assert text.startswith(f"{path}: not a checkpoint written by `tokenwire predictor train` ("), (name, text)
            assert "\n" not in text, (name, text)


@pytest.mark.parametrize("name", ["truncated", "json", "no_weights"])
def test_an_interrupted_runs_broken_checkpoint_is_said_so_and_not_recorded(checkpoint, capsys, name):
    from tokenwire.predictor.cli import _note_interrupted

    out = checkpoint.parent
    broken = _broken(checkpoint)[name]
    os.replace(broken, checkpoint)  # the run's gru.pt
    log: dict = {"models": {}}
    _note_interrupted(out, "gru", log)
    err = capsys.readouterr().err
    assert log == {"models": {}} and not (out / "train.json").exists()
    assert f"warning: gru: interrupted; its checkpoint cannot be read back, nothing recorded of it: {checkpoint}: " \
           "not a checkpoint written by `tokenwire predictor train` (" in err, err


def test_an_interrupted_runs_good_checkpoint_is_still_recorded(checkpoint, capsys):
    from tokenwire.predictor.cli import _note_interrupted

    log: dict = {"models": {}}
    _note_interrupted(checkpoint.parent, "gru", log)
    assert log["models"]["gru"]["best_epoch"] == 1 and log["models"]["gru"]["finished"] is True
    assert json.loads((checkpoint.parent / "train.json").read_text())["models"]["gru"]["best_epoch"] == 1
    assert "gru: interrupted after it finished" in capsys.readouterr().err


def test_evals_stale_check_says_a_broken_gru_pt_was_not_compared(checkpoint):
    from tokenwire.predictor.evaluate import stale_gru

    folder = checkpoint.parent
    meta = {"best_epoch": 1, "epochs_run": 1}
    assert stale_gru(folder, {"best_epoch": 1, "epochs_run": 1, "train_config": None}) is None
    os.replace(_broken(checkpoint)["truncated"], checkpoint)
    why = stale_gru(folder, meta)
    assert why is not None and why.startswith(f"{checkpoint}: not a checkpoint written by"), why
    assert why.endswith(f"; {folder / 'gru.onnx'} was not compared with it"), why
    # train.json still decides when it tells a difference
    history = [{"epoch": e, "val_loss": 1.0 / e} for e in (1, 2, 3)]
    (folder / "train.json").write_text(json.dumps({"models": {"gru": {"best_epoch": 3, "history": history}}}))
    why = stale_gru(folder, meta)
    assert why is not None and "is not an export of the gru that" in why, why


# ------------------------------------------------------------------------------ 3. CBR keeps no dropped packet
def test_cbr_flows_keep_nothing_of_the_packets_the_bottleneck_dropped():
    from tokenwire.testbed.link import Link
    from tokenwire.testbed.packet import ECT1
    from tokenwire.testbed.queues import parse_queue
    from tokenwire.testbed.swiftqueue_eval import OnOffCbrFlow
    from tokenwire.testbed.trace import fixed_rate_trace
    from tokenwire.testbed.vsim import CbrFlow, RenoFlow, Simulation

    # 4 + 2 Mbit/s of unresponsive traffic (and a Reno flow) into 2 Mbit/s with a short drop-tail queue
    link = Link(fixed_rate_trace(2), parse_queue("droptail:packets=20"), delay=0.01)
    sim = Simulation(link)
    cbr = sim.add(CbrFlow(4e6, ecn=ECT1, stop=20.0))
    onoff = sim.add(OnOffCbrFlow(2e6, 0.3, 0.7, size=1200, stop=20.0))
    reno = sim.add(RenoFlow(stop=20.0))
    sim.run(21.0)  # every packet delivered or dropped, every ack in
    assert link.stats.tail_drops > 1000
    delivered = {f.fid: 0 for f in sim.flows}
    for pkt in sim.records:
        if pkt.fate == "delivered":
            delivered[pkt.meta[0]] += 1
    for flow in (cbr, onoff):
        st = flow.stats
        assert st.acked == delivered[flow.fid] and 0 < st.acked < st.sent and st.lost == 0
        assert not flow._inflight, f"{flow.name} keeps {len(flow._inflight)} dropped packets"
    assert reno.stats.acked == delivered[reno.fid]
