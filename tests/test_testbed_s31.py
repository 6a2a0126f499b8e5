"""Testbed paths that pass the gap rule yet can never connect (too few delivery opportunities in 30 s), a
droptail byte limit below one packet, ``compare``'s last progress line without a terminal, ``backend`` in the
``kv`` JSON, and the messages of an empty ``--schemes`` and a NaN/infinite rate."""

from __future__ import annotations

import glob
import json
from array import array
from typing import Any

import pytest

from tokenwire.daemon.cli import main
from tokenwire.testbed import compare, emulator, kv_eval, netns, topology
from tokenwire.testbed.compare import SchemeRun
from tokenwire.testbed.queues import QueueSpecError, parse_queue
from tokenwire.testbed.trace import Trace, TraceError, trace_from_spec


def _no_testbed(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("a testbed was built")


# -- 1. enough delivery opportunities in every 30 s ---------------------------------------------------------------
def _gap29(tmp_path: Any) -> str:
    path = tmp_path / "gap29.trace"
    path.write_text("29000\n")  # one opportunity per 29 s: no gap over 30 s, failed ~32 s after the build
    return str(path)


@pytest.mark.parametrize("spec", ["450bps", "1kbps", "1500bps", "1999bps", "gap29"])
def test_a_trace_with_too_few_opportunities_in_30_s_is_refused(spec, tmp_path):
    """450 bit/s and one opportunity per 29 s passed the gap rule and failed ~32 s later; 1 and 1.5 kbit/s 80-90 s
    later."""
    spec = _gap29(tmp_path) if spec == "gap29" else spec
    emulator.check_trace_gaps(spec)  # the gap rule alone lets each through
    with pytest.raises(TraceError, match=r"only \d delivery opportunit(y|ies) in the 30 s .* at least 5 needed"):
        emulator.check_trace_usable(spec)
    with pytest.raises(TraceError, match="only"):
        emulator.check_trace_opportunities(spec)


def test_the_count_and_place_of_the_worst_30_s_are_named(tmp_path):
    with pytest.raises(TraceError, match=r"^450bps: only 1 delivery opportunity in the 30 s after 0 s into"):
        emulator.check_trace_usable("450bps")
    with pytest.raises(TraceError, match=r"only 4 delivery opportunities .*at least 2 kbit/s"):
        emulator.check_trace_usable("1999bps")
    busy_then_sparse = tmp_path / "sparse.trace"  # 100 opportunities in the first second, then 3 in 59 s
    busy_then_sparse.write_text("".join(f"{t}\n" for t in [*range(10, 1010, 10), 21000, 41000, 60000]))
    with pytest.raises(TraceError, match=r"only 1 delivery opportunity in the 30 s after 1 s into the trace"):
        emulator.check_trace_usable(str(busy_then_sparse))


def test_the_window_wraps_around_the_repeat(tmp_path):
    """A trace repeats shifted by its last timestamp: a sparse end joined to a sparse start is a sparse stretch,
    though each end alone holds few opportunities in under 30 s."""
    wrap = tmp_path / "wrap.trace"
    # period 60 s: 2 opportunities in the first 15 s, one a second from 16 to 45 s, 2 in the last 15 s. Every 30 s
    # within one period overlaps the dense middle by 15 s; the last 15 s joined to the next period's first do not.
    stamps = [14000, 15000, *range(16000, 46000, 1000), 46000, 60000]
    wrap.write_text("".join(f"{t}\n" for t in stamps))
    with pytest.raises(TraceError, match=r"only 4 delivery opportunities in the 30 s after 43 s into the trace"):
        emulator.check_trace_usable(str(wrap))


def test_the_span_matches_a_count_over_every_window():
    """:func:`longest_span_ms` against counting the opportunities of each 30-s window by hand (ms steps)."""
    import random

    rng = random.Random(7)
    for _ in range(40):
        stamps = sorted(rng.randint(0, 40_000) for _ in range(rng.randint(1, 12)))
        stamps[-1] = max(stamps[-1], 1)
        trace = Trace(array("q", stamps))
        period = stamps[-1]
        times = [c * period + s for c in range(8) for s in stamps]
        fewest = min(sum(1 for x in times if t < x <= t + 30_000) for t in range(0, period, 1 + period // 500))
        for count in (1, 3, 5):
            assert (emulator.longest_span_ms(trace, count)[0] <= 30_000) == (fewest >= count), (stamps, count)


@pytest.mark.parametrize("spec", ["2kbps", "3kbps", "12mbps", "100gbps"])
def test_usable_rates_are_accepted(spec):
    emulator.check_trace_usable(spec)


def test_the_shared_traces_are_accepted():
    paths = glob.glob("/work/shared/traces/*.down") + glob.glob("/work/shared/traces/*.up")
    if not paths:
        pytest.skip("no shared traces here")
    for path in paths:
        emulator.check_trace_usable(path)  # (their tightest: 5 opportunities within 16.3 s, Verizon-EVDO)


def test_a_five_million_line_trace_is_checked_in_one_pass():
    """O(n) in numpy blocks: a per-window Python loop over 5 million lines took minutes."""
    import numpy as np

    stamps = np.cumsum(np.random.default_rng(0).integers(0, 3, 5_000_000)).astype(np.int64) + 1
    trace = Trace(array("q", stamps.tobytes()))
    n, period = len(stamps), int(stamps[-1])
    wrapped = max(int(stamps[i + 5 - n]) + period - int(stamps[i]) for i in range(n - 5, n))
    assert emulator.longest_span_ms(trace, 5)[0] == max(int((stamps[5:] - stamps[:-5]).max()), wrapped)


@pytest.mark.parametrize("command", ["compare", "up", "kv", "swiftqueue"])
@pytest.mark.parametrize("spec", ["450bps", "gap29"])
def test_the_commands_refuse_it_before_building_anything(command, spec, tmp_path, monkeypatch, capsys):
    spec = _gap29(tmp_path) if spec == "gap29" else spec
    monkeypatch.setattr(netns, "check_root", lambda: None)
    monkeypatch.setattr(topology.Testbed, "__init__", _no_testbed)
    assert main(["testbed", command, "--down-trace", spec]) == 2
    err = capsys.readouterr().err
    assert f"{spec}: only 1 delivery opportunity in the 30 s" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("option", ["--down-trace", "--up-trace"])
def test_either_direction_is_checked(option, monkeypatch, capsys):
    monkeypatch.setattr(netns, "check_root", lambda: None)
    monkeypatch.setattr(topology.Testbed, "__init__", _no_testbed)
    paths = {"--down-trace": "12mbps", "--up-trace": "12mbps", option: "1kbps"}
    assert main(["testbed", "compare", *(w for kv in paths.items() for w in kv)]) == 2
    assert "1kbps: only 2 delivery opportunities" in capsys.readouterr().err


# -- 1b. many chats' handshakes at once (session 41) --------------------------------------------------------------
def _per_second(tmp_path: Any) -> str:
    path = tmp_path / "persec.trace"
    path.write_text("".join(f"{ms}\n" for ms in range(1000, 60_001, 1000)))  # 30 opportunities in every 30 s
    return str(path)


def test_many_chats_need_as_many_times_the_opportunities(tmp_path):
    """``contention --chats 20`` and ``sim --chats 20`` at 3 kbit/s passed the one-handshake check (7 per 30 s)
    and every handshake timed out: N handshakes at once take N times the opportunities."""
    assert emulator.handshake_opportunities(1) == emulator.HANDSHAKE_OPPORTUNITIES
    assert emulator.handshake_opportunities(20) == 20 * emulator.HANDSHAKE_OPPORTUNITIES
    emulator.check_trace_usable("3kbps")  # one chat: as before
    emulator.check_trace_usable("3kbps", 1)
    with pytest.raises(TraceError, match=r"^3kbps: only 7 delivery opportunities in the 30 s after 0 s into the "
                                         r"trace, at least 100 needed in every 30 s for 20 chats: .*can start at "
                                         r"most 1 chat at once \(--chats 1\) \(a fixed rate needs at least 40 "
                                         r"kbit/s for 20 chats\)$"):
        emulator.check_trace_usable("3kbps", 20)
    with pytest.raises(TraceError, match=r"at least 10 needed .* for 2 chats"):
        emulator.check_trace_opportunities("3kbps", 2)
    emulator.check_trace_usable("40kbps", 20)  # exactly 100 per 30 s
    with pytest.raises(TraceError, match=r"only 99 delivery opportunities"):
        emulator.check_trace_usable("39.9kbps", 20)
    persec = _per_second(tmp_path)
    emulator.check_trace_usable(persec, 6)
    with pytest.raises(TraceError, match=r"only 30 delivery .*at least 35 needed .* for 7 chats: .*can start at most "
                                         r"6 chats at once \(--chats 6\)"):
        emulator.check_trace_usable(persec, 7)
    with pytest.raises(TraceError, match=r"only 2 delivery opportunities .*not even one chat can start on this trace "
                                         r"\(a fixed rate needs at least 20 kbit/s for 10 chats\)"):
        emulator.check_trace_usable("1kbps", 10)


def test_the_fewest_named_is_the_most_every_30_s_holds():
    """The count in the message (a binary search over ``longest_span_ms`` for N chats) against a linear scan."""
    import random

    rng = random.Random(41)
    for _ in range(60):
        stamps = sorted({rng.randint(1, 90_000) for _ in range(rng.randint(1, 40))})
        trace = Trace(array("q", stamps))
        most = max(k for k in range(0, 200) if k == 0 or emulator.longest_span_ms(trace, k)[0] <= 30_000)
        for chats in (1, 2, 3, 7):
            needed = emulator.handshake_opportunities(chats)
            if most >= needed:
                emulator._check_opportunities("t", trace, chats)
                continue
            with pytest.raises(TraceError) as refused:
                emulator._check_opportunities("t", trace, chats)
            assert str(refused.value).startswith(f"t: only {most} delivery opportunit"), (stamps, chats)
            if chats > 1:
                assert (f"(--chats {most // 5})" if most >= 5 else "not even one chat") in str(refused.value)


def test_contention_refuses_a_trace_too_sparse_for_its_chats(monkeypatch, capsys):
    monkeypatch.setattr(netns, "check_root", lambda: None)
    monkeypatch.setattr(topology.Testbed, "__init__", _no_testbed)
    assert main(["testbed", "contention", "--down-trace", "3kbps", "--chats", "20"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tokenwire testbed contention: error: 3kbps: only 7 "), err
    assert "at least 100 needed in every 30 s for 20 chats" in err and "(--chats 1)" in err, err
    # either direction; its default of 10 chats too
    assert main(["testbed", "contention", "--down-trace", "12mbps", "--up-trace", "3kbps"]) == 2
    assert "3kbps: only 7 delivery opportunities in the 30 s after 0 s into the trace, at least 50 needed" in (
        capsys.readouterr().err)


def test_sim_chats_refuses_a_trace_too_sparse_for_its_chats_and_runs_what_passes(tmp_path, capsys):
    """``sim --chats 20 --down-trace 3kbps`` ran: every chat failed at the idle timeout ("connection closed before
    its request"), exit 1, after its whole run."""
    assert main(["sim", "--chats", "20", "--tokens", "3", "--schemes", "stream", "--down-trace", "3kbps"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.strip().splitlines() == [
        "tokenwire sim: error: --down-trace: 3kbps: only 7 delivery opportunities in the 30 s after 0 s into the "
        "trace, at least 100 needed in every 30 s for 20 chats: their QUIC handshakes start together and share "
        "the link, each taking 5 opportunities of 1500 bytes each way; this trace can "
        "start at most 1 chat at once (--chats 1) (a fixed rate needs at least 40 kbit/s for 20 chats)"]
    persec = _per_second(tmp_path)
    assert main(["sim", "--chats", "7", "--tokens", "3", "--schemes", "stream", "--down-trace", "12mbps",
                 "--up-trace", persec]) == 2
    assert "--up-trace: " in capsys.readouterr().err
    # the most it allows connect, every one (virtual time: the wait for the handshakes is ~50 s of it)
    assert main(["sim", "--chats", "6", "--tokens", "3", "--schemes", "stream", "--down-trace", persec]) == 0
    assert "6/6" in capsys.readouterr().out


# -- 2. a droptail byte limit below one packet ---------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["droptail:bytes=100", "droptail:bytes=1499", "droptail:packets=10,bytes=1228"])
def test_a_byte_limit_below_one_packet_is_refused(spec):
    """bytes=100 tail-dropped every 1228-byte QUIC packet and the run failed 32 s later."""
    with pytest.raises(QueueSpecError, match=r"below one 1500-byte packet"):
        parse_queue(spec)


def test_a_byte_limit_of_one_packet_and_more_is_accepted():
    assert parse_queue("droptail:bytes=1500").max_bytes == 1500  # type: ignore[attr-defined]
    parse_queue("droptail:bytes=4000,packets=3")


def test_compare_refuses_the_small_byte_limit_up_front(monkeypatch, capsys):
    monkeypatch.setattr(netns, "check_root", lambda: None)
    monkeypatch.setattr(topology.Testbed, "__init__", _no_testbed)
    assert main(["testbed", "compare", "--down-trace", "12mbps", "--queue", "droptail:bytes=100"]) == 2
    assert "bytes=100 is below one 1500-byte packet" in capsys.readouterr().err


# -- 3. the last progress line of a run, without a terminal --------------------------------------------------------
def _run(scheme: str, seed: int, n: int) -> SchemeRun:
    gen = [0.1 * i for i in range(n)]
    return SchemeRun(scheme=scheme, seed=seed, origin=0.0, request_time=0.0, request_arrival=0.0, gen=gen,
                     render=[g + 0.05 for g in gen], text_ok=True, wire_bytes=0, down_packets=n, down_lost=0,
                     deliveries=[(g, g + 0.05) for g in gen], lost_times=[], emulator={}, base_delay=0.05)


def test_compare_prints_each_runs_latest_count_without_a_terminal(monkeypatch, capsys):
    """The 5-s throttle left "chatterbox: 1/60 tokens rendered (2%)" as the last line of a run that rendered all."""

    def fake_run_scheme(scheme, cfg, seed, wd, progress=None, *, scratch=None):
        for k in (1, 7, 9):  # within the 5 s: only the first passes the throttle; 9 is the run's latest count
            progress(scheme, k, cfg.tokens)
        return _run(scheme, seed, cfg.tokens)

    monkeypatch.setattr(netns, "check_root", lambda: None)
    monkeypatch.setattr(compare, "run_scheme", fake_run_scheme)
    assert main(["testbed", "compare", "--down-trace", "12mbps", "--schemes", "chatterbox,stream",
                 "--tokens", "10"]) == 0
    err = capsys.readouterr().err.splitlines()
    lines = [line.split(" tokens")[0].strip() for line in err if "tokens rendered" in line or line.startswith("[")]
    assert lines == ["[1/2] seed 0: chatterbox", "chatterbox: 1/10", "chatterbox: 9/10",
                     "[2/2] seed 0: stream", "stream: 9/10"]  # (stream's 1/10: within 5 s of the last line)


def test_a_complete_count_is_always_printed_and_only_once(monkeypatch, capsys):
    def fake_run_scheme(scheme, cfg, seed, wd, progress=None, *, scratch=None):
        progress(scheme, 1, cfg.tokens)
        progress(scheme, cfg.tokens, cfg.tokens)
        return _run(scheme, seed, cfg.tokens)

    monkeypatch.setattr(netns, "check_root", lambda: None)
    monkeypatch.setattr(compare, "run_scheme", fake_run_scheme)
    assert main(["testbed", "compare", "--down-trace", "12mbps", "--schemes", "stream", "--tokens", "10"]) == 0
    err = capsys.readouterr().err
    assert err.count("stream: 10/10 tokens rendered (100%)") == 1


def test_a_failing_run_shows_its_latest_count_before_the_error(monkeypatch, capsys):
    def fake_run_scheme(scheme, cfg, seed, wd, progress=None, *, scratch=None):
        progress(scheme, 1, cfg.tokens)
        progress(scheme, 4, cfg.tokens)
        raise compare.CompareError(f"{scheme} (seed {seed}): stream client: no answer before the deadline")

    monkeypatch.setattr(netns, "check_root", lambda: None)
    monkeypatch.setattr(compare, "run_scheme", fake_run_scheme)
    assert main(["testbed", "compare", "--down-trace", "12mbps", "--schemes", "stream", "--tokens", "10"]) == 2
    err = capsys.readouterr().err
    assert "stream: 4/10 tokens rendered" in err
    assert err.index("stream: 4/10") < err.index("no answer before the deadline")


# -- 4. backend in the kv JSON ----------------------------------------------------------------------------------
def test_the_kv_summary_carries_backend_and_reason(monkeypatch, tmp_path):
    """A whole (faked) kv run: the summary's ``backend`` and a reason that says why, not "requested"."""
    events: list[dict[str, Any]] = []

    class FakeChild:
        def wait_for(self, key: str, timeout: float) -> dict[str, Any]:
            if key == "fetch_closed":
                return {"fetch_closed": {"decisions": []}}
            return {key: True}

        def send(self, line: str) -> None:
            if line.startswith("{"):
                events.append(json.loads(line))

        def event(self, deadline: float) -> dict[str, Any]:
            return {"result": True, "sent_at": 0.0, "last_at": 0.0}

    class FakeTestbed:
        backend, backend_reason = "userspace", "requested"
        server_ns = client_ns = "ns"

        def __init__(self, *a: Any, **k: Any) -> None:
            pass

        def __enter__(self) -> FakeTestbed:
            return self

        def __exit__(self, *exc: Any) -> None:
            pass

        def origin(self, offset: float = 0.0) -> float:
            return 0.0

    monkeypatch.setattr(kv_eval, "Testbed", FakeTestbed)
    monkeypatch.setattr(kv_eval, "_start", lambda *a, **k: FakeChild())
    monkeypatch.setattr(kv_eval, "prepare_context", lambda cfg, path, log: {"prefill_s": 0.1, "elements": 1})
    monkeypatch.setattr(kv_eval, "fetch_metrics", lambda ev, **k: {"fetch_ms": 1.0, "deadline_met": True,
                                                                    "levels": ["L1"]})
    monkeypatch.setattr(kv_eval, "add_goodput", lambda rows, path, down: None)
    monkeypatch.setattr(kv_eval, "summarize", lambda rows: {})
    cfg = kv_eval.KVEvalConfig(down_trace="12mbps", up_trace="12mbps", controllers=["fixed-L1"], repeats=1,
                               recompute_us_per_token=100)
    summary = kv_eval.run_kv_eval(cfg, workdir=str(tmp_path))
    assert summary["backend"] == "userspace"
    assert summary["backend_reason"] == kv_eval.KV_BACKEND_REASON
    json.dumps(summary)


# -- 5. messages of an empty --schemes and a NaN or infinite rate ------------------------------------------------
@pytest.mark.parametrize("schemes", ["", ",,", " , "])
def test_no_scheme_given_says_so(schemes, monkeypatch, capsys):
    monkeypatch.setattr(netns, "check_root", lambda: None)
    monkeypatch.setattr(topology.Testbed, "__init__", _no_testbed)
    assert main(["testbed", "compare", "--down-trace", "12mbps", "--schemes", schemes]) == 2
    err = capsys.readouterr().err
    assert "--schemes: no scheme given" in err and "[]" not in err


@pytest.mark.parametrize("spec", ["nanmbps", "infmbps", "NaNkbit", "-5mbps", "inf bps"])
def test_a_nan_or_infinite_rate_is_not_a_missing_file(spec, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)  # (no file of that name)
    with pytest.raises(TraceError, match=r"is not a valid rate") as info:
        trace_from_spec(spec)
    assert "no such trace file" not in str(info.value)
    monkeypatch.setattr(netns, "check_root", lambda: None)
    monkeypatch.setattr(topology.Testbed, "__init__", _no_testbed)
    assert main(["testbed", "compare", f"--down-trace={spec}"]) == 2
    assert "is not a valid rate" in capsys.readouterr().err


def test_a_file_named_like_a_bad_rate_is_still_read(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nanmbps").write_text("1\n")
    assert len(trace_from_spec("nanmbps")) == 1
