"""The KV ingest socket under a hostile engine: a declared body is not committed before it arrives, prewarm levels
are encoded once each, header-only checks refuse before the body, a half-written header line is given up, the
rate rule closes a trickling body, and header parse errors read plainly (probe pJ, items 2-6 and 8b)."""

from __future__ import annotations

import asyncio
import json
import sys
import tracemalloc
from typing import Any

import pytest

from tokenwire.daemon import kv_ingest
from tokenwire.daemon.kv_meta import KVIngestError
from tokenwire.daemon.kv_service import KVService
from tokenwire.daemon.kv_store_local import LocalChunkStore

from .test_kv_channel import CHUNK, MODEL, make_kv
from .test_kv_ingest_socket import _Writer


def _service(tmp_path, **kwargs: Any) -> KVService:
    return KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=CHUNK, **kwargs)


def _header(**fields: Any) -> bytes:
    head = {"op": "put", "model": MODEL, "token_ids": [1, 2, 3, 4], "shape": [1, 2, 1, 4, 8], "dtype": "float16"}
    return json.dumps({**head, **fields}).encode() + b"\n"


# ---------------------------------------------------------------------- 2: the body grows as its bytes arrive
def test_a_declared_body_is_not_allocated_before_its_bytes_arrive(tmp_path):
    """``bytearray(nbytes)`` at the header zero-filled every page: a 200-byte header declaring 2 GiB, then silence,
    took 2 GB of RSS. The budget (kv.ingest_memory_mb) is still held for the whole declared size."""
    tokens, dim = 256, 1 << 16
    nbytes = 2 * 2 * tokens * dim  # 64 MiB of float16
    svc = _service(tmp_path, put_memory_bytes=nbytes)

    async def go() -> tuple[int, int]:
        reader = asyncio.StreamReader()
        reader.feed_data(_header(token_ids=list(range(tokens)), shape=[1, 2, 1, tokens, dim]) + b"\0" * 10)
        tracemalloc.start()
        try:
            task = asyncio.ensure_future(kv_ingest._handle_ingest(svc, reader, _Writer()))  # type: ignore[arg-type]
            for _ in range(1000):  # until its body is being read: the budget is held from then on
                if svc.put_memory.used:
                    break
                await asyncio.sleep(0)
            used = svc.put_memory.used
            traced = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        reader.feed_eof()  # the engine goes away mid-body
        await asyncio.wait_for(task, 10)
        return used, traced

    used, traced = asyncio.run(go())
    assert used == nbytes  # the accounting is the declared size, as documented
    assert traced < nbytes // 8, f"{traced} bytes allocated for 10 bytes of body"
    assert svc.put_memory.used == 0 and svc.ingest_errors == 1
    svc.close()


def test_a_body_that_arrives_in_pieces_is_stored_whole(tmp_path):
    """The growing buffer holds every piece, in order (the put's KV reads back as sent)."""
    svc = _service(tmp_path)
    n = 2 * CHUNK
    kv = make_kv(n, layers=1, heads=1, dim=8)
    import torch

    body = torch.stack([torch.stack([k[0], v[0]]) for k, v in kv]).contiguous().view(torch.uint8).numpy().tobytes()

    async def go() -> bytes:
        reader, writer = asyncio.StreamReader(), _Writer()
        reader.feed_data(_header(token_ids=list(range(n)), shape=[1, 2, 1, n, 8]))
        task = asyncio.ensure_future(kv_ingest._handle_ingest(svc, reader, writer))  # type: ignore[arg-type]
        for i in range(0, len(body), 1000):
            reader.feed_data(body[i : i + 1000])
            await asyncio.sleep(0)
        reader.feed_eof()
        await asyncio.wait_for(task, 30)
        return writer.data

    reply = json.loads(asyncio.run(go()))
    assert reply["ok"] and reply["chunks"] == 2, reply
    same = svc.ingest_sync(MODEL, list(range(n)), kv)  # the same KV through the Python API: the same chunks, kept
    assert same == reply["hashes"]
    svc.close()


# ---------------------------------------------------------------------- 4: prewarm levels, each once
def test_duplicate_prewarm_levels_are_encoded_once_and_a_longer_list_is_refused(tmp_path):
    """Every prewarm entry cost an encode or a store read per chunk: 200,000 "low"s held the ingest worker 16.7 s."""
    svc = _service(tmp_path)
    calls: list[tuple[str, str]] = []
    real = svc.encoded_sync

    def counted(h: str, level: str) -> bytes:
        calls.append((h, level))
        return real(h, level)

    svc.encoded_sync = counted  # type: ignore[method-assign]
    ids = list(range(2 * CHUNK))
    try:
        hashes = svc.ingest_sync(MODEL, ids, make_kv(len(ids)), prewarm=["low", "low", "medium"])
        assert calls == [(hashes[0], "low"), (hashes[0], "medium"), (hashes[1], "low"), (hashes[1], "medium")]
        with pytest.raises(KVIngestError, match=r"prewarm lists 4 entries; there are 3 levels \(low, medium, high\)"):
            svc.ingest_sync(MODEL, ids, make_kv(len(ids)), prewarm=["low"] * 4)
    finally:
        svc.close()


