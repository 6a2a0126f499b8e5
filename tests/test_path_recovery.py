"""Resuming after an outage (transport/path_recovery.py): measured on the virtual-time simulator, which runs
the real aioquic connections and tokenwire sessions, so the numbers are exact per seed."""

from __future__ import annotations

import pytest
from aioquic.quic.connection import QuicConnection

from tokenwire.testbed import sim
from tokenwire.testbed.loss import LossModel
from tokenwire.transport.path_recovery import backed_off, probe_on_receipt
from tokenwire.transport.tls import client_configuration


class _Outage(LossModel):
    """Every packet lost in [start, end), in the direction it is used for."""

    def __init__(self, start: float, end: float) -> None:
        self.start, self.end = start, end

    def lost(self, t: float) -> bool:
        return self.start <= t < self.end

    def mean_loss(self) -> float:
        return 0.0


def _first_render_after(scheme: str, start: float, end: float, monkeypatch) -> float:
    monkeypatch.setattr(sim, "parse_loss", lambda spec, seed=0: _Outage(start, end))
    run = sim.run_scheme(scheme, sim.SimConfig(tokens=700, loss="none", seed=1))
    assert run.digest_ok and run.stats.tokens_rendered == 700
    return min(t for t in run.render if t >= end) - end


@pytest.mark.parametrize("scheme", ["chatterbox", "stream"])
@pytest.mark.parametrize("seconds", [8.0, 16.0])
def test_tokens_resume_within_half_a_second_of_the_path_returning(scheme, seconds, monkeypatch):
    """A full outage in both directions from 3 s. Before, the first token after it rendered once the next
    backed-off probe got through: 2.93 s after an 8-s outage and 3.10 s after a 16-s one (chatterbox),
    2.69 s after a 16-s one (stream). Now: 142 ms (chatterbox), 179 / 238 ms (stream), with 50 ms one way."""
    assert _first_render_after(scheme, 3.0, 3.0 + seconds, monkeypatch) < 0.5


def test_an_uplink_only_outage_no_longer_blocks_new_tokens(monkeypatch):
    """8 s from 3 s in which the client's packets are lost and the server's arrive. Chatterbox's repeats of
    the unacknowledged tokens used to fill the congestion window (22 KB) within 3 s, after which no new
    token could leave: stall ratio 0.229, longest stall 2.1 s (in-order streaming: 0.000). Repeats now stay
    in the first half of the window while acknowledgements are silent (transport/chatterbox.py)."""
    models = iter([_Outage(0.0, 0.0), _Outage(3.0, 11.0)])  # the sim asks for the down link first, then up
    monkeypatch.setattr(sim, "parse_loss", lambda spec, seed=0: next(models))
    run = sim.run_scheme("chatterbox", sim.SimConfig(tokens=700, loss="none", loss_direction="both", seed=1))
    assert run.digest_ok and run.stats.tokens_rendered == 700
    assert run.stats.stall_ratio < 0.02 and run.stats.longest_stall_ms < 200


def logged_wires(monkeypatch) -> list:
    """The sim's two wires (down, then up), each keeping its log of (time, size, delivered) per packet, as the next
    run makes them."""
    wires: list = []

    class _Logged(sim._Wire):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            wires.append(self)

        @property
        def log(self) -> list[tuple[float, int, bool]]:
            # (the wire logs Packet objects since the trace-driven channel: session 38)
            return [(p.arrival, p.size, p.delivery is not None) for p in self.sent]

    monkeypatch.setattr(sim, "_Wire", _Logged)
    return wires


@pytest.mark.parametrize("scheme", ["chatterbox", "stream"])
def test_a_long_uplink_only_outage_lets_the_clients_pings_through(scheme, monkeypatch):
    """16 s from 3 s in which the client's packets are lost. Its ack datagrams (chatterbox) and pings filled
    its own congestion window, so its recovery pings stopped leaving: 6 client packets in the outage's last
    4 s, and after the uplink returned tokens waited for a backed-off probe (chatterbox stall 0.307, longest
    4.0 s; stream 0.229). A ping that finds the window full now leaves as a probe, one packet past it, every
    quarter second (chatterbox 0.178, stream 0.209, longest 2.0 s for both). Since QUIC's ACKs ride the next packet
    with data (transport/ack_timing.py), chatterbox sends fewer bytes before the outage, its window grows less in
    slow start (20.1 KB against 22.4 KB at 3 s) and new tokens fill it a second sooner: 0.229, longest 2.1 s. Stream's
    window is the same (16.9 KB); its probes' times moved, and one 1.6-s gap became 1.85 s: 0.220."""
    models = iter([_Outage(0.0, 0.0), _Outage(3.0, 19.0)])
    monkeypatch.setattr(sim, "parse_loss", lambda spec, seed=0: next(models))
    wires = logged_wires(monkeypatch)
    run = sim.run_scheme(scheme, sim.SimConfig(tokens=700, loss="none", loss_direction="both", seed=1))
    assert run.digest_ok and run.stats.tokens_rendered == 700
    up = wires[1]
    assert sum(1 for t, _n, _ok in up.log if 15.0 <= t < 19.0) >= 16
    assert run.stats.stall_ratio < (0.24 if scheme == "chatterbox" else 0.23)
    assert run.stats.longest_stall_ms < 2500


