"""Latency forecasters for the daemon's packet path: onnxruntime only, never torch.

* :class:`OnnxLatencyForecaster` runs the exported SwiftQueue model (CPU, one intra-op thread) over a ring
  buffer of the last acks; :meth:`~OnnxLatencyForecaster.predict_batch` answers for several packets of a
  burst with one inference call.
* :class:`EwmaLatencyForecaster` is the pure-Python SRTT-style baseline (alpha = 1/8 per queue).
* :func:`load_forecaster` loads the shipped model (or a given file) and raises :class:`ModelError` when it
  is missing or unusable; :func:`make_swiftqueue_policy` builds the ``swiftqueue`` marking policy and falls
  back to ``l4s`` with a logged warning when the model cannot be loaded, so a bad model file never stops
  the daemon from sending.

Both forecasters implement :class:`tokenwire.transport.marking.LatencyForecaster`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from tokenwire.transport.marking import L4SPolicy, LatencySample, MarkingPolicy, SwiftQueuePolicy

from .features import CLIP, FEATURES, FEATURES_VERSION, N_FEATURES, R_ACK, R_SENT, window_features
from .onnx_session import ModelError, open_session, read_model

log = logging.getLogger("tokenwire.predictor")

SHIPPED_MODEL = "swiftqueue.onnx"
MODEL_FORMAT = "tokenwire-swiftqueue"


def shipped_model_path() -> Path:
    """Path of the model that ships inside the package (``tokenwire/predictor/shipped/swiftqueue.onnx``)."""
    return Path(str(resources.files("tokenwire.predictor").joinpath("shipped", SHIPPED_MODEL)))


class _Ring:
    """The last ``cap`` raw ack rows, kept twice in a flat array so the newest ``cap`` are one slice."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._buf = np.zeros((2 * cap, 6))
        self._i = 0  # next write position in [0, cap)
        self.count = 0

    def push(self, row: Sequence[float]) -> None:
        self._buf[self._i] = row
        self._buf[self._i + self.cap] = row
        self._i = (self._i + 1) % self.cap
        self.count += 1

    def view(self) -> np.ndarray:
        """The stored rows, oldest first (valid once ``count >= cap``)."""
        return self._buf[self._i:self._i + self.cap]


def _row(s: LatencySample) -> tuple[float, ...]:
    return (s.sent_at, s.ack_at, s.latency_ms, float(s.size), float(s.queue_l), float(s.ce))


