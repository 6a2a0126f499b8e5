"""``tokenwire testbed kv --virtual``: the KV evaluation in virtual time, hundreds of rounds in minutes.

The namespace run (:mod:`.kv_eval`) costs 15 minutes for 30 rounds of six controllers, and its attainment moves
5-10 points between seeds at that size, too little to tell two controllers apart. This backend runs the same
stack: aioquic ``QuicConnection`` objects in the real :class:`KVServerSession` / :class:`KVClientSession`, the
real :class:`KVController` and forecasters (ONNX or EWMA), the daemon's :class:`KVService` for the encoded
chunks of the real context. Only the clock and the path are simulated: the path is two emulator
:class:`~.link.Link` cores (trace, queue, one-way delay, exactly the namespace emulator's delivery model), and
the client's decode takes ``elements / decode rate`` (50 M elements/s: measured 55 ms per 256-token SmolLM2
chunk in the namespace runs; ``decode_rate`` sets another, which the client then reports in its KV_FETCH as the
SDK reports what it measured) instead of running the codec. Nothing else competes for the CPU, which the
namespace run cannot promise on a 2-core host, so the two differ by the hosts' scheduling jitter as well.

Rounds draw their trace offsets with the same random sequence as the namespace run, so ``--seed N`` replays the
same stretches of the trace and rounds compare one by one. Every controller has its own connection (as in the
namespace run); a round starts ``GAP_S`` after the previous fetch of that controller ended.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import heapq
import itertools
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .kv_eval import KVEvalConfig, fetch_metrics, prepare_context, summarize, timed_out_metrics
from .trace import Trace, child_readable, copies_folder, trace_from_spec

WAIT_SLICE_S = 0.25
"""Longest single wait for the worker processes. Python runs a signal's handler only between bytecodes: a SIGTERM
landing just before one wait for the next controller to finish was handled only when it finished (32 s into a
15-repeat run, minutes into a longer one), the workers computing on meanwhile."""

SERVER_ADDR = ("10.78.0.1", 8444)
CLIENT_ADDR = ("10.78.0.2", 40000)
IP_UDP_HEADER = 28
TIMER_SLACK = 1e-6  # timers fire 1 us late, as real ones do (see sim.py)
GAP_S = 5.0  # idle time on a controller's connection between its fetches (the others' fetches run meanwhile)
PROGRESS_S = 10.0  # wall seconds between a controller's progress lines
DECODE_ELEMENTS_PER_S = 50e6  # the client's decode rate (one CPU thread, namespace runs) unless one is given


class KVSimError(RuntimeError):
    pass


@functools.cache
def _sim_quic_class() -> type:
    """``QuicConnection`` whose stream service order is the same in every run.

    After each packet aioquic moves the streams it served to the back of its queue in the order of a ``set``,
    which for plain ``QuicStream`` objects follows ``id()``: memory addresses, so two runs of one seed in one
    process put different chunks' bytes in a packet once two chunk streams send together. Hashing the streams
    by stream id makes that order a function of the run alone."""
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.stream import QuicStream

    class _OrderedStream(QuicStream):
        def __hash__(self) -> int:
            return hash(self.stream_id)

    def ordered(streams: dict[int, QuicStream]) -> None:
        for s in streams.values():
            if type(s) is QuicStream:
                s.__class__ = _OrderedStream

    class SimQuicConnection(QuicConnection):
        def _get_or_create_stream(self, frame_type: int, stream_id: int) -> QuicStream:
            n = len(self._streams)
            stream = super()._get_or_create_stream(frame_type, stream_id)
            if len(self._streams) != n:  # new (a frame opens the peer's lower-numbered streams with its own)
                ordered(self._streams)
            return stream

        def _get_or_create_stream_for_send(self, stream_id: int) -> QuicStream:
            n = len(self._streams)
            stream = super()._get_or_create_stream_for_send(stream_id)
            if len(self._streams) != n:
                ordered(self._streams)
            return stream

    return SimQuicConnection


@dataclass
class Context:
    """What every controller's simulation shares: the resolved plan and the encoded chunks."""

    plan: Any  # ContextPlan
    payloads: dict[tuple[int, str], bytes]
    token_ids: list[int]
    model: str
    elements: int


