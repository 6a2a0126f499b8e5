"""Virtual-time simulator: the real protocol stack of every scheme over a modelled channel.

Both ends are real aioquic ``QuicConnection`` objects wrapped in the real tokenwire sessions (the same
code the daemon runs: Chatterbox sender/receiver, datagram hook, repair logic, TLS and QUIC loss recovery);
only the clock and the wire are simulated. The channel adds a one-way delay and drops packets according
to a loss model (:mod:`tokenwire.testbed.loss`); or, given a down trace, each direction is the testbed's own
trace-driven :class:`~tokenwire.testbed.link.Link` (mahimahi's delivery opportunities behind a drop-tail queue,
then the loss model and the delay), so a slow cellular trace's stalls come out of the same model the namespace
testbed runs, deterministically and in seconds rather than minutes. Time advances from event to event, so a
10-minute answer simulates in well under a second and every run with one seed is exactly reproducible.

Tokens come from the demo upstream's schedule (realistic rate, jitter and generator pauses), identical
for every scheme under one seed, and the gilbert-elliott loss pattern is a function of time, so every
scheme meets the same outages.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import math
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aioquic.buffer import Buffer
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import pull_quic_header

from tokenwire.daemon.demo_upstream import answer_tokens, schedule
from tokenwire.transport import metrics
from tokenwire.transport.client_session import AnswerComplete, ClientSession
from tokenwire.transport.frames import CHAT_ALPNS, SCHEMES, Request
from tokenwire.transport.server_session import ServerSession
from tokenwire.transport.session_events import (
    ConnectionEnded,
    RequestFailed,
    RequestFinished,
    RequestReceived,
    SessionEvent,
)
from tokenwire.transport.session_outcome import estimated_base_delay
from tokenwire.transport.tls import client_configuration, server_configuration, sim_cert

from .link import Link
from .loss import LossModel, parse_loss
from .path_config import GO_SETTLE_S, START_MODES
from .queues import DropTail, Packet
from .trace import trace_from_spec
from .vsim import MAX_VIRTUAL_S, MIN_ONOFF_MS, Flow, Simulation

CLIENT_ADDR = ("10.77.0.2", 40000)
SERVER_ADDR = ("10.77.0.1", 4433)
IP_UDP_HEADER = 28
TIMER_SLACK = 1e-6
QUEUE_PACKETS = 1000
"""Drop-tail limit of a trace-driven direction's queue, in packets: ``testbed compare``'s default
(``--queue droptail:packets=1000``), so that a trace replay here and a testbed run meet the same buffer."""


STATS_TAIL_S = 30.0
"""Virtual seconds a run goes on after its answer's end for the GEN_TIMES frame that follows it (bytes only)."""


class SimError(RuntimeError):
    """The simulated run did not complete (a stuck scheme is a bug, not a result)."""


@dataclass
class SimConfig:
    tokens: int = 400
    rate: float = 30.0
    delay_ms: float = 50.0
    loss: str = "none"
    loss_direction: str = "both"  # "both", "down" or "up" (acks lost, tokens delivered)
    seed: int = 0
    first_token_ms: float = 150.0
    max_virtual_s: float = MAX_VIRTUAL_S
    # trace-driven path (None: the fixed delay/loss channel); the up trace defaults to the down one, as in
    # `testbed compare`; delay and loss then apply on top of the trace
    down_trace: str | None = None
    up_trace: str | None = None
    queue_packets: int = QUEUE_PACKETS
    # chats at once over the one channel (run_chats): chat i asks for the demo schedule of seed + i
    chats: int = 1
    # when the answers start (START_MODES): "settled" once the handshakes' packets have left the path, "connected"
    # as soon as every chat is connected, behind them (a flash crowd); one chat's request goes as its handshake
    # completes either way
    start: str = "settled"
    # cross traffic server -> client on the traced down direction (.traffic.parse_cross specs, tcp:bbr excepted:
    # _CrossTraffic), from time 0, through the handshakes and every answer, as testbed contention's
    cross: list[str] = field(default_factory=list)
    # told how far a long run is (run_scheme's ``progress``): not a parameter of the run, so not in to_dict; a
    # field, so that compare() hands it to every run without a third argument (stand-ins of run_scheme take two)
    progress: Callable[[str], None] | None = field(default=None, repr=False, compare=False)

    @property
    def up_trace_spec(self) -> str | None:
        """The up direction's trace: ``up_trace``, else the down one (``testbed compare``'s default)."""
        return self.up_trace if self.up_trace is not None else self.down_trace

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "tokens": self.tokens,
            "rate": self.rate,
            "delay_ms": self.delay_ms,
            "loss": self.loss,
            "loss_direction": self.loss_direction,
            "seed": self.seed,
            "first_token_ms": self.first_token_ms,
        }
        if self.down_trace is not None:  # (absent otherwise: a delay/loss run's JSON is what it always was)
            d.update(down_trace=self.down_trace, up_trace=self.up_trace_spec, queue_packets=self.queue_packets)
        if self.chats != 1:  # (absent for one chat: a single-chat run's JSON is what it always was)
            d["chats"] = self.chats
        if self.start != "settled":  # (absent by default, the same way)
            d["start"] = self.start
        if self.cross:
            d["cross"] = list(self.cross)
        return d


@dataclass
class SimRun:
    """One scheme, one seed: timelines on the virtual clock and the summary."""

    scheme: str
    gen: list[float]
    render: list[float]
    request_time: float
    request_arrival: float
    base_delay: float
    wire_bytes: int
    deliveries: list[tuple[float, float]]  # server -> client (send, arrival), delivered only
    digest_ok: bool
    stats: metrics.StreamStats
    oracle_stall_ratio: float
    packets_down: int
    packets_lost_down: int
    packets_lost_up: int = 0  # the client's packets (requests, acks, pings), over the whole connection


class _EventLoop:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.now = 0.0

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), fn))

    def run(self, done: Callable[[], bool], limit: float, tick: Callable[[], None] | None = None) -> None:
        """Run events until ``done()``; ``tick`` is called after each one (the progress within a run)."""
        self.run_on(done, limit, tick)

    def run_on(self, done: Callable[[], bool], limit: float, tick: Callable[[], None] | None = None) -> None:
        """:meth:`run` itself; called directly, the run goes on after its answer (the GEN_TIMES tail), which a
        probe of the answer's end that wraps :meth:`run` does not take for the end."""
        while self._heap and not done():
            t, _, fn = heapq.heappop(self._heap)
            if t > limit:
                raise SimError(f"no completion within {limit:.0f} s of virtual time")
            self.now = max(self.now, t)
            fn()
            if tick is not None:
                tick()


