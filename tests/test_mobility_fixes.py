"""Mobility: ``tokenwire chat --retries`` riding out long outages, and the client's silence ping finding a new
address (NAT rebinding) soon after tokens stop while an answer streams."""

from __future__ import annotations

import contextlib
import itertools
import signal
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from tokenwire.daemon import chat_cli
from tokenwire.daemon.cli import main
from tokenwire.transport.errors import ConnectTimeout
from tokenwire.transport.session_events import AIOQUIC_IDLE_REASON, closed_error

RID = bytes(range(16))
WORDS = [f"w{i} " for i in range(12)]


class _Stream:
    """A chat stream that yields ``deltas`` after ``first`` tokens held, then ends or loses its path."""

    def __init__(self, conn: _Conn, first: int, deltas: list[str], lose: bool) -> None:
        self.conn, self.first, self.deltas, self.lose = conn, first, deltas, lose
        self.got = 0
        self.stats: Any = None
        self.answered = False  # (ChatStream's: the whole answer is here; these lose their path first)
        self.outcome: Any = None

    def on_started(self, callback: Any) -> None:
        callback(RID)

    async def __aenter__(self) -> _Stream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def __aiter__(self) -> AsyncIterator[str]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[str]:
        for d in self.deltas:
            self.got += 1
            yield d
        if self.lose:
            self.conn.closed = True
            raise closed_error(0x1, AIOQUIC_IDLE_REASON, 0.8)
        self.stats = SimpleNamespace(finish_reason="stop", request_id=RID.hex(), to_dict=dict)

    def resume_point(self) -> tuple[bytes, list[bytes]]:
        return RID, [w.encode() for w in WORDS[:self.first + self.got]]


class _Conn:
    def __init__(self, plan: _Plan, lose: bool) -> None:
        self.plan, self.lose, self.closed = plan, lose, False

    def _stream(self, held: int) -> _Stream:
        end = len(WORDS) if not self.lose else min(len(WORDS), held + 2)
        return _Stream(self, held, WORDS[held:end], self.lose)

    def chat(self, prompt: str, *, resume: tuple[bytes, list[bytes]] | None = None, **_: Any) -> _Stream:
        return self._stream(len(resume[1]) if resume is not None else 0)

    def attach(self, target: bytes, *, held: list[bytes] | None = None, **_: Any) -> _Stream:
        return self._stream(len(held or []))


