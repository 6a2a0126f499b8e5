"""``config check`` (run as root) and the systemd unit's sandbox, what the probe found it missed: files the daemon
reads under /tmp (PrivateTmp=), a Redis socket the service cannot reach, an enabled [kv] under
MemoryDenyWriteExecute=yes, and a drop-in's User=/Group=. Each passed, and the service then failed at start."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tokenwire.daemon import unit_access
from tokenwire.daemon.config import parse_config
from tokenwire.daemon.config_warnings import security_warnings

from .daemon_proc import PAIR

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="config check reads as the daemon's user only as root")


@pytest.fixture
def base(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Stand-ins for the unit's folders (``nobody`` plays its user) and for the /tmp its PrivateTmp= hides."""
    root = Path(tempfile.mkdtemp(prefix="tw-s31-", dir="/tmp"))
    root.chmod(0o755)
    for name in ("state", "run", "units", "tmp", "etc"):
        (root / name).mkdir()
        (root / name).chmod(0o755)
    monkeypatch.setattr(unit_access, "DAEMON_USER", "nobody")  # (tokenwire on a real install)
    monkeypatch.setattr(unit_access, "STATE_DIRECTORY", root / "state")
    monkeypatch.setattr(unit_access, "RUNTIME_DIRECTORY", root / "run")
    monkeypatch.setattr(unit_access, "UNIT_DIRS", (root / "units",))
    monkeypatch.setattr(unit_access, "PRIVATE_TMP", (root / "tmp",))
    try:
        yield root
    finally:
        shutil.rmtree(root)


def _unit(base: Path, text: str, dropin: str | None = None) -> None:
    (base / "units" / "tokenwire.service").write_text(f"[Service]\n{text}")
    if dropin is not None:
        (base / "units" / "tokenwire.service.d").mkdir(exist_ok=True)
        (base / "units" / "tokenwire.service.d" / "override.conf").write_text(f"[Service]\n{dropin}")


def _file(path: Path, mode: int = 0o644, gid: int = -1, text: str = "x") -> Path:
    path.write_text(text)
    path.chmod(mode)
    os.chown(path, -1, gid)
    return path


def _notes(table: dict[str, object], prefix: str, config_path: Path | None = None) -> list[str]:
    return [w for w in security_warnings(parse_config(table), config_path) if w.startswith(prefix)]


def test_files_the_daemon_reads_under_private_tmp_are_named(base):
    """A readable certificate, key, configuration or upstream CA in /tmp passed: the service's /tmp is its own,
    empty, and the start failed "No such file or directory". Named for each, unless the unit turns it off."""
    pem = _file(base / "tmp" / "tls.pem")
    ca = _file(base / "tmp" / "ca.pem", text=PAIR.cert_pem.decode())
    config = _file(base / "tmp" / "tokenwire.toml")
    table = {"server": {"certificate": str(pem), "private_key": str(pem)},
             "upstreams": [{"name": "u", "type": "openai", "base_url": "https://llm.example/v1",
                            "ca_file": str(ca)}],
             "routes": [{"model": "*", "upstream": "u"}]}
    notes = [w for w in security_warnings(parse_config(table), config) if "PrivateTmp=yes" in w]
    assert sorted(w.split(":")[0] for w in notes) == ["configuration", "server.certificate", "server.private_key",
                                                      "upstreams[0].ca_file"]
    assert all("No such file or directory" in w for w in notes)
    _unit(base, "PrivateTmp=yes\n", dropin="PrivateTmp=no\n")  # a drop-in lets the service see the host's /tmp
    assert not [w for w in security_warnings(parse_config(table), config) if "PrivateTmp" in w]


def test_a_redis_unix_socket_the_service_cannot_reach_is_named(base):
    """kv.redis_url = "unix:///tmp/.../redis.sock": under PrivateTmp= the service has no such socket; elsewhere
    the unit's user needs to enter its folders and write the socket to connect."""
    kv = {"enabled": True, "backend": "redis", "directory": str(base / "state" / "kv")}
    in_tmp = {"kv": {**kv, "redis_url": f"unix://{base / 'tmp' / 'redis.sock'}"}}
    [note] = _notes(in_tmp, "kv.redis_url")
    assert "PrivateTmp=yes" in note and "No such file or directory" in note
    folder = base / "etc" / "redis"
    folder.mkdir()
    sock_path = folder / "redis.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(sock_path))
        table = {"kv": {**kv, "redis_url": f"unix://{sock_path}"}}
        folder.chmod(0o700)  # root's, closed
        [note] = _notes(table, "kv.redis_url")
        assert "cannot be reached by the nobody user" in note and f"its folder {folder}" in note
        folder.chmod(0o755)
        sock_path.chmod(0o700)  # Redis's default unixsocketperm leaves others out
        [note] = _notes(table, "kv.redis_url")
        assert "may not be written by the nobody user" in note and "mode 0700" in note
        sock_path.chmod(0o777)
        assert _notes(table, "kv.redis_url") == []


def test_kv_under_memory_deny_write_execute_is_named_unless_a_drop_in_turns_it_off(base):
    """The shipped unit's MemoryDenyWriteExecute=yes refuses the KV codec's JIT: the daemon does not start, and
    config check said ok. The README's drop-in (MemoryDenyWriteExecute=no) ends the warning."""
    table = {"kv": {"enabled": True, "directory": str(base / "state" / "kv")}}
    [note] = _notes(table, "kv.enabled")  # no unit installed: the shipped unit's setting
    assert "MemoryDenyWriteExecute=yes" in note and "MemoryDenyWriteExecute=no" in note
    _unit(base, "MemoryDenyWriteExecute=yes\n")
    assert len(_notes(table, "kv.enabled")) == 1
    _unit(base, "MemoryDenyWriteExecute=yes\n", dropin="MemoryDenyWriteExecute=no\n")
    assert _notes(table, "kv.enabled") == []
    _unit(base, "MemoryDenyWriteExecute=yes\n", dropin="")  # (an empty drop-in changes nothing)
    assert _notes({"kv": {"enabled": False}}, "kv.enabled") == []  # no codec, no JIT


def test_a_drop_ins_user_and_group_are_the_ones_checked(base, monkeypatch):
    """User=tokenwire was hard-coded: a drop-in's User= was ignored (here the shipped user does not exist, and
    nothing was said at all); its Group= decides what a group-readable file means."""
    monkeypatch.setattr(unit_access, "DAEMON_USER", "tokenwire-test-no-such-user")
    key = _file(base / "etc" / "key.pem", 0o640, gid=1)  # root:daemon 0640
    table = {"server": {"certificate": str(key), "private_key": str(key)}}
    assert _notes(table, "server.certificate") == []  # the unit's user is not on this system: nothing to check
    _unit(base, "User=tokenwire-test-no-such-user\n", dropin="User=nobody\n")
    [note] = _notes(table, "server.certificate")
    assert "cannot be read by the nobody user" in note
    _unit(base, "User=tokenwire-test-no-such-user\n", dropin="User=nobody\nGroup=daemon\n")
    assert _notes(table, "server.certificate") == []  # nobody runs in group daemon now
    _unit(base, "User=tokenwire-test-no-such-user\n", dropin="User=65534\n")  # a uid works as well
    [note] = _notes(table, "server.certificate")
    assert "cannot be read by the nobody user" in note
