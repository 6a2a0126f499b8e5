"""TLS material for QUIC: self-signed development certificates and aioquic configurations.

QUIC always encrypts, so even the demo, the simulator and the tests need a certificate. A fresh P-256 key
and a self-signed certificate cost a few milliseconds; production uses real files (``tokenwire cert``
makes a development pair on disk).
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import math
import os
import re
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path

from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from . import prague_cc  # noqa: F401  (registers the "prague" congestion controller with aioquic)
from .file_modes import keep_mode
from .frames import ALPN, CHAT_ALPNS


@dataclass(frozen=True)
class CertPair:
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write PEM files: both to temporary files first, then renamed, so a failure leaves the old pair whole
        (it left a new certificate beside the old key, which the daemon then refused to start with). A new key
        is readable by its owner only; a file replaced keeps its mode, owner and group (a key never becomes
        world-readable), so a renewal in place keeps what the admin set for the service (the README's
        ``chgrp tokenwire`` + ``chmod 640``: a renewed 0600 root key had stopped the service at its restart)."""
        # symlinks are written through, as before (a link to where the daemon reads them stayed a link)
        cert_path, key_path = Path(os.path.realpath(cert_path)), Path(os.path.realpath(key_path))
        made: list[Path] = []  # the temporary files: the key's, then the certificate's
        try:
            for path, data, mode in ((key_path, self.key_pem, 0o600), (cert_path, self.cert_pem, 0o644)):
                made.append(_write_temp(path, data, mode, private=path == key_path))
            old_key = key_path.read_bytes() if key_path.exists() else None  # (small: kept to undo with)
            if old_key is not None:  # the undo copy, ready before anything moves
                made.append(_write_temp(key_path, old_key, 0o600, private=True, suffix=".old"))
            _replace(made[0], key_path)
            try:
                _replace(made[1], cert_path)
            except OSError:
                if old_key is None:
                    key_path.unlink(missing_ok=True)
                else:
                    os.replace(made[2], key_path)
                raise
        finally:
            for tmp in made:
                tmp.unlink(missing_ok=True)


def _replace(tmp: Path, path: Path) -> None:
    """``os.replace(tmp, path)``, its error naming ``path``: the temporary file's random name (``cx/.cert.pem.
    b9626f4719c807b7.tmp: Is a directory``) was what ``tokenwire cert`` reported of a ``cert.pem`` folder."""
    try:
        os.replace(tmp, path)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None


TEMP_TRIES = 100  # names tried before giving up (as tempfile.mkstemp): each one taken means another writer


def _write_temp(path: Path, data: bytes, mode: int, *, private: bool, suffix: str = "") -> Path:
    """``data`` in a new file next to ``path``, to be renamed over it: created with ``mode`` (less the umask),
    then given ``path``'s mode, owner and group (:func:`keep_mode`; ``private``: a key) before ``data`` is in it.

    The name is random and the file new (``O_EXCL``, no link followed): the name was ``.key.pem.<pid>.tmp``,
    opened with ``O_TRUNC``, so a user who may write the folder made it beforehand (mode 0666, or a link to a
    file of root's) and read the key written into it. Its mode and owner are set through the descriptor, so
    the name cannot be swapped for another file in between."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(TEMP_TRIES):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}{suffix}.tmp")
        try:
            fd = os.open(tmp, flags, mode)
        except FileExistsError:
            continue
        break
    else:
        raise FileExistsError(errno.EEXIST, f"no free temporary name after {TEMP_TRIES} tries", str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            keep_mode(path, fh.fileno(), private=private)
            fh.write(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    """Subject, issuer, key, a random serial and a validity window starting five minutes ago (clock skew)."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _subject_name(host: str) -> x509.GeneralName:
    """An IP address or a DNS name (ASCII labels, an optional leading ``*.``) as a certificate SAN.

    Checked here because anything else makes a certificate that no TLS server name can ever match.
    """
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.removeprefix("*.").rstrip(".").split(".")
    if len(host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        hint = " (write non-ASCII names in their IDNA xn-- form)" if not host.isascii() else ""
        raise ValueError(f"{host!r} is neither an IP address nor a DNS name{hint}")
    return x509.DNSName(host)


def make_self_signed(hostnames: tuple[str, ...] = ("localhost",), days: int = 365) -> CertPair:
    """A self-signed certificate for ``hostnames`` (DNS names or IP addresses), P-256."""
    if days < 1:
        raise ValueError(f"a certificate must be valid for at least 1 day, not {days}")
    if not hostnames:
        raise ValueError("a certificate needs at least one host name")
    sans: list[x509.GeneralName] = [_subject_name(h) for h in hostnames]
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
    cert = (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return CertPair(cert, key)


_dev_pair: CertPair | None = None
_sim_pair: CertPair | None = None


def sim_cert() -> CertPair:
    """A self-signed pair for ``localhost`` whose handshake has the same bytes' length in every process: an
    Ed25519 key (deterministic, 64-byte signatures) and serial 1. The simulator's runs of one seed differed
    by microseconds between processes with the P-256 pair, whose ECDSA signatures vary in length."""
    global _sim_pair
    if _sim_pair is None:
        key = ed25519.Ed25519PrivateKey.generate()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(1)  # a random one is 19 or 20 bytes long
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, None)
        )
        _sim_pair = CertPair(cert, key)  # type: ignore[arg-type]
    return _sim_pair


