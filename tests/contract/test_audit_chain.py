"""The audit trail on every store: a real ``ShardOwner`` writes its chain, compaction truncates
the journal under it, and ``ledger.audit_report.verify`` (what ``ledgerctl audit verify`` runs)
proves the chain intact, then names what was done to it: one record altered (with or without
its hash recomputed), one deleted, the last one deleted, one inserted in the middle or past the
end, and a consistent rewrite of the tail caught only by an anchored head.

An audit row missing behind the journal (a Cassandra owner that died before its row writer ran;
a journal written before this build) is reported, then written by the next owner's replay; on
Cassandra ``ledgerctl audit verify --cassandra`` (the command, a subprocess) says so before
and after.

Each tamper test runs on SQLite and on the real Cassandra cluster (``real``). The tampering goes
around the ledger, as an attacker with store access would: straight SQL on the SQLite file,
CQL with a write timestamp above the ledger's on Cassandra.
"""

from __future__ import annotations

import asyncio
import sqlite3

import orjson
import pytest

from ledger.compaction import compact
from ledger.core import audit
from ledger.core.audit import AuditHead, AuditRow
from ledger.core.model import ExpireIdempotency, Post, SetFrozen
from ledger.audit_report import show, verify
from ledger.store.rows import AUDIT_COLS
from tests.owner.conftest import Ledger

pytestmark = pytest.mark.timeout(300)

# Above every timestamp the Cassandra adapter writes rows with (ROW_TIMESTAMP_BASE + seq).
_FORGER_TIMESTAMP = 1 << 61


