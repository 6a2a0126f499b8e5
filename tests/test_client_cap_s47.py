"""One client may not take every live answer (session 47): ``limits.max_live_answers_per_client`` caps the answers
being generated for one client (its auth principal, else its address; an IPv6 one by its /64). Past it that client's
new request is refused (LIMIT_EXCEEDED, the Retry-After suffix, counted and logged) while other clients are served;
each answer leaves its client's count once, however it ends (finished, cancelled, failed, reclaimed as an orphan, the
orphan timeout). Before, one client opening many connections held all ``limits.max_live_answers``."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tokenwire.daemon.answers import LiveAnswers, client_key
from tokenwire.daemon.config import MAX_LIVE_ANSWERS, ConfigError, Limits, load_config, parse_config
from tokenwire.daemon.sendable_upstream import SendableUpstream
from tokenwire.daemon.service import Daemon
from tokenwire.transport.client import connect
from tokenwire.transport.errors import ErrorCode, RemoteError, retry_after_of
from tokenwire.transport.frames import Request

from .test_answers_s34 import Endless, Failing, answers, limits, settle
from .test_loopback import run

T = 10.0
SLOW = {"rate": 20}  # the demo upstream at 20 tokens/s: an answer that outlasts the test unless it is cancelled
ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789"
CAP_MSG = "too many answers for this client: 2 being generated (limits.max_live_answers_per_client); retry later"


def start(ans: LiveAnswers, client: str | None, upstream: Any = None) -> Any:
    request = Request(messages=[{"role": "user", "content": "x"}], max_tokens=10)
    return ans.start(request, SendableUpstream(upstream or Endless()), "route", principal=None, peer="peer", now=0.0,
                     client=client)


def refused(ans: LiveAnswers) -> float:
    return ans.metrics.registry.get_sample_value("tokenwire_client_answers_refused_total") or 0.0


# ------------------------------------------------------------------------------------------ the setting
def test_the_setting_is_off_by_default_and_bounded_like_the_others():
    assert Limits().max_live_answers_per_client == 0 and limits().max_live_answers_per_client == 0
    assert limits(max_live_answers_per_client=0).max_live_answers_per_client == 0
    assert limits(max_live_answers_per_client=MAX_LIVE_ANSWERS).max_live_answers_per_client == MAX_LIVE_ANSWERS
    for bad in (-1, MAX_LIVE_ANSWERS + 1, 2.0, "2", True):
        with pytest.raises(ConfigError, match=r"limits.max_live_answers_per_client: expected an integer in \[0, "):
            limits(max_live_answers_per_client=bad)


def test_config_check_warns_of_a_share_that_caps_nothing():
    from tokenwire.daemon.config_warnings import limits_warnings

    def cfg(**lim: Any) -> Any:
        return parse_config({"metrics": {"listen": ""}, "limits": lim})

    assert limits_warnings(cfg()) == []
    assert limits_warnings(cfg(max_live_answers=8, max_live_answers_per_client=2)) == []
    (warning,) = limits_warnings(cfg(max_live_answers=8, max_live_answers_per_client=8))
    assert "max_live_answers_per_client = 8 is not below limits.max_live_answers = 8" in warning


def test_a_client_is_its_principal_else_its_address_an_ipv6_one_by_its_64():
    assert client_key("alice", "127.0.0.1") == client_key("alice", "::1") == "alice"
    assert client_key("cert:edge-1", "10.0.0.1") == "cert:edge-1"
    assert client_key(None, "127.0.0.2") == "addr 127.0.0.2"
    assert client_key(None, "::ffff:127.0.0.2") == "addr 127.0.0.2"  # a dual-stack socket's view: the same host
    assert client_key(None, "2001:db8:1:2::1") == client_key(None, "2001:db8:1:2:ffff::9") == "addr 2001:db8:1:2::/64"
    assert client_key(None, "2001:db8:1:3::1") != client_key(None, "2001:db8:1:2::1")
    assert client_key(None, "fe80::1%eth0") == "addr fe80::/64"
    assert client_key(None, "?") == "addr ?"


# ------------------------------------------------------------------------------------------ LiveAnswers on its own
def test_past_the_cap_that_client_is_refused_with_the_suffix_and_others_are_served():
    async def go() -> tuple[str | None, str | None, str | None, str | None]:
        ans = answers(limits(max_live_answers_per_client=2))
        start(ans, "addr 127.0.0.1")
        start(ans, "addr 127.0.0.1")
        mine, other, nobody = ans.client_busy("addr 127.0.0.1"), ans.client_busy("addr 127.0.0.2"), ans.busy()
        ans.cancel_all()
        await settle()
        return mine, other, nobody, ans.client_busy("addr 127.0.0.1")

    mine, other, nobody, after = run(go(), 10)
    assert mine is not None and mine.startswith(CAP_MSG + "; Retry-After: ") and retry_after_of(mine) == 1.0
    assert other is None and nobody is None and after is None


def test_off_no_client_is_ever_refused():
    async def go() -> str | None:
        ans = answers(limits())
        for _ in range(5):
            start(ans, "addr 127.0.0.1")
        busy = ans.client_busy("addr 127.0.0.1")
        ans.cancel_all()
        await settle()
        return busy

    assert run(go(), 10) is None


def test_the_retry_after_goes_by_that_clients_own_answer_ends():
    async def go() -> int | None:
        ans = answers(limits(max_live_answers_per_client=1))
        start(ans, "a")
        ans.ends.extend([time.monotonic() - 2.0, time.monotonic() - 1.0])  # the server's ends: not a's
        now = time.monotonic()
        ans.clients["a"].ends.extend([now - 13.0, now - 7.0, now - 1.0])  # one of a's every 6 s, the last 1 s ago
        busy = ans.client_busy("a")
        ans.cancel_all()
        await settle()
        return None if busy is None else int(retry_after_of(busy) or 0)

    assert run(go(), 10) == 5


def test_a_client_at_its_cap_gives_up_its_own_oldest_orphans_not_anothers():
    """A client whose connection was lost and that asks anew instead of resuming (a reloaded page) was refused for
    limits.orphan_timeout_s by the answers it had orphaned itself; another client's orphans are never taken for it."""
    async def go() -> tuple[Any, ...]:
        ans = answers(limits(max_live_answers=10, max_live_answers_per_client=2, orphan_timeout_s=300))
        a1, a2, b1 = start(ans, "a"), start(ans, "a"), start(ans, "b")
        await settle()
        ans.unattended(b1, cancel=False)  # b's orphan: not a's to take
        first = ans.client_busy("a")  # a's two attached: refused, nothing cancelled
        ans.unattended(a2, cancel=False)
        ans.unattended(a1, cancel=False)  # a2 orphaned the longest
        second = ans.client_busy("a")
        kept = {k: v.live for k, v in ans.clients.items()}
        await settle()
        ended = (a1.done, a2.done, b1.done)
        ans.cancel_all()
        await settle()
        return first is not None, second, kept, ended

    assert run(go(), 10) == (True, None, {"a": 1, "b": 1}, (False, True, False))


