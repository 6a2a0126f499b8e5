"""What the systemd unit's user can read and write: ``config check``'s view of a configuration as the service
will run it (run as root, where that user exists).

The unit runs the daemon as ``tokenwire`` under ``ProtectSystem=strict`` (systemd/tokenwire.service): a key that
user cannot read, a folder it cannot enter, a store left root's by a ``sudo tokenwire daemon`` run, or a path
outside the unit's writable ones passed ``config check`` and failed the service's start. These are warnings
(:func:`tokenwire.daemon.config.security_warnings` gathers them): a drop-in may change the user, its groups or
``ReadWritePaths=``, and the service may run on another host than the check.

The unit's sandbox hid more that ``config check`` passed: a socket or store under /tmp (``PrivateTmp=yes``: the
service's own, empty at each start), a file, store or socket under /home, /root or /run/user, or a venv whose
Python resolves there (``ProtectHome=yes``), a port below 1024 (no capabilities), a socket group the user is not
in, a Redis socket (``kv.redis_url = "unix://..."``) under /tmp or out of the user's reach, and an enabled [kv]
under ``MemoryDenyWriteExecute=yes`` (its codec's JIT is refused). The installed unit's own settings are read
where they decide (a drop-in may change them, User= and Group= included); with no unit installed, the shipped
unit's.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config

DAEMON_USER = "tokenwire"  # the shipped unit's User=: config check, run as root, reads files as that user would
# (an installed unit's or drop-in's User= and Group= win: _daemon_user)
# What the unit lets the daemon write under ProtectSystem=strict (systemd/tokenwire.service): its StateDirectory=,
# its RuntimeDirectory=, PrivateTmp='s own /tmp and /var/tmp, and any ReadWritePaths= of the unit or a drop-in
STATE_DIRECTORY = Path("/var/lib/tokenwire")
RUNTIME_DIRECTORY = Path("/run/tokenwire")
PRIVATE_TMP = (Path("/tmp"), Path("/var/tmp"))  # the service's own, empty: what is there now is not what it sees
PROTECTED_HOME = (Path("/home"), Path("/root"), Path("/run/user"))  # ProtectHome=yes: hidden from the service
# What the shipped unit (systemd/tokenwire.service) says, for a check run before it is installed (the README's
# install checks the configuration first)
SHIPPED_UNIT = {"PrivateTmp": "yes", "ProtectHome": "yes", "CapabilityBoundingSet": "", "AmbientCapabilities": "",
                "MemoryDenyWriteExecute": "yes"}
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
    """The unit's User= (and Group=) as the installed unit and its drop-ins end up with it, else
    :data:`DAEMON_USER`, when ``config check`` can check files as that user: run as root (anyone else may not
    even see them) on a system that has the user (an install; elsewhere the check says nothing of it). A drop-in
    with User=svc-tw was ignored: every warning named tokenwire and its groups."""
    import grp
    import pwd

    if os.geteuid() != 0:
        return None
    name = _unit_setting("User").strip() or DAEMON_USER
    try:
        user = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        return None
    gid = user.pw_gid
    group_name = _unit_setting("Group").strip()
    if group_name:  # the unit's Group= replaces the user's own group (its supplementary ones stay)
        try:
            gid = int(group_name) if group_name.isdigit() else grp.getgrnam(group_name).gr_gid
        except KeyError:  # (systemd refuses to start the unit then: not this check's to say)
            pass
    # systemd gives User= its supplementary groups (initgroups), as getgrouplist lists them; /etc/group's members
    # too, should the lookup fail
    gids = {gid} | {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem}
    try:
        gids.update(os.getgrouplist(user.pw_name, gid))
    except OSError:
        pass
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return _DaemonUser(user.pw_name, user.pw_uid, gid, group, frozenset(gids))


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
    and of a file the user owns in a folder it cannot enter; and of one under /home, /root or /run/user, which
    the unit's ProtectHome=yes hides whatever the modes; and of one under /tmp or /var/tmp, where its PrivateTmp=
    shows the service a folder of its own, empty (the daemon failed "No such file or directory")."""
    who = _daemon_user()
    if who is None:
        return None
    hidden = _protect_home_note(path, "reading it", writes=False)
    if hidden is not None:  # (its folders' modes say nothing then: chmod would not help)
        return f"{hidden} (e.g. to /etc/tokenwire, owned by {who.name}:{who.group})"
    tmp = _private_tmp(path)
    if tmp is not None:  # (a file there now is not in the service's /tmp: its modes say nothing either)
        return (f"{path} is under {tmp}, which the systemd unit's PrivateTmp=yes makes the service's own, empty at "
                "each start: reading it fails with \"No such file or directory\" (exit status 2); move it (e.g. to "
                f"/etc/tokenwire, owned by {who.name}:{who.group})")
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


