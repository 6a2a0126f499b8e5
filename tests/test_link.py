"""The trace-driven link in virtual time: rate, carry-over, delay, loss, records."""

import os

import pytest

from tokenwire.testbed.link import Link
from tokenwire.testbed.loss import parse_loss
from tokenwire.testbed.packet import NOT_ECT
from tokenwire.testbed.queues import DropTail, Packet, Queue
from tokenwire.testbed.trace import OPPORTUNITY_BYTES, fixed_rate_trace, load_trace

SHARED_TRACES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "traces")


def saturate(link, duration, size=1500, per_ms=40):
    """Offer far more than the link can carry (per_ms packets every ms) and collect deliveries."""
    delivered = []
    t = link.start
    step = 0.001
    while t < link.start + duration:
        for _ in range(per_ms):
            link.enqueue(Packet(size, NOT_ECT), t)
        delivered += link.dequeue_ready(t)
        t += step
    delivered += link.dequeue_ready(link.start + duration)
    return delivered


def windows_match_trace(link, delivered, trace, window_s, rel):
    worst = 0.0
    for w in range(int(1 / window_s), int(len(delivered) and delivered[-1].departure / window_s)):
        t0, t1 = w * window_s, (w + 1) * window_s
        got = sum(p.size for p in delivered if t0 < p.departure <= t1)
        cap = trace.bytes_between(t0 * 1000, t1 * 1000)
        if cap:
            worst = max(worst, abs(got - cap) / cap)
    assert worst <= rel, f"worst window error {worst:.3%}"
    return worst