def dev_cert() -> CertPair:
    """One process-wide self-signed pair for localhost/127.0.0.1/::1 (demo, simulator, tests)."""
    global _dev_pair
    if _dev_pair is None:
        _dev_pair = make_self_signed(("localhost", "127.0.0.1", "::1"))
    return _dev_pair


def check_seconds(name: str, value: float, *, finite: bool = True) -> None:
    """ValueError naming ``name`` unless ``value`` is a positive number of seconds (finite unless allowed).

    Checked up front: aioquic took a negative idle timeout and failed later with a KeyError from inside the
    connection, and a nan timeout waited for nothing ("within nan s")."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0  # (nan > 0 is False)
    if not ok or (finite and not math.isfinite(value)):
        kind = "a positive finite" if finite else "a positive"
        raise ValueError(f"{name} must be {kind} number of seconds, not {value!r}")


def _check_key_without_cert(certfile: str | Path | None, keyfile: str | Path | None) -> None:
    """A key file alone was ignored (the dev certificate, or no client certificate, was used instead)."""
    if keyfile is not None and certfile is None:
        raise ValueError(f"keyfile needs certfile (keyfile={str(keyfile)!r} was given without certfile)")


# What a token server lets a client send ahead of what it has read (QUIC flow control): a request stream carries one
# REQUEST (at most limits.max_request_bytes, itself at most 1 MiB, plus its 4-byte length) and a few small frames,
# so 2 MiB per stream and 8 MiB per connection never hold an honest client up. Credit moves with what the server
# has read (see ``read_credit.ReadCredit``): aioquic's own rule doubled it whenever the highest offset received
# passed half of it, and a client that withheld a stream's first byte grew the server by 200 MB in 14 s. The
# client keeps aioquic's growing windows: an answer (a long one resumed on the stream) must never wait for credit.
REQUEST_STREAM_WINDOW = 2 << 20
REQUEST_CONNECTION_WINDOW = 8 << 20


def _common(config: QuicConfiguration, idle_timeout: float, congestion: str, initial_rtt: float | None) -> None:
    check_seconds("idle_timeout", idle_timeout)
    config.max_datagram_frame_size = 65535  # RFC 9221: any datagram that fits a packet
    config.idle_timeout = idle_timeout
    config.congestion_control_algorithm = congestion
    if initial_rtt is not None:
        config.initial_rtt = initial_rtt


def server_configuration(
    *,
    cert: CertPair | None = None,
    certfile: str | Path | None = None,
    keyfile: str | Path | None = None,
    idle_timeout: float = 60.0,
    congestion: str = "reno",
    initial_rtt: float | None = None,
) -> QuicConfiguration:
    _check_key_without_cert(certfile, keyfile)
    # tokenwire/1+gt first (frames.ALPN_GEN_TIMES): a client offering it gets its generation times after FINISHED
    config = QuicConfiguration(is_client=False, alpn_protocols=list(CHAT_ALPNS))
    _common(config, idle_timeout, congestion, initial_rtt)
    config.max_stream_data = REQUEST_STREAM_WINDOW  # (the KV channel sets its own)
    config.max_data = REQUEST_CONNECTION_WINDOW
    if certfile is not None:
        _load_cert_chain(config, certfile, keyfile)
    else:
        pair = cert or dev_cert()
        config.certificate = pair.certificate
        config.private_key = pair.private_key
    return config


def certificate_summary(cert: x509.Certificate, now: datetime.datetime | None = None) -> str:
    """Its names and expiry, for ``config check``: 'localhost, 127.0.0.1; expires 2027-12-04' (or EXPIRED)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(v) for v in sans.get_values_for_type(x509.DNSName)]
        names += [str(v) for v in sans.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]  # type: ignore[misc]
    now = now or datetime.datetime.now(datetime.UTC)
    end = cert.not_valid_after_utc
    when = f"EXPIRED {end:%Y-%m-%d}" if end <= now else f"expires {end:%Y-%m-%d}"
    return f"{', '.join(names) or 'no names'}; {when}"


