"""One etcd member on loopback: its command line and its health check."""

from __future__ import annotations

import json
from pathlib import Path

from clients.localcluster.constants import ETCD_HEALTH_TIMEOUT_S
from clients.localcluster.fetch import http_get, http_post


# Raft timing of a cluster of one member per region: etcd's defaults. A dead leader is
# replaced after one to two election timeouts, and every node's lease must outlast that
# (no keep-alive is answered meanwhile): tests/integration/test_etcd_regions.py measured a
# new leader 4.2 s after the leader's region was lost with 250 / 2,500 ms, and every other
# region's node then gave up its shards (lease 3 s); with 100 / 1,000 ms, see the README.
MEMBER_HEARTBEAT_MS = 100
MEMBER_ELECTION_MS = 1_000


def etcd_command(etcd: str, data_dir: Path, client_port: int, peer_port: int,
                 tls_dir: Path | None = None, *, name: str = "ledger", host: str = "127.0.0.1",
                 members: dict[str, str] | None = None, token: str = "") -> list[str]:
    """The command line of an etcd member ``name`` on ``host``: of a one-member cluster
    (``members`` None), or of the cluster of ``members`` (name -> host, every member on its
    own loopback address with the same ports: one per region).

    The data directory appears in the command line; that is how a later process tells the
    member's PID from a reused one. With ``tls_dir`` (``ledgerctl certs``' layout: ``ca.pem``,
    ``etcd-server.pem``/``.key``) clients must come over mutual TLS with a certificate of
    that CA (``ledger.security.etcd_auth``). A member restarted on its data directory rejoins
    (etcd ignores the initial-cluster flags then).
    """
    peer = f"http://{host}:{peer_port}"
    client = f"{'https' if tls_dir else 'http'}://{host}:{client_port}"
    tls = [] if tls_dir is None else [
        "--cert-file", str(tls_dir / "etcd-server.pem"),
        "--key-file", str(tls_dir / "etcd-server.key"),
        "--trusted-ca-file", str(tls_dir / "ca.pem"), "--client-cert-auth"]
    # --initial-cluster/--initial-advertise-peer-urls: the defaults name localhost:2380,
    # which does not match a non-default peer port, and etcd then refuses to start.
    initial = (f"{name}={peer}" if members is None else
               ",".join(f"{m}=http://{h}:{peer_port}" for m, h in members.items()))
    several = [] if members is None else [
        "--heartbeat-interval", str(MEMBER_HEARTBEAT_MS),
        "--election-timeout", str(MEMBER_ELECTION_MS),
        "--initial-cluster-token", token or "redledger"]
    return [etcd, "--name", name, "--data-dir", str(data_dir),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", initial, "--initial-cluster-state", "new", *several,
            "--logger", "zap", "--log-outputs", "stderr", *tls]


def etcd_leader(endpoint: str) -> tuple[int, int] | None:
    """(this member's id, the leader's id) from the member at ``endpoint`` (its v3 gRPC
    gateway), or None if it cannot tell (down, or no leader)."""
    try:
        body = json.loads(http_post(f"http://{endpoint}/v3/maintenance/status", b"{}",
                                    timeout_s=ETCD_HEALTH_TIMEOUT_S))
        member, leader = int(body["header"]["member_id"]), int(body.get("leader", 0))
    except (OSError, ValueError, KeyError):
        return None
    return (member, leader) if leader else None


def etcd_healthy(endpoint: str) -> bool:
    """Whether the member at ``endpoint`` (HOST:PORT) reports itself healthy on /health."""
    try:
        body = http_get(f"http://{endpoint}/health", timeout_s=ETCD_HEALTH_TIMEOUT_S)
        return json.loads(body).get("health") in (True, "true")
    except (OSError, ValueError):
        return False
