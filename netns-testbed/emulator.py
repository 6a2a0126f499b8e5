"""The link emulator process: two :class:`Link` objects between two TUN fds, driven by a thin asyncio shell.

``server TUN --read--> down Link --write--> client TUN`` and the reverse for ``up``. Arrival times are the
monotonic clock when a packet is read; the links decide everything else in virtual time; the shell only
sleeps until :meth:`Link.next_event_time` and writes out what :meth:`Link.dequeue_ready` returns.

The event loop uses ``selectors.SelectSelector`` and a 1 ns timer slack: epoll's timeout is in whole
milliseconds (measured here: timers fire 0.5 ms late at the median), ``select()`` takes microseconds
(0.04 ms median with the slack lowered), which matters next to DualPI2's 1 ms step.

Run as ``python -m tokenwire.testbed.emulator CONFIG_JSON`` with the two TUN fds inherited (numbers in the
config). It prints ``{"ready": ...}`` on stdout and then answers one JSON line per command read on stdin:
``origin [OFFSET_S]`` (restart the traces and loss clocks now, optionally OFFSET_S into the traces; returns
the origin time), ``stats``, ``stop`` (or EOF).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import json
import os
import selectors
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from . import pktlog
from .link import Link
from .loss import parse_loss
from .pktlog import CsvPacketLog, PcapTap
from .queue_oracle import OracleBoard, estimate_queue_delays
from .queues import DualPI2, Queue, parse_queue
from .trace import OPPORTUNITY_BYTES, Trace, TraceError, trace_from_spec

PR_SET_TIMERSLACK = 29
READ_BATCH = 256
ORACLE_EVERY_S = 0.0002  # publish the oracle estimate at most this often (it costs a trace lookup)


HANDSHAKE_WAIT_S = 30.0
"""How long the testbed's runs wait for a QUIC connection (the endpoints client's connect timeout, the runs'
``wait_for("connected", 30)``)."""
MAX_TRACE_GAP_MS = int(HANDSHAKE_WAIT_S * 1000)
"""Longest time a trace of the testbed's commands may go without a delivery opportunity (:func:`check_trace_gaps`).
Every run starts with a handshake near the trace's start, and one that meets such a gap fails after
:data:`HANDSHAKE_WAIT_S`; a gap twice as long outlasts the QUIC idle timeout (60 s) and ends a connection whatever
it carries. The cellular traces in the shared ``traces/`` folder go at most 11.6 s without one
(Verizon-EVDO-driving); a fixed rate below 400 bit/s has such gaps. No gap this long is not enough: see
:data:`HANDSHAKE_OPPORTUNITIES`."""
HANDSHAKE_OPPORTUNITIES = 5
"""Fewest delivery opportunities every :data:`HANDSHAKE_WAIT_S` of a trace of the testbed's commands must hold
(:func:`check_trace_opportunities`). One handshake and a 5-token answer, counted through a UDP proxy between the
endpoints' server and client on loopback (UDP payloads): server -> client 1200 B (its padded Initial+Handshake
flight, self-signed certificate), 224 B (HANDSHAKE_DONE) and 33 B, then 8 datagrams (502 B) of answer; client ->
server 1200 B, 1200 B (both padded) and 33 B, then 8 (364 B). Each 1228-byte IP packet takes an opportunity to
itself, and one reaching an empty queue waits for the next (unused ones are wasted), so the handshake, the request
and the first token take at least 3 opportunities each way, a round trip apart; with seconds between
opportunities QUIC's probe timeouts (1 s, doubling) also queue retransmitted 1228-byte packets ahead of them.
Measured with ``compare --tokens 5`` (stream): 450 bit/s and one opportunity per 29 s failed after ~32 s, 1 kbit/s
(2.5 per 30 s) after 87 s, 1.5 kbit/s (3.75) after 79 s; 1.8 kbit/s (4.5) and 2 kbit/s (5) ran. 5 keeps a
margin over both the 3 counted and the 4.5 measured. At a fixed rate it means at least :data:`MIN_USABLE_BPS`."""
MIN_USABLE_BPS = HANDSHAKE_OPPORTUNITIES * OPPORTUNITY_BYTES * 8 / HANDSHAKE_WAIT_S
"""2000 bit/s: the smallest fixed rate with :data:`HANDSHAKE_OPPORTUNITIES` in every :data:`HANDSHAKE_WAIT_S`."""


def longest_gap_ms(trace: Trace) -> int:
    """The longest time ``trace`` (repeating) goes without a delivery opportunity: between two of its timestamps,
    or from the start (and each repeat) to its first one. A block at a time: a whole-trace ``diff`` of a trace of
    hundreds of millions of lines would double its memory."""
    import numpy as np

    stamps = np.frombuffer(trace.stamps_ms, dtype=np.int64)
    gap = int(stamps[0])
    block = 1 << 20
    for start in range(1, len(stamps), block):
        gap = max(gap, int(np.diff(stamps[start - 1 : start + block]).max()))
    return gap


def longest_span_ms(trace: Trace, count: int) -> tuple[int, int]:
    """The longest time ``trace`` (repeating) takes, after any one of its delivery opportunities, to offer
    ``count`` more, and where within the trace (ms) that opportunity lies. Opportunity ``i + count`` of the
    repeated trace minus opportunity ``i``, for every ``i`` of one period: a sliding window, O(n), a block at a time
    as :func:`longest_gap_ms`. A window starting elsewhere holds at least as many; the start of the trace counts
    as the opportunity at its last timestamp (the period), so ``count=1`` gives :func:`longest_gap_ms`."""
    import numpy as np

    stamps = np.frombuffer(trace.stamps_ms, dtype=np.int64)
    n, period = len(stamps), trace.period_ms
    worst, at = -1, 0
    block = 1 << 20
    inner = max(0, n - count)  # windows that end within the same period: plain differences of slices
    for start in range(0, inner, block):
        stop = min(inner, start + block)
        spans = stamps[start + count : stop + count] - stamps[start:stop]
        k = int(spans.argmax())
        if int(spans[k]) > worst:
            worst, at = int(spans[k]), int(stamps[start + k])
    i = np.arange(inner, n, dtype=np.int64)  # the rest wrap into later periods (at most ``count`` of them)
    j = i + count
    spans = stamps[j % n] + (j // n) * period - stamps[i]
    k = int(spans.argmax())
    if int(spans[k]) > worst:
        worst, at = int(spans[k]), int(stamps[i[k]])
    return worst, at % period


def check_trace_gaps(spec: str) -> None:
    """Refuse a trace (file or rate) that goes longer than :data:`MAX_TRACE_GAP_MS` without a delivery
    opportunity: one delivery per 10 minutes built the namespaces and failed ~30 s later with "no answer before
    the deadline". The testbed's commands call it (through :func:`check_trace_usable`);
    :meth:`DirectionConfig.validate` does not, as ``demo``, ``bench`` and library callers build testbeds under
    their own bounds."""
    _check_gaps(spec, trace_from_spec(spec))


def check_trace_opportunities(spec: str, chats: int = 1) -> None:
    """Refuse a trace (file or rate) with fewer than :data:`HANDSHAKE_OPPORTUNITIES` delivery opportunities in
    some :data:`HANDSHAKE_WAIT_S`: no gap over 30 s is not enough, as 450 bit/s (one opportunity per 26.7 s) and
    one per 29 s passed that check and failed ~32 s later, 1 kbit/s after 87 s. ``chats`` handshakes at once
    (``testbed contention``, ``sim --chats``) need ``chats`` times as many (:func:`handshake_opportunities`)."""
    _check_opportunities(spec, trace_from_spec(spec), chats)


def check_trace_usable(spec: str, chats: int = 1) -> None:
    """Both checks of a testbed command's trace (:func:`check_trace_gaps`, then
    :func:`check_trace_opportunities` for ``chats`` handshakes at once) on one parse."""
    trace = trace_from_spec(spec)
    _check_gaps(spec, trace)
    _check_opportunities(spec, trace, chats)


def handshake_opportunities(chats: int = 1) -> int:
    """Delivery opportunities every :data:`HANDSHAKE_WAIT_S` of a trace must hold for ``chats`` QUIC handshakes
    that start together (``testbed contention``'s workers connect every chat at once, each with the endpoints'
    30 s; ``sim --chats`` starts them all at time 0): :data:`HANDSHAKE_OPPORTUNITIES` each. Every chat's handshake
    packets (3 full-size datagrams each way, and their retransmissions) take opportunities of their own on the one
    link, so the need grows with the chats: 20 handshakes at 3 kbit/s (7 opportunities per 30 s, enough for one)
    all timed out. In ``sim`` (virtual time, no 30-s connect bound, 40 ms each way) the wait for the handshakes
    (until the requests leave: every one done, the links drained) grew in proportion to ``chats`` over the rate:
    with exactly this many per 30 s, 55 s for 5 chats (10 kbit/s) and 52 s for 20 (40 kbit/s); with a fifth of it
    (8 kbit/s for 20) none connected. A floor, then, as the single chat's 5 is, not a guarantee."""
    return HANDSHAKE_OPPORTUNITIES * chats


