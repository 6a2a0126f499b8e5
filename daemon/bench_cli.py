"""``tokenwire bench ...``: benchmarks that print numbers and write JSON.

Benchmarks that compare measure their baseline in the same run and report ratios and medians, because the
machines are shared and noisy (``bench daemon`` has no baseline: absolute numbers of the real daemon under
load). Each benchmark lives with its feature and is listed here.
"""

from __future__ import annotations

import argparse
import importlib

BENCH_MODULES: list[str] = [
    "tokenwire.transport.bench_transport",
    "tokenwire.daemon.bench_daemon",
    "tokenwire.testbed.bench",
    "tokenwire.predictor.bench",
]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="benchmarks (print numbers, write JSON)")
    bench_sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    bench_sub.required = True
    for name in BENCH_MODULES:
        importlib.import_module(name).register(bench_sub)
