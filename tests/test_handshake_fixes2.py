"""Handshakes under load: a client that proved its address is not closed at the 10 s deadline, a refusal in the
handshake says what it means, aioquic's per-connection warnings are rate-limited, the daemon benchmark counts
sessions that never connected apart, and the daemon gives freed heap back after a burst."""

from __future__ import annotations

import argparse
import logging
import time

import pytest
from aioquic.quic import events as qe

from tokenwire.daemon import bench_daemon, connection, logs, service
from tokenwire.daemon.service import Daemon
from tokenwire.transport.client import HandshakeError, connect
from tokenwire.transport.quic_io import _handshake_failure
from tokenwire.transport.session_events import closed_error

from .test_handshake_limits import flooded, until, value
from .test_loopback import run


def the_handshake(daemon: Daemon) -> connection.DaemonProtocol:
    (proto,) = daemon.protocols
    return proto


def test_a_client_that_answered_our_first_flight_outlives_the_short_deadline(monkeypatch):
    """The deadline counted from the connection's creation closed handshakes that loaded clients had finished on
    their side (822 of 1,000 "connected", then closed: code 0xc). One whose client answered gets until
    HANDSHAKE_PROVEN_TIMEOUT_S; then it too is closed."""
    monkeypatch.setattr(Daemon, "retry_threshold", lambda self: 1000)  # no Retry: the proof is the Handshake packet

    def timeouts(daemon: Daemon) -> tuple[int, float]:
        return (daemon.handshake_guard.handshaking,
                value(daemon, "tokenwire_handshakes_refused_total", {"reason": "timeout"}))

    async def go():
        async with flooded(1) as (daemon, _port):
            await until(lambda: len(daemon.protocols) == 1)
            proto = the_handshake(daemon)
            assert not proto.address_proven()
            # what aioquic does when a Handshake packet comes from the client (RFC 9000 8.1): it had our first flight
            proto._quic._network_paths[0].is_validated = True
            assert proto.address_proven()
            proto._handshake_expired()  # HANDSHAKE_TIMEOUT_S has passed
            kept = timeouts(daemon)
            proto._handshake_began -= service.HANDSHAKE_PROVEN_TIMEOUT_S
            proto._handshake_expired()  # and then the longer one
            return kept, timeouts(daemon)

    assert run(go(), 30) == ((1, 0), (0, 1))


def test_a_half_open_handshake_still_ends_at_the_short_deadline_unless_retry_is_on(monkeypatch):
    """An unproven address (a spoofed Initial) keeps the 10 s deadline; while Retry is on every new client comes
    with a token, so the few unproven ones from before cannot pile up, and are given the longer deadline too (the
    first 64 of a burst, real clients answering late, were closed)."""
    monkeypatch.setattr(Daemon, "retry_threshold", lambda self: 1000)

    async def go():
        async with flooded(2) as (daemon, _port):
            await until(lambda: len(daemon.protocols) == 2)
            first, second = list(daemon.protocols)
            assert not first.address_proven()
            daemon.handshake_guard.retrying_since = time.monotonic()
            first._handshake_expired()
            under_retry = daemon.handshake_guard.handshaking
            daemon.handshake_guard.retrying_since = None
            second._handshake_expired()
            return under_retry, daemon.handshake_guard.handshaking

    assert run(go(), 30) == (2, 1)


def test_a_refusal_in_the_handshake_says_what_it_means(monkeypatch):
    """aioquic turns a close sent before the handshake completes into APPLICATION_ERROR with no reason (RFC 9000
    10.2.3): a client refused past the handshake bound read "no reason given (code 0xc)"."""
    monkeypatch.setattr(Daemon, "retry_threshold", lambda self: 1000)

    async def go():
        async with flooded(1, max_sessions=1) as (daemon, port):
            await until(lambda: daemon.handshake_guard.handshaking == 1)
            with pytest.raises(HandshakeError) as info:
                async with connect("127.0.0.1", port, verify=False, timeout=5):
                    pass
            return str(info.value)

    message = run(go(), 30)
    assert "refused it during its handshake" in message and "retry later" in message, message
    assert "no reason given" not in message


