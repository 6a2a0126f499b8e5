"""The KV channel's client SDK: :func:`connect_kv` opens a :class:`KVConnection` (the asyncio shell over
:class:`~.kv_client_session.KVClientSession`), whose ``fetch_kv`` returns the decoded chunks and a
:class:`FetchReport`. Chunks are decoded on a worker thread as their streams end; torch and the codec are
imported only then (and by the once-per-process warm-up)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import math
import numbers
import operator
import os
import re
import struct
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, SupportsIndex

from aioquic.quic.connection import QuicConnection

from .errors import ErrorCode, RemoteError, TokenwireError
from .frames import KvChunk, KvDone, KvFetch, KvMeta, check_outgoing
from .kv_client_session import (
    DecodeRate,
    KVChunkReceived,
    KVClientSession,
    KVDoneReceived,
    KVFetchFailed,
    KVMetaReceived,
)
from .kv_controller import TEXT
from .kv_protocol import DEFAULT_RECOMPUTE_US, KVCorruptChunk, KVError, kv_quic_config
from .kv_server_session import MAX_FETCHES
from .path_recovery import KV_RECOVERY_PING_S
from .quic_io import SessionProtocol, open_client
from .session_events import ConnectionEnded, SessionEvent, closed_error, idle_timeout_in_force
from .tls import CertificateFileError as CertificateFileError  # re-exported: connect_kv raises it, as connect
from .tls import client_configuration

log = logging.getLogger("tokenwire.kv")


@dataclass
class ChunkReport:
    index: int
    level: str
    bytes: int
    tokens: int
    first_byte_ms: float
    received_ms: float
    decode_ms: float
    decoded_ms: float


@dataclass
class FetchReport:
    """What one fetch cost and achieved (times in ms since the request was sent).

    ``fetch_ms`` ends when every chunk is received and decoded; the engine then still prefills the tokens that
    did not come as KV (text chunks, and a prefix fetch's tokens the store lacked): ``prefill_tokens`` at
    ``recompute_us_per_token``, ``prefill_ms``. ``deadline_met`` is ``fetch_ms + prefill_ms <= deadline_ms``,
    the controller's own accounting (it was ``fetch_ms`` alone: a prefix fetch leaving 4,000 tokens, ~9 s, to
    prefill reported met at 93 ms)."""

    deadline_ms: float
    fetch_ms: float
    deadline_met: bool
    chunks: list[ChunkReport]
    controller: str
    prefill_tokens: int = 0
    recompute_us_per_token: int = DEFAULT_RECOMPUTE_US  # the fetch's, or the default when it named none

    @property
    def prefill_ms(self) -> float:
        """The modelled prefill of ``prefill_tokens`` after the transfer."""
        return self.prefill_tokens * self.recompute_us_per_token / 1e3

    @property
    def levels(self) -> list[str]:
        return [c.level for c in self.chunks]

    @property
    def payload_bytes(self) -> int:
        return sum(c.bytes for c in self.chunks)

    @classmethod
    def from_timings(cls, *, deadline_ms: int, controller: str, sent_at: float, end: float,
                     received: dict[int, tuple[KvChunk, float, float]],
                     decode_times: dict[int, tuple[float, float]], missing_tokens: int = 0,
                     recompute_us_per_token: int | None = None) -> FetchReport:
        """The report of a fetch sent at ``sent_at`` and done at ``end``, from each chunk's (header, first byte,
        last byte) and (decode start, decode end), all on one clock (the SDK's, or the virtual testbed's).
        ``missing_tokens``: the context's tokens the store lacked (a prefix fetch), prefilled like text chunks
        at ``recompute_us_per_token`` (None: the fetch named none, the server used its default)."""
        chunks = []
        for i in range(len(received)):
            hdr, first, done = received[i]
            d0, d1 = decode_times[i]
            chunks.append(ChunkReport(i, hdr.level, hdr.size, hdr.tokens, (first - sent_at) * 1e3,
                                      (done - sent_at) * 1e3, (d1 - d0) * 1e3, (d1 - sent_at) * 1e3))
        fetch_ms = (end - sent_at) * 1e3
        prefill = sum(c.tokens for c in chunks if c.level == TEXT) + missing_tokens
        rc = DEFAULT_RECOMPUTE_US if recompute_us_per_token is None else recompute_us_per_token
        return cls(float(deadline_ms), fetch_ms, fetch_ms + prefill * rc / 1e3 <= deadline_ms, chunks, controller,
                   prefill, rc)

    def to_dict(self) -> dict[str, Any]:
        return {"deadline_ms": self.deadline_ms, "fetch_ms": self.fetch_ms, "deadline_met": self.deadline_met,
                "prefill_tokens": self.prefill_tokens, "prefill_ms": self.prefill_ms,
                "recompute_us_per_token": self.recompute_us_per_token,
                "controller": self.controller, "levels": self.levels, "payload_bytes": self.payload_bytes,
                "chunks": [vars(c) for c in self.chunks]}


@dataclass
class ChunkResult:
    index: int
    level: str
    kv: list[tuple[Any, Any]] | None  # per layer (K, V) [1, H, T, D] torch tensors; None for text
    token_ids: list[int] | None  # for chunks sent as text: recompute their KV from these


@dataclass
class KVFetchResult:
    chunks: list[ChunkResult]
    report: FetchReport
    geometry: tuple[int, int, int]
    # a prefix fetch (``fetch_kv(prefix=True)``) of a context stored only in part: the requested token ids past
    # the stored prefix (by token ids), or how many of the requested chunks were not stored (by hashes)
    missing_token_ids: list[int] = field(default_factory=list)
    missing_chunks: int = 0
    token_ids: list[int] | None = None  # the context's ids as fetched (None: fetched by hashes)

    @property
    def stored_tokens(self) -> int:
        """Tokens of the context the server had stored (all of them, unless a prefix fetch found only part)."""
        return sum(c.kv[0][0].shape[-2] if c.kv is not None else len(c.token_ids or ()) for c in self.chunks)

    def prefix_kv(self) -> tuple[list[tuple[Any, Any]] | None, int]:
        """KV of the leading chunks that arrived as KV (concatenated), and how many tokens it covers.

        Everything after it (from the first text chunk on) must be recomputed by the engine from
        :meth:`text_token_ids`.
        """
        from .cachegen.codec import concat_tokens

        lead = []
        for c in self.chunks:
            if c.kv is None:
                break
            lead.append(c.kv)
        if not lead:
            return None, 0
        kv = concat_tokens(lead)
        return kv, int(kv[0][0].shape[-2])

    def text_token_ids(self) -> list[int]:
        """Token ids from the first text chunk on, KV chunks after it and the tokens the store lacked (a prefix
        fetch) included: what the engine prefills itself after :meth:`prefix_kv`, so that the two together are
        always the whole context. (The controller may send a chunk as KV after one as text: its ids used to be
        left out, and the engine prefilled a shorter, wrong context.) Fetched by hashes, such a KV chunk's ids
        are unknown here: ``ValueError`` (its KV is in :attr:`chunks`)."""
        lead = 0
        for c in self.chunks:
            if c.kv is None:
                break
            lead += int(c.kv[0][0].shape[-2])
        if self.token_ids is not None:
            return self.token_ids[lead:]
        out: list[int] = []
        started = False
        for c in self.chunks:
            started = started or c.kv is None
            if not started:
                continue
            if c.token_ids is None:
                raise ValueError(f"chunk {c.index} came as KV after a text chunk, and a fetch by hashes does not "
                                 "know its token ids: use res.chunks, or fetch by token ids")
            out.extend(c.token_ids)
        return out


@dataclass
class _PendingFetch:
    sent_at: float
    deadline_ms: int
    controller: str
    token_ids: list[int] | None
    meta: KvMeta | None = None
    done: KvDone | None = None
    received: dict[int, tuple[KvChunk, float, float]] = field(default_factory=dict)
    decodes: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    waiting: list[tuple[KvChunk, bytes]] = field(default_factory=list)  # codec chunks that overtook KV_META
    decode_times: dict[int, tuple[float, float]] = field(default_factory=dict)
    error: TokenwireError | None = None
    event: asyncio.Event = field(default_factory=asyncio.Event)


def _as_arguments(message: str) -> str:
    """The frame check's message naming ``fetch_kv``'s arguments (``deadline_ms``), not the wire's fields
    (``kvfetch.dl``), which the caller never sees."""
    names = {key: "auth_token" if spec[0] == "auth" else spec[0] for key, spec in KvFetch.FIELDS.items()}
    return re.sub(r"kvfetch\.(\w+)", lambda m: names.get(m[1], m[0]), message)


def _deadline_ms(deadline_ms: float) -> int:
    """The deadline as whole milliseconds, rounded up (truncated, 0.4 ms became 0 and was refused as no
    deadline); NaN, infinities and non-numbers are refused here (``int()`` would raise a bare "cannot convert
    float NaN to integer"). The range is the frame's check (``check_outgoing``)."""
    if isinstance(deadline_ms, bool) or not isinstance(deadline_ms, numbers.Real) or not math.isfinite(deadline_ms):
        raise ValueError(f"deadline_ms must be a finite number of milliseconds, got {deadline_ms!r}")
    return math.ceil(deadline_ms)


def _timeout_s(timeout_s: float | None) -> float | None:
    """``fetch_kv``'s ``timeout_s``, checked before anything is sent: None (no fixed bound), or a positive finite
    number of seconds. Unchecked, 0 meant no bound (a falsy test), -1 sent the fetch and failed it at once as
    "timed out" (the server counted it abandoned), NaN received every chunk and then failed "(0 decoded)", and
    "5" raised a bare TypeError from the comparison inside asyncio."""
    if timeout_s is None:
        return None
    if (isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real) or not math.isfinite(timeout_s)
            or timeout_s <= 0):
        raise ValueError(f"timeout_s must be a positive finite number of seconds, or None for no fixed bound; "
                         f"got {timeout_s!r}")
    return float(timeout_s)


