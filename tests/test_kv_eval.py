"""The KV evaluation's bookkeeping without namespaces: per-fetch metrics and the per-controller summary."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tokenwire.testbed.kv_eval import KVEvalConfig, fetch_metrics, summarize, timed_out_metrics

TOP1 = {"low": 0.9, "medium": 0.95, "high": 0.98, "text": 1.0}


def result(levels, fetch_ms, deadline_ms=1000, tokens=10):
    chunks = [{"level": lv, "tokens": tokens, "bytes": 100, "first_byte_ms": 1.0, "received_ms": 2.0,
               "decoded_ms": 3.0} for lv in levels]
    return {"result": {"chunks": chunks, "fetch_ms": fetch_ms, "deadline_ms": deadline_ms,
                       "payload_bytes": 100 * len(levels), "levels": levels}}


def test_text_chunks_are_charged_their_recompute():
    m = fetch_metrics(result(["low", "text"], 900.0), elements=800, recompute_us_per_token=20_000, top1=TOP1)
    assert m["fetch_ms"] == 900.0 + 10 * 20.0  # 10 text tokens at 20 ms each
    assert not m["deadline_met"] and math.isclose(m["quality_top1"], 0.95)
    assert m["bits_per_element"] == 200 * 8 / 800


def test_a_timed_out_fetch_is_a_miss_without_quality():
    ok = fetch_metrics(result(["high", "high"], 500.0), elements=800, recompute_us_per_token=0, top1=TOP1)
    lost = timed_out_metrics({"elapsed_s": 160.0, "sent_at": 5.0})
    s = summarize({"tokenwire": [ok, lost]})["tokenwire"]
    assert s["deadline_attainment"] == 0.5 and s["timed_out"] == 1 and s["fetches"] == 2
    assert math.isclose(s["mean_quality_top1"], 0.98)  # quality over the fetches that completed
    assert s["p95_fetch_ms"] == 160_000.0


def test_the_context_cache_is_keyed_by_the_texts_content_not_its_name(tmp_path, monkeypatch):
    """Another file of the same name (or this one edited) must not get the KV computed from the first."""
    import hashlib
    import json

    import tokenwire.transport.cachegen.smollm as smollm
    from tokenwire.testbed.kv_eval import KVEvalConfig, KVEvalError, prepare_context

    monkeypatch.setenv("TOKENWIRE_CACHE", str(tmp_path / "cache"))

    class Prefill(Exception):
        pass

    def no_model(*a, **k):
        raise Prefill  # reaching the model means the cache was (rightly) not used

    monkeypatch.setattr(smollm, "load_smollm2", no_model)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, other = tmp_path / "a" / "prose.txt", tmp_path / "b" / "prose.txt"
    first.write_text("the harbour at dawn\n")
    other.write_text("zebras, entirely zebras\n")
    cfg = KVEvalConfig(down_trace="12mbps", up_trace="12mbps", context_tokens=64, text=str(first))
    with pytest.raises(Prefill):
        prepare_context(cfg, str(tmp_path / "ctx.pt"), log=lambda m: None)
    # what a finished prefill of `first` leaves in the cache
    key = hashlib.sha256(first.read_bytes()).hexdigest()[:16]
    cached = tmp_path / "cache" / f"kvctx-prose-{key}-64.pt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"kv of the harbour")
    cached.with_suffix(".json").write_text(json.dumps({"model": "m", "prefill_s": 1.0, "elements": 8}))
    info = prepare_context(cfg, str(tmp_path / "ctx.pt"), log=lambda m: None)
    assert (tmp_path / "ctx.pt").read_bytes() == b"kv of the harbour"
    assert info["text"] == str(first) and info["text_sha256"].startswith(key)
    with pytest.raises(Prefill):  # same name, other words: not the cached harbour
        prepare_context(KVEvalConfig(down_trace="12mbps", up_trace="12mbps", context_tokens=64, text=str(other)),
                        str(tmp_path / "ctx2.pt"), log=lambda m: None)
    with pytest.raises(KVEvalError, match="--text"):
        missing = KVEvalConfig(down_trace="12mbps", up_trace="12mbps", context_tokens=64,
                               text=str(tmp_path / "none.txt"))
        prepare_context(missing, str(tmp_path / "ctx3.pt"), log=lambda m: None)


def test_kv_eval_refuses_a_single_scored_token(capsys):
    """Perplexity scores tokens 2..n: ``--score 1`` wrote ``"ppl": NaN``, which is not JSON."""
    import argparse

    from tokenwire.transport.cachegen import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["kv", "eval", "--text", "t.txt", "--score", "1"])
    assert "at least 2" in capsys.readouterr().err
    assert parser.parse_args(["kv", "eval", "--text", "t.txt", "--score", "2"]).score == 2


def test_an_unmeasured_perplexity_is_null_in_json_and_na_when_printed(tmp_path, monkeypatch):
    import json

    torch = pytest.importorskip("torch")
    from tokenwire.transport.cachegen import cli, evaluate

    logits = torch.randn(1, 10, dtype=torch.float64)
    setup = evaluate.Setup(lm=None, kv=[], score_ids=torch.tensor([[3]]), ref_logits=logits, prefix=0,
                           prefix_ids=torch.zeros(1, 0, dtype=torch.long))
    monkeypatch.setattr(evaluate, "_logits", lambda s, kv: logits)
    r = evaluate.score(setup, [])  # the library API still allows one scored token
    assert r["top1"] == 1.0 and math.isnan(r["ppl"])
    assert evaluate._fmt(r["ppl"], ".3f") == "n/a" and evaluate._fmt(2.0, ".3f") == "2.000"
    for compact in (False, True):
        path = tmp_path / f"r{compact}.json"
        cli._write_json(str(path), {"levels": {"low": r}}, compact=compact)
        doc = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
        assert doc["levels"]["low"]["ppl"] is None


class _CountingLM:
    """A stand-in for SmolLM2 in ``channel_sensitivity``: logits depend on the KV (so gradients flow), and
    the ``stop_at``-th forward pass is a Ctrl-C."""

    def __init__(self, torch, vocab: int, stop_at: int | None):
        self.torch, self.vocab, self.stop_at, self.calls = torch, vocab, stop_at, 0
        self.model, self.name, self.fingerprint = self, "counting", 7

    def forward(self, ids, past_key_values=None):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        t = self.torch
        k, v = past_key_values[0]
        w = t.arange(self.vocab, dtype=t.float32)
        logits = (k.sum() * w - v.pow(2).sum() * w.flip(0)).expand(1, ids.shape[1], self.vocab)
        return type("Out", (), {"logits": logits})()

    __call__ = forward


def _fisher_setup(torch, evaluate, stop_at):
    gen = torch.Generator().manual_seed(3)
    kv = [(torch.randn(1, 2, 4, 3, generator=gen), torch.randn(1, 2, 4, 3, generator=gen))]
    return evaluate.Setup(lm=_CountingLM(torch, 6, stop_at), kv=kv, score_ids=torch.zeros(1, 5, dtype=torch.long),
                          ref_logits=torch.randn(5, 6, generator=gen), prefix=4,
                          prefix_ids=torch.zeros(1, 4, dtype=torch.long))


def test_a_calibration_interrupted_after_some_samples_averages_exactly_those(monkeypatch):
    """Ctrl-C during ``kv calibrate`` lost every sample taken (an hour on CPU); now the Fisher estimate averages
    the samples done, and equals an uninterrupted run with that many."""
    torch = pytest.importorskip("torch")
    from tokenwire.transport.cachegen import evaluate

    monkeypatch.setattr(evaluate, "cache_from_kv", lambda kv: kv)
    sens2, used2 = evaluate.channel_sensitivity(_fisher_setup(torch, evaluate, None), samples=2)
    sens_cut, used_cut = evaluate.channel_sensitivity(_fisher_setup(torch, evaluate, 3), samples=5)
    assert (used2, used_cut) == (2, 2)
    assert np.all(sens2 > 0) and np.allclose(sens_cut, sens2, rtol=1e-6)
    with pytest.raises(KeyboardInterrupt):  # nothing measured: an ordinary interrupt
        evaluate.channel_sensitivity(_fisher_setup(torch, evaluate, 1), samples=5)

    monkeypatch.setattr(evaluate, "prepare", lambda *a, **k: _fisher_setup(torch, evaluate, 4))
    with pytest.raises(evaluate.Interrupted) as info:
        evaluate.calibrate("text", 4, n_score=5, samples=8)
    doc = info.value.doc
    assert doc["interrupted"] is True and doc["calibration"]["fisher_samples"] == 3
    assert np.asarray(doc["offsets"]).shape == (1, 2, 6)


def test_kv_eval_and_calibrate_write_what_was_measured_when_interrupted(tmp_path, monkeypatch, capsys):
    import json

    pytest.importorskip("torch")
    from tokenwire.daemon.cli import main
    from tokenwire.transport.cachegen import evaluate

    def level(setup, name, chunk_tokens, backend="auto"):
        if name == "high":
            raise KeyboardInterrupt
        return {"bits_per_element": 1.0, "top1": 0.9, "kl": 0.01, "ppl": 5.0}

    monkeypatch.setattr(evaluate, "profile_for", lambda *a: type("P", (), {"name": "p"})())
    monkeypatch.setattr(evaluate, "eval_level", level)
    monkeypatch.setattr(evaluate, "load_smollm2", lambda: pytest.fail("model loaded"))
    text = tmp_path / "t.txt"
    text.write_text("words")

    class FakeSetup:
        lm = type("LM", (), {"name": "m", "fingerprint": 1})()
        kv = ((0, 0),)
        elements = 8

    monkeypatch.setattr(evaluate, "prepare", lambda *a, **k: FakeSetup())
    out = tmp_path / "eval.json"
    assert main(["kv", "eval", "--text", str(text), "--prefix", "1", "--levels", "low,medium,high",
                 "--json", str(out)]) == 130
    doc = json.loads(out.read_text())
    assert doc["interrupted"] is True and list(doc["levels"]) == ["low", "medium"]
    assert "the 2 of 3 levels" in capsys.readouterr().err

    def cut_calibration(*a, **k):
        raise evaluate.Interrupted({"calibration": {"fisher_samples": 5}, "offsets": [[0]], "interrupted": True})

    monkeypatch.setattr(evaluate, "calibrate", cut_calibration)
    out = tmp_path / "profile.json"
    out.write_text("the profile in use")
    assert main(["kv", "calibrate", "--text", str(text), "--samples", "64", "--json", str(out)]) == 130
    assert out.read_text() == "the profile in use"  # not overwritten by a few samples' worth
    assert json.loads((tmp_path / "profile.json.partial").read_text())["calibration"]["fisher_samples"] == 5
    assert "from the 5 of 64 samples" in capsys.readouterr().err


def test_an_interrupted_profile_is_never_picked_by_fingerprint(tmp_path, monkeypatch):
    from importlib import resources

    from tokenwire.transport.cachegen import levels

    prof = tmp_path / "profiles"
    prof.mkdir()
    doc = {"name": "cut", "fingerprint": 42, "offsets": np.ones((2, 2, 4), int).tolist()}
    (prof / "cut.json").write_text(json.dumps({**doc, "interrupted": True}))
    monkeypatch.setattr(resources, "files", lambda pkg: tmp_path)
    assert levels.profile_for(42, 2, 4).name != "cut"
    (prof / "cut.json").write_text(json.dumps(doc))
    assert levels.profile_for(42, 2, 4).name == "cut"


def _kv_config(**kw) -> KVEvalConfig:
    return KVEvalConfig(**{"down_trace": "8mbps", "up_trace": "8mbps", **kw})


def test_a_controller_listed_twice_is_refused():
    """`testbed kv --controllers fixed-L1,fixed-L1` ran both and kept one row (the results are keyed by name)."""
    with pytest.raises(ValueError, match="--controllers: fixed-L1 listed twice"):
        _kv_config(controllers=["fixed-L1", "tokenwire", "fixed-L1"]).validate()


def test_chunk_tokens_past_the_protocols_bound_are_refused_before_a_run():
    """`--chunk-tokens 100000` passed validation and every fetch then failed on the server's KV_META
    ("kvmeta.ct: 100000 out of range [1, 32768]"), after the context's setup."""
    with pytest.raises(ValueError, match=r"--chunk-tokens 100000: .*out of range \[1, 32768\]"):
        _kv_config(chunk_tokens=100_000).validate()
    _kv_config(chunk_tokens=32768, context_tokens=32768).validate()  # the bound itself is a valid chunk


