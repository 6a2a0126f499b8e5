"""Validated values of the TOML configuration: one table's known keys, types and ranges
(:class:`Section`), ``host:port`` addresses and URLs, and :class:`ConfigError`, whose message names the key.
Shared by every section's parser (:mod:`.config`, :mod:`.upstream_config`, :mod:`.kv_config`), so that none
of them imports the module that assembles the document."""

from __future__ import annotations

import builtins
import datetime
import difflib
import ipaddress
import json
import math
import re
import urllib.parse
from pathlib import Path
from typing import Any

MAX_ANSWER_TOKENS = 1_000_000  # the bound of limits.max_tokens and of an upstream's max_tokens


class ConfigError(ValueError):
    """A configuration problem; the message names the file and key."""


MISSING = "required key missing"  # what a message says of a key that must be set and is not
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_value(v: Any) -> builtins.str:
    """``v`` as the TOML document spells it, for messages: ``true``, not Python's ``True``; a string quoted
    (``'x'``, or ``"..."`` with TOML's escapes when it holds a quote or a control character); arrays and inline
    tables likewise. ``max_tokens = true`` said "got True"."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, builtins.str):
        if "'" not in v and v.isprintable():
            return f"'{v}'"
        return json.dumps(v, ensure_ascii=False)  # (JSON's string escapes are TOML's)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, (datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        items = ", ".join(f"{k if _BARE_KEY.fullmatch(k) else toml_value(k)} = {toml_value(x)}" for k, x in v.items())
        return "{ " + items + " }" if items else "{}"
    return repr(v)  # an int


# ---------------------------------------------------------------------------------------------- validation
class Section:
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
            raise ConfigError(f"{self._k(key)}: expected an integer in [{lo}, {hi}], got {toml_value(v)}")
        return v

    def num(self, key: str, default: float, lo: float, hi: float) -> float:
        v = self.table.get(key, default)
        if type(v) not in (int, float) or not lo <= v <= hi:
            raise ConfigError(f"{self._k(key)}: expected a number in [{lo:g}, {hi:g}], got {toml_value(v)}")
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        v = self.table.get(key, default)
        if type(v) is not bool:
            raise ConfigError(f"{self._k(key)}: expected true or false, got {toml_value(v)}")
        return v

    def str(self, key: str, default: str | None, choices: tuple[str, ...] | None = None) -> str | None:
        v = self.table.get(key, default)
        if v is None:
            return None
        if type(v) is not str:
            raise ConfigError(f"{self._k(key)}: expected a string, got {toml_value(v)}")
        if choices is not None and v not in choices:
            raise ConfigError(f"{self._k(key)}: expected one of {', '.join(choices)}, got {toml_value(v)}")
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


# a host name's characters (letters and digits of any script: yarl encodes them with IDNA)
HOST_CHARS = re.compile(r"[\w.-]+")


# what a URL that does not parse is told: never the parser's words, which with a '#', '/' or '?' in a password quoted
# a piece of it, nor the URL
BAD_URL = "not a valid URL (check the host and port; a password holding '#', '/', '?' or '@' must be percent-encoded)"


def url_parts(url: str, where: str) -> tuple[urllib.parse.SplitResult, int | None]:
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
        raise ConfigError(f"{where}: {BAD_URL}") from None
