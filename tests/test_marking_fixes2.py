"""ECN marking defects found by a probe of the daemon (fixA):

1. a peer that never reports ECN counts kept getting ECT marks whose CE nobody heard (ECN validation);
2. ``classic`` sent ECT(0) under aioquic's Reno, which ignores CE (the classic ECN response: reno-ecn, cubic-ecn);
3. the marking policy was asked before QUIC built anything, for transmits that sent nothing (one lazy decision);
4. Prague's smoothed RTT started at 0.1 s and its first sample never replaced it;
5. ``[kv] marking = "classic"`` was Not-ECT like "none", and accepted ``congestion = "prague"`` silently;
6. a SIGHUP did not say that the swiftqueue model as configured now would not load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil

import pytest
from aioquic.quic.congestion.reno import RenoCongestionControl

from tokenwire.daemon import service
from tokenwire.daemon.config import ConfigError, parse_config
from tokenwire.daemon.kv_config import kv_marking, parse_kv
from tokenwire.daemon.marking import MarkingConfig, MarkingService
from tokenwire.daemon.telemetry import Metrics
from tokenwire.transport.classic_ecn_cc import (
    INITIAL_RTT,
    CubicEcnCongestionControl,
    RenoEcnCongestionControl,
)
from tokenwire.transport.ecn_socket import CE, ECT0, ECT1, NOT_ECT
from tokenwire.transport.frames import Ack, Request
from tokenwire.transport.marking import ECN_VALIDATION_PACKETS, EcnValidation, L4SPolicy
from tokenwire.transport.prague_cc import PragueCongestionControl
from tokenwire.transport.server_session import ServerSession
from tokenwire.transport.session_events import RequestFinished
from tokenwire.transport.tls import server_configuration

from .quicpair import Pair


# ------------------------------------------------------------------------------------------------ helpers
class CountingPolicy:
    """A marking policy that counts how often it is asked; answers ``answers`` in turn."""

    name = "counting"

    def __init__(self, *answers: int) -> None:
        self.answers = answers or (ECT1,)
        self.calls = 0

    def codepoint(self, now: float) -> int:
        self.calls += 1
        return self.answers[(self.calls - 1) % len(self.answers)]

    def on_sample(self, sample) -> None:
        pass


class MarkedPair(Pair):
    """A :class:`Pair` whose server marks with ``policy``; a lossless path that keeps every codepoint, and a
    client that reports its ECN counts (as ``connect()`` does by default) or none (``connect(ecn=False)``)."""

    def __init__(self, policy, *, client_reports_ecn: bool) -> None:
        self.policy = policy
        self.sent = [0, 0, 0, 0]  # datagrams the server sent, per codepoint: what the client receives
        self.batches: list[tuple[int, int]] = []  # (codepoint, datagrams) per server call that sent any
        self.calls_at: list[int] = []  # the policy's calls so far, after each of those
        super().__init__()
        if client_reports_ecn:
            self.client.ecn_counts = lambda: list(self.sent)

    def _server_for(self, data: bytes) -> ServerSession:
        if self.server is None:
            srv = super()._server_for(data)
            srv.marking = self.policy
            plain = srv.datagrams_to_send

            def counted(now: float):
                out = plain(now)
                if out:
                    self.sent[srv.current_codepoint] += len(out)
                    self.batches.append((srv.current_codepoint, len(out)))
                    self.calls_at.append(self.policy.calls)
                return out

            srv.datagrams_to_send = counted  # type: ignore[method-assign]
        assert self.server is not None
        return self.server


def _request(scheme: str = "chatterbox") -> Request:
    return Request(messages=[{"role": "user", "content": "x"}], scheme=scheme)


def answer_on(pair: MarkedPair, scheme: str, tokens: int) -> None:
    """One more answer on the pair's connection (handshake done), a token per exchange (one datagram each)."""
    sid = pair.client.start_request(_request(scheme), pair.now)
    pair.exchange(rounds=20)
    srv = pair.server
    assert srv is not None
    srv.accept(sid)
    for i in range(tokens):
        srv.push(sid, f"t{i} ", pair.now)
        pair.exchange(rounds=2)
    srv.finish(sid)
    pair.exchange(rounds=200)


