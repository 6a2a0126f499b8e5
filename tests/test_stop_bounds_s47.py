"""The waits between a SIGTERM and the daemon's exit are bounded, and systemd is asked for their sum.

A scrape still being served when the daemon stopped held ``runner.cleanup()`` for aiohttp's default
``shutdown_timeout`` (60 s) twice: a scraper that stopped reading its answer kept the stop 129 s after one SIGTERM
(s47 drain repro, ``stallscrape``), past the 55 s STOPPING=1 had asked systemd for, which then SIGKILLs."""
from __future__ import annotations

import asyncio
import threading

import pytest

from tokenwire.daemon import daemon_cli, service, telemetry
from tokenwire.daemon.telemetry import Metrics, serve_metrics

CLOSE_S = 0.2  # the metrics close's bound in these tests (METRICS_CLOSE_S)


def _stop_with_a_scrape_in_progress(monkeypatch: pytest.MonkeyPatch, answer: bytes) -> float:
    """Seconds ``runner.cleanup()`` took with one scrape in progress: its body held on a worker thread until the
    close has run (``answer`` empty), or an ``answer`` too large for the socket to a client that reads nothing."""
    monkeypatch.setattr(telemetry, "METRICS_CLOSE_S", CLOSE_S)
    entered, release = threading.Event(), threading.Event()
    metrics = Metrics()

    def exposition() -> bytes:
        entered.set()
        if not answer:
            release.wait(30)
        return answer

    monkeypatch.setattr(metrics, "exposition", exposition)

    async def go() -> float:
        runner = await serve_metrics(metrics, "127.0.0.1", 0, lambda: True)
        _, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
        try:
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            assert await asyncio.to_thread(entered.wait, 10)  # the handler runs: the request is in progress
            loop = asyncio.get_running_loop()
            began = loop.time()
            await asyncio.wait_for(runner.cleanup(), 5.0)  # (60 s, then 60 s more, with aiohttp's default)
            return loop.time() - began
        finally:
            release.set()  # (before asyncio.run's end joins the default executor's threads)
            writer.close()

    return asyncio.run(go())


@pytest.mark.parametrize("answer", [b"", b"x" * (32 << 20)], ids=["body-being-made", "client-reads-nothing"])
def test_a_scrape_in_progress_holds_the_metrics_close_a_bounded_time(monkeypatch, answer):
    took = _stop_with_a_scrape_in_progress(monkeypatch, answer)
    assert took < 2 * CLOSE_S + 1.0


def test_every_wait_after_the_stop_signal_is_in_what_systemd_is_asked_for():
    """STOPPING=1's EXTEND_TIMEOUT_USEC covers the drain, the KV close, the metrics close (twice aiohttp's
    shutdown_timeout), the exit's wait for a KV worker, and a margin."""
    assert telemetry.METRICS_CLOSE_MAX_S == 2 * telemetry.METRICS_CLOSE_S
    assert service.stop_extension_s(30.0) >= (30.0 + service.KV_CLOSE_S + telemetry.METRICS_CLOSE_MAX_S
                                              + daemon_cli.KV_WORKER_WAIT_S + service.STOP_MARGIN_S)
    # the unit's and README's figure: drain_timeout_s + 31 s
    assert service.stop_extension_s(30.0) - 30.0 == 31.0
