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

Layout: this module holds :class:`_SessionBase`, what the server and client sides share (the driver entry points,
ECN feedback and marking, stream bookkeeping, keepalive pings). The events and the close helpers are in
:mod:`.session_events`, the flow control in :mod:`.read_credit`, the sides in :mod:`.server_session` and
:mod:`.client_session`.
"""

from __future__ import annotations

import contextlib
import math

from aioquic.quic import events as qe
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.stream import QuicStreamSender
from aioquic.tls import Epoch

from .ack_timing import AckTiming
from .datagram_hook import DatagramScheduler
from .ecn_socket import CE, NOT_ECT
from .errors import ErrorCode, FrameError, ProtocolError, TokenwireError
from .frames import MIN_ACK_DATAGRAM, MIN_TOKENS_DATAGRAM, Error, decode_datagram, encode_stream_frame
from .marking import EcnValidation, MarkingPolicy
from .path_recovery import probe_on_receipt, window_full
from .path_reset import (
    SavedPath,
    challenge_held,
    delivery_pending,
    detach_sent_since,
    host_changed,
    host_key,
    policy_path_changed,
    reset_for_new_path,
    restore_path,
    save_path,
)
from .session_events import ConnectionEnded, SessionEvent

# Datagrams a client may count that this session did not send: the server's Retry and a version negotiation
# go out from the listener, before the connection exists
ECN_SLACK = 2
# hosts whose path state a connection keeps for a return (a phone's Wi-Fi and cellular addresses, a few more): past
# it, the host left longest ago is forgotten, and a move back to it is to a new host (path_reset)
MAX_HOSTS_REMEMBERED = 16
# who registers the delivery handlers of application data in a packet: aioquic's stream senders (stream data, a
# reset) and this package's datagram scheduler (every datagram frame it writes)
_APP_DATA_SENDERS = (QuicStreamSender, DatagramScheduler)


# ------------------------------------------------------------------------------------------------ base
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
        self._path: NetworkAddress | None = None  # the peer's address on the primary path (migrations change it)
        # times the peer's validated address changed: to another port (a NAT rebinding), another host, or back to one
        # used before (which aioquic makes primary again on one packet from it, a forged one too: see after_datagram)
        self.path_changes = 0
        # the path state of the hosts (path_reset.host_key) the peer has left, oldest first, for a return to them
        self._saved_paths: dict[str, SavedPath] = {}
        # the first packet number sent while aioquic's primary address was one not validated (None: it is validated)
        self._unvalidated_from: int | None = None
        # when this side's QUIC ACKs leave (None: aioquic's own 1-ms timer); the chat sessions hold them for data
        self.ack_timing: AckTiming | None = None

    def release_cycles(self) -> None:
        """At the connection's end (``SessionProtocol._release_ended``): the scheduler's clock, a closure over this
        session (a reference cycle: session, scheduler, closure), reads the last time instead."""
        now = self._now
        self.scheduler._clock = lambda: now

    # -- driver entry points ----------------------------------------------------------------------
    def receive_datagram(self, data: bytes, addr: NetworkAddress, now: float) -> list[SessionEvent]:
        self._now = now
        self.before_datagram()
        self.quic.receive_datagram(data, addr, now=now)
        self.after_datagram()
        return self._pump(now)

    def before_datagram(self) -> None:
        """Before each datagram from the peer goes to QUIC (drivers that feed the ``QuicConnection`` themselves call
        this, then :meth:`after_datagram`)."""
        if self.ack_timing is not None:
            self.ack_timing.before_receive(self.quic)

    def after_datagram(self, now: float | None = None) -> None:
        """Once per datagram from the peer, after QUIC has processed it (drivers that feed the
        ``QuicConnection`` themselves call this): ends an outage's probe backoff in one round trip
        (:mod:`.path_recovery`)."""
        if now is not None:
            self._now = now
        if self.ack_timing is not None:
            self.ack_timing.after_receive(self.quic, self._now)
        if (self.datagrams_ok is not None and not self.closed
                and probe_on_receipt(self.quic, self._now, self._receipt_probe_at)):
            self._receipt_probe_at = self._now
        # (aioquic ==1.7.2: the primary path first. It promotes a new address on its first non-probing packet, before
        # validating it, and goes back when the old one sends again: a forged or replayed packet from elsewhere
        # counted as two moves and reset ECN. Only a validated path is a move.)
        paths = self.quic._network_paths
        path = paths[0].addr if paths and paths[0].is_validated else self._path
        if paths and not paths[0].is_validated and paths[0].addr != self._path:
            if self._unvalidated_from is None:  # what leaves from now on goes to an address not validated
                self._unvalidated_from = self.quic._packet_number
        elif self._unvalidated_from is not None:
            if path == self._path and self._path is not None:
                # back on the validated address without a move: what went to the other one was probing, and its
                # loss is no congestion of this path (.path_reset.detach_sent_since)
                pending = delivery_pending(self.quic, self._unvalidated_from)
                detach_sent_since(self.quic, self._unvalidated_from)
                if pending:  # (their lost tail's frames need a later ACK to be declared lost: _host_changed)
                    self.quic._send_probe()
            self._unvalidated_from = None
        if path != self._path:
            if self._path is not None and path is not None:
                self.path_changes += 1
                self.ecn.path_changed()  # (a path of its own, whose ECN support is the new path's: RFC 9000 §13.4.2)
                if host_changed(self._path, path):
                    self._host_changed(path)
                # (a change of port alone is a NAT rebinding, the same path: nothing to reset, RFC 9000 §9.4)
            self._path = path
        if (self.datagrams_ok is not None and not self.closed and challenge_held(self.quic)):
            self.quic._send_probe()  # the new address's PATH_CHALLENGE, past a window the old path fills (.path_reset)
        self._on_peer_packet(self._now)

    def _host_changed(self, path: NetworkAddress) -> None:
        """The peer's validated address moved to another host: keep the state of the path left, and take back the
        new host's own if the connection used it before, else start afresh (RFC 9000 §9.4; :mod:`.path_reset`).

        Then a probe (RFC 9002 §6.2.4) on the path taken when a packet taken off the old path was ack-eliciting:
        detached, it arms no probe timer, and when it was the last to carry frames (a FINISHED, a KV_DONE) and is lost
        on the path left, only the ACK of a later ack-eliciting packet lets the loss detection find it (§6.1). A move
        to a new host sends one anyway (its PATH_CHALLENGE), a return to a validated host does not: its lost tail
        stayed lost until the idle timeout. Not a probe on every move: with nothing ack-eliciting detached, nothing
        awaits a verdict, and the ACK would tell nothing. Also when the window is full (packets detached by an
        earlier move, no longer ack-eliciting, may fill it): the probe's ACK lets them be resolved."""
        assert self._path is not None
        pending = delivery_pending(self.quic)  # (asked before the switch below makes them non-ack-eliciting)
        left = host_key(self._path)
        saved = self._saved_paths.pop(host_key(path), None)  # (before the trim below, which would drop the oldest)
        self._saved_paths.pop(left, None)
        self._saved_paths[left] = save_path(self.quic, self._now)  # (last in the order: left most recently)
        while len(self._saved_paths) > MAX_HOSTS_REMEMBERED:
            del self._saved_paths[next(iter(self._saved_paths))]
        if saved is None:
            reset_for_new_path(self.quic)
        else:
            restore_path(self.quic, saved, self._now)
        if pending or window_full(self.quic):
            # the old path's packets no longer arm the probe timer (.path_reset): a PING on the path taken has its
            # ACK declare the lost ones lost (a return has no PATH_CHALLENGE to do it)
            self.quic._send_probe()
        policy_path_changed(self.marking)
        self._on_host_changed(left, host_key(path))

    def _on_host_changed(self, left: str, entered: str) -> None:
        """Hook: the peer moved from host ``left`` to host ``entered`` (:func:`.path_reset.host_key`), after the
        path state was switched. A side that keeps knowledge of its own per path (the KV server's link rates) keeps
        it per host too, remembered for the hosts in ``_saved_paths`` only, so that it is forgotten with theirs."""

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
        if marking and not self.ecn.marking_allowed:
            self.ecn.retry(now)  # (RFC 9000 §13.4.2 allows it: a path may stop clearing the codepoint)
        if marking and self.ecn.marking_allowed:  # for the connection's life: a path may start clearing ECN
            space = self.quic._spaces.get(Epoch.ONE_RTT)
            if space is not None:
                self.ecn.on_acked(space.largest_acked_packet)
        if self.ack_timing is not None:
            self.ack_timing.before_send(self.quic, now, self.scheduler.data_waiting)
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
            # after the handshake: packets whose acks could bring counts (found only while they would count: the
            # scan of each packet's delivery handlers is per-datagram work)
            if self.datagrams_ok is not None and self.ecn.counts(codepoint):
                for pn in self._app_data_packets(first_pn, end_pn):
                    self.ecn.on_sent(codepoint, pn, pn + 1)
        return out

    def _app_data_packets(self, first_pn: int, end_pn: int) -> list[int]:
        """The 1-RTT packets numbered ``[first_pn, end_pn)`` that carry stream data or a datagram: those a client
        answers with counts (an ack datagram per token packet) or, on a stream, that a scheme without them sends.
        ACK-only, PING and flow-control packets are acknowledged by QUIC before any report can say anything:
        counted, the ACKs a 100-KB prompt drew and the PINGs of an idle keepalive connection failed a healthy
        chatterbox connection's validation at its next answer (its first packets then left Not-ECT)."""
        space = self.quic._spaces.get(Epoch.ONE_RTT)
        if space is None:
            return []
        found = []
        for pn in range(first_pn, end_pn):
            packet = space.sent_packets.get(pn)
            if packet is not None and any(isinstance(getattr(handler, "__self__", None), _APP_DATA_SENDERS)
                                          for handler, _ in packet.delivery_handlers):
                found.append(pn)
        return found

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

    @property
    def alpn(self) -> str | None:
        """The ALPN the handshake negotiated (None before it): a protocol extension offered as a second ALPN
        (``tokenwire/1+gt``, ``tokenwire-kv/1+dr``) is on when that one was picked."""
        return getattr(getattr(self.quic, "tls", None), "alpn_negotiated", None)

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

