"""Metrics an operator probe found missing or misleading: refused ingest opens, the reload's outcome, a restart
pending and the certificate's expiry as gauges; and the KV store's start-up line that counted chunks beside a metric
that counts objects."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from tokenwire.daemon.config import load_config
from tokenwire.daemon.ingest import IngestConnection
from tokenwire.daemon.kv_store_local import LocalChunkStore
from tokenwire.daemon.service import Daemon
from tokenwire.transport.tls import make_self_signed

from .test_handshake_limits import value
from .test_ingest_edges import _daemon
from .test_ingest_fixes4 import _api, _open
from .test_kv_recover_fixes import _file, _put_three
from .test_loopback import run

DAY = 86400.0


def test_each_refused_ingest_open_is_counted_once_by_reason(tmp_path):
    """Opens refused past limits.max_live_answers, limits.transcript_memory_mb, ingest.max_open, or naming a
    principal no client could be were in the application's reply only."""

    async def go() -> dict[str, float]:
        async with _daemon(tmp_path, limits={"max_live_answers": 2}) as daemon:
            api, conn, now = daemon._ingest_api, IngestConnection(), time.monotonic()
            assert api is not None
            assert "auth is off" in api.handle({"op": "open", "principal": "alice"}, conn, now)["error"]
            _open(api, conn, now=now)
            api.max_open = 1
            assert "ingest.max_open" in api.handle({"op": "open"}, conn, now)["error"]
            other = IngestConnection()
            _open(api, other, now=now)  # the second live answer: max_live_answers
            assert "server busy" in api.handle({"op": "open"}, IngestConnection(), now)["error"]
            assert "server busy" in api.handle({"op": "open"}, IngestConnection(), now)["error"]
            return {reason: value(daemon, "tokenwire_ingest_opens_refused_total", {"reason": reason})
                    for reason in ("busy", "memory", "principal", "max_open", "draining")}

    assert run(go(), 30) == {"busy": 2, "memory": 0, "principal": 1, "max_open": 1, "draining": 0}


def test_an_open_past_the_transcript_memory_is_counted_as_memory():
    reasons: list[str] = []
    _, api = _api(max_bytes=10, on_open_refused=reasons.append)
    assert "transcript memory full" in api.handle({"op": "open"}, IngestConnection(), 0)["error"]
    assert reasons == ["memory"]


def test_the_reload_outcome_a_pending_restart_and_the_certificates_expiry_are_gauges(tmp_path):
    """STATUS said "the last reload was refused" and "restart pending", the log named the certificate's end: no
    metric did, and no alert rule could."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make_self_signed(("localhost",), days=30).write(cert, key)
    path = tmp_path / "d.toml"
    good = (f'[server]\nlisten = ["127.0.0.1:0"]\ncertificate = "{cert}"\nprivate_key = "{key}"\n'
            '[metrics]\nlisten = ""\n')
    path.write_text(good)

    def gauges(daemon: Daemon) -> tuple[float, float, float]:
        return (value(daemon, "tokenwire_config_reload_ok"), value(daemon, "tokenwire_restart_pending"),
                value(daemon, "tokenwire_tls_cert_expiry_seconds"))

    async def go() -> list[tuple[float, float, float]]:
        daemon = Daemon(load_config(path))
        await daemon.start()
        try:
            seen = [gauges(daemon)]
            path.write_text("[limits\n")  # a file that does not parse: refused
            assert not daemon.reload()
            seen.append(gauges(daemon))
            make_self_signed(("localhost",), days=90).write(cert, key)  # renewed in place
            path.write_text(good.replace("127.0.0.1:0", "127.0.0.1:59999"))  # listen: only a restart applies it
            assert daemon.reload()
            seen.append(gauges(daemon))
            return seen
        finally:
            await daemon.stop()

    started, refused, reloaded = run(go(), 30)
    soon, later = time.time() + 30 * DAY, time.time() + 90 * DAY
    assert started[:2] == (1, 0) and abs(started[2] - soon) < DAY
    assert refused[:2] == (0, 0) and refused[2] == started[2]
    assert reloaded[:2] == (1, 1) and abs(reloaded[2] - later) < DAY


@pytest.mark.parametrize(("lost", "words"), [
    (0, "removed 2 chunks that follow a chunk that is gone (unreachable: a fetch needs every chunk before them; "
        "6 objects, counted as evictions)"),
    (1, "removed 1 chunk that follows a chunk that is gone (unreachable: a fetch needs every chunk before it; "
        "3 objects, counted as evictions)"),
])
def test_the_start_up_line_counts_the_objects_the_evictions_metric_counts(tmp_path: Path, caplog, lost, words):
    """"removed 2 chunks ... (counted as evictions)" beside tokenwire_kv_store_evictions_total rising by 6; and
    "1 chunks"."""
    caplog.set_level(logging.WARNING, "tokenwire.kv")
    root = tmp_path / "kv"
    _, hashes = _put_three(root)
    for kind in ("src", "meta"):
        os.truncate(_file(root, hashes[lost], kind), 10)
    store = LocalChunkStore(root, 64 << 20)
    try:
        assert store.stats.evictions == 3 * (2 - lost)
        assert words in caplog.text, caplog.text
        assert "removed the metadata and levels of 1 chunk whose source is gone" in caplog.text  # (was "1 chunks")
    finally:
        store.close()
