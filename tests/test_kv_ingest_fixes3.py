"""Fixes from a KV and ingest probe: a re-put over a chunk source whose payload rotted (header and size whole, so
the store's start kept it) said ok and the next fetch failed NOT_FOUND; and every ingest answer the orphan timeout
cancelled was a log line of its own."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.test_kv_channel import CHUNK, MODEL, _fetch, make_kv, run
from tests.test_kv_store import make_store, redis_url  # noqa: F401  (the fixtures)
from tokenwire.daemon.ingest import IngestAPI, IngestConnection
from tokenwire.daemon.kv_service import KVService
from tokenwire.daemon.kv_store import ChunkStore, object_key
from tokenwire.daemon.kv_store_local import LocalChunkStore
from tokenwire.daemon.transcripts import TranscriptStore
from tokenwire.transport.cachegen.codec import decode_chunk
from tokenwire.transport.frames import KvFetch
from tokenwire.transport.handshake_guard import REFUSALS_LOG_S, RefusalLog


def _rot(store: ChunkStore, key: str) -> None:
    """Flip the last payload byte of ``key``: its envelope's header and length stay valid, its CRC32 fails."""
    if isinstance(store, LocalChunkStore):
        path = store._path(key)
        blob = bytearray(path.read_bytes())
        blob[-1] ^= 0xFF
        path.write_bytes(bytes(blob))
    else:
        name = store._k(key)  # type: ignore[attr-defined]
        blob = bytearray(store._r.get(name))  # type: ignore[attr-defined]
        blob[-1] ^= 0xFF
        store._r.set(name, bytes(blob))  # type: ignore[attr-defined]


def _max_error(payload: bytes, kv, first: int) -> float:
    got = decode_chunk(payload)
    return max(float((g.float() - w[:, :, first : first + CHUNK].float()).abs().max())
               for pair_g, pair_w in zip(got, kv, strict=True) for g, w in zip(pair_g, pair_w, strict=True))


# ------------------------------------------------------------------------------ 1: a re-put over a rotted source
def test_a_re_put_rewrites_a_source_that_fails_its_checksum_and_drops_the_levels_that_fail_theirs(make_store):  # noqa: F811
    """The re-put decided "already stored" from the index and the metadata alone: the rotted source stayed, the put
    said ok, and the fetch of that chunk failed NOT_FOUND (the read deleted it; only a second put mended it)."""
    store = make_store(capacity=64 << 20)
    svc = KVService(store, chunk_tokens=CHUNK)
    ids = list(range(500, 500 + 2 * CHUNK))
    kv = make_kv(len(ids))
    hashes = svc.ingest_sync(MODEL, ids, kv, prewarm=["high", "low"])
    h = hashes[1]
    _rot(store, object_key(h, "src"))
    _rot(store, object_key(h, "high"))
    assert svc.ingest_sync(MODEL, ids, kv) == hashes
    assert store.get(object_key(h, "src")) is not None  # rewritten from the put's KV
    assert not store.contains(object_key(h, "high"))  # failed its check: dropped, encoded again when needed
    assert store.contains(object_key(h, "low"))  # passed: kept
    encodes = svc.encodes
    plan = svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=1000, token_ids=ids))
    for i in range(2):
        assert _max_error(svc.chunk_sync(plan, i, "high"), kv, i * CHUNK) < 0.5
        assert _max_error(svc.chunk_sync(plan, i, "low"), kv, i * CHUNK) < 2.0
    assert svc.encodes == encodes + 1  # only the dropped level
    svc.close()


def test_a_re_put_after_a_restart_makes_the_context_fetch_over_the_channel(tmp_path: Path):
    """The probe's sequence: put and fetch, stop, rot a chunk's .src and .high (the start keeps them: their header
    and size are whole), start again and put the same context: the fetch after that put must succeed."""
    root = tmp_path / "kv"
    ids = list(range(1000, 1000 + 4 * CHUNK))
    kv = make_kv(len(ids), seed=3)
    svc = KVService(LocalChunkStore(root, 64 << 20), chunk_tokens=CHUNK)
    hashes = svc.ingest_sync(MODEL, ids, kv, prewarm=["high"])
    svc.close()
    store = LocalChunkStore(root, 64 << 20)
    for kind in ("src", "high"):
        _rot(store, object_key(hashes[2], kind))
    store.close()
    svc = KVService(LocalChunkStore(root, 64 << 20), chunk_tokens=CHUNK)
    assert svc.store.contains(object_key(hashes[2], "src"))  # the start kept it: only a read finds the rot
    svc.ingest_sync(MODEL, ids, kv)
    res, _ = run(_fetch(svc, ids, deadline_ms=5000, controller="fixed-L3"))
    out, n = res.prefix_kv()
    assert n == len(ids) and res.report.levels == ["high"] * 4
    assert max(float((o[0].float() - w[0].float()).abs().max()) for o, w in zip(out, kv, strict=True)) < 0.5
    assert svc.store.stats.corrupt == 2  # found at the re-put, not by the fetch
    svc.close()


