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
import logging
import time
from typing import Awaitable, Callable, Protocol

from ledger import constants as K
from ledger.core import codec
from ledger.core.invariants import InvariantViolation
from ledger.core.model import AckOutbox, ApplyCredits, ExpireIdempotency, Post
from ledger.core.shard import ShardState
from ledger.core.status import Outcome, Status, refuse
from ledger.core.constants import IDEMPOTENCY_RETENTION_MS
from ledger.store.port import Fenced, JournalStore, StoreUnavailable, UnknownOutcome

log = logging.getLogger("ledger.owner")

UNAVAILABLE = refuse(Status.SHARD_UNAVAILABLE, "", "the shard's owner is not serving; retry")
OVERLOADED = refuse(Status.OVERLOADED, "", "the shard's queue is full; retry with backoff")


class ShardExecutor(Protocol):
    """Runs commands on the owner of any shard, local or remote (``shard_router.router``)."""

    async def execute(self, shard: int, commands: list, wait_credit: bool = False
                      ) -> list[Outcome]:
        ...


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class ShardOwner:
    """Serves one shard with one epoch. Create with ``start()``, end with ``stop()``."""

    def __init__(self, shard: int, epoch: int, store: JournalStore, peers: ShardExecutor,
                 clock_ms: Callable[[], int] = now_ms,
                 on_stopped: Callable[[int, int, str], Awaitable[None]] | None = None,
                 idempotency_retention_ms: int = IDEMPOTENCY_RETENTION_MS) -> None:
        self.shard = shard
        self.epoch = epoch
        self.state = ShardState(shard)
        self._store = store
        self._peers = peers
        self._clock_ms = clock_ms
        self._on_stopped = on_stopped
        self._retention_ms = idempotency_retention_ms
        self._queue: list[tuple[object, asyncio.Future]] = []
        self._wakeup = asyncio.Event()
        self._outbox_kick = asyncio.Event()
        self._serving = False
        self._stop_reason = ""
        self._tasks: list[asyncio.Task] = []
        self._batches_since_snapshot = 0
        # The batch being committed, so that stop() can answer it if cancelled mid-append.
        self._inflight: list[tuple[object, asyncio.Future]] = []
        # Answers of Posts waiting for their credit leg: (to_shard, outbox_seq) -> futures.
        self._credit_waiters: dict[tuple[int, int], list[asyncio.Future]] = {}

    @property
    def serving(self) -> bool:
        return self._serving

    # --- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Fence the journal with our epoch, replay it, then serve.

        Raises:
            Fenced: a newer owner exists. StoreUnavailable, UnknownOutcome.
        """
        head = await self._store.fence(self.shard, self.epoch)
        await self._replay()
        if self.state.seq != head:
            raise Fenced(f"shard {self.shard}: journal head moved from {head} to "
                         f"{self.state.seq} during takeover")
        self.state.check()
        self._serving = True
        self._tasks = [asyncio.create_task(self._run(), name=f"owner-{self.shard}"),
                       asyncio.create_task(self._deliver(), name=f"credits-{self.shard}"),
                       asyncio.create_task(self._sweep(), name=f"sweep-{self.shard}")]
        if self.state.outbox:
            self._outbox_kick.set()

    async def _replay(self) -> None:
        loaded = await self._store.load(self.shard)
        state = (codec.snapshot_loads(loaded.snapshot) if loaded.snapshot is not None
                 else ShardState(self.shard))
        rows: list = []
        for batch in loaded.batches:
            if batch.seq != state.seq + 1:
                raise InvariantViolation(f"shard {self.shard}: journal gap before {batch.seq}")
            for event in codec.loads(batch.events):
                state.evolve(event, rows)
            state.seq = batch.seq
            if len(rows) > 10_000:
                await self._store.write_rows(self.shard, rows)
                rows = []
        if rows:
            # Rows of batches after the snapshot may be missing if the last owner died
            # between its journal append and its row writes; writing them again is idempotent.
            await self._store.write_rows(self.shard, rows)
        self.state = state

    async def stop(self, reason: str = "stopped") -> None:
        """Stop serving: fail queued commands with SHARD_UNAVAILABLE, snapshot if healthy."""
        was_serving = self._serving
        self._serving = False
        self._stop_reason = reason
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
        self._fail_queue()
        for waiters in self._credit_waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_result(False)
        self._credit_waiters.clear()
        if was_serving and reason == "stopped":
            try:
                await self._store.save_snapshot(self.shard, self.state.seq,
                                                codec.snapshot_dumps(self.state))
            except Exception:  # a snapshot is an optimisation; the journal is complete
                log.warning("shard %d: snapshot on stop failed", self.shard, exc_info=True)

    async def _abdicate(self, reason: str) -> None:
        log.error("shard %d epoch %d stops serving: %s", self.shard, self.epoch, reason)
        await self.stop(reason)
        if self._on_stopped is not None:
            await self._on_stopped(self.shard, self.epoch, reason)

    def _fail_queue(self) -> None:
        # UNAVAILABLE is not a guess about the outcome: it tells the router to ask the next
        # owner, which replays the journal and answers the retry from the idempotency record.
        queued, self._queue = self._inflight + self._queue, []
        self._inflight = []
        for _, fut in queued:
            if not fut.done():
                fut.set_result(UNAVAILABLE)

    # --- commands ---------------------------------------------------------------------------

    async def submit(self, command: object) -> Outcome:
        return (await self.submit_many([command]))[0]

    async def submit_many(self, commands: list, wait_credit: bool = False) -> list[Outcome]:
        """Queue commands in order; answer each once its batch is durable.

        Args:
            commands: Shard commands (``ledger.core.model``), applied in list order.
            wait_credit: For cross-shard Posts that commit, wait (bounded) until the credit
                leg is confirmed, so the answer says ``credited=True``.
        """
        if not self._serving:
            return [UNAVAILABLE] * len(commands)
        if len(self._queue) + len(commands) > K.OWNER_QUEUE_COMMANDS_MAX:
            return [OVERLOADED] * len(commands)
        loop = asyncio.get_running_loop()
        futures = []
        for command in commands:
            fut = loop.create_future()
            self._queue.append((command, fut))
            futures.append(fut)
        self._wakeup.set()
        outcomes = list(await asyncio.gather(*futures))
        if wait_credit:
            await self._await_credits(commands, outcomes)
        return outcomes

    async def _run(self) -> None:
        while self._serving:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue and self._serving:
                batch = self._queue[:K.GROUP_COMMIT_COMMANDS_MAX]
                del self._queue[:K.GROUP_COMMIT_COMMANDS_MAX]
                if len(self._queue):
                    self._wakeup.set()
                self._inflight = batch
                await self._commit(batch)
                self._inflight = []

    async def _commit(self, batch: list[tuple[object, asyncio.Future]]) -> None:
        state = self.state
        events: list = []
        rows: list = []
        outcomes: list[Outcome] = []
        try:
            for command, _ in batch:
                outcome, new_events = state.decide(command)
                for event in new_events:
                    state.evolve(event, rows)
                events.extend(new_events)
                outcomes.append(outcome)
        except InvariantViolation as exc:
            for _, fut in batch:
                fut.set_result(UNAVAILABLE)
            await self._abdicate(f"invariant violated: {exc}")
            return
        if events:
            seq = state.seq + 1
            try:
                await self._store.append(self.shard, self.epoch, seq, codec.dumps(events), rows)
            except (Fenced, UnknownOutcome) as exc:
                # The in-memory state is ahead of (or unknown to) the journal: never answer
                # from it again. A new owner replays what the journal really holds.
                for _, fut in batch:
                    fut.set_result(UNAVAILABLE)
                await self._abdicate(f"{type(exc).__name__}: {exc}")
                return
            except Exception as exc:  # StoreUnavailable or a bug: nothing was written
                log.warning("shard %d: append failed, reloading: %s", self.shard, exc)
                for _, fut in batch:
                    fut.set_result(UNAVAILABLE)
                await self._reload_or_abdicate()
                return
            state.seq = seq
            self._after_append(events)
        for (_, fut), outcome in zip(batch, outcomes):
            if not fut.done():
                fut.set_result(outcome)

    async def _reload_or_abdicate(self) -> None:
        try:
            head = await self._store.fence(self.shard, self.epoch)
            await self._replay()
            if self.state.seq != head:
                raise Fenced("journal head moved during reload")
        except Exception as exc:
            await self._abdicate(f"reload failed: {exc}")

    def _after_append(self, events: list) -> None:
        self._batches_since_snapshot += 1
        if self._batches_since_snapshot >= K.SNAPSHOT_EVERY_BATCHES:
            self._batches_since_snapshot = 0
            snapshot = codec.snapshot_dumps(self.state)
            asyncio.create_task(self._store.save_snapshot(self.shard, self.state.seq, snapshot))
        outbox_grew = False
        for event in events:
            name = type(event).__name__
            if name == "TransferDecided" and event.outbox_seq:
                outbox_grew = True
            elif name == "OutboxAcked":
                self._release_credit_waiters(event.to_shard, event.up_to_seq)
        if outbox_grew:
            self._outbox_kick.set()

    # --- crediting pipeline -----------------------------------------------------------------

    async def _await_credits(self, commands: list, outcomes: list[Outcome]) -> None:
        loop = asyncio.get_running_loop()
        waits = []
        seq_index: dict[int, dict[str, int]] = {}
        for i, (command, outcome) in enumerate(zip(commands, outcomes)):
            if (type(command) is not Post or not outcome.ok or command.to_shard == self.shard
                    or outcome.value is None or outcome.value.credited):
                continue
            index = seq_index.get(command.to_shard)
            if index is None:
                index = seq_index[command.to_shard] = {
                    c.transfer_id: seq for seq, c in self.state.outbox.get(
                        command.to_shard, {}).items()}
            seq = index.get(command.transfer_id)
            if seq is None:  # no longer owed: already acknowledged
                outcome.value.credited = True
                continue
            fut = loop.create_future()
            self._credit_waiters.setdefault((command.to_shard, seq), []).append(fut)
            waits.append((i, fut))
        if not waits:
            return
        done, _ = await asyncio.wait([f for _, f in waits], timeout=K.CREDIT_WAIT_MS / 1000)
        for i, fut in waits:
            if fut in done and fut.result():
                outcomes[i].value.credited = True

    def _release_credit_waiters(self, to_shard: int, up_to_seq: int) -> None:
        for key in [k for k in self._credit_waiters if k[0] == to_shard and k[1] <= up_to_seq]:
            for fut in self._credit_waiters.pop(key):
                if not fut.done():
                    fut.set_result(True)

    async def _deliver(self) -> None:
        """Drain the outbox: send credits to each destination shard in order, then journal
        the acknowledgement. Runs until the owner stops; failures back off and retry."""
        while self._serving:
            await self._outbox_kick.wait()
            self._outbox_kick.clear()
            pending = {dest: [c for _, c in sorted(items.items())[:K.CREDITS_PER_DELIVERY_MAX]]
                       for dest, items in self.state.outbox.items() if items}
            if not pending:
                continue
            results = await asyncio.gather(
                *(self._deliver_to(dest, credits) for dest, credits in pending.items()),
                return_exceptions=True)
            acks = [AckOutbox(dest, hwm) for dest, hwm in zip(pending, results)
                    if isinstance(hwm, int) and hwm >= pending[dest][0].outbox_seq]
            if acks:
                await self.submit_many(acks)
            else:
                # No destination made progress (its owner is moving, or down): back off
                # instead of spinning; the credits stay owed and are sent again.
                await asyncio.sleep(K.CREDIT_RETRY_BACKOFF_MS / 1000)
            if self.state.outbox:
                self._outbox_kick.set()

    async def _deliver_to(self, dest: int, credits: list) -> int:
        outcome = (await self._peers.execute(dest, [ApplyCredits(self.shard, tuple(credits))]))[0]
        if not outcome.ok:
            raise StoreUnavailable(f"credit delivery to shard {dest}: {outcome.status.name}")
        return outcome.value

    # --- housekeeping -----------------------------------------------------------------------

    async def _sweep(self) -> None:
        last_idempotency_sweep = time.monotonic()
        while self._serving:
            await asyncio.sleep(K.RESERVATION_SWEEP_S)
            self.state.expire_reservations(self._clock_ms())
            if time.monotonic() - last_idempotency_sweep >= K.IDEMPOTENCY_SWEEP_S:
                last_idempotency_sweep = time.monotonic()
                await self.submit(ExpireIdempotency(self._clock_ms() - self._retention_ms))
