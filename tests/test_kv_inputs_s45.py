"""Codec and ingest inputs (session 45). A sparse or meta-device tensor reached torch inside the codec and the
ingest, which raised its own RuntimeError ("copy_() between dense and sparse Tensors is not implemented",
"Tensor.item() cannot be called on meta tensors") where every other bad KV is ``InvalidInput`` /
``KVIngestError``; ``kv bench --tokens`` past the format failed only after the bench had run on it;
``decode_sequence(dtype=)`` joined chunks of two dtypes; ``read_header`` misread a non-byte memoryview."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tokenwire.daemon.kv_ingest import put_kv_unix
from tokenwire.daemon.kv_meta import KVIngestError
from tokenwire.daemon.kv_service import KVService
from tokenwire.daemon.kv_store_local import LocalChunkStore
from tokenwire.transport.cachegen import InvalidInput, encode_chunk

CASES = {
    "sparse_coo": (lambda: torch.randn(1, 2, 4, 8).to_sparse(), "dense tensors, not torch.sparse_coo"),
    "meta": (lambda: torch.empty(1, 2, 4, 8, device="meta"), "meta device"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_encode_refuses_sparse_and_meta_kv(case: str) -> None:
    make, said = CASES[case]
    with pytest.raises(InvalidInput, match=said):
        encode_chunk([(make(), make())], "low", fingerprint=1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_ingest_and_the_socket_client_refuse_them_in_their_words(case: str, tmp_path) -> None:
    make, said = CASES[case]
    svc = KVService(LocalChunkStore(tmp_path / "kv", 1 << 26), chunk_tokens=64)
    try:
        with pytest.raises(KVIngestError, match=said):
            asyncio.run(svc.ingest("m", list(range(4)), [(make(), make())]))
    finally:
        svc.close()
    with pytest.raises(KVIngestError, match=said):  # before connecting: no socket there
        put_kv_unix(str(tmp_path / "none.sock"), "m", list(range(4)), [(make(), make())])


def test_kv_bench_refuses_a_chunk_past_the_format_before_building_it(capsys) -> None:
    """``--tokens`` past the format's 32,768 was refused by the encoder after the quantizer and both coders had
    run on the chunk (32.7 s and 3.4 GB for 2 layers); now argparse refuses it, and 32,768 itself is taken."""
    from tokenwire.daemon.cli import main
    from tokenwire.transport.cachegen import cli as kv_cli

    with pytest.raises(SystemExit) as info:
        main(["kv", "bench", "--layers", "1", "--heads", "1", "--head-dim", "1", "--tokens", "32769"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--tokens: a chunk holds at most 32768 tokens" in err and "[kv bench]" not in err
    assert kv_cli._bench_tokens("32768") == 32768


@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_decode_sequence_refuses_chunks_of_another_dtype_even_with_dtype_given(out_dtype) -> None:
    """The documented ``ModelMismatch`` for chunks of another dtype compared the decoded tensors: with ``dtype=``
    they all decode to it, and an fp16 context's chunk and an fp32 one's were joined silently."""
    from tokenwire.transport.cachegen import ModelMismatch, decode_sequence, encode_sequence

    g = torch.Generator().manual_seed(45)
    half = encode_sequence([(torch.randn(1, 2, 64, 8, generator=g).half(),) * 2], "medium", fingerprint=3,
                           chunk_tokens=32)
    full = encode_sequence([(torch.randn(1, 2, 64, 8, generator=g),) * 2], "medium", fingerprint=3, chunk_tokens=32)
    kw = {} if out_dtype is None else {"dtype": out_dtype}
    with pytest.raises(ModelMismatch, match="chunk 1 holds float32 KV, chunk 0 float16"):
        decode_sequence([half[0], full[1]], **kw)
    assert decode_sequence(half, **kw)[0][0].shape == (1, 2, 64, 8)  # one dtype: joined


def test_read_header_and_decode_sequence_take_a_memoryview_of_another_format() -> None:
    """``decode_chunk`` read a ``uint16`` memoryview's bytes; ``read_header`` (and so ``decode_sequence``) read its
    items, and called the chunk "not a tokenwire KV chunk (bad magic)"."""
    import numpy as np

    from tokenwire.transport.cachegen import decode_chunk, decode_sequence, encode_sequence, read_header

    g = torch.Generator().manual_seed(0)
    chunk = b"x"
    while len(chunk) % 2:  # (a whole number of uint16 items)
        chunk = encode_sequence([(torch.randn(1, 2, 8, 8, generator=g),) * 2], "low", fingerprint=1)[0]
    view = memoryview(np.frombuffer(chunk, np.uint16))
    assert read_header(view) == read_header(chunk)
    expect, got = decode_chunk(chunk), decode_sequence([view])
    for (k, v), (k2, v2) in zip(expect, got, strict=True):
        assert torch.equal(k, k2) and torch.equal(v, v2)
