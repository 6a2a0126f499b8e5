"""Ingest defects an application developer's probe found: open answers past ``limits.transcript_memory_mb``, a
socket connectable before its mode was set, an application that never reads its replies blamed for sending
nothing, ``cert:`` principals no certificate has, and the messages a reconnecting or failing app gets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tokenwire.daemon import unix_sockets
from tokenwire.daemon.certificates import cert_principal
from tokenwire.daemon.config import MAX_PRINCIPAL_CHARS, AuthConfig
from tokenwire.daemon.ingest import (
    IngestAPI,
    IngestConnection,
    OpenRefusal,
    is_cert_principal,
    principal_problem,
    serve_ingest,
)
from tokenwire.daemon.transcripts import (
    REQUEST_OVERHEAD_BYTES,
    TOKEN_OVERHEAD_BYTES,
    GenerationLimit,
    TranscriptStore,
)
from tokenwire.daemon.upstreams import IngestUpstream
from tokenwire.transport.errors import ErrorCode

from .test_ingest_edges import _daemon  # (the daemon in this process, with an ingest socket)
from .test_loopback import run

TOKEN = "t" * 256  # one token of 256 bytes: REQUEST's memory grows by 256 + TOKEN_OVERHEAD_BYTES per push
PER_TOKEN = 256 + TOKEN_OVERHEAD_BYTES


def _api(max_bytes: int = 1 << 22, **kw: Any) -> tuple[TranscriptStore, IngestAPI]:
    store = TranscriptStore(max_bytes=max_bytes, retain_s=600)
    return store, IngestAPI(store, max_tokens=lambda: 100_000, **kw)


def _open(api: IngestAPI, conn: IngestConnection, now: float = 0, **kw: Any) -> str:
    reply = api.handle({"op": "open", **kw}, conn, now)
    assert reply["ok"] is True, reply
    return str(reply["id"])


def _live_sum(store: TranscriptStore) -> int:
    return sum(r.memory_bytes for r in store._live.values())


# ------------------------------------------------------------------ 1: open answers within transcript_memory_mb
def test_a_push_past_the_memory_bound_is_refused_and_the_answer_stays_open():
    """One app connection with 150 open answers held 750 MB against a 256 MiB bound: pushes were never checked."""
    bound = REQUEST_OVERHEAD_BYTES + 10 * PER_TOKEN
    store, api = _api(bound)
    conn = IngestConnection()
    rid = _open(api, conn)
    for _ in range(10):
        assert api.handle({"op": "push", "id": rid, "text": TOKEN}, conn, 1)["ok"] is True
    assert store.live_bytes == bound == store.memory_bytes
    refused = api.handle({"op": "push", "id": rid, "text": "x"}, conn, 2)
    assert refused["ok"] is False and "limits.transcript_memory_mb" in refused["error"], refused
    assert "stays open" in refused["error"] and f"needs {1 + TOKEN_OVERHEAD_BYTES} bytes" in refused["error"]
    req = store.get(bytes.fromhex(rid))
    assert req is not None and not req.done and len(req.transcript) == 10 and store.live_bytes == bound
    # an open past it is refused too (it costs memory as well), and the app can still end its answer
    assert "limits.transcript_memory_mb" in api.handle({"op": "open"}, conn, 3)["error"]
    assert api.handle({"op": "finish", "id": rid}, conn, 4) == {"ok": True, "tokens": 10}
    # the finished answer yields to a new open one (finished answers are evicted oldest first)
    other = _open(api, conn, 5)
    assert api.handle({"op": "push", "id": other, "text": TOKEN}, conn, 5)["ok"] is True
    store.evict(6)
    assert store.get(bytes.fromhex(rid)) is None and store.memory_bytes <= bound


def test_open_answers_no_longer_push_a_just_finished_answer_out():
    """80 open answers over the bound made housekeeping evict an answer finished 2.5 s before, and its client's
    attach got "unknown or expired request id". Now the open ones stop at the bound (their app is told), and an
    answer that was let in stays until it expires."""
    room = REQUEST_OVERHEAD_BYTES + 2 + TOKEN_OVERHEAD_BYTES  # the small answer below: open, push "hi"
    bound = REQUEST_OVERHEAD_BYTES + 13 * 8 * PER_TOKEN + room + 10  # (less than an 8-token push left over)
    store, api = _api(bound)
    big, small = IngestConnection(), IngestConnection()
    filler = _open(api, big)
    refused = None
    for _ in range(200):
        reply = api.handle({"op": "push", "id": filler, "text": TOKEN * 8}, big, 1)
        if not reply["ok"]:
            refused = reply
            break
    assert refused is not None and "limits.transcript_memory_mb" in refused["error"]
    rid = _open(api, small, 2)
    assert api.handle({"op": "push", "id": rid, "text": "hi"}, small, 2)["ok"] is True
    assert api.handle({"op": "finish", "id": rid}, small, 2)["ok"] is True
    store.evict(4.5)
    assert store.get(bytes.fromhex(rid)) is not None and store.evicted == 0
    assert store.memory_bytes <= bound


def test_the_live_total_follows_every_way_an_answer_grows_and_ends():
    """The running total the push check reads (summing every answer at each push was O(answers) a token) must be
    what the answers hold: ingest pushes, cuts, fails, finishes and the upstreams' own pushes alike."""
    store, api = _api()
    conn = IngestConnection()
    a, b, c = _open(api, conn, model="m" * 50), _open(api, conn, principal=None), _open(api, conn)
    api.handle({"op": "push", "id": a, "text": "é" * 700}, conn, 1)
    api.handle({"op": "push", "id": b, "text": "x" * 300}, conn, 1)
    upstream = store.create("alice", 3, 1, model="demo")  # an upstream's answer: pushed to directly
    upstream.push("hello", 1)
    assert store.live_bytes == _live_sum(store)
    with pytest.raises(GenerationLimit):  # cut at its max_tokens: what fitted counts
        upstream.push("y" * 2000, 2)
    assert store.live_bytes == _live_sum(store)
    api.handle({"op": "fail", "id": b}, conn, 3)
    api.handle({"op": "finish", "id": c}, conn, 3)
    upstream.finish("length", 3)
    store.mark_finished(upstream)
    assert store.live_bytes == _live_sum(store)
    store.discard(store._live[bytes.fromhex(a)])
    assert store.live_bytes == 0 == _live_sum(store)
    upstream.push("more", 4)  # done: adds nothing, and nothing is counted for an answer no longer live
    assert store.live_bytes == 0


