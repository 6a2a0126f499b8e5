"""The KV channel's client side, sans-I/O: :class:`KVClientSession` sends fetches and KV_ACKs and judges each
chunk stream at its header, so a server cannot make the client keep bytes it will never use. The asyncio
shell and SDK are in :mod:`.kv_client`."""

from __future__ import annotations

import math
import struct
import threading
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from aioquic.quic import events as qe
from aioquic.quic.connection import QuicConnection

from .errors import ErrorCode, FrameError, ProtocolError, RemoteError, TokenwireError, known_code
from .frames import (
    MAX_DECODE_RATE,
    MIN_DECODE_RATE,
    Error,
    Frame,
    KvAck,
    KvChunk,
    KvDone,
    KvFetch,
    KvMeta,
    StreamDecoder,
    decode_frame,
)
from .kv_controller import TEXT
from .kv_protocol import KV_ALPN_DECODE_RATE, KVCorruptChunk, KVError, KVNotFound
from .path_recovery import KV_RECOVERY_PING_S
from .session import _SessionBase
from .session_events import SessionEvent, closed_error, idle_timeout_in_force

_LEN = struct.Struct(">I")

DECODE_RATE_CHUNKS = 9  # codec chunks the client's decode rate is the median of (the latest)
# No datagram from the server for this long while a fetch is pending: its PINGs (one per KV_RECOVERY_PING_S of
# silence) went unanswered for several round trips, so the server or the path is gone (KVClientSession.silent_for)
SILENT_AFTER_S = 4 * KV_RECOVERY_PING_S


