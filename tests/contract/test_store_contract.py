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
  a snapshot larger than one store write round-trips, counts only once complete, never
  replaces a newer one, and truncation drops exactly the batches a complete snapshot covers
  (the fencing state stays);
* materialized rows are readable after ``append``/``write_rows`` return, the last row of a key
  within one call wins, entries page in version order, and ``read_journal`` honours its limits;
* red envelope rows: the envelope of the newest position wins over a late older one, grabs are
  written once, and the envelope, grab, sent and received listings page in their order.
"""

from __future__ import annotations

import asyncio

import pytest

from ledger.core.model import Entry, Envelope, Grab, Transfer, Wallet
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


def envelope(envelope_id: str, sender: str, created_at_ms: int, **kw) -> Envelope:
    return Envelope(envelope_id, sender, "CNY", "LUCKY", 1_000, 4, 10, "", "happy new year",
                    (1 << 63) - 1, "caller", f"key-{envelope_id}", f"fund-{envelope_id}",
                    created_at_ms, created_at_ms + 86_400_000, **kw)


def grab(envelope_id: str, position: int, receiver: str, at_ms: int,
         amount_minor: int = 250) -> Grab:
    return Grab(envelope_id, position, receiver, amount_minor, f"grab-{envelope_id}-{position}",
                "caller", f"key-{envelope_id}-{position}", at_ms)


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


# --- snapshots in parts, completion marks, truncation -----------------------------------------


def big_snapshot(tag: str, size: int) -> bytes:
    """``size`` bytes that do not compress, distinct per tag (a mix-up of parts shows)."""
    import hashlib
    out, counter = bytearray(), 0
    while len(out) < size:
        out += hashlib.sha256(f"{tag}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


async def test_a_snapshot_larger_than_a_part_round_trips(case):
    from ledger.store.cassandra import SNAPSHOT_PART_BYTES
    shard = case.shard()
    await case.store.fence(shard, 1)
    await append_run(case.store, shard, 1, 1, 4)
    snapshot = big_snapshot(f"{shard}", 2 * SNAPSHOT_PART_BYTES + 12_345)  # three parts
    assert await case.store.save_snapshot(shard, 3, snapshot) is True
    assert await case.store.load_snapshot(shard) == (3, snapshot)
    loaded = await case.store.load(shard)
    assert (loaded.snapshot, loaded.snapshot_seq) == (snapshot, 3)
    assert [b.seq for b in loaded.batches] == [4]
    assert (await case.store.journal_position(shard))[2] == 3


async def test_a_snapshot_whose_save_fails_before_its_mark_is_ignored(case):
    from ledger.runtime import failpoints
    from ledger.store.cassandra import SNAPSHOT_PART_BYTES
    from ledger.store.port import StoreUnavailable
    shard = case.shard()
    await case.store.fence(shard, 1)
    await append_run(case.store, shard, 1, 1, 8)
    await case.store.save_snapshot(shard, 2, b"after 2")
    failpoints.arm("store.snapshot_before_marker")
    try:
        with pytest.raises(StoreUnavailable):
            await case.store.save_snapshot(shard, 6, big_snapshot("partial",
                                                                  SNAPSHOT_PART_BYTES + 1))
    finally:
        failpoints.disarm()
    assert await case.store.load_snapshot(shard) == (2, b"after 2")
    loaded = await case.store.load(shard)
    assert (loaded.snapshot, loaded.snapshot_seq) == (b"after 2", 2)
    assert [b.seq for b in loaded.batches] == [3, 4, 5, 6, 7, 8]
    # Nothing may be truncated on the strength of an incomplete snapshot.
    with pytest.raises(ValueError):
        await case.store.truncate_journal(shard, 6)
    assert [b.seq for b in await case.store.read_journal(shard, 0, 100)] == list(range(1, 9))
    # A later save of the same batch completes (and wins over the garbage parts).
    assert await case.store.save_snapshot(shard, 6, b"after 6") is True
    assert (await case.store.load(shard)).snapshot == b"after 6"


async def test_truncation_drops_exactly_the_batches_a_snapshot_covers(case):
    shard = case.shard()
    await case.store.fence(shard, 1)
    await append_run(case.store, shard, 1, 1, 10)
    await case.store.save_snapshot(shard, 6, b"after 6")
    await case.store.truncate_journal(shard, 6)
    await case.store.truncate_journal(shard, 6)  # idempotent
    assert await journal(case.store, shard) == [(s, 1, events(shard, s)) for s in (7, 8, 9, 10)]
    loaded = await case.store.load(shard)
    assert (loaded.snapshot, loaded.snapshot_seq) == (b"after 6", 6)
    assert loaded.batches == [JournalBatch(s, 1, events(shard, s)) for s in (7, 8, 9, 10)]
    # The fencing state survives: the head is still 10, appends go on from it, a stale epoch
    # is still refused.
    assert await case.store.fence(shard, 2) == 10
    assert await case.store.journal_position(shard) == (2, 10, 6)
    await case.store.append(shard, 2, 11, events(shard, 11), [])
    with pytest.raises(Fenced):
        await case.store.append(shard, 1, 12, events(shard, 12), [])
    assert [b.seq for b in (await case.store.load(shard)).batches] == [7, 8, 9, 10, 11]


async def test_a_journal_compacted_through_its_head_keeps_its_head(case):
    """A snapshot at the very head, then truncation of everything it covers (an idle shard
    compacted after its last append, or a planned hand-over): the next fence must still
    return that head. Before the fix the Cassandra journal found no row of the recorded
    epoch and answered the epoch's start (0 here), so every takeover failed with "journal
    head moved during takeover" and the shard was never served again."""
    shard = case.shard()
    await case.store.fence(shard, 1)
    await append_run(case.store, shard, 1, 1, 4)
    await case.store.save_snapshot(shard, 4, b"after 4")
    await case.store.truncate_journal(shard, 4)
    assert await journal(case.store, shard) == []
    assert await case.store.fence(shard, 2) == 4
    assert await case.store.journal_position(shard) == (2, 4, 4)
    loaded = await case.store.load(shard)
    assert (loaded.snapshot, loaded.snapshot_seq, loaded.batches) == (b"after 4", 4, [])
    await case.store.append(shard, 2, 5, events(shard, 5), [])
    # Compacted through the head again, under the new epoch, then fenced once more.
    await case.store.save_snapshot(shard, 5, b"after 5")
    await case.store.truncate_journal(shard, 5)
    assert await case.store.fence(shard, 3) == 5
    with pytest.raises(Fenced):
        await case.store.append(shard, 2, 6, events(shard, 6), [])
    await case.store.append(shard, 3, 6, events(shard, 6), [])
    assert [b.seq for b in (await case.store.load(shard)).batches] == [6]


