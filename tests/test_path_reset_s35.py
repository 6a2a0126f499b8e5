"""A client that moves to another host starts its server's congestion controller and RTT estimator afresh (session 35).

A mobility probe (session 34) found that after a client's move from Wi-Fi to LTE the server kept the old path's
window and round trip (aioquic 1.7.2 resets neither on migration), and its swiftqueue policy the old path's latency
history, where RFC 9000 §9.4 requires initial values for a new host (not for a port-only NAT rebinding). The pair is
the real sans-I/O one of ``quicpair``; what the server sends to an address the client has left is lost.
"""

from __future__ import annotations

import math

import pytest
from aioquic.quic.congestion.base import K_INITIAL_WINDOW

import tokenwire.transport.prague_cc  # noqa: F401  (registers "prague", "reno-ecn" and "cubic-ecn")
from tokenwire.transport.ecn_socket import ECT0, ECT1
from tokenwire.transport.marking import LatencySample, SwiftQueuePolicy
from tokenwire.transport.path_reset import host_changed, policy_path_changed, reset_for_new_path
from tokenwire.transport.server_session import ServerSession
from tokenwire.transport.tls import server_configuration

from . import quicpair
from .quicpair import Pair


class Recorder:
    """The server's state each time it counts a move, read right after the datagram that validated the new path."""

    def __init__(self, server: ServerSession) -> None:
        self.server = server
        self.seen: list[dict] = []
        original = server.after_datagram

        def spy(now: float | None = None) -> None:
            changes = server.path_changes
            original(now)
            if server.path_changes != changes:
                loss = server.quic._loss
                app = [p for space in loss.spaces if space.is_application_data for p in space.sent_packets.values()]
                self.seen.append({"cc": loss._cc, "cwnd": loss.congestion_window, "ssthresh": loss._cc.ssthresh,
                                  "rtt_initialized": loss._rtt_initialized, "srtt": loss._rtt_smoothed,
                                  "rtt_min": loss._rtt_min, "in_flight": loss.bytes_in_flight,
                                  "outstanding": {p.packet_number for p in app}})

        server.after_datagram = spy  # type: ignore[method-assign]


def _connected(monkeypatch, congestion: str = "reno") -> tuple[Pair, ServerSession]:
    monkeypatch.setattr(quicpair, "server_configuration", lambda: server_configuration(congestion=congestion))
    pair = Pair()
    pair.exchange()
    server = pair.server
    assert server is not None
    return pair, server


def _move(pair: Pair, monkeypatch, addr: tuple[str, int], watch: list[int] | None = None) -> None:
    """The client's packets come from ``addr`` from now on; one round at a time until the server is quiet, recording
    the server's bytes in flight after each in ``watch``."""
    monkeypatch.setattr(quicpair, "CLIENT", addr)
    pair.client.quic.send_ping(len(pair.client_events) + 100)
    server = pair.server
    assert server is not None
    for _ in range(200):
        pair.exchange(rounds=1)
        if watch is not None:
            watch.append(server.quic._loss.bytes_in_flight)
    pair.exchange()


def _lose_on_old_path(pair: Pair, server: ServerSession, packets: int) -> set[int]:
    """The server sends ``packets`` PINGs just before the client moves: they go to the old address and are lost.
    The old path's round trip was 200 ms (a slow cellular path; the pair's own is a few ms), so they are still out,
    not yet declared lost, when the new path is validated a few ms later."""
    loss = server.quic._loss
    loss._rtt_latest = loss._rtt_smoothed = 0.2
    first = server.quic._packet_number
    for i in range(packets):
        server.quic.send_ping(900 + i)
        assert server.datagrams_to_send(pair.now)  # (not delivered: the client is leaving that address)
    return set(range(first, server.quic._packet_number))


