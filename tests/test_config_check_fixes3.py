"""``config check`` run as root names what the systemd unit's user (``tokenwire``, here ``nobody``) cannot use:
a configuration or key behind a folder that user cannot enter, a KV store holding root's folders and files (a
``sudo tokenwire daemon`` run), a socket folder it cannot write, and a kv.directory outside the unit's writable
paths (ProtectSystem=strict). Each said "ok", and the service then failed at start (probe /tmp/xp/s27/pA)."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tokenwire.daemon import unit_access
from tokenwire.daemon.config import parse_config
from tokenwire.daemon.config_warnings import security_warnings

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="config check reads as the daemon's user only as root")


@pytest.fixture
def base(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder ``nobody`` may enter (pytest's tmp_path is under a 0700 root folder), standing in for the unit's
    StateDirectory=, RuntimeDirectory= and unit folders; ``nobody`` plays the unit's user."""
    root = Path(tempfile.mkdtemp(prefix="tw-check3-", dir="/tmp"))
    root.chmod(0o755)
    for name in ("state", "run", "units"):
        (root / name).mkdir()
    monkeypatch.setattr(unit_access, "DAEMON_USER", "nobody")  # (tokenwire on a real install)
    monkeypatch.setattr(unit_access, "STATE_DIRECTORY", root / "state")
    monkeypatch.setattr(unit_access, "RUNTIME_DIRECTORY", root / "run")
    monkeypatch.setattr(unit_access, "UNIT_DIRS", (root / "units",))
    monkeypatch.setattr(unit_access, "PRIVATE_TMP", ())  # this test's files are under the host's /tmp
    try:
        yield root
    finally:
        shutil.rmtree(root)


def _nobody() -> tuple[int, int]:
    user = pwd.getpwnam("nobody")
    return user.pw_uid, user.pw_gid


def _give(path: Path, mode: int, owner: tuple[int, int] | None = None) -> Path:
    os.chown(path, *(owner or _nobody()))
    path.chmod(mode)
    return path


def _store(base: Path, name: str = "kv") -> Path:
    """A kv.directory in the StateDirectory= stand-in, both the user's (as systemd and tmpfiles make them)."""
    _give(base / "state", 0o700)
    kv = base / "state" / name
    kv.mkdir()
    _give(kv, 0o700)
    return kv


def _kv(directory: Path, **more: object) -> dict[str, object]:
    return {"kv": {"enabled": True, "directory": str(directory), **more}}


def _tls(path: Path) -> dict[str, object]:
    return {"server": {"private_key": str(path), "certificate": str(path)}}  # (read as the user, not parsed)


def _notes(table: dict[str, object], config_path: Path | None = None, prefix: str = "") -> list[str]:
    return [w for w in security_warnings(parse_config(table), config_path) if w.startswith(prefix)]


# ------------------------------------------------------------------------------ 1: folders the user cannot enter
@needs_root
def test_a_configuration_behind_a_folder_the_user_cannot_enter_is_named(base, capsys):
    """/etc/tokenwire 0750 root:root (repro_confdir.sh): the user's own 0600 file in it passed, and the daemon as
    tokenwire failed "cannot read: Permission denied". Its group's members (supplementary groups included) may."""
    from tokenwire.daemon.cli import main

    etc = base / "etc"
    etc.mkdir()
    _give(etc, 0o750, (0, 0))
    path = etc / "tokenwire.toml"
    path.write_text('[server]\nlisten = ["127.0.0.1:0"]\n')
    _give(path, 0o600)
    assert main(["config", "check", str(path)]) == 0
    err = capsys.readouterr().err
    assert (f"warning: configuration: {path} cannot be read by the nobody user the systemd unit runs the daemon "
            f"as: its folder {etc} (owner root:root, mode 0750) does not let that user in: chgrp nogroup {etc} && "
            f"chmod g+x {etc}") in err
    os.chown(etc, 0, _nobody()[1])  # as systemd/tokenwire.tmpfiles makes it: 0750 root:tokenwire
    assert main(["config", "check", str(path)]) == 0
    assert "cannot be read" not in capsys.readouterr().err


