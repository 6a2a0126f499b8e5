"""The KV ingest Unix socket: the daemon's side (:func:`serve_kv_ingest`) and the engine's (:func:`put_kv_unix`).

A put is a JSON header line followed by the tensor's raw bytes, one answer line each. The socket is open to every
engine process of its group, so the daemon's side checks all it can from the header before reading the body, and
bounds the header's size, the body's pace and the memory bodies hold. A module of its own so that the wire format's
two sides read together, apart from the store service they feed (:class:`~.kv_service.KVService`); the client
imports neither the codec nor numba (an engine with no writable home could not load them).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenwire.transport.errors import TokenwireError
from tokenwire.transport.frames import MAX_KV_TOKENS

from . import unix_sockets
from .kv_meta import _DTYPES, KVIngestError, PutHashes, _check_context, _check_prewarm, _itemsize
from .kv_service import MAX_INGEST_BYTES, KVService, checked_scope

log = logging.getLogger("tokenwire.kv")

# A put's header line: the largest a put can need is its token ids, at most MAX_KV_TOKENS of up to 10 digits with
# json.dumps' ", " (12 bytes each: 1.5 MiB), plus 512 KiB for the rest (model, shape, fingerprint, prewarm). It was
# 16 MiB: every connection could make the event loop parse that much JSON, and hold twice it read ahead
MAX_HEADER_BYTES = 12 * MAX_KV_TOKENS + (512 << 10)
# ...and of a longer line, what is read and dropped (to its newline) after the refusal, so that an engine still
# writing it can finish and read why: closed with it unread, the socket was reset under the engine's write (an
# asyncio engine lost the answer). Four times the old limit: past that the byte stream is simply out of step
MAX_DISCARD_BYTES = 64 << 20
BODY_QUIET_S = 30.0  # a put body with no byte for this long is given up (its connection closed)
MIN_BODY_RATE = 16 << 20  # bytes/s a put body must average, beyond BODY_QUIET_S (a local socket does GB/s)


async def _discard_line(reader: asyncio.StreamReader) -> None:
    """Drop the rest of an over-long header line: up to its newline, the end of the stream, BODY_QUIET_S without a
    byte, or MAX_DISCARD_BYTES (see there). Nothing of it is kept or parsed."""
    dropped = 0
    while dropped < MAX_DISCARD_BYTES:
        try:
            piece = await asyncio.wait_for(reader.read(1 << 16), BODY_QUIET_S)
        except TimeoutError:
            return
        if not piece or b"\n" in piece:
            return
        dropped += len(piece)


def _body_bytes(shape: list[Any], itemsize: int) -> int:
    """A put's body size from its header's ``shape``: five entries, each checked before any is multiplied, and the
    product stopped at MAX_INGEST_BYTES. A shape of 80,000 entries of 10**18 (a 1.7-MB header) held the event loop
    13 s multiplying them (every chat stalled meanwhile), and its product could not even be formatted into the
    refusal (the engine got Python's "Exceeds the limit (4300 digits) for integer string conversion")."""
    if len(shape) != 5 or any(type(n) is not int for n in shape):
        raise KVIngestError("shape must be 5 integers: [layers, 2, kv_heads, tokens, head_dim]")
    nbytes = itemsize
    for n in shape:
        if n < 1:
            raise KVIngestError("shape must be positive integers")
        nbytes *= n
        if nbytes > MAX_INGEST_BYTES:  # (no huge number in the message: it is never formatted)
            raise KVIngestError(f"the body would exceed the ingest limit of {MAX_INGEST_BYTES >> 30} GiB")
    return nbytes


class _BodyCut(asyncio.IncompleteReadError):
    """A body whose engine ended its side after ``got`` of ``expected`` bytes (``partial`` is empty: a copy of the
    bytes read, up to ``kv.ingest_memory_mb``, only for their count, doubled what the put held)."""

    def __init__(self, got: int, expected: int) -> None:
        super().__init__(b"", expected)
        self.got = got


async def _read_body(reader: asyncio.StreamReader, nbytes: int) -> bytearray:
    """A put's ``nbytes`` of tensor data; ``TimeoutError`` once none has come for ``BODY_QUIET_S`` (a hung
    engine), or once, beyond twice ``BODY_QUIET_S``, the body has averaged under ``MIN_BODY_RATE`` since it began (an
    engine trickling a byte now and then held its share of ``kv.ingest_memory_mb``, and every put queued behind it;
    a deadline of 60 s plus ``nbytes`` at that rate let it do so ~570 s for 8 GiB, whatever its pace). A slow engine
    that keeps a sane pace is waited for.

    The buffer grows as bytes arrive: allocated whole at the header (``bytearray(nbytes)`` writes every page), a
    200-byte header declaring 2 GiB, then silence, made the daemon commit 2 GB for 30 s. The put's share of the
    memory budget is still held from the header on (the caller's ``put_memory.hold``)."""
    data = bytearray()
    loop = asyncio.get_running_loop()
    began = loop.time()
    while len(data) < nbytes:
        # the average falls under MIN_BODY_RATE at began + got / MIN_BODY_RATE; it is not asked before 2 x quiet
        left = began + max(2 * BODY_QUIET_S, len(data) / MIN_BODY_RATE) - loop.time()
        wait = min(BODY_QUIET_S, left)
        try:
            if wait <= 0:
                raise TimeoutError
            piece = await asyncio.wait_for(reader.read(min(nbytes - len(data), 1 << 20)), wait)
        except TimeoutError:
            why = (f"nothing for {BODY_QUIET_S:g} s" if wait >= BODY_QUIET_S else
                   f"slower than {MIN_BODY_RATE / (1 << 20):g} MiB/s on average beyond {2 * BODY_QUIET_S:g} s")
            raise TimeoutError(f"put body stalled: {why} after {len(data)} of {nbytes} bytes; the connection is "
                               "closed") from None
        if not piece:
            got = len(data)
            del data  # (the traceback holds this frame: the partial body must not outlive it, nor be copied)
            raise _BodyCut(got, nbytes)
        data += piece  # (realloc: a large buffer grows in place, its pages committed as they are written)
    return data


class _HeaderTimeout(Exception):
    """A put's header line did not end within ``BODY_QUIET_S`` of its first byte."""


async def _read_header_line(reader: asyncio.StreamReader) -> bytes:
    """The next header line (b"" at the end of the stream); once its first byte is in, the rest must come within
    ``BODY_QUIET_S`` (:class:`_HeaderTimeout`): 300 connections each holding a 2-MB line short of its newline kept
    520 MB for as long as they liked. Waiting for that first byte is not bounded here: an idle engine connection
    between puts is not a half-written line."""
    try:
        first = await reader.readexactly(1)
    except asyncio.IncompleteReadError:
        return b""
    if first == b"\n":
        return first
    try:
        return first + await asyncio.wait_for(reader.readline(), BODY_QUIET_S)
    except TimeoutError:
        raise _HeaderTimeout(f"header line not complete within {BODY_QUIET_S:g} s of its first byte; the "
                             "connection is closed") from None


def _parse_header(line: bytes) -> Any:
    """The header line's JSON, or :class:`KVIngestError` with a plain message: Python's own text reached the
    engine ("maximum recursion depth exceeded while decoding a JSON array...", "...use
    sys.set_int_max_str_digits() to increase the limit")."""
    try:
        text = line.decode("utf-8")  # json.loads(bytes) would guess UTF-16 from some bytes
    except UnicodeDecodeError as exc:
        raise KVIngestError(f"not UTF-8 (at byte {exc.start})") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise KVIngestError("JSON nested too deeply (a put header is one flat object)") from None
    except json.JSONDecodeError as exc:
        raise KVIngestError(f"not JSON: {exc}") from None
    except ValueError:  # int() refusing a number of more digits than sys.get_int_max_str_digits()
        raise KVIngestError(f"a number is too long (over {sys.get_int_max_str_digits()} digits)") from None


def _check_put_header(service: KVService, msg: dict[str, Any], model: str, ids: list[int],
                      shape: list[int]) -> tuple[Any, list[str], str | None]:
    """What of a put needs only its header (model, token ids against the shape, their range and chunk count, the
    fingerprint, prewarm, the scope), checked before any of the body is read: the same messages as the ingest's
    checks, which ran after the body had come (an empty model name was refused after 512 MiB; 4,097 chunks of ids
    waited 30 s for a body first). Returns the fingerprint, the prewarm levels (each once) and the scope."""
    fp = msg.get("fingerprint")
    _check_context(model, ids, fp, service.chunk_tokens)
    if len(ids) != shape[3]:  # the ingest's message (stack_kv's token count is the shape's)
        raise KVIngestError(f"KV holds {shape[3]} tokens but {len(ids)} token ids were given")
    prewarm = _check_prewarm(msg.get("prewarm", []))
    return fp, prewarm, service.check_scope(msg.get("scope"))


async def _handle_ingest(service: KVService, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One connection: any number of ``header line + raw tensor bytes`` puts, one reply line each."""

    def reply(obj: dict[str, Any]) -> None:
        writer.write(json.dumps(obj).encode() + b"\n")

    in_put = False  # a put's header is read and its reply not yet written
    try:
        while True:
            try:
                line = await _read_header_line(reader)
            except _HeaderTimeout as exc:
                service.count_ingest_error()
                reply({"ok": False, "error": str(exc)})
                await writer.drain()
                break
            except ValueError as exc:  # over the reader's limit (readline turns LimitOverrunError into this)
                service.count_ingest_error()  # a refused put, like a header that is not JSON
                reply({"ok": False, "error": f"header line too long (over {MAX_HEADER_BYTES >> 10} KiB: a put "
                                             f"carries at most {MAX_KV_TOKENS} token ids)"})
                await writer.drain()
                # readline dropped the whole line when its newline was already buffered ("Separator is found, but
                # chunk is longer than limit"); else only what it held, and the rest is still coming. Discarding in
                # the first case waited for another line: 30 s (BODY_QUIET_S) of a held connection, or the next
                # put's header eaten
                if "Separator is found" not in str(exc):
                    await _discard_line(reader)
                break
            if not line:
                break
            try:
                msg = _parse_header(line)
                if not isinstance(msg, dict) or msg.get("op") != "put":
                    raise KVIngestError("expected {\"op\": \"put\", ...}")
                shape, dtype = msg.get("shape"), msg.get("dtype")
                ids, model = msg.get("token_ids"), msg.get("model")
                if (not isinstance(shape, list) or not isinstance(ids, list) or not isinstance(model, str)
                        or any(type(t) is not int for t in ids) or dtype is None):
                    raise KVIngestError("put needs model (str), token_ids (ints), shape (5 ints), dtype")
                if dtype not in _DTYPES:  # named, as the shape check does: "int8" got the generic line above
                    raise KVIngestError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r:.40}")
                nbytes = _body_bytes(shape, _itemsize(dtype))
                if nbytes > service.put_memory.limit:
                    raise KVIngestError(f"{nbytes} bytes exceed kv.ingest_memory_mb "
                                        f"({service.put_memory.limit >> 20} MiB)")
            except KVIngestError as exc:
                service.count_ingest_error()
                reply({"ok": False, "error": f"bad header: {exc}"[:300]})
                await writer.drain()
                break  # the byte stream is out of step: the engine must reconnect
            try:
                fp, prewarm, scope = _check_put_header(service, msg, model, ids, shape)
            except KVIngestError as exc:  # (the ingest's own message, as when it was refused after the body)
                service.count_ingest_error()
                reply({"ok": False, "error": str(exc)[:300]})
                await writer.drain()
                break  # its body is not read: the byte stream is out of step
            # the body is held from its first byte until the put is stored: wait for room before reading it
            in_put = True
            async with service.put_memory.hold(nbytes):
                try:
                    data = await _read_body(reader, nbytes)
                except TimeoutError as exc:  # a hung engine held its half-sent body (and memory) for good
                    service.count_ingest_error()
                    reply({"ok": False, "error": str(exc)})
                    in_put = False  # counted and answered: not again if the drain fails or is cancelled
                    await writer.drain()
                    break
                except asyncio.IncompleteReadError as exc:
                    # the engine half-closed mid-body (shutdown(SHUT_WR)): it may still read, and the connection
                    # closed with no answer at all, so it could not tell a cut body from a daemon that died
                    service.count_ingest_error()
                    in_put = False
                    got = getattr(exc, "got", len(exc.partial))
                    reply({"ok": False, "error": f"put body cut short: the engine closed its side after "
                                                 f"{got} of {nbytes} bytes; nothing was stored"})
                    await writer.drain()
                    break
                try:
                    loop = asyncio.get_running_loop()
                    call = functools.partial(service.ingest_raw_sync, model, ids, shape, dtype, data,
                                             fingerprint=fp, prewarm=prewarm, scope=scope)
                    hashes = await loop.run_in_executor(service.ingest_pool, call)
                    answer = {"ok": True, "chunks": len(hashes), "hashes": hashes,
                              "kept_other": getattr(hashes, "kept_other", 0),
                              "stored": getattr(hashes, "stored", len(hashes))}
                    if scope is not None:  # said back: the engine knows its context is scoped (put_kv_unix)
                        answer["scope"] = scope
                    reply(answer)
                except TokenwireError as exc:  # KVError and StoreError (a Redis store that is down): one line
                    reply({"ok": False, "error": str(exc)})
                except Exception as exc:  # a bug must cost this put, with an answer, not the engine's connection
                    if service.closing:  # the closed pool refuses new work (RuntimeError): not a bug
                        reply({"ok": False, "error": "the daemon is stopping; put the context again"})
                    else:
                        log.exception("KV ingest of %d tokens for %r failed", len(ids), model)
                        reply({"ok": False, "error": f"ingest failed: {exc.__class__.__name__}"})
                del data
            in_put = False
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        if in_put:  # the engine went away mid-body: a refused put, counted (it left no trace)
            service.count_ingest_error()
    except asyncio.CancelledError:
        # the daemon is stopping. Returned, not re-raised: Python 3.11's stream server calls task.exception() on
        # the finished task, which raises for a cancelled one, and asyncio logged that as an ERROR with a
        # traceback for every idle engine connection at shutdown (as daemon/ingest.py's serve_ingest)
        if in_put:  # waiting for room or mid-body: the engine hears why, as a put cut at its store step does
            service.count_ingest_error()  # (it got "no answer from the KV ingest socket")
            reply({"ok": False, "error": "the daemon is stopping; put the context again"})
    finally:
        writer.close()


async def serve_kv_ingest(path: str | Path, service: KVService, *, group: str | None = None,
                          start_serving: bool = True) -> asyncio.Server:
    """Listen for KV puts on a Unix socket (mode 0660, given to ``group``, ``kv.ingest_socket_group``, when set:
    as the answer ingest socket, so that applications that put KV need not be in the daemon's group).
    ``start_serving=False``: bound, nothing accepted until ``server.start_serving()`` (:func:`start_kv`)."""
    return await unix_sockets.serve(Path(path), lambda r, w: _handle_ingest(service, r, w), limit=MAX_HEADER_BYTES,
                                    group=group, setting="kv.ingest_socket_group", start_serving=start_serving)


def _check_kv(kv: Sequence[tuple[Any, Any]]) -> None:
    """Refuse, as :meth:`KVService.ingest` does and with its message, KV that ``stack_kv`` refuses: checked on the
    tensors' dtypes and shapes alone (``stack_kv``'s own checks, :mod:`tokenwire.transport.cachegen.shapes`), so
    checking costs no copy of the context and imports no codec (whose numba kernels need a writable cache at
    import: an engine with no writable home failed there)."""
    from tokenwire.transport.cachegen.errors import InvalidInput
    from tokenwire.transport.cachegen.shapes import check_kv_layers

    try:
        check_kv_layers(kv)
    except InvalidInput as exc:
        raise KVIngestError(f"bad KV tensors: {exc}") from None


def put_kv_unix(path: str | Path, model: str, token_ids: Sequence[int], kv: Sequence[tuple[Any, Any]], *,
                fingerprint: int | None = None, prewarm: Sequence[str] = (), scope: str | None = None) -> list[str]:
    """Client side of the Unix-socket ingest (blocking): send one context's KV; returns its chunk hashes (a
    :class:`PutHashes`: ``kept_other`` and ``stored`` as the daemon answered).

    ``scope``: a principal's name (an auth token's name, or a client certificate's ``cert:`` principal): only
    fetches with that principal find the context; None (the default): shared, found by every client. The daemon
    refuses a scope no client could have under its auth.

    Raises :class:`KVIngestError` for a refused put (the daemon's reason) and for a socket it cannot connect to
    (naming the path; the ``OSError`` is its ``__cause__``)."""
    import socket

    import torch

    from tokenwire.transport.frames import MAX_CHUNK_TOKENS

    # ingest()'s check and message (int() cut a float id and took True); the daemon's chunk_tokens is not known
    # here, so the chunk count is checked at the largest, and again by the daemon
    ids = _check_context(model, token_ids, fingerprint, MAX_CHUNK_TOKENS)
    checked_scope(scope)  # (the name rule; the daemon checks the scope against its auth too)
    _check_kv(kv)  # what ingest() refuses: a batch was sent as its element 0, mixed dtypes promoted to fp32
    ks = [k[0] if k.dim() == 4 else k for k, _ in kv]
    vs = [v[0] if v.dim() == 4 else v for _, v in kv]
    t = torch.stack([torch.stack([k, v]) for k, v in zip(ks, vs, strict=True)]).contiguous()  # [L, 2, H, T, D]
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in _DTYPES:  # refused here: the daemon would close the socket while the bytes still go out
        raise KVIngestError(f"unsupported dtype {dtype}; use one of {', '.join(_DTYPES)}")
    head: dict[str, Any] = {"op": "put", "model": model, "token_ids": ids, "shape": list(t.shape),
            "dtype": dtype, "prewarm": list(prewarm)}
    if fingerprint is not None:
        head["fingerprint"] = fingerprint
    if scope is not None:  # (left out when shared: a daemon before scopes refuses nothing it does not know)
        head["scope"] = scope
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError as exc:  # it was a bare "[Errno 2] No such file or directory", naming no socket
            raise KVIngestError(f"cannot connect to the KV ingest socket {path}: {exc.strerror or exc} (is the "
                                "daemon running, with [kv] ingest_socket?)") from exc
        try:
            s.sendall(json.dumps(head).encode() + b"\n")
            s.sendall(t.view(torch.uint8).numpy().tobytes())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon refused the header and closed: its answer line is already here to read
        buf = b""
        while not buf.endswith(b"\n"):
            try:
                more = s.recv(65536)
            except ConnectionResetError:
                break
            if not more:
                break
            buf += more
    try:
        ans = json.loads(buf or b"{}")
    except ValueError:
        ans = {}
    if not ans.get("ok"):
        raise KVIngestError(ans.get("error", "no answer from the KV ingest socket"))
    if scope is not None and ans.get("scope") != scope:
        # a daemon before scopes ignores the field: the context is stored, but shared, visible to every client
        raise KVIngestError(f"the daemon did not scope the put to {scope!r}: it is a version without KV scopes, "
                            "and stored the context shared (every client can fetch it); upgrade it, or put no "
                            "context that must stay private")
    # (an older daemon sends neither)
    return PutHashes(ans["hashes"], kept_other=int(ans.get("kept_other", 0)), stored=ans.get("stored"))