def load_context(cfg: KVEvalConfig, log: Callable[[str], None]) -> tuple[Context, dict[str, Any]]:
    """The real context's chunks at every level, through the daemon's KV service (as the namespace server does)."""
    import torch

    from tokenwire.daemon.kv_service import KVService
    from tokenwire.daemon.kv_store_local import LocalChunkStore
    from tokenwire.transport.frames import KvFetch
    from tokenwire.transport.kv_controller import LEVELS, TEXT

    with tempfile.TemporaryDirectory(prefix="tw-kv-vsim-") as d:
        path = os.path.join(d, "context.pt")
        info = prepare_context(cfg, path, log)
        ctx = torch.load(path, weights_only=True)
        ids = ctx["ids"].tolist()

        async def build() -> Context:
            service = KVService(LocalChunkStore(os.path.join(d, "store"), 8 << 30), chunk_tokens=cfg.chunk_tokens)
            await service.ingest(ctx["model"], ids, list(zip(ctx["k"], ctx["v"], strict=True)),
                                 fingerprint=int(ctx["fingerprint"]), prewarm=LEVELS)
            plan = await service.resolve(KvFetch(model=ctx["model"], deadline_ms=cfg.deadline_ms, token_ids=ids))
            payloads = {(i, lv): await service.chunk(plan, i, lv)
                        for i in range(len(plan.token_counts)) for lv in (*LEVELS, TEXT)}
            return Context(plan, payloads, ids, ctx["model"], info["elements"])

        return asyncio.run(build()), info


class _Loop:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.now = 0.0

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (max(t, self.now), next(self._seq), fn))

    def run(self, done: Callable[[], bool], limit: float) -> bool:
        """Process events until ``done()`` or virtual time ``limit``; whether ``done()`` held."""
        while self._heap and not done():
            if self._heap[0][0] > limit:
                return False
            t, _, fn = heapq.heappop(self._heap)
            self.now = max(self.now, t)
            fn()
        return done()


@dataclass
class _Wire:
    link: Any  # Link
    dst: _Node
    armed: float | None = None
    gen: int = 0
    departures: list[tuple[float, int]] = field(default_factory=list)  # (virtual departure, IP bytes) delivered


@dataclass
class _Node:
    session: Any = None
    timer_at: float | None = None
    timer_gen: int = 0
    out: _Wire | None = None
    on_events: Callable[[list[Any]], None] = lambda evs: None


@dataclass
class _Fetch:
    sid: int = -1
    done: Any = None  # the KvDone frame
    received: dict[int, tuple[Any, float, float]] = field(default_factory=dict)  # index -> (header, first, done)
    decoded: dict[int, tuple[float, float]] = field(default_factory=dict)  # index -> (start, end)
    end: float | None = None
    error: str | None = None
    closed: dict[str, Any] | None = None  # the server's KVFetchClosed (levels, decisions)