def test_two_backed_off_ends_do_not_answer_each_others_probes_without_end():
    """A channel that loses every other millisecond (ge:1,1): each end's probe, sent on receipt, crossed; its
    data, paced a millisecond later, did not; and each receipt drew a probe and an ACK in two datagrams, so
    the pings doubled per round trip (1,600 packets/s after 240 s) and the request never finished. One
    receipt probe per round trip: the stream's 20 tokens arrive by 51 s, with 733 packets sent down."""
    run = sim.run_scheme("stream", sim.SimConfig(tokens=20, loss="ge:1,1", seed=1, max_virtual_s=120.0))
    assert run.digest_ok and run.stats.tokens_rendered == 20
    assert run.packets_down < 2000


def test_what_the_module_relies_on_in_aioquic():
    """aioquic 1.7.2 internals: the PTO backoff counter and the probe request (pinned in pyproject.toml)."""
    quic = QuicConnection(configuration=client_configuration(server_name="localhost"))
    assert quic._loss._pto_count == 0 and not backed_off(quic)
    assert quic._remote_max_idle_timeout is None  # the server's idle timeout, once its parameters arrive
    assert probe_on_receipt(quic) is False and quic._probe_pending is False
    quic._loss._pto_count = 2  # as after two probe timeouts without an acknowledgement
    assert backed_off(quic) and probe_on_receipt(quic) is True and quic._probe_pending is True


def test_the_kv_client_pings_each_quarter_second_of_silence_while_a_fetch_is_pending():
    """The KV client sends no ack-eliciting packets of its own between chunks, so after a loss outage nothing
    crossed until the server's backed-off probe (testbed kv --virtual, TMobile-LTE with 0.5-s outages both
    ways, seeds 5/6/7: fixed-L1 deadlines met 35/10/30 % -> 35/25/50 %, p95 fetch 24/15/15 s -> 12/12/7 s)."""
    from tokenwire.transport.frames import KvFetch
    from tokenwire.transport.kv_channel import KVClientSession, kv_quic_config
    from tokenwire.transport.path_recovery import KV_RECOVERY_PING_S

    quic = QuicConnection(configuration=kv_quic_config(client_configuration(server_name="localhost")))
    quic.connect(("127.0.0.1", 4434), now=0.0)
    sess = KVClientSession(quic)
    assert sess._session_timer() is None  # nothing pending: no pings
    sid = sess.fetch(KvFetch(model="m", deadline_ms=4000, token_ids=[1, 2, 3]))
    assert sess._session_timer() == KV_RECOVERY_PING_S
    sess.handle_timer(KV_RECOVERY_PING_S)
    assert quic._ping_pending  # a PING goes out with the next packet
    assert sess._session_timer() == 2 * KV_RECOVERY_PING_S  # the next one a quarter second later
    sess.finish(sid)
    assert sess._session_timer() is None


@pytest.mark.parametrize("started", [True, False])
@pytest.mark.parametrize(("idle_timeout", "server_idle", "interval"),
                         [(0.6, None, 0.2), (60.0, None, 1.0), (60.0, 1.5, 0.5)])
def test_a_pause_mid_answer_pings_within_the_idle_timeout(idle_timeout, server_idle, interval, started):
    """A pause mid-answer pings every second (PAUSE_PING_S), but never later than a third of the idle timeout
    in force, ours or the server's if shorter: the server does not ping, and with --idle-timeout 0.8 a slow
    model's 1.4-s pause ended the connection. So does a model thinking before its first token: it pinged a
    third of the idle timeout, and a NAT rebinding during a 3-s prefill held the answer 20 s (the server learns
    the new address only from the client's packets)."""
    from tokenwire.transport.client_session import ClientSession
    from tokenwire.transport.frames import Request

    cfg = client_configuration(server_name="localhost")
    cfg.idle_timeout = idle_timeout
    session = ClientSession(QuicConnection(configuration=cfg))
    session.quic._remote_max_idle_timeout = server_idle  # from the server's transport parameters
    sid = session.start_request(Request(messages=[{"role": "user", "content": "x"}]), 0.0)
    if started:
        session.requests[sid].receiver.tokens.append(b"first")  # the answer has started
    assert session._keepalive_at() == pytest.approx(interval)