class OnnxLatencyForecaster:
    """SwiftQueue forecaster: exported model over the last ``window`` acks (see :mod:`.features`)."""

    def __init__(self, session: Any, window: int, meta: dict[str, Any], path: str = "", digest: str = "") -> None:
        self._session = session
        self.window = window
        self.meta = meta
        self.path = path
        # sha256 of the bytes the session was built from: the daemon's reload compares it with the file on disk,
        # which a model replaced in place (same path) changed without a word
        self.digest = digest
        self._ring = _Ring(window + 1)  # one more than the window: the first row's gaps need its predecessor
        self._in_x, self._in_ref = (i.name for i in session.get_inputs())
        # the ring's count at the first of the latest run of windows the model answered non-finite for (None: the
        # last answer was finite); see predict()
        self._bad_since: int | None = None
        self._out = session.get_outputs()[0].name

    def fresh(self) -> OnnxLatencyForecaster:
        """A forecaster with its own (empty) ack history on the same inference session.

        One per connection: onnxruntime sessions are reentrant, and loading the model at every handshake
        would cost milliseconds.
        """
        return OnnxLatencyForecaster(self._session, self.window, self.meta, self.path, self.digest)

    @property
    def ready(self) -> bool:
        return self._ring.count > self.window

    def observe(self, sample: LatencySample) -> None:
        row = _row(sample)
        if all(math.isfinite(v) for v in row):  # a garbage sample from a peer must not poison the window
            self._ring.push(row)

    def _inputs(self, nows: Sequence[float]) -> dict[str, np.ndarray]:
        raw = self._ring.view()
        prev, win = raw[0], raw[1:]
        x0, ref = window_features(win, nows[0], prev[R_ACK], prev[R_SENT])
        x = np.repeat(x0[None], len(nows), axis=0)
        if len(nows) > 1:  # only the staleness columns depend on the time of asking
            t = np.asarray(nows, dtype=np.float64)[:, None]
            k = 1000.0 / ref[2]
            x[:, :, 7] = np.clip((t - win[None, :, R_ACK]) * k, -CLIP, CLIP)
            x[:, :, 8] = np.clip((t - win[None, :, R_SENT]) * k, -CLIP, CLIP)
        r = np.repeat(ref[None].astype(np.float32), len(nows), axis=0)
        return {self._in_x: x, self._in_ref: r}

    def predict(self, now: float) -> tuple[float, float] | None:
        """(L ms, C ms) for a packet sent at ``now``; None until ``window + 1`` acks have been seen.

        A non-finite answer (NaN or infinity) is None too, as long as one odd sample may be its cause: such a sample
        puts every window outside what the model was trained on until it leaves the ring, ``window + 1`` acks later.
        Non-finite answers for every window asked until none of the first one's acks is left raise
        :class:`ModelError`, which the swiftqueue policy treats like any model failure (l4s, one warning,
        ``tokenwire_marking_model_errors_total``): answered None for good, a model that gave NaN for every input
        kept every decision "cold" for the connection's life, without a word.
        """
        if not self.ready:
            return None
        y = self._session.run([self._out], self._inputs([now]))[0]
        l_ms, c_ms = float(y[0, 0]), float(y[0, 1])
        if math.isfinite(l_ms) and math.isfinite(c_ms):
            self._bad_since = None
            return l_ms, c_ms
        if self._bad_since is None:
            self._bad_since = self._ring.count
        elif self._ring.count - self._bad_since >= self._ring.cap:  # no ack of the first such window is left
            raise ModelError(f"{self.path or 'the latency model'}: answers non-finite latencies (NaN or infinity) "
                             f"for every window of the last {self._ring.count - self._bad_since} acks: the weights "
                             "are broken (did training diverge?)")
        return None

    def predict_batch(self, nows: Sequence[float]) -> np.ndarray | None:
        """``(len(nows), 2)`` predictions for packets leaving at ``nows``, in one inference call."""
        if not self.ready or not len(nows):
            return None
        return self._session.run([self._out], self._inputs(nows))[0]


class EwmaLatencyForecaster:
    """SRTT-style smoothing per queue (alpha = 1/8, RFC 6298); the unseen queue borrows the other's value."""

    name = "ewma"

    def __init__(self, alpha: float = 0.125) -> None:
        self.alpha = alpha
        self._est: list[float | None] = [None, None]  # L, C

    def observe(self, sample: LatencySample) -> None:
        if not math.isfinite(sample.latency_ms):
            return
        j = 0 if sample.queue_l else 1
        old = self._est[j]
        self._est[j] = sample.latency_ms if old is None else old + self.alpha * (sample.latency_ms - old)

    def predict(self, now: float) -> tuple[float, float] | None:
        l_ms, c_ms = self._est
        if l_ms is None and c_ms is None:
            return None
        return (l_ms if l_ms is not None else c_ms), (c_ms if c_ms is not None else l_ms)  # type: ignore[return-value]

    def predict_batch(self, nows: Sequence[float]) -> np.ndarray | None:
        p = self.predict(nows[0]) if len(nows) else None
        return None if p is None else np.tile(np.array(p, dtype=np.float32), (len(nows), 1))


