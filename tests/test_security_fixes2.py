"""Security fixes: the OpenAI upstream follows no redirect, `tokenwire cert` writes the key through a temporary
file nobody else can have made, `config check` says what is exposed, and the install layout keeps the daemon's
secrets from the applications that push answers (an ingest socket group of their own)."""

from __future__ import annotations

import grp
import os
import pwd
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from aiohttp import web

from tokenwire.daemon.config import ConfigError, parse_config
from tokenwire.daemon.config_warnings import security_warnings
from tokenwire.daemon.upstream_openai import OpenAIUpstream
from tokenwire.transport.errors import ErrorCode, RequestError
from tokenwire.transport.server import ChatRequest
from tokenwire.transport.tls import make_ca, make_self_signed

from .test_loopback import run

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD = ROOT / "systemd"
REQ = ChatRequest(messages=[{"role": "user", "content": "the user's secret prompt"}], model="m", max_tokens=5,
                  params={}, scheme="chatterbox", request_id=b"r" * 16)
AZURE_KEY = "AZURE-SECRET-KEY-0123456789"


def _sock_port(site: web.TCPSite) -> int:
    return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------- 1: upstream redirects
@pytest.mark.parametrize("location, shown", [
    ("http://tok:pw@127.0.0.1:{other}/v1/chat/completions?sig=SIGNED-URL-TOKEN#f",
     "http://***@127.0.0.1:{other}/v1/chat/completions?..."),
    ("/elsewhere/chat/completions", "http://127.0.0.1:{port}/elsewhere/chat/completions"),  # resolved
    (None, None),
], ids=["other_origin", "relative", "no_location"])
def test_a_redirect_is_an_upstream_error_and_nothing_reaches_its_target(monkeypatch, location, shown):
    """aiohttp followed a 307 to another origin with the API key, Azure's api-key header and the prompt. No
    redirect is followed: the client gets UPSTREAM_ERROR naming the status and where it pointed, without the
    Location's credentials and query (a signed URL's token) or the configured secrets."""
    monkeypatch.setenv("TW_TEST_KEY", "sk-live-" + "9" * 24)
    elsewhere: list[dict[str, str]] = []

    async def redirect(request: web.Request) -> web.Response:
        if location is None:
            return web.Response(status=307)
        raise web.HTTPTemporaryRedirect(location.format(other=other))

    async def record(request: web.Request) -> web.Response:
        elsewhere.append(dict(request.headers))
        return web.Response(status=500)

    async def go() -> tuple[RequestError, int]:
        nonlocal other
        apps = []
        for handler in (redirect, record):
            app = web.Application()
            app.router.add_post("/v1/chat/completions", handler)
            app.router.add_post("/elsewhere/chat/completions", record)
            runner = web.AppRunner(app, shutdown_timeout=0.2)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            apps.append((runner, _sock_port(site)))
        (first, port), (second, other) = apps
        up = OpenAIUpstream("azure", base_url=f"http://127.0.0.1:{port}/v1", api_key_env="TW_TEST_KEY",
                            extra_headers={"api-key": AZURE_KEY})
        try:
            with pytest.raises(RequestError) as info:
                await up.generate(REQ, lambda text: None)
            return info.value, port
        finally:
            await up.close()
            await first.cleanup()
            await second.cleanup()

    other = 0  # the second server's port, known once it listens
    error, port = run(go(), timeout=30)
    text = str(error)
    assert error.code == ErrorCode.UPSTREAM_ERROR and elsewhere == []
    assert text.startswith("upstream 'azure': HTTP 307")
    assert "sk-live" not in text and AZURE_KEY not in text and "SIGNED-URL-TOKEN" not in text and "pw@" not in text
    if shown is None:
        assert "without a Location (redirects are not followed)" in text
    else:
        assert text.endswith(f"not followed (set base_url to where it points): "
                             f"{shown.format(other=other, port=port)}"), text


