"""What a probe writing its own client from docs/protocol.md found: a resume's TOKENS datagrams reach a client
before its STARTED (so `r` must be known without it: it is the request's stream id); NaN and infinities in `p`
passed the codec and reached an openai upstream as invalid JSON; a REQUEST that came with its FIN skipped the
token check; and after a reload revoked a token, another principal's token made the connection that principal's,
after which the revoked token was served again."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import ssl
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
from aioquic.asyncio import connect as connect_quic
from aioquic.buffer import Buffer
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import pull_quic_header
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.fuzzing import examples
from tokenwire.daemon.reload_decisions import REVOKED
from tokenwire.daemon.service import ANOTHER_PRINCIPAL, Daemon
from tokenwire.daemon.upstream_openai import OpenAIUpstream
from tokenwire.transport import tls
from tokenwire.transport.errors import ErrorCode, FrameError, RequestError
from tokenwire.transport.frames import (
    ALPN,
    Error,
    Request,
    Started,
    StreamDecoder,
    Tokens,
    check_outgoing,
    decode_datagram,
    decode_frame,
    encode_frame,
    encode_stream_frame,
)
from tokenwire.transport.server import ChatRequest
from tokenwire.transport.server_session import ServerSession
from tokenwire.transport.session_events import RequestReceived
from tokenwire.transport.transcript import Transcript

from .test_handshake_limits import until, value
from .test_hostile_clients import _Raw
from .test_loopback import run
from .test_openai_upstream import REQ, FakeOpenAI, generate
from .test_reload_fixes3 import _daemon  # (the daemon in this process, configured by a file a reload reads)

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
ALICE, BOB, BOB2 = "alice-token-for-doc-fixes", "bob-token-for-doc-fixes", "bob-second-token-for-doc-fixes"


# ------------------------------------------------------------------- 1: TOKENS may precede STARTED; r is the stream id
def _raw_client() -> QuicConnection:
    """A client on bare aioquic, configured as docs/protocol.md says (no SDK)."""
    cfg = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], max_datagram_frame_size=65535)
    cfg.verify_mode = ssl.CERT_NONE
    cfg.server_name = "localhost"
    return QuicConnection(configuration=cfg)


def test_a_resumes_first_tokens_carry_the_stream_id_and_may_come_before_started():
    """Sans-I/O: a resume of an answer with 40 tokens generated. aioquic writes DATAGRAM frames ahead of STREAM
    frames in a packet, so the backlog's TOKENS reach the client before STARTED, and QUIC's ack of that packet
    counts them delivered: a client that learned the handle from STARTED dropped them for good. The doc's rule (a
    TOKENS `r` is the stream id the client opened the request on) lets it keep every one."""
    client, now = _raw_client(), 0.0
    client.connect(("10.0.0.1", 4433), now=now)
    server: ServerSession | None = None
    answer = Transcript()
    for i in range(40):
        answer.extend(f"t{i} ", 0.0)
    order: list[tuple[str, Any]] = []  # what the client read, in order: ("dgram" | "stream", frame)
    decoder = StreamDecoder()
    sid = -1

    def pump() -> None:
        nonlocal server, now
        for _ in range(30):
            now += 0.005
            for data, _ in client.datagrams_to_send(now):
                if server is None:
                    cid = pull_quic_header(Buffer(data=data), host_cid_length=8).destination_cid
                    server = ServerSession(QuicConnection(configuration=tls.server_configuration(),
                                                          original_destination_connection_id=cid))
                for ev in server.receive_datagram(data, ("10.0.0.2", 1234), now):
                    if isinstance(ev, RequestReceived):  # the daemon's resume: its transcript from index 0
                        server.accept(ev.stream_id, transcript=answer, request_id=b"r" * 16, first_index=0)
            for data, _ in server.datagrams_to_send(now) if server is not None else ():
                client.receive_datagram(data, ("10.0.0.1", 4433), now)
            while (ev := client.next_event()) is not None:
                if isinstance(ev, qe.DatagramFrameReceived):
                    order.append(("dgram", decode_datagram(ev.data)))
                elif isinstance(ev, qe.StreamDataReceived) and ev.stream_id == sid:
                    order.extend(("stream", f) for f in decoder.feed(ev.data))

    pump()  # the handshake
    sid = client.get_next_available_stream_id()
    client.send_stream_data(sid, encode_stream_frame(Request(resume_id=b"r" * 16, resume_from=0)))
    pump()
    started = [i for i, (_, f) in enumerate(order) if isinstance(f, Started)]
    assert len(started) == 1 and order[started[0]][1].handle == sid  # STARTED's r: the stream id
    tokens = [f for _, f in order if isinstance(f, Tokens)]
    assert tokens and all(f.handle == sid for f in tokens)  # every TOKENS, before STARTED or after
    # keyed by its own stream id, the client has the whole backlog from the datagrams, REPAIR not needed
    held: dict[int, bytes] = {}
    for f in tokens:
        held.update(enumerate(f.tokens, f.first))
        if f.extra is not None:
            held.update(enumerate(f.extra[1], f.extra[0]))
    assert [held.get(i) for i in range(len(answer))] == answer.tokens


def test_the_protocol_doc_says_what_a_client_from_the_doc_needs():
    """The probe's doc gaps: the handle, TOKENS before STARTED, no length prefix on datagrams, whose clock `s` and
    `t0` are, what a small max_datagram_frame_size gets, and the client's own packet size for large datagrams."""
    doc = " ".join(DOC.read_text().split()).lower()
    for said in ("a TOKENS datagram may arrive before STARTED",
                 "no length prefix",
                 "`time.monotonic()`",
                 "below 313 bytes",
                 "`max_datagram_size`",
                 "NaN and ±infinity are refused",
                 "a connection keeps the principal of its first authorized request"):
        assert said.lower() in doc, said


