"""A connection measured steady floors the guard's low quantile (``kv_controller.STABLE_SHARE``).

The ONNX forecaster's low quantile stays ~0.5 of its median even after 8 identical samples, and the guard goes below
it by that spread once more: on a fixed 50 Mbit/s link with a 1-s deadline the middle chunks were guarded at ~0.35 of
the median and went mostly ``low`` where all-``medium`` met every deadline. The connection's link prior (its chunk
rates' median and 10 % quantile) says how far this link has actually fallen; where its low share is at least
``STABLE_SHARE`` it floors the low quantile, and below that nothing changes.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tokenwire.transport.kv_channel import KVChunkNeeded, ServerTuning
from tokenwire.transport.kv_controller import GUARD_WEIGHT, LEVELS, STABLE_SHARE, ChunkOptions, KVController
from tokenwire.transport.kv_server_session import LINK_MIN_SAMPLES

from .test_kv_channel import MODEL

MED = 50e6  # bit/s
LOW = 0.5 * MED  # what the ONNX forecaster's low quantile says of such a link
# SmolLM2-135M, 1024 tokens in 4 chunks of 256: about what kv_vsim sends per level
SIZES = {"low": 660_000, "medium": 890_000, "high": 1_220_000}


def _four() -> list[ChunkOptions]:
    return [ChunkOptions(dict(SIZES), 1024, 3.5) for _ in range(4)]


def _choose(share: float | None, time_left_s: float = 0.5):
    # the second of four chunks (3 left), measured forecast: a middle chunk, guarded at GUARD_WEIGHT
    return KVController("tokenwire").choose(_four()[1:], time_left_s=time_left_s, inflight_bytes=0, median_bps=MED,
                                            low_bps=LOW, sample_age_s=0.0, link_low_share=share)


def test_a_steady_link_prior_lifts_the_guard_to_near_the_median():
    before = _choose(None)
    # the forecaster's spread, raised to the guard weight: ~0.35 of the median, so the chunk goes low
    assert before.bandwidth_bps == pytest.approx(LOW**GUARD_WEIGHT * MED ** (1 - GUARD_WEIGHT))
    assert before.level == "low"
    steady = _choose(0.997)  # 16 chunk rates within 0.3 % of each other
    assert steady.bandwidth_bps > 0.99 * MED
    assert LEVELS.index(steady.level) > LEVELS.index("low"), steady
    # the plan at the median is unchanged: only the guard moved
    assert steady.planned[1:] == before.planned[1:]


@pytest.mark.parametrize("share", [STABLE_SHARE - 0.01, 0.6, 0.3, float("nan")])
def test_a_link_prior_below_the_threshold_changes_nothing(share):
    # a share above the forecaster's own (0.6 > 0.5) still leaves its low quantile: the link was measured to vary
    assert _choose(share) == _choose(None)


def test_the_floor_only_raises_the_low_quantile_and_spares_cold_decisions_and_other_rules():
    c = KVController("tokenwire")
    three = _four()[1:]
    # a forecaster already surer than the link prior keeps its own low quantile
    sure = c.choose(three, time_left_s=0.5, inflight_bytes=0, median_bps=MED, low_bps=0.99 * MED,
                    link_low_share=0.9)
    assert sure.bandwidth_bps == pytest.approx((0.99 * MED) ** GUARD_WEIGHT * MED ** (1 - GUARD_WEIGHT))
    # a cold decision plans on the prior it was given (the link prior itself in a session), the floor aside
    cold = [c.choose(three, time_left_s=0.5, inflight_bytes=0, median_bps=None, low_bps=None, link_low_share=x)
            for x in (None, 0.997)]
    assert cold[0] == cold[1]
    # legacy and even-split ignore it
    for ctl in (KVController("tokenwire", legacy=True), KVController("even-split")):
        a = ctl.choose(three, time_left_s=0.5, inflight_bytes=0, median_bps=MED, low_bps=LOW)
        assert ctl.choose(three, time_left_s=0.5, inflight_bytes=0, median_bps=MED, low_bps=LOW,
                          link_low_share=0.997) == a


def _session_fetch(rates: list[float]):
    """A server session whose connection has measured ``rates`` (bit/s), and a 1-s fetch of 4 chunks of 256 tokens
    accepted at t = 0 whose forecaster has this fetch's own samples: median 50 Mbit/s, low quantile 25."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    from tokenwire.transport.frames import KvFetch, StreamDecoder
    from tokenwire.transport.kv_channel import ContextPlan, KVServerSession, ServerFetch

    quic = QuicConnection(configuration=QuicConfiguration(is_client=True))
    quic._loss._rtt_min, quic._loss._rtt_smoothed, quic._loss._rtt_initialized = 0.04, 0.04, True
    session = KVServerSession(quic, tuning=ServerTuning(forecaster="ewma", prior_bps=5e6))
    session.link_rates.extend(rates)
    plan = ContextPlan(1024, [256] * 4, [256 * 11520] * 4, [dict(SIZES) for _ in range(4)], (30, 3, 64), 0,
                       "float16")
    f = ServerFetch(0, KvFetch(model=MODEL, deadline_ms=1000, token_ids=[1] * 1024, recompute_us_per_token=13710),
                    StreamDecoder(), 0.0)
    session.fetches[0] = f
    session.start(0, plan, 0.0)
    # the second chunk's decision, 0.36 s in: the first chunk is acknowledged and sampled
    f.next_index, f.samples = 1, 1
    f.forecaster = SimpleNamespace(forecast=lambda: SimpleNamespace(median_bps=MED, low_bps=LOW))
    return session, f


@pytest.mark.parametrize(("rates", "lifted"), [
    ([MED * (1 - 0.0002 * i) for i in range(16)], True),  # a fixed link: 10 % quantile 0.997 of the median
    ([MED * (0.7 + 0.03 * i) for i in range(16)], False),  # one that varies: 0.78, just under STABLE_SHARE
    ([MED] * (LINK_MIN_SAMPLES - 1), False),  # too few rates for a link prior of its own
])
def test_the_session_passes_its_link_prior_to_the_decision(rates, lifted):
    session, f = _session_fetch(rates)
    [ev] = session.poll(0.36)
    assert isinstance(ev, KVChunkNeeded) and ev.index == 1
    assert (ev.level != "low") is lifted, (ev, f.decisions[-1])