def test_growth_is_what_a_push_adds():
    store, _ = _api()
    req = store.create(None, 5, 0)
    for text in ("", "a", "é" * 200, "z" * 1000, "y" * 5000):
        before, expected = req.memory_bytes, req.growth(text)
        with contextlib.suppress(GenerationLimit):
            req.push(text, 0)
        assert req.memory_bytes - before == expected, text


# ---------------------------------------------------------------- 2: no connect before the socket's access is set
@pytest.fixture()
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_the_ingest_socket_accepts_no_connection_before_its_mode_and_group_are_set(tmp_path, monkeypatch, umask_000):
    """asyncio bound and listened, then the mode was set: under umask 000 a user outside the group connected in
    between and opened an answer. Now the socket listens only once its mode and group are set."""
    path = tmp_path / "ingest.sock"
    seen: list[tuple[str, int]] = []
    real = unix_sockets.set_socket_access

    def set_access(at: Path, group: str | None, setting: str) -> None:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(at))
            seen.append(("connected", 0))
        except OSError as exc:
            seen.append((type(exc).__name__, stat.S_IMODE(at.stat().st_mode)))
        finally:
            probe.close()
        real(at, group, setting)

    monkeypatch.setattr(unix_sockets, "set_socket_access", set_access)
    _store, api = _api()

    async def go() -> tuple[int, int, dict[str, Any]]:
        server = await serve_ingest(path, api, group=str(os.getegid()))
        try:
            st = path.stat()
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(b'{"op": "open"}\n')
            reply = json.loads(await asyncio.wait_for(reader.readline(), 10))
            writer.close()
            return stat.S_IMODE(st.st_mode), st.st_gid, reply
        finally:
            server.close()

    mode, gid, reply = run(go(), timeout=30)
    assert seen == [("ConnectionRefusedError", 0o777)]  # umask 000's mode, yet nobody could connect
    assert (mode, gid) == (0o660, os.getegid()) and reply["ok"] is True


