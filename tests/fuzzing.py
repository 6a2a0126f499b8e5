"""Hypothesis profiles for the suite, and what the property tests share (``make fuzz``; README, Development).

``default``: hypothesis' own settings, each test keeping the small example count it pins, so ``make test`` stays
fast. ``fuzz``: every property test (those marked ``fuzz``, which the conftest gives every hypothesis test) runs
``TOKENWIRE_FUZZ_EXAMPLES`` examples (20000 unless set), without a deadline (a loaded machine is no finding),
without an example database (nothing written into the checkout; a failure prints the blob that replays it), and
with the health checks about slow or filtered generation off. Selected by pytest's ``--hypothesis-profile=fuzz``
(the hypothesis plugin's option) or ``TOKENWIRE_HYPOTHESIS_PROFILE=fuzz``."""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FUZZ = "fuzz"

settings.register_profile(
    FUZZ, max_examples=int(os.environ.get("TOKENWIRE_FUZZ_EXAMPLES", "20000")), deadline=None, database=None,
    print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                            HealthCheck.data_too_large])


def load_profile_from_env() -> None:
    """The profile ``TOKENWIRE_HYPOTHESIS_PROFILE`` names, if any (``--hypothesis-profile`` is applied after it)."""
    name = os.environ.get("TOKENWIRE_HYPOTHESIS_PROFILE")
    if name:
        settings.load_profile(name)


def examples(n: int) -> int:
    """A test's pinned example count: ``n`` except under the fuzz profile, whose count it takes (an explicit
    ``max_examples`` outranks any profile, so a plain pin kept its few examples under ``make fuzz``). Only the fuzz
    profile: hypothesis loads its ``ci`` profile by itself where ``CI`` is set, and CI keeps the pinned counts."""
    # (settings.get_current_profile_name is recent: hypothesis 6.100, pyproject's floor, has only the attribute)
    current = getattr(settings, "get_current_profile_name", lambda: getattr(settings, "_current_profile", None))
    return settings().max_examples if current() == FUZZ else n


# values of every JSON / msgpack type, the awkward ones (non-finite, huge, lone surrogates, NUL) over-represented
ODD_SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
    st.sampled_from([float("inf"), float("-inf"), float("nan"), -0.0, 2**63, 2**64 - 1, 2**64, -1, 0, 1, 2**32,
                     "", "\x00", "\ud800", "\udfff", "x" * 300, "é" * 50, "\u202e", "\n", "1e999", "NaN"]),
    st.text(max_size=12), st.binary(max_size=12),
)
ODD = st.recursive(ODD_SCALAR, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                   max_leaves=10)

# bytes with a meaning in msgpack (nil, map/array/str/bin headers, 64-bit ints and floats) and at the edges
_SPECIAL_BYTES = [0x00, 0xff, 0xc0, 0xc1, 0xdc, 0xdd, 0xde, 0xdf, 0xc4, 0xc5, 0xc6, 0xd9, 0xda, 0xdb, 0xcf, 0xd3,
                  0xcb, 0xca, 0x80, 0x90, 0xa0, 0x7f, 0xe0]
_LENGTHS = [0xFFFFFFFF, 0x7FFFFFFF, 0x10000, 0xFFFF, 0x1000000, 0]


@st.composite
def mutated(draw: st.DrawFn, data: bytes, max_ops: int = 4) -> bytes:
    """``data`` after 1 to ``max_ops`` edits: a flipped bit, a cut, bytes inserted, deleted or duplicated, a
    byte of meaning, a 4-byte length at its edge. Valid input a little wrong reaches deeper than random bytes."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete", "special", "dup", "length"]))
        n = len(buf)
        at = draw(st.integers(0, max(n - 1, 0)))
        if op == "flip" and n:
            buf[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del buf[at:]
        elif op == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=40))
        elif op == "delete" and n:
            del buf[at:at + draw(st.integers(1, 8))]
        elif op == "special" and n:
            buf[at] = draw(st.sampled_from(_SPECIAL_BYTES))
        elif op == "dup" and n:
            buf[at:at] = buf[at:at + draw(st.integers(1, 16))]
        elif op == "length" and n >= 4:
            at = min(at, n - 4)
            buf[at:at + 4] = struct.pack(">I", draw(st.sampled_from(_LENGTHS)))
    return bytes(buf)
