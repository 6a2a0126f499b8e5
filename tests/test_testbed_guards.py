"""What the namespace testbed refuses or cleans up: answer-size bounds, run-id collisions, --keep
temporary folders, duplicate schemes, trace files without newlines, and clearer messages.

Most tests are unit tests with the namespaces faked (no root); the collision with a live run is also checked
with real namespaces as root (skipped otherwise)."""

import os
import socket
import subprocess
import sys
import tracemalloc
import warnings

import pytest

from tokenwire.daemon.config import MAX_ANSWER_TOKENS
from tokenwire.testbed import netns, topology
from tokenwire.testbed.compare import CompareConfig
from tokenwire.testbed.emulator import DirectionConfig, EmulatorConfig
from tokenwire.testbed.swiftqueue_eval import SwiftQueueConfig, SwiftQueueEvalError
from tokenwire.testbed.trace import MAX_LINE_CHARS, TraceError, load_trace, trace_from_spec

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "testbed.md")
needs_root = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                                reason="needs root (network namespaces) and a TUN device")


# -- 1. an answer is at most MAX_ANSWER_TOKENS: the endpoint builds it whole first (2e9 tokens grew ~0.8 GB/s)
def test_compare_refuses_more_tokens_than_an_answer_holds(monkeypatch, capsys):
    from tokenwire.daemon.cli import main
    from tokenwire.testbed import compare

    CompareConfig(down_trace="12mbps", up_trace="12mbps", tokens=MAX_ANSWER_TOKENS).validate()
    with pytest.raises(ValueError, match=f"--tokens {MAX_ANSWER_TOKENS + 1}: at most {MAX_ANSWER_TOKENS}"):
        CompareConfig(down_trace="12mbps", up_trace="12mbps", tokens=MAX_ANSWER_TOKENS + 1).validate()
    monkeypatch.setattr(netns, "check_root", lambda: None)
    monkeypatch.setattr(compare, "run_scheme", lambda *a, **k: pytest.fail("the run started"))
    assert main(["testbed", "compare", "--down-trace", "12mbps", "--tokens", "2000000000", "--schemes", "stream"]) == 2
    assert f"at most {MAX_ANSWER_TOKENS}" in capsys.readouterr().err


@pytest.mark.parametrize("flow,seconds", [("tokens:1e9", 2), ("tokens:inf", 2), ("tokens:50", 1e9)])
def test_swiftqueue_refuses_an_answer_longer_than_the_bound(flow, seconds):
    cfg = SwiftQueueConfig(down_trace="12mbps", policies=["l4s"], flow=flow, seconds=seconds)
    with pytest.raises(SwiftQueueEvalError, match=f"tokens: at most {MAX_ANSWER_TOKENS}"):
        cfg.validate()
    ok = SwiftQueueConfig(down_trace="12mbps", policies=["l4s"], flow="tokens:50", seconds=2)
    ok.validate()
    assert ok.answer_tokens() == 100


def test_swiftqueue_cli_refuses_the_long_answer_before_any_namespace(monkeypatch, capsys):
    from tokenwire.daemon.cli import main
    from tokenwire.testbed import swiftqueue_netns

    monkeypatch.setattr(netns, "check_root", lambda: None)
    monkeypatch.setattr(swiftqueue_netns, "run_netns_all", lambda *a, **k: pytest.fail("the run started"))
    argv = ["testbed", "swiftqueue", "--down-trace", "12mbps", "--flow", "tokens:1e9", "--seconds", "2",
            "--policies", "l4s"]
    assert main(argv) == 2
    assert f"at most {MAX_ANSWER_TOKENS}" in capsys.readouterr().err


