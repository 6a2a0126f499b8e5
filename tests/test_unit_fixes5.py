"""The daemon as the systemd unit runs it (probe /tmp/xp/s29/pD): a refused [kv] start that failed only after the
codec's warm-up (the unit then restarted for ever), numba's debug flood, and what ``config check`` did not say of
the unit's sandbox (PrivateTmp=, ProtectHome=, socket groups, ports below 1024, a drop-in's StateDirectory=)."""

from __future__ import annotations

import asyncio
import errno
import grp
import io
import logging
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tokenwire.daemon import kv_runtime, logs, startup, unit_access, unix_sockets
from tokenwire.daemon.config import parse_config
from tokenwire.daemon.config_warnings import security_warnings
from tokenwire.daemon.startup import StartupError

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "tokenwire.service"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="config check reads as the daemon's user only as root")


def _taken_udp_port() -> tuple[socket.socket, int]:
    """A UDP port on 127.0.0.1 held by this test (as an old instance held kv.listen's)."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    return holder, holder.getsockname()[1]


def _kv_config(tmp_path: Path, **kv: object):
    table = {"enabled": True, "listen": "127.0.0.1:0", "directory": str(tmp_path / "kv"), "forecaster": "ewma", **kv}
    return parse_config({"kv": table}, tmp_path / "tw.toml").kv


def _record_warm_ups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The warm-ups start_kv begins, in order (stubbed: the subject is what comes before them)."""
    began: list[str] = []

    async def codec() -> None:
        began.append("codec")

    async def forecaster(kind: str) -> bool:
        began.append("forecaster")
        return True

    monkeypatch.setattr(kv_runtime, "warm_up_codec", codec)
    monkeypatch.setattr(kv_runtime, "warm_up_forecaster", forecaster)
    return began


# ------------------------------------------------------------------ 1: every refusal before the [kv] warm-up
def test_a_kv_port_in_use_refuses_the_start_before_any_warm_up(tmp_path, monkeypatch):
    """kv.listen was bound after the codec's compile and the forecaster's load: a port in use failed the start
    6-8 s in, and with RestartSec=2 the unit never reached its start limit."""
    began = _record_warm_ups(monkeypatch)
    holder, port = _taken_udp_port()
    with holder, pytest.raises(StartupError, match=rf"kv\.listen: cannot listen on udp/127\.0\.0\.1:{port}: "
                                                   "Address already in use"):
        asyncio.run(kv_runtime.start_kv(_kv_config(tmp_path, listen=f"127.0.0.1:{port}")))
    assert began == []


@pytest.mark.parametrize("setting", ["group", "path"])
def test_a_bad_kv_ingest_socket_refuses_the_start_before_any_warm_up(tmp_path, monkeypatch, setting):
    began = _record_warm_ups(monkeypatch)
    kv = (_kv_config(tmp_path, ingest_socket=str(tmp_path / "kv.sock"), ingest_socket_group="tw-fixes5-no-group")
          if setting == "group" else _kv_config(tmp_path, ingest_socket=str(tmp_path / "missing" / "kv.sock")))
    with pytest.raises(StartupError, match=r"kv\.ingest_socket: cannot listen on"):
        asyncio.run(kv_runtime.start_kv(kv))
    assert began == []
    assert not (tmp_path / "kv.sock").exists()


def test_the_warm_ups_come_after_the_port_and_socket_and_a_failed_one_frees_them(tmp_path, monkeypatch):
    """Bound before the warm-up, the port and the socket are given back when it fails (a refused JIT)."""
    events: list[str] = []
    sock = tmp_path / "kv.sock"

    async def codec() -> None:
        events.append(f"codec: socket {'there' if sock.is_socket() else 'missing'}")
        raise StartupError("kv: the KV codec cannot compile or run its kernels")

    monkeypatch.setattr(kv_runtime, "warm_up_codec", codec)
    holder, port = _taken_udp_port()
    holder.close()  # (free again: the start binds it)
    with pytest.raises(StartupError, match="cannot compile"):
        asyncio.run(kv_runtime.start_kv(_kv_config(tmp_path, listen=f"127.0.0.1:{port}", ingest_socket=str(sock))))
    assert events == ["codec: socket there"]
    assert not sock.exists()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind(("127.0.0.1", port))  # released: the next start can bind it


