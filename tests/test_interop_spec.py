"""A second tokenwire/1 client, written from docs/protocol.md alone (bare aioquic and msgpack: nothing of the SDK's
client code), against the daemon in this process. It pins what another implementation relies on: the answer whole
under datagram loss with REPAIR, the stream scheme, a client that sends no ACKs, a resume on a new connection; and,
row by row, what the server does with hostile input ("What a receiver does"), while an honest client on another
connection is still served. Session 46's probe sent ~130 such cases by hand; the rows are those that pin a
sentence of the doc no other test checks on the wire (codec-only bounds are left to tests/test_frames.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import ssl
import struct
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from tokenwire.daemon.config import parse_config
from tokenwire.daemon.demo_upstream import answer_tokens
from tokenwire.daemon.service import Daemon

# the spec's numbers, written out rather than imported: this client shares nothing with the SDK
REQUEST, STARTED, TOKENS, ACK, FINISHED, REPAIR, ERROR, REPORT = 1, 2, 3, 4, 5, 6, 7, 8
MALFORMED, TOO_LARGE, VERSION, BAD_REQUEST, LIMIT, CANCELLED = 0x101, 0x102, 0x103, 0x104, 0x106, 0x10D
SEED = 224  # the demo upstream's timing seed whose first 300 tokens have none of its random pauses (fast tests)
LISTEN = os.environ.get("TOKENWIRE_INTEROP_LISTEN", "127.0.0.1:0")  # (a fixed port where a run must keep to a range)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def framed(obj: Any) -> bytes:
    """A stream frame: 4-byte big-endian body length, then the msgpack map (or raw bytes as given)."""
    body = obj if isinstance(obj, bytes) else pack(obj)
    return struct.pack(">I", len(body)) + body


def rate(tokens_per_s: int) -> dict[str, int]:
    """REQUEST `p` for the demo upstream: its pace."""
    return {"rate": tokens_per_s, "seed": SEED}


def req(**keys: Any) -> dict[str, Any]:
    return {"t": REQUEST, "v": 1, "m": [{"role": "user", "content": "x"}], "mt": 20, "p": rate(5000), **keys}


class Spec(QuicConnectionProtocol):
    """Decodes what the server sends and keeps it; sends nothing unasked but ACKs for TOKENS datagrams that
    brought something new (unless ``acks`` is off). ``drop(frame)`` discards a received TOKENS datagram, as loss
    after QUIC acked its packet: only REPAIR brings its tokens back."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.frames: dict[int, list[dict[str, Any]]] = {}
        self.tokens: dict[int, dict[int, bytes]] = {}  # handle (= our stream id) -> index -> token
        self.datagrams: dict[int, int] = {}
        self.fin: set[int] = set()
        self.resets: dict[int, int] = {}
        self.stops: dict[int, int] = {}
        self.closed: qe.ConnectionTerminated | None = None
        self.acks_sent = 0
        self.acks = True
        self.drop: Callable[[dict[str, Any]], bool] = lambda frame: False
        self._buf: dict[int, bytes] = {}

    def _keep(self, f: dict[str, Any]) -> bool:
        held = self.tokens.setdefault(f["r"], {})
        runs = [(f["i"], f["k"])] + ([tuple(f["x"])] if "x" in f else [])
        new = [i for first, toks in runs for i, _ in enumerate(toks, first) if i not in held]
        for first, toks in runs:
            held.update(enumerate(toks, first))
        return bool(new)

    def quic_event_received(self, event: qe.QuicEvent) -> None:
        if isinstance(event, qe.StreamDataReceived):
            sid, data = event.stream_id, self._buf.get(event.stream_id, b"") + event.data
            while len(data) >= 4 and len(data) >= 4 + (n := struct.unpack(">I", data[:4])[0]):
                frame = msgpack.unpackb(data[4:4 + n], raw=False)
                self.frames.setdefault(sid, []).append(frame)
                if frame["t"] == TOKENS:
                    assert len(frame["k"]) >= 1 and frame["r"] == sid
                    self._keep(frame)
                data = data[4 + n:]
            self._buf[sid] = data
            if event.end_stream:
                self.fin.add(sid)
        elif isinstance(event, qe.DatagramFrameReceived):
            frame = msgpack.unpackb(event.data, raw=False)  # one map, no length prefix
            assert frame["t"] == TOKENS, frame
            self.datagrams[frame["r"]] = self.datagrams.get(frame["r"], 0) + 1
            if not self.drop(frame) and self._keep(frame) and self.acks:
                held = self.tokens[frame["r"]]
                self.send_datagram(pack({"t": ACK, "r": frame["r"], "n": next_missing(held), "e": frame["s"],
                                         "g": int(time.monotonic() * 1e6)}))
                self.acks_sent += 1
        elif isinstance(event, qe.StreamReset):
            self.resets[event.stream_id] = event.error_code
        elif isinstance(event, qe.StopSendingReceived):
            self.stops[event.stream_id] = event.error_code
        elif isinstance(event, qe.ConnectionTerminated):
            self.closed = event

    def send(self, data: bytes, *, sid: int | None = None, end: bool = False) -> int:
        sid = self._quic.get_next_available_stream_id() if sid is None else sid
        self._quic.send_stream_data(sid, data, end_stream=end)
        self.transmit()
        return sid

    def send_datagram(self, data: bytes) -> None:
        self._quic.send_datagram_frame(data)
        self.transmit()

    def first(self, sid: int, t: int) -> dict[str, Any] | None:
        return next((f for f in self.frames.get(sid, []) if f["t"] == t), None)


