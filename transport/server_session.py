"""The token server's side of one connection, sans-I/O (see :mod:`.session` for the protocol).

:class:`ServerSession` takes QUIC events with an explicit ``now``, turns request streams into
:class:`~.session_events.RequestReceived` events, and sends what the driver accepts and pushes (STARTED, token
datagrams or TOKENS frames, FINISHED, repairs), with the request deadlines and refusals that keep a hostile
client's streams bounded. It is apart from :mod:`.client_session` and from the shared :class:`~.session._SessionBase`
because the daemon needs only this side and the SDK only the other.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from aioquic.quic import events as qe
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.packet import QuicErrorCode, QuicFrameType
from aioquic.quic.stream import QuicStream

from .ack_timing import AckTiming
from .chatterbox import (
    COALESCE_QUEUE_S,
    DRAIN_GAP_S,
    DRAIN_QUEUE_S,
    DRAIN_S,
    L4S_CE_WINDOW_SHARE,
    PIGGYBACK_QUEUE_S,
    STANDING_QUEUE_S,
    LossClock,
    SenderStats,
    TokenSender,
    path_queues,
)
from .datagram_hook import smoothed_rtt
from .ecn_socket import CE, ECT1
from .errors import ErrorCode, FrameError, FrameTooLarge, ProtocolError, UnsupportedVersion
from .frames import (
    ALPN_GEN_TIMES,
    MAX_GEN_TIMES,
    MAX_STREAM_FRAME,
    REQUEST_ID_BYTES,
    Ack,
    Error,
    Finished,
    GenTimes,
    Repair,
    Report,
    Request,
    Started,
    StreamDecoder,
    Tokens,
)
from .marking import LatencySample, MarkingPolicy
from .one_way_delay import OneWayDelay
from .read_credit import read_credit
from .rtt_floor import WindowedMin
from .session import _SessionBase
from .session_events import (
    ClientReport,
    ConnectionEnded,
    RequestCancelled,
    RequestCompleted,
    RequestReceived,
    RequestRefused,
    SessionEvent,
)
from .transcript import Transcript

REPAIR_CHUNK = 512  # tokens per TOKENS frame in a repair reply
# A request stream's REQUEST must have arrived whole this long after the stream's first bytes (the daemon's
# limits.request_timeout_s), plus its size at MIN_REQUEST_RATE: 64 streams a connection, each ~1 MiB short of its
# last byte, were held for ever; a flat 10 s refused two honest 1-MB prompts sent at once over a 1.5 Mbit/s uplink
REQUEST_TIMEOUT_S = 10.0
MIN_REQUEST_RATE = 32 * 1024  # bytes/s a request's upload must average (256 Kibit/s; 1 MiB: 32 s more)


def offer_request_streams(quic: QuicConnection, slots: int) -> None:
    """Advertise ``slots`` client bidirectional streams (QUIC's initial_max_streams_bidi), the connection's request
    limit: a client's QUIC stack then opens no request past the limit, and holds the next one back until a stream
    has ended in both directions (aioquic raises MAX_STREAMS by one for each) instead of sending it to be refused.

    Without it the limit was the application's alone, and a client could not see when a slot came free: a request
    holds its slot until the client's FIN arrives, which travels apart from the answer its client has already read
    whole. An application queueing its chats at the limit (a semaphore released as each answer is read) had a new
    request overtake a lost FIN and refused with LIMIT_EXCEEDED (120 chats 8 at a time, 15 % loss: 19 to 28 refused).
    Only before the connection's first datagram: the transport parameter carries it, and a credit given cannot be
    taken back.
    """
    if quic._spaces:  # (initialized: the transport parameters went out)
        raise RuntimeError("offer_request_streams() after the connection's first datagram")
    bidi = quic._local_max_streams_bidi
    bidi.value = bidi.sent = slots  # (sent: the transport parameter carries it, no MAX_STREAMS frame is needed)


def _forget_received(stream: QuicStream) -> None:
    """Drop what aioquic buffered of a stream whose data will never be delivered (reset, or refused)."""
    stream.receiver._buffer.clear()
    stream.receiver._ranges = type(stream.receiver._ranges)()


class PeerTransportError(ProtocolError):
    """The client broke QUIC itself, and aioquic closed its connection with a transport error (RFC 9000 20.1):
    a stream past the stream limit (STREAM_LIMIT_ERROR), data past its credit (FLOW_CONTROL_ERROR), a frame that
    does not parse (FRAME_ENCODING_ERROR), a PROTOCOL_VIOLATION... ``transport_code`` is the code the client
    heard, in QUIC's transport space (not an :class:`ErrorCode`: CRYPTO_ERROR, 0x100 + a TLS alert, overlaps
    tokenwire's codes); ``frame_type`` the frame aioquic blamed."""

    def __init__(self, message: str, transport_code: int, frame_type: int | None) -> None:
        super().__init__(message)
        self.transport_code = transport_code
        self.frame_type = frame_type


def transport_error_name(code: int) -> str:
    """A QUIC transport error code's name (RFC 9000 20.1), as operators look it up: ``STREAM_LIMIT_ERROR``."""
    if QuicErrorCode.CRYPTO_ERROR <= code <= QuicErrorCode.CRYPTO_ERROR + 0xFF:
        return f"CRYPTO_ERROR (TLS alert {code - QuicErrorCode.CRYPTO_ERROR})"
    return QuicErrorCode(code).name if code in QuicErrorCode._value2member_map_ else "unknown transport error"


def _frame_name(frame_type: int) -> str:
    """A QUIC frame type's name (RFC 9000 19), for a close's reason: STREAM frames are types 0x08 to 0x0f."""
    if QuicFrameType.STREAM_BASE <= frame_type <= QuicFrameType.STREAM_BASE + 7:
        return "STREAM"
    if frame_type in (QuicFrameType.DATAGRAM, QuicFrameType.DATAGRAM_WITH_LENGTH):
        return "DATAGRAM"
    return QuicFrameType(frame_type).name if frame_type in QuicFrameType._value2member_map_ else f"{frame_type:#x}"


@dataclass
class ServerRequest:
    stream_id: int
    decoder: StreamDecoder
    opened_at: float = 0.0  # its first bytes came: the REQUEST must be whole within the request timeout
    request: Request | None = None
    transcript: Transcript | None = None
    scheme: str = "chatterbox"
    request_id: bytes = b""
    sender: TokenSender | None = None
    stream_next: int = 0  # stream scheme: next token index to write on the stream
    first_index: int = 0
    started: bool = False
    finished_sent: bool = False
    # ALPN_GEN_TIMES: the generation times that follow FINISHED in a frame of their own (see _send_gen_times), and
    # the stream offset FINISHED ends at
    gen_times: list[int] | None = None
    finished_end: int = 0
    done: bool = False
    repairs: int = 0
    reported: bool = False  # its client's REPORT came after FINISHED (one counts; none before FINISHED)
    on_stream: bytearray = field(default_factory=bytearray)  # per token index: 1 once sent on the stream
    # TOKENS frames on the stream whose QUIC acknowledgement the token sender waits for: (the stream offset each
    # ends at, first, end), in stream order (_note_stream_acks)
    stream_tokens: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def tokens_sent(self) -> int:
        """Tokens of the answer put on the wire so far, from its first index: in datagrams (the sender's next new
        one) or on the stream (the stream scheme's, a repair's), each counted once."""
        if self.scheme == "stream":
            end = self.stream_next
        else:
            end = self.sender.next_new if self.sender is not None else self.first_index
        return max(0, max(end, self.on_stream.rfind(1) + 1) - self.first_index)


class ServerSession(_SessionBase):
    """Server side of one connection. Drive it, then ``accept``/``push``/``finish`` requests.

    ``max_requests``: the requests open at once, advertised as the client's stream limit
    (:func:`offer_request_streams`), so that a client's QUIC stack holds the request past it back (one that opens
    a stream past it breaks QUIC's rule, and aioquic closes its connection with STREAM_LIMIT_ERROR: a
    :class:`PeerTransportError`, as every transport error aioquic closes it with for what the client sent; see
    :meth:`_note_transport_close`). A request past the attribute lowered after the connection opened is refused alone
    with LIMIT_EXCEEDED.
    """

    def __init__(
        self,
        quic: QuicConnection,
        *,
        max_requests: int = 64,
        max_redundant_tokens: int = 64,
        initial_rtt: float = 0.1,
        max_request_bytes: int = MAX_STREAM_FRAME,
        marking: MarkingPolicy | None = None,
        request_timeout: float = REQUEST_TIMEOUT_S,
        setting_prefix: str = "the server's ",
    ) -> None:
        read_credit(quic)
        offer_request_streams(quic, max_requests)  # (ReadCredit.hold_until_authorized may hold some back later)
        super().__init__(quic)
        self.marking = marking
        self.on_latency_sample: Callable[[LatencySample], None] | None = None
        self.one_way = OneWayDelay()  # the ACKs' receive times are on the client's clock
        self.requests: dict[int, ServerRequest] = {}
        self.max_requests = max_requests
        self.max_request_bytes = max_request_bytes
        self.request_timeout = request_timeout
        # how a refusal names the limit it enforces ("limits." in the daemon): "request too large: stream frame of
        # 5049 bytes exceeds the limit of 4096" left the operator and the client to guess which setting that was
        self.setting_prefix = setting_prefix
        # streams holding bytes none of which could be delivered yet (the first withheld), since when: aioquic
        # buffers what follows the gap, which no request, and so no request deadline, accounts for
        self._undelivered: dict[int, float] = {}
        self._token_losses = LossClock()  # the latest token datagram QUIC declared lost, of any request
        self.acks_received = 0
        self.closed_totals = SenderStats()  # counters of requests already dropped
        self.max_redundant_tokens = max_redundant_tokens
        self.initial_rtt = initial_rtt
        self.requests_seen = 0
        self._ce_at = -math.inf  # when an ack last reported new CE marks on a packet not sent ECT(1) (_note_ce)
        self._l_ce_at = -math.inf  # ... on a packet sent ECT(1): an L4S queue's marks
        self._offered_streams = max_requests  # (the transport parameter: a STREAM_LIMIT_ERROR's close names it)
        self.ack_timing = AckTiming()  # its QUIC ACKs ride the token packets
        self._gen_times_due: set[int] = set()  # requests whose GEN_TIMES waits (_send_gen_times)
        self.rtt_floor = WindowedMin()  # the path's base round trip: aioquic's latest samples, windowed (_rtt)
        self._rtt_seen: tuple[float, float, float] | None = None  # aioquic's RTT state when last read (_note_rtt)
        self._standing_since: float | None = None  # a queue under the cap's threshold stands since then (_draining)
        self._standing_seen = -math.inf  # ... and was last seen then
        self._drained_at = -math.inf  # when the latest drain began (_draining)
        self._drain_until = -math.inf  # ... and when it ends
        self.drains = 0  # drains begun (_draining)

    # -- API for the driver ----------------------------------------------------------------------------
    @property
    def transport_error(self) -> PeerTransportError | None:
        """Why aioquic closed this connection for what the client sent (a QUIC transport error), or None."""
        err = self._closing_error
        return err if isinstance(err, PeerTransportError) else None

    def _on_peer_packet(self, now: float) -> None:
        if self._closing_error is None:
            self._note_transport_close()
        self._note_rtt(now)
        for req in self.requests.values():
            if req.sender is not None:
                if req.stream_tokens:
                    self._note_stream_acks(req)
                req.sender.on_peer_packet(now)
        self._note_undelivered(now)

    def accept(
        self,
        stream_id: int,
        *,
        transcript: Transcript | None = None,
        request_id: bytes | None = None,
        first_index: int = 0,
    ) -> Transcript:
        """Start answering: STARTED goes out; tokens follow as the transcript grows (push/notify)."""
        req = self.requests[stream_id]
        assert req.request is not None and not req.started
        req.transcript = transcript if transcript is not None else Transcript()
        req.request_id = request_id if request_id is not None else os.urandom(REQUEST_ID_BYTES)
        req.first_index = first_index
        scheme = req.request.scheme
        if scheme != "stream" and not self.datagrams_ok:
            scheme = "stream"  # the peer cannot take datagrams: stream the tokens instead
        req.scheme = scheme
        req.stream_next = first_index
        if scheme != "stream":
            req.sender = TokenSender(
                stream_id,
                req.transcript,
                scheme=scheme,
                first_index=first_index,
                max_redundant_tokens=self.max_redundant_tokens,
                initial_rtt=smoothed_rtt(self.quic, default=self.initial_rtt),
            )
            # FINISHED (and ERROR, repair replies) go ahead of the repeats in the packets that leave
            req.sender.stream_backlog = functools.partial(self._stream_backlog, stream_id)
            req.sender.congested = self._path_congested  # (repeats shrink on a congested path)
            req.sender.draining = self._draining  # (none with new tokens while the path drains)
            req.sender.path_rtt = functools.partial(smoothed_rtt, self.quic, self.initial_rtt)
            req.sender.losses = self._token_losses  # (a loss of any answer's datagram ends the quiet: QUIET_LOSS_S)
            if scheme == "chatterbox":
                req.sender.queue_delay = self._queue_delay  # (new tokens share packets while the path queues)
        req.started = True
        self._send(stream_id, Started(stream_id, req.request_id, scheme, first_index))
        self.notify(stream_id)
        return req.transcript

    def reject(self, stream_id: int, code: int, message: str) -> None:
        """Refuse a request with a typed ERROR; the connection stays up."""
        req = self.requests.get(stream_id)
        if req is None or req.done:
            return
        self._send(stream_id, Error(int(code), message[:1024]), end=True)
        self._drop(req)
        self._ended.add(stream_id)  # the client's FIN (or reset) follows

    def fail(self, stream_id: int, code: int, message: str) -> None:
        """An accepted request that cannot finish (upstream error) ends with a typed ERROR, as a refusal does,
        but every token generated before it reaches the client first: a datagram scheme's tokens still
        unacknowledged go on the stream ahead of the ERROR. The client drops datagrams once it has read the
        ERROR, so they were lost (62 of 2,000 tokens arrived when a source failed right after a burst)."""
        req = self.requests.get(stream_id)
        if req is not None and not req.done and req.sender is not None and req.transcript is not None:
            self._send_tokens(req, req.sender.floor, len(req.transcript))
        self.reject(stream_id, code, message)

    def push(self, stream_id: int, piece: bytes | str, now: float, *, max_total: int | None = None) -> None:
        """Append generated text to the request's transcript and send it on. ``max_total``: a piece longer
        than one token (256 bytes) becomes several, and those beyond this many in all are dropped."""
        req = self.requests.get(stream_id)
        if req is None or req.transcript is None:
            return
        if req.transcript.extend(piece, now, max_total=max_total):
            self.notify(stream_id)

    def finish(self, stream_id: int, reason: str = "stop") -> None:
        req = self.requests.get(stream_id)
        if req is None or req.transcript is None:
            return
        if not req.transcript.finished:
            req.transcript.finish(reason)
        self.notify(stream_id)

    def notify(self, stream_id: int) -> None:
        """The transcript changed (new tokens or finished): move what is new onto the wire."""
        req = self.requests.get(stream_id)
        if req is None or not req.started or req.done:
            return
        tr = req.transcript
        assert tr is not None
        if req.scheme == "stream":
            while req.stream_next < len(tr):
                i = req.stream_next
                self._send(stream_id, Tokens(stream_id, i, [tr.tokens[i]]))
                req.stream_next += 1
        elif req.sender is not None:
            self.scheduler.schedule(req.sender)
        if tr.finished and not req.finished_sent:
            req.finished_sent = True
            gen = tr.gen_deltas_us() if len(tr) <= MAX_GEN_TIMES else None
            t0 = max(0, round(tr.gen_times[0] * 1e6)) if tr.gen_times else None
            if gen is not None and self.gen_times_apart:
                req.gen_times, gen = gen, None  # (GEN_TIMES follows: _send_gen_times)
            self._send(stream_id, Finished(len(tr), tr.digest(), tr.reason, gen, t0))
            if req.gen_times is not None:
                stream = self.quic._streams.get(stream_id)
                req.finished_end = stream.sender._buffer_stop if stream is not None else 0
                self._gen_times_due.add(stream_id)

    @property
    def gen_times_apart(self) -> bool:
        """Whether the client negotiated ``ALPN_GEN_TIMES``: FINISHED then goes without its generation times, which
        follow in a GEN_TIMES frame (an older client closes the connection on that frame, so only then)."""
        return self.alpn == ALPN_GEN_TIMES

    def _send_gen_times(self) -> None:
        """Write each answer's GEN_TIMES once its FINISHED has left, unless a repair or repeat of its tokens waits
        to leave right then (it goes first: GEN_TIMES' ~2 KB for 600 tokens would hold a repair written behind it on
        the stream). Not after every token is acknowledged: that kept the client's statistics, and so the SDK's
        loop, a round trip and its ACK hold longer (sim, seeds 0-9, one-way 40 ms: 94 -> 20 ms after the answer;
        TMobile-LTE 1 % loss 203 -> 51 ms; EVDO with its uplink 1.39 -> 0.61 s), for no stall saved: the stall
        ratios stayed the same on every trace and loss model (one Gilbert-Elliott seed 0.3514 -> 0.3505). Called
        before each send: FINISHED leaving, and the acknowledgements that end a repair, bring that call."""
        for sid in list(self._gen_times_due):
            req = self.requests.get(sid)
            if req is None or req.gen_times is None or req.done:
                self._gen_times_due.discard(sid)
                continue
            stream = self.quic._streams.get(req.stream_id)
            if stream is None or stream.sender.highest_offset < req.finished_end:
                continue  # FINISHED has not left yet
            if req.sender is not None and req.sender.wants_send():
                continue  # a repair or repeat waits to leave right now: it goes first
            self._send(req.stream_id, GenTimes(req.gen_times))
            req.gen_times = None
            self._gen_times_due.discard(sid)

    def _stream_backlog(self, stream_id: int) -> int:
        """Bytes of ``stream_id``'s next STREAM frame that flow control lets leave now (aioquic's private stream
        state, 1.7.2 pinned): a token sender leaves them room, or repeats written ahead of every STREAM frame
        keep them out of each packet while the congestion window only lets probes leave. aioquic writes one frame
        per stream per packet, from its first pending range: the sum of them all (a lost STARTED's 40 bytes
        ahead of a 1.4-KB FINISHED) kept repeats out of packets that then left a kilobyte empty."""
        stream = self.quic._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        if stream.is_blocked or sender.buffer_is_empty or sender._reset_error_code is not None:
            return 0  # nothing aioquic would write now (the checks of its own stream loop)
        quic = self.quic
        max_offset = min(sender.highest_offset + quic._remote_max_data - quic._remote_max_data_used,
                         stream.max_stream_data_remote)
        first = next(iter(sender._pending), None)
        return 0 if first is None else max(0, min(first.stop, max_offset) - first.start)

    def _note_ce(self, codepoint: int | None, now: float) -> None:
        """An ack reported new CE marks; ``codepoint``: what the packet it echoes left with (None: unknown).

        The ack counts marks, not which packets bore them: the echoed packet, the latest the client received,
        stands for them (a policy switches codepoints seldom). CE on ECT(1) comes from an L4S queue, which marks
        from about 1 ms of queue on, so whenever scalable flows share it, congested for us or not; see
        chatterbox.L4S_CE_WINDOW_SHARE for when it counts. Any other CE counts at once: a classic AQM marks
        where it would drop."""
        if codepoint == ECT1:
            self._l_ce_at = now
        else:
            self._ce_at = now

    def _note_rtt(self, now: float) -> None:
        """Feed the RTT sample aioquic took from the datagram just read, if it took one, to :attr:`rtt_floor`. aioquic
        keeps no count of its samples: a new one changes its latest, smoothed or variance (a repeat of the very
        same round trip that moves none of them adds nothing to a minimum but its time)."""
        loss = self.quic._loss
        if not loss._rtt_initialized:
            return
        seen = (loss._rtt_latest, loss._rtt_smoothed, loss._rtt_variance)
        if seen != self._rtt_seen:
            self._rtt_seen = seen
            self.rtt_floor.add(loss._rtt_latest, now)

    def _on_host_changed(self, left: str, entered: str) -> None:
        """The client moved to another host: the samples taken on the path left are no floor of the new one
        (:mod:`.path_reset` gives aioquic the new path's own estimator, fresh or the one it had there)."""
        super()._on_host_changed(left, entered)
        self.rtt_floor.clear()
        self._rtt_seen = None
        # the new path drains on its own (its minimum, fresh, may be learned inside a queue): not on the old one's
        # drain, nor after waiting out the old one's DRAIN_GAP_S
        self._standing_since = None
        self._drained_at = self._drain_until = -math.inf

    def _rtt(self) -> tuple[float, float] | None:
        """aioquic's smoothed round trip of the path to the client and the path's base round trip; None before its
        first sample. The congestion cap, the piggyback gate and the wait for shared packets all read the queue from
        these two. The base is the minimum of aioquic's samples of the last rtt_floor.RTT_FLOOR_WINDOW_S
        (:attr:`rtt_floor`), never below aioquic's own minimum, which never expires: with it alone a path whose base
        delay grew read the growth as a queue for the rest of the connection (see :mod:`.rtt_floor`)."""
        loss = self.quic._loss
        if not loss._rtt_initialized:
            return None
        floor = self.rtt_floor.value(self._now)
        return loss._rtt_smoothed, loss._rtt_min if math.isinf(floor) else max(floor, loss._rtt_min)

    def _path_congested(self, now: float) -> bool:
        """Whether the path to the client queues (aioquic's smoothed round trip well above its minimum) or marks CE
        (:meth:`_note_ce`): Chatterbox's senders then repeat fewer tokens per packet (chatterbox.CONGESTED_REPEATS).
        On a path without ECN (the 1-Mbit/s droptail contention) only the round-trip rule ever applies."""
        rtt = self._rtt()
        if rtt is None:
            return False
        srtt, floor = rtt
        if path_queues(srtt, floor):
            return True
        if now - self._ce_at < srtt:
            return True
        if now - self._l_ce_at < srtt:
            cc = self.quic._loss._cc
            return cc.bytes_in_flight >= L4S_CE_WINDOW_SHARE * cc.congestion_window
        return False

    def _draining(self, now: float) -> bool:
        """Whether the path to the client drains now, as BBR's PROBE_RTT does (chatterbox.STANDING_QUEUE_S): once
        aioquic's smoothed round trip has stood more than chatterbox.DRAIN_QUEUE_S above the path's minimum, and not
        enough for :meth:`_path_congested`'s round-trip rule, for STANDING_QUEUE_S (each check of it a send, or a
        decision on one), for DRAIN_S or a smoothed round trip if longer, at most once per DRAIN_GAP_S. Chats that
        started together behind a queue took their minimum inside it, and a queue they all keep standing is under
        the threshold that minimum sets: draining together shows them the path's own."""
        if now < self._drain_until:
            return True
        rtt = self._rtt()
        if rtt is None:
            return False
        srtt, floor = rtt
        if srtt - floor <= DRAIN_QUEUE_S or path_queues(srtt, floor):
            self._standing_since = None
            return False
        if self._standing_since is None or now - self._standing_seen > STANDING_QUEUE_S:
            self._standing_since = now  # (a check that long ago tells nothing of the time since)
        self._standing_seen = now
        if now - self._standing_since < STANDING_QUEUE_S or now - self._drained_at < DRAIN_GAP_S:
            return False
        self._standing_since = None
        self._drained_at = now
        self._drain_until = now + max(DRAIN_S, srtt)
        self.drains += 1
        return True

    def _piggyback_welcome(self) -> bool:
        """Whether repeats may ride the packets that leave anyway: not once the path to the client queues at all
        (aioquic's smoothed round trip more than chatterbox.PIGGYBACK_QUEUE_S above its minimum), where they are the
        redundancy that fills a shared bottleneck first."""
        rtt = self._rtt()
        return rtt is None or rtt[0] - rtt[1] <= PIGGYBACK_QUEUE_S

    def _queue_delay(self, now: float) -> float:
        """How long the path to the client queues now: aioquic's smoothed round trip above its minimum, once that
        is well past the round-trip rule of :meth:`_path_congested` (chatterbox.COALESCE_QUEUE_S; else 0: a bursty
        link's jitter, or a queue too short to be worth holding tokens for). Chatterbox's senders wait that long, at
        most COALESCE_MAX_S, to put several new tokens in one packet. While the path drains (:meth:`_draining`) the
        queue is under that threshold, and they wait as long too."""
        rtt = self._rtt()
        if rtt is None:
            return 0.0
        srtt, floor = rtt
        if self._draining(now):
            return max(0.0, srtt - floor)
        return srtt - floor if path_queues(srtt, floor, COALESCE_QUEUE_S) else 0.0

    def request_stats(self, stream_id: int) -> ServerRequest | None:
        return self.requests.get(stream_id)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        self._now = now  # (the RTT floor's window reads it: _rtt)
        if self._gen_times_due:
            self._send_gen_times()
        piggyback = self._piggyback_welcome() and not self._draining(now)  # (nothing rides along while it drains)
        for req in self.requests.values():
            if req.sender is not None:
                # the marking decision is taken when the sender builds a datagram, not before (_codepoint_now)
                req.sender.codepoint_of = self._codepoint_now
                # Chatterbox: no packet leaves without the unacknowledged tokens (see offer_piggyback), while the
                # path has room for them, nor without new tokens that wait to share one
                if req.sender.can_piggyback() and (piggyback or req.sender.holds_new_tokens()):
                    self.scheduler.offer_piggyback(req.sender)
        return super().datagrams_to_send(now)

    # -- protocol handling -------------------------------------------------------------------------
    def _on_stream_data(self, stream_id: int, data: bytes, end: bool, now: float) -> list[SessionEvent]:
        if stream_id % 4 != 0:
            raise ProtocolError(f"stream {stream_id}: requests travel on client-initiated bidirectional streams")
        req = self.requests.get(stream_id)
        if req is None:
            if self._late(stream_id, end):  # a REPAIR or REPORT that crossed our ERROR, a refused request's tail
                return []
            if stream_id < 0:
                return []
            if not data and end:  # an empty stream: ours ends too (left open, its credit never came back)
                self._fin(stream_id)
                return []
            if len(self.requests) >= self.max_requests:
                return self._refuse(stream_id, ErrorCode.LIMIT_EXCEEDED, (
                    f"too many concurrent requests: {self.max_requests} already open on this connection "
                    f"({self.setting_prefix}max_requests_per_connection); wait for one to end or open another "
                    f"connection"), end)
            opened = self._undelivered.pop(stream_id, now)  # its first bytes came then, behind a gap
            req = ServerRequest(stream_id, StreamDecoder(max_frame=self.max_request_bytes), opened_at=opened)
            self.requests[stream_id] = req
        out: list[SessionEvent] = []
        try:
            frames = req.decoder.feed(data)
        except FrameTooLarge as exc:
            if req.request is not None or exc.decoded:
                raise  # only a request may be large; a huge frame after one is a broken client
            self._drop(req)
            return self._refuse(stream_id, ErrorCode.LIMIT_EXCEEDED,
                                f"request too large: {exc} ({self.setting_prefix}max_request_bytes)", end)
        except UnsupportedVersion as exc:
            if req.request is not None or exc.decoded:
                raise  # a second REQUEST on the stream: broken, whatever its version
            # a client cannot know the server's version in advance: this request ends, not the connection
            self._drop(req)
            return self._refuse(stream_id, ErrorCode.UNSUPPORTED_VERSION, str(exc), end)
        for frame in frames:
            if req.request is None:
                if not isinstance(frame, Request):
                    raise FrameError(f"stream {stream_id}: first frame must be a request")
                req.request = frame
                self.requests_seen += 1
                out.append(RequestReceived(stream_id, frame))
            elif isinstance(frame, Repair):
                self._repair(req, frame)
            elif isinstance(frame, Report):
                # one per answer: 10,000 from one request filled the client metrics; and only once FINISHED has
                # gone out (a REPORT right after REQUEST, of an answer it had not seen, was counted)
                if req.finished_sent and not req.reported:
                    req.reported = True
                    out.append(ClientReport(stream_id, frame))
            elif isinstance(frame, Error):
                pass  # the client reports a problem; its FIN or reset follows
            else:
                raise FrameError(f"stream {stream_id}: unexpected {type(frame).__name__} frame from a client")
        if end:
            if req.decoder.pending:
                raise FrameError(f"stream {stream_id}: truncated frame at end of stream")
            if req.request is None:
                raise FrameError(f"stream {stream_id}: ended without a request")
            if req.finished_sent:
                out.append(RequestCompleted(stream_id))
            elif not req.done:
                out.append(RequestCancelled(stream_id, "client ended the request"))
            self._fin(stream_id)
            self._drop(req)
        return out

    def _refuse(self, stream_id: int, code: ErrorCode, reason: str, end: bool) -> list[SessionEvent]:
        """Refuse a request stream before it becomes a request; only this request ends."""
        self._refuse_stream(stream_id, code, reason, end)
        return [RequestRefused(stream_id, int(code), reason)]

    def _repair(self, req: ServerRequest, frame: Repair) -> None:
        if req.transcript is None or req.done or req.scheme == "stream":  # (the stream carries every token)
            return
        req.repairs += 1
        self._send_tokens(req, max(frame.first, req.first_index), min(frame.end, len(req.transcript)))

    def _send_tokens(self, req: ServerRequest, first: int, end: int) -> None:
        """Tokens ``[first, end)`` on the request's stream: reliable, in order, ahead of what follows there.
        Each token at most once: what the stream carries arrives, so a client asking again gets nothing more (a
        hostile one's 22-byte REPAIR frames each queued the whole transcript again: 41 MB for 10,000)."""
        tr = req.transcript
        assert tr is not None
        sent = req.on_stream
        if len(sent) < end:
            sent.extend(bytes(end - len(sent)))
        i = first
        while i < end:
            i = sent.find(0, i, end)  # the next token not on the stream yet (C speed: ranges are long)
            if i < 0:
                return
            stop = min(end, i + REPAIR_CHUNK)
            j = sent.find(1, i, stop)
            j = stop if j < 0 else j
            self._send(req.stream_id, Tokens(req.stream_id, i, tr.tokens[i:j]))
            sent[i:j] = b"\x01" * (j - i)
            stream = self.quic._streams.get(req.stream_id)
            if req.sender is not None and stream is not None:
                req.stream_tokens.append((stream.sender._buffer_stop, i, j))
            i = j

    def _note_stream_acks(self, req: ServerRequest) -> None:
        """Tokens that reached the client on the stream (a repair's TOKENS frames, once QUIC has acknowledged every
        byte of the stream up to their frame's end: the client's session has read them) are acknowledged for the
        token sender too. Only the ack datagrams' cumulative index told it, and the client holds those back while
        the path from the server queues (client_session.ACK_QUEUE_S): the capped repeats (chatterbox.
        CONGESTED_REPEATS) then walked through the repaired range two tokens a round trip, every packet carrying
        tokens the client had, and a datagram lost meanwhile waited for the client's own REPAIR (a 1-s downlink
        outage behind a 60-ms queue, 150 tokens: 118 such repeats, now 2; one more datagram lost after the repair,
        its token 558 -> 199 ms late). The cap keeps two repeats a packet either way: they now carry tokens the
        client may lack."""
        assert req.sender is not None
        stream = self.quic._streams.get(req.stream_id)
        if stream is None:
            req.stream_tokens.clear()
            return
        acked_to = stream.sender._buffer_start  # (aioquic's offset below which every byte is acknowledged)
        pending = req.stream_tokens
        k = 0
        while k < len(pending) and pending[k][0] <= acked_to:
            _stop, first, end = pending[k]
            req.sender.on_stream_delivery(first, end)
            k += 1
        if k:
            del pending[:k]

    def _on_datagram(self, frame, now: float) -> list[SessionEvent]:
        if not isinstance(frame, Ack):
            raise ProtocolError("clients may only send ack datagrams")
        self.acks_received += 1
        ce_new = self._ecn_feedback(frame.ecn, now)
        req = self.requests.get(frame.handle)
        meta = None
        if req is not None and req.sender is not None and frame.echo_us is not None:
            meta = req.sender.sent_meta.get(frame.echo_us)  # (size, codepoint) of the packet the ack echoes
        if ce_new:
            self._note_ce(meta[1] if meta is not None else None, now)
        if req is not None and req.sender is not None:
            if meta is not None and frame.echo_us is not None and frame.recv_us is not None:
                sent_at = frame.echo_us / 1e6
                sample = LatencySample(
                    sent_at=sent_at,
                    ack_at=now,
                    latency_ms=self.one_way.latency_ms(sent_at, now, (frame.recv_us - frame.echo_us) / 1000.0),
                    size=meta[0],
                    queue_l=meta[1] == ECT1,
                    ce=ce_new,
                )
                if self.marking is not None:
                    self.marking.on_sample(sample)
                if self.on_latency_sample is not None:
                    self.on_latency_sample(sample)
            req.sender.on_ack(frame, now)
            self.scheduler.schedule(req.sender)
        return []

    def _on_stop_sending(self, stream_id: int) -> list[SessionEvent]:
        """The client asked us to stop sending the answer (writing TOKENS or FINISHED on it now would raise):
        it gave up on it, as with a reset, and its own FIN or reset follows."""
        req = self.requests.get(stream_id)
        # a running request: its last REPORT may come with the FIN in this very packet; none yet: the request
        # may still be on its way (lost, retransmitted). Either is dropped on arrival.
        if req is not None or self._peer_sending(stream_id):
            self._ended.add(stream_id)
        if req is None:
            return []
        self._drop(req)
        return [RequestCancelled(stream_id, "client stopped reading the answer")]

    def _on_stream_reset(self, stream_id: int, code: int) -> list[SessionEvent]:
        req = self.requests.get(stream_id)
        stream = self.quic._streams.get(stream_id)
        self._undelivered.pop(stream_id, None)
        if stream is not None:
            # nothing is delivered after a reset, but aioquic keeps what it buffered until the stream is discarded,
            # while ReadCredit already counts it read: a client resetting streams it had filled behind a withheld
            # byte got fresh credit for each, the old buffers still held (16 MiB past an 8 MiB bound)
            _forget_received(stream)
        if req is None:
            # reset before any of it came (a cancel before the request left): ours ends too, or the stream's credit
            # never comes back; unless ours has ended already (a refusal's ERROR and FIN must still arrive)
            if stream is not None and stream.sender._buffer_fin is None:
                self._reset_own_side(stream_id)
            return []
        self._drop(req)
        self._reset_own_side(stream_id)
        return [RequestCancelled(stream_id, f"client reset the stream (code {code})")]

    def _note_transport_close(self) -> None:
        """Note a close aioquic made itself for the datagram just read (a driver calls ``after_datagram`` for each):
        a transport error in the client's packets, past the handshake. It made the close on its own, and its
        ConnectionTerminated comes only at the end of the closing period with the code and nothing to tell it from
        the client's own close: the connection was not counted as a protocol error, its line (aioquic's, without the
        peer) was the only trace, and its answers were "lost", generating for a resume until the orphan timeout. Now
        it is this side's close for the client's fault, as a malformed frame's is (``by_peer`` False), and what the
        client sent after it is not used (``_closing_error``).

        aioquic's close from a peer's packet is the one pending right after it is read with a frame type: the
        sessions' own closes carry none (an application close), and the peer's close or the idle timer's sets none
        pending. During the handshake the handshake guard counts the close (``failed``)."""
        quic = self.quic
        closing = quic._close_event
        if closing is None or not quic._close_pending or closing.frame_type is None or not quic._handshake_complete:
            return
        code, frame_type = closing.error_code, closing.frame_type
        why = f"QUIC {transport_error_name(code)} ({code:#x}): {closing.reason_phrase or 'no reason given'}"
        if frame_type != QuicFrameType.PADDING:  # (aioquic's "none in particular": a packet's reserved bits)
            why += f" (a {_frame_name(frame_type)} frame)"
        if code == QuicErrorCode.STREAM_LIMIT_ERROR:
            why += f"; {self._stream_limit()}"
        self._closing_error = PeerTransportError(why, code, frame_type)

    def _stream_limit(self) -> str:
        """The request streams the client may have open at once, as a STREAM_LIMIT_ERROR's close says: the limit
        it broke, told to it by QUIC's stream limit (MAX_STREAMS)."""
        at_once = self._offered_streams
        held = getattr(self.quic, "_held_streams", 0) if getattr(self.quic, "_unauthorized_window", None) else 0
        setting = f"{self.setting_prefix}max_requests_per_connection"
        # (a stream past it, not a request: a unidirectional stream past its own limit is the same error)
        if held:  # (ReadCredit.hold_until_authorized: fewer until its first authorized request)
            return (f"the client opened a stream past its stream limit, {at_once - held} request streams at once "
                    f"before its first authorized request ({setting}: {at_once} after it)")
        return f"the client opened a stream past its stream limit, {at_once} request streams at once ({setting})"

    def _handle_quic_event(self, event: qe.QuicEvent, now: float) -> list[SessionEvent]:
        out = super()._handle_quic_event(event, now)
        err = self.transport_error
        if err is not None and isinstance(event, qe.ConnectionTerminated):
            # why, in words (aioquic's reason is "Too many streams open", without the limit or the code's name)
            out = [dataclasses.replace(e, reason=str(err)) if isinstance(e, ConnectionEnded) else e for e in out]
        return out

    def _on_terminated(self, event: qe.ConnectionTerminated) -> list[SessionEvent]:
        """Every request still open ends with its connection: ``lost`` only where an answer had started, which the
        client may resume by its id. A stream whose REQUEST never came whole (half a frame, then the close) or that
        broke the protocol has nothing to resume: reported "lost", it was counted as an answer the network cut.

        A connection this side closed because its client broke the protocol (tokenwire's or QUIC's) lost no path:
        its answers end cancelled (``lost`` False: the driver stops generating them), those sent whole too. As
        "lost" they went on generating for a resume until the orphan timeout, for a client whose next connection
        may break the protocol again."""
        broke = self._closing_error
        if broke is not None:
            out: list[SessionEvent] = [
                RequestCancelled(r.stream_id, f"connection closed: the client broke the protocol ({broke})")
                for r in self.requests.values() if not r.done]
        else:
            out = [
                RequestCancelled(r.stream_id, "connection closed", lost=True) if r.started else
                RequestCancelled(r.stream_id, "connection closed before the request was answered")
                for r in self.requests.values()
                if not r.done and not r.finished_sent
            ]
        for r in list(self.requests.values()):
            self._drop(r)
        return out

    @property
    def ce_reported(self) -> int:
        """The client's cumulative count of CE-marked packets (0 before its first ECN feedback)."""
        return self._last_ecn[CE] if self._last_ecn is not None else 0

    def totals(self) -> SenderStats:
        """Token-packet counters of this connection so far (finished and running requests)."""
        out = SenderStats(**vars(self.closed_totals))
        for req in self.requests.values():
            out.repairs += req.repairs
            if req.sender is not None:
                for k, v in vars(req.sender.stats).items():
                    setattr(out, k, getattr(out, k) + v)
        return out

    def _drop(self, req: ServerRequest) -> None:
        req.done = True
        self.closed_totals.repairs += req.repairs
        req.repairs = 0
        if req.sender is not None:
            for k, v in vars(req.sender.stats).items():
                setattr(self.closed_totals, k, getattr(self.closed_totals, k) + v)
            req.sender.stats = SenderStats()
            req.sender.close()
            self.scheduler.forget(req.sender)
        self.requests.pop(req.stream_id, None)

    def _note_undelivered(self, now: float) -> None:
        """Note streams holding bytes none of which could be delivered (their first withheld): they get the request
        deadline too. Only when aioquic holds more streams than this session knows, so rarely a scan."""
        if len(self.quic._streams) <= len(self.requests) + len(self._undelivered):
            return
        for sid, stream in self.quic._streams.items():
            rx = stream.receiver
            if (sid not in self.requests and sid not in self._undelivered and sid not in self._ended
                    and not rx.is_finished and rx.highest_offset > rx.starting_offset() == 0):
                self._undelivered[sid] = now

    def _request_deadline(self, req: ServerRequest) -> float:
        """When a request still arriving is refused: the request timeout after its first bytes, plus its size (once
        its length prefix has come) at MIN_REQUEST_RATE, so that a big prompt on a slow uplink has the time it
        needs while a stalled one still ends."""
        size = req.decoder.expected or 0
        return req.opened_at + self.request_timeout + size / MIN_REQUEST_RATE

    def _session_timer(self) -> float | None:
        best: float | None = None
        for req in self.requests.values():
            if req.request is None:  # still arriving: its deadline
                t: float | None = self._request_deadline(req)
            else:
                t = req.sender.next_timer() if req.sender is not None else None
            if t is not None and (best is None or t < best):
                best = t
        if self._undelivered:
            t = min(self._undelivered.values()) + self.request_timeout
            best = t if best is None else min(best, t)
        return best

    def _on_session_timer(self, now: float) -> list[SessionEvent]:
        out: list[SessionEvent] = []
        for req in list(self.requests.values()):
            if req.request is None and now >= (deadline := self._request_deadline(req)):
                # its decoder holds up to max_request_bytes for as long as the client likes: refused, and freed
                self._drop(req)
                took = f"{deadline - req.opened_at:.0f} s"
                out.extend(self._refuse(req.stream_id, ErrorCode.LIMIT_EXCEEDED,
                                        f"request not complete within {took} (limits.request_timeout_s "
                                        f"{self.request_timeout:g} s, plus its size at 32 KiB/s)", False))
            elif req.sender is not None:
                req.sender.on_timer(now)
                self.scheduler.schedule(req.sender)
        for sid, since in list(self._undelivered.items()):
            stream = self.quic._streams.get(sid)
            if stream is None or sid in self.requests or stream.receiver.starting_offset() > 0:
                del self._undelivered[sid]  # gone, or its bytes came through: a request with its own deadline
            elif now >= since + self.request_timeout:
                del self._undelivered[sid]
                _forget_received(stream)
                out.extend(self._refuse(sid, ErrorCode.LIMIT_EXCEEDED,
                                        f"request not complete within {self.request_timeout:g} s "
                                        f"(limits.request_timeout_s; its first bytes never came)", False))
        return out
