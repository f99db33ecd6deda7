"""Warm standbys: a node handed a shard by a planned move replays only what followed its
warm-up (``ledger.node``, "warm standbys"; ``JournalStore.load_after``).

Why: on a region just back from a crash, a failback's takeover loaded 1,000-1,400 batches in
6-8 s while no node served the shard, and every transfer touching it waited (kill-region
drill at load, README "Heal without stalls"). Here two nodes share one SQLite store (the real
adapter); the test plays both elections.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from ledger import compaction
from ledger import constants as K
from ledger import metrics
from ledger.core import codec
from ledger.core.model import CreateWallet
from ledger.node import Node
from tests.owner.test_takeover_slots import CalledOwnership

SHARD = 3
NO_HANG_S = 10.0


def _ownership(node_id: str) -> CalledOwnership:
    ownership = CalledOwnership()
    ownership.node_id = node_id
    return ownership


async def _wallets(node: Node, first: int, count: int) -> None:
    owner = node.owners[SHARD]
    for i in range(first, first + count):  # one batch each
        made = await owner.submit(CreateWallet("t", f"k{i}", f"w{i}", "CNY", False, 1))
        assert made.ok, made


async def _warmed(node: Node, shards: set[int]) -> set[int]:
    """Ask for warm standbys of ``shards``, wait for their warm-ups, return those ready."""
    node.warm_targets(shards)
    running = list(node._warming.values())
    assert running, "no warm-up started"
    await asyncio.wait_for(asyncio.gather(*running), NO_HANG_S)
    return node.warm_targets(shards)


@pytest.fixture
async def pair(store):
    """Two nodes on one store: ``old`` serves the shard (epoch 1), ``new`` is to take it."""
    old, new = Node(store, _ownership("a")), Node(store, _ownership("b"))
    await old.start()
    await new.start()
    try:
        await old.ownership.listener(SHARD, 1)
        assert await old.wait_serving(1, timeout_s=NO_HANG_S)
        yield old, new
    finally:
        await new.close()
        await old.close()


async def _hand_over(old: Node, new: Node, epoch: int):
    await old.ownership.listener(SHARD, 0)
    await new.ownership.listener(SHARD, epoch)
    assert await new.wait_serving(1, timeout_s=NO_HANG_S)
    return new.owners[SHARD]


async def _full_replay(store, shard: int) -> bytes:
    """The state a takeover without a standby builds, encoded."""
    state = await compaction.replay(store, shard, await store.load(shard))
    return codec.snapshot_dumps(state)


def _count(outcome: str) -> float:
    return metrics.WARM_STANDBYS.labels(outcome)._value.get()


async def test_a_takeover_with_a_warm_standby_replays_only_the_tail(store, pair):
    old, new = pair
    await _wallets(old, 0, 30)
    assert await _warmed(new, {SHARD}) == {SHARD}
    used = _count("used")
    await _wallets(old, 30, 4)  # appended after the warm-up: the tail
    owner = await _hand_over(old, new, 2)
    t = owner.takeover_timings
    assert t["warm_seq"] == 30 and t["batches"] == 4, t
    assert owner.state.seq == 34 and len(owner.state.wallets) == 34
    assert _count("used") == used + 1
    # Exactly the state a replay of the whole journal builds.
    assert codec.snapshot_dumps(owner.state) == await _full_replay(store, SHARD)
    await _wallets(new, 34, 1)  # and it serves


async def test_a_standby_survives_the_reconciles_between_the_release_and_the_takeover(store, pair):
    """Once the old owner lets go, the shard is no longer one to warm but one to campaign
    for (``keep``), and once won, a gain whose takeover has not run yet: a reconcile in
    either window must not drop the standby. (A kill-region drill's failback took the full
    load in every takeover before: the standby was dropped by the reconcile that campaigned.)"""
    old, new = pair
    await _wallets(old, 0, 8)
    await _warmed(new, {SHARD})
    await old.ownership.listener(SHARD, 0)
    assert new.warm_targets(set(), keep={SHARD}) == {SHARD}  # campaigning: kept
    await new.ownership.listener(SHARD, 2)  # won: its takeover is spawned
    new.warm_targets(set(), keep=set())  # the next reconcile lists it nowhere
    assert await new.wait_serving(1, timeout_s=NO_HANG_S)
    t = new.owners[SHARD].takeover_timings
    assert t["warm_seq"] == 8 and t["batches"] == 0, t


async def test_a_slow_warm_up_catches_up_with_what_was_appended_meanwhile(store, pair,
                                                                          monkeypatch):
    """A first load through a Cassandra node just back from a crash took 8-15 s, while the
    owner appended hundreds of batches: the warm-up reads those too (``load_after``), so
    the takeover's tail stays short."""
    monkeypatch.setattr(K, "WARM_CATCH_UP_BATCHES", 3)
    old, new = pair
    real_load = store.load
    appended = 0

    async def slow_load(shard: int):
        nonlocal appended
        loaded = await real_load(shard)
        await _wallets(old, 20, 10)  # appended while the load "took long"
        appended += 10
        return loaded

    await _wallets(old, 0, 20)
    monkeypatch.setattr(store, "load", slow_load)
    await _warmed(new, {SHARD})
    assert appended == 10 and new._warm[SHARD].state.seq == 30  # caught up
    monkeypatch.setattr(store, "load", real_load)
    owner = await _hand_over(old, new, 2)
    assert owner.takeover_timings["warm_seq"] == 30
    assert owner.takeover_timings["batches"] == 0
    assert codec.snapshot_dumps(owner.state) == await _full_replay(store, SHARD)


