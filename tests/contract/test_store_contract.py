"""The storage contract: every ``JournalStore`` adapter behaves the same (``ledger.store.port``).

Each test runs against every adapter (``sqlite``, and ``cassandra`` on a real cluster). Together
they prove that:

* fencing is exact: ``fence`` returns the last batch number, refuses a lower epoch, and after
  it a deposed writer can append nothing; a fence racing a writer that keeps appending
  reports exactly the last batch that writer got acknowledged;
* the journal is gap-free and single-writer: batches are numbered 1, 2, 3, ...; a stale epoch,
  a taken number or a gap is refused with ``Fenced`` and writes nothing (neither the batch nor
  its rows); of two writers racing for one number exactly one wins;
* ``load`` returns the newest snapshot and every batch after it, in order, across pages;
* materialized rows are readable after ``append``/``write_rows`` return, the last row of a key
  within one call wins, entries page in version order, and ``read_journal`` honours its limits.
"""

from __future__ import annotations

import asyncio

import pytest

from ledger.core.model import Entry, Transfer, Wallet
from ledger.store.port import Fenced, JournalBatch

pytestmark = pytest.mark.timeout(300)


def wallet(wallet_id: str, balance_minor: int = 0, version: int = 0, **kw) -> Wallet:
    return Wallet(wallet_id, "CNY", balance_minor=balance_minor, version=version, **kw)


def entry(wallet_id: str, version: int, amount_minor: int = 100) -> Entry:
    return Entry(wallet_id, version, f"t{version}", "TRANSFER", amount_minor,
                 amount_minor * version, "~settlement:CNY:0", "CNY", 1_700_000_000_000 + version)


def transfer(transfer_id: str, amount_minor: int = 100, **kw) -> Transfer:
    return Transfer(transfer_id, "TRANSFER", "alice", "bob", amount_minor, "CNY", "memo",
                    "caller", f"key-{transfer_id}", 1_700_000_000_000, **kw)


def events(shard: int, seq: int, writer: str = "w") -> bytes:
    # Opaque to the store; distinct per batch so that a mix-up shows.
    return f"{writer}:{shard}:{seq}".encode() * 8


async def append_run(store, shard: int, epoch: int, first: int, last: int) -> None:
    for seq in range(first, last + 1):
        await store.append(shard, epoch, seq, events(shard, seq), [])


async def journal(store, shard: int) -> list[tuple[int, int, bytes]]:
    return [(b.seq, b.epoch, b.events) for b in await store.read_journal(shard, 0, 100_000)]


# --- fencing --------------------------------------------------------------------------------


async def test_fence_of_a_new_shard_returns_zero_and_can_be_repeated(case):
    shard = case.shard()
    assert await case.store.fence(shard, 7) == 0
    assert await case.store.fence(shard, 7) == 0
    await case.store.append(shard, 7, 1, events(shard, 1), [])
    # Fencing again with the same epoch is harmless: the writer keeps its place.
    assert await case.store.fence(shard, 7) == 1
    await case.store.append(shard, 7, 2, events(shard, 2), [])


async def test_fence_returns_the_last_batch_number(case):
    shard = case.shard()
    await case.store.fence(shard, 1)
    await append_run(case.store, shard, 1, 1, 3)
    assert await case.store.fence(shard, 2) == 3
    await case.store.append(shard, 2, 4, events(shard, 4), [])
    assert await case.store.fence(shard, 9) == 4


async def test_fence_with_a_lower_epoch_is_refused_and_changes_nothing(case):
    shard = case.shard()
    await case.store.fence(shard, 5)
    await case.store.append(shard, 5, 1, events(shard, 1), [])
    with pytest.raises(Fenced):
        await case.store.fence(shard, 4)
    # Epoch 5 is still the writer.
    await case.store.append(shard, 5, 2, events(shard, 2), [])
    assert [b[0:2] for b in await journal(case.store, shard)] == [(1, 5), (2, 5)]


# --- appending ------------------------------------------------------------------------------


