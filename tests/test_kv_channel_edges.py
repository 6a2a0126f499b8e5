"""Edges of the KV channel's SDK and tools found by a probe: the deadline verdict with the prefill still to do,
the client's codec warm-up, the socket client's token ids, ``kv eval --levels``, SIGTERM during ``kv eval`` /
``kv calibrate``, and ``config check`` on ``[kv]``'s paths."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tokenwire.daemon.kv_ingest import put_kv_unix
from tokenwire.daemon.kv_meta import KVIngestError
from tokenwire.daemon.kv_service import KVService
from tokenwire.daemon.kv_store_local import LocalChunkStore
from tokenwire.transport import kv_client as kc
from tokenwire.transport.frames import KvChunk
from tokenwire.transport.kv_channel import FetchReport, ServerTuning, connect_kv, serve_kv

from .test_kv_channel import CHUNK, MODEL, make_kv


@pytest.fixture
def service(tmp_path):
    svc = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=CHUNK)
    yield svc
    svc.close()


# ------------------------------------------------------------------------------- 1: the prefill in the verdict
def _two_chunks(levels: tuple[str, str]) -> tuple[dict, dict]:
    """Two 10-token chunks received by 60 ms and decoded by 80 ms of a fetch sent at 0."""
    received = {i: (KvChunk(0, i, lv, 40 if lv == "text" else 100, 0, 10), 0.01, 0.05 + 0.01 * i)
                for i, lv in enumerate(levels)}
    return received, {0: (0.05, 0.06), 1: (0.06, 0.08)}


def test_a_text_chunks_prefill_counts_in_the_reports_verdict_and_the_testbed_counts_it_once():
    """deadline_met compared the transfer alone; the controller (and testbed kv) add the engine's prefill of the
    tokens that did not come as KV."""
    from tokenwire.testbed.kv_eval import fetch_metrics
    from tokenwire.transport.kv_controller import LEVEL_TOP1

    received, decoded = _two_chunks(("text", "low"))
    rep = FetchReport.from_timings(deadline_ms=100, controller="tokenwire", sent_at=0.0, end=0.08,
                                   received=received, decode_times=decoded, recompute_us_per_token=5000)
    assert rep.fetch_ms == pytest.approx(80) and rep.prefill_tokens == 10 and rep.prefill_ms == pytest.approx(50)
    assert not rep.deadline_met  # 80 ms of transfer + 50 ms of prefill > 100 ms
    d = rep.to_dict()
    assert (d["prefill_tokens"], d["prefill_ms"], d["recompute_us_per_token"]) == (10, 50.0, 5000)
    # testbed kv adds the text chunks' prefill to the report's fetch_ms, which is still the transfer alone
    m = fetch_metrics({"result": d}, elements=800, recompute_us_per_token=5000, top1=LEVEL_TOP1)
    assert m["fetch_ms"] == pytest.approx(rep.fetch_ms + rep.prefill_ms) and m["deadline_met"] == rep.deadline_met
    # a fetch that named no cost: the server's default (2250 us/token), 22.5 ms here
    rep = FetchReport.from_timings(deadline_ms=100, controller="tokenwire", sent_at=0.0, end=0.08,
                                   received=received, decode_times=decoded)
    assert rep.recompute_us_per_token == ServerTuning().recompute_us_per_token == 2250 and not rep.deadline_met
    received, decoded = _two_chunks(("low", "low"))
    rep = FetchReport.from_timings(deadline_ms=100, controller="tokenwire", sent_at=0.0, end=0.08,
                                   received=received, decode_times=decoded, recompute_us_per_token=5000)
    assert rep.prefill_tokens == 0 and rep.deadline_met


def test_a_prefix_fetchs_missing_tokens_count_in_the_verdict_at_the_client_server_and_metric(service):
    """A prefix fetch leaving 20 tokens at 0.6 s each (12 s) to prefill reported its 10-s deadline met; so did the
    server's deadline-ratio histogram (fed from the same fetch's close)."""
    from prometheus_client import CollectorRegistry

    from tokenwire.daemon.kv_metrics import KVMetrics

    ids = list(range(2 * CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(len(ids), 5), prewarm=["low"])

    async def go():
        server = await serve_kv(service, "127.0.0.1", 0, congestion="reno", tuning=ServerTuning(forecaster="ewma"))
        registry = CollectorRegistry()
        KVMetrics(registry, SimpleNamespace(server=server, service=service))
        closed: list = []
        done = asyncio.Event()
        server.fetch_closed_listeners.append(lambda ev: (closed.append(ev), done.set()))
        try:
            async with connect_kv("127.0.0.1", server.port, verify=False) as conn:
                res = await conn.fetch_kv(model=MODEL, token_ids=ids + [7] * 20, deadline_ms=10_000, prefix=True,
                                          controller="fixed-L1", recompute_us_per_token=600_000)
            await asyncio.wait_for(done.wait(), 10)  # the server closes the fetch when the client's FIN comes
        finally:
            server.close()
        return res, closed, registry

    res, closed, registry = asyncio.run(asyncio.wait_for(go(), 60))
    rep = res.report
    assert res.missing_token_ids == [7] * 20 and rep.levels == ["low", "low"]
    assert rep.prefill_tokens == 20 and rep.prefill_ms == pytest.approx(12_000)
    assert rep.fetch_ms < 10_000 and not rep.deadline_met  # the transfer alone was in time
    assert closed[0].complete and closed[0].prefill_s == pytest.approx(12.0)
    assert registry.get_sample_value("tokenwire_kv_fetch_deadline_ratio_count") == 1
    assert registry.get_sample_value("tokenwire_kv_fetch_deadline_ratio_bucket", {"le": "1.0"}) == 0
    ratio = registry.get_sample_value("tokenwire_kv_fetch_deadline_ratio_sum")
    assert ratio == pytest.approx((closed[0].elapsed_s + 12.0) / 10.0)


# ---------------------------------------------------------------------------------- 2: the client's warm-up
def test_connect_kv_warms_the_codec_once_per_process_before_the_first_fetch(service, monkeypatch):
    """A process's first fetch loaded torch, the codec and its kernels inside its deadline (507 ms, then 127 ms
    for the same 250-ms fetch). The daemon warms its codec at start; connect_kv now does, on the decode thread
    (the event loop runs on), and hands the connection over once it is done."""
    release = threading.Event()
    threads: list[str] = []

    def warm() -> float:
        threads.append(threading.current_thread().name)
        release.wait(10)
        return 0.25

    monkeypatch.setattr(kc, "_warm_decoder", warm)
    monkeypatch.setattr(kc, "_warm_up", None)  # this process warmed up long ago: a fresh one
    ids = list(range(CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(CHUNK, 6), prewarm=["low"])

    async def go():
        server = await serve_kv(service, "127.0.0.1", 0, congestion="reno", tuning=ServerTuning(forecaster="ewma"))
        entered = asyncio.Event()

        async def use():
            async with connect_kv("127.0.0.1", server.port, verify=False) as conn:
                entered.set()
                assert release.is_set()
                res = await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L1")
            async with connect_kv("127.0.0.1", server.port, verify=False) as again:
                assert again.warmed is conn.warmed  # once per process
            async with connect_kv("127.0.0.1", server.port, verify=False, warm=False) as cold:
                assert cold.warmed is None
            return res, conn.warmed.result()

        try:
            task = asyncio.ensure_future(use())
            with pytest.raises(TimeoutError):  # the handshake takes ms on loopback; the warm-up is still going
                await asyncio.wait_for(entered.wait(), 0.5)  # (and this loop is not blocked by it)
            release.set()
            return await task
        finally:
            release.set()
            server.close()

    res, took = asyncio.run(asyncio.wait_for(go(), 60))
    assert took == 0.25 and res.report.levels == ["low"]
    assert len(threads) == 1 and threads[0].startswith("tw-kv-decode")


# ---------------------------------------------------------------------------- 3: the socket client's token ids
@pytest.mark.parametrize(("ids", "message"), [
    ([1, 2, 504.9], r"token_ids\[2\] is 504.9 \(float\)"),
    (torch.tensor([1.0, 2.0, 3.0]), r"token_ids\[0\] is tensor\(1\.\) \(Tensor\)"),
    ([1, True, 3], r"token_ids\[1\] is True \(bool\)"),
    (torch.arange(3)[None], r"token_ids\[0\] is a Tensor of shape \(3,\) \(one context's ids, not a batch"),
], ids=["float", "float-tensor", "bool", "2-D tensor"])
def test_put_kv_unix_refuses_non_integer_ids_as_ingest_does(service, tmp_path, ids, message):
    """The socket client sent int(i) of each id: 504.9 went as 504, a float tensor's ids and True as ints, and a
    2-D id tensor failed with torch's "only one element tensors can be converted to Python scalars"."""
    kv = make_kv(3)
    with pytest.raises(KVIngestError, match=message) as api:
        service.ingest_sync(MODEL, ids, kv)
    with pytest.raises(KVIngestError) as unix:  # refused before connecting: no daemon listens here
        put_kv_unix(tmp_path / "none.sock", MODEL, ids, kv)
    assert str(unix.value) == str(api.value) and str(api.value).startswith("token ids must be integers")


