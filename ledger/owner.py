"""The shard owner: the single writer of one shard.

It keeps the shard's state in memory, applies commands strictly in arrival order through the
pure core, and persists the events of many commands with one journal append (group commit).
Answers are released only after their batch is durable, so reads inside a batch are
linearizable with the writes around them. The owner also runs the shard's crediting pipeline:
it delivers outbox credits to other shards in order and journals their acknowledgement.

An owner stops serving for good (and its node gives the shard up) when its epoch is fenced, when
a write has an unknown outcome, or when an invariant breaks: a new owner replays the journal.
"""

from __future__ import annotations

import asyncio
import functools
import collections
import contextlib
import logging
import time
from typing import Awaitable, Callable, NamedTuple, Protocol

from ledger import constants as K
from ledger import metrics
from ledger.runtime import failpoints
from ledger.runtime.tasks import spawn
from ledger import compaction
from ledger.compaction import Compactor
from ledger.core import audit, codec
from ledger.core.constants import IDEMPOTENCY_RETENTION_MS
from ledger.core.invariants import InvariantViolation
from ledger.core.constants import CHAIN_RESOLVE_AFTER_MS, RESERVATION_TTL_MS
from ledger.core.model import (
    KIND_HOLD_CAPTURE, STATE_COMMITTED, AckOutbox, ApplyCredits, ChainFinished, DecideChain, DropReservations, ExpireHolds,
    ExpireIdempotency, FinishChain, NoteAdmin, Post, RefundEnvelope, ReserveCredit,
    ResolveReservations,
    SpillIdempotency, Transfer, TransferDecided, WalletCreated,
)
from ledger.core.ids import transfer_id_for
from ledger.core.shard import ShardState, debit_shard_of, record_of_transfer
from ledger.core.step import step
from ledger.core.outcomes import OVERLOADED, UNAVAILABLE
from ledger.core.status import Outcome
from ledger.runtime.clock import Clock, now_ms
from ledger.store.port import Fenced, JournalStore, StoreUnavailable, UnknownOutcome

log = logging.getLogger("ledger.owner")

class OwnerStats(NamedTuple):
    queued_commands: int
    owed_credits: int  # owed to other shards, not yet known delivered there
    credit_lag_s: float  # age of the oldest of them (0: none)
    idempotency_records: int
    appends: int
    commands: int  # commands in journaled batches
    append_seconds: float


# An admin note, or what builds it from the live state and the time when its batch is formed
# (``ShardOwner.note_admin``).
AdminNote = NoteAdmin | Callable[[ShardState, int], list[NoteAdmin]]



class ShardExecutor(Protocol):
    """How an owner reaches other shards' owners (its crediting pipeline, reservation and
    chain resolution); ``shard_router.router.Router`` is the adapter."""

    async def execute(self, shard: int, commands: list, wait_credit: bool = False
                      ) -> list[Outcome]:
        """Run ``commands`` in order on the owner of ``shard``; one outcome per command.

        Every command the owner sends is safe to send again. A shard without a serving owner
        is answered ``SHARD_UNAVAILABLE`` after the executor's own retry budget.
        """
        ...


class _Request:
    """Commands submitted together; answered together once their batch is durable.

    ``deadline`` (loop time, or None) is the caller's: a request still queued at it is not
    started (answered SHARD_UNAVAILABLE: nothing was decided)."""

    __slots__ = ("commands", "future", "outcomes", "deadline")

    def __init__(self, commands: list, future: asyncio.Future | None,
                 deadline: float | None = None) -> None:
        self.commands = commands
        self.future = future
        self.outcomes: list[Outcome] = []
        self.deadline = deadline

    def answer(self, outcomes: list[Outcome]) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_result(outcomes)


def _spills(request: _Request) -> bool:
    """True for a request that spills keys. It is decided in a step of its own: the keys of
    a step's commands are looked up (``ShardState.keys_to_load``) before the step, so a key
    spilled by an earlier command of the same step would be missed by a later one (found
    by the simulation, seed 52: the same transfer committed twice)."""
    return any(type(c) is SpillIdempotency for c in request.commands)


def _thin(pending: dict[int, list], per_dest: int) -> bool:
    """Credits ready for many destinations, fewer than ``per_dest`` for each on average (see
    ``ShardOwner._linger``)."""
    return (len(pending) >= K.CREDIT_LINGER_FANOUT_MIN
            and sum(map(len, pending.values())) < len(pending) * per_dest)


def _cancel_timer(timer: asyncio.TimerHandle, _: asyncio.Future) -> None:
    timer.cancel()


def _answer_unavailable(future: asyncio.Future, count: int) -> None:
    """The caller's deadline passed before the answer: SHARD_UNAVAILABLE (may still commit)."""
    if not future.done():
        future.set_result([UNAVAILABLE] * count)


