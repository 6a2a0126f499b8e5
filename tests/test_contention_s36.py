"""``tokenwire testbed contention``: what a run that stops midway keeps (the partial JSON), cross traffic (``--cross``),
the link's window, the CLI's refusals and progress lines; one run through the namespaces (root only)."""

import io
import json
import os
import sys

import pytest

from tokenwire.testbed import contention
from tokenwire.testbed.contention import (
    PORT,
    ContentionConfig,
    ContentionError,
    down_link_summary,
    run_contention,
    run_summary,
)
from tokenwire.testbed.trace import trace_from_spec


def _row(arrival, size, *, sport=PORT, dport=5000, proto="17", fate="delivered", sojourn=2.0):
    return {"dir": "down", "arrival": f"{arrival:.6f}", "size": str(size), "fate": fate, "proto": proto,
            "sport": str(sport), "dport": str(dport), "departure": f"{arrival + 0.002:.6f}",
            "sojourn_ms": f"{sojourn:.3f}"}


def test_the_link_is_read_up_to_the_answers_end_and_the_chats_share_is_their_own():
    """Cross traffic runs until the testbed goes down: its packets after the answers' end stretched the span (and
    filled it); the daemon's own delivered bytes are reported beside the link's total."""
    rows = [
        _row(100.1, 1000),  # the daemon's
        _row(100.2, 1500, sport=40000, dport=9300, proto="6"),  # bulk TCP cross traffic
        _row(100.3, 1228, sport=40001, dport=9301, sojourn=50.0),  # paced UDP cross traffic
        _row(107.0, 1500, sport=40000, dport=9300, proto="6", sojourn=400.0),  # after the answers' end
    ]
    link = down_link_summary(rows, trace_from_spec("12mbps"), 100.0, until=101.0)
    assert link["packets"] == 3
    assert link["delivered_bytes"] == 1000 + 1500 + 1228
    assert link["chats_delivered_bytes"] == 1000
    assert link["span_s"] == pytest.approx(0.302)
    assert link["chats_utilisation"] == pytest.approx(1000 / link["capacity_bytes"])
    assert link["utilisation"] == pytest.approx(3728 / link["capacity_bytes"])
    assert link["sojourn_ms_p99"] < 50.0  # the late packet's 400 ms is not in it
    assert link["bytes_by_port"] == {5000: 1000}  # only the daemon's packets are the scheme's bytes
    whole = down_link_summary(rows, trace_from_spec("12mbps"), 100.0)
    assert whole["packets"] == 4 and whole["span_s"] == pytest.approx(7.002)


def _cfg(**kw):
    base = {"down_trace": "2mbps", "up_trace": "2mbps", "chats": 2, "tokens": 60, "runs": 2,
            "schemes": ["chatterbox", "stream"], "seed": 5}
    return ContentionConfig(**{**base, **kw})


def _fake_run(scheme, cfg, seed):
    """A finished run as run_one returns it: whole flows, stream's stalling twice as much as chatterbox's."""
    stall = 0.1 if scheme == "chatterbox" else 0.2
    flows = [{"flow": i, "port": 5000 + i, "tokens": cfg.tokens, "digest_verified": True,
              "stall_ratio": stall * (i + 1), "ttft_ms": 300.0, "request_time": 10.0, "last_render": 12.0,
              "tokens_rendered": cfg.tokens} for i in range(cfg.chats)]
    run = run_summary(flows, down_link_summary([], trace_from_spec("2mbps"), 0.0), cfg.tokens)
    run.update(scheme=scheme, seed=seed, chats=cfg.chats, wall_s=2.0, daemon_cpu_share=0.1, emulator_cpu_share=0.1)
    return run


def _runs_until(monkeypatch, fail_at, exc):
    """run_one finishes ``fail_at`` runs, then the next raises ``exc``; returns the runs started."""
    started = []

    def run_one(scheme, cfg, seed, workdir, progress=None, **kw):
        started.append((scheme, seed))
        if len(started) > fail_at:
            raise exc
        if progress:  # a count the CLI's 5-s throttle holds back, then the whole
            progress(scheme, 10, cfg.chats * cfg.tokens)
            progress(scheme, 50, cfg.chats * cfg.tokens)
        return _fake_run(scheme, cfg, seed)

    monkeypatch.setattr(contention, "run_one", run_one)
    return started


