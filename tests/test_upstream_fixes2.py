"""The ``openai`` upstream against answers a real server or proxy may give: surrogate halves, a key source that
yields nothing, an HTML page with status 200, Retry-After, the SSE line rules, content after the finish."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from tokenwire.daemon.config import parse_config
from tokenwire.daemon.upstream_openai import EVENT_LINE_LIMIT, OpenAIUpstream, _EventStream
from tokenwire.daemon.upstreams import build_upstreams
from tokenwire.transport.errors import ErrorCode, RequestError

from .test_loopback import run
from .test_openai_upstream import FAST, REQ, _serve, chunk, daemon_on

UNSET = "TW_FIXES2_NO_SUCH_KEY"  # an environment variable no test sets


def ev(obj: object) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def raw_content(escaped: str) -> bytes:
    """An event whose content is ``escaped`` as JSON text (``\\ud83d``: a lone surrogate, valid JSON)."""
    return b'data: {"choices":[{"index":0,"delta":{"content":"' + escaped.encode() + b'"}}]}\n\n'


DONE = b"data: [DONE]\n\n"
FINISH = ev(chunk(None, finish="stop"))


@dataclass
class Canned:
    """One HTTP answer: its status and headers, the body's pieces written in order, and whether the body is then
    held open (never ended) until the test's server is cleaned up."""

    pieces: list[bytes] = field(default_factory=list)
    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "text/event-stream"})
    hold: bool = False


class CannedServer:
    """Serves /v1/chat/completions; a request's model names its :class:`Canned` answer."""

    def __init__(self, answers: dict[str, Canned]) -> None:
        self.answers = answers
        self.headers: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.headers.append(dict(request.headers))
        canned = self.answers[body.get("model") or ""]
        resp = web.StreamResponse(status=canned.status, headers=canned.headers)
        await resp.prepare(request)
        for piece in canned.pieces:
            await resp.write(piece)
        if canned.hold:
            await asyncio.Event().wait()  # cancelled when the runner is cleaned up
        return resp


def ask(canned: Canned, **opts) -> tuple[list[str], str]:
    """The pieces emitted and the finish reason: each piece stored as the daemon stores it (UTF-8)."""
    server = CannedServer({"small": canned})

    async def go():
        runner, port = await _serve(server)  # type: ignore[arg-type]  # (any object with .handle)
        up = OpenAIUpstream("vllm", base_url=f"http://127.0.0.1:{port}/v1", **opts)
        out: list[str] = []

        def emit(piece: str) -> None:
            piece.encode("utf-8")  # what LiveRequest.push does: a lone surrogate raised here
            out.append(piece)

        try:
            return out, await up.generate(REQ, emit)
        finally:
            await up.close()
            await runner.cleanup()

    return run(go(), timeout=30)


def failure(canned: Canned, **opts) -> RequestError:
    with pytest.raises(RequestError) as info:
        ask(canned, **{**FAST, **opts})
    str(info.value).encode("utf-8")  # sent to clients with msgpack, logged: it must encode
    return info.value


# ------------------------------------------------------------------------------------ 1. lone surrogates
def test_an_emoji_split_into_surrogate_halves_over_two_events_is_joined():
    """A proxy slicing by UTF-16 unit sends ``"\\ud83d"`` then ``"\\ude00 end"`` (valid JSON): the half failed
    the answer with a UnicodeEncodeError traceback where the transcript stored it."""
    out, reason = ask(Canned([ev(chunk("smile ")), raw_content("\\ud83d"), raw_content("\\ude00 end"), FINISH, DONE]))
    assert "".join(out) == "smile \U0001f600 end" and reason == "stop"


@pytest.mark.parametrize("pieces, text", [
    ([raw_content("a \\ud800 b")], "a \ufffd b"),  # a lone high one inside a piece
    ([raw_content("x\\udfff")], "x\ufffd"),  # a lone low one
    ([raw_content("x\\ud83d"), ev(chunk("y"))], "x\ufffdy"),  # held for a low one that did not come
    ([raw_content("end \\ud83d")], "end \ufffd"),  # held at the answer's end: made U+FFFD then
], ids=["high", "low", "unpaired", "at_the_end"])
def test_a_surrogate_that_stays_unpaired_becomes_the_replacement_character(pieces, text):
    out, reason = ask(Canned([*pieces, FINISH, DONE]))
    assert "".join(out) == text and reason == "stop"


