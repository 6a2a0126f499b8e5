"""Daemon building blocks without a process: config validation, transcript store, ingest API, sd_notify."""

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tokenwire.daemon.config import ConfigError, hash_token, load_config, parse_config
from tokenwire.daemon.ingest import IngestAPI, IngestConnection
from tokenwire.daemon.sd_notify import Notifier
from tokenwire.daemon.transcripts import GenerationLimit, TranscriptStore
from tokenwire.transport.errors import ErrorCode
from tokenwire.transport.transcript import split_piece

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_work_without_a_file():
    cfg = parse_config({})
    assert cfg.server.listen == (("::", 4433),)
    assert cfg.route("anything").type == "demo"
    assert not cfg.auth.required


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"limits": {"max_sessions": 0}}, "limits.max_sessions: expected an integer in [1, 1000000]"),
        ({"limits": {"max_sesions": 3}}, "did you mean 'max_sessions'"),
        ({"server": {"listen": ["nowhere"]}}, "server.listen: expected 'host:port'"),
        ({"server": {"listen": ["example.com:443"]}}, "is not an IP address"),
        ({"server": {"certificate": "/nonexistent.pem", "private_key": "/x"}}, "does not exist"),
        ({"auth": {"tokens": [{"name": "a", "sha256": "secret-in-clear"}]}}, "never the token itself"),
        ({"upstreams": [{"name": "x", "type": "gpt"}]}, "upstreams[0].type: expected one of"),
        ({"upstreams": [{"name": "x", "type": ["demo"]}]}, "upstreams[0].type: expected one of"),  # was a TypeError
        ({"upstreams": [{"name": "x", "type": "openai", "base_url": "ftp://x"}]}, "base_url"),
        ({"upstreams": [{"name": "x", "type": "demo", "rate": -1}]}, "upstreams[0].rate"),
        ({"upstreams": [{"name": "x", "type": "demo", "rate": 20000}]}, "upstreams[0].rate"),  # failed each request
        ({"routes": [{"model": "*", "upstream": "nope"}]}, "routes[0].upstream: 'nope' is not a defined upstream"),
        ({"logging": {"format": "xml"}}, "logging.format: expected one of text, json"),
        ({"colour": "blue"}, "colour: unknown key"),
        # str.isdigit() took them: '²' was an int() traceback, Arabic-Indic '٤٤٣' was port 443
        ({"server": {"listen": ["127.0.0.1:²"]}}, "server.listen: expected 'host:port'"),
        ({"server": {"listen": ["127.0.0.1:٤٤٣"]}}, "server.listen: expected 'host:port'"),
        ({"metrics": {"listen": "127.0.0.1:９４６４"}}, "metrics.listen: expected 'host:port'"),
        # listeners the daemon cannot open together (it failed at start after config check said ok)
        ({"server": {"listen": ["127.0.0.1:4433", "127.0.0.1:4433"]}}, "server.listen: 127.0.0.1:4433 is listed twice"),
        ({"server": {"listen": ["[::]:4433", "0.0.0.0:4433"]}}, "0.0.0.0:4433 and [::]:4433 cannot both be bound"),
        ({"server": {"listen": ["0.0.0.0:4433", "10.0.0.1:4433"]}}, "10.0.0.1:4433 and 0.0.0.0:4433 cannot both"),
        ({"server": {"listen": ["[::]:4433"]}, "kv": {"enabled": True, "listen": "127.0.0.1:4433"}},
         "kv.listen: 127.0.0.1:4433 overlaps server.listen [::]:4433"),
    ],
)
def test_errors_name_the_bad_key(doc, message):
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    assert message in str(info.value)


def test_listeners_that_can_be_bound_together_pass():
    cfg = parse_config({"server": {"listen": ["127.0.0.1:4433", "[::1]:4433", "127.0.0.1:4434", "127.0.0.1:0",
                                              "127.0.0.1:0"]},
                        "kv": {"enabled": False, "listen": "127.0.0.1:4433"}})  # kv off: never bound
    assert len(cfg.server.listen) == 5
    assert parse_config({"kv": {"enabled": True, "listen": "[::]:4434"}}).kv.listen == ("::", 4434)


def test_a_listener_named_by_host_overlaps_what_it_resolves_to():
    """localhost:X next to the address it resolves to (or a wildcard of its family) passed config check, then
    the daemon, which binds the first getaddrinfo answer, failed with EADDRINUSE."""
    first = socket.getaddrinfo("localhost", None, type=socket.SOCK_DGRAM)[0][4][0]
    wildcard = "0.0.0.0" if ":" not in first else "[::]"
    for other in (first if ":" not in first else f"[{first}]", wildcard):
        with pytest.raises(ConfigError, match="cannot both be bound"):
            parse_config({"server": {"listen": ["localhost:4433", f"{other}:4433"]}})


def test_config_check_refuses_overlapping_listeners_in_one_line(tmp_path, capsys):
    from tokenwire.daemon.cli import main

    cfg = _daemon_config(tmp_path, '[server]\nlisten = ["127.0.0.1:27999"]\n'
                                   '[kv]\nenabled = true\nlisten = "0.0.0.0:27999"\n')
    assert main(["config", "check", cfg]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"tokenwire config check: error: {cfg}:5: kv.listen: 0.0.0.0:27999 overlaps server.listen "
                   "127.0.0.1:27999 (both are UDP; give the KV channel a port of its own)"], err


def _openai(**keys) -> dict:
    return {"upstreams": [{"name": "v", "type": "openai", "base_url": "http://h/v1", **keys}]}


