"""Sans-I/O tokenwire protocol over one aioquic ``QuicConnection`` (server and client sides).

Like aioquic's ``H3Connection``, a session owns no socket, clock or event loop. Its driver (the asyncio
shell in :mod:`.quic_io`, or the virtual-time simulator) feeds it datagrams and timer expiries with an
explicit ``now``, sends what :meth:`datagrams_to_send` returns, and reacts to the events it returns.

Per request (one bidirectional QUIC stream):

* client -> server: REQUEST, then optionally REPAIR frames, then FIN once the answer is complete and
  verified (or early, to cancel);
* server -> client: STARTED, TOKENS frames (``stream`` scheme, and repair replies), FINISHED (total,
  digest, generation times) or ERROR, then FIN after the client's FIN;
* token datagrams (``chatterbox``, ``duplicate``) server -> client and ack datagrams client -> server,
  tagged with the request's handle (its stream id).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from aioquic.quic import events as qe
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.quic.stream import QuicStream
from aioquic.tls import Epoch

from .chatterbox import SenderStats, TokenReceiver, TokenSender
from .datagram_hook import DatagramScheduler, smoothed_rtt
from .ecn_socket import CE, ECT1, NOT_ECT
from .errors import (
    ErrorCode,
    FrameError,
    FrameTooLarge,
    ProtocolError,
    RemoteError,
    TokenwireError,
    UnsupportedVersion,
    known_code,
)
from .frames import (
    MAX_STREAM_FRAME,
    MIN_ACK_DATAGRAM,
    MIN_TOKENS_DATAGRAM,
    REPORT_MS_MAX,
    REQUEST_ID_BYTES,
    Ack,
    Error,
    Finished,
    Repair,
    Report,
    Request,
    Started,
    StreamDecoder,
    Tokens,
    decode_datagram,
    encode_frame,
    encode_stream_frame,
)
from .marking import EcnValidation, LatencySample, MarkingPolicy
from .one_way_delay import OneWayDelay
from .path_recovery import PAUSE_PING_S, RECOVERY_PING_S, backed_off, probe_on_receipt, window_full
from .session_outcome import ChatOutcome
from .transcript import Transcript, gen_times_from_deltas, text_digest

REPAIR_CHUNK = 512  # tokens per TOKENS frame in a repair reply
# Datagrams a client may count that this session did not send: the server's Retry and a version negotiation
# go out from the listener, before the connection exists
ECN_SLACK = 2
# A request stream's REQUEST must have arrived whole this long after the stream's first bytes (the daemon's
# limits.request_timeout_s), plus its size at MIN_REQUEST_RATE: 64 streams a connection, each ~1 MiB short of its
# last byte, were held for ever; a flat 10 s refused two honest 1-MB prompts sent at once over a 1.5 Mbit/s uplink
REQUEST_TIMEOUT_S = 10.0
MIN_REQUEST_RATE = 32 * 1024  # bytes/s a request's upload must average (256 Kibit/s; 1 MiB: 32 s more)


# ------------------------------------------------------------------------------------------------ events
@dataclass
class SessionEvent:
    pass


@dataclass
class RequestReceived(SessionEvent):
    """Server: a client asked for an answer. The driver calls ``accept`` or ``reject``."""

    stream_id: int
    request: Request


@dataclass
class RequestCancelled(SessionEvent):
    """Server: the client abandoned a request (FIN or reset before FINISHED), or its connection ended.

    ``lost`` tells the two apart: an explicit cancel should stop generation, a lost connection should not
    (the client may come back and resume).
    """

    stream_id: int
    reason: str
    lost: bool = False


@dataclass
class ClientReport(SessionEvent):
    """Server: what the client says it experienced for this request (stall ratio, TTFT)."""

    stream_id: int
    report: Report


@dataclass
class RequestRefused(SessionEvent):
    """Server: the session itself refused a request stream (too many at once, request too large) with an
    ERROR; the connection and its other requests go on. For the driver's logs and counters only."""

    stream_id: int
    code: int
    reason: str


@dataclass
class RequestCompleted(SessionEvent):
    """Server: the client confirmed it holds the whole answer."""

    stream_id: int


@dataclass
class RequestStarted(SessionEvent):
    stream_id: int
    started: Started


@dataclass
class TokensRendered(SessionEvent):
    """Client: tokens that became renderable, in order, at ``now``."""

    stream_id: int
    tokens: list[bytes]
    now: float


@dataclass
class RequestFinished(SessionEvent):
    """Client: every token is here and the digest matched (or did not: ``digest_ok``)."""

    stream_id: int
    result: ChatOutcome


@dataclass
class RequestFailed(SessionEvent):
    stream_id: int
    error: TokenwireError


@dataclass
class ConnectionEnded(SessionEvent):
    error_code: int
    reason: str
    by_peer: bool
    requests_open: bool = True  # some request had not ended: it fails with this (an idle close then means trouble)


# ------------------------------------------------------------------------------------------------ base
AIOQUIC_IDLE_REASON = "Idle timeout"
"""The reason aioquic gives its ConnectionTerminated when its idle timer fires (a test pins it)."""


def idle_timeout_in_force(quic: QuicConnection) -> float:
    """The idle timeout that closes ``quic``: ours or the peer's, whichever is shorter (aioquic closes on the
    minimum; the peer's is known once its transport parameters have come)."""
    remote = getattr(quic, "_remote_max_idle_timeout", None)
    own = quic.configuration.idle_timeout
    return min(own, remote) if remote else own


