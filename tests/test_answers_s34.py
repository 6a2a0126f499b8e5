"""LiveAnswers (daemon/answers.py) on its own, without sockets: the answers being generated, their bound
(limits.max_live_answers), and the orphan timeout. GcPacing (daemon/gc_pacing.py): the end of a connection counts
toward the next full collection."""

from __future__ import annotations

import asyncio
import logging
import types
from typing import Any

import pytest

from tokenwire.daemon import gc_pacing
from tokenwire.daemon.answers import LiveAnswers
from tokenwire.daemon.config import Limits, parse_config
from tokenwire.daemon.sendable_upstream import SendableUpstream
from tokenwire.daemon.telemetry import Metrics
from tokenwire.daemon.transcripts import LiveRequest, TranscriptStore
from tokenwire.transport.errors import ErrorCode, RequestError
from tokenwire.transport.frames import Request
from tokenwire.transport.handshake_guard import REFUSALS_LOG_S
from tokenwire.transport.server import ChatRequest


class Endless:
    """An upstream that generates until it is cancelled."""

    name = "endless"

    def refusal(self, model: str | None, params: dict[str, Any]) -> str | None:
        return None

    async def generate(self, request: ChatRequest, emit: Any) -> str:
        await asyncio.Event().wait()
        return "stop"

    async def close(self) -> None:
        return None


class Failing(Endless):
    """An upstream whose answers fail at once (an upstream timeout)."""

    name = "failing"

    async def generate(self, request: ChatRequest, emit: Any) -> str:
        raise RequestError("too slow", code=ErrorCode.UPSTREAM_TIMEOUT)


def limits(**values: Any) -> Limits:
    return parse_config({"metrics": {"listen": ""}, "limits": values}).limits


def answers(lim: Limits) -> LiveAnswers:
    return LiveAnswers(lambda: lim, Metrics(), TranscriptStore(max_bytes=1 << 20, retain_s=60.0))


def start(ans: LiveAnswers, upstream: Any = None) -> LiveRequest:
    request = Request(messages=[{"role": "user", "content": "x"}], max_tokens=10)
    return ans.start(request, SendableUpstream(upstream or Endless()), "route", principal=None, peer="peer", now=0.0)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_the_orphan_timeout_cancels_only_the_answers_nobody_is_attached_to(caplog):
    """Three answers generating: one whose client left (lost, not cancelled), one whose client came back to it, one
    with a client still attached. Past limits.orphan_timeout_s only the first is cancelled (counted and logged);
    before it, none is."""
    caplog.set_level(logging.INFO, logger="tokenwire.daemon")
    lim = limits(orphan_timeout_s=30)

    async def go() -> tuple[list[bool], list[bool], float, list[str]]:
        ans = answers(lim)
        left, back, held = start(ans), start(ans), start(ans)
        await settle()  # (each task in its upstream's generate)
        held.listeners["client"] = lambda: None
        ans.unattended(held, cancel=False)  # another client still streams it: not an orphan
        ans.unattended(left, cancel=False)
        ans.unattended(back, cancel=False)
        ans.attached(back.request_id)  # its client resumed it
        since = ans.orphaned[left.request_id]
        assert set(ans.orphaned) == {left.request_id}
        ans.cancel_orphans(since + 29)  # not yet
        await settle()
        before = [live.done for live in (left, back, held)]
        ans.cancel_orphans(since + 30)
        await settle()
        after = [live.done for live in (left, back, held)]
        lines = [r.getMessage() for r in caplog.records if "no client for" in r.getMessage()]
        counted = ans.metrics.orphans_cancelled.labels(reason="timeout")._value.get()
        ans.cancel_all()
        await settle()
        assert not ans.tasks and not ans.orphaned
        return before, after, counted, lines

    before, after, counted, lines = asyncio.run(go())
    assert before == [False, False, False]
    assert after == [True, False, False]
    assert counted == 1 and len(lines) == 1 and "cancelling it" in lines[0]


