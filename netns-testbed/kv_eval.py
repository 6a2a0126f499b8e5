"""``tokenwire testbed kv``: KV fetches end to end through the namespace testbed, one row per controller.

Setup (once per invocation): the real SmolLM2-135M KV of the first ``context_tokens`` tokens of a text is
computed here and written to a ``.pt`` file; the KV server endpoint (the daemon's KV service, local store,
ECT(1) + Prague) ingests it in the server namespace; the SDK client connects from the client namespace over
the emulated path. Then ``repeats`` rounds; in each round every controller fetches the context once, in a
shuffled order, each starting at the same random offset into the traces, drawn per round (the emulator's
origin moves), so controllers are compared on the same stretch of the link.

Per fetch: fetch time (request sent -> every chunk received and decoded, plus the modelled recompute time of
text chunks, ``recompute_us_per_token`` x their tokens), levels, payload bytes, and the down link's capacity
from the request's arrival at the server (sent + one-way delay) to the last byte's departure (received - one-way
delay), from the trace at the offset used: ``goodput_fraction`` = payload bytes / that capacity (conservative:
the window includes the server's reaction time and counts QUIC/UDP/IP headers as waste).
Quality per chunk is the measured top-1 of its level
(:data:`~tokenwire.transport.kv_controller.LEVEL_TOP1`, from ``tokenwire kv eval`` on three texts), token-
weighted over the context; text chunks count as exact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tokenwire.daemon.cli import repeated

from .child import Child, ChildError
from .emulator import DirectionConfig, EmulatorConfig
from .netns import run_folder
from .topology import Testbed
from .trace import trace_from_spec

PORT = 8444
CONTROLLERS = ("tokenwire", "tokenwire-ewma", "even-split", "fixed-L1", "fixed-L2", "fixed-L3")
# shipped in the package (pyproject.toml's package data; tests/data/prose_harbor.txt links to it): an installed
# copy has no tests/ folder, and `testbed kv` without --text needs it
DEFAULT_TEXT = Path(__file__).resolve().parent / "data" / "prose_harbor.txt"


class KVEvalError(ChildError):
    pass


@dataclass
class KVEvalConfig:
    down_trace: str
    up_trace: str
    delay_ms: float = 50.0
    queue: str = "droptail:packets=1000"
    loss: str = "none"  # down link (server -> client)
    up_loss: str = "none"
    context_tokens: int = 1024
    chunk_tokens: int = 256
    deadline_ms: int = 3000
    controllers: list[str] = field(default_factory=lambda: ["tokenwire", "even-split", "fixed-L1", "fixed-L2",
                                                            "fixed-L3"])
    repeats: int = 5
    seed: int = 0
    text: str = str(DEFAULT_TEXT)
    recompute_us_per_token: int | None = None  # None: this machine's measured SmolLM2 prefill per token
    prior_mbps: float = 5.0
    stale_factor: float | None = None  # tokenwire's margins (None: the controller's defaults)
    reserve: float | None = None
    legacy_controller: bool = False  # tokenwire's previous rule, for ablations
    guard_weight: float | None = None  # tokenwire's guard (None: the controller's default)
    firm_guard_weight: float | None = None  # ...of a fetch's first (cold) and last chunk
    synthetic: tuple[int, int, int] | None = None  # (layers, heads, dim): random KV, no model (smoke tests)

    def validate(self) -> None:
        bad = [c for c in self.controllers if c not in CONTROLLERS]
        if bad or not self.controllers:
            raise ValueError(f"unknown controller(s) {bad}; choose from {', '.join(CONTROLLERS)}")
        twice = sorted(repeated(self.controllers))
        if twice:  # the results are keyed by controller: the second one's fetches replaced the first's
            raise ValueError(f"--controllers: {', '.join(twice)} listed twice")
        if self.context_tokens < 1 or self.chunk_tokens < 16 or self.deadline_ms < 1 or self.repeats < 1:
            raise ValueError("--context-tokens, --deadline-ms, --repeats must be >= 1, --chunk-tokens >= 16")
        from tokenwire.transport.errors import FrameError
        from tokenwire.transport.frames import MAX_DEADLINE_MS, MAX_KV_CHUNKS, MAX_KV_TOKENS, KvMeta

        # the protocol's bounds on a fetch, which otherwise failed every fetch after the context was made
        if self.deadline_ms > MAX_DEADLINE_MS:
            raise ValueError(f"--deadline-ms {self.deadline_ms}: at most {MAX_DEADLINE_MS} (the KV protocol's bound)")
        if self.context_tokens > MAX_KV_TOKENS:
            raise ValueError(f"--context-tokens {self.context_tokens}: at most {MAX_KV_TOKENS} (the KV protocol's "
                             "bound on one fetch)")
        if -(-self.context_tokens // self.chunk_tokens) > MAX_KV_CHUNKS:
            raise ValueError(f"--context-tokens {self.context_tokens} in chunks of {self.chunk_tokens} is more than "
                             f"{MAX_KV_CHUNKS} chunks (the KV protocol's bound): use larger --chunk-tokens")

        _, chunk_tokens_ok, _ = KvMeta.FIELDS["ct"]
        try:  # the protocol's own bound: past it the server's KV_META failed every fetch, after the setup
            chunk_tokens_ok("kvmeta", "ct", self.chunk_tokens)
        except FrameError as exc:
            raise ValueError(f"--chunk-tokens {self.chunk_tokens}: beyond the KV protocol's bound ({exc})") from None
        if not 0 < self.prior_mbps < math.inf:
            raise ValueError(f"--prior-mbps must be > 0, got {self.prior_mbps}")
        from tokenwire.transport.kv_channel import ServerTuning

        try:  # the knobs the server endpoint passes to its ServerTuning, checked before any namespace exists
            ServerTuning().override(stale_factor=self.stale_factor, reserve=self.reserve,
                                    guard_weight=self.guard_weight, firm_guard_weight=self.firm_guard_weight,
                                    recompute_us_per_token=self.recompute_us_per_token)
        except ValueError as exc:
            knob, _, rest = str(exc).partition(" ")
            raise ValueError(f"--{knob.replace('_', '-')} {rest}") from None
        self.emulator_config().down.validate()
        self.emulator_config().up.validate()

    def emulator_config(self, log_path: str | None = None) -> EmulatorConfig:
        return EmulatorConfig(down=DirectionConfig(self.down_trace, self.delay_ms, self.loss, self.queue),
                              up=DirectionConfig(self.up_trace, self.delay_ms, self.up_loss, self.queue),
                              seed=self.seed, log_path=log_path)


def prepare_context(cfg: KVEvalConfig, path: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Real SmolLM2 KV of the first ``context_tokens`` tokens of the text, saved for the endpoints."""
    import shutil

    import torch

    from tokenwire.transport.cachegen.smollm import cache_root, kv_from_cache, load_smollm2

    if cfg.synthetic is not None:
        layers, heads, dim = cfg.synthetic
        g = torch.Generator().manual_seed(cfg.seed)
        shape = (1, heads, cfg.context_tokens, dim)
        torch.save({"model": "synthetic", "fingerprint": 1, "ids": torch.arange(cfg.context_tokens),
                    "k": [torch.randn(shape, generator=g).half() for _ in range(layers)],
                    "v": [torch.randn(shape, generator=g).half() for _ in range(layers)]}, path)
        return {"model": "synthetic", "prefill_s": 0.0, "geometry": [layers, heads, dim],
                "elements": 2 * layers * heads * dim * cfg.context_tokens}
    if cfg.text == str(DEFAULT_TEXT) and not DEFAULT_TEXT.is_file():  # an install made without the package data
        raise KVEvalError(f"the default context text ({DEFAULT_TEXT}) is missing: it comes with the source tree and "
                          "the package, so this install is incomplete; pass --text FILE (any plain English text)")
    try:
        raw = Path(cfg.text).read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KVEvalError(f"--text {cfg.text}: {getattr(exc, 'strerror', None) or exc}") from None
    # keyed by content, not name: another file called the same, or this one edited, is another context
    digest = hashlib.sha256(raw).hexdigest()
    source = {"text": str(cfg.text), "text_sha256": digest}
    cached = cache_root() / f"kvctx-{Path(cfg.text).stem}-{digest[:16]}-{cfg.context_tokens}.pt"
    if cached.is_file() and cached.with_suffix(".json").is_file():  # the same context as an earlier run
        shutil.copyfile(cached, path)
        log(f"context KV from {cached}")
        return {**json.loads(cached.with_suffix(".json").read_text()), **source}
    lm = load_smollm2()
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, : cfg.context_tokens]
    if ids.shape[1] < cfg.context_tokens:
        raise KVEvalError(f"--context-tokens {cfg.context_tokens}: {cfg.text} has only {ids.shape[1]} tokens")
    t0 = time.monotonic()
    with torch.no_grad():
        out = lm.model(ids, use_cache=True)
    prefill_s = time.monotonic() - t0
    kv = kv_from_cache(getattr(out, "cache", None) or out.past_key_values)
    log(f"prefill of {cfg.context_tokens} tokens: {prefill_s:.2f} s on this CPU")
    torch.save({"model": lm.name, "fingerprint": lm.fingerprint, "ids": ids[0],
                "k": [k.to(torch.float16).contiguous() for k, _ in kv],
                "v": [v.to(torch.float16).contiguous() for _, v in kv]}, path)
    layers, heads, dim = len(kv), kv[0][0].shape[1], kv[0][0].shape[3]
    info = {"model": lm.name, "prefill_s": prefill_s, "elements": 2 * layers * heads * dim * cfg.context_tokens,
            "geometry": [layers, heads, dim], **source}
    cached.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, cached)
    cached.with_suffix(".json").write_text(json.dumps(info))
    return info


