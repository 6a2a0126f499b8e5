"""One way to open a shipped ONNX model: onnxruntime on the CPU with one thread, typed errors for bad files.

Both forecasters the daemon runs (SwiftQueue latency, KV bandwidth) sit on the packet or chunk path of a
process that serves many connections, so a model must not spread over cores, and a missing or corrupt file
must surface as :class:`ModelError` (callers fall back to a baseline) rather than as onnxruntime's own
untyped exceptions. Imports onnxruntime only, never torch.
"""

from __future__ import annotations

import os
import stat
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
    import onnxruntime as ort  # type: ignore[import-untyped]  # no stubs, no py.typed

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 4  # FATAL only: the errors it would print come back in its exceptions, which we report
    try:
        return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped exceptions for bad files
        raise ModelError(f"{label}: not a usable ONNX model ({type(exc).__name__}: {str(exc)[:200]})") from None