def test_a_socket_whose_access_cannot_be_set_is_removed_and_never_listened_on(tmp_path, monkeypatch):
    path = tmp_path / "kv-ingest.sock"

    def refuse(at: Path, group: str | None, setting: str) -> None:
        raise OSError(1, f"{setting}: cannot give the socket to group {group!r}", str(at))

    monkeypatch.setattr(unix_sockets, "set_socket_access", refuse)

    async def go() -> None:
        async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        await unix_sockets.serve(path, client, limit=1024, group="nogroup", setting="kv.ingest_socket_group")

    with pytest.raises(OSError, match="cannot give the socket"):
        run(go(), timeout=30)
    assert not path.exists() and not path.is_symlink()


# ---------------------------------------------------------------- 3: an application that never reads its replies
def test_a_connection_the_daemon_waits_to_write_to_is_timed_out_for_not_reading():
    """The stall timer said "the application sent nothing for 3 s" of an app that pushed on and never read: the
    daemon, blocked writing a reply, had stopped reading its ops. Its answers' clocks count from that wait."""
    store, api = _api(stall_timeout_s=10)
    blocked, quiet = IngestConnection(), IngestConnection()
    old, fresh, idle = _open(api, blocked, now=0), _open(api, blocked, now=0), _open(api, quiet, now=0)
    api.handle({"op": "push", "id": fresh, "text": "x"}, blocked, 5)
    blocked.writing_since = 5  # its reply to that push is not read
    assert api.expire_stalled(10) == 1  # the quiet connection's
    assert api.expire_stalled(14.9) == 0  # the older answer too: its ops may sit unread behind that reply
    assert api.expire_stalled(15) == 2
    for rid, says in ((old, "did not read its replies"), (fresh, "did not read its replies"), (idle, "sent nothing")):
        req = store.get(bytes.fromhex(rid))
        assert req is not None and req.error is not None and req.error[0] == ErrorCode.UPSTREAM_TIMEOUT
        assert says in req.error[1] and "10 s" in req.error[1], req.error
    later = api.handle({"op": "push", "id": old, "text": "y"}, blocked, 16)
    assert "timed out: the application did not read its replies" in later["error"]