def _start(tb: Testbed, ns: str, role: str, cfg: KVEvalConfig, kv_path: str, workdir: str) -> Child:
    err = os.path.join(workdir, f"kv.{role}.stderr")
    argv = [sys.executable, "-m", "tokenwire.testbed.kv_endpoints", role, "--host", tb.server_addr, "--port",
            str(PORT), "--kv", kv_path, "--chunk-tokens", str(cfg.chunk_tokens), "--prior-mbps",
            str(cfg.prior_mbps), "--recompute-us-per-token", str(cfg.recompute_us_per_token)]
    for flag, value in (("--stale-factor", cfg.stale_factor), ("--reserve", cfg.reserve),
                        ("--guard-weight", cfg.guard_weight), ("--firm-guard-weight", cfg.firm_guard_weight)):
        if value is not None and role == "server":
            argv += [flag, str(value)]
    if cfg.legacy_controller and role == "server":
        argv.append("--legacy-controller")
    with open(err, "w") as fh:
        proc = tb.popen(ns, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=fh, text=True, bufsize=1)
    return Child(proc, f"kv {role}", err)


def fetch_metrics(res: dict[str, Any], *, elements: int, recompute_us_per_token: int,
                  top1: dict[str, float]) -> dict[str, Any]:
    """One fetch's numbers (see module docstring)."""
    rep = res["result"]
    chunks = rep["chunks"]
    tokens = sum(c["tokens"] for c in chunks)
    text_tokens = sum(c["tokens"] for c in chunks if c["level"] == "text")
    fetch_ms = rep["fetch_ms"] + text_tokens * recompute_us_per_token / 1e3
    quality = sum(top1[c["level"]] * c["tokens"] for c in chunks) / tokens
    payload = rep["payload_bytes"]
    return {"fetch_ms": fetch_ms, "deadline_met": fetch_ms <= rep["deadline_ms"], "quality_top1": quality,
            "bits_per_element": payload * 8 / elements, "payload_bytes": payload, "levels": rep["levels"],
            "chunks": [{k: c[k] for k in ("level", "bytes", "first_byte_ms", "received_ms", "decoded_ms")}
                       for c in chunks]}