def test_each_answer_leaves_its_clients_count_once_however_it_ends():
    """Finished or failed (Failing), cancelled by its client, cancelled by the orphan timeout, reclaimed as an orphan
    past max_live_answers (it leaves at once; its task's end later does not count it off again)."""
    async def go() -> list[dict[str, int]]:
        lim = limits(max_live_answers=3, max_live_answers_per_client=3, orphan_timeout_s=30)
        ans = answers(lim)
        seen = []
        failed = start(ans, "a", Failing())
        await settle()
        seen.append({k: v.live for k, v in ans.clients.items()})  # failed: gone
        cancelled, lost, reclaimed = start(ans, "a"), start(ans, "a"), start(ans, "b")
        await settle()
        seen.append({k: v.live for k, v in ans.clients.items()})
        ans.unattended(cancelled, cancel=True)  # its client cancelled it
        await settle()
        seen.append({k: v.live for k, v in ans.clients.items()})
        ans.unattended(reclaimed, cancel=False)  # b's: orphaned the longest
        ans.unattended(lost, cancel=False)
        start(ans, "c")  # 3 live: the next one reclaims b's orphan
        assert ans.busy() is None
        seen.append({k: v.live for k, v in ans.clients.items()})  # at once, before its task ended
        await settle()
        seen.append({k: v.live for k, v in ans.clients.items()})  # its task's end: not counted off twice
        ans.cancel_orphans(time.monotonic() + 31)  # a's lost answer, past the orphan timeout
        await settle()
        seen.append({k: v.live for k, v in ans.clients.items()})
        assert failed.done and reclaimed.done and lost.done
        ans.cancel_all()
        await settle()
        seen.append({k: v.live for k, v in ans.clients.items()})
        return seen

    assert run(go(), 10) == [{}, {"a": 2, "b": 1}, {"a": 1, "b": 1}, {"a": 1, "c": 1}, {"a": 1, "c": 1}, {"c": 1},
                             {}]


def test_ingest_answers_and_uncounted_starts_do_not_count(caplog):
    """The application's answers are its own, not a remote client's: they count toward max_live_answers only."""
    async def go() -> dict[str, Any]:
        ans = answers(limits(max_live_answers_per_client=1))
        live = ans.store.create("alice", 10, 0.0)
        ans.ingest_opened(live)
        start(ans, None)
        clients = dict(ans.clients)
        ans.cancel_all()
        await settle()
        return clients

    assert run(go(), 10) == {}