async def test_load_after_continues_a_load_across_appends_and_a_newer_fence(case):
    """A warm standby (``ledger.node``) folded a load up to its last batch; its takeover
    reads only what followed (``load_after``): the same batches a full load would give
    after that point, whoever appended them, or None where it must load afresh."""
    shard = case.shard()
    await case.store.fence(shard, 1)
    await append_run(case.store, shard, 1, 1, 5)
    warm = await case.store.load(shard)
    await append_run(case.store, shard, 1, 6, 8)
    await case.store.flush_rows(shard, 8)
    tail = await case.store.load_after(shard, 5, warm.basis)
    assert (tail.snapshot, tail.snapshot_seq) == (None, 5)
    assert tail.batches == [JournalBatch(s, 1, events(shard, s)) for s in (6, 7, 8)]
    assert tail.rows_seq == 8  # every row of them is written (flushed, or in the append)
    # A newer fence at a head at or above the warm batch: the warm prefix still counts.
    assert await case.store.fence(shard, 2) == 8
    await case.store.append(shard, 2, 9, events(shard, 9), [])
    tail = await case.store.load_after(shard, 5, warm.basis)
    assert [(b.seq, b.epoch) for b in tail.batches] == [(6, 1), (7, 1), (8, 1), (9, 2)]
    full = await case.store.load(shard)
    assert full.batches[5:] == tail.batches
    assert (await case.store.load_after(shard, 9, tail.basis)).batches == []
    # A head below the warm batch, or batches after it truncated: load afresh.
    assert await case.store.load_after(shard, 10, tail.basis) is None
    await case.store.save_snapshot(shard, 7, b"after 7")
    await case.store.truncate_journal(shard, 7)
    assert await case.store.load_after(shard, 5, warm.basis) is None
    assert [b.seq for b in (await case.store.load_after(shard, 7, tail.basis)).batches] == [
        8, 9]


async def test_probe_fence_reads_and_changes_nothing(case):
    shard = case.shard()
    await case.store.probe_fence(shard)  # a shard never fenced
    await case.store.fence(shard, 1)
    await append_run(case.store, shard, 1, 1, 3)
    await case.store.probe_fence(shard)
    assert await case.store.journal_position(shard) == (1, 3, 0)
    await case.store.append(shard, 1, 4, events(shard, 4), [])  # the owner appends on


