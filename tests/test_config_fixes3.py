"""Configuration and SIGHUP, as a probe found them (/tmp/xp/s28/pH): an empty or comment-only file was every default
(a SIGHUP that read one truncated mid-write dropped every auth token; a start ran open on [::]:4433); loading N
tokens was quadratic and a wrong token was hashed once per entry; "" for a TLS path meant unset (client
certificates no longer required); a TLS file missing at reload refused the whole file (a token revoked with it
stayed valid); changes needing a restart were named by section only and STATUS looked clean; `config check` was
silent about a certificate ending within 14 days; the example's `tokens = [...]` line and new-token's
[[auth.tokens]] tables could not be combined."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tokenwire.daemon import config as config_mod
from tokenwire.daemon import reload_decisions
from tokenwire.daemon.cli import main
from tokenwire.daemon.config import AuthConfig, Config, ConfigError, TokenEntry, load_config, parse_config
from tokenwire.daemon.reload_decisions import auth_off_refusal, plan_reload, recheck_token, restart_settings
from tokenwire.daemon.service import Daemon
from tokenwire.transport.client import connect
from tokenwire.transport.tls import make_self_signed

from .daemon_proc import PAIR
from .test_loopback import run
from .test_reload_fixes3 import _daemon

ROOT = Path(__file__).resolve().parent.parent
ALICE, BOB = "alice-token-for-config-fixes3", "bob-token-for-config-fixes3"
BASE = '[server]\nlisten = ["127.0.0.1:0"]\n[metrics]\nlisten = ""\n'


def _table(name: str, token: str) -> str:
    return f'[[auth.tokens]]\nname = "{name}"\nsha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n'


WITH_ALICE = BASE + _table("alice", ALICE)
WITH_BOTH = WITH_ALICE + _table("bob", BOB)


def _idle_daemon(path: Path, text: str) -> Daemon:
    """A daemon not started (no listener): enough for what a reload decides and what STATUS says."""
    path.write_text(text)
    return Daemon(load_config(path))


# ------------------------------------------------------------------------------ 1. a file with no setting at all
@pytest.mark.parametrize("text", ["", "\n\n", "# tokenwire.toml\n# nothing yet\n", "\ufeff", "[server]\n[auth]\n"])
def test_a_file_with_no_setting_is_refused_by_load_and_config_check(tmp_path, capsys, text):
    """It was every default: `config check` said ok and the daemon started open on [::]:4433."""
    path = tmp_path / "tokenwire.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="no setting in it"):
        load_config(path)
    assert main(["config", "check", str(path)]) == 2
    assert "no setting in it" in capsys.readouterr().err


def test_a_reload_of_a_file_truncated_mid_write_is_refused_and_the_tokens_stay(tmp_path, caplog):
    """A SIGHUP that read the file truncated to 0 bytes (an in-place rewrite's first step) reloaded every
    default: "authentication by token is OFF", limits reset."""
    path = tmp_path / "tokenwire.toml"
    d = _idle_daemon(path, WITH_ALICE + "[limits]\nmax_tokens = 10\n")
    path.write_text("")
    with caplog.at_level(logging.ERROR, logger="tokenwire.daemon"):
        assert d.reload() is False
    assert d.config.auth.required and d.config.limits.max_tokens == 10
    assert "no setting in it" in caplog.text
    assert d.status_line().startswith("the last reload was refused")


def test_a_reload_removing_every_token_is_refused_unless_the_file_says_tokens_empty(tmp_path, caplog):
    """A file caught before its [[auth.tokens]] tables (appended at its end, as the README says) reads as one
    without tokens: the reload switched authentication off. Only `tokens = []` says that is meant; an [auth]
    header alone does not (the example has one near its top, far from the tables)."""
    path = tmp_path / "tokenwire.toml"
    d = _idle_daemon(path, WITH_ALICE)
    for partial in (BASE, "[auth]\n" + BASE):
        path.write_text(partial)
        with caplog.at_level(logging.ERROR, logger="tokenwire.daemon"):
            assert d.reload() is False
        assert d.config.auth.required
    assert "tokens = []" in caplog.text and "it has no auth token, where 1 is in force" in caplog.text
    path.write_text("[auth]\ntokens = []\n" + BASE)
    with caplog.at_level(logging.WARNING, logger="tokenwire.daemon"):
        assert d.reload() is True
    assert not d.config.auth.required
    assert "authentication by token is OFF" in caplog.text  # the explicit switch still warns, as before


def test_the_rule_for_switching_token_authentication_off():
    alice = TokenEntry("alice", hashlib.sha256(ALICE.encode()).hexdigest())
    assert auth_off_refusal(AuthConfig((alice,)), AuthConfig()) is not None
    assert auth_off_refusal(AuthConfig((alice,)), AuthConfig(declared_none=True)) is None
    assert auth_off_refusal(AuthConfig(), AuthConfig()) is None  # it was off already
    assert auth_off_refusal(AuthConfig((alice,)), AuthConfig((alice,))) is None
    # what the file says: `tokens = []` is the declaration, [auth] without it is not
    assert parse_config({"auth": {"tokens": []}}).auth.declared_none
    assert not parse_config({"auth": {}}).auth.declared_none and not parse_config({}).auth.declared_none
    assert not parse_config({"auth": {"tokens": [{"name": "a", "sha256": alice.sha256}]}}).auth.declared_none


# --------------------------------------------------------------------------------- 2. tokens: linear, hashed once
@contextlib.contextmanager
def _counting_lines(module: Any) -> Iterator[list[int]]:
    """The lines executed in ``module``'s file while inside: an operation count, not a time (the two cores the
    suite shares make timings useless)."""
    filename = module.__file__
    count = [0]

    def local(frame: Any, event: str, arg: Any) -> Callable[..., Any]:
        if event == "line":
            count[0] += 1
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Callable[..., Any] | None:
        return local if frame.f_code.co_filename == filename else None

    sys.settrace(tracer)
    try:
        yield count
    finally:
        sys.settrace(None)


def _tokens_table(n: int) -> dict[str, Any]:
    return {"tokens": [{"name": f"u{i}", "sha256": hashlib.sha256(str(i).encode()).hexdigest()} for i in range(n)]}


def test_loading_tokens_is_linear_in_their_number():
    """The duplicate-digest search scanned every entry before each: 10,000 tokens took 5.2 s on the event loop
    at reload, 30,000 46 s (past ~25,000 the watchdog would have killed the daemon)."""
    counts = []
    for n in (300, 600):
        table = _tokens_table(n)
        with _counting_lines(config_mod) as count:
            assert len(config_mod._auth(table).tokens) == n
        counts.append(count[0])
    assert counts[1] < 2.2 * counts[0], counts  # (quadratic: ~3.3 times)


def test_a_duplicate_digest_still_names_both_entries():
    table = _tokens_table(3)
    table["tokens"].append({"name": "again", "sha256": table["tokens"][1]["sha256"]})
    with pytest.raises(ConfigError, match=r"auth.tokens\[3\].sha256: the same digest as auth.tokens\[1\] \('u1'\)"):
        config_mod._auth(table)


def test_a_presented_token_is_hashed_once_whatever_the_number_of_tokens(monkeypatch):
    """AuthConfig.entry hashed the presented token once per entry: a wrong token cost 17.7 ms of event loop at
    10,000 tokens (and every unauthorized client sends one)."""
    auth = config_mod._auth(_tokens_table(1000))
    calls = [0]
    real = config_mod.hashlib.sha256

    def counting(*args: Any) -> Any:
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(config_mod.hashlib, "sha256", counting)
    assert auth.entry("not-a-token") is None
    assert calls[0] == 1
    assert auth.entry("999") == auth.tokens[999] and auth.principal("0") == "u0" and auth.entry(None) is None


def test_a_reload_rechecks_a_connection_by_lookup_not_by_scanning_the_tokens():
    """Each authorized connection's token was found by a scan of the new tokens: connections x tokens of work
    on the event loop at each reload."""
    counts = []
    for n in (100, 1000):
        auth = config_mod._auth(_tokens_table(n))
        last = auth.tokens[-1]
        with _counting_lines(reload_decisions) as count:
            assert recheck_token(auth, last).entry == last
        counts.append(count[0])
    assert counts[0] == counts[1], counts


def test_the_first_entry_of_a_digest_listed_twice_is_the_one_found():
    """(AuthConfig built directly can list a digest twice; the scan found the first: so does the lookup.)"""
    digest = hashlib.sha256(b"x").hexdigest()
    auth = AuthConfig((TokenEntry("first", digest), TokenEntry("second", digest)))
    assert auth.principal("x") == "first" and auth.by_digest(digest) == TokenEntry("first", digest)


# ----------------------------------------------------------------------------------------- 3. "" for a TLS path
@pytest.mark.parametrize(("server", "key"), [
    ({"client_ca": ""}, "server.client_ca"),
    ({"certificate": "", "private_key": ""}, "server.certificate"),
])
def test_an_empty_tls_path_is_refused_not_read_as_unset(server, key):
    """client_ca = "" meant no client certificates required (fails open); certificate = "" and private_key = ""
    the ephemeral self-signed certificate."""
    with pytest.raises(ConfigError, match=rf"{key}: expected a file path, got ''"):
        parse_config({"server": server})


@pytest.mark.parametrize("key", ["ca_file", "api_key_file"])
def test_an_empty_upstream_file_path_is_refused(key):
    """ca_file = "" trusted the system's CAs instead of the private one; api_key_file = "" sent no key."""
    upstream = {"name": "o", "type": "openai", "base_url": "https://127.0.0.1:8000/v1", key: ""}
    with pytest.raises(ConfigError, match=rf"upstreams\[0\].{key}: expected a file path, got ''"):
        parse_config({"upstreams": [upstream]})


