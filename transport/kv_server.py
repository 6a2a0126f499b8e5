"""The KV channel's server, asyncio shell: :func:`serve_kv` runs a :class:`KVServer` that drives one
:class:`~.kv_server_session.KVServerSession` per connection and asks its :class:`~.kv_server_session.KVProvider`
(the daemon's KV service) for plans and chunks on tasks of its own."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aioquic.quic.connection import QuicConnection

from .errors import ErrorCode, TokenwireError
from .frames import KvFetch
from .kv_protocol import KVError, kv_quic_config
from .kv_server_session import (
    KVChunkNeeded,
    KVFetchClosed,
    KVFetchRefused,
    KVFetchRequested,
    KVProvider,
    KVServerSession,
    ServerTuning,
)
from .marking import MarkingPolicy
from .quic_io import SessionProtocol, serve_quic, tune_socket
from .session import ConnectionEnded, SessionEvent
from .tls import CertPair, server_configuration

log = logging.getLogger("tokenwire.kv")


class KVServerProtocol(SessionProtocol):
    def __init__(self, quic: QuicConnection, stream_handler: Any = None, *, app: KVServer) -> None:
        super().__init__(quic, stream_handler, session_factory=lambda q: KVServerSession(
            q, tuning=app.tuning, marking=app.marking() if app.marking is not None else None))
        self.app = app
        self.tasks: set[asyncio.Task[None]] = set()
        app.protocols.add(self)

    @property
    def kv(self) -> KVServerSession:
        assert isinstance(self.session, KVServerSession)
        return self.session

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def handle_session_events(self, events: list[SessionEvent]) -> None:
        for ev in events:
            if isinstance(ev, KVFetchRequested):
                self.app.stats["fetches"] += 1
                self._spawn(self._resolve(ev.stream_id, ev.fetch))
            elif isinstance(ev, KVChunkNeeded):
                self._spawn(self._chunk(ev))
            elif isinstance(ev, KVFetchRefused):
                self.app.stats["refused"] += 1
                log.warning("refused KV fetch stream %d: %s", ev.stream_id, ev.reason)
            elif isinstance(ev, KVFetchClosed):
                self.app.stats["completed" if ev.complete else "abandoned"] += 1
                if self.app.on_fetch_closed is not None:
                    self.app.on_fetch_closed(ev)
                for listener in self.app.fetch_closed_listeners:
                    listener(ev)
            elif isinstance(ev, ConnectionEnded):
                for t in list(self.tasks):
                    t.cancel()
                self.app.protocols.discard(self)

    def _fail_fetch(self, sid: int, outcome: str, code: int, message: str) -> None:
        """End a fetch with an ERROR and count its ``outcome`` (``refused`` at resolve, ``failed`` at a chunk; a
        store failure is one too: it was counted nowhere). One the client gave up meanwhile has its outcome
        already (abandoned: it was counted twice)."""
        f = self.kv.fetches.get(sid)
        if f is None or f.closed:
            return
        self.app.stats[outcome] += 1
        self.kv.reject(sid, code, message)

    async def _resolve(self, sid: int, fetch: KvFetch) -> None:
        try:
            if self.app.draining:  # the daemon is stopping: running fetches finish, new ones are refused
                raise KVError("server shutting down", code=ErrorCode.SHUTTING_DOWN)
            if self.app.authorize is not None and not self.app.authorize(fetch.auth):
                raise KVError("missing or invalid auth token", code=ErrorCode.UNAUTHORIZED)
            plan = await self.app.provider.resolve(fetch)
        except TokenwireError as exc:
            self._fail_fetch(sid, "refused", exc.code, str(exc))
        except Exception as exc:  # a broken provider fails this fetch, never the server
            log.exception("KV resolve failed")
            self._fail_fetch(sid, "refused", ErrorCode.INTERNAL, f"store failure: {exc.__class__.__name__}")
        else:
            if plan.rest_tokens:
                self.app.stats["prefix_hits"] += 1
            self.kv.start(sid, plan, self.clock())
            events = self.kv.poll(self.clock())
            self.handle_session_events(events)
        self.transmit()

    async def _chunk(self, ev: KVChunkNeeded) -> None:
        f = self.kv.fetches.get(ev.stream_id)
        if f is None or f.plan is None:
            return
        try:
            payload = await self.app.provider.chunk(f.plan, ev.index, ev.level)
        except TokenwireError as exc:  # a chunk gone since the fetch began (evicted, corrupt, re-put)
            self._fail_fetch(ev.stream_id, "failed", exc.code, str(exc))
        except Exception as exc:
            log.exception("KV chunk %d failed", ev.index)
            self._fail_fetch(ev.stream_id, "failed", ErrorCode.INTERNAL, f"store failure: {exc.__class__.__name__}")
        else:
            self.kv.send_chunk(ev.stream_id, ev.index, ev.level, payload, self.clock())
            self.app.stats["chunks"] += 1
            self.app.stats[f"chunks_{ev.level}"] = self.app.stats.get(f"chunks_{ev.level}", 0) + 1
            self.app.stats["bytes"] += len(payload)
        self.transmit()


@dataclass
class KVServer:
    """A running KV channel endpoint (see :func:`serve_kv`)."""

    provider: KVProvider
    tuning: ServerTuning = field(default_factory=ServerTuning)
    authorize: Callable[[str | None], bool] | None = None
    marking: Callable[[], MarkingPolicy] | None = None
    on_fetch_closed: Callable[[KVFetchClosed], None] | None = None
    fetch_closed_listeners: list[Callable[[KVFetchClosed], None]] = field(default_factory=list)  # e.g. metrics
    stats: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("fetches", "completed", "abandoned", "refused", "failed", "prefix_hits", "chunks", "bytes"), 0))
    protocols: set[KVServerProtocol] = field(default_factory=set)
    draining: bool = False  # set by the owner's drain: new fetches are refused with SHUTTING_DOWN
    _quic_server: Any = None

    def open_fetches(self, *, unsent_only: bool = False) -> int:
        """Fetches being served, or (``unsent_only``) those with chunks not yet on the wire: what a drain waits
        for, then gives a short grace to be delivered."""
        return sum(1 for p in self.protocols for f in p.kv.fetches.values()
                   if not unsent_only or f.plan is None or f.next_index < len(f.plan.token_counts))

    @property
    def port(self) -> int:
        return int(self._quic_server._transport.get_extra_info("sockname")[1])

    @property
    def quic_configuration(self) -> Any:
        """The listener's configuration, read at each new connection (the daemon's SIGHUP renews its certificate)."""
        return self._quic_server._configuration

    def close(self) -> None:
        for p in list(self.protocols):
            for t in list(p.tasks):  # now, not at the connection's end: the store's workers are going away too
                t.cancel()  # (a chunk task then failed with "cannot schedule new futures", a traceback each)
            with contextlib.suppress(Exception):
                p.close(ErrorCode.SHUTTING_DOWN, "server shutting down")
        if self._quic_server is not None:
            self._quic_server.close()



async def serve_kv(provider: KVProvider, host: str = "::", port: int = 4434, *, cert: CertPair | None = None,
                   certfile: str | Path | None = None, keyfile: str | Path | None = None,
                   congestion: str = "prague", marking: Callable[[], MarkingPolicy] | None = None,
                   tuning: ServerTuning | None = None, authorize: Callable[[str | None], bool] | None = None
                   ) -> KVServer:
    """Serve ``provider``'s contexts on UDP ``host:port`` (ALPN ``tokenwire-kv/1``).

    Bulk KV traffic should mark ECT(1) (``marking=L4SPolicy``) and use the scalable ``prague`` controller;
    :func:`kv_congestion` picks the controller that matches a marking policy.
    """
    server = KVServer(provider, tuning or ServerTuning(), authorize, marking)
    config = kv_quic_config(server_configuration(cert=cert, certfile=certfile, keyfile=keyfile,
                                                 congestion=congestion))
    server._quic_server = await serve_quic(host, port, configuration=config,
                                           create_protocol=functools.partial(KVServerProtocol, app=server),
                                           ecn=marking is not None)
    tune_socket(server._quic_server._transport)
    return server
