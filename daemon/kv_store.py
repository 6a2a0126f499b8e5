"""Where encoded KV chunks live: a local directory (embedded default) or Redis/Valkey.

Chunks are addressed by a prefix-hash chain over token ids (LMCache-style, 256 tokens per chunk by default):
``h_0 = H(model | tokens[0:256])``, ``h_i = H(h_{i-1} | tokens[i*256:(i+1)*256])``, so a chunk's key names
the whole prefix before it, and contexts sharing a prefix share its chunks. A stored object is one chunk at
one level (``<hash>.<level>``), wrapped in an envelope with a CRC32 so that nothing corrupt is ever served.

* :class:`LocalChunkStore`: one file per object, written to a temporary file in the same directory,
  fsynced and renamed into place (a crash mid-write leaves only a ``.tmp`` file, removed at the next start),
  checksums verified on every read (a bad file is deleted and reported as a miss), a capacity bound with
  least-recently-used eviction that takes a context from its tail (recency survives restarts through file
  mtimes; the chain's links are learned again from the metadata at start).
* :class:`RedisChunkStore`: the same contract on a Redis/Valkey server shared by several daemons (values in
  the same envelope; recency in sorted sets; eviction by this client under the same byte bound).

The API is synchronous (file and socket I/O); the daemon calls it from a worker thread.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import logging
import os
import re
import stat
import struct
import tempfile
import threading
import time
import urllib.parse
import zlib
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]  # msgpack ships no hints

from tokenwire.transport.errors import ErrorCode, TokenwireError

from .logs import shown_url

log = logging.getLogger("tokenwire.kv")

MAGIC = b"TWKC"
VERSION = 1
_HEADER = struct.Struct(">4sB3xQI")  # magic, version, pad, payload length, crc32
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


def chain_root(model: str) -> str:
    """What the first chunk's hash is chained to: the model's name."""
    return hashlib.blake2b(model.encode(), digest_size=16).hexdigest()


def chain_step(parent: str, chunk: Sequence[int]) -> str:
    """The hash of a chunk after ``parent`` (the previous chunk's hash, or :func:`chain_root`)."""
    h = hashlib.blake2b(bytes.fromhex(parent), digest_size=16)
    h.update(struct.pack(f"<{len(chunk)}q", *chunk))
    return h.hexdigest()


def chunk_hashes(token_ids: Sequence[int], *, model: str, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> list[str]:
    """The prefix-hash chain of a context: one hex key per chunk (the last one may be partial)."""
    if chunk_tokens < 1:
        raise ValueError("chunk_tokens must be >= 1")
    out: list[str] = []
    prev = chain_root(model)
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
    return _HEADER.pack(MAGIC, VERSION, len(payload), zlib.crc32(payload)) + payload


def unwrap(blob: bytes) -> bytes | None:
    """The payload, or None when the envelope is truncated, foreign or fails its checksum (see
    :func:`foreign_version` for telling another version's object from a corrupt one)."""
    if len(blob) < _HEADER.size:
        return None
    magic, version, length, crc = _HEADER.unpack_from(blob)
    payload = blob[_HEADER.size :]
    if magic != MAGIC or version != VERSION or len(payload) != length or zlib.crc32(payload) != crc:
        return None
    return payload


def foreign_version(blob: bytes) -> int | None:
    """The envelope version of an object written by another tokenwire version (a whole header, our magic, a
    version other than :data:`VERSION`; 0 was never written), else None. Such an object is a miss, left in place:
    deleted as corrupt, a rolling upgrade had the old daemons on a shared Redis delete every object the new ones
    wrote. Something shorter than a header is corrupt (a truncated write), whatever its first bytes."""
    if len(blob) < _HEADER.size or blob[:4] != MAGIC or blob[4] in (0, VERSION):
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
    """A chunk's place in its context, from its metadata's payload (``kv_service.ChunkMeta.pack``: msgpack with
    the chunk's index ``i`` and token ids ``ids``): (index, token ids); None for anything else (another
    version's metadata, a test's bytes)."""
    try:
        doc = msgpack.unpackb(meta)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    if not isinstance(doc, dict):
        return None
    index, ids = doc.get("i"), doc.get("ids")
    if type(index) is not int or index < 0 or not isinstance(ids, list) or not ids:
        return None
    return index, ids  # (ids that are not all integers fail chain_step's pack: never a confirmed link)


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
# hashes the local store's start may spend looking for the parents that the mtime order did not give (about 4 us
# each on a 2-core machine): bounds a start with many contexts whose links were not learned
RECOVER_SEARCH_STEPS = 200_000


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
    # chunk at once; see kv_service.ChunkMeta.source): a miss each; those whose metadata and levels went are also
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


LOCK_FILE = ".lock"  # in a local store's directory: held (flock) by the one process that uses the store


def _not_a_directory(root: Path) -> str:
    return f"{root} is not a directory"


def _in_use(root: Path) -> str:
    return f"{root} is in use by another process (another daemon's kv.directory?)"


def check_local_directory(root: Path) -> tuple[str | None, str | None]:
    """What :class:`LocalChunkStore` would make of ``root`` at start, found without creating or locking anything
    (``config check``): (the error it would refuse with, a warning), each in its words. A directory locked by a
    running process is a warning: it is this configuration's own daemon as often as another's."""
    above = next((p for p in root.parents if p.exists()), None)  # the start makes what is missing below it
    if root.exists() and not root.is_dir():
        return _not_a_directory(root), None
    if not root.exists() and above is not None and not above.is_dir():
        return f"cannot use {root}: {os.strerror(errno.ENOTDIR)}", None
    if root.is_dir() and _locked(root / LOCK_FILE):
        return None, _in_use(root)
    where = root if root.is_dir() else above  # what the start writes in: the store, or the folder it makes it in
    if where is not None and os.statvfs(where).f_flag & os.ST_RDONLY:
        return f"cannot use {root}: {os.strerror(errno.EROFS)}", None
    if where is not None and not os.access(where, os.W_OK | os.X_OK):
        # a warning: the daemon may run as another user (the unit's tokenwire) than the one checking
        return None, f"{where} is not writable by this user; the daemon's user must be able to write there"
    return None, None


def _locked(path: Path) -> bool:
    """Whether a process holds the store's exclusive lock on ``path``: a shared lock is tried and let go at once
    (a daemon starting in those microseconds would find the store in use). A lock file that is missing or that
    this user cannot read (the daemon's is 0600): not known to be locked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # releases the shared lock, if taken
    return False


class _NotRegular(Exception):
    """A store path that is no regular file (a directory, FIFO, socket, device, or a symlink to anything)."""


# the errors of opening a path that is no regular file: a symlink (O_NOFOLLOW), a parent that is a file, a socket
_NOT_REGULAR_ERRNOS = (errno.ELOOP, errno.ENOTDIR, errno.ENXIO, errno.EISDIR)


def _read_regular(path: Path) -> bytes:
    """The bytes of ``path`` when it is a regular file; :class:`_NotRegular` otherwise. A directory with a key's name
    failed every read with IsADirectoryError, and a FIFO blocked the store's worker thread for ever (every fetch
    and put after it waited): opened without blocking, not following a symlink (one to /dev/zero would never end),
    and checked by fstat before any read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in _NOT_REGULAR_ERRNOS:
            raise _NotRegular(str(path)) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _NotRegular(str(path))
        with open(fd, "rb", closefd=False) as fh:
            return fh.read()
    finally:
        os.close(fd)


class LocalChunkStore(ChunkStore):
    """Files under ``root`` (see module docstring). Thread-safe."""

    def __init__(self, root: str | Path, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise StoreError("capacity must be positive")
        self.root = Path(root)
        self.where = str(self.root)
        self.capacity_bytes = capacity_bytes
        self.stats = StoreStats()
        self._touch_failed = False  # an mtime that cannot be set (a read-only mount) is logged once
        self._lock = threading.RLock()
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> file size, least recent first
        # the eviction order (EVICTION_POLICY), kept as it changes so that a put into a full store costs what it
        # evicts, not a scan of every object: encoded levels by recency, chunks by their latest use
        self._levels: OrderedDict[str, None] = OrderedDict()
        self._level_bytes = 0
        self._chunks: OrderedDict[str, set[str]] = OrderedDict()
        # the prefix tree, as far as learned (chain_parent): a stored chunk's parent, and a chunk's stored children
        self._parent: dict[str, str] = {}
        self._kids: dict[str, set[str]] = {}
        self._chain_seen = deque(maxlen=CHAIN_MEMORY)
        self._chain_lock = threading.Lock()
        self._used = 0
        self._lock_fd: int | None = None
        self._claim()
        try:
            self._recover()
        except BaseException:  # e.g. an object file this user cannot read: the lock must not outlive us
            self.close()
            raise

    def _claim(self) -> None:
        """Make sure the directory is ours to write, and only ours: two processes on one store each kept their
        own index and capacity (filling twice the capacity between them), and one restarting deleted the
        other's writes in progress as a crash's leftovers."""
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(_not_a_directory(self.root))
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot use {self.root}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreError(_in_use(self.root)) from None
        self._lock_fd = fd
        try:  # the lock file may be writable in a directory that is not (its mode changed since)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-"):
                pass
        except OSError as exc:
            self.close()
            raise StoreError(f"cannot use {self.root}: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def _path(self, key: str) -> Path:
        if not KEY_RE.match(key):
            raise StoreError(f"invalid chunk key {key!r}")
        return self.root / key[:2] / key

    def _recover(self) -> None:
        """Drop partial writes and truncated files; rebuild the LRU index from mtimes. Another version's objects
        are kept, as a read keeps them (see :func:`foreign_version`): indexed, so that eviction still counts and
        removes them. What was dropped is one log line and tokenwire_kv_store_recovered_total (it was neither); the
        prefix tree is learned again from the metadata (:meth:`_relink`, :meth:`_find_parents`), then the metadata
        and levels of chunks left without a source go (:meth:`_without_unsourced`), and so does every chunk after a
        chunk that is gone (:meth:`_drop_unreachable_at_start`): the links are learned first, from every chunk's
        metadata, because a chunk's parent is known only from the parent's name, which went with its metadata."""
        found: list[tuple[float, str, int]] = []
        foreign: set[str] = set()
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                if not f.is_file() or f.is_symlink():
                    continue  # not ours (a subfolder made it fail to open with IsADirectoryError)
                if f.name.endswith(".tmp"):
                    f.unlink(missing_ok=True)
                    self.stats.recovered_partial += 1
                    continue
                if not KEY_RE.match(f.name) or f.name[:2] != sub.name:
                    continue  # a name no key has: indexed, it broke every eviction with "invalid chunk key"
                st = f.stat()
                with f.open("rb") as fh:
                    head = fh.read(_HEADER.size)
                ok = len(head) == _HEADER.size and head[:4] == MAGIC
                if ok and foreign_version(head) is not None:
                    foreign.add(f.name)  # its header may not be ours to measure: kept whole, as a read would keep it
                elif ok:
                    length = _HEADER.unpack(head)[2]
                    ok = st.st_size == _HEADER.size + length
                if not ok:
                    f.unlink(missing_ok=True)
                    self.stats.recovered_partial += 1
                    continue
                found.append((st.st_mtime, f.name, st.st_size))
        for _, key, size in sorted(found):
            self._add(key, size)
        entries = self._relink([key for _, key, _ in found if kind_of(key) == "meta" and key not in foreign], found)
        orphans = self._find_parents(entries)
        gone = self._without_unsourced(found, foreign)
        # what follows a chunk that is gone: the descendants of the unsourced chunks (their links were learned
        # from the metadata just removed), and chunks after a chunk that is not stored at all (a truncated
        # source and metadata). Kept, no fetch could use them, and they counted in the store's bytes until LRU
        evicted_before = self.stats.evictions  # (the objects they had, for the log line: the metric counts those)
        unreachable = self._drop_unreachable_at_start(
            [kid for chunk in gone if chunk not in self._chunks for kid in self._kids.get(chunk, ())] + orphans,
            foreign)
        if self.stats.recovered_partial:
            log.warning("KV store %s: removed %d partial or truncated objects at start (left by a crash or a full "
                        "disk during their write; a level is encoded again, a chunk without its source or metadata "
                        "is a miss until put again)", self.root, self.stats.recovered_partial)
        if self.stats.unsourced:
            log.warning("KV store %s: removed the metadata and levels of %d chunk%s whose source is gone (a miss "
                        "until put again)", self.root, self.stats.unsourced, "" if self.stats.unsourced == 1 else "s")
        if unreachable:
            # the objects too: tokenwire_kv_store_evictions_total counts those (metadata, source, levels), and "2
            # chunks" beside a rise of 4 looked like a miscount
            objects = self.stats.evictions - evicted_before
            log.warning("KV store %s: removed %d chunk%s that follow%s a chunk that is gone (unreachable: a fetch "
                        "needs every chunk before %s; %d object%s, counted as evictions)", self.root, unreachable,
                        "" if unreachable == 1 else "s", "s" if unreachable == 1 else "",
                        "it" if unreachable == 1 else "them", objects, "" if objects == 1 else "s")
        if foreign:
            log.warning("KV store %s: %d objects written by another tokenwire version are kept but not read by this "
                        "one (misses; evicted in their turn)", self.root, len(foreign))
        if found:  # restarted with a smaller capacity: back within it now, not at the next put
            with self._lock:
                self._evict(keep="")

    def _without_unsourced(self, found: list[tuple[float, str, int]], foreign: set[str]) -> set[str]:
        """Remove (files and index) the metadata and levels of chunks without a source file, counted in
        ``stats.unsourced``: a truncated source removed above, or one gone otherwise. They kept the chunk counted
        as stored (its metadata), and every prefix fetch of its context failed mid-way at it. Another version's
        objects stay, as everywhere. Returns the chunks dropped."""
        sourced = {chunk_of(key) for _, key, _ in found if kind_of(key) == "src"}
        dropped: set[str] = set()
        for _, key, _ in found:
            if kind_of(key) in NEEDS_SOURCE and chunk_of(key) not in sourced and key not in foreign:
                self._path(key).unlink(missing_ok=True)
                self._forget(key)
                dropped.add(chunk_of(key))
        self.stats.unsourced += len(dropped)
        return dropped

    def _relink(self, metas: list[str], found: list[tuple[float, str, int]]) -> dict[str, tuple[int, list[int]]]:
        """Learn the prefix tree again from the metadata, read in the order of their mtimes: written (or read) in
        chain order, so a chunk's parent is among the few next to it in that order, before it or, within one
        tick of the file system's clock (equal mtimes, sorted by name), after it: each is looked for among the
        last :data:`CHAIN_MEMORY` read, both ways. Without this, eviction after a restart took a context from its
        first chunk again. Metadata that fails its checksum is left to the read that finds it. Returns each
        chunk's place in its context (:func:`chain_entry`), as read."""
        mtimes = {key: mtime for mtime, key, _ in found}
        entries: dict[str, tuple[int, list[int]]] = {}
        recent: deque[tuple[str, tuple[int, list[int]]]] = deque(maxlen=CHAIN_MEMORY)
        for key in sorted(metas, key=lambda k: (mtimes[k], k)):
            try:
                payload = unwrap(_read_regular(self._path(key)))
            except (OSError, _NotRegular):
                continue
            entry = chain_entry(payload) if payload is not None else None
            if entry is None:
                continue
            chunk = chunk_of(key)
            entries[chunk] = entry
            parent = chain_parent(chunk, entry, [(e[0], c) for c, e in recent])
            if parent is not None:
                self._link(chunk, parent)
            for child, (index, ids) in recent:  # read before their parent (an mtime tie)
                if index == entry[0] + 1 and child not in self._parent and chain_parent(
                        child, (index, ids), [(entry[0], chunk)]) == chunk:
                    self._link(child, chunk)
            recent.append((chunk, entry))
        return entries

    def _find_parents(self, entries: dict[str, tuple[int, list[int]]]) -> list[str]:
        """Look for the parent of every chunk past its context's first that :meth:`_relink` left unlinked (its
        parent not among the metadata read next to it) among every stored chunk that can be it: those of the index
        before it, and those whose index is unknown (no metadata of ours, or one not read), chunks with children
        first (a shared prefix, used since, is far from its old children in mtime order). A parent found is
        linked. Returns the chunks whose parent is not stored (a chunk before them is gone for good: unreachable).
        At most :data:`RECOVER_SEARCH_STEPS` hashes in all: past them a chunk is kept unlinked (its parent may be
        stored), as before."""
        orphans = [c for c, (index, _) in entries.items() if index > 0 and c not in self._parent]
        if not orphans:
            return []
        by_index: dict[int | None, list[tuple[bool, bytes, str]]] = {}
        for chunk in self._chunks:
            entry = entries.get(chunk)
            try:
                name = bytes.fromhex(chunk)
            except ValueError:
                continue  # not a hash of ours: no chunk's parent
            by_index.setdefault(entry[0] if entry is not None else None, []).append(
                (chunk not in self._kids, name, chunk))
        for candidates in by_index.values():
            candidates.sort()  # chunks with children first
        steps, skipped = RECOVER_SEARCH_STEPS, 0
        unreachable: list[str] = []
        for chunk in orphans:
            index, ids = entries[chunk]
            try:
                packed, target = struct.pack(f"<{len(ids)}q", *ids), bytes.fromhex(chunk)
            except (struct.error, ValueError):  # ids out of range, a name no hash has: no parent can be confirmed
                continue
            parent: str | None = None
            searched = True
            for _, name, candidate in (*by_index.get(index - 1, ()), *by_index.get(None, ())):
                if steps <= 0:
                    searched = False
                    skipped += 1
                    break
                steps -= 1
                h = hashlib.blake2b(name, digest_size=16)  # chain_step, the ids packed once per chunk
                h.update(packed)
                if h.digest() == target and candidate != chunk:
                    parent = candidate
                    break
            if parent is not None:
                self._link(chunk, parent)
            elif searched:
                unreachable.append(chunk)
        if skipped:
            log.info("KV store %s: the parents of %d chunks were not looked for at start (past %d hashes): they are "
                     "kept, evicted in plain LRU order", self.root, skipped, RECOVER_SEARCH_STEPS)
        return unreachable

    def _drop_unreachable_at_start(self, chunks: list[str], foreign: set[str]) -> int:
        """Remove ``chunks`` and their linked descendants, files and index (counted as evictions, as a chunk found
        unreachable while running is: it had its source and metadata, and went for want of a chunk before it).
        Another version's objects stay, as everywhere. Returns how many chunks went."""
        removed = 0
        for chunk in chunks:
            if chunk not in self._chunks:
                continue  # (a descendant of one removed before it)
            for gone in (chunk, *self._descendants(chunk)):
                for key in list(self._chunks.get(gone, ())):
                    if key not in foreign:
                        self._path(key).unlink(missing_ok=True)
                        self._forget(key)
                        self.stats.evictions += 1
                removed += 1
        return removed

    @property
    def used_bytes(self) -> int:
        return self._used

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._index

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            blob = _read_regular(path)
        except FileNotFoundError:
            with self._lock:
                self.stats.misses += 1
                if not path.exists():  # a put of this key may have landed since the read (it holds the lock)
                    self._forget(key)
            return None
        except _NotRegular:  # not ours, as _recover says (never indexed): a miss, left where it is
            with self._lock:
                self.stats.misses += 1
            return None
        payload = unwrap(blob)
        with self._lock:
            if payload is None and (version := foreign_version(blob)) is not None:
                self._found_foreign(key, version)  # stays indexed: counted, and evicted in its turn
                return None
            if payload is None:
                self._found_corrupt(key)
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:  # a read-only mount: still a miss (the unlink failed every such fetch)
                    self._report("unlink", "KV store %s: cannot delete the corrupt %s: %s", self.root, key,
                                 exc.strerror or exc)
                self._forget(key)
                return None
            if key in self._index:
                self._touch(key)
                if self._learn(key, payload):  # its parent is gone: unreachable, removed (a hit would fail mid-way)
                    self.stats.misses += 1
                    return None
            self.stats.hits += 1
        try:
            os.utime(path)  # recency that survives a restart
        except FileNotFoundError:
            pass
        except OSError as exc:  # best effort: on a read-only mount every hit failed here, with the data in hand
            if not self._touch_failed:
                self._touch_failed = True
                log.warning("KV store %s: cannot record an object's use in its mtime (%s): hits are served, their "
                            "recency is kept in memory only (lost at a restart); not logged again",
                            self.root, exc.strerror or exc)
        return payload

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        blob = wrap(data)
        if len(blob) > self.capacity_bytes:
            raise StoreError(f"object of {len(blob)} bytes exceeds the store capacity of {self.capacity_bytes}")
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        placed = False  # renamed into place: from then on it is the object, indexed, never removed as a leftover
        try:
            path.parent.mkdir(exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            with self._lock:
                os.replace(tmp, path)
                placed = True
                self._forget(key)
                self._add(key, len(blob))
                self._learn(key, data)  # before the eviction: a new chunk's parent is no longer a leaf
                self.stats.puts += 1
                dfd = os.open(path.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
                self._evict(keep=key)
        except OSError as exc:
            raise self._write_failed(key, exc) from None
        finally:
            if not placed:  # a full disk left the partial .tmp behind, uncounted, until the next start
                _discard(tmp)

    def _write_failed(self, key: str, exc: OSError) -> StoreError:
        """A write's OSError as a one-line :class:`StoreError` naming the directory (the engine heard "ingest
        failed: OSError" and the log got a traceback); a full disk is a :class:`StoreFullError`."""
        why = exc.strerror or str(exc)
        self._report("write", "KV store %s: cannot write %s: %s", self.root, key, why)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return StoreFullError(f"KV store full: no space left on the device of {self.root} (kv.directory); "
                                  f"free space there or set kv.capacity_mb below its free space")
        return StoreError(f"KV store: cannot write in {self.root}: {why}")

    def _add(self, key: str, size: int) -> None:
        self._index[key] = size
        self._used += size
        self._chunks.setdefault(chunk_of(key), set()).add(key)
        self._touch(key)

    def _touch(self, key: str) -> None:
        self._index.move_to_end(key)
        self._chunks.move_to_end(chunk_of(key))
        if kind_of(key) in REBUILT_LEVELS:
            if key not in self._levels:
                self._level_bytes += self._index[key]
            self._levels[key] = None
            self._levels.move_to_end(key)

    def _forget(self, key: str) -> None:
        size = self._index.pop(key, None)
        if size is not None:
            self._used -= size
        if key in self._levels:
            del self._levels[key]
            self._level_bytes -= size or 0
        keys = self._chunks.get(chunk_of(key))
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._chunks[chunk_of(key)]
                self._unlink(chunk_of(key))

    def _learn(self, key: str, payload: bytes) -> bool:
        """Link the chunk of metadata ``key`` to its parent, when :meth:`_chain_link` confirms one; True when that
        parent is not stored, and the chunk (unreachable) was removed instead."""
        parent = self._chain_link(key, payload)
        return parent is not None and self._link(chunk_of(key), parent)

    def _link(self, chunk: str, parent: str) -> bool:
        """Record ``chunk``'s confirmed ``parent``; when the parent is not stored, remove ``chunk`` and its linked
        descendants instead (returns True): unreachable, they were kept as "needed" by one another while the
        usable prefix's tail was evicted for them (a context larger than the store kept only its useless tail)."""
        if chunk in self._chunks and parent not in self._chunks:
            self._drop_unreachable(chunk)
            return True
        if chunk in self._chunks and self._parent.get(chunk) != parent:
            self._unlink(chunk)
            self._parent[chunk] = parent
            self._kids.setdefault(parent, set()).add(chunk)
        return False

    def _descendants(self, chunk: str) -> list[str]:
        """The stored chunks linked below ``chunk``, at any depth (they are unusable without it)."""
        out: list[str] = []
        todo = list(self._kids.get(chunk, ()))
        while todo:
            kid = todo.pop()
            if kid in self._chunks and kid not in out:
                out.append(kid)
                todo.extend(self._kids.get(kid, ()))
        return out

    def _drop_unreachable(self, chunk: str) -> None:
        """Evict ``chunk`` and its descendants now (counted as evictions): its parent is gone."""
        for gone in (chunk, *self._descendants(chunk)):
            for key in list(self._chunks.get(gone, ())):
                self._path(key).unlink(missing_ok=True)
                self._forget(key)
                self.stats.evictions += 1

    def _unlink(self, chunk: str) -> None:
        """``chunk`` left the store: its parent no longer needs keeping for it. (Its own children keep their link:
        put again, it is their parent again.)"""
        parent = self._parent.pop(chunk, None)
        if parent is not None:
            kids = self._kids.get(parent)
            if kids is not None:
                kids.discard(chunk)
                if not kids:
                    del self._kids[parent]

    def _evict(self, keep: str) -> None:
        """:data:`EVICTION_POLICY`, read off the orders kept above (a put costs what it evicts, and a pass over
        the chunks it keeps for the later chunks of their contexts: about a context's length)."""
        excess = self._used - self.capacity_bytes
        if excess <= 0:
            return
        victims: list[str] = []
        keep_level = self._index.get(keep, 0) if keep in self._levels else 0
        if keep in self._levels and self._level_bytes - keep_level < excess:
            victims.append(keep)  # the other levels cannot make room: this one goes, not all of them with it
            excess = 0
        for key in self._levels:
            if excess <= 0:
                break
            if key != keep:
                victims.append(key)
                excess -= self._index[key]
        if excess > 0 and kind_of(keep) in REBUILT_LEVELS:
            victims.append(keep)  # a new level never evicts a source or metadata
        elif excess > 0:
            self._evict_chunks(chunk_of(keep), victims, excess)
        for victim in victims:
            self._path(victim).unlink(missing_ok=True)
            self._forget(victim)
            self.stats.evictions += 1
            if self.on_evicted is not None:
                self.on_evicted(victim)

    def _evict_chunks(self, spare: str, victims: list[str], excess: int) -> None:
        """Whole chunks into ``victims`` until ``excess`` bytes are freed (:data:`EVICTION_POLICY`): the least
        recently used first, a chunk only once no chunk stored after it in a context is left, never ``spare``
        (the chunk being written). A chunk passed over for its children is less recent than every chunk after it
        in this order: when its last child goes, it is the least recent candidate, and goes next."""
        chosen = set(victims)
        gone: set[str] = set()
        passed: set[str] = set()
        pinned = self.pins.snapshot()
        blocked = False  # a pinned chunk was passed over

        def needed(chunk: str) -> bool:
            return any(kid not in gone for kid in self._kids.get(chunk, ()))

        def take(chunk: str) -> None:
            """``chunk`` whole, with its linked descendants: without it they are unreachable (kept, they were
            "needed" by one another while usable chunks went)."""
            nonlocal excess
            for one in (chunk, *self._descendants(chunk)):
                if one in pinned:  # (never: a fetch pins a whole prefix, so a pinned chunk's parent is pinned too)
                    continue
                for key in self._chunks[one] - chosen:
                    victims.append(key)
                    chosen.add(key)
                    excess -= self._index[key]
                gone.add(one)

        def up_from(parent: str | None) -> None:
            while excess > 0 and parent is not None and parent in passed and not needed(parent):
                passed.discard(parent)
                take(parent)
                parent = self._parent.get(parent)

        for chunk in self._chunks:
            if excess <= 0:
                return
            if chunk == spare or chunk in gone:
                continue
            if chunk in pinned:
                blocked = True
                continue
            if needed(chunk):
                passed.add(chunk)
                continue
            take(chunk)
            up_from(self._parent.get(chunk))
        if excess > 0 and spare in self._chunks and spare not in pinned and self._parent.get(spare) in passed:
            # left: chunks the one being written needs (the store is too small for its context). Any of them
            # going leaves it unreachable (it would go with them): it goes itself, and what is left is a prefix
            take(spare)
            up_from(self._parent.get(spare))
        for chunk in self._chunks:  # (a chunk needed by a stale link only)
            if excess <= 0:
                return
            if chunk in passed and chunk not in gone:
                take(chunk)
        if excess > 0 and blocked and spare in self._chunks and spare not in pinned and spare not in gone:
            take(spare)  # what is left is pinned by fetches in progress: the put is trimmed, not the capacity

    def drop_unsourced(self, chunk: str, later: Sequence[str] = ()) -> int | None:
        """As :meth:`ChunkStore.drop_unsourced`; the chunks that go with it are ``later`` and every chunk linked
        below it or them (the prefix tree learned from the metadata): they had their sources, and stayed unreachable
        in the store's bytes until LRU took them."""
        with self._lock:  # (the check and the deletes in one step, as a shared store makes them)
            if object_key(chunk, "src") in self._index:
                return None
            removed = self._unlink_objects([object_key(chunk, kind) for kind in NEEDS_SOURCE])
            self._dropped_unsourced(chunk, removed)
            below = [*self._kids.get(chunk, ()), *later]
            for gone in {c: None for b in below if b in self._chunks for c in (b, *self._descendants(b))}:
                self.stats.evictions += self._unlink_objects(list(self._chunks.get(gone, ())))
            return removed

    def _unlink_objects(self, keys: list[str]) -> int:
        """Delete those of ``keys`` that are stored (files and index); how many went. One that cannot be deleted
        (a read-only mount) is reported and left counted."""
        removed = 0
        for key in keys:
            if key not in self._index:
                continue
            try:
                self._path(key).unlink(missing_ok=True)
            except OSError as exc:  # a read-only mount: left counted (still a miss: no source)
                self._report("unlink", "KV store %s: cannot delete %s: %s", self.root, key, exc.strerror or exc)
                continue
            self._forget(key)
            removed += 1
        return removed

    def delete(self, key: str) -> None:
        with self._lock:
            try:
                self._path(key).unlink(missing_ok=True)
            except OSError as exc:  # a read-only mount: one typed line, not a raw OSError
                raise self._write_failed(key, exc) from None
            self._forget(key)


def _discard(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # (a read-only mount): what cannot be removed now goes at the next start
        pass


REDIS_REPORT_S = 10.0  # one warning per this long while Redis keeps failing
FULL_HINT = ("; tokenwire evicts by kv.capacity_mb, which must stay below Redis's maxmemory (with room for its "
             "bookkeeping keys)")
# maxmemory policies under which Redis may evict any key, tokenwire's size hash, usage total and recency sets
# included: its usage is then overstated and the objects those lost are never evicted by tokenwire. The volatile-*
# policies evict only keys with a TTL, which tokenwire never sets: to it they are noeviction.
EVICTING_POLICIES = ("allkeys-lru", "allkeys-lfu", "allkeys-random")


def _redis_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """A Redis failure as :class:`StoreError`, one line: the client hears "KV store unavailable" (not the store's
    address), the log gets the detail at most every REDIS_REPORT_S. A Redis that was down made every failed
    resolve, chunk and put a traceback in the log, and clients heard only "store failure: ConnectionError"."""

    @functools.wraps(method)
    def call(self: RedisChunkStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except self._redis_error as exc:
            full = isinstance(exc, self._oom_error)
            if self._failures_logged.due() is not None:  # (the workers' threads share it: ReportEvery locks)
                log.warning("KV store: Redis at %s failed: %s: %s%s (more failures in the next %g s not logged)",
                            shown_url(self.url), exc.__class__.__name__, exc, FULL_HINT if full else "",
                            REDIS_REPORT_S)
            if full:  # it answered: "unavailable" sent operators to look for a Redis that was down
                raise StoreFullError("KV store full: Redis is full (maxmemory)") from None
            raise StoreError(f"KV store unavailable (Redis {exc.__class__.__name__})") from None

    return call


def _auth_refused(url: str, exc: Exception) -> str:
    """The start-up error for a Redis that refused the connection's credentials: what to change, and where, before
    Redis's own words. Without a password it was only those ("HELLO must be called with the client already
    authenticated, otherwise the HELLO AUTH <user> <pass> option can be used..."), which name neither."""
    try:
        given = urllib.parse.urlsplit(url).password is not None
    except ValueError:
        given = False
    where = shown_url(url)
    if given:
        return (f"the Redis store at {where} refused kv.redis_url's user or password (check them, percent-encoded "
                f"in the URL): {exc}")
    return (f"the Redis store at {where} requires a password: put it in kv.redis_url (redis://:PASSWORD@HOST:PORT/DB"
            f", or redis://USER:PASSWORD@... for an ACL user; percent-encode '@', '/', '?' and '#' in it). Redis "
            f"said: {exc}")


class RedisChunkStore(ChunkStore):
    """Objects in Redis/Valkey under ``prefix``; sizes in a hash; recency in sorted sets: of every object, of
    the encoded levels, and of chunks by their latest use (:data:`EVICTION_POLICY` reads the last two); the
    prefix tree as far as learned (:func:`chain_parent`) in two hashes shared by every daemon: a chunk's parent,
    and a chunk's number of stored children."""

    shared = True

    def __init__(self, url: str, capacity_bytes: int, *, prefix: str = "tokenwire:kv:") -> None:
        import redis

        if capacity_bytes <= 0:
            raise StoreError("capacity must be positive")
        self.capacity_bytes = capacity_bytes
        self.stats = StoreStats()
        self.prefix = prefix
        self.url = url
        self.where = shown_url(url)
        self._redis_error = redis.RedisError
        self._oom_error = redis.exceptions.OutOfMemoryError
        self._failures_logged = ReportEvery(REDIS_REPORT_S)
        try:
            # Any: redis annotates replies bytes | str; without decode_responses they are bytes
            self._r: Any = redis.Redis.from_url(url, socket_timeout=10)
        except ValueError as exc:  # no or another scheme
            raise StoreError(f"bad Redis URL {shown_url(url)!r}: {exc}") from None
        try:
            self._r.ping()
        except redis.AuthenticationError as exc:
            raise StoreError(_auth_refused(url, exc)) from None
        except redis.RedisError as exc:
            raise StoreError(f"cannot reach the Redis store at {shown_url(url)}: {exc}") from None
        self._lru = prefix + "lru"
        self._lru_levels = prefix + "lru-levels"
        self._lru_chunks = prefix + "lru-chunks"
        self._sizes = prefix + "sizes"
        self._used = prefix + "used"  # the sum of the size hash, kept by every write (a put summed the hash)
        self._parents = prefix + "parent"  # chunk -> the chunk before it in its context
        self._kid_counts = prefix + "kids"  # chunk -> how many stored chunks have it as their parent
        self._settings = prefix + "settings"  # the settings of the last daemon that started: check_shared_settings
        self._lock = threading.Lock()
        self._chain_seen = deque(maxlen=CHAIN_MEMORY)
        self._chain_lock = threading.Lock()
        # Scripts, so that each change of the size hash and its running total is one atomic step for every
        # daemon sharing the store. Every script takes KEYS[1] = sizes, KEYS[2] = used; a store without the
        # total (written before it existed) gets it from the hash, once, inside the first script to run.
        total = ("if redis.call('EXISTS', KEYS[2]) == 0 then local t = 0; "
                 "for _, v in ipairs(redis.call('HVALS', KEYS[1])) do t = t + tonumber(v) end; "
                 "redis.call('SET', KEYS[2], t) end; ")
        unsize = ("local old = redis.call('HGET', KEYS[1], ARGV[1]); "
                  "if old then redis.call('HDEL', KEYS[1], ARGV[1]); redis.call('DECRBY', KEYS[2], old) end; ")
        forget = "redis.call('ZREM', KEYS[4], ARGV[1]); redis.call('ZREM', KEYS[5], ARGV[1]); " + unsize
        # the bookkeeping of object ``k`` a drop script deletes (KEYS = sizes, used, lru, lru-levels, ...): out of
        # the recency sets and the size hash, its size off the usage; ends the script's loop over the objects
        unbook = ("redis.call('ZREM', KEYS[3], k); redis.call('ZREM', KEYS[4], k); "
                  "local old = redis.call('HGET', KEYS[1], k); "
                  "if old then redis.call('HDEL', KEYS[1], k); redis.call('DECRBY', KEYS[2], old) end end; ")
        # put: KEYS += object, lru, lru-chunks, lru-levels; ARGV: key, blob, size, time, chunk, is-a-level.
        # Returns the store's usage after it.
        put = (total + "local old = redis.call('HGET', KEYS[1], ARGV[1]); redis.call('SET', KEYS[3], ARGV[2]); "
               "redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]); redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1]); "
               "redis.call('ZADD', KEYS[5], ARGV[4], ARGV[5]); "
               "if ARGV[6] == '1' then redis.call('ZADD', KEYS[6], ARGV[4], ARGV[1]) end; "
               "return redis.call('INCRBY', KEYS[2], tonumber(ARGV[3]) - (tonumber(old) or 0))")
        self._put = self._r.register_script(put)
        # delete: KEYS += object, lru, lru-levels; ARGV: key. Returns how many objects DEL removed (0: another
        # daemon's eviction or put had removed it first), so that an eviction counts only what it removed
        self._delete = self._r.register_script(
            total + "local n = redis.call('DEL', KEYS[3]); " + forget + "return n")
        # a miss forgets the key only if the object is still absent (another writer may have stored it since
        # the GET: forgotten, it would sit there uncounted and never evicted); KEYS and ARGV as delete's
        self._forget_if_absent = self._r.register_script(
            total + "if redis.call('EXISTS', KEYS[3]) == 0 then " + forget + "end")
        self._usage = self._r.register_script(total + "return tonumber(redis.call('GET', KEYS[2]))")
        # put_if: put's KEYS and ARGV, then KEYS[7] = the guard object, ARGV[7] = its expected blob; nil (and
        # nothing written) when the guard holds anything else or is gone. One step, so that a level encoded from
        # a source another daemon replaced meanwhile is never stored under the new metadata
        self._put_if = self._r.register_script(
            "if redis.call('GET', KEYS[7]) ~= ARGV[7] then return false end; " + put)
        # link: KEYS = sizes, used, parent hash, kids hash, lru, lru-levels, lru-chunks, the chunk's metadata, the
        # parent's source and metadata, then the chunk's objects; ARGV: chunk, its parent, then those objects' keys.
        # A chunk's parent is fixed by its hash (the chain): only a new link counts a child. All in one step, after
        # checking that both are stored: written after the read, a link outlived a concurrent eviction for good (a
        # ghost child kept its parent "needed"). A parent that is gone makes the chunk unreachable: it is removed
        # here (returns how many objects went; 0 otherwise), else a context larger than the store kept its tail.
        self._link = self._r.register_script(
            total + "if redis.call('EXISTS', KEYS[8]) == 0 then return 0 end; "
            "if redis.call('EXISTS', KEYS[9]) == 1 or redis.call('EXISTS', KEYS[10]) == 1 then "
            "if redis.call('HSETNX', KEYS[3], ARGV[1], ARGV[2]) == 1 then "
            "redis.call('HINCRBY', KEYS[4], ARGV[2], 1) end; return 0 end; local n = 0; "
            "for i = 11, #KEYS do local k = ARGV[i - 8]; n = n + redis.call('DEL', KEYS[i]); "
            "redis.call('ZREM', KEYS[5], k); redis.call('ZREM', KEYS[6], k); "
            "local old = redis.call('HGET', KEYS[1], k); "
            "if old then redis.call('HDEL', KEYS[1], k); redis.call('DECRBY', KEYS[2], old) end end; "
            "redis.call('ZREM', KEYS[7], ARGV[1]); local p = redis.call('HGET', KEYS[3], ARGV[1]); "
            "if p then redis.call('HDEL', KEYS[3], ARGV[1]); "
            "if redis.call('HINCRBY', KEYS[4], p, -1) <= 0 then redis.call('HDEL', KEYS[4], p) end end; return n")
        # unlink: the chunk leaves the store (KEYS[3], lru-chunks) and its parent, if it had one, counts a child
        # less, in one step (a daemon stopped between the two left the parent counted as needed); returns that parent
        self._unlink = self._r.register_script(
            "redis.call('ZREM', KEYS[3], ARGV[1]); "
            "local p = redis.call('HGET', KEYS[1], ARGV[1]); if not p then return false end; "
            "redis.call('HDEL', KEYS[1], ARGV[1]); "
            "if redis.call('HINCRBY', KEYS[2], p, -1) <= 0 then redis.call('HDEL', KEYS[2], p) end; return p")
        # drop_unsourced: KEYS = sizes, used, lru, lru-levels, the source, parent hash, kids hash, lru-chunks, then
        # the objects to drop (the chunk's metadata and levels, then the later chunks' objects); ARGV: how many of
        # them are the chunk's own, their keys, then the chunks that leave the store (it and the later ones).
        # Nothing done ({-1, 0}) while the source is there; else {its own objects that went, the later ones'}. One
        # step with the check, so that a source another daemon puts meanwhile keeps its context; each chunk that
        # goes leaves lru-chunks and its parent's count of children (take's and unlink's bookkeeping)
        self._drop_unsourced = self._r.register_script(
            total + "if redis.call('EXISTS', KEYS[5]) == 1 then return {-1, 0} end; "
            "local own = tonumber(ARGV[1]); local n = {0, 0}; "
            "for i = 9, #KEYS do local k = ARGV[i - 7]; local d = redis.call('DEL', KEYS[i]); "
            "if i - 8 <= own then n[1] = n[1] + d else n[2] = n[2] + d end; " + unbook +
            "for i = #KEYS - 6, #ARGV do local c = ARGV[i]; redis.call('ZREM', KEYS[8], c); "
            "local p = redis.call('HGET', KEYS[6], c); if p then redis.call('HDEL', KEYS[6], c); "
            "if redis.call('HINCRBY', KEYS[7], p, -1) <= 0 then redis.call('HDEL', KEYS[7], p) end end end; "
            "return n")
        # drop_mismatched: KEYS = sizes, used, lru, lru-levels, the metadata, then the objects to drop; ARGV: the
        # metadata's expected blob, then the objects' keys. -1 (nothing done) while the metadata holds anything
        # else (another daemon's put since); else how many objects went
        self._drop_mismatched = self._r.register_script(
            total + "if redis.call('GET', KEYS[5]) ~= ARGV[1] then return -1 end; local n = 0; "
            "for i = 6, #KEYS do n = n + redis.call('DEL', KEYS[i]); local k = ARGV[i - 4]; " + unbook + "return n")
        self._migrate()
        self._check_memory_policy()

    def check_shared_settings(self, chunk_tokens: int) -> None:
        """Warn at start when the daemons sharing this store disagree on what makes their stores one: a context put
        with another kv.chunk_tokens is chunked and hashed otherwise (a fetch through this daemon finds none of
        it: "0 of 4 chunks found", nothing said why), and each daemon evicts down to its own kv.capacity_mb (one
        small put through a daemon with less evicted the shared store to its capacity). The settings of the last
        daemon that started are kept in ``<prefix>settings``; so is a store over this daemon's capacity worth a
        line. Bookkeeping: a Redis that refuses it (an ACL) costs a debug line, never the start."""
        ours = {"chunk_tokens": chunk_tokens, "capacity_mb": self.capacity_bytes >> 20}
        try:
            theirs = {k.decode(): v.decode() for k, v in self._r.hgetall(self._settings).items()}
            self._r.hset(self._settings, mapping=ours)
            used = self.used_bytes
        except (self._redis_error, StoreError) as exc:
            log.debug("KV store: Redis at %s: the shared settings are not checked (%s)", self.where, exc)
            return
        differ = [f"kv.{name} = {theirs[name]} there, {value} here" for name, value in ours.items()
                  if name in theirs and theirs[name] != str(value)]
        if differ:
            log.warning("KV store: Redis at %s was last used by a daemon with other settings (%s): daemons sharing "
                        "a store must agree on kv.chunk_tokens (a context put with another is not found by a "
                        "fetch) and kv.capacity_mb (the smallest evicts the store down to itself)", self.where,
                        "; ".join(differ))
        if used > self.capacity_bytes:
            log.warning("KV store: Redis at %s holds %.1f MiB, over kv.capacity_mb (%d MiB): this daemon's next put "
                        "evicts the store down to its capacity (daemons sharing a store must agree on "
                        "kv.capacity_mb)", self.where, used / (1 << 20), self.capacity_bytes >> 20)

    def _check_memory_policy(self) -> None:
        """Warn at start about a Redis configuration that breaks the store: a maxmemory-policy that evicts any key
        (tokenwire's bookkeeping with them: usage overstated by 79 % in a probe, untracked objects never evicted),
        or a maxmemory below kv.capacity_mb (puts fail as "Redis is full" before tokenwire evicts anything).
        CONFIG may be refused (an ACL, a managed Redis): then nothing is known and nothing is said but a debug
        line."""
        try:
            conf = self._r.config_get("maxmemory*")
        except self._redis_error as exc:
            log.debug("KV store: Redis at %s: CONFIG GET maxmemory* refused (%s); its eviction policy is not "
                      "checked", self.where, exc)
            return
        conf = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                for k, v in conf.items()}
        policy, maxmemory = conf.get("maxmemory-policy", ""), int(conf.get("maxmemory") or 0)
        if policy in EVICTING_POLICIES:  # (maxmemory 0 today: no limit, but one set later applies it)
            log.warning("KV store: Redis at %s has maxmemory-policy %s: Redis may evict tokenwire's bookkeeping "
                        "keys (%ssizes, %sused, %slru*), after which the store's usage is overstated and the "
                        "objects they tracked are never evicted by tokenwire; set maxmemory-policy noeviction "
                        "(tokenwire evicts by kv.capacity_mb) with maxmemory above kv.capacity_mb", self.where, policy,
                        self.prefix, self.prefix, self.prefix)
        if maxmemory and maxmemory < self.capacity_bytes:
            log.warning("KV store: Redis at %s has maxmemory %d MiB, below kv.capacity_mb (%d MiB): %s; set "
                        "kv.capacity_mb below maxmemory, with room for the bookkeeping keys and any other data",
                        self.where, maxmemory >> 20, self.capacity_bytes >> 20,
                        "Redis evicts before tokenwire does" if policy in EVICTING_POLICIES else
                        "puts will fail with \"Redis is full (maxmemory)\" before tokenwire evicts anything")

    def _migrate(self) -> None:
        """A store written before the level and chunk recency sets existed: build them from the object LRU once
        (without them its objects would be evicted only after every newer chunk)."""
        if self._r.exists(self._lru_chunks) or not self._r.zcard(self._lru):
            return
        chunks: dict[str, float] = {}
        levels: dict[str, float] = {}
        for key, score in self._r.zrange(self._lru, 0, -1, withscores=True):
            key = key.decode()
            chunks[chunk_of(key)] = max(score, chunks.get(chunk_of(key), score))
            if kind_of(key) in REBUILT_LEVELS:
                levels[key] = score
        pipe = self._r.pipeline(transaction=True)
        if chunks:
            pipe.zadd(self._lru_chunks, chunks)
        if levels:
            pipe.zadd(self._lru_levels, levels)
        pipe.execute()

    def _touch(self, pipe: Any, key: str) -> None:
        t = time.time()
        pipe.zadd(self._lru, {key: t})
        pipe.zadd(self._lru_chunks, {chunk_of(key): t})
        if kind_of(key) in REBUILT_LEVELS:
            pipe.zadd(self._lru_levels, {key: t})

    def _k(self, key: str) -> str:
        if not KEY_RE.match(key):
            raise StoreError(f"invalid chunk key {key!r}")
        return self.prefix + "obj:" + key

    @property
    @_redis_errors
    def used_bytes(self) -> int:
        return int(self._usage(keys=[self._sizes, self._used]))

    @_redis_errors
    def contains(self, key: str) -> bool:
        return bool(self._r.exists(self._k(key)))

    @_redis_errors
    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        pipe = self._r.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self._k(key))
        return [bool(n) for n in pipe.execute()] if keys else []

    @_redis_errors
    def get(self, key: str) -> bytes | None:
        blob = self._r.get(self._k(key))
        if blob is None:
            self.stats.misses += 1
            try:
                self._forget_if_absent(keys=[self._sizes, self._used, self._k(key), self._lru, self._lru_levels],
                                       args=[key])
            except self._oom_error:
                pass  # bookkeeping: a full Redis (maxmemory) must not turn a miss into a failure
            return None
        payload = unwrap(blob)
        if payload is None and (version := foreign_version(blob)) is not None:
            self._found_foreign(key, version)  # a newer daemon's write on this Redis: never deleted here
            return None
        if payload is None:
            self._found_corrupt(key)
            self.delete(key)
            return None
        pipe = self._r.pipeline(transaction=False)
        self._touch(pipe, key)
        try:
            pipe.execute()
        except self._oom_error:
            pass  # recency is best effort: a Redis at its maxmemory failed every hit here, the data in hand
        if self._learn(key, payload):  # its parent is gone: unreachable, removed (a hit would fail mid-way)
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return payload

    def _learn(self, key: str, payload: bytes) -> bool:
        """Write the link of the chunk of metadata ``key`` to its parent, when :meth:`_chain_link` confirms one
        (a round trip each time: another daemon's eviction may have removed it since this one wrote it), only
        while both are stored; True when the parent is not stored, and the chunk (unreachable) was removed."""
        parent = self._chain_link(key, payload)
        if parent is None:
            return False
        chunk = chunk_of(key)
        objects = [f"{chunk}.{kind}" for kind in ("src", *NEEDS_SOURCE)]
        try:
            removed = int(self._link(
                keys=[self._sizes, self._used, self._parents, self._kid_counts, self._lru, self._lru_levels,
                      self._lru_chunks, self._k(key), self._k(object_key(parent, "src")),
                      self._k(object_key(parent, "meta")), *(self._k(k) for k in objects)],
                args=[chunk, parent, *objects]))
        except self._redis_error:
            return False  # bookkeeping, after the hit or put: never its failure (the chunk is evicted in LRU order)
        self.stats.evictions += removed
        return removed > 0

    @_redis_errors
    def drop_unsourced(self, chunk: str, later: Sequence[str] = ()) -> int | None:
        """As :meth:`ChunkStore.drop_unsourced`, in one script. Redis keeps only a count of a chunk's children,
        not their names (finding them would scan the parent hash, in a script that blocks every daemon): the
        chunks that go with it are ``later`` alone (a fetch's own context after it); another context's chunks after
        it stay until their LRU turn, or until a read of their metadata confirms their parent gone (:meth:`_learn`:
        only while this process still remembers the parent, :data:`CHAIN_MEMORY`)."""
        own = [object_key(chunk, kind) for kind in NEEDS_SOURCE]
        keys = own + [object_key(c, kind) for c in later for kind in ("src", *NEEDS_SOURCE)]
        removed, evicted = (int(n) for n in self._drop_unsourced(
            keys=[self._sizes, self._used, self._lru, self._lru_levels, self._k(object_key(chunk, "src")),
                  self._parents, self._kid_counts, self._lru_chunks, *(self._k(k) for k in keys)],
            args=[len(own), *keys, chunk, *later]))
        if removed < 0:
            return None
        self._dropped_unsourced(chunk, removed)
        self.stats.evictions += evicted
        return removed

    @_redis_errors
    def drop_mismatched(self, chunk: str, meta: bytes) -> int | None:
        keys = [object_key(chunk, kind) for kind in NEEDS_SOURCE]
        removed = int(self._drop_mismatched(
            keys=[self._sizes, self._used, self._lru, self._lru_levels, self._k(object_key(chunk, "meta")),
                  *(self._k(k) for k in keys)], args=[wrap(meta), *keys]))
        if removed < 0:
            return None
        self._dropped_mismatched(removed)
        return removed

    @_redis_errors
    def put(self, key: str, data: bytes) -> None:
        self._store(key, data, None)

    @_redis_errors
    def put_if(self, key: str, data: bytes, *, guard: str, expected: bytes) -> bool:
        return self._store(key, data, (guard, expected))

    def _store(self, key: str, data: bytes, guard: tuple[str, bytes] | None) -> bool:
        """``put``, or with ``guard`` (object, payload) ``put_if``: the check and the write in one script."""
        blob = wrap(data)
        if len(blob) > self.capacity_bytes:
            raise StoreError(f"object of {len(blob)} bytes exceeds the store capacity of {self.capacity_bytes}")
        keys = [self._sizes, self._used, self._k(key), self._lru, self._lru_chunks, self._lru_levels]
        args: list[bytes | str | int | float] = [key, blob, len(blob), time.time(), chunk_of(key),
                                                 int(kind_of(key) in REBUILT_LEVELS)]
        with self._lock:
            if guard is None:
                reply = self._put(keys=keys, args=args)
            else:
                reply = self._put_if(keys=[*keys, self._k(guard[0])], args=[*args, wrap(guard[1])])
                if reply is None:
                    return False
            used = int(reply)
            self.stats.puts += 1
            self._learn(key, data)  # before the eviction: a new chunk's parent is no longer a leaf
            excess = used - self.capacity_bytes
            if excess > 0:
                # only what this daemon's deletes removed: a victim another daemon evicted at the same time was
                # counted by both (351 counted against 340 objects deleted in a probe of two daemons evicting)
                self.stats.evictions += sum(self._remove(victim) for victim in self._victims(key, excess))
        return True

    def _sized(self, keys: list[str]) -> list[tuple[str, int]]:
        sizes = self._r.hmget(self._sizes, keys) if keys else []
        return [(k, int(n)) for k, n in zip(keys, sizes, strict=True) if n is not None]

    def _victims(self, keep: str, excess: int) -> list[str]:
        """:data:`EVICTION_POLICY` over the sorted sets, in batches (a put costs about what it evicts)."""
        levels: list[str] = []
        freed, start = 0, 0
        while freed < excess:
            batch = [k.decode() for k in self._r.zrange(self._lru_levels, start, start + 1023)]
            if not batch:
                break
            start += len(batch)
            for k, size in self._sized([k for k in batch if k != keep]):
                if freed >= excess:
                    break
                levels.append(k)
                freed += size
        if freed < excess and kind_of(keep) in REBUILT_LEVELS:
            return [keep]  # the other levels cannot make room: only the new one goes, never a source
        out, chosen = list(levels), set(levels)
        pinned = self.pins.snapshot()

        def take(chunk: str) -> str | None:
            """Chunk ``chunk`` whole into ``out``; its parent, now needed by one chunk less."""
            nonlocal freed
            keys = [f"{chunk}.{kind}" for kind in ("src", "meta", *REBUILT_LEVELS)]
            for k, size in self._sized([k for k in keys if k not in chosen]):
                out.append(k)
                chosen.add(k)
                freed += size
            parent = self._unlink(keys=[self._parents, self._kid_counts, self._lru_chunks], args=[chunk])  # going
            return parent.decode() if parent is not None else None

        blocked = self._victim_chunks(chunk_of(keep), take, lambda: freed < excess, pinned)
        start = 0
        while freed < excess:  # objects of other kinds, or written before the chunk set existed: plain LRU
            batch = [k.decode() for k in self._r.zrange(self._lru, start, start + 1023)]
            if not batch:
                break
            start += len(batch)
            for k, size in self._sized([k for k in batch if k not in chosen and chunk_of(k) != chunk_of(keep)
                                        and (chunk_of(k) not in pinned or kind_of(k) in REBUILT_LEVELS)]):
                if freed >= excess:
                    break
                out.append(k)
                chosen.add(k)
                freed += size
        if freed < excess and blocked and chunk_of(keep) not in pinned:
            take(chunk_of(keep))  # what is left is pinned by fetches in progress: the put is trimmed instead
        return out

    def _victim_chunks(self, spare: str, take: Callable[[str], str | None], short: Callable[[], bool],
                       pinned: frozenset[str] = frozenset()) -> bool:
        """Whole chunks, :data:`EVICTION_POLICY`, in batches, each by ``take`` while ``short`` (of room): the
        least recently used first, a chunk only once no chunk stored after it in a context is left (its count of
        children), never ``spare`` nor one of ``pinned``. As in the local store, a chunk passed over for its
        children goes as soon as its last child went (it is less recent than anything still to come). Returns
        whether a pinned chunk was passed over."""
        passed: set[str] = set()
        blocked = False
        start = 0
        while short():
            batch = [c.decode() for c in self._r.zrange(self._lru_chunks, start, start + 255)]
            if not batch:
                break
            counts = self._r.hmget(self._kid_counts, batch)
            lost: Counter[str] = Counter()  # children taken since ``counts`` was read
            start += len(batch)
            for chunk, count in zip(batch, counts, strict=True):
                if not short():
                    break
                if chunk == spare:
                    continue
                if chunk in pinned:
                    blocked = True
                    continue
                if int(count or 0) - lost[chunk] > 0:
                    passed.add(chunk)
                    continue
                parent = take(chunk)
                start -= 1
                while parent is not None:
                    lost[parent] += 1
                    if not short() or parent not in passed or int(self._r.hget(self._kid_counts, parent) or 0) > 0:
                        break
                    passed.discard(parent)
                    parent = take(parent)
                    start -= 1
        spare_parent = self._r.hget(self._parents, spare) if short() and passed else None
        if spare_parent is not None and spare_parent.decode() in passed and spare not in pinned:
            # left: chunks the one being written needs (the store is too small for its context). Any of them going
            # leaves it unreachable: it goes itself, and its passed ancestors after it while room is short
            parent = take(spare)
            while parent is not None and short() and parent in passed \
                    and int(self._r.hget(self._kid_counts, parent) or 0) <= 0:
                passed.discard(parent)
                parent = take(parent)
        start = 0
        while short() and passed:  # (chunks needed by links of other daemons' chunks)
            batch = [c.decode() for c in self._r.zrange(self._lru_chunks, start, start + 255)]
            if not batch:
                break
            start += len(batch)
            for chunk in batch:
                if not short():
                    break
                if chunk in passed:
                    passed.discard(chunk)
                    take(chunk)
                    start -= 1
        return blocked

    @_redis_errors
    def delete(self, key: str) -> None:
        self._remove(key)

    def _remove(self, key: str) -> int:
        """Delete ``key`` and its bookkeeping: 1 when it was there to delete, 0 when it was already gone."""
        return int(self._delete(keys=[self._sizes, self._used, self._k(key), self._lru, self._lru_levels],
                                args=[key]))

    def close(self) -> None:
        self._r.close()