class _Plan:
    """A fake ``connect``: each call takes the next step ("lost": connects, two tokens, then the path goes silent;
    "dark": no handshake; "ok": connects and the answer ends), the last step repeating."""

    def __init__(self, steps: list[str], on_dark: Any = None) -> None:
        self.steps, self.calls, self.on_dark = steps, 0, on_dark

    @contextlib.asynccontextmanager
    async def __call__(self, host: str, port: int, **_: Any) -> AsyncIterator[_Conn]:
        step = self.steps[min(self.calls, len(self.steps) - 1)]
        self.calls += 1
        if step == "dark":
            if self.on_dark is not None:
                self.on_dark(self.calls)
            raise ConnectTimeout(f"no QUIC handshake with {host}:{port} within 10 s")
        yield _Conn(self, lose=step == "lost")


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The backoff's waits in milliseconds: the schedule's shape, not its seconds, is what these tests run."""
    monkeypatch.setattr(chat_cli, "RETRY_FIRST_S", 0.001, raising=False)
    monkeypatch.setattr(chat_cli, "RETRY_CAP_S", 0.004, raising=False)
    yield


def _chat(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], plan: _Plan,
          *argv: str) -> tuple[int, str, str]:
    monkeypatch.setattr("tokenwire.transport.client.connect", plan)
    rc = main(["chat", "--insecure", "--port", "54600", *argv, "tell me a story"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_reconnect_attempts_that_find_no_server_do_not_spend_the_retries(monkeypatch, capsys, fast_backoff):
    """A 120-s outage both ways: the default 3 retries were spent back to back on handshakes that timed out (10 s
    each), the CLI gave up at 95 s with 262 of 1855 bytes, and the daemon still held the answer. Attempts that find
    no server now back off and go on (for RECONNECT_S), each a line; only lost connections spend a retry."""
    plan = _Plan(["lost"] + ["dark"] * 7 + ["ok"])
    rc, out, err = _chat(monkeypatch, capsys, plan)
    assert rc == 0, err
    assert out == "".join(WORDS) + "\n"  # the whole answer, once
    assert "QUIC idle timeout): server or path gone; resuming request " + RID.hex() + " after token 2 (1/3)]" in err
    attempts = [line for line in err.splitlines() if "no QUIC handshake" in line]
    assert len(attempts) == 7 and all(" (1/3): attempt " in line for line in attempts), err
    assert [int(line.split(": attempt ")[1].split()[0]) for line in attempts] == list(range(2, 9))


def test_a_connection_lost_more_often_than_the_retries_says_they_are_used_up(monkeypatch, capsys, fast_backoff):
    """Giving up said only the last error ("no QUIC handshake ... within 10 s"): nothing said that --retries ran
    out, nor how to get the rest (the attach hint comes first, as before)."""
    plan = _Plan(["lost", "dark", "lost", "lost", "lost"])
    rc, out, err = _chat(monkeypatch, capsys, plan)
    lines = err.strip().splitlines()
    assert rc == 2 and out.startswith("w0 w1 "), err
    assert lines[-1] == ("tokenwire chat: error: no packet from the server for 0.8 s (QUIC idle timeout): server "
                         "or path gone; gave up: the connection was lost 4 times, --retries 3 used up"), err
    assert lines[-2] == chat_cli.attach_hint(RID), err
    assert [f"({k}/3)]" in err for k in (1, 2, 3)] == [True] * 3


def test_retries_zero_says_it_does_not_reconnect(monkeypatch, capsys, fast_backoff):
    plan = _Plan(["lost", "ok"])
    rc, _, err = _chat(monkeypatch, capsys, plan, "--retries", "0")
    assert rc == 2 and plan.calls == 1
    assert err.strip().splitlines()[-1].endswith("server or path gone; not reconnecting (--retries 0)"), err


def test_reconnecting_gives_up_after_its_time(monkeypatch, capsys, fast_backoff):
    """A server that never comes back: the attempts end RECONNECT_S after the loss (the daemon's default orphan
    timeout: past it the answer is gone anyway), saying so."""
    monkeypatch.setattr(chat_cli, "RECONNECT_S", 0.05, raising=False)
    plan = _Plan(["lost", "dark"])
    rc, _, err = _chat(monkeypatch, capsys, plan)
    last = err.strip().splitlines()[-1]
    assert rc == 2 and plan.calls > 4, err
    assert last.startswith("tokenwire chat: error: no QUIC handshake with 127.0.0.1:54600 within 10 s; gave up "
                           "reconnecting: no server reached in "), err
    assert "since the connection was lost (--retries reconnects for at most 0.05 s)" in last, err


def test_max_time_ends_the_wait_between_attempts(monkeypatch, capsys):
    """--max-time during a backoff wait (here 30 s) ends it at once with its documented "while reconnecting"
    message: the waits must not hold a client past the bound it asked for."""
    monkeypatch.setattr(chat_cli, "RETRY_FIRST_S", 30.0, raising=False)
    plan = _Plan(["lost", "dark"])
    rc, _, err = _chat(monkeypatch, capsys, plan, "--max-time", "0.5")
    assert rc == 2 and plan.calls == 2, err
    assert err.strip().splitlines()[-1] == (
        "tokenwire chat: error: no whole answer within 0.5 s (--max-time), while reconnecting: the server could "
        f"not be told to cancel it and may finish request {RID.hex()}"), err


def test_ctrl_c_ends_the_wait_between_attempts(monkeypatch, capsys):
    """Ctrl-C during a backoff wait: "interrupted", exit status 130, after the attach hint (the answer was not
    cancelled: no connection carried the cancellation)."""
    import asyncio

    monkeypatch.setattr(chat_cli, "RETRY_FIRST_S", 30.0, raising=False)

    def ctrl_c(calls: int) -> None:
        # (in the CLI's loop: the SIGINT arrives while it waits before its next attempt)
        asyncio.get_running_loop().call_later(0.05, signal.raise_signal, signal.SIGINT)

    # (SIGINT as a terminal starts the CLI; after an interruption the CLI leaves the signals it took ignored, for
    # the rest of its process: put them back for the tests after this one)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        rc, _, err = _chat(monkeypatch, capsys, _Plan(["lost", "dark"], on_dark=ctrl_c))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    lines = err.strip().splitlines()
    assert rc == 130 and lines[-1] == "interrupted", err
    assert lines[-2] == chat_cli.attach_hint(RID), err


def test_the_backoff_doubles_to_its_cap_with_jitter_and_ends_with_the_window():
    """The schedule itself, on a clock of its own: at once after a loss, then 1, 2, 4, 8 s, capped at 15 s, each
    shortened by up to a fifth at random; no attempt starts past RECONNECT_S after the loss; a new loss starts a
    new outage (at once again) and spends a retry."""
    now = [100.0]
    jitter = [0.0]
    r = chat_cli.Reconnecting(2, clock=lambda: now[0], rng=lambda: jitter[0])
    assert r.lost() and r.used == 1 and r.attempts == 1
    waits = []
    while (w := r.failed()) is not None:
        waits.append(w)
        now[0] += w + 10.0  # each attempt a handshake timeout
    assert waits[:6] == [1.0, 2.0, 4.0, 8.0, 15.0, 15.0] and set(waits[4:]) == {15.0}
    assert now[0] - 100.0 <= chat_cli.RECONNECT_S + 10.0 and now[0] - 100.0 + 15.0 > chat_cli.RECONNECT_S
    jitter[0] = 1.0
    assert r.lost() and r.used == 2 and r.failed() == pytest.approx(0.8)  # a fifth off at most
    assert not r.lost() and r.used == 2  # both retries spent
    assert chat_cli.Reconnecting(0).lost() is False


# ------------------------------------------------------------------ 2. a NAT rebinding while an answer streams
NEW_CLIENT = ("10.0.0.2", 40000)  # the client's address after the rebinding (its NAT's new mapping)


def _stream_through_a_rebinding(rebind_at: float | None, seconds: float = 3.0, rate: float = 30.0,
                                ) -> tuple[list[float], int]:
    """An answer at ``rate`` tokens/s over the in-memory pair; at ``rebind_at`` (seconds into it) the client's
    address changes: the server's packets to the old one are lost, as a NAT's old mapping drops them, until a
    client packet from the new one tells the server (RFC 9000, 9.3). Returns the times tokens were rendered (from
    the answer's start, virtual time) and the pings the client sent."""
    from tests.quicpair import CLIENT, SERVER, Pair
    from tokenwire.transport.frames import Request
    from tokenwire.transport.session_events import TokensRendered

    pair = Pair()
    pair.exchange(rounds=40)  # the handshake
    sid = pair.client.start_request(Request(messages=[{"role": "user", "content": "x"}]), pair.now)
    pair.exchange(rounds=20)
    server = pair.server
    assert server is not None
    server.accept(sid)
    start, address, renders, dt = pair.now, CLIENT, [], 0.002
    pinged = pair.client._pings
    for k in range(int(seconds * rate)):  # one token each 1/rate s, the wire stepped each 2 ms
        server.push(sid, f"t{k} ", pair.now)
        until = start + (k + 1) / rate
        while pair.now < until:
            pair.now += dt
            if rebind_at is not None and pair.now - start >= rebind_at:
                address = NEW_CLIENT
            for data, _ in pair.client.datagrams_to_send(pair.now):
                server.receive_datagram(data, address, pair.now)
            for data, to in server.datagrams_to_send(pair.now):
                if to == address:  # (to the old mapping: gone)
                    for ev in pair.client.receive_datagram(data, SERVER, pair.now):
                        if isinstance(ev, TokensRendered):
                            renders.append(pair.now - start)
            for sess in (pair.client, server):
                t = sess.get_timer()
                if t is not None and t <= pair.now:
                    sess.handle_timer(pair.now)
    return renders, pair.client._pings - pinged


def _longest_gap(times: list[float]) -> float:
    return max(b - a for a, b in itertools.pairwise(times))


def test_a_rebinding_mid_answer_is_found_within_a_quarter_second():
    """After a NAT rebinding the server keeps sending to the dead mapping, and the client was silent until its
    1-s pause ping: each rebinding held the tokens ~1 s (relay rebinding every 2 s: stall ratio 0.469, clean
    0.022). Once tokens stop for a quarter second (several of their gaps) the client pings, from its new
    address."""
    renders, pings = _stream_through_a_rebinding(1.5)
    assert renders[-1] > 2.9  # the answer went on at the new address
    assert _longest_gap(renders) < 0.4, _longest_gap(renders)  # (1 s and more with the 1-s pause ping)
    assert 1 <= pings <= 2


def test_a_clean_answer_sends_no_extra_pings():
    """Tokens that keep coming (every 33 ms) ping nothing: the extra pings cost nothing on a clean path."""
    renders, pings = _stream_through_a_rebinding(None)
    assert pings == 0 and _longest_gap(renders) < 0.1


def _session_with_token_packets(times: list[float]) -> Any:
    """A client session whose answer's token packets arrived at ``times``."""
    from aioquic.quic.connection import QuicConnection

    from tokenwire.transport.client_session import ClientSession
    from tokenwire.transport.frames import Request, Tokens
    from tokenwire.transport.tls import client_configuration

    cfg = client_configuration(server_name="localhost")
    cfg.idle_timeout = 60.0
    session = ClientSession(QuicConnection(configuration=cfg))
    sid = session.start_request(Request(messages=[{"role": "user", "content": "x"}]), 0.0)
    req = session.requests[sid]
    for i, t in enumerate(times):
        session._tokens(req, Tokens(sid, i, [b"t"]), t)
        session._heard_at = t  # (the datagram's QUIC event)
    return session


@pytest.mark.parametrize(("gap", "silence"), [(1 / 30, 0.25), (0.1, 0.4), (0.2, 0.8), (0.5, 1.0), (3.0, 1.0)])
def test_the_stall_ping_waits_a_few_token_gaps_at_least_a_quarter_second_at_most_the_pause_pace(gap, silence):
    """The ping after tokens stop comes after four of the answer's recent gaps between token packets, a quarter
    second at least (a fast answer's ordinary jitter pings nothing) and the 1-s pause pace at most (a slow
    answer's gaps are not stalls)."""
    times = [1.0 + k * gap for k in range(40)]
    session = _session_with_token_packets(times)
    assert session._keepalive_at() == pytest.approx(times[-1] + silence, rel=1e-3)


def test_one_early_ping_per_stall_then_the_pause_pace():
    """A pause mid-answer (a slow model, a tool call): one early ping, then one a second as before, not four a
    second for the whole pause; the next tokens re-arm it."""
    times = [1.0 + k / 30 for k in range(40)]
    session = _session_with_token_packets(times)
    first = session._keepalive_at()
    session._on_session_timer(first)  # the early ping goes
    assert session._pinged_at == first
    assert session._keepalive_at() == pytest.approx(first + 1.0)
    session._heard_at = first + 0.01  # the server's ack of the ping
    assert session._keepalive_at() == pytest.approx(first + 1.01)
    again = [first + 0.5 + k / 30 for k in range(40)]  # the answer goes on: its next stall pings early again
    session = _session_with_token_packets([*times, *again])
    assert session._keepalive_at() == pytest.approx(again[-1] + 0.25, rel=1e-3)


def test_before_the_first_token_the_pings_keep_their_pace():
    """Nothing is expected yet (a model thinking): the early ping is for stalls mid-answer only."""
    session = _session_with_token_packets([])
    assert session._keepalive_at() == pytest.approx(1.0)