async def test_load_after_refuses_a_fold_a_newer_run_cuts_into(case):
    """Cassandra: a fence whose head read was below a batch the warm load had folded (a
    deposed owner's unacknowledged write) starts a run there; that batch no longer counts,
    so the warm fold is not a prefix of the journal any more. The basis says so."""
    shard = case.shard()
    await case.store.fence(shard, 1)
    await append_run(case.store, shard, 1, 1, 4)
    await case.store.fence(shard, 2)
    await append_run(case.store, shard, 2, 5, 6)
    now = (await case.store.load(shard)).basis
    if case.adapter == "sqlite":
        assert now == ()  # every stored batch counts: a run never cuts into one
        return
    assert dict(now) == {1: 0, 2: 4}
    # A fold of epoch 1's rows up to batch 5 (the basis it was read under had no epoch 2).
    assert await case.store.load_after(shard, 5, ((1, 0),)) is None
    # A fold up to batch 4 is a prefix under both bases.
    tail = await case.store.load_after(shard, 4, ((1, 0),))
    assert [(b.seq, b.epoch) for b in tail.batches] == [(5, 2), (6, 2)]


async def test_truncation_past_the_latest_snapshot_is_refused(case):
    shard = case.shard()
    await case.store.fence(shard, 1)
    await append_run(case.store, shard, 1, 1, 5)
    with pytest.raises(ValueError):
        await case.store.truncate_journal(shard, 1)  # no snapshot at all
    await case.store.save_snapshot(shard, 3, b"after 3")
    with pytest.raises(ValueError):
        await case.store.truncate_journal(shard, 4)
    assert [b.seq for b in await case.store.read_journal(shard, 0, 100)] == [1, 2, 3, 4, 5]
    await case.store.truncate_journal(shard, 2)  # below the snapshot: allowed
    assert [b.seq for b in await case.store.read_journal(shard, 0, 100)] == [3, 4, 5]


async def test_a_late_snapshot_of_a_lower_batch_does_not_replace_a_newer_one(case):
    # A deposed owner's compaction may finish after the new owner's: its snapshot is older.
    shard = case.shard()
    await case.store.fence(shard, 1)
    await append_run(case.store, shard, 1, 1, 9)
    assert await case.store.save_snapshot(shard, 7, b"after 7") is True
    await case.store.truncate_journal(shard, 7)
    assert await case.store.save_snapshot(shard, 4, b"after 4") is False
    assert await case.store.save_snapshot(shard, 7, b"after 7 again") is False
    await case.store.truncate_journal(shard, 4)  # covered by the newer one: a no-op
    loaded = await case.store.load(shard)
    assert (loaded.snapshot, loaded.snapshot_seq) == (b"after 7", 7)
    assert [b.seq for b in loaded.batches] == [8, 9]
    assert await case.store.load_snapshot(shard) == (7, b"after 7")


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
    ], seq=1)
    assert await case.store.scan_wallets(shard) == [wallet(wid, 250, 3, held_minor=50,
                                                           frozen=True)]
    assert await case.store.get_transfer(tid) == transfer(tid, credited=True)
    assert await case.store.list_entries(wid, 0, 10) == [last_entry]


async def test_rows_are_upserts(case):
    shard, wid, tid = case.shard(), case.id("w"), case.id("t")
    await case.store.write_rows(shard, [("wallet", wallet(wid, 1, 1)), ("transfer", transfer(tid))],
                                seq=1)
    await case.store.write_rows(shard, [("wallet", wallet(wid, 2, 2, allow_negative=True)),
                                        ("transfer", transfer(tid, state="REFUSED", status=3,
                                                              status_field="amount_minor",
                                                              status_detail="too much"))],
                                seq=2)
    assert await case.store.scan_wallets(shard) == [wallet(wid, 2, 2, allow_negative=True)]
    assert await case.store.get_transfer(tid) == transfer(
        tid, state="REFUSED", status=3, status_field="amount_minor", status_detail="too much")


async def test_entries_page_in_version_order(case):
    shard, wid, other = case.shard(), case.id("w"), case.id("other")
    versions = list(range(1, 26))
    # Written out of order and split over calls: order comes from the version, not arrival.
    await case.store.write_rows(shard, [("entry", entry(wid, v)) for v in versions[::-2]],
                                seq=1)
    await case.store.write_rows(shard, [("entry", entry(wid, v)) for v in versions[-2::-2]]
                                + [("entry", entry(other, 1))], seq=2)
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
    await case.store.write_rows(shard, [("wallet", w) for w in mine[:20]], seq=1)
    await case.store.write_rows(neighbour, [("wallet", w) for w in theirs], seq=1)
    await case.store.write_rows(shard, [("wallet", w) for w in mine[20:]], seq=2)
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


