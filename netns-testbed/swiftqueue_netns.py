"""The namespace run of ``tokenwire testbed swiftqueue``: a real tokenwire QUIC Chatterbox stream per policy.

For each policy a fresh :class:`~.topology.Testbed` (userspace emulator: the oracle needs its queue state)
carries the cross traffic of :mod:`.traffic` and one Chatterbox answer from the SDK server
(:mod:`.endpoints` with ``--marking POLICY``: the ECN socket, the policy object of
:mod:`tokenwire.transport.marking`, Prague for ECT(1)) to an ECN-reading client. The marked flow's packets
are the down-direction rows of the emulator's per-packet log from the server's port: their queue, ECN in
and out, fate and one-way latency (arrival at the emulator to delivery, i.e. queueing + link + propagation).
The ``oracle`` policy reads the emulator's (L, C) estimate from a shared-memory board
(:class:`~.queue_oracle.OracleBoard`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from tokenwire.daemon.run_provenance import RunProvenance

from .child import Child, ChildError
from .emulator import DirectionConfig, EmulatorConfig
from .netns import run_folder
from .pktlog import read_packet_log
from .swiftqueue_eval import (
    PolicyRun,
    SwiftQueueConfig,
    build_summary,
    fallback_record,
    load_predictor_forecaster,
    parse_flow_spec,
)
from .topology import Testbed, TestbedError
from .traffic import start_cross

PORT = 8443
ECN_BY_NAME = {"not-ect": 0, "ect1": 1, "ect0": 2, "ce": 3}


class SwiftQueueRunError(ChildError):
    """A policy's run failed (a stuck or crashed endpoint is a bug to report, not a result)."""


# ------------------------------------------------------------------------------------ inside the server
def endpoint_policy_factory(args: argparse.Namespace) -> tuple[Callable[[], Any], str, dict[str, Any]]:
    """(policy factory, congestion controller, live info for the output JSON) for ``endpoints --marking``."""
    from tokenwire.transport.ecn_socket import ECT0
    from tokenwire.transport.marking import ClassicPolicy, L4SPolicy, OraclePolicy, SwiftQueuePolicy

    info: dict[str, Any] = {"policy": args.marking, "decisions": {}}
    name = args.marking
    if name == "classic":
        # ECT(0) answers CE as a loss (RFC 3168), as the daemon's classic policy does: plain reno ignored CE (the
        # app-limited token stream seldom fills its window, so earlier runs' numbers stand; a bulk flow would not)
        return (lambda: ClassicPolicy(ect0=True)), "reno-ecn", info
    if name == "l4s":
        return L4SPolicy, "prague", info
    if name == "oracle":
        from .queue_oracle import OracleBoard

        if not args.oracle_file:
            raise SystemExit("--marking oracle needs --oracle-file")
        board = OracleBoard(args.oracle_file, create=False)

        def make_oracle() -> Any:
            pol = OraclePolicy(lambda now: board.read(), classic=ECT0)
            info["decisions"] = pol.decisions
            return pol

        return make_oracle, "prague", info
    fc, fc_name = load_predictor_forecaster(args.model)
    info["forecaster"] = fc_name
    if fc is None:
        info["policy"] = "l4s (fallback: no model)"
        return L4SPolicy, "prague", info

    def make_swiftqueue() -> Any:
        def on_failure(exc: BaseException) -> None:
            # the harness reports when (this host's monotonic clock, as the run's origin) and for how many
            # packets; the policy's own warning, which this replaces, went to a stderr file nobody reads
            info["fallback"] = {"reason": pol.failed, "at_monotonic": time.monotonic()}
            info["policy"] = "swiftqueue, then l4s (fallback: the latency model failed)"
            print(f"swiftqueue: the latency forecaster failed ({pol.failed}); marking like l4s from now on",
                  file=sys.stderr, flush=True)

        pol = SwiftQueuePolicy(fc, margin_ms=args.margin_ms, hysteresis_ms=args.hysteresis_ms,
                               probe_interval_s=args.probe_interval, refuge_only=args.refuge_only,
                               classic=ECT0, on_failure=on_failure)
        info["decisions"] = pol.decisions
        return pol

    return make_swiftqueue, "prague", info