@pytest.mark.parametrize("headers, message", [
    ({"X-Tenant": "edge\r\nX-Injected: yes"}, "upstreams[0].extra_headers.X-Tenant: the value contains a line break"),
    ({"X-Tenant": "a\nb"}, "contains a line break"),
    ({"X-Tenant": "nul\x00"}, "the control character '\\x00'"),
    ({"X Tenant": "edge"}, "upstreams[0].extra_headers: 'X Tenant' is not a valid HTTP header name"),
    ({"X-Tenant:": "edge"}, "is not a valid HTTP header name"),
])
def test_extra_headers_that_cannot_be_sent_are_config_errors(headers, message):
    """A CR/LF in a value passed config check, then every request failed with aiohttp's "Forbidden control
    character detected in headers" traceback."""
    with pytest.raises(ConfigError) as info:
        parse_config(_openai(extra_headers=headers))
    assert message in str(info.value)
    assert parse_config(_openai(extra_headers={"X-Tenant": "edge\tok"})).upstreams[0].options["extra_headers"]


def test_an_api_key_file_with_a_line_break_inside_fails_config_check(tmp_path, capsys):
    """Two lines in the key file passed config check, then every request failed with a header traceback. A
    trailing newline is still stripped."""
    from tokenwire.daemon.cli import main

    key = tmp_path / "vllm.key"
    key.write_text("sk-one\n")
    assert parse_config(_openai(api_key_file=str(key))).upstreams[0].options["api_key_file"] == key
    key.write_text("sekrit\nX-Injected: yes\n")
    with pytest.raises(ConfigError, match=r"upstreams\[0\]\.api_key_file: the key in .*vllm.key contains a line"):
        parse_config(_openai(api_key_file=str(key)))
    cfg = _daemon_config(tmp_path, f'[[upstreams]]\nname = "v"\ntype = "openai"\nbase_url = "http://h/v1"\n'
                                   f'api_key_file = "{key}"\n')
    assert main(["config", "check", cfg]) == 2
    assert "vllm.key contains a line break" in capsys.readouterr().err
    key.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        parse_config(_openai(api_key_file=str(key)))


def test_restart_changes_compare_what_the_operator_wrote():
    """server.congestion follows [marking]: turning a policy on is a [marking] change, not a [server] one."""
    from tokenwire.daemon.config import restart_changes

    old = parse_config({})
    assert restart_changes(old, parse_config({"marking": {"policy": "l4s"}})) == ["marking"]
    assert restart_changes(old, parse_config({"server": {"congestion": "prague"}, "marking": {"policy": "l4s"}})) \
        == ["server", "marking"]
    assert restart_changes(old, parse_config({"logging": {"format": "json"}, "limits": {"max_tokens": 5}})) == []


def test_reload_keeps_the_command_lines_log_format(tmp_path):
    """--log-format wins over the file at start; a reload of the same file must not undo it."""
    import dataclasses
    import logging

    from tokenwire.daemon.service import Daemon

    path = tmp_path / "d.toml"
    path.write_text('[logging]\nformat = "text"\nlevel = "warning"\n')
    cfg = load_config(path)
    daemon = Daemon(dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, format="json")),
                    log_format_override="json")
    handlers = list(logging.getLogger().handlers)
    level = logging.getLogger().level
    try:
        assert daemon.reload()
        assert daemon.config.logging.format == "json" and daemon.config.logging.level == "warning"
        assert logging.getLogger().handlers == handlers  # the format did not change: no new handler
    finally:
        logging.getLogger().setLevel(level)


def test_file_errors(tmp_path):
    p = tmp_path / "x.toml"
    p.write_text("[limits\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")
    p.write_bytes(b"\xff\xfe[server]\n")  # was a UnicodeDecodeError traceback
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(p)


def test_config_check_reports_marking_and_an_unusable_model(tmp_path, capsys):
    """The daemon falls back to l4s when the swiftqueue model cannot load; `config check` says so up front
    (it printed 'ok' and nothing about marking)."""
    from tokenwire.daemon.cli import main

    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text('[marking]\npolicy = "swiftqueue"\n')
    bad.write_text(f'[marking]\npolicy = "swiftqueue"\nmodel = "{tmp_path / "missing.onnx"}"\n')
    assert main(["config", "check", str(good)]) == 0
    out, err = capsys.readouterr()
    assert "marking: swiftqueue (shipped model, window 64" in out and err == ""
    assert main(["config", "check", str(bad)]) == 0  # still a valid configuration: the daemon runs
    out, err = capsys.readouterr()
    assert "marking: swiftqueue" in out
    assert "warning: marking.model" in err and "missing.onnx" in err and "l4s" in err
    off = tmp_path / "off.toml"
    off.write_text('[marking]\npolicy = ""\n')
    assert main(["config", "check", str(off)]) == 0
    assert "marking: off" in capsys.readouterr().out


def test_example_config_validates_and_routes():
    cfg = load_config(ROOT / "systemd" / "tokenwire.toml.example")
    assert cfg.route(None).name == "demo"


def test_tokens_are_checked_by_hash():
    cfg = parse_config({"auth": {"tokens": [{"name": "alice", "sha256": hash_token("s3cret")}]}})
    assert cfg.auth.required
    assert cfg.auth.principal("s3cret") == "alice"
    assert cfg.auth.principal("S3cret") is None and cfg.auth.principal(None) is None
    # a name may have two tokens (one being replaced); one token two names is a copy-paste slip: the second
    # name could never be a principal
    two = parse_config({"auth": {"tokens": [{"name": "alice", "sha256": hash_token("old")},
                                            {"name": "alice", "sha256": hash_token("new")}]}})
    assert two.auth.principal("old") == two.auth.principal("new") == "alice"
    with pytest.raises(ConfigError, match=r"auth.tokens\[1\].sha256: the same digest as auth.tokens\[0\] \('alice'\)"):
        parse_config({"auth": {"tokens": [{"name": "alice", "sha256": hash_token("s3cret")},
                                          {"name": "bob", "sha256": hash_token("s3cret")}]}})