def _check_opportunities(spec: str, trace: Trace, chats: int = 1) -> None:
    needed = handshake_opportunities(chats)
    if longest_span_ms(trace, needed)[0] <= MAX_TRACE_GAP_MS:
        return
    # the fewest any 30 s holds (the most k that every 30 s holds: longest_span_ms grows with k, so a binary
    # search), and after which opportunity (a refused trace: a few more passes do not matter)
    fewest, above = 0, needed  # longest_span_ms(trace, above) is over 30 s
    while above - fewest > 1:
        mid = (fewest + above) // 2
        if longest_span_ms(trace, mid)[0] <= MAX_TRACE_GAP_MS:
            fewest = mid
        else:
            above = mid
    at = longest_span_ms(trace, fewest + 1)[1]  # the next fewest + 1 take longer than 30 s from there
    only = (f"{spec}: only {fewest} delivery opportunit{'y' if fewest == 1 else 'ies'} in the {HANDSHAKE_WAIT_S:g} s "
            f"after {at / 1000:g} s into the trace, at least {needed} needed in every {HANDSHAKE_WAIT_S:g} s")
    if chats == 1:
        raise TraceError(
            f"{only}: a run's QUIC handshake and first answer take several {OPPORTUNITY_BYTES}-byte "
            f"opportunities each way within the endpoints' {HANDSHAKE_WAIT_S:g} s (a fixed rate needs at least "
            f"{MIN_USABLE_BPS / 1000:g} kbit/s)"
        )
    can = fewest // HANDSHAKE_OPPORTUNITIES
    raise TraceError(
        f"{only} for {chats} chats: their QUIC handshakes start together and share the link, each taking "
        f"{HANDSHAKE_OPPORTUNITIES} opportunities of {OPPORTUNITY_BYTES} bytes each way; "
        + (f"this trace can start at most {can} chat{'' if can == 1 else 's'} at once (--chats {can})"
           if can else "not even one chat can start on this trace")
        + f" (a fixed rate needs at least {chats * MIN_USABLE_BPS / 1000:g} kbit/s for {chats} chats)"
    )