def _token_ids(token_ids: Iterable[SupportsIndex] | None) -> list[int] | None:
    """Token ids as Python ints: a tokenizer's numpy or torch integers are fine (msgpack cannot carry them),
    anything that is not an integer (floats, bools, strings) is refused by position."""
    if token_ids is None:
        return None
    if isinstance(token_ids, str | bytes | bytearray):
        raise ValueError("token_ids must be a sequence of integers, not a string")
    try:
        items = list(token_ids)
    except TypeError:
        raise ValueError(f"token_ids must be a sequence of integers, got {type(token_ids).__name__}") from None
    out: list[int] = []
    for i, t in enumerate(items):
        try:
            if isinstance(t, bool):  # an int subclass, but never a token id
                raise TypeError
            out.append(operator.index(t))
        except TypeError:
            raise ValueError(f"token_ids[{i}] is {t!r} ({type(t).__name__}), not an integer") from None
    return out


def _chunk_hashes(hashes: Iterable[bytes | str] | None) -> list[bytes] | None:
    """Chunk hashes as 16-byte ``bytes``; the hex strings ingest returns are taken as they are."""
    if hashes is None:
        return None
    if isinstance(hashes, str | bytes | bytearray):
        raise ValueError("hashes must be a list of chunk hashes, not a single one")
    out: list[bytes] = []
    for i, h in enumerate(hashes):
        if isinstance(h, str):
            try:
                h = bytes.fromhex(h)
            except ValueError:
                raise ValueError(f"hashes[{i}] is not a hex string: {h[:48]!r}") from None
        elif isinstance(h, bytes | bytearray | memoryview):
            h = bytes(h)
        else:
            raise ValueError(f"hashes[{i}] is a {type(h).__name__}: chunk hashes are 16 bytes or their hex string "
                             "(as ingest returns them)")
        out.append(h)
    return out


def _check_text_ids(results: list[ChunkResult], received: dict[int, tuple[KvChunk, float, float]],
                    ids: list[int] | None) -> None:
    """Fetched by token ids, a text chunk must carry the ids asked for at its place in the context: the engine
    prefills them as that context (other ids came back as if they were the context's)."""
    pos = 0
    for r in results:
        n = received[r.index][0].tokens
        if ids is not None and r.token_ids is not None and r.token_ids != ids[pos : pos + n]:
            raise KVCorruptChunk(f"text chunk {r.index}: not the token ids asked for at {pos}-{pos + n}")
        pos += n


def _check_done_levels(done: KvDone, results: list[ChunkResult]) -> None:
    """KV_DONE lists each chunk's level; the report takes them from the chunks' own headers, so a KV_DONE that
    disagrees is a broken server (it went unnoticed). The frame itself has one level per chunk."""
    for r, level in zip(results, done.levels, strict=True):
        if r.level != level:
            raise KVError(f"KV_DONE says chunk {r.index} is {level}, it came as {r.level}",
                          code=ErrorCode.MALFORMED_FRAME)


