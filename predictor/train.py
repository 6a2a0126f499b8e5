"""Training of the learned forecasters (``tokenwire predictor train``): torch on CPU, one thread.

Datasets are turned into prediction points by the harness (:func:`~.harness.points`); the training files
are split by *time* into train and validation (the last ``val_share`` of each file's points), so validation
never sees the same moments; held-out traces are for ``eval`` only. Early stopping keeps the weights of the
best validation loss; the checkpoint holds kind, config, weights, window, the input features (list and
version: ``export`` refuses a checkpoint of other features), the training log, the best epoch and whether
training finished (it is saved at every improvement with ``finished: False``, so an interrupted
run leaves a usable but unfinished checkpoint, which ``export`` warns about).

The loss is :func:`~.models.change_focused_loss`: Huber on the change to the last value per queue, with
targets at sharp changes (spike by the metric's definition, or a jump from the last seen value of > 20 ms
and > 20 %) weighted ``1 + alpha``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .baselines import LinearAR
from .dataset import DatasetError
from .features import FEATURES, FEATURES_VERSION, MS_SCALE
from .harness import SPIKE_ABS_MS, SPIKE_REL, Points, file_points
from .onnx_session import ModelError

TRANSFORMER_DEFAULTS = {"d_model": 32, "heads": 4, "layers": 2, "ff": 64, "dropout": 0.0}
"""The Transformer's constructor defaults that ``--net`` may override (mirrors ``models.TransformerForecaster``;
a test keeps the two in step)."""


def check_net_overrides(net: object) -> dict:
    """``--net`` as a dict the Transformer can be built from; ValueError naming the bad key otherwise.

    Checked before torch is imported, so a typo costs no model construction and no traceback (a d_model
    that the heads do not divide used to fail only at the first forward pass).
    """
    if not isinstance(net, dict):
        raise ValueError("--net must be a JSON object, e.g. '{\"d_model\": 32}'")
    for key, value in net.items():
        if key not in TRANSFORMER_DEFAULTS:
            raise ValueError(f"--net: unknown key {key!r} (known: {', '.join(TRANSFORMER_DEFAULTS)})")
        if key == "dropout":
            if type(value) not in (int, float) or not 0.0 <= value < 1.0:
                raise ValueError("--net: dropout must be a number in [0, 1)")
        elif type(value) is not int or value < 1:
            raise ValueError(f"--net: {key} must be a positive integer")
    full = {**TRANSFORMER_DEFAULTS, **net}
    if full["d_model"] % full["heads"]:
        raise ValueError(f"--net: d_model ({full['d_model']}) must be a multiple of heads ({full['heads']})")
    return dict(net)


PROGRESS_EVERY_S = 30.0
"""Seconds between :func:`train_net`'s plain progress lines when stderr is no terminal (a log file, systemd,
``nohup``): an epoch takes a minute or more, and such a run printed nothing between the epoch lines."""


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite before any epoch gave usable weights (a learning rate far too high)."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"training diverged (non-finite loss at epoch {epoch}); lower --lr")
        self.epoch = epoch


@dataclass
class TrainConfig:
    kind: str = "transformer"
    window: int = 64
    epochs: int = 30
    batch: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 5
    alpha: float = 4.0  # extra weight of sharp-change targets
    huber_ms: float = 2.0  # Huber transition: small, so the fit tracks the median (the metric is MAE)
    val_share: float = 0.2
    seed: int = 1
    max_points: int = 200_000
    net: dict = field(default_factory=dict)  # overrides of the network's constructor arguments
    # recorded only (train_config of the checkpoint and the export), nothing here reads them: torch's thread count
    # changes the weights in the last bits (4.5e-7 between 1 and 4 threads), so a seed retrains bit for bit only
    # with the same threads; the training files' paths and sha256 let eval warn when given one of them, and the
    # runs they were collected from (trace, seed, seconds: :func:`~.harness.dataset_run`) when given a file of
    # the same trace and seed collected for another --seconds (other bytes, many of the same rows)
    threads: int = 1
    data_files: list[dict[str, str]] = field(default_factory=list)
    data_runs: list[dict] = field(default_factory=list)


def load_points(paths: list[str], window: int, val_share: float,
                log: Callable[[str], None] = print) -> tuple[Points, Points]:
    """Train/validation points from dataset files (time split inside each file).

    Files without prediction points are skipped with a warning (:func:`~.harness.file_points`);
    :class:`~.dataset.DatasetError` when no training point is left, which torch's scheduler would
    otherwise report as "Expected positive integer total_steps", and when a queue has no known target
    (:func:`check_targets`).
    """
    tr, va = [], []
    for _, pts in file_points(paths, window, log):
        cut = int(len(pts) * (1 - val_share))
        tr.append(pts.take(np.arange(cut)))
        va.append(pts.take(np.arange(cut, len(pts))))
    train, val = Points.concat(tr), Points.concat(va)
    if not len(train):
        raise DatasetError(f"only {len(val)} prediction point(s) in all, none left for training after the last "
                           f"{val_share:.0%} of each file is set aside for validation; collect longer runs (--seconds)")
    check_targets(train, val, paths, val_share)
    return train, val


def check_targets(train: Points, val: Points, paths: list[str], val_share: float) -> None:
    """:class:`~.dataset.DatasetError` naming what is missing when the points hold no known target (all NaN:
    every shadow dropped) for a queue in training, or none at all in validation.

    The networks' loss masks unknown targets, so without any it is 0 and they learn nothing (validation MAE
    nan) yet write checkpoints; the AR fit of that queue then failed with "Singular matrix".
    """
    files = ", ".join(paths)
    missing = [col for j, col in enumerate(("target_l_ms", "target_c_ms")) if np.isnan(train.target[:, j]).all()]
    if missing:
        raise DatasetError(f"no known {' or '.join(missing)} in the {len(train)} training points of {files} "
                           "(all NaN: every shadow packet of that queue was dropped); training needs targets "
                           "for both queues: collect other runs (a lighter load, --cross)")
    if np.isnan(val.target).all():
        raise DatasetError(f"no known target in the {len(val)} validation points (the last {val_share:.0%} of "
                           f"each of {files}; all NaN); validation would score nothing: collect longer runs "
                           "(--seconds) or runs with fewer dropped shadows")


def sample_weights(p: Points, alpha: float) -> np.ndarray:
    """``(K, 2)``: 1 + alpha where the target changes sharply (vs. previous target or vs. last value)."""
    with np.errstate(invalid="ignore"):
        d = np.abs(p.target - p.base[:, :2])
        sharp = (d > SPIKE_ABS_MS) & (d > SPIKE_REL * p.base[:, :2])
    return (1.0 + alpha * (sharp | p.spike)).astype(np.float32)


def train_net(cfg: TrainConfig, train: Points, val: Points, checkpoint: str | Path | None = None,
              log: Callable[[str], None] = print, progress_every_s: float = PROGRESS_EVERY_S) -> tuple[object, dict]:
    """Train one network; returns (model with the best weights, training log).

    A non-finite training or validation loss ends training: with the best weights so far when an earlier
    epoch gave some (with a warning), :class:`TrainingDiverged` when none did. Within an epoch, progress goes
    to a terminal as one redrawn line; otherwise ``log`` gets a plain line (epoch, batches, running loss,
    elapsed time) at most every ``progress_every_s`` seconds.
    """
    import torch

    from .models import build, change_focused_loss, n_params

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if len(train) > cfg.max_points:
        train = train.take(np.sort(rng.choice(len(train), cfg.max_points, replace=False)))
    net_cfg = {"window": cfg.window, **cfg.net}
    model = build(cfg.kind, net_cfg)
    log(f"{cfg.kind}: {n_params(model)} parameters, {len(train)} train / {len(val)} validation points")

    def tensors(p: Points) -> tuple:
        return (torch.from_numpy(p.x), torch.from_numpy(p.base.astype(np.float32)),
                torch.from_numpy(p.target.astype(np.float32)), torch.from_numpy(sample_weights(p, cfg.alpha)))

    xt, bt, yt, wt = tensors(train)
    xv, bv, yv, wv = tensors(val)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch)
    total_steps = cfg.epochs * steps_per_epoch
    # torch's OneCycleLR divides by zero when its warm-up ends at step 0, pct_start * total_steps == 1: 10 steps in
    # all (`--epochs 10` on data that fills one batch) was a ZeroDivisionError traceback; 2 warm-up steps there
    pct_start = 0.2 if total_steps == 10 else 0.1
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=pct_start)
    best = (math.inf, -1)
    best_state = None
    history = []

    def val_loss() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            preds = torch.cat([model(xv[i:i + 2048], bv[i:i + 2048]) for i in range(0, len(xv), 2048)])
            loss = float(change_focused_loss(preds, yv, wv, cfg.huber_ms))
            ok = ~torch.isnan(yv)
            mae = float((preds - yv)[ok].abs().mean())
        model.train()
        return loss, mae

    shown = False  # a "\r  epoch N  x%" progress line is on the terminal (stderr), not ended

    def erase() -> None:
        """Clear the progress line, so the next line (a log line, "interrupted") starts on an empty one."""
        nonlocal shown
        if shown:
            print("\r\x1b[K", end="", file=sys.stderr, flush=True)
            shown = False

    def say(msg: str) -> None:
        erase()
        log(msg)

    t0 = time.monotonic()
    tty = sys.stderr.isatty()
    reported = t0  # the last plain progress line (no terminal)
    # the epoch lines' columns: "train" and "val" are losses, not MAEs, and "*" follows the validation loss only
    log(f"  {cfg.kind}: train, val = loss on the training and validation points (Huber on the error in units of "
        f"{MS_SCALE:g} ms, transition at {cfg.huber_ms:g} ms, sharp changes weighted {1 + cfg.alpha:g}x)")
    log(f"  {cfg.kind}: MAE = validation mean absolute error in ms; * = a new lowest validation loss (not MAE): "
        "those weights are kept and checkpointed")
    try:
        for epoch in range(1, cfg.epochs + 1):
            perm = torch.from_numpy(rng.permutation(len(train)))
            total = 0.0
            for s in range(steps_per_epoch):
                idx = perm[s * cfg.batch:(s + 1) * cfg.batch]
                loss = change_focused_loss(model(xt[idx], bt[idx]), yt[idx], wt[idx], cfg.huber_ms)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                total += float(loss.detach())
                if tty:
                    if s % 20 == 0:
                        print(f"\r  epoch {epoch} {100 * (s + 1) // steps_per_epoch:3d}%", end="", file=sys.stderr,
                              flush=True)
                        shown = True
                elif time.monotonic() - reported >= progress_every_s:
                    reported = time.monotonic()
                    log(f"  epoch {epoch}/{cfg.epochs}: {s + 1}/{steps_per_epoch} batches, running loss "
                        f"{total / (s + 1):.4f}, {reported - t0:.0f} s")
            vl, vmae = val_loss()
            history.append({"epoch": epoch, "train_loss": total / steps_per_epoch, "val_loss": vl, "val_mae_ms": vmae})
            if not (math.isfinite(total) and math.isfinite(vl)):
                if best_state is None:
                    raise TrainingDiverged(epoch)
                say(f"  warning: epoch {epoch}: non-finite loss, training diverged; stopping with the weights of "
                    f"epoch {best[1]} (lower --lr)")
                break
            mark = ""
            if vl < best[0]:
                best = (vl, epoch)
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                mark = " *"
                if checkpoint is not None:
                    save_checkpoint(checkpoint, model, cfg, history, best_epoch=epoch, finished=False)
            say(f"  epoch {epoch:3d}/{cfg.epochs}  train {total / steps_per_epoch:.4f}  val {vl:.4f}  "
                f"val MAE {vmae:6.2f} ms  {time.monotonic() - t0:5.0f} s{mark}")
            if epoch - best[1] >= cfg.patience and epoch < cfg.epochs:
                # only when epochs were left to run: after the last planned one nothing stopped early
                n = cfg.patience
                say(f"  early stop: no validation improvement for {n} epoch{'s' if n != 1 else ''} "
                    f"(best epoch {best[1]}; {cfg.epochs - epoch} of {cfg.epochs} epochs not run)")
                break
    finally:  # Ctrl-C, an error: the CLI's message must not be appended to the progress line either
        erase()
    if best_state is None:  # unreachable: a finite first epoch always improves on inf
        raise TrainingDiverged(len(history))
    model.load_state_dict(best_state)
    model.eval()
    info = {"best_epoch": best[1], "best_val_loss": best[0], "history": history, "params": n_params(model)}
    if checkpoint is not None:
        save_checkpoint(checkpoint, model, cfg, history, best_epoch=best[1], finished=True)
    return model, info


def save_checkpoint(path: str | Path, model: object, cfg: TrainConfig, history: list, *,
                    best_epoch: int | None = None, finished: bool = True) -> None:
    """Write a checkpoint: the model's weights (those of ``best_epoch``), the log so far, and whether
    training has ``finished`` (False while epochs are still to come). Through
    :func:`tokenwire.daemon.cli.output_file`: atomic for a regular file (keeping its permissions), a
    symlink's target replaced, a device or FIFO written through.

    torch is handed an open file, not the temporary file's name: given a name, it names the records inside
    the zip after it (``.transformer.pt.b0gplfsg/data.pkl``), so two runs of one seed wrote the same weights
    into different bytes; given a file it names them ``archive/``. A failed write comes back as an ``OSError``
    (:func:`_save_error`), which the CLI reports in one line, not as torch's ``RuntimeError`` traceback."""
    import torch

    from tokenwire.daemon.cli import output_file

    state = model.state_dict()  # type: ignore[attr-defined]
    ck = {"kind": cfg.kind, "config": model.config,  # type: ignore[attr-defined]
          "state_dict": state, "train_config": asdict(cfg), "history": history, "best_epoch": best_epoch,
          "finished": finished, "features": list(FEATURES), "features_version": FEATURES_VERSION}
    with output_file(path) as tmp:
        try:
            with open(tmp, "wb") as f:
                torch.save(ck, f)
        except RuntimeError as exc:  # output_file removes the temporary file and leaves ``path`` as it was
            raise _save_error(tmp, exc, sum(t.numel() * t.element_size() for t in state.values())) from None


