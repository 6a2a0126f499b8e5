"""``tokenwire kv bench``: entropy-coder throughput next to zstd-1 on the same quantized symbols.

MB/s counts symbols (one byte each) per second. "encode" is symbols -> bytes including the table build
(histogram, normalisation); "decode" is bytes -> symbols including the decoder lookup tables. The full
chunk pipeline (quantize + code, and back) is reported as ``codec_*`` in elements per second. Every number
is the median of ``repeats`` runs, all measured in the same process; ``repeats_MBps`` keeps each run,
``ratios_vs_zstd1`` compares to the same run's zstd-1 and ``load_average`` the host's load at start and end
(kept for older readers; ``provenance`` has it too, with the commit, the libraries and the host).

Each phase says on stderr that it starts (a default run takes ~50 s), and the summary lines end with the full
pipeline's ``codec_*`` MB/s, the figures docs/kv_codec.md quotes, which the summary used to leave out.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from . import codec, rans, rans_torch, tables
from .bitstream import stream_channels_for
from .levels import get_level, profile_for, uniform_profile
from .quant import quantize, token_scales


def synthetic_kv(layers: int, heads: int, head_dim: int, tokens: int, device: str, seed: int = 0
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """KV with the statistics that matter to the codec: per-channel spread and offsets, a few outlier
    key channels, per-token magnitude swings in values, and a strong first token (attention sink)."""
    g = torch.Generator().manual_seed(seed)
    c = heads * head_dim
    out = []
    for _ in range(layers):
        k_scale = torch.exp(torch.empty(c).uniform_(-1.2, 1.1, generator=g))
        k_scale[torch.randperm(c, generator=g)[: max(1, c // 50)]] *= 8.0
        k_mean = torch.randn(c, generator=g) * k_scale * 0.5
        k = torch.randn(tokens, c, generator=g) * k_scale + k_mean
        v_scale = torch.exp(torch.empty(c).uniform_(-1.0, 0.5, generator=g))
        tok = torch.exp(torch.randn(tokens, 1, generator=g) * 0.3)
        v = torch.randn(tokens, c, generator=g) * v_scale * tok
        if tokens:
            k[0] *= 3.0
            v[0] *= 0.2
        shape = (1, tokens, heads, head_dim)
        out.append((k.reshape(shape).permute(0, 2, 1, 3).contiguous().to(device),
                    v.reshape(shape).permute(0, 2, 1, 3).contiguous().to(device)))
    return out


def _repeat_times(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> list[float]:
    """Seconds of each of ``repeats`` timed runs of ``fn``, after one warm-up run (numba compile, CUDA init).

    Every run is kept, not only the median: the JSON reports their spread, without which a loaded run (3.7x
    slower on the shared machine) could not be told from a quiet one.
    """
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def _phase(what: str) -> None:
    """One progress line on stderr as a phase starts: the default run printed nothing for ~50 s after its header."""
    print(f"[kv bench]   {what} ...", file=sys.stderr, flush=True)


def mbps_text(x: float) -> str:
    """MB/s with enough digits to be read: a tiny chunk's rANS encode printed "0 MB/s"."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def numba_threads() -> dict[str, Any]:
    """The threads numba's parallel loops ran on, and its threading layer, as numba itself reports them.

    The JSON read ``NUMBA_NUM_THREADS`` instead, and so said ``null`` whenever the variable was unset although
    numba used every core. The layer is only known once a parallel function has run (else None).
    """
    import numba

    try:
        layer: str | None = numba.threading_layer()
    except ValueError:  # no parallel function has run in this process yet
        layer = None
    return {"numba": numba.get_num_threads(), "numba_threading_layer": layer}