async def test_a_late_write_of_an_older_batch_never_replaces_newer_rows(case):
    # Defect 9: a deposed owner (epoch 1) got batch 1 acknowledged; the new owner (epoch 2)
    # appended batch 2, which changed the same wallet and transfer. The deposed owner's rows
    # of batch 1 then arrive late (its row writer, or its replay): the views must keep the
    # rows of batch 2, whatever order the writes arrive in.
    shard, wid, tid = case.shard(), case.id("w"), case.id("t")
    old_rows = [("wallet", wallet(wid, 100, 1)), ("entry", entry(wid, 1, 100)),
                ("transfer", transfer(tid, state="PENDING"))]
    new_rows = [("wallet", wallet(wid, 70, 2, held_minor=20)), ("entry", entry(wid, 2, -30)),
                ("transfer", transfer(tid, state="COMMITTED", credited=True))]
    await case.store.fence(shard, 1)
    await case.store.append(shard, 1, 1, events(shard, 1), old_rows)
    await case.store.flush_rows(shard, 1)
    await case.store.fence(shard, 2)
    await case.store.append(shard, 2, 2, events(shard, 2), new_rows)
    await case.store.flush_rows(shard, 2)
    # Late: the older batch again, as rows with a position argument and as positioned rows.
    await case.store.write_rows(shard, old_rows, seq=1)
    await case.store.write_rows(shard, [(kind, value, 1) for kind, value in old_rows])
    assert await case.store.scan_wallets(shard) == [wallet(wid, 70, 2, held_minor=20)]
    assert await case.store.get_transfer(tid) == transfer(tid, state="COMMITTED", credited=True)
    assert await case.store.list_entries(wid, 0, 10) == [entry(wid, 1, 100),
                                                          entry(wid, 2, -30)]
    # A replay of both batches (rows as of batch 2) changes nothing either.
    await case.store.write_rows(shard, old_rows + new_rows, seq=2)
    assert await case.store.scan_wallets(shard) == [wallet(wid, 70, 2, held_minor=20)]
    assert await case.store.get_transfer(tid) == transfer(tid, state="COMMITTED", credited=True)


async def test_write_rows_needs_a_position(case):
    with pytest.raises(ValueError, match="journal position"):
        await case.store.write_rows(case.shard(), [("wallet", wallet(case.id("w"), 1, 1))])


async def test_envelope_rows_of_an_older_position_never_replace_newer_ones(case):
    # Batch 3 opened the envelope; batch 5 funded it and took two grabs. The rows of batch 3
    # then arrive again late (a deposed owner's row writer, a replay): batch 5's stay.
    shard, sender, eid = case.shard(), case.id("sender"), case.id("env")
    opened = envelope(eid, sender, 1_700_000_000_000)
    funded = envelope(eid, sender, 1_700_000_000_000, funded_at_ms=1_700_000_000_005,
                      left_minor=500, left_shares=2, closed_at_ms=0)
    grabs = [grab(eid, 0, case.id("r0"), 1_700_000_000_010, 300),
             grab(eid, 1, case.id("r1"), 1_700_000_000_020, 200)]
    await case.store.fence(shard, 1)
    await append_run(case.store, shard, 1, 1, 2)
    await case.store.append(shard, 1, 3, events(shard, 3), [("envelope", opened)])
    await case.store.append(shard, 1, 4, events(shard, 4), [])
    await case.store.append(shard, 1, 5, events(shard, 5),
                            [("envelope", funded)] + [("grab", g) for g in grabs])
    await case.store.flush_rows(shard, 5)
    assert await case.store.get_envelope(eid) == funded
    await case.store.fence(shard, 2)
    await case.store.write_rows(shard, [("envelope", opened)], seq=3)
    await case.store.write_rows(shard, [("envelope", opened, 3)])
    assert await case.store.get_envelope(eid) == funded
    assert await case.store.list_envelopes_sent(sender, None, 10) == [funded]
    # A replay of batch 5 (rows as of 5) writes the same grabs again: still one of each.
    await case.store.write_rows(shard, [("envelope", funded)] + [("grab", g) for g in grabs],
                                seq=5)
    assert await case.store.get_envelope(eid) == funded
    assert await case.store.list_grabs(eid, -1, 10) == grabs
    assert await case.store.list_grabs_received(case.id("r0"), None, 10) == [grabs[0]]
    assert await case.store.get_envelope(case.id("nobody")) is None