def _save_error(tmp: Path, exc: RuntimeError, weight_bytes: int) -> OSError:
    """The ``OSError`` for a ``torch.save`` into ``tmp`` that failed with ``exc``.

    torch's zip writer checks its own position after each record; when the disk fills it fails that check
    ("[enforce fail at inline_container.cc:672] . unexpected pos 86912 vs 86800"), a ``RuntimeError`` that
    the CLI's handling of full disks (``OSError``) missed, so ``train`` ended in a traceback. ENOSPC when the
    file system has less room left than the weights need (read while the partial file still holds its
    share), else an ``OSError`` with torch's first line."""
    import errno

    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    try:
        st = os.statvfs(tmp.parent)
        free: int | None = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    if free is not None and free < weight_bytes + (64 << 10):  # 64 KiB: the pickled log and the zip's records
        return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (writing the checkpoint: {free:,} bytes free, "
                       f"its weights alone take {weight_bytes:,})")
    return OSError(None, f"writing the checkpoint failed (torch.save: {detail})")


def check_checkpoint_features(path: str | Path, ck: dict) -> None:
    """:class:`~.onnx_session.ModelError` unless checkpoint ``ck`` was trained on the input features this
    version builds (its recorded ``features_version`` and ``features``).

    ``export`` stamps the features of the version that runs it into the model; a checkpoint trained on another
    version's features was exported as if it were of this one, and the runtime then fed it inputs of another
    meaning without a word. Checkpoints record their features since this check exists: an older one is refused
    with that reason (its features are unknown), not as a file ``train`` did not write."""
    version, features = ck.get("features_version"), ck.get("features")
    if version is None and features is None:
        raise ModelError(f"{path}: a checkpoint of an older `tokenwire predictor train` that did not record the "
                         f"input features it was trained on; this version exports features version "
                         f"{FEATURES_VERSION} and cannot tell whether they are the same: retrain it with this "
                         "version (`tokenwire predictor train`), then export")
    if version != FEATURES_VERSION or features != list(FEATURES):
        listed = ", ".join(map(str, features)) if isinstance(features, list) else repr(features)
        what = f"features version {version!r}" if version != FEATURES_VERSION else f"other features ({listed})"
        raise ModelError(f"{path}: trained on {what}; this version builds features version {FEATURES_VERSION} "
                         f"({', '.join(FEATURES)}) and would stamp its model so: retrain it with this version "
                         "(`tokenwire predictor train`), then export")