@dataclass
class _Node:
    name: str
    session: ClientSession | ServerSession | None = None
    timer_at: float | None = None
    timer_gen: int = 0
    on_events: Callable[[list[SessionEvent]], None] = lambda evs: None


Address = tuple[str, int]
Deliver = Callable[[Address, bytes], None]
"""A direction's receiving end: ``deliver(addr, data)``, ``addr`` the datagram's client (its destination down, its
source up), by which a run of several chats routes it to that chat's connection."""


class _Wire:
    """One direction of the fixed channel: each datagram is lost (the loss model, at its send time) or delivered
    ``delay`` later, one event per datagram. ``sent`` logs every datagram as a :class:`Packet` (size with the
    IP/UDP header, ``arrival`` the send time, ``delivery`` None when lost, ``meta`` the client's address), as
    :class:`_TraceWire`'s does, so that a run reads either log the same way."""

    def __init__(self, loop: _EventLoop, delay: float, loss: LossModel, deliver: Deliver) -> None:
        self.loop, self.delay, self.loss, self.deliver = loop, delay, loss, deliver
        self.sent: list[Packet] = []

    def send(self, datagrams: list[bytes], now: float, addr: Address) -> None:
        for data in datagrams:
            pkt = Packet(len(data) + IP_UDP_HEADER, 0, data, addr)
            pkt.arrival = now
            if self.loss.lost(now):
                pkt.fate = "lost"
            else:
                pkt.delivery = now + self.delay
                self.loop.at(pkt.delivery, functools.partial(self.deliver, addr, data))
            self.sent.append(pkt)


class _TraceWire:
    """One direction as the testbed's trace-driven :class:`Link` (queue, opportunities, loss, delay), driven
    by the event loop: one wake-up at the link's next event time (never two at one instant), which hands over
    whatever is due and arms the next. The link decides in virtual time, so when a wake-up runs changes
    nothing but the order of events at one instant."""

    def __init__(self, loop: _EventLoop, link: Link, deliver: Deliver) -> None:
        self.loop, self.link, self.deliver = loop, link, deliver
        self.sent: list[Packet] = []
        self._armed: set[float] = set()
        self.cross: Callable[[Packet], None] | None = None
        """The sink of cross traffic's packets (:class:`_CrossTraffic`), which carry no datagram."""

    def send(self, datagrams: list[bytes], now: float, addr: Address) -> None:
        for data in datagrams:
            self.sent.append(self.link.enqueue(Packet(len(data) + IP_UDP_HEADER, 0, data, addr), now))
        self._arm()

    def send_packet(self, pkt: Packet, now: float) -> None:
        """A packet of cross traffic (sizes only, ``data`` None): logged in :attr:`sent` as the chats' are."""
        self.sent.append(self.link.enqueue(pkt, now))
        self._arm()

    def _arm(self) -> None:
        t = self.link.next_event_time()
        if t is None or t in self._armed:
            return
        self._armed.add(t)
        self.loop.at(t, functools.partial(self._wake, t))

    def _wake(self, t: float) -> None:
        self._armed.discard(t)
        for pkt in self.link.dequeue_ready(self.loop.now):
            if pkt.data is None:  # cross traffic's (the chats' packets carry their datagram and its client)
                if self.cross is not None:
                    self.cross(pkt)
                continue
            self.deliver(pkt.meta, pkt.data)  # type: ignore[arg-type]
        self._arm()


def cross_problem(spec: str) -> str | None:
    """Why the simulator cannot run cross traffic ``spec``, or None: contention's grammar
    (:func:`.traffic.parse_cross`: ``tcp:cubic|bbr|reno``, ``udp-ect1:RATE``, ``onoff-ect1:RATE:ON_MS:OFF_MS``),
    no ``tcp:bbr`` (``tcp:reno`` and ``tcp:cubic`` run as a Reno AIMD window, :class:`.vsim.RenoFlow`, as in ``testbed
    swiftqueue --virtual``: no model of either in virtual time), a paced RATE of at most :data:`MAX_CROSS_BPS`, and
    an ``onoff-ect1`` ON_MS of at least :data:`MIN_ONOFF_MS`, OFF_MS 0 (always on) or at least that too (contention
    takes any ON_MS above 0: its sender sleeps in real time; here each period is an event, and ``:0.000001:0.000001``
    ran for ever without sending a packet)."""
    from .trace import generator_bps
    from .traffic import parse_cross

    try:
        kind, arg = parse_cross(spec)
    except ValueError as exc:
        return str(exc)
    if kind == "tcp" and arg == "bbr":
        return (f"cross traffic {spec!r}: virtual time has no BBR model (tcp:reno and tcp:cubic run as Reno AIMD); "
                "testbed contention runs kernel BBR")
    if kind != "tcp":
        bps = generator_bps(arg.partition(":")[0])
        if bps is not None and bps > MAX_CROSS_BPS:
            return (f"cross traffic {spec!r}: at most {MAX_CROSS_BPS / 1e6:g} Mbit/s in the simulator (each packet is "
                    "an event: a faster flow only fills the queue, slowly)")
    if kind == "onoff-ect1":
        on, _, off = arg.partition(":")[2].partition(":")
        if float(on) < MIN_ONOFF_MS or 0 < float(off) < MIN_ONOFF_MS:
            return (f"cross traffic {spec!r}: ON_MS of at least {MIN_ONOFF_MS:g} ms in the simulator, and OFF_MS 0 "
                    f"(always on) or at least {MIN_ONOFF_MS:g} ms (each period is an event: shorter ones only stall "
                    "the run; testbed contention takes them)")
    return None




MAX_CROSS_BPS = 100e6
"""The fastest paced cross flow the simulator takes: ~10,000 packets a virtual second already, far past any trace a
chat is simulated on; ``udp-ect1:100gbps`` (the grammar's bound) would take hours of CPU to fill a queue."""