async def _until(check: Any, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


def test_an_app_that_never_reads_its_replies_is_told_so_not_that_it_sent_nothing(tmp_path):
    """Over the socket: an app pushes without reading a reply until the daemon blocks writing to it."""
    store, api = _api(stall_timeout_s=3)
    path = tmp_path / "ingest.sock"

    async def go() -> tuple[str, Any]:
        server = await serve_ingest(path, api)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        writer.write(b'{"op": "open"}\n')
        rid = json.loads(await asyncio.wait_for(reader.readline(), 10))["id"]
        conn = api._open[bytes.fromhex(rid)][0]
        push = json.dumps({"op": "push", "id": rid, "text": ""}).encode() + b"\n"
        writer.write(push * 100_000)  # ~6 MB of ops, 2.6 MB of replies the app never reads: the daemon blocks
        await _until(lambda: conn.writing_since is not None, 30)
        failed = api.expire_stalled(time.monotonic() + 3)
        req = store.get(bytes.fromhex(rid))
        writer.transport.abort()
        server.close()
        assert failed == 1 and req is not None and req.error is not None
        return req.error[1], conn

    why, _conn = run(go(), timeout=60)
    assert why.startswith("the application did not read its replies for 3 s (ingest.stall_timeout_s)"), why


# ------------------------------------------------------------------------- 4: cert: principals a client can have
@pytest.mark.parametrize("name", [
    "carol", "", "CN with spaces, O=Org", "ca~rol", "bad\x1bname", "x" * 123, "x" * 124, "é" * 300,
    "~" * 200, "a?b\nc", "y" * 106 + "~",
])
def test_every_principal_a_certificate_can_have_may_be_opened_for(name):
    principal = cert_principal(name)
    assert is_cert_principal(principal), principal
    assert principal_problem(principal, AuthConfig(), certificates=True) is None


@pytest.mark.parametrize("principal", [
    "cert:ca~rol",  # the probe's: '~' only ever comes before 16 hex digits
    "cert:carol~0123456789abcdef",  # the shortened form of a name that needed no shortening
    "cert:ca~rol~0123456789ABCDEF",  # upper-case digits: cert_principal writes lower-case hex
    "cert:ca~rol~0123456789abcde",  # 15 digits
    "cert:bad\x1bname",  # unprintable: a certificate's shows as '?'
    "cert:" + "x" * (MAX_PRINCIPAL_CHARS - 4),  # too long
    "carol", "cert", "CERT:carol",
])
def test_cert_principals_no_certificate_can_have_are_refused(principal):
    assert not is_cert_principal(principal)
    problem = principal_problem(principal, AuthConfig(), certificates=True)
    assert problem is not None and "cert" in problem


def test_an_open_for_such_a_principal_is_refused_with_client_ca():
    def refuse(principal):
        problem = principal_problem(principal, AuthConfig(), certificates=True)
        return None if problem is None else OpenRefusal("principal", problem)

    store, api = _api(refuse_open=refuse)
    reply = api.handle({"op": "open", "principal": "cert:ca~rol"}, IngestConnection(), 0)
    assert reply["ok"] is False and "not one a client certificate can have" in reply["error"]
    assert "cert_principal" in reply["error"] and store.live_count == 0


# --------------------------------------------------------------------------------------------- 5, 6, 7: messages
def test_the_ingest_upstreams_refusal_of_a_request_naming_no_model():
    """`tokenwire chat` with no model, routed to the ingest upstream, said "model None is served by ..."."""
    said = IngestUpstream("app").refusal(None, {})
    assert said is not None and "None" not in said and "naming no model" in said and "'app'" in said
    named = IngestUpstream("app").refusal("my-app", {})
    assert named is not None and named.startswith("model 'my-app' is served by an application")


def test_an_answer_belongs_to_its_connection_and_the_message_says_so():
    """An app reconnecting after a crash pushed to its old id: "unknown id, or not opened on this connection"."""
    _store, api = _api()
    first, second = IngestConnection(), IngestConnection()
    rid = _open(api, first)
    elsewhere = api.handle({"op": "push", "id": rid, "text": "x"}, second, 1)
    assert elsewhere["ok"] is False and "open on another connection" in elsewhere["error"]
    assert "only the connection that opened an answer" in elsewhere["error"]
    api.disconnected(first, 2)  # the app crashed
    again = api.handle({"op": "push", "id": rid, "text": "x"}, second, 3)
    assert again["ok"] is False and "belongs to the connection that opened it" in again["error"]
    assert "fails when that connection closes" in again["error"]


@pytest.mark.parametrize("fail", [{"message": ""}, {"message": None}, {}])
def test_a_fail_with_an_empty_message_is_a_fail_with_none(fail):
    """"" gave clients a bare error, null "application failed"."""
    store, api = _api()
    conn = IngestConnection()
    rid = _open(api, conn)
    assert api.handle({"op": "fail", "id": rid, **fail}, conn, 1) == {"ok": True}
    req = store.get(bytes.fromhex(rid))
    assert req is not None and req.error == (ErrorCode.UPSTREAM_ERROR, "application failed")


def test_the_start_up_line_and_status_name_the_ingest_socket(tmp_path):
    """READY's STATUS and the start-up line named the QUIC ports only: where the app connects was not said."""

    async def go() -> tuple[str, str]:
        async with _daemon(tmp_path) as daemon:
            return daemon.ready_status(), daemon.status_line()

    ready, periodic = run(go(), timeout=30)
    assert f"; ingest on unix:{tmp_path / 'ingest.sock'}" in ready and ready.startswith("listening on udp/127.0.0.1:")
    assert f"ingest on unix:{tmp_path / 'ingest.sock'}; 0 sessions" in periodic