def _check_codec_header(hdr: KvChunk, meta: KvMeta, payload: bytes) -> None:
    """Compare a codec chunk's bitstream header with its KV_CHUNK and KV_META before decoding it (reading the
    header costs nothing; decoding first let an 8-token chunk whose bitstream said 16384 tokens expand to 188 M
    elements, 3 GB, before its token count was compared), and its level with the one KV_CHUNK reports (nothing
    compared them: a server could label any level as another). Raises ``KVCorruptChunk``, or the codec's
    ``KVCodecError`` for a header that does not parse."""
    from .cachegen.bitstream import read_header
    from .cachegen.levels import get_level

    bh = read_header(payload)
    if bh.n_tokens != hdr.tokens:
        raise KVCorruptChunk(f"chunk {hdr.index}: {bh.n_tokens} tokens, header says {hdr.tokens}")
    if [bh.n_layers, bh.n_heads, bh.head_dim] != list(meta.geometry):
        raise KVCorruptChunk(f"chunk {hdr.index} has geometry {[bh.n_layers, bh.n_heads, bh.head_dim]}, KV_META "
                             f"says {list(meta.geometry)}")
    if bh.dtype != meta.dtype:  # a mix would come back from prefix_kv() as whatever torch.cat promotes to
        raise KVCorruptChunk(f"chunk {hdr.index} is {bh.dtype}, KV_META says {meta.dtype}")
    if bh.level_id != get_level(hdr.level).level_id:
        raise KVCorruptChunk(f"chunk {hdr.index} is sent as {hdr.level}, its bitstream has level id {bh.level_id}")


def _partial_result(pf: _PendingFetch, hashes: list[bytes] | None, recompute_us_per_token: int | None,
                    end: float) -> KVFetchResult | None:
    """What a failed fetch can still hand over (the error's ``partial``): the result of its leading chunks that
    arrived and decoded, 0 up to the first one that did not, as a successful fetch would hold them, everything
    after them left to prefill (``missing_token_ids``, ``missing_chunks``, the report's ``prefill_tokens``). A chunk
    past a gap is left out: the engine's cache is a prefix. None when no leading chunk decoded, or before KV_META
    (neither the geometry nor the context's length is known). A chunk still decoding is not waited for."""
    meta = pf.meta
    if meta is None:
        return None
    results: list[ChunkResult] = []
    for i in range(meta.chunks):
        fut = pf.decodes.get(i)
        if fut is None or not fut.done() or fut.cancelled() or fut.exception() is not None:
            break
        results.append(fut.result())
    if not results:
        return None
    try:
        _check_text_ids(results, pf.received, pf.token_ids)
    except KVCorruptChunk:  # (a text chunk that is not the context's: none of it is handed over)
        return None
    n = len(results)
    got = sum(pf.received[i][0].tokens for i in range(n))
    ids = pf.token_ids
    missing = (len(ids) - got if ids is not None
               else meta.tokens - got + (len(hashes or ()) - meta.chunks) * meta.chunk_tokens)
    report = FetchReport.from_timings(deadline_ms=pf.deadline_ms, controller=pf.controller, sent_at=pf.sent_at,
                                      end=end, received={i: pf.received[i] for i in range(n)},
                                      decode_times={i: pf.decode_times[i] for i in range(n)}, missing_tokens=missing,
                                      recompute_us_per_token=recompute_us_per_token)
    return KVFetchResult(results, report, tuple(meta.geometry),  # type: ignore[arg-type]
                         missing_token_ids=ids[got:] if ids is not None else [],
                         missing_chunks=len(hashes) - n if hashes is not None else 0, token_ids=ids)


def _keeps_partial(err: TokenwireError) -> bool:
    """Whether a failed fetch's decoded chunks are still the context's: not when the server sent something broken
    (a corrupt chunk, frames that do not add up, a protocol error that closed the connection)."""
    return not isinstance(err, KVCorruptChunk) and err.code not in (ErrorCode.MALFORMED_FRAME,
                                                                    ErrorCode.FRAME_TOO_LARGE)


def _own_error(err: TokenwireError) -> TokenwireError:
    """A copy of ``err`` for one fetch to raise with its own ``partial``: a connection's end is one error shared by
    every fetch open on it, and kept as ``close_error`` (the partial of one fetch would have been another's, and the
    connection would have held its tensors). Same type, message and attributes."""
    try:
        return copy.copy(err)
    except Exception:  # (an error type this cannot rebuild: raised as it is, without a partial)
        return err


def _forget_decodes(pf: _PendingFetch) -> None:
    """Decodes nobody will await (the fetch failed on another chunk, or timed out): cancel those not yet done
    and read the outcome of those done, so asyncio logs no "Future exception was never retrieved". Then let go of
    them and of payloads still waiting for KV_META: a failed fetch's error keeps ``fetch_kv``'s frame (and so
    ``pf``) alive in its traceback while the caller holds it for its ``partial``, which has what it uses."""
    for fut in pf.decodes.values():
        if not fut.done():
            fut.cancel()
        elif not fut.cancelled():
            fut.exception()
    pf.decodes.clear()
    pf.waiting.clear()


# How often a fetch waiting without a fixed bound samples its progress: the quiet time before it fails is measured
# from the last change seen, so it runs at most this much past the last real progress.
STALL_POLL_S = 0.25
# The quiet a fetch without ``timeout_s`` is allowed (see :func:`_stall_bounds`). Once something came: at least
# QUIET_FLOOR_S and the deadline, and GAP_FACTOR times the longest wait for progress it has seen so far, that part
# capped at MAX_GAP_QUIET_S (a server that went silent for good fails within it). One worker thread serves every
# fetch's lookup and encodes in arrival order, so under load a fetch sees long gaps while it is being served: a fixed
# 2 s failed 33 of 619 fetches (the server counted them abandoned) that were still arriving.
QUIET_FLOOR_S = 2.0
GAP_FACTOR = 4.0
MAX_GAP_QUIET_S = 30.0
# Before anything came (KV_META): the server's lookup waits its turn on that worker, and the server itself fails a
# lookup the store does not answer ("KV store unavailable") after max(deadline, its RESOLVE_FLOOR_S, 2 s) of the
# store's time. The client waits longer (at least this, 3 x the deadline for long ones) so the server's typed answer
# to a hung store arrives first; it failed at 2 s with a bare "no KV_META". Not a bound on the server's work: a
# lookup queued behind more than this of other fetches' encodes (untimed on the server) still fails here.
PRE_META_QUIET_S = 10.0
SERVER_RESOLVE_FLOOR_S = 2.0  # the daemon's RESOLVE_FLOOR_S (daemon/kv_service.py; a test checks they agree)