def test_a_re_put_over_a_sound_source_writes_nothing(tmp_path: Path):
    """The check reads the source back; a sound one is kept as it is (no rewrite, its levels untouched)."""
    svc = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=CHUNK)
    ids = list(range(3 * CHUNK))
    kv = make_kv(len(ids))
    svc.ingest_sync(MODEL, ids, kv, prewarm=["medium"])
    puts = svc.store.stats.puts
    svc.ingest_sync(MODEL, ids, kv)
    assert svc.store.stats.puts == puts and svc.store.stats.corrupt == 0
    svc.close()


# ------------------------------------------------------------------------------ 2: orphaned ingest answers' lines
def _api(orphan_log: RefusalLog) -> tuple[IngestAPI, IngestConnection]:
    store = TranscriptStore(max_bytes=1 << 22, retain_s=10)
    return IngestAPI(store, max_tokens=lambda: 100, orphan_log=orphan_log), IngestConnection()


def _open(api: IngestAPI, conn: IngestConnection) -> bytes:
    reply = api.handle({"op": "open"}, conn, 0.0)
    assert reply["ok"] is True, reply
    return bytes.fromhex(reply["id"])


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


def test_orphaned_ingest_answers_log_one_line_then_a_summary(caplog: pytest.LogCaptureFixture):
    """200 answers orphaned at once wrote 200 INFO lines; now the first is a line, the rest are counted into the
    orphan log's summary (the daemon passes the one its own answers' cancellations go through)."""
    caplog.set_level(logging.INFO, "tokenwire")
    orphans = RefusalLog(logging.getLogger("tokenwire.test"), lambda n, s: f"cancelled {n} more answers in {s:.0f} s")
    api, conn = _api(orphans)
    rids = [_open(api, conn) for _ in range(5)]
    why = "no client attached for 30 s (limits.orphan_timeout_s)"
    for rid in rids:
        assert api.cancel(rid, 100.0, why, "orphaned")
    lines = _lines(caplog, "cancelled: no client attached")
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert f"logged at most every {REFUSALS_LOG_S:g} s" in lines[0].getMessage()
    # every one of them was cancelled all the same, and its application hears why
    reply = api.handle({"op": "push", "id": rids[-1].hex(), "text": "x"}, conn, 101.0)
    assert reply == {"ok": False, "error": f"this answer is already finished (cancelled: {why})"}
    orphans.flush(100.0 + REFUSALS_LOG_S)
    assert [r.getMessage() for r in _lines(caplog, "more answers")] == [f"cancelled 4 more answers in "
                                                                        f"{REFUSALS_LOG_S:.0f} s"]
    # a client's own cancellation is no orphan: not in the orphan summary, and at DEBUG (each user's "stop" was an
    # INFO line; tokenwire_ingest_answers_failed_total{reason="cancelled"} counts them)
    caplog.set_level(logging.DEBUG, "tokenwire")
    for rid in [_open(api, conn) for _ in range(2)]:
        api.cancel(rid, 100.0 + REFUSALS_LOG_S, "every client attached to it cancelled it")
    cancels = _lines(caplog, "cancelled: every client attached")
    assert [r.levelno for r in cancels] == [logging.DEBUG, logging.DEBUG]


def test_the_daemon_gives_the_ingest_api_its_orphan_log(tmp_path):
    """Chat and ingest orphans share one line and one summary a minute (the ingest API logged each)."""
    from tokenwire.daemon.config import parse_config
    from tokenwire.daemon.service import Daemon

    from .test_loopback import run

    cfg = parse_config({"server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": ""},
                        "ingest": {"socket": str(tmp_path / "ingest.sock")},
                        "upstreams": [{"name": "app", "type": "ingest"}]})

    async def go():
        daemon = Daemon(cfg)
        await daemon.start()
        try:
            return daemon._ingest_api is not None and daemon._ingest_api.orphan_log is daemon.answers.orphan_cancels
        finally:
            await daemon.stop()

    assert run(go(), 30)
