"""SIGHUP's TLS part: a certificate renewed in place (certbot's deploy hook, `tokenwire cert --force`) or a
client CA bundle edited in place is taken up without a restart.

A reload used to reread only the TOML file, so the daemon kept handing out the old certificate until it
expired, silently. aioquic reads a server's certificate and key from its ``QuicConfiguration`` when each
connection starts its handshake (``QuicConnection._initialize``), so replacing them in the configuration the
listeners share serves the new pair to every new connection; established ones keep theirs. Changed *paths*
are still a ``[server]`` change that needs a restart (``config.restart_changes``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509

from tokenwire.transport.tls import ClientCertVerifier, server_configuration


def reload_certificate(configs: Sequence[QuicConfiguration], certfile: str | Path,
                       keyfile: str | Path | None) -> x509.Certificate | None:
    """Load the pair at ``certfile``/``keyfile`` (checked as at start: readable PEM, a key that belongs to the
    certificate) into every one of ``configs``. Returns the new certificate, or None when the files hold the
    certificate and chain already served. Raises ``ValueError`` (or ``OSError``) and changes nothing when the
    pair cannot be used: the running one stays."""
    fresh = server_configuration(certfile=certfile, keyfile=keyfile)
    if all(c.certificate == fresh.certificate and c.certificate_chain == fresh.certificate_chain for c in configs):
        return None
    for c in configs:
        c.certificate, c.certificate_chain, c.private_key = (
            fresh.certificate, fresh.certificate_chain, fresh.private_key)
    return fresh.certificate


def reload_client_ca(path: str | Path, seen: bytes | None) -> tuple[ClientCertVerifier, bytes] | None:
    """A new verifier for the CA bundle at ``path`` and the SHA-256 of the bytes it was built from, or None when
    they are still ``seen``; one read for both (a bundle changed between two reads kept the wrong verifier for
    a digest that then matched). Raises ``OSError`` or ``CertificateFileError`` (a ``ValueError``) for a
    bundle that cannot be used."""
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).digest()
    if digest == seen:
        return None
    return ClientCertVerifier(path, data), digest
