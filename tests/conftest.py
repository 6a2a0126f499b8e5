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
