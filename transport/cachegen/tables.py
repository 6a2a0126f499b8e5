"""Integer-only construction of rANS frequency tables.

Encoder and decoder build the same tables from the same integers (histogram counts that travel in the
bitstream), with integer arithmetic only, so a table built on a GPU host, a CPU host or another
architecture is identical: one differing entry would make the whole stream undecodable.
"""

from __future__ import annotations

import numpy as np

from . import numba_cache  # noqa: F401  (sets NUMBA_CACHE_DIR before numba reads it)

# isort: split
from numba import njit, prange

from .rans import PROB_BITS, PROB_SCALE


@njit(cache=True, nogil=True)
def _normalize(counts, freq):  # pragma: no cover - compiled
    n_tables, a = counts.shape
    for t in range(n_tables):
        total = 0
        for i in range(a):
            total += counts[t, i]
        if total == 0:
            # an unused table: give the whole range to symbol 0 so that it is still valid
            for i in range(a):
                freq[t, i] = 0
            freq[t, 0] = PROB_SCALE
            continue
        s = 0
        for i in range(a):
            c = counts[t, i]
            f = (c * PROB_SCALE) // total
            if c > 0 and f == 0:
                f = 1
            freq[t, i] = f
            s += f
        # hand the rounding remainder to (or take it from) the largest entries, lowest index first
        while s != PROB_SCALE:
            best = 0
            for i in range(1, a):
                if freq[t, i] > freq[t, best]:
                    best = i
            if s < PROB_SCALE:
                freq[t, best] += PROB_SCALE - s
                s = PROB_SCALE
            else:
                take = min(s - PROB_SCALE, freq[t, best] - 1)
                freq[t, best] -= take
                s -= take


@njit(cache=True, nogil=True, parallel=True)
def _histogram(sym, seg_table, parts):  # pragma: no cover - compiled
    n_streams, n = sym.shape
    segs = seg_table.shape[1]
    seg_len = n // segs
    n_parts = parts.shape[0]
    per = (n_streams + n_parts - 1) // n_parts
    for p in prange(n_parts):
        for s in range(p * per, min(n_streams, (p + 1) * per)):
            for g in range(segs):
                t = seg_table[s, g]
                for i in range(g * seg_len, (g + 1) * seg_len):
                    parts[p, t, sym[s, i]] += 1


def histogram(sym: np.ndarray, seg_table: np.ndarray, n_tables: int) -> np.ndarray:
    """Symbol counts per table ``[n_tables, 256]`` for the stream layout of ``rans.encode`` (CPU path).

    Equal to ``torch.bincount`` over (table, symbol) pairs, which the GPU path uses: counts are integers.
    """
    n_parts = 16
    parts = np.zeros((n_parts, n_tables, 256), np.int64)
    _histogram(np.ascontiguousarray(sym, np.uint8), np.ascontiguousarray(seg_table, np.int32), parts)
    return parts.sum(axis=0)


def normalize_counts(counts: np.ndarray) -> np.ndarray:
    """Turn non-negative integer counts ``[tables, A]`` into 12-bit frequencies that sum to 4096.

    Every symbol with a non-zero count keeps a non-zero frequency, so it stays encodable.
    Needs ``A <= 4096``.
    """
    counts = np.ascontiguousarray(counts, np.int64)
    if counts.ndim != 2 or counts.shape[1] > PROB_SCALE:
        raise ValueError("counts must be [tables, A] with A <= 4096")
    if (counts < 0).any():
        raise ValueError("negative count")
    freq = np.empty(counts.shape, np.uint32)
    _normalize(counts, freq)
    return freq


def cumulative(freq: np.ndarray) -> np.ndarray:
    """``cum[t, a] = sum(freq[t, :a])`` as uint32 ``[tables, A]``."""
    cum = np.zeros(freq.shape, np.uint32)
    np.cumsum(freq[:, :-1], axis=1, out=cum[:, 1:])
    return cum


def slot_lut(freq: np.ndarray) -> np.ndarray:
    """Decoder lookup ``lut[t, slot] -> symbol`` for all 4096 slots (uint8; needs A <= 256)."""
    n_tables, a = freq.shape
    if a > 256:
        raise ValueError("alphabet too large for a uint8 lookup table")
    reps = freq.astype(np.int64).ravel()
    syms = np.tile(np.arange(a, dtype=np.uint8), n_tables)
    return np.repeat(syms, reps).reshape(n_tables, PROB_SCALE)


__all__ = ["PROB_BITS", "PROB_SCALE", "cumulative", "histogram", "normalize_counts", "slot_lut"]
