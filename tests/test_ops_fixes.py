"""Operations: the systemd unit's sandbox, the install instructions, the example configuration, the KV codec's
start-up message, the daemon's sd_notify STATUS and the benchmarks' failure modes and metrics."""

from __future__ import annotations

import asyncio
import errno
import grp
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest

from tokenwire.daemon import config as config_mod
from tokenwire.daemon import config_values, upstream_config
from tokenwire.daemon.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "tokenwire.service"
EXAMPLE = ROOT / "systemd" / "tokenwire.toml.example"
README = ROOT / "README.md"


def _unit_lines() -> list[str]:
    """The unit's settings (comments left out)."""
    return [ln.strip() for ln in UNIT.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


# ------------------------------------------------------------------------------------------- the unit (1, 2, 7)
def test_unit_denied_system_calls_fail_with_eperm_instead_of_killing_the_daemon():
    """Without SystemCallErrorNumber= a filtered call (OpenBLAS's mbind, onnxruntime's sched_setaffinity, both
    @resources) is SIGSYS: the daemon died at start with [kv] or swiftqueue marking, and Restart= looped."""
    lines = _unit_lines()
    assert "SystemCallFilter=~@privileged @resources @mount" in lines
    assert "SystemCallErrorNumber=EPERM" in lines
    assert "mbind" in UNIT.read_text() and "sched_setaffinity" in UNIT.read_text()  # the comment says why


def test_unit_leaves_proc_cpuinfo_visible():
    """ProcSubset=pid hides /proc/cpuinfo: torch's fp16 conversion fails ("Failed to initialize cpuinfo!")."""
    lines = _unit_lines()
    assert not any(ln.startswith("ProcSubset=") for ln in lines)
    assert "ProtectProc=invisible" in lines
    assert "cpuinfo" in UNIT.read_text()


def test_low_ports_need_the_capability_in_the_bounding_set_too():
    lines = _unit_lines()
    assert "CapabilityBoundingSet=" in lines and "AmbientCapabilities=" in lines  # none by default
    unit, readme = UNIT.read_text(), README.read_text()
    for text in (unit, readme):
        assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" in text
        assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in text


# ----------------------------------------------------------------------------------------------- install (3)
def test_unit_runs_the_venv_under_opt_and_the_readme_installs_it_there():
    """Debian 12's system pip refuses `sudo pip install .` (PEP 668); a venv under /home or /root is hidden by
    ProtectHome=yes. The README installs into /opt/tokenwire and the unit runs that."""
    lines = _unit_lines()
    exec_start = next(ln for ln in lines if ln.startswith("ExecStart="))
    assert exec_start.startswith("ExecStart=/opt/tokenwire/bin/tokenwire daemon ")
    assert "ProtectHome=yes" in lines
    readme = README.read_text()
    for text in (UNIT.read_text(), readme):
        assert "/usr/local/bin/tokenwire" not in text
    assert "sudo pip install" not in readme.replace("refuses `sudo pip install`", "")
    assert "python3 -m venv /opt/tokenwire" in readme
    # every extra the README installs exists in pyproject.toml
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = re.findall(r"pip install '\.\[([a-z,-]+)\]'", readme)
    assert named and all(x in extras for group in named for x in group.split(","))
    assert "numba" in " ".join(extras["ml"]) and "torch" in " ".join(extras["ml"])  # what [kv] needs


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_with_the_opt_path_verifies(tmp_path):
    """`systemd-analyze verify` checks that ExecStart exists: the venv's tokenwire stands in for /opt's."""
    tokenwire = Path(sys.executable).with_name("tokenwire")
    unit = UNIT.read_text().replace("/opt/tokenwire/bin/tokenwire", str(tokenwire))
    path = tmp_path / "tokenwire.service"
    path.write_text(unit)
    out = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "tokenwire.service" not in out.stderr, out.stderr


# ------------------------------------------------------------------------------- the KV codec's start-up (2)
def _warm_up_error(exc: BaseException) -> str:
    from tokenwire.daemon.kv_runtime import warm_up_codec
    from tokenwire.daemon.startup import StartupError

    def fails() -> float:
        raise exc

    with pytest.raises(StartupError) as info:
        asyncio.run(warm_up_codec(fails))
    return str(info.value)


@pytest.mark.parametrize("exc", [
    # what llvmlite's check_jit_execution raises when mmap/mprotect(PROT_EXEC) is refused (seccomp, MDWE)
    PermissionError(errno.EPERM, "cannot allocate executable memory. This may be due to security restrictions "
                                 "on your system, such as SELinux or similar mechanisms."),
    RuntimeError("LLVM ERROR: mprotect failed"),
    OSError(errno.EPERM, "Operation not permitted"),
])
def test_kv_warm_up_blames_memory_deny_write_execute_for_refused_executable_memory(exc):
    msg = _warm_up_error(exc)
    assert msg.startswith("kv: the KV codec cannot compile") and "MemoryDenyWriteExecute=no" in msg
    assert str(exc) in msg


def test_kv_warm_up_reports_a_hidden_proc_cpuinfo_as_such():
    """Under ProcSubset=pid torch raised this, and the message sent the operator to MemoryDenyWriteExecute."""
    msg = _warm_up_error(RuntimeError("Failed to initialize cpuinfo!"))
    assert "Failed to initialize cpuinfo!" in msg and "/proc/cpuinfo" in msg
    assert "MemoryDenyWriteExecute" not in msg


@pytest.mark.parametrize("exc", [
    RuntimeError("numba: unsupported CPU"),
    ImportError("No module named 'numba'"),
    PermissionError(errno.EACCES, "Permission denied", "/var/lib/tokenwire/numba"),  # a file's, not W^X
])
def test_kv_warm_up_reports_other_failures_plainly(exc):
    msg = _warm_up_error(exc)
    assert f"{type(exc).__name__}: {exc}" in msg
    assert "MemoryDenyWriteExecute" not in msg and "/proc/cpuinfo" not in msg


# -------------------------------------------------------------------------------------- example config (4)
def _known_keys() -> dict[str, set[str]]:
    """Every section's known keys, as config.py declares them: recorded from ``Section`` while a document with
    every section parses, plus every upstream type's (``UPSTREAM_KEYS``) and [kv]'s (``kv_config.KEYS``)."""
    from tokenwire.daemon.kv_config import KEYS as KV_KEYS

    seen: dict[str, set[str]] = defaultdict(set)
    real_init = config_values.Section.__init__

    def recording(self, where, table, known):
        seen[re.sub(r"\[\d+\]", "", where)].update(known)
        real_init(self, where, table, known)

    doc = {
        "server": {}, "auth": {"tokens": [{"name": "a", "sha256": "0" * 64}]}, "limits": {}, "logging": {},
        "metrics": {}, "ingest": {}, "marking": {}, "kv": {},
        "upstreams": [{"name": "d", "type": "demo"}], "routes": [{"upstream": "d"}],
    }
    config_values.Section.__init__ = recording
    try:
        parse_config(doc)
    finally:
        config_values.Section.__init__ = real_init
    seen.pop("upstreams", None)  # recorded for the demo type only: every type's keys come from UPSTREAM_KEYS
    for kind, keys in upstream_config.UPSTREAM_KEYS.items():
        seen[f"upstreams:{kind}"] = set(keys)
    seen["kv"] |= set(KV_KEYS)
    return dict(seen)


def _example_keys(text: str) -> dict[str, set[str]]:
    """``{section: keys}`` of every ``key = value`` line of the example, commented out or not; the keys of an
    inline table under ``section.key``; upstream blocks under ``upstreams:<type>``."""
    out: dict[str, set[str]] = defaultdict(set)
    section, block, kind = "", set(), None

    def close_block() -> None:
        if section == "upstreams" and kind is not None:
            out[f"upstreams:{kind}"] |= block

    for raw in text.splitlines():
        line = raw.strip().lstrip("#").strip()
        header = re.match(r"\[\[?([a-z_.]+)\]\]?(\s|#|$)", line)
        if header:
            close_block()
            section, block, kind = header.group(1), set(), None
            out[""].add(section)
            continue
        m = re.match(r"([a-z][a-z0-9_]*)\s*=\s*(.*)", line)
        if not m:
            continue
        key, value = m.groups()
        out[section].add(key)
        block.add(key)
        if key == "type":
            kind = re.match(r'"([a-z]+)"', value).group(1)
        if value.startswith(("{", "[ {", "[{")):
            out[f"{section}.{key}"].update(re.findall(r"([a-z][a-z0-9_]*)\s*=", value.split("}")[0]))
    close_block()
    return dict(out)


def test_example_config_names_every_key():
    """README: the example documents every key. It had lost server.client_ca, the demo upstream's
    first_token_ms and max_tokens, openai's connect_timeout_s and extra_headers, the ingest upstream and three
    [kv] keys; this keeps it in step with config.py."""
    known, example = _known_keys(), _example_keys(EXAMPLE.read_text())
    sections = {"", "server", "limits", "marking", "kv", "upstreams:openai", "upstreams:ingest", "auth.tokens"}
    assert sections <= set(known)
    missing = []
    for section, keys in known.items():
        missing += [f"{section or 'top level'}: {k}" for k in sorted(keys - example.get(section, set()))]
    assert not missing, missing


def _uncommented(text: str) -> str:
    """The example with every commented-out ``key = value`` line and section header switched on."""
    out = []
    for raw in text.splitlines():
        if re.match(r"#\s?(\[\[?[a-z_]+\]\]?|[a-z][a-z0-9_]*\s*=)", raw):
            raw = re.sub(r"^#\s?", "", raw)
        out.append(raw)
    return "\n".join(out) + "\n"


def test_example_config_with_every_key_switched_on_validates(tmp_path):
    """Every commented value is a valid one. Two lines are alternatives of each other (marking.model is only
    for swiftqueue, which in turn needs congestion "prague"), so those two are set, and an upstream's ca_file
    is for an https base_url; example paths live in tmp_path (the CA file holds a certificate) and the token
    digest placeholder becomes a digest."""
    from tokenwire.transport.tls import make_self_signed

    text = _uncommented(EXAMPLE.read_text()).replace("/etc/tokenwire/", f"{tmp_path}/")
    text = text.replace("<64 hex digits>", "0" * 64)
    for name in re.findall(re.escape(str(tmp_path)) + r"/([\w.-]+)", text):
        (tmp_path / name).touch()
    doc = tomllib.loads(text)
    assert doc["marking"]["policy"] == "" and "model" in doc["marking"]
    doc["marking"]["policy"], doc["server"]["congestion"] = "swiftqueue", "prague"
    openai = next(u for u in doc["upstreams"] if u["type"] == "openai")
    openai["base_url"] = openai["base_url"].replace("http://", "https://")
    Path(openai["ca_file"]).write_bytes(make_self_signed().cert_pem)
    cfg = parse_config(doc, tmp_path / "tokenwire.toml")
    assert {u.type for u in cfg.upstreams} == {"demo", "openai", "ingest"}
    assert cfg.kv.enabled and cfg.server.client_ca == tmp_path / "clients.pem"
    assert cfg.upstreams[1].options["extra_headers"] and cfg.kv.decode_mbps == 400.0


# ----------------------------------------------------------------------------------- bench transport (5)
def test_transport_bench_divides_cpu_by_token_packets_not_ack_only_ones():
    """A Chatterbox server sends an ACK-only packet for most of the client's ack datagrams: 200 datagrams for
    100 token packets. Per packet, that halved its CPU cost and made it look cheaper than raw aioquic."""
    from tokenwire.transport.bench_transport import _figures

    server = {"tokens": 100, "datagrams": 200, "token_packets": 100, "cpu_s": 0.02, "wall_s": 1.0}
    client = {"tokens": 100, "datagrams": 210, "cpu_s": 0.01, "wall_s": 1.0}
    f = _figures(server, client, 100)
    assert f["server_us_per_packet"] == pytest.approx(200.0)  # 20 ms over 100 token packets, not 200 datagrams
    assert f["client_us_per_packet"] == pytest.approx(100.0)
    assert f["server_us_per_token"] == pytest.approx(200.0)
    assert f["server_token_packets"] == 100 and f["server_datagrams"] == 200


def test_transport_bench_ratios_are_per_token():
    from tokenwire.transport.bench_transport import _ratios

    raw = {"server_us_per_token": 100.0, "client_us_per_token": 50.0, "server_us_per_packet": 100.0,
           "client_us_per_packet": 50.0, "flood_packets_per_s": 1000.0, "flood_tokens_per_s": 9000.0}
    cb = {**raw, "server_us_per_token": 185.0, "client_us_per_token": 100.0, "server_us_per_packet": 185.0}
    r = _ratios({"raw": raw, "chatterbox": cb})["chatterbox"]
    assert r["server_cpu_per_token_vs_raw"] == pytest.approx(1.85)
    assert r["client_cpu_per_token_vs_raw"] == pytest.approx(2.0)
    assert r["server_cpu_per_token_packet_vs_raw"] == pytest.approx(1.85)
    assert "server_cpu_per_packet_vs_raw" not in r  # the ambiguous name is gone


def test_transport_bench_counts_token_packets_of_a_real_chatterbox_run():
    """The real server subprocess: paced tokens, one token packet each. The client's ack datagrams drew ACK-only
    packets, which are datagrams but not token packets; at 600 tokens/s every ACK now rides a token packet
    (transport/ack_timing.py), so the datagrams are as many as the token packets, and none of them is counted twice."""
    from tokenwire.transport.bench_transport import _one

    r = _one("chatterbox", 60, 600.0)
    assert r["tokens"] == 60
    assert 30 <= r["server_token_packets"] <= 120  # about one per token (repairs and busy-host batching vary it)
    assert r["server_token_packets"] <= r["server_datagrams"] <= r["server_token_packets"] + 5


# --------------------------------------------------------------------------------------- bench daemon (6)
def test_bench_daemon_sessions_bound_is_the_daemons():
    from tokenwire.daemon.bench_daemon import MAX_SESSIONS

    assert parse_config({"limits": {"max_sessions": MAX_SESSIONS}}).limits.max_sessions == MAX_SESSIONS
    with pytest.raises(ConfigError, match=r"limits\.max_sessions"):
        parse_config({"limits": {"max_sessions": MAX_SESSIONS + 1}})


def test_bench_daemon_refuses_more_sessions_than_the_daemon_allows(capsys):
    """1,000,000 sessions made the daemon refuse its config and the bench wait 30 s for a READY."""
    from tokenwire.daemon.cli import main

    t0 = time.monotonic()
    assert main(["bench", "daemon", "--sessions", "1000001", "--seconds", "1"]) == 2
    assert time.monotonic() - t0 < 5
    assert "--sessions must be in [1, 1,000,000] (the daemon's limits.max_sessions), got 1000001" in \
        capsys.readouterr().err


def _recording_popen(monkeypatch) -> list[subprocess.Popen]:
    from tokenwire.daemon import bench_daemon

    made: list[subprocess.Popen] = []
    real = subprocess.Popen

    def popen(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(bench_daemon.subprocess, "Popen", popen)
    return made


def test_bench_daemon_that_exits_before_ready_is_a_cli_error_at_once(tmp_path, monkeypatch):
    from tokenwire.daemon import bench_daemon
    from tokenwire.daemon.cli import CLIError

    made = _recording_popen(monkeypatch)
    script = "import sys; sys.stderr.write('config: no good\\n'); sys.exit(3)"
    monkeypatch.setattr(bench_daemon, "_daemon_command", lambda cfg: [sys.executable, "-c", script])
    t0 = time.monotonic()
    with pytest.raises(CLIError) as info:
        bench_daemon._start_daemon(tmp_path, 1, 20.0, 10)
    assert time.monotonic() - t0 < 10  # was a 30-s wait, then a TimeoutError traceback
    assert "exited with status 3" in str(info.value) and "config: no good" in str(info.value)
    assert made and made[0].returncode == 3


def test_bench_daemon_that_never_gets_ready_is_killed(tmp_path, monkeypatch):
    from tokenwire.daemon import bench_daemon
    from tokenwire.daemon.cli import CLIError

    made = _recording_popen(monkeypatch)
    monkeypatch.setattr(bench_daemon, "_daemon_command",
                        lambda cfg: [sys.executable, "-c", "import time; time.sleep(60)"])
    with pytest.raises(CLIError, match=r"did not report READY within 0\.5 s"):
        bench_daemon._start_daemon(tmp_path, 1, 20.0, 10, ready_timeout=0.5)
    assert made and made[0].poll() is not None  # killed and reaped, not left running


def test_bench_daemon_reads_the_port_of_an_ipv6_ready_status():
    from tokenwire.daemon.bench_daemon import _ready_port

    assert _ready_port("READY=1\nSTATUS=listening on udp/127.0.0.1:4711") == 4711
    assert _ready_port("READY=1\nSTATUS=listening on udp/[::1]:4712, udp/127.0.0.1:9") == 4712


# ---------------------------------------------------------------------------------------- sd_notify (8)
def _skip_without_ipv6_loopback() -> None:
    """Skip where [::1] cannot be bound (a host or container without IPv6 loopback), probed with plain sockets for
    both of the daemon's listeners: UDP (QUIC) and TCP (metrics)."""
    import socket

    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        try:
            with socket.socket(socket.AF_INET6, kind) as probe:
                probe.bind(("::1", 0))
        except OSError as exc:  # pragma: no cover - a host without IPv6 loopback
            pytest.skip(f"no [::1]: {exc}")


def test_status_keeps_the_listening_addresses_and_brackets_ipv6(tmp_path):
    """READY's STATUS named the addresses, replaced a second later by "0 sessions, ..."; IPv6 addresses read
    udp/:::53711 and http://::1:P/metrics."""
    from tokenwire.daemon.sd_notify import Notifier
    from tokenwire.daemon.service import Daemon

    class Recorder(Notifier):
        def __init__(self) -> None:
            super().__init__({})
            self.sent: list[dict] = []

        def send(self, **fields) -> bool:
            self.sent.append(fields)
            return True

    path = tmp_path / "d.toml"
    path.write_text('[server]\nlisten = ["[::1]:0"]\n[metrics]\nlisten = "[::1]:0"\n[logging]\nlevel = "error"\n')
    notifier = Recorder()

    async def run() -> str:
        daemon = Daemon(config_mod.load_config(path), notifier=notifier)
        try:
            await daemon.start()
            return daemon.status_line()
        finally:
            await daemon.stop()

    _skip_without_ipv6_loopback()  # only that: a failure of the daemon itself fails the test (it was a skip)
    periodic = asyncio.run(run())
    ready = next(f["status"] for f in notifier.sent if f.get("ready") == 1)
    assert re.search(r"^listening on udp/\[::1\]:\d+; metrics on http://\[::1\]:\d+/metrics$", ready), ready
    assert re.search(r"^listening on udp/\[::1\]:\d+; 0 sessions, 0 answers running, 0 retained$", periodic)


def test_a_connection_whose_sending_fails_is_closed_alone_and_the_upstream_is_not_blamed():
    """The listener runs inside the upstream's emit(): a connection whose packet path raised used to fail the
    answer as "upstream demo failed" for every listener. Now that connection closes and the others go on."""
    from tokenwire.daemon.config import parse_config
    from tokenwire.daemon.service import Daemon
    from tokenwire.daemon.transcripts import LiveRequest
    from tokenwire.transport.errors import ErrorCode

    class Session:
        def __init__(self):
            self.notified = 0
            self.requests: dict = {}  # (none open: the close that follows has none to report again)

        def notify(self, sid):
            self.notified += 1

    class Proto:
        def __init__(self, broken):
            self.broken, self.attached, self.peer = broken, {}, ("198.51.100.7", 9)
            self.server_session, self.closed = Session(), None

        def transmit(self):
            if self.broken:
                raise RuntimeError("packet path failed")

        transmit_soon = transmit  # (the daemon's is deferred to the loop: here the notify path's own guard)

        def close(self, code, reason):
            self.closed = code

    daemon = Daemon(parse_config({"metrics": {"listen": ""}}))
    live = LiveRequest(b"r" * 16, None, 100, 0.0)
    broken, healthy = Proto(True), Proto(False)
    daemon._attach(broken, 0, live)
    daemon._attach(healthy, 0, live)
    assert live.push("tokens", 1.0) == 1  # nothing raised into the upstream
    assert broken.closed == ErrorCode.INTERNAL and not broken.attached and len(live.listeners) == 1
    live.push(" more", 1.1)
    assert healthy.closed is None and healthy.server_session.notified == 2 and live.error is None


@pytest.mark.parametrize("broken", ["listener close", "drain"])
def test_a_stop_step_that_raises_neither_skips_the_rest_nor_leaves_the_daemon_running(caplog, broken):
    """A listener whose close raised (a connection's packet path failing inside it) ended stop() there: the
    upstreams stayed open and run() waited forever for _stopped; a second SIGTERM could not help."""
    from tokenwire.daemon.config import parse_config
    from tokenwire.daemon.service import Daemon

    closed = []

    async def go():
        daemon = Daemon(parse_config({"server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": "127.0.0.1:0"}}))
        await daemon.start()

        def broken_close():
            raise RuntimeError("close failed")

        if broken == "listener close":
            daemon._servers[0].close = broken_close
        else:  # the drain's own wait raised before it reached stop()
            daemon.streaming_count = broken_close
        for up in daemon.upstreams.values():
            real = up.close

            async def close(real=real, name=up.name):
                closed.append(name)
                await real()

            up.close = close
        daemon.on_stop_signal()  # SIGTERM: drain, then stop
        await asyncio.wait_for(daemon._stopped.wait(), 10)  # what run() waits for
        if broken == "listener close":  # the real close, which the broken one stood in for: its UDP socket was
            # left to the garbage collector, an "unclosed transport" ResourceWarning in whichever later test ran then
            listener = daemon._servers[0]
            del listener.close
            listener.close()
            await listener.wait_released()
        return daemon

    daemon = asyncio.run(go())
    assert closed == list(daemon.upstreams)  # the steps after the failing one ran
    assert ("stopping: closing a listener failed" if broken == "listener close" else "draining failed") \
        in caplog.text


# ------------------------------------------------- the unit under its own filter, and a start it refused (probe A)
def test_unit_allows_chown_again_after_denying_privileged_calls():
    """@privileged includes @chown: with socket_group = "tokenwire-ingest" (the documented layout) the daemon's
    chown(sock, -1, gid) failed with EPERM and it could not start under its own unit. A later allow list adds to
    the first (systemd.exec(5)), so @chown must come after the deny line."""
    lines = _unit_lines()
    deny = lines.index("SystemCallFilter=~@privileged @resources @mount")
    assert lines.index("SystemCallFilter=@chown") > deny


def test_unit_leaves_a_refused_start_failed_instead_of_restarting_it_for_ever():
    """Every start the daemon refuses exits 2; Restart=on-failure restarted it every ~3 s, under systemd's start
    limit of 5 in 10 s, so the unit never failed and logged the same error for ever. Not by
    RestartPreventExitStatus=2: an unreachable Redis or a port still held exit 2 too, and pass within seconds."""
    text = UNIT.read_text()
    unit_section = text.split("[Service]")[0]
    assert "StartLimitIntervalSec=180" in unit_section and "StartLimitBurst=10" in unit_section  # ([Unit] only)
    lines = _unit_lines()
    assert "Restart=on-failure" in lines and "RestartSec=2" in lines
    assert not any(ln.startswith("RestartPreventExitStatus=") for ln in lines)


def test_a_refused_chown_to_a_group_the_daemon_is_in_names_the_system_call_filter(tmp_path, monkeypatch):
    """It said "the daemon's user is not a member of it" of a user that was: the unit's filter had refused chown."""
    from tokenwire.daemon import unix_sockets

    def chown(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(unix_sockets.os, "chown", chown)
    mine = grp.getgrgid(os.getegid()).gr_name
    with pytest.raises(OSError) as info:
        unix_sockets.set_socket_access(tmp_path / "s.sock", mine, "ingest.socket_group")
    text = str(info.value)
    assert "although the daemon's user is a member of it: chown() was refused" in text
    assert "SystemCallFilter=@chown" in text and "not a member" not in text
