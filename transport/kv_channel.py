"""The KV channel: fetch a context's KV cache chunk by chunk over QUIC, within a deadline.

Protocol (ALPN ``tokenwire-kv/1``, its own QUIC endpoint so bulk KV gets its own congestion controller):

* client -> server, bidirectional stream: ``KV_FETCH`` (model, token ids or chunk hashes, deadline), later one
  ``KV_ACK`` per chunk received (for the server's throughput samples), FIN after ``KV_DONE``;
* server -> client on that stream: ``KV_META`` (chunk count, geometry), ``KV_DONE`` (levels), and FIN once the
  client's FIN has come (the fetch holds one of 16 slots until then); or a typed ``ERROR`` (unknown context:
  ``NOT_FOUND``; bad request: ``BAD_REQUEST``; store failure: ``INTERNAL``) and FIN;
* server -> client, one **unidirectional stream per chunk**: a ``KV_CHUNK`` header frame (index, level, size,
  CRC-32) then ``size`` raw payload bytes and FIN. A payload is one self-contained CacheGen bitstream, or the
  chunk's token ids (int32 LE) when sent as text. A lost packet delays only its own chunk's stream.

A fetch the server refuses (over its concurrency limit) or ends early (``reject``) ends alone: ERROR and FIN,
STOP_SENDING for whatever the client still sends on that stream, and anything that still arrives there (the
rest of a KV_FETCH of many token ids, a KV_ACK that crossed the ERROR) is dropped until the client's FIN or
reset, never read as a new fetch. Either side survives the other's STOP_SENDING on a fetch stream.

The server decides each chunk's level just before writing it (when QUIC has acknowledged all of the fetch's
bytes but for a look-ahead: one min-RTT plus 100 ms at the measured rate), with
:class:`~tokenwire.transport.kv_controller.KVController`. The client decodes each chunk on a worker thread as
soon as its stream ends, so decoding overlaps reception.

Layers: :class:`KVServerSession` and :class:`KVClientSession` are sans-I/O (QUIC events in, session events
out, explicit ``now``); :func:`serve_kv` / :func:`connect_kv` are the asyncio shells. Nothing here imports
torch at module level; the client imports the codec when it decodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import numbers
import operator
import os
import re
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, SupportsIndex

from aioquic.quic import events as qe
from aioquic.quic.connection import QuicConnection

from .datagram_hook import min_rtt, smoothed_rtt
from .errors import (
    ErrorCode,
    FrameError,
    ProtocolError,
    RemoteError,
    TokenwireError,
    UnsupportedVersion,
    known_code,
)
from .frames import (
    KV_ALPN,
    MAX_RECOMPUTE_US,
    Error,
    Frame,
    KvAck,
    KvChunk,
    KvDone,
    KvFetch,
    KvMeta,
    StreamDecoder,
    check_outgoing,
    decode_frame,
    encode_stream_frame,
)
from .kv_controller import (
    FIRM_GUARD_WEIGHT,
    GUARD_WEIGHT,
    LEVELS,
    PRIOR_LOW,
    SAMPLE_MIN_BYTES,
    STALE_FACTOR,
    STALE_S,
    TEXT,
    ChunkOptions,
    KVController,
    check_tuning,
)
from .marking import MarkingPolicy
from .path_recovery import KV_RECOVERY_PING_S
from .quic_io import SessionProtocol, open_client, serve_quic, tune_socket
from .session import (
    ConnectionEnded,
    SessionEvent,
    _SessionBase,
    closed_error,
    idle_timeout_in_force,
    read_credit,
)
from .tls import CertPair, client_configuration, server_configuration

log = logging.getLogger("tokenwire.kv")

POLL_S = 0.002  # how often a sending fetch checks whether the next chunk is due
FRESH_MIN_S = 0.08  # a fetch's own QUIC delivery rate counts once it spans this long...
FRESH_MIN_BYTES = 32 * 1024  # ...and this many acknowledged bytes
LOOKAHEAD_S = 0.1  # data left queued at the bottleneck when the next chunk is decided
MIN_LOOKAHEAD = 64 * 1024  # decide the next chunk when fewer unacknowledged bytes remain (or more: _lookahead)
MIN_SAMPLE_BYTES = SAMPLE_MIN_BYTES  # smaller chunks (text) give no usable throughput sample
LINK_SAMPLES = 64  # chunk rates a connection remembers across fetches: its link prior (see KVServerSession.start)
LINK_MIN_SAMPLES = 8  # fewer than this: the configured prior
LINK_LOW_Q = 0.1  # the link prior's low quantile
DEFAULT_RECOMPUTE_US = 2250  # the engine's prefill per token when a fetch names none (the daemon's default too)
FLOW_WINDOW = 64 << 20  # QUIC flow-control windows: a chunk must never wait for a window update
_LEN = struct.Struct(">I")


class KVError(TokenwireError):
    """A KV fetch that could not complete (base class)."""


class KVNotFound(KVError):
    code = ErrorCode.NOT_FOUND


class KVCorruptChunk(KVError):
    """A chunk arrived with a wrong length or checksum, or does not decode: never returned as data."""

    code = ErrorCode.MALFORMED_FRAME


# ----------------------------------------------------------------------------------------- what a server serves
@dataclass
class ContextPlan:
    """A resolved context: what the provider can send for each chunk."""

    chunk_tokens: int
    token_counts: list[int]
    elements: list[int]  # KV elements per chunk (2 * L * H * D * tokens)
    sizes: list[dict[str, int]]  # per chunk: level -> bytes (exact once encoded, predicted before)
    geometry: tuple[int, int, int]
    fingerprint: int
    dtype: str
    handle: Any = None  # the provider's own reference (hashes, ...)
    # tokens of the requested context past the stored prefix (a prefix fetch): the client's engine prefills them
    # after the transfer, so the controller counts their recompute against the deadline like a text chunk's
    rest_tokens: int = 0

    @property
    def tokens(self) -> int:
        return sum(self.token_counts)


class KVProvider(Protocol):
    """What the KV server needs from a store (the daemon's KV service implements it)."""

    async def resolve(self, fetch: KvFetch) -> ContextPlan:
        """The context's plan; raises a TokenwireError (e.g. :class:`KVNotFound`) to refuse the fetch."""
        ...

    async def chunk(self, plan: ContextPlan, index: int, level: str) -> bytes:
        """Chunk ``index`` at ``level`` (a codec level, or ``text``: the token ids as int32 LE)."""
        ...


@dataclass
class ServerTuning:
    forecaster: str = "onnx"  # onnx | ewma (the tokenwire-ewma controller always uses ewma)
    prior_bps: float = 5e6
    recompute_us_per_token: int = DEFAULT_RECOMPUTE_US
    decode_elements_per_s: float = 50e6
    stale_factor: float = STALE_FACTOR  # tokenwire's margins (kv_controller): for experiments
    reserve: float | None = None  # None: the controller's default for its rule
    fresh_rate: bool = True  # plan a fetch's first chunks with its own QUIC delivery rate (see fresh_rate)
    legacy_controller: bool = False  # tokenwire's previous rule (whole plan at the low quantile): for ablations
    guard_weight: float = GUARD_WEIGHT  # tokenwire's guard rate, low**w * median**(1-w): kv_controller
    firm_guard_weight: float = FIRM_GUARD_WEIGHT  # the same for a fetch's first (cold) and last chunk
    link_prior: bool = True  # plan first chunks with the connection's past chunk rates (KVServerSession.link_prior)
    # until the connection has a link prior, a fetch the configured prior would send as text measures the link with
    # one chunk at the lowest level where the deadline leaves room (KVServerSession._explore); False: never
    probe: bool = True

    def __post_init__(self) -> None:
        check_tuning(stale_factor=self.stale_factor, reserve=self.reserve, guard_weight=self.guard_weight,
                     firm_guard_weight=self.firm_guard_weight, prior_bps=self.prior_bps)
        if not 0 <= self.recompute_us_per_token <= MAX_RECOMPUTE_US:
            raise ValueError(f"recompute_us_per_token must be in [0, {MAX_RECOMPUTE_US}], "
                             f"got {self.recompute_us_per_token}")

    def override(self, **values: Any) -> ServerTuning:
        """This tuning with every value that is not None replaced (the evaluation's command-line knobs)."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})


# ------------------------------------------------------------------------------------------------ server side
@dataclass
class KVFetchRequested(SessionEvent):
    stream_id: int
    fetch: KvFetch


@dataclass
class KVChunkNeeded(SessionEvent):
    stream_id: int
    index: int
    level: str


@dataclass
class KVFetchRefused(SessionEvent):
    """Server: the session itself refused a fetch stream (too many at once) with an ERROR; the connection and
    its other fetches go on. For the driver's logs and counters only."""

    stream_id: int
    code: int
    reason: str


@dataclass
class KVFetchClosed(SessionEvent):
    stream_id: int
    levels: list[str]
    complete: bool
    decisions: list[dict[str, Any]] = field(default_factory=list)  # the controller's inputs per chunk
    # a complete fetch: from its KV_FETCH to the client's FIN, sent once it has decoded every chunk (the
    # server's view of the fetch time: both ends one uplink trip late, so the client's but for jitter), and
    # the deadline it had
    elapsed_s: float | None = None
    deadline_ms: int | None = None
    # ...and the prefill the client's engine still does after it (text chunks, a prefix fetch's missing tokens,
    # at the fetch's recompute cost): what the controller counted against the deadline (KVServerSession._prefill_s)
    prefill_s: float = 0.0


@dataclass
class ServerFetch:
    stream_id: int
    fetch: KvFetch | None
    decoder: StreamDecoder
    received_at: float
    plan: ContextPlan | None = None
    controller: KVController | None = None
    forecaster: Any = None
    next_index: int = 0
    pending: bool = False  # a chunk was asked for and not yet written
    levels: list[str] = field(default_factory=list)
    last_stream: int | None = None
    bytes_written: int = 0
    bytes_acked: int = 0
    acked: set[int] = field(default_factory=set)
    last_done_us: int | None = None
    done_sent: bool = False
    closed: bool = False
    samples: int = 0  # throughput samples this fetch contributed
    chunk_streams: list[tuple[int, int]] = field(default_factory=list)  # (stream id, bytes written on it)
    ack_mark: tuple[float, int] | None = None  # (when, acked bytes) at the first QUIC ACK progress seen
    first_sent_at: float | None = None  # when the first chunk was written
    probe: int | None = None  # the chunk sent at the lowest level to measure the link (KVController._probe_fits)
    probe_sent_at: float | None = None  # ...and when it was written
    probe_bps: float | None = None  # ...and its delivery rate, once QUIC acknowledged all of it (_probe_rate)
    decisions: list[dict[str, Any]] = field(default_factory=list)


class KVServerSession(_SessionBase):
    """Server side of one KV connection (sans-I/O). The driver answers its events with ``start``/``send_chunk``."""

    def __init__(self, quic: QuicConnection, *, tuning: ServerTuning | None = None, max_fetches: int = 16,
                 marking: MarkingPolicy | None = None, forecaster_factory: Callable[[str], Any] | None = None
                 ) -> None:
        # credit a fixed FLOW_WINDOW ahead of what is read, as the token server's: aioquic's doubling let a client
        # that withheld a fetch stream's first byte have all it sent after the gap buffered (a fetch is ~100 bytes)
        read_credit(quic)
        super().__init__(quic)
        self.tuning = tuning or ServerTuning()
        self.max_fetches = max_fetches
        self.marking = marking
        self.fetches: dict[int, ServerFetch] = {}
        self._forecaster_factory = forecaster_factory
        self._forecasters: dict[str, Any] = {}
        self._sample_at: dict[int, float] = {}  # forecaster -> when its newest sample arrived
        self.link_rates: deque[float] = deque(maxlen=LINK_SAMPLES)  # every fetch's chunk rates, bit/s

    # -- driver API -----------------------------------------------------------------------------------------
    def start(self, stream_id: int, plan: ContextPlan, now: float) -> None:
        """Accept a fetch: KV_META goes out; chunks follow as the session asks for them."""
        f = self.fetches.get(stream_id)
        if f is None or f.closed:
            return
        f.plan = plan
        assert f.fetch is not None  # the driver starts a fetch on its KVFetchRequested event
        legacy = self.tuning.legacy_controller
        rtt = self._path_rtt(legacy)
        prior, prior_low = (self.tuning.prior_bps, PRIOR_LOW) if legacy else self.link_prior()
        f.controller = KVController(f.fetch.controller, prior_bps=prior, rtt_s=rtt, prior_low=prior_low,
                                    stale_factor=self.tuning.stale_factor, reserve=self.tuning.reserve,
                                    legacy=legacy, guard_weight=self.tuning.guard_weight,
                                    firm_guard_weight=self.tuning.firm_guard_weight)
        kind = self._kind(f)
        fc = self._forecasters.get(kind)  # one per connection, shared by the fetches running together...
        if fc is None or (not legacy and now - self._sample_at.get(id(fc), -math.inf) > STALE_S):
            # ...but samples older than STALE_S describe another moment of the link, and kept in the history they
            # would steer this fetch's forecast (measured: a 6.6 Mbit/s median from an earlier fetch's samples
            # sent a chunk high where this fetch had measured 2.4, and missed). The legacy rule keeps them.
            if fc is not None:
                self._sample_at.pop(id(fc), None)
            fc = self._forecasters[kind] = self._make_forecaster(kind)
        f.forecaster = fc
        self._send(stream_id, KvMeta(len(plan.token_counts), plan.chunk_tokens, plan.tokens, list(plan.geometry),
                                     plan.fingerprint, plan.dtype))

    def link_prior(self) -> tuple[float, float]:
        """What plans a fetch's first chunk, before it has measured anything: (median, low quantile as a share
        of it). Once the connection has carried ``LINK_MIN_SAMPLES`` chunks, the median and ``LINK_LOW_Q``
        quantile of their rates (what this link has delivered, across fetches); before, the configured prior.

        A recent forecast cannot serve here (samples older than ``STALE_S`` describe another moment of the link,
        see :meth:`start`), but the link's range can: a cellular link that has ranged over 1-10 Mbit/s makes
        a fixed 5 Mbit/s prior optimistic at its low end (measured, Verizon-LTE: a first chunk sent ``high``
        on the prior's guard took 2-3.8 s in 5 of the 7 missed fetches of 150, kv_vsim seed 100)."""
        if self.tuning.link_prior and len(self.link_rates) >= LINK_MIN_SAMPLES:
            rates = sorted(self.link_rates)
            med = rates[len(rates) // 2]
            low = rates[int(LINK_LOW_Q * (len(rates) - 1))]
            return med, low / med
        return self.tuning.prior_bps, PRIOR_LOW

    def _kind(self, f: ServerFetch) -> str:
        return "ewma" if f.fetch is not None and f.fetch.controller in ("tokenwire-ewma", "even-split") \
            else self.tuning.forecaster

    def _make_forecaster(self, kind: str) -> Any:
        if self._forecaster_factory is not None:
            return self._forecaster_factory(kind)
        from tokenwire.predictor.bandwidth import make_forecaster

        return make_forecaster(kind)

    def send_chunk(self, stream_id: int, index: int, level: str, payload: bytes, now: float) -> None:
        f = self.fetches.get(stream_id)
        if f is None or f.closed or f.plan is None or index != f.next_index:
            return
        sid = self.quic.get_next_available_stream_id(is_unidirectional=True)
        head = KvChunk(stream_id, index, level, len(payload), zlib.crc32(payload), f.plan.token_counts[index],
                       int(now * 1e6))
        data = encode_stream_frame(head) + payload
        self.quic.send_stream_data(sid, data, end_stream=True)
        f.levels.append(level)
        if f.first_sent_at is None:
            f.first_sent_at = now
        if index == f.probe:
            f.probe_sent_at = now
        f.chunk_streams.append((sid, len(data)))
        f.last_stream = sid
        f.bytes_written += len(payload)
        f.next_index += 1
        f.pending = False

    def reject(self, stream_id: int, code: int, message: str) -> None:
        """Fail a fetch with a typed ERROR (the connection and other fetches carry on)."""
        f = self.fetches.get(stream_id)
        if f is None or f.closed:
            return
        self._send(stream_id, Error(int(code), message[:1024]), end=True)
        f.closed = True
        self.fetches.pop(stream_id, None)
        self._stop_receiving(stream_id, code)  # a KV_ACK may be on its way: it must not read as a new fetch

    def poll(self, now: float) -> list[SessionEvent]:
        """Ask for the next chunk of every fetch whose previous chunk is (nearly) on the wire."""
        out: list[SessionEvent] = []
        for f in list(self.fetches.values()):
            if f.ack_mark is None and f.chunk_streams:
                acked = self._acked(f)
                if acked > 0:
                    f.ack_mark = (now, acked)
            if f.closed or f.plan is None or f.pending:
                continue
            n = len(f.plan.token_counts)
            if f.next_index >= n:
                if not f.done_sent and self._unsent(f.last_stream) == 0:
                    f.done_sent = True
                    self._send(f.stream_id, KvDone(n, list(f.levels)))
                continue
            if f.last_stream is not None and self._unacked(f) > self._lookahead(f, now):
                continue
            if self._awaiting_probe(f, now):
                continue
            level = self._decide(f, now)
            f.pending = True
            out.append(KVChunkNeeded(f.stream_id, f.next_index, level))
        return out

    # -- internals ------------------------------------------------------------------------------------------
    def _unsent(self, sid: int | None) -> int:
        if sid is None:
            return 0
        stream = self.quic._streams.get(sid)
        if stream is None:
            return 0
        s = stream.sender
        return max(0, s._buffer_stop - s.highest_offset)

    def _acked(self, f: ServerFetch) -> int:
        """Bytes of this fetch's chunk streams that QUIC has seen acknowledged (a stream gone is complete)."""
        return sum(self._stream_acked(sid, size) for sid, size in f.chunk_streams)

    def _stream_acked(self, sid: int, size: int) -> int:
        """Bytes of one chunk stream (``size`` written) that QUIC has seen acknowledged."""
        stream = self.quic._streams.get(sid)
        if stream is None:
            return size
        s = stream.sender
        return int(s._buffer_start + sum(r.stop - r.start for r in s._acked))

    def _explore(self, f: ServerFetch) -> tuple[bool, float | None]:
        """Whether this fetch may send a probe (``KVController.choose``'s ``explore``), and what the connection
        has measured so far (``measured_bps``: the median of its chunk rates, if any).

        While the connection has no link prior of its own (fewer than ``LINK_MIN_SAMPLES`` chunk rates) its
        first chunks are planned on the configured prior, and text chunks give no rate sample: where that prior
        makes recomputing look cheaper than sending (5 Mbit/s on a loopback or LAN path, SmolLM2's 700 tokens at
        the default prefill cost), every fetch went text, whatever its deadline, and the prior never moved. One
        probe per fetch at most; none once the link prior exists (it is measured: on a link it says is slow, text
        is the right choice), nor for the legacy rule (ablations)."""
        assert f.controller is not None
        if not self.tuning.probe or f.probe is not None or f.controller.legacy:
            return False, None
        if self.tuning.link_prior and len(self.link_rates) >= LINK_MIN_SAMPLES:
            return False, None
        rates = sorted(self.link_rates)
        return True, (rates[len(rates) // 2] if rates else None)

    def _probe_rate(self, f: ServerFetch, now: float) -> float | None:
        """The probe chunk's delivery rate, bit/s, once QUIC has acknowledged all of it: its bytes over the time
        from its write to now, less one min-RTT (the last ACK's trip). On a fast path the chunk is delivered
        long before ``fresh_rate`` has its ``FRESH_MIN_S`` of ACKs; measured over the whole chunk (slow start
        included: an underestimate, never a burst's overestimate) it needs no such span. None before."""
        if f.probe_bps is not None:  # measured once, when its last byte was acknowledged (not "to now" at each poll)
            return f.probe_bps
        if f.probe is None or f.probe_sent_at is None or f.probe >= len(f.chunk_streams):
            return None
        sid, size = f.chunk_streams[f.probe]
        if size < MIN_SAMPLE_BYTES or self._stream_acked(sid, size) < size:
            return None
        span = now - f.probe_sent_at - min_rtt(self.quic, default=0.0)
        f.probe_bps = size * 8 / max(span, POLL_S)
        return f.probe_bps

    def _awaiting_probe(self, f: ServerFetch, now: float) -> bool:
        """Hold the decision after a probe until the probe has measured the link: decided at the usual look-ahead,
        on a fast path the next chunk came before any rate existed, was cold again, and went text (or probed
        again). The wait is the probe's last bytes and their ACK: the link idles for about one RTT, once."""
        if f.probe is None or f.next_index != f.probe + 1 or f.samples:
            return False
        if f.probe < len(f.chunk_streams) and f.chunk_streams[f.probe][1] < MIN_SAMPLE_BYTES:
            # encoded smaller than its predicted size: it can give no rate, and waiting for one held the fetch
            return False
        if self.tuning.fresh_rate and self.fresh_rate(f, now) is not None:
            return False
        return self._probe_rate(f, now) is None

    def fresh_rate(self, f: ServerFetch, now: float) -> float | None:
        """This fetch's own delivery rate from QUIC ACKs, bit/s: known ~one RTT after the first chunk starts,
        long before the first chunk's KV_ACK, so the first chunks need not be planned with an older fetch's
        forecast. None until it spans ``FRESH_MIN_S`` and ``FRESH_MIN_BYTES``.

        The lower of two rates: since the first ACK progress, and over the whole fetch (first write + min-RTT
        to now). The second counts a stall before the first ACK, after which a link's queued packets arrive
        in a burst (measured: 15.8 Mbit/s over the burst where the chunk took 2 s at ~1 Mbit/s)."""
        if f.ack_mark is None:
            return None
        t0, a0 = f.ack_mark
        acked = self._acked(f)
        da, dt = acked - a0, now - t0
        if dt < FRESH_MIN_S or da < FRESH_MIN_BYTES:
            return None
        rate = da * 8 / dt
        if f.first_sent_at is not None:
            span = now - f.first_sent_at - min_rtt(self.quic, default=0.0)
            rate = min(rate, acked * 8 / max(span, dt))
        return rate

    def _path_rtt(self, legacy: bool = False) -> float:
        """The path's round trip, half of it taken off a fetch's time left for the request's trip and half for
        the last byte's: the min-RTT (the smoothed RTT until QUIC has a sample; the legacy rule keeps the
        smoothed RTT). The smoothed RTT carries the queue a previous fetch built into the next one (no ACKs in
        the gap between fetches), and the queueing part of the last byte's trip is already in the bytes/rate
        cost: measured (v5, kv_vsim seeds 500 + 600), a fetch's first decision started a median 0.35 s
        (TMobile-LTE, 4 s deadline) and 0.60 s (Verizon-LTE, 8 s) short on a path of 40 ms."""
        smoothed = smoothed_rtt(self.quic, default=0.0)
        return smoothed if legacy else min_rtt(self.quic, default=smoothed)

    def _unacked(self, f: ServerFetch) -> int:
        """Bytes of this fetch written but not yet acknowledged by QUIC: unsent, in the network, or delivered
        with their ACK still on its way back."""
        return sum(size for _, size in f.chunk_streams) - self._acked(f)

    def _lookahead(self, f: ServerFetch, now: float) -> int:
        """Decide the next chunk when only this many of the fetch's bytes are unacknowledged: one min-RTT (what
        the ACK clock lags) plus ``LOOKAHEAD_S`` at the current rate, so the bottleneck queue still holds
        ``LOOKAHEAD_S`` of data when the next chunk is written (the link does not idle) while the decision sees
        the newest ACKs. Counting unsent bytes only would decide every chunk as soon as the congestion window
        swallows the previous one: with a deep bottleneck queue, long before any of it is delivered."""
        bps = self.fresh_rate(f, now)
        if bps is None:
            fc = f.forecaster.forecast() if f.forecaster is not None else None
            bps = fc.median_bps if fc is not None else self.tuning.prior_bps
        return max(MIN_LOOKAHEAD, int(bps / 8 * (LOOKAHEAD_S + min_rtt(self.quic, default=0.1))))

    def _recompute_us(self, f: ServerFetch) -> int:
        """The fetch's engine prefill cost per token: its own, else the configured default."""
        rc = f.fetch.recompute_us_per_token if f.fetch is not None else None
        return self.tuning.recompute_us_per_token if rc is None else rc

    def _prefill_s(self, f: ServerFetch) -> float:
        """Prefill the client's engine does after the transfer, committed so far: the chunks sent as text and the
        part of the context the store lacks (a prefix fetch). The client's ``FetchReport`` counts the same."""
        assert f.plan is not None
        text = sum(f.plan.token_counts[i] for i, lv in enumerate(f.levels) if lv == TEXT)
        return (text + f.plan.rest_tokens) * self._recompute_us(f) / 1e6

    def _decide(self, f: ServerFetch, now: float) -> str:
        assert f.fetch is not None and f.plan is not None and f.controller is not None
        rc = self._recompute_us(f)
        opts = []
        for i in range(f.next_index, len(f.plan.token_counts)):
            toks = f.plan.token_counts[i]
            dec = f.plan.elements[i] / self.tuning.decode_elements_per_s
            opts.append(ChunkOptions(dict(f.plan.sizes[i]), 4 * toks, toks * rc / 1e6, dict.fromkeys(LEVELS, dec)))
        fc = f.forecaster.forecast()
        time_left = f.received_at + f.fetch.deadline_ms / 1000.0 - self._path_rtt(f.controller.legacy) / 2 - now
        # Text chunks already sent are recomputed by the client's engine after the transfer: time not yet spent
        # but committed. Uncounted, each text chunk looked free once sent, and a fetch planned on a slow link
        # prior went text, text, text, text: 9.1 s of recompute for an 8 s deadline (kv_vsim Verizon-LTE seed 600,
        # every fetch after the second, since text chunks give no rate sample to move the prior). The part of
        # the context the store lacks (a prefix fetch) is prefilled as well.
        time_left -= self._prefill_s(f)
        # samples from earlier fetches describe another moment of the link: stale until this fetch has its own.
        # This fetch's own samples are never stale: their age is the time its chunk in flight has taken, and
        # dropping them for the prior just when the link is slow planned the next chunks on a better link
        # than the one measured (kv_vsim, Verizon-LTE seed 200: an in-fetch decision on a >1 s old sample in
        # every one of tokenwire's 8 misses in 150 fetches). The legacy rule keeps the age.
        if not f.samples:
            age = float("inf")
        else:
            age = now - self._sample_at.get(id(f.forecaster), now) if f.controller.legacy else 0.0
        med, low = (fc.median_bps, fc.low_bps) if fc else (None, None)
        fresh = self.fresh_rate(f, now) if self.tuning.fresh_rate and not f.samples else None
        if fresh is None and not f.samples:  # the probe's own measurement (taken whatever tuning.fresh_rate says)
            fresh = self._probe_rate(f, now)
        if fresh is not None and not f.controller.legacy:
            # no chunk sample of its own yet, but QUIC has measured this fetch's delivery rate: that is the median
            # now, with the forecaster's relative spread as its low quantile (from its history if it has one, else
            # what it forecasts from this one rate: ONNX its calibrated spread, EWMA 0.75)
            if not (med and low):
                one, acked = self._make_forecaster(self._kind(f)), self._acked(f)
                one.observe(acked, acked * 8 / fresh)
                first = one.forecast()
                med, low = (first.median_bps, first.low_bps) if first else (1.0, 0.75)
            med, low, age = fresh, fresh * low / med, 0.0
        # What is still to cross the link: the bytes QUIC has not seen acknowledged. The next chunk is decided
        # when little of the previous one is left (see _lookahead), long before that chunk's KV_ACK (sent once
        # it is received and decoded): counted until its KV_ACK, a 650 KB chunk delivered but for its last
        # 30 KB was priced again, 2.2 s of an 8 s budget (kv_vsim, Verizon-LTE). The legacy rule keeps that count.
        inflight = f.bytes_written - f.bytes_acked if f.controller.legacy else self._unacked(f)
        explore, measured = self._explore(f)
        d = f.controller.choose(opts, time_left_s=time_left, inflight_bytes=inflight,
                                median_bps=med, low_bps=low, sample_age_s=age, explore=explore, measured_bps=measured)
        if d.probe:
            f.probe = f.next_index
        f.decisions.append({"index": f.next_index, "level": d.level, "planned": list(d.planned),
                            "median_bps": med, "low_bps": low, "fresh": fresh is not None,
                            "age_s": age if math.isfinite(age) else None,
                            "budget_s": d.budget_s, "time_left_s": time_left, "inflight_bytes": inflight,
                            "probe": d.probe})
        return d.level

    def _on_stream_data(self, stream_id: int, data: bytes, end: bool, now: float) -> list[SessionEvent]:
        if stream_id % 4 != 0:
            raise ProtocolError(f"stream {stream_id}: KV fetches travel on client-initiated bidirectional streams")
        f = self.fetches.get(stream_id)
        out: list[SessionEvent] = []
        if f is None:
            if self._late(stream_id, end):  # the rest of a refused KV_FETCH, a KV_ACK that crossed our ERROR
                return []
            if not data and end:
                return []
            if len(self.fetches) >= self.max_fetches:
                return self._refuse(stream_id, ErrorCode.LIMIT_EXCEEDED, "too many concurrent fetches", end)
            f = ServerFetch(stream_id, None, StreamDecoder(), now)
            self.fetches[stream_id] = f
        try:
            frames = f.decoder.feed(data)
        except UnsupportedVersion as exc:
            if f.fetch is not None or exc.decoded:
                raise ProtocolError(f"fetch stream {stream_id}: {exc}", code=exc.code) from None
            # a client cannot know the server's version in advance: this fetch is refused, not the connection
            self.fetches.pop(stream_id, None)
            return self._refuse(stream_id, ErrorCode.UNSUPPORTED_VERSION, str(exc), end)
        except FrameError as exc:
            raise ProtocolError(f"fetch stream {stream_id}: {exc}", code=exc.code) from None
        for frame in frames:
            out.extend(self._on_frame(f, frame, now))
        if end:
            if f.decoder.pending:  # (the token server checks this too: a partial KV_ACK was dropped unnoticed)
                raise ProtocolError(f"fetch stream {stream_id}: truncated frame at end of stream")
            if f.done_sent or f.closed:
                self._fin(stream_id)
                self.fetches.pop(stream_id, None)
                took, deadline = ((now - f.received_at, f.fetch.deadline_ms) if f.done_sent and f.fetch is not None
                                  else (None, None))
                prefill = self._prefill_s(f) if f.done_sent and f.plan is not None else 0.0
                out.append(KVFetchClosed(stream_id, list(f.levels), f.done_sent, list(f.decisions), took, deadline,
                                         prefill))
            elif f.fetch is None:
                raise ProtocolError(f"fetch stream {stream_id} ended without a KV_FETCH")
            else:  # the client gave up: stop sending this fetch
                f.closed = True
                self._fin(stream_id)
                self.fetches.pop(stream_id, None)
                out.append(KVFetchClosed(stream_id, list(f.levels), False))
        return out

    def _refuse(self, stream_id: int, code: ErrorCode, reason: str, end: bool) -> list[SessionEvent]:
        """Refuse a fetch stream before it becomes a fetch (a KV_FETCH of many token ids spans packets); only
        this fetch ends."""
        self._refuse_stream(stream_id, code, reason, end)
        return [KVFetchRefused(stream_id, int(code), reason)]

    def _on_frame(self, f: ServerFetch, frame: Frame, now: float) -> list[SessionEvent]:
        if f.fetch is None:
            if not isinstance(frame, KvFetch):
                raise ProtocolError(f"fetch stream {f.stream_id}: first frame must be KV_FETCH")
            f.fetch = frame
            return [KVFetchRequested(f.stream_id, frame)]
        if isinstance(frame, KvAck):
            self._on_ack(f, frame, now)
            return []
        if isinstance(frame, Error):  # the client reports a problem; its FIN or reset follows (as on the token
            return []  # channel: it closed the connection here, ending every other fetch on it)
        raise ProtocolError(f"fetch stream {f.stream_id}: unexpected {type(frame).__name__} frame")

    def _on_ack(self, f: ServerFetch, ack: KvAck, now: float) -> None:
        if f.plan is None or ack.index >= f.next_index or ack.index in f.acked:
            raise ProtocolError(f"KV_ACK for chunk {ack.index}, which was not sent")
        f.acked.add(ack.index)
        f.bytes_acked += ack.size
        start = ack.first_us if f.last_done_us is None else max(ack.first_us, f.last_done_us)
        f.last_done_us = max(ack.done_us, f.last_done_us or 0)
        if ack.size >= MIN_SAMPLE_BYTES and ack.done_us > start and f.forecaster is not None:
            f.forecaster.observe(ack.size, (ack.done_us - start) / 1e6)
            self.link_rates.append(ack.size * 8e6 / (ack.done_us - start))
            self._sample_at[id(f.forecaster)] = now
            f.samples += 1
        self._ecn_feedback(ack.ecn, now)

    def _on_datagram(self, frame: Any, now: float) -> list[SessionEvent]:
        raise ProtocolError("the KV channel carries no datagrams")

    def _on_stream_reset(self, stream_id: int, code: int) -> list[SessionEvent]:
        f = self.fetches.pop(stream_id, None)
        if f is None:
            return []
        f.closed = True
        self._reset_own_side(stream_id)
        return [KVFetchClosed(stream_id, list(f.levels), False)]

    def _on_stop_sending(self, stream_id: int) -> list[SessionEvent]:
        """The client asked us to stop sending on its fetch stream (writing KV_META, KV_DONE or an ERROR on it
        now would raise): it gave up on the fetch, which ends alone."""
        f = self.fetches.pop(stream_id, None)
        if f is None:  # before its KV_FETCH arrived (lost, retransmitted): drop that when it comes
            if self._peer_sending(stream_id):
                self._ended.add(stream_id)
            return []
        f.closed = True
        self._stop_receiving(stream_id, ErrorCode.CANCELLED)
        # a last KV_ACK may come with the FIN in this very packet, after aioquic marked the side finished
        self._ended.add(stream_id)
        return [KVFetchClosed(stream_id, list(f.levels), False, list(f.decisions))]

    def _on_terminated(self, event: qe.ConnectionTerminated) -> list[SessionEvent]:
        # one outcome per fetch asked for: a stream whose KV_FETCH never decoded (malformed, the cause of this
        # close) was no fetch, and counted as an abandoned one
        out: list[SessionEvent] = [KVFetchClosed(f.stream_id, list(f.levels), False)
                                   for f in self.fetches.values() if f.fetch is not None]
        self.fetches.clear()
        return out

    def _session_timer(self) -> float | None:
        if any(not f.closed and f.plan is not None and not f.pending and not f.done_sent
               for f in self.fetches.values()):
            return self._now + POLL_S
        return None

    def _on_session_timer(self, now: float) -> list[SessionEvent]:
        return self.poll(now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        if self.marking is not None:
            self.current_codepoint = self.marking.codepoint(now)
        return super().datagrams_to_send(now)


# ------------------------------------------------------------------------------------------------ client side
@dataclass
class KVMetaReceived(SessionEvent):
    stream_id: int
    meta: KvMeta


@dataclass
class KVChunkReceived(SessionEvent):
    stream_id: int  # the fetch
    header: KvChunk
    payload: bytes
    first_at: float
    done_at: float


@dataclass
class KVDoneReceived(SessionEvent):
    stream_id: int
    done: KvDone


@dataclass
class KVFetchFailed(SessionEvent):
    stream_id: int
    error: TokenwireError


@dataclass
class _Incoming:
    buf: bytearray = field(default_factory=bytearray)
    header: KvChunk | None = None
    first_at: float | None = None


@dataclass
class _ClientFetch:
    """The client session's view of one open fetch: enough to judge each of its chunk streams at its header,
    before the bytes it announces are kept."""

    asked_tokens: int | None  # fetched by token ids: how many
    asked_chunks: int | None  # fetched by hashes: how many
    decoder: StreamDecoder = field(default_factory=StreamDecoder)
    meta: KvMeta | None = None
    done: bool = False
    headers: dict[int, KvChunk] = field(default_factory=dict)  # index -> the header of its chunk stream
    tokens: int = 0  # tokens those headers announce
    streams: set[int] = field(default_factory=set)  # its chunk streams whose end has not come yet
    bytes_in: int = 0  # its chunk bytes received: the fetch's progress while a big chunk arrives


_CODED_TABLE = 2 + 2 * 256  # a frequency table at its largest: lo, hi, 256 u16 frequencies


def max_codec_chunk_bytes(geometry: Sequence[int], tokens: int) -> int:
    """The largest CacheGen bitstream (format 1, ``cachegen/bitstream.py``) of ``tokens`` tokens at ``geometry``
    ([layers, kv heads, head dim]): the decoder refuses a longer one (every section's length follows from the
    header, trailing bytes are an error). Every term at its worst: each channel its own rANS stream, at most
    one 16-bit word per symbol plus a 2-word final state per stream (rans.py), 255 tables, every token also
    kept raw as fp32. About 6 bytes per element; a real chunk is 0.2-0.5."""
    from .cachegen.bitstream import CRC, HEADER, MAX_TABLES, SIDE_STREAM

    layers, heads, dim = geometry
    channels = 2 * layers * heads * dim  # K and V: one rANS stream at most per channel
    elements = channels * tokens

    def coded(n: int) -> int:  # a side section of n bytes: table, word counts, <= n + 2 words per stream
        k = -(-n // SIDE_STREAM)
        return _CODED_TABLE + 2 * k + 2 * (n + 3 * k)

    side = 4 * coded(channels) + coded(2 * layers * tokens)
    payload = 2 * channels + 2 * (elements + 2 * channels)  # word counts, words
    return HEADER.size + CRC.size + 2 * layers + side + MAX_TABLES * _CODED_TABLE + 4 * elements + payload


def _chunk_misfit(hdr: KvChunk, meta: KvMeta | None, max_chunks: int | None) -> str | None:
    """Why one chunk header cannot be part of its fetch (None: it can): an index past KV_META's chunk count
    (or past the hashes asked for), a text chunk whose size is not its tokens' int32s, a codec chunk longer
    than any bitstream of its tokens at KV_META's geometry. Before KV_META only the frame's own limit
    (``MAX_KV_CHUNK_BYTES``) bounds a codec chunk: KV_META checks it again when it comes."""
    if max_chunks is not None and hdr.index >= max_chunks:
        return f"chunk {hdr.index} of a fetch of {max_chunks} chunk hashes"
    if hdr.level == TEXT:
        if hdr.size != 4 * hdr.tokens:
            return f"text chunk {hdr.index}: {hdr.size} bytes for {hdr.tokens} tokens"
        return None if meta is None or hdr.index < meta.chunks else f"chunk {hdr.index} of {meta.chunks} (KV_META)"
    if meta is None:
        return None
    if hdr.index >= meta.chunks:
        return f"chunk {hdr.index} of {meta.chunks} (KV_META)"
    bound = max_codec_chunk_bytes(meta.geometry, hdr.tokens)
    if hdr.size > bound:
        return (f"chunk {hdr.index}: {hdr.size} bytes announced, more than the {bound} any {hdr.tokens}-token "
                f"chunk of geometry {meta.geometry} can take")
    return None


class KVClientSession(_SessionBase):
    """Client side of one KV connection (sans-I/O).

    Each chunk stream is judged at its header: one for a fetch that is not open (never asked for, or over),
    or that cannot be part of its fetch (:func:`_chunk_misfit`, an index already announced, more tokens than
    asked or announced) gets STOP_SENDING and its bytes are dropped (the latter also fails the fetch), so a
    server cannot make the client keep what it will never use; when a fetch ends, every chunk stream of it
    still arriving is stopped the same way."""

    def __init__(self, quic: QuicConnection) -> None:
        super().__init__(quic)
        self.fetches: dict[int, _ClientFetch] = {}
        self.incoming: dict[int, _Incoming] = {}
        self.ecn_counts: Callable[[], list[int]] | None = None
        # fetch streams this side may still write on (KV_ACKs, the final FIN): not after our FIN, nor after the
        # server's STOP_SENDING (aioquic has reset our side then, and a write would raise)
        self._sending: set[int] = set()

    def bytes_in(self, fetch_sid: int) -> int:
        """Chunk bytes received for this fetch: its progress while a big chunk arrives (another fetch's bytes, or
        bytes for no fetch, are not: they kept a 1-s fetch waiting 45-73 s)."""
        f = self.fetches.get(fetch_sid)
        return f.bytes_in if f is not None else 0

    def _session_timer(self) -> float | None:
        """A PING after each KV_RECOVERY_PING_S of silence while a fetch is pending: after a loss outage the
        first one to cross makes the server probe at once (:mod:`.path_recovery`), instead of after its
        backed-off probe timer, which can run past a fetch's deadline."""
        return self._silence_ping_at(KV_RECOVERY_PING_S) if self.fetches else None

    def _on_session_timer(self, now: float) -> list[SessionEvent]:
        self._ping_if_due(self._session_timer(), now)
        return []

    def fetch(self, request: KvFetch) -> int:
        sid = self.quic.get_next_available_stream_id()
        self.fetches[sid] = _ClientFetch(
            len(request.token_ids) if request.token_ids is not None else None,
            len(request.hashes) if request.hashes is not None else None)
        self._sending.add(sid)
        self._send(sid, request)
        return sid

    def ack(self, fetch_sid: int, header: KvChunk, first_at: float, done_at: float) -> None:
        if fetch_sid not in self.fetches or fetch_sid not in self._sending:
            return
        ecn = self.ecn_counts() if self.ecn_counts is not None else None
        self._send(fetch_sid, KvAck(header.index, header.size, int(first_at * 1e6), int(done_at * 1e6), ecn))

    def finish(self, fetch_sid: int) -> None:
        """The fetch is over for the caller (done, failed or given up): FIN our side of its stream, and
        STOP_SENDING on its chunk streams still arriving."""
        self._end_fetch(fetch_sid)

    def _end_fetch(self, fetch_sid: int) -> None:
        f = self.fetches.pop(fetch_sid, None)
        if f is not None:
            for sid in f.streams:
                self._stop_chunk_stream(sid)
        self._end_sending(fetch_sid)

    def _fail(self, fetch_sid: int, error: TokenwireError) -> list[SessionEvent]:
        self._end_fetch(fetch_sid)
        return [KVFetchFailed(fetch_sid, error)]

    def _stop_chunk_stream(self, sid: int, code: int = ErrorCode.CANCELLED) -> None:
        """Drop a chunk stream whose end has not been read: what it buffered now, what still comes on it until its
        FIN or reset (``_late``; aioquic may have parsed the FIN already, its data event still to come), and ask
        the server to stop sending it."""
        self.incoming.pop(sid, None)
        self._ended.add(sid)
        if self._peer_sending(sid):
            self.quic.stop_stream(sid, int(code))

    def _end_sending(self, sid: int) -> None:
        if sid in self._sending:
            self._sending.discard(sid)
            self._fin(sid)

    def _on_stop_sending(self, stream_id: int) -> list[SessionEvent]:
        # the server wants nothing more on this stream (it refused or rejected the fetch; its ERROR may still be
        # on its way): aioquic has reset our side, so no KV_ACK or FIN may be written on it any more
        self._sending.discard(stream_id)
        return []

    def _on_stream_data(self, stream_id: int, data: bytes, end: bool, now: float) -> list[SessionEvent]:
        if stream_id % 4 == 3:
            return self._on_chunk_data(stream_id, data, end, now)
        f = self.fetches.get(stream_id)
        if f is None:
            return []
        try:
            frames = f.decoder.feed(data)
        except FrameError as exc:
            raise ProtocolError(f"fetch stream {stream_id}: {exc}", code=exc.code) from None
        out: list[SessionEvent] = []
        for fr in frames:
            if isinstance(fr, KvMeta):
                if f.meta is not None:
                    return out + self._fail(stream_id, KVError("a second KV_META", code=ErrorCode.MALFORMED_FRAME))
                # chunks that overtook it (their packets came first) are judged against it now
                problem = f"chunks of {f.tokens} tokens, KV_META: {fr.tokens}" if f.tokens > fr.tokens else None
                for hdr in f.headers.values():
                    problem = problem or _chunk_misfit(hdr, fr, f.asked_chunks)
                if problem is not None:
                    return out + self._fail(stream_id, KVCorruptChunk(problem))
                f.meta = fr
                out.append(KVMetaReceived(stream_id, fr))
            elif isinstance(fr, KvDone):
                # KV_META comes first on this same stream, and says how many chunks KV_DONE ends
                problem = ("KV_DONE before KV_META" if f.meta is None else "a second KV_DONE" if f.done
                           else None if fr.chunks == f.meta.chunks
                           else f"KV_DONE says {fr.chunks} chunks, KV_META {f.meta.chunks}")
                if problem is not None:
                    return out + self._fail(stream_id, KVError(problem, code=ErrorCode.MALFORMED_FRAME))
                f.done = True
                out.append(KVDoneReceived(stream_id, fr))
            elif isinstance(fr, Error):
                err_cls = KVNotFound if fr.code == ErrorCode.NOT_FOUND else RemoteError
                # the fetch is over: our FIN closes the stream at once; the server's FIN follows its ERROR and
                # nothing after it is read
                return out + self._fail(stream_id, err_cls(fr.message, code=known_code(fr.code)))
            else:
                raise ProtocolError(f"fetch stream {stream_id}: unexpected {type(fr).__name__} frame")
        return out

    def _on_chunk_data(self, sid: int, data: bytes, end: bool, now: float) -> list[SessionEvent]:
        if self._late(sid, end):
            return []  # a chunk stream we stopped
        inc = self.incoming.setdefault(sid, _Incoming())
        if inc.first_at is None and data:
            inc.first_at = now
        inc.buf += data
        f = self.fetches.get(inc.header.fetch) if inc.header is not None else None
        if f is not None:
            f.bytes_in += len(data)
        if inc.header is None and len(inc.buf) >= 4:
            (n,) = _LEN.unpack_from(inc.buf)
            if n > 4096:
                raise ProtocolError(f"chunk stream {sid}: header of {n} bytes", code=ErrorCode.FRAME_TOO_LARGE)
            if len(inc.buf) >= 4 + n:
                try:
                    hdr: Frame | None = decode_frame(bytes(inc.buf[4 : 4 + n]))
                except FrameError as exc:
                    raise ProtocolError(f"chunk stream {sid}: {exc}", code=exc.code) from None
                if not isinstance(hdr, KvChunk):
                    raise ProtocolError(f"chunk stream {sid}: first frame must be KV_CHUNK")
                del inc.buf[: 4 + n]
                f = self.fetches.get(hdr.fetch)
                if f is None:  # never asked for, or over (failed, timed out, given up): nobody will use it
                    self._drop_chunk_stream(sid, end, ErrorCode.CANCELLED)
                    return []
                problem = self._misfit(f, hdr)
                if problem is not None:
                    self._drop_chunk_stream(sid, end, ErrorCode.MALFORMED_FRAME)
                    return self._fail(hdr.fetch, KVCorruptChunk(problem))
                f.headers[hdr.index] = hdr
                f.tokens += hdr.tokens
                f.streams.add(sid)
                f.bytes_in += len(inc.buf)
                inc.header = hdr
        if inc.header is not None and len(inc.buf) > inc.header.size:
            raise ProtocolError(f"chunk stream {sid}: more bytes than announced")
        if not end:
            return []
        self.incoming.pop(sid, None)
        hdr = inc.header
        if hdr is None:
            raise ProtocolError(f"chunk stream {sid} ended before its header")
        if f is None:  # the fetch's end stops its chunk streams: unreachable, but never an event for no fetch
            return []
        f.streams.discard(sid)
        payload = bytes(inc.buf)
        if len(payload) != hdr.size or zlib.crc32(payload) != hdr.crc:
            return self._fail(hdr.fetch, KVCorruptChunk(
                f"chunk {hdr.index}: {len(payload)} of {hdr.size} bytes or checksum mismatch"))
        return [KVChunkReceived(hdr.fetch, hdr, payload, inc.first_at or now, now)]

    @staticmethod
    def _misfit(f: _ClientFetch, hdr: KvChunk) -> str | None:
        """Why a new chunk header cannot be part of fetch ``f`` (None: it can)."""
        if hdr.index in f.headers:  # it overwrote the first copy, and the fetch waited for a chunk never sent
            return f"chunk {hdr.index} announced twice"
        tokens = f.tokens + hdr.tokens  # all of them must add up to KV_META's count, at most what was asked
        for what, limit in (("asked", f.asked_tokens), ("KV_META", f.meta.tokens if f.meta else None)):
            if limit is not None and tokens > limit:
                return f"chunks of {tokens} tokens, {what}: {limit}"
        return _chunk_misfit(hdr, f.meta, f.asked_chunks)

    def _drop_chunk_stream(self, sid: int, end: bool, code: int) -> None:
        """Refuse a chunk stream at its header (``end``: its FIN came with it, nothing more will)."""
        if end:
            self.incoming.pop(sid, None)
        else:
            self._stop_chunk_stream(sid, code)

    def _on_datagram(self, frame: Any, now: float) -> list[SessionEvent]:
        raise ProtocolError("the KV channel carries no datagrams")

    def _on_stream_reset(self, stream_id: int, code: int) -> list[SessionEvent]:
        if stream_id % 4 == 3:  # a chunk stream: what it buffered goes
            inc = self.incoming.pop(stream_id, None)
            hdr = inc.header if inc is not None else None
            if hdr is not None and hdr.fetch in self.fetches:
                # its index is announced, so no other stream may bring it: the fetch cannot complete (it waited
                # for its timeout). A reset before the header names no fetch: that one still waits.
                self.fetches[hdr.fetch].streams.discard(stream_id)
                return self._fail(hdr.fetch, RemoteError(
                    f"server reset the stream of chunk {hdr.index} (code {code:#x})", code=known_code(code)))
            return []
        if stream_id in self.fetches:
            return self._fail(stream_id, RemoteError(f"server reset the fetch (code {code:#x})"))
        return []

    def _on_terminated(self, event: qe.ConnectionTerminated) -> list[SessionEvent]:
        err = closed_error(event.error_code, event.reason_phrase, idle_timeout_in_force(self.quic), "KV connection")
        out: list[SessionEvent] = [KVFetchFailed(s, err) for s in self.fetches]
        self.fetches.clear()
        self.incoming.clear()
        self._sending.clear()
        return out


# ------------------------------------------------------------------------------------------------ asyncio shells
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


def kv_quic_config(config: Any) -> Any:
    config.alpn_protocols = [KV_ALPN]
    config.max_datagram_frame_size = None  # KV frames never travel in datagrams: the extension is not offered
    config.max_data = FLOW_WINDOW
    config.max_stream_data = FLOW_WINDOW
    return config


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


def kv_congestion(marking: str) -> str:
    """Bulk KV marked ECT(1) must answer CE like L4S senders do (scalable); unmarked or classic: Reno."""
    return "prague" if marking == "l4s" else "reno"


# ------------------------------------------------------------------------------------------------ client SDK
@dataclass
class ChunkReport:
    index: int
    level: str
    bytes: int
    tokens: int
    first_byte_ms: float
    received_ms: float
    decode_ms: float
    decoded_ms: float


@dataclass
class FetchReport:
    """What one fetch cost and achieved (times in ms since the request was sent).

    ``fetch_ms`` ends when every chunk is received and decoded; the engine then still prefills the tokens that
    did not come as KV (text chunks, and a prefix fetch's tokens the store lacked): ``prefill_tokens`` at
    ``recompute_us_per_token``, ``prefill_ms``. ``deadline_met`` is ``fetch_ms + prefill_ms <= deadline_ms``,
    the controller's own accounting (it was ``fetch_ms`` alone: a prefix fetch leaving 4,000 tokens, ~9 s, to
    prefill reported met at 93 ms)."""

    deadline_ms: float
    fetch_ms: float
    deadline_met: bool
    chunks: list[ChunkReport]
    controller: str
    prefill_tokens: int = 0
    recompute_us_per_token: int = DEFAULT_RECOMPUTE_US  # the fetch's, or the default when it named none

    @property
    def prefill_ms(self) -> float:
        """The modelled prefill of ``prefill_tokens`` after the transfer."""
        return self.prefill_tokens * self.recompute_us_per_token / 1e3

    @property
    def levels(self) -> list[str]:
        return [c.level for c in self.chunks]

    @property
    def payload_bytes(self) -> int:
        return sum(c.bytes for c in self.chunks)

    @classmethod
    def from_timings(cls, *, deadline_ms: int, controller: str, sent_at: float, end: float,
                     received: dict[int, tuple[KvChunk, float, float]],
                     decode_times: dict[int, tuple[float, float]], missing_tokens: int = 0,
                     recompute_us_per_token: int | None = None) -> FetchReport:
        """The report of a fetch sent at ``sent_at`` and done at ``end``, from each chunk's (header, first byte,
        last byte) and (decode start, decode end), all on one clock (the SDK's, or the virtual testbed's).
        ``missing_tokens``: the context's tokens the store lacked (a prefix fetch), prefilled like text chunks
        at ``recompute_us_per_token`` (None: the fetch named none, the server used its default)."""
        chunks = []
        for i in range(len(received)):
            hdr, first, done = received[i]
            d0, d1 = decode_times[i]
            chunks.append(ChunkReport(i, hdr.level, hdr.size, hdr.tokens, (first - sent_at) * 1e3,
                                      (done - sent_at) * 1e3, (d1 - d0) * 1e3, (d1 - sent_at) * 1e3))
        fetch_ms = (end - sent_at) * 1e3
        prefill = sum(c.tokens for c in chunks if c.level == TEXT) + missing_tokens
        rc = DEFAULT_RECOMPUTE_US if recompute_us_per_token is None else recompute_us_per_token
        return cls(float(deadline_ms), fetch_ms, fetch_ms + prefill * rc / 1e3 <= deadline_ms, chunks, controller,
                   prefill, rc)

    def to_dict(self) -> dict[str, Any]:
        return {"deadline_ms": self.deadline_ms, "fetch_ms": self.fetch_ms, "deadline_met": self.deadline_met,
                "prefill_tokens": self.prefill_tokens, "prefill_ms": self.prefill_ms,
                "recompute_us_per_token": self.recompute_us_per_token,
                "controller": self.controller, "levels": self.levels, "payload_bytes": self.payload_bytes,
                "chunks": [vars(c) for c in self.chunks]}


@dataclass
class ChunkResult:
    index: int
    level: str
    kv: list[tuple[Any, Any]] | None  # per layer (K, V) [1, H, T, D] torch tensors; None for text
    token_ids: list[int] | None  # for chunks sent as text: recompute their KV from these


@dataclass
class KVFetchResult:
    chunks: list[ChunkResult]
    report: FetchReport
    geometry: tuple[int, int, int]
    # a prefix fetch (``fetch_kv(prefix=True)``) of a context stored only in part: the requested token ids past
    # the stored prefix (by token ids), or how many of the requested chunks were not stored (by hashes)
    missing_token_ids: list[int] = field(default_factory=list)
    missing_chunks: int = 0
    token_ids: list[int] | None = None  # the context's ids as fetched (None: fetched by hashes)

    @property
    def stored_tokens(self) -> int:
        """Tokens of the context the server had stored (all of them, unless a prefix fetch found only part)."""
        return sum(c.kv[0][0].shape[-2] if c.kv is not None else len(c.token_ids or ()) for c in self.chunks)

    def prefix_kv(self) -> tuple[list[tuple[Any, Any]] | None, int]:
        """KV of the leading chunks that arrived as KV (concatenated), and how many tokens it covers.

        Everything after it (from the first text chunk on) must be recomputed by the engine from
        :meth:`text_token_ids`.
        """
        from .cachegen.codec import concat_tokens

        lead = []
        for c in self.chunks:
            if c.kv is None:
                break
            lead.append(c.kv)
        if not lead:
            return None, 0
        kv = concat_tokens(lead)
        return kv, int(kv[0][0].shape[-2])

    def text_token_ids(self) -> list[int]:
        """Token ids from the first text chunk on, KV chunks after it and the tokens the store lacked (a prefix
        fetch) included: what the engine prefills itself after :meth:`prefix_kv`, so that the two together are
        always the whole context. (The controller may send a chunk as KV after one as text: its ids used to be
        left out, and the engine prefilled a shorter, wrong context.) Fetched by hashes, such a KV chunk's ids
        are unknown here: ``ValueError`` (its KV is in :attr:`chunks`)."""
        lead = 0
        for c in self.chunks:
            if c.kv is None:
                break
            lead += int(c.kv[0][0].shape[-2])
        if self.token_ids is not None:
            return self.token_ids[lead:]
        out: list[int] = []
        started = False
        for c in self.chunks:
            started = started or c.kv is None
            if not started:
                continue
            if c.token_ids is None:
                raise ValueError(f"chunk {c.index} came as KV after a text chunk, and a fetch by hashes does not "
                                 "know its token ids: use res.chunks, or fetch by token ids")
            out.extend(c.token_ids)
        return out


@dataclass
class _PendingFetch:
    sent_at: float
    deadline_ms: int
    controller: str
    token_ids: list[int] | None
    meta: KvMeta | None = None
    done: KvDone | None = None
    received: dict[int, tuple[KvChunk, float, float]] = field(default_factory=dict)
    decodes: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    waiting: list[tuple[KvChunk, bytes]] = field(default_factory=list)  # codec chunks that overtook KV_META
    decode_times: dict[int, tuple[float, float]] = field(default_factory=dict)
    error: TokenwireError | None = None
    event: asyncio.Event = field(default_factory=asyncio.Event)


def _as_arguments(message: str) -> str:
    """The frame check's message naming ``fetch_kv``'s arguments (``deadline_ms``), not the wire's fields
    (``kvfetch.dl``), which the caller never sees."""
    names = {key: "auth_token" if spec[0] == "auth" else spec[0] for key, spec in KvFetch.FIELDS.items()}
    return re.sub(r"kvfetch\.(\w+)", lambda m: names.get(m[1], m[0]), message)


def _deadline_ms(deadline_ms: float) -> int:
    """The deadline as whole milliseconds, rounded up (truncated, 0.4 ms became 0 and was refused as no
    deadline); NaN, infinities and non-numbers are refused here (``int()`` would raise a bare "cannot convert
    float NaN to integer"). The range is the frame's check (``check_outgoing``)."""
    if isinstance(deadline_ms, bool) or not isinstance(deadline_ms, numbers.Real) or not math.isfinite(deadline_ms):
        raise ValueError(f"deadline_ms must be a finite number of milliseconds, got {deadline_ms!r}")
    return math.ceil(deadline_ms)


def _token_ids(token_ids: Iterable[SupportsIndex] | None) -> list[int] | None:
    """Token ids as Python ints: a tokenizer's numpy or torch integers are fine (msgpack cannot carry them),
    anything that is not an integer (floats, bools, strings) is refused by position."""
    if token_ids is None:
        return None
    if isinstance(token_ids, str | bytes | bytearray):
        raise ValueError("token_ids must be a sequence of integers, not a string")
    try:
        items = list(token_ids)
    except TypeError:
        raise ValueError(f"token_ids must be a sequence of integers, got {type(token_ids).__name__}") from None
    out: list[int] = []
    for i, t in enumerate(items):
        try:
            if isinstance(t, bool):  # an int subclass, but never a token id
                raise TypeError
            out.append(operator.index(t))
        except TypeError:
            raise ValueError(f"token_ids[{i}] is {t!r} ({type(t).__name__}), not an integer") from None
    return out


def _chunk_hashes(hashes: Iterable[bytes | str] | None) -> list[bytes] | None:
    """Chunk hashes as 16-byte ``bytes``; the hex strings ingest returns are taken as they are."""
    if hashes is None:
        return None
    if isinstance(hashes, str | bytes | bytearray):
        raise ValueError("hashes must be a list of chunk hashes, not a single one")
    out: list[bytes] = []
    for i, h in enumerate(hashes):
        if isinstance(h, str):
            try:
                h = bytes.fromhex(h)
            except ValueError:
                raise ValueError(f"hashes[{i}] is not a hex string: {h[:48]!r}") from None
        elif isinstance(h, bytes | bytearray | memoryview):
            h = bytes(h)
        else:
            raise ValueError(f"hashes[{i}] is a {type(h).__name__}: chunk hashes are 16 bytes or their hex string "
                             "(as ingest returns them)")
        out.append(h)
    return out


def _check_text_ids(results: list[ChunkResult], received: dict[int, tuple[KvChunk, float, float]],
                    ids: list[int] | None) -> None:
    """Fetched by token ids, a text chunk must carry the ids asked for at its place in the context: the engine
    prefills them as that context (other ids came back as if they were the context's)."""
    pos = 0
    for r in results:
        n = received[r.index][0].tokens
        if ids is not None and r.token_ids is not None and r.token_ids != ids[pos : pos + n]:
            raise KVCorruptChunk(f"text chunk {r.index}: not the token ids asked for at {pos}-{pos + n}")
        pos += n


def _check_done_levels(done: KvDone, results: list[ChunkResult]) -> None:
    """KV_DONE lists each chunk's level; the report takes them from the chunks' own headers, so a KV_DONE that
    disagrees is a broken server (it went unnoticed). The frame itself has one level per chunk."""
    for r, level in zip(results, done.levels, strict=True):
        if r.level != level:
            raise KVError(f"KV_DONE says chunk {r.index} is {level}, it came as {r.level}",
                          code=ErrorCode.MALFORMED_FRAME)


def _check_codec_header(hdr: KvChunk, meta: KvMeta, payload: bytes) -> None:
    """Compare a codec chunk's bitstream header with its KV_CHUNK and KV_META before decoding it (reading the
    header costs nothing; decoding first let an 8-token chunk whose bitstream said 16384 tokens expand to 188 M
    elements, 3 GB, before its token count was compared), and its level with the one KV_CHUNK reports (nothing
    compared them: a server could label any level as another). Raises ``KVCorruptChunk``, or the codec's
    ``KVCodecError`` for a header that does not parse."""
    from .cachegen.bitstream import read_header
    from .cachegen.levels import get_level

    bh = read_header(payload)
    if bh.n_tokens != hdr.tokens:
        raise KVCorruptChunk(f"chunk {hdr.index}: {bh.n_tokens} tokens, header says {hdr.tokens}")
    if [bh.n_layers, bh.n_heads, bh.head_dim] != list(meta.geometry):
        raise KVCorruptChunk(f"chunk {hdr.index} has geometry {[bh.n_layers, bh.n_heads, bh.head_dim]}, KV_META "
                             f"says {list(meta.geometry)}")
    if bh.dtype != meta.dtype:  # a mix would come back from prefix_kv() as whatever torch.cat promotes to
        raise KVCorruptChunk(f"chunk {hdr.index} is {bh.dtype}, KV_META says {meta.dtype}")
    if bh.level_id != get_level(hdr.level).level_id:
        raise KVCorruptChunk(f"chunk {hdr.index} is sent as {hdr.level}, its bitstream has level id {bh.level_id}")


def _forget_decodes(pf: _PendingFetch) -> None:
    """Decodes nobody will await (the fetch failed on another chunk, or timed out): cancel those not yet done
    and read the outcome of those done, so asyncio logs no "Future exception was never retrieved"."""
    for fut in pf.decodes.values():
        if not fut.done():
            fut.cancel()
        elif not fut.cancelled():
            fut.exception()


async def _wait_while_progressing(pf: Any, progress: Callable[[], Any], deadline_s: float, quiet_s: float) -> None:
    """Wait for ``pf``'s end; ``TimeoutError`` once ``progress()`` (KV_META, chunks, chunk bytes) has not changed
    for ``quiet_s``, the first check ``quiet_s`` after the deadline."""
    seen = progress()
    wait = deadline_s + quiet_s
    while True:
        try:
            await asyncio.wait_for(pf.event.wait(), wait)
            return
        except TimeoutError:
            now = progress()
            if now == seen:
                raise
            seen, wait = now, quiet_s


def _warm_decoder() -> float:
    """Load torch and the codec, compile or load its CPU kernels (the daemon's start-up warm-up,
    ``cachegen.codec.warm_up``); the seconds it took."""
    from .cachegen.codec import warm_up

    return warm_up()


def _warmed(fut: Future[float]) -> None:
    """A warm-up that failed costs nothing but its time: the first decode meets the same problem and fails its
    chunk with the reason. Read here, so that no "exception was never retrieved" is logged."""
    exc = None if fut.cancelled() else fut.exception()
    if exc is not None:
        log.warning("KV codec warm-up failed: %s: %s", type(exc).__name__, exc)


_warm_lock = threading.Lock()
_warm_up: Future[float] | None = None  # the process's codec warm-up, once started
WARM_WAIT_S = 5.0  # what connect_kv waits for it at most


def _forget_warm_up() -> None:
    """In a forked child: the parent's warm-up future has no thread behind it there (one forked while it ran
    stayed RUNNING, and every connect_kv in the child waited for it for ever); the child warms up afresh."""
    global _warm_lock, _warm_up
    _warm_lock, _warm_up = threading.Lock(), None


os.register_at_fork(after_in_child=_forget_warm_up)


def _start_warm_up(pool: ThreadPoolExecutor) -> Future[float]:
    """The process's codec warm-up: started once, on the first connection's decode thread; later connections
    share its future (one that failed is not tried again: the first decode says why)."""
    global _warm_up
    with _warm_lock:
        if _warm_up is None:
            _warm_up = pool.submit(_warm_decoder)
            _warm_up.add_done_callback(_warmed)
        return _warm_up


class KVConnection(SessionProtocol):
    """A client connection to a KV channel endpoint (from :func:`connect_kv`)."""

    def __init__(self, quic: QuicConnection, stream_handler: Any = None, *, decode_device: str = "cpu",
                 auth_token: str | None = None, warm: bool = True) -> None:
        super().__init__(quic, stream_handler, session_factory=KVClientSession)
        self._auth = auth_token
        self._fetches: dict[int, _PendingFetch] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tw-kv-decode")
        # On the decode thread, while the handshake runs (connect_kv waits for its end): a process's first decode
        # loaded torch, the codec and its kernels inside the first fetch's deadline (~0.4 s: 507 ms then 127 ms
        # for the same 250-ms fetch)
        self.warmed: Future[float] | None = _start_warm_up(self._pool) if warm else None
        self.decode_device = decode_device
        self.close_error: TokenwireError | None = None  # set once the connection has ended (idle timeout, ...)

    @property
    def closed(self) -> bool:
        """Whether the connection has ended; a fetch on it fails at once (open a new one)."""
        return self.close_error is not None

    @property
    def kv(self) -> KVClientSession:
        assert isinstance(self.session, KVClientSession)
        return self.session

    def handle_session_events(self, events: list[SessionEvent]) -> None:
        for ev in events:
            if isinstance(ev, ConnectionEnded):
                self.close_error = closed_error(ev.error_code, ev.reason, idle_timeout_in_force(self._quic),
                                                "KV connection")
                for other in self._fetches.values():
                    other.error = other.error or self.close_error
                    other.event.set()
                continue
            pf = self._fetches.get(getattr(ev, "stream_id", -1))
            if pf is None:
                continue
            if isinstance(ev, KVMetaReceived):
                pf.meta = ev.meta
                for hdr, payload in pf.waiting:
                    self._start_decode(pf, hdr, payload)
                pf.waiting.clear()
            elif isinstance(ev, KVChunkReceived):
                self.kv.ack(ev.stream_id, ev.header, ev.first_at, ev.done_at)
                pf.received[ev.header.index] = (ev.header, ev.first_at, ev.done_at)
                # Chunks have their own streams: one can arrive before KV_META (its packet lost). A codec
                # chunk then waits for it, to be checked against the model fingerprint and geometry; KV_DONE
                # follows KV_META on the fetch stream, so nothing waits past the fetch's end.
                if ev.header.level == TEXT or pf.meta is not None:
                    self._start_decode(pf, ev.header, ev.payload)
                else:
                    pf.waiting.append((ev.header, ev.payload))
            elif isinstance(ev, KVDoneReceived):
                pf.done = ev.done
            elif isinstance(ev, KVFetchFailed):
                pf.error = pf.error or ev.error
            if pf.error is not None or (pf.done is not None and len(pf.received) == pf.done.chunks):
                pf.event.set()
        self.transmit()

    def _start_decode(self, pf: _PendingFetch, hdr: KvChunk, payload: bytes) -> None:
        pf.decodes[hdr.index] = asyncio.get_running_loop().run_in_executor(self._pool, self._decode, pf, hdr, payload)

    def _decode(self, pf: _PendingFetch, hdr: KvChunk, payload: bytes) -> ChunkResult:
        t0 = time.monotonic()
        try:
            if hdr.level == TEXT:
                if len(payload) != 4 * hdr.tokens:
                    raise KVCorruptChunk(f"text chunk {hdr.index}: {len(payload)} bytes for {hdr.tokens} tokens")
                ids = list(struct.unpack(f"<{hdr.tokens}i", payload))
                return ChunkResult(hdr.index, hdr.level, None, ids)
            from .cachegen.codec import decode_chunk
            from .cachegen.errors import KVCodecError

            meta = pf.meta
            assert meta is not None  # codec chunks wait for KV_META (handle_session_events)
            layers, heads, dim = meta.geometry
            try:
                _check_codec_header(hdr, meta, payload)
                kv = decode_chunk(payload, device=self.decode_device, expect_fingerprint=meta.fingerprint,
                                  expect_geometry=(layers, heads, dim),
                                  max_elements=2 * layers * heads * dim * hdr.tokens)
            except KVCodecError as exc:
                raise KVCorruptChunk(f"chunk {hdr.index} does not decode: {exc}") from None
            return ChunkResult(hdr.index, hdr.level, kv, None)
        finally:
            pf.decode_times[hdr.index] = (t0, time.monotonic())

    async def fetch_kv(self, *, model: str, deadline_ms: float, token_ids: Iterable[SupportsIndex] | None = None,
                       hashes: Iterable[bytes | str] | None = None, controller: str = "tokenwire",
                       recompute_us_per_token: int | None = None, timeout_s: float | None = None,
                       prefix: bool = False) -> KVFetchResult:
        """Fetch a context's KV (by token ids or chunk hashes) within ``deadline_ms``.

        ``token_ids``: any integers (Python, numpy or torch, e.g. a tokenizer's array); ``hashes``: the chunk
        hashes as ingest returns them (hex strings) or as 16-byte ``bytes``, in chain order from chunk 0.

        ``prefix=True``: when the store holds only a prefix of the context (an earlier turn of the conversation),
        fetch that prefix instead of failing with :class:`KVNotFound`; the result's ``missing_token_ids`` (part of
        :meth:`KVFetchResult.text_token_ids`) are left for the engine to prefill, and the controller counts their
        recompute against the deadline. The prefix is matched in whole stored chunks (the store's chunks are
        addressed by a hash of everything before them); not even the first chunk stored is still ``KVNotFound``.

        Returns the decoded chunks (torch tensors shaped like the engine's cache, or token ids for chunks sent
        as text) and a :class:`FetchReport`. Raises :class:`KVNotFound`, :class:`KVCorruptChunk` (a chunk that
        does not decode or cannot belong to the fetch: its size, index, tokens, or a text chunk's ids),
        :class:`KVError` (``MALFORMED_FRAME``: KV_META or KV_DONE out of order or not adding up) or
        :class:`RemoteError` (an ERROR, or a chunk stream the server reset); a missed deadline is reported, not
        raised (the data is still valid). A fetch the server would refuse (a deadline of 0, an unknown
        controller, a non-integer token id) raises ``ValueError`` before it is sent.

        ``timeout_s``: how long the whole call may take (KV_META, every chunk, KV_DONE, and decoding the chunks:
        it bounded only their receipt) before giving up with :class:`KVError` (``UPSTREAM_TIMEOUT``). By default
        there is no fixed bound: the fetch fails once nothing new (KV_META, a chunk) has come for the deadline's
        length (at least 2 s) after the deadline, so a stalled server fails it soon after its deadline (it used to
        take a minute) while a large context that keeps arriving (this fetch's chunk bytes count, not only whole
        chunks; other fetches' bytes do not) is received whole, late as it may be.
        """
        if self.close_error is not None:
            raise self.close_error
        deadline = _deadline_ms(deadline_ms)
        ids = _token_ids(token_ids)
        hs = _chunk_hashes(hashes)
        # named by argument here: the frame check says "kvfetch: empty token id list", a wire detail
        if (ids is None) == (hs is None):
            raise ValueError("invalid fetch: pass exactly one of token_ids and hashes")
        if ids is not None and not ids:
            raise ValueError("invalid fetch: token_ids is empty (a fetch names its context by its token ids)")
        req = KvFetch(model=model, deadline_ms=deadline, token_ids=ids, hashes=hs, controller=controller,
                      recompute_us_per_token=recompute_us_per_token, auth=self._auth, prefix=bool(prefix) or None)
        try:
            check_outgoing(req, "fetch")
        except ValueError as exc:
            raise ValueError(_as_arguments(str(exc))) from None
        pf = _PendingFetch(self.clock(), deadline, controller, ids)
        sid = self.kv.fetch(req)
        self._fetches[sid] = pf
        self.transmit()
        try:
            started = time.monotonic()
            if timeout_s:
                await asyncio.wait_for(pf.event.wait(), timeout_s)
            else:
                await _wait_while_progressing(
                    pf, lambda: (len(pf.received), pf.meta is not None, self.kv.bytes_in(sid)),
                    deadline / 1000, max(2.0, deadline / 1000))
            if pf.error is not None:
                raise pf.error
            if pf.done is None or pf.meta is None:  # the session fails KV_DONE before KV_META: not reached
                raise KVError("KV_DONE before KV_META", code=ErrorCode.MALFORMED_FRAME)
            asked = len(ids) if ids is not None else None
            if asked is not None and (pf.meta.tokens > asked or (not prefix and pf.meta.tokens != asked)):
                raise KVError(f"the server sent {pf.meta.tokens} tokens of KV for a context of {asked}",
                              code=ErrorCode.MALFORMED_FRAME)
            if hs is not None and (pf.meta.chunks > len(hs) or (not prefix and pf.meta.chunks != len(hs))):
                raise KVError(f"the server sent {pf.meta.chunks} chunks for {len(hs)} hashes",
                              code=ErrorCode.MALFORMED_FRAME)
            results: list[ChunkResult] = []
            for i in range(pf.done.chunks):
                if timeout_s:  # decoding gets what receipt left of it (none left: a decode not done fails)
                    results.append(await asyncio.wait_for(pf.decodes[i], started + timeout_s - time.monotonic()))
                else:
                    results.append(await pf.decodes[i])
            end = self.clock()
            got = sum(hdr.tokens for hdr, _first, _done in pf.received.values())
            if got != pf.meta.tokens or pf.done.chunks != pf.meta.chunks:
                raise KVError(f"the server announced {pf.meta.chunks} chunks of {pf.meta.tokens} tokens and sent "
                              f"{pf.done.chunks} of {got}", code=ErrorCode.MALFORMED_FRAME)
            _check_done_levels(pf.done, results)
            _check_text_ids(results, pf.received, ids)
        except TokenwireError:
            raise
        except TimeoutError:
            raise KVError(f"KV fetch timed out: {len(pf.received)} chunks received"
                          + (f" of {pf.meta.chunks}" if pf.meta is not None else ", no KV_META")
                          + (f" ({sum(f.done() and not f.cancelled() for f in pf.decodes.values())} decoded)"
                             if pf.done is not None else "")
                          + f" after {time.monotonic() - started:.1f} s (deadline {deadline} ms)",
                          code=ErrorCode.UPSTREAM_TIMEOUT) from None
        finally:
            self.kv.finish(sid)
            self.transmit()
            self._fetches.pop(sid, None)
            _forget_decodes(pf)
        # what the server lacked of the context: by hashes, chunk_tokens per missing chunk, as the server counts
        missing = (len(ids) - pf.meta.tokens if ids is not None
                   else (len(hs or ()) - pf.meta.chunks) * pf.meta.chunk_tokens)
        report = FetchReport.from_timings(deadline_ms=deadline, controller=controller, sent_at=pf.sent_at,
                                          end=end, received=pf.received, decode_times=pf.decode_times,
                                          missing_tokens=missing, recompute_us_per_token=recompute_us_per_token)
        return KVFetchResult(results, report, tuple(pf.meta.geometry),  # type: ignore[arg-type]
                             missing_token_ids=ids[pf.meta.tokens:] if ids is not None else [],
                             missing_chunks=len(hs) - pf.meta.chunks if hs is not None else 0, token_ids=ids)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._pool.shutdown(wait=False)


def _check_decode_device(device: Any) -> None:
    """``ValueError`` naming ``decode_device`` unless this process can allocate on it (torch is imported only
    for another device than the CPU: this module never imports it at module level)."""
    if isinstance(device, str) and device == "cpu":
        return
    try:
        from .cachegen.codec import check_device
    except ImportError as exc:  # no torch (the ml extra): nothing could decode on any device
        raise ValueError(f"decode_device {device!r} needs torch: {exc}") from None
    from .cachegen.errors import InvalidInput

    try:
        check_device(device)
    except InvalidInput as exc:
        raise ValueError(f"decode_device: {exc}") from None


@contextlib.asynccontextmanager
async def connect_kv(host: str, port: int = 4434, *, verify: bool = True, cafile: str | Path | None = None,
                     cadata: bytes | str | None = None, server_name: str | None = None, decode_device: str = "cpu",
                     ecn: bool = False, timeout: float = 10.0, auth_token: str | None = None, warm: bool = True
                     ) -> AsyncIterator[KVConnection]:
    """Open a KV channel connection; ``conn.fetch_kv(...)`` fetches contexts over it.

    ``auth_token``: for a server with authentication (the daemon's ``[auth]`` tokens); every fetch carries it,
    as the KV server checks each fetch's token (a missing or wrong one fails that fetch with ``UNAUTHORIZED``).
    ``cafile``/``cadata``: the CAs to trust, a PEM file or PEM text (bytes or str), as for ``connect``.

    ``decode_device``: where chunks are decoded (``"cpu"``, ``"cuda"``, ``"cuda:1"``...); one this process cannot
    use (no such device, a CPU-only torch) raises ``ValueError`` here, before connecting: it used to pass, and
    the first fetch failed with a bare ``AssertionError`` from torch once its first chunk was decoded.

    ``warm`` (default): load torch and the codec and compile or load its kernels, as the daemon does at start,
    once per process, on a worker thread while the handshake runs; the connection is handed over when that is
    done, so the process's first fetch does not spend ~0.4 s of its deadline on it (the first connection takes
    that much longer; later ones nothing). ``conn.warmed``: its ``concurrent.futures.Future`` (the seconds it
    took). A warm-up that fails is logged, not raised. ``warm=False`` for a process that never decodes KV.

    Fails like :func:`tokenwire.transport.client.connect`: ``ConnectionError`` after ``timeout`` seconds
    without an answer, ``HandshakeError`` (reason, TLS alert) when the server refuses the handshake.
    """
    _check_decode_device(decode_device)
    config = kv_quic_config(client_configuration(server_name=server_name, cafile=cafile, cadata=cadata,
                                                 verify=verify))
    make = functools.partial(KVConnection, decode_device=decode_device, auth_token=auth_token, warm=warm)
    async with open_client(host, port, configuration=config, ecn=ecn, timeout=timeout, create_protocol=make) as p:
        assert isinstance(p, KVConnection)
        if p.warmed is not None and not p.warmed.cancelled():
            # shielded: a cancelled connect must not cancel the process's one warm-up; bounded: a cold numba cache
            # takes seconds, and past WARM_WAIT_S the first fetch had better pay the rest than the connect
            with contextlib.suppress(Exception):  # a failed warm-up is logged (_warmed); the fetch will say why
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(p.warmed)), WARM_WAIT_S)
        yield p
