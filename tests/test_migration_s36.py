"""A client's moves between addresses (session 36): the new address's challenge past a window full of the old path's
packets, and a return to a host used before getting that host's own state back.

The pair is the real sans-I/O one of ``quicpair`` (the chat server's session; the KV sessions share the same base);
what the server sends to an address the client has left is lost.
"""

from __future__ import annotations

import math

import pytest
from aioquic.quic.congestion.base import K_INITIAL_WINDOW

import tokenwire.transport.prague_cc  # noqa: F401  (registers "prague", "reno-ecn" and "cubic-ecn")
from tokenwire.transport import session as session_module
from tokenwire.transport.path_recovery import window_full
from tokenwire.transport.server_session import ServerSession
from tokenwire.transport.tls import server_configuration

from . import quicpair
from .quicpair import Pair

HOME = quicpair.CLIENT  # Wi-Fi, say
LTE = ("10.0.0.3", 40000)


def _connected() -> tuple[Pair, ServerSession]:
    pair = Pair()
    pair.exchange()
    assert pair.server is not None
    return pair, pair.server


def _from(pair: Pair, monkeypatch, addr: tuple[str, int], rounds: int = 1, stay: float = 0.0) -> None:
    """The client's packets come from ``addr`` from now on (a PING to make one leave): ``rounds`` rounds of 5 ms (fewer
    once both ends are quiet), then ``stay`` seconds there."""
    monkeypatch.setattr(quicpair, "CLIENT", addr)
    pair.client.quic.send_ping(len(pair.client_events) + 100)
    pair.exchange(rounds=rounds)
    pair.now += stay


def _initial(server: ServerSession) -> int:
    return K_INITIAL_WINDOW * server.quic._max_datagram_size


def _fill_window_to_old_address(pair: Pair, server: ServerSession) -> None:
    """Datagrams the client is no longer there to receive, until the window has no byte left (aioquic pads a packet
    up to the window's end, so a full window is full to the byte)."""
    quic = server.quic
    for size in [1100] * 100 + [5] * 200:
        loss = quic._loss
        room = loss.congestion_window - loss.bytes_in_flight
        if (size > 5 and window_full(quic)) or room <= 30:
            continue
        server.scheduler.send_plain(b"x" * size)
        pair.now += 0.0005
        server.datagrams_to_send(pair.now)  # (lost: not delivered)
    loss = quic._loss
    assert loss.congestion_window - loss.bytes_in_flight <= 30 and loss._pto_count == 0


def test_the_new_address_is_challenged_at_once_past_a_window_the_old_path_fills(monkeypatch) -> None:
    """A NAT rebinding mid-transfer: the server's window is full of packets sent to the client's old port, none of
    which will be acknowledged. aioquic counted the PATH_CHALLENGE against that window, so the new port got ACKs only
    until the probe timeout (52 ms here, a few hundred on a cellular path); the challenge now leaves with the reply
    to the client's first packet from there, bounded by the anti-amplification limit."""
    pair, server = _connected()
    _fill_window_to_old_address(pair, server)
    new = (HOME[0], 40001)
    monkeypatch.setattr(quicpair, "CLIENT", new)
    pair.client.quic.send_ping(7)  # acknowledges nothing new: the window stays full
    received = 0
    for data, _ in pair.client.datagrams_to_send(pair.now):
        received += len(data)
        server.receive_datagram(data, new, pair.now)
    path = server.quic._network_paths[0]
    assert path.addr == new and not path.is_validated
    out = server.datagrams_to_send(pair.now + 0.001)  # the reply, once the pacer lets it (no timer has fired)
    assert path.local_challenge_sent
    assert [a for _, a in out] == [new] and sum(len(d) for d, _ in out) <= 3 * received
    for data, _ in out:  # the client answers the challenge, the server validates the new port
        pair.client.receive_datagram(data, quicpair.SERVER, pair.now)
    for data, _ in pair.client.datagrams_to_send(pair.now + 0.001):
        server.receive_datagram(data, new, pair.now + 0.002)
    assert path.is_validated and server.path_changes == 1
    assert server.quic._loss._pto_count == 0  # (validated without waiting for the probe timeout)


def test_the_challenge_is_sent_as_a_probe_once(monkeypatch) -> None:
    """The probe lets one datagram past the window; once the challenge is out, later packets from the new address
    while it is being validated send nothing more past it."""
    pair, server = _connected()
    _fill_window_to_old_address(pair, server)
    new = (HOME[0], 40001)
    monkeypatch.setattr(quicpair, "CLIENT", new)
    pair.client.quic.send_ping(7)
    for data, _ in pair.client.datagrams_to_send(pair.now):
        server.receive_datagram(data, new, pair.now)
    assert server.datagrams_to_send(pair.now + 0.001)  # the challenge
    assert not server.quic._probe_pending
    pair.client.quic.send_ping(8)  # (lost on the way to the client: the challenge has not arrived yet)
    for data, _ in pair.client.datagrams_to_send(pair.now + 0.001):
        server.receive_datagram(data, new, pair.now + 0.001)
    assert not server.quic._probe_pending


