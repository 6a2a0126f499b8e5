"""The daemon's service boundary and the chat CLI after a probe: an upstream's text UTF-8 cannot carry (a lone
surrogate in an error body or a finish reason) reaches the client as the upstream's own error or reason, not as
INTERNAL; upstream failures have a metric of their own, once per failed answer; orphan cancellations are one line,
then a summary; and `tokenwire chat` says an answer's request id (to attach to it) as it starts with -v, and after
a failure, --max-time or Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tokenwire.daemon.chat_cli import attach_hint
from tokenwire.daemon.cli import main
from tokenwire.daemon.config import parse_config
from tokenwire.daemon.service import Daemon
from tokenwire.daemon.telemetry import UPSTREAM_FAILURE_REASONS
from tokenwire.transport.client import connect
from tokenwire.transport.errors import ErrorCode, RemoteError, RequestError
from tokenwire.transport.handshake_guard import REFUSALS_LOG_S
from tokenwire.transport.server import ChatRequest, serve

from .terminal import default_signals
from .test_chat_cli import closed, stop_loop_thread
from .test_handshake_limits import until, value
from .test_loopback import run
from .test_observability_fixes2 import _close_as_a_lost_path, serving


class Scripted:
    """A custom upstream (any object with an upstream's methods): two tokens, then ``end`` (raised when an
    exception, else returned as the finish reason), once ``go`` is set; ``problem``: its refusal."""

    name = "scripted"

    def __init__(self, end: Any = "stop", problem: str | None = None, *, wait: bool = False) -> None:
        self.end, self.problem = end, problem
        self.go = asyncio.Event()
        if not wait:
            self.go.set()

    def refusal(self, model: str | None, params: dict[str, Any]) -> str | None:
        return self.problem

    async def generate(self, request: ChatRequest, emit: Any) -> str:
        emit("one ")
        emit("two ")
        await self.go.wait()
        if isinstance(self.end, BaseException):
            raise self.end
        return self.end

    async def close(self) -> None:
        pass


def client_errors(daemon: Daemon, code: ErrorCode) -> float:
    return value(daemon, "tokenwire_errors_total", {"code": hex(code)})


def failures(daemon: Daemon, reason: str, upstream: str = "demo") -> float | None:
    return daemon.metrics.registry.get_sample_value("tokenwire_upstream_failures_total",
                                                     {"upstream": upstream, "reason": reason})


# ------------------------------------------------------------------------------ 1. text UTF-8 cannot carry
def test_an_upstream_error_with_a_lone_surrogate_reaches_every_client_as_upstream_error(caplog):
    """An OpenAI error body "bad \\ud800 thing": msgpack raised sending the ERROR, the client got INTERNAL "server
    error while sending this answer", the log blamed its connection with a traceback, the failure was counted as
    0x108 and 0x100, and every resume did it again."""
    caplog.set_level(logging.INFO, logger="tokenwire.daemon")

    async def go():
        async with serving() as (daemon, port):
            daemon.upstreams["demo"] = Scripted(RequestError("upstream 'fake': bad \ud800 thing",  # type: ignore
                                                             code=ErrorCode.UPSTREAM_ERROR))
            got = []
            async with connect("127.0.0.1", port, verify=False, timeout=5) as conn:
                stream = conn.chat("x")
                with pytest.raises(RemoteError) as first:
                    await stream.collect()
                got.append((first.value.code, str(first.value), stream.text))
                with pytest.raises(RemoteError) as again:  # a resume gets the same error, sent the same way
                    await conn.attach(stream.request_id).collect()
                got.append((again.value.code, str(again.value), ""))
            return got, client_errors(daemon, ErrorCode.UPSTREAM_ERROR), client_errors(daemon, ErrorCode.INTERNAL)

    got, upstream_errors, internal = run(go(), 30)
    assert [(code, "bad \ufffd thing" in msg) for code, msg, _ in got] == [(ErrorCode.UPSTREAM_ERROR, True)] * 2, got
    assert got[0][2] == "one two "  # the tokens before the failure came first
    assert (upstream_errors, internal) == (2, 0)
    assert not [r for r in caplog.records if "failed while sending" in r.getMessage()]


@pytest.mark.parametrize(("reason", "shown"), [
    ("st\ud800op", "st\ufffdop"),  # a lone surrogate: FINISHED failed to encode (INTERNAL)
    ("x" * 40, "x" * 32),  # over FINISHED's 32 characters: the client's decoder refused the frame
    ("end\nFAKE", "end\\nFAKE"),  # clients print it
])
def test_an_upstreams_finish_reason_is_sent_as_finished_can_carry_it(reason, shown):
    async def go():
        async with serving() as (daemon, port):
            daemon.upstreams["demo"] = Scripted(reason)  # type: ignore[assignment]
            async with connect("127.0.0.1", port, verify=False, timeout=5) as conn:
                stream = conn.chat("x")
                text = await stream.collect()
            return text, stream.stats.finish_reason, client_errors(daemon, ErrorCode.INTERNAL)

    assert run(go(), 30) == ("one two ", shown, 0)


def test_a_finish_reason_that_is_not_text_is_an_upstream_error():
    """None as a finish reason (a custom upstream's bug) went out in FINISHED, which the client refused."""
    async def go():
        async with serving() as (daemon, port):
            daemon.upstreams["demo"] = Scripted(None)  # type: ignore[assignment]
            async with connect("127.0.0.1", port, verify=False, timeout=5) as conn:
                with pytest.raises(RemoteError) as failed:
                    await conn.chat("x").collect()
                return failed.value.code, conn.closed

    assert run(go(), 30) == (ErrorCode.UPSTREAM_ERROR, False)


def test_an_upstreams_refusal_with_a_lone_surrogate_is_a_bad_request():
    async def go():
        async with serving() as (daemon, port):
            daemon.upstreams["demo"] = Scripted(problem="model \ud83d unknown")  # type: ignore[assignment]
            async with connect("127.0.0.1", port, verify=False, timeout=5) as conn:
                with pytest.raises(RemoteError) as refused:
                    await conn.chat("x").collect()
                return refused.value.code, str(refused.value), conn.closed

    code, message, closed = run(go(), 30)
    assert (code, closed) == (ErrorCode.BAD_REQUEST, False) and "model \ufffd unknown" in message, message


# ------------------------------------------------------------------------------ 3. upstream failures metric
def test_upstream_failures_are_counted_once_per_failed_answer_by_reason():
    """tokenwire_errors_total counts ERRORs delivered: a failure nobody was attached to counted 0, one failure with
    three resumes 4. tokenwire_upstream_failures_total counts the failed answer, once."""
    async def go():
        async with serving() as (daemon, port):
            unheard = Scripted(RuntimeError("the model server went away"), wait=True)
            daemon.upstreams["demo"] = unheard  # type: ignore[assignment]
            async with connect("127.0.0.1", port, verify=False, timeout=5) as conn:
                stream = conn.chat("x")
                await stream.__anext__()  # started; the connection then ends with the answer generating
                _close_as_a_lost_path(conn)
            await until(lambda: not daemon.protocols and daemon.answers.orphaned)
            unheard.go.set()  # it fails with no client attached
            await until(lambda: not daemon.answers.tasks)
            alone = client_errors(daemon, ErrorCode.UPSTREAM_ERROR), failures(daemon, "error")
            async with connect("127.0.0.1", port, verify=False, timeout=5) as conn:
                for _ in range(3):  # three resumes: three ERRORs delivered, still one failure
                    with pytest.raises(RemoteError):
                        await conn.attach(stream.request_id).collect()
                for end in (RequestError("slow", code=ErrorCode.UPSTREAM_TIMEOUT),
                            RequestError("no such thing"), "stop"):  # (RequestError's code: BAD_REQUEST)
                    daemon.upstreams["demo"] = Scripted(end)  # type: ignore[assignment]
                    with contextlib.suppress(RemoteError):
                        await conn.chat("x").collect()
                daemon.upstreams["demo"] = Scripted(wait=True)  # type: ignore[assignment]
                cancelled = conn.chat("x")
                await cancelled.__anext__()
                await cancelled.cancel()  # not a failure
            await until(lambda: not daemon.answers.tasks)
            return alone, client_errors(daemon, ErrorCode.UPSTREAM_ERROR), {
                r: failures(daemon, r) for r in UPSTREAM_FAILURE_REASONS}

    alone, delivered, counted = run(go(), 30)
    assert alone == (0, 1)
    assert delivered == 3
    assert counted == {"timeout": 1, "error": 1, "refused": 1}


def test_upstream_failure_series_exist_at_zero_for_each_configured_upstream(tmp_path):
    upstreams = [{"name": "demo", "type": "demo"}, {"name": "llm", "type": "demo"}, {"name": "app", "type": "ingest"}]
    daemon = Daemon(parse_config({"upstreams": upstreams, "metrics": {"listen": ""},
                                  "ingest": {"socket": str(tmp_path / "ingest.sock")}}))
    for reason in UPSTREAM_FAILURE_REASONS:
        assert failures(daemon, reason, "demo") == 0 and failures(daemon, reason, "llm") == 0
        assert failures(daemon, reason, "app") is None  # (ingest answers: tokenwire_ingest_answers_failed_total)


# ------------------------------------------------------------------------------ 4. orphan cancellations logged
def test_orphan_cancellations_are_one_line_then_a_summary(caplog):
    """196 answers orphaned together wrote 196 INFO lines within a second."""
    caplog.set_level(logging.INFO, logger="tokenwire.daemon")

    async def go() -> tuple[list[str], list[str], int, bool]:
        daemon = Daemon(parse_config({"metrics": {"listen": ""}}))
        timeout = daemon.config.limits.orphan_timeout_s
        tasks = [asyncio.ensure_future(asyncio.Event().wait()) for _ in range(50)]  # answers generating
        for i, task in enumerate(tasks):
            rid = i.to_bytes(16, "big")
            daemon.answers.tasks[rid] = task
            daemon.answers.orphaned[rid] = 0.0
        daemon.answers.cancel_orphans(timeout)
        await asyncio.gather(*tasks, return_exceptions=True)
        first = [r.getMessage() for r in caplog.records if "cancelling it" in r.getMessage()]
        daemon._log_refusals(timeout + REFUSALS_LOG_S)  # the housekeeping's flush, a minute later
        summary = [f"{r.levelname} {r.getMessage()}" for r in caplog.records if "more answers" in r.getMessage()]
        counted = int(value(daemon, "tokenwire_orphans_cancelled_total", {"reason": "timeout"}))
        return first, summary, counted, all(t.cancelled() for t in tasks)

    first, summary, counted, cancelled = run(go(), 30)
    assert counted == 50 and cancelled
    assert len(first) == 1 and "logged at most every 60 s" in first[0], first
    assert len(summary) == 1 and summary[0].startswith("INFO cancelled 49 more answers in the last 60 s"), summary


# ------------------------------------------------------------------------------ 2. the chat CLI's request id
IDS: dict[str, bytes] = {}  # request ids the test server gave, by prompt
SEEN = threading.Event()  # the id line reached stderr


async def _source(request: ChatRequest) -> AsyncIterator[str]:
    prompt = request.messages[-1]["content"]
    IDS[prompt] = request.request_id
    if prompt == "think first":  # nothing until the client printed the id (a model thinking)
        yield "seen" if await asyncio.to_thread(SEEN.wait, 20) else "unseen"
    elif prompt == "then hang":
        yield "partial"
        await asyncio.Event().wait()
    else:  # a long answer, slowly
        for i in range(5000):
            yield f" w{i}"
            await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def sdk_port() -> Iterator[int]:
    """The SDK's server (dev certificate) on its own loop in a thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(serve(_source, host="127.0.0.1", port=0), loop).result(30)
    yield server.port
    stop_loop_thread(loop, thread, lambda: closed(server))  # (its UDP socket and loop closed, not leaked)


class _Watched(io.StringIO):
    """stderr that sets SEEN once a request id line is written."""

    def write(self, text: str) -> int:
        if "--attach" in text:
            SEEN.set()
        return super().write(text)


def test_verbose_chat_prints_the_request_id_as_the_answer_starts(sdk_port, monkeypatch):
    """Nothing said the id of a running answer (only --stats, after a successful end): a client killed while the
    model thought left an answer nobody could attach to."""
    SEEN.clear()
    err = _Watched()
    monkeypatch.setattr(sys, "stderr", err)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["-v", "chat", "--port", str(sdk_port), "--insecure", "think first"]) == 0
    assert out.getvalue() == "seen\n"  # the line was out before the first token
    assert attach_hint(IDS["think first"]) in err.getvalue().splitlines()
    assert attach_hint(IDS["think first"]) == (f"[request id {IDS['think first'].hex()} "
                                               f"(tokenwire chat --attach {IDS['think first'].hex()})]")


def test_max_time_with_the_stream_open_prints_no_id_of_the_answer_it_cancelled(sdk_port, capsys):
    """Leaving the open stream sent the cancellation: an attach to the id printed got "the server cancelled this
    answer" (a review of the first version of this hint)."""
    rc = main(["chat", "--port", str(sdk_port), "--insecure", "--max-time", "1", "then hang"])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and out == "partial\n", (out, err)
    assert lines == ["tokenwire chat: error: no whole answer within 1 s (--max-time); the answer's cancellation was "
                     "sent to the server (it does not arrive if the path is down)"], err


def test_ctrl_c_with_the_stream_open_prints_no_id_of_the_answer_it_cancelled(sdk_port):
    cmd = [sys.executable, "-m", "tokenwire.daemon.cli", "chat", "--port", str(sdk_port), "--insecure", "slowly"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_signals)
    try:
        assert proc.stdout is not None
        proc.stdout.read(3)  # the answer is streaming
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130
    assert err.decode().strip().splitlines() == ["interrupted"], err


def test_a_lost_connection_after_the_answer_started_prints_its_id(tmp_path, capsys):
    """The daemon keeps an answer whose client lost its path: the id says what to attach to, once back."""
    from .test_chat_cli import _daemon_behind_an_outage

    with _daemon_behind_an_outage(tmp_path, (1.0, 1e9)) as (d, port):
        rc = main(["chat", "--port", str(port), "--cafile", str(d.cert), "--server-name", "localhost",
                   "--idle-timeout", "0.8", "--retries", "0", "tell me a story"])
        err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and "QUIC idle timeout" in lines[-1], err
    assert lines[-2].startswith("[request id ") and lines[-2].endswith(")]"), err


def test_attach_says_where_its_id_comes_from(capsys):
    """--attach's help and its error for a bad id sent the user to --stats, which prints the id only after an
    answer that ended well."""
    from tokenwire.daemon.cli import build_parser

    chat = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction").choices["chat"]
    shown = " ".join(chat.format_help().split())
    assert "`tokenwire -v chat` prints an answer's id as it starts" in shown, shown
    assert main(["chat", "--attach", "00ff"]) == 2
    assert "(`tokenwire -v chat` prints it as an answer starts)" in capsys.readouterr().err
