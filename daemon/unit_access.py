"""What the systemd unit's user can read and write: ``config check``'s view of a configuration as the service
will run it (run as root, where that user exists).

The unit runs the daemon as ``tokenwire`` under ``ProtectSystem=strict`` (systemd/tokenwire.service): a key that
user cannot read, a folder it cannot enter, a store left root's by a ``sudo tokenwire daemon`` run, or a path
outside the unit's writable ones passed ``config check`` and failed the service's start. These are warnings
(:func:`tokenwire.daemon.config.security_warnings` gathers them): a drop-in may change the user, its groups or
``ReadWritePaths=``, and the service may run on another host than the check.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config

DAEMON_USER = "tokenwire"  # the systemd unit's User=: config check, run as root, reads files as that user would
# What the unit lets the daemon write under ProtectSystem=strict (systemd/tokenwire.service): its StateDirectory=,
# its RuntimeDirectory=, PrivateTmp='s own /tmp and /var/tmp, and any ReadWritePaths= of the unit or a drop-in
STATE_DIRECTORY = Path("/var/lib/tokenwire")
RUNTIME_DIRECTORY = Path("/run/tokenwire")
PRIVATE_TMP = (Path("/tmp"), Path("/var/tmp"))  # the service's own, empty: what is there now is not what it sees
UNIT_NAME = "tokenwire.service"
UNIT_DIRS = (Path("/etc/systemd/system"), Path("/run/systemd/system"), Path("/usr/local/lib/systemd/system"),
             Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))  # systemd's search order, first wins
KV_SCAN_LIMIT = 20_000  # kv.directory entries config check examines: a store may hold millions of objects
KV_SHOWN = 3  # offenders named; past these the check stops (one chown -R fixes them all)


@dataclass(frozen=True)
class _DaemonUser:
    """The unit's user as the kernel's permission checks see it: its uid and every group it runs with."""

    name: str
    uid: int
    gid: int  # its own group: the unit's Group=
    group: str  # that group's name (tokenwire's is tokenwire): what the fixes named chown and chgrp to
    gids: frozenset[int]


def _daemon_user() -> _DaemonUser | None:
    """:data:`DAEMON_USER`, when ``config check`` can check files as that user: run as root (anyone else may not
    even see them) on a system that has the user (an install; elsewhere the check says nothing of it)."""
    import grp
    import pwd

    if os.geteuid() != 0:
        return None
    try:
        user = pwd.getpwnam(DAEMON_USER)
    except KeyError:
        return None
    # systemd gives User= its supplementary groups (initgroups), as getgrouplist lists them; /etc/group's members
    # too, should the lookup fail
    gids = {user.pw_gid} | {g.gr_gid for g in grp.getgrall() if DAEMON_USER in g.gr_mem}
    try:
        gids.update(os.getgrouplist(DAEMON_USER, user.pw_gid))
    except OSError:
        pass
    try:
        group = grp.getgrgid(user.pw_gid).gr_name
    except KeyError:
        group = str(user.pw_gid)
    return _DaemonUser(DAEMON_USER, user.pw_uid, user.pw_gid, group, frozenset(gids))


def _has_acl(path: Path) -> bool:
    """Whether ``path`` has a POSIX ACL: its mode bits then do not say who may use it (not judged: no warning)."""
    try:
        os.getxattr(path, "system.posix_acl_access")
    except OSError:  # ENODATA: none; ENOTSUP: the file system has none
        return False
    return True


def _denied(path: Path, st: os.stat_result, who: _DaemonUser, want: int) -> bool:
    """Whether ``who`` lacks any of the ``want`` permission bits (4 read, 2 write, 1 search) on ``path``. The
    kernel's rule: the owner's bits alone for the owner, the group's alone for a member, else the others' (a file
    0044 of its own was passed as readable: its others' bit was read)."""
    if st.st_uid == who.uid:
        bits = st.st_mode >> 6
    elif st.st_gid in who.gids:
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return bits & want != want and not _has_acl(path)


def _owner_mode(st: os.stat_result) -> str:
    """``owner root:root, mode 0750``: names where this system has them."""
    import grp
    import pwd

    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"owner {user}:{group}, mode {st.st_mode & 0o7777:04o}"


def _closed_folder(path: Path, who: _DaemonUser) -> str | None:
    """Why ``who`` cannot get to ``path``: the first folder above it (as written, and as its links resolve)
    without search permission for that user; None when there is none, or the folders are missing. A file of its
    own, 0600, in /etc/tokenwire 0750 root:root passed, and the daemon failed "cannot read: Permission denied"."""
    written = Path(os.path.abspath(path))
    real = Path(os.path.realpath(written))
    seen: set[Path] = set()
    for chain in (written.parents, real.parents):
        for folder in reversed(chain):  # from / down: the first closed one is the one to open
            if folder in seen:
                continue
            seen.add(folder)
            try:
                st = folder.stat()
            except OSError:  # missing (what lies below it is missing too): reading it says what
                break
            if _denied(folder, st, who, 1):
                return (f"its folder {folder} ({_owner_mode(st)}) does not let that user in: chgrp {who.group} "
                        f"{folder} && chmod g+x {folder}")
    return None


def unreadable_by_daemon(path: Path) -> str | None:
    """Why the systemd unit's user (:data:`DAEMON_USER`) cannot read ``path``; None when it can, or when that
    cannot be told here: ``config check`` not run as root, no such user on this system, or no file. ``tokenwire
    cert`` writes its key 0600 root, and a check run as root said ok for a key the daemon then could not read;
    and of a file the user owns in a folder it cannot enter."""
    who = _daemon_user()
    if who is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    lead = f"{path} cannot be read by the {who.name} user the systemd unit runs the daemon as"
    closed = _closed_folder(path, who)
    if closed is not None:
        return f"{lead}: {closed}"
    if not _denied(path, st, who, 4):
        return None
    fix = f"chmod u+r {path}" if st.st_uid == who.uid else f"chown {who.name}:{who.group} {path}"
    return f"{lead} ({_owner_mode(st)}): {fix}"


def _in_private_tmp(path: Path) -> bool:
    """Whether ``path`` is in the service's own /tmp or /var/tmp (PrivateTmp=yes): empty at each start, whatever
    is at that path on the host now."""
    real = Path(os.path.realpath(path))
    return any(real.is_relative_to(os.path.realpath(t)) for t in PRIVATE_TMP)


# the path specifiers of a system unit (systemd.unit(5)): ReadWritePaths=%S/tokenwire-kv is /var/lib/tokenwire-kv
_UNIT_SPECIFIERS = {"%S": "/var/lib", "%t": "/run", "%C": "/var/cache", "%L": "/var/log", "%E": "/etc", "%T": "/tmp",
                    "%V": "/var/tmp"}


def _unit_read_write_paths() -> list[Path] | None:
    """The ReadWritePaths= the installed unit and its drop-ins give the service (systemd's rules: the first unit
    file found, then each drop-in name once, first directory wins, in name order; an empty assignment resets the
    list); None when no unit is installed (the README's install checks the configuration before it installs it)."""
    import shlex

    unit = next((d / UNIT_NAME for d in UNIT_DIRS if (d / UNIT_NAME).is_file()), None)
    dropins: dict[str, Path] = {}
    for d in UNIT_DIRS:
        folder = d / f"{UNIT_NAME}.d"
        for conf in sorted(folder.glob("*.conf")) if folder.is_dir() else ():
            dropins.setdefault(conf.name, conf)
    if unit is None and not dropins:
        return None
    paths: list[Path] = []
    for file in ([unit] if unit is not None else []) + [dropins[name] for name in sorted(dropins)]:
        try:
            lines = file.read_text(errors="replace").splitlines()
        except OSError:
            continue
        section = ""
        for line in lines:
            line = line.strip()
            if line.startswith("["):
                section = line
                continue
            key, eq, value = line.partition("=")
            if section != "[Service]" or not eq or key.strip() != "ReadWritePaths":
                continue
            if not value.strip():
                paths.clear()
                continue
            try:
                words = shlex.split(value)
            except ValueError:  # unbalanced quotes: systemd ignores the line too
                continue
            for word in words:  # "-": ignored when missing; "+": outside the namespace (writable all the same)
                for spec, value in _UNIT_SPECIFIERS.items():
                    word = word.replace(spec, value)
                paths.append(Path(word.lstrip("-+")))
    return paths


def _read_only_for_service(path: Path) -> bool:
    """Whether the unit's ProtectSystem=strict leaves ``path`` read-only for the daemon: it is outside the
    StateDirectory=, RuntimeDirectory=, PrivateTmp= folders and every ReadWritePaths= of the installed unit."""
    real = Path(os.path.realpath(path))
    writable = [STATE_DIRECTORY, RUNTIME_DIRECTORY, *PRIVATE_TMP, *(_unit_read_write_paths() or [])]
    return not any(real.is_relative_to(os.path.realpath(w)) for w in writable)


def _kv_directory_offenders(root: Path, who: _DaemonUser) -> tuple[list[str], bool]:
    """Entries of the local KV store ``root`` that ``who`` cannot use as the store's start and its puts do
    (folders: list, write, enter; the lock and the objects: read, write), up to one more than :data:`KV_SHOWN`,
    and whether :data:`KV_SCAN_LIMIT` cut the look short. Bounded (a store may hold millions of objects): every
    object folder first, then an even share of the objects in each, as a ``sudo tokenwire daemon`` run leaves
    root's folders and files all over the store."""
    from .kv_store import LOCK_FILE

    found: list[str] = []
    examined = 0

    def check(path: Path, want: int) -> None:
        nonlocal examined
        examined += 1
        try:
            st = path.stat()
        except OSError:  # gone since it was listed
            return
        if _denied(path, st, who, want):
            found.append(f"{path} ({_owner_mode(st)})")

    check(root, 7)
    if (root / LOCK_FILE).exists():
        check(root / LOCK_FILE, 6)
    try:
        with os.scandir(root) as entries:  # a link to a folder is followed, as the store follows it
            subs = sorted(Path(e.path) for e in entries if e.is_dir())
    except OSError:  # not a folder to list (the store's own check says so)
        return found, False
    for sub in subs:
        if len(found) > KV_SHOWN or examined >= KV_SCAN_LIMIT:
            return found, examined >= KV_SCAN_LIMIT
        check(sub, 7)
    share = max(1, (KV_SCAN_LIMIT - examined) // max(1, len(subs)))
    for sub in subs:
        try:
            with os.scandir(sub) as entries:
                for n, entry in enumerate(entries):
                    if len(found) > KV_SHOWN or examined >= KV_SCAN_LIMIT:
                        return found, examined >= KV_SCAN_LIMIT
                    if n >= share:
                        break
                    if entry.is_file(follow_symlinks=False):  # the store skips links and anything not a file
                        check(Path(entry.path), 6)
        except OSError:  # not listable even by root: nothing to say about its files
            continue
    return found, False


def _fixed_by_systemd(path: Path, who: _DaemonUser) -> bool:
    """Whether the unit's start makes ``path`` the user's anyway: systemd chowns the StateDirectory= and
    RuntimeDirectory= trees to User=/Group= at each start when the top folder is not theirs (or is missing). It
    does not descend into one that is already theirs, where what ``sudo tokenwire daemon`` left stays root's."""
    real = Path(os.path.realpath(path))
    for top in (STATE_DIRECTORY, RUNTIME_DIRECTORY):
        if real.is_relative_to(os.path.realpath(top)):
            try:
                st = top.stat()
            except OSError:
                return True
            return (st.st_uid, st.st_gid) != (who.uid, who.gid)
    return False


def service_write_warnings(cfg: Config) -> list[str]:
    """Where the unit's daemon could not write what it writes at start, though ``config check`` (run as root)
    can: a kv.directory or socket folder left root's (a ``sudo tokenwire daemon`` run; the service then failed
    "kv.directory: cannot use .../b8/b8f1....high: Permission denied"), and a kv.directory outside the folders
    the unit may write (the service failed "Read-only file system"). Warnings: a drop-in may change User=,
    ReadWritePaths= or the groups, and the service may run on another host than this check."""
    who = _daemon_user()
    if who is None:
        return []
    out: list[str] = []
    user = f"the {who.name} user the systemd unit runs the daemon as"
    kv = cfg.kv
    if kv.enabled and kv.backend == "local" and not _in_private_tmp(kv.directory):
        root = Path(os.path.abspath(kv.directory))
        above = next((p for p in (root, *root.parents) if p.exists()), None)  # the start makes what is missing
        fixed = _fixed_by_systemd(root, who)
        closed = None if fixed else _closed_folder(root, who)
        if closed is not None:
            out.append(f"kv.directory: {root} cannot be used by {user}: {closed}")
        elif not fixed and above == root and root.is_dir():
            found, cut = _kv_directory_offenders(root, who)
            more = " and more" if len(found) > KV_SHOWN else f" (in {KV_SCAN_LIMIT} entries checked)" if cut else ""
            if found:
                out.append(f"kv.directory: {root} holds what {user} cannot write (the store's start or its puts "
                           f"fail with \"Permission denied\"): {', '.join(found[:KV_SHOWN])}{more}: chown -R "
                           f"{who.name}:{who.group} {root}")
        elif not fixed and above is not None and above != root and above.is_dir():
            st = above.stat()
            if _denied(above, st, who, 3):
                out.append(f"kv.directory: {root} does not exist, and {user} cannot make it in {above} "
                           f"({_owner_mode(st)}): install -d -o {who.name} -g {who.group} -m 0700 {root}")
        if _read_only_for_service(root):
            out.append(f"kv.directory: {root} is outside {STATE_DIRECTORY}, the systemd unit's StateDirectory=: "
                       "under its ProtectSystem=strict the store's start fails with \"Read-only file system\"; add "
                       f"a drop-in (systemctl edit tokenwire) with ReadWritePaths={root} under [Service] (it must "
                       f"exist before the start: install -d -o {who.name} -g {who.group} -m 0700 {root})")
    sockets = [("ingest.socket", cfg.ingest.socket)]
    if kv.enabled:
        sockets.append(("kv.ingest_socket", kv.ingest_socket))
    for setting, sock in sockets:
        if sock is None or _in_private_tmp(sock):
            continue
        folder = Path(os.path.abspath(sock)).parent
        try:
            st = folder.stat()
        except OSError:  # missing: the socket checks say so
            continue
        closed = None if _fixed_by_systemd(folder, who) else _closed_folder(folder / sock.name, who)
        if closed is not None:
            out.append(f"{setting}: {sock} cannot be made by {user}: {closed}")
        elif not _fixed_by_systemd(folder, who) and _denied(folder, st, who, 3):
            out.append(f"{setting}: {sock} cannot be made by {user}: {folder} ({_owner_mode(st)}) is not writable "
                       f"by that user: chown {who.name}:{who.group} {folder}")
        if _read_only_for_service(folder):
            out.append(f"{setting}: {sock} is outside {RUNTIME_DIRECTORY}, the systemd unit's RuntimeDirectory=: "
                       "under its ProtectSystem=strict the daemon cannot make the socket (\"Read-only file "
                       f"system\"); add a drop-in (systemctl edit tokenwire) with ReadWritePaths={folder} under "
                       "[Service], or put the socket in /run/tokenwire")
    return out
