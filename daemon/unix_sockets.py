"""Unix-socket paths the daemon listens on (chat ingest, KV ingest): claimed at start, given their mode and group,
released at exit.

Python 3.11's asyncio neither removes a stale socket file before binding nor its own at close. Doing it by
hand must not touch what is not ours: a regular file at the path, a socket another process still listens
on, or (at exit) a socket a later process has bound at the same path since.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import resource
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

from . import config

log = logging.getLogger("tokenwire.daemon")

MAX_PATH_BYTES = 108  # sun_path: Python refuses a longer path to bind ("AF_UNIX path too long")


def path_problem(path: Path) -> OSError | None:
    """What binding a socket at ``path`` would fail with for its path alone (too long, no folder), or None.
    Checked before binding: a mistyped path made folders anywhere (as root); the setting is named instead."""
    size = len(os.fsencode(path))
    if size > MAX_PATH_BYTES:
        return OSError(errno.ENAMETOOLONG, f"path of {size} bytes, over a Unix socket's {MAX_PATH_BYTES}",
                       str(path))
    if not path.parent.is_dir():
        missing = not path.parent.exists()
        return OSError(errno.ENOENT if missing else errno.ENOTDIR, "no such folder" if missing else "not a folder",
                       str(path.parent))
    return None


def listen_problem(path: Path) -> OSError | None:
    """What a daemon's start would fail with listening at ``path`` (``config check``), found without binding or
    removing anything: its path, or something not a socket in the way. A socket already there is no problem:
    a stale one is replaced at start, and a live one is most often this configuration's running daemon (the
    start then names it)."""
    if path.is_socket():
        return path_problem(path)
    try:
        claim(path)  # raises for anything in the way, and changes nothing then
    except OSError as exc:
        return exc
    return None


def claim(path: Path) -> None:
    """Make ``path`` free to bind: remove a stale socket; ``OSError`` when something live or foreign is there,
    or when no socket can be bound there for its path alone (:func:`path_problem`)."""
    problem = path_problem(path)
    if problem is not None:
        raise problem
    if path.is_socket():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # nobody listens: left by a process that is gone
            return
        except OSError as exc:  # busy (a full backlog), another user's, a timeout: someone may be there
            raise OSError(errno.EADDRINUSE, f"cannot tell whether it is in use ({exc.strerror or exc})",
                          str(path)) from None
        finally:
            probe.close()
        raise OSError(errno.EADDRINUSE, "another process is listening on this socket", str(path))
    if path.exists() or path.is_symlink():
        raise OSError(errno.EEXIST, "something other than a socket is in the way", str(path))


def identity(path: Path) -> tuple[int, int, int] | None:
    """(device, inode, change time) of the socket just bound at ``path``, to recognise it at exit (an inode
    number alone is reused at once on tmpfs)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def release(path: Path, ident: tuple[int, int, int] | None) -> None:
    """Remove ``path`` if it is still the socket this process bound (``identity`` after binding). Its refusals held
    back are summed up now (the socket is closed: no more come) and its gate forgotten (:func:`flush_logs`)."""
    gate = _gates.pop(Path(path), None)
    if gate is not None:
        gate.refusals.flush(time.monotonic(), final=True)
    if ident is not None and identity(path) == ident and path.is_socket():
        os.unlink(path)


def set_socket_access(path: Path, group: str | None, setting: str) -> None:
    """Make the socket just bound at ``path`` mode 0660, given to ``group`` when one is set (``setting``, the
    config key, names it in errors); else it keeps the daemon's group.

    A group of its own (``tokenwire-ingest``) lets an application connect without being in the daemon's
    group, which could read the TLS key, the config and the KV store. The group is given before the mode opens
    the socket to it, and the socket listens only once both are set (:func:`bind_private`). Not root, the daemon
    may only give a group it is a member of: an ``OSError`` saying so."""
    if group is not None:
        try:
            os.chown(path, -1, config.group_id(group))
        except KeyError:
            raise OSError(errno.EINVAL, f"{setting}: no group {group!r} on this system", str(path)) from None
        except PermissionError:
            if config.group_id(group) in {os.getegid(), *os.getgroups()}:
                # a member, yet refused: a system-call filter (the unit's SystemCallFilter=~@privileged denies
                # @chown unless it is allowed again), or a security module; "not a member" sent people the wrong way
                raise OSError(errno.EPERM, f"{setting}: cannot give the socket to group {group!r} although the "
                              "daemon's user is a member of it: chown() was refused (a system-call filter: the "
                              "systemd unit needs SystemCallFilter=@chown after ~@privileged, as "
                              "systemd/tokenwire.service has it)", str(path)) from None
            user = _user_name()  # (the one running: a drop-in's User= or a hand-run daemon, not always tokenwire)
            how = (f"add {user} to group {group}" if group.isdigit()
                   else f"a sysusers line such as systemd/tokenwire.sysusers' m {user} {group}")
            raise OSError(errno.EPERM, f"{setting}: cannot give the socket to group {group!r}: the daemon's user "
                          f"{user} is not a member of it ({how})", str(path)) from None
    os.chmod(path, 0o660)