async def test_envelope_and_grab_listings_page_in_their_order(case):
    shard, sender, other = case.shard(), case.id("sender"), case.id("other-sender")
    receiver = case.id("receiver")
    t0 = 1_700_000_000_000
    # Five envelopes of one sender: two created in the same millisecond (ordered by id), one
    # of another sender in between; rows written out of order over two batches.
    mine = [envelope(case.id("e0"), sender, t0),
            envelope(case.id("e1a"), sender, t0 + 10),
            envelope(case.id("e1b"), sender, t0 + 10),
            envelope(case.id("e2"), sender, t0 + 20, funded_at_ms=t0 + 21, left_minor=1_000,
                     left_shares=4),
            envelope(case.id("e3"), sender, t0 + 30)]
    theirs = envelope(case.id("e9"), other, t0 + 15)
    big = mine[3].envelope_id
    # Grabs: five of one envelope (positions 0..4, written out of order); the receiver's
    # grabs of four envelopes, two of them in the same millisecond (ordered by envelope id).
    of_big = [grab(big, p, case.id(f"r{p}"), t0 + 100 + p) for p in range(5)]
    received = [grab(mine[0].envelope_id, 0, receiver, t0 + 50),
                grab(mine[1].envelope_id, 2, receiver, t0 + 60),
                grab(mine[2].envelope_id, 1, receiver, t0 + 60),
                grab(theirs.envelope_id, 3, receiver, t0 + 70)]
    await case.store.fence(shard, 1)
    await case.store.append(shard, 1, 1, events(shard, 1),
                            [("envelope", e) for e in (mine[4], theirs, mine[1])]
                            + [("grab", g) for g in of_big[::2] + received[2:]])
    await case.store.append(shard, 1, 2, events(shard, 2),
                            [("envelope", e) for e in (mine[2], mine[0], mine[3])]
                            + [("grab", g) for g in of_big[1::2] + received[:2]])
    await case.store.flush_rows(shard, 2)

    async def sent_pages(wallet_id: str, size: int) -> list[list[str]]:
        pages: list[list[str]] = []
        after: tuple[int, str] | None = None
        while True:
            page = await case.store.list_envelopes_sent(wallet_id, after, size)
            assert len(page) <= size
            if not page:
                return pages
            pages.append([e.envelope_id for e in page])
            after = (page[-1].created_at_ms, page[-1].envelope_id)

    ids = [e.envelope_id for e in mine]
    assert await sent_pages(sender, 2) == [ids[0:2], ids[2:4], ids[4:5]]
    assert await sent_pages(sender, 5) == [ids]
    assert await case.store.list_envelopes_sent(sender, None, 10) == mine
    assert await case.store.list_envelopes_sent(sender, (t0 + 10, ids[1]), 2) == mine[2:4]
    assert await case.store.list_envelopes_sent(sender, (t0 + 10, ids[2]), 10) == mine[3:]
    assert await case.store.list_envelopes_sent(sender, (t0 + 30, ids[4]), 10) == []
    assert await case.store.list_envelopes_sent(other, None, 10) == [theirs]
    assert await case.store.list_envelopes_sent(case.id("nobody"), None, 10) == []

    assert await case.store.list_grabs(big, -1, 2) == of_big[0:2]
    assert await case.store.list_grabs(big, 1, 2) == of_big[2:4]
    assert await case.store.list_grabs(big, 3, 2) == of_big[4:5]
    assert await case.store.list_grabs(big, 4, 2) == []
    assert await case.store.list_grabs(big, -1, 100) == of_big
    assert await case.store.list_grabs(big, 0, 3) == of_big[1:4]
    assert await case.store.list_grabs(ids[4], -1, 10) == []

    pages: list[list[Grab]] = []
    after: tuple[int, str] | None = None
    while True:
        page = await case.store.list_grabs_received(receiver, after, 3)
        if not page:
            break
        pages.append(page)
        after = (page[-1].at_ms, page[-1].envelope_id)
    assert pages == [received[0:3], received[3:4]]
    assert await case.store.list_grabs_received(receiver, (t0 + 60, ids[1]), 10) \
        == received[2:]
    assert await case.store.list_grabs_received(receiver, (t0 + 50, ids[0]), 2) \
        == received[1:3]
    assert await case.store.list_grabs_received(case.id("r3"), None, 10) == [of_big[3]]
    assert await case.store.list_grabs_received(case.id("nobody"), None, 10) == []


# --- Cassandra only: outcomes of a CAS whose answer is lost ---------------------------------
#
# The faults are injected at the driver boundary of the adapter (the request really reaches
# the real cluster, or really does not); the cluster itself is never mocked.


