"""Per-ack feature windows: the one definition shared by the dataset, training, evaluation and the runtime.

Numpy only (the daemon imports this through :mod:`tokenwire.predictor.runtime`, which must not load torch).

The sender keeps, for each of the last ``W`` acknowledged packets (in ack order), the raw values of a
:class:`~tokenwire.transport.marking.LatencySample`: send time, ack time, one-way latency, size, queue used
(L/C) and CE. When it asks for a prediction at time ``now`` the window becomes a ``(W, N_FEATURES)`` float32
matrix (columns below) plus a *reference* ``(3,)``: the most recent latency seen in the L and in the C queue
(the overall most recent one when the window holds no sample of that queue) and the window's *scale*, the
median latency of its acks. Every latency and time is measured in units of the window's own latency level
(latencies as log ratios, times as ratios clipped to [-CLIP, CLIP]), so the inputs look the same on a
5 Mbit/s LTE link and on a 0.5 Mbit/s EVDO link with ten times the delay (the held-out traces are of the
second kind), and a 4 s outage sample neither saturates nor dominates the window.
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
    "log_latency",  # log(one-way latency of the acked packet / scale)
    "log_latency_over_base_q",  # log(its latency / the current base of the queue it used)
    "ack_gap",  # ack inter-arrival / scale
    "size",  # bytes / 1500
    "queue_l",  # 1 = it went through the L queue (ECT(1))
    "ce",  # 1 = it arrived CE-marked
    "send_gap",  # time since the previous send when this packet left / scale
    "age",  # (now - ack time) / scale: how stale this sample is at prediction time
    "since_send",  # (now - send time of the acked packet) / scale
)
N_FEATURES = len(FEATURES)
FEATURES_VERSION = 3
"""Bumped whenever the meaning of a column changes; a model built for another version is refused."""


def queue_bases(raw: np.ndarray) -> np.ndarray:
    """``(2,)`` float64: most recent latency seen in the L and the C queue (fallback: most recent overall)."""
    lat = raw[:, R_LAT]
    rev = raw[::-1, R_QL] > 0.5
    il = int(rev.argmax())
    ic = int((~rev).argmax())
    last = lat[-1]
    n = lat.shape[0]
    return np.array([lat[n - 1 - il] if rev[il] else last, lat[n - 1 - ic] if not rev[ic] else last])


def window_features(raw: np.ndarray, now: float, prev_ack: float | None = None,
                    prev_sent: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``raw`` ``(W, 6)`` in ack order -> (features ``(W, N_FEATURES)`` float32, reference ``(3,)``).

    ``prev_ack``/``prev_sent`` are the ack and send times of the sample just before the window (so the
    first row has gaps too); without them the first row's gaps are 0. Runs per prediction on the packet
    path, hence written with few numpy calls.
    """
    w = raw.shape[0]
    lat = raw[:, R_LAT]
    srt = np.sort(lat)
    scale = max(0.5 * float(srt[(w - 1) // 2] + srt[w // 2]), MIN_SCALE_MS)
    base = queue_bases(raw)
    ql = raw[:, R_QL]
    k = 1000.0 / scale
    f = np.empty((w, N_FEATURES), dtype=np.float64)
    safe = np.maximum(lat, MIN_SCALE_MS)
    f[:, 0] = np.log(safe / scale)
    f[:, 1] = np.log(safe / np.maximum(np.where(ql > 0.5, base[0], base[1]), MIN_SCALE_MS))
    ack = raw[:, R_ACK]
    sent = raw[:, R_SENT]
    f[:, 2] = np.diff(ack, prepend=ack[0] if prev_ack is None else prev_ack)
    f[:, 3] = raw[:, R_SIZE] * (1.0 / 1500.0)
    f[:, 4] = ql
    f[:, 5] = raw[:, R_CE]
    f[:, 6] = np.diff(sent, prepend=sent[0] if prev_sent is None else prev_sent)
    f[:, 7] = now - ack
    f[:, 8] = now - sent
    f[:, (2, 6, 7, 8)] *= k
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
    safe = np.maximum(lat, MIN_SCALE_MS)
    f[:, :, 0] = np.log(safe * inv)
    f[:, :, 1] = np.log(safe / np.maximum(np.where(ql, base[:, :1], base[:, 1:2]), MIN_SCALE_MS))
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
