"""The daemon's KV store service: ingest a context's KV once, encode chunks per level on first need, serve them.

An LLM engine puts a context's KV (per-layer ``(K, V)`` torch tensors) and its token ids, via the Python API
(:meth:`KVService.ingest`) or the Unix socket (:func:`~.kv_ingest.serve_kv_ingest`, for engines in another process).
Per chunk of the prefix-hash chain the store keeps:

* ``<hash>.meta``: model, fingerprint, geometry, dtype, chunk index, the chunk's token ids (msgpack);
* ``<hash>.src``: the chunk's KV exactly as ingested (fp16/bf16/fp32 bytes, ``[L, 2, T, H*D]``), the source
  every level is encoded from: nothing is lost by choosing a level;
* ``<hash>.<level>``: a CacheGen bitstream, written the first time a fetch (or a prewarm) needs it.

Every store call and every encode runs on one worker thread (:attr:`KVService.pool`), so the event loop never
waits on disk, Redis or the codec. torch is imported only inside functions (here and in :mod:`.kv_ingest`'s
client), and in the daemon only when ``[kv]`` is enabled. What a chunk's metadata holds is :mod:`.kv_meta`'s,
the Unix socket :mod:`.kv_ingest`'s and the daemon's start-up :mod:`.kv_runtime`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import struct
import threading
import time
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

from tokenwire.transport.cachegen.errors import KVCodecError
from tokenwire.transport.errors import ErrorCode
from tokenwire.transport.frames import KvFetch
from tokenwire.transport.kv_channel import ContextPlan, KVError, KVNotFound
from tokenwire.transport.kv_controller import LEVELS, TEXT, predicted_size
from tokenwire.transport.kv_server_session import FETCH_PRINCIPAL

from .bounded_cache import BoundedCache
from .kv_meta import (
    _DTYPES,
    ChunkMeta,
    KVIngestError,
    PutHashes,
    _check_context,
    _check_prewarm,
    _meta_cost,
    source_id,
)
from .kv_store import (
    ChunkStore,
    ReportEvery,
    StoreError,
    chain_root,
    chain_step,
    chunk_hashes,
    chunk_of,
    kind_of,
    object_key,
    scope_problem,
)
from .memory_budget import MemoryBudget

log = logging.getLogger("tokenwire.kv")

MAX_INGEST_BYTES = 8 << 30
CACHE_ENTRIES = 1 << 16  # chunk metadata and encoded sizes kept in memory (a miss reads the store)
# ...and the metadata's estimated bytes (BoundedCache): ~10 KB per 256-token chunk, so ~6,000 chunks (1.6 M tokens
# of context) before the least recent go; by entries alone it held up to ~745 MB of evicted chunks' token ids
META_CACHE_BYTES = 64 << 20
# A fetch's lookup in the store (resolve) is bounded by the fetch's deadline, never below this: a hung Redis
# (SIGSTOP) answered only at its socket timeout (10 s), after a client with a shorter deadline had given up with "KV
# fetch timed out ... no KV_META", never hearing that the store did not answer. The floor keeps a healthy store that
# is slower than a tiny deadline (a long context's lookups) from being called unavailable.
RESOLVE_FLOOR_S = 2.0
# How often a waiting lookup looks again while the fetch worker runs nothing (the moment between two jobs: it
# starts then, and its own time counts from there) or only untimed work (another fetch's encode)
RESOLVE_RECHECK_S = 0.05
# How long a fetch job's wait for a chunk's lock is left out of its store time (:meth:`KVService._holding`): the
# ingest worker holds the lock for seconds encoding a prewarm level (CPU work, not the store's), but also across
# its store writes; past this the wait counts again, so a write hung under the lock (a hung disk or Redis) is
# reported by the lookup's bound as "KV store unavailable", not waited for without end. Well above a prewarm's
# encodes of one chunk (seconds each on 2 busy cores).
LOCK_UNTIMED_S = 60.0


warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


_T = TypeVar("_T")


class _TimedPool(ThreadPoolExecutor):
    """A thread pool that knows since when its running jobs have waited on the store (:meth:`running_since`). A
    fetch's lookup is bounded by its deadline so that a hung store is reported (:meth:`KVService.resolve`); counted
    from its submit, the bound also took the time it sat queued behind other fetches' encodes, and a healthy store
    under concurrent fetches was called unavailable (a lookup queued behind 2.5 s of moving work failed at 2 s).

    A job's own CPU work and its waits for the other worker are left out too (:meth:`untimed`: the codec's encode,
    a chunk's lock): timed whole, a lookup queued behind one fetch's encode of a long chunk (seconds of CPU) failed
    as "KV store unavailable", with a warning blaming a healthy store. What is timed is the rest, the store's calls
    and the little between them; a job the pool knows nothing of is timed whole, as a hung store call would be.
    (Left out rather than timed in: a store call added later without a mark is timed, and still reported.)"""

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        # a running job's token -> since when it has been waiting on the store (time.monotonic); None in untimed work
        self._since: dict[object, float | None] = {}
        self._since_lock = threading.Lock()
        self._job = threading.local()  # on a worker of this pool: the token of the job it runs

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        """``fn(*args, **kwargs)`` on a worker, its start and end recorded (every job: run_in_executor's too)."""
        token = object()

        def timed() -> _T:
            with self._since_lock:
                self._since[token] = time.monotonic()
            self._job.token = token
            try:
                return fn(*args, **kwargs)
            finally:
                self._job.token = None
                with self._since_lock:
                    del self._since[token]

        return super().submit(timed)

    @contextlib.contextmanager
    def untimed(self) -> Iterator[None]:
        """Within the block the running job's clock stops (work that is not the store's), and restarts at its end.
        Anywhere but on this pool's workers (the ingest worker's prewarm encode) it does nothing."""
        token = getattr(self._job, "token", None)
        if token is None:
            yield
            return
        with self._since_lock:
            outer = self._since[token]
            self._since[token] = None
        try:
            yield
        finally:
            with self._since_lock:
                self._since[token] = None if outer is None else time.monotonic()  # (nested: still stopped)

    def running_since(self) -> float | None:
        """Since when the running job has waited on the store (the latest such start of those running); None while
        none runs, or while it is in untimed work. With every worker busy a queued job waits on all of them: this
        is the one that has waited the shortest (the fetch pool has one)."""
        with self._since_lock:
            return max((since for since in self._since.values() if since is not None), default=None)


def _after(hashes: Sequence[str], i: int) -> Sequence[str]:
    """The hashes after the ``i``-th: the chunks that follow it in a fetch's chain."""
    return hashes[i + 1 :]


def _end_unclaimed(work: Future[ContextPlan]) -> None:
    """A lookup whose fetch stopped waiting for it (cancelled, out of time): its plan, if it came, is ended (on the
    worker's thread, or at once when it had ended)."""
    if not work.cancelled() and work.exception() is None:
        work.result().end()


class _Missing(KVNotFound):
    """A context not stored (a fetch's NOT_FOUND), with how many of its chunks were (``found``, of ``total``):
    of a scoped fetch's two lookups, the one that found more is the one said."""

    def __init__(self, found: int, total: int, message: str | None = None) -> None:
        hint = f" (prefix=True fetches the {found} stored)" if found else ""
        super().__init__(message or f"context not stored: {found} of {total} chunks found{hint}")
        self.found = found


def _out_of_order() -> KVError:
    return KVError("the chunk hashes are not one context's chain in order from its first chunk (as ingest "
                   "returned them)", code=ErrorCode.BAD_REQUEST)


def checked_scope(scope: object, check: Callable[[str], str | None] | None = None) -> str | None:
    """A put's ``scope`` (None: shared), or :class:`KVIngestError` with why it cannot scope a put: the name rule
    (:func:`~.kv_store.scope_problem`), then ``check`` (the daemon's, against the auth in force). The daemon's
    ingest and the engine's ``put_kv_unix`` (the name rule only, before it connects) say it in the same words."""
    if scope is None:
        return None
    problem = scope_problem(scope)
    if problem is None and check is not None:
        problem = check(str(scope))
    if problem is not None:
        shown = repr(scope) if isinstance(scope, str) else type(scope).__name__
        raise KVIngestError(f"invalid scope {shown:.80}: {problem}")
    return str(scope)


def default_fingerprint(model: str, layers: int, heads: int, head_dim: int) -> int:
    from tokenwire.transport.cachegen.smollm import model_fingerprint

    return model_fingerprint(model, layers, heads, head_dim)


class KVService:
    """Store + lazy encoder + :class:`~tokenwire.transport.kv_server_session.KVProvider` for the KV channel."""

    def __init__(self, store: ChunkStore, *, chunk_tokens: int = 256,
                 put_memory_bytes: int = MAX_INGEST_BYTES,
                 check_scope: Callable[[str], str | None] | None = None) -> None:
        self.store = store
        self.chunk_tokens = chunk_tokens
        # the daemon's check of a put's scope against the auth in force (why no fetch could have that principal,
        # or None); every put's scope is held to kv_store.scope_problem first, with or without it
        self._scope_check = check_scope
        # the ingest socket's puts in memory at once (bodies read, being chunked and stored): kv.ingest_memory_mb
        self.put_memory = MemoryBudget(put_memory_bytes)
        self.pool = _TimedPool(max_workers=1, thread_name_prefix="tw-kv-store")  # fetches (see resolve)
        # ingests (with their prewarm encodes) on their own worker: on the fetch worker, a fetch of a small
        # encoded context waited behind another engine's ingest and missed its deadline (1.3 s against 0.15)
        self.ingest_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tw-kv-ingest")
        # caches of what the store holds (a miss re-reads it): bounded, as a long-running daemon sees every
        # chunk it ever stored, evicted ones included
        self._meta: BoundedCache[str, ChunkMeta] = BoundedCache(CACHE_ENTRIES, META_CACHE_BYTES, _meta_cost)
        self._sizes: BoundedCache[tuple[str, str], int] = BoundedCache(CACHE_ENTRIES, 0, lambda _: 0)  # (by entries)
        self._lock = threading.Lock()
        store.on_evicted = self._evicted  # (a local store's evictions; a shared one's go by the bounds)
        self._chunk_locks = [threading.Lock() for _ in range(64)]
        # set at close: a put in progress stops at its next chunk (a 60k-token put with prewarm kept the
        # daemon 17-19 s past its drain timeout)
        self._closing = threading.Event()
        self.encodes = 0
        self._unreadable_meta = ReportEvery()  # metadata this version cannot read: a miss, logged now and then
        self._unanswered = ReportEvery()  # lookups the store did not answer within their fetch's deadline
        # counted for the daemon's metrics (the ingest worker writes them)
        self.ingests = 0
        self.ingest_errors = 0
        self.ingested_tokens = 0

    # -- ingest (worker thread) -------------------------------------------------------------------------------
    def check_scope(self, scope: object) -> str | None:
        """A put's ``scope`` as given (None: shared), or :class:`KVIngestError` naming why no fetch could ever
        have that principal (:func:`~.kv_store.scope_problem`, then the daemon's ``check_scope``): a scoped put
        that no fetch can find is refused at the put, not stored for nobody."""
        return checked_scope(scope, self._scope_check)

    def ingest_sync(self, model: str, token_ids: Sequence[int], kv: Sequence[tuple[Any, Any]], *,
                    fingerprint: int | None = None, prewarm: Sequence[str] = (),
                    scope: str | None = None) -> list[str]:
        """Store a context's KV (per layer ``(K, V)``, ``[1, H, T, D]`` or ``[H, T, D]``); returns chunk hashes.
        ``scope``: a principal's name (an auth token's, or a certificate's ``cert:`` one); only fetches with that
        principal find the context (:func:`~.kv_store.chain_root`). None: shared, found by every fetch."""
        try:
            hashes = self._ingest_sync(model, token_ids, kv, fingerprint=fingerprint, prewarm=prewarm, scope=scope)
        except Exception:
            self.count_ingest_error()
            raise
        with self._lock:
            self.ingests += 1
            self.ingested_tokens += len(token_ids)
        return hashes

    def count_ingest_error(self) -> None:
        """One refused put, from the ingest worker or the event loop (the socket's header check): locked."""
        with self._lock:
            self.ingest_errors += 1

    def _ingest_sync(self, model: str, token_ids: Sequence[int], kv: Sequence[tuple[Any, Any]], *,
                     fingerprint: int | None, prewarm: Sequence[str], scope: str | None) -> list[str]:
        import torch

        from tokenwire.transport.cachegen.codec import stack_kv
        from tokenwire.transport.cachegen.errors import InvalidInput

        token_ids = _check_context(model, token_ids, fingerprint, self.chunk_tokens)
        prewarm = _check_prewarm(prewarm)
        scope = self.check_scope(scope)
        try:
            x, geo = stack_kv(kv, dtype=None)  # in the input's dtype: the stored source is exactly that
        except InvalidInput as exc:
            raise KVIngestError(f"bad KV tensors: {exc}") from None
        if geo.n_tokens != len(token_ids):
            raise KVIngestError(f"KV holds {geo.n_tokens} tokens but {len(token_ids)} token ids were given")
        dtype = str(kv[0][0].dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise KVIngestError(f"unsupported dtype {dtype}")
        if not all(bool(torch.isfinite(layer).all()) for layer in x):  # per layer: a mask of all is half its size
            raise KVIngestError("KV contains NaN or infinity")
        x = x.to(kv[0][0].dtype).cpu()
        fp = fingerprint if fingerprint is not None else default_fingerprint(model, geo.n_layers, geo.n_heads,
                                                                           geo.head_dim)
        hashes = chunk_hashes(token_ids, model=model, chunk_tokens=self.chunk_tokens, scope=scope)
        # sources, metadata (the model's name and up to 5 bytes per token id) and each object's envelope
        need = x.element_size() * x.numel() + len(hashes) * (128 + len(model.encode())) + 5 * len(token_ids)
        if need > self.store.capacity_bytes:  # it would evict itself while being stored
            raise KVIngestError(f"a context of ~{need} bytes does not fit the store's capacity of "
                                f"{self.store.capacity_bytes} bytes (kv.capacity_mb)")
        kept_other = 0  # chunks kept as stored whose source is not this put's KV (an earlier put's)
        for i, h in enumerate(hashes):
            self._check_open(i, len(hashes))
            lo = i * self.chunk_tokens
            meta = ChunkMeta(model, fp, geo.n_layers, geo.n_heads, geo.head_dim, dtype, i,
                             tuple(token_ids[lo : lo + self.chunk_tokens]))
            with self._chunk_lock(h):  # a fetch encoding this chunk meanwhile sees it before or after, whole
                stored = self._stored_as(h)
                if stored is not None and stored == meta and self._keep_readable(h, stored, x, lo):
                    meta = stored  # as stored: with the identity of the source kept (this put's may differ)
                    # what is stored stays ("re-ingest keeps what is stored"), but a put with other KV under the
                    # same fingerprint is told: every put said ok while a context was left of two puts' chunks
                    if source_id(self._source_of(x, lo)) != stored.source:
                        kept_other += 1
                else:
                    # new, or the same tokens under another fingerprint, dtype or geometry (a fine-tune that
                    # kept its name), or a source that is not its metadata's: replace it whole; the old source
                    # under new metadata served wrong KV. Metadata goes first: a write failing half-way leaves a
                    # chunk without metadata (a miss), never a new source under the old metadata
                    source = self._source_of(x, lo)
                    meta = replace(meta, source=source_id(source))
                    for lv in ("meta", *LEVELS):
                        self.store.delete(object_key(h, lv))
                    # source first, metadata last: a chunk with metadata always has its source. Across daemons
                    # on a shared store another put may land between the two: the identity in the metadata
                    # makes such a pair a miss at its first read (and the next put replaces it)
                    self.store.put(object_key(h, "src"), source)
                    self.store.put(object_key(h, "meta"), meta.pack())
                    with self._lock:
                        for lv in LEVELS:
                            self._sizes.pop((h, lv))
                self._remember(self._meta, h, meta)
            for lv in prewarm:
                self._check_open(i + 1, len(hashes))
                self.encoded_sync(h, lv)
        if kept_other:
            self._report_kept_other(model, kept_other, len(hashes))
        # the store may have trimmed the put to room it could make (every other chunk pinned by a fetch in progress,
        # or the context larger than what could go): it said ok for every chunk while fetches then missed the tail
        present = self.store.contains_many([object_key(h, "meta") for h in hashes])
        prefix = present.index(False) if False in present else len(hashes)
        if prefix < len(hashes):
            self._report_trimmed(model, prefix, len(hashes))
        return PutHashes(hashes, kept_other=kept_other, stored=prefix)

    def _warn_put(self, kind: str, message: str) -> None:
        """``message`` as a warning, at most one a minute for each ``kind`` of put problem (the rest counted and
        said with the next line): a put that kept chunks with other KV, a put the store trimmed."""
        with self._lock:
            report = self.__dict__.setdefault(f"_{kind}_report", ReportEvery())
        held = report.due()
        if held is not None:
            log.warning("%s%s", message, f"; {held} more such puts since the last line" if held else "")

    def _report_trimmed(self, model: str, stored: int, total: int) -> None:
        self._warn_put("trimmed", f"a put of {model!r} is stored for its first {stored} of {total} chunks only: the "
                       "store could not make room for the rest (the chunks it could evict are being sent by fetches "
                       "in progress, or kv.capacity_mb is small for such contexts); put it again later")

    def _report_kept_other(self, model: str, kept: int, total: int) -> None:
        self._warn_put("kept_other", f"a put of {model!r} kept {kept} of its {total} chunks as stored with other KV "
                       "than the put's (an earlier put under the same fingerprint; what is stored is kept: delete it "
                       "or change the fingerprint to replace it)")

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    def _check_open(self, stored: int, total: int) -> None:
        """Refuse the rest of a put once the service is closing: the chunks already written stay, each whole."""
        if self._closing.is_set():
            raise KVIngestError(f"the daemon is stopping: {stored} of {total} chunks stored; put the context again")

    def _stored_tail(self, parent: str, ids: Sequence[int], like: ChunkMeta | None,
                     model: str) -> tuple[str, ChunkMeta] | None:
        """The longest chunk stored after ``parent`` that is shorter than ``ids`` and whose tokens begin it: the
        previous prompt's last chunk, which a longer context's chain hashes over a whole chunk and never names.
        Every shorter length is hashed (one incremental hash) and looked up at once; a chunk of another model,
        fingerprint, geometry or dtype than ``like`` (the chunk before it) is not taken."""
        h = hashlib.blake2b(bytes.fromhex(parent), digest_size=16)
        candidates: list[str] = []
        for t in ids[: len(ids) - 1]:
            h.update(struct.pack("<q", t))  # the byte stream chain_step packs at once
            candidates.append(h.copy().hexdigest())
        stored = self.store.contains_many([object_key(c, "meta") for c in candidates])
        for n in range(len(candidates), 0, -1):
            if not stored[n - 1]:
                continue
            m = self._usable(candidates[n - 1])
            if m is None or m.model != model or len(m.token_ids) != n:
                continue
            if like is not None and (m.fingerprint, m.layers, m.heads, m.head_dim, m.dtype) != (
                    like.fingerprint, like.layers, like.heads, like.head_dim, like.dtype):
                continue
            return candidates[n - 1], m
        return None

    def _usable(self, h: str, later: Callable[[], Sequence[str]] = tuple) -> ChunkMeta | None:
        """Chunk ``h``'s metadata when it can be sent: its metadata and its source are stored. A chunk without its
        source (removed at the store's start as truncated, or deleted when a read found it corrupt) is a miss, the
        end of a prefix fetch: taken as stored while an encoded level of it was, it failed every prefix fetch of its
        context mid-way with "chunk ... is no longer stored" as soon as a level not stored was asked for. Its
        metadata and levels are removed then (dead weight, counted in the store's bytes), with the chunks that
        ``later()`` lists (those known to follow it: unreachable without it; asked for only then). Under the chunk's
        lock: an ingest replacing the chunk (metadata deleted, then written) is seen before or after, never half-way
        as a miss."""
        with self._holding(h):
            m = self.meta_sync(h)
            if m is None:
                return None
            if m.source is None:  # an earlier version's: its source cannot be proven its own. Left in place
                self._report_unreadable(h, "its metadata records no source identity (written by an earlier "
                                        "tokenwire version; the next put replaces it)")
                return None
            if not self.store.contains(object_key(h, "src")):
                self._drop_unsourced(h, later())
                return None
            return m

    def _drop_unsourced(self, h: str, later: Sequence[str] = ()) -> None:
        """Remove what is left of chunk ``h``, found without its source (:meth:`ChunkStore.drop_unsourced`), and
        the chunks ``later`` after it, and forget what this process cached of them. A store that cannot delete (a
        read-only mount) logs why: still a miss."""
        try:
            if self.store.drop_unsourced(h, later) is None:
                return  # its source is back (put again by another daemon sharing the store): nothing cached goes
        except StoreError:
            return
        self._uncache(h, *later)

    def _found_mismatched(self, h: str, problem: str) -> None:
        """Chunk ``h``'s source is not its metadata's (``problem`` says how): counted and logged by the store."""
        self.store.found_mismatched(h, problem)

    def _drop_mismatched(self, h: str, blob: bytes | None, problem: str) -> None:
        """Chunk ``h``, read with metadata payload ``blob`` (None: from this process's cache), has a source its
        metadata does not name, or one that does not encode: count it, and remove its metadata and levels while
        that metadata is still there (:meth:`ChunkStore.drop_mismatched`), so that the next fetch is a miss at it
        and the next put replaces it. Without this every fetch of it failed mid-way, and a re-put that found its
        metadata kept it. A store that cannot delete logs why: still a miss for this fetch."""
        self._found_mismatched(h, problem)
        try:
            if blob is None:  # a store only this process writes: the chunk's lock (held) orders its writers
                blob = self.store.get(object_key(h, "meta"))
            if blob is None or self.store.drop_mismatched(h, blob) is None:
                return  # put again since (by another daemon sharing the store): nothing cached goes
        except StoreError:
            return
        self._uncache(h)

    def _report_unreadable(self, h: str, why: str) -> None:
        held = self._unreadable_meta.due()
        if held is not None:
            log.warning("KV chunk %s: %s: a miss%s", h, why, f"; {held} more since the last such line" if held else "")

    async def ingest(self, model: str, token_ids: Sequence[int], kv: Sequence[tuple[Any, Any]], *,
                     fingerprint: int | None = None, prewarm: Sequence[str] = (),
                     scope: str | None = None) -> list[str]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.ingest_pool, lambda: self.ingest_sync(
            model, token_ids, kv, fingerprint=fingerprint, prewarm=prewarm, scope=scope))

    def ingest_raw_sync(self, model: str, token_ids: Sequence[int], shape: Sequence[int], dtype: str,
                        data: bytes | bytearray, *, fingerprint: int | None = None,
                        prewarm: Sequence[str] = (), scope: str | None = None) -> list[str]:
        """Ingest from raw bytes laid out ``[L, 2, H, T, D]`` (the Unix-socket path)."""
        import torch

        if dtype not in _DTYPES or len(shape) != 5 or shape[1] != 2 or any(type(n) is not int or n < 1
                                                                            for n in shape):
            self.count_ingest_error()
            raise KVIngestError("shape must be [layers, 2, kv_heads, tokens, head_dim] and dtype one of "
                                + ", ".join(_DTYPES))
        # read-only bytes: nothing writes to this view (a writable copy doubled the peak); torch's warning about
        # it is silenced once, at import (catch_warnings on this worker thread would race the event loop's)
        t = torch.frombuffer(data, dtype=getattr(torch, dtype)) if data else torch.empty(0)
        if t.numel() != shape[0] * 2 * shape[2] * shape[3] * shape[4]:
            self.count_ingest_error()
            raise KVIngestError(f"{len(data)} bytes do not hold a {list(shape)} {dtype} tensor")
        t = t.reshape(*shape)
        kv = [(t[i, 0], t[i, 1]) for i in range(shape[0])]
        return self.ingest_sync(model, token_ids, kv, fingerprint=fingerprint, prewarm=prewarm, scope=scope)

    def _chunk_lock(self, h: str) -> threading.Lock:
        """One of a few locks, by chunk: an ingest replacing a chunk and a fetch encoding it take turns."""
        return self._chunk_locks[int(h[:8], 16) % len(self._chunk_locks)]

    @contextlib.contextmanager
    def _holding(self, h: str) -> Iterator[None]:
        """Chunk ``h``'s lock (:meth:`_chunk_lock`) for the block. The wait for it is not the store's time on the
        fetch worker (:meth:`_TimedPool.untimed`) for up to :data:`LOCK_UNTIMED_S`: the ingest worker holds it for
        seconds encoding a prewarm level. Past that it is timed: the holder is in a store call that does not return
        (untimed for ever, a lookup waited without end and nothing said the store was hung)."""
        lock = self._chunk_lock(h)
        with self.pool.untimed():
            got = lock.acquire(timeout=LOCK_UNTIMED_S)
        if not got:
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def _evicted(self, key: str) -> None:
        """The store evicted object ``key``: what the caches hold of it goes (the store's lock is held: this takes
        only the caches' lock, which is never held around a store call). A chunk's source or metadata gone takes
        all of the chunk's entries, a level its size."""
        h, kind = chunk_of(key), kind_of(key)
        if kind not in LEVELS:
            self._uncache(h)
            return
        with self._lock:
            self._sizes.pop((h, kind))

    def _uncache(self, *chunks: str) -> None:
        """What the caches hold of these chunks goes: their metadata and every level's size."""
        with self._lock:
            for h in chunks:
                self._meta.pop(h)
                for lv in LEVELS:
                    self._sizes.pop((h, lv))

    def _remember(self, cache: BoundedCache[Any, Any], key: Any, value: Any) -> None:
        with self._lock:
            cache.put(key, value)

    def _source_of(self, x: Any, lo: int) -> bytes:
        """The stored source of the chunk at token ``lo`` of ``x`` (the context's ``[L, 2, T, H*D]`` KV): its bytes."""
        import torch

        return x[:, :, lo : lo + self.chunk_tokens].contiguous().view(torch.uint8).numpy().tobytes()

    def _keep_readable(self, h: str, stored: ChunkMeta, x: Any, lo: int) -> bool:
        """Chunk ``h`` is stored under metadata ``stored``, equal to the put's: make sure its source still reads
        back and is the one ``stored`` names (:meth:`ChunkMeta.source_problem`), and write it from the put's KV in
        hand (``x``, the chunk at token ``lo``) when it is not but the put's is. False: the chunk must be replaced
        whole (its metadata records no source identity, or names a source other than the put's). "Already
        stored" came from the store's index (on a restart, any file whose header and size were whole), so a
        source whose payload had rotted was kept: the put said ok and the next fetch failed NOT_FOUND (its read
        found the source corrupt); and a source another daemon's put left under this metadata was kept, and its
        KV served under this put's fingerprint.

        Cost: every re-put reads back, checksums and hashes its context's sources, one chunk in memory at a time.
        For a 1,024-token fp16 context that is 22.5 MiB with 30 layers of 3 KV heads of 64 (SmolLM-135M), ~40 ms
        from the page cache on 2 cores (~20 ms of it the identity's SHA-256, the CRC-checked reads the rest), and
        128 MiB with 32 layers of 8 of 128 (Llama-3-8B), about 5.7 times that, more from disk or over Redis; a
        first put, or one under other metadata, reads nothing (it hashes its sources once, for their identity)."""
        if stored.source is None:
            return False
        src = self.store.get(object_key(h, "src"))  # verified (CRC32); a corrupt one is deleted
        if src is not None:
            problem = stored.source_problem(src)
            if problem is None:
                return True
            self._found_mismatched(h, problem)
        source = self._source_of(x, lo)
        if source_id(source) != stored.source:
            return False  # this put's KV is not the metadata's (nondeterministic bytes): replaced whole
        self.store.put(object_key(h, "src"), source)
        # the chunk's files were damaged: its levels are read too, and the store drops those that fail their check
        # (a level that passes is kept: it was encoded from a source of the same metadata)
        for lv in LEVELS:
            key = object_key(h, lv)
            if self.store.contains(key) and self.store.get(key) is None:
                with self._lock:
                    self._sizes.pop((h, lv))
        return True

    def _stored_as(self, h: str) -> ChunkMeta | None:
        """The metadata chunk ``h`` is stored under, when both its source and metadata are there."""
        if not self.store.contains(object_key(h, "src")):
            return None
        data = self.store.get(object_key(h, "meta"))
        if data is None:
            return None
        try:
            return ChunkMeta.unpack(data)
        except KVError:
            return None

    # -- lookups and lazy encoding (worker thread) ---------------------------------------------------------
    def meta_sync(self, h: str) -> ChunkMeta | None:
        read = self._meta_read(h)
        return read[0] if read is not None else None

    def _meta_read(self, h: str) -> tuple[ChunkMeta, bytes | None] | None:
        """Chunk ``h``'s metadata and, when read from the store, its payload (None: from this process's cache)."""
        with self._lock:
            m = self._meta.get(h)
        # a store shared with other daemons (Redis) may have been re-ingested by one of them: read it there
        if m is not None and not self.store.shared and self.store.contains(object_key(h, "meta")):
            return m, None
        data = self.store.get(object_key(h, "meta"))
        if data is None:
            if m is not None:  # evicted: its token ids held memory for a chunk no fetch can have
                with self._lock:
                    self._meta.pop(h)
            return None
        try:
            m = ChunkMeta.unpack(data)
        except KVError as exc:
            # another version's metadata (a field renamed) on a shared store: a miss for this chunk, left in place.
            # Raised, it failed every fetch naming the chunk as INTERNAL, a prefix fetch's earlier chunks with it
            self._report_unreadable(h, f"{exc} (written by another tokenwire version?)")
            return None
        self._remember(self._meta, h, m)
        return m, data

    def encoded_sync(self, h: str, level: str) -> bytes:
        """Chunk ``h`` at ``level``: from the store, else encoded from its source now (and stored)."""
        key = object_key(h, level)
        data = self.store.get(key)
        if data is not None:
            self._remember(self._sizes, (h, level), len(data))
            return data
        with self._holding(h):  # the ingest worker may be replacing this chunk, or encoding it
            return self._encode_locked(h, level, key)

    def _encode_locked(self, h: str, level: str, key: str,
                       read: tuple[ChunkMeta, bytes | None] | None = None) -> bytes:
        """``encoded_sync`` with the chunk's lock held; ``read``: the metadata the caller checked (chunk_sync's).

        On a shared store another daemon may replace the chunk while this one encodes it (no lock spans
        daemons). Its replacement deletes the metadata first and writes it last, so (1) a source read between two
        reads of the same metadata is that metadata's source (else the fetch is refused: it could have been the
        new KV, sent under the old fingerprint), and (2) the level is stored only while the metadata is still the
        one it was encoded under (``put_if``, one step in Redis): stored after the replacement, a stale level sat
        under the new metadata, and a re-put with that metadata kept it, so the context never fetched again; and
        (3) the source is the one the metadata records (:meth:`ChunkMeta.source_problem`), else the chunk is a miss
        and its metadata goes (:meth:`_drop_mismatched`): two replacements at once could leave one put's source
        under the other's metadata for good, which (1) cannot see."""
        data = self.store.get(key)  # encoded by the other worker while this one waited
        if data is not None:
            self._remember(self._sizes, (h, level), len(data))
            return data
        if read is None:
            read = self._meta_read(h)
        src = self.store.get(object_key(h, "src"))
        if read is None or src is None:
            raise KVNotFound(f"chunk {h} is no longer stored (evicted, corrupt, or of another tokenwire version)")
        meta, blob = read
        meta_key = object_key(h, "meta")
        if not self.store.shared:
            blob = None  # a store only this process writes: the chunk's lock already orders its writers
        if blob is not None and self.store.get(meta_key) != blob:
            raise KVNotFound(f"chunk {meta.index} of the context was stored again with other KV during this fetch "
                             "(by another daemon sharing the store); fetch it again")
        # the two reads above prove the source was read while this metadata was stored, not that it is this
        # metadata's: two daemons replacing the chunk at once left one put's source under the other's metadata
        with self.pool.untimed():  # CPU work (seconds for a long chunk): a lookup queued behind it is not failed for it
            problem = meta.source_problem(src)
            encoded = b""
            if problem is None:
                try:
                    encoded = self._encode(meta, src, level)
                except (KVCodecError, RuntimeError, ValueError, TypeError) as exc:
                    # a source that passed every check and still does not encode is no KV of this metadata: a miss
                    # (NOT_FOUND), not INTERNAL "store failure" on every fetch with a traceback in the log
                    problem = f"its source does not encode ({exc.__class__.__name__}: {exc})"
        if problem is not None:
            self._drop_mismatched(h, blob, problem)
            raise KVNotFound(f"chunk {meta.index} of the context is not stored whole ({problem}): a miss until it is "
                             "put again")
        self.encodes += 1
        try:
            if blob is not None:
                self.store.put_if(key, encoded, guard=meta_key, expected=blob)  # False: replaced since; not kept
            else:
                self.store.put(key, encoded)
        except StoreError:
            # a level is a cache: one the store has no room for (a full disk, a Redis at its maxmemory) is sent
            # all the same, as one that does not fit the capacity is; the store logged why. It failed the fetch of
            # a context stored before the disk filled
            pass
        self._remember(self._sizes, (h, level), len(encoded))
        return encoded

    @staticmethod
    def _encode(meta: ChunkMeta, src: bytes, level: str) -> bytes:
        """Chunk ``src`` (a source :meth:`ChunkMeta.source_problem` passed) encoded at ``level``."""
        import torch

        from tokenwire.transport.cachegen.codec import encode_chunk, unstack_kv
        from tokenwire.transport.cachegen.levels import get_level

        t = torch.frombuffer(bytearray(src), dtype=getattr(torch, meta.dtype))
        n_tok = len(meta.token_ids)
        x = t.reshape(meta.layers, 2, n_tok, meta.heads * meta.head_dim).to(torch.float32)
        kv = unstack_kv(x, meta.heads, getattr(torch, meta.dtype))
        raw = min(get_level(level).sink_tokens, n_tok) if meta.index == 0 else 0
        return encode_chunk(kv, level, fingerprint=meta.fingerprint, raw_tokens=raw)

    def resolve_sync(self, fetch: KvFetch, *, pin: bool = False, principal: str | None = None) -> ContextPlan:
        """The fetch's plan. ``pin``: its chunks are pinned against eviction (:class:`~.kv_store.Pins`) from before
        they are looked up until :meth:`ContextPlan.end` (the KV endpoint calls it when the fetch ends, however it
        ends; a plan dropped without it unpins when collected): a put evicting them failed the fetch mid-way.
        ``principal``: the fetching client's (its auth token's name, or its certificate's ``cert:`` one): its
        scope is looked in beside the shared space (:meth:`_resolve_scoped`); None: the shared space only."""
        if not pin:
            return self._resolve_scoped(fetch, None, principal)
        held: list[str] = []
        try:
            plan = self._resolve_scoped(fetch, held, principal)
        except BaseException:
            self.store.pins.release(held)
            raise
        kept = list(plan.handle)
        # (past a prefix fetch's end, and the space a scoped fetch's lookup did not take)
        self.store.pins.release((Counter(held) - Counter(kept)).elements())
        # idempotent, and called when the plan is collected if nothing ended it (a pin must never leak)
        plan.on_end = weakref.finalize(plan, self.store.pins.release, kept)
        return plan

    def _resolve_scoped(self, fetch: KvFetch, held: list[str] | None, principal: str | None) -> ContextPlan:
        """The fetch's plan among what ``principal`` may find: its own scope's contexts and the shared ones, never
        another principal's. Those are keyed under another chain root (:func:`~.kv_store.chain_root`) and never
        looked up, so no answer (a whole fetch's, a prefix's length, a miss's count) depends on whether they exist.
        By token ids each space is looked up on its own: a whole fetch takes the scope's context, else the shared
        one; a prefix fetch the longer prefix (the scope's on a tie). By hashes the chain's first chunk says which
        space the listed chain is in (:meth:`_resolve`)."""
        if principal is None or fetch.token_ids is None:
            return self._resolve(fetch, held, (principal, None) if principal is not None else (None,))
        own: ContextPlan | _Missing
        try:
            own = self._resolve(fetch, held, (principal,))
        except _Missing as exc:
            own = exc
        if isinstance(own, ContextPlan) and not fetch.prefix:
            return own
        try:
            shared = self._resolve(fetch, held, (None,))
        except _Missing as exc:
            if isinstance(own, ContextPlan):
                return own
            raise own if own.found > exc.found else exc from None  # (the shared one's words on a tie: as before)
        return shared if isinstance(own, _Missing) or shared.tokens > own.tokens else own

    def _resolve(self, fetch: KvFetch, held: list[str] | None, scopes: Sequence[str | None]) -> ContextPlan:
        """The fetch's plan in the key spaces of ``scopes`` (a principal's name, None: the shared space): by token
        ids, the one chain of ``scopes[0]``; by hashes, a chain from the root of any of them."""
        total = len(fetch.token_ids if fetch.token_ids is not None else fetch.hashes or [])
        if fetch.token_ids is not None:
            hashes = chunk_hashes(fetch.token_ids, model=fetch.model, chunk_tokens=self.chunk_tokens,
                                  scope=scopes[0])
            total = len(hashes)
        else:
            hashes = [h.hex() for h in fetch.hashes or []]
        if held is not None:  # before any is looked up: an eviction between the lookup and the pin failed it too
            self.store.pins.hold(hashes)
            held.extend(hashes)
        metas: list[ChunkMeta] = []
        chained = fetch.token_ids is not None
        for i, h in enumerate(hashes):
            # chained from the fetch's token ids, the later hashes follow this chunk: unreachable if it is gone.
            # (Hashes a client lists prove nothing before they are checked: none go for them.) Sliced only on a
            # miss: sliced for every chunk, a 4,096-chunk lookup copied ~8 million hashes (27 ms)
            m = self._usable(h, functools.partial(_after, hashes, i) if chained else tuple)
            if m is not None and m.model != fetch.model:
                # (by hashes only: a token-id chain starts from its model) another model's chunk is a miss for this
                # one, as its token ids are: "belongs to model 'm-A'" told a client of m-B that, and whose, it was
                m = None
            if m is None:
                if fetch.prefix and fetch.token_ids is not None:
                    # the chain's later chunks all depend on this one: the prefix ends here, perhaps with the
                    # shorter last chunk of the stored context (the previous turn's prompt)
                    ct = self.chunk_tokens
                    parent = hashes[i - 1] if i else chain_root(fetch.model, scopes[0])
                    tail = self._stored_tail(parent, fetch.token_ids[i * ct : (i + 1) * ct],
                                             metas[-1] if metas else None, fetch.model)
                    if tail is not None:
                        if held is not None:
                            self.store.pins.hold([tail[0]])
                            held.append(tail[0])
                        hashes[i] = tail[0]
                        metas.append(tail[1])
                if chained and not (fetch.prefix and metas):
                    raise _Missing(len(metas), total)
                break  # (by hashes: the chain is checked first, below)
            metas.append(m)
        hashes = hashes[:len(metas)]
        if not chained:  # by hashes: they must be a context's chain from its first chunk, in order
            found = self._proven(hashes, metas, [chain_root(fetch.model, s) for s in scopes])
            if found < total and not (fetch.prefix and found):
                raise _Missing(found, total)
            metas, hashes = metas[:found], hashes[:found]
            ids = [t for m in metas for t in m.token_ids]
            if all(chunk_hashes(ids, model=fetch.model, chunk_tokens=self.chunk_tokens, scope=s) != hashes
                   for s in scopes):
                raise _out_of_order()
        first = metas[0]
        # A context's chunks can be stored under different fingerprints, geometries or dtypes (a shared prefix
        # re-put by another engine replaces its chunks whole): such a context is not usable as a whole; a prefix
        # fetch gets the chunks that agree with chunk 0, up to the first that does not (the rest is missing).
        kind = (first.fingerprint, first.layers, first.heads, first.head_dim, first.dtype)
        for i, m in enumerate(metas):
            if (m.fingerprint, m.layers, m.heads, m.head_dim, m.dtype) != kind:
                if not fetch.prefix:
                    raise _Missing(i, len(metas), f"context not stored as one: chunk {i} is fingerprint "
                                   f"{m.fingerprint}, geometry {(m.layers, m.heads, m.head_dim)}, {m.dtype}; chunk 0 "
                                   f"is {first.fingerprint}, {(first.layers, first.heads, first.head_dim)}, "
                                   f"{first.dtype} (re-put by another engine?)")
                metas = metas[:i]
                hashes = hashes[:i]
                break
        sizes = [{lv: self._sizes.get((h, lv)) or predicted_size(lv, m.elements) for lv in LEVELS}
                 for h, m in zip(hashes, metas, strict=True)]
        stored = sum(len(m.token_ids) for m in metas)
        if fetch.token_ids is not None:
            rest = len(fetch.token_ids) - stored
        else:  # by hashes the missing chunks' lengths are unknown here: at most chunk_tokens each
            rest = (len(fetch.hashes or []) - len(metas)) * self.chunk_tokens
        return ContextPlan(self.chunk_tokens, [len(m.token_ids) for m in metas], [m.elements for m in metas],
                           sizes, (first.layers, first.heads, first.head_dim), first.fingerprint, first.dtype,
                           handle=hashes, rest_tokens=rest)

    @staticmethod
    def _proven(hashes: Sequence[str], metas: Sequence[ChunkMeta], roots: Sequence[str]) -> int:
        """How many of a fetch's listed chunks (found, ``hashes`` with their ``metas``), from the first, are its
        context's chain in order from one of ``roots`` (the key spaces the fetch may use). At the first that is
        not: :func:`_out_of_order` when the chain from a root reaches it through the listed chunks all the same (a
        chain listed out of order), else its position: such a chunk is a miss, as if it were not stored. A client
        can compute a scoped chunk's key (the scope is a principal's name, the rest its tokens): "not in order"
        for another principal's chunk told it that the context existed. Cost: one hash of each chunk's tokens,
        then at most one more per listed chunk (a chunk has one parent)."""
        for i, (h, m) in enumerate(zip(hashes, metas, strict=True)):
            parents = roots if i == 0 else (hashes[i - 1],)
            if any(chain_step(p, m.token_ids) == h for p in parents):
                continue
            by_index: dict[int, list[int]] = {}
            for j, other in enumerate(metas):
                by_index.setdefault(other.index, []).append(j)
            at = i
            while metas[at].index > 0:  # back to the first chunk, by the listed chunk each one follows
                ids = metas[at].token_ids
                at = next((j for j in by_index.get(metas[at].index - 1, ())
                           if chain_step(hashes[j], ids) == hashes[at]), -1)
                if at < 0:
                    return i
            if any(chain_step(r, metas[at].token_ids) == hashes[at] for r in roots):
                raise _out_of_order()
            return i
        return len(metas)

    def chunk_sync(self, plan: ContextPlan, index: int, level: str) -> bytes:
        """Chunk ``index`` of a resolved plan at ``level``, as the plan (and the KV_META sent from it) says it is.
        Under the chunk's lock, so an ingest that re-puts the context meanwhile is seen before or after; a chunk
        it replaced with other KV (another fingerprint, dtype or geometry) is refused, not served into a fetch
        whose other chunks and KV_META are the old put's."""
        h = plan.handle[index]
        with self._holding(h):
            read = self._meta_read(h)
            if read is None:
                raise KVNotFound(f"chunk {h} is no longer stored")
            meta = read[0]
            if (meta.fingerprint, (meta.layers, meta.heads, meta.head_dim), meta.dtype, len(meta.token_ids)) != (
                    plan.fingerprint, tuple(plan.geometry), plan.dtype, plan.token_counts[index]):
                raise KVNotFound(f"chunk {index} of the context was stored again with other KV during this fetch "
                                 f"(now fingerprint {meta.fingerprint}, {meta.dtype}); fetch it again")
            if level == TEXT:
                return struct.pack(f"<{len(meta.token_ids)}i", *meta.token_ids)
            return self._encode_locked(h, level, object_key(h, level), read)

    # -- KVProvider (async, for the channel) -----------------------------------------------------------------
    async def resolve(self, fetch: KvFetch) -> ContextPlan:
        """:meth:`resolve_sync` on the fetch worker, bounded by the fetch's deadline (:data:`RESOLVE_FLOOR_S` at
        least): the fetch fails with "KV store unavailable" (:class:`StoreError`) once the lookup itself, or the job
        running ahead of it on the worker (another fetch's lookup or chunk), has waited on the store that long: the
        store does not answer (a hung Redis). Time queued behind jobs that each end within the bound is not counted:
        that queue is moving, and the store answering (counted, a healthy store under concurrent fetches was called
        unavailable); nor is a job's encode or its wait for a chunk's lock (:meth:`_TimedPool.untimed`). The lookup
        in progress finishes on the worker, when the store answers or its own timeout ends it; one still queued is
        cancelled, as it is when the fetch is (resolve cancelled). The fetching client's principal
        (:data:`~tokenwire.transport.kv_server_session.FETCH_PRINCIPAL`, set by the endpoint): its scope is looked
        in beside the shared space (:meth:`resolve_sync`)."""
        deadline = fetch.deadline_ms / 1000.0
        bound = max(deadline, RESOLVE_FLOOR_S)
        # (the worker's own future: the loop's, once cancelled, drops the plan of a lookup that ran on to its end)
        principal = FETCH_PRINCIPAL.get()  # (read here, on the loop: the worker thread has its own context)
        work = self.pool.submit(functools.partial(self.resolve_sync, fetch, pin=True, principal=principal))
        job = asyncio.wrap_future(work)
        try:
            while not job.done():
                since = self.pool.running_since()  # (the lookup's own, once it runs: the pool has one worker)
                if since is None:  # between two jobs, or in one's untimed work (an encode): look again soon
                    left = RESOLVE_RECHECK_S
                else:
                    left = since + bound - time.monotonic()
                    if left <= 0:
                        break
                await asyncio.wait({job}, timeout=left)  # (never cancels the job; a cancelled resolve does, below)
        except asyncio.CancelledError:
            work.add_done_callback(_end_unclaimed)  # a lookup that ends anyway must not keep its pins
            job.cancel()
            raise
        if job.done():
            return job.result()
        work.add_done_callback(_end_unclaimed)
        job.cancel()
        held = self._unanswered.due()
        floor = bound > deadline  # (a tiny deadline: the lookup was given RESOLVE_FLOOR_S)
        if held is not None:
            used = (f"{bound:g} s (the least a lookup is given; the fetch's deadline is {deadline:g} s)" if floor
                    else f"{bound:g} s (the fetch's deadline)")
            log.warning("KV store %s did not answer a fetch's lookup, or the store call ahead of it on the fetch "
                        "worker, within %s: the fetch failed as \"KV store unavailable\"%s", self.store.where, used,
                        f"; {held} more since the last such line" if held else "")
        raise StoreError("KV store unavailable: no answer within the fetch's deadline "
                         + (f"(nor within {bound:g} s, the least a lookup is given)" if floor else f"({bound:g} s)"))

    async def chunk(self, plan: ContextPlan, index: int, level: str) -> bytes:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.chunk_sync, plan, index, level)

    def _begin_close(self) -> None:
        """Stop taking work without waiting: queued puts and fetches are cancelled, a running put stops at its
        next chunk (or prewarm encode)."""
        self._closing.set()
        self.ingest_pool.shutdown(wait=False, cancel_futures=True)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _join(self) -> None:
        self.ingest_pool.shutdown(wait=True)
        self.pool.shutdown(wait=True)

    def close(self) -> None:
        """Blocking close, for callers without an event loop (on a loop, await :meth:`aclose`)."""
        self._begin_close()
        self._join()
        self.store.close()

    async def aclose(self, timeout: float = 5.0) -> bool:
        """Close without blocking the event loop: the workers are joined on a thread for at most ``timeout``
        seconds. True when they ended (the store is closed too); False when one was still inside a chunk's write
        or encode: the store is then left open for it (closing it under a write would fail that write), and the
        process's exit waits for that one chunk."""
        self._begin_close()
        try:
            await asyncio.wait_for(asyncio.to_thread(self._join), timeout)
        except TimeoutError:
            log.warning("KV workers still busy %.1f s after close; not waiting for them", timeout)
            return False
        self.store.close()
        return True