async def test_a_standby_follows_the_journal(store, pair, monkeypatch):
    """A failover standby (``placement``, "Failover standby") is kept for as long as its
    node is next in line: once its last read is WARM_FOLLOW_S old, only the batches appended
    since are read and folded onto it (no reload), and the takeover after the owner's crash
    replays nothing that was appended before the last follow."""
    old, new = pair
    await _wallets(old, 0, 10)
    await _warmed(new, {SHARD})
    await _wallets(old, 10, 5)
    loads: list[int] = []
    real_load = store.load

    async def counted_load(shard: int):
        loads.append(shard)
        return await real_load(shard)

    monkeypatch.setattr(store, "load", counted_load)
    monkeypatch.setattr(K, "WARM_FOLLOW_S", 0.0)
    followed = _count("followed")
    assert new.warm_targets({SHARD}) == {SHARD}  # ready while it follows
    await asyncio.wait_for(asyncio.gather(*new._warming.values()), NO_HANG_S)
    assert new._warm[SHARD].state.seq == 15 and not loads  # the tail only
    assert _count("followed") == followed + 1
    await _wallets(old, 15, 2)
    owner = await _hand_over(old, new, 2)
    t = owner.takeover_timings
    assert t["warm_seq"] == 15 and t["batches"] == 2, t
    assert codec.snapshot_dumps(owner.state) == await _full_replay(store, SHARD)


async def test_a_gain_during_a_follow_waits_for_it_and_takes_its_standby(store, pair,
                                                                          monkeypatch):
    """A follow runs about once per WARM_FOLLOW_S, so an owner's crash often comes while one
    is running: the takeover waits for it (at most WARM_FOLLOW_WAIT_S) and continues from
    what it folded. (Cancelled instead, 2 of 5 takeovers of a kill-owner drill loaded cold.)"""
    old, new = pair
    await _wallets(old, 0, 10)
    await _warmed(new, {SHARD})
    await _wallets(old, 10, 5)
    real_load_after = store.load_after
    gate = asyncio.Event()
    follows: list[int] = []

    async def held_load_after(shard, seq, basis):
        follows.append(seq)
        if len(follows) == 1:  # the follow's read; the takeover's own read passes
            await gate.wait()
        return await real_load_after(shard, seq, basis)

    monkeypatch.setattr(store, "load_after", held_load_after)
    monkeypatch.setattr(K, "WARM_FOLLOW_S", 0.0)
    new.warm_targets({SHARD})
    await asyncio.sleep(0)  # the follow starts and waits in its read
    await old.ownership.listener(SHARD, 0)
    await new.ownership.listener(SHARD, 2)
    await asyncio.sleep(0.05)
    gate.set()
    assert await new.wait_serving(1, timeout_s=NO_HANG_S)
    t = new.owners[SHARD].takeover_timings
    assert t["warm_seq"] == 15 and t["batches"] == 0, t
    assert codec.snapshot_dumps(new.owners[SHARD].state) == await _full_replay(store, SHARD)


async def test_a_standby_folds_only_batches_whose_rows_are_written(store, pair, monkeypatch):
    """On Cassandra rows are written behind the journal and the rows mark follows them
    (``LoadedShard.rows_seq``); a takeover uses a standby only if the mark reached it, and a
    crashed owner's mark lags its last second of batches. So a standby stops at the mark:
    what the mark had not reached yet is read again by the next follow."""
    old, new = pair
    await _wallets(old, 0, 10)
    real_load = store.load

    async def lagging_rows(shard: int):
        loaded = await real_load(shard)
        return dataclasses.replace(loaded, rows_seq=7)

    monkeypatch.setattr(store, "load", lagging_rows)
    await _warmed(new, {SHARD})
    assert new._warm[SHARD].state.seq == 7
    monkeypatch.setattr(store, "load", real_load)
    monkeypatch.setattr(K, "WARM_FOLLOW_S", 0.0)
    new.warm_targets({SHARD})  # SQLite's load_after answers the last batch as its mark
    await asyncio.wait_for(asyncio.gather(*new._warming.values()), NO_HANG_S)
    assert new._warm[SHARD].state.seq == 10