class Tamper:
    """Writes to the audit rows behind the ledger's back."""

    def __init__(self, case) -> None:
        self.case = case

    async def put(self, row: AuditRow) -> None:
        values = tuple(getattr(row, c) for c in AUDIT_COLS)
        if self.case.adapter == "sqlite":
            await asyncio.to_thread(self._sql, "INSERT OR REPLACE INTO audit ("
                                    + ", ".join(AUDIT_COLS) + ") VALUES ("
                                    + ", ".join("?" * len(AUDIT_COLS)) + ")", values)
        else:
            from ledger.store.cassandra.constants import AUDIT_BUCKET_BATCHES
            await self._cql("INSERT INTO {ks}.audit_chain (bucket, " + ", ".join(AUDIT_COLS)
                            + ") VALUES (" + ", ".join(["%s"] * (len(AUDIT_COLS) + 1))
                            + f") USING TIMESTAMP {_FORGER_TIMESTAMP}",
                            (row.seq // AUDIT_BUCKET_BATCHES, *values))

    async def delete(self, shard: int, seq: int) -> None:
        if self.case.adapter == "sqlite":
            await asyncio.to_thread(self._sql, "DELETE FROM audit WHERE shard = ? AND seq = ?",
                                    (shard, seq))
        else:
            from ledger.store.cassandra.constants import AUDIT_BUCKET_BATCHES
            await self._cql(f"DELETE FROM {{ks}}.audit_chain USING TIMESTAMP "
                            f"{_FORGER_TIMESTAMP} WHERE shard = %s AND bucket = %s AND seq = %s",
                            (shard, seq // AUDIT_BUCKET_BATCHES, seq))

    def _sql(self, statement: str, params: tuple) -> None:
        db = sqlite3.connect(self.case.store._path, timeout=10)
        try:
            db.execute(statement, params)
            db.commit()
        finally:
            db.close()

    async def _cql(self, statement: str, params: tuple) -> None:
        store = self.case.store
        cql = statement.replace("{ks}", store._keyspace)
        await asyncio.to_thread(store._session.execute, cql, params)


async def chained(case) -> tuple[int, list[AuditRow]]:
    """A shard with a chain: wallets, transfers (one refused), a batch without audit records,
    a freeze; the journal compacted up to two batches before the head. Returns the shard and
    its audit rows."""
    shard = case.shard()
    led = Ledger()
    led.store = case.store
    owner = await led.start(shard)
    a, b = case.id("a"), case.id("b")
    await led.wallet(shard, a, 10_000)
    await led.wallet(shard, b)

    def post(key: str, amount: int) -> Post:
        return Post("alice", case.id(key), case.id("t-" + key), "TRANSFER", a, b, amount, "CNY",
                    "rent for flat 3", shard, led.now)

    for i in range(3):
        assert (await owner.submit(post(f"k{i}", 10 + i))).ok
    assert not (await owner.submit(post("too-much", 10**9))).ok
    # Nothing audited in this batch (keys expiring): the chain skips its number.
    assert (await owner.submit(ExpireIdempotency(led.now + 1))).ok
    assert (await owner.submit(SetFrozen(b, True, "chargeback review", "ops", led.now))).ok
    assert (await owner.submit(post("k-last", 5))).ok
    head = owner.state.seq
    await case.store.flush_rows(shard, head)
    done = await compact(case.store, shard, head - 2)
    assert done.seq == head - 2
    await owner.stop("test over")
    assert [b.seq for b in await case.store.read_journal(shard, 0, 100)] == [head - 1, head]
    rows = await case.store.read_audit(shard, 0, 100)
    return shard, rows


def forged(row: AuditRow, records: bytes | None = None, *, prev: AuditRow | None = None,
           seq: int | None = None, rehash: bool = True) -> AuditRow:
    """``row`` with other records / predecessor / number, its hash recomputed (or not)."""
    records = row.records if records is None else records
    prev_seq, prev_hash = (row.prev_seq, row.prev_hash) if prev is None else (prev.seq, prev.hash)
    seq = row.seq if seq is None else seq
    digest = (audit.row_hash(prev_hash, row.shard, seq, row.epoch, row.at_ms, prev_seq, records)
              if rehash else row.hash)
    return AuditRow(row.shard, seq, row.epoch, row.at_ms, prev_seq, prev_hash, records, digest)


def with_amount(row: AuditRow, amount_minor: int) -> bytes:
    records = [list(r) for r in orjson.loads(row.records)]
    records[0][5] = amount_minor
    return orjson.dumps(records)


def problems_at(report) -> list[tuple[int, str]]:
    return [(p.seq, p.what) for p in report.problems]


async def test_an_intact_chain_outlives_truncation_and_verifies(case):
    shard, rows = await chained(case)
    # Every batch but the one without audit records has its row, though the journal before
    # the snapshot is gone.
    seqs = [r.seq for r in rows]
    assert len(seqs) >= 8 and seqs == sorted(seqs)
    assert any(b - a == 2 for a, b in zip(seqs, seqs[1:]))  # the skipped batch
    report = await verify(case.store, [shard])
    assert report.ok, report.problems
    assert report.shards[shard].head == AuditHead(rows[-1].seq, rows[-1].hash)
    records = [r for row in rows for r in row.decoded()]
    assert report.shards[shard].records == len(records)
    methods = [r.method for r in records]
    assert methods.count("CreateWallet") == 2 and "FreezeWallet" in methods
    refused = [r for r in records if r.outcome == "INSUFFICIENT_FUNDS"]
    assert len(refused) == 1 and refused[0].amount_minor == 10**9
    assert refused[0].principal == "alice" and len(refused[0].request_hash) == 32
    # The memo never reaches a record (it is covered by the request hash only).
    assert not any(b"rent" in row.records for row in rows)
    frozen = [s async for s in show(case.store, [shard], wallet=case.id("b"),
                                    principal="ops")]
    assert [(s.record.method, s.record.detail) for s in frozen] == [
        ("FreezeWallet", "chargeback review")]
    assert all(s.shard == shard and s.epoch == 1 for s in frozen)


async def test_one_altered_record_fails_verify(case):
    shard, rows = await chained(case)
    target = rows[len(rows) // 2]
    await Tamper(case).put(forged(target, with_amount(target, 1), rehash=False))
    report = await verify(case.store, [shard])
    assert not report.ok
    assert [(seq, "hash mismatch" in what) for seq, what in problems_at(report)] == [
        (target.seq, True)]


async def test_an_altered_record_with_its_hash_recomputed_fails_verify(case):
    shard, rows = await chained(case)
    i = len(rows) // 2
    await Tamper(case).put(forged(rows[i], with_amount(rows[i], 1)))
    report = await verify(case.store, [shard])
    assert [(seq, "broken link" in what) for seq, what in problems_at(report)] == [
        (rows[i + 1].seq, True)]


async def test_one_deleted_record_fails_verify(case):
    shard, rows = await chained(case)
    i = len(rows) // 2
    await Tamper(case).delete(shard, rows[i].seq)
    report = await verify(case.store, [shard])
    assert [(seq, "broken link" in what) for seq, what in problems_at(report)] == [
        (rows[i + 1].seq, True)]


async def test_the_last_record_deleted_fails_verify(case):
    shard, rows = await chained(case)
    await Tamper(case).delete(shard, rows[-1].seq)
    report = await verify(case.store, [shard])
    assert [(seq, "missing rows" in what) for seq, what in problems_at(report)] == [
        (rows[-1].seq, True)]


async def test_the_first_record_deleted_fails_verify(case):
    shard, rows = await chained(case)
    await Tamper(case).delete(shard, rows[0].seq)
    report = await verify(case.store, [shard])
    assert [(seq, "broken link" in what) for seq, what in problems_at(report)] == [
        (rows[1].seq, True)]


async def test_a_record_inserted_in_the_middle_fails_verify(case):
    shard, rows = await chained(case)
    # Into the number the chain skipped, linked to the row before it.
    i = next(i for i in range(len(rows) - 1) if rows[i + 1].seq - rows[i].seq == 2)
    await Tamper(case).put(forged(rows[i], prev=rows[i], seq=rows[i].seq + 1))
    report = await verify(case.store, [shard])
    assert [(seq, "broken link" in what) for seq, what in problems_at(report)] == [
        (rows[i + 1].seq, True)]


async def test_a_record_inserted_past_the_end_fails_verify(case):
    shard, rows = await chained(case)
    await Tamper(case).put(forged(rows[-1], prev=rows[-1], seq=rows[-1].seq + 1))
    report = await verify(case.store, [shard])
    assert [(seq, "beyond the journal's head" in what) for seq, what
            in problems_at(report)] == [(rows[-1].seq + 1, True)]


async def test_a_consistent_rewrite_is_caught_by_an_anchored_head_only(case):
    shard, rows = await chained(case)
    anchor = (await verify(case.store, [shard])).shards[shard].head
    # Rewrite the whole chain consistently, and pretend the snapshot and journal were rewritten
    # to match (the head verify compares with is the forged one): only the anchor tells.
    rewritten: list[AuditRow] = []
    for row in rows:
        prev = rewritten[-1] if rewritten else None
        new = forged(row, with_amount(row, 1) if row is rows[2] else None, prev=prev)
        if prev is None:
            new = AuditRow(new.shard, new.seq, new.epoch, new.at_ms, 0, "", new.records,
                           audit.row_hash("", new.shard, new.seq, new.epoch, new.at_ms, 0,
                                          new.records))
        rewritten.append(new)
        await Tamper(case).put(new)
    stored = await case.store.read_audit(shard, 0, 100)
    forged_head = AuditHead(stored[-1].seq, stored[-1].hash)
    assert audit.check_chain(shard, stored, forged_head) == []
    problems = audit.check_chain(shard, stored, forged_head, anchor=anchor)
    assert [(p.seq, "anchored head" in p.what) for p in problems] == [(anchor.seq, True)]
    # And against the real snapshot and journal, the forged tail shows at once.
    assert not (await verify(case.store, [shard])).ok


# --- rows missing behind the journal, written by the next replay ------------------------------


class DropsAuditRows:
    """A store whose appends lose the audit row of the batches in ``drop``: what a Cassandra
    owner that dies after the journal write, before its row writer ran, leaves behind, and
    what a journal written before this build (an upgrade) holds on either store."""

    def __init__(self, store, drop: set[int]) -> None:
        self._store = store
        self.drop = drop

    async def append(self, shard, epoch, seq, events, rows):
        rows = [r for r in rows if not (seq in self.drop and r[0] == "audit")]
        await self._store.append(shard, epoch, seq, events, rows)

    def __getattr__(self, name):
        return getattr(self._store, name)


async def test_a_replay_writes_the_audit_rows_missing_behind_the_journal(case, request):
    import subprocess
    import sys

    shard = case.shard()
    dropping = DropsAuditRows(case.store, set())
    led = Ledger()
    led.store = dropping
    owner = await led.start(shard)
    a, b = case.id("a"), case.id("b")
    await led.wallet(shard, a, 1_000)
    await led.wallet(shard, b)
    lost = owner.state.seq + 1
    dropping.drop.add(lost)
    assert (await owner.submit(Post("alice", case.id("k"), case.id("t"), "TRANSFER", a, b,
                                    7, "CNY", "", shard, led.now))).ok
    assert (await owner.submit(Post("alice", case.id("k2"), case.id("t2"), "TRANSFER", a, b,
                                    8, "CNY", "", shard, led.now))).ok
    await case.store.flush_rows(shard, owner.state.seq)
    await owner.stop("crashed")
    if case.adapter == "cassandra":
        # An owner that died before its row writer ran never marked those rows written (the
        # rows mark, ``ledger.store.cassandra.views``); the flush above did: take it back.
        from ledger.store.cassandra import ROW_TIMESTAMP_BASE
        await asyncio.to_thread(
            case.store._session.execute,
            f"DELETE FROM {case.store._keyspace}.rows_marks USING TIMESTAMP "
            f"{ROW_TIMESTAMP_BASE + (1 << 40)} WHERE shard = %s", (shard,))
    else:
        # SQLite writes rows behind the journal too: an owner whose process died before the
        # writer thread wrote them left no mark past them (nor has a file of a build that
        # wrote rows in the append). The flush above wrote one: take it back.
        db = sqlite3.connect(case.store._path, timeout=10)
        with db:
            db.execute("DELETE FROM rows_marks WHERE shard = ?", (shard,))
        db.close()
    report = await verify(case.store, [shard])
    assert [(p.seq, "broken link" in p.what) for p in report.problems] == [(lost + 1, True)]

    def ledgerctl_verify() -> subprocess.CompletedProcess:
        cluster = request.getfixturevalue("local_cluster")
        return subprocess.run(
            [sys.executable, "-m", "ledger.cli.ledgerctl", "audit", "verify", "--cassandra",
             f"{cluster.contact_points['r1']}:{cluster.cql_port}", "--dc", "r1",
             "--keyspace", case.store._keyspace, "--shard", str(shard), "--json"],
            capture_output=True, text=True, timeout=120)

    if case.adapter == "cassandra":  # the command on Cassandra (e2e covers the embedded one)
        proc = await asyncio.to_thread(ledgerctl_verify)
        assert proc.returncode == 1, proc.stderr
        assert [p["seq"] for p in orjson.loads(proc.stdout)["problems"]] == [lost + 1]
    # The next owner replays the journal (no snapshot yet) and writes the missing row.
    del led.peers.owners[shard]
    again = await led.start(shard, epoch=2)
    await again.stop("test over")
    report = await verify(case.store, [shard])
    assert report.ok, report.problems
    assert lost in [r.seq for r in await case.store.read_audit(shard, 0, 100)]
    if case.adapter == "cassandra":
        proc = await asyncio.to_thread(ledgerctl_verify)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        body = orjson.loads(proc.stdout)
        assert body["shards"][str(shard)]["head"]["seq"] == report.shards[shard].head.seq
