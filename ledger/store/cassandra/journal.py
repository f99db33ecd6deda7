"""The journal: fencing, appends, loads, snapshots and truncation of shard journals.

``epoch_journal`` holds one partition per shard: static columns ``epoch`` (the writer epoch,
i.e. the fencing token) and ``starts`` (per epoch: the last batch number before the epoch's
own first batch), and one clustering row per batch, keyed ``(seq, writer_epoch)``.

Fencing is ONE lightweight transaction per takeover: the new owner reads the journal's head
(after the old owner's lease is gone), then ``SET epoch = E, starts[E] = head IF epoch =
<the epoch it read>``. Appends are plain writes at the commit consistency, no Paxos. Which rows
count is decided by ``starts`` alone: the batch ``seq`` of epoch ``e`` counts iff
``starts[e] < seq <= starts[e']`` for the next recorded epoch ``e'`` (no bound for the latest
epoch). A deposed owner's late row (past its successor's start) is therefore never loaded,
whatever it holds and whenever it lands, and it can never overwrite a counted row (the epoch
is part of its key). What keeps a deposed owner from *acknowledging* such a row is the
ownership lease (``lease_valid``, checked after each append, here and in the owner) and, on
one store object, the local fence bookkeeping below. The full argument, with what it assumes,
is in ``coordinator/PROTOCOL.md`` ("Fencing").

Snapshots are stored in parts of ``SNAPSHOT_PART_BYTES`` (``snapshot_parts``; a snapshot is
far larger than one mutation may be) and count only once their completion mark
(``snapshot_marks``) is written. The journal batches a complete snapshot covers are then
deleted with one range tombstone (``truncate``); the static epoch and starts stay.

The rows of each appended batch go to the views (``views.py``) once the batch is durable and
still this writer's.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, TypeVar

from cassandra import ConsistencyLevel

from ledger import metrics
from ledger.runtime import failpoints
from ledger.store.cassandra.constants import (APPEND_SENDS_MAX, BIGINT_MAX,
                                              FENCE_ATTEMPTS_MAX, JOURNAL_PAGE_BATCHES,
                                              LOAD_SPANS_IN_FLIGHT,
                                              SNAPSHOT_LOAD_ATTEMPTS_MAX,
                                              SNAPSHOT_PART_BYTES, SNAPSHOT_PARTS_IN_FLIGHT,
                                              SNAPSHOT_PARTS_PER_READ)
from ledger.store.cassandra.driver import DRIVER_ERRORS, Driver, hedged, never_sent
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
    """Consistency of snapshot parts, marks, journal truncation and the fence's head read.

    The first three delete journal batches, and the head read must see every acknowledged
    append, so they must be as durable as an append: QUORUM (all
    datacenters) with SERIAL appends, LOCAL_QUORUM with LOCAL_SERIAL; the configured write
    consistency if it is stronger still.
    """
    if write in (ConsistencyLevel.ALL, ConsistencyLevel.EACH_QUORUM, ConsistencyLevel.QUORUM):
        return write
    return (ConsistencyLevel.QUORUM if serial == ConsistencyLevel.SERIAL
            else ConsistencyLevel.LOCAL_QUORUM)


def epoch_runs(starts: dict[int, int] | None) -> dict[int, tuple[int, int]]:
    """Per recorded epoch, the batch numbers it owns: ``start < seq <= end``.

    ``starts`` maps each fenced epoch to the head its fence read. An epoch's run ends where
    the next recorded epoch's starts (the smallest start of any later epoch, should they ever
    not grow); the latest epoch's run is open (``BIGINT_MAX``). Pure: the one rule that
    decides which journal rows count, shared by every read.
    """
    runs: dict[int, tuple[int, int]] = {}
    end = BIGINT_MAX
    for epoch, start in sorted((starts or {}).items(), reverse=True):
        runs[epoch] = (start, end)
        end = min(end, start)
    return runs


def basis_of(starts: dict[int, int] | None) -> tuple[tuple[int, int], ...]:
    """``starts`` as ``LoadedShard.basis``: sorted (epoch, start) pairs."""
    return tuple(sorted((starts or {}).items()))


def basis_below(basis: tuple[tuple[int, int], ...], seq: int) -> tuple[tuple[int, int], ...]:
    """The runs of ``basis`` that start below ``seq``: they alone decide which rows of the
    batches up to ``seq`` count (a run starting at ``seq`` or above owns only later ones)."""
    return tuple(pair for pair in basis if pair[1] < seq)


def _gapless_to_head(shard: int, batches: list[JournalBatch], after_seq: int,
                     head: int) -> int:
    """The last batch number of ``batches``, checked to run from ``after_seq + 1`` without
    gaps up to at least ``head`` (``after_seq`` if there are none).

    Raises:
        StoreUnavailable: a gap, or a read that ended before the head.
    """
    expected = after_seq + 1
    for batch in batches:
        if batch.seq != expected:
            raise StoreUnavailable(f"shard {shard}: journal read has a gap before "
                                   f"batch {batch.seq} (expected {expected})")
        expected += 1
    if expected - 1 < head:
        raise StoreUnavailable(f"shard {shard}: journal read ended at batch "
                               f"{expected - 1}, head is {head}")
    return expected - 1


def counts(runs: dict[int, tuple[int, int]], seq: int, writer_epoch: int) -> bool:
    """True if batch ``seq`` written by ``writer_epoch`` is part of the journal."""
    run = runs.get(writer_epoch)
    return run is not None and run[0] < seq <= run[1]



_R = TypeVar("_R")


def _hedging(method: Callable[..., Awaitable[_R]]) -> Callable[..., Awaitable[_R]]:
    """Run a takeover's or warm-up's step with its statements hedged (``driver.hedged``)."""
    @functools.wraps(method)
    async def run(*args: Any, **kwargs: Any) -> _R:
        with hedged():
            return await method(*args, **kwargs)
    return run

@dataclass(slots=True)
class _Writer:
    """What this store object knows about the epoch it fenced a shard with.

    ``next_seq`` is the only batch number it may append; ``busy`` while that append is in
    flight (a second append of the shard is refused, not queued); ``broken`` once an
    append's outcome is unknown or it was deposed (nothing more until fenced again).
    """

    epoch: int
    next_seq: int
    # What the fence recorded: every epoch's start (``epoch`` included) and the head it
    # fenced at. ``load`` right after the fence (no append since) uses them instead of
    # reading them again.
    starts: dict[int, int]
    fenced_head: int
    busy: bool = False
    broken: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()


class Journal:
    """The epoch-fenced journals and snapshots of one keyspace.

    Args:
        driver: The session's driver bridge.
        views: Where the rows of appended batches go, and whose writer appends wait for.
        write_consistency: Consistency of appends (plain writes) and of the fencing CAS's
            commit phase.
        read_consistency: Consistency of journal and snapshot reads.
    """

    def __init__(self, driver: Driver, views: Views, *, write_consistency: int,
                 read_consistency: int) -> None:
        self._driver = driver
        self._views = views
        self._write_cl = write_consistency
        self._serial_cl = driver.serial_consistency
        # Whether the node still holds its ownership lease (``bind_lease``). An append that
        # completes when it no longer does is not acknowledged: a newer owner may have read
        # the head before the row landed, so the row may not count.
        self._lease_valid: Callable[[], bool] = lambda: True
        self._confirm: Callable[[int, int], Awaitable[bool]] | None = None
        # Per shard: the epoch this store fenced it with, and its next batch number.
        self._writers: dict[int, _Writer] = {}
        # Per shard: the highest epoch whose fence has started here (lower epochs may not
        # start an append from then on), and the highest one whose fence has started to read
        # the head (a lower epoch's append that completes after it is not acknowledged).
        self._fencing: dict[int, int] = {}
        self._fence_reading: dict[int, int] = {}
        w, r, s = write_consistency, read_consistency, driver.serial_consistency
        prepare = driver.prepare
        # --- fencing: the only lightweight transactions of the journal ---
        self._q_fence_state_serial = prepare(
            "SELECT epoch, starts FROM {ks}.epoch_journal WHERE shard = ? LIMIT 1", s,
            idempotent=True)
        self._q_fence_state = prepare(
            "SELECT epoch, starts FROM {ks}.epoch_journal WHERE shard = ? LIMIT 1", r,
            idempotent=True)
        # Idempotent to the driver (hedged, or resent by a retry): of two identical CAS
        # rounds one applies and the other finds the new epoch, which ``fence``'s loop reads
        # and returns, as after a fencer that won.
        self._q_fence_new = prepare(
            "UPDATE {ks}.epoch_journal SET epoch = ?, starts = ? WHERE shard = ? "
            "IF epoch = null", w, idempotent=True)
        self._q_fence = prepare(
            "UPDATE {ks}.epoch_journal SET epoch = ?, starts = starts + ? WHERE shard = ? "
            "IF epoch = ?", w, idempotent=True)
        # --- appends: plain writes; the identical row sent again changes nothing, and
        # _write_row sends it again itself. Marked non-idempotent only so that the driver
        # never moves a request that may have reached a node to another node on its own:
        # ``never_sent`` then stays exact ("nothing was written" means it). ---
        self._q_append = prepare(
            "INSERT INTO {ks}.epoch_journal (shard, seq, writer_epoch, events) "
            "VALUES (?, ?, ?, ?)", w, idempotent=False)
        # --- reads: rows page by (seq, writer_epoch), both ends exclusive. The head read
        # must see every acknowledged append, so it is at least a quorum (as durable as an
        # append: _snapshot_consistency), whatever read consistency is configured. ---
        d = _snapshot_consistency(w, s)
        self._q_tail = prepare(
            "SELECT seq, writer_epoch FROM {ks}.epoch_journal WHERE shard = ? "
            "AND (seq, writer_epoch) > (?, ?) AND (seq, writer_epoch) < (?, ?) "
            "ORDER BY seq DESC, writer_epoch DESC LIMIT ?", d, idempotent=True)
        self._q_journal = prepare(
            "SELECT seq, writer_epoch, events FROM {ks}.epoch_journal WHERE shard = ? "
            "AND (seq, writer_epoch) > (?, ?) LIMIT ?", r, idempotent=True)
        self._q_journal_span = prepare(
            "SELECT seq, writer_epoch, events FROM {ks}.epoch_journal WHERE shard = ? "
            "AND (seq, writer_epoch) > (?, ?) AND (seq, writer_epoch) <= (?, ?) LIMIT ?", r,
            idempotent=True)
        # --- snapshots and truncation (as durable as an append: see _snapshot_consistency) ---
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
            "DELETE FROM {ks}.epoch_journal WHERE shard = ? AND seq <= ?", d, idempotent=True)

    def bind_lease(self, lease_valid: Callable[[], bool],
                   confirm: Callable[[int, int], Awaitable[bool]] | None = None) -> None:
        """Acknowledge appends only while ``lease_valid()`` (the node's ownership lease).

        ``confirm(shard, epoch)``: for a write that ended after the lease's local deadline
        (keep-alives late: the node is suspended), wait until etcd confirms the lease and say
        whether the node still holds the shard with that epoch; if so the batch is
        acknowledged (no newer epoch can have fenced: ``coordinator/PROTOCOL.md``,
        "Suspension"), else it is refused as before."""
        self._lease_valid = lease_valid
        self._confirm = confirm

    # --- fencing ----------------------------------------------------------------------

    @_hedging
    async def fence(self, shard: int, epoch: int) -> int:
        """Make ``epoch`` the shard's writer epoch; return the last batch number.

        Reads the recorded epoch and starts with a SERIAL read (a Paxos round: it completes
        or supersedes any fencing CAS still in flight), then the head: the last batch of the
        recorded epoch, or that epoch's start if it wrote none (``_head``, a QUORUM read of
        batch numbers only). One CAS then records ``epoch`` and ``starts[epoch] = head`` if
        the recorded epoch is still the one read; if another fencer won in between, it reads
        again. Fencing again with the recorded epoch changes nothing and returns its head.

        Callers on a real deployment fence only after the previous owner's lease expired
        (etcd grants the shard no earlier), so every batch that owner acknowledged is on a
        quorum before the head is read, and the head counts it. A batch of the previous
        epoch that lands later (never acknowledged) lies past the recorded start and never
        counts. On one store object the same holds without leases: lower epochs may start
        no append once this fence started, and an append of theirs still in flight is
        waited for before the head is read (it is acknowledged, and counted).

        Raises:
            Fenced: a higher epoch is already recorded.
            StoreUnavailable: the store could not be reached, or other fencers kept winning.
                The epoch may be installed already; fencing again with it is safe.
        """
        self._views.forget_failure(shard)
        if self._fencing.get(shard, 0) < epoch:
            self._fencing[shard] = epoch
        writer = self._writers.get(shard)
        if writer is not None and writer.epoch < epoch:
            await writer.idle.wait()
        if self._fence_reading.get(shard, 0) < epoch:
            self._fence_reading[shard] = epoch
        for _ in range(FENCE_ATTEMPTS_MAX):
            recorded, starts = await self._fence_state(shard, serial=True)
            if recorded is not None and recorded > epoch:
                raise Fenced(f"shard {shard}: epoch {recorded} recorded, {epoch} is stale")
            head = await self._head(shard, recorded, starts)
            if recorded == epoch:
                self._writers[shard] = _Writer(epoch, head + 1, starts, head)
                return head
            statement = (self._q_fence_new.bind((epoch, {epoch: head}, shard))
                         if recorded is None else
                         self._q_fence.bind((epoch, {epoch: head}, shard, recorded)))
            metrics.STORE_LWT.inc()
            try:
                result = await self._driver.run(statement)
            except DRIVER_ERRORS as exc:
                if never_sent(exc):
                    raise StoreUnavailable(f"fence of shard {shard}: {exc}") from exc
                # Unknown outcome: the next SERIAL read completes or supersedes the round,
                # so what it returns is final; recording the same epoch again is harmless.
                continue
            if result and result[0].get("[applied]"):
                self._writers[shard] = _Writer(epoch, head + 1, {**starts, epoch: head}, head)
                return head
            # Another fencer changed the epoch between our read and our CAS: read again.
        raise StoreUnavailable(f"fence of shard {shard}: still contended after "
                               f"{FENCE_ATTEMPTS_MAX} attempts")

    @_hedging
    async def probe_fence(self, shard: int) -> None:
        """See ``JournalStore.probe_fence``: the SERIAL read of the fence state."""
        await self._fence_state(shard, serial=True)

    async def _fence_state(self, shard: int, *,
                           serial: bool = False) -> tuple[int | None, dict[int, int]]:
        """(recorded epoch or None, starts) of a shard."""
        if serial:
            metrics.STORE_LWT.inc()  # a SERIAL read is a Paxos round too
        rows = await self._driver.read(
            self._q_fence_state_serial if serial else self._q_fence_state, (shard,))
        if not rows:
            return None, {}
        return rows[0]["epoch"], dict(rows[0]["starts"] or {})

    async def _head(self, shard: int, recorded: int | None, starts: dict[int, int]) -> int:
        """The last batch number that counts: the recorded epoch's last batch, else the
        latest complete snapshot's batch or the epoch's start, whichever is higher.

        Only the recorded epoch can own batches past its start (older epochs' runs end at
        it), so this reads batch numbers downwards from the top until it meets one of the
        recorded epoch's rows; rows of older epochs met on the way are late writes that do
        not count. A QUORUM read: it sees every batch acknowledged before it started.

        When no row of the recorded epoch is left above its start, a snapshot may have
        covered them and truncation dropped them (compaction up to the very head: a shard
        that went idle right after its last append). A snapshot is built from counted, durable batches
        only, so its batch number is then the head. Answering the epoch's start instead made
        every later takeover of such a shard fail ("journal head moved during takeover").
        """
        if recorded is None:
            return 0
        base = starts.get(recorded, 0)
        upper = (BIGINT_MAX, BIGINT_MAX)
        while True:
            rows = await self._driver.read(self._q_tail, (shard, base, BIGINT_MAX, *upper,
                                                          JOURNAL_PAGE_BATCHES))
            for row in rows:
                if row["writer_epoch"] == recorded:
                    return int(row["seq"])
            if len(rows) < JOURNAL_PAGE_BATCHES:
                return max(base, (await self._latest_mark_seq(shard))[0])
            upper = (rows[-1]["seq"], rows[-1]["writer_epoch"])

    # --- the journal ------------------------------------------------------------------

    async def append(self, shard: int, epoch: int, seq: int, events: bytes,
                     rows: Iterable[Row]) -> None:
        """Durably append batch ``seq`` written by ``epoch``, then write its ``rows``.

        The append is ONE plain write of the row ``(shard, seq, epoch)`` at the commit
        consistency. It is acknowledged (this returns) only if, once the write completed,
        this store saw no newer fence of the shard start reading its head and the node's
        lease is still valid: then any later fence reads the head after the row is on a
        quorum, so the row counts for good. A write that times out is sent again (the same
        row: idempotent) up to ``APPEND_SENDS_MAX`` times.

        Only the store object that fenced ``epoch`` appends for it, one batch at a time, in
        order: anything else is refused before writing. The one exception is an epoch that
        is recorded and already deposed (``ledgerctl fence-check`` shows what a deposed
        owner's late write does): its row is written only where it provably never counts
        (past the run its successor bounds), and the append raises ``Fenced``.

        Raises:
            Fenced: ``epoch`` is not this store's writer of the shard, ``seq`` is not its
                next batch, or a newer fence or the lease's end came before the write
                completed (the row may exist; it counts only if the newer epoch's head read
                saw it, and then the newer owner replays it).
            UnknownOutcome: every send timed out: the row may or may not be on a quorum.
            StoreUnavailable: nothing was written.
        """
        if seq < 1:
            raise ValueError(f"batch numbers start at 1, got {seq}")
        events = bytes(events)
        rows = list(rows)
        writer = self._writers.get(shard)
        if writer is None or writer.epoch != epoch:
            await self._append_foreign(shard, epoch, seq, events)
            return  # pragma: no cover (_append_foreign always raises)
        if self._fencing.get(shard, 0) > epoch or writer.broken:
            raise Fenced(f"shard {shard}: append of batch {seq} by epoch {epoch} refused: "
                         f"a newer fence started, or an earlier append failed")
        if writer.busy or seq != writer.next_seq:
            raise Fenced(f"shard {shard}: append of batch {seq} by epoch {epoch} refused: "
                         f"the next batch is {writer.next_seq}, so batch {seq} is taken or "
                         f"out of order{' (an append is in flight)' if writer.busy else ''}")
        writer.busy = True
        writer.idle.clear()
        try:
            await self._views.wait_room(shard)
            await self._write_row(shard, epoch, seq, events, writer)
            leased = self._lease_valid()
            if not leased and self._confirm is not None:
                # Written after the lease's local deadline (the node suspended meanwhile):
                # held, still busy, until etcd confirms the lease with this shard and epoch
                # (then no newer epoch exists, and the batch is ours), or the shard is lost.
                leased = await self._confirm(shard, epoch)
        finally:
            writer.busy = False
            writer.idle.set()
        if self._fence_reading.get(shard, 0) > epoch or not leased:
            writer.broken = True
            raise Fenced(f"shard {shard}: batch {seq} of epoch {epoch} was written but not "
                         f"acknowledged: a newer fence or the end of the lease came first "
                         f"(it counts only if the newer owner's head read saw it)")
        writer.next_seq = seq + 1
        # The batch is durable and ours: its rows are views, written behind the commit path.
        metrics.STORE_APPENDS.inc()
        self._views.enqueue(shard, seq, rows)

    async def _write_row(self, shard: int, epoch: int, seq: int, events: bytes,
                         writer: _Writer) -> None:
        statement = self._q_append.bind((shard, seq, epoch, events))
        maybe_written = False
        last: BaseException | None = None
        for _ in range(APPEND_SENDS_MAX):
            try:
                await self._driver.run(statement)
                return
            except DRIVER_ERRORS as exc:
                last = exc
                maybe_written = maybe_written or not never_sent(exc)
        if not maybe_written:
            raise StoreUnavailable(f"append of shard {shard} batch {seq}: {last}") from last
        writer.broken = True
        raise UnknownOutcome(f"shard {shard} batch {seq}: {APPEND_SENDS_MAX} sends of the "
                             f"append failed, the last with {last!r}; the row may be on "
                             f"some replicas") from last

    async def _append_foreign(self, shard: int, epoch: int, seq: int, events: bytes) -> None:
        """An append by an epoch this store did not fence: never acknowledged."""
        if self._fencing.get(shard, 0) > epoch:
            raise Fenced(f"shard {shard}: append by epoch {epoch} refused: a newer fence "
                         f"started on this store")
        recorded, starts = await self._fence_state(shard, serial=True)
        runs = epoch_runs(starts)
        if recorded is None or epoch not in runs:
            raise Fenced(f"shard {shard}: append by epoch {epoch} refused: that epoch was "
                         f"never fenced (recorded: {recorded})")
        if epoch == recorded:
            raise Fenced(f"shard {shard}: append by epoch {epoch} refused: it is the "
                         f"recorded epoch, and only the store that fenced it appends")
        start, end = runs[epoch]
        if seq <= end:
            raise Fenced(f"shard {shard}: append of batch {seq} by deposed epoch {epoch} "
                         f"refused: its run ended at batch {end}")
        try:
            await self._driver.run(self._q_append.bind((shard, seq, epoch, events)))
        except DRIVER_ERRORS as exc:
            raise StoreUnavailable(f"append by deposed epoch {epoch}: {exc}") from exc
        raise Fenced(f"shard {shard}: batch {seq} of deposed epoch {epoch} was written but "
                     f"never counts: epoch {epoch}'s run ended at batch {end} (epoch "
                     f"{recorded} is recorded)")

    async def journal_position(self, shard: int) -> tuple[int, int, int]:
        """(epoch, last batch number, batch number of the latest snapshot) of a shard."""
        (recorded, starts), snaps = await asyncio.gather(
            self._fence_state(shard), self._driver.read(self._q_snapshot_mark_latest, (shard,)))
        head = await self._head(shard, recorded, starts)
        return recorded or 0, head, (snaps[0]["seq"] if snaps else 0)

    @_hedging
    async def load(self, shard: int) -> LoadedShard:
        """Read the latest complete snapshot and every batch after it that counts, in order.

        The head is read first and the batches are checked to run without gaps from the
        snapshot up to at least that head, so a read that missed batches fails loudly
        instead of handing the new owner a shortened journal. Rows that do not count
        (``counts``: a deposed owner's late writes) are skipped. If the journal starts after
        the snapshot read (another owner's compaction saved a newer snapshot and truncated
        the journal meanwhile), the load starts again from the newer snapshot.

        Raises:
            StoreUnavailable: the store could not be reached, the journal read came back
                incomplete, or it raced truncations ``SNAPSHOT_LOAD_ATTEMPTS_MAX`` times.
        """
        # Read first: the rows it covers stay written, so it holds for whatever comes after.
        rows_mark = await self._views.read_mark(shard)
        # Right after this store object fenced the shard (an owner's start), what the fence
        # read and recorded is the state: no other epoch appends after it (etcd leases), and
        # a newer fence only deposes this writer, which then appends nothing. Two reads saved.
        writer = self._writers.get(shard)
        fenced = (writer if writer is not None and not writer.broken
                  and writer.next_seq == writer.fenced_head + 1 else None)
        for _ in range(SNAPSHOT_LOAD_ATTEMPTS_MAX):
            recorded: int | None
            if fenced is not None:
                recorded, starts, head = fenced.epoch, fenced.starts, fenced.fenced_head
                fenced = None  # a retry (truncated under us) reads them
            else:
                recorded, starts = await self._fence_state(shard)
                head = await self._head(shard, recorded, starts)
            snapshot_seq, snapshot = await self.load_snapshot(shard)
            batches = await self._read_spans(shard, snapshot_seq, head, epoch_runs(starts))
            if ((not batches and head > snapshot_seq)
                    or (batches and batches[0].seq > snapshot_seq + 1)):
                # The first batches after the snapshot are missing: truncated under us if a
                # newer snapshot covers them now (load again from it), else a broken read.
                newer, _ = await self._latest_mark_seq(shard)
                if newer > snapshot_seq:
                    continue
            last = _gapless_to_head(shard, batches, snapshot_seq, head)
            return LoadedShard(snapshot, snapshot_seq, batches, min(rows_mark, last),
                               basis_of(starts))
        raise StoreUnavailable(f"shard {shard}: the journal was truncated under every one of "
                               f"{SNAPSHOT_LOAD_ATTEMPTS_MAX} loads")

    @_hedging
    async def load_after(self, shard: int, seq: int,
                         basis: tuple[tuple[int, int], ...]) -> LoadedShard | None:
        """See ``JournalStore.load_after``: ``load``'s reads, from batch ``seq`` on.

        The caller's batches up to ``seq`` count now as they did when it read them if and
        only if the runs starting below ``seq`` are the same (``epoch_runs``: a batch belongs
        to the run of the latest start below it), and a fence since then, whose run starts at
        the head it read, read a head of at least ``seq``.
        """
        rows_mark = await self._views.read_mark(shard)
        writer = self._writers.get(shard)
        if (writer is not None and not writer.broken
                and writer.next_seq == writer.fenced_head + 1):
            starts, head = writer.starts, writer.fenced_head  # right after our own fence
        else:
            recorded, starts = await self._fence_state(shard)
            head = await self._head(shard, recorded, starts)
        if head < seq or basis_below(basis_of(starts), seq) != basis_below(basis, seq):
            return None
        batches = await self._read_spans(shard, seq, head, epoch_runs(starts))
        if (not batches and head > seq) or (batches and batches[0].seq != seq + 1):
            return None  # truncated after seq: a newer snapshot covers what follows it
        last = _gapless_to_head(shard, batches, seq, head)
        return LoadedShard(None, seq, batches, min(rows_mark, last), basis_of(starts))

    async def _read_spans(self, shard: int, after_seq: int, head: int,
                          runs: dict[int, tuple[int, int]]) -> list[JournalBatch]:
        """``_read_counted(shard, after_seq, None, runs)``, with the batches up to ``head``
        read as spans of ``JOURNAL_PAGE_BATCHES`` numbers, ``LOAD_SPANS_IN_FLIGHT`` at once.

        A takeover's load is sequential page reads otherwise: 140-220 batches took 250-1045
        ms on a planned drain under load (four round trips one after the other).
        """
        bounds = [(low, min(low + JOURNAL_PAGE_BATCHES, head))
                  for low in range(after_seq, head, JOURNAL_PAGE_BATCHES)]
        gate = asyncio.Semaphore(LOAD_SPANS_IN_FLIGHT)

        async def span(low: int, high: int | None) -> list[JournalBatch]:
            async with gate:
                return await self._read_counted(shard, low, None, runs, through_seq=high)

        parts = await asyncio.gather(*(span(low, high) for low, high in bounds),
                                     span(max(after_seq, head), None))
        return [batch for part in parts for batch in part]

    async def _read_counted(self, shard: int, after_seq: int, limit: int | None,
                            runs: dict[int, tuple[int, int]],
                            through_seq: int | None = None) -> list[JournalBatch]:
        """Batches above ``after_seq`` (up to ``through_seq`` if given) that count under
        ``runs``, in order, at most ``limit``."""
        out: list[JournalBatch] = []
        after = (after_seq, BIGINT_MAX)
        while limit is None or len(out) < limit:
            if through_seq is None:
                rows = await self._driver.read(self._q_journal, (shard, *after,
                                                                 JOURNAL_PAGE_BATCHES))
            else:
                rows = await self._driver.read(self._q_journal_span, (
                    shard, *after, through_seq, BIGINT_MAX, JOURNAL_PAGE_BATCHES))
            for r in rows:
                if counts(runs, r["seq"], r["writer_epoch"]):
                    out.append(JournalBatch(r["seq"], r["writer_epoch"], r["events"]))
            if len(rows) < JOURNAL_PAGE_BATCHES:
                break
            after = (rows[-1]["seq"], rows[-1]["writer_epoch"])
        return out if limit is None else out[:limit]

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
        """Batches numbered above ``after_seq`` that count, in order, at most ``limit``.

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        _, starts = await self._fence_state(shard)
        return await self._read_counted(shard, after_seq, limit, epoch_runs(starts))

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

        The static epoch and starts are not touched (a range delete of clustering rows
        leaves the partition's static row). Reads start after the latest snapshot (``seq > ?``), so
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
