"""An ingest open checks its principal against the auth tokens in force (ingest.principal_problem): it scanned every
configured token by name, on the daemon's event loop, for each open (linear in the tokens: 30,000 tokens, a scan
per open). AuthConfig now has a by-name lookup, built once with it, and the check uses it."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator

import pytest

from tokenwire.daemon.config import AuthConfig, TokenEntry, parse_config
from tokenwire.daemon.ingest import principal_problem


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class _CountedTokens(tuple):  # type: ignore[type-arg]
    """A token tuple that counts the scans over it."""

    scans = 0

    def __iter__(self) -> Iterator[TokenEntry]:
        type(self).scans += 1
        return super().__iter__()


def test_an_ingest_open_looks_its_principal_up_by_name_without_scanning_the_tokens():
    entries = _CountedTokens(TokenEntry(f"app-{i}", _digest(f"t{i}")) for i in range(1000))
    auth = AuthConfig(entries)  # (building its indexes scans them, once)
    _CountedTokens.scans = 0
    assert principal_problem("app-999", auth, certificates=False) is None
    assert principal_problem("app-0", auth, certificates=True) is None
    problem = principal_problem("nobody", auth, certificates=False)
    assert problem is not None and "is not the name of an auth token" in problem
    assert _CountedTokens.scans == 0


def test_by_name_gives_every_entry_of_a_name_in_file_order_and_none_for_an_unknown_one():
    config = parse_config({"auth": {"tokens": [
        {"name": "alice", "sha256": _digest("a1")},
        {"name": "bob", "sha256": _digest("b")},
        {"name": "alice", "sha256": _digest("a2")},  # a name may have several tokens (one being replaced)
    ]}})
    auth = config.auth
    assert [e.sha256 for e in auth.by_name("alice")] == [_digest("a1"), _digest("a2")]
    assert auth.by_name("bob") == (TokenEntry("bob", _digest("b")),)
    assert auth.by_name("carol") == () and AuthConfig().by_name("alice") == ()
    assert auth.by_name("alice")[1] is auth.by_digest(_digest("a2"))  # the same entries, indexed twice


def test_the_index_keeps_auth_config_immutable_and_compared_by_its_tokens_only():
    tokens = (TokenEntry("alice", _digest("a")), TokenEntry("bob", _digest("b")))
    auth = AuthConfig(tokens)
    assert auth == AuthConfig(tokens) and hash(auth) == hash(AuthConfig(tokens))
    with pytest.raises(dataclasses.FrozenInstanceError):
        auth.tokens = ()  # type: ignore[misc]
    assert "_by_name" not in repr(auth)
    # a reload's new configuration (or a replace) is a new index, never a stale one
    renamed = dataclasses.replace(auth, tokens=(TokenEntry("carol", _digest("a")),))
    assert renamed.by_name("alice") == () and renamed.by_name("carol") == (TokenEntry("carol", _digest("a")),)
    assert auth.by_name("alice") == (tokens[0],)