def timed_out_metrics(ev: dict[str, Any]) -> dict[str, Any]:
    """A fetch the client gave up on: a missed deadline at the time it waited; no quality, no bytes counted."""
    return {"fetch_ms": ev["elapsed_s"] * 1e3, "deadline_met": False, "timed_out": True, "quality_top1": math.nan,
            "bits_per_element": math.nan, "payload_bytes": 0, "levels": [], "chunks": [], "sent_at": ev["sent_at"],
            "last_at": ev["sent_at"] + ev["elapsed_s"]}


def add_goodput(rows: dict[str, list[dict[str, Any]]], log_path: str, down: Any) -> None:
    """Goodput per fetch from the emulator's packet log (virtual departure times on the host clock).

    The window runs from the first to the last departure of a packet of the KV connection in the down direction
    during the fetch; ``goodput_fraction`` = payload bytes / the trace's capacity in that window (so QUIC, UDP and
    IP headers and retransmissions count as waste); ``link_utilization`` = IP bytes the link carried for the
    fetch / the same capacity.
    """
    from .pktlog import read_packet_log

    deps: list[tuple[float, int]] = []
    for r in read_packet_log(log_path):
        if r["dir"] == "down" and r["sport"] == str(PORT) and r["fate"] == "delivered" and r["departure"]:
            deps.append((float(r["departure"]), int(r["size"])))
    deps.sort()
    times = [d for d, _ in deps]
    import bisect

    for fetches in rows.values():
        for m in fetches:
            lo = bisect.bisect_left(times, m["sent_at"])
            hi = bisect.bisect_right(times, m["last_at"])
            if hi <= lo or m.get("timed_out"):
                m["goodput_fraction"] = m["link_utilization"] = math.nan
                continue
            t0 = (times[lo] - m["origin"]) * 1e3
            t1 = (times[hi - 1] - m["origin"]) * 1e3
            cap = down.bytes_between(t0 - 1e-6, t1)
            m["capacity_bytes"] = cap
            m["goodput_fraction"] = m["payload_bytes"] / cap if cap else math.nan
            m["link_utilization"] = sum(s for _, s in deps[lo:hi]) / cap if cap else math.nan


