"""The suite's keyspace pool (``tests/keyspaces.py``) hands a used keyspace on empty, with a
journal table that carries no Paxos state of the test before, and never a broken one."""

from __future__ import annotations

import asyncio

import pytest

from clients.localcluster import cql_query
from ledger.store.cassandra.schema import schema_ddl
from tests.keyspaces import _table_of

pytestmark = pytest.mark.real


def _query(cluster, statement: str) -> list[tuple]:
    region = cluster.regions[0]
    return cql_query(cluster.contact_points[region], cluster.cql_port, statement, 60.0)


def _table_id(cluster, keyspace: str, table: str):
    return _query(cluster, "SELECT id FROM system_schema.tables WHERE keyspace_name = "
                           f"'{keyspace}' AND table_name = '{table}'")[0][0]


async def test_a_keyspace_comes_back_empty_with_a_new_journal_table(local_cluster, keyspaces):
    from ledger.store.cassandra import CassandraStore

    region = local_cluster.regions[0]
    first = await keyspaces.take({region: 1}, "pool")
    store = await CassandraStore.connect(
        [local_cluster.contact_points[region]], local_cluster.cql_port, local_dc=region,
        keyspace=first.name, replication={region: 1}, require_region_survival=False)
    await store.close()
    name = first.name
    # A fence (lightweight transaction) on the journal, and a row in every other table's
    # place that a test fills most: wallets.
    await asyncio.to_thread(
        _query, local_cluster,
        f"UPDATE {name}.epoch_journal SET epoch = 7 WHERE shard = 1 IF epoch = null")
    await asyncio.to_thread(_query, local_cluster,
                            f"INSERT INTO {name}.wallets (wallet_id) VALUES ('w')")
    journal_id = await asyncio.to_thread(_table_id, local_cluster, name, "epoch_journal")
    await keyspaces.give_back(first)

    again = await keyspaces.take({region: 1}, "pool")
    try:
        assert again.name == name
        assert again.tag != first.tag  # an etcd prefix made from it is new
        for table in filter(None, map(_table_of, schema_ddl(name, {region: 1}))):
            rows = await asyncio.to_thread(_query, local_cluster,
                                           f"SELECT * FROM {name}.{table} LIMIT 1")
            assert rows == [], table
        assert await asyncio.to_thread(_table_id, local_cluster, name,
                                       "epoch_journal") != journal_id
    finally:
        await keyspaces.give_back(again)


async def test_a_keyspace_that_cannot_be_reset_is_replaced(local_cluster, keyspaces):
    region = local_cluster.regions[0]
    # Taken and given back without ever being created: its reset finds no tables.
    ghost = await keyspaces.take({region: 7}, "pool")
    await keyspaces.give_back(ghost)
    fresh = await keyspaces.take({region: 7}, "pool")
    assert fresh.name != ghost.name
