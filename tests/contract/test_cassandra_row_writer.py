"""The Cassandra row writer (materialized views behind the journal), on the real cluster.

* Defect 9: a deposed owner's row writer that writes late must not roll the views back. Each
  row upsert is stamped with its batch's journal position (``USING TIMESTAMP``), so a newer
  batch's row wins whatever order the writes arrive in.
* Defect 3 (its row-writer part): a row writer stopped by an error that is not a driver error
  must not leave the shard stalled: flushes and appends fail with ``StoreUnavailable``, and a
  new fence (a reload or a new owner) starts the rows afresh.

Two ``CassandraStore`` instances on one keyspace play the deposed and the new owner, like two
nodes. The deposed one's row writer is held at a gate (an ``asyncio.Event``) so that "late"
is an order of events, not a sleep.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from ledger.core.model import Entry, Transfer, Wallet
from ledger.store.port import StoreUnavailable

pytestmark = [pytest.mark.real, pytest.mark.timeout(300)]

# A bound for awaits that must not hang (the failure mode under test is a hang).
NO_HANG_S = 30.0


def wallet(wallet_id: str, balance_minor: int = 0, version: int = 0, **kw) -> Wallet:
    return Wallet(wallet_id, "CNY", balance_minor=balance_minor, version=version, **kw)


def entry(wallet_id: str, version: int, amount_minor: int = 100) -> Entry:
    return Entry(wallet_id, version, f"t{version}", "TRANSFER", amount_minor,
                 amount_minor * version, "~settlement:CNY:0", "CNY", 1_700_000_000_000 + version)


def transfer(transfer_id: str, **kw) -> Transfer:
    return Transfer(transfer_id, "TRANSFER", "alice", "bob", 100, "CNY", "memo", "caller",
                    f"key-{transfer_id}", 1_700_000_000_000, **kw)


def events(shard: int, seq: int) -> bytes:
    return f"w:{shard}:{seq}".encode() * 8


async def journal(store, shard: int) -> list[tuple[int, int, bytes]]:
    return [(b.seq, b.epoch, b.events) for b in await store.read_journal(shard, 0, 1000)]


async def _second_store(local_cluster, store):
    from ledger.store.cassandra import CassandraStore

    return await CassandraStore.connect(
        [local_cluster.contact_points["r1"]], local_cluster.cql_port, local_dc="r1",
        keyspace=store._keyspace, create_schema=False, require_region_survival=False)


async def _writetime(store, table: str, column: str, key_column: str, key: str) -> int:
    rows = await asyncio.to_thread(
        store._session.execute,
        f"SELECT WRITETIME({column}) AS ts FROM {store._keyspace}.{table} "
        f"WHERE {key_column} = %s", (key,))
    return rows.one()["ts"]


async def test_a_deposed_owners_late_row_writer_cannot_roll_back_newer_rows(
        cassandra_store, local_cluster, fresh_shard, monkeypatch):
    new_owner, shard = cassandra_store, fresh_shard
    wid, tid = f"late-w-{shard}", f"late-t-{shard}"
    old_rows = [("wallet", wallet(wid, 100, 1)), ("entry", entry(wid, 1, 100)),
                ("transfer", transfer(tid, state="PENDING"))]
    new_rows = [("wallet", wallet(wid, 70, 2, held_minor=20)), ("entry", entry(wid, 2, -30)),
                ("transfer", transfer(tid, state="COMMITTED", credited=True))]
    deposed = await _second_store(local_cluster, new_owner)
    gate, holding = asyncio.Event(), asyncio.Event()
    # The row writer sends its upserts through the driver bridge's ``write_all``.
    real_write_all = deposed._driver.write_all

    async def late_write_all(statements, *args):
        holding.set()
        await gate.wait()
        await real_write_all(statements, *args)

    monkeypatch.setattr(deposed._driver, "write_all", late_write_all)
    try:
        await deposed.fence(shard, 1)
        await deposed.append(shard, 1, 1, events(shard, 1), old_rows)  # acknowledged
        await asyncio.wait_for(holding.wait(), NO_HANG_S)  # its rows wait at the gate
        # The deposed owner loses the shard; the new owner appends the next batch.
        await new_owner.fence(shard, 2)
        await new_owner.append(shard, 2, 2, events(shard, 2), new_rows)
        await new_owner.flush_rows(shard, 2)
        assert await new_owner.scan_wallets(shard) == [wallet(wid, 70, 2, held_minor=20)]
        # Now the deposed owner's row writer writes batch 1's rows, after batch 2's.
        gate.set()
        await asyncio.wait_for(deposed.flush_rows(shard, 1), NO_HANG_S)
        assert await new_owner.scan_wallets(shard) == [wallet(wid, 70, 2, held_minor=20)]
        assert await new_owner.get_transfer(tid) == transfer(tid, state="COMMITTED",
                                                             credited=True)
        assert await new_owner.list_entries(wid, 0, 10) == [entry(wid, 1, 100),
                                                             entry(wid, 2, -30)]
        # The stamps are the journal positions (see ROW_TIMESTAMP_BASE).
        from ledger.store.cassandra import ROW_TIMESTAMP_BASE
        assert await _writetime(new_owner, "wallets", "balance_minor", "wallet_id", wid) \
            == ROW_TIMESTAMP_BASE + 2
        assert await _writetime(new_owner, "transfers", "state", "transfer_id", tid) \
            == ROW_TIMESTAMP_BASE + 2
    finally:
        gate.set()
        await deposed.close()


async def test_a_row_writer_stopped_by_a_bug_fails_appends_instead_of_stalling(
        cassandra_store, fresh_shard, caplog):
    store, shard = cassandra_store, fresh_shard
    wid = f"bad-w-{shard}"
    await store.fence(shard, 1)
    # A balance past int64: the driver cannot encode it (a TypeError, not a driver error).
    # The batch itself is durable; only its rows cannot be written.
    with caplog.at_level(logging.ERROR, logger="ledger.store.cassandra"):
        await store.append(shard, 1, 1, events(shard, 1), [("wallet", wallet(wid, 2 ** 63, 1))])
        with pytest.raises(StoreUnavailable, match=f"shard {shard}: the row writer stopped "
                                                   f"on TypeError"):
            await asyncio.wait_for(store.flush_rows(shard, 1), NO_HANG_S)
    assert any(f"shard {shard}: the row writer stopped: TypeError" in r.getMessage()
               for r in caplog.records)
    # The next append fails at once, before writing anything (no wait for the lag bound).
    with pytest.raises(StoreUnavailable, match="appends are refused until the shard is fenced"):
        await asyncio.wait_for(store.append(shard, 1, 2, events(shard, 2), []), NO_HANG_S)
    assert await journal(store, shard) == [(1, 1, events(shard, 1))]
    # A reload fences again (same epoch here): the rows start afresh, appends work again.
    assert await store.fence(shard, 1) == 1
    good = wallet(wid, 5, 2)
    await store.append(shard, 1, 2, events(shard, 2), [("wallet", good)])
    await asyncio.wait_for(store.flush_rows(shard, 2), NO_HANG_S)
    assert await store.scan_wallets(shard) == [good]


# --- the rows mark: a takeover writes again only the rows after it ---------------------------


async def _load_rows_seq(store, shard: int) -> int:
    return (await store.load(shard)).rows_seq


async def test_the_rows_mark_follows_the_rows_written_never_ahead_of_them(
        cassandra_store, local_cluster, fresh_shard, monkeypatch):
    reader, shard = cassandra_store, fresh_shard
    writer = await _second_store(local_cluster, reader)
    gate, holding = asyncio.Event(), asyncio.Event()
    real_write_all = writer._driver.write_all
    try:
        await writer.fence(shard, 1)
        await writer.append(shard, 1, 1, events(shard, 1), [("wallet", wallet(f"m-{shard}", 1, 1))])
        await asyncio.wait_for(writer.flush_rows(shard, 1), NO_HANG_S)
        assert await _load_rows_seq(reader, shard) == 1

        async def held_write_all(statements, *args):
            holding.set()
            await gate.wait()
            await real_write_all(statements, *args)

        monkeypatch.setattr(writer._driver, "write_all", held_write_all)
        # Batches 2 and 3 are durable; their rows wait at the gate: the mark stays at 1.
        await writer.append(shard, 1, 2, events(shard, 2), [("wallet", wallet(f"m-{shard}", 2, 2))])
        await writer.append(shard, 1, 3, events(shard, 3), [("wallet", wallet(f"m-{shard}", 3, 3))])
        await asyncio.wait_for(holding.wait(), NO_HANG_S)
        loaded = await reader.load(shard)
        assert [b.seq for b in loaded.batches] == [1, 2, 3] and loaded.rows_seq == 1
        gate.set()
        await asyncio.wait_for(writer.flush_rows(shard, 3), NO_HANG_S)
        assert await _load_rows_seq(reader, shard) == 3
        # A late, lower mark (a deposed owner's, a slow replay's) does not lower it.
        await reader.mark_rows(shard, 2)
        assert await _load_rows_seq(reader, shard) == 3
    finally:
        gate.set()
        await writer.close()


async def test_a_takeover_writes_again_only_the_rows_after_the_rows_mark(
        cassandra_store, local_cluster, fresh_shard, monkeypatch):
    """The new owner's replay skips the rows of the batches up to the mark and writes those
    after it (here: of a batch whose owner died before its row writer ran)."""
    import dataclasses

    from ledger import compaction
    from ledger.core.model import Post
    from ledger.store.cassandra import ROW_TIMESTAMP_BASE
    from tests.owner.conftest import Ledger

    store, shard = cassandra_store, fresh_shard
    dying = await _second_store(local_cluster, store)
    led = Ledger()
    led.store = dying
    owner = await led.start(shard)
    a, b = f"mark-a-{shard}", f"mark-b-{shard}"
    await led.wallet(shard, a, 1_000)
    await led.wallet(shard, b)

    async def pay(tid: str, amount: int) -> None:
        assert (await owner.submit(Post("t", "k-" + tid, tid, "TRANSFER", a, b, amount, "CNY",
                                        "", shard, led.now))).ok

    t1, t2 = f"mark-t1-{shard}", f"mark-t2-{shard}"
    await pay(t1, 7)
    marked = owner.state.seq
    await asyncio.wait_for(dying.flush_rows(shard, marked), NO_HANG_S)
    # A probe on t1's row, stamped at the mark: a rewrite of t1's row by a replay (stamped
    # with a later batch) would replace it.
    await asyncio.to_thread(
        store._session.execute,
        f"UPDATE {store._keyspace}.transfers USING TIMESTAMP {ROW_TIMESTAMP_BASE + marked} "
        f"SET memo = 'probe' WHERE transfer_id = %s", (t1,))
    # The owner dies after t2's batch is durable, before its row writer writes its rows.
    gate = asyncio.Event()
    real_write_all = dying._driver.write_all

    async def never(statements, *args):
        await gate.wait()
        await real_write_all(statements, *args)

    monkeypatch.setattr(dying._driver, "write_all", never)
    await pay(t2, 8)
    head = owner.state.seq
    await owner.stop("died")
    await dying._views.close(0.0)  # its pending rows are dropped
    await dying.close()
    assert await store.get_transfer(t2) is None

    led.store = store
    del led.peers.owners[shard]
    again = await led.start(shard, epoch=2)
    try:
        assert (await store.get_transfer(t1)).memo == "probe"  # not written again
        assert (await store.get_transfer(t2)).amount_minor == 8  # written by the replay
        assert again.state.seq == head
        # The replay raised the mark: the next takeover writes no row at all.
        loaded = await store.load(shard)
        assert loaded.rows_seq == head
        # The probe sees a rewrite: a replay that does not know the mark writes t1 again.
        await compaction.replay(store, shard, dataclasses.replace(loaded, rows_seq=0))
        assert (await store.get_transfer(t1)).memo == ""
    finally:
        await again.stop("test over")
