"""The ``[[upstreams]]`` and ``[[routes]]`` tables: each upstream type's keys, base URLs a client can send to,
API keys and CA files read the way the daemon will read them (regular files of bounded size, keys fit for a
header), so that ``config check`` refuses what would fail every request later. Split from :mod:`.config`,
which assembles the whole document."""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .config_values import (
    BAD_URL,
    HOST_CHARS,
    MAX_ANSWER_TOKENS,
    MISSING,
    ConfigError,
    Section,
    toml_value,
    url_parts,
)

if TYPE_CHECKING:
    import ssl

    from .config import Config


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


def _file_option(s: Section, key: str, base: Path | None, empty_hint: str) -> Path | None:
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


def parse_upstreams(raw: Any, base: Path | None, check_files: bool = True) -> tuple[UpstreamConfig, ...]:
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
        Section(where, item, tuple(dict.fromkeys(k for keys in UPSTREAM_KEYS.values() for k in keys)))
        kind = item.get("type")
        if kind is None:
            raise ConfigError(f"{where}.type: {MISSING} (one of {', '.join(UPSTREAM_KEYS)})")
        if not isinstance(kind, str) or kind not in UPSTREAM_KEYS:
            raise ConfigError(f"{where}.type: expected one of {', '.join(UPSTREAM_KEYS)}, got {toml_value(kind)}")
        s = Section(where, item, UPSTREAM_KEYS[kind])
        name = s.str("name", None)
        if name is None:
            raise ConfigError(f"{where}.name: {MISSING}")
        if not name:
            raise ConfigError(f"{where}.name: expected a non-empty string, got ''")
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


def _check_base_url(url: str, where: str) -> None:
    """Refuse an ``http(s)://`` base_url the upstream cannot send a request to: a port out of range or not a
    number, no host, an unclosed IPv6 bracket, spaces (each was a ValueError traceback at the daemon's start, or
    a failure of every request, after ``config check`` said ok), and a query or fragment (``/chat/completions``
    is appended to the URL, after them). The words do not repeat the URL: it may hold a password."""
    import yarl

    parts, port = url_parts(url, where)
    try:
        yarl.URL(f"{url.rstrip('/')}/chat/completions")  # what the upstream builds its requests from
    except ValueError:
        raise ConfigError(f"{where}: {BAD_URL}") from None
    host = parts.hostname
    if not host:
        raise ConfigError(f"{where}: no host in the URL (http://HOST[:PORT]/...)")
    if "[" in parts.netloc:
        try:
            ipaddress.IPv6Address(host.split("%")[0])
        except ValueError:
            raise ConfigError(f"{where}: [{host}] is not an IPv6 address") from None
    elif not HOST_CHARS.fullmatch(host) or host.strip(".") == "":
        raise ConfigError(f"{where}: {host!r} is not a host name or address")
    if port == 0:
        raise ConfigError(f"{where}: port 0 is no server's port (1 to 65535)")
    if parts.query or parts.fragment:
        raise ConfigError(f"{where}: no ?query or #fragment: base_url is the API's root, and /chat/completions "
                          "is appended to it")


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


def parse_routes(raw: Any, upstreams: tuple[UpstreamConfig, ...]) -> tuple[Route, ...]:
    if raw is None:
        return (Route("*", upstreams[0].name),)
    if not isinstance(raw, list) or not raw:
        raise ConfigError("routes: expected a non-empty array of [[routes]] tables")
    names = {u.name for u in upstreams}
    out = []
    for i, item in enumerate(raw):
        s = Section(f"routes[{i}]", item, ("model", "upstream"))
        model = s.str("model", "*") or "*"
        up = s.str("upstream", None)
        if up is None:
            raise ConfigError(f"routes[{i}].upstream: {MISSING} (one of {', '.join(sorted(names))})")
        if up not in names:
            raise ConfigError(f"routes[{i}].upstream: {up!r} is not a defined upstream ({', '.join(sorted(names))})")
        out.append(Route(model, up))
    return tuple(out)
