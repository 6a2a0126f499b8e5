"""Network-namespace plumbing: names, TUN devices inside namespaces, processes and sockets in them, cleanup.

Everything a run creates carries its run id (``tw`` + 6 hex digits) in its name and is listed in a state
file under ``/run/tokenwire-testbed/`` *before* it is created, so ``tokenwire testbed down`` can remove the
leftovers of a crashed run and never touches anything it did not create.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeGuard

NETNS_DIR = "/run/netns"
TUN_DEVICE = "/dev/net/tun"
# not under /run/tokenwire: that is the systemd unit's RuntimeDirectory, which systemd removes when the service stops,
# and with it the state a crashed run's `testbed down` needs
STATE_DIR = os.environ.get("TOKENWIRE_TESTBED_STATE", "/run/tokenwire-testbed")
RUN_ID_RE = re.compile(r"^tw[0-9a-f]{6}$")

CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


class TestbedError(RuntimeError):
    """The testbed could not be built or used (not root, no TUN, a netlink error...)."""

    __test__ = False  # not a pytest test class, despite the name


class NamespaceExists(TestbedError):
    """A namespace to be created exists already: not this run's, so its teardown must leave it alone."""

    def __init__(self, name: str) -> None:
        super().__init__(f"namespace {name} already exists")
        self.name = name


def new_run_id() -> str:
    """A fresh run id: ``tw`` + 6 random hex digits (short enough for 15-character interface names)."""
    return "tw" + secrets.token_hex(3)


PROC_STATUS = "/proc/self/status"
# the capabilities the testbed uses: CAP_SYS_ADMIN mounts /run/netns and enters namespaces (setns), CAP_NET_ADMIN
# makes TUN devices and configures links and qdiscs (linux/capability.h)
NEEDED_CAPABILITIES = {"CAP_SYS_ADMIN": 21, "CAP_NET_ADMIN": 12}


def missing_capabilities(status_path: str | None = None) -> list[str]:
    """The capabilities of :data:`NEEDED_CAPABILITIES` that this process lacks (``CapEff`` of
    ``/proc/self/status``); none when that cannot be read (then the first namespace operation reports it)."""
    try:
        with open(status_path or PROC_STATUS) as fh:
            line = next((ln for ln in fh if ln.startswith("CapEff:")), None)
        if line is None:
            return []
        effective = int(line.split(":", 1)[1].strip(), 16)
    except (OSError, ValueError):
        return []
    return [name for name, bit in NEEDED_CAPABILITIES.items() if not (effective >> bit) & 1]


def check_root() -> None:
    """Refuse, with one line that says why, a process that cannot build namespaces.

    Root alone is not enough: root in a default Docker container lacks CAP_SYS_ADMIN, and every namespace
    command ended in pyroute2's traceback ("PermissionError: mount rundir failed"), while ``tokenwire demo``
    crashed instead of falling back to its loopback relay (:func:`topology.unavailable_reason`).
    """
    if os.geteuid() != 0:
        raise TestbedError("the namespace testbed needs root (network namespaces, TUN devices)")
    missing = missing_capabilities()
    if missing:
        raise TestbedError(
            f"the namespace testbed needs {' and '.join(NEEDED_CAPABILITIES)} (network namespaces, TUN devices); "
            f"this root process lacks {' and '.join(missing)} (in a container: start it with --privileged)"
        )
    if not os.path.exists(TUN_DEVICE):
        raise TestbedError(f"{TUN_DEVICE} is missing: the kernel has no TUN support")


_libc: ctypes.CDLL | None = None


def _get_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return _libc


def netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def netns_exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


