"""``tokenwire bench ...``: benchmarks that print numbers and write JSON.

Benchmarks that compare measure their baseline in the same run and report ratios and medians, because the
machines are shared and noisy (``bench daemon`` has no baseline: absolute numbers of the real daemon under
load). Each benchmark lives with its feature and is listed here, except the KV codec's, ``tokenwire kv bench``,
which ``bench --help`` points to."""

from __future__ import annotations

import argparse
import importlib
import statistics
from collections.abc import Callable
from typing import Any

BENCH_MODULES: list[str] = [
    "tokenwire.transport.bench_transport",
    "tokenwire.daemon.bench_daemon",
    "tokenwire.testbed.bench",
    "tokenwire.predictor.bench",
]

KV_BENCH_NOTE = ("The KV codec's benchmark (encode/decode MB/s vs zstd-1 on the same symbols) is `tokenwire kv bench`, "
                 "with the other KV commands.")


def spread(values: list[float], runs_key: str | None = None) -> dict[str, Any]:
    """Median and range of repeated measurements (the benchmark standard: medians of repeats, spread shown), with
    the values themselves under ``runs_key`` where given. The one helper of every bench that reports a spread."""
    out: dict[str, Any] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    if runs_key is not None:
        out[runs_key] = values
    return out


def register(sub: argparse._SubParsersAction) -> None:
    # the KV codec's benchmark lives with the KV commands: `bench --help` listed every other one and never said where
    parser = sub.add_parser(
        "bench", help="benchmarks (print numbers, write JSON)", epilog=KV_BENCH_NOTE,
        description="Benchmarks of the transport, the daemon, the link emulator and the latency predictor. Each "
        "prints its numbers and, with --json, writes them with the run's provenance; those that compare "
        "measure their baseline in the same run and report medians of repeats with their range, as the machines "
        "are shared and noisy.",
    )
    bench_sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    bench_sub.required = True
    for name in BENCH_MODULES:
        importlib.import_module(name).register(bench_sub)


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGKILL a benchmark's child (daemon, server, client worker) when the
    benchmark dies: a SIGKILL of the benchmark, where no ``finally`` runs, left them running for good, reparented
    to PID 1. ``None`` where ``prctl(PR_SET_PDEATHSIG)`` is missing (not Linux): the children are then stopped only
    by the benchmark's own teardown (Ctrl-C, SIGTERM, SIGHUP)."""
    import os
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return None
    from tokenwire.testbed.netns import PR_SET_PDEATHSIG, _get_libc

    try:
        prctl = _get_libc().prctl  # looked up here: the child between fork and exec must not import or load
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the benchmark died before the prctl: nobody is left to send the signal
            os._exit(1)

    return preexec