def test_fetches_during_the_warm_up_plan_with_ewma_then_the_configured_forecaster(tmp_path, monkeypatch):
    """The port is open during the warm-up: a fetch then must not load onnxruntime on the event loop."""
    made: list[kv_runtime.KVRuntime] = []
    seen: list[str] = []
    real_runtime = kv_runtime.KVRuntime

    def runtime(*args, **kwargs):  # type: ignore[no-untyped-def]
        made.append(real_runtime(*args, **kwargs))
        return made[-1]

    async def codec() -> None:
        seen.append(made[0].server.tuning.forecaster)

    async def forecaster(kind: str) -> bool:
        return True

    monkeypatch.setattr(kv_runtime, "KVRuntime", runtime)
    monkeypatch.setattr(kv_runtime, "warm_up_codec", codec)
    monkeypatch.setattr(kv_runtime, "warm_up_forecaster", forecaster)

    async def go() -> str:
        started = await kv_runtime.start_kv(_kv_config(tmp_path, forecaster="onnx"))
        try:
            return started.server.tuning.forecaster
        finally:
            started.close()

    assert asyncio.run(go()) == "onnx"
    assert seen == ["ewma"]


def test_a_daemon_whose_kv_port_is_taken_exits_2_before_the_codec_warm_up(tmp_path):
    """The whole daemon, as the unit starts it: the error comes, and no line of the warm-up before it."""
    holder, port = _taken_udp_port()
    config = tmp_path / "tokenwire.toml"
    config.write_text(textwrap.dedent(f"""
        [server]
        listen = ["127.0.0.1:0"]
        [metrics]
        listen = ""
        [kv]
        enabled = true
        listen = "127.0.0.1:{port}"
        directory = "{tmp_path / 'kv'}"
        """))
    with holder:
        out = subprocess.run([sys.executable, "-m", "tokenwire.daemon.cli", "daemon", "--config", str(config)],
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")})
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert f"kv.listen: cannot listen on udp/127.0.0.1:{port}: Address already in use" in text
    assert "KV codec" not in text and "KV forecaster" not in text, text
    assert not (tmp_path / "numba").exists()  # nothing compiled


def test_the_units_start_limit_is_reached_by_a_slow_refused_start():
    """systemd leaves the unit failed once StartLimitBurst + 1 starts fall within StartLimitIntervalSec: each
    cycle (a refused start plus RestartSec) must be shorter than interval / burst. At 60 s / 10, a start refused
    after the warm-up (6-8 s) restarted for ever; the slowest refusal left, a codec whose compile fails (~10 s on
    2 cores), must fit with room for a slower machine."""
    text = UNIT.read_text()
    unit_section = text.split("[Service]")[0]
    interval = int(re.search(r"^StartLimitIntervalSec=(\d+)$", unit_section, re.M).group(1))  # type: ignore[union-attr]
    burst = int(re.search(r"^StartLimitBurst=(\d+)$", unit_section, re.M).group(1))  # type: ignore[union-attr]
    restart = float(re.search(r"^RestartSec=(\d+)$", text, re.M).group(1))  # type: ignore[union-attr]
    slowest_refused_start = 15.0
    assert interval / burst > slowest_refused_start + restart
    assert f"180/{burst} = {interval // burst} s" in text  # the comment's arithmetic is the unit's


# ------------------------------------------------------------------------- cosmetic: the warm-up's time
def test_the_codec_ready_line_times_the_whole_wait(caplog):
    """warm_up()'s own figure left out importing torch and numba: "ready (0.5 s)" came 3.9 s after "compiling"."""
    ticks = iter([100.0, 103.9])
    with caplog.at_level(logging.INFO, logger="tokenwire.kv"):
        asyncio.run(kv_runtime.warm_up_codec(lambda: 0.5, clock=lambda: next(ticks)))
    assert "KV codec ready (3.9 s to compile or load its kernels)" in caplog.text


def test_the_forecaster_ready_line_times_the_whole_wait(caplog):
    ticks = iter([10.0, 10.5])
    with caplog.at_level(logging.INFO, logger="tokenwire.kv"):
        assert asyncio.run(kv_runtime.warm_up_forecaster("onnx", lambda kind: 0.01, clock=lambda: next(ticks)))
    assert "KV forecaster ready (0.50 s" in caplog.text


# ------------------------------------------------------------------- 2: other libraries' debug records
@pytest.fixture
def daemon_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """The daemon's log handler on a buffer; the loggers and the library rule as they were, after."""
    root = logging.getLogger()
    names = ("", "numba", "numba.core.ssa", "quic", "tw-fixes5-lib")
    levels = {n: logging.getLogger(n).level for n in names}
    handlers = root.handlers[:]
    rule = logs.library_records.floor, logs.library_records.named, set(logs._levelled)
    monkeypatch.delenv(logs.LIBRARY_LOGGERS_ENV, raising=False)
    try:
        yield io.StringIO()
    finally:
        root.handlers[:] = handlers
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
        logs.library_records.floor, logs.library_records.named, levelled = rule
        logs._levelled.clear()
        logs._levelled.update(levelled)


def _log_all() -> None:
    logging.getLogger("numba.core.ssa").debug("ssa internals")
    logging.getLogger("numba.core.byteflow").info("bytecode dump")
    lib = logging.getLogger("tw-fixes5-lib")
    lib.setLevel(logging.DEBUG)  # a library that gives its logger a level of its own
    lib.debug("lib debug")
    lib.warning("lib warning")
    logging.getLogger("tokenwire.kv").debug("own debug")


def test_debug_level_leaves_other_libraries_at_warning(daemon_log):
    """[logging] level = "debug" with [kv]: numba's compiler wrote ~16,000 lines in 4 s, past journald's rate
    limit, which then dropped the daemon's own lines."""
    logs.setup_logging("debug", "text", stream=daemon_log)
    _log_all()
    text = daemon_log.getvalue()
    assert "own debug" in text and "lib warning" in text
    assert "ssa internals" not in text and "bytecode dump" not in text and "lib debug" not in text
    assert not logging.getLogger("numba.core.ssa").isEnabledFor(logging.DEBUG)  # not even made: numba's cost


def test_a_library_the_operator_names_follows_the_level(daemon_log, monkeypatch):
    monkeypatch.setenv(logs.LIBRARY_LOGGERS_ENV, "numba.core.ssa, tw-fixes5-lib")
    logs.setup_logging("debug", "text", stream=daemon_log)
    _log_all()
    text = daemon_log.getvalue()
    assert "ssa internals" in text and "lib debug" in text and "own debug" in text
    assert "bytecode dump" not in text  # (numba.core.byteflow was not named)
    monkeypatch.delenv(logs.LIBRARY_LOGGERS_ENV)
    logs.set_log_level("debug")  # (the variable is read whenever the level is set)
    logging.getLogger("numba.core.ssa").debug("after the reload")
    assert "after the reload" not in daemon_log.getvalue()


# --------------------------------------------------------------------------- 6: ports below 1024
def test_a_refused_low_port_names_the_capability_drop_in(monkeypatch):
    refused = OSError(errno.EACCES, "Permission denied")
    message = str(startup.cannot_listen("server.listen", refused, "::", 443))
    assert message.startswith("server.listen: cannot listen on udp/[::]:443: Permission denied (")
    assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" in message
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in message
    assert "CAP_NET_BIND_SERVICE" not in str(startup.cannot_listen("kv.listen", refused, "::", 8443))
    in_use = OSError(errno.EADDRINUSE, "Address already in use")
    assert "CAP_NET_BIND_SERVICE" not in str(startup.cannot_listen("server.listen", in_use, "::", 443))
    # uvloop's error has no errno: the bind is tried again to learn it
    monkeypatch.setattr(startup, "_bind_error", lambda exc, host, port, tcp: (errno.EACCES, "Permission denied"))
    assert "AmbientCapabilities" in str(startup.cannot_listen("metrics.listen", OSError("could not bind"), "::1",
                                                              80, tcp=True))


def test_the_unprivileged_port_start_is_the_hosts(tmp_path, monkeypatch):
    sysctl = tmp_path / "ip_unprivileged_port_start"
    monkeypatch.setattr(startup, "UNPRIVILEGED_PORT_START", sysctl)
    assert startup.unprivileged_port_start() == 1024  # unreadable: the kernel's default
    sysctl.write_text("0\n")
    assert startup.unprivileged_port_start() == 0


# ------------------------------------------------------------------------- config check (unit_access)
@pytest.fixture
def base(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """As tests/test_config_check_fixes3.py's: ``nobody`` plays the unit's user, folders under a fresh one stand
    in for the unit's directories, /tmp (PrivateTmp=) and /home (ProtectHome=); no unit installed at first."""
    root = Path(tempfile.mkdtemp(prefix="tw-fixes5-", dir="/tmp"))
    root.chmod(0o755)
    for name in ("state", "run", "units", "tmp", "home", "varlib"):
        (root / name).mkdir()
    monkeypatch.setattr(unit_access, "DAEMON_USER", "nobody")
    monkeypatch.setattr(unit_access, "STATE_DIRECTORY", root / "state")
    monkeypatch.setattr(unit_access, "RUNTIME_DIRECTORY", root / "run")
    monkeypatch.setattr(unit_access, "UNIT_DIRS", (root / "units",))
    monkeypatch.setattr(unit_access, "PRIVATE_TMP", (root / "tmp",))
    monkeypatch.setattr(unit_access, "PROTECTED_HOME", (root / "home",))
    monkeypatch.setitem(unit_access._UNIT_DIRECTORY_ROOTS, "StateDirectory", root / "varlib")
    monkeypatch.setattr(startup, "unprivileged_port_start", lambda: 1024)
    try:
        yield root
    finally:
        shutil.rmtree(root)


def _notes(table: dict[str, object], prefix: str = "") -> list[str]:
    return [w for w in security_warnings(parse_config(table)) if w.startswith(prefix)]


def _dropin(base: Path, text: str, name: str = "override.conf") -> None:
    folder = base / "units" / "tokenwire.service.d"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(f"[Service]\n{text}\n")


@needs_root
def test_a_store_or_socket_under_private_tmp_is_named(base):
    """PrivateTmp=yes: the service's /tmp is its own, so applications got ENOENT for a socket there, and a store
    there was emptied at each restart; config check skipped them."""
    tmp = base / "tmp"
    table = {"ingest": {"socket": str(tmp / "ingest.sock")},
             "kv": {"enabled": True, "directory": str(tmp / "kv"), "ingest_socket": str(tmp / "kv.sock")}}
    notes = [n for n in _notes(table) if "PrivateTmp" in n]
    assert [n.split(": ", 1)[0] for n in notes] == ["kv.directory", "ingest.socket", "kv.ingest_socket"]
    assert notes[0] == (f"kv.directory: {tmp / 'kv'} is under {tmp}, which the systemd unit's PrivateTmp=yes makes "
                        "the service's own, empty at each start: the KV store is lost at every restart, and no "
                        f"other process sees it; put it in {base / 'state'} (e.g. {base / 'state' / 'kv'})")
    assert "No such file or directory" in notes[1] and f"e.g. {base / 'run' / 'ingest.sock'}" in notes[1]
    _dropin(base, "PrivateTmp=no")  # (the unit's own choice: not this check's to warn of)
    (base / "units" / "tokenwire.service").write_text("[Service]\nPrivateTmp=yes\n")
    assert len([n for n in _notes(table) if "PrivateTmp" in n]) == 0


@needs_root
def test_files_stores_and_sockets_under_protect_home_are_named(base):
    """ProtectHome=yes hides /home, /root and /run/user: a certificate there passed the check and the daemon
    exited 2 "Permission denied"."""
    alice = base / "home" / "alice"
    alice.mkdir(mode=0o755)
    for name in ("cert.pem", "key.pem", "api.key"):
        (alice / name).write_text("x")
        (alice / name).chmod(0o600)
        os.chown(alice / name, *_nobody())
    table = {"server": {"certificate": str(alice / "cert.pem"), "private_key": str(alice / "key.pem")},
             "ingest": {"socket": str(alice / "ingest.sock")},
             "kv": {"enabled": True, "directory": str(alice / "kv")},
             "upstreams": [{"name": "vllm", "type": "openai", "base_url": "http://127.0.0.1:8000/v1",
                            "api_key_file": str(alice / "api.key")}],
             "routes": [{"model": "*", "upstream": "vllm"}]}
    notes = [n for n in _notes(table) if "ProtectHome=yes" in n]
    assert sorted(n.split(": ", 1)[0] for n in notes) == [
        "ingest.socket", "kv.directory", "server.certificate", "server.private_key", "upstreams[0].api_key_file"]
    [cert] = [n for n in notes if n.startswith("server.certificate")]
    assert cert == (f"server.certificate: {alice / 'cert.pem'} is under {base / 'home'}, which the systemd unit's "
                    "ProtectHome=yes hides from the daemon: reading it fails with \"Permission denied\" (exit status "
                    "2); move it out of /home, /root and /run/user (e.g. to /etc/tokenwire, owned by nobody:nogroup)")
    assert not [n for n in _notes(table) if "ReadWritePaths" in n or "cannot be made" in n]  # not chmod/chown
    _dropin(base, "ProtectHome=read-only")
    (base / "units" / "tokenwire.service").write_text("[Service]\nProtectHome=yes\n")
    assert sorted(n.split(": ", 1)[0] for n in _notes(table) if "ProtectHome" in n) == [
        "ingest.socket", "kv.directory"]  # read-only: read files pass, what is written does not


@needs_root
def test_a_venv_whose_python_resolves_under_home_is_named(base, monkeypatch):
    """A venv made from pyenv's Python links to /home/.../.pyenv: ExecStart= failed with 203/EXEC."""
    pyenv = base / "home" / "alice" / ".pyenv" / "bin"
    pyenv.mkdir(parents=True)
    (pyenv / "python3.11").write_text("")
    venv = base / "opt" / "tokenwire" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").symlink_to(pyenv / "python3.11")
    monkeypatch.setattr(sys, "executable", str(venv / "python"))
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    [note] = _notes({}, prefix="ExecStart")
    assert note.startswith(f"ExecStart: this check runs on {venv / 'python'}, and {venv / 'python'} resolves to "
                           f"{pyenv / 'python3.11'}, under {base / 'home'}:")
    assert "ProtectHome=yes" in note and "203/EXEC" in note
    monkeypatch.setattr(sys, "executable", "/usr/bin/python3")
    assert _notes({}, prefix="ExecStart") == []


def _nobody() -> tuple[int, int]:
    user = pwd.getpwnam("nobody")
    return user.pw_uid, user.pw_gid


@needs_root
def test_a_socket_group_the_units_user_is_not_in_is_named(base):
    """Not root, the daemon cannot give its socket to a group it is not in, and refuses to start."""
    (base / "run").chmod(0o711)
    os.chown(base / "run", *_nobody())
    other = grp.getgrgid(0).gr_name  # (nobody is not in root's group)
    own = grp.getgrgid(_nobody()[1]).gr_name
    table = {"ingest": {"socket": str(base / "run" / "ingest.sock"), "socket_group": other},
             "kv": {"enabled": True, "directory": str(base / "state" / "kv"),
                    "ingest_socket": str(base / "run" / "kv.sock"), "ingest_socket_group": other}}
    notes = [n for n in _notes(table) if "not a member" in n]
    assert [n.split(": ", 1)[0] for n in notes] == ["ingest.socket_group", "kv.ingest_socket_group"]
    assert notes[0] == (f"ingest.socket_group: the nobody user the systemd unit runs the daemon as is not a member of "
                        f"group {other!r}: the daemon cannot give {base / 'run' / 'ingest.sock'} to it and refuses "
                        f"to start (systemd/tokenwire.sysusers: m nobody {other}, then systemd-sysusers)")
    table["ingest"]["socket_group"] = own  # type: ignore[index]
    assert [n.split(": ", 1)[0] for n in _notes(table) if "not a member" in n] == ["kv.ingest_socket_group"]
    _dropin(base, f"SupplementaryGroups={other}")
    assert not [n for n in _notes(table) if "not a member" in n]


@needs_root
def test_a_port_below_1024_is_named_until_the_drop_in_gives_the_capability(base, monkeypatch):
    table = {"server": {"listen": ["[::]:443", "[::]:8443"]}, "metrics": {"listen": "127.0.0.1:99"},
             "kv": {"enabled": True, "listen": "[::]:444", "directory": str(base / "state" / "kv")}}
    notes = [n for n in _notes(table) if "CAP_NET_BIND_SERVICE" in n]
    assert [n.split(": ", 1)[0] for n in notes] == ["server.listen", "kv.listen", "metrics.listen"]
    assert notes[0].startswith("server.listen: [::]:443: the systemd unit gives the daemon no capabilities")
    assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE and AmbientCapabilities=CAP_NET_BIND_SERVICE" in notes[0]
    _dropin(base, "AmbientCapabilities=CAP_NET_BIND_SERVICE")  # alone: refused past the empty bounding set
    (base / "units" / "tokenwire.service").write_text("[Service]\nCapabilityBoundingSet=\nAmbientCapabilities=\n")
    assert len([n for n in _notes(table) if "CAP_NET_BIND_SERVICE" in n]) == 3
    _dropin(base, "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\nAmbientCapabilities=CAP_NET_BIND_SERVICE")
    assert not [n for n in _notes(table) if "CAP_NET_BIND_SERVICE" in n]
    monkeypatch.setattr(startup, "unprivileged_port_start", lambda: 0)  # a host that lowered the sysctl
    shutil.rmtree(base / "units" / "tokenwire.service.d")
    assert not [n for n in _notes(table) if "CAP_NET_BIND_SERVICE" in n]


@needs_root
def test_a_drop_ins_state_directory_is_writable(base):
    """StateDirectory=tokenwire twkv made /var/lib/twkv the service's, yet a store there was told to add
    ReadWritePaths=."""
    twkv = base / "varlib" / "twkv"
    table = {"kv": {"enabled": True, "directory": str(twkv / "kv")}}
    (base / "units" / "tokenwire.service").write_text("[Service]\nStateDirectory=tokenwire\n")
    assert [n for n in _notes(table, prefix="kv.directory") if "ReadWritePaths" in n]
    _dropin(base, "StateDirectory=tokenwire twkv")
    assert _notes(table, prefix="kv.directory") == []  # (missing: systemd makes it, the user's, at start)
    _dropin(base, "StateDirectory=\nStateDirectory=tokenwire", name="zz.conf")  # an empty one resets the list
    assert [n for n in _notes(table, prefix="kv.directory") if "ReadWritePaths" in n]


# ------------------------------------------------------------------------ cosmetic: the group by name
def test_a_socket_folder_the_group_cannot_enter_names_the_group(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir(mode=0o750)
    os.chown(folder, -1, 0)
    problem = unix_sockets.folder_reach_problem(folder, 4242)
    assert problem is not None and f"group {grp.getgrgid(0).gr_name!r}" in problem
