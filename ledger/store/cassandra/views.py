"""The views: rows materialized from the journal, their writer, and their reads.

Tables ``wallets``, ``shard_wallets``, ``wallet_entries``, ``transfers``, ``envelopes``,
``envelopes_by_sender``, ``grabs``, ``grabs_by_receiver`` (``schema.py``) hold
rows written with plain (non-LWT) upserts, each stamped ``USING TIMESTAMP`` with the journal
position of its batch (``ROW_TIMESTAMP_BASE``), so an older batch's row never overwrites a
newer one. They are views: the journal is the system of record, and a new owner writes the
rows of the batches it replays again.

The rows of an appended batch are written behind the commit path by one writer task per shard
(the materializer), in journal order, with a bounded lag (``ROWS_LAG_BATCHES_MAX``): the
journal waits for room before it appends (``wait_room``) and hands the batch's rows over once
it is durable (``enqueue``).

The rows mark. Table ``rows_marks`` holds, per shard, a batch up to which every row of the
shard's batches is written (``mark``, ``read_mark``). The writer raises it with a request
after the one that wrote those rows, at most every ``ROWS_MARK_EVERY_S`` (one statement per
shard per second at most, beside the rows), so a mark is never ahead of the rows it covers;
``flush`` raises it to what it flushed. It is stamped with its batch's position like the
rows, so a late, lower mark changes nothing. A new owner's replay writes again only the rows of the batches
after the mark (``ledger.compaction.replay``): a node that gives a shard up flushes its rows
first (``flush``), so after a planned hand-over the new owner writes none. Measured on the
planned drain (README, "Planned drain"): the row rewrite was about 90 % of a takeover's
replay.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, Iterable

from cassandra import ConsistencyLevel
from cassandra.cluster import Cluster
from cassandra.query import BatchStatement, BatchType, PreparedStatement, Statement

from ledger import metrics
from ledger.core import codec
from ledger.core.model import Entry, Envelope, Grab, Transfer, Wallet
from ledger.core.audit import AuditRow
from ledger.store.cassandra.constants import (AUDIT_BUCKET_BATCHES, KEY_ROWS_TTL_S, ROW_TIMESTAMP_BASE,
                                              ROWS_BATCH_BYTES_MAX, ROWS_IN_FLIGHT_MAX,
                                              ROWS_LAG_BATCHES_MAX, ROWS_MARK_EVERY_S, ROWS_PAGE_MAX,
                                              ROWS_RETRY_BACKOFF_S)
from ledger.store.cassandra.driver import DRIVER_ERRORS, Driver
from ledger.store.port import StoreUnavailable
from ledger.store.rows import (AUDIT_COLS, CLAIM, ENTRY_COLS, ENVELOPE_COLS, GRAB_COLS, IDEM,
                               TRANSFER_COLS, WALLET_COLS, PositionedRow, Row, latest_rows,
                               rows_at)
from ledger.runtime.tasks import spawn

log = logging.getLogger("ledger.store.cassandra")


# Consistency levels whose writes and reads always meet, across every datacenter: a rows mark
# read at one of these proves its rows are readable (see ``Views.read_mark``).
_GLOBAL_WRITES = frozenset({ConsistencyLevel.QUORUM, ConsistencyLevel.EACH_QUORUM,
                            ConsistencyLevel.ALL})
_GLOBAL_READS = frozenset({ConsistencyLevel.QUORUM, ConsistencyLevel.ALL})


def row_timestamp(seq: int) -> int:
    """The write timestamp of the rows of batch ``seq`` (see ``ROW_TIMESTAMP_BASE``).

    Raises:
        ValueError: ``seq`` is not a batch number.
    """
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ValueError(f"a row's journal position must be a batch number >= 0, got {seq!r}")
    return ROW_TIMESTAMP_BASE + seq


class Views:
    """Writes and reads the materialized rows of one keyspace.

    Args:
        driver: The session's driver bridge.
        cluster: The driver cluster (its token map places row batches).
        local_dc: This process's datacenter.
        write_consistency: Consistency of row upserts.
        read_consistency: Consistency of row reads.
    """

    def __init__(self, driver: Driver, cluster: Cluster, local_dc: str, *,
                 write_consistency: int, read_consistency: int) -> None:
        self._driver = driver
        self._cluster = cluster
        self._keyspace = driver.keyspace
        self._local_dc = local_dc
        self._write_cl = write_consistency
        self._serial_cl = driver.serial_consistency
        self._closed = False
        # Rows waiting to be materialized, per shard, in journal order, and the writer task
        # of each shard (one at a time per shard, so a later row never lands before an
        # earlier one of the same key).
        self._rows_pending: dict[int, list[tuple[int, list]]] = {}
        self._rows_writer: dict[int, asyncio.Task] = {}
        self._rows_done: dict[int, int] = {}
        # The rows mark last written per shard: the writer raises it to ``_rows_done`` when
        # that is higher.
        self._rows_marked: dict[int, int] = {}
        self._rows_marked_at: dict[int, float] = {}
        # A mark read proves its rows readable only if every read meets every write: quorums
        # of all replicas. With LOCAL writes another region's mark may arrive before its rows
        # (replication between datacenters keeps no order across partitions): not used then.
        self._marks_usable = (write_consistency in _GLOBAL_WRITES
                              and read_consistency in _GLOBAL_READS)
        # The error that stopped a shard's row writer (not a driver error: a bug, e.g. a value
        # the driver cannot encode). Appends of the shard then fail with StoreUnavailable
        # instead of waiting for rows that will never be written; the next fence clears it.
        self._rows_failed: dict[int, BaseException] = {}
        self._rows_changed = asyncio.Condition()
        w, r, prepare = write_consistency, read_consistency, driver.prepare
        # Every row upsert is stamped with its batch's journal position (ROW_TIMESTAMP_BASE).
        self._q_wallet_put = prepare(
            "INSERT INTO {ks}.wallets (shard, " + ", ".join(WALLET_COLS) + ") VALUES ("
            + ", ".join("?" * (len(WALLET_COLS) + 1)) + ") USING TIMESTAMP ?",
            w, idempotent=True)
        self._q_shard_wallet_put = prepare(
            "INSERT INTO {ks}.shard_wallets (shard, " + ", ".join(WALLET_COLS) + ") VALUES ("
            + ", ".join("?" * (len(WALLET_COLS) + 1)) + ") USING TIMESTAMP ?",
            w, idempotent=True)
        self._q_entry_put = prepare(
            "INSERT INTO {ks}.wallet_entries (" + ", ".join(ENTRY_COLS) + ") VALUES ("
            + ", ".join("?" * len(ENTRY_COLS)) + ") USING TIMESTAMP ?", w, idempotent=True)
        self._q_transfer_put = prepare(
            "INSERT INTO {ks}.transfers (shard, " + ", ".join(TRANSFER_COLS) + ") VALUES ("
            + ", ".join("?" * (len(TRANSFER_COLS) + 1)) + ") USING TIMESTAMP ?",
            w, idempotent=True)
        self._q_envelope_put = prepare(
            "INSERT INTO {ks}.envelopes (shard, " + ", ".join(ENVELOPE_COLS) + ") VALUES ("
            + ", ".join("?" * (len(ENVELOPE_COLS) + 1)) + ") USING TIMESTAMP ?",
            w, idempotent=True)
        self._q_envelope_by_sender_put = prepare(
            "INSERT INTO {ks}.envelopes_by_sender (sender_wallet_id, created_at_ms, "
            "envelope_id) VALUES (?, ?, ?) USING TIMESTAMP ?", w, idempotent=True)
        self._q_grab_put = prepare(
            "INSERT INTO {ks}.grabs (" + ", ".join(GRAB_COLS) + ") VALUES ("
            + ", ".join("?" * len(GRAB_COLS)) + ") USING TIMESTAMP ?", w, idempotent=True)
        self._q_grab_by_receiver_put = prepare(
            "INSERT INTO {ks}.grabs_by_receiver (" + ", ".join(GRAB_COLS) + ") VALUES ("
            + ", ".join("?" * len(GRAB_COLS)) + ") USING TIMESTAMP ?", w, idempotent=True)
        self._q_key_put = prepare(
            "INSERT INTO {ks}.idempotency_keys (shard, caller, idempotency_key, kind, record) "
            "VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ? AND TTL " + str(KEY_ROWS_TTL_S),
            w, idempotent=True)
        self._q_audit_put = prepare(
            "INSERT INTO {ks}.audit_chain (bucket, " + ", ".join(AUDIT_COLS) + ") VALUES ("
            + ", ".join("?" * (len(AUDIT_COLS) + 1)) + ") USING TIMESTAMP ?",
            w, idempotent=True)
        self._q_mark_put = prepare(
            "UPDATE {ks}.rows_marks USING TIMESTAMP ? SET seq = ? WHERE shard = ?", w,
            idempotent=True)
        self._q_mark = prepare("SELECT seq FROM {ks}.rows_marks WHERE shard = ?", r,
                               idempotent=True)
        self._q_audit = prepare(
            "SELECT " + ", ".join(AUDIT_COLS) + " FROM {ks}.audit_chain "
            "WHERE shard = ? AND bucket = ? AND seq > ? LIMIT ?", r, idempotent=True)
        self._q_keys = prepare(
            "SELECT kind, record FROM {ks}.idempotency_keys WHERE shard = ? AND caller = ? "
            "AND idempotency_key = ?", r, idempotent=True)
        self._q_entries = prepare(
            "SELECT " + ", ".join(ENTRY_COLS) + " FROM {ks}.wallet_entries "
            "WHERE wallet_id = ? AND version > ? LIMIT ?", r, idempotent=True)
        self._q_transfer = prepare(
            "SELECT " + ", ".join(TRANSFER_COLS) + " FROM {ks}.transfers WHERE transfer_id = ?",
            r, idempotent=True)
        self._q_envelope = prepare(
            "SELECT " + ", ".join(ENVELOPE_COLS) + " FROM {ks}.envelopes WHERE envelope_id = ?",
            r, idempotent=True)
        self._q_grabs = prepare(
            "SELECT " + ", ".join(GRAB_COLS) + " FROM {ks}.grabs "
            "WHERE envelope_id = ? AND position > ? LIMIT ?", r, idempotent=True)
        # A sender's envelope keys and a receiver's grabs, from the first (no ``after``) or
        # strictly after a (ms, envelope id) key (a multi-column slice of the clustering).
        self._q_sent_first = prepare(
            "SELECT created_at_ms, envelope_id FROM {ks}.envelopes_by_sender "
            "WHERE sender_wallet_id = ? LIMIT ?", r, idempotent=True)
        self._q_sent_after = prepare(
            "SELECT created_at_ms, envelope_id FROM {ks}.envelopes_by_sender "
            "WHERE sender_wallet_id = ? AND (created_at_ms, envelope_id) > (?, ?) LIMIT ?",
            r, idempotent=True)
        self._q_received_first = prepare(
            "SELECT " + ", ".join(GRAB_COLS) + " FROM {ks}.grabs_by_receiver "
            "WHERE receiver_wallet_id = ? LIMIT ?", r, idempotent=True)
        self._q_received_after = prepare(
            "SELECT " + ", ".join(GRAB_COLS) + " FROM {ks}.grabs_by_receiver "
            "WHERE receiver_wallet_id = ? AND (at_ms, envelope_id) > (?, ?) LIMIT ?",
            r, idempotent=True)
        self._q_shard_wallets = prepare(
            "SELECT " + ", ".join(WALLET_COLS) + " FROM {ks}.shard_wallets "
            "WHERE shard = ? AND wallet_id > ? LIMIT ?", r, idempotent=True)

    async def wait_room(self, shard: int) -> None:
        """Wait while the shard's rows lag too far behind its journal.

        Raises:
            StoreUnavailable: the shard's row writer stopped on an error (before anything of
                the append is written, so the caller's batch is simply not appended).
        """
        self.raise_if_failed(shard)
        pending = self._rows_pending.get(shard)
        if pending and len(pending) >= ROWS_LAG_BATCHES_MAX:
            async with self._rows_changed:
                await self._rows_changed.wait_for(
                    lambda: len(self._rows_pending.get(shard, ())) < ROWS_LAG_BATCHES_MAX
                    or self._closed or shard in self._rows_failed)
            self.raise_if_failed(shard)

    def raise_if_failed(self, shard: int) -> None:
        """Raise if the shard's row writer stopped on an error (not a driver error).

        Raises:
            StoreUnavailable: it did; the shard must be fenced and loaded again.
        """
        failure = self._rows_failed.get(shard)
        if failure is not None:
            raise StoreUnavailable(
                f"shard {shard}: the row writer stopped on {type(failure).__name__}: "
                f"{failure}; appends are refused until the shard is fenced and loaded again "
                f"(its replay rewrites the rows)") from failure

    def forget_failure(self, shard: int) -> None:
        """A new owner (or a reload) is fencing the shard: start the rows afresh.

        The rows still pending after a failure are dropped: their batches come after the
        latest snapshot (``save_snapshot`` flushes rows first, and ``flush_rows`` fails while
        the writer is stopped), so the replay that follows the fence writes them again.
        """
        if self._rows_failed.pop(shard, None) is not None:
            self._rows_pending.pop(shard, None)

    def enqueue(self, shard: int, seq: int, rows: list[Row]) -> None:
        """Hand the rows of durable batch ``seq`` to the shard's writer (started if idle)."""
        self._rows_pending.setdefault(shard, []).append((seq, rows))
        if shard in self._rows_failed:
            return  # kept for nobody: the next fence drops them and replay rewrites them
        writer = self._rows_writer.get(shard)
        if writer is None or writer.done():
            # Kept until it ends (``spawn``): ``_drain`` retries driver errors and records any
            # other failure for the shard's appends to see (``raise_if_failed``).
            self._rows_writer[shard] = spawn(self._drain(shard), f"rows-{shard}")

    async def _drain(self, shard: int) -> None:
        """Write the shard's pending rows, oldest first, coalescing what is queued.

        Driver errors (timeouts, unavailable replicas) are retried until the rows are written
        or the store closes. Any other error is a bug (e.g. a value the driver cannot encode)
        and would fail the same way again: it is logged with the shard and recorded, so the
        shard's appends fail with StoreUnavailable at once (``wait_room``) and ``flush``
        raises, instead of everything waiting forever for rows that are never written.
        """
        try:
            while not self._closed:
                pending = self._rows_pending.get(shard)
                if not pending:
                    return
                # The mark of the rows written before goes with this request (never ahead of
                # them: those rows are durable already), at most every ROWS_MARK_EVERY_S.
                mark = self._mark_statement(shard, due_only=True)
                taken = list(pending)
                # Each row carries the position of the batch that produced it.
                rows = [(kind, value, seq) for seq, batch_rows in taken
                        for kind, value in batch_rows]
                statements = self._row_statements(shard, rows)
                if mark is not None:
                    statements.append(mark[0])
                try:
                    await self._driver.write_all(statements)
                except DRIVER_ERRORS as exc:
                    log.warning("shard %d: rows not written yet (%s); retrying", shard, exc)
                    await asyncio.sleep(ROWS_RETRY_BACKOFF_S)
                    continue
                if mark is not None:
                    self._marked(shard, mark)
                del pending[:len(taken)]
                async with self._rows_changed:
                    self._rows_done[shard] = max(self._rows_done.get(shard, 0), taken[-1][0])
                    self._rows_changed.notify_all()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("shard %d: the row writer stopped: %s: %s; the shard's appends are "
                      "refused until it is fenced and loaded again", shard,
                      type(exc).__name__, exc, exc_info=exc)
            async with self._rows_changed:
                self._rows_failed[shard] = exc
                self._rows_changed.notify_all()

    async def flush(self, shard: int, seq: int) -> None:
        """Wait until the rows of the shard's batches up to ``seq`` are written, then write
        the rows mark up to them.

        Raises:
            StoreUnavailable: the shard's row writer stopped before writing them, or the
                mark could not be written.
        """
        def written() -> bool:
            pending = self._rows_pending.get(shard)
            return self._closed or not pending or pending[0][0] > seq

        async with self._rows_changed:
            await self._rows_changed.wait_for(
                lambda: written() or shard in self._rows_failed)
        if not written():
            self.raise_if_failed(shard)
        if not self._closed:
            await self.mark(shard, min(seq, self._rows_done.get(shard, 0)))

    # --- the rows mark ------------------------------------------------------------------

    def _mark_statement(self, shard: int,
                        due_only: bool = False) -> tuple[Statement, int] | None:
        """The upsert raising the shard's rows mark to the rows written, and that batch; or
        None when the mark is there already (or, ``due_only``, was raised less than
        ``ROWS_MARK_EVERY_S`` ago)."""
        done = self._rows_done.get(shard, 0)
        if not self._marks_usable or done <= self._rows_marked.get(shard, 0):
            return None
        if due_only and (time.monotonic() - self._rows_marked_at.get(shard, -math.inf)
                         < ROWS_MARK_EVERY_S):
            return None
        return self._q_mark_put.bind((row_timestamp(done), done, shard)), done

    def _marked(self, shard: int, mark: tuple[Statement, int]) -> None:
        self._rows_marked[shard] = max(self._rows_marked.get(shard, 0), mark[1])
        self._rows_marked_at[shard] = time.monotonic()

    async def mark(self, shard: int, seq: int) -> None:
        """Record that every row of the shard's batches up to ``seq`` is written (a replay
        that wrote them, or a flush). Writes nothing if the mark is that high already.

        Raises:
            StoreUnavailable: the mark could not be written.
        """
        if seq <= 0:
            return
        self._rows_done[shard] = max(self._rows_done.get(shard, 0), seq)
        mark = self._mark_statement(shard)
        if mark is None:
            return
        try:
            await self._driver.write_all([mark[0]])
        except DRIVER_ERRORS as exc:
            raise StoreUnavailable(f"rows mark of shard {shard}: {type(exc).__name__}: "
                                   f"{exc}") from exc
        self._marked(shard, mark)

    async def read_mark(self, shard: int) -> int:
        """The shard's rows mark (0 if none, or if the consistency levels are LOCAL ones):
        every row of its batches up to it is written and readable.

        Raises:
            StoreUnavailable: the store could not be read.
        """
        if not self._marks_usable:
            return 0
        rows = await self._driver.read(self._q_mark, (shard,))
        return rows[0]["seq"] if rows and rows[0]["seq"] is not None else 0

    # --- rows ---------------------------------------------------------------------------

    def _row_statements(self, shard: int,
                        rows: Iterable[tuple[str, Any, int]]) -> list[Statement]:
        """Upserts for ``rows`` (kind, value, batch seq), packed into few requests.

        Every upsert is stamped ``USING TIMESTAMP`` with its batch's journal position
        (``row_timestamp``), so a row of an older batch never overwrites one of a newer
        batch, whatever order requests arrive in. Of rows with one key, the one of the
        highest batch wins, and among those the last.

        The Python driver spends about 0.25 ms of CPU per request, which dominated appends
        with rows (300 rows: 52 ms of client CPU as single statements). So rows are packed
        into UNLOGGED batches: a batch is not atomic across partitions, which views do not
        need (each upsert is idempotent), but it is one request. Each batch holds upserts
        for partitions with the same first local replica, so the coordinator the token-aware
        policy picks for it owns them all, and stays below ``ROWS_BATCH_BYTES_MAX``, under
        the server's multi-partition batch limit. The shard's ``shard_wallets`` rows share a
        partition and go as one single-partition batch, which has no size limit but the
        mutation size.
        """
        # Every position is checked (ValueError) before any statement is built; the stamps
        # order rows exactly as their positions do, so the latest row per key is the one of
        # the highest stamp.
        stamped: list = [(kind, value, row_timestamp(seq)) for kind, value, seq in rows]
        latest = latest_rows(stamped)
        wallets, entries, transfers = latest.wallets, latest.entries, latest.transfers
        upserts: list[tuple[PreparedStatement, tuple, int]] = []
        wallet_values = [(shard, w.wallet_id, w.currency, w.balance_minor, w.held_minor,
                          w.version, w.allow_negative, w.frozen, w.created_at_ms, ts)
                         for w, ts in wallets.values()]
        for v in wallet_values:
            upserts.append((self._q_wallet_put, v, 80 + len(v[1]) + len(v[2])))
        for e, ts in entries.values():
            upserts.append((self._q_entry_put,
                            (e.wallet_id, e.version, e.transfer_id, e.kind, e.amount_minor,
                             e.balance_after_minor, e.counterparty_wallet_id, e.currency,
                             e.at_ms, ts),
                            100 + len(e.wallet_id) + len(e.transfer_id)
                            + len(e.counterparty_wallet_id) + len(e.kind) + len(e.currency)))
        for t, ts in transfers.values():
            upserts.append((self._q_transfer_put,
                            (shard, t.transfer_id, t.kind, t.from_wallet_id, t.to_wallet_id,
                             t.amount_minor, t.currency, t.memo, t.caller, t.idempotency_key,
                             t.created_at_ms, t.state, t.status, t.status_field,
                             t.status_detail, t.credited, ts),
                            160 + sum(len(x) for x in (
                                t.transfer_id, t.kind, t.from_wallet_id, t.to_wallet_id,
                                t.currency, t.memo, t.caller, t.idempotency_key, t.state,
                                t.status_field, t.status_detail))))
        for env, ts in latest.envelopes.values():
            upserts.append((self._q_envelope_put,
                            (shard, *(getattr(env, c) for c in ENVELOPE_COLS), ts),
                            220 + sum(len(x) for x in (
                                env.envelope_id, env.sender_wallet_id, env.currency, env.kind,
                                env.receiver_wallet_id, env.memo, env.caller, env.idempotency_key,
                                env.funding_transfer_id, env.refund_transfer_id))))
            # The sender's listing: its key never changes (sender and creation time are
            # terms of the envelope), so every upsert rewrites the same row.
            upserts.append((self._q_envelope_by_sender_put,
                            (env.sender_wallet_id, env.created_at_ms, env.envelope_id, ts),
                            40 + len(env.sender_wallet_id) + len(env.envelope_id)))
        for g, ts in latest.grabs.values():
            values = (*(getattr(g, c) for c in GRAB_COLS), ts)
            size = 80 + sum(len(x) for x in (g.envelope_id, g.receiver_wallet_id,
                                             g.transfer_id, g.caller, g.idempotency_key))
            upserts.append((self._q_grab_put, values, size))
            upserts.append((self._q_grab_by_receiver_put, values, size))
        for (kind, caller, key), (record, ts) in latest.keys.items():
            blob = codec.dumps(record)
            upserts.append((self._q_key_put, (shard, caller, key, kind, blob, ts),
                            60 + len(caller) + len(key) + len(blob)))
        statements: list[Statement] = []
        # An audit row may be far above ROWS_BATCH_BYTES_MAX (the records of a whole group
        # commit): each goes as a statement of its own, never in a multi-partition batch.
        for a, ts in latest.audits.values():
            statements.append(self._q_audit_put.bind(
                (a.seq // AUDIT_BUCKET_BATCHES, a.shard, a.seq, a.epoch, a.at_ms, a.prev_seq,
                 a.prev_hash, a.records, a.hash, ts)))
        metrics.STORE_ROWS_WRITTEN.inc(len(upserts) + len(statements))
        if wallet_values:
            by_shard = self._new_rows_batch()
            for v in wallet_values:
                by_shard.add(self._q_shard_wallet_put, v)
            statements.append(by_shard)
        open_batches: dict[Any, tuple[BatchStatement, list[int]]] = {}
        for prepared, values, size in upserts:
            bound = prepared.bind(values)
            replica = self._first_local_replica(bound.routing_key)
            batch, used = open_batches.get(replica, (None, [0]))
            if batch is None or used[0] + size > ROWS_BATCH_BYTES_MAX:
                batch, used = self._new_rows_batch(), [0]
                open_batches[replica] = (batch, used)
                statements.append(batch)
            batch.add(bound)
            used[0] += size
        return statements

    def _new_rows_batch(self) -> BatchStatement:
        batch = BatchStatement(batch_type=BatchType.UNLOGGED, consistency_level=self._write_cl,
                               serial_consistency_level=self._serial_cl)
        batch.is_idempotent = True  # upserts of whole rows: running one twice changes nothing
        return batch

    def _first_local_replica(self, routing_key: bytes | None) -> Any:
        if routing_key is None:
            return None
        for host in self._cluster.metadata.get_replicas(self._keyspace, routing_key):
            if host.datacenter == self._local_dc:
                return host.endpoint
        return None

    async def write_rows(self, shard: int, rows: Iterable[Row | PositionedRow],
                         seq: int | None = None) -> None:
        """Upsert materialized rows as of journal batch ``seq``, concurrently (idempotent;
        used by replay). Each upsert is stamped with its row's position (its own third
        element, else ``seq``), so it never replaces a row of a newer batch.

        Raises:
            ValueError: a row has no position.
            StoreUnavailable: some rows could not be written (others may have been).
        """
        positioned = rows_at(rows, seq)
        try:
            await self._driver.write_all(self._row_statements(shard, positioned))
        except DRIVER_ERRORS as exc:
            raise StoreUnavailable(f"rows of shard {shard}: {type(exc).__name__}: "
                                   f"{exc}") from exc

    async def read_audit(self, shard: int, after_seq: int, limit: int,
                         head: int) -> list[AuditRow]:
        """A shard's audit rows above ``after_seq``, ascending, at most ``limit``, reading
        bucket after bucket up to the one of batch ``head`` (the journal head: a bucket may
        be empty, when none of its batches had audit records, so an empty bucket is not the
        end).

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        out: list[AuditRow] = []
        bucket = (after_seq + 1) // AUDIT_BUCKET_BATCHES
        while len(out) < limit and bucket <= head // AUDIT_BUCKET_BATCHES:
            page_max = min(limit - len(out), ROWS_PAGE_MAX)
            rows = await self._driver.read(self._q_audit, (shard, bucket, after_seq, page_max))
            out.extend(AuditRow(*(r[c] for c in AUDIT_COLS)) for r in rows)
            if len(rows) < page_max:
                bucket += 1
            else:
                after_seq = rows[-1]["seq"]
        return out

    async def list_entries(self, wallet_id: str, after_version: int,
                           limit: int) -> list[Entry]:
        """A wallet's entries with version above ``after_version``, ascending, at most ``limit``.

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        out: list[Entry] = []
        while len(out) < limit:
            page_max = min(limit - len(out), ROWS_PAGE_MAX)
            rows = await self._driver.read(self._q_entries, (wallet_id, after_version, page_max))
            out.extend(Entry(*(r[c] for c in ENTRY_COLS)) for r in rows)
            if len(rows) < page_max:
                break
            after_version = rows[-1]["version"]
        return out

    async def get_transfer(self, transfer_id: str) -> Transfer | None:
        """The materialized transfer, or None.

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        rows = await self._driver.read(self._q_transfer, (transfer_id,))
        return Transfer(*(rows[0][c] for c in TRANSFER_COLS)) if rows else None

    async def get_envelope(self, envelope_id: str) -> Envelope | None:
        """The materialized envelope (its latest row), or None.

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        rows = await self._driver.read(self._q_envelope, (envelope_id,))
        return Envelope(*(rows[0][c] for c in ENVELOPE_COLS)) if rows else None

    async def list_grabs(self, envelope_id: str, after_position: int,
                         limit: int) -> list[Grab]:
        """An envelope's grabs with position above ``after_position``, ascending, at most
        ``limit`` (one partition of ``grabs``).

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        out: list[Grab] = []
        while len(out) < limit:
            page_max = min(limit - len(out), ROWS_PAGE_MAX)
            rows = await self._driver.read(self._q_grabs,
                                           (envelope_id, after_position, page_max))
            out.extend(Grab(*(r[c] for c in GRAB_COLS)) for r in rows)
            if len(rows) < page_max:
                break
            after_position = rows[-1]["position"]
        return out

    async def list_envelopes_sent(self, wallet_id: str, after: tuple[int, str] | None,
                                  limit: int) -> list[Envelope]:
        """A sender's envelopes by (created_at_ms, envelope_id) strictly after ``after``, at
        most ``limit``: the keys from ``envelopes_by_sender`` (one partition), then each
        envelope's latest row from ``envelopes``. A key whose envelope row is not there (the
        two tables are written by one unlogged batch, not atomically) is skipped and the
        next keys are read, so a short page still means the last one.

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        out: list[Envelope] = []
        while len(out) < limit:
            page_max = min(limit - len(out), ROWS_PAGE_MAX)
            if after is None:
                keys = await self._driver.read(self._q_sent_first, (wallet_id, page_max))
            else:
                keys = await self._driver.read(self._q_sent_after,
                                               (wallet_id, after[0], after[1], page_max))
            for i in range(0, len(keys), ROWS_IN_FLIGHT_MAX):
                found = await asyncio.gather(*(
                    self.get_envelope(k["envelope_id"])
                    for k in keys[i:i + ROWS_IN_FLIGHT_MAX]))
                out.extend(e for e in found if e is not None)
            if len(keys) < page_max:
                break
            after = (keys[-1]["created_at_ms"], keys[-1]["envelope_id"])
        return out

    async def list_grabs_received(self, wallet_id: str, after: tuple[int, str] | None,
                                  limit: int) -> list[Grab]:
        """A receiver's grabs by (at_ms, envelope_id) strictly after ``after``, at most
        ``limit`` (one partition of ``grabs_by_receiver``, which holds whole grab rows).

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        out: list[Grab] = []
        while len(out) < limit:
            page_max = min(limit - len(out), ROWS_PAGE_MAX)
            if after is None:
                rows = await self._driver.read(self._q_received_first, (wallet_id, page_max))
            else:
                rows = await self._driver.read(self._q_received_after,
                                               (wallet_id, after[0], after[1], page_max))
            out.extend(Grab(*(r[c] for c in GRAB_COLS)) for r in rows)
            if len(rows) < page_max:
                break
            after = (rows[-1]["at_ms"], rows[-1]["envelope_id"])
        return out

    async def load_keys(self, shard: int, keys: dict[tuple[str, str], str]) -> dict:
        """See ``JournalStore.load_keys``: one read per key (its own partition), at the read
        consistency (QUORUM by default: it overlaps every QUORUM row write), concurrently.

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        async def one(caller: str, key: str, transfer_id: str) -> tuple:
            record = claim = None
            for row in await self._driver.read(self._q_keys, (shard, caller, key)):
                value = codec.loads(bytes(row["record"]))
                if row["kind"] == IDEM:
                    record = value
                elif row["kind"] == CLAIM:
                    claim = value
            if record is not None and record.target.startswith("transfer:"):
                transfer_id = record.target[len("transfer:"):]
            transfer = await self.get_transfer(transfer_id) if transfer_id else None
            return record, claim, transfer
        found = await asyncio.gather(*(one(c, k, t) for (c, k), t in keys.items()))
        return dict(zip(keys, found))

    async def scan_wallets(self, shard: int) -> list[Wallet]:
        """Every materialized wallet of ``shard``, ordered by wallet id.

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        out: list[Wallet] = []
        after = ""
        while True:
            rows = await self._driver.read(self._q_shard_wallets, (shard, after, ROWS_PAGE_MAX))
            out.extend(Wallet(*(r[c] for c in WALLET_COLS)) for r in rows)
            if len(rows) < ROWS_PAGE_MAX:
                return out
            after = rows[-1]["wallet_id"]

    async def close(self, timeout_s: float) -> None:
        """Let pending rows be written (waiting at most ``timeout_s``), then stop the writers.

        Rows still pending after that are dropped; a new owner's replay writes them again.
        """
        writers = [t for t in self._rows_writer.values() if not t.done()]
        if writers and not self._closed:
            await asyncio.wait(writers, timeout=timeout_s)
        async with self._rows_changed:
            self._closed = True
            self._rows_changed.notify_all()
        for task in self._rows_writer.values():
            task.cancel()
