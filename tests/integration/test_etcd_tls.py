"""etcd behind mutual TLS and its own access control (``ledger.security.etcd_auth``): once
``ledgerctl etcd-auth`` ran, a node certificate campaigns and owns shards, an operator
certificate reads and moves them (``ledgerctl shards`` / ``move-shard``), and a service
certificate, another CA's certificate or no certificate get nothing from etcd: they can
neither join nor move a shard."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time

import pytest

from clients.harness import free_port
from clients.localcluster.etcd import etcd_command
from clients.localcluster.fetch import ensure_etcd
from ledger.cli import ledgerctl
from ledger.security import certs
from ledger.security.tls import TlsFiles, channel_credentials
from shard_router.etcd import EtcdOwnership, EtcdOwnershipError

pytestmark = pytest.mark.real

SHARDS = 4
START_TIMEOUT_S = 20.0
# A refused certificate looks like an unreachable etcd to the client (the handshake fails:
# UNAVAILABLE), which a join retries for 15 s by default; here that is only time lost.
JOIN_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory):
    """A TLS-only etcd on free loopback ports, with the dev PKI it trusts."""
    root = tmp_path_factory.mktemp("etcd-tls")
    pki = root / "pki"
    certs.make_dev_pki(pki, nodes=("n1",), services=("payments",), operators=("ops",))
    certs.make_dev_pki(root / "other", nodes=("n1",), services=(), operators=("ops",))
    etcd, _ = ensure_etcd()
    port = free_port()
    proc = subprocess.Popen(etcd_command(etcd, root / "data", port, free_port(), tls_dir=pki),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert proc.poll() is None, "etcd exited"
            assert time.monotonic() < deadline, "etcd did not listen"
            time.sleep(0.05)
        yield endpoint, root
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(root / "data", ignore_errors=True)


def _ctl(*argv: str) -> int:
    return ledgerctl.main(list(argv))


async def _joins(endpoint: str, tls: TlsFiles | None, node: str) -> EtcdOwnership | None:
    gained: list[int] = []
    every = asyncio.Event()

    async def listener(shard: int, epoch: int) -> None:
        gained.append(shard)
        if len(set(gained)) == SHARDS:
            every.set()
    ownership = EtcdOwnership(endpoint, node, "r1", "127.0.0.1:1", ["r1"], shard_count=SHARDS,
                              lease_ttl_s=3.0, join_timeout_s=JOIN_TIMEOUT_S,
                              credentials=channel_credentials(tls) if tls else None)
    try:
        await ownership.start(listener)
    except EtcdOwnershipError:
        return None
    await asyncio.wait_for(every.wait(), START_TIMEOUT_S)
    return ownership


def test_only_nodes_and_operators_use_the_shard_map(tls_etcd, capsys):
    endpoint, root = tls_etcd
    pki = root / "pki"
    common = ("--etcd", endpoint, "--regions", "r1", "--shards", str(SHARDS))
    assert _ctl("etcd-auth", *common, "--etcd-tls-dir", str(pki)) == 0

    async def scenario() -> None:
        node = await _joins(endpoint, TlsFiles.from_dir(pki, "node-n1"), "n1")
        assert node is not None and set(node.owned()) == set(range(SHARDS))
        try:
            for tls in (TlsFiles.from_dir(pki, "service-payments"),
                        TlsFiles.from_dir(root / "other", "node-n1"), None):
                assert await _joins(endpoint, tls, "intruder") is None
        finally:
            await node.close()
    asyncio.run(scenario())
    capsys.readouterr()
    # The operator reads the map (every shard unowned now: exit 1, with the table).
    _ctl("shards", *common, "--etcd-tls-dir", str(pki))
    assert f"{SHARDS} shards; owned per region" in capsys.readouterr().out
    # Without a certificate, or with a service's: no map, and no shard moves.
    assert _ctl("shards", *common, "--etcd-join-timeout-s", str(JOIN_TIMEOUT_S)) not in (0, 1)
    assert "owned per region" not in capsys.readouterr().out
    assert _ctl("move-shard", "0", "--to", "r1", *common, "--etcd-tls-dir", str(pki),
                "--etcd-tls-name", "service-payments") != 0
    assert "moved" not in capsys.readouterr().out
