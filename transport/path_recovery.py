"""Resuming after an outage within about a second, not after QUIC's backed-off probe timer.

During an outage nothing is acknowledged, so each probe timeout (PTO) doubles the next one (RFC 9002,
6.2.1). When the path comes back, a sender may sit out a good part of the outage's length again before its
next probe: measured with ``tokenwire sim`` (a full outage in both directions from 3 s, 800 tokens at
30/s, 50 ms one-way), the first token after an 8-s outage rendered 2.9 s after the path returned,
after a 16-s outage 3.1 s (Chatterbox; in-order streaming 0.2 and 2.7 s). A Chatterbox server keeps
sending token datagrams into the outage until its congestion window is full, and is then blocked until a
probe is acknowledged.

Two additions. The probe timer still backs off as RFC 9002 requires; the extra packets are bounded (one
probe per datagram received and per round trip, one 30-byte ping per quarter second of silence while our
packets go unacknowledged (per second in a pause mid-answer), on the KV channel per quarter second):

* :func:`probe_on_receipt`: when a datagram arrives from the peer while our own packets have gone
  unacknowledged for a PTO (the backoff has started) and it acknowledged none of them, the path evidently
  works again: send one probe now. It asks for the acknowledgement that frees the congestion window and
  resets the backoff. At most one probe per datagram received, so never more packets than the peer sends.
* :data:`RECOVERY_PING_S`: the client, while an answer is awaited and either its tokens have started or its
  own packets go unacknowledged, pings the server after each such interval of silence (before the first
  token silence is a model thinking: every second at first, then a quarter of the time waited so far, up
  to a third of the idle timeout; ``ClientSession._keepalive_at``). A packet then crosses soon
  after the path returns, and the server's receipt probe follows. A ping that finds the client's own
  congestion window full (:func:`window_full`: in an uplink outage its ack datagrams are lost and fill it)
  leaves as a probe, one packet past the window; aioquic held it back for the backed-off probe timer, and
  after a 16-s uplink-only outage tokens resumed 4 s after the uplink did (sim: 6 client packets in the
  outage's last 4 s; chatterbox stall 0.307 -> 0.178, streaming 0.229 -> 0.209). The interval was 1 s;
  at 0.25 s once the client's own packets go unacknowledged (:data:`RECOVERY_PING_S`; a chatterbox
  client's ack datagrams do within a round trip of a downlink outage's start) the server learns within
  half a second whether the client is still heard during ack silence (a downlink outage) or not (an uplink
  one; :mod:`.chatterbox` then sends no repeats). A pause mid-answer with everything acknowledged (a slow
  model, a tool call) keeps one ping per second (:data:`PAUSE_PING_S`): the same sim rows within 0.01.
  Each ping that finds the window full is one packet past it, at most four a second: bounded, though more
  than RFC 9002's probes, which back off.

With both, the first token after the 8-s and 16-s outages renders 142 ms after the path returns
(in-order streaming 179 and 238 ms); through the loopback UDP relay, real sockets, an 8-s outage: 4.6 s
before, 74 ms after. Short loss bursts are unaffected (the README's ``tokenwire sim`` rows for iid 5 %
and 25/100-ms outages are unchanged; with 200-ms outages chatterbox's stall went from 0.231 to 0.216).

The KV client does the same every :data:`KV_RECOVERY_PING_S` while a fetch is pending (it sends nothing
ack-eliciting of its own between chunks): ``testbed kv --virtual`` on TMobile-LTE with 0.5-s loss outages
both ways (``--loss ge:0.0005,0.002 --up-loss ge:0.0005,0.002``, 4-s deadline, seeds 5/6/7): fixed-L1
met 35/10/30 % of its deadlines before, 35/25/50 % after; p95 fetch time 24/15/15 s before, 12/12/7 s after.

Both read aioquic's loss-recovery state (1.7.2, pinned in pyproject.toml); ``tests/test_path_recovery.py``
pins what this relies on.
"""

from __future__ import annotations

import math

from aioquic.quic.connection import QuicConnection

from .datagram_hook import smoothed_rtt

RECOVERY_PING_S = 0.25  # the client's, once its own packets go unacknowledged (backed off)
PAUSE_PING_S = 1.0  # the client's, in a pause mid-answer while its packets are acknowledged (a slow model)
KV_RECOVERY_PING_S = 0.25  # the KV client's, while a fetch is pending: its deadlines are a few seconds
MIN_PROBE_SPACING_S = 0.01  # receipt probes: at most one per smoothed RTT, and never closer than this


def backed_off(quic: QuicConnection) -> bool:
    """Whether a probe timeout has fired since the peer last acknowledged one of our packets."""
    return quic._loss._pto_count >= 1


def window_full(quic: QuicConnection) -> bool:
    """Whether a packet of our own could not leave now: the congestion window has no room for one."""
    loss = quic._loss
    return loss.congestion_window - loss.bytes_in_flight < quic._max_datagram_size


def probe_on_receipt(quic: QuicConnection, now: float | None = None, last: float = -math.inf) -> bool:
    """After a datagram from the peer was processed: request a probe if we are still backed off (see the
    module docstring), at most one per round trip since the ``last`` one: its acknowledgement ends the
    backoff, and more in the meantime add nothing. Unbounded, two ends backed off at once answered each
    other's probes with probes, a datagram with an ACK and another with the probe each time, so the count
    doubled per round trip (sim, a channel losing every other millisecond: 1,600 packets/s of pings while
    no data crossed). Returns whether one was requested."""
    if not backed_off(quic):
        return False
    if now is not None and now - last < max(MIN_PROBE_SPACING_S, smoothed_rtt(quic, quic._loss._rtt_initial)):
        return False
    quic._send_probe()  # the next packet carries a PING; a probe may exceed the congestion window by one
    return True