class _CrossTraffic(Simulation):
    """``cfg.cross`` on a traced down direction: :mod:`.vsim`'s flows (:func:`.swiftqueue_eval.add_cross_flows`, as
    ``testbed swiftqueue --virtual`` runs them: 1200-byte paced packets, each flow starting within the first 50 ms,
    by the seed) sending into the wire's :class:`Link` on the run's event loop. Their packets are dropped where they
    are delivered (the cross sink); a Reno flow hears of each one a one-way delay later (no queue up). They run
    until the run ends."""

    def __init__(self, loop: _EventLoop, wire: _TraceWire, specs: list[str], *, ack_delay: float, seed: int) -> None:
        from .swiftqueue_eval import add_cross_flows

        super().__init__(wire.link, keep=lambda pkt: False)  # (vsim's own loop and records go unused)
        self.loop, self.wire = loop, wire
        wire.cross = self._deliver
        for spec in specs:
            problem = cross_problem(spec)
            if problem is not None:
                raise ValueError(problem)
        add_cross_flows(self, specs, ack_delay=ack_delay, seconds=math.inf, seed=seed)

    def call_at(self, t: float, fn: Callable[[float], None]) -> int:
        eid = next(self._ids)
        self.loop.at(t, functools.partial(self._fire, eid, fn))
        return eid

    def _fire(self, eid: int, fn: Callable[[float], None]) -> None:
        if eid in self._cancelled:
            self._cancelled.discard(eid)
            return
        fn(self.loop.now)

    def send(self, flow: Flow, pkt: Packet, now: float) -> None:
        self.wire.send_packet(pkt, now)


def _channel(cfg: SimConfig, loop: _EventLoop, to_client: Deliver, to_server: Deliver) -> tuple[
        _Wire | _TraceWire, _Wire | _TraceWire]:
    """The (down, up) directions of ``cfg``'s path: the fixed delay/loss wires, or trace-driven links behind a
    ``cfg.queue_packets`` drop-tail queue with the same delay and loss on top (as ``testbed compare`` builds
    them). The loss models are seeded as they always were, so a seed meets the same outages either way."""
    delay = cfg.delay_ms / 1000.0
    down_loss = parse_loss(cfg.loss if cfg.loss_direction != "up" else "none", seed=cfg.seed)
    up_spec = cfg.loss if cfg.loss_direction in ("both", "up") else "none"
    up_loss = parse_loss(up_spec, seed=cfg.seed + 7919)
    up_trace = cfg.up_trace_spec
    if cfg.down_trace is None or up_trace is None:
        return _Wire(loop, delay, down_loss, to_client), _Wire(loop, delay, up_loss, to_server)

    def link(spec: str, loss: LossModel, name: str) -> Link:
        return Link(trace_from_spec(spec), DropTail(packets=cfg.queue_packets), delay=delay, loss=loss, name=name)

    return (_TraceWire(loop, link(cfg.down_trace, down_loss, "down"), to_client),
            _TraceWire(loop, link(up_trace, up_loss, "up"), to_server))


def _dropped(pkt: Packet) -> bool:
    """Lost on the way (the loss model, or a full queue); a packet still queued or in flight at the end is not."""
    return pkt.fate not in ("queued", "delivered")


RUN_PROGRESS_S = 5.0
"""Wall-clock seconds between two progress lines within one scheme's run (``run_scheme``'s ``progress``)."""


WAIT_PING_S = 15.0
"""With several chats, how often the connected clients ping while others still shake hands (:meth:`_Chats._keep_alive`):
well inside the 60-s idle timeout, which a failing handshake takes to end."""


def client_address(index: int) -> Address:
    """Chat ``index``'s client address: :data:`CLIENT_ADDR` for the first (the one chat of a single-chat run), the
    next ports for the others (one client host, a UDP port per connection, as ``testbed contention``'s workers)."""
    return CLIENT_ADDR[0], CLIENT_ADDR[1] + index


@dataclass
class _Flow:
    """One chat of a run: its client and server connections and what its answer has done so far."""

    index: int
    addr: Address
    offsets: list[float]
    client: _Node
    server: _Node
    outcome: Any = None
    error: Exception | None = None  # (RequestFailed's error)
    arrival: float | None = None  # when the server received its request (its answer's schedule starts there)
    gen: list[float] = field(default_factory=list)
    down_from: int = 0  # the shared down log's length at its arrival (its packets are this flow's ones after it)
    request_time: float = 0.0
    started: bool = False
    lost: str | None = None  # its connection ended before its request went out: why (its handshake failed, say)
    ended_at: float | None = None  # when its statistics came: its packets after that are not counted as its own

    @property
    def stats(self) -> bool:
        """Its generation times came (RequestFinished), or were part of the answer's end."""
        return self.ended_at is not None

    @property
    def over(self) -> bool:
        return self.outcome is not None or self.error is not None or self.lost is not None


