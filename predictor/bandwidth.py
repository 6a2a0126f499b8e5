"""Bandwidth forecasters for the KV channel's controller (runtime side: numpy + onnxruntime, never torch).

A forecaster sees one sample per completed KV chunk (bytes delivered, seconds it took at the receiver) and
forecasts the throughput of the *next few chunks*: a median and a low quantile. The controller plans with the
low quantile, because a deadline is missed by the bandwidth it overestimated, not by the one it guessed right.

* :class:`EwmaForecaster` is the baseline (CacheGen's controller uses the previous chunk's throughput; an EWMA
  is its smoothed form). Its "low quantile" is a fixed fraction of the EWMA.
* :class:`OnnxForecaster` runs ``shipped/bandwidth.onnx`` (a small MLP trained by
  :mod:`tokenwire.predictor.bandwidth_train` on chunk-throughput series of the shared cellular traces, see
  ``shipped/bandwidth_card.md``) with onnxruntime on one thread.

Features (:func:`features`) are scale-free: log-ratios of the last ``WINDOW`` chunk rates to the newest one,
log durations, a validity mask and the newest rate's log-magnitude, so one model serves 0.5 and 50 Mbit/s links.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np

from .onnx_session import open_session, read_model

WINDOW = 8  # past chunk samples the model sees
HORIZON = 4  # the target is the throughput over the next HORIZON chunks
N_FEATURES = 3 * WINDOW + 1
QUANTILES = (0.5, 0.1)
MODEL_FILE = "bandwidth.onnx"
# Split-conformal shift of the 10 % head: on the training traces' series the raw head covers 90 %; times 0.80
# it covers 95 % (93.2 % on the held-out traces), the coverage a 95 % deadline target needs
# (shipped/bandwidth_card.md).
LOW_CALIBRATION = 0.80


@dataclass(frozen=True)
class Forecast:
    median_bps: float
    low_bps: float


class BandwidthForecaster(Protocol):
    def observe(self, nbytes: int, seconds: float) -> None: ...

    def forecast(self) -> Forecast | None:
        """None before the first sample."""
        ...


def features(rates_bps: np.ndarray, durations_s: np.ndarray) -> np.ndarray:
    """The model input for one history (oldest first, at least one sample): ``[N_FEATURES]`` float32."""
    r = np.asarray(rates_bps, np.float64)[-WINDOW:]
    d = np.asarray(durations_s, np.float64)[-WINDOW:]
    n = len(r)
    x = np.zeros(N_FEATURES, np.float32)
    ref = max(float(r[-1]), 1.0)
    pad = WINDOW - n
    x[pad:WINDOW] = np.log(np.maximum(r, 1.0) / ref)
    x[WINDOW + pad : 2 * WINDOW] = np.log(np.clip(d, 1e-4, 100.0)) / 3.0
    x[2 * WINDOW + pad : 3 * WINDOW] = 1.0
    x[3 * WINDOW] = (math.log(ref) - math.log(5e6)) / 3.0
    return x


class EwmaForecaster:
    """EWMA of per-chunk throughput; ``low_fraction`` of it as the conservative estimate."""

    def __init__(self, alpha: float = 0.5, low_fraction: float = 0.75) -> None:
        self.alpha = alpha
        self.low_fraction = low_fraction
        self.value: float | None = None

    def observe(self, nbytes: int, seconds: float) -> None:
        if seconds <= 0 or nbytes <= 0:
            return
        rate = nbytes * 8.0 / seconds
        self.value = rate if self.value is None else self.alpha * rate + (1 - self.alpha) * self.value

    def forecast(self) -> Forecast | None:
        if self.value is None:
            return None
        return Forecast(self.value, self.value * self.low_fraction)


def default_model_path() -> Path:
    return Path(str(resources.files("tokenwire.predictor") / "shipped" / MODEL_FILE))


class OnnxRunner:
    """One onnxruntime session (CPU, one intra-op thread), shared by every forecaster of a process."""

    _shared: ClassVar[dict[str, OnnxRunner]] = {}

    def __init__(self, path: str | Path) -> None:
        self.session = open_session(read_model(Path(path)), str(path))
        self.input = self.session.get_inputs()[0].name

    @classmethod
    def shared(cls, path: str | Path | None = None) -> OnnxRunner:
        key = str(path or default_model_path())
        if key not in cls._shared:
            cls._shared[key] = cls(key)
        return cls._shared[key]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``[B, N_FEATURES]`` -> ``[B, len(QUANTILES)]`` predicted log(future rate / newest rate)."""
        return self.session.run(None, {self.input: np.ascontiguousarray(x, np.float32)})[0]


class OnnxForecaster:
    """The learned forecaster (see module docstring)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.runner = OnnxRunner.shared(path)
        self.rates: deque[float] = deque(maxlen=WINDOW)
        self.durations: deque[float] = deque(maxlen=WINDOW)

    def observe(self, nbytes: int, seconds: float) -> None:
        if seconds <= 0 or nbytes <= 0:
            return
        self.rates.append(nbytes * 8.0 / seconds)
        self.durations.append(seconds)

    def forecast(self) -> Forecast | None:
        if not self.rates:
            return None
        x = features(np.array(self.rates), np.array(self.durations))[None]
        out = self.runner(x)[0]
        ref = self.rates[-1]
        med, low = (ref * math.exp(float(np.clip(v, -5, 5))) for v in out[:2])
        return Forecast(med, min(low * LOW_CALIBRATION, med))


def preload(kind: str, path: str | Path | None = None) -> None:
    """Load now what :func:`make_forecaster` needs for ``kind``: for ``onnx``, onnxruntime and the shared session
    of the model at ``path`` (the shipped one by default; once per process); ``ewma`` needs nothing.

    For a thread at start-up: the KV server makes a forecaster on the event loop at a connection's first fetch,
    and there the import and the model's load (~150-200 ms) held up every connection of the process. Raises what
    that first construction would (:class:`~.onnx_session.ModelError` for a missing or unusable model,
    ``ImportError`` for a broken onnxruntime), and ``ValueError`` for an unknown ``kind``. A failed load is not
    cached: each first construction tries it again, as before."""
    if kind == "onnx":
        OnnxRunner.shared(path)
    elif kind != "ewma":
        raise ValueError(f"unknown forecaster {kind!r}; choose onnx or ewma")


def make_forecaster(kind: str) -> BandwidthForecaster:
    """``onnx`` (the learned model) or ``ewma``."""
    if kind == "onnx":
        return OnnxForecaster()
    if kind == "ewma":
        return EwmaForecaster()
    raise ValueError(f"unknown forecaster {kind!r}; choose onnx or ewma")