def test_routes_first_match_wins():
    cfg = parse_config(
        {
            "upstreams": [{"name": "a", "type": "demo"}, {"name": "b", "type": "demo"}],
            "routes": [{"model": "llama*", "upstream": "b"}, {"model": "*", "upstream": "a"}],
        }
    )
    assert cfg.route("llama-3").name == "b" and cfg.route("gpt").name == "a" and cfg.route(None).name == "a"


def test_transcript_store_evicts_expired_then_oldest_but_never_live_or_streamed():
    store = TranscriptStore(max_bytes=12_000, retain_s=60)
    live = store.create("a", 1000, now=0)
    for _ in range(5):
        live.push("x" * 10, now=0)
    done = []
    for k in range(4):
        r = store.create("a", 1000, now=0)
        for _ in range(20):
            r.push("y" * 100, now=0)
        r.finish("stop", now=k)
        store.mark_finished(r)
        done.append(r)
    done[0].listeners["someone"] = lambda: None  # still streaming: kept despite age and size
    assert store.memory_bytes > 12_000
    store.evict(now=30)
    assert store.memory_bytes <= 12_000 or store.finished_count == 1
    assert store.get(done[0].request_id) is not None
    assert store.get(live.request_id) is not None  # answers being generated are never evicted
    assert (store.expired, store.evicted) == (0, 2)  # memory pressure, counted apart from retention
    done[0].listeners.clear()
    store.evict(now=1000)
    assert store.finished_count == 0 and store.get(live.request_id) is not None
    assert (store.expired, store.evicted) == (2, 2)  # the rest, after retain_s: routine, not pressure


def test_generation_limit():
    store = TranscriptStore(max_bytes=1 << 20, retain_s=1)
    r = store.create(None, 3, now=0)
    for piece in ("a", "b", "c"):  # an answer that ends exactly at the limit is not cut
        assert r.push(piece, 0) == 1
    with pytest.raises(GenerationLimit):
        r.push("d", 0)  # text past it is
    assert len(r.transcript) == 3 and r.transcript.text() == "abc"


def test_a_cut_at_the_token_limit_never_splits_a_character():
    """Tokens were cut every 256 bytes: an answer cut at its limit after a token that ended mid-character
    ended in invalid UTF-8 (a replacement character in every client)."""
    store = TranscriptStore(max_bytes=1 << 20, retain_s=1)
    r = store.create(None, 1, now=0)
    with pytest.raises(GenerationLimit):
        r.push("a" + "é" * 200, 0)
    tok = r.transcript.tokens[0]
    assert tok == ("a" + "é" * 127).encode() and tok.decode("utf-8")  # 255 bytes, whole characters
    pieces = split_piece(("€" * 300 + "x").encode())
    assert all(len(p) <= 256 for p in pieces) and "".join(p.decode() for p in pieces) == "€" * 300 + "x"
    assert split_piece(b"\x80" * 600) == [b"\x80" * 256, b"\x80" * 256, b"\x80" * 88]  # not UTF-8: at the limit


def test_generation_limit_counts_the_tokens_a_long_piece_becomes():
    store = TranscriptStore(max_bytes=1 << 20, retain_s=1)
    r = store.create(None, 2, now=0)
    with pytest.raises(GenerationLimit):
        r.push("x" * 2000, 0)  # eight 256-byte tokens on the wire
    assert r.transcript.tokens == [b"x" * 256] * 2


def test_ingest_api_messages():
    store = TranscriptStore(max_bytes=1 << 20, retain_s=10)
    api = IngestAPI(store, max_tokens=lambda: 5)
    owned = IngestConnection()
    opened = api.handle({"op": "open", "principal": "app"}, owned, 0)
    rid = opened["id"]
    assert api.handle({"op": "push", "id": rid, "text": "hi"}, owned, 0) == {"ok": True, "tokens": 1}
    assert api.handle({"op": "push", "id": rid}, owned, 0)["ok"] is False
    assert api.handle({"op": "push", "id": "zz", "text": "x"}, owned, 0)["ok"] is False
    assert api.handle({"op": "open", "max_tokens": 99}, owned, 0)["ok"] is False
    assert api.handle([1, 2], owned, 0)["ok"] is False
    for _ in range(4):
        api.handle({"op": "push", "id": rid, "text": "x"}, owned, 0)
    req = store.get(bytes.fromhex(rid))
    assert not req.done and len(req.transcript) == 5  # at the limit, nothing cut: the app may still finish
    # text past it is cut and finishes the answer, and the app is told so (it was a plain ok, and the next
    # op on the id said "unknown id")
    assert api.handle({"op": "push", "id": rid, "text": "y"}, owned, 0) == {
        "ok": True, "tokens": 5, "finished": "length", "cut": True}
    assert req.done and req.transcript.reason == "length"
    assert api.handle({"op": "finish", "id": rid}, owned, 0) == {
        "ok": False, "error": "this answer is already finished (length)"}
    exact = api.handle({"op": "open", "max_tokens": 1}, owned, 0)["id"]
    api.handle({"op": "push", "id": exact, "text": "z"}, owned, 0)
    assert api.handle({"op": "finish", "id": exact, "reason": "stop"}, owned, 0) == {"ok": True, "tokens": 1}
    assert store.get(bytes.fromhex(exact)).transcript.reason == "stop"
    other = api.handle({"op": "open"}, owned, 0)["id"]
    api.disconnected(owned, 1)
    assert store.get(bytes.fromhex(other)).error[0] == ErrorCode.UPSTREAM_ERROR
    assert store.get(bytes.fromhex(exact)).error is None  # finished answers are not failed at disconnect