def fixed_batch(forecaster: OnnxLatencyForecaster) -> int | None:
    """The batch size the model's ``x`` input is fixed at, None when its batch axis is dynamic (named or unknown).

    The load checks take any batch axis: the daemon asks one window at a time, so a model fixed at batch 1 (a
    ``torch.onnx.export`` without ``dynamic_axes``) marks packets, and ``eval`` scores it one window per call.
    ``bench predictor`` times batches of 8 and 64, and it fails there; this names the cause instead of
    onnxruntime's "invalid dimensions"."""
    dims = forecaster._session.get_inputs()[0].shape
    first = dims[0] if isinstance(dims, (list, tuple)) and dims else None
    return first if type(first) is int else None


def inference_failure(forecaster: OnnxLatencyForecaster, batch: int, exc: Exception | None = None,
                      answered: Any = None) -> str:
    """One line on why the model failed on ``batch`` real windows at once: the exception onnxruntime raised, or
    the shape it answered instead of ``(batch, 2)``; with the fixed batch axis behind it, when that is the cause."""
    if exc is not None:
        why = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
    else:
        why = f"answered {getattr(answered, 'dtype', type(answered).__name__)} {getattr(answered, 'shape', '')}"
    line = f"{forecaster.path}: inference on {batch} real window{'s' if batch != 1 else ''} failed ({why})"
    fixed = fixed_batch(forecaster)
    if fixed is not None and fixed != batch:
        line += (f"; its batch axis is fixed at {fixed}: export it with a dynamic one (`tokenwire predictor export` "
                 "does)")
    return line


def load_forecaster(path: str | None = None) -> OnnxLatencyForecaster:
    """Load the shipped model (``path=None``) or ``path``; raises :class:`ModelError` when it is unusable.

    Unusable: missing, unreadable or corrupt; metadata that is not a tokenwire latency model's (a JSON object
    with the format, the feature list and version, an integer window); inputs other than ``x`` float32
    ``(batch, W, F)`` and ``ref`` float32 ``(batch, 3)``; an output other than float32 ``(batch, 2)``; a
    trial inference on zeros that fails or answers another shape; or one on a window of steady acks that answers
    NaN or infinity. The daemon calls this once at start, so a model that would fail on the packet path falls back
    to ``l4s`` there instead.
    """
    file = Path(path) if path is not None else shipped_model_path()
    data = read_model(file)
    sess = open_session(data, str(file))
    meta, window = _check_meta(sess, file)
    _check_signature(sess, file, window)
    forecaster = OnnxLatencyForecaster(sess, window, meta, str(file), hashlib.sha256(data).hexdigest())
    _trial_run(forecaster, file)
    return forecaster


def model_file(fc: OnnxLatencyForecaster) -> dict[str, str]:
    """``{"path", "sha256"}`` of a loaded model, the record a ``testbed swiftqueue`` JSON keeps of its model, for
    ``eval``'s and ``bench predictor``'s JSON (a model exported again over the same path read as the same one). The
    digest is that of the bytes the session was built from (the one the daemon's reload compares), not of a second
    read of a file that may have changed since."""
    return {"path": fc.path, "sha256": fc.digest}


def unfinished_run(fc: OnnxLatencyForecaster) -> str | None:
    """What to say of a model exported from a training run that did not finish (``finished`` false in its
    metadata), or None for a finished one (or one from before that record, such as the shipped ones).

    One wording for ``eval``, ``config check`` and the daemon's start: ``export`` warned once, as it wrote the file,
    and then the daemon marked with the weights of an interrupted run (the best epoch before the stop) without a
    word."""
    if fc.meta.get("finished") is not False:
        return None
    best, run = fc.meta.get("best_epoch"), fc.meta.get("epochs_run")
    epochs = (f": best epoch {best} of {run} run" if isinstance(best, int) and isinstance(run, int)
              else "")  # (a file without them said "best epoch None of None")
    return f"from a training run that did not finish (interrupted, or still running when exported){epochs}"


