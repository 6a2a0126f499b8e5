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
def signal_to_another_thread(after_s: float = 0.5, ready: threading.Event | None = None) -> Iterator[None]:
    """SIGUSR1 raising :class:`Delivered`, sent to a helper thread (never to the main thread, whose blocking call
    it would interrupt) ``after_s`` into the block, or after ``ready`` is set when given."""

    def handler(signum: int, frame: object) -> None:
        raise Delivered

    def poke() -> None:
        if ready is not None:
            ready.wait(30)
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


def test_kv_virtual_waits_for_its_workers_in_slices(monkeypatch):
    """`testbed kv --virtual` waited for its next controller in one futex wait: a SIGTERM landing just before it
    was handled when that controller finished (32 s into a 15-repeat run), the workers computing on meanwhile."""
    from concurrent.futures import Future

    from tokenwire.testbed import kv_vsim
    from tokenwire.testbed.kv_eval import KVEvalConfig

    futures: list[Future] = []
    finished, submitted = threading.Event(), threading.Event()

    class Pool:  # workers that never finish by themselves
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def __enter__(self) -> Pool:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def submit(self, *args: object) -> Future:
            futures.append(Future())
            submitted.set()  # (the wait for them comes next)
            return futures[-1]

    def give_up() -> None:  # after 10 s the workers "finish" (the blocked wait then returns)
        if not finished.wait(10):
            gave_up.set()
            for f in futures:
                f.set_result([])

    gave_up = threading.Event()
    monkeypatch.setattr(kv_vsim, "ProcessPoolExecutor", Pool)
    cfg = KVEvalConfig(down_trace="8mbps", up_trace="8mbps", delay_ms=10, context_tokens=512, chunk_tokens=128,
                       deadline_ms=8000, controllers=["tokenwire", "fixed-L1"], repeats=2,
                       recompute_us_per_token=50_000, synthetic=(8, 4, 64))
    ender = threading.Thread(target=give_up, daemon=True)
    try:
        with signal_to_another_thread(ready=submitted), pytest.raises(Delivered):
            ender.start()
            kv_vsim.run_kv_virtual(cfg, workers=2)
        assert futures and not gave_up.is_set()  # handled while the workers ran, not once they were done
    finally:
        finished.set()
        ender.join(10)


def test_a_fifo_trace_without_a_writer_yet_is_waited_for_in_slices(tmp_path):
    """open() of a FIFO waits for a writer: a SIGTERM landing just before it was never handled while none came
    (`testbed up --down-trace FIFO`, `predictor collect`: 10 runs of 10 hung)."""
    from tokenwire.testbed.trace import load_trace

    fifo = tmp_path / "t.fifo"
    os.mkfifo(fifo)
    done, gave_up = threading.Event(), threading.Event()

    def writer() -> None:  # none for 10 s; then one comes and goes (a blocked open returns, at the end of file)
        if not done.wait(10):
            gave_up.set()
            os.close(os.open(fifo, os.O_WRONLY))

    late = threading.Thread(target=writer, daemon=True)
    late.start()
    try:
        with signal_to_another_thread(), pytest.raises(Delivered):
            load_trace(str(fifo))
        assert not gave_up.is_set()  # handled while no writer had come
    finally:
        done.set()
        late.join(15)
    # and a writer that comes later is still waited for: its trace is read whole
    fed = threading.Thread(target=lambda: (time.sleep(0.5), (tmp_path / "t.fifo").write_text("1\n2\n")))
    fed.start()
    assert list(load_trace(str(fifo)).stamps_ms) == [1, 2]
    fed.join(10)


def test_a_childs_line_is_read_on_a_descriptor_past_1023():
    """select() refuses descriptors from 1024 on ("filedescriptor out of range in select()", a traceback): a
    harness holding many files could not wait on a child."""
    import resource

    from tokenwire.testbed.child import LineReader

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        if hard != resource.RLIM_INFINITY and hard < 1200:
            pytest.skip("the descriptor limit is below 1200")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        r, w = os.pipe()
        os.write(w, b"ready\n")
        os.close(w)
        with os.fdopen(r, "rb", buffering=0) as reader:
            assert r >= 1024 and LineReader(reader).readline(time.monotonic() + 10) == "ready"
    finally:
        for f in fillers:
            os.close(f)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
