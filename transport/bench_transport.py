"""``tokenwire bench transport``: CPU per token and per token packet on each side, and packets/s on loopback.

The baseline is raw aioquic DATAGRAM frames of the same size, measured in the same run: one token per
frame, one ``transmit()`` for the tokens due at once (at most 64, as the SDK server sends once per loop
turn), no acknowledgements of our own. The server runs in a subprocess so
that each side's CPU time is its own process's. Two workloads per mode:

* ``paced``: tokens at ``--rate`` per second, CPU microseconds per token and per token packet on each side
  (one token per packet while the rate leaves a loop turn between tokens; the SDK server sends once per loop
  turn, so tokens due in the same turn share a packet);
* ``flood``: answers of ``--flood-tokens`` tokens as fast as the sender can go, one after another on one connection
  until they have lasted :data:`FLOOD_S`; token packets and delivered tokens per second, both over the client's
  clock (from each request to its answer's end, summed), so the two columns divide the same time. Raw aioquic's
  server sends its ``done`` only once its last DATAGRAM frame has left (it overtook them before).

A *token packet* is a 1-RTT packet the server sends that asks for an acknowledgement (it carries DATAGRAM or
STREAM frames: tokens). The server also sends ACK-only packets, for the acknowledgements and reports the
Chatterbox client sends back when no token packet leaves within the ACK's hold (:mod:`.ack_timing`: paced tokens
closer than 20 ms carry every ACK); those are in ``server_datagrams`` but divide nothing: counted as packets they
made Chatterbox look cheaper per packet than raw aioquic while it cost about twice as much per token.
Both sides' per-packet CPU divides by the server's token packets (on loopback every one arrives).

Runs are interleaved so that the same-run baseline absorbs a shared machine's drift: every repeat measures raw
aioquic next to each tokenwire mode (a *pair*, its two runs back to back, their order flipped every other repeat),
each ratio is taken within its pair, and the reported ratio is the median over the repeats with its min and max
(each pair's value in the JSON too). A mode's figures are medians over its runs.

Every run counts the tokens requested, sent and delivered. CPU per token divides by the tokens actually sent
(server) and delivered (client): a paced run the server cut short (once at ``TokenServer``'s default 16,384 tokens)
had its CPU divided by the tokens asked for. A run that sent fewer tokens than requested, or of a tokenwire mode
that delivered fewer than were sent, is listed in ``short_runs`` and the command exits 1; raw aioquic's DATAGRAM
frames are unreliable, so its losses are reported (``tokens_lost``) but are not a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tokenwire.daemon.bench_cli import die_with_parent, spread
from tokenwire.daemon.run_provenance import RunProvenance, run_provenance

MODES = ("raw", "chatterbox", "stream", "duplicate")
TOKEN = b" tok"  # 4 bytes: a typical token
FLOOD_S = 1.0
"""A flood run asks for answers of ``--flood-tokens`` one after another on its connection until they have lasted this
long on the client's clock (the pauses between them aside): one answer of 10,000 tokens lasted ~50 ms of raw
aioquic, too short to measure (its tokens/s swung 83k to 308k between runs), and a flood bounded by time instead had
the SDK server take in a second's tokens at once from its source and send them for 40 s."""
MAX_FLOOD_ANSWERS = 1000
"""The most answers a flood run asks for (a bound on a run whose answers are tiny)."""
DRAIN_TIMEOUT_S = 30.0
"""The raw server waits at most this long for its queued DATAGRAM frames to leave before it sends ``done``."""