def test_connect_kv_waits_for_a_slow_warm_up_only_so_long_and_never_cancels_it(service, monkeypatch):
    """A cold numba cache takes seconds: connect_kv had waited for the warm-up without bound, outside its
    ``timeout``; and a cancelled connect cancelled the process's one warm-up for good."""
    release = threading.Event()
    monkeypatch.setattr(kc, "_warm_decoder", lambda: release.wait(20) and 0.0)
    monkeypatch.setattr(kc, "_warm_up", None)
    monkeypatch.setattr(kc, "WARM_WAIT_S", 0.2)

    async def go():
        server = await serve_kv(service, "127.0.0.1", 0, congestion="reno", tuning=ServerTuning(forecaster="ewma"))
        try:
            async with connect_kv("127.0.0.1", server.port, verify=False) as conn:
                assert not release.is_set() and not conn.warmed.done()  # handed over cold, warm-up still going
            task = asyncio.ensure_future(connect_kv("127.0.0.1", server.port, verify=False).__aenter__())
            await asyncio.sleep(0.05)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            assert not conn.warmed.cancelled()
            release.set()
            return await asyncio.wrap_future(conn.warmed)
        finally:
            release.set()
            server.close()

    assert asyncio.run(asyncio.wait_for(go(), 30)) == 0.0


