"""The KV channel's public API: fetch a context's KV cache chunk by chunk over QUIC, within a deadline.

``serve_kv`` / ``connect_kv`` and everything their users handle are importable from here. The code lives in
modules named after their part, so that the sans-I/O cores read apart from their asyncio shells:

* :mod:`.kv_protocol`: the wire (frames, streams, errors) and what both ends share;
* :mod:`.kv_server_session` / :mod:`.kv_client_session`: the two sans-I/O sessions (QUIC events in, session
  events out, explicit ``now``); the server's decides each chunk's level with
  :class:`~tokenwire.transport.kv_controller.KVController`;
* :mod:`.kv_server` / :mod:`.kv_client`: the asyncio shells (``serve_kv``, and the SDK's ``connect_kv``,
  which decodes each chunk on a worker thread as soon as its stream ends).

Nothing here imports torch at module level; the client imports the codec when it decodes.
"""

from __future__ import annotations

from .kv_client import ChunkReport, ChunkResult, FetchReport, KVConnection, KVFetchResult, connect_kv
from .kv_client_session import (
    KVChunkReceived,
    KVClientSession,
    KVDoneReceived,
    KVFetchFailed,
    KVMetaReceived,
    max_codec_chunk_bytes,
)
from .kv_protocol import (
    DEFAULT_RECOMPUTE_US,
    FLOW_WINDOW,
    KVCorruptChunk,
    KVError,
    KVNotFound,
    kv_congestion,
    kv_quic_config,
)
from .kv_server import KVServer, KVServerProtocol, serve_kv
from .kv_server_session import (
    ContextPlan,
    KVChunkNeeded,
    KVFetchClosed,
    KVFetchRefused,
    KVFetchRequested,
    KVProvider,
    KVServerSession,
    ServerFetch,
    ServerTuning,
)

__all__ = [
    "DEFAULT_RECOMPUTE_US",
    "FLOW_WINDOW",
    "ChunkReport",
    "ChunkResult",
    "ContextPlan",
    "FetchReport",
    "KVChunkNeeded",
    "KVChunkReceived",
    "KVClientSession",
    "KVConnection",
    "KVCorruptChunk",
    "KVDoneReceived",
    "KVError",
    "KVFetchClosed",
    "KVFetchFailed",
    "KVFetchRefused",
    "KVFetchRequested",
    "KVFetchResult",
    "KVMetaReceived",
    "KVNotFound",
    "KVProvider",
    "KVServer",
    "KVServerProtocol",
    "KVServerSession",
    "ServerFetch",
    "ServerTuning",
    "connect_kv",
    "kv_congestion",
    "kv_quic_config",
    "max_codec_chunk_bytes",
    "serve_kv",
]
