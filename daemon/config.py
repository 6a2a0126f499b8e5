"""The daemon's TOML configuration: one loader, strict validation, errors that name the bad key.

Every key has a type, a range and a default; unknown keys are errors (with a "did you mean" hint), because a
typo in a limit silently falling back to its default is how services get hurt. ``load_config`` returns a
frozen, fully validated :class:`Config`; ``tokenwire config check FILE`` runs the same code.

Without a file at the default path the embedded defaults apply: the demo upstream on ``[::]:4433`` with an
ephemeral self-signed certificate, so a fresh install streams something without an LLM behind it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import hmac
import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenwire.transport.frames import MAX_STREAM_FRAME

from .config_lines import error_line
from .config_values import MAX_ANSWER_TOKENS, MISSING, ConfigError, Section, parse_addr
from .kv_config import KVConfig, check_kv_strings, check_redis_url, parse_kv
from .marking import MarkingConfig, effective_congestion, parse_marking
from .startup import addr
from .upstream_config import Route, UpstreamConfig, parse_routes, parse_upstreams

if TYPE_CHECKING:
    pass

DEFAULT_PATH = Path("/etc/tokenwire/tokenwire.toml")


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
    # of those, what one client may have at once (its auth principal, else its address: answers.client_key); 0: no
    # such cap (the default: a single heavy user behind one NAT would be refused at any fixed share). Past it that
    # client's new requests are refused, other clients' served: one client opening many connections held every
    # live answer. The application's ingest answers are not counted
    max_live_answers_per_client: int = 0
    orphan_timeout_s: float = 300.0
    # a request stream's REQUEST must be whole this long after its first bytes: a client that sent all but the
    # last byte of 64 ~1 MiB requests held 64 MiB of the daemon per connection for as long as it liked
    request_timeout_s: float = 10.0
    # what connections that have not authorized yet may make the daemon hold of their requests, all together: each
    # may hold ~3 x max_request_bytes (ReadCredit.hold_until_authorized), which over max_sessions connections is
    # ~30 GB; past it the connection holding the most is closed (Admission.account_unauthorized). The KV endpoint's
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


_SELF_SIGNED = "leave both server.certificate and server.private_key out for an ephemeral self-signed certificate"


def _server(t: Any, base: Path | None, tls_may_be_missing: bool = False) -> ServerConfig:
    """[server]. ``tls_may_be_missing``: a reload's read, where a TLS file missing (mid-renewal) is the TLS
    reload's to report, the running files kept, not a reason to refuse the tokens and limits beside it."""
    s = Section("server", t, ("listen", "certificate", "private_key", "client_ca", "congestion", "idle_timeout_s"))
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


CERT_PRINCIPAL_PREFIX = "cert:"
"""What every client certificate's principal starts with (``certificates.cert_principal``): no token may be named so."""


def token_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name an auth token (None when it can), as words that follow the key or option.

    The name is the principal that logs show: a line break in it forged log lines. ``config new-token --name``
    and ``[[auth.tokens]] name`` both check here; printable as ``cert_principal`` means it (``str.isprintable``).
    A token's name and a certificate's principal are one name space (an ingest answer opened for a principal, a KV
    context scoped to one), so ``cert:`` is reserved: a token named ``cert:carol`` got the answers and scoped KV
    contexts of the certificate principal ``cert:carol``, whatever certificate its holder showed.
    """
    problem = principal_name_problem(name)
    if problem is None and name.startswith(CERT_PRINCIPAL_PREFIX):
        return (f"the {CERT_PRINCIPAL_PREFIX!r} prefix is reserved for client certificates' principals (a token of "
                "that name would be taken for the certificate's holder)")
    return problem


def principal_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a principal's name at all (None when it can): non-empty, printable, at most
    ``MAX_PRINCIPAL_CHARS``; a token's and a certificate's principal both pass it (a KV put's scope is checked here)."""
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
    s = Section("auth", t, ("tokens",))
    raw = s.get("tokens", [])
    if not isinstance(raw, list):
        raise ConfigError("auth.tokens: expected an array of {name, sha256} tables")
    out: list[TokenEntry] = []
    first_of: dict[str, int] = {}  # digest -> its first entry's index: a scan of `out` per entry was quadratic
    for i, item in enumerate(raw):
        e = Section(f"auth.tokens[{i}]", item, ("name", "sha256"))
        name = e.str("name", None)
        digest = e.str("sha256", None)
        if name is None:
            raise ConfigError(f"auth.tokens[{i}].name: {MISSING}")
        if not name:
            raise ConfigError(f"auth.tokens[{i}].name: expected a non-empty string, got ''")
        problem = token_name_problem(name)
        if problem is not None:
            raise ConfigError(f"auth.tokens[{i}].name: {problem}")
        if digest is None:
            raise ConfigError(f"auth.tokens[{i}].sha256: {MISSING} (make it with `tokenwire config new-token`)")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
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
    s = Section("limits", t, tuple(Limits.__dataclass_fields__))
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
        max_live_answers_per_client=s.int("max_live_answers_per_client", 0, 0, MAX_LIVE_ANSWERS),
        orphan_timeout_s=s.num("orphan_timeout_s", 300.0, 1.0, 7 * 86400.0),
        request_timeout_s=s.num("request_timeout_s", 10.0, 1.0, 3600.0),
        unauthorized_memory_mb=s.num("unauthorized_memory_mb", 256.0, 1.0, 1 << 20),
    )