# -- 2. a start under a run id in use: refused before anything is touched, and the teardown of a failed start
#       removes only what this run created
@pytest.fixture
def fake_namespaces(tmp_path, monkeypatch):
    """Namespaces as plain files in a folder, state files in another: Testbed/DirectLink run their own logic up
    to the TUN devices without root. Returns (namespace folder, state folder, names created by the fake)."""
    from tokenwire.testbed import kernel

    ns_dir, state_dir = tmp_path / "netns", tmp_path / "state"
    ns_dir.mkdir()
    monkeypatch.setattr(netns, "NETNS_DIR", str(ns_dir))
    monkeypatch.setattr(netns, "STATE_DIR", str(state_dir))
    monkeypatch.setattr(topology, "check_root", lambda: None)
    monkeypatch.setattr(kernel, "choose_backend", lambda *a: ("userspace", "faked"))
    monkeypatch.setattr(netns, "pids_in_netns", lambda ns: [])  # a file's inode is no namespace's
    created: list[str] = []

    def create(name):
        if netns.netns_exists(name):
            raise netns.NamespaceExists(name)
        (ns_dir / name).write_text("")
        created.append(name)

    def open_tun(ns, ifname):
        raise topology.TestbedError("no TUN in this test")

    monkeypatch.setattr(topology, "create_netns", create)
    monkeypatch.setattr(netns, "remove_netns", lambda name: (ns_dir / name).unlink(missing_ok=True))
    monkeypatch.setattr(topology, "open_tun", open_tun)
    return ns_dir, state_dir, created


@pytest.mark.parametrize("kind", ["Testbed", "DirectLink"])
def test_a_run_id_in_use_is_refused_before_anything_is_touched(fake_namespaces, kind):
    ns_dir, state_dir, created = fake_namespaces
    make = (lambda rid: topology.Testbed(EmulatorConfig(), run_id=rid)) if kind == "Testbed" else (
        lambda rid: topology.DirectLink(run_id=rid))
    live = netns.RunState("tw00aaaa", os.getpid(), ["tw00aaaa-srv", "tw00aaaa-cli"])
    live.save()
    for name in live.namespaces:
        (ns_dir / name).write_text("")
    before = (state_dir / "tw00aaaa.json").read_text()
    with pytest.raises(netns.TestbedError, match="run id tw00aaaa is in use: namespace tw00aaaa-cli exists"), \
            make("tw00aaaa"):
        pass
    assert (state_dir / "tw00aaaa.json").read_text() == before  # the live run's state, untouched
    assert all((ns_dir / n).exists() for n in live.namespaces) and created == []
    (ns_dir / "tw00aaaa-srv").unlink()
    (ns_dir / "tw00aaaa-cli").unlink()
    with pytest.raises(netns.TestbedError, match="in use: its state file exists"), make("tw00aaaa"):
        pass
    assert (state_dir / "tw00aaaa.json").read_text() == before and created == []
    (ns_dir / "tw00bbbb-probe").write_text("")  # a namespace of the id, no state file: still not ours
    with pytest.raises(netns.TestbedError, match="namespace tw00bbbb-probe exists"), make("tw00bbbb"):
        pass
    assert not (state_dir / "tw00bbbb.json").exists() and (ns_dir / "tw00bbbb-probe").exists()