# the signals that unwind a run (testbed.cli.sigterm_as_ctrl_c), SIGALRM being its retry timer
_UNWIND_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGALRM)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold the unwinding signals' Python handlers until the block is done, then deliver each once.

    At the Python level, not with ``pthread_sigmask``: a mask holds only the calling thread, and a
    process-directed SIGTERM then lands on another one (numpy's OpenBLAS threads, say), whose C handler
    still has the main thread raise at once. Python runs every handler in the main thread, so swapping them
    holds whatever threads exist. Elsewhere than the main thread nothing is deferred (nothing can be).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = {}
    try:  # installed inside the try: a signal not yet held, arriving meanwhile, still restores the others
        for sig in _UNWIND_SIGNALS:
            handler = signal.getsignal(sig)
            if handler is None or handler == signal.SIG_IGN:  # not ours to restore, or ignored: left alone
                continue
            old[sig] = handler
            signal.signal(sig, lambda signum, frame: caught.append(signum))
        yield
    finally:
        for sig, handler in old.items():  # every handler back before any signal is delivered
            signal.signal(sig, handler)
        _raise_each(list(dict.fromkeys(caught)))


def _raise_each(signums: list[int]) -> None:
    """Deliver each held signal, in order, even when one's handler raises (a SIGINT's KeyboardInterrupt left a
    SIGTERM caught after it undelivered: the process went on and exited 0)."""
    if signums:
        try:
            signal.raise_signal(signums[0])
        finally:
            _raise_each(signums[1:])


def create_netns(name: str) -> None:
    """Create namespace ``name``; a Ctrl-C or SIGTERM meanwhile takes effect once it exists.

    pyroute2 creates it in a forked child and waits for it. Interrupted while waiting, the run was torn down
    before the child had made the namespace, and the child made it afterwards: a namespace nobody removes
    (the SIGTERM teardown test of ``bench emulator`` caught it now and then). The creation takes
    milliseconds, so the signals wait for it.
    """
    from pyroute2 import netns as pr_netns  # type: ignore[import-untyped]  # no stubs, no py.typed

    if netns_exists(name):
        raise NamespaceExists(name)
    with signals_deferred():
        try:
            pr_netns.create(name)
        except PermissionError as exc:  # capabilities present, yet refused (an AppArmor or seccomp profile)
            raise TestbedError(f"cannot create network namespace {name}: {exc.strerror or exc} (the namespace "
                               "testbed needs root with CAP_SYS_ADMIN and CAP_NET_ADMIN, and may mount "
                               "/run/netns)") from None


def remove_netns(name: str) -> None:
    from pyroute2 import netns as pr_netns

    if netns_exists(name):
        pr_netns.remove(name)


def _setns_fd(fd: int) -> None:
    if _get_libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def in_netns(name: str):
    """Run the body of the ``with`` with this thread inside namespace ``name`` (pyroute2 pushns/popns)."""
    from pyroute2 import netns as pr_netns

    if not netns_exists(name):
        raise TestbedError(f"namespace {name} does not exist")
    pr_netns.pushns(name)
    try:
        yield
    finally:
        pr_netns.popns()


def _write_sysctl(path: str, value: str) -> None:
    with contextlib.suppress(OSError), open(path, "w") as fh:
        fh.write(value)


def open_tun(ns: str, ifname: str) -> int:
    """Create TUN device ``ifname`` inside ``ns`` and return its non-blocking fd (bare IP, no PI header).

    IPv6 is switched off in the namespace first so the device does not emit router solicitations; the
    testbed carries IPv4 only.
    """
    with in_netns(ns):
        for which in ("all", "default"):
            _write_sysctl(f"/proc/sys/net/ipv6/conf/{which}/disable_ipv6", "1")
        try:
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:  # a container's device cgroup refuses it (EPERM): one line, not a traceback
            raise TestbedError(f"{TUN_DEVICE}: cannot open it to create TUN device {ifname}: {exc.strerror or exc} "
                               "(in a container: give it the device, e.g. --device /dev/net/tun)") from None
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), IFF_TUN | IFF_NO_PI))
        except OSError as exc:  # not a TUN device (ENOTTY), or the kernel refused the device (EPERM, EBUSY)
            os.close(fd)
            raise TestbedError(f"{TUN_DEVICE}: cannot create TUN device {ifname}: {exc.strerror or exc}") from None
    return fd


