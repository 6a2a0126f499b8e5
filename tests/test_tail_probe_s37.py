"""A lost tail after a move (session 37): the server's last stream data, sent on the path the client is leaving and
lost there, went again only if something ack-eliciting followed it on the path taken.

``path_reset`` takes the old path's packets out of the probe timer's count (they must not arm it for the new path), so
when the last packet with frames (here a chat answer's FINISHED) is lost on the path left and the server has nothing
more to send, no timer runs and no later packet is acknowledged: aioquic never declares it lost. A move to a new host
sent a PATH_CHALLENGE, whose ACK found the loss; a return to a host used before sent nothing, and the answer hung until
the idle timeout (the KV relay's flips: 2-3 of ~30 fetches ended "6 chunks received of 6"). The session now sends a
probe after a switch that took an ack-eliciting packet off the old path.

The pair is ``quicpair``'s (the chat server's session; the KV sessions share the same base); what the server sends to
an address the client is not at is lost.
"""

from __future__ import annotations

from tokenwire.transport.frames import Request
from tokenwire.transport.server_session import ServerSession
from tokenwire.transport.session_events import RequestFinished

from . import quicpair
from .quicpair import Pair

HOME = quicpair.CLIENT  # Wi-Fi, say
LTE = ("10.0.0.3", 40000)
FORGED = ("10.9.9.9", 5555)
LIMIT_S = 20.0  # virtual time: far past any retransmission, within the idle timeout (no RequestFailed instead)


def _at(pair: Pair, monkeypatch, addr: tuple[str, int]) -> None:
    """The client's packets come from ``addr`` from now on (a PING makes one leave), until both ends are quiet."""
    monkeypatch.setattr(quicpair, "CLIENT", addr)
    pair.client.quic.send_ping(len(pair.client_events) + 100)
    pair.exchange()


def _answer_all_but_finished(pair: Pair) -> tuple[ServerSession, int]:
    """A streamed answer whose tokens all arrived and were acknowledged: only its FINISHED is left to send."""
    sid = pair.client.start_request(Request(messages=[{"role": "user", "content": "x"}], scheme="stream"), pair.now)
    pair.exchange()
    server = pair.server
    assert server is not None
    server.accept(sid)
    for k in range(5):
        server.push(sid, f"t{k} ", pair.now)
    pair.exchange()
    assert server.quic._loss._cc.bytes_in_flight == 0  # (everything out so far is acknowledged)
    return server, sid


def _finished_at(pair: Pair, since: float) -> float | None:
    """How long after ``since`` the client read the answer's FINISHED, driving the pair for ``LIMIT_S`` at most."""
    while pair.now - since < LIMIT_S:
        if any(isinstance(e, RequestFinished) for e in pair.client_events):
            return pair.now - since
        before = pair.now
        pair.exchange(rounds=10)
        if pair.now == before:  # quiet: time passes anyway (the client's pings, the timers) until the limit
            pair.now += 0.5
    return None


def _lose_finished(pair: Pair, server: ServerSession, sid: int) -> None:
    """The server sends the answer's FINISHED to the client's current address, just as the client leaves it: lost
    (not delivered), and the last packet with frames the server has to send."""
    server.finish(sid)
    assert server.datagrams_to_send(pair.now)
    # (all of it: nothing of the stream is left to send, and nothing else follows)
    assert not list(server.quic._streams[sid].sender._pending) and server.quic._loss._cc.bytes_in_flight > 0


def test_a_return_to_a_host_used_before_sends_a_probe_for_the_lost_finished(monkeypatch) -> None:
    """Wi-Fi, LTE, then Wi-Fi again, the answer's FINISHED lost on LTE as the client leaves: the return restores
    Wi-Fi's state without a challenge, and the FINISHED never came (20 s here; the idle timeout in the field)."""
    pair = Pair()
    pair.exchange()
    _at(pair, monkeypatch, LTE)
    server, sid = _answer_all_but_finished(pair)
    assert server.path_changes == 1 and server._path == LTE
    _lose_finished(pair, server, sid)
    monkeypatch.setattr(quicpair, "CLIENT", HOME)
    pair.client.quic.send_ping(7)
    since = pair.now
    took = _finished_at(pair, since)
    assert server.path_changes == 2 and server._path == HOME  # (a return: HOME's state taken back, no challenge)
    assert took is not None and took < 1.0, took  # a few round trips and a loss timer (the pair's RTT: a few ms)


def test_a_move_to_a_new_host_recovers_the_lost_finished_too(monkeypatch) -> None:
    """The case that worked by chance: the new host's PATH_CHALLENGE drew the ACK that declared the FINISHED lost."""
    pair = Pair()
    pair.exchange()
    server, sid = _answer_all_but_finished(pair)
    _lose_finished(pair, server, sid)
    monkeypatch.setattr(quicpair, "CLIENT", LTE)
    pair.client.quic.send_ping(7)
    took = _finished_at(pair, pair.now)
    assert server.path_changes == 1 and server._path == LTE
    assert took is not None and took < 1.0, took


def test_data_sent_to_an_address_left_unvalidated_is_sent_again(monkeypatch) -> None:
    """A forged (or replayed) packet from elsewhere: aioquic makes that address primary unvalidated and sends there,
    the FINISHED among it, until the client's next packet takes the connection back. Those packets are taken out of
    the probe timer's count as well (``detach_sent_since``), so the FINISHED lost there went again only with a probe."""
    pair = Pair()
    pair.exchange()
    server, sid = _answer_all_but_finished(pair)
    # the client's next packet, replayed from another address ahead of the original (a few times over: the server
    # may send three times what came from there, and the FINISHED must go there whole)
    pair.client.quic.send_ping(7)
    datagrams = pair.client.datagrams_to_send(pair.now)
    assert datagrams
    for data, _ in datagrams * 4:
        server.receive_datagram(data, FORGED, pair.now)
    assert server.quic._network_paths[0].addr == FORGED and not server.quic._network_paths[0].is_validated
    _lose_finished(pair, server, sid)
    # the client's next packet (a higher number) takes the connection back home
    pair.client.quic.send_ping(8)
    since = pair.now
    took = _finished_at(pair, since)
    assert server._path == HOME and server.path_changes == 0
    assert took is not None and took < 1.0, took


def test_a_move_with_nothing_awaiting_delivery_sends_no_probe(monkeypatch) -> None:
    """The probe is for lost frames: when every packet the old path carried was acknowledged, a return sends none
    (an idle connection moving pays nothing; a PING's ACK would tell the loss detection nothing)."""
    pair = Pair()
    pair.exchange()
    _at(pair, monkeypatch, LTE)
    server = pair.server
    assert server is not None and server.quic._loss._cc.bytes_in_flight == 0
    probes: list[bool] = []
    monkeypatch.setattr(server.quic, "_send_probe", lambda: probes.append(True))
    _at(pair, monkeypatch, HOME)
    assert server.path_changes == 2 and server._path == HOME and probes == []
