"""Unix-socket paths the daemon listens on (chat ingest, KV ingest): claimed at start, given their mode and group,
released at exit.

Python 3.11's asyncio neither removes a stale socket file before binding nor its own at close. Doing it by
hand must not touch what is not ours: a regular file at the path, a socket another process still listens
on, or (at exit) a socket a later process has bound at the same path since.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from . import config

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
    """Remove ``path`` if it is still the socket this process bound (``identity`` after binding)."""
    if ident is not None and identity(path) == ident and path.is_socket():
        os.unlink(path)


def set_socket_access(path: Path, group: str | None, setting: str) -> None:
    """Make the socket just bound at ``path`` mode 0660, given to ``group`` when one is set (``setting``, the
    config key, names it in errors); else it keeps the daemon's group.

    A group of its own (``tokenwire-ingest``) lets an application connect without being in the daemon's
    group, which could read the TLS key, the config and the KV store. The group is given before the mode opens
    the socket to it (bound under UMask=0027, it is 0750: nobody else may connect yet). Not root, the daemon
    may only give a group it is a member of: an ``OSError`` saying so."""
    if group is not None:
        try:
            os.chown(path, -1, config.group_id(group))
        except KeyError:
            raise OSError(errno.EINVAL, f"{setting}: no group {group!r} on this system", str(path)) from None
        except PermissionError:
            raise OSError(errno.EPERM, f"{setting}: cannot give the socket to group {group!r}: the daemon's user "
                          f"is not a member of it (systemd/tokenwire.sysusers: m tokenwire {group})",
                          str(path)) from None
    os.chmod(path, 0o660)


async def serve(path: Path, client: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]], *,
                limit: int, group: str | None, setting: str) -> asyncio.Server:
    """Listen on the Unix socket ``path`` (a stale socket file replaced, :func:`claim`), mode 0660 and given to
    ``group`` when set (:func:`set_socket_access`); a socket whose access cannot be set is closed and removed
    (nobody could use it, and the daemon does not start). Both ingest sockets (answers, KV) are made here."""
    claim(path)  # a stale socket goes; a bad path, a live socket or a file is an error
    server = await asyncio.start_unix_server(client, path=str(path), limit=limit)
    try:
        set_socket_access(path, group, setting)
    except OSError:
        server.close()
        await server.wait_closed()
        path.unlink(missing_ok=True)
        raise
    return server
