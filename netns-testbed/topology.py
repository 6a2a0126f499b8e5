"""The two-namespace testbed: server and client namespaces joined by the link emulator.

::

    ns <id>-srv                                                   ns <id>-cli
    app --> <id>-s (TUN, 10.213.a.b+1/30) ==fd==> emulator ==fd==> <id>-c (TUN, 10.213.a.b+2/30) --> app
                                          <==== up link <====

Use it as a context manager; everything it created is removed on exit, on Ctrl-C and on errors, and is
listed in a state file first so ``tokenwire testbed down`` can clean up after a crash::

    with Testbed(EmulatorConfig(...)) as tb:
        proc = tb.popen(tb.server_ns, [...])          # a process inside the server namespace
        sock = tb.socket(tb.client_ns)                # a socket inside the client namespace
        tb.origin()                                   # restart trace and loss clocks (aligned runs)
        print(tb.stats())

Where the kernel has ``netem`` and ``dualpi2`` the path could use them instead (see :mod:`.kernel`); the
probe decides and :attr:`Testbed.backend` says which one ran.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from .child import LineReader, last_error_line
from .emulator import DirectionConfig, EmulatorConfig
from .netns import (
    NamespaceExists,
    RunState,
    TestbedError,
    check_root,
    configure_interface,
    create_netns,
    destroy_run,
    new_run_id,
    open_tun,
    popen_in_netns,
    signals_deferred,
    socket_in_netns,
    start_time,
)
from .trace import COPIES_PREFIX, child_readable, read_once

ADDRESS_POOL = ipaddress.IPv4Network("10.213.0.0/16")
EMULATOR_READY_CAP_S = 120.0
"""How long the emulator may take to answer ready while its process lives. It parses its traces first, which
takes seconds for a trace of tens of millions of lines (about 0.2 s per million here); an emulator that exits
is reported at once."""


def unavailable_reason() -> str | None:
    """None when this host can run the namespace testbed, else why not (for ``make demo`` to fall back)."""
    try:
        check_root()
        import pyroute2  # type: ignore[import-untyped]  # noqa: F401
    except (TestbedError, ImportError) as exc:
        return str(exc)
    return None


def link_subnet(run_id: str) -> ipaddress.IPv4Network:
    """The private /30 of this run's link, picked from 10.213.0.0/16 by run id (used only in its netns)."""
    index = int(run_id[2:], 16) % (ADDRESS_POOL.num_addresses // 4)
    return ipaddress.IPv4Network(f"{ADDRESS_POOL.network_address + 4 * index}/30")


class Testbed:
    """Server and client namespaces with the userspace link emulator between them (see module docstring)."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, config: EmulatorConfig | None = None, *, run_id: str | None = None,
                 backend: str = "auto", ready_timeout: float | None = None, scratch: str | None = None,
                 emulator_stderr: str | None = None) -> None:
        if backend not in ("auto", "userspace", "kernel"):
            raise ValueError(f"backend must be auto, userspace or kernel, not {backend!r}")
        self.prefer_backend = backend
        self.config = config or EmulatorConfig()
        self.run_id = run_id or new_run_id()
        self.server_ns = f"{self.run_id}-srv"
        self.client_ns = f"{self.run_id}-cli"
        net = link_subnet(self.run_id)
        hosts = list(net.hosts())
        self.server_addr = str(hosts[0])
        self.client_addr = str(hosts[1])
        self.prefixlen = net.prefixlen
        self.backend = "userspace"
        self.backend_reason = ""
        # the overall cap on the emulator's start (it is waited for only while it lives)
        self.ready_timeout = EMULATOR_READY_CAP_S if ready_timeout is None else ready_timeout
        self.emulator: subprocess.Popen | None = None
        self.final_stats: dict[str, Any] | None = None
        self._state: RunState | None = None
        self._children: list[subprocess.Popen] = []
        self._pid = os.getpid()
        self._emu_lines: LineReader | None = None
        # the caller's temporary folder (logs, results): listed in the run's state so that `testbed down`
        # removes it after a crash (SIGKILL) that left the caller no chance to
        self.scratch = scratch
        # a file for the emulator's stderr: its traceback went to the terminal, ahead of an error line without
        # the cause ("emulator exited (status 1)"); the error now ends with its last line (emulator_failure)
        self.emulator_stderr = emulator_stderr
        # regular copies of traces read from pipes, for the emulator (a pipe's content is read once): a folder of
        # this testbed's, removed by down() (and, after a crash, with the scratch folder the state names)
        self._trace_copies: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def __enter__(self) -> Testbed:
        try:
            self.up()
        except BaseException:
            _down_once_more(self.down)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        _down_once_more(self.down)

    def up(self) -> None:
        check_root()
        self.config.down.validate()
        self.config.up.validate()
        if any(d.trace is not None and read_once(d.trace) for d in (self.config.down, self.config.up)):
            self._trace_copies = tempfile.mkdtemp(prefix=COPIES_PREFIX, dir=self.scratch)
        names = [self.server_ns, self.client_ns, f"{self.run_id}-rtr", f"{self.run_id}-probe"]
        state = RunState(self.run_id, os.getpid(), names)
        state.info = {"server_addr": self.server_addr, "client_addr": self.client_addr,
                      "config": json.loads(self.config.to_json())}  # (the user's trace names, not the copies)
        if self.scratch is not None or self._trace_copies is not None:
            state.info["scratch"] = self.scratch or self._trace_copies  # (the copies lie in the caller's scratch)
        state.claim()  # before creating anything: a crash from here on leaves a trail for `testbed down`
        self._state = state
        try:
            self._build(state)
        except NamespaceExists as exc:  # made by someone else meanwhile: the teardown leaves it alone
            state.disown(exc.name)
            raise

    def _build(self, state: RunState) -> None:
        from .kernel import build_kernel_path, choose_backend

        try:
            self.backend, self.backend_reason = choose_backend(self.config, self.run_id, self.prefer_backend)
        except NamespaceExists:  # (its name tells up() which namespace is not ours)
            raise
        except RuntimeError as exc:
            raise TestbedError(str(exc)) from None
        state.backend = self.backend
        if self.backend == "kernel":  # pragma: no cover - needs a kernel with netem and dualpi2
            net = link_subnet(self.run_id)
            nxt = net.network_address + 4
            nxt = nxt if nxt in ADDRESS_POOL else ADDRESS_POOL.network_address
            second = ipaddress.ip_network(f"{nxt}/30")
            info = build_kernel_path(self.run_id, self.config, [net, second])
            self.server_addr, self.client_addr = info["server_addr"], info["client_addr"]
            state.info.update(server_addr=self.server_addr, client_addr=self.client_addr)
            state.save()
            return
        fds: list[int] = []
        try:
            create_netns(self.server_ns)
            create_netns(self.client_ns)
            fd_srv = open_tun(self.server_ns, f"{self.run_id}-s")
            fds.append(fd_srv)
            fd_cli = open_tun(self.client_ns, f"{self.run_id}-c")
            fds.append(fd_cli)
            configure_interface(self.server_ns, f"{self.run_id}-s", self.server_addr, self.prefixlen)
            configure_interface(self.client_ns, f"{self.run_id}-c", self.client_addr, self.prefixlen)
            self._start_emulator(fd_srv, fd_cli)
        finally:
            for fd in fds:  # the emulator holds its own copies; the devices live as long as it does
                os.close(fd)
        state.emulator_pid = self.emulator.pid if self.emulator else None
        state.emulator_start = start_time(state.emulator_pid)
        state.save()

    def _emulator_argv(self, fd_srv: int, fd_cli: int) -> list[str]:
        return [sys.executable, "-m", "tokenwire.testbed.emulator", self._emulator_config().to_json(), str(fd_srv),
                str(fd_cli)]

    def _emulator_config(self) -> EmulatorConfig:
        """The config the emulator process gets: a trace read from a pipe (``<(zcat trace.gz)``, a FIFO) is
        given as a regular copy of this process's parse, as the emulator opens the path again and the pipe,
        read by the path's checks, has nothing left (it failed with "empty trace", or waited on a FIFO)."""
        folder = self._trace_copies
        if folder is None:
            return self.config

        def readable(d: DirectionConfig) -> DirectionConfig:
            return d if d.trace is None else replace(d, trace=child_readable(d.trace, folder))

        return replace(self.config, down=readable(self.config.down), up=readable(self.config.up))

    def _start_emulator(self, fd_srv: int, fd_cli: int) -> None:
        with open(self.emulator_stderr, "ab") if self.emulator_stderr else contextlib.nullcontext() as err:
            self.emulator = subprocess.Popen(
                self._emulator_argv(fd_srv, fd_cli), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                pass_fds=(fd_srv, fd_cli), start_new_session=True, text=True, bufsize=1,
            )  # fmt: skip
        assert self.emulator.stdout is not None
        self._emu_lines = LineReader(self.emulator.stdout)
        if self._state is not None:  # recorded while it loads its traces: `testbed down` and `up --detach` see it
            self._state.emulator_pid = self.emulator.pid
            self._state.emulator_start = start_time(self.emulator.pid)
            self._state.save()
        # No fixed deadline: a large trace takes the emulator a while to parse. Its exit ends the wait at once
        # (end of its stdout); the cap only bounds an emulator that hangs.
        reply = self._read_reply(self.ready_timeout)
        if not reply.get("ready"):
            raise TestbedError(f"emulator did not start: {reply}")

    def _read_reply(self, timeout: float) -> dict[str, Any]:
        proc = self.emulator
        if proc is None or self._emu_lines is None:
            raise TestbedError("emulator is not running")
        try:
            line = self._emu_lines.readline(time.monotonic() + timeout)
        except TimeoutError:
            raise TestbedError(f"emulator gave no answer within {timeout:.1f} s") from None
        if line is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)  # its stdout closed as it exited: the status follows at once
            raise TestbedError(f"emulator exited (status {proc.poll()}){self.emulator_failure()}")
        return json.loads(line)

    def emulator_failure(self) -> str:
        """``": <its last error line>"`` from the emulator's stderr file (``emulator_stderr``), or ""."""
        if self.emulator_stderr is None:
            return ""
        try:
            with open(self.emulator_stderr, errors="replace") as fh:
                line = last_error_line(fh.read())
        except OSError:
            return ""
        return f": {line}" if line else ""

    def command(self, cmd: str, timeout: float = 5.0) -> dict[str, Any]:
        """Send one control command to the emulator and return its JSON answer."""
        if self.emulator is None or self.emulator.stdin is None:
            raise TestbedError("emulator is not running")
        try:
            self.emulator.stdin.write(cmd + "\n")
            self.emulator.stdin.flush()
        except BrokenPipeError:
            raise TestbedError(f"emulator exited (status {self.emulator.poll()})") from None
        return self._read_reply(timeout)

    def origin(self, offset_s: float = 0.0) -> float:
        """Restart the traces and loss clocks now (``offset_s`` into the traces); returns the trace origin on
        the monotonic clock (``now - offset_s``)."""
        if self.emulator is None and self.backend == "kernel":  # pragma: no cover - kernel qdiscs run freely
            return time.monotonic()
        return float(self.command(f"origin {offset_s:.6f}" if offset_s else "origin")["origin"])

    def stats(self) -> dict[str, Any]:
        if self.emulator is None and self.backend == "kernel":  # pragma: no cover
            return {"backend": "kernel"}
        return self.command("stats")

    def down(self) -> None:
        """Stop children and the emulator, remove the namespaces and the state file. Safe to call twice.

        Does nothing in a forked copy of the owner (pyroute2 forks helpers; a signal unwinding one of them
        must not tear down the owner's testbed).
        """
        if os.getpid() != self._pid:
            return
        # Ctrl-C/SIGTERM wait until the teardown is done: one that landed here after a normal finish (compare
        # and swiftqueue build a testbed per scheme) raised half-way and left the namespaces and state behind
        with signals_deferred():
            _every_step(self._stop_children, self._stop_emulator, self._destroy, self._remove_trace_copies)

    def _stop_children(self) -> None:
        _stop_processes(self._children)

    def _stop_emulator(self) -> None:
        emu = self.emulator
        if emu is not None:
            if emu.poll() is None and emu.stdin is not None:
                with contextlib.suppress(OSError, ValueError):
                    emu.stdin.write("stop\n")
                    emu.stdin.flush()
                with contextlib.suppress(TestbedError, ValueError, json.JSONDecodeError, OSError):
                    self.final_stats = self._read_reply(3.0)
            with contextlib.suppress(subprocess.TimeoutExpired):
                emu.wait(timeout=3)
            if emu.poll() is None:
                emu.send_signal(signal.SIGKILL)
                emu.wait()
            for stream in (emu.stdin, emu.stdout):
                with contextlib.suppress(OSError, ValueError):
                    if stream is not None:
                        stream.close()
            self.emulator = None

    def _destroy(self) -> None:
        if self._state is not None:
            destroy_run(self._state)
            self._state = None  # only once it went: a failed removal is retried, or left to `testbed down`

    def _remove_trace_copies(self) -> None:
        if self._trace_copies is not None:
            shutil.rmtree(self._trace_copies, ignore_errors=True)
            self._trace_copies = None

    # -- using it --------------------------------------------------------------------------------------------
    def popen(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start a process in one of this testbed's namespaces; it is killed when the testbed goes down."""
        if ns not in (self.server_ns, self.client_ns):
            raise TestbedError(f"{ns} is not a namespace of this testbed")
        proc = popen_in_netns(ns, argv, **kwargs)
        self._children.append(proc)
        return proc

    def socket(self, ns: str, family: int = socket.AF_INET, type_: int = socket.SOCK_DGRAM) -> socket.socket:
        """A socket living in one of this testbed's namespaces, owned by the calling process."""
        if ns not in (self.server_ns, self.client_ns):
            raise TestbedError(f"{ns} is not a namespace of this testbed")
        return socket_in_netns(ns, family, type_)

    def describe(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "backend": self.backend,
            "backend_reason": self.backend_reason,
            "server_ns": self.server_ns,
            "client_ns": self.client_ns,
            "server_addr": self.server_addr,
            "client_addr": self.client_addr,
            "emulator_pid": self.emulator.pid if self.emulator else None,
        }


def _stop_processes(children: list[subprocess.Popen]) -> None:
    """Kill and reap a testbed's children (each one, whatever another one does), then close our ends of their
    pipes: the list forgets them, and each run leaked its children's stdin/stdout/stderr descriptors (a
    ResourceWarning apiece) until the garbage collector found them."""
    for proc in children:
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)
        finally:  # a child that outlived the wait too (killed, not yet reaped): nobody reads its pipes any more
            _close_pipes(proc)
    children.clear()


