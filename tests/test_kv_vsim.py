"""``tokenwire testbed kv --virtual``: the real KV stack in virtual time over the emulator's link model."""

from __future__ import annotations

import pytest

from tokenwire.testbed.kv_eval import KVEvalConfig
from tokenwire.testbed.kv_vsim import round_plan, run_kv_virtual


def config(**kw):
    base = dict(down_trace="8mbps", up_trace="8mbps", delay_ms=10, context_tokens=512, chunk_tokens=128,
                deadline_ms=8000, controllers=["tokenwire", "fixed-L1", "fixed-L3"], repeats=2,
                recompute_us_per_token=50_000, synthetic=(8, 4, 64))
    base.update(kw)
    return KVEvalConfig(**base)


@pytest.fixture(scope="module")
def generous():
    return run_kv_virtual(config(), workers=1)


def test_fetch_time_follows_the_link(generous):
    for name in ("fixed-L1", "fixed-L3"):
        for m in generous["fetches"][name]:
            wire_s = m["payload_bytes"] * 8 / 8e6  # the payload alone at the link's rate
            # request up (10 ms) + payload + headers + the last decode; slow start is long over (warm-up fetch)
            assert wire_s * 1e3 < m["fetch_ms"] < (wire_s / 0.85 + 0.2) * 1e3
            assert 0.85 < m["goodput_fraction"] <= 1.0
            assert len(m["levels"]) == 4
    low = generous["fetches"]["fixed-L1"][0]["payload_bytes"]
    high = generous["fetches"]["fixed-L3"][0]["payload_bytes"]
    assert 1.5 < high / low < 2.2  # the codec ladder: 1.8 vs 3.4 bits per element
    # a generous deadline: every chunk high (all-high takes 1.25 s; 8 s also leaves room for the first chunk's
    # firm guard, planned on the configured 5 Mbit/s prior: a quarter of it, where high + 3 x low takes 5.2 s)
    assert all(lv == "high" for m in generous["fetches"]["tokenwire"] for lv in m["levels"])


def test_virtual_runs_are_reproducible(generous):
    again = run_kv_virtual(config(controllers=["tokenwire", "fixed-L1", "fixed-L3"]), workers=1,
                           only=["tokenwire"])
    assert [m["fetch_ms"] for m in again["fetches"]["tokenwire"]] == \
        [m["fetch_ms"] for m in generous["fetches"]["tokenwire"]]


def test_tight_deadline_tokenwire_adapts_fixed_high_misses(generous):
    l1 = max(m["fetch_ms"] for m in generous["fetches"]["fixed-L1"])
    l3 = min(m["fetch_ms"] for m in generous["fetches"]["fixed-L3"])
    deadline = int(l1 + 0.85 * (l3 - l1))  # all-low makes it, all-high does not
    s = run_kv_virtual(config(deadline_ms=deadline), workers=1)["controllers"]
    assert s["fixed-L3"]["deadline_attainment"] == 0
    assert s["fixed-L1"]["deadline_attainment"] == 1
    assert s["tokenwire"]["deadline_attainment"] == 1
    assert s["tokenwire"]["mean_quality_top1"] > s["fixed-L1"]["mean_quality_top1"]


def test_rounds_replay_the_namespace_runs_offsets():
    cfg = config(repeats=5, seed=3)
    warm, rounds = round_plan(cfg, 140.0)
    assert round_plan(cfg, 140.0) == (warm, rounds)
    assert all(0 <= off < 140.0 for _, off in rounds) and 0 <= warm < 140.0
    assert all(sorted(order) == sorted(cfg.controllers) for order, _ in rounds)
    assert round_plan(config(repeats=5, seed=4), 140.0) != (warm, rounds)


def test_guard_knobs_reach_the_server_unset_ones_keep_the_controllers_defaults():
    from tokenwire.testbed.kv_vsim import ControllerSim, load_context
    from tokenwire.transport.kv_controller import FIRM_GUARD_WEIGHT, GUARD_WEIGHT

    cfg = config(guard_weight=0.5, firm_guard_weight=1.0)
    ctx, _ = load_context(cfg, lambda m: None)
    tuned = ControllerSim(cfg, ctx, recompute_us_per_token=1, seed=0).tuning
    assert (tuned.guard_weight, tuned.firm_guard_weight, tuned.reserve) == (0.5, 1.0, None)
    default = ControllerSim(config(), ctx, recompute_us_per_token=1, seed=0).tuning
    assert (default.guard_weight, default.firm_guard_weight) == (GUARD_WEIGHT, FIRM_GUARD_WEIGHT)