def _check_gaps(spec: str, trace: Trace) -> None:
    gap = longest_gap_ms(trace)
    if gap > MAX_TRACE_GAP_MS:
        raise TraceError(f"{spec}: {gap / 1000:g} s without a delivery opportunity, at most "
                         f"{MAX_TRACE_GAP_MS / 1000:g} s: a run's handshake that meets the gap fails (the endpoints "
                         f"wait {HANDSHAKE_WAIT_S:g} s for it)")


@dataclass
class DirectionConfig:
    """One direction of the path. ``trace`` is a mahimahi file, a rate like ``12mbps``, or None (no limit)."""

    trace: str | None = "12mbps"
    delay_ms: float = 0.0
    loss: str = "none"
    queue: str = "infinite"

    def validate(self) -> None:
        """Parse every spec once so bad input fails before anything is created."""
        if self.trace is not None:
            trace_from_spec(self.trace)
        if self.delay_ms < 0:
            raise ValueError(f"delay must be >= 0 ms, got {self.delay_ms}")
        parse_loss(self.loss)
        parse_queue(self.queue)


@dataclass
class EmulatorConfig:
    down: DirectionConfig = field(default_factory=DirectionConfig)
    up: DirectionConfig = field(default_factory=DirectionConfig)
    seed: int = 0
    log_path: str | None = None
    pcap_prefix: str | None = None
    oracle_path: str | None = None  # publish the down link's (L, C) latency estimate here (queue_oracle)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> EmulatorConfig:
        data = json.loads(text)
        return cls(
            down=DirectionConfig(**data["down"]),
            up=DirectionConfig(**data["up"]),
            seed=int(data.get("seed", 0)),
            log_path=data.get("log_path"),
            pcap_prefix=data.get("pcap_prefix"),
            oracle_path=data.get("oracle_path"),
        )


