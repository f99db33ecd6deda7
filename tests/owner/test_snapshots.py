"""Issue 7, defect 6: snapshots are built from the durable journal, off the event loop, saved in
parts, their failures handled, and the journal they cover truncated.

Real ``ShardOwner``s and ``Coordinator`` over the real SQLite adapter (the contract suite
runs the store side on Cassandra too). Compaction thresholds are lowered per test so that a
few dozen batches trigger snapshots.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from coordinator import Coordinator, TransferItem
from ledger import constants as K
from ledger.runtime import failpoints
from ledger.compaction import compact
from ledger.core import codec
from ledger.core.model import Post, settlement_wallet_id
from ledger.reconcile import reconcile
from tests.owner.conftest import Ledger
from tests.owner.test_idempotency_claims import SHARDS, wallet_on


class GatedStore:
    """A real store whose next append of one batch waits at a door. The append itself is
    shielded: a cancelled caller does not cancel it, as a request already sent to Cassandra
    is not cancelled with the coroutine that awaits it."""

    def __init__(self, store) -> None:
        self._store = store
        self.gates: dict[int, tuple[asyncio.Event, asyncio.Event]] = {}
        self.landed: list[asyncio.Task] = []

    def gate(self, seq: int) -> tuple[asyncio.Event, asyncio.Event]:
        self.gates[seq] = (asyncio.Event(), asyncio.Event())
        return self.gates[seq]

    async def append(self, shard, epoch, seq, events, rows):
        gate = self.gates.pop(seq, None)
        if gate is None:
            return await self._store.append(shard, epoch, seq, events, rows)
        entered, release = gate

        async def late():
            entered.set()
            await release.wait()
            await self._store.append(shard, epoch, seq, events, rows)
        task = asyncio.ensure_future(late())
        self.landed.append(task)
        return await asyncio.shield(task)

    def __getattr__(self, name):
        return getattr(self._store, name)


@pytest.fixture
def small_snapshots(monkeypatch):
    """Snapshots due every 5 batches, whatever the state's size; quick retries."""
    monkeypatch.setattr(K, "SNAPSHOT_EVERY_BATCHES", 5)
    monkeypatch.setattr(K, "SNAPSHOT_EVENTS_PER_RECORD_MIN", 0)
    monkeypatch.setattr(K, "SNAPSHOT_RETRY_BACKOFF_S", 0.001)
    monkeypatch.setattr(K, "SNAPSHOT_RETRY_BACKOFF_MAX_S", 0.002)


def ledger_on(store) -> Ledger:
    led = Ledger(SHARDS)
    led.store = store
    return led


async def deposit(owner, wallet, amount, key):
    out = await owner.submit(Post("t", key, "dep-" + key, "DEPOSIT",
                                  settlement_wallet_id("CNY", owner.shard), wallet, amount,
                                  "CNY", "", owner.shard, 1_000))
    assert out.ok, out
    return out


async def compaction_done(owner) -> None:
    """Wait for the owner's running compaction (if any) to end."""
    task = owner._compactor._task
    if task is not None:
        await asyncio.wait([task])


async def test_a_stop_during_an_append_snapshots_nothing_that_is_not_durable(store):
    # The owner applies a batch to its state, then awaits the append. Stopping it then used
    # to snapshot that state at the previous batch number: when the append landed after all,
    # the next owner loaded the snapshot (already holding the batch) and replayed the batch
    # again - the deposit below was counted twice.
    gated = GatedStore(store)
    led = ledger_on(gated)
    owner = await led.start(0)
    wallet = wallet_on(0, "a")
    await led.wallet(0, wallet)
    await deposit(owner, wallet, 100, "first")
    entered, release = gated.gate(owner.state.seq + 1)
    pending = asyncio.ensure_future(owner.submit(Post(
        "t", "second", "dep-second", "DEPOSIT", settlement_wallet_id("CNY", 0), wallet, 50, "CNY",
        "", 0, 1_000)))
    await entered.wait()
    await owner.stop("stopped")          # a new epoch of this shard on this node
    release.set()
    await asyncio.gather(*gated.landed)  # the append lands after all
    assert (await pending).status.name == "SHARD_UNAVAILABLE"
    del led.peers.owners[0]
    again = await led.start(0, epoch=2)
    assert again.state.wallets[wallet].balance_minor == 150
    retried = await deposit(again, wallet, 50, "second")
    assert retried.replayed and again.state.wallets[wallet].balance_minor == 150
    await led.close()