def checkpoint_best_epoch(ck: dict) -> int | None:
    """The epoch whose weights a checkpoint holds: recorded since checkpoints say so; for older ones the
    epoch of the lowest validation loss in its history (the weights early stopping kept), None without one."""
    if isinstance(ck.get("best_epoch"), int):
        return ck["best_epoch"]
    scored = [(h["val_loss"], h["epoch"]) for h in ck.get("history") or []
              if isinstance(h, dict) and isinstance(h.get("val_loss"), float | int) and math.isfinite(h["val_loss"])
              and isinstance(h.get("epoch"), int)]
    return min(scored)[1] if scored else None


def _refusal(path: str | Path, why: str) -> ModelError:
    """The one-line :class:`ModelError` of a file that is no checkpoint ``train`` wrote."""
    return ModelError(f"{path}: not a checkpoint written by `tokenwire predictor train` ({why})")


def read_checkpoint(path: str | Path) -> dict:
    """The dict of the checkpoint at ``path``, checked for the shape ``train`` writes (a model kind, a network
    config, tensors); :class:`ModelError` for anything else. Every reader of a checkpoint goes through here
    (export, train's interrupt record, eval's check that gru.onnx is an export of gru.pt): each had its own
    ``torch.load`` and failed on a truncated or foreign file in its own way, from a traceback to silence.

    The file may be anything (``--checkpoint /etc/passwd``): torch's weights-only unpickler (never the full
    one, which runs code) then raises whatever its parsing of the bytes runs into (UnpicklingError,
    RuntimeError, IndexError, UnicodeDecodeError, EOFError, struct.error, ... measured on random and mutated
    files), so *any* ``Exception`` becomes the one-line refusal, except ``MemoryError`` (the machine's state,
    not the file's); and a file that unpickles may hold anything."""
    import warnings

    import torch

    from .models import NETS

    def refuse(why: str) -> ModelError:
        return _refusal(path, why)

    def first_line(exc: BaseException) -> str:
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__

    try:
        with warnings.catch_warnings():  # garbage bytes read as a pickle header: "Detected pickle protocol 71"
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"{path}: no such checkpoint") from None
    except MemoryError:
        raise
    except Exception as exc:  # untrusted bytes: see the docstring
        why = what_file(path) or first_line(exc)
        if why == first_line(exc) and "weights_only" in str(exc):  # torch advises weights_only=False: running code
            why = "it holds Python objects other than tensors and plain data; not loaded"
        raise refuse(why) from None
    if not isinstance(ck, dict):
        raise refuse(f"it holds a {type(ck).__name__}, not the dict train writes")
    kind, config, weights = ck.get("kind"), ck.get("config"), ck.get("state_dict")
    if not isinstance(kind, str) or kind not in NETS:
        raise refuse(f"model kind {kind!r}, expected one of {', '.join(NETS)}")
    if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
        raise refuse("no network config")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise refuse("no weights")
    return ck


