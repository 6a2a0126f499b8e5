"""What an operator gets wrong, and hears in one line: key files TLS 1.3 cannot use, config files tomllib chokes on,
a default config path behind a folder the user cannot enter, token names that forge log lines, and JSON logs."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from aioquic.tls import Context
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from tokenwire.daemon import config as config_mod
from tokenwire.daemon.cli import main
from tokenwire.daemon.config import ConfigError, load_config, parse_config
from tokenwire.transport.tls import _tls13_can_sign, server_configuration

from .daemon_proc import DaemonProcess

_PLAIN = serialization.NoEncryption()


def _write_pair(tmp_path: Path, key, encryption=_PLAIN, fmt=serialization.PrivateFormat.PKCS8) -> tuple[Path, Path]:
    """A self-signed certificate for ``key`` (SHA-256, or none for EdDSA) and the key, as PEM files."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) else hashes.SHA256()
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, algorithm)
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, encryption))
    return cert_path, key_path


def _config_with(tmp_path: Path, cert: Path, key: Path) -> str:
    path = tmp_path / "tw.toml"
    path.write_text(f'[server]\nlisten = ["127.0.0.1:0"]\ncertificate = "{cert}"\nprivate_key = "{key}"\n'
                    '[metrics]\nlisten = "127.0.0.1:0"\n')
    return str(path)


def _error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [ln for ln in err.splitlines() if "error" in ln]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """``tokenwire daemon`` replaces the root handlers (setup_logging): put back pytest's afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("fmt", [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL])
def test_a_passphrase_protected_key_is_one_line_naming_it(tmp_path, capsys, restore_logging, fmt):
    """cryptography's TypeError ("Password was not given but private key is encrypted") went past the callers,
    which catch ValueError: a traceback in config check and at daemon start."""
    cert, key = _write_pair(tmp_path, ec.generate_private_key(ec.SECP256R1()),
                            serialization.BestAvailableEncryption(b"secret"), fmt)
    with pytest.raises(ValueError, match=re.escape(f"{key}: the private key is encrypted (passphrase-protected); "
                                                   "tokenwire needs an unencrypted key")):
        server_configuration(certfile=cert, keyfile=key)
    cfg = _config_with(tmp_path, cert, key)
    for argv in (["config", "check", cfg], ["daemon", "--config", cfg]):
        assert main(argv) == 2
        lines = _error_lines(capsys)
        assert len(lines) == 1 and f"{key}: the private key is encrypted" in lines[0], lines


def test_a_dsa_key_is_refused_before_the_daemon_starts(tmp_path, capsys, restore_logging):
    """A DSA pair passed config check and the daemon started; every TLS 1.3 handshake then failed with "No
    supported signature algorithm"."""
    cert, key = _write_pair(tmp_path, dsa.generate_private_key(2048))
    with pytest.raises(ValueError, match=re.escape(f"{key}: a key of type DSA, which aioquic cannot sign TLS 1.3")):
        server_configuration(certfile=cert, keyfile=key)
    cfg = _config_with(tmp_path, cert, key)
    for argv in (["config", "check", cfg], ["daemon", "--config", cfg]):
        assert main(argv) == 2
        lines = _error_lines(capsys)
        assert len(lines) == 1 and "a key of type DSA" in lines[0], lines


def test_the_key_types_refused_are_those_aioquic_cannot_sign_with(tmp_path):
    """The check follows aioquic's own choice of signature algorithm (P-521 is one it has none for): a key it
    can sign with still loads, one it cannot is refused."""
    keys = {
        "RSA": rsa.generate_private_key(65537, 2048),
        "P-256": ec.generate_private_key(ec.SECP256R1()),
        "P-384": ec.generate_private_key(ec.SECP384R1()),
        "P-521": ec.generate_private_key(ec.SECP521R1()),
        "Ed25519": ed25519.Ed25519PrivateKey.generate(),
        "Ed448": ed448.Ed448PrivateKey.generate(),
        "DSA": dsa.generate_private_key(2048),
    }
    for kind, key in keys.items():
        signs = bool(Context._signature_algorithms_for_private_key(SimpleNamespace(certificate_private_key=key)))
        assert _tls13_can_sign(key) == signs, kind
        folder = tmp_path / kind
        folder.mkdir()
        cert, key_path = _write_pair(folder, key)
        if signs:
            server_configuration(certfile=cert, keyfile=key_path)
        else:
            with pytest.raises(ValueError, match=r"aioquic cannot sign TLS 1\.3 handshakes with"):
                server_configuration(certfile=cert, keyfile=key_path)


@pytest.mark.parametrize(("text", "message"), [
    ("a = " + "[" * 5000 + "]" * 5000 + "\n", "not valid TOML: nested too deeply"),  # RecursionError
    ("a = " + "9" * 5000 + "\n", "not valid TOML: Exceeds the limit"),  # a bare ValueError out of tomllib
])
def test_a_file_tomllib_cannot_parse_is_a_config_error(tmp_path, capsys, text, message):
    path = tmp_path / "deep.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"^{re.escape(f'{path}: {message}')}"):
        load_config(path)
    assert main(["config", "check", str(path)]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"tokenwire config check: error: {path}: {message}"), lines