def test_a_forked_child_warms_up_afresh(monkeypatch):
    """A process forked while its warm-up ran inherited a RUNNING future with no thread behind it, and every
    connect_kv in the child waited for it for ever."""
    from concurrent.futures import Future

    monkeypatch.setattr(kc, "_warm_up", Future())  # running in the parent, at the fork
    pid = os.fork()
    if pid == 0:  # the child: report and leave at once
        os._exit(0 if kc._warm_up is None else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0



def test_integer_ids_of_any_kind_are_taken():
    from tokenwire.daemon.kv_meta import _int_ids

    assert _int_ids(torch.arange(3)) == _int_ids(np.arange(3)) == _int_ids(range(3)) == [0, 1, 2]


# ------------------------------------------------------------------------ 4, 5: kv eval and kv calibrate
@pytest.fixture
def no_model(monkeypatch, tmp_path):
    from tokenwire.transport.cachegen import evaluate

    monkeypatch.setattr(evaluate, "prepare", lambda *a, **k: pytest.fail("model loaded"))
    text = tmp_path / "t.txt"
    text.write_text("words")
    return text


@pytest.mark.parametrize(("levels", "message"), [
    ("low,medium,code=64", "--levels code=64: custom step code must be 0..63"),
    ("low,code=abc", "--levels code=abc: bad custom level 'code=abc'"),
    ("text,lowest", "--levels lowest: unknown level 'lowest'"),
])
def test_kv_eval_refuses_a_bad_level_before_the_model_loads(no_model, tmp_path, capsys, levels, message):
    """code=64 and code=abc passed the prefix check and failed in run_eval's loop, after the model load, the
    prefill and the levels before them, with no JSON written."""
    from tokenwire.daemon.cli import main
    from tokenwire.transport.cachegen import evaluate
    from tokenwire.transport.cachegen.errors import InvalidInput

    out = tmp_path / "eval.json"
    assert main(["kv", "eval", "--text", str(no_model), "--levels", levels, "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not out.exists()
    with pytest.raises(InvalidInput):  # the library refuses it up front too
        evaluate.run_eval("words", 4, levels.split(","))


@pytest.fixture
def sigterm_guard():
    """SIGTERM's default action would end this test process: here it raises instead, as a killed run (no
    output written). Restored after the test."""

    class Killed(Exception):
        pass

    def killed(signum, frame):
        raise Killed

    old = signal.signal(signal.SIGTERM, killed)
    yield Killed
    signal.signal(signal.SIGTERM, old)


def _terminated() -> None:
    """What `kill` (or a CI timeout) does to a run in progress."""
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)  # the handler's exception ends this at once
    pytest.fail("SIGTERM did not interrupt the run")


def test_sigterm_during_kv_eval_writes_what_was_measured_like_ctrl_c(no_model, tmp_path, monkeypatch, capsys,
                                                                      sigterm_guard):
    from tokenwire.daemon.cli import main
    from tokenwire.transport.cachegen import evaluate

    def level(setup, name, chunk_tokens, backend="auto"):
        if name == "high":
            _terminated()
        return {"bits_per_element": 1.0, "top1": 0.9, "kl": 0.01, "ppl": 5.0}

    class FakeSetup:
        lm = SimpleNamespace(name="m", fingerprint=1)
        kv = ((0, 0),)
        elements = 8

    monkeypatch.setattr(evaluate, "profile_for", lambda *a: SimpleNamespace(name="p"))
    monkeypatch.setattr(evaluate, "eval_level", level)
    monkeypatch.setattr(evaluate, "prepare", lambda *a, **k: FakeSetup())
    out = tmp_path / "eval.json"
    assert main(["kv", "eval", "--text", str(no_model), "--prefix", "1", "--levels", "low,medium,high",
                 "--json", str(out)]) == 130
    doc = json.loads(out.read_text())
    assert doc["interrupted"] is True and list(doc["levels"]) == ["low", "medium"]
    assert "the 2 of 3 levels" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM).__name__ == "killed"  # the run's handler is gone again


def test_sigterm_during_kv_calibrate_writes_the_partial_profile_like_ctrl_c(tmp_path, monkeypatch, capsys,
                                                                             sigterm_guard):
    """Also: calibrate's progress lines said [kv eval]."""
    from tokenwire.daemon.cli import main
    from tokenwire.transport.cachegen import evaluate

    from .test_kv_eval import _fisher_setup

    setup = _fisher_setup(torch, evaluate, None)
    forward = type(setup.lm).forward

    def terminated_at_third(self, ids, past_key_values=None):
        if self.calls == 2:  # two samples taken
            _terminated()
        return forward(self, ids, past_key_values)

    monkeypatch.setattr(type(setup.lm), "forward", terminated_at_third)
    monkeypatch.setattr(type(setup.lm), "__call__", terminated_at_third)
    monkeypatch.setattr(evaluate, "cache_from_kv", lambda kv: kv)
    monkeypatch.setattr(evaluate, "prepare", lambda *a, **k: setup)
    text = tmp_path / "t.txt"
    text.write_text("words")
    out = tmp_path / "profile.json"
    assert main(["kv", "calibrate", "--text", str(text), "--samples", "8", "--json", str(out)]) == 130
    assert not out.exists()
    assert json.loads((tmp_path / "profile.json.partial").read_text())["calibration"]["fisher_samples"] == 2
    err = capsys.readouterr().err
    assert "[kv calibrate] calibration sample 2/8" in err and "[kv eval]" not in err
    assert "from the 2 of 8 samples" in err


# ------------------------------------------------------------------------------- 6: config check on [kv] paths
def _kv_toml(tmp_path, **kv: str) -> str:
    path = tmp_path / "tw.toml"
    lines = ["[kv]", "enabled = true", 'listen = "127.0.0.1:0"', *(f"{k} = {json.dumps(v)}" for k, v in kv.items())]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize(("where", "message"), [
    ("directory-file", "kv.directory: {file} is not a directory"),
    ("directory-under-file", "kv.directory: cannot use {file}/kv: Not a directory"),
    ("socket-missing-dir", "kv.ingest_socket: cannot listen on {tmp}/nowhere/kv.sock: no such folder"),
    ("socket-file", "kv.ingest_socket: cannot listen on {file}: something other than a socket is in the way"),
])
def test_config_check_refuses_the_kv_paths_the_daemons_start_refuses(tmp_path, capsys, where, message):
    """`config check` said ok; the daemon then refused to start with these very lines."""
    from tokenwire.daemon.cli import main

    file = tmp_path / "plain"
    file.write_text("not a directory, not a socket")
    kv = {"directory-file": {"directory": str(file)},
          "directory-under-file": {"directory": str(file / "kv")},
          "socket-missing-dir": {"directory": str(tmp_path / "store"),
                                 "ingest_socket": str(tmp_path / "nowhere" / "kv.sock")},
          "socket-file": {"directory": str(tmp_path / "store"), "ingest_socket": str(file)}}[where]
    assert main(["config", "check", _kv_toml(tmp_path, **kv)]) == 2
    assert message.format(file=file, tmp=tmp_path) in capsys.readouterr().err
    assert not (tmp_path / "store").exists() and file.read_text() == "not a directory, not a socket"


def test_config_check_warns_of_a_kv_directory_in_use_and_claims_nothing(tmp_path, capsys):
    from tokenwire.daemon.cli import main

    cfg = _kv_toml(tmp_path, directory=str(tmp_path / "store"), ingest_socket=str(tmp_path / "kv.sock"))
    assert main(["config", "check", cfg]) == 0  # nothing there yet: the daemon makes it
    out, err = capsys.readouterr()
    assert err == "" and f"kv: udp/127.0.0.1:0; store {tmp_path / 'store'} (4096 MiB)" in out
    assert not (tmp_path / "store").exists() and not (tmp_path / "kv.sock").exists()
    running = LocalChunkStore(tmp_path / "store", 1 << 20)  # a daemon holding the store
    try:
        assert main(["config", "check", cfg]) == 0
        err = capsys.readouterr().err
        assert f"warning: kv.directory: {tmp_path / 'store'} is in use by another process" in err
        with pytest.raises(Exception, match="in use by another process"):  # still the running one's
            LocalChunkStore(tmp_path / "store", 1 << 20)
    finally:
        running.close()
    assert main(["config", "check", cfg]) == 0 and capsys.readouterr().err == ""  # the lock was not kept
    LocalChunkStore(tmp_path / "store", 1 << 20).close()


def test_config_check_refuses_kv_without_torch_and_a_read_only_store(tmp_path, capsys, monkeypatch):
    """`config check` said ok; the daemon then refused to start: in a base install without torch (after
    nothing), and with a store on a read-only file system (after ~9 s compiling the codec's kernels)."""
    import importlib.util

    from tokenwire.daemon.cli import main

    cfg = _kv_toml(tmp_path, directory=str(tmp_path / "store"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch"
                        else real_find_spec(name, *a))
    assert main(["config", "check", cfg]) == 2
    assert "kv: the KV codec needs torch, which is not installed: pip install torch==2.13.0" in \
        capsys.readouterr().err
    monkeypatch.undo()
    real_statvfs = os.statvfs

    class ReadOnly:
        def __init__(self, real):
            self.f_flag = real.f_flag | os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly(real_statvfs(p)))
    assert main(["config", "check", cfg]) == 2
    assert f"kv.directory: cannot use {tmp_path / 'store'}: Read-only file system" in capsys.readouterr().err
    monkeypatch.undo()
    # not writable by the user checking: a warning (the daemon may run as another user)
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False)
    assert main(["config", "check", cfg]) == 0
    assert f"warning: kv.directory: {tmp_path} is not writable by this user" in capsys.readouterr().err


