"""TLS material for QUIC: self-signed development certificates and aioquic configurations.

QUIC always encrypts, so even the demo, the simulator and the tests need a certificate. A fresh P-256 key
and a self-signed certificate cost a few milliseconds; production uses real files (``tokenwire cert``
makes a development pair on disk).
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .frames import ALPN


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
        """Write PEM files; the key is created readable by its owner only."""
        cert_path.write_bytes(self.cert_pem)
        key_path.touch(mode=0o600, exist_ok=True)
        key_path.chmod(0o600)
        key_path.write_bytes(self.key_pem)


def make_self_signed(hostnames: tuple[str, ...] = ("localhost",), days: int = 365) -> CertPair:
    """A self-signed certificate for ``hostnames`` (DNS names or IP addresses), P-256."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
    sans: list[x509.GeneralName] = []
    for h in hostnames:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return CertPair(cert, key)


_dev_pair: CertPair | None = None


def dev_cert() -> CertPair:
    """One process-wide self-signed pair for localhost/127.0.0.1/::1 (demo, simulator, tests)."""
    global _dev_pair
    if _dev_pair is None:
        _dev_pair = make_self_signed(("localhost", "127.0.0.1", "::1"))
    return _dev_pair


def _common(config: QuicConfiguration, idle_timeout: float, congestion: str, initial_rtt: float | None) -> None:
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
    config = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
    _common(config, idle_timeout, congestion, initial_rtt)
    if certfile is not None:
        config.load_cert_chain(str(certfile), str(keyfile) if keyfile else None)
    else:
        pair = cert or dev_cert()
        config.certificate = pair.certificate
        config.private_key = pair.private_key
    return config


def client_configuration(
    *,
    server_name: str | None = None,
    cafile: str | Path | None = None,
    cadata: bytes | None = None,
    verify: bool = True,
    idle_timeout: float = 60.0,
    congestion: str = "reno",
    initial_rtt: float | None = None,
) -> QuicConfiguration:
    config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name=server_name)
    _common(config, idle_timeout, congestion, initial_rtt)
    if not verify:
        config.verify_mode = ssl.CERT_NONE
    if cafile is not None:
        config.load_verify_locations(cafile=str(cafile))
    if cadata is not None:
        config.load_verify_locations(cadata=cadata)
    return config
