"""Mutual TLS for every port and every node-to-node call.

A node serves with ``server_credentials``: client certificates are required and checked
against the CA; the certificate files are read again when they change (``grpc``'s dynamic
server credentials ask before each handshake; we look at the files' modification times), so
a rotated certificate takes effect without a restart. Calls out (node to node, clients)
use ``channel_credentials``. The caller's identity is the URI SAN of its certificate
(``identity_of``), e.g. ``spiffe://redledger/service/payments``: with TLS on, idempotency keys
are scoped to it and the ``ledger-caller`` header is ignored.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc

log = logging.getLogger("ledger.security")

# The peer property gRPC's TLS puts every subject alternative name in.
_SAN_PROPERTY = "x509_subject_alternative_name"
_PRINCIPAL_SCHEME = "spiffe://"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA that signs every peer, and this process's certificate and key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_dir(cls, directory: str | Path, name: str) -> "TlsFiles":
        """``ca.pem`` and ``<name>.pem``/``<name>.key`` in ``directory`` (``ledgerctl
        certs``' layout; ``name`` like ``node-n1``)."""
        d = Path(directory)
        return cls(d / "ca.pem", d / f"{name}.pem", d / f"{name}.key")

    def read(self) -> tuple[bytes, bytes, bytes]:
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()

    def stamp(self) -> tuple[int, ...]:
        return tuple(os.stat(p).st_mtime_ns for p in (self.ca, self.cert, self.key))


def server_credentials(files: TlsFiles,
                       on_reload: Callable[[bytes], None] | None = None
                       ) -> grpc.ServerCredentials:
    """Server credentials that require a client certificate signed by the CA, and pick up
    new files (rotation) at the next handshake after they change. ``on_reload(cert_pem)`` is
    called after a reload, on a gRPC thread (not the event loop's)."""
    ca, cert, key = files.read()
    seen = [files.stamp()]

    def config(ca: bytes, cert: bytes, key: bytes) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        try:
            stamp = files.stamp()
            if stamp == seen[0]:
                return None
            fresh = config(*files.read())
        except OSError as exc:  # a rotation half done: keep the old ones, try again later
            log.warning("TLS files not reloaded: %s", exc)
            return None
        seen[0] = stamp
        log.info("TLS certificate files reloaded (%s)", files.cert)
        if on_reload is not None:
            try:
                on_reload(files.cert.read_bytes())
            except Exception:  # the reload stands; only its record failed (logged)
                log.exception("recording the TLS reload failed")
        return fresh

    return grpc.dynamic_ssl_server_credentials(config(ca, cert, key), fetch,
                                               require_client_authentication=True)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=cert)


def identity_of(context: grpc.aio.ServicerContext) -> str | None:
    """The caller's principal (its certificate's ``spiffe://`` URI SAN), or None when the
    call did not come over mutual TLS."""
    sans = (context.auth_context() or {}).get(_SAN_PROPERTY) or ()
    for san in sans:
        text = san.decode() if isinstance(san, bytes) else str(san)
        if text.startswith(_PRINCIPAL_SCHEME):
            return text
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