def _mean(xs: Any) -> float:
    vals = [x for x in xs if not math.isnan(x)]
    return statistics.fmean(vals) if vals else math.nan


def summarize(per: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out = {}
    for ctl, rows in per.items():
        times = sorted(r["fetch_ms"] for r in rows)
        p95 = times[min(len(times) - 1, math.ceil(0.95 * len(times)) - 1)] if times else math.nan
        out[ctl] = {
            "deadline_attainment": statistics.fmean(r["deadline_met"] for r in rows),
            "mean_quality_top1": _mean(r["quality_top1"] for r in rows),  # over completed fetches
            "mean_bits_per_element": _mean(r["bits_per_element"] for r in rows),
            "timed_out": sum(1 for r in rows if r.get("timed_out")),
            "p95_fetch_ms": p95,
            "goodput_fraction": _mean(r.get("goodput_fraction", math.nan) for r in rows),
            "link_utilization": _mean(r.get("link_utilization", math.nan) for r in rows),
            "fetches": len(rows),
            "level_counts": {lv: sum(r["levels"].count(lv) for r in rows)
                             for lv in ("text", "low", "medium", "high")},
        }
    return out


KV_BACKEND_REASON = "the KV run needs the userspace emulator (its packet log measures the link's capacity)"


def run_kv_eval(cfg: KVEvalConfig, *, log: Callable[[str], None] = lambda m: None,
                workdir: str | None = None) -> dict[str, Any]:
    from tokenwire.transport.errors import ErrorCode
    from tokenwire.transport.kv_controller import LEVEL_TOP1

    cfg.validate()
    down = trace_from_spec(cfg.down_trace)
    rng = random.Random(cfg.seed)
    rows: dict[str, list[dict[str, Any]]] = {c: [] for c in cfg.controllers}
    # no temporary folder with --keep: one made anyway was recorded nowhere, and a SIGKILL left it behind
    with run_folder(workdir, "tw-kv-eval-") as (wd, scratch):
        kv_path = os.path.join(wd, "context.pt")
        ctx = prepare_context(cfg, kv_path, log)
        if cfg.recompute_us_per_token is None:
            cfg.recompute_us_per_token = round(ctx["prefill_s"] / cfg.context_tokens * 1e6)
            log(f"text chunks cost the measured prefill: {cfg.recompute_us_per_token} us/token")
        log_path = os.path.join(wd, "pktlog.csv")
        with Testbed(cfg.emulator_config(log_path), backend="userspace", scratch=scratch) as tb:
            srv = _start(tb, tb.server_ns, "server", cfg, kv_path, wd)
            ready = srv.wait_for("ready", 300)
            log(f"server ready: ingested and encoded {ready.get('encodes')} chunk levels in "
                f"{ready.get('ingest_s', 0):.1f} s")
            cli = _start(tb, tb.client_ns, "client", cfg, kv_path, wd)
            cli.wait_for("connected", 60)
            timeout = 30 + 20 * cfg.deadline_ms / 1000
            # warm-up (decoder JIT, connection state): one relaxed fetch on each controller's connection, not
            # counted (each controller has its own connection: kv_endpoints)
            tb.origin(rng.uniform(0, down.period_ms / 1000))
            for ctl in cfg.controllers:
                cli.send(json.dumps({"controller": "fixed-L1", "conn": ctl, "deadline_ms": 10 * cfg.deadline_ms}))
                cli.wait_for("result", timeout * 10)
                srv.wait_for("fetch_closed", 10)
            total = cfg.repeats * len(cfg.controllers)
            k = 0
            for rep in range(cfg.repeats):
                order = list(cfg.controllers)
                rng.shuffle(order)
                offset = rng.uniform(0, down.period_ms / 1000)  # one offset per repeat: paired comparison
                for ctl in order:
                    k += 1
                    origin = tb.origin(offset)
                    cli.send(json.dumps({"controller": ctl, "deadline_ms": cfg.deadline_ms}))
                    deadline = time.monotonic() + timeout
                    while True:
                        ev = cli.event(deadline)
                        if "result" in ev or "fetch_error" in ev:
                            break
                    if "fetch_error" in ev:
                        if ev.get("code") != ErrorCode.UPSTREAM_TIMEOUT:  # anything else is a bug: stop
                            raise KVEvalError(f"{ctl}: {ev['fetch_error']}")
                        m = timed_out_metrics(ev)  # a miss, counted as one; the run goes on
                        log(f"[{k}/{total}] {ctl}: {ev['fetch_error']} after {ev['elapsed_s']:.0f} s (MISSED)")
                        try:  # the server saw the fetch end if the connection still worked
                            closed = srv.wait_for("fetch_closed", 5)["fetch_closed"]
                        except ChildError:
                            closed = {}
                        m.update(repeat=rep, offset_s=offset, origin=origin,
                                 decisions=closed.get("decisions", []))
                        rows[ctl].append(m)
                        continue
                    m = fetch_metrics(ev, elements=ctx["elements"],
                                      recompute_us_per_token=cfg.recompute_us_per_token, top1=LEVEL_TOP1)
                    closed = srv.wait_for("fetch_closed", 10)["fetch_closed"]
                    m.update(repeat=rep, offset_s=offset, origin=origin, sent_at=ev["sent_at"],
                             last_at=ev["last_at"], decisions=closed.get("decisions", []))
                    rows[ctl].append(m)
                    log(f"[{k}/{total}] {ctl}: {m['fetch_ms']:.0f} ms "
                        f"({'met' if m['deadline_met'] else 'MISSED'}), levels {','.join(m['levels'])}")
            cli.send("stop")
            srv.send("stop")
            srv.wait_for("stopped", 30)
            backend, backend_reason = tb.backend, tb.backend_reason
        add_goodput(rows, log_path, down)
    if backend_reason == "requested":  # (by this function, not the user: say why)
        backend_reason = KV_BACKEND_REASON
    # backend and its reason, as compare's and swiftqueue's JSON have them (docs/testbed.md: every run reports them)
    return {"controllers": summarize(rows), "fetches": rows, "config": asdict(cfg), "context": ctx,
            "trace_mean_mbps": down.mean_mbps, "backend": backend, "backend_reason": backend_reason}


def plot_kv(summary: dict[str, Any], path: str) -> None:
    """Quality vs deadline attainment per controller, and the fetch-time distribution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ctls = summary["controllers"]
    for name, d in ctls.items():
        ax1.scatter(d["deadline_attainment"] * 100, d["mean_quality_top1"] * 100, s=60)
        ax1.annotate(name, (d["deadline_attainment"] * 100, d["mean_quality_top1"] * 100),
                     textcoords="offset points", xytext=(5, 4), fontsize=9)
        times = sorted(r["fetch_ms"] for r in summary["fetches"][name])
        ax2.plot(times, [(i + 1) / len(times) for i in range(len(times))], label=name)
    ax1.axvline(95, color="grey", ls=":", lw=1)
    ax1.set_xlabel("deadline attainment (%)")
    ax1.set_ylabel("mean top-1 agreement (%)")
    ax1.set_title("quality vs. attainment")
    dl = summary["config"]["deadline_ms"]
    ax2.axvline(dl, color="grey", ls=":", lw=1)
    ax2.set_xlabel("fetch time (ms)")
    ax2.set_ylabel("CDF")
    ax2.legend(fontsize=8)
    trace = os.path.basename(summary["config"]["down_trace"])
    ax2.set_title(f"{trace}, {summary['config']['context_tokens']} tokens, deadline {dl} ms")
    fig.tight_layout()
    from .plots import save_figure  # atomic, as --json: an interrupt left a truncated PNG over the good one

    save_figure(fig, path)
    plt.close(fig)