def _stall_bounds(deadline_s: float) -> tuple[float, float]:
    """(quiet allowed once something came, before the gap scaling; quiet allowed before anything came) for a fetch
    with this deadline; both are counted from the later of the deadline and the last progress."""
    quiet = max(QUIET_FLOOR_S, deadline_s)
    first = max(PRE_META_QUIET_S, 3 * max(deadline_s, SERVER_RESOLVE_FLOOR_S))
    return quiet, first


async def _event_set_within(event: asyncio.Event, timeout_s: float) -> bool:
    """Whether ``event`` is set within ``timeout_s``."""
    try:
        await asyncio.wait_for(event.wait(), timeout_s)
    except TimeoutError:
        return False
    return True


async def _wait_while_progressing(pf: Any, progress: Callable[[], Any], deadline_s: float, quiet_s: float, *,
                                  first_quiet_s: float | None = None, gap_factor: float = 0.0,
                                  max_gap_quiet_s: float = math.inf,
                                  silent: Callable[[], float | None] | None = None,
                                  clock: Callable[[], float] | None = None,
                                  wait: Callable[[float], Awaitable[bool]] | None = None) -> None:
    """Wait for ``pf``'s end; ``TimeoutError`` once ``progress()`` (KV_META, chunks, chunk bytes) has not changed
    for ``quiet_s``, counted from the later of the deadline and the last change (so a fetch stalled from its
    start fails at deadline + ``quiet_s``).

    ``first_quiet_s`` (default ``quiet_s``) replaces ``quiet_s`` until the first change (the server's lookup may
    wait in its queue). Once changes have come, the quiet allowed is ``max(quiet_s, min(max_gap_quiet_s,
    gap_factor x the longest wait between changes so far))``, the wait for the first change included: a fetch that
    was served slowly so far is given as much again, a busy server's gaps being no sign of a dead one.

    Progress is sampled every ``min(STALL_POLL_S, quiet_s / 4)``. It used to be sampled once per quiet period,
    the first sample taken at the fetch's start: KV_META that came before a stall counted as progress at the
    first check, and the next quiet period ran from that check, not from the progress, so a fetch stalled early
    failed a whole quiet period late (a 1-s deadline after 5 s where ~3 s is documented, a 5-s one after 15 s,
    not 10). ``clock`` (default: the loop's) and ``wait`` (``pf.event`` set within a timeout?) are for tests.

    ``silent`` (the connection's silence: seconds since the server's last datagram, None while it answers) cuts
    ``first_quiet_s`` to ``quiet_s``, counted as after KV_META (from the deadline, or the server's last packet if
    later): that longer wait is for a live server's typed answer about its store, which a
    server that acknowledges none of the pings sent while the fetch is pending will not send (a 500-ms fetch on a
    connection whose server was gone failed after 10.5 s). Only the silence since this fetch began counts: an
    idle connection hears nothing between fetches."""
    now_of = clock if clock is not None else asyncio.get_running_loop().time
    ended_within = wait if wait is not None else functools.partial(_event_set_within, pf.event)
    start = now_of()
    seen, last = progress(), start
    allowed = quiet_s if first_quiet_s is None else first_quiet_s
    longest = 0.0  # the longest wait between two changes seen (from the start to the first one included)
    step = max(min(STALL_POLL_S, quiet_s / 4), 1e-3)  # (a quiet_s of 0 must not spin)
    while True:
        now = now_of()
        give_up = max(start + deadline_s, last) + allowed
        if now >= give_up:
            raise TimeoutError(f"no progress for {allowed:g} s")
        if last == start and silent is not None and allowed > quiet_s:
            quiet_for = silent()  # (nothing came yet: the server's silence since this fetch began)
            # (as after KV_META: the quiet counts from the deadline on, or from the last packet if later)
            if quiet_for is not None and quiet_for >= quiet_s and now - start >= deadline_s + quiet_s:
                raise TimeoutError(f"no progress, and no packet from the server, for {quiet_s:g} s")
        if await ended_within(min(step, give_up - now)):
            return
        current = progress()
        if current != seen:
            changed = now_of()
            longest = max(longest, changed - last)
            seen, last = current, changed
            allowed = max(quiet_s, min(max_gap_quiet_s, gap_factor * longest))


def _warm_decoder() -> float:
    """Load torch and the codec, compile or load its CPU kernels (the daemon's start-up warm-up,
    ``cachegen.codec.warm_up``); the seconds it took."""
    from .cachegen.codec import warm_up

    return warm_up()


def _warmed(fut: Future[float]) -> None:
    """A warm-up that failed costs nothing but its time: the first decode meets the same problem and fails its
    chunk with the reason. Read here, so that no "exception was never retrieved" is logged."""
    exc = None if fut.cancelled() else fut.exception()
    if exc is not None:
        log.warning("KV codec warm-up failed: %s: %s", type(exc).__name__, exc)


_warm_lock = threading.Lock()
_warm_up: Future[float] | None = None  # the process's codec warm-up, once started
WARM_WAIT_S = 5.0  # what connect_kv waits for it at most


def _forget_warm_up() -> None:
    """In a forked child: the parent's warm-up future has no thread behind it there (one forked while it ran
    stayed RUNNING, and every connect_kv in the child waited for it for ever); the child warms up afresh."""
    global _warm_lock, _warm_up
    _warm_lock, _warm_up = threading.Lock(), None


os.register_at_fork(after_in_child=_forget_warm_up)


def _start_warm_up(pool: ThreadPoolExecutor) -> Future[float]:
    """The process's codec warm-up: started once, on the first connection's decode thread; later connections
    share its future (one that failed is not tried again: the first decode says why)."""
    global _warm_up
    with _warm_lock:
        if _warm_up is None:
            _warm_up = pool.submit(_warm_decoder)
            _warm_up.add_done_callback(_warmed)
        return _warm_up


_DECODE_RATES: dict[str, DecodeRate] = {}
_DECODE_RATES_LOCK = threading.Lock()


def process_decode_rate(device: str) -> DecodeRate:
    """This process's decode rate on ``device``, which its connections share: it is the host's and the codec's, not
    one connection's. Per connection, a connection's first fetch told the server nothing (planned at the configured
    50 M elements/s), and so did every fetch of a client opening a connection per fetch."""
    with _DECODE_RATES_LOCK:
        return _DECODE_RATES.setdefault(device, DecodeRate())


