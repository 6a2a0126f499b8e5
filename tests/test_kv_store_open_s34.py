"""The KV store's start (session 34): a local store checks every object and reads every chunk's metadata at
start, with nothing said meanwhile, on the daemon's event loop. Now it says how far it is, and runs on a worker
thread; a stop signal during it closes the store it opens."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading

import pytest

from tokenwire.daemon import kv_runtime, kv_store_local
from tokenwire.daemon.kv_config import KVConfig
from tokenwire.daemon.kv_store import StoreError, object_key, wrap
from tokenwire.daemon.kv_store_local import LocalChunkStore
from tokenwire.daemon.startup import StartupError


def test_a_long_start_says_how_far_it_is(tmp_path, monkeypatch, caplog) -> None:
    store = LocalChunkStore(tmp_path, 64 << 20)
    for i in range(600):  # 1,200 files: past the 1,024 at which the clock is read
        chunk = hashlib.sha256(str(i).encode()).hexdigest()[:40]
        store.put(object_key(chunk, "src"), wrap(b"x" * 64))
        store.put(object_key(chunk, "low"), wrap(b"y" * 32))
    store.close()
    monkeypatch.setattr(kv_store_local, "PROGRESS_S", 0.0)  # every check is "long"
    with caplog.at_level(logging.INFO, logger="tokenwire.kv"):
        LocalChunkStore(tmp_path, 64 << 20).close()
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.endswith("opening: 1024 files checked so far") for line in lines), lines
    assert any("opened in" in line and "(1200 objects)" in line for line in lines), lines


def test_a_quick_start_says_nothing_more(tmp_path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="tokenwire.kv"):
        LocalChunkStore(tmp_path, 64 << 20).close()
    assert not [r for r in caplog.records if "opening" in r.getMessage() or "opened in" in r.getMessage()]


def test_the_store_opens_off_the_event_loop(tmp_path, monkeypatch) -> None:
    """The opening waits for a flag only the event loop can set: on the loop itself it waited in vain."""
    loop_ran = threading.Event()

    def opening(cfg: KVConfig) -> None:
        if not loop_ran.wait(10):
            raise StoreError("the event loop was held up by the store's opening")
        raise StoreError("opened off the loop")  # (refused: the rest of the start is not this test's)

    monkeypatch.setattr(kv_runtime, "open_store", opening)

    async def go() -> str:
        asyncio.get_running_loop().call_soon(loop_ran.set)
        with pytest.raises(StartupError) as refused:
            await kv_runtime.start_kv(KVConfig(enabled=True, directory=tmp_path))
        return str(refused.value)

    assert asyncio.run(asyncio.wait_for(go(), 30)) == "kv.directory: opened off the loop"


def test_a_stop_during_the_opening_closes_the_store_it_opens(tmp_path, monkeypatch) -> None:
    started, release, closed, returned = threading.Event(), threading.Event(), threading.Event(), threading.Event()

    class Opened:
        def close(self) -> None:
            closed.set()

    def opening(cfg: KVConfig) -> Opened:
        started.set()
        release.wait(10)
        returned.set()
        return Opened()

    monkeypatch.setattr(kv_runtime, "open_store", opening)

    async def go() -> None:
        start = asyncio.ensure_future(kv_runtime.start_kv(KVConfig(enabled=True, directory=tmp_path)))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        start.cancel()  # the stop signal, while the store opens
        with pytest.raises(asyncio.CancelledError):
            await start
        assert not returned.is_set()  # the stop did not wait for the opening
        release.set()
        await asyncio.get_running_loop().run_in_executor(None, closed.wait, 10)

    asyncio.run(asyncio.wait_for(go(), 30))
    assert closed.is_set()  # its lock released, not held for the process's life