async def test_appends_in_order_are_read_back_in_order(case):
    shard = case.shard()
    await case.store.fence(shard, 3)
    await append_run(case.store, shard, 3, 1, 5)
    assert await journal(case.store, shard) == [(s, 3, events(shard, s)) for s in range(1, 6)]


async def test_append_before_any_fence_is_refused(case):
    shard = case.shard()
    with pytest.raises(Fenced):
        await case.store.append(shard, 1, 1, events(shard, 1), [])
    assert await journal(case.store, shard) == []


async def test_stale_epoch_after_a_newer_fence_writes_nothing(case):
    shard, tid, wid = case.shard(), case.id("t-stale"), case.id("w-stale")
    await case.store.fence(shard, 1)
    await case.store.append(shard, 1, 1, events(shard, 1), [])
    assert await case.store.fence(shard, 2) == 1
    with pytest.raises(Fenced):
        await case.store.append(shard, 1, 2, events(shard, 2, "old"),
                                [("transfer", transfer(tid)), ("wallet", wallet(wid, 5))])
    assert await journal(case.store, shard) == [(1, 1, events(shard, 1))]
    # The refused batch's rows were not written either (not even later).
    await case.store.flush_rows(shard, 2)
    assert await case.store.get_transfer(tid) is None
    assert await case.store.scan_wallets(shard) == []
    # The new writer continues where the journal is.
    await case.store.append(shard, 2, 2, events(shard, 2, "new"), [])
    assert [b[0:2] for b in await journal(case.store, shard)] == [(1, 1), (2, 2)]


async def test_a_taken_batch_number_is_refused(case):
    shard = case.shard()
    await case.store.fence(shard, 1)
    await append_run(case.store, shard, 1, 1, 2)
    with pytest.raises(Fenced):
        await case.store.append(shard, 1, 2, events(shard, 2, "again"), [])
    with pytest.raises(Fenced):
        await case.store.append(shard, 1, 1, events(shard, 1, "again"), [])
    assert await journal(case.store, shard) == [(s, 1, events(shard, s)) for s in (1, 2)]


async def test_a_gap_in_batch_numbers_is_refused(case):
    shard = case.shard()
    await case.store.fence(shard, 1)
    await case.store.append(shard, 1, 1, events(shard, 1), [])
    with pytest.raises(Fenced):
        await case.store.append(shard, 1, 3, events(shard, 3), [])
    assert [b[0] for b in await journal(case.store, shard)] == [1]


async def test_of_two_writers_racing_for_one_batch_number_exactly_one_wins(case):
    # Twenty shards, each with two writers of the same epoch (a split brain the fence cannot
    # see) appending the same number with different events, all at once.
    shards = [case.shard() for _ in range(20)]
    for shard in shards:
        await case.store.fence(shard, 1)
        await case.store.append(shard, 1, 1, events(shard, 1), [])

    async def attempt(shard: int, writer: str) -> str:
        try:
            await case.store.append(shard, 1, 2, events(shard, 2, writer), [])
            return writer
        except Fenced:
            return ""

    outcomes = await asyncio.gather(*(attempt(s, w) for s in shards for w in ("a", "b")))
    for i, shard in enumerate(shards):
        winners = [w for w in outcomes[2 * i:2 * i + 2] if w]
        assert len(winners) == 1, (shard, outcomes[2 * i:2 * i + 2])
        assert (await journal(case.store, shard))[1] == (2, 1, events(shard, 2, winners[0]))


async def test_a_fence_racing_appends_reports_exactly_what_the_journal_holds(case):
    # The deposed writer (epoch 1) keeps appending 2, 3, 4, ... while epoch 2 fences, so the
    # fence always lands in the middle of its run. The head the fence reports must be the
    # last batch the old writer got acknowledged: nothing acknowledged is lost to the new
    # owner, and nothing after the fence is accepted.
    shards = [case.shard() for _ in range(20)]
    for shard in shards:
        await case.store.fence(shard, 1)
        await case.store.append(shard, 1, 1, events(shard, 1), [])

    async def old_writer(shard: int) -> int:
        acknowledged = 1
        for seq in range(2, 1_000):
            try:
                await case.store.append(shard, 1, seq, events(shard, seq, "old"), [])
            except Fenced:
                break
            acknowledged = seq
        return acknowledged

    results = await asyncio.gather(*(asyncio.gather(old_writer(s), case.store.fence(s, 2))
                                     for s in shards))
    for shard, (acknowledged, head) in zip(shards, results):
        assert head == acknowledged, (shard, acknowledged, head)
        assert [b[0] for b in await journal(case.store, shard)] == list(range(1, head + 1))
        await case.store.append(shard, 2, head + 1, events(shard, head + 1, "new"), [])