def test_a_return_takes_back_the_state_the_host_was_left_with(monkeypatch) -> None:
    """Wi-Fi, then LTE, then Wi-Fi again: the return kept LTE's window and round trip. Now the server takes back
    Wi-Fi's round-trip estimate, and, as Wi-Fi was left a while ago (longer than its probe timeout), its
    slow-start threshold with the initial window (an idle restart, RFC 5681 §4.1)."""
    pair, server = _connected()
    loss = server.quic._loss
    loss._cc.congestion_window, loss._cc.ssthresh = 200_000, 160_000  # Wi-Fi's, as grown
    wifi_rtt = (loss._rtt_smoothed, loss._rtt_variance, loss._rtt_min)
    _from(pair, monkeypatch, LTE, 50, stay=1.0)  # a second on LTE
    assert server.path_changes == 1
    loss._cc.congestion_window, loss._cc.ssthresh = 30_000, 24_000  # LTE's
    loss._rtt_smoothed, loss._rtt_min = 0.3, 0.25
    _from(pair, monkeypatch, HOME, 1)
    assert server.path_changes == 2 and server._path == HOME
    assert (loss._rtt_smoothed, loss._rtt_variance) == wifi_rtt[:2] and loss._rtt_initialized
    assert loss._rtt_min == math.inf  # (measured afresh after a probe timeout away: the host may be further now)
    assert loss.congestion_window == _initial(server) and loss._cc.ssthresh == 160_000


@pytest.mark.parametrize("congestion", ["reno", "cubic", "prague", "cubic-ecn"])
def test_an_idle_restart_keeps_three_quarters_of_the_window_as_its_threshold(monkeypatch, congestion: str) -> None:
    monkeypatch.setattr(quicpair, "server_configuration", lambda: server_configuration(congestion=congestion))
    pair, server = _connected()
    loss = server.quic._loss
    kind = type(loss._cc)
    loss._cc.congestion_window, loss._cc.ssthresh = 200_000, 20_000
    _from(pair, monkeypatch, LTE, 50, stay=1.0)
    _from(pair, monkeypatch, HOME, 1)
    assert server.path_changes == 2
    assert type(loss._cc) is kind and loss._cc.ssthresh == 150_000 and loss.congestion_window == _initial(server)
    pair.exchange()
    assert loss.congestion_window >= _initial(server)  # (and it runs: slow start towards the threshold)


def test_a_quick_return_takes_back_the_controller_whole(monkeypatch) -> None:
    """A move back within the left path's probe timeout (a make-before-break move that flaps, or a forged packet
    followed by the client's next real one) restores that path's controller as it was."""
    pair, server = _connected()
    loss = server.quic._loss
    _from(pair, monkeypatch, LTE, 50, stay=1.0)
    lte = loss._cc
    lte.congestion_window = 300_000
    lte_srtt = loss._rtt_smoothed
    _from(pair, monkeypatch, HOME, 1)  # forged, say: one packet from the old address
    assert server.path_changes == 2 and loss._cc is not lte
    # what the forged packet made the server adopt is bounded: an initial window towards the old address
    assert loss.congestion_window <= _initial(server)
    _from(pair, monkeypatch, LTE, 1)  # the client's next packet, 5 ms later
    assert server.path_changes == 3 and server._path == LTE
    assert loss._cc is lte and loss.congestion_window == 300_000 and loss._rtt_smoothed == pytest.approx(lte_srtt)


def test_the_packets_outstanding_at_a_return_are_released_once_and_judge_nothing(monkeypatch) -> None:
    """What was in flight on the path left stays counted until acknowledged or lost, then leaves the flight once,
    whichever controller is current, and its loss does not cut the restored window. Those packets no longer arm the
    probe timer, and a return has no PATH_CHALLENGE whose ACK would declare them lost: when they fill the restored
    window, the server probes the path it returned to (it sat there with a full window for good)."""
    pair, server = _connected()
    loss = server.quic._loss
    loss._cc.ssthresh = 50_000  # Wi-Fi's
    _from(pair, monkeypatch, LTE, 50, stay=1.0)
    _fill_window_to_old_address(pair, server)  # LTE's packets: the client has gone back to Wi-Fi meanwhile
    outstanding = loss.bytes_in_flight
    monkeypatch.setattr(quicpair, "CLIENT", HOME)
    pair.client.quic.send_ping(7)
    for data, _ in pair.client.datagrams_to_send(pair.now):
        server.receive_datagram(data, HOME, pair.now)
    assert server.path_changes == 2 and server._path == HOME
    assert loss.congestion_window == _initial(server) and loss.bytes_in_flight == outstanding  # (still counted)
    seen = []
    for _ in range(200):
        pair.exchange(rounds=1)
        seen.append(loss.bytes_in_flight)
    assert min(seen) >= 0 and loss.bytes_in_flight == 0  # released, once each
    assert loss._cc.ssthresh == 50_000 and loss.congestion_window >= _initial(server)  # (no congestion signal)