def test_ingested_tokens_are_counted_and_a_connection_forgets_old_finished_ids():
    from tokenwire.daemon import ingest

    store = TranscriptStore(max_bytes=1 << 20, retain_s=10)
    counted: list[int] = []
    api = IngestAPI(store, max_tokens=lambda: 3, on_tokens=counted.append)
    owned = IngestConnection()
    rid = api.handle({"op": "open"}, owned, 0)["id"]
    api.handle({"op": "push", "id": rid, "text": "ab" * 200}, owned, 0)  # two tokens
    api.handle({"op": "push", "id": rid, "text": "c" * 600}, owned, 0)  # three more, one fits
    assert sum(counted) == 3
    first = api.handle({"op": "open"}, owned, 0)["id"]
    api.handle({"op": "push", "id": first, "text": "x" * 100_000}, owned, 0)  # a long one, cut at 3 tokens
    for _ in range(ingest.FINISHED_KEPT + 10):
        done = api.handle({"op": "open"}, owned, 0)["id"]
        api.handle({"op": "finish", "id": done}, owned, 0)
    # the ids only: the transcripts are the store's to evict (kept here, 256 of them held 328 MiB outside
    # transcript_memory_mb)
    assert len(owned.finished) == ingest.FINISHED_KEPT and not owned.open
    assert all(isinstance(v, str) for v in owned.finished.values())
    assert api.handle({"op": "push", "id": done, "text": "x"}, owned, 0)["error"].endswith("finished (stop)")
    assert "unknown id" in api.handle({"op": "push", "id": first, "text": "x"}, owned, 0)["error"]  # forgotten


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_speaks_to_a_real_socket(tmp_path, abstract):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"tokenwire-test-{id(sock)}"
        sock.bind("\0" + name)
        env = {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "4000000"}
    else:
        sock.bind(str(tmp_path / "n.sock"))
        env = {"NOTIFY_SOCKET": str(tmp_path / "n.sock")}
    sock.settimeout(5)
    n = Notifier(env)
    assert n.enabled
    assert n.ready("up") and n.watchdog() and n.stopping()
    msgs = [sock.recv(1024).decode() for _ in range(3)]
    assert msgs[0] == "READY=1\nSTATUS=up" and msgs[1] == "WATCHDOG=1" and msgs[2].startswith("STOPPING=1")
    assert (n.watchdog_s == 4.0) == abstract
    n.close()
    sock.close()


def test_sd_notify_is_a_no_op_outside_systemd():
    n = Notifier({})
    assert not n.enabled and not n.ready("x")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_unit_verifies(tmp_path):
    import sys

    tokenwire = Path(sys.executable).with_name("tokenwire")
    unit = (ROOT / "systemd" / "tokenwire.service").read_text().replace("/opt/tokenwire/bin/tokenwire", str(tokenwire))
    path = tmp_path / "tokenwire.service"
    path.write_text(unit)
    out = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    problems = [line for line in out.stderr.splitlines() if "tokenwire.service" in line]
    assert out.returncode == 0 and not problems, out.stderr
    for key in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "User=tokenwire",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=",
        "CapabilityBoundingSet=\n",
        "ConfigurationDirectory=",
        "StateDirectory=",
    ):
        assert key in unit, key


