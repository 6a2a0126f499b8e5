"""Why the daemon cannot start, in one line that names the setting (for the command line and the journal)."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path


class StartupError(Exception):
    """The daemon cannot start as configured (a port in use, an unreadable certificate, no store): one line
    that names the setting, for the command line and the journal."""


def addr(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# Ports below this need CAP_NET_BIND_SERVICE (the kernel's default net.ipv4.ip_unprivileged_port_start)
PRIVILEGED_PORTS = 1024
# What a refused bind to such a port needs under the systemd unit, whose CapabilityBoundingSet= is empty: both
# lines, as its comments and the README say (AmbientCapabilities= alone is refused while the bounding set is empty)
CAPABILITY_HINT = ("a port below 1024 needs CAP_NET_BIND_SERVICE: under the systemd unit, a drop-in (systemctl "
                   "edit tokenwire) with both CapabilityBoundingSet=CAP_NET_BIND_SERVICE and "
                   "AmbientCapabilities=CAP_NET_BIND_SERVICE under [Service]; or a port from 1024 up")


UNPRIVILEGED_PORT_START = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")


def unprivileged_port_start() -> int:
    """The first port a process without CAP_NET_BIND_SERVICE may bind on this host: the kernel's sysctl (a host
    may lower it, and then no capability is needed), at most :data:`PRIVILEGED_PORTS`; that when unreadable."""
    try:
        return min(PRIVILEGED_PORTS, int(UNPRIVILEGED_PORT_START.read_text().strip()))
    except (OSError, ValueError):
        return PRIVILEGED_PORTS


def _bind_error(exc: OSError, host: str, port: int, tcp: bool) -> tuple[int | None, str]:
    """(errno, the kernel's words) of a failed bind. uvloop's UDP error ("could not bind to local_addr") has no
    errno, so the bind is tried once more with a plain socket to learn it."""
    if exc.errno is not None:
        return exc.errno, os.strerror(exc.errno)  # uvloop's strerror repeats the address around it

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM) as probe:
            probe.bind((host, port))
    except OSError as again:
        return again.errno, again.strerror or str(again)
    return None, str(exc)


def bind_failure(exc: OSError, host: str, port: int, tcp: bool = False) -> str:
    """Why a bind failed, in the kernel's words (:func:`_bind_error`)."""
    return _bind_error(exc, host, port, tcp)[1]


def cannot_listen(setting: str, exc: OSError, host: str, port: int, *, tcp: bool = False) -> StartupError:
    """The one line for a listener that could not bind, naming the setting, the address and the reason; for a
    port below 1024 refused as such, what the unit needs (a bare "Permission denied" sent people nowhere)."""
    code, why = _bind_error(exc, host, port, tcp)
    if code in (errno.EACCES, errno.EPERM) and 0 < port < PRIVILEGED_PORTS:
        why = f"{why} ({CAPABILITY_HINT})"
    return StartupError(f"{setting}: cannot listen on {'tcp' if tcp else 'udp'}/{addr(host, port)}: {why}")
