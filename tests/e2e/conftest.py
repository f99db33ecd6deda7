"""A running ledger (gRPC server in this process) per backend: the embedded default, and
Cassandra + etcd started by the project's scripts. The same API tests run on both.

The transfer round trips (``THREE_DC_TESTS``) also run on ``cassandra_3dc``: a keyspace with
one replica in each of three regions at the durable consistency (journal CAS at SERIAL,
commit at QUORUM across datacenters), so the commit path is exercised as in production."""

from __future__ import annotations

import pytest

from clients import LedgerClient
from tests.conftest import assert_replicated_in
from tests.keyspaces import TestKeyspace
from ledger import server

SHARDS = 16


# Tests that also run on the three-datacenter keyspace: money round trips through the API
# (one-step same-shard and two-step cross-shard commits, and a retry answered from the
# record). Each costs a keyspace loan of its own (~3 s to reset, ``tests/keyspaces.py``).
THREE_DC_TESTS = ("test_money_moves_and_books_balance",
                  "test_idempotent_retry_returns_original_and_moves_money_once")


async def _start_cassandra_backend(request, three_dc: bool = False,
                                   keyspace: TestKeyspace | None = None,
                                   node_id: str | None = None, **server_options):
    """A node on a keyspace lent to this test (or on ``keyspace``: a second node there takes
    the shards over when the first one is gone, as in a failover). ``close_server`` gives
    the keyspace back."""
    from ledger.store.cassandra import CassandraStore
    from shard_router.etcd import EtcdOwnership
    from tests.conftest import TEST_CQL_PORT

    local_cluster = request.getfixturevalue("local_cluster")
    region = local_cluster.regions[0]
    regions = list(local_cluster.regions)[:3] if three_dc else [region]
    if keyspace is None:
        keyspace = await request.getfixturevalue("keyspaces").take(
            {r: 1 for r in regions}, "e2e3" if three_dc else "e2e")
    if three_dc:
        # The node serves from r1; its keyspace keeps a replica in each of three regions and
        # the store runs at its default, durable consistency.
        store = await CassandraStore.connect(
            [local_cluster.contact_points[r] for r in regions], TEST_CQL_PORT,
            local_dc=region, keyspace=keyspace.name, replication={r: 1 for r in regions})
        await assert_replicated_in(store, keyspace.name, regions)
    else:
        store = await CassandraStore.connect([local_cluster.contact_points[region]],
                                             TEST_CQL_PORT, local_dc=region,
                                             keyspace=keyspace.name, replication={region: 1},
                                             # one datacenter: a test keyspace, not RPO 0
                                             require_region_survival=False)
    # The etcd prefix is new per loan (the keyspace name comes back to later tests).
    ownership = EtcdOwnership(local_cluster.etcd_endpoint, node_id or f"node-{keyspace.tag}",
                              region, "127.0.0.1:0", [region], shard_count=SHARDS,
                              lease_ttl_s=5.0, prefix=f"/e2e/{keyspace.tag}")
    running = await server.start(store, ownership, SHARDS, "127.0.0.1", 0, **server_options)
    running.keyspace = keyspace
    return running


def pytest_generate_tests(metafunc):
    """Backends of ``ledger_server``: embedded and cassandra for every test, cassandra_3dc too
    for ``THREE_DC_TESTS`` when the session cluster has three regions."""
    if "ledger_server" not in metafunc.fixturenames:
        return
    from tests.conftest import TEST_REGIONS

    params = ["embedded", pytest.param("cassandra", marks=pytest.mark.real)]
    if len(TEST_REGIONS) >= 3 and metafunc.function.__name__ in THREE_DC_TESTS:
        params.append(pytest.param("cassandra_3dc", marks=pytest.mark.real))
    metafunc.parametrize("ledger_server", params, indirect=True)


@pytest.fixture
async def ledger_server(request, tmp_path):
    if request.param == "embedded":
        running = await server.start_dev(tmp_path, port=0, shard_count=SHARDS)
    else:
        running = await _start_cassandra_backend(request,
                                                 three_dc=request.param == "cassandra_3dc")
    try:
        yield running
    finally:
        await close_server(request, running)


async def close_server(request, running) -> None:
    """Close a server of ``ledger_server``'s kind; give its keyspace back if it had one."""
    await running.close(grace_s=0.5)
    if request.param != "embedded":
        await request.getfixturevalue("keyspaces").give_back(running.keyspace)


@pytest.fixture
async def client(ledger_server):
    async with LedgerClient(f"127.0.0.1:{ledger_server.port}", caller="tests",
                            retries=False) as c:
        yield c
