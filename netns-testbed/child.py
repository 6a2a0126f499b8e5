"""Child processes speaking JSON lines on stdout: wait for their events with deadlines, never by sleeping."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import IO, Any


class ChildError(RuntimeError):
    """A child process failed, exited early or did not answer in time."""


WAIT_SLICE_S = 0.25
"""Longest single wait for a child's line. Python runs a signal's handler only between bytecodes: a SIGTERM landing
just before one select() of a whole phase (a sender silent until its phase ends: ``bench emulator``) was handled
only when that select returned, up to the phase's length plus slack later."""


class ExitWatch:
    """Another process whose exit ends a :class:`Child`'s waits at once, with that process's own error.

    ``testbed compare`` waited on the client's events only: when the link emulator died mid-run, the client
    noticed at its 60-s QUIC idle timeout and the error blamed the client ("no packet from the server").
    Watched through a pidfd (readable when the process exits) so the wait ends the moment it happens.
    """

    POLL_S = 0.5
    """How often the process is polled instead where ``pidfd_open`` is missing (not Linux >= 5.3)."""

    def __init__(self, proc: subprocess.Popen, failure: Callable[[int], ChildError]) -> None:
        self.proc = proc
        self.failure = failure  # the error to raise, from the exit status
        self.fd: int | None = None
        if proc.poll() is None:  # (a reaped process's pid may belong to another one by now)
            with contextlib.suppress(AttributeError, OSError):  # ESRCH: gone meanwhile; check() says so
                self.fd = os.pidfd_open(proc.pid)

    def check(self) -> None:
        """Raise the watched process's error if it has exited."""
        status = self.proc.poll()
        if status is not None:
            raise self.failure(status)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def exit_status(status: int) -> str:
    """``status 1``, or ``status -9: killed by SIGKILL`` for a process a signal ended."""
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"status {status}: killed by {signal.Signals(-status).name}"
    return f"status {status}"


_BOX = re.compile(r"^[\s|+-]*(?:\d+|\.\.\.)?[\s|+-]*$")  # an exception group's frames: "+---- 1 ----", "+----"
_QUALIFIED = re.compile(r"^(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*(?::|$))")  # "tokenwire.transport.errors."


def last_error_line(text: str) -> str:
    """The line of a child's stderr that says why it failed: the last one, which for a Python traceback is the
    exception (its class without the module path, as the children's own one-line errors name it). The whole
    stderr went into the error before: eight lines of traceback, escaped onto one line by the CLI."""
    for raw in reversed(text.splitlines()):
        line = raw.strip().lstrip("| ")  # inside an exception group's traceback: "| ValueError: x"
        if line and not _BOX.match(line):
            return _QUALIFIED.sub("", line) if "Traceback (most recent call last)" in text else line
    return ""


class LineReader:
    """Reads lines from a pipe with a deadline.

    Reads the file descriptor directly: a buffered file object may already hold the next line while
    ``select()`` on its descriptor waits for bytes that never come.
    """

    def __init__(self, stream: IO[Any]) -> None:
        self.fd = stream.fileno()
        self._buf = b""

    def readline(self, deadline: float, watches: Sequence[ExitWatch] = ()) -> str | None:
        """The next line (without newline); None at EOF; TimeoutError at the deadline; a watched process's
        error (:class:`ExitWatch`) as soon as it exits."""
        while b"\n" not in self._buf:
            for watch in watches:
                watch.check()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            poller = select.poll()  # (not select(): it refuses descriptors from 1024 on, a ValueError)
            for fd in (self.fd, *(w.fd for w in watches if w.fd is not None)):
                poller.register(fd, select.POLLIN)
            if any(w.fd is None for w in watches):
                left = min(left, ExitWatch.POLL_S)
            ready = {fd for fd, _ in poller.poll(min(left, WAIT_SLICE_S) * 1000)}
            if self.fd not in ready:
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                if self._buf:
                    line, self._buf = self._buf, b""
                    return line.decode(errors="replace")
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode(errors="replace")


class Child:
    """A child process speaking JSON lines on stdout; waits on its events with deadlines."""

    def __init__(self, proc: subprocess.Popen, name: str, stderr_path: str | None = None,
                 watches: Sequence[ExitWatch] = (), *, stderr_kept: bool = False) -> None:
        self.proc = proc
        self.name = name
        self.stderr_path = stderr_path
        self.watches = watches  # processes whose exit ends every wait on this child (the link emulator)
        self.stderr_kept = stderr_kept  # stderr_path outlives the run (--keep): the error names it
        assert proc.stdout is not None
        self._lines = LineReader(proc.stdout)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise ChildError(f"{self.name} exited early (status {self.proc.poll()})") from None

    def event(self, deadline: float) -> dict[str, Any]:
        while True:
            try:
                line = self._lines.readline(deadline, self.watches)
            except TimeoutError:
                raise ChildError(f"{self.name}: no answer before the deadline") from None
            if line is None:
                self._check_watches()
                err = self.stderr_tail()
                raise ChildError(f"{self.name} exited ({exit_status(self.proc.wait())}){err}")
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue  # stray output from a library
            if "error" in ev:
                self._check_watches()
                raise ChildError(f"{self.name}: {ev['error']}")
            return ev

    def _check_watches(self) -> None:
        """A child failing as a watched process exits failed because of it (the path went): name the cause."""
        for watch in self.watches:
            watch.check()

    def wait_for(self, key: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            ev = self.event(deadline)
            if key in ev:
                return ev

    def stderr_tail(self) -> str:
        """``": <the error's line>"`` from the child's stderr, naming the file when it is kept (the whole
        traceback is there); "" without one."""
        if self.stderr_path is None:
            return ""
        try:
            with open(self.stderr_path, errors="replace") as fh:
                text = fh.read()
        except OSError:
            return ""
        line = last_error_line(text)
        if not line:
            return ""
        return f": {line}" + (f" (its stderr: {self.stderr_path})" if self.stderr_kept else "")