async def test_a_standby_whose_tail_a_snapshot_truncated_is_loaded_afresh(store, pair,
                                                                          monkeypatch):
    old, new = pair
    await _wallets(old, 0, 10)
    await _warmed(new, {SHARD})
    await _wallets(old, 10, 5)
    assert (await compaction.compact(store, SHARD, 12)).seq == 12
    monkeypatch.setattr(K, "WARM_FOLLOW_S", 0.0)
    new.warm_targets({SHARD})
    await asyncio.wait_for(asyncio.gather(*new._warming.values()), NO_HANG_S)
    assert new._warm[SHARD].state.seq == 15
    owner = await _hand_over(old, new, 2)
    assert owner.takeover_timings["warm_seq"] == 15
    assert codec.snapshot_dumps(owner.state) == await _full_replay(store, SHARD)


async def test_a_warm_standby_the_journal_no_longer_continues_is_discarded(store, pair):
    old, new = pair
    await _wallets(old, 0, 10)
    await _warmed(new, {SHARD})
    await _wallets(old, 10, 5)
    # A snapshot past the warm batch, and the journal it covers truncated.
    assert (await compaction.compact(store, SHARD, 12)).seq == 12
    discarded = _count("discarded")
    owner = await _hand_over(old, new, 2)
    t = owner.takeover_timings
    assert t["warm_seq"] == -1 and t["batches"] == 3, t  # loaded afresh: 13, 14, 15
    assert _count("discarded") == discarded + 1
    assert owner.state.seq == 15 and len(owner.state.wallets) == 15


async def test_a_standby_not_asked_for_any_more_or_too_old_is_not_used(store, pair, monkeypatch):
    old, new = pair
    await _wallets(old, 0, 5)
    await _warmed(new, {SHARD})
    assert new.warm_targets(set()) == set()  # the move was called off: dropped
    owner = await _hand_over(old, new, 2)
    assert "warm_seq" not in owner.takeover_timings
    assert owner.takeover_timings["batches"] == 5
    # Back to the first node, whose standby is older than WARM_KEEP_S by then.
    await _warmed(old, {SHARD})
    monkeypatch.setattr(K, "WARM_KEEP_S", 0.0)
    owner = await _hand_over(new, old, 3)
    assert "warm_seq" not in owner.takeover_timings
    assert owner.state.seq == 5


async def test_a_standby_is_not_ready_while_its_store_cannot_fence(store, pair, monkeypatch):
    """A store just back from a crash served plain reads before its Paxos reads: a standby
    is ready only once the reads a fence starts with succeed (``probe_fence``)."""
    from ledger.store.port import StoreUnavailable

    old, new = pair

    async def cannot(shard: int) -> None:
        raise StoreUnavailable("simulated: the SERIAL read timed out")

    await _wallets(old, 0, 3)
    failed = _count("failed")
    monkeypatch.setattr(store, "probe_fence", cannot)
    assert await _warmed(new, {SHARD}) == set()
    assert _count("failed") == failed + 1
    assert new.warm_targets({SHARD}) == set() and not new._warming  # retried later
    monkeypatch.undo()  # the store can fence again; and retry at once
    monkeypatch.setattr(K, "WARM_RETRY_S", 0.0)
    assert await _warmed(new, {SHARD}) == {SHARD}


async def test_a_node_warms_nothing_while_its_store_catches_up_and_says_so(store, pair,
                                                                          monkeypatch):
    """A region whose Cassandra still replays the hints of what it missed dropped most
    writes sent to it, and a failback onto it stopped every acknowledgement for 20 s
    (kill-region drill): its node warms nothing until the store has caught up, and tells
    its ownership (the owners then wait longer for it: ``catch_up_wait_s``)."""
    old, new = pair
    await _wallets(old, 0, 3)
    told: list[bool] = []

    async def tell(catching_up: bool) -> None:
        told.append(catching_up)

    behind: list[str | None] = ["r1 holds 3 hint file(s) for 127.0.0.2"]

    async def catching_up() -> str | None:
        return behind[0]

    new.ownership.set_catching_up = tell  # type: ignore[attr-defined]
    monkeypatch.setattr(store, "catching_up", catching_up, raising=False)
    waiting, failed = _count("waiting"), _count("failed")
    assert await _warmed(new, {SHARD}) == set()
    assert (_count("waiting"), _count("failed")) == (waiting + 1, failed)
    assert told == [True]
    behind[0] = None  # caught up: the next warm-up runs
    monkeypatch.setattr(K, "WARM_RETRY_S", 0.0)
    assert await _warmed(new, {SHARD}) == {SHARD}
    assert told == [True, False]


async def test_a_node_does_not_warm_a_shard_it_serves(store):
    node = Node(store, _ownership("a"))
    await node.start()
    try:
        await node.ownership.listener(SHARD, 1)
        assert await node.wait_serving(1, timeout_s=NO_HANG_S)
        assert node.warm_targets({SHARD}) == set() and not node._warming
    finally:
        await node.close()