class KVConnection(SessionProtocol):
    """A client connection to a KV channel endpoint (from :func:`connect_kv`)."""

    def __init__(self, quic: QuicConnection, stream_handler: Any = None, *, decode_device: str = "cpu",
                 auth_token: str | None = None, warm: bool = True, keepalive: bool = False) -> None:
        super().__init__(quic, stream_handler,
                         session_factory=lambda q: KVClientSession(q, keepalive=keepalive))
        self._auth = auth_token
        self._fetches: dict[int, _PendingFetch] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tw-kv-decode")
        # On the decode thread, while the handshake runs (connect_kv waits for its end): a process's first decode
        # loaded torch, the codec and its kernels inside the first fetch's deadline (~0.4 s: 507 ms then 127 ms
        # for the same 250-ms fetch)
        self.warmed: Future[float] | None = _start_warm_up(self._pool) if warm else None
        self.decode_device = decode_device
        self.kv.decode_rate = process_decode_rate(decode_device)
        self.close_error: TokenwireError | None = None  # set once the connection has ended (idle timeout, ...)
        self.closed_locally = False  # close() ended the connection, not the server, the path or an error
        # fetches waiting, in call order, for the server's stream limit to let one more open (_fetch_slot)
        self._slot_waiters: deque[asyncio.Event] = deque()

    @property
    def closed(self) -> bool:
        """Whether the connection has ended; a fetch on it fails at once (open a new one)."""
        return self.close_error is not None

    def close(self, *args: Any, **kwargs: Any) -> None:
        # aioquic ignores a close once one has begun (the server's, a protocol error's): only this one is ours. The
        # fetches still waiting then fail as closed here: the server's "no reason given (code 0x0)" they read
        # before was this side's own close (the end of `async with connect_kv(...)`, in another task too)
        if self._quic._close_event is None and not self.session.closed:
            self.closed_locally = True
        super().close(*args, **kwargs)

    @property
    def kv(self) -> KVClientSession:
        assert isinstance(self.session, KVClientSession)
        return self.session

    def _stream_free(self) -> bool:
        """Whether the server's stream limit (QUIC's MAX_STREAMS: its concurrent-fetch limit, ``MAX_FETCHES`` by
        default) lets this side open one more fetch stream now."""
        quic = self._quic
        return quic.get_next_available_stream_id() // 4 < quic._remote_max_streams_bidi

    async def _fetch_slot(self) -> None:
        """Wait, in call order, until a fetch may open its stream without going past the server's limit.

        aioquic would hold such a stream back by itself, but the fetch's clock (its report's ``fetch_ms``, the
        stall timer that fails a fetch once nothing has come for its deadline past the deadline) would then run
        while it waited, counting time that was neither the server's nor the link's. Before the server advertised
        its limit, the 17th fetch at once went out and was refused with LIMIT_EXCEEDED."""
        if not self._slot_waiters and self._stream_free():
            return
        turn = asyncio.Event()
        self._slot_waiters.append(turn)
        try:
            while True:
                await turn.wait()
                turn.clear()
                if self.close_error is not None:
                    raise self.close_error
                if self._slot_waiters[0] is turn and self._stream_free():
                    return  # (the caller opens its stream before its next await: no other waiter can take it)
        finally:
            self._slot_waiters.remove(turn)
            self._wake_slot_waiter()  # the next in line: there may be credit for it too, or this one gave up

    def _wake_slot_waiter(self) -> None:
        """Let the first waiting fetch check for a free stream (every one, once the connection has ended)."""
        if not self._slot_waiters:
            return
        if self.close_error is not None:
            for turn in self._slot_waiters:
                turn.set()
        elif self._stream_free():
            self._slot_waiters[0].set()

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        super().datagram_received(data, addr)
        self._wake_slot_waiter()  # (a MAX_STREAMS frame raises the limit, and makes no event of its own)

    def handle_session_events(self, events: list[SessionEvent]) -> None:
        for ev in events:
            if isinstance(ev, ConnectionEnded):
                self.close_error = (closed_locally_error() if self.closed_locally else
                                    closed_error(ev.error_code, ev.reason, idle_timeout_in_force(self._quic),
                                                 "KV connection", awaiting=bool(self._fetches)))
                for other in self._fetches.values():
                    other.error = other.error or self.close_error
                    other.event.set()
                self._wake_slot_waiter()
                continue
            pf = self._fetches.get(getattr(ev, "stream_id", -1))
            if pf is None:
                continue
            if isinstance(ev, KVMetaReceived):
                pf.meta = ev.meta
                for hdr, payload in pf.waiting:
                    self._start_decode(pf, hdr, payload)
                pf.waiting.clear()
            elif isinstance(ev, KVChunkReceived):
                self.kv.ack(ev.stream_id, ev.header, ev.first_at, ev.done_at)
                pf.received[ev.header.index] = (ev.header, ev.first_at, ev.done_at)
                # Chunks have their own streams: one can arrive before KV_META (its packet lost). A codec
                # chunk then waits for it, to be checked against the model fingerprint and geometry; KV_DONE
                # follows KV_META on the fetch stream, so nothing waits past the fetch's end.
                if ev.header.level == TEXT or pf.meta is not None:
                    self._start_decode(pf, ev.header, ev.payload)
                else:
                    pf.waiting.append((ev.header, ev.payload))
            elif isinstance(ev, KVDoneReceived):
                pf.done = ev.done
            elif isinstance(ev, KVFetchFailed):
                # after our own close nothing more is received: the failure is the close's, not the server's
                pf.error = pf.error or (closed_locally_error() if self.closed_locally else ev.error)
                # the session ended the fetch with a FIN (a chunk's CRC, the server's ERROR or reset), which a server
                # that has sent KV_DONE counts as completed: a reset instead, before this batch's transmit sends it
                self._abandon(ev.stream_id)
            if pf.error is not None or (pf.done is not None and len(pf.received) == pf.done.chunks):
                pf.event.set()
        self.transmit()

    def _abandon(self, sid: int) -> None:
        """End a fetch this side failed or gave up on (a timeout, a chunk that does not decode, a cancelled task,
        any error) with RESET_STREAM ``CANCELLED`` on its stream, never a FIN: the server reads a FIN after KV_DONE
        as every chunk decoded (``tokenwire_kv_fetches_total{outcome="completed"}`` and a deadline-ratio sample),
        and a fetch that timed out with its chunks received but none decoded was counted done in time. Every server
        version counts a reset as abandoned. A FIN the session queued and this side has not sent yet is dropped
        with it (aioquic sends nothing more of a reset stream); the session's end of the fetch follows (its
        STOP_SENDING on chunk streams still arriving; the FIN it would write cannot follow the reset)."""
        if not self.kv.closed:  # (a connection that has ended sends nothing)
            with contextlib.suppress(AssertionError, ValueError, RuntimeError):  # the stream is gone already
                self._quic.reset_stream(sid, ErrorCode.CANCELLED)
        self.kv.finish(sid)

    def _start_decode(self, pf: _PendingFetch, hdr: KvChunk, payload: bytes) -> None:
        fut = asyncio.get_running_loop().run_in_executor(self._pool, self._decode, pf, hdr, payload)
        fut.add_done_callback(functools.partial(self._decoded, pf, hdr))
        pf.decodes[hdr.index] = fut

    def _decoded(self, pf: _PendingFetch, hdr: KvChunk, fut: asyncio.Future[Any]) -> None:
        """A codec chunk decoded: its rate feeds the connection's decode rate, which later fetches tell the server
        (``KVClientSession.decode_rate``). On the loop, not the decode thread: the session is not thread-safe."""
        if hdr.level == TEXT or pf.meta is None or fut.cancelled() or fut.exception() is not None:
            return
        t0, t1 = pf.decode_times.get(hdr.index, (0.0, 0.0))
        layers, heads, dim = pf.meta.geometry
        self.kv.decode_rate.observe(2 * layers * heads * dim * hdr.tokens, t1 - t0)

    def _decode(self, pf: _PendingFetch, hdr: KvChunk, payload: bytes) -> ChunkResult:
        t0 = time.monotonic()
        try:
            if hdr.level == TEXT:
                if len(payload) != 4 * hdr.tokens:
                    raise KVCorruptChunk(f"text chunk {hdr.index}: {len(payload)} bytes for {hdr.tokens} tokens")
                ids = list(struct.unpack(f"<{hdr.tokens}i", payload))
                return ChunkResult(hdr.index, hdr.level, None, ids)
            from .cachegen.codec import decode_chunk
            from .cachegen.errors import KVCodecError

            meta = pf.meta
            assert meta is not None  # codec chunks wait for KV_META (handle_session_events)
            layers, heads, dim = meta.geometry
            try:
                _check_codec_header(hdr, meta, payload)
                kv = decode_chunk(payload, device=self.decode_device, expect_fingerprint=meta.fingerprint,
                                  expect_geometry=(layers, heads, dim),
                                  max_elements=2 * layers * heads * dim * hdr.tokens)
            except KVCodecError as exc:
                raise KVCorruptChunk(f"chunk {hdr.index} does not decode: {exc}") from None
            return ChunkResult(hdr.index, hdr.level, kv, None)
        finally:
            pf.decode_times[hdr.index] = (t0, time.monotonic())

    async def fetch_kv(self, *, model: str, deadline_ms: float, token_ids: Iterable[SupportsIndex] | None = None,
                       hashes: Iterable[bytes | str] | None = None, controller: str = "tokenwire",
                       recompute_us_per_token: int | None = None, timeout_s: float | None = None,
                       prefix: bool = False) -> KVFetchResult:
        """Fetch a context's KV (by token ids or chunk hashes) within ``deadline_ms``.

        ``token_ids``: any integers (Python, numpy or torch, e.g. a tokenizer's array); ``hashes``: the chunk
        hashes as ingest returns them (hex strings) or as 16-byte ``bytes``, in chain order from chunk 0.

        ``prefix=True``: when the store holds only a prefix of the context (an earlier turn of the conversation),
        fetch that prefix instead of failing with :class:`KVNotFound`; the result's ``missing_token_ids`` (part of
        :meth:`KVFetchResult.text_token_ids`) are left for the engine to prefill, and the controller counts their
        recompute against the deadline. The prefix is matched in whole stored chunks (the store's chunks are
        addressed by a hash of everything before them); not even the first chunk stored is still ``KVNotFound``.

        Returns the decoded chunks (torch tensors shaped like the engine's cache, or token ids for chunks sent
        as text) and a :class:`FetchReport`. Raises :class:`KVNotFound`, :class:`KVCorruptChunk` (a chunk that
        does not decode or cannot belong to the fetch: its size, index, tokens, or a text chunk's ids),
        :class:`KVError` (``MALFORMED_FRAME``: KV_META or KV_DONE out of order or not adding up; ``CANCELLED``: this
        side closed the connection, however its ``async with`` was left) or
        :class:`RemoteError` (an ERROR, or a chunk stream the server reset); a missed deadline is reported, not
        raised (the data is still valid). An error raised once the fetch was sent carries what had come: ``partial``,
        a :class:`KVFetchResult` of the leading chunks decoded by then (``prefix_kv()`` and ``text_token_ids()`` still
        make up the whole context, the rest in ``missing_token_ids``), None if none had, and never for a corrupt
        chunk or frames that do not add up; and ``silent_s``, how long nothing had come from the server, when that
        means the server or the path is gone (a timeout's message says so, or that the server still answers and is
        only slow). A fetch the server would refuse (a deadline of 0, an unknown
        controller, a non-integer token id) raises ``ValueError`` before it is sent. A fetch that raises (however:
        a timeout, a cancelled task too) is reset on the wire, which the server counts as abandoned; only a fetch
        whose every chunk decoded ends with the FIN that it counts as completed.

        A connection carries at most the server's fetch limit at once (:data:`MAX_FETCHES`, 16, by default; QUIC's
        stream limit tells the client): a fetch past it waits, in call order, until one has ended, and only then
        is sent; its deadline and its report's ``fetch_ms`` count from then (the 17th fetch at once was refused
        with LIMIT_EXCEEDED). For many more at once, open more connections.

        ``timeout_s``: how long the whole call may take (a wait for a fetch slot, KV_META, every chunk, KV_DONE, and
        decoding the chunks: it bounded only their receipt) before giving up with :class:`KVError`
        (``UPSTREAM_TIMEOUT``). By default
        there is no fixed bound: the fetch fails once nothing new (KV_META, a chunk, bytes of one) has come, after
        the deadline, for the quiet it is allowed. Before KV_META: ``max(10 s, 3 x max(deadline, 2 s))``, longer
        than the server's own bound on a lookup the store does not answer, so that its "KV store unavailable"
        arrives first; a lookup queued on the server's one worker behind more than that of other fetches' encodes
        (which the server does not count against the store) still fails here, as a timeout; a server silent (no
        packet, pings unanswered) for ``max(2 s, deadline)`` past the deadline fails it then, as after it. After it:
        ``max(2 s, deadline, 4 x the longest wait for progress so far)``, the last term at most 30 s, so a fetch
        served slowly by a busy server is waited for (a fixed 2 s failed fetches still arriving under load) while
        one that went silent for good fails within 30 s (or its deadline) of its last progress. A large context
        that keeps arriving (this fetch's chunk bytes count, not only whole chunks; other fetches' bytes do not)
        is received whole, late as it may be. (The connection's QUIC idle timeout, 60 s, also ends every fetch
        of a server that sends nothing at all.) ``timeout_s`` must be a positive
        finite number of seconds or None (the default: no fixed bound); 0, a negative number, NaN, an infinity or a
        non-number (``"5"``) raises ``ValueError`` before the fetch is sent.
        """
        if self.close_error is not None:
            raise self.close_error
        deadline = _deadline_ms(deadline_ms)
        timeout_s = _timeout_s(timeout_s)
        ids = _token_ids(token_ids)
        hs = _chunk_hashes(hashes)
        # named by argument here: the frame check says "kvfetch: empty token id list", a wire detail
        if (ids is None) == (hs is None):
            raise ValueError("invalid fetch: pass exactly one of token_ids and hashes")
        if ids is not None and not ids:
            raise ValueError("invalid fetch: token_ids is empty (a fetch names its context by its token ids)")
        req = KvFetch(model=model, deadline_ms=deadline, token_ids=ids, hashes=hs, controller=controller,
                      recompute_us_per_token=recompute_us_per_token, auth=self._auth, prefix=bool(prefix) or None)
        try:
            check_outgoing(req, "fetch")
        except ValueError as exc:
            raise ValueError(_as_arguments(str(exc))) from None
        called = time.monotonic()
        try:
            # (timeout_s bounds the whole call, this wait too; asyncio.timeout, not wait_for: in this task, so that
            # the stream is opened before any other waiter runs and takes the same slot)
            async with asyncio.timeout(timeout_s):
                await self._fetch_slot()
        except TimeoutError:
            raise KVError(f"KV fetch timed out after {timeout_s:g} s waiting for a free fetch slot on its connection "
                          f"(the server's limit on fetches at once, {MAX_FETCHES} by default); nothing was sent",
                          code=ErrorCode.UPSTREAM_TIMEOUT) from None
        if self.close_error is not None:
            raise self.close_error
        pf = _PendingFetch(self.clock(), deadline, controller, ids)
        sid = self.kv.fetch(req)
        self._fetches[sid] = pf
        self.transmit()
        decoded = False  # every chunk decoded and checked: only then the FIN (_abandon)
        try:
            started = time.monotonic()
            if timeout_s is not None:
                await asyncio.wait_for(pf.event.wait(), called + timeout_s - started)
            else:
                quiet, first_quiet = _stall_bounds(deadline / 1000)
                await _wait_while_progressing(
                    pf, lambda: (len(pf.received), pf.meta is not None, self.kv.bytes_in(sid)),
                    deadline / 1000, quiet, first_quiet_s=first_quiet, gap_factor=GAP_FACTOR,
                    max_gap_quiet_s=MAX_GAP_QUIET_S, silent=lambda: self.kv.silent_for(self.clock()))
            if pf.error is not None:
                raise _own_error(pf.error)
            if pf.done is None or pf.meta is None:  # the session fails KV_DONE before KV_META: not reached
                raise KVError("KV_DONE before KV_META", code=ErrorCode.MALFORMED_FRAME)
            asked = len(ids) if ids is not None else None
            if asked is not None and (pf.meta.tokens > asked or (not prefix and pf.meta.tokens != asked)):
                raise KVError(f"the server sent {pf.meta.tokens} tokens of KV for a context of {asked}",
                              code=ErrorCode.MALFORMED_FRAME)
            if hs is not None and (pf.meta.chunks > len(hs) or (not prefix and pf.meta.chunks != len(hs))):
                raise KVError(f"the server sent {pf.meta.chunks} chunks for {len(hs)} hashes",
                              code=ErrorCode.MALFORMED_FRAME)
            results: list[ChunkResult] = []
            for i in range(pf.done.chunks):
                if timeout_s is not None:  # decoding gets what receipt left of it (none left: a decode not done fails)
                    results.append(await asyncio.wait_for(pf.decodes[i], called + timeout_s - time.monotonic()))
                else:
                    results.append(await pf.decodes[i])
            end = self.clock()
            got = sum(hdr.tokens for hdr, _first, _done in pf.received.values())
            if got != pf.meta.tokens or pf.done.chunks != pf.meta.chunks:
                raise KVError(f"the server announced {pf.meta.chunks} chunks of {pf.meta.tokens} tokens and sent "
                              f"{pf.done.chunks} of {got}", code=ErrorCode.MALFORMED_FRAME)
            _check_done_levels(pf.done, results)
            _check_text_ids(results, pf.received, ids)
            decoded = True
        except TokenwireError as exc:
            if exc is not pf.error:  # (the copy raised above; never a shared error)
                self._interrupted(exc, pf, hs, recompute_us_per_token, self.clock())
            raise
        except TimeoutError:
            now = self.clock()
            err = KVError(f"KV fetch timed out: {len(pf.received)} chunks received"
                          + (f" of {pf.meta.chunks}" if pf.meta is not None else ", no KV_META")
                          + (f" ({sum(f.done() and not f.cancelled() for f in pf.decodes.values())} decoded)"
                             if pf.done is not None else "")
                          + f" after {time.monotonic() - started:.1f} s (deadline {deadline} ms)"
                          + self._silence_said(now), code=ErrorCode.UPSTREAM_TIMEOUT)
            self._interrupted(err, pf, hs, recompute_us_per_token, now)
            raise err from None
        finally:
            # the FIN tells the server the fetch completed (its outcome and deadline ratio); any other exit,
            # CancelledError and KeyboardInterrupt included, abandons it
            if decoded:
                self.kv.finish(sid)
            else:
                self._abandon(sid)
            self.transmit()
            self._fetches.pop(sid, None)
            _forget_decodes(pf)
        # what the server lacked of the context: by hashes, chunk_tokens per missing chunk, as the server counts
        missing = (len(ids) - pf.meta.tokens if ids is not None
                   else (len(hs or ()) - pf.meta.chunks) * pf.meta.chunk_tokens)
        report = FetchReport.from_timings(deadline_ms=deadline, controller=controller, sent_at=pf.sent_at,
                                          end=end, received=pf.received, decode_times=pf.decode_times,
                                          missing_tokens=missing, recompute_us_per_token=recompute_us_per_token)
        return KVFetchResult(results, report, tuple(pf.meta.geometry),  # type: ignore[arg-type]
                             missing_token_ids=ids[pf.meta.tokens:] if ids is not None else [],
                             missing_chunks=len(hs) - pf.meta.chunks if hs is not None else 0, token_ids=ids)

    def _silence_said(self, now: float) -> str:
        """What a timed-out fetch's message adds: whether the server went silent (the path or the server is gone:
        a new connection may do better) or still answers (a slow server: the same connection is fine). A user
        could not tell the two apart: both were "KV fetch timed out: 3 chunks received of 8 after 2.5 s"."""
        silent = self.kv.silent_for(now)
        if silent is not None:
            return f": no packet from the server for {silent:.1f} s, pings unanswered: server or path gone"
        heard = self.kv.datagram_at
        if heard is None:
            return ""
        if now - heard <= 2 * KV_RECOVERY_PING_S:  # (a ping would have been answered by now: it was)
            return f": the server still answers (a packet {now - heard:.1f} s ago): slow, not gone"
        return f": the server's last packet came {now - heard:.1f} s ago"  # (too soon to call it gone)

    def _interrupted(self, err: TokenwireError, pf: _PendingFetch, hashes: list[bytes] | None,
                     recompute_us_per_token: int | None, now: float) -> None:
        """Give the error of a fetch that failed after it was sent (this fetch's own instance) its ``partial`` (the
        leading chunks decoded: :func:`_partial_result`) and ``silent_s`` (how long the server had been silent, when
        that long means it or the path is gone)."""
        silent, heard = self.kv.silent_for(now), self.kv.datagram_at
        if silent is None and isinstance(err, RemoteError) and err.path_lost and heard is not None:
            silent = now - heard  # (the idle timer's close: silence itself, however short that timeout)
        err.silent_s = silent
        if _keeps_partial(err):
            err.partial = _partial_result(pf, hashes, recompute_us_per_token, now)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._pool.shutdown(wait=False)


