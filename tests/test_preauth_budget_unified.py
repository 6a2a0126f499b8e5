"""One budget for what connections not yet authorized hold, on both ports (transport/preauth_budget.py).

The daemon's chat port and the KV endpoint had a copy each of the same arithmetic; now both keep a
:class:`PreauthBudget`. Its floor is the largest allowance a connection still counted was granted (a reload lowering
``limits.max_request_bytes`` closed a lone connection opened before it, for what its own window let it send), and a
KV fetch stream the client resets lets go of what aioquic buffered of it at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from aioquic.quic import events as qe

from tokenwire.daemon.config import load_config
from tokenwire.daemon.service import Daemon
from tokenwire.transport.errors import ErrorCode
from tokenwire.transport.kv_server import KVServerProtocol
from tokenwire.transport.preauth_budget import PreauthBudget, Shed

from .test_auth_fixes2 import ALICE, _almost_whole
from .test_handshake_limits import until, value
from .test_hostile_clients import _raw
from .test_kv_channel_refusals import CLIENT, KVPair
from .test_loopback import run

KIB = 1 << 10


def _budget(limit: int, **measure: int) -> PreauthBudget[str]:
    """A budget of ``limit`` bytes over string holders; ``measure``: what each holder holds now (the recount)."""
    return PreauthBudget(lambda: limit, measure=(lambda h: measure[h]) if measure else None)


# ------------------------------------------------------------------------------------------ the class alone
def test_a_lone_holder_within_its_allowance_is_never_shed_whatever_the_limit():
    budget = _budget(100)
    assert budget.budget() == 100 and budget.floor() == 0  # (none counted: the limit)
    budget.add("a", allowance=1000)
    assert budget.account("a", 1000) == [] and budget.held == 1000 and budget.budget() == 1000
    assert budget.account("a", 1001) == [Shed("a", 1001, 1000)]  # past what it was granted: shed
    assert "a" not in budget and budget.held == 0


def test_the_floor_is_the_largest_allowance_still_counted():
    budget = _budget(100)
    budget.add("small", allowance=200)
    budget.add("large", allowance=900)
    assert budget.floor() == 900
    budget.forget("large")
    assert budget.floor() == 200 and budget.budget() == 200


def test_the_largest_holder_goes_first_and_only_as_many_as_needed():
    budget = _budget(1000)
    for name in ("old", "big", "mid", "new"):
        budget.add(name, allowance=10)
    budget.account("old", 100)
    budget.account("big", 500)
    budget.account("mid", 300)
    shed = budget.account("new", 200)  # 1100 together: one close is enough
    assert shed == [Shed("big", 500, 1000)]
    assert list(budget) == ["old", "mid", "new"] and budget.held == 600
    assert budget.account("new", 900) == [Shed("new", 900, 1000)]  # 1300: the largest, itself
    assert list(budget) == ["old", "mid"]


def test_of_equal_holders_the_oldest_goes():
    budget = _budget(1000)
    for name in ("first", "second", "third", "fourth"):
        budget.add(name, allowance=10)
    for name in ("second", "first", "third"):  # (counted in another order than they came)
        assert budget.account(name, 300) == []
    assert budget.account("fourth", 300) == [Shed("first", 300, 1000)]  # 1200: one of four equals, the oldest
    assert list(budget) == ["second", "third", "fourth"] and budget.held == 900


def test_past_the_budget_every_holder_is_counted_afresh_before_any_is_shed():
    now = {"quiet": 0, "sending": 1 << 20}
    budget: PreauthBudget[str] = PreauthBudget(lambda: 2 << 20, measure=lambda h: now[h])
    budget.add("quiet", allowance=0)
    budget.add("sending", allowance=0)
    budget.account("quiet", 1_500_000)  # its streams refused since, with no datagram of its own to say so
    assert budget.account("sending", 1 << 20) == []
    assert budget.held == 1 << 20 and budget.held_by("quiet") == 0 and budget.held_by("sending") == 1 << 20


def test_no_recount_without_a_measure():
    budget = _budget(2 << 20)
    budget.add("quiet", allowance=0)
    budget.add("sending", allowance=0)
    budget.account("quiet", 1_500_000)
    assert budget.account("sending", 1 << 20) == [Shed("quiet", 1_500_000, 2 << 20)]


def test_what_a_forgotten_holder_held_stops_counting():
    budget = _budget(1000)
    budget.add("a", allowance=10)
    budget.add("b", allowance=10)
    budget.account("a", 300)
    budget.account("b", 200)
    assert budget.forget("a") == 300 and budget.held == 200 and budget.held_by("a") == 0
    assert budget.forget("a") == 0 and budget.forget("never counted") == 0 and budget.held == 200
    assert budget.oldest() == "b"
    budget.forget("b")
    assert budget.oldest() is None and not budget and budget.held == 0


def test_a_holder_that_becomes_authorized_is_out_of_every_count():
    """Authorized (forgotten): its later counts change nothing, it is never shed, and it is not the oldest."""
    budget = _budget(1000)
    budget.add("token holder", allowance=10)
    budget.add("flood", allowance=10)
    budget.account("token holder", 600)
    budget.forget("token holder")  # its first request carried a valid token
    assert budget.account("token holder", 5000) == [] and budget.held == 0
    assert budget.account("flood", 1200) == [Shed("flood", 1200, 1000)]
    assert "token holder" not in budget and budget.held == 0


def test_a_lower_limit_applies_at_the_next_count_but_never_under_a_holders_allowance():
    """The budget's limit is read at each count (a reload); the floor is what the holders were granted."""
    limit = [4000]
    budget: PreauthBudget[str] = PreauthBudget(lambda: limit[0])
    budget.add("early", allowance=3000)  # granted under the old limits
    budget.account("early", 2500)
    limit[0] = 1000  # lowered between two counts
    assert budget.account("early", 2600) == []  # alone: within what it was granted
    budget.add("late", allowance=300)
    assert budget.account("late", 600) == [Shed("early", 2600, 3000)]  # together past the floor: the largest goes


