"""The level ladder and per-model step profiles.

A level is one number, the step code of an "average" channel; a model profile adds a per-(layer, K/V,
channel) offset measured offline (``tokenwire kv calibrate``): channels whose quantization error moves the
next-token distribution more get finer steps. For SmolLM2 the sensitive channels sit in the middle and late
layers, not in the first layers CacheGen's layer groups favour, and key channels differ by ~3x within a head
(see docs/kv_codec.md). The codes that result are written into every chunk, so a decoder never needs the
profile.

"text" is the KV channel's fallback (send the tokens, recompute the KV); it is a ladder rung but not a codec
level.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import numpy as np

from .errors import InvalidInput
from .quant import MAX_STEP_CODE

TEXT = "text"


@dataclass(frozen=True)
class Level:
    name: str
    level_id: int  # written to the header; 255 = custom
    base_code: int  # step code of a head with profile offset 0 (higher = finer)
    sink_tokens: int = 1  # leading tokens of a sequence stored exact (attention sink), first chunk only


# Ordered from smallest to best. Base codes chosen from the measurements in docs/kv_codec.md.
LADDER: tuple[Level, ...] = (
    Level("low", 1, 33),  # ~1.8 bits/element on SmolLM2: > 4x smaller than int8
    Level("medium", 2, 39),  # ~2.5 bits/element, KL ~0.004: the default
    Level("high", 3, 47),  # ~3.4 bits/element, KL < 0.001
)
LEVEL_NAMES: tuple[str, ...] = (TEXT, *(lv.name for lv in LADDER))


def get_level(spec: str | Level) -> Level:
    """A ladder level by name, or ``code=N`` for a custom step code (experiments)."""
    if isinstance(spec, Level):
        return spec
    if not isinstance(spec, str):  # None or an int failed on spec.startswith (AttributeError)
        raise InvalidInput(f"a level is a name or a Level, not {type(spec).__name__}")
    for lv in LADDER:
        if lv.name == spec:
            return lv
    if spec == TEXT:
        raise InvalidInput("'text' is the channel's fallback, not a codec level")
    if spec.startswith("code="):
        try:
            code = int(spec[5:])
        except ValueError as exc:
            raise InvalidInput(f"bad custom level {spec!r}") from exc
        if not 0 <= code <= MAX_STEP_CODE:
            raise InvalidInput(f"custom step code must be 0..{MAX_STEP_CODE}")
        return Level(spec, 255, code)
    raise InvalidInput(f"unknown level {spec!r}; known: {', '.join(LEVEL_NAMES)} or code=N")


@dataclass(frozen=True)
class Profile:
    """Per-(layer, K/V, channel) step-code offsets for one model geometry."""

    name: str
    offsets: np.ndarray  # int [L, 2, C]

    def step_codes(self, level: Level) -> np.ndarray:
        return np.clip(level.base_code + self.offsets, 0, MAX_STEP_CODE).astype(np.uint8)


def uniform_profile(n_layers: int, channels: int) -> Profile:
    """The profile for models nobody calibrated: the same step for every channel."""
    return Profile("uniform", np.zeros((n_layers, 2, channels), np.int64))


def offsets_from_sensitivity(sens: np.ndarray, exponent: float = 0.375, floor_frac: float = 0.3,
                             max_offset: int = 24) -> np.ndarray:
    """Step-code offsets from measured sensitivities ``sens[L, 2, C]`` (KL per squared relative step).

    Minimising ``sum_g a_g d_g**2 + lambda * rate`` with the high-rate model (rate ~ -log2 d_g) gives
    ``d_g ~ a_g**-0.5``. At 2-3 bits/element a channel's rate falls by less than a bit per halving of
    its step, so that rule over-spends on sensitive channels; on SmolLM2 ``d_g ~ a_g**-0.375`` with
    sensitivities floored at 0.3 x median gave ~25 % lower KL at equal size (docs/kv_codec.md).
    One code is 1/8 octave of step, so offset = 8 * exponent * log2(a_g / geometric mean).
    """
    a = np.asarray(sens, np.float64)
    a = np.maximum(a, floor_frac * float(np.median(a)))
    off = 8.0 * exponent * (np.log2(a) - float(np.mean(np.log2(a))))
    return np.clip(np.round(off), -max_offset, max_offset).astype(np.int64)


def load_profile(name: str) -> Profile:
    """A profile shipped in ``profiles/<name>.json``."""
    text = resources.files(__package__).joinpath("profiles", f"{name}.json").read_text()
    doc = json.loads(text)
    return Profile(doc["name"], np.asarray(doc["offsets"], np.int64))


def profile_for(fingerprint: int, n_layers: int, channels: int) -> Profile:
    """The shipped profile whose fingerprint matches, else the uniform one."""
    for entry in resources.files(__package__).joinpath("profiles").iterdir():
        if not entry.name.endswith(".json"):
            continue
        doc = json.loads(entry.read_text())
        if doc.get("interrupted"):  # a calibration cut short by Ctrl-C: a few samples, never used unasked
            continue
        if int(doc.get("fingerprint", -1)) == fingerprint:
            prof = Profile(doc["name"], np.asarray(doc["offsets"], np.int64))
            if prof.offsets.shape == (n_layers, 2, channels):
                return prof
    return uniform_profile(n_layers, channels)
