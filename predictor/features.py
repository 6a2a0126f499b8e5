"""Per-ack feature windows: the one definition shared by the dataset, training, evaluation and the runtime.

Numpy only (the daemon imports this through :mod:`tokenwire.predictor.runtime`, which must not load torch).

The sender keeps, for each of the last ``W`` acknowledged packets (in ack order), the raw values of a
:class:`~tokenwire.transport.marking.LatencySample`: send time, ack time, one-way latency, size, queue used
(L/C) and CE. When it asks for a prediction at time ``now`` the window becomes a ``(W, N_FEATURES)`` float32
matrix (columns below) plus a *reference* ``(3,)``: the most recent latency seen in the L and in the C queue
(the overall most recent one when the window holds no sample of that queue) and the window's *scale*, the
median latency of its acks. Models predict the next packet's latency in each queue as
``base + scale * delta``: predicting the change rather than the level makes "last value" the zero-effort
answer, and measuring every latency and time in units of the window's own latency level makes the inputs
and the output the same on a 5 Mbit/s LTE link and a 0.5 Mbit/s EVDO link with ten times the delay (the
held-out traces are of the second kind). Inputs are clipped to [-CLIP, CLIP].
"""

from __future__ import annotations

import numpy as np

MS_SCALE = 100.0
"""Milliseconds per unit of the AR baseline's output (the networks use the window scale instead)."""
CLIP = 20.0
"""Scaled inputs are clipped to [-CLIP, CLIP] (20 times the window's median latency)."""
MIN_SCALE_MS = 1.0

# raw columns stored per ack (ring buffer / dataset)
RAW_COLUMNS = ("sent_at", "ack_at", "latency_ms", "size", "queue_l", "ce")
R_SENT, R_ACK, R_LAT, R_SIZE, R_QL, R_CE = range(6)

FEATURES = (
    "latency",  # one-way latency of the acked packet / scale
    "latency_minus_base_q",  # (its latency - the current base of the queue it used) / scale
    "ack_gap",  # ack inter-arrival / scale
    "size",  # bytes / 1500
    "queue_l",  # 1 = it went through the L queue (ECT(1))
    "ce",  # 1 = it arrived CE-marked
    "send_gap",  # time since the previous send when this packet left / scale
    "age",  # (now - ack time) / scale: how stale this sample is at prediction time
    "since_send",  # (now - send time of the acked packet) / scale
)
N_FEATURES = len(FEATURES)
FEATURES_VERSION = 2
"""Bumped whenever the meaning of a column changes; a model built for another version is refused."""


def queue_bases(raw: np.ndarray) -> np.ndarray:
    """``(2,)`` float64: most recent latency seen in the L and the C queue (fallback: most recent overall)."""
    lat = raw[:, R_LAT]
    ql = raw[:, R_QL] > 0.5
    last = lat[-1]
    out = np.empty(2)
    for j, mask in enumerate((ql, ~ql)):
        idx = np.flatnonzero(mask)
        out[j] = lat[idx[-1]] if idx.size else last
    return out


def window_features(raw: np.ndarray, now: float, prev_ack: float | None = None,
                    prev_sent: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``raw`` ``(W, 6)`` in ack order -> (features ``(W, N_FEATURES)`` float32, reference ``(3,)``).

    ``prev_ack``/``prev_sent`` are the ack and send times of the sample just before the window (so the
    first row has gaps too); without them the first row's gaps are 0.
    """
    w = raw.shape[0]
    lat = raw[:, R_LAT]
    scale = max(float(np.median(lat)), MIN_SCALE_MS)
    base = queue_bases(raw)
    f = np.empty((w, N_FEATURES), dtype=np.float64)
    ack = raw[:, R_ACK]
    sent = raw[:, R_SENT]
    ql = raw[:, R_QL]
    inv = 1.0 / scale
    f[:, 0] = lat * inv
    f[:, 1] = (lat - np.where(ql > 0.5, base[0], base[1])) * inv
    gap = np.empty(w)
    gap[1:] = np.diff(ack)
    gap[0] = ack[0] - prev_ack if prev_ack is not None else 0.0
    f[:, 2] = gap * (1000.0 * inv)
    f[:, 3] = raw[:, R_SIZE] / 1500.0
    f[:, 4] = ql
    f[:, 5] = raw[:, R_CE]
    sgap = np.empty(w)
    sgap[1:] = np.diff(sent)
    sgap[0] = sent[0] - prev_sent if prev_sent is not None else 0.0
    f[:, 6] = sgap * (1000.0 * inv)
    f[:, 7] = (now - ack) * (1000.0 * inv)
    f[:, 8] = (now - sent) * (1000.0 * inv)
    np.clip(f, -CLIP, CLIP, out=f)
    return f.astype(np.float32), np.array([base[0], base[1], scale])


def build_windows(raw: np.ndarray, at: np.ndarray, first_idx: np.ndarray, window: int,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised :func:`window_features` for many prediction times (training/evaluation).

    ``raw`` ``(N, 6)`` is the whole ack log of a run in ack order; prediction ``k`` happens at ``at[k]`` and
    sees acks ``first_idx[k] - window .. first_idx[k] - 1`` (``first_idx[k]`` = number of acks received by
    then, must be >= window + 1). Returns (X ``(K, W, F)`` float32, references ``(K, 3)`` float64) identical
    to calling :func:`window_features` per prediction (tested).
    """
    k = at.shape[0]
    idx = first_idx[:, None] - window + np.arange(window)[None, :]  # (K, W)
    r = raw[idx]  # (K, W, 6)
    prev = raw[first_idx - window - 1]  # (K, 6)
    lat = r[:, :, R_LAT]
    ql = r[:, :, R_QL] > 0.5
    pos = np.arange(window)[None, :]
    base = np.empty((k, 3))
    base[:, 2] = np.maximum(np.median(lat, axis=1), MIN_SCALE_MS)
    inv = (1.0 / base[:, 2])[:, None]
    last = lat[:, -1]
    for j, mask in enumerate((ql, ~ql)):
        li = np.where(mask, pos, -1).max(axis=1)
        base[:, j] = np.where(li >= 0, lat[np.arange(k), np.maximum(li, 0)], last)
    f = np.empty((k, window, N_FEATURES))
    ack = r[:, :, R_ACK]
    sent = r[:, :, R_SENT]
    f[:, :, 0] = lat * inv
    f[:, :, 1] = (lat - np.where(ql, base[:, :1], base[:, 1:2])) * inv
    f[:, 0, 2] = ack[:, 0] - prev[:, R_ACK]
    f[:, 1:, 2] = np.diff(ack, axis=1)
    f[:, :, 2] *= 1000.0 * inv
    f[:, :, 3] = r[:, :, R_SIZE] / 1500.0
    f[:, :, 4] = r[:, :, R_QL]
    f[:, :, 5] = r[:, :, R_CE]
    f[:, 0, 6] = sent[:, 0] - prev[:, R_SENT]
    f[:, 1:, 6] = np.diff(sent, axis=1)
    f[:, :, 6] *= 1000.0 * inv
    f[:, :, 7] = (at[:, None] - ack) * (1000.0 * inv)
    f[:, :, 8] = (at[:, None] - sent) * (1000.0 * inv)
    np.clip(f, -CLIP, CLIP, out=f)
    return f.astype(np.float32), base