async def test_the_owner_snapshots_the_durable_journal_and_truncates_it(store,
                                                                        small_snapshots):
    led = ledger_on(store)
    owner = await led.start(0)
    a, b = wallet_on(0, "a"), wallet_on(0, "b")
    await led.wallet(0, a, 10_000)
    await led.wallet(0, b)
    for i in range(23):
        out = await owner.submit(Post("t", f"k{i}", f"t{i}", "TRANSFER", a, b, 10 + i, "CNY", "",
                                      0, 1_000))
        assert out.ok, out
        await compaction_done(owner)
    head = owner.state.seq
    snapshot_seq, snapshot = await store.load_snapshot(0)
    assert 5 <= snapshot_seq <= head and owner._compactor.runs >= 3
    assert owner._compactor.failures == 0
    # The journal the snapshot covers is gone; what follows it is all there.
    assert [b.seq for b in await store.read_journal(0, 0, 10_000)] == list(
        range(snapshot_seq + 1, head + 1))
    # The snapshot holds exactly the state after its batch: the journal replayed to it.
    assert codec.snapshot_loads(snapshot).seq == snapshot_seq
    balances = dict(led.balances())
    await owner.stop("ownership lost")
    del led.peers.owners[0]
    again = await led.start(0, epoch=2)
    assert led.balances() == balances
    assert codec.snapshot_dumps(again.state) == codec.snapshot_dumps(owner.state)
    assert (await again.submit(Post("t", "k3", "t3", "TRANSFER", a, b, 13, "CNY", "", 0,
                                    1_000))).replayed
    await led.close()


async def test_a_failed_snapshot_is_retried_and_the_owner_keeps_serving(store, small_snapshots,
                                                                        caplog):
    led = ledger_on(store)
    owner = await led.start(0)
    a = wallet_on(0, "a")
    await led.wallet(0, a)
    failpoints.arm("store.snapshot_before_marker")  # the first save fails before its mark
    try:
        with caplog.at_level(logging.WARNING, logger="ledger.compaction"):
            for i in range(6):
                await deposit(owner, a, 1, f"d{i}")
            await compaction_done(owner)
    finally:
        failpoints.disarm()
    assert owner._compactor.failures == 1 and owner._compactor.runs == 2
    assert any("snapshot up to batch" in r.message and "retrying" in r.message
               for r in caplog.records)
    assert (await store.load_snapshot(0))[0] == owner._compactor.last.seq > 0
    assert owner.serving
    await deposit(owner, a, 1, "after")
    await led.close()


async def test_a_snapshot_that_keeps_failing_gives_up_and_loses_nothing(store, small_snapshots,
                                                                        caplog, monkeypatch):
    monkeypatch.setattr(K, "SNAPSHOT_RETRY_BACKOFF_MAX_S", 3600.0)  # the pause after giving up
    led = ledger_on(store)
    owner = await led.start(0)
    a = wallet_on(0, "a")
    await led.wallet(0, a)
    failpoints.arm("store.snapshot_before_marker@1+1000")
    try:
        with caplog.at_level(logging.WARNING, logger="ledger.compaction"):
            for i in range(6):
                await deposit(owner, a, 1, f"d{i}")
            await compaction_done(owner)
            # Due again at once, but inside the pause after giving up: nothing starts.
            await deposit(owner, a, 1, "more")
            assert not owner._compactor.running
    finally:
        failpoints.disarm()
    assert owner._compactor.runs == K.SNAPSHOT_ATTEMPTS_MAX
    assert any(r.levelno == logging.ERROR and "failed 4 times" in r.message
               for r in caplog.records)
    assert await store.load_snapshot(0) == (0, None)
    assert [b.seq for b in await store.read_journal(0, 0, 1000)] == list(
        range(1, owner.state.seq + 1))
    assert owner.serving and owner.state.wallets[a].balance_minor == 7
    await led.close()