class _Chats:
    """``cfg.chats`` chats of one scheme over one channel per direction, in one virtual time (:func:`run_scheme`
    is the run of one, :func:`run_chats` of several).

    Chat ``i`` is a client connection from :func:`client_address` ``(i)`` whose answer follows the demo schedule of
    seed ``cfg.seed + i``; the server side is one :class:`ServerSession` per client address, born from that
    client's first Initial (the daemon's: one connection, and one session, per client). Every datagram travels as
    ``(client address, bytes)``: the down direction delivers to the client of that address, the up direction to the
    server connection of it. The handshakes start together at time 0; every request goes out at the moment the last
    handshake completes and the channel has carried the handshakes' packets away ("go", :meth:`_maybe_go`: ``testbed
    contention`` starts its answers once every connection is open and the path's queues are empty, so that N
    handshakes at once are not what is measured), so the answers start together, as there; with one chat that is the
    moment its own completes, as always. ``cfg.start`` "connected" is contention's ``--start connected``: go at the
    moment the last handshake completes, behind their packets (a flash crowd). ``cfg.cross`` adds cross traffic to
    the traced down direction from time 0 (:class:`_CrossTraffic`); "settled" then waits the settling time only, as
    contention does (a responsive flow keeps the queue from ever emptying)."""

    def __init__(self, scheme: str, cfg: SimConfig) -> None:
        if cfg.chats < 1:  # (no flow: the run would be "done" before it began)
            raise ValueError(f"chats must be >= 1, got {cfg.chats}")
        self.scheme, self.cfg = scheme, cfg
        self.loop = _EventLoop()
        self.cert = sim_cert()  # same handshake length in every process: a seed's run is reproducible to the bit
        self.tokens = answer_tokens(cfg.tokens)
        self.flows: list[_Flow] = []
        self.by_addr: dict[Address, _Flow] = {}
        for i in range(cfg.chats):
            offsets = schedule(len(self.tokens), rate=cfg.rate, seed=cfg.seed + i,
                               first_token_s=cfg.first_token_ms / 1000.0)
            client_config = client_configuration(cadata=self.cert.cert_pem, server_name="localhost")
            client_config.alpn_protocols = list(CHAT_ALPNS)  # generation times apart from FINISHED, as the SDK's
            client = _Node("client", ClientSession(QuicConnection(configuration=client_config)))
            flow = _Flow(i, client_address(i), offsets, client, _Node("server"))
            client.on_events = functools.partial(self._client_events, flow)
            flow.server.on_events = functools.partial(self._server_events, flow)
            self.flows.append(flow)
            self.by_addr[flow.addr] = flow
        self.go: float | None = None  # when the requests went out
        self._go_pending = False
        self._settle_s = max(GO_SETTLE_S, 4 * cfg.delay_ms / 1000.0)
        self.down, self.up = _channel(cfg, self.loop, self._to_client, self._to_server)
        if cfg.start not in START_MODES:
            raise ValueError(f"start {cfg.start!r}: one of {', '.join(START_MODES)}")
        self.cross: _CrossTraffic | None = None
        if cfg.cross:  # (from time 0, before the handshakes: testbed contention starts its senders first)
            if not isinstance(self.down, _TraceWire):
                raise ValueError("cross traffic needs a traced down direction (the fixed channel has no queue)")
            self.cross = _CrossTraffic(self.loop, self.down, cfg.cross, ack_delay=cfg.delay_ms / 1000.0,
                                       seed=cfg.seed)
        self.answers_end: float | None = None  # when every answer had ended or failed (the GEN_TIMES tail follows)
        for flow in self.flows:
            sess = flow.client.session
            assert isinstance(sess, ClientSession)
            sess.quic.connect(SERVER_ADDR, now=0.0)
        for flow in self.flows:
            self.loop.at(0.0, functools.partial(self._service, flow, flow.client))
        if len(self.flows) > 1:
            self.loop.at(WAIT_PING_S, self._keep_alive)

    # -- the wire --------------------------------------------------------------------------------------------
    def _service(self, flow: _Flow, node: _Node) -> None:
        sess = node.session
        if sess is None:
            return
        loop = self.loop
        now = loop.now
        wire = self.down if node is flow.server else self.up
        wire.send([data for data, _addr in sess.datagrams_to_send(now)], now, flow.addr)
        t = sess.get_timer()
        if t != node.timer_at:
            node.timer_at = t
            node.timer_gen += 1
            if t is not None:
                gen = node.timer_gen
                # fire 1 us late, as real timers do: aioquic's loss timer compares `now - delay` with a send
                # time, and at exactly the deadline float rounding can leave it armed at the same instant
                loop.at(max(t, now) + TIMER_SLACK, functools.partial(self._fire_timer, flow, node, gen))

    def _fire_timer(self, flow: _Flow, node: _Node, gen: int) -> None:
        if gen != node.timer_gen or node.session is None:
            return
        node.timer_at = None
        node.on_events(node.session.handle_timer(self.loop.now))
        self._service(flow, node)

    def _to_client(self, addr: Address, data: bytes) -> None:
        flow = self.by_addr[addr]
        node = flow.client
        assert node.session is not None
        node.on_events(node.session.receive_datagram(data, SERVER_ADDR, self.loop.now))
        self._service(flow, node)

    def _to_server(self, addr: Address, data: bytes) -> None:
        flow = self.by_addr[addr]
        node = flow.server
        if node.session is None:  # the server connection is born from the client's first Initial
            header = pull_quic_header(Buffer(data=data), host_cid_length=8)
            quic = QuicConnection(
                configuration=server_configuration(cert=self.cert),  # (it offers ALPN_GEN_TIMES first)
                original_destination_connection_id=header.destination_cid,
            )
            node.session = ServerSession(quic)
        node.on_events(node.session.receive_datagram(data, addr, self.loop.now))
        self._service(flow, node)

    # -- the answers -----------------------------------------------------------------------------------------
    def _server_events(self, flow: _Flow, evs: list[SessionEvent]) -> None:
        sess = flow.server.session
        assert isinstance(sess, ServerSession)
        for ev in evs:
            if isinstance(ev, RequestReceived):
                sess.accept(ev.stream_id)
                arrival = self.loop.now
                flow.arrival = arrival
                flow.down_from = len(self.down.sent)
                for i, (tok, off) in enumerate(zip(self.tokens, flow.offsets, strict=True)):
                    last = i == len(self.tokens) - 1
                    self.loop.at(arrival + off, functools.partial(self._push, flow, ev.stream_id, tok, last))

    def _push(self, flow: _Flow, stream_id: int, tok: str, last: bool) -> None:
        sess = flow.server.session
        assert isinstance(sess, ServerSession)
        now = self.loop.now
        flow.gen.append(now)
        sess.push(stream_id, tok, now)
        if last:
            sess.finish(stream_id)
        self._service(flow, flow.server)

    def _client_events(self, flow: _Flow, evs: list[SessionEvent]) -> None:
        for ev in evs:
            # the answer's end: its text whole and checked (the generation times that follow it, ALPN_GEN_TIMES, are
            # the client's statistics; the run's come from the pushes it made itself)
            if isinstance(ev, AnswerComplete | RequestFinished):
                flow.outcome = flow.outcome or ev.result
                if isinstance(ev, RequestFinished):
                    flow.ended_at = self.loop.now
            elif isinstance(ev, RequestFailed):
                flow.error = ev.error
            elif isinstance(ev, ConnectionEnded) and not flow.started:
                flow.lost = ev.reason or f"error code {ev.error_code}"
        self._maybe_go()

    def _maybe_go(self) -> None:
        """Every request at once, once every client may send one (the handshakes complete inside the loop) or its
        connection ended without (its request is never sent; the others go): at that moment with one chat (the
        single-chat run's timing), after :data:`GO_SETTLE_S` with several, and later while a traced direction still
        queues their handshakes' packets (:meth:`_settled`). Meanwhile the connected clients ping every
        :data:`WAIT_PING_S` (:meth:`_keep_alive`), so that a handshake that takes long or fails does not let them
        reach their idle timeout first."""
        if self.go is not None or self._go_pending:
            return
        for flow in self.flows:
            sess = flow.client.session
            assert isinstance(sess, ClientSession)
            if sess.datagrams_ok is None and flow.lost is None:
                return
        if len(self.flows) == 1 or self.cfg.start == "connected":  # (a flash crowd: behind the handshakes' packets)
            self._go()
            return
        self._go_pending = True
        self.loop.at(self.loop.now + self._settle_s, self._settled)

    def _settled(self) -> None:
        """Go, unless a traced direction still queues packets: then again a settling time later. With cross traffic
        the queues need not empty (contention's :func:`.contention.settle`): the settling time only."""
        if not self.cfg.cross and any(isinstance(w, _TraceWire) and w.link.backlog for w in (self.down, self.up)):
            self.loop.at(self.loop.now + self._settle_s, self._settled)
            return
        self._go()

    def _keep_alive(self) -> None:
        if self.go is not None:
            return
        for flow in self.flows:
            sess = flow.client.session
            assert isinstance(sess, ClientSession)
            if sess.datagrams_ok is not None and not sess.closed:
                sess.quic.send_ping(0)
                self._service(flow, flow.client)
        self.loop.at(self.loop.now + WAIT_PING_S, self._keep_alive)

    def _go(self) -> None:
        self.go = now = self.loop.now
        for flow in self.flows:
            sess = flow.client.session
            assert isinstance(sess, ClientSession)
            if flow.lost is not None:
                continue
            flow.started = True
            flow.request_time = now
            request = Request(messages=[{"role": "user", "content": "Why do chatbots stall on trains?"}],
                              scheme=self.scheme)
            sess.start_request(request, now)
            self._service(flow, flow.client)

    # -- the run ---------------------------------------------------------------------------------------------
    def rendered(self) -> int:
        """Tokens rendered so far over every chat (an ended answer's request has left its session: its outcome's)."""
        n = 0
        for f in self.flows:
            if f.outcome is not None:
                n += sum(1 for t in f.outcome.render_times if t is not None)
            elif isinstance(f.client.session, ClientSession):
                n += sum(len(r.receiver.render_times) for r in f.client.session.requests.values())
        return n

    def run(self, progress: Callable[[str], None] | None, progress_every_s: float,
            clock: Callable[[], float]) -> None:
        """Until every answer ended (or failed), then the GEN_TIMES tail; SimError past ``cfg.max_virtual_s``."""
        loop, flows = self.loop, self.flows
        next_report = clock() + progress_every_s
        total = len(self.tokens) * len(flows)

        def tick() -> None:
            nonlocal next_report
            now = clock()
            if progress is None or now < next_report:  # (None: never called; the check keeps mypy's narrowing)
                return
            next_report = now + progress_every_s
            generated = sum(len(f.gen) for f in flows)
            progress(f"{self.scheme}: {generated}/{total} tokens generated, {self.rendered()} rendered, "
                     f"{loop.now:.1f} s of virtual time")

        def done() -> bool:
            return all(f.over for f in flows)

        if progress is None:
            loop.run(done, self.cfg.max_virtual_s)
        else:
            loop.run(done, self.cfg.max_virtual_s, tick=tick)
        self.answers_end = loop.now
        if any(f.outcome is not None and not f.stats for f in flows):
            # the generation times follow the answer (ALPN_GEN_TIMES): their bytes count, as when FINISHED carried
            # them, and the answer's times (its end included) are taken already
            with contextlib.suppress(SimError):
                loop.run_on(lambda: all(f.stats or f.outcome is None for f in flows), loop.now + STATS_TAIL_S)

    def result(self, flow: _Flow) -> SimRun:
        """The run of one finished chat (its outcome is in)."""
        outcome = flow.outcome
        assert outcome is not None and flow.arrival is not None
        gen = flow.gen
        render = outcome.render_times
        base_delay = self.cfg.delay_ms / 1000.0
        addr, end = flow.addr, flow.ended_at if flow.ended_at is not None else math.inf
        # its own packets from its request's arrival to its statistics' (the others' answers may go on after)
        down_log = [p for p in self.down.sent[flow.down_from :] if p.meta == addr and p.arrival <= end]
        wire_bytes = sum(p.size for p in down_log)
        deliveries = [(p.arrival, p.delivery) for p in down_log if p.delivery is not None]
        stats = metrics.summarize(gen, render, base_delay=base_delay, request_time=flow.request_time,
                                  wire_bytes=wire_bytes)
        oracle = metrics.stall_ratio(gen, metrics.oracle_render_times(gen, deliveries), base_delay)
        return SimRun(
            scheme=self.scheme,
            gen=gen,
            render=render,
            request_time=flow.request_time,
            request_arrival=flow.arrival,
            base_delay=base_delay,
            wire_bytes=wire_bytes,
            deliveries=deliveries,
            digest_ok=outcome.digest_ok,
            stats=stats,
            oracle_stall_ratio=oracle,
            packets_down=len(down_log),
            packets_lost_down=sum(1 for p in down_log if _dropped(p)),
            packets_lost_up=sum(1 for p in self.up.sent if p.meta == addr and _dropped(p)),
        )