def next_missing(held: dict[int, bytes], start: int = 0) -> int:
    while start in held:
        start += 1
    return start


async def until(check: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        await asyncio.sleep(0.002)


@contextlib.asynccontextmanager
async def daemon(**limits: Any) -> AsyncIterator[Daemon]:
    """The daemon in this process: demo upstream, no first-token delay, no auth."""
    d = Daemon(parse_config({"server": {"listen": [LISTEN]}, "metrics": {"listen": ""}, "limits": limits,
                             "upstreams": [{"name": "demo", "type": "demo", "first_token_ms": 0}]}))
    await d.start()
    try:
        yield d
    finally:
        await d.stop()


@contextlib.asynccontextmanager
async def client(d: Daemon, *, datagram_size: int = 1200) -> AsyncIterator[Spec]:
    """A connection, as aioquic's ``connect`` makes it, but left without waiting out its closing period (3 PTOs):
    the CONNECTION_CLOSE is sent, the socket closed."""
    cfg = QuicConfiguration(is_client=True, alpn_protocols=["tokenwire/1"], max_datagram_frame_size=65535,
                            max_datagram_size=datagram_size, server_name="localhost")
    cfg.verify_mode = ssl.CERT_NONE  # (the daemon's development certificate)
    address = ("127.0.0.1", d.addresses[0][1])
    transport, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: Spec(QuicConnection(configuration=cfg)), remote_addr=address)
    try:
        protocol.connect(address)
        await protocol.wait_connected()
        yield protocol
    finally:
        protocol.close()
        transport.close()