def _unit_assignments() -> dict[str, list[str]] | None:
    """Every ``[Service]`` assignment of the installed unit and its drop-ins, by key, in systemd's order (the
    first unit file found, then each drop-in name once, first directory wins, in name order); an empty
    assignment is kept as ``""`` (it resets a list). None when no unit is installed (the README's install checks
    the configuration before it installs it)."""
    unit = next((d / UNIT_NAME for d in UNIT_DIRS if (d / UNIT_NAME).is_file()), None)
    dropins: dict[str, Path] = {}
    for d in UNIT_DIRS:
        folder = d / f"{UNIT_NAME}.d"
        for conf in sorted(folder.glob("*.conf")) if folder.is_dir() else ():
            dropins.setdefault(conf.name, conf)
    if unit is None and not dropins:
        return None
    found: dict[str, list[str]] = {}
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
            if section == "[Service]" and eq:
                found.setdefault(key.strip(), []).append(value.strip())
    return found


def _unit_words(key: str, assignments: dict[str, list[str]] | None = None) -> list[str] | None:
    """The words of a list setting (``ReadWritePaths=``, ``StateDirectory=``, ...) of the installed unit: each
    assignment adds to the list, an empty one resets it, with systemd's quoting and a system unit's path
    specifiers; None when no unit is installed."""
    import shlex

    found = _unit_assignments() if assignments is None else assignments
    if found is None:
        return None
    words: list[str] = []
    for value in found.get(key, []):
        if not value:
            words.clear()
            continue
        try:
            more = shlex.split(value)
        except ValueError:  # unbalanced quotes: systemd ignores the line too
            continue
        for word in more:
            for spec, path in _UNIT_SPECIFIERS.items():
                word = word.replace(spec, path)
            words.append(word)
    return words


def _unit_read_write_paths() -> list[Path] | None:
    """The ReadWritePaths= the installed unit and its drop-ins give the service (:func:`_unit_words`); None when
    no unit is installed."""
    words = _unit_words("ReadWritePaths")
    # "-": ignored when missing; "+": outside the namespace (writable all the same)
    return None if words is None else [Path(word.lstrip("-+")) for word in words]


# where systemd makes each kind of a unit's own directories (systemd.exec(5), a system unit), its User='s at start
_UNIT_DIRECTORY_ROOTS = {"StateDirectory": Path("/var/lib"), "RuntimeDirectory": Path("/run"),
                         "CacheDirectory": Path("/var/cache"), "LogsDirectory": Path("/var/log")}


def _unit_directories() -> list[Path]:
    """The StateDirectory=, RuntimeDirectory=, CacheDirectory= and LogsDirectory= of the installed unit and its
    drop-ins (``StateDirectory=tokenwire twkv``: /var/lib/tokenwire and /var/lib/twkv), which the service may
    write under ProtectSystem=strict and systemd hands to its user at start; the shipped unit's with none
    installed. A drop-in's store in /var/lib/twkv was told to add ReadWritePaths=."""
    found = _unit_assignments()
    if found is None:
        return [STATE_DIRECTORY, RUNTIME_DIRECTORY]
    out: list[Path] = []
    for key, root in _UNIT_DIRECTORY_ROOTS.items():
        for word in _unit_words(key, found) or []:
            name = word.split(":", 1)[0]  # (NAME:LINK makes a link LINK to NAME too)
            if name and not name.startswith("/"):
                out.append(root / name)
    return out


def _unit_setting(key: str) -> str:
    """The value a single-valued setting of the installed unit ends up with (the last assignment); with no unit
    installed the shipped unit's (:data:`SHIPPED_UNIT`), with a unit that does not set it ``""`` (systemd's
    default: off)."""
    found = _unit_assignments()
    if found is None:
        return SHIPPED_UNIT.get(key, "")
    values = found.get(key, [])
    return values[-1] if values else ""


def _unit_has_capability(capability: str) -> bool:
    """Whether the installed unit's CapabilityBoundingSet= and AmbientCapabilities= both hold ``capability``
    (a port below 1024 needs CAP_NET_BIND_SERVICE in both: the ambient set is refused past the bounding one)."""
    found = _unit_assignments()
    if found is None:
        found = {key: [value] for key, value in SHIPPED_UNIT.items()}
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        held: set[str] = set()
        inverted = False  # "~CAP_A CAP_B": every capability but these
        for value in found.get(key, []):
            if not value:
                held, inverted = set(), False
                continue
            inverted = value.startswith("~")
            words = set(value.lstrip("~").split())
            held = words if inverted else held | words
        if (capability in held) == inverted:
            return False
    return True