def test_the_daemon_checks_the_kv_store_before_compiling_the_codec(tmp_path, monkeypatch):
    """A store directory it could not use failed the start only after the codec's compile (~9 s cold)."""
    from tokenwire.daemon import kv_runtime
    from tokenwire.daemon.config import parse_config
    from tokenwire.daemon.startup import StartupError

    file = tmp_path / "plain"
    file.write_text("x")
    cfg = parse_config({"kv": {"enabled": True, "listen": "127.0.0.1:0", "directory": str(file / "kv")}},
                       tmp_path / "tw.toml")
    compiled = []

    async def warm_up() -> None:
        compiled.append(True)

    monkeypatch.setattr(kv_runtime, "warm_up_codec", warm_up)
    with pytest.raises(StartupError, match=r"kv\.directory: cannot use"):
        asyncio.run(kv_runtime.start_kv(cfg.kv))
    assert compiled == []


# --------------------------------------------------------------------------------------------------- minor
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"deadline_ms": 0}, "invalid fetch: deadline_ms: 0 out of range"),
    ({"deadline_ms": 1000, "controller": "nope"}, "invalid fetch: controller: 'nope' is not one of"),
    ({"deadline_ms": 1000, "recompute_us_per_token": -1}, "invalid fetch: recompute_us_per_token: -1 out of range"),
])
def test_a_refused_fetch_names_the_argument_not_the_wire_field(service, kwargs, message):
    """The messages named kvfetch.dl, kvfetch.ctl, kvfetch.rc: wire fields the caller never sees."""
    async def go():
        server = await serve_kv(service, "127.0.0.1", 0, congestion="reno", tuning=ServerTuning(forecaster="ewma"))
        try:
            async with connect_kv("127.0.0.1", server.port, verify=False, warm=False) as conn:
                with pytest.raises(ValueError) as info:
                    await conn.fetch_kv(model=MODEL, token_ids=[1, 2], **kwargs)
        finally:
            server.close()
        return str(info.value)

    text = asyncio.run(asyncio.wait_for(go(), 30))
    assert text.startswith(message) and "kvfetch" not in text