def closed_locally_error() -> KVError:
    """What the fetches still waiting, and later ones, get once this side closed its connection."""
    return KVError("KV connection closed locally (the end of `async with connect_kv(...)`)", code=ErrorCode.CANCELLED)


def _check_decode_device(device: Any) -> None:
    """``ValueError`` naming ``decode_device`` unless this process can allocate on it (torch is imported only
    for another device than the CPU: this module never imports it at module level)."""
    if isinstance(device, str) and device == "cpu":
        return
    try:
        from .cachegen.codec import check_device
    except ImportError as exc:  # no torch (the ml extra): nothing could decode on any device
        raise ValueError(f"decode_device {device!r} needs torch: {exc}") from None
    from .cachegen.errors import InvalidInput

    try:
        check_device(device)
    except InvalidInput as exc:
        raise ValueError(f"decode_device: {exc}") from None


@contextlib.asynccontextmanager
async def connect_kv(host: str, port: int = 4434, *, verify: bool = True, cafile: str | Path | None = None,
                     cadata: bytes | str | None = None, server_name: str | None = None, decode_device: str = "cpu",
                     ecn: bool | None = None, timeout: float = 10.0, auth_token: str | None = None, warm: bool = True,
                     certfile: str | Path | None = None, keyfile: str | Path | None = None,
                     keepalive: bool = False) -> AsyncIterator[KVConnection]:
    """Open a KV channel connection; ``conn.fetch_kv(...)`` fetches contexts over it.

    ``auth_token``: for a server with authentication (the daemon's ``[auth]`` tokens); every fetch carries it,
    as the KV server checks each fetch's token (a missing or wrong one fails that fetch with ``UNAUTHORIZED``).
    ``cafile``/``cadata``: the CAs to trust, a PEM file or PEM text (bytes or str), as for ``connect``.
    ``certfile``/``keyfile``: a client certificate, for daemons configured with ``server.client_ca`` (their KV
    endpoint closes a connection without a verified one with ``UNAUTHORIZED``).
    ``ecn``: as for ``connect`` (on by default where the platform can): the KV_ACKs carry the ECN counts that the
    server's scalable (``prague``) controller answers CE marks with.

    ``decode_device``: where chunks are decoded (``"cpu"``, ``"cuda"``, ``"cuda:1"``...); one this process cannot
    use (no such device, a CPU-only torch) raises ``ValueError`` here, before connecting: it used to pass, and
    the first fetch failed with a bare ``AssertionError`` from torch once its first chunk was decoded.

    ``keepalive``: PING the server every third of the idle timeout (60 s) between fetches too, for a connection
    kept across an engine's turns: without it, one idle that long ends (both ends silent), and the next fetch on
    it fails at once with the idle timeout's error (``path_lost``: fetch again on a new connection).

    ``warm`` (default): load torch and the codec and compile or load its kernels, as the daemon does at start,
    once per process, on a worker thread while the handshake runs; the connection is handed over when that is
    done, so the process's first fetch does not spend ~0.4 s of its deadline on it (the first connection takes
    that much longer; later ones nothing). ``conn.warmed``: its ``concurrent.futures.Future`` (the seconds it
    took). A warm-up that fails is logged, not raised. ``warm=False`` for a process that never decodes KV.

    Fails like :func:`tokenwire.transport.client.connect`: ``ConnectTimeout`` after ``timeout`` seconds
    without an answer, ``ConnectRefused`` at once where nothing listens (Linux: ICMP port unreachable),
    ``HandshakeError`` (reason, TLS alert) when the server refuses the handshake; all are ``ConnectError``.
    A ``cafile``/``cadata`` with no usable certificate raises :class:`CertificateFileError` (a ``ValueError``,
    exported here as by the chat client) before anything is sent.
    """
    _check_decode_device(decode_device)
    config = kv_quic_config(client_configuration(server_name=server_name, cafile=cafile, cadata=cadata,
                                                 verify=verify, certfile=certfile, keyfile=keyfile))
    make = functools.partial(KVConnection, decode_device=decode_device, auth_token=auth_token, warm=warm,
                             keepalive=keepalive)
    async with open_client(host, port, configuration=config, ecn=ecn, timeout=timeout, create_protocol=make) as p:
        assert isinstance(p, KVConnection)
        if p.warmed is not None and not p.warmed.cancelled():
            # shielded: a cancelled connect must not cancel the process's one warm-up; bounded: a cold numba cache
            # takes seconds, and past WARM_WAIT_S the first fetch had better pay the rest than the connect
            with contextlib.suppress(Exception):  # a failed warm-up is logged (_warmed); the fetch will say why
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(p.warmed)), WARM_WAIT_S)
        yield p