def configure_interface(ns: str, ifname: str, address: str, prefixlen: int, *, mtu: int = 1500) -> None:
    """Bring ``lo`` and ``ifname`` up in ``ns`` and give ``ifname`` its address (the /30 route follows)."""
    from pyroute2 import IPRoute

    with IPRoute(netns=ns, flags=0) as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise TestbedError(f"interface {ifname} not found in {ns}")
        ipr.link("set", index=idx[0], mtu=mtu, state="up")
        ipr.addr("add", index=idx[0], address=address, prefixlen=prefixlen)


def preexec_in_netns(ns: str) -> Callable[[], None]:
    """A ``preexec_fn`` that moves the child into ``ns`` and kills it when its parent dies."""
    path = netns_path(ns)

    def enter() -> None:
        libc = _get_libc()
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        fd = os.open(path, os.O_RDONLY)
        try:
            _setns_fd(fd)
        finally:
            os.close(fd)

    return enter


def popen_in_netns(ns: str, argv: Sequence[str], **kwargs: object) -> subprocess.Popen:
    """Start ``argv`` inside namespace ``ns`` (its own session, so the terminal's Ctrl-C reaches only us)."""
    kwargs.setdefault("start_new_session", True)
    return subprocess.Popen(list(argv), preexec_fn=preexec_in_netns(ns), **kwargs)  # type: ignore[call-overload]


def socket_in_netns(ns: str, family: int = socket.AF_INET, type_: int = socket.SOCK_DGRAM) -> socket.socket:
    """A socket that lives in ``ns`` although this process does not (pyroute2 ``create_socket``)."""
    from pyroute2 import netns as pr_netns

    return pr_netns.create_socket(ns, family, type_)


def pids_in_netns(ns: str) -> list[int]:
    """Processes whose network namespace is ``ns`` (by inode), excluding this process."""
    try:
        target = os.stat(netns_path(ns)).st_ino
    except FileNotFoundError:
        return []
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino == target:
                out.append(int(entry))
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    return out


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child counts as dead
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_time(pid: int | None) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22), None if gone."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def same_process(pid: int | None, started: int | None) -> bool:
    """True when ``pid`` is alive and is the process that started at ``started`` (not a reused pid)."""
    return pid_alive(pid) and (started is None or start_time(pid) == started)


