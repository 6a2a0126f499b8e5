"""Why the daemon cannot start, in one line that names the setting (for the command line and the journal)."""

from __future__ import annotations

import os
import socket


class StartupError(Exception):
    """The daemon cannot start as configured (a port in use, an unreadable certificate, no store): one line
    that names the setting, for the command line and the journal."""


def addr(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_failure(exc: OSError, host: str, port: int, tcp: bool = False) -> str:
    """Why a bind failed, in the kernel's words. uvloop's UDP error ("could not bind to local_addr") has no
    errno, so the bind is tried once more with a plain socket to learn it."""
    if exc.errno is not None:
        return os.strerror(exc.errno)  # uvloop's strerror repeats the address around it

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM) as probe:
            probe.bind((host, port))
    except OSError as again:
        return again.strerror or str(again)
    return str(exc)


def cannot_listen(setting: str, exc: OSError, host: str, port: int, *, tcp: bool = False) -> StartupError:
    """The one line for a listener that could not bind, naming the setting, the address and the reason."""
    return StartupError(f"{setting}: cannot listen on {'tcp' if tcp else 'udp'}/{addr(host, port)}: "
                        f"{bind_failure(exc, host, port, tcp)}")
