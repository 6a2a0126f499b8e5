"""The start gate covers every listener, not the chat port alone: the chat ingest socket, the KV endpoint and the KV
ingest socket are bound at once (a path or port in use still fails the start before the KV warm-up) but serve
nothing until READY. They served during the warm-up: a stop signal there cut their answers and fetches with no
drain, and the connections made then were frozen by the start's ``gc.freeze()``, never to be freed."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.test_kv_channel import MODEL, run
from tokenwire.daemon import kv_runtime
from tokenwire.daemon.config import parse_config
from tokenwire.daemon.service import Daemon
from tokenwire.transport import kv_channel
from tokenwire.transport.kv_channel import KVNotFound
from tokenwire.transport.kv_client import connect_kv

QUIET_S = 0.5  # how long a gated listener is watched for an answer it must not give


def _config(tmp_path: Path) -> Any:
    return parse_config({
        "server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": ""},
        "ingest": {"socket": str(tmp_path / "ingest.sock")},
        "kv": {"enabled": True, "listen": "127.0.0.1:0", "directory": str(tmp_path / "kv"), "forecaster": "ewma",
               "ingest_socket": str(tmp_path / "kv-ingest.sock")},
        "upstreams": [{"name": "app", "type": "ingest"}], "routes": [{"model": "*", "upstream": "app"}],
    }, tmp_path / "tw.toml")


class _Warmup:
    """The KV codec's warm-up, held until :meth:`finish` (the compile's seconds, made as long as a test needs), and
    the KV endpoint the start made before it (the daemon learns it only once start_kv returns)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = asyncio.Event()
        self.done = asyncio.Event()
        self.servers: list[Any] = []
        self.resolved: list[Any] = []
        serve_kv = kv_channel.serve_kv

        async def recorded_serve_kv(provider: Any, *args: Any, **kwargs: Any) -> Any:
            resolve = provider.resolve

            async def counted(fetch: Any) -> Any:
                self.resolved.append(fetch)
                return await resolve(fetch)

            provider.resolve = counted
            server = await serve_kv(provider, *args, **kwargs)
            self.servers.append(server)
            return server

        async def held() -> None:
            self.started.set()
            await self.done.wait()

        monkeypatch.setattr(kv_channel, "serve_kv", recorded_serve_kv)
        monkeypatch.setattr(kv_runtime, "warm_up_codec", held)

    def finish(self) -> None:
        self.done.set()


async def _line(reader: asyncio.StreamReader, timeout: float) -> Any:
    """The next answer line, decoded; None when none came within ``timeout``."""
    try:
        raw = await asyncio.wait_for(reader.readline(), timeout)
    except TimeoutError:
        return None
    return json.loads(raw) if raw else b""


def test_ingest_sockets_and_the_kv_endpoint_serve_nothing_until_ready(tmp_path: Path, monkeypatch):
    """During a held warm-up: an ingest ``open`` and a KV put's header get no answer, and a KV fetch reaches no
    lookup; at READY each is served (the fetch that kept trying, too)."""
    cfg = _config(tmp_path)

    async def go() -> dict[str, Any]:
        warm = _Warmup(monkeypatch)
        daemon = Daemon(cfg)
        starting = asyncio.ensure_future(daemon.start())
        seen: dict[str, Any] = {}
        try:
            await asyncio.wait_for(warm.started.wait(), 30)
            seen["ingest serving"] = daemon._ingest.is_serving()
            r, w = await asyncio.open_unix_connection(str(cfg.ingest.socket))
            w.write(b'{"op": "open", "model": "m"}\n')
            kr, kw = await asyncio.open_unix_connection(str(cfg.kv.ingest_socket))
            kw.write(b"{}\n")  # a put header the daemon refuses at once, when it reads it
            port = warm.servers[0].port

            async def fetch() -> str:
                async with connect_kv("127.0.0.1", port, verify=False, warm=False, ecn=False, timeout=20) as conn:
                    with pytest.raises(KVNotFound):
                        await conn.fetch_kv(model=MODEL, token_ids=list(range(64)), deadline_ms=5000)
                return "not found"

            fetching = asyncio.ensure_future(fetch())
            await asyncio.wait({fetching}, timeout=QUIET_S)  # the window watched (served, the fetch ends it)
            seen["ingest early"] = await _line(r, 0.01)  # (an answer sent in the window is read at once)
            seen["kv ingest early"] = await _line(kr, 0.01)
            seen["lookups early"] = len(warm.resolved)
            seen["fetch done early"] = fetching.done()
            seen["serving early"] = daemon.serving
            warm.finish()
            await asyncio.wait_for(starting, 30)
            seen["ingest"] = await _line(r, 10)
            seen["kv ingest"] = await _line(kr, 10)
            seen["fetch"] = await asyncio.wait_for(fetching, 30)
            seen["lookups"] = len(warm.resolved)
            for writer in (w, kw):
                writer.close()
            return seen
        finally:
            warm.finish()
            await asyncio.gather(starting, return_exceptions=True)
            await daemon.stop()

    seen = run(go())
    assert seen["ingest serving"] is False and seen["serving early"] is False
    assert seen["ingest early"] is None and seen["kv ingest early"] is None
    assert seen["lookups early"] == 0 and not seen["fetch done early"]
    assert seen["ingest"]["ok"] is True and "id" in seen["ingest"]
    assert seen["kv ingest"]["ok"] is False and seen["kv ingest"]["error"]  # (the refusal: it was read)
    assert seen["fetch"] == "not found" and seen["lookups"] == 1


def test_a_stop_during_the_warm_up_ends_the_start_cleanly(tmp_path: Path, monkeypatch):
    """A stop signal during the warm-up (run() cancels the start): the start ends, the connection waiting at the
    ingest socket is closed with no answer (it was never served, so none is cut), and both sockets' files are
    gone and the KV port free again."""
    cfg = _config(tmp_path)

    async def go() -> tuple[Any, bool, bool, int]:
        warm = _Warmup(monkeypatch)
        daemon = Daemon(cfg)
        starting = asyncio.ensure_future(daemon.start())
        try:
            await asyncio.wait_for(warm.started.wait(), 30)
            port = warm.servers[0].port
            r, w = await asyncio.open_unix_connection(str(cfg.ingest.socket))
            w.write(b'{"op": "open", "model": "m"}\n')
            await w.drain()
            starting.cancel()  # (what run()'s stop_starting does)
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(starting, 30)
            try:
                heard: Any = await asyncio.wait_for(r.read(), 10)  # EOF, or a reset, with no answer
            except ConnectionResetError:
                heard = b""
            w.close()
            return heard, cfg.ingest.socket.exists(), Path(cfg.kv.ingest_socket).exists(), port
        finally:
            warm.finish()
            await daemon.stop()

    heard, ingest_left, kv_ingest_left, port = run(go())
    assert heard == b"" and not ingest_left and not kv_ingest_left
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", port))  # (released: a restart can bind it)
