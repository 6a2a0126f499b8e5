"""Fixes of an SDK audit from an application developer's side (session 44): the README's type-check recipe under
``mypy --strict`` and a prompt typed wide enough for a typed history; argument errors that name the argument; the
README's SIGTERM and Jupyter recipes; ``conn.closed`` once a close has begun; and ``ResumingChat``, the reconnect and
resume logic of ``tokenwire chat`` as a public SDK class."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tokenwire.daemon.config import parse_config
from tokenwire.daemon.service import Daemon
from tokenwire.transport.client import (
    ConnectRefused,
    ConnectTimeout,
    Reconnect,
    Reconnecting,
    RemoteError,
    ResumingChat,
    chat_sync,
    connect,
)
from tokenwire.transport.errors import ErrorCode, TokenwireError

from .test_handshake_limits import until, value
from .test_sdk_fixes2 import WORDS, words
from .test_sdk_server import T, client_kwargs, run, served

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


# -- 1. the README's type-check recipe, 2. a prompt typed for a typed history -------------------------------------
APP = '''
from __future__ import annotations

import asyncio
from typing import Literal, TypedDict

from tokenwire.transport.client import ChatResult, ResumingChat, chat_sync, connect


class Message(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


async def turn(history: list[Message]) -> str:
    async with connect("127.0.0.1", 4433, verify=False) as conn:
        first = await conn.chat(history, max_tokens=50, params={"rate": 100.0}).collect()
        again = await conn.chat(tuple(history)).collect()
        return first + again


async def resumed(prompt: str) -> str:
    chat = ResumingChat(lambda: connect("127.0.0.1", 4433, verify=False), prompt, retries=2)
    async with chat:
        return await chat.collect()


def blocking(history: tuple[Message, ...]) -> ChatResult:
    return chat_sync("127.0.0.1", 4433, history, verify=False)


print(asyncio.run(turn([{"role": "user", "content": "hi"}])), asyncio.run(resumed("hi")))
'''
BAD = '''
from tokenwire.transport.client import connect


async def wrong() -> None:
    async with connect("127.0.0.1", 4433) as conn:
        conn.chat(5)
'''


def test_a_typed_app_passes_mypy_strict_with_the_readmes_recipe(tmp_path):
    """README "Development" said ``MYPYPATH=.../build/typecheck mypy app.py``: under ``--strict`` that reported
    96 errors in tokenwire's own modules (MYPYPATH makes them source files to check); and a history typed as a
    list of TypedDicts, or a tuple, did not match ``prompt: str | list[dict[str, str]]``. The recipe now puts the
    tree on PYTHONPATH (an installed package's way: checked as a library), and prompt is a Sequence of Mappings
    (of str to object: mypy takes a TypedDict for a ``Mapping[str, object]``, never for a ``Mapping[str, str]``)."""
    pytest.importorskip("mypy")
    text = README.read_text()
    assert "MYPYPATH=" not in text
    assert "PYTHONPATH=/path/to/tokenwire/build/typecheck mypy --strict app.py" in text
    # the tree `make typecheck` builds: tokenwire/ with a link per package
    tree = tmp_path / "typecheck" / "tokenwire"
    tree.mkdir(parents=True)
    for name, where in (("daemon", "daemon"), ("transport", "transport"), ("predictor", "predictor"),
                        ("testbed", "netns-testbed")):
        (tree / name).symlink_to(ROOT / where)
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "bad.py").write_text(BAD)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "typecheck")}
    env.pop("MYPYPATH", None)
    out = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir", os.devnull,
                          "app.py", "bad.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in out.stdout.splitlines() if ": error:" in line]
    # the wrong program's one error, and it alone: the typed app, and tokenwire's modules, pass
    assert len(errors) == 1 and errors[0].startswith("bad.py:7: error: Argument 1 to \"chat\""), out.stdout
    assert "Sequence[Mapping[str, object]]" in errors[0], out.stdout


# -- 3. argument errors name the argument, before anything is sent --------------------------------------------------
RID = bytes(range(16))


@pytest.mark.parametrize(("prompt", "kwargs", "message"), [
    (None, {}, "invalid request: prompt: expected a str or a sequence of {role, content} messages, got NoneType"),
    (5, {}, "invalid request: prompt: expected a str or a sequence of {role, content} messages, got int"),
    (b"hi", {}, "invalid request: prompt: expected a str or a sequence of {role, content} messages, got bytes "
                "(decode it to str)"),
    ({"role": "user", "content": "hi"}, {}, "invalid request: prompt: one message given as a mapping: wrap it in a "
                                            "list"),
    ("hi", {"params": {1: 2}}, "invalid request: params: parameter names must be strings, got int 1"),
    ("hi", {"params": [("rate", 1)]}, "invalid request: params: expected a mapping of generation parameters, got "
                                      "list"),
    ("hi", {"resume": (RID, ["a"])}, "invalid request: resume: the tokens held must be bytes (as "
                                     "stream.resume_point() gives them), token 0 is str"),
    ("hi", {"resume": (RID, b"ab")}, "invalid request: resume: the tokens held must be a list of bytes"),
    ("hi", {"resume": (RID,)}, "invalid request: resume: expected (request_id, tokens_held)"),
    ("hi", {"resume": (None, [b"a"])}, "invalid request: resume: the request id is None"),
    ("hi", {"resume": ("0" * 32, [])}, "invalid request: resume: expected bytes, got str"),
], ids=["None", "int", "bytes", "one-message", "params-key", "params-list", "resume-str-token", "resume-bytes",
        "resume-1-tuple", "resume-no-id", "resume-str-id"])
def test_a_wrong_argument_is_a_value_error_naming_it_and_the_connection_lives_on(prompt, kwargs, message):
    """The audit's t07: prompt None or 5 was a bare TypeError "'NoneType' object is not iterable"; one message not
    in a list, or bytes, "each message must be a map with exactly 'role' and 'content'" (a dict it was); params
    {1: 2} "not a valid msgpack frame: ValueError: int is not allowed for map key"; a str token in resume "sequence
    item 0: expected a bytes-like object". The README promises a ValueError naming the argument, nothing sent."""
    async def go() -> tuple[str, str, bool]:
        async with served(words) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            with pytest.raises(ValueError) as exc:
                conn.chat(prompt, **kwargs)
            return str(exc.value), await conn.chat("after").collect(), conn.closed

    text, after, closed = run(go())
    assert text.startswith(message), text
    assert after == "".join(WORDS) and not closed  # refused here: the connection lives on


def test_a_sequence_of_mappings_is_a_prompt_at_run_time_too():
    """What the wider type lets through works: a tuple, and mappings that are not dicts (sent as dicts)."""
    async def go() -> list[str]:
        async with served(_echo) as server, \
                connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            return [await conn.chat(p).collect() for p in (
                ({"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}),
                [types.MappingProxyType({"role": "user", "content": "c"})],
            )]

    assert run(go()) == ["user:a assistant:b", "user:c"]


async def _echo(request: Any) -> AsyncIterator[str]:
    yield " ".join(f"{m['role']}:{m['content']}" for m in request.messages)


def test_attach_names_held_and_chat_sync_refuses_before_connecting():
    """attach(held=["a"]) failed the same bare way; chat_sync checked chat's arguments only after its handshake
    (here: no server at all, so a ConnectRefused would come first)."""
    async def go() -> str:
        async with served(words) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            with pytest.raises(ValueError) as exc:
                conn.attach(RID, held=["a"])  # type: ignore[list-item]
            return str(exc.value)

    assert run(go()).startswith("invalid request: held: the tokens held must be bytes")
    for prompt, kwargs in ((None, {}), ("hi", {"max_tokens": 0}), ("hi", {"params": {1: 2}})):
        started = time.monotonic()
        with pytest.raises(ValueError, match=r"^invalid request: (prompt|max_tokens|params): "):
            chat_sync("127.0.0.1", 24999, prompt, verify=False, **kwargs)  # type: ignore[arg-type]
        assert time.monotonic() - started < 0.5
    with pytest.raises(ConnectRefused):  # (nothing listens there: the check above came first)
        chat_sync("127.0.0.1", 24999, "hi", verify=False, timeout=2)


# -- 4. the README's SIGTERM recipe cancels the answer at the server ------------------------------------------------
def test_the_readmes_sigterm_recipe_cancels_the_answer_at_the_server():
    """A client stopped by SIGTERM (docker stop, systemctl stop) left its answer generating until the server's idle
    timeout: Python's default SIGTERM ends the process without unwinding `async with`. The README's recipe turns
    SIGTERM into a cancellation of the main task; run as written (the server's address replaced)."""
    block = textwrap.dedent(next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
                                 if "SIGTERM" in b))
    forever_started = asyncio.Event()

    async def forever(request: Any) -> AsyncIterator[str]:
        forever_started.set()
        while True:
            yield "token "
            await asyncio.sleep(0.02)

    async def go() -> tuple[int, float, float]:
        async with served(forever) as server:
            code = block.replace('connect("chat.example.com", 4433)',
                                 f'connect("127.0.0.1", {server.port}, verify=False)')
            assert code != block
            proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdout=subprocess.PIPE,
                                                        stderr=subprocess.PIPE)
            assert proc.stdout is not None
            await asyncio.wait_for(proc.stdout.readuntil(b"token"), 20)  # the answer streams
            proc.send_signal(signal.SIGTERM)
            rc = await asyncio.wait_for(proc.wait(), 10)
            await until(lambda: server.stats.cancelled >= 1, 5)
            return rc, server.stats.cancelled, server.stats.requests

    rc, cancelled, requests = run(go())
    assert rc == 128 + signal.SIGTERM  # the exit status of a process killed by SIGTERM, without the traceback
    assert (cancelled, requests) == (1, 1)


def test_the_readme_tells_jupyter_users_what_to_use_and_so_does_chat_sync():
    """chat_sync inside a running loop (a Jupyter cell) said to use the async API; top-level `await`, and running
    chat_sync in a thread (asyncio.to_thread), both work there."""
    text = " ".join(README.read_text().split())
    assert "Jupyter" in text and "await asyncio.to_thread(chat_sync, " in text

    async def inside() -> str:
        with pytest.raises(RuntimeError) as exc:
            chat_sync("127.0.0.1", 24999, "hi")
        return str(exc.value)

    message = asyncio.run(inside())
    assert "Jupyter" in message and "await asyncio.to_thread(chat_sync, ...)" in message


# -- 5. closed once a close has begun --------------------------------------------------------------------------------
def test_a_cancelled_close_leaves_the_connection_closed_and_chat_refuses_at_once():
    """A cancelled `await conn.close()` (a timeout around it) left conn.closed False; the next chat() was accepted
    and failed 0.24 s later with CANCELLED."""
    async def go() -> tuple[bool, bool, TokenwireError, float]:
        async with served(words) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            before = conn.closed
            closing = asyncio.ensure_future(conn.close())
            await asyncio.sleep(0)  # the close has begun
            closing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await closing
            started = time.monotonic()
            with pytest.raises(TokenwireError) as exc:
                conn.chat("after")
            return before, conn.closed, exc.value, time.monotonic() - started

    before, closed, error, took = run(go())
    assert not before and closed
    assert error.code == ErrorCode.CANCELLED and "closed locally" in str(error) and took < 0.05


# -- 6b. a held-back request cancelled before it left ------------------------------------------------------------------
def test_a_held_back_request_cancelled_before_it_left_is_a_give_up_the_daemon_counts_refused():
    """The audit read `requests_ended{outcome="refused"}` without a `requests_total` for such requests as a
    miscount. It is what docs/metrics.md defines: the request does reach the daemon once a slot frees (its REQUEST
    with the stream's FIN: QUIC cannot take back a stream past the server's limit), nothing starts for it, and
    `refused` is the outcome of a request whose answer never started, a client's give-up too; no ERROR is sent
    (`tokenwire_errors_total`) and `tokenwire_requests_total` counts started answers only. Pinned here, with the
    counts adding up once nothing is open."""
    async def go() -> tuple[dict[str, float], str]:
        async with _daemon(max_requests_per_connection=2) as daemon:
            port = daemon.addresses[0][1]
            async with connect("127.0.0.1", port, verify=False) as conn:
                first = [conn.chat(f"c{i}", max_tokens=10, params={"rate": 50}) for i in range(2)]
                held = conn.chat("held", max_tokens=10)
                assert conn._protocol.client_session._stream_blocked(held.stream_id)
                await held.cancel()
                await asyncio.gather(*(s.collect() for s in first))
                after = await conn.chat("after", max_tokens=3).collect()
                ended = ("completed", "cancelled", "lost", "failed", "refused")
                await until(lambda: sum(value(daemon, "tokenwire_requests_ended_total", {"outcome": o})
                                        for o in ended) >= 4, T)
            counts = {o: value(daemon, "tokenwire_requests_ended_total", {"outcome": o}) for o in ended}
            counts["total"] = value(daemon, "tokenwire_requests_total", {"scheme": "chatterbox"})
            counts["errors"] = sum(sample.value for metric in daemon.metrics.registry.collect()
                                   for sample in metric.samples if sample.name == "tokenwire_errors_total")
            return counts, after

    counts, after = run(go())
    assert after
    assert counts == {"completed": 3, "cancelled": 0, "lost": 0, "failed": 0, "refused": 1, "total": 3,
                      "errors": 0}


# -- 8. ResumingChat ------------------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def _daemon(**limits: int) -> AsyncIterator[Daemon]:
    """The daemon in this process on a loopback port (the demo upstream), stopped at the end."""
    daemon = Daemon(parse_config({"server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": ""},
                                  "limits": {"orphan_timeout_s": 60, **limits}}))
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