def _enabled(value: str) -> bool:
    """A unit boolean as systemd reads it (PrivateTmp=disconnected is on too)."""
    return value.strip().lower() in ("yes", "true", "on", "1", "disconnected")


def _under(path: Path, roots: tuple[Path, ...]) -> Path | None:
    """The first of ``roots`` that ``path`` is in, as written or as its links resolve; None when it is in none."""
    for form in (Path(os.path.abspath(path)), Path(os.path.realpath(path))):
        for root in roots:
            if form.is_relative_to(root) or form.is_relative_to(os.path.realpath(root)):
                return root
    return None


def _hidden_home(path: Path) -> tuple[Path, str] | None:
    """(the folder, the unit's ProtectHome= mode) when ``path`` is under a folder that setting hides from the
    daemon (yes, tmpfs) or makes read-only (read-only): /home, /root, /run/user; None when it is not, or the
    unit lets it be. A certificate under /home passed, and the service exited 2 "Permission denied"."""
    mode = _unit_setting("ProtectHome").strip().lower()
    if not (_enabled(mode) or mode in ("tmpfs", "read-only")):
        return None
    root = _under(path, PROTECTED_HOME)
    return None if root is None else (root, "read-only" if mode == "read-only" else "yes")


def _protect_home_note(path: Path, what: str, *, writes: bool) -> str | None:
    """The warning for ``path`` under a folder the unit's ProtectHome= hides (:func:`_hidden_home`): ``what``
    (the daemon's use of it) fails. ``writes``: the daemon writes there (a store, a socket), so ProtectHome=
    read-only breaks it as well."""
    hidden = _hidden_home(path)
    if hidden is None:
        return None
    root, mode = hidden
    if mode == "read-only":
        return None if not writes else (
            f"{path} is under {root}, which the systemd unit's ProtectHome=read-only makes read-only: {what} fails "
            "with \"Read-only file system\"; move it out of /home, /root and /run/user")
    return (f"{path} is under {root}, which the systemd unit's ProtectHome=yes hides from the daemon: {what} fails "
            "with \"Permission denied\" (exit status 2); move it out of /home, /root and /run/user")


def _private_tmp(path: Path) -> Path | None:
    """The /tmp or /var/tmp that ``path`` is in when the unit's PrivateTmp= gives the service its own there;
    None otherwise."""
    return _under(path, PRIVATE_TMP) if _enabled(_unit_setting("PrivateTmp")) else None


def _read_only_for_service(path: Path) -> bool:
    """Whether the unit's ProtectSystem=strict leaves ``path`` read-only for the daemon: it is outside the
    StateDirectory=, RuntimeDirectory=, PrivateTmp= folders and every ReadWritePaths= of the installed unit, and
    the StateDirectory=/RuntimeDirectory= (Cache, Logs) entries of its drop-ins."""
    real = Path(os.path.realpath(path))
    writable = [STATE_DIRECTORY, RUNTIME_DIRECTORY, *PRIVATE_TMP, *(_unit_read_write_paths() or []),
                *_unit_directories()]
    return not any(real.is_relative_to(os.path.realpath(w)) for w in writable)


def _kv_directory_offenders(root: Path, who: _DaemonUser) -> tuple[list[str], bool]:
    """Entries of the local KV store ``root`` that ``who`` cannot use as the store's start and its puts do
    (folders: list, write, enter; the lock and the objects: read, write), up to one more than :data:`KV_SHOWN`,
    and whether :data:`KV_SCAN_LIMIT` cut the look short. Bounded (a store may hold millions of objects): every
    object folder first, then an even share of the objects in each, as a ``sudo tokenwire daemon`` run leaves
    root's folders and files all over the store."""
    from .kv_store_local import LOCK_FILE

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
    for top in (STATE_DIRECTORY, RUNTIME_DIRECTORY, *_unit_directories()):
        if real.is_relative_to(os.path.realpath(top)):
            try:
                st = top.stat()
            except OSError:
                return True
            return (st.st_uid, st.st_gid) != (who.uid, who.gid)
    return False