def test_the_last_client_cancelling_stops_the_answer_at_once_and_its_end_is_booked():
    """A client's cancel with nobody else attached cancels the upstream's task at once (no orphan timeout); the
    task's end takes it off the live answers, ends it as cancelled and gives back requests_active."""

    async def go() -> tuple[str | None, int, int, float]:
        ans = answers(limits())
        live = start(ans)
        await settle()
        ans.unattended(live, cancel=True)
        await settle()
        return live.transcript.reason, len(ans.tasks), len(ans.orphaned), ans.metrics.requests_active._value.get()

    assert asyncio.run(go()) == ("cancelled", 0, 0, 0)


def test_a_failed_answer_is_counted_once_by_its_route_and_reason():
    async def go() -> tuple[float, float, bool]:
        ans = answers(limits())
        live = start(ans, Failing())
        await settle()
        failures = ans.metrics.upstream_failures
        return (failures.labels(upstream="route", reason="timeout")._value.get(),
                failures.labels(upstream="route", reason="error")._value.get(), live.request_id in ans.tasks)

    assert asyncio.run(go()) == (1, 0, False)


def test_busy_past_max_live_answers_and_its_refusals_logged_once_then_summed_up(caplog):
    """At limits.max_live_answers no answer may start (nor an ingest open): the first refusal is a warning naming
    the limit, the next ones are summed up in one line at the flush."""
    caplog.set_level(logging.INFO, logger="tokenwire.daemon")

    async def go() -> tuple[str | None, str | None, list[str], list[str]]:
        ans = answers(limits(max_live_answers=1))
        free = ans.busy()
        start(ans)
        busy = ans.busy()
        for who in ("a request from a", "a request from b", "a request from c"):
            ans.busy_refused(who)
        first = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        ans.busy_refusals.flush(ans.busy_refusals.logged_at + REFUSALS_LOG_S + 1)
        summary = [r.getMessage() for r in caplog.records if "more answers" in r.getMessage()]
        ans.cancel_all()
        await settle()
        return free, busy, first, summary

    free, busy, first, summary = asyncio.run(go())
    assert free is None
    assert busy == "server busy: 1 answers being generated (limits.max_live_answers); retry later; Retry-After: 1 s"
    assert len(first) == 1 and first[0].startswith("refusing a request from a: server busy, 1 answers")
    assert "limits.max_live_answers = 1" in first[0]
    assert len(summary) == 1 and summary[0].startswith("refused 2 more answers in the last")


def test_an_ingest_answer_is_an_orphan_until_a_client_attaches_and_leaves_with_its_end():
    ans = answers(limits())
    store = ans.store
    live = store.create(None, 10, 0.0)
    ans.ingest_opened(live)
    assert ans.is_ingested(live) and live.request_id in ans.orphaned
    assert ans.metrics.requests_active._value.get() == 1
    ans.attached(live.request_id)
    assert live.request_id not in ans.orphaned
    ans.ingest_done(live, "app_gone")
    assert ans.metrics.requests_active._value.get() == 0
    assert ans.metrics.ingest_failed.labels(reason="app_gone")._value.get() == 1
    other = store.create(None, 10, 0.0)
    assert not ans.is_ingested(other)


def test_the_ends_of_connections_make_the_next_collection_due(monkeypatch: pytest.MonkeyPatch):
    """GcPacing: a quarter of the connections alive ended makes a full collection due (at most every
    GC_INTERVAL_S), through the gc that gc_pacing.py looks up."""
    calls: list[str] = []
    monkeypatch.setattr(gc_pacing, "gc", types.SimpleNamespace(collect=lambda *a: calls.append("collect")))
    pacing = gc_pacing.GcPacing()
    pacing.collect_ended(0.0, 8)
    assert calls == []
    pacing.connection_ended()
    pacing.collect_ended(0.0, 8)
    assert calls == []  # one of eight
    pacing.connection_ended()
    pacing.collect_ended(0.0, 8)
    assert calls == ["collect"] and pacing.ended_connections == 0
