"""A seeded, deterministic simulation of the ledger's core under injected faults.

The real ``Coordinator`` runs unchanged against simulated shards: each shard is the pure
``ShardState`` plus a durable journal (a list of event batches). Every coordinator-to-shard
call becomes a pending message; the simulator picks, with a seeded RNG, which message happens
next and what goes wrong with it:

* the request is lost (nothing executes; the caller sees SHARD_UNAVAILABLE),
* the reply is lost (the commands executed and are journaled; the caller sees UNAVAILABLE),
* the journal append has an unknown outcome (written or not) and the shard owner crashes,
* a shard owner crashes between steps (in-memory state and reservations lost; replay),
* a coordinator crashes between steps (its operation is abandoned mid-protocol),
* credit deliveries of the crediting pipeline are lost, duplicated or delivered stale.

Clients retry every unknown outcome with the same idempotency key until they get a definitive
answer. At the end the simulator drains everything and checks: books sum to zero; every
acknowledged transfer applied exactly once and every refused one never; final balances equal
initial balances plus acknowledged transfers (the replay check); replaying journals rebuilds
the live state. The trace of one seed is the same on every run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
from dataclasses import dataclass, field

from coordinator import Coordinator, TransferItem
from ledger.core.constants import CHAIN_RESOLVE_AFTER_MS
from ledger.core.invariants import ensure
from ledger.core.model import (
    STATE_COMMITTED, AckOutbox, ApplyCredits, DecideChain, FinishChain, TransferDecided,
    settlement_wallet_id,
)
from ledger.core.shard import ShardState
from ledger.core.status import Outcome, Status, refuse
from shard_router import shard_of

UNAVAILABLE = refuse(Status.SHARD_UNAVAILABLE, "", "simulated")
QUIESCE_ROUNDS = 25


@dataclass
class Faults:
    lose_request: float = 0.03
    lose_reply: float = 0.03
    unknown_append: float = 0.02
    crash_shard: float = 0.01
    crash_coordinator: float = 0.02
    lose_delivery: float = 0.1
    duplicate_delivery: float = 0.05


@dataclass
class SimShard:
    shard: int
    journal: list[list] = field(default_factory=list)
    state: ShardState | None = None
    crashes: int = 0

    def __post_init__(self) -> None:
        self.state = ShardState(self.shard)

    def replay(self) -> ShardState:
        state = ShardState(self.shard)
        for batch in self.journal:
            for event in batch:
                state.evolve(event)
            state.seq += 1
        return state

    def crash_and_recover(self) -> None:
        self.crashes += 1
        self.state = self.replay()

    def execute(self, commands: list, rng: random.Random, faults: Faults) -> list[Outcome] | None:
        """Run commands as an owner's group commit would; None if the outcome is unknown."""
        state = self.state
        events: list = []
        outcomes = []
        for command in commands:
            outcome, new = state.decide(command)
            for event in new:
                state.evolve(event)
            events.extend(new)
            outcomes.append(outcome)
        if events:
            if rng.random() < faults.unknown_append:
                if rng.random() < 0.5:
                    self.journal.append(events)  # it landed after all
                self.crash_and_recover()
                return None
            self.journal.append(events)
            state.seq += 1
        return outcomes


@dataclass
class Pending:
    shard: int
    commands: list
    future: asyncio.Future


class SimExecutor:
    """The coordinator's ``ShardExecutor``: every call waits for the simulator to run it."""

    def __init__(self, sim: "Simulation") -> None:
        self._sim = sim

    async def execute(self, shard: int, commands: list, wait_credit: bool = False
                      ) -> list[Outcome]:
        future = asyncio.get_running_loop().create_future()
        self._sim.pending.append(Pending(shard, list(commands), future))
        return await future


class NoHistory:
    async def get_transfer(self, transfer_id):
        return None

    async def list_entries(self, wallet_id, after_version, limit):
        return []


@dataclass
class Op:
    """One client request, retried with the same key until the answer is definitive."""

    key: str
    items: list[TransferItem]
    outcome: list[Outcome] | None = None
    attempts: int = 0


