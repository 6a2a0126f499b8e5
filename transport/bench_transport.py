"""``tokenwire bench transport``: CPU per token and per token packet on each side, and packets/s on loopback.

The baseline is raw aioquic DATAGRAM frames of the same size, measured in the same run: one token per
frame, one ``transmit()`` for the tokens due at once (at most 64, as the SDK server sends once per loop
turn), no acknowledgements of our own. The server runs in a subprocess so
that each side's CPU time is its own process's. Two workloads per mode:

* ``paced``: tokens at ``--rate`` per second, CPU microseconds per token and per token packet on each side
  (one token per packet while the rate leaves a loop turn between tokens; the SDK server sends once per loop
  turn, so tokens due in the same turn share a packet);
* ``flood``: tokens as fast as the sender can go, token packets and delivered tokens per second, both over the
  client's clock (from its request to the answer's end), so the two columns divide the same time.

A *token packet* is a 1-RTT packet the server sends that asks for an acknowledgement (it carries DATAGRAM or
STREAM frames: tokens). The server also sends ACK-only packets, for the acknowledgements and reports the
Chatterbox client sends back when no token packet leaves within the ACK's hold (:mod:`.ack_timing`: paced tokens
closer than 20 ms carry every ACK); those are in ``server_datagrams`` but divide nothing: counted as packets they
made Chatterbox look cheaper per packet than raw aioquic while it cost about twice as much per token.
Both sides' per-packet CPU divides by the server's token packets (on loopback every one arrives).

Every number is the median of ``--repeats`` runs; ratios compare tokenwire to raw aioquic, per token (not per
flood packet: raw aioquic coalesces many DATAGRAM frames into one packet when flooding, so packets/s do not
compare).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tokenwire.daemon.bench_cli import die_with_parent

MODES = ("raw", "chatterbox", "stream", "duplicate")
TOKEN = b" tok"  # 4 bytes: a typical token


def register(sub: argparse._SubParsersAction) -> None:
    from tokenwire.daemon.cli import positive_float, positive_int

    p = sub.add_parser("transport", help="CPU per token and per token packet, packets/s, on loopback vs raw aioquic")
    p.add_argument("--tokens", type=positive_int, default=3000, help="tokens per paced run (default 3000)")
    p.add_argument("--rate", type=positive_float, default=1000.0, help="paced token rate per second (default 1000)")
    p.add_argument("--flood-tokens", type=positive_int, default=10000, help="tokens per flood run (default 10000)")
    p.add_argument("--repeats", type=positive_int, default=3, help="runs per mode; medians are reported (default 3)")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"subset of {','.join(MODES)}; raw (the ratios' baseline) is always measured")
    p.add_argument("--json", type=Path, help="write results here")
    p.set_defaults(handler=run_cli)


# --------------------------------------------------------------------------------------------- server side
def _cpu() -> float:
    return time.process_time()


def _due(n: int, rate: float, t0: float) -> int:
    """Tokens that should have been sent by now at ``rate`` (all of them when flooding)."""
    return n if rate <= 0 else min(n, int((time.monotonic() - t0) * rate) + 1)


async def _pace(sent: int, n: int, rate: float, t0: float) -> None:
    """Sleep until the next token is due (real sleeps: uvloop timers are 1 ms, shorter ones would spin)."""
    if rate <= 0 or sent >= n:
        await asyncio.sleep(0)
        return
    wait = t0 + sent / rate - time.monotonic()
    await asyncio.sleep(max(wait, 0.001))


async def _serve(mode: str) -> None:
    """Subprocess entry: serve one workload per connection, print a JSON line per finished workload."""
    from aioquic.asyncio import serve as quic_serve
    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.quic import events as qe
    from aioquic.tls import Epoch

    from tokenwire.transport.server import PIECES_PER_TURN as BATCH  # the baseline's frames per transmit() at most
    from tokenwire.transport.server import ServerProtocol, TokenServer
    from tokenwire.transport.session_events import RequestCompleted, RequestReceived
    from tokenwire.transport.tls import server_configuration

    def report(tokens: int, counter: CountingSend, cpu: float, wall: float) -> None:
        print(json.dumps({"tokens": tokens, "datagrams": counter.n, "token_packets": counter.token_packets,
                          "cpu_s": cpu, "wall_s": wall}), flush=True)

    class CountingSend:
        """Counts the UDP datagrams a connection sends and, of its QUIC packets, the token packets."""

        def __init__(self, proto: Any) -> None:
            self.proto = proto
            self.n = 0
            self.token_packets = 0
            real = proto._transport.sendto

            def sendto(data: bytes, addr: Any) -> None:
                self.n += 1
                real(data, addr)

            proto._transport = _Proxy(proto._transport, sendto)
            loss = proto._quic._loss
            real_sent = loss.on_packet_sent

            def on_packet_sent(*, packet: Any, space: Any) -> None:
                if packet.is_ack_eliciting and packet.epoch == Epoch.ONE_RTT:
                    self.token_packets += 1
                real_sent(packet=packet, space=space)

            loss.on_packet_sent = on_packet_sent

    if mode == "raw":

        class RawServer(QuicConnectionProtocol):
            def quic_event_received(self, event: qe.QuicEvent) -> None:
                if isinstance(event, qe.StreamDataReceived) and event.data.startswith(b"go "):
                    _, n, rate = event.data.split()
                    self.task = asyncio.ensure_future(self.blast(event.stream_id, int(n), float(rate)))

            async def blast(self, sid: int, n: int, rate: float) -> None:
                counter = CountingSend(self)
                cpu0, t0 = _cpu(), time.monotonic()
                payload = b"\x00" * 20 + TOKEN  # about the size of a one-token frame
                sent = 0
                while sent < n:
                    due = _due(n, rate, t0)
                    while sent < due:
                        self._quic.send_datagram_frame(payload)
                        sent += 1
                        if sent == due or sent % BATCH == 0:
                            # as the SDK server sends: once per loop turn, for the tokens due in it (64 at most
                            # before the loop gets a turn); one transmit() per frame made tokenwire look cheaper
                            # per token than the baseline once the server batched
                            self.transmit()
                    await _pace(sent, n, rate, t0)
                self._quic.send_stream_data(sid, b"done", end_stream=True)
                self.transmit()
                wall = time.monotonic() - t0  # the sending time: tokenwire's modes are timed the same way
                await asyncio.sleep(0.05)  # let the last acks arrive (their CPU counts, the wait does not)
                report(n, counter, _cpu() - cpu0, wall)

        server = await quic_serve("127.0.0.1", 0, configuration=server_configuration(), create_protocol=RawServer)
    else:

        async def source(request: Any):
            n = int(request.params["n"])
            rate = float(request.params["rate"])
            t0 = time.monotonic()
            sent = 0
            while sent < n:
                due = _due(n, rate, t0)
                while sent < due:
                    yield TOKEN.decode()
                    sent += 1
                await _pace(sent, n, rate, t0)

        class BenchProtocol(ServerProtocol):
            def handle_session_events(self, events: list) -> None:
                for ev in events:
                    if isinstance(ev, RequestReceived):
                        self.counter = CountingSend(self)
                        self.cpu0, self.t0 = _cpu(), time.monotonic()
                super().handle_session_events(events)
                for ev in events:
                    if isinstance(ev, RequestCompleted):
                        report(
                            int(self.app.stats.tokens),
                            self.counter,
                            _cpu() - self.cpu0,
                            time.monotonic() - self.t0,
                        )
                        self.app.stats.tokens = 0

        app = TokenServer(source)
        server = await quic_serve(
            "127.0.0.1",
            0,
            configuration=server_configuration(),
            create_protocol=functools.partial(BenchProtocol, app=app),
        )
    port = server._transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]  # set: serving
    print(json.dumps({"port": port}), flush=True)
    await asyncio.Event().wait()


class _Proxy:
    """Wraps a datagram transport so the bench can count ``sendto`` calls."""

    def __init__(self, inner: Any, sendto: Any) -> None:
        self._inner = inner
        self.sendto = sendto

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# --------------------------------------------------------------------------------------------- client side
async def _client_run(mode: str, port: int, n: int, rate: float) -> dict[str, Any]:
    from aioquic.asyncio import connect as quic_connect
    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.quic import events as qe

    from tokenwire.transport.client import connect
    from tokenwire.transport.tls import client_configuration

    if mode == "raw":
        done = asyncio.Event()
        got = {"n": 0, "udp": 0}

        class RawClient(QuicConnectionProtocol):
            def datagram_received(self, data: Any, addr: Any) -> None:
                got["udp"] += 1
                super().datagram_received(data, addr)

            def quic_event_received(self, event: qe.QuicEvent) -> None:
                if isinstance(event, qe.DatagramFrameReceived):
                    got["n"] += 1
                elif isinstance(event, qe.StreamDataReceived) and event.end_stream:
                    done.set()

        config = client_configuration(verify=False)
        async with quic_connect("127.0.0.1", port, configuration=config, create_protocol=RawClient) as proto:
            cpu0, t0 = _cpu(), time.monotonic()
            sid = proto._quic.get_next_available_stream_id()
            proto._quic.send_stream_data(sid, f"go {n} {rate}".encode())
            proto.transmit()
            await done.wait()
            wall = time.monotonic() - t0  # to the end of the answer, as for tokenwire's modes (not the wait below)
            await asyncio.sleep(0.05)
            return {
                "tokens": got["n"],
                "datagrams": got["udp"],
                "cpu_s": _cpu() - cpu0,
                "wall_s": wall,
            }

    # the server subprocess made its own development certificate: nothing to verify it against
    # ecn=False: the raw-aioquic baseline reads with uvloop's transport, and so must this client (the SDK's default
    # Python recvmsg socket costs ~2 us more per datagram: the ratio would measure sockets, not the protocol)
    async with connect("127.0.0.1", port, verify=False, ecn=False) as conn:
        proto = conn._protocol
        counter = {"udp": 0}
        real = proto.datagram_received

        def counting(data: Any, addr: Any) -> None:
            counter["udp"] += 1
            real(data, addr)

        proto.datagram_received = counting  # type: ignore[method-assign]
        cpu0, t0 = _cpu(), time.monotonic()
        stream = conn.chat("bench", scheme=mode, params={"n": n, "rate": rate})
        await stream.collect()
        assert stream.stats is not None and stream.stats.digest_verified
        return {
            "tokens": stream.stats.tokens,
            "datagrams": counter["udp"],
            "cpu_s": _cpu() - cpu0,
            "wall_s": time.monotonic() - t0,
        }


def _one(mode: str, n: int, rate: float) -> dict[str, Any]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenwire.transport.bench_transport", "--serve", mode],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=die_with_parent(),  # a SIGKILL of the benchmark, where no finally runs, left it serving
    )
    try:
        assert proc.stdout is not None
        port = json.loads(proc.stdout.readline())["port"]
        import uvloop

        client = uvloop.run(_client_run(mode, port, n, rate))
        server = json.loads(proc.stdout.readline())
    finally:
        try:
            proc.kill()
            proc.wait()
        finally:  # once reaped (or not, if the wait itself was cut short): every run leaked its stdout pipe
            if proc.stdout is not None:
                proc.stdout.close()
    return _figures(server, client, n)


def _figures(server: dict[str, Any], client: dict[str, Any], n: int) -> dict[str, Any]:
    """One run's numbers from the two sides' reports: per token, and per *token* packet (ACK-only excluded)."""
    packets = max(1, server["token_packets"])
    return {
        "server_us_per_packet": 1e6 * server["cpu_s"] / packets,
        "client_us_per_packet": 1e6 * client["cpu_s"] / packets,
        "server_us_per_token": 1e6 * server["cpu_s"] / max(1, n),
        "client_us_per_token": 1e6 * client["cpu_s"] / max(1, n),
        "server_token_packets": server["token_packets"],
        "server_datagrams": server["datagrams"],  # token packets + ACK-only ones
        "client_datagrams": client["datagrams"],
        "tokens": client["tokens"],
        "wall_s": client["wall_s"],
        # both over the client's time to the answer's end (packets/s was over the server's sending time: the two
        # flood columns divided different clocks)
        "tokens_per_s": client["tokens"] / max(1e-9, client["wall_s"]),  # delivered (raw datagrams may be lost)
        "packets_per_s": server["token_packets"] / max(1e-9, client["wall_s"]),
    }


def _ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each tokenwire mode against raw aioquic: CPU per token (the cost that matters) and per token packet."""
    raw = results["raw"]
    return {
        mode: {
            "server_cpu_per_token_vs_raw": r["server_us_per_token"] / raw["server_us_per_token"],
            "client_cpu_per_token_vs_raw": r["client_us_per_token"] / raw["client_us_per_token"],
            "server_cpu_per_token_packet_vs_raw": r["server_us_per_packet"] / raw["server_us_per_packet"],
            "client_cpu_per_token_packet_vs_raw": r["client_us_per_packet"] / raw["client_us_per_packet"],
            "flood_tokens_per_s_vs_raw": r["flood_tokens_per_s"] / raw["flood_tokens_per_s"],
        }
        for mode, r in results.items()
        if mode != "raw"
    }