@pytest.mark.parametrize("congestion", ["reno", "cubic", "prague", "cubic-ecn"])
def test_a_move_to_another_host_starts_the_window_and_round_trip_afresh(monkeypatch, congestion: str) -> None:
    pair, server = _connected(monkeypatch, congestion)
    loss = server.quic._loss
    initial = K_INITIAL_WINDOW * server.quic._max_datagram_size
    before = loss._cc
    assert loss.congestion_window != initial and loss._rtt_initialized  # (the handshake's acks grew and timed them)
    recorder = Recorder(server)
    lost = _lose_on_old_path(pair, server, 2)
    in_flight: list[int] = []
    _move(pair, monkeypatch, ("10.0.0.3", 40000), in_flight)
    assert server.path_changes == 1 and len(recorder.seen) == 1
    at = recorder.seen[0]
    # RFC 9002 B.3 and A.3: the initial window, no sample yet (aioquic's initial RTT stands in)
    assert type(at["cc"]) is type(before) and at["cc"] is not before
    assert at["cwnd"] == initial and at["ssthresh"] is None
    assert not at["rtt_initialized"] and at["srtt"] == 0.0 and at["rtt_min"] == math.inf
    # the old path's packets were still out at the reset (the case to account for) and stayed counted
    assert lost <= at["outstanding"] and at["in_flight"] >= 2 * 29
    # then they were lost, and their bytes left the flight once: never below zero, nothing left over at the end
    assert not lost & {p for space in loss.spaces for p in space.sent_packets}
    assert min(in_flight) >= 0 and loss.bytes_in_flight == 0
    # nor did their loss count as congestion on the new path: the fresh window is still in slow start
    assert loss._cc.ssthresh is None and loss.congestion_window >= initial
    assert loss._rtt_initialized  # (the new path's own samples since)


def test_a_port_only_change_keeps_the_state_and_a_later_host_change_resets_it(monkeypatch) -> None:
    pair, server = _connected(monkeypatch)
    loss = server.quic._loss
    initial = K_INITIAL_WINDOW * server.quic._max_datagram_size
    cc, srtt = loss._cc, loss._rtt_smoothed
    recorder = Recorder(server)
    _move(pair, monkeypatch, (quicpair.CLIENT[0], 40000))  # a NAT rebinding: the same host, another port
    assert server.path_changes == 1
    at = recorder.seen[0]
    assert at["cc"] is cc and at["cwnd"] != initial and at["rtt_initialized"] and at["srtt"] == pytest.approx(srtt)
    assert loss._cc is cc
    _move(pair, monkeypatch, ("10.0.0.3", 40000))
    assert server.path_changes == 2
    at = recorder.seen[1]
    assert at["cc"] is not cc and at["cwnd"] == initial and not at["rtt_initialized"]


def test_a_return_to_a_host_used_before_takes_back_its_own_state(monkeypatch) -> None:
    """aioquic makes an address it validated once primary again on any packet from it, unvalidated. A return keeps
    neither the path left's state (LTE's window on Wi-Fi) nor resets (an on-path attacker flipping the source address
    reset the window at each flip: 300 KB -> 12 KB, twice per flip): it takes back the host's own (session 36;
    details in test_migration_s36)."""
    pair, server = _connected(monkeypatch)
    loss = server.quic._loss
    home = quicpair.CLIENT
    _move(pair, monkeypatch, ("10.0.0.3", 40000))
    assert server.path_changes == 1
    grown = loss._cc
    initial = type(grown)(max_datagram_size=grown._max_datagram_size).congestion_window
    loss._cc.congestion_window = 300_000  # (the new path's window grew meanwhile)
    _move(pair, monkeypatch, home)  # back to the first host: one packet from there is enough for aioquic
    assert server.path_changes == 2 and server._path == home
    assert loss._cc is not grown and loss.congestion_window <= initial  # home's own, not the path left's 300 KB
    pair.now += 1.0  # longer than the other path's probe timeout: it comes back as after an idle period
    _move(pair, monkeypatch, ("10.0.0.3", 40000))
    assert server.path_changes == 3 and loss._cc is not grown and loss.congestion_window == initial


