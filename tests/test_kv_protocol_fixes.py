"""The KV endpoint as an independent client (written from docs/protocol.md alone) found it: a bare FIN on a new
stream left the server's side open, so its credit never came back (after 128 of them the connection could open no
fetch); a second KV_ACK of a chunk was closed as "not sent"; a fetch by hashes under another model named the model
the chunks belong to."""

from __future__ import annotations

import pytest

from tokenwire.daemon.kv_service import KVService
from tokenwire.daemon.kv_store_local import LocalChunkStore
from tokenwire.transport.errors import ErrorCode
from tokenwire.transport.frames import KvFetch
from tokenwire.transport.kv_channel import KVNotFound
from tokenwire.transport.kv_client_session import KVChunkReceived, KVDoneReceived
from tokenwire.transport.session_events import ConnectionEnded

from .test_kv_channel_refusals import CHUNK_BYTES, KVPair, _plan
from .test_kv_store_fixes4 import make_kv


def test_bare_fins_on_new_streams_end_on_the_server_and_give_their_credit_back():
    pair = KVPair()
    quic = pair.client.quic
    for _ in range(200):  # more than the server's 128 bidirectional streams
        quic.send_stream_data(quic.get_next_available_stream_id(), b"", end_stream=True)
        pair.exchange(rounds=4)
    pair.exchange(rounds=100)
    pair.assert_connection_up()  # a fetch after them is served (it was held back by QUIC for ever)
    assert not pair.requested()[:-1]  # (none of the empty streams became a fetch)


def test_a_second_kv_ack_of_a_chunk_is_closed_as_acknowledged_already():
    pair = KVPair()
    pair.serve = False
    sid = pair.fetch()
    pair.exchange(rounds=50)
    assert pair.server is not None
    (req,) = pair.requested()
    pair.server.start(req, _plan(2), pair.now)
    pair.exchange(rounds=20)
    pair.server.send_chunk(req, 0, "low", b"k" * CHUNK_BYTES, pair.now)
    pair.exchange(rounds=50)
    got = [e for e in pair.client_events if isinstance(e, KVChunkReceived) and e.stream_id == sid]
    assert got
    ev = got[0]
    pair.client.ack(sid, ev.header, ev.first_at, ev.done_at)
    pair.exchange(rounds=20)
    pair.client.ack(sid, ev.header, ev.first_at, ev.done_at)  # the same chunk again
    pair.exchange(rounds=50)
    ends = [e for e in pair.client_events if isinstance(e, ConnectionEnded)]
    assert ends and ends[0].error_code == ErrorCode.MALFORMED_FRAME
    assert "acknowledged already" in ends[0].reason and "not sent" not in ends[0].reason


def test_a_fetch_by_hashes_under_another_model_is_a_miss_that_names_no_model(tmp_path):
    svc = KVService(LocalChunkStore(tmp_path / "store", 64 << 20), chunk_tokens=64)
    try:
        ids = list(range(3, 3 + 192))
        hashes = svc.ingest_sync("m-A", ids, make_kv(len(ids), 2))
        fetch = KvFetch(model="m-B", deadline_ms=1000, hashes=[bytes.fromhex(h) for h in hashes])
        with pytest.raises(KVNotFound) as exc:
            svc.resolve_sync(fetch)
        assert "m-A" not in str(exc.value) and str(exc.value).endswith("context not stored: 0 of 3 chunks found")
        px = KvFetch(model="m-B", deadline_ms=1000, hashes=[bytes.fromhex(h) for h in hashes], prefix=True)
        with pytest.raises(KVNotFound, match="0 of 3"):
            svc.resolve_sync(px)
        plan = svc.resolve_sync(KvFetch(model="m-A", deadline_ms=1000, hashes=[bytes.fromhex(h) for h in hashes]))
        assert len(plan.token_counts) == 3  # (its own model's fetch by hashes is served)
    finally:
        svc.close()


def test_done_is_seen_by_the_pair():  # (KVPair's own check, so a broken helper does not pass the tests above)
    pair = KVPair()
    sid = pair.fetch()
    pair.exchange(rounds=200)
    assert isinstance(pair.outcome(sid), KVDoneReceived)
