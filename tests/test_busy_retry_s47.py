"""A busy server a client can act on (session 47): the daemon's own busy refusals (``limits.max_live_answers``, for a
request and for an ingest open) end with the Retry-After suffix (``RemoteError.retry_after``); ``ResumingChat``'s
``retry_busy_s`` waits and sends the request again, never after a token came, never for a refusal without the
suffix, and a stop during the wait ends it at once; ``tokenwire chat --retry-busy`` does it by default, a line on
stderr per wait. Before, a busy daemon just failed the chat, and only an upstream's 429 or 503 named a time."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tokenwire.daemon.answers import BUSY_RETRY_MAX_S, busy_retry_after_s
from tokenwire.daemon.cli import main
from tokenwire.transport.client import ResumingChat, chat_sync, connect
from tokenwire.transport.errors import ErrorCode, RemoteError, RequestError, retry_after_of, with_retry_after
from tokenwire.transport.resuming import BUSY_MIN_WAIT_S, BusyRetries
from tokenwire.transport.server import ChatRequest, serve

from .terminal import default_signals
from .test_answers_s34 import Endless, answers, limits, settle, start
from .test_chat_cli import closed, stop_loop_thread
from .test_loopback import run
from .test_sdk_audit_s44 import _daemon
from .test_sdk_server import T, client_kwargs, served
from .test_upstream_fixes2 import Canned, failure

SLOW = {"rate": 20}  # the demo upstream at 20 tokens/s: an answer that outlasts the test unless it is cancelled


# ------------------------------------------------------------------------------------------ 1. the daemon says when
def test_the_busy_retry_after_is_the_time_between_answer_ends_left_bounded():
    assert busy_retry_after_s([], 100.0) == 1 and busy_retry_after_s([99.0], 100.0) == 1  # nothing to go by
    assert busy_retry_after_s([90.0, 94.0, 98.0], 100.0) == 2  # an end every 4 s, the last 2 s ago
    assert busy_retry_after_s([90.0, 94.0, 98.0], 105.0) == 1  # overdue: at least 1 s
    assert busy_retry_after_s([0.0, 30.0, 60.0], 60.0) == BUSY_RETRY_MAX_S  # long answers: bounded
    assert busy_retry_after_s([0.0, 1.0, 90.0], 100.0) == 1  # ends over a minute old say nothing of now


def test_a_busy_refusal_and_a_busy_ingest_open_end_with_the_retry_after_suffix():
    """``limits.max_live_answers``: "retry later", and no time a client could wait by itself."""
    async def go() -> tuple[str | None, str | None]:
        ans = answers(limits(max_live_answers=1))
        start(ans, Endless())
        ans.ends.extend([time.monotonic() - 7.0, time.monotonic() - 3.0])  # an end every 4 s, the last 3 s ago
        busy = ans.busy()
        ans.cancel_all()
        await settle()
        return busy, ans.busy()

    busy, after = run(go(), 10)
    assert busy == with_retry_after("server busy: 1 answers being generated (limits.max_live_answers); retry later",
                                    1)
    assert busy.endswith("; retry later; Retry-After: 1 s") and retry_after_of(busy) == 1.0
    assert after is None


@contextlib.asynccontextmanager
async def _busy_daemon() -> Any:
    """A daemon at ``max_live_answers = 1``, its one answer being generated (slowly) until the block ends: its port,
    and that answer's connection (to ask on it again)."""
    async with _daemon(max_live_answers=1) as daemon:
        port = daemon.addresses[0][1]
        async with connect("127.0.0.1", port, verify=False) as conn:
            first = conn.chat("long", max_tokens=400, params=SLOW)
            await asyncio.wait_for(anext(first), T)  # it is being generated
            try:
                yield port, conn, first
            finally:
                await first.cancel()


def test_the_daemon_refuses_a_request_past_max_live_answers_with_a_retry_after():
    async def go() -> RemoteError:
        async with _busy_daemon() as (_, conn, _first):
            refused = conn.chat("second")
            with pytest.raises(RemoteError) as caught:
                await asyncio.wait_for(refused.collect(), T)
            return caught.value

    err = run(go(), 30)
    assert err.code == ErrorCode.LIMIT_EXCEEDED and err.retry_after == 1.0, err
    assert str(err).startswith("server busy: 1 answers being generated"), err


# ------------------------------------------------------------------------------------------ 2. the SDK waits
def _busy_chat(port: int, retry_busy_s: float, waits: list[float], waited: asyncio.Event | None = None,
               **kwargs: Any) -> ResumingChat:
    def on_busy(error: RemoteError, wait: float) -> None:
        assert error.retry_after is not None
        waits.append(wait)
        if waited is not None:
            waited.set()

    return ResumingChat(lambda: connect("127.0.0.1", port, verify=False), "second", max_tokens=5,
                        retry_busy_s=retry_busy_s, on_busy=on_busy, **kwargs)


def test_a_resuming_chat_refused_as_busy_gets_in_once_the_answer_being_generated_ends():
    async def go() -> tuple[str, list[float]]:
        async with _busy_daemon() as (port, _, first):
            waits: list[float] = []
            refused = asyncio.Event()
            chat = _busy_chat(port, 5.0, waits, refused)
            reader = asyncio.ensure_future(chat.collect())
            await asyncio.wait_for(refused.wait(), T)  # refused once: now the slot frees
            await first.cancel()
            text = await asyncio.wait_for(reader, T)
            await chat.aclose()
            return text, waits

    text, waits = run(go(), 30)
    assert text and len(waits) == 1 and 1.0 <= waits[0] <= 1.2, (text, waits)


def test_a_budget_too_short_raises_the_last_refusal():
    async def go() -> tuple[RemoteError, list[float], float]:
        async with _busy_daemon() as (port, _, _first):
            waits: list[float] = []
            chat = _busy_chat(port, 0.3, waits)
            t0 = time.monotonic()
            with pytest.raises(RemoteError) as caught:
                async with chat:
                    await asyncio.wait_for(chat.collect(), T)
            return caught.value, waits, time.monotonic() - t0

    err, waits, took = run(go(), 30)
    assert err.code == ErrorCode.LIMIT_EXCEEDED and err.retry_after == 1.0
    # it asks for 1 s, more than the whole budget: raised at once (a wait of the 0.3 s would end in a sure refusal)
    assert waits == [] and took < 0.3, (waits, took)
    assert not any("still busy" in note for note in getattr(err, "__notes__", [])), err.__notes__


@pytest.mark.parametrize("how", ["aclose", "cancel"])
def test_a_stop_during_the_wait_ends_it_at_once(how):
    """``aclose()`` from another task (a "stop" button), or the reader's own cancellation: not after the wait."""
    async def go() -> tuple[float, list[float]]:
        async with _busy_daemon() as (port, _, _first):
            waits: list[float] = []
            refused = asyncio.Event()
            chat = _busy_chat(port, 30.0, waits, refused)

            async def read() -> str:
                async with chat:
                    return await chat.collect()

            reader = asyncio.ensure_future(read())
            await asyncio.wait_for(refused.wait(), T)
            t0 = time.monotonic()
            if how == "aclose":
                await chat.aclose()
                assert await asyncio.wait_for(reader, T) == ""  # its loop ends, as a ChatStream's does
            else:
                reader.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await asyncio.wait_for(reader, T)
            return time.monotonic() - t0, waits

    took, waits = run(go(), 30)
    assert waits and waits[0] >= 1.0 and took < 0.5, (took, waits)


@contextlib.asynccontextmanager
async def _refusing(refusals: list[str], tokens_first: int = 0) -> Any:
    """An SDK server whose source refuses its first requests, one per message of ``refusals`` (LIMIT_EXCEEDED,
    after ``tokens_first`` tokens), then answers "ok"; ``calls`` counts its requests."""
    calls: list[ChatRequest] = []

    async def source(request: ChatRequest) -> Any:
        calls.append(request)
        if len(calls) <= len(refusals):
            for _ in range(tokens_first):
                yield "tok "
            await asyncio.sleep(0.05 if tokens_first else 0)  # (the tokens go out before the refusal)
            raise RequestError(refusals[len(calls) - 1], code=ErrorCode.LIMIT_EXCEEDED)
        yield "ok"

    async with served(source) as server:
        yield server, calls


def _sdk_chat(port: int, budget: float, waits: list[float]) -> ResumingChat:
    return ResumingChat(lambda: connect("127.0.0.1", port, **client_kwargs()), "hi", retry_busy_s=budget,
                        on_busy=lambda error, wait: waits.append(wait))


def test_a_refusal_naming_a_retry_after_is_sent_again_and_one_without_it_is_not():
    async def go() -> tuple[Any, ...]:
        waits: list[float] = []
        async with _refusing(["busy; Retry-After: 0 s"]) as (server, calls):
            text = await asyncio.wait_for(_sdk_chat(server.port, 5.0, waits).collect(), T)
            retried = (text, len(calls), list(waits))
        waits.clear()
        async with _refusing(["too many, and no time said"]) as (server, calls):
            with pytest.raises(RemoteError) as caught:
                await asyncio.wait_for(_sdk_chat(server.port, 5.0, waits).collect(), T)
            plain = (caught.value.retry_after, len(calls), list(waits))
        return retried, plain

    retried, plain = run(go(), 30)
    assert retried[:2] == ("ok", 2) and len(retried[2]) == 1  # a Retry-After of 0 s: at least BUSY_MIN_WAIT_S
    assert BUSY_MIN_WAIT_S <= retried[2][0] <= BUSY_MIN_WAIT_S * 1.2, retried
    assert plain == (None, 1, []), plain


