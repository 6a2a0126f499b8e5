"""Flow control that runs a fixed window ahead of what a server has read, for aioquic connections.

:class:`ReadCredit` replaces aioquic's credit doubling (which buffered whatever a client sent behind a withheld
byte) and holds an unauthorized connection to a small window; :func:`read_credit` gives a connection made by
aioquic's server that behaviour. It is QUIC-level machinery with no tokenwire protocol in it, used by both the
token server (:mod:`.server_session`) and the KV server (:mod:`.kv_server_session`), so it lives on its own.
"""

from __future__ import annotations

import functools

from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.quic.stream import QuicStream


class ReadCredit(QuicConnection):
    """A connection whose flow-control credit runs a fixed window ahead of what it has read.

    aioquic (1.7.2) doubles a stream's credit whenever the highest offset received passes half of it, and the
    connection's whenever the bytes received do, read or not: a client that withheld a stream's first byte had
    everything after it buffered (in a bytearray grown to the gap), its credit doubling as it came (RSS 107 ->
    312 MB in 14 s). Here a stream may run ``configuration.max_stream_data`` past its first byte not yet
    delivered, and the connection ``configuration.max_data`` past every byte delivered (what the session reads
    it reads at once); aioquic closes a peer that sends beyond with FLOW_CONTROL_ERROR. Nothing else changes.

    Until its owner calls :meth:`release_credit`, a connection put on :meth:`hold_until_authorized` gets a smaller
    window, and what the session has read of its request streams counts as held but on the first one: a client
    that never sent an auth token had 64 streams of 1 MiB requests short of their last byte read into the
    request decoders (the token is only seen in a whole REQUEST), the connection's credit moving on with each
    (RSS +75 MiB per connection, for ``limits.request_timeout_s``). The first open stream is exempt so that a
    request always completes: aioquic's client serves its streams in turn, and with every stream's bytes held,
    a few large first requests sent at once used the whole window and none came whole. It also may open only
    ``streams`` request streams at once (QUIC's MAX_STREAMS; more come as those end, and all once released): the
    client's connection credit went to its streams in turn, so with eight large first requests at once the first
    stream's share could never complete its request, the others' shares filled the window, and no request ever
    came whole (a token holder's eight 320 KB prompts: all refused after request_timeout_s). aioquic's client
    queues the streams past the limit and sends them when it rises.
    """

    _unauthorized_window: int | None = None  # set by hold_until_authorized, None again once released
    _held_streams = 0  # request streams withheld from MAX_STREAMS while held (given back at release)

    def hold_until_authorized(self, window: int, streams: int = 2) -> None:
        """Before the first datagram: advertise ``window`` bytes of connection credit (below
        ``configuration.max_data``) and ``streams`` bidirectional streams, and keep what the connection may make
        this side hold that small until :meth:`release_credit`; see the class's note."""
        if self._spaces:  # (initialized: the transport parameter went out, and credit given cannot be taken back)
            raise RuntimeError("hold_until_authorized() after the connection's first datagram")
        window = max(1, min(window, self._configuration.max_data))
        self._unauthorized_window = window
        limit = self._local_max_data
        limit.value = limit.sent = min(limit.value, window)  # (sent: the transport parameter carries it)
        bidi = self._local_max_streams_bidi
        allowed = max(1, min(streams, bidi.value))
        self._held_streams = bidi.value - allowed
        bidi.value = bidi.sent = allowed  # aioquic adds one as each stream ends, and MAX_STREAMS says so

    def release_credit(self) -> None:
        """The connection is authorized: the full window and every stream from the next packet on."""
        self._unauthorized_window = None
        self._local_max_streams_bidi.value += self._held_streams
        self._held_streams = 0

    def _write_connection_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace) -> None:
        limit = self._local_max_data
        held_back = self._unauthorized_window
        window = self._configuration.max_data if held_back is None else held_back
        if limit.value - limit.used < window // 2:  # under half a window left: not a MAX_DATA every packet
            open_streams = {sid: s.receiver for sid, s in self._streams.items() if not s.receiver.is_finished}
            unread = sum(rx.highest_offset - rx.starting_offset() for rx in open_streams.values())
            read = limit.used - unread  # (aioquic counts a stream's bytes up to the highest offset received)
            if held_back is not None and open_streams:  # read into a decoder is held too, but on the first stream
                first = min(open_streams)
                read -= sum(rx.starting_offset() for sid, rx in open_streams.items() if sid != first)
            limit.value = max(limit.value, read + window)
        used, limit.used = limit.used, 0  # aioquic's rule (doubling past half of it) must not apply
        try:
            super()._write_connection_limits(builder=builder, space=space)  # the frame, and MAX_STREAMS
        finally:
            limit.used = used

    def _write_stream_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: QuicStream) -> None:
        # called for every stream in every packet: the common case (nothing to raise, nothing to resend) returns
        # at once (a connection with 60 streams spent 23 % more CPU here)
        rx = stream.receiver
        window = self._configuration.max_stream_data
        # (max_stream_data_local 0: a stream this side may not receive on)
        if (stream.max_stream_data_local and not rx.is_finished
                and stream.max_stream_data_local - rx.highest_offset < window // 2):
            stream.max_stream_data_local = max(stream.max_stream_data_local, rx.starting_offset() + window)
        if stream.max_stream_data_local_sent == stream.max_stream_data_local:
            return
        highest, rx.highest_offset = rx.highest_offset, 0  # as above: no doubling
        try:
            super()._write_stream_limits(builder=builder, space=space, stream=stream)
        finally:
            rx.highest_offset = highest


@functools.cache
def _read_credit_class(cls: type[QuicConnection]) -> type[QuicConnection]:
    return ReadCredit if cls is QuicConnection else type(cls.__name__, (ReadCredit, cls), {})


def read_credit(quic: QuicConnection) -> None:
    """Give ``quic`` (made by aioquic's server, which names its class) :class:`ReadCredit`'s flow control. Its
    class is swapped for one that adds only its methods (and, once held, an int): no reference cycle (a method put
    on the instance would make one)."""
    if not isinstance(quic, ReadCredit):
        quic.__class__ = _read_credit_class(type(quic))  # type: ignore[arg-type]  # a class is hashable
