"""Fixes of a chatbot developer's SDK audit (session 46): a "stop" (``ResumingChat.aclose()`` from another task)
pressed while the chat reconnects after a lost path ends the reader there, instead of being lost; a resume the server
cannot serve (NOT_FOUND: a restarted daemon) says that it was one."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tokenwire.transport.client import Reconnect, Reconnecting, RemoteError, ResumingChat, connect
from tokenwire.transport.errors import ErrorCode

from .test_handshake_limits import until
from .test_loopback import run
from .test_sdk_audit_s44 import ASK, _daemon, _relay
from .test_sdk_server import T, client_kwargs, served


@pytest.mark.parametrize("stop_in", ["backoff", "handshake"])
def test_a_stop_while_reconnecting_ends_the_reader_and_resumes_nothing(stop_in):
    """The path goes dark 0.5 s into the answer and returns at 3 s. The user presses "stop" once the chat has lost
    its connection: in the backoff after a failed attempt (5 s), or while an attempt's handshake waits (1 s). The
    reader slept the backoff out, reconnected through the path come back and read the whole answer (or raised the
    attempt's ConnectTimeout): the stop was lost. Now its loop ends at once, quietly (a handshake under way is
    cancelled), no attempt follows and nothing more is read; the answer stays detached (the daemon keeps it for
    its orphan timeout)."""
    async def go() -> tuple[int, int, float, int, bool]:
        async with _daemon() as daemon:
            port = daemon.addresses[0][1]
            async with _relay(port, (0.5, 3.0)) as through:
                calls: list[float] = []
                heard: list[Reconnect] = []

                def connecting() -> Any:
                    calls.append(time.monotonic())
                    return connect("127.0.0.1", through, verify=False, idle_timeout=0.5, timeout=1.0)

                chat = ResumingChat(connecting, "tell me", on_reconnect=heard.append,
                                    retries=Reconnecting(3, first_s=5.0, cap_s=5.0, window_s=60.0, jitter=0.0),
                                    **ASK)
                reader = asyncio.create_task(chat.collect())
                # attempt 1 goes at once after the loss (its handshake then waits on the dark path); attempt 2
                # is heard with the 5-s backoff before it
                await until(lambda: len(heard) >= (2 if stop_in == "backoff" else 1), T)
                read = len(chat.text)
                attempts = len(calls)
                stopped = time.monotonic()
                await chat.aclose()
                await asyncio.wait_for(reader, T)
                took = time.monotonic() - stopped
                await asyncio.sleep(0.5)  # (the path is back by now: nothing may connect again)
                return read, len(chat.text), took, len(calls) - attempts, chat.detached

    read, after, took, more_attempts, detached = run(go())
    assert read > 0 and after == read
    assert more_attempts == 0 and detached
    assert took < 0.5  # the backoff's 5 s were not slept out, the handshake's 1 s not waited for


async def _slow(request: Any) -> Any:
    for i in range(200):
        await asyncio.sleep(0.02)
        yield f" w{i}"


def test_a_resume_the_server_does_not_know_says_it_was_a_resume():
    """After a lost connection the reconnect's resume got a bare "unknown or expired request id" (NOT_FOUND): an id
    the application never saw, and no word that the text read is all that will come (``tokenwire chat`` said so,
    an SDK user was left to guess). The SDK's ``serve()`` knows no answer by id, as a restarted daemon does not."""
    async def go() -> tuple[RemoteError, ResumingChat]:
        async with served(_slow) as server, _relay(server.port, (0.3, 1.0)) as through:
            chat = ResumingChat(lambda: connect("127.0.0.1", through, idle_timeout=0.4, timeout=0.3,
                                                **client_kwargs()),
                                "tell me", retries=Reconnecting(2, first_s=0.05, cap_s=0.1, window_s=30.0))
            with pytest.raises(RemoteError) as exc:
                async with chat:
                    await chat.collect()
            return exc.value, chat

    error, chat = run(go())
    assert error.code == ErrorCode.NOT_FOUND and chat.reconnecting.used == 1 and chat.text.startswith(" w0 w1")
    point = chat.resume_point()
    assert point is not None
    note = " ".join(getattr(error, "__notes__", []))
    assert f"resuming request {point[0].hex()} after token {len(point[1])}" in note
    assert "no longer holds the answer" in note


def test_a_timed_out_read_loses_nothing_and_the_answer_goes_on():
    """A web relay waits for each delta with a timeout (``asyncio.wait_for(anext(chat), t)``) and sends the browser
    a keepalive when it expires. ResumingChat ran its generator in the reader's task: the first timed-out read
    cancelled the answer at the server, and the next read ended the iteration quietly, as if the answer were whole
    (no delta read at all, in a probe at 30 tokens/s with 50-ms reads). Now the step a read waited on goes on in a
    task of its own, as a ChatStream's read does: every delta once, the answer whole."""
    async def go() -> tuple[str, str, str, int, Any]:
        async with _daemon() as daemon:
            port = daemon.addresses[0][1]
            async with connect("127.0.0.1", port, verify=False) as conn:
                reference = await conn.chat("tell me", **ASK).collect()
            chat = ResumingChat(lambda: connect("127.0.0.1", port, verify=False), "tell me", **ASK)
            deltas: list[str] = []
            timeouts = 0
            async with chat:
                it = aiter(chat)
                while True:
                    try:
                        deltas.append(await asyncio.wait_for(anext(it), 0.005))
                    except TimeoutError:
                        timeouts += 1
                    except StopAsyncIteration:
                        break
            return reference, "".join(deltas), chat.text, timeouts, chat.stats

    reference, read, text, timeouts, stats = run(go())
    assert timeouts > 10 and len(reference) > 100
    assert read == text == reference
    assert stats is not None and stats.finish_reason == "length" and stats.digest_verified
