"""Cross-traffic specs for the virtual-time dataset runs (``--cross``), parsed into flow schedules.

Grammar: ``ITEM[+ITEM...]``, ``ITEM = KIND[*N][:key=value,...]``

* ``reno``      classic AIMD window flow, Not-ECT: fills the C queue (DualPI2 holds it near 15 ms)
* ``scalable``  DCTCP/Prague-like window flow, ECT(1): bursts into the L queue on every (re)start
* ``cbr-l`` / ``cbr-c``  unresponsive constant bit rate into L (ECT(1)) or C (Not-ECT); ``rate=`` required,
  as bits/s (``2mbps``) or as a share of the trace's mean capacity (``40%``)

Common keys: ``on=S,off=S`` make the flow an on/off source with exponentially distributed period lengths of
those means (seconds; without them it runs the whole time), ``rtt=MS`` its ack return delay (default: drawn
per flow from 5-50 ms). ``*N`` runs N independent copies. A key may appear once per item, and a spec makes at most
:data:`MAX_CROSS_FLOWS` flows in all.

These are modes of the testbed's own :mod:`tokenwire.testbed.vsim` senders; the socket testbed has its own
spec (``tcp:cubic``, ``udp-ect1:RATE``, :func:`tokenwire.testbed.traffic.parse_cross`), and its loss-based
forms are accepted here as aliases (``tcp:reno`` and ``tcp:cubic`` -> ``reno``, ``udp-ect1:RATE`` ->
``cbr-l:rate=RATE``). ``tcp:bbr`` is refused: BBR paces at its bandwidth estimate and does not back off on
loss or CE, so a Reno window would be a different flow under the same name.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

DEFAULT_CROSS = "reno*2:on=4,off=4+scalable*2:on=1,off=2+cbr-l:rate=120%,on=0.5,off=1.5+cbr-c:rate=20%,on=2,off=4"
KINDS = ("reno", "scalable", "cbr-l", "cbr-c")
TCP_ALIASES = ("reno", "cubic")
"""``tcp:CC`` names modelled by the ``reno`` sender (loss-based AIMD, Not-ECT, in the C queue)."""
SUPPORTED = f"{', '.join(KINDS)}; aliases tcp:reno|tcp:cubic (-> reno), udp-ect1:RATE (-> cbr-l)"
MAX_CROSS_FLOWS = 1000
"""The most cross flows a spec makes (the sum of its ``*N``). Each is a simulated sender: ``reno*100000`` (a typo)
ran for minutes showing "0.0%", and a thousand flows already share a 12 Mbit/s link at 12 kbit/s each."""


class CrossSpecError(ValueError):
    """A ``--cross`` spec that cannot be parsed; the message says which part and why."""


@dataclass
class CrossItem:
    kind: str
    copies: int = 1
    rate: str | None = None  # "2mbps" or "40%"
    on: float | None = None
    off: float | None = None
    rtt_ms: float | None = None
    text: str = ""


@dataclass
class FlowPlan:
    """One sender to create: kind, active periods, return delay, rate (bits/s for CBR)."""

    kind: str
    periods: list[tuple[float, float]] = field(default_factory=list)
    ack_delay: float = 0.02
    rate_bps: float | None = None


def _float(text: str, key: str, item: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CrossSpecError(f"cross item {item!r}: {key}={text!r} is not a number") from None
    if not 0 < value < math.inf:
        raise CrossSpecError(f"cross item {item!r}: {key} must be a finite number > 0")
    return value


def parse_cross_spec(spec: str) -> list[CrossItem]:
    """Parse the grammar of the module docstring; raises :class:`CrossSpecError`."""
    from tokenwire.testbed.trace import generator_bps

    items: list[CrossItem] = []
    text = spec.strip()
    if text.lower() in ("", "none"):
        return items
    for raw in text.split("+"):
        part = raw.strip()
        head, _, args = part.partition(":")
        head = head.strip().lower()
        if head == "tcp":  # socket-testbed alias
            cc = args.strip().lower()
            if cc not in TCP_ALIASES:
                why = ("the virtual-time model has no BBR sender (rate-based, it would not behave like the Reno "
                       "model)" if cc == "bbr" else f"unknown congestion control {cc!r}" if cc else "tcp needs :CC")
                raise CrossSpecError(f"cross item {part!r}: {why}; supported: {SUPPORTED}")
            items.append(CrossItem("reno", text=part))
            continue
        if head == "udp-ect1":
            if generator_bps(args) is None:
                raise CrossSpecError(f"cross item {part!r}: udp-ect1 needs a rate like 2mbps (up to 100gbps)")
            items.append(CrossItem("cbr-l", rate=args.strip(), text=part))
            continue
        kind, star, n = head.partition("*")
        if kind not in KINDS:
            raise CrossSpecError(f"cross item {part!r}: unknown kind {kind!r} (use {SUPPORTED})")
        item = CrossItem(kind, text=part)
        if star:
            if not n.isdigit() or int(n) < 1:
                raise CrossSpecError(f"cross item {part!r}: *N needs a positive integer")
            item.copies = int(n)
            if item.copies > MAX_CROSS_FLOWS:
                raise CrossSpecError(f"cross item {part!r}: *{n} is more than the {MAX_CROSS_FLOWS} cross flows a "
                                     "spec may make")
        seen: set[str] = set()
        for kv in filter(None, (a.strip() for a in args.split(","))):
            key, eq, value = kv.partition("=")
            key = key.strip().lower()
            value = value.strip()
            if not eq or not value:
                raise CrossSpecError(f"cross item {part!r}: expected key=value, got {kv!r}")
            if key in seen:  # the last one silently won: rate=2mbps,rate=3mbps ran at 3 Mbit/s
                raise CrossSpecError(f"cross item {part!r}: {key}= given more than once")
            seen.add(key)
            if key == "rate":
                pct = value.endswith("%") and _float(value[:-1], key, part)
                if pct and pct > 1000:  # ten times the link: enough to overload any queue
                    raise CrossSpecError(f"cross item {part!r}: rate={value!r} is above 1000% of the link")
                if not pct and generator_bps(value) is None:
                    raise CrossSpecError(f"cross item {part!r}: rate={value!r} is not a rate (2mbps, up to 100gbps) "
                                         "or share (40%)")
                item.rate = value
            elif key in ("on", "off"):
                setattr(item, key, _float(value, key, part))
            elif key == "rtt":
                item.rtt_ms = _float(value, key, part)
            else:
                raise CrossSpecError(f"cross item {part!r}: unknown key {key!r} (rate, on, off, rtt)")
        if (item.on is None) != (item.off is None):
            raise CrossSpecError(f"cross item {part!r}: give both on= and off= (or neither)")
        if kind.startswith("cbr") and item.rate is None:
            raise CrossSpecError(f"cross item {part!r}: {kind} needs rate=")
        if not kind.startswith("cbr") and item.rate is not None:
            raise CrossSpecError(f"cross item {part!r}: rate= is only for cbr-l/cbr-c")
        items.append(item)
    total = sum(i.copies for i in items)
    if total > MAX_CROSS_FLOWS:
        raise CrossSpecError(f"cross spec {spec!r}: {total} flows in all, more than {MAX_CROSS_FLOWS}")
    return items


def plan_flows(items: list[CrossItem], *, seconds: float, mean_bps: float, seed: int) -> list[FlowPlan]:
    """Turn parsed items into concrete senders with on/off periods drawn from ``seed`` (deterministic)."""
    from tokenwire.testbed.trace import parse_rate

    rng = random.Random(f"cross:{seed}")
    plans: list[FlowPlan] = []
    for item in items:
        for _ in range(item.copies):
            ack = (item.rtt_ms / 1000.0) if item.rtt_ms else rng.uniform(0.005, 0.05)
            rate = None
            if item.rate is not None:
                rate = mean_bps * float(item.rate[:-1]) / 100.0 if item.rate.endswith("%") else parse_rate(item.rate)
            if item.on is None or item.off is None:
                periods = [(rng.uniform(0.0, 0.5), seconds)]
            else:
                periods = []
                t = rng.uniform(0.0, item.off)
                while t < seconds:
                    dur = rng.expovariate(1.0 / item.on)
                    periods.append((t, min(t + dur, seconds)))
                    t += dur + rng.expovariate(1.0 / item.off)
            plans.append(FlowPlan(item.kind, periods, ack, rate))
    return plans