def run_bench(device: str = "cpu", layers: int = 32, heads: int = 8, head_dim: int = 128, tokens: int = 256,
              level: str = "medium", repeats: int = 7, text: str | None = None) -> dict[str, Any]:
    """Throughput of the entropy coder on one realistic chunk, with zstd-1 as the reference.

    By default the chunk is synthetic with Llama-3-8B's KV geometry; with ``text`` it is SmolLM2's real KV
    of the first ``tokens`` tokens of that text (coded with SmolLM2's profile).
    """
    import zstandard

    from tokenwire.daemon.run_provenance import RunProvenance, run_provenance

    # before the chunk is built: the load the measurement starts under (provenance reads the load, once at start
    # and once at the end; load_average repeats its two readings)
    started = RunProvenance()
    load_start = started.load_start
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no CUDA device")
    dev = torch.device(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if text is None:
        kv = synthetic_kv(layers, heads, head_dim, tokens, device)
        prof = uniform_profile(layers, heads * head_dim)
        source = "synthetic"
    else:
        from .evaluate import prefix_kv

        kv_cpu, fingerprint = prefix_kv(text, tokens)
        kv = [(k.to(device), v.to(device)) for k, v in kv_cpu]
        layers, heads, head_dim = len(kv), kv[0][0].shape[1], kv[0][0].shape[3]
        prof = profile_for(fingerprint, layers, heads * head_dim)
        source = "smollm2"
    print(f"[kv bench] {source}: {layers} layers x {heads} heads x {head_dim} dims x {tokens} tokens",
          file=sys.stderr, flush=True)
    _phase("quantizing the chunk, building the tables, one round trip (compiles numba's code on a first run)")
    x, _ = codec.stack_kv(kv)
    lv = get_level(level)
    codes = torch.from_numpy(prof.step_codes(lv).astype(np.int64)).to(dev)
    qz = quantize(x, token_scales(x), codes, raw_tokens=1)
    used, table_of = torch.unique(qz.table_of, return_inverse=True)
    n_tables = int(used.numel())
    n_ch = heads * head_dim
    g = stream_channels_for(tokens, n_ch)
    n_streams = 2 * layers * n_ch // g
    sym = qz.sym.reshape(n_streams, g * tokens)
    seg_table = table_of.reshape(n_streams, g)
    n_sym = sym.numel()

    def build_tables() -> tuple[np.ndarray, np.ndarray]:
        if device == "cuda":
            cnt = torch.bincount((table_of[..., None] * 256 + qz.sym.to(torch.int64)).reshape(-1),
                                 minlength=n_tables * 256).reshape(n_tables, 256).cpu().numpy()
        else:
            cnt = tables.histogram(sym.numpy(), seg_table.numpy().astype(np.int32), n_tables)
        freq = tables.normalize_counts(cnt)
        return freq, tables.cumulative(freq)

    freq, cum = build_tables()
    lut = tables.slot_lut(freq)
    if device == "cuda":
        f_t, c_t = torch.from_numpy(freq.astype(np.int64)), torch.from_numpy(cum.astype(np.int64))

        def enc() -> Any:
            fr, cu = build_tables()
            return rans_torch.encode(sym, seg_table, torch.from_numpy(fr.astype(np.int64)),
                                     torch.from_numpy(cu.astype(np.int64)))

        words, counts = rans_torch.encode(sym, seg_table, f_t, c_t)
        lut_t = torch.from_numpy(lut)

        def dec() -> Any:
            return rans_torch.decode(words, counts, g * tokens, seg_table, f_t, c_t, lut_t)

        out_sym, status = dec()
        n_words = int(words.numel())
    else:
        sym_np = sym.numpy()
        seg_np = seg_table.numpy().astype(np.int32)

        def enc() -> Any:
            fr, cu = build_tables()
            return rans.encode(sym_np, seg_np, fr, cu)

        words_np, counts_np = rans.encode(sym_np, seg_np, freq, cum)

        def dec() -> Any:
            return rans.decode(words_np, counts_np, g * tokens, seg_np, freq, tables.cumulative(freq),
                               tables.slot_lut(freq))

        out_sym, status = dec()
        n_words = int(words_np.size)
    if status != rans.OK or not bool((torch.as_tensor(out_sym).to(dev) == sym).all()):
        raise RuntimeError("round trip failed in the benchmark")
    runs: dict[str, list[float]] = {}  # seconds per repeat, by the MB/s key they give
    _phase(f"rANS encode, {repeats} runs")
    runs["encode"] = _repeat_times(enc, repeats, sync)
    _phase(f"rANS decode, {repeats} runs")
    runs["decode"] = _repeat_times(dec, repeats, sync)

    raw = sym.cpu().numpy().tobytes()
    zc, zd = zstandard.ZstdCompressor(level=1), zstandard.ZstdDecompressor()
    zbytes = zc.compress(raw)
    _phase(f"zstd-1 compress and decompress, {repeats} runs each")
    runs["zstd1_encode"] = _repeat_times(lambda: zc.compress(raw), repeats, lambda: None)
    runs["zstd1_decode"] = _repeat_times(lambda: zd.decompress(zbytes), repeats, lambda: None)

    def codec_enc() -> bytes:
        return codec.encode_chunk(kv, lv, fingerprint=0, raw_tokens=1, profile=prof)

    _phase(f"full codec (quantize + code) encode and decode, {repeats} runs each")
    chunk = codec_enc()
    runs["codec_encode"] = _repeat_times(codec_enc, repeats, sync)
    runs["codec_decode"] = _repeat_times(lambda: codec.decode_chunk(chunk, device=device), repeats, sync)
    provenance = run_provenance(started)
    load_end = provenance["load_average"]["end"]
    mbps = {key: [n_sym / t / 1e6 for t in ts] for key, ts in runs.items()}
    med = {key: statistics.median(v) for key, v in mbps.items()}
    doc: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "backend": "torch" if device == "cuda" else "numba",
        "symbols": n_sym,
        "source": source,
        "shape": {"layers": layers, "kv_heads": heads, "head_dim": head_dim, "tokens": tokens},
        "level": lv.name,
        "encode_MBps": med["encode"],
        "decode_MBps": med["decode"],
        "zstd1_encode_MBps": med["zstd1_encode"],
        "zstd1_decode_MBps": med["zstd1_decode"],
        # words (incl. each stream's final state) + one u16 word count per stream
        "rans_bits_per_symbol": (16 * n_words + 16 * n_streams) / n_sym,
        "zstd1_bits_per_symbol": 8 * len(zbytes) / n_sym,
        "codec_bits_per_element": 8 * len(chunk) / n_sym,
        "codec_encode_MBps": med["codec_encode"],
        "codec_decode_MBps": med["codec_decode"],
        "threads": {**numba_threads(), "torch": torch.get_num_threads()},
        "repeats": repeats,
    }
    # against the zstd-1 measured in this run, the yardstick on a shared machine (only absolute MB/s were written)
    doc["ratios_vs_zstd1"] = {
        "encode_MBps": doc["encode_MBps"] / doc["zstd1_encode_MBps"],  # > 1: rANS faster
        "decode_MBps": doc["decode_MBps"] / doc["zstd1_decode_MBps"],
        "bits_per_symbol": doc["rans_bits_per_symbol"] / doc["zstd1_bits_per_symbol"],  # < 1: rANS smaller
    }
    # what the medians hide: each repeat's MB/s, and the host's load around the run (a loaded run read as a quiet one)
    doc["repeats_MBps"] = {key: {"min": min(v), "max": max(v), "runs": v} for key, v in mbps.items()}
    doc["load_average"] = {"start": load_start, "end": load_end, "cpus": os.cpu_count()}
    doc["provenance"] = provenance
    for key in ("encode", "decode"):
        ours, ref = doc[f"{key}_MBps"], doc[f"zstd1_{key}_MBps"]
        print(f"[kv bench] rANS {key} {mbps_text(ours)} MB/s (runs {mbps_text(min(mbps[key]))}-"
              f"{mbps_text(max(mbps[key]))}), zstd-1 {mbps_text(ref)} MB/s: {ours / ref:.2g}x zstd-1", file=sys.stderr)
    enc_mb, dec_mb = mbps["codec_encode"], mbps["codec_decode"]
    print(f"[kv bench] full codec (quantize + code; MB/s of KV elements) encode {mbps_text(doc['codec_encode_MBps'])}"
          f" MB/s (runs {mbps_text(min(enc_mb))}-{mbps_text(max(enc_mb))}), decode "
          f"{mbps_text(doc['codec_decode_MBps'])} MB/s (runs {mbps_text(min(dec_mb))}-{mbps_text(max(dec_mb))})",
          file=sys.stderr)
    print(f"[kv bench] load average (1 min) {_one_minute(load_start)} at start, {_one_minute(load_end)} at end, "
          f"{os.cpu_count()} cpus", file=sys.stderr)
    return doc


def _one_minute(load: list[float] | None) -> str:
    return "unknown" if load is None else f"{load[0]:.2f}"
