"""The learned forecasters (torch; training and export only, never imported by the runtime).

Both take the feature window ``x`` ``(B, W, F)`` of :mod:`.features` and its reference ``(B, 3)`` (last L
latency, last C latency, window scale; ms) and return the predicted latency of the next packet in the L and
the C queue, ``(B, 2)`` ms, as ``scale * exp(log(base_q / scale) + out)``: a correction in log space to the
last latency seen in each queue (zero output = "last value"), measured against the window's latency level so
one network covers 10 ms and 2 s latencies; the readout also sees both ``log(base_q / scale)``.

* :class:`TransformerForecaster` — the SwiftQueue model: linear embedding per ack, learned positions, pre-LN
  encoder blocks written with plain matmul/softmax (so the ONNX graph is small and exports with any opset),
  readout from the newest ack's token plus a mean over the window.
* :class:`GRUForecaster` — the small recurrent baseline.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .features import MIN_SCALE_MS, MS_SCALE, N_FEATURES


def _log_ref(ref: torch.Tensor) -> torch.Tensor:
    """log(last L / scale), log(last C / scale): the last value of each queue in the output's units."""
    return torch.log(ref[:, :2].clamp_min(MIN_SCALE_MS) / ref[:, 2:3])


def _decode(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Network output (log-ratio to the window scale) -> latency in ms; bounded to e^±6 of the scale."""
    return ref[:, 2:3] * torch.exp(out.clamp(-6.0, 6.0))


class _Block(nn.Module):
    """Pre-LN self-attention + feed-forward block."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dh = d // heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, w, d = h.shape
        qkv = self.qkv(self.ln1(h)).reshape(b, w, 3, self.heads, self.dh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = torch.softmax(q @ k.transpose(-1, -2) * (1.0 / math.sqrt(self.dh)), dim=-1)
        o = (att @ v).permute(0, 2, 1, 3).reshape(b, w, d)
        h = h + self.drop(self.proj(o))
        return h + self.drop(self.ff(self.ln2(h)))


class TransformerForecaster(nn.Module):
    kind = "transformer"

    def __init__(self, window: int = 64, d_model: int = 32, heads: int = 4, layers: int = 2, ff: int = 64,
                 dropout: float = 0.0, n_features: int = N_FEATURES) -> None:
        super().__init__()
        self.config = {"window": window, "d_model": d_model, "heads": heads, "layers": layers, "ff": ff,
                       "dropout": dropout, "n_features": n_features}
        self.embed = nn.Linear(n_features, d_model)
        self.pos = nn.Parameter(torch.zeros(1, window, d_model))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(_Block(d_model, heads, ff, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Sequential(nn.Linear(2 * d_model + 2, d_model), nn.GELU(), nn.Linear(d_model, 2))

    def forward(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos
        for blk in self.blocks:
            h = blk(h)
        h = self.ln(h)
        last = _log_ref(ref)
        z = torch.cat([h[:, -1], h.mean(dim=1), last], dim=-1)
        return _decode(last + self.head(z), ref)


class GRUForecaster(nn.Module):
    kind = "gru"

    def __init__(self, window: int = 64, hidden: int = 32, n_features: int = N_FEATURES) -> None:
        super().__init__()
        self.config = {"window": window, "hidden": hidden, "n_features": n_features}
        self.gru = nn.GRU(n_features, hidden, batch_first=True)
        self.head = nn.Linear(hidden + 2, 2)

    def forward(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(x)
        last = _log_ref(ref)
        return _decode(last + self.head(torch.cat([h[-1], last], dim=-1)), ref)


NETS = {"transformer": TransformerForecaster, "gru": GRUForecaster}


def build(kind: str, config: dict) -> nn.Module:
    """A fresh network of ``kind`` from its ``config`` dict (as saved in checkpoints)."""
    return NETS[kind](**config)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def change_focused_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                        delta_ms: float = 20.0) -> torch.Tensor:
    """Huber loss in units of ``MS_SCALE`` ms, each element weighted (sharp changes up-weighted), NaN masked.

    ``weight`` is ``1 + alpha`` on sharp latency changes and 1 elsewhere (SwiftQueue's loss "focuses on sharp
    latency changes"); the mask drops targets whose shadow packet was lost.
    """
    mask = ~torch.isnan(target)
    t = torch.where(mask, target, pred.detach())
    err = nn.functional.huber_loss(pred / MS_SCALE, t / MS_SCALE, reduction="none", delta=delta_ms / MS_SCALE)
    w = weight * mask
    return (err * w).sum() / w.sum().clamp_min(1.0)
