"""``tokenwire bench daemon``'s delay figures: steady state apart from the answers' starts, the time to first token,
generation's lateness against its schedule, and a warning when the run measured a backlog rather than latency.

A 200-session run's p99 token delay came entirely from tokens generated while other sessions were still
handshaking, and a run asking ~102,000 tokens/s took 4-7 s per 1-s answer with a p99 that looked fine (delays
count from the actual, late, generation time): the summary said neither.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.ports import free_tcp_port, free_udp_port
from tokenwire.daemon import bench_daemon
from tokenwire.daemon.cli import main


def _answer(first_gen_s: float, gen_s: list[float], delays_ms: list[float], ttft_ms: float | None = 10.0) -> dict:
    return {"first_gen_s": first_gen_s, "gen_s": gen_s, "delays_ms": delays_ms, "ttft_ms": ttft_ms}


def test_steady_state_keeps_only_tokens_generated_after_the_last_answer_began():
    """Two answers: the first begins at 100 s and its tokens before 105 s (when the second begins) are slow, as
    under a handshake storm; the steady state is the tokens from 105 s on, of both answers."""
    early = _answer(100.0, [0.0, 1.0, 5.0, 6.0], [900.0, 800.0, 2.0, 4.0])
    late = _answer(105.0, [0.0, 1.0], [3.0, 5.0])
    out = bench_daemon.delay_summary([early, late], [0.0, 1.0, 5.0, 6.0])
    assert out["steady_state_tokens"] == 4
    assert out["steady_state_p50_token_delay_ms"] == pytest.approx(3.5)
    assert out["steady_state_p99_token_delay_ms"] < 10.0
    assert out["p99_token_delay_ms"] > 700.0  # (the overall figure keeps the storm's tokens)
    assert out["steady_state_after_s"] == pytest.approx(5.0)


def test_generation_lateness_is_measured_against_the_schedule_from_the_first_token():
    """Generation ran 0, 0.5 and 2 s behind a 1-token-per-second schedule; the delays (render minus the actual
    generation) are all 1 ms and cannot show it."""
    out = bench_daemon.delay_summary([_answer(50.0, [0.0, 1.5, 4.0], [1.0, 1.0, 1.0])], [0.15, 1.15, 2.15])
    assert out["generation_late_max_ms"] == pytest.approx(2000.0)
    assert out["generation_late_p50_ms"] == pytest.approx(500.0)
    assert out["p99_token_delay_ms"] == pytest.approx(1.0)


def test_time_to_first_token_percentiles_skip_answers_without_one():
    answers = [_answer(1.0, [0.0], [1.0], 100.0), _answer(1.0, [0.0], [1.0], None), _answer(1.0, [0.0], [1.0], 300.0)]
    out = bench_daemon.delay_summary(answers, [0.0])
    assert out["p50_ttft_ms"] == pytest.approx(200.0)
    assert out["p99_ttft_ms"] == pytest.approx(298.0)


def test_no_answer_ended_gives_no_figures_not_a_crash():
    out = bench_daemon.delay_summary([], [0.15])
    assert out["steady_state_tokens"] == 0
    assert all(v != v for k, v in out.items() if k != "steady_state_tokens")  # NaN: null in the JSON


def test_a_run_that_could_not_carry_its_load_is_called_a_backlog():
    ok = {"serving_span_s": 1.6, "scheduled_span_s": 1.2, "generation_late_p99_ms": 20.0}
    assert bench_daemon.overload_reasons(ok) == []
    # the 4 x 64 answers at 400 tokens/s: 1-s answers served over 6 s
    slow = {**ok, "serving_span_s": 6.1}
    (reason,) = bench_daemon.overload_reasons(slow)
    assert "serving took 6.1 s for a scheduled 1.2 s" in reason
    # generation ran 3 s late while the span stayed within bounds
    late = {**ok, "generation_late_p99_ms": 3000.0, "generation_late_max_ms": 3400.0}
    (reason,) = bench_daemon.overload_reasons(late)
    assert "p99 3,000 ms, max 3,400 ms" in reason
    # a tiny run's handshakes alone make 1.5 x: not a backlog
    assert bench_daemon.overload_reasons({**ok, "serving_span_s": 0.5, "scheduled_span_s": 0.26}) == []
    # no answer ended: no lateness to judge (NaN)
    assert bench_daemon.overload_reasons({**ok, "generation_late_p99_ms": float("nan")}) == []


def test_the_summary_names_each_figure_and_the_warning_says_what_to_do(capsys):
    out = {"p50_token_delay_ms": 1.0, "p99_token_delay_ms": 900.0, "steady_state_p50_token_delay_ms": 1.0,
           "steady_state_p99_token_delay_ms": 5.0, "steady_state_tokens": 1000, "steady_state_after_s": 40.0,
           "p50_ttft_ms": 150.0, "p99_ttft_ms": None, "generation_late_p50_ms": 0.1,
           "generation_late_p99_ms": 3.0, "generation_late_max_ms": 4.0, "serving_span_s": 60.0,
           "scheduled_span_s": 22.0}
    text = "\n".join(bench_daemon.summary_lines(out))
    assert "steady state (the 1,000 tokens generated after every answer began, 40.0 s after the first)" in text
    assert "p99 5.0 ms" in text and "p99 - ms" in text  # (null: no figure, not "None")
    assert set(bench_daemon.MEANINGS)  # the JSON carries what each figure means


def test_port_and_metrics_options_reach_the_daemon_and_the_json_has_the_new_figures(tmp_path: Path, capsys):
    port, mport = free_udp_port(), free_tcp_port()
    out = tmp_path / "bench.json"
    assert main(["bench", "daemon", "--sessions", "2", "--rate", "200", "--seconds", "0.1", "--client-procs", "1",
                 "--port", str(port), "--metrics-listen", f"127.0.0.1:{mport}", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    err = captured.err
    assert f"on udp/{port}:" in err and f"metrics on http://127.0.0.1:{mport}/metrics" in err
    result = json.loads(out.read_text())
    assert result["steady_state_tokens"] > 0 and result["p50_ttft_ms"] > 0
    assert result["generation_late_max_ms"] is not None and result["scheduled_span_s"] > 0.1
    assert isinstance(result["overloaded"], bool) and "meanings" in result
    # the summary on stdout, as every benchmark's table; the JSON only in the file (it was printed whole as well,
    # some 50 lines, with or without --json)
    assert "p99_token_delay_ms" in result and "time to first token" in captured.out
    assert "{" not in captured.out


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "--port must be in [0, 65535], got 70000"),
    (["--metrics-listen", "nowhere"], "--metrics-listen: expected 'host:port'"),
])
def test_bad_port_options_are_refused_before_anything_starts(argv, message, capsys):
    assert main(["bench", "daemon", "--sessions", "1", "--seconds", "1", *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_late_first_token_counts_late_not_the_rest_early():
    """Measured from the first token, a first token 300 ms late made the on-time rest read 300 ms early."""
    out = bench_daemon.delay_summary([_answer(50.0, [0.0, 0.7, 1.7], [1.0, 1.0, 1.0])], [0.15, 1.15, 2.15])
    assert out["generation_late_max_ms"] == pytest.approx(300.0)
    assert out["generation_late_p50_ms"] == pytest.approx(0.0)
