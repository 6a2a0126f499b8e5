"""Resources a test leaves to the garbage collector: ``--leak-check`` (tests/conftest.py) fails the test that left
them, and the thread-loop helper the chat tests share closes its loop and sockets.

An event loop run by a fixture's thread was stopped by ``loop.stop`` queued right behind ``server.close``, and never
closed: the loop, its self-pipe (a Unix stream socket pair) and, when both callbacks ran in one loop turn, the
server's UDP transport on 127.0.0.1 waited for the collector, which one CI run hit inside the
``simplefilter("error")`` of tests/test_testbed_guards.py: five ResourceWarnings in a test that had none."""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

from tokenwire.transport.server import serve

from .test_chat_cli import closed, stop_loop_thread
from .test_loopback import word_source

LEAKY = '''
import asyncio
import socket

import pytest


def test_clean():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))


def test_drops_an_open_socket():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    del s  # freed at once: its ResourceWarning comes in the call, which the default filters ignore


def test_leaves_a_socket_in_a_cycle():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder = [s]
    holder.append(holder)  # only the garbage collector frees it, after the test


@pytest.fixture(scope="module")
def loop():
    yield asyncio.new_event_loop()  # never closed


def test_a_fixtures_loop_ends_with_the_module(loop):
    assert not loop.is_closed()
'''


def _pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """pytest on LEAKY, with this suite's conftest, in a process of its own. Without the hypothesis and anyio
    plugins, which LEAKY does not use: imported under tracemalloc, and walked by --leak-check's collection after
    each test, they made each run cost 12-13 s of CPU instead of 3 s."""
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_leaky.py").write_text(LEAKY)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                           "-p", "no:hypothesispytest", "-p", "no:anyio", "-rA", *args, "test_leaky.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONTRACEMALLOC": "5"})


def test_leak_check_fails_the_test_that_left_a_resource_open(tmp_path):
    proc = _pytest(tmp_path, "--leak-check")
    out = proc.stdout
    assert proc.returncode == 1 and "1 failed, 3 passed, 2 errors" in out, out
    assert "PASSED test_leaky.py::test_clean" in out and "ERROR test_leaky.py::test_clean" not in out, out
    sections = dict(part.split(" ___", 1) for part in out.split("___ ")[1:] if " ___" in part)
    call = sections["test_drops_an_open_socket"]
    assert "--leak-check: 1 object(s) left unclosed by this test (call)" in call, out
    assert "unclosed <socket.socket" in call and "family=1, type=1" in call, out
    cycle = sections["ERROR at teardown of test_leaves_a_socket_in_a_cycle"]
    assert "left unclosed by this test or a fixture whose scope ended with it (teardown)" in cycle, out
    assert "unclosed <socket.socket" in cycle and "family=2, type=2" in cycle, out
    assert "traceback (tracemalloc)" in cycle and 'socket.socket(socket.AF_INET, socket.SOCK_DGRAM)' in cycle, out
    fixture = sections["ERROR at teardown of test_a_fixtures_loop_ends_with_the_module"]
    assert "unclosed event loop" in fixture, out


def test_without_leak_check_the_same_tests_pass(tmp_path):
    proc = _pytest(tmp_path)
    assert proc.returncode == 0 and "4 passed" in proc.stdout, proc.stdout


def test_stop_loop_thread_leaves_nothing_to_the_collector():
    """The pattern it replaced (``call_soon_threadsafe(server.close)`` then ``(loop.stop)``, no ``loop.close``)
    left an unclosed event loop, and often the server's UDP transport, for the collector."""
    gc.collect()  # (what earlier tests left is not this test's)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(serve(word_source, host="127.0.0.1", port=0), loop).result(30)
    transport = server._quic_server._transport
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        stop_loop_thread(loop, thread, functools.partial(closed, server))
        assert loop.is_closed() and not thread.is_alive()
        assert transport.get_extra_info("socket").fileno() == -1  # its UDP socket closed, not just "closing"
        del server, transport, loop, thread
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]