# --- loading and snapshots ------------------------------------------------------------------


async def test_load_of_an_unknown_shard_is_empty(case):
    loaded = await case.store.load(case.shard())
    assert (loaded.snapshot, loaded.snapshot_seq, loaded.batches) == (None, 0, [])


async def test_load_returns_the_snapshot_and_the_batches_after_it_in_order(case):
    shard = case.shard()
    await case.store.fence(shard, 1)
    await append_run(case.store, shard, 1, 1, 5)
    loaded = await case.store.load(shard)
    assert (loaded.snapshot, loaded.snapshot_seq) == (None, 0)
    assert [b.seq for b in loaded.batches] == [1, 2, 3, 4, 5]

    await case.store.save_snapshot(shard, 3, b"state after 3")
    loaded = await case.store.load(shard)
    assert (loaded.snapshot, loaded.snapshot_seq) == (b"state after 3", 3)
    assert loaded.batches == [JournalBatch(s, 1, events(shard, s)) for s in (4, 5)]


async def test_a_newer_snapshot_replaces_the_older(case):
    shard = case.shard()
    await case.store.fence(shard, 1)
    await append_run(case.store, shard, 1, 1, 6)
    await case.store.save_snapshot(shard, 2, b"after 2")
    await case.store.save_snapshot(shard, 6, b"after 6")
    loaded = await case.store.load(shard)
    assert (loaded.snapshot, loaded.snapshot_seq, loaded.batches) == (b"after 6", 6, [])


async def test_load_reads_a_long_journal_in_order(case):
    # More batches than one page of any adapter's journal reads.
    shard = case.shard()
    await case.store.fence(shard, 1)
    await append_run(case.store, shard, 1, 1, 150)
    await case.store.save_snapshot(shard, 10, b"after 10")
    loaded = await case.store.load(shard)
    assert loaded.snapshot_seq == 10
    assert [b.seq for b in loaded.batches] == list(range(11, 151))
    assert all(b.events == events(shard, b.seq) for b in loaded.batches)


async def test_read_journal_honours_after_seq_and_limit(case):
    shard = case.shard()
    await case.store.fence(shard, 1)
    await append_run(case.store, shard, 1, 1, 7)
    assert [b.seq for b in await case.store.read_journal(shard, 0, 3)] == [1, 2, 3]
    assert [b.seq for b in await case.store.read_journal(shard, 3, 3)] == [4, 5, 6]
    assert [b.seq for b in await case.store.read_journal(shard, 6, 3)] == [7]
    assert await case.store.read_journal(shard, 7, 3) == []
    assert [b.seq for b in await case.store.read_journal(shard, 2)] == [3, 4, 5, 6, 7]


# --- materialized rows ----------------------------------------------------------------------


async def test_append_writes_its_rows_once_flushed(case):
    shard, wid, tid = case.shard(), case.id("w"), case.id("t")
    await case.store.fence(shard, 1)
    await case.store.append(shard, 1, 1, events(shard, 1), [
        ("wallet", wallet(wid, 100, 1)), ("entry", entry(wid, 1)), ("transfer", transfer(tid))])
    await case.store.flush_rows(shard, 1)
    assert await case.store.scan_wallets(shard) == [wallet(wid, 100, 1)]
    assert await case.store.list_entries(wid, 0, 10) == [entry(wid, 1)]
    assert await case.store.get_transfer(tid) == transfer(tid)


async def test_get_transfer_of_an_unknown_id_is_none(case):
    assert await case.store.get_transfer(case.id("nobody")) is None


