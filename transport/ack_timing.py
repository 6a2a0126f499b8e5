"""When a chat connection's QUIC ACK leaves: in the next packet that carries data, not in a packet of its own.

aioquic (1.7.2, pinned) arms its ACK timer 1 ms (``K_GRANULARITY``) after an ack-eliciting packet arrives and
writes an ACK frame only once that timer is due. So an ACK never rides a packet that leaves before then, and
leaves 1 ms later in a packet of its own. On a chat connection each token packet draws an ack datagram from the
client, and each ack datagram drew a lone ACK from the server 1 ms later, which Chatterbox filled with repeats: two
packets per token each way. In the contention probe that was 593 packets for 300 tokens against ``stream``'s 305,
~200 bytes per token against ~95, and the extra packets are what congested a shared 1-Mbit/s bottleneck first
(docs/testbed.md, "Many chats sharing one bottleneck"). The client's ack datagram left alone too, its ACK 1 ms
behind it.

RFC 9000 lets a receiver hold an ACK up to the ``max_ack_delay`` it advertised (§13.2.1; aioquic advertises 25 ms)
and asks for one at least every second ack-eliciting packet (§13.2.2). Within those rules, :class:`AckTiming`
re-times the one-RTT space's ACK:

* it is held up to :data:`ACK_HOLD_S` after the first packet it covers;
* it is due at once when a second ack-eliciting packet arrives before it left, and when one arrives out of order
  or after a gap (§13.2.1's SHOULD: the peer's loss detection waits for it);
* it rides the next packet that leaves with data: before each send, if data waits (a datagram, stream data, a
  PING; see :func:`data_waiting`), the ACK is made due now, so aioquic writes it into that packet.

The hold is the same on a lossy path. Sending the ACK at once there for 2 s after a token packet was lost, with
the oldest unacknowledged tokens in it, bought back most of the stall the hold cost one lossy chat, but 30 chats on
one lossy 1-Mbit/s link collapsed with it as before the hold (docs/testbed.md, "Many chats sharing one
bottleneck"); tried and reverted. The hold is what lifted Chatterbox's stall at independent loss in ``tokenwire
sim --loss iid:0.05`` from 0.027 to 0.039 (bytes per token 197 -> 149; ``duplicate`` 0.026): Chatterbox matches
its oracle there, so its stall is set by how soon a packet leaves after a lost one, and the lone ACK packet was
that packet. Session 39 tried a narrower release, aioquic's 1 ms timer only while more than 1 % of token datagrams
were lost, the losses looked independent (under 0.3 of them right after another) and the path neither queued nor
marked CE (the CONGESTED_REPEATS test): the sim's iid row went back to 0.025 at 192 bytes per token, but 30 chats
on a lossy 1-Mbit/s droptail link collapsed again (median stall 0.53 -> 0.89 with ``ge:0.01,0.1``, 0.54 -> 0.86
with ``iid:0.02``; queue 12 -> 76 ms): seen per flow, the shared link's losses look independent, and the queue
test fires only at 40 ms. Not kept.

Only the chat sessions use it. A KV transfer is bulk data, for which aioquic's 1-ms timer already acks every
few packets; the second-packet rule would add ACKs there.

Sans-I/O: it reads and sets aioquic's private ACK state (``_spaces[ONE_RTT].ack_at``) of the connection it is
given, at the times its session's driver passes in.
"""

from __future__ import annotations

from collections.abc import Callable

from aioquic.quic.connection import QuicConnection
from aioquic.tls import Epoch

ACK_HOLD_S = 0.020
"""How long an ACK may wait for a packet with data to ride: below the 25 ms aioquic advertises as its
``max_ack_delay`` (which the peer adds to its probe timeout), with room for a timer that fires late."""


