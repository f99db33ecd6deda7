"""etcd's own access control for the shard map: mutual TLS, and RBAC by certificate role.

The shard map, the owners' leases and the failover records in etcd decide who writes each
shard's journal; a caller that can write them can move shards (``ledgerctl failover``) or
squat on leases. So etcd runs with client certificates required (``--client-cert-auth``,
the ledger's CA as ``--trusted-ca-file``) and with authentication on: etcd takes a client
certificate's subject CN as its user, and the ledger's certificates carry their role as CN
(``ledger.security.certs``). ``enable_rbac`` creates the role ``ledger`` (read and write
under the ledger's key prefix) for the users ``node`` and ``operator`` and turns
authentication on; ``service`` certificates (payment services, the envelope front end) and
any other CN get nothing from etcd. The ``root`` user gets a random password nobody keeps:
after this, etcd's access rules change only with a certificate whose CN is ``root``.
"""

from __future__ import annotations

import secrets
from typing import Any

import grpc

from ledger.security.tls import TlsFiles, channel_credentials

# The etcd users (certificate CNs, ``ledger.security.certs`` roles) that may use the map.
LEDGER_USERS = ("node", "operator")
LEDGER_ROLE = "ledger"


def prefix_end(prefix: bytes) -> bytes:
    """The end of the key range of ``prefix`` (etcd's range_end for a prefix)."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[:i + 1])
    return b"\x00"


def _ignore_exists(call: Any, request: Any) -> None:
    try:
        call(request)
    except grpc.RpcError as exc:
        if exc.code() is not grpc.StatusCode.FAILED_PRECONDITION or \
                "already exist" not in (exc.details() or ""):
            raise


def enable_rbac(endpoint: str, tls: TlsFiles, prefix: str = "/redledger") -> None:
    """Give ``LEDGER_USERS`` read/write under ``prefix`` and turn etcd authentication on.
    Idempotent before authentication is on (each step ignores "already exists").

    Raises:
        grpc.RpcError: etcd refused a step (e.g. authentication is on already and this
            certificate's CN is not ``root``).
    """
    from pyetcd import etcdrpc
    from pyetcd.etcdrpc import auth_pb2

    root = prefix.rstrip("/").encode() + b"/"
    with grpc.secure_channel(endpoint, channel_credentials(tls)) as channel:
        auth = etcdrpc.AuthStub(channel)
        _ignore_exists(auth.UserAdd, etcdrpc.AuthUserAddRequest(
            name="root", password=secrets.token_urlsafe(32)))
        _ignore_exists(auth.UserGrantRole, etcdrpc.AuthUserGrantRoleRequest(
            user="root", role="root"))
        _ignore_exists(auth.RoleAdd, etcdrpc.AuthRoleAddRequest(name=LEDGER_ROLE))
        auth.RoleGrantPermission(etcdrpc.AuthRoleGrantPermissionRequest(
            name=LEDGER_ROLE, perm=auth_pb2.Permission(
                permType=auth_pb2.Permission.READWRITE, key=root, range_end=prefix_end(root))))
        for user in LEDGER_USERS:
            _ignore_exists(auth.UserAdd, etcdrpc.AuthUserAddRequest(
                name=user, password=secrets.token_urlsafe(32)))
            _ignore_exists(auth.UserGrantRole, etcdrpc.AuthUserGrantRoleRequest(
                user=user, role=LEDGER_ROLE))
        auth.AuthEnable(etcdrpc.AuthEnableRequest())