def _sandbox_tmp_or_home(setting: str, path: Path, what: str, instead: Path) -> str | None:
    """The warning for a store or socket the unit's PrivateTmp= or ProtectHome= takes from the daemon or from the
    applications (:func:`_private_tmp`, :func:`_protect_home_note`); None when neither does. ``instead``: where
    the unit lets it be."""
    tmp = _private_tmp(path)
    if tmp is not None:
        lost = ("the KV store is lost at every restart, and no other process sees it" if setting == "kv.directory"
                else f"no other process sees the socket (applications connecting to {path} get \"No such file or "
                "directory\"), and it is gone at each restart")
        return (f"{setting}: {path} is under {tmp}, which the systemd unit's PrivateTmp=yes makes the service's "
                f"own, empty at each start: {lost}; put it in {instead.parent} (e.g. {instead})")
    home = _protect_home_note(path, what, writes=True)
    return None if home is None else f"{setting}: {home} (e.g. to {instead})"


def _group_warnings(cfg: Config, who: _DaemonUser) -> list[str]:
    """A socket group (``ingest.socket_group``, ``kv.ingest_socket_group``) the unit's user is not a member of:
    not root, the daemon cannot give its socket to that group and refuses to start ("not a member of it"). Its
    groups are the user's own and its supplementary ones, and any SupplementaryGroups= of the installed unit."""
    from .config import group_id

    gids = set(who.gids)
    for name in _unit_words("SupplementaryGroups") or []:
        try:
            gids.add(group_id(name))
        except KeyError:  # (systemd refuses to start the unit then: not this check's to say)
            continue
    groups = [("ingest.socket_group", cfg.ingest.socket, cfg.ingest.socket_group)]
    if cfg.kv.enabled:
        groups.append(("kv.ingest_socket_group", cfg.kv.ingest_socket, cfg.kv.ingest_socket_group))
    out: list[str] = []
    for setting, sock, group in groups:
        if sock is None or group is None:
            continue
        try:
            gid = group_id(group)
        except KeyError:  # no such group: the socket checks say so, as an error
            continue
        if gid not in gids:
            how = (f"usermod -aG {group} {who.name}" if group.isdigit()
                   else f"systemd/tokenwire.sysusers: m {who.name} {group}, then systemd-sysusers")
            out.append(f"{setting}: the {who.name} user the systemd unit runs the daemon as is not a member of group "
                       f"{group!r}: the daemon cannot give {sock} to it and refuses to start ({how})")
    return out


def _port_warnings(cfg: Config) -> list[str]:
    """Ports below 1024 (server.listen, kv.listen, metrics.listen) while the installed unit does not give the
    daemon CAP_NET_BIND_SERVICE in both lines it needs: the start failed with a bare "Permission denied"."""
    from .startup import CAPABILITY_HINT, addr, unprivileged_port_start

    if _unit_has_capability("CAP_NET_BIND_SERVICE"):
        return []
    first_free = unprivileged_port_start()
    listens = [("server.listen", a) for a in cfg.server.listen]
    if cfg.kv.enabled:
        listens.append(("kv.listen", cfg.kv.listen))
    if cfg.metrics.listen is not None:
        listens.append(("metrics.listen", cfg.metrics.listen))
    return [f"{setting}: {addr(host, port)}: the systemd unit gives the daemon no capabilities, and binding this "
            f"port fails with \"Permission denied\": {CAPABILITY_HINT}"
            for setting, (host, port) in listens if 0 < port < first_free]


def _interpreter_warning() -> str | None:
    """The Python this check runs on (the unit's venv, run as the README says) resolving into a folder the unit's
    ProtectHome=yes hides (a venv made from pyenv's Python links to /home/.../.pyenv): the unit's ExecStart= then
    fails with status 203/EXEC (or that Python finds no standard library), before the daemon can say a word."""
    for path in (sys.executable, sys.base_prefix):
        hidden = _hidden_home(Path(path)) if path else None
        if hidden is not None and hidden[1] == "yes":
            return (f"ExecStart: this check runs on {sys.executable}, and {path} resolves to {os.path.realpath(path)}"
                    f", under {hidden[0]}: if the unit runs this venv (/opt/tokenwire as the README makes it), its "
                    "ProtectHome=yes hides that Python and the start fails with status 203/EXEC; make the venv from "
                    "a Python outside /home and /root (e.g. sudo /usr/bin/python3 -m venv /opt/tokenwire)")
    return None


