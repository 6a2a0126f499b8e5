"""Test-wide fixtures."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import tracemalloc
import warnings
from collections.abc import Generator, Iterator

import pytest

# Threads that wait by spinning, on the 2 shared cores the suite runs on, where a pool's other thread is often not
# running: set before anything imports numpy or torch (pytest imports this file first), and inherited by the
# subprocesses the tests start. Unless the caller chose otherwise:
# - torch's OpenMP threads wait passively: spinning, one scoring pass of SmolLM2 (tests/test_kv_codec_model.py)
#   cost 4-7 s of CPU and 10-26 s of wall time under load, against 0.9 s and 2 s passive, with the same 2 threads;
# - numpy's OpenBLAS uses one thread: the AR fit's thousands of small solves (``predictor train --kinds ar``,
#   ``fit_ar``) spent 8-14 s of CPU on a 316-point fit with a thread per core, against 1.8 s with one.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# hypothesis' profiles (tests/fuzzing.py): the default, or `fuzz` for `make fuzz`; registered here, before the
# hypothesis plugin reads --hypothesis-profile. (Not found where this file runs alone, copied: hypothesis not
# imported at all there, see tests/test_leak_check_fixes2.py.)
try:
    from tests.fuzzing import load_profile_from_env
except ModuleNotFoundError:
    pass
else:
    load_profile_from_env()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every hypothesis test is marked ``fuzz``, as the property tests written for ``make fuzz`` are: ``-m fuzz``
    selects them all, those to come included."""
    if "hypothesis" not in sys.modules:  # (no test module imported it: none is a hypothesis test)
        return
    from hypothesis import is_hypothesis_test

    for item in items:
        if isinstance(item, pytest.Function) and is_hypothesis_test(item.obj):
            item.add_marker(pytest.mark.fuzz)


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


_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@pytest.fixture(autouse=True)
def _signals_given_back() -> Iterator[None]:
    """A test must leave SIGINT, SIGTERM and SIGHUP as it found them. The daemon run in-process left them bound to
    its closed uvloop loop, and a later test's os.kill(SIGINT) was dropped: that test passed without the Ctrl-C it
    was about (after a 10-s wait). The handlers are put back, and the test that changed them fails, naming them."""
    before = {sig: signal.getsignal(sig) for sig in _HANDLED_SIGNALS}
    yield
    changed = [sig.name for sig in _HANDLED_SIGNALS if signal.getsignal(sig) != before[sig]]
    for sig, handler in before.items():
        if handler is not None:
            signal.signal(sig, handler)
    assert not changed, f"the test left the handlers of {', '.join(changed)} changed"


@pytest.fixture(autouse=True)
def _fresh_decode_rates() -> Iterator[None]:
    """The KV client's decode rate is the process's (``kv_client.process_decode_rate``): each test starts without
    the figures an earlier test's decodes left, so the server plans its fetches as a fresh process's."""
    module = sys.modules.get("tokenwire.transport.kv_client")
    if module is not None:
        module._DECODE_RATES.clear()
    yield


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """The system temporary directory as an empty folder of this test's own (other runs use the real one): what a
    command leaves in it is the test's to see."""
    import tempfile

    tmp = tmp_path / "systmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


@pytest.fixture(scope="session")
def small(tmp_path_factory):
    """A 3-s predictor dataset with a few hundred prediction points (the predictor CLI tests'). One for the session:
    the 4 modules using it only read it (``--data``, ``--check-data``, ``read_bytes``), and were collecting the same
    run (same trace, seed, options: the same bytes) one each."""
    from tokenwire.daemon.cli import main

    f = tmp_path_factory.mktemp("small") / "d.npz"
    assert main(["predictor", "collect", "--down-trace", "6mbps", "--seconds", "3", "--probe-pps", "150",
                 "--cross", "reno:on=1,off=1+cbr-l:rate=120%,on=0.3,off=0.7", "--out", str(f)]) == 0
    return f


# ------------------------------------------------------------------------------------------------- --leak-check
# A socket, transport or event loop a test leaves open in a reference cycle is closed only by the garbage
# collector, whenever it runs: its ResourceWarning then came out in another test, or nowhere (the default filters
# ignore them). One run printed five in tests/test_testbed_guards.py, whose `simplefilter("error")` made them
# unraisable exceptions, for an event loop and a UDP socket another file's fixture had left. A full collection after
# every test costs 0.1-0.25 s once torch and numba are in the heap (the KV tests: 108 s instead of 51 s), far too
# much for every run (a collection per module instead misses, depending on when the collector ran by itself): hence
# an option, for CI now and then and for hunting a leak.
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--leak-check", action="store_true",
        help="fail a test that leaves a socket, transport, event loop or file unclosed (a ResourceWarning, which "
             "the default filters ignore) in its setup, call or teardown, or for the garbage collector (a full "
             "collection after each teardown: a module's fixtures end with its last test); with tracemalloc "
             "(PYTHONTRACEMALLOC=20) each comes with where it was allocated; slow: up to twice the time")


def pytest_collection_finish(session: pytest.Session) -> None:
    """What collection left (imports) is collected before the first test: it is no test's."""
    if session.config.getoption("leak_check"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


def _leaks_of(caught: list[warnings.WarningMessage]) -> list[str]:
    """A line for each ResourceWarning in ``caught`` (and where its object was allocated, under tracemalloc); the
    other warnings are warned again, as they came, for pytest's own record."""
    leaks = []
    for w in caught:
        if not issubclass(w.category, ResourceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
            continue
        # (tracemalloc's traceback of the object: where it was allocated, or, for one freed outright rather than by
        # the collector, where that happened: the record of the warning revives it, and tracemalloc traces it anew)
        where = tracemalloc.get_object_traceback(w.source) if w.source is not None else None
        leaks.append(str(w.message) + ("" if where is None else
                                       "\n    traceback (tracemalloc):\n      " + "\n      ".join(where.format())))
    return leaks


def _leak_checked(item: pytest.Item, phase: str) -> Generator[None, object, object]:
    """One phase of ``item`` under --leak-check: its ResourceWarnings recorded ("always": an "error" filter made
    them unraisable exceptions), after the teardown a full garbage collection too; any fails the phase."""
    if not item.config.getoption("leak_check"):
        return (yield)
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as record:
            assert record is not None
            caught = record
            warnings.simplefilter("always", ResourceWarning)
            result = yield
            if phase == "teardown":
                # the fixtures' values, finalized: pytest lets go of them only after this hook, and a module
                # fixture's event loop then went unchecked
                if isinstance(item, pytest.Function):
                    item.funcargs = {}
                gc.collect()
    finally:
        leaks = _leaks_of(caught)
    if leaks:
        whose = "this test" if phase != "teardown" else "this test or a fixture whose scope ended with it"
        pytest.fail(f"--leak-check: {len(leaks)} object(s) left unclosed by {whose} ({phase}):\n" + "\n".join(leaks),
                    pytrace=False)
    return result


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _leak_checked(item, "setup"))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _leak_checked(item, "call"))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    return (yield from _leak_checked(item, "teardown"))


@pytest.fixture
def no_automatic_collection() -> Iterator[None]:
    """Python's own collections off: what is freed here is freed by refcounting alone (the tests of what an
    ended connection leaves for the collector)."""
    gc.collect()  # (what earlier tests left is not this test's)
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