def _close_pipes(proc: subprocess.Popen) -> None:
    """Close whichever of ``proc``'s stdin/stdout/stderr are our pipes; a flush into a dead child's stdin
    (BrokenPipeError) or an already closed one does not stop the others. (getattr: a Popen-like child without
    the attributes, as the teardown tests' stand-ins, has no pipes to close.)"""
    for name in ("stdin", "stdout", "stderr"):
        stream = getattr(proc, name, None)
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.close()


def _every_step(*steps: Callable[[], None]) -> None:
    """Run every teardown step even when one fails, then raise the first failure (the others noted on it):
    a step that raised skipped the namespaces' removal, which came last."""
    first: BaseException | None = None
    for step in steps:
        try:
            step()
        except BaseException as exc:
            if first is None:
                first = exc
            else:
                first.add_note(f"the teardown step {step.__name__} failed too: {exc!r}")
    if first is not None:
        raise first


def _down_once_more(down: Callable[[], None]) -> None:
    """``down()``, and once more if it raised: a signal that landed before it held the signals, or a step that
    failed (a removal the kernel refused for a moment), left what the retry now removes. The first error is
    what the caller sees; what is still left after the retry stays in the state file for ``testbed down``."""
    try:
        down()
    except BaseException:
        with contextlib.suppress(Exception):  # (an interrupt now is held by down(): nothing to suppress there)
            down()
        raise


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.01) -> None:
    """Poll ``predicate()`` until true; raise :class:`TestbedError` naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TestbedError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


class DirectLink:
    """Baseline: the same two namespaces joined by a plain veth pair (no emulator), same interface as
    :class:`Testbed` for what benchmarks and tests use (names, addresses, :meth:`popen`, :meth:`socket`)."""

    backend = "veth"

    def __init__(self, *, run_id: str | None = None) -> None:
        self.run_id = run_id or new_run_id()
        self.server_ns = f"{self.run_id}-srv"
        self.client_ns = f"{self.run_id}-cli"
        hosts = list(link_subnet(self.run_id).hosts())
        self.server_addr, self.client_addr = str(hosts[0]), str(hosts[1])
        self._state: RunState | None = None
        self._children: list[subprocess.Popen] = []
        self._pid = os.getpid()

    def __enter__(self) -> DirectLink:
        from pyroute2 import IPRoute

        check_root()
        state = RunState(self.run_id, os.getpid(), [self.server_ns, self.client_ns], backend="veth")
        state.claim()  # refuses a run id in use before touching anything (see Testbed.up)
        self._state = state
        try:
            create_netns(self.server_ns)
            create_netns(self.client_ns)
            a, b = f"{self.run_id}-a", f"{self.run_id}-b"
            with IPRoute(netns=self.server_ns, flags=0) as ipr:
                ipr.link("add", ifname=a, kind="veth", peer={"ifname": b, "net_ns_fd": self.client_ns})
            configure_interface(self.server_ns, a, self.server_addr, 30)
            configure_interface(self.client_ns, b, self.client_addr, 30)
        except BaseException as exc:
            if isinstance(exc, NamespaceExists):  # made by someone else meanwhile: not ours to remove
                state.disown(exc.name)
            _down_once_more(self.down)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        _down_once_more(self.down)

    def down(self) -> None:
        """Kill the children, remove the namespaces and the state file (as :meth:`Testbed.down`: signals held
        meanwhile, every step run)."""
        if os.getpid() != self._pid:  # a forked helper unwinding (see Testbed.down)
            return
        with signals_deferred():
            _every_step(self._stop_children, self._destroy)

    def _stop_children(self) -> None:
        _stop_processes(self._children)

    def _destroy(self) -> None:
        if self._state is not None:
            destroy_run(self._state)
            self._state = None

    popen = Testbed.popen
    socket = Testbed.socket