class DecodeRate:
    """A client's decode rate, KV elements per second: the median of its latest codec chunks' rates (the SDK keeps
    one per process and decode device, shared by its connections: ``kv_client.process_decode_rate``).

    The server plans each chunk's decode at the client (one worker thread, chunks one after another) with a rate;
    the configured one (``[kv] decode_mbps``, 50 M elements/s) was 20-40x what this SDK decodes on a CPU (1.3-2.85
    M measured), so plans counted on decodes finishing long before they did. The median, not a mean: one decode
    slowed by a compile or a busy host moves it little. None until a codec chunk has decoded (text has nothing to
    decode); the codec's warm-up decodes a 256-element chunk inside its compile time, which says nothing of the rate.
    """

    def __init__(self, window: int = DECODE_RATE_CHUNKS) -> None:
        self._rates: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()  # (one may serve a process's connections, on several event loops)

    def observe(self, elements: int, seconds: float) -> None:
        """One codec chunk of ``elements`` decoded in ``seconds`` (ignored unless both are positive and finite)."""
        if elements > 0 and 0 < seconds < math.inf:
            with self._lock:
                self._rates.append(elements / seconds)

    def rate(self) -> float | None:
        """The figure a fetch carries (within KV_FETCH's bounds), or None before any codec chunk decoded."""
        with self._lock:
            r = sorted(self._rates)
        if not r:
            return None
        return min(max(r[len(r) // 2], MIN_DECODE_RATE), MAX_DECODE_RATE)


# ------------------------------------------------------------------------------------------------ client side
@dataclass
class KVMetaReceived(SessionEvent):
    stream_id: int
    meta: KvMeta


@dataclass
class KVChunkReceived(SessionEvent):
    stream_id: int  # the fetch
    header: KvChunk
    payload: bytes
    first_at: float
    done_at: float


@dataclass
class KVDoneReceived(SessionEvent):
    stream_id: int
    done: KvDone


@dataclass
class KVFetchFailed(SessionEvent):
    stream_id: int
    error: TokenwireError


@dataclass
class _Incoming:
    buf: bytearray = field(default_factory=bytearray)
    header: KvChunk | None = None
    first_at: float | None = None


@dataclass
class _ClientFetch:
    """The client session's view of one open fetch: enough to judge each of its chunk streams at its header,
    before the bytes it announces are kept."""

    asked_tokens: int | None  # fetched by token ids: how many
    asked_chunks: int | None  # fetched by hashes: how many
    decoder: StreamDecoder = field(default_factory=StreamDecoder)
    meta: KvMeta | None = None
    done: bool = False
    headers: dict[int, KvChunk] = field(default_factory=dict)  # index -> the header of its chunk stream
    tokens: int = 0  # tokens those headers announce
    streams: set[int] = field(default_factory=set)  # its chunk streams whose end has not come yet
    bytes_in: int = 0  # its chunk bytes received: the fetch's progress while a big chunk arrives


_CODED_TABLE = 2 + 2 * 256  # a frequency table at its largest: lo, hi, 256 u16 frequencies


def max_codec_chunk_bytes(geometry: Sequence[int], tokens: int) -> int:
    """The largest CacheGen bitstream (format 1, ``cachegen/bitstream.py``) of ``tokens`` tokens at ``geometry``
    ([layers, kv heads, head dim]): the decoder refuses a longer one (every section's length follows from the
    header, trailing bytes are an error). Every term at its worst: each channel its own rANS stream, at most
    one 16-bit word per symbol plus a 2-word final state per stream (rans.py), 255 tables, every token also
    kept raw as fp32. About 6 bytes per element; a real chunk is 0.2-0.5."""
    from .cachegen.bitstream import CRC, HEADER, MAX_TABLES, SIDE_STREAM

    layers, heads, dim = geometry
    channels = 2 * layers * heads * dim  # K and V: one rANS stream at most per channel
    elements = channels * tokens

    def coded(n: int) -> int:  # a side section of n bytes: table, word counts, <= n + 2 words per stream
        k = -(-n // SIDE_STREAM)
        return _CODED_TABLE + 2 * k + 2 * (n + 3 * k)

    side = 4 * coded(channels) + coded(2 * layers * tokens)
    payload = 2 * channels + 2 * (elements + 2 * channels)  # word counts, words
    return HEADER.size + CRC.size + 2 * layers + side + MAX_TABLES * _CODED_TABLE + 4 * elements + payload


def _chunk_misfit(hdr: KvChunk, meta: KvMeta | None, max_chunks: int | None) -> str | None:
    """Why one chunk header cannot be part of its fetch (None: it can): an index past KV_META's chunk count
    (or past the hashes asked for), a text chunk whose size is not its tokens' int32s, a codec chunk longer
    than any bitstream of its tokens at KV_META's geometry. Before KV_META only the frame's own limit
    (``MAX_KV_CHUNK_BYTES``) bounds a codec chunk: KV_META checks it again when it comes."""
    if max_chunks is not None and hdr.index >= max_chunks:
        return f"chunk {hdr.index} of a fetch of {max_chunks} chunk hashes"
    if hdr.level == TEXT:
        if hdr.size != 4 * hdr.tokens:
            return f"text chunk {hdr.index}: {hdr.size} bytes for {hdr.tokens} tokens"
        return None if meta is None or hdr.index < meta.chunks else f"chunk {hdr.index} of {meta.chunks} (KV_META)"
    if meta is None:
        return None
    if hdr.index >= meta.chunks:
        return f"chunk {hdr.index} of {meta.chunks} (KV_META)"
    bound = max_codec_chunk_bytes(meta.geometry, hdr.tokens)
    if hdr.size > bound:
        return (f"chunk {hdr.index}: {hdr.size} bytes announced, more than the {bound} any {hdr.tokens}-token "
                f"chunk of geometry {meta.geometry} can take")
    return None


class KVClientSession(_SessionBase):
    """Client side of one KV connection (sans-I/O).

    Each chunk stream is judged at its header: one for a fetch that is not open (never asked for, or over),
    or that cannot be part of its fetch (:func:`_chunk_misfit`, an index already announced, more tokens than
    asked or announced) gets STOP_SENDING and its bytes are dropped (the latter also fails the fetch), so a
    server cannot make the client keep what it will never use; when a fetch ends, every chunk stream of it
    still arriving is stopped the same way."""

    def __init__(self, quic: QuicConnection, *, keepalive: bool = False) -> None:
        super().__init__(quic)
        # ping with no fetch open too: an engine keeps one KV connection across its users' turns, and a turn longer
        # than the idle timeout (60 s) ended it, both ends silent (the next fetch failed at once)
        self.keepalive = keepalive
        self.fetches: dict[int, _ClientFetch] = {}
        self.incoming: dict[int, _Incoming] = {}
        self.ecn_counts: Callable[[], list[int]] | None = None
        # fetch streams this side may still write on (KV_ACKs, the final FIN): not after our FIN, nor after the
        # server's STOP_SENDING (aioquic has reset our side then, and a write would raise)
        self._sending: set[int] = set()
        self.decode_rate = DecodeRate()  # fed by the shell (kv_client) as chunks decode on its worker thread
        # when the latest datagram from the server came (None: none yet), whatever it carried: a fetch that times
        # out says whether the server still answers (a slow server) or has been silent (a lost path)
        self.datagram_at: float | None = None

    @property
    def sends_decode_rate(self) -> bool:
        """Whether the server negotiated ``KV_ALPN_DECODE_RATE``: it reads KV_FETCH's decode rate (an older server
        refuses the field, closing the connection)."""
        return self.alpn == KV_ALPN_DECODE_RATE

    def bytes_in(self, fetch_sid: int) -> int:
        """Chunk bytes received for this fetch: its progress while a big chunk arrives (another fetch's bytes, or
        bytes for no fetch, are not: they kept a 1-s fetch waiting 45-73 s)."""
        f = self.fetches.get(fetch_sid)
        return f.bytes_in if f is not None else 0

    def after_datagram(self, now: float | None = None) -> None:
        super().after_datagram(now)
        self.datagram_at = self._now

    def silent_for(self, now: float) -> float | None:
        """Seconds since the server's latest datagram, or None when it is recent enough to say nothing: while a
        fetch is pending this side PINGs after each :data:`KV_RECOVERY_PING_S` of silence, which a server that
        still runs acknowledges within a round trip, so :data:`SILENT_AFTER_S` without a datagram means the server
        or the path is gone, not slow."""
        if self.datagram_at is None:
            return None
        quiet = now - self.datagram_at
        return quiet if quiet >= SILENT_AFTER_S else None

    def _session_timer(self) -> float | None:
        """A PING after each KV_RECOVERY_PING_S of silence while a fetch is pending: after a loss outage the
        first one to cross makes the server probe at once (:mod:`.path_recovery`), instead of after its
        backed-off probe timer, which can run past a fetch's deadline."""
        if self.fetches:
            return self._silence_ping_at(KV_RECOVERY_PING_S)
        # (with keepalive, between fetches: a third of the idle timeout, as the chat client's)
        return self._silence_ping_at(idle_timeout_in_force(self.quic) / 3.0) if self.keepalive else None

    def _on_session_timer(self, now: float) -> list[SessionEvent]:
        self._ping_if_due(self._session_timer(), now)
        return []

    def fetch(self, request: KvFetch) -> int:
        """Open a fetch stream and send ``request`` on it, with this connection's decode rate where the server
        reads it and the request carries none (see :class:`DecodeRate`); never to a server that does not read it."""
        if not self.sends_decode_rate:
            if request.decode_elements_per_s is not None:
                request = replace(request, decode_elements_per_s=None)
        elif request.decode_elements_per_s is None:
            request = replace(request, decode_elements_per_s=self.decode_rate.rate())
        sid = self.quic.get_next_available_stream_id()
        self.fetches[sid] = _ClientFetch(
            len(request.token_ids) if request.token_ids is not None else None,
            len(request.hashes) if request.hashes is not None else None)
        self._sending.add(sid)
        self._send(sid, request)
        return sid

    def ack(self, fetch_sid: int, header: KvChunk, first_at: float, done_at: float) -> None:
        if fetch_sid not in self.fetches or fetch_sid not in self._sending:
            return
        ecn = self.ecn_counts() if self.ecn_counts is not None else None
        self._send(fetch_sid, KvAck(header.index, header.size, int(first_at * 1e6), int(done_at * 1e6), ecn))

    def finish(self, fetch_sid: int) -> None:
        """The fetch is over for the caller (done, failed or given up): FIN our side of its stream, and
        STOP_SENDING on its chunk streams still arriving."""
        self._end_fetch(fetch_sid)

    def _end_fetch(self, fetch_sid: int) -> None:
        f = self.fetches.pop(fetch_sid, None)
        if f is not None:
            for sid in f.streams:
                self._stop_chunk_stream(sid)
        self._end_sending(fetch_sid)

    def _fail(self, fetch_sid: int, error: TokenwireError) -> list[SessionEvent]:
        self._end_fetch(fetch_sid)
        return [KVFetchFailed(fetch_sid, error)]

    def _stop_chunk_stream(self, sid: int, code: int = ErrorCode.CANCELLED) -> None:
        """Drop a chunk stream whose end has not been read: what it buffered now, what still comes on it until its
        FIN or reset (``_late``; aioquic may have parsed the FIN already, its data event still to come), and ask
        the server to stop sending it."""
        self.incoming.pop(sid, None)
        self._ended.add(sid)
        if self._peer_sending(sid):
            self.quic.stop_stream(sid, int(code))

    def _end_sending(self, sid: int) -> None:
        if sid in self._sending:
            self._sending.discard(sid)
            self._fin(sid)

    def _on_stop_sending(self, stream_id: int) -> list[SessionEvent]:
        # the server wants nothing more on this stream (it refused or rejected the fetch; its ERROR may still be
        # on its way): aioquic has reset our side, so no KV_ACK or FIN may be written on it any more
        self._sending.discard(stream_id)
        return []

    def _on_stream_data(self, stream_id: int, data: bytes, end: bool, now: float) -> list[SessionEvent]:
        if stream_id % 4 == 3:
            return self._on_chunk_data(stream_id, data, end, now)
        f = self.fetches.get(stream_id)
        if f is None:
            return []
        try:
            frames = f.decoder.feed(data)
        except FrameError as exc:
            raise ProtocolError(f"fetch stream {stream_id}: {exc}", code=exc.code) from None
        out: list[SessionEvent] = []
        for fr in frames:
            if isinstance(fr, KvMeta):
                if f.meta is not None:
                    return out + self._fail(stream_id, KVError("a second KV_META", code=ErrorCode.MALFORMED_FRAME))
                # chunks that overtook it (their packets came first) are judged against it now
                problem = f"chunks of {f.tokens} tokens, KV_META: {fr.tokens}" if f.tokens > fr.tokens else None
                for hdr in f.headers.values():
                    problem = problem or _chunk_misfit(hdr, fr, f.asked_chunks)
                if problem is not None:
                    return out + self._fail(stream_id, KVCorruptChunk(problem))
                f.meta = fr
                out.append(KVMetaReceived(stream_id, fr))
            elif isinstance(fr, KvDone):
                # KV_META comes first on this same stream, and says how many chunks KV_DONE ends
                problem = ("KV_DONE before KV_META" if f.meta is None else "a second KV_DONE" if f.done
                           else None if fr.chunks == f.meta.chunks
                           else f"KV_DONE says {fr.chunks} chunks, KV_META {f.meta.chunks}")
                if problem is not None:
                    return out + self._fail(stream_id, KVError(problem, code=ErrorCode.MALFORMED_FRAME))
                f.done = True
                out.append(KVDoneReceived(stream_id, fr))
            elif isinstance(fr, Error):
                err_cls = KVNotFound if fr.code == ErrorCode.NOT_FOUND else RemoteError
                # the fetch is over: our FIN closes the stream at once; the server's FIN follows its ERROR and
                # nothing after it is read
                return out + self._fail(stream_id, err_cls(fr.message, code=known_code(fr.code)))
            else:
                raise ProtocolError(f"fetch stream {stream_id}: unexpected {type(fr).__name__} frame")
        return out

    def _on_chunk_data(self, sid: int, data: bytes, end: bool, now: float) -> list[SessionEvent]:
        if self._late(sid, end):
            return []  # a chunk stream we stopped
        inc = self.incoming.setdefault(sid, _Incoming())
        if inc.first_at is None and data:
            inc.first_at = now
        inc.buf += data
        f = self.fetches.get(inc.header.fetch) if inc.header is not None else None
        if f is not None:
            f.bytes_in += len(data)
        if inc.header is None and len(inc.buf) >= 4:
            (n,) = _LEN.unpack_from(inc.buf)
            if n > 4096:
                raise ProtocolError(f"chunk stream {sid}: header of {n} bytes", code=ErrorCode.FRAME_TOO_LARGE)
            if len(inc.buf) >= 4 + n:
                try:
                    hdr: Frame | None = decode_frame(bytes(inc.buf[4 : 4 + n]))
                except FrameError as exc:
                    raise ProtocolError(f"chunk stream {sid}: {exc}", code=exc.code) from None
                if not isinstance(hdr, KvChunk):
                    raise ProtocolError(f"chunk stream {sid}: first frame must be KV_CHUNK")
                del inc.buf[: 4 + n]
                f = self.fetches.get(hdr.fetch)
                if f is None:  # never asked for, or over (failed, timed out, given up): nobody will use it
                    self._drop_chunk_stream(sid, end, ErrorCode.CANCELLED)
                    return []
                problem = self._misfit(f, hdr)
                if problem is not None:
                    self._drop_chunk_stream(sid, end, ErrorCode.MALFORMED_FRAME)
                    return self._fail(hdr.fetch, KVCorruptChunk(problem))
                f.headers[hdr.index] = hdr
                f.tokens += hdr.tokens
                f.streams.add(sid)
                f.bytes_in += len(inc.buf)
                inc.header = hdr
        if inc.header is not None and len(inc.buf) > inc.header.size:
            raise ProtocolError(f"chunk stream {sid}: more bytes than announced")
        if not end:
            return []
        self.incoming.pop(sid, None)
        hdr = inc.header
        if hdr is None:
            raise ProtocolError(f"chunk stream {sid} ended before its header")
        if f is None:  # the fetch's end stops its chunk streams: unreachable, but never an event for no fetch
            return []
        f.streams.discard(sid)
        payload = bytes(inc.buf)
        if len(payload) != hdr.size or zlib.crc32(payload) != hdr.crc:
            return self._fail(hdr.fetch, KVCorruptChunk(
                f"chunk {hdr.index}: {len(payload)} of {hdr.size} bytes or checksum mismatch"))
        return [KVChunkReceived(hdr.fetch, hdr, payload, inc.first_at or now, now)]

    @staticmethod
    def _misfit(f: _ClientFetch, hdr: KvChunk) -> str | None:
        """Why a new chunk header cannot be part of fetch ``f`` (None: it can)."""
        if hdr.index in f.headers:  # it overwrote the first copy, and the fetch waited for a chunk never sent
            return f"chunk {hdr.index} announced twice"
        tokens = f.tokens + hdr.tokens  # all of them must add up to KV_META's count, at most what was asked
        for what, limit in (("asked", f.asked_tokens), ("KV_META", f.meta.tokens if f.meta else None)):
            if limit is not None and tokens > limit:
                return f"chunks of {tokens} tokens, {what}: {limit}"
        return _chunk_misfit(hdr, f.meta, f.asked_chunks)

    def _drop_chunk_stream(self, sid: int, end: bool, code: int) -> None:
        """Refuse a chunk stream at its header (``end``: its FIN came with it, nothing more will)."""
        if end:
            self.incoming.pop(sid, None)
        else:
            self._stop_chunk_stream(sid, code)

    def _on_datagram(self, frame: Any, now: float) -> list[SessionEvent]:
        raise ProtocolError("the KV channel carries no datagrams")

    def _on_stream_reset(self, stream_id: int, code: int) -> list[SessionEvent]:
        if stream_id % 4 == 3:  # a chunk stream: what it buffered goes
            inc = self.incoming.pop(stream_id, None)
            hdr = inc.header if inc is not None else None
            if hdr is not None and hdr.fetch in self.fetches:
                # its index is announced, so no other stream may bring it: the fetch cannot complete (it waited
                # for its timeout). A reset before the header names no fetch: that one still waits.
                self.fetches[hdr.fetch].streams.discard(stream_id)
                return self._fail(hdr.fetch, RemoteError(
                    f"server reset the stream of chunk {hdr.index} (code {code:#x})", code=known_code(code)))
            return []
        if stream_id in self.fetches:
            return self._fail(stream_id, RemoteError(f"server reset the fetch (code {code:#x})"))
        return []

    def _on_terminated(self, event: qe.ConnectionTerminated) -> list[SessionEvent]:
        err = closed_error(event.error_code, event.reason_phrase, idle_timeout_in_force(self.quic), "KV connection")
        out: list[SessionEvent] = [KVFetchFailed(s, err) for s in self.fetches]
        self.fetches.clear()
        self.incoming.clear()
        self._sending.clear()
        return out
