"""Test-wide fixtures."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _no_stale_log_handlers() -> Iterator[None]:
    """A daemon run in-process (``setup_logging``) points the root logger at the ``sys.stderr`` of its test, which
    pytest closes afterwards: every later log line printed "--- Logging error ---" with a traceback into
    whichever test's stderr was being read. Plain stream handlers a test left on the root go when it ends, and
    the root's level is put back."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler and handler not in before:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 3-s predictor dataset with a few hundred prediction points (the predictor CLI tests')."""
    from tokenwire.daemon.cli import main

    f = tmp_path_factory.mktemp("small") / "d.npz"
    assert main(["predictor", "collect", "--down-trace", "6mbps", "--seconds", "3", "--probe-pps", "150",
                 "--cross", "reno:on=1,off=1+cbr-l:rate=120%,on=0.3,off=0.7", "--out", str(f)]) == 0
    return f
