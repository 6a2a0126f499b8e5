"""The KV channel's server side, sans-I/O: one :class:`KVServerSession` per QUIC connection takes QUIC events
and an explicit ``now`` and asks its driver (:mod:`.kv_server`) for each chunk at the level the controller
picks just before it is written. What a store must provide is :class:`KVProvider`; the wire is in
:mod:`.kv_protocol`."""

from __future__ import annotations

import contextvars
import logging
import math
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from aioquic.quic import events as qe
from aioquic.quic.connection import QuicConnection

from .datagram_hook import min_rtt, smoothed_rtt
from .errors import ErrorCode, FrameError, ProtocolError, UnsupportedVersion
from .frames import (
    MAX_RECOMPUTE_US,
    Error,
    Frame,
    KvAck,
    KvChunk,
    KvDone,
    KvFetch,
    KvMeta,
    StreamDecoder,
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
from .kv_protocol import DEFAULT_RECOMPUTE_US, MAX_KV_FETCH_BYTES
from .marking import MarkingPolicy
from .path_reset import host_changed
from .read_credit import read_credit
from .server_session import MIN_REQUEST_RATE, REQUEST_TIMEOUT_S, _forget_received, offer_request_streams
from .session import _SessionBase
from .session_events import SessionEvent

MAX_FETCHES = 16
"""Fetches one KV connection may have open at once, advertised to its client as QUIC's bidirectional stream limit:
the client's QUIC stack (and ``fetch_kv``, which waits for a stream before it sends) holds a fetch past it back
until one has ended in both directions, as the chat port does with its requests. Unadvertised (aioquic's 128
streams), the 17th concurrent ``fetch_kv`` on a connection was refused with LIMIT_EXCEEDED ("too many concurrent
fetches") while chat requests past their limit waited their turn."""

POLL_S = 0.002  # how often a sending fetch checks whether the next chunk is due
FRESH_MIN_S = 0.08  # a fetch's own QUIC delivery rate counts once it spans this long...
FRESH_MIN_BYTES = 32 * 1024  # ...and this many acknowledged bytes
LOOKAHEAD_S = 0.1  # data left queued at the bottleneck when the next chunk is decided
MIN_LOOKAHEAD = 64 * 1024  # decide the next chunk when fewer unacknowledged bytes remain (or more: _lookahead)
MIN_SAMPLE_BYTES = SAMPLE_MIN_BYTES  # smaller chunks (text) give no usable throughput sample
# the shortest rate window closed as a sample: the longest of MIN_WINDOW_S and MIN_WINDOW_RTT of the path's min-RTT
# (KVServerSession._sample_window). A window's bytes are what QUIC acknowledged by its KV_ACK, which a late ACK frame
# (the client's ack delay, its event loop, ACK aggregation on the path) shifts by a few ms either way: over a window
# of about that length the shift is most of the sample (0.17 ms read 15.9x the link)
# (8 ms: a randomized sans-I/O check, QUIC's view up to 3.4 ms off at each KV_ACK, had 1.3 % of samples outside
# 0.8-1.25x the link with no minimum, 1.3 % at 2 ms, 1.0 % at 4, 0.6 % at 8, 0.5 % at 16, which merged more; most
# of the rest after a host change, which reads low). Half the min-RTT where that is longer: ACKs
# bunch by more on long paths (Linux's delivery-rate sampler drops intervals under a whole min-RTT; a window's span
# here is the client's own clock, only its bytes are QUIC's)
MIN_WINDOW_S = 0.008
MIN_WINDOW_RTT = 0.5
LINK_SAMPLES = 64  # chunk rates a connection remembers across fetches: its link prior (see KVServerSession.start)
LINK_MIN_SAMPLES = 8  # fewer than this: the configured prior
LINK_LOW_Q = 0.1  # the link prior's low quantile
# the longest a fetch's decisions wait, in all, for the validation of a new host's address (KVServerSession.
# _held_for_move): a real move takes about one round trip; the bound is for an address that never validates (a forged
# or replayed packet)
MOVE_HOLD_S = 0.25


log = logging.getLogger("tokenwire.kv")

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
    # called when the fetch ends, however it ends (completed, failed, given up, its connection closed, or never
    # started): the provider's hold on what it resolved ends (the daemon's pins against eviction). Idempotent
    on_end: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    @property
    def tokens(self) -> int:
        return sum(self.token_counts)

    def end(self) -> None:
        if self.on_end is not None:
            self.on_end()


# The principal of the fetch a KVProvider.resolve call is for (its auth token's name, or its client certificate's
# "cert:" one; None: none), set by the KV endpoint in the fetch's own task before it calls resolve. A context
# variable, not an argument: providers written to resolve(fetch), the tests' stand-ins among them, keep working
# (unset, a provider sees None: the fetch finds shared contexts only)
FETCH_PRINCIPAL: contextvars.ContextVar[str | None] = contextvars.ContextVar("tokenwire_kv_fetch_principal",
                                                                             default=None)


class KVProvider(Protocol):
    """What the KV server needs from a store (the daemon's KV service implements it)."""

    async def resolve(self, fetch: KvFetch) -> ContextPlan:
        """The context's plan; raises a TokenwireError (e.g. :class:`KVNotFound`) to refuse the fetch. The
        fetching client's principal, where the server knows one, is :data:`FETCH_PRINCIPAL`'s."""
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
    complete: bool  # the client's FIN after KV_DONE and every chunk's KV_ACK (see KVServerSession._completed)
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
    last_done_us: int | None = None  # the end of the last rate window closed (client clock, us: _on_ack)
    sampled: dict[int, int] = field(default_factory=dict)  # chunk index -> its bytes in rate samples (_on_ack)
    # the rate windows' bookkeeping (_sample_window), kept so that a KV_ACK costs what is in flight, not the fetch:
    # the chunks written since path_index and not yet KV_ACKed, in the order written (a dict as an ordered set),
    # filled up to arriving_to; those of them partly delivered when the last window closed (at last_done_us); and a
    # window held back (start, end, bytes) until the first bytes of the earlier-written chunks in held_for are known
    arriving: dict[int, None] = field(default_factory=dict)
    arriving_to: int = 0
    busy_at_end: set[int] = field(default_factory=set)
    # (also a window too short, or with too few bytes, for a sample of its own: merged into the next, held_for empty)
    held: tuple[int, int, int] | None = None
    held_for: set[int] = field(default_factory=set)
    last_sample: tuple[int, int, int] | None = None  # the newest window closed as a sample (_sample_window)
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
    # its first bytes came (or were noted behind a withheld first byte): the KV_FETCH must be whole by the request
    # timeout after this (KVServerSession._fetch_deadline)
    opened_at: float = 0.0
    # the client's host changed while it ran (KVServerSession._on_host_changed): the first chunk written on the path
    # taken (earlier chunks' KV_ACKs measure the path left), and (when, bytes acknowledged) at the change, from which
    # fresh_rate measures instead of from the first write
    path_index: int = 0
    path_start: tuple[float, int] | None = None
    # when its decisions were first held for a move not yet validated (KVServerSession._held_for_move): one hold a
    # fetch, ending MOVE_HOLD_S after this at the latest, however often the client's address changes
    move_hold_at: float | None = None


def _ended(f: ServerFetch) -> None:
    """``f`` left the session's fetches: its plan's provider lets go of it (:meth:`ContextPlan.end`)."""
    if f.plan is not None:
        f.plan.end()


UNDELIVERED_SCAN_S = 0.25  # at most this often, streams holding bytes none of which could be delivered are looked for


@dataclass
class HostLink:
    """What a connection measured of its link on one client host (see KVServerSession._on_host_changed)."""

    rates: deque[float]  # KVServerSession.link_rates
    forecasters: dict[str, Any]  # KVServerSession._forecasters
    sample_at: dict[int, float]  # KVServerSession._sample_at, for those forecasters


class KVServerSession(_SessionBase):
    """Server side of one KV connection (sans-I/O). The driver answers its events with ``start``/``send_chunk``."""

    def __init__(self, quic: QuicConnection, *, tuning: ServerTuning | None = None, max_fetches: int = MAX_FETCHES,
                 marking: MarkingPolicy | None = None, forecaster_factory: Callable[[str], Any] | None = None,
                 request_timeout: float = REQUEST_TIMEOUT_S) -> None:
        # credit a fixed FLOW_WINDOW ahead of what is read, as the token server's: aioquic's doubling let a client
        # that withheld a fetch stream's first byte have all it sent after the gap buffered (a fetch is ~100 bytes)
        read_credit(quic)
        # the client opens no fetch stream past the limit (ReadCredit.hold_until_authorized may hold some back later);
        # the check in _on_stream_data stays as the backstop, for a limit lowered after the connection opened (a client
        # opening streams past QUIC's limit is closed by aioquic with STREAM_LIMIT_ERROR)
        offer_request_streams(quic, max_fetches)
        super().__init__(quic)
        self.tuning = tuning or ServerTuning()
        self.max_fetches = max_fetches
        self.marking = marking
        # ECN counts come in KV_ACKs, one per chunk once the whole chunk has arrived: QUIC acknowledges hundreds of
        # a chunk's packets first, so validation waits for the first KV_ACK before it may fail (EcnValidation)
        self.ecn.wait_for_report = True
        self.fetches: dict[int, ServerFetch] = {}
        self._forecaster_factory = forecaster_factory
        self._forecasters: dict[str, Any] = {}
        self._sample_at: dict[int, float] = {}  # forecaster -> when its newest sample arrived
        self.link_rates: deque[float] = deque(maxlen=LINK_SAMPLES)  # every fetch's chunk rates, bit/s
        # the link knowledge above (rates, forecasters) of the hosts the client has left, for a return to them: those
        # whose path state the session keeps (_saved_paths), no more (_on_host_changed)
        self._saved_links: dict[str, HostLink] = {}
        # a KV_FETCH must be whole this long after its stream's first bytes, plus its size at MIN_REQUEST_RATE (the
        # chat port's limits.request_timeout_s): 16 streams a connection each held ~655 KB of a fetch short of its
        # last byte, kept alive by pings, for ever (+10-13 MiB a connection)
        self.request_timeout = request_timeout
        # streams holding bytes none of which could be delivered yet (the first withheld), since when: aioquic
        # buffers what follows the gap (up to the 64-MiB stream window), which no fetch's deadline accounts for
        self._undelivered: dict[int, float] = {}
        self._undelivered_scan_at = -math.inf
        # when poll last ran: the next is due POLL_S after it (_session_timer), not POLL_S after the last datagram
        self._last_poll = 0.0

    # -- driver API -----------------------------------------------------------------------------------------
    def start(self, stream_id: int, plan: ContextPlan, now: float) -> None:
        """Accept a fetch: KV_META goes out; chunks follow as the session asks for them."""
        f = self.fetches.get(stream_id)
        if f is None or f.closed:
            plan.end()  # it ended while its plan was resolved: nothing holds the plan now
            return
        assert f.fetch is not None  # the driver starts a fetch on its KVFetchRequested event
        try:
            self._start(f, plan, now)
        except BaseException:
            plan.end()  # (the driver fails the fetch; its plan was never attached to it)
            raise

    def _start(self, f: ServerFetch, plan: ContextPlan, now: float) -> None:
        stream_id = f.stream_id
        assert f.fetch is not None
        legacy = self.tuning.legacy_controller
        rtt = self._path_rtt(legacy)
        prior, prior_low = self._prior(legacy)
        controller = KVController(f.fetch.controller, prior_bps=prior, rtt_s=rtt, prior_low=prior_low,
                                  stale_factor=self.tuning.stale_factor, reserve=self.tuning.reserve,
                                  legacy=legacy, guard_weight=self.tuning.guard_weight,
                                  firm_guard_weight=self.tuning.firm_guard_weight)
        # the forecaster before the plan: a fetch with a plan and no forecaster was polled (its timer kept firing
        # AttributeError in _decide) when making the forecaster raised
        f.forecaster = self._connection_forecaster(self._kind(f), now, legacy)
        f.plan, f.controller = plan, controller
        self._send(stream_id, KvMeta(len(plan.token_counts), plan.chunk_tokens, plan.tokens, list(plan.geometry),
                                     plan.fingerprint, plan.dtype))

    def _connection_forecaster(self, kind: str, now: float, legacy: bool) -> Any:
        """The connection's forecaster of ``kind`` for a fetch starting at ``now``."""
        fc = self._forecasters.get(kind)  # one per connection, shared by the fetches running together...
        if fc is None or (not legacy and now - self._sample_at.get(id(fc), -math.inf) > STALE_S):
            # ...but samples older than STALE_S describe another moment of the link, and kept in the history they
            # would steer this fetch's forecast (measured: a 6.6 Mbit/s median from an earlier fetch's samples
            # sent a chunk high where this fetch had measured 2.4, and missed). The legacy rule keeps them.
            if fc is not None:
                self._sample_at.pop(id(fc), None)
            fc = self._forecasters[kind] = self._make_forecaster(kind)
        return fc

    def _prior(self, legacy: bool) -> tuple[float, float]:
        """The prior a fetch's cold decisions plan on: the link prior, or the configured one for the legacy rule."""
        return (self.tuning.prior_bps, PRIOR_LOW) if legacy else self.link_prior()

    def _on_host_changed(self, left: str, entered: str) -> None:
        """The client moved to another host (Wi-Fi to LTE, say; a port-only NAT rebinding is no move). The chunk
        rates and forecasters measured the path left, like the congestion state the session has just switched:
        kept, the first fetches after a move from 50 to 3 Mbit/s were planned at Wi-Fi's rates and missed their
        deadlines. So they are put aside for a return, and the host entered gets its own back, or none, as a new
        connection (the configured prior, and a probe where that says text). Remembered for the hosts whose path
        state the session keeps: bounded by MAX_HOSTS_REMEMBERED, and dropped with theirs."""
        saved = self._saved_links.pop(entered, None)
        self._saved_links.pop(left, None)
        forecasters = self._forecasters
        self._saved_links[left] = HostLink(self.link_rates, forecasters, {
            id(fc): self._sample_at[id(fc)] for fc in forecasters.values() if id(fc) in self._sample_at})
        for host in [h for h in self._saved_links if h not in self._saved_paths]:
            del self._saved_links[host]
        kept = len(self.link_rates) if left in self._saved_links else 0
        back = saved is not None
        if saved is None:
            saved = HostLink(deque(maxlen=LINK_SAMPLES), {}, {})
        self.link_rates, self._forecasters, self._sample_at = saved.rates, saved.forecasters, saved.sample_at
        running = [f for f in self.fetches.values() if not f.closed and f.plan is not None and f.controller is not None]
        for f in running:
            self._replan_on_new_path(f, self._now)
        # (why a fetch after a move was planned as it was: the move is known only at the new address's validation,
        # and chunks written before it are not planned again)
        log.debug("KV client left host %s for %s: %d chunk rates of %s kept for a return; %s; %d running fetches "
                  "(%s chunks written) planned afresh", left, entered, kept, left,
                  f"{len(self.link_rates)} rates of {entered} restored" if back
                  else f"{entered} is new: the configured prior", len(running),
                  ", ".join(str(f.next_index) for f in running) or "no")

    def _replan_on_new_path(self, f: ServerFetch, now: float) -> None:
        """A fetch running across a host change plans its next chunks as a fetch starting now would: its samples
        measured the path left (kept as its own, they are never stale, and its next decision sent the rest at the
        old path's rate), so it takes the new host's forecaster and prior and is cold until it measures the new path:
        its QUIC delivery rate from the change on (fresh_rate), a probe, or a KV_ACK of a chunk written after the
        change (earlier chunks' KV_ACKs feed no forecaster: their transfer was mostly on the path left). Its guard
        while cold is the firm one, as for a first chunk."""
        assert f.controller is not None
        legacy = f.controller.legacy
        f.forecaster = self._connection_forecaster(self._kind(f), now, legacy)
        f.controller.prior_bps, f.controller.prior_low = self._prior(legacy)
        f.samples = 0
        f.path_index = f.next_index  # (a chunk asked for and not yet written goes out on the new path)
        f.last_done_us = None  # (the path taken's first rate window starts at its own chunk's first byte: _on_ack)
        f.arriving.clear()  # (every chunk written so far went out on the path left)
        f.busy_at_end.clear()
        f.held, f.held_for = None, set()  # (a window held back measured the path left)
        f.ack_mark = None  # (set again at the next poll: the rate since the change)
        f.path_start = (now, self._acked(f)) if f.first_sent_at is not None else None
        if f.probe is not None and f.probe < f.next_index:
            # a probe written on the path left measured that path: as if none was sent, so the fetch may probe the
            # new one (and does not wait for a rate that would plan it on the old one)
            f.probe = f.probe_sent_at = f.probe_bps = None

    def link_prior(self) -> tuple[float, float]:
        """What plans a fetch's first chunk, before it has measured anything: (median, low quantile as a share
        of it). Once the connection has carried ``LINK_MIN_SAMPLES`` chunks, the median and ``LINK_LOW_Q``
        quantile of their rates (what this link has delivered, across fetches); before, the configured prior.

        A recent forecast cannot serve here (samples older than ``STALE_S`` describe another moment of the link,
        see :meth:`start`), but the link's range can: a cellular link that has ranged over 1-10 Mbit/s makes
        a fixed 5 Mbit/s prior optimistic at its low end (measured, Verizon-LTE: a first chunk sent ``high``
        on the prior's guard took 2-3.8 s in 5 of the 7 missed fetches of 150, kv_vsim seed 100).

        With 1 to ``LINK_MIN_SAMPLES - 1`` rates, too few for a quantile, their *lower* median caps the configured
        prior (``PRIOR_LOW`` of the result as its low quantile): a link measured slow is not planned as a fast
        one. Uncapped, a connection whose warm-up measured 0.1-0.4 Mbit/s (Verizon-EVDO) planned its next first
        chunk on the 5 Mbit/s prior, sent it ``high`` (342 KB, 29 s) and took 62.8 s for a 6-s deadline that
        all-text met in 3.6 s. A few rates faster than the prior leave it as it is (they may be a burst)."""
        if self.tuning.link_prior and len(self.link_rates) >= LINK_MIN_SAMPLES:
            rates = sorted(self.link_rates)
            med = rates[len(rates) // 2]
            low = rates[int(LINK_LOW_Q * (len(rates) - 1))]
            return med, low / med
        if self.tuning.link_prior and self.link_rates:
            rates = sorted(self.link_rates)
            return min(self.tuning.prior_bps, rates[(len(rates) - 1) // 2]), PRIOR_LOW
        return self.tuning.prior_bps, PRIOR_LOW

    def _kind(self, f: ServerFetch) -> str:
        return "ewma" if f.fetch is not None and f.fetch.controller in ("tokenwire-ewma", "even-split") \
            else self.tuning.forecaster

    def _make_forecaster(self, kind: str) -> Any:
        """A new forecaster of ``kind``; an ``ewma`` one when ``kind`` cannot be made. A model that cannot load
        (``[kv] forecaster = "onnx"``) made every fetch's start raise: no KV_META (the client timed out), an exception
        in the server's task, and a new load attempt at each connection's first fetch. The tuning, which every
        session of the server shares, then says ewma (the tokenwire-ewma controller's forecaster; a forecaster steers
        the levels, never what is sent): one warning, and no further attempt."""
        try:
            return self._build_forecaster(kind)
        except Exception as exc:
            if kind == "ewma":  # (no model, nothing to fall back on: a bug)
                raise
            if self.tuning.forecaster == kind:
                self.tuning.forecaster = "ewma"
            log.warning("KV forecaster %r cannot be made (%s: %s): KV fetches are planned with the ewma forecaster "
                        "instead", kind, type(exc).__name__, exc)
            return self._build_forecaster("ewma")

    def _build_forecaster(self, kind: str) -> Any:
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
        _ended(f)
        self._stop_receiving(stream_id, code)  # a KV_ACK may be on its way: it must not read as a new fetch

    def poll(self, now: float) -> list[SessionEvent]:
        """Ask for the next chunk of every fetch whose previous chunk is (nearly) on the wire."""
        self._last_poll = now
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
                    # every chunk is with QUIC: the store is not read for this fetch again, so its pins go now,
                    # not at the client's FIN (which the SDK sends once it has decoded everything: seconds, and
                    # never from a client that keeps its streams open, whose pins then trimmed every put)
                    f.plan.end()
                continue
            if f.last_stream is not None and self._unacked(f) > self._lookahead(f, now):
                continue
            if self._awaiting_probe(f, now):
                continue
            if self._held_for_move(f, now):
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

    def _held_for_move(self, f: ServerFetch, now: float) -> bool:
        """Hold the decision while the client is moving to another host and the session does not know it yet. The
        session switches the link knowledge when QUIC has validated the new address (_on_host_changed), a round trip
        after the first packet from it; the fetch that packet carries was decided at once, on the host left's rates
        (measured on real sockets, 50 to 3 Mbit/s: every chunk of the first fetch after the move decided within 7 ms,
        the move known 21 ms in, ``high`` x3 and a 2-s deadline missed by 0.5 s). Held, it is decided at validation,
        on the new host's own knowledge, at the cost of that round trip. Bounded: an address that never validates (a
        forged or replayed packet) holds a fetch MOVE_HOLD_S at most, and a fetch is held once, so an attacker who
        flips the client's address cannot hold it again (it is then planned as before the hold existed)."""
        paths = self.quic._network_paths
        if (not paths or paths[0].is_validated or self._path is None
                or not host_changed(self._path, paths[0].addr)):
            return False  # (a port-only change is a NAT rebinding, the same path: no move to wait for)
        if f.move_hold_at is None:
            f.move_hold_at = now
        return now - f.move_hold_at < MOVE_HOLD_S

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
            # (since the client's last host change, if it changed after the first write: _replan_on_new_path)
            since, before = f.path_start or (f.first_sent_at, 0)
            span = now - since - min_rtt(self.quic, default=0.0)
            rate = min(rate, (acked - before) * 8 / max(span, dt))
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
        swallows the previous one: with a deep bottleneck queue, long before any of it is delivered.

        Until the fetch has a sample of its own, the rate is the prior its decisions plan on (``_decide`` treats the
        connection's forecast as stale then), so that the look-ahead and the decisions assume the same link: the
        forecaster's median comes from earlier fetches (measured on real sockets: 63 Mbit/s, an 866-KB look-ahead that
        handed a 3-chunk context to QUIC at once)."""
        bps = self.fresh_rate(f, now)
        if bps is None and not f.samples and f.controller is not None:
            bps = f.controller.prior_bps
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
        rate = self._decode_rate(f)
        opts = []
        for i in range(f.next_index, len(f.plan.token_counts)):
            toks = f.plan.token_counts[i]
            dec = f.plan.elements[i] / rate
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
        busy = self._decode_backlog(f, now, rate)
        d = f.controller.choose(opts, time_left_s=time_left, inflight_bytes=inflight,
                                median_bps=med, low_bps=low, sample_age_s=age, explore=explore, measured_bps=measured,
                                decode_busy_s=busy)
        if d.probe:
            f.probe = f.next_index
        # guard_bps: the rate the choice was checked against (tokenwire: the guard, below the low quantile and, on
        # a cold decision, derived from the prior rather than from median_bps/low_bps, the forecast's inputs)
        f.decisions.append({"index": f.next_index, "level": d.level, "planned": list(d.planned),
                            "median_bps": med, "low_bps": low, "guard_bps": d.bandwidth_bps, "fresh": fresh is not None,
                            "age_s": age if math.isfinite(age) else None,
                            "budget_s": d.budget_s, "time_left_s": time_left, "inflight_bytes": inflight,
                            "probe": d.probe, "decode_elements_per_s": rate, "decode_busy_s": busy})
        return d.level

    def _decode_rate(self, f: ServerFetch) -> float:
        """The client's decode rate, elements/s: the one its KV_FETCH carries (measured on its own decodes), else the
        configured one (``[kv] decode_mbps``; older clients send none)."""
        sent = f.fetch.decode_elements_per_s if f.fetch is not None else None
        return self.tuning.decode_elements_per_s if sent is None else sent

    @staticmethod
    def _decode_backlog(f: ServerFetch, now: float, rate: float) -> float:
        """Decode work still queued at the client for the chunks already sent, at least (the controller's
        ``decode_busy_s``): their decode times at ``rate`` less the time since the first was written, the most its one
        decode thread can have worked through (it starts only once a chunk has arrived, so this is a lower bound)."""
        assert f.plan is not None
        if f.first_sent_at is None:
            return 0.0
        work = sum(f.plan.elements[i] for i, lv in enumerate(f.levels) if lv != TEXT) / rate
        return max(0.0, work - (now - f.first_sent_at))

    def _on_stream_data(self, stream_id: int, data: bytes, end: bool, now: float) -> list[SessionEvent]:
        if stream_id % 4 != 0:
            raise ProtocolError(f"stream {stream_id}: KV fetches travel on client-initiated bidirectional streams")
        f = self.fetches.get(stream_id)
        out: list[SessionEvent] = []
        if f is None:
            if self._late(stream_id, end):  # the rest of a refused KV_FETCH, a KV_ACK that crossed our ERROR
                return []
            if not data and end:  # an empty stream: ours ends too (left open, its credit never came back: after 128
                self._fin(stream_id)  # of them the connection could open no fetch, held back by QUIC for ever)
                return []
            if len(self.fetches) >= self.max_fetches:
                return self._refuse(stream_id, ErrorCode.LIMIT_EXCEEDED,
                                    f"too many concurrent fetches (at most {self.max_fetches} on a connection)", end)
            # frames no larger than the largest legal KV_FETCH (not any stream frame's 1 MiB): what a fetch stream's
            # decoder may hold, and what its arrival deadline grants time for (_fetch_deadline)
            f = ServerFetch(stream_id, None, StreamDecoder(max_frame=MAX_KV_FETCH_BYTES), now)
            f.opened_at = self._undelivered.pop(stream_id, now)  # its first bytes came then, behind a gap
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
                _ended(f)
                complete = self._completed(f)
                took, deadline = ((now - f.received_at, f.fetch.deadline_ms) if complete and f.fetch is not None
                                  else (None, None))
                prefill = self._prefill_s(f) if complete else 0.0
                out.append(KVFetchClosed(stream_id, list(f.levels), complete, list(f.decisions), took, deadline,
                                         prefill))
            elif f.fetch is None:
                raise ProtocolError(f"fetch stream {stream_id} ended without a KV_FETCH")
            else:  # the client gave up: stop sending this fetch
                f.closed = True
                self._fin(stream_id)
                self.fetches.pop(stream_id, None)
                _ended(f)
                out.append(KVFetchClosed(stream_id, list(f.levels), False))
        return out

    @staticmethod
    def _completed(f: ServerFetch) -> bool:
        """Whether the client's FIN ends ``f`` as completed: after KV_DONE, with a KV_ACK for every chunk (the client
        sends one per chunk received whole, before its FIN on this same stream). A client that fails or gives up on
        a fetch resets its stream (abandoned); earlier clients FIN'd that too, and one that gave up with chunks
        still on their way was counted completed, its time in the deadline histogram. (One that gave up with every
        chunk received cannot be told from a success: only its reset says so.)"""
        return f.done_sent and f.plan is not None and len(f.acked) == len(f.plan.token_counts)

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
        if f.plan is None or ack.index >= f.next_index:
            raise ProtocolError(f"KV_ACK for chunk {ack.index}, which was not sent")
        if ack.index in f.acked:  # (its own words: "which was not sent" sent a client's author after the wrong bug)
            raise ProtocolError(f"KV_ACK for chunk {ack.index}, which was acknowledged already")
        f.acked.add(ack.index)
        f.arriving.pop(ack.index, None)
        f.bytes_acked += ack.size
        # No window from a text chunk's KV_ACK: no sample, so no end to the time measured (see _sample_window); unless
        # a held window waits for its first byte. Nor from a chunk written before the client's host changed: it
        # measured the path left (_replan_on_new_path), and its end is no start for the path taken's windows either:
        # it cut the next chunk's to its last few ms, whose bytes from before it then counted over them (a move and
        # back, 20 Mbit/s: samples of 171 Mbit/s)
        if (ack.size < MIN_SAMPLE_BYTES and ack.index not in f.held_for) or ack.index < f.path_index:
            pass
        elif f.forecaster is None:
            f.last_done_us = max(ack.done_us, f.last_done_us or 0)
        else:
            window = self._sample_window(f, ack)
            if window is not None:
                start, end, nbytes = window
                f.forecaster.observe(nbytes, (end - start) / 1e6)  # (enough bytes and time: _sample_window)
                self.link_rates.append(nbytes * 8e6 / (end - start))
                self._sample_at[id(f.forecaster)] = now
                f.samples += 1
                f.last_done_us = max(end, f.last_done_us or 0)
        if f.held is not None and not f.held_for and len(f.acked) == len(f.plan.token_counts):
            # the fetch's last KV_ACK left a window held (too few bytes; or the last was a text chunk's, or from
            # before a host change, and closed none): nothing is left to merge it into, so it is no sample
            f.held = None
        self._ecn_feedback(ack.ecn, now)

    def _arriving(self, f: ServerFetch) -> list[int]:
        """The chunks written since the host change (``path_index``) and not yet KV_ACKed, oldest first. Kept on the
        fetch (the chunks written since the last call added, each KV_ACKed one removed): walking every chunk since
        ``path_index`` at each KV_ACK made a fetch's sampling quadratic (4096 chunks of 32 tokens, three written
        ahead: 288 ms of the event loop, now 15 ms)."""
        end = min(f.next_index, len(f.chunk_streams))
        for j in range(max(f.arriving_to, f.path_index), end):
            if j not in f.acked:
                f.arriving[j] = None
        f.arriving_to = max(f.arriving_to, end)
        return [j for j in f.arriving if j >= f.path_index]

    def _sample_window(self, f: ServerFetch, ack: KvAck) -> tuple[int, int, int] | None:
        """The rate sample chunk ``ack.index`` closes: (its start and end, client clock in us; the fetch's bytes
        delivered between them), or None while the window is held back (below). The window begins at the chunk's
        first byte, or at the end of the previous window (``last_done_us``) where the chunk started before it: time
        is measured once.

        QUIC interleaves the chunk streams written while others are still sending, so a chunk's receive span can
        carry other chunks' bytes. Counting its own bytes alone made the first-finished chunk of an overlapping
        set far too slow, and the next one, its span cut at that chunk's end, far too fast (real sockets, 3 `high`
        chunks at once on 50 Mbit/s: 17.7, 198.9 and 1633 Mbit/s). So the window also counts what QUIC has seen
        acknowledged of the fetch's chunks still arriving (their bytes reached the client before about
        ``done_us``: the KV_ACK left with them), and each chunk's bytes are counted in one window only
        (``f.sampled``): the chunk's own window counts the rest.

        Where the window starts is what the chunks still arriving decide. One already partly delivered when the
        previous window closed (``busy_at_end``) kept the link busy since: the window starts at that window's end.
        One written before this chunk with none of it delivered then started at an unknown time after it, perhaps
        before this chunk's first byte: the window is held back (``held``) until that chunk's KV_ACK gives its first
        byte, and then closes as one with the later chunks' (from the earliest first byte to the last end). Left to
        its own KV_ACK instead, its bytes were charged to the few ms after the later chunk's end (30x the link when
        the first-written chunk finished last); the previous window's end taken as its start counted the link idle
        before it (0.10x; both in ``tests/test_kv_sampler_s38.py``). A window of fewer than MIN_SAMPLE_BYTES (the
        tail of a chunk whose other bytes earlier windows counted), or too short for the bytes QUIC acknowledged
        (MIN_WINDOW_S), is no sample either: it is held and its bytes and time added to the next window's. The
        fetch's last has no next: short, it is a sample alone only as the fetch's first, and otherwise is read with
        the sample before it (below). Without overlap the window and bytes are the chunk's, as before. After a host
        change the windows start afresh (``last_done_us`` None) and count only the chunks written since: a chunk
        written before the change and still arriving is left out, so a window it shares reads low (0.45x the link
        after a move back to Wi-Fi in ``tests/test_kv_host_s37.py``'s pair), not high."""
        start = ack.first_us if f.last_done_us is None else max(ack.first_us, f.last_done_us)
        end = ack.done_us
        nbytes = max(ack.size - f.sampled.get(ack.index, 0), 0)
        f.sampled[ack.index] = ack.size
        if f.held is not None:
            (h_start, h_end, h_bytes), f.held = f.held, None
            if f.held_for:  # held for an earlier chunk's first byte: one window, first byte to last
                start, end = min(start, h_start), max(end, h_end)
            else:  # a short one held, its end this window's start at the earliest: their spans added (the idle link
                start -= h_end - h_start  # between them, if any, is in neither)
            nbytes += h_bytes
        f.held_for.discard(ack.index)
        arriving = self._arriving(f)
        for j in arriving:
            sid, size = f.chunk_streams[j]
            before = f.sampled.get(j, 0)
            got = self._stream_acked(sid, size)  # (stream bytes: its KV_CHUNK header's few too)
            if got <= before:
                continue
            nbytes += got - before
            f.sampled[j] = got
            if j in f.busy_at_end and f.last_done_us is not None:
                start = min(start, f.last_done_us)  # arriving since before the previous window's end
            elif j < ack.index and before == 0:
                f.held_for.add(j)  # (its first byte may predate this window's start: its KV_ACK says)
        if f.held_for:
            f.held = (start, end, nbytes)
            return None
        f.busy_at_end = {j for j in arriving if f.sampled.get(j, 0) > 0}
        if end <= start:
            return None  # (done before the previous window's end: its bytes no time to be counted over)
        own = nbytes == ack.size and start == ack.first_us  # the chunk alone, first byte to last: the KV_ACK's count
        short = end - start < max(MIN_WINDOW_S, MIN_WINDOW_RTT * self._path_rtt()) * 1e6
        last = f.plan is not None and len(f.acked) == len(f.plan.token_counts)
        # The fetch's last window has no next to be merged into. With no sample on this path yet it closes however
        # short: it is the only measurement there is. With one (the probe's three chunks at once in
        # tests/test_kv_rate_s37.py: 130 ms, then two chunks done within 4.4 ms) its rate is taken over that
        # sample's window and its own, as one: the bytes a late ACK frame kept from the window before are all in
        # it, read alone 1.88x the link (done 1.9 ms after the previous chunk, QUIC 3.4 ms behind; real sockets at
        # 50 Mbit/s: 1.6x), and over both they fall where they came. Its time stays its own (measured once), and
        # the sample before stands as it was: a rate already observed is not taken back. Only where it starts at
        # that sample's end: after an idle link no bytes crossed between them, and the sample before may be of
        # another moment of the link
        if nbytes < MIN_SAMPLE_BYTES or (short and not own and not last):
            # too few bytes, or too short for bytes QUIC acknowledged (a late ACK frame moves a few ms' worth): no
            # sample alone (a 0.17 ms window read 15.9x the link). Closed for the next window's start (which the
            # chunks still arriving decide, as above), but held: its bytes and time are added to the next's. A
            # chunk alone is exact however short (its KV_ACK's times and size). A last window with too few bytes
            # is dropped (_on_ack)
            f.held = (start, end, nbytes)
            f.last_done_us = max(end, f.last_done_us or 0)
            return None
        if last and short and not own and f.samples and f.last_sample is not None and start <= f.last_sample[1]:
            p_start, p_end, p_bytes = f.last_sample
            nbytes = round((p_bytes + nbytes) * (end - start) / (p_end - p_start + end - start))
        f.last_sample = (start, end, nbytes)
        return start, end, nbytes

    def _on_datagram(self, frame: Any, now: float) -> list[SessionEvent]:
        raise ProtocolError("the KV channel carries no datagrams")

    def _on_stream_reset(self, stream_id: int, code: int) -> list[SessionEvent]:
        f = self.fetches.pop(stream_id, None)
        if f is None:
            self._forget_undelivered(stream_id)
            return []
        stream = self.quic._streams.get(stream_id)
        if stream is not None:
            # nothing of it is delivered any more, but aioquic keeps what it buffered behind a gap until the stream
            # is discarded, once the client acknowledges our reset: one that never did kept those bytes counted
            # (the endpoint's budget for connections not yet authorized) until that budget closed it
            _forget_received(stream)
        f.closed = True
        _ended(f)
        self._reset_own_side(stream_id)
        # (the controller's inputs as on a FIN: the SDK resets every fetch it fails or gives up on, and the
        # evaluation records a timed-out fetch's decisions)
        return [KVFetchClosed(stream_id, list(f.levels), False, list(f.decisions))]

    def _on_stop_sending(self, stream_id: int) -> list[SessionEvent]:
        """The client asked us to stop sending on its fetch stream (writing KV_META, KV_DONE or an ERROR on it
        now would raise): it gave up on the fetch, which ends alone."""
        f = self.fetches.pop(stream_id, None)
        if f is None:  # before its KV_FETCH arrived (lost, retransmitted): drop that when it comes
            if self._peer_sending(stream_id):
                self._ended.add(stream_id)
            return []
        f.closed = True
        _ended(f)
        self._stop_receiving(stream_id, ErrorCode.CANCELLED)
        # a last KV_ACK may come with the FIN in this very packet, after aioquic marked the side finished
        self._ended.add(stream_id)
        return [KVFetchClosed(stream_id, list(f.levels), False, list(f.decisions))]

    def _on_terminated(self, event: qe.ConnectionTerminated) -> list[SessionEvent]:
        # one outcome per fetch asked for: a stream whose KV_FETCH never decoded (malformed, the cause of this
        # close) was no fetch, and counted as an abandoned one
        out: list[SessionEvent] = [KVFetchClosed(f.stream_id, list(f.levels), False)
                                   for f in self.fetches.values() if f.fetch is not None]
        for f in self.fetches.values():
            _ended(f)
        self.fetches.clear()
        return out

    def _session_timer(self) -> float | None:
        due = [self._fetch_deadline(f) for f in self.fetches.values() if f.fetch is None]
        if self._undelivered:
            due.append(min(self._undelivered.values()) + self.request_timeout)
        if any(not f.closed and f.plan is not None and not f.pending and not f.done_sent
               for f in self.fetches.values()):
            # POLL_S after the last poll. It was POLL_S after the last datagram: every ACK moved it on, so while
            # ACKs came more often than that (a fast link) the poll never ran, and the next chunk was decided only
            # once the previous one was acknowledged whole, the link idle for a round trip per chunk (virtual 50
            # Mbit/s, 20 ms each way, four 1.25-MB chunks: 1074 ms for a 1-s deadline, no look-ahead at all)
            due.append(self._last_poll + POLL_S)
        return min(due, default=None)

    def _on_session_timer(self, now: float) -> list[SessionEvent]:
        return [*self._expire_arrivals(now), *self.poll(now)]

    # -- fetches still arriving: the chat port's request timeout (server_session.ServerSession) -----------------
    def _fetch_deadline(self, f: ServerFetch) -> float:
        """When a KV_FETCH still arriving is refused: the request timeout after its first bytes, plus its size (once
        its length prefix has come) at MIN_REQUEST_RATE, so that the largest fetch (MAX_KV_FETCH_BYTES, 658,001 bytes:
        30 s with the default 10-s timeout) on a slow uplink has the time it needs while a stalled one still ends."""
        size = f.decoder.expected or 0
        return f.opened_at + self.request_timeout + size / MIN_REQUEST_RATE

    def _expire_arrivals(self, now: float) -> list[SessionEvent]:
        """Refuse, alone, each fetch stream whose KV_FETCH is not whole by its deadline (its decoder held up to a
        frame's worth for as long as the client liked) or whose first bytes never came (aioquic held the rest)."""
        out: list[SessionEvent] = []
        for f in list(self.fetches.values()):
            if f.fetch is None and now >= (deadline := self._fetch_deadline(f)):
                del self.fetches[f.stream_id]
                out.extend(self._refuse(f.stream_id, ErrorCode.LIMIT_EXCEEDED,
                                        f"KV_FETCH not complete within {deadline - f.opened_at:.0f} s "
                                        f"(limits.request_timeout_s {self.request_timeout:g} s, plus its size at "
                                        f"{MIN_REQUEST_RATE >> 10} KiB/s)", False))
        for sid, since in list(self._undelivered.items()):
            stream = self.quic._streams.get(sid)
            if (stream is None or sid in self.fetches or sid in self._ended
                    or stream.receiver.starting_offset() > 0):
                del self._undelivered[sid]  # gone, ended, or its bytes came through: a fetch with its own deadline
            elif now >= since + self.request_timeout:
                del self._undelivered[sid]
                _forget_received(stream)
                out.extend(self._refuse(sid, ErrorCode.LIMIT_EXCEEDED,
                                        f"KV_FETCH not complete within {self.request_timeout:g} s "
                                        "(limits.request_timeout_s; its first bytes never came)", False))
        return out

    def _on_peer_packet(self, now: float) -> None:
        """Note the client's streams holding bytes none of which could be delivered (their first withheld): they get
        the request deadline too. Scanned at most every UNDELIVERED_SCAN_S, and only when aioquic holds more streams
        than this session knows (its own chunk streams are among them while a fetch runs)."""
        if (now - self._undelivered_scan_at < UNDELIVERED_SCAN_S
                or len(self.quic._streams) <= len(self.fetches) + len(self._undelivered)):
            return
        self._undelivered_scan_at = now
        for sid, stream in self.quic._streams.items():
            rx = stream.receiver
            if (sid % 4 == 0 and sid not in self.fetches and sid not in self._undelivered and sid not in self._ended
                    and not rx.is_finished and rx.highest_offset > rx.starting_offset() == 0):
                self._undelivered[sid] = now

    def _forget_undelivered(self, stream_id: int) -> None:
        """A stream the client reset before any of it was delivered: what aioquic buffered behind the gap is dropped,
        and ours ends too (left open, the stream was never discarded: its buffer stayed, and ReadCredit, which counts
        a reset stream as read, gave its credit again), unless ours has ended already (a refusal's ERROR and FIN)."""
        self._undelivered.pop(stream_id, None)
        stream = self.quic._streams.get(stream_id)
        if stream is None:
            return
        _forget_received(stream)
        if stream.sender._buffer_fin is None:
            self._reset_own_side(stream_id)