def register(sub: argparse._SubParsersAction) -> None:
    from tokenwire.daemon.cli import positive_float, positive_int

    p = sub.add_parser(
        "transport", help="CPU per token and per token packet, packets/s, on loopback vs raw aioquic",
        description="Measures the tokenwire SDK's cost on loopback, server in a subprocess so that each side's "
        "CPU time is its own: CPU microseconds per token and per token packet at a paced rate, and token packets "
        "and tokens per second flooding, for each scheme against raw aioquic DATAGRAM frames of the same size. "
        "Each repeat runs raw aioquic next to each mode; ratios are taken within each pair and their median "
        "reported. Exits 1 when a run sent fewer tokens than asked, or a tokenwire mode delivered fewer than it "
        "sent (listed in short_runs).",
    )
    p.add_argument("--tokens", type=positive_int, default=1500, help="tokens per paced run (default: 1500)")
    p.add_argument("--rate", type=positive_float, default=1000.0, help="paced token rate per second (default: 1000)")
    p.add_argument("--flood-tokens", type=positive_int, default=10000,
                   help=f"tokens per flood answer; a flood run asks for answers until {FLOOD_S:g} s have passed "
                        "(default: 10000)")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="raw/mode pairs per mode; medians are reported, ratios within each pair (default: 3)")
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


async def _raw_answer(proto: Any, sid: int, n: int, rate: float) -> int:
    """Raw aioquic's answer on ``proto`` (a ``QuicConnectionProtocol``): ``n`` DATAGRAM frames, then "done N" on
    stream ``sid`` once all of them have left; N is how many left (all, unless the wait for them gave up)."""
    from tokenwire.transport.server import PIECES_PER_TURN as BATCH  # the baseline's frames per transmit() at most

    quic = proto._quic
    t0 = time.monotonic()
    payload = b"\x00" * 20 + TOKEN  # about the size of a one-token frame
    sent = 0
    while sent < n:
        due = _due(n, rate, t0)
        while sent < due:
            quic.send_datagram_frame(payload)
            sent += 1
            if sent == due or sent % BATCH == 0:
                # as the SDK server sends: once per loop turn, for the tokens due in it (64 at most before the loop
                # gets a turn); one transmit() per frame made tokenwire look cheaper per token than the baseline
                # once the server batched
                proto.transmit()
        await _pace(sent, n, rate, t0)
    # "done" only once every DATAGRAM frame has left (the congestion window holds them; each ACK sends more): a
    # STREAM frame fills the room a DATAGRAM frame does not fit in, so "done" overtook the queued frames, the
    # client stopped there and they were never sent (8,977 of 10,000 tokens arrived; 10,259 of 100,000)
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while quic._datagrams_pending and time.monotonic() < deadline:
        proto.transmit()
        await asyncio.sleep(0.001)
    sent -= len(quic._datagrams_pending)
    quic.send_stream_data(sid, f"done {sent}".encode(), end_stream=True)
    proto.transmit()
    return sent


