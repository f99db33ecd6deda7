"""Defect 8, on the real three-region cluster: a durable node refuses a keyspace whose
replication cannot keep an acknowledged batch through the loss of a region, judged by the
replication the keyspace really has (not the one asked for), and says why; ``ledgerctl
replication`` shows it.

Each test makes keyspaces of its own and drops them at the end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import uuid

import pytest

from ledger.store.replication import UnsafeReplication

pytestmark = [pytest.mark.real, pytest.mark.timeout(600)]

THREE = ["r1", "r2", "r3"]
# Bound of a CLI run that must end by itself (a refused node exits before touching etcd).
CLI_TIMEOUT_S = 180.0


@pytest.fixture
async def keyspaces(local_cluster):
    """Hands out fresh keyspace names; drops them afterwards."""
    from clients.localcluster import cql_query

    made: list[str] = []

    def new() -> str:
        made.append(f"repl_{uuid.uuid4().hex[:10]}")
        return made[-1]

    yield new
    for keyspace in made:
        await asyncio.to_thread(cql_query, local_cluster.contact_points["r1"],
                                local_cluster.cql_port, f"DROP KEYSPACE IF EXISTS {keyspace}",
                                60.0)


async def connect(local_cluster, keyspace: str, **kw):
    from ledger.store.cassandra import CassandraStore

    return await CassandraStore.connect([local_cluster.contact_points["r1"]],
                                        local_cluster.cql_port, local_dc="r1",
                                        keyspace=keyspace, **kw)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S)


async def make_single_region_keyspace(local_cluster, keyspace: str) -> None:
    """A keyspace with all replicas in r1, as a first node without --regions used to make."""
    store = await connect(local_cluster, keyspace, replication={"r1": 1},
                          require_region_survival=False)
    assert not store.replication_verdict.survives_region_loss
    await store.close()


async def test_a_durable_connect_refuses_a_keyspace_in_one_region(local_cluster, keyspaces):
    keyspace = keyspaces()
    with pytest.raises(UnsafeReplication) as refused:
        await connect(local_cluster, keyspace, replication={"r1": 1}, regions=THREE)
    message = str(refused.value)
    assert message.startswith(f"keyspace {keyspace}: replication {{r1: 1}} does not survive "
                              f"the loss of a region")
    assert "The durable mode serves only a keyspace that keeps acknowledged transfers " \
           "through the loss of a region" in message
    assert "region datacenter r2 holds no replica of the keyspace" in message
    assert "all 1 replica(s) are in datacenter r1" in message
    assert "--single-region-dev" in message


async def test_an_existing_keyspace_is_judged_by_the_replication_it_has(local_cluster,
                                                                         keyspaces):
    keyspace = keyspaces()
    await make_single_region_keyspace(local_cluster, keyspace)
    # A node asking for one replica per region gets the existing {r1: 1} (CREATE KEYSPACE
    # IF NOT EXISTS keeps it): refused all the same.
    with pytest.raises(UnsafeReplication, match=r"replication \{r1: 1\} does not survive"):
        await connect(local_cluster, keyspace, replication={"r1": 1, "r2": 1, "r3": 1},
                      regions=THREE)


async def test_ledgerd_node_refuses_to_start_on_a_single_region_keyspace(local_cluster,
                                                                         keyspaces):
    keyspace = keyspaces()
    await make_single_region_keyspace(local_cluster, keyspace)
    cassandra = f"{local_cluster.contact_points['r1']}:{local_cluster.cql_port}"
    done = await asyncio.to_thread(
        run_cli, "ledger.cli.ledgerd", "node", "--region", "r1", "--regions", "r1,r2,r3",
        "--cassandra", cassandra, "--etcd", local_cluster.etcd_endpoint,
        "--etcd-prefix", f"/{keyspace}", "--keyspace", keyspace, "--shards", "4",
        "--port", "0", "--log-level", "WARNING")
    from ledger.cli.ledgerd import EXIT_REFUSED

    assert done.returncode == EXIT_REFUSED, (done.stdout, done.stderr)
    assert "serving" not in done.stdout
    assert (f"ledgerd node: refusing to start: keyspace {keyspace}: replication {{r1: 1}} "
            f"does not survive the loss of a region") in done.stderr
    assert "Traceback" not in done.stderr


async def test_ledgerctl_shows_the_replication_and_its_verdict(local_cluster, keyspaces):
    unsafe, safe = keyspaces(), keyspaces()
    await make_single_region_keyspace(local_cluster, unsafe)
    store = await connect(local_cluster, safe, regions=THREE)  # default: one per region
    assert store.replication_verdict.replication == {"r1": 1, "r2": 1, "r3": 1}
    assert store.replication_verdict.survives_region_loss
    await store.close()
    cassandra = f"{local_cluster.contact_points['r1']}:{local_cluster.cql_port}"

    def ctl(keyspace: str, *extra: str) -> subprocess.CompletedProcess:
        return run_cli("ledger.cli.ledgerctl", "replication", "--cassandra", cassandra,
                       "--dc", "r1", "--keyspace", keyspace, "--regions", "r1,r2,r3", *extra)

    bad_json, good_json, bad_text = await asyncio.gather(
        asyncio.to_thread(ctl, unsafe, "--json"), asyncio.to_thread(ctl, safe, "--json"),
        asyncio.to_thread(ctl, unsafe))
    assert bad_json.returncode == 1, bad_json.stderr
    doc = json.loads(bad_json.stdout)
    assert doc["keyspace"] == unsafe and doc["replication"] == {"r1": 1}
    assert doc["survives_region_loss"] is False
    assert "region datacenter r3 holds no replica of the keyspace" in doc["reasons"]
    assert good_json.returncode == 0, good_json.stderr
    doc = json.loads(good_json.stdout)
    assert doc["replication"] == {"r1": 1, "r2": 1, "r3": 1}
    assert (doc["replicas"], doc["quorum"], doc["survives_region_loss"]) == (3, 2, True)
    assert bad_text.returncode == 1
    assert "survives the loss of any one region: NO" in bad_text.stdout
    assert "  - all 1 replica(s) are in datacenter r1" in bad_text.stdout


async def test_single_region_development_is_allowed_with_a_warning(local_cluster, keyspaces,
                                                                   caplog):
    keyspace = keyspaces()
    with caplog.at_level(logging.WARNING, logger="ledger.store.cassandra"):
        store = await connect(local_cluster, keyspace, replication={"r1": 1},
                              require_region_survival=False)
    try:
        assert not store.replication_verdict.survives_region_loss
        await store.fence(1, 1)  # the store works
        assert any("Accepted for single-region development only" in r.getMessage()
                   for r in caplog.records)
    finally:
        await store.close()


async def test_the_local_durability_mode_is_not_refused(local_cluster, keyspaces):
    keyspace = keyspaces()
    store = await connect(local_cluster, keyspace, replication={"r1": 1}, regions=THREE,
                          serial_consistency="LOCAL_SERIAL", write_consistency="LOCAL_QUORUM",
                          read_consistency="LOCAL_QUORUM")
    try:
        assert not store.replication_verdict.survives_region_loss
        assert any("LOCAL_SERIAL" in r for r in store.replication_verdict.reasons)
    finally:
        await store.close()
