"""The multi-stream rANS coder and its tables: exact round trips, numba/torch identity, bad input."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")
torch = pytest.importorskip("torch")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.fuzzing import examples  # noqa: E402
from tokenwire.transport.cachegen import rans, rans_torch, tables  # noqa: E402


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.int64) if a.dtype == np.uint32 else a)


def _tables_for(sym: np.ndarray, seg: np.ndarray, n_tables: int):
    freq = tables.normalize_counts(tables.histogram(sym, seg, n_tables))
    return freq, tables.cumulative(freq), tables.slot_lut(freq)


def _both_encoders(sym, seg, freq, cum):
    words, counts = rans.encode(sym, seg, freq, cum)
    tw, tc = rans_torch.encode(_t(sym), _t(seg), _t(freq), _t(cum))
    assert np.array_equal(tw.numpy().astype(np.uint16), words), "torch and numba bitstreams differ"
    assert np.array_equal(tc.numpy(), counts.astype(np.int64))
    return words, counts


def _both_decoders(words, counts, n, seg, freq, cum, lut):
    sym, status = rans.decode(words, counts, n, seg, freq, cum, lut)
    tsym, tstatus = rans_torch.decode(_t(words.astype(np.int32)), _t(counts.astype(np.int64)), n, _t(seg),
                                      _t(freq), _t(cum), _t(lut))
    assert (status == rans.OK) == (tstatus == rans.OK)
    if status == rans.OK:
        assert np.array_equal(tsym.numpy(), sym)
    return sym, status


@st.composite
def streams(draw):
    n_streams = draw(st.integers(1, 6))
    segs = draw(st.integers(1, 3))
    seg_len = draw(st.integers(1, 40))
    n_tables = draw(st.integers(1, 4))
    alphabet = draw(st.lists(st.integers(0, 255), min_size=1, max_size=12, unique=True))
    skew = draw(st.floats(0.0, 4.0))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    p = np.exp(-skew * np.arange(len(alphabet)))
    sym = rng.choice(np.array(alphabet, np.uint8), size=(n_streams, segs * seg_len), p=p / p.sum())
    seg = rng.integers(0, n_tables, size=(n_streams, segs)).astype(np.int32)
    return sym.astype(np.uint8), seg, n_tables


@settings(max_examples=examples(60), deadline=None)
@given(streams())
def test_round_trip_property(case):
    sym, seg, n_tables = case
    freq, cum, lut = _tables_for(sym, seg, n_tables)
    words, counts = _both_encoders(sym, seg, freq, cum)
    out, status = _both_decoders(words, counts, sym.shape[1], seg, freq, cum, lut)
    assert status == rans.OK
    assert np.array_equal(out, sym)


@settings(max_examples=examples(60), deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=256))
def test_normalize_counts_property(counts):
    row = np.array(counts, np.int64)[None, :]
    freq = tables.normalize_counts(row)
    assert int(freq.sum()) == tables.PROB_SCALE
    if row.sum() > 0:
        assert ((freq > 0) == (row > 0)).all(), "a used symbol lost its frequency (or an unused one got one)"


@settings(max_examples=examples(40), deadline=None)
@given(streams(), st.integers(0, 2**31 - 1))
def test_corrupted_words_never_crash(case, seed):
    sym, seg, n_tables = case
    freq, cum, lut = _tables_for(sym, seg, n_tables)
    words, counts = rans.encode(sym, seg, freq, cum)
    rng = np.random.default_rng(seed)
    bad = words.copy()
    if bad.size:
        bad[rng.integers(0, bad.size)] ^= np.uint16(1 << int(rng.integers(0, 16)))
    out, status = _both_decoders(bad, counts, sym.shape[1], seg, freq, cum, lut)
    assert status in (rans.OK, rans.ERR_OVERRUN, rans.ERR_LEFTOVER, rans.ERR_BADSTATE)
    if status == rans.OK:  # a flip rANS cannot see must still yield in-range symbols
        assert out.shape == sym.shape


def test_constant_stream_costs_only_its_state():
    sym = np.full((3, 500), 7, np.uint8)
    seg = np.zeros((3, 1), np.int32)
    freq, cum, lut = _tables_for(sym, seg, 1)
    assert freq[0, 7] == tables.PROB_SCALE
    words, counts = _both_encoders(sym, seg, freq, cum)
    assert counts.tolist() == [2, 2, 2]  # just the final state, no payload
    out, status = _both_decoders(words, counts, 500, seg, freq, cum, lut)
    assert status == rans.OK and np.array_equal(out, sym)


def test_single_symbol_and_empty():
    sym = np.array([[200]], np.uint8)
    seg = np.zeros((1, 1), np.int32)
    freq, cum, lut = _tables_for(sym, seg, 1)
    words, counts = _both_encoders(sym, seg, freq, cum)
    out, status = _both_decoders(words, counts, 1, seg, freq, cum, lut)
    assert status == rans.OK and out[0, 0] == 200
    words, counts = rans.encode(np.zeros((0, 4), np.uint8), np.zeros((0, 1), np.int32), freq, cum)
    assert words.size == 0 and counts.size == 0
    out, status = rans.decode(words, counts, 4, np.zeros((0, 1), np.int32), freq, cum, lut)
    assert status == rans.OK and out.shape == (0, 4)


def test_truncated_and_padded_payload_are_reported():
    rng = np.random.default_rng(3)
    sym = rng.integers(0, 30, size=(4, 300)).astype(np.uint8)
    seg = np.zeros((4, 1), np.int32)
    freq, cum, lut = _tables_for(sym, seg, 1)
    words, counts = rans.encode(sym, seg, freq, cum)
    # counts promise more words than exist
    _, status = _both_decoders(words[:-1], counts, 300, seg, freq, cum, lut)
    assert status == rans.ERR_OVERRUN
    # one stream claims a word that belongs to the next one
    shifted = counts.copy()
    shifted[0] += 1
    shifted[1] -= 1
    _, status = _both_decoders(words, shifted, 300, seg, freq, cum, lut)
    assert status != rans.OK
    # a stream shorter than its state
    tiny = counts.copy()
    tiny[0], tiny[1] = 1, counts[1] + counts[0] - 1
    _, status = _both_decoders(words, tiny, 300, seg, freq, cum, lut)
    assert status != rans.OK


def test_mismatched_layout_is_rejected():
    with pytest.raises(ValueError):
        rans.encode(np.zeros((2, 5), np.uint8), np.zeros((2, 2), np.int32), np.full((1, 256), 16, np.uint32),
                    np.zeros((1, 256), np.uint32))
    with pytest.raises(ValueError):
        tables.normalize_counts(np.array([[-1, 2]]))


def test_compresses_to_entropy():
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.25, 0.125, 0.125])
    sym = rng.choice(4, size=(8, 4096), p=p).astype(np.uint8)
    seg = np.zeros((8, 1), np.int32)
    freq, cum, _ = _tables_for(sym, seg, 1)
    words, _ = rans.encode(sym, seg, freq, cum)
    bits = 16 * words.size / sym.size
    assert 1.74 < bits < 1.78  # entropy 1.75 bits + 32-bit state per 4096-symbol stream
