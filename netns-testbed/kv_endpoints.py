"""KV channel endpoints for ``tokenwire testbed kv``, one process per namespace, JSON lines on stdout.

``server``: the daemon's KV service on a local chunk store in a temporary directory; ingests the context's
KV from a ``.pt`` file (what an engine would put through the ingest API), encodes every level ahead
(``prewarm``: the evaluation measures delivery, not first-time encoding), then serves the KV channel with
ECT(1) marking and the Prague controller, like the daemon's ``[kv]`` defaults. Prints ``{"ready": ...}``.

Prints ``{"fetch_closed": {"levels", "complete", "decisions"}}`` after each fetch (the controller's inputs).

``client``: connects (prints ``{"connected": ...}``), then per stdin line ``{"controller", "deadline_ms"}``
runs one ``fetch_kv`` on that controller's own connection (opened on its first fetch; ``"conn"`` names
another) and prints ``{"result": report, "sent_at", "first_at", "last_at"}`` (host monotonic
clock, shared by all namespaces), or ``{"error": ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from typing import Any

from .endpoints import emit, stdin_reader


async def run_server(args: argparse.Namespace) -> int:
    import torch

    from tokenwire.daemon.kv_service import KVService
    from tokenwire.daemon.kv_store_local import LocalChunkStore
    from tokenwire.transport.kv_channel import ServerTuning, kv_congestion, serve_kv
    from tokenwire.transport.kv_controller import LEVELS
    from tokenwire.transport.marking import L4SPolicy

    ctx = torch.load(args.kv, weights_only=True)
    # beside the context file, in the evaluation's working folder: its owner removes that even when this
    # process is killed at teardown (a store in /tmp of its own was left behind by every run)
    with tempfile.TemporaryDirectory(prefix="tw-kvstore-", dir=os.path.dirname(os.path.abspath(args.kv))) as d:
        service = KVService(LocalChunkStore(d, 8 << 30), chunk_tokens=args.chunk_tokens)
        t0 = time.monotonic()
        await service.ingest(ctx["model"], ctx["ids"].tolist(), list(zip(ctx["k"], ctx["v"], strict=True)),
                             fingerprint=int(ctx["fingerprint"]), prewarm=LEVELS)
        tuning = ServerTuning(forecaster="onnx", prior_bps=args.prior_mbps * 1e6,
                              recompute_us_per_token=args.recompute_us_per_token).override(
            stale_factor=args.stale_factor, reserve=args.reserve, guard_weight=args.guard_weight,
            firm_guard_weight=args.firm_guard_weight, legacy_controller=args.legacy_controller)
        server = await serve_kv(service, args.host, args.port, congestion=kv_congestion("l4s"), marking=L4SPolicy,
                                tuning=tuning)
        # the controller's inputs per chunk, for the evaluation's per-fetch record (the client cannot see them)
        server.on_fetch_closed = lambda ev: emit({"fetch_closed": {"levels": ev.levels, "complete": ev.complete,
                                                                   "decisions": ev.decisions}})
        emit({"ready": True, "ingest_s": time.monotonic() - t0, "encodes": service.encodes})
        reader = await stdin_reader()
        while True:
            line = await reader.readline()
            if not line or line.strip() == b"stop":
                break
        server.close()
        service.close()
    emit({"stopped": True, "stats": server.stats})  # after the store is gone: the harness tears down on this
    return 0


async def run_client(args: argparse.Namespace) -> int:
    # One decode thread: on this 2-core host a parallel decoder (numba + torch pools) starves the client's
    # event loop and the emulator (measured: 40-50 ms per SmolLM2 256-token chunk on 1 thread, 110-400 ms
    # with 2 threads under load). A GPU engine decodes on the device instead.
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

    from tokenwire.transport.errors import TokenwireError
    from tokenwire.transport.kv_channel import connect_kv

    ctx = torch.load(args.kv, weights_only=True)
    ids = ctx["ids"].tolist()
    async with contextlib.AsyncExitStack() as stack:
        # one connection per controller: the server's forecasters live per connection, and a controller must
        # not start from what another one just measured on the same stretch of the trace (the rounds replay
        # one offset for every controller); its own previous fetch is from another offset, like a real gap
        conns: dict[str, Any] = {}

        async def conn_for(controller: str) -> Any:
            if controller not in conns or conns[controller].closed:  # new, or ended by QUIC's idle timeout
                conns[controller] = await stack.enter_async_context(
                    connect_kv(args.host, args.port, verify=False, ecn=True))
            return conns[controller]

        await conn_for("fixed-L1")
        emit({"connected": True})
        reader = await stdin_reader()
        while True:
            line = await reader.readline()
            if not line or line.strip() == b"stop":
                break
            req: dict[str, Any] = json.loads(line)
            conn = await conn_for(req.get("conn", req["controller"]))
            sent = time.monotonic()
            try:
                res = await conn.fetch_kv(model=ctx["model"], token_ids=ids, deadline_ms=int(req["deadline_ms"]),
                                          controller=req["controller"],
                                          recompute_us_per_token=args.recompute_us_per_token)
            except TokenwireError as exc:
                emit({"fetch_error": f"{type(exc).__name__}: {exc}", "code": int(exc.code),
                      "elapsed_s": time.monotonic() - sent, "sent_at": sent})
                continue
            rep = res.report
            first = min(c.first_byte_ms for c in rep.chunks)
            last = max(c.received_ms for c in rep.chunks)
            emit({"result": rep.to_dict(), "sent_at": sent, "first_at": sent + first / 1e3,
                  "last_at": sent + last / 1e3})
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tokenwire.testbed.kv_endpoints")
    p.add_argument("role", choices=("server", "client"))
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--kv", required=True, help=".pt file: model, fingerprint, ids, k[], v[]")
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--prior-mbps", type=float, default=5.0)
    p.add_argument("--recompute-us-per-token", type=int, default=2250)
    p.add_argument("--stale-factor", type=float)
    p.add_argument("--reserve", type=float)
    p.add_argument("--guard-weight", type=float)
    p.add_argument("--firm-guard-weight", type=float)
    p.add_argument("--legacy-controller", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(run_server(args) if args.role == "server" else run_client(args))
    except Exception as exc:
        emit({"error": f"{type(exc).__name__}: {exc}"})
        raise


if __name__ == "__main__":
    sys.exit(main())