@pytest.mark.parametrize("kind", ["Testbed", "DirectLink"])
def test_a_failed_start_removes_only_the_namespaces_it_created(fake_namespaces, monkeypatch, kind):
    """Someone else makes <id>-cli between the check and its creation: the teardown leaves it alone."""
    ns_dir, state_dir, created = fake_namespaces
    create = topology.create_netns

    def racing_create(name):
        if name.endswith("-cli"):
            (ns_dir / name).write_text("")  # another process got there first
        create(name)

    monkeypatch.setattr(topology, "create_netns", racing_create)
    tb = topology.Testbed(EmulatorConfig(), run_id="tw00cccc") if kind == "Testbed" else topology.DirectLink(
        run_id="tw00cccc")
    with pytest.raises(netns.NamespaceExists, match="namespace tw00cccc-cli already exists"), tb:
        pass
    assert created == ["tw00cccc-srv"]
    assert not (ns_dir / "tw00cccc-srv").exists()  # ours: removed
    assert (ns_dir / "tw00cccc-cli").exists()  # not ours: left alone
    assert not (state_dir / "tw00cccc.json").exists()


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("kind", ["Testbed", "DirectLink"])
def test_a_second_start_under_a_live_run_id_leaves_the_live_run_alone(kind, capsys):
    from tokenwire.daemon.cli import main

    with topology.Testbed(EmulatorConfig()) as live:
        state_path = netns.RunState(live.run_id, 0).path
        with open(state_path) as fh:
            before = fh.read()
        make = topology.Testbed if kind == "Testbed" else topology.DirectLink
        with pytest.raises(netns.TestbedError, match=f"run id {live.run_id} is in use"), make(run_id=live.run_id):
            pass
        if kind == "Testbed":  # the hidden `up --run-id` of `up --detach`'s child, typed by hand
            assert main(["testbed", "up", "--run-id", live.run_id]) == 2
            assert "is in use" in capsys.readouterr().err
        assert netns.netns_exists(live.server_ns) and netns.netns_exists(live.client_ns)
        with open(state_path) as fh:
            assert fh.read() == before
        assert live.stats()["down"] is not None  # its emulator still answers
    assert not netns.netns_exists(live.server_ns) and not os.path.exists(state_path)


# -- 3. --keep DIR: no temporary folder at all (one was made anyway, recorded nowhere: SIGKILL left it behind)
class _Stop(Exception):
    pass


def test_compare_with_keep_makes_no_temporary_folder(private_tmp, tmp_path, monkeypatch):
    from tokenwire.testbed import compare

    seen = []

    def fake_run_scheme(scheme, cfg, seed, wd, progress=None, *, scratch=None):
        seen.append((wd, scratch, sorted(os.listdir(private_tmp))))
        raise _Stop

    monkeypatch.setattr(compare, "run_scheme", fake_run_scheme)
    cfg = CompareConfig(down_trace="12mbps", up_trace="12mbps", schemes=["stream"], tokens=5)
    keep = str(tmp_path / "keep")
    with pytest.raises(_Stop):
        compare.run_compare(cfg, workdir=keep)
    assert seen == [(keep, None, [])]  # nothing under the temporary directory while it runs
    with pytest.raises(_Stop):
        compare.run_compare(cfg)
    wd, scratch, listing = seen[1]
    assert scratch == wd and os.path.dirname(wd) == str(private_tmp) and listing == [os.path.basename(wd)]


def test_swiftqueue_with_keep_makes_no_temporary_folder(private_tmp, tmp_path, monkeypatch):
    from tokenwire.testbed import swiftqueue_netns

    seen = []

    def fake_policy(cfg, name, wd, progress=None, *, scratch=None):
        seen.append((wd, scratch, sorted(os.listdir(private_tmp))))
        raise _Stop

    monkeypatch.setattr(swiftqueue_netns, "run_netns_policy", fake_policy)
    cfg = SwiftQueueConfig(down_trace="12mbps", policies=["l4s"], seconds=2)
    keep = str(tmp_path / "keep")
    with pytest.raises(_Stop):
        swiftqueue_netns.run_netns_all(cfg, workdir=keep)
    assert seen == [(keep, None, [])]
    with pytest.raises(_Stop):
        swiftqueue_netns.run_netns_all(cfg)
    assert seen[1][1] == seen[1][0] and os.path.dirname(seen[1][0]) == str(private_tmp)


def test_kv_with_keep_makes_no_temporary_folder(private_tmp, tmp_path, monkeypatch):
    from tokenwire.testbed import kv_eval

    seen = []

    def fake_prepare(cfg, kv_path, log):
        seen.append((os.path.dirname(kv_path), sorted(os.listdir(private_tmp))))
        raise _Stop

    monkeypatch.setattr(kv_eval, "prepare_context", fake_prepare)
    cfg = kv_eval.KVEvalConfig(down_trace="12mbps", up_trace="12mbps")
    keep = str(tmp_path / "keep")
    with pytest.raises(_Stop):
        kv_eval.run_kv_eval(cfg, workdir=keep)
    assert seen == [(keep, [])]