# ------------------------------------------------------------------------------------- 2: non-finite parameters
def _request_with(params: dict[str, Any]) -> bytes:
    return encode_frame(Request(messages=[{"role": "user", "content": "x"}], params=params))


param_values = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8) | st.floats()


@settings(max_examples=examples(400), deadline=None)
@given(st.dictionaries(st.text(max_size=8), param_values, max_size=8))
@example({"temperature": math.nan})
@example({"top_p": math.inf, "seed": 1})
@example({"x": -math.inf})
def test_the_codec_refuses_non_finite_parameters_and_keeps_the_rest(params: dict[str, Any]):
    finite = all(not isinstance(v, float) or math.isfinite(v) for v in params.values())
    data = _request_with(params)
    if finite:
        frame = decode_frame(data)
        assert isinstance(frame, Request) and frame.params == params
        check_outgoing(frame, "request")
        return
    with pytest.raises(FrameError, match="must be a finite number") as info:
        decode_frame(data)
    assert info.value.code == ErrorCode.MALFORMED_FRAME  # as any other bad value: the connection closes
    with pytest.raises(ValueError, match="finite"):  # the SDK refuses it locally, before the server closes
        check_outgoing(Request(messages=[{"role": "user", "content": "x"}], params=params), "request")


@pytest.mark.parametrize("raw", [b"\xca\x7f\xc0\x00\x00", b"\xca\x7f\x80\x00\x00", b"\xcb\x7f\xf8" + bytes(6)])
def test_single_and_double_precision_nan_and_infinity_are_refused(raw: bytes):
    """msgpack float 32 (NaN, +inf) and float 64 (NaN) as another client's encoder writes them."""
    body = msgpack.packb({"t": 1, "v": 1, "m": [{"role": "user", "content": "x"}]})
    body = body[:1].replace(b"\x83", b"\x84") + body[1:] + b"\xa1p\x81\xa1t" + raw  # one key more: p = {t: x}
    with pytest.raises(FrameError, match="must be a finite number"):
        decode_frame(body)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_the_openai_body_builder_never_sends_a_non_finite_parameter(bad: float):
    """Whatever reaches it (the codec refuses them now), no path sends invalid JSON: the request is refused with
    BAD_REQUEST before anything is sent, where it went out as "temperature": NaN."""
    fake = FakeOpenAI()
    req = ChatRequest(messages=REQ.messages, model="m", max_tokens=None,
                      params={"temperature": bad, "top_p": 0.5}, scheme="chatterbox", request_id=b"x" * 16)
    with pytest.raises(RequestError) as info:
        generate(fake, "ok", req=req)
    assert info.value.code == ErrorCode.BAD_REQUEST and "temperature" in str(info.value)
    assert fake.seen == []