def test_counts_and_allowances_are_checked():
    budget = _budget(1000)
    with pytest.raises(ValueError, match="negative"):
        budget.add("a", allowance=-1)
    budget.add("a", allowance=0)
    with pytest.raises(ValueError, match="counted already"):
        budget.add("a", allowance=0)
    with pytest.raises(ValueError, match="negative"):
        budget.account("a", -5)


def test_the_transport_side_imports_nothing_of_the_daemon():
    """transport/ is the library (the SDK, serve_kv) and daemon/ builds on it, never the other way round."""
    code = ("import sys, tokenwire.transport.preauth_budget, tokenwire.transport.kv_server; "
            "print(sorted(m for m in sys.modules if m.startswith('tokenwire.daemon')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout


# ------------------------------------------------------------------------------------------ the chat port's floor
def _config_text(max_request_bytes: int) -> str:
    digest = hashlib.sha256(ALICE.encode()).hexdigest()
    return (f'[server]\nlisten = ["127.0.0.1:0"]\n[metrics]\nlisten = ""\n'
            f"[limits]\nunauthorized_memory_mb = 1\nmax_request_bytes = {max_request_bytes}\n"
            f'[[auth.tokens]]\nname = "alice"\nsha256 = "{digest}"\n')


@contextlib.asynccontextmanager
async def _daemon_from(path: Path) -> AsyncIterator[Daemon]:
    """The daemon in this process, from a file a reload rereads."""
    daemon = Daemon(load_config(path))
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


def test_a_connection_opened_before_a_reload_lowering_max_request_bytes_keeps_its_floor(tmp_path: Path):
    """limits.unauthorized_memory_mb = 1 with max_request_bytes 1 MiB: a lone connection holding two requests short
    of their last byte (~2 MiB: within its window) is kept. A reload lowering max_request_bytes to 64 KiB left its
    session with the 1-MiB requests and the window it was granted, but the floor read the new setting (~192 KiB,
    so the 1-MiB budget): its next datagram had it closed, alone, for what its own window let it send."""
    max_request = 1 << 20
    path = tmp_path / "tokenwire.toml"
    path.write_text(_config_text(max_request))

    async def go() -> tuple[int, bool, int, bool, float, list[qe.ConnectionTerminated]]:
        async with _daemon_from(path) as daemon, _raw(daemon) as raw:
            await until(lambda: len(daemon.admission.unauthorized) == 1, 10)
            proto = next(iter(daemon.admission.unauthorized))
            _almost_whole(raw._quic, 2, max_request)
            raw.transmit()
            await until(lambda: daemon.admission.unauthorized.held >= 2 * max_request, 30)
            held = daemon.admission.unauthorized.held
            path.write_text(_config_text(64 << 10))
            reloaded = daemon.reload() and daemon.config.limits.max_request_bytes == 64 << 10
            raw._quic.send_ping(7)  # its next datagram, counted
            raw.transmit()
            # (its count is made as that datagram is read, before the server's ACK can reach the client)
            await until(lambda: any(isinstance(e, qe.PingAcknowledged | qe.ConnectionTerminated) for e in raw.events),
                        10)
            shed = value(daemon, "tokenwire_handshakes_refused_total", {"reason": "memory"})
            ends = [e for e in raw.events if isinstance(e, qe.ConnectionTerminated)]
            unauthorized = daemon.admission.unauthorized
            return held, reloaded, unauthorized.held, proto in unauthorized, shed, ends

    held, reloaded, held_after, counted, shed, ends = run(go(), 60)
    assert held >= 2 * max_request and reloaded
    assert shed == 0 and not ends and counted and held_after >= 2 * max_request


class _StaleChat:
    """A chat-port connection not yet authorized, as the daemon counts it: what it holds now (``now``, given by
    held_bytes()); a close is recorded."""

    def __init__(self, now: int, max_request_bytes: int) -> None:
        self.now = now
        self.established = True
        self.closing = False
        self.peer = "192.0.2.1:4433"
        self.closed: list[tuple[int, str]] = []
        self.server_session = SimpleNamespace(max_request_bytes=max_request_bytes,
                                              close=lambda code, reason: self.closed.append((code, reason)))

    def held_bytes(self) -> int:
        return self.now

    def transmit(self) -> None:
        pass


def test_a_chat_count_past_the_budget_is_checked_against_what_the_others_hold_now(tmp_path: Path):
    """The chat port recounts as the KV endpoint does: what a connection held at its last datagram may be gone
    since (its request refused by its deadline, a timer, with no datagram of its own). A client quiet since its
    700-KB request was refused got a token holder's next datagram closing it, for the 1 MB of its prompt: 1.7 MB
    counted against the 1.5-MiB floor (max_request_bytes 512 KiB), 1 MB held."""
    max_request = 512 * KIB
    path = tmp_path / "tokenwire.toml"
    path.write_text(_config_text(max_request))
    daemon = Daemon(load_config(path))  # (not started: the budget's arithmetic and its closes alone)
    quiet, sending = _StaleChat(0, max_request), _StaleChat(1 << 20, max_request)
    for proto in (quiet, sending):
        daemon.admission.count_unauthorized(proto)  # type: ignore[arg-type]  # (as _on_handshake counts a connection)
    daemon.admission.account_unauthorized(quiet, 700_000)  # type: ignore[arg-type]
    quiet.now = 0  # its request refused since by its deadline, with no datagram of its own to say so
    daemon.admission.account_unauthorized(sending, 1 << 20)  # type: ignore[arg-type]
    assert not quiet.closed and not sending.closed
    assert value(daemon, "tokenwire_handshakes_refused_total", {"reason": "memory"}) == 0
    assert daemon.admission.unauthorized.held == 1 << 20 and daemon.admission.unauthorized.held_by(quiet) == 0  # type: ignore[arg-type]
    # past the budget with what they hold now, the largest goes, as before
    quiet.now = 700_000
    daemon.admission.account_unauthorized(quiet, 700_000)  # type: ignore[arg-type]
    assert sending.closed and not quiet.closed and sending not in daemon.admission.unauthorized


# ------------------------------------------------------------------------------------------ KV: a reset fetch stream
def _held(pair: KVPair) -> int:
    """What the KV endpoint counts of this connection (KVServerProtocol.held_bytes, on the sans-I/O session)."""
    assert pair.server is not None
    shell = SimpleNamespace(_quic=pair.server.quic, kv=pair.server)  # (what held_bytes reads of its connection)
    return KVServerProtocol.held_bytes(shell)  # type: ignore[arg-type]


def test_a_fetch_stream_the_client_resets_stops_counting_at_once():
    """A client sends most of a KV_FETCH with one byte withheld early on (aioquic buffers what follows the gap),
    then resets the stream and never acknowledges the server's reset: the stream is never discarded, and its
    buffered bytes stayed in what the connection holds (for the budget of connections not yet authorized) although
    nothing of them can be delivered any more."""
    pair = KVPair()
    pair.serve = False
    quic = pair.client.quic
    size = 600_000
    sid = quic.get_next_available_stream_id()
    quic.send_stream_data(sid, struct.pack(">I", size) + bytes(size - 1))  # (short of its last byte too)
    quic._streams[sid].sender._pending.subtract(100, 101)  # one byte never sent: the rest waits behind it
    pair.exchange(rounds=200)
    server = pair.server
    assert server is not None and sid in server.fetches  # its first 100 bytes were read: a fetch arriving
    buffered = len(server.quic._streams[sid].receiver._buffer)
    assert buffered > 100 * KIB and _held(pair) >= buffered
    quic.reset_stream(sid, ErrorCode.CANCELLED)
    for data, _ in quic.datagrams_to_send(pair.now):  # the reset reaches the server; nothing goes back
        pair.server_events.extend(server.receive_datagram(data, CLIENT, pair.now))
    stream = server.quic._streams.get(sid)
    assert stream is not None and stream.receiver.is_finished  # (not discarded: our reset is not acknowledged)
    assert sid not in server.fetches and _held(pair) == 0


class _ScanCountingDict(dict):  # type: ignore[type-arg]
    """The budget's holdings, counting every walk over them."""

    walks = 0

    def values(self):  # type: ignore[no-untyped-def]
        type(self).walks += 1
        return super().values()

    def __iter__(self):  # type: ignore[no-untyped-def]
        type(self).walks += 1
        return super().__iter__()


def test_a_count_under_the_budget_walks_no_holder():
    """account() runs for every datagram of every connection not yet authorized: its floor was a max() over every
    holder (591 us a datagram at 10,000 holders, so ~1,700 datagrams/s of token-less pings filled the event loop).
    Under the budget, a count looks at no other holder; the floor follows adds and forgets."""
    budget: PreauthBudget[int] = PreauthBudget(lambda: 1 << 30)
    budget._holdings = _ScanCountingDict()
    for h in range(1000):
        budget.add(h, 100 + h % 3)
    _ScanCountingDict.walks = 0
    for h in range(1000):
        assert budget.account(h, 10) == []
    assert _ScanCountingDict.walks == 0
    assert budget.floor() == 102
    for h in range(2, 1000, 3):  # every holder granted 102
        budget.forget(h)
    assert budget.floor() == 101


def test_shedding_many_holders_walks_them_a_fixed_number_of_times():
    """Past the budget every victim was a max() over every holder: one datagram after a reload lowered the budget
    shed 1,607 of 2,000 connections and stalled the daemon's loop ~1 s (168 ms in account() alone, 2.3 s at
    8,000). The holders are walked a fixed number of times (the recount, the sum, the order of the victims),
    whatever how many go; the largest still go first, the oldest of equals first."""
    limit = [1 << 40]
    budget: PreauthBudget[int] = PreauthBudget(lambda: limit[0], measure=lambda h: 100 + h % 7)
    budget._holdings = _ScanCountingDict()
    for h in range(2000):
        budget.add(h, 0)
        budget.account(h, 100 + h % 7)
    limit[0] = budget.held // 10  # lowered: most must go
    _ScanCountingDict.walks = 0
    shed = budget.account(0, 100)
    assert _ScanCountingDict.walks <= 3 and len(shed) > 1500
    assert budget.held <= limit[0]
    helds = [s.held for s in shed]
    assert helds == sorted(helds, reverse=True) and helds[0] == 106
    equals = [s.holder for s in shed if s.held == 106]
    assert equals == sorted(equals)  # (oldest first among equals)
