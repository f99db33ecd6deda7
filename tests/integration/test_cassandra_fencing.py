"""Fencing without a Paxos round per append, on a real Cassandra (``coordinator/PROTOCOL.md``,
"Fencing").

Appends are plain writes; one lightweight transaction per takeover records the new epoch and
the batch its run starts after. These tests show, with separate store objects (separate
driver sessions, as separate nodes have) on the session's real cluster:

* a deposed owner (epoch E) whose append reaches Cassandra only after the new owner (E+1)
  fenced: the append is not acknowledged (its caller hears SHARD_UNAVAILABLE), the row
  really is in the table, and no load or replay ever contains it;
* a row of epoch E written at consistency ONE (a partial write, on some replicas only)
  before or after E+1's fence: the journal every later load returns is exactly the batches
  up to E+1's recorded start plus E+1's own, whichever way the head read went.

The lease is a flag here (a deposed owner is one whose lease ended before the successor was
elected, which etcd guarantees); the real etcd lease against a SIGSTOPped node is the
``pause-owner`` chaos drill (``clients/chaos``).
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from ledger.core.model import CreateWallet, Post, settlement_wallet_id
from ledger.core.status import Status
from ledger.owner import ShardOwner
from ledger.store.port import Fenced

pytestmark = [pytest.mark.real, pytest.mark.timeout(300)]

SHARD = 7
NOW_MS = 1_700_000_000_000


class NoPeers:
    """The owners' ``ShardExecutor``: these tests move money within one shard only."""

    async def execute(self, shard, commands, wait_credit=False, deadline=None):
        raise AssertionError(f"no cross-shard call expected (shard {shard})")


class Gate:
    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()


def hold_next_append(monkeypatch, store) -> Gate:
    """Hold the store's next journal write at the driver boundary, then send it for real.

    The write has left the owner (its lease was valid when it started), but reaches the
    cluster only when released: a delayed packet, a slow coordinator, a paused process.
    """
    from cassandra.query import BoundStatement

    driver = store._driver
    real_start = driver.start
    gate = Gate()

    def start(statement, params):
        if (not gate.entered.is_set() and isinstance(statement, BoundStatement)
                and statement.prepared_statement is store._journal._q_append):
            gate.entered.set()

            async def held():
                await gate.release.wait()
                return await real_start(statement, params)
            return asyncio.ensure_future(held())
        return real_start(statement, params)

    monkeypatch.setattr(driver, "start", start)
    return gate


def deposit(key: str, wallet: str, amount: int) -> Post:
    return Post("t", key, "tx-" + key, "DEPOSIT", settlement_wallet_id("CNY", SHARD), wallet,
                amount, "CNY", "", SHARD, NOW_MS)


@pytest.fixture
async def stores(local_cluster, keyspaces):
    """Three stores (old owner, new owner, an onlooker) on one empty keyspace."""
    from ledger.store.cassandra import CassandraStore

    region = "r1"
    keyspace = await keyspaces.take({region: 1}, "fencing")
    host, port = local_cluster.contact_points[region], local_cluster.cql_port
    opened = []
    try:
        for _ in range(3):
            opened.append(await CassandraStore.connect(
                [host], port, local_dc=region, keyspace=keyspace.name, replication={region: 1},
                require_region_survival=False))
        yield opened
    finally:
        for store in opened:
            await store.close()
        await keyspaces.give_back(keyspace)


async def raw_rows(store, shard: int) -> list[tuple[int, int]]:
    """(seq, writer_epoch) of every journal row of ``shard``, counted or not."""
    rows = await store._driver.run(
        f"SELECT seq, writer_epoch FROM {store._keyspace}.epoch_journal WHERE shard = %s",
        (shard,))
    return [(r["seq"], r["writer_epoch"]) for r in rows if r["seq"] is not None]


