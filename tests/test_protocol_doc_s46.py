"""A client written from docs/protocol.md alone (session 46's probe) found places where the doc said too little or
the wrong thing, while the server did what it should: the doc now says it, and these tests pin both sides.

* FINISHED/GEN_TIMES `g`: "µs deltas" said not from what (from the token before: `Transcript.gen_deltas_us`);
* the KV endpoint advertises its 16 fetch slots as QUIC's stream limit (the doc said it kept aioquic's default, and
  that a 17th fetch got ERROR LIMIT_EXCEEDED, which a QUIC stack never lets a client send);
* without auth the daemon's chat port holds a new connection's bytes, not its streams (the doc said both);
* ACK datagrams are optional, and an ACK `n` past the tokens sent acknowledges what was sent;
* a connection closed for a violation keeps its answers resumable as cancelled ones (the doc said "keeps none").
"""

from __future__ import annotations

from pathlib import Path

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from tokenwire.transport.kv_channel import KVServerSession, ServerTuning
from tokenwire.transport.kv_server_session import MAX_FETCHES
from tokenwire.transport.transcript import Transcript, gen_times_from_deltas

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def _doc() -> str:
    return " ".join(DOC.read_text().split()).lower()


def test_gen_times_are_deltas_from_the_token_before_as_the_doc_says() -> None:
    tr = Transcript()
    for k, at in enumerate((5.0, 5.010, 5.015, 5.100)):
        tr.append(b"t%d" % k, at)
    assert tr.gen_deltas_us() == [0, 10_000, 5_000, 85_000]  # not [0, 10_000, 15_000, 100_000]
    assert gen_times_from_deltas(tr.gen_deltas_us()) == [0.0, 0.010, 0.015, 0.100]
    assert "`g[k]` is token k's generation time minus token k−1's" in _doc()


def test_the_kv_endpoint_advertises_its_fetch_slots_as_the_stream_limit() -> None:
    quic = QuicConnection(configuration=QuicConfiguration(is_client=True))
    KVServerSession(quic, tuning=ServerTuning(forecaster="ewma"))
    assert quic._local_max_streams_bidi.value == MAX_FETCHES == 16
    doc = _doc()
    assert "16 fetch slots are advertised the same way" in doc
    assert "not advertised this way" not in doc and "the 17th gets error limit_exceeded" not in doc


def test_the_doc_states_what_a_client_from_it_needed() -> None:
    doc = _doc()
    for said in ("ACK datagrams are optional",
                 "An ACK's `n` past the tokens sent so far counts as acknowledging those sent",
                 "holds only the small flow-control window (not the streams",
                 "keeps none generating for a resume",
                 "a bare FIN, no byte before it, is not malformed",
                 "a TOKENS datagram for a handle with no open request",
                 "for a second REQUEST or KV_FETCH on a stream whose `v` is not 1",
                 "whose value, the header's msgpack body, is ≤ 4096",
                 "none of the server's ALPNs"):
        assert said.lower() in doc, said
