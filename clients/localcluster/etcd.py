"""One etcd member on loopback: its command line and its health check."""

from __future__ import annotations

import json
from pathlib import Path

from clients.localcluster.constants import ETCD_HEALTH_TIMEOUT_S
from clients.localcluster.fetch import http_get


def etcd_command(etcd: str, data_dir: Path, client_port: int, peer_port: int,
                 tls_dir: Path | None = None) -> list[str]:
    """The command line of a one-member etcd cluster named ``ledger`` on 127.0.0.1.

    The data directory appears in the command line; that is how a later process tells the
    member's PID from a reused one. With ``tls_dir`` (``ledgerctl certs``' layout: ``ca.pem``,
    ``etcd-server.pem``/``.key``) clients must come over mutual TLS with a certificate of
    that CA (``ledger.security.etcd_auth``).
    """
    peer = f"http://127.0.0.1:{peer_port}"
    client = f"{'https' if tls_dir else 'http'}://127.0.0.1:{client_port}"
    tls = [] if tls_dir is None else [
        "--cert-file", str(tls_dir / "etcd-server.pem"),
        "--key-file", str(tls_dir / "etcd-server.key"),
        "--trusted-ca-file", str(tls_dir / "ca.pem"), "--client-cert-auth"]
    # --initial-cluster/--initial-advertise-peer-urls: the defaults name localhost:2380,
    # which does not match a non-default peer port, and etcd then refuses to start.
    return [etcd, "--name", "ledger", "--data-dir", str(data_dir),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"ledger={peer}", "--initial-cluster-state", "new",
            "--logger", "zap", "--log-outputs", "stderr", *tls]


def etcd_healthy(endpoint: str) -> bool:
    """Whether the member at ``endpoint`` (HOST:PORT) reports itself healthy on /health."""
    try:
        body = http_get(f"http://{endpoint}/health", timeout_s=ETCD_HEALTH_TIMEOUT_S)
        return json.loads(body).get("health") in (True, "true")
    except (OSError, ValueError):
        return False
