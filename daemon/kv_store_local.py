"""The local directory store (the embedded default): :class:`LocalChunkStore` and the file helpers only it uses.

One file per object, written to a temporary file in the same directory, fsynced and renamed into place (a crash
mid-write leaves only a ``.tmp`` file, removed at the next start), checksums verified on every read (a bad file is
deleted and reported as a miss), a capacity bound with least-recently-used eviction that takes a context from its
tail (recency survives restarts through file mtimes; the chain's links are learned again from the metadata at
start). A module of its own, apart from the Redis store, so that ``config check`` and the unit's access check
(:func:`check_local_directory`, :data:`LOCK_FILE`) read the directory's rules without the Redis code; the
interface and the envelope are :mod:`.kv_store`'s.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import stat
import struct
import tempfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from pathlib import Path

from .kv_store import (
    CHAIN_MEMORY,
    ENVELOPE_HEADER,
    KEY_RE,
    MAGIC,
    NEEDS_SOURCE,
    REBUILT_LEVELS,
    ChunkStore,
    StoreError,
    StoreFullError,
    StoreStats,
    chain_entry,
    chain_parent,
    chunk_of,
    foreign_version,
    kind_of,
    object_key,
    unwrap,
    wrap,
)

log = logging.getLogger("tokenwire.kv")

# hashes the local store's start may spend looking for the parents that the mtime order did not give (about 4 us
# each on a 2-core machine): bounds a start with many contexts whose links were not learned
RECOVER_SEARCH_STEPS = 200_000


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


# a store's start checks every object's header and reads every chunk's metadata: ~1 s for 20,000 chunks on a warm
# cache, minutes for a large store on a cold disk, with nothing said meanwhile (the daemon's status said it was
# compiling the codec). A line every PROGRESS_S, and one at the end when it took that long.
PROGRESS_S = 5.0


class _Progress:
    """The start's progress lines (see PROGRESS_S); the clock is read once per 1,024 objects."""

    def __init__(self, root: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.root, self.clock = root, clock
        self.seen = 0
        self.start = self.last = clock()

    def step(self) -> None:
        self.seen += 1
        if self.seen % 1024 == 0 and self.clock() - self.last >= PROGRESS_S:
            self.last = self.clock()
            log.info("KV store %s: opening: %d files checked so far", self.root, self.seen)

    def done(self, objects: int) -> None:
        took = self.clock() - self.start
        if took >= PROGRESS_S:
            log.info("KV store %s: opened in %.1f s (%d objects)", self.root, took, objects)


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
        progress = _Progress(self.root)
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                progress.step()
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
                    head = fh.read(ENVELOPE_HEADER.size)
                ok = len(head) == ENVELOPE_HEADER.size and head[:4] == MAGIC
                if ok and foreign_version(head) is not None:
                    foreign.add(f.name)  # its header may not be ours to measure: kept whole, as a read would keep it
                elif ok:
                    length = ENVELOPE_HEADER.unpack(head)[2]
                    ok = st.st_size == ENVELOPE_HEADER.size + length
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
        progress.done(len(found))

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
