"""The daemon's TOML configuration: one loader, strict validation, errors that name the bad key.

Every key has a type, a range and a default; unknown keys are errors (with a "did you mean" hint), because a
typo in a limit silently falling back to its default is how services get hurt. ``load_config`` returns a
frozen, fully validated :class:`Config`; ``tokenwire config check FILE`` runs the same code.

Without a file at the default path the embedded defaults apply: the demo upstream on ``[::]:4433`` with an
ephemeral self-signed certificate, so a fresh install streams something without an LLM behind it.
"""

from __future__ import annotations

import builtins
import dataclasses
import difflib
import fnmatch
import hashlib
import hmac
import ipaddress
import os
import re
import socket
import stat
import tomllib
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from tokenwire.transport.frames import MAX_STREAM_FRAME

from .config_lines import error_line
from .kv_config import KVConfig, parse_kv
from .marking import MarkingConfig, effective_congestion, parse_marking
from .startup import addr

if TYPE_CHECKING:
    import ssl

DEFAULT_PATH = Path("/etc/tokenwire/tokenwire.toml")


class ConfigError(ValueError):
    """A configuration problem; the message names the file and key."""


# ---------------------------------------------------------------------------------------------- structure
@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[tuple[str, int], ...] = (("::", 4433),)
    certificate: Path | None = None
    private_key: Path | None = None
    client_ca: Path | None = None  # set: clients must present a certificate signed by it
    congestion: str = "reno"
    idle_timeout_s: float = 60.0


@dataclass(frozen=True)
class TokenEntry:
    name: str
    sha256: str  # hex digest of the bearer token

    def matches(self, token: str) -> bool:
        digest = hashlib.sha256(token.encode()).hexdigest()
        return hmac.compare_digest(digest, self.sha256)


