"""Sans-I/O Chatterbox token sender and receiver (arXiv 2401.12961, "Eloquent", NAIC '24).

The sender builds each datagram at the moment it leaves (not when a token is generated): new tokens claim
the packet first, then the oldest unacknowledged tokens fill what is left, oldest first, because they are
the ones blocking the reader. So any packet that arrives renders on its own and carries every earlier
loss with it, without waiting for a retransmission timer.

Acknowledgements come from two places: QUIC's own acks of the packets (the delivery hook) and the
client's ack datagrams (cumulative next index, echoed send time). A repair packet goes out when QUIC
declares a packet lost and nothing later is in flight to cover it, and when generation idles with tokens
still unacknowledged (a tail loss), with exponential backoff.

Repeats are kept from taking the congestion window that new tokens need. When acknowledgements stop while
the path still delivers (an uplink-only outage), the repeats grow to the full 64 oldest tokens per packet and,
measured in ``tokenwire sim`` (8-s outage of the uplink only, 30 tokens/s), filled aioquic's 22 KB window in 3 s,
after which no new token could leave: 2.1 s of stall where in-order streaming, at 90 bytes per token, had
none. So while no acknowledgement has come for :data:`ACK_SILENCE_S` (or four round trips, if longer),
repeats that ride with new tokens may only use the first half of the window (:data:`REPEAT_WINDOW_SHARE`).
And when nothing at all has come from the client for as long (its pings cross a downlink outage every
quarter second once its own packets go unacknowledged; in an uplink outage it falls silent too, and every
token arrives), no repeats ride with new tokens: the half window they took cost 3 s of new tokens in an 8-s
uplink outage (sim, 900 tokens, seeds 1-5: stall 0.074 -> 0.015, in-order streaming 0.062). The session
reports the client's packets (:meth:`TokenSender.on_peer_packet`); a driver that does not keeps the
half-window rule.
Not limited: a packet that carries no new token (a repair), a probe (sent with the window full), and one
packet each 1, 2, 4, 8 ... seconds into the silence: a downlink outage followed at once by an uplink one
otherwise left a 37-token gap for 3 s, the tokens that would fill it riding in no packet until acks
returned (namespace testbed, instrumented).

The rule is gated on silence by design: while acknowledgements flow the window frees itself, and right after
an outage aioquic has collapsed it to two packets, where a half-window rule would keep repeats out of most
packets. Measured, the gate changes little either way (namespace testbed, 2-s outages both ways: 42.7 / 44.3 %
stall gated, 45.0 / 42.2 % not; the sim's loss rows move by at most 0.03, in both directions). A rule that kept
repeats of tokens not yet due (sent less than 1.25 round trips ago) to half the window while acks flow was tried
and reverted: it cured a loss-free 1-s one-way path (stall 0.107 -> 0.023 through a relay) but on long lossy
paths it delayed each lost token's first repeat by a round trip (`tokenwire sim`, 300 ms each way, iid 5 %,
seeds 1-9: 0.304/0.274/0.242 -> 0.391/0.316/0.278; 500 and 1000 ms likewise).

The request stream's next waiting frame (FINISHED above all) takes its room in a packet before the repeats:
aioquic writes DATAGRAM frames ahead of STREAM frames, and once the window is full only probes leave, each of
which the repeats filled, so FINISHED waited for acknowledgements to free the window (loopback UDP relay, 25-s
uplink-only outage: last token at 12.9 s, answer ended at 27.1 s when the uplink returned; now both at
12.5-12.9 s). The session reports that backlog (``stream_backlog``).

Limit, measured: in an uplink-only outage nothing frees the window, and every repeat sent into it is taken
from the new tokens at the outage's end. Through the loopback relay (1-ms round trip, 15.8 KB window, 8-s
outage, 300 tokens) the repeats took 2.7 KB, 0.5 KB of it before the silence is recognised and the rest in
idle repairs and the 1, 2, 4-s packets, and the window ran out ~1.5 s before the uplink returned: stall
0.09-0.10 where in-order streaming had 0.01-0.02. The sim's rows above do not show it.

On a path that queues far past the cap's threshold, new tokens wait at the sender (up to :data:`COALESCE_MAX_S`) to
share a packet: there one packet per token queued ~85 bytes of headers and an ack each way behind every token.

The ``duplicate`` baseline lives here too, as a mode: each packet carries new tokens (and tokens whose
every copy was lost) and is sent twice back to back, as in the paper's duplication baseline.

Nothing here touches sockets, clocks or the event loop: every method takes ``now``.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from .frames import Ack, Tokens, encode_frame, token_cost
from .transcript import Transcript


def _int_size(v: int) -> int:
    """Bytes msgpack uses for a non-negative integer."""
    if v < 128:
        return 1
    if v < 256:
        return 2
    if v < 65536:
        return 3
    if v < (1 << 32):
        return 5
    return 9


CONGESTED_REPEATS = 2
"""While the path is congested, a packet repeats at most this many of the oldest unacknowledged tokens (a repair,
with no new token, is not limited). Repeats of every unacknowledged token grow with the round trip, so a queue
that built up made each packet larger and the queue longer: 30 chats through one 1-Mbit/s link (namespace
testbed, droptail, bursty loss) queued 124-215 ms and stalled 0.82-0.97 of their reading time, against 0.48-0.51
for in-order streaming. The oldest unacknowledged tokens are the ones most likely lost (a later one's ack would
have covered them), so the cap keeps their repair in the next packet."""
QUEUE_DELAY_S = 0.04
QUEUE_DELAY_SHARE = 0.5
"""Congested: the smoothed round trip exceeds the path's minimum by more than QUEUE_DELAY_S, or by more than this
share of the minimum if larger (a long path's jitter is larger), or a CE mark came back within a round trip (on a
packet sent ECT(1), only as L4S_CE_WINDOW_SHARE says)."""
PIGGYBACK_QUEUE_S = 0.005
"""Repeats ride packets that leave anyway (a lone ACK, FINISHED: the server's ``offer_piggyback``) only while aioquic's
smoothed round trip stands at most this far above its minimum: redundancy a path with spare capacity carries for
free, and that a shared bottleneck pays for in queue. 30 chats through one 1-Mbit/s link (``tokenwire sim --chats
30``, 40 ms each way, droptail 200, 300 tokens at 30/s, seeds 0-9) offered it 87 % of its capacity at 148 bytes per
token, and the queue that wandered between 10 and 50 ms stalled them: median 0.33 at 2 % iid loss (seeds 0-3
0.45-0.51) against in-order streaming's 0.22; with the gate 0.21 at 132 bytes per token (`ge:0.01,0.1`: 0.34 -> 0.27,
streaming 0.42). It costs the repairs that rode a lone ACK where a trace's own capacity queues: one chat, the same
sim, `ge:0.01,0.1` on the down link of TMobile-LTE-short 15.0 -> 15.5 %, Verizon-LTE-short 19.6 -> 20.4 % (streaming
32.9 / 36.2 %); a queueless path (the fixed-delay channel, 12 Mbit/s) is unchanged. At 7 ms the cellular cost was 0.1 /
0.3 points, but 30 chats kept 0.22 / 0.28; at 10 ms 0.25 / 0.30. No gate helps at 40 chats on that link (stall 0.98,
streaming 0.23): the client's ack datagrams, and the server's lone ACKs of them, pass its capacity; the client
stops them while the path queues (client_session.ACK_QUEUE_S). On the TMobile trace the gate was shut
at 603 of 902 chances (the smoothed round trip 3.9 / 5.7 / 8.2 ms above its minimum at p10 / p50 / p90: the trace's
own jitter). The minimum is that of the last 10 s (server_session.ServerSession._rtt, rtt_floor.RTT_FLOOR_WINDOW_S):
with aioquic's, which never expires, a path whose base delay grew by more than 5 ms (a new route) kept the gate shut
for the rest of the connection."""
ECHO_STALE_RTTS = 2.0
"""While no ack datagram has brought an RTT sample (its echo) for this many of the sender's smoothed round trips, each
QUIC acknowledgement of a token datagram sets the round trip to QUIC's own smoothed one (``path_rtt``; aioquic samples
only the largest packet an ACK newly acknowledges: the send-to-ack time of every acknowledged packet counted the late
ACKs of old ones after a 200-ms outage, and stalled 0.2045 instead of 0.2019 in the README's ``ge:0.001,0.005`` row):
the client holds its ack datagrams back while the path from the server queues (client_session.ACK_QUEUE_S), and the
round trip, which sets the idle repair's timeout and the silence rule, stood at its value from before the queue. A
review's run (90 tokens, a queue growing to 200 ms): 0.048 s against aioquic's 0.289, 4 idle repairs and 106 repeated
tokens where acks on had 2 and 79. Where ack datagrams come, nothing changes."""
L4S_CE_WINDOW_SHARE = 0.5
"""A CE mark on a packet sent ECT(1) makes the path congested only while the bytes in flight fill this share of the
congestion window. An L4S queue marks from about 1 ms of queue on, so its marks come back whenever scalable flows
share it; counted at once they capped the repeats almost all the time and cost loss resilience for no latency
(virtual SwiftQueue model, two scalable and one classic cross flow, 100-ms round trip, seeds 0-3: stall 8.3 -> 10.3 %
at 12 Mbit/s with 2 % loss, 35.9 -> 44.6 % on Verizon LTE with bursty loss; up to +0.5 points at 40 ms). An L queue
that grows is seen by the round-trip rule; the window share is for marks that bind our own sending (Prague cuts the
window on each), where repeats take the room new tokens need (not modelled there: that flow has no window)."""
COALESCE_QUEUE_S = 0.2
COALESCE_MAX_S = 0.1
"""While the path queues well past the congestion cap's threshold (the smoothed round trip more than COALESCE_QUEUE_S,
or QUEUE_DELAY_SHARE of the minimum if larger, above its minimum) and a token datagram was declared lost within
QUIET_LOSS_S, new tokens wait at the sender to share a packet: a packet with new tokens leaves at most once per
COALESCE_MAX_S (or per the queue's delay, if a driver reports less). Each packet costs ~85 bytes of headers and draws
an ack datagram and QUIC ACKs on the uplink for ~6 bytes of token, and repeats, even capped, make it larger. On
Verizon EVDO (namespace testbed, no loss, ~50 kbit/s both ways for most of a 600-token answer) Chatterbox with
repeats and no wait sent 1.46 packets per token down and 1.26 up, 156 + 116 bytes per token against in-order
streaming's 90 + 43, and queued its own tokens: median token delay 370 ms, p99 2.8 s (stream: 199 ms, 1.2 s); with
the wait 206 ms, 1.1 s, 94 bytes per token. What the wait saved is bytes and tail delay, not stall: the 84.2 -> 83.1 %
first measured with it is inside the run-to-run spread of 3-seed sets (83.1-84.2 % over six sets of the same code).
At the cap's own 40-ms threshold instead of 200 ms the wait cost a faster, bursty link stall: T-Mobile UMTS (2 Mbit/s
mean) 32.4 -> 37.1 % (stream 32.0 %); with 200 ms, 32.6 %."""
STANDING_QUEUE_S = 1.0
DRAIN_QUEUE_S = 0.02
DRAIN_S = 0.5
DRAIN_GAP_S = 10.0
"""A queue that stands more than DRAIN_QUEUE_S above the path's minimum but under the congestion cap's threshold
(QUEUE_DELAY_S, or QUEUE_DELAY_SHARE of the minimum if larger) for STANDING_QUEUE_S makes the server drain the path, as
BBR's PROBE_RTT does, for DRAIN_S or a smoothed round trip if longer, at most once per DRAIN_GAP_S (BBR's, and the RTT
floor's window: rtt_floor.RTT_FLOOR_WINDOW_S): packets with new tokens carry no repeats, none ride packets that leave
anyway, and new tokens wait the queue's delay (at most COALESCE_MAX_S) to share a packet, unless no token datagram was
lost for QUIET_LOSS_S (they then leave at once, as QUIET_LOSS_S says); a repair due then (a loss, the idle timer) keeps
its repeats. Chats that start together behind a queue (a flash crowd: answers that begin while the handshakes' packets
still queue, as `testbed contention --start connected` starts them) learn their minimum inside it, and the queue they
then keep standing reads as none, or as one under the threshold that minimum sets: repeats uncapped, no shared packets,
and it never drains. ``tokenwire sim``, 40 chats on 1 Mbit/s (40 ms each way, droptail 200, 300 tokens at 30/s, answers
started without waiting for the handshakes' queue, with 150 + 200 packets of cross traffic over their first second): a
minimum of 208 ms where the path's is 88, the queue 63-88 ms above it, under the 104-ms threshold, for the whole answer;
stall 0.975-0.979 at 2 % iid loss and ``ge:0.01,0.1`` (seeds 0-2, 126-136 bytes per token). With the drain each chat
drains once, 2-3 s into its answer, finds a minimum of ~90 ms, and the cap takes over: 0.35-0.42 (107 bytes per token).
Namespace testbed, the same 40 chats with ``--start connected`` (2 % iid loss, seeds 0-2, host load 0.9-2.4): median
0.89 (0.29-0.94, 13 runs) -> 0.38 (0.35-0.63, 9 runs); started as usual 0.27-0.36 -> 0.24-0.34 (6 / 5 runs). There the
minimum was learned ~50 ms into the queue, which then stood 45-75 ms: 0-25 ms above it, so with QUEUE_DELAY_S's 40 ms as
the bar the drain came only once the queue had grown, 6 s in (median 0.73, 0.38-0.82, over 8 runs of a helper's not kept
in docs/data/flash-crowd-s43/). Each part is needed (sim, with a 40-ms bar): without the wait 0.98; a drain of max(0.3
s, a round trip) 0.97-0.98; 2 s of standing 0.47-0.98, 0.5 s 0.36-0.97 (it drained while the cross traffic still queued,
and not again in the window). 45 chats started as usual, past the wall, 0.921 -> 0.707 (seed 0). A lone chat's queue
rarely stands under the threshold for a second: 30 and 40 chats started as usual (seeds 0-2), one chat on the fixed
channel (four loss models, the README's rows) or on the LTE, EVDO and UMTS traces measure the same stall to the last
digit (EVDO 96 -> 95.5 bytes per token); with 100 ms each way (5 seeds) EVDO drains once an answer, 0.8022 unchanged,
0.8428 -> 0.8451 with 2 % iid loss, UMTS once in 5 answers, unchanged. Its cost is where a lone chat meets a queue it
did not build and cannot drain: one chat whose one-way delay steps up 2 s into a 600-token answer (the step reads as a
queue until the floor's window passes it; stall against the new base from 1 s after the step, seeds 0-4, 2 % iid /
``ge:0.01,0.1``): 100 -> 115 ms 0.0201 -> 0.0234 / 0.0944 -> 0.1077, 100 -> 130 ms 0.0196 -> 0.0358 / 0.0949 -> 0.1124,
200 -> 260 ms 0.0583 -> 0.0729 / 0.2305 -> 0.2439, 300 -> 400 ms 0.2510 -> 0.2466 / 0.5175 -> 0.5315: one drain in the
window, the shared packets' wait its main cost (100 -> 130 ms at 2 % iid without the wait: 0.0196)."""
QUIET_LOSS_S = 10.0
"""On a queueing path (COALESCE_QUEUE_S) where no token datagram (new tokens, repeats, a repair or a piggyback, of any
answer on the connection: LossClock) was declared lost by QUIC for this long, new tokens neither wait (COALESCE_MAX_S)
nor carry repeats, and nothing rides a packet leaving anyway: in-order streaming's behaviour, whose every token arrives
there too. Verizon EVDO delivers 2-5 slots of ~1500 bytes a second after its first 8 s: the wait kept tokens at the
sender while a slot passed (in-order streaming used 43 slots after 7.5 s, Chatterbox 36-40), each miss costing a whole
slot gap (0.3-1.2 s), and repeats made the packets in the byte-limited slots larger. `tokenwire sim --down-trace`
(EVDO both ways, 600 tokens, 40 ms, seeds 0-9): stall 82.97 -> 81.52 % (stream 81.10 %) at 119 bytes per token instead
of 92, p99 token delay 1.11 -> 1.23 s; with EVDO's own uplink trace 85.25 -> 84.19 % (stream 83.49 %). The first loss
restores the wait and the repeats for QUIET_LOSS_S after the latest one; repairs carry their repeats throughout."""


def path_queues(srtt: float, floor: float, threshold: float = QUEUE_DELAY_S) -> bool:
    """Whether a smoothed round trip ``srtt`` stands more than ``threshold`` above the path's minimum ``floor``, or
    more than QUEUE_DELAY_SHARE of the minimum if larger: the queue test of the congestion cap (QUEUE_DELAY_S)
    and of the wait for shared packets (COALESCE_QUEUE_S), in the server session and in the SwiftQueue virtual
    model alike."""
    return srtt - floor > max(threshold, QUEUE_DELAY_SHARE * floor)


REPEAT_WINDOW_SHARE = 0.5  # during ack silence, repeated tokens may fill the window up to this share of it
ACK_SILENCE_S = 0.5  # ... silence: no acknowledgement for this long (or four smoothed RTTs, if longer)
STREAM_FRAME_OVERHEAD = 16  # a STREAM frame's type, stream id, offset and length, upper bound

NEEDS_ROOM = object()  # build() result: nothing fits in the space offered, try a fresh packet


@dataclass(slots=True)
class SentPacket:
    """What one token datagram carried, to resolve it when QUIC reports it acked or lost."""

    pid: int
    sent_at: float
    runs: tuple[tuple[int, int], ...]  # [first, end) ranges of token indices
    copies: int
    repair: bool
    acked: bool = False


@dataclass(slots=True)
class LossClock:
    """When QUIC last declared a token datagram lost (QUIET_LOSS_S). A connection's senders share one, so that an
    answer starting on a path that lost a datagram lately (the previous turn's) starts with the wait and repeats."""

    at: float = -math.inf


@dataclass
class SenderStats:
    packets: int = 0
    bytes: int = 0
    tokens_carried: int = 0
    redundant_tokens: int = 0
    redundant_bytes: int = 0
    # packets with no new token, only repeats (repair = new_end == new_first): after a loss report or the idle
    # timer, or when nothing new was ready; piggybacks: those riding along with other frames. Both rise without loss
    repairs: int = 0
    piggybacks: int = 0
    repeats_trimmed: int = 0  # packets whose repeats were cut to leave half the window to new tokens
    repeats_capped: int = 0  # packets whose repeats were cut to CONGESTED_REPEATS on a congested path
    lost_reports: int = 0
    acked_reports: int = 0


class TokenSender:
    """Token datagrams of one request, for the ``chatterbox`` (default) and ``duplicate`` schemes."""

    def __init__(
        self,
        handle: int,
        transcript: Transcript,
        *,
        scheme: str = "chatterbox",
        first_index: int = 0,
        max_redundant_tokens: int = 64,
        initial_rtt: float = 0.1,
        min_idle_repair: float = 0.01,
        max_idle_repair: float = 2.0,
    ) -> None:
        if scheme not in ("chatterbox", "duplicate"):
            raise ValueError(f"TokenSender handles chatterbox and duplicate, not {scheme!r}")
        self.handle = handle
        self.transcript = transcript
        self.scheme = scheme
        self.copies = 2 if scheme == "duplicate" else 1
        self.floor = first_index  # every token below is acknowledged
        self.next_new = first_index  # first token never sent in a datagram
        self.max_redundant_tokens = max_redundant_tokens
        self.srtt = initial_rtt
        self.min_idle_repair = min_idle_repair
        self.max_idle_repair = max_idle_repair
        self.stats = SenderStats()
        self.closed = False
        self._acked: set[int] = set()  # acknowledged indices >= floor (out of order)
        self._retx: set[int] = set()  # duplicate scheme: tokens whose every copy was lost
        self._outstanding: dict[int, SentPacket] = {}
        self._next_pid = 0
        self.codepoint = 0  # ECN codepoint of the last packet built (the session's choice, or as set)
        # the session's one marking decision for the datagrams leaving now, asked only once a packet is built (a
        # decision taken before, for transmits that built nothing, cost swiftqueue an inference each); None: use
        # ``codepoint`` as set
        self.codepoint_of: Callable[[], int] | None = None
        self.sent_meta: OrderedDict[int, tuple[int, int]] = OrderedDict()  # sent_us -> (size, codepoint)
        self._want_repair = False
        self.losses = LossClock()  # (the session gives every sender of its connection the same one)
        self._last_send = -math.inf
        self._backoff = 0
        self._heard_at: float | None = None  # last acknowledgement (or the first send, before any)
        self._echo_at = -math.inf  # when an ack datagram last brought an RTT sample (on_ack)
        self._peer_seen_at: float | None = None  # last packet of any kind from the client (None: not told)
        self._silent_full_packets = 0  # packets with unlimited repeats sent during the current silence
        # bytes of the request stream's next frame waiting to leave (FINISHED above all), as the driver reports
        # them: repeats leave that room in the packet. None: not told (no room kept)
        self.stream_backlog: Callable[[], int] | None = None
        # whether the path is congested now (queueing, CE marks), as the driver judges it: repeats shrink to
        # CONGESTED_REPEATS then. None: not told (never congested)
        self.congested: Callable[[float], bool] | None = None
        # QUIC's smoothed round trip of the path, as the driver reads it: the round trip while no echo comes
        # (ECHO_STALE_RTTS). None: not told (the echoes alone)
        self.path_rtt: Callable[[], float] | None = None
        # how long the path queues now (s), as the driver judges it: new tokens wait up to that long (at most
        # COALESCE_MAX_S) after a packet with new tokens, to share the next one. None: not told (never wait)
        self.queue_delay: Callable[[float], float] | None = None
        # whether the driver drains the path now (STANDING_QUEUE_S): packets with new tokens carry no repeats then.
        # None: not told (never)
        self.draining: Callable[[float], bool] | None = None
        self._hold_until: float | None = None  # new tokens wait until then (set when a packet with new ones left)

    # ----------------------------------------------------------------------------------- state queries
    @property
    def unacked(self) -> int:
        """Tokens sent at least once and not yet acknowledged."""
        return max(0, self.next_new - self.floor)

    def wants_send(self) -> bool:
        if self.closed:
            return False
        if self.next_new < len(self.transcript) and self._hold_until is None:
            return True
        if self.scheme == "duplicate":
            return bool(self._retx)
        return self._want_repair and self.floor < self.next_new

    def next_timer(self) -> float | None:
        """When an idle repair is due or new tokens held to share a packet may leave (chatterbox only); None when
        neither waits."""
        if self.closed or self.scheme != "chatterbox":
            return None
        hold = self._hold_until if self.next_new < len(self.transcript) else None
        if self.floor >= self.next_new or self._want_repair:
            return hold
        idle = self._last_send + self._idle_timeout()
        return idle if hold is None else min(hold, idle)

    def _idle_timeout(self) -> float:
        base = max(self.min_idle_repair, 1.5 * self.srtt)
        return min(self.max_idle_repair, base * (2**self._backoff))

    # ----------------------------------------------------------------------------------- events in
    def on_timer(self, now: float) -> None:
        if self._hold_until is not None and now >= self._hold_until:
            self._hold_until = None  # the held tokens may leave (the driver schedules the sender)
        deadline = self.next_timer()
        if deadline is not None and now >= deadline:
            self._want_repair = True
            self._backoff = min(self._backoff + 1, 8)

    def on_ack(self, ack: Ack, now: float) -> None:
        """A client ack datagram: cumulative progress and, with an echo, an RTT sample."""
        if ack.echo_us is not None:
            self._rtt_sample(now - ack.echo_us / 1e6)
            self._echo_at = now
        self._heard(now)
        self._advance_floor(min(ack.next_index, self.next_new))

    def on_delivery(self, cookie: SentPacket | int, acked: bool, now: float) -> None:
        """QUIC's verdict on one copy of a packet (from the datagram delivery hook)."""
        pid = cookie.pid if isinstance(cookie, SentPacket) else cookie
        pkt = self._outstanding.get(pid)
        if pkt is None:
            return
        pkt.copies -= 1
        if acked:
            self.stats.acked_reports += 1
            self._heard(now)
            if not pkt.acked:
                pkt.acked = True
                if self.path_rtt is not None and now - self._echo_at > ECHO_STALE_RTTS * self.srtt:
                    self.srtt = self.path_rtt()  # the client holds its ack datagrams back
                for first, end in pkt.runs:
                    self._mark_acked(first, end)
        else:
            self.stats.lost_reports += 1
            if not pkt.acked and pkt.copies <= 0:
                self.losses.at = now
                self._on_lost(pkt)
        if pkt.copies <= 0:
            del self._outstanding[pid]

    def _rtt_sample(self, sample: float) -> None:
        if 0.0 <= sample < 60.0:
            self.srtt = 0.875 * self.srtt + 0.125 * sample

    def on_peer_packet(self, now: float) -> None:
        """Any packet from the client arrived (the session tells every sender): during a downlink outage its
        keep-alive pings still come, during an uplink outage nothing does."""
        self._peer_seen_at = now

    def on_stream_delivery(self, first: int, end: int) -> None:
        """Tokens ``[first, end)`` reached the client on the request stream (a repair there, acknowledged by QUIC):
        acknowledged, as an ack datagram's index would say (the session tells it, server_session._note_stream_acks)."""
        self._mark_acked(max(first, self.floor), min(end, self.next_new))

    def _heard(self, now: float) -> None:
        self._heard_at = now
        self._silent_full_packets = 0

    def _on_lost(self, pkt: SentPacket) -> None:
        missing = next((i for first, end in pkt.runs for i in range(first, end) if self._is_unacked(i)), None)
        if missing is None:
            return
        if self.scheme == "duplicate":
            for first, end in pkt.runs:
                self._retx.update(i for i in range(first, end) if self._is_unacked(i))
            return
        # chatterbox: a later packet still in flight whose repeats start at or below the missing token keeps the
        # floor moving, and the token rides a later packet's repeats once it is the floor; otherwise repair now
        # (capped repeats, CONGESTED_REPEATS, may not carry it yet: the floor first, as before). One sent without
        # repeats (a quiet path, QUIET_LOSS_S) carries none: taken for one, it left the lost token to the idle
        # repair, 1.5 round trips of a queueing path
        if not any(p > pkt.pid and later.runs[0][0] <= missing for p, later in self._outstanding.items()):
            self._want_repair = True

    def _is_unacked(self, i: int) -> bool:
        return i >= self.floor and i not in self._acked

    def _mark_acked(self, first: int, end: int) -> None:
        if first <= self.floor:
            self._advance_floor(end)
            return
        for i in range(first, end):
            self._acked.add(i)
            self._retx.discard(i)

    def _advance_floor(self, new_floor: int) -> None:
        if new_floor <= self.floor:
            return
        old = self.floor
        self.floor = new_floor
        acked = self._acked
        while self.floor in acked:
            acked.discard(self.floor)
            self.floor += 1
        for held in (acked, self._retx):  # (drop what fell below: by index when the jump is short, O(jump))
            if not held:
                continue
            if self.floor - old < len(held):
                held.difference_update(range(old, self.floor))
            else:
                held.difference_update([i for i in held if i < self.floor])
        self._backoff = 0
        if self.floor >= self.next_new:
            self._want_repair = False

    # ----------------------------------------------------------------------------------- packet out
    def can_piggyback(self) -> bool:
        """Unacknowledged tokens exist that could ride in a packet leaving anyway (chatterbox only)."""
        return not self.closed and self.scheme == "chatterbox" and self.floor < self.next_new

    def holds_new_tokens(self) -> bool:
        """New tokens wait at the sender (to share a packet, COALESCE_MAX_S, or for room in the window): a packet
        leaving anyway takes them early, whether or not the path has room for repeats (PIGGYBACK_QUEUE_S), as their own
        packet would carry them."""
        return not self.closed and self.next_new < len(self.transcript)

    def build(
        self,
        now: float,
        capacity: int,
        *,
        piggyback: bool = False,
        window: tuple[int, int] | None = None,
    ) -> tuple[bytes, SentPacket] | object | None:
        """Build the next token datagram, at most ``capacity`` bytes.

        Returns ``(payload, record)``, ``None`` when there is nothing to send, or :data:`NEEDS_ROOM` when
        not even one token fits in ``capacity`` (the caller retries in a fresh packet). With ``piggyback``
        the datagram rides in a packet that leaves anyway (an ACK): it carries the unacknowledged tokens
        even when no repair is due, and never asks for room. ``window`` is the connection's (congestion
        window, bytes in flight): repeats that ride with new tokens stay within its first half.
        """
        if not self.wants_send() and not (piggyback and self.can_piggyback()):
            return None
        toks = self.transcript.tokens
        n_avail = len(toks)
        total = n_avail if self.transcript.finished else None
        sent_us = max(0, int(now * 1e6))

        if self.scheme == "duplicate":  # retransmit tokens whose every copy was lost, oldest run first
            retx_sorted = sorted(self._retx)
            old_first = retx_sorted[0] if retx_sorted else self.next_new
            old_limit = old_first
            for i in retx_sorted:
                if i != old_limit:
                    break
                old_limit += 1
        else:  # chatterbox: the oldest unacknowledged tokens, at most max_redundant_tokens of them
            old_first = self.floor
            old_limit = min(self.next_new, self.floor + self.max_redundant_tokens)
        new_first = self.next_new
        has_old = old_first < old_limit
        has_new = new_first < n_avail

        # Upper bound of the msgpack overhead: map header, "t", "r", "i" (index <= 9 bytes), "k" (array
        # header <= 3 bytes), "s", optional "n", and the "x" second run when both runs are present.
        budget = capacity - (1 + 3 + 2 + _int_size(self.handle) + 11 + 5 + 2 + _int_size(sent_us))
        if total is not None:
            budget -= 2 + _int_size(total)
        if has_old and has_new:
            budget -= 2 + 1 + 9 + 3

        # 1) new tokens claim the packet first
        used = 0
        new_end = new_first
        while new_end < n_avail:
            cost = token_cost(toks[new_end])
            if used + cost > budget:
                break
            used += cost
            new_end += 1
        capped = False
        if (self.scheme == "chatterbox" and (new_end > new_first or piggyback) and self.congested is not None
                and old_limit > old_first + CONGESTED_REPEATS and self.congested(now)):
            old_limit, capped = old_first + CONGESTED_REPEATS, True
        quiet = False  # (not counted as capped: repeats_capped says a congested path cut them)
        if (self.scheme == "chatterbox" and (new_end > new_first or piggyback) and old_limit > old_first
                and self._quiet_queue(now)):
            old_limit, quiet = old_first, True  # a queueing path that loses nothing: no repeats (QUIET_LOSS_S)
        if (self.scheme == "chatterbox" and (new_end > new_first or piggyback) and old_limit > old_first
                and not self._want_repair and self.draining is not None and self.draining(now)):
            # the driver drains a standing queue to find the path's minimum (STANDING_QUEUE_S); a repair that is due
            # (a loss, the idle timer) still carries its repeats: the packet clears it
            old_limit = old_first
        # 2) the request stream's waiting frames (FINISHED above all) come next: aioquic writes DATAGRAM frames
        #    before STREAM frames, and repeats that filled each packet kept FINISHED out of every probe while the
        #    window was full (uplink-only outage: the answer ended when the uplink returned, 14 s after its last
        #    token arrived)
        old_budget = budget - self._stream_reserve()
        # 3) the oldest unacknowledged tokens fill what is left, oldest first
        if self._heard_at is None:
            self._heard_at = now
        silence = max(ACK_SILENCE_S, 4 * self.srtt)
        quiet_for = now - self._heard_at
        if quiet_for > silence and quiet_for >= silence * 2 ** (self._silent_full_packets + 1):
            self._silent_full_packets += 1  # this one carries the full repeats; the next twice as late
        elif quiet_for > silence and window is not None and (new_end > new_first or piggyback):
            cwnd, in_flight = window
            if in_flight < cwnd:  # a full window means this packet is a probe: let it carry the floor
                old_budget = min(old_budget, int(cwnd * REPEAT_WINDOW_SHARE) - in_flight - (capacity - budget))
                if self._peer_seen_at is not None and now - self._peer_seen_at > silence:
                    old_budget = used  # nothing at all from the client either: the uplink is out, no repeats
        old_end = old_first
        trimmed = False
        while old_end < old_limit:
            cost = token_cost(toks[old_end])
            if used + cost > old_budget:
                trimmed = used + cost <= budget  # it would have fitted: a window rule cut the repeats here
                break
            used += cost
            old_end += 1
        # 4) a packet with nothing new (a repair) also carries the newest unacknowledged tokens, newest first:
        #    after acknowledgements stopped, the floor may be long delivered while the tail, sent last and
        #    only once, went into an outage (measured: a repair that carried only the floor's 64 tokens, all
        #    delivered, every few seconds for 15 s while the last 50 tokens were missing)
        tail_first = self.next_new
        if (self.scheme == "chatterbox" and not has_new and not capped and not quiet
                and old_end == old_limit < self.next_new):
            room = old_budget - (2 + 1 + 9 + 3)  # the second run's overhead
            while tail_first > old_end:
                cost = token_cost(toks[tail_first - 1])
                if used + cost > room:
                    break
                used += cost
                tail_first -= 1
        if new_end == new_first and old_end == old_first:
            return None if piggyback else NEEDS_ROOM

        if old_end == old_first:
            runs: tuple[tuple[int, int], ...] = ((new_first, new_end),)
        elif tail_first < self.next_new:
            tail = (tail_first, self.next_new)
            runs = ((old_first, self.next_new),) if tail_first == old_end else ((old_first, old_end), tail)
        elif new_end == new_first:
            runs = ((old_first, old_end),)
        elif old_end == new_first:
            runs = ((old_first, new_end),)
        else:
            runs = ((old_first, old_end), (new_first, new_end))
        (f0, e0) = runs[0]
        frame = Tokens(self.handle, f0, toks[f0:e0], sent_us=sent_us, total=total)
        if len(runs) == 2:
            f1, e1 = runs[1]
            frame.extra = (f1, toks[f1:e1])
        payload = encode_frame(frame)
        if len(payload) > capacity:  # pragma: no cover - the size arithmetic above is exact or larger
            raise AssertionError(f"token packet of {len(payload)} bytes exceeds capacity {capacity}")

        repeated = sum(min(e, new_first) - f for f, e in runs if f < new_first)  # (a run may go on into the new)
        repeated_bytes = sum(len(toks[i]) for f, e in runs if f < new_first for i in range(f, min(e, new_first)))
        pkt = SentPacket(
            pid=self._next_pid,
            sent_at=now,
            runs=runs,
            copies=self.copies,
            repair=new_end == new_first,
        )
        self._next_pid += 1
        self._outstanding[pkt.pid] = pkt
        if self.codepoint_of is not None:
            self.codepoint = self.codepoint_of()
        self.sent_meta[sent_us] = (len(payload), self.codepoint)  # the codepoint the datagram leaves with
        if len(self.sent_meta) > 4096:
            self.sent_meta.popitem(last=False)
        self.next_new = max(self.next_new, new_end)
        if new_end > new_first and self.queue_delay is not None:
            wait = 0.0 if now - self.losses.at > QUIET_LOSS_S else min(COALESCE_MAX_S, self.queue_delay(now))
            self._hold_until = now + wait if wait > 0 else None
        if self.scheme == "duplicate":
            self._retx.difference_update(range(old_first, old_end))
        st = self.stats
        st.packets += self.copies
        st.bytes += len(payload) * self.copies
        st.tokens_carried += sum(e - f for f, e in runs)
        st.redundant_tokens += repeated
        st.redundant_bytes += repeated_bytes
        st.repeats_trimmed += trimmed
        st.repeats_capped += capped
        if piggyback and pkt.repair:
            st.piggybacks += 1
        elif pkt.repair:
            st.repairs += 1
        self._want_repair = False
        self._last_send = now
        return payload, pkt

    def _quiet_queue(self, now: float) -> bool:
        """The path queues (the driver's queue delay above 0) and no token datagram was lost for QUIET_LOSS_S."""
        return (now - self.losses.at > QUIET_LOSS_S and self.queue_delay is not None
                and self.queue_delay(now) > 0)

    def _stream_reserve(self) -> int:
        """Room the request stream's waiting bytes need in this packet (0 when none wait or not told)."""
        if self.stream_backlog is None:
            return 0
        backlog = self.stream_backlog()
        return backlog + STREAM_FRAME_OVERHEAD if backlog > 0 else 0

    def close(self) -> None:
        """Stop sending (request finished and confirmed, cancelled, or connection gone)."""
        self.closed = True
        self._outstanding.clear()


@dataclass
class TokenReceiver:
    """Client side: reassembles runs of tokens and renders the contiguous prefix as soon as it exists."""

    first_index: int = 0
    window: int = 1 << 16
    next_index: int = field(init=False)
    high: int = field(init=False)
    total: int | None = None
    tokens: list[bytes] = field(default_factory=list)
    render_times: list[float] = field(default_factory=list)
    duplicate_tokens: int = 0
    packets: int = 0
    useful_packets: int = 0  # packets that brought a token not held before (or the total)
    last_echo_us: int | None = None
    last_echo_at: float | None = None  # when the packet whose send time last_echo_us echoes arrived (receiver clock)
    _pending: dict[int, bytes] = field(default_factory=dict)
    # the pending indices as a min-heap: the first gap's end without a scan of every token held out of order
    # (a scan per frame was quadratic: 65,535 one-token frames behind one missing token took 118 s of CPU)
    _pending_heap: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.next_index = self.first_index
        self.high = self.first_index

    @property
    def complete(self) -> bool:
        return self.total is not None and self.next_index >= self.total

    def on_frame(self, frame: Tokens, now: float) -> list[bytes]:
        """Take one token frame; returns the tokens that became renderable, in order."""
        self.packets += 1
        if frame.sent_us is not None:
            self.last_echo_us, self.last_echo_at = frame.sent_us, now
        useful = frame.total is not None and frame.total != self.total
        if frame.total is not None:
            self.set_total(frame.total)
        out: list[bytes] = []
        held = self.next_index + len(self._pending)
        for first, toks in frame.runs():
            out.extend(self.on_run(first, toks, now))
        if useful or self.next_index + len(self._pending) > held:
            self.useful_packets += 1
        return out

    def set_total(self, total: int) -> None:
        if self.total is None or total > self.total:
            self.total = total

    def on_run(self, first: int, toks: list[bytes], now: float) -> list[bytes]:
        end = first + len(toks)
        if end <= self.next_index:
            self.duplicate_tokens += len(toks)
            return []
        self.high = max(self.high, end)
        start = self.next_index
        if first <= self.next_index and not self._pending:
            # fast path: the run covers the render point and nothing waits out of order
            skip = self.next_index - first
            self.duplicate_tokens += skip
            new = toks[skip:]
            self.next_index = end
        else:
            limit = self.next_index + self.window
            for k, tok in enumerate(toks):
                idx = first + k
                if idx < self.next_index:
                    self.duplicate_tokens += 1
                    continue
                if idx >= limit:
                    break
                if idx in self._pending:
                    self.duplicate_tokens += 1
                else:
                    self._pending[idx] = tok
                    heapq.heappush(self._pending_heap, idx)
            new = []
            pending, heap = self._pending, self._pending_heap
            while self.next_index in pending:
                new.append(pending.pop(self.next_index))
                heapq.heappop(heap)  # every pending index is above the render point: it was the smallest
                self.next_index += 1
        if new:
            self.tokens.extend(new)
            self.render_times.extend([now] * len(new))
        assert self.next_index - start == len(new)
        return new

    def missing(self) -> tuple[int, int] | None:
        """The first gap ``[a, b)`` below what is known to exist, or None when nothing is missing."""
        known_end = max(self.high, self.total or 0)
        if self.next_index >= known_end:
            return None
        # every pending index is above next_index (the render point takes each as soon as it is next)
        b = self._pending_heap[0] if self._pending_heap else known_end
        return self.next_index, b
