"""Encode and decode KV chunks: quantizer (``quant``) + table bank (``tables``) + rANS (``rans``).

Input KV is a sequence of per-layer ``(K, V)`` tensors shaped ``[1, H, T, D]`` (transformers layout) or
``[H, T, D]``, any float dtype, on CUDA or CPU. Decoding returns ``[1, H, T, D]`` tensors.

Backends: ``"numba"`` (CPU, multi-threaded), ``"torch"`` (vectorized, on the tensors' device: the GPU path)
or ``"auto"`` (torch on CUDA, numba on CPU). Both produce the same bytes.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import bitstream, rans, rans_torch, tables
from .bitstream import Chunk
from .errors import CorruptBitstream, InvalidInput, ModelMismatch
from .levels import Level, Profile, get_level, profile_for
from .quant import dequantize, quantize, scale_values, token_scales
from .shapes import check_kv_layers

KV = Sequence[tuple[torch.Tensor, torch.Tensor]]
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


@dataclass(frozen=True)
class Geometry:
    n_layers: int
    n_heads: int
    head_dim: int
    n_tokens: int


def stack_kv(kv: KV, *, dtype: torch.dtype | None = torch.float32) -> tuple[torch.Tensor, Geometry]:
    """``[L, 2, T, C]`` of a per-layer KV list (channel = head * head_dim + dim), as ``dtype`` (fp32 for the
    codec; ``None`` keeps the input's, for storing it: an fp32 copy of a large context costs twice its size)."""
    layers, (h, t, d) = check_kv_layers(kv)  # (shared with put_kv_unix, which must not import this module)
    first = layers[0][0]
    # one allocation, each layer copied (and converted) straight into it: per-layer reshapes and a stack
    # used to hold the whole context two more times
    x = torch.empty((len(layers), 2, t, h * d), dtype=first.dtype if dtype is None else dtype, device=first.device)
    for i, (k, v) in enumerate(layers):
        # detach (a view, no copy): KV from a forward pass outside no_grad() requires grad, and so would the
        # copy, which .numpy() then refuses
        x[i, 0].view(t, h, d).copy_(k.detach().permute(1, 0, 2))
        x[i, 1].view(t, h, d).copy_(v.detach().permute(1, 0, 2))
    return x, Geometry(len(kv), h, d, t)


def unstack_kv(x: torch.Tensor, n_heads: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inverse of ``stack_kv``: ``[L, 2, T, C]`` -> per-layer ``(K, V)`` of shape ``[1, H, T, D]``."""
    n_layers, _, n_tok, n_ch = x.shape
    y = x.reshape(n_layers, 2, n_tok, n_heads, n_ch // n_heads).permute(0, 1, 3, 2, 4).to(dtype)
    if dtype.is_floating_point and torch.finfo(dtype).max < torch.finfo(x.dtype).max:
        # the one-byte token scale rounds up (65000 -> 2**16), so a finite fp16 input near its range can
        # reconstruct above fp16's max and cast to inf: saturate. Clamping the cast copy in place gives the
        # same values as clamping before the cast (values above max either round to max or to inf) without
        # a second fp32 copy of the chunk.
        big = torch.finfo(dtype).max
        y.clamp_(-big, big)
    return [(y[i, 0][None].contiguous(), y[i, 1][None].contiguous()) for i in range(n_layers)]


def _check_fingerprint(fingerprint: int) -> int:
    """The fingerprint as an int in the header's u64 range (``struct.error`` surfaced from ``pack`` before)."""
    try:
        fp = operator.index(fingerprint)
    except TypeError:
        raise InvalidInput(f"fingerprint must be an integer, got {type(fingerprint).__name__}") from None
    if not 0 <= fp < 2**64:
        raise InvalidInput(f"fingerprint {fp} outside the unsigned 64-bit range")
    return fp


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` this process can allocate on; ``InvalidInput`` naming it otherwise.

    Checked before anything is decoded: on a CPU-only torch ``device="cuda"`` failed at the first allocation
    with a bare ``AssertionError`` ("Torch not compiled with CUDA enabled"), and a misspelt one with torch's
    ``RuntimeError``; the KV client turned either into "chunk does not decode", blaming the data."""
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)  # what the decode's first allocation does: it raises what that would
    except (AssertionError, RuntimeError, TypeError, ValueError) as exc:
        raise InvalidInput(f"device {device!r} is not available here: {exc}") from None
    if dev.type == "meta":  # allocates, but holds no values to decode into
        raise InvalidInput(f"device {device!r} holds no data")
    return dev


def _use_torch(backend: str, device: torch.device) -> bool:
    if backend not in ("auto", "numba", "torch"):
        raise InvalidInput(f"unknown backend {backend!r}")
    return backend == "torch" or (backend == "auto" and device.type != "cpu")


def encode_chunk(kv: KV, level: str | Level, *, fingerprint: int, raw_tokens: int = 0,
                 profile: Profile | None = None, backend: str = "auto") -> bytes:
    """Encode one chunk of tokens at one level into a self-contained bitstream.

    ``raw_tokens`` leading tokens are stored exactly (fp16): pass the level's ``sink_tokens`` for the chunk
    that starts the sequence (``encode_sequence`` does). ``profile`` defaults to the shipped profile whose
    fingerprint matches, else uniform steps.
    """
    lv = get_level(level)
    fingerprint = _check_fingerprint(fingerprint)
    x, geo = stack_kv(kv)
    in_dtype = _DTYPE_NAMES.get(kv[0][0].dtype)
    if in_dtype is None:
        raise InvalidInput(f"unsupported dtype {kv[0][0].dtype}")
    if geo.n_tokens > bitstream.MAX_TOKENS:
        raise InvalidInput(f"chunk of {geo.n_tokens} tokens; the format allows {bitstream.MAX_TOKENS}")
    try:
        raw_tokens = operator.index(raw_tokens)
    except TypeError:
        raise InvalidInput(f"raw_tokens must be an integer, got {type(raw_tokens).__name__}") from None
    if not 0 <= raw_tokens <= min(geo.n_tokens, 255):
        raise InvalidInput("raw_tokens out of range")
    if geo.n_layers > 65535 or geo.n_heads > 65535 or geo.head_dim > 65535:
        raise InvalidInput("geometry too large")
    if not bool(torch.isfinite(x).all()):
        raise InvalidInput("KV contains NaN or infinity")
    if geo.n_tokens and float(x.abs().amax()) >= 2.0**100:
        raise InvalidInput("KV magnitude beyond 2**100")
    prof = profile or profile_for(fingerprint, geo.n_layers, geo.n_heads * geo.head_dim)
    if prof.offsets.shape != (geo.n_layers, 2, geo.n_heads * geo.head_dim):
        raise InvalidInput(f"profile {prof.name} does not fit this model's geometry")
    codes_np = prof.step_codes(lv)
    dev = x.device
    step_codes = torch.from_numpy(codes_np.astype(np.int64)).to(dev)
    scales = token_scales(x)
    qz = quantize(x, scales, step_codes, raw_tokens)
    n_ch = geo.n_heads * geo.head_dim
    g = bitstream.stream_channels_for(geo.n_tokens, n_ch)
    if geo.n_tokens:
        used, table_of = torch.unique(qz.table_of, return_inverse=True)
        n_tables = int(used.numel())
        n_streams = 2 * geo.n_layers * n_ch // g
        sym = qz.sym.reshape(n_streams, g * geo.n_tokens)
        seg_table = table_of.reshape(n_streams, g)
        if _use_torch(backend, dev):
            counts = torch.bincount((table_of[..., None] * 256 + qz.sym.to(torch.int64)).reshape(-1),
                                    minlength=n_tables * 256).reshape(n_tables, 256)
            freq = tables.normalize_counts(counts.cpu().numpy())
            cum = tables.cumulative(freq)
            w, cnt = rans_torch.encode(sym, seg_table, torch.from_numpy(freq.astype(np.int64)),
                                       torch.from_numpy(cum.astype(np.int64)))
            words, wcounts = w.cpu().numpy().astype(np.uint16), cnt.cpu().numpy()
        else:
            sym_np = sym.cpu().numpy()
            seg_np = seg_table.cpu().numpy().astype(np.int32)
            freq = tables.normalize_counts(tables.histogram(sym_np, seg_np, n_tables))
            cum = tables.cumulative(freq)
            words, wcounts = rans.encode(sym_np, seg_np, freq, cum)
        table_of_np = table_of.cpu().numpy().astype(np.uint8)
    else:
        freq = np.zeros((0, 256), np.uint32)
        words, wcounts = np.zeros(0, np.uint16), np.zeros(0, np.uint32)
        table_of_np = np.zeros((geo.n_layers, 2, n_ch), np.uint8)
    raw32 = x[:, :, :raw_tokens].permute(2, 0, 1, 3).cpu()
    fits16 = raw32.numel() == 0 or float(raw32.abs().max()) <= 65504.0
    raw = (raw32.to(torch.float16) if fits16 else raw32).numpy()
    chunk = Chunk(lv.level_id, fingerprint, geo.n_layers, geo.n_heads, geo.head_dim, geo.n_tokens, in_dtype,
                  raw_tokens, g, codes_np, scales.base_exp.cpu().numpy(), scales.codes.cpu().numpy(),
                  qz.centers.cpu().numpy(), qz.modes.cpu().numpy(), table_of_np, freq, raw, wcounts, words)
    return bitstream.pack(chunk)


def decode_chunk(data: bytes | bytearray | memoryview, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, expect_fingerprint: int | None = None,
                 expect_geometry: tuple[int, int, int] | None = None, backend: str = "auto",
                 max_elements: int = bitstream.DEFAULT_MAX_ELEMENTS
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Decode one chunk to per-layer ``(K, V)`` ``[1, H, T, D]`` on ``device``.

    Raises ``TruncatedBitstream``, ``CorruptBitstream``, ``UnsupportedVersion`` or ``ModelMismatch``
    (all ``KVCodecError``) for anything but a valid chunk; chunks above ``max_elements`` are refused.
    A ``device`` this process cannot use (``"cuda"`` on a CPU-only torch) raises ``InvalidInput`` first.
    """
    dev = check_device(device)
    c = bitstream.unpack(data, expect_fingerprint, expect_geometry, max_elements)
    out_dtype = dtype or _DTYPES[c.dtype]
    # The output is allocated before any temporary: placed after each layer's temporaries it fragmented the
    # heap (+2 bytes per element of RSS on glibc).
    shape = (1, c.n_heads, c.n_tokens, c.head_dim)
    out = [(torch.empty(shape, dtype=out_dtype, device=dev), torch.empty(shape, dtype=out_dtype, device=dev))
           for _ in range(c.n_layers)]
    if c.n_tokens == 0:  # nothing to reconstruct (unpack did not even decode the side information)
        return out
    freq = c.freq
    cum = tables.cumulative(freq)
    lut = tables.slot_lut(freq)
    n_streams = c.n_streams
    seg_table = c.table_of.reshape(n_streams, c.stream_channels).astype(np.int32)
    n = c.stream_channels * c.n_tokens
    if _use_torch(backend, dev):
        sym_t, status = rans_torch.decode(
            torch.from_numpy(c.words.astype(np.int32)).to(dev),
            torch.from_numpy(c.counts.astype(np.int64)), n, torch.from_numpy(seg_table),
            torch.from_numpy(freq.astype(np.int64)), torch.from_numpy(cum.astype(np.int64)),
            torch.from_numpy(lut))
    else:
        sym_np, status = rans.decode(c.words, c.counts.astype(np.uint32), n, seg_table, freq, cum, lut)
        sym_t = torch.from_numpy(sym_np)
    if status != rans.OK:
        raise CorruptBitstream(f"entropy-coded payload does not decode (status {status})")
    sym = sym_t.reshape(c.n_layers, 2, c.channels, c.n_tokens).to(dev)
    codes = torch.from_numpy(c.step_codes.astype(np.int64)).to(dev)
    scales = scale_values(torch.from_numpy(c.base_exp.astype(np.int32)).to(dev),
                          torch.from_numpy(c.scale_codes).to(dev))
    centers, modes = torch.from_numpy(c.centers).to(dev), torch.from_numpy(c.modes).to(dev)
    raw = torch.from_numpy(c.raw).to(dev).permute(1, 2, 0, 3) if c.raw_tokens else None
    # One layer at a time: dequantize's int16 and fp32 temporaries for the whole chunk at once peaked at ~17
    # bytes per element (the symbols and the output are 1 + 2..4); the values are the same element by element.
    for i in range(c.n_layers):
        s = slice(i, i + 1)
        x = dequantize(sym[s], centers[s], modes[s], scales[s], codes[s])
        if raw is not None:
            x[:, :, :c.raw_tokens] = raw[s].to(torch.float32)
        [(k, v)] = unstack_kv(x, c.n_heads, out_dtype)
        out[i][0].copy_(k)
        out[i][1].copy_(v)
    return out


def warm_up() -> float:
    """Encode and decode one tiny chunk on the CPU coder; returns the seconds it took.

    The first call compiles the numba kernels (seconds when numba's cache is cold or not writable): a
    daemon does it at start instead of in the first fetch a client waits for, and learns then, not
    mid-fetch, when the JIT cannot run at all (systemd's ``MemoryDenyWriteExecute=yes`` refuses the
    executable memory it needs)."""
    import time

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    kv = [(torch.randn(1, 1, 16, 8, generator=g), torch.randn(1, 1, 16, 8, generator=g))]
    data = encode_chunk(kv, "medium", fingerprint=0, backend="numba")
    decode_chunk(data, backend="numba")
    return time.perf_counter() - t0


def split_tokens(kv: KV, chunk_tokens: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Cut a KV cache into chunks of ``chunk_tokens`` tokens along the token axis (last one shorter)."""
    if chunk_tokens <= 0:
        raise InvalidInput("chunk_tokens must be positive")
    if len(kv) == 0:
        raise InvalidInput("no layers")
    n_tok = kv[0][0].shape[-2]
    return [[(k[..., s:s + chunk_tokens, :], v[..., s:s + chunk_tokens, :]) for k, v in kv]
            for s in range(0, n_tok, chunk_tokens)]


def concat_tokens(chunks: Sequence[KV]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inverse of ``split_tokens``."""
    if len(chunks) == 0:
        raise InvalidInput("no chunks")
    n_layers = len(chunks[0])
    return [(torch.cat([c[i][0] for c in chunks], dim=-2), torch.cat([c[i][1] for c in chunks], dim=-2))
            for i in range(n_layers)]


def encode_sequence(kv: KV, level: str | Level, *, fingerprint: int, chunk_tokens: int = 256,
                    profile: Profile | None = None, backend: str = "auto") -> list[bytes]:
    """Encode a whole prefix KV as independent chunks; the first keeps the level's sink tokens exact.

    An empty KV (0 tokens) is one 0-token chunk, which records the geometry and dtype: ``decode_sequence`` gives
    it back as 0-token tensors (it used to encode to no chunks, which ``decode_sequence`` refuses)."""
    lv = get_level(level)
    out = []
    parts = split_tokens(kv, chunk_tokens) or [list(kv)]
    for i, part in enumerate(parts):
        raw = min(lv.sink_tokens, part[0][0].shape[-2]) if i == 0 else 0
        out.append(encode_chunk(part, lv, fingerprint=fingerprint, raw_tokens=raw, profile=profile,
                                backend=backend))
    return out


def decode_sequence(chunks: Sequence[bytes], **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Decode chunks from ``encode_sequence`` and join them along the token axis.

    Every chunk must be for the first one's model, geometry and dtype (else ``ModelMismatch``): joining
    foreign chunks used to end in a torch size error or a silently promoted dtype. The dtype compared is the one
    each chunk records (read once its CRC has been checked: a corrupted dtype byte is ``CorruptBitstream``), not
    the one it decodes to: with ``dtype=`` every chunk decodes to that one, and an fp16 and an fp32 context's
    chunks were joined without a word.
    """
    if len(chunks) == 0:
        raise InvalidInput("no chunks")
    first = decode_chunk(chunks[0], **kwargs)
    h = bitstream.read_header(chunks[0])
    rest = {**kwargs, "expect_fingerprint": h.fingerprint, "expect_geometry": (h.n_layers, h.n_heads, h.head_dim)}
    out = [first]
    for i, c in enumerate(chunks[1:], start=1):
        kv = decode_chunk(c, **rest)  # (first: its CRC checked, a corrupted dtype field is CorruptBitstream)
        dtype = bitstream.read_header(c).dtype
        if dtype != h.dtype:
            raise ModelMismatch(f"chunk {i} holds {dtype} KV, chunk 0 {h.dtype}")
        out.append(kv)
    return concat_tokens(out)
