"""The KV chunk store's interface and what its two backends share: object keys, the envelope, the prefix-hash
chain, pins, stats, errors and :class:`ChunkStore`.

Chunks are addressed by a prefix-hash chain over token ids (LMCache-style, 256 tokens per chunk by default):
``h_0 = H(model | tokens[0:256])``, ``h_i = H(h_{i-1} | tokens[i*256:(i+1)*256])``, so a chunk's key names
the whole prefix before it, and contexts sharing a prefix share its chunks. A stored object is one chunk at
one level (``<hash>.<level>``), wrapped in an envelope with a CRC32 so that nothing corrupt is ever served.

The backends: :mod:`.kv_store_local` (:class:`~.kv_store_local.LocalChunkStore`, a local directory, the embedded
default) and :mod:`.kv_store_redis` (:class:`~.kv_store_redis.RedisChunkStore`, Redis/Valkey shared by several
daemons). The API is synchronous (file and socket I/O); the daemon calls it from a worker thread.
"""

from __future__ import annotations

import hashlib
import logging
import re
import struct
import threading
import time
import zlib
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack  # type: ignore[import-untyped]  # msgpack ships no hints

from tokenwire.transport.errors import ErrorCode, TokenwireError

log = logging.getLogger("tokenwire.kv")

MAGIC = b"TWKC"
VERSION = 1
ENVELOPE_HEADER = struct.Struct(">4sB3xQI")  # magic, version, pad, payload length, crc32 (the local store reads it)
KEY_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
DEFAULT_CHUNK_TOKENS = 256


class StoreError(TokenwireError):
    """The store failed: a Redis that does not answer, a directory it cannot write. One line, no traceback."""

    code = ErrorCode.INTERNAL


class StoreFullError(StoreError):
    """The store has no room for a write: its disk is full (ENOSPC, EDQUOT) or its Redis is at its maxmemory.
    Its own type, so that a level that cannot be kept is still sent (a level is a cache), and so that the engine
    hears "full" where it heard "ingest failed: OSError" or "KV store unavailable"."""


REPORT_S = 60.0  # a recurring store condition (corrupt objects, a full disk) is logged once per this long


