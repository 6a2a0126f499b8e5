"""The systemd notification protocol (sd_notify(3)), spoken directly over ``$NOTIFY_SOCKET``.

A datagram of ``KEY=VALUE`` lines to the Unix socket named by ``NOTIFY_SOCKET`` (``@`` means the abstract
namespace). Written here rather than pulled in as a dependency: the protocol is one ``sendto``.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    """Sends READY/STATUS/WATCHDOG/RELOADING/STOPPING when running under systemd; a no-op otherwise."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self._addr: str | bytes | None = None
        if addr.startswith("@"):
            self._addr = "\0" + addr[1:]
        elif addr.startswith("/"):
            self._addr = addr
        self._sock: socket.socket | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_s: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def send(self, **fields: str | int) -> bool:
        if self._addr is None:
            return False
        msg = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                # non-blocking: a slow reader must never stall the event loop (the message is dropped)
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._sock.sendto(msg, self._addr)
            return True
        except OSError:  # BlockingIOError included
            return False

    def ready(self, status: str) -> bool:
        return self.send(ready=1, status=status)

    def status(self, status: str) -> bool:
        return self.send(status=status)

    def watchdog(self) -> bool:
        return self.send(watchdog=1)

    def reloading(self) -> bool:
        return self.send(reloading=1, monotonic_usec=int(time.monotonic() * 1e6))

    def stopping(self, status: str = "draining", extend_s: float | None = None) -> bool:
        """STOPPING=1; with ``extend_s``, also EXTEND_TIMEOUT_USEC: systemd then waits that long past this message
        even beyond TimeoutStopSec= (a drain longer than the unit's stop timeout was SIGKILLed mid-way)."""
        if extend_s is None:
            return self.send(stopping=1, status=status)
        return self.send(stopping=1, status=status, extend_timeout_usec=int(extend_s * 1e6))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