def terminate_pids(pids: Sequence[int], timeout: float = 3.0) -> None:
    """SIGTERM the given processes, SIGKILL those still alive after ``timeout`` (by pid only)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [p for p in alive if pid_alive(p)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# -- run state -----------------------------------------------------------------------------------------------
@dataclass
class RunState:
    """What one run created (written before creating it)."""

    run_id: str
    owner_pid: int
    namespaces: list[str] = field(default_factory=list)
    emulator_pid: int | None = None
    owner_start: int | None = None
    emulator_start: int | None = None
    backend: str = "userspace"
    created: float = field(default_factory=time.time)
    info: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.owner_start is None:
            self.owner_start = start_time(self.owner_pid)

    @property
    def owner_alive(self) -> bool:
        return same_process(self.owner_pid, self.owner_start)

    @property
    def emulator_alive(self) -> bool:
        return same_process(self.emulator_pid, self.emulator_start)

    @property
    def path(self) -> str:
        return os.path.join(STATE_DIR, self.run_id + ".json")

    def save(self) -> None:
        os.makedirs(STATE_DIR, exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(self.__dict__, fh, indent=1)
        os.replace(tmp, self.path)

    def claim(self) -> None:
        """Save the state for the first time, refusing a run id in use (its state file or any ``<id>-*``
        namespace exists) before anything is touched: a start under a live run's id failed, and its teardown
        removed that run's namespaces and state."""
        names = os.listdir(NETNS_DIR) if os.path.isdir(NETNS_DIR) else []
        taken = sorted(n for n in names if n.startswith(self.run_id + "-"))
        in_use = f"run id {self.run_id} is in use: %s exists (see `tokenwire testbed status`)"
        if taken or os.path.exists(self.path):
            raise TestbedError(in_use % (f"namespace {taken[0]}" if taken else "its state file"))
        os.makedirs(STATE_DIR, exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump(self.__dict__, fh, indent=1)
        try:
            os.link(tmp, self.path)  # whole at once, and never over the state of a start that claimed it meanwhile
        except FileExistsError:
            raise TestbedError(in_use % "its state file") from None
        finally:
            os.unlink(tmp)

    def disown(self, name: str) -> None:
        """Forget namespace ``name``: it exists, but this run did not create it (see :class:`NamespaceExists`)."""
        if name in self.namespaces:
            self.namespaces.remove(name)
            self.save()

    def delete(self) -> None:
        for path in (self.path, os.path.join(STATE_DIR, self.run_id + ".log")):  # .log: a detached `up`
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    @classmethod
    def load(cls, path: str) -> RunState:
        """The run of state file ``path``; ValueError or TypeError for one that is not a whole state file of this
        version (:func:`list_runs` salvages those).

        A pid the file names without a recorded start time is never taken for a live process: ``__post_init__``
        filled the missing ``owner_start`` with whatever process held the pid now, so a hand-made or older file
        naming pid 1 had ``testbed down ID`` SIGTERM it, and an ``emulator_pid`` without ``emulator_start`` was
        signalled even by a plain ``down``. The pids' types are checked here for the same reason: a string pid
        passed ``load`` and ended ``status`` in a TypeError traceback."""
        with open(path) as fh:
            data = json.load(fh)
        if not isinstance(data, dict) or not RUN_ID_RE.match(str(data.get("run_id", ""))):
            raise ValueError(f"{path}: not a testbed state file")
        names = data.get("namespaces", [])
        valid = {
            "owner_pid": _uint(data.get("owner_pid")),  # (a negative pid names a process group to os.kill)
            "emulator_pid": data.get("emulator_pid") is None or _uint(data["emulator_pid"]),
            "namespaces": isinstance(names, list) and all(isinstance(ns, str) for ns in names),
            "info": isinstance(data.get("info", {}), dict),
        }
        wrong = [f"{key} {data.get(key)!r}" for key, ok in valid.items() if not ok]
        if wrong:
            raise ValueError(f"{path}: {', '.join(wrong)}: not a testbed state file's")
        for pid_key, start_key in (("owner_pid", "owner_start"), ("emulator_pid", "emulator_start")):
            if data.get(pid_key) and not _uint(data.get(start_key)):
                data[start_key] = UNPROVEN_START
        return cls(**data)


def list_runs() -> list[RunState]:
    """State files of every run on this host (crashed ones included), in the one form every caller (``testbed
    status``, ``testbed down``) judges them by. A state file that cannot be read is listed by :func:`read_run` as
    far as it still tells: skipped, it hid its namespaces from ``status`` and ``down``; listed with owner pid 0,
    ``status`` called a live run CRASHED while ``down``, which salvaged the owner itself, left it alone."""
    if not os.path.isdir(STATE_DIR):
        return []
    out = []
    for name in sorted(os.listdir(STATE_DIR)):
        run_id = name.removesuffix(".json")
        if run_id != name and RUN_ID_RE.match(run_id):  # (a file of no run's name tells no namespaces to go by)
            out.append(read_run(os.path.join(STATE_DIR, name), run_id))
    return out


ENDED_KEEP = 10
"""How many ``<run id>.ended`` records (how a detached run ended) the state folder keeps: the newest."""
ENDED_REASON_MAX = 300  # characters of the reason a record keeps


@dataclass
class EndedRun:
    """How a detached ``up`` ended on its own (its emulator died, say): its teardown removes its state and its log,
    so without this record ``testbed status`` said "no testbed runs" and the reason was lost."""

    run_id: str
    ended: float | None  # (None: a record that cannot be read)
    reason: str

    @staticmethod
    def path_of(run_id: str) -> str:
        return os.path.join(STATE_DIR, run_id + ".ended")


def record_ended(run_id: str, reason: str) -> None:
    """Write run ``run_id``'s ``.ended`` record (one line of ``reason``, cut to :data:`ENDED_REASON_MAX`), then
    drop all but the newest :data:`ENDED_KEEP`: a host whose detached runs keep failing must not fill the folder."""
    if not RUN_ID_RE.match(run_id):
        raise ValueError(f"{run_id!r}: not a run id")
    os.makedirs(STATE_DIR, exist_ok=True)
    line = " ".join(reason.split())
    if len(line) > ENDED_REASON_MAX:
        line = line[:ENDED_REASON_MAX - 3] + "..."
    path = EndedRun.path_of(run_id)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"run_id": run_id, "ended": time.time(), "reason": line}, fh)
    os.replace(tmp, path)
    # (never the record just written: a tie in file times, or a clock stepped back, sorted it among the oldest)
    older = [r for r in ended_runs() if r.run_id != run_id]
    for old in older[:max(0, len(older) - (ENDED_KEEP - 1))]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(EndedRun.path_of(old.run_id))