def test_a_lone_surrogate_in_a_json_answer_becomes_the_replacement_character():
    body = b'{"choices":[{"index":0,"message":{"content":"a \\ud800 b"},"finish_reason":"stop"}]}'
    out, _ = ask(Canned([body], headers={"Content-Type": "application/json"}))
    assert out == ["a \ufffd b"]


@pytest.mark.parametrize("canned, text", [
    (Canned([b'{"error": {"message": "bad \\ud800 thing"}}'], status=500,
            headers={"Content-Type": "application/json"}), "HTTP 500: bad \ufffd thing"),
    (Canned([ev(chunk("Hi")), b'data: {"error": {"message": "mid \\udfff x"}}\n\n']), "mid \ufffd x"),
    (Canned([ev(chunk("Hi")), b'event: error\ndata: {"message": "ev \\ud83d"}\n\n']), "ev \ufffd"),
], ids=["http_error", "error_object_in_the_stream", "error_event"])
def test_an_error_message_with_a_lone_surrogate_is_encodable(canned, text):
    """The upstream's message went to the client as it was: the daemon's msgpack refused it with a traceback."""
    err = failure(canned)
    assert err.code == ErrorCode.UPSTREAM_ERROR and str(err) == f"upstream 'vllm': {text}"


# ------------------------------------------------------------------------ 2. a key source that yields nothing
UNAUTHORIZED = Canned([b'{"error": {"message": "Incorrect API key provided"}}'], status=401,
                      headers={"Content-Type": "application/json"})


def test_a_401_says_that_no_key_was_sent_and_why(tmp_path, monkeypatch):
    """An unset api_key_env or an empty api_key_file sent no Authorization header; the user saw only the 401."""
    monkeypatch.delenv(UNSET, raising=False)
    err = failure(UNAUTHORIZED, api_key_env=UNSET)
    assert str(err) == (f"upstream 'vllm': HTTP 401: Incorrect API key provided; no API key was sent: ${UNSET} "
                        "is unset")
    monkeypatch.setenv(UNSET, " ")
    assert str(failure(UNAUTHORIZED, api_key_env=UNSET)).endswith(f"; no API key was sent: ${UNSET} is empty")
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    forbidden = Canned([b"<html>Forbidden</html>"], status=403, headers={"Content-Type": "text/html"})
    err = failure(forbidden, api_key_file=empty)
    assert str(err) == "upstream 'vllm': HTTP 403, text/html page: Forbidden; no API key was sent: the API key file " \
                       "is empty"  # (clients are not told the daemon's file names)
    # the note survives the cut to 300 characters: the upstream's words are what is shortened
    long = Canned([json.dumps({"error": {"message": "x" * 400}}).encode()], status=401,
                  headers={"Content-Type": "application/json"})
    assert str(failure(long, api_key_file=empty)).endswith("x; no API key was sent: the API key file is empty")


def test_a_401_with_a_key_sent_or_none_configured_has_no_note(monkeypatch):
    monkeypatch.setenv(UNSET, "sk-set")
    assert str(failure(UNAUTHORIZED, api_key_env=UNSET)) == "upstream 'vllm': HTTP 401: Incorrect API key provided"
    assert str(failure(UNAUTHORIZED)) == "upstream 'vllm': HTTP 401: Incorrect API key provided"


def _config(tmp_path, keys: str) -> str:
    path = tmp_path / "tw.toml"
    path.write_text(f'[server]\nlisten = ["127.0.0.1:0"]\n[[upstreams]]\nname = "vllm"\ntype = "openai"\n'
                    f'base_url = "https://h/v1"\n{keys}\n')
    return str(path)


def test_config_check_warns_about_a_key_source_that_yields_nothing(tmp_path, capsys, monkeypatch):
    """``config check`` said ok. A warning, not an error: it runs in the operator's environment, not the
    daemon's (the unit's EnvironmentFile= may set the variable)."""
    from tokenwire.daemon.cli import main

    monkeypatch.delenv(UNSET, raising=False)
    assert main(["config", "check", _config(tmp_path, f'api_key_env = "{UNSET}"')]) == 0
    err = capsys.readouterr().err
    assert f"warning: upstreams[0].api_key_env: ${UNSET} is unset here: upstream 'vllm' would be sent no API " \
           "key (its server may answer 401)\n" in err
    empty = tmp_path / "empty.key"
    empty.write_text("")
    empty.chmod(0o600)
    assert main(["config", "check", _config(tmp_path, f'api_key_file = "{empty}"')]) == 0
    assert f"warning: upstreams[0].api_key_file: {empty} is empty: upstream 'vllm'" in capsys.readouterr().err
    monkeypatch.setenv(UNSET, "sk-set")
    assert main(["config", "check", _config(tmp_path, f'api_key_env = "{UNSET}"')]) == 0
    assert "warning" not in capsys.readouterr().err