async def _serve(mode: str) -> None:
    """Subprocess entry: serve one workload per connection, print a JSON line per finished workload."""
    from aioquic.asyncio import serve as quic_serve
    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.quic import events as qe
    from aioquic.tls import Epoch

    from tokenwire.transport.server import MAX_TOKENS_BOUND, ServerProtocol, TokenServer
    from tokenwire.transport.session_events import RequestCompleted, RequestReceived
    from tokenwire.transport.tls import server_configuration

    Counts = tuple[int, int]  # (datagrams, token packets) a connection has sent so far

    def report(tokens: int, counter: CountingSend, start: Counts, cpu: float, wall: float) -> None:
        """One answer's line: its counts since ``start``, what the connection had sent when it began."""
        n, token_packets = counter.counts()
        print(json.dumps({"tokens": tokens, "datagrams": n - start[0], "token_packets": token_packets - start[1],
                          "cpu_s": cpu, "wall_s": wall}), flush=True)

    class CountingSend:
        """Counts the UDP datagrams a connection sends and, of its QUIC packets, the token packets; one per
        connection (a flood's answers share it: one per answer wrapped the transport again)."""

        @classmethod
        def of(cls, proto: Any) -> CountingSend:
            counter: CountingSend | None = getattr(proto, "_bench_counter", None)
            if counter is None:
                counter = proto._bench_counter = cls(proto)
            return counter

        def counts(self) -> Counts:
            return self.n, self.token_packets

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
                async with self.one_at_a_time:  # a flood's next answer counts from this one's report
                    await self.answer(sid, n, rate)

            @functools.cached_property
            def one_at_a_time(self) -> asyncio.Lock:
                return asyncio.Lock()

            async def answer(self, sid: int, n: int, rate: float) -> None:
                counter = CountingSend.of(self)
                counts0, cpu0, t0 = counter.counts(), _cpu(), time.monotonic()
                sent = await _raw_answer(self, sid, n, rate)
                wall = time.monotonic() - t0  # the sending time: tokenwire's modes are timed the same way
                if rate > 0:  # (a flood's next answer follows at once: the last acks count there)
                    await asyncio.sleep(0.05)  # let the last acks arrive (their CPU counts, the wait does not)
                report(sent, counter, counts0, _cpu() - cpu0, wall)

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
                # per answer, by stream: a flood's next request can come in the datagram that completes the last one
                starts: dict[int, tuple[int, Counts, float, float]] = self.__dict__.setdefault("starts", {})
                counter = CountingSend.of(self)
                for ev in events:
                    if isinstance(ev, RequestReceived):
                        starts[ev.stream_id] = (self.app.stats.tokens, counter.counts(), _cpu(), time.monotonic())
                super().handle_session_events(events)
                for ev in events:
                    if isinstance(ev, RequestCompleted) and ev.stream_id in starts:
                        tokens0, counts0, cpu0, t0 = starts.pop(ev.stream_id)
                        report(self.app.stats.tokens - tokens0, counter, counts0, _cpu() - cpu0,
                               time.monotonic() - t0)

        # the server's limit is the protocol's bound, not serve()'s default 16,384: that cut a paced --tokens 40000
        # run to 16,384 tokens ("length") while its CPU was divided by 40,000
        app = TokenServer(source, max_tokens=MAX_TOKENS_BOUND)
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
async def _client_run(mode: str, port: int, n: int, rate: float, seconds: float = 0.0) -> dict[str, Any]:
    """One connection's workload: an answer of ``n`` tokens, and more of them one after another until ``seconds``
    have passed (a flood). Its wall time and CPU count the answers, not the pauses between them."""
    from aioquic.asyncio import connect as quic_connect
    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.quic import events as qe

    from tokenwire.transport.client import connect
    from tokenwire.transport.tls import client_configuration

    totals = {"answers": 0, "tokens": 0, "datagrams": 0, "cpu_s": 0.0, "wall_s": 0.0}

    def more() -> bool:
        """Another answer while the answers so far lasted less than ``seconds`` (the pauses between them aside)."""
        return totals["answers"] == 0 or (totals["wall_s"] < seconds and totals["answers"] < MAX_FLOOD_ANSWERS)

    def tally(tokens: int, datagrams: int, cpu_s: float, wall_s: float) -> None:
        """One answer's figures into the run's sums."""
        totals["answers"] += 1
        totals["tokens"] += tokens
        totals["datagrams"] += datagrams
        totals["cpu_s"] += cpu_s
        totals["wall_s"] += wall_s

    if mode == "raw":
        got = {"n": 0, "udp": 0}
        done = asyncio.Event()

        class RawClient(QuicConnectionProtocol):
            def datagram_received(self, data: Any, addr: Any) -> None:
                got["udp"] += 1
                super().datagram_received(data, addr)

            def quic_event_received(self, event: qe.QuicEvent) -> None:
                if isinstance(event, qe.DatagramFrameReceived):
                    got["n"] += 1
                elif isinstance(event, qe.StreamDataReceived) and event.end_stream:  # "done N"
                    done.set()

        config = client_configuration(verify=False)
        async with quic_connect("127.0.0.1", port, configuration=config, create_protocol=RawClient) as proto:
            while more():
                done.clear()
                got["n"] = got["udp"] = 0
                cpu0, t0 = _cpu(), time.monotonic()
                sid = proto._quic.get_next_available_stream_id()
                proto._quic.send_stream_data(sid, f"go {n} {rate}".encode(), end_stream=True)
                proto.transmit()
                await done.wait()  # the server sends "done" once its last DATAGRAM frame has left
                wall = time.monotonic() - t0  # to the end of the answer, as for tokenwire's modes (not the wait)
                if rate > 0:
                    await asyncio.sleep(0.05)  # the last acks (a flood's next answer follows at once)
                tally(got["n"], got["udp"], _cpu() - cpu0, wall)
            return totals

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
        while more():
            counter["udp"] = 0
            cpu0, t0 = _cpu(), time.monotonic()
            stream = conn.chat("bench", scheme=mode, params={"n": n, "rate": rate})
            await stream.collect()
            assert stream.stats is not None and stream.stats.digest_verified
            tally(stream.stats.tokens, counter["udp"], _cpu() - cpu0, time.monotonic() - t0)
        return totals