def test_an_empty_marking_model_still_means_the_shipped_one():
    """(Documented in docs/swiftqueue.md: model = "" is the model shipped in tokenwire.predictor.)"""
    assert parse_config({"marking": {"policy": "l4s", "model": ""}}).marking.model is None


# ------------------------------------------------------------------------------------- 4. a TLS file missing at reload
def _tls_config(tmp_path: Path, body: str) -> str:
    PAIR.write(tmp_path / "cert.pem", tmp_path / "key.pem")
    return BASE.replace("[metrics]", 'certificate = "cert.pem"\nprivate_key = "key.pem"\n[metrics]') + body


def test_a_tls_file_missing_at_reload_keeps_the_running_one_and_applies_the_rest(tmp_path, caplog):
    """key.pem briefly absent mid-renewal refused the whole reload: a token revoked in the same SIGHUP stayed
    valid. Now it is handled as a pair that cannot be used is: logged, the running TLS kept, the rest applied,
    STATUS flagged."""
    path = tmp_path / "tokenwire.toml"
    text = _tls_config(tmp_path, _table("alice", ALICE) + _table("bob", BOB))

    async def go() -> tuple[bool, str, str]:
        async with _daemon(path, text) as d:
            (tmp_path / "key.pem").unlink()
            path.write_text(text.replace(_table("bob", BOB), ""))  # bob's token revoked in the same SIGHUP
            ok = d.reload()
            async with connect("127.0.0.1", d.addresses[0][1], verify=False, auth_token=ALICE) as conn:
                answer = await conn.chat("hi", max_tokens=3).collect()  # the running certificate still serves
            return ok, d.status_line(), answer

    with caplog.at_level(logging.INFO, logger="tokenwire.daemon"):
        ok, status, answer = run(go())
    assert ok and answer
    assert "auth token bob removed" in caplog.text
    assert "still serving the running certificate" in caplog.text and "key.pem" in caplog.text
    assert status.startswith("TLS files refused at the last reload")


