"""The ``[kv]`` section of the daemon's configuration (KV-chunk channel and store).

```toml
[kv]
enabled = true
listen = "[::]:4434"            # the KV channel's own QUIC endpoint (ALPN tokenwire-kv/1)
backend = "local"               # local | redis
directory = "/var/lib/tokenwire/kv"
redis_url = "redis://127.0.0.1:6379/0"
capacity_mb = 4096
chunk_tokens = 256
ingest_socket = "/run/tokenwire/kv-ingest.sock"
ingest_socket_group = "tokenwire-ingest"  # the socket's group (0660): who may put KV; unset: the daemon's
ingest_memory_mb = 8192         # puts held in memory at once (bodies being read, chunked, stored); more wait
congestion = "prague"           # follows marking: prague for l4s, reno-ecn for classic, reno for none
marking = "l4s"                 # l4s (ECT(1)) | classic (ECT(0), as [marking] classic) | none (Not-ECT)
forecaster = "onnx"             # onnx | ewma
prior_mbps = 5.0                # planning bandwidth of a connection that has carried < 8 chunks (then: its own rates)
recompute_us_per_token = 2250   # default engine prefill cost (clients may send their own)
decode_mbps = 400.0             # decode speed planned for a client that sends no figure (elements/s / 1e6 * 8)
```

Parsed here (not in ``config.py``) so the KV channel stays one small hook in the daemon's config.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenwire.transport.frames import MAX_CHUNK_TOKENS

from .config_values import ConfigError, Section, parse_addr, toml_value, url_parts

if TYPE_CHECKING:
    from tokenwire.transport.marking import MarkingPolicy

# what each kv.marking sends: "classic" is ECT(0), the classic ECN codepoint, as [marking] classic sends by default
# (it was Not-ECT, the same on the wire as "none"); Not-ECT is "none"
KV_ECT = {"l4s": "ect1", "classic": "ect0", "none": None}


@dataclass(frozen=True)
class KVConfig:
    enabled: bool = False
    listen: tuple[str, int] = ("::", 4434)
    backend: str = "local"
    directory: Path = Path("/var/lib/tokenwire/kv")
    redis_url: str | None = None
    capacity_bytes: int = 4096 << 20
    chunk_tokens: int = 256
    ingest_socket: Path | None = None
    ingest_socket_group: str | None = None  # as [ingest] socket_group: None, the daemon's group
    ingest_memory_bytes: int = 8192 << 20
    congestion: str = "prague"
    marking: str = "l4s"
    forecaster: str = "onnx"
    prior_mbps: float = 5.0
    recompute_us_per_token: int = 2250
    decode_mbps: float = 400.0


KEYS = ("enabled", "listen", "backend", "directory", "redis_url", "capacity_mb", "chunk_tokens", "ingest_socket",
        "ingest_socket_group", "ingest_memory_mb", "congestion", "marking", "forecaster", "prior_mbps",
        "recompute_us_per_token", "decode_mbps")


def _congestion(explicit: str | None, marking: str) -> str:
    """kv.congestion follows kv.marking unless set, as server.congestion follows [marking] (one rule,
    :func:`.marking.ecn_congestion`): ECT(1) packets need prague (another is an error); ECT(0) packets the classic
    ECN response, reno-ecn (cubic-ecn for "cubic"; prague is an error: it answers a classic queue's CE marks with
    cuts of a few percent); Not-ECT keeps what is set, reno by default (prague would see no CE marks)."""
    from .marking import ecn_congestion

    needed = ecn_congestion(KV_ECT[marking], explicit, "kv.congestion", f"kv.marking = {marking!r}", ConfigError)
    return needed or explicit or "reno"


def kv_marking(marking: str) -> Callable[[], MarkingPolicy] | None:
    """The KV channel's per-connection policy factory for ``kv.marking`` (None: "none", the plain socket); what
    ``serve_kv(marking=...)`` takes."""
    from tokenwire.transport.marking import ClassicPolicy, L4SPolicy

    ect = KV_ECT[marking]
    if ect == "ect1":
        return L4SPolicy
    if ect == "ect0":
        return lambda: ClassicPolicy(ect0=True)
    return None


def parse_kv(table: Any, base: Path | None) -> KVConfig:
    s = Section("kv", table, KEYS)
    enabled = s.get("enabled", False)
    if type(enabled) is not bool:
        raise ConfigError(f"kv.enabled: expected true or false, got {toml_value(enabled)}")
    backend = s.str("backend", "local", ("local", "redis")) or "local"
    redis_url = s.str("redis_url", None)
    if backend == "redis" and not redis_url:
        raise ConfigError("kv.redis_url: required when kv.backend = 'redis'")
    if redis_url is not None and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"kv.redis_url: expected a redis://, rediss:// or unix:// URL, got {redis_url!r}")
    directory = s.path("directory", base, must_exist=False) or KVConfig.directory
    marking = s.str("marking", "l4s", ("l4s", "classic", "none")) or "l4s"
    ingest_socket = s.path("ingest_socket", base, must_exist=False)
    ingest_socket_group = s.str("ingest_socket_group", None) or None  # "": the daemon's group, as unset
    if ingest_socket_group is not None and ingest_socket is None:
        raise ConfigError("kv.ingest_socket_group: set without kv.ingest_socket (there is no socket to give a group)")
    return KVConfig(
        enabled=enabled,
        listen=parse_addr(s.str("listen", "[::]:4434") or "[::]:4434", "kv.listen"),
        backend=backend,
        directory=directory,
        redis_url=redis_url,
        capacity_bytes=s.int("capacity_mb", 4096, 1, 1 << 24) << 20,
        chunk_tokens=s.int("chunk_tokens", 256, 16, MAX_CHUNK_TOKENS),  # what one KV_CHUNK may carry
        ingest_socket=ingest_socket,
        ingest_socket_group=ingest_socket_group,
        # at most the largest put (8 GiB, kv_service.MAX_INGEST_BYTES): a put larger than it is refused
        ingest_memory_bytes=s.int("ingest_memory_mb", 8192, 1, 8192) << 20,
        congestion=_congestion(s.str("congestion", None, ("prague", "reno", "cubic")), marking),
        marking=marking,
        forecaster=s.str("forecaster", "onnx", ("onnx", "ewma")) or "onnx",
        prior_mbps=s.num("prior_mbps", 5.0, 0.01, 100_000.0),
        recompute_us_per_token=s.int("recompute_us_per_token", 2250, 0, 10_000_000),
        decode_mbps=s.num("decode_mbps", 400.0, 1.0, 1e6),
    )


def check_paths(cfg: KVConfig) -> tuple[list[str], list[str]]:
    """What the daemon's start would make of ``[kv]``'s paths, found without creating, locking or binding
    anything (``config check``): (errors the daemon refuses to start with, warnings), each in the daemon's own
    words: the store's directory (``kv_store_local.check_local_directory``) and the ingest socket
    (``unix_sockets.listen_problem``)."""
    from . import unix_sockets
    from .kv_store_local import check_local_directory

    errors: list[str] = []
    warnings: list[str] = []
    if cfg.enabled and cfg.backend == "local":
        error, warning = check_local_directory(cfg.directory)
        errors += [f"kv.directory: {error}"] if error else []
        warnings += [f"kv.directory: {warning}"] if warning else []
    if cfg.enabled:
        more_errors, more_warnings = unix_sockets.socket_checks(
            None if cfg.ingest_socket is None else Path(cfg.ingest_socket), cfg.ingest_socket_group, "kv.ingest_socket")
        errors += more_errors
        warnings += more_warnings
    return errors, warnings


def check_redis_url(url: str) -> None:
    """Refuse a ``kv.redis_url`` the Redis client cannot connect with, or would read otherwise than it says:
    ``redis://h:99999/0`` passed ``config check`` and the daemon refused it at start; ``redis://`` (no host)
    connected to localhost:6379, a db that is no number (``/abc``) to db 0, both silently, and a query
    (``?socket_timeout=1``) overrode the daemon's own settings for its connection. Its words do not repeat the URL:
    it may hold a password."""
    parts, port = url_parts(url, "kv.redis_url")
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


def check_kv_strings(table: Any) -> None:
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
