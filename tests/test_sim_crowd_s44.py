"""``tokenwire sim --start {settled,connected}`` and ``--cross SPEC``: testbed contention's flash crowd and cross
traffic in virtual time (the crowd itself: tests/test_flash_crowd_s43.py)."""

import json
from pathlib import Path

import pytest

from tokenwire.daemon.cli import main
from tokenwire.testbed import sim
from tokenwire.testbed.sim import SimConfig, compare, compare_chats, run_chats, run_scheme
from tokenwire.testbed.sim_cli import format_chats_table, format_table


def _cfg(**kw: object) -> SimConfig:
    base: dict[str, object] = {"tokens": 40, "rate": 30.0, "delay_ms": 20.0, "seed": 3}
    return SimConfig(**{**base, **kw})  # type: ignore[arg-type]


# -- the default is what it always was ----------------------------------------------------------------------------
def test_the_default_start_and_no_cross_traffic_give_the_old_numbers() -> None:
    """Numbers of the code before --start and --cross (5657508, session 44), to the last digit: 3 chats on a
    traced link, and one chat on the fixed channel; the table's first lines and the JSON's config as they were."""
    cfg = _cfg(chats=3, loss="ge:0.01,0.1", down_trace="1mbps", queue_packets=50, start="settled", cross=[])
    doc = compare_chats(["chatterbox"], cfg)
    run = doc["runs"]["chatterbox"][0]
    assert [(f["stall_ratio"], f["wire_bytes"]) for f in run["flows"]] == [
        (0.3157958951037372, 5068), (0.2316668306709978, 5530), (0.20075814154414595, 5134)]
    assert run["go_s"] == 0.58 and run["link"] == {
        "packets": 177, "offered_bytes": 16009, "dropped": 0, "lost": 11, "delivered_bytes": 14967,
        "utilisation": 0.06741891891891892, "sojourn_ms_p50": 0.0, "sojourn_ms_p99": 8.69935000000005}
    assert "start" not in doc["config"] and "cross" not in doc["config"]
    assert format_chats_table(doc).splitlines()[0] == (
        "3 chats x 40 tokens at 30/s, trace 1mbps, droptail 50 packets, one-way delay 20 ms, loss ge:0.01,0.1 "
        "(both), seeds 3..3 (virtual time: no CPU limits)")
    one = compare(["chatterbox", "stream"], _cfg(tokens=60, loss="iid:0.05", start="settled", cross=[]))
    assert [(d["stall_ratio"], d["bytes_per_token"]) for d in one["schemes"].values()] == [
        (0.018731439851784014, 138.55), (0.11504571117048927, 99.68333333333334)]
    assert "start" not in one["config"] and "cross" not in one["config"]
    assert format_table(one).splitlines()[0] == (
        "60 tokens at 30/s, one-way delay 20 ms, loss iid:0.05 (both), seeds 3..3")


# -- --start ------------------------------------------------------------------------------------------------------
def test_connected_starts_the_answers_behind_the_handshakes_packets() -> None:
    """Settled waits a settling time and then for the queues; connected goes at the last handshake's completion,
    with the handshakes' packets still queued."""
    cfg = _cfg(chats=20, tokens=20, down_trace="1mbps", queue_packets=200)
    settled = sim._Chats("chatterbox", cfg)
    settled.run(None, 5.0, lambda: 0.0)
    connected = sim._Chats("chatterbox", SimConfig(**{**cfg.__dict__, "start": "connected"}))
    backlog_at_go: list[int] = []
    go = connected._go

    def spy() -> None:
        backlog_at_go.append(connected.down.link.backlog + connected.up.link.backlog)  # type: ignore[union-attr]
        go()

    connected._go = spy  # type: ignore[method-assign]
    connected.run(None, 5.0, lambda: 0.0)
    assert settled.go is not None and connected.go is not None
    assert settled.go >= connected.go + settled._settle_s
    assert backlog_at_go and backlog_at_go[0] > 0
    assert all(f.outcome is not None and f.outcome.digest_ok for f in connected.flows)
    doc = compare_chats(["stream"], SimConfig(**{**cfg.__dict__, "start": "connected"}))
    assert doc["config"]["start"] == "connected"
    assert ", answers start connected, seeds 3..3" in format_chats_table(doc).splitlines()[0]


