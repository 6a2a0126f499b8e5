"""One way to open a shipped ONNX model: onnxruntime on the CPU with one thread, typed errors for bad files.

Both forecasters the daemon runs (SwiftQueue latency, KV bandwidth) sit on the packet or chunk path of a
process that serves many connections, so a model must not spread over cores, and a missing or corrupt file
must surface as :class:`ModelError` (callers fall back to a baseline) rather than as onnxruntime's own
untyped exceptions. Imports onnxruntime only, never torch.
"""

from __future__ import annotations

import io
import os
import stat
import zipfile
from pathlib import Path
from typing import Any

from tokenwire.transport.errors import TokenwireError


class ModelError(TokenwireError):
    """A model file is missing, corrupt, or was built for other features/inputs."""


MAX_MODEL_BYTES = 64 << 20
"""The largest model file read: the shipped ones are 20-110 KB (a forecaster small enough for one CPU thread on
the packet path), so 64 MiB leaves room for any model meant for that and bounds a mistake (``/dev/zero`` was
read until the memory ran out)."""


def read_model(file: Path) -> bytes:
    """The model's bytes; :class:`ModelError` when the file is missing, unreadable, not a regular file (a device,
    a FIFO, a folder) or larger than :data:`MAX_MODEL_BYTES`."""
    try:
        # non-blocking: opening a FIFO for reading waited for a writer; a regular file reads the same either way
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ModelError(f"{file}: no such model file") from None
    except OSError as exc:
        raise ModelError(f"{file}: cannot read model ({exc.strerror})") from None
    try:
        st = os.fstat(fd)  # of what was opened: a check by name first could be of another file
        if not stat.S_ISREG(st.st_mode):
            raise ModelError(f"{file}: not a regular file (a model is one)")
        if st.st_size > MAX_MODEL_BYTES:
            raise ModelError(f"{file}: {st.st_size:,} bytes, larger than a model can be "
                             f"({MAX_MODEL_BYTES >> 20} MiB at most)")
        with open(fd, "rb", closefd=False) as f:
            data = f.read(MAX_MODEL_BYTES + 1)  # bounded: the file may grow after the fstat
    except OSError as exc:
        raise ModelError(f"{file}: cannot read model ({exc.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_MODEL_BYTES:
        raise ModelError(f"{file}: larger than a model can be ({MAX_MODEL_BYTES >> 20} MiB at most)")
    return data


def open_session(data: bytes, label: str) -> Any:
    """An onnxruntime session for ``data`` (CPU, one intra-op and one inter-op thread, sequential)."""
    # onnxruntime's Linux wheels (1.29 on) keep a device id and an event cache for Microsoft's usage telemetry in
    # $HOME/.cache/Microsoft unless this is set: only the systemd unit set it, so every `tokenwire` run elsewhere
    # (the daemon by hand, bench, eval, the testbed) left them. Off unless the user chose otherwise.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime as ort  # type: ignore[import-untyped]  # no stubs, no py.typed

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 4  # FATAL only: the errors it would print come back in its exceptions, which we report
    try:
        return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped exceptions for bad files
        what = other_file(data, label)
        if what is not None:
            raise ModelError(f"{label}: {what}") from None
        raise ModelError(f"{label}: not a usable ONNX model ({type(exc).__name__}: {str(exc)[:200]})") from None


def _torch_format(data: bytes) -> str | None:
    """What ``data`` is when it is in one of torch.save's formats, else None."""
    if data[:1] == b"\x80":  # pickle protocol 2+; an ONNX file starts with a protobuf tag (0x08: ir_version)
        return "a Python pickle (a torch checkpoint of the legacy format?)"
    if not data.startswith(b"PK\x03\x04"):
        return None
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "a torch checkpoint, what `tokenwire predictor train` writes"
    return None


def other_file(data: bytes, label: str) -> str | None:
    """What a file that onnxruntime refused is, when it is one the predictor's other steps write, and what to
    give instead; None for anything else (onnxruntime's reason stands).

    A checkpoint, a dataset or a JSON result given as a model read "INVALID_PROTOBUF : Failed to load model
    because protobuf parsing failed", which says neither what the file is nor what to do. ``export`` tells the
    same files apart for ``--checkpoint`` (:func:`~.train.what_file`, whose first clause is reused here; its
    advice is about checkpoints)."""
    torch_file = _torch_format(data)
    if torch_file is not None:
        return (f"not a usable ONNX model: {torch_file}; run `tokenwire predictor export --checkpoint {label} --out "
                "MODEL.onnx` first and give the .onnx it writes")
    export = "`tokenwire predictor export` writes"
    if not _holds(label, data):  # what_file reads a path: only where the label names the file of these bytes
        return None
    from .train import what_file  # numpy only, not torch: a daemon's base install has it

    what = what_file(label)
    if what is None or what.startswith(("an ONNX model", "a directory")):
        return None  # an ONNX file onnxruntime cannot run (its reason says why); a folder: read_model refuses it
    if what.startswith("a truncated or damaged zip archive"):  # a .pt copied part-way: its advice fits
        return f"not a usable ONNX model: {what}, then export it to ONNX"
    first = what.split("; ")[0]  # what it is; the rest is export's advice, about checkpoints
    if first == "the file is empty":
        first = "an empty file"
    return f"not a usable ONNX model: {first}; give the .onnx of a trained model (the shipped one, or one {export})"


def _holds(path: str, data: bytes) -> bool:
    """Whether the regular file at ``path`` holds ``data`` (callers label the bytes with the path they read
    them from, all but export's check, which reads a temporary file and names the output)."""
    try:
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            return f.read(len(data) + 1) == data
    except OSError:
        return False