# ------------------------------------------------------------------------------ 2: the key's temporary file
def test_cert_writes_the_key_through_no_file_another_user_made(tmp_path):
    """The temporary names were `.key.pem.<pid>.tmp`, opened with O_TRUNC: a user who could write the folder made
    them beforehand (0666, /tmp/pr26D/spray.sh) and read the key written into them; a link there made root write
    through it. Now the names are random and the files new (O_EXCL, no link followed)."""
    victim = tmp_path / "victim"
    victim.write_text("root's file\n")
    sprayed = []
    for name in ("key.pem", "cert.pem"):
        for suffix in ("", ".old"):
            trap = tmp_path / f".{name}.{os.getpid()}{suffix}.tmp"
            trap.touch()
            os.chmod(trap, 0o666)
            sprayed.append(trap)
    link = tmp_path / f".key.pem.{os.getpid()}.tmp"  # (the key's: a link instead)
    link.unlink()
    link.symlink_to(victim)
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    for _ in range(2):  # a first write, then a renewal in place (with its undo copy)
        make_self_signed(("localhost",)).write(cert, key)
        assert key.stat().st_mode & 0o777 == 0o600 and b"PRIVATE KEY" in key.read_bytes()
        assert victim.read_text() == "root's file\n"
        assert all(p.is_symlink() or p.read_bytes() == b"" for p in sprayed)
        assert all(p.is_symlink() or p.stat().st_mode & 0o777 == 0o666 for p in sprayed)  # untouched
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["cert.pem", "key.pem", "victim"] + [p.name for p in sprayed])  # nothing left over