def test_one_chat_runs_the_same_either_way() -> None:
    """One chat's request always went as its handshake completed: --start connected is that run, bit for bit."""
    cfg = _cfg(loss="iid:0.05", down_trace="1mbps", queue_packets=200)
    a = run_scheme("chatterbox", cfg)
    b = run_scheme("chatterbox", SimConfig(**{**cfg.__dict__, "start": "connected"}))
    assert (a.render, a.wire_bytes, a.stats) == (b.render, b.wire_bytes, b.stats)


def test_an_unknown_start_is_refused() -> None:
    with pytest.raises(ValueError, match="start 'later'"):
        sim._Chats("chatterbox", _cfg(start="later"))


# -- --cross ------------------------------------------------------------------------------------------------------
def test_cross_traffic_occupies_the_queue() -> None:
    """A 950-kbit/s flow beside 4 chats on 1 Mbit/s: its bytes reach the cross sink, the chats' packets queue behind
    its (sojourn p50 0.6 -> 64 ms, stall 0.16-0.19 -> 0.84-0.97), and the link's figures say how much of it was the
    chats'."""
    cfg = _cfg(chats=4, tokens=60, delay_ms=40.0, down_trace="1mbps", queue_packets=200)
    quiet = run_chats("chatterbox", cfg)
    busy = run_chats("chatterbox", SimConfig(**{**cfg.__dict__, "cross": ["udp-ect1:950kbps"]}))
    assert all(f.finished for f in busy.flows)
    link = busy.down
    assert link["cross_delivered_bytes"] > 250_000  # ~119 kB a second for the answers' ~2.5 s
    assert link["chats_delivered_bytes"] + link["cross_delivered_bytes"] == link["delivered_bytes"]
    assert link["chats_utilisation"] < link["utilisation"]
    assert "cross_delivered_bytes" not in quiet.down  # (absent without cross traffic)
    assert link["sojourn_ms_p50"] > quiet.down["sojourn_ms_p50"] + 30.0
    stalls = [f.run.stats.stall_ratio for f in busy.flows if f.run is not None]
    assert min(stalls) > 2 * max(f.run.stats.stall_ratio for f in quiet.flows if f.run is not None)


def test_a_reno_flow_backs_off_and_one_chat_takes_cross_traffic_too() -> None:
    """tcp:reno (and tcp:cubic, the same model) is responsive: it fills the link and is acknowledged; one chat's run
    (run_scheme) meets it as well, and its own bytes leave the cross traffic's out."""
    cfg = _cfg(tokens=60, delay_ms=40.0, down_trace="1mbps", queue_packets=100)
    chats = sim._Chats("chatterbox", SimConfig(**{**cfg.__dict__, "cross": ["tcp:reno"]}))
    chats.run(None, 600.0, lambda: 0.0)
    assert chats.cross is not None
    (reno,) = chats.cross.flows
    assert reno.stats.acked > 100 and reno.stats.lost > 0  # (it filled the 100-packet queue and halved)
    quiet = run_scheme("chatterbox", cfg)
    busy = run_scheme("chatterbox", SimConfig(**{**cfg.__dict__, "cross": ["tcp:cubic"]}))
    assert busy.stats.ttft_ms > quiet.stats.ttft_ms + 50.0
    assert busy.wire_bytes < 2 * quiet.wire_bytes  # its own packets only


def test_settled_with_cross_traffic_waits_the_settling_time_only() -> None:
    """The queues need not empty with cross traffic (contention's settle): a Reno flow keeps them full, and the
    answers would wait for them until the simulator's cap."""
    cfg = _cfg(chats=3, tokens=20, down_trace="1mbps", queue_packets=100, cross=["tcp:reno"])
    chats = sim._Chats("chatterbox", cfg)
    chats.run(None, 60.0, lambda: 0.0)
    assert chats.go is not None and chats.go < 2.0
    assert all(f.outcome is not None and f.outcome.digest_ok for f in chats.flows)


def test_cross_traffic_is_deterministic_per_seed() -> None:
    cfg = _cfg(chats=3, tokens=30, down_trace="1mbps", queue_packets=100, loss="iid:0.02",
               cross=["onoff-ect1:300kbps:200:300", "tcp:reno"], start="connected")
    a, b = compare_chats(["chatterbox"], cfg), compare_chats(["chatterbox"], cfg)
    assert json.dumps(a) == json.dumps(b)
    other = compare_chats(["chatterbox"], SimConfig(**{**cfg.__dict__, "seed": 4}))
    assert other["runs"]["chatterbox"][0]["link"] != a["runs"]["chatterbox"][0]["link"]


def test_cross_traffic_needs_a_traced_link() -> None:
    with pytest.raises(ValueError, match="traced down direction"):
        sim._Chats("chatterbox", _cfg(cross=["udp-ect1:1mbps"]))


