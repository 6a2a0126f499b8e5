"""What a measurement's numbers depend on besides its settings: the code, the libraries, the host and its load.

Benchmarks run on shared, noisy machines; a JSON file that does not say which commit, on how many CPUs, at what
load and when it was measured cannot be compared with another one. Every ``bench`` command's JSON carries
:func:`run_provenance` (started before the measurement, finished after it, so the load is the load around it);
``testbed swiftqueue`` adds its own model and constants to the same code fields.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

# the libraries whose speed a bench measures, besides Python's own
LIBRARIES = ("aioquic", "uvloop", "onnxruntime", "numpy", "torch", "zstandard")


def git_commit() -> str | None:
    """The source tree's commit, with "-dirty" when it has uncommitted changes; None for an installed package or
    a host without git."""
    here = os.path.dirname(os.path.realpath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty", "--abbrev=40"],
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # (no load average on this platform)
        return None


def _library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _cpus_usable() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


class RunProvenance:
    """Started where the measurement starts; :meth:`finish` gives the JSON block once it has ended."""

    def __init__(self) -> None:
        self.started = datetime.now(UTC)
        self._t0 = time.monotonic()
        self.load_start = _load()
        # the commit whose code runs: read at the start, as Python imported it (a commit made during a long run
        # was recorded, with -dirty, by a testbed swiftqueue JSON that read it at the end)
        self.git_commit = git_commit()

    def finish(self) -> dict[str, Any]:
        from .cli import installed_version

        return {
            "started_utc": self.started.isoformat(timespec="seconds"),
            "wall_s": round(time.monotonic() - self._t0, 3),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "cpus_usable": _cpus_usable(),
            # the 1, 5 and 15-minute load averages before and after: a run at load 5 on 2 CPUs is not a quiet one
            "load_average": {"start": self.load_start, "end": _load()},
            "tokenwire_version": installed_version(),
            "git_commit": self.git_commit,
            "python": sys.version.split()[0],
            "libraries": _library_versions(),
        }


def run_provenance(started: RunProvenance | None = None) -> dict[str, Any]:
    """The provenance block for a result document; ``started`` where the measurement began earlier (else the load
    at start is the load now)."""
    return (started or RunProvenance()).finish()