@contextlib.contextmanager
def _server_process(mode: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A bench server subprocess for ``mode`` and its port; killed, reaped and its pipe closed on the way out."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenwire.transport.bench_transport", "--serve", mode],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=die_with_parent(),  # a SIGKILL of the benchmark, where no finally runs, left it serving
    )
    try:
        assert proc.stdout is not None
        yield proc, json.loads(proc.stdout.readline())["port"]
    finally:
        try:
            proc.kill()
            proc.wait()
        finally:  # once reaped (or not, if the wait itself was cut short): every run leaked its stdout pipe
            if proc.stdout is not None:
                proc.stdout.close()


def _one(mode: str, n: int, rate: float, *, flood_s: float = FLOOD_S) -> dict[str, Any]:
    """One workload on a fresh server subprocess: one paced answer of ``n`` tokens at ``rate``, or a flood (``rate``
    0): answers of ``n`` tokens as fast as the sender goes, one after another until they have lasted ``flood_s``
    seconds (the server reports each answer; their sums are the run's)."""
    import uvloop

    with _server_process(mode) as (proc, port):
        assert proc.stdout is not None
        client = uvloop.run(_client_run(mode, port, n, rate, flood_s if rate <= 0 else 0.0))
        answers = [json.loads(proc.stdout.readline()) for _ in range(client["answers"])]
    server = {key: sum(a[key] for a in answers) for key in ("tokens", "datagrams", "token_packets", "cpu_s", "wall_s")}
    return {**_figures(server, client, n * client["answers"]), "answers": client["answers"]}