async def test_the_last_row_of_a_key_within_one_call_wins(case):
    shard, wid, tid = case.shard(), case.id("w"), case.id("t")
    first_entry, last_entry = entry(wid, 1, 100), entry(wid, 1, 250)
    await case.store.write_rows(shard, [
        ("wallet", wallet(wid, 100, 1)), ("transfer", transfer(tid)),
        ("entry", first_entry),
        ("wallet", wallet(wid, 300, 2)),
        ("transfer", transfer(tid, state="COMMITTED", credited=True)),
        ("entry", last_entry),
        ("wallet", wallet(wid, 250, 3, held_minor=50, frozen=True)),
    ])
    assert await case.store.scan_wallets(shard) == [wallet(wid, 250, 3, held_minor=50,
                                                           frozen=True)]
    assert await case.store.get_transfer(tid) == transfer(tid, credited=True)
    assert await case.store.list_entries(wid, 0, 10) == [last_entry]


async def test_rows_are_upserts(case):
    shard, wid, tid = case.shard(), case.id("w"), case.id("t")
    await case.store.write_rows(shard, [("wallet", wallet(wid, 1, 1)), ("transfer", transfer(tid))])
    await case.store.write_rows(shard, [("wallet", wallet(wid, 2, 2, allow_negative=True)),
                                        ("transfer", transfer(tid, state="REFUSED", status=3,
                                                              status_field="amount_minor",
                                                              status_detail="too much"))])
    assert await case.store.scan_wallets(shard) == [wallet(wid, 2, 2, allow_negative=True)]
    assert await case.store.get_transfer(tid) == transfer(
        tid, state="REFUSED", status=3, status_field="amount_minor", status_detail="too much")


async def test_entries_page_in_version_order(case):
    shard, wid, other = case.shard(), case.id("w"), case.id("other")
    versions = list(range(1, 26))
    # Written out of order and split over calls: order comes from the version, not arrival.
    await case.store.write_rows(shard, [("entry", entry(wid, v)) for v in versions[::-2]])
    await case.store.write_rows(shard, [("entry", entry(wid, v)) for v in versions[-2::-2]]
                                + [("entry", entry(other, 1))])
    pages, after = [], 0
    while True:
        page = await case.store.list_entries(wid, after, 10)
        if not page:
            break
        pages.append([e.version for e in page])
        after = page[-1].version
    assert pages == [versions[0:10], versions[10:20], versions[20:25]]
    assert await case.store.list_entries(wid, 25, 10) == []
    assert await case.store.list_entries(wid, 3, 2) == [entry(wid, 4), entry(wid, 5)]
    assert await case.store.list_entries(case.id("nobody"), 0, 10) == []


async def test_scan_wallets_lists_exactly_the_wallets_of_one_shard(case):
    shard, neighbour = case.shard(), case.shard()
    mine = [wallet(case.id(f"w{i:03d}"), i, i) for i in range(30)]
    theirs = [wallet(case.id(f"x{i:03d}"), i, i) for i in range(5)]
    await case.store.write_rows(shard, [("wallet", w) for w in mine[:20]])
    await case.store.write_rows(neighbour, [("wallet", w) for w in theirs])
    await case.store.write_rows(shard, [("wallet", w) for w in mine[20:]])
    scanned = await case.store.scan_wallets(shard)
    assert sorted(scanned, key=lambda w: w.wallet_id) == mine
    assert sorted(await case.store.scan_wallets(neighbour), key=lambda w: w.wallet_id) == theirs
    assert await case.store.scan_wallets(case.shard()) == []