def _check_meta(sess: Any, file: Path) -> tuple[dict[str, Any], int]:
    """The model's ``tokenwire`` metadata as a dict, and its window; :class:`ModelError` if either is wrong."""
    props = sess.get_modelmeta().custom_metadata_map
    try:
        meta = json.loads(props["tokenwire"])
    except RecursionError:  # json's answer to a metadata string of "[[[[...": a traceback, not a ModelError
        raise ModelError(f"{file}: not a tokenwire latency model (metadata is nested too deeply)") from None
    except (KeyError, ValueError):
        if _is_bandwidth_model(sess):
            raise ModelError(f"{file}: tokenwire's KV bandwidth model (the KV channel's chunk-throughput "
                             "forecaster), not a latency model; give the SwiftQueue latency model (the shipped "
                             "swiftqueue.onnx, or one `tokenwire predictor export` writes)") from None
        raise ModelError(f"{file}: not a tokenwire latency model (metadata missing)") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{file}: not a tokenwire latency model (metadata is a JSON {type(meta).__name__}, "
                         "not an object)")
    differs = _other_inputs(meta)
    if differs:
        raise ModelError(f"{file}: model was built for other inputs ({'; '.join(differs)})")
    window = meta.get("window")
    if type(window) is not int or window < 2:  # bool is an int subclass: type(), not isinstance()
        raise ModelError(f"{file}: metadata window must be an integer >= 2, got {window!r}")
    return meta, window


def _other_inputs(meta: dict[str, Any]) -> list[str]:
    """What in a model's metadata differs from the inputs this version builds: each of format, features_version
    and the feature list, as "got X, expected Y"; empty when they all match.

    The refusal used to print the model's format and feature list only: a model of another features_version
    with the same names read as if nothing differed, and one with other names left the reader to diff them
    against a list it did not show."""
    out = []
    if meta.get("format") != MODEL_FORMAT:
        out.append(f"format {meta.get('format')!r}, expected {MODEL_FORMAT!r}")
    if meta.get("features_version") != FEATURES_VERSION:
        out.append(f"features_version {meta.get('features_version')!r}, expected {FEATURES_VERSION}")
    features = meta.get("features")
    if features != list(FEATURES):
        out.append(f"features {features!r}, expected {list(FEATURES)!r}")
    return out


def _is_bandwidth_model(sess: Any) -> bool:
    """Whether ``sess`` has the KV bandwidth model's signature (one input ``x`` of (batch, its features), one
    output of (batch, its quantiles)): that model carries no metadata, so given where a latency model belongs
    it was "metadata missing", which does not say it is a model of tokenwire's own, for another purpose."""
    from .bandwidth import N_FEATURES as BW_FEATURES
    from .bandwidth import QUANTILES

    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    return (len(inputs) == 1 and inputs[0].name == "x" and _shape_is(inputs[0].shape, [BW_FEATURES])
            and len(outputs) == 1 and _shape_is(outputs[0].shape, [len(QUANTILES)]))


def _shape_is(shape: Any, rest: list[int]) -> bool:
    """``shape`` is ``(batch, *rest)``: any batch dimension (named, unknown or a number), then exactly ``rest``."""
    dims = list(shape) if isinstance(shape, (list, tuple)) else []
    return len(dims) == 1 + len(rest) and dims[1:] == rest


def _check_signature(sess: Any, file: Path, window: int) -> None:
    """Inputs ``x`` (batch, window, F) and ``ref`` (batch, 3), output (batch, 2), all float32.

    The names too: the forecaster binds its inputs by position, ``eval`` and ``export`` feed them by name,
    so a model with other names ran in the daemon and failed in ``eval`` (swapped names: x fed as ref).
    """
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    described = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
    if (len(inputs) != 2 or [i.name for i in inputs] != ["x", "ref"]
            or not _shape_is(inputs[0].shape, [window, N_FEATURES]) or not _shape_is(inputs[1].shape, [3])):
        raise ModelError(f"{file}: unexpected model inputs ({described}); expected x (batch, {window}, "
                         f"{N_FEATURES}) and ref (batch, 3)")
    if any(i.type != "tensor(float)" for i in inputs):
        raise ModelError(f"{file}: unexpected model input types ({described}); expected float32")
    if not outputs or not _shape_is(outputs[0].shape, [2]) or outputs[0].type != "tensor(float)":
        got = ", ".join(f"{o.name} {o.type} {o.shape}" for o in outputs) or "none"
        raise ModelError(f"{file}: unexpected model output ({got}); expected float32 (batch, 2)")