def _redis_socket_warnings(url: str | None, who: _DaemonUser) -> list[str]:
    """A ``kv.redis_url = "unix://..."`` socket the unit's daemon cannot reach: under /tmp (PrivateTmp=: the
    service's own /tmp has no Redis socket in it), under /home (ProtectHome=), behind a folder the user cannot
    enter, or a socket it may not write (connecting needs that). Each passed, and the start failed to connect."""
    if url is None or not url.lower().startswith("unix://"):
        return []
    import urllib.parse

    sock = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    if not sock.is_absolute():
        return []  # (the configuration's own check refuses it)
    lead = f"kv.redis_url: {sock}"
    tmp = _private_tmp(sock)
    if tmp is not None:
        return [f"{lead} is under {tmp}, which the systemd unit's PrivateTmp=yes makes the service's own, empty at "
                "each start: the daemon finds no Redis socket there (\"No such file or directory\") and does not "
                "start; have Redis listen on a socket in /run (e.g. unixsocket /run/redis/redis.sock)"]
    home = _protect_home_note(sock, "connecting to Redis", writes=False)
    if home is not None:
        return [f"kv.redis_url: {home}"]
    user = f"the {who.name} user the systemd unit runs the daemon as"
    closed = _closed_folder(sock, who)
    if closed is not None:
        return [f"{lead} cannot be reached by {user}: {closed}"]
    try:
        st = sock.stat()
    except OSError:  # not there now (Redis not running here): nothing to judge
        return []
    if _denied(sock, st, who, 2):
        return [f"{lead} ({_owner_mode(st)}) may not be written by {user}, and connecting needs that: the daemon "
                f"does not start (\"Permission denied\"); set Redis's unixsocketperm 770 and add {who.name} to the "
                "socket's group (a drop-in with SupplementaryGroups=)"]
    return []


def _memory_deny_write_execute_warning() -> str | None:
    """With [kv] enabled: the unit's MemoryDenyWriteExecute=yes (the shipped unit's, unless a drop-in turns it
    off) refuses the KV codec's JIT, and the daemon does not start. ``config check`` said ok."""
    if not _enabled(_unit_setting("MemoryDenyWriteExecute")):
        return None
    return ("kv.enabled: the systemd unit's MemoryDenyWriteExecute=yes refuses the KV codec's JIT (numba) the "
            "executable memory it compiles into, and the daemon does not start; add a drop-in (systemctl edit "
            "tokenwire) with MemoryDenyWriteExecute=no under [Service]")


def service_write_warnings(cfg: Config) -> list[str]:
    """Where the unit's daemon could not write what it writes at start, though ``config check`` (run as root)
    can: a kv.directory or socket folder left root's (a ``sudo tokenwire daemon`` run; the service then failed
    "kv.directory: cannot use .../b8/b8f1....high: Permission denied"), and a kv.directory outside the folders
    the unit may write (the service failed "Read-only file system"). And what else the unit's sandbox takes: a
    store or socket under /tmp (PrivateTmp=) or /home (ProtectHome=, a read file too), a socket group the user
    is not in, a port below 1024, a venv whose Python is under /home, a Redis socket the daemon cannot reach, the
    KV codec under MemoryDenyWriteExecute=yes. Warnings: the unit may change before the start, and the service
    may run on another host than this check."""
    who = _daemon_user()
    if who is None:
        return []
    out: list[str] = []
    user = f"the {who.name} user the systemd unit runs the daemon as"
    kv = cfg.kv
    sandboxed = None
    if kv.enabled and kv.backend == "local":
        sandboxed = _sandbox_tmp_or_home("kv.directory", kv.directory, "the store's start",
                                         STATE_DIRECTORY / "kv")
        if sandboxed is not None:
            out.append(sandboxed)
    if kv.enabled and kv.backend == "local" and sandboxed is None and not _in_private_tmp(kv.directory):
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
    if kv.enabled:
        out += _redis_socket_warnings(kv.redis_url if kv.backend == "redis" else None, who)
        wx = _memory_deny_write_execute_warning()
        if wx is not None:
            out.append(wx)
    sockets = [("ingest.socket", cfg.ingest.socket)]
    if kv.enabled:
        sockets.append(("kv.ingest_socket", kv.ingest_socket))
    for setting, sock in sockets:
        if sock is None:
            continue
        sandboxed = _sandbox_tmp_or_home(setting, sock, "making the socket", RUNTIME_DIRECTORY / sock.name)
        if sandboxed is not None:
            out.append(sandboxed)
            continue
        if _in_private_tmp(sock):
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
    # files the daemon reads that config.security_warnings does not name: the unit's view of them too
    read = [(f"upstreams[{i}].ca_file", up.options.get("ca_file")) for i, up in enumerate(cfg.upstreams)]
    if cfg.marking.policy == "swiftqueue":
        read.append(("marking.model", cfg.marking.model))
    for setting, path in read:
        problem = unreadable_by_daemon(Path(path)) if path is not None else None
        if problem is not None:
            out.append(f"{setting}: {problem}")
    out += _group_warnings(cfg, who) + _port_warnings(cfg)
    interpreter = _interpreter_warning()
    return out if interpreter is None else [*out, interpreter]
