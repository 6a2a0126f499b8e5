"""What the daemon's log and metrics say about refusals and request ends: connections closed for protocol errors
and "server busy" refusals are one warning then a summary, a handshake that ends before it completes is counted,
every request's end is counted by outcome, labelled series exist at 0 from the start, journald gets priorities,
and docs/metrics.md names every metric the daemon exports."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tokenwire.daemon import logs
from tokenwire.daemon.config import hash_token, parse_config
from tokenwire.daemon.marking import MarkingConfig, MarkingService
from tokenwire.daemon.service import Daemon
from tokenwire.daemon.telemetry import ERROR_CODES_SENT, REFUSAL_REASONS, REQUEST_OUTCOMES, Metrics
from tokenwire.transport.client import connect
from tokenwire.transport.errors import ErrorCode, RemoteError
from tokenwire.transport.frames import SCHEMES, Request
from tokenwire.transport.handshake_guard import REFUSALS_LOG_S

from .test_handshake_limits import half_open, until, value
from .test_hostile_clients import FLUSH_SLACK_S
from .test_loopback import run

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "metrics.md"


@contextlib.asynccontextmanager
async def serving(**sections: Any) -> AsyncIterator[tuple[Daemon, int]]:
    """An in-process daemon on loopback with the given config sections (its port); stopped at the end."""
    raw: dict[str, Any] = {"metrics": {"listen": ""}, **sections}
    raw["server"] = {"listen": ["127.0.0.1:0"], **sections.get("server", {})}
    daemon = Daemon(parse_config(raw))
    await daemon.start()
    try:
        yield daemon, daemon.addresses[0][1]
    finally:
        await daemon.stop()


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# ------------------------------------------------------------------------------------------ 1. protocol errors
def test_connections_closed_for_protocol_errors_are_one_warning_then_a_summary(caplog):
    """200 clients without a token, each with one malformed request, wrote 200 warning lines."""

    async def malformed(port: int, i: int) -> None:
        with contextlib.suppress(Exception):
            async with connect("127.0.0.1", port, verify=False, timeout=5) as conn:
                proto = conn._protocol
                bad = Request(messages=[{"role": "user", "content": "hi"}], scheme=f"bad{i}", max_tokens=3)
                proto.client_session.start_request(bad, proto.clock(), prefix=[])
                proto.transmit()
                await until(lambda: proto.session.closed, 5)

    async def go():
        async with serving() as (daemon, port):
            await asyncio.gather(*(malformed(port, i) for i in range(5)))
            code = {"code": hex(ErrorCode.MALFORMED_FRAME)}
            await until(lambda: value(daemon, "tokenwire_errors_total", code) == 5)
            logged = lines(caplog, "closed connection from")
            daemon._log_refusals(daemon._protocol_closes.logged_at + REFUSALS_LOG_S + FLUSH_SLACK_S)
            return logged, lines(caplog, "more connections for protocol errors")

    with caplog.at_level(logging.INFO, logger="tokenwire.daemon"):
        logged, summary = run(go(), 30)
    assert len(logged) == 1, logged
    assert "is not one of" in logged[0] and "logged at most every 60 s" in logged[0]
    assert len(summary) == 1 and summary[0].startswith("closed 4 more connections for protocol errors in the last 60 s")


# ------------------------------------------------------------------------------------------ 2. handshakes lost
def test_a_handshake_cut_by_the_idle_timeout_counts_as_refused_once(monkeypatch):
    """server.idle_timeout_s may be under the guard's deadline: aioquic then ends a half-open handshake by its
    idle timer, and it was counted nowhere (only no longer "in progress")."""
    monkeypatch.setattr(Daemon, "retry_threshold", lambda self: 1000)

    async def go():
        async with serving(server={"idle_timeout_s": 1}) as (daemon, port):
            socks = half_open(port, 2)
            try:
                await until(lambda: daemon.handshake_guard.handshaking == 2)
                await until(lambda: not daemon.protocols, 10)  # both ended (on_connection_end ran)
            finally:
                for s in socks:
                    s.close()
            return [value(daemon, "tokenwire_handshakes_refused_total", {"reason": r}) for r in REFUSAL_REASONS]

    counts = dict(zip(REFUSAL_REASONS, run(go(), 30), strict=True))
    assert counts == {"too_many": 0, "timeout": 2, "failed": 0, "max_sessions": 0, "evicted": 0, "idle": 0,
                      "memory": 0}


def test_a_handshake_that_fails_counts_as_failed_and_a_refused_one_is_not_counted_again(monkeypatch):
    """A client offering no common ALPN (the TLS handshake fails) ended uncounted; one the guard refused (past
    the bound) is counted when refused, not again when its connection ends."""
    monkeypatch.setattr(Daemon, "retry_threshold", lambda self: 1000)

    async def go():
        async with serving(limits={"max_sessions": 1}) as (daemon, port):
            socks = half_open(port, 1, alpn="not-tokenwire")
            await until(lambda: not daemon.protocols and value(
                daemon, "tokenwire_handshakes_refused_total", {"reason": "failed"}) >= 1, 10)
            socks += half_open(port, 2)  # the second is past the bound (max_sessions 1): refused at once
            await until(lambda: value(daemon, "tokenwire_handshakes_refused_total", {"reason": "too_many"}) == 1)
            refused = next(p for p in daemon.protocols if p._handshake_timer is None)
            await until(lambda: refused.ended, 10)  # its connection ended too (the closing period)
            for s in socks:
                s.close()
            return [value(daemon, "tokenwire_handshakes_refused_total", {"reason": r}) for r in REFUSAL_REASONS]

    counts = dict(zip(REFUSAL_REASONS, run(go(), 30), strict=True))
    assert counts == {"too_many": 1, "timeout": 0, "failed": 1, "max_sessions": 0, "evicted": 0, "idle": 0,
                      "memory": 0}


# ------------------------------------------------------------------------------------------ 3. server busy
def test_busy_refusals_are_logged_once_then_summed_up_naming_the_limit(caplog):
    """Requests refused past limits.max_live_answers were only counted (errors_total 0x106): no log line."""

    async def go():
        async with serving(limits={"max_live_answers": 1}) as (daemon, port):
            async with connect("127.0.0.1", port, verify=False, timeout=5) as conn:
                long = conn.chat("x", max_tokens=500, params={"rate": 20})
                await until(lambda: daemon.answers.count() == 1)
                refused = []
                for _ in range(3):
                    with pytest.raises(RemoteError) as info:
                        await conn.chat("y", max_tokens=3).collect()
                    refused.append(info.value.code)
                await long.cancel()
            logged = lines(caplog, "server busy")
            daemon._log_refusals(daemon.answers.busy_refusals.logged_at + REFUSALS_LOG_S + FLUSH_SLACK_S)
            return refused, logged, lines(caplog, "more answers in the last"), value(
                daemon, "tokenwire_requests_ended_total", {"outcome": "refused"})

    with caplog.at_level(logging.INFO, logger="tokenwire.daemon"):
        refused, logged, summary, ended_refused = run(go(), 30)
    assert refused == [ErrorCode.LIMIT_EXCEEDED] * 3
    assert len(logged) == 1, logged
    assert logged[0].startswith("refusing a request from 127.0.0.1:") and "limits.max_live_answers = 1" in logged[0]
    assert summary == ["refused 2 more answers in the last 60 s: server busy, 1 answers being generated "
                       "(limits.max_live_answers)"]
    assert ended_refused == 3


# ------------------------------------------------------------------------------------------ 4. request outcomes
class _FailingUpstream:
    """An upstream that fails every answer after its start (the daemon fails the request with 0x108)."""

    name = "failing"

    def refusal(self, model: str | None, params: dict[str, Any]) -> str | None:
        return None

    async def generate(self, request: Any, emit: Any) -> str:
        await asyncio.sleep(0)
        raise RuntimeError("the model server went away")

    async def close(self) -> None:
        pass


def test_every_request_ends_in_exactly_one_outcome():
    """No metric said how chat requests end; each request is counted once, by how the daemon saw it end."""
    tokens = {"tokens": [{"name": "a", "sha256": hash_token("foo")}]}

    def outcomes(daemon: Daemon) -> dict[str, float]:
        return {o: value(daemon, "tokenwire_requests_ended_total", {"outcome": o}) for o in REQUEST_OUTCOMES}

    async def go():
        async with serving(auth=tokens) as (daemon, port):
            async with connect("127.0.0.1", port, verify=False, timeout=5, auth_token="foo") as conn:
                await conn.chat("x", max_tokens=3).collect()  # completed
                await until(lambda: outcomes(daemon)["completed"] == 1)
                stream = conn.chat("x", max_tokens=500, params={"rate": 20})
                await stream.__anext__()
                await stream.cancel()  # cancelled
                await until(lambda: outcomes(daemon)["cancelled"] == 1)
                with pytest.raises(RemoteError):  # refused: an unknown request id
                    await conn.attach(b"\x01" * 16).collect()
                daemon.upstreams["demo"] = _FailingUpstream()  # type: ignore[assignment]
                with pytest.raises(RemoteError):  # failed: the upstream fails after the start
                    await conn.chat("x", max_tokens=3).collect()
            async with connect("127.0.0.1", port, verify=False, timeout=5, auth_token="wrong") as bad:
                with pytest.raises(RemoteError):  # refused: a wrong token closes the connection
                    await bad.chat("x", max_tokens=3).collect()
            await until(lambda: not daemon.protocols, 10)
            return outcomes(daemon)

    assert run(go(), 30) == {"completed": 1, "cancelled": 1, "lost": 0, "failed": 1, "refused": 2}


def _close_as_a_lost_path(conn: Any) -> None:
    """A CONNECTION_CLOSE without the resets of the open answers that the SDK's close sends first (which cancel
    them): the daemon then sees the connection end under its answers, as when the path goes."""
    conn._protocol._quic.close()
    conn._protocol.transmit()


def test_a_request_whose_connection_ends_is_lost_once():
    """Mid-answer, and with the whole answer sent but not confirmed by the client (the session reports no event for
    that one: the daemon counts it at the connection's end)."""

    async def go():
        async with serving() as (daemon, port):
            async with connect("127.0.0.1", port, verify=False, timeout=5) as conn:
                stream = conn.chat("x", max_tokens=500, params={"rate": 20})
                await stream.__anext__()
                _close_as_a_lost_path(conn)
            await until(lambda: not daemon.protocols, 10)
            async with connect("127.0.0.1", port, verify=False, timeout=5) as conn:
                conn._protocol.client_session._fin = lambda stream_id: None  # its FIN after FINISHED never leaves
                await conn.chat("x", max_tokens=3).collect()
                (served,) = daemon.protocols
                assert len(served.attached) == 1  # FINISHED sent, the client's confirmation not come
                _close_as_a_lost_path(conn)
            await until(lambda: not daemon.protocols, 10)
            return {o: value(daemon, "tokenwire_requests_ended_total", {"outcome": o}) for o in REQUEST_OUTCOMES}

    assert run(go(), 30) == {"completed": 0, "cancelled": 0, "lost": 2, "failed": 0, "refused": 0}


# ------------------------------------------------------------------------------------------ 5. requests_total
def test_requests_total_counts_resumes_and_attaches_and_says_so():
    """10 new answers and 4 resumes made tokenwire_requests_total 14, and its HELP said "Chat requests by scheme"."""
    help_line = next(line for line in Metrics().exposition().decode().splitlines()
                     if line.startswith("# HELP tokenwire_requests_total "))
    assert "resumes" in help_line and "attaches" in help_line
    assert "tokenwire_resumes_total" in help_line and "tokenwire_attaches_total" in help_line

    async def go():
        async with serving() as (daemon, port):
            async with connect("127.0.0.1", port, verify=False, timeout=5) as conn:
                first = conn.chat("x", max_tokens=5)
                await first.collect()
                rid = first.request_id
                for _ in range(2):
                    await conn.attach(rid).collect()  # an upstream's answer by id: a resume
            return (sum(value(daemon, "tokenwire_requests_total", {"scheme": s}) for s in SCHEMES),
                    value(daemon, "tokenwire_resumes_total"), value(daemon, "tokenwire_attaches_total"))

    total, resumes, attaches = run(go(), 30)
    assert (total, resumes, attaches) == (3, 2, 0)  # new answers: 3 - 2 - 0


# ------------------------------------------------------------------------------------------ 6. series at 0
def test_labelled_series_exist_at_zero_from_the_start():
    """A series first seen with its first event is invisible to rate()/increase() for that event."""
    metrics = Metrics()
    text = metrics.exposition().decode()
    expected = (
        [f'tokenwire_handshakes_refused_total{{reason="{r}"}} 0.0' for r in REFUSAL_REASONS]
        + [f'tokenwire_errors_total{{code="{c}"}} 0.0' for c in ERROR_CODES_SENT]
        + [f'tokenwire_requests_total{{scheme="{s}"}} 0.0' for s in SCHEMES]
        + [f'tokenwire_requests_ended_total{{outcome="{o}"}} 0.0' for o in REQUEST_OUTCOMES]
        + [f'tokenwire_ingest_answers_failed_total{{reason="{r}"}} 0.0' for r in ("cancelled", "orphaned")]
    )
    for line in expected:
        assert line in text, line
    assert set(REFUSAL_REASONS) == {"too_many", "timeout", "failed", "max_sessions", "evicted", "idle", "memory"}
    assert "0x105" in ERROR_CODES_SENT and "0x108" in ERROR_CODES_SENT and "0x10d" not in ERROR_CODES_SENT
    help_line = next(line for line in text.splitlines() if line.startswith("# HELP tokenwire_ingest_answers_failed"))
    assert "cancelled" in help_line and "orphaned" in help_line


# ------------------------------------------------------------------------------------------ 7. journald
@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level, quic = root.handlers[:], root.level, logging.getLogger("quic").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("quic").setLevel(quic)


def _log_some(name: str) -> None:
    log = logging.getLogger(name)
    log.debug("a debug line")
    log.info("an info line")
    log.warning("a warning line")
    log.critical("a critical line")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("an error with a traceback")


def test_lines_to_the_journal_carry_their_priority_and_no_timestamp(tmp_path, monkeypatch, restore_logging):
    """Under systemd every line was stored at priority 6: journalctl -p warning showed no warning or error."""
    path = tmp_path / "journal"
    with path.open("w") as out:
        st = os.fstat(out.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        logs.setup_logging("debug", "text", stream=out)
        _log_some("tokenwire.test_journal")
        logs.setup_logging("debug", "json", stream=out)
        logging.getLogger("tokenwire.test_journal").error("one json line\nwith two lines")
    text_lines = path.read_text().splitlines()
    *plain, last = text_lines
    assert plain[:4] == ["<7>DEBUG tokenwire.test_journal: a debug line",
                         "<6>INFO tokenwire.test_journal: an info line",
                         "<4>WARNING tokenwire.test_journal: a warning line",
                         "<2>CRITICAL tokenwire.test_journal: a critical line"]
    assert plain[4] == "<3>ERROR tokenwire.test_journal: an error with a traceback"
    traceback = plain[5:]
    assert traceback[0] == "<3>Traceback (most recent call last):" and traceback[-1] == "<3>ValueError: boom"
    assert all(line.startswith("<3>") for line in traceback)  # journald would store unprefixed ones as info
    assert last.startswith("<3>{")
    record = json.loads(last[3:])
    assert record["level"] == "error" and record["msg"] == "one json line\nwith two lines"


def test_no_priority_prefix_where_stderr_is_not_the_journal(tmp_path, monkeypatch, restore_logging):
    """A child of the service whose stderr goes to a file inherits JOURNAL_STREAM: the descriptor decides."""
    other = tmp_path / "other"
    other.write_text("")
    st = os.stat(other)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    path = tmp_path / "stderr"
    with path.open("w") as out:
        logs.setup_logging("info", "text", stream=out)
        logging.getLogger("tokenwire.test_journal").warning("to a file")
    (line,) = path.read_text().splitlines()
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING tokenwire.test_journal: to a file$", line), line
    for bad in ("", "nonsense", "1:2:3", "x:y"):
        monkeypatch.setenv("JOURNAL_STREAM", bad)
        with path.open("w") as out:
            assert not logs.stream_is_journal(out)
    assert [logs.journal_priority(n) for n in (50, 40, 30, 20, 10, 25, 5)] == [2, 3, 4, 6, 7, 6, 7]


# ------------------------------------------------------------------------------------------ 8. docs/metrics.md
_METRIC_CALL = re.compile(r"\b(Counter|Gauge|Histogram|CounterMetricFamily|GaugeMetricFamily)\(\s*\"(tokenwire_\w+)\"")


def _exported(kind: str, name: str) -> str:
    """The name a metric is exposed under: a counter's with ``_total`` (prometheus_client adds it)."""
    counter = kind in ("Counter", "CounterMetricFamily", "counter")
    return name + "_total" if counter and not name.endswith("_total") else name


def registered_metrics() -> set[str]:
    """Every metric name the daemon registers: the families of a running registry (the daemon's own and the ECN
    collector), and each name the daemon's modules pass to a metric constructor (the KV channel's collector needs
    a KV runtime to run)."""
    metrics = Metrics()
    MarkingService(MarkingConfig(policy="l4s"), metrics)  # (the ECN families exist with [marking] only)
    # (prometheus_client's process_* and python_* series are its own: docs/metrics.md, The process, and
    # tests/test_process_metrics_s46.py)
    names = {_exported(f.type, f.name) for f in metrics.registry.collect() if f.name.startswith("tokenwire_")}
    for path in sorted((ROOT / "daemon").glob("*.py")) + sorted((ROOT / "transport").glob("*.py")):
        names |= {_exported(kind, name) for kind, name in _METRIC_CALL.findall(path.read_text())}
    return names


def test_docs_metrics_names_every_metric_the_daemon_exports():
    """14 exported metrics appeared in no doc; docs/metrics.md must list each one (and no metric that is gone)."""
    names = registered_metrics()
    assert "tokenwire_kv_fetches_total" in names and "tokenwire_ecn_packets_total" in names  # (the scan works)
    assert "tokenwire_requests_ended_total" in names and "tokenwire_sessions_total" in names
    doc = DOC.read_text()
    missing = sorted(n for n in names if f"`{n}`" not in doc)
    assert not missing, f"not in docs/metrics.md: {missing}"
    documented = set(re.findall(r"^\| `(tokenwire_\w+)`", doc, re.M))
    assert documented == names, sorted(documented ^ names)
    readme = (ROOT / "README.md").read_text()
    assert "docs/metrics.md" in readme


def test_a_command_error_to_the_journal_is_at_error_priority(tmp_path, monkeypatch):
    """``tokenwire daemon`` refusing to start (text logs) printed its error without a prefix: stored as info."""
    from tokenwire.daemon import cli

    missing = tmp_path / "absent.toml"
    err = tmp_path / "stderr"
    for journal in (True, False):
        with err.open("w") as out:
            st = os.fstat(out.fileno())
            monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}" if journal else "0:0")
            monkeypatch.setattr(sys, "stderr", out)
            assert cli.main(["daemon", "--config", str(missing)]) == 2
        line = err.read_text().strip().splitlines()[-1]
        assert line.startswith("<3>tokenwire daemon: error: " if journal else "tokenwire daemon: error: "), line
