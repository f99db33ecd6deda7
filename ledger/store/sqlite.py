"""SQLite adapter of the storage port: the embedded default of ``ledgerd dev``.

One connection, owned by one writer thread. Calls from the event loop are queued to it and the
thread commits everything it finds queued in ONE transaction (group commit across shards), each
call inside its own savepoint so that one fenced append does not undo the others. WAL mode with
``synchronous=FULL``: a batch is on disk when ``append`` returns.

Views behind the journal. An append's transaction writes its journal batch only; the rows it
changes (wallets, history entries, transfers, envelopes, grabs, key records, audit rows) wait
in the writer thread and are written later, many batches in one transaction, coalesced per
key, with each shard's rows mark (``rows_marks``: every row of its batches up to there is
written) in the same transaction. They are written once ``ROWS_BEHIND_MAX`` rows wait, once
the oldest has waited ``ROWS_BEHIND_MS``, and before any call other than an append or a read
of the journal alone: every read of a view, load, snapshot, fence or key expiry sees every
row of every batch acknowledged before it was asked. A crash loses rows, never a batch: the
next load answers ``rows_seq`` = the mark, and the replay writes the rows of the batches
after it (``ledger.compaction.replay``), as on Cassandra. Why: each append's transaction
wrote every view row into its random place in the B-trees before its fsync, and the callers
waited for that; measured over ten alternating ``ledger-bench`` pairs the gain is within the
noise (a row costs the same wherever it is written), and the design is the step a writer in
a process of its own needs (README, "Views behind the journal").
"""

from __future__ import annotations

import asyncio
import logging
import operator
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from ledger import metrics
from ledger.runtime import failpoints
from ledger.core import codec
from ledger.core.model import Entry, Envelope, Grab, IdempotencyRecord, Transfer, Wallet
from ledger.store.bridge import settle as _settle
from ledger.store.port import Fenced, JournalBatch, LoadedShard, StoreUnavailable
from ledger.core.audit import AuditRow
from ledger.store.rows import (AUDIT_COLS as _AUDIT_COLS, ENTRY_COLS as _ENTRY_COLS, ENVELOPE_COLS as _ENVELOPE_COLS,
                               GRAB_COLS as _GRAB_COLS, TRANSFER_COLS as _TRANSFER_COLS,
                               WALLET_COLS as _WALLET_COLS, AUDIT, CLAIM, IDEM, PositionedRow, Row,
                               rows_at,
                               last_of_each_key)

log = logging.getLogger("ledger.store.sqlite")

# Calls folded into one transaction at most; the rest wait for the next one.
GROUP_COMMIT_CALLS_MAX = 512

# Rows of acknowledged batches the writer thread holds before it writes them (see the
# module docstring), and how long the oldest of them may wait. The lag of the views (what
# ``ledgerctl reconcile`` and another process reading the file see) is bounded by these.
ROWS_BEHIND_MAX = 20_000
ROWS_BEHIND_MS = 100.0

