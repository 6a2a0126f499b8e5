"""The client side of ``testbed contention``: one process in the client namespace holding many SDK chats.

Started by :mod:`.contention` with a JSON spec as its only argument. It speaks JSON lines on stdout
(:class:`.child.Child`): ``{"connected": k, "connect_errors": [...]}`` once its connections are open, then it waits
for ``go`` on stdin so every worker's answers start together after the emulator's origin, reports
``{"progress": tokens}`` about once a second, writes its flows to the spec's ``out`` file and ends with
``{"done": true}``. Several such processes share the chats so that the clients' CPU is not one event loop's.

Every connection is opened before ``go``: the handshakes are not what is measured, and opening N at once
while other answers already stream would mix the two. They ping the server while they wait (the SDK's
``keepalive``, every third of the 60-s idle timeout): with many chats the connecting and the settling before ``go``
took up to ~40 s of silence, and a slower start would have ended them before their answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import Any

PROMPT = "Why do chatbots stall on trains?"
PROGRESS_S = 1.0
CONNECT_TIMEOUT_S = 30.0


def _emit(event: dict[str, Any]) -> None:
    print(json.dumps(event), flush=True)


def _local_port(conn: Any) -> int | None:
    """The connection's UDP port on the client: the packet log names each flow by it (its ``dport`` down).
    The SDK has no public accessor; None where the transport does not say."""
    with contextlib.suppress(Exception):
        return int(conn._protocol._transport.get_extra_info("sockname")[1])
    return None


def flow_record(index: int, port: int | None, handshake_s: float, stream: Any) -> dict[str, Any]:
    """One finished chat as the coordinator reads it: the SDK's statistics plus what token goodput needs."""
    rec: dict[str, Any] = {"flow": index, "port": port, "handshake_s": handshake_s}
    if stream.stats is not None:
        rec.update(stream.stats.to_dict())
    outcome = stream.outcome
    if outcome is not None:
        renders = outcome.render_times
        rec.update(request_time=outcome.request_time, tokens_rendered=len(renders),
                   first_render=renders[0] if renders else None, last_render=renders[-1] if renders else None)
    return rec


async def _run(spec: dict[str, Any]) -> None:
    from tokenwire.transport.client import connect

    n, first = int(spec["chats"]), int(spec["first"])
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:

        async def open_one() -> tuple[Any, float]:
            t0 = time.monotonic()
            conn = await stack.enter_async_context(
                connect(spec["host"], int(spec["port"]), cafile=spec["cafile"], server_name="localhost",
                        timeout=CONNECT_TIMEOUT_S, keepalive=True))
            return conn, time.monotonic() - t0

        opened = await asyncio.gather(*(open_one() for _ in range(n)), return_exceptions=True)
        conns = [(first + k, c) for k, c in enumerate(opened) if not isinstance(c, BaseException)]
        errors = [{"flow": first + k, "error": f"{type(c).__name__}: {c}"}
                  for k, c in enumerate(opened) if isinstance(c, BaseException)]
        _emit({"connected": len(conns), "connect_errors": errors})
        go = await loop.run_in_executor(None, sys.stdin.readline)
        if go.strip() != "go":
            return  # the coordinator gave up (its stdin closed): nothing to measure
        rendered = [0] * len(conns)

        async def one(slot: int, index: int, conn: Any, handshake_s: float) -> dict[str, Any]:
            port = _local_port(conn)
            stream = conn.chat(PROMPT, scheme=spec["scheme"], max_tokens=int(spec["tokens"]),
                               params={"rate": float(spec["rate"]), "seed": int(spec["seed"]) + index})
            try:
                async for _ in stream:
                    rendered[slot] = len(stream.tokens)
            except Exception as exc:  # a failed flow is a result of the run (a digest mismatch, an idle timeout)
                rec = flow_record(index, port, handshake_s, stream)
                rec["error"] = f"{type(exc).__name__}: {exc}"
                return rec
            return flow_record(index, port, handshake_s, stream)

        async def report() -> None:
            while True:
                await asyncio.sleep(PROGRESS_S)
                _emit({"progress": sum(rendered)})

        reporter = asyncio.create_task(report())
        timeout = float(spec["timeout"])
        try:
            flows = await asyncio.wait_for(
                asyncio.gather(*(one(k, i, c, hs) for k, (i, (c, hs)) in enumerate(conns))), timeout)
        except TimeoutError:  # the coordinator's error read "client worker 0: TimeoutError: " and nothing more
            raise TimeoutError(f"its {len(conns)} answers were not all in within {timeout:g} s "
                               f"({sum(rendered)} of {len(conns) * int(spec['tokens'])} tokens rendered)") from None
        finally:
            reporter.cancel()
        flows += [{**e, "port": None} for e in errors]
        with open(spec["out"], "w") as fh:
            json.dump({"flows": flows}, fh)
        _emit({"progress": sum(rendered)})
    _emit({"done": True})


def main(argv: list[str]) -> int:
    try:
        asyncio.run(_run(json.loads(argv[0])))
    except Exception as exc:  # one line for the coordinator's error, not a traceback it must parse
        _emit({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