def test_a_refusal_after_a_token_came_is_never_sent_again():
    """The answer had begun: sending it again would repeat its text (or give another one)."""
    async def go() -> tuple[Any, ...]:
        waits: list[float] = []
        async with _refusing(["busy; Retry-After: 0 s"], tokens_first=2) as (server, calls):
            chat = _sdk_chat(server.port, 5.0, waits)
            deltas: list[str] = []
            with pytest.raises(RemoteError) as caught:
                async with chat:
                    async for delta in chat:
                        deltas.append(delta)
            return caught.value.retry_after, len(calls), waits, "".join(deltas)

    retry_after, calls, waits, text = run(go(), 30)
    assert (retry_after, calls, waits, text) == (0.0, 1, [], "tok tok ")


def test_busy_retries_refuses_a_bad_budget_and_never_waits_for_an_error_without_a_retry_after():
    for bad in (-1, float("nan"), float("inf"), True, "5"):
        with pytest.raises(ValueError, match="retry_busy_s"):
            BusyRetries(bad)  # type: ignore[arg-type]
    budget = BusyRetries(10.0, rng=lambda: 0.0)
    assert budget.wait_for(RemoteError("broken")) is None and budget.wait_for(ValueError("x")) is None
    assert budget.wait_for(RemoteError("busy; Retry-After: 3 s")) == 3.0
    assert budget.wait_for(RemoteError("busy; Retry-After: 30 s")) is None  # more than the whole budget
    assert budget.wait_for(RemoteError("busy; Retry-After: 8 s")) == 7.0  # what is left
    assert budget.wait_for(RemoteError("busy; Retry-After: 1 s")) is None and budget.waits == 2
    assert BusyRetries(0.0).wait_for(RemoteError("busy; Retry-After: 1 s")) is None  # off


