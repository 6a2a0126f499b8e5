"""DualPI2 (RFC 9332, Linux 6.18 defaults) in virtual time, and queue spec parsing."""

import statistics

import pytest
from scapy.layers.inet import IP, UDP

from tokenwire.testbed.link import Link
from tokenwire.testbed.packet import CE, ECT0, ECT1, NOT_ECT, ecn_of
from tokenwire.testbed.queues import (
    DropTail,
    DualPI2,
    DualPI2Params,
    Packet,
    Queue,
    QueueSpecError,
    parse_queue,
)
from tokenwire.testbed.trace import fixed_rate_trace
from tokenwire.testbed.vsim import CbrFlow, RenoFlow, ScalableFlow, Simulation


def run(queue, flows, *, mbps=40, duration=30.0, delay=0.010):
    link = Link(fixed_rate_trace(mbps), queue, delay=delay)
    sim = Simulation(link)
    for f in flows:
        sim.add(f)
    sim.run(duration)
    return sim


def sojourns_ms(sim, queue, after=5.0):
    return sorted(
        p.sojourn * 1000 for p in sim.records if p.fate == "delivered" and p.queue == queue and p.arrival > after
    )


def test_defaults_are_linux_6_18():
    p = DualPI2Params()
    assert (p.target, p.tupdate, p.alpha, p.beta, p.k, p.step, p.c_protection) == (
        0.015,
        0.016,
        0.16,
        3.2,
        2.0,
        0.001,
        10,
    )
    assert p.drop_overload and p.limit == 10_000


def test_classification_on_ecn_bits():
    q = DualPI2()
    for ecn, want in ((NOT_ECT, "C"), (ECT0, "C"), (ECT1, "L"), (CE, "L")):
        pkt = Packet(100, ecn)
        q.enqueue(pkt, 0.0)
        assert pkt.queue == want
    assert (q.l_len, q.c_len) == (2, 2)


def test_l_queue_sojourn_stays_near_the_1ms_step_under_scalable_load():
    q = DualPI2()
    sim = run(q, [ScalableFlow(ack_delay=0.01) for _ in range(2)])
    so = sojourns_ms(sim, "L")
    assert len(so) > 20_000
    mean, p99 = statistics.mean(so), so[int(0.99 * len(so))]
    assert mean < 1.5 and p99 <= 3.0, (mean, p99)
    assert q.step_marks > 1000 and q.aqm_drops == 0


def test_c_queue_sits_near_the_15ms_target_under_classic_load():
    q = DualPI2()
    sim = run(q, [RenoFlow(ack_delay=0.01) for _ in range(2)])
    so = sojourns_ms(sim, "C")
    mean = statistics.mean(so)
    assert 11.0 < mean < 19.0, mean
    assert q.aqm_drops > 10  # Not-ECT Reno is controlled by PI drops (p_C = p'^2)
    # the same load through a deep drop-tail buffer queues far longer: the AQM is what holds 15 ms
    tail = run(DropTail(packets=1000), [RenoFlow(ack_delay=0.01) for _ in range(2)])
    assert statistics.mean(sojourns_ms(tail, "C")) > 3 * mean


def test_classic_ecn_flows_are_marked_not_dropped():
    q = DualPI2()
    sim = run(q, [RenoFlow(ecn=ECT0, ack_delay=0.01) for _ in range(2)], duration=15.0)
    assert q.pi_marks > 20 and q.aqm_drops == 0
    assert 9.0 < statistics.mean(sojourns_ms(sim, "C")) < 20.0


@pytest.mark.parametrize("wc", [10, 30, 50])
def test_classic_protection_gives_c_its_wrr_share_under_contention(wc):
    # PI frozen (alpha = beta = 0) to isolate the scheduler; both queues stay backlogged all run long
    q = parse_queue(f"dualpi2:alpha=0,beta=0,limit=100000,c_protection={wc}")
    sim = run(
        q, [CbrFlow(48e6, ecn=ECT1, stop=5.0), CbrFlow(48e6, ecn=NOT_ECT, stop=5.0)], mbps=24, duration=5.0, delay=0.0
    )
    sent = {"L": 0, "C": 0}
    for p in sim.records:
        if p.fate == "delivered":
            sent[p.queue] += p.size
    assert q.l_len > 0 and q.c_len > 0
    assert sent["C"] / (sent["L"] + sent["C"]) == pytest.approx(wc / 100, abs=0.005)


def test_l_has_priority_when_c_is_light():
    q = DualPI2()
    sim = run(q, [ScalableFlow(ack_delay=0.01), CbrFlow(2e6, ecn=NOT_ECT)], mbps=24, duration=10.0)
    c = sojourns_ms(sim, "C", after=3.0)
    assert c and statistics.median(c) <= 3.0  # a light classic flow is not starved behind L


def test_pi_update_follows_the_rfc_9332_formula():
    q = DualPI2()
    q.enqueue(Packet(1500, NOT_ECT), 0.0)
    assert q.next_timer() == pytest.approx(0.016)
    q.on_timer(0.016)
    # p' = alpha*(qdelay - target) + beta*(qdelay - prev) with qdelay = 16 ms head sojourn
    assert q.prob == pytest.approx(0.16 * (0.016 - 0.015) + 3.2 * 0.016)
    p1 = q.prob
    q.on_timer(0.032)
    assert q.prob == pytest.approx(p1 + 0.16 * (0.032 - 0.015) + 3.2 * (0.032 - 0.016))
    assert q.next_timer() == pytest.approx(0.048)