def test_a_packet_sent_on_the_old_path_gives_the_new_one_no_rtt_sample(monkeypatch) -> None:
    """aioquic samples the RTT from the largest packet an ACK newly covers: an old-path packet delivered 0.6 s late,
    after the move, set the new path's smoothed and minimum RTT to 630 ms (a review's script)."""
    pair, server = _connected(monkeypatch)
    client, loss = pair.client, server.quic._loss
    server.quic.send_ping(42)
    down = [d for d, _ in server.datagrams_to_send(pair.now)]  # on the old path, through a deep queue
    reset_for_new_path(server.quic)  # the move is validated meanwhile
    assert not loss._rtt_initialized
    space = next(s for s in loss.spaces if s.is_application_data)
    assert space.ack_eliciting_in_flight == 0  # (the old packets no longer arm the new path's probe timer)
    pair.now += 0.6
    for d in down:
        client.receive_datagram(d, quicpair.SERVER, pair.now)
    up = [d for d, _ in client.datagrams_to_send(pair.now + 0.025)]  # the client's ACK of it
    assert up
    for d in up:
        server.receive_datagram(d, quicpair.CLIENT, pair.now + 0.03)
    assert not loss._rtt_initialized and loss._rtt_min == math.inf  # no sample from it
    assert not space.sent_packets and loss.bytes_in_flight == 0  # acknowledged, and its bytes released


def test_the_same_host_in_another_form_is_no_host_change() -> None:
    assert not host_changed(("10.0.0.2", 1234), ("::ffff:10.0.0.2", 5678, 0, 0))  # a dual-stack socket's view
    assert not host_changed(("2001:db8::1", 1, 0, 0), ("2001:db8:0::1", 2, 0, 0))
    assert host_changed(("10.0.0.2", 1234), ("10.0.0.3", 1234))
    assert host_changed(("10.0.0.2", 1234), ("2001:db8::1", 1234, 0, 0))


class PathPolicy:
    """A marking policy that counts the moves it is told of."""

    name = "path"

    def __init__(self) -> None:
        self.moves = 0

    def codepoint(self, now: float) -> int:
        return ECT1

    def on_sample(self, sample: LatencySample) -> None:
        pass

    def path_changed(self) -> None:
        self.moves += 1


def test_the_marking_policy_hears_of_each_move_to_another_host(monkeypatch) -> None:
    pair, server = _connected(monkeypatch)
    server.marking = policy = PathPolicy()
    _move(pair, monkeypatch, ("10.0.0.3", 40000))
    assert (server.path_changes, policy.moves) == (1, 1)
    _move(pair, monkeypatch, ("10.0.0.3", 40001))  # a NAT rebinding: not a new path
    assert (server.path_changes, policy.moves) == (2, 1)
    _move(pair, monkeypatch, ("10.0.0.4", 40001))
    assert (server.path_changes, policy.moves) == (3, 2)
    policy_path_changed(object())  # type: ignore[arg-type]  # an application's policy without the method: skipped


class FreshForecaster:
    """A forecaster with an ack history; ``fresh()`` gives one with none (as the ONNX forecaster's does)."""

    def __init__(self) -> None:
        self.samples: list[LatencySample] = []

    def fresh(self) -> FreshForecaster:
        return FreshForecaster()

    def observe(self, sample: LatencySample) -> None:
        self.samples.append(sample)

    def predict(self, now: float) -> tuple[float, float] | None:
        return (1.0, 50.0) if self.samples else None  # L faster: a policy with history leaves cold start


def _sample(at: float, ms: float, queue_l: bool) -> LatencySample:
    return LatencySample(sent_at=at - ms / 1000, ack_at=at, latency_ms=ms, size=1200, queue_l=queue_l, ce=False)


def test_swiftqueue_forgets_the_old_paths_latencies() -> None:
    old = FreshForecaster()
    policy = SwiftQueuePolicy(old, cold_start=ECT0)
    for i in range(5):  # a Wi-Fi path: 5 ms in L, 30 ms in C
        policy.on_sample(_sample(0.1 * i, 5.0, True))
        policy.on_sample(_sample(0.1 * i, 30.0, False))
    assert policy.codepoint(1.0) == ECT1 and policy.decisions["l"] == 1  # (it left its cold start for L)
    policy.path_changed()
    assert policy.forecaster is not old and not policy.forecaster.samples  # type: ignore[attr-defined]
    assert policy.codepoint(2.0) == ECT0 and policy.decisions["cold"] == 1  # its cold start again, no prediction
    policy.on_sample(_sample(2.1, 40.0, False))  # the LTE path's first sample
    assert policy._at_floor(False)  # measured against the new path's floor, not Wi-Fi's 5 ms
    assert old.samples and len(old.samples) == 10  # (the old forecaster got nothing more)