def build_link(cfg: DirectionConfig, *, seed: int, start: float, name: str) -> Link:
    """A :class:`Link` for one direction; the down and up directions get different seeds."""
    trace = trace_from_spec(cfg.trace) if cfg.trace is not None else None
    return Link(
        trace,
        parse_queue(cfg.queue, seed=seed),
        delay=cfg.delay_ms / 1000.0,
        loss=parse_loss(cfg.loss, seed=seed),
        start=start,
        name=name,
    )


def direction_seed(seed: int, name: str) -> int:
    return seed * 2 + (1 if name == "up" else 0)


def link_summary(link: Link) -> dict[str, Any]:
    out: dict[str, Any] = link.stats.to_dict()
    out["backlog"] = link.backlog
    q: Queue = link.queue
    if isinstance(q, DualPI2):
        out["dualpi2"] = {
            "prob": q.prob, "pi_marks": q.pi_marks, "step_marks": q.step_marks, "aqm_drops": q.aqm_drops,
            "packets_in_l": q.packets_in_l, "packets_in_c": q.packets_in_c,
        }  # fmt: skip
    return out


class EmulatorShell:
    """Moves packets between the TUN fds and the two links (see module docstring)."""

    def __init__(self, cfg: EmulatorConfig, fd_server: int, fd_client: int) -> None:
        self.cfg = cfg
        self.fd_server = fd_server
        self.fd_client = fd_client
        now = time.monotonic()
        self.origin = now
        self.down = build_link(cfg.down, seed=direction_seed(cfg.seed, "down"), start=now, name="down")
        self.up = build_link(cfg.up, seed=direction_seed(cfg.seed, "up"), start=now, name="up")
        self.log = self.pcap_down = self.pcap_up = None
        try:  # a file that cannot be opened closes those opened before it
            self.log = CsvPacketLog(cfg.log_path) if cfg.log_path else None
            self.pcap_down = PcapTap(cfg.pcap_prefix + ".down") if cfg.pcap_prefix else None
            self.pcap_up = PcapTap(cfg.pcap_prefix + ".up") if cfg.pcap_prefix else None
        except BaseException:
            for opened in (self.log, self.pcap_down):
                if opened is not None:
                    opened.close()
            raise
        if self.log is not None:
            log = self.log
            self.down.on_record = lambda p: log.record("down", p)
            self.up.on_record = lambda p: log.record("up", p)
        self.oracle = OracleBoard(cfg.oracle_path, create=True) if cfg.oracle_path else None
        self._oracle_at = 0.0
        self.non_ipv4 = 0
        self.write_errors = 0
        self.scheduler = "other"
        self.late_s: list[float] = []  # how late each write was relative to its virtual delivery time
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._flush_timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- control -------------------------------------------------------------------------------------------
    def restart(self, offset_s: float = 0.0) -> float:
        """Restart both traces and loss clocks now, ``offset_s`` into the traces (same loss pattern per run)."""
        now = time.monotonic()
        self.origin = now - offset_s
        for link, cfg in ((self.down, self.cfg.down), (self.up, self.cfg.up)):
            link.advance(now)
            link.restart(self.origin)
            link.loss = parse_loss(cfg.loss, seed=direction_seed(self.cfg.seed, link.name))
            link.stats = type(link.stats)()
        self.late_s.clear()
        self._reschedule()
        return self.origin

    def stats(self, now: float | None = None) -> dict[str, Any]:
        """Counters and each direction's queue as of ``now`` (default: the clock). The links are advanced first:
        the timer wakes at delivery times, so a packet that left the queue stayed in ``backlog`` until it reached
        the far end, a one-way delay late (``testbed contention``'s settle reads the backlog to start its answers)."""
        now = time.monotonic() if now is None else now
        self.down.advance(now)
        self.up.advance(now)
        late = sorted(self.late_s)

        def pct(q: float) -> float | None:
            return late[min(len(late) - 1, int(q * len(late)))] * 1000.0 if late else None

        return {
            "origin": self.origin,
            "down": link_summary(self.down),
            "up": link_summary(self.up),
            "non_ipv4": self.non_ipv4,
            "scheduler": self.scheduler,
            "write_errors": self.write_errors,
            "log_errors": {k: v for w in self._writers() for k, v in w.failures.items()},
            "release_late_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0), "n": len(late)},
        }

    # -- I/O -------------------------------------------------------------------------------------------------
    def _on_readable(self, fd: int, link: Link, tap: PcapTap | None) -> None:
        for _ in range(READ_BATCH):
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                break
            now = time.monotonic()
            if not data or data[0] >> 4 != 4:
                self.non_ipv4 += 1
                continue
            if tap is not None:
                tap.arrived(data, now)
            link.enqueue(data, now)
        self._flush()

    def _flush(self) -> None:
        now = time.monotonic()
        for link, fd, tap in (
            (self.down, self.fd_client, self.pcap_down),
            (self.up, self.fd_server, self.pcap_up),
        ):
            for pkt in link.dequeue_ready(now):
                try:
                    os.write(fd, pkt.data)  # type: ignore[arg-type]
                except OSError:
                    self.write_errors += 1
                    continue
                t = time.monotonic()
                if len(self.late_s) < 1_000_000:
                    self.late_s.append(t - pkt.delivery)  # type: ignore[operator]
                if tap is not None:
                    tap.delivered(pkt.data, t)  # type: ignore[arg-type]
        if self.oracle is not None and now - self._oracle_at >= ORACLE_EVERY_S:
            self._oracle_at = now
            self.oracle.publish(now, *estimate_queue_delays(self.down, now))
        self._reschedule()

    def _reschedule(self) -> None:
        loop = self._loop
        if loop is None:
            return
        times = [t for t in (self.down.next_event_time(), self.up.next_event_time()) if t is not None]
        t_next = min(times) if times else None
        if t_next == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = t_next
        if t_next is not None:
            # asyncio's loop.time() is time.monotonic(), the clock of the virtual times
            self._timer = loop.call_at(t_next, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._flush()

    def _writers(self) -> list[CsvPacketLog | PcapTap]:
        return [w for w in (self.log, self.pcap_down, self.pcap_up) if w is not None]

    def flush_files(self) -> None:
        """Write out what the packet log and pcaps hold (whole rows and records), so that a live ``--log`` or
        ``--pcap`` file is complete up to about a second ago, also once the traffic stops."""
        for writer in self._writers():
            if writer.pending:
                writer.flush()

    def _on_flush_timer(self) -> None:
        self._flush_timer = None
        self.flush_files()
        if self._loop is not None:
            self._flush_timer = self._loop.call_later(pktlog.FLUSH_EVERY_S, self._on_flush_timer)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.fd_server, self._on_readable, self.fd_server, self.down, self.pcap_down)
        loop.add_reader(self.fd_client, self._on_readable, self.fd_client, self.up, self.pcap_up)
        if self._writers():
            self._flush_timer = loop.call_later(pktlog.FLUSH_EVERY_S, self._on_flush_timer)
        self._reschedule()

    def detach(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.fd_server)
            self._loop.remove_reader(self.fd_client)
        for timer in (self._timer, self._flush_timer):
            if timer is not None:
                timer.cancel()
        self._flush_timer = None
        self._loop = None

    def close(self) -> None:
        now = time.monotonic()
        self.down.advance(now)
        self.up.advance(now)
        for closer in (self.log, self.pcap_down, self.pcap_up, self.oracle):
            if closer is not None:
                closer.close()


