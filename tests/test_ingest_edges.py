"""The ingest path's edges: text no client could be sent, a drain, principals no client can have, a hung
application, a finish reason on a terminal, socket paths ``config check`` must refuse, and what the log and
the metrics say of it all."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tokenwire.daemon.cli import main
from tokenwire.daemon.config import AuthConfig, ConfigError, IngestConfig, TokenEntry, parse_config
from tokenwire.daemon.ingest import (
    DEFAULT_STALL_TIMEOUT_S,
    FAILED_OUTCOMES,
    MAX_REASON_CHARS,
    IngestAPI,
    IngestConnection,
    check_paths,
    principal_problem,
    serve_ingest,
)
from tokenwire.daemon.service import Daemon
from tokenwire.daemon.startup import StartupError
from tokenwire.daemon.transcripts import TranscriptStore
from tokenwire.daemon.unix_sockets import MAX_PATH_BYTES as MAX_SOCKET_PATH_BYTES
from tokenwire.transport.client import connect
from tokenwire.transport.errors import ErrorCode, RemoteError
from tokenwire.transport.frames import Finished
from tokenwire.transport.server import serve

from .test_chat_cli import closed, stop_loop_thread
from .test_loopback import run

SURROGATE = "\ud83d"  # half of an emoji: JSON can carry it, UTF-8 cannot


def _api(**kw: Any) -> tuple[TranscriptStore, IngestAPI]:
    store = TranscriptStore(max_bytes=1 << 22, retain_s=10)
    return store, IngestAPI(store, max_tokens=lambda: 100, **kw)


def _open(api: IngestAPI, conn: IngestConnection, now: float = 0, **kw: Any) -> str:
    reply = api.handle({"op": "open", **kw}, conn, now)
    assert reply["ok"] is True, reply
    return reply["id"]


# ------------------------------------------------------------------------------ 1: text no client can be sent
def test_the_reason_limit_is_finisheds():
    check = Finished.FIELDS["fr"][1]
    assert check("finished", "fr", "r" * MAX_REASON_CHARS)
    with pytest.raises(Exception, match=str(MAX_REASON_CHARS)):
        check("finished", "fr", "r" * (MAX_REASON_CHARS + 1))


@pytest.mark.parametrize("op", [
    {"op": "fail", "message": f"model {SURROGATE} crashed"},
    {"op": "finish", "reason": SURROGATE},
    {"op": "finish", "reason": "\x1b[2Jstop"},  # a terminal escape: clients print the reason
    {"op": "finish", "reason": "stop\nFAKE LOG LINE"},
    {"op": "finish", "reason": "r" * (MAX_REASON_CHARS + 1)},
    {"op": "finish", "reason": ""},
])
def test_a_fail_message_or_finish_reason_no_client_could_be_sent_is_refused_and_the_answer_stays_open(op):
    """A lone surrogate in a fail's message or a finish's reason was accepted ({"ok": true}), then broke the
    QUIC connection of every attached client ("server error while sending") and every later attach."""
    store, api = _api()
    conn = IngestConnection()
    rid = _open(api, conn)
    reply = api.handle({**op, "id": rid}, conn, 0)
    assert reply["ok"] is False and reply["error"].split()[0] in ("message", "reason"), reply
    req = store.get(bytes.fromhex(rid))
    assert not req.done and rid in {r.hex() for r in conn.open}
    assert api.handle({"op": "finish", "id": rid, "reason": "r" * MAX_REASON_CHARS}, conn, 0)["ok"] is True


@pytest.mark.parametrize("key", ["model", "principal"])
def test_names_with_a_lone_surrogate_are_refused_at_open(key):
    store, api = _api()
    reply = api.handle({"op": "open", key: f"a{SURROGATE}"}, IngestConnection(), 0)
    assert reply == {"ok": False, "error": f"{key} is not valid Unicode (a lone surrogate)"}
    assert store.live_count == 0


@contextlib.asynccontextmanager
async def _daemon(tmp_path: Path, **sections: Any) -> AsyncIterator[Daemon]:
    """The daemon in this process, on a free loopback port, with an ingest socket."""
    doc: dict[str, Any] = {"server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": ""},
                           "ingest": {"socket": str(tmp_path / "ingest.sock")}}
    doc.update(sections)
    daemon = Daemon(parse_config(doc))
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


def test_a_frame_the_encoder_refuses_ends_that_request_alone(tmp_path, caplog):
    """Defence in depth (an upstream's finish reason can carry a lone surrogate too): the FINISHED that cannot be
    encoded used to close the client's whole connection (INTERNAL), or, sent at accept, raise out of
    on_request and leave the client hanging. Now that request gets INTERNAL and the others on its connection
    go on."""

    async def go() -> tuple[Any, ...]:
        async with _daemon(tmp_path) as daemon:
            store, now = daemon.store, time.monotonic()
            done_bad = store.create(None, 100, now)  # written straight to the store: ingest refuses such reasons
            done_bad.push("already ", now)
            done_bad.finish(SURROGATE, now)
            live_bad, good = store.create(None, 100, now), store.create(None, 100, now)
            async with connect("127.0.0.1", daemon.addresses[0][1], verify=False) as conn:
                async with asyncio.timeout(10):
                    with pytest.raises(RemoteError) as at_accept:
                        _ = [t async for t in conn.attach(done_bad.request_id)]
                    bad_stream, good_stream = conn.attach(live_bad.request_id), conn.attach(good.request_id)
                    live_bad.push("a", now)
                    good.push("b", now)
                    assert await bad_stream.__anext__() == "a" and await good_stream.__anext__() == "b"
                    live_bad.finish(SURROGATE, now)  # while attached: the notify path
                    with pytest.raises(RemoteError) as attached:
                        _ = [t async for t in bad_stream]
                    good.push("c", now)
                    good.finish("stop", now)
                    rest = "".join([t async for t in good_stream])
                    return at_accept.value, attached.value, rest, good_stream.stats

    at_accept, attached, rest, stats = run(go(), timeout=30)
    assert at_accept.code == ErrorCode.INTERNAL and attached.code == ErrorCode.INTERNAL
    assert rest == "c" and stats.digest_verified
    assert "sending its start failed" in caplog.text


# ------------------------------------------------------------------------------------------------- 2: drain
async def _connect(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(str(path), limit=1 << 22)


async def _send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, msg: dict[str, Any]) -> dict[str, Any]:
    writer.write(json.dumps(msg).encode() + b"\n")
    await writer.drain()
    return json.loads(await asyncio.wait_for(reader.readline(), 10))


def _sample(daemon: Daemon, name: str, **labels: str) -> float:
    return daemon.metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_drain_refuses_opens_lets_pushes_go_on_and_ends_with_a_line_the_app_can_read(tmp_path):
    """An open during a drain was {"ok": true} though every attach got SHUTTING_DOWN, and at the drain's end the
    application's connection was cut with no reply at all."""

    async def go() -> tuple[Any, ...]:
        async with _daemon(tmp_path) as daemon:
            reader, writer = await _connect(tmp_path / "ingest.sock")
            rid = (await _send(reader, writer, {"op": "open"}))["id"]
            daemon.draining = True  # what drain() sets first; it ends with stop()
            refused = await _send(reader, writer, {"op": "open"})
            pushed = await _send(reader, writer, {"op": "push", "id": rid, "text": "still going"})
            await daemon.stop()
            last = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return refused, pushed, last, daemon.store.get(bytes.fromhex(rid)), _sample(
                daemon, "tokenwire_ingest_answers_failed_total", reason="drain")

    refused, pushed, last, req, drained = run(go(), timeout=30)
    assert refused == {"ok": False, "error": "daemon shutting down"}
    assert pushed == {"ok": True, "tokens": 1}
    assert json.loads(last) == {"ok": False, "error": "daemon shutting down: 1 open answer failed"}
    assert req.error is not None and "daemon stopped" in req.error[1] and drained == 1


# ------------------------------------------------------------------------------ 3: principals nobody can have
def _auth(*names: str) -> AuthConfig:
    return AuthConfig(tuple(TokenEntry(n, "0" * 64) for n in names))


@pytest.mark.parametrize("principal, auth, certificates, ok", [
    ("alice", _auth("alice"), False, True),
    (None, _auth("alice"), False, False),  # auth on: every client has a token's name
    ("bob", _auth("alice"), False, False),
    ("cert:carol", _auth("alice"), True, False),  # with tokens a certificate's name gives way to the token's
    ("cert:carol", AuthConfig(), True, True),
    ("carol", AuthConfig(), True, False),
    (None, AuthConfig(), True, False),  # client_ca: every client has a certificate
    (None, AuthConfig(), False, True),
    ("alice", AuthConfig(), False, False),  # auth off: clients have no principal
])
def test_principal_problem(principal, auth, certificates, ok):
    assert (principal_problem(principal, auth, certificates=certificates) is None) is ok


def test_open_checks_the_principal_against_the_tokens_in_force_after_a_reload():
    """Such an open was {"ok": true}, then every attach got NOT_FOUND "unknown or expired request id"."""
    token = {"name": "alice", "sha256": "0" * 64}
    daemon = Daemon(parse_config({"metrics": {"listen": ""}, "auth": {"tokens": [token]}}))
    store, api = _api(refuse_open=daemon._ingest_refusal)
    conn = IngestConnection()
    _open(api, conn, principal="alice")
    bob = api.handle({"op": "open", "principal": "bob"}, conn, 0)
    assert bob["ok"] is False and "'bob' is not the name of an auth token" in bob["error"]
    assert "principal required" in api.handle({"op": "open"}, conn, 0)["error"]
    # a SIGHUP that adds bob (Daemon._reload swaps the auth in)
    daemon.config = dataclasses.replace(daemon.config, auth=_auth("alice", "bob"))
    _open(api, conn, principal="bob")
    daemon.config = dataclasses.replace(daemon.config, auth=AuthConfig())  # and one that turns auth off
    assert "auth is off" in api.handle({"op": "open", "principal": "alice"}, conn, 0)["error"]
    _open(api, conn)
    assert store.live_count == 3


# -------------------------------------------------------------------------------------- 4: a hung application
def test_an_answer_with_no_op_for_the_stall_timeout_fails_with_upstream_timeout():
    """A hung application held its attached clients for ever: nothing ended an ingest answer."""
    outcomes: list[str] = []
    store, api = _api(stall_timeout_s=10, on_done=lambda r, outcome: outcomes.append(outcome))
    conn = IngestConnection()
    rid, other = _open(api, conn, now=0), _open(api, conn, now=0)
    api.handle({"op": "push", "id": rid, "text": "x"}, conn, 5)
    api.handle({"op": "push", "id": other, "text": ""}, conn, 8)  # an empty push is a sign of life too
    assert api.expire_stalled(14.9) == 0
    assert api.expire_stalled(15) == 1 and outcomes == ["stalled"]
    req = store.get(bytes.fromhex(rid))
    assert req.error is not None and req.error[0] == ErrorCode.UPSTREAM_TIMEOUT and "stall_timeout_s" in req.error[1]
    later = api.handle({"op": "push", "id": rid, "text": "y"}, conn, 16)
    assert later["ok"] is False and "timed out" in later["error"]
    assert api.expire_stalled(18) == 1 and api.live_count == 0 and not conn.open


def test_stall_timeout_s_is_an_ingest_setting_the_daemon_uses(tmp_path):
    assert parse_config({}).ingest.stall_timeout_s == DEFAULT_STALL_TIMEOUT_S == 300
    assert parse_config({"ingest": {"stall_timeout_s": 5}}).ingest.stall_timeout_s == 5
    with pytest.raises(ConfigError, match=r"ingest\.stall_timeout_s"):
        parse_config({"ingest": {"stall_timeout_s": 0}})

    async def go() -> float:
        async with _daemon(tmp_path, ingest={"socket": str(tmp_path / "ingest.sock"), "stall_timeout_s": 7}) as d:
            assert d._ingest_api is not None
            return d._ingest_api.stall_timeout_s

    assert run(go(), timeout=30) == 7


# --------------------------------------------------------------------------------- 5: chat --stats, printable
@pytest.fixture()
def escaping_server() -> Iterator[int]:
    """An SDK server whose answers end with a finish reason made of terminal escapes and a line break."""

    async def source(request):
        request.finish_reason = "\x1b]0;pwned\x07\nFAKE"
        yield "hi"

    loop = asyncio.new_event_loop()
    holder: dict[str, Any] = {}

    async def start() -> None:
        holder["server"] = await serve(source, host="127.0.0.1", port=0)

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    yield holder["server"].port
    stop_loop_thread(loop, thread, lambda: closed(holder["server"]))  # (its UDP socket and loop closed, not leaked)


def test_chat_stats_prints_the_servers_finish_reason_escaped(escaping_server, capsys):
    rc = main(["chat", "--port", str(escaping_server), "--insecure", "--stats", "hello"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.strip() == "hi"
    assert "\x1b" not in err and "\x07" not in err and "\\x1b]0;pwned\\x07\\nFAKE" in err
    assert len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------------------- 6: socket paths, config
def _problems(path: Path) -> list[str]:
    return check_paths(IngestConfig(socket=path))[0]


def test_config_check_finds_the_socket_paths_the_daemon_would_refuse(tmp_path):
    """`config check` said ok for each of these, and the daemon refused to start."""
    assert _problems(tmp_path / "ingest.sock") == [] and check_paths(IngestConfig()) == ([], [])
    missing = tmp_path / "no" / "ingest.sock"
    assert _problems(missing) == [f"ingest.socket: cannot listen on {missing}: no such folder"]
    (tmp_path / "file").write_text("")
    under_file = tmp_path / "file" / "ingest.sock"
    assert _problems(under_file) == [f"ingest.socket: cannot listen on {under_file}: not a folder"]
    in_the_way = tmp_path / "file"
    assert _problems(in_the_way) == [
        f"ingest.socket: cannot listen on {in_the_way}: something other than a socket is in the way"]
    long = tmp_path / ("x" * (MAX_SOCKET_PATH_BYTES - len(str(tmp_path))))
    size = len(str(long))
    assert size > MAX_SOCKET_PATH_BYTES
    assert _problems(long) == [f"ingest.socket: cannot listen on {long}: path of {size} bytes, over a Unix "
                               f"socket's {MAX_SOCKET_PATH_BYTES}"]
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:  # a socket there is the running daemon's as often as not, and a stale one is replaced at start
        live.bind(str(tmp_path / "live.sock"))
        live.listen()
        assert _problems(tmp_path / "live.sock") == []
    finally:
        live.close()
    assert (tmp_path / "live.sock").is_socket() and in_the_way.read_text() == ""  # nothing removed


def test_the_daemon_refuses_a_socket_path_too_long_with_the_same_line(tmp_path):
    long = tmp_path / ("x" * (MAX_SOCKET_PATH_BYTES - len(str(tmp_path))))
    cfg = parse_config({"server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": ""},
                        "ingest": {"socket": str(long)}})

    async def go() -> str:
        with pytest.raises(StartupError) as info:
            await Daemon(cfg).start()
        return str(info.value)

    assert [run(go(), timeout=30)] == check_paths(cfg.ingest)[0]


def test_an_ingest_upstream_needs_the_ingest_socket():
    """Without one no application can open its answers, and every chat request routed to it is refused."""
    doc: dict[str, Any] = {"upstreams": [{"name": "app", "type": "ingest"}, {"name": "demo", "type": "demo"}],
                           "routes": [{"model": "app*", "upstream": "app"}, {"upstream": "demo"}]}
    with pytest.raises(ConfigError, match=r"^ingest\.socket: required by the ingest upstream 'app'"):
        parse_config(doc)
    assert parse_config({**doc, "ingest": {"socket": "/run/tokenwire/ingest.sock"}}).ingest.socket is not None


# ----------------------------------------------------------------------------------------- 7: observability
def test_ingest_answers_are_counted_by_outcome_and_attaches_apart_from_resumes(tmp_path):
    """Attaches counted as resumes, and nothing counted how ingest answers ended."""

    async def go() -> tuple[Daemon, dict[str, float]]:
        async with _daemon(tmp_path) as daemon:
            path = tmp_path / "ingest.sock"
            gone_r, gone_w = await _connect(path)
            await _send(gone_r, gone_w, {"op": "open"})
            gone_task = set(daemon._ingest_clients)  # that connection's
            reader, writer = await _connect(path)
            finished = (await _send(reader, writer, {"op": "open"}))["id"]
            await _send(reader, writer, {"op": "push", "id": finished, "text": "hello"})
            async with connect("127.0.0.1", daemon.addresses[0][1], verify=False) as conn:
                async with asyncio.timeout(10):
                    with pytest.raises(ValueError, match="32 hex digits, as ingest's open returns them"):
                        conn.attach(finished[:-1] + "g")
                    stream = conn.attach(finished)  # the hex id as open returns it (was: bytes only)
                    first = await stream.__anext__()
                    again = conn.attach(bytes.fromhex(finished), held=[first.encode()])  # a reconnect's resume
                    await _send(reader, writer, {"op": "finish", "id": finished})
                    assert [t async for t in again] == []
            failed = (await _send(reader, writer, {"op": "open"}))["id"]
            await _send(reader, writer, {"op": "fail", "id": failed, "message": "model crashed"})
            gone_w.close()
            await asyncio.wait_for(asyncio.gather(*gone_task), 5)
            stalled = (await _send(reader, writer, {"op": "open"}))["id"]
            assert daemon._ingest_api is not None
            daemon._ingest_api.expire_stalled(time.monotonic() + DEFAULT_STALL_TIMEOUT_S)
            later = await _send(reader, writer, {"op": "push", "id": stalled, "text": "x"})
            assert "timed out" in later["error"]
            await _send(reader, writer, {"op": "open"})  # left open: failed when the daemon stops
            await daemon.stop()
            writer.close()
            names = {
                "opened": ("tokenwire_ingest_answers_opened_total", {}),
                "finished": ("tokenwire_ingest_answers_finished_total", {}),
                "attaches": ("tokenwire_attaches_total", {}),
                "resumes": ("tokenwire_resumes_total", {}),
                **{r: ("tokenwire_ingest_answers_failed_total", {"reason": r}) for r in FAILED_OUTCOMES},
            }
            return daemon, {k: _sample(daemon, n, **labels) for k, (n, labels) in names.items()}

    daemon, counts = run(go(), timeout=30)
    assert counts == {"opened": 5, "finished": 1, "attaches": 1, "resumes": 1, "app_failed": 1, "app_gone": 1,
                      "stalled": 1, "drain": 1, "cancelled": 0, "orphaned": 0}
    assert daemon.metrics.requests_active._value.get() == 0


def test_an_app_connection_that_ends_with_answers_open_is_one_log_line(tmp_path, caplog):
    caplog.set_level(logging.INFO, "tokenwire.ingest")
    done: list[str] = []
    all_done = asyncio.Event()

    def on_done(req: Any, outcome: str) -> None:
        done.append(outcome)
        if len(done) == 3:
            all_done.set()

    _store, api = _api(on_done=on_done)
    ids: list[str] = []

    async def go() -> None:
        server = await serve_ingest(tmp_path / "ingest.sock", api)
        reader, writer = await _connect(tmp_path / "ingest.sock")
        for _ in range(3):
            ids.append((await _send(reader, writer, {"op": "open"}))["id"])
        writer.close()
        await asyncio.wait_for(all_done.wait(), 5)
        server.close()

    run(go(), timeout=30)
    lines = [r.getMessage() for r in caplog.records if r.name == "tokenwire.ingest"]
    # one line, naming them as the app_failed and stalled lines do
    assert lines == [f"ingest: 3 open answers failed: the application disconnected before finishing "
                     f"({', '.join(ids)}); more such connections are counted and summed up at most every minute"]
    assert done == ["app_gone"] * 3


def test_open_ingest_answers_count_toward_max_live_answers(tmp_path):
    """Ingest answers are never evicted and did not count: any number of connections could hold them."""

    async def go() -> tuple[Any, ...]:
        async with _daemon(tmp_path, limits={"max_live_answers": 2}) as daemon:
            reader, writer = await _connect(tmp_path / "ingest.sock")
            other_r, other_w = await _connect(tmp_path / "ingest.sock")
            first = (await _send(reader, writer, {"op": "open"}))["id"]
            await _send(other_r, other_w, {"op": "open"})
            busy = await _send(reader, writer, {"op": "open"})
            async with connect("127.0.0.1", daemon.addresses[0][1], verify=False) as conn:
                with pytest.raises(RemoteError) as chat_busy:
                    async with asyncio.timeout(10):
                        _ = [t async for t in conn.chat("hello")]
            await _send(reader, writer, {"op": "finish", "id": first})
            room = await _send(reader, writer, {"op": "open"})
            writer.close()
            other_w.close()
            return busy, chat_busy.value, room

    busy, chat_busy, room = run(go(), timeout=30)
    assert busy["ok"] is False and busy["error"].startswith("server busy: 2 answers") and "max_live_answers" in \
        busy["error"]
    assert chat_busy.code == ErrorCode.LIMIT_EXCEEDED and "2 answers being generated" in str(chat_busy)
    assert room["ok"] is True


def test_an_answer_whose_only_client_failed_while_sending_is_left_to_the_orphan_timeout(tmp_path):
    """Sending failing now ends that request alone, not its connection: the answer it streamed, with no other
    client, went on generating to max_tokens for nobody, never marked for the orphan timeout."""
    from tokenwire.transport.client import connect

    async def go() -> tuple[Any, ...]:
        daemon: Daemon
        async with _daemon(tmp_path) as daemon, connect("127.0.0.1", daemon.addresses[0][1], verify=False) as conn:
            stream = conn.chat("tell me", max_tokens=2000, params={"rate": 50})
            await asyncio.wait_for(stream.__anext__(), 10)
            proto = next(iter(daemon.protocols))

            def broken(sid: int) -> None:
                raise RuntimeError("this connection's packet path broke")

            proto.server_session.notify = broken
            with pytest.raises(RemoteError) as info:
                async with asyncio.timeout(10):
                    async for _ in stream:
                        pass
            rid = stream.resume_point()[0]
            return info.value.code, rid in daemon.answers.tasks, rid in daemon.answers.orphaned

    code, generating, orphaned = run(go(), timeout=30)
    assert code == ErrorCode.INTERNAL and generating and orphaned