@contextlib.asynccontextmanager
async def _relay(port: int, dark: tuple[float, float]) -> AsyncIterator[int]:
    """A UDP relay to ``port`` (in this loop) whose both directions are dark from ``dark[0]`` to ``dark[1]`` seconds
    after the first packet through it: its port."""
    from tokenwire.testbed.udp_relay import UdpRelay

    relay = await UdpRelay(("127.0.0.1", port)).start()
    first: dict[str, float] = {}
    for path in (relay.up, relay.down):
        def through(elapsed: float, size: int, decide: Any = path.decide) -> Any:
            since = time.monotonic() - first.setdefault("t", time.monotonic())
            return None if dark[0] <= since < dark[1] else decide(elapsed, size)

        path.decide = through  # type: ignore[method-assign]
    try:
        yield relay.port
    finally:
        relay.close()
        await asyncio.sleep(0)


ASK: dict[str, Any] = {"max_tokens": 80, "params": {"rate": 60}}


def _fast(retries: int, window_s: float = 30.0) -> Reconnecting:
    """The backoff in tens of milliseconds (its shape is chat_cli's tests' business)."""
    return Reconnecting(retries, first_s=0.02, cap_s=0.1, window_s=window_s)


def test_a_path_dark_mid_answer_resumes_to_exactly_the_reference_text():
    """tokenwire chat's Reconnecting (about 100 lines) was the only code that knew what is resumable and how to
    back off; an SDK user rewrote it. ResumingChat: the path goes dark 0.5 s into the answer for 1.5 s (idle timeout
    0.6 s): the deltas read are the reference answer exactly, once, after a reconnect or more."""
    async def go() -> tuple[str, str, str, list[Reconnect], int, Any]:
        async with _daemon() as daemon:
            port = daemon.addresses[0][1]
            async with connect("127.0.0.1", port, verify=False) as conn:
                reference = await conn.chat("tell me", **ASK).collect()
            heard: list[Reconnect] = []
            async with _relay(port, (0.5, 2.0)) as through:
                chat = ResumingChat(lambda: connect("127.0.0.1", through, verify=False, idle_timeout=0.6,
                                                    timeout=0.4),
                                    "tell me", retries=_fast(2), on_reconnect=heard.append, **ASK)
                deltas = []
                async with chat:
                    async for delta in chat:
                        deltas.append(delta)
            await until(lambda: not daemon.protocols, T)
            return reference, "".join(deltas), chat.text, heard, chat.reconnecting.used, chat.stats

    reference, read, text, heard, used, stats = run(go())
    assert len(reference) > 100 and read == text == reference
    assert used == 1 and heard[0].attempt == 1 and heard[0].wait_s == 0.0 and heard[0].retries_used == 1
    assert isinstance(heard[0].error, RemoteError) and heard[0].error.path_lost and heard[0].tokens_held > 0
    assert all(isinstance(h.error, ConnectTimeout) and h.attempt == i + 2 for i, h in enumerate(heard[1:]))
    assert stats is not None and stats.digest_verified  # the digest covers the whole answer