def _user_name() -> str:
    """The name of the user this process runs as (its uid when it has no name)."""
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


BACKLOG = 100  # asyncio's own default for a server it makes


def bind_private(path: Path, group: str | None, setting: str) -> socket.socket:
    """A Unix stream socket bound at ``path``, given its mode and group (:func:`set_socket_access`), and only
    then listening: nobody can connect before its access is set (ECONNREFUSED). asyncio's bind-and-listen left
    it connectable with the process umask's mode until chmod: under umask 000 a user outside the group
    connected and opened an answer. A socket whose access cannot be set is closed and its file removed."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    try:
        set_socket_access(path, group, setting)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        path.unlink(missing_ok=True)
        raise
    return sock


# connections one socket holds at once: a quarter of the fd limit, at most 4096 (limits.max_live_answers' default,
# so an application with a connection per answer still reaches it), at least 64
MAX_CONNECTIONS_CAP = 4096
MIN_CONNECTIONS = 64

Client = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def connection_bound() -> int:
    """How many connections one Unix socket accepts at once (:func:`serve`), from the process's fd limit: with
    none, 20,000 silent connections took every fd, and /healthz, the KV store's files and new puts failed."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS_CAP
    return max(MIN_CONNECTIONS, min(MAX_CONNECTIONS_CAP, soft // 4))


# The gates of the sockets :func:`serve` made, by path, until :func:`release`: what :func:`flush_logs` sums up. Held
# here, not by their servers: uvloop's server lets go of its protocol factory (and so of the gate) at close, before
# the daemon's last flush. A new socket on the same path replaces its entry (bounded by the paths served).
_gates: dict[Path, _Gate] = {}


def flush_logs(now: float, *, final: bool = False) -> None:
    """The lines summing up the connections refused past each socket's bound (its "N more connections refused"),
    once the last line is a minute old (for the daemon's housekeeping: else it comes with a connection's close or
    the next refusal); ``final``: at once (the daemon is stopping: they were never written)."""
    for gate in list(_gates.values()):
        gate.refusals.flush(now, final=final)


class _Gate:
    """The connections one socket holds (:func:`serve`), and the rate-limited warning about those refused."""

    def __init__(self, bound: int, setting: str) -> None:
        from tokenwire.transport.handshake_guard import RefusalLog  # (aioquic: only a running daemon serves)

        self.bound = bound
        self.setting = setting
        self.active = 0
        self.refusals = RefusalLog(log, lambda n, s: f"{setting}: {n} more connections refused over {s:.0f} s: "
                                                     f"{bound} connections already open")

    def refused(self) -> None:
        if not self.refusals.hold(time.monotonic()):
            log.warning("%s: a connection refused: %d connections already open, the most it takes (a quarter of "
                        "the fd limit, at most %d); more refusals are counted and logged at most once a minute",
                        self.setting, self.bound, MAX_CONNECTIONS_CAP)


class _BoundedProtocol(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol, counted from its connection's accept to its socket's close: one past the bound
    gets a last line, ``{"ok": false, "error": ...}`` (what both ingest protocols reply), and is closed at once,
    its handler never run. Counted here rather than in the handler, so the count is of open fds."""

    def __init__(self, gate: _Gate, reader: asyncio.StreamReader, client: Client) -> None:
        super().__init__(reader, client)
        self._gate = gate
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        gate = self._gate
        if gate.active >= gate.bound:
            gate.refused()
            # a stream socket's (uvloop's, the daemon's loop, is no asyncio.WriteTransport subclass: an isinstance
            # assert there failed, and the refused connection was closed without its line)
            transport = cast(asyncio.WriteTransport, transport)
            transport.write(json.dumps({"ok": False, "error": f"too many connections to this socket ({gate.bound} "
                                        "already open, the most it takes): close idle ones, or retry"}).encode()
                            + b"\n")
            transport.close()  # (what was written still goes out first; a peer that never reads loses it)
            return
        gate.active += 1
        self._counted = True
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self._gate.active -= 1
            self._gate.refusals.flush(time.monotonic())  # the summary line, once a minute has passed since the last
        super().connection_lost(exc)


async def serve(path: Path, client: Client, *, limit: int, group: str | None, setting: str,
                max_connections: int | None = None, start_serving: bool = True) -> asyncio.Server:
    """Listen on the Unix socket ``path`` (a stale socket file replaced, :func:`claim`), mode 0660 and given to
    ``group`` when set, before it listens (:func:`bind_private`); a socket whose access cannot be set is closed
    and removed (nobody could use it, and the daemon does not start). Both ingest sockets (answers, KV) are
    made here, each holding at most ``max_connections`` at once (:func:`connection_bound` by default: with no
    bound, abandoned connections took every fd of the daemon).

    ``start_serving=False``: bound and listening, but no connection is accepted until ``server.start_serving()``
    (the daemon's start gate: the path is claimed at once, so a socket in use fails the start before the KV
    warm-up, and what connects meanwhile waits in the backlog, unread, until READY)."""
    bound = connection_bound() if max_connections is None else max_connections
    claim(path)  # a stale socket goes; a bad path, a live socket or a file is an error
    sock = bind_private(path, group, setting)
    try:  # (given a socket, asyncio neither binds nor removes anything at the path)
        gate = _Gate(bound, setting.removesuffix("_group"))
        loop = asyncio.get_running_loop()
        # asyncio.start_unix_server's own factory, with the counting protocol
        server = await loop.create_unix_server(
            lambda: _BoundedProtocol(gate, asyncio.StreamReader(limit=limit, loop=loop), client), sock=sock,
            backlog=BACKLOG, start_serving=start_serving)
        _gates[path] = gate
    except BaseException:
        sock.close()
        path.unlink(missing_ok=True)
        raise
    reach = None if group is None else folder_reach_problem(path.parent, config.group_id(group))
    if reach is not None:  # (the socket works for the daemon's own group: a warning, not a failed start)
        log.warning("%s: members of group %r cannot reach the socket: %s", setting, group, reach)
    return server


RUNTIME_PARENT = Path("/run")  # systemd makes a unit's RuntimeDirectory= here at start, and removes it at stop


def socket_checks(path: Path | None, group: str | None, setting: str) -> tuple[list[str], list[str]]:
    """``config check``'s view of a socket the daemon will listen on: (errors the start would fail with, warnings).

    A missing folder right under /run is a warning, not an error: the systemd unit's ``RuntimeDirectory=`` makes
    it at start and removes it at stop, so a stopped service's correct config failed the check. With ``group``
    (``socket_group``), a folder that does not let that group's members in is a warning: the socket's own mode
    and group were right, and an application in the group got EACCES from its folder (a unit left from before
    the 0711 ``/run/tokenwire`` makes it 0750 at each start)."""
    errors: list[str] = []
    warnings: list[str] = []
    if path is not None:
        problem = listen_problem(path)
        if problem is not None:
            line = f"{setting}: cannot listen on {path}: {problem.strerror or problem}"
            if problem.errno == errno.ENOENT and path.parent.parent == RUNTIME_PARENT:
                warnings.append(f"{line} now (the systemd unit's RuntimeDirectory= makes it at start; run by "
                                "hand, make it first)")
            else:
                errors.append(line)
    if group is not None:
        group_setting = f"{setting}_group" if setting.endswith("socket") else setting
        try:
            gid = config.group_id(group)
        except KeyError:  # the daemon would fail at start
            errors.append(f"{group_setting}: no group {group!r} on this system "
                          "(systemd/tokenwire.sysusers makes tokenwire-ingest)")
        else:
            reach = None if path is None else folder_reach_problem(path.parent, gid)
            if reach is not None:
                warnings.append(f"{group_setting}: members of group {group!r} cannot reach the socket: {reach}")
    return errors, warnings


def _group_name(gid: int) -> str:
    """``'tokenwire'`` for its gid (the number when this system has no such group): the message said "group 994"
    where every other one names the group."""
    import grp

    try:
        return repr(grp.getgrgid(gid).gr_name)
    except KeyError:
        return str(gid)


def folder_reach_problem(folder: Path, gid: int) -> str | None:
    """Why members of group ``gid`` cannot pass through ``folder`` to a socket in it (no search permission for
    them), or None (they can, or the folder does not exist yet)."""
    try:
        st = folder.stat()
    except OSError:
        return None
    if st.st_mode & 0o001 or (st.st_gid == gid and st.st_mode & 0o010):
        return None
    return (f"its folder {folder} is mode {st.st_mode & 0o7777:04o}, group {_group_name(st.st_gid)}, without "
            "search permission for them (0711 as systemd/tokenwire.tmpfiles and the unit make /run/tokenwire; "
            "reinstall the unit if it still says RuntimeDirectoryMode=0750)")
