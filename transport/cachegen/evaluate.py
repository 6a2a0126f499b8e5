"""Quality and size of KV codecs on the real SmolLM2-135M (``tokenwire kv eval`` / ``kv calibrate``).

Protocol: tokenize a text, compute the KV of the first ``prefix`` tokens, replace it by its
encoded-then-decoded version, feed the next ``n_score`` tokens (teacher forcing) and compare each position's
next-token distribution with the one computed from the exact KV: top-1 agreement, KL(exact || decoded), and
perplexity of the actual next tokens. Baselines are computed in the same run on the same KV.
"""

from __future__ import annotations

import inspect
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import codec
from .levels import LADDER, TEXT, Profile, get_level, offsets_from_sensitivity, profile_for
from .quant import step_value
from .smollm import LoadedModel, cache_from_kv, kv_from_cache, load_smollm2

KVList = list[tuple[torch.Tensor, torch.Tensor]]


def _say(msg: str, command: str = "kv eval") -> None:
    print(f"[{command}] {msg}", file=sys.stderr, flush=True)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C after part of a long run was measured: ``doc`` holds that part (marked ``"interrupted": true``)
    so the CLI can write it before exiting; a calibration's first hour used to be lost. To any other caller
    it is still a KeyboardInterrupt."""

    def __init__(self, doc: dict[str, Any]) -> None:
        super().__init__()
        self.doc = doc


@dataclass
class Setup:
    lm: LoadedModel
    kv: KVList  # exact prefix KV, fp32 [1, H, T, D] per layer
    score_ids: torch.Tensor  # [1, n_score]
    ref_logits: torch.Tensor  # [n_score, vocab]
    prefix: int
    prefix_ids: torch.Tensor  # [1, prefix]
    prefill_s: float = 0.0

    @property
    def elements(self) -> int:
        k = self.kv[0][0]
        return 2 * len(self.kv) * k.numel()


def _cache_kwarg(model: Any) -> str:
    """transformers 5.x renamed ``past_key_values`` to ``cache``; use whichever this version takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def prepare(text: str, prefix: int, n_score: int = 256, lm: LoadedModel | None = None) -> Setup:
    """Prefill ``prefix`` tokens of ``text`` and record the reference logits of the next ``n_score``."""
    lm = lm or load_smollm2()
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    if ids.shape[1] < prefix + n_score:
        raise ValueError(f"text has {ids.shape[1]} tokens, need prefix {prefix} + {n_score} scored")
    pre, nxt = ids[:, :prefix], ids[:, prefix:prefix + n_score]
    with torch.no_grad():
        lm.model(pre[:, :8])  # warm-up, so that prefill_s times the prefill and not one-off initialisation
    t0 = time.perf_counter()
    with torch.no_grad():
        out = lm.model(pre, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        kv = [(k.detach().clone(), v.detach().clone()) for k, v in kv_from_cache(cache)]
    setup = Setup(lm, kv, nxt, torch.empty(0), prefix, pre, time.perf_counter() - t0)
    setup.ref_logits = _logits(setup, kv)
    return setup


def prefix_kv(text: str, prefix: int, lm: LoadedModel | None = None) -> tuple[KVList, int]:
    """Real KV of the first ``prefix`` tokens of ``text`` and the model fingerprint (for benchmarks)."""
    lm = lm or load_smollm2()
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, :prefix]
    if ids.shape[1] < prefix:
        raise ValueError(f"text has {ids.shape[1]} tokens, need {prefix}")
    with torch.no_grad():
        out = lm.model(ids, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        return [(k.detach().clone(), v.detach().clone()) for k, v in kv_from_cache(cache)], lm.fingerprint


def _logits(setup: Setup, kv: KVList) -> torch.Tensor:
    model = setup.lm.model
    kv32 = [(k.to(torch.float32).clone(), v.to(torch.float32).clone()) for k, v in kv]
    with torch.no_grad():
        out = model(setup.score_ids, **{_cache_kwarg(model): cache_from_kv(kv32)})
    return out.logits[0].to(torch.float64)


def score(setup: Setup, kv: KVList) -> dict[str, float]:
    """top-1 agreement, mean KL(exact || decoded) and perplexity of the scored tokens."""
    logits = _logits(setup, kv)
    lp_ref = torch.log_softmax(setup.ref_logits, -1)
    lp = torch.log_softmax(logits, -1)
    kl = float((lp_ref.exp() * (lp_ref - lp)).sum(-1).mean())
    top1 = float((setup.ref_logits.argmax(-1) == logits.argmax(-1)).double().mean())
    tgt = setup.score_ids[0, 1:]
    # position i predicts scored token i + 1: one scored token leaves no target, and its mean was NaN
    ppl = math.exp(float(-lp[:-1].gather(1, tgt[:, None]).mean())) if tgt.numel() else math.nan
    return {"top1": top1, "kl": kl, "ppl": ppl}


def _fmt(value: float, spec: str) -> str:
    """A progress-line number, ``n/a`` for one the run could not measure (NaN ppl)."""
    return format(value, spec) if math.isfinite(value) else "n/a"


# --- baselines -------------------------------------------------------------------------------------------

def per_token_absmax(kv: KVList, bins_k: Sequence[int], bins_v: Sequence[int]
                     ) -> tuple[KVList, list[torch.Tensor]]:
    """LMCache/CacheGen quantization: per (layer, token) abs-max over all channels, ``bins - 1`` levels.

    Returns the dequantized KV and the symbols per (layer, K/V) as ``[T, C]`` (for entropy accounting).
    """
    out, syms = [], []
    for i, (k, v) in enumerate(kv):
        pair = []
        for x, bins in ((k, bins_k[i]), (v, bins_v[i])):
            h, t, d = x.shape[1:]
            y = x[0].permute(1, 0, 2).reshape(t, h * d).to(torch.float32)
            top = bins // 2 - 1
            amax = y.abs().amax(-1, keepdim=True).to(torch.float16).to(torch.float32).clamp(min=1e-30)
            q = torch.round(y * top / amax + top)
            syms.append(q.to(torch.int64))
            yh = (q - top) / top * amax
            pair.append(yh.reshape(t, h, d).permute(1, 0, 2)[None].to(x.dtype))
        out.append((pair[0], pair[1]))
    return out, syms


def channel_entropy_bits(syms: Sequence[torch.Tensor], chunk: int) -> float:
    """Sum over (layer, K/V, channel, chunk) of the empirical entropy: an ideal coder with free tables."""
    total = 0.0
    for q in syms:
        for s in range(0, q.shape[0], chunk):
            part = q[s:s + chunk].T.contiguous()  # [C, t]
            part = part - part.min(dim=1, keepdim=True).values
            width = int(part.max()) + 1
            hist = torch.zeros(part.shape[0], width, dtype=torch.float64)
            hist.scatter_add_(1, part, torch.ones_like(part, dtype=torch.float64))
            p = hist / part.shape[1]
            total += float(-(hist * torch.where(p > 0, p.log2(), torch.zeros_like(p))).sum())
    return total


def lmcache_default_bins(n_layers: int) -> tuple[list[int], list[int]]:
    """LMCache's default CacheGenConfig for models with >= 10 layers (research/cachegen.md §1.2)."""
    if n_layers < 10:
        return [32] * n_layers, [32] * n_layers
    return [32] * 10 + [16] * (n_layers - 10), [32] * 2 + [16] * (n_layers - 2)


BASELINES = ("fp16", "int8", "lmcache_default")


def baselines(setup: Setup, chunk_tokens: int, kinds: Sequence[str] = BASELINES) -> dict[str, dict[str, float]]:
    """fp16, int8 (8-bit per-token, no entropy coding) and LMCache's default CacheGen configuration; ``kinds``
    names a subset (each costs a forward pass of the scored tokens)."""
    unknown = set(kinds) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown baselines {sorted(unknown)}; known: {', '.join(BASELINES)}")
    n_layers = len(setup.kv)
    n_ch = setup.kv[0][0].shape[1] * setup.kv[0][0].shape[3]
    n_el = setup.elements
    res: dict[str, dict[str, float]] = {}
    if "fp16" in kinds:
        fp16 = [(k.half(), v.half()) for k, v in setup.kv]
        res["fp16"] = {"bits_per_element": 16.0, **score(setup, fp16)}
    if "int8" in kinds:
        int8, _ = per_token_absmax(setup.kv, [256] * n_layers, [256] * n_layers)
        res["int8"] = {"bits_per_element": 8.0 + 16.0 / n_ch, **score(setup, int8)}
    if "lmcache_default" not in kinds:
        return res
    bk, bv = lmcache_default_bins(n_layers)
    lmc, syms = per_token_absmax(setup.kv, bk, bv)
    ideal = channel_entropy_bits(syms, chunk_tokens)
    scales = 2 * n_layers * setup.prefix * 16
    # What LMCache ships on top: an int16 CDF [2L, C, 33] per chunk (research/cachegen.md §1.2).
    cdf = 2 * n_layers * n_ch * 33 * 16 * math.ceil(setup.prefix / chunk_tokens)
    res["lmcache_default"] = {
        "bits_per_element": (ideal + scales) / n_el,
        "bits_per_element_with_cdf": (ideal + scales + cdf) / n_el,
        **score(setup, lmc),
    }
    return res


# --- codec levels ----------------------------------------------------------------------------------------

def eval_level(setup: Setup, level: str, chunk_tokens: int, profile: Profile | None = None,
               backend: str = "auto") -> dict[str, Any]:
    """Encode the prefix KV at ``level``, decode it, and score it; sizes are the real bitstream bytes."""
    lv = get_level(level)
    t0 = time.perf_counter()
    chunks = codec.encode_sequence(setup.kv, lv, fingerprint=setup.lm.fingerprint, chunk_tokens=chunk_tokens,
                                   profile=profile, backend=backend)
    t1 = time.perf_counter()
    kv_hat = codec.decode_sequence(chunks, expect_fingerprint=setup.lm.fingerprint, backend=backend)
    t2 = time.perf_counter()
    n_bytes = sum(len(c) for c in chunks)
    return {"bits_per_element": 8.0 * n_bytes / setup.elements, **score(setup, kv_hat), "bytes": n_bytes,
            "chunks": len(chunks), "encode_s": t1 - t0, "decode_s": t2 - t1}


def eval_text(setup: Setup) -> dict[str, Any]:
    """The channel's fallback: send the prefix as UTF-8 text and recompute its KV (exact, costs a prefill)."""
    n_bytes = len(setup.lm.tokenizer.decode(setup.prefix_ids[0]).encode())
    return {"bits_per_element": 8.0 * n_bytes / setup.elements, **score(setup, setup.kv), "bytes": n_bytes,
            "recompute_s": setup.prefill_s}


def run_eval(text: str, prefix: int, levels: Sequence[str], chunk_tokens: int = 256, n_score: int = 256,
             backend: str = "auto") -> dict[str, Any]:
    """Everything ``tokenwire kv eval`` reports, as a JSON-ready dict."""
    for name in levels:  # a bad level (code=64) is refused before the model loads, not after the first levels
        if name != TEXT:
            get_level(name)
    t0 = time.perf_counter()
    setup = prepare(text, prefix, n_score)
    _say(f"prefix {prefix} tokens prefilled, reference computed ({time.perf_counter() - t0:.1f} s)")
    out: dict[str, Any] = {"model": setup.lm.name, "prefix": prefix, "scored_tokens": n_score,
                           "chunk_tokens": chunk_tokens, "ladder": describe_ladder(),
                           "profile": profile_for(setup.lm.fingerprint, len(setup.kv), setup.elements
                                                  // (2 * len(setup.kv) * prefix)).name,
                           "levels": {}, "baselines": {}}
    try:
        for name in levels:
            r = eval_text(setup) if name == TEXT else eval_level(setup, name, chunk_tokens, backend=backend)
            out["levels"][name] = r
            _say(f"level {name}: {r['bits_per_element']:.3f} bits/element, top-1 {r['top1']:.3f}, "
                 f"KL {r['kl']:.4f}, ppl {_fmt(r['ppl'], '.3f')}")
        out["baselines"] = baselines(setup, chunk_tokens)
    except KeyboardInterrupt:
        if not out["levels"]:
            raise
        out["interrupted"] = True  # the levels measured so far; the baselines only if all were
        raise Interrupted(out) from None
    for name, r in out["baselines"].items():
        _say(f"baseline {name}: {r['bits_per_element']:.3f} bits/element, top-1 {r['top1']:.3f}, "
             f"ppl {_fmt(r['ppl'], '.3f')}")
    return out


# --- calibration -----------------------------------------------------------------------------------------

class _SamplesCut(KeyboardInterrupt):
    """An interrupt after ``used`` Fisher samples, raised from inside the handling of the interrupt itself with
    the sensitivities they give: a caller builds the partial profile in its own ``except`` block, so that
    ``sigterm_as_ctrl_c`` ignores a repeat (its retry timer, ``timeout``'s second SIGTERM) until that profile is
    written. Swallowed here, the profile was built with no interrupt being handled, and a repeat then was a
    plain KeyboardInterrupt: no ``.partial`` file (2 of 4 runs under ``timeout -s TERM``)."""

    def __init__(self, sens: np.ndarray, used: int) -> None:
        super().__init__()
        self.sens, self.used = sens, used


def channel_sensitivity(setup: Setup, samples: int = 16, seed: int = 0) -> tuple[np.ndarray, int]:
    """Expected KL increase per squared relative step, per (layer, K/V, channel), from the Fisher diagonal,
    and the number of label samples it averages: fewer than ``samples`` after a Ctrl-C past the first.

    For a small perturbation ``e`` of the KV, KL(p || p_e) ~ 1/2 e^T F e. Quantization with step
    ``d * s_t`` adds independent noise of variance ``(d s_t)**2 / 12``, so a channel's expected KL is
    ``d**2 * sum_t F_tt s_t**2 / 24``. ``F`` is estimated without bias by squaring the gradient of the
    log-likelihood of labels sampled from the model itself (cross terms vanish in expectation), averaged
    over ``samples`` draws. One backward pass per draw replaces hundreds of perturb-and-score runs; per head,
    the two agree with a log-correlation of 0.92 on SmolLM2 (docs/kv_codec.md).
    """
    try:
        return _channel_sensitivity(setup, samples, seed)
    except _SamplesCut as cut:
        return cut.sens, cut.used


def _channel_sensitivity(setup: Setup, samples: int, seed: int) -> tuple[np.ndarray, int]:
    """:func:`channel_sensitivity`, raising :class:`_SamplesCut` (with the samples' sensitivities) when
    interrupted after a sample; before the first, the interrupt itself."""
    model = setup.lm.model
    kv = [(k.detach().clone().requires_grad_(True), v.detach().clone().requires_grad_(True))
          for k, v in setup.kv]
    flat = [t for pair in kv for t in pair]
    acc = [torch.zeros_like(t) for t in flat]
    probs = torch.softmax(setup.ref_logits, -1).to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    used = 0
    try:
        for i in range(samples):
            labels = torch.multinomial(probs, 1, generator=gen)[:, 0]
            out = model(setup.score_ids, **{_cache_kwarg(model): cache_from_kv(kv)})
            loglik = torch.log_softmax(out.logits[0].to(torch.float32), -1).gather(1, labels[:, None]).sum()
            grads = torch.autograd.grad(loglik, flat)
            # one assignment, so a Ctrl-C never leaves some channels with a sample more than others
            acc, used = [a + g.detach() ** 2 for a, g in zip(acc, grads, strict=True)], i + 1
            _say(f"calibration sample {used}/{samples}", "kv calibrate")
    except KeyboardInterrupt:
        if not used:
            raise
        _say(f"interrupted: the profile averages the {used} samples taken", "kv calibrate")
        raise _SamplesCut(_sensitivity(setup, acc, used), used) from None  # (see _SamplesCut: still handling it)
    return _sensitivity(setup, acc, used), used


def _sensitivity(setup: Setup, acc: list[torch.Tensor], used: int) -> np.ndarray:
    """Per (layer, K/V, channel) sensitivities from the squared gradients summed over ``used`` samples."""
    n_layers = len(setup.kv)
    n_heads, head_dim = setup.kv[0][0].shape[1], setup.kv[0][0].shape[3]
    n_pos = setup.score_ids.shape[1]
    sens = np.zeros((n_layers, 2, n_heads * head_dim))
    for li in range(n_layers):
        for j in range(2):
            x = setup.kv[li][j][0]  # [H, T, D]
            scale = x.abs().amax(dim=(0, 2))  # the codec's per-token scale: abs-max over all heads
            fisher = acc[2 * li + j][0] / used
            # the KL reported is a mean over scored positions
            per = (fisher * scale[None, :, None] ** 2).sum(dim=1) / 24 / n_pos  # [H, D]
            sens[li, j] = per.reshape(-1).numpy()
    return sens


def calibrate(text: str, prefix: int, n_score: int = 256, samples: int = 64, key_bias: int = 3,
              with_sensitivity: bool = False) -> dict[str, Any]:
    """A step profile for the loaded model: per-channel step-code offsets from Fisher sensitivities.

    ``key_bias`` codes are added to every key channel: the Fisher estimate under-rates keys a little (KL
    at equal size was lowest with +2..+4 on SmolLM2, measured on texts other than the calibration text).

    Interrupted after a sample: :class:`Interrupted` with the profile of the samples taken, built while that
    interrupt is still being handled (see :class:`_SamplesCut`).
    """
    setup = prepare(text, prefix, n_score)
    try:
        sens, used = _channel_sensitivity(setup, samples, 0)
    except _SamplesCut as cut:
        doc = _profile(setup, prefix, n_score, cut.sens, cut.used, key_bias, with_sensitivity)
        doc["interrupted"] = True
        raise Interrupted(doc) from None
    return _profile(setup, prefix, n_score, sens, used, key_bias, with_sensitivity)


def _profile(setup: Setup, prefix: int, n_score: int, sens: np.ndarray, used: int, key_bias: int,
             with_sensitivity: bool) -> dict[str, Any]:
    """The profile document of sensitivities ``sens`` from ``used`` samples."""
    offsets = offsets_from_sensitivity(sens)
    offsets[:, 0] += key_bias
    doc: dict[str, Any] = {
        "name": "smollm2-135m", "fingerprint": setup.lm.fingerprint, "model": setup.lm.name,
        "calibration": {"prefix": prefix, "scored_tokens": n_score, "fisher_samples": used,
                        "key_bias": key_bias},
        "offsets": offsets.tolist(),
    }
    if with_sensitivity:
        doc["sensitivity"] = [[[float(f"{v:.4g}") for v in row] for row in layer] for layer in sens]
    return doc


def describe_ladder() -> list[dict[str, Any]]:
    return [{"name": lv.name, "id": lv.level_id, "base_code": lv.base_code,
             "base_rel_step": step_value(lv.base_code)} for lv in LADDER]
