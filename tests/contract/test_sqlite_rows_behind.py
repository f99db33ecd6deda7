"""The embedded store writes view rows behind the journal (``ledger.store.sqlite``).

An append commits its journal batch alone; its rows wait in the writer thread and are
written later, many batches in one transaction, with the shard's rows mark. What must hold:

* every read of a view, load, snapshot or mark sees every row of every acknowledged batch
  (rows waiting are written before such a call runs), and the mark follows;
* a crash loses rows, never a batch: the next owner's replay writes the rows after the mark,
  and the views come out as if nothing had been lost;
* rows that cannot be written fail every later store call (the views' lag stays bounded)
  until they are written;
* rows of many batches written together end as if each batch had been written alone.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from ledger.core.model import Post
from ledger.runtime import failpoints
from ledger.store import sqlite as sqlite_store
from ledger.store.port import StoreUnavailable
from ledger.store.sqlite import SqliteStore
from tests.owner.conftest import Ledger

SHARD = 7
# Long enough that nothing is written behind the journal by time or count during a test.
NEVER_MS = 3_600_000.0
NO_HANG_S = 30.0


def raw(path, sql: str, *args) -> list[tuple]:
    """Read the file through a connection of its own, as another process would."""
    db = sqlite3.connect(path, timeout=10)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


@pytest.fixture
def rows_wait(monkeypatch):
    monkeypatch.setattr(sqlite_store, "ROWS_BEHIND_MS", NEVER_MS)
    monkeypatch.setattr(sqlite_store, "ROWS_BEHIND_MAX", 10**9)


async def _transfer(led: Ledger, owner, key: str, amount: int):
    out = await owner.submit(Post("alice", key, "t-" + key, "TRANSFER", "a", "b", amount,
                                  "CNY", "", SHARD, led.now))
    assert out.ok, out


async def test_rows_wait_behind_the_journal_and_every_view_read_sees_them(tmp_path, rows_wait):
    path = tmp_path / "ledger.db"
    led = Ledger()
    led.store = await SqliteStore.open(path)
    try:
        owner = await led.start(SHARD)
        await led.wallet(SHARD, "a", 1_000)
        await led.wallet(SHARD, "b")
        await _transfer(led, owner, "k1", 7)
        head = owner.state.seq
        # Acknowledged and journaled, its rows not written yet.
        assert raw(path, "SELECT head FROM shard_heads WHERE shard = ?", SHARD) == [(head,)]
        assert raw(path, "SELECT count(*) FROM transfers WHERE transfer_id = 't-k1'") == [(0,)]
        # A read of a view sees it: the waiting rows are written before the read runs.
        stored = await led.store.get_transfer("t-k1")
        assert stored is not None and stored.amount_minor == 7
        assert raw(path, "SELECT balance_minor FROM wallets WHERE wallet_id IN ('a', 'b') "
                         "ORDER BY wallet_id") == [(993,), (7,)]
        assert raw(path, "SELECT seq FROM rows_marks WHERE shard = ?", SHARD) == [(head,)]
        # A load sees the mark at the head: a takeover writes no row again.
        await _transfer(led, owner, "k2", 5)
        loaded = await led.store.load(SHARD)
        assert loaded.rows_seq == owner.state.seq == loaded.batches[-1].seq
        # The history, in order, each entry once.
        entries = await led.store.list_entries("b", 0, 10)
        assert [(e.version, e.amount_minor) for e in entries] == [(1, 7), (2, 5)]
    finally:
        await led.close()
        await led.store.close()
    # Closing writes what waits.
    assert raw(path, "SELECT count(*) FROM transfers WHERE transfer_id IN ('t-k1', 't-k2')") \
        == [(2,)]


CRASHING_OWNER = textwrap.dedent("""
    import asyncio, os, sys
    from ledger.core.model import Post
    from ledger.store import sqlite as sqlite_store
    from tests.owner.conftest import Ledger

    sqlite_store.ROWS_BEHIND_MS = 3_600_000.0
    sqlite_store.ROWS_BEHIND_MAX = 10**9

    async def main():
        led = Ledger()
        led.store = await sqlite_store.SqliteStore.open(sys.argv[1])
        owner = await led.start(7)
        await led.wallet(7, "a", 1_000)
        await led.wallet(7, "b")
        for n, amount in ((1, 7), (2, 5)):
            out = await owner.submit(Post("alice", f"k{n}", f"t-k{n}", "TRANSFER", "a", "b",
                                          amount, "CNY", "", 7, led.now))
            assert out.ok, out
        print(owner.state.seq, flush=True)
        os._exit(0)  # a crash: no close, the rows waiting behind the journal are lost

    asyncio.run(main())
