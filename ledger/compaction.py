"""Snapshots built from the durable journal, off the event loop, and journal truncation.

A snapshot bounds what a new owner replays on takeover. It is built from DURABLE data only,
never from an owner's live state: ``compact`` loads the latest complete snapshot and the
journal batches after it up to a batch number the caller knows is durable, folds them through
the pure core (``ledger.core.step.fold``, as a replay does), encodes the result, saves it (in
parts, completion mark last: ``JournalStore.save_snapshot``), and then truncates the journal
it covers. Decoding, folding and encoding (``build_snapshot``) run in a worker process
(``COMPACTION_IN_PROCESS``; a worker thread otherwise): the event loop only does the store
I/O. A thread was measured first: it shares the GIL and the garbage collector with the loop
and stalled it for 60-100 ms at the 99th percentile on this 2-core box; a process for about
what an idle loop shows (README "Snapshots and replay"). The workers run at lower CPU
priority (``K.COMPACTION_NICE``): at the node's own, two of them took the CPU its keep-alive
thread needed (keep-alives 1.91 s apart at a 2 s lease, README "Failover at load").

``replay`` is the same fold for a new owner's takeover (snapshot + batches after it, with the
rows of the replayed batches), in a worker thread: the state must end up in this process.
``warm`` is that fold without rows, for a node that is about to be handed a shard another node
still serves (``ledger.node.Node``, "warm standbys"): its takeover then replays only the
batches appended since (``JournalStore.load_after``), onto the warm state.

Why from the journal and not from the live state: the live state may already hold a batch
whose append is in flight (the owner applies a batch, then awaits its append); a snapshot of
it could contain money that never reaches the journal, or, if the append lands after all,
make a replay apply that batch twice. A snapshot of the journal up to a durable batch holds
exactly what any future replay would rebuild, whoever builds it: a deposed owner's late
compaction is still correct, and a lower one never replaces a newer snapshot (the store
refuses it).

``Compactor`` runs the compactions of one shard owner: one at a time, started when enough has
been journaled since the last snapshot, supervised (a failure is logged and retried with a
bounded backoff; the owner's correctness never depends on a snapshot: the journal is complete
until a snapshot covers it).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import time
import weakref
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from ledger import constants as K
from ledger import metrics
from ledger.runtime import tasks
from ledger.core import codec, step
from ledger.core.shard import ShardState
from ledger.store.port import JournalBatch, JournalStore, LoadedShard, StoreUnavailable

log = logging.getLogger("ledger.compaction")


class CompactionError(Exception):
    """The journal read for a snapshot was not what it must be (a gap, or batches gone)."""


@dataclass(frozen=True, slots=True)
class Compacted:
    """What one ``compact`` did."""

    seq: int              # batch number the shard's latest snapshot now covers
    base_seq: int         # the snapshot it started from
    batches: int          # journal batches folded into it
    size: int             # bytes of the new snapshot (0 if none was written)
    saved: bool           # a new snapshot was written (False: one at >= seq existed)
    seconds: float


def state_records(state: ShardState) -> int:
    """Records a snapshot of ``state`` holds, roughly: what building one costs."""
    return len(state.wallets) + len(state.transfers) + len(state.holds)


def decode(shard: int, snapshot: bytes | None, seq: int) -> ShardState:
    """The state a snapshot holds (an empty shard without one); checked to be what it says."""
    state = codec.snapshot_loads(snapshot) if snapshot is not None else ShardState(shard)
    if state.shard != shard or state.seq != seq:
        raise CompactionError(f"snapshot of shard {state.shard} at {state.seq} stored as "
                              f"shard {shard} at {seq}")
    return state


def fold(state: ShardState, batches: list[JournalBatch]) -> None:
    """Apply journal batches to ``state`` in order (pure; run it in a worker thread).

    Raises:
        CompactionError: a batch is missing.
        InvariantViolation: an event does not apply.
    """
    try:
        step.fold(state, batches)
    except step.JournalGap as exc:
        raise CompactionError(str(exc)) from exc


def _fold_rows(state: ShardState, batches: list[JournalBatch], rows: list) -> int:
    """Fold batches into ``state`` collecting their rows, until ``REPLAY_ROWS_FLUSH`` rows are
    collected; return how many batches were folded (run it in a worker thread).

    Raises:
        InvariantViolation: a batch is missing (``JournalGap``) or an event does not apply.
    """
    return step.fold(state, batches, rows, rows_max=K.REPLAY_ROWS_FLUSH)


async def _fold_in_slices(state: ShardState, batches: list[JournalBatch],
                          fold_batches=fold) -> None:
    """Fold ``batches`` into ``state`` in a worker thread, ``REPLAY_SLICE_BATCHES`` at a time
    (the event loop runs between slices), without collecting rows."""
    for position in range(0, len(batches), K.REPLAY_SLICE_BATCHES):
        await asyncio.to_thread(fold_batches, state,
                                batches[position:position + K.REPLAY_SLICE_BATCHES])


@dataclass(slots=True)
class WarmShard:
    """A shard's state folded from the journal while another node still serves it.

    ``state`` is what a takeover's replay of the same load would build (no rows written:
    the serving owner writes them); ``basis`` is the load's, for ``load_after``; ``loaded_at``
    is when its last read started (monotonic): the journal has run on since, so a holder can
    tell a stale one.
    """

    state: ShardState
    basis: tuple[tuple[int, int], ...]
    loaded_at: float
    took_s: float = 0.0


async def warm(store: JournalStore, shard: int,
               fold_slots: asyncio.Semaphore | None = None,
               previous: WarmShard | None = None) -> WarmShard:
    """Load ``shard`` and fold it, without writing anything: a takeover made ready ahead.
    The fold holds one of ``fold_slots`` (the node's replay slots) while it runs. If the
    owner appended more than ``K.WARM_CATCH_UP_BATCHES`` meanwhile, they are read and folded
    too (``load_after``), up to ``K.WARM_CATCH_UP_ROUNDS_MAX`` reads in all. Last, the reads
    a fence starts with (``JournalStore.probe_fence``): a standby is ready only if its node
    could take the shard over now.

    Only batches up to the store's rows mark are folded (the rest is read again by the
    next follow, or by the takeover): a takeover uses a standby only if the rows of its
    batches are written.

    ``previous``, if given, is an earlier warm state of the shard that nobody else holds
    now: only the batches appended since are read and folded onto its state (following the
    journal), unless the store says that fold is no longer a prefix of the journal (a newer
    snapshot truncated the batches after it, or a fence read a lower head): then the shard
    is loaded afresh.

    Raises:
        StoreUnavailable: the load failed. CompactionError, InvariantViolation: as ``replay``.
    """
    started = read_at = time.monotonic()
    state: ShardState | None = None
    basis: tuple[tuple[int, int], ...] = ()
    loaded: LoadedShard | None = None
    if previous is not None:
        loaded = await store.load_after(shard, previous.state.seq, previous.basis)
        if loaded is not None:
            state, basis = previous.state, previous.basis
    followed = loaded is not None
    if loaded is None:
        loaded = await store.load(shard)
    for _ in range(K.WARM_CATCH_UP_ROUNDS_MAX):
        assert loaded is not None
        async with fold_slots or contextlib.nullcontext():
            if state is None:
                state = await asyncio.to_thread(decode, shard, loaded.snapshot,
                                                loaded.snapshot_seq)
            batches = loaded.batches
            if loaded.rows_seq:
                # Only batches whose rows are written: a takeover uses the standby only if
                # the rows mark reached it (``ShardOwner._replay``), and an owner that
                # crashed never raised it past its last second of batches.
                batches = [b for b in batches if b.seq <= loaded.rows_seq]
            await _fold_in_slices(state, batches)
        basis = loaded.basis
        if len(loaded.batches) <= K.WARM_CATCH_UP_BATCHES:
            break
        # A slow load (a store just restarted) let the owner append many batches meanwhile:
        # read them too, so the takeover's tail is short.
        read_at = time.monotonic()
        loaded = await store.load_after(shard, state.seq, basis)
        if loaded is None:
            break  # no longer continued: the takeover will find so too, and load afresh
    assert state is not None
    if not followed:
        # Ready only if the store can fence the shard now, not only read its journal. (Not
        # asked again at every follow: on Cassandra it is a SERIAL read, a Paxos round.)
        await store.probe_fence(shard)
    return WarmShard(state, basis, read_at, time.monotonic() - started)


async def standby_of(follow: asyncio.Future) -> WarmShard | None:
    """The standby a follow (``warm`` from a previous state, run as a task) brings once it
    ends, waiting at most ``K.WARM_FOLLOW_WAIT_S``: a gain that came while its standby was
    being followed continues from it (the takeover fences meanwhile). None if it failed, or
    did not end in time (then it is cancelled, and the takeover loads afresh)."""
    done, _ = await asyncio.wait({follow}, timeout=K.WARM_FOLLOW_WAIT_S)
    if not done:
        follow.cancel()
        return None
    return None if follow.cancelled() else follow.result()


async def replay(store: JournalStore, shard: int, loaded: LoadedShard,
                 timings: dict | None = None, state: ShardState | None = None) -> ShardState:
    """What ``ShardOwner._replay`` does with a loaded shard, off the event loop.

    ``state``, if given, is a warm state (``warm``) at ``loaded.snapshot_seq`` that a
    ``load_after`` continued: the batches are folded onto it (and it is the result).

    Decodes the snapshot and folds the batches after it in a worker thread, a slice at a
    time, writing the rows of the replayed batches (as of the last batch folded, like the
    owner) between slices. The event loop (other shards' owners, lease renewals) keeps
    running meanwhile; the result is the same state.

    The batches up to ``loaded.rows_seq`` are folded without their rows: the store holds
    them already (a planned hand-over flushes them all, so the new owner writes none). After
    writing the rest, the store's rows mark is raised to the last batch (``mark_rows``), so
    the next replay does not write them again either.

    ``timings``, if given, gets what the takeover log line reports: ``batches`` replayed,
    ``rows_batches`` of them whose rows were written, ``rows`` written and ``rows_s`` spent
    writing them.

    Raises:
        InvariantViolation: a gap in the batches, or an event that does not apply.
        CompactionError: the snapshot is not the one the load named.
        StoreUnavailable: rows could not be written.
    """
    if state is None:
        state = await asyncio.to_thread(decode, shard, loaded.snapshot, loaded.snapshot_seq)
    elif loaded.snapshot is not None or state.seq != loaded.snapshot_seq:
        raise CompactionError(f"shard {shard}: a warm state at batch {state.seq} cannot "
                              f"continue a load from batch {loaded.snapshot_seq}")
    batches = loaded.batches
    # Batches whose rows are written already: the first ``written`` of them.
    written = sum(1 for b in batches if b.seq <= loaded.rows_seq)
    await _fold_in_slices(state, batches[:written], step.fold)
    position = written
    rows: list = []
    wrote, rows_count, rows_s = False, 0, 0.0
    while position < len(batches):
        position += await asyncio.to_thread(_fold_rows, state, batches[position:position + K.REPLAY_SLICE_BATCHES],
                                            rows)
        if len(rows) > K.REPLAY_ROWS_FLUSH or (rows and position == len(batches)):
            started = time.monotonic()
            await _write_replayed_rows(store, shard, rows, state.seq)
            rows_s += time.monotonic() - started
            rows_count += len(rows)
            rows, wrote = [], True
    if wrote:
        await _mark_replayed_rows(store, shard, state.seq)
    if timings is not None:
        timings.update(batches=len(batches), rows_batches=len(batches) - written,
                       rows=rows_count, rows_s=rows_s)
    return state


async def _mark_replayed_rows(store: JournalStore, shard: int, seq: int) -> None:
    """Raise the rows mark after a replay wrote its rows. An optimisation for the next
    takeover only: a failure is logged and the shard is served anyway (the next replay
    then writes those rows again)."""
    try:
        await store.mark_rows(shard, seq)
    except StoreUnavailable as exc:
        metrics.STORE_ERRORS.labels("mark_rows", type(exc).__name__).inc()
        log.warning("shard %d: rows mark not raised after the replay: %s", shard, exc)


async def _write_replayed_rows(store: JournalStore, shard: int, rows: list, seq: int) -> None:
    """Write a replay's rows, retrying a store that is briefly unavailable.

    Rows are idempotent upserts stamped with their journal position. A takeover that gave up
    on the first timeout (a region just lost, a store under load) would release the shard,
    and the next owner would replay and time out the same way: the shard would pass from
    node to node without ever serving. ``K.REPLAY_ROW_WRITE_ATTEMPTS_MAX`` bounds the wait.
    """
    backoff_s = K.REPLAY_ROW_WRITE_BACKOFF_S
    for attempt in range(1, K.REPLAY_ROW_WRITE_ATTEMPTS_MAX + 1):
        try:
            await store.write_rows(shard, rows, seq)
            return
        except StoreUnavailable as exc:
            if attempt == K.REPLAY_ROW_WRITE_ATTEMPTS_MAX:
                raise
            log.warning("shard %d: rows of the replay not written (attempt %d of %d): %s",
                        shard, attempt, K.REPLAY_ROW_WRITE_ATTEMPTS_MAX, exc)
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, K.REPLAY_ROW_WRITE_BACKOFF_MAX_S)


def build_snapshot(shard: int, base_seq: int, snapshot: bytes | None,
                   batches: list[tuple[int, int, bytes]], pause_gc: bool = False) -> bytes:
    """The snapshot after ``batches`` (``(seq, epoch, events)``, in order) applied to the
    snapshot at ``base_seq``: decode, fold, encode. Pure and CPU-bound; runs in a worker
    process (``COMPACTION_IN_PROCESS``) or thread.

    ``pause_gc`` (a worker process only: the collector is process-wide) turns the cyclic
    garbage collector off meanwhile: building a state of millions of objects otherwise runs
    ever longer full collections (measured: decoding 300 k kept transfers 10.8 s with it,
    3.7 s without). The state is acyclic and dropped when the worker exits.
    """
    paused = pause_gc and gc.isenabled()
    if paused:
        gc.disable()
    try:
        state = decode(shard, snapshot, base_seq)
        del snapshot
        fold(state, [JournalBatch(*b) for b in batches])
        return codec.snapshot_dumps(state)
    finally:
        if paused:
            gc.enable()


_POOL: ProcessPoolExecutor | None = None


def _pool() -> ProcessPoolExecutor:
    """The process pool of compactions (spawned: the parent runs driver and store threads,
    which a fork would copy in whatever state they are). A worker serves one compaction and
    exits, returning the memory of the state it built."""
    global _POOL
    if _POOL is None:
        _POOL = ProcessPoolExecutor(max_workers=K.COMPACTIONS_CONCURRENT_MAX,
                                    mp_context=multiprocessing.get_context("spawn"),
                                    max_tasks_per_child=1, initializer=background_priority)
    return _POOL


def background_priority() -> None:
    """Lower this (worker) process's CPU priority by ``K.COMPACTION_NICE``: snapshots are
    background work, and must not take the CPU the node's keep-alives and event loop need
    on a contended machine. Raising one's own niceness needs no privilege."""
    try:
        os.nice(K.COMPACTION_NICE)
    except OSError as exc:  # not on this platform: the worker runs at the node's priority
        log.warning("compaction worker: niceness not raised: %r", exc)


async def _build(shard: int, base_seq: int, snapshot: bytes | None,
                 batches: list[tuple[int, int, bytes]]) -> bytes:
    global _POOL
    if not K.COMPACTION_IN_PROCESS:
        return await asyncio.to_thread(build_snapshot, shard, base_seq, snapshot, batches)
    try:
        return await asyncio.get_running_loop().run_in_executor(
            _pool(), build_snapshot, shard, base_seq, snapshot, batches, True)
    except BrokenProcessPool:
        broken, _POOL = _POOL, None  # a worker died (killed, out of memory): a new pool next
        if broken is not None:
            broken.shutdown(wait=False, cancel_futures=True)
        raise


async def compact(store: JournalStore, shard: int, seq: int) -> Compacted:
    """Snapshot the shard after durable batch ``seq`` (or an earlier one), then truncate the
    journal up to it.

    Reads the latest complete snapshot and the journal after it up to ``seq``, at most
    ``COMPACTION_JOURNAL_BYTES_MAX`` of it (a longer journal is compacted in several rounds:
    the result's ``seq`` is then below ``seq``; call again), builds the new snapshot off the
    event loop (``build_snapshot``), saves it and truncates what it covers.

    ``seq`` must be durable (an append of it returned, or a load saw it): everything up to it
    is read back from the store. Safe to run by any process at any time, concurrently with
    the owner and with other compactions of the shard (the store keeps the newest snapshot,
    and only truncates what a complete snapshot covers).

    Raises:
        CompactionError: the journal after the snapshot is not there up to ``seq`` (another
            compaction truncated it meanwhile: run again; or ``seq`` is not durable).
        StoreUnavailable, InvariantViolation (the journal does not replay: the owner's own
        replay would fail the same way), BrokenProcessPool.
    """
    started = time.monotonic()
    base_seq, snapshot = await store.load_snapshot(shard)
    if base_seq >= seq:
        return Compacted(base_seq, base_seq, 0, 0, False, time.monotonic() - started)
    batches: list[tuple[int, int, bytes]] = []
    size, after = 0, base_seq
    while after < seq and size < K.COMPACTION_JOURNAL_BYTES_MAX:
        page = await store.read_journal(shard, after, min(K.COMPACTION_PAGE_BATCHES,
                                                          seq - after))
        if not page or page[0].seq != after + 1:
            raise CompactionError(
                f"shard {shard}: journal after batch {after} starts at "
                f"{page[0].seq if page else 'nothing'} (wanted up to {seq}): truncated by a "
                f"newer snapshot meanwhile, or not durable")
        for batch in page:
            if batch.seq > seq:
                break
            batches.append((batch.seq, batch.epoch, batch.events))
            size += len(batch.events)
            after = batch.seq
    data = await _build(shard, base_seq, snapshot, batches)
    del snapshot, batches
    saved = await store.save_snapshot(shard, after, data)
    if saved:
        await store.truncate_journal(shard, after)
    return Compacted(after, base_seq, after - base_seq, len(data), saved,
                     time.monotonic() - started)


# Compactions running at once per event loop (process): each holds a decoded copy of its
# shard's state and keeps a CPU busy, so a node taking over many shards does not build all
# their snapshots at once.
_LIMITS: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]" = (
    weakref.WeakKeyDictionary())