def test_a_failure_midway_hands_on_what_finished_then_propagates(monkeypatch):
    from tokenwire.testbed.compare import describe_partial

    _runs_until(monkeypatch, 3, ContentionError("stream (seed 6): the daemon exited (status 1)"))
    docs = []
    with pytest.raises(ContentionError, match="daemon exited"):
        run_contention(_cfg(cross=["tcp:cubic"]), on_partial=docs.append)
    (doc,) = docs
    assert doc["complete"] is False and doc["stopped_by"] == "error"
    assert doc["error"] == "stream (seed 6): the daemon exited (status 1)"
    assert doc["stopped_at"] == {"scheme": "stream", "seed": 6}
    assert [(r["scheme"], r["seed"], r["seed_complete"]) for r in doc["runs_finished"]] == [
        ("chatterbox", 5, True), ("stream", 5, True), ("chatterbox", 6, False)]
    assert all(len(r["flows"]) == 2 for r in doc["runs_finished"])  # every flow of what finished
    assert doc["runs_missing"] == [{"scheme": "stream", "seed": 6, "why": doc["error"]}]
    assert "schemes" not in doc and "comparison" not in doc  # not to be read as the whole run's figures
    seeds = doc["complete_seeds"]
    assert seeds["seeds"] == [5]
    assert seeds["schemes"]["chatterbox"]["flows"] == 2 and seeds["schemes"]["stream"]["flows"] == 2
    assert seeds["comparison"]["vs"]["stream"]["stall_ratio_p50_change"] == pytest.approx(-0.5)
    assert doc["config"]["cross"] == ["tcp:cubic"] and doc["config"]["runs"] == 2
    assert describe_partial(doc) == "3 of 4 runs finished (stopped at stream seed 6)"
    json.dumps(doc, allow_nan=False)  # strict JSON as it is


@pytest.mark.parametrize(("fail_at", "handed"), [(0, False), (1, True)])
def test_an_interrupt_is_marked_as_one_and_nothing_finished_is_nothing_written(monkeypatch, fail_at, handed):
    _runs_until(monkeypatch, fail_at, KeyboardInterrupt())
    docs = []
    with pytest.raises(KeyboardInterrupt):
        run_contention(_cfg(runs=1), on_partial=docs.append)
    assert bool(docs) is handed
    if handed:
        (doc,) = docs
        assert doc["stopped_by"] == "interrupt" and doc["error"] == "interrupted"
        assert doc["complete_seeds"] is None  # stream of the only seed never ran
        assert doc["runs_missing"] == [{"scheme": "stream", "seed": 5, "why": "interrupted"}]


def _main(argv, monkeypatch):
    from tokenwire.daemon.cli import main
    from tokenwire.testbed import netns

    monkeypatch.setattr(netns, "check_root", lambda: None)
    return main(["testbed", "contention", "--down-trace", "2mbps", "--chats", "2", "--tokens", "60", *argv])