""")


async def test_a_crash_loses_rows_never_batches_and_the_replay_writes_them(tmp_path):
    path = tmp_path / "ledger.db"
    child = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", CRASHING_OWNER, str(path)],
        capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    head = int(child.stdout.split()[-1])
    assert raw(path, "SELECT head FROM shard_heads WHERE shard = ?", SHARD) == [(head,)]
    [(mark,)] = raw(path, "SELECT coalesce(max(seq), 0) FROM rows_marks WHERE shard = ?", SHARD)
    assert mark < head
    assert raw(path, "SELECT count(*) FROM transfers WHERE transfer_id IN ('t-k1', 't-k2')") \
        == [(0,)]
    led = Ledger()
    led.store = await SqliteStore.open(path)
    try:
        loaded = await led.store.load(SHARD)
        assert loaded.rows_seq == mark and loaded.batches[-1].seq == head
        owner = await led.start(SHARD, epoch=2)  # replays the journal, writing the lost rows
        assert {w: owner.state.wallets[w].balance_minor for w in ("a", "b")} == \
            {"a": 988, "b": 12}
        await led.store.flush_rows(SHARD, head)
        assert raw(path, "SELECT seq FROM rows_marks WHERE shard = ?", SHARD) == [(head,)]
        assert raw(path, "SELECT wallet_id, balance_minor, version FROM wallets "
                         "WHERE wallet_id IN ('a', 'b') ORDER BY wallet_id") == [
            ("a", 988, owner.state.wallets["a"].version), ("b", 12, 2)]
        assert raw(path, "SELECT transfer_id, amount_minor FROM transfers "
                         "WHERE transfer_id IN ('t-k1', 't-k2') ORDER BY transfer_id") == [
            ("t-k1", 7), ("t-k2", 5)]
        entries = await led.store.list_entries("b", 0, 10)
        assert [(e.version, e.amount_minor, e.balance_after_minor) for e in entries] == [
            (1, 7, 7), (2, 5, 12)]
    finally:
        await led.close()
        await led.store.close()


async def test_rows_that_cannot_be_written_fail_later_calls_until_they_are(tmp_path, rows_wait):
    path = tmp_path / "ledger.db"
    store = await SqliteStore.open(path)
    try:
        assert await store.fence(SHARD, 1) == 0
        await store.append(SHARD, 1, 1, b"batch 1", [])
        failpoints.arm("store.rows_behind@1+1")  # the first two tries fail
        try:
            with pytest.raises(StoreUnavailable, match="rows of acknowledged batches"):
                await asyncio.wait_for(store.load(SHARD), NO_HANG_S)
            with pytest.raises(StoreUnavailable, match="rows of acknowledged batches"):
                await asyncio.wait_for(store.append(SHARD, 1, 2, b"batch 2", []), NO_HANG_S)
        finally:
            failpoints.disarm()
        # Nothing was appended meanwhile; once the rows are written, calls succeed again.
        assert (await store.journal_position(SHARD))[1] == 1
        await store.append(SHARD, 1, 2, b"batch 2", [])
        loaded = await store.load(SHARD)
        assert [b.seq for b in loaded.batches] == [1, 2] and loaded.rows_seq == 2
    finally:
        await store.close()



async def test_rows_of_many_batches_written_together_keep_the_last_row_of_each_key(
        tmp_path, rows_wait):
    """Rows of many batches are written in one transaction, grouped by shard: each key ends
    with the row of its shard's latest batch, as if every batch had been written alone, and
    another shard's batches in between change nothing of it (``_write_batches_rows``)."""
    from ledger.core.model import Transfer

    store = await SqliteStore.open(tmp_path / "ledger.db")
    try:
        for shard in (1, 2):
            assert await store.fence(shard, 1) == 0

        def row(tid: str, memo: str, credited: bool) -> tuple:
            return ("transfer", Transfer(tid, "TRANSFER", "a", "b", 5, "CNY", memo, "svc",
                                         "k-" + tid, 1, credited=credited))
        # Shard 1 decides t1, shard 2 decides t2, shard 1 then records t1 credited.
        await store.append(1, 1, 1, b"1:1", [row("t1", "decided", False)])
        await store.append(2, 1, 1, b"2:1", [row("t2", "decided", False)])
        await store.append(1, 1, 2, b"1:2", [row("t1", "credited", True)])
        assert raw(tmp_path / "ledger.db", "SELECT count(*) FROM transfers") == [(0,)]
        t1, t2 = await store.get_transfer("t1"), await store.get_transfer("t2")
        assert t1 is not None and (t1.memo, t1.credited) == ("credited", True)
        assert t2 is not None and (t2.memo, t2.credited) == ("decided", False)
        assert [(await store.load(shard)).rows_seq for shard in (1, 2)] == [2, 1]
    finally:
        await store.close()