def test_a_tls_file_missing_at_start_is_still_an_error(tmp_path):
    path = tmp_path / "tokenwire.toml"
    path.write_text(_tls_config(tmp_path, ""))
    (tmp_path / "key.pem").unlink()
    with pytest.raises(ConfigError, match=r"server\.private_key: .*key\.pem does not exist"):
        load_config(path)
    assert load_config(path, tls_may_be_missing=True).server.private_key == tmp_path / "key.pem"


def test_a_reload_naming_tls_files_that_do_not_exist_warns_that_a_restart_would_fail(tmp_path, caplog):
    path = tmp_path / "tokenwire.toml"
    d = _idle_daemon(path, _tls_config(tmp_path, ""))
    path.write_text(path.read_text().replace('"key.pem"', '"new-key.pem"'))
    with caplog.at_level(logging.WARNING, logger="tokenwire.daemon"):
        assert d.reload() is True
    assert "server.private_key" in caplog.text and "new-key.pem does not exist: a restart would fail" in caplog.text
    assert "restart pending: server.private_key" in d.status_line()


# --------------------------------------------------------------------------------- 5. what waits for a restart, by key
def _cfg(**sections: Any) -> Config:
    return parse_config(sections)


def test_changes_that_need_a_restart_are_named_by_key():
    running = _cfg(server={"listen": ["127.0.0.1:4433"]})
    new = _cfg(server={"listen": ["127.0.0.1:4433"], "idle_timeout_s": 30}, metrics={"listen": ""},
               ingest={"max_open": 5}, marking={"policy": "l4s"},
               upstreams=[{"name": "demo", "type": "demo", "rate": 5}, {"name": "d2", "type": "demo"}],
               routes=[{"model": "x*", "upstream": "d2"}, {"model": "*", "upstream": "demo"}])
    assert restart_settings(running, new) == [
        "server.idle_timeout_s", "metrics.listen", "ingest.max_open", "upstreams[0].rate", "upstreams[1] (d2) added",
        "routes[0].model", "routes[0].upstream", "routes[1] added", "marking.policy"]
    assert restart_settings(new, running)[-3:] == ["routes[0].upstream", "routes[1] removed", "marking.policy"]
    assert "upstreams (d2) removed" in restart_settings(new, running)
    plan = plan_reload(running, new)
    assert plan.restart_pending == restart_settings(running, new) and "server" in plan.needs_restart