@pytest.mark.parametrize(("exc", "rc", "said"), [
    (ContentionError("stream (seed 1): testbed: emulator exited"), 2, "emulator exited"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_the_cli_writes_the_finished_runs_marked_partial(tmp_path, monkeypatch, capsys, exc, rc, said):
    _runs_until(monkeypatch, 3, exc)
    out = tmp_path / "c.json"
    assert _main(["--runs", "2", "--json", str(out)], monkeypatch) == rc
    err = capsys.readouterr().err
    assert f'3 of 4 runs finished (stopped at stream seed 1); wrote them to {out} ("complete": false)' in err
    assert said in err.splitlines()[-1]
    doc = json.loads(out.read_text())
    assert doc["complete"] is False and len(doc["runs_finished"]) == 3
    assert doc["stopped_by"] == ("interrupt" if rc == 130 else "error")


def test_without_json_the_cli_says_the_finished_runs_are_not_saved(monkeypatch, capsys):
    _runs_until(monkeypatch, 1, ContentionError("stream (seed 0): no chat connected to the daemon"))
    assert _main([], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "1 of 2 runs finished (stopped at stream seed 0); not saved (no --json)" in err


def test_a_runs_last_count_is_shown_even_when_the_throttle_held_it_back(monkeypatch, capsys):
    """The fake runs report 10 then 50 of 120 tokens at once: the second line came within the 5-s throttle and
    was never printed, leaving "10/120" as the last word on the run."""
    _runs_until(monkeypatch, 99, RuntimeError("never"))
    assert _main([], monkeypatch) == 0
    err = capsys.readouterr().err.splitlines()
    at = err.index("[2/2] seed 0: stream, 2 chats")
    assert err[at - 1].startswith("    chatterbox: 50/120 tokens rendered (42%)")
    assert err[-1].startswith("    stream: 50/120 tokens rendered")


def test_cross_specs_reach_the_config_the_json_records(monkeypatch):
    seen = []

    def run(cfg, **kw):
        seen.append(cfg)
        raise ContentionError("stopped here")

    monkeypatch.setattr(contention, "run_contention", run)
    assert _main(["--cross", "tcp:cubic", "--cross", "udp-ect1:2mbps"], monkeypatch) == 2
    (cfg,) = seen
    assert cfg.cross == ["tcp:cubic", "udp-ect1:2mbps"]
    from dataclasses import asdict

    assert asdict(cfg)["cross"] == ["tcp:cubic", "udp-ect1:2mbps"]


@pytest.mark.parametrize(("spec", "said"), [
    ("tcp:vegas", "cross traffic 'tcp:vegas': expected tcp:cubic"),
    ("udp-ect1:1bps", "below the slowest paced flow"),
    ("onoff-ect1:1mbps:0:10", "cross traffic 'onoff-ect1:1mbps:0:10': expected"),
])
def test_the_cli_refuses_bad_cross_traffic_before_building_anything(spec, said, monkeypatch, capsys):
    monkeypatch.setattr(contention, "run_contention", lambda *a, **k: pytest.fail("ran"))
    assert _main(["--cross", "tcp:cubic", "--cross", spec], monkeypatch) == 2
    assert said in capsys.readouterr().err


class _SlowStream:
    """An SDK stream that renders one token, then never another."""

    def __init__(self):
        self.tokens = []
        self.stats = self.outcome = None

    def __aiter__(self):
        return self

    async def __anext__(self):
        import asyncio

        if not self.tokens:
            self.tokens.append("a")
            return "a"
        await asyncio.Event().wait()


class _Conn:
    def chat(self, *a, **kw):
        return _SlowStream()


def test_a_worker_past_its_deadline_says_how_far_its_answers_got(monkeypatch, capsys, tmp_path):
    """The coordinator's error read "client worker 0: TimeoutError: " and nothing more."""
    import contextlib

    from tokenwire.testbed import contention_client
    from tokenwire.transport import client

    @contextlib.asynccontextmanager
    async def connect(*a, **kw):
        yield _Conn()

    monkeypatch.setattr(client, "connect", connect)
    monkeypatch.setattr(contention_client, "PROGRESS_S", 60.0)
    monkeypatch.setattr(sys, "stdin", io.StringIO("go\n"))
    spec = {"host": "x", "port": 1, "cafile": "", "scheme": "stream", "tokens": 50, "rate": 30, "seed": 0,
            "first": 0, "chats": 2, "out": str(tmp_path / "w.json"), "timeout": 0.2}
    assert contention_client.main([json.dumps(spec)]) == 1
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[0] == {"connected": 2, "connect_errors": []}
    assert events[-1]["error"] == "TimeoutError: its 2 answers were not all in within 0.2 s (2 of 100 tokens rendered)"


def test_workers_keep_their_connections_alive_until_go(monkeypatch, capsys, tmp_path):
    """The connections sat silent from their handshake to ``go`` (connecting 40 chats and settling the path took up
    to ~40 s, the idle timeout is 60): a slower start ended them before their answers began."""
    import contextlib

    from tokenwire.testbed import contention_client
    from tokenwire.transport import client

    seen: list[dict] = []

    @contextlib.asynccontextmanager
    async def connect(*a, **kw):
        seen.append(kw)
        yield _Conn()

    monkeypatch.setattr(client, "connect", connect)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # the coordinator gave up before go
    spec = {"host": "x", "port": 1, "cafile": "", "scheme": "stream", "tokens": 5, "rate": 30, "seed": 0,
            "first": 0, "chats": 3, "out": str(tmp_path / "w.json"), "timeout": 5}
    assert contention_client.main([json.dumps(spec)]) == 0
    assert len(seen) == 3 and all(kw.get("keepalive") is True for kw in seen)
    assert json.loads(capsys.readouterr().out.splitlines()[0]) == {"connected": 3, "connect_errors": []}


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
@pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no TUN device")
@pytest.mark.timeout(60)
def test_cross_traffic_shares_the_link_and_a_relative_keep_folder_works(tmp_path, monkeypatch):
    """Also a relative --keep DIR: the daemon resolved its config's certificate paths from the config's folder, and
    every run failed at start ("DIR/<tag>/DIR/<tag>/cert.pem does not exist")."""
    from tokenwire.testbed.netns import list_runs

    monkeypatch.chdir(tmp_path)
    cfg = ContentionConfig(down_trace="8mbps", up_trace="8mbps", delay_ms=10.0, chats=2, tokens=30, rate=30.0,
                           queue="droptail:packets=200", schemes=["chatterbox"], seed=1, cross=["udp-ect1:2mbps"])
    runs_before = {r.run_id for r in list_runs()}
    doc = run_contention(cfg, workdir="kept")
    (run,) = doc["runs"]["chatterbox"]
    assert run["flows_finished"] == 2 and run["digests_verified"] == 2
    link = run["link"]
    # the paced 2 Mbit/s flow went through the same link: a good share of its bytes are not the daemon's
    assert link["delivered_bytes"] - link["chats_delivered_bytes"] > 50_000
    assert 0.0 < link["chats_utilisation"] < link["utilisation"] <= 1.0
    assert doc["config"]["cross"] == ["udp-ect1:2mbps"]
    assert (tmp_path / "kept" / "chatterbox.seed1" / "pktlog.csv").exists()
    assert {r.run_id for r in list_runs()} <= runs_before  # the testbed is gone
