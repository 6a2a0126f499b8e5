"""Traffic generators and sinks for the testbed: paced/flood UDP with per-packet ECN, bulk kernel TCP.

* UDP: every datagram carries ``(sequence, send time in ns)``; the sender sets the ECN bits of each packet
  with an ``IP_TOS`` control message on ``sendmsg`` (Linux honours them per packet for UDP; verified in
  ``research/swiftqueue_l4s.md`` §4.3), so a flow marked ECT(1) lands in the L queue of DualPI2. The sink
  reads the TOS byte of each datagram (``IP_RECVTOS``) and records one-way delays (both ends share the
  host's monotonic clock) and the codepoints seen (CE marks).
* TCP: a bulk sender with the congestion control of your choice (``TCP_CONGESTION``: cubic, bbr or reno here),
  and a sink that counts bytes. Kernel TCP masks the ECN bits of ``IP_TOS``, so bulk TCP is Not-ECT (or
  ECT(0) with ``net.ipv4.tcp_ecn=1``) and sits in the classic queue.

Run inside a namespace as ``python -m tokenwire.testbed.traffic ROLE ...`` (the bench and the cross-traffic
option of compare do this through :meth:`Testbed.popen`); each role prints one JSON line when ready and one
with its results.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time
from typing import Any

HEADER = struct.Struct("!IQ")  # sequence number, send time (monotonic ns)
FIN = 0xFFFFFFFF


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def udp_send(sock: socket.socket, dest: tuple[str, int], *, rate_pps: float, size: int, duration: float,
             tos: int = 0, on_s: float = 0.0, off_s: float = 0.0) -> dict[str, Any]:
    """Send for ``duration`` s at ``rate_pps`` (0 = as fast as possible); every packet carries its ECN bits.

    Pacing is by absolute deadlines (a late packet does not shift the ones after it). The sender sleeps
    between deadlines (with 1 ns timer slack, so wake-ups are tens of microseconds late) rather than
    spinning: a spinning sender would take a whole core from the emulator on a 2-core machine. With
    ``on_s > 0`` it sends only during the first ``on_s`` of every ``on_s + off_s`` cycle (bursty traffic).
    """
    from .emulator import lower_timer_slack

    lower_timer_slack()
    size = max(size, HEADER.size)
    pad = bytes(size - HEADER.size)
    cmsg = [(socket.IPPROTO_IP, socket.IP_TOS, struct.pack("i", tos))]
    interval = 1.0 / rate_pps if rate_pps > 0 else 0.0
    start = time.monotonic()
    end = start + duration
    seq = 0
    errors = 0
    cycle = on_s + off_s if on_s > 0 else 0.0
    cycle_start, in_cycle = start, 0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if cycle:
            c = int((now - start) // cycle)
            if start + c * cycle != cycle_start:
                cycle_start, in_cycle = start + c * cycle, 0
            if now - cycle_start >= on_s:
                time.sleep(max(0.0, min(end, cycle_start + cycle) - now))
                continue
        if interval:
            due = (cycle_start + in_cycle * interval) if cycle else start + seq * interval
            if due > now:
                # not past the end: a sparse flow's next packet may be due after it (or beyond what sleep takes)
                time.sleep(min(due, end) - now)
                continue
        try:
            sock.sendmsg([HEADER.pack(seq, time.monotonic_ns()), pad], cmsg, 0, dest)
        except (BlockingIOError, ConnectionRefusedError, OSError):
            errors += 1
        seq += 1
        in_cycle += 1
    for _ in range(5):  # best-effort end marker; the sink also stops after a silence
        try:
            sock.sendmsg([HEADER.pack(FIN, 0)], cmsg, 0, dest)
        except OSError:
            pass
    elapsed = time.monotonic() - start
    return {"sent": seq, "errors": errors, "elapsed": elapsed, "pps": seq / elapsed if elapsed else 0.0}


def udp_sink(sock: socket.socket, *, idle: float = 1.0, max_wait: float = 120.0,
             keep_samples: int = 200_000) -> dict[str, Any]:
    """Receive until a FIN or ``idle`` s of silence after the first packet; one-way delays and ECN counts."""
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_RECVTOS, 1)
    sock.settimeout(max_wait)
    got = 0
    ecn = [0, 0, 0, 0]
    delays_us: list[float] = []
    first = last = None
    highest = -1
    reordered = 0
    while True:
        try:
            data, anc, _flags, _addr = sock.recvmsg(65536, socket.CMSG_SPACE(4))
        except TimeoutError:
            break
        now_ns = time.monotonic_ns()
        if len(data) < HEADER.size:
            continue
        seq, sent_ns = HEADER.unpack_from(data)
        if seq == FIN:
            break
        tos = 0
        for level, kind, payload in anc:
            if level == socket.IPPROTO_IP and kind == socket.IP_TOS and payload:
                tos = payload[0]
        ecn[tos & 3] += 1
        got += 1
        if seq < highest:
            reordered += 1
        highest = max(highest, seq)
        if len(delays_us) < keep_samples:
            delays_us.append((now_ns - sent_ns) / 1000.0)
        if first is None:
            first = now_ns
            sock.settimeout(idle)
        last = now_ns
    span = (last - first) / 1e9 if first is not None and last is not None and last > first else 0.0
    return {
        "received": got, "pps": got / span if span else 0.0, "delays_us": delays_us, "reordered": reordered,
        "ecn": {"not-ect": ecn[0], "ect1": ecn[1], "ect0": ecn[2], "ce": ecn[3]}, "highest_seq": highest,
    }  # fmt: skip


def tcp_bulk_send(host: str, port: int, *, duration: float, cc: str = "cubic") -> dict[str, Any]:
    """Send as much as TCP allows for ``duration`` s with congestion control ``cc``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
    sock.connect((host, port))
    chunk = bytes(65536)
    sent = 0
    start = time.monotonic()
    sock.settimeout(1.0)
    while time.monotonic() - start < duration:
        try:
            sent += sock.send(chunk)
        except TimeoutError:
            continue
    used = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()
    sock.close()
    elapsed = time.monotonic() - start
    return {"sent_bytes": sent, "elapsed": elapsed, "cc": used}