def test_closed_error_and_handshake_failure_word_the_converted_close():
    err = closed_error(0xC, "", 60.0)
    assert "refused it during its handshake" in str(err) and "0xc" in str(err)
    ended = qe.ConnectionTerminated(error_code=0xC, frame_type=0, reason_phrase="")
    assert "refused it during its handshake" in str(_handshake_failure("h", 1, ended))
    # a close with a reason, or another code, is worded as before
    assert str(closed_error(0x106, "too many sessions", 60.0)) == "connection closed: too many sessions (code 0x106)"
    assert "no reason given (code 0xa)" in str(closed_error(0xA, "", 60.0))


def test_aioquic_warnings_pass_once_then_are_counted():
    """A flood logged aioquic's warning once per connection (101 lines in one run)."""
    now = [0.0]
    limiter = logs.QuicWarningLimiter(interval=60.0, clock=lambda: now[0])
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep()
    handler.addFilter(limiter)
    quic = logging.getLogger("quic")
    daemon_log = logging.getLogger("tokenwire.test_limiter")
    # the levels other tests left: an in-process `tokenwire chat` sets aioquic's to ERROR (2 lines seen, not 4)
    levels = [(lg, lg.level) for lg in (quic, daemon_log)]
    for lg in (quic, daemon_log):
        lg.addHandler(handler)
        lg.setLevel(logging.WARNING)
    try:
        for cid in range(5):
            quic.warning("[%02x] Error: %d, reason: %s", cid, 10, "Packet contains no CRYPTO frame")
        quic.warning("[ff] Error: %d, reason: %s", 10, "something else")
        daemon_log.warning("not aioquic's: never held back")
        daemon_log.warning("not aioquic's: never held back")
        assert len(seen) == 4  # the first of each kind, and the daemon's own lines
        now[0] = 61.0
        limiter.flush(daemon_log)
        assert "4 more like 'Error: 10, reason: Packet contains no CRYPTO frame'" in seen[-1]
        assert len(seen) == 5  # (the other kind held nothing back)
        quic.warning("[07] Error: %d, reason: %s", 10, "Packet contains no CRYPTO frame")
        assert seen[-1].startswith("[07] Error: 10")  # after the window, a first again
    finally:
        for lg, level in levels:
            lg.removeHandler(handler)
            lg.setLevel(level)


def test_the_summary_line_carries_the_count_when_the_next_one_comes():
    now = [0.0]
    limiter = logs.QuicWarningLimiter(interval=60.0, clock=lambda: now[0])
    record = lambda: logging.LogRecord("quic", logging.WARNING, "", 0, "[ab] boom", None, None)  # noqa: E731
    assert limiter.filter(record()) and not limiter.filter(record()) and not limiter.filter(record())
    now[0] = 70.0
    r = record()
    assert limiter.filter(r) and "2 more like it in the last 70 s" in r.getMessage()



def test_bench_counts_sessions_that_never_connected_apart(capsys):
    """237 failed handshakes read as 23,700 lost tokens and 237 digest failures."""
    ok = {"tokens": 100, "duplicates": 0, "lost": 0, "digest_ok": True, "delays": [], "connect_s": 0.1}
    failed = {"tokens": 0, "duplicates": 0, "lost": 100, "digest_ok": False, "delays": [],
              "error": "no QUIC handshake with 127.0.0.1:1 within 30 s"}
    results = [ok, ok, failed]
    counts = bench_daemon.session_counts(results)
    assert counts == {"sessions_connected": 2, "sessions_failed_to_connect": 1}
    out = {"sessions": 3, **counts, "lost_tokens": 0, "duplicate_tokens": 0, "digest_failures": 0}
    assert bench_daemon.verdict(out) == 1
    assert "1 of 3 sessions could not connect" in capsys.readouterr().err
    out.update(sessions_failed_to_connect=0, sessions_connected=3)
    assert bench_daemon.verdict(out) == 0


def test_bench_daemon_help_says_its_defaults():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    bench_daemon.register(sub)
    helps = {a.dest: a.help or "" for a in sub.choices["daemon"]._actions}
    assert "(default: 20)" in helps["seconds"] and "(default: 200)" in helps["sessions"]
    assert "one client process" not in (bench_daemon.__doc__ or "")
