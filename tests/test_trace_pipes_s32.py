"""A trace given as a pipe (``--down-trace <(zcat trace.gz)``, a FIFO): read once per process, and handed to the
processes that open it again (the emulator, kv's worker processes) as a regular copy removed with the run.

Every command used to parse its traces several times (each config's ``validate``, the path's checks, the run),
and the second read of the pipe found it exhausted: "/dev/fd/63: empty trace", or a wait on a FIFO's reopening.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
from collections.abc import Iterator

import pytest

from tokenwire.daemon.cli import main
from tokenwire.testbed import trace as trace_mod
from tokenwire.testbed.trace import load_trace, trace_from_spec

TRACE = b"".join(b"%d\n" % k for k in range(1, 2001))  # 12 Mbit/s for 2 s, then repeating


@contextlib.contextmanager
def fifo_fed_once(path: str, data: bytes = TRACE) -> Iterator[list[int]]:
    """A FIFO at ``path`` whose first reader gets ``data``; every later reader gets the end of the file at once (as
    ``<(zcat ...)`` gives nothing more), so code that reads it twice fails at once instead of waiting. Yields the
    list of the opens seen (one per reader)."""
    os.mkfifo(path)
    opens: list[int] = []
    stop = threading.Event()

    def no_reader() -> bool:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # ENXIO: nobody has it open to read
            return True
        return False

    def feed() -> None:
        while True:
            fd = os.open(path, os.O_WRONLY)  # (waits for a reader)
            try:
                if stop.is_set():
                    return
                opens.append(fd)
                if len(opens) == 1:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            while not no_reader() and not stop.wait(0.01):  # that reader done first: the next open is another's
                pass

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        yield opens
    finally:
        stop.set()
        unblock = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # (lets the feeder's pending open return)
        try:
            feeder.join(10)
        finally:
            os.close(unblock)
        assert not feeder.is_alive()


def piped(data: bytes = TRACE) -> tuple[str, int]:
    """An anonymous pipe holding ``data``, its write end closed, named as bash names ``<(...)``: ``/dev/fd/N``."""
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    return f"/dev/fd/{r}", r


def test_a_pipe_is_read_once_per_process_and_known_by_its_inode():
    name, fd = piped()
    try:
        first = load_trace(name)
        assert len(first) == 2000
        assert trace_from_spec(name) is first  # read again, the pipe gave "empty trace"
        assert load_trace(f"/proc/self/fd/{fd}") is first  # another name of the same pipe: the same parse
        from tokenwire.testbed.trace import read_once  # (after the asserts that do without it)

        assert read_once(name) and not read_once("12mbps")
    finally:
        os.close(fd)


def test_the_cache_bound_holds_for_regular_files_and_never_drops_a_pipe(tmp_path):
    """A pipe dropped from the bound could not be read again: `collect-many` with five piped traces lost the first
    ("empty trace"; a FIFO's second read waited for a writer forever)."""
    fds = []
    try:
        for k in range(trace_mod._CACHE_ENTRIES + 2):
            name, fd = piped(b"%d\n" % (k + 1))
            fds.append(fd)
            assert list(load_trace(name).stamps_ms) == [k + 1]
        for k in range(trace_mod._CACHE_ENTRIES + 2):  # regular files after them push none out
            (tmp_path / f"r{k}").write_text(f"{k + 10}\n")
            assert list(load_trace(str(tmp_path / f"r{k}")).stamps_ms) == [k + 10]
        assert sum(key[0] != "pipe" for key in trace_mod._cache) == trace_mod._CACHE_ENTRIES
        for k in range(len(fds)):  # every pipe is still there (read again, a pipe is empty)
            assert list(load_trace(f"/dev/fd/{fds[k]}").stamps_ms) == [k + 1]
    finally:
        for fd in fds:
            os.close(fd)


def test_a_fifo_is_opened_once_however_often_it_is_loaded(tmp_path):
    fifo = str(tmp_path / "t.fifo")
    with fifo_fed_once(fifo) as opens:
        stamps = [load_trace(fifo).stamps_ms for _ in range(3)]
        assert len(opens) == 1
    assert stamps[0] == stamps[2] and len(stamps[0]) == 2000


def test_the_copy_for_another_process_is_a_regular_file_of_the_same_stamps(tmp_path):
    from tokenwire.testbed.trace import child_readable

    name, fd = piped()
    try:
        copy = child_readable(name, str(tmp_path))
        assert copy.startswith(str(tmp_path)) and stat.S_ISREG(os.stat(copy).st_mode)
        assert os.path.basename(copy) == os.path.basename(name)
        assert load_trace(copy).stamps_ms == load_trace(name).stamps_ms
        assert child_readable(name, str(tmp_path)) == copy  # down and up the same pipe: one copy
        regular = tmp_path / "plain.trace"
        regular.write_bytes(TRACE)
        assert child_readable(str(regular), str(tmp_path)) == str(regular)
        assert child_readable("12mbps", str(tmp_path)) == "12mbps"
    finally:
        os.close(fd)


def test_swiftqueue_virtual_takes_a_fifo(tmp_path, capsys):
    fifo = str(tmp_path / "down.fifo")
    out = tmp_path / "sq.json"
    with fifo_fed_once(fifo) as opens:
        rc = main(["testbed", "swiftqueue", "--virtual", "--seconds", "2", "--policies", "l4s", "--down-trace", fifo,
                   "--json", str(out)])
        assert rc == 0, capsys.readouterr().err
        assert len(opens) == 1
    assert json.loads(out.read_text())["config"]["down_trace"] == fifo  # the user's name, in the results


def test_kv_virtual_takes_a_fifo_and_its_workers_get_a_copy_removed_after(tmp_path, private_tmp, monkeypatch, capsys):
    """The parent reads the FIFO once; the worker processes (spawned: they open the trace again) get a regular
    copy in a folder of the run's, gone once the run is."""
    from tokenwire.testbed import kv_vsim

    real = kv_vsim.run_kv_virtual

    def synthetic(cfg, **kw):  # a small synthetic context: no tokenizer, no engine
        cfg.synthetic = (8, 4, 64)
        cfg.recompute_us_per_token = 50_000
        return real(cfg, **kw)

    monkeypatch.setattr(kv_vsim, "run_kv_virtual", synthetic)
    fifo = str(tmp_path / "down.fifo")
    out = tmp_path / "kv.json"
    with fifo_fed_once(fifo) as opens:
        rc = main(["testbed", "kv", "--virtual", "--down-trace", fifo, "--delay-ms", "10", "--context-tokens", "512",
                   "--chunk-tokens", "128", "--deadline-ms", "8000", "--controllers", "fixed-L1,fixed-L3",
                   "--repeats", "1", "--workers", "2", "--json", str(out)])
        assert rc == 0, capsys.readouterr().err
        assert len(opens) == 1
    summary = json.loads(out.read_text())
    assert summary["config"]["down_trace"] == fifo and summary["config"]["up_trace"] == fifo
    assert all(len(rows) == 1 for rows in summary["fetches"].values())
    assert list(private_tmp.iterdir()) == []


def root_only(test):
    """Run as root only (network namespaces, TUN), as the other namespace tests (``test_testbed_root.py``)."""
    for mark in (pytest.mark.root,
                 pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
                 pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no TUN device")):
        test = mark(test)
    return test


@root_only
def test_compare_takes_a_fifo_down_trace(tmp_path, private_tmp, monkeypatch, capsys):
    """The emulator of each scheme's testbed opens its traces again: it gets a copy, removed with the run."""
    fifo = str(tmp_path / "down.fifo")
    out = tmp_path / "cmp.json"
    with fifo_fed_once(fifo) as opens:
        rc = main(["testbed", "compare", "--tokens", "10", "--schemes", "stream,chatterbox", "--down-trace", fifo,
                   "--json", str(out)])
        assert rc == 0, capsys.readouterr().err
        assert len(opens) == 1
    summary = json.loads(out.read_text())
    assert summary["config"]["down_trace"] == fifo and summary["config"]["up_trace"] == fifo
    assert {d["tokens_rendered"] for d in summary["schemes"].values()} == {10}
    assert list(private_tmp.iterdir()) == []


@root_only
def test_the_emulator_reads_a_copy_named_in_no_state_and_removed_on_an_interrupt(tmp_path, private_tmp, monkeypatch):
    from tokenwire.testbed.emulator import DirectionConfig, EmulatorConfig
    from tokenwire.testbed.netns import STATE_DIR
    from tokenwire.testbed.topology import Testbed

    name, fd = piped()
    try:
        cfg = EmulatorConfig(down=DirectionConfig(name, 10.0), up=DirectionConfig("12mbps", 10.0))
        with pytest.raises(KeyboardInterrupt), Testbed(cfg, backend="userspace") as tb:
            (copies,) = private_tmp.iterdir()  # the emulator is up: it read its copy
            (copy,) = [p for p in copies.rglob("*") if p.is_file()]
            assert load_trace(str(copy)).stamps_ms == load_trace(name).stamps_ms
            with open(os.path.join(STATE_DIR, f"{tb.run_id}.json")) as fh:
                state = json.load(fh)
            assert state["info"]["config"]["down"]["trace"] == name  # the user's name
            assert state["info"]["scratch"] == str(copies)  # removed by `testbed down` after a crash
            assert tb.stats()["down"]["delivered_packets"] == 0
            raise KeyboardInterrupt  # Ctrl-C, or SIGTERM made one
        assert list(private_tmp.iterdir()) == []
    finally:
        os.close(fd)


@root_only
def test_up_detach_takes_a_fifo_and_shows_its_name(tmp_path, private_tmp, monkeypatch, capsys):
    """The background child of ``up --detach`` opens its traces again: it gets a copy, gone once it is up."""
    fifo = str(tmp_path / "down.fifo")
    run_id = None
    try:
        with fifo_fed_once(fifo) as opens:
            rc = main(["testbed", "up", "--detach", "--json", "--down-trace", fifo, "--delay-ms", "5"])
            out, err = capsys.readouterr()
            assert rc == 0, err
            assert len(opens) == 1
        info = json.loads(out)
        run_id = info["run_id"]
        assert info["config"]["down"]["trace"] == fifo and info["config"]["up"]["trace"] == fifo
        assert list(private_tmp.iterdir()) == []  # the child's emulator has read its copy: removed
    finally:
        if run_id is not None:
            assert main(["testbed", "down", run_id]) == 0


def test_a_pipe_read_on_a_descriptor_past_1023_works(tmp_path):
    """select() refuses descriptors from 1024 on ("filedescriptor out of range in select()", a ValueError and a
    traceback): a process holding many files (a daemon, a harness) could not read a piped trace."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        if hard != resource.RLIM_INFINITY and hard < 1200:
            pytest.skip("the descriptor limit is below 1200")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    fillers = []
    try:
        while len(fillers) < 1100:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        name, fd = piped(b"3\n7\n")
        try:
            assert fd >= 1024 and list(load_trace(name).stamps_ms) == [3, 7]
        finally:
            os.close(fd)
    finally:
        for f in fillers:
            os.close(f)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_trace_named_through_a_descriptor_is_copied_for_another_process(tmp_path):
    """`up --detach --down-trace /dev/stdin < f.trace`: in the child, /dev/stdin was its own (/dev/null), an empty
    trace. A name of this process's descriptor gets a copy, however regular the file behind it."""
    import subprocess
    import sys

    trace = tmp_path / "f.trace"
    trace.write_text("4\n9\n")
    probe = ("import sys; from tokenwire.testbed.trace import child_readable, load_trace, read_once; "
             "c = child_readable('/dev/stdin', sys.argv[1]); "
             "print(read_once('/dev/stdin'), c != '/dev/stdin', list(load_trace(c).stamps_ms))")
    with open(trace) as stdin:
        out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "copies")], stdin=stdin,
                             capture_output=True, text=True, timeout=60)
    assert out.stdout.split(None, 2) == ["True", "True", "[4, 9]\n"], out.stderr
    from tokenwire.testbed.trace import read_once

    assert not read_once(str(trace))  # (the file by its own name: any process reads it)
