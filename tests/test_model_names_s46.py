"""One rule for model names wherever one enters (session 46): no control character, no lone surrogate. The KV put
refused control characters (session 45) while QUIC REQUEST and KV_FETCH frames and the chat ingest's open took
them (a NUL or an escape sequence then reached an upstream and the log); the SDK refuses such a name itself."""

from __future__ import annotations

import pytest

from tokenwire.daemon.ingest import IngestAPI, IngestConnection
from tokenwire.daemon.kv_meta import KVIngestError, _check_context
from tokenwire.daemon.transcripts import TranscriptStore
from tokenwire.transport.client import connect
from tokenwire.transport.errors import FrameError
from tokenwire.transport.frames import (
    KvFetch,
    Request,
    check_outgoing,
    decode_frame,
    encode_frame,
    model_name_problem,
)

from .test_chat_cli import cafile, chat, server_port  # noqa: F401  # (fixtures: a tokenwire server)
from .test_loopback import run

BAD = [
    ("m\0", "'\\x00' at index 1"),
    ("line\nbreak", "'\\n' at index 4"),
    ("esc\x1b[2J", "'\\x1b' at index 3"),
    ("del\x7f", "'\\x7f' at index 3"),
    ("c1\x85", "'\\x85' at index 2"),
]
IDS = ["nul", "newline", "escape", "del", "c1"]
GOOD_NAMES = ["org/Model-7B", "modèle/ü 1", "模型 \u2028 🙂", "m" * 128]


def _says(shown: str) -> str:
    return f"must be a name without control characters ({shown})"


@pytest.mark.parametrize(("model", "shown"), BAD, ids=IDS)
def test_request_and_kv_fetch_frames_with_a_control_character_in_the_model_are_malformed(model, shown):
    request = encode_frame(Request(messages=[{"role": "user", "content": "hi"}], model=model))
    with pytest.raises(FrameError) as bad:
        decode_frame(request)
    assert str(bad.value) == f"request.model: {_says(shown)}"
    fetch = encode_frame(KvFetch(model=model, deadline_ms=1000, token_ids=[1, 2]))
    with pytest.raises(FrameError) as bad:
        decode_frame(fetch)
    assert str(bad.value) == f"kvfetch.model: {_says(shown)}"


@pytest.mark.parametrize("model", GOOD_NAMES)
def test_printable_names_still_pass_everywhere(model):
    assert model_name_problem(model) is None
    assert decode_frame(encode_frame(Request(messages=[{"role": "user", "content": "hi"}], model=model))).model == model
    assert decode_frame(encode_frame(KvFetch(model=model, deadline_ms=1000, token_ids=[1]))).model == model
    store = TranscriptStore(max_bytes=1 << 22, retain_s=10)
    assert IngestAPI(store, max_tokens=lambda: 100).handle({"op": "open", "model": model}, IngestConnection(),
                                                            0)["ok"] is True
    assert _check_context(model, [1, 2], None, 256) == [1, 2]


@pytest.mark.parametrize(("model", "shown"), BAD, ids=IDS)
def test_the_chat_ingest_open_refuses_it_as_it_refuses_other_bad_model_names(model, shown):
    store = TranscriptStore(max_bytes=1 << 22, retain_s=10)
    api = IngestAPI(store, max_tokens=lambda: 100)
    conn = IngestConnection()
    assert api.handle({"op": "open", "model": model}, conn, 0) == {"ok": False, "error": f"model {_says(shown)}"}
    assert store.live_count == 0 and not conn.open
    assert api.handle({"op": "open", "model": "a\ud800"}, conn, 0) == {
        "ok": False, "error": "model is not valid Unicode (a lone surrogate)"}  # (the words it had)


@pytest.mark.parametrize(("model", "shown"), BAD, ids=IDS)
def test_the_kv_put_says_the_same_words(model, shown):
    with pytest.raises(KVIngestError) as bad:
        _check_context(model, [1, 2], None, 256)
    assert str(bad.value) == f"model {_says(shown)}"


@pytest.mark.parametrize(("model", "shown"), BAD[:2], ids=IDS[:2])
def test_the_sdk_refuses_the_name_itself_and_its_connection_lives_on(server_port, model, shown):  # noqa: F811
    """What the server would answer by closing the whole connection is refused before sending, naming the
    argument; a KV fetch's check is the same frame check (``check_outgoing``, as kv_client calls it)."""
    async def go() -> tuple[str, str]:
        async with connect("127.0.0.1", server_port, verify=False) as conn:
            with pytest.raises(ValueError) as refused:
                conn.chat("hi", model=model)
            text = "".join([piece async for piece in conn.chat("hi", model="fine", max_tokens=3)])
            return str(refused.value), text

    refused, text = run(go(), 30)
    assert refused == f"invalid request: model: {_says(shown)}" and text
    with pytest.raises(ValueError, match=r"invalid fetch: kvfetch\.model: must be a name without control"):
        check_outgoing(KvFetch(model=model, deadline_ms=1000, token_ids=[1]), "fetch")


def test_tokenwire_chat_model_with_an_escape_is_one_line(server_port, cafile, capsys):  # noqa: F811
    rc, _, err = chat(capsys, "--port", str(server_port), "--cafile", str(cafile), "--server-name", "localhost",
                      "--model", "x\x1b[2Jy", "hi")
    assert rc == 2 and "Traceback" not in err
    assert err.startswith("tokenwire chat: error: invalid request: model: must be a name without control characters "
                          "('\\x1b' at index 1)"), err