def test_a_renewed_key_keeps_its_owner_group_and_mode_through_the_descriptor(tmp_path):
    """keep_mode now works on the open temporary file: a renewal in place still keeps what the admin set."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give the key another owner")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    make_self_signed(("localhost",)).write(cert, key)
    os.chown(key, 65534, 65534)
    os.chmod(key, 0o640)
    make_self_signed(("localhost",)).write(cert, key)
    st = key.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o640)
    assert cert.stat().st_mode & 0o777 == 0o644 & ~_umask()


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


# ---------------------------------------------------------------------------------------- 3: config check
def _check(tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str) -> tuple[str, str]:
    from tokenwire.daemon.cli import main

    path = tmp_path / "tw.toml"
    path.write_text('[server]\nlisten = ["127.0.0.1:0"]\n' + toml)
    assert main(["config", "check", str(path)]) == 0
    out = capsys.readouterr()
    return out.out, out.err


def test_config_check_counts_client_certificates_as_authentication(tmp_path, capsys):
    """With client_ca and no tokens it said "auth: 0 token(s) (no auth required)" of a daemon that refuses every
    client without a certificate signed by that CA."""
    ca = tmp_path / "clients.pem"
    ca.write_bytes(make_ca().cert_pem)
    out, _ = _check(tmp_path, capsys, f'client_ca = "{ca}"\n')
    assert f"  auth: a client certificate signed by {ca} required\n" in out and "no auth" not in out
    token = '[[auth.tokens]]\nname = "a"\nsha256 = "' + "0" * 64 + '"\n'
    out, _ = _check(tmp_path, capsys, f'client_ca = "{ca}"\n{token}')
    assert f"  auth: 1 token(s) and a client certificate signed by {ca}, both required\n" in out
    out, _ = _check(tmp_path, capsys, "")
    assert "  auth: 0 token(s), no client_ca: none required, any client may connect\n" in out


@pytest.mark.parametrize("listen, line, warned", [
    (":9464", "http://[::]:9464/metrics", "binds every interface"),
    ("0.0.0.0:9464", "http://0.0.0.0:9464/metrics", "binds every interface"),
    ("192.0.2.7:9464", "http://192.0.2.7:9464/metrics", "is not a loopback address"),
    ("127.0.0.1:9464", "http://127.0.0.1:9464/metrics", None),
    ("[::1]:9464", "http://[::1]:9464/metrics", None),
    ("localhost:9464", "http://localhost:9464/metrics", None),
    ("", "off", None),
])
def test_config_check_prints_the_metrics_address_and_warns_beyond_loopback(tmp_path, capsys, listen, line, warned):
    """It never printed the metrics address: ":9464" serves /metrics and /healthz on every interface."""
    out, err = _check(tmp_path, capsys, f'[metrics]\nlisten = "{listen}"\n')
    assert f"  metrics: {line}\n" in out
    if warned is None:
        assert "metrics.listen" not in err
    else:
        assert f"warning: metrics.listen: {line.split('//')[-1].split('/')[0]} {warned}: /metrics and /healthz" in err


def _openai(base_url: str, **keys: object) -> dict[str, object]:
    return {"upstreams": [{"name": "v", "type": "openai", "base_url": base_url, **keys}]}


@pytest.mark.parametrize("base_url, keys, warned", [
    ("http://10.1.2.3:8000/v1", {"api_key_env": "K"}, "plain http:// to 10.1.2.3, not this machine: api_key_env"),
    ("http://vllm.internal/v1", {"extra_headers": {"api-key": AZURE_KEY}}, "extra_headers.api-key"),
    ("http://u:pw@vllm.internal/v1", {}, "the password in base_url"),
    ("http://127.0.0.1:8000/v1", {"api_key_env": "K"}, None),
    ("http://[::1]:8000/v1", {"api_key_env": "K"}, None),
    ("http://localhost:8000/v1", {"api_key_env": "K"}, None),
    ("https://api.example.com/v1", {"api_key_env": "K"}, None),
    ("http://10.1.2.3:8000/v1", {"extra_headers": {"X-Tenant": "edge"}}, None),  # no credential sent
])
def test_an_api_key_in_clear_text_to_another_host_is_a_warning(base_url, keys, warned):
    notes = security_warnings(parse_config(_openai(base_url, **keys)))
    if warned is None:
        assert notes == []
    else:
        assert len(notes) == 1 and notes[0].startswith("upstreams[0].base_url: plain http://") and warned in notes[0]


def test_secret_files_readable_beyond_the_daemons_user_are_warnings(tmp_path, capsys, monkeypatch):
    """An api_key_file and the TLS key readable by group or others passed without a word (an application in the
    daemon's group read them)."""
    from tokenwire.daemon import unit_access

    # on a host with the unit's user (an install), root's 0600 files here are also "unreadable by tokenwire"
    monkeypatch.setattr(unit_access, "DAEMON_USER", "tokenwire-test-no-such-user")
    key_file = tmp_path / "vllm.key"
    key_file.write_text("sk-file\n")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make_self_signed(("localhost",)).write(cert, key)
    toml = (f'certificate = "{cert}"\nprivate_key = "{key}"\n[[upstreams]]\nname = "v"\ntype = "openai"\n'
            f'base_url = "https://h/v1"\napi_key_file = "{key_file}"\n')
    os.chmod(key_file, 0o600)
    _, err = _check(tmp_path, capsys, toml)
    assert "warning" not in err
    group = grp.getgrgid(key.stat().st_gid).gr_name
    for mode, who in ((0o640, f"group {group!r}"), (0o604, "other users")):
        os.chmod(key_file, mode)
        os.chmod(key, mode)
        _, err = _check(tmp_path, capsys, toml)
        assert f"warning: upstreams[0].api_key_file: {key_file} is readable by {who}: the API key" in err
        assert f"warning: server.private_key: {key} is readable by {who}: the TLS key" in err


# ------------------------------------------------------------------------------ 4: the ingest socket's group
def _other_group() -> grp.struct_group:
    """A group this process is not in by default (nogroup / nobody's)."""
    mine = os.getegid()
    return next(g for g in grp.getgrall() if g.gr_gid != mine and g.gr_gid != 0)


def test_the_ingest_socket_group_is_checked_by_config_check(tmp_path, capsys):
    """A group this system lacks would stop the daemon at start: config check says so (as it does of the
    socket's path); unset or "", the socket keeps the daemon's group, as existing configs had it."""
    from tokenwire.daemon.cli import main
    from tokenwire.daemon.ingest import check_paths

    group = _other_group()
    sock = str(tmp_path / "ingest.sock")
    assert parse_config({"ingest": {"socket": sock, "socket_group": group.gr_name}}).ingest.socket_group == \
        group.gr_name
    assert parse_config({"ingest": {"socket": sock, "socket_group": ""}}).ingest.socket_group is None
    assert parse_config({}).ingest.socket_group is None
    with pytest.raises(ConfigError, match=r"ingest\.socket_group: set without ingest\.socket"):
        parse_config({"ingest": {"socket_group": group.gr_name}})
    missing = parse_config({"ingest": {"socket": sock, "socket_group": "no-such-group-tw"}}).ingest
    assert check_paths(missing)[0] == ["ingest.socket_group: no group 'no-such-group-tw' on this system "
                                       "(systemd/tokenwire.sysusers makes tokenwire-ingest)"]
    path = tmp_path / "tw.toml"
    path.write_text(f'[ingest]\nsocket = "{sock}"\nsocket_group = "{group.gr_name}"\n')
    assert main(["config", "check", str(path)]) == 0
    assert f"  ingest socket {sock} (0660, group {group.gr_name})\n" in capsys.readouterr().out
    path.write_text(f'[ingest]\nsocket = "{sock}"\nsocket_group = "no-such-group-tw"\n')
    assert main(["config", "check", str(path)]) == 2
    assert "ingest.socket_group: no group 'no-such-group-tw'" in capsys.readouterr().err


def test_the_ingest_socket_is_given_its_own_group(tmp_path):
    """An application allowed to push answers had to be in the daemon's group, which reads the TLS key, the
    config and the KV store. The socket can be given a group of its own (mode 0660); unset, it keeps the
    daemon's group as before."""
    from tokenwire.daemon.ingest import IngestAPI, serve_ingest
    from tokenwire.daemon.transcripts import TranscriptStore

    if os.geteuid() != 0:
        pytest.skip("needs root to give the socket a group this user is not in")
    group = _other_group()

    async def go(path: Path, name: str | None) -> tuple[int, int]:
        api = IngestAPI(TranscriptStore(max_bytes=1 << 20, retain_s=60.0), max_tokens=lambda: 100)
        server = await serve_ingest(path, api, group=name)
        try:
            st = path.stat()
            return st.st_gid, st.st_mode & 0o777
        finally:
            server.close()
            await server.wait_closed()

    with tempfile.TemporaryDirectory() as folder:  # a short path: sun_path holds 108 bytes
        assert run(go(Path(folder) / "a.sock", group.gr_name)) == (group.gr_gid, 0o660)
        assert run(go(Path(folder) / "b.sock", None)) == (os.getegid(), 0o660)


def test_a_socket_group_the_daemon_is_not_in_is_a_clear_error():
    """Not root, the daemon may only give a group it is a member of: the start fails naming the setting and
    the sysusers line that makes the daemon's user a member."""
    from tokenwire.daemon.unix_sockets import set_socket_access

    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o755)
        path = Path(folder) / "s.sock"
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(path))
        os.chown(path, 65534, 65534)
        os.setegid(65534)
        os.seteuid(65534)
        try:
            with pytest.raises(OSError) as info:
                set_socket_access(path, "root", "ingest.socket_group")
        finally:
            os.seteuid(0)
            os.setegid(0)
        # the user running it is named (nobody here), not the unit's usual tokenwire
        user = pwd.getpwuid(65534).pw_name
        assert (f"ingest.socket_group: cannot give the socket to group 'root': the daemon's user {user} is not a "
                f"member") in str(info.value) and f"m {user} root" in str(info.value)


