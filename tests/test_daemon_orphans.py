"""Answers nobody listens to: a probe's clients each opened 64 answers and vanished (four of them: 256 answers
generating to max_tokens for nobody, outside transcript_memory_mb, past max_sessions x max_requests as the
clients reconnected). An answer with no client for limits.orphan_timeout_s is now cancelled, and at most
limits.max_live_answers are generated at once."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from tokenwire.daemon.demo_upstream import answer_tokens
from tokenwire.transport.client import connect
from tokenwire.transport.errors import ErrorCode, RemoteError

from .daemon_proc import DaemonProcess
from .test_daemon import metric_value, metrics
from .test_loopback import run

VANISHING_CLIENT = """
import asyncio, sys
from tokenwire.transport.client import connect
async def main():
    async with connect("127.0.0.1", int(sys.argv[1]), cafile=sys.argv[2], server_name="localhost") as conn:
        stream = conn.chat("tell me", max_tokens=2000, params={"rate": 20})
        async for _ in stream:
            if len(stream.tokens) >= 5:
                rid, _ = stream.resume_point()
                print(rid.hex(), flush=True)
                await asyncio.sleep(3600)  # killed here: no QUIC close, the daemon just stops hearing it
asyncio.run(main())
"""


@pytest.fixture
def daemon(tmp_path):
    d = DaemonProcess(tmp_path, "[limits]\norphan_timeout_s = 1\nmax_live_answers = 2\n",
                      server_extra="idle_timeout_s = 1\n")
    yield d
    assert d.stop() == 0


def test_an_answer_with_no_client_for_the_orphan_timeout_is_cancelled_and_resumes_as_such(daemon, capsys):
    proc = subprocess.Popen([sys.executable, "-c", VANISHING_CLIENT, str(daemon.port), str(daemon.cert)],
                            stdout=subprocess.PIPE, text=True)
    with proc:  # (its stdout pipe closed at the end: left open, it was a ResourceWarning)
        try:
            rid = bytes.fromhex(proc.stdout.readline().strip())
        finally:
            proc.kill()
            proc.wait()
    t0 = time.monotonic()
    while metric_value(metrics(daemon), "tokenwire_requests_active") != 0:  # 100 s of answer left
        assert time.monotonic() - t0 < 15, "the answer still generates for a client that is gone"
        time.sleep(0.2)
    assert metric_value(metrics(daemon), "tokenwire_orphans_cancelled_total") == 1
    assert "no client for" in daemon.log()

    async def resume():
        async with connect("127.0.0.1", daemon.port, **daemon.client_kwargs()) as conn:
            stream = conn.chat("tell me", resume=(rid, []))
            await stream.collect()
            return stream

    stream = run(resume())
    assert stream.stats.finish_reason == "cancelled" and stream.stats.digest_verified
    assert 5 <= stream.stats.tokens < 2000 and "".join(answer_tokens(2000)).startswith(stream.text)
    assert ", ended: cancelled," in str(stream.stats)
    # tokenwire chat said nothing and exited 0: a cut answer read as a whole one
    from tokenwire.daemon.cli import main

    rc = main(["chat", "--port", str(daemon.port), "--cafile", str(daemon.cert), "--server-name", "localhost",
               "--attach", rid.hex()])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "the server cancelled this answer before its end" in err, err


def test_answers_past_max_live_answers_are_refused_until_one_ends(daemon):
    async def go():
        async with connect("127.0.0.1", daemon.port, **daemon.client_kwargs()) as conn:
            running = [conn.chat("long", max_tokens=2000, params={"rate": 20}) for _ in range(2)]
            for s in running:
                await s.__aenter__()
            with pytest.raises(RemoteError) as busy:
                await conn.chat("one more", max_tokens=5).collect()
            await running[0].__aexit__(None, None, None)  # cancelled: its slot frees once its task ends
            t0 = time.monotonic()
            while metric_value(await asyncio.to_thread(metrics, daemon), "tokenwire_requests_active") != 1:
                assert time.monotonic() - t0 < 10, "the cancelled answer is still generating"
                await asyncio.sleep(0.1)
            return busy.value, await conn.chat("one more", max_tokens=5).collect()

    busy, text = run(go())
    assert busy.code == ErrorCode.LIMIT_EXCEEDED and "2 answers being generated" in str(busy)
    assert text == "".join(answer_tokens(5))


def test_an_answer_cancelled_before_its_task_first_runs_ends_and_frees_its_slot():
    """The generation task's bookkeeping sat in a ``finally`` inside it: a task cancelled before its first step
    (the client's cancel read in the same loop turn as its request, as under load) never ran it, so the answer
    stayed unfinished and its task counted against max_live_answers for good (a test saw "server busy")."""
    import types

    from tokenwire.daemon.config import parse_config
    from tokenwire.daemon.service import Daemon
    from tokenwire.transport.frames import Request

    class Session:
        def __init__(self) -> None:
            self.requests = {0: types.SimpleNamespace(scheme="chatterbox")}

        def accept(self, sid, **kw) -> None:
            pass

        def notify(self, sid) -> None:
            pass

    class Proto:
        authorized, principal, revoked, peer = True, None, False, ("198.51.100.7", 9)
        peer_host = "198.51.100.7"  # (its answers count toward this client: limits.max_live_answers_per_client)

        def __init__(self) -> None:
            self.attached: dict = {}
            self.server_session = Session()

        def transmit(self) -> None:
            pass

    async def go():
        daemon = Daemon(parse_config({"metrics": {"listen": ""}}))
        proto = Proto()
        daemon.on_request(proto, 0, Request(messages=[{"role": "user", "content": "x"}], max_tokens=50))
        live = proto.attached[0]
        daemon.detach(proto, 0, cancel=True)  # before the task's first step
        for _ in range(3):
            await asyncio.sleep(0)
        active = daemon.metrics.requests_active._value.get()
        return daemon.answers.tasks, daemon.store.live_count, active, live

    tasks, live_count, active, live = asyncio.run(go())
    assert tasks == {} and live_count == 0 and active == 0
    assert live.done and live.transcript.reason == "cancelled"


def test_an_application_answer_nobody_reads_is_cancelled_and_its_app_told(tmp_path):
    """An ingest answer was never an orphan: a client that vanished, cancelled or never came left the
    application pushing for ever, every reply ok, to nobody (the orphan timeout ended only upstreams' answers)."""
    import json
    import socket

    d = DaemonProcess(tmp_path, '[limits]\norphan_timeout_s = 1\n[ingest]\nsocket = "ingest.sock"\n',
                      server_extra="idle_timeout_s = 1\n")
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(tmp_path / "ingest.sock"))
        f = s.makefile("rw")

        def call(msg):
            f.write(json.dumps(msg) + "\n")
            f.flush()
            return json.loads(f.readline())

        def push_until_refused(rid: str) -> dict:
            t0 = time.monotonic()
            while (reply := call({"op": "push", "id": rid, "text": " more"}))["ok"]:
                assert time.monotonic() - t0 < 15, "pushes to nobody still answered ok"
                time.sleep(0.1)
            return reply

        never = call({"op": "open"})["id"]  # opened, its id never given to a client
        assert push_until_refused(never)["error"] == ("this answer is already finished (cancelled: no client "
                                                      "attached for 1 s (limits.orphan_timeout_s))")
        left = call({"op": "open"})["id"]
        assert call({"op": "push", "id": left, "text": "Hello"})["ok"]

        async def attach_and_leave():
            async with connect("127.0.0.1", d.port, **d.client_kwargs()) as conn, \
                    conn.attach(bytes.fromhex(left)) as stream:
                async for _ in stream:
                    break  # the user pressed stop: the `async with` cancels the answer at the server

        run(attach_and_leave())
        assert push_until_refused(left)["error"] == ("this answer is already finished (cancelled: every client "
                                                     "attached to it cancelled it)")
        m = metrics(d)
        assert metric_value(m, 'tokenwire_ingest_answers_failed_total{reason="orphaned"}') == 1
        assert metric_value(m, 'tokenwire_ingest_answers_failed_total{reason="cancelled"}') == 1
        assert metric_value(m, "tokenwire_orphans_cancelled_total") == 1
        assert metric_value(m, "tokenwire_requests_active") == 0
        s.close()
    finally:
        assert d.stop() == 0
