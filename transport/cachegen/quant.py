"""Device-agnostic quantizer of KV chunks (torch; the same code runs on CUDA and CPU).

Layout: a chunk is ``X[L, 2, T, C]`` (layer, K/V, token, channel = head * head_dim + dim).

Quantization, per (layer, K/V):

* every token gets a scale ``s_t`` >= its abs-max over channels, coded in one byte (4-bit exponent below a
  per-(layer, K/V) base exponent, 4-bit mantissa), so that per-token magnitude swings (attention sinks,
  punctuation) do not waste bits;
* every channel gets a relative step ``d`` coded as ``2**((16 - code) / 8)``; the ladder and the model
  profile pick the codes (channels whose error moves the output more get finer steps, see ``levels.py``);
* ``q = round(x / (s_t * d))``; with ``code <= 63`` we have ``|q| <= 58``, so a deviation from the
  channel's median and a token-to-token difference both fit in a byte.

Every value that decides the bitstream is computed exactly: abs-max and median are exact, the scale and the
step have few mantissa bits so their product is exact in fp32, the division is IEEE (correctly rounded on CPU
and CUDA) and ``round`` is half-to-even on both, and all later steps are integer. That is why CPU and GPU
produce the same symbols and hence the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_STEP_CODE = 63  # d >= 2**(-47/8) = 1/58.4: keeps |q| <= 58 and q - centre within a byte
SYMBOL_OFFSET = 128
BASE_EXP_MIN, BASE_EXP_MAX = -100, 100
# 2**(i/8) rounded to 1/1024: relative steps are these mantissas times powers of two, exactly representable
_STEP_MANTISSA = (1024, 1117, 1218, 1328, 1448, 1579, 1722, 1878)
CLASSES_PER_KV = 27  # spread classes per (K/V, mode): at most 108 tables


def step_value(code: int) -> float:
    """Relative step ``~2**((16 - code) / 8)`` for a step code, exact in binary (no pow() in the loop)."""
    e, r = divmod(16 - int(code), 8)
    return _STEP_MANTISSA[r] / 1024.0 * 2.0**e


def step_table(codes: torch.Tensor) -> torch.Tensor:
    """``step_value`` for a tensor of codes (fp32, same device)."""
    vals = torch.tensor([step_value(c) for c in range(MAX_STEP_CODE + 1)], dtype=torch.float32)
    return vals.to(codes.device)[codes.long()]


@dataclass
class TokenScales:
    base_exp: torch.Tensor  # int [L, 2]
    codes: torch.Tensor  # uint8 [L, 2, T]
    values: torch.Tensor  # fp32 [L, 2, T], >= the abs-max of each token


def token_scales(x: torch.Tensor) -> TokenScales:
    """Per-(layer, K/V, token) scales coded in one byte each (see module docstring)."""
    amax = x.abs().amax(dim=-1)  # exact
    mant, exp = torch.frexp(amax)  # amax = mant * 2**exp, mant in [0.5, 1) (0 for zeros)
    j = torch.ceil(mant * 32).to(torch.int32)  # 16..32; scale = j/32 * 2**exp >= amax
    exp = exp.to(torch.int32)
    carry = j == 32
    j = torch.where(carry, torch.full_like(j, 16), j)
    exp = exp + carry.to(torch.int32)
    zero = amax == 0
    if amax.shape[-1] > 0:
        exp_nz = torch.where(zero, torch.full_like(exp, -(2**30)), exp)
        base = exp_nz.amax(dim=-1).clamp(BASE_EXP_MIN, BASE_EXP_MAX)
    else:
        base = torch.zeros(amax.shape[:-1], dtype=torch.int32, device=x.device)
    k = base[..., None] - exp
    small = zero | (k > 15)
    k = torch.where(small, torch.full_like(k, 15), k.clamp(min=0))
    j = torch.where(small, torch.full_like(j, 16), j)
    codes = ((k << 4) | (j - 16)).to(torch.uint8)
    return TokenScales(base.to(torch.int32), codes, scale_values(base, codes))


def scale_values(base_exp: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Decode token-scale bytes: ``(16 + low nibble) / 32 * 2**(base - high nibble)`` in fp32."""
    c = codes.to(torch.int32)
    mant = ((c & 15) + 16).to(torch.float32) / 32.0
    return mant * pow2(base_exp.to(torch.int32)[..., None] - (c >> 4))


def pow2(e: torch.Tensor) -> torch.Tensor:
    """Exact ``2.0**e`` in fp32 for integer ``e`` in the normal range, built from the exponent bits.

    (``torch.ldexp`` goes through ``pow``, whose CUDA version is not guaranteed exact.)
    """
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def steps(scales: torch.Tensor, step_codes: torch.Tensor) -> torch.Tensor:
    """Per-element step ``[L, 2, T, C]`` = token scale ``[L, 2, T]`` * channel step ``[L, 2, C]``."""
    return scales[..., None] * step_table(step_codes)[:, :, None, :]


@dataclass
class Quantized:
    sym: torch.Tensor  # uint8 [L, 2, C, T] channel-major: coded deviation + 128
    centers: torch.Tensor  # int8 [L, 2, C]
    modes: torch.Tensor  # uint8 [L, 2, C]: 1 = coded as token-to-token differences
    table_of: torch.Tensor  # int64 [L, 2, C] probability class (before compaction)


def quantize(x: torch.Tensor, scales: TokenScales, step_codes: torch.Tensor, raw_tokens: int) -> Quantized:
    """Quantize ``x[L, 2, T, C]`` (fp32) to uint8 symbols plus per-channel centre, mode and class.

    Each channel is coded either as the deviation from its median or, when that is smaller in total
    absolute value (slowly drifting key channels, ~5 % of SmolLM2's), as token-to-token differences of the
    same integers: lossless, it only changes what the entropy coder sees.
    """
    n_layers, _, n_tok, n_ch = x.shape
    # one copy into channel-major int16: every later pass is contiguous and half the bytes of int32
    q = torch.round(x / steps(scales.values, step_codes)).to(torch.int16).transpose(2, 3).contiguous()
    if n_tok > raw_tokens:
        centers = q[..., raw_tokens:].median(dim=-1).values
    else:
        centers = torch.zeros((n_layers, 2, n_ch), dtype=torch.int16, device=x.device)
    dev = q - centers[..., None]
    if raw_tokens:
        dev[..., :raw_tokens] = 0
    diff = torch.empty_like(dev)
    diff[..., :1] = dev[..., :1]
    torch.sub(dev[..., 1:], dev[..., :-1], out=diff[..., 1:])
    mad_dev = dev.abs().sum(dim=-1, dtype=torch.int64)
    mad_diff = diff.abs().sum(dim=-1, dtype=torch.int64)
    modes = mad_diff < mad_dev
    coded = torch.where(modes[..., None], diff, dev)
    sym = (coded + SYMBOL_OFFSET).to(torch.uint8)
    cls = spread_class(torch.where(modes, mad_diff, mad_dev), max(n_tok, 1))
    kv = torch.arange(2, device=x.device).view(1, 2, 1)
    table_of = cls + (kv + 2 * modes.to(torch.int64)) * CLASSES_PER_KV
    return Quantized(sym, centers.to(torch.int8), modes.to(torch.uint8), table_of)


def spread_class(spread: torch.Tensor, n_tok: int) -> torch.Tensor:
    """Class 0..26 from the mean absolute deviation, two classes per octave (integer-only)."""
    v = (spread * 64) // n_tok  # mean |coded| in 1/64 steps, < 2**14
    _, e = torch.frexp(v.to(torch.float32))  # exact for v < 2**24: v in [2**(e-1), 2**e)
    b = (e - 1).clamp(min=0).to(torch.int64)
    half = (v >> (b - 1).clamp(min=0)) & 1
    half = torch.where(b >= 1, half, torch.zeros_like(half))
    cls = 1 + 2 * b + half
    return torch.where(v == 0, torch.zeros_like(cls), cls).clamp(max=CLASSES_PER_KV - 1)


def dequantize(sym: torch.Tensor, centers: torch.Tensor, modes: torch.Tensor, scales: torch.Tensor,
               step_codes: torch.Tensor) -> torch.Tensor:
    """Inverse of ``quantize``: ``[L, 2, C, T]`` symbols -> ``[L, 2, T, C]`` fp32 values (exact products)."""
    coded = sym.to(torch.int16) - SYMBOL_OFFSET
    delta = modes.to(torch.bool)
    if bool(delta.any()):  # valid streams stay within int16; corrupt ones wrap harmlessly
        coded = torch.where(delta[..., None], torch.cumsum(coded, dim=-1, dtype=torch.int16), coded)
    q = coded + centers.to(torch.int16)[..., None]
    return q.transpose(2, 3).to(torch.float32) * steps(scales, step_codes)
