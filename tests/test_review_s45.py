"""Review of session 45's commits (2302dca, 0298ff3, e17401a): the faults a reviewer found, each pinned.

1. Without auth, a connection became idle (closable for room) only when a datagram of its client arrived after its
   answer: a client that sends nothing after its request held its slot, never closed for room, for the 60-s QUIC idle
   timeout (one handshake and one cheap request per slot a minute kept max_sessions full).
2. An ended connection must leave ``Admission.idle`` (no test failed with that line removed).
3. An ack that arrives at the very moment of a send counts as received by it (``collect``'s rule): the n_acked check
   must not refuse such a tie (no test failed with the check's rule flipped).
4. ``decode_sequence`` read each chunk's dtype before its CRC was checked: a corrupted dtype byte was reported as
   another model's KV (``ModelMismatch``) instead of ``CorruptBitstream``.
5. An unfinished model without its epoch fields was named "best epoch None of None".
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np
import pytest
import torch

from tokenwire.daemon import admission
from tokenwire.predictor.dataset import load, save
from tokenwire.predictor.runtime import unfinished_run
from tokenwire.transport.cachegen import CorruptBitstream, bitstream, decode_sequence, encode_sequence
from tokenwire.transport.client import connect
from tokenwire.transport.errors import RemoteError
from tokenwire.transport.frames import Finished, Request, encode_stream_frame

from .test_admission_idle_s45 import _admission, _Proto
from .test_auth_fixes2 import _daemon
from .test_handshake_limits import until
from .test_hostile_clients import _raw
from .test_loopback import run

FLOOR_S = 0.3



def test_a_client_silent_after_its_request_is_closed_for_room(monkeypatch):
    """Idle counted from its answer's last datagram out, not only from the client's next datagram: one that sends
    nothing after its request (not even an ACK) never became idle and held its slot until the QUIC idle timeout."""
    monkeypatch.setattr(admission, "IDLE_EVICTION_FLOOR_S", FLOOR_S)

    async def go() -> tuple[Any, ...]:
        async with _daemon(max_sessions=1) as daemon, _raw(daemon) as raw:
            quic = raw._quic
            sid = quic.get_next_available_stream_id()
            request = Request(messages=[{"role": "user", "content": "x"}], max_tokens=1, scheme="stream")
            quic.send_stream_data(sid, encode_stream_frame(request))  # (no FIN: the FIN ends a request)
            raw.transmit()
            raw.transmit = lambda: None  # from now on this client sends nothing at all (no ACK, no PING)
            await until(lambda: any(isinstance(f, Finished) for f in raw.frames.get(sid, [])), 5)
            (proto,) = daemon.protocols
            await asyncio.sleep(FLOOR_S + 1.0)
            state = dict(answering=proto.answering(), admitted=proto.admitted_without_auth,
                         in_idle=proto in daemon.admission.idle)
            t0 = time.monotonic()
            try:
                async with connect("127.0.0.1", daemon.addresses[0][1], verify=False) as honest:
                    served = bool(await honest.chat("hello", max_tokens=1).collect())
                    err = None
            except RemoteError as exc:
                served, err = False, str(exc)
            return state, served, err, time.monotonic() - t0

    state, served, err, _took = run(go(), 60)
    assert served, (state, err)


def test_an_ended_connection_leaves_the_idle_set() -> None:
    adm = _admission(2)
    a, b = _Proto("a"), _Proto("b")
    adm.note_idle(a, 0.0)  # type: ignore[arg-type]
    adm.note_idle(b, 1.0)  # type: ignore[arg-type]
    adm.ended(a)  # type: ignore[arg-type]
    assert list(adm.idle) == [b]


def test_an_ack_at_the_moment_of_a_send_counts_as_received_by_it(small, tmp_path) -> None:
    data = load(small)
    acks = np.sort(data["ack_at"][~np.isnan(data["ack_at"])])
    sent = data["sent_at"]
    # a send with an ack between it and the send before: moved onto that ack, the sends stay in order
    between = np.searchsorted(acks, sent[1:], side="left") > np.searchsorted(acks, sent[:-1], side="left")
    i = int(np.flatnonzero(between)[5]) + 1
    tie = acks[acks < sent[i]].max()
    assert sent[i - 1] <= tie < sent[i]
    data["sent_at"][i] = tie
    data["n_acked"] = np.searchsorted(acks, data["sent_at"], side="right").astype(np.float64)  # collect's rule
    data["meta"] = json.dumps(data["meta"])
    save(tmp_path / "tie.npz", data)
    loaded = load(tmp_path / "tie.npz")
    assert loaded["n_acked"][i] == np.searchsorted(acks, tie, side="right")


def test_a_corrupted_dtype_byte_is_a_crc_failure_not_another_models_kv() -> None:
    torch.manual_seed(0)
    kv = [(torch.randn(1, 2, 64, 16, dtype=torch.float16), torch.randn(1, 2, 64, 16, dtype=torch.float16))
          for _ in range(2)]
    chunks = [bytes(c) for c in encode_sequence(kv, "medium", fingerprint=7, chunk_tokens=32)]
    h = bitstream.read_header(chunks[1])
    for off in range(48):  # the byte that holds the dtype, found by trying (the header's layout is the codec's)
        for v in range(256):
            b = bytearray(chunks[1])
            b[off] = v
            try:
                g = bitstream.read_header(bytes(b))
            except Exception:
                continue
            if g.dtype != h.dtype and (g.fingerprint, g.n_layers, g.n_heads, g.head_dim) == (
                    h.fingerprint, h.n_layers, h.n_heads, h.head_dim):
                with pytest.raises(CorruptBitstream):
                    decode_sequence([chunks[0], bytes(b)], expect_fingerprint=7)
                return
    pytest.fail("no header byte changes the dtype alone")


class _Fc:
    def __init__(self, meta: dict[str, Any]) -> None:
        self.meta = meta


def test_an_unfinished_model_without_its_epochs_is_named_without_none() -> None:
    assert unfinished_run(_Fc({"finished": False})) == (  # type: ignore[arg-type]
        "from a training run that did not finish (interrupted, or still running when exported)")
    assert unfinished_run(_Fc({"finished": False, "best_epoch": 3, "epochs_run": 5})).endswith(  # type: ignore
        ": best epoch 3 of 5 run")
    assert unfinished_run(_Fc({"finished": True})) is None  # type: ignore[arg-type]