@settings(max_examples=examples(200), deadline=None)
@given(st.dictionaries(st.sampled_from(["temperature", "top_p", "seed", "n", "stop", "rate"]), param_values,
                       max_size=6))
@example({"temperature": math.nan, "seed": 7})
@example({"top_p": -math.inf, "rate": math.inf})
def test_every_body_the_openai_upstream_builds_is_strict_json(params: dict[str, Any]):
    def strict(name: str) -> None:
        raise AssertionError(f"{name} in the body")

    up = OpenAIUpstream("vllm", base_url="http://127.0.0.1:9/v1")
    req = ChatRequest(messages=REQ.messages, model="m", max_tokens=None, params=params, scheme="chatterbox",
                      request_id=b"x" * 16)
    try:
        body = up._body(req)
    except RequestError as exc:
        assert exc.code == ErrorCode.BAD_REQUEST
        assert any(isinstance(v, float) and not math.isfinite(v) for v in params.values())
        return
    sent = json.loads(body, parse_constant=strict)
    assert {k: v for k, v in sent.items() if k not in ("messages", "stream", "model")} == {
        k: v for k, v in params.items() if k != "rate"}


def test_the_openai_body_still_goes_as_json():
    """(The body is posted as bytes now: its Content-Type stays application/json.)"""
    fake = FakeOpenAI()
    generate(fake, "ok")
    assert fake.headers[0]["Content-Type"] == "application/json" and fake.seen[0]["temperature"] == 0.5


# ---------------------------------------------------------------------------------------------- 3 and 4: auth
def _config(*tokens: tuple[str, str]) -> str:
    entries = "".join(f'[[auth.tokens]]\nname = "{name}"\nsha256 = "{hashlib.sha256(tok.encode()).hexdigest()}"\n'
                      for name, tok in tokens)
    return '[server]\nlisten = ["127.0.0.1:0"]\n[metrics]\nlisten = ""\n' + entries


def _raw(daemon: Daemon):
    return connect_quic("127.0.0.1", daemon.addresses[0][1], create_protocol=_Raw,
                        configuration=tls.client_configuration(verify=False))


def _send(raw: _Raw, auth: str | None, *, fin: bool = False, **params: Any) -> int:
    """A REQUEST with token ``auth`` on a new stream (FIN with it when ``fin``); its stream id."""
    quic = raw._quic
    sid = quic.get_next_available_stream_id()
    request = Request(messages=[{"role": "user", "content": "x"}], auth=auth, max_tokens=params.pop("mt", 3),
                      params=params or None)
    quic.send_stream_data(sid, encode_stream_frame(request), end_stream=fin)
    raw.transmit()
    return sid


async def _answer(raw: _Raw, sid: int) -> Started | Error:
    """The server's first frame on ``sid``: STARTED or ERROR."""
    await until(lambda: bool(raw.frames.get(sid)) or raw._quic._close_event is not None, 10)
    first = raw.frames[sid][0]
    assert isinstance(first, Started | Error), first
    return first


def _close_of(raw: _Raw) -> qe.ConnectionTerminated:
    return next(e for e in raw.events if isinstance(e, qe.ConnectionTerminated))


def test_a_wrong_token_sent_with_its_fin_closes_the_connection_unauthorized(tmp_path: Path):
    """The REQUEST and its FIN in one read returned before the token check: a bare FIN, no close, log or count."""
    async def go():
        async with _daemon(tmp_path / "tw.toml", _config(("alice", ALICE))) as d, _raw(d) as raw:
            _send(raw, "wrong", fin=True)
            await asyncio.wait_for(raw.wait_closed(), 10)
            return _close_of(raw), value(d, "tokenwire_errors_total", {"code": hex(ErrorCode.UNAUTHORIZED)})

    closed, counted = run(go(), 30)
    assert closed.error_code == ErrorCode.UNAUTHORIZED and closed.reason_phrase == "missing or invalid auth token"
    assert counted == 1