def realtime_priority() -> str:
    """Run the emulator at the lowest SCHED_FIFO priority unless ``TOKENWIRE_EMULATOR_RT=0``.

    On a busy 2-core host an ordinary process waits up to a scheduler tick (4 ms at HZ=250) for the CPU,
    which showed up as a 3-4 ms p99 release error; at FIFO priority 1 it was 0.1 ms (bench emulator). The
    emulator sleeps in select() between events, and the kernel's RT throttling still bounds it.
    """
    if os.environ.get("TOKENWIRE_EMULATOR_RT", "1") == "0":
        return "other"
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (OSError, AttributeError):
        return "other"
    return "fifo"


def lower_timer_slack() -> None:
    """Ask for 1 ns timer slack so select() timeouts fire within tens of microseconds."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """An asyncio loop whose timers have microsecond, not millisecond, resolution (see module docstring)."""
    lower_timer_slack()
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


async def _serve_control(shell: EmulatorShell) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        await _answer_commands(shell, reader)
    finally:  # also when cancelled (SIGTERM): an open pipe transport warned "unclosed transport" at exit
        transport.close()


async def _answer_commands(shell: EmulatorShell, reader: asyncio.StreamReader) -> None:
    """Answer the owner's commands on ``reader`` until ``stop`` or EOF (see the module docstring)."""

    def reply(obj: dict[str, Any]) -> bool:
        """Answer the owner; False once it is gone (its end of the pipe closed: killed), which ends the service
        as its EOF does. The BrokenPipeError escaped and ended this task with "Task exception was never
        retrieved" on the emulator's stderr."""
        try:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            _owner_gone()
            return False
        return True

    if not reply({"ready": True, "pid": os.getpid(), "origin": shell.origin}):
        return
    while True:
        line = await reader.readline()
        cmd = line.decode().strip()
        if not line or cmd == "stop":
            break
        if cmd == "origin" or cmd.startswith("origin "):
            try:
                offset = float(cmd[7:] or 0.0)
            except ValueError:
                answer: dict[str, Any] = {"error": f"bad origin offset {cmd[7:]!r}"}
            else:
                answer = {"origin": shell.restart(max(0.0, offset))}
        elif cmd == "stats":
            answer = shell.stats()
        else:
            answer = {"error": f"unknown command {cmd!r}"}
        if not reply(answer):
            break


