"""One way to open a shipped ONNX model: onnxruntime on the CPU with one thread, typed errors for bad files.

Both forecasters the daemon runs (SwiftQueue latency, KV bandwidth) sit on the packet or chunk path of a
process that serves many connections, so a model must not spread over cores, and a missing or corrupt file
must surface as :class:`ModelError` (callers fall back to a baseline) rather than as onnxruntime's own
untyped exceptions. Imports onnxruntime only, never torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenwire.transport.errors import TokenwireError


class ModelError(TokenwireError):
    """A model file is missing, corrupt, or was built for other features/inputs."""


def read_model(file: Path) -> bytes:
    """The model's bytes; :class:`ModelError` when the file is missing or unreadable."""
    try:
        return file.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{file}: no such model file") from None
    except OSError as exc:
        raise ModelError(f"{file}: cannot read model ({exc.strerror})") from None


def open_session(data: bytes, label: str) -> Any:
    """An onnxruntime session for ``data`` (CPU, one intra-op and one inter-op thread, sequential)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 4  # FATAL only: the errors it would print come back in its exceptions, which we report
    try:
        return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped exceptions for bad files
        raise ModelError(f"{label}: not a usable ONNX model ({type(exc).__name__}: {str(exc)[:200]})") from None