def run_scheme(scheme: str, cfg: SimConfig, progress: Callable[[str], None] | None = None, *,
               progress_every_s: float = RUN_PROGRESS_S, clock: Callable[[], float] = time.monotonic) -> SimRun:
    """Simulate one request of ``cfg.tokens`` tokens with ``scheme``; raises SimError if it never completes.

    ``progress`` (default ``cfg.progress``) is told, every ``progress_every_s`` of ``clock`` (wall time), how far
    the run is: tokens generated and rendered, and the virtual time. Progress by scheme and seed alone said
    nothing inside a run (``--tokens 100000 --rate 10000 --schemes chatterbox``: 49 s without a word). It only
    reads the state: a run with it is the same run as without.

    One chat whatever ``cfg.chats`` says (:func:`run_chats` runs several)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    if progress is None:
        progress = cfg.progress
    if cfg.chats != 1:
        cfg = SimConfig(**{**cfg.__dict__, "chats": 1})
    sim = _Chats(scheme, cfg)
    try:
        sim.run(progress, progress_every_s, clock)
    except SimError as exc:  # the cap: named by scheme, as every other failure is
        raise SimError(f"{scheme}: {exc}") from None
    flow = sim.flows[0]
    if flow.error is not None:
        raise SimError(f"{scheme}: request failed: {flow.error}")
    if flow.lost is not None:
        raise SimError(f"{scheme}: connection closed before its request: {flow.lost}")
    if flow.outcome is None:
        raise SimError(f"{scheme}: simulation ended without finishing the request")
    return sim.result(flow)


@dataclass
class FlowRun:
    """One chat of a :func:`run_chats` run: its :class:`SimRun`, or why it did not finish."""

    index: int
    seed: int
    addr: Address
    run: SimRun | None
    error: str | None = None

    @property
    def finished(self) -> bool:
        """The whole answer rendered, its digest verified: the flow counts in the stall and TTFT percentiles."""
        r = self.run
        return r is not None and r.digest_ok and r.stats.tokens_rendered == r.stats.tokens_sent == len(r.gen)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"flow": self.index, "seed": self.seed, "port": self.addr[1], "finished": self.finished}
        r = self.run
        if r is None:
            return {**d, "error": self.error}
        d.update(r.stats.to_dict())
        render = [t for t in r.render if t is not None]
        # as the SDK measures it (testbed contention's figure): the base delay estimated as the smallest render minus
        # generation difference, which takes in the link's least transmission time (this run's uses the delay alone)
        sdk = metrics.stall_ratio(r.gen, render, estimated_base_delay(r.gen, render)) if render else math.nan
        d.update(
            sdk_stall_ratio=_nan_none(sdk),
            digest_verified=r.digest_ok, wire_bytes=r.wire_bytes, oracle_stall_ratio=_nan_none(r.oracle_stall_ratio),
            packets_down=r.packets_down, packets_lost_down=r.packets_lost_down, packets_lost_up=r.packets_lost_up,
            request_time=r.request_time, request_arrival=r.request_arrival,
            goodput_tps=(len(render) / (render[-1] - r.request_time) if render and render[-1] > r.request_time
                         else 0.0),
        )
        return d


def _nan_none(x: float) -> float | None:
    return None if math.isnan(x) else x


@dataclass
class ChatsRun:
    """One scheme, one seed, ``cfg.chats`` chats sharing the channel: each flow and each direction's figures."""

    scheme: str
    seed: int
    flows: list[FlowRun]
    down: dict[str, Any]
    up: dict[str, Any]
    go: float | None