# -- 4. a scheme listed twice ran twice and the row averaged both
def test_compare_refuses_a_scheme_listed_twice():
    with pytest.raises(ValueError, match="--schemes: stream listed twice"):
        CompareConfig(down_trace="12mbps", up_trace="12mbps", schemes=["stream", "chatterbox", "stream"]).validate()


# -- 5. trace files without newlines or with binary bytes: bounded memory, the usual one-line TraceError
def test_a_huge_line_without_newline_is_refused_in_bounded_memory(tmp_path):
    path = tmp_path / "zeros.bin"
    with open(path, "wb") as fh:
        fh.truncate(32 << 20)  # 32 MiB of NUL bytes, no newline (a sparse stand-in for /dev/zero)
    tracemalloc.start()
    try:
        with pytest.raises(TraceError, match=r"zeros\.bin:1: not a text trace \(control character '\\x00'\)"):
            load_trace(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak  # a few chunks of 1 MiB, not the whole line
    digits = tmp_path / "digits"
    digits.write_text("7" * (3 << 20))  # one line of 3 million digits
    with pytest.raises(TraceError, match=rf"digits:1: line longer than {MAX_LINE_CHARS} characters"):
        load_trace(str(digits))


def test_nul_and_control_bytes_and_long_lines_name_their_line(tmp_path):
    cases = {
        "1\n2\x00\n3\n": r":2: not a text trace \(control character '\\x00'\)",
        "1\n2\n3 \x1c\n": r":3: not a text trace \(control character '\\x1c'\)",  # str.strip() took it as a blank
        "1\n" + " " * MAX_LINE_CHARS + "2\n": rf":2: line longer than {MAX_LINE_CHARS} characters",
    }
    for k, (text, error) in enumerate(cases.items()):
        path = tmp_path / f"t{k}"
        path.write_text(text)
        with pytest.raises(TraceError, match=error) as info:
            load_trace(str(path))
        assert str(info.value).startswith(f"{path}:") and len(str(info.value)) < 200
    fine = tmp_path / "fine"
    fine.write_text("1\n" + " " * (MAX_LINE_CHARS - 1) + "2\r\n\t3\x0c\n4")  # blanks, CRLF, no final newline
    assert list(load_trace(str(fine)).stamps_ms) == [1, 2, 3, 4]


def test_line_numbers_and_values_across_chunks(tmp_path):
    """Lines are cut from fixed-size chunks now: a line across a chunk boundary is read whole, and counted once."""
    n = 400_000  # about 2.7 MB: three chunks
    path = tmp_path / "long"
    path.write_text("".join(f"{i}\n" for i in range(1, n + 1)) + "oops\n")
    with pytest.raises(TraceError, match=rf"long:{n + 1}: expected an integer ms timestamp, got 'oops'"):
        load_trace(str(path))
    path.write_text("".join(f"{i}\n" for i in range(1, n + 1)))
    tr = load_trace(str(path))
    assert len(tr) == n and tr.stamps_ms[0] == 1 and tr.stamps_ms[-1] == n


# -- 6. messages
def test_a_rate_out_of_range_is_not_a_missing_file():
    for spec in ("1e400mbps", "1e-400kbps"):
        with pytest.raises(TraceError, match=f"rate {spec} is out of range: a fixed rate is 10 bit/s to 100000"):
            trace_from_spec(spec)
        with pytest.raises(TraceError, match="out of range"):
            DirectionConfig(spec).validate()


def test_the_zero_period_error_names_the_path_as_given(tmp_path):
    path = tmp_path / "zeros"
    path.write_text("0\n0\n")
    with pytest.raises(TraceError) as info:
        load_trace(str(path))
    assert str(info.value) == f"{path}: the last timestamp must be > 0 (it is the repeat period)"


def test_cross_help_docs_and_error_list_every_accepted_kind():
    from tokenwire.daemon.cli import build_parser
    from tokenwire.testbed.traffic import parse_cross

    accepted = ["tcp:cubic", "tcp:bbr", "tcp:reno", "udp-ect1:2mbps", "onoff-ect1:2mbps:100:100"]
    for spec in accepted:
        parse_cross(spec)
    written = ["tcp:cubic", "tcp:bbr", "tcp:reno", "udp-ect1:RATE", "onoff-ect1:RATE:ON_MS:OFF_MS"]
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["testbed"]
    compare_parser = next(a for a in sub._actions if a.dest == "testbed_cmd").choices["compare"]
    cross_help = " ".join(next(a.help for a in compare_parser._actions if a.dest == "cross").split())
    with pytest.raises(ValueError) as info:
        parse_cross("tcp:vegas")
    with open(DOCS) as fh:
        docs = fh.read()
    docs_usage = next(line for line in docs.splitlines() if "[--cross " in line)
    for spec in written:
        assert spec in cross_help and spec in str(info.value) and spec in docs_usage, spec


def test_sse_client_failures_are_one_line(tmp_path):
    """`--schemes sse-tcp --loss iid:1` ended with an aiohttp traceback (escaped newlines) as the error line."""
    from tokenwire.testbed.child import Child, ChildError

    with socket.socket() as s:  # a port nobody listens on: refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "tokenwire.testbed.endpoints", "client", "--scheme", "sse-tcp", "--host",
            "127.0.0.1", "--port", str(port), "--out", str(tmp_path / "out.json"), "--timeout", "20"]
    err = tmp_path / "client.stderr"
    with open(err, "w") as fh:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=fh, text=True)
    with proc:  # (its pipes closed at the end: left open, they were a ResourceWarning in a later test)
        try:
            with pytest.raises(ChildError) as info:
                Child(proc, "sse-tcp client", str(err)).wait_for("connected", 30)
        finally:
            proc.kill()
            proc.wait()
    assert str(info.value).startswith("sse-tcp client: ClientConnectorError: Cannot connect to host 127.0.0.1")
    assert "\n" not in str(info.value)


