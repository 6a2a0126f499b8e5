"""SDK client fixes: ``ChatStream.cancel()`` once the answer has ended keeps what was not read yet, a request's
argument errors name the argument (not the wire's ``request.mt``), and a prompt over the request size limit says
so in bytes of UTF-8."""

from __future__ import annotations

import asyncio

import pytest

from tokenwire.transport.client import ChatStream, PromptTooLarge, connect
from tokenwire.transport.errors import RemoteError
from tokenwire.transport.frames import MAX_STREAM_FRAME

from .test_sdk_server import client_kwargs, run, served

WORDS = ["one", " two", " three", " four"]


async def words(request):
    for w in WORDS:
        yield w


async def broken(request):
    yield "half"
    raise RuntimeError("the model fell over")


def _on_end(stream: ChatStream) -> asyncio.Event:
    """An event set once the stream has taken in the end of its answer (FINISHED or an error): the test waits on
    it instead of sleeping."""
    ended = asyncio.Event()
    for name in ("_finished", "_failed"):
        real = getattr(stream, name)

        def hook(arg, real=real):
            real(arg)
            ended.set()

        setattr(stream, name, hook)
    return ended


# -- cancel() once the answer has ended ------------------------------------------------------------------------
def test_cancel_after_the_answer_ended_keeps_the_text_not_read_yet():
    """cancel() set ``_done`` unconditionally: once FINISHED had come, the deltas still queued were thrown away
    (``async for`` ended after the first word), though the docstring says it is a no-op then."""
    async def go():
        async with served(words) as server:
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                stream = conn.chat("q")
                ended = _on_end(stream)
                first = await stream.__anext__()
                await asyncio.wait_for(ended.wait(), 10)
                await stream.cancel()
                rest = [d async for d in stream]
            return first, rest, stream.stats, server.stats

    first, rest, stats, server_stats = run(go())
    assert first + "".join(rest) == "".join(WORDS)
    assert stats is not None and stats.digest_verified
    assert (server_stats.completed, server_stats.cancelled) == (1, 0), server_stats


def test_cancel_after_the_answer_failed_still_raises_its_error():
    """The same for an answer that ended with an error: the reader gets the error, not a silent end."""
    async def go():
        async with served(broken) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            stream = conn.chat("q")
            ended = _on_end(stream)
            await asyncio.wait_for(ended.wait(), 10)
            await stream.cancel()
            with pytest.raises(RemoteError):
                async for _ in stream:
                    pass

    run(go())


def test_cancel_while_the_answer_is_open_still_ends_the_reader():
    """What cancel() is for is unchanged: an open answer is abandoned, and the reader's loop ends."""
    async def forever(request):
        yield "start"
        await asyncio.Event().wait()
        yield "never"

    async def go():
        async with served(forever) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            stream = conn.chat("q")
            assert await stream.__anext__() == "start"
            await stream.cancel()
            return [d async for d in stream]

    assert run(go()) == []


# -- argument errors name the argument -------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_tokens": 0}, "invalid request: max_tokens: 0 out of range [1, 1000000]"),
    ({"max_tokens": 2_000_000}, "invalid request: max_tokens: 2000000 out of range"),
    ({"max_tokens": True}, "invalid request: max_tokens: expected an integer, got bool"),
    ({"max_tokens": 1.5}, "invalid request: max_tokens: expected an integer, got float"),
    ({"model": "m" * 200}, "invalid request: model: string of 200 characters exceeds 128"),
    ({"params": {"k": [1]}}, "invalid request: params: parameter 'k' must be a number"),
    ({"params": {"k" * 70: 1}}, "invalid request: params: parameter names must be strings of at most 64"),
    ({"prompt": [{"role": "bot", "content": "x"}]}, "invalid request: prompt: role must be system, user"),
    ({"prompt": []}, "invalid request: prompt: expected a non-empty list of {role, content} messages"),
    ({"resume": (b"short", [])}, "invalid request: resume: "),
], ids=["max_tokens=0", "max_tokens-big", "max_tokens-bool", "max_tokens-float", "model", "params-value",
        "params-name", "role", "no-messages", "resume"])
def test_a_refused_chat_argument_is_named_as_the_caller_wrote_it(kwargs, message):
    """The errors named the wire's fields ("request.mt: 0 out of range", "request.p", "request.m"), which the
    caller never sees; fetch_kv already named its own arguments."""
    async def go():
        async with served(words) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            args = dict(kwargs)
            prompt = args.pop("prompt", "hi")
            with pytest.raises(ValueError) as exc:
                conn.chat(prompt, **args)
            return str(exc.value), await conn.chat("after").collect()

    text, after = run(go())
    assert text.startswith(message) and "request." not in text.removeprefix("invalid request"), text
    assert after == "".join(WORDS)  # refused locally: the connection lives on


def test_a_refused_attach_names_its_request_id_argument():
    async def go():
        async with served(words) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            with pytest.raises(ValueError) as exc:
                conn.attach(b"short")
            return str(exc.value)

    text = run(go())
    assert text.startswith("invalid request: request_id: "), text


# -- the request size limit, in bytes of UTF-8 -----------------------------------------------------------------
@pytest.mark.parametrize(("prompt", "text_bytes"), [
    ("a" * MAX_STREAM_FRAME, MAX_STREAM_FRAME),  # as many characters as the limit: over it with the framing
    ("é" * 600_000, 1_200_000),  # 600,000 characters, under the limit in characters, 1.2 MB of UTF-8
    ("😀" * 300_000, 1_200_000),
], ids=["ascii-1MiB", "accented", "emoji"])
def test_a_prompt_over_the_request_limit_says_so_in_bytes_of_utf8(prompt, text_bytes):
    """It said "invalid request: frame of 1048623 bytes exceeds the limit of 1048576": no word of the prompt,
    of UTF-8, nor of a daemon's lower limit."""
    async def go():
        async with served(words) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            with pytest.raises(PromptTooLarge) as exc:
                conn.chat(prompt)
            return exc.value, await conn.chat("after").collect()

    err, after = run(go())
    assert isinstance(err, ValueError)  # what chat() documents for a refused argument
    assert (err.text_bytes, err.limit) == (text_bytes, MAX_STREAM_FRAME) and err.size > text_bytes
    assert str(err) == (f"prompt too large: its text is {text_bytes:,} bytes of UTF-8 and the request {err.size:,} "
                        "bytes encoded, over the limit of 1,048,576 bytes per request (a daemon's "
                        "limits.max_request_bytes may be lower)")
    assert after == "".join(WORDS)


def test_a_prompt_just_under_the_limit_is_sent():
    """The boundary: the size check is the frame's own, not a stricter guess."""
    async def echo_length(request):
        yield str(len(request.prompt))

    async def go():
        async with served(echo_length) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            return await conn.chat("a" * (MAX_STREAM_FRAME - 100)).collect()

    assert run(go()) == str(MAX_STREAM_FRAME - 100)