@needs_root
def test_a_supplementary_group_opens_the_folder_and_a_link_is_followed(base, monkeypatch):
    """The user's groups are its initgroups list (the unit's supplementary groups), not its own group alone;
    a path through a link is checked where the link leads too."""
    closed = base / "closed"
    closed.mkdir()
    _give(closed, 0o750, (0, 4242))
    key = closed / "key.pem"
    key.write_text("secret")
    _give(key, 0o600)
    link = base / "key-link.pem"
    link.symlink_to(key)
    for path in (key, link):
        [note] = _notes(_tls(path), prefix="server.private_key")
        assert note == (f"server.private_key: {path} cannot be read by the nobody user the systemd unit runs the "
                        f"daemon as: its folder {closed} (owner root:4242, mode 0750) does not let that user in: "
                        f"chgrp nogroup {closed} && chmod g+x {closed}")
    monkeypatch.setattr(os, "getgrouplist", lambda user, gid: [gid, 4242])
    assert _notes(_tls(link), prefix="server.private_key") == []


@needs_root
def test_the_owner_bits_alone_apply_to_the_owner(base):
    """The kernel reads the owner's bits for the owner: 0044 of its own is unreadable by it though others may
    read it (it passed: any of the three classes' read bits did)."""
    key = base / "key.pem"
    key.write_text("secret")
    _give(key, 0o044)
    assert [w for w in _notes(_tls(key), prefix="server.private_key") if "cannot be read" in w] == [
        f"server.private_key: {key} cannot be read by the nobody user the systemd unit runs the daemon as (owner "
        f"nobody:nogroup, mode 0044): chmod u+r {key}"]
    key.chmod(0o600)
    assert not [w for w in _notes(_tls(key)) if "cannot be read" in w]


# ---------------------------------------------------------------- 2: a store and socket folders left root's
@needs_root
def test_a_kv_store_holding_roots_folders_and_files_is_named_with_the_chown(base):
    """A `sudo tokenwire daemon` run left root's object folders and files in the store: config check said ok,
    the service failed "kv.directory: cannot use .../b8/b8f1....high: Permission denied"."""
    kv = _store(base)
    ok = kv / "aa"
    ok.mkdir()
    _give(ok, 0o700)
    (ok / "aa00.src").write_bytes(b"x")
    _give(ok / "aa00.src", 0o600)
    sub = kv / "b8"
    sub.mkdir(mode=0o755)
    (sub / "b8f1.high").write_bytes(b"x")
    (sub / "b8f1.high").chmod(0o600)
    [note] = _notes(_kv(kv), prefix="kv.directory")
    assert note == (f"kv.directory: {kv} holds what the nobody user the systemd unit runs the daemon as cannot "
                    f"write (the store's start or its puts fail with \"Permission denied\"): {sub} (owner "
                    f"root:root, mode 0755), {sub / 'b8f1.high'} (owner root:root, mode 0600): chown -R "
                    f"nobody:nogroup {kv}")
    for path in (sub, sub / "b8f1.high"):
        os.chown(path, *_nobody())
    assert _notes(_kv(kv), prefix="kv.directory") == []
    (kv / ".lock").touch(mode=0o600)  # the lock of a root run
    assert f"{kv / '.lock'} (owner root:root, mode 0600)" in _notes(_kv(kv), prefix="kv.directory")[0]


@needs_root
def test_the_store_look_stops_after_a_few_offenders_and_a_bounded_number_of_entries(base, monkeypatch):
    """A store may hold millions of objects: three offenders are named ("and more"), and at most KV_SCAN_LIMIT
    entries are examined, an even share of each object folder."""
    kv = _store(base)
    for name in ("a1", "b2"):
        (kv / name).mkdir()
        _give(kv / name, 0o700)
        for i in range(6):
            (kv / name / f"{name}{i}").write_bytes(b"x")  # root's
    [note] = _notes(_kv(kv), prefix="kv.directory")
    assert note.count("(owner root:root, mode") == 3 and " and more: chown -R nobody:nogroup" in note
    examined: list[Path] = []
    denied = unit_access._denied
    monkeypatch.setattr(unit_access, "_denied", lambda p, st, who, want: examined.append(p) or denied(p, st, who, want))
    monkeypatch.setattr(unit_access, "KV_SHOWN", 100)
    monkeypatch.setattr(unit_access, "KV_SCAN_LIMIT", 7)  # the store, its two folders, then two objects of each
    who = unit_access._daemon_user()
    assert who is not None
    found, cut = unit_access._kv_directory_offenders(kv, who)
    assert cut and len(examined) == 7 and [p.parent.name for p in examined[3:]] == ["a1", "a1", "b2", "b2"]
    assert len(found) == 4 and all("(owner root:root, mode" in f for f in found)
    assert "(in 7 entries checked): chown -R" in _notes(_kv(kv), prefix="kv.directory")[0]


