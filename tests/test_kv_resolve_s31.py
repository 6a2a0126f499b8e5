"""A fetch's lookup is bounded by the time the fetch worker waits on the store, not by whatever it runs: a lookup
queued behind another fetch's encode (CPU work, seconds for a long chunk) failed as "KV store unavailable: no answer
within the fetch's deadline", with a warning blaming a healthy store. A store call that hangs is still reported
within the bound, and the warning names the bound used (the 2-s floor for a tiny deadline, not "its deadline")."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.test_kv_channel import CHUNK, MODEL, make_kv
from tokenwire.daemon import kv_service
from tokenwire.daemon.kv_service import KVService
from tokenwire.daemon.kv_store import StoreError
from tokenwire.daemon.kv_store_local import LocalChunkStore
from tokenwire.transport.frames import KvFetch

BOUND_S = 0.2  # RESOLVE_FLOOR_S in these tests: every fetch here has a 50-ms deadline
ENCODE_S = 3 * BOUND_S  # the encode ahead, well past the bound


class _HungPut(LocalChunkStore):
    """A local store whose writes of an encoded level wait for ``answer`` once ``hang`` is set (at most 10 s)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hang = threading.Event()
        self.answer = threading.Event()

    def put(self, key: str, data: bytes) -> None:
        if self.hang.is_set() and not key.endswith(("src", "meta")):
            self.answer.wait(10)
        super().put(key, data)


class _SlowEncode:
    """KVService._encode made a sleep on the fetch worker (no codec needed): ``started`` and ``ended`` say where
    it is."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = threading.Event()
        self.ended = threading.Event()

        def encode(meta, src, level):
            self.started.set()
            time.sleep(ENCODE_S)
            self.ended.set()
            return b"encoded"

        monkeypatch.setattr(KVService, "_encode", staticmethod(encode))


def _stored(tmp_path: Path, store_type: type[LocalChunkStore] = LocalChunkStore) -> tuple[KVService, list[int]]:
    svc = KVService(store_type(tmp_path / "kv", 64 << 20), chunk_tokens=CHUNK)
    ids = list(range(2 * CHUNK))
    svc.ingest_sync(MODEL, ids, make_kv(len(ids)))
    return svc, ids


async def _lookup_behind_an_encode(svc: KVService, ids: list[int], encode: _SlowEncode,
                                   then: Callable[[], object] = lambda: None) -> tuple[object, bool]:
    """Fetch A's chunk 0 at "high" (not stored: encoded now on the fetch worker), then fetch B's lookup queued
    behind it: (B's plan, or the StoreError it failed with; whether A's encode had ended by then). ``then`` is
    called once B has its outcome, before A's chunk is awaited."""
    fetch = KvFetch(model=MODEL, deadline_ms=50, token_ids=ids)
    plan = await svc.resolve(fetch)
    chunk = asyncio.ensure_future(svc.chunk(plan, 0, "high"))
    assert await asyncio.to_thread(encode.started.wait, 10)
    try:
        outcome: object = await asyncio.wait_for(svc.resolve(fetch), 20)
    except StoreError as exc:
        outcome = exc
    ended = encode.ended.is_set()
    then()
    assert await asyncio.wait_for(chunk, 20) == b"encoded"
    return outcome, ended


def test_a_lookup_queued_behind_another_fetchs_encode_waits_for_it(tmp_path, monkeypatch):
    """resolve_blame.py: the encode ahead runs three times the bound; the store is healthy. The lookup waited only
    the bound, then failed as "KV store unavailable"; now it waits for its turn and is served."""
    monkeypatch.setattr(kv_service, "RESOLVE_FLOOR_S", BOUND_S)
    encode = _SlowEncode(monkeypatch)
    svc, ids = _stored(tmp_path)
    try:
        outcome, ended = asyncio.run(_lookup_behind_an_encode(svc, ids, encode))
    finally:
        svc.close()
    assert not isinstance(outcome, StoreError), outcome
    assert outcome.token_counts == [CHUNK] * 2 and ended  # (it ran after the encode, as it was queued)


