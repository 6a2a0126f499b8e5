"""What a metrics audit found (session 34): traffic that is not HTTP at all on the metrics port (what a port scan
sends) went uncounted, though the docs promised each malformed request in a series."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from tokenwire.daemon.telemetry import Metrics, serve_metrics

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"

# a TLS ClientHello's first bytes, an SSH banner, NUL bytes, junk: aiohttp's "bad method" on a connection's first
# request, which it logs at DEBUG rather than through log_exception
NOT_HTTP = [b"\x16\x03\x01\x00\x05hello", b"SSH-2.0-OpenSSH_9.0\r\n", b"\x00" * 100, b"GARBAGE\r\n\r\n"]


async def ask_raw(port: int, raw: bytes) -> bytes:
    """What the metrics port answers to ``raw`` sent on a connection of its own (its first 200 bytes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    answer = await reader.read(200)
    writer.close()
    return answer


def _malformed(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("tokenwire_metrics_malformed_requests_total", {})
    assert value is not None
    return value


def test_what_a_port_scan_sends_is_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()

    async def go() -> list[bytes]:
        runner = await serve_metrics(metrics, "127.0.0.1", 0, lambda: True)
        try:
            port = runner.addresses[0][1]
            answers = [await ask_raw(port, raw) for raw in NOT_HTTP]
            answers.append(await ask_raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
            return answers
        finally:
            await runner.cleanup()

    with caplog.at_level(logging.DEBUG, logger="tokenwire"):
        answers = asyncio.run(asyncio.wait_for(go(), 30))
    assert [a[:12] for a in answers[:-1]] == [b"HTTP/1.0 400"] * len(NOT_HTTP)
    assert answers[-1][:12] == b"HTTP/1.1 200"
    assert _malformed(metrics) == len(NOT_HTTP)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "malformed" in r.getMessage()]
    assert len(warned) == 1, warned  # the first; the others wait for the summary line
    assert "HTTPS traffic on an HTTP port" in warned[0], warned  # aiohttp's reason for a ClientHello


# ----------------------------------------------------------------------------------- the KV families at start
def _kv_families(text: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name for f in text_string_to_metric_families(text) if f.name.startswith("tokenwire_kv_")}


def test_the_kv_families_are_scraped_at_zero_before_the_runtime_exists() -> None:
    """A daemon's KV warm-up takes seconds, and a scrape then had none of the 21 KV families (gaps, absent()
    alerts after each restart): they read 0 until the runtime attaches, then the runtime's counters."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest

    from tokenwire.daemon.kv_metrics import KVMetrics
    from tokenwire.daemon.kv_store import StoreStats

    registry = CollectorRegistry()
    kv = KVMetrics(registry, capacity_bytes=64 << 20)
    early = generate_latest(registry).decode()
    assert "tokenwire_kv_store_capacity_bytes 6.7108864e+07" in early
    assert 'tokenwire_kv_fetches_total{outcome="completed"} 0.0' in early
    assert "tokenwire_kv_store_bytes " not in early  # no store open yet: left out, as when it does not answer

    listeners: list = []
    server = SimpleNamespace(stats={"completed": 3, "chunks_low": 2}, fetch_closed_listeners=listeners,
                             guard=SimpleNamespace(refused={}, retrying_since=None), ecn_unvalidated=lambda: 0,
                             path_changes=lambda: 0)
    store = SimpleNamespace(stats=StoreStats(), capacity_bytes=64 << 20, used_bytes=1234)
    service = SimpleNamespace(store=store, encodes=5, ingests=2, ingest_errors=0, ingested_tokens=512,
                              put_memory=SimpleNamespace(used=0, waiting=0))
    kv.attach(SimpleNamespace(server=server, service=service))
    late = generate_latest(registry).decode()
    assert 'tokenwire_kv_fetches_total{outcome="completed"} 3.0' in late
    assert "tokenwire_kv_store_bytes 1234.0" in late and "tokenwire_kv_encodes_total 5.0" in late
    assert listeners == [kv._on_fetch_closed]  # the deadline histogram is fed from now on
    assert _kv_families(early) == _kv_families(late) - {"tokenwire_kv_store_bytes"}


def test_a_daemon_serves_the_kv_families_while_its_kv_channel_warms_up(tmp_path, monkeypatch) -> None:
    """Scraped from inside the KV start (the warm-up's place): the families are there already."""
    from tokenwire.daemon import kv_runtime
    from tokenwire.daemon.config import parse_config
    from tokenwire.daemon.service import Daemon

    seen: list[set[str]] = []

    class Stop(Exception):
        pass

    async def warming_up(*args: object, **kwargs: object) -> None:
        seen.append(_kv_families(daemon.metrics.exposition().decode()))
        raise Stop

    monkeypatch.setattr(kv_runtime, "start_kv", warming_up)
    daemon = Daemon(parse_config({
        "server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": ""},
        "kv": {"enabled": True, "listen": "127.0.0.1:0", "directory": str(tmp_path / "store"), "forecaster": "ewma"}}))

    async def go() -> None:
        with pytest.raises(Stop):
            await daemon.start()

    asyncio.run(asyncio.wait_for(go(), 30))
    documented = {line.split("`")[1].removesuffix("_total") for line in DOC.read_text().splitlines()
                  if line.startswith("| `tokenwire_kv_")}
    assert seen and seen[0] == documented - {"tokenwire_kv_store_bytes"}, seen