async def answer(c: Spec, sid: int, *, kept: tuple[bytes, ...] = (), twice: bool = False,
                 timeout: float = 5.0) -> tuple[bytes, dict[str, Any]]:
    """What a client from the doc does once it asked: FINISHED, a REPAIR for each gap (``twice``: each sent again
    once answered, which must bring nothing more), the digest over the whole answer (``kept``: the tokens from 0
    it held before a resume), REPORT and FIN, then the server's FIN. Returns the text from ``len(kept)`` on."""
    await until(lambda: c.first(sid, FINISHED) or c.first(sid, ERROR) or c.closed, "FINISHED", timeout)
    fin = c.first(sid, FINISHED)
    assert fin is not None, (c.frames.get(sid), c.closed)
    held, first = c.tokens.setdefault(sid, {}), len(kept)
    repairs, i = [], next_missing(held, first)
    while i < fin["n"]:
        j = i + 1
        while j < fin["n"] and j not in held:
            j += 1
        repairs.append(framed({"t": REPAIR, "i": i, "j": j}))
        c.send(repairs[-1], sid=sid)
        i = next_missing(held, j)
    await until(lambda: next_missing(held, first) >= fin["n"], "repaired tokens", timeout)
    if twice:
        c.send(b"".join(repairs), sid=sid)
    whole = b"".join(held[k] for k in range(first, fin["n"]))
    assert hashlib.sha256(b"".join(kept) + whole).digest() == fin["d"]  # the digest proves the whole answer
    c.send(framed({"t": REPORT, "tt": 1}), sid=sid, end=True)
    await until(lambda: sid in c.fin, "the server's FIN", timeout)
    return whole, fin


def on_stream(c: Spec, sid: int) -> list[int]:
    """The indices of the tokens the server put on the request stream (repair replies, the stream scheme)."""
    return [i for f in c.frames.get(sid, []) if f["t"] == TOKENS for i in range(f["i"], f["i"] + len(f["k"]))]


def run(coro: Any, timeout: float = 20.0) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def demo(n: int) -> bytes:
    return "".join(answer_tokens(n)).encode()


# ---------------------------------------------------------------------------------------------- interop
def test_chatterbox_with_lost_datagrams_is_made_whole_by_repair() -> None:
    """Every datagram carrying a token of [10, 20), and every 4th, is lost after QUIC acked it: the server counts
    those delivered, so only REPAIR brings them back; text and digest must be exact."""
    async def go() -> tuple[bytes, dict[str, Any], Spec, int]:
        async with daemon() as d, client(d) as c:
            c.drop = lambda f: (f["i"] < 20 and f["i"] + len(f["k"]) > 10) or sum(c.datagrams.values()) % 4 == 0
            sid = c.send(framed(req(mt=300, p=rate(2000))))
            whole, fin = await answer(c, sid, twice=True)
            return whole, fin, c, sid

    whole, fin, c, sid = run(go())
    repaired = on_stream(c, sid)  # repair replies: on the stream, each token once however often asked
    assert set(range(10, 20)) <= set(repaired) and len(repaired) == len(set(repaired)) < 300
    assert c.acks_sent > 0 and whole == demo(300) and fin["n"] == 300
    assert fin["fr"] == "length" and len(fin["g"]) == 300 and fin["g"][0] == 0


def test_the_stream_scheme_sends_one_token_per_frame_and_no_datagram() -> None:
    async def go() -> tuple[bytes, dict[str, Any], Spec, int]:
        async with daemon() as d, client(d) as c:
            sid = c.send(framed(req(mt=80, s="stream")))
            whole, fin = await answer(c, sid)
            return whole, fin, c, sid

    whole, fin, c, sid = run(go())
    started = c.first(sid, STARTED)
    assert started is not None and started["s"] == "stream" and started["r"] == sid and started["i"] == 0
    toks = [f for f in c.frames[sid] if f["t"] == TOKENS]
    assert [(f["i"], len(f["k"])) for f in toks] == [(i, 1) for i in range(80)]
    assert not c.datagrams and whole == demo(80) and fin["n"] == 80


def test_a_client_that_sends_no_ack_still_gets_every_token() -> None:
    """ACK datagrams are optional: QUIC's acknowledgements alone advance the server's floor."""
    async def go() -> tuple[bytes, Spec, int]:
        async with daemon() as d, client(d) as c:
            c.acks = False
            sid = c.send(framed(req(mt=200, p=rate(1000))))
            whole, _ = await answer(c, sid)
            return whole, c, sid

    whole, c, sid = run(go())
    assert c.acks_sent == 0 and c.datagrams[sid] > 1 and whole == demo(200)
    # the datagrams brought the tokens (a datagram lost on a loaded host's loopback may still need a REPAIR: a few)
    assert len(on_stream(c, sid)) <= 20


