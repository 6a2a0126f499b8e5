"""Multi-stream rANS entropy coder, CPU path (numba).

Why hand-written: no maintained Python library offers a multi-stream rANS whose bitstream can be
reproduced bit for bit by a vectorized GPU twin (``rans_torch``); constriction holds the GIL and decodes at
35-55 MB/s here, torchac is GPL-3 and 11-16 MB/s (research/cachegen.md §2.2).

Coder parameters (fixed by format version 1):

* state: 32-bit, kept in ``[2**16, 2**32)``; renormalisation emits/consumes one 16-bit word;
* probabilities: 12-bit (frequencies sum to 4096), so each symbol moves at most one word;
* each stream is ``n`` symbols split into ``segs`` equal segments, each coded with its own table
  (a segment is one channel's tokens: the tables follow the data's natural grouping);
* stream layout, in decode order: low and high half of the final encoder state, then the words.

Tables are plain integer arrays; ``tables.py`` builds them with integer-only arithmetic, so the same
table is produced on every machine and device.
"""

from __future__ import annotations

import numpy as np

from . import numba_cache  # noqa: F401  (sets NUMBA_CACHE_DIR before numba reads it)

# isort: split
from numba import njit, prange

PROB_BITS = 12
PROB_SCALE = 1 << PROB_BITS
STATE_LOW = 1 << 16
WORD_BITS = 16

# Error codes returned by the decoder kernel (raised as typed errors by the caller).
OK = 0
ERR_OVERRUN = 1  # a stream wanted more words than it has
ERR_LEFTOVER = 2  # words left over, or the final state is not the initial one
ERR_BADSTATE = 3  # the stored state is outside the valid range