@needs_root
def test_a_store_systemd_hands_over_at_start_is_not_named(base):
    """systemd chowns the StateDirectory= tree at start when the folder itself is not the user's (it does not
    descend into one that is): then root's files in it are no problem, nor is a store still to be made in it."""
    kv = _store(base)
    (kv / "b8").mkdir()
    new = base / "state" / "new"
    new.mkdir(mode=0o755)  # root's: the store's start cannot make kv in it
    os.chown(base / "state", 0, 0)
    assert _notes(_kv(kv), prefix="kv.directory") == []
    assert _notes(_kv(new / "kv"), prefix="kv.directory") == []
    os.chown(base / "state", *_nobody())
    assert "chown -R nobody:nogroup" in _notes(_kv(kv), prefix="kv.directory")[0]
    assert _notes(_kv(new / "kv"), prefix="kv.directory") == [
        f"kv.directory: {new / 'kv'} does not exist, and the nobody user the systemd unit runs the daemon as cannot "
        f"make it in {new} (owner root:root, mode 0755): install -d -o nobody -g nogroup -m 0700 {new / 'kv'}"]


@needs_root
def test_a_socket_folder_the_user_cannot_write_is_named(base):
    """The daemon makes its ingest sockets: in a folder of root's it cannot (a folder of the RuntimeDirectory=
    that is not the user's is handed over by systemd at start)."""
    _give(base / "run", 0o711)
    apps = base / "run" / "apps"
    apps.mkdir(mode=0o755)
    kv = _store(base)
    table = {"ingest": {"socket": str(apps / "ingest.sock")}, **_kv(kv, ingest_socket=str(apps / "kv.sock"))}
    notes = _notes(table)
    assert [n.split(": ", 1)[0] for n in notes if "cannot be made" in n] == ["ingest.socket", "kv.ingest_socket"]
    assert (f"ingest.socket: {apps / 'ingest.sock'} cannot be made by the nobody user the systemd unit runs the "
            f"daemon as: {apps} (owner root:root, mode 0755) is not writable by that user: chown nobody:nogroup "
            f"{apps}") in notes
    os.chown(apps, *_nobody())
    assert not [n for n in _notes(table) if "cannot be made" in n]
    os.chown(base / "run", 0, 0)  # the RuntimeDirectory= itself root's: systemd makes it the user's at start
    table = {"ingest": {"socket": str(base / "run" / "ingest.sock")}}
    assert _notes(table, prefix="ingest.socket") == []


# -------------------------------------------------------------------- 3: outside the unit's writable paths
@needs_root
def test_a_store_outside_the_units_writable_paths_names_the_drop_in(base):
    """ProtectSystem=strict leaves all but StateDirectory=, RuntimeDirectory= and ReadWritePaths= read-only: a
    kv.directory elsewhere passed, and the service failed "Read-only file system". A drop-in that adds the path
    ends the warning; a later empty ReadWritePaths= resets the list, as systemd does."""
    srv = base / "srv" / "kv"
    srv.mkdir(parents=True)
    _give(srv, 0o700)
    warned = (f"kv.directory: {srv} is outside {base / 'state'}, the systemd unit's StateDirectory=: under its "
              "ProtectSystem=strict the store's start fails with \"Read-only file system\"; add a drop-in "
              f"(systemctl edit tokenwire) with ReadWritePaths={srv} under [Service] (it must exist before the "
              f"start: install -d -o nobody -g nogroup -m 0700 {srv})")
    assert _notes(_kv(srv), prefix="kv.directory") == [warned]
    assert _notes(_kv(_store(base)), prefix="kv.directory") == []  # in the StateDirectory=
    unit = base / "units" / "tokenwire.service"
    unit.write_text("[Service]\nExecStart=/opt/tokenwire/bin/tokenwire daemon\n")
    dropins = base / "units" / "tokenwire.service.d"
    dropins.mkdir()
    (dropins / "kv.conf").write_text(f'[Service]\nReadWritePaths=-/nonexistent "{base / "srv"}"\n')
    assert _notes(_kv(srv), prefix="kv.directory") == []
    (dropins / "zz-reset.conf").write_text("[Service]\nReadWritePaths=\n")
    assert _notes(_kv(srv), prefix="kv.directory") == [warned]
    (dropins / "zz-reset.conf").write_text(f"[Install]\nReadWritePaths={srv}\n[Service]\nReadWritePaths=\n"
                                           f"ReadWritePaths = {srv}\n")  # only [Service] counts
    assert _notes(_kv(srv), prefix="kv.directory") == []