class ControllerSim:
    """One controller's connection through the virtual path; :meth:`fetch` runs one fetch at a trace offset."""

    def __init__(self, cfg: KVEvalConfig, ctx: Context, *, recompute_us_per_token: int, seed: int,
                 decode_rate: float | None = None) -> None:
        """``decode_rate``: the client's decode speed, elements/s, modelled and reported in every KV_FETCH (``dr``),
        as the SDK reports the rate it measured, so the server plans with the figure the client decodes at; None:
        ``DECODE_ELEMENTS_PER_S``, reported nowhere (the server plans at its configured rate, the same 50 M)."""
        from tokenwire.transport.kv_channel import KVClientSession, ServerTuning, kv_congestion, kv_quic_config
        from tokenwire.transport.tls import client_configuration, sim_cert

        from .link import Link
        from .loss import parse_loss
        from .queues import parse_queue

        self.cfg = cfg
        self.ctx = ctx
        self.recompute_us_per_token = recompute_us_per_token
        self.decode_rate = decode_rate
        self.loop = _Loop()
        delay = cfg.delay_ms / 1000.0
        self.down_trace = trace_from_spec(cfg.down_trace)
        self.client = _Node()
        self.server = _Node()
        self.down = _Wire(Link(self.down_trace, parse_queue(cfg.queue, seed), delay=delay, name="down",
                               loss=parse_loss(cfg.loss, seed=seed)), self.client)
        self.up = _Wire(Link(trace_from_spec(cfg.up_trace), parse_queue(cfg.queue, seed + 1), delay=delay,
                             name="up", loss=parse_loss(cfg.up_loss, seed=seed + 7919)), self.server)
        self.server.out, self.client.out = self.down, self.up
        self._record_departures(self.down)
        # as sim.py: an Ed25519 pair, whose handshake has the same length every time (a P-256 signature's length
        # varies per handshake: a byte more or less in later packets moved their timing, and with loss the run)
        self.cert = sim_cert()
        self.tuning = ServerTuning(forecaster="onnx", prior_bps=cfg.prior_mbps * 1e6,
                                   recompute_us_per_token=recompute_us_per_token).override(
            stale_factor=cfg.stale_factor, reserve=cfg.reserve, guard_weight=cfg.guard_weight,
            firm_guard_weight=cfg.firm_guard_weight, legacy_controller=cfg.legacy_controller)
        self.congestion = kv_congestion("l4s")  # the namespace server's choice (ECT(1) marking, prague)
        quic = _sim_quic_class()(configuration=kv_quic_config(client_configuration(
            cadata=self.cert.cert_pem, server_name="localhost", congestion=self.congestion)))
        self.client.session = KVClientSession(quic)
        self.client.on_events = self._client_events
        self.server.on_events = self._server_events
        self.current: _Fetch | None = None
        quic.connect(SERVER_ADDR, now=0.0)
        self._service(self.client)
        if not self.loop.run(lambda: self.client.session.datagrams_ok is not None, 10.0):
            raise KVSimError("QUIC handshake did not complete in 10 s of virtual time")

    # -- the path ---------------------------------------------------------------------------------------------
    @staticmethod
    def _record_departures(w: _Wire) -> None:
        def rec(pkt: Any) -> None:
            if pkt.fate == "delivered":
                w.departures.append((pkt.departure, pkt.size))

        w.link.on_record = rec

    def _arm(self, w: _Wire) -> None:
        t = w.link.next_event_time()
        if t is None or (w.armed is not None and w.armed <= t):
            return
        w.armed = t
        w.gen += 1
        gen = w.gen
        self.loop.at(t, lambda: self._wake(w, gen))

    def _wake(self, w: _Wire, gen: int) -> None:
        if gen != w.gen:
            return
        w.armed = None
        for pkt in w.link.dequeue_ready(self.loop.now):
            self._deliver(w.dst, pkt.data)
        self._arm(w)

    def _deliver(self, node: _Node, data: bytes) -> None:
        if node.session is None:  # the server connection is born from the client's first Initial
            from aioquic.buffer import Buffer
            from aioquic.quic.packet import pull_quic_header

            from tokenwire.transport.kv_channel import KVServerSession, kv_quic_config
            from tokenwire.transport.tls import server_configuration

            header = pull_quic_header(Buffer(data=data), host_cid_length=8)
            quic = _sim_quic_class()(configuration=kv_quic_config(server_configuration(
                cert=self.cert, congestion=self.congestion)), original_destination_connection_id=header.destination_cid)
            node.session = KVServerSession(quic, tuning=self.tuning)
        src = SERVER_ADDR if node is self.client else CLIENT_ADDR
        node.on_events(node.session.receive_datagram(data, src, self.loop.now))
        self._service(node)

    def _service(self, node: _Node) -> None:
        from .queues import Packet

        now = self.loop.now
        w = node.out
        assert w is not None
        for data, _addr in node.session.datagrams_to_send(now):
            w.link.enqueue(Packet(len(data) + IP_UDP_HEADER, 0, data), now)
        self._arm(w)
        t = node.session.get_timer()
        if t != node.timer_at:
            node.timer_at = t
            node.timer_gen += 1
            if t is not None:
                gen = node.timer_gen
                self.loop.at(max(t, now) + TIMER_SLACK, lambda: self._fire(node, gen))

    def _fire(self, node: _Node, gen: int) -> None:
        if gen != node.timer_gen:
            return
        node.timer_at = None
        node.on_events(node.session.handle_timer(self.loop.now))
        self._service(node)

    # -- the endpoints ----------------------------------------------------------------------------------------
    def _server_events(self, evs: list[Any]) -> None:
        from tokenwire.transport.kv_channel import KVChunkNeeded, KVFetchClosed, KVFetchRequested

        sess = self.server.session
        now = self.loop.now
        for ev in evs:
            if isinstance(ev, KVFetchRequested):
                sess.start(ev.stream_id, copy.deepcopy(self.ctx.plan), now)
                self._server_events(sess.poll(now))
            elif isinstance(ev, KVChunkNeeded):
                sess.send_chunk(ev.stream_id, ev.index, ev.level, self.ctx.payloads[(ev.index, ev.level)], now)
            elif isinstance(ev, KVFetchClosed) and self.current is not None:
                self.current.closed = {"levels": ev.levels, "complete": ev.complete, "decisions": ev.decisions}

    def _client_events(self, evs: list[Any]) -> None:
        from tokenwire.transport.kv_channel import (
            KVChunkReceived,
            KVDoneReceived,
            KVFetchFailed,
        )
        from tokenwire.transport.kv_controller import TEXT

        f = self.current
        sess = self.client.session
        now = self.loop.now
        for ev in evs:
            if f is None or getattr(ev, "stream_id", None) != f.sid:
                continue
            if isinstance(ev, KVChunkReceived):
                sess.ack(ev.stream_id, ev.header, ev.first_at, ev.done_at)
                f.received[ev.header.index] = (ev.header, ev.first_at, ev.done_at)
                busy = max((e for _, e in f.decoded.values()), default=0.0)
                start = max(now, busy)  # one decode thread, as the namespace client
                elements = self.ctx.plan.elements[ev.header.index]
                dur = 0.0 if ev.header.level == TEXT else elements / (self.decode_rate or DECODE_ELEMENTS_PER_S)
                f.decoded[ev.header.index] = (start, start + dur)
            elif isinstance(ev, KVDoneReceived):
                f.done = ev.done
            elif isinstance(ev, KVFetchFailed):
                f.error = f"{type(ev.error).__name__}: {ev.error}"
            if f.done is not None and len(f.received) == f.done.chunks and f.end is None:
                f.end = max(e for _, e in f.decoded.values())
                sess.finish(f.sid)
                if self.decode_rate is not None:
                    # The decode's end is an event of its own: a slow client decodes for seconds after the last
                    # packet, and the loop, stopping only at events, ran on to the next timer (the 60-s idle
                    # timeout: at 1 M elements/s the connection closed between fetches). The default rate's
                    # decode ends within the ACK exchange and keeps the stepping the tables were measured with.
                    self.loop.at(f.end, lambda: None)

    # -- one fetch --------------------------------------------------------------------------------------------
    def fetch(self, controller: str, deadline_ms: int, offset_s: float) -> dict[str, Any]:
        """Start a fetch ``GAP_S`` from now with the traces restarted ``offset_s`` into them; its metrics."""
        from tokenwire.transport.frames import KvFetch
        from tokenwire.transport.kv_channel import FetchReport
        from tokenwire.transport.kv_controller import LEVEL_TOP1

        loop = self.loop
        t0 = loop.now + GAP_S
        loop.run(lambda: False, t0)  # the idle gap (timers, stray ACKs)
        loop.now = t0
        if self.client.session.closed:
            raise KVSimError(f"{controller}: the connection closed between fetches")
        origin = t0 - offset_s
        for w in (self.down, self.up):
            w.link.restart(origin)
        self.down.departures.clear()
        f = self.current = _Fetch()
        req = KvFetch(model=self.ctx.model, deadline_ms=int(deadline_ms), token_ids=self.ctx.token_ids,
                      controller=controller, recompute_us_per_token=self.recompute_us_per_token,
                      decode_elements_per_s=self.decode_rate)
        f.sid = self.client.session.fetch(req)
        self._service(self.client)
        timeout = 30 + 20 * deadline_ms / 1000
        # the fetch is over once its last decode ends and the server has seen the fetch stream close (ACKs and
        # the stream's FIN keep events coming past the decode's end; were the connection to idle out instead,
        # the next fetch raises above)
        finished = loop.run(lambda: f.error is not None or (f.end is not None and loop.now >= f.end), t0 + timeout)
        loop.run(lambda: f.closed is not None or f.error is not None, loop.now + 5.0)
        self.current = None
        if f.error is not None:
            raise KVSimError(f"{controller}: {f.error}")
        if not finished:
            m = timed_out_metrics({"elapsed_s": timeout, "sent_at": t0})
            m.update(offset_s=offset_s, decisions=(f.closed or {}).get("decisions", []))
            return m
        assert f.done is not None and f.end is not None
        report = FetchReport.from_timings(deadline_ms=deadline_ms, controller=controller, sent_at=t0, end=f.end,
                                          received=f.received, decode_times=f.decoded)
        m = fetch_metrics({"result": report.to_dict()}, elements=self.ctx.elements,
                          recompute_us_per_token=self.recompute_us_per_token, top1=LEVEL_TOP1)
        last = max(c[2] for c in f.received.values())
        m.update(offset_s=offset_s, decisions=(f.closed or {}).get("decisions", []),
                 **goodput(self.down.departures, t0, last, origin, self.down_trace, m["payload_bytes"]))
        return m