def _figures(server: dict[str, Any], client: dict[str, Any], n: int) -> dict[str, Any]:
    """One run's numbers from the two sides' reports: per token, and per *token* packet (ACK-only excluded).

    Per token divides by the tokens the server sent (its CPU) and the client received (its CPU), not by the ``n``
    asked for: a server that stopped early made each token look cheaper by the tokens it never sent."""
    packets = max(1, server["token_packets"])
    sent, delivered = int(server["tokens"]), int(client["tokens"])
    return {
        "tokens_requested": n,
        "tokens_sent": sent,
        "tokens_delivered": delivered,
        "tokens_lost": sent - delivered,
        "complete": delivered == sent == n,
        "server_us_per_packet": 1e6 * server["cpu_s"] / packets,
        "client_us_per_packet": 1e6 * client["cpu_s"] / packets,
        "server_us_per_token": 1e6 * server["cpu_s"] / max(1, sent),
        "client_us_per_token": 1e6 * client["cpu_s"] / max(1, delivered),
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


def _run_figures(paced: dict[str, Any], flood: dict[str, Any]) -> dict[str, Any]:
    """One repeat of a mode (its paced run and its flood run) as the figures the table and the ratios read."""
    return {
        "server_us_per_packet": paced["server_us_per_packet"],
        "client_us_per_packet": paced["client_us_per_packet"],
        "server_us_per_token": paced["server_us_per_token"],
        "client_us_per_token": paced["client_us_per_token"],
        "paced_packets_per_token": paced["server_token_packets"] / max(1, paced["tokens_sent"]),
        "paced_datagrams_per_token": paced["server_datagrams"] / max(1, paced["tokens_sent"]),  # ACK-only included
        "flood_tokens_per_s": flood["tokens_per_s"],
        "flood_packets_per_s": flood["packets_per_s"],
        # within one run: the median tokens over the median packets of different runs read 42-66 for raw aioquic
        "flood_tokens_per_packet": flood["tokens_delivered"] / max(1, flood["server_token_packets"]),
        "flood_s": flood["wall_s"],
    }


FIGURES = ("server_us_per_packet", "client_us_per_packet", "server_us_per_token", "client_us_per_token",
           "paced_packets_per_token", "paced_datagrams_per_token", "flood_tokens_per_s", "flood_packets_per_s",
           "flood_tokens_per_packet", "flood_s")
COUNTS = ("tokens_requested", "tokens_sent", "tokens_delivered", "tokens_lost")


def _pairs(modes: list[str], repeats: int) -> list[tuple[int, list[str]]]:
    """The order of the runs: per repeat, raw aioquic back to back with each tokenwire mode, in ``--modes``' order
    the first time and flipped every other repeat, so that a drift in the machine's load falls on both sides of a
    pair alike. Raw ran all its repeats first before, and a mode's ratio read 1.19 to 1.74 between runs."""
    others = [m for m in modes if m != "raw"]
    if not others:
        return [(k, ["raw"]) for k in range(repeats)]
    raw_first = modes[0] == "raw"
    order = []
    for k in range(repeats):
        for mode in others:
            pair = ["raw", mode] if raw_first == (k % 2 == 0) else [mode, "raw"]
            order.append((k, pair))
    return order


def _short(mode: str, run: dict[str, Any]) -> bool:
    """Whether a run measured fewer tokens than it should have: raw aioquic's DATAGRAM frames may be lost (its loss
    is reported, not a failure), but it must send every token; a tokenwire mode must deliver every one."""
    if mode == "raw":
        return run["tokens_sent"] != run["tokens_requested"]
    return not run["complete"]


def _measure(modes: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Every mode's runs, interleaved with the raw baseline (:func:`_pairs`); each ratio within its pair."""
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    pair_ratios: dict[str, list[dict[str, float]]] = {m: [] for m in modes if m != "raw"}
    short: list[dict[str, Any]] = []
    order = _pairs(modes, args.repeats)
    for i, (k, pair) in enumerate(order):
        print(f"  repeat {k + 1}/{args.repeats}: {' then '.join(pair)} ({i + 1}/{len(order)}) ...",
              file=sys.stderr, flush=True)
        figures: dict[str, dict[str, Any]] = {}
        for mode in pair:
            paced = _one(mode, args.tokens, args.rate)
            flood = _one(mode, args.flood_tokens, 0.0)
            for workload, r in (("paced", paced), ("flood", flood)):
                if _short(mode, r):
                    short.append({"mode": mode, "workload": workload, "repeat": k + 1,
                                  **{c: r[c] for c in COUNTS}})
            figures[mode] = {**_run_figures(paced, flood), "repeat": k + 1,
                             **{f"paced_{c}": paced[c] for c in COUNTS}, **{f"flood_{c}": flood[c] for c in COUNTS}}
            runs[mode].append(figures[mode])
        for mode, ratios in _ratios(figures).items():
            pair_ratios[mode].append(ratios)
    results: dict[str, Any] = {}
    for mode in modes:
        rs = runs[mode]
        results[mode] = {key: statistics.median(r[key] for r in rs) for key in FIGURES}
        for c in COUNTS:  # totals over every run of the mode, paced and flood
            results[mode][c] = sum(r[f"paced_{c}"] + r[f"flood_{c}"] for r in rs)
        results[mode]["runs"] = rs
    ratio_spread = {mode: {key: spread([p[key] for p in ps], "per_repeat") for key in ps[0]}
                    for mode, ps in pair_ratios.items() if ps}
    return {"modes": results, "spread": ratio_spread, "short_runs": short, "order": [p for _, p in order]}


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
    from tokenwire.transport.server import MAX_TOKENS_BOUND

    for name in ("tokens", "flood_tokens"):
        if getattr(args, name) > MAX_TOKENS_BOUND:  # the most one answer may have: the run would be cut short
            raise CLIError(f"--{name.replace('_', '-')} {getattr(args, name)}: at most {MAX_TOKENS_BOUND:,} (the "
                           "protocol's bound on an answer's tokens)")
    modes = with_raw_baseline(modes)
    started = RunProvenance()
    # SIGTERM or SIGHUP (kill, a timeout) unwinds like Ctrl-C: _one's finally stops the server subprocess, which
    # the default action left serving for good
    with sigterm_as_ctrl_c():
        measured = _measure(modes, args)
    results, spread, short = measured["modes"], measured["spread"], measured["short_runs"]
    ratios = {mode: {key: s["median"] for key, s in r.items()} for mode, r in spread.items()}
    out = {
        "modes": results,
        "ratios_vs_raw_aioquic": ratios,
        "ratios_spread": spread,
        "figures": "a mode's figures are medians over its --repeats runs (each run: a paced and a flood workload, "
                   "listed in runs); each ratio is taken within a pair of back-to-back runs, raw aioquic's and the "
                   "mode's, and ratios_vs_raw_aioquic gives the median over the pairs (ratios_spread: min, max and "
                   "each pair's value)",
        "run_order": measured["order"],
        "flood_clock": "client: from its request to the answer's end (flood_tokens_per_s, flood_packets_per_s)",
        "per_token": "server CPU over the tokens it sent, client CPU over the tokens it received",
        "short_runs": short,
        "complete": not short,
        "config": {
            "tokens": args.tokens,
            "rate": args.rate,
            "flood_tokens": args.flood_tokens,
            "flood_seconds": FLOOD_S,
            "repeats": args.repeats,
        },
        "provenance": run_provenance(started),
    }
    print("(pkt: token packet, the server's ack-eliciting packets; dgram: every datagram it sent, ACK-only too;\n"
          " flood pkt/s and tok/s: per second of the client's clock, from its request to the answer's end;\n"
          " medians over the runs; lost: tokens sent but not received, over all runs)")
    print(
        f"{'mode':<11} {'srv us/tok':>10} {'cli us/tok':>10} {'srv us/pkt':>10} {'cli us/pkt':>10} "
        f"{'pkts/token':>10} {'dgrams/tok':>10} {'flood pkt/s':>12} {'flood tok/s':>12} {'flood s':>8} "
        f"{'delivered':>10} {'lost':>6}"
    )
    for mode, r in results.items():
        print(
            f"{mode:<11} {r['server_us_per_token']:>10.1f} {r['client_us_per_token']:>10.1f} "
            f"{r['server_us_per_packet']:>10.1f} {r['client_us_per_packet']:>10.1f} "
            f"{r['paced_packets_per_token']:>10.2f} {r['paced_datagrams_per_token']:>10.2f} "
            f"{r['flood_packets_per_s']:>12.0f} {r['flood_tokens_per_s']:>12.0f} {r['flood_s']:>8.2f} "
            f"{r['tokens_delivered']:>10} {r['tokens_lost']:>6}"
        )
    for mode, r in spread.items():
        # raw aioquic coalesces many DATAGRAM frames into one packet when flooding: packets/s do not compare
        def x(key: str, r: dict[str, Any] = r) -> str:
            return f"{r[key]['median']:.2f}x ({r[key]['min']:.2f}-{r[key]['max']:.2f})"

        print(
            f"{mode}: CPU per token {x('server_cpu_per_token_vs_raw')} raw (server), "
            f"{x('client_cpu_per_token_vs_raw')} (client); per token packet "
            f"{x('server_cpu_per_token_packet_vs_raw')} / {x('client_cpu_per_token_packet_vs_raw')}; "
            f"flood tokens/s {x('flood_tokens_per_s_vs_raw')} raw "
            f"({results[mode]['flood_tokens_per_packet']:.1f} tokens/packet, raw "
            f"{results['raw']['flood_tokens_per_packet']:.1f})"
        )
    if spread:
        print(f"(ratios: median over {args.repeats} raw/mode pairs, min-max in brackets)")
    for s in short:
        print(f"SHORT RUN: {s['mode']} {s['workload']} (repeat {s['repeat']}): {s['tokens_requested']} tokens "
              f"requested, {s['tokens_sent']} sent, {s['tokens_delivered']} delivered: its figures are not "
              "comparable", file=sys.stderr)
    if args.json:
        write_json(out, args.json)
    return 1 if short else 0

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        import uvloop

        try:
            uvloop.run(_serve(sys.argv[2]))
        except KeyboardInterrupt:  # a terminal's Ctrl-C reaches the whole process group: the parent reports it
            sys.exit(130)