async def test_a_deposed_owners_late_append_is_not_acknowledged_and_never_replayed(
        stores, monkeypatch):
    old_store, new_store, onlooker = stores
    lease = {"valid": True}
    old_store.bind_lease(lambda: lease["valid"])
    old = ShardOwner(SHARD, 1, old_store, NoPeers(), clock_ms=lambda: NOW_MS,
                     lease_valid=lambda: lease["valid"])
    await old.start()
    assert (await old.submit(CreateWallet("t", "w-a", "a", "CNY", False, NOW_MS))).ok
    assert (await old.submit(deposit("d1", "a", 500))).ok  # acknowledged: batch 2

    # The old owner decides a deposit of 70; its journal write is on its way but late.
    gate = hold_next_append(monkeypatch, old_store)
    late = asyncio.ensure_future(old.submit(deposit("d2", "a", 70)))
    await gate.entered.wait()
    # Its lease ends (a pause, a partition), so etcd elects a new owner, which fences.
    lease["valid"] = False
    new = ShardOwner(SHARD, 2, new_store, NoPeers(), clock_ms=lambda: NOW_MS)
    await new.start()
    assert new.state.seq == 2 and new.state.wallets["a"].balance_minor == 500

    # The late write lands now, really, on the cluster ...
    gate.release.set()
    answer = await late
    # ... but nobody is told it committed, and the old owner stops serving.
    assert answer.status is Status.SHARD_UNAVAILABLE, answer
    assert not old.serving
    assert (3, 1) in await raw_rows(onlooker, SHARD)

    # No load holds it: not the new owner's store, not an onlooker's.
    for store in (new_store, onlooker):
        loaded = await store.load(SHARD)
        assert [(b.seq, b.epoch) for b in loaded.batches] == [(1, 1), (2, 1)]
        assert [b.seq for b in await store.read_journal(SHARD, 0, 100)] == [1, 2]
    assert await onlooker.journal_position(SHARD) == (2, 2, 0)

    # The new owner's batch 3 is the one that counts; the client's retry of d2 runs there.
    assert (await new.submit(deposit("d2", "a", 70))).ok
    assert (await new.submit(deposit("d3", "a", 30))).ok
    assert sorted(await raw_rows(onlooker, SHARD)) == [(1, 1), (2, 1), (3, 1), (3, 2), (4, 2)]
    await new.stop("test over")
    # A later owner replays exactly that: 500 + 70 + 30, the late row never counted.
    replay = ShardOwner(SHARD, 3, onlooker, NoPeers(), clock_ms=lambda: NOW_MS)
    await replay.start()
    try:
        assert replay.state.seq == 4
        assert replay.state.wallets["a"].balance_minor == 600
    finally:
        await replay.stop("test over")
    # The deposed store refuses anything further for the old epoch, before writing.
    with pytest.raises(Fenced):
        await old_store.append(SHARD, 1, 4, b"late again", [])
    assert (4, 1) not in await raw_rows(onlooker, SHARD)


@pytest.mark.parametrize("when", ["before_the_fence", "after_the_fence"])
async def test_a_partial_row_of_the_old_epoch_is_counted_only_as_the_fence_saw_it(
        stores, when):
    from cassandra import ConsistencyLevel
    from cassandra.query import SimpleStatement

    old_store, new_store, onlooker = stores
    shard = SHARD + (1 if when == "before_the_fence" else 2)
    await old_store.fence(shard, 1)
    for seq in (1, 2):
        await old_store.append(shard, 1, seq, f"old {seq}".encode(), [])

    async def partial_write() -> None:
        # What a write of the old owner that reached only some replicas leaves behind:
        # consistency ONE, no acknowledgement to anyone.
        statement = SimpleStatement(
            f"INSERT INTO {onlooker._keyspace}.epoch_journal (shard, seq, writer_epoch, "
            f"events) VALUES (%s, %s, %s, %s)", consistency_level=ConsistencyLevel.ONE)
        await onlooker._driver.run(statement, (shard, 3, 1, b"partial 3"))

    if when == "before_the_fence":
        await partial_write()
    head = await new_store.fence(shard, 2)
    if when == "after_the_fence":
        await partial_write()
        assert head == 2
    # Whatever the head read saw, every load agrees with it: batches 1..head, nothing after.
    for store in (new_store, onlooker):
        assert [b.seq for b in (await store.load(shard)).batches] == list(range(1, head + 1))
    await new_store.append(shard, 2, head + 1, b"new", [])
    loaded = await onlooker.load(shard)
    assert [(b.seq, b.epoch) for b in loaded.batches] == (
        [(s, 1) for s in range(1, head + 1)] + [(head + 1, 2)])
    if head == 2:  # the partial row lies past the new epoch's start: present, never counted
        assert (3, 1) in await raw_rows(onlooker, shard)
        assert loaded.batches[-1].events == b"new"


