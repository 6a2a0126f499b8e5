"""SIGHUP's decisions, without I/O: what a reload applies of a new configuration (auth tokens, limits and
logging), what it leaves for a restart, at which log level it announces itself, and whether each authorized
connection keeps its authorization under the new tokens.

Split out of ``service.py``: :meth:`Daemon.reload <tokenwire.daemon.service.Daemon.reload>` reads the file,
replaces the logging handlers, swaps the configuration in and takes up renewed TLS files (its I/O shell); what it
decides is a plain function of the running and the new configuration here, testable without a daemon, a socket or
a file (tests/test_reload_decisions.py).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import NamedTuple

from .config import AuthConfig, Config, TokenEntry, restart_changes


@dataclasses.dataclass(frozen=True)
class ReloadPlan:
    """What a reload does with a configuration read again from the running one's file."""

    config: Config  # what runs after it: the new auth, limits and logging; every other section as running
    reformat: bool  # the log format changes: the root handlers are replaced (only on a change)
    needs_restart: list[str]  # changed sections a reload cannot apply (config.restart_changes): not applied
    transcript_max_bytes: int  # the transcript store's bounds under the new limits
    transcript_retain_s: float
    announce_level: str  # the log level while the reload's own lines are logged; the new one follows


def plan_reload(running: Config, new: Config, log_format_override: str | None = None) -> ReloadPlan:
    """The reload of ``running`` to ``new``. ``log_format_override`` (``--log-format``) wins over the file's
    format on reload too, as at start."""
    log_format = log_format_override or new.logging.format
    return ReloadPlan(
        config=dataclasses.replace(running, auth=new.auth, limits=new.limits,
                                   logging=dataclasses.replace(new.logging, format=log_format)),
        reformat=log_format != running.logging.format,
        needs_restart=restart_changes(running, new),
        transcript_max_bytes=int(new.limits.transcript_memory_mb * (1 << 20)),
        transcript_retain_s=new.limits.transcript_retain_s,
        # at the more verbose of the two levels: at the old one, a reload from "warning" to "info" left no trace,
        # and at the new one, the other way round
        announce_level=min(running.logging.level, new.logging.level,
                           key=lambda lv: logging.getLevelName(lv.upper())),
    )


class TokenCheck(NamedTuple):
    """An authorized connection's token under the tokens in force after a reload."""

    valid: bool  # it stays authorized; False: its authorization is revoked
    entry: TokenEntry | None  # the entry in force for its token (a renamed one: the new name), when there is one


def recheck_token(auth: AuthConfig, token: TokenEntry | None) -> TokenCheck:
    """Whether a connection authorized with ``token`` (None: let in while no tokens were configured) stays
    authorized under ``auth``."""
    # the token it came with must still be there (by its digest: a renamed entry is the same token); a
    # connection let in without one needs one once a reload adds the first tokens
    if not auth.required:
        return TokenCheck(True, None)
    if token is None:
        return TokenCheck(False, None)
    same = next((t for t in auth.tokens if t.sha256 == token.sha256), None)
    return TokenCheck(same is not None, same)
