"""Blocking waits that a stop signal cannot slip past. CPython runs a signal's Python handler only between
bytecodes: a SIGTERM landing just before a blocking call (the window is microseconds) is handled only once that call
returns. Each test delivers the signal to another thread of this process, so the blocked call is never interrupted
(the state the race leaves), and checks that the wait comes back to the interpreter on its own."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


class Delivered(Exception):
    pass


@contextmanager
def signal_to_another_thread(after_s: float = 0.5) -> Iterator[None]:
    """SIGUSR1 raising :class:`Delivered`, sent ``after_s`` into the block to a helper thread (never to the main
    thread, whose blocking call it would interrupt)."""

    def handler(signum: int, frame: object) -> None:
        raise Delivered

    def poke() -> None:
        time.sleep(after_s)
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)

    old = signal.signal(signal.SIGUSR1, handler)
    poker = threading.Thread(target=poke, daemon=True)
    try:
        poker.start()
        yield
    finally:
        poker.join(10)
        signal.signal(signal.SIGUSR1, old)


def test_a_childs_line_wait_returns_to_the_interpreter_while_the_child_is_silent():
    """`bench emulator` waited for its silent sender's line in one select() of the whole phase (30 s + slack)."""
    from tokenwire.testbed.child import LineReader

    r, w = os.pipe()
    reader = os.fdopen(r, "rb", buffering=0)
    release, gave_up = threading.Event(), threading.Event()

    def child() -> None:  # silent; after 10 s it gives up and writes a line (the blocked select then returns)
        if not release.wait(10):
            gave_up.set()
            os.write(w, b"late\n")

    writer = threading.Thread(target=child, daemon=True)
    writer.start()
    try:
        with signal_to_another_thread(), pytest.raises(Delivered):
            LineReader(reader).readline(time.monotonic() + 60)
        assert not gave_up.is_set()  # handled while the child was silent, not once its line came
    finally:
        release.set()
        writer.join(10)
        reader.close()
        os.close(w)
