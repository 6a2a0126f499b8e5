"""Per-packet ECN marking end to end in namespaces: codepoints on captured packets, the swiftqueue run (root)."""

import itertools
import json
import os
import subprocess
import sys
import threading
import time

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no TUN device"),
]

from tokenwire.testbed.child import Child  # noqa: E402
from tokenwire.testbed.emulator import DirectionConfig, EmulatorConfig  # noqa: E402
from tokenwire.testbed.pktlog import read_packet_log  # noqa: E402
from tokenwire.testbed.queue_oracle import OracleBoard  # noqa: E402
from tokenwire.testbed.topology import Testbed  # noqa: E402

PORT = 8443


def _endpoint(tb, role, out, extra):
    argv = [sys.executable, "-m", "tokenwire.testbed.endpoints", role, "--scheme", "chatterbox", "--host",
            tb.server_addr, "--port", str(PORT), "--out", str(out), "--tokens", "150", "--rate", "100",
            "--timeout", "60", *extra]
    ns = tb.server_ns if role == "server" else tb.client_ns
    proc = tb.popen(ns, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    return Child(proc, role)


def test_a_quic_flow_switches_codepoints_per_packet_and_the_capture_shows_each_one(tmp_path):
    """The SDK server's packets carry the codepoint the policy chose *per packet*, as the pcap records.

    The oracle policy reads a board this test writes: L faster for 60 ms, then C faster, and so on. So one
    QUIC connection must put both ECT(1) and ECT(0) on the wire in alternating runs; with an infinite queue
    the emulator changes nothing, so what leaves equals what entered, packet by packet.
    """
    import scapy.layers.inet6  # noqa: F401 - registers LINKTYPE_RAW (101) with the pcap reader
    from scapy.utils import rdpcap

    prefix = str(tmp_path / "cap")
    log = str(tmp_path / "log.csv")
    board_path = str(tmp_path / "board")
    board = OracleBoard(board_path, create=True)
    cfg = EmulatorConfig(down=DirectionConfig("20mbps", 5.0), up=DirectionConfig("20mbps", 5.0), log_path=log,
                         pcap_prefix=prefix)
    stop = threading.Event()

    def flip() -> None:
        k = 0
        while not stop.is_set():
            board.publish(time.monotonic(), *((1.0, 9.0) if (k // 12) % 2 == 0 else (9.0, 1.0)))
            k += 1
            time.sleep(0.005)

    writer = threading.Thread(target=flip, daemon=True)
    writer.start()
    try:
        with Testbed(cfg, backend="userspace") as tb:
            srv = _endpoint(tb, "server", tmp_path / "srv.json", ["--marking", "oracle", "--oracle-file", board_path])
            srv.wait_for("ready", 30)
            cli = _endpoint(tb, "client", tmp_path / "cli.json", ["--marking", "oracle"])
            cli.wait_for("connected", 30)
            cli.send("go")
            done = cli.wait_for("done", 60)
            srv.send("stop")
            srv.wait_for("stopped", 15)
    finally:
        stop.set()
        writer.join(2)
        board.close()
    assert done["rendered"] == 150
    decisions = json.loads((tmp_path / "srv.json").read_text())["marking"]["decisions"]
    assert decisions["l"] > 20 and decisions["c"] > 20

    def flow(pcap):
        return [p for p in rdpcap(pcap) if p.haslayer("UDP") and p["UDP"].sport == PORT]

    ins, outs = flow(prefix + ".down.in.pcap"), flow(prefix + ".down.out.pcap")
    cps = [p["IP"].tos & 3 for p in ins]
    assert set(cps) == {0b01, 0b10}  # ECT(1) and ECT(0) only: never Not-ECT, never CE from the sender
    runs = sum(1 for a, b in itertools.pairwise(cps) if a != b)
    assert runs >= 6  # switched back and forth within the one connection
    assert len(ins) == len(outs)
    for a, b in zip(ins, outs, strict=True):  # per packet: same bytes, same codepoint on the far side
        assert bytes(a["IP"]) == bytes(b["IP"])
    # the emulator's per-packet log agrees with the capture
    rows = [r for r in read_packet_log(log) if r["dir"] == "down" and r["sport"] == str(PORT)]
    assert [r["ecn_in"] for r in rows] == [{1: "ect1", 2: "ect0"}[c] for c in cps]


def test_swiftqueue_namespace_run_reports_every_policy(tmp_path):
    """A short real run of ``tokenwire testbed swiftqueue`` (l4s and oracle): JSON shape and sanity."""
    from tokenwire.testbed.swiftqueue_eval import METRIC_KEYS, SwiftQueueConfig
    from tokenwire.testbed.swiftqueue_netns import run_netns_all

    cfg = SwiftQueueConfig(down_trace="12mbps", delay_ms=10.0, queue="dualpi2", policies=["l4s", "oracle"],
                           seconds=4.0, flow="tokens:50", cross=["udp-ect1:2mbps"])
    summary, _runs = run_netns_all(cfg, workdir=str(tmp_path))
    assert summary["backend"] == "userspace" and summary["config"]["policies"] == ["l4s", "oracle"]
    for name in ("l4s", "oracle"):
        d = summary["policies"][name]
        assert set(METRIC_KEYS) <= set(d) and d["digest_ok"] is True
        assert d["p50_ms"] >= 10.0 and d["p99_ms"] >= d["p50_ms"] and d["packets"] > 100
        assert 0.0 <= d["stall_ratio"] < 0.5
    assert summary["policies"]["l4s"]["l_share"] == 1.0
    assert "oracle" in summary["comparison"]
    assert os.path.exists(tmp_path / "oracle.oracle")  # the emulator published its estimate there
