"""A development certificate authority and its certificates (``ledgerctl certs``,
``make certs``), made with ``cryptography``.

Every identity is a URI SAN ``spiffe://redledger/<role>/<name>`` (the principal the
authorization policy matches, ``ledger.security.authz``): ``node`` (ledger nodes: server and
client certificates, for their ports and their calls to each other), ``service`` (internal
clients: payments, the envelope front end), ``operator`` (people and tools with operator
rights), ``etcd`` (the etcd members' server certificates: they may call nothing). Node and
etcd certificates also name ``localhost`` and 127.0.0.1-127.0.0.3 (the loopback regions) so
that clients can check the host they dialed.

A certificate's subject CN is its role alone: etcd's client-certificate authentication takes
the CN as the etcd user, so etcd's RBAC gives the users ``node`` and ``operator`` the shard
map and no other role anything (``ledger.security.etcd_auth``).

For development and tests only: the CA key sits next to the certificates, unencrypted.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "redledger"
ROLES = ("node", "service", "operator", "etcd")
# Roles whose certificates also serve (server authentication, loopback host names).
SERVING_ROLES = ("node", "etcd")
# How long development certificates live (days).
DEV_CERT_DAYS = 365
LOOPBACK_HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


def principal(role: str, name: str) -> str:
    """The identity a certificate carries, and the policy matches."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    return f"spiffe://{TRUST_DOMAIN}/{role}/{name}"


def describe(pem: bytes) -> tuple[str | None, str, str]:
    """A certificate's principal (its ``spiffe://`` URI SAN, or None), its SHA-256
    fingerprint (hex) and the end of its validity (ISO 8601): what the audit trail records
    of a node's certificate (``ledger.node``)."""
    cert = x509.load_pem_x509_certificate(pem)
    who = None
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        who = next((u for u in sans.get_values_for_type(x509.UniformResourceIdentifier)
                    if u.startswith("spiffe://")), None)
    except x509.ExtensionNotFound:
        pass
    return (who, cert.fingerprint(hashes.SHA256()).hex(),
            cert.not_valid_after_utc.isoformat())


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(directory: Path, name: str = "redledger dev CA",
            days: int = DEV_CERT_DAYS) -> Issued:
    """A self-signed CA: ``ca.pem`` and ``ca.key`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    issued = Issued(directory / "ca.pem", directory / "ca.key")
    _write(issued.cert, cert.public_bytes(serialization.Encoding.PEM))
    _write(issued.key, _pem_key(key), private=True)
    return issued


def issue(ca: Issued, directory: Path, role: str, name: str, days: int = DEV_CERT_DAYS,
          not_before: datetime.datetime | None = None, uri: str | None = None) -> Issued:
    """A certificate for ``principal(role, name)`` (or the URI SAN ``uri``) signed by
    ``ca``: ``<role>-<name>.pem`` and ``.key`` in ``directory``. ``days`` may be negative (an
    expired certificate, for tests)."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    key = _key()
    start = not_before or (datetime.datetime.now(datetime.timezone.utc)
                           - datetime.timedelta(minutes=5))
    end = start + datetime.timedelta(days=days) if days > 0 else start + datetime.timedelta(
        seconds=1)
    if days < 0:
        start, end = start + datetime.timedelta(days=days), start + datetime.timedelta(
            days=days // 2)
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(uri or principal(role, name))]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role in SERVING_ROLES:
        names += [x509.DNSName("localhost")]
        names += [x509.IPAddress(ipaddress.ip_address(h)) for h in LOOPBACK_HOSTS]
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, role)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    directory.mkdir(parents=True, exist_ok=True)
    issued = Issued(directory / f"{role}-{name}.pem", directory / f"{role}-{name}.key")
    _write(issued.cert, cert.public_bytes(serialization.Encoding.PEM))
    _write(issued.key, _pem_key(key), private=True)
    return issued


def make_dev_pki(directory: Path, nodes: tuple[str, ...] = ("n1", "n2", "n3"),
                 services: tuple[str, ...] = ("payments", "envelopes", "bench", "chaos"),
                 operators: tuple[str, ...] = ("ops",),
                 etcd: tuple[str, ...] = ("server",)) -> dict[str, Issued]:
    """A CA and a certificate per identity; returns them by ``role/name``."""
    ca = make_ca(directory)
    out = {"ca": ca}
    for role, names in (("node", nodes), ("service", services), ("operator", operators),
                        ("etcd", etcd)):
        for name in names:
            out[f"{role}/{name}"] = issue(ca, directory, role, name)
    return out