# -- the command --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "says"), [
    (["--cross", "udp-ect1:1mbps"], "--cross: only with --down-trace"),
    (["--down-trace", "1mbps", "--cross", "tcp:bbr"], "--cross: cross traffic 'tcp:bbr': virtual time has no BBR"),
    (["--down-trace", "1mbps", "--cross", "udp:1mbps"], "--cross: cross traffic 'udp:1mbps': expected tcp:cubic"),
    (["--down-trace", "1mbps", "--cross", "udp-ect1:1gbps"], "--cross: cross traffic 'udp-ect1:1gbps': at most 100"),
    (["--down-trace", "1mbps", "--cross", "onoff-ect1:1mbps:0:10"], "--cross: cross traffic 'onoff-ect1:1mbps:0:10'"),
    (["--down-trace", "1mbps", "--cross", "udp-ect1:1bps"], "--cross: cross traffic 'udp-ect1:1bps': 1bps is below"),
    (["--down-trace", "1mbps", "--cross", "onoff-ect1:1mbps:0.000001:0.000001"],
     "--cross: cross traffic 'onoff-ect1:1mbps:0.000001:0.000001': ON_MS of at least 1 ms in the simulator"),
    (["--down-trace", "1mbps", "--cross", "onoff-ect1:1mbps:0.5:0"], "--cross: cross traffic 'onoff-ect1:1mbps:0.5:0'"),
    (["--down-trace", "1mbps", "--cross", "onoff-ect1:1mbps:5:0.5"], "--cross: cross traffic 'onoff-ect1:1mbps:5:0.5'"),
])
def test_bad_cross_traffic_is_refused_in_one_line(args: list[str], says: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "--tokens", "5", "--schemes", "stream", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tokenwire sim: error: {says}") and err.count("\n") == 1, err


def test_on_off_periods_under_a_millisecond_are_the_simulators_refusal_alone() -> None:
    """``onoff-ect1:1mbps:0.000001:0.000001`` ran for ever in the simulator (each period is an event, none long
    enough for a packet): it takes ON_MS of 1 ms or more and OFF_MS 0 or 1 ms or more. testbed contention, whose
    sender sleeps in real time, takes them as before; the library's runs refuse them as the command does."""
    from tokenwire.testbed.traffic import parse_cross

    for spec in ("onoff-ect1:1mbps:0.000001:0.000001", "onoff-ect1:1mbps:0.999:0", "onoff-ect1:1mbps:1:0.999"):
        assert parse_cross(spec)[0] == "onoff-ect1"
        assert "at least 1 ms in the simulator" in (sim.cross_problem(spec) or "")
    for spec in ("onoff-ect1:1mbps:1:0", "onoff-ect1:1mbps:1:1", "onoff-ect1:200kbps:1200:1000000"):
        assert sim.cross_problem(spec) is None
    with pytest.raises(ValueError, match="at least 1 ms in the simulator"):
        run_chats("stream", _cfg(chats=2, down_trace="1mbps", cross=["onoff-ect1:1mbps:0.000001:0.000001"]))


def test_an_unknown_start_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["sim", "--start", "later"])
    assert done.value.code == 2
    assert "argument --start: invalid choice: 'later'" in capsys.readouterr().err


def test_the_command_records_start_and_cross(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.json"
    argv = ["sim", "--tokens", "20", "--schemes", "chatterbox", "--down-trace", "1mbps", "--delay-ms", "20",
            "--chats", "3", "--start", "connected", "--cross", "udp-ect1:300kbps", "--cross", "tcp:reno",
            "--json", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert (", answers start connected, cross traffic udp-ect1:300kbps + tcp:reno, seeds 1..1"
            in table.splitlines()[0])
    assert "cross traffic: util counts it too; the chats' own share of the link: chatterbox " in table
    doc = json.loads(out.read_text())
    assert doc["config"]["start"] == "connected" and doc["config"]["cross"] == ["udp-ect1:300kbps", "tcp:reno"]
    assert doc["schemes"]["chatterbox"]["cross_delivered_bytes"] > 0
    assert main(["sim", "--tokens", "20", "--schemes", "chatterbox", "--down-trace", "1mbps", "--cross",
                 "udp-ect1:300kbps", "--json", str(out)]) == 0  # one chat
    assert ", cross traffic udp-ect1:300kbps, seeds 1..1" in capsys.readouterr().out.splitlines()[0]
    assert json.loads(out.read_text())["config"]["cross"] == ["udp-ect1:300kbps"]