@pytest.mark.parametrize(("knob", "value", "message"), [
    ("reserve", 2.0, "--reserve must be in [0, 1)"),
    ("stale_factor", -1.0, "--stale-factor must be in (0, 1]"),
    ("guard_weight", -1.0, "--guard-weight must be >= 0"),
    ("firm_guard_weight", float("nan"), "--firm-guard-weight must be >= 0"),
    ("prior_mbps", -1.0, "--prior-mbps must be > 0"),
    ("recompute_us_per_token", -1, "--recompute-us-per-token must be in [0, 10000000]"),
])
def test_controller_knobs_out_of_range_are_refused_before_a_run(knob, value, message):
    """They used to run: a reserve of 2 or a negative prior planned on time and bandwidth that do not exist,
    and a negative recompute cost failed only at the first fetch, after the server had encoded everything."""
    with pytest.raises(ValueError) as err:
        config(**{knob: value}).validate()
    assert message in str(err.value)


def test_the_loss_options_reach_the_link(generous):
    """`testbed kv` took --loss/--up-loss (the path options every testbed command shares) and ignored them:
    the runs were lossless whatever was asked. Now both directions carry their loss model."""
    lossy = run_kv_virtual(config(loss="iid:0.05", up_loss="iid:0.05"), workers=1, only=["fixed-L1"])
    assert lossy["config"]["loss"] == "iid:0.05" and lossy["config"]["up_loss"] == "iid:0.05"
    clean = [m["fetch_ms"] for m in generous["fetches"]["fixed-L1"]]
    slow = [m["fetch_ms"] for m in lossy["fetches"]["fixed-L1"]]
    assert sum(slow) > 1.2 * sum(clean)  # the same fetches, now with retransmissions and a smaller window
    with pytest.raises(ValueError, match="loss spec"):
        config(loss="bogus").validate()


def test_kv_refuses_the_kernel_backend_it_would_ignore(capsys):
    from tokenwire.daemon.cli import main

    assert main(["testbed", "kv", "--virtual", "--down-trace", "8mbps", "--backend", "kernel"]) == 2
    assert "--backend kernel" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["kv", "swiftqueue"])
def test_virtual_runs_refuse_keep_which_they_would_ignore(command, tmp_path, capsys):
    """`--keep DIR` with `--virtual` created an empty folder and the run wrote nothing there."""
    from tokenwire.daemon.cli import main

    keep = tmp_path / "logs"
    assert main(["testbed", command, "--virtual", "--down-trace", "8mbps", "--keep", str(keep)]) == 2
    assert "--virtual run has neither" in capsys.readouterr().err
    assert not keep.exists()


def test_a_lossy_seed_reruns_to_the_microsecond():
    """docs/kv_channel.md: a rerun of a seed reproduces every fetch time. With loss it did not, even in one
    process: the P-256 dev certificate's signatures vary in length (a byte more or less in the first fetch's
    packets, which moved the seeded per-packet loss draws), and aioquic served concurrent chunk streams in an
    id()-dependent order (memory addresses)."""
    from tokenwire.testbed.kv_vsim import ControllerSim, load_context

    cfg = config(loss="iid:0.1", chunk_tokens=64)  # 8 chunks: retransmissions overlap the next chunk's stream
    ctx, _ = load_context(cfg, lambda m: None)
    keep = []

    def one() -> tuple[float, list[tuple[float, int]]]:
        keep.append([object() for _ in range(1000)])  # other addresses for the next run's objects
        sim = ControllerSim(cfg, ctx, recompute_us_per_token=50_000, seed=3)
        m = sim.fetch("fixed-L1", cfg.deadline_ms, 1.0)
        return m["fetch_ms"], sim.down.departures  # the fetch time and every delivered packet

    first = one()
    assert [one() for _ in range(5)] == [first] * 5
    rerun = [run_kv_virtual(config(loss="iid:0.1", controllers=["fixed-L1"], repeats=2, seed=9), workers=1)
             for _ in range(2)]
    assert rerun[0]["fetches"]["fixed-L1"] == rerun[1]["fetches"]["fixed-L1"]