def load_checkpoint(path: str | Path) -> tuple[object, dict]:
    """(model in eval mode, the checkpoint's dict); :class:`ModelError` for anything ``train`` did not write
    (:func:`read_checkpoint`), or whose config and weights make no network (a config from the file: building it
    may raise anything, so any ``Exception`` but ``MemoryError`` is the same one-line refusal)."""
    from .models import build

    ck = read_checkpoint(path)
    kind, config, weights = ck["kind"], ck["config"], ck["state_dict"]
    try:
        model = build(kind, config)
        model.load_state_dict(weights)
    except MemoryError:
        raise
    except Exception as exc:  # a config from the file: TypeError, ZeroDivisionError, RuntimeError, ...
        raise _refusal(path, f"its config and weights do not make a {kind} network: {_first_detail(exc)}") from None
    model.eval()
    return model, ck


def _first_detail(exc: BaseException) -> str:
    """``exc``'s first line, and when that line only announces a list ("Error(s) in loading state_dict for
    TransformerForecaster:"), the list's first item and how many follow: the heading alone said nothing of which
    weight did not fit ("size mismatch for pos: ... [1, 64, 32] from checkpoint, ... [1, 64, 64]")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if not lines[0].endswith(":") or len(lines) < 2:
        return lines[0]
    more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
    return f"{lines[0]} {lines[1]}{more}"


MAX_SNIFF_BYTES = 64 << 20
"""The largest file :func:`what_file` reads whole (to tell JSON or ONNX): a model of the packet path is far
smaller (:data:`~.onnx_session.MAX_MODEL_BYTES`)."""


def what_file(path: str | Path) -> str | None:
    """What the file at ``path`` is, when torch could not load it as a checkpoint and the bytes say plainly why;
    None when they look like torch's own formats (a complete zip archive with ``data.pkl``, a pickle), whose
    reason is torch's.

    torch's reasons read wrong for common mistakes: an ``ar.json`` was "it holds Python objects other than
    tensors" (torch read the JSON as a pickle), a ``.pt`` copied part-way "[Errno 22] Invalid argument".
    """
    import zipfile

    file = Path(path)
    if file.is_dir():
        return "a directory; give a checkpoint file in it (transformer.pt or gru.pt)"
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            data = f.read(MAX_SNIFF_BYTES + 1)
    except OSError:
        return None
    if size == 0 or not data:
        return "the file is empty"
    if data.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(file) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            return (f"a truncated or damaged zip archive of {size:,} bytes, the start of a checkpoint without its "
                    "end: copied or written part-way? Copy it again from a finished training run")
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return None
        npz = names and all(n.endswith(".npy") for n in names)
        return "a zip archive " + ("of numpy arrays (an .npz dataset?)" if npz else "without torch's data.pkl")
    if data[:1] == b"\x80":  # a pickle (torch's legacy format): torch's reason
        return None
    if b"\x00" not in data[:4096]:
        try:
            doc = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            pass
        except ValueError:
            return "a text file; train writes binary .pt files"
        else:
            if isinstance(doc, dict) and {"coef", "ridge"} <= doc.keys():
                return ("a JSON file: the AR baseline's coefficients (ar.json), which need no export; eval reads "
                        "them from --baselines. Export takes transformer.pt or gru.pt")
            return "a JSON file; train writes binary .pt files"
    if _is_onnx(data):
        return "an ONNX model, what export writes: it is exported already"
    return None


def _is_onnx(data: bytes) -> bool:
    """Whether ``data`` parses as an ONNX model with a graph (protobuf parses much garbage: a graph is asked)."""
    try:
        import onnx

        proto = onnx.ModelProto()
        proto.ParseFromString(data)
    except Exception:  # untrusted bytes: protobuf's DecodeError (a module without type stubs), onnx missing, ...
        return False
    return proto.ir_version > 0 and len(proto.graph.node) > 0


def fit_ar(train: Points, path: str | Path | None = None, data_files: list[dict[str, str]] | None = None,
           data_runs: list[dict] | None = None, log: Callable[[str], None] | None = None) -> LinearAR:
    """The AR baseline fitted on ``train``, written to ``path`` (``ar.json``) as every output is written.

    ``data_files`` and ``data_runs`` are recorded next to the coefficients, as the networks' checkpoints record
    them in ``train_config``: without them ``eval`` could not warn when given the AR's own training data.
    ``log`` gets a line per step of the fit (minutes on a full training set, silent before)."""
    from tokenwire.daemon.cli import save_bytes

    t0 = time.monotonic()

    def progress(step: str) -> None:
        if log is not None:
            log(f"  ar: {step} ({len(train)} points, {time.monotonic() - t0:.0f} s)")

    ar = LinearAR().fit(train.x, train.base, train.target, progress)
    if path is not None:
        doc = ar.to_dict()
        if data_files is not None:
            doc["data_files"] = data_files
        if data_runs is not None:
            doc["data_runs"] = data_runs
        save_bytes(path, (json.dumps(doc) + "\n").encode())
    return ar