def test_sse_client_timeouts_say_no_answer_before_the_deadline(monkeypatch):
    import argparse
    import asyncio

    import aiohttp

    from tokenwire.testbed import endpoints, sse

    async def times_out(*args, **kwargs):
        raise aiohttp.ConnectionTimeoutError("Connection timeout to host http://10.213.0.1:8443/health")

    monkeypatch.setattr(sse, "sse_client", times_out)
    args = argparse.Namespace(host="10.213.0.1", port=8443, tokens=5, rate=30.0, seed=0, timeout=5.0)
    with pytest.raises(endpoints.EndpointFailed) as info:
        asyncio.run(endpoints._sse_client(args, None, lambda k: None))
    assert str(info.value) == ("no answer before the deadline (Connection timeout to host "
                               "http://10.213.0.1:8443/health)")


def test_swiftqueue_plot_of_one_policy_gives_no_legend_warning(tmp_path):
    pytest.importorskip("matplotlib")
    from types import SimpleNamespace

    from tokenwire.testbed.swiftqueue_plot import plot_swiftqueue

    records = [{"t": 0.01 * i, "latency_ms": 20.0 + i % 3, "ecn": 2} for i in range(50)]
    summary = {"policies": {"classic": {"p99_ms": 22.0, "l_share": 0.0}}, "config": {"down_trace": "12mbps"},
               "backend": "userspace"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "No artists with labels found to put in legend" was a UserWarning
        plot_swiftqueue(summary, {"classic": SimpleNamespace(records=records)}, str(tmp_path / "sq.png"))
    assert (tmp_path / "sq.png").stat().st_size > 1000