def _stream_answer(pair: MarkedPair, tokens: int, scheme: str = "chatterbox") -> None:
    """One answer, a token per few milliseconds (one datagram each), to its end."""
    pair.exchange(rounds=40)  # handshake
    answer_on(pair, scheme, tokens)
    assert any(isinstance(e, RequestFinished) and e.result.digest_ok for e in pair.client_events)


# ------------------------------------------------------------------------------------------------ 1. validation
def test_a_client_that_never_reports_ecn_counts_stops_getting_ect_marks():
    """The SDK's connect() (ecn=False) sends ack datagrams without counts: CE on its packets reached no one."""
    policy = CountingPolicy(ECT1)
    pair = MarkedPair(policy, client_reports_ecn=False)
    _stream_answer(pair, 60)
    srv = pair.server
    assert srv is not None
    assert srv.ecn.state == "failed" and srv.ecn.failures == 1
    marks = [cp for cp, _ in pair.batches]
    first_plain = marks.index(NOT_ECT)
    assert set(marks[:first_plain]) == {ECT1} and set(marks[first_plain:]) == {NOT_ECT}
    assert marks.count(NOT_ECT) > 10  # most of the answer went out Not-ECT
    assert 0 < policy.calls <= first_plain  # (batches of ACKs alone take the last answer)
    assert pair.calls_at[first_plain - 1] == pair.calls_at[-1]  # once failed, the policy is not asked any more


def test_a_client_that_reports_ecn_counts_keeps_its_marks():
    """The testbed's clients (ecn=True): validated by their counts, every packet marked as the policy says."""
    policy = CountingPolicy(ECT1)
    pair = MarkedPair(policy, client_reports_ecn=True)
    _stream_answer(pair, 60)
    srv = pair.server
    assert srv is not None
    assert srv.ecn.state == "capable" and srv.ecn.failures == 0
    assert {cp for cp, _ in pair.batches} == {ECT1} and pair.sent[NOT_ECT] == 0


def test_the_stream_scheme_has_no_ack_datagrams_to_carry_counts_so_it_stops_marking():
    pair = MarkedPair(CountingPolicy(ECT1), client_reports_ecn=True)
    _stream_answer(pair, 30, scheme="stream")
    assert pair.server is not None and pair.server.ecn.state == "failed"
    assert pair.batches[-1][0] == NOT_ECT


def test_counts_that_come_after_validation_failed_turn_marking_back_on():
    pair = MarkedPair(CountingPolicy(ECT1), client_reports_ecn=False)
    _stream_answer(pair, 40)
    srv = pair.server
    assert srv is not None and srv.ecn.state == "failed"
    assert not srv._ecn_feedback([5, 0, 0, 0], pair.now) and srv.ecn.state == "failed"  # no marked arrival
    srv._ecn_feedback([5, 20, 0, 0], pair.now)  # a late reporter: ECT(1) arrivals
    assert srv.ecn.state == "capable"
    srv.quic.send_ping(1)
    assert srv.datagrams_to_send(pair.now + 0.01) and srv.current_codepoint == ECT1


def test_validation_waits_for_the_acknowledgement_of_enough_ect_packets_and_for_a_report_if_told():
    v = EcnValidation()
    v.on_sent(ECT1, 0, 4)
    v.on_sent(NOT_ECT, 4, 100)  # Not-ECT packets do not count
    v.on_sent(ECT0, 100, 110)  # the packets-th ECT packet is number 105
    assert not v.on_acked(104) and v.marking_allowed
    assert v.on_acked(105) and not v.marking_allowed and v.failures == 1
    kv = EcnValidation(wait_for_report=True)  # the KV channel: its counts come once per chunk
    kv.on_sent(ECT1, 0, 500)
    assert not kv.on_acked(499) and kv.state == "testing"
    kv.reports += 1  # a KV_ACK without counts
    assert kv.on_acked(499) and kv.state == "failed"
    assert ECN_VALIDATION_PACKETS == 10


def test_the_kv_server_waits_for_a_kv_ack_before_it_judges():
    from aioquic.quic.connection import QuicConnection

    from tokenwire.transport.kv_channel import KVServerSession, kv_quic_config

    quic = QuicConnection(configuration=kv_quic_config(server_configuration()),
                          original_destination_connection_id=b"\x01" * 8)
    sess = KVServerSession(quic, marking=L4SPolicy())
    assert sess.ecn.wait_for_report


