"""The gateway's key and self-signed certificate, and its public-key pin.

Phones pin the SHA-256 of the SubjectPublicKeyInfo (as Apple's SimplePush does), so the
certificate can be renewed with the same key without touching a single phone.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALIDITY_DAYS = 5 * 365


def spki_pin(cert: x509.Certificate) -> str:
    """base64(SHA-256(DER SubjectPublicKeyInfo)), the value phones compare."""
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def pin_of_der(der: bytes) -> str:
    return spki_pin(x509.load_der_x509_certificate(der))


def load_public_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    """A P-256 public key from a PEM public key, or from an APNs .p8 private key itself."""
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError:
        key = serialization.load_pem_private_key(pem, password=None).public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("not a P-256 (ES256) key")
    return key


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _names() -> list[x509.GeneralName]:
    """Names app servers may use to reach the API: this host, localhost, lpgw.local."""
    host = socket.gethostname().split(".")[0] or "lpgw"
    dns = dict.fromkeys([host, f"{host}.local", "lpgw.local", "localhost"])
    ips = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    return [*(x509.DNSName(n) for n in dns), *(x509.IPAddress(ip) for ip in ips)]


def ensure_self_signed(cert_path: Path, key_path: Path, name: str,
                       now: datetime.datetime | None = None) -> bool:
    """Make a P-256 key and certificate when neither exists; True when it made them."""
    if cert_path.exists() and key_path.exists():
        return False
    if cert_path.exists() != key_path.exists():
        missing = key_path if cert_path.exists() else cert_path
        raise FileNotFoundError(f"{missing} is missing but its partner exists")
    key = ec.generate_private_key(ec.SECP256R1())
    write_self_signed(cert_path, key_path, key, name, now)
    return True


def write_self_signed(cert_path: Path, key_path: Path, key: ec.EllipticCurvePrivateKey,
                      name: str, now: datetime.datetime | None = None,
                      days: int = VALIDITY_DAYS) -> x509.Certificate:
    now = now or datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64] or "lpgw")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_names()), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert
