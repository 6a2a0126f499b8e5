"""Multi-stream rANS in vectorized torch: the GPU path, and a CPU twin for tests.

Same coder, same bytes as ``rans.py`` (numba): all streams advance one symbol per step, so a step is a
handful of tensor ops over every stream at once. It runs wherever torch runs; on a GPU it is bound by
kernel launches (~15 per symbol position), which is why streams are kept to ~2048 symbols.
All arithmetic is int64 on values below 2**32, so CPU and CUDA agree exactly.
"""

from __future__ import annotations

import torch

from .rans import ERR_LEFTOVER, ERR_OVERRUN, OK, PROB_BITS, PROB_SCALE, STATE_LOW


def _flat_tables(freq: torch.Tensor, cum: torch.Tensor, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    return (freq.to(device=device, dtype=torch.int64).reshape(-1),
            cum.to(device=device, dtype=torch.int64).reshape(-1))


def encode(sym: torch.Tensor, seg_table: torch.Tensor, freq: torch.Tensor, cum: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``sym[S, n]`` (uint8) on its device; returns (words uint16-valued int32, counts int64)."""
    dev = sym.device
    n_streams, n = sym.shape
    if n_streams == 0:
        return torch.zeros(0, dtype=torch.int32, device=dev), torch.zeros(0, dtype=torch.int64, device=dev)
    n_alpha = freq.shape[1]
    f_flat, c_flat = _flat_tables(freq, cum, dev)
    segs = seg_table.shape[1]
    seg_len = n // segs
    base = seg_table.to(device=dev, dtype=torch.int64) * n_alpha  # [S, segs]
    symbols = sym.to(torch.int64)
    cap = n + 2
    out = torch.zeros((n_streams, cap + 1), dtype=torch.int64, device=dev)  # last column: scratch
    pos = torch.full((n_streams,), cap, dtype=torch.int64, device=dev)
    x = torch.full((n_streams,), STATE_LOW, dtype=torch.int64, device=dev)
    scratch = torch.full((n_streams,), cap, dtype=torch.int64, device=dev)
    for i in range(n - 1, -1, -1):
        idx = base[:, i // seg_len] + symbols[:, i]
        f = f_flat[idx]
        c = c_flat[idx]
        emit = x >= (f << (32 - PROB_BITS))
        pos = pos - emit.to(torch.int64)
        out.scatter_(1, torch.where(emit, pos, scratch)[:, None], (x & 0xFFFF)[:, None])
        x = torch.where(emit, x >> 16, x)
        x = ((x // f) << PROB_BITS) + (x % f) + c
    out[:, :cap].scatter_(1, (pos - 1)[:, None], (x >> 16)[:, None])
    out[:, :cap].scatter_(1, (pos - 2)[:, None], (x & 0xFFFF)[:, None])
    pos = pos - 2
    counts = cap - pos
    cols = torch.arange(cap, device=dev)[None, :]
    words = out[:, :cap][cols >= pos[:, None]]  # row-major: stream after stream, each in decode order
    return words.to(torch.int32), counts


def decode(words: torch.Tensor, counts: torch.Tensor, n: int, seg_table: torch.Tensor, freq: torch.Tensor,
           cum: torch.Tensor, lut: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Decode on ``words``' device; returns (sym uint8 ``[S, n]``, worst status as in ``rans.decode``)."""
    dev = words.device
    n_streams = counts.shape[0]
    sym = torch.zeros((n_streams, n), dtype=torch.uint8, device=dev)
    if n_streams == 0:
        return sym, OK
    counts = counts.to(device=dev, dtype=torch.int64)
    w = words.to(torch.int64)
    n_words = w.shape[0]
    if int(counts.sum()) != n_words or bool((counts < 2).any()):
        return sym, ERR_OVERRUN
    ends = torch.cumsum(counts, 0)
    p = ends - counts
    x = w[p] | (w[p + 1] << 16)
    p = p + 2
    bad_state = x < STATE_LOW
    n_alpha = freq.shape[1]
    f_flat, c_flat = _flat_tables(freq, cum, dev)
    lut_flat = lut.to(device=dev, dtype=torch.int64).reshape(-1)
    segs = seg_table.shape[1]
    seg_len = n // segs
    tab = seg_table.to(device=dev, dtype=torch.int64)
    overrun = torch.zeros(n_streams, dtype=torch.bool, device=dev)
    for i in range(n):
        t = tab[:, i // seg_len]
        slot = x & (PROB_SCALE - 1)
        v = lut_flat[t * PROB_SCALE + slot]
        sym[:, i] = v.to(torch.uint8)
        idx = t * n_alpha + v
        x = f_flat[idx] * (x >> PROB_BITS) + slot - c_flat[idx]
        need = x < STATE_LOW
        overrun |= need & (p >= ends)
        nxt = w[p.clamp(max=n_words - 1)]
        x = torch.where(need, ((x << 16) | nxt) & 0xFFFFFFFF, x)
        p = p + need.to(torch.int64)
    if bool((bad_state | overrun).any()):
        return sym, ERR_OVERRUN
    if bool(((p != ends) | (x != STATE_LOW)).any()):
        return sym, ERR_LEFTOVER
    return sym, OK