def test_a_refusal_is_raised_at_once_without_a_retry():
    """UNAUTHORIZED (the server's close) is no lost path: raised on the first connection, none other made."""
    calls: list[int] = []

    async def go() -> RemoteError:
        async with served(words, authorize=lambda token: False) as server:
            def connecting() -> Any:
                calls.append(1)
                return connect("127.0.0.1", server.port, **client_kwargs())

            chat = ResumingChat(connecting, "q", retries=_fast(3))
            with pytest.raises(RemoteError) as exc:
                async with chat:
                    await chat.collect()
            assert chat.gave_up is None and not chat.detached
            return exc.value

    error = run(go())
    assert error.code == ErrorCode.UNAUTHORIZED and calls == [1]


@pytest.mark.parametrize("retries", [0, 1])
def test_out_of_retries_the_last_error_is_raised_saying_so(retries):
    """A path that goes dark for good 0.5 s into the answer: with no retry, the lost connection's RemoteError
    (path_lost); with one, the reconnect attempts' ConnectTimeout once window_s has passed since the loss. Each
    with a note, ``gave_up`` saying which, and the answer's resume point (the daemon may still hold it)."""
    async def go() -> tuple[BaseException, ResumingChat]:
        async with _daemon() as daemon:
            port = daemon.addresses[0][1]
            async with _relay(port, (0.5, 1e9)) as through:
                chat = ResumingChat(lambda: connect("127.0.0.1", through, verify=False, idle_timeout=0.5,
                                                    timeout=0.3),
                                    "tell me", retries=_fast(retries, window_s=0.8), **ASK)
                with pytest.raises((RemoteError, ConnectTimeout)) as exc:
                    async with chat:
                        await chat.collect()
                with pytest.raises(type(exc.value)) as again:  # read again: the same end
                    await chat.collect()
                assert again.value is exc.value
            return exc.value, chat

    error, chat = run(go())
    point = chat.resume_point()
    assert point is not None and chat.detached and len(point[1]) > 0 and chat.text
    if retries == 0:
        assert isinstance(error, RemoteError) and error.path_lost and chat.gave_up == "retries"
        assert "the connection was lost 1 times (retries=0)" in error.__notes__[0]
    else:
        assert isinstance(error, ConnectTimeout) and chat.gave_up == "window"
        assert "no server reached in" in error.__notes__[0] and chat.reconnecting.used == 1


def test_resuming_chat_takes_a_prompt_or_an_id_and_a_retry_count():
    def connecting() -> Any:
        raise AssertionError("not called")

    for kwargs in ({}, {"prompt": "x", "attach": RID}):
        with pytest.raises(ValueError, match="a prompt or attach=request_id"):
            ResumingChat(connecting, **kwargs)
    with pytest.raises(ValueError, match="attach: 'nope' is not a request id"):
        ResumingChat(connecting, attach="nope")
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="retries: expected an integer >= 0"):
            ResumingChat(connecting, "x", retries=bad)  # type: ignore[arg-type]
