"""How requests end and what the daemon counts of the errors it sends, as a probe found them: malformed requests and
requests that never came whole (half a REQUEST, then the client's close) were counted "lost" (8 garbage connections
made completed + cancelled + lost + failed exceed tokenwire_requests_total); docs/metrics.md said every close of the
daemon's is in tokenwire_errors_total while its capacity closes (limits.max_sessions, evictions) are counted as
refused handshakes instead, and that each connection counts once while an evicted one is a session too; the
too-large refusal did not name limits.max_request_bytes; and a reload's log line printed the new [limits] as a
Python repr without saying what had changed."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aioquic.asyncio import connect as aioquic_connect
from aioquic.asyncio.protocol import QuicConnectionProtocol

from tokenwire.daemon import service
from tokenwire.daemon.config import parse_config
from tokenwire.daemon.reload_decisions import changed_settings, plan_reload
from tokenwire.daemon.service import Daemon
from tokenwire.daemon.telemetry import REQUEST_OUTCOMES
from tokenwire.transport import tls
from tokenwire.transport.client import connect
from tokenwire.transport.errors import ErrorCode, RemoteError
from tokenwire.transport.frames import SCHEMES, Request, encode_stream_frame
from tokenwire.transport.server_session import ServerSession
from tokenwire.transport.session_events import RequestCancelled

from .quicpair import Pair
from .test_daemon_reload import _Notes
from .test_handshake_limits import until, value
from .test_loopback import run
from .test_observability_fixes2 import _close_as_a_lost_path, _FailingUpstream, serving

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
TOKEN = "outcome-tests-token"
AUTH = {"tokens": [{"name": "a", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}]}


@contextlib.asynccontextmanager
async def bare(port: int) -> AsyncIterator[QuicConnectionProtocol]:
    """A bare aioquic client of the chat port: it writes what it likes on its streams; closed at the end."""
    cfg = tls.client_configuration(verify=False)
    async with aioquic_connect("127.0.0.1", port, configuration=cfg) as client:
        yield client


def outcomes(daemon: Daemon) -> dict[str, float]:
    return {o: value(daemon, "tokenwire_requests_ended_total", {"outcome": o}) for o in REQUEST_OUTCOMES}


def started(daemon: Daemon) -> float:
    return sum(value(daemon, "tokenwire_requests_total", {"scheme": s}) for s in SCHEMES)


def errors(daemon: Daemon, code: ErrorCode) -> float:
    return value(daemon, "tokenwire_errors_total", {"code": hex(code)})


# ------------------------------------------------------------------------------------- 1. one outcome per request
def test_a_stream_whose_request_never_came_whole_is_not_reported_lost():
    """The session reported every open stream "lost" at the connection's end, half a REQUEST too: a client may
    resume only an answer that started."""
    pair = Pair()
    pair.exchange()
    half = pair.client.quic.get_next_available_stream_id()
    pair.client.quic.send_stream_data(half, b"\x00\x00\x00\x64\x81")  # 1 byte of a 100-byte frame
    pair.exchange()
    assert pair.server is not None and half in pair.server.requests
    pair.client.close(ErrorCode.NO_ERROR, "bye")
    pair.exchange(rounds=400, quiet_after=60)
    ends = [e for e in pair.server_events if isinstance(e, RequestCancelled)]
    assert [(e.stream_id, e.lost) for e in ends] == [(half, False)], pair.server_events


def test_every_request_ends_once_and_the_started_ones_add_up_to_requests_total():
    """docs/metrics.md's invariant across the probe's scenarios: completed + cancelled + lost + failed equals
    tokenwire_requests_total once no request is open, and every request that never started is refused. A malformed
    request and half a REQUEST then a close were "lost", a REQUEST with its FIN in one read "cancelled"."""

    async def go() -> tuple[dict[str, float], float]:
        async with serving(auth=AUTH, limits={"max_request_bytes": 1024}) as (daemon, port):
            async with connect("127.0.0.1", port, verify=False, timeout=5, auth_token=TOKEN) as conn:
                assert await conn.chat("x", max_tokens=3).collect()  # completed
                stream = conn.chat("x", max_tokens=500, params={"rate": 20})
                await stream.__anext__()
                await stream.cancel()  # cancelled
                with pytest.raises(RemoteError):  # refused: an unknown request id
                    await conn.attach(b"\x01" * 16).collect()
                with pytest.raises(RemoteError):  # refused: over limits.max_request_bytes
                    await conn.chat("x" * 2000, max_tokens=3).collect()
            async with connect("127.0.0.1", port, verify=False, timeout=5, auth_token=TOKEN) as conn:
                stream = conn.chat("x", max_tokens=500, params={"rate": 20})
                await stream.__anext__()  # lost: the connection ends mid-answer
                _close_as_a_lost_path(conn)
            await until(lambda: not daemon.protocols)
            demo = daemon.upstreams["demo"]
            daemon.upstreams["demo"] = _FailingUpstream()  # type: ignore[assignment]
            async with connect("127.0.0.1", port, verify=False, timeout=5, auth_token=TOKEN) as conn:
                with pytest.raises(RemoteError):  # failed: the upstream fails after the start
                    await conn.chat("x", max_tokens=3).collect()
            daemon.upstreams["demo"] = demo
            async with bare(port) as client:  # refused: a malformed request, the connection closed for it
                client._quic.send_stream_data(0, b"\x00\x00\x00\x05garbage-garbage")
                client.transmit()
                await asyncio.wait_for(client.wait_closed(), 10)
            async with bare(port) as client:  # refused: half a REQUEST, then the client closes
                client._quic.send_stream_data(0, b"\x00\x00\x00\x64\x81")
                client.transmit()
                await until(lambda: any(r.request is None for p in daemon.protocols
                                        for r in p.server_session.requests.values()))
            async with bare(port) as client:  # refused: a REQUEST and its FIN in one read, abandoned before its start
                # through aioquic's stream writer, so that the one it makes for the daemon's answer knows the FIN
                # was sent: a raw send_stream_data left it to send another when collected ("Cannot send data
                # after FIN" as an unraisable warning in whichever test was running then)
                _, writer = await client.create_stream()
                writer.write(encode_stream_frame(Request(messages=[{"role": "user", "content": "x"}], auth=TOKEN)))
                writer.write_eof()
                client.transmit()
                await until(lambda: sum(outcomes(daemon).values()) == 9)  # the eight above and this one
            async with connect("127.0.0.1", port, verify=False, timeout=5, auth_token="wrong") as bad:
                with pytest.raises(RemoteError):  # refused: a wrong token closes the connection
                    await bad.chat("x", max_tokens=3).collect()
            await until(lambda: not daemon.protocols)
            return outcomes(daemon), started(daemon)

    ended, total = run(go(), 60)
    assert ended == {"completed": 1, "cancelled": 1, "lost": 1, "failed": 1, "refused": 6}
    assert ended["completed"] + ended["cancelled"] + ended["lost"] + ended["failed"] == total == 4


def test_a_request_whose_start_cannot_be_sent_is_refused_once(monkeypatch):
    """Its answer never started (nor counted in tokenwire_requests_total), yet it was counted "failed"; and when
    even its ERROR could not be sent, the connection's close reported it a second time."""

    def broken(self: ServerSession, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("an encoder that refuses the frame")

    async def go(reject_too: bool) -> tuple[dict[str, float], float, float]:
        async with serving() as (daemon, port):
            monkeypatch.setattr(ServerSession, "accept", broken)
            if reject_too:
                monkeypatch.setattr(ServerSession, "reject", broken)
            async with connect("127.0.0.1", port, verify=False, timeout=5) as conn:
                with pytest.raises(RemoteError):
                    await conn.chat("x", max_tokens=3).collect()
            await until(lambda: not daemon.protocols)
            monkeypatch.undo()
            return outcomes(daemon), started(daemon), errors(daemon, ErrorCode.INTERNAL)

    for reject_too in (False, True):
        ended, total, internal = run(go(reject_too), 30)
        assert ended == {"completed": 0, "cancelled": 0, "lost": 0, "failed": 0, "refused": 1}, reject_too
        assert total == 0 and internal == 1


def test_the_docs_state_the_invariant_between_the_outcomes_and_requests_total():
    doc = " ".join(DOC.read_text().split())
    assert ("`completed` + `cancelled` + `lost` + `failed` = `tokenwire_requests_total` minus the requests open now "
            "whose answer has started") in doc
    assert "by the close of its connection (a malformed request or another protocol error" in doc


# ------------------------------------------------------------------------------------- 2. the daemon's closes
def test_a_client_refused_past_max_sessions_is_counted_once_as_the_docs_say():
    """docs/metrics.md said tokenwire_errors_total counts the daemon's CONNECTION_CLOSEs, and this LIMIT_EXCEEDED
    close was in tokenwire_handshakes_refused_total only: the docs now say capacity closes are counted there
    instead (each close once, in one of the two), and the numbers are held to that."""

    async def go() -> tuple[float, float, float]:
        async with serving(limits={"max_sessions": 1}) as (daemon, port):
            async with connect("127.0.0.1", port, verify=False, timeout=5) as first:
                assert await first.chat("x", max_tokens=2).collect()
                with pytest.raises(RemoteError) as refused:
                    async with connect("127.0.0.1", port, verify=False, timeout=5) as second:
                        await second.chat("x", max_tokens=2).collect()
                assert refused.value.code == ErrorCode.LIMIT_EXCEEDED
            return (errors(daemon, ErrorCode.LIMIT_EXCEEDED),
                    value(daemon, "tokenwire_handshakes_refused_total", {"reason": "max_sessions"}),
                    value(daemon, "tokenwire_sessions_total"))

    assert run(go(), 30) == (0, 1, 1)


def test_an_evicted_never_authorized_connection_is_a_session_and_a_refusal_once_each():
    """The docs said "each connection is counted once" while an evicted one is in tokenwire_sessions_total and in
    tokenwire_handshakes_refused_total (reason evicted): it is, once in each, as the docs now say; its LIMIT_EXCEEDED
    close is a capacity close, not in tokenwire_errors_total."""

    async def go() -> tuple[float, float, float, int | None]:
        async with serving(auth=AUTH, limits={"max_sessions": 1}) as (daemon, port):
            async with connect("127.0.0.1", port, verify=False, timeout=5, auth_token=TOKEN) as idle:
                await until(lambda: len(daemon.admission.unauthorized) == 1)
                async with connect("127.0.0.1", port, verify=False, timeout=5, auth_token=TOKEN) as second:
                    assert await second.chat("x", max_tokens=2).collect()
                await until(lambda: idle.closed)
                code = idle._protocol.close_error.code if idle._protocol.close_error is not None else None
            await until(lambda: not daemon.protocols)
            return (errors(daemon, ErrorCode.LIMIT_EXCEEDED),
                    value(daemon, "tokenwire_handshakes_refused_total", {"reason": "evicted"}),
                    value(daemon, "tokenwire_sessions_total"), code)

    assert run(go(), 30) == (0, 1, 2, ErrorCode.LIMIT_EXCEEDED)


def test_a_close_for_a_server_error_while_sending_is_an_error_sent_once():
    """The daemon's other closes for a server error or a client's doing are in tokenwire_errors_total; this one was
    in no metric."""

    async def go() -> tuple[float, float]:
        async with serving() as (daemon, port), connect("127.0.0.1", port, verify=False, timeout=5) as conn:
            assert await conn.chat("x", max_tokens=2).collect()
            (proto,) = daemon.protocols

            def broken() -> None:
                raise RuntimeError("a socket that fails")

            proto.transmit = broken  # type: ignore[method-assign]
            proto._transmit_queued()
            once = errors(daemon, ErrorCode.INTERNAL)
            proto._transmit_queued()  # closing already: no second close, nothing more counted
            del proto.transmit  # (the stop sends its packets)
            return once, errors(daemon, ErrorCode.INTERNAL)

    assert run(go(), 30) == (1, 1)


def test_the_docs_say_which_closes_errors_total_counts_and_that_evictions_were_sessions():
    doc = " ".join(DOC.read_text().split())
    errors_row = next(line for line in DOC.read_text().splitlines() if line.startswith("| `tokenwire_errors_total`"))
    assert "Closes for capacity are counted in `tokenwire_handshakes_refused_total` instead" in errors_row
    assert "`max_sessions`" in errors_row and "`evicted`" in errors_row and "`memory`" in errors_row
    assert "each close the daemon sends is counted once, in one of the two" in errors_row
    assert "Each connection is counted once." not in doc  # an evicted one is a session and a refusal
    assert "these are in `tokenwire_sessions_total` too" in doc


# ------------------------------------------------------------------------------------- 3. the too-large refusal
def test_a_request_too_large_names_limits_max_request_bytes_to_the_client_and_in_the_log(caplog):
    async def go() -> str:
        async with serving(limits={"max_request_bytes": 1024, "max_requests_per_connection": 1}) as (_, port):
            async with connect("127.0.0.1", port, verify=False, timeout=5) as conn:
                with pytest.raises(RemoteError) as large:
                    await conn.chat("x" * 2000, max_tokens=3).collect()
                first = conn.chat("x", max_tokens=500, params={"rate": 20})
                await first.__anext__()
                second = conn.chat("x", max_tokens=3)  # past the limit: QUIC's stream limit holds it, not refused
                await first.cancel()
                assert await second.collect()
            return str(large.value)

    with caplog.at_level(logging.DEBUG, logger="tokenwire.daemon"):
        large = run(go(), 30)
    assert re.search(r"request too large: stream frame of \d+ bytes exceeds the limit of 1024 "
                     r"\(limits\.max_request_bytes\)", large), large
    logged = [r.getMessage() for r in caplog.records if "request too large" in r.getMessage()]
    assert logged and "(limits.max_request_bytes)" in logged[0], logged


# ------------------------------------------------------------------------------------- 4. the reload's line
def _config(**sections: Any) -> Any:
    return parse_config(sections)


def test_a_reload_names_each_setting_it_changed_old_and_new():
    bob = hashlib.sha256(b"bob").hexdigest()
    running = _config(limits={"max_sessions": 10, "transcript_memory_mb": 256},
                      auth={"tokens": [{"name": "alice", "sha256": hashlib.sha256(b"alice").hexdigest()},
                                       {"name": "carol", "sha256": hashlib.sha256(b"carol").hexdigest()}]})
    new = _config(limits={"max_sessions": 4, "transcript_memory_mb": 2.5}, logging={"level": "debug"},
                  auth={"tokens": [{"name": "alice-laptop", "sha256": hashlib.sha256(b"alice").hexdigest()},
                                   {"name": "carol", "sha256": hashlib.sha256(b"carol-2").hexdigest()},
                                   {"name": "bob", "sha256": bob}]})
    assert changed_settings(running, plan_reload(running, new).config) == [
        "limits.max_sessions=4 (was 10)", "limits.transcript_memory_mb=2.5 (was 256)",
        "logging.level=debug (was info)", "auth token bob added", "auth token carol replaced",
        "auth token alice renamed alice-laptop"]
    assert plan_reload(running, running).changed == []
    assert bob not in " ".join(plan_reload(running, new).changed)  # a token's digest is never logged


def test_the_reload_line_says_what_changed_not_a_python_repr(tmp_path, caplog):
    path = tmp_path / "tokenwire.toml"
    path.write_text("[limits]\nmax_sessions = 10000\n")
    d = service.Daemon(service.load_config(path), notifier=_Notes())  # type: ignore[arg-type]
    path.write_text("[limits]\nmax_sessions = 4\n")
    with caplog.at_level(logging.INFO, logger="tokenwire.daemon"):
        assert d.reload() is True
        path.write_text("[limits]\nmax_sessions = 4\n")
        assert d.reload() is True
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reloaded: ")]
    assert lines == ["reloaded: 0 auth tokens; changed limits.max_sessions=4 (was 10000); logging info/text",
                     "reloaded: 0 auth tokens; no setting it applies changed; logging info/text"], lines