@pytest.mark.parametrize("keepalive", [False, True])
def test_a_connection_kept_between_turns_lives_with_keepalive_and_says_why_it_died_without(keepalive):
    """A chat app holding one connection while its user thinks: with no request open neither end sends, the
    QUIC idle timer ends it, and the next request's error blamed a gone server. ``keepalive`` pings a third of
    the idle timeout; without it, the error says nobody had anything to send."""
    from tests.quicpair import Pair
    from tokenwire.transport.client import closed_error
    from tokenwire.transport.frames import Request
    from tokenwire.transport.session_events import ConnectionEnded, RequestFinished

    pair = Pair()
    pair.client.keepalive = keepalive
    pair.exchange(rounds=40)  # handshake
    assert pair.server is not None
    pair.exchange(rounds=400, quiet_after=300.0)  # the user thinks for 3 minutes (idle timeout 60 s)
    ended = [e for e in pair.client_events if isinstance(e, ConnectionEnded)]
    if not keepalive:
        assert len(ended) == 1 and pair.now > 60.0 and not ended[0].requests_open
        err = closed_error(ended[0].error_code, ended[0].reason, 60.0, awaiting=ended[0].requests_open)
        assert err.path_lost and "no request was open" in str(err) and "gone" not in str(err)
        return
    assert not ended and pair.now > 180.0
    sid = pair.client.start_request(Request(messages=[{"role": "user", "content": "next turn"}]), pair.now)
    pair.exchange(rounds=40)
    pair.server.accept(sid)
    pair.server.push(sid, "answer", pair.now)
    pair.server.finish(sid)
    pair.exchange(rounds=100)
    assert any(isinstance(e, RequestFinished) and e.stream_id == sid for e in pair.client_events)


def test_an_idle_close_with_a_request_open_says_the_server_or_path_is_gone():
    """The client's RequestFailed events come before ConnectionEnded in one batch, so the SDK could not tell
    from its own streams whether a request had been open: ConnectionEnded says so."""
    from tests.quicpair import Pair
    from tokenwire.transport.client import closed_error
    from tokenwire.transport.frames import Request
    from tokenwire.transport.session_events import ConnectionEnded, RequestFailed

    pair = Pair()
    pair.exchange(rounds=40)
    pair.client.start_request(Request(messages=[{"role": "user", "content": "x"}]), pair.now)
    pair.exchange(rounds=2000, quiet_after=300.0, drop_down=lambda d: True)  # the server goes dark
    (ended,) = [e for e in pair.client_events if isinstance(e, ConnectionEnded)]
    assert ended.requests_open and any(isinstance(e, RequestFailed) for e in pair.client_events)
    assert "server or path gone" in str(closed_error(ended.error_code, ended.reason, 60.0,
                                                     awaiting=ended.requests_open))


@pytest.mark.parametrize(("waited", "interval"), [(0.0, 1.0), (3.0, 1.0), (40.0, 40.0 / 3), (200.0, 20.0)])
def test_a_model_thinking_long_is_pinged_less_and_less(waited, interval):
    """Before the first token the client pings every second at first (a NAT rebinding during a prefill is found
    within a second), then a quarter of the time waited so far, up to a third of the idle timeout: at a fixed
    second a reasoning model thinking for minutes cost 60 pings a minute."""
    from tokenwire.transport.client_session import ClientSession
    from tokenwire.transport.frames import Request

    cfg = client_configuration(server_name="localhost")
    cfg.idle_timeout = 60.0
    session = ClientSession(QuicConnection(configuration=cfg))
    session.start_request(Request(messages=[{"role": "user", "content": "x"}]), 0.0)
    session._now = session._heard_at = waited  # (the server acks each ping: heard again just now)
    # the ping is due when the silence is a quarter of the whole wait (at least a second, at most idle / 3)
    assert session._keepalive_at() == pytest.approx(waited + interval)
    session._now = waited + interval / 2  # asked again later: the same time (from "now", each timer fell short)
    assert session._keepalive_at() == pytest.approx(waited + interval)