def test_a_resume_on_a_new_connection_sends_from_rf_and_proves_the_whole_answer() -> None:
    """The first connection closes (no reset: the daemon keeps generating for a resume) holding tokens [0, rf);
    the second asks with `rid` and `rf`, gets the same `id`, nothing below `rf`, and a digest over all of it."""
    async def go() -> tuple[int, bytes, bytes, dict[str, Any], list[dict[str, Any]], dict[int, bytes]]:
        async with daemon() as d:
            async with client(d) as c1:
                sid = c1.send(framed(req(mt=120, p=rate(400))))
                await until(lambda: next_missing(c1.tokens.get(sid, {})) >= 15 and c1.first(sid, STARTED), "tokens")
                held, started = dict(c1.tokens[sid]), c1.first(sid, STARTED)
            kept = tuple(held[i] for i in range(next_missing(held)))
            async with client(d) as c2:
                assert started is not None
                sid2 = c2.send(framed({"t": REQUEST, "v": 1, "rid": started["id"], "rf": len(kept)}))
                rest, fin = await answer(c2, sid2, kept=kept)  # (the digest checked over kept + rest)
                again = c2.first(sid2, STARTED)
                assert again is not None and again["r"] == sid2
                return len(kept), b"".join(kept), rest, fin, [started, again], c2.tokens[sid2]

    rf, kept, rest, fin, (started, again), second = run(go())
    assert again["id"] == started["id"] and again["i"] == rf and min(second) == rf  # nothing below rf again
    assert kept + rest == demo(120) and fin["n"] == 120


