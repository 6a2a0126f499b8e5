"""Link capacity traces in the mahimahi format: the one trace reader of the project.

A mahimahi trace is a text file with one integer per line: the millisecond timestamp (from the start of the
trace) of one opportunity to deliver a 1500-byte packet. A timestamp repeated n times means n packets may
leave in that millisecond. When the trace ends it repeats, shifted by its last timestamp; a file holding just
``1`` is a 12 Mbit/s link (Netravali et al., "Mahimahi: Accurate Record-and-Replay for HTTP", USENIX ATC '15;
``traces/README`` of ravinet/mahimahi).

A fixed rate is written ``12mbps`` (or ``0.5mbit``, ``800kbps``) wherever a trace path is accepted; it becomes
an equivalent trace whose opportunities are spread as evenly as millisecond timestamps allow.
"""

from __future__ import annotations

import math
import os
import re
from array import array
from bisect import bisect_right
from dataclasses import dataclass

OPPORTUNITY_BYTES = 1500
"""Bytes one delivery opportunity can carry (mahimahi's MTU-sized slot; TUN here carries bare IP packets)."""


class TraceError(ValueError):
    """A trace file or rate spec that cannot be used; the message names the file, line and problem."""


@dataclass(frozen=True)
class Trace:
    """Delivery opportunities, repeating with period ``period_ms`` (the last timestamp).

    ``stamps_ms`` is non-decreasing; opportunity ``k`` of the infinite repeated trace happens at
    ``(k // n) * period_ms + stamps_ms[k % n]`` milliseconds.
    """

    stamps_ms: array
    name: str = "trace"

    def __post_init__(self) -> None:
        if len(self.stamps_ms) == 0:
            raise TraceError(f"{self.name}: trace has no delivery opportunities")
        if self.stamps_ms[-1] <= 0:
            raise TraceError(f"{self.name}: the last timestamp must be > 0 (it is the repeat period)")

    @property
    def period_ms(self) -> int:
        return int(self.stamps_ms[-1])

    def __len__(self) -> int:
        return len(self.stamps_ms)

    @property
    def mean_mbps(self) -> float:
        """Mean capacity over one period in Mbit/s."""
        return len(self.stamps_ms) * OPPORTUNITY_BYTES * 8 / (self.period_ms * 1000.0)

    def opportunity_ms(self, k: int) -> int:
        """Time of opportunity ``k`` (0-based) of the repeated trace, in ms."""
        n = len(self.stamps_ms)
        cycle, i = divmod(k, n)
        return cycle * self.period_ms + int(self.stamps_ms[i])

    def first_index_after(self, t_ms: float) -> int:
        """Index of the first opportunity at a time strictly greater than ``t_ms``."""
        if t_ms < 0:
            return 0
        n = len(self.stamps_ms)
        period = self.period_ms
        cycle = int(t_ms // period)
        within = t_ms - cycle * period
        i = bisect_right(self.stamps_ms, within)
        # stamps equal to 0 in the next cycle coincide with period*cycle+period; bisect handles the rest
        return cycle * n + i

    def bytes_between(self, t0_ms: float, t1_ms: float) -> int:
        """Capacity in bytes of the opportunities in ``(t0_ms, t1_ms]``."""
        return (self.first_index_after(t1_ms) - self.first_index_after(t0_ms)) * OPPORTUNITY_BYTES


_RATE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(g|m|k)?(?:bps|bit|bit/s|b/s)\s*$", re.I)
_UNIT = {"g": 1e9, "m": 1e6, "k": 1e3, None: 1.0}


def parse_rate(text: str) -> float | None:
    """``'12mbps'`` -> 12e6 (bits/s); ``None`` when ``text`` is not a rate (e.g. a file name)."""
    m = _RATE_RE.match(text)
    if not m:
        return None
    unit = m.group(2).lower() if m.group(2) else None
    return float(m.group(1)) * _UNIT[unit]


MAX_RATE_MBPS = 100_000.0  # 100 Gbit/s: far above what a userspace emulator forwards


def generator_bps(text: str) -> float | None:
    """The bits/s of a traffic generator's ``RATE`` (cross traffic, a paced flow), or None unless ``text`` is a
    rate in (0, 100 Gbit/s]: beyond, a virtual run simulated billions of packets and seemed to hang."""
    bps = parse_rate(text)
    return bps if bps is not None and 0 < bps <= MAX_RATE_MBPS * 1e6 else None


def fixed_rate_trace(mbps: float, *, max_period_ms: int = 12_000) -> Trace:
    """A trace equivalent to a constant ``mbps`` link.

    One opportunity per ms is 12 Mbit/s, so the rate needs ``mbps/12`` opportunities per ms. The period is the
    shortest multiple of 12 ms (up to ``max_period_ms``) that holds a whole number of opportunities, so common
    rates are exact and any rate is within 1/1000 of the request.
    """
    if not (mbps > 0) or math.isinf(mbps):
        raise TraceError(f"rate must be a positive number of Mbit/s, got {mbps!r}")
    if mbps > MAX_RATE_MBPS:  # the trace holds mbps opportunities per 12 ms: 1e9mbps wanted 8 GB and hung
        raise TraceError(f"rate {mbps:g} Mbit/s is beyond the emulator's {MAX_RATE_MBPS:g} Mbit/s")
    per_12ms = mbps  # opportunities in 12 ms == rate in Mbit/s
    chosen = None
    for m in range(1, max_period_ms // 12 + 1):
        n = per_12ms * m
        if abs(n - round(n)) < 1e-6 and round(n) >= 1:
            chosen = (12 * m, round(n))
            break
    if chosen is None:
        chosen = (max_period_ms, max(1, round(per_12ms * max_period_ms / 12)))
    period, n = chosen
    # n opportunities in (0, period]: opportunity j at ceil((j+1) * period / n)
    stamps = array("q", (-((-(j + 1) * period) // n) for j in range(n)))
    return Trace(stamps, name=f"{mbps:g}mbps")


MAX_STAMP_MS = 10**12


def load_trace(path: str | os.PathLike[str]) -> Trace:
    """Read a mahimahi trace file; raises :class:`TraceError` on anything malformed."""
    name = os.fspath(path)
    try:
        with open(name, encoding="ascii") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        raise TraceError(f"{name}: no such trace file") from None
    except UnicodeDecodeError:
        raise TraceError(f"{name}: not a text trace (non-ASCII bytes)") from None
    except OSError as exc:
        raise TraceError(f"{name}: cannot read trace: {exc.strerror}") from None
    stamps = array("q")
    prev = 0
    for lineno, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        try:
            value = int(text)
        except ValueError:
            raise TraceError(f"{name}:{lineno}: expected an integer ms timestamp, got {text!r}") from None
        if value < 0:
            raise TraceError(f"{name}:{lineno}: negative timestamp {value}")
        if value > MAX_STAMP_MS:  # it would overflow the int64 array (an OverflowError traceback)
            raise TraceError(f"{name}:{lineno}: timestamp {value} beyond {MAX_STAMP_MS} ms (about 31 years)")
        if value < prev:
            raise TraceError(f"{name}:{lineno}: timestamps must not decrease ({value} after {prev})")
        stamps.append(value)
        prev = value
    if not stamps:
        raise TraceError(f"{name}: empty trace")
    return Trace(stamps, name=os.path.basename(name))


def trace_from_spec(spec: str) -> Trace:
    """A trace from a path or a rate like ``12mbps`` (how every command takes ``--*-trace``)."""
    bps = parse_rate(spec)
    if bps is not None:
        return fixed_rate_trace(bps / 1e6)
    return load_trace(spec)
