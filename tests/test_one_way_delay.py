"""One-way delay from ACK timestamps on two clocks (``transport/one_way_delay.py``). The server took the client's
receive time minus its own send time as the delay: right in the testbed (one clock), off by the clocks' offset
anywhere else (seconds, either sign), which made SwiftQueue's latency features meaningless."""

from __future__ import annotations

import random

import pytest

from tokenwire.transport.one_way_delay import OneWayDelay


def _path(n: int, seconds: float, seed: int = 0):
    """(sent_at, ack_at, true one-way ms): 40 ms each way plus a queue of 0-60 ms on the way down."""
    rng = random.Random(seed)
    for i in range(n):
        sent = i * seconds / n
        down = 40.0 + (0.0 if i % 50 == 0 else rng.uniform(0, 60))  # the queue drains now and then
        yield sent, sent + (down + 40.0) / 1000.0, down


def test_one_clock_gives_the_samples_as_measured():
    est = OneWayDelay()
    for sent, ack, down in _path(2000, 120):
        assert est.latency_ms(sent, ack, down) == down
    assert not est.offset_corrected


@pytest.mark.parametrize("offset_ms", [1_000_000.0, -3_000.0, -45.0, 95.0])
def test_a_client_clock_offset_is_removed(offset_ms):
    """Offsets a round trip or more away: half the round trip stands in for the propagation delay (exact on
    this symmetric path), the queueing is kept."""
    est = OneWayDelay()
    errors = [est.latency_ms(sent, ack, down + offset_ms) - down for sent, ack, down in _path(2000, 120)]
    assert est.offset_corrected
    assert max(abs(e) for e in errors[50:]) < 1e-6  # from the first drained queue on: exact
    assert max(abs(e) for e in errors) <= 60.0  # before it: off by the first samples' queueing at most


def test_a_drifting_offset_is_followed_within_the_window():
    """A quartz clock drifts ~20 ppm: 1.2 ms a minute. Over 20 minutes the error stays within the window's lag
    (5 minutes: 6 ms), where one fixed minimum would be 24 ms off by the end."""
    est = OneWayDelay()
    worst = 0.0
    for sent, ack, down in _path(24_000, 1200):
        offset = 5_000.0 + 1.2 * sent / 60.0  # seconds apart, and growing
        got = est.latency_ms(sent, ack, down + offset)
        if sent > 60:
            worst = max(worst, abs(got - down))
    assert est.offset_corrected and worst < 7.5


def test_a_standing_queue_on_one_clock_is_kept():
    """The round-trip minimum was kept for ever while the base expired after 5 minutes: a queue standing
    longer than that looked like a clock offset and was subtracted (40 ms reported as 10)."""
    est = OneWayDelay()
    for i in range(12_000):  # 20 minutes at 10 Hz: 1 empty minute, then 30 ms of standing queue
        sent = i / 10.0
        down = 10.0 if sent < 60 else 40.0
        assert est.latency_ms(sent, sent + (down + 10.0) / 1000.0, down) == down
    assert not est.offset_corrected


def test_minima_expire_by_age_on_a_connection_that_is_mostly_idle():
    """Buckets were dropped by count: one short answer every 30 minutes kept minima from hours back, and a
    drifting offset (20 ppm) was then off by 144 ms instead of a few."""
    est = OneWayDelay()
    worst = 0.0
    for burst in range(6):  # a 10-s answer every 30 minutes
        for i in range(100):
            sent = burst * 1800.0 + i / 10.0
            offset = 5_000.0 + 1.2 * sent / 60.0
            worst = max(worst, abs(est.latency_ms(sent, sent + 0.020, 10.0 + offset) - 10.0))
    assert est.offset_corrected and worst < 1.0