def _inject(monkeypatch, store, *, lose_append_answers: int = 0,
            drop_appends: int = 0) -> None:
    """Lose the answers of the first ``lose_append_answers`` sends of journal rows (the write
    really reaches the cluster), or keep the first ``drop_appends`` from being sent at all."""
    from cassandra import OperationTimedOut
    from cassandra.cluster import NoHostAvailable
    from cassandra.connection import ConnectionException
    from cassandra.query import BoundStatement

    # The driver bridge's ``start`` is where every statement leaves the adapter.
    driver = store._driver
    real_start = driver.start
    state = {"lost": 0, "dropped": 0}

    def start(statement, params):
        is_append = (isinstance(statement, BoundStatement)
                     and statement.prepared_statement is store._journal._q_append)
        if is_append and state["dropped"] < drop_appends:
            state["dropped"] += 1

            async def dropped():
                raise NoHostAvailable("injected: request never sent",
                                      {"127.0.0.1": ConnectionException("injected")})
            return asyncio.ensure_future(dropped())
        if is_append and state["lost"] < lose_append_answers:
            state["lost"] += 1
            applied = real_start(statement, params)

            async def lost():
                await applied  # the write really completes on the cluster
                raise OperationTimedOut({"injected": "answer lost"})
            return asyncio.ensure_future(lost())
        return real_start(statement, params)

    monkeypatch.setattr(driver, "start", start)


@pytest.mark.real
async def test_cassandra_append_whose_answer_is_lost_is_sent_again_and_acknowledged(
        cassandra_store, fresh_shard, monkeypatch):
    # The journal row is a plain write keyed by (shard, seq, epoch): sending it again after a
    # lost answer rewrites the same cells, so the append settles by a resend.
    store, shard = cassandra_store, fresh_shard
    await store.fence(shard, 1)
    _inject(monkeypatch, store, lose_append_answers=1)
    await store.append(shard, 1, 1, events(shard, 1), [("transfer", transfer(f"lost-{shard}"))])
    monkeypatch.undo()
    await store.flush_rows(shard, 1)
    assert await journal(store, shard) == [(1, 1, events(shard, 1))]
    assert await store.get_transfer(f"lost-{shard}") == transfer(f"lost-{shard}")


@pytest.mark.real
async def test_cassandra_append_that_never_ran_is_not_applied(
        cassandra_store, fresh_shard, monkeypatch):
    from ledger.store.cassandra.constants import APPEND_SENDS_MAX
    from ledger.store.port import StoreUnavailable

    store, shard = cassandra_store, fresh_shard
    await store.fence(shard, 1)
    _inject(monkeypatch, store, drop_appends=APPEND_SENDS_MAX)
    with pytest.raises(StoreUnavailable):
        await store.append(shard, 1, 1, events(shard, 1), [])
    monkeypatch.undo()
    assert await journal(store, shard) == []
    await store.append(shard, 1, 1, events(shard, 1, "retry"), [])
    assert await journal(store, shard) == [(1, 1, events(shard, 1, "retry"))]


@pytest.mark.real
async def test_cassandra_append_whose_every_answer_is_lost_is_an_unknown_outcome(
        cassandra_store, fresh_shard, monkeypatch):
    from ledger.store.cassandra.constants import APPEND_SENDS_MAX
    from ledger.store.port import UnknownOutcome

    store, shard = cassandra_store, fresh_shard
    await store.fence(shard, 1)
    _inject(monkeypatch, store, lose_append_answers=APPEND_SENDS_MAX)
    with pytest.raises(UnknownOutcome):
        await store.append(shard, 1, 1, events(shard, 1), [])
    monkeypatch.undo()
    # The writer takes no further batch until fenced again.
    with pytest.raises(Fenced):
        await store.append(shard, 1, 2, events(shard, 2), [])
    # It had been applied: the next owner's head read counts it, and its load shows it.
    assert await store.fence(shard, 2) == 1
    assert [b.seq for b in (await store.load(shard)).batches] == [1]


# --- Cassandra only: snapshots above the mutation limit, parts without a mark, load races ---


@pytest.mark.real
async def test_cassandra_snapshot_above_the_mutation_limit_round_trips(cassandra_store,
                                                                      fresh_shard):
    # One cell of 16 MiB or more is refused by Cassandra (max_mutation_size: half the 32 MiB
    # commit log segment); parts keep every write far below it.
    store, shard = cassandra_store, fresh_shard
    await store.fence(shard, 1)
    await append_run(store, shard, 1, 1, 3)
    snapshot = big_snapshot(f"huge-{shard}", 20 * 1024 * 1024)
    assert await store.save_snapshot(shard, 2, snapshot) is True
    assert await store.load_snapshot(shard) == (2, snapshot)