class ReportEvery:
    """Lets one log line through per ``interval`` and counts the rest, so that a condition hit by every fetch
    (a full disk, a read-only mount, objects of another version) is seen without a line per chunk. Thread-safe:
    the fetch and the ingest workers both report."""

    def __init__(self, interval: float = REPORT_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._last: float | None = None
        self._held = 0

    def due(self) -> int | None:
        """None while the last line is recent (this one is counted); else how many were held back since it."""
        with self._lock:
            now = self.clock()
            if self._last is not None and now - self._last < self.interval:
                self._held += 1
                return None
            held, self._held, self._last = self._held, 0, now
            return held


def _held(n: int) -> str:
    return f"; {n} more since the last such line" if n else ""


# blake2b's personalization for a scoped chain's root: another hash function than the shared root's (no
# personalization), so no model name, however spelt, gives a shared root equal to a scoped one
SCOPE_PERSON = b"tokenwire.scope"


def chain_root(model: str, scope: str | None = None) -> str:
    """What the first chunk's hash is chained to: the model's name, and for a scoped put (:func:`scope_problem`)
    its scope too. A scope is a key namespace, not an ACL: a scoped context's chunk keys differ from the shared
    one's and from every other scope's, so a lookup from another principal's chain never meets them, and the store
    needs no per-object owner. No scope: the root of every version before scopes (stored keys unchanged)."""
    if scope is None:
        return hashlib.blake2b(model.encode(), digest_size=16).hexdigest()
    m, s = model.encode(), scope.encode()  # (length-prefixed: ("a", "bc") and ("ab", "c") must differ)
    return hashlib.blake2b(struct.pack("<I", len(m)) + m + s, digest_size=16, person=SCOPE_PERSON).hexdigest()


def scope_problem(scope: object) -> str | None:
    """Why ``scope`` cannot scope a KV put (None when it can): it must be a name some principal can have, by the
    rule every principal's name follows (``config.principal_name_problem``: non-empty, printable, at most 128
    characters; a token's name and a certificate's ``cert:`` principal pass it). The daemon checks further against
    the auth in force (``ingest.principal_problem``, :class:`~.kv_service.KVService`'s ``check_scope``)."""
    from .config import principal_name_problem  # (here: the engine's light put client imports this module)

    if not isinstance(scope, str):
        return "must be a string (a principal's name)"
    return principal_name_problem(scope)  # (a lone surrogate is not printable: refused there)


def chain_step(parent: str, chunk: Sequence[int]) -> str:
    """The hash of a chunk after ``parent`` (the previous chunk's hash, or :func:`chain_root`)."""
    h = hashlib.blake2b(bytes.fromhex(parent), digest_size=16)
    h.update(struct.pack(f"<{len(chunk)}q", *chunk))
    return h.hexdigest()


def chunk_hashes(token_ids: Sequence[int], *, model: str, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 scope: str | None = None) -> list[str]:
    """The prefix-hash chain of a context: one hex key per chunk (the last one may be partial); ``scope``: in that
    principal's namespace (:func:`chain_root`)."""
    if chunk_tokens < 1:
        raise ValueError("chunk_tokens must be >= 1")
    out: list[str] = []
    prev = chain_root(model, scope)
    for i in range(0, len(token_ids), chunk_tokens):
        prev = chain_step(prev, token_ids[i : i + chunk_tokens])
        out.append(prev)
    return out


def object_key(chunk_hash: str, level: str) -> str:
    key = f"{chunk_hash}.{level}"
    if not KEY_RE.match(key):
        raise StoreError(f"invalid chunk key {key!r}")
    return key


def wrap(payload: bytes) -> bytes:
    return ENVELOPE_HEADER.pack(MAGIC, VERSION, len(payload), zlib.crc32(payload)) + payload


def unwrap(blob: bytes) -> bytes | None:
    """The payload, or None when the envelope is truncated, foreign or fails its checksum (see
    :func:`foreign_version` for telling another version's object from a corrupt one)."""
    if len(blob) < ENVELOPE_HEADER.size:
        return None
    magic, version, length, crc = ENVELOPE_HEADER.unpack_from(blob)
    payload = blob[ENVELOPE_HEADER.size :]
    if magic != MAGIC or version != VERSION or len(payload) != length or zlib.crc32(payload) != crc:
        return None
    return payload


def foreign_version(blob: bytes) -> int | None:
    """The envelope version of an object written by another tokenwire version (a whole header, our magic, a
    version other than :data:`VERSION`; 0 was never written), else None. Such an object is a miss, left in place:
    deleted as corrupt, a rolling upgrade had the old daemons on a shared Redis delete every object the new ones
    wrote. Something shorter than a header is corrupt (a truncated write), whatever its first bytes."""
    if len(blob) < ENVELOPE_HEADER.size or blob[:4] != MAGIC or blob[4] in (0, VERSION):
        return None
    return blob[4]


REBUILT_LEVELS = ("low", "medium", "high")  # encoded from a chunk's source whenever needed again
NEEDS_SOURCE = ("meta", *REBUILT_LEVELS)  # a chunk's objects that are dead weight without its source


def chunk_of(key: str) -> str:
    return key.partition(".")[0]


def kind_of(key: str) -> str:
    return key.partition(".")[2]


EVICTION_POLICY = """Encoded levels go first, least recently used first (the service encodes them again from the source
when needed). Storing a level never evicts a source or metadata: when the other levels cannot free enough,
the new level itself is not kept (its caller holds the bytes and serves them). Storing a source or metadata
(an ingest) then evicts whole chunks, source, metadata and levels together, the chunk used least recently
(its latest use) first, not the chunk being written (but see below), and never a chunk before a chunk stored after it in
a context (one its metadata chains to it, see :func:`chain_parent`): a chunk is usable only with every chunk
before it, so a context is evicted from its tail and what is left of it is a prefix a fetch can use. Chunks of
one put or fetch are used in chain order, so plain LRU took a context's first chunk first, and its every other
chunk stayed as dead weight. The store never keeps a chunk whose known parent is gone: a chunk whose metadata
confirms a parent that is not stored is removed at once (an eviction), and an evicted chunk takes its linked
descendants with it (the local store; Redis knows only their count). When the chunks left are all needed by the
chunk being written (the store too small for its context), that chunk goes itself, then its own tail. Plain
per-object LRU let a fetch's own encodings evict its context's sources and metadata, leaving orphans and
contexts no fetch could use.

Chunks pinned by this process's fetches in progress (:class:`Pins`) are never evicted whole (their encoded levels
still go first: a fetch encodes a missing level again from the source): a fetch resolved a context, and a put
evicting its chunks failed it mid-way ("chunk ... is no longer stored", 8 % of fetches under load, after ~10 s
of transfer). When every chunk that could make room is pinned, the chunk being written goes itself (its put is
trimmed to the prefix stored before it, as when the store is too small for its context) rather than a pinned one,
so the capacity still holds. Pins are this process's: another daemon sharing a Redis store cannot see them, and
its puts may still evict a chunk this one is sending (that fetch fails as before)."""


class Pins:
    """The chunks this process's fetches in progress are sending, with a count each (two fetches of one context
    pin its chunks twice, and the first to end must not unpin them for the other). Thread-safe: fetches pin on the
    fetch worker and unpin on the event loop, while the ingest worker's eviction reads them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count: Counter[str] = Counter()

    def hold(self, chunks: Iterable[str]) -> None:
        with self._lock:
            self._count.update(chunks)

    def release(self, chunks: Iterable[str]) -> None:
        with self._lock:
            self._count.subtract(chunks)
            for chunk in [c for c, n in self._count.items() if n <= 0]:
                del self._count[chunk]

    def snapshot(self) -> frozenset[str]:
        """The chunks pinned now (what an eviction must leave)."""
        with self._lock:
            return frozenset(self._count)

    def __len__(self) -> int:
        with self._lock:
            return len(self._count)


def chain_entry(meta: bytes) -> tuple[int, list[int]] | None:
    """A chunk's place in its context, from its metadata's payload (``kv_meta.ChunkMeta.pack``: msgpack with
    the chunk's index ``i`` and token ids ``ids``): (index, token ids); None for anything else (another
    version's metadata, a test's bytes, token ids that are not all integers). A corrupt id was passed on as one:
    a float or a string failed only later, in each caller's hash of the chain, and a bool hashed as 0 or 1."""
    try:
        doc = msgpack.unpackb(meta)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    if not isinstance(doc, dict):
        return None
    index, ids = doc.get("i"), doc.get("ids")
    if type(index) is not int or index < 0 or not isinstance(ids, list) or not ids:
        return None
    if set(map(type, ids)) != {int}:  # exact types, at C speed (bool, an int subclass, is excluded too)
        return None
    return index, ids


def chain_parent(chunk: str, entry: tuple[int, list[int]], candidates: Sequence[tuple[int, str]]) -> str | None:
    """The chunk that ``chunk`` (with ``entry``, see :func:`chain_entry`) follows in its context, among
    ``candidates`` ((index, hash) of chunks whose metadata was seen lately, the latest last): one with the index
    before it that the chain's hash confirms (``chain_step(parent, ids) == chunk``), so a link is never wrong,
    only sometimes not learned (then the chunk is evicted in plain LRU order). A put writes a context's chunks in
    order and a fetch resolves them in order, so the parent's metadata is among the last few seen."""
    index, ids = entry
    if index == 0:
        return None  # chained to the model's root: nothing before it
    for at, candidate in reversed(candidates):
        if at != index - 1 or candidate == chunk:
            continue
        try:
            if chain_step(candidate, ids) == chunk:
                return candidate
        except (ValueError, struct.error):  # not a hash of ours, ids out of range: not its parent
            continue
    return None


CHAIN_MEMORY = 64  # metadata (index, hash) kept to find a chunk's parent among (see chain_parent)


@dataclass
class StoreStats:
    hits: int = 0
    misses: int = 0
    puts: int = 0
    evictions: int = 0
    corrupt: int = 0
    recovered_partial: int = 0  # partial writes and truncated objects removed at the local store's start
    unsourced: int = 0  # chunks whose metadata and levels were removed for want of their source
    foreign: int = 0  # reads of objects written by another tokenwire version (a miss each, left in place)
    # chunks whose source was found not to be their metadata's (another put's, left by two daemons replacing the
    # chunk at once; see kv_meta.ChunkMeta.source): a miss each; those whose metadata and levels went are also
    # counted in ``unsourced``
    mismatched: int = 0


class ChunkStore(ABC):
    capacity_bytes: int
    stats: StoreStats
    _chain_seen: deque[tuple[int, str]]  # (index, hash) of the metadata seen lately: see chain_parent
    _chain_lock: threading.Lock
    shared = False  # other processes write it too: what this one cached about it may be stale
    # told each object key the store evicts for room (LocalChunkStore), with the store's lock held: the KV service
    # drops what it cached about the chunk (its metadata held ~11 KB of token ids per 256-token chunk, kept for
    # every chunk ever put). A Redis store evicts in its server-side script and tells no one: the service's cache
    # bound in bytes covers it. Must not call back into the store.
    on_evicted: Callable[[str], None] | None = None
    where = "the KV store"  # for log lines: the directory, or the Redis URL with its password masked

    @property
    def pins(self) -> Pins:
        """This process's pinned chunks (:data:`EVICTION_POLICY`); made at first use, so that a store whose
        ``__init__`` calls no base class (a test's) has them too."""
        pins = self.__dict__.get("_pins")
        if pins is None:
            pins = self.__dict__.setdefault("_pins", Pins())
        return pins

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The object's payload (verified), or None when absent or found corrupt (then deleted)."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store atomically; evicts least-recently-used objects to stay within the capacity."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def contains(self, key: str) -> bool: ...

    @property
    @abstractmethod
    def used_bytes(self) -> int: ...

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """``contains`` for each key (a store with round trips answers them in one)."""
        return [self.contains(k) for k in keys]

    def drop_unsourced(self, chunk: str, later: Sequence[str] = ()) -> int | None:
        """Remove chunk ``chunk``'s metadata and encoded levels when its source is not stored; None when it is.
        Without its source a chunk is a miss everywhere (a level not stored cannot be encoded), and what is left
        of it was dead weight counted in the store's bytes; with its metadata it counted as stored, and every
        prefix fetch of its context failed mid-way. ``later``: chunks known to follow it in a context (a fetch's
        later hashes, chained from its token ids): they go too, whole (counted as evictions), as every chunk a
        store knows to follow it does (:data:`EVICTION_POLICY`): without it no fetch can use them, and they
        stayed as dead weight until LRU took them. Returns how many of its own objects went. Here a check then
        deletes, all a store that is not :attr:`shared` needs (the service's chunk lock orders its writers); a
        shared store makes the check and the deletes one step, so that a source another daemon puts meanwhile is
        kept."""
        if self.contains(object_key(chunk, "src")):
            return None
        keys = [object_key(chunk, kind) for kind in NEEDS_SOURCE]
        found = [key for key, there in zip(keys, self.contains_many(keys), strict=True) if there]
        for key in found:
            self.delete(key)
        self._dropped_unsourced(chunk, len(found))
        after = [object_key(c, kind) for c in later for kind in ("src", *NEEDS_SOURCE)]
        for key, there in zip(after, self.contains_many(after), strict=True):
            if there:
                self.delete(key)
                self.stats.evictions += 1
        return len(found)

    def drop_mismatched(self, chunk: str, meta: bytes) -> int | None:
        """Remove chunk ``chunk``'s metadata and encoded levels while its metadata still holds ``meta`` (its
        payload), found naming a source other than the one stored (see :meth:`found_mismatched`); None, nothing
        removed, when it holds anything else (put again since). The source stays: on a shared store it may be that
        of a put whose metadata is still to come (two daemons replacing the chunk at once); else the next put of
        the chunk overwrites it, or it is evicted in its turn. Returns how many objects went, counted in
        ``stats.unsourced`` as a chunk without its source is: a miss until put again. Here a check then deletes
        (the service's chunk lock orders this process's writers); a shared store makes them one step, so that
        metadata another daemon writes meanwhile is kept."""
        if self.get(object_key(chunk, "meta")) != meta:
            return None
        keys = [object_key(chunk, kind) for kind in NEEDS_SOURCE]
        found = [key for key, there in zip(keys, self.contains_many(keys), strict=True) if there]
        for key in found:
            self.delete(key)
        self._dropped_mismatched(len(found))
        return len(found)

    def _dropped_mismatched(self, removed: int) -> None:
        if removed:  # (found_mismatched logged it)
            self.stats.unsourced += 1

    def found_mismatched(self, chunk: str, problem: str) -> None:
        """Chunk ``chunk``'s source is not the one its metadata records (``problem``): counted and logged (once per
        REPORT_S). A miss: never served, never kept by a re-put."""
        self.stats.mismatched += 1
        self._report("mismatched", "KV store %s: chunk %s: %s: a miss until put again", self.where, chunk, problem)

    def _dropped_unsourced(self, chunk: str, removed: int) -> None:
        if removed:
            self.stats.unsourced += 1
            self._report("unsourced", "KV store %s: chunk %s has no source: its metadata and levels were removed "
                         "(%d objects; a miss until put again)", self.where, chunk, removed)

    def _chain_link(self, key: str, payload: bytes) -> str | None:
        """The parent of the chunk whose metadata ``key`` holds ``payload`` (read or written now), when it can be
        confirmed (:func:`chain_parent`); remembers this chunk as a candidate parent for the next ones."""
        if kind_of(key) != "meta" or (entry := chain_entry(payload)) is None:
            return None
        chunk = chunk_of(key)
        with self._chain_lock:  # (the fetch and the ingest workers both read and write metadata)
            parent = chain_parent(chunk, entry, list(self._chain_seen))
            self._chain_seen.append((entry[0], chunk))
        return parent

    def put_if(self, key: str, data: bytes, *, guard: str, expected: bytes) -> bool:
        """``put``, only while object ``guard`` holds ``expected`` (its payload); False, nothing stored, otherwise.
        Here a read then a put: atomic against this process's writers (the service's chunk lock orders them),
        all a store that is not :attr:`shared` has. A shared store makes the check and the write one step."""
        if self.get(guard) != expected:
            return False
        self.put(key, data)
        return True

    def _report(self, kind: str, msg: str, *args: Any) -> None:
        """One warning per REPORT_S for each ``kind`` of recurring condition, with how many were held back."""
        # per instance, made at first use (the stores' __init__ do not call one here)
        held = self.__dict__.setdefault("_reports", {}).setdefault(kind, ReportEvery()).due()
        if held is not None:
            log.warning(msg + "%s", *args, _held(held))

    def _found_corrupt(self, key: str) -> None:
        """An object that failed its checksum (deleted by the caller): counted and logged (it was neither)."""
        self.stats.corrupt += 1
        self.stats.misses += 1
        self._report("corrupt", "KV store %s: %s failed its checksum and was deleted (a level is encoded again "
                     "from its source; a source or metadata makes its chunk a miss until put again)",
                     self.where, key)

    def _found_foreign(self, key: str, version: int) -> None:
        """An object of another tokenwire version's envelope: a miss, left in place for the version that reads it."""
        self.stats.foreign += 1
        self.stats.misses += 1
        self._report("foreign", "KV store %s: %s was written by another tokenwire version (envelope version %d; "
                     "this one reads %d): a miss, left in place (daemons sharing a store mid-upgrade?)",
                     self.where, key, version, VERSION)

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