def _load_cert_chain(config: QuicConfiguration, certfile: str | Path, keyfile: str | Path | None) -> None:
    """This end's certificate and key, checked to belong together (server, or a client's own certificate)."""
    try:
        config.load_cert_chain(str(certfile), str(keyfile) if keyfile else None)
    except ValueError as exc:  # cryptography's message names neither file
        files = f"{certfile} / {keyfile}" if keyfile else str(certfile)
        raise ValueError(f"{files}: not a PEM certificate and private key ({str(exc).split('.')[0]})") from None
    except IndexError:  # aioquic indexes the certificates it found: none (an empty file, a key alone)
        raise ValueError(f"{certfile}: no certificate in it") from None
    except OSError as exc:
        raise ValueError(f"{exc.filename or certfile}: cannot read ({exc.strerror or exc})") from None
    except TypeError as exc:  # cryptography's way of saying the key needs a password: callers catch ValueError
        if "encrypted" in str(exc):
            raise ValueError(f"{keyfile or certfile}: the private key is encrypted (passphrase-protected); tokenwire "
                             "needs an unencrypted key (`openssl pkey -in KEY -out NEW` writes one)") from None
        raise ValueError(f"{keyfile or certfile}: cannot load the private key ({exc})") from None
    except UnsupportedAlgorithm as exc:  # a key or certificate algorithm this cryptography/OpenSSL lacks
        files = f"{certfile} / {keyfile}" if keyfile else str(certfile)
        raise ValueError(f"{files}: unsupported algorithm ({exc})") from None
    _check_key_matches(config, certfile, keyfile)


def _check_key_matches(config: QuicConfiguration, certfile: str | Path, keyfile: str | Path | None) -> None:
    """ValueError when the private key does not belong to the certificate, or is of a type TLS 1.3 cannot sign
    with here.

    aioquic loads both without comparing them or asking whether it can sign with the key; the server then
    starts, and every client's handshake fails, far from the cause.
    """
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    cert, key = config.certificate, config.private_key
    if cert is None:
        raise ValueError(f"{certfile}: no certificate found")
    if key is None:
        raise ValueError(f"{certfile}: holds no private key, and no key file was given")
    if cert.public_key().public_bytes(*raw) != key.public_key().public_bytes(*raw):
        raise ValueError(f"the private key in {keyfile or certfile} does not belong to the certificate in {certfile}")
    if not _tls13_can_sign(key):  # a DSA pair loaded and the daemon started; every handshake then failed
        raise ValueError(f"{keyfile or certfile}: a key of type {_key_kind(key)}, which aioquic cannot sign TLS 1.3 "
                         "handshakes with (use RSA, EC P-256 or P-384, Ed25519 or Ed448)")


def _tls13_can_sign(key: object) -> bool:
    """Whether aioquic (1.7.2, ``Context._signature_algorithms_for_private_key``) has a TLS 1.3 signature
    algorithm for ``key``: RSA (PSS), ECDSA on P-256 or P-384 (not P-521), Ed25519, Ed448."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1)
    return isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)


def _key_kind(key: object) -> str:
    """'DSA', 'EC secp521r1', ... for messages."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"EC {key.curve.name}"
    if isinstance(key, dsa.DSAPrivateKey):
        return "DSA"
    return type(key).__name__.removesuffix("PrivateKey")


class CertificateFileError(ValueError):
    """A CA file or CA data the caller named holds no usable certificate (the message says which and why)."""