def direction_summary(wire: _Wire | _TraceWire, since: float, until: float | None = None) -> dict[str, Any]:
    """One direction's log from ``since`` (the requests' "go") on, as ``testbed contention``'s
    :func:`~tokenwire.testbed.contention.down_link_summary` reads the emulator's: packets offered, dropped by the
    full queue (``dropped``) or by the loss model (``lost``), bytes delivered, queueing (sojourn, arrival to the start
    of transmission) of the delivered packets, and for a traced direction ``utilisation``: delivered bytes over the
    trace's capacity from ``since`` to the last delivered packet's departure. No queue on the fixed channel: sojourn
    and utilisation are None there.

    Cross traffic's packets (``data`` None: :class:`_CrossTraffic`) count as contention's do, up to ``until`` (the
    answers' end: it goes on through the statistics' tail, which would stretch the span), and then the keys
    ``chats_delivered_bytes`` and ``chats_utilisation`` (the chats' share) and ``cross_delivered_bytes`` appear."""
    packets = lost = dropped = delivered_bytes = offered_bytes = cross_bytes = 0
    cross_seen = False
    last_departure: float | None = None
    sojourns: list[float] = []
    for p in wire.sent:
        if p.data is None:
            cross_seen = True
            if until is not None and p.arrival >= until:
                continue
        if p.arrival < since:
            continue
        packets += 1
        offered_bytes += p.size
        if p.fate == "lost":
            lost += 1
        elif p.fate not in ("queued", "delivered"):
            dropped += 1
        elif p.delivery is not None:
            delivered_bytes += p.size
            if p.data is None:
                cross_bytes += p.size
            if p.departure is not None:
                last_departure = p.departure if last_departure is None else max(last_departure, p.departure)
            if p.sojourn is not None:
                sojourns.append(p.sojourn * 1000.0)
    util = None
    capacity = 0
    if isinstance(wire, _TraceWire) and wire.link.trace is not None and last_departure is not None:
        start = wire.link.start
        capacity = wire.link.trace.bytes_between((since - start) * 1000.0, (last_departure - start) * 1000.0)
        util = delivered_bytes / capacity if capacity else None
    out = {
        "packets": packets, "offered_bytes": offered_bytes, "dropped": dropped, "lost": lost,
        "delivered_bytes": delivered_bytes, "utilisation": util,
        "sojourn_ms_p50": metrics.percentile(sojourns, 50.0) if sojourns else None,
        "sojourn_ms_p99": metrics.percentile(sojourns, 99.0) if sojourns else None,
    }  # fmt: skip
    if cross_seen:  # (absent without cross traffic: such a run's JSON is what it always was)
        chats = delivered_bytes - cross_bytes
        out.update(chats_delivered_bytes=chats, cross_delivered_bytes=cross_bytes,
                   chats_utilisation=chats / capacity if capacity else None)
    return out