def test_refusals_are_counted_each_and_logged_once_then_summed_up(caplog):
    caplog.set_level(logging.INFO, logger="tokenwire.daemon")

    async def go() -> float:
        ans = answers(limits(max_live_answers_per_client=1))
        start(ans, "addr 127.0.0.1")
        for _ in range(3):
            assert ans.client_busy("addr 127.0.0.1") is not None
            ans.client_refused("a request from 127.0.0.1:5000", "addr 127.0.0.1")
        ans.client_refusals.flush(time.monotonic() + 3600)
        ans.cancel_all()
        await settle()
        return refused(ans)

    assert run(go(), 10) == 3
    lines = [r.getMessage() for r in caplog.records if "max_live_answers_per_client" in r.getMessage()]
    assert lines[0].startswith("refusing a request from 127.0.0.1:5000: too many answers for its client addr "
                               "127.0.0.1, 1 being generated (limits.max_live_answers_per_client = 1)"), lines
    assert lines[1].startswith("refused 2 more answers in the last "), lines
    assert len(lines) == 2, lines


# ------------------------------------------------------------------------------------------ the daemon
@contextlib.asynccontextmanager
async def _daemon(auth: bool = False, **lim: Any) -> AsyncIterator[Daemon]:
    """The daemon in this process on 127.0.0.1 and ::1 (two client addresses on one host), the demo upstream."""
    cfg: dict[str, Any] = {"server": {"listen": ["127.0.0.1:0", "[::1]:0"]}, "metrics": {"listen": ""},
                           "limits": {"orphan_timeout_s": 60, **lim}}
    if auth:
        cfg["auth"] = {"tokens": [{"name": name, "sha256": hashlib.sha256(tok.encode()).hexdigest()}
                                  for name, tok in (("alice", ALICE), ("bob", BOB))]}
    daemon = Daemon(parse_config(cfg))
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


def _port(daemon: Daemon, host: str) -> int:
    return next(port for h, port in daemon.addresses if h == host)


def test_one_address_past_the_cap_is_refused_on_any_connection_and_another_address_is_served():
    async def go() -> tuple[RemoteError, str, float, str]:
        async with _daemon(max_live_answers_per_client=2) as daemon, \
                connect("127.0.0.1", _port(daemon, "127.0.0.1"), verify=False) as one, \
                connect("127.0.0.1", _port(daemon, "127.0.0.1"), verify=False) as two, \
                connect("::1", _port(daemon, "::1"), verify=False) as other:
            held = [one.chat("long", max_tokens=400, params=SLOW), two.chat("long", max_tokens=400, params=SLOW)]
            for stream in held:
                await asyncio.wait_for(anext(stream), T)  # being generated
            with pytest.raises(RemoteError) as caught:  # a third, on either connection of that address
                await asyncio.wait_for(two.chat("third", max_tokens=3).collect(), T)
            served = await asyncio.wait_for(other.chat("other", max_tokens=3).collect(), T)
            count = daemon.metrics.registry.get_sample_value("tokenwire_client_answers_refused_total") or 0.0
            await held[0].cancel()  # one of its answers ends: a place for it again
            deadline = time.monotonic() + T
            while daemon.answers.clients.get("addr 127.0.0.1", None) and \
                    daemon.answers.clients["addr 127.0.0.1"].live > 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            again = await asyncio.wait_for(one.chat("again", max_tokens=3).collect(), T)
            await held[1].cancel()
            return caught.value, served, count, again

    err, served, count, again = run(go(), 30)
    assert err.code == ErrorCode.LIMIT_EXCEEDED and err.retry_after is not None and 1 <= err.retry_after <= 10, err
    assert str(err).startswith(CAP_MSG + "; Retry-After: "), err
    assert served and again and count == 1


def test_with_auth_tokens_two_principals_on_one_address_are_counted_apart():
    async def go() -> tuple[RemoteError, str, set[str]]:
        async with _daemon(auth=True, max_live_answers_per_client=1) as daemon, \
                connect("127.0.0.1", _port(daemon, "127.0.0.1"), verify=False, auth_token=ALICE) as alice, \
                connect("127.0.0.1", _port(daemon, "127.0.0.1"), verify=False, auth_token=BOB) as bob:
            held = alice.chat("long", max_tokens=400, params=SLOW)
            await asyncio.wait_for(anext(held), T)
            with pytest.raises(RemoteError) as caught:
                await asyncio.wait_for(alice.chat("second", max_tokens=3).collect(), T)
            served = await asyncio.wait_for(bob.chat("bob's", max_tokens=3).collect(), T)
            clients = set(daemon.answers.clients)
            await held.cancel()
            return caught.value, served, clients

    err, served, clients = run(go(), 30)
    assert err.code == ErrorCode.LIMIT_EXCEEDED and "limits.max_live_answers_per_client" in str(err), err
    assert served and "alice" in clients