def test_a_reload_of_a_deeply_nested_file_is_refused_and_the_daemon_says_ready(tmp_path):
    """SIGHUP with it: RecursionError escaped the reload, RELOADING=1 was never followed by READY=1."""
    d = DaemonProcess(tmp_path)
    try:
        d.config_path.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
        d.signal(signal.SIGHUP)
        d.wait_for("RELOADING")
        status = d.wait_for("READY")["STATUS"]
        assert status.startswith("reload refused: ") and status.endswith("not valid TOML: nested too deeply"), status
    finally:
        rc = d.stop()
    log = d.log_path.read_text()
    assert rc == 0 and "Traceback" not in log, log


@contextlib.contextmanager
def _unprivileged() -> Iterator[None]:
    """As nobody, when the tests run as root (who enters any folder); as is, otherwise."""
    if os.geteuid() != 0:
        yield
        return
    groups, egid = os.getgroups(), os.getegid()
    os.setgroups([])
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(egid)
        os.setgroups(groups)


def test_a_default_config_behind_a_folder_the_user_cannot_enter_is_an_error(tmp_path, monkeypatch):
    """/etc/tokenwire is 0750 root:tokenwire: for another user ``Path.exists`` raised PermissionError (Python
    3.11), a traceback; newer ones may return False, which silently meant the defaults. The file may be there."""
    monkeypatch.delenv("TOKENWIRE_CONFIG", raising=False)
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "tokenwire.toml").write_text('[server]\nlisten = ["127.0.0.1:4433"]\n')
    monkeypatch.setattr(config_mod, "DEFAULT_PATH", folder / "tokenwire.toml")
    folder.chmod(0)
    try:
        with _unprivileged(), pytest.raises(ConfigError) as caught:
            load_config()
    finally:
        folder.chmod(0o700)
    assert str(caught.value) == f"{folder / 'tokenwire.toml'}: cannot read: Permission denied"
    monkeypatch.setattr(config_mod, "DEFAULT_PATH", folder / "absent.toml")  # nothing there: the defaults, as ever
    assert load_config().path is None


@pytest.mark.parametrize("name", ["alice\n2026-01-01 00:00:00,000 ERROR forged line", "a\u2028b", "a\u202eb",
                                  "a\x85b", "a\x1b[2Jb", "  "])
def test_a_token_name_logs_cannot_show_is_refused_by_the_config_as_by_new_token(capsys, name):
    """``config new-token`` refused control characters (the name is the principal in logs); a name written in
    the file by hand went into the logs as it was, a line break forging a line."""
    with pytest.raises(ConfigError, match=r"^auth\.tokens\[0\]\.name: "):
        parse_config({"auth": {"tokens": [{"name": name, "sha256": "0" * 64}]}})
    assert main(["config", "new-token", "--name", name]) == 2
    assert "--name: " in capsys.readouterr().err
    for fine in ('al"ice', "zoë", "carol smith"):
        assert parse_config({"auth": {"tokens": [{"name": fine, "sha256": "0" * 64}]}}).auth.tokens[0].name == fine


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_the_daemon_says_where_it_listens_once_in_the_log_format(tmp_path, fmt):
    """A plain "tokenwire daemon: listening on" line went to stderr whatever the format: a line a JSON log
    shipper cannot parse, and a repeat of the INFO line in text."""
    d = DaemonProcess(tmp_path, f'[logging]\nformat = "{fmt}"\n')
    rc = d.stop()
    lines = [ln for ln in d.log_path.read_text().splitlines() if ln.strip()]
    assert rc == 0, lines
    if fmt == "json":
        records = [json.loads(ln) for ln in lines]  # every line: a plain one raises here
        assert [r["msg"] for r in records if r["msg"].startswith("listening on")], lines
    else:
        assert len([ln for ln in lines if "listening on" in ln]) == 1, lines


def test_a_daemon_that_cannot_start_says_so_in_one_json_object(tmp_path, capsys, restore_logging):
    """In JSON logs the fatal error was the CLI's plain "tokenwire daemon: error: ..." line."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        cfg = tmp_path / "busy.toml"
        cfg.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\n[metrics]\nlisten = "127.0.0.1:0"\n')
        cases = {str(cfg): f"server.listen: cannot listen on udp/127.0.0.1:{port}: Address already in use",
                 str(tmp_path / "absent.toml"): f"{tmp_path / 'absent.toml'}: no such file"}
        for path, message in cases.items():
            assert main(["daemon", "--config", path, "--log-format", "json"]) == 2
            records = [json.loads(ln) for ln in capsys.readouterr().err.splitlines() if ln.strip()]
            assert [(r["level"], r["msg"]) for r in records if r["level"] == "critical"] == [
                ("critical", f"cannot start: {message}")], records


def test_a_daemon_run_in_process_gives_the_signals_back(tmp_path, capsys, restore_logging):
    """uvloop's close left the daemon's handlers in: after `main(["daemon", ...])` returned (here: refused at start),
    the caller's SIGINT, SIGTERM and SIGHUP stayed bound to the closed loop and its Ctrl-C did nothing (a later test's
    os.kill(SIGINT) was dropped, and that test passed without the Ctrl-C it was about)."""
    import signal

    cert, key = _write_pair(tmp_path, dsa.generate_private_key(2048))
    cfg = _config_with(tmp_path, cert, key)
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = {sig: signal.getsignal(sig) for sig in sigs}
    try:
        assert main(["daemon", "--config", cfg]) == 2
        assert {sig: signal.getsignal(sig) for sig in sigs} == before
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
