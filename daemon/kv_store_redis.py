"""The Redis/Valkey store: :class:`RedisChunkStore` and the error handling and scripts only it uses.

The same contract as the local directory store on a Redis/Valkey server shared by several daemons (values in the
same envelope; recency in sorted sets; eviction by this client under the same byte bound). A module of its own so
that a daemon with a local store never loads it (and ``redis`` is imported only when a store is made); the
interface and the envelope are :mod:`.kv_store`'s.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import urllib.parse
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any

from .kv_store import (
    CHAIN_MEMORY,
    KEY_RE,
    NEEDS_SOURCE,
    REBUILT_LEVELS,
    ChunkStore,
    ReportEvery,
    StoreError,
    StoreFullError,
    StoreStats,
    chunk_of,
    foreign_version,
    kind_of,
    object_key,
    unwrap,
    wrap,
)
from .logs import shown_url

log = logging.getLogger("tokenwire.kv")

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
