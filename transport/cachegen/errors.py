"""Typed errors of the KV codec.

Decoders of untrusted bytes raise only these (never IndexError, struct.error, a numba crash or a hang), so
the KV channel can map any bad chunk to "fetch it again or fall back to text" without guessing.
"""

from __future__ import annotations


class KVCodecError(Exception):
    """Base class of every error the KV codec raises on bad input."""


class TruncatedBitstream(KVCodecError):
    """Fewer bytes than the header (or the magic) promises."""


class CorruptBitstream(KVCodecError):
    """CRC mismatch, an out-of-range field, or a payload that does not decode exactly."""


class UnsupportedVersion(KVCodecError):
    """Magic matches but the format version or codec id is one this build does not know."""


class ModelMismatch(KVCodecError):
    """The chunk was encoded for a different model (fingerprint or KV geometry differ)."""


class InvalidInput(KVCodecError, ValueError):
    """The encoder was given something it cannot encode (non-finite values, wrong shapes, bad level), or a
    decoder a device this process cannot use."""
