"""The SDK client's smaller defects found by a probe: the size error blamed the prompt for a large ``params`` or auth
token, a dead local port cost the whole connect timeout, a cancelled answer lost the TTFT it had measured, and an
answer generated at once read as half stalled (and one over 200,000 tokens said it was resumed)."""

from __future__ import annotations

import asyncio
import math
import socket
import sys
import time

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from tokenwire.transport import metrics
from tokenwire.transport.chat_stats import GEN_TIMES_MAX, stats_from_outcome
from tokenwire.transport.client import ClientProtocol, ConnectRefused, PromptTooLarge, connect
from tokenwire.transport.client_session import _report
from tokenwire.transport.errors import ConnectError, ConnectTimeout, ErrorCode, TokenwireError
from tokenwire.transport.frames import MAX_STREAM_FRAME
from tokenwire.transport.session_outcome import ChatOutcome

from .test_sdk_server import T, client_kwargs, run, served

WORDS = ["one", " two", " three"]


async def words(request):
    for w in WORDS:
        yield w


# -- 1. the size error names what makes the request too large -------------------------------------------------
@pytest.mark.parametrize("what", ["params", "auth_token"])
def test_a_large_params_or_auth_token_is_named_instead_of_the_prompt(what):
    """It said "prompt too large: its text is 3 bytes of UTF-8 and the request 2,000,056 bytes encoded"."""
    big = "a" * 2_000_000

    async def go():
        token = big if what == "auth_token" else None
        async with served(words) as server, connect("127.0.0.1", server.port, auth_token=token,
                                                    **client_kwargs()) as conn:
            with pytest.raises(PromptTooLarge) as info:
                conn.chat("hi", params={"x": big} if what == "params" else None)
            return info.value, conn.closed

    err, closed = run(go())
    assert isinstance(err, ValueError) and err.code == ErrorCode.LIMIT_EXCEEDED and not closed
    assert err.field == what and MAX_STREAM_FRAME < err.field_bytes <= err.size and err.text_bytes == 2
    label = "params" if what == "params" else "the auth token (connect(auth_token=))"
    assert str(err) == (f"request too large: {label} makes up {err.field_bytes:,} of its {err.size:,} bytes encoded "
                        "(the prompt's text is 2 bytes of UTF-8), over the limit of 1,048,576 bytes per request (a "
                        "daemon's limits.max_request_bytes may be lower)")


def test_a_large_prompt_beside_small_params_is_still_the_prompt():
    from tokenwire.transport.client import _CHAT_ARGUMENTS, _check_request
    from tokenwire.transport.frames import Request

    request = Request(messages=[{"role": "user", "content": "a" * MAX_STREAM_FRAME}], params={"x": "y" * 1000})
    with pytest.raises(PromptTooLarge) as info:
        _check_request(request, _CHAT_ARGUMENTS)
    assert info.value.field == "prompt" and str(info.value).startswith(
        f"prompt too large: its text is {MAX_STREAM_FRAME:,} bytes of UTF-8")


# -- 2. nothing listening: refused at once, not after the timeout ---------------------------------------------
def _dead_port() -> int:
    """A UDP port on loopback that nobody holds (the kernel answers a datagram to it with port unreachable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(sys.platform != "linux", reason="the refusal is seen on Linux's connected UDP socket")
@pytest.mark.parametrize("ecn", [False, True])
def test_a_port_nobody_listens_on_is_refused_well_before_the_timeout(ecn):
    """It waited the whole connect timeout, then said ConnectTimeout, though the kernel knew at once."""
    port = _dead_port()

    async def go():
        start = time.monotonic()
        with pytest.raises(TokenwireError) as info:
            async with connect("127.0.0.1", port, timeout=T, ecn=ecn, **client_kwargs()):
                pass
        return info.value, time.monotonic() - start

    err, elapsed = run(go())
    assert isinstance(err, ConnectRefused) and isinstance(err, ConnectError) and isinstance(err, ConnectionError)
    assert not isinstance(err, ConnectTimeout)
    assert str(err) == f"nothing listening at 127.0.0.1:{port} (connection refused)"
    assert elapsed < T / 2, f"{elapsed:.1f} s for a refusal"  # (a generous bound: it takes milliseconds)


def test_a_refusal_ends_the_handshake_only_while_the_server_has_sent_nothing():
    """One ICMP during a handshake the server already answered is a restart's blip: QUIC retransmits through it."""

    async def go(heard: bool):
        proto = ClientProtocol(QuicConnection(configuration=QuicConfiguration(is_client=True)))
        proto.heard = heard
        waiting = asyncio.ensure_future(proto.wait_connected())
        await asyncio.sleep(0)  # (the wait has begun: its waiter exists)
        proto.error_received(ConnectionRefusedError(111, "Connection refused"))
        for _ in range(5):  # (the shielded waiter's end reaches the wait through a few callbacks)
            await asyncio.sleep(0)
        done = waiting.done()
        error = waiting.exception() if done else None
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        return proto.connect_refused, done, error

    refused, done, error = run(go(False))
    assert refused and done and isinstance(error, ConnectionRefusedError)
    assert run(go(True)) == (False, False, None)