def closed_error(error_code: int, reason: str, idle_timeout: float, what: str = "connection",
                 awaiting: bool = True) -> RemoteError:
    """Why a connection ended, for the client's requests; the idle timer's close says what it means. With
    nothing ``awaiting`` (a chat app between turns), neither end had anything to say: the server is not gone."""
    if reason == AIOQUIC_IDLE_REASON:
        why = ("server or path gone" if awaiting else
               "no request was open, so neither end sent anything; connect again, or connect with keepalive=True")
        err = RemoteError(f"no packet from the server for {idle_timeout:g} s (QUIC idle timeout): {why}",
                          code=known_code(error_code))
        err.path_lost = True  # nobody closed it: a request on it may resume on a new connection
        return err
    refused = handshake_refusal(error_code, reason)
    if refused is not None:
        return RemoteError(f"{what} closed: {refused}", code=known_code(error_code))
    return RemoteError(f"{what} closed: {reason or 'no reason given'} (code {error_code:#x})",
                       code=known_code(error_code))


QUIC_APPLICATION_ERROR = 0xC


def handshake_refusal(error_code: int, reason: str) -> str | None:
    """What a close with QUIC's APPLICATION_ERROR and no reason means, else None. A server's close before its
    handshake is done goes out that way (RFC 9000 10.2.3 has the reason cleared), so every refusal of a tokenwire
    server in the handshake read "no reason given (code 0xc)", which said nothing a client could act on."""
    if error_code != QUIC_APPLICATION_ERROR or reason:
        return None
    return ("the server refused it during its handshake, over its limits (too many handshakes in progress or "
            "sessions open, a handshake that took too long) or stopping; retry later (QUIC APPLICATION_ERROR 0xc: "
            "a close before the handshake completes carries no reason)")


