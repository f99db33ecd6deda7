"""The change stream through an owner kill, on real Cassandra + etcd: a consumer follows every
shard through one node while a bank workload runs and the node that owns half the shards is
SIGKILLed; its shards are taken over (lease expiry, a new epoch, replay), and the stream
delivers every committed batch of every shard exactly once, in order, equal to the journal."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from clients.bank import BankConfig, BankWorkload
from clients.harness import Deployment
from ledger.core import codec
from ledger.store.cassandra import CassandraStore
from ledgerpb import ledger_pb2 as pb
from ledgerpb import ledger_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.real, pytest.mark.timeout(600)]
SHARDS = 8
# How long the workload runs before and after the kill (s).
LOAD_S = 3.0


@pytest.fixture
async def deployment(local_cluster, keyspaces):
    region = local_cluster.regions[0]
    keyspace = await keyspaces.take({region: 1}, "stream")
    d = Deployment(local_cluster, regions=[region], nodes_per_region=2, shards=SHARDS,
                   keyspace=keyspace.name)
    try:
        await asyncio.to_thread(d.start)
        yield d
    finally:
        await asyncio.to_thread(d.stop)
        await keyspaces.give_back(keyspace)


async def test_the_stream_is_the_journal_through_an_owner_kill(deployment):
    survivor, victim = deployment.nodes
    channel = grpc.aio.insecure_channel(survivor.address)
    stream = pb_grpc.LedgerServiceStub(channel).WatchChanges(pb.WatchChangesRequest(follow=True))
    seen: list[pb.ChangeBatch] = []

    async def follow() -> None:
        async for batch in stream:
            seen.append(batch)

    follower = asyncio.create_task(follow())
    bank = BankWorkload([survivor.address], BankConfig(wallets=16, workers=4, prefix="cdc"))
    await bank.setup()
    stop = asyncio.Event()
    load = asyncio.create_task(bank.run(stop))
    await asyncio.sleep(LOAD_S)
    victim.kill()
    await asyncio.sleep(LOAD_S * 2)  # the lease lapses, the survivor takes over and serves
    stop.set()
    await load
    await bank.settle()
    assert await bank.check() == []

    store = await CassandraStore.connect(**deployment.store_args(), create_schema=False)
    try:
        journals = {s: await store.read_journal(s, 0, 100_000) for s in range(SHARDS)}
        deadline = time.monotonic() + 60
        while any(max((b.seq for b in seen if b.shard == s), default=0)
                  < (journals[s][-1].seq if journals[s] else 0) for s in range(SHARDS)):
            assert time.monotonic() < deadline, "the stream did not reach every journal head"
            await asyncio.sleep(0.2)
            journals = {s: await store.read_journal(s, 0, 100_000) for s in range(SHARDS)}
    finally:
        await store.close()
        stream.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await channel.close()
        await bank.close()
    took_over = 0
    for s in range(SHARDS):
        mine = [b for b in seen if b.shard == s]
        expected = journals[s][:len(mine)]
        assert [b.seq for b in mine] == list(range(1, len(mine) + 1)), s  # no gap, no repeat
        assert [(b.seq, b.epoch, [e.type for e in b.events]) for b in mine] == [
            (j.seq, j.epoch, [type(e).__name__ for e in codec.loads(j.events)])
            for j in expected], s
        took_over += len({b.epoch for b in mine}) > 1
    assert took_over, "no shard changed owner: the kill was not followed"