def test_which_rows_count_is_decided_by_the_recorded_starts():
    from ledger.store.cassandra.constants import BIGINT_MAX
    from ledger.store.cassandra.journal import counts, epoch_runs

    # Epoch 5 started after batch 0, epoch 8 after 10 (it adopted 5's batches up to 10),
    # epoch 9 after 10 (epoch 8 never wrote), epoch 12 after 14.
    runs = epoch_runs({5: 0, 8: 10, 9: 10, 12: 14})
    assert runs == {5: (0, 10), 8: (10, 10), 9: (10, 14), 12: (14, BIGINT_MAX)}
    assert counts(runs, 10, 5) and not counts(runs, 11, 5)  # 5's late batch 11 never counts
    assert not counts(runs, 11, 8)  # epoch 8's run is empty: any row of it is late
    assert counts(runs, 11, 9) and counts(runs, 14, 9) and not counts(runs, 15, 9)
    assert counts(runs, 15, 12) and counts(runs, 10**12, 12)
    assert not counts(runs, 1, 7)  # an epoch never fenced owns nothing
    assert epoch_runs({}) == {} and epoch_runs(None) == {}


async def test_a_keyspace_with_a_journal_in_the_old_table_is_refused(local_cluster):
    """Journals moved to ``epoch_journal``; a keyspace whose journal is still in the old
    ``journal`` table (one CAS per append) would be served from empty journals, forgetting
    its money. The store refuses to connect to it, naming the table."""
    from ledger.store.cassandra import CassandraStore
    from ledger.store.port import StoreUnavailable

    from clients.localcluster import cql_query

    region = "r1"
    keyspace = f"oldjournal_{uuid.uuid4().hex[:8]}"
    host, port = local_cluster.contact_points[region], local_cluster.cql_port
    try:
        store = await CassandraStore.connect([host], port, local_dc=region, keyspace=keyspace,
                                             replication={region: 1},
                                             require_region_survival=False)
        await store.close()  # an empty old table would be harmless; a row is not
        for cql in (f"CREATE TABLE {keyspace}.journal (shard int, seq bigint, writer_epoch "
                    f"bigint, events blob, PRIMARY KEY ((shard), seq))",
                    f"INSERT INTO {keyspace}.journal (shard, seq, writer_epoch, events) "
                    f"VALUES (3, 1, 7, 0x5b5d)"):
            await asyncio.to_thread(cql_query, host, port, cql, 60.0)
        with pytest.raises(StoreUnavailable, match="old table"):
            await CassandraStore.connect([host], port, local_dc=region, keyspace=keyspace,
                                         replication={region: 1},
                                         require_region_survival=False)
    finally:
        await asyncio.to_thread(cql_query, host, port, f"DROP KEYSPACE IF EXISTS {keyspace}",
                                60.0)


async def test_a_write_that_ends_while_suspended_counts_once_etcd_confirms_the_shard(
        stores, monkeypatch):
    """Keep-alives late while a journal write is out (the node suspended, not deposed): the
    write returns after the lease's local deadline. It is neither acknowledged nor refused
    until etcd answers; when etcd confirms the lease with this shard and epoch (no newer
    epoch can exist then: ``coordinator/PROTOCOL.md``, "Suspension"), it is acknowledged, and
    every later load holds it. Before, it was refused and the shard given up."""
    old_store, new_store, _ = stores
    lease = {"valid": True}
    answered, asked = asyncio.Event(), asyncio.Event()

    async def confirm_held(shard: int, epoch: int) -> bool:
        assert (shard, epoch) == (SHARD, 1)
        asked.set()
        await answered.wait()
        return True

    old_store.bind_lease(lambda: lease["valid"], confirm_held)
    owner = ShardOwner(SHARD, 1, old_store, NoPeers(), clock_ms=lambda: NOW_MS,
                       lease_valid=lambda: lease["valid"], confirm_held=confirm_held)
    await owner.start()
    assert (await owner.submit(CreateWallet("t", "w-a", "a", "CNY", False, NOW_MS))).ok
    gate = hold_next_append(monkeypatch, old_store)
    late = asyncio.ensure_future(owner.submit(deposit("d1", "a", 500)))
    await gate.entered.wait()
    lease["valid"] = False  # the deadline passes while the write is out
    gate.release.set()
    await asyncio.wait_for(asked.wait(), 30)  # the write landed and waits for etcd's answer
    assert not late.done() and owner.serving
    lease["valid"] = True  # etcd confirmed the lease; the shard is still this node's
    answered.set()
    answer = await asyncio.wait_for(late, 30)
    assert answer.ok, answer
    assert owner.serving and owner.state.seq == 2
    await owner.stop()
    # The next owner counts it.
    new = ShardOwner(SHARD, 2, new_store, NoPeers(), clock_ms=lambda: NOW_MS)
    await new.start()
    assert new.state.seq == 2 and new.state.wallets["a"].balance_minor == 500
    await new.stop()
