"""A running ledger (gRPC server in this process) per backend: the embedded default, and
Cassandra + etcd started by the project's scripts. The same API tests run on both."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from clients import LedgerClient
from ledger import server

SHARDS = 16


async def _start_cassandra_backend(local_cluster):
    from ledger.store.cassandra import CassandraStore
    from shard_router.etcd import EtcdOwnership
    from tests.conftest import TEST_CQL_PORT

    region = local_cluster.regions[0] if hasattr(local_cluster, "regions") else "r1"
    keyspace = "e2e_" + uuid.uuid4().hex[:8]
    store = await CassandraStore.connect([local_cluster.contact_points[region]], TEST_CQL_PORT,
                                         local_dc=region, keyspace=keyspace,
                                         replication={region: 1})
    ownership = EtcdOwnership(local_cluster.etcd_endpoint, f"node-{keyspace}", region,
                              "127.0.0.1:0", [region], shard_count=SHARDS, lease_ttl_s=5.0,
                              prefix=f"/e2e/{keyspace}")
    running = await server.start(store, ownership, SHARDS, "127.0.0.1", 0)
    running.keyspace = keyspace
    return running


@pytest.fixture(params=["embedded", pytest.param("cassandra", marks=pytest.mark.real)])
async def ledger_server(request, tmp_path):
    if request.param == "embedded":
        running = await server.start_dev(tmp_path, port=0, shard_count=SHARDS)
    else:
        running = await _start_cassandra_backend(request.getfixturevalue("local_cluster"))
    try:
        yield running
    finally:
        await running.close(grace_s=0.5)
        if request.param == "cassandra":
            # Every keyspace's tables live in the test cluster's heap: drop what we made.
            from ledger.localcluster import cql_query
            cluster = request.getfixturevalue("local_cluster")
            region = cluster.regions[0]
            await asyncio.to_thread(cql_query, cluster.contact_points[region], cluster.cql_port,
                                    f"DROP KEYSPACE IF EXISTS {running.keyspace}", 60.0)


@pytest.fixture
async def client(ledger_server):
    async with LedgerClient(f"127.0.0.1:{ledger_server.port}", caller="tests",
                            retries=False) as c:
        yield c