def _trial_run(forecaster: OnnxLatencyForecaster, file: Path) -> None:
    """One inference on zeros, as the packet path will run it: what onnxruntime checks only at run time
    (types and shapes inside the graph) fails here, at load, rather than on the first packet."""
    feed = {forecaster._in_x: np.zeros((1, forecaster.window, N_FEATURES), np.float32),
            forecaster._in_ref: np.zeros((1, 3), np.float32)}
    try:
        y = forecaster._session.run([forecaster._out], feed)[0]
    except Exception as exc:  # onnxruntime's own untyped exceptions
        raise ModelError(f"{file}: trial inference failed ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(y, np.ndarray) or y.shape != (1, 2) or y.dtype != np.float32:
        raise ModelError(f"{file}: trial inference answered {getattr(y, 'dtype', type(y).__name__)} "
                         f"{getattr(y, 'shape', '')}; expected float32 (1, 2)")
    _trial_finite(forecaster, file)


def _trial_samples(n: int) -> list[LatencySample]:
    """``n`` acks of a steady flow, 5 ms apart: two in three through L at about 20 ms, the others through C at
    about 40 ms."""
    out = []
    for i in range(n):
        t = 0.005 * (i + 1)
        queue_l = i % 3 != 0
        lat = (20.0 if queue_l else 40.0) + (i % 5) * 0.2
        out.append(LatencySample(sent_at=t - lat / 1000 - 0.01, ack_at=t, latency_ms=lat, size=1200,
                                 queue_l=queue_l, ce=False))
    return out


def _trial_finite(forecaster: OnnxLatencyForecaster, file: Path) -> None:
    """A model that answers NaN or infinity on a real window is refused, as ``export`` refuses one.

    Accepted, a model that answered NaN for every input left swiftqueue "cold" on every packet (never leaving its
    queue) and asked it again at every packet, with no warning. Judged on a window the packet path builds
    (:meth:`OnnxLatencyForecaster._inputs`), not on the zeros above: a scale of 0 ms is no input the packet path
    makes (at least MIN_SCALE_MS), and the shipped model itself answers NaN there. A model that raises on this
    window is left to the packet path's fallback, as before: only the zeros trial's failures refuse a model.
    """
    trial = forecaster.fresh()  # its own history: the returned forecaster starts empty
    hist = _trial_samples(trial.window + 1)
    for s in hist:
        trial.observe(s)
    try:
        y = trial._session.run([trial._out], trial._inputs([hist[-1].ack_at + 0.001]))[0]
    except Exception:  # onnxruntime's own untyped exceptions: see above
        return
    if not np.all(np.isfinite(y)):
        raise ModelError(f"{file}: trial inference answers non-finite latencies (NaN or infinity) on a window of "
                         "steady acks: the weights are broken (did training diverge?)")


def make_swiftqueue_policy(path: str | None = None, **kw: Any) -> MarkingPolicy:
    """The ``swiftqueue`` policy on the model at ``path`` (shipped by default); ``l4s`` if it cannot load.

    ``kw`` goes to :class:`~tokenwire.transport.marking.SwiftQueuePolicy` (margin_ms, hysteresis_ms, ...).
    """
    try:
        forecaster = load_forecaster(path)
    except ModelError as exc:
        log.warning("swiftqueue: latency model unavailable (%s); falling back to the l4s policy", exc)
        return L4SPolicy()
    return SwiftQueuePolicy(forecaster, **kw)