class _SessionBase:
    def __init__(self, quic: QuicConnection) -> None:
        self.quic = quic
        self._now = 0.0
        self.scheduler = DatagramScheduler(quic, clock=lambda: self._now)
        self.datagrams_ok: bool | None = None  # known after the handshake
        self.current_codepoint = 0  # ECN codepoint for the datagrams of the current batch (Not-ECT)
        self.marking: MarkingPolicy | None = None  # the sender's per-packet ECN policy (None: Not-ECT)
        self.ecn = EcnValidation()  # stops marking for a peer that never reports ECN counts (see EcnValidation)
        self._batch_codepoint: int | None = None  # the one decision of this datagrams_to_send call (_codepoint_now)
        self._decided = False  # the policy has been asked once: batches of ACKs alone take its last answer
        self.closed = False
        self.datagrams_sent = 0
        self._last_ecn: list[int] | None = None  # the peer's latest cumulative ECN counts (ECN feedback)
        self._closing_error: TokenwireError | None = None
        self._heard_at = 0.0  # last QUIC event from the peer (data, datagram, ping ack, ...)
        self._pinged_at = 0.0
        self._pings = 0
        self._receipt_probe_at = -math.inf  # the last probe sent on a receipt (path_recovery.probe_on_receipt)
        # Request streams this side has ended (refused, rejected, failed, stopped) while the peer's side is
        # still open: what the peer sent before it learnt (the rest of a refused request, a frame that crossed
        # our ERROR) still arrives, and must not read as a new request. Forgotten on the peer's FIN or reset,
        # which a STOP_SENDING brings about at once; bounded by the peer's stream credit meanwhile (aioquic
        # grants new streams only as old ones finish in both directions).
        self._ended: set[int] = set()

    # -- driver entry points ----------------------------------------------------------------------
    def receive_datagram(self, data: bytes, addr: NetworkAddress, now: float) -> list[SessionEvent]:
        self._now = now
        self.quic.receive_datagram(data, addr, now=now)
        self.after_datagram()
        return self._pump(now)

    def after_datagram(self, now: float | None = None) -> None:
        """Once per datagram from the peer, after QUIC has processed it (drivers that feed the
        ``QuicConnection`` themselves call this): ends an outage's probe backoff in one round trip
        (:mod:`.path_recovery`)."""
        if now is not None:
            self._now = now
        if (self.datagrams_ok is not None and not self.closed
                and probe_on_receipt(self.quic, self._now, self._receipt_probe_at)):
            self._receipt_probe_at = self._now
        self._on_peer_packet(self._now)

    def _on_peer_packet(self, now: float) -> None:
        """Hook: a datagram from the peer was processed."""

    def _ecn_feedback(self, counts: list[int] | None, now: float) -> bool:
        """Feed the peer's cumulative ECN counts (Not-ECT, ECT(1), ECT(0), CE) to a congestion controller that reads
        them (prague's scalable response, reno-ecn's and cubic-ecn's classic one) and to ECN validation; True when
        they report new CE marks. Called for every ack that could carry counts, with ``None`` when it has none.
        Absent or incomplete counts, older counts (a reordered ack) and counts of more packets than were sent (made
        up: a client inflated tokenwire_ecn_ce_total by 2^40) are ignored. The token and KV sessions both read
        their acks' counts through here."""
        self.ecn.reports += 1
        if counts is None or len(counts) != 4 or sum(counts) > self.datagrams_sent + ECN_SLACK:
            return False
        prev = self._last_ecn or [0, 0, 0, 0]
        if any(a < b for a, b in zip(counts, prev, strict=True)):
            return False
        delta = [a - b for a, b in zip(counts, prev, strict=True)]
        self._last_ecn = list(counts)
        self.ecn.on_counts(counts)
        cc = getattr(self.quic._loss, "_cc", None)
        if cc is not None and hasattr(cc, "on_ecn_feedback") and sum(delta) != 0:
            cc.on_ecn_feedback(now=now, packets=sum(delta), marked=delta[CE])
        return delta[CE] > 0

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        self._now = now
        self._batch_codepoint = None  # a new call: the policy has not been asked for it
        marking = self.marking is not None
        if marking and self.ecn.state == "testing":
            space = self.quic._spaces.get(Epoch.ONE_RTT)
            if space is not None:
                self.ecn.on_acked(space.largest_acked_packet)
        first_pn = self.quic._packet_number
        out = self.quic.datagrams_to_send(now=now)
        self.datagrams_sent += len(out)  # the bound on the ECN counts a peer may report
        if out and marking:
            end_pn = self.quic._packet_number
            if self._batch_codepoint is None and self._decided and self._acks_only(first_pn, end_pn):
                # QUIC ACKs alone (of the client's ack datagrams, most often): the last decision, not the model's
                # time; they were half of swiftqueue's inferences (5,701 calls for 2,939 token packets)
                codepoint = self.current_codepoint if self.ecn.marking_allowed else NOT_ECT
                self._batch_codepoint = self.current_codepoint = codepoint
            else:
                codepoint = self._codepoint_now()  # (decided already if a token datagram was built)
            if self.datagrams_ok is not None:  # after the handshake: packets whose acks could bring counts
                self.ecn.on_sent(codepoint, first_pn, end_pn)
        return out

    def _acks_only(self, first_pn: int, end_pn: int) -> bool:
        """Whether the 1-RTT packets numbered ``[first_pn, end_pn)`` carry nothing but ACKs (none ack-eliciting);
        False when any is of another packet space (the handshake's)."""
        space = self.quic._spaces.get(Epoch.ONE_RTT)
        if space is None:
            return False
        for pn in range(first_pn, end_pn):
            packet = space.sent_packets.get(pn)
            if packet is None or packet.is_ack_eliciting:
                return False
        return True

    def _codepoint_now(self) -> int:
        """The ECN codepoint of this ``datagrams_to_send`` call's datagrams (they all leave with it): the policy is
        asked at most once per call, and only once a datagram is built (a token sender asks as it records the
        packet's codepoint in ``sent_meta``, else the call asks after QUIC built the batch). Most calls run on a
        received packet or a timer and send nothing: asked before QUIC built anything, ``swiftqueue`` ran 43 % of
        its model's inferences for them. Not-ECT without asking once ECN validation failed."""
        codepoint = self._batch_codepoint
        if codepoint is None:
            if self.marking is None:
                codepoint = self.current_codepoint
            elif not self.ecn.marking_allowed:
                codepoint = NOT_ECT
            else:
                codepoint = self.marking.codepoint(self._now)
                self._decided = True
            self._batch_codepoint = self.current_codepoint = codepoint
        return codepoint

    def get_timer(self) -> float | None:
        t = self.quic.get_timer()
        s = None if self.closed else self._session_timer()
        if t is None:
            return s
        return t if s is None else min(t, s)

    def handle_timer(self, now: float) -> list[SessionEvent]:
        self._now = now
        self.quic.handle_timer(now=now)
        out = self._pump(now)
        if not self.closed:
            out.extend(self._on_session_timer(now))
        return out

    def close(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        self.quic.close(error_code=int(code), reason_phrase=reason[:200])

    # -- internals ----------------------------------------------------------------------------------
    def handle_quic_event(self, event: qe.QuicEvent, now: float) -> list[SessionEvent]:
        """Feed one QUIC event (for drivers that pump ``quic.next_event()`` themselves)."""
        self._now = now
        self._heard_at = now
        if self._closing_error is not None and not isinstance(event, qe.ConnectionTerminated):
            # the peer broke the protocol and the connection is closing: nothing more it sent is used (a FINISHED
            # right after tokens refused as past max_tokens completed that request, "digest verified", over tokens
            # the application never got)
            return []
        try:
            return self._handle_quic_event(event, now)
        except ProtocolError as exc:
            return self._protocol_error(exc)

    def _pump(self, now: float) -> list[SessionEvent]:
        out: list[SessionEvent] = []
        while (event := self.quic.next_event()) is not None:
            out.extend(self.handle_quic_event(event, now))
        return out

    def run_timers(self, now: float) -> list[SessionEvent]:
        """Session-level timers only (for drivers whose QUIC timer handling is their own)."""
        self._now = now
        return [] if self.closed else self._on_session_timer(now)

    def _protocol_error(self, exc: ProtocolError) -> list[SessionEvent]:
        """The peer broke the protocol: close this connection only, with the error's code."""
        if self._closing_error is None:
            self._closing_error = exc
            self.close(exc.code, str(exc))
        return []

    def _handle_quic_event(self, event: qe.QuicEvent, now: float) -> list[SessionEvent]:
        if isinstance(event, qe.HandshakeCompleted):
            limit = getattr(self.quic, "_remote_max_datagram_frame_size", None)
            # a server needs room for a TOKENS datagram, a client for its ACKs (frame type and length varints: see
            # DatagramScheduler.set_peer_limit)
            floor = MIN_ACK_DATAGRAM if self.quic._is_client else MIN_TOKENS_DATAGRAM
            self.datagrams_ok = limit is not None and limit - 3 >= floor
            self.scheduler.set_peer_limit(limit)
            return []
        if isinstance(event, qe.StreamDataReceived):
            return self._on_stream_data(event.stream_id, event.data, event.end_stream, now)
        if isinstance(event, qe.DatagramFrameReceived):
            try:
                frame = decode_datagram(event.data)
            except FrameError as exc:
                raise ProtocolError(f"bad datagram: {exc}", code=exc.code) from None
            return self._on_datagram(frame, now)
        if isinstance(event, qe.StreamReset):
            self._ended.discard(event.stream_id)
            return self._on_stream_reset(event.stream_id, event.error_code)
        if isinstance(event, qe.StopSendingReceived):  # aioquic has reset our side: no write may follow
            return self._on_stop_sending(event.stream_id)
        if isinstance(event, qe.ConnectionTerminated):
            self.closed = True
            self._ended.clear()
            by_peer = self._closing_error is None
            failed = self._on_terminated(event)
            return [*failed, ConnectionEnded(event.error_code, event.reason_phrase, by_peer, bool(failed))]
        return []

    def _send(self, stream_id: int, frame, end: bool = False) -> None:
        self.quic.send_stream_data(stream_id, encode_stream_frame(frame), end_stream=end)

    def _fin(self, stream_id: int) -> None:
        try:
            self.quic.send_stream_data(stream_id, b"", end_stream=True)
        except (AssertionError, ValueError, RuntimeError):
            pass  # already finished in this direction, or reset (the peer's STOP_SENDING)

    def _reset_own_side(self, stream_id: int) -> None:
        """End this side of a stream the peer reset: left open, the stream was never discarded and its credit
        never came back (after 128 cancels by reset, quic-go's CancelWrite, a connection could open no more
        requests). Both servers answer a reset so."""
        with contextlib.suppress(AssertionError, ValueError, RuntimeError):  # already ended: nothing to do
            self.quic.reset_stream(stream_id, ErrorCode.CANCELLED)

    # -- streams this side ended before the peer did (see ``_ended``) ----------------------------------------
    def _late(self, stream_id: int, end: bool) -> bool:
        """Whether data on ``stream_id`` belongs to a stream this side already ended: dropped (its FIN clears
        the entry)."""
        if stream_id not in self._ended:
            return False
        if end:
            self._ended.discard(stream_id)
        return True

    def _peer_sending(self, stream_id: int) -> bool:
        """The peer may still send on ``stream_id``: its FIN or reset has not been parsed (aioquic marks the
        receive side finished at the FIN, before the data event that came with it reaches us)."""
        stream = self.quic._streams.get(stream_id)
        return stream is not None and not stream.receiver.is_finished

    def _stop_receiving(self, stream_id: int, code: int) -> None:
        """This side is done with a stream the peer may still send on: drop what arrives on it and ask the peer
        to stop (its QUIC stack then resets its side, which ends the stream)."""
        if self._peer_sending(stream_id):
            self._ended.add(stream_id)
            self.quic.stop_stream(stream_id, int(code))

    def _refuse_stream(self, stream_id: int, code: int, reason: str, end: bool) -> None:
        """Refuse a stream before it becomes a request: ERROR and FIN, and STOP_SENDING for the rest of what the
        peer is still sending (a long first frame spans packets)."""
        self._send(stream_id, Error(int(code), reason[:1024]), end=True)
        if not end:
            self._stop_receiving(stream_id, code)

    # hooks
    def _on_stream_data(self, stream_id: int, data: bytes, end: bool, now: float) -> list[SessionEvent]:
        raise NotImplementedError

    def _on_datagram(self, frame, now: float) -> list[SessionEvent]:
        raise NotImplementedError

    def _on_stream_reset(self, stream_id: int, code: int) -> list[SessionEvent]:
        raise NotImplementedError

    def _on_stop_sending(self, stream_id: int) -> list[SessionEvent]:
        return []

    def _on_terminated(self, event: qe.ConnectionTerminated) -> list[SessionEvent]:
        raise NotImplementedError

    def _session_timer(self) -> float | None:
        return None

    def _on_session_timer(self, now: float) -> list[SessionEvent]:
        return []

    def _silence_ping_at(self, interval: float) -> float:
        """When a keepalive PING is due: ``interval`` after the later of the peer's last event and our last ping."""
        return max(self._heard_at, self._pinged_at) + interval

    def _ping_if_due(self, due: float | None, now: float) -> None:
        if due is not None and now >= due:
            self._pings += 1
            self.quic.send_ping(self._pings)  # small uids: aioquic's own ping() waiters use id() values
            if window_full(self.quic):
                # our own lost packets fill the window (a client's ack datagrams during an uplink outage): the
                # ping leaves as a probe, one packet past the window, or it waits for the backed-off PTO
                self.quic._send_probe()
            self._pinged_at = now


# ------------------------------------------------------------------------------------------------ server
class ReadCredit(QuicConnection):
    """A connection whose flow-control credit runs a fixed window ahead of what it has read.

    aioquic (1.7.2) doubles a stream's credit whenever the highest offset received passes half of it, and the
    connection's whenever the bytes received do, read or not: a client that withheld a stream's first byte had
    everything after it buffered (in a bytearray grown to the gap), its credit doubling as it came (RSS 107 ->
    312 MB in 14 s). Here a stream may run ``configuration.max_stream_data`` past its first byte not yet
    delivered, and the connection ``configuration.max_data`` past every byte delivered (what the session reads
    it reads at once); aioquic closes a peer that sends beyond with FLOW_CONTROL_ERROR. Nothing else changes.

    Until its owner calls :meth:`release_credit`, a connection put on :meth:`hold_until_authorized` gets a smaller
    window, and what the session has read of its request streams counts as held but on the first one: a client
    that never sent an auth token had 64 streams of 1 MiB requests short of their last byte read into the
    request decoders (the token is only seen in a whole REQUEST), the connection's credit moving on with each
    (RSS +75 MiB per connection, for ``limits.request_timeout_s``). The first open stream is exempt so that a
    request always completes: aioquic's client serves its streams in turn, and with every stream's bytes held,
    a few large first requests sent at once used the whole window and none came whole. It also may open only
    ``streams`` request streams at once (QUIC's MAX_STREAMS; more come as those end, and all once released): the
    client's connection credit went to its streams in turn, so with eight large first requests at once the first
    stream's share could never complete its request, the others' shares filled the window, and no request ever
    came whole (a token holder's eight 320 KB prompts: all refused after request_timeout_s). aioquic's client
    queues the streams past the limit and sends them when it rises.
    """

    _unauthorized_window: int | None = None  # set by hold_until_authorized, None again once released
    _held_streams = 0  # request streams withheld from MAX_STREAMS while held (given back at release)

    def hold_until_authorized(self, window: int, streams: int = 2) -> None:
        """Before the first datagram: advertise ``window`` bytes of connection credit (below
        ``configuration.max_data``) and ``streams`` bidirectional streams, and keep what the connection may make
        this side hold that small until :meth:`release_credit`; see the class's note."""
        if self._spaces:  # (initialized: the transport parameter went out, and credit given cannot be taken back)
            raise RuntimeError("hold_until_authorized() after the connection's first datagram")
        window = max(1, min(window, self._configuration.max_data))
        self._unauthorized_window = window
        limit = self._local_max_data
        limit.value = limit.sent = min(limit.value, window)  # (sent: the transport parameter carries it)
        bidi = self._local_max_streams_bidi
        allowed = max(1, min(streams, bidi.value))
        self._held_streams = bidi.value - allowed
        bidi.value = bidi.sent = allowed  # aioquic adds one as each stream ends, and MAX_STREAMS says so

    def release_credit(self) -> None:
        """The connection is authorized: the full window and every stream from the next packet on."""
        self._unauthorized_window = None
        self._local_max_streams_bidi.value += self._held_streams
        self._held_streams = 0

    def _write_connection_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace) -> None:
        limit = self._local_max_data
        held_back = self._unauthorized_window
        window = self._configuration.max_data if held_back is None else held_back
        if limit.value - limit.used < window // 2:  # under half a window left: not a MAX_DATA every packet
            open_streams = {sid: s.receiver for sid, s in self._streams.items() if not s.receiver.is_finished}
            unread = sum(rx.highest_offset - rx.starting_offset() for rx in open_streams.values())
            read = limit.used - unread  # (aioquic counts a stream's bytes up to the highest offset received)
            if held_back is not None and open_streams:  # read into a decoder is held too, but on the first stream
                first = min(open_streams)
                read -= sum(rx.starting_offset() for sid, rx in open_streams.items() if sid != first)
            limit.value = max(limit.value, read + window)
        used, limit.used = limit.used, 0  # aioquic's rule (doubling past half of it) must not apply
        try:
            super()._write_connection_limits(builder=builder, space=space)  # the frame, and MAX_STREAMS
        finally:
            limit.used = used

    def _write_stream_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: QuicStream) -> None:
        # called for every stream in every packet: the common case (nothing to raise, nothing to resend) returns
        # at once (a connection with 60 streams spent 23 % more CPU here)
        rx = stream.receiver
        window = self._configuration.max_stream_data
        # (max_stream_data_local 0: a stream this side may not receive on)
        if (stream.max_stream_data_local and not rx.is_finished
                and stream.max_stream_data_local - rx.highest_offset < window // 2):
            stream.max_stream_data_local = max(stream.max_stream_data_local, rx.starting_offset() + window)
        if stream.max_stream_data_local_sent == stream.max_stream_data_local:
            return
        highest, rx.highest_offset = rx.highest_offset, 0  # as above: no doubling
        try:
            super()._write_stream_limits(builder=builder, space=space, stream=stream)
        finally:
            rx.highest_offset = highest


def _forget_received(stream: QuicStream) -> None:
    """Drop what aioquic buffered of a stream whose data will never be delivered (reset, or refused)."""
    stream.receiver._buffer.clear()
    stream.receiver._ranges = type(stream.receiver._ranges)()


@functools.cache
def _read_credit_class(cls: type[QuicConnection]) -> type[QuicConnection]:
    return ReadCredit if cls is QuicConnection else type(cls.__name__, (ReadCredit, cls), {})


def read_credit(quic: QuicConnection) -> None:
    """Give ``quic`` (made by aioquic's server, which names its class) :class:`ReadCredit`'s flow control. Its
    class is swapped for one that adds only its methods (and, once held, an int): no reference cycle (a method put
    on the instance would make one)."""
    if not isinstance(quic, ReadCredit):
        quic.__class__ = _read_credit_class(type(quic))  # type: ignore[arg-type]  # a class is hashable


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
    done: bool = False
    repairs: int = 0
    reported: bool = False  # its client's REPORT came (one counts)
    on_stream: bytearray = field(default_factory=bytearray)  # per token index: 1 once sent on the stream


class ServerSession(_SessionBase):
    """Server side of one connection. Drive it, then ``accept``/``push``/``finish`` requests."""

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
    ) -> None:
        read_credit(quic)
        super().__init__(quic)
        self.marking = marking
        self.on_latency_sample: Callable[[LatencySample], None] | None = None
        self.one_way = OneWayDelay()  # the ACKs' receive times are on the client's clock
        self.requests: dict[int, ServerRequest] = {}
        self.max_requests = max_requests
        self.max_request_bytes = max_request_bytes
        self.request_timeout = request_timeout
        # streams holding bytes none of which could be delivered yet (the first withheld), since when: aioquic
        # buffers what follows the gap, which no request, and so no request deadline, accounts for
        self._undelivered: dict[int, float] = {}
        self.acks_received = 0
        self.closed_totals = SenderStats()  # counters of requests already dropped
        self.max_redundant_tokens = max_redundant_tokens
        self.initial_rtt = initial_rtt
        self.requests_seen = 0

    # -- API for the driver ----------------------------------------------------------------------------
    def _on_peer_packet(self, now: float) -> None:
        for req in self.requests.values():
            if req.sender is not None:
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
            gen = tr.gen_deltas_us() if len(tr) <= 200_000 else None
            t0 = max(0, round(tr.gen_times[0] * 1e6)) if tr.gen_times else None
            self._send(stream_id, Finished(len(tr), tr.digest(), tr.reason, gen, t0))

    def request_stats(self, stream_id: int) -> ServerRequest | None:
        return self.requests.get(stream_id)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        for req in self.requests.values():
            if req.sender is not None:
                # the marking decision is taken when the sender builds a datagram, not before (_codepoint_now)
                req.sender.codepoint_of = self._codepoint_now
                # Chatterbox: no packet leaves without the unacknowledged tokens (see offer_piggyback)
                if req.sender.can_piggyback():
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
                return self._refuse(stream_id, ErrorCode.LIMIT_EXCEEDED, "too many concurrent requests", end)
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
            return self._refuse(stream_id, ErrorCode.LIMIT_EXCEEDED, f"request too large: {exc}", end)
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
                if not req.reported:  # one per answer: 10,000 from one request filled the client metrics
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
            i = j

    def _on_datagram(self, frame, now: float) -> list[SessionEvent]:
        if not isinstance(frame, Ack):
            raise ProtocolError("clients may only send ack datagrams")
        self.acks_received += 1
        ce_new = self._ecn_feedback(frame.ecn, now)
        req = self.requests.get(frame.handle)
        if req is not None and req.sender is not None:
            meta = req.sender.sent_meta.get(frame.echo_us) if frame.echo_us is not None else None
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

    def _on_terminated(self, event: qe.ConnectionTerminated) -> list[SessionEvent]:
        out: list[SessionEvent] = [
            RequestCancelled(r.stream_id, "connection closed", lost=True)
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


# ------------------------------------------------------------------------------------------------ client
class _AckSource:
    """Builds the client's ack datagram for one request at send time (latest state, one in the queue)."""

    copies = 1

    def __init__(self, req: ClientRequest, session_ecn: Callable[[], list[int] | None] | None = None) -> None:
        self.req = req
        self.acked_packets = 0
        self.session_ecn = session_ecn

    def wants_send(self) -> bool:
        # Ack only packets that brought something new: acking pure repeats would make the server's QUIC
        # ACK it, that ACK would carry repeats again (piggyback), and so on without end.
        r = self.req
        return not r.done and r.receiver.useful_packets > self.acked_packets

    def build(self, now: float, capacity: int, *, piggyback: bool = False, window: tuple[int, int] | None = None):
        r = self.req
        if not self.wants_send():
            return None
        counts = self.session_ecn() if self.session_ecn is not None else None
        ack = Ack(r.stream_id, r.receiver.next_index, r.receiver.last_echo_us, max(0, int(now * 1e6)), counts)
        payload = encode_frame(ack)
        if len(payload) > capacity:
            from .chatterbox import NEEDS_ROOM

            return NEEDS_ROOM
        self.acked_packets = r.receiver.useful_packets
        return payload, None

    def on_delivery(self, cookie, acked: bool, now: float) -> None:
        pass


@dataclass
class ClientRequest:
    stream_id: int
    request: Request
    request_time: float
    receiver: TokenReceiver
    prefix: list[bytes] = field(default_factory=list)
    decoder: StreamDecoder = field(default_factory=StreamDecoder)
    started: Started | None = None
    finished: Finished | None = None
    done: bool = False
    gap_since: float | None = None
    repair_upto: int = 0
    repairs_requested: int = 0
    ack_source: _AckSource | None = None


class ClientSession(_SessionBase):
    """Client side of one connection: start requests, receive renderable tokens as events."""

    def __init__(self, quic: QuicConnection, *, send_acks: bool = True, send_reports: bool = True,
                 keepalive: bool = False) -> None:
        super().__init__(quic)
        self.requests: dict[int, ClientRequest] = {}
        self.send_acks = send_acks
        self.send_reports = send_reports
        self.ecn_counts: Callable[[], list[int]] | None = None  # received packets per codepoint (shell)
        # ping with no request open too: a connection kept across a chat's turns outlives a user who thinks
        # longer than the idle timeout (without it, both ends fall silent and the connection ends)
        self.keepalive = keepalive

    def _keepalive_at(self) -> float | None:
        """When to PING the server: while an answer is awaited (always, with ``keepalive``) and the server has
        been silent a second, or a third of the idle timeout if less (before the first token, backing off to a
        quarter of the time waited so far; RECOVERY_PING_S, below, once our own packets go unacknowledged; a
        third of the idle timeout with ``keepalive`` between answers). A model that
        thinks longer than the idle timeout before its first token would otherwise see both ends idle and the
        connection die. A dead server still ends the connection: the idle timer restarts only on the first
        ack-eliciting packet after a receipt (RFC 9000, 10.1)."""
        idle = idle_timeout_in_force(self.quic)
        awaited = [r for r in self.requests.values() if not r.done]
        if not awaited:
            return self._silence_ping_at(idle / 3.0) if self.keepalive and self.datagrams_ok is not None else None
        # Silent while an answer is awaited, or our own packets unacknowledged: the path may be down. Ping at a
        # fixed pace so that a packet crosses soon after it returns and the server probes at once
        # (.path_recovery), rather than after the backed-off probe timers.
        # RECOVERY_PING_S when our packets go unacknowledged (the path is down, or one direction is). Otherwise a
        # pause mid-answer (a slow model, a tool call): every second, within the idle timeout (the server never
        # pings, and a short one ended the connection first). Before the first token, a model thinking: every
        # second at first, then a quarter of the time waited so far, up to a third of the idle timeout. The
        # server learns a client's new address (NAT rebinding) only from what the client sends: at a third of the idle
        # timeout from the start, a rebinding during a 3-s prefill held every token 20 s; at a fixed second, a
        # reasoning model thinking for minutes cost 60 pings a minute (and a phone's radio kept awake)
        if backed_off(self.quic):
            interval = RECOVERY_PING_S
        elif any(r.receiver.tokens for r in awaited):
            interval = min(PAUSE_PING_S, idle / 3.0)
        else:  # (the server's acks of our pings are events too: the wait is counted from the request)
            # the first t with t - base >= (t - asked) / 4, within [base + PAUSE_PING_S, base + idle / 3]: a due
            # time that does not depend on when it is computed (from "now", each timer fell short and woke the
            # client 3-4 times per ping)
            base, asked = max(self._heard_at, self._pinged_at), min(r.request_time for r in awaited)
            return max(base + min(PAUSE_PING_S, idle / 3.0), min(base + idle / 3.0, (4.0 * base - asked) / 3.0))
        return self._silence_ping_at(interval)

    def start_request(self, request: Request, now: float, *, prefix: list[bytes] | None = None) -> int:
        """Open a request stream; with ``prefix`` (tokens already held) the request resumes after them."""
        stream_id = self.quic.get_next_available_stream_id()
        first = request.resume_from or 0
        req = ClientRequest(stream_id, request, now, TokenReceiver(first_index=first), prefix=list(prefix or []))
        req.ack_source = _AckSource(req, lambda: self.ecn_counts() if self.ecn_counts is not None else None)
        self.requests[stream_id] = req
        self._send(stream_id, request)
        return stream_id

    def cancel(self, stream_id: int) -> None:
        req = self.requests.pop(stream_id, None)
        if req is not None and not req.done:
            req.done = True
            self._fin(stream_id)
            self.scheduler.forget(req.ack_source)

    # -- protocol handling -------------------------------------------------------------------------
    def _on_stream_data(self, stream_id: int, data: bytes, end: bool, now: float) -> list[SessionEvent]:
        req = self.requests.get(stream_id)
        if req is None or req.done:
            return []
        out: list[SessionEvent] = []
        for frame in req.decoder.feed(data):
            if isinstance(frame, Started):
                if req.started is not None:
                    raise FrameError("duplicate started frame")
                if frame.first_index != req.receiver.first_index:  # its tokens would be taken for others
                    raise FrameError(f"started at token {frame.first_index}, asked from "
                                     f"{req.receiver.first_index}")
                req.started = frame
                out.append(RequestStarted(stream_id, frame))
            elif isinstance(frame, Tokens):
                out.extend(self._tokens(req, frame, now))
            elif isinstance(frame, Finished):
                rx = req.receiver
                if req.finished is not None:
                    raise FrameError("duplicate finished frame")
                if (rx.total is not None and rx.total != frame.total) or rx.high > frame.total:
                    # FINISHED is the answer's length: a larger one announced before (a datagram's total, or
                    # tokens past it) left the client waiting forever for tokens that do not exist
                    raise FrameError(f"finished says {frame.total} tokens, but the server announced "
                                     f"{max(rx.total or 0, rx.high)}")
                self._check_limit(req, frame.total)  # else it waits for tokens that would be refused
                req.finished = frame
                rx.set_total(frame.total)
                self._track_gap(req, now)
            elif isinstance(frame, Error):
                req.done = True
                self.requests.pop(stream_id, None)
                self._fin(stream_id)
                self.scheduler.forget(req.ack_source)
                err = RemoteError(frame.message or "request failed", code=known_code(frame.code))
                out.append(RequestFailed(stream_id, err))
                return out
            else:
                raise FrameError(f"unexpected {type(frame).__name__} frame from the server")
            if req.done:
                return out
        out.extend(self._maybe_complete(req, now))
        if end and not req.done:
            self.requests.pop(stream_id, None)
            req.done = True
            out.append(RequestFailed(stream_id, RemoteError("server ended the request early", code=ErrorCode.INTERNAL)))
        return out

    @staticmethod
    def _check_limit(req: ClientRequest, reach: int) -> None:
        """The server cuts an answer at max_tokens: tokens (or a total) past it are a broken server's (2,000,000
        were taken for a max_tokens of 10, memory growing with each). A resume or attach streams the answer as it
        was first asked for (the daemon ignores a resume's max_tokens): no limit then (one below the answer's
        length failed a correct server's resume as a protocol error)."""
        limit = req.request.max_tokens if req.request.resume_id is None else None
        if limit is not None and reach > limit:
            raise FrameError(f"server sent tokens past the request's max_tokens ({limit})")

    def _tokens(self, req: ClientRequest, frame: Tokens, now: float) -> list[SessionEvent]:
        # judged before they are kept
        self._check_limit(req, max([first + len(toks) for first, toks in frame.runs()] + [frame.total or 0]))
        new = req.receiver.on_frame(frame, now)
        self._track_gap(req, now)
        return [TokensRendered(req.stream_id, new, now)] if new else []

    def _on_datagram(self, frame, now: float) -> list[SessionEvent]:
        if not isinstance(frame, Tokens):
            raise ProtocolError("servers may only send token datagrams")
        req = self.requests.get(frame.handle)
        if req is None or req.done:
            return []
        out = self._tokens(req, frame, now)
        if self.send_acks and req.ack_source is not None:
            self.scheduler.schedule(req.ack_source)
        out.extend(self._maybe_complete(req, now))
        return out

    def _maybe_complete(self, req: ClientRequest, now: float) -> list[SessionEvent]:
        fin = req.finished
        if req.done or fin is None or req.started is None or not req.receiver.complete:
            return []
        req.done = True
        self.requests.pop(req.stream_id, None)
        self.scheduler.forget(req.ack_source)
        tokens = req.prefix + req.receiver.tokens
        if req.receiver.first_index != len(req.prefix):
            tokens = req.receiver.tokens  # resumed without the prefix: the digest covers tokens not held here
        digest_ok = len(tokens) == fin.total and text_digest(tokens) == fin.digest
        outcome = ChatOutcome(
            tokens=tokens,
            first_index=req.receiver.first_index,
            total=fin.total,
            digest_ok=digest_ok,
            scheme=req.started.scheme,
            request_id=req.started.request_id,
            finish_reason=fin.reason,
            request_time=req.request_time,
            render_times=list(req.receiver.render_times),
            gen_offsets=gen_times_from_deltas(fin.gen_us) if fin.gen_us is not None else None,
            packets=req.receiver.packets,
            duplicate_tokens=req.receiver.duplicate_tokens,
            repairs_requested=req.repairs_requested,
            first_gen_us=fin.first_gen_us,
            resumed=req.request.resume_id is not None,
        )
        if self.send_reports:
            self._send(req.stream_id, _report(outcome))
        self._fin(req.stream_id)
        return [RequestFinished(req.stream_id, outcome)]

    def _on_stream_reset(self, stream_id: int, code: int) -> list[SessionEvent]:
        req = self.requests.pop(stream_id, None)
        if req is None or req.done:
            return []
        req.done = True
        return [RequestFailed(stream_id, RemoteError(f"server reset the request (code {code})", code=known_code(code)))]

    def _on_terminated(self, event: qe.ConnectionTerminated) -> list[SessionEvent]:
        out: list[SessionEvent] = []
        err = self._closing_error
        for req in list(self.requests.values()):
            if not req.done:
                req.done = True
                e = err if err is not None else closed_error(
                    event.error_code, event.reason_phrase, idle_timeout_in_force(self.quic))
                out.append(RequestFailed(req.stream_id, e))
        self.requests.clear()
        return out

    # -- repair of gaps that datagrams did not fill --------------------------------------------------
    def _repair_wait(self, req: ClientRequest) -> float:
        rtt = smoothed_rtt(self.quic, default=0.1)
        if req.finished is not None:
            return max(0.02, rtt)  # the tail: datagrams with it are in flight or lost
        return max(0.25, 3.0 * rtt)  # mid-answer: later datagrams normally fill the gap first

    def _track_gap(self, req: ClientRequest, now: float) -> None:
        gap = req.receiver.missing()
        if gap is None:
            req.gap_since = None
        elif req.gap_since is None:
            req.gap_since = now

    def _session_timer(self) -> float | None:
        best: float | None = self._keepalive_at()
        for req in self.requests.values():
            if req.gap_since is None or req.done:
                continue
            gap = req.receiver.missing()
            if gap is None or gap[1] <= req.repair_upto:
                continue
            t = req.gap_since + self._repair_wait(req)
            if best is None or t < best:
                best = t
        return best

    def _on_session_timer(self, now: float) -> list[SessionEvent]:
        self._ping_if_due(self._keepalive_at(), now)
        for req in list(self.requests.values()):
            if req.gap_since is None or req.done:
                continue
            gap = req.receiver.missing()
            if gap is None:
                req.gap_since = None
                continue
            a, b = gap
            if b <= req.repair_upto or now < req.gap_since + self._repair_wait(req):
                continue
            a = max(a, req.repair_upto)
            self._send(req.stream_id, Repair(a, b))
            req.repair_upto = b
            req.repairs_requested += 1
            req.gap_since = now
        return []


def _report(outcome: ChatOutcome) -> Report:
    """The REPORT frame a client sends before its FIN (only what it could measure)."""
    from .chat_stats import stats_from_outcome

    st = stats_from_outcome(outcome)

    def ms(v: float) -> int | None:
        # NaN -> None; clamped into the field's range, which a server's absurd generation times pushed past (the
        # server then closed the connection on our REPORT as malformed, with every other answer on it)
        return None if v != v else round(min(REPORT_MS_MAX, max(0.0, v)))

    ratio = None if st.stall_ratio != st.stall_ratio else min(1.0, max(0.0, st.stall_ratio))
    return Report(stall_ratio=ratio, longest_stall_ms=ms(st.longest_stall_ms), ttft_ms=ms(st.ttft_ms))
