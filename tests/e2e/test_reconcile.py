"""``ledgerctl reconcile`` proves clean books clean and names each kind of discrepancy.

Runs the real command (a subprocess) against a store written by a real ledger, then against
copies of that store damaged on purpose: a materialized row changed behind the journal's back,
a credit journaled without any debit, a hold left past its timeout.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time

import pytest

from ledger import server
from ledger.core import codec
from ledger.core.model import Credit, CreditsApplied, Hold, HoldCreated

SHARDS = 8
# How long the fixture waits for every cross-shard credit to land (s), polling every POLL_S.
CREDITED_DEADLINE_S = 30.0
POLL_S = 0.05


def run_reconcile(data_dir) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "ledger.cli.ledgerctl", "reconcile",
                           "--data-dir", str(data_dir), "--shards", str(SHARDS), "--json"],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, json.loads(proc.stdout)


@pytest.fixture
async def ledger_dir(tmp_path):
    running = await server.start_dev(tmp_path, port=0, shard_count=SHARDS)
    c = running.coordinator
    for i in range(6):
        await c.create_wallet("fin", f"w{i}", f"w{i}", "CNY")
        await c.deposit("fin", f"d{i}", f"w{i}", 1_000, "CNY")
    from coordinator import TransferItem
    outcomes = await c.batch_transfer("fin", [TransferItem(
        f"t{i}", f"w{i % 6}", f"w{(i + 1) % 6}", 10 + i, "CNY") for i in range(30)])
    outcomes.append(await c.withdraw("fin", "wd", "w0", 5, "CNY"))
    assert all(o.ok for o in outcomes), [o for o in outcomes if not o.ok]
    # Close only once every credit has landed and been acknowledged, so the journals hold
    # no credit in transit: the books are complete, and the tests below can forge the next
    # credit of any shard pair in sequence.
    pending = {o.value.transfer_id for o in outcomes}
    deadline = time.monotonic() + CREDITED_DEADLINE_S
    while pending:
        for tid in list(pending):
            if (await c.get_transfer(tid)).value.credited:
                pending.discard(tid)
        assert time.monotonic() < deadline, f"credits not landed: {sorted(pending)}"
        if pending:
            await asyncio.sleep(POLL_S)
    await running.close()
    return tmp_path


def last_seq(db, shard):
    return db.execute("SELECT head, epoch FROM shard_heads WHERE shard = ?", (shard,)).fetchone()


def append_raw(path, shard, events):
    db = sqlite3.connect(path)
    head, epoch = last_seq(db, shard)
    db.execute("INSERT INTO journal (shard, seq, epoch, events) VALUES (?, ?, ?, ?)",
               (shard, head + 1, epoch, codec.dumps(events)))
    db.execute("UPDATE shard_heads SET head = ? WHERE shard = ?", (head + 1, shard))
    db.commit()
    db.close()


async def test_clean_books(ledger_dir):
    code, report = run_reconcile(ledger_dir)
    assert code == 0 and report["clean"]
    assert report["totals"] == {"CNY": 0} and report["transfers_committed"] == 37
    assert report["wallets"] > 6  # user wallets plus settlement sub-accounts


async def test_changed_row_is_named(ledger_dir):
    db = sqlite3.connect(ledger_dir / "ledger.sqlite3")
    db.execute("UPDATE wallets SET balance_minor = balance_minor + 1 WHERE wallet_id = 'w3'")
    db.commit()
    db.close()
    code, report = run_reconcile(ledger_dir)
    assert code == 1
    assert [(f["check"], f["subject"]) for f in report["findings"]] == [
        ("rows_match_journal", "w3")]


def replayed(path, shard):
    from ledger.core.shard import ShardState
    from ledger.core.step import fold_events
    state = ShardState(shard)
    db = sqlite3.connect(path)
    for (events,) in db.execute("SELECT events FROM journal WHERE shard = ? ORDER BY seq",
                                (shard,)):
        fold_events(state, codec.loads(events))
    db.close()
    return state


async def test_credit_without_debit_is_named(ledger_dir):
    from shard_router import shard_of
    path = ledger_dir / "ledger.sqlite3"
    shard = shard_of("w2", SHARDS)
    src = next(s for s in range(SHARDS) if s != shard)
    # In sequence for the credit shard, so it replays - but shard `src` never debited it.
    # Nothing is in transit (the fixture waited), so the next credit from `src` is one that
    # `src`'s journal never owed.
    seq = replayed(path, shard).inbox_applied.get(src, 0) + 1
    assert seq == replayed(path, src).outbox_last_seq.get(shard, 0) + 1
    append_raw(path, shard, [CreditsApplied(src, (Credit(seq, "t-forged", "TRANSFER", "nobody",
                                                         "w2", 500, "CNY", 1),))])
    code, report = run_reconcile(ledger_dir)
    assert code == 1
    # 500 appeared from nowhere: the books are off by exactly that, the credit has no
    # commit, and w2's row (written by the ledger, not by the forger) is behind the journal.
    assert report["totals"] == {"CNY": 500} and report["in_transit"] in ({}, {"CNY": 0})
    assert sorted((f["check"], f["subject"]) for f in report["findings"]) == [
        ("books_balance", "CNY"), ("legs_once", "t-forged"), ("rows_match_journal", "w2")]
    [books] = [f for f in report["findings"] if f["check"] == "books_balance"]
    assert "= 500," in books["detail"]


async def test_impossible_journal_event_is_named(ledger_dir):
    from shard_router import shard_of
    shard = shard_of("w2", SHARDS)
    src = next(s for s in range(SHARDS) if s != shard)
    append_raw(ledger_dir / "ledger.sqlite3", shard,
               [CreditsApplied(src, (Credit(10**6, "t-gap", "TRANSFER", "x", "w2", 5, "CNY", 1),))])
    code, report = run_reconcile(ledger_dir)
    assert code == 1
    assert "journal_replays" in {f["check"] for f in report["findings"]}


async def test_hold_past_timeout_is_named(ledger_dir):
    from shard_router import shard_of
    shard = shard_of("w4", SHARDS)
    hold = Hold("h-stale", "w4", "CNY", 10, "fin", "hk", 1, 2)
    append_raw(ledger_dir / "ledger.sqlite3", shard, [HoldCreated(hold)])
    code, report = run_reconcile(ledger_dir)
    assert code == 1
    assert ("holds_timely", "h-stale") in [(f["check"], f["subject"]) for f in report["findings"]]
