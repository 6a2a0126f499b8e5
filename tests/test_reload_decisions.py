"""SIGHUP's decisions (daemon/reload_decisions.py), without a daemon: what a reload applies, what waits for a
restart, the level its own lines are logged at, and which connections keep their authorization."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from tokenwire.daemon.config import AuthConfig, Config, TokenEntry, parse_config
from tokenwire.daemon.reload_decisions import (
    NOW_REQUIRED,
    REVOKED,
    opened_auth_warning,
    plan_reload,
    recheck_token,
)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


ALICE = TokenEntry("alice", _digest("alice-secret"))
BOB = TokenEntry("bob", _digest("bob-secret"))


def _config(**sections: Any) -> Config:
    return parse_config(sections)


def test_a_reload_applies_auth_limits_and_logging_and_keeps_every_other_section_running():
    running = _config(server={"listen": ["127.0.0.1:4433"]}, limits={"max_sessions": 10})
    new = _config(server={"listen": ["127.0.0.1:5544"]}, limits={"max_sessions": 20},
                  auth={"tokens": [{"name": "alice", "sha256": ALICE.sha256}]}, logging={"level": "debug"})
    plan = plan_reload(running, new)
    assert plan.config.limits.max_sessions == 20 and plan.config.auth.tokens == (ALICE,)
    assert plan.config.logging.level == "debug"
    assert plan.config.server == running.server  # a new listen address is not taken up: a restart is
    assert plan.needs_restart == ["server"]


def test_nothing_changed_but_reloadable_sections_needs_no_restart():
    running = _config(limits={"max_tokens": 100})
    plan = plan_reload(running, _config(limits={"max_tokens": 200}))
    assert plan.needs_restart == [] and plan.config.limits.max_tokens == 200


def test_the_transcript_stores_bounds_follow_the_new_limits():
    plan = plan_reload(_config(), _config(limits={"transcript_memory_mb": 2.5, "transcript_retain_s": 42}))
    assert plan.transcript_max_bytes == int(2.5 * (1 << 20)) and plan.transcript_retain_s == 42


def test_a_changed_log_format_replaces_the_handlers_and_an_unchanged_one_does_not():
    running = _config(logging={"format": "text"})
    assert plan_reload(running, _config(logging={"format": "json"})).reformat is True
    plan = plan_reload(running, _config(logging={"format": "text", "level": "debug"}))
    assert plan.reformat is False and plan.config.logging.format == "text"


def test_the_log_format_given_on_the_command_line_wins_over_the_files_on_reload():
    """--log-format json, the file says text: the daemon keeps json, and does not replace its handlers."""
    running = plan_reload(_config(), _config(), log_format_override="json").config  # as started
    assert running.logging.format == "json"
    plan = plan_reload(running, _config(logging={"format": "text"}), log_format_override="json")
    assert plan.config.logging.format == "json" and plan.reformat is False


@pytest.mark.parametrize(("old", "new", "announced"), [
    ("warning", "info", "info"),  # at the old level, this reload left no trace
    ("info", "warning", "info"),  # at the new level, that one
    ("error", "debug", "debug"),
    ("warning", "warning", "warning"),
])
def test_a_reload_is_logged_at_the_more_verbose_of_the_two_levels(old, new, announced):
    plan = plan_reload(_config(logging={"level": old}), _config(logging={"level": new}))
    assert plan.announce_level == announced and plan.config.logging.level == new


def test_a_connection_keeps_its_token_while_the_token_is_configured():
    check = recheck_token(AuthConfig((ALICE, BOB)), ALICE)
    assert check.valid and check.entry == ALICE


def test_a_renamed_token_is_the_same_token_under_its_new_name():
    renamed = TokenEntry("alice-laptop", ALICE.sha256)
    check = recheck_token(AuthConfig((renamed,)), ALICE)
    assert check.valid and check.entry == renamed


def test_a_removed_or_changed_token_revokes_the_connection():
    assert recheck_token(AuthConfig((BOB,)), ALICE) == (False, None, REVOKED)
    changed = TokenEntry("alice", _digest("alice-new-secret"))  # same name, another token
    assert recheck_token(AuthConfig((changed,)), ALICE) == (False, None, REVOKED)


def test_without_tokens_every_connection_stays_authorized():
    assert recheck_token(AuthConfig(()), ALICE) == (True, None, None)
    assert recheck_token(AuthConfig(()), None) == (True, None, None)


def test_a_connection_let_in_without_a_token_needs_one_once_the_first_tokens_are_added():
    """It is told that a token is now required, not that one was revoked: it never sent one."""
    assert recheck_token(AuthConfig((ALICE,)), None) == (False, None, NOW_REQUIRED)
    assert "revoked" not in NOW_REQUIRED and "reconnect" in NOW_REQUIRED


def test_a_token_sent_while_none_was_required_stays_authorized_when_a_reload_adds_it():
    """Nothing checked it while no tokens were configured; the reload that adds it found the connection without
    a token and revoked it (the SDK does not send it again: its next request was closed "auth token revoked")."""
    check = recheck_token(AuthConfig((BOB, ALICE)), None, ALICE.sha256)
    assert check == (True, ALICE, None)
    renamed = TokenEntry("alice-laptop", ALICE.sha256)  # by its digest, under whatever name it is added
    assert recheck_token(AuthConfig((renamed,)), None, ALICE.sha256).entry == renamed


def test_a_token_sent_while_none_was_required_that_is_not_added_needs_a_valid_one():
    assert recheck_token(AuthConfig((BOB,)), None, ALICE.sha256) == (False, None, NOW_REQUIRED)


def test_the_token_a_connection_authorized_with_wins_over_one_it_sent_before():
    # (a sent digest is kept only while the connection has no token entry; an entry it authorized with decides)
    assert recheck_token(AuthConfig((BOB,)), ALICE, BOB.sha256) == (False, None, REVOKED)


def test_a_reload_that_removes_the_last_token_warns_that_the_daemon_is_now_open():
    """Revoking the last (leaked) token switched authentication off with an INFO line, "reloaded: 0 auth tokens"."""
    warning = opened_auth_warning(AuthConfig((ALICE, BOB)), AuthConfig(()), certificates=False, holding=3)
    assert warning is not None
    assert "the last auth token was removed (2 before, none now)" in warning
    assert "accepts any client that reaches it, without a token" in warning
    assert "the 3 open connections that authorized with a removed token stay authorized" in warning
    assert "keep at least one [[auth.tokens]] entry" in warning
    one = opened_auth_warning(AuthConfig((ALICE,)), AuthConfig(()), certificates=False, holding=1)
    assert one is not None and "the 1 open connection that authorized with a removed token stays authorized" in one
    assert "open connection" not in (opened_auth_warning(AuthConfig((ALICE,)), AuthConfig(()), certificates=False,
                                                         holding=0) or "")


def test_without_tokens_but_with_client_certificates_the_warning_says_a_certificate_is_still_required():
    warning = opened_auth_warning(AuthConfig((ALICE,)), AuthConfig(()), certificates=True, holding=0)
    assert warning is not None and "with a certificate signed by server.client_ca, without a token" in warning
    assert "any client that reaches it" not in warning


@pytest.mark.parametrize(("running", "new"), [
    ((), ()),  # open before, open after: nothing changed
    ((), (ALICE,)),  # the first token: closed now
    ((ALICE,), (BOB,)),  # tokens still required
    ((ALICE, BOB), (BOB,)),
])
def test_only_a_reload_from_some_tokens_to_none_warns_that_the_daemon_is_open(running, new):
    assert opened_auth_warning(AuthConfig(running), AuthConfig(new), certificates=False, holding=0) is None