def data_waiting(quic: QuicConnection, now: float, datagrams: Callable[[], bool]) -> bool:
    """Whether the next ``datagrams_to_send`` would write a packet with more than an ACK in it, as far as can be
    told before it runs: the congestion window and the pacer let a packet go, and something ack-eliciting waits
    (``datagrams``: the session's scheduler has a datagram queued; stream data, a reset or STOP_SENDING; a PING or
    probe). A wrong guess costs one packet: an ACK that leaves alone, as it always did."""
    loss = quic._loss
    if loss.bytes_in_flight >= loss.congestion_window:
        return False
    if loss._pacer.next_send_time(now=now) is not None:
        return False
    if quic._ping_pending or quic._probe_pending or datagrams():
        return True
    for stream in quic._streams_queue:
        if stream.sender.reset_pending or stream.receiver.stop_pending:
            return True
        if not stream.is_blocked and not stream.sender.buffer_is_empty:
            return True
    return False


class AckTiming:
    """Holds one connection's ACK for data to ride (see the module's docstring); one per session.

    The driver calls :meth:`before_receive` and :meth:`after_receive` around each ``receive_datagram``: the pending
    ACK is hidden from aioquic meanwhile, so that its arming tells whether the datagram was ack-eliciting (an ACK
    alone is not, and counted as one the peer's held ACKs and ours drew each other out without end), and
    :meth:`before_send` before each ``datagrams_to_send``."""

    def __init__(self, hold: float = ACK_HOLD_S) -> None:
        self.hold = hold
        self._pending: float | None = None  # the pending ACK's time, hidden from aioquic while a datagram is read
        self._hidden = False
        self._eliciting = 0  # ack-eliciting datagrams the pending ACK covers
        # the largest 1-RTT packet number received, as of the last datagram; None before the first (aioquic numbers
        # its packets across spaces: the first 1-RTT packet follows the handshake's, which is no gap)
        self._largest: int | None = None
        self.held = 0  # ACKs set to wait for data to ride
        self.ridden = 0  # ACKs made due because data was leaving: each saved a packet

    def set_hold(self, quic: QuicConnection, hold: float, now: float) -> None:
        """Hold later ACKs ``hold``; one already pending waits no longer than that from ``now`` (a client that found
        the path queueing in the datagram it just read: client_session.ACK_QUEUE_QUIC_HOLD_S)."""
        self.hold = hold
        space = quic._spaces.get(Epoch.ONE_RTT)
        if space is not None and not self._hidden and space.ack_at is not None and space.ack_at > now + hold:
            space.ack_at = now + hold

    def before_receive(self, quic: QuicConnection) -> None:
        space = quic._spaces.get(Epoch.ONE_RTT)
        if space is None:
            return
        self._pending, space.ack_at = space.ack_at, None
        if self._pending is None:
            self._eliciting = 0
        self._hidden = True

    def after_receive(self, quic: QuicConnection, now: float) -> None:
        """A datagram from the peer was processed: set when the ACK it may have armed is due."""
        space = quic._spaces.get(Epoch.ONE_RTT)
        if space is None or not self._hidden:
            return  # before the handshake's keys, or a driver that did not call before_receive: aioquic's timing
        self._hidden = False
        largest, previous = space.largest_received_packet, self._largest
        if largest >= 0:  # (-1: no 1-RTT packet yet, the datagram held the handshake's)
            self._largest = largest if previous is None else max(largest, previous)
        if space.ack_at is None:  # not ack-eliciting (or the connection closed): the pending ACK as it was
            space.ack_at = self._pending
            return
        self._eliciting += 1
        due = now + self.hold if self._pending is None else self._pending
        if self._eliciting >= 2 or (previous is not None and not previous < largest <= previous + 1):
            # a second ack-eliciting packet; a gap before this one; or none newer than before (reordered or late)
            due = min(due, now)
        elif self._pending is None:
            self.held += 1
        space.ack_at = due

    def before_send(self, quic: QuicConnection, now: float, datagrams: Callable[[], bool]) -> None:
        """The session is about to build packets: a pending ACK rides them if data leaves."""
        space = quic._spaces.get(Epoch.ONE_RTT)
        if space is None or space.ack_at is None or space.ack_at <= now:
            return
        if data_waiting(quic, now, datagrams):
            space.ack_at = now
            self.ridden += 1
