"""The listeners' table of connection IDs (transport/quic_io.py ProtocolTable): a connection's end removes its own
IDs without a walk over every connection's. aioquic's walk, once per ending connection, made 1,500 silent clients
timing out together stall the daemon's loop for 15-30 s (a served client's first token came after 28 s)."""

from __future__ import annotations

import contextlib

from tokenwire.daemon.config import parse_config
from tokenwire.daemon.service import Daemon
from tokenwire.transport.client import connect
from tokenwire.transport.quic_io import ProtocolTable, ValidatingQuicServer

from .test_handshake_limits import until
from .test_loopback import run


class _Conn:
    """A connection as the table sees it: hashed by identity, its comparisons counted (aioquic's walk compared
    every entry with ``==``)."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        _Conn.compared += 1
        return self is other

    __hash__ = object.__hash__


def _table(conns: list[_Conn], ids_each: int) -> ProtocolTable:
    table = ProtocolTable()
    for n, conn in enumerate(conns):
        for k in range(ids_each):
            table[n.to_bytes(4, "big") + bytes([k])] = conn  # type: ignore[assignment]
    return table


def test_a_connection_that_ends_loses_its_own_ids_and_looks_at_no_other():
    conns = [_Conn() for _ in range(1_000)]
    server = ValidatingQuicServer.__new__(ValidatingQuicServer)  # (no socket: the table alone)
    server._protocols = _table(conns, 3)
    _Conn.compared = 0
    server._connection_terminated(conns[500])  # type: ignore[arg-type]
    assert _Conn.compared == 0  # (aioquic's walk: 3,000 comparisons, for each connection that ends)
    assert len(server._protocols) == 2_997 and conns[500] not in server._protocols.values()
    assert server._protocols.ids_of(conns[499]) == {(499).to_bytes(4, "big") + bytes([k]) for k in range(3)}  # type: ignore[attr-defined,arg-type]


def test_the_table_keeps_each_connections_ids_as_aioquic_writes_it():
    a, b = _Conn(), _Conn()
    table = _table([a, b], 2)
    del table[b"\0\0\0\0\0"]  # an ID a retires
    assert table.ids_of(a) == {b"\0\0\0\0\1"}  # type: ignore[arg-type]
    table[b"\0\0\0\0\1"] = b  # type: ignore[assignment]  # (an ID issued again, to another connection)
    assert table.ids_of(a) == frozenset() and len(table.ids_of(b)) == 3  # type: ignore[arg-type]
    table.forget(a)  # type: ignore[arg-type]  # (nothing left of it: nothing of b's removed)
    assert len(table) == 3 and set(table.values()) == {b}
    table.forget(b)  # type: ignore[arg-type]
    assert not table and table.ids_of(b) == frozenset()  # type: ignore[arg-type]
    table[b"x"] = a  # type: ignore[assignment]
    table.clear()  # (the server's close)
    assert not table and table.ids_of(a) == frozenset()  # type: ignore[arg-type]


def test_a_real_connections_close_removes_its_ids_and_keeps_the_others():
    async def go() -> tuple[bool, bool, bool, int]:
        daemon = Daemon(parse_config({"server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": ""}}))
        await daemon.start()
        port = daemon.addresses[0][1]
        table = daemon._servers[0]._protocols
        assert isinstance(table, ProtocolTable)
        try:
            first, second = contextlib.AsyncExitStack(), contextlib.AsyncExitStack()
            await first.enter_async_context(connect("127.0.0.1", port, verify=False))
            await second.enter_async_context(connect("127.0.0.1", port, verify=False))
            await until(lambda: len(daemon.protocols) == 2)
            ended = set(daemon.protocols)
            await first.aclose()
            await until(lambda: len(set(table.values())) == 1)
            (kept,) = set(table.values())
            ended.discard(kept)  # type: ignore[arg-type]
            (gone,) = ended
            ids_match = table.ids_of(kept) == {cid for cid, p in table.items() if p is kept}
            await second.aclose()
            await until(lambda: not table)
            return gone not in table.values(), ids_match, bool(table.ids_of(kept)), len(table)
        finally:
            await daemon.stop()

    gone_out, ids_match, kept_left, left = run(go(), 60)
    assert gone_out and ids_match and not kept_left and left == 0