def ended_runs() -> list[EndedRun]:
    """The ``.ended`` records in the state folder, oldest first (by file time: an unreadable one still counts)."""
    if not os.path.isdir(STATE_DIR):
        return []
    found: list[tuple[float, EndedRun]] = []
    for name in os.listdir(STATE_DIR):
        run_id = name.removesuffix(".ended")
        if run_id == name or not RUN_ID_RE.match(run_id):
            continue
        path = os.path.join(STATE_DIR, name)
        mtime = 0.0
        try:
            mtime = os.stat(path).st_mtime
            with open(path, errors="replace") as fh:
                data = json.load(fh)
            ended, reason = data["ended"], data["reason"]
            if not isinstance(ended, (int, float)) or not isinstance(reason, str):
                raise TypeError("wrong types")
            record = EndedRun(run_id, float(ended), reason[:ENDED_REASON_MAX])
        except FileNotFoundError:
            continue  # removed meanwhile
        except (OSError, ValueError, TypeError, KeyError):
            record = EndedRun(run_id, None, "its record cannot be read")
        found.append((mtime, record))
    return [record for _, record in sorted(found, key=lambda item: (item[0], item[1].run_id))]


def forget_ended(run_ids: Sequence[str] | None = None) -> list[str]:
    """Remove the ``.ended`` records of ``run_ids`` (None: all of them); returns the run ids whose record went."""
    gone = []
    for record in ended_runs():
        if run_ids is None or record.run_id in run_ids:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(EndedRun.path_of(record.run_id))
                gone.append(record.run_id)
    return gone


def read_run(path: str, run_id: str) -> RunState:
    """Run ``run_id``'s state from its file ``path``: loaded, or, when it cannot be (cut short, keys or types of
    another version), salvaged as a crashed run with ``info["unreadable_state"]`` saying why: its namespaces found
    by its id, the scratch folder the file still names (:func:`remove_scratch` removes only one of ours), and its
    owner only when the file still names a pid and a start time that match a live process (a bare pid may since
    belong to anybody: it is never signalled)."""
    try:
        state = RunState.load(path)
    except (ValueError, OSError, TypeError) as exc:  # JSONDecodeError is a ValueError
        return _salvaged(run_id, f"{exc.__class__.__name__}: {exc}", _state_fields(path))
    if state.run_id != run_id:  # another run's state under this name: its namespaces, owner and folder are not ours
        return _salvaged(run_id, f"ValueError: {path}: the state of run {state.run_id}", {})
    return state


