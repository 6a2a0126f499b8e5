"""SIGHUP's decisions, without I/O: what a reload applies of a new configuration (auth tokens, limits and
logging), what it leaves for a restart (by key, and STATUS's "restart pending" note), what it warns of upstream
files a start would refuse (never a refusal: upstreams are not reloaded), at which log level it
announces itself, whether each authorized connection keeps its authorization under the new tokens, when a reload
that would remove every token is refused, and the warning a reload that removes the last token on purpose logs.

Split out of ``service.py``: :meth:`Daemon.reload <tokenwire.daemon.service.Daemon.reload>` reads the file,
replaces the logging handlers, swaps the configuration in and takes up renewed TLS files (its I/O shell); what it
decides is a plain function of the running and the new configuration here, testable without a daemon, a socket or
a file (tests/test_reload_decisions.py).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import NamedTuple

from .config import AuthConfig, Config, TokenEntry, restart_changes, restart_sections
from .upstream_config import Route, UpstreamConfig, UpstreamFileProblem


@dataclasses.dataclass(frozen=True)
class ReloadPlan:
    """What a reload does with a configuration read again from the running one's file."""

    config: Config  # what runs after it: the new auth, limits and logging; every other section as running
    reformat: bool  # the log format changes: the root handlers are replaced (only on a change)
    needs_restart: list[str]  # changed sections a reload cannot apply (config.restart_changes): not applied
    transcript_max_bytes: int  # the transcript store's bounds under the new limits
    transcript_retain_s: float
    announce_level: str  # the log level while the reload's own lines are logged; the new one follows
    changed: list[str] = dataclasses.field(default_factory=list)  # what it applies that differs: changed_settings
    # the keys behind needs_restart (restart_settings): STATUS names them until a restart or a reload reverting them
    restart_pending: list[str] = dataclasses.field(default_factory=list)
    # what the reload logs of them, as (level, line): what is new against what was pending already (restart_log)
    restart_lines: list[tuple[int, str]] = dataclasses.field(default_factory=list)


def plan_reload(running: Config, new: Config, log_format_override: str | None = None, *,
                pending: Sequence[str] = (), last_read: Config | None = None) -> ReloadPlan:
    """The reload of ``running`` to ``new``. ``log_format_override`` (``--log-format``) wins over the file's
    format on reload too, as at start. ``pending``: the keys a previous reload left for a restart;
    ``last_read``: the file as that reload read it (None: as running), to tell a pending key changed again."""
    log_format = log_format_override or new.logging.format
    needs_restart = restart_changes(running, new)
    now_pending = restart_settings(running, new)
    # a key pending before and still pending whose value changed since the last read is a new change too
    again = [k for k in restart_settings(last_read, new) if k in pending and k in now_pending] if last_read else []
    applied = dataclasses.replace(running, auth=new.auth, limits=new.limits,
                                  logging=dataclasses.replace(new.logging, format=log_format))
    return ReloadPlan(
        config=applied,
        reformat=log_format != running.logging.format,
        needs_restart=needs_restart,
        transcript_max_bytes=int(new.limits.transcript_memory_mb * (1 << 20)),
        transcript_retain_s=new.limits.transcript_retain_s,
        # at the more verbose of the two levels: at the old one, a reload from "warning" to "info" left no trace,
        # and at the new one, the other way round
        announce_level=min(running.logging.level, new.logging.level,
                           key=lambda lv: logging.getLevelName(lv.upper())),
        changed=changed_settings(running, applied),
        restart_pending=now_pending,
        restart_lines=restart_log(needs_restart, list(pending), now_pending, again),
    )


_UNTIL = "STATUS says so until a restart, or a reload that reverts them"


def restart_log(sections: Sequence[str], before: Sequence[str], now: Sequence[str],
                again: Sequence[str] = ()) -> list[tuple[int, str]]:
    """What a reload logs of the settings left for a restart, as (level, line). ``sections``: the sections that
    differ from what runs; ``before``: the keys pending before this reload; ``now``: after it; ``again``: keys
    pending on both sides whose value changed since the last reload. Each SIGHUP while a restart was pending
    repeated "changes to server need a restart and were not applied" at WARNING, the file untouched: it read as
    if new changes had been refused. Only what is new is a warning; a set unchanged is one INFO line."""
    if not before:  # the first ones: as every reload logged them
        first = [f"reload: changes to {', '.join(sections)} need a restart and were not applied"] if sections else []
        first += [f"reload: restart pending: {', '.join(now)} ({_UNTIL})"] if now else []
        return [(logging.WARNING, line) for line in first]
    added = [k for k in now if k not in before]
    reverted = [k for k in before if k not in now]
    fresh = added + [k for k in again if k not in added]
    out: list[tuple[int, str]] = []
    if reverted:
        out.append((logging.INFO, f"reload: {', '.join(reverted)} back to what runs: no longer pending a restart"
                                  f"{'' if now else ' (none is now)'}"))
    if fresh:
        out.append((logging.WARNING, f"reload: new changes to {', '.join(fresh)} need a restart and were not "
                                     "applied"))
        out.append((logging.WARNING, f"reload: restart pending: {', '.join(now)} ({_UNTIL})"))
    elif now:
        out.append((logging.INFO, f"reload: restart still pending: {', '.join(now)} (no new change needing a restart "
                                  f"since the last reload; {_UNTIL})"))
    return out


