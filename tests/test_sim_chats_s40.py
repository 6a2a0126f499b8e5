"""``tokenwire sim --chats N``: several chats sharing one simulated channel (run_chats, compare_chats)."""

import json
from pathlib import Path

import pytest

from tokenwire.daemon.cli import main
from tokenwire.daemon.demo_upstream import schedule
from tokenwire.testbed import sim
from tokenwire.testbed.sim import SimConfig, compare, compare_chats, run_chats, run_scheme


def _cfg(**kw: object) -> SimConfig:
    base: dict[str, object] = {"tokens": 40, "rate": 30.0, "delay_ms": 20.0, "seed": 3}
    return SimConfig(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize("scheme", ["chatterbox", "stream", "duplicate"])
def test_every_flow_gets_its_own_answer_whole(scheme: str) -> None:
    """Routing: each datagram reaches its own connection (a stray one breaks the other's handshake or digest)."""
    run = run_chats(scheme, _cfg(chats=4, loss="iid:0.05", down_trace="2mbps", queue_packets=100))
    assert [f.index for f in run.flows] == [0, 1, 2, 3]
    assert len({f.addr for f in run.flows}) == 4
    for f in run.flows:
        assert f.finished and f.run is not None and f.run.digest_ok, f.error
        assert f.run.stats.tokens_rendered == 40 and f.run.packets_down > 0
        # chat i follows the demo schedule of seed + i, from its request's arrival
        expected = schedule(40, rate=30.0, seed=3 + f.index, first_token_s=0.15)
        assert f.run.gen == pytest.approx([f.run.request_arrival + o for o in expected])
    assert run.down["lost"] > 0  # the channel really lost packets on the way


def test_one_server_session_per_client_and_distinct_connection_ids() -> None:
    chats = sim._Chats("chatterbox", _cfg(chats=3, tokens=10))
    chats.run(None, 5.0, lambda: 0.0)
    servers = [f.server.session for f in chats.flows]
    assert all(s is not None for s in servers) and len({id(s) for s in servers}) == 3
    cids = {f.client.session.quic.host_cid for f in chats.flows if f.client.session is not None}
    assert len(cids) == 3
    # every request went out at one instant ("go"), once the last handshake was done
    assert {f.request_time for f in chats.flows} == {chats.go}


def test_same_seed_same_result() -> None:
    cfg = _cfg(chats=3, loss="ge:0.01,0.1", down_trace="1mbps", queue_packets=50)
    a, b = run_chats("chatterbox", cfg), run_chats("chatterbox", cfg)
    for fa, fb in zip(a.flows, b.flows, strict=True):
        assert fa.run is not None and fb.run is not None
        assert fa.run.render == fb.run.render and fa.run.wire_bytes == fb.run.wire_bytes
    assert a.down == b.down and a.up == b.up and a.go == b.go
    # and the whole document, as JSON
    assert json.dumps(compare_chats(["stream"], cfg)) == json.dumps(compare_chats(["stream"], cfg))


def test_one_chat_is_the_single_chat_run() -> None:
    """chats=1 through the multi-chat engine is run_scheme's run, bit for bit; compare() keeps its document."""
    cfg = _cfg(loss="iid:0.05", down_trace="1mbps", queue_packets=200)
    single = run_scheme("chatterbox", cfg)
    flow = run_chats("chatterbox", cfg).flows[0].run
    assert flow is not None
    assert (flow.gen, flow.render, flow.wire_bytes, flow.deliveries, flow.packets_lost_up) == (
        single.gen, single.render, single.wire_bytes, single.deliveries, single.packets_lost_up)
    assert flow.stats == single.stats
    doc = compare(["chatterbox", "stream"], cfg)
    assert "chats" not in doc["config"] and "runs" not in doc.get("schemes", {}).get("stream", {})
    # run_scheme runs one chat whatever cfg.chats says
    assert run_scheme("chatterbox", SimConfig(**{**cfg.__dict__, "chats": 3})).render == single.render


def test_the_bottleneck_is_shared() -> None:
    """Eight chats through one 300-kbit/s down link queue more than one does there, and its log holds every chat's
    packets (one queue, not one per chat)."""
    cfg = _cfg(tokens=60, rate=40.0, down_trace="300kbps", queue_packets=500)
    one = run_chats("chatterbox", cfg)
    eight = run_chats("chatterbox", SimConfig(**{**cfg.__dict__, "chats": 8}))
    assert all(f.finished for f in eight.flows)
    assert eight.down["sojourn_ms_p99"] > one.down["sojourn_ms_p99"] + 5.0
    assert eight.down["utilisation"] > 4 * one.down["utilisation"]
    # (the log counts from "go", each flow from its request's arrival a one-way delay later)
    assert eight.down["packets"] >= sum(f.run.packets_down for f in eight.flows if f.run is not None) > 0


def test_a_flow_that_does_not_finish_is_a_result() -> None:
    """The cap reached mid-answer fails the flows still open, as results: the run itself is not an exception."""
    run = run_chats("stream", _cfg(chats=2, tokens=200, max_virtual_s=3.0))
    assert [f.finished for f in run.flows] == [False, False]
    assert all("no completion within 3 s" in (f.error or "") for f in run.flows)
    row = run.flows[0].to_dict()
    assert row["finished"] is False and row["error"] and row["port"] == sim.CLIENT_ADDR[1]


def test_cli_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "chats.json"
    assert main(["sim", "--chats", "3", "--tokens", "30", "--schemes", "chatterbox,stream", "--down-trace",
                 "1mbps", "--queue-packets", "100", "--loss", "iid:0.02", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("3 chats x 30 tokens at 30/s, trace 1mbps, droptail 100 packets")
    assert "sojourn p50/p99 ms" in text and "chatterbox vs stream: median stall ratio" in text
    doc = json.loads(out.read_text())
    assert doc["config"]["chats"] == 3
    for s in ("chatterbox", "stream"):
        assert doc["schemes"][s]["flows"] == doc["schemes"][s]["flows_finished"] == 3
        assert doc["schemes"][s]["digests_verified"] == 3
        assert [f["flow"] for f in doc["runs"][s][0]["flows"]] == [0, 1, 2]


def test_cli_one_chat_prints_the_single_chat_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "--tokens", "20", "--schemes", "stream"]) == 0
    plain = capsys.readouterr().out
    assert main(["sim", "--tokens", "20", "--schemes", "stream", "--chats", "1"]) == 0
    assert capsys.readouterr().out == plain


@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_cli_refuses_a_bad_count(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["sim", "--chats", value])
    assert exc.value.code == 2
    assert "--chats" in capsys.readouterr().err


def test_no_chat_is_refused() -> None:
    with pytest.raises(ValueError, match="chats must be >= 1"):
        run_chats("stream", _cfg(chats=0))


def test_cli_refuses_too_many_chats(capsys: pytest.CaptureFixture[str]) -> None:
    from tokenwire.testbed.sim_cli import MAX_SIM_CHATS

    assert main(["sim", "--chats", str(MAX_SIM_CHATS + 1), "--tokens", "5"]) == 2
    err = capsys.readouterr().err
    assert f"--chats {MAX_SIM_CHATS + 1}: 1 to {MAX_SIM_CHATS}" in err and "Traceback" not in err


def test_cli_checks_every_chats_seed_against_the_cap(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Chat i of run k gets seed + k + i: the check of the answers' end covers runs + chats - 1 seeds."""
    seen: list[int] = []

    def spy(cfg: SimConfig, runs: int, progress: object = None) -> None:
        seen.append(runs)

    class Checked(Exception):
        pass

    def stop(*args: object, **kwargs: object) -> None:
        raise Checked

    monkeypatch.setattr(sim, "first_seed_past_cap", spy)
    monkeypatch.setattr(sim, "compare", stop)
    with pytest.raises(Checked):
        main(["sim", "--chats", "5", "--runs", "2", "--tokens", "5"])
    assert seen == [6]


def test_a_chat_whose_connection_ends_before_its_request_does_not_hold_the_others() -> None:
    """"Go" waited for every handshake: one that never completed kept every request from leaving, and all the chats
    failed (10 chats at 60 % loss: 0 of 10 finished, 8 of them connected). Now that chat fails with its reason."""
    cfg = _cfg(chats=10, tokens=30, loss="iid:0.6", delay_ms=50.0, seed=1)
    run = run_chats("stream", cfg)
    lost = [f for f in run.flows if not f.finished]
    assert len(lost) == 1 and lost[0].error == "connection closed before its request: Idle timeout"
    assert all(f.run is not None and f.run.digest_ok for f in run.flows if f is not lost[0])


def test_the_connected_chats_outlive_a_long_handshake() -> None:
    """A handshake that fails takes the 60-s idle timeout to end: the chats already connected ping meanwhile, or
    theirs ran out too before "go" (a closed client's own close counts its idle time from its last packet)."""
    chats = sim._Chats("stream", _cfg(chats=3, tokens=10))
    stuck = chats.flows[1].client.session
    assert stuck is not None
    # flow 1's Initials never arrive: its handshake fails at the idle timeout, 60 s in
    wire_send = chats.up.send
    chats.up.send = lambda datagrams, now, addr: wire_send([] if addr == chats.flows[1].addr else datagrams, now, addr)
    chats.run(None, 5.0, lambda: 0.0)
    assert chats.flows[1].lost == "Idle timeout" and chats.go is not None and chats.go > 60.0
    assert chats.flows[0].outcome is not None and chats.flows[2].outcome is not None
    assert chats.flows[0].outcome.digest_ok and chats.flows[2].outcome.digest_ok


def test_progress_counts_the_tokens_of_answers_that_ended() -> None:
    """An answer that ended leaves its client session: the count read only the open ones and fell as chats ended."""
    chats = sim._Chats("chatterbox", _cfg(chats=3, tokens=20))
    chats.run(None, 5.0, lambda: 0.0)
    assert all(f.outcome is not None for f in chats.flows)
    assert chats.rendered() == 60


def test_a_flow_counts_its_own_bytes_up_to_its_statistics() -> None:
    """A chat's bytes end with its statistics (GEN_TIMES), as a single-chat run's do, not with the last chat's: the
    first chats to end got the ACKs their connections sent while the others still ran."""
    chats = sim._Chats("chatterbox", _cfg(chats=4, tokens=30))
    chats.run(None, 5.0, lambda: 0.0)
    later = 0
    for flow in chats.flows:
        assert flow.ended_at is not None
        result = chats.result(flow)
        own = [p for p in chats.down.sent[flow.down_from:] if p.meta == flow.addr]
        assert result.wire_bytes == sum(p.size for p in own if p.arrival <= flow.ended_at)
        later += sum(1 for p in own if p.arrival > flow.ended_at)
    assert later > 0  # (the case is there: packets of a chat after its end, not counted)
