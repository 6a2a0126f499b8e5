"""Per-packet ECN on loopback: codepoints chosen by the marking policy arrive as sent; CE feedback drives Prague."""

from aioquic.quic.packet_builder import QuicSentPacket

from tokenwire.transport.client import connect
from tokenwire.transport.ecn_socket import ECT0, ECT1, NOT_ECT
from tokenwire.transport.marking import ClassicPolicy, L4SPolicy, LatencySample, SwiftQueuePolicy, make_policy
from tokenwire.transport.prague_cc import PragueCongestionControl
from tokenwire.transport.server import serve
from tokenwire.transport.tls import dev_cert

from .test_loopback import run, word_source


def stream_with(policy_factory, congestion="prague"):
    samples = []

    async def go():
        server = await serve(word_source, host="127.0.0.1", port=0, marking=policy_factory, congestion=congestion)
        try:
            async with connect(
                "127.0.0.1", server.port, cadata=dev_cert().cert_pem, server_name="localhost", ecn=True
            ) as conn:
                for proto in server.protocols:
                    proto.server_session.on_latency_sample = samples.append
                text = await conn.chat("hi", max_tokens=120).collect()
                counts = list(conn._protocol._transport.received_by_codepoint)
            return text, counts
        finally:
            server.close()

    text, counts = run(go())
    return text, counts, samples


def test_l4s_policy_marks_every_packet_ect1():
    text, counts, samples = stream_with(L4SPolicy)
    assert len(text) > 0
    assert counts[ECT1] > 100 and counts[NOT_ECT] == 0 and counts[ECT0] == 0
    assert samples and all(s.queue_l for s in samples)
    assert all(0 <= s.latency_ms < 1000 for s in samples)  # same host: one-way latency on one clock


def test_classic_policy_marks_nothing_or_ect0():
    _, counts, samples = stream_with(ClassicPolicy, congestion="reno")
    assert counts[NOT_ECT] > 100 and counts[ECT1] == 0
    assert samples and not any(s.queue_l for s in samples)
    _, counts, _ = stream_with(lambda: ClassicPolicy(ect0=True), congestion="reno")
    assert counts[ECT0] > 100 and counts[ECT1] == 0 and counts[NOT_ECT] <= 3  # the handshake goes first


class FixedForecaster:
    def __init__(self, pred):
        self.pred = pred
        self.seen = []

    def observe(self, sample):
        self.seen.append(sample)

    def predict(self, now):
        return self.pred


def test_swiftqueue_policy_follows_predictions_with_hysteresis():
    f = FixedForecaster(None)
    p = SwiftQueuePolicy(f, margin_ms=1.0, hysteresis_ms=0.5)
    assert p.codepoint(0) == ECT1  # cold start
    f.pred = (5.0, 6.2)  # L faster by 1.2 but margin 1 + hysteresis 0.5 not met against the current L: stay
    assert p.codepoint(0) == ECT1
    f.pred = (5.0, 5.4)  # gain = -0.6 < -0.5: switch to classic
    assert p.codepoint(0) == ECT0
    f.pred = (5.0, 6.4)  # gain = 0.4, not > 0.5: stay classic
    assert p.codepoint(0) == ECT0
    f.pred = (5.0, 6.6)  # gain = 0.6: back to L
    assert p.codepoint(0) == ECT1
    s = LatencySample(0, 0.1, 3.0, 100, True, False)
    p.on_sample(s)
    assert f.seen == [s]
    assert make_policy("l4s").codepoint(0) == ECT1


def test_prague_cuts_in_proportion_to_marking():
    cc = PragueCongestionControl(max_datagram_size=1200)
    cc.ssthresh = None
    start = cc.congestion_window
    now = 0.0
    for _ in range(40):  # 40 RTTs with 10 % of packets marked: alpha converges towards 0.1
        now += 0.1
        cc.on_ecn_feedback(now=now, packets=9, marked=0)
        cc.on_ecn_feedback(now=now, packets=1, marked=1)
    assert 0.05 < cc.alpha < 0.1
    assert cc.congestion_window < start and cc.ce_events >= 30
    w = cc.congestion_window
    cc.on_ecn_feedback(now=now + 0.01, packets=10, marked=0)  # unmarked feedback never cuts
    assert cc.congestion_window == w
    # losses still halve, like Reno
    pkt = QuicSentPacket(
        epoch=None,
        in_flight=True,
        is_ack_eliciting=True,
        is_crypto_packet=False,
        packet_number=1,
        packet_type=None,
        sent_time=now + 1,
        sent_bytes=1200,
    )
    cc.bytes_in_flight = 1200
    cc.on_packets_lost(now=now + 2, packets=[pkt])
    assert cc.congestion_window == max(w // 2, 2400)


def test_ce_counts_reach_the_controller():
    """The client's CE counter deltas arrive at Prague through the session (no real AQM on loopback)."""
    from tokenwire.transport.frames import Ack
    from tokenwire.transport.server_session import ServerSession

    from .quicpair import Pair

    pair = Pair()
    pair.exchange(rounds=40)
    sess = pair.server
    assert isinstance(sess, ServerSession)
    cc = PragueCongestionControl(max_datagram_size=1200)
    sess.quic._loss._cc = cc
    sess.datagrams_sent = 100  # as if the server had sent that many (counts past it are refused, below)
    sess._on_datagram(Ack(0, 0, ecn=[0, 10, 0, 0]), 1.0)
    sess._on_datagram(Ack(0, 0, ecn=[0, 18, 0, 2]), 1.2)
    assert cc.marked_total == 2 and cc.ce_events == 1
    sess._on_datagram(Ack(0, 0, ecn=[0, 5, 0, 0]), 1.3)  # older counters (reordered): ignored
    assert cc.marked_total == 2
    # counts of more packets than the server sent: made up (a client inflated tokenwire_ecn_ce_total by 2^40
    # per connection), ignored, and the session's CE total stays what it was
    sess._on_datagram(Ack(0, 0, ecn=[0, 18, 0, 1 << 40]), 1.4)
    assert cc.marked_total == 2 and sess.ce_reported == 2
