"""The swiftqueue plot: the marked flow's latency CDF per policy and a timeline of its L/C choices.

Left: CDF of one-way packet latency (log x) per policy, so the tail the policies fight over is visible.
Right, top: latency of each packet against time for ``l4s`` and ``swiftqueue`` (swiftqueue's packets
coloured by the queue they used). Right, bottom: share of packets sent to L in 100 ms bins for the
adaptive policies (``swiftqueue``, ``oracle``) — when the choice flips, and whether it flips at the right time.
"""

from __future__ import annotations

from typing import Any

COLORS = {"classic": "#d95f02", "l4s": "#7570b3", "swiftqueue": "#1b9e77", "oracle": "0.3"}


def _bins(records: list[dict[str, Any]], width: float = 0.1) -> tuple[list[float], list[float]]:
    counts: dict[int, list[int]] = {}
    for r in records:
        b = int(r["t"] / width)
        c = counts.setdefault(b, [0, 0])
        c[0] += 1
        c[1] += r["ecn"] & 1
    keys = sorted(counts)
    return [k * width for k in keys], [counts[k][1] / counts[k][0] for k in keys]


def _legend(ax: Any, loc: str) -> None:
    """A legend where the panel has labelled lines: an empty panel (``--policies classic``: no l4s or swiftqueue
    run) made matplotlib warn "No artists with labels found to put in legend"."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc=loc, fontsize=8)


def plot_swiftqueue(summary: dict[str, Any], runs: dict[str, Any], path: str) -> None:
    """Write the PNG (``runs`` are :class:`~.swiftqueue_eval.PolicyRun` by policy name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import save_figure

    fig = plt.figure(figsize=(14, 6))
    gs = fig.add_gridspec(2, 2, width_ratios=[1, 1.5], height_ratios=[2, 1])
    ax_cdf = fig.add_subplot(gs[:, 0])
    ax_lat = fig.add_subplot(gs[0, 1])
    ax_l = fig.add_subplot(gs[1, 1], sharex=ax_lat)
    t0s = {name: (run.records[0]["t"] if run.records else 0.0) for name, run in runs.items()}
    for name, run in runs.items():
        lat = sorted(r["latency_ms"] for r in run.records if r["latency_ms"] is not None)
        if not lat:
            continue
        d = summary["policies"][name]
        ys = [(i + 1) / len(lat) for i in range(len(lat))]
        ax_cdf.step(lat, ys, where="post", color=COLORS.get(name), lw=1.8,
                    label=f"{name}  p99 {d['p99_ms']:.0f} ms  L {d['l_share']:.0%}")
    ax_cdf.set_xscale("log")
    ax_cdf.set_xlabel("one-way packet latency (ms, log)")
    ax_cdf.set_ylabel("share of the marked flow's packets")
    ax_cdf.set_ylim(0, 1.01)
    ax_cdf.grid(True, which="both", alpha=0.3)
    _legend(ax_cdf, "lower right")
    ax_cdf.set_title("latency CDF")

    if "l4s" in runs:
        rs = [r for r in runs["l4s"].records if r["latency_ms"] is not None]
        ax_lat.plot([r["t"] - t0s["l4s"] for r in rs], [r["latency_ms"] for r in rs], color=COLORS["l4s"],
                    lw=0.8, alpha=0.8, label="l4s (all ECT(1))")
    if "swiftqueue" in runs:
        rs = [r for r in runs["swiftqueue"].records if r["latency_ms"] is not None]
        series = ((1, COLORS["swiftqueue"], "swiftqueue, sent to L"), (0, "#e7298a", "swiftqueue, sent to C"))
        for q, color, label in series:
            sel = [r for r in rs if (r["ecn"] & 1) == q]
            ax_lat.scatter([r["t"] - t0s["swiftqueue"] for r in sel], [r["latency_ms"] for r in sel], s=4,
                           color=color, label=label)
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.grid(True, alpha=0.3)
    _legend(ax_lat, "upper right")
    ax_lat.set_title("per-packet latency over time")
    for name in ("swiftqueue", "oracle"):
        if name in runs and runs[name].records:
            xs, ys = _bins(runs[name].records)
            ax_l.step([x - t0s[name] for x in xs], ys, where="post", color=COLORS[name], lw=1.2, label=name)
    ax_l.set_ylim(-0.05, 1.05)
    ax_l.set_ylabel("share sent to L")
    ax_l.set_xlabel("time (s)")
    ax_l.grid(True, alpha=0.3)
    _legend(ax_l, "lower right")
    cfg = summary.get("config", {})
    down = str(cfg.get("down_trace")).rsplit("/", 1)[-1]
    fig.suptitle(f"down {down}  delay {cfg.get('delay_ms')} ms  queue {cfg.get('queue')}  cross "
                 f"{', '.join(cfg.get('cross') or []) or 'none'}  flow {cfg.get('flow')}  backend "
                 f"{summary.get('backend')}", fontsize=9)
    fig.tight_layout()
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