async def test_a_large_group_commit_writes_all_its_rows(case):
    # Enough rows that an adapter packing them into requests needs many of them.
    shard = case.shard()
    await case.store.fence(shard, 1)
    wallets = [wallet(case.id(f"w{i:04d}"), i, 1) for i in range(400)]
    transfers = [transfer(case.id(f"t{i:04d}"), i + 1) for i in range(400)]
    entries = [entry(w.wallet_id, 1, i + 1) for i, w in enumerate(wallets)]
    rows = ([("wallet", w) for w in wallets] + [("transfer", t) for t in transfers]
            + [("entry", e) for e in entries])
    await case.store.append(shard, 1, 1, events(shard, 1) * 1000, rows)
    await case.store.flush_rows(shard, 1)
    assert sorted(await case.store.scan_wallets(shard), key=lambda w: w.wallet_id) == wallets
    assert [await case.store.get_transfer(t.transfer_id) for t in transfers[::37]] \
        == transfers[::37]
    for e in entries[::41]:
        assert await case.store.list_entries(e.wallet_id, 0, 10) == [e]


# --- Cassandra only: outcomes of a CAS whose answer is lost ---------------------------------
#
# The faults are injected at the driver boundary of the adapter (the request really reaches
# the real cluster, or really does not); the cluster itself is never mocked.


def _inject(monkeypatch, store, *, lose_append_answer: bool = False,
            drop_append: bool = False, fail_serial_reads: bool = False) -> None:
    from cassandra import OperationTimedOut
    from cassandra.query import BatchStatement, BoundStatement

    real_start = store._start
    state = {"append_seen": False}

    def start(statement, params):
        is_append = (isinstance(statement, BatchStatement) and not state["append_seen"]
                     and not statement.is_idempotent)
        if is_append:
            state["append_seen"] = True
            if drop_append:
                async def dropped():
                    raise OperationTimedOut({"injected": "request never sent"})
                return asyncio.ensure_future(dropped())
            if lose_append_answer:
                applied = real_start(statement, params)

                async def lost():
                    await applied  # the CAS really completes on the cluster
                    raise OperationTimedOut({"injected": "answer lost"})
                return asyncio.ensure_future(lost())
        prepared = (statement.prepared_statement if isinstance(statement, BoundStatement)
                    else statement)
        if fail_serial_reads and prepared is store._q_batch_serial:
            async def failed():
                raise OperationTimedOut({"injected": "serial read timed out"})
            return asyncio.ensure_future(failed())
        return real_start(statement, params)

    monkeypatch.setattr(store, "_start", start)


@pytest.mark.real
async def test_cassandra_append_whose_answer_is_lost_is_resolved_as_applied(
        cassandra_store, fresh_shard, monkeypatch):
    store, shard = cassandra_store, fresh_shard
    await store.fence(shard, 1)
    _inject(monkeypatch, store, lose_append_answer=True)
    await store.append(shard, 1, 1, events(shard, 1), [("transfer", transfer(f"lost-{shard}"))])
    monkeypatch.undo()
    await store.flush_rows(shard, 1)
    assert await journal(store, shard) == [(1, 1, events(shard, 1))]
    assert await store.get_transfer(f"lost-{shard}") == transfer(f"lost-{shard}")


@pytest.mark.real
async def test_cassandra_append_that_never_ran_is_resolved_as_not_applied(
        cassandra_store, fresh_shard, monkeypatch):
    from ledger.store.port import StoreUnavailable

    store, shard = cassandra_store, fresh_shard
    await store.fence(shard, 1)
    _inject(monkeypatch, store, drop_append=True)
    with pytest.raises(StoreUnavailable):
        await store.append(shard, 1, 1, events(shard, 1), [])
    monkeypatch.undo()
    assert await journal(store, shard) == []
    await store.append(shard, 1, 1, events(shard, 1, "retry"), [])


@pytest.mark.real
async def test_cassandra_append_that_cannot_be_resolved_is_an_unknown_outcome(
        cassandra_store, fresh_shard, monkeypatch):
    from ledger.store.port import UnknownOutcome

    store, shard = cassandra_store, fresh_shard
    await store.fence(shard, 1)
    _inject(monkeypatch, store, lose_append_answer=True, fail_serial_reads=True)
    with pytest.raises(UnknownOutcome):
        await store.append(shard, 1, 1, events(shard, 1), [])
    monkeypatch.undo()
    # It had been applied: the next owner's load shows it.
    assert await store.fence(shard, 2) == 1
    assert [b.seq for b in (await store.load(shard)).batches] == [1]
