"""SIGHUP's steps that act on a running daemon's parts, each given only the parts it changes or reads.

``reload_decisions.py`` decides what a reload applies (pure); :meth:`~tokenwire.daemon.service.Daemon.reload` runs
the reload in order (read the file, plan, swap the configuration, these steps, report). What is here: the check of
the marking model a restart would load, the TLS files renewed in place, the upstreams' CA bundles, the re-check of
every authorized connection against the tokens now in force, and the lines that say what the reload did.

Split out of ``service.py``: each step touches one part (the marking service, the QUIC configurations, the
upstreams, the connections), so none needs the daemon itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from aioquic.quic.configuration import QuicConfiguration

from .certificates import TlsReload, reload_tls
from .config import AuthConfig, Config, ServerConfig, path_missing
from .marking import MarkingService
from .reload_decisions import NOW_REQUIRED, ReloadPlan, recheck_token
from .upstreams import Upstream

if TYPE_CHECKING:
    from .connection import DaemonProtocol

# the daemon's logger (not this module's name): operators and tests filter the daemon's lines by it
log = logging.getLogger("tokenwire.daemon")

ModelCheck = asyncio.Future[tuple[str | None, str | None]]


def check_marking_model(marking: MarkingService, new: Config) -> ModelCheck | None:
    """With [marking] swiftqueue, warn when the model as configured now would not load, so that a restart
    would mark like l4s: a reload after the model file was corrupted said nothing, and after ``model`` changed
    to a bad path only that [marking] changes need a restart. Also warn when it loads but is not what runs (a
    model replaced in place, one that now loads where start fell back to l4s): the reload said nothing and the
    daemon kept the old marking. The start's check, on a worker thread (a load is ~40 ms, ~0.5 s with
    onnxruntime's first import: not on the event loop), whose future is returned; inline without a running loop
    (None then, as without swiftqueue)."""
    model = new.marking.model
    if new.marking.policy != "swiftqueue":
        return None

    def report(found: tuple[str | None, str | None]) -> None:
        problem, change = found
        if problem is not None:
            log.warning("reload: marking.model: %s; a restart would fall back to the l4s policy (running now: "
                        "%s)", problem, marking.effective_policy)
        elif change is not None:
            log.warning("reload: marking.model: %s (running now: %s)", change, marking.effective_policy)

    def checked(fut: ModelCheck) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            log.warning("reload: marking.model could not be checked: %s: %s", type(exc).__name__, exc)
        else:
            report(fut.result())

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        report(marking.model_on_disk(model))
        return None
    check = loop.run_in_executor(None, marking.model_on_disk, model)
    check.add_done_callback(checked)
    return check


def reload_tls_files(running: ServerConfig, new: Config | None, configs: list[QuicConfiguration],
                     client_ca_digest: bytes | None) -> TlsReload:
    """Take up a certificate or client CA bundle changed in place (at the running paths: changed paths need
    a restart), into ``configs`` (those serving the certificate). One that cannot be used, or is missing, is logged
    and the running one kept; ``ok`` is False then. ``new``: the file's configuration, whose TLS files at other
    paths than the running ones are checked to exist (a restart would fail without them; the reload read them
    leniently)."""
    if new is not None:
        for key in ("certificate", "private_key", "client_ca"):
            path = getattr(new.server, key)
            if path is not None and path != getattr(running, key) and path_missing(path):
                log.warning("reload: server.%s: %s does not exist: a restart would fail (the running TLS files "
                            "serve until then)", key, path)
    return reload_tls(running, configs, client_ca_digest)


def reload_upstream_cas(upstreams: Iterable[Upstream]) -> bool:
    """Each upstream's ca_file renewed in place, read again (an upstream with a ``reload_ca``: the openai
    one): it was read once at start, and a renewed bundle was ignored until a restart. False when one was
    refused (logged, the running bundle kept)."""
    ok = True
    for up in upstreams:
        reload_ca = getattr(up, "reload_ca", None)
        if callable(reload_ca):
            ok = bool(reload_ca()) and ok
    return ok


def recheck_auth(protocols: Iterable[DaemonProtocol], auth: AuthConfig) -> tuple[int, int]:
    """Re-check every authorized connection against the tokens in force (the KV channel checks each fetch);
    returns how many lost their authorization: those whose token was removed or changed, and those let in
    while no token was required that sent none now configured. Their running answers go on; see
    :meth:`~tokenwire.daemon.service.Daemon.on_request`."""
    removed = now_required = 0
    for proto in protocols:
        if not proto.authorized:
            continue
        valid, same, why = recheck_token(auth, proto.token, proto.sent_token_sha256)  # (reload_decisions.py)
        if same is not None:  # renamed, or sent while none was required: its new answers are the name's
            proto.token, proto.principal = same, same.name
        if not valid:
            proto.authorized, proto.revoked = False, why
            if why == NOW_REQUIRED:
                now_required += 1
            else:
                removed += 1
    return removed, now_required


def log_reloaded(plan: ReloadPlan, new: Config, opened: str | None, removed: int, now_required: int) -> None:
    """What an applied reload did: the settings left for a restart, what changed, auth opened to clients without
    a token (``opened``), and how many connections lost their authorization."""
    logging_cfg = plan.config.logging
    # the settings left for a restart, each by key (the sections alone left the operator to find which): a
    # WARNING only for what this reload found new, an INFO line for a pending set the file did not change
    for level, line in plan.restart_lines:
        log.log(level, "%s", line)
    # what changed, old and new (the whole [limits] as a Python repr said nothing of which setting had)
    log.info("reloaded: %d auth tokens; %s; logging %s/%s", len(new.auth.tokens),
             f"changed {', '.join(plan.changed)}" if plan.changed else "no setting it applies changed",
             logging_cfg.level, logging_cfg.format)
    if opened is not None:  # (at WARNING: the daemon is open to clients without a token from now on)
        log.warning("%s", opened)
    if removed or now_required:
        # what on_request does with them: the line said "refused" of connections it closes
        why = [f"{removed} whose token was removed or changed"] if removed else []
        if now_required:
            why.append(f"{now_required} let in while no token was required, that sent none of those now configured")
        log.warning("reload: %d connections lost their authorization (%s); the next request of each gets "
                    "UNAUTHORIZED: refused while answers still stream on its connection (they finish), else "
                    "its connection is closed", removed + now_required, "; ".join(why))
