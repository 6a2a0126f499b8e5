"""The compare plot: token-delay CDF per scheme and a stall timeline, one PNG.

Left: cumulative distribution of token delay ``r_i - g_i`` (log x), so tails are visible. Right: the stall
timeline, cumulative stall time per scheme against time (each rise is a stall, its height the wait), over
grey bands where the emulator dropped down-link packets, so stalls can be traced to what the network did.
"""

from __future__ import annotations

import math
from typing import Any

COLORS = {"chatterbox": "#1b9e77", "duplicate": "#7570b3", "stream": "#d95f02", "sse-tcp": "#e7298a"}


def _loss_bursts(lost_times: list[float], gap: float = 0.02) -> list[tuple[float, float]]:
    """Merge loss times closer than ``gap`` into (start, width) bands."""
    out: list[tuple[float, float]] = []
    for t in sorted(lost_times):
        if out and t - (out[-1][0] + out[-1][1]) <= gap:
            out[-1] = (out[-1][0], t - out[-1][0] + 0.002)
        else:
            out.append((t, 0.002))
    return out


def plot_compare(summary: dict[str, Any], runs: dict[str, list[Any]], path: str,
                 lost: dict[str, list[float]] | None = None) -> None:
    """Write the PNG for the first seed's runs (``runs`` from :func:`~.compare.run_compare`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tokenwire.transport.metrics import stall_times

    schemes = list(runs)
    fig, (ax_cdf, ax_tl) = plt.subplots(1, 2, figsize=(14, 5.2), gridspec_kw={"width_ratios": [1, 1.5]})
    for s in schemes:
        r = runs[s][0]
        delays = sorted((b - a) * 1000.0 for a, b in zip(r.gen, r.render, strict=False))
        if not delays:
            continue
        ys = [(i + 1) / len(r.gen) for i in range(len(delays))]
        st = summary["schemes"][s]
        label = f"{s}  stall {st['stall_ratio']:.1%}  p99 {st['p99_token_delay_ms']:.0f} ms"
        ax_cdf.step(delays, ys, where="post", color=COLORS.get(s), label=label, lw=1.8)
    ax_cdf.set_xscale("log")
    ax_cdf.set_xlabel("token delay r_i - g_i (ms, log)")
    ax_cdf.set_ylabel("share of tokens")
    ax_cdf.set_ylim(0, 1.01)
    ax_cdf.grid(True, which="both", alpha=0.3)
    oracle = summary.get("oracle", {}).get("stall_ratio")
    title = "token delay CDF"
    if oracle is not None and not (isinstance(oracle, float) and math.isnan(oracle)):
        title += f" (oracle stall {oracle:.1%})"
    ax_cdf.set_title(title)
    ax_cdf.legend(loc="lower right", fontsize=8)

    bursts: list[float] = []
    for s in schemes:
        if lost and s in lost:
            t0 = runs[s][0].origin
            bursts += [t - t0 for t in lost[s]]
    for a, w in _loss_bursts(bursts):
        ax_tl.axvspan(a, a + w, color="0.85", zorder=0, lw=0)
    for s in schemes:
        r = runs[s][0]
        t0 = r.origin
        stalls = stall_times(r.gen, r.render, r.base_delay)
        xs, ys, total = [r.gen[0] - t0 if r.gen else 0.0], [0.0], 0.0
        for rend, st in zip(r.render, stalls, strict=False):
            if st > 0:
                xs += [rend - t0 - st, rend - t0]
                ys += [total, total + st]
                total += st
        if r.render:
            xs.append(r.render[-1] - t0)
            ys.append(total)
        ax_tl.plot(xs, ys, color=COLORS.get(s), lw=1.8, label=s)
    ax_tl.set_xlabel("time since the emulator origin (s)")
    ax_tl.set_ylabel("cumulative stall (s)")
    ax_tl.set_title("stall timeline: cumulative stall per scheme; grey = down-link packets lost")
    ax_tl.grid(True, alpha=0.3)
    ax_tl.legend(loc="upper left", fontsize=8)
    cfg = summary.get("config", {})
    fig.suptitle(
        f"down {cfg.get('down_trace')}  delay {cfg.get('delay_ms')} ms  loss {cfg.get('loss')}  "
        f"queue {cfg.get('queue')}  {cfg.get('tokens')} tokens @ {cfg.get('rate')}/s  "
        f"seed {cfg.get('seed')}  "
        f"backend {summary.get('backend')}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