def parse_config(data: dict[str, Any], path: Path | None = None, *, tls_may_be_missing: bool = False) -> Config:
    """Validate an already-parsed TOML document. ``tls_may_be_missing``: a reload's read (see :func:`_server`)."""
    top = Section(
        "", data, ("server", "auth", "limits", "logging", "metrics", "ingest", "upstreams", "routes", "marking",
         "kv")
    )
    # relative paths: to the folder of the file as it was named (not resolved: a symlinked file's own folder)
    base = path.parent if path is not None else None
    server = written_server = _server(top.get("server", {}), base, tls_may_be_missing)
    marking = parse_marking(top.get("marking", {}), base)
    server_table = top.get("server", {})
    cc = effective_congestion(marking, server_table.get("congestion") if isinstance(server_table, dict) else None)
    if cc is not None:
        server = dataclasses.replace(server, congestion=cc)
    log = Section("logging", top.get("logging", {}), ("level", "format"))
    metrics = Section("metrics", top.get("metrics", {}), ("listen",))
    mlisten = metrics.str("listen", "127.0.0.1:9464")
    ingest = Section("ingest", top.get("ingest", {}), ("socket", "max_open", "stall_timeout_s", "socket_group"))
    sock = ingest.path("socket", base, must_exist=False)
    socket_group = ingest.str("socket_group", None) or None  # "": the daemon's group, as unset
    if socket_group is not None and sock is None:
        raise ConfigError("ingest.socket_group: set without ingest.socket (there is no socket to give a group)")
    max_open = ingest.int("max_open", IngestConfig.max_open, 1, 1_000_000)
    stall_timeout_s = ingest.num("stall_timeout_s", IngestConfig.stall_timeout_s, 1.0, 7 * 86400.0)
    upstreams = parse_upstreams(top.get("upstreams", [{"name": "demo", "type": "demo"}]), base, not tls_may_be_missing)
    pushed = next((u.name for u in upstreams if u.type == "ingest"), None)
    if pushed is not None and sock is None:
        # no application could open one of its answers, and every chat request routed to it is refused
        raise ConfigError(f"ingest.socket: required by the ingest upstream {pushed!r} (applications push its "
                          "answers there)")
    kv = parse_kv(top.get("kv", {}), base)
    check_kv_strings(top.get("kv", {}))
    if kv.redis_url is not None:
        check_redis_url(kv.redis_url)
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
        routes=parse_routes(top.get("routes", None), upstreams),
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


def daemon_config_path() -> Path | None:
    """The file the daemon reads when none is named: ``$TOKENWIRE_CONFIG``, else DEFAULT_PATH; None when that is
    missing and the environment named none (the embedded defaults apply). ``config check`` checks the same file."""
    env = os.environ.get("TOKENWIRE_CONFIG") or None  # set but empty: as if unset (the defaults)
    path = Path(env) if env else DEFAULT_PATH
    return None if env is None and path_missing(path) else path


def load_config(path: str | Path | None = None, *, tls_may_be_missing: bool = False) -> Config:
    """Load and validate ``path`` (default: /etc/tokenwire/tokenwire.toml, else the embedded defaults).
    ``tls_may_be_missing``: a reload's read: a TLS file missing at its path is the TLS reload's to report (the
    running files kept), not a refusal of the whole file (a token revoked in the same SIGHUP stayed valid)."""
    if path is None:
        path = daemon_config_path()
        if path is None:
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