def test_a_request_past_max_requests_per_connection_is_held_back_not_refused() -> None:
    """The slots are QUIC's stream limit: a client's QUIC stack holds the third of 2 back until a slot frees, so
    no ERROR LIMIT_EXCEEDED (the errors table said one came); forced past it, QUIC closes STREAM_LIMIT_ERROR."""
    async def go() -> tuple[list[int], qe.ConnectionTerminated | None]:
        async with daemon(max_requests_per_connection=2) as d:
            async with client(d) as c:
                sids = [c.send(framed(req(mt=40, p=rate(400)))) for _ in range(3)]
                await asyncio.sleep(0.05)
                assert c._quic._remote_max_streams_bidi == 2 and sids[2] not in c.frames  # held: nothing sent
                for sid in sids:
                    await answer(c, sid)
                firsts = [c.frames[sid][0]["t"] for sid in sids]
            async with client(d) as c:
                c._quic._remote_max_streams_bidi = 100  # a client that ignores the limit
                for _ in range(3):
                    c.send(LONG)
                await until(lambda: c.closed, "close")
                return firsts, c.closed

    firsts, closed = run(go())
    assert firsts == [STARTED] * 3
    assert closed is not None and closed.error_code == 0x4 and closed.frame_type is not None  # QUIC's own
    doc = " ".join((Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text().split())
    assert "only where a server lowered the limit after the connection opened" in doc
    assert "a server that advertised it never has to refuse one" not in doc


# ------------------------------------------------------------------------------------------- hostile rows
Row = Callable[[Spec], Any]


def _after_error(then: bytes) -> Row:
    """A request the daemon refuses (BAD_REQUEST: a demo rate out of range; ERROR and FIN, no STOP_SENDING): what
    the client still sends on that stream is dropped."""
    async def row(c: Spec) -> int:
        sid = c.send(framed(req(p={"rate": 10**9})))
        await until(lambda: c.first(sid, ERROR), "ERROR")
        c.send(then, sid=sid)
        await asyncio.sleep(0.05)
        return sid
    return row


def _reset_first(c: Spec) -> int:
    sid = c._quic.get_next_available_stream_id()
    c._quic.reset_stream(sid, CANCELLED)
    c.transmit()
    return sid


def _padded_ack(size: int) -> bytes:
    """An ACK with an unknown key, padded to ``size`` bytes (past 1500 only its size matters)."""
    data = pack({"t": ACK, "r": 0, "n": 0, "pad": "x" * (size - 17)})  # (a str 16 header: 3 bytes)
    assert len(data) == size
    return data


def _ack_for_own(**ack: Any) -> Row:
    """An ACK datagram for the row's own answer, once a token of it came."""
    async def row(c: Spec) -> int:
        sid = c.send(framed(req(p=rate(1000))))
        await until(lambda: sid in c.tokens, "a token")
        c.send_datagram(pack({"t": ACK, "r": sid, **ack}))
        return sid
    return row


# a REQUEST whose `v` is an int 64 and `mt` a uint 64 encoding: "any msgpack integer encoding"
INT64_V = (b"\x85\xa1t\x01\xa1v\xd3" + (1).to_bytes(8, "big") + b"\xa1m" + pack([{"role": "user", "content": "x"}])
           + b"\xa2mt\xcf" + (20).to_bytes(8, "big") + b"\xa1p" + pack(rate(5000)))

LONG = framed(req(mt=500, p=rate(100)))  # a REQUEST whose answer is still streaming when the row's next frame comes
MAL, SERVED = ("close", MALFORMED), ("served",)
JUNK = framed({"t": 99}) + framed(req())  # an unknown frame type, then a REQUEST: malformed, were it read

# name: (what the hostile client does, the documented outcome: ("close", code) on the connection; ("refused", code):
# ERROR with the code, FIN (and STOP_SENDING but for BAD_REQUEST, the application's); ("fin",) or ("reset", code)
# alone; SERVED: ignored, the request answered whole. Unless closed, the connection then serves another request.)
ROWS: dict[str, tuple[Row, tuple[Any, ...]]] = {
    # Closes the connection
    "a frame after REQUEST other than REPAIR, REPORT, ERROR (ACK)":
        (lambda c: c.send(LONG + framed({"t": ACK, "r": 0, "n": 0})), MAL),
    "a second REQUEST on a stream, v=1": (lambda c: c.send(LONG + framed(req())), MAL),
    "a second REQUEST on a stream, v=2": (lambda c: c.send(LONG + framed(req(v=2))), ("close", VERSION)),
    "a stream that ends inside a later frame": (lambda c: c.send(LONG + framed({"t": REPORT})[:5], end=True), MAL),
    "a stream that ends with part of its REQUEST": (lambda c: c.send(framed(req())[:10], end=True), MAL),
    "an empty frame (length 0) first": (lambda c: c.send(b"\0\0\0\0"), MAL),
    "an unknown key in REQUEST (no extensions)": (lambda c: c.send(framed(req(zz=1))), MAL),
    "v=1.0 (a float is no int)": (lambda c: c.send(framed(req(v=1.0))), MAL),
    "a client's ERROR without msg": (lambda c: c.send(framed(req()) + framed({"t": ERROR, "c": CANCELLED})), MAL),
    "an ACK datagram with a length prefix": (lambda c: c.send_datagram(framed({"t": ACK, "r": 0, "n": 0})), MAL),
    "a datagram of 1500 bytes is read (malformed: key pad)": (lambda c: c.send_datagram(_padded_ack(1500)), MAL),
    "a datagram of 1501 bytes": (lambda c: c.send_datagram(_padded_ack(1501)), ("close", TOO_LARGE)),
    # Refuses one request
    "v=2 with unknown keys: refused before its keys are checked":
        (lambda c: c.send(framed({"t": REQUEST, "v": 2, "zz": [1, 2]})), ("refused", VERSION)),
    "v=2, then junk and a REQUEST in the same flight (dropped)":
        (lambda c: c.send(framed(req(v=2)) + JUNK), ("refused", VERSION)),
    "frames after the server's ERROR are dropped": (_after_error(JUNK), ("refused", BAD_REQUEST)),
    "a first length prefix of 2^32-1 (refused from the prefix)": (lambda c: c.send(b"\xff" * 4), ("refused", LIMIT)),
    # Ends its own side, and nothing else
    "a bare FIN on a new stream": (lambda c: c.send(b"", end=True), ("fin",)),
    "a REQUEST with its FIN (cancelled before it begins)": (lambda c: c.send(framed(req()), end=True), ("fin",)),
    "a RESET_STREAM before any of a request": (_reset_first, ("reset", CANCELLED)),
    # Ignores (or reads, as the spec says)
    "int64 and uint64 encodings of small ints": (lambda c: c.send(framed(INT64_V)), SERVED),
    "REPORT twice and a client's ERROR after REQUEST":
        (lambda c: c.send(framed(req()) + framed({"t": REPORT, "tt": 1}) + framed({"t": REPORT, "tt": 2})
                          + framed({"t": ERROR, "c": CANCELLED, "msg": ""})), SERVED),
    "a REPAIR in the stream scheme": (lambda c: c.send(framed(req(s="stream")) + framed({"t": REPAIR, "i": 0, "j": 5})),
                                      SERVED),
    "an ACK for a handle with no request, c of 3 items":
        (lambda c: (c.send_datagram(pack({"t": ACK, "r": 400, "n": 5, "c": [1, 2, 3]})), c.send(framed(req())))[1],
         SERVED),
    "an ACK n far past the tokens sent": (_ack_for_own(n=10**6), SERVED),
    "ACK c counts that go down": (_ack_for_own(n=0, c=[5, 0, 0, 0]), SERVED),
}


@pytest.mark.parametrize("name", list(ROWS))
def test_what_a_receiver_does(name: str) -> None:
    """One row of docs/protocol.md's "What a receiver does", on the wire, with an honest client's answer streaming
    on another connection throughout: it must come whole whatever the row did."""
    act, outcome = ROWS[name]

    async def go() -> tuple[Spec, int | None, bytes, bytes | None, qe.ConnectionTerminated | None]:
        async with daemon() as d, client(d) as honest, client(d, datagram_size=1600) as c:
            h_sid = honest.send(framed(req(mt=60, p=rate(600))))  # ~0.1 s: streaming through the row
            sid = act(c)
            if asyncio.iscoroutine(sid):
                sid = await sid
            kind = outcome[0]
            if kind == "close":
                await until(lambda: c.closed, "close")
            elif kind == "refused":
                await until(lambda: sid in c.fin and (sid in c.stops or outcome[1] == BAD_REQUEST), "ERROR and FIN")
            elif kind == "fin":
                await until(lambda: sid in c.fin, "FIN")
            elif kind == "reset":
                await until(lambda: sid in c.resets, "RESET_STREAM")
            served = (await answer(c, sid))[0] if kind == "served" else None
            if kind != "close":  # the connection takes another request
                again = (await answer(c, c.send(framed(req(mt=5)))))[0]
                assert again == demo(5) and c.closed is None
            h_text = (await answer(honest, h_sid))[0]
            return c, sid, h_text, served, c.closed

    c, sid, h_text, served, closed = run(go())
    assert h_text == demo(60)  # the honest client on another connection, served whole throughout
    kind = outcome[0]
    if kind == "close":
        assert closed is not None and closed.frame_type is None  # an application close (not QUIC's)
        assert closed.error_code == outcome[1], closed
    elif kind == "refused":
        assert sid is not None
        frames = c.frames.get(sid, [])
        assert [f["t"] for f in frames] == [ERROR] and frames[0]["c"] == outcome[1], frames
        assert c.stops.get(sid) == (None if outcome[1] == BAD_REQUEST else outcome[1])  # (the server application's)
    elif kind == "fin":
        assert sid is not None and not c.frames.get(sid) and sid not in c.resets
    elif kind == "reset":
        assert sid is not None and c.resets[sid] == outcome[1] and not c.frames.get(sid)
    else:
        assert served is not None and served == demo(20) and closed is None
        assert len(on_stream(c, sid)) == len(set(on_stream(c, sid)))  # each token on the stream at most once