def test_the_install_layout_keeps_the_daemons_secrets_from_ingest_applications():
    """Following the install guide, an application in the tokenwire group (as the ingest socket required) read
    the TLS key, the config and the KV store. Now: the store is the daemon's alone (0700), /run/tokenwire can be
    passed through to a socket but not listed, and applications get a group of their own, tokenwire-ingest,
    which the daemon's user is a member of (it gives the socket that group)."""
    tmpfiles = {ln.split()[1]: ln.split()[2:5] for ln in (SYSTEMD / "tokenwire.tmpfiles").read_text().splitlines()
                if ln.startswith("d ")}
    assert tmpfiles["/var/lib/tokenwire"] == ["0700", "tokenwire", "tokenwire"]
    assert tmpfiles["/run/tokenwire"] == ["0711", "tokenwire", "tokenwire"]
    assert tmpfiles["/etc/tokenwire"] == ["0750", "root", "tokenwire"]
    sysusers = [ln.split() for ln in (SYSTEMD / "tokenwire.sysusers").read_text().splitlines()
                if ln and not ln.startswith("#")]
    assert ["g", "tokenwire-ingest", "-"] in sysusers and ["m", "tokenwire", "tokenwire-ingest"] in sysusers
    unit = [ln.strip() for ln in (SYSTEMD / "tokenwire.service").read_text().splitlines()]
    assert "StateDirectoryMode=0700" in unit and "RuntimeDirectoryMode=0711" in unit  # as tmpfiles has them
    assert "User=tokenwire" in unit and not any(ln.startswith("SupplementaryGroups=") for ln in unit)
    example = (SYSTEMD / "tokenwire.toml.example").read_text()
    assert '# socket_group = "tokenwire-ingest"' in example


@pytest.mark.skipif(not Path("/usr/bin/systemd-sysusers").exists(), reason="systemd-sysusers not installed")
def test_the_sysusers_file_makes_the_ingest_group_with_the_daemon_in_it(tmp_path):
    """systemd-sysusers itself reads the file (into an empty root): the group exists and lists the user."""
    (tmp_path / "etc").mkdir()
    out = subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(SYSTEMD / "tokenwire.sysusers")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    groups = {ln.split(":")[0]: ln.split(":")[3] for ln in (tmp_path / "etc" / "group").read_text().splitlines()}
    assert groups["tokenwire-ingest"] == "tokenwire" and "tokenwire" in groups