@pytest.mark.parametrize(("kw", "message"), [
    ({"deadline_ms": 3_600_001}, "--deadline-ms 3600001: at most 3600000"),
    ({"context_tokens": 131_073}, "--context-tokens 131073: at most 131072"),
    ({"context_tokens": 131_072, "chunk_tokens": 16}, "is more than 4096 chunks"),
])
def test_fetches_past_the_protocols_bounds_are_refused_before_a_run(kw, message):
    """Each passed validation, and every fetch then failed after the context's setup."""
    with pytest.raises(ValueError, match=message):
        _kv_config(**kw).validate()
    _kv_config(deadline_ms=3_600_000, context_tokens=131_072, chunk_tokens=32).validate()  # the bounds themselves


def test_an_installed_copy_without_the_default_text_says_to_pass_one(tmp_path, monkeypatch):
    """pip install . leaves tests/ behind: `testbed kv` without --text named a site-packages path the user never
    gave ("No such file or directory")."""
    pytest.importorskip("torch")
    from tokenwire.testbed import kv_eval

    gone = tmp_path / "tests" / "data" / "prose_harbor.txt"
    monkeypatch.setattr(kv_eval, "DEFAULT_TEXT", gone)
    cfg = KVEvalConfig(down_trace="x.down", up_trace="x.up", text=str(gone))
    with pytest.raises(kv_eval.KVEvalError, match=r"comes with the source tree.*pass --text FILE"):
        kv_eval.prepare_context(cfg, str(tmp_path / "kv.pt"), log=lambda m: None)


def test_baselines_computes_the_kinds_asked_for_as_the_full_run_does(monkeypatch):
    """``kinds``: a subset (tests/test_kv_codec_model.py needs only lmcache_default, and each baseline costs a
    forward pass of SmolLM2), each entry the one the full run gives; an unknown kind is refused."""
    torch = pytest.importorskip("torch")
    from tokenwire.transport.cachegen import evaluate

    monkeypatch.setattr(evaluate, "cache_from_kv", lambda kv: kv)  # (the stand-in takes the KV list as it is)
    setup = _fisher_setup(torch, evaluate, None)
    full = evaluate.baselines(setup, 2)
    assert list(full) == ["fp16", "int8", "lmcache_default"]
    calls = setup.lm.calls
    assert evaluate.baselines(setup, 2, kinds=("lmcache_default",)) == {"lmcache_default": full["lmcache_default"]}
    assert evaluate.baselines(setup, 2, kinds=("int8",)) == {"int8": full["int8"]}
    assert setup.lm.calls == calls + 2  # one forward pass each
    with pytest.raises(ValueError, match=r"unknown baselines \['fp8'\]"):
        evaluate.baselines(setup, 2, kinds=("fp8", "int8"))