def auth_off_refusal(running: AuthConfig, new: AuthConfig) -> str | None:
    """Why a reload to ``new`` is refused for switching token authentication off, or None. A reload that removes
    every auth token must be meant: the new file must say ``tokens = []`` in its [auth] table. A file read while
    it was being rewritten in place (truncated before the [[auth.tokens]] tables, which the README says to append
    at its end) had dropped them all, and the daemon let in anyone; an [auth] header alone proves nothing (the
    example has one near the top, the tables come last)."""
    if not running.required or new.required or new.declared_none:
        return None
    n = len(running.tokens)
    return (f"it has no auth token, where {n} {'is' if n == 1 else 'are'} in force: a reload does not switch token "
            "authentication off unless the file says so with `tokens = []` in its [auth] table (a file being "
            "written? write it beside this one and rename it into place)")


def _differences(where: str, old: object, new: object) -> list[str]:
    """The keys of one table (a dataclass) that differ, as ``where.key`` (the file's key names)."""
    if not dataclasses.is_dataclass(old) or not dataclasses.is_dataclass(new):
        return [where] if old != new else []
    return [f"{where}.{_KEY_NAMES.get(f.name, f.name)}" for f in dataclasses.fields(old)
            if getattr(old, f.name) != getattr(new, f.name)]


# fields held in other units than the file's keys ([kv] capacity_mb is KVConfig.capacity_bytes)
_KEY_NAMES = {"capacity_bytes": "capacity_mb", "ingest_memory_bytes": "ingest_memory_mb"}


def _upstream_differences(old: tuple[UpstreamConfig, ...], new: tuple[UpstreamConfig, ...]) -> list[str]:
    """Upstreams matched by name (an upstream inserted above another is not a change of every key below it):
    ``upstreams[i].key`` at its index in the new file, ``upstreams[i] (name) added``, ``upstreams (name)
    removed``. Keys only, never values: base_url and extra_headers may hold credentials."""
    before = {u.name: u for u in old}
    out: list[str] = []
    for i, u in enumerate(new):
        was = before.get(u.name)
        if was is None:
            out.append(f"upstreams[{i}] ({u.name}) added")
            continue
        if was.type != u.type:
            out.append(f"upstreams[{i}].type")
        keys = dict.fromkeys([*was.options, *u.options])
        out += [f"upstreams[{i}].{k}" for k in keys if was.options.get(k) != u.options.get(k)]
    names = {u.name for u in new}
    return out + [f"upstreams ({u.name}) removed" for u in old if u.name not in names]


def _route_differences(old: tuple[Route, ...], new: tuple[Route, ...]) -> list[str]:
    """Routes by index: their order is what they mean (the first match wins)."""
    out: list[str] = []
    for i in range(max(len(old), len(new))):
        if i >= len(old):
            out.append(f"routes[{i}] added")
        elif i >= len(new):
            out.append(f"routes[{i}] removed")
        else:
            out += _differences(f"routes[{i}]", old[i], new[i])
    return out


def restart_settings(running: Config, new: Config) -> list[str]:
    """The settings of ``new`` that differ from ``running`` and need a restart, by key (``server.idle_timeout_s``),
    as :func:`changed_settings` names what a reload applies: "changes to server, metrics need a restart" left the
    operator to find which. [kv] and [marking] tweaks while off on both sides are none (config.restart_sections)."""
    out: list[str] = []
    for name, old, now in restart_sections(running, new):
        if name == "upstreams":
            out += _upstream_differences(old, now)
        elif name == "routes":
            out += _route_differences(old, now)
        else:
            out += _differences(name, old, now)
    return out


def restart_note(pending: list[str], shown: int = 6) -> str:
    """The start of STATUS while settings on disk wait for a restart ("" when none): a reload that left some
    unapplied said "reloaded; listening on ...", and `systemctl status` looked clean."""
    if not pending:
        return ""
    more = f" and {len(pending) - shown} more" if len(pending) > shown else ""
    return f"restart pending: {', '.join(pending[:shown])}{more} (see the log); "


def upstream_file_warnings(running: Config, problems: list[UpstreamFileProblem]) -> list[str]:
    """What a reload logs of the upstream files a start would refuse (upstream_config.upstream_file_problems of the new
    file). Warnings, not a refusal: upstreams are never replaced at a reload, and a key file missing for a moment
    (a rotation) refused the whole SIGHUP, so a token revoked in it stayed valid. A ``ca_file`` at the running
    path is left to the upstream's own reread (OpenAIUpstream.reload_ca), which says the running bundle is kept."""
    runs = {u.name: u.options for u in running.upstreams if u.type == "openai"}
    out: list[str] = []
    for problem in problems:
        running_path = runs.get(problem.upstream, {}).get(problem.key)
        if problem.path != running_path:
            out.append(f"reload: {problem.text}: a restart would refuse it (upstreams change only at a restart)")
        elif problem.key == "api_key_file":  # read at each request by the running upstream
            out.append(f"reload: {problem.text}: upstream {problem.upstream!r} reads it at each request, which "
                       "fails until it is fixed; a restart would refuse it")
    return out