def test_a_host_whose_state_was_dropped_is_a_new_one_again(monkeypatch) -> None:
    """The state of MAX_HOSTS_REMEMBERED hosts at most is kept, the one left longest ago dropped first."""
    monkeypatch.setattr(session_module, "MAX_HOSTS_REMEMBERED", 2)
    pair, server = _connected()
    loss = server.quic._loss
    for host in ("10.0.0.3", "10.0.0.4", "10.0.0.5"):
        _from(pair, monkeypatch, (host, 40000), 50, stay=1.0)
    loss._cc.congestion_window, loss._rtt_initialized, loss._rtt_smoothed, loss._rtt_min = 30_000, True, 0.3, 0.25
    _from(pair, monkeypatch, HOME, 1)  # HOME's state, the oldest, was dropped
    assert server.path_changes == 4
    assert not loss._rtt_initialized and loss._rtt_min == math.inf  # initial values: a new host
    assert loss.congestion_window == _initial(server)


def test_the_host_returned_to_keeps_its_state_when_the_table_is_full(monkeypatch) -> None:
    """The table of left hosts is trimmed to MAX_HOSTS_REMEMBERED after the host being left is added: the host being
    returned to, the oldest in a full table, was dropped first and came back reset (a review's script)."""
    monkeypatch.setattr(session_module, "MAX_HOSTS_REMEMBERED", 2)
    pair, server = _connected()
    for host in ("10.0.1.1", "10.0.1.2"):
        _from(pair, monkeypatch, (host, 40000), rounds=50, stay=1.0)
    assert set(server._saved_paths) == {"10.0.0.2", "10.0.1.1"}  # full: home is the oldest
    _from(pair, monkeypatch, HOME)
    assert server._path == HOME and server.path_changes == 3
    assert server.quic._loss._rtt_initialized  # home's estimate back, not a reset
    assert set(server._saved_paths) == {"10.0.1.1", "10.0.1.2"}


def test_a_path_taken_back_after_its_probe_timeout_measures_its_minimum_afresh(monkeypatch) -> None:
    """aioquic only ever lowers the minimum RTT: a host's old 4-ms floor under what is now a 60-ms path (a carrier
    NAT's other cell) read as 56 ms of queue to the congestion cap for the rest of the connection."""
    pair, server = _connected()
    loss = server.quic._loss
    loss._rtt_min = 0.004  # home was close
    _from(pair, monkeypatch, LTE, rounds=50, stay=1.0)
    _from(pair, monkeypatch, HOME)
    assert server._path == HOME
    assert loss._rtt_initialized and loss._rtt_smoothed > 0  # its estimate back
    assert loss._rtt_min == math.inf  # and its floor to be measured again


def test_what_went_to_a_forged_address_is_no_congestion_of_the_real_path() -> None:
    """An on-path attacker rewrites one client packet's source to a fresh address: aioquic makes it primary unvalidated,
    sends it a PATH_CHALLENGE (and data, within 3x), and goes back with the client's next packet. Those packets were
    declared lost by the real path's controller: its window cut (15,000 -> 8,700 bytes here; 917 KB -> 468 KB in a
    review's longer run) by one rewritten packet, and again by the next."""
    import heapq
    import itertools

    from tokenwire.transport.frames import Request

    forged_addr = ("192.0.2.7", 999)
    pair = Pair()
    pair.exchange(rounds=40)
    server, client = pair.server, pair.client
    assert server is not None
    sid = client.start_request(Request(messages=[{"role": "user", "content": "x"}], scheme="chatterbox"), pair.now)
    pair.exchange(rounds=20)
    server.accept(sid)
    loss = server.quic._loss
    wire: list = []
    seq = itertools.count()
    to_forged = 0

    def step(forge: bool = False) -> None:  # 2 ms: 20 tokens, 20 ms each way
        nonlocal to_forged
        pair.now += 0.002
        now = pair.now
        while wire and wire[0][0] <= now:
            _, _, to, data, src = heapq.heappop(wire)
            if to == "client":
                client.receive_datagram(data, quicpair.SERVER, now)
            else:
                server.receive_datagram(data, src, now)
        for _ in range(20):
            server.push(sid, "tok ", now)
        for data, addr in server.datagrams_to_send(now):
            if addr == HOME:
                heapq.heappush(wire, (now + 0.02, next(seq), "client", data, None))
            else:
                to_forged += len(data)  # (nobody there)
        for i, (data, _) in enumerate(client.datagrams_to_send(now)):
            heapq.heappush(wire, (now + 0.02, next(seq), "server", data, forged_addr if forge and i == 0 else HOME))
        for session in (server, client):
            timer = session.get_timer()
            if timer is not None and timer <= now:
                session.handle_timer(now)

    for _ in range(300):
        step()
    loss._cc.congestion_window = loss._cc.ssthresh = 15_000  # a window the stream fills
    for _ in range(20):
        step()
    client.quic.send_ping(5)
    step(forge=True)
    for _ in range(400):
        step()
    assert to_forged > 0 and server.path_changes == 0  # the forged address got packets; no move was counted
    assert loss._cc.ssthresh == 15_000 and loss.congestion_window >= 15_000  # no congestion event from their loss
