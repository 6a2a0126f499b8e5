"""The metric definitions, checked on hand-computed timelines."""

import math

import pytest

from tokenwire.transport.metrics import (
    oracle_render_times,
    percentile,
    stall_ratio,
    stall_times,
    summarize,
)


def test_no_stall_when_every_token_arrives_after_base_delay():
    gen = [0.0, 0.1, 0.2, 0.3]
    render = [g + 0.05 for g in gen]
    assert stall_ratio(gen, render, 0.05) == 0.0


def test_single_late_token_blocks_followers():
    # token 1 is 0.2 s late; token 2 (ideal 0.25) renders right after it, so it adds no stall of its own
    gen = [0.0, 0.1, 0.2, 0.3]
    render = [0.05, 0.35, 0.35, 0.35]
    s = stall_times(gen, render, 0.05)
    assert s == pytest.approx([0.0, 0.2, 0.0, 0.0])
    assert stall_ratio(gen, render, 0.05) == pytest.approx(0.2 / (0.35 - 0.05))


def test_an_answer_rendered_at_once_is_not_read_as_stalled():
    """50 tokens generated within 50 us and rendered 40 us apart in two datagrams: the plain ratio divides
    tens of microseconds by tens of microseconds (0.97 was reported, "longest stall 0 ms"); the period counts
    as at least 100 ms, so it is about 0.0004."""
    gen = [i * 1e-6 for i in range(50)]
    render = [0.010 + (0 if i < 25 else 40e-6) for i in range(50)]
    ratio = stall_ratio(gen, render, 0.010)
    assert 0 < ratio < 0.001
    assert ratio == pytest.approx(sum(stall_times(gen, render, 0.010)) / 0.1)
    assert stall_ratio([0.0], [0.25], 0.05) == pytest.approx(1.0)  # one token 200 ms late: all of it stalled


def test_stall_ratio_only_counts_rendered_prefix():
    gen = [0.0, 0.1, 0.2]
    render = [0.05, 0.15, math.nan]
    assert stall_ratio(gen, render, 0.05) == 0.0
    st = summarize(gen, render, base_delay=0.05)
    assert st.tokens_rendered == 2 and st.tokens_sent == 3


def test_percentile_interpolates():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    assert math.isnan(percentile([], 50))


def test_oracle_uses_first_delivered_packet_sent_after_generation():
    gen = [0.0, 0.1, 0.2]
    # packet sent at 0.0 arrives 0.05; packet sent at 0.1 was lost; packet sent at 0.15 arrives at 0.3
    deliveries = [(0.0, 0.05), (0.15, 0.30), (0.2, 0.25)]
    r = oracle_render_times(gen, deliveries)
    assert r == pytest.approx([0.05, 0.25, 0.25])  # token 1 can ride the packet sent at 0.2 (arrives 0.25)


def test_oracle_nan_after_last_packet():
    r = oracle_render_times([0.0, 1.0], [(0.0, 0.05)])
    assert r[0] == 0.05 and math.isnan(r[1])


def test_summarize_fields():
    gen = [0.0, 0.1, 0.2, 0.3]
    render = [0.06, 0.16, 0.46, 0.46]
    st = summarize(gen, render, base_delay=0.05, request_time=-0.2, wire_bytes=400)
    assert st.ttft_ms == pytest.approx(260.0)
    assert st.bytes_per_token == 100.0
    assert st.longest_stall_ms == pytest.approx(210.0)  # 0.46 - (0.2 + 0.05)
    assert st.stalls_over_200ms == 1
    assert st.p99_token_delay_ms > st.p50_token_delay_ms


@pytest.mark.parametrize("attach", [False, True])
def test_an_attached_answer_reports_no_stall_it_cannot_measure(attach):
    """Attaching to a finished answer reported a stall ratio of 1.0 (every token "late"), and the daemon
    counted it in its client stall histogram."""
    from tokenwire.transport.chat_stats import stats_from_outcome
    from tokenwire.transport.frames import Report, Request
    from tokenwire.transport.session_events import ClientReport, RequestFinished
    from tokenwire.transport.transcript import Transcript

    from .quicpair import Pair

    pair = Pair()
    pair.exchange(rounds=40)
    rid = b"r" * 16
    request = Request(messages=[{"role": "user", "content": "x"}]) if not attach else Request(resume_id=rid,
                                                                                              resume_from=0)
    sid = pair.client.start_request(request, pair.now)
    pair.exchange(rounds=20)
    done = Transcript()
    for i in range(20):
        done.append(f"t{i} ".encode(), pair.now - 5.0 + 0.05 * i)  # generated seconds before the request
    done.finish("stop")
    pair.server.accept(sid, transcript=done, request_id=rid)
    pair.exchange(rounds=200)
    (fin,) = [e for e in pair.client_events if isinstance(e, RequestFinished)]
    stats = stats_from_outcome(fin.result)
    (report,) = [e.report for e in pair.server_events if isinstance(e, ClientReport)]
    assert isinstance(report, Report) and fin.result.digest_ok
    if attach:
        assert math.isnan(stats.stall_ratio) and report.stall_ratio is None and "n/a" in str(stats)
        # nor a time to first token: the answer predates the request (attaching to a finished one "took"
        # 1 ms, and every resume pulled the daemon's TTFT histogram towards zero)
        assert math.isnan(stats.ttft_ms) and report.ttft_ms is None and "TTFT n/a" in str(stats)
    else:
        assert stats.stall_ratio > 0.5 and report.stall_ratio is not None  # a fresh request: real waiting
