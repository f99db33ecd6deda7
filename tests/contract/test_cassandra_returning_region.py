"""A region's Cassandra node back from an outage: a takeover does not wait for it
(``driver.hedged``).

In the kill-region drill the region came back with a Cassandra node that lacked everything
written while it was down; the returning ledger node fenced and loaded its shards through
it, and one fence took 11.8 s while nobody served that shard. A takeover's reads and its
fence are now sent again to a node of another region when the local one has not answered
within ``HEDGE_DELAY_S``: the other two regions hold a quorum.

Here a region's Cassandra node is paused (SIGSTOP: connected, answering nothing). A new
owner connected through r1 fences and loads a shard of a keyspace with a replica in each of
three regions while r1 is paused: without hedging the fence's first read waits for r1 until
the request timeout and the takeover fails; with it, the takeover gets the whole journal.
"""

from __future__ import annotations

import asyncio

import pytest

from ledger import metrics
from ledger.store.cassandra import CassandraStore
from ledger.store.port import JournalBatch
from tests.conftest import TEST_REGIONS
from tests.contract.conftest import _SHARD_NUMBERS

pytestmark = [pytest.mark.real,
              pytest.mark.skipif(len(TEST_REGIONS) < 3, reason="needs three regions")]

BATCHES = 12
# Longer than a hedged takeover needs (a few hedge delays), far shorter than the suite's
# patience for a paused node: the test fails, rather than waits, if hedging is gone.
REQUEST_TIMEOUT_S = 6.0


def _events(shard: int, seq: int) -> bytes:
    return f"hedge:{shard}:{seq}".encode() * 8


async def test_a_takeover_through_a_paused_local_node_is_served_by_the_other_regions(
        local_cluster, cassandra_3dc_store):
    regions = list(local_cluster.regions)[:3]
    old = cassandra_3dc_store  # connected through r1, a replica in each region
    shard = next(_SHARD_NUMBERS)
    new = await CassandraStore.connect(
        [local_cluster.contact_points[r] for r in regions], local_cluster.cql_port,
        local_dc=regions[0], keyspace=old._keyspace, create_schema=False,
        request_timeout_s=REQUEST_TIMEOUT_S)
    try:
        await old.fence(shard, 1)
        for seq in range(1, BATCHES + 1):
            await old.append(shard, 1, seq, _events(shard, seq), [])
        hedged_before = metrics.STORE_HEDGED._value.get()
        await asyncio.to_thread(local_cluster.pause_cassandra, regions[0])
        try:
            head = await new.fence(shard, 2)
            loaded = await new.load(shard)
        finally:
            await asyncio.to_thread(local_cluster.resume_cassandra, regions[0])
        assert head == BATCHES
        assert loaded.batches == [JournalBatch(s, 1, _events(shard, s))
                                  for s in range(1, BATCHES + 1)]
        assert metrics.STORE_HEDGED._value.get() > hedged_before
        # The new owner appends through r1 again once it answers.
        await new.append(shard, 2, BATCHES + 1, _events(shard, BATCHES + 1), [])
    finally:
        await new.close()



async def test_catching_up_asks_every_node_of_the_other_regions(local_cluster,
                                                                cassandra_3dc_store):
    """A node of a returning region connects through its own region's Cassandra node alone
    (``ledgerd node --cassandra``); the driver has not connected to the other regions' nodes
    yet (``is_up`` None). ``catching_up`` must ask them all the same: it skipped them, and
    said "caught up" while they held minutes of hints for it (kill-region drill)."""
    regions = list(local_cluster.regions)[:3]
    store = await CassandraStore.connect(
        [local_cluster.contact_points[regions[1]]], local_cluster.cql_port,
        local_dc=regions[1], keyspace=cassandra_3dc_store._keyspace, create_schema=False,
        request_timeout_s=REQUEST_TIMEOUT_S)
    asked: list[str] = []
    execute = store._session.execute

    def spy(query, *args, host=None, **kwargs):
        if host is not None:
            asked.append(host.datacenter)
        return execute(query, *args, host=host, **kwargs)

    store._session.execute = spy
    try:
        reason = await store.catching_up()
        assert sorted(asked) == sorted(r for r in regions if r != regions[1])
        assert reason is None or regions[1] not in reason.split(" holds ")[0]
    finally:
        await store.close()
