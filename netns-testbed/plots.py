"""The compare plot: token-delay CDF per scheme and a stall timeline, one PNG.

Left: cumulative distribution of token delay ``r_i - g_i`` (log x), so tails are visible. Right: the stall
timeline, cumulative stall time per scheme against time (each rise is a stall, its height the wait), with
the oracle's curve (the floor the path itself imposes) and a rug of the down-link packets the emulator lost,
so stalls can be traced to what the network did. Both panels show the first seed.
"""

from __future__ import annotations

import os
from typing import Any

COLORS = {"chatterbox": "#1b9e77", "duplicate": "#7570b3", "stream": "#d95f02", "sse-tcp": "#e7298a"}


def save_figure(fig: Any, path: str, *, dpi: int = 110) -> None:
    """Write ``fig`` to ``path`` as every ``--plot`` is written: through :func:`tokenwire.daemon.cli.output_file`,
    like ``--json``. ``fig.savefig(path)`` wrote in place, and an interrupt (or a full disk) meanwhile left a
    truncated image where the previous good one was.

    The format is the one ``path``'s extension names (``--plot x.svg``), PNG without one: the temporary file's
    ``.tmp`` would otherwise be taken for the format.
    """
    from tokenwire.daemon.cli import output_file

    ext = os.path.splitext(path)[1][1:].lower()
    with output_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=ext or "png")


def _cumulative(gen: list[float], render: list[float], base: float, t0: float) -> tuple[list[float], list[float]]:
    """Step curve of cumulative stall (s) against time since ``t0``."""
    from tokenwire.transport.metrics import rendered_prefix, stall_times

    render = rendered_prefix(render)
    stalls = stall_times(gen, render, base)
    xs, ys, total = [gen[0] - t0 if gen else 0.0], [0.0], 0.0
    for rend, st in zip(render, stalls, strict=False):
        if st > 0:
            xs += [rend - t0 - st, rend - t0]
            ys += [total, total + st]
            total += st
    if render:
        xs.append(render[-1] - t0)
        ys.append(total)
    return xs, ys


def plot_compare(summary: dict[str, Any], runs: dict[str, list[Any]], path: str,
                 lost: dict[str, list[float]] | None = None) -> None:
    """Write the PNG for the first seed's runs (``runs`` from :func:`~.compare.run_compare`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tokenwire.transport.metrics import oracle_render_times

    schemes = list(runs)
    first = {s: runs[s][0] for s in schemes}
    nseeds = len(next(iter(runs.values())))
    fig, (ax_cdf, ax_tl) = plt.subplots(1, 2, figsize=(14, 5.4), gridspec_kw={"width_ratios": [1, 1.5]})
    for s, r in first.items():
        delays = sorted((b - a) * 1000.0 for a, b in zip(r.gen, r.render, strict=False))
        if not delays or r.stats is None:
            continue
        ys = [(i + 1) / len(r.gen) for i in range(len(delays))]
        label = f"{s}  stall {r.stats.stall_ratio:.1%}  p99 {r.stats.p99_token_delay_ms:.0f} ms"
        ax_cdf.step(delays, ys, where="post", color=COLORS.get(s), label=label, lw=1.8)
    ax_cdf.set_xscale("log")
    ax_cdf.set_xlabel("token delay r_i - g_i (ms, log)")
    ax_cdf.set_ylabel("share of tokens")
    ax_cdf.set_ylim(0, 1.01)
    ax_cdf.grid(True, which="both", alpha=0.3)
    ax_cdf.set_title("token delay CDF" + (f" (seed {first[schemes[0]].seed}; {nseeds} seeds in the JSON)"
                                          if nseeds > 1 else ""))
    ax_cdf.legend(loc="lower right", fontsize=8)

    # loss events of the first seed (the same channel-time pattern for every scheme), as a rug at the bottom
    events: list[float] = []
    for s, r in first.items():
        if lost and s in lost:
            events += [t - r.origin for t in lost[s]]
    top = 0.0
    for s, r in first.items():
        xs, ys = _cumulative(r.gen, r.render, r.base_delay, r.origin)
        top = max(top, ys[-1])
        ax_tl.plot(xs, ys, color=COLORS.get(s), lw=1.8, label=s)
    # the oracle over the union of every scheme's delivered packets: the floor the path itself imposes
    base = first[schemes[0]]
    deliveries = [(a - r.origin, b - r.origin) for r in first.values() for a, b in r.deliveries]
    if deliveries:
        gen0 = [g - base.origin for g in base.gen]
        orc = oracle_render_times(gen0, deliveries)
        xs, ys = _cumulative(gen0, orc, base.base_delay, 0.0)
        ax_tl.plot(xs, ys, color="black", lw=1.2, ls="--", label="oracle (union of packets)")
    if events:
        ax_tl.plot(events, [-0.02 * max(top, 0.1)] * len(events), "|", color="0.45", ms=7,
                   label="down-link packet lost")
    ax_tl.set_xlabel("time since the emulator origin (s)")
    ax_tl.set_ylabel("cumulative stall (s)")
    ax_tl.set_title("stall timeline: cumulative stall per scheme")
    ax_tl.grid(True, alpha=0.3)
    ax_tl.legend(loc="upper left", fontsize=8)
    cfg = summary.get("config", {})
    down = str(cfg.get("down_trace")).rsplit("/", 1)[-1]
    fig.suptitle(
        f"down {down}  delay {cfg.get('delay_ms')} ms  loss {cfg.get('loss')}  queue {cfg.get('queue')}  "
        f"{cfg.get('tokens')} tokens @ {cfg.get('rate')}/s  backend {summary.get('backend')}",
        fontsize=9,
    )
    fig.tight_layout()
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