# ------------------------------------------------------------------------------------------ 3. tokenwire chat
@contextlib.contextmanager
def _refusing_in_thread(refusals: list[str]) -> Iterator[tuple[int, list[ChatRequest]]]:
    """:func:`_refusing` on a loop of its own thread (the CLI runs its own): its port and its requests."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    calls: list[ChatRequest] = []

    async def source(request: ChatRequest) -> Any:
        calls.append(request)
        if len(calls) <= len(refusals):
            raise RequestError(refusals[len(calls) - 1], code=ErrorCode.LIMIT_EXCEEDED)
        yield "the answer"

    server = asyncio.run_coroutine_threadsafe(serve(source, host="127.0.0.1", port=0), loop).result(T)
    try:
        yield server.port, calls
    finally:
        stop_loop_thread(loop, thread, lambda: closed(server))


def test_chat_sync_waits_for_a_busy_server_when_asked_to():
    with _refusing_in_thread(["server busy; Retry-After: 0 s"]) as (port, calls):
        with pytest.raises(RemoteError) as caught:
            chat_sync("127.0.0.1", port, "hi", **client_kwargs())  # (retry_busy_s=0: as before)
        assert caught.value.retry_after == 0.0 and len(calls) == 1
        calls.clear()
        assert chat_sync("127.0.0.1", port, "hi", retry_busy_s=5.0, **client_kwargs()).text == "the answer"
        assert len(calls) == 2
    with pytest.raises(ValueError, match="retry_busy_s"):
        chat_sync("127.0.0.1", 1, "hi", retry_busy_s=-1.0)  # before connecting


def test_tokenwire_chat_waits_for_a_busy_server_saying_so_and_gets_its_answer(capsys):
    with _refusing_in_thread(["server busy: 1 answers; Retry-After: 0 s"] * 2) as (port, calls):
        rc = main(["chat", "--port", str(port), "--insecure", "hi"])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 0 and out == "the answer\n" and len(calls) == 3, (out, err)
    assert len(lines) == 2, err
    for line in lines:
        assert line.startswith("[server busy: 1 answers; Retry-After: 0 s; retrying in 0."), err
        assert line.endswith(" s (Ctrl-C to stop)]"), err


def test_tokenwire_chat_retry_busy_0_fails_at_once_saying_so(capsys):
    with _refusing_in_thread(["server busy: 1 answers; Retry-After: 1 s"]) as (port, calls):
        rc = main(["chat", "--port", str(port), "--insecure", "--retry-busy", "0", "hi"])
        out, err = capsys.readouterr()
        assert rc == 2 and len(calls) == 1 and out == "", (out, err)
        assert err.strip() == ("tokenwire chat: error: server busy: 1 answers; Retry-After: 1 s; not retried "
                               "(--retry-busy 0)"), err
        rc = main(["chat", "--port", str(port), "--insecure", "--retry-busy", "-1", "hi"])
        assert rc == 2 and "--retry-busy must be" in capsys.readouterr().err


def test_tokenwire_chat_still_refused_at_the_end_of_retry_busy_says_how_long_it_waited(capsys):
    with _refusing_in_thread(["busy; Retry-After: 0 s"] * 5) as (port, calls):
        rc = main(["chat", "--port", str(port), "--insecure", "--retry-busy", "0.5", "hi"])
    out, err = capsys.readouterr()
    assert rc == 2 and len(calls) == 2 and out == "", (out, err)
    assert err.strip().splitlines()[-1] == ("tokenwire chat: error: busy; Retry-After: 0 s; still busy after waiting "
                                            "0.5 s (1 wait; --retry-busy 0.5)"), err


def test_ctrl_c_during_tokenwire_chats_wait_is_interrupted_130_at_once():
    with _refusing_in_thread(["server busy; Retry-After: 30 s"]) as (port, _):
        proc = subprocess.Popen([sys.executable, "-m", "tokenwire.daemon.cli", "chat", "--port", str(port),
                                 "--insecure", "hi"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=default_signals, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline().decode()  # the wait's line: it waits now
            assert "retrying in 3" in line, line
            t0 = time.monotonic()
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=T)
            took = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 130 and err.decode().strip().splitlines() == ["interrupted"], err
    assert took < 2.0, took


# ------------------------------------------------------------------------------------------ 4. from the review
@pytest.mark.parametrize("status, header, expected", [
    (429, None, 1.0), (503, "7", 7.0), (502, "5", 5.0),  # busy: the suffix (a 5xx only when it names a time)
    (400, "5", None), (401, "5", None), (404, "999999999999 s", None), (500, "5 s", None)])
def test_only_a_busy_upstream_status_reads_as_retry_after(status: int, header: str | None,
                                                          expected: float | None) -> None:
    """A 400 or 401 sent again fails again: their Retry-After header is quoted, never the suffix (it made
    `tokenwire chat` resend them for 30 s by default), and a header "5 s" could write the suffix itself."""
    headers = {"Content-Type": "application/json", **({"Retry-After": header} if header is not None else {})}
    err = failure(Canned([b'{"error": {"message": "no"}}'], status=status, headers=headers))
    assert retry_after_of(str(err)) == expected, str(err)
    if header is not None and expected is None:
        assert "its Retry-After header: " in str(err)


def test_a_retry_after_longer_than_the_budget_left_is_not_waited_out() -> None:
    """An upstream's "Retry-After: 86400" had a 30-s budget waited out for a sure refusal."""
    busy = BusyRetries(30.0, rng=lambda: 0.0)
    assert busy.wait_for(RemoteError(with_retry_after("busy", 86400))) is None
    assert busy.wait_for(RemoteError(with_retry_after("busy", 31))) is None
    assert busy.wait_for(RemoteError(with_retry_after("busy", 20))) == 20.0
    assert busy.wait_for(RemoteError(with_retry_after("busy", 20))) == 10.0  # within the budget: cut to what is left
    assert busy.waits == 2
    after_waits = BusyRetries(5.0, rng=lambda: 0.0)
    assert after_waits.wait_for(RemoteError(with_retry_after("busy", 1))) == 1.0
    too_long = RemoteError(with_retry_after("busy", 30))
    assert after_waits.wait_for(too_long) is None  # its note says why it stopped with 4 s of the budget left
    assert too_long.__notes__ == ["tokenwire: not waited for: the server asks for 30 s, more than the whole "
                                  "retry_busy_s=5 (1 wait, 1.0 s, before)"]


def test_chat_verbose_names_the_id_of_the_answer_it_gets_after_a_busy_refusal(capsys: Any) -> None:
    """An upstream's 429 after STARTED: the retry is a new answer, whose id -v must print (it printed only the
    refused one's, so `--attach` reached a failed answer)."""
    with _refusing_in_thread(["server busy; Retry-After: 0 s"]) as (port, calls):
        rc = main(["-v", "chat", "--port", str(port), "--insecure", "hi"])
    out, err = capsys.readouterr()
    ids = [line.split()[2] for line in err.splitlines() if line.startswith("[request id ")]
    assert rc == 0 and out.strip() == "the answer" and len(calls) == 2
    assert len(ids) == 2 and ids[0] != ids[1], err