@pytest.mark.real
async def test_cassandra_parts_without_their_mark_exist_and_are_not_loaded(cassandra_store,
                                                                          fresh_shard):
    from ledger.runtime import failpoints
    from ledger.store.cassandra import SNAPSHOT_PART_BYTES
    from ledger.store.port import StoreUnavailable

    store, shard = cassandra_store, fresh_shard
    await store.fence(shard, 1)
    await append_run(store, shard, 1, 1, 4)
    failpoints.arm("store.snapshot_before_marker")
    try:
        with pytest.raises(StoreUnavailable):
            await store.save_snapshot(shard, 3, big_snapshot("orphan", 2 * SNAPSHOT_PART_BYTES))
    finally:
        failpoints.disarm()
    parts = await store._driver.read(store._session.prepare(
        f"SELECT part FROM {store._keyspace}.snapshot_parts WHERE shard = ?"), (shard,))
    assert sorted(r["part"] for r in parts) == [0, 1]  # the parts are there...
    assert await store.load_snapshot(shard) == (0, None)  # ...but count for nothing
    assert [b.seq for b in (await store.load(shard)).batches] == [1, 2, 3, 4]
    # The next complete snapshot drops the orphaned parts with its range delete.
    await store.save_snapshot(shard, 4, b"after 4")
    parts = await store._driver.read(store._session.prepare(
        f"SELECT seq, part FROM {store._keyspace}.snapshot_parts WHERE shard = ?"), (shard,))
    assert [(r["seq"], r["part"]) for r in parts] == [(4, 0)]


@pytest.mark.real
async def test_cassandra_load_racing_a_compaction_starts_again_from_the_newer_snapshot(
        cassandra_store, fresh_shard, monkeypatch):
    # Another owner's compaction saves a snapshot and truncates the journal between this
    # load's snapshot read and its journal read: the load must not fail or miss batches.
    store, shard = cassandra_store, fresh_shard
    await store.fence(shard, 1)
    await append_run(store, shard, 1, 1, 9)
    await store.save_snapshot(shard, 3, b"after 3")
    # ``load`` reads the snapshot through the journal part's own ``load_snapshot``.
    real_load_snapshot = store._journal.load_snapshot
    raced = []

    async def load_snapshot_then_compaction(s):
        result = await real_load_snapshot(s)
        if not raced:
            raced.append(result)
            await store.save_snapshot(shard, 7, b"after 7")
            await store.truncate_journal(shard, 7)
        return result

    monkeypatch.setattr(store._journal, "load_snapshot", load_snapshot_then_compaction)
    loaded = await store.load(shard)
    monkeypatch.undo()
    assert raced == [(3, b"after 3")]
    assert (loaded.snapshot, loaded.snapshot_seq) == (b"after 7", 7)
    assert [b.seq for b in loaded.batches] == [8, 9]


@pytest.mark.real
async def test_cassandra_keyspace_made_before_envelopes_gets_their_tables(local_cluster):
    # A keyspace an older build created (every table but the envelope ones) gets the new
    # tables at the next connect that creates the schema (CREATE TABLE IF NOT EXISTS), and
    # keeps its rows.
    import uuid

    from clients.localcluster import cql_query
    from ledger.store.cassandra import CassandraStore
    from ledger.store.cassandra.schema import schema_ddl

    host, port = local_cluster.contact_points["r1"], local_cluster.cql_port
    keyspace = f"contract_old_{uuid.uuid4().hex[:8]}"
    new_tables = ("envelopes", "envelopes_by_sender", "grabs", "grabs_by_receiver")
    old_ddl = [ddl for ddl in schema_ddl(keyspace, {"r1": 1})
               if not any(f"{keyspace}.{t} (" in ddl for t in new_tables)]
    assert len(old_ddl) == len(schema_ddl(keyspace, {"r1": 1})) - len(new_tables)

    def tables() -> set[str]:
        return {r[0] for r in cql_query(
            host, port, "SELECT table_name FROM system_schema.tables WHERE keyspace_name = "
            f"'{keyspace}'", 60.0)}

    try:
        for ddl in old_ddl:
            await asyncio.to_thread(cql_query, host, port, ddl, 60.0)
        before = await asyncio.to_thread(tables)
        assert "transfers" in before and not before & set(new_tables)
        store = await CassandraStore.connect([host], port, local_dc="r1", keyspace=keyspace,
                                             require_region_survival=False)
        try:
            assert set(new_tables) <= await asyncio.to_thread(tables)
            e = envelope("e-old-ks", "s-old-ks", 1_700_000_000_000)
            g = grab("e-old-ks", 0, "r-old-ks", 1_700_000_000_001)
            await store.write_rows(1, [("envelope", e), ("grab", g)], seq=1)
            assert await store.get_envelope("e-old-ks") == e
            assert await store.list_envelopes_sent("s-old-ks", None, 10) == [e]
            assert await store.list_grabs("e-old-ks", -1, 10) == [g]
            assert await store.list_grabs_received("r-old-ks", None, 10) == [g]
        finally:
            await store.close()
    finally:
        await asyncio.to_thread(cql_query, host, port, f"DROP KEYSPACE IF EXISTS {keyspace}",
                                60.0)


