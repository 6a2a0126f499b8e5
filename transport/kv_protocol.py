"""The KV channel's protocol: fetch a context's KV cache chunk by chunk over QUIC, within a deadline.

Protocol (ALPN ``tokenwire-kv/1``, its own QUIC endpoint so bulk KV gets its own congestion controller):

* client -> server, bidirectional stream: ``KV_FETCH`` (model, token ids or chunk hashes, deadline), later one
  ``KV_ACK`` per chunk received (for the server's throughput samples), FIN after ``KV_DONE``;
* server -> client on that stream: ``KV_META`` (chunk count, geometry), ``KV_DONE`` (levels), and FIN once the
  client's FIN has come (the fetch holds one of 16 slots until then); or a typed ``ERROR`` (unknown context:
  ``NOT_FOUND``; bad request: ``BAD_REQUEST``; store failure: ``INTERNAL``) and FIN;
* server -> client, one **unidirectional stream per chunk**: a ``KV_CHUNK`` header frame (index, level, size,
  CRC-32) then ``size`` raw payload bytes and FIN. A payload is one self-contained CacheGen bitstream, or the
  chunk's token ids (int32 LE) when sent as text. A lost packet delays only its own chunk's stream.

A fetch the server refuses (over its concurrency limit) or ends early (``reject``) ends alone: ERROR and FIN,
STOP_SENDING for whatever the client still sends on that stream, and anything that still arrives there (the
rest of a KV_FETCH of many token ids, a KV_ACK that crossed the ERROR) is dropped until the client's FIN or
reset, never read as a new fetch. Either side survives the other's STOP_SENDING on a fetch stream.

The server decides each chunk's level just before writing it (when QUIC has acknowledged all of the fetch's
bytes but for a look-ahead: one min-RTT plus 100 ms at the measured rate), with
:class:`~tokenwire.transport.kv_controller.KVController`. The client decodes each chunk on a worker thread as
soon as its stream ends, so decoding overlaps reception.

This module holds what both ends share: the errors, the flow-control window, the largest KV_FETCH, the QUIC
configuration and the congestion controller that goes with a marking policy. The API is re-exported by
:mod:`.kv_channel`.
"""

from __future__ import annotations

from typing import Any

from .errors import ErrorCode, TokenwireError
from .frames import (
    KV_ALPN,
    KV_CONTROLLERS,
    MAX_AUTH_CHARS,
    MAX_DEADLINE_MS,
    MAX_DECODE_RATE,
    MAX_KV_TOKENS,
    MAX_MODEL_CHARS,
    MAX_RECOMPUTE_US,
    MAX_TOKEN_ID,
    KvFetch,
    encode_frame,
)

DEFAULT_RECOMPUTE_US = 2250  # the engine's prefill per token when a fetch names none (the daemon's default too)
FLOW_WINDOW = 64 << 20  # QUIC flow-control windows: a chunk must never wait for a window update


def _largest_fetch() -> int:
    """Bytes of the largest KV_FETCH body a client can send: every field at its longest (the 131,072 token ids of
    the most a fetch may name, each 5 bytes as msgpack's shortest encoding of an id past 65535; strings of 4-byte
    UTF-8 characters). Chunk hashes are the smaller choice (4,096 of 18 bytes), and only one of the two may come.
    msgpack's spec asks every encoder for the shortest form, which is what this measures."""
    longest = "\U0010ffff"
    return len(encode_frame(KvFetch(model=longest * MAX_MODEL_CHARS, deadline_ms=MAX_DEADLINE_MS,
                                    token_ids=[MAX_TOKEN_ID] * MAX_KV_TOKENS, controller=max(KV_CONTROLLERS, key=len),
                                    recompute_us_per_token=MAX_RECOMPUTE_US, auth=longest * MAX_AUTH_CHARS,
                                    prefix=True, decode_elements_per_s=float(MAX_DECODE_RATE))))


# The largest frame a fetch stream carries (its KV_FETCH; a KV_ACK or ERROR is far smaller): the server's decoder
# refuses a longer length prefix at once. It took any stream frame up to 1 MiB, so a client without a token could
# make the server buffer 16 x 1 MiB per connection, each such fetch given 42 s to complete instead of 30 s.
MAX_KV_FETCH_BYTES = _largest_fetch()  # 658,001 bytes (657,989 before the decode rate's 12: key, float64)

# The ALPN a server that reads KV_FETCH's decode rate ("dr") offers first, beside KV_ALPN. The frame decoder refuses
# fields it does not know, and a server refusing a KV_FETCH closes the connection: a client sends its decode rate only
# where this was negotiated (kv_client_session.KVClientSession.sends_decode_rate), so an old server never sees the
# field, and an old client (offering KV_ALPN alone) is served as before, planned at the configured rate.
KV_ALPN_DECODE_RATE = KV_ALPN + "+dr"


class KVError(TokenwireError):
    """A KV fetch that could not complete (base class)."""


class KVNotFound(KVError):
    code = ErrorCode.NOT_FOUND


class KVCorruptChunk(KVError):
    """A chunk arrived with a wrong length or checksum, or does not decode: never returned as data."""

    code = ErrorCode.MALFORMED_FRAME



def kv_quic_config(config: Any) -> Any:
    """The KV channel's QUIC settings on either end's configuration: its ALPNs (the server prefers the first
    the client offers), no datagrams, flow windows."""
    config.alpn_protocols = [KV_ALPN_DECODE_RATE, KV_ALPN]
    config.max_datagram_frame_size = None  # KV frames never travel in datagrams: the extension is not offered
    config.max_data = FLOW_WINDOW
    config.max_stream_data = FLOW_WINDOW
    return config


def kv_congestion(marking: str) -> str:
    """Bulk KV marked ECT(1) must answer CE like L4S senders do (scalable); unmarked or classic: Reno."""
    return "prague" if marking == "l4s" else "reno"
