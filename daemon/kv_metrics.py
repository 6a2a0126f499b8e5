"""Prometheus metrics of the KV channel: fetches, chunks by level, the store, ingests.

Counters live where the work happens (``KVServer.stats``, ``KVService``, the store's ``StoreStats``) and are
read when Prometheus scrapes, like the ECN counters (``marking._EcnCollector``); only the fetch-time histogram is
fed as fetches end. The daemon renders the exposition on a worker thread, since a Redis store's usage is a
round trip to Redis (``used_bytes`` sums its size hash).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

from tokenwire.transport.handshake_guard import HANDSHAKE_REFUSAL_REASONS
from tokenwire.transport.kv_controller import LEVELS, TEXT

log = logging.getLogger("tokenwire.daemon")

# fetch time (with the prefill still to do) over deadline: the le="1" bucket counts the fetches done in time
DEADLINE_RATIO_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.25, 1.5, 2.0, 4.0)


class KVMetrics:
    """Registers the KV channel's metrics for one KV runtime (``kv_runtime.KVRuntime``). The daemon registers them
    before the runtime exists (``runtime`` None, then :meth:`attach`): the codec's warm-up takes seconds at start,
    and a scrape then had none of the KV families, so dashboards showed gaps and ``absent()`` alerts fired after
    every restart. Until attached every KV counter reads 0 at ``capacity_bytes``, and the store's usage is left
    out (no store is open yet)."""

    def __init__(self, registry: CollectorRegistry, runtime: Any = None, *, capacity_bytes: int = 0) -> None:
        self.deadline_ratio = Histogram(
            "tokenwire_kv_fetch_deadline_ratio",
            "Completed KV fetches: time from KV_FETCH to the client's end of the fetch (it has decoded every chunk) "
            "plus the modelled prefill of the tokens that did not come as KV (text chunks, a prefix fetch's missing "
            "tokens, at the fetch's recompute_us_per_token, else kv.recompute_us_per_token), over the fetch's "
            "deadline; above 1 the deadline was missed (the controller's accounting; the client's "
            "FetchReport.deadline_met agrees when the fetch names its recompute_us_per_token)",
            buckets=DEADLINE_RATIO_BUCKETS, registry=registry,
        )
        self._collector = _KVCollector(runtime if runtime is not None else _not_started(capacity_bytes))
        registry.register(self._collector)
        if runtime is not None:
            self.attach(runtime)

    def attach(self, runtime: Any) -> None:
        """The runtime is up: its counters are what scrapes read from now on."""
        self._collector.runtime = runtime
        runtime.server.fetch_closed_listeners.append(self._on_fetch_closed)

    def _on_fetch_closed(self, ev: Any) -> None:
        if ev.complete and ev.elapsed_s is not None and ev.deadline_ms:
            self.deadline_ratio.observe((ev.elapsed_s + ev.prefill_s) / (ev.deadline_ms / 1000.0))


def _not_started(capacity_bytes: int) -> Any:
    """What the collector reads before the KV runtime exists: a server and a service with nothing counted yet."""
    from types import SimpleNamespace

    from .kv_store import StoreStats

    guard = SimpleNamespace(refused={}, retrying_since=None)
    server = SimpleNamespace(stats={}, guard=guard, ecn_unvalidated=lambda: 0, path_changes=lambda: 0)
    store = SimpleNamespace(stats=StoreStats(), capacity_bytes=capacity_bytes, used_bytes=None)
    service = SimpleNamespace(store=store, encodes=0, ingests=0, ingest_errors=0, ingested_tokens=0,
                              put_memory=SimpleNamespace(used=0, waiting=0))
    return SimpleNamespace(server=server, service=service, started=False)


class _KVCollector:
    """Prometheus collector reading the KV counters at scrape time."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self.usage = _UsageReader()

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.runtime.server.stats
        service = self.runtime.service
        store = service.store

        fetches = CounterMetricFamily("tokenwire_kv_fetches", "KV fetches by outcome (refused: not found, "
                                      "unauthorized, over the limit, a store failure, shutting down; failed: a "
                                      "chunk gone or unreadable after the fetch began)", labels=["outcome"])
        for outcome in ("completed", "abandoned", "refused", "failed"):
            fetches.add_metric([outcome], stats.get(outcome, 0))
        yield fetches
        yield CounterMetricFamily("tokenwire_kv_prefix_fetches", "KV fetches served with the stored prefix of "
                                  "a context the store holds in part (fetch_kv(prefix=True))",
                                  value=stats.get("prefix_hits", 0))
        chunks = CounterMetricFamily("tokenwire_kv_chunks", "KV chunks sent, by level", labels=["level"])
        for level in (TEXT, *LEVELS):
            chunks.add_metric([level], stats.get(f"chunks_{level}", 0))
        yield chunks
        yield CounterMetricFamily("tokenwire_kv_sent_bytes", "KV chunk payload bytes sent",
                                  value=stats.get("bytes", 0))
        # the KV endpoint's admission, as the chat port's tokenwire_handshakes_refused_total and retry gauge: the
        # guard counted its refusals where no scrape saw them
        server = self.runtime.server
        refused = CounterMetricFamily(
            "tokenwire_kv_connections_refused", "KV connections closed by the admission checks, by reason: too_many "
            "or timeout (handshakes), failed (a handshake ended otherwise: a TLS error, the client's close), "
            "max_connections (past limits.max_sessions), unauthorized (client certificate), evicted (no authorized "
            "fetch, closed to admit a new client)",
            labels=["reason"])
        for reason in HANDSHAKE_REFUSAL_REASONS:
            refused.add_metric([reason], server.guard.refused.get(reason, 0))
        refused.add_metric(["max_connections"], stats.get("connections_refused", 0))
        refused.add_metric(["unauthorized"], stats.get("unauthorized", 0))
        refused.add_metric(["evicted"], stats.get("evicted", 0))
        yield refused
        yield CounterMetricFamily("tokenwire_kv_protocol_errors", "KV connections the endpoint closed because their "
                                  "client broke the protocol (garbage, a chat REQUEST, a unidirectional stream, a "
                                  "KV_ACK for a chunk never sent)", value=stats.get("protocol_errors", 0))
        yield CounterMetricFamily("tokenwire_kv_ecn_validation_failed", "KV connections that stopped marking ECT "
                                  "because their client reported no ECN counts (connect_kv(ecn=False))",
                                  value=server.ecn_unvalidated())
        yield CounterMetricFamily("tokenwire_kv_path_changes", "Times a KV client's connection moved to another "
                                  "address or port (QUIC connection migration; counted once the new path is "
                                  "validated, as tokenwire_path_changes_total counts the chat port's)",
                                  value=server.path_changes())
        yield GaugeMetricFamily("tokenwire_kv_quic_retry_active", "1 while the KV endpoint asks new clients for a "
                                "QUIC Retry (handshake load)", value=int(server.guard.retrying_since is not None))
        yield CounterMetricFamily("tokenwire_kv_encodes", "KV chunk levels encoded from their source",
                                  value=service.encodes)
        ingests = CounterMetricFamily("tokenwire_kv_ingests", "KV puts by outcome", labels=["outcome"])
        ingests.add_metric(["stored"], service.ingests)
        ingests.add_metric(["refused"], service.ingest_errors)
        yield ingests
        yield CounterMetricFamily("tokenwire_kv_ingested_tokens", "Tokens of KV stored by puts",
                                  value=service.ingested_tokens)
        budget = service.put_memory  # read from the scrape's thread: two ints the event loop writes
        yield GaugeMetricFamily("tokenwire_kv_ingest_memory_bytes", "Bytes of KV puts held in memory now (bodies "
                                "being read or stored; at most kv.ingest_memory_mb)", value=budget.used)
        yield GaugeMetricFamily("tokenwire_kv_ingest_waiting", "KV puts waiting for room in kv.ingest_memory_mb "
                                "(their engines' writes block)", value=budget.waiting)
        st = store.stats
        yield CounterMetricFamily("tokenwire_kv_store_evictions", "Store objects evicted for space",
                                  value=st.evictions)
        yield CounterMetricFamily("tokenwire_kv_store_corrupt", "Store objects that failed their checksum "
                                  "(deleted; a level is encoded again from its source)", value=st.corrupt)
        # its own metric, not added to corrupt's: these never failed a read, they were cut short by a crash or a
        # full disk before the store's start (the local store's recovery deleted them without a trace)
        yield CounterMetricFamily("tokenwire_kv_store_recovered", "Partial or truncated store objects removed at the "
                                  "local store's start (left by a crash or a full disk during their write)",
                                  value=st.recovered_partial)
        # a chunk left without its source counted as stored (its metadata): every prefix fetch of its context failed
        # mid-way at it; now its metadata and levels go, and this says how often that happened
        yield CounterMetricFamily("tokenwire_kv_store_unsourced", "Chunks whose metadata and levels were removed "
                                  "because their source was gone (at the local store's start, or found by a fetch)",
                                  value=st.unsourced)
        # two daemons replacing one chunk of a shared store at once could leave one put's source under the other's
        # metadata (wrong KV served under a fingerprint): such a chunk is a miss now, and this says how often
        yield CounterMetricFamily("tokenwire_kv_store_mismatched", "Chunks found with a source other than the one "
                                  "their metadata records (another put's, or one that does not encode): a miss each",
                                  value=st.mismatched)
        yield GaugeMetricFamily("tokenwire_kv_store_capacity_bytes", "The KV store's capacity (kv.capacity_mb)",
                                value=store.capacity_bytes)
        used = self.usage.read(store) if getattr(self.runtime, "started", True) else None
        if used is not None:
            yield GaugeMetricFamily("tokenwire_kv_store_bytes", "Bytes the KV store holds", value=used)


