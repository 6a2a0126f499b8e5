"""In-memory QUIC connection pair for tests: real aioquic connections and sessions, a hand-driven wire."""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable

from aioquic.buffer import Buffer
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import pull_quic_header

from tokenwire.transport.client_session import ClientSession
from tokenwire.transport.frames import Request
from tokenwire.transport.server_session import ServerSession
from tokenwire.transport.tls import client_configuration, dev_cert, server_configuration

CLIENT = ("10.0.0.2", 1234)
SERVER = ("10.0.0.1", 4433)


class Pair:
    """Client and server sessions; ``exchange`` moves datagrams until both sides are quiet."""

    def __init__(self, *, client_datagrams: bool = True, datagram_limit: int | None = None) -> None:
        cfg = client_configuration(cadata=dev_cert().cert_pem, server_name="localhost")
        if datagram_limit is not None:  # the client's max_datagram_frame_size transport parameter
            cfg.max_datagram_frame_size = datagram_limit
        if not client_datagrams:
            cfg.max_datagram_frame_size = None
        self.client = ClientSession(QuicConnection(configuration=cfg))
        self.server: ServerSession | None = None
        self.now = 0.0
        self.client_events: list = []
        self.server_events: list = []
        self.down_batches: list[list[bytes]] = []  # UDP datagrams per server flush
        self.client.quic.connect(SERVER, now=self.now)

    def _server_for(self, data: bytes) -> ServerSession:
        if self.server is None:
            header = pull_quic_header(Buffer(data=data), host_cid_length=8)
            quic = QuicConnection(
                configuration=server_configuration(),
                original_destination_connection_id=header.destination_cid,
            )
            self.server = ServerSession(quic)
        return self.server

    def exchange(
        self,
        rounds: int = 50,
        dt: float = 0.005,
        drop_down: Callable[[bytes], bool] = lambda d: False,
        on_server_event: Callable | None = None,
        quiet_after: float = 5.0,
    ) -> None:
        """``quiet_after``: return once no timer is due within this many seconds (only idle timers left)."""
        for _ in range(rounds):
            self.now += dt
            moved = False
            for data, _ in self.client.datagrams_to_send(self.now):
                moved = True
                srv = self._server_for(data)
                evs = srv.receive_datagram(data, CLIENT, self.now)
                self.server_events += evs
                if on_server_event:
                    for ev in evs:
                        on_server_event(ev)
            if self.server is not None:
                batch = []
                for data, addr in self.server.datagrams_to_send(self.now):
                    moved = True
                    batch.append(data)
                    # (only what is sent to the client's address reaches it: a path validation's challenge to a
                    # forged address reaches nobody)
                    if addr == CLIENT and not drop_down(data):
                        self.client_events += self.client.receive_datagram(data, SERVER, self.now)
                if batch:
                    self.down_batches.append(batch)
            for sess, sink in ((self.client, self.client_events), (self.server, self.server_events)):
                if sess is None:
                    continue
                t = sess.get_timer()
                if t is not None and t <= self.now:
                    sink += sess.handle_timer(self.now)
                    moved = True
            if not moved:
                # jump to the next timer
                timers = [s.get_timer() for s in (self.client, self.server) if s is not None]
                timers = [t for t in timers if t is not None]
                if not timers or min(timers) > self.now + quiet_after:
                    return  # quiet: only the idle timeout is left
                self.now = max(self.now, min(timers) - dt)


def accepted_chat(scheme: str = "chatterbox") -> tuple[Pair, ServerSession, int]:
    """A connected pair whose client asked for an answer with ``scheme`` and whose server accepted it (nothing of the
    answer sent yet): (pair, server session, the request's stream id)."""
    pair = Pair()
    pair.exchange(rounds=40)
    sid = pair.client.start_request(Request(messages=[{"role": "user", "content": "x"}], scheme=scheme), pair.now)
    pair.exchange(rounds=20)
    server = pair.server
    assert server is not None
    server.accept(sid)
    return pair, server, sid


def set_rtt(server: ServerSession, *, srtt: float, floor: float) -> None:
    """aioquic's view of the server's path: its minimum round trip ``floor`` and its smoothed one ``srtt`` (the
    queue the session's rules read is their difference)."""
    loss = server.quic._loss
    loss._rtt_initialized, loss._rtt_min, loss._rtt_smoothed = True, floor, srtt


def _next_time(at: float, now: float, just_fired: bool) -> float:
    """When to serve a session's timer due at ``at``: now at the earliest, and after now if its timer was just served
    at now and still says ``at <= now`` (aioquic's loss timer can stay at a time it has handled, by float rounding: a
    review found the driver serving it at the same ``now`` for ever)."""
    return max(at, now + 1e-6) if just_fired and at <= now else max(at, now)


def run_answer(pair: Pair, server: ServerSession, sid: int, tokens: int, *, start: float, until: float,
               down: Callable[[float], float | None], up_s: float, finish: bool = False,
               on_push: Callable[[float], None] | None = None,
               on_to_client: Callable[[float], None] | None = None) -> None:
    """``tokens`` tokens pushed at 30/s from ``start`` (then the answer finished, with ``finish``), both sessions
    driven through a wire whose delay from the server is ``down(now)`` at a packet's sending (None: that packet is
    lost) and ``up_s`` to it; timers serve until ``until``. A deadline that moved earlier than the timer event already
    pending gets an event of its own (a session's timer may be called early: it acts only on what is due)."""
    events: list[tuple[float, int, str, object]] = []
    seq = itertools.count()

    def pending(kind: str) -> float:
        return min((e[0] for e in events if e[2] == kind), default=math.inf)

    for n in range(tokens):
        heapq.heappush(events, (start + 0.033 * n, next(seq), "push", n))
    client = pair.client
    while events:
        now, _, kind, x = heapq.heappop(events)
        if kind == "push":
            assert isinstance(x, int)
            if on_push is not None:
                on_push(now)
            server.push(sid, f"t{x} ", now)
            if finish and x == tokens - 1:
                server.finish(sid)
        elif kind == "to_client":
            assert isinstance(x, bytes)
            client.receive_datagram(x, SERVER, now)
            if on_to_client is not None:
                on_to_client(now)
        elif kind == "to_server":
            assert isinstance(x, bytes)
            server.receive_datagram(x, CLIENT, now)
        elif kind == "server_timer":
            server.handle_timer(now)
        else:
            client.handle_timer(now)
        if kind in ("push", "to_server", "server_timer"):
            for data, _ in server.datagrams_to_send(now):
                delay = down(now)
                if delay is not None:
                    heapq.heappush(events, (now + delay, next(seq), "to_client", data))
            at = server.get_timer()
            if at is not None and at < until and at < pending("server_timer"):
                heapq.heappush(events, (_next_time(at, now, kind == "server_timer"), next(seq), "server_timer", None))
        if kind in ("to_client", "client_timer"):
            for data, _ in client.datagrams_to_send(now):
                heapq.heappush(events, (now + up_s, next(seq), "to_server", data))
            at = client.get_timer()
            if at is not None and at < until and at < pending("client_timer"):
                heapq.heappush(events, (_next_time(at, now, kind == "client_timer"), next(seq), "client_timer", None))
