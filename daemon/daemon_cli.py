"""``tokenwire daemon``, ``tokenwire cert`` and ``tokenwire config check|new-token|example``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "daemon", help="run the edge service (QUIC token streaming)",
        description="Runs the edge service in the foreground: it terminates QUIC from chat clients, gets tokens "
        "from the upstreams its configuration names and streams them with the scheme each request asks for (and "
        "serves the KV channel when [kv] is on). Without a configuration file it serves the built-in demo answer "
        "on udp/[::]:4433 with an ephemeral self-signed certificate. SIGHUP reloads tokens, limits, logging and "
        "certificates without dropping sessions (a bad file is refused, the running one kept); SIGTERM or Ctrl-C "
        "drains the running answers and stops.",
    )
    p.add_argument("--config", type=Path, help="TOML file (default: $TOKENWIRE_CONFIG, else "
                   "/etc/tokenwire/tokenwire.toml if it exists, else the built-in defaults)")
    p.add_argument("--log-format", choices=("text", "json"),
                   help="log format, overriding the configuration's [logging] format, also across reloads (default: "
                   "the configuration's)")
    # its logs go to stderr: a daemon started with stdout closed (`>&-`) loses nothing
    p.set_defaults(handler=run_daemon, stdout_optional=True)

    c = sub.add_parser(
        "cert", help="make a self-signed development certificate and key",
        description="Writes a self-signed certificate for the names and addresses given (--host) and its private "
        "key, cert.pem and key.pem, and prints the [server] lines that point tokenwire.toml at them. "
        "Clients trust it with `tokenwire chat --cafile cert.pem`.",
    )
    c.add_argument("--out-dir", type=Path, default=Path("."), help="where to write cert.pem and key.pem")
    c.add_argument("--host", action="append", help="DNS name or IP (repeatable; default localhost, 127.0.0.1, ::1)")
    c.add_argument("--days", type=int, default=365, help="validity in days (1 to 36500; default 365)")
    c.add_argument("--force", action="store_true", help="overwrite existing files")
    c.set_defaults(handler=run_cert)

    cfg = sub.add_parser(
        "config", help="validate a configuration, make auth tokens, print the example files",
        description="Helpers for the daemon's TOML configuration: check a file before a start or a reload, make "
        "a bearer token, print the shipped example files.",
    )
    csub = cfg.add_subparsers(dest="config_command", metavar="ACTION")
    csub.required = True
    chk = csub.add_parser(
        "check", help="validate a TOML configuration file",
        description="Loads a configuration as the daemon would, certificates and socket and store paths "
        "included (nothing is bound or locked), and prints what the daemon would run with: listen addresses, "
        "certificate, auth, metrics, upstreams, routes, marking, ingest and KV. An error is one line and exit "
        "status 2; warnings go to stderr. Run it before a `systemctl reload`.",
    )
    chk.add_argument("path", type=Path, nargs="?", help="the file (default: the daemon's, $TOKENWIRE_CONFIG, else "
                     "/etc/tokenwire/tokenwire.toml)")
    chk.set_defaults(handler=run_check)
    tok = csub.add_parser(
        "new-token", help="print a new bearer token and the line that stores its hash",
        description="Makes a random bearer token and prints it once, with the [[auth.tokens]] table (the name "
        "and the token's SHA-256) to append to tokenwire.toml: the configuration stores the hash only, so give "
        "the token to the client and keep no other copy. Nothing is written.",
    )
    tok.add_argument("--name", default="client", help="who the token is for: the table's name, the principal the "
                     "daemon's logs show for clients with this token")
    tok.set_defaults(handler=run_new_token)
    ex = csub.add_parser("example", help="print the example configuration, or the systemd unit and its sysusers and "
                         "tmpfiles snippets, as shipped with this install",
                         description="Prints one of the files shipped with this install (an installed copy has "
                         "no source tree to copy systemd/ from): the example configuration with every key and its "
                         "default, the systemd unit, or its sysusers and tmpfiles snippets.")
    ex.add_argument("file", nargs="?", choices=tuple(EXAMPLE_FILES), default="config", metavar="FILE",
                    help="which file: config (tokenwire.toml.example, every key with its default), unit, sysusers or "
                    "tmpfiles (default: config)")
    ex.add_argument("--dir", action="store_true", help="print the folder holding the four files instead (the "
                    "README's systemd/ for an install without the source tree)")
    ex.set_defaults(handler=run_example)


# `tokenwire config example`'s files: systemd/ in the source tree, tokenwire/systemd/ installed (pyproject.toml)
EXAMPLE_FILES = {"config": "tokenwire.toml.example", "unit": "tokenwire.service", "sysusers": "tokenwire.sysusers",
                 "tmpfiles": "tokenwire.tmpfiles"}


def example_dir() -> Path:
    """Where the shipped systemd files are: beside the daemon package both in the source tree (daemon/ and
    systemd/) and installed (tokenwire/daemon/ and tokenwire/systemd/). A path, not importlib.resources: an
    editable install made before tokenwire.systemd was a package does not map it."""
    return Path(__file__).resolve().parent.parent / "systemd"


class EarlySighups:
    """SIGHUPs recorded before the daemon's event loop handles them.

    Until Daemon.run installs its loop's handlers (after the CLI's parser, the imports and the config's load,
    ~1.5 s), a SIGHUP (a `systemctl reload` or a `kill -HUP` right after the start) killed the daemon without a log
    line (its default action, exit status 129). Recorded, it is a reload once started, as one during the start is.
    :func:`tokenwire.daemon.cli.main` installs it before it builds its parser (0.3 s of imports), ``run_daemon``
    for callers that come in later; installing twice is one install."""

    def __init__(self) -> None:
        self.count = 0
        self._previous: Any = None
        self._installed = False

    def install(self) -> None:
        import signal

        if self._installed:
            return
        try:
            self._previous = signal.signal(signal.SIGHUP, self._record)
        except ValueError:  # not the main thread (an in-process caller): signals are not ours to handle
            return
        self._installed = True

    def _record(self, signum: int, frame: Any) -> None:
        self.count += 1

    def restore(self) -> None:
        """The handler from before :meth:`install` back (an in-process caller gets its own), the count reset."""
        import signal

        if self._installed:
            signal.signal(signal.SIGHUP, self._previous)
            self._installed = False
        self.count = 0


early_sighups = EarlySighups()


def run_daemon(args: argparse.Namespace) -> int:
    early_sighups.install()  # (installed already when the CLI's main saw the daemon command)
    try:
        import dataclasses

        from .config import ConfigError, load_config
        from .logs import setup_logging
        from .service import run_daemon as run
        from .startup import StartupError

        try:
            config = load_config(args.config)
        except ConfigError as exc:
            if args.log_format == "json":  # nothing set up the JSON logs yet
                setup_logging("info", "json")
            return _fatal(str(exc), args.log_format)
        if args.log_format:
            config = dataclasses.replace(config, logging=dataclasses.replace(config.logging, format=args.log_format))
        setup_logging(config.logging.level, config.logging.format)
        if getattr(args, "verbose", 0):  # the top-level -v: the daemon's level is logging.level, at start and reload
            logging.getLogger("tokenwire.daemon").warning(
                "-v does not change the daemon's log level: set [logging] level = \"debug\" in its configuration")
        # no line of its own once started: the service logs "listening on ..." (INFO) in the chosen format; a plain
        # one here broke JSON logs and repeated that line in text
        try:
            # exits the process from inside the loop once the daemon has stopped: finish_process
            run(config, log_format_override=args.log_format, sighup_before=lambda: early_sighups.count > 0,
                when_stopped=lambda: finish_process(0))
        except StartupError as exc:
            return _fatal(str(exc), config.logging.format)
        except ModuleNotFoundError as exc:  # an optional extra the configuration needs ([kv] backend = "redis")
            from .cli import EXTRA_INSTALL, missing_extra

            extra = missing_extra(exc)
            if extra is None:  # not one of the extras' modules: a real bug, show it
                raise
            # through _fatal: under JSON logs one JSON object (it was a plain line from the CLI's catch-all)
            return _fatal(f"needs {exc.name}, from the '{extra}' extra: {EXTRA_INSTALL[extra]}", config.logging.format)
        return 0
    finally:
        early_sighups.restore()


KV_WORKER_PREFIX = "tw-kv-"  # the KV service's store and ingest workers (kv_service: thread_name_prefix)
# past stop()'s own bound (a chunk cut later is a .tmp file the store's next start removes); in STOPPING's
# EXTEND_TIMEOUT_USEC too (service.KV_WORKER_WAIT_S, which the daemon asks systemd for)
KV_WORKER_WAIT_S = 10.0


def finish_process(code: int) -> NoReturn:
    """End ``tokenwire daemon`` right after its "stopped" line: stop signals ignored, logs and streams flushed,
    then ``os._exit(code)``.

    Python's own exit took 0.2-5 s more (torch's and numba's teardown; up to ~10 s when stopped during the [kv]
    warm-up, joining the compile thread) with the loop's signal handlers gone: a SIGHUP then (a `systemctl
    reload` racing a stop) killed the daemon, status 129, and systemd recorded the stop as failed. Nothing is
    lost by skipping that exit: stop() has closed every listener and the KV store, and told systemd; a KV worker
    still inside a chunk's write (past stop()'s bound) is waited for, as the interpreter's exit did, for up to
    :data:`KV_WORKER_WAIT_S` (the signals that could cut a hang short are ignored now). The compile thread is
    not: numba writes its cache files whole (a temporary file renamed). For the CLI only: an in-process caller
    runs :func:`tokenwire.daemon.service.run_daemon` without it and goes on."""
    import os
    import signal
    import threading
    import time

    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):  # for the rest of the process's life
        signal.signal(sig, signal.SIG_IGN)
    deadline = time.monotonic() + KV_WORKER_WAIT_S
    for thread in threading.enumerate():
        if thread.name.startswith(KV_WORKER_PREFIX) and not thread.daemon and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))
    logging.shutdown()  # (what the interpreter's exit ran: every handler flushed and closed)
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed or broken stream: nothing more can reach it
                pass
    os._exit(code)


def _fatal(message: str, log_format: str | None) -> int:
    """Why the daemon cannot start: in JSON logs one JSON object like every other line (a log shipper parses
    each), else the usual ``tokenwire daemon: error:`` line (CLIError). Exit status 2 either way."""
    from tokenwire.daemon.cli import CLIError

    if log_format != "json":
        raise CLIError(message)
    logging.getLogger("tokenwire.daemon").critical("cannot start: %s", message)
    return 2


def run_cert(args: argparse.Namespace) -> int:
    import json

    from tokenwire.daemon.cli import CLIError, make_folders
    from tokenwire.transport.tls import make_self_signed

    hosts = tuple(args.host or ("localhost", "127.0.0.1", "::1"))
    if not 1 <= args.days <= 36_500:  # 3,000,000 days was an OverflowError traceback (X.509 dates end in 9999)
        raise CLIError("--days must be at least 1 and at most 36500")
    cert, key = args.out_dir / "cert.pem", args.out_dir / "key.pem"
    if not args.force and any(p.exists() or p.is_symlink() for p in (cert, key)):  # a dangling link too
        raise CLIError(f"{cert} or {key} exists; use --force to overwrite")
    try:
        pair = make_self_signed(hosts, days=args.days)
    except ValueError as exc:
        raise CLIError(f"--host: {exc}") from None
    make_folders(args.out_dir)  # (none writable by others, whatever the umask: the key goes there)
    pair.write(cert, key)
    print(f"wrote {cert} and {key} (self-signed for {', '.join(hosts)}, {args.days} days)")
    # the keys alone: the example config already has a [server] table, and a second one is invalid TOML
    print("set in the [server] table of tokenwire.toml:")
    print(f'certificate = {json.dumps(str(cert.resolve()), ensure_ascii=False)}\n'
          f'private_key = {json.dumps(str(key.resolve()), ensure_ascii=False)}')
    return 0


def run_check(args: argparse.Namespace) -> int:
    from tokenwire.daemon.cli import CLIError

    from . import config
    from .config import ConfigError, daemon_config_path, load_config
    from .config_warnings import limits_warnings, security_warnings
    from .startup import addr
    from .upstream_config import api_key_warnings

    if args.path is None:  # the file the daemon would read without --config
        args.path = daemon_config_path()
        if args.path is None:
            raise CLIError(f"{config.DEFAULT_PATH}: no such file (the daemon would run with the built-in defaults); "
                           "name the file to check")
    try:
        cfg = load_config(args.path)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    certificate = "(ephemeral self-signed)"
    if cfg.server.certificate is not None:  # what the daemon will load, loaded now
        from tokenwire.transport.tls import certificate_summary, server_configuration

        try:
            quic = server_configuration(certfile=cfg.server.certificate, keyfile=cfg.server.private_key)
        except (OSError, ValueError) as exc:
            raise CLIError(f"{args.path}: server.certificate / server.private_key: {exc}") from None
        certificate = f"{cfg.server.certificate} ({certificate_summary(quic.certificate)})"
        ending = _certificate_ending(quic.certificate)
        if ending is not None:  # the daemon's own rule (certificates.warn_if_expiring): only EXPIRED was a warning
            print(f"warning: server.certificate: {certificate}{ending}", file=sys.stderr)
    if cfg.server.client_ca is not None:  # loaded now too: the daemon would refuse to start
        from .certificates import client_verifier
        from .startup import StartupError

        try:
            client_verifier(cfg)
        except StartupError as exc:
            raise CLIError(f"{args.path}: {exc}") from None
    from .ingest import check_paths as check_ingest_paths
    from .kv_config import check_paths as check_kv_paths

    # the sockets' and the store's paths, as the daemon's start sees them (nothing is bound, claimed or locked)
    kv_errors, kv_warnings = check_kv_paths(cfg.kv)
    if cfg.kv.enabled and importlib.util.find_spec("torch") is None:  # the daemon's codec warm-up would fail
        from .cli import EXTRA_INSTALL

        kv_errors.insert(0, f"kv: the KV codec needs torch, which is not installed: {EXTRA_INSTALL['ml']}")
    if cfg.kv.enabled and cfg.kv.backend == "redis":  # the daemon's start would fail on the import
        problem = _redis_missing()
        if problem is not None:
            kv_errors.insert(0, problem)
    ingest_errors, ingest_warnings = check_ingest_paths(cfg.ingest)
    errors = ingest_errors + kv_errors
    if errors:
        raise CLIError(f"{args.path}: {errors[0]}")
    for warning in (ingest_warnings + kv_warnings + security_warnings(cfg, Path(args.path)) + api_key_warnings(cfg)
                    + limits_warnings(cfg)):
        print(f"warning: {warning}", file=sys.stderr)
    listen = ", ".join(addr(h, p) for h, p in cfg.server.listen)
    print(f"{args.path}: ok")
    print(f"  listen {listen}; certificate {certificate}")
    print(f"  auth: {_auth_summary(cfg)}")
    metrics = cfg.metrics.listen
    print(f"  metrics: {f'http://{addr(*metrics)}/metrics' if metrics is not None else 'off'}")
    print(f"  upstreams: {', '.join(f'{u.name} ({u.type})' for u in cfg.upstreams)}")
    print(f"  routes: {', '.join(f'{r.model} -> {r.upstream}' for r in cfg.routes)}")
    print(f"  marking: {_marking_summary(cfg.marking)}"  # classic's controller too: reno-ecn, not the reno set
          + (f"; {cfg.server.congestion} congestion control" if cfg.marking.enabled and not cfg.marking.marks_ect1
             else ""))
    if cfg.ingest.socket is not None:
        group = f"group {cfg.ingest.socket_group}" if cfg.ingest.socket_group else "the daemon's group"
        print(f"  ingest socket {cfg.ingest.socket} (0660, {group})")
    if cfg.kv.enabled:
        kv = cfg.kv
        store = kv.directory if kv.backend == "local" else "redis"
        group = f"group {kv.ingest_socket_group}" if kv.ingest_socket_group else "the daemon's group"
        sock = "(none)" if kv.ingest_socket is None else f"{kv.ingest_socket} (0660, {group})"
        print(f"  kv: udp/{addr(*kv.listen)}; store {store} ({kv.capacity_bytes >> 20} MiB); chunks of "
              f"{kv.chunk_tokens} tokens; ingest socket {sock}")
    return 0


def _certificate_ending(cert: Any) -> str | None:
    """What the warning on a server certificate that has expired or ends within CERT_WARN_DAYS adds after its
    summary, or None for one that does not: the daemon warns at start and reload within 14 days of the end, and
    `config check` was silent about one ending in 3."""
    from .certificates import ending_soon

    left = ending_soon(cert)
    if left is None:
        return None
    if left.total_seconds() <= 0:
        return ": clients refuse an expired certificate (renew it, then SIGHUP the daemon)"
    soon = f"in {left.days} day{'s' if left.days != 1 else ''}" if left.days else "within a day"
    return f": it ends {soon}; clients will refuse it then (renew it, then SIGHUP the daemon)"


def _redis_missing() -> str | None:
    """Why the Redis KV store cannot be used here (the ``redis`` package, the 'redis' extra, is not installed),
    or None. Imported, not looked up: a module found that fails to import stops the daemon just the same."""
    from .cli import EXTRA_INSTALL

    try:
        importlib.import_module("redis")
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "redis":  # redis is there; something it imports is not
            return f"kv.backend: the Redis store's client fails to import: {exc}"
        return f"kv.backend: the Redis store needs the redis package, which is not installed: {EXTRA_INSTALL['redis']}"
    except ImportError as exc:
        return f"kv.backend: the Redis store's client fails to import: {exc}"
    return None


def _auth_summary(cfg: Any) -> str:
    """The ``auth:`` line of ``config check``. Client certificates are authentication too: with ``client_ca``
    and no tokens it said "(no auth required)" of a daemon that refuses every client without a certificate."""
    tokens, ca = len(cfg.auth.tokens), cfg.server.client_ca
    if ca is not None:
        both = f"{tokens} token(s) and " if tokens else ""
        return f"{both}a client certificate signed by {ca}{', both' if tokens else ''} required"
    return f"{tokens} token(s)" if tokens else "0 token(s), no client_ca: none required, any client may connect"


def _marking_summary(m: Any) -> str:
    """The ``[marking]`` line of ``config check``; loads a swiftqueue model the way the daemon will, and
    warns (on stderr) when it cannot: the daemon then marks like ``l4s``, which an operator should know."""
    if not m.enabled:
        return "off"
    line = m.policy
    if m.policy == "swiftqueue":
        from tokenwire.predictor.runtime import ModelError, load_forecaster, unfinished_run

        which = str(m.model) if m.model is not None else "shipped model"
        try:
            fc = load_forecaster(str(m.model) if m.model is not None else None)
        except ModelError as exc:
            print(f"warning: marking.model: {exc}; the daemon would mark like l4s", file=sys.stderr)
            which += ", UNUSABLE"
        else:
            which += f", window {fc.window}"
            note = unfinished_run(fc)
            if note is not None:  # the daemon's start warns too (export and eval did; check said nothing)
                print(f"warning: marking.model: {fc.path} is {note}; the daemon would mark with it anyway",
                      file=sys.stderr)
                which += ", UNFINISHED"
        line += f" ({which}; margin {m.margin_ms:g} ms, hysteresis {m.hysteresis_ms:g} ms, refuge rule " \
                f"{'on' if m.refuge_only else 'off'})"
    return line + ("; prague congestion control" if m.marks_ect1 else "")


def run_example(args: argparse.Namespace) -> int:
    """Print a shipped file (or their folder): a wheel install has no checkout to copy systemd/ from."""
    from tokenwire.daemon.cli import CLIError

    folder = example_dir()
    if args.dir:
        print(folder)
        return 0
    path = folder / EXAMPLE_FILES[args.file]
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CLIError(f"{path}: {exc.strerror or exc} (an install without its package data?)") from None
    sys.stdout.write(text)
    return 0


def run_new_token(args: argparse.Namespace) -> int:
    import json
    import secrets

    from tokenwire.daemon.cli import CLIError

    from .config import hash_token, token_name_problem

    problem = token_name_problem(args.name)  # the config's own rule: it would refuse what this printed
    if problem is not None:
        raise CLIError(f"--name: {problem}")
    token = secrets.token_urlsafe(32)
    print(f"token (give it to the client, store it nowhere else): {token}")
    # one table per token, appended at the end of tokenwire.toml: a second `tokens = [...]` line was invalid TOML
    print("append to tokenwire.toml (one [[auth.tokens]] table per token; not beside a `tokens = [...]` line):")
    # a JSON string is a valid TOML basic string: quotes and backslashes in the name stay TOML
    print(f'[[auth.tokens]]\nname = {json.dumps(args.name, ensure_ascii=False)}\nsha256 = "{hash_token(token)}"')
    return 0