# --- key rows (idempotency records that left owner memory) ----------------------------------


async def test_key_rows_of_an_append_are_loaded_by_key_with_their_transfer(case):
    """Key records (captures) and claims are rows of the batch that made them: ``load_keys``
    reads them back per (caller, key) with the transfer row a record names; a key without a
    record row gets the transfer row of the id given for it; absent keys read None."""
    from ledger.core.model import IdempotencyRecord

    shard = case.shard()
    await case.store.fence(shard, 1)
    t = Transfer(f"t{shard:04x}" + "a" * 24, "HOLD_CAPTURE", "wa", "wb", 5, "CNY", "m", "c1",
                 "k1", 1_000, state="COMMITTED")
    record = IdempotencyRecord("c1", "k1", "transfer:" + t.transfer_id,
                               (("hold_id", "h1"), ("amount_minor", 5)), 1_000)
    claim = IdempotencyRecord("c1", "k2", "transfer:tother", (("amount_minor", 7),), 1_001)
    plain = Transfer(f"t{shard:04x}" + "b" * 24, "TRANSFER", "wa", "wb", 9, "CNY", "", "c1",
                     "k4", 1_002, state="REFUSED", status=40)
    await case.store.append(shard, 1, 1, events(shard, 1), [
        ("transfer", t), ("idem", record), ("claim", claim), ("transfer", plain)])
    await case.store.flush_rows(shard, 1)
    found = await case.store.load_keys(shard, {
        ("c1", "k1"): "", ("c1", "k2"): "", ("c1", "k3"): "", ("c1", "k4"): plain.transfer_id})
    got_record, got_claim, got_transfer = found[("c1", "k1")]
    assert got_record == record and got_claim is None
    assert got_transfer is not None and got_transfer.transfer_id == t.transfer_id
    assert got_transfer.state == "COMMITTED" and got_transfer.amount_minor == 5
    assert found[("c1", "k2")] == (None, claim, None)
    assert found[("c1", "k3")] == (None, None, None)
    record4, claim4, transfer4 = found[("c1", "k4")]
    assert record4 is None and claim4 is None
    assert transfer4 is not None and (transfer4.state, transfer4.status) == ("REFUSED", 40)
    # Another shard's key rows are not this shard's.
    assert (await case.store.load_keys(case.shard(), {("c1", "k1"): ""}))[("c1", "k1")] == (
        None, None, None)


# --- audit rows (ledger.core.audit) ---------------------------------------------------------


async def test_audit_rows_page_in_order_across_empty_buckets_and_outlive_truncation(
        case, monkeypatch):
    # Cassandra partitions audit rows by buckets of batch numbers; 4 per bucket here, so
    # that batches 8-11 (no audit row) leave a whole bucket empty, which a reader must step
    # over. SQLite has no buckets: the same reads hold.
    from ledger.core import audit
    from ledger.core.model import WalletCreated
    from ledger.core.shard import ShardState
    monkeypatch.setattr("ledger.store.cassandra.views.AUDIT_BUCKET_BATCHES", 4,
                        raising=False)
    shard = case.shard()
    await case.store.fence(shard, 1)
    state = ShardState(shard)
    written = []
    for seq in range(1, 13):
        rows: list = []
        if seq in (1, 2, 3, 6, 12):
            row = audit.chain(state, seq, 1, [WalletCreated(case.id(f"w{seq}"), "CNY", False,
                                                            seq, "svc", f"k{seq}")])
            written.append(row)
            rows.append(("audit", row))
        await case.store.append(shard, 1, seq, events(shard, seq), rows)
    await case.store.flush_rows(shard, 12)
    assert await case.store.read_audit(shard, 0, 100) == written
    pages, after = [], 0
    while True:
        page = await case.store.read_audit(shard, after, 2)
        pages.append([r.seq for r in page])
        if len(page) < 2:
            break
        after = page[-1].seq
    assert pages == [[1, 2], [3, 6], [12]]
    assert await case.store.read_audit(shard, 6, 100) == written[-1:]
    # A replay writes the same rows again: nothing changes (written once).
    await case.store.write_rows(shard, [("audit", r) for r in written], seq=12)
    assert await case.store.read_audit(shard, 0, 100) == written
    # Compaction truncates journal batches, never audit rows.
    assert await case.store.save_snapshot(shard, 10, b"snapshot at 10")
    await case.store.truncate_journal(shard, 10)
    assert [b.seq for b in await case.store.read_journal(shard, 0, 100)] == [11, 12]
    assert await case.store.read_audit(shard, 0, 100) == written
    assert await case.store.read_audit(case.shard(), 0, 100) == []