def test_a_store_call_that_hangs_after_the_encode_still_fails_the_lookup_within_the_bound(tmp_path, monkeypatch,
                                                                                         caplog):
    """The encode ahead ends, then its level's write hangs: the lookup behind fails as "KV store unavailable", and
    the warning says the bound used was the floor (the fetch's deadline is 50 ms), not "its deadline"."""
    monkeypatch.setattr(kv_service, "RESOLVE_FLOOR_S", BOUND_S)
    encode = _SlowEncode(monkeypatch)
    svc, ids = _stored(tmp_path, _HungPut)
    svc.store.hang.set()
    try:
        with caplog.at_level(logging.WARNING, logger="tokenwire.kv"):
            outcome, ended = asyncio.run(_lookup_behind_an_encode(svc, ids, encode, then=svc.store.answer.set))
    finally:
        svc.store.answer.set()
        svc.close()
    assert isinstance(outcome, StoreError) and ended  # (failed for the store's call, after the encode)
    assert str(outcome) == ("KV store unavailable: no answer within the fetch's deadline (nor within 0.2 s, the "
                            "least a lookup is given)")
    (line,) = [r.getMessage() for r in caplog.records if "did not answer" in r.getMessage()]
    assert "within 0.2 s (the least a lookup is given; the fetch's deadline is 0.05 s)" in line
    assert "its deadline" not in line


def test_the_warning_names_the_deadline_when_it_is_the_bound(tmp_path, monkeypatch, caplog):
    """A deadline over the floor is the bound, and the warning says so."""
    monkeypatch.setattr(kv_service, "RESOLVE_FLOOR_S", 0.05)
    svc, ids = _stored(tmp_path, _HungPut)
    release = threading.Event()
    svc.pool.submit(release.wait, 10)  # a job ahead the pool knows nothing of: timed whole (a hung store call)
    try:
        with caplog.at_level(logging.WARNING, logger="tokenwire.kv"), \
                pytest.raises(StoreError, match=r"^KV store unavailable: no answer within the fetch's deadline "
                                                r"\(0\.1 s\)$"):
            asyncio.run(svc.resolve(KvFetch(model=MODEL, deadline_ms=100, token_ids=ids)))
    finally:
        release.set()
        svc.close()
    assert any("within 0.1 s (the fetch's deadline)" in r.getMessage() for r in caplog.records)


def test_a_lookup_waiting_for_a_chunks_lock_is_not_timed(tmp_path, monkeypatch):
    """The chunk's lock held by the other worker (an ingest encoding a prewarm level holds it for seconds) is not
    the store's time either: the lookup waits for it, then runs."""
    monkeypatch.setattr(kv_service, "RESOLVE_FLOOR_S", BOUND_S)
    svc, ids = _stored(tmp_path)
    h = svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=50, token_ids=ids)).handle[0]
    lock = svc._chunk_lock(h)

    async def go():
        lock.acquire()
        try:
            lookup = asyncio.ensure_future(svc.resolve(KvFetch(model=MODEL, deadline_ms=50, token_ids=ids)))
            done, _ = await asyncio.wait({lookup}, timeout=ENCODE_S)  # held three times the bound
        finally:
            lock.release()
        return done, await asyncio.wait_for(lookup, 20)

    try:
        done, plan = asyncio.run(go())
    finally:
        svc.close()
    assert not done and plan.token_counts == [CHUNK] * 2


def test_a_chunks_lock_held_past_the_untimed_wait_fails_the_lookup(tmp_path, monkeypatch):
    """The lock's holder can be in a store write that never returns (the ingest worker writes under it): the wait
    is left out of the lookup's time only up to LOCK_UNTIMED_S, then the bound applies ("KV store unavailable").
    Untimed for ever, the lookup waited without end behind a hung write and nothing said so."""
    monkeypatch.setattr(kv_service, "RESOLVE_FLOOR_S", BOUND_S)
    monkeypatch.setattr(kv_service, "LOCK_UNTIMED_S", BOUND_S)
    svc, ids = _stored(tmp_path)
    h = svc.resolve_sync(KvFetch(model=MODEL, deadline_ms=50, token_ids=ids)).handle[0]
    lock = svc._chunk_lock(h)

    async def go():
        lock.acquire()  # (held, as by a write that never returns, until the lookup has its outcome)
        try:
            t0 = time.monotonic()
            with pytest.raises(StoreError, match=r"^KV store unavailable"):
                await asyncio.wait_for(svc.resolve(KvFetch(model=MODEL, deadline_ms=50, token_ids=ids)), 20)
            return time.monotonic() - t0
        finally:
            lock.release()

    try:
        took = asyncio.run(go())
    finally:
        svc.close()
    assert took >= 2 * BOUND_S  # the untimed wait, then the bound
