"""Run the real ``tokenwire daemon`` as a subprocess for integration tests (config file + NOTIFY_SOCKET)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from tokenwire.transport.tls import make_self_signed

PAIR = make_self_signed(("localhost", "127.0.0.1"))


class DaemonProcess:
    def __init__(
        self, tmp: Path, extra_toml: str = "", *, upstream_toml: str | None = None, server_extra: str = ""
    ) -> None:
        self.server_extra = server_extra
        self.tmp = tmp
        self.cert = tmp / "cert.pem"
        self.key = tmp / "key.pem"
        PAIR.write(self.cert, self.key)
        self.config_path = tmp / "tokenwire.toml"
        self.upstream_toml = upstream_toml or textwrap.dedent(
            """
            [[upstreams]]
            name = "demo"
            type = "demo"
            rate = 300
            first_token_ms = 20
            """
        )
        self.write_config(extra_toml)
        self._listen_for_notifications()
        # WATCHDOG_PID empty: any pid accepted
        self._spawn({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": ""})
        ready = self.wait_for("READY")
        ports = re.findall(r"udp/[^:]+:(\d+)", ready.get("STATUS", ""))
        assert ports, ready
        self.port = int(ports[0])
        m = re.search(r"http://[^:]+:(\d+)/metrics", ready.get("STATUS", ""))
        self.metrics_port = int(m.group(1)) if m else None

    def _listen_for_notifications(self) -> None:
        """The NOTIFY_SOCKET the daemon's sd_notify messages reach, read by a thread of its own."""
        self.notify_path = self.tmp / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self._seen = 0
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._drain_notify, daemon=True)
        self._closing = False
        self._reader.start()

    def _spawn(self, env: dict[str, str]) -> None:
        """``tokenwire daemon --config`` this config, its output in daemon.log, ``env`` beside NOTIFY_SOCKET."""
        self.log_path = self.tmp / "daemon.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokenwire.daemon.cli", "daemon", "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NOTIFY_SOCKET": str(self.notify_path), **env},
        )

    def write_config(self, extra_toml: str) -> None:
        self.config_path.write_text(
            textwrap.dedent(
                f"""
                [server]
                listen = ["127.0.0.1:0"]
                certificate = "{self.cert}"
                private_key = "{self.key}"
                {self.server_extra}
                [metrics]
                listen = "127.0.0.1:0"
                """
            )
            + textwrap.dedent(extra_toml)
            + self.upstream_toml
        )

    def _drain_notify(self) -> None:
        """Read the notify socket continuously, as systemd does (a full queue would block the sender)."""
        while not self._closing:
            try:
                data = self.notify.recv(4096).decode()
            except (TimeoutError, OSError):
                continue
            msg = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
            with self._cond:
                self.messages.append(msg)
                self._cond.notify_all()

    def wait_for(self, key: str, timeout: float = 20.0) -> dict[str, str]:
        """The next notification (after those already waited for) that carries ``key``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(self._seen, len(self.messages)):
                    if key in self.messages[i]:
                        self._seen = i + 1
                        return self.messages[i]
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if self.proc.poll() is not None:
                    raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
                self._cond.wait(min(left, 0.2))
        raise AssertionError(f"no {key} from the daemon within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._closing = True
        self._reader.join(2)
        self.notify.close()
        self._log.close()
        return self.proc.returncode

    def client_kwargs(self) -> dict:
        return {"cafile": str(self.cert), "server_name": "localhost"}