# SQLite page cache (KiB).
CACHE_KIB = 256 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS shard_heads (
  shard INTEGER PRIMARY KEY, epoch INTEGER NOT NULL, head INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS journal (
  shard INTEGER NOT NULL, seq INTEGER NOT NULL, epoch INTEGER NOT NULL, events BLOB NOT NULL,
  PRIMARY KEY (shard, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshots (
  shard INTEGER PRIMARY KEY, seq INTEGER NOT NULL, snapshot BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS wallets (
  wallet_id TEXT PRIMARY KEY, shard INTEGER NOT NULL, currency TEXT NOT NULL,
  balance_minor INTEGER NOT NULL, held_minor INTEGER NOT NULL, version INTEGER NOT NULL,
  allow_negative INTEGER NOT NULL, frozen INTEGER NOT NULL, created_at_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS wallets_by_shard ON wallets (shard);
CREATE TABLE IF NOT EXISTS wallet_entries (
  wallet_id TEXT NOT NULL, version INTEGER NOT NULL, transfer_id TEXT NOT NULL,
  kind TEXT NOT NULL, amount_minor INTEGER NOT NULL, balance_after_minor INTEGER NOT NULL,
  counterparty_wallet_id TEXT NOT NULL, currency TEXT NOT NULL, at_ms INTEGER NOT NULL,
  PRIMARY KEY (wallet_id, version)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS transfers (
  transfer_id TEXT PRIMARY KEY, shard INTEGER NOT NULL, kind TEXT NOT NULL,
  from_wallet_id TEXT NOT NULL, to_wallet_id TEXT NOT NULL, amount_minor INTEGER NOT NULL,
  currency TEXT NOT NULL, memo TEXT NOT NULL, caller TEXT NOT NULL,
  idempotency_key TEXT NOT NULL, created_at_ms INTEGER NOT NULL, state TEXT NOT NULL,
  status INTEGER NOT NULL, status_field TEXT NOT NULL, status_detail TEXT NOT NULL,
  credited INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS idempotency_keys (
  shard INTEGER NOT NULL, caller TEXT NOT NULL, idempotency_key TEXT NOT NULL,
  kind TEXT NOT NULL, record BLOB NOT NULL, created_at_ms INTEGER NOT NULL,
  PRIMARY KEY (shard, caller, idempotency_key, kind)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_keys_by_age ON idempotency_keys (shard, created_at_ms);
CREATE TABLE IF NOT EXISTS envelopes (
  envelope_id TEXT PRIMARY KEY, shard INTEGER NOT NULL, sender_wallet_id TEXT NOT NULL,
  currency TEXT NOT NULL, kind TEXT NOT NULL, total_minor INTEGER NOT NULL,
  shares INTEGER NOT NULL, min_share_minor INTEGER NOT NULL, receiver_wallet_id TEXT NOT NULL,
  memo TEXT NOT NULL, seed INTEGER NOT NULL, caller TEXT NOT NULL,
  idempotency_key TEXT NOT NULL, funding_transfer_id TEXT NOT NULL,
  created_at_ms INTEGER NOT NULL, expires_at_ms INTEGER NOT NULL,
  funded_at_ms INTEGER NOT NULL, left_minor INTEGER NOT NULL, left_shares INTEGER NOT NULL,
  refunded_minor INTEGER NOT NULL, refund_transfer_id TEXT NOT NULL,
  closed_at_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS envelopes_by_sender
  ON envelopes (sender_wallet_id, created_at_ms, envelope_id);
CREATE TABLE IF NOT EXISTS grabs (
  envelope_id TEXT NOT NULL, position INTEGER NOT NULL, receiver_wallet_id TEXT NOT NULL,
  amount_minor INTEGER NOT NULL, transfer_id TEXT NOT NULL, caller TEXT NOT NULL,
  idempotency_key TEXT NOT NULL, at_ms INTEGER NOT NULL,
  PRIMARY KEY (envelope_id, position)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS grabs_by_receiver ON grabs (receiver_wallet_id, at_ms, envelope_id);
CREATE TABLE IF NOT EXISTS rows_marks (
  shard INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS audit (
  shard INTEGER NOT NULL, seq INTEGER NOT NULL, epoch INTEGER NOT NULL, at_ms INTEGER NOT NULL,
  prev_seq INTEGER NOT NULL, prev_hash TEXT NOT NULL, records BLOB NOT NULL,
  hash TEXT NOT NULL, PRIMARY KEY (shard, seq)) WITHOUT ROWID;
"""

_UPSERT_WALLET = (
    "INSERT INTO wallets (shard, " + ", ".join(_WALLET_COLS) + ") VALUES ("
    + ", ".join("?" * (len(_WALLET_COLS) + 1)) + ") ON CONFLICT (wallet_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _WALLET_COLS[1:]))
_UPSERT_TRANSFER = (
    "INSERT INTO transfers (shard, " + ", ".join(_TRANSFER_COLS) + ") VALUES ("
    + ", ".join("?" * (len(_TRANSFER_COLS) + 1)) + ") ON CONFLICT (transfer_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _TRANSFER_COLS[1:]))
_UPSERT_ENVELOPE = (
    "INSERT INTO envelopes (shard, " + ", ".join(_ENVELOPE_COLS) + ") VALUES ("
    + ", ".join("?" * (len(_ENVELOPE_COLS) + 1)) + ") ON CONFLICT (envelope_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _ENVELOPE_COLS[1:]))
# A grab is immutable: written once; a replay writes the identical row again.
_INSERT_GRAB = ("INSERT OR IGNORE INTO grabs (" + ", ".join(_GRAB_COLS) + ") VALUES ("
                + ", ".join("?" * len(_GRAB_COLS)) + ")")
_INSERT_ENTRY = ("INSERT OR REPLACE INTO wallet_entries (" + ", ".join(_ENTRY_COLS) + ") VALUES ("
                 + ", ".join("?" * len(_ENTRY_COLS)) + ")")
# A row's column values in table order, as one C call (not a generator of getattr per column).
_wallet_cols = operator.attrgetter(*_WALLET_COLS)
_entry_cols = operator.attrgetter(*_ENTRY_COLS)
_transfer_cols = operator.attrgetter(*_TRANSFER_COLS)
_envelope_cols = operator.attrgetter(*_ENVELOPE_COLS)
_grab_cols = operator.attrgetter(*_GRAB_COLS)
_audit_cols = operator.attrgetter(*_AUDIT_COLS)
# An audit row is immutable: written once (in its batch's append), never replaced.
_INSERT_AUDIT = ("INSERT OR IGNORE INTO audit (" + ", ".join(_AUDIT_COLS) + ") VALUES ("
                 + ", ".join("?" * len(_AUDIT_COLS)) + ")")


class SqliteStore:
    """``JournalStore`` on one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self._path = str(path)
        self._calls: queue.Queue = queue.Queue()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        # Set if the writer thread stopped on an unexpected error: every call then fails with
        # StoreUnavailable at once instead of waiting for a thread that is gone.
        self._failure: BaseException | None = None
        # Orders queueing a call against the writer's failure: a call is either queued before
        # the failure is recorded (and then failed by the drain) or refused at once.
        self._gate = threading.Lock()
        # The calls the writer has taken off the queue and not answered yet.
        self._taken: list = []
        self._thread = threading.Thread(target=self._supervised, name="sqlite-store",
                                        daemon=True)
        # Owned by the writer thread: the rows of acknowledged appends not written yet, as
        # (shard, seq, rows) in the order of their appends, how many rows, and since when
        # (``time.monotonic``) the oldest waits.
        self._behind: list[tuple[int, int, list[Row]]] = []
        self._behind_rows = 0
        self._behind_since = 0.0
        # Set while rows could not be written (their transaction failed): every call then
        # waits for them to be written first, and fails if they still cannot be.
        self._rows_error: BaseException | None = None

    @classmethod
    async def open(cls, path: str | Path) -> "SqliteStore":
        """Open (creating if needed) the store at ``path`` and start its writer thread."""
        store = cls(path)
        store._thread.start()
        await asyncio.to_thread(store._ready.wait)
        if store._error is not None or store._failure is not None:
            raise StoreUnavailable(f"cannot open {path}: {store._error or store._failure}")
        return store

    # --- the writer thread --------------------------------------------------------------

    def _supervised(self) -> None:
        """Run the writer; if it dies on a bug, log it and fail every waiting call.

        The thread is the store's only background worker: a failure that ended it silently
        would leave every later call (and its caller's shard) waiting forever.
        """
        metrics.name_os_thread(self._thread.name)
        try:
            self._run()
        except BaseException as exc:
            log.critical("the SQLite writer thread stopped: %s: %s; every store call fails "
                         "with StoreUnavailable from now on", type(exc).__name__, exc,
                         exc_info=exc)
            with self._gate:
                self._failure = exc
            self._ready.set()
            for _, _, loop, future in self._taken:
                _settle_threadsafe(loop, future, None, self._unavailable())
            while True:
                try:
                    item = self._calls.get_nowait()
                except queue.Empty:
                    return
                if item is not None:
                    _, _, loop, future = item
                    _settle_threadsafe(loop, future, None, self._unavailable())

    def _unavailable(self) -> StoreUnavailable:
        failure = self._failure
        return StoreUnavailable(f"the SQLite writer thread stopped: "
                                f"{type(failure).__name__}: {failure}")

    def _run(self) -> None:
        try:
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            # History tables grow with random keys; a larger page cache keeps inserts off disk.
            db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            db.execute("PRAGMA temp_store=MEMORY")
            db.executescript(_SCHEMA)
        except BaseException as exc:  # reported to open()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        while True:
            first = self._next_call(db)
            if first is None:
                self._write_behind(db)
                db.close()
                return
            calls = [first]
            self._taken = calls  # failed by ``_supervised`` if the thread dies with them
            while len(calls) < GROUP_COMMIT_CALLS_MAX:
                try:
                    item = self._calls.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._calls.put(None)  # close after this group
                    break
                calls.append(item)
            if self._rows_error or (
                    self._behind and any(fn not in _WITHOUT_ROWS for fn, *_ in calls)):
                self._write_behind(db)
            if self._rows_error is not None:
                results = [(None, StoreUnavailable(
                    f"rows of acknowledged batches cannot be written: {self._rows_error}"))
                ] * len(calls)
            else:
                results = self._commit_group(db, calls)
                self._hold_rows(calls, results)
            _settle_group(calls, results)
            self._taken = []
            if self._behind and (self._behind_rows >= ROWS_BEHIND_MAX or time.monotonic()
                                 - self._behind_since >= ROWS_BEHIND_MS / 1000):
                self._write_behind(db)

    def _next_call(self, db: sqlite3.Connection) -> Any:
        """The next queued call; while rows wait, they are written once they are due."""
        while True:
            if not self._behind:
                return self._calls.get()
            due_s = self._behind_since + ROWS_BEHIND_MS / 1000 - time.monotonic()
            try:
                return self._calls.get(timeout=due_s) if due_s > 0 \
                    else self._calls.get_nowait()
            except queue.Empty:
                self._write_behind(db)
                if self._rows_error is not None:
                    return self._calls.get()  # the next call tries again (and fails if so)

    def _hold_rows(self, calls: list, results: list) -> None:
        """Keep the rows of the group's committed appends, to be written behind them."""
        for (fn, _, _, _), (value, error) in zip(calls, results):
            if fn is _append and error is None:
                # A batch without rows is kept too: the shard's mark passes it once written.
                shard, seq, rows = value
                if not self._behind:
                    self._behind_since = time.monotonic()
                self._behind.append((shard, seq, rows))
                self._behind_rows += len(rows)
        metrics.STORE_ROWS_BEHIND.set(self._behind_rows)

    def _write_behind(self, db: sqlite3.Connection) -> None:
        """Write every waiting row and the rows marks, in one transaction. On failure the
        rows stay waiting and ``_rows_error`` says why (every call fails until they are
        written: the views' lag stays bounded)."""
        if not self._behind:
            self._rows_error = None
            return
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                if failpoints.fault("store.rows_behind"):
                    raise sqlite3.OperationalError("failpoint store.rows_behind")
                _write_batches_rows(db, self._behind)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            if self._rows_error is None:
                log.error("rows of %d acknowledged batches not written: %s; store calls fail "
                          "until they are", len(self._behind), exc)
            metrics.STORE_ERRORS.labels("write_rows_behind", type(exc).__name__).inc()
            self._rows_error = exc
            return
        metrics.STORE_TRANSACTIONS.inc()
        if self._rows_error is not None:
            log.info("rows of %d acknowledged batches written after an error",
                     len(self._behind))
        self._behind, self._behind_rows, self._rows_error = [], 0, None
        metrics.STORE_ROWS_BEHIND.set(0)

    def _commit_group(self, db: sqlite3.Connection, calls: list) -> list:
        """Run ``calls`` in ONE transaction; one (value, error) per call.

        A call that checks everything before it writes (``_CHECKS_FIRST``: an append raises
        Fenced before its first write) runs without a savepoint: its own refusal leaves
        nothing to undo. Any other call runs in a savepoint, so that its failure rolls back
        only its own writes. Should a checks-first call fail after writing (a bug, or SQLite
        failing mid-call), the whole transaction is rolled back and the group is run again
        with a savepoint around every call: nothing half-written is ever committed.
        (Three statements less per append: ledger-bench, embedded batch.)
        """
        try:
            return self._run_group(db, calls, savepoint_all=False)
        except _Retry:
            return self._run_group(db, calls, savepoint_all=True)

    @staticmethod
    def _run_group(db: sqlite3.Connection, calls: list, savepoint_all: bool) -> list:
        results: list[tuple[Any, BaseException | None]] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            for fn, args, _, _ in calls:
                refusals = None if savepoint_all else _CHECKS_FIRST.get(fn)
                if refusals is not None:
                    try:
                        results.append((fn(db, *args), None))
                    except refusals as exc:  # refused before its first write
                        results.append((None, exc))
                    except Exception:
                        db.execute("ROLLBACK")
                        raise _Retry() from None
                    continue
                db.execute("SAVEPOINT call")
                try:
                    results.append((fn(db, *args), None))
                    db.execute("RELEASE call")
                except Exception as exc:  # the call's own failure, e.g. Fenced
                    db.execute("ROLLBACK TO call")
                    db.execute("RELEASE call")
                    results.append((None, exc))
            db.execute("COMMIT")
            metrics.STORE_TRANSACTIONS.inc()
        except sqlite3.Error as exc:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            results = [(None, StoreUnavailable(str(exc)))] * len(calls)
        return results

    async def _call(self, fn: Callable, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        metrics.STORE_STATEMENTS.inc()
        with self._gate:
            if self._failure is not None:
                raise self._unavailable()
            self._calls.put((fn, args, loop, future))
        return await future

    # --- the port -----------------------------------------------------------------------

    async def fence(self, shard: int, epoch: int) -> int:
        return await self._call(_fence, shard, epoch)

    async def load(self, shard: int) -> LoadedShard:
        return await self._call(_load, shard)

    async def load_after(self, shard: int, seq: int,
                         basis: tuple[tuple[int, int], ...]) -> LoadedShard | None:
        """See the port. Every stored batch counts here (an append checks the epoch in its
        own transaction), so ``basis`` is always (); every waiting row is written before the
        read, so ``rows_seq`` is the last batch unless a crash lost rows (then the mark)."""
        return await self._call(_load_after, shard, seq)

    async def probe_fence(self, shard: int) -> None:
        """See the port: a read of the shard's head."""
        await self._call(_journal_position, shard)

    async def append(self, shard: int, epoch: int, seq: int, events: bytes,
                     rows: Iterable[Row]) -> None:
        await self._call(_append, shard, epoch, seq, events, list(rows))

    async def journal_position(self, shard: int) -> tuple[int, int, int]:
        return await self._call(_journal_position, shard)

    async def flush_rows(self, shard: int, seq: int) -> None:
        """Every waiting row is written before this call runs (see the module docstring)."""
        await self._call(_rows_mark, shard)

    async def mark_rows(self, shard: int, seq: int) -> None:
        """Raise the shard's rows mark to ``seq`` (never lowers it)."""
        await self._call(_mark_rows, shard, seq)

    async def write_rows(self, shard: int, rows: Iterable[Row | PositionedRow],
                         seq: int | None = None) -> None:
        """Upsert rows of positions above the shard's rows mark (see the port).

        The rows of every batch up to the mark are written already (and every waiting row
        is written before this call runs), so they are at least as new as any replayed row:
        rows at or below the mark are skipped (a deposed owner's late replay cannot roll them
        back), but for audit rows, which are immutable and written where missing
        (``_write_positioned_rows``). Rows above it are those a crash lost (the replay
        writes them again) or come from callers that write rows without a journal (tests).
        """
        await self._call(_write_positioned_rows, shard, rows_at(rows, seq))

    async def save_snapshot(self, shard: int, seq: int, snapshot: bytes) -> bool:
        """Store the snapshot as one row, in one transaction: it is complete or absent, so
        SQLite needs no parts or marker (a blob may be up to 1 GB). A snapshot of a lower
        ``seq`` than the stored one is refused (False): it never replaces a newer one."""
        return await self._call(_save_snapshot, shard, seq, bytes(snapshot))

    async def load_snapshot(self, shard: int) -> tuple[int, bytes | None]:
        return await self._call(_load_snapshot, shard)

    async def truncate_journal(self, shard: int, through_seq: int) -> None:
        await self._call(_truncate_journal, shard, through_seq)

    async def read_journal(self, shard: int, after_seq: int = 0,
                           limit: int = 1000) -> list[JournalBatch]:
        return await self._call(_read_journal, shard, after_seq, limit)

    async def load_keys(self, shard: int, keys: dict[tuple[str, str], str]) -> dict[
            tuple[str, str], tuple[IdempotencyRecord | None, IdempotencyRecord | None,
                                   Transfer | None]]:
        """See the port: the stored record, claim and transfer of each key."""
        return await self._call(_load_keys, shard, dict(keys))

    async def expire_keys(self, shard: int, before_ms: int) -> None:
        await self._call(_expire_keys, shard, before_ms)

    async def list_entries(self, wallet_id: str, after_version: int, limit: int) -> list[Entry]:
        return await self._call(_list_entries, wallet_id, after_version, limit)

    async def read_audit(self, shard: int, after_seq: int = 0,
                         limit: int = 1000) -> list[AuditRow]:
        return await self._call(_read_audit, shard, after_seq, limit)

    async def get_transfer(self, transfer_id: str) -> Transfer | None:
        return await self._call(_get_transfer, transfer_id)

    async def scan_wallets(self, shard: int) -> list[Wallet]:
        return await self._call(_scan_wallets, shard)

    async def get_envelope(self, envelope_id: str) -> Envelope | None:
        return await self._call(_get_envelope, envelope_id)

    async def list_grabs(self, envelope_id: str, after_position: int,
                         limit: int) -> list[Grab]:
        return await self._call(_list_grabs, envelope_id, after_position, limit)

    async def list_envelopes_sent(self, wallet_id: str, after: tuple[int, str] | None,
                                  limit: int) -> list[Envelope]:
        return await self._call(_list_envelopes_sent, wallet_id, after, limit)

    async def list_grabs_received(self, wallet_id: str, after: tuple[int, str] | None,
                                  limit: int) -> list[Grab]:
        return await self._call(_list_grabs_received, wallet_id, after, limit)

    async def close(self) -> None:
        if self._thread.is_alive():
            self._calls.put(None)
            await asyncio.to_thread(self._thread.join)


class _Retry(Exception):
    """A checks-first call failed after writing: run the group again, savepoints on all."""


def _settle_group(calls: list, results: list) -> None:
    """Hand a group's results to their futures: ONE hand-off per event loop (not one per
    call: a group holds an append of every shard a round touched, hundreds at a time)."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for (_, _, loop, future), (value, error) in zip(calls, results):
        by_loop.setdefault(loop, []).append((future, value, error))
    for loop, settled in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle_all, settled)
        except RuntimeError:
            pass  # a closed loop has nobody waiting


def _settle_all(settled: list) -> None:
    for future, value, error in settled:
        _settle(future, value, error)


def _settle_threadsafe(loop: asyncio.AbstractEventLoop, future: asyncio.Future, value: Any,
                       error: BaseException | None) -> None:
    """Hand a result to ``future`` on its loop; a closed loop has nobody waiting."""
    try:
        loop.call_soon_threadsafe(_settle, future, value, error)
    except RuntimeError:
        pass


# Functions run on the writer thread, inside a savepoint of the group's transaction.

def _fence(db: sqlite3.Connection, shard: int, epoch: int) -> int:
    row = db.execute("SELECT epoch, head FROM shard_heads WHERE shard = ?", (shard,)).fetchone()
    if row is None:
        db.execute("INSERT INTO shard_heads (shard, epoch, head) VALUES (?, ?, 0)", (shard, epoch))
        return 0
    recorded, head = row
    if recorded > epoch:
        raise Fenced(f"shard {shard}: epoch {recorded} recorded, {epoch} is stale")
    if recorded < epoch:
        db.execute("UPDATE shard_heads SET epoch = ? WHERE shard = ?", (epoch, shard))
    return head


def _append(db: sqlite3.Connection, shard: int, epoch: int, seq: int, events: bytes,
            rows: list[Row]) -> tuple[int, int, list[Row]]:
    row = db.execute("SELECT epoch, head FROM shard_heads WHERE shard = ?", (shard,)).fetchone()
    if row is None or row[0] != epoch or row[1] != seq - 1:
        found = "no fence" if row is None else f"epoch {row[0]}, head {row[1]}"
        raise Fenced(f"shard {shard}: append of batch {seq} by epoch {epoch} refused ({found})")
    db.execute("UPDATE shard_heads SET head = ? WHERE shard = ?", (seq, shard))
    db.execute("INSERT INTO journal (shard, seq, epoch, events) VALUES (?, ?, ?, ?)",
               (shard, seq, epoch, events))
    metrics.STORE_APPENDS.inc()
    # What the writer thread keeps, once this append is committed, to write behind the
    # journal (``SqliteStore._hold_rows``).
    return shard, seq, rows


def _write_positioned_rows(db: sqlite3.Connection, shard: int,
                           rows: list[PositionedRow]) -> None:
    mark = _rows_mark(db, shard)
    # Audit rows are the exception: written once and never changed (INSERT OR IGNORE), and
    # identical in every replay, so a replay writes those that are missing: the rows of
    # batches journaled before this build chained them (an upgrade), which the mark would
    # otherwise leave out of the chain for good.
    _write_rows(db, shard, [(kind, value) for kind, value, seq in rows  # type: ignore[misc]
                            if seq > mark or kind == AUDIT])


def _rows_mark(db: sqlite3.Connection, shard: int) -> int:
    """The batch up to which every row of the shard is written; 0 if none is recorded (a
    new shard, or a file of a build that wrote rows in the append: its first replay writes
    them again, idempotently, with any audit rows that build left out)."""
    row = db.execute("SELECT seq FROM rows_marks WHERE shard = ?", (shard,)).fetchone()
    return row[0] if row else 0


_UPSERT_MARK = ("INSERT INTO rows_marks (shard, seq) VALUES (?, ?) ON CONFLICT (shard) "
                "DO UPDATE SET seq = max(seq, excluded.seq)")


def _mark_rows(db: sqlite3.Connection, shard: int, seq: int) -> None:
    db.execute(_UPSERT_MARK, (shard, seq))


def _write_batches_rows(db: sqlite3.Connection,
                        batches: list[tuple[int, int, list[Row]]]) -> None:
    """The rows of acknowledged batches (``(shard, seq, rows)`` in append order), coalesced
    per shard: its batches are in journal order, so the last row of a key wins, as if each
    batch had been written in its own transaction. Grouping by shard keeps every key's order
    because each row belongs to one shard: a wallet, its history, an envelope and its grabs,
    key and audit rows live on their shard, and a transfer's row is written only by the
    shard that decided it (``ShardState._evolve_transfer_decided``, ``_evolve_outbox_acked``).
    Then each shard's mark is raised to its last batch."""
    by_shard: dict[int, list[Row]] = {}
    marks: dict[int, int] = {}
    for shard, seq, rows in batches:
        by_shard.setdefault(shard, []).extend(rows)
        marks[shard] = seq
    for shard, rows in by_shard.items():
        _write_rows(db, shard, rows)
    db.executemany(_UPSERT_MARK, list(marks.items()))


def _write_rows(db: sqlite3.Connection, shard: int, rows: list[Row]) -> None:
    # The rows are of one shard's batches in journal order, or above the mark: the last row
    # of a key wins (as the order of the core's evolve left them).
    keyed = last_of_each_key(rows)
    wallets, entries, transfers, keys = keyed.wallets, keyed.entries, keyed.transfers, keyed.keys
    metrics.STORE_ROWS_WRITTEN.inc(keyed.size())
    if wallets:
        # An upsert updates the row in place; INSERT OR REPLACE would delete and re-insert it
        # (and its index entry) on every balance change.
        db.executemany(_UPSERT_WALLET, [(shard, *_wallet_cols(w)) for w in wallets.values()])
    if entries:
        db.executemany(_INSERT_ENTRY, [_entry_cols(e) for e in entries])
    if transfers:
        db.executemany(_UPSERT_TRANSFER, [(shard, *_transfer_cols(t))
                                          for t in transfers.values()])
    if keyed.envelopes:
        db.executemany(_UPSERT_ENVELOPE, [(shard, *_envelope_cols(v))
                                          for v in keyed.envelopes.values()])
    if keyed.grabs:
        db.executemany(_INSERT_GRAB, [_grab_cols(g) for g in keyed.grabs.values()])
    if keys:
        db.executemany("INSERT OR REPLACE INTO idempotency_keys (shard, caller, idempotency_key, "
                       "kind, record, created_at_ms) VALUES (?, ?, ?, ?, ?, ?)",
                       [(shard, r.caller, r.idempotency_key, kind, codec.dumps(r),
                         r.created_at_ms) for kind, r in keys])
    if keyed.audits:
        db.executemany(_INSERT_AUDIT, [_audit_cols(a) for a in keyed.audits])

# Calls that raise these refusals only before their first write (so they need no savepoint).
_CHECKS_FIRST: dict[Callable, tuple[type[Exception], ...]] = {
    _append: (Fenced,),
}


def _journal_position(db: sqlite3.Connection, shard: int) -> tuple[int, int, int]:
    head = db.execute("SELECT epoch, head FROM shard_heads WHERE shard = ?", (shard,)).fetchone()
    snap = db.execute("SELECT seq FROM snapshots WHERE shard = ?", (shard,)).fetchone()
    return (head[0] if head else 0, head[1] if head else 0, snap[0] if snap else 0)


def _save_snapshot(db: sqlite3.Connection, shard: int, seq: int, snapshot: bytes) -> bool:
    row = db.execute("SELECT seq FROM snapshots WHERE shard = ?", (shard,)).fetchone()
    if row is not None and row[0] >= seq:
        return False  # a newer (or the same) snapshot is there: a late save changes nothing
    db.execute("INSERT OR REPLACE INTO snapshots (shard, seq, snapshot) VALUES (?, ?, ?)",
               (shard, seq, snapshot))
    if failpoints.fault("store.snapshot_before_marker"):
        # The whole save is one savepoint: failing here rolls it back (nothing half-saved).
        raise StoreUnavailable(f"failpoint: snapshot of shard {shard} at {seq} not completed")
    return True


def _load_snapshot(db: sqlite3.Connection, shard: int) -> tuple[int, bytes | None]:
    row = db.execute("SELECT seq, snapshot FROM snapshots WHERE shard = ?", (shard,)).fetchone()
    return (row[0], bytes(row[1])) if row else (0, None)


def _truncate_journal(db: sqlite3.Connection, shard: int, through_seq: int) -> None:
    row = db.execute("SELECT seq FROM snapshots WHERE shard = ?", (shard,)).fetchone()
    if row is None or row[0] < through_seq:
        raise ValueError(f"shard {shard}: no snapshot covers batch {through_seq} "
                         f"(latest: {row[0] if row else 'none'}); the journal stays")
    db.execute("DELETE FROM journal WHERE shard = ? AND seq <= ?", (shard, through_seq))


def _load(db: sqlite3.Connection, shard: int) -> LoadedShard:
    row = db.execute("SELECT seq, snapshot FROM snapshots WHERE shard = ?", (shard,)).fetchone()
    snapshot_seq, snapshot = (row[0], bytes(row[1])) if row else (0, None)
    batches = [JournalBatch(seq, epoch, bytes(events)) for seq, epoch, events in db.execute(
        "SELECT seq, epoch, events FROM journal WHERE shard = ? AND seq > ? ORDER BY seq",
        (shard, snapshot_seq))]
    last = batches[-1].seq if batches else snapshot_seq
    return LoadedShard(snapshot, snapshot_seq, batches, min(_rows_mark(db, shard), last))


def _load_after(db: sqlite3.Connection, shard: int, seq: int) -> LoadedShard | None:
    _, head, _ = _journal_position(db, shard)
    if head < seq:
        return None
    batches = [JournalBatch(seq_, epoch, bytes(events)) for seq_, epoch, events in db.execute(
        "SELECT seq, epoch, events FROM journal WHERE shard = ? AND seq > ? ORDER BY seq",
        (shard, seq))]
    if len(batches) != head - seq or (batches and batches[0].seq != seq + 1):
        return None  # truncated after seq: a newer snapshot covers what follows it
    return LoadedShard(None, seq, batches, min(_rows_mark(db, shard), head))


def _read_journal(db: sqlite3.Connection, shard: int, after_seq: int,
                  limit: int) -> list[JournalBatch]:
    return [JournalBatch(seq, epoch, bytes(events)) for seq, epoch, events in db.execute(
        "SELECT seq, epoch, events FROM journal WHERE shard = ? AND seq > ? ORDER BY seq "
        "LIMIT ?", (shard, after_seq, limit))]


def _read_audit(db: sqlite3.Connection, shard: int, after_seq: int,
                limit: int) -> list[AuditRow]:
    return [AuditRow(shard_, seq, epoch, at_ms, prev_seq, prev_hash, bytes(records), digest)
            for shard_, seq, epoch, at_ms, prev_seq, prev_hash, records, digest in db.execute(
                "SELECT " + ", ".join(_AUDIT_COLS) + " FROM audit WHERE shard = ? AND seq > ? "
                "ORDER BY seq LIMIT ?", (shard, after_seq, limit))]


def _load_keys(db: sqlite3.Connection, shard: int, keys: dict[tuple[str, str], str]) -> dict:
    found = {}
    for (caller, key), transfer_id in keys.items():
        record = claim = transfer = None
        for kind, blob in db.execute(
                "SELECT kind, record FROM idempotency_keys WHERE shard = ? AND caller = ? AND "
                "idempotency_key = ?", (shard, caller, key)):
            value = codec.loads(bytes(blob))
            if kind == IDEM:
                record = value
            elif kind == CLAIM:
                claim = value
        if record is not None and record.target.startswith("transfer:"):
            transfer_id = record.target[len("transfer:"):]
        transfer = _get_transfer(db, transfer_id) if transfer_id else None
        found[(caller, key)] = (record, claim, transfer)
    return found


def _expire_keys(db: sqlite3.Connection, shard: int, before_ms: int) -> None:
    db.execute("DELETE FROM idempotency_keys WHERE shard = ? AND created_at_ms < ?",
               (shard, before_ms))


def _list_entries(db: sqlite3.Connection, wallet_id: str, after_version: int,
                  limit: int) -> list[Entry]:
    return [Entry(*row) for row in db.execute(
        "SELECT " + ", ".join(_ENTRY_COLS) + " FROM wallet_entries WHERE wallet_id = ? "
        "AND version > ? ORDER BY version LIMIT ?", (wallet_id, after_version, limit))]


def _get_transfer(db: sqlite3.Connection, transfer_id: str) -> Transfer | None:
    row = db.execute("SELECT " + ", ".join(_TRANSFER_COLS) + " FROM transfers "
                     "WHERE transfer_id = ?", (transfer_id,)).fetchone()
    if row is None:
        return None
    t = Transfer(*row)
    t.credited = bool(t.credited)
    return t


def _scan_wallets(db: sqlite3.Connection, shard: int) -> list[Wallet]:
    wallets = []
    for row in db.execute("SELECT " + ", ".join(_WALLET_COLS) + " FROM wallets WHERE shard = ? "
                          "ORDER BY wallet_id", (shard,)):
        w = Wallet(*row)
        w.allow_negative, w.frozen = bool(w.allow_negative), bool(w.frozen)
        wallets.append(w)
    return wallets


_SELECT_ENVELOPES = "SELECT " + ", ".join(_ENVELOPE_COLS) + " FROM envelopes "
_SELECT_GRABS = "SELECT " + ", ".join(_GRAB_COLS) + " FROM grabs "


def _get_envelope(db: sqlite3.Connection, envelope_id: str) -> Envelope | None:
    row = db.execute(_SELECT_ENVELOPES + "WHERE envelope_id = ?", (envelope_id,)).fetchone()
    return Envelope(*row) if row is not None else None


def _list_grabs(db: sqlite3.Connection, envelope_id: str, after_position: int,
                limit: int) -> list[Grab]:
    return [Grab(*row) for row in db.execute(
        _SELECT_GRABS + "WHERE envelope_id = ? AND position > ? ORDER BY position LIMIT ?",
        (envelope_id, after_position, limit))]


def _list_envelopes_sent(db: sqlite3.Connection, wallet_id: str,
                         after: tuple[int, str] | None, limit: int) -> list[Envelope]:
    # Row values compare lexicographically: (created_at_ms, envelope_id) > (?, ?); the first
    # page starts below every real key.
    after_ms, after_id = after if after is not None else (-(1 << 63), "")
    return [Envelope(*row) for row in db.execute(
        _SELECT_ENVELOPES + "WHERE sender_wallet_id = ? AND (created_at_ms, envelope_id) > "
        "(?, ?) ORDER BY created_at_ms, envelope_id LIMIT ?",
        (wallet_id, after_ms, after_id, limit))]


def _list_grabs_received(db: sqlite3.Connection, wallet_id: str,
                         after: tuple[int, str] | None, limit: int) -> list[Grab]:
    after_ms, after_id = after if after is not None else (-(1 << 63), "")
    return [Grab(*row) for row in db.execute(
        _SELECT_GRABS + "WHERE receiver_wallet_id = ? AND (at_ms, envelope_id) > (?, ?) "
        "ORDER BY at_ms, envelope_id LIMIT ?", (wallet_id, after_ms, after_id, limit))]


# Calls that read the journal alone: the rows waiting behind it need not be written first.
_WITHOUT_ROWS = frozenset({_append, _journal_position, _read_journal, _load_snapshot})
