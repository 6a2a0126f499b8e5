"""A fresh congestion controller and RTT estimator when the peer moves to another host (QUIC connection migration).

RFC 9000 §9.4: on confirming the peer's ownership of a new address, an endpoint MUST reset the congestion
controller and the RTT estimator to initial values (RFC 9002 Appendices A.3 and B.3) unless only the port changed,
and packets sent on the old path MUST NOT contribute to congestion control or RTT estimation for the new one.
aioquic (1.7.2, pinned) does neither: a phone that moved from Wi-Fi to LTE kept the Wi-Fi window and round trip, so
the server sent a window sized for the old path into the new one, and timed its losses and probes by the old RTT.

A return to a host the connection used before (Wi-Fi, then LTE, then Wi-Fi again) takes back the state that host's
path had when the connection left it (:func:`save_path`, :func:`restore_path`), not the state of the path being left
(it kept LTE's window and round trip on Wi-Fi), nor initial values: aioquic keeps an address it validated once as
validated, and makes it primary again on any packet from it with a higher packet number, without validating it
afresh, so an on-path attacker who rewrites source addresses can flip the connection between a client's old and new
address at will, and a reset at each flip cost the real path its window (a review's script: 300 KB to the initial
12 KB, twice per flip). With saved state a flip costs the real path nothing: its own controller comes back with the
next genuine packet. What a forged packet can make the server adopt is bounded instead: a path left for longer than
its probe timeout (RFC 9002 §6.2.1; a genuine flip back comes sooner while data flows) comes back as after an idle
period, its round-trip estimate and slow-start threshold kept but a fresh controller at the initial window (RFC 5681
§4.1's restart window; the threshold is the larger of its own and 3/4 of the window left behind, RFC 2861 §3), so a
forged packet from an address left long ago makes the server send an initial window there, what it may send to any
address it validated, and no more; only a flip back within the old path's probe timeout restores its controller whole
(on a connection idle for longer, a forged flip costs the real path its window, as an idle period does a TCP sender).
Each switch still takes the packets then outstanding out of congestion control (below), so an attacker who flips the
connection every round trip keeps its window from growing or shrinking, bounded by the window it had.
RFC 9000 §9.4 asks for initial values on a new address and advises caution with earlier values on a new path: the
restored values are that very path's own, and the idle rule keeps the window from outliving the period it was measured
in. The session keeps the state of ``session.MAX_HOSTS_REMEMBERED`` hosts at most (the one left longest ago is
dropped first); a host whose state was dropped is a new one again.

A port-only change is left alone: it is nearly always a NAT rebinding, the same path through a new mapping, whose
window and round trip are still right (§9.4 allows keeping them); starting over would cost a slow start for nothing.

No RTT sample from the old path either: aioquic takes one from the largest packet an ACK newly covers if that ACK
covers an ack-eliciting packet, whether or not it counts in flight, so the old path's packets stop being
ack-eliciting (and leave aioquic's count of those in flight, which arms the probe timer: the new path's own
packets arm it; an old packet's loss is still detected by the packet and time thresholds, and its frames sent
again). Before, an old packet delivered after the new path was validated (a make-before-break move through a
deep queue) gave the new path its first sample: in a review's script, a smoothed and minimum RTT of 630 ms.
"Old" is every packet outstanding at the reset: aioquic does not record a packet's path, so what went to the new
address before its validation completed (the PATH_CHALLENGE among it) counts as old too, and the new path's first
sample comes from its next packet with data.

The packets still in flight when the controller is replaced were sent on the old path. Their bytes stay in the new
controller's ``bytes_in_flight`` (otherwise the fresh window would come on top of them: a burst), but aioquic must
not hand them to the new controller when they are acknowledged or lost: each one's ack would grow the new window in
slow start, its loss would halve it, and a fresh controller that never counted them would subtract their bytes
below zero. So they leave aioquic's congestion accounting (``in_flight = False``) and a delivery handler of their
own releases their bytes, once, from whichever controller is current then (aioquic calls a sent packet's handlers
once, acked or lost, or drops them when the connection closes). So the reset frees no room: what is out on the old
path still fills the fresh window until it is resolved, and what may leave beyond it is the initial window at most
(RFC 9002 §7.7's bound on a burst), as at a connection's start; the pacer restarts unset, as there, until the new
path's first sample.

Taking the old path's packets out of the probe timer's count has a cost at the tail: when the last of them to carry
frames (a chat answer's FINISHED, a KV fetch's KV_DONE) is lost on the path left, and nothing ack-eliciting follows
it, no timer is armed and no later packet is acknowledged, so aioquic never declares it lost (RFC 9002 §6.1 detects a
loss only from the acknowledgement of a later packet; its probe timeout, §6.2, is what covers a lost tail) and its
frames never go again: the client pings, the server answers with ACKs alone, until the idle timeout (a probe's relay
flipping a KV client between two hosts every 100 ms: 1 to 3 of 16 to 28 fetches stuck with every chunk received and
no KV_DONE). A move to a new host recovered by chance (its PATH_CHALLENGE is ack-eliciting, and its ACK lets the
packet and time thresholds find the loss); a return to a validated host sends no challenge. So the session sends a
probe (RFC 9002 §6.2.4: one ack-eliciting packet, past the window) on the path taken whenever a packet it takes off
the old path was ack-eliciting (:func:`delivery_pending`, asked before the switch), and likewise when it takes back
packets sent to an address it left unvalidated (:func:`detach_sent_since`): the probe's ACK is the later
acknowledgement that the loss detection needs, and stands in for the probe timer the detached packets no longer arm.
Not a probe on every move: when nothing detached was ack-eliciting, nothing is waiting to be declared lost, and a PING
would buy an ACK that tells nothing (an idle keepalive connection moving would pay a packet each way per move). A
datagram (a chatterbox token packet) is not sent again by QUIC, but its loss, found the same way, tells the token
sender to repeat its tokens.

The session also tells the marking policy (:func:`policy_path_changed`) of each move to another host, a return
included: swiftqueue's latency history is the old path's too.

The new address's PATH_CHALLENGE can be stuck behind the old path's packets (:func:`challenge_held`): aioquic counts
the challenge against the congestion window, so when the packets sent to the address the peer left fill it to the
byte (aioquic pads a datagram up to the window's last byte), nothing goes to the new address but ACKs until they are
acknowledged or declared lost: until the probe timeout when none of them will ever be acknowledged, 50 ms in the
in-memory pair and a few hundred on a cellular path (``tests/test_migration_s36.py``). RFC 9000 §9.4: packets sent on
the old path MUST NOT contribute to congestion control for the new one, and a sender can make exceptions for probe
packets; RFC 9002 §7 lets a probe (§6.2.4) past the window. So the session sends the challenge as a probe: one
datagram past the window, once per challenge, and no bigger than RFC 9000 §8's anti-amplification limit lets a
datagram to an unvalidated address be (three times what came from it).

Sans-I/O: the session calls :func:`save_path` and :func:`reset_for_new_path` or :func:`restore_path` from its
path-change check with the connection it drives, and :func:`challenge_held` after each datagram from the peer.
``tests/test_path_reset_s35.py`` and ``tests/test_migration_s36.py`` pin what this relies on in aioquic's state.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

from aioquic.quic.congestion.base import QuicCongestionControl
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.packet_builder import QuicDeliveryState
from aioquic.quic.recovery import QuicPacketPacer, QuicPacketRecovery

from .marking import MarkingPolicy

_STATS = ("ce_events", "marked_total")  # our controllers' per-connection counters: statistics, not control state
# the round-trip estimate's fields in aioquic's QuicPacketRecovery (1.7.2), saved and restored together
_RTT = ("_rtt_initialized", "_rtt_first_sample_time", "_rtt_latest", "_rtt_min", "_rtt_smoothed", "_rtt_variance")


def host_changed(old: NetworkAddress, new: NetworkAddress) -> bool:
    """Whether ``new`` is another host than ``old``, not the same host on another port (a NAT rebinding). An IPv4
    address and its IPv4-mapped IPv6 form (a dual-stack socket's view) are the same host (:func:`host_key`)."""
    return host_key(old) != host_key(new)


def host_key(addr: NetworkAddress) -> str:
    try:
        ip = ipaddress.ip_address(addr[0])
    except ValueError:  # not an IP literal: compare as given
        return str(addr[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def reset_for_new_path(quic: QuicConnection) -> None:
    """Give ``quic`` a new congestion controller of the same kind and an empty RTT estimate (see the module doc)."""
    loss = quic._loss
    _switch_controller(loss, _fresh_controller(quic))
    # RFC 9002 Appendix A.3: no sample yet (aioquic's initial RTT stands in); persistent congestion then counts only
    # packets sent after the new path's first sample
    loss._rtt_initialized = False
    loss._rtt_first_sample_time = 0.0
    loss._rtt_latest = 0.0
    loss._rtt_min = math.inf
    loss._rtt_smoothed = 0.0
    loss._rtt_variance = 0.0
    loss._pacer = QuicPacketPacer(max_datagram_size=_datagram_size(quic))  # (its rate came from the old path)


@dataclass
class SavedPath:
    """A path's congestion and round-trip state as the connection left it (:func:`save_path`)."""

    controller: QuicCongestionControl
    rtt: tuple[object, ...]  # the _RTT fields, in order
    pacer: QuicPacketPacer
    left_at: float
    probe_timeout: float  # its PTO when left (RFC 9002 §6.2.1; twice the initial RTT before its first sample)


def save_path(quic: QuicConnection, now: float) -> SavedPath:
    """The state of the path ``quic`` is leaving, for a return to it (:func:`restore_path`)."""
    loss = quic._loss
    return SavedPath(loss._cc, tuple(getattr(loss, name) for name in _RTT), loss._pacer, now, loss.get_probe_timeout())


def restore_path(quic: QuicConnection, saved: SavedPath, now: float) -> bool:
    """Give ``quic`` back the state of a path it returns to; True when whole, False when as after an idle period
    (see the module doc). The packets outstanding now were sent on the path being left, and are handled as on a
    reset (:func:`reset_for_new_path`)."""
    loss = quic._loss
    whole = now - saved.left_at <= saved.probe_timeout
    if whole:
        _switch_controller(loss, saved.controller)
        loss._pacer = saved.pacer
    else:
        fresh = _fresh_controller(quic)
        left = saved.controller
        # the window restarts at the initial one or less (RFC 5681 §4.1); the threshold is the larger of its own and
        # 3/4 of the window left behind (RFC 2861 §3), none if the path never saw congestion
        fresh.congestion_window = min(fresh.congestion_window, left.congestion_window)
        if left.ssthresh is not None:
            fresh.ssthresh = max(left.ssthresh, left.congestion_window * 3 // 4)
        _switch_controller(loss, fresh)
        loss._pacer = QuicPacketPacer(max_datagram_size=_datagram_size(quic))
    for name, value in zip(_RTT, saved.rtt, strict=True):
        setattr(loss, name, value)
    if not whole:
        # the minimum is measured afresh: aioquic only ever lowers it, and the same host may be further away now (a
        # carrier NAT's other cell, another access point): a stale 4-ms floor under a 60-ms path read as a queue to
        # ServerSession._path_congested for the rest of the connection (a review's script: 2500 of 2500 checks)
        loss._rtt_min = math.inf
    return whole


def _datagram_size(quic: QuicConnection) -> int:
    return getattr(quic._loss._cc, "_max_datagram_size", quic._max_datagram_size)


def _fresh_controller(quic: QuicConnection) -> QuicCongestionControl:
    """A controller of the current one's kind at initial values (RFC 9002 Appendix B.3)."""
    return type(quic._loss._cc)(max_datagram_size=_datagram_size(quic))


def _switch_controller(loss: QuicPacketRecovery, controller: QuicCongestionControl) -> None:
    """Make ``controller`` the current one. The packets outstanding now stay counted in flight but are no longer any
    controller's to judge, nor a source of RTT samples (see the module doc)."""
    old = loss._cc
    for name in _STATS:
        if hasattr(old, name):
            setattr(controller, name, getattr(old, name))
    # the old path's packets: still counted, no longer the controller's to judge (only the application space's:
    # a handshake space aioquic discards drops its packets without calling their handlers)
    controller.bytes_in_flight = old.bytes_in_flight
    _detach(loss, 0)
    loss._cc = controller


def detach_sent_since(quic: QuicConnection, first_pn: int) -> int:
    """Take the packets numbered ``first_pn`` and up out of congestion control and RTT sampling, as a path switch
    does with the old path's; returns how many. For the packets aioquic sent to an address it promoted unvalidated
    and then left (a forged or replayed packet from elsewhere; the peer never moved): the real path's controller
    declared them lost, a congestion event per forged packet (a review's script: window 917 KB -> 468 KB on one
    rewritten packet). RFC 9000 §9.4: probing packets' loss should not cut the sending rate."""
    return _detach(quic._loss, first_pn)


def delivery_pending(quic: QuicConnection, first_pn: int = 0) -> bool:
    """Whether an application packet numbered ``first_pn`` or up, still outstanding, is ack-eliciting: its frames
    (stream data, a datagram, flow credit) wait on an acknowledgement, or on a loss that only an ACK of a later
    ack-eliciting packet can reveal once :func:`_detach` made it non-ack-eliciting (the module doc's tail probe).
    Asked before the detach: afterwards no packet says what it was."""
    return any(packet.is_ack_eliciting
               for space in quic._loss.spaces if space.is_application_data
               for pn, packet in space.sent_packets.items() if pn >= first_pn)


def _detach(loss: QuicPacketRecovery, first_pn: int) -> int:
    """The application space's packets from ``first_pn`` on: still counted in flight, no longer a controller's to
    judge (:func:`_release` frees their bytes), nor a source of RTT samples. Only that space: a handshake space aioquic
    discards drops its packets without calling their handlers."""
    count = 0
    for space in loss.spaces:
        if not space.is_application_data:
            continue
        for pn, packet in space.sent_packets.items():
            if pn < first_pn:
                continue
            if packet.is_ack_eliciting:  # (aioquic takes RTT samples from ack-eliciting packets only)
                packet.is_ack_eliciting = False
                space.ack_eliciting_in_flight -= 1
            if packet.in_flight:
                packet.in_flight = False
                packet.delivery_handlers.append((_release, (loss, packet.sent_bytes)))
                count += 1
    return count


def _release(state: QuicDeliveryState, loss: QuicPacketRecovery, sent_bytes: int) -> None:
    """An old path's packet was acknowledged or lost: its bytes leave the flight, and nothing else happens."""
    loss._cc.bytes_in_flight -= sent_bytes


def policy_path_changed(policy: MarkingPolicy | None) -> None:
    """Tell the connection's marking policy, if it has one, that the peer moved to another host. A policy written
    before :meth:`MarkingPolicy.path_changed` existed (an application's own) has no history to forget: skipped, not
    an AttributeError on the packet path."""
    hook = getattr(policy, "path_changed", None)
    if hook is not None:
        hook()


def challenge_held(quic: QuicConnection) -> bool:
    """Whether the peer's current address awaits a PATH_CHALLENGE that the congestion window holds back (see the
    module doc): the address is not validated, its challenge is not out, and the window has no room for a datagram.
    The caller then sends it as a probe (``quic._send_probe()``: the next datagram carries a PING and may pass the
    window by one datagram); once written, the challenge is out and this is False again until it is lost."""
    paths = quic._network_paths
    if not paths or not quic._handshake_complete:
        return False
    path = paths[0]
    if path.is_validated or path.local_challenge_sent:
        return False
    loss = quic._loss
    return loss.congestion_window - loss.bytes_in_flight < quic._max_datagram_size