def run_chats(scheme: str, cfg: SimConfig, progress: Callable[[str], None] | None = None, *,
              progress_every_s: float = RUN_PROGRESS_S, clock: Callable[[], float] = time.monotonic) -> ChatsRun:
    """``cfg.chats`` chats of ``scheme`` at once over one channel per direction (:class:`_Chats`). A chat that fails
    (its connection dies, or the run reaches ``cfg.max_virtual_s`` before its answer ended) is a failed flow of the
    result, not an exception: the others' figures stand."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    if progress is None:
        progress = cfg.progress
    sim = _Chats(scheme, cfg)
    cap: str | None = None
    try:
        sim.run(progress, progress_every_s, clock)
    except SimError as exc:
        cap = str(exc)
    flows = []
    for f in sim.flows:
        seed = cfg.seed + f.index
        if f.outcome is not None:
            flows.append(FlowRun(f.index, seed, f.addr, sim.result(f)))
        else:
            why = (f"request failed: {f.error}" if f.error is not None else
                   f"connection closed before its request: {f.lost}" if f.lost is not None else
                   cap or "simulation ended without finishing the request")
            flows.append(FlowRun(f.index, seed, f.addr, None, why))
    since = sim.go if sim.go is not None else 0.0
    return ChatsRun(scheme, cfg.seed, flows, direction_summary(sim.down, since, sim.answers_end),
                    direction_summary(sim.up, since), sim.go)


def _offsets(n: int, *, rate: float, seed: int, first_token_s: float) -> Iterator[float]:
    """:func:`~tokenwire.daemon.demo_upstream.schedule`'s offsets one at a time, the same draws bit for bit (a
    test holds them to it), in O(1) memory: the whole list of ``--tokens 50000000`` took 97 s and 2 GB just to
    be refused. Its keyword defaults (jitter, pauses) are read from it, not copied."""
    kw = schedule.__kwdefaults__ or {}
    cv, pause_prob, pause_s = kw["cv"], kw["pause_prob"], kw["pause_s"]
    rng = random.Random(f"demo-schedule:{seed}")
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)
    t = first_token_s
    for i in range(n):
        if i:
            t += rng.gammavariate(shape, 1.0) * scale
            if rng.random() < pause_prob:
                t += rng.uniform(*pause_s)
        yield t


def earliest_end_s(cfg: SimConfig, stop_after: float | None = None) -> float:
    """Virtual time at which the answer of ``cfg.seed`` ends on a lossless channel: the handshake's round trip,
    the request's one way, the seed's last generation offset and that token's one way (exact: no bandwidth
    model). A run cannot finish before; past ``cfg.max_virtual_s`` it cannot finish at all.

    The schedule is drawn one offset at a time, and the drawing stops once past ``stop_after`` (default
    ``cfg.max_virtual_s``): the value is then a lower bound, past it, not the end (which no caller needs)."""
    limit = cfg.max_virtual_s if stop_after is None else stop_after
    fixed = 4 * cfg.delay_ms / 1000.0
    last = cfg.first_token_ms / 1000.0
    for last in _offsets(cfg.tokens, rate=cfg.rate, seed=cfg.seed, first_token_s=cfg.first_token_ms / 1000.0):
        if fixed + last > limit:
            break
    return fixed + last


END_SD_MARGIN = 20.0
"""Standard deviations of the answer's end (over seeds) below the cap that spare the per-seed check: a sum of
gamma gaps and bounded pauses beyond 20 of them has a probability under 1e-18, even for 2 tokens; should one seed
get there all the same, its run fails at the cap and is reported as a failed run, as any other."""


def end_spread(cfg: SimConfig) -> tuple[float, float]:
    """Mean and standard deviation, over seeds, of :func:`earliest_end_s` in closed form (O(1)): the gaps are
    gamma draws of mean 1/rate and variance (cv/rate)^2, plus a uniform pause with probability pause_prob."""
    kw = schedule.__kwdefaults__ or {}
    cv, p, (a, b) = kw["cv"], kw["pause_prob"], kw["pause_s"]
    gaps = max(0, cfg.tokens - 1)
    pause_mean = p * (a + b) / 2
    pause_var = p * (a * a + a * b + b * b) / 3 - pause_mean**2
    mean = 4 * cfg.delay_ms / 1000.0 + cfg.first_token_ms / 1000.0 + gaps * (1.0 / cfg.rate + pause_mean)
    return mean, math.sqrt(gaps * ((cv / cfg.rate) ** 2 + pause_var))


def first_seed_past_cap(cfg: SimConfig, runs: int,
                        progress: Callable[[int], None] | None = None) -> tuple[int, float] | None:
    """The first of ``runs`` seeds (from ``cfg.seed``) whose answer cannot end within ``cfg.max_virtual_s``, with
    its :func:`earliest_end_s` (past the cap); None when every seed's can.

    O(1) where the closed form puts every seed's end far below the cap (:data:`END_SD_MARGIN`), the usual case:
    ``--runs 1000000`` spent over 30 s silent drawing each seed's schedule. Otherwise each seed is drawn (each
    stopping at the cap), and ``progress`` is told the seeds checked so far now and then."""
    mean, sd = end_spread(cfg)
    if mean + END_SD_MARGIN * sd <= cfg.max_virtual_s:
        return None
    for k in range(runs):
        seed = cfg.seed + k
        need = earliest_end_s(SimConfig(**{**cfg.__dict__, "seed": seed}))
        if need > cfg.max_virtual_s:
            return seed, need
        if progress is not None:
            progress(k + 1)
    return None


def union_oracle(runs: list[SimRun]) -> float:
    """Oracle stall ratio over the union of every scheme's delivered packets (aligned on request arrival), on
    each scheme's generation schedule, and never above a scheme's own oracle: a lower bound, as
    ``testbed compare``'s (:func:`tokenwire.testbed.compare.union_oracle` says why both are candidates)."""
    deliveries: list[tuple[float, float]] = []
    for r in runs:
        deliveries += [(s - r.request_arrival, a - r.request_arrival) for s, a in r.deliveries]
    candidates = [r.oracle_stall_ratio for r in runs]
    for r in runs:
        gen = [g - r.request_arrival for g in r.gen]
        candidates.append(metrics.stall_ratio(gen, metrics.oracle_render_times(gen, deliveries), r.base_delay))
    return min((c for c in candidates if not math.isnan(c)), default=math.nan)


SUMMARY_KEYS = ("stall_ratio", "ttft_ms", "p99_token_delay_ms", "bytes_per_token", "tokens_sent", "tokens_rendered")