def test_kv_fetches_stop_marking_for_a_client_without_ecn_counts(tmp_path):
    """connect_kv() (ecn=False) sends KV_ACKs without counts: a fetch at 100 % CE was never slowed by it."""
    torch = pytest.importorskip("torch")
    from tokenwire.daemon.kv_service import KVService
    from tokenwire.daemon.kv_store_local import LocalChunkStore
    from tokenwire.transport.kv_channel import ServerTuning, connect_kv, serve_kv

    chunk, n = 32, 32 * 24
    g = torch.Generator().manual_seed(0)
    kv = [tuple(torch.randn(1, 2, n, 16, generator=g).to(torch.float16) for _ in range(2)) for _ in range(4)]
    svc = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=chunk)
    ids = list(range(100, 100 + n))
    svc.ingest_sync("m", ids, kv, prewarm=["high"])

    async def fetch(ecn: bool) -> tuple[str, list[int], int]:
        server = await serve_kv(svc, "127.0.0.1", 0, congestion="prague", marking=L4SPolicy,
                                tuning=ServerTuning(forecaster="ewma"))
        try:
            async with connect_kv("127.0.0.1", server.port, verify=False, ecn=ecn) as conn:
                res = await conn.fetch_kv(model="m", token_ids=ids, deadline_ms=20000, controller="fixed-L1")
                assert len(res.chunks) == 24
                states = [p.kv.ecn.state for p in server.protocols]
            # counted for the metric (tokenwire_kv_ecn_validation_failed_total), open or ended
            return states[0], list(server._quic_server._transport.sent_by_codepoint), server.ecn_unvalidated()
        finally:
            server.close()

    try:
        state, sent, failed = asyncio.run(asyncio.wait_for(fetch(False), 60))
        assert state == "failed" and sent[NOT_ECT] > 0 and failed == 1
        state, sent, failed = asyncio.run(asyncio.wait_for(fetch(True), 60))
        assert state == "capable" and sent[NOT_ECT] == 0 and sent[ECT1] > 20 and failed == 0
    finally:
        svc.close()


def test_validation_failures_are_a_daemon_counter():
    from prometheus_client import generate_latest

    metrics = Metrics()
    svc = MarkingService(MarkingConfig(policy="l4s"), metrics)
    svc.add_validation_failures(2)
    svc.add_validation_failures(0)
    assert b"tokenwire_ecn_validation_failed_total 2.0" in generate_latest(metrics.registry)


# ------------------------------------------------------------------------------------------------ 2. classic ECN
def test_reno_ecn_halves_on_ce_once_per_round_trip():
    cc = RenoEcnCongestionControl(max_datagram_size=1200)
    plain = RenoCongestionControl(max_datagram_size=1200)
    start = cc.congestion_window
    cc.on_rtt_measurement(now=1.0, rtt=0.05)
    assert cc.srtt == 0.05
    cc.on_ecn_feedback(now=1.0, packets=10, marked=0)  # no mark: nothing
    assert cc.congestion_window == start
    cc.on_ecn_feedback(now=1.0, packets=10, marked=3)
    assert cc.congestion_window == start // 2 and cc.ssthresh == start // 2 and cc.ce_events == 1
    cc.on_ecn_feedback(now=1.04, packets=10, marked=10)  # marks on packets sent before the cut: same event
    assert cc.congestion_window == start // 2 and cc.ce_events == 1
    cc.on_ecn_feedback(now=1.06, packets=10, marked=1)  # a round trip later: a new event
    assert cc.congestion_window == start // 4 and cc.ce_events == 2
    assert not hasattr(plain, "on_ecn_feedback")  # aioquic's Reno: the session had nothing to call


def test_cubic_ecn_answers_ce_with_cubics_own_loss_response():
    cc = CubicEcnCongestionControl(max_datagram_size=1200)
    cc.bytes_in_flight = 10 * 1200
    before = cc.bytes_in_flight
    cc.on_ecn_feedback(now=5.0, packets=4, marked=4)
    assert cc.congestion_window == int(10 * 1200 * 0.7) and cc.ce_events == 1
    assert cc.bytes_in_flight == before  # the stand-in packet carried no bytes


