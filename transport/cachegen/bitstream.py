"""Byte format of one encoded KV chunk (format version 1). No pickle; numpy + the rANS coder.

A chunk is self-contained: everything needed to decode it is in its bytes, so the KV channel can deliver
chunks independently and a receiver can decode them in any order. Little-endian throughout::

    header (36 B)  magic "TWKV", version, codec id, level id, flags, model fingerprint (u64),
                   layers, kv heads, head dim (u16), tokens (u32), output dtype, raw tokens,
                   channels per rANS stream (u16), tables (u16), body length (u32)
    body           base exponents  i8  [L, 2]      token-scale exponent base
                   side sections, each an order-0 rANS-coded byte array (see ``_put_coded``):
                     step codes    u8  [L, 2, C]   relative step per channel (quant.step_value)
                     token scales  u8  [L, 2, T]   one byte per token (quant.scale_values)
                     centres       i8  [L, 2, C]   median of each channel's integers
                     modes         u8  [L, 2, C]   0 = deviation from centre, 1 = token differences
                     table index   u8  [L, 2, C]   which frequency table codes the channel
                   tables          per table: lo u8, hi u8, (hi - lo + 1) x u16 frequencies (sum 4096)
                   raw tokens      f16 [R, L, 2, C] leading tokens kept exact (attention sink);
                                   f32 when flag bit 0 is set (values beyond the fp16 range)
                   word counts     u16 [S]         rANS words per stream, S = 2 L C / channels per stream
                   words           u16 [sum]       the payload streams, each in decode order
    crc32 (u32)    over header and body

A coded section is: its table (lo, hi, frequencies as above), then ``k = ceil(n / 4096)`` word counts (u16),
then the words of ``k`` streams of ``ceil(n / k)`` bytes each; the tail is padded with the section's most
frequent byte (fewer than ``k`` padding bytes).

``unpack`` checks every field against the others before anything is allocated from it, and raises the typed
errors of ``errors.py``; it decodes the side sections but not the payload (``codec.decode_chunk`` does), and
of a chunk of no tokens not even the side sections (nothing is reconstructed from them).

The stream layout is not the sender's choice: ``channels per stream`` must be ``stream_channels_for(T, C)``.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from .errors import CorruptBitstream, ModelMismatch, TruncatedBitstream, UnsupportedVersion

MAGIC = b"TWKV"
VERSION = 1
CODEC_RANS = 1  # quantizer of quant.py + multi-stream rANS with per-chunk table bank
HEADER = struct.Struct("<4sBBBBQHHHIBBHHI")
CRC = struct.Struct("<I")
DTYPES = ("float16", "bfloat16", "float32")
MAX_STEP_CODE = 63
PROB_SCALE = 4096
MAX_TOKENS = 32768
# Decoding expands bytes a lot (a constant stream of 4096 symbols costs 6 bytes), so a forged header could
# ask for huge allocations: unpack refuses chunks above this many elements unless the caller raises it.
DEFAULT_MAX_ELEMENTS = 1 << 29
MAX_TABLES = 255
FLAG_RAW_F32 = 1
SIDE_STREAM = 4096  # symbols per rANS stream in a side section


@dataclass
class Chunk:
    """All fields of one chunk, as numpy arrays (what ``pack`` writes and ``unpack`` returns)."""

    level_id: int
    fingerprint: int
    n_layers: int
    n_heads: int
    head_dim: int
    n_tokens: int
    dtype: str
    raw_tokens: int
    stream_channels: int
    step_codes: np.ndarray  # u8 [L, 2, C]
    base_exp: np.ndarray  # i8 [L, 2]
    scale_codes: np.ndarray  # u8 [L, 2, T]
    centers: np.ndarray  # i8 [L, 2, C]
    modes: np.ndarray  # u8 [L, 2, C]
    table_of: np.ndarray  # u8 [L, 2, C]
    freq: np.ndarray  # u32 [n_tables, 256]
    raw: np.ndarray  # f16 or f32 [R, L, 2, C]
    counts: np.ndarray  # u16 [S]
    words: np.ndarray  # u16 [sum(counts)]

    @property
    def channels(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def n_streams(self) -> int:
        if self.n_tokens == 0:
            return 0
        return 2 * self.n_layers * self.channels // self.stream_channels


def stream_channels_for(n_tokens: int, channels: int, target: int = 2048) -> int:
    """Channels per rANS stream: the largest divisor of ``channels`` with at most ``target`` symbols.

    Long streams amortise the 6 bytes each stream costs (final state and word count); many streams give the
    parallelism the decoders need. 2048 symbols keeps the overhead near 0.02 bits/element.
    """
    best = 1
    # at most ``target`` candidates: ``unpack`` calls this for untrusted headers (channels up to 2**32)
    for g in range(1, min(channels, target // max(n_tokens, 1)) + 1):
        if channels % g == 0:
            best = g
    return best


def _table_bytes(row: np.ndarray) -> bytes:
    nz = np.flatnonzero(row)
    lo, hi = int(nz[0]), int(nz[-1])
    return bytes((lo, hi)) + row[lo:hi + 1].astype("<u2").tobytes()


def _side_layout(count: int) -> tuple[int, int]:
    """Streams and symbols per stream for a side section of ``count`` bytes."""
    n_streams = -(-count // SIDE_STREAM)
    return n_streams, -(-count // n_streams)


def _put_coded(arr: np.ndarray) -> bytes:
    """Order-0 rANS coding of a byte array (side information): table, word counts, words."""
    from . import rans, tables

    flat = np.ascontiguousarray(arr).view(np.uint8).ravel()
    if flat.size == 0:
        return b""
    counts = np.bincount(flat, minlength=256)[None, :]
    freq = tables.normalize_counts(counts)
    n_streams, length = _side_layout(flat.size)
    padded = np.full(n_streams * length, int(np.argmax(counts[0])), np.uint8)
    padded[:flat.size] = flat
    words, wcounts = rans.encode(padded.reshape(n_streams, length), np.zeros((n_streams, 1), np.int32),
                                 freq, tables.cumulative(freq))
    return _table_bytes(freq[0]) + wcounts.astype("<u2").tobytes() + words.astype("<u2").tobytes()


def _raw_dtype(raw: np.ndarray) -> str:
    """fp16 unless a value does not fit (bf16/fp32 caches can exceed 65504)."""
    return "<f4" if raw.dtype == np.float32 else "<f2"


def pack(c: Chunk) -> bytes:
    """Serialize a chunk; the arrays must already have the shapes the header implies."""
    body = b"".join((
        c.base_exp.astype(np.int8).tobytes(),
        _put_coded(c.step_codes.astype(np.uint8)),
        _put_coded(c.scale_codes.astype(np.uint8)),
        _put_coded(c.centers.astype(np.int8)),
        _put_coded(c.modes.astype(np.uint8)),
        _put_coded(c.table_of.astype(np.uint8)),
        b"".join(_table_bytes(row) for row in c.freq),
        c.raw.astype(_raw_dtype(c.raw)).tobytes(),
        c.counts.astype("<u2").tobytes(),
        c.words.astype("<u2").tobytes(),
    ))
    flags = FLAG_RAW_F32 if _raw_dtype(c.raw) == "<f4" else 0
    head = HEADER.pack(MAGIC, VERSION, CODEC_RANS, c.level_id, flags, c.fingerprint, c.n_layers, c.n_heads,
                       c.head_dim, c.n_tokens, DTYPES.index(c.dtype), c.raw_tokens, c.stream_channels,
                       c.freq.shape[0], len(body))
    data = head + body
    return data + CRC.pack(zlib.crc32(data))


@dataclass
class Header:
    """The fixed header alone: what a channel needs to route or account a chunk without decoding it."""

    level_id: int
    fingerprint: int
    n_layers: int
    n_heads: int
    head_dim: int
    n_tokens: int
    dtype: str
    raw_tokens: int
    stream_channels: int
    n_tables: int
    total_bytes: int
    flags: int


def read_header(data: bytes | bytearray | memoryview) -> Header:
    """Parse and check the fixed header (magic, version, codec, sizes); does not check the CRC.

    A memoryview of another format (a numpy ``uint16`` array's) is read as its bytes, as ``unpack`` reads it:
    its lengths counted items, and its first 4 items were no magic (``decode_chunk`` took such a chunk, and
    ``decode_sequence``, which reads the header too, refused it)."""
    buf = memoryview(data).cast("B")
    if len(buf) < len(MAGIC):
        raise TruncatedBitstream(f"{len(buf)} bytes is shorter than the magic")
    if bytes(buf[:4]) != MAGIC:
        raise CorruptBitstream("not a tokenwire KV chunk (bad magic)")
    if len(buf) < HEADER.size + CRC.size:
        raise TruncatedBitstream(f"{len(buf)} bytes is shorter than the header")
    (_, version, codec, level_id, flags, fp, n_layers, n_heads, head_dim, n_tok, dtype, raw, g, n_tables,
     body_len) = HEADER.unpack_from(buf, 0)
    if version != VERSION:
        raise UnsupportedVersion(f"format version {version}, this build reads {VERSION}")
    if codec != CODEC_RANS:
        raise UnsupportedVersion(f"unknown codec id {codec}")
    if flags & ~FLAG_RAW_F32:
        raise UnsupportedVersion(f"unknown flags {flags:#x}")
    total = HEADER.size + body_len + CRC.size
    if len(buf) < total:
        raise TruncatedBitstream(f"{len(buf)} bytes, header promises {total}")
    if len(buf) > total:
        raise CorruptBitstream(f"{len(buf) - total} trailing bytes after the chunk")
    if dtype >= len(DTYPES):
        raise CorruptBitstream(f"bad dtype code {dtype}")
    if not (n_layers and n_heads and head_dim):
        raise CorruptBitstream("zero layers, heads or head_dim")
    channels = n_heads * head_dim
    if n_tok > MAX_TOKENS or raw > n_tok:
        raise CorruptBitstream(f"bad token counts (tokens {n_tok}, raw {raw})")
    if g == 0 or channels % g or g * max(n_tok, 1) > 65533:
        raise CorruptBitstream(f"bad stream layout ({g} channels per stream)")
    if n_tables > MAX_TABLES:
        raise CorruptBitstream(f"{n_tables} tables")
    return Header(level_id, fp, n_layers, n_heads, head_dim, n_tok, DTYPES[dtype], raw, g, n_tables, total,
                  flags)


class _Reader:
    def __init__(self, buf: memoryview, pos: int, end: int) -> None:
        self.buf, self.pos, self.end = buf, pos, end

    def take(self, dtype: str, count: int) -> np.ndarray:
        size = np.dtype(dtype).itemsize * count
        if self.pos + size > self.end:
            raise CorruptBitstream("a section runs past the end of the body")
        arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += size
        return arr

    def skip(self, size: int) -> None:
        if self.pos + size > self.end:
            raise CorruptBitstream("a section runs past the end of the body")
        self.pos += size

    def table(self) -> np.ndarray:
        lo, hi = (int(v) for v in self.take("u1", 2))
        if hi < lo:
            raise CorruptBitstream("empty table range")
        row = np.zeros(256, np.uint32)
        row[lo:hi + 1] = self.take("<u2", hi - lo + 1)
        if int(row.sum()) != PROB_SCALE:
            raise CorruptBitstream("a frequency table does not sum to 4096")
        return row

    def coded(self, count: int, dtype: str = "u1") -> np.ndarray:
        """Inverse of ``_put_coded`` for a section of ``count`` bytes."""
        from . import rans, tables

        if count == 0:
            return np.zeros(0, dtype)
        freq = self.table()[None, :]
        n_streams, length = _side_layout(count)
        wcounts = self.take("<u2", n_streams)
        words = self.take("<u2", int(wcounts.sum(dtype=np.int64)))
        seg = np.zeros((n_streams, 1), np.int32)
        sym, status = rans.decode(words, wcounts.astype(np.uint32), length, seg, freq,
                                  tables.cumulative(freq), tables.slot_lut(freq))
        if status != rans.OK:
            raise CorruptBitstream("a side section does not decode")
        return sym.ravel()[:count].view(dtype).copy()

    def skip_coded(self, count: int) -> None:
        """Step over a section ``coded`` would decode: its table and lengths are checked, its words are not."""
        if count == 0:
            return
        self.table()
        wcounts = self.take("<u2", _side_layout(count)[0])
        self.skip(2 * int(wcounts.sum(dtype=np.int64)))


def unpack(data: bytes | bytearray | memoryview, expect_fingerprint: int | None = None,
           expect_geometry: tuple[int, int, int] | None = None,
           max_elements: int = DEFAULT_MAX_ELEMENTS) -> Chunk:
    """Parse and validate a chunk; raises ``KVCodecError`` subclasses on anything inconsistent.

    Pass ``expect_fingerprint``/``expect_geometry`` when they are known (the KV channel knows its model):
    then a foreign chunk is refused before anything is allocated for it.
    """
    buf = memoryview(data).cast("B")
    h = read_header(buf)
    end = h.total_bytes - CRC.size
    (crc,) = CRC.unpack_from(buf, end)
    if zlib.crc32(buf[:end]) != crc:
        raise CorruptBitstream("CRC32 mismatch")
    if expect_fingerprint is not None and h.fingerprint != expect_fingerprint:
        raise ModelMismatch(f"chunk is for model {h.fingerprint:#018x}, expected {expect_fingerprint:#018x}")
    if expect_geometry is not None and (h.n_layers, h.n_heads, h.head_dim) != tuple(expect_geometry):
        got = (h.n_layers, h.n_heads, h.head_dim)
        raise ModelMismatch(f"chunk geometry {got}, expected {tuple(expect_geometry)}")
    n_l, n_h, n_d, n_t = h.n_layers, h.n_heads, h.head_dim, h.n_tokens
    n_c = n_h * n_d
    if 2 * n_l * n_c * max(n_t, 1) > max_elements:
        raise CorruptBitstream(f"chunk claims {2 * n_l * n_c * max(n_t, 1)} elements (limit {max_elements})")
    # the stream layout is a function of the geometry, the encoder's: a sender's choice of up to 65533 symbols
    # per stream made the torch (GPU) decoder, one Python step per symbol, ~25x slower
    if h.stream_channels != stream_channels_for(n_t, n_c):
        raise CorruptBitstream(f"bad stream layout ({h.stream_channels} channels per stream, the format's is "
                               f"{stream_channels_for(n_t, n_c)})")
    r = _Reader(buf, HEADER.size, end)
    base_exp = r.take("i1", n_l * 2).reshape(n_l, 2)
    if (np.abs(base_exp.astype(np.int32)) > 100).any():
        raise CorruptBitstream("token-scale base exponent out of range")
    if n_t == 0:
        return _empty_chunk(h, r, base_exp)
    step_codes = r.coded(n_l * 2 * n_c).reshape(n_l, 2, n_c)
    if (step_codes > MAX_STEP_CODE).any():
        raise CorruptBitstream("step code out of range")
    scale_codes = r.coded(n_l * 2 * n_t).reshape(n_l, 2, n_t)
    centers = r.coded(n_l * 2 * n_c, "i1").reshape(n_l, 2, n_c)
    if (np.abs(centers.astype(np.int32)) > 63).any():
        raise CorruptBitstream("channel centre out of range")
    modes = r.coded(n_l * 2 * n_c).reshape(n_l, 2, n_c)
    if (modes > 1).any():
        raise CorruptBitstream("unknown channel mode")
    table_of = r.coded(n_l * 2 * n_c).reshape(n_l, 2, n_c)
    if (table_of >= h.n_tables).any():
        raise CorruptBitstream("channel refers to a missing table")
    freq = np.zeros((h.n_tables, 256), np.uint32)
    for t in range(h.n_tables):
        freq[t] = r.table()
    raw = r.take("<f4" if h.flags & FLAG_RAW_F32 else "<f2", h.raw_tokens * n_l * 2 * n_c)
    raw = raw.reshape(h.raw_tokens, n_l, 2, n_c)
    if not np.isfinite(raw).all():  # the encoder refuses non-finite KV: a CRC-valid NaN here is forged
        raise CorruptBitstream("raw (sink) token values are NaN or infinite")
    n_streams = 2 * n_l * n_c // h.stream_channels
    counts = r.take("<u2", n_streams)
    words = r.take("<u2", int(counts.sum(dtype=np.int64)))
    if r.pos != end:
        raise CorruptBitstream(f"{end - r.pos} unexplained bytes in the body")
    return Chunk(h.level_id, h.fingerprint, n_l, n_h, n_d, n_t, h.dtype, h.raw_tokens, h.stream_channels,
                 step_codes, base_exp, scale_codes, centers, modes, table_of, freq, raw, counts, words)


def _empty_chunk(h: Header, r: _Reader, base_exp: np.ndarray) -> Chunk:
    """The rest of a chunk of no tokens: nothing is reconstructed from its per-channel side sections, so they
    are stepped over, not decoded (a forged 1.6-MB chunk of 0 tokens made the decoder expand 4 x 2**28 bytes:
    15 s and 4 GB for an empty output). Its per-channel fields read as zeros that take no memory."""
    n_l, n_c = h.n_layers, h.n_heads * h.head_dim
    for _ in range(4):  # step codes, centres, modes, table index (the token scales of 0 tokens are empty)
        r.skip_coded(n_l * 2 * n_c)
    freq = np.zeros((h.n_tables, 256), np.uint32)
    for t in range(h.n_tables):
        freq[t] = r.table()
    if r.pos != r.end:  # no raw tokens (raw <= tokens), no streams
        raise CorruptBitstream(f"{r.end - r.pos} unexplained bytes in the body")
    zeros = np.broadcast_to(np.zeros((), np.uint8), (n_l, 2, n_c))
    return Chunk(h.level_id, h.fingerprint, n_l, h.n_heads, h.head_dim, 0, h.dtype, 0, h.stream_channels,
                 zeros, base_exp, np.zeros((n_l, 2, 0), np.uint8), zeros.view(np.int8), zeros, zeros, freq,
                 np.zeros((0, n_l, 2, n_c), np.float32 if h.flags & FLAG_RAW_F32 else np.float16),
                 np.zeros(0, np.uint16), np.zeros(0, np.uint16))