@njit(cache=True, nogil=True, parallel=True)
def _encode_kernel(sym, seg_table, freq, cum, per_block, out, counts, used):  # pragma: no cover - compiled
    n_streams, n = sym.shape
    segs = seg_table.shape[1]
    seg_len = n // segs
    cap = n + 2
    for b in prange(out.shape[0]):
        # each stream is coded backwards into a small scratch (stays in L1), then appended to the block's
        # output: only the pages actually used get touched
        scratch = np.empty(cap, np.uint16)
        cursor = 0
        for s in range(b * per_block, min(n_streams, (b + 1) * per_block)):
            x = np.uint32(STATE_LOW)
            pos = cap
            for g in range(segs - 1, -1, -1):
                t = seg_table[s, g]
                base = g * seg_len
                for i in range(base + seg_len - 1, base - 1, -1):
                    v = sym[s, i]
                    f = np.uint32(freq[t, v])
                    c = np.uint32(cum[t, v])
                    if x >= (f << np.uint32(32 - PROB_BITS)):
                        pos -= 1
                        scratch[pos] = np.uint16(x & np.uint32(0xFFFF))
                        x = x >> np.uint32(16)
                    x = ((x // f) << np.uint32(PROB_BITS)) + (x % f) + c
            pos -= 1
            scratch[pos] = np.uint16(x >> np.uint32(16))
            pos -= 1
            scratch[pos] = np.uint16(x & np.uint32(0xFFFF))
            k = cap - pos
            out[b, cursor:cursor + k] = scratch[pos:cap]
            counts[s] = k
            cursor += k
        used[b] = cursor


@njit(cache=True, nogil=True, parallel=True)
def _gather_kernel(out, used, offsets, words):  # pragma: no cover - compiled
    for b in prange(out.shape[0]):
        o = offsets[b]
        for i in range(used[b]):
            words[o + i] = out[b, i]


def encode(sym: np.ndarray, seg_table: np.ndarray, freq: np.ndarray, cum: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """Encode ``sym[S, n]`` (uint8); returns (words uint16, per-stream word counts uint32).

    ``seg_table[S, segs]`` names the table of each segment; ``freq``/``cum`` are ``[tables, A]`` integer
    arrays (``cum[t, a]`` = sum of ``freq[t, :a]``). Every symbol must have a non-zero frequency in its table
    (the caller guarantees it: tables are built from the same symbols or cover the whole alphabet).
    """
    n_streams, n = sym.shape
    if n_streams == 0:
        return np.zeros(0, np.uint16), np.zeros(0, np.uint32)
    if seg_table.shape[0] != n_streams or n % seg_table.shape[1]:
        raise ValueError("seg_table does not match the symbol matrix")
    n_blocks = min(n_streams, 64)
    per_block = -(-n_streams // n_blocks)
    out = np.empty((n_blocks, per_block * (n + 2)), np.uint16)
    counts = np.empty(n_streams, np.uint32)
    used = np.zeros(n_blocks, np.int64)
    _encode_kernel(np.ascontiguousarray(sym, np.uint8), np.ascontiguousarray(seg_table, np.int32),
                   np.ascontiguousarray(freq, np.uint32), np.ascontiguousarray(cum, np.uint32), per_block,
                   out, counts, used)
    offsets = np.zeros(n_blocks, np.int64)
    np.cumsum(used[:-1], out=offsets[1:])
    words = np.empty(int(used.sum()), np.uint16)
    _gather_kernel(out, used, offsets, words)
    return words, counts


@njit(cache=True, nogil=True, parallel=True)
def _decode_kernel(words, offsets, counts, seg_table, freq, cum, lut, sym, status):  # pragma: no cover
    n_streams, n = sym.shape
    segs = seg_table.shape[1]
    seg_len = n // segs
    for s in prange(n_streams):
        p = offsets[s]
        end = p + counts[s]
        if counts[s] < 2:
            status[s] = ERR_OVERRUN
            continue
        x = np.uint32(words[p]) | (np.uint32(words[p + 1]) << np.uint32(16))
        p += 2
        if x < np.uint32(STATE_LOW):
            status[s] = ERR_BADSTATE
            continue
        err = OK
        for g in range(segs):
            t = seg_table[s, g]
            base = g * seg_len
            for i in range(base, base + seg_len):
                slot = x & np.uint32(PROB_SCALE - 1)
                v = lut[t, slot]
                sym[s, i] = v
                x = np.uint32(freq[t, v]) * (x >> np.uint32(PROB_BITS)) + slot - np.uint32(cum[t, v])
                if x < np.uint32(STATE_LOW):
                    if p >= end:
                        err = ERR_OVERRUN
                        break
                    x = (x << np.uint32(16)) | np.uint32(words[p])
                    p += 1
            if err != OK:
                break
        if err == OK and (p != end or x != np.uint32(STATE_LOW)):
            err = ERR_LEFTOVER
        status[s] = err


def decode(words: np.ndarray, counts: np.ndarray, n: int, seg_table: np.ndarray, freq: np.ndarray,
           cum: np.ndarray, lut: np.ndarray) -> tuple[np.ndarray, int]:
    """Decode ``len(counts)`` streams of ``n`` symbols; returns (sym uint8 ``[S, n]``, worst status).

    Never reads outside ``words``: each stream stops at its own end and reports ``ERR_OVERRUN``; a stream
    that does not end exactly on its initial state reports ``ERR_LEFTOVER`` (how corruption shows up when
    the CRC was forged or skipped). ``lut[t, slot]`` maps a 12-bit slot to its symbol.
    """
    n_streams = counts.shape[0]
    sym = np.empty((n_streams, n), np.uint8)
    if n_streams == 0:
        return sym, OK
    offsets = np.zeros(n_streams, np.int64)
    np.cumsum(counts[:-1], dtype=np.int64, out=offsets[1:])
    if int(offsets[-1]) + int(counts[-1]) != words.shape[0]:
        return sym, ERR_OVERRUN
    status = np.zeros(n_streams, np.int32)
    _decode_kernel(np.ascontiguousarray(words, np.uint16), offsets, np.ascontiguousarray(counts, np.int64),
                   np.ascontiguousarray(seg_table, np.int32), np.ascontiguousarray(freq, np.uint32),
                   np.ascontiguousarray(cum, np.uint32), np.ascontiguousarray(lut, np.uint8), sym, status)
    return sym, int(status.max())
