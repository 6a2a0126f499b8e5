"""What ``tokenwire config check`` warns about in a configuration the daemon would run with: settings that
expose what it guards (metrics on every interface, credentials in clear text, secrets readable by others, files
the service's user cannot reach). Split from :mod:`.config`: warnings, not validation."""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

from .startup import addr

if TYPE_CHECKING:
    from .config import Config


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


def limits_warnings(cfg: Config) -> list[str]:
    """Limits that hold nothing back as set: the daemon runs with them, the operator meant something else."""
    lim = cfg.limits
    if lim.max_live_answers_per_client >= lim.max_live_answers:
        return [f"limits.max_live_answers_per_client = {lim.max_live_answers_per_client} is not below "
                f"limits.max_live_answers = {lim.max_live_answers}: one client may still take every live answer "
                "(set it lower, e.g. a quarter, or 0 to say there is no cap)"]
    return []


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