async def test_one_compaction_at_a_time_per_shard(store, small_snapshots, monkeypatch):
    led = ledger_on(store)
    owner = await led.start(0)
    a = wallet_on(0, "a")
    await led.wallet(0, a)
    held, release = asyncio.Event(), asyncio.Event()
    real = store.load_snapshot

    async def slow_load_snapshot(shard):
        held.set()
        await release.wait()
        return await real(shard)
    monkeypatch.setattr(store, "load_snapshot", slow_load_snapshot)
    for i in range(5):
        await deposit(owner, a, 1, f"d{i}")
    await held.wait()
    for i in range(5, 20):  # due again and again while the first one is held
        await deposit(owner, a, 1, f"d{i}")
    assert owner._compactor.runs == 1
    release.set()
    await compaction_done(owner)
    assert owner._compactor.runs == 1 and owner._compactor.last.seq < owner.state.seq
    await led.close()


async def test_compaction_uses_only_the_durable_journal(store):
    # Built from the store, a snapshot cannot hold what the owner only has in memory; and a
    # batch number the journal does not hold yet is refused, not guessed.
    led = ledger_on(store)
    owner = await led.start(0)
    a = wallet_on(0, "a")
    await led.wallet(0, a)
    await deposit(owner, a, 5, "d")
    owner.state.wallets[a].balance_minor += 1_000   # memory only
    result = await compact(store, 0, owner.state.seq)
    assert result.saved
    assert codec.snapshot_loads((await store.load_snapshot(0))[1]).wallets[a].balance_minor == 5
    from ledger.compaction import CompactionError
    with pytest.raises(CompactionError):
        await compact(store, 0, owner.state.seq + 1)
    await led.close()


async def test_reconcile_after_truncation_is_clean_and_still_finds_a_forged_credit(
        store, small_snapshots):
    led = ledger_on(store)
    for shard in range(SHARDS):
        await led.start(shard)
    c = Coordinator(led.peers, led.store, SHARDS, clock_ms=lambda: led.now)
    wallets = [wallet_on(s, f"w{s}-") for s in range(SHARDS)]
    for w in wallets:
        assert (await c.create_wallet("svc", "c-" + w, w, "CNY")).ok
        assert (await c.deposit("svc", "d-" + w, w, 10_000, "CNY")).ok
    committed = len(wallets)  # the deposits
    for i in range(40):
        src, dst = wallets[i % SHARDS], wallets[(i * 3 + 1) % SHARDS]
        if src == dst:
            continue
        out = await c.transfer("svc", TransferItem(f"x{i}", src, dst, 1 + i, "CNY"))
        assert out.ok, out
        committed += 1
    for owner in led.peers.owners.values():
        await compaction_done(owner)
    truncated = [s for s in range(SHARDS) if (await store.load_snapshot(s))[0] > 0]
    assert len(truncated) == SHARDS, truncated
    report = await reconcile(store, SHARDS)
    assert report.clean, report.findings
    assert report.transfers_committed == committed
    assert report.snapshot_batches > 0 and report.totals == {"CNY": 0}
    await led.close()


async def test_reconcile_reads_again_when_a_compaction_truncates_during_its_read(
        store, small_snapshots, monkeypatch):
    led = ledger_on(store)
    owner = await led.start(0)
    a = wallet_on(0, "a")
    await led.wallet(0, a)
    for i in range(3):
        await deposit(owner, a, 1, f"d{i}")
    await owner.stop("ownership lost")
    real = store.read_journal
    raced = []

    async def read_journal_after_a_compaction(shard, after_seq=0, limit=1000):
        if shard == 0 and not raced:
            raced.append(after_seq)
            await compact(store, 0, 3)  # another owner's compaction, between the two reads
        return await real(shard, after_seq, limit)
    monkeypatch.setattr(store, "read_journal", read_journal_after_a_compaction)
    report = await reconcile(store, 1)
    assert raced == [0]
    assert report.clean, report.findings
    assert report.snapshot_batches == 3 and report.transfers_committed == 3


async def test_snapshots_are_built_at_background_priority():
    """The worker processes that build snapshots run ``COMPACTION_NICE`` nicer than the node:
    on a contended machine they must not take the CPU its keep-alives and event loop need
    (a kill-region drill at load: keep-alives 1.91 s apart at a 2 s lease while two
    snapshots were built at the node's own priority)."""
    import os

    from ledger import compaction

    mine = os.nice(0)
    worker = await asyncio.get_running_loop().run_in_executor(compaction._pool(), os.nice, 0)
    assert worker == min(19, mine + K.COMPACTION_NICE)