@dataclass(frozen=True)
class AuthConfig:
    tokens: tuple[TokenEntry, ...] = ()
    # the file says `[auth] tokens = []`: no token, on purpose. A reload may switch token authentication off only
    # so (a file truncated before its [[auth.tokens]] tables, mid-write, had opened the daemon to anyone)
    declared_none: bool = field(default=False, compare=False)
    # the entries by digest (the first of a digest listed twice): one lookup per presented token, where a scan
    # hashed the token once per entry (17.7 ms of event loop per wrong token at 10,000 tokens)
    _by_digest: dict[str, TokenEntry] = field(init=False, repr=False, compare=False)
    # the entries by name, in file order (a name may have several tokens, e.g. while one is replaced): an ingest
    # open's principal check scanned every entry by name, on the event loop, per open
    _by_name: dict[str, tuple[TokenEntry, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_digest: dict[str, TokenEntry] = {}
        by_name: dict[str, list[TokenEntry]] = {}
        for e in self.tokens:
            by_digest.setdefault(e.sha256, e)
            by_name.setdefault(e.name, []).append(e)  # (linear: one name may have thousands of tokens)
        object.__setattr__(self, "_by_digest", by_digest)
        object.__setattr__(self, "_by_name", {name: tuple(entries) for name, entries in by_name.items()})

    @property
    def required(self) -> bool:
        return bool(self.tokens)

    def by_digest(self, sha256: str) -> TokenEntry | None:
        """The entry of the token whose SHA-256 hex digest is ``sha256``, or None."""
        return self._by_digest.get(sha256)

    def by_name(self, name: str) -> tuple[TokenEntry, ...]:
        """The entries named ``name`` (the principal a client with one of their tokens has), in file order; none
        when no token has that name."""
        return self._by_name.get(name, ())

    def entry(self, token: str | None) -> TokenEntry | None:
        """The entry ``token`` matches, or None when it is missing or wrong.

        Timing: the lookup compares the presented token's SHA-256 digest with the stored digests, never the token
        itself, so how long it takes tells at most how much of the digest of a guess matches a stored digest, which
        brings an attacker no closer to a token (finding an input with a given digest prefix is a preimage search).
        The scan it replaces was not constant-time either: it stopped at the first match."""
        if token is None:
            return None
        return self._by_digest.get(hash_token(token))

    def principal(self, token: str | None) -> str | None:
        """The name of the token's owner, or None when it is missing or wrong."""
        entry = self.entry(token)
        return entry.name if entry is not None else None


@dataclass(frozen=True)
class Limits:
    max_sessions: int = 10_000
    max_requests_per_connection: int = 64
    max_tokens: int = 16_384
    max_request_bytes: int = 1 << 20
    max_redundant_tokens: int = 64
    transcript_memory_mb: float = 256.0
    transcript_retain_s: float = 600.0
    drain_timeout_s: float = 30.0
    # answers the upstreams generate at once (each up to max_tokens, outside transcript_memory_mb): past it, new
    # requests are refused; and how long one may go on with no client attached before it is cancelled (its
    # client may come back to resume it; clients that vanished for good left answers generating for nobody)
    max_live_answers: int = 4096
    orphan_timeout_s: float = 300.0
    # a request stream's REQUEST must be whole this long after its first bytes: a client that sent all but the
    # last byte of 64 ~1 MiB requests held 64 MiB of the daemon per connection for as long as it liked
    request_timeout_s: float = 10.0
    # what connections that have not authorized yet may make the daemon hold of their requests, all together: each
    # may hold ~3 x max_request_bytes (ReadCredit.hold_until_authorized), which over max_sessions connections is
    # ~30 GB; past it the connection holding the most is closed (Daemon.account_unauthorized). The KV endpoint's
    # connections have a budget of this size of their own (KVServer.unauthorized_memory): the daemon holds at most
    # twice it
    unauthorized_memory_mb: float = 256.0


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "text"


@dataclass(frozen=True)
class MetricsConfig:
    listen: tuple[str, int] | None = ("127.0.0.1", 9464)


MAX_ANSWER_TOKENS = 1_000_000  # the bound of limits.max_tokens and of an upstream's max_tokens
# the bounds of limits.max_sessions, max_requests_per_connection and max_live_answers (`bench daemon` keeps to them)
MAX_SESSIONS = 1_000_000
MAX_REQUESTS_PER_CONNECTION = 10_000
MAX_LIVE_ANSWERS = 1_000_000

# A principal is a token's name or "cert:" + a certificate's common name (at most 64 characters in X.509): 128
# leaves room for both, and keeps the names every open answer holds small
MAX_PRINCIPAL_CHARS = 128


@dataclass(frozen=True)
class IngestConfig:
    socket: Path | None = None
    max_open: int = 1024  # answers one application connection may hold open at once
    # an open answer with no push, finish or fail for this long fails with UPSTREAM_TIMEOUT: a hung application
    # held its attached clients for ever (the orphan timeout spares ingest answers; keepalives spare the clients)
    stall_timeout_s: float = 300.0
    # the group the socket is given (0660): an application in the daemon's own group could read what the group
    # may (the TLS key, the config, the KV store, as the install guide had it); None: the daemon's group
    socket_group: str | None = None


# What aiohttp refuses to send in a header (RFC 9110 5.5: CR, LF, NUL and other controls; tab is allowed), and
# a header name's characters (an RFC 9110 token)
_HEADER_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def header_value_problem(value: str) -> str | None:
    """Why ``value`` cannot be sent as an HTTP header value (None when it can)."""
    m = _HEADER_FORBIDDEN.search(value)
    if m is None:
        return None
    return "a line break" if m.group() in "\r\n" else f"the control character {m.group()!r}"


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    type: str  # demo | openai | ingest
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Route:
    model: str  # glob
    upstream: str


@dataclass(frozen=True)
class Config:
    path: Path | None
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    limits: Limits = Limits()
    logging: LoggingConfig = LoggingConfig()
    metrics: MetricsConfig = MetricsConfig()
    ingest: IngestConfig = IngestConfig()
    kv: KVConfig = field(default_factory=KVConfig)
    upstreams: tuple[UpstreamConfig, ...] = (UpstreamConfig("demo", "demo", {}),)
    routes: tuple[Route, ...] = (Route("*", "demo"),)
    marking: MarkingConfig = field(default_factory=MarkingConfig)
    # [server] as the operator wrote it: ``server.congestion`` is derived from [marking], and a reload must
    # not report an untouched [server] as changed (None: same as ``server``)
    server_as_written: ServerConfig | None = field(default=None, compare=False, repr=False)

    def route(self, model: str | None) -> UpstreamConfig:
        """The upstream serving ``model`` (first matching route)."""
        name = model or ""
        for r in self.routes:
            if fnmatch.fnmatchcase(name, r.model):
                return next(u for u in self.upstreams if u.name == r.upstream)
        raise LookupError(f"no route for model {name!r}")


# ---------------------------------------------------------------------------------------------- validation
class _Section:
    """Validates one table: known keys, types and ranges; remembers its dotted name for messages."""

    def __init__(self, where: str, table: Any, known: tuple[str, ...]) -> None:
        self.where = where
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table, got {type(table).__name__}")
        self.table = table
        for key in table:
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else f" (known: {', '.join(known)})"
                raise ConfigError(f"{self._k(key)}: unknown key{extra}")

    def _k(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, default: Any) -> Any:
        return self.table.get(key, default)

    def int(self, key: str, default: int, lo: int, hi: int) -> int:
        v = self.table.get(key, default)
        if type(v) is not int or not lo <= v <= hi:
            raise ConfigError(f"{self._k(key)}: expected an integer in [{lo}, {hi}], got {v!r}")
        return v

    def num(self, key: str, default: float, lo: float, hi: float) -> float:
        v = self.table.get(key, default)
        if type(v) not in (int, float) or not lo <= v <= hi:
            raise ConfigError(f"{self._k(key)}: expected a number in [{lo:g}, {hi:g}], got {v!r}")
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        v = self.table.get(key, default)
        if type(v) is not bool:
            raise ConfigError(f"{self._k(key)}: expected true or false, got {v!r}")
        return v

    def str(self, key: str, default: str | None, choices: tuple[str, ...] | None = None) -> str | None:
        v = self.table.get(key, default)
        if v is None:
            return None
        if type(v) is not str:
            raise ConfigError(f"{self._k(key)}: expected a string, got {v!r}")
        if choices is not None and v not in choices:
            raise ConfigError(f"{self._k(key)}: expected one of {', '.join(choices)}, got {v!r}")
        return v

    def path(self, key: builtins.str, base: Path | None, must_exist: builtins.bool = True,
             empty_hint: builtins.str | None = None) -> Path | None:
        """The path at ``key`` (relative: to ``base``, the config file's folder). ``empty_hint``: "" is refused,
        these words saying what leaving the key out does; None: "" means unset (as [marking] model = "" does)."""
        v = self.str(key, None)
        if v == "" and empty_hint is not None:
            # "" silently meant unset: server.client_ca = "" let in clients without a certificate (fails open)
            raise ConfigError(f"{self._k(key)}: expected a file path, got '' ({empty_hint})")
        if v is None or v == "":
            return None
        p = Path(v)
        if not p.is_absolute() and base is not None:
            p = base / p
        try:
            exists = p.exists()
        except OSError as exc:  # a folder on the way that cannot be read: Python 3.11 raises
            raise ConfigError(f"{self._k(key)}: {p}: cannot be read ({exc.strerror})") from None
        if must_exist and not exists:
            raise ConfigError(f"{self._k(key)}: {p} does not exist")
        return p


def parse_addr(text: str, where: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    # ASCII only: str.isdigit() takes '²' (int() then fails) and int() reads Arabic-Indic '٤٤٣' as 443
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: expected 'host:port' or '[v6]:port', got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host not in ("", "localhost"):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"{where}: {host!r} is not an IP address") from None
    return host or "::", int(port)


_SELF_SIGNED = "leave both server.certificate and server.private_key out for an ephemeral self-signed certificate"


def _server(t: Any, base: Path | None, tls_may_be_missing: bool = False) -> ServerConfig:
    """[server]. ``tls_may_be_missing``: a reload's read, where a TLS file missing (mid-renewal) is the TLS
    reload's to report, the running files kept, not a reason to refuse the tokens and limits beside it."""
    s = _Section("server", t, ("listen", "certificate", "private_key", "client_ca", "congestion", "idle_timeout_s"))
    listen = s.get("listen", ["[::]:4433"])
    if isinstance(listen, str):
        listen = [listen]
    if not isinstance(listen, list) or not listen or not all(isinstance(x, str) for x in listen):
        raise ConfigError("server.listen: expected a list of 'host:port' strings")
    must_exist = not tls_may_be_missing
    cert = s.path("certificate", base, must_exist, empty_hint=_SELF_SIGNED)
    key = s.path("private_key", base, must_exist, empty_hint=_SELF_SIGNED)
    if (cert is None) != (key is None):
        raise ConfigError("server.certificate and server.private_key must be set together")
    return ServerConfig(
        listen=tuple(parse_addr(x, "server.listen") for x in listen),
        certificate=cert,
        private_key=key,
        client_ca=s.path("client_ca", base, must_exist,
                         empty_hint="leave the key out for no client certificates; set, clients must present one"),
        congestion=s.str("congestion", "reno", ("reno", "cubic", "prague")) or "reno",
        idle_timeout_s=s.num("idle_timeout_s", 60.0, 1.0, 3600.0),
    )


def token_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name an auth token (None when it can), as words that follow the key or option.

    The name is the principal that logs show: a line break in it forged log lines. ``config new-token --name``
    and ``[[auth.tokens]] name`` both check here; printable as ``cert_principal`` means it (``str.isprintable``).
    """
    if not name.strip():
        return "a non-empty name is required"
    bad = next((c for c in name if not c.isprintable()), None)
    if bad is not None:
        return f"contains {bad!r}, which is not printable (the name is the principal logs show)"
    if len(name) > MAX_PRINCIPAL_CHARS:  # the name is the principal, which ingest and logs bound
        return f"at most {MAX_PRINCIPAL_CHARS} characters"
    return None


def hash_token(token: str) -> str:
    """The form stored in the config for a bearer token."""
    return hashlib.sha256(token.encode()).hexdigest()


def _auth(t: Any) -> AuthConfig:
    s = _Section("auth", t, ("tokens",))
    raw = s.get("tokens", [])
    if not isinstance(raw, list):
        raise ConfigError("auth.tokens: expected an array of {name, sha256} tables")
    out: list[TokenEntry] = []
    first_of: dict[str, int] = {}  # digest -> its first entry's index: a scan of `out` per entry was quadratic
    for i, item in enumerate(raw):
        e = _Section(f"auth.tokens[{i}]", item, ("name", "sha256"))
        name = e.str("name", None)
        digest = e.str("sha256", None)
        if not name:
            raise ConfigError(f"auth.tokens[{i}].name: required")
        problem = token_name_problem(name)
        if problem is not None:
            raise ConfigError(f"auth.tokens[{i}].name: {problem}")
        if digest is None or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ConfigError(
                f"auth.tokens[{i}].sha256: expected 64 lowercase hex digits (make one with "
                "`tokenwire config new-token`), never the token itself"
            )
        first = first_of.setdefault(digest, i)
        if first != i:  # one token, two entries: the first one's name is the principal, the second dead
            raise ConfigError(f"auth.tokens[{i}].sha256: the same digest as auth.tokens[{first}] "
                              f"({out[first].name!r}): one token can have one name (a name may have several "
                              "tokens, e.g. while one is replaced)")
        out.append(TokenEntry(name, digest))
    # `tokens = []` written out (a key that is there, an empty array): no token on purpose (AuthConfig.declared_none)
    return AuthConfig(tuple(out), declared_none="tokens" in s.table and not raw)


def _limits(t: Any) -> Limits:
    s = _Section("limits", t, tuple(Limits.__dataclass_fields__))
    return Limits(
        max_sessions=s.int("max_sessions", 10_000, 1, MAX_SESSIONS),
        max_requests_per_connection=s.int("max_requests_per_connection", 64, 1, MAX_REQUESTS_PER_CONNECTION),
        max_tokens=s.int("max_tokens", 16_384, 1, MAX_ANSWER_TOKENS),
        # at most the protocol's own frame limit: above it a large prompt passed the size check, then the frame
        # validator refused it as malformed and closed the connection (the SDK refused it too)
        max_request_bytes=s.int("max_request_bytes", 1 << 20, 1024, MAX_STREAM_FRAME),
        max_redundant_tokens=s.int("max_redundant_tokens", 64, 1, 4096),
        transcript_memory_mb=s.num("transcript_memory_mb", 256.0, 1.0, 1 << 20),
        transcript_retain_s=s.num("transcript_retain_s", 600.0, 0.0, 7 * 86400.0),
        drain_timeout_s=s.num("drain_timeout_s", 30.0, 0.0, 3600.0),
        max_live_answers=s.int("max_live_answers", 4096, 1, MAX_LIVE_ANSWERS),
        orphan_timeout_s=s.num("orphan_timeout_s", 300.0, 1.0, 7 * 86400.0),
        request_timeout_s=s.num("request_timeout_s", 10.0, 1.0, 3600.0),
        unauthorized_memory_mb=s.num("unauthorized_memory_mb", 256.0, 1.0, 1 << 20),
    )


UPSTREAM_KEYS = {
    "demo": ("name", "type", "rate", "first_token_ms", "max_tokens"),
    "openai": (
        "name",
        "type",
        "base_url",
        "api_key_env",
        "api_key_file",
        "models",
        "model",
        "connect_timeout_s",
        "first_token_timeout_s",
        "stall_timeout_s",
        "extra_headers",
        "ca_file",
    ),
    "ingest": ("name", "type"),
}


def _file_option(s: _Section, key: str, base: Path | None, empty_hint: str) -> Path | None:
    """An upstream's file path at ``key`` (relative: to ``base``), without touching the file: a reload reads
    upstream files leniently (:func:`upstream_file_problems`), and ``Path.exists`` raised for a folder on the way
    that cannot be entered, which vetoed the whole reload."""
    v = s.str(key, None)
    if v == "":
        raise ConfigError(f"{s.where}.{key}: expected a file path, got '' ({empty_hint})")
    if v is None:
        return None
    p = Path(v)
    return base / p if not p.is_absolute() and base is not None else p


def _missing(path: Path) -> str | None:
    """Why nothing usable is at ``path`` (words after the key's name), or None when something is."""
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return f"{path} does not exist"
    except OSError as exc:  # a folder on the way that cannot be read (as Path.exists raised on Python 3.11)
        return f"{path}: cannot be read ({exc.strerror})"
    return None


def upstream_ca_context(path: Path) -> tuple[ssl.SSLContext, bytes]:
    """A TLS client context trusting only the CAs in ``path`` (PEM), and the bytes it was built from (a reload
    compares them to take up a bundle renewed in place). Read as a regular file without blocking (a FIFO there
    froze the event loop); ``OSError`` as reading raised it, :class:`FileProblem` for what is there, ``ValueError``
    for a file without a PEM certificate (an empty one made a context that trusts nothing)."""
    import ssl

    data = read_regular_file(path, CA_FILE_LIMIT)
    text = data.decode("ascii", errors="ignore")  # PEM is ASCII; a comment in another charset is no certificate
    if "-----BEGIN" not in text:
        raise ValueError("no PEM certificate in it")
    try:
        return ssl.create_default_context(cadata=text), data
    except ssl.SSLError:
        raise ValueError("no PEM certificate in it") from None


def _upstream_ca_problem(path: Path) -> str | None:
    """Why the CA bundle an https upstream's certificate is checked against (a vLLM behind a private CA) cannot be
    used, as words after its key (one that cannot be read or holds no certificate fails at load, not as
    "certificate not trusted" at every request); None when it can."""
    missing = _missing(path)
    if missing is not None:
        return missing
    try:
        upstream_ca_context(path)
    except FileProblem as exc:
        return f"{path} {exc}"
    except OSError as exc:
        return f"{path}: {exc.strerror or 'cannot be read'}"
    except ValueError as exc:
        return f"{path}: {exc}"
    return None


def _upstreams(raw: Any, base: Path | None, check_files: bool = True) -> tuple[UpstreamConfig, ...]:
    """The [[upstreams]] tables. ``check_files``: False for a reload's read, whose upstream settings are never
    applied ("changes to upstreams need a restart"): an api_key_file or ca_file missing or bad for a moment (a key
    being rotated) refused the whole reload, and a token revoked in the same SIGHUP stayed valid. The reload
    reports those files with :func:`upstream_file_problems` instead; at start and in ``config check`` they are
    errors."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError("upstreams: expected a non-empty array of [[upstreams]] tables")
    out: list[UpstreamConfig] = []
    for i, item in enumerate(raw):
        where = f"upstreams[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a table")
        # keys no type knows first: `typ = "demo"` was reported as a missing type, without the "did you mean"
        _Section(where, item, tuple(dict.fromkeys(k for keys in UPSTREAM_KEYS.values() for k in keys)))
        kind = item.get("type")
        if not isinstance(kind, str) or kind not in UPSTREAM_KEYS:
            raise ConfigError(f"{where}.type: expected one of {', '.join(UPSTREAM_KEYS)}, got {kind!r}")
        s = _Section(where, item, UPSTREAM_KEYS[kind])
        name = s.str("name", None)
        if not name:
            raise ConfigError(f"{where}.name: required")
        if any(u.name == name for u in out):
            raise ConfigError(f"{where}.name: {name!r} is defined twice")
        opts: dict[str, Any] = {}
        if kind == "demo":
            opts["rate"] = s.num("rate", 30.0, 0.1, 10_000.0)  # the demo upstream's own bound on params.rate
            opts["first_token_ms"] = s.num("first_token_ms", 150.0, 0.0, 60_000.0)
            opts["max_tokens"] = s.int("max_tokens", 2000, 1, MAX_ANSWER_TOKENS)
        elif kind == "openai":
            url = _base_url(s.str("base_url", None), f"{where}.base_url")
            opts["base_url"] = url
            key_env = s.str("api_key_env", None)
            env_key = os.environ.get(key_env) if key_env else None
            problem = None if env_key is None else api_key_problem(env_key)
            if problem is not None:  # an unset variable is the upstream's to report, at each request
                raise ConfigError(f"{where}.api_key_env: the key in ${key_env} {problem}")
            opts["api_key_env"] = key_env
            key_file = _file_option(s, "api_key_file", base, "leave the key out for no key from a file")
            problem = None if key_file is None or not check_files else _api_key_file_problem(key_file)
            if problem is not None:
                raise ConfigError(f"{where}.api_key_file: {problem}")
            opts["api_key_file"] = key_file
            models = s.get("models", {})
            if not isinstance(models, dict) or not all(isinstance(v, str) for v in models.values()):
                raise ConfigError(f"{where}.models: expected a table mapping client model names to upstream names")
            opts["models"] = dict(models)
            model = s.str("model", None)  # for clients that name no model (strict servers refuse "model": "")
            if model == "":
                raise ConfigError(f"{where}.model: expected an upstream model name, got ''")
            opts["model"] = model
            opts["connect_timeout_s"] = s.num("connect_timeout_s", 10.0, 0.1, 600.0)
            opts["first_token_timeout_s"] = s.num("first_token_timeout_s", 60.0, 0.1, 3600.0)
            opts["stall_timeout_s"] = s.num("stall_timeout_s", 30.0, 0.1, 3600.0)
            headers = s.get("extra_headers", {})
            if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
                raise ConfigError(f"{where}.extra_headers: expected a table of strings")
            for hname, value in headers.items():  # else every request failed with an aiohttp traceback
                if not _HEADER_NAME.fullmatch(hname):
                    raise ConfigError(f"{where}.extra_headers: {hname!r} is not a valid HTTP header name")
                problem = header_value_problem(value)
                if problem is not None:
                    raise ConfigError(f"{where}.extra_headers.{hname}: the value contains {problem}")
            opts["extra_headers"] = dict(headers)
            ca_file = _file_option(s, "ca_file", base, "leave the key out to trust the system's CAs")
            if ca_file is not None:
                if not url.startswith("https://"):
                    raise ConfigError(f"{where}.ca_file: only for an https:// base_url, got {url!r}")
                problem = _upstream_ca_problem(ca_file) if check_files else None
                if problem is not None:
                    raise ConfigError(f"{where}.ca_file: {problem}")
            opts["ca_file"] = ca_file
            sources = [k for k in ("api_key_env", "api_key_file") if opts[k]]
            authorization = [h for h in headers if h.lower() == "authorization"]
            if sources and authorization:
                # the key's "Bearer KEY" replaced that header without a word (or, spelt "authorization", both went)
                raise ConfigError(f"{where}.extra_headers.{authorization[0]}: {' and '.join(sources)} sends the "
                                  "Authorization header too (Bearer KEY); use one of them")
            # user:password@ in the URL is Basic auth: aiohttp refuses to send another Authorization header with it
            # (a ValueError at every request, while config check said ok)
            bearer = sources + [f"extra_headers.{h}" for h in authorization]
            netloc = re.split(r"[/?#]", url.split("//", 1)[1], maxsplit=1)[0]
            if bearer and "@" in netloc:
                raise ConfigError(f"{where}: base_url has credentials in it (user:password@), sent as the "
                                  f"Authorization header, and so does {' and '.join(bearer)}; use one of them")
        out.append(UpstreamConfig(name, kind, opts))
    return tuple(out)


class UpstreamFileProblem(NamedTuple):
    """An upstream's api_key_file or ca_file that a start would refuse (:func:`upstream_file_problems`)."""

    upstream: str  # its name
    key: str  # "api_key_file" or "ca_file"
    path: Path
    text: str  # ``upstreams[i].key: why``, as the start's error says it


def upstream_file_problems(cfg: Config) -> list[UpstreamFileProblem]:
    """What a start would refuse of ``cfg``'s upstream files, read leniently (a reload's read): the reload warns
    of them and keeps the running upstreams, which it never replaces."""
    out: list[UpstreamFileProblem] = []
    for i, up in enumerate(cfg.upstreams):
        if up.type != "openai":
            continue
        for key, check in (("api_key_file", _api_key_file_problem), ("ca_file", _upstream_ca_problem)):
            path = up.options.get(key)
            if path is None:
                continue
            problem = check(path)
            if problem is not None:
                out.append(UpstreamFileProblem(up.name, key, path, f"upstreams[{i}].{key}: {problem}"))
    return out


def _base_url(url: str | None, where: str) -> str:
    """An openai upstream's ``base_url``, its scheme in lower case and without a trailing slash."""
    scheme, sep, rest = (url or "").partition("://")
    if not url or not sep or scheme.lower() not in ("http", "https"):
        raise ConfigError(f"{where}: expected an http(s):// URL, got {url!r}")
    url = f"{scheme.lower()}://{rest}"  # schemes are case-insensitive (RFC 3986 3.1): "HTTP://" was refused
    _check_base_url(url, where)
    url = url.rstrip("/")
    path = urllib.parse.urlsplit(url).path
    if path.lower().endswith("/chat/completions"):
        # requests went to .../chat/completions/chat/completions, and every one failed with a 404
        root = path[:-len("/chat/completions")] or "/"
        raise ConfigError(f"{where}: ends in /chat/completions, which the upstream appends itself: give the API's "
                          f"root (path {root})")
    return url


# a host name's characters (letters and digits of any script: yarl encodes them with IDNA)
_HOST_CHARS = re.compile(r"[\w.-]+")


# what a URL that does not parse is told: never the parser's words, which with a '#', '/' or '?' in a password quoted
# a piece of it, nor the URL
_BAD_URL = "not a valid URL (check the host and port; a password holding '#', '/', '?' or '@' must be percent-encoded)"


def _url_parts(url: str, where: str) -> tuple[urllib.parse.SplitResult, int | None]:
    """``url`` split, and its port: :class:`ConfigError` for a character no URL holds (a space, a control
    character) or a host and port that do not parse (a port out of range or not a number, an unclosed bracket)."""
    bad = next((c for c in url if c.isspace() or not c.isprintable()), None)
    if bad is not None:
        raise ConfigError(f"{where}: contains {'a space' if bad == ' ' else repr(bad)}, which a URL cannot contain "
                          "(percent-encode it: %20)")
    try:
        parts = urllib.parse.urlsplit(url)
        return parts, parts.port
    except ValueError:
        raise ConfigError(f"{where}: {_BAD_URL}") from None


def _check_base_url(url: str, where: str) -> None:
    """Refuse an ``http(s)://`` base_url the upstream cannot send a request to: a port out of range or not a
    number, no host, an unclosed IPv6 bracket, spaces (each was a ValueError traceback at the daemon's start, or
    a failure of every request, after ``config check`` said ok), and a query or fragment (``/chat/completions``
    is appended to the URL, after them). The words do not repeat the URL: it may hold a password."""
    import yarl

    parts, port = _url_parts(url, where)
    try:
        yarl.URL(f"{url.rstrip('/')}/chat/completions")  # what the upstream builds its requests from
    except ValueError:
        raise ConfigError(f"{where}: {_BAD_URL}") from None
    host = parts.hostname
    if not host:
        raise ConfigError(f"{where}: no host in the URL (http://HOST[:PORT]/...)")
    if "[" in parts.netloc:
        try:
            ipaddress.IPv6Address(host.split("%")[0])
        except ValueError:
            raise ConfigError(f"{where}: [{host}] is not an IPv6 address") from None
    elif not _HOST_CHARS.fullmatch(host) or host.strip(".") == "":
        raise ConfigError(f"{where}: {host!r} is not a host name or address")
    if port == 0:
        raise ConfigError(f"{where}: port 0 is no server's port (1 to 65535)")
    if parts.query or parts.fragment:
        raise ConfigError(f"{where}: no ?query or #fragment: base_url is the API's root, and /chat/completions "
                          "is appended to it")


def _check_redis_url(url: str) -> None:
    """Refuse a ``kv.redis_url`` the Redis client cannot connect with, or would read otherwise than it says:
    ``redis://h:99999/0`` passed ``config check`` and the daemon refused it at start; ``redis://`` (no host)
    connected to localhost:6379, a db that is no number (``/abc``) to db 0, both silently, and a query
    (``?socket_timeout=1``) overrode the daemon's own settings for its connection. Its words do not repeat the URL:
    it may hold a password."""
    parts, port = _url_parts(url, "kv.redis_url")
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError("kv.redis_url: no socket path in the unix:// URL (unix:///run/redis/redis.sock)")
        return  # (an '@' in a socket's path is a path: /run/redis@main/redis.sock)
    if "@" in url.partition("//")[2][len(parts.netloc):]:
        # redis://:s3cr@t/x@HOST/0: the authority ends at the password's '/', and the client would connect to host
        # "t" (refused later for a db that is no number, or a query: both sent the operator the wrong way)
        raise ConfigError("kv.redis_url: an '@' after the host (in the path, ?query or #fragment): a password with "
                          "'/', '?' or '#' in it ends the host early; percent-encode the password ('/' as %2F, '?' "
                          "as %3F, '#' as %23, '@' as %40)")
    if not parts.hostname:
        raise ConfigError("kv.redis_url: no host in the URL (redis://HOST[:PORT][/DB]; a password as "
                          "redis://:PASSWORD@HOST..., with '/', '?' or '#' in it percent-encoded)")
    if port == 0:
        raise ConfigError("kv.redis_url: port 0 is no server's port (1 to 65535; Redis listens on 6379)")
    db = urllib.parse.unquote(parts.path).strip("/")  # (what redis-py reads as the db: the path's number)
    if db and not (db.isascii() and db.isdigit()):
        raise ConfigError("kv.redis_url: the path must be a database number (redis://HOST:PORT/0), or left out "
                          "for db 0")
    if parts.query or parts.fragment:
        raise ConfigError("kv.redis_url: no ?query or #fragment: Redis's client reads a query's options (a "
                          "socket_timeout) over the daemon's own; give the database as the path (/0)")


def _check_kv_strings(table: Any) -> None:
    """Refuse ``[kv] listen = ""`` and ``directory = ""``: each silently meant its default (the channel on every
    address, the store in /var/lib/tokenwire/kv), where ``metrics.listen = ""`` means off."""
    if not isinstance(table, dict):
        return
    if table.get("listen") == "":
        raise ConfigError("kv.listen: expected 'host:port', got '' (to turn the KV channel off, set kv.enabled = "
                          "false; leave the key out for the default [::]:4434)")
    if table.get("directory") == "":
        raise ConfigError("kv.directory: expected a folder, got '' (leave the key out for the default "
                          f"{KVConfig.directory})")


def api_key_problem(key: str) -> str | None:
    """Why ``key`` cannot go in the Authorization header (a line break inside it, say two keys; every request
    failed with a traceback), as words that follow the key's name; None when it can."""
    problem = header_value_problem(key)
    return None if problem is None else f"contains {problem} (one key on one line)"


KEY_FILE_LIMIT = 64 * 1024  # an API key (a JWT with its claims too) is far smaller: a log named by mistake is not
CA_FILE_LIMIT = 16 * 1024 * 1024  # a CA bundle (the system's whole store is ~220 KiB)


class FileProblem(ValueError):
    """What is at a path is no file to read a key or CAs from: words that follow its name ("is a folder")."""


def read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of the regular file at ``path``, opened without blocking. A FIFO there blocked ``open`` until a
    writer came, on the event loop at every request (the daemon froze, /healthz and the watchdog included); a
    device is no file either. :class:`FileProblem` for a folder, another kind of file or one over ``limit``
    bytes; ``OSError`` as opening or reading raised it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        mode = os.fstat(fd).st_mode  # of what was opened: a path swapped after a check cannot slip through
        if stat.S_ISDIR(mode):
            raise FileProblem("is a folder")
        if not stat.S_ISREG(mode):
            raise FileProblem("is not a regular file")
        data = bytearray()
        while len(data) <= limit:  # (a file growing while it is read is bounded too)
            chunk = os.read(fd, limit + 1 - len(data))
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    if len(data) > limit:
        raise FileProblem(f"is larger than {limit >> 10} KiB")
    return bytes(data)


def read_api_key(path: Path) -> str:
    """The key in ``path``, stripped; ``UnicodeDecodeError`` for a file that is not UTF-8 text, ``ValueError``
    saying what is wrong with the key or the file (words that follow its name; :class:`FileProblem` for the
    file), ``OSError`` as reading raised it. The config check and the upstream (at each request) both read here,
    without blocking (:func:`read_regular_file`)."""
    key = read_regular_file(path, KEY_FILE_LIMIT).decode("utf-8").strip()
    problem = api_key_problem(key)
    if problem is not None:
        raise ValueError(problem)
    return key


def api_key_absence(api_key_env: str | None, api_key_file: Path | None, *, show_path: bool = True) -> str | None:
    """Why a configured key source yields no key now ("$OPENAI_KEY is unset", "/etc/k is empty"), as words that
    can stand alone; None when it yields one, when none is configured, or when it cannot be read (the other
    checks say why). An empty key sent no Authorization header without a word: the user saw only the 401.
    ``show_path``: False for what clients hear (they are not told the daemon's file names)."""
    if api_key_file is not None:
        try:
            key = read_api_key(api_key_file)
        except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
            return None
        return None if key else f"{api_key_file if show_path else 'the API key file'} is empty"
    if api_key_env:
        value = os.environ.get(api_key_env)
        if value is None:
            return f"${api_key_env} is unset"
        return None if value.strip() else f"${api_key_env} is empty"
    return None


def api_key_warnings(cfg: Config) -> list[str]:
    """What ``config check`` warns about an ``openai`` upstream's ``api_key_env`` or ``api_key_file`` that yields
    no key: it passed, and requests went without an Authorization header, the user hearing only the 401. A
    warning, not an error: ``config check`` runs in the operator's environment, the daemon in its own (the unit's
    EnvironmentFile=), and a key file is read at each request (filled after the start, it is used)."""
    out: list[str] = []
    for i, up in enumerate(cfg.upstreams):
        if up.type != "openai":
            continue
        key_env, key_file = up.options.get("api_key_env"), up.options.get("api_key_file")
        absent = api_key_absence(key_env, key_file)
        if absent is not None:
            source, here = ("api_key_file", "") if key_file is not None else ("api_key_env", " here")
            out.append(f"upstreams[{i}].{source}: {absent}{here}: upstream {up.name!r} would be sent no API key "
                       "(its server may answer 401)")
    return out


def _api_key_file_problem(path: Path) -> str | None:
    """Why a start refuses ``path`` as an api_key_file (words after the key's name): nothing there, a path that is
    no regular file (a folder passed with a misleading "readable by other users" warning, and every request failed
    reading it), a key that cannot be sent; None otherwise. A file this process cannot read passes (``config
    check`` may run as another user): the upstream reads it again at each request and reports what it cannot read
    then."""
    missing = _missing(path)
    if missing is not None:
        return missing
    try:
        if path.is_dir():
            return f"{path} is a folder; name the file holding the key"
        if not path.is_file():  # a FIFO would block each request's read, a device is no key
            return f"{path} is not a regular file; name the file holding the key"
    except OSError:  # Python 3.11: a folder on the way that cannot be entered; the upstream says so per request
        return None
    try:
        read_api_key(path)
    except OSError:
        return None
    except UnicodeDecodeError:
        return f"{path} is not UTF-8 text"
    except FileProblem as exc:
        return f"{path} {exc}"
    except ValueError as exc:
        return f"the key in {path} {exc}"
    return None


def _routes(raw: Any, upstreams: tuple[UpstreamConfig, ...]) -> tuple[Route, ...]:
    if raw is None:
        return (Route("*", upstreams[0].name),)
    if not isinstance(raw, list) or not raw:
        raise ConfigError("routes: expected a non-empty array of [[routes]] tables")
    names = {u.name for u in upstreams}
    out = []
    for i, item in enumerate(raw):
        s = _Section(f"routes[{i}]", item, ("model", "upstream"))
        model = s.str("model", "*") or "*"
        up = s.str("upstream", None)
        if up not in names:
            raise ConfigError(f"routes[{i}].upstream: {up!r} is not a defined upstream ({', '.join(sorted(names))})")
        out.append(Route(model, up))
    return tuple(out)


def parse_config(data: dict[str, Any], path: Path | None = None, *, tls_may_be_missing: bool = False) -> Config:
    """Validate an already-parsed TOML document. ``tls_may_be_missing``: a reload's read (see :func:`_server`)."""
    top = _Section(
        "", data, ("server", "auth", "limits", "logging", "metrics", "ingest", "upstreams", "routes", "marking",
         "kv")
    )
    # relative paths: to the folder of the file as it was named (not resolved: a symlinked file's own folder)
    base = path.parent if path is not None else None
    server = written_server = _server(top.get("server", {}), base, tls_may_be_missing)
    marking = parse_marking(top.get("marking", {}), base, _Section, ConfigError)
    server_table = top.get("server", {})
    cc = effective_congestion(marking, server_table.get("congestion") if isinstance(server_table, dict) else None,
                              ConfigError)
    if cc is not None:
        server = dataclasses.replace(server, congestion=cc)
    log = _Section("logging", top.get("logging", {}), ("level", "format"))
    metrics = _Section("metrics", top.get("metrics", {}), ("listen",))
    mlisten = metrics.str("listen", "127.0.0.1:9464")
    ingest = _Section("ingest", top.get("ingest", {}), ("socket", "max_open", "stall_timeout_s", "socket_group"))
    sock = ingest.path("socket", base, must_exist=False)
    socket_group = ingest.str("socket_group", None) or None  # "": the daemon's group, as unset
    if socket_group is not None and sock is None:
        raise ConfigError("ingest.socket_group: set without ingest.socket (there is no socket to give a group)")
    max_open = ingest.int("max_open", IngestConfig.max_open, 1, 1_000_000)
    stall_timeout_s = ingest.num("stall_timeout_s", IngestConfig.stall_timeout_s, 1.0, 7 * 86400.0)
    upstreams = _upstreams(top.get("upstreams", [{"name": "demo", "type": "demo"}]), base, not tls_may_be_missing)
    pushed = next((u.name for u in upstreams if u.type == "ingest"), None)
    if pushed is not None and sock is None:
        # no application could open one of its answers, and every chat request routed to it is refused
        raise ConfigError(f"ingest.socket: required by the ingest upstream {pushed!r} (applications push its "
                          "answers there)")
    kv = parse_kv(top.get("kv", {}), base)
    _check_kv_strings(top.get("kv", {}))
    if kv.redis_url is not None:
        _check_redis_url(kv.redis_url)
    _check_udp_listeners(server.listen, kv.listen if kv.enabled else None)
    if (kv.enabled and sock is not None and kv.ingest_socket is not None
            and os.path.realpath(sock) == os.path.realpath(kv.ingest_socket)):
        # the daemon failed at start with "another process is listening on this socket": its own token socket
        raise ConfigError(f"kv.ingest_socket: {kv.ingest_socket} is also ingest.socket (the token ingest "
                          "socket); give each socket a path of its own")
    return Config(
        path=path,
        server=server,
        auth=_auth(top.get("auth", {})),
        limits=_limits(top.get("limits", {})),
        logging=LoggingConfig(
            level=log.str("level", "info", ("debug", "info", "warning", "error")) or "info",
            format=log.str("format", "text", ("text", "json")) or "text",
        ),
        metrics=MetricsConfig(parse_addr(mlisten, "metrics.listen") if mlisten else None),
        ingest=IngestConfig(sock, max_open, stall_timeout_s, socket_group),
        kv=kv,
        upstreams=upstreams,
        routes=_routes(top.get("routes", None), upstreams),
        marking=marking,
        server_as_written=written_server,
    )


def group_id(group: str) -> int:
    """The id of ``group``, a name or a number; ``KeyError`` for a name this system has no group of (looked up
    when the socket is made, and by ``config check``: not at load, which reads the file alone)."""
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if not group.isascii() or not group.isdigit():
            raise
        return int(group)  # a bare id (a container's group with no name in /etc/group)


# ---------------------------------------------------------------------------------------- config check notes
# extra_headers names that carry credentials (Authorization, Azure's api-key, X-Api-Key, X-Auth-Token, ...)
_CREDENTIAL_HEADER = re.compile(r"auth|key|token|secret|password|cookie", re.IGNORECASE)


def _is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name, as configured) is this machine only: ``localhost`` (and names
    under it, RFC 6761) or a loopback address. Other names count as remote: what they resolve to may change."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _readable_by_others(path: Path) -> str | None:
    """Who besides its owner may read ``path`` ("other users", or "group 'NAME'"); None when nobody may, or when
    it cannot be checked (the daemon reports a file it cannot read)."""
    import grp

    try:
        st = path.stat()
    except OSError:
        return None
    if st.st_mode & 0o004:
        return "other users"
    if st.st_mode & 0o040:
        try:
            return f"group {grp.getgrgid(st.st_gid).gr_name!r}"
        except KeyError:
            return f"group {st.st_gid}"
    return None


def security_warnings(cfg: Config, config_path: Path | None = None) -> list[str]:
    """What ``config check`` warns about though the daemon runs with it: settings that expose what it guards.
    Each passed without a word: metrics bound to every interface, an API key sent in clear text to another
    host, and secret files readable beyond the daemon's user (an ingest application in its group read them). Run
    as root where the unit's user exists, also the files that user could not read (``config_path`` too, and
    through their folders) and the places the unit's daemon could not write (:func:`service_write_warnings`)."""
    from .unit_access import service_write_warnings, unreadable_by_daemon

    out: list[str] = []
    for name, path in (("configuration", config_path), ("server.private_key", cfg.server.private_key),
                       ("server.certificate", cfg.server.certificate), ("server.client_ca", cfg.server.client_ca)):
        problem = None if path is None else unreadable_by_daemon(path)
        if problem is not None:
            out.append(f"{name}: {problem}")
    out += service_write_warnings(cfg)
    if cfg.metrics.listen is not None and not _is_loopback(cfg.metrics.listen[0]):
        host, port = cfg.metrics.listen
        where = "binds every interface" if host in ("::", "0.0.0.0") else "is not a loopback address"
        out.append(f"metrics.listen: {addr(host, port)} {where}: /metrics and /healthz answer whoever reaches the "
                   "port, without authentication (bind 127.0.0.1, or firewall the port)")
    if cfg.server.private_key is not None:
        who = _readable_by_others(cfg.server.private_key)
        if who is not None:
            out.append(f"server.private_key: {cfg.server.private_key} is readable by {who}: the TLS key should "
                       "be readable by the daemon's user only (0600, owned by that user)")
    for i, up in enumerate(cfg.upstreams):
        if up.type != "openai":
            continue
        opts, where = up.options, f"upstreams[{i}]"
        url = urllib.parse.urlsplit(opts["base_url"])
        credentials = [k for k in ("api_key_env", "api_key_file") if opts.get(k)]
        credentials += [f"extra_headers.{h}" for h in opts.get("extra_headers", {}) if _CREDENTIAL_HEADER.search(h)]
        if url.password:
            credentials.append("the password in base_url")
        if url.scheme.lower() == "http" and credentials and not _is_loopback(url.hostname or ""):
            out.append(f"{where}.base_url: plain http:// to {url.hostname}, not this machine: "
                       f"{', '.join(credentials)} and every prompt cross the network unencrypted (use https://)")
        key_file = opts.get("api_key_file")
        unreadable = unreadable_by_daemon(key_file) if key_file is not None else None
        if unreadable is not None:
            out.append(f"{where}.api_key_file: {unreadable}")
        who = _readable_by_others(key_file) if key_file is not None else None
        if who is not None:
            out.append(f"{where}.api_key_file: {key_file} is readable by {who}: the API key should be readable "
                       "by the daemon's user only (0600, owned by that user)")
    return out


def _bind_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a bind to ``host`` takes (a v4-mapped IPv6 one is its IPv4 address): a name resolves as the
    daemon resolves it (the first ``getaddrinfo`` answer); None when it does not resolve."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
            ip = ipaddress.ip_address(infos[0][4][0].split("%")[0])  # type: ignore[union-attr]  # an IP's: a str
        except (OSError, IndexError, ValueError):
            return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


_ANY6, _ANY4 = ipaddress.ip_address("::"), ipaddress.ip_address("0.0.0.0")


def _overlap(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Whether two UDP binds on this host collide: the same port (0 is a free one each time) and the same
    address, or a wildcard that covers the other. ``::`` covers IPv4 too: the daemon opens it dual-stack."""
    (ha, pa), (hb, pb) = a, b
    if pa != pb or pa == 0:
        return False
    ia, ib = _bind_ip(ha), _bind_ip(hb)
    if ia is None or ib is None:  # a name that does not resolve: the daemon will say so at start
        return ha == hb or _ANY6 in (ia, ib)
    if ia == ib or _ANY6 in (ia, ib):
        return True
    return ia.version == ib.version == 4 and _ANY4 in (ia, ib)


def _check_udp_listeners(listen: tuple[tuple[str, int], ...], kv_listen: tuple[str, int] | None) -> None:
    """Refuse UDP listeners the daemon cannot open together (it failed at start after config check said ok)."""
    for i, a in enumerate(listen):
        for b in listen[:i]:
            if _overlap(a, b):
                why = "is listed twice" if a == b else f"and {addr(*b)} cannot both be bound (the same port; " \
                    "0.0.0.0 takes it on every IPv4 address, [::] on every address)"
                raise ConfigError(f"server.listen: {addr(*a)} {why}")
    if kv_listen is not None:
        for b in listen:
            if _overlap(kv_listen, b):
                raise ConfigError(f"kv.listen: {addr(*kv_listen)} overlaps server.listen {addr(*b)} (both are UDP; "
                                  "give the KV channel a port of its own)")


RESTART_SECTIONS = ("server", "metrics", "ingest", "upstreams", "routes", "marking", "kv")


def restart_sections(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """Each section a reload cannot apply as (name, running, new), as compared: what the operator wrote of
    [server] (``server.congestion`` derived from ``[marking]`` is [marking]'s change), unless the controller in
    effect is the same on both sides: then that one (an explicit ``congestion = "prague"`` where l4s chose prague
    already, compared as written against unset, i.e. "reno", said "restart pending: server.congestion" for nothing).
    [kv] and [marking] are left out while off on both sides: a tweak of a channel that is off changes nothing a
    restart would start, and "changes to kv need a restart" said otherwise."""
    out: list[tuple[str, Any, Any]] = []
    for name in RESTART_SECTIONS:
        a, b = getattr(old, name), getattr(new, name)
        if name == "server" and a.congestion != b.congestion:
            a, b = old.server_as_written or a, new.server_as_written or b
        if name in ("kv", "marking") and not a.enabled and not b.enabled:
            continue
        out.append((name, a, b))
    return out


def restart_changes(old: Config, new: Config) -> list[str]:
    """The sections changed in ``new`` that a reload cannot apply (a restart does); by key:
    :func:`tokenwire.daemon.reload_decisions.restart_settings`."""
    return [name for name, a, b in restart_sections(old, new) if a != b]


def path_missing(path: Path) -> bool:
    """Whether nothing is at ``path``. A folder on the way that cannot be entered (/etc/tokenwire is 0750
    root:tokenwire) may hide a file: not missing, so reading it says why. ``Path.exists`` raised
    PermissionError there (Python 3.11); newer ones may return False, silently the defaults."""
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:  # EACCES, ELOOP, ...: reading it says what
        pass
    return False


def _has_setting(value: Any) -> bool:
    """Whether a parsed TOML value sets anything: a key with a value, not only (nested) table headers."""
    return not isinstance(value, dict) or any(_has_setting(v) for v in value.values())


def load_config(path: str | Path | None = None, *, tls_may_be_missing: bool = False) -> Config:
    """Load and validate ``path`` (default: /etc/tokenwire/tokenwire.toml, else the embedded defaults).
    ``tls_may_be_missing``: a reload's read: a TLS file missing at its path is the TLS reload's to report (the
    running files kept), not a refusal of the whole file (a token revoked in the same SIGHUP stayed valid)."""
    if path is None:
        env = os.environ.get("TOKENWIRE_CONFIG") or None  # set but empty: as if unset (the defaults)
        path = Path(env) if env else DEFAULT_PATH
        if env is None and path_missing(path):
            return parse_config({}, None)
    p = Path(path)
    try:
        # TOML is UTF-8 whatever the locale says; a byte-order mark (a Windows editor's) is dropped, not read as
        # "Invalid statement (at line 1, column 1)"
        text = p.read_bytes().decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start})") from None
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # `tokens = [...]` (or `tokens = []`) with [[auth.tokens]] tables after it: the parser's words alone
        # ("Cannot mutate immutable namespace") did not say that the two forms cannot be mixed
        hint = (" (an array written as `key = [...]` cannot be extended by [[...]] tables: write each entry as a "
                "[[...]] table, as `tokenwire config new-token` prints them)"
                if "immutable namespace" in str(exc) else "")
        raise ConfigError(f"{p}: not valid TOML: {exc}{hint}") from None
    except RecursionError:  # arrays or inline tables nested thousands deep: a traceback, or a reload's escape
        raise ConfigError(f"{p}: not valid TOML: nested too deeply") from None
    except MemoryError:  # the machine's problem, not the file's
        raise
    except Exception as exc:  # tomllib lets others out too (an integer of 5000 digits: a bare ValueError)
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    if not _has_setting(data):
        # an empty or comment-only file was every default: a SIGHUP that read one truncated by an in-place rewrite
        # dropped every auth token and reset the limits, and a start ran open on [::]:4433
        raise ConfigError(f"{p}: no setting in it (the file is empty, or holds only comments or table headers): "
                          "refused rather than run on every default. A file being written? Write it beside this "
                          "one and rename it into place")
    try:
        return parse_config(data, p, tls_may_be_missing=tls_may_be_missing)
    except ConfigError as exc:
        # path:line: as compilers and linters write it, so an editor jumps there (tomllib's own errors give theirs)
        line = error_line(text, str(exc))
        raise ConfigError(f"{p}:{line}: {exc}" if line is not None else f"{p}: {exc}") from None