def test_idle_queue_decays_probability_then_stops_ticking():
    q = DualPI2()
    q.prob = 0.01
    q.enqueue(Packet(100, NOT_ECT), 0.0)
    q.dequeue(0.001)
    t = q.next_timer()
    while t is not None and t < 1.0:
        q.on_timer(t)
        t = q.next_timer()
    assert q.prob == 0.0 and t is None
    q.enqueue(Packet(100, NOT_ECT), 5.003)
    assert q.next_timer() == pytest.approx(5.008)  # back on the original 16 ms grid


def test_no_mark_or_drop_below_two_mtu_backlog():
    q = DualPI2()
    q.prob = 1.0  # would drop every classic packet with p_C = 1
    for _ in range(2):
        q.enqueue(Packet(1500, NOT_ECT), 0.0)
    assert q.dequeue(0.0005) is not None  # 1500 B left behind: below 2 MTU, no drop
    assert q.dequeue(0.0005) is not None
    for _ in range(4):
        q.enqueue(Packet(1500, NOT_ECT), 0.0)
    got = q.dequeue(0.0005)  # 4500 B behind the first: it is dropped, and so is the next; then < 2 MTU
    assert q.aqm_drops == 2 and got is not None


def test_overload_drops_l_packets_classically():
    q = DualPI2(DualPI2Params(seed=3))
    q.prob = 0.6  # k * p' = 1.2 > 1: overload
    for _ in range(4000):
        q.enqueue(Packet(1500, ECT1), 0.0)
    sent = []
    while (pkt := q.dequeue(0.0)) is not None:
        sent.append(pkt)
    dropped = q.aqm_drops / 4000
    assert dropped == pytest.approx(0.36, abs=0.03)  # p'^2
    assert all(p.ecn_out == CE for p in sent[:-2])  # survivors are marked


def test_without_drop_on_overload_probability_is_capped_and_l_is_only_marked():
    q = parse_queue("dualpi2:drop_overload=0")
    for _ in range(200):
        q.enqueue(Packet(1500, ECT1), 0.0)
    for i in range(1, 200):
        q.on_timer(0.016 * i)  # a standing 3 s queue drives p' up
    assert q.prob == pytest.approx(0.5)  # 1/k
    while q.dequeue(4.0) is not None:
        pass
    assert q.aqm_drops == 0


def test_step_marks_real_bytes_and_fixes_the_ipv4_checksum():
    raw = bytes(IP(src="10.0.0.1", dst="10.0.0.2", tos=0xB8 | ECT1) / UDP(sport=1, dport=2) / (b"x" * 1000))
    link = Link(fixed_rate_trace(12), DualPI2())
    for _ in range(5):
        link.enqueue(raw, 0.0)
    out = link.dequeue_ready(0.1)
    assert len(out) == 5
    # 1028-byte packets: the first goes to the idle link at once, the second when the first has left at
    # 1 ms (sojourn 1 ms: not above the step), the others at 2, 3, 3 ms: marked
    assert [p.sojourn for p in out] == pytest.approx([0.0, 0.001, 0.002, 0.003, 0.003])
    assert [ecn_of(p.data) for p in out] == [ECT1, ECT1, CE, CE, CE]
    for p in out[2:]:
        ip = IP(p.data)
        assert ip.tos == 0xB8 | CE
        stored = ip.chksum
        del ip.chksum
        assert IP(bytes(ip)).chksum == stored  # scapy recomputes the header checksum independently


def test_not_ect_in_l_over_the_step_is_dropped():
    q = DualPI2()
    pkt = Packet(1500, NOT_ECT)
    pkt.queue = "L"
    q._l.append(pkt)  # a Not-ECT packet classified into L (only possible via filters in Linux)
    q.backlog_bytes += 1500
    assert q.dequeue(0.005) is None and q.aqm_drops == 1


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("droptail", "needs packets=N or bytes=N"),
        ("droptail:packets=x", "not a int"),
        ("droptail:packets=0", "zero limit"),
        ("droptail:foo=1", "unknown droptail key"),
        ("dualpi2:target=abc", "not a duration"),
        ("dualpi2:bogus=1", "unknown dualpi2 key"),
        ("dualpi2:c_protection=150", "c_protection <= 100"),
        ("dualpi2:drop_overload=2", "drop_overload is 0 or 1"),
        ("red", "unknown queue"),
        ("droptail:packets", "expected key=value"),
        ("dualpi2:alpha=nan,beta=nan", "alpha='nan' is not a finite number"),  # was accepted: AQM off
        ("dualpi2:k=inf", "not a finite number"),
    ],
)
def test_bad_queue_specs(spec, message):
    with pytest.raises(QueueSpecError, match=message):
        parse_queue(spec)


def test_queue_specs():
    assert isinstance(parse_queue("infinite"), Queue)
    dt = parse_queue("droptail:packets=50,bytes=60000")
    assert isinstance(dt, DropTail) and dt.max_packets == 50 and dt.max_bytes == 60000
    q = parse_queue("dualpi2:target=5ms,tupdate=2000us,step=0.5ms,k=1.5,c_protection=20")
    assert isinstance(q, DualPI2)
    assert (q.p.target, q.p.tupdate, q.p.step, q.p.k, q.p.c_protection) == pytest.approx(
        (0.005, 0.002, 0.0005, 1.5, 20)
    )