class Simulation:
    def __init__(self, seed: int, shards: int = 4, wallets: int = 8, ops: int = 60,
                 faults: Faults | None = None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.faults = faults or Faults()
        self.shard_count = shards
        self.shards = [SimShard(s) for s in range(shards)]
        self.wallets = [f"w{i}" for i in range(wallets)]
        self.pending: list[Pending] = []
        self.trace: list[str] = []
        self.now_ms = 1_000_000
        self.coordinator = Coordinator(SimExecutor(self), NoHistory(), shards,
                                       clock_ms=lambda: self.now_ms)
        self.op_count = ops
        self.initial: dict[str, int] = {}
        self.ops: list[Op] = []

    # --- the scheduler ------------------------------------------------------------------

    def log(self, line: str) -> None:
        self.trace.append(f"{self.now_ms} {line}")

    async def _quiesce(self) -> None:
        for _ in range(QUIESCE_ROUNDS):
            await asyncio.sleep(0)

    def _deliver_one(self) -> None:
        p = self.pending.pop(self.rng.randrange(len(self.pending)))
        if p.future.done():
            return
        names = ",".join(type(c).__name__ for c in p.commands)
        roll = self.rng.random()
        if roll < self.faults.lose_request:
            self.log(f"lost request to shard {p.shard}: {names}")
            p.future.set_result([UNAVAILABLE] * len(p.commands))
            return
        outcomes = self.shards[p.shard].execute(p.commands, self.rng, self.faults)
        if outcomes is None:
            self.log(f"unknown append on shard {p.shard}: {names}; owner crashed")
            p.future.set_result([UNAVAILABLE] * len(p.commands))
            return
        if self.rng.random() < self.faults.lose_reply:
            self.log(f"lost reply from shard {p.shard}: {names}")
            p.future.set_result([UNAVAILABLE] * len(p.commands))
            return
        self.log(f"shard {p.shard} ran {names}: "
                 + ",".join(o.status.name for o in outcomes))
        p.future.set_result(outcomes)

    def _pipeline_step(self) -> None:
        """The crediting pipeline of one shard: deliver its outbox, maybe badly; ack."""
        src = self.shards[self.rng.randrange(self.shard_count)]
        for dest, items in sorted(src.state.outbox.items()):
            if not items:
                continue
            credits = tuple(items[s] for s in sorted(items))
            if self.rng.random() < 0.3 and len(credits) > 1:
                credits = credits[1:]  # stale/partial delivery: starts past the next one
            if self.rng.random() < self.faults.lose_delivery:
                self.log(f"lost delivery {src.shard}->{dest}")
                continue
            times = 2 if self.rng.random() < self.faults.duplicate_delivery else 1
            for _ in range(times):
                outcomes = self.shards[dest].execute([ApplyCredits(src.shard, credits)],
                                                     self.rng, self.faults)
                if outcomes is None:
                    self.log(f"unknown append delivering {src.shard}->{dest}")
                    break
                applied = outcomes[0].value
                self.log(f"delivered {src.shard}->{dest} up to {applied}")
                if applied and self.rng.random() > self.faults.lose_reply:
                    src.execute([AckOutbox(dest, applied)], self.rng, self.faults)

    def _recovery_step(self) -> None:
        """The owners' sweep: resolve linked chains left undecided."""
        for shard in self.shards:
            for chain_id, primary in sorted(shard.state.pending_chains(
                    self.now_ms - CHAIN_RESOLVE_AFTER_MS).items()):
                decided = self.shards[primary].execute([DecideChain(chain_id, False,
                                                                    self.now_ms)],
                                                       self.rng, self.faults)
                if decided is None:
                    continue
                shard.execute([FinishChain(chain_id, bool(decided[0].value), self.now_ms)],
                              self.rng, self.faults)
                self.log(f"shard {shard.shard} resolved chain {chain_id[:10]}: "
                         f"{'commit' if decided[0].value else 'abort'}")

    # --- clients ------------------------------------------------------------------------

    async def _client(self, op: Op) -> None:
        while True:
            op.attempts += 1
            if len(op.items) == 1:
                outcome = [await self.coordinator.transfer("sim", op.items[0])]
            else:
                outcome = await self.coordinator.batch_transfer("sim", op.items)
            if all(not o.status.transient() for o in outcome):
                op.outcome = outcome
                self.log(f"client {op.key}: " + ",".join(o.status.name for o in outcome))
                return
            self.log(f"client {op.key}: unknown, retrying")
            await self._quiesce()

    def _new_op(self, n: int) -> Op:
        rng = self.rng
        def item(i: int) -> TransferItem:
            a, b = rng.sample(self.wallets, 2)
            return TransferItem(f"op{n}-{i}", a, b, rng.choice([1, 5, 50, 300, 2_000]), "CNY",
                                linked=False)
        kind = rng.random()
        if kind < 0.15:  # a linked chain of two or three items
            items = [item(i) for i in range(rng.choice([2, 3]))]
            items = [dataclasses.replace(it, linked=i < len(items) - 1)
                     for i, it in enumerate(items)]
            return Op(f"op{n}", items)
        return Op(f"op{n}", [item(0)])

    # --- the run ------------------------------------------------------------------------

    def _fund(self) -> None:
        from ledger.core.model import CreateWallet, Post
        for w in self.wallets:
            s = self.shards[shard_of(w, self.shard_count)]
            s.execute([CreateWallet("setup", "c-" + w, w, "CNY", False, 0)], random.Random(0),
                      Faults(unknown_append=0))
            amount = self.rng.choice([500, 1_000, 5_000])
            s.execute([Post("setup", "d-" + w, "dep-" + w, "DEPOSIT",
                            settlement_wallet_id("CNY", s.shard), w, amount, "CNY", "",
                            s.shard, 0)], random.Random(0), Faults(unknown_append=0))
            self.initial[w] = amount

    async def run(self) -> "Simulation":
        self._fund()
        tasks: dict[str, asyncio.Task] = {}
        started = 0
        steps = 0
        while started < self.op_count or tasks or self.pending:
            steps += 1
            ensure(steps < 200_000, "simulation did not converge")
            self.now_ms += self.rng.randrange(1, 50)
            if started < self.op_count and self.rng.random() < 0.3:
                op = self._new_op(started)
                self.ops.append(op)
                tasks[op.key] = asyncio.create_task(self._client(op))
                started += 1
            await self._quiesce()
            tasks = {k: t for k, t in tasks.items() if not t.done()}
            roll = self.rng.random()
            if roll < self.faults.crash_shard:
                victim = self.shards[self.rng.randrange(self.shard_count)]
                victim.crash_and_recover()
                self.log(f"shard {victim.shard} owner crashed")
            elif roll < self.faults.crash_shard + self.faults.crash_coordinator and tasks:
                key = self.rng.choice(sorted(tasks))
                tasks.pop(key).cancel()
                self.log(f"coordinator of {key} crashed")
                await self._quiesce()
                # The client notices and retries with the same key.
                op = next(o for o in self.ops if o.key == key)
                tasks[key] = asyncio.create_task(self._client(op))
            elif self.pending and self.rng.random() < 0.8:
                self._deliver_one()
            else:
                self._pipeline_step()
            if steps % 20 == 0:
                self._recovery_step()
        # Drain: time passes, pipelines and sweeps run without faults until nothing is owed.
        self.faults = Faults(0, 0, 0, 0, 0, 0, 0)
        for _ in range(50):
            self.now_ms += CHAIN_RESOLVE_AFTER_MS + 1
            self._recovery_step()
            for _ in range(self.shard_count * 3):
                self._pipeline_step()
            if all(not s.state.outbox for s in self.shards):
                break
        return self

    # --- checks -------------------------------------------------------------------------

    def check(self) -> None:
        for shard in self.shards:
            replayed = shard.replay()
            live = {w.wallet_id: (w.balance_minor, w.held_minor) for w in
                    shard.state.wallets.values()}
            again = {w.wallet_id: (w.balance_minor, w.held_minor) for w in
                     replayed.wallets.values()}
            ensure(live == again, "shard %d: replay differs from live state", shard.shard)
            ensure(not shard.state.outbox, "shard %d still owes credits", shard.shard)
            ensure(not shard.state.pending_chains(self.now_ms + 1),
                   "shard %d has undecided chain items", shard.shard)
            shard.state.check()
        balances: dict[str, int] = {}
        for shard in self.shards:
            for w in shard.state.wallets.values():
                balances[w.wallet_id] = w.balance_minor
        ensure(sum(balances.values()) == 0, "books do not balance: %d", sum(balances.values()))
        committed: dict[str, int] = {}
        for shard in self.shards:
            for batch in shard.journal:
                for event in batch:
                    if (type(event) is TransferDecided
                            and event.transfer.state == STATE_COMMITTED):
                        tid = event.transfer.transfer_id
                        committed[tid] = committed.get(tid, 0) + 1
        ensure(all(n == 1 for n in committed.values()), "a transfer committed twice")
        expected = dict(self.initial)
        acknowledged = 0
        for op in self.ops:
            ensure(op.outcome is not None, "operation %s never answered", op.key)
            for item, outcome in zip(op.items, op.outcome):
                tid = outcome.value.transfer_id if outcome.value is not None else None
                if outcome.ok:
                    acknowledged += 1
                    ensure(committed.get(tid) == 1, "acknowledged %s not applied once", tid)
                    expected[item.from_wallet_id] -= item.amount_minor
                    expected[item.to_wallet_id] += item.amount_minor
                elif tid is not None:
                    ensure(tid not in committed, "refused %s was applied", tid)
        for w in self.wallets:
            ensure(balances[w] == expected[w], "replay check: %s has %d, expected %d", w,
                   balances[w], expected[w])
        self.acknowledged = acknowledged

    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.trace).encode()).hexdigest()


def simulate(seed: int, **kwargs) -> Simulation:
    """Run one seed to the end (in a fresh event loop) and check it; returns the simulation."""
    sim = Simulation(seed, **kwargs)
    asyncio.run(sim.run())
    sim.check()
    return sim
