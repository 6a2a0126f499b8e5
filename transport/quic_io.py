"""Thin asyncio shell between a UDP socket and a sans-I/O tokenwire session.

aioquic's ``QuicConnectionProtocol`` already moves datagrams and QUIC timers; this subclass adds the
session: every QUIC event goes to the session, session timers (Chatterbox idle repair, client gap
repair) share the one loop timer, and every QUIC call uses one clock, ``time.monotonic()`` (uvloop's
``loop.time()`` has only millisecond resolution; mixing the two would skew RTT samples).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events as qe
from aioquic.quic.connection import NetworkAddress, QuicConnection

from .session import SessionEvent, _SessionBase

log = logging.getLogger("tokenwire.transport")

RECV_BUFFER_BYTES = 4 << 20  # the default 208 KiB overflowed on loopback bursts (research notes)


def tune_socket(transport: asyncio.BaseTransport | None) -> None:
    """Raise the UDP receive/send buffers of the endpoint behind ``transport`` (best effort)."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, RECV_BUFFER_BYTES)
        except OSError as exc:  # pragma: no cover - unusual kernels
            log.debug("could not raise socket buffer %s: %s", opt, exc)


class SessionProtocol(QuicConnectionProtocol):
    """Drives ``self.session`` (built by ``session_factory``) from asyncio; subclasses handle its events."""

    clock: Callable[[], float] = staticmethod(time.monotonic)

    def __init__(
        self,
        quic: QuicConnection,
        stream_handler: Any = None,
        *,
        session_factory: Callable[[QuicConnection], _SessionBase],
    ) -> None:
        super().__init__(quic, stream_handler)
        self.session = session_factory(quic)
        self._session_timer: asyncio.TimerHandle | None = None
        self._session_timer_at: float | None = None

    # -- events ------------------------------------------------------------------------------------
    def handle_session_events(self, events: list[SessionEvent]) -> None:  # pragma: no cover - overridden
        pass

    def quic_event_received(self, event: qe.QuicEvent) -> None:
        # aioquic's _process_events did its own bookkeeping (CIDs, waiters) before calling us
        events = self.session.handle_quic_event(event, self.clock())
        if events:
            self.handle_session_events(events)

    # -- I/O -----------------------------------------------------------------------------------------
    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        self._quic.receive_datagram(data, addr, now=self.clock())  # type: ignore[arg-type]
        self._process_events()
        self.transmit()

    def transmit(self) -> None:
        self._transmit_task = None
        if self._transport is None:
            return
        now = self.clock()
        for data, addr in self.session.datagrams_to_send(now):
            self._transport.sendto(data, addr)
        timer_at = self.session.get_timer()
        if self._session_timer is not None and self._session_timer_at != timer_at:
            self._session_timer.cancel()
            self._session_timer = None
        if self._session_timer is None and timer_at is not None:
            self._session_timer = self._loop.call_later(max(0.0, timer_at - now), self._on_timer)
        self._session_timer_at = timer_at

    def _on_timer(self) -> None:
        self._session_timer = None
        at = self._session_timer_at
        self._session_timer_at = None
        now = self.clock()
        if at is not None:
            now = max(now, at)  # never let a slightly early timer see a time before its deadline
        self._quic.handle_timer(now=now)
        self._process_events()
        events = self.session.run_timers(now)
        if events:
            self.handle_session_events(events)
        self.transmit()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        tune_socket(transport)

    def connection_lost(self, exc: Exception | None) -> None:  # pragma: no cover - socket closed under us
        if self._session_timer is not None:
            self._session_timer.cancel()
            self._session_timer = None