def compare(
    schemes: list[str],
    cfg: SimConfig,
    runs: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every scheme for ``runs`` seeds (cfg.seed, cfg.seed+1, ...); the JSON-ready summary. ``progress`` is
    told each scheme and seed as it starts, ``cfg.progress`` how far a long run is (:func:`run_scheme`). With
    ``cfg.chats`` > 1, :func:`compare_chats`'s summary."""
    from tokenwire.daemon.cli import repeated

    if cfg.chats != 1:
        return compare_chats(schemes, cfg, runs, progress)

    twice = sorted(repeated(schemes))
    if twice:  # the summary is keyed by scheme: its runs would be counted twice
        raise ValueError(f"scheme(s) {', '.join(twice)} listed twice")
    per_scheme: dict[str, list[SimRun]] = {s: [] for s in schemes}
    failed: dict[str, list[dict[str, Any]]] = {s: [] for s in schemes}
    oracles: list[float] = []
    for k in range(runs):
        seed_cfg = SimConfig(**{**cfg.__dict__, "seed": cfg.seed + k})
        batch = []
        for s in schemes:
            if progress:
                progress(f"seed {seed_cfg.seed}: {s}")
            try:
                r = run_scheme(s, seed_cfg)
            except SimError as exc:
                # On a harsh enough channel a connection dies (QUIC's idle timeout during loss backoff): that
                # is a result to report, not a reason to throw away every other run (it was a traceback).
                failed[s].append({"seed": seed_cfg.seed, "error": str(exc)})
                continue
            per_scheme[s].append(r)
            batch.append(r)
        if batch:
            oracles.append(union_oracle(batch))

    def mean(xs: list[float]) -> float:
        xs = [x for x in xs if x is not None and not math.isnan(x)]
        return statistics.fmean(xs) if xs else math.nan

    out_schemes: dict[str, Any] = {}
    for s, rs in per_scheme.items():
        d: dict[str, Any] = {k: mean([getattr(r.stats, k) for r in rs]) for k in SUMMARY_KEYS}
        d["tokens_sent"] = round(d["tokens_sent"]) if rs else 0
        d["tokens_rendered"] = round(d["tokens_rendered"]) if rs else 0
        d["p50_token_delay_ms"] = mean([r.stats.p50_token_delay_ms for r in rs])
        d["longest_stall_ms"] = mean([r.stats.longest_stall_ms for r in rs])
        d["oracle_stall_ratio"] = mean([r.oracle_stall_ratio for r in rs])
        d["digest_ok"] = all(r.digest_ok for r in rs) if rs else None  # None: no run finished
        d["runs_finished"] = len(rs)
        d["failed_runs"] = failed[s]  # averages above are over the runs that finished
        d["down_loss_rate"] = mean([r.packets_lost_down / max(1, r.packets_down) for r in rs])
        d["per_seed_stall_ratio"] = [r.stats.stall_ratio for r in rs]
        out_schemes[s] = d
    # The oracle of a run is computed on that run's own delivered packets (a scheme that sends more packets
    # gives itself more chances). The headline value is the one on the reference scheme's schedule
    # (chatterbox when it ran); every scheme carries its own, and the union of all schedules is reported too.
    reference = "chatterbox" if "chatterbox" in out_schemes else schemes[0]
    return {
        "schemes": out_schemes,
        "oracle": {
            "stall_ratio": out_schemes[reference]["oracle_stall_ratio"],
            "reference_scheme": reference,
            "per_scheme": {s: d["oracle_stall_ratio"] for s, d in out_schemes.items()},
            "union_stall_ratio": mean(oracles),
        },
        "config": {**cfg.to_dict(), "runs": runs, "schemes": schemes},
    }


def chats_run_summary(run: ChatsRun) -> dict[str, Any]:
    """One run (scheme, seed) of several chats, as ``testbed contention``'s :func:`.contention.run_summary`: its
    flows, their stall and TTFT percentiles over the finished ones, Jain's index of goodput, bytes per token (the
    chats' IP bytes down from their requests' arrival over the tokens rendered) and both directions' figures."""
    from .contention import flows_summary, jain_index

    rows = [f.to_dict() for f in run.flows]
    sent = sum(r.get("wire_bytes") or 0 for r in rows)
    delivered = sum(r.get("tokens_rendered") or 0 for r in rows)
    return {
        "seed": run.seed,
        "flows": rows,
        **flows_summary(rows),
        "jain_goodput": jain_index(r.get("goodput_tps", 0.0) for r in rows),
        "tokens_delivered": delivered,
        "bytes_per_token": sent / delivered if delivered else None,
        "go_s": run.go,
        "link": run.down,
        "up_link": run.up,
    }


def chats_scheme_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A scheme over its runs (:func:`chats_run_summary`'s), as contention's :func:`.contention.scheme_summary`:
    per-flow percentiles pooled over every finished flow of every run, the runs' means of the per-run figures."""
    from .contention import mean_known, percentile

    flows = [f for r in runs for f in r["flows"]]
    done = [f for f in flows if f["finished"]]
    return {
        "stall_ratio_p50": percentile((f.get("stall_ratio") for f in done), 0.5),
        "stall_ratio_p90": percentile((f.get("stall_ratio") for f in done), 0.9),
        "stall_ratio_mean": mean_known(f.get("stall_ratio") for f in done),
        "sdk_stall_ratio_p50": percentile((f.get("sdk_stall_ratio") for f in done), 0.5),
        "sdk_stall_ratio_p90": percentile((f.get("sdk_stall_ratio") for f in done), 0.9),
        "ttft_ms_p50": percentile((f.get("ttft_ms") for f in done), 0.5),
        "ttft_ms_p90": percentile((f.get("ttft_ms") for f in done), 0.9),
        "bytes_per_token": mean_known(r["bytes_per_token"] for r in runs),
        "utilisation": mean_known(r["link"]["utilisation"] for r in runs),
        "sojourn_ms_p50": mean_known(r["link"]["sojourn_ms_p50"] for r in runs),
        "sojourn_ms_p99": mean_known(r["link"]["sojourn_ms_p99"] for r in runs),
        "dropped_down": mean_known(r["link"]["dropped"] for r in runs),
        "lost_down": mean_known(r["link"]["lost"] for r in runs),
        "packets_down": mean_known(r["link"]["packets"] for r in runs),
        "jain_goodput": mean_known(r["jain_goodput"] for r in runs),
        "flows": len(flows),
        "flows_finished": len(done),
        "digests_verified": sum(r["digests_verified"] for r in runs),
        "per_run_stall_ratio_p50": [r["stall_ratio_p50"] for r in runs],
        **({"chats_utilisation": mean_known(r["link"]["chats_utilisation"] for r in runs),
            "cross_delivered_bytes": mean_known(r["link"]["cross_delivered_bytes"] for r in runs)}
           if runs and all("chats_utilisation" in r["link"] for r in runs) else {}),
    }


def compare_chats(
    schemes: list[str],
    cfg: SimConfig,
    runs: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every scheme for ``runs`` seeds, ``cfg.chats`` chats at once each (:func:`run_chats`): ``testbed
    contention``'s document in virtual time. ``schemes`` (each scheme's :func:`chats_scheme_summary`),
    ``comparison`` (chatterbox against each other scheme, :func:`.contention.comparison_block`), ``runs`` (per
    scheme, each run's :func:`chats_run_summary` with every flow) and ``config``. Run seed ``s`` gives chat ``i``
    the demo schedule of seed ``s + i`` and seeds the channel's loss models with ``s``, as contention's runs do."""
    from tokenwire.daemon.cli import repeated

    from .contention import comparison_block

    twice = sorted(repeated(schemes))
    if twice:  # the summary is keyed by scheme: its runs would be counted twice
        raise ValueError(f"scheme(s) {', '.join(twice)} listed twice")
    per_scheme: dict[str, list[dict[str, Any]]] = {s: [] for s in schemes}
    for k in range(runs):
        seed_cfg = SimConfig(**{**cfg.__dict__, "seed": cfg.seed + k})
        for s in schemes:
            if progress:
                progress(f"seed {seed_cfg.seed}: {s}, {cfg.chats} chats")
            per_scheme[s].append(chats_run_summary(run_chats(s, seed_cfg)))
    summary = {s: chats_scheme_summary(rs) for s, rs in per_scheme.items()}
    return {
        "schemes": summary,
        "comparison": comparison_block(summary),
        "runs": per_scheme,
        "config": {**cfg.to_dict(), "runs": runs, "schemes": schemes},
    }