def _trusted_pem(cafile: str | Path | None, cadata: bytes | str | None) -> bytes | None:
    """The CAs to trust as one PEM blob, read and parsed now (``cadata`` PEM text as bytes or, as ``ssl``
    takes it, as a str).

    aioquic reads them only when the server's certificate arrives: a missing or junk file was then a
    traceback in the event loop and a misleading handshake timeout. And it keeps one of ``cafile`` and
    ``cadata`` (each ``load_verify_locations`` call replaces both), so passing both trusted only one.
    """
    parts: list[tuple[str, bytes]] = []
    if cafile is not None:
        try:
            parts.append((f"CA file {cafile}", Path(cafile).read_bytes()))
        except OSError as exc:
            raise CertificateFileError(f"CA file {cafile}: {exc.strerror or exc}") from None
    if isinstance(cadata, str):  # a str reached aioquic and raised a bare TypeError from deep inside
        try:
            cadata = cadata.encode("ascii")
        except UnicodeEncodeError:
            raise CertificateFileError("cadata: a str must be PEM text (ASCII)") from None
    if cadata is not None:
        parts.append(("cadata", cadata))
    for what, pem in parts:
        try:
            found = x509.load_pem_x509_certificates(pem)
        except ValueError:
            found = []
        if not found:
            raise CertificateFileError(f"{what}: no PEM certificate in it")
    return b"\n".join(pem.strip() + b"\n" for _, pem in parts) if parts else None


def client_configuration(
    *,
    server_name: str | None = None,
    cafile: str | Path | None = None,
    cadata: bytes | str | None = None,
    verify: bool = True,
    certfile: str | Path | None = None,
    keyfile: str | Path | None = None,
    idle_timeout: float = 60.0,
    congestion: str = "reno",
    initial_rtt: float | None = None,
) -> QuicConfiguration:
    _check_key_without_cert(certfile, keyfile)
    config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name=server_name)
    _common(config, idle_timeout, congestion, initial_rtt)
    if not verify:
        config.verify_mode = ssl.CERT_NONE
    trusted = _trusted_pem(cafile, cadata)
    if trusted is not None:
        config.load_verify_locations(cadata=trusted)
    if certfile is not None:  # a client certificate, for servers that require one
        # checked here: a file without its key made aioquic present no certificate at all, and a key of another
        # certificate failed the handshake with "no reason given"; either way the server's refusal misled
        try:
            _load_cert_chain(config, certfile, keyfile)
        except ValueError as exc:
            raise CertificateFileError(str(exc)) from None
    return config


def make_ca(name: str = "tokenwire client CA", days: int = 3650) -> CertPair:
    """A certificate authority for client certificates (``server.client_ca``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(subject, subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertPair(cert, key)


def make_client_cert(ca: CertPair, name: str, days: int = 365) -> CertPair:
    """A client certificate for ``name`` signed by ``ca`` (extended key usage: client authentication)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(subject, ca.certificate.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)  # RFC 5280 verifiers want one
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.private_key.public_key()), critical=False)
        .sign(ca.private_key, hashes.SHA256())
    )
    return CertPair(cert, key)


class ClientCertVerifier:
    """Verifies client certificate chains against a CA bundle (aioquic requests them but never checks)."""

    def __init__(self, ca_file: str | Path, data: bytes | None = None) -> None:
        """Raises :class:`CertificateFileError` for a missing, unreadable or non-PEM ``ca_file`` (``data``: its
        bytes, already read, as a reload that hashes them reads them once)."""
        from cryptography.x509.verification import PolicyBuilder, Store

        try:
            cas = x509.load_pem_x509_certificates(Path(ca_file).read_bytes() if data is None else data)
        except OSError as exc:
            raise CertificateFileError(f"CA file {ca_file}: {exc.strerror or exc}") from None
        except ValueError:
            raise CertificateFileError(f"CA file {ca_file}: no PEM certificate in it") from None
        self._verifier = PolicyBuilder().store(Store(cas)).build_client_verifier()

    def verify(self, leaf: x509.Certificate | None, chain: list[x509.Certificate]) -> str:
        """The verified subject's common name; raises ValueError when there is no valid certificate."""
        if leaf is None:
            raise ValueError("no client certificate presented")
        from cryptography.x509.verification import VerificationError

        try:
            self._verifier.verify(leaf, chain)
        except VerificationError as exc:
            raise ValueError(f"client certificate rejected: {exc}") from None
        names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else leaf.subject.rfc4514_string()


def request_client_certificate(quic: object) -> None:
    """Make a server-side aioquic connection ask for a client certificate (aioquic 1.7.2 internals).

    aioquic builds its TLS context lazily on the first datagram, so the request flag is set right after.
    """
    original = quic._initialize  # type: ignore[attr-defined]

    def initialize(peer_cid: bytes) -> None:
        original(peer_cid)
        quic.tls._request_client_certificate = True  # type: ignore[attr-defined]

    quic._initialize = initialize  # type: ignore[attr-defined]