def test_the_daemons_start_warns_about_a_key_source_that_yields_nothing(tmp_path, monkeypatch, caplog):
    """The daemon started without a word; it builds its upstreams at start, and each such one is a warning."""
    monkeypatch.delenv(UNSET, raising=False)
    empty = tmp_path / "empty.key"
    empty.write_text("")

    def upstream(keys: dict) -> dict:
        return {"type": "openai", "base_url": "http://127.0.0.1:1/v1", **keys}

    cfg = parse_config({"upstreams": [{"name": "a", **upstream({"api_key_env": UNSET})},
                                      {"name": "b", **upstream({"api_key_file": str(empty)})},
                                      {"name": "c", **upstream({})}]})
    with caplog.at_level(logging.WARNING, logger="tokenwire.daemon"):
        build_upstreams(cfg)
    assert [r.getMessage() for r in caplog.records] == [
        f"upstream 'a': ${UNSET} is unset (api_key_env): its requests carry no API key, and its server may "
        "answer 401",
        f"upstream 'b': {empty} is empty (api_key_file): its requests carry no API key, and its server may answer "
        "401"]


def test_end_to_end_the_daemon_warns_at_start_and_the_client_hears_why(tmp_path, monkeypatch):
    """Through the daemon: the start's warning in its log, and the 401's note (and a surrogate's U+FFFD) reach
    the client; no traceback."""
    from tokenwire.transport.client import connect
    from tokenwire.transport.errors import RemoteError

    monkeypatch.delenv(UNSET, raising=False)
    server = CannedServer({"small": UNAUTHORIZED, "emoji": Canned([raw_content("\\ud83d"), raw_content("\\ude00!"),
                                                                   raw_content(" \\udc00"), FINISH, DONE])})
    with daemon_on(server, tmp_path, f'api_key_env = "{UNSET}"') as d:  # type: ignore[arg-type]

        async def go():
            async with connect("127.0.0.1", d.port, **d.client_kwargs()) as conn:
                with pytest.raises(RemoteError) as refused:
                    await conn.chat("hi", model="small").collect()
                return refused.value, await conn.chat("hi", model="emoji").collect()

        refused, text = run(go())
        log = d.log()
    assert refused.code == ErrorCode.UPSTREAM_ERROR
    assert f"HTTP 401: Incorrect API key provided; no API key was sent: ${UNSET} is unset" in str(refused)
    assert text == "\U0001f600! \ufffd"
    assert f"upstream 'vllm': ${UNSET} is unset (api_key_env)" in log and "Traceback" not in log, log


# ---------------------------------------------------------------------------- 3. not SSE, not JSON, status 200
def test_an_html_page_with_status_200_is_an_error_quoting_its_start():
    """A proxy's login page was read as events: "stream ended without [DONE]"."""
    page = Canned([b"<html>\n  <body>login \x1b[2J</body>\n</html>\n"], headers={"Content-Type": "text/html"})
    err = failure(page)
    assert err.code == ErrorCode.UPSTREAM_ERROR
    assert str(err) == "upstream 'vllm': unexpected Content-Type text/html: login \\x1b[2J"  # the page's text


def test_an_html_page_that_never_ends_is_that_error_not_a_timeout():
    """One whose body never ended waited out the whole first-token deadline ("no first token within ...")."""
    big = Canned([b"<html>" + b"<p>sign in</p>" * 100], headers={"Content-Type": "text/html; charset=utf-8"},
                 hold=True)
    err = failure(big, first_token_timeout_s=60)
    assert err.code == ErrorCode.UPSTREAM_ERROR
    assert str(err).startswith("upstream 'vllm': unexpected Content-Type text/html; charset=utf-8: sign in sign")
    assert str(err).endswith("...") and len(str(err)) < 300


def test_an_event_stream_under_another_content_type_is_still_read():
    """A server that labels its stream text/plain (or sends no type) kept working: it starts like events."""
    stream = [b": hello\n\n", ev(chunk("Hi")), FINISH, DONE]
    assert ask(Canned(stream, headers={"Content-Type": "text/plain"})) == (["Hi"], "stop")