def test_kv_and_marking_tweaks_while_off_on_both_sides_need_no_restart():
    """[kv] chunk_tokens = 128 with kv disabled was "changes to kv need a restart": a restart changes nothing."""
    running = _cfg()
    quiet = _cfg(kv={"chunk_tokens": 128, "capacity_mb": 64}, marking={"margin_ms": 2.0})
    assert restart_settings(running, quiet) == [] and plan_reload(running, quiet).needs_restart == []
    on = _cfg(kv={"enabled": True, "capacity_mb": 64})
    assert restart_settings(running, on) == ["kv.enabled", "kv.capacity_mb"]


def test_status_says_restart_pending_until_a_restart_or_a_reload_that_reverts_it(tmp_path, caplog):
    """"changes to server, metrics need a restart and were not applied", then STATUS "reloaded; listening on
    ...": `systemctl status` looked clean while the file on disk was not what ran."""
    path = tmp_path / "tokenwire.toml"
    d = _idle_daemon(path, BASE)
    path.write_text(BASE.replace("[metrics]", "idle_timeout_s = 30\n[metrics]"))
    with caplog.at_level(logging.WARNING, logger="tokenwire.daemon"):
        assert d.reload() is True
    assert "changes to server need a restart and were not applied" in caplog.text
    assert "reload: restart pending: server.idle_timeout_s (STATUS says so" in caplog.text
    assert d.status_line().startswith("restart pending: server.idle_timeout_s (see the log); listening on ")
    # another reload, not reverting it: still pending
    path.write_text(BASE.replace("[metrics]", "idle_timeout_s = 30\n[metrics]") + "[limits]\nmax_tokens = 5\n")
    assert d.reload() is True and "restart pending: server.idle_timeout_s" in d.status_line()
    path.write_text("[limits]\nmax_tokens = 5\n" + BASE)  # reverted
    assert d.reload() is True and d.status_line().startswith("listening on ")


# ------------------------------------------------------------------------- 6. config check: a certificate ending soon
@pytest.mark.parametrize(("days", "warned"), [(3, True), (200, False)])
def test_config_check_warns_of_a_certificate_ending_within_14_days(tmp_path, capsys, days, warned):
    """The daemon warns at start and reload within 14 days of the end; `config check` only of an expired one."""
    make_self_signed(("localhost",), days=days).write(tmp_path / "cert.pem", tmp_path / "key.pem")
    path = tmp_path / "tokenwire.toml"
    path.write_text('[server]\ncertificate = "cert.pem"\nprivate_key = "key.pem"\n')
    assert main(["config", "check", str(path)]) == 0
    err = capsys.readouterr().err
    assert ("warning: server.certificate:" in err) is warned
    if warned:  # (3 days from its making, less the moments since: 2 whole days left)
        assert "it ends in 2 days; clients will refuse it then" in err and "cert.pem (localhost; expires " in err


# ------------------------------------------------------------------------- 7. the example's tokens and new-token's
def test_the_examples_token_table_and_new_tokens_output_make_one_valid_file(tmp_path, capsys):
    """The example showed `# tokens = [ { name = ..., sha256 = ... } ]`; uncommented, with new-token's
    [[auth.tokens]] table appended, the file was "Cannot mutate immutable namespace"."""
    example = (ROOT / "systemd" / "tokenwire.toml.example").read_text()
    commented = '# [[auth.tokens]]\n#   name = "alice"\n#   sha256 = "<64 hex digits>"\n'
    assert commented in example
    digest = hashlib.sha256(ALICE.encode()).hexdigest()
    text = example.replace(commented, f'[[auth.tokens]]\nname = "alice"\nsha256 = "{digest}"\n')
    assert main(["config", "new-token", "--name", "bob"]) == 0
    printed = capsys.readouterr().out
    text += printed[printed.index("[[auth.tokens]]\n"):]  # (the table, not the line naming it)
    path = tmp_path / "tokenwire.toml"
    path.write_text(text)
    assert [t.name for t in load_config(path).auth.tokens] == ["alice", "bob"]


def test_mixing_an_inline_token_array_with_token_tables_says_why_it_fails(tmp_path):
    """"Cannot mutate immutable namespace ('auth', 'tokens')" was all an operator who had kept the old example's
    `tokens = [...]` line and appended new-token's table was told."""
    path = tmp_path / "tokenwire.toml"
    path.write_text("[auth]\ntokens = []\n" + _table("alice", ALICE))
    with pytest.raises(ConfigError, match=r"cannot be extended by \[\[\.\.\.\]\] tables"):
        load_config(path)