def _limit() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    sem = _LIMITS.get(loop)
    if sem is None:
        sem = _LIMITS[loop] = asyncio.Semaphore(K.COMPACTIONS_CONCURRENT_MAX)
    return sem


class Compactor:
    """Snapshots one shard owner's journal when due, one compaction at a time.

    The owner calls ``note_append`` after every append that returned (its batch is durable)
    and ``close`` when it stops. A snapshot is due when, since the latest one, the journal
    grew by ``SNAPSHOT_EVERY_BATCHES`` batches or ``SNAPSHOT_EVERY_EVENTS`` events, and by
    at least ``SNAPSHOT_EVENTS_PER_RECORD_MIN`` events per record of the state (building a
    snapshot costs about as much per record as replay does per event, so snapshots of big
    states are spaced in proportion: compaction stays a bounded share of the commit path's
    CPU, and replay a bounded multiple of loading the snapshot).

    Events journaled before this owner started (the batches it replayed) are estimated from
    the batch count and the mean batch size it sees; the latest snapshot's batch number is
    read from the store (``journal_position``) before the first compaction, so an owner that
    restarts often still snapshots a journal that keeps growing.
    """

    def __init__(self, shard: int, store: JournalStore) -> None:
        self.shard = shard
        self._store = store
        # Latest snapshot's batch number (None until read from the store).
        self._base_seq: int | None = None
        self._first_seq: int | None = None   # first batch this owner appended
        self._events_since = 0   # events this owner appended after the base
        self._events_noted = 0   # events this owner appended, in ``_batches_noted`` batches
        self._batches_noted = 0
        self._records = 0        # state_records of the state after the latest append
        self._seq = 0            # latest durable batch noted
        self._task: asyncio.Task | None = None
        self._retry_at = 0.0     # loop time before which no run starts (after failures)
        self._closed = False
        self.last: Compacted | None = None
        self.failures = 0        # failed attempts (tests, metrics)
        self.runs = 0            # compactions started (tests, metrics)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def note_append(self, seq: int, events: int, state: ShardState) -> None:
        """Batch ``seq`` (``events`` events) is durable; start a compaction if one is due."""
        if self._first_seq is None:
            self._first_seq = seq
        self._events_since += events
        self._events_noted += events
        self._batches_noted += 1
        self._records = state_records(state)
        self._seq = seq
        if self._closed or self.running or asyncio.get_running_loop().time() < self._retry_at:
            return
        if self._due():
            self.start(seq)

    def _events_estimate(self) -> float:
        base = self._base_seq or 0
        unseen = max(0, (self._first_seq or 1) - 1 - base)  # replayed, not appended, by us
        mean = self._events_noted / self._batches_noted if self._batches_noted else 0.0
        return self._events_since + unseen * mean

    def _due(self) -> bool:
        batches = self._seq - (self._base_seq or 0)
        events = self._events_estimate()
        if batches < K.SNAPSHOT_EVERY_BATCHES and events < K.SNAPSHOT_EVERY_EVENTS:
            return False
        return events >= self._records * K.SNAPSHOT_EVENTS_PER_RECORD_MIN

    def start(self, seq: int) -> asyncio.Task | None:
        """Start a compaction up to durable batch ``seq`` now, unless one is running."""
        if self._closed or self.running:
            return self._task
        self._task = tasks.spawn(self._run(seq), name=f"compaction-{self.shard}")
        return self._task

    async def _run(self, seq: int) -> None:
        """Compact up to ``seq``; on failure retry with a growing pause, a bounded number of
        times, then wait for the next due point (no sooner than the longest pause)."""
        loop = asyncio.get_running_loop()
        if self._base_seq is None:
            try:
                self._base_seq = (await self._store.journal_position(self.shard))[2]
            except Exception as exc:
                log.warning("shard %d: cannot read the latest snapshot's position (%r); "
                            "compacting anyway", self.shard, exc)
                self._base_seq = 0
            if self._base_seq >= seq or not self._due():
                return
        events_at_start = self._events_since
        attempt = 0
        while attempt < K.SNAPSHOT_ATTEMPTS_MAX:
            attempt += 1
            self.runs += 1
            try:
                async with _limit():
                    result = await asyncio.wait_for(compact(self._store, self.shard, seq),
                                                    K.SNAPSHOT_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                if attempt == K.SNAPSHOT_ATTEMPTS_MAX:
                    log.error("shard %d: snapshot up to batch %d failed %d times (%r); the "
                              "journal stays complete; next try when due, in %.0f s at the "
                              "earliest", self.shard, seq, attempt, exc,
                              K.SNAPSHOT_RETRY_BACKOFF_MAX_S, exc_info=exc)
                    self._retry_at = loop.time() + K.SNAPSHOT_RETRY_BACKOFF_MAX_S
                    return
                pause = min(K.SNAPSHOT_RETRY_BACKOFF_S * 2 ** (attempt - 1),
                            K.SNAPSHOT_RETRY_BACKOFF_MAX_S)
                log.warning("shard %d: snapshot up to batch %d failed (%r); retrying in "
                            "%.1f s", self.shard, seq, exc, pause)
                await asyncio.sleep(pause)  # backoff on a failing store, not a synchronization
                continue
            attempt = 0
            self.last = result
            self._base_seq = max(self._base_seq or 0, result.seq)
            if result.saved:
                log.info("shard %d: snapshot at batch %d (from %d, %d batches folded, %d "
                         "bytes) in %.2f s; journal truncated", self.shard, result.seq,
                         result.base_seq, result.batches, result.size, result.seconds)
            if result.seq < seq and result.seq > result.base_seq:
                continue  # a long journal is compacted in rounds: the next one
            self._events_since = max(0, self._events_since - events_at_start)
            return

    async def close(self) -> None:
        """Stop: cancel a running compaction and wait until it has ended (a half-written
        snapshot has no completion mark and is ignored; the next save drops its parts)."""
        self._closed = True
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