# ------------------------------------------------------------------------------------ the harness
def _endpoint(tb: Testbed, role: str, policy: str, cfg: SwiftQueueConfig, tokens: int, rate: float, out: str,
              workdir: str, oracle_path: str | None) -> Child:
    argv = [
        sys.executable, "-m", "tokenwire.testbed.endpoints", role, "--scheme", "chatterbox",
        "--host", tb.server_addr, "--port", str(PORT), "--out", out, "--tokens", str(tokens), "--rate", str(rate),
        "--seed", str(cfg.seed), "--timeout", str(cfg.seconds * 3 + 60), "--marking", policy,
        "--margin-ms", str(cfg.margin_ms), "--hysteresis-ms", str(cfg.hysteresis_ms),
        "--probe-interval", str(cfg.probe_interval_s),
    ]  # fmt: skip
    if not cfg.refuge_only:
        argv += ["--no-refuge-rule"]
    if oracle_path:
        argv += ["--oracle-file", oracle_path]
    if cfg.model:
        argv += ["--model", cfg.model]
    err_path = os.path.join(workdir, f"{policy}.{role}.stderr")
    ns = tb.server_ns if role == "server" else tb.client_ns
    with open(err_path, "w") as err:
        proc = tb.popen(ns, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
    return Child(proc, f"{policy} {role}", err_path)


def run_netns_policy(cfg: SwiftQueueConfig, policy: str, workdir: str,
                     progress: Callable[[float], None] | None = None, *, scratch: str | None = None) -> PolicyRun:
    """One policy through a fresh namespace testbed; raises :class:`SwiftQueueRunError` naming the policy if it
    fails (an endpoint that exits, never connects or stops answering, or the testbed itself)."""
    try:
        return _run_netns_policy(cfg, policy, workdir, progress, scratch=scratch)
    except SwiftQueueRunError:
        raise
    except ChildError as exc:
        raise SwiftQueueRunError(f"{policy}: {exc}") from None
    except TestbedError as exc:
        raise SwiftQueueRunError(f"{policy}: testbed: {exc}") from None


def _run_netns_policy(cfg: SwiftQueueConfig, policy: str, workdir: str, progress: Callable[[float], None] | None,
                      *, scratch: str | None) -> PolicyRun:
    rate = parse_flow_spec(cfg.flow).rate
    tokens = cfg.answer_tokens()
    log_path = os.path.join(workdir, f"{policy}.pktlog.csv")
    oracle_path = os.path.join(workdir, f"{policy}.oracle") if policy == "oracle" else None
    srv_out = os.path.join(workdir, f"{policy}.server.json")
    cli_out = os.path.join(workdir, f"{policy}.client.json")
    up = cfg.up_trace or cfg.down_trace
    emu = EmulatorConfig(
        down=DirectionConfig(cfg.down_trace, cfg.delay_ms, cfg.loss, cfg.queue),
        up=DirectionConfig(up, cfg.delay_ms, cfg.up_loss, cfg.queue),
        seed=cfg.seed, log_path=log_path, oracle_path=oracle_path,
    )  # fmt: skip
    with Testbed(emu, backend="userspace", scratch=scratch) as tb:
        if cfg.cross:
            start_cross(tb, cfg.cross, cfg.seconds * 3 + 60)
        srv = _endpoint(tb, "server", policy, cfg, tokens, rate, srv_out, workdir, oracle_path)
        srv.wait_for("ready", 30)
        cli = _endpoint(tb, "client", policy, cfg, tokens, rate, cli_out, workdir, oracle_path)
        cli.wait_for("connected", 30)
        origin = tb.origin()
        cli.send("go")
        deadline = time.monotonic() + cfg.seconds * 3 + 60
        while True:
            ev = cli.event(deadline)
            if "progress" in ev and progress:
                progress(min(cfg.seconds, int(ev["progress"]) / rate))
            if ev.get("done"):
                break
        srv.send("stop")
        srv.wait_for("stopped", 15)
        emu_stats = tb.stats()
    with open(srv_out) as fh:
        server = json.load(fh)
    with open(cli_out) as fh:
        client = json.load(fh)
    if len(server["requests"]) != 1:
        raise SwiftQueueRunError(f"{policy}: the server saw {len(server['requests'])} requests, expected 1")
    req = server["requests"][0]
    records: list[dict[str, Any]] = []
    for row in read_packet_log(log_path):
        if row["dir"] != "down" or row["sport"] != str(PORT) or float(row["arrival"]) < origin:
            continue
        delivered = row["fate"] == "delivered"
        records.append({
            "t": float(row["arrival"]) - origin, "queue": row["queue"], "ecn": ECN_BY_NAME[row["ecn_in"]],
            "size": int(row["size"]), "fate": row["fate"], "ce": row["ecn_out"] == "ce",
            "latency_ms": float(row["latency_ms"]) if delivered and row["latency_ms"] else None,
        })  # fmt: skip
    records.sort(key=lambda r: r["t"])
    marking = server.get("marking", {})
    run = PolicyRun(policy, records, gen=[float(g) for g in req["gen"]],
                    render=[float(r) for r in client["render"]], decisions=dict(marking.get("decisions", {})),
                    forecaster=marking.get("forecaster", "") if policy == "swiftqueue" else "",
                    base_delay_ms=cfg.delay_ms, span_s=max(1e-9, (records[-1]["t"] if records else 0) - cfg.warmup_s))
    run.extra = {"emulator": emu_stats, "text_ok": client.get("digest_ok"), "server_policy": marking.get("policy")}
    if policy == "swiftqueue":
        run.fallback = server_fallback(marking, origin, len(records))
    return run


def server_fallback(marking: dict[str, Any], origin: float, packets: int) -> dict[str, Any] | None:
    """The ``fallback`` block (:func:`~.swiftqueue_eval.fallback_record`) of a namespace swiftqueue run from the
    server's ``marking`` info (:func:`endpoint_policy_factory`), None when it ran as itself; ``origin``: the run's
    start on the monotonic clock, ``packets``: the marked flow's packets in the emulator's log."""
    fb = marking.get("fallback")
    if fb is not None:
        decisions = marking.get("decisions", {})
        at = fb.get("at_monotonic")
        return fallback_record("run", str(fb.get("reason")), None if at is None else at - origin,
                               int(decisions.get("fallback", 0)), sum(int(v) for v in decisions.values()))
    if str(marking.get("policy", "")).startswith("l4s (fallback"):  # no model loaded: l4s from the first packet
        reason = str(marking.get("forecaster", "")).removeprefix("none: ") or "no latency model"
        return fallback_record("load", reason, 0.0, packets, packets)
    return None


def run_netns_all(cfg: SwiftQueueConfig, *, workdir: str | None = None,
                  log_fn: Callable[[str], None] | None = None,
                  progress: Callable[[str, float, float], None] | None = None,
                  ) -> tuple[dict[str, Any], dict[str, PolicyRun]]:
    """Every policy of ``cfg`` through the namespace testbed; the JSON summary and the runs (for the plot)."""
    cfg.validate()
    started = RunProvenance()
    runs: dict[str, PolicyRun] = {}
    # no temporary folder with --keep: one made anyway was recorded nowhere, and a SIGKILL left it behind
    with run_folder(workdir, "tw-swiftqueue-") as (wd, scratch):
        for k, name in enumerate(cfg.policies):
            if log_fn:
                log_fn(f"[{k + 1}/{len(cfg.policies)}] {name} (namespaces, {cfg.seconds:g} s of tokens)")
            # (the default binds this policy's name, B023; mypy cannot infer a lambda with one: the ignore)
            runs[name] = run_netns_policy(
                cfg, name, wd, (lambda t, n=name: progress(n, t, cfg.seconds)) if progress else None,  # type: ignore[misc]
                scratch=scratch,
            )
    # one yardstick for every policy's stall ratio: the fastest any token crossed this path (as compare does)
    best = min((r - g for run in runs.values() for g, r in zip(run.gen, run.render, strict=False)),
               default=math.inf)
    base_ms = max(cfg.delay_ms, best * 1000.0 if math.isfinite(best) else cfg.delay_ms)
    for run in runs.values():
        run.base_delay_ms = base_ms
    summary = build_summary(cfg, runs, "userspace", "namespaces + userspace emulator (the oracle reads its state)",
                            started=started)
    summary["base_delay_ms"] = base_ms
    for name, run in runs.items():
        summary["policies"][name]["digest_ok"] = run.extra.get("text_ok")
        summary["policies"][name]["server_policy"] = run.extra.get("server_policy")
    return summary, runs