def _shown(value: object) -> str:
    """A setting's value as the file writes it: 256 for 256.0 MiB, not Python's repr."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def changed_settings(running: Config, applied: Config) -> list[str]:
    """What a reload from ``running`` to ``applied`` changes of what it applies, each as ``section.key=new (was
    old)``, and auth tokens by name (never a digest). The reload line printed the whole new [limits] as a Python
    repr ("limits Limits(max_sessions=10000, ...)"): twelve values, and not a word of which one had changed."""
    out = [f"{section}.{f.name}={_shown(getattr(new, f.name))} (was {_shown(getattr(old, f.name))})"
           for section, old, new in (("limits", running.limits, applied.limits),
                                     ("logging", running.logging, applied.logging))
           for f in dataclasses.fields(new) if getattr(old, f.name) != getattr(new, f.name)]
    return out + _token_changes(running.auth, applied.auth)


def _token_changes(old: AuthConfig, new: AuthConfig) -> list[str]:
    """Auth tokens added, removed, renamed (the same token under a new name) or replaced (a new token under a
    name that had one), by name."""
    old_names = {t.sha256: t.name for t in old.tokens}
    new_names = {t.sha256: t.name for t in new.tokens}
    added = [name for digest, name in new_names.items() if digest not in old_names]
    removed = [name for digest, name in old_names.items() if digest not in new_names]
    replaced = [name for name in added if name in removed]
    return ([f"auth token {name} added" for name in added if name not in replaced]
            + [f"auth token {name} removed" for name in removed if name not in replaced]
            + [f"auth token {name} replaced" for name in replaced]
            + [f"auth token {old_names[digest]} renamed {name}" for digest, name in new_names.items()
               if digest in old_names and old_names[digest] != name])


# What the next request of a connection that lost its authorization hears (its close reason, or its ERROR while
# answers still stream on it). "auth token revoked" was also said to a connection that never sent a token when a
# reload added the first ones: it was let in while none was required, and needs one now
REVOKED = "auth token revoked"
NOW_REQUIRED = "authentication is now required: reconnect with a valid auth token"


class TokenCheck(NamedTuple):
    """An authorized connection's token under the tokens in force after a reload."""

    valid: bool  # it stays authorized; False: its authorization is revoked
    entry: TokenEntry | None  # the entry in force for its token (a renamed one: the new name), when there is one
    why: str | None = None  # not valid: what its next request hears (REVOKED or NOW_REQUIRED)


def recheck_token(auth: AuthConfig, token: TokenEntry | None, sent_sha256: str | None = None) -> TokenCheck:
    """Whether a connection authorized with ``token`` (None: let in while no tokens were configured) stays
    authorized under ``auth``. ``sent_sha256``: the digest of the token such a connection sent anyway (None: it
    sent none)."""
    # the token it came with must still be there (by its digest: a renamed entry is the same token); a
    # connection let in without one needs one once a reload adds the first tokens
    if not auth.required:
        return TokenCheck(True, None)
    # Let in while no tokens were configured, nothing checked the token it sent; the SDK sends its token only until
    # the server answers, so a reload adding that very token closed it "auth token revoked" on its next request
    # (which carried none). By the sent token's digest, it stays authorized as that token's owner.
    digest = token.sha256 if token is not None else sent_sha256
    # (a lookup: a scan per connection was connections x tokens of work on the event loop at each reload)
    same = None if digest is None else auth.by_digest(digest)
    if same is not None:
        return TokenCheck(True, same)
    return TokenCheck(False, None, REVOKED if token is not None else NOW_REQUIRED)


def opened_auth_warning(running: AuthConfig, new: AuthConfig, *, certificates: bool, holding: int) -> str | None:
    """The warning for a reload that removes the last auth token, or None. No tokens means no token required
    (documented, as at start): revoking a leaked token that was the last one switched authentication off, logged only
    as "reloaded: 0 auth tokens" at INFO, and nothing told the operator the daemon now let in anyone.
    ``certificates``: server.client_ca is set (clients still need a certificate); ``holding``: open connections
    that authorized with a token now removed (they stay authorized: nothing is required any more)."""
    if not running.required or new.required:
        return None
    if certificates:
        who = "any client with a certificate signed by server.client_ca, without a token"
    else:
        who = "any client that reaches it, without a token (chat and KV channel)"
    held = (f"; the {holding} open connection{'s' if holding != 1 else ''} that authorized with a removed token "
            f"stay{'s' if holding == 1 else ''} authorized") if holding else ""
    return (f"reload: the last auth token was removed ({len(running.tokens)} before, none now): authentication by "
            f"token is OFF and the daemon now accepts {who}{held}; to keep tokens required, keep at least one "
            f"[[auth.tokens]] entry (a new one: tokenwire config new-token)")