def test_a_classic_connection_under_ce_shrinks_its_window_instead_of_growing_it():
    """Probe: every packet CE, and aioquic's Reno grew from 14,853 to 28,231 bytes."""
    pair = MarkedPair(CountingPolicy(ECT0), client_reports_ecn=True)
    pair.exchange(rounds=40)
    srv = pair.server
    assert srv is not None
    srv.quic._loss._cc = cc = RenoEcnCongestionControl(max_datagram_size=1200)
    srv.datagrams_sent = 1000
    window = cc.congestion_window
    srv._on_datagram(Ack(0, 0, ecn=[0, 0, 10, 0]), 1.0)
    srv._on_datagram(Ack(0, 0, ecn=[0, 0, 10, 10]), 1.2)
    assert cc.congestion_window == window // 2 and cc.ce_events == 1


def test_classic_ect0_runs_the_classic_ecn_controllers_and_refuses_prague():
    def cc(doc):
        return parse_config(doc).server.congestion

    classic = {"policy": "classic"}
    assert cc({"marking": classic}) == "reno-ecn"
    assert cc({"marking": classic, "server": {"congestion": "reno"}}) == "reno-ecn"
    assert cc({"marking": classic, "server": {"congestion": "cubic"}}) == "cubic-ecn"
    assert cc({"marking": {**classic, "classic_codepoint": "not-ect"}, "server": {"congestion": "cubic"}}) == "cubic"
    assert cc({"marking": {"policy": "l4s"}}) == "prague"
    assert cc({}) == "reno"
    with pytest.raises(ConfigError, match=r"server\.congestion: 'prague' cannot carry ECT\(0\) packets"):
        parse_config({"marking": classic, "server": {"congestion": "prague"}})
    assert parse_config({"marking": {**classic, "classic_codepoint": "not-ect"},
                         "server": {"congestion": "prague"}}).server.congestion == "prague"


def test_the_classic_ecn_controllers_are_registered_with_aioquic():
    from aioquic.quic.connection import QuicConnection

    for name, cls in (("reno-ecn", RenoEcnCongestionControl), ("cubic-ecn", CubicEcnCongestionControl)):
        quic = QuicConnection(configuration=server_configuration(congestion=name),
                              original_destination_connection_id=b"\x02" * 8)
        assert type(quic._loss._cc) is cls


# ------------------------------------------------------------------------------------------------ 3. lazy decision
def test_the_policy_is_asked_once_per_transmit_that_builds_datagrams_and_never_for_one_that_does_not():
    policy = CountingPolicy(ECT1, ECT0)  # alternating: each decision is told apart from the one before
    pair = MarkedPair(policy, client_reports_ecn=True)
    pair.exchange(rounds=40)
    sid = pair.client.start_request(_request(), pair.now)
    pair.exchange(rounds=20)
    srv = pair.server
    assert srv is not None
    srv.accept(sid)
    pair.exchange(rounds=20)
    assert 0 < policy.calls <= len(pair.batches)  # at most one decision per call that sent something

    calls = policy.calls
    pair.now += 0.001
    assert srv.datagrams_to_send(pair.now) == []  # nothing to send (a received packet, a timer)
    assert policy.calls == calls

    for i in range(400):  # several datagrams' worth of tokens at once: one burst
        srv.push(sid, f"token-{i:04d} ", pair.now)
    sender = srv.requests[sid].sender
    assert sender is not None
    meta_before = set(sender.sent_meta)
    pair.now += 0.001
    burst = srv.datagrams_to_send(pair.now)
    assert len(burst) > 1 and policy.calls == calls + 1
    new = [sender.sent_meta[k] for k in sender.sent_meta if k not in meta_before]
    assert new and {cp for _, cp in new} == {srv.current_codepoint}  # as recorded, so sent


# ------------------------------------------------------------------------------------------------ 4. Prague's RTT
def test_prague_takes_its_first_rtt_sample_as_its_smoothed_rtt():
    cc = PragueCongestionControl(max_datagram_size=1200)
    assert cc.srtt is None
    cc.on_ecn_feedback(now=0.0, packets=10, marked=0)  # before any sample: aioquic's initial RTT
    assert cc._window_end == pytest.approx(INITIAL_RTT)
    cc.on_rtt_measurement(now=0.0, rtt=0.001)
    assert cc.srtt == 0.001  # it was 87.6 ms after one 1-ms sample
    cc.congestion_window = 100 * 1200
    for i in range(100):  # 100 ms of a 1-ms path, every packet CE: about one reaction per round trip
        now = 0.2 + i * 0.001
        cc.on_rtt_measurement(now=now, rtt=0.001)
        cc.on_ecn_feedback(now=now, packets=10, marked=10)
    assert cc.ce_events >= 40  # 2 with the 0.1-s start