USAGE_WAIT_S = 2.0  # what a scrape waits for the store's usage; Prometheus' default scrape_timeout is 10 s


class _UsageReader:
    """The store's usage for a scrape, waited for at most USAGE_WAIT_S. A Redis that stopped answering (frozen,
    or cut off by a partition) held every scrape for the client's 10-s socket timeout, so Prometheus timed out
    and lost *all* of the daemon's metrics just when they were wanted. The read runs on its own thread; a scrape
    that gives up leaves it running and a later scrape takes its result (one read at a time; scrapes at the
    same moment share it, none waits for another's wait; once one has waited in vain, the next ones do not wait
    until that read ends)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: Future[int] | None = None  # the read in progress, or done and not yet taken
        self._stalled = False  # logged once per stall, not at every scrape

    def read(self, store: Any) -> int | None:
        with self._lock:
            read = self._pending
            if read is not None and self._stalled and not read.done():
                # a scrape already waited for this read in vain: each later one waited again, in the default
                # executor's few threads, so concurrent scrapes queued behind each other up to Prometheus's timeout
                return None
            if read is None:
                read = self._pending = Future()
                threading.Thread(target=_read_usage, args=(store, read), name="kv-store-usage",
                                 daemon=True).start()  # daemon: never holds up the daemon's exit
        try:
            used = read.result(timeout=USAGE_WAIT_S)
        except FutureTimeout:
            with self._lock:
                stalled, self._stalled = self._stalled, True
            if not stalled:
                log.warning("metrics: KV store usage: no answer within %.0f s; the gauge is left out until the "
                            "store answers", USAGE_WAIT_S)
            return None
        except Exception as exc:  # Redis unreachable: the scrape goes on without this gauge
            log.warning("metrics: KV store usage unavailable: %s", exc)
            return None
        finally:
            with self._lock:
                if read.done() and self._pending is read:  # taken: the next scrape reads afresh
                    self._pending, self._stalled = None, False
        return used


def _read_usage(store: Any, into: Future[int]) -> None:
    try:
        into.set_result(int(store.used_bytes))
    except Exception as exc:
        into.set_exception(exc)
