"""The daemon's KV start-up: open the store, bind the KV endpoint and the ingest socket, warm the codec and the
forecaster, then serve (:func:`start_kv`, which returns a :class:`KVRuntime` to stop it all with).

A module of its own because this is the part that knows the daemon: its config (``[kv]``, ``[limits]``), its start
refusals (:class:`~.startup.StartupError`, naming the setting to fix) and its start gate. The store service
(:class:`~.kv_service.KVService`) takes a store and needs none of it, as the tests and the README's example use it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import unix_sockets
from .config import Limits
from .kv_config import KVConfig, kv_marking
from .kv_ingest import serve_kv_ingest
from .kv_service import KVService
from .kv_store import ChunkStore, StoreError
from .kv_store_local import LocalChunkStore
from .startup import StartupError, cannot_listen

log = logging.getLogger("tokenwire.kv")


def open_store(cfg: KVConfig) -> ChunkStore:
    if cfg.backend == "redis":
        assert cfg.redis_url is not None
        from . import kv_store_redis  # (only a Redis store loads its code)

        store = kv_store_redis.RedisChunkStore(cfg.redis_url, cfg.capacity_bytes)
        store.check_shared_settings(cfg.chunk_tokens)
        return store
    return LocalChunkStore(cfg.directory, cfg.capacity_bytes)


@dataclass
class KVRuntime:
    service: KVService
    server: Any
    ingest: asyncio.Server | None

    ingest_path: Path | None = None
    ingest_ident: tuple[int, int, int] | None = None

    async def start_serving(self) -> None:
        """Open the start gate (:func:`start_kv` with ``serve=False``): the endpoint reads its datagrams from now
        on (its clients' Initials, dropped until now, are resent), and the ingest socket accepts the engines'
        connections waiting in its backlog."""
        self.server.accepting = True
        if self.ingest is not None:
            await self.ingest.start_serving()

    def close(self) -> None:
        self.server.close()
        if self.ingest is not None:
            self.ingest.close()
            if self.ingest_path is not None:  # Python 3.11 leaves the socket file behind
                unix_sockets.release(self.ingest_path, self.ingest_ident)
        self.service.close()

    async def aclose(self, timeout: float = 5.0) -> bool:
        """:meth:`close` for the event loop: the service's workers are awaited for at most ``timeout`` seconds
        (:meth:`KVService.aclose`), never blocking the loop."""
        self.server.close()
        if self.ingest is not None:
            self.ingest.close()
            if self.ingest_path is not None:
                unix_sockets.release(self.ingest_path, self.ingest_ident)
        return await self.service.aclose(timeout)


def _warm_up() -> float:
    from tokenwire.transport.cachegen.codec import warm_up

    return warm_up()


async def warm_up_codec(run: Any = _warm_up, clock: Callable[[], float] = time.monotonic) -> None:
    """Compile the codec's CPU kernels now: cold, that took ~3 s (2 cores), which the first fetch would
    otherwise spend against its deadline. A JIT that cannot run at all is a :class:`StartupError` now
    rather than a failed fetch later. The time logged is the whole wait (``clock`` around it): ``run``'s own
    figure left out importing torch and numba, and "ready (0.5 s)" came 3.9 s after "compiling"."""
    log.info("KV codec: compiling or loading its kernels (a first start takes ~10 s)")
    began = clock()
    try:
        await asyncio.to_thread(run)
    except (OSError, RuntimeError, ImportError) as exc:
        raise StartupError(warm_up_failure(exc)) from None
    log.info("KV codec ready (%.1f s to compile or load its kernels)", clock() - began)


def _load_forecaster(kind: str) -> float:
    """Load the KV forecaster's runtime and model (:func:`~tokenwire.predictor.bandwidth.preload`); the seconds
    it took."""
    from tokenwire.predictor.bandwidth import preload

    began = time.monotonic()
    preload(kind)
    return time.monotonic() - began


async def warm_up_forecaster(kind: str, load: Any = _load_forecaster,
                             clock: Callable[[], float] = time.monotonic) -> bool:
    """Load the ``[kv] forecaster``'s runtime and model now, on a thread: the first fetch built it on the event
    loop (``import onnxruntime`` and the model: ~150-200 ms during which no connection of the daemon was served).

    A model that cannot load does not stop the start: one log line says so, naming the cure, and False tells
    :func:`start_kv` to plan the fetches with ewma. Each fetch's start failed instead: no KV_META, the client timed
    out, and the load was tried again at every connection's first fetch. True: ``kind`` is usable."""
    if kind != "onnx":  # (ewma: nothing to load)
        return True
    log.info("KV forecaster: loading onnxruntime and the bandwidth model")
    began = clock()  # the whole wait, as the codec's (its load's own figure leaves out the thread's start)
    try:
        await asyncio.to_thread(load, kind)
    except Exception as exc:  # ModelError (a missing or corrupt model), ImportError (a broken onnxruntime), ...
        log.error("kv.forecaster = onnx but its bandwidth model cannot be loaded (%s: %s): KV fetches are planned "
                  "with the ewma forecaster until a restart; fix the install or set forecaster = \"ewma\" in [kv]",
                  type(exc).__name__, exc)
        return False
    log.info("KV forecaster ready (%.2f s to load onnxruntime and the bandwidth model)", clock() - began)
    return True


# what a refused W^X mapping looks like: llvmlite's check_jit_execution raises OSError(EPERM, "cannot allocate
# executable memory. ...") (a PermissionError) when mmap/mprotect with PROT_EXEC is refused
_WX_HINTS = ("executable memory", "mprotect", "operation not permitted")


def warm_up_failure(exc: BaseException) -> str:
    """The start-up error for a codec warm-up that raised ``exc``: MemoryDenyWriteExecute is named only when the
    kernel refused executable memory; anything else (torch without /proc/cpuinfo, a missing module) is reported
    as it is, so the operator is not sent to the wrong setting."""
    head = f"kv: the KV codec cannot compile or run its kernels (warm-up at start): {exc.__class__.__name__}: {exc}"
    text = str(exc).lower()
    # a PermissionError naming a file (an unwritable NUMBA_CACHE_DIR) is about that file, not executable memory
    if (isinstance(exc, PermissionError) and exc.filename is None) or any(h in text for h in _WX_HINTS):
        return (f"{head} (under systemd, MemoryDenyWriteExecute=yes forbids the JIT's executable memory: set "
                "MemoryDenyWriteExecute=no in a drop-in)")
    if isinstance(exc, ModuleNotFoundError):  # a base install (`pip install .`): the codec needs the ml extra
        from tokenwire.daemon.cli import EXTRA_INSTALL, missing_extra

        extra = missing_extra(exc)
        return f"{head} ([kv] needs the '{extra}' extra: {EXTRA_INSTALL[extra]})" if extra else head
    if "cpuinfo" in text:
        return (f"{head} (torch reads the CPU's features from /proc/cpuinfo: it must be visible, e.g. no "
                "ProcSubset=pid in the unit)")
    return head


async def _opened_store(cfg: KVConfig) -> ChunkStore:
    """:func:`open_store` on a worker thread: a local store's start reads every object's header and every chunk's
    metadata (seconds for a large store, minutes on a cold disk), and on the event loop that held up the start's
    notifications to systemd. A stop signal meanwhile does not wait for it; the store it opens is closed (its lock
    released) once it is open."""
    opening = asyncio.ensure_future(asyncio.to_thread(open_store, cfg))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        opening.add_done_callback(_close_opened)
        raise


def _close_opened(opening: asyncio.Future[ChunkStore]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


async def start_kv(cfg: KVConfig, *, cert: Any = None, certfile: Any = None, keyfile: Any = None,
                   authorize: Any = None, client_verifier: Any = None, on_unauthorized: Any = None,
                   max_connections: Any = None, request_timeout: Any = None,
                   unauthorized_memory: Any = None, principal: Any = None, check_scope: Any = None,
                   serve: bool = True) -> KVRuntime:
    """Start the KV store service, its channel endpoint and (if configured) the ingest socket.

    Both are bound at once (a port or socket in use fails the start before the warm-ups) and serve nothing during
    the warm-ups: the endpoint drops its datagrams unread (a client's Initial is resent) and the ingest socket
    accepts no connection (they wait in its backlog). A fetch or put served then was cut, with no drain, by a stop
    signal during the warm-up. ``serve``: open them once warmed up; False leaves that to the caller
    (:meth:`KVRuntime.start_serving`: the daemon opens them at READY, with its chat port, after freezing its heap,
    so that no connection made meanwhile is frozen, never to be freed).

    ``authorize``, ``client_verifier``, ``on_unauthorized``, ``max_connections`` and ``request_timeout``: the
    daemon's checks, as :func:`~tokenwire.transport.kv_server.serve_kv` takes them (the chat port's token, client
    certificate, session limit and request timeout: the KV port had only the token check). ``unauthorized_memory``
    (bytes, or a callable read at each count): what KV connections with no authorized fetch may hold together,
    ``limits.unauthorized_memory_mb``; left out, that setting's default (never unbounded: ~2 MB a connection over
    max_sessions connections was ~20 GB). ``principal(token, certificate name)``: the principal a fetch resolves
    with (``serve_kv``'s); ``check_scope(name)``: why a put may not be scoped to ``name`` under the auth in force,
    or None (:class:`KVService`'s)."""
    from tokenwire.transport.kv_channel import ServerTuning, serve_kv

    # Every check that can refuse the start comes before the warm-ups (the codec's compile, the forecaster's
    # load: seconds): the store, the port, the ingest socket's path and group. A refused start after the warm-up
    # took 6-8 s, and with the unit's RestartSec=2 the retries never reached StartLimitBurst= within
    # StartLimitIntervalSec=: the unit restarted for ever instead of staying failed.
    try:  # the store first: a directory it cannot use fails in a moment
        store = await _opened_store(cfg)
    except OSError as exc:
        raise StartupError(f"kv.directory: cannot use {exc.filename or cfg.directory}: {exc.strerror or exc}") \
            from None
    except StoreError as exc:
        raise StartupError(f"kv.{'redis_url' if cfg.backend == 'redis' else 'directory'}: {exc}") from None
    service = KVService(store, chunk_tokens=cfg.chunk_tokens, put_memory_bytes=cfg.ingest_memory_bytes,
                        check_scope=check_scope)
    marking = kv_marking(cfg.marking)  # classic: ECT(0), as [marking]'s (it was Not-ECT, the same as "none")
    limits = {} if max_connections is None else {"max_connections": max_connections}
    if request_timeout is not None:
        limits["request_timeout"] = request_timeout
    # the chat port's budget in full, not a share of it (see KVServer.unauthorized_memory)
    limits["unauthorized_memory"] = (unauthorized_memory if unauthorized_memory is not None
                                     else int(Limits.unauthorized_memory_mb * (1 << 20)))
    if authorize is not None:  # its check lets a token-less fetch through while no [auth] tokens are configured: only
        # with tokens is a connection held to a small window until a fetch of it is authorized (serve_kv)
        limits["hold_unauthorized"] = lambda: not authorize(None)
    # ewma until the forecaster's model is loaded (below): never onnxruntime loaded on the event loop. Every session
    # shares this tuning: the load's outcome sets it.
    tuning = ServerTuning(forecaster="ewma", prior_bps=cfg.prior_mbps * 1e6,
                          recompute_us_per_token=cfg.recompute_us_per_token,
                          decode_elements_per_s=cfg.decode_mbps * 1e6 / 8)
    # Every resource is closed on any BaseException from here on: a stop signal (a cancel) while serve_kv or
    # serve_kv_ingest was pending left the store's lock and the UDP port held by the process that went on.
    try:
        try:
            server = await serve_kv(service, cfg.listen[0], cfg.listen[1], cert=cert, certfile=certfile,
                                    keyfile=keyfile, congestion=cfg.congestion, marking=marking, tuning=tuning,
                                    authorize=authorize, client_verifier=client_verifier,
                                    on_unauthorized=on_unauthorized, principal=principal, accepting=False,
                                    **limits)
            # bound, gated until start_serving (as the daemon's chat port) from its first datagram on: gated only
            # after serve_kv returned, a datagram read in the loop turn between was served
        except OSError as exc:
            raise cannot_listen("kv.listen", exc, *cfg.listen) from None
    except BaseException:
        service.close()
        raise
    try:
        try:
            ingest = (await serve_kv_ingest(cfg.ingest_socket, service, group=cfg.ingest_socket_group,
                                            start_serving=False)
                      if cfg.ingest_socket is not None else None)
        except OSError as exc:
            raise StartupError(f"kv.ingest_socket: cannot listen on {cfg.ingest_socket}: "
                               f"{exc.strerror or exc}") from None
    except BaseException:
        server.close()
        service.close()
        raise
    path = Path(cfg.ingest_socket) if cfg.ingest_socket is not None else None
    runtime = KVRuntime(service, server, ingest, path, unix_sockets.identity(path) if path is not None else None)
    try:  # (nothing is served meanwhile: see above)
        await warm_up_codec()
        if await warm_up_forecaster(cfg.forecaster):
            tuning.forecaster = cfg.forecaster
        if serve:
            await runtime.start_serving()
    except BaseException:  # a refused JIT, or a stop signal during the start
        await runtime.aclose()  # (its socket file removed; no put or fetch was served to be cut)
        raise
    log.info("KV channel on udp %s:%d (store: %s, %d MiB)", cfg.listen[0], server.port, cfg.backend,
             cfg.capacity_bytes >> 20)
    return runtime
