"""Server and client processes of one scheme, run inside the testbed namespaces by the compare harness.

::

    python -m tokenwire.testbed.endpoints server --scheme S --host H --port P --out F [--cc cubic]
    python -m tokenwire.testbed.endpoints client --scheme S --host H --port P --out F \
        --tokens N --rate R --seed S

Control is line-based JSON on stdout and plain commands on stdin, so the harness waits on real events:
the server prints ``{"ready": ...}`` once it listens and stops on ``stop``/EOF (then writes the generation
times of every request it served to ``--out``); the client connects, prints ``{"connected": true}``, waits
for ``go``, streams one answer printing ``{"progress": k}`` now and then, writes its timeline to ``--out``
and prints its final ``{"progress": k}`` and ``{"done": ...}``.

Each scheme is a pair of coroutines in :data:`SCHEMES`; the QUIC ones come from the transport SDK.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

QUIC_SCHEMES = ("chatterbox", "stream", "duplicate")
ALL_SCHEMES = (*QUIC_SCHEMES, "sse-tcp")


class SchemeUnavailable(RuntimeError):
    """The scheme's implementation is not importable in this checkout."""


class EndpointFailed(RuntimeError):
    """The run failed for a reason one line says (the harness reports it as the error, not a traceback)."""


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


class Server:
    """What the harness needs from a scheme's server: start, stop, and per-request generation times."""

    requests: list[dict[str, Any]]
    port: int | None

    async def start(self, host: str, port: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    async def stop(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


ClientFn = Callable[..., Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class SchemeImpl:
    make_server: Callable[[argparse.Namespace], Server]
    client: ClientFn


def _sse_server(args: argparse.Namespace) -> Server:
    from .sse import SseServer

    return SseServer(cc=args.cc)  # type: ignore[return-value]


async def _sse_client(args: argparse.Namespace, go: Callable[[], Awaitable[None]],
                      progress: Callable[[int], None]) -> dict[str, Any]:
    import aiohttp

    from .sse import sse_client

    try:
        return await sse_client(args.host, args.port, n=args.tokens, rate=args.rate, seed=args.seed, go=go,
                                progress=progress, timeout=args.timeout)
    except TimeoutError as exc:  # aiohttp's connect and total timeouts (`--loss iid:1`): as the QUIC client says
        raise EndpointFailed("no answer before the deadline" + (f" ({exc})" if str(exc) else "")) from None
    except aiohttp.ClientError as exc:
        raise EndpointFailed(f"{exc.__class__.__name__}: {exc}") from None


class QuicServer(Server):
    """The tokenwire SDK server (:func:`tokenwire.transport.server.serve`) fed by :class:`PacedTokens`."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.requests = []
        self.port = None
        self._server: Any = None
        self.marking_info: dict[str, Any] = {}

    async def start(self, host: str, port: int) -> None:
        from tokenwire.transport.server import serve

        from .tokens import PacedTokens, answer

        args = self.args

        def source(request: Any) -> PacedTokens:
            tokens = PacedTokens(*answer(args.tokens, args.rate, args.seed))
            self.requests.append({"gen": tokens.gen_times, "request_arrival": time.monotonic(),
                                  "scheme": request.scheme})
            return tokens

        marking = None
        congestion = "reno"
        if args.marking:
            from .swiftqueue_netns import endpoint_policy_factory

            marking, congestion, self.marking_info = endpoint_policy_factory(args)
        self._server = await serve(source, host=host, port=port, marking=marking, congestion=congestion)
        self.port = self._server.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()


def _quic_server(args: argparse.Namespace) -> Server:
    return QuicServer(args)


async def _quic_client(args: argparse.Namespace, go: Callable[[], Awaitable[None]],
                       progress: Callable[[int], None]) -> dict[str, Any]:
    """Connect (handshake before the measured request), wait for go, stream one answer with the SDK."""
    from tokenwire.transport.errors import TokenwireError

    try:
        return await _quic_answer(args, go, progress)
    except TokenwireError as exc:
        # the SDK's typed failures (idle timeout, refused, reset) in one line, as sse-tcp's: they ended the
        # client with a traceback, which the harness squeezed into its error line
        raise EndpointFailed(f"{exc.__class__.__name__}: {exc}") from None


async def _quic_answer(args: argparse.Namespace, go: Callable[[], Awaitable[None]],
                       progress: Callable[[int], None]) -> dict[str, Any]:
    from tokenwire.transport.client import connect

    async with connect(args.host, args.port, verify=False, timeout=30.0, ecn=bool(args.marking)) as conn:
        await go()
        stream = conn.chat("Why do chatbots stall on trains?", scheme=args.scheme)
        reads: list[tuple[float, int]] = []  # (when the reader got a delta, characters it has read by then)
        chars = 0
        async for delta in stream:
            chars += len(delta)
            reads.append((time.monotonic(), chars))  # stamped where sse-tcp's reader stamps its events
            progress(len(stream.tokens))
        outcome = stream.outcome
        assert outcome is not None and stream.stats is not None
        if outcome.first_index != 0:
            raise RuntimeError(f"{args.scheme}: answer resumed at token {outcome.first_index}, expected 0")
        return {
            "request_time": outcome.request_time,
            "render": reader_times(stream.tokens, reads),
            "sdk_render": list(outcome.render_times),
            "text": stream.text,
            "digest_ok": outcome.digest_ok,
            "sdk_stats": stream.stats.to_dict(),
        }


def reader_times(tokens: list[bytes], reads: list[tuple[float, int]]) -> list[float]:
    """When the application's reader had each token's text: the first read whose characters cover it (a token that
    ends inside a character, with the token that completes it).

    The render instant of every scheme is its reader's: sse-tcp stamps an event when its line reaches the reader.
    The SDK's own ``render_times`` are stamped in the connection's event handling, before the client's
    acknowledgements go out and the reader's task runs: taken as the QUIC schemes' render, they were earlier than
    sse-tcp's by that much. Tokens after the last read (none in a whole answer) are left out."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    out: list[float] = []
    k = covered = waiting = 0
    # (the last piece flushes a character the answer left unfinished: the SDK ends it as U+FFFD too)
    for token, final in [*((token, False) for token in tokens), (b"", True)]:
        text = decoder.decode(token, final)
        waiting += not final
        if not text or not waiting:
            continue  # part of a character: visible with the rest of it
        covered += len(text)
        while k < len(reads) and reads[k][1] < covered:
            k += 1
        if k == len(reads):
            break
        out.extend([reads[k][0]] * waiting)
        waiting = 0
    return out


SCHEMES: dict[str, SchemeImpl] = {
    "sse-tcp": SchemeImpl(_sse_server, _sse_client),
    **{name: SchemeImpl(_quic_server, _quic_client) for name in QUIC_SCHEMES},
}


def write_json(path: str, obj: Any) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh)


async def run_server(args: argparse.Namespace) -> int:
    impl = SCHEMES[args.scheme]
    server = impl.make_server(args)
    await server.start(args.host, args.port)
    emit({"ready": True, "port": server.port})
    reader = await stdin_reader()
    while True:
        line = await reader.readline()
        if not line or line.strip() == b"stop":
            break
    await server.stop()
    write_json(args.out, {"requests": server.requests, "marking": getattr(server, "marking_info", {})})
    emit({"stopped": True, "requests": len(server.requests)})
    return 0


async def run_client(args: argparse.Namespace) -> int:
    impl = SCHEMES[args.scheme]
    reader = await stdin_reader()

    async def go() -> None:
        emit({"connected": True})
        while True:
            line = await reader.readline()
            if not line:
                raise SystemExit("harness went away before 'go'")
            if line.strip() == b"go":
                return

    last = [0.0]

    def progress(k: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.25:
            last[0] = now
            emit({"progress": k})

    try:
        result = await impl.client(args, go, progress)
    except EndpointFailed as exc:
        emit({"error": str(exc)})
        return 1
    write_json(args.out, result)
    # the final count, unthrottled: the harness's last progress line read "55/60 tokens rendered (92%)" for a run
    # that rendered all 60 (the last count within 0.25 s of the one before was never sent)
    emit({"progress": len(result["render"])})
    emit({"done": True, "rendered": len(result["render"])})
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tokenwire.testbed.endpoints")
    p.add_argument("role", choices=("server", "client"))
    p.add_argument("--scheme", choices=ALL_SCHEMES, required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--rate", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cc", default="cubic", help="TCP congestion control of the sse-tcp server")
    p.add_argument("--timeout", type=float, default=600.0)
    # per-packet ECN marking of the QUIC schemes (tokenwire testbed swiftqueue); the client then reads codepoints
    p.add_argument("--marking", choices=("classic", "l4s", "swiftqueue", "oracle"), default=None)
    p.add_argument("--oracle-file", help="the emulator's shared (L, C) estimate, for --marking oracle")
    p.add_argument("--model", help="swiftqueue: ONNX latency model (default: the shipped one)")
    p.add_argument("--margin-ms", type=float, default=1.0)
    p.add_argument("--hysteresis-ms", type=float, default=3.0)
    p.add_argument("--probe-interval", type=float, default=0.0)
    p.add_argument("--no-refuge-rule", dest="refuge_only", action="store_false")
    p.add_argument("--marking-log", help="write the server's per-policy decision counts here (JSON)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(run_server(args) if args.role == "server" else run_client(args))
    except SchemeUnavailable as exc:
        emit({"error": str(exc), "unavailable": True})
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