# ------------------------------------------------------------------------------------------ 4. Retry-After
@pytest.mark.parametrize("status, body, retry, text", [
    (429, b'{"error": {"message": "Rate limit reached for requests"}}', "20",
     "HTTP 429: Rate limit reached for requests; Retry-After: 20 s"),
    (503, b"", "5", "HTTP 503: (empty body); Retry-After: 5 s"),
    (503, b"", "Wed, 21 Oct 2015 07:28:00 GMT", "HTTP 503: (empty body); Retry-After: 0 s"),  # a date passed
    # neither: quoted as it came, and 1 s, as a busy upstream's error always names one (RemoteError.retry_after)
    (429, b"", "after lunch", "HTTP 429: (empty body); Retry-After: 1 s (the upstream's 'after lunch' is not a time)"),
], ids=["seconds", "503", "date", "other"])
def test_retry_after_is_in_the_error(status, body, retry, text):
    """A 429's or 503's Retry-After was dropped: the client could not tell when to try again."""
    canned = Canned([body], status=status, headers={"Content-Type": "application/json", "Retry-After": retry})
    assert str(failure(canned)) == f"upstream 'vllm': {text}"


# --------------------------------------------------------------------------------------- 5. SSE line rules
def _events(*pieces: bytes) -> list[bytes]:
    return [ev(chunk("Hel")), ev(chunk("lo")), *pieces, FINISH, DONE]


@pytest.mark.parametrize("ending", [b"\r", b"\r\n"], ids=["cr", "crlf"])
def test_cr_and_crlf_line_endings(ending):
    """CR-only endings (valid SSE) were one line: "malformed event (not JSON)"."""
    pieces = [p.replace(b"\n", ending) for p in _events()]
    assert ask(Canned(pieces)) == (["Hel", "lo"], "stop")


def test_a_long_cr_only_stream_that_stays_open_is_read():
    """A CR-only stream longer than the line bound failed as "event line too long" (one line to aiohttp), and
    one held open after its [DONE] never returned a line: "no first token"."""
    words = [ev(chunk(f"w{i} ")).replace(b"\n", b"\r") for i in range(8000)]  # ~700 KB
    assert sum(map(len, words)) > EVENT_LINE_LIMIT
    out, reason = ask(Canned([*words, FINISH.replace(b"\n", b"\r"), DONE.replace(b"\n", b"\r")], hold=True),
                      **FAST)
    assert "".join(out) == "".join(f"w{i} " for i in range(8000)) and reason == "stop"


def test_an_events_data_over_several_lines_is_joined():
    """The SSE rules join an event's data lines with a line feed; each line was parsed alone, as not JSON. A
    server that cuts its JSON anywhere (inside "choices", here) is read too: the joining line feed, which JSON
    refuses inside a string, is dropped."""
    doc = json.dumps(chunk("split"), indent=1).encode()  # JSON with line breaks in it
    event = b"".join(b"data: " + line + b"\n" for line in doc.split(b"\n")) + b"\n"
    flat = json.dumps(chunk("cut")).encode()
    cut = flat.index(b"choices") + 1
    anywhere = b"data: " + flat[:cut] + b"\ndata: " + flat[cut:] + b"\n\n"
    assert ask(Canned(_events(event, anywhere))) == (["Hel", "lo", "split", "cut"], "stop")


def test_the_line_rules_across_chunk_boundaries():
    """A CR ending one chunk and an LF starting the next are one line end (CRLF), not a blank line that
    dispatches the event; a BOM at the start is dropped; a comment dispatches nothing."""
    stream = _EventStream(EVENT_LINE_LIMIT)
    assert stream.feed(b"\xef\xbb\xbfdata: a\r") == []
    assert stream.feed(b"\ndata: b\r\n: keep-alive\r") == []
    assert stream.feed(b"\r") == [("", "a\nb")]
    assert stream.feed(b"event: error\ndata:x\n") == []
    assert stream.end() == [("error", "x")]  # a body's last event counts without its blank line


def test_the_line_bound_holds_for_a_line_and_for_an_events_data():
    stream = _EventStream(100)
    stream.feed(b"data: " + b"x" * 90 + b"\n")
    with pytest.raises(Exception, match="event too long"):
        stream.feed(b"data: " + b"x" * 90 + b"\n")
    with pytest.raises(Exception, match="event line too long"):
        _EventStream(100).feed(b"data: " + b"x" * 200)  # checked as it grows, before its end
    err = failure(Canned(_events(b"".join(b"data: " + b"x" * 1000 + b"\n" for _ in range(600)) + b"\n")))
    assert str(err) == ("upstream 'vllm': event too long: over 512 KiB of data, the daemon's limit for one "
                        "server-sent event")