def tcp_sink(sock: socket.socket, *, max_wait: float = 120.0) -> dict[str, Any]:
    """Accept one connection and count its bytes until it closes."""
    sock.settimeout(max_wait)
    conn, _ = sock.accept()
    total = 0
    start = time.monotonic()
    conn.settimeout(max_wait)
    while True:
        data = conn.recv(262144)
        if not data:
            break
        total += len(data)
    elapsed = time.monotonic() - start
    conn.close()
    mbps = total * 8 / elapsed / 1e6 if elapsed else 0.0
    return {"received_bytes": total, "elapsed": elapsed, "mbps": mbps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokenwire.testbed.traffic")
    p.add_argument("role", choices=("udp-send", "udp-sink", "tcp-send", "tcp-sink"))
    p.add_argument("--host", required=True, help="peer address (send) or local address (sink)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rate", type=float, default=0.0, help="UDP packets/s (0 = flood)")
    p.add_argument("--size", type=int, default=1200, help="UDP payload bytes")
    p.add_argument("--tos", type=lambda s: int(s, 0), default=0, help="TOS byte, e.g. 0x01 for ECT(1)")
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--cc", default="cubic")
    p.add_argument("--idle", type=float, default=1.0)
    p.add_argument("--delay", type=float, default=0.0, help="seconds to wait after 'ready' before sending")
    p.add_argument("--on", type=float, default=0.0, help="UDP: send only ON s of every ON+OFF s (0: always)")
    p.add_argument("--off", type=float, default=0.0, help="UDP: silent seconds per cycle with --on")
    args = p.parse_args(argv)
    if args.role == "udp-send":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        _emit({"ready": True})
        if args.delay:
            time.sleep(args.delay)
        _emit(udp_send(sock, (args.host, args.port), rate_pps=args.rate, size=args.size,
                       duration=args.duration, tos=args.tos, on_s=args.on, off_s=args.off))
    elif args.role == "udp-sink":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((args.host, args.port))
        _emit({"ready": True})
        _emit(udp_sink(sock, idle=args.idle))
    elif args.role == "tcp-send":
        _emit({"ready": True})
        _emit(tcp_bulk_send(args.host, args.port, duration=args.duration, cc=args.cc))
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        sock.listen(1)
        _emit({"ready": True})
        _emit(tcp_sink(sock))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# -- cross traffic for experiments ------------------------------------------------------------------------------
CROSS_HELP = ("tcp:cubic | tcp:bbr | tcp:reno (bulk kernel TCP, classic queue) | udp-ect1:RATE (paced UDP marked "
              "ECT(1)) | onoff-ect1:RATE:ON_MS:OFF_MS (the same, bursting)")  # also `compare --help` and its docs


CROSS_PACKET_BYTES = 1200
"""UDP payload of a cross flow's packets (28 more bytes of UDP/IP headers on the wire)."""
MIN_CROSS_PPS = 1.0
"""Slowest paced cross flow: a packet a second. Below it a "flow" is a packet now and then, which no queue
notices; and 1bps, sent as ``--rate 0.000``, was the sender's flood."""


def cross_pps(bps: float, size: int = CROSS_PACKET_BYTES) -> float:
    """Packets per second of a paced flow of ``bps`` bit/s in ``size``-byte datagrams (headers counted)."""
    return bps / (8 * (size + 28))


def min_cross_bps(size: int = CROSS_PACKET_BYTES) -> float:
    """The smallest RATE of a paced cross flow (:data:`MIN_CROSS_PPS` packets of ``size`` bytes a second)."""
    return MIN_CROSS_PPS * 8 * (size + 28)


def parse_cross(spec: str, *, size: int = CROSS_PACKET_BYTES) -> tuple[str, str]:
    """``tcp:cubic`` -> ("tcp", "cubic"); ``udp-ect1:2mbps`` -> ("udp-ect1", "2mbps"); ValueError otherwise, also for
    a RATE below :func:`min_cross_bps` (a paced flow of ``size``-byte packets cannot go that slow)."""
    from .trace import generator_bps

    kind, arg = _split_cross(spec)
    if kind != "tcp":
        rate = arg.partition(":")[0]
        bps = generator_bps(rate)
        if bps is not None and bps < min_cross_bps(size):
            raise ValueError(f"cross traffic {spec!r}: {rate} is below the slowest paced flow, "
                             f"{min_cross_bps(size):g} bit/s (one {size + 28}-byte packet a second)")
    return kind, arg


def _split_cross(spec: str) -> tuple[str, str]:
    """:func:`parse_cross` without the lower bound on RATE."""
    from .trace import generator_bps

    kind, _, arg = spec.strip().lower().partition(":")
    if kind == "tcp" and arg in ("cubic", "bbr", "reno"):
        return kind, arg
    if kind == "udp-ect1" and generator_bps(arg) is not None:
        return kind, arg
    if kind == "onoff-ect1":
        rate, _, times = arg.partition(":")
        on, _, off = times.partition(":")
        try:
            ok = generator_bps(rate) is not None and float(on) > 0 and float(off) >= 0
        except ValueError:
            ok = False
        if ok:
            return kind, arg
    raise ValueError(f"cross traffic {spec!r}: expected {CROSS_HELP}")


def start_cross(tb: Any, specs: list[str], duration: float, *, size: int = CROSS_PACKET_BYTES) -> list[Any]:
    """Start each cross flow server -> client inside ``tb`` (sinks first); returns the children.

    They run for ``duration`` seconds or until the testbed goes down, whichever comes first. A RATE below
    :func:`min_cross_bps` (a caller that did not check it with :func:`parse_cross`) is sent as the sparse flow it
    asks for, never as a flood.
    """
    import subprocess

    from .child import Child
    from .trace import generator_bps

    py = [sys.executable, "-m", "tokenwire.testbed.traffic"]
    pipe = subprocess.PIPE
    children = []
    for k, spec in enumerate(specs):
        kind, arg = _split_cross(spec)
        port = str(9300 + k)
        if kind == "tcp":
            sink = ["tcp-sink", "--host", tb.client_addr, "--port", port]
            send = ["tcp-send", "--host", tb.client_addr, "--port", port, "--cc", arg, "--duration", str(duration)]
        else:
            rate, _, times = arg.partition(":")
            bps = generator_bps(rate)
            if bps is None:  # (_split_cross accepted it: cannot happen)
                raise ValueError(f"cross traffic {spec!r}: no rate")
            # repr, exact: "%.3f" made any rate under ~5 bit/s "0.000", which the sender takes for a flood
            pps = repr(cross_pps(bps, size))
            sink = ["udp-sink", "--host", tb.client_addr, "--port", port, "--idle", "5"]
            send = ["udp-send", "--host", tb.client_addr, "--port", port, "--rate", pps, "--size",
                    str(size), "--tos", "0x01", "--duration", str(duration)]
            if kind == "onoff-ect1":
                on, _, off = times.partition(":")
                send += ["--on", str(float(on) / 1000.0), "--off", str(float(off) / 1000.0)]
        c_sink = Child(tb.popen(tb.client_ns, [*py, *sink], stdin=pipe, stdout=pipe, text=True), f"{spec} sink")
        c_sink.wait_for("ready", 15)
        c_send = Child(tb.popen(tb.server_ns, [*py, *send], stdin=pipe, stdout=pipe, text=True), f"{spec} sender")
        c_send.wait_for("ready", 15)
        children += [c_sink, c_send]
    return children


def watch_senders(children: list[Any]) -> list[Any]:
    """An :class:`.child.ExitWatch` per cross sender of :func:`start_cross`: each sends for longer than the run
    can last, so its exit is a failure (a congestion control the kernel refused, a crash) that otherwise left a
    run reported "with cross traffic" without any. Sinks are not watched: an on/off sink ends by itself after
    its idle time. The caller closes them."""
    from .child import ChildError, ExitWatch, exit_status

    def watch(c: Any) -> Any:
        name = f"cross traffic {c.name}"
        return ExitWatch(c.proc, lambda status: ChildError(f"{name} exited ({exit_status(status)}) mid-run"))

    return [watch(c) for c in children if c.name.endswith(" sender")]