def check_decode_rate(rate: float | None) -> None:
    """``ValueError`` for a decode rate the KV_FETCH frame cannot carry (its ``dr`` bounds), before a run: the
    client would send it and the server refuse the fetch, minutes in."""
    from tokenwire.transport.frames import MAX_DECODE_RATE, MIN_DECODE_RATE

    if rate is not None and not MIN_DECODE_RATE <= rate <= MAX_DECODE_RATE:  # (NaN fails the range too)
        raise ValueError(f"the decode rate must be in [{MIN_DECODE_RATE:g}, {MAX_DECODE_RATE:g}] elements/s, "
                         f"got {rate}")


def goodput(departures: list[tuple[float, int]], t0: float, t1: float, origin: float, trace: Trace,
            payload: int) -> dict[str, float]:
    """``goodput_fraction`` and ``link_utilization`` as the namespace run defines them (kv_eval.add_goodput)."""
    deps = [(t, s) for t, s in departures if t0 <= t <= t1]
    if not deps:
        return {"goodput_fraction": math.nan, "link_utilization": math.nan}
    cap = trace.bytes_between((deps[0][0] - origin) * 1e3 - 1e-6, (deps[-1][0] - origin) * 1e3)
    if not cap:
        return {"goodput_fraction": math.nan, "link_utilization": math.nan}
    return {"capacity_bytes": cap, "goodput_fraction": payload / cap,
            "link_utilization": sum(s for _, s in deps) / cap}