def _owner_gone() -> None:
    """Our stdout's reader is gone: send what is still buffered, and whatever comes later, to /dev/null, so that
    neither the final stats nor the flush at exit raise a second BrokenPipeError."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())
    os.close(null)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print("usage: python -m tokenwire.testbed.emulator CONFIG_JSON FD_SERVER FD_CLIENT", file=sys.stderr)
        return 2
    cfg = EmulatorConfig.from_json(argv[0])
    fd_server, fd_client = int(argv[1]), int(argv[2])
    # The owner stops us through stdin; the terminal's Ctrl-C is the owner's to handle.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    shell_sched = realtime_priority()
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    shell = EmulatorShell(cfg, fd_server, fd_client)
    shell.scheduler = shell_sched
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, lambda: None if stop.done() else stop.set_result(None))
    try:
        shell.attach(loop)
        control = loop.create_task(_serve_control(shell))
        loop.run_until_complete(asyncio.wait([control, stop], return_when=asyncio.FIRST_COMPLETED))
        # Stopped by SIGTERM, the control task still waits for a command: cancelled and awaited here, or it was
        # destroyed pending after loop.close(), and "Task was destroyed but it is pending!" on stderr became the
        # owner's reason for the emulator's exit.
        control.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(control)
        loop.run_until_complete(asyncio.sleep(0))  # the closed stdin transport's connection_lost callback
        shell.detach()
        try:
            sys.stdout.write(json.dumps({"stopped": True, **shell.stats()}) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:  # the owner died first (killed): the final stats have no reader
            _owner_gone()
    finally:
        shell.close()
        loop.close()
    if stop.done():
        _die_of(signal.SIGTERM)
    return 0


def _die_of(signum: int) -> None:
    """End the process by ``signum``'s default action, after the clean shutdown above: a SIGTERM'd emulator exited
    0, as a stopped one does, and the owner reported "link emulator exited (status 0)" for a terminated one. Now
    it reads "status -15: killed by SIGTERM" (``child.exit_status``); the normal ``stop`` still exits 0."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)


if __name__ == "__main__":
    sys.exit(main())