# ------------------------------------------------------------------------------ 6. content after the finish
def test_content_after_the_finish_reason_is_not_the_answer():
    """It was appended to the whole answer; the first finish is final (its reason too)."""
    after = [ev(chunk("AFTER")), ev(chunk(None, finish="length"))]
    finished_with_content = ev(chunk("!", finish="stop"))  # content in the finishing chunk is the answer's
    assert ask(Canned([ev(chunk("Hi")), finished_with_content, *after, DONE])) == (["Hi", "!"], "stop")
    # and after a finish without [DONE]: the end of the body
    assert ask(Canned([ev(chunk("Hi")), FINISH, ev(chunk("AFTER"))])) == (["Hi"], "stop")


@pytest.mark.parametrize("pieces", [[ev({"id": 1}), DONE], [ev({"id": 1, "choices": []}), ev({"id": 2}), DONE],
                                    [ev({"choices": [{"index": 1, "delta": {"content": "x"}}]}), DONE]],
                         ids=["no-choices", "empty-choices", "other-choice"])
def test_a_stream_in_which_no_event_carries_choice_0_is_malformed(pieces):
    """It was an empty answer, "stop", exit 0 (a probe); a JSON answer without choice 0 is refused so already."""
    exc = failure(Canned(pieces))
    assert exc.code == ErrorCode.UPSTREAM_ERROR and "malformed stream (no event carried choice 0)" in str(exc)


def test_a_stream_whose_choice_0_says_nothing_is_an_empty_answer_not_an_error():
    assert ask(Canned([ev(chunk(None)), FINISH, DONE])) == ([], "stop")


def test_events_ended_by_one_line_feed_are_each_an_event_as_they_come():
    """A server that ends its events with "\\n" alone (outside the SSE rules) was read before the new parser;
    after it every data line was joined into one text that is not JSON ("malformed event"), and nothing came before
    the body's end. Each is an event again, as soon as the next one starts."""
    stream = _EventStream(EVENT_LINE_LIMIT)
    first = stream.feed(b'data: {"a": 1}\n')
    assert first == []  # (its end is not known yet)
    assert stream.feed(b'data: {"b": 2}\n') == [("", '{"a": 1}')]
    assert stream.feed(b"data: [DONE]\n") == [("", '{"b": 2}')]
    assert stream.end() == [("", "[DONE]")]
    single = [p.replace(b"\n\n", b"\n") for p in _events()]
    assert ask(Canned(single)) == (["Hel", "lo"], "stop")


def test_an_events_json_over_several_lines_is_still_one_event():
    stream = _EventStream(EVENT_LINE_LIMIT)
    assert stream.feed(b'data: {"choices":\ndata: [1]}\n\n') == [("", '{"choices":\n[1]}')]


def test_a_byte_order_mark_split_over_the_first_reads_is_dropped():
    raw = b"\xef\xbb\xbf" + b"".join(_events())
    for cut in (1, 2):
        stream = _EventStream(EVENT_LINE_LIMIT)
        got = stream.feed(raw[:cut]) + stream.feed(raw[cut:]) + stream.end()
        whole = _EventStream(EVENT_LINE_LIMIT)
        assert got == whole.feed(raw) + whole.end() and len(got) == 4
    short = _EventStream(EVENT_LINE_LIMIT)  # a body of two bytes that are not a mark: kept
    assert short.feed(b"\xef\xbb") == [] and short.end() == []


def test_an_event_over_many_data_lines_is_parsed_in_linear_time(monkeypatch):
    """Each new data line made the parser try the whole event so far as JSON: a 256-KB event of 16,000 lines took
    9.6 s of the event loop (a review). Counted, not timed: one attempt per event, on its first line."""
    from tokenwire.daemon import upstream_openai

    tried: list[str] = []
    real = upstream_openai._whole_document
    monkeypatch.setattr(upstream_openai, "_whole_document", lambda data: tried.append(data) or real(data))
    lines = ['{"choices": [', *(f'"{i}",' for i in range(2000)), '"end"]}']
    body = "".join(f"data: {line}\n" for line in lines).encode() + b"\n"
    stream = _EventStream(EVENT_LINE_LIMIT)
    got = [ev for k in range(0, len(body), 4096) for ev in stream.feed(body[k:k + 4096])]
    assert got == [("", "\n".join(lines))]
    assert tried == [lines[0]]
