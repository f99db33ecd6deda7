"""The journal: fencing, appends, loads, snapshots and truncation of shard journals.

``journal`` holds one partition per shard: static columns ``epoch`` (the writer epoch, i.e.
the fencing token) and ``head`` (the last batch number), and one clustering row per batch.
Every change of the static columns is a lightweight transaction (Paxos), so "who may append"
and "which batch is next" are decided by a serial quorum, never by a plain write. A CAS whose
answer is lost is an unknown outcome: it is decided by a SERIAL read, never guessed.

Snapshots are stored in parts of ``SNAPSHOT_PART_BYTES`` (``snapshot_parts``; a snapshot is
far larger than one mutation may be) and count only once their completion mark
(``snapshot_marks``) is written. The journal batches a complete snapshot covers are then
deleted with one range tombstone (``truncate``); the static epoch and head stay.

The rows of each appended batch go to the views (``views.py``) once the batch is durable.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Iterable

from cassandra import ConsistencyLevel
from cassandra.query import BatchStatement, BatchType

from ledger import metrics
from ledger.runtime import failpoints
from ledger.store.cassandra.constants import (FENCE_ATTEMPTS_MAX, JOURNAL_PAGE_BATCHES,
                                              RESOLVE_ATTEMPTS_MAX, SNAPSHOT_LOAD_ATTEMPTS_MAX,
                                              SNAPSHOT_PART_BYTES, SNAPSHOT_PARTS_IN_FLIGHT,
                                              SNAPSHOT_PARTS_PER_READ)
from ledger.store.cassandra.driver import DRIVER_ERRORS, Driver, never_sent
from ledger.store.cassandra.views import Views
from ledger.store.port import (Fenced, JournalBatch, LoadedShard, StoreUnavailable,
                               UnknownOutcome)
from ledger.store.rows import Row

log = logging.getLogger("ledger.store.cassandra")


def _snapshot_digest(snapshot: bytes) -> bytes:
    return hashlib.sha256(snapshot).digest()[:16]


def _snapshot_split(snapshot: bytes, part_bytes: int) -> tuple[bytes, list[bytes]]:
    """(digest, parts) of a snapshot; run in a worker thread (hashing 40 MB takes ~0.1 s)."""
    return _snapshot_digest(snapshot), [snapshot[i:i + part_bytes]
                                        for i in range(0, len(snapshot), part_bytes)] or [b""]


def _snapshot_consistency(write: int, serial: int) -> int:
    """Consistency of snapshot parts, marks and journal truncation.

    They delete journal batches, so they must be as durable as an append: QUORUM (all
    datacenters) with SERIAL appends, LOCAL_QUORUM with LOCAL_SERIAL; the configured write
    consistency if it is stronger still.
    """
    if write in (ConsistencyLevel.ALL, ConsistencyLevel.EACH_QUORUM, ConsistencyLevel.QUORUM):
        return write
    return (ConsistencyLevel.QUORUM if serial == ConsistencyLevel.SERIAL
            else ConsistencyLevel.LOCAL_QUORUM)


class Journal:
    """The epoch-fenced journals and snapshots of one keyspace.

    Args:
        driver: The session's driver bridge.
        views: Where the rows of appended batches go, and whose writer appends wait for.
        write_consistency: Commit consistency of appends (the Paxos commit phase).
        read_consistency: Consistency of journal and snapshot reads.
    """

    def __init__(self, driver: Driver, views: Views, *, write_consistency: int,
                 read_consistency: int) -> None:
        self._driver = driver
        self._views = views
        self._write_cl = write_consistency
        self._serial_cl = driver.serial_consistency
        w, r, s = write_consistency, read_consistency, driver.serial_consistency
        prepare = driver.prepare
        # --- journal: every change of the static columns is a CAS ---
        self._q_head_serial = prepare(
            "SELECT epoch, head FROM {ks}.journal WHERE shard = ? LIMIT 1", s, idempotent=True)
        self._q_head = prepare(
            "SELECT epoch, head FROM {ks}.journal WHERE shard = ? LIMIT 1", r, idempotent=True)
        self._q_fence_new = prepare(
            "UPDATE {ks}.journal SET epoch = ?, head = 0 WHERE shard = ? IF epoch = null",
            w, idempotent=False)
        self._q_fence = prepare(
            "UPDATE {ks}.journal SET epoch = ? WHERE shard = ? IF epoch < ?",
            w, idempotent=False)
        self._q_advance = prepare(
            "UPDATE {ks}.journal SET head = ? WHERE shard = ? IF head = ? AND epoch = ?",
            w, idempotent=False)
        self._q_insert_batch = prepare(
            "INSERT INTO {ks}.journal (shard, seq, writer_epoch, events) VALUES (?, ?, ?, ?)",
            w, idempotent=False)
        self._q_batch_serial = prepare(
            "SELECT writer_epoch, events FROM {ks}.journal WHERE shard = ? AND seq = ?",
            s, idempotent=True)
        self._q_journal = prepare(
            "SELECT seq, writer_epoch, events FROM {ks}.journal WHERE shard = ? AND seq > ? "
            "LIMIT ?", r, idempotent=True)
        # --- snapshots and truncation (as durable as an append: see _snapshot_consistency) ---
        d = _snapshot_consistency(w, s)
        self._q_snapshot_part_put = prepare(
            "INSERT INTO {ks}.snapshot_parts (shard, seq, digest, part, data) "
            "VALUES (?, ?, ?, ?, ?)", d, idempotent=True)
        self._q_snapshot_mark_put = prepare(
            "INSERT INTO {ks}.snapshot_marks (shard, seq, digest, parts, size) "
            "VALUES (?, ?, ?, ?, ?)", d, idempotent=True)
        self._q_snapshot_parts_drop_older = prepare(
            "DELETE FROM {ks}.snapshot_parts WHERE shard = ? AND seq < ?", d, idempotent=True)
        self._q_snapshot_marks_drop_older = prepare(
            "DELETE FROM {ks}.snapshot_marks WHERE shard = ? AND seq < ?", d, idempotent=True)
        self._q_snapshot_mark_latest = prepare(
            "SELECT seq, digest, parts, size FROM {ks}.snapshot_marks WHERE shard = ? LIMIT 1",
            r, idempotent=True)
        self._q_snapshot_parts = prepare(
            "SELECT part, data FROM {ks}.snapshot_parts WHERE shard = ? AND seq = ? "
            "AND digest = ? AND part >= ? LIMIT ?", r, idempotent=True)
        self._q_journal_truncate = prepare(
            "DELETE FROM {ks}.journal WHERE shard = ? AND seq <= ?", d, idempotent=True)

    # --- fencing ----------------------------------------------------------------------

    async def fence(self, shard: int, epoch: int) -> int:
        """Make ``epoch`` the shard's writer epoch; return the last batch number.

        One CAS installs the epoch if the recorded one is lower (or, on a new shard, if there
        is none). Being a Paxos round, it first completes any proposal of a deposed writer
        still in flight; after it, no lower epoch can append. A SERIAL read then learns the
        head, which only this epoch (or a higher one, which deposes us) can move from then
        on, so the head is exact. The CAS deliberately does not condition on the head: a
        deposed writer that keeps appending would otherwise make every attempt fail (the
        contract suite's fence-racing test starved such a version of this method).

        Raises:
            Fenced: a higher epoch is already recorded.
            StoreUnavailable: the store could not be reached, or other fencers kept winning.
                The epoch may be installed already; fencing again with it is safe.
            UnknownOutcome: a CAS timed out and the resolving read failed too.
        """
        self._views.forget_failure(shard)
        statement = self._q_fence.bind((epoch, shard, epoch))
        for _ in range(FENCE_ATTEMPTS_MAX):
            metrics.STORE_LWT.inc()
            try:
                result = await self._driver.run(statement)
            except DRIVER_ERRORS as exc:
                if never_sent(exc):
                    raise StoreUnavailable(f"fence of shard {shard}: {exc}") from exc
                # Unknown outcome: a SERIAL read completes any round still in flight, so what
                # it returns is final. Setting an epoch is idempotent: go on from there.
                recorded, head = await self._resolve_head(shard, exc)
            else:
                found = result[0] if result else {}
                if found.get("[applied]"):
                    recorded, head = await self._serial_head(shard)
                else:
                    recorded, head = found.get("epoch"), None
            if recorded is not None and recorded > epoch:
                raise Fenced(f"shard {shard}: epoch {recorded} recorded, {epoch} is stale")
            if recorded == epoch:
                if head is None:
                    recorded, head = await self._serial_head(shard)
                    if recorded != epoch:
                        continue  # a higher fencer came in between; the loop reports it
                return head or 0
            if recorded is None:
                # A shard never fenced has no epoch to compare with: initialize it.
                statement = self._q_fence_new.bind((epoch, shard))
            else:
                # Another, lower epoch won in between (or the new-shard CAS lost a race).
                statement = self._q_fence.bind((epoch, shard, epoch))
        raise StoreUnavailable(f"fence of shard {shard}: still contended after "
                               f"{FENCE_ATTEMPTS_MAX} attempts")

    async def _serial_head(self, shard: int) -> tuple[int | None, int | None]:
        rows = await self._driver.read(self._q_head_serial, (shard,))
        return (rows[0]["epoch"], rows[0]["head"]) if rows else (None, None)

    async def _resolve_head(self, shard: int,
                            cause: BaseException) -> tuple[int | None, int | None]:
        last: BaseException = cause
        for _ in range(RESOLVE_ATTEMPTS_MAX):
            try:
                rows = list(await self._driver.run(self._q_head_serial, (shard,)) or ())
            except DRIVER_ERRORS as exc:
                last = exc
                continue
            return (rows[0]["epoch"], rows[0]["head"]) if rows else (None, None)
        raise UnknownOutcome(f"shard {shard}: fence timed out ({cause!r}) and the SERIAL "
                             f"read could not resolve it ({last!r})") from cause

    # --- the journal ------------------------------------------------------------------

    async def append(self, shard: int, epoch: int, seq: int, events: bytes,
                     rows: Iterable[Row]) -> None:
        """Durably append batch ``seq`` written by ``epoch``, then write its ``rows``.

        The append is ONE conditional batch on the shard's partition: ``head = seq`` if
        ``head = seq - 1 AND epoch = <epoch>``, plus the batch row. A deposed writer (stale
        epoch) or a second writer of the same number (head moved) cannot append.

        Raises:
            Fenced: ``epoch`` is not the recorded epoch, or batch ``seq`` is taken (the
                message says what was found).
            UnknownOutcome: the append timed out and SERIAL reads could not tell whether it
                was applied; or it was applied but its rows could not be written (the batch
                is durable, so reporting failure would be wrong; replay writes the rows).
            StoreUnavailable: nothing was written.
        """
        if seq < 1:
            raise ValueError(f"batch numbers start at 1, got {seq}")
        events = bytes(events)
        rows = list(rows)
        batch = BatchStatement(batch_type=BatchType.UNLOGGED,
                               consistency_level=self._write_cl,
                               serial_consistency_level=self._serial_cl)
        # Not idempotent as a statement: run twice, the second run fails its condition.
        batch.is_idempotent = False
        batch.add(self._q_advance, (seq, shard, seq - 1, epoch))
        batch.add(self._q_insert_batch, (shard, seq, epoch, events))
        await self._views.wait_room(shard)
        metrics.STORE_LWT.inc()
        try:
            result = await self._driver.run(batch)
        except DRIVER_ERRORS as exc:
            if never_sent(exc):
                raise StoreUnavailable(f"append of shard {shard} batch {seq}: {exc}") from exc
            # A CAS timeout (WriteTimeout with write_type CAS, or the client's own deadline),
            # Unavailable, or a broken connection: the proposal may still be applied later.
            await self._resolve_append(shard, epoch, seq, events, exc)
        else:
            # The CAS was sent exactly once (the retry policy never re-sends it), so "not
            # applied" means someone else holds the epoch or the number, never ourselves.
            if not (result and result[0].get("[applied]")):
                found: dict = next(
                    (r for r in (result or ()) if "epoch" in r or "head" in r), {})
                raise self._refused(shard, epoch, seq, found)
        # The batch is durable: its rows are views, written behind the commit path (a row
        # write costs more than the journal append, and it needs no serial quorum).
        metrics.STORE_APPENDS.inc()
        self._views.enqueue(shard, seq, rows)

    @staticmethod
    def _refused(shard: int, epoch: int, seq: int, found: dict) -> Fenced:
        """Explain a CAS that was not applied, from the values it found."""
        recorded, head = found.get("epoch"), found.get("head")
        if recorded is None:
            what = "no epoch recorded (the shard was never fenced)"
        elif recorded != epoch:
            what = f"epoch {recorded} recorded"
        else:
            what = f"head is {head}, so batch {seq} is taken or out of order"
        return Fenced(f"shard {shard}: append of batch {seq} by epoch {epoch} refused: {what}")

    async def _resolve_append(self, shard: int, epoch: int, seq: int, events: bytes,
                              cause: BaseException) -> None:
        """Decide a timed-out append with a SERIAL read of batch ``seq``.

        A read at SERIAL runs a Paxos round on the partition: it completes any proposal
        accepted by a quorum and supersedes one accepted by fewer (Paxos v2, and v1 since
        CASSANDRA-12126), so once it returns, the proposal can no longer be applied and the
        answer is final. Returns if the batch is there (success).

        Raises:
            Fenced: another writer's batch holds ``seq``.
            StoreUnavailable: the batch is not there and never will be.
            UnknownOutcome: every resolving read failed.
        """
        last: BaseException = cause
        for _ in range(RESOLVE_ATTEMPTS_MAX):
            try:
                rows = list(await self._driver.run(self._q_batch_serial, (shard, seq)) or ())
            except DRIVER_ERRORS as exc:
                last = exc
                continue
            if not rows:
                raise StoreUnavailable(f"append of shard {shard} batch {seq} timed out "
                                       f"({type(cause).__name__}) and was not applied")
            if rows[0]["writer_epoch"] == epoch and rows[0]["events"] == events:
                return
            raise Fenced(f"shard {shard}: batch {seq} is held by epoch "
                         f"{rows[0]['writer_epoch']} (append by epoch {epoch} timed out)")
        raise UnknownOutcome(f"shard {shard} batch {seq}: append timed out ({cause!r}) and "
                             f"the SERIAL read could not resolve it ({last!r})") from cause

    async def journal_position(self, shard: int) -> tuple[int, int, int]:
        """(epoch, last batch number, batch number of the latest snapshot) of a shard."""
        heads, snaps = await asyncio.gather(self._driver.read(self._q_head, (shard,)),
                                            self._driver.read(self._q_snapshot_mark_latest, (shard,)))
        epoch = (heads[0]["epoch"] or 0) if heads else 0
        head = (heads[0]["head"] or 0) if heads else 0
        return epoch, head, (snaps[0]["seq"] if snaps else 0)

    async def load(self, shard: int) -> LoadedShard:
        """Read the latest complete snapshot and every batch after it, in order, page by page.

        The head is read along and the batches are checked to run without gaps from the
        snapshot up to at least that head, so a read that missed batches fails loudly
        instead of handing the new owner a shortened journal. If the journal starts after
        the snapshot read (another owner's compaction saved a newer snapshot and truncated
        the journal meanwhile), the load starts again from the newer snapshot.

        Raises:
            StoreUnavailable: the store could not be reached, the journal read came back
                incomplete, or it raced truncations ``SNAPSHOT_LOAD_ATTEMPTS_MAX`` times.
        """
        for _ in range(SNAPSHOT_LOAD_ATTEMPTS_MAX):
            head_rows = await self._driver.read(self._q_head, (shard,))
            snapshot_seq, snapshot = await self.load_snapshot(shard)
            head = (head_rows[0]["head"] if head_rows else None) or 0
            batches: list[JournalBatch] = []
            after = snapshot_seq
            while True:
                page = await self.read_journal(shard, after, JOURNAL_PAGE_BATCHES)
                batches.extend(page)
                if len(page) < JOURNAL_PAGE_BATCHES:
                    break
                after = page[-1].seq
            if ((not batches and head > snapshot_seq)
                    or (batches and batches[0].seq > snapshot_seq + 1)):
                # The first batches after the snapshot are missing: truncated under us if a
                # newer snapshot covers them now (load again from it), else a broken read.
                newer, _ = await self._latest_mark_seq(shard)
                if newer > snapshot_seq:
                    continue
            expected = snapshot_seq + 1
            for batch in batches:
                if batch.seq != expected:
                    raise StoreUnavailable(f"shard {shard}: journal read has a gap before "
                                           f"batch {batch.seq} (expected {expected})")
                expected += 1
            if expected - 1 < head:
                raise StoreUnavailable(f"shard {shard}: journal read ended at batch "
                                       f"{expected - 1}, head is {head}")
            return LoadedShard(snapshot, snapshot_seq, batches)
        raise StoreUnavailable(f"shard {shard}: the journal was truncated under every one of "
                               f"{SNAPSHOT_LOAD_ATTEMPTS_MAX} loads")

    async def _latest_mark_seq(self, shard: int) -> tuple[int, dict | None]:
        rows = await self._driver.read(self._q_snapshot_mark_latest, (shard,))
        return (rows[0]["seq"], rows[0]) if rows else (0, None)

    async def load_snapshot(self, shard: int) -> tuple[int, bytes | None]:
        """(seq, bytes) of the latest complete snapshot, or (0, None).

        Reads the newest completion mark, then its parts (``SNAPSHOT_PARTS_PER_READ`` per
        round trip), and checks their number, size and digest. Parts dropped under the read
        (a newer snapshot completed meanwhile) make it start again from the newer mark.

        Raises:
            StoreUnavailable: the store could not be reached, the parts kept vanishing, or
                they do not match their mark (a damaged snapshot is never loaded).
        """
        for _ in range(SNAPSHOT_LOAD_ATTEMPTS_MAX):
            seq, mark = await self._latest_mark_seq(shard)
            if mark is None:
                return 0, None
            digest, count = mark["digest"], mark["parts"]
            parts: list[bytes] = []
            while len(parts) < count:
                rows = await self._driver.read(self._q_snapshot_parts, (
                    shard, seq, digest, len(parts),
                    min(SNAPSHOT_PARTS_PER_READ, count - len(parts))))
                if not rows or rows[0]["part"] != len(parts):
                    break
                parts.extend(r["data"] for r in rows)
            if len(parts) < count:
                newer, _ = await self._latest_mark_seq(shard)
                if newer > seq:
                    continue  # replaced while we read it: read the newer one
                raise StoreUnavailable(f"shard {shard}: snapshot {seq} is marked complete "
                                       f"with {count} parts, but only {len(parts)} were read")
            snapshot = b"".join(parts)
            found = await asyncio.to_thread(_snapshot_digest, snapshot)
            if len(snapshot) != mark["size"] or found != digest:
                raise StoreUnavailable(f"shard {shard}: snapshot {seq} does not match its "
                                       f"mark ({len(snapshot)} bytes, {mark['size']} marked)")
            return seq, snapshot
        raise StoreUnavailable(f"shard {shard}: snapshots kept being replaced during "
                               f"{SNAPSHOT_LOAD_ATTEMPTS_MAX} reads")

    async def read_journal(self, shard: int, after_seq: int = 0,
                           limit: int = 1000) -> list[JournalBatch]:
        """Batches numbered above ``after_seq``, in order, at most ``limit``.

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        out: list[JournalBatch] = []
        while len(out) < limit:
            page_max = min(limit - len(out), JOURNAL_PAGE_BATCHES)
            rows = await self._driver.read(self._q_journal, (shard, after_seq, page_max))
            out.extend(JournalBatch(r["seq"], r["writer_epoch"], r["events"]) for r in rows)
            if len(rows) < page_max:
                break
            after_seq = rows[-1]["seq"]
        return out

    async def save_snapshot(self, shard: int, seq: int, snapshot: bytes) -> bool:
        """Store a snapshot after batch ``seq`` in parts, mark it complete, drop older ones.

        Order: the rows of the batches up to ``seq`` (views: once the journal before the
        snapshot is truncated, no replay rewrites them), the parts (``SNAPSHOT_PART_BYTES``
        each, ``SNAPSHOT_PARTS_IN_FLIGHT`` at a time), then the completion mark, then one
        range delete of older parts and marks. A failure before the mark leaves the previous
        snapshot in force (the parts are garbage the next save's range delete drops); one
        after it leaves a complete snapshot. Parts and mark are written at QUORUM (in the
        local durability mode LOCAL_QUORUM): as durable as a journal append, because the
        journal they cover is deleted next.

        Returns:
            False if a complete snapshot at ``seq`` or above exists (nothing is written).

        Raises:
            StoreUnavailable: the store could not be reached (some parts may be written).
        """
        await self._views.flush(shard, seq)
        latest, _ = await self._latest_mark_seq(shard)
        if latest >= seq:
            return False
        digest, parts = await asyncio.to_thread(_snapshot_split, bytes(snapshot),
                                                SNAPSHOT_PART_BYTES)
        statements = [self._q_snapshot_part_put.bind((shard, seq, digest, i, part))
                      for i, part in enumerate(parts)]
        try:
            await self._driver.write_all(statements, SNAPSHOT_PARTS_IN_FLIGHT)
            if failpoints.fault("store.snapshot_before_marker"):
                raise StoreUnavailable(f"failpoint: snapshot of shard {shard} at {seq}: parts "
                                       f"written, mark not")
            await self._driver.run(self._q_snapshot_mark_put,
                            (shard, seq, digest, len(parts), len(snapshot)))
        except DRIVER_ERRORS as exc:
            raise StoreUnavailable(f"snapshot of shard {shard} at {seq}: "
                                   f"{type(exc).__name__}: {exc}") from exc
        try:
            await self._driver.run(self._q_snapshot_marks_drop_older, (shard, seq))
            await self._driver.run(self._q_snapshot_parts_drop_older, (shard, seq))
        except DRIVER_ERRORS as exc:  # the snapshot is complete; the next save drops them
            log.warning("shard %d: older snapshots not dropped yet: %s", shard, exc)
        return True

    async def truncate_journal(self, shard: int, through_seq: int) -> None:
        """Delete the batches numbered ``through_seq`` and below: ONE range tombstone.

        The static epoch and head are not touched (a range delete of clustering rows leaves
        the partition's static row). Reads start after the latest snapshot (``seq > ?``), so
        they seek past the tombstoned range instead of scanning it.

        Raises:
            ValueError: no complete snapshot at ``through_seq`` or above.
            StoreUnavailable: the store could not be reached.
        """
        latest, _ = await self._latest_mark_seq(shard)
        if latest < through_seq:
            raise ValueError(f"shard {shard}: no complete snapshot covers batch {through_seq} "
                             f"(latest: {latest or 'none'}); the journal stays")
        try:
            await self._driver.run(self._q_journal_truncate, (shard, through_seq))
        except DRIVER_ERRORS as exc:
            raise StoreUnavailable(f"truncation of shard {shard} through {through_seq}: "
                                   f"{type(exc).__name__}: {exc}") from exc
