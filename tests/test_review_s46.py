"""Review of session 46's ResumingChat and ``llm serve`` changes:

1. A reader cancelled for good (an app's handler whose browser left) without ``async with``: the chat's step task
   went on reading the answer on an open connection, the generator holding the chat in a cycle only the cyclic
   GC frees.
2. A "stop" pressed while the reader is between reads: the reader came back into a generator still closing and
   raised "anext(): asynchronous generator is already running".
3. A "stop" before the reader's first read was lost: the read then asked for the whole answer.
4. ``llm serve``: a request whose body arrived during ``cut_answers()``' grace was taken and cut with no error event.
"""

from __future__ import annotations

import asyncio
import gc
import json
import weakref
from typing import Any

from tokenwire.transport.client import ResumingChat, connect

from .test_handshake_limits import until
from .test_llm_server import FakeLM, engine
from .test_loopback import run
from .test_sdk_audit_s44 import _daemon
from .test_sdk_server import T


def _chat(port: int, **ask: Any) -> ResumingChat:
    return ResumingChat(lambda: connect("127.0.0.1", port, verify=False), "tell me", **ask)


def test_a_reader_cancelled_for_good_frees_its_chat_and_closes_the_connection():
    async def go() -> tuple[bool, int, int]:
        async with _daemon() as daemon:
            port = daemon.addresses[0][1]
            got: list[str] = []
            refs: list[weakref.ref[ResumingChat]] = []

            async def handler() -> None:  # owns its chat, no `async with`, as a web handler may
                chat = _chat(port, max_tokens=150, params={"rate": 50})
                refs.append(weakref.ref(chat))
                async for delta in chat:
                    got.append(delta)

            task = asyncio.create_task(handler())
            await until(lambda: len(got) >= 3, T)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            del task
            gc.disable()  # (freed by reference counting, not by a collection that happens to run)
            try:
                await until(lambda: not daemon.protocols, 2.0)
                return refs[0]() is None, len(daemon.protocols), len(got)
            finally:
                gc.enable()

    freed, open_connections, read = run(go())
    assert freed and open_connections == 0 and read < 150


def test_a_stop_between_reads_ends_the_reader_quietly():
    async def go() -> list[str]:
        async with _daemon() as daemon:
            port = daemon.addresses[0][1]
            outcomes = []
            for _ in range(3):
                chat = _chat(port, max_tokens=200, params={"rate": 100})
                got: list[str] = []

                async def reader(chat: ResumingChat = chat, got: list[str] = got) -> None:
                    async with chat:
                        async for delta in chat:
                            got.append(delta)
                            await asyncio.sleep(0)  # (the delta goes on to the browser)

                task = asyncio.create_task(reader())
                await until(lambda got=got: len(got) >= 3, T)
                while chat._step is not None:  # the reader is between reads
                    await asyncio.sleep(0)
                await chat.aclose()
                try:
                    await asyncio.wait_for(task, T)
                    outcomes.append("ended quietly")
                except Exception as exc:  # what a fault looks like: the test shows it
                    outcomes.append(f"{type(exc).__name__}: {exc}")
            return outcomes

    assert run(go()) == ["ended quietly"] * 3


def test_a_stop_before_the_first_read_asks_for_nothing():
    async def go() -> tuple[str, Any, int]:
        async with _daemon() as daemon:
            port = daemon.addresses[0][1]
            connects: list[int] = []

            def connecting() -> Any:
                connects.append(1)
                return connect("127.0.0.1", port, verify=False)

            chat = ResumingChat(connecting, "tell me", max_tokens=40, params={"rate": 400})
            reader = asyncio.create_task(chat.collect())  # not run yet
            await chat.aclose()  # "stop", from another task
            text = await asyncio.wait_for(reader, T)
            return text, chat.stats, len(connects)

    text, stats, connects = run(go())
    assert text == "" and stats is None and connects == 0


def test_llm_serve_refuses_a_request_whose_body_arrives_while_it_stops():
    """The stand-in answer keeps cut_answers()' grace open, as one whose client reads nothing does."""
    from tokenwire.daemon.llm_server import IN_FLIGHT, LLMService, cut_answers, start_server

    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n")

    async def go() -> str:
        service = LLMService(engine(FakeLM(endless=True, delay=0.01)), 4, "fake")
        runner, port = await start_server(service, "127.0.0.1", 0)

        class Stuck:  # an answer whose handler never returns
            cut = False
            events: asyncio.Queue[Any] = asyncio.Queue()

        runner.app[IN_FLIGHT].jobs.add(Stuck())  # type: ignore[arg-type]
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
        rb, wb = await asyncio.open_connection("127.0.0.1", port)
        wb.write(head % len(body) + body[:10])
        await wb.drain()
        got = bytearray()

        async def reading() -> None:
            try:
                while chunk := await rb.read(65536):
                    got.extend(chunk)
            except ConnectionError:
                pass

        reads = asyncio.create_task(reading())
        # its handler has begun (aiohttp counts it as it calls it) and waits for the body
        await until(lambda: runner.server is not None and runner.server.requests_count == 1, T)

        async def stop() -> None:  # llm_cli's order
            await cut_answers(runner.app)
            await runner.cleanup()

        stopping = asyncio.create_task(stop())
        await until(lambda: runner.app[IN_FLIGHT].stopping, T)
        wb.write(body[10:])  # the body, during the stop's grace
        await wb.drain()
        await stopping
        await asyncio.wait_for(reads, T)
        wb.close()
        service.close()
        return bytes(got).decode(errors="replace")

    text = run(go())
    assert text.startswith("HTTP/1.1 503"), text[:200]
    assert "chat.completion.chunk" not in text and "shutting down" in text