def _salvaged(run_id: str, why: str, fields: dict[str, object]) -> RunState:
    names = os.listdir(NETNS_DIR) if os.path.isdir(NETNS_DIR) else []
    out = RunState(run_id=run_id, owner_pid=0, namespaces=sorted(n for n in names if n.startswith(run_id + "-")),
                   created=0.0, info={"unreadable_state": why})
    pid, started = fields.get("owner_pid"), fields.get("owner_start")
    if _uint(pid) and pid > 0 and _uint(started) and same_process(pid, started):
        out.owner_pid, out.owner_start = pid, started
    scratch = fields.get("scratch")
    if isinstance(scratch, str):
        out.info["scratch"] = scratch
    return out


UNPROVEN_START = -1
"""The start time given a pid that a state file names without its own: no process has it (``/proc/PID/stat``'s
field is unsigned), so :func:`same_process` never takes that pid for the run's."""


def _uint(value: object) -> TypeGuard[int]:
    """A pid or a start time as :func:`start_time` reads one: an int >= 0; not a bool (``true`` in JSON), and not
    None, which :func:`same_process` takes for "any process with this pid"."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_FIELD_RE = re.compile(r'"(owner_pid|owner_start|scratch)"\s*:\s*(-?\d+|"(?:[^"\\]|\\.)*")')


def _state_fields(path: str) -> dict[str, object]:
    """``owner_pid``, ``owner_start`` and ``info.scratch`` of a state file that :meth:`RunState.load` refused:
    from its JSON if it parses, else from whatever of them a truncated file still holds whole."""
    try:
        with open(path, errors="replace") as fh:
            text = fh.read(1 << 20)  # a state file is a few kB
    except OSError:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        info = data.get("info")
        return {"owner_pid": data.get("owner_pid"), "owner_start": data.get("owner_start"),
                "scratch": info.get("scratch") if isinstance(info, dict) else None}
    out: dict[str, object] = {}
    for m in _FIELD_RE.finditer(text):
        with contextlib.suppress(ValueError):
            out.setdefault(m.group(1), json.loads(m.group(2)))
    return out


SCRATCH_PREFIXES = ("tw-", "tokenwire-")  # the temporary folders the testbed's commands make


@contextlib.contextmanager
def run_folder(keep: str | None, prefix: str) -> Iterator[tuple[str, str | None]]:
    """A command's working folder and the scratch folder to record in its run's state: ``keep`` (``--keep``,
    created if missing, never recorded, so never removed), else a fresh temporary folder named ``prefix...``,
    recorded so that ``testbed down`` removes it after a crash (:func:`remove_scratch`)."""
    if keep:
        os.makedirs(keep, exist_ok=True)
        yield keep, None
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as wd:
        yield wd, wd


def remove_scratch(state: RunState) -> str | None:
    """Remove a crashed run's temporary folder (``info["scratch"]``), if it is one of ours: directly in the
    system's temporary directory and named like the folders the testbed's commands make. Never a ``--keep``
    folder (those are not recorded). Returns what was removed."""
    path = state.info.get("scratch")
    if not isinstance(path, str) or not os.path.isdir(path) or os.path.islink(path):
        return None
    real = os.path.realpath(path)
    if (os.path.dirname(real) != os.path.realpath(tempfile.gettempdir())
            or not os.path.basename(real).startswith(SCRATCH_PREFIXES)):
        return None
    shutil.rmtree(real, ignore_errors=True)
    return f"folder {real}"


def destroy_run(state: RunState) -> list[str]:
    """Remove everything ``state`` lists: processes inside its namespaces, the emulator, the namespaces.

    Only names that carry the run id are touched. Returns what was removed, for the user.
    """
    removed: list[str] = []
    ours = [ns for ns in state.namespaces if ns.startswith(state.run_id + "-")]
    pids = [p for ns in ours for p in pids_in_netns(ns)]
    if state.emulator_pid and state.emulator_pid != os.getpid() and state.emulator_alive:
        pids.append(state.emulator_pid)
    if pids:
        terminate_pids(sorted(set(pids)))
        removed.append(f"processes {sorted(set(pids))}")
    for ns in ours:
        if netns_exists(ns):
            try:
                remove_netns(ns)
                removed.append(f"namespace {ns}")
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
    state.delete()
    return removed