def test_a_reload_applies_the_new_cap_to_the_next_request(tmp_path):
    """As max_live_answers: read at each request; answers live over a lowered cap go on, new ones wait."""
    path = tmp_path / "tokenwire.toml"
    base = '[server]\nlisten = ["127.0.0.1:0"]\n[metrics]\nlisten = ""\n[limits]\norphan_timeout_s = 60\n'
    path.write_text(base)

    async def go() -> tuple[str, str | None, str | None]:
        daemon = Daemon(load_config(path))
        await daemon.start()
        try:
            async with connect("127.0.0.1", daemon.addresses[0][1], verify=False) as conn:
                held = conn.chat("long", max_tokens=400, params=SLOW)
                await asyncio.wait_for(anext(held), T)
                path.write_text(base + "max_live_answers_per_client = 1\n")
                assert daemon.reload()
                with pytest.raises(RemoteError) as caught:
                    await asyncio.wait_for(conn.chat("second", max_tokens=3).collect(), T)
                path.write_text(base)  # off again
                assert daemon.reload()
                served = await asyncio.wait_for(conn.chat("third", max_tokens=3).collect(), T)
                await held.cancel()
                return served, str(caught.value), daemon.answers.client_busy("addr 127.0.0.1")
        finally:
            await daemon.stop()

    served, err, after = run(go(), 30)
    assert served and "too many answers for this client: 1 being generated" in err and after is None


def test_the_client_address_is_the_validated_paths_not_a_forged_sources() -> None:
    """aioquic puts a path first on any non-probing packet from a new address, before validating it: a request sent
    from a forged source address counted toward that address (evading the cap, or filling another's)."""
    from types import SimpleNamespace

    from tokenwire.daemon.connection import DaemonProtocol

    from .quicpair import CLIENT, Pair

    pair = Pair()
    pair.exchange()
    server = pair.server
    assert server is not None
    proto = SimpleNamespace(_quic=server.quic, _initial_host=CLIENT[0], _handshake_only=set())
    assert DaemonProtocol.peer_host.fget(proto) == CLIENT[0]  # type: ignore[attr-defined]
    pair.client.quic.send_stream_data(0, b"REQUEST", end_stream=False)
    for data, _ in pair.client.datagrams_to_send(pair.now + 0.01):
        server.receive_datagram(data, ("198.51.100.77", 5555), pair.now + 0.01)
    assert server.quic._network_paths[0].addr[0] == "198.51.100.77"  # what it read before
    assert DaemonProtocol.peer_host.fget(proto) == CLIENT[0]  # type: ignore[attr-defined]


def test_a_path_only_a_forged_handshake_packet_validated_is_not_the_clients_address() -> None:
    """aioquic takes any Handshake packet's source as proven: a client that sends its Finished from a forged address
    had that address validated, and it keyed the cap; the Initial's host (where the server's Initial went) is."""
    from types import SimpleNamespace

    from aioquic import tls
    from aioquic.quic.connection import QuicConnection

    from tokenwire.daemon.connection import DaemonProtocol
    from tokenwire.transport.tls import client_configuration, dev_cert, server_configuration

    server_addr, real, forged = ("10.0.0.1", 443), ("192.0.2.7", 5000), ("198.51.100.9", 5000)
    client = QuicConnection(configuration=client_configuration(cadata=dev_cert().cert_pem, server_name="localhost"))
    client.connect(server_addr, now=0.0)
    server = QuicConnection(configuration=server_configuration(),
                            original_destination_connection_id=client.original_destination_connection_id)
    for _ in range(10):  # the client's Handshake flight (its Finished) from the forged address, the rest from its own
        for data, _ in client.datagrams_to_send(now=0.0):
            handshake = client._cryptos[tls.Epoch.HANDSHAKE].send.is_valid() and data[0] & 0x80
            server.receive_datagram(data, forged if handshake else real, now=0.0)
        for data, _ in server.datagrams_to_send(now=0.0):
            client.receive_datagram(data, server_addr, now=0.0)
    assert any(p.addr == forged and p.is_validated for p in server._network_paths)  # what it read before
    validated = {p.addr for p in server._network_paths if p.is_validated and p.addr[0] != real[0]}  # _on_handshake's
    proto = SimpleNamespace(_quic=server, _initial_host=real[0], _handshake_only=validated)
    assert DaemonProtocol.peer_host.fget(proto) == real[0]  # type: ignore[attr-defined]