# ---------------------------------------------------------------------- 6: header-only checks before the body
@pytest.mark.parametrize(("fields", "says"), [
    ({"model": ""}, "model must be a name of 1 to 128 characters"),
    ({"token_ids": [1, 2, 3]}, "KV holds 4 tokens but 3 token ids were given"),
    ({"token_ids": [1, 2, 3, 2**40]}, "token ids must be integers in [0, 2**31)"),
    ({"fingerprint": -1}, "fingerprint must be an integer in [0, 2**64)"),
    ({"prewarm": ["ultra"]}, "prewarm: unknown level 'ultra'"),
    ({"prewarm": ["low"] * 200}, "prewarm lists 200 entries"),
    # (chunks of 16 tokens: 4,097 of them are fewer ids than a fetch's MAX_KV_TOKENS)
    ({"token_ids": list(range(4097 * 16)), "shape": [1, 2, 1, 4097 * 16, 8]}, "tokens make more than 4096 chunks"),
    ({"token_ids": list(range(kv_ingest.MAX_KV_TOKENS + 1)), "shape": [1, 2, 1, kv_ingest.MAX_KV_TOKENS + 1, 8]},
     "a fetch carries at most"),
], ids=["model", "count", "range", "fingerprint", "level", "prewarm-length", "chunks", "tokens"])
def test_what_needs_only_the_header_is_refused_before_any_body_byte(tmp_path, fields, says):
    """These were checked after the whole body had been read (an empty model name after 512 MiB; 4,097 chunks of
    ids waited 30 s for a body). No body is sent here: refused at the header, the connection closes at once."""
    svc = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=16)

    async def go() -> bytes:
        reader, writer = asyncio.StreamReader(limit=kv_ingest.MAX_HEADER_BYTES), _Writer()
        reader.feed_data(_header(**fields))  # the header only: the engine's body would follow
        await asyncio.wait_for(kv_ingest._handle_ingest(svc, reader, writer), 5)  # type: ignore[arg-type]
        return writer.data

    reply = json.loads(asyncio.run(go()))
    assert reply["ok"] is False and says in reply["error"], reply
    assert svc.ingest_errors == 1 and svc.put_memory.used == 0
    svc.close()


# ---------------------------------------------------------------------- 5: a half-written header line
def test_a_header_line_not_completed_in_time_closes_the_connection_with_a_reply(tmp_path, monkeypatch):
    """readline() had no bound: 300 connections each holding a 2-MB line short of its newline kept 520 MB."""
    monkeypatch.setattr(kv_ingest, "BODY_QUIET_S", 0.2)
    svc = _service(tmp_path)

    async def go() -> bytes:
        reader, writer = asyncio.StreamReader(), _Writer()
        reader.feed_data(b'{"op": "put", "model": "m", "token_ids": [1, 2')  # and no more, no newline, no EOF
        await asyncio.wait_for(kv_ingest._handle_ingest(svc, reader, writer), 5)  # type: ignore[arg-type]
        return writer.data

    reply = json.loads(asyncio.run(go()))
    assert reply == {"ok": False, "error": "header line not complete within 0.2 s of its first byte; the connection "
                                           "is closed"}
    assert svc.ingest_errors == 1
    svc.close()


# ---------------------------------------------------------------------- 3: the rate rule, not a total deadline
def test_a_trickling_body_is_closed_by_the_rate_rule_not_a_deadline_scaled_by_its_size(tmp_path, monkeypatch):
    """The deadline was 60 s + nbytes at 16 MiB/s whatever the pace: a 1.5-GiB put trickling a byte every 20 s kept
    its memory, and every put behind it, 156 s. Past 2 x BODY_QUIET_S, a body averaging under MIN_BODY_RATE ends."""
    monkeypatch.setattr(kv_ingest, "BODY_QUIET_S", 0.2)
    monkeypatch.setattr(kv_ingest, "MIN_BODY_RATE", 100)  # bytes/s; the old deadline for 16 KiB: 0.4 + 164 s
    svc = _service(tmp_path)
    fed_max = 100  # a byte every 0.05 s: never quiet, 20 bytes/s on average

    async def go() -> tuple[bytes, int, bool]:
        reader, writer = asyncio.StreamReader(), _Writer()
        reader.feed_data(_header(shape=[1, 2, 1, 4, 2048]))  # 16 KiB
        task = asyncio.ensure_future(kv_ingest._handle_ingest(svc, reader, writer))  # type: ignore[arg-type]
        fed = 0
        while not task.done() and fed < fed_max:
            reader.feed_data(b"\0")
            fed += 1
            await asyncio.sleep(0.05)
        closed = task.done()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return writer.data, fed, closed

    reply, fed, closed = asyncio.run(go())
    assert closed and fed < fed_max, (reply, fed)
    error = json.loads(reply)["error"]
    assert error.startswith("put body stalled: slower than ") and "MiB/s on average beyond 0.4 s" in error, error
    svc.close()


# ---------------------------------------------------------------------- 8b: parse errors in plain words
@pytest.mark.parametrize(("line", "says"), [
    (b"[" * 100_000 + b"\n", "bad header: JSON nested too deeply (a put header is one flat object)"),
    (b'{"op": "put", "fingerprint": ' + b"7" * 5000 + b"}\n",
     f"bad header: a number is too long (over {sys.get_int_max_str_digits()} digits)"),
    (b"\xff{}\n", "bad header: not UTF-8 (at byte 0)"),
], ids=["nesting", "long-number", "utf8"])
def test_header_parse_errors_are_plain_messages(tmp_path, line, says):
    """The engine got Python's text: "maximum recursion depth exceeded while decoding a JSON array from a unicode
    string", "... use sys.set_int_max_str_digits() to increase the limit"."""
    svc = _service(tmp_path)

    async def go() -> bytes:
        reader, writer = asyncio.StreamReader(limit=kv_ingest.MAX_HEADER_BYTES), _Writer()
        reader.feed_data(line)
        reader.feed_eof()
        await asyncio.wait_for(kv_ingest._handle_ingest(svc, reader, writer), 10)  # type: ignore[arg-type]
        return writer.data

    assert json.loads(asyncio.run(go())) == {"ok": False, "error": says}
    assert svc.ingest_errors == 1
    svc.close()