def test_rate_follows_a_variable_trace_within_2_percent(tmp_path):
    # 4 Mbit/s for 500 ms, 24 Mbit/s for 500 ms, idle 200 ms, repeating
    lines = [str(3 * k) for k in range(1, 167)] + [str(500 + k // 2) for k in range(2, 1002)] + ["1200"]
    p = tmp_path / "var.trace"
    p.write_text("\n".join(lines) + "\n")
    trace = load_trace(p)
    link = Link(trace, Queue(), delay=0.0)
    delivered = saturate(link, 6.0)
    windows_match_trace(link, delivered, trace, 0.1, 0.02)


def test_bytes_carry_over_between_opportunities():
    link = Link(fixed_rate_trace(12), Queue())  # one 1500-byte opportunity per ms
    for _ in range(30):
        link.enqueue(Packet(1000, NOT_ECT), 0.0)
    out = link.dequeue_ready(1.0)
    # 1000-byte packets: three leave every two opportunities, none is lost to rounding
    assert len(out) == 30
    assert out[2].departure == pytest.approx(0.002)
    assert out[-1].departure == pytest.approx(0.020)
    assert sum(p.size for p in out) == 20 * OPPORTUNITY_BYTES


def test_delay_is_exact_without_rate_limit():
    link = Link(None, delay=0.0375)
    for i in range(100):
        link.enqueue(Packet(100, NOT_ECT), i * 0.0013)
    out = link.dequeue_ready(10.0)
    assert [p.delivery - p.arrival for p in out] == pytest.approx([0.0375] * 100, abs=1e-12)


def test_delay_is_exact_on_an_idle_traced_link():
    link = Link(fixed_rate_trace(12), Queue(), delay=0.020, start=5.0)
    pkt = link.enqueue(Packet(1500, NOT_ECT), 5.0034)
    # the next opportunity after 3.4 ms is at 4 ms; the opportunity at exactly an arrival is already gone
    assert link.next_event_time() == pytest.approx(5.024)
    assert link.dequeue_ready(5.0239) == []
    assert link.dequeue_ready(5.024) == [pkt]
    pkt2 = link.enqueue(Packet(1500, NOT_ECT), 5.030)
    link.dequeue_ready(6.0)
    assert pkt2.departure == pytest.approx(5.031)


def test_unused_opportunities_are_wasted():
    link = Link(fixed_rate_trace(12), Queue())
    link.enqueue(Packet(1500, NOT_ECT), 0.0)
    link.dequeue_ready(0.5)
    burst = [link.enqueue(Packet(1500, NOT_ECT), 0.5) for _ in range(3)]
    link.dequeue_ready(1.0)
    # 499 idle opportunities did not accumulate: the burst leaves one per ms
    assert [p.departure for p in burst] == pytest.approx([0.501, 0.502, 0.503])


@pytest.mark.skipif(not os.path.isdir(SHARED_TRACES), reason="shared traces not present")
def test_rate_follows_a_cellular_trace_within_2_percent():
    trace = load_trace(os.path.join(SHARED_TRACES, "Verizon-LTE-short.down"))
    link = Link(trace, Queue())
    delivered = saturate(link, 20.0, per_ms=8)
    windows_match_trace(link, delivered, trace, 1.0, 0.02)


def test_droptail_packet_and_byte_limits():
    # the packet handed to the link (waiting for its opportunity) is no longer in the queue, as in mahimahi
    link = Link(fixed_rate_trace(1), DropTail(packets=10))
    pkts = [link.enqueue(Packet(1500, NOT_ECT), 0.0) for _ in range(15)]
    assert [p.fate for p in pkts[11:]] == ["drop_tail"] * 4
    assert link.stats.tail_drops == 4 and len(link.queue) == 10 and link.backlog == 11
    link = Link(fixed_rate_trace(1), DropTail(bytes_=4000))
    pkts = [link.enqueue(Packet(1000, NOT_ECT), 0.0) for _ in range(7)]
    assert [p.fate for p in pkts] == ["queued"] * 5 + ["drop_tail"] * 2


def test_loss_pattern_depends_on_channel_time_only():
    trace = fixed_rate_trace(120)
    a = Link(trace, Queue(), loss=parse_loss("ge:0.02,0.2", seed=7), start=100.0)
    b = Link(trace, Queue(), loss=parse_loss("ge:0.02,0.2", seed=7), start=300.0)
    # different packet schedules, same seed: packets leaving in the same channel millisecond share a fate
    fate_a = {round((p.departure - 100.0) * 1000): p.fate for p in _run(a, 0.0007)}
    fate_b = {round((p.departure - 300.0) * 1000): p.fate for p in _run(b, 0.0011)}
    common = set(fate_a) & set(fate_b)
    assert len(common) > 1000
    assert all(fate_a[ms] == fate_b[ms] for ms in common)
    assert any(fate_a[ms] == "lost" for ms in common)
    # stationary bad share of ge:0.02,0.2 is 0.02/0.22 = 9 %
    assert 0.04 < a.stats.lost_packets / a.stats.arrived_packets < 0.15


def _run(link, gap):
    records = []
    link.on_record = records.append
    t = link.start
    while t < link.start + 5.0:
        link.enqueue(Packet(200, NOT_ECT), t)
        link.dequeue_ready(t)
        t += gap
    link.dequeue_ready(t + 1)
    return records


def test_records_carry_the_per_packet_log():
    records = []
    link = Link(fixed_rate_trace(12), DropTail(packets=2), delay=0.01, on_record=records.append)
    for _ in range(5):
        link.enqueue(Packet(1500, NOT_ECT), 0.0)
    link.dequeue_ready(1.0)
    fates = sorted(p.fate for p in records)
    assert fates == ["delivered"] * 3 + ["drop_tail"] * 2
    first, second = [p for p in records if p.fate == "delivered"][:2]
    # the first packet reached an idle link: no queueing, it waits 1 ms for its opportunity
    assert first.sojourn == 0.0 and first.delivery == pytest.approx(0.011)
    assert second.sojourn == pytest.approx(0.001) and second.delivery == pytest.approx(0.012)


def test_time_never_runs_backwards():
    link = Link(fixed_rate_trace(12), Queue(), delay=0.0)
    link.enqueue(Packet(1500, NOT_ECT), 0.0)
    assert len(link.dequeue_ready(0.010)) == 1
    late = link.enqueue(Packet(1500, NOT_ECT), 0.005)  # a caller with a stale clock
    assert late.arrival == 0.010
    assert link.dequeue_ready(0.020)[0] is late
    assert late.departure == pytest.approx(0.011)


def test_the_csv_packet_log_reaches_the_disk_while_packets_flow(tmp_path, monkeypatch):
    """`testbed up --log` could not be tailed: a few rows sat in the file buffer until teardown."""
    from tokenwire.testbed import pktlog

    clock = [100.0]
    monkeypatch.setattr(pktlog.time, "monotonic", lambda: clock[0])
    path = tmp_path / "log.csv"
    log = pktlog.CsvPacketLog(path)
    pkt = Packet(100, NOT_ECT)
    pkt.seq, pkt.arrival, pkt.fate = 1, 100.0, "delivered"
    log.record("down", pkt)
    assert len(path.read_text().splitlines()) <= 1  # buffered: writing every row would cost a syscall each
    clock[0] += pktlog.FLUSH_EVERY_S
    log.record("down", pkt)
    assert len(path.read_text().splitlines()) == 3  # header and both rows, before close
    log.close()


def test_a_closed_relay_drops_the_packets_still_in_their_delay(caplog):
    """They were sent on closed transports: asyncio logged "socket.send() raised exception." for each, a dozen
    lines at the end of every `tokenwire demo`."""
    import asyncio
    import logging
    import socket

    from tokenwire.testbed.udp_relay import UdpRelay

    async def go() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            server.bind(("127.0.0.1", 0))
            server.setblocking(False)
            relay = await UdpRelay(server.getsockname(), delay_ms=100).start()
            client.sendto(b"first", ("127.0.0.1", relay.port))
            loop = asyncio.get_running_loop()
            assert await asyncio.wait_for(loop.sock_recv(server, 100), 5) == b"first"  # the path is up
            for i in range(10):  # each held 100 ms by the relay
                client.sendto(b"%d" % i, ("127.0.0.1", relay.port))
            # received by the relay (counted on the up path; "first" was the 1st), still in their delay: without
            # this wait the test passed when the relay had not received them at all
            async with asyncio.timeout(5):
                while relay.up.packets < 11:
                    await asyncio.sleep(0.001)
            relay.close()
            # past their delay: their sends were scheduled 100 ms after receipt, before this later timer, and
            # asyncio runs timers in order
            await asyncio.sleep(0.2)
            got = 0
            while True:
                try:
                    server.recv(100)
                    got += 1
                except BlockingIOError:
                    return got

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        assert asyncio.run(go()) == 0
    assert "socket.send() raised exception" not in caplog.text
