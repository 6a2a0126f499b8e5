"""Child processes speaking JSON lines on stdout: wait for their events with deadlines, never by sleeping."""

from __future__ import annotations

import json
import select
import subprocess
import time
from typing import Any


class ChildError(RuntimeError):
    """A child process failed, exited early or did not answer in time."""


class Child:
    """A child process speaking JSON lines on stdout; waits on its events with deadlines."""

    def __init__(self, proc: subprocess.Popen, name: str, stderr_path: str | None = None) -> None:
        self.proc = proc
        self.name = name
        self.stderr_path = stderr_path

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise ChildError(f"{self.name} exited early (status {self.proc.poll()})") from None

    def event(self, deadline: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildError(f"{self.name}: no answer before the deadline")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 1.0))
            if not ready:
                continue
            line = self.proc.stdout.readline()
            if not line:
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