def _measure(modes: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Each mode's medians over ``--repeats`` paced and flood runs."""
    results: dict[str, Any] = {}
    for mode in modes:
        paced, flood = [], []
        for k in range(args.repeats):
            print(f"  {mode}: run {k + 1}/{args.repeats} ...", file=sys.stderr, flush=True)
            paced.append(_one(mode, args.tokens, args.rate))
            flood.append(_one(mode, args.flood_tokens, 0.0))
        med = lambda rs, key: statistics.median(r[key] for r in rs)  # noqa: E731
        results[mode] = {
            "server_us_per_packet": med(paced, "server_us_per_packet"),
            "client_us_per_packet": med(paced, "client_us_per_packet"),
            "server_us_per_token": med(paced, "server_us_per_token"),
            "client_us_per_token": med(paced, "client_us_per_token"),
            "paced_packets_per_token": med(paced, "server_token_packets") / args.tokens,
            "paced_datagrams_per_token": med(paced, "server_datagrams") / args.tokens,  # ACK-only ones included
            "flood_tokens_per_s": med(flood, "tokens_per_s"),
            "flood_packets_per_s": med(flood, "packets_per_s"),
            "flood_tokens_per_packet": med(flood, "tokens") / max(1.0, med(flood, "server_token_packets")),
        }
    return results


MAX_PACED_S = 3600.0
"""The longest paced run ``--tokens`` / ``--rate`` may ask for (each mode runs it ``--repeats`` times)."""


def with_raw_baseline(modes: list[str]) -> list[str]:
    """``modes`` with raw aioquic first, added (and said so on stderr) when missing.

    Without it ``--modes chatterbox`` wrote ``"ratios_vs_raw_aioquic": {}`` and exited 0: the same-run baseline,
    the only yardstick on a shared machine, silently disappeared.
    """
    if "raw" in modes:
        return modes
    print("(--modes has no raw: raw aioquic added as the same-run baseline of the ratios)", file=sys.stderr)
    return ["raw", *modes]


def run_cli(args: argparse.Namespace) -> int:
    from tokenwire.daemon.cli import CLIError, repeated, write_json
    from tokenwire.testbed.cli import sigterm_as_ctrl_c

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise CLIError(f"--modes takes a subset of {','.join(MODES)}")
    twice = sorted(repeated(modes))
    if twice:  # the results are keyed by mode: a second listing ran it again and kept only the last
        raise CLIError(f"--modes: {', '.join(twice)} listed twice")
    # a paced run is a token rate a model can have, and a bounded wait: --rate 1e12 made every token due at once
    # (a second flood, reported as the paced numbers), and a tiny rate ran for days
    from tokenwire.daemon.demo_upstream import MAX_RATE, MIN_RATE

    if not MIN_RATE <= args.rate <= MAX_RATE:
        raise CLIError(f"--rate {args.rate:g}: a paced rate is within [{MIN_RATE:g}, {MAX_RATE:g}] tokens/s (the demo "
                       "upstream's range, a model's); the flood runs measure the sender at its own pace")
    if args.tokens / args.rate > MAX_PACED_S:
        raise CLIError(f"--tokens {args.tokens} at --rate {args.rate:g}/s: a paced run of "
                       f"{args.tokens / args.rate:,.0f} s, at most {MAX_PACED_S:g} (it runs --repeats times per mode)")
    modes = with_raw_baseline(modes)
    # SIGTERM or SIGHUP (kill, a timeout) unwinds like Ctrl-C: _one's finally stops the server subprocess, which
    # the default action left serving for good
    with sigterm_as_ctrl_c():
        results = _measure(modes, args)
    ratios = _ratios(results)
    out = {
        "modes": results,
        "ratios_vs_raw_aioquic": ratios,
        "flood_clock": "client: from its request to the answer's end (flood_tokens_per_s, flood_packets_per_s)",
        "config": {
            "tokens": args.tokens,
            "rate": args.rate,
            "flood_tokens": args.flood_tokens,
            "repeats": args.repeats,
        },
    }
    print("(pkt: token packet, the server's ack-eliciting packets; dgram: every datagram it sent, ACK-only too;\n"
          " flood pkt/s and tok/s: per second of the client's clock, from its request to the answer's end)")
    print(
        f"{'mode':<11} {'srv us/tok':>10} {'cli us/tok':>10} {'srv us/pkt':>10} {'cli us/pkt':>10} "
        f"{'pkts/token':>10} {'dgrams/tok':>10} {'flood pkt/s':>12} {'flood tok/s':>12}"
    )
    for mode, r in results.items():
        print(
            f"{mode:<11} {r['server_us_per_token']:>10.1f} {r['client_us_per_token']:>10.1f} "
            f"{r['server_us_per_packet']:>10.1f} {r['client_us_per_packet']:>10.1f} "
            f"{r['paced_packets_per_token']:>10.2f} {r['paced_datagrams_per_token']:>10.2f} "
            f"{r['flood_packets_per_s']:>12.0f} {r['flood_tokens_per_s']:>12.0f}"
        )
    for mode, r in ratios.items():
        # raw aioquic coalesces many DATAGRAM frames into one packet when flooding: packets/s do not compare
        print(
            f"{mode}: CPU per token {r['server_cpu_per_token_vs_raw']:.2f}x raw (server), "
            f"{r['client_cpu_per_token_vs_raw']:.2f}x (client); per token packet "
            f"{r['server_cpu_per_token_packet_vs_raw']:.2f}x / {r['client_cpu_per_token_packet_vs_raw']:.2f}x; "
            f"flood tokens/s {r['flood_tokens_per_s_vs_raw']:.2f}x raw "
            f"({results[mode]['flood_tokens_per_packet']:.1f} tokens/packet, raw "
            f"{results['raw']['flood_tokens_per_packet']:.1f})"
        )
    if args.json:
        write_json(out, args.json)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        import uvloop

        try:
            uvloop.run(_serve(sys.argv[2]))
        except KeyboardInterrupt:  # a terminal's Ctrl-C reaches the whole process group: the parent reports it
            sys.exit(130)
