"""The ``sse-tcp`` baseline: tokens as HTTP server-sent events over kernel TCP, the way chatbots stream today.

Server (aiohttp): ``GET /chat?n=N&rate=R&seed=S`` answers ``text/event-stream`` and writes one event per
token as it is generated::

    data: {"i": 17, "g": 1234.567890, "t": " token"}

followed by ``event: done``. ``g`` is the generation time on the host's monotonic clock. aiohttp sets
TCP_NODELAY on its connections, as production servers do, so each event leaves when written. The listening
socket is created here with the requested congestion control (``TCP_CONGESTION``), which accepted
connections inherit.

Client (aiohttp): opens the connection with a ``GET /health`` first (so the measured request does not pay
the TCP handshake, like a chat page that is already open), then reads the stream and stamps each event when
its line is complete.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .tokens import PacedTokens, answer


def listening_socket(host: str, port: int, cc: str | None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if cc:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
    sock.bind((host, port))
    sock.listen(16)
    sock.setblocking(False)
    return sock


class SseServer:
    """aiohttp application serving token streams; ``requests`` keeps each request's generation times."""

    def __init__(self, cc: str | None = "cubic") -> None:
        self.cc = cc
        self.requests: list[dict[str, Any]] = []
        self._runner: Any = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/chat", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = listening_socket(host, port, self.cc)
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _health(self, request: Any) -> Any:
        from aiohttp import web

        return web.Response(text="ok")

    async def _chat(self, request: Any) -> Any:
        from aiohttp import web

        arrival = time.monotonic()
        try:
            n = int(request.query.get("n", "100"))
            rate = float(request.query.get("rate", "20"))
            seed = int(request.query.get("seed", "0"))
        except ValueError:
            raise web.HTTPBadRequest(text="n, rate and seed must be numbers") from None
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        sock = request.transport.get_extra_info("socket") if request.transport else None
        cc = None
        if sock is not None:
            cc = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()
        tokens = PacedTokens(*answer(n, rate, seed))
        record = {"gen": tokens.gen_times, "n": n, "cc": cc, "request_arrival": arrival}
        self.requests.append(record)
        i = 0
        async for text in tokens:
            event = json.dumps({"i": i, "g": tokens.gen_times[-1], "t": text})
            await resp.write(f"data: {event}\n\n".encode())
            i += 1
        await resp.write(b"event: done\ndata: {}\n\n")
        await resp.write_eof()
        return resp


async def sse_client(
    host: str,
    port: int,
    *,
    n: int,
    rate: float,
    seed: int,
    go: Callable[[], Awaitable[None]],
    progress: Callable[[int], None] | None = None,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Warm the connection up, wait for ``go()``, then stream one answer; returns render times etc."""
    import aiohttp

    base = f"http://{host}:{port}"
    conn = aiohttp.TCPConnector(limit=1, force_close=False)
    client_timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=10)
    async with aiohttp.ClientSession(connector=conn, timeout=client_timeout) as session:
        async with session.get(base + "/health") as r:
            await r.read()
        await go()
        request_time = time.monotonic()
        render: list[float] = []
        gen: list[float] = []
        texts: list[str] = []
        async with session.get(base + "/chat", params={"n": n, "rate": rate, "seed": seed}) as resp:
            resp.raise_for_status()
            event = ""
            while True:
                line = await resp.content.readline()
                if not line:
                    break
                now = time.monotonic()
                text = line.decode().rstrip("\r\n")
                if text.startswith("event:"):
                    event = text[6:].strip()
                elif text.startswith("data:") and event != "done":
                    data = json.loads(text[5:])
                    if data["i"] != len(render):
                        raise RuntimeError(f"SSE token {data['i']} arrived out of order")
                    render.append(now)
                    gen.append(float(data["g"]))
                    texts.append(data["t"])
                    if progress is not None:
                        progress(len(render))
                elif text == "" and event == "done":
                    break
    return {"request_time": request_time, "render": render, "gen": gen, "text": "".join(texts)}