class ShardOwner:
    """Serves one shard with one epoch. Create with ``start()``, end with ``stop()``."""

    def __init__(self, shard: int, epoch: int, store: JournalStore, peers: ShardExecutor,
                 clock_ms: Clock = now_ms,
                 on_stopped: Callable[[int, int, str], Awaitable[None]] | None = None,
                 idempotency_retention_ms: int = IDEMPOTENCY_RETENTION_MS,
                 lease_valid: Callable[[], bool] = lambda: True,
                 idempotency_memory_ms: int = K.IDEMPOTENCY_MEMORY_MS,
                 replay_slots: asyncio.Semaphore | None = None,
                 lease_valid_for: Callable[[float], bool] | None = None,
                 wait_lease: Callable[[float], Awaitable[None]] | None = None,
                 confirm_held: Callable[[int, int], Awaitable[bool]] | None = None) -> None:
        self.shard = shard
        # For an append that returned after the lease's local deadline: wait for etcd to say
        # whether this node still holds the shard with this epoch (``EtcdOwnership.
        # confirm_held``). None: such an append gives the shard up at once.
        self._confirm_held = confirm_held
        # With an etcd lease (``EtcdOwnership``): is it valid for another N s, and wait until
        # it is (after keep-alives were late: the node's shards are suspended, not lost, until
        # etcd confirms the lease). None (no lease, tests): appends are not held.
        self._lease_valid_for = lease_valid_for
        self._wait_lease = wait_lease
        # Shared by a node's owners: how many takeover replays (CPU-bound folds) run at once.
        self._replay_slots = replay_slots
        self._lease_valid = lease_valid
        self.epoch = epoch
        self.state = ShardState(shard)
        # What ``start`` spent where (fence, load, replay, the rows the replay wrote): the
        # node's takeover log line.
        self.takeover_timings: dict = {}
        self._store = store
        self._peers = peers
        self._clock_ms = clock_ms
        self._on_stopped = on_stopped
        self._retention_ms = idempotency_retention_ms
        self._memory_ms = min(idempotency_memory_ms, idempotency_retention_ms)
        self._spill_every_s = min(K.IDEMPOTENCY_SPILL_EVERY_S, self._memory_ms / 4000)
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_commands = 0
        self._inflight: list[_Request] = []
        # Wallets created by the batch whose append is in flight (not durable yet).
        self._ahead_wallets: set[str] = set()
        self._wakeup = asyncio.Event()
        self._outbox_kick = asyncio.Event()
        self._serving = False
        self._tasks: list[asyncio.Task] = []
        # Snapshots of the durable journal, built off the event loop (ledger.compaction).
        self._compactor = Compactor(shard, store)
        # Highest outbox sequence per destination known applied there (in memory: after a
        # restart the pipeline resends from the journaled ack, and the receiver dedupes).
        self._delivered: dict[int, int] = {}
        # Highest outbox sequence per destination that is DURABLE in the journal. The live
        # state runs ahead of the journal while an append is in flight; the crediting
        # pipeline sends nothing above this mark, so a credit never leaves the owner before
        # the debit that owes it is durable (if that append then fails, the reload replays
        # the journal and the same sequence numbers are given to other transfers).
        self._durable_outbox: dict[int, int] = {}
        # Answers waiting for their credit leg: to_shard -> deque of (outbox_seq, future).
        self._credit_waiters: dict[int, collections.deque] = {}
        # When the last append owing new credits became durable (loop time, s): credits
        # nobody waits for linger while more keep coming (``_linger``).
        self._credits_owed_at = 0.0
        # The usual gap between two such appends (s, a moving average over runs of them).
        self._credits_owed_gap = 0.0
        # Acknowledgements of delivered credits not yet journaled: to_shard -> highest seq.
        self._acks_pending: dict[int, int] = {}
        self._ack_timer: asyncio.TimerHandle | None = None
        # When each stale reservation may be asked about again (loop time, s).
        self._next_ask: dict[tuple[str, int], float] = {}
        # Admin notes not yet journaled (``note_admin``), how many of them are in the batch
        # being appended, whether they waited long enough to go in a batch of their own, and
        # the timer that says so.
        self._admin_notes: list[AdminNote] = []
        self._notes_inflight = 0
        self._notes_due = False
        self._notes_timer: asyncio.TimerHandle | None = None
        # What /metrics reads of this owner (``stats``): its appends, the commands they
        # carried, and the time they took.
        self._appends = 0
        self._commands_journaled = 0
        self._append_s = 0.0
        # Set at the next durable append (or stop), for change streams (``wait_appended``);
        # None while nobody waits.
        self._appended: asyncio.Event | None = None

    @property
    def serving(self) -> bool:
        return self._serving

    @property
    def durable_seq(self) -> int:
        """The last batch this owner holds durably (its journal head while it serves)."""
        return self.state.seq

    async def wait_appended(self, after_seq: int, timeout_s: float) -> None:
        """Return once a batch after ``after_seq`` is durable, this owner stops, or
        ``timeout_s`` passes (the caller then looks again: the owner may have changed)."""
        if self.state.seq > after_seq or not self._serving:
            return
        if self._appended is None:
            self._appended = asyncio.Event()
        try:
            await asyncio.wait_for(self._appended.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass

    def stats(self, now_ms: int) -> OwnerStats:
        """What ``/metrics`` shows of this owner (``ledger.metrics.NodeCollector``): read
        when scraped, so it walks the outbox then and never on the write path. Called from
        the metrics server's thread: the dicts are copied with ``list`` first (one C call
        each under the GIL), never iterated while the event loop may change them."""
        owed, oldest = 0, now_ms
        for dest, items in list(self.state.outbox.items()):
            delivered = self._delivered.get(dest, 0)
            for seq, credit in list(items.items()):
                if seq > delivered:
                    owed += 1
                    oldest = min(oldest, credit.at_ms)
        return OwnerStats(self._queued_commands, owed, max(0, now_ms - oldest) / 1000,
                          len(self.state.idempotency) + len(self.state.claims),
                          self._appends, self._commands_journaled, self._append_s)

    # --- life cycle -------------------------------------------------------------------------

    async def start(self, warm: compaction.WarmShard | asyncio.Future | None = None) -> None:
        """Fence the journal with our epoch, replay it, then serve.

        ``warm``: the shard folded ahead (``ledger.node.Node``, "warm standbys"). If the
        journal still continues it (``JournalStore.load_after``) and the rows of its batches
        are written, only the batches after it are read and replayed, onto it; else the
        journal is loaded afresh. It is consumed either way (folded onto, or dropped). A
        future instead is a follow of the standby that was running at the gain: what it
        brings is used, waited for (briefly, ``compaction.standby_of``) after the fence.

        Raises:
            Fenced: a newer owner exists. StoreUnavailable, UnknownOutcome.
        """
        started = time.monotonic()
        head = await self._store.fence(self.shard, self.epoch)
        self.takeover_timings["fence_s"] = time.monotonic() - started
        if isinstance(warm, asyncio.Future):
            warm = await compaction.standby_of(warm)
        await self._replay(warm)
        if self.state.seq != head:
            raise Fenced(f"shard {self.shard}: journal head moved from {head} to "
                         f"{self.state.seq} during takeover")
        self.state.check()
        self._serving = True
        # Kept until stop() ends them; a loop that fails gives the shard up (_supervised).
        self._tasks = [
            spawn(self._supervised(self._run(), "commit loop"), f"owner-{self.shard}"),
            spawn(self._supervised(self._deliver(), "crediting pipeline"),
                  f"credits-{self.shard}"),
            spawn(self._supervised(self._sweep(), "sweep"), f"sweep-{self.shard}")]
        if self.state.outbox:
            self._outbox_kick.set()

    async def _supervised(self, coro: Awaitable[None], what: str) -> None:
        """Run one of the owner's loops. A loop that fails (a bug, an unexpected error) does
        not vanish: the failure is logged and the owner gives the shard up, so that a new
        owner (here or on another node) replays the journal and serves it."""
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("shard %d epoch %d: %s failed", self.shard, self.epoch, what)
            if self._serving:
                await self._abdicate(f"{what} failed: {exc!r}")

    async def _replay(self, warm: compaction.WarmShard | None = None) -> None:
        # The fold runs in a worker thread, a slice at a time (ledger.compaction.replay): a
        # takeover replay of thousands of batches must not stall this node's other owners
        # and its lease keep-alives, or the node loses every shard while taking one over.
        started = time.monotonic()
        timings = self.takeover_timings
        loaded, base = None, None
        if warm is not None:
            loaded = await self._store.load_after(self.shard, warm.state.seq, warm.basis)
            # The warm fold wrote no rows: usable only if the rows of its batches are written
            # (the old owner flushed them before it let go), else a full replay writes them.
            if loaded is not None and loaded.rows_seq >= warm.state.seq:
                base = warm.state
                timings["warm_seq"] = warm.state.seq
            else:
                loaded = None
                timings["warm_seq"] = -1  # discarded: the journal no longer continues it
        if loaded is None:
            loaded = await self._store.load(self.shard)
        timings["load_s"] = time.monotonic() - started
        started = time.monotonic()
        async with self._replay_slots or contextlib.nullcontext():
            state = await compaction.replay(self._store, self.shard, loaded, timings, base)
        timings["replay_s"] = time.monotonic() - started
        self.state = state
        self._delivered = {}
        self._durable_outbox = dict(state.outbox_last_seq)

    async def stop(self, reason: str = "stopped") -> None:
        """Stop serving: answer queued commands SHARD_UNAVAILABLE, end background work.

        UNAVAILABLE is not a guess about an outcome: the router sends the commands again to
        the next owner, which replays the journal and answers retries from idempotency records.
        """
        self._serving = False
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for task in self._tasks:
            if task is not current:
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        pending = self._inflight + list(self._queue)
        self._inflight, self._queue, self._queued_commands = [], collections.deque(), 0
        for request in pending:
            request.answer([UNAVAILABLE] * len(request.commands))
        for waiters in self._credit_waiters.values():
            for _, fut in waiters:
                if not fut.done():
                    fut.set_result(False)
        self._credit_waiters.clear()
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        if self._notes_timer is not None:
            self._notes_timer.cancel()
            self._notes_timer = None
        if self._appended is not None:  # change streams look elsewhere now
            self._appended.set()
            self._appended = None
        self._acks_pending.clear()  # the next owner redelivers; the receiver dedupes
        # No snapshot of the live state here: it may hold a batch whose append was still in
        # flight when the commit loop was cancelled (a snapshot of it could hold money the
        # journal never gets, or make a replay apply that batch twice). Snapshots are built
        # from the durable journal only; a running one is cancelled (it is an optimisation).
        await self._compactor.close()

    async def _abdicate(self, reason: str) -> None:
        log.error("shard %d epoch %d stops serving: %s", self.shard, self.epoch, reason)
        await self.stop(reason)
        if self._on_stopped is not None:
            await self._on_stopped(self.shard, self.epoch, reason)

    # --- commands ---------------------------------------------------------------------------

    async def submit(self, command: object) -> Outcome:
        return (await self.submit_many([command]))[0]

    async def submit_many(self, commands: list, wait_credit: bool = False,
                          deadline: float | None = None) -> list[Outcome]:
        """Queue commands in order; answer them once their batch is durable.

        Args:
            commands: Shard commands (``ledger.core.model``), applied in list order.
            wait_credit: For cross-shard Posts that commit, wait (bounded by CREDIT_WAIT_MS
                and the deadline) until the credit leg is applied, so the answer says
                ``credited=True``.
            deadline: The caller's deadline (loop time), or None. Commands still queued at
                it are not started; an answer not durable by it is not waited for. Either way
                the answer is all SHARD_UNAVAILABLE, never a refusal: commands in a batch
                whose append is in flight may still commit, and a retry with the same key
                is answered from the record.
        """
        queued = self.submit_nowait(commands, deadline)
        # At the deadline a timer answers SHARD_UNAVAILABLE in the commit loop's place (its own
        # answer then finds the future done and is dropped: nobody waits for it).
        outcomes = queued if isinstance(queued, list) else await queued
        if wait_credit:
            await self._await_credits(commands, outcomes, deadline)
        return outcomes

    def wallet_currency(self, wallet_id: str) -> str | None | bool:
        """What this owner's DURABLE state says of a wallet, without a step: its currency,
        or False if it does not exist, or None if this owner cannot tell (not serving, or
        the wallet's creation is in the batch being appended). A wallet is never removed
        and its currency never changes, so a currency answered here stays true; "does not
        exist" is as of now."""
        if not self._serving or not self._lease_valid() or wallet_id in self._ahead_wallets:
            return None
        wallet = self.state.wallets.get(wallet_id)
        return False if wallet is None else wallet.currency

    def submit_nowait(self, commands: list,
                      deadline: float | None = None) -> asyncio.Future | list[Outcome]:
        """Queue the commands and return the future of their outcomes (or the outcomes at
        once, if refused before queueing): ``submit_many`` without a coroutine, for callers
        that send to many shards in one go (``Router.execute_many``): one future per shard,
        no task or coroutine frame per shard. With a deadline, a timer handle per call (not
        wait_for + shield, which cost a task-like wrapper and a second future each)."""
        if not self._serving:
            return [UNAVAILABLE] * len(commands)
        if self._queued_commands + len(commands) > K.OWNER_QUEUE_COMMANDS_MAX:
            return [OVERLOADED] * len(commands)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._enqueue(_Request(commands, future, deadline))
        if deadline is not None:
            timer = loop.call_at(deadline, _answer_unavailable, future, len(commands))
            future.add_done_callback(functools.partial(_cancel_timer, timer))
        return future

    def _enqueue(self, request: _Request) -> None:
        self._queue.append(request)
        self._queued_commands += len(request.commands)
        self._wakeup.set()

    async def _run(self) -> None:
        while self._serving:
            await self._wakeup.wait()
            self._wakeup.clear()
            # Pending acknowledgements ride along with queued commands; alone, they wait for
            # their timer (ACK_DELAY_MS).
            while self._serving and (self._queue or (self._acks_pending
                                                     and self._ack_timer is None)
                                     or (self._notes_due and self._admin_notes)):
                if (self._wait_lease is not None and self._lease_valid_for is not None
                        and not self._lease_valid_for(K.APPEND_LEASE_HEADROOM_S)):
                    # Keep-alives are late (etcd away or slow): no batch starts that could
                    # end past the lease. The queue waits for etcd to answer; a loss of the
                    # shard stops this loop. Commands whose deadline passes meanwhile are
                    # answered SHARD_UNAVAILABLE by their timers (not started, retried).
                    metrics.LEASE_WAITS.inc()
                    await self._wait_lease(K.APPEND_LEASE_HEADROOM_S)
                    continue
                acks = self._take_acks()
                batch: list[_Request] = [acks] if acks else []
                notes = self._take_notes()
                if notes is not None:
                    batch.insert(0, notes)
                size = 0
                now = asyncio.get_running_loop().time()
                while self._queue and (size == 0 or size + len(self._queue[0].commands)
                                       <= K.GROUP_COMMIT_COMMANDS_MAX):
                    if size and _spills(self._queue[0]):
                        break  # a spill goes in a step of its own (see _spills)
                    request = self._queue.popleft()
                    if request.deadline is not None and now >= request.deadline:
                        # Its caller gave up while it queued: not started, nothing decided.
                        self._queued_commands -= len(request.commands)
                        request.answer([UNAVAILABLE] * len(request.commands))
                        continue
                    size += len(request.commands)
                    batch.append(request)
                    if _spills(request):
                        break
                self._queued_commands -= size
                if not batch:
                    continue
                self._inflight = batch
                await self._commit(batch)
                self._inflight = []
                self._notes_inflight = 0  # journaled (and dropped) or kept for the next batch

    async def _commit(self, batch: list[_Request]) -> None:
        state = self.state
        commands = [command for request in batch for command in request.commands]
        try:
            if state.spilled and not await self._load_spilled(commands):
                for request in batch:
                    request.answer([UNAVAILABLE] * len(request.commands))
                return
            # The live state runs ahead of the journal from here until the append returns.
            result = step(state, commands)
        except InvariantViolation as exc:
            await self._abdicate(f"invariant violated: {exc}")
            return
        finally:
            state.loaded = {}
        events, rows = result.events, result.rows
        self._ahead_wallets = {e.wallet_id for e in events if type(e) is WalletCreated}
        position = 0
        for request in batch:
            count = len(request.commands)
            request.outcomes = result.outcomes[position:position + count]
            position += count
        seq = state.seq + 1
        if events:
            # The batch's audit row, chained exactly as every fold of the journal chains it
            # (``ledger.core.step.fold_batch``), written with the batch's rows. Like the rest
            # of the state, the head runs ahead until the append returns (a failed append
            # reloads it from the journal).
            audit_row = audit.chain(state, seq, self.epoch, events)
            if audit_row is not None:
                rows.append(("audit", audit_row))
            failpoints.hit("owner.before_append")
            started = time.perf_counter()
            try:
                if failpoints.fault("owner.append_unavailable"):
                    raise StoreUnavailable(f"failpoint: append of batch {seq} not written")
                await self._store.append(self.shard, self.epoch, seq, codec.dumps(events), rows)
                if failpoints.fault("owner.append_unknown"):
                    raise UnknownOutcome(f"failpoint: batch {seq} written, outcome unknown")
            except (Fenced, UnknownOutcome) as exc:
                # The in-memory state is ahead of (or unknown to) the journal: never answer
                # from it again. A new owner replays what the journal really holds.
                metrics.STORE_ERRORS.labels("append", type(exc).__name__).inc()
                await self._abdicate(f"{type(exc).__name__}: {exc}")
                return
            except Exception as exc:  # StoreUnavailable or a bug: nothing was written
                metrics.STORE_ERRORS.labels("append", type(exc).__name__).inc()
                log.warning("shard %d: append failed, reloading: %s", self.shard, exc)
                for request in batch:
                    request.answer([UNAVAILABLE] * len(request.commands))
                self._inflight = []
                await self._reload_or_abdicate()
                return
        if not self._lease_valid() and (self._confirm_held is None or not await
                                        self._confirm_held(self.shard, self.epoch)):
            # Paused past our lease: another owner may already serve this shard, so nothing
            # may be answered from our state (reads included), and a batch just written may
            # not count (on Cassandra an append is a plain write: it counts only if the new
            # owner's head read saw it), so it is not treated as durable either: no credit,
            # snapshot or answer comes from it. The router retries on the new owner, which
            # answers from the journal. Unless etcd confirmed (the node was only suspended)
            # that this node still holds the shard with this epoch: then no newer epoch
            # exists and the batch is ours (coordinator/PROTOCOL.md, "Suspension").
            await self._abdicate("lease no longer valid")
            return
        if events:
            took_s = time.perf_counter() - started
            metrics.APPEND_SECONDS.observe(took_s)
            metrics.GROUP_COMMIT_COMMANDS.observe(len(commands))
            self._appends += 1
            self._commands_journaled += len(commands)
            self._append_s += took_s
            state.seq = seq
            self._ahead_wallets = set()
            if self._appended is not None:
                self._appended.set()
                self._appended = None
            if self._notes_inflight:
                self._notes_journaled()
            failpoints.hit("owner.after_append")
            self._after_append(events)
        for request in batch:
            request.answer(request.outcomes)

    async def _load_spilled(self, commands: list) -> bool:
        """Load from the store the records of the keys these commands use that may have
        left memory (``ledger.core.spilled``), into ``state.loaded`` for the step. False if
        the store could not answer: nothing is decided then (the batch is answered
        UNAVAILABLE and retried), since deciding without a record could run a key twice."""
        # Marks, in ``state.loaded``, the keys the filters rule out (the step then does not
        # check them again) and returns those it does not.
        keys = self.state.keys_to_load(commands)
        if not keys:
            return True
        try:
            loaded = await self._store.load_keys(
                self.shard, {k: transfer_id_for(self.shard, *k) for k in keys})
        except Exception as exc:  # StoreUnavailable, or a bug: decide nothing
            metrics.STORE_ERRORS.labels("load_keys", type(exc).__name__).inc()
            log.warning("shard %d: loading %d spilled keys failed: %r", self.shard, len(keys),
                        exc)
            return False
        oldest = self._clock_ms() - self._retention_ms
        state_loaded = {}
        for k in keys:
            record, claim, transfer = loaded.get(k, (None, None, None))
            if (record is None and transfer is not None and transfer.caller == k[0]
                    and transfer.idempotency_key == k[1]
                    and transfer.kind != KIND_HOLD_CAPTURE
                    and transfer.created_at_ms >= oldest):
                # A money movement's record is its transfer row (``record_of_transfer``).
                record = record_of_transfer(transfer)
            state_loaded[k] = (record, claim, transfer)
        self.state.loaded.update(state_loaded)
        return True

    async def _spill(self, now: int) -> None:
        """Let key records older than the memory window leave memory: their rows are made
        durable first (``flush_rows``: the Cassandra views are written behind the journal),
        then ``SpillIdempotency`` is journaled (replays and snapshots drop them too)."""
        try:
            await self._store.flush_rows(self.shard, self.state.seq)
        except Exception as exc:  # StoreUnavailable: nothing spilled, tried again later
            metrics.STORE_ERRORS.labels("flush_rows", type(exc).__name__).inc()
            log.warning("shard %d: rows not flushed, spill postponed: %r", self.shard, exc)
            return
        await self.submit(SpillIdempotency(now - self._memory_ms))

    async def _reload_or_abdicate(self) -> None:
        try:
            head = await self._store.fence(self.shard, self.epoch)
            await self._replay()
            if self.state.seq != head:
                raise Fenced("journal head moved during reload")
        except Exception as exc:
            await self._abdicate(f"reload failed: {exc}")

    def _after_append(self, events: list) -> None:
        # The batch is durable (its append returned): a snapshot up to it may be built, from
        # the journal, in the background, when due (one at a time, supervised).
        self._compactor.note_append(self.state.seq, len(events), self.state)
        kick = False
        durable = self._durable_outbox
        for event in events:
            if type(event) is TransferDecided and event.outbox_seq:
                if event.outbox_seq > durable.get(event.to_shard, 0):
                    durable[event.to_shard] = event.outbox_seq
                kick = True
        if kick:
            now = asyncio.get_running_loop().time()
            gap = now - self._credits_owed_at
            if gap < K.CREDIT_LINGER_ASYNC_MS / 1000:  # a run of appends owing credits
                self._credits_owed_gap = (0.7 * self._credits_owed_gap + 0.3 * gap
                                          if self._credits_owed_gap else gap)
            self._credits_owed_at = now
            self._outbox_kick.set()

    # --- crediting pipeline -----------------------------------------------------------------

    async def _await_credits(self, commands: list, outcomes: list[Outcome],
                             deadline: float | None = None) -> None:
        """Hold answers until the credit legs of their cross-shard transfers landed, for at
        most CREDIT_WAIT_MS and not past ``deadline`` (loop time). An answer that stops
        waiting says committed with ``credited=False``: the pipeline still delivers.

        One waiter per destination shard (for the highest outbox number it must reach), not
        one per transfer; each transfer's flag is then read off the destination's applied
        mark. A Post names its destination; other commands (chain finishes, captures) are
        looked up in the whole outbox.
        """
        committed: list[tuple[Transfer, int | None]] = []
        for command, outcome in zip(commands, outcomes):
            value = outcome.value if outcome.ok else None
            for transfer in (value if isinstance(value, list) else [value]):
                if (isinstance(transfer, Transfer) and transfer.state == STATE_COMMITTED
                        and not transfer.credited):
                    committed.append((transfer, command.to_shard if type(command) is Post
                                      else None))
        if not committed:
            return
        outbox = self.state.outbox
        indexes: dict[int, dict[str, int]] = {}
        pending: list[tuple[Transfer, int, int]] = []
        highest: dict[int, int] = {}
        for transfer, dest in committed:
            slot = self._outbox_slot(outbox, indexes, transfer.transfer_id, dest)
            if slot is None or slot[1] <= self._delivered.get(slot[0], 0):
                transfer.credited = True  # applied there already
                continue
            pending.append((transfer, slot[0], slot[1]))
            if slot[1] > highest.get(slot[0], 0):
                highest[slot[0]] = slot[1]
        if not pending:
            return
        loop = asyncio.get_running_loop()
        waits = []
        for dest, seq in highest.items():
            fut = loop.create_future()
            self._credit_waiters.setdefault(dest, collections.deque()).append((seq, fut))
            waits.append(fut)
        self._outbox_kick.set()  # a lingering pipeline sends what is waited for sooner
        wait_s = K.CREDIT_WAIT_MS / 1000
        if deadline is not None:
            wait_s = max(min(wait_s, deadline - loop.time()), 0.0)
        await asyncio.wait(waits, timeout=wait_s)
        for transfer, dest, seq in pending:
            if seq <= self._delivered.get(dest, 0):
                transfer.credited = True

    @staticmethod
    def _outbox_slot(outbox: dict, indexes: dict[int, dict[str, int]], transfer_id: str,
                     dest: int | None) -> tuple[int, int] | None:
        """(destination, outbox number) of the credit ``transfer_id`` owes, or None if none
        is owed (applied and acknowledged, or never owed)."""
        if dest is None:
            for d, items in outbox.items():
                for seq, credit in items.items():
                    if credit.transfer_id == transfer_id:
                        return d, seq
            return None
        index = indexes.get(dest)
        if index is None:
            index = indexes[dest] = {credit.transfer_id: seq
                                     for seq, credit in outbox.get(dest, {}).items()}
        seq = index.get(transfer_id)
        return None if seq is None else (dest, seq)

    def _credits_landed(self, dest: int, applied: int) -> None:
        """Credits up to ``applied`` are durable on ``dest``: answer who waits for them."""
        if applied <= self._delivered.get(dest, 0):
            return
        self._delivered[dest] = applied
        waiters = self._credit_waiters.get(dest)
        if not waiters:
            return
        # Waiters arrive almost in sequence order; scan all so none is missed.
        keep: collections.deque = collections.deque()
        for seq, fut in waiters:
            if seq <= applied:
                if not fut.done():
                    fut.set_result(True)
            elif not fut.done():
                keep.append((seq, fut))
        self._credit_waiters[dest] = keep

    async def _deliver(self) -> None:
        """Drain the outbox: send credits to each destination shard in order, answer their
        waiters as soon as the destination made them durable, and journal the acknowledgement
        lazily (it rides in the next group commit). Failures back off and retry."""
        while self._serving:
            await self._outbox_kick.wait()
            self._outbox_kick.clear()
            pending = self._ready_credits()
            if not pending:
                continue
            if _thin(pending, K.CREDIT_LINGER_ASYNC_PER_DEST):
                pending = await self._linger(pending)
            progressed = 0
            for chunk in self._rounds(pending):
                results = await self._send_credits(chunk)
                for (dest, credits), result in zip(chunk.items(), results):
                    if isinstance(result, BaseException):
                        # Transport errors are answered by the router as UNAVAILABLE; anything
                        # raised here is unexpected: say so, and retry after the backoff.
                        log.warning("shard %d: delivery to shard %d failed: %r", self.shard,
                                    dest, result)
                        continue
                    if not result[0].ok:
                        continue
                    applied = result[0].value
                    failpoints.hit("owner.after_deliver")
                    if applied >= credits[0].outbox_seq:
                        progressed += 1
                        self._credits_landed(dest, applied)
                        self._ack_later(dest, applied)
            if progressed < len(pending):
                # Some destination made no progress (its owner is moving, or down): back off
                # instead of spinning; the credits stay owed and are sent again.
                await asyncio.sleep(K.CREDIT_RETRY_BACKOFF_MS / 1000)
            if any(self._deliverable(dest, items) for dest, items in self.state.outbox.items()):
                self._outbox_kick.set()

    def _credit_idle_s(self) -> float:
        """How long without a new credit owed counts as "the credits stopped coming": twice
        the usual gap between appends owing credits (the longest while that gap is not known
        yet), within CREDIT_LINGER_IDLE_MIN_MS..CREDIT_LINGER_IDLE_MAX_MS."""
        return min(max(2 * self._credits_owed_gap or 1.0, K.CREDIT_LINGER_IDLE_MIN_MS / 1000),
                   K.CREDIT_LINGER_IDLE_MAX_MS / 1000)

    def _rounds(self, pending: dict[int, list]) -> list[dict[int, list]]:
        """The destinations to send to at once: all of them when a caller waits for one of
        their credits, or when the shard stopped owing new credits; else
        CREDIT_DESTS_PER_ROUND at a time, so that a hot envelope's lingered credits (a step
        on each of hundreds of shards, all on this event loop) do not hold the envelope's
        grabs behind them (grab p99 ~500 ms with one round of 255 destinations in the middle
        of the grabs, ledger-bench hot-envelope)."""
        idle = (asyncio.get_running_loop().time() - self._credits_owed_at
                >= self._credit_idle_s())
        if idle or len(pending) <= K.CREDIT_DESTS_PER_ROUND or any(
                self._credit_waiters.get(dest) for dest in pending):
            return [pending]  # idle: no grab is held behind them
        dests = list(pending)
        return [{dest: pending[dest] for dest in dests[i:i + K.CREDIT_DESTS_PER_ROUND]}
                for i in range(0, len(dests), K.CREDIT_DESTS_PER_ROUND)]

    async def _linger(self, pending: dict[int, list]) -> dict[int, list]:
        """A wide fan-out of a few credits per destination (a hot envelope's grabs, one
        wallet paying many): let the next appends' credits join, so that each destination
        takes fewer steps, until the round is thick enough or the linger is over. What is
        ready then is sent (never less than before).

        Credits a caller waits for (``_await_credits``) linger at most CREDIT_LINGER_MS, to
        CREDIT_LINGER_PER_DEST each; credits nobody waits for (grabs) at most
        CREDIT_LINGER_ASYNC_MS, to CREDIT_LINGER_ASYNC_PER_DEST each, and only while new
        credits keep coming (none for ``_credit_idle_s``: they leave). A waiter that arrives
        meanwhile kicks the pipeline, and the shorter rule applies at once."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while self._serving:
            waited = any(self._credit_waiters.get(dest) for dest in pending)
            if waited:
                if not _thin(pending, K.CREDIT_LINGER_PER_DEST):
                    break
                until = started + K.CREDIT_LINGER_MS / 1000
            else:
                if not _thin(pending, K.CREDIT_LINGER_ASYNC_PER_DEST):
                    break
                until = min(started + K.CREDIT_LINGER_ASYNC_MS / 1000,
                            self._credits_owed_at + self._credit_idle_s())
            left = until - loop.time()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(self._outbox_kick.wait(), left)
            except asyncio.TimeoutError:
                pass
            self._outbox_kick.clear()
            pending = self._ready_credits() or pending
        return pending

    def _ready_credits(self) -> dict[int, list]:
        """The credits that may leave now, per destination (at most
        CREDITS_PER_DELIVERY_MAX each)."""
        pending: dict[int, list] = {}
        for dest, items in self.state.outbox.items():
            credits = self._deliverable(dest, items)
            if credits:
                pending[dest] = credits[:K.CREDITS_PER_DELIVERY_MAX]
        return pending

    async def _send_credits(self, pending: dict[int, list]) -> list:
        """One ``ApplyCredits`` per destination, all at once; an answer or an exception per
        destination, in ``pending``'s order."""
        groups = {dest: [ApplyCredits(self.shard, tuple(credits))]
                  for dest, credits in pending.items()}
        many = getattr(self._peers, "execute_many", None)
        if many is not None and len(groups) > 1:
            try:
                answers = await many(groups)
            except Exception as exc:  # a bug: reported per destination, retried
                return [exc] * len(groups)
            return [answers[dest] for dest in groups]
        return await asyncio.gather(*(self._peers.execute(dest, commands)
                                      for dest, commands in groups.items()),
                                    return_exceptions=True)

    def _deliverable(self, dest: int, items: dict) -> list:
        """Credits owed to ``dest`` that may leave now, in order: durable in the journal
        (at or below the durable mark) and not yet known applied there.

        Only the sequence numbers between the two marks are looked at (not every item owed
        to every destination, sorted, on every kick): the pipeline runs after each append.
        """
        delivered = self._delivered.get(dest, 0)
        durable = self._durable_outbox.get(dest, 0)
        if durable <= delivered:
            return []
        if durable - delivered > len(items):  # far behind: fewer items than numbers
            return [items[s] for s in sorted(items) if delivered < s <= durable]
        return [items[s] for s in range(delivered + 1, durable + 1) if s in items]

    def _ack_later(self, dest: int, applied: int) -> None:
        """Journal the acknowledgement lazily: it only lets the outbox forget delivered
        credits (the receiver already dedupes), so it rides in the next group commit, or in
        its own after ACK_DELAY_MS if the shard stays idle: one journal append less per
        delivery round under load."""
        if applied > self._acks_pending.get(dest, 0):
            self._acks_pending[dest] = applied
        if self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(
                K.ACK_DELAY_MS / 1000, self._flush_acks)

    def _flush_acks(self) -> None:
        self._ack_timer = None
        if self._acks_pending and self._serving:
            self._wakeup.set()

    def _take_acks(self) -> _Request | None:
        if not self._acks_pending:
            return None
        acks = [AckOutbox(dest, hwm) for dest, hwm in sorted(self._acks_pending.items())]
        self._acks_pending.clear()
        return _Request(acks, None)

    # --- admin notes ------------------------------------------------------------------------

    def note_admin(self, note: AdminNote) -> None:
        """Record an admin action made outside this shard's journal (``model.NoteAdmin``: a
        takeover and the shard map change behind it, a policy or certificate change) in the
        shard's audit chain. It rides in the next batch (the first batch of a new owner
        carries its takeover), or goes in one of its own after ``ADMIN_NOTE_LINGER_S`` if the
        shard stays idle: a takeover of many busy shards costs no extra append. A note is
        kept until a batch holding it is durable (a failed append retries it); an owner that
        stops first loses it, and its successor records its own takeover instead.

        ``note`` may be a function of (the live state, now in ms) giving the notes, called
        when the batch is formed: a takeover note then sees the shard map changes the elector
        has learned by that time, and what the chain has recorded already."""
        if not self._serving:
            return
        self._admin_notes.append(note)
        if self._notes_timer is None:
            self._notes_timer = asyncio.get_running_loop().call_later(
                K.ADMIN_NOTE_LINGER_S, self._notes_lapsed)

    def _notes_lapsed(self) -> None:
        self._notes_timer = None
        if self._admin_notes and self._serving:
            self._notes_due = True
            self._wakeup.set()

    def _take_notes(self) -> _Request | None:
        if not self._admin_notes or self._notes_inflight:
            return None
        now = self._clock_ms()
        notes: list[NoteAdmin] = []
        for note in list(self._admin_notes):
            if not callable(note):
                notes.append(note)
                continue
            try:
                notes.extend(note(self.state, now))
            except Exception:  # a bug in a note must not stop the commit loop: logged
                log.exception("shard %d: admin note not built, dropped", self.shard)
                self._admin_notes.remove(note)
        if not notes:
            return None
        self._notes_inflight = len(self._admin_notes)
        return _Request(notes, None)

    def _notes_journaled(self) -> None:
        del self._admin_notes[:self._notes_inflight]
        self._notes_inflight = 0
        self._notes_due = False
        if not self._admin_notes and self._notes_timer is not None:
            self._notes_timer.cancel()
            self._notes_timer = None

    # --- housekeeping -----------------------------------------------------------------------

    async def _sweep(self) -> None:
        """Periodic duties: drop stale credit reservations, release expired holds, resolve
        linked chains left undecided by a dead coordinator, purge expired idempotency keys."""
        loop = asyncio.get_running_loop()  # loop time: simulations run it on a virtual clock
        last_idempotency_sweep = last_spill = loop.time()
        while self._serving:
            await asyncio.sleep(K.RESERVATION_SWEEP_S)
            now = self._clock_ms()
            if self.state.reservations:
                await self._resolve_reservations(now)
            if self.state.expired_holds(now):
                await self.submit(ExpireHolds(now))
            lapsed = self.state.expired_envelopes(now)
            if lapsed:
                await self._refund_envelopes(lapsed[:K.ENVELOPE_REFUNDS_PER_SWEEP_MAX], now)
            for chain_id, primary in self.state.pending_chains(
                    now - CHAIN_RESOLVE_AFTER_MS).items():
                await self.resolve_chain(chain_id, primary)
            if loop.time() - last_spill >= self._spill_every_s:
                last_spill = loop.time()
                await self._spill(now)
            if loop.time() - last_idempotency_sweep >= K.IDEMPOTENCY_SWEEP_S:
                last_idempotency_sweep = last_spill = loop.time()
                expired = await self.submit(ExpireIdempotency(now - self._retention_ms))
                if expired.ok:
                    try:
                        await self._store.expire_keys(self.shard, now - self._retention_ms)
                    except Exception as exc:  # the rows are deleted on the next sweep
                        metrics.STORE_ERRORS.labels("expire_keys", type(exc).__name__).inc()
                        log.warning("shard %d: expired key rows not deleted: %r", self.shard,
                                    exc)

    async def _refund_envelopes(self, envelopes: list, now: int) -> None:
        """Give what is left of expired envelopes back to their senders: reserve the
        credit's headroom on each sender's shard (when it is another), then journal the
        refunds in one step. A refund not made now (a reservation refused or unanswered) is
        tried again on the next sweep; one made is never made again (the envelope records
        it)."""
        refunds: list[RefundEnvelope] = []
        reserve: dict[int, list] = {}
        for envelope in envelopes:
            sender_shard = debit_shard_of(envelope.funding_transfer_id)
            if sender_shard == self.shard:
                refunds.append(RefundEnvelope(envelope.envelope_id, now))
            else:
                reserve.setdefault(sender_shard, []).append(envelope)
        answers = await asyncio.gather(*(
            self._peers.execute(shard, [ReserveCredit(
                self.state.refund_transfer_id(e), e.sender_wallet_id, e.currency, e.left_minor,
                now) for e in items])
            for shard, items in reserve.items()), return_exceptions=True)
        for items, answer in zip(reserve.values(), answers):
            if isinstance(answer, BaseException):
                log.warning("shard %d: refund reservations failed: %r", self.shard, answer)
                continue
            for envelope, reserved in zip(items, answer):
                if reserved.ok:
                    refunds.append(RefundEnvelope(envelope.envelope_id, now, reserved.value))
                else:
                    log.warning("shard %d: refund of envelope %s not reserved: %s %s",
                                self.shard, envelope.envelope_id, reserved.status.name,
                                reserved.detail)
        if refunds:
            for refund, outcome in zip(refunds, await self.submit_many(refunds)):
                if not outcome.ok:
                    log.warning("shard %d: envelope %s not refunded: %s %s", self.shard,
                                refund.envelope_id, outcome.status.name, outcome.detail)

    async def _resolve_reservations(self, now: int) -> None:
        """Ask the debit shards of reservations older than RESERVATION_TTL_MS whether a
        credit is still coming under them; drop those that no credit will use. (A debit
        shard that never decided the transfer fences it: a late Post is then refused.) Each
        reservation is asked about at most once per RESERVATION_TTL_MS."""
        loop_now = asyncio.get_running_loop().time()
        ask: dict[int, list[tuple[str, int]]] = {}
        for debit, items in self.state.stale_reservations(now - RESERVATION_TTL_MS).items():
            due = [item for item in items if self._next_ask.get(item, 0.0) <= loop_now]
            for item in due:
                self._next_ask[item] = loop_now + RESERVATION_TTL_MS / 1000
            if due:
                ask[debit] = due[:K.RESERVATIONS_PER_RESOLVE_MAX]
        if not ask:
            return
        answers = await asyncio.gather(*(
            self._peers.execute(debit, [ResolveReservations(tuple(items), now)])
            for debit, items in ask.items()), return_exceptions=True)
        drop: list[tuple[str, int]] = []
        for items, answer in zip(ask.values(), answers):
            if isinstance(answer, BaseException) or not answer[0].ok:
                continue  # asked again after the pause
            drop.extend(item for item, keep in zip(items, answer[0].value) if not keep)
        if drop:
            await self.submit(DropReservations(tuple(drop)))
        live = set((tid, at) for tid, (_, _, at) in self.state.reservations.items())
        for item in [i for i in self._next_ask if i not in live]:
            del self._next_ask[item]

    async def resolve_chain(self, chain_id: str, primary: int) -> bool | None:
        """Ask the chain's primary for its decision (it records an abort if there is none),
        then apply it here. Returns the decision, or None if the primary did not answer."""
        decided = (await self._peers.execute(primary, [DecideChain(
            chain_id, False, self._clock_ms())]))[0]
        if not decided.ok:
            return None
        finished = await self.submit(FinishChain(chain_id, bool(decided.value), self._clock_ms()))
        if finished.ok and decided.value:
            await self._peers.execute(primary, [ChainFinished(chain_id, self.shard)])
        return bool(decided.value)