def test_a_valid_token_sent_with_its_fin_authorizes_the_connection(tmp_path: Path):
    """The first request read is the first request: its valid token authorizes even though it was cancelled (the
    next one, without a token as the SDK sends it once answered, was closed "missing or invalid auth token")."""
    async def go():
        async with _daemon(tmp_path / "tw.toml", _config(("alice", ALICE))) as d, _raw(d) as raw:
            _send(raw, ALICE, fin=True)
            sid = _send(raw, None)
            return await _answer(raw, sid), [p.principal for p in d.protocols]

    answer, principals = run(go(), 30)
    assert isinstance(answer, Started) and principals == ["alice"]


def test_another_principals_token_is_refused_on_an_authorized_connection(tmp_path: Path):
    """Alice's connection: bob's valid token and a wrong token are refused (that request only); alice's other token
    and no token are served. The connection stays alice's."""
    async def go():
        text = _config(("alice", ALICE), ("alice", "alice-second-token"), ("bob", BOB))
        async with _daemon(tmp_path / "tw.toml", text) as d, _raw(d) as raw:
            out = [await _answer(raw, _send(raw, token))
                   for token in (ALICE, BOB, "wrong", "alice-second-token", None)]
            return out, [p.principal for p in d.protocols], raw._quic._close_event

    (alice, bob, wrong, second, none), principals, closed = run(go(), 30)
    assert isinstance(alice, Started) and isinstance(second, Started) and isinstance(none, Started)
    assert isinstance(bob, Error) and bob.code == ErrorCode.UNAUTHORIZED and bob.message == ANOTHER_PRINCIPAL
    assert isinstance(wrong, Error) and wrong.code == ErrorCode.UNAUTHORIZED
    assert principals == ["alice"] and closed is None


def test_after_a_revocation_another_principals_token_does_not_take_the_connection_over(tmp_path: Path):
    """The probe's sequence: bob's answer streams; a reload removes bob's token; a request with alice's token was
    served and the connection became alice's, and then one with bob's revoked token was served too. Now both are
    refused while bob's answer streams, and once it has ended alice's token closes the connection."""
    path = tmp_path / "tw.toml"

    async def go():
        async with _daemon(path, _config(("alice", ALICE), ("bob", BOB))) as d, _raw(d) as raw:
            streaming = _send(raw, BOB, mt=300, rate=20)  # 15 s of answer
            assert isinstance(await _answer(raw, streaming), Started)
            path.write_text(_config(("alice", ALICE)))
            assert d.reload()
            with_alice = await _answer(raw, _send(raw, ALICE))
            with_bob = await _answer(raw, _send(raw, BOB))
            principal = [p.principal for p in d.protocols]
            raw._quic.reset_stream(streaming, ErrorCode.CANCELLED)  # bob's answer ends: nothing streams any more
            raw.transmit()
            await until(lambda: not any(p.attached for p in d.protocols), 10)
            _send(raw, ALICE)
            await asyncio.wait_for(raw.wait_closed(), 10)
            return with_alice, with_bob, principal, _close_of(raw)

    with_alice, with_bob, principal, closed = run(go(), 60)
    assert isinstance(with_alice, Error) and with_alice.code == ErrorCode.UNAUTHORIZED
    assert with_alice.message == ANOTHER_PRINCIPAL
    assert isinstance(with_bob, Error) and with_bob.code == ErrorCode.UNAUTHORIZED and with_bob.message == REVOKED
    assert principal == ["bob"]
    assert closed.error_code == ErrorCode.UNAUTHORIZED and closed.reason_phrase == ANOTHER_PRINCIPAL


def test_a_revoked_connection_is_authorized_again_by_another_token_of_its_principal(tmp_path: Path):
    """(The rule's other side: a principal with two tokens, one revoked, proves itself with the other.)"""
    path = tmp_path / "tw.toml"

    async def go():
        async with _daemon(path, _config(("bob", BOB), ("bob", BOB2))) as d, _raw(d) as raw:
            assert isinstance(await _answer(raw, _send(raw, BOB)), Started)
            path.write_text(_config(("bob", BOB2)))
            assert d.reload()
            return await _answer(raw, _send(raw, BOB2)), [(p.principal, p.authorized) for p in d.protocols]

    answer, state = run(go(), 30)
    assert isinstance(answer, Started) and state == [("bob", True)]
