"""Operator commands on a real three-region deployment: `ledgerctl shards` shows the map,
owners, epochs and journal heads; `ledgerctl failover` hands a region's shards to another
region while a bank workload runs, with no client-visible errors and nothing lost;
`ledgerctl failback` brings them home; `ledgerctl move-shard` re-homes one shard. The commands
the chaos drills check the store with (`journal`, `fence-check`, `restore-homes`, `commit-path`)
answer from the real servers: a moved shard's old epoch is refused by the journal fence, and
`restore-homes` brings every shard back to its default region."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest

from clients.bank import BankConfig, BankWorkload
from clients.harness import Deployment
from ledger.reconcile import reconcile
from ledger.store.cassandra import CassandraStore

pytestmark = [pytest.mark.real, pytest.mark.timeout(600)]
SHARDS = 12


def ctl(deployment: Deployment, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ledger.cli.ledgerctl", *args, "--etcd",
           deployment.cluster.etcd_endpoint, "--etcd-prefix", deployment.prefix, "--regions",
           ",".join(deployment.regions), "--shards", str(SHARDS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def ctl_store(deployment: Deployment, *args: str) -> subprocess.CompletedProcess:
    """A ``ledgerctl`` store command on the deployment's keyspace, read through region 1."""
    region = deployment.regions[0]
    cmd = [sys.executable, "-m", "ledger.cli.ledgerctl", *args, "--cassandra",
           f"{deployment.cluster.contact_points[region]}:{deployment.cluster.cql_port}",
           "--dc", region, "--keyspace", deployment.keyspace, "--shards", str(SHARDS)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def shard_table(deployment: Deployment) -> list[dict]:
    """``ledgerctl shards --json``: exit 0, or 1 while some shard has no owner (one in the
    middle of a hand-over: the table says which)."""
    region = deployment.regions[0]
    proc = ctl(deployment, "shards", "--json", "--cassandra",
               f"{deployment.cluster.contact_points[region]}:{deployment.cluster.cql_port}",
               "--dc", region, "--keyspace", deployment.keyspace, check=False)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    table = json.loads(proc.stdout)
    assert (proc.returncode == 1) == any(not r["owner"] for r in table), proc.stdout
    return table


@pytest.fixture
async def deployment(local_cluster, keyspaces):
    if len(local_cluster.regions) < 2:
        pytest.skip("needs at least two regions (LEDGER_TEST_REGIONS)")
    keyspace = await keyspaces.take({r: 1 for r in local_cluster.regions}, "regions")
    d = Deployment(local_cluster, nodes_per_region=1, shards=SHARDS, keyspace=keyspace.name)
    try:
        await asyncio.to_thread(d.start)
        yield d
    finally:
        await asyncio.to_thread(d.stop)
        await keyspaces.give_back(keyspace)


async def settled_table(deployment, timeout_s: float = 60.0) -> list[dict]:
    """The shard table once every shard is served in its home region (nodes start one after
    another, so the first may serve everything until the others come up), its journal fenced
    by the owner's epoch (a node takes a shard in etcd first and fences its journal after)."""
    deadline = time.monotonic() + timeout_s
    while True:
        table = await asyncio.to_thread(shard_table, deployment)
        if all(r["owner"] and r["owner_region"] == r["home"]
               and r["journal_epoch"] == r["epoch"] for r in table):
            return table
        assert time.monotonic() < deadline, table
        await asyncio.sleep(0.5)


async def test_failover_failback_and_move_shard_under_load(deployment):
    src, dst = deployment.regions[0], deployment.regions[1]
    before = await settled_table(deployment)
    moved = [r["shard"] for r in before if r["home"] == src]
    assert moved

    bank = BankWorkload(deployment.addresses, BankConfig(wallets=16, workers=4, prefix="ctl"))
    await bank.setup()
    stop = asyncio.Event()
    running = asyncio.create_task(bank.run(stop))
    try:
        proc = await asyncio.to_thread(ctl, deployment, "failover", "--from", src, "--to", dst,
                                       "--reason", "drill: planned handover")
        assert "served by their new home regions" in proc.stdout
        during = shard_table(deployment)
        for r in during:
            if r["shard"] in moved:
                assert (r["home"], r["owner_region"], r["origin"]) == (dst, dst, src)
                old = next(b for b in before if b["shard"] == r["shard"])
                assert r["epoch"] > old["epoch"]
        await asyncio.to_thread(ctl, deployment, "failback", "--region", src)
        await asyncio.to_thread(ctl, deployment, "move-shard", str(moved[0]), "--to", dst,
                                "--reason", "rack maintenance")
    finally:
        stop.set()
        await running
    after = shard_table(deployment)
    homes = {r["shard"]: (r["home"], r["owner_region"]) for r in after}
    assert homes[moved[0]] == (dst, dst)
    assert all(homes[s] == (src, src) for s in moved[1:])

    await bank.settle()
    assert await bank.check() == []
    counts = bank.result.counts()
    # A planned handover shows clients no errors beyond the router's own retries.
    assert counts["unknown"] == 0 and counts["ok"] > 50, counts
    await bank.close()
    store = await CassandraStore.connect(**deployment.store_args(), create_schema=False)
    try:
        report = await reconcile(store, SHARDS)
        assert report.clean, report.findings
    finally:
        await store.close()
    await admin_actions_are_audited(deployment, moved, dst)


async def admin_actions_are_audited(deployment, moved: list[int], dst: str) -> None:
    """Every moved shard's chain holds the failover and the failback once each, under the
    operator's principal and with the reason given; the moved-again shard its move too; and
    every chain still verifies. (Idle shards journal their notes within the linger.)"""
    expected = {(s, "Failover") for s in moved} | {(s, "Failback") for s in moved} | {
        (moved[0], "MoveShard")}
    deadline = time.monotonic() + 60
    while True:
        proc = await asyncio.to_thread(ctl_store, deployment, "audit", "show", "--json")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        changes = [r for r in json.loads(proc.stdout)
                   if r["method"] in ("Failover", "Failback", "MoveShard")]
        found = [(r["shard"], r["method"]) for r in changes]
        if set(found) >= expected:
            break
        assert time.monotonic() < deadline, sorted(expected - set(found))
        await asyncio.sleep(0.5)
    assert sorted(found) == sorted(expected)  # each change recorded once per shard
    assert all(r["principal"].startswith("unverified:") for r in changes)
    assert all("drill: planned handover" in r["detail"] for r in changes
               if r["method"] == "Failover")
    move = next(r for r in changes if r["method"] == "MoveShard")
    assert f"-> {dst}" in move["detail"] and "rack maintenance" in move["detail"]
    verify = await asyncio.to_thread(ctl_store, deployment, "audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr


async def test_drill_support_commands(deployment):
    before = await settled_table(deployment)
    shard = before[0]["shard"]
    old_epoch = before[0]["epoch"]
    elsewhere = next(r for r in deployment.regions if r != before[0]["home"])
    await asyncio.to_thread(ctl, deployment, "move-shard", str(shard), "--to", elsewhere)
    moved = next(r for r in shard_table(deployment) if r["shard"] == shard)
    assert moved["owner_region"] == elsewhere and moved["epoch"] > old_epoch

    # The deposed epoch cannot append; the journal's epochs never go back.
    fence = await asyncio.to_thread(ctl_store, deployment, "fence-check", "--shard", str(shard),
                                    "--epoch", str(old_epoch), "--json")
    assert fence.returncode == 0, fence.stdout + fence.stderr
    assert json.loads(fence.stdout)["refused"] is True
    journal = await asyncio.to_thread(ctl_store, deployment, "journal", "--json")
    assert journal.returncode == 0, journal.stdout + journal.stderr
    doc = json.loads(journal.stdout)
    assert doc["epochs_monotonic"] and set(doc["shards"]) == {str(s) for s in range(SHARDS)}

    # Every shard back in its default region (shard s in regions[s % n]).
    proc = await asyncio.to_thread(ctl, deployment, "restore-homes", "--json")
    placed = json.loads(proc.stdout)
    regions = deployment.regions
    assert placed["homes"] == {str(s): regions[s % len(regions)] for s in range(SHARDS)}
    assert placed["moved"] == {str(shard): regions[shard % len(regions)]}
    await settled_table(deployment)

    path = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "ledger.cli.ledgerctl",
                                                    "commit-path", "--json"],
                                   capture_output=True, text=True, timeout=120)
    assert json.loads(path.stdout)["journal_cas_serial_consistency"] == "SERIAL"
