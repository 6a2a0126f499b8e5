"""SIGHUP's decisions (daemon/reload_decisions.py), without a daemon: what a reload applies, what waits for a
restart, the level its own lines are logged at, and which connections keep their authorization."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from tokenwire.daemon.config import AuthConfig, Config, TokenEntry, parse_config
from tokenwire.daemon.reload_decisions import plan_reload, recheck_token


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
    assert recheck_token(AuthConfig((BOB,)), ALICE) == (False, None)
    changed = TokenEntry("alice", _digest("alice-new-secret"))  # same name, another token
    assert recheck_token(AuthConfig((changed,)), ALICE) == (False, None)


def test_without_tokens_every_connection_stays_authorized():
    assert recheck_token(AuthConfig(()), ALICE) == (True, None)
    assert recheck_token(AuthConfig(()), None) == (True, None)


def test_a_connection_let_in_without_a_token_needs_one_once_the_first_tokens_are_added():
    assert recheck_token(AuthConfig((ALICE,)), None) == (False, None)