@needs_root
def test_a_socket_outside_the_runtime_directory_names_the_drop_in(base):
    apps = base / "apps"
    apps.mkdir()
    _give(apps, 0o755)
    [note] = _notes({"ingest": {"socket": str(apps / "ingest.sock")}}, prefix="ingest.socket")
    assert note.startswith(f"ingest.socket: {apps / 'ingest.sock'} is outside {base / 'run'}, the systemd unit's "
                           "RuntimeDirectory=") and f"ReadWritePaths={apps} under [Service]" in note


# --------------------------------------------------------------------------------- not as root, no such user
def test_nothing_is_said_without_root_or_without_the_units_user(tmp_path, monkeypatch):
    """Not run as root (it may not see the files) or on a system without the unit's user (not the service's
    host): nothing of these checks, as before."""
    kv = tmp_path / "kv"
    (kv / "b8").mkdir(parents=True)
    table = {**_kv(kv), "ingest": {"socket": str(tmp_path / "ingest.sock")}}
    monkeypatch.setattr(unit_access, "PRIVATE_TMP", ())
    monkeypatch.setattr(unit_access, "DAEMON_USER", "tokenwire-test-no-such-user")
    assert security_warnings(parse_config(table)) == []
    monkeypatch.setattr(unit_access, "DAEMON_USER", "nobody")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert security_warnings(parse_config(table)) == []


def test_the_units_read_write_paths_are_read_as_systemd_reads_them(tmp_path, monkeypatch):
    """The first unit file found, then each drop-in name once (the first folder's wins), in name order; quotes,
    "-" and "+" prefixes and a system unit's path specifiers; an empty assignment resets the list."""
    etc, lib = tmp_path / "etc", tmp_path / "lib"
    monkeypatch.setattr(unit_access, "UNIT_DIRS", (etc, lib))
    assert unit_access._unit_read_write_paths() is None  # no unit installed
    for folder in (etc, lib):
        (folder / "tokenwire.service.d").mkdir(parents=True)
    (lib / "tokenwire.service").write_text("[Service]\nReadWritePaths=/from-lib-unit\n")
    (lib / "tokenwire.service.d" / "a.conf").write_text("[Service]\nReadWritePaths=/overridden\n")
    (etc / "tokenwire.service.d" / "a.conf").write_text('[Service]\nReadWritePaths=-/srv/a "/srv/b c"\n')
    (lib / "tokenwire.service.d" / "b.conf").write_text("[Service]\nReadWritePaths=+%S/tokenwire-kv\n")
    assert unit_access._unit_read_write_paths() == [Path("/from-lib-unit"), Path("/srv/a"), Path("/srv/b c"),
                                               Path("/var/lib/tokenwire-kv")]
    (etc / "tokenwire.service").write_text("[Service]\nReadWritePaths=/from-etc-unit\n")  # /etc's unit wins
    (etc / "tokenwire.service.d" / "c.conf").write_text("[Service]\nReadWritePaths=\nReadWritePaths=/last\n")
    assert unit_access._unit_read_write_paths() == [Path("/last")]


@needs_root
def test_a_client_ca_the_user_cannot_read_is_named(base):
    """The daemon loads server.client_ca at start and at each reload as well: a root 0600 bundle passed."""
    ca = base / "clients.pem"
    ca.write_text("bundle")
    ca.chmod(0o600)
    assert _notes({"server": {"client_ca": str(ca)}}, prefix="server.client_ca") == [
        f"server.client_ca: {ca} cannot be read by the nobody user the systemd unit runs the daemon as (owner "
        f"root:root, mode 0600): chown nobody:nogroup {ca}"]
    os.chown(ca, *_nobody())
    assert _notes({"server": {"client_ca": str(ca)}}, prefix="server.client_ca") == []
