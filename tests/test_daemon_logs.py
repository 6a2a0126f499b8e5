"""What the daemon's log says under a flood and after a reload: one client's refused requests are one warning
and a total (1,770 warning lines a second before), and a reload that lowers the log level still logs itself."""

from __future__ import annotations

import asyncio
import signal
import time

from tokenwire.transport.client import connect

from .daemon_proc import DaemonProcess
from .test_loopback import run


def test_a_flood_of_refused_requests_is_one_warning_and_a_total(tmp_path):
    d = DaemonProcess(tmp_path, "[limits]\nmax_request_bytes = 1024\n")
    try:

        async def flood():
            async with connect("127.0.0.1", d.port, **d.client_kwargs()) as conn:
                quic = conn._protocol._quic
                for _ in range(30):  # each a length prefix past max_request_bytes: refused alone
                    quic.send_stream_data(quic.get_next_available_stream_id(), b"\xff\xff\xff\xff")
                conn._protocol.transmit()
                for _ in range(100):  # the connection still serves (every refusal comes back first)
                    await asyncio.sleep(0.05)
                    if d.log().count("request too large") >= 1 and await conn.chat("x", max_tokens=2).collect():
                        break

        run(flood())
        deadline = time.monotonic() + 10
        while "of its requests were refused" not in d.log():
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.1)
    finally:
        assert d.stop() == 0
    log = d.log_path.read_text()
    assert log.count("refused a request from") == 1, log
    assert "30 of its requests were refused (the first one logged)" in log


def test_a_reload_that_lowers_the_log_level_still_says_it_reloaded(tmp_path):
    """The new level was applied first, so the INFO "reloaded" line of a reload to level "warning" was filtered
    out: nothing showed that the reload (and its new limits) had been applied."""
    d = DaemonProcess(tmp_path, '[logging]\nlevel = "info"\n')
    try:
        d.write_config('[logging]\nlevel = "warning"\n[limits]\nmax_tokens = 77\n')
        d.signal(signal.SIGHUP)
        d.wait_for("READY")
    finally:
        assert d.stop() == 0
    log = d.log_path.read_text()
    assert "reloaded:" in log and "max_tokens=77" in log, log
    assert "stopped" not in log.split("reloaded:")[1]  # INFO lines after the reload are filtered: the new level
