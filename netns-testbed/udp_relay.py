"""A userspace UDP relay on loopback that adds one-way delay and loss, for the demo and tests.

No root and no kernel qdiscs needed: a client talks to the relay's port, the relay forwards to the server
through one upstream socket per client (like a NAT), and each direction applies a delay and a loss model
from :mod:`tokenwire.testbed.loss`. Loss decisions use the time since :meth:`UdpRelay.reset`, so runs that
reset with the same seed meet the same outages (fair comparisons between schemes).

The decision core (:class:`RelayPath`) is sans-I/O; :class:`UdpRelay` only moves bytes and time.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from .loss import LossModel, parse_loss


@dataclass
class RelayPath:
    """One direction: ``decide(now)`` returns the delivery time, or None when the packet is dropped."""

    delay: float
    loss: LossModel
    packets: int = 0
    dropped: int = 0
    # UDP payload of every datagram offered (dropped ones too): the namespace link's arrived_udp_payload_bytes
    # counts the same, so `tokenwire demo` reads the same B/token through either
    bytes: int = 0

    def decide(self, elapsed: float, size: int) -> float | None:
        self.packets += 1
        self.bytes += size
        if self.loss.lost(elapsed):
            self.dropped += 1
            return None
        return elapsed + self.delay


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay, client_addr: tuple) -> None:
        self.relay = relay
        self.client_addr = client_addr
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.relay._forward(self.relay.down, data, self.relay._front, self.client_addr)


class _Front(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        upstream = self.relay._upstreams.get(addr)
        if upstream is not None:
            self.relay._forward(self.relay.up, data, upstream.transport, None)
        else:  # a new client: open its upstream socket first (packets keep their order on the future)
            task = asyncio.ensure_future(self.relay._from_client(data, addr))
            self.relay._tasks.add(task)
            task.add_done_callback(self.relay._tasks.discard)


@dataclass
class UdpRelay:
    """``client -> relay(host, port) -> server`` with ``down`` (to client) and ``up`` (to server) paths."""

    server: tuple[str, int]
    delay_ms: float = 0.0
    loss: str = "none"
    up_loss: str | None = None  # default: the same spec as down, independent seed
    seed: int = 0
    host: str = "127.0.0.1"
    port: int = 0
    down: RelayPath = field(init=False)
    up: RelayPath = field(init=False)
    _front: asyncio.DatagramTransport | None = None
    _upstreams: dict[tuple, _Upstream] = field(default_factory=dict)
    _pending: dict[tuple, asyncio.Future] = field(default_factory=dict)
    _tasks: set[asyncio.Task] = field(default_factory=set)
    _t0: float = 0.0

    def __post_init__(self) -> None:
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        """Restart the loss processes (same seed, same outages) and the clock they run on."""
        if seed is not None:
            self.seed = seed
        d = self.delay_ms / 1000.0
        self.down = RelayPath(d, parse_loss(self.loss, seed=self.seed))
        up_spec = self.up_loss if self.up_loss is not None else self.loss
        self.up = RelayPath(d, parse_loss(up_spec, seed=self.seed + 7919))
        self._t0 = time.monotonic()

    def restart(self, seed: int | None = None) -> None:
        """:meth:`reset`, keeping the packet and byte counters: ``tokenwire demo`` restarts the pattern after
        the handshake, as the request leaves (every scheme's request then meets the same outages), and still
        counts the handshake's packets and bytes."""
        down, up = self.down, self.up
        self.reset(seed)
        for new, old in ((self.down, down), (self.up, up)):
            new.packets, new.dropped, new.bytes = old.packets, old.dropped, old.bytes

    async def start(self) -> UdpRelay:
        loop = asyncio.get_running_loop()
        self._front, _ = await loop.create_datagram_endpoint(lambda: _Front(self), local_addr=(self.host, self.port))
        self.port = self._front.get_extra_info("sockname")[1]
        return self

    async def _from_client(self, data: bytes, addr: tuple) -> None:
        fut = self._pending.get(addr)
        if fut is None:
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            self._pending[addr] = fut
            proto = _Upstream(self, addr)
            await loop.create_datagram_endpoint(lambda: proto, remote_addr=self.server)
            self._upstreams[addr] = proto
            fut.set_result(proto)
        proto = await fut
        self._forward(self.up, data, proto.transport, None)

    def _forward(self, path: RelayPath, data: bytes, transport, addr) -> None:
        if transport is None:
            return
        elapsed = time.monotonic() - self._t0
        at = path.decide(elapsed, len(data))
        if at is None:
            return
        delay = at - elapsed
        loop = asyncio.get_running_loop()
        if delay <= 0:
            transport.sendto(data, addr)
        else:
            loop.call_later(delay, self._send_later, transport, data, addr)

    @staticmethod
    def _send_later(transport: asyncio.DatagramTransport, data: bytes, addr: tuple | None) -> None:
        """A delayed packet's send, dropped once the relay has closed: after ``close()`` the packets still in
        their delay were sent on closed transports, and asyncio logged "socket.send() raised exception." for
        each (a dozen lines at the end of every ``tokenwire demo``)."""
        if not transport.is_closing():
            transport.sendto(data, addr)

    def close(self) -> None:
        for proto in self._upstreams.values():
            if proto.transport is not None:
                proto.transport.close()
        self._upstreams.clear()
        self._pending.clear()
        if self._front is not None:
            self._front.close()