def test_the_kv_ingest_socket_is_given_its_own_group_too(tmp_path):
    """kv.ingest_socket_group, as ingest.socket_group: an application that puts KV need not be in the daemon's
    group; set without a socket it is a config error, and a group this system lacks is config check's error."""
    from tokenwire.daemon.config import ConfigError
    from tokenwire.daemon.kv_config import check_paths, parse_kv
    from tokenwire.daemon.kv_ingest import serve_kv_ingest
    from tokenwire.daemon.kv_service import KVService
    from tokenwire.daemon.kv_store_local import LocalChunkStore

    with pytest.raises(ConfigError, match=r"kv\.ingest_socket_group: set without kv\.ingest_socket"):
        parse_kv({"ingest_socket_group": "tokenwire-ingest"}, None)
    cfg = parse_kv({"enabled": True, "directory": str(tmp_path / "kv"), "ingest_socket": str(tmp_path / "k.sock"),
                    "ingest_socket_group": "no-such-group-here"}, None)
    errors, _ = check_paths(cfg)
    assert any("kv.ingest_socket_group: no group 'no-such-group-here'" in e for e in errors)
    if os.geteuid() != 0:
        pytest.skip("needs root to give the socket a group this user is not in")
    group = _other_group()

    async def go(path: Path) -> tuple[int, int]:
        service = KVService(LocalChunkStore(tmp_path / "store", capacity_bytes=1 << 20), chunk_tokens=16)
        server = await serve_kv_ingest(path, service, group=group.gr_name)
        try:
            st = path.stat()
            return st.st_gid, st.st_mode & 0o777
        finally:
            server.close()
            await server.wait_closed()
            service.close()

    with tempfile.TemporaryDirectory() as folder:  # a short path: sun_path holds 108 bytes
        assert run(go(Path(folder) / "kv.sock")) == (group.gr_gid, 0o660)


# ------------------------------------------------------------------------------ the install path (a probe of it)
def test_a_socket_folder_the_group_cannot_enter_is_a_warning_and_a_stopped_services_run_folder_is_not_an_error(
        tmp_path, monkeypatch):
    """An old unit re-made /run/tokenwire 0750 at each start: the socket was 0660 in tokenwire-ingest, and its
    members got EACCES from the folder while config check said ok. And /run/tokenwire does not exist while the
    service is stopped (RuntimeDirectory=): config check failed a correct config exactly then."""
    from tokenwire.daemon import unix_sockets
    from tokenwire.daemon.unix_sockets import socket_checks

    group = _other_group()
    folder = tmp_path / "run"
    folder.mkdir()
    folder.chmod(0o750)
    errors, warnings = socket_checks(folder / "ingest.sock", group.gr_name, "ingest.socket")
    assert errors == [] and len(warnings) == 1
    assert f"ingest.socket_group: members of group {group.gr_name!r} cannot reach the socket" in warnings[0]
    assert "mode 0750" in warnings[0]
    folder.chmod(0o711)
    assert socket_checks(folder / "ingest.sock", group.gr_name, "ingest.socket") == ([], [])
    monkeypatch.setattr(unix_sockets, "RUNTIME_PARENT", tmp_path)  # (/run on a real system)
    errors, warnings = socket_checks(tmp_path / "stopped" / "ingest.sock", None, "ingest.socket")
    assert errors == [] and "RuntimeDirectory= makes it at start" in warnings[0]
    errors, _ = socket_checks(tmp_path / "stopped" / "deeper" / "ingest.sock", None, "ingest.socket")
    assert errors and "no such folder" in errors[0]  # not a runtime folder: the start would fail


def test_config_check_run_as_root_names_files_the_daemons_user_cannot_read(tmp_path, monkeypatch):
    """The README's install without its chown: tokenwire cert writes the key 0600 root, config check (as root)
    said ok, and the daemon, running as the unit's user, failed with "cannot read (Permission denied)"."""
    import pwd

    from tokenwire.daemon import unit_access

    if os.geteuid() != 0:
        pytest.skip("config check reads as the daemon's user only when run as root")
    nobody = pwd.getpwnam("nobody")
    monkeypatch.setattr(unit_access, "DAEMON_USER", "nobody")  # (tokenwire on a real install)
    monkeypatch.setattr(unit_access, "PRIVATE_TMP", ())  # (its files are under the host's /tmp: see the next line)
    # not under tmp_path: pytest's 0700 root folder above it keeps nobody out, which config check now says too
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o755)
        key = Path(folder) / "key.pem"
        key.write_text("secret")
        key.chmod(0o600)
        cfg = parse_config({"server": {"private_key": str(key), "certificate": str(key)}})
        warned = [w for w in security_warnings(cfg) if "cannot be read by the nobody user" in w]
        assert {w.split(":")[0] for w in warned} == {"server.private_key", "server.certificate"}
        os.chown(key, nobody.pw_uid, -1)
        assert not [w for w in security_warnings(cfg) if "cannot be read" in w]
