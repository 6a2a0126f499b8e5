"""A fresh congestion controller and RTT estimator when the peer moves to another host (QUIC connection migration).

RFC 9000 §9.4: on confirming the peer's ownership of a new address, an endpoint MUST reset the congestion
controller and the RTT estimator to initial values (RFC 9002 Appendices A.3 and B.3) unless only the port changed,
and packets sent on the old path MUST NOT contribute to congestion control or RTT estimation for the new one.
aioquic (1.7.2, pinned) does neither: a phone that moved from Wi-Fi to LTE kept the Wi-Fi window and round trip, so
the server sent a window sized for the old path into the new one, and timed its losses and probes by the old RTT.

Only a host the connection had not used before is a new path. aioquic keeps an address it validated once as
validated, and makes it primary again on any packet from it with a higher packet number, without validating it
afresh: an on-path attacker who rewrites source addresses could otherwise flip the connection between a client's
old and new address and reset its window at each flip (a review's script: 300 KB to the initial 12 KB, twice per
flip). Returning to a known host keeps the current state, which is what every move kept before this module (RFC
9000 §9.4 asks for the reset on confirming a *new* address).

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

The session also tells the marking policy (:func:`policy_path_changed`): swiftqueue's latency history is the old
path's too.

Sans-I/O: the session calls :func:`reset_for_new_path` from its path-change check with the connection it drives.
``tests/test_path_reset_s35.py`` pins what this relies on in aioquic's recovery state.
"""

from __future__ import annotations

import ipaddress
import math

from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.packet_builder import QuicDeliveryState
from aioquic.quic.recovery import QuicPacketPacer, QuicPacketRecovery

from .marking import MarkingPolicy

_STATS = ("ce_events", "marked_total")  # our controllers' per-connection counters: statistics, not control state


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
    old = loss._cc
    size = getattr(old, "_max_datagram_size", quic._max_datagram_size)
    fresh = type(old)(max_datagram_size=size)
    for name in _STATS:
        if hasattr(old, name):
            setattr(fresh, name, getattr(old, name))
    # the old path's packets: still counted, no longer the controller's to judge (only the application space's:
    # a handshake space aioquic discards drops its packets without calling their handlers)
    fresh.bytes_in_flight = old.bytes_in_flight
    for space in loss.spaces:
        if not space.is_application_data:
            continue
        for packet in space.sent_packets.values():
            if packet.is_ack_eliciting:  # (aioquic takes RTT samples from ack-eliciting packets only)
                packet.is_ack_eliciting = False
                space.ack_eliciting_in_flight -= 1
            if packet.in_flight:
                packet.in_flight = False
                packet.delivery_handlers.append((_release, (loss, packet.sent_bytes)))
    loss._cc = fresh
    # RFC 9002 Appendix A.3: no sample yet (aioquic's initial RTT stands in); persistent congestion then counts only
    # packets sent after the new path's first sample
    loss._rtt_initialized = False
    loss._rtt_first_sample_time = 0.0
    loss._rtt_latest = 0.0
    loss._rtt_min = math.inf
    loss._rtt_smoothed = 0.0
    loss._rtt_variance = 0.0
    loss._pacer = QuicPacketPacer(max_datagram_size=size)  # (its rate came from the old window and round trip)


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
