"""The shape and dtype checks of a per-layer KV list, apart from the codec.

``stack_kv`` (the codec's input) and ``put_kv_unix`` (the engine's client, which sends raw bytes and never
encodes) refuse the same KV in the same words through :func:`check_kv_layers`. The client used to import the
codec for them: ``cachegen.rans``'s ``@njit(cache=True)`` kernels need a writable numba cache at import, so an
engine running as a user with no writable home (and a read-only install) failed with "cannot cache function
'_encode_kernel': no locator available". This module needs torch alone, and only when called.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import InvalidInput

if TYPE_CHECKING:
    import torch


def check_kv_layers(kv: Sequence[Any]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[int, int, int]]:
    """Each layer's ``(K, V)`` as ``[H, T, D]`` views (a batch of one dropped; no copy) and ``(H, T, D)``; raises
    :class:`InvalidInput` for what cannot be stacked: not pairs, not floating-point tensors, mixed dtypes (the
    bitstream records one and decoded every tensor to layer 0's K dtype), sparse or meta-device tensors, K and V of
    other shapes, a batch of more than one, not 3-D after the batch, layers of other shapes, or no heads or head
    dims (decoding refuses those)."""
    import torch

    if len(kv) == 0:
        raise InvalidInput("no layers")
    layers: list[tuple[torch.Tensor, torch.Tensor]] = []
    shape: tuple[int, ...] | None = None
    dtype0 = None
    for i, layer in enumerate(kv):
        if not isinstance(layer, tuple | list) or len(layer) != 2:
            raise InvalidInput(f"layer {i} must be a (K, V) pair, not a {type(layer).__name__}"
                               + (f" of {len(layer)}" if isinstance(layer, tuple | list) else ""))
        k, v = layer
        for t in (k, v):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise InvalidInput("KV entries must be floating-point tensors")
            # (torch's own words came out of the copy or the NaN check: "copy_() between dense and sparse
            # Tensors is not implemented", "Tensor.item() cannot be called on meta tensors")
            if t.layout != torch.strided:
                raise InvalidInput(f"KV entries must be dense tensors, not {t.layout} (call .to_dense())")
            if t.is_meta:
                raise InvalidInput("KV entries on the meta device hold no values")
        if dtype0 is None:
            dtype0 = k.dtype
        if k.dtype != dtype0 or v.dtype != dtype0:
            raise InvalidInput(f"layer {i} has K {k.dtype} and V {v.dtype}; every tensor must be {dtype0}")
        if k.shape != v.shape:
            raise InvalidInput(f"K {tuple(k.shape)} and V {tuple(v.shape)} differ")
        if k.dim() == 4:
            if k.shape[0] != 1:
                raise InvalidInput("batch size must be 1")
            k, v = k[0], v[0]
        if k.dim() != 3:
            raise InvalidInput("expected [1, H, T, D] or [H, T, D] tensors")
        if shape is None:
            shape = tuple(k.shape)
        elif tuple(k.shape) != shape:
            raise InvalidInput("all layers must have the same shape")
        layers.append((k, v))
    assert shape is not None
    h, t, d = shape
    if h == 0 or d == 0:
        raise InvalidInput(f"{h} heads of {d} dims")
    return layers, (h, t, d)
