"""The certificate files the daemon serves and checks: the chat listeners' QUIC configuration (the configured
certificate, else an ephemeral self-signed one), the warning for a server certificate near its end, the client CA
bundle's verifier and the principal a client certificate gets, and SIGHUP's take-up of those files renewed in place.

Split out of ``service.py`` (which re-exports every name that was imported from there): these are plain functions
of a configuration and file contents, with no state of the daemon's; :class:`~tokenwire.daemon.service.Daemon`
keeps the running verifier, its digest and the listeners' configuration, and swaps in what these return. The
in-place reload of a single file is ``tls_reload.py``'s; this module decides what a reload does with each file.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

from aioquic.quic.configuration import QuicConfiguration

from tokenwire.transport.tls import (
    CertificateFileError,
    ClientCertVerifier,
    certificate_summary,
    make_self_signed,
    server_configuration,
)

from .config import CERT_PRINCIPAL_PREFIX, MAX_PRINCIPAL_CHARS, Config, ServerConfig
from .startup import StartupError
from .tls_reload import reload_certificate, reload_client_ca

# the daemon's logger (not this module's name): operators and tests filter the daemon's lines by it
log = logging.getLogger("tokenwire.daemon")
CERT_WARN_DAYS = 14  # a server certificate this close to its end is logged as a warning at start and reload


def cert_principal(name: str) -> str:
    """The principal of a client certificate: ``cert:`` and its common name (its whole RFC 4514 subject when it
    has none). One too long for ingest's 128 characters, with unprintable characters or with a ``~`` keeps a
    printable prefix and ends with ``~`` and 16 hex digits of the name's SHA-256, so every certificate's answers
    can still be opened for it (a long subject's could not), and a name that spells out another's shortened
    form is hashed too: two names share a principal only by a 64-bit SHA-256 prefix collision."""
    principal = f"{CERT_PRINCIPAL_PREFIX}{name}"
    if len(principal) <= MAX_PRINCIPAL_CHARS and name.isprintable() and "~" not in name:
        return principal
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    shown = "".join(c if c.isprintable() else "?" for c in name)
    return f"cert:{shown[: MAX_PRINCIPAL_CHARS - len('cert:~') - len(digest)]}~{digest}"


def ending_soon(cert: Any, now: datetime.datetime | None = None) -> datetime.timedelta | None:
    """The time a server certificate has left when that calls for a warning (it has expired, or ends within
    CERT_WARN_DAYS), else None: the rule the daemon's log line and `config check`'s warning share."""
    if cert is None:
        return None
    left: datetime.timedelta = cert.not_valid_after_utc - (now or datetime.datetime.now(datetime.UTC))
    return None if left > datetime.timedelta(days=CERT_WARN_DAYS) else left


def warn_if_expiring(cert: Any, path: Any, now: datetime.datetime | None = None) -> bool:
    """Log a warning for a server certificate that has expired or ends within CERT_WARN_DAYS (only `config check`
    said so: the daemon started with an expired one silently, and every client's handshake failed)."""
    now = now or datetime.datetime.now(datetime.UTC)
    left = ending_soon(cert, now)
    if left is None:
        return False
    soon = "" if left.total_seconds() <= 0 else f", in {left.days} days" if left.days else ", within a day"
    log.warning("server.certificate %s: %s%s; clients refuse an expired certificate (renew it, then SIGHUP)", path,
                certificate_summary(cert, now), soon)
    return True


def client_verifier(config: Config) -> tuple[ClientCertVerifier | None, bytes | None]:
    """The verifier of ``server.client_ca`` and the digest of the bytes it was built from ((None, None) without
    one); :class:`StartupError` if it cannot load."""
    if not config.server.client_ca:
        return None, None
    try:
        fresh = reload_client_ca(config.server.client_ca, None)
    except OSError as exc:
        raise StartupError(f"server.client_ca: CA file {config.server.client_ca}: {exc.strerror or exc}") from None
    except CertificateFileError as exc:
        raise StartupError(f"server.client_ca: {exc}") from None
    assert fresh is not None  # (no digest seen before)
    return fresh


def server_tls(cfg: Config) -> tuple[QuicConfiguration, dict[str, Any]]:
    """The chat listeners' QUIC configuration and the KV endpoint's TLS arguments (the same certificate): the
    configured pair, else an ephemeral self-signed one; :class:`StartupError` if the configured pair cannot be
    used (unreadable, not PEM, or a key that does not match), and a warning for one near its end."""
    if cfg.server.certificate is None:
        log.warning("no server.certificate configured: using an ephemeral self-signed certificate")
        pair = make_self_signed(("localhost", *{h for h, _ in cfg.server.listen if h not in ("::", "0.0.0.0")}))
        tls_kwargs: dict[str, Any] = {"cert": pair}
        quic_config = server_configuration(
            cert=pair, congestion=cfg.server.congestion, idle_timeout=cfg.server.idle_timeout_s
        )
    else:
        tls_kwargs = {"certfile": cfg.server.certificate, "keyfile": cfg.server.private_key}
        try:
            quic_config = server_configuration(
                certfile=cfg.server.certificate,
                keyfile=cfg.server.private_key,
                congestion=cfg.server.congestion,
                idle_timeout=cfg.server.idle_timeout_s,
            )
        except (OSError, ValueError) as exc:  # unreadable, not PEM, or a key that does not match
            raise StartupError(f"server.certificate / server.private_key: {exc}") from None
        warn_if_expiring(quic_config.certificate, cfg.server.certificate)
    return quic_config, tls_kwargs


class TlsReload(NamedTuple):
    """What a reload took up of the TLS files: ``ok`` is False when one of them was refused (the running one
    kept); ``client_ca`` is the new verifier and the digest of its bytes when the CA bundle changed, else None."""

    ok: bool
    client_ca: tuple[ClientCertVerifier, bytes] | None


def reload_tls(server: ServerConfig, configs: Sequence[QuicConfiguration], client_ca_digest: bytes | None) -> TlsReload:
    """Take up a certificate or client CA bundle changed in place (at the running paths: changed paths need
    a restart). One that cannot be used is logged and the running one kept; ``ok`` is False then. ``configs``: the
    QUIC configurations serving ``server.certificate`` (the chat listeners', the KV endpoint's; none before the
    listeners are open), updated in place; ``client_ca_digest``: the digest of the CA bundle in use."""
    ok = True
    fresh: tuple[ClientCertVerifier, bytes] | None = None
    if server.certificate is not None and configs:
        try:
            cert = reload_certificate(configs, server.certificate, server.private_key)
        except (OSError, ValueError) as exc:
            log.error("reload: server.certificate / server.private_key: %s; still serving the running "
                      "certificate", exc)
            ok = False
        else:
            if cert is not None:
                log.info("reload: serving the new certificate in %s (%s) to new connections",
                         server.certificate, certificate_summary(cert))
                warn_if_expiring(cert, server.certificate)
    if server.client_ca:
        try:
            fresh = reload_client_ca(server.client_ca, client_ca_digest)
        except (OSError, ValueError) as exc:
            log.error("reload: server.client_ca: %s; still using the CA bundle read before", exc)
            ok = False
        else:
            if fresh is not None:
                log.info("reload: client certificates are checked against the new %s", server.client_ca)
    return TlsReload(ok, fresh)
