"""The KV ingest socket's leftovers of the session-45 audit: an engine that half-closes mid-body is answered (it got
the connection closed with no word), and a model name holding a control character (a NUL) is refused like other bad
model names (it was stored)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tokenwire.daemon.kv_ingest import put_kv_unix, serve_kv_ingest
from tokenwire.daemon.kv_meta import KVIngestError
from tokenwire.daemon.kv_service import KVService
from tokenwire.daemon.kv_store_local import LocalChunkStore

SHAPE = [1, 2, 5, 14, 32]  # float16: 8960 body bytes, the audit's put
BODY_BYTES = 8960


def _service(tmp_path: Path) -> KVService:
    return KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=16)


def _header(**fields: Any) -> bytes:
    head = {"op": "put", "model": "m", "token_ids": list(range(1, 15)), "shape": SHAPE, "dtype": "float16"}
    return json.dumps({**head, **fields}).encode() + b"\n"


def _exchange(tmp_path: Path, svc: KVService, send: bytes, *, close: str) -> bytes:
    """Send ``send`` to a real ingest socket, then end the engine's side (``close``: "half", shutdown(SHUT_WR),
    or "full", close()) and return what the engine read (b"" for a full close)."""
    path = tmp_path / "kv.sock"

    def engine() -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(path))
            s.sendall(send)
            if close == "full":
                return b""
            s.shutdown(socket.SHUT_WR)
            got = b""
            while more := s.recv(65536):
                got += more
            return got

    async def go() -> bytes:
        server = await serve_kv_ingest(path, svc)
        try:
            got = await asyncio.get_running_loop().run_in_executor(None, engine)
            for _ in range(200):  # (a full close: the daemon's side ends on its own)
                if svc.ingest_errors:
                    break
                await asyncio.sleep(0.01)
            return got
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(go())


def test_an_engine_that_half_closes_mid_body_hears_the_body_was_cut_short(tmp_path):
    """100 of 8960 body bytes, then shutdown(SHUT_WR): the connection closed with no answer (b"" at once), so the
    engine could not tell a cut body from a daemon that died."""
    svc = _service(tmp_path)
    got = _exchange(tmp_path, svc, _header() + b"\0" * 100, close="half")
    assert json.loads(got) == {"ok": False, "error": f"put body cut short: the engine closed its side after 100 of "
                                                     f"{BODY_BYTES} bytes; nothing was stored"}
    assert got.count(b"\n") == 1  # one line, then the close
    assert svc.ingest_errors == 1
    svc.close()


def test_an_engine_gone_mid_body_is_counted_once_without_an_error_logged(tmp_path, caplog):
    """The answer goes to a closed socket: no traceback, no second count."""
    svc = _service(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert _exchange(tmp_path, svc, _header() + b"\0" * 100, close="full") == b""
    assert svc.ingest_errors == 1
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    svc.close()


@pytest.mark.parametrize(("model", "shown"), [
    ("m\0", "'\\x00' at index 1"),
    ("line\nbreak", "'\\n' at index 4"),
    ("del\x7f", "'\\x7f' at index 3"),
    ("c1\x85", "'\\x85' at index 2"),
], ids=["nul", "newline", "del", "c1"])
def test_a_model_name_with_a_control_character_is_refused_as_other_bad_names_are(tmp_path, model, shown):
    """A NUL in the model was stored (a context no engine means); it is refused at the header, by the engine's
    put_kv_unix before it connects, and by KVService.ingest, with one message."""
    svc = _service(tmp_path)
    says = f"model must be a name without control characters ({shown})"
    got = _exchange(tmp_path, svc, _header(model=model), close="half")  # refused before any body byte
    assert json.loads(got) == {"ok": False, "error": says}
    assert svc.ingest_errors == 1
    kv = [(np.zeros((5, 14, 32), np.float16), np.zeros((5, 14, 32), np.float16))]
    torch = pytest.importorskip("torch")
    tkv = [(torch.from_numpy(k), torch.from_numpy(v)) for k, v in kv]
    with pytest.raises(KVIngestError) as api:
        svc.ingest_sync(model, list(range(1, 15)), tkv)
    assert str(api.value) == says
    svc.close()
    with pytest.raises(KVIngestError) as unix:  # refused before it connects: nothing listens here
        put_kv_unix(tmp_path / "none.sock", model, list(range(1, 15)), tkv)
    assert str(unix.value) == says


def test_a_printable_unicode_model_name_is_still_stored(tmp_path):
    svc = _service(tmp_path)
    got = _exchange(tmp_path, svc, _header(model="modèle/ü 1") + b"\0" * BODY_BYTES, close="half")
    answer = json.loads(got)
    assert answer["ok"] is True and answer["chunks"] == 1, answer
    assert svc.ingest_errors == 0
    svc.close()