def round_plan(cfg: KVEvalConfig, period_s: float) -> tuple[float, list[tuple[list[str], float]]]:
    """The warm-up offset and each round's (controller order, offset): the namespace run's random draws."""
    rng = random.Random(cfg.seed)
    warm = rng.uniform(0, period_s)
    rounds = []
    for _ in range(cfg.repeats):
        order = list(cfg.controllers)
        rng.shuffle(order)
        rounds.append((order, rng.uniform(0, period_s)))
    return warm, rounds


def _run_controller(cfg: KVEvalConfig, ctx: Context, controller: str, recompute_us_per_token: int,
                    warm: float, offsets: list[float], decode_rate: float | None = None) -> list[dict[str, Any]]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sim = ControllerSim(cfg, ctx, recompute_us_per_token=recompute_us_per_token,
                        seed=cfg.seed * 7919 + cfg.controllers.index(controller), decode_rate=decode_rate)
    sim.fetch("fixed-L1", 10 * cfg.deadline_ms, warm)  # warm-up, not counted (as the namespace run)
    rows = []
    last = time.monotonic()
    for rep, off in enumerate(offsets):
        m = sim.fetch(controller, cfg.deadline_ms, off)
        m["repeat"] = rep
        rows.append(m)
        if time.monotonic() - last >= PROGRESS_S and rep + 1 < len(offsets):  # a controller takes minutes
            last = time.monotonic()
            print(f"  {controller}: {rep + 1}/{len(offsets)} fetches", file=sys.stderr, flush=True)
    return rows


STOP_JOIN_S = 5.0
"""How long :func:`stop_pool` waits for a terminated worker before it kills it."""


