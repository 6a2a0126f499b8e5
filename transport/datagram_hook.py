"""Lazy DATAGRAM payloads and per-datagram delivery callbacks on an aioquic ``QuicConnection``.

aioquic (1.7.2, pinned) queues DATAGRAM payloads in an unbounded deque, writes them with
``_write_datagram_frame`` and registers no delivery handler for them. This module replaces that one
private method on a connection *instance* so that:

* a queued item may be a :class:`DatagramSource` slot whose payload is built at the moment the packet is
  assembled, sized to the room actually left in it (Chatterbox needs the newest ack state at send time,
  and nothing stale piles up in aioquic's queue);
* every datagram frame registers a delivery handler, so the source learns ACKED or LOST per datagram
  (aioquic resolves every sent packet exactly once, or drops the handlers when the connection closes);
* nothing oversized ever reaches the queue (one oversized frame would block every later datagram forever);
* a duplicate copy is forced into a different QUIC packet than its original.

Everything else in aioquic is untouched. ``tests/test_datagram_hook.py`` pins the behaviour this relies on.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from aioquic.buffer import size_uint_var
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicFrameType
from aioquic.quic.packet_builder import QuicDeliveryState, QuicPacketBuilder, QuicPacketBuilderStop

from .chatterbox import NEEDS_ROOM

FRAME_OVERHEAD = 3  # frame type (1) + length varint (2 bytes for payloads < 16384)


class DatagramSource(Protocol):
    """Something that produces datagram payloads on demand (a token sender, an ack generator)."""

    copies: int

    def wants_send(self) -> bool: ...

    def build(
        self, now: float, capacity: int, *, piggyback: bool = False, window: tuple[int, int] | None = None
    ) -> tuple[bytes, Any] | object | None: ...

    def on_delivery(self, cookie: Any, acked: bool, now: float) -> None: ...


@dataclass(slots=True)
class _Slot:
    source: DatagramSource


@dataclass(slots=True)
class _Piggyback:
    source: DatagramSource


@dataclass(slots=True)
class _Copy:
    source: DatagramSource
    payload: bytes
    cookie: Any
    not_in_packet: int  # the packet number that holds the original


@dataclass(slots=True)
class _Plain:
    payload: bytes
    on_delivery: Callable[[bool], None] | None


class DatagramScheduler:
    """Installs the lazy-payload writer on ``quic`` and keeps at most one slot queued per source."""

    def __init__(self, quic: QuicConnection, clock: Callable[[], float]) -> None:
        self._quic = quic
        self._clock = clock
        self._queued: set[int] = set()  # id() of sources with a slot in the queue
        self.max_payload = 1162
        self.datagrams_written = 0
        self.bytes_written = 0
        quic._write_datagram_frame = self._write_datagram_frame  # type: ignore[method-assign]

    # ----------------------------------------------------------------------------------- public
    def set_peer_limit(self, remote_max_datagram_frame_size: int | None) -> None:
        """Bound payloads by the peer's transport parameter (aioquic itself never checks it)."""
        if remote_max_datagram_frame_size is None:
            self.max_payload = 0
        else:
            # the peer rejects frames whose (length varint + payload) reaches its limit
            self.max_payload = max(0, min(self.max_payload, remote_max_datagram_frame_size - 1 - 2))

    def schedule(self, source: DatagramSource) -> None:
        """Queue one lazy slot for ``source`` if it wants to send and has none queued."""
        key = id(source)
        if key in self._queued or not source.wants_send():
            return
        self._queued.add(key)
        self._quic._datagrams_pending.append(_Slot(source))  # type: ignore[arg-type]  # the hook queues its items

    def offer_piggyback(self, source: DatagramSource) -> None:
        """Let ``source`` ride in the next packet that leaves anyway (never creates a packet of its own).

        Used by Chatterbox so that no packet (an ACK, a stream frame's packet) leaves without the
        unacknowledged tokens. One-shot: consumed by the next packet built, written only if that packet
        already carries something.
        """
        key = id(source)
        if key in self._queued:
            return
        self._queued.add(key)
        self._quic._datagrams_pending.append(_Piggyback(source))  # type: ignore[arg-type]  # (as above)

    def data_waiting(self) -> bool:
        """Whether a datagram is queued to leave (a piggyback offer is not one: it never makes a packet)."""
        return any(not isinstance(item, _Piggyback) for item in self._quic._datagrams_pending)

    def send_plain(self, payload: bytes, on_delivery: Callable[[bool], None] | None = None) -> None:
        """Queue a ready-made payload, refusing anything that could never fit a packet."""
        if len(payload) > self.max_payload:
            raise ValueError(f"datagram payload of {len(payload)} bytes exceeds {self.max_payload}")
        self._quic._datagrams_pending.append(_Plain(payload, on_delivery))  # type: ignore[arg-type]  # (as above)

    def forget(self, source: DatagramSource | None) -> None:
        """Drop queued slots and copies of ``source`` (its request ended)."""
        pending = self._quic._datagrams_pending
        keep = [it for it in pending if not (isinstance(it, _Slot | _Copy | _Piggyback) and it.source is source)]
        pending.clear()
        pending.extend(keep)
        self._queued.discard(id(source))

    # ----------------------------------------------------------------------------------- aioquic hook
    def _write_datagram_frame(self, builder: QuicPacketBuilder, data: Any, frame_type: QuicFrameType) -> bool:
        """Replacement for ``QuicConnection._write_datagram_frame``; raising Stop keeps the item queued."""
        room = min(builder.remaining_buffer_space, builder.remaining_flight_space) - FRAME_OVERHEAD
        if isinstance(data, _Slot):
            return self._write_slot(builder, data, frame_type, min(room, self.max_payload))
        if isinstance(data, _Piggyback):
            return self._write_piggyback(builder, data, frame_type, min(room, self.max_payload))
        if isinstance(data, _Copy):
            if builder.packet_number == data.not_in_packet or len(data.payload) > room:
                raise QuicPacketBuilderStop
            self._emit(builder, frame_type, data.payload, self._on_source_delivery, (data.source, data.cookie))
            return True
        if isinstance(data, _Plain):
            if len(data.payload) > room:
                raise QuicPacketBuilderStop
            handler = self._on_plain_delivery if data.on_delivery is not None else None
            self._emit(builder, frame_type, data.payload, handler, (data.on_delivery,))
            return True
        # raw bytes queued through the public send_datagram_frame(): behave like aioquic, with a handler-less
        # frame, but never let an oversized one block the queue forever
        if len(data) > self.max_payload:
            return True  # dropped: could never be sent
        if len(data) > room:
            raise QuicPacketBuilderStop
        self._emit(builder, frame_type, data, None, ())
        return True

    def _write_slot(self, builder: QuicPacketBuilder, slot: _Slot, frame_type: QuicFrameType, room: int) -> bool:
        source = slot.source
        if room <= 0:
            raise QuicPacketBuilderStop
        built = source.build(self._clock(), room, window=self._window())
        if built is NEEDS_ROOM:
            raise QuicPacketBuilderStop
        self._queued.discard(id(source))
        if built is None:
            return True  # nothing to send any more (acked meanwhile, or request closed)
        payload, cookie = cast("tuple[bytes, Any]", built)
        pn = builder.packet_number
        self._emit(builder, frame_type, payload, self._on_source_delivery, (source, cookie))
        pending: deque[Any] = self._quic._datagrams_pending
        for _ in range(source.copies - 1):
            pending.append(_Copy(source, payload, cookie, pn))
        # more to send (a burst larger than one packet): queue the next slot behind what is waiting
        self.schedule(source)
        return True

    def _write_piggyback(
        self, builder: QuicPacketBuilder, item: _Piggyback, frame_type: QuicFrameType, room: int
    ) -> bool:
        source = item.source
        self._queued.discard(id(source))
        if source.wants_send():  # it has real work now: behave as a regular slot
            self.schedule(source)
            return True
        if builder.packet_is_empty or room <= 0:
            return True  # no packet is leaving anyway: drop the offer, never hold up the queue
        built = source.build(self._clock(), room, piggyback=True, window=self._window())
        if built is None or built is NEEDS_ROOM:
            return True
        payload, cookie = cast("tuple[bytes, Any]", built)
        self._emit(builder, frame_type, payload, self._on_source_delivery, (source, cookie))
        return True

    def _window(self) -> tuple[int, int] | None:
        """(congestion window, bytes in flight) from aioquic's recovery state, for sources that size repeats."""
        loss = getattr(self._quic, "_loss", None)
        if loss is None:
            return None
        return int(loss.congestion_window), int(loss.bytes_in_flight)

    def _emit(self, builder: QuicPacketBuilder, frame_type: QuicFrameType, payload: bytes, handler, args) -> None:
        length = len(payload)
        buf = builder.start_frame(
            frame_type,
            capacity=1 + size_uint_var(length) + length,
            handler=handler,
            handler_args=args,
        )
        buf.push_uint_var(length)
        buf.push_bytes(payload)
        self.datagrams_written += 1
        self.bytes_written += length

    def _on_source_delivery(self, state: QuicDeliveryState, source: DatagramSource, cookie: Any) -> None:
        source.on_delivery(cookie, state == QuicDeliveryState.ACKED, self._clock())
        self.schedule(source)

    @staticmethod
    def _on_plain_delivery(state: QuicDeliveryState, callback: Callable[[bool], None]) -> None:
        callback(state == QuicDeliveryState.ACKED)


def smoothed_rtt(quic: QuicConnection, default: float) -> float:
    """aioquic's smoothed RTT estimate (private recovery state), or ``default`` before the first sample."""
    loss = getattr(quic, "_loss", None)
    if loss is None or not getattr(loss, "_rtt_initialized", False):
        return default
    return float(getattr(loss, "_rtt_smoothed", default)) or default


def min_rtt(quic: QuicConnection, default: float) -> float:
    """aioquic's minimum RTT sample (private recovery state: infinite until the first), or ``default`` before it."""
    rtt = getattr(getattr(quic, "_loss", None), "_rtt_min", math.inf)
    return float(rtt) if math.isfinite(rtt) else default
