"""Puts (s31): a re-put with other KV under the same fingerprint says how many chunks were kept with other KV
than its own (what is stored does not change), and ``put_kv_unix`` names the socket it cannot connect to."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from tests.test_kv_channel import CHUNK, MODEL, make_kv, run
from tokenwire.daemon.kv_ingest import put_kv_unix, serve_kv_ingest
from tokenwire.daemon.kv_meta import KVIngestError
from tokenwire.daemon.kv_service import KVService
from tokenwire.daemon.kv_store import object_key
from tokenwire.daemon.kv_store_local import LocalChunkStore


@pytest.fixture
def service(tmp_path):
    svc = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=CHUNK)
    yield svc
    svc.close()


def _sources(service, hashes):
    return [service.store.get(object_key(h, "src")) for h in hashes]


def test_a_re_put_with_other_kv_reports_the_chunks_kept(service, caplog):
    """Version 1 of a context put under version 0's fingerprint: every put said ok and nothing told that the
    chunks served were still version 0's. What is stored stays; the put's answer counts them, and a warning says so
    (once: a second such put within the interval is counted, not logged)."""
    ids = list(range(3 * CHUNK))
    first = service.ingest_sync(MODEL, ids, make_kv(len(ids), seed=0))
    assert first.kept_other == 0
    before = _sources(service, first)
    with caplog.at_level(logging.WARNING, logger="tokenwire"):
        second = service.ingest_sync(MODEL, ids, make_kv(len(ids), seed=1))
        third = service.ingest_sync(MODEL, ids, make_kv(len(ids), seed=2))
    assert list(second) == list(first) and second.kept_other == 3 and third.kept_other == 3
    assert _sources(service, first) == before  # kept as stored
    lines = [r.getMessage() for r in caplog.records if "other KV than the put's" in r.getMessage()]
    assert len(lines) == 1 and "kept 3 of its 3 chunks" in lines[0]
    # the same KV again, or half of it changed: only the changed chunks count
    assert service.ingest_sync(MODEL, ids, make_kv(len(ids), seed=0)).kept_other == 0
    mixed = make_kv(len(ids), seed=0)
    for k, _v in mixed:
        k[:, :, 2 * CHUNK:] += 1
    assert service.ingest_sync(MODEL, ids, mixed).kept_other == 1


def test_the_socket_answer_carries_kept_other(service, tmp_path):
    ids = list(range(2 * CHUNK))
    sock = tmp_path / "ingest.sock"

    async def go():
        srv = await serve_kv_ingest(sock, service)
        try:
            loop = asyncio.get_running_loop()
            a = await loop.run_in_executor(None, lambda: put_kv_unix(sock, MODEL, ids, make_kv(len(ids), seed=0)))
            b = await loop.run_in_executor(None, lambda: put_kv_unix(sock, MODEL, ids, make_kv(len(ids), seed=5)))
            return a, b
        finally:
            srv.close()

    a, b = run(go())
    assert (a.kept_other, b.kept_other) == (0, 2) and list(a) == list(b)


def test_put_kv_unix_names_a_missing_socket(tmp_path):
    path = tmp_path / "nowhere.sock"
    with pytest.raises(KVIngestError, match=r"cannot connect to the KV ingest socket .*nowhere\.sock: No such file") \
            as ei:
        put_kv_unix(path, MODEL, list(range(4)), make_kv(4))
    assert isinstance(ei.value.__cause__, FileNotFoundError)
    assert "is the daemon running" in str(ei.value)


def test_put_kv_unix_names_a_socket_nobody_listens_on(tmp_path):
    path = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))  # bound, never listening: a daemon that died without removing its socket
    try:
        with pytest.raises(KVIngestError, match=r"cannot connect to the KV ingest socket .*dead\.sock") as ei:
            put_kv_unix(path, MODEL, list(range(4)), make_kv(4))
    finally:
        s.close()
    assert isinstance(ei.value.__cause__, ConnectionRefusedError)