# ------------------------------------------------------------------------------------------------ 5. [kv] classic
def test_kv_classic_is_ect0_with_the_classic_ecn_controller_and_refuses_prague():
    assert parse_kv({"marking": "classic"}, None).congestion == "reno-ecn"
    assert parse_kv({"marking": "classic", "congestion": "cubic"}, None).congestion == "cubic-ecn"
    assert parse_kv({"marking": "none"}, None).congestion == "reno"
    assert parse_kv({}, None).congestion == "prague"
    with pytest.raises(ConfigError, match=r"kv\.congestion: 'prague' cannot carry ECT\(0\) packets "
                                          r"\(kv\.marking = 'classic'\)"):
        parse_kv({"marking": "classic", "congestion": "prague"}, None)
    classic, l4s = kv_marking("classic"), kv_marking("l4s")
    assert classic is not None and classic().codepoint(0.0) == ECT0  # unlike "none" on the wire
    assert l4s is not None and l4s().codepoint(0.0) == ECT1
    assert kv_marking("none") is None
    assert CE == 3  # (the counts' index order the controllers read)


# ------------------------------------------------------------------------------------------------ 6. SIGHUP
class _Notes:
    def ready(self, status: str) -> bool:
        return True

    def reloading(self) -> bool:
        return True

    def status(self, status: str) -> bool:
        return True

    def watchdog(self) -> bool:
        return True


def test_a_reload_says_when_the_swiftqueue_model_as_configured_would_not_load(tmp_path, caplog):
    pytest.importorskip("onnxruntime")
    runtime = pytest.importorskip("tokenwire.predictor.runtime")
    if not runtime.shipped_model_path().exists():
        pytest.skip("no shipped model in this checkout")
    model = tmp_path / "live.onnx"
    shutil.copy(runtime.shipped_model_path(), model)
    path = tmp_path / "tokenwire.toml"
    path.write_text(f'[marking]\npolicy = "swiftqueue"\nmodel = "{model}"\n')
    d = service.Daemon(service.load_config(path), notifier=_Notes())  # type: ignore[arg-type]

    async def reload() -> None:
        d.model_check = None
        assert d.reload() is True
        assert d.model_check is not None  # (on a worker thread: the event loop goes on)
        with contextlib.suppress(Exception):
            await d.model_check

    with caplog.at_level(logging.WARNING, logger="tokenwire.daemon"):
        asyncio.run(reload())  # the model loads: nothing to say
        assert "marking.model" not in caplog.text
        model.write_bytes(b"garbage")  # corrupted in place: the configuration did not change
        asyncio.run(reload())
        assert f"reload: marking.model: {model}" in caplog.text
        assert "a restart would fall back to the l4s policy" in caplog.text
        caplog.clear()
        path.write_text(f'[marking]\npolicy = "swiftqueue"\nmodel = "{tmp_path / "missing.onnx"}"\n')
        assert d.reload() is True  # no running loop: checked inline
        assert "changes to marking need a restart" in caplog.text
        assert "missing.onnx" in caplog.text and "a restart would fall back to the l4s policy" in caplog.text


def test_a_batch_of_acks_alone_takes_the_last_decision_without_asking_the_policy():
    """The server's QUIC ACKs of the client's ack datagrams were half of swiftqueue's inferences (5,701 policy calls
    for 2,939 token packets in a daemon run): packets that carry nothing but ACKs take the last decision."""
    policy = CountingPolicy(ECT1, ECT0)  # alternating: a new decision would differ from the last
    pair = MarkedPair(policy, client_reports_ecn=True)
    _stream_answer(pair, 10)
    srv = pair.server
    assert srv is not None
    calls, last, before = policy.calls, srv.current_codepoint, len(pair.batches)
    pair.client.quic.send_ping(1)  # ack-eliciting: the server answers with an ACK alone
    pair.exchange(rounds=20)
    acks = pair.batches[before:]
    assert acks and set(acks) == {(last, 1)}  # sent with the last answer...
    assert policy.calls == calls  # ...and nobody asked
