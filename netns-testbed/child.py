"""Child processes speaking JSON lines on stdout: wait for their events with deadlines, never by sleeping."""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from typing import IO, Any


class ChildError(RuntimeError):
    """A child process failed, exited early or did not answer in time."""


class LineReader:
    """Reads lines from a pipe with a deadline.

    Reads the file descriptor directly: a buffered file object may already hold the next line while
    ``select()`` on its descriptor waits for bytes that never come.
    """

    def __init__(self, stream: IO[Any]) -> None:
        self.fd = stream.fileno()
        self._buf = b""

    def readline(self, deadline: float) -> str | None:
        """The next line (without newline); None at EOF; TimeoutError at the deadline."""
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
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

    def __init__(self, proc: subprocess.Popen, name: str, stderr_path: str | None = None) -> None:
        self.proc = proc
        self.name = name
        self.stderr_path = stderr_path
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
                line = self._lines.readline(deadline)
            except TimeoutError:
                raise ChildError(f"{self.name}: no answer before the deadline") from None
            if line is None:
                err = self.stderr_tail()
                raise ChildError(f"{self.name} exited (status {self.proc.wait()}){err}")
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue  # stray output from a library
            if "error" in ev:
                raise ChildError(f"{self.name}: {ev['error']}")
            return ev

    def wait_for(self, key: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            ev = self.event(deadline)
            if key in ev:
                return ev

    def stderr_tail(self) -> str:
        if self.stderr_path is None:
            return ""
        try:
            with open(self.stderr_path, errors="replace") as fh:
                text = fh.read()
        except OSError:
            return ""
        tail = text.strip().splitlines()[-8:]
        return (":\n  " + "\n  ".join(tail)) if tail else ""