# -- 3. a cancelled answer keeps the statistics measured so far ------------------------------------------------
def test_cancel_keeps_the_ttft_and_tokens_measured_so_far():
    """stats was None after cancel(): the TTFT already measured was lost."""

    async def slow(request):
        for i in range(1000):
            yield f"w{i} "
            await asyncio.sleep(0.005)

    async def go():
        async with served(slow) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            stream = conn.chat("go")
            read = []
            async with asyncio.timeout(T):
                async for delta in stream:
                    read.append(delta)
                    if len(read) == 3:
                        await stream.cancel()
            return stream, "".join(read)

    stream, text = run(go())
    stats = stream.stats
    assert stats is not None and stats.finish_reason == "cancelled" and stream.text.startswith(text)
    assert stats.tokens >= 3 and not math.isnan(stats.ttft_ms) and stats.ttft_ms > 0
    assert math.isnan(stats.stall_ratio) and not stats.digest_verified  # partial: no generation times, no digest
    assert "ended: cancelled" in str(stats) and "stall ratio n/a (cancelled" in str(stats)
    assert "MISMATCH" not in str(stats) and stats.to_dict()["stall_ratio"] is None


# -- 4. an answer generated at once has no stall ratio; the n/a says why -------------------------------------------
def _outcome(gen: list[float] | None, render: list[float], **kw) -> ChatOutcome:
    n = len(render)
    return ChatOutcome(tokens=[b"t"] * n, first_index=0, total=n, digest_ok=True, scheme="chatterbox",
                       request_id=b"r" * 16, finish_reason="stop", request_time=0.0, render_times=render,
                       gen_offsets=gen, packets=n, duplicate_tokens=0, repairs_requested=0, **kw)


def test_an_answer_generated_at_once_reports_no_stall_ratio():
    """1,000 tokens generated in 3 ms and carried over 300 ms read as a stall ratio near 1 (0.486 on loopback)."""
    n = 1000
    at_once = _outcome([i * 3e-6 for i in range(n)], [0.01 + 0.3 * i / n for i in range(n)])
    assert metrics.generated_at_once(at_once.gen_offsets)
    stats = stats_from_outcome(at_once)
    assert math.isnan(stats.stall_ratio) and math.isnan(stats.longest_stall_ms)
    assert not math.isnan(stats.p99_token_delay_ms) and not math.isnan(stats.ttft_ms)  # the transfer, measured
    assert "stall ratio n/a (generated at once, not streamed)" in str(stats)
    assert _report(at_once).stall_ratio is None  # nor counted in the daemon's client stall histogram
    # the same tokens streamed over a second, one held 300 ms (its followers rendered with it): a number, as before
    gen = [i / n for i in range(n)]
    streamed = _outcome(gen, [0.01 + max(g, 0.8 if 0.5 <= g <= 0.8 else 0) for g in gen])
    assert not metrics.generated_at_once(streamed.gen_offsets)
    assert stats_from_outcome(streamed).stall_ratio == pytest.approx(0.3 / 0.999)


def test_an_answer_from_a_source_that_never_awaits_has_no_stall_ratio_end_to_end():
    async def cached(request):
        for i in range(200):
            yield f"c{i} "

    async def go():
        async with served(cached) as server, connect("127.0.0.1", server.port, **client_kwargs()) as conn:
            stream = conn.chat("again")
            await asyncio.wait_for(stream.collect(), T)
            return stream

    stream = run(go())
    assert stream.stats is not None and stream.stats.tokens == 200 and stream.outcome.gen_offsets is not None
    assert math.isnan(stream.stats.stall_ratio) and "generated at once" in str(stream.stats)


def test_an_answer_over_the_generation_times_limit_says_so_not_resumed():
    """stats said "stall ratio n/a (resumed or attached, or no generation times)" for a fresh 250,000-token answer."""
    n = GEN_TIMES_MAX + 50_000
    stats = stats_from_outcome(_outcome(None, [0.01 + i * 1e-5 for i in range(n)]))
    assert math.isnan(stats.stall_ratio) and not math.isnan(stats.ttft_ms)
    assert "stall ratio n/a (over 200,000 tokens: the server sends no generation times for them)" in str(stats)
    assert "resumed" not in str(stats)
    resumed = stats_from_outcome(_outcome(None, [0.01] * 10, resumed=True))
    assert "stall ratio n/a (resumed or attached)" in str(resumed)