def test_cert_command_writes_a_usable_pair_and_refuses_to_overwrite(tmp_path, capsys):
    from cryptography import x509

    from tokenwire.daemon.cli import main

    out = tmp_path / "tls"
    assert main(["cert", "--out-dir", str(out), "--host", "edge.example", "--host", "10.0.0.1"]) == 0
    cert = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["edge.example"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
    assert oct((out / "key.pem").stat().st_mode & 0o777) == "0o600"
    # what it prints goes into the example config's [server] table as it is (a second [server] was invalid)
    import tomllib

    printed = capsys.readouterr().out.split("set in the [server] table of tokenwire.toml:\n")[1]
    example = (Path(__file__).parent.parent / "systemd" / "tokenwire.toml.example").read_text()
    config = tomllib.loads(example.replace("[server]\n", "[server]\n" + printed, 1))
    assert config["server"]["certificate"] == str((out / "cert.pem").resolve())
    assert main(["cert", "--out-dir", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


def test_cert_force_replaces_both_files_or_neither(tmp_path, monkeypatch):
    """The certificate was written, then the key failed (permission denied): a new certificate beside the old
    key, which the daemon refused at its next start."""
    from tokenwire.daemon.cli import main

    assert main(["cert", "--out-dir", str(tmp_path)]) == 0
    before = {p: (tmp_path / p).read_bytes() for p in ("cert.pem", "key.pem")}
    real = os.replace

    def failing(src, dst):
        if str(dst).endswith("cert.pem"):
            raise PermissionError(13, "Permission denied", str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    assert main(["cert", "--out-dir", str(tmp_path), "--force"]) == 2
    monkeypatch.undo()
    assert {p: (tmp_path / p).read_bytes() for p in ("cert.pem", "key.pem")} == before  # the old pair, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cert.pem", "key.pem"]  # no temporary files


def test_cert_force_keeps_the_modes_and_group_the_service_reads_through(tmp_path):
    """The README's install gives the key group ``tokenwire`` and mode 0640; ``cert --force`` (the renewal it
    documents) wrote root:root 0600, so the reload kept the old certificate and the restart failed. A key that
    was world-readable does not stay so."""
    from tokenwire.daemon.cli import main

    assert main(["cert", "--out-dir", str(tmp_path)]) == 0
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    os.chmod(key, 0o640)
    os.chmod(cert, 0o640)
    group = 65534 if os.geteuid() == 0 else None  # root may give any group (nogroup stands in for tokenwire)
    if group is not None:
        os.chown(key, -1, group)
    old_key = key.read_bytes()
    assert main(["cert", "--out-dir", str(tmp_path), "--force"]) == 0
    assert key.read_bytes() != old_key  # renewed
    assert (key.stat().st_mode & 0o777, cert.stat().st_mode & 0o777) == (0o640, 0o640)
    if group is not None:
        assert key.stat().st_gid == group
    os.chmod(key, 0o644)
    assert main(["cert", "--out-dir", str(tmp_path), "--force"]) == 0
    assert key.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cert.pem", "key.pem"]  # no temporary files


@pytest.mark.parametrize(("argv", "message"), [
    (["--days", "0"], "--days must be at least 1"),
    (["--host", "bad host!"], "'bad host!' is neither an IP address nor a DNS name"),
    (["--host=-lead.example"], "neither an IP address nor a DNS name"),
    (["--host", "a" * 64 + ".example"], "neither an IP address nor a DNS name"),
])
def test_cert_command_rejects_a_certificate_nobody_could_use(argv, message, tmp_path, capsys):
    """A 0-day certificate expires as it is made; a name with a space can never match a TLS server name."""
    from tokenwire.daemon.cli import main

    assert main(["cert", "--out-dir", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cert.pem").exists()


def test_self_signed_accepts_wildcards_and_idna_names():
    from tokenwire.transport.tls import make_self_signed

    make_self_signed(("*.edge.example", "xn--bcher-kva.example", "::1"), days=1)
    with pytest.raises(ValueError, match="bücher"):
        make_self_signed(("bücher.example",))


def test_ingest_socket_survives_bad_lines(tmp_path):
    """Every bad line gets an error reply and the connection, with the answers it owns, stays open (a
    disconnect fails them). Invalid UTF-8 and deep nesting used to kill the connection with a traceback in
    the daemon's log; an over-long line closed it."""
    import asyncio
    import json

    from tokenwire.daemon.ingest import MAX_LINE, serve_ingest

    async def go() -> list[dict]:
        store = TranscriptStore(max_bytes=1 << 22, retain_s=10)
        server = await serve_ingest(tmp_path / "ingest.sock", IngestAPI(store, max_tokens=lambda: 100))
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "ingest.sock"), limit=1 << 22)
        replies = []

        async def send(raw: bytes) -> dict:
            writer.write(raw + b"\n")
            await writer.drain()
            replies.append(json.loads(await asyncio.wait_for(reader.readline(), 10)))
            return replies[-1]

        rid = (await send(b'{"op": "open"}'))["id"]
        for bad in (b"\xff\xfe not utf-8", b"[" * 100_000 + b"]" * 100_000, b'{"op": "x", "pad": "' + b"a" * MAX_LINE
                    + b'"}', json.dumps({"op": "push", "id": rid, "text": "lone \ud83d"}).encode()):
            await send(bad)
        await send(json.dumps({"op": "push", "id": rid, "text": "still here"}).encode())
        await send(json.dumps({"op": "finish", "id": rid}).encode())
        writer.close()
        server.close()
        return replies

    replies = asyncio.run(go())
    assert [r["ok"] for r in replies] == [True, False, False, False, False, True, True]
    assert "UTF-8" in replies[1]["error"] and "nested" in replies[2]["error"] and "long" in replies[3]["error"]
    assert replies[-1] == {"ok": True, "tokens": 1}


def _daemon_config(tmp_path, text: str) -> str:
    path = tmp_path / "d.toml"
    path.write_text(text)
    return str(path)


def test_daemon_start_failures_are_one_line_naming_the_setting(tmp_path, capsys):
    """A port in use, an unbindable address, a key that is not the certificate's: one line and exit 2, not a
    uvloop traceback (the UDP one did not even say why), and a mismatched key no longer starts a daemon
    whose every handshake fails."""
    import socket

    from tokenwire.daemon.cli import main
    from tokenwire.transport.tls import make_self_signed

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
        udp.bind(("127.0.0.1", 0))
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        udp_port, tcp_port = udp.getsockname()[1], tcp.getsockname()[1]
        cases = {
            f'[server]\nlisten = ["127.0.0.1:{udp_port}"]\n[metrics]\nlisten = "127.0.0.1:0"\n':
                f"server.listen: cannot listen on udp/127.0.0.1:{udp_port}: Address already in use",
            f'[server]\nlisten = ["127.0.0.1:0"]\n[metrics]\nlisten = "127.0.0.1:{tcp_port}"\n':
                f"metrics.listen: cannot listen on tcp/127.0.0.1:{tcp_port}: Address already in use",
            '[server]\nlisten = ["192.0.2.1:4433"]\n[metrics]\nlisten = "127.0.0.1:0"\n':
                "server.listen: cannot listen on udp/192.0.2.1:4433: Cannot assign requested address",
        }
        for text, message in cases.items():
            assert main(["daemon", "--config", _daemon_config(tmp_path, text)]) == 2
            err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
            assert err == [f"tokenwire daemon: error: {message}"], err
    (tmp_path / "a-file").write_text("")
    kv_under_a_file = _daemon_config(
        tmp_path, '[server]\nlisten = ["127.0.0.1:0"]\n[metrics]\nlisten = "127.0.0.1:0"\n'
        f'[kv]\nenabled = true\nlisten = "127.0.0.1:0"\ndirectory = "{tmp_path}/a-file/kv"\n')
    assert main(["daemon", "--config", kv_under_a_file]) == 2
    assert f"tokenwire daemon: error: kv.directory: cannot use {tmp_path}/a-file" in capsys.readouterr().err
    make_self_signed(("a.test",)).write(tmp_path / "a.pem", tmp_path / "a.key")
    make_self_signed(("b.test",)).write(tmp_path / "b.pem", tmp_path / "b.key")
    mismatched = _daemon_config(tmp_path, f'[server]\nlisten = ["127.0.0.1:0"]\ncertificate = "{tmp_path}/a.pem"\n'
                                          f'private_key = "{tmp_path}/b.key"\n[metrics]\nlisten = "127.0.0.1:0"\n')
    for argv in (["daemon", "--config", mismatched], ["config", "check", mismatched]):
        assert main(argv) == 2
        assert "b.key does not belong to the certificate in" in capsys.readouterr().err


def test_an_unusable_client_ca_is_one_line_from_config_check_and_from_the_daemon(tmp_path, capsys):
    from tokenwire.daemon.cli import main

    (tmp_path / "junk.pem").write_text("not a certificate\n")
    (tmp_path / "a-dir").mkdir()
    for ca, why in (("junk.pem", "no PEM certificate in it"), ("a-dir", "Is a directory")):
        cfg = _daemon_config(tmp_path, f'[server]\nlisten = ["127.0.0.1:0"]\nclient_ca = "{tmp_path}/{ca}"\n'
                                       '[metrics]\nlisten = "127.0.0.1:0"\n')
        for argv in (["config", "check", cfg], ["daemon", "--config", cfg]):
            assert main(argv) == 2  # the daemon was a ValueError traceback; config check said "ok"
            err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
            assert len(err) == 1 and f"server.client_ca: CA file {tmp_path}/{ca}: {why}" in err[0], err


def test_config_check_names_the_certificate_and_its_expiry(tmp_path, capsys):
    import datetime

    from tokenwire.daemon.cli import main
    from tokenwire.transport.tls import certificate_summary, make_self_signed

    pair = make_self_signed(("edge.test", "10.0.0.1"), days=30)
    pair.write(tmp_path / "c.pem", tmp_path / "c.key")
    cfg = _daemon_config(tmp_path, f'[server]\ncertificate = "{tmp_path}/c.pem"\nprivate_key = "{tmp_path}/c.key"\n')
    assert main(["config", "check", cfg]) == 0
    assert "(edge.test, 10.0.0.1; expires " in capsys.readouterr().out
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=31)
    expiry = f"{pair.certificate.not_valid_after_utc:%Y-%m-%d}"
    assert certificate_summary(pair.certificate, now=later).endswith(f"EXPIRED {expiry}")


def test_flush_counters_adds_each_connections_new_packet_counts_to_the_metrics():
    """The per-connection SenderStats reach Prometheus as deltas, the trimmed-repeats counter included."""
    from types import SimpleNamespace

    from tokenwire.daemon.connection import DaemonProtocol
    from tokenwire.daemon.telemetry import Metrics
    from tokenwire.transport.chatterbox import SenderStats

    metrics = Metrics()
    totals = SenderStats(packets=10, redundant_bytes=300, repairs=1, piggybacks=2, repeats_trimmed=4, repeats_capped=3)
    unvalidated: list[int] = []
    conn = SimpleNamespace(
        server_session=SimpleNamespace(totals=lambda: totals, acks_received=5, ce_reported=0,
                                       ecn=SimpleNamespace(failures=1), path_changes=2, drains=1),
        daemon=SimpleNamespace(metrics=metrics, marking=SimpleNamespace(
            add_ce=lambda n: None, add_validation_failures=unvalidated.append)),
        _reported=SenderStats(), _reported_acks=0, _reported_ce=0, _reported_unvalidated=0,
        _reported_path_changes=0, _reported_drains=0,
    )  # fmt: skip
    DaemonProtocol.flush_counters(conn)
    totals = SenderStats(packets=15, redundant_bytes=300, repairs=1, piggybacks=2, repeats_trimmed=7, repeats_capped=5)
    conn.server_session.totals = lambda: totals
    conn.server_session.drains = 3
    DaemonProtocol.flush_counters(conn)
    assert unvalidated == [1, 0]  # an ECN validation failure counted once
    value = metrics.registry.get_sample_value
    assert value("tokenwire_token_packets_total") == 15
    assert value("tokenwire_repairs_total") == 3
    assert value("tokenwire_repeats_trimmed_total") == 7
    assert value("tokenwire_repeats_capped_total") == 5
    assert value("tokenwire_acks_total") == 5
    assert value("tokenwire_path_changes_total") == 2  # (two moves, counted once)
    assert value("tokenwire_path_drains_total") == 3  # (one, then two more)


def test_kv_codec_warm_up_failure_is_a_startup_error_naming_the_unit_setting():
    from tokenwire.daemon.kv_runtime import warm_up_codec
    from tokenwire.daemon.startup import StartupError

    def refused():
        raise PermissionError(13, "cannot allocate executable memory")

    with pytest.raises(StartupError) as info:
        asyncio.run(warm_up_codec(refused))
    assert "kv: the KV codec cannot compile" in str(info.value) and "MemoryDenyWriteExecute=no" in str(info.value)
    asyncio.run(warm_up_codec(lambda: 0.1))  # a working JIT: no error


def test_a_base_install_is_told_which_extra_a_command_or_kv_needs(tmp_path, monkeypatch, capsys):
    """`pip install .` (the daemon's install) has no torch: `predictor export`, `kv bench`... ended in a
    ModuleNotFoundError traceback, and a [kv] daemon named the module but not what to install."""
    import tomllib

    from tokenwire.daemon import cli
    from tokenwire.daemon.kv_runtime import warm_up_failure

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ModuleNotFoundError(name="torch")
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"x")
    assert cli.main(["predictor", "export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: needs torch, from the 'ml' extra: pip install torch==2.13.0" in err
    with pytest.raises(ModuleNotFoundError) as missing:  # (a try/except skipped the check if torch imported)
        import torch  # noqa: F401
    assert "needs the 'ml' extra: pip install torch==2.13.0" in warm_up_failure(missing.value)
    # every extra named exists in pyproject.toml and has its install line
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert set(cli.OPTIONAL_MODULES.values()) <= set(pyproject["project"]["optional-dependencies"])
    assert set(cli.OPTIONAL_MODULES.values()) == set(cli.EXTRA_INSTALL)
    monkeypatch.setitem(sys.modules, "nonexistent_helper", None)

    def broken(args):
        import nonexistent_helper  # noqa: F401  (not an extra's: a bug, shown as one)

    monkeypatch.setattr(cli, "check_outputs", lambda args: setattr(args, "handler", broken))
    with pytest.raises(ModuleNotFoundError):
        cli.main(["config", "new-token", "--name", "x"])


def test_kv_codec_warm_up_under_memory_deny_write_execute(tmp_path):
    """The real refusal: prctl(PR_SET_MDWE), the mechanism systemd's MemoryDenyWriteExecute=yes uses on Linux
    >= 6.3, in a child process whose numba cache is empty (a warm cache would hide the JIT)."""
    script = (
        "import asyncio, ctypes, sys\n"
        "if ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) != 0: sys.exit(77)\n"
        "from tokenwire.daemon.kv_runtime import warm_up_codec\n"
        "from tokenwire.daemon.startup import StartupError\n"
        "try:\n    asyncio.run(warm_up_codec())\nexcept StartupError as e:\n    print(e); sys.exit(3)\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    if out.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE")
    assert out.returncode == 3, out.stderr[-2000:]
    assert "cannot allocate executable memory" in out.stdout and "MemoryDenyWriteExecute=no" in out.stdout


def test_config_files_as_operators_write_them(tmp_path, monkeypatch, capsys):
    """A byte-order mark read as "Invalid statement (line 1, column 1)"; TOKENWIRE_CONFIG set but empty was
    "no such file" for the default path; an unreadable folder on a key's way was a bare "Permission denied"
    naming neither the key nor the setting; an empty certificate file was an IndexError traceback."""
    from tokenwire.daemon import config as config_mod
    from tokenwire.daemon.config import ConfigError, load_config

    bom = tmp_path / "bom.toml"
    bom.write_bytes("\ufeff[limits]\nmax_sessions = 7\n".encode())
    assert load_config(bom).limits.max_sessions == 7

    monkeypatch.setenv("TOKENWIRE_CONFIG", "")
    monkeypatch.setattr(config_mod, "DEFAULT_PATH", tmp_path / "absent.toml")
    assert load_config().limits.max_sessions == config_mod.Limits().max_sessions

    real_exists = Path.exists

    def denied(self, *args, **kwargs):
        if self.name == "cert.pem":
            raise PermissionError(13, "Permission denied", str(self))
        return real_exists(self, *args, **kwargs)

    conf = tmp_path / "c.toml"
    conf.write_text('[server]\ncertificate = "tls/cert.pem"\nprivate_key = "tls/key.pem"\n')
    monkeypatch.setattr(Path, "exists", denied)
    with pytest.raises(ConfigError, match=r"server.certificate: .*cert.pem: cannot be read \(Permission denied\)"):
        load_config(conf)
    monkeypatch.undo()

    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "cert.pem").write_bytes(b"")
    from tokenwire.daemon.cli import main
    from tokenwire.transport.tls import make_self_signed

    make_self_signed(("localhost",)).write(tmp_path / "unused.pem", tmp_path / "tls" / "key.pem")
    assert main(["config", "check", str(conf)]) == 2
    err = capsys.readouterr().err
    assert "cert.pem: no certificate in it" in err and "Traceback" not in err, err


def test_a_token_name_is_a_principal_ingest_can_name(capsys):
    """A 200-character token name authenticated, but the ingest socket refuses principals over 128
    characters: that user could never attach to an ingested answer."""
    from tokenwire.daemon.cli import main
    from tokenwire.daemon.config import MAX_PRINCIPAL_CHARS, ConfigError, parse_config

    long = "n" * (MAX_PRINCIPAL_CHARS + 1)
    with pytest.raises(ConfigError, match=r"auth.tokens\[0\].name: at most 128 characters"):
        parse_config({"auth": {"tokens": [{"name": long, "sha256": "0" * 64}]}})
    assert main(["config", "new-token", "--name", long]) == 2
    assert "at most 128 characters" in capsys.readouterr().err


def test_max_request_bytes_is_bounded_by_the_protocols_frame_limit():
    """Config took up to 64 MiB, but the frame validator caps a request at 1 MiB: a 1.5 MB prompt under an
    8-MiB limit was refused as malformed, closing the connection."""
    from tokenwire.daemon.config import ConfigError, parse_config

    assert parse_config({"limits": {"max_request_bytes": 1 << 20}}).limits.max_request_bytes == 1 << 20
    with pytest.raises(ConfigError, match=r"limits.max_request_bytes: expected an integer in \[1024, 1048576\]"):
        parse_config({"limits": {"max_request_bytes": 8 << 20}})


def test_a_certificate_principal_is_one_ingest_can_name():
    """A client certificate without a common name got its whole RFC 4514 subject as its principal: one past
    128 characters could never be named by ingest, so that client could attach to no ingested answer."""
    from tokenwire.daemon.certificates import cert_principal
    from tokenwire.daemon.config import MAX_PRINCIPAL_CHARS

    assert cert_principal("carol") == "cert:carol"  # the documented form is kept where it fits
    subject = "O=Example Edge Operators,OU=" + "regional-fleet-" * 10 + ",C=DE"
    long = cert_principal(subject)
    assert len(long) == MAX_PRINCIPAL_CHARS and long.startswith("cert:O=Example Edge") and long[-17] == "~"
    assert cert_principal(subject) == long  # stable: the application computes it once
    assert cert_principal(subject.replace("C=DE", "C=FR")) != long  # same prefix, another certificate
    odd = cert_principal("carol\n2026-12-05 WARNING forged")  # a line break would forge a log line
    assert odd.isprintable() and odd.startswith("cert:carol?2026") and odd[-17] == "~"
    assert len(cert_principal("x" * 10_000)) == MAX_PRINCIPAL_CHARS
    # a name that spells out another's shortened form is hashed too (review: it took that principal)
    forged = odd.removeprefix("cert:")
    assert cert_principal(forged) != odd and cert_principal(forged)[-17] == "~"


def test_cert_writes_through_symlinks_as_it_did(tmp_path):
    """The atomic rename replaced a symlink (cert.pem -> real/cert.pem) with a file: a daemon reading the
    link's target kept the old pair."""
    from tokenwire.transport.tls import make_self_signed

    (tmp_path / "real").mkdir()
    for name in ("cert.pem", "key.pem"):
        (tmp_path / "real" / name).write_text("old")
        (tmp_path / name).symlink_to(tmp_path / "real" / name)
    pair = make_self_signed(("localhost",))
    pair.write(tmp_path / "cert.pem", tmp_path / "key.pem")
    assert (tmp_path / "cert.pem").is_symlink() and (tmp_path / "key.pem").is_symlink()
    assert (tmp_path / "real" / "cert.pem").read_bytes() == pair.cert_pem
    assert (tmp_path / "real" / "key.pem").read_bytes() == pair.key_pem


def test_an_ingest_socket_in_a_folder_that_does_not_exist_is_refused_naming_the_setting(tmp_path):
    """The daemon made the missing folders (as root: anywhere a typo pointed); now it does not start, and says
    which setting and folder."""
    from tokenwire.daemon.config import parse_config
    from tokenwire.daemon.service import Daemon
    from tokenwire.daemon.startup import StartupError

    sock = tmp_path / "no" / "such" / "ingest.sock"
    cfg = parse_config({"server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": ""},
                        "ingest": {"socket": str(sock)}})

    async def go() -> str:
        try:
            await Daemon(cfg).start()
        except StartupError as exc:
            return str(exc)
        raise AssertionError("started")

    message = asyncio.run(go())
    assert message == f"ingest.socket: cannot listen on {sock}: no such folder", message
    assert not (tmp_path / "no").exists()


def test_the_token_and_kv_ingest_sockets_need_paths_of_their_own(tmp_path):
    """config check passed one path for both; the daemon then exited with "another process is listening on this
    socket" (its own token ingest socket)."""
    sock = str(tmp_path / "ingest.sock")
    with pytest.raises(ConfigError) as info:
        parse_config({"ingest": {"socket": sock}, "kv": {"enabled": True, "ingest_socket": sock}})
    assert "kv.ingest_socket" in str(info.value) and "ingest.socket" in str(info.value)
    ok = parse_config({"ingest": {"socket": sock}, "kv": {"enabled": True, "ingest_socket": sock + "2"}})
    assert ok.kv.ingest_socket != ok.ingest.socket
    parse_config({"ingest": {"socket": sock}, "kv": {"enabled": False, "ingest_socket": sock}})  # never opened


def test_a_key_renewed_by_a_user_outside_its_group_is_not_opened_to_another_group():
    """keep_mode copied 0640 but, not being root, could not give the key its group: the new key was readable by
    the renewing user's own group instead."""
    import tempfile

    from tokenwire.transport.file_modes import keep_mode

    if os.geteuid() != 0:
        pytest.skip("needs root to make a file of another group and act as another user")
    with tempfile.TemporaryDirectory() as folder:  # (pytest's tmp_path is in a folder only root may enter)
        os.chmod(folder, 0o755)
        old, new = Path(folder) / "key.pem", Path(folder) / "new.pem"
        old.write_text("old")
        new.write_text("new")
        os.chmod(old, 0o640)  # root:root
        os.chown(new, 65534, 65534)  # as nobody made it
        os.setegid(65534)
        os.seteuid(65534)
        try:
            keep_mode(old, new, private=True)
        finally:
            os.seteuid(0)
            os.setegid(0)
        assert new.stat().st_mode & 0o777 == 0o600 and new.stat().st_gid == 65534
        keep_mode(old, new, private=True)  # root: the old key's owner, group and mode
        assert (new.stat().st_uid, new.stat().st_gid, new.stat().st_mode & 0o777) == (0, 0, 0o640)