def stop_pool(pool: ProcessPoolExecutor, futures: Iterable[Future[Any]]) -> None:
    """Cancel the queued controllers and end the running ones: on an exception in :func:`run_kv_virtual`
    (KeyboardInterrupt included) the pool's exit waited for every controller to run to its end (minutes to
    hours); the CLI terminated the workers from its signal handler, a Python caller's Ctrl-C did not. This
    pool's own workers only (a caller's other children are not ours to end); the pool sees them gone, fails
    what they ran, and its exit returns."""
    for fut in futures:
        fut.cancel()  # (a queued one: the pool hands it to no worker; a running one is not cancelled)
    workers = list((getattr(pool, "_processes", None) or {}).values())  # (no public list before Python 3.14)
    for proc in workers:
        if proc.is_alive():
            proc.terminate()
    for proc in workers:
        proc.join(STOP_JOIN_S)
        if proc.is_alive():
            proc.kill()
            proc.join(STOP_JOIN_S)


def run_kv_virtual(cfg: KVEvalConfig, *, log: Callable[[str], None] = lambda m: None,
                   workers: int | None = None, only: list[str] | None = None,
                   decode_rate: float | None = None) -> dict[str, Any]:
    """Every controller's fetches in virtual time (one process per controller, ``workers`` at once).

    ``only``: run just these of ``cfg.controllers``, on the offsets the whole list draws (an A/B of one
    controller against an earlier run of the list). ``decode_rate``: the client's decode speed, elements/s, which
    it also reports to the server (:class:`ControllerSim`); None: ``DECODE_ELEMENTS_PER_S``, not reported.
    An exception while the workers run (Ctrl-C's KeyboardInterrupt, one raised by ``log``) ends them before it
    propagates (:func:`stop_pool`)."""
    cfg.validate()
    check_decode_rate(decode_rate)
    down = trace_from_spec(cfg.down_trace)
    ctx, info = load_context(cfg, log)
    if cfg.recompute_us_per_token is None:
        cfg.recompute_us_per_token = round(info["prefill_s"] / cfg.context_tokens * 1e6)
        log(f"text chunks cost the measured prefill: {cfg.recompute_us_per_token} us/token")
    warm, rounds = round_plan(cfg, down.period_ms / 1000)
    offsets = [off for _, off in rounds]
    rows: dict[str, list[dict[str, Any]]] = {}
    run = [c for c in cfg.controllers if only is None or c in only]
    n = workers or min(len(run), os.cpu_count() or 1)
    log(f"{len(run)} controllers x {cfg.repeats} fetches in virtual time, {n} processes")
    if n <= 1:
        for ctl in run:
            rows[ctl] = _run_controller(cfg, ctx, ctl, cfg.recompute_us_per_token, warm, offsets, decode_rate)
            log(f"{ctl}: done")
    else:
        import multiprocessing

        # the workers open the traces again: one read from a pipe (<(zcat trace.gz), a FIFO) is handed to them as
        # a regular copy of this process's parse (the pipe was empty for them), removed once they are done
        with (copies_folder(cfg.down_trace, cfg.up_trace) as copies,
              ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool):
            wcfg = cfg if copies is None else replace(cfg, down_trace=child_readable(cfg.down_trace, copies),
                                                      up_trace=child_readable(cfg.up_trace, copies))
            futs: dict[Future[list[dict[str, Any]]], str] = {}
            try:
                futs = {pool.submit(_run_controller, wcfg, ctx, ctl, cfg.recompute_us_per_token, warm, offsets,
                                    decode_rate): ctl for ctl in run}
                pending = set(futs)
                while pending:  # reported as each finishes; the JSON keeps the list's order
                    done, pending = wait(pending, timeout=WAIT_SLICE_S, return_when=FIRST_COMPLETED)
                    for fut in done:
                        ctl = futs[fut]
                        rows[ctl] = fut.result()
                        met = sum(r["deadline_met"] for r in rows[ctl])
                        log(f"{ctl}: {met}/{len(rows[ctl])} deadlines met")
            except BaseException:
                stop_pool(pool, futs)  # before the pool's own exit, which waits for every controller to run
                raise
        rows = {ctl: rows[ctl] for ctl in run}
    return {"controllers": summarize(rows), "fetches": rows, "config": asdict(cfg), "context": info,
            "trace_mean_mbps": down.mean_mbps, "backend": "virtual",
            "client_decode_elements_per_s": decode_rate or DECODE_ELEMENTS_PER_S,
            "decode_rate_reported": decode_rate is not None}
