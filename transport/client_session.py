"""The token client's side of one connection, sans-I/O (see :mod:`.session` for the protocol).

:class:`ClientSession` opens request streams, turns token datagrams and TOKENS frames into
:class:`~.session_events.TokensRendered` events, acks what brought something new (:class:`_AckSource`), asks
for repairs of gaps datagrams did not fill, keeps the connection alive while an answer is awaited, and checks
the finished answer's digest. It is apart from :mod:`.server_session` and from the shared
:class:`~.session._SessionBase` because the SDK needs only this side and the daemon only the other.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from aioquic.quic import events as qe
from aioquic.quic.connection import QuicConnection

from .ack_timing import ACK_HOLD_S, AckTiming
from .chatterbox import TokenReceiver
from .datagram_hook import smoothed_rtt
from .errors import ErrorCode, FrameError, ProtocolError, RemoteError, known_code
from .frames import (
    ALPN_GEN_TIMES,
    MAX_GEN_TIMES,
    REPORT_MS_MAX,
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
    encode_frame,
)
from .path_recovery import PAUSE_PING_S, RECOVERY_PING_S, backed_off
from .rtt_floor import WindowedMin
from .session import _SessionBase
from .session_events import (
    RequestFailed,
    RequestFinished,
    RequestStarted,
    SessionEvent,
    TokensRendered,
    closed_error,
    idle_timeout_in_force,
)
from .session_outcome import ChatOutcome
from .transcript import gen_times_from_deltas, text_digest

STREAM_PING_FLOOR_S = 0.25
"""While an answer streams, the client pings once after this much silence at least (:data:`STREAM_PING_GAPS`
times the recent gap between token packets if longer, :data:`PAUSE_PING_S` at most). After a NAT rebinding or an
address change the server sends to the old address, and learns the new one only from a client packet: with the
1-s pause ping alone each rebinding held tokens ~1 s (loopback relay rebinding every 2 s, 30 tokens/s: stall
ratio 0.34-0.47 against 0.014-0.022 clean; 0.08-0.10 with this ping, the clean path unchanged)."""
STREAM_PING_GAPS = 4.0  # ... times the recent token-packet gap: a slower answer's ordinary gaps ping nothing
TOKEN_GAP_GAIN = 1.0 / 8.0  # the gap's moving average, as RFC 6298's smoothed RTT: a stall moves it little
GEN_TIMES_WAIT_S = 10.0
"""How long an answer that is complete (``ALPN_GEN_TIMES``) waits for its GEN_TIMES: the statistics then end
without generation times, as a stream's end or reset before it ends them, rather than a server that never sends it
holding the request (and a reader waiting for the statistics) open for ever. The server sends it right after
FINISHED (behind a repair waiting to leave): its ~2 KB for 600 tokens arrive within a few ms on a fast path, about a
second on a 50-kbit/s one."""
ACK_QUEUE_S = 0.012
ACK_QUEUE_HOLD_S = 1.0
ACK_QUEUE_QUIC_HOLD_S = 0.001
"""While the path from the server queues, the client sends no ack datagrams (:class:`_AckSource`): from a token
datagram whose one-way delay (its arrival less the send time it carries, on the server's clock) stands more than
ACK_QUEUE_S above the smallest of late (below), for ACK_QUEUE_HOLD_S after the latest such one. Its QUIC
ACKs then leave after ACK_QUEUE_QUIC_HOLD_S (aioquic's own 1 ms) instead of ack_timing.ACK_HOLD_S, so that the
server's token senders still learn at once what arrived (QUIC's acknowledgement of each token datagram).

Each ack datagram is ack-eliciting: the server must acknowledge it within its max_ack_delay, and when no token
packet leaves within ack_timing.ACK_HOLD_S (the ~33-ms gap of a 30-token/s answer is longer) the ACK leaves in a
packet of its own. 30 chats on one 1-Mbit/s link (``tokenwire sim --chats 30``, 40 ms each way, droptail 200, 2 %
iid loss, seed 0) sent 0.41 such lone ACK packets per token (25 of their 131 bytes per token down), an ACK frame
in each token packet (6 more) and 87 bytes per token up where QUIC ACKs alone take 58; in-order streaming sends
91 down. At 40 chats that offered the link 1.1-1.2 Mbit/s from the first half second on: the queue filled its 200
packets in 1.5 s, and the answers stalled 0.98 of their reading time (streaming 0.23). With no ack datagrams there
at all, 0.22 at 105 bytes per token. But on a path with room they are the lone ACKs that carry repeats
(chatterbox.PIGGYBACK_QUEUE_S): without them one lossy chat on the fixed 50-ms channel stalled 0.0178 instead of
0.0144 (iid 2 %). So they stop only while the path queues.

The threshold sits above the path's own jitter, which looks like a queue of the same size: the 1-Mbit/s trace
delivers in 1500-byte slots 12 ms apart, so that one chat's token datagrams wait 0-12 ms at random (median 6), and
40 chats with the ack datagrams off queue hardly more (median 6.7 ms, p90 12 ms). With them back on, the queue
grows ~10 ms every 100 ms: the sample is not smoothed (the queue must be caught as it builds), and the hold keeps
the ack datagrams off while it drains. Measured (40 chats, iid 2 %, seed 0 / one chat on the same link, seeds 0-2),
stall for threshold and hold: 8 ms, 0.5 s: 0.213 / 0.1750; 10 ms, 0.5 s: 0.221 / 0.1758; 12 ms, 0.5 s: 0.251 /
0.1683; 12 ms, 1 s: 0.232 / 0.1683 (the one chat's figure without the rule: no ack datagram held back); 15 ms, 2 s:
0.259 / 0.1683; 8 ms over an EWMA of 1/8 of the samples, 0.5 s: 0.267 / 0.1684; 8 ms over their minimum in 100 ms:
0.301 / 0.1731. Below 12 ms the lone chat's jitter reads as a queue and costs it the repairs on the lone ACKs.

With 12 ms and 1 s (the same sim; median stall of the flows over seeds 0-2, bytes per token; before -> after,
in-order streaming beside): 30 chats, iid 2 % 0.210 (131) -> 0.194 (118), streaming 0.225 (91); 30 chats,
``ge:0.01,0.1`` 0.266 -> 0.252, streaming 0.420; 40 chats, iid 2 % 0.978 (136) -> 0.230 (105), streaming 0.231
(91); 40 chats, ``ge:0.01,0.1`` 0.984 -> 0.292, streaming 0.464; 50 chats still past the wall (0.985 at 111 bytes
per token; streaming 0.350 iid, 0.980 bursty). One chat: the fixed 50-ms channel's four loss rows unchanged (no
queue: 0.0144 / 0.0338 / 0.0682 / 0.0420), the 1-Mbit/s link unchanged (0.1683), TMobile-LTE-short with its uplink
and ``ge:0.01,0.1`` down 0.1550 -> 0.1554 (135 -> 120 bytes per token), Verizon-LTE-short 0.2044 -> 0.2049 (133 ->
112), Verizon EVDO 0.8097 -> 0.8075 (114 -> 98), TMobile UMTS 0.2971 -> 0.2970 (135 -> 109).

The smallest one-way delay is that of the last rtt_floor.RTT_FLOOR_WINDOW_S (the server's RTT floor's window): a
path whose base delay grows by more than ACK_QUEUE_S keeps the client off its ack datagrams that long, not for the rest
of the connection. A server that marks its packets ECN-capable (the daemon's [marking]) takes its latency samples and
ECN counts from the ack datagrams (SwiftQueue's choice of queue, Prague's answer to CE marks), and those matter most
while a queue builds: a connection on which any packet arrived ECT(0), ECT(1) or CE keeps them (and stays at the
capacity wall above). The daemon marks nothing unless configured to. Chatterbox answers only: the ``duplicate``
baseline's token datagrams neither count nor lose their acks (it is the paper's baseline, measured as such; with the
rule its stall moved in the README's loss table, 0.100 -> 0.109 at ``ge:0.002,0.04``)."""


@dataclass
class AnswerComplete(SessionEvent):
    """Client, ``ALPN_GEN_TIMES``: every token is here and the digest checked (``result.digest_ok``), but the
    generation times (``result.gen_offsets`` None) are still to come; :class:`RequestFinished` follows with them,
    or without them if the stream ends first or they take :data:`GEN_TIMES_WAIT_S`."""

    stream_id: int
    result: ChatOutcome


def _ecn_counts_of(session: weakref.ref[ClientSession]) -> list[int] | None:
    """The session's ECN counts for a request's ack, through a weak reference: a closure over the session made a
    reference cycle of it and its requests, and a client's connection waited for a full collection after its end."""
    s = session()
    return s.ecn_counts() if s is not None and s.ecn_counts is not None else None


def _holds_acks_of(session: weakref.ref[ClientSession]) -> bool:
    """Whether the session holds its ack datagrams back now (ACK_QUEUE_S), through a weak reference (as above)."""
    s = session()
    return s is not None and s.holds_acks()


class _AckSource:
    """Builds the client's ack datagram for one request at send time (latest state, one in the queue)."""

    copies = 1

    def __init__(self, req: ClientRequest, session_ecn: Callable[[], list[int] | None] | None = None,
                 held: Callable[[], bool] | None = None) -> None:
        self.req = req
        self.acked_packets = 0
        self.session_ecn = session_ecn
        self.held = held  # while it says so, no ack datagram (ACK_QUEUE_S)

    def wants_send(self) -> bool:
        # Ack only packets that brought something new: acking pure repeats would make the server's QUIC
        # ACK it, that ACK would carry repeats again (piggyback), and so on without end.
        r = self.req
        return (not r.done and r.receiver.useful_packets > self.acked_packets
                and not (self.held is not None and self.held()))

    def build(self, now: float, capacity: int, *, piggyback: bool = False, window: tuple[int, int] | None = None):
        r = self.req
        if not self.wants_send():
            return None
        counts = self.session_ecn() if self.session_ecn is not None else None
        # g: when the echoed packet arrived (docs/protocol.md), not when this ack is built: a build the reader's
        # task went before (quic_io.datagram_received), or a held ack, would add the client's own delay to the
        # server's one-way latency samples
        got = r.receiver.last_echo_at if r.receiver.last_echo_at is not None else now
        ack = Ack(r.stream_id, r.receiver.next_index, r.receiver.last_echo_us, max(0, int(got * 1e6)), counts)
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
    answered: ChatOutcome | None = None  # complete, its GEN_TIMES awaited (AnswerComplete)
    answered_at: float = 0.0


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
        # requests whose stream waits for the server's stream credit (its request limit), in stream order, which is
        # the order aioquic lets them go: see _release_queued
        self._queued: deque[int] = deque()
        # when a packet last brought new tokens (any answer), and the smoothed gap between such packets (each gap
        # counted as PAUSE_PING_S at most: a pause or the time between answers is not the answer's pace)
        self._token_at: float | None = None
        self._token_gap: float | None = None
        self.ack_timing = AckTiming()  # its QUIC ACKs ride the ack datagrams
        # the smallest one-way delay of a token datagram of late (its arrival less the send time it carries, on the
        # server's clock), and when one last stood ACK_QUEUE_S above it
        self._owd_floor = WindowedMin()
        self._queued_at = -math.inf

    def _keepalive_at(self) -> float | None:
        """When to PING the server: while an answer is awaited (always, with ``keepalive``) and the server has
        been silent a second, or a third of the idle timeout if less (once sooner when tokens stop mid-answer,
        :meth:`_stalled_ping_at`; before the first token, backing off to a
        quarter of the time waited so far; RECOVERY_PING_S, below, once our own packets go unacknowledged; a
        third of the idle timeout with ``keepalive`` between answers). A model that
        thinks longer than the idle timeout before its first token would otherwise see both ends idle and the
        connection die. A dead server still ends the connection: the idle timer restarts only on the first
        ack-eliciting packet after a receipt (RFC 9000, 10.1)."""
        idle = idle_timeout_in_force(self.quic)
        awaited = self._awaited()
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
            early = self._stalled_ping_at(interval)
            due = self._silence_ping_at(interval)
            return due if early is None else min(due, early)
        else:  # (the server's acks of our pings are events too: the wait is counted from the request)
            # the first t with t - base >= (t - asked) / 4, within [base + PAUSE_PING_S, base + idle / 3]: a due
            # time that does not depend on when it is computed (from "now", each timer fell short and woke the
            # client 3-4 times per ping)
            base, asked = max(self._heard_at, self._pinged_at), min(r.request_time for r in awaited)
            return max(base + min(PAUSE_PING_S, idle / 3.0), min(base + idle / 3.0, (4.0 * base - asked) / 3.0))
        return self._silence_ping_at(interval)

    def _stalled_ping_at(self, pace: float) -> float | None:
        """When to ping once because tokens stopped mid-answer: :data:`STREAM_PING_FLOOR_S`, or
        :data:`STREAM_PING_GAPS` times the recent gap between token packets if longer, after the last packet heard
        (``pace`` at most); None when no gap is known yet or a ping already went out since the last tokens (then
        the ``pace`` pings go on). One ping per stall: at most one per token packet followed by a quarter second
        of silence, so at most four a second, and none on a path whose tokens keep coming."""
        if self._token_at is None or self._token_gap is None or self._pinged_at >= self._token_at:
            return None
        return self._heard_at + min(pace, max(STREAM_PING_FLOOR_S, STREAM_PING_GAPS * self._token_gap))

    def _tokens_arrived(self, now: float) -> None:
        """A packet brought new tokens: the pace of the answer, which :meth:`_stalled_ping_at` measures a stall
        against."""
        if self._token_at is not None:
            gap = min(PAUSE_PING_S, max(0.0, now - self._token_at))
            self._token_gap = gap if self._token_gap is None else self._token_gap + TOKEN_GAP_GAIN * (
                gap - self._token_gap)
        self._token_at = now

    def start_request(self, request: Request, now: float, *, prefix: list[bytes] | None = None) -> int:
        """Open a request stream; with ``prefix`` (tokens already held) the request resumes after them."""
        stream_id = self.quic.get_next_available_stream_id()
        first = request.resume_from or 0
        req = ClientRequest(stream_id, request, now, TokenReceiver(first_index=first), prefix=list(prefix or []))
        me = weakref.ref(self)
        req.ack_source = _AckSource(req, functools.partial(_ecn_counts_of, me),
                                    functools.partial(_holds_acks_of, me) if request.scheme == "chatterbox" else None)
        self.requests[stream_id] = req
        self._send(stream_id, request)
        if self._stream_blocked(stream_id):  # past the server's request limit: QUIC sends it once a slot frees
            self._queued.append(stream_id)
        return stream_id

    def _awaited(self) -> list[ClientRequest]:
        """The open requests the pings are for: those on the wire, and the first still waiting for stream credit
        (so that a connection whose sent requests all ended keeps its pings while it waits for MAX_STREAMS). The
        requests are in stream order (``self.requests`` is filled as streams open), so the walk stops there: over
        thousands of queued requests, a walk of them all at every timer update cost the client CPU that grew with
        the square of their number."""
        first_queued = self._queued[0] if self._queued else None
        awaited = []
        for sid, r in self.requests.items():
            if not r.done:
                awaited.append(r)
            if first_queued is not None and sid >= first_queued:
                break
        return awaited

    def _stream_blocked(self, stream_id: int) -> bool:
        """Whether ``stream_id`` waits for the server's MAX_STREAMS (aioquic holds back a stream past the peer's
        limit, nothing of it sent)."""
        stream = self.quic._streams.get(stream_id)
        return stream is not None and stream.is_blocked

    def _on_peer_packet(self, now: float) -> None:
        if self._queued:
            self._release_queued(now)

    def _release_queued(self, now: float) -> None:
        """A queued request's time starts when the server's MAX_STREAMS lets it leave: its TTFT (and the REPORT the
        daemon's client-side metrics read) is the server's and the path's, not the wait behind the application's
        other answers, as when the application queues its chats itself; and the pings' backoff before the first
        token counts from then."""
        # in stream order, as aioquic unblocks them: the first still blocked holds every later one back (a walk of
        # them all at each packet received grew with the square of the requests queued)
        while self._queued:
            sid = self._queued[0]
            req = self.requests.get(sid)
            alive = req is not None and not req.done
            if alive and self._stream_blocked(sid):
                break
            self._queued.popleft()
            if alive:
                assert req is not None
                req.request_time = now

    def cancel(self, stream_id: int) -> ChatOutcome | None:
        """End the request on this side; return what was measured of it so far (None once it has ended, or before
        the server started it: no id, no scheme). The outcome is partial: ``total`` counts the tokens rendered,
        ``finish_reason`` is ``cancelled``, the digest unchecked (``digest_ok`` False) and no generation times (they
        come with the server's FINISHED), so its statistics have a TTFT and no stall ratio.

        An answer already whole and checked (``AnswerComplete``: only its GEN_TIMES to come) is not cancelled:
        it ends as one whose GEN_TIMES did not come, its REPORT (without a stall ratio) ahead of the FIN, and its
        outcome is the whole answer's (the server's ``finish_reason``, the digest checked)."""
        req = self.requests.get(stream_id)
        if req is not None and req.answered is not None and not req.done:
            self._end_answered(req, None)
            return req.answered
        req = self.requests.pop(stream_id, None)
        if req is None or req.done:
            return None
        req.done = True
        self._fin(stream_id)
        self.scheduler.forget(req.ack_source)
        if req.started is None:
            return None
        rec = req.receiver
        tokens = req.prefix + rec.tokens if rec.first_index == len(req.prefix) else list(rec.tokens)
        return ChatOutcome(
            tokens=tokens,
            first_index=rec.first_index,
            total=rec.first_index + len(rec.render_times),
            digest_ok=False,
            scheme=req.started.scheme,
            request_id=req.started.request_id,
            finish_reason="cancelled",
            request_time=req.request_time,
            render_times=list(rec.render_times),
            gen_offsets=None,
            packets=rec.packets,
            duplicate_tokens=rec.duplicate_tokens,
            repairs_requested=req.repairs_requested,
            resumed=req.request.resume_id is not None,
        )

    def abandon_open(self) -> list[int]:
        """Before this side closes the connection on purpose: reset every request stream still open (RESET_STREAM
        CANCELLED), so that the server stops generating their answers, and return their ids. The driver sends the
        resets before its CONNECTION_CLOSE (aioquic's close sends nothing else): a close alone reads to the server
        as a lost connection, whose answers it keeps generating for a client that may come back to resume them (the
        daemon, for limits.orphan_timeout_s), while the application had ended them. A stream still waiting for
        the server's stream credit was never seen there: it gets a FIN behind its REQUEST, which the close keeps
        from leaving (a reset would go out at once, past the server's stream limit, a protocol violation). Their
        requests end here without an event: the driver fails them with its close. An answer already whole and
        checked (only its GEN_TIMES to come) is not abandoned: its REPORT, without a stall ratio, and FIN go out
        ahead of the close, as they would had the GEN_TIMES not come (the daemon's client metrics count it), and
        the driver's close ends it with its statistics, not as a failure (``ChatStream._failed``)."""
        abandoned = []
        for sid, req in list(self.requests.items()):
            if req.done:
                continue
            if req.answered is not None:
                self._end_answered(req, None)  # (its RequestFinished is not needed: the close's failure ends it)
                abandoned.append(sid)
                continue
            req.done = True
            self.scheduler.forget(req.ack_source)
            if self._stream_blocked(sid):
                self._fin(sid)  # (should it leave after all: a REQUEST with its FIN, a give-up before it began)
            else:
                self._reset_own_side(sid)
            abandoned.append(sid)
        self.requests.clear()
        self._queued.clear()
        return abandoned

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
            elif isinstance(frame, GenTimes):
                fin = req.finished
                if fin is None or not self._times_follow(fin):
                    raise FrameError("generation times the server had no reason to send (before FINISHED, or "
                                     "beside FINISHED's own, or without ALPN_GEN_TIMES)")
                if len(frame.gen_us) != fin.total:
                    raise FrameError(f"{len(frame.gen_us)} generation times for {fin.total} tokens")
                if req.answered is not None:
                    return out + self._end_answered(req, frame.gen_us)
                # (tokens still missing, which the server sends it only after: the answer ends with them)
                req.finished = dataclasses.replace(fin, gen_us=frame.gen_us)
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
        if end and req.answered is not None and not req.done:
            return out + self._end_answered(req, None)  # no GEN_TIMES came: statistics without them
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
        useful = req.receiver.useful_packets
        new = req.receiver.on_frame(frame, now)
        if req.receiver.useful_packets > useful:
            self._tokens_arrived(now)
        self._track_gap(req, now)
        return [TokensRendered(req.stream_id, new, now)] if new else []

    def _on_datagram(self, frame, now: float) -> list[SessionEvent]:
        if not isinstance(frame, Tokens):
            raise ProtocolError("servers may only send token datagrams")
        req = self.requests.get(frame.handle)
        if req is None or req.done or req.answered is not None:
            return []
        out = self._tokens(req, frame, now)
        if req.request.scheme == "chatterbox":  # (the duplicate baseline's acks stay as the paper's: ACK_QUEUE_S)
            self._note_one_way_delay(frame, now)
        if self.send_acks and req.ack_source is not None:
            self.scheduler.schedule(req.ack_source)
        out.extend(self._maybe_complete(req, now))
        return out

    def _note_one_way_delay(self, frame: Tokens, now: float) -> None:
        """A token datagram arrived: its one-way delay against the connection's smallest tells whether the path
        from the server queues (ACK_QUEUE_S), and the QUIC ACK hold follows (ACK_QUEUE_QUIC_HOLD_S)."""
        if frame.sent_us is None:
            return
        delay = now - frame.sent_us / 1e6  # (the two clocks' offset is in every sample alike)
        self._owd_floor.add(delay, now)
        if delay - self._owd_floor.value(now) > ACK_QUEUE_S:
            self._queued_at = now
        self._set_ack_hold(now)

    def before_datagram(self) -> None:
        self._set_ack_hold(self._now)  # (the queue's hold ends with it, chatterbox datagrams or not)
        super().before_datagram()

    def _set_ack_hold(self, now: float) -> None:
        """QUIC ACKs leave at once (ACK_QUEUE_QUIC_HOLD_S) while the ack datagrams are held back, else after the
        usual hold; one pending already is pulled in (the datagram that showed the queue armed it)."""
        if self.send_acks and self.ack_timing is not None:  # (without ack datagrams, its ACKs are as they were)
            self.ack_timing.set_hold(self.quic, ACK_QUEUE_QUIC_HOLD_S if self.holds_acks() else ACK_HOLD_S, now)

    def path_queues(self) -> bool:
        """Whether a token datagram's one-way delay stood more than ACK_QUEUE_S above the smallest of late (a window
        of rtt_floor.RTT_FLOOR_WINDOW_S) within the last ACK_QUEUE_HOLD_S."""
        return self._now - self._queued_at < ACK_QUEUE_HOLD_S

    def holds_acks(self) -> bool:
        """Whether the ack datagrams stop now: the path from the server queues (:meth:`path_queues`) and no packet
        of this connection arrived ECN-capable (a server that marks takes its latency samples and ECN counts from
        them; see ACK_QUEUE_S)."""
        return self.path_queues() and not self._ecn_marked()

    def _ecn_marked(self) -> bool:
        """Whether a packet of this connection arrived ECT(0), ECT(1) or CE (False where the socket cannot tell)."""
        counts = self.ecn_counts() if self.ecn_counts is not None else None
        return counts is not None and any(counts[1:])

    def _times_follow(self, fin: Finished) -> bool:
        """Whether a GEN_TIMES frame follows ``fin``: ``ALPN_GEN_TIMES`` was negotiated and FINISHED came without
        its times, which the answer's length did not rule out (beyond MAX_GEN_TIMES tokens there are none)."""
        return fin.gen_us is None and fin.total <= MAX_GEN_TIMES and self.alpn == ALPN_GEN_TIMES

    def _maybe_complete(self, req: ClientRequest, now: float) -> list[SessionEvent]:
        fin = req.finished
        if req.done or req.answered is not None or fin is None or req.started is None or not req.receiver.complete:
            return []
        self.scheduler.forget(req.ack_source)
        if self._times_follow(fin):
            # the answer is whole and checked now; its statistics when GEN_TIMES comes (_end_answered)
            req.answered = self._outcome(req, fin)
            req.answered_at = now
            return [AnswerComplete(req.stream_id, req.answered)]
        req.done = True
        self.requests.pop(req.stream_id, None)
        return self._report_and_end(req, self._outcome(req, fin))

    def _end_answered(self, req: ClientRequest, gen_us: list[int] | None) -> list[SessionEvent]:
        """An answered request's end: with its GEN_TIMES, or (``None``) without, when they did not come."""
        assert req.answered is not None
        req.done = True
        self.requests.pop(req.stream_id, None)
        outcome = req.answered
        if gen_us is not None:
            outcome = dataclasses.replace(outcome, gen_offsets=gen_times_from_deltas(gen_us))
        return self._report_and_end(req, outcome)

    def _report_and_end(self, req: ClientRequest, outcome: ChatOutcome) -> list[SessionEvent]:
        if self.send_reports:
            self._send(req.stream_id, _report(outcome))
        self._fin(req.stream_id)
        return [RequestFinished(req.stream_id, outcome)]

    def _outcome(self, req: ClientRequest, fin: Finished) -> ChatOutcome:
        assert req.started is not None
        tokens = req.prefix + req.receiver.tokens
        if req.receiver.first_index != len(req.prefix):
            tokens = req.receiver.tokens  # resumed without the prefix: the digest covers tokens not held here
        digest_ok = len(tokens) == fin.total and text_digest(tokens) == fin.digest
        return ChatOutcome(
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

    def _on_stream_reset(self, stream_id: int, code: int) -> list[SessionEvent]:
        req = self.requests.get(stream_id)
        if req is not None and req.answered is not None and not req.done:
            return self._end_answered(req, None)  # whole and checked: statistics without their times
        req = self.requests.pop(stream_id, None)
        if req is None or req.done:
            return []
        req.done = True
        return [RequestFailed(stream_id, RemoteError(f"server reset the request (code {code})", code=known_code(code)))]

    def _on_terminated(self, event: qe.ConnectionTerminated) -> list[SessionEvent]:
        out: list[SessionEvent] = []
        err = self._closing_error
        for req in list(self.requests.values()):
            if not req.done and req.answered is not None:  # whole and checked: statistics without their times
                req.done = True
                out.append(RequestFinished(req.stream_id, req.answered))
            elif not req.done:
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
            if req.answered is not None and not req.done:
                t = req.answered_at + GEN_TIMES_WAIT_S
                best = t if best is None else min(best, t)
                continue
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
        out: list[SessionEvent] = []
        for req in list(self.requests.values()):
            if req.answered is not None and not req.done:
                if now >= req.answered_at + GEN_TIMES_WAIT_S:
                    out.extend(self._end_answered(req, None))
                continue
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
        return out


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
