"""A client that moves mid-connection (session 34, a mobility probe): a phone's NAT rebinding or its move from Wi-Fi
to cellular migrates the QUIC connection. ECN was judged once per connection: one that failed on a path clearing
the codepoint stayed Not-ECT on the clean path it moved to for ~27 s (its retry), where RFC 9000 §13.4.2 validates
per path; and nothing counted the moves."""

from __future__ import annotations

from tokenwire.transport.ecn_socket import ECT1
from tokenwire.transport.marking import EcnValidation

from . import quicpair
from .quicpair import Pair


def _failed(ecn: EcnValidation) -> None:
    ecn.on_sent(ECT1, 0, ecn.packets)  # marked packets acknowledged with no ECN counts grown: a bleaching path
    assert ecn.on_acked(ecn.packets - 1) and ecn.state == "failed"


def test_a_new_path_is_validated_afresh_whatever_the_old_one_said() -> None:
    for before in ("failed", "capable"):
        ecn = EcnValidation(packets=4)
        _failed(ecn)
        if before == "capable":
            ecn.on_counts([0, 5, 0, 0])  # ECT(1) arrivals: capable again
        assert ecn.state == before
        ecn.path_changed()
        assert ecn.state == "testing" and ecn.marking_allowed and ecn.failures == 1  # not a failure, not a retry
        assert ecn.counts(ECT1)  # it counts the packets sent from now on
        ecn.on_sent(ECT1, 10, 14)
        assert ecn.on_acked(13) and ecn.state == "failed" and ecn.failures == 2  # and judges them as at the start


def test_a_migrating_client_is_counted_and_its_server_validates_ecn_again(monkeypatch) -> None:
    pair = Pair()
    pair.exchange()
    server = pair.server
    assert server is not None and server.path_changes == 0  # (the handshake's path is no change)
    _failed(server.ecn)
    monkeypatch.setattr(quicpair, "CLIENT", ("10.0.0.3", 40000))  # the client's packets now come from elsewhere
    pair.client.quic.send_ping(1)
    pair.exchange()
    assert server.quic._network_paths[0].addr == ("10.0.0.3", 40000)  # (aioquic migrated the connection)
    assert server.path_changes == 1
    assert server.ecn.state == "testing" and server.ecn.failures == 1
    pair.client.quic.send_ping(2)
    pair.exchange()
    assert server.path_changes == 1  # the same path again: no change


def test_the_daemon_counts_its_clients_moves() -> None:
    from types import SimpleNamespace

    from tokenwire.daemon.config import parse_config
    from tokenwire.daemon.connection import CounterDeltas, _add_counters
    from tokenwire.daemon.service import Daemon

    daemon = Daemon(parse_config({"server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": ""}}))
    pair = Pair()
    pair.exchange()
    session = pair.server
    assert session is not None
    session.path_changes = 3  # (as three migrations left it)
    proto = SimpleNamespace(server_session=session, _reported=session.totals(), _reported_acks=0, _reported_ce=0,
                            _reported_unvalidated=0, _reported_path_changes=1,  # one counted at an earlier flush
                            _reported_drains=0)
    deltas = CounterDeltas()
    _add_counters(proto, deltas)  # type: ignore[arg-type]
    deltas.flush(daemon)
    assert daemon.metrics.registry.get_sample_value("tokenwire_path_changes_total") == 2
    assert proto._reported_path_changes == 3


def test_a_forged_packet_from_elsewhere_is_no_move() -> None:
    """aioquic promotes an address on its first non-probing packet before validating it, and goes back when the
    real one sends again: one genuine packet replayed from another address (RFC 9000 §9.3.3) counted as two moves
    and reset a failed validation. Only a validated path is a move now."""
    pair = Pair()
    pair.exchange()
    server = pair.server
    assert server is not None
    _failed(server.ecn)
    forged = ("203.0.113.9", 5555)
    for i in range(3):
        pair.now += 0.01
        pair.client.quic.send_ping(100 + i)
        for data, _ in pair.client.datagrams_to_send(pair.now):
            server.receive_datagram(data, forged, pair.now)  # the attacker's copy arrives first
            server.receive_datagram(data, quicpair.CLIENT, pair.now)  # the genuine one: a duplicate
        pair.exchange()  # what the server sends to the forged address reaches nobody
    assert server.quic._network_paths[0].addr == quicpair.CLIENT  # (aioquic went back to the real address)
    assert server.path_changes == 0
    assert server.ecn.state == "failed"
