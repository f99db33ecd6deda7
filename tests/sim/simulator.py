"""A seeded fault simulation of the real ledger: real owners, nodes, routers and coordinators.

What runs is the production code: ``ledger.node.Node`` (one per simulated node) starting and
stopping real ``ShardOwner``s as the simulated elector gives and takes shards, each node's real
``Router`` and ``Coordinator``, the real core and codec. What is simulated is everything around
them, on a virtual clock (``vtime.VirtualClockLoop``) so that seconds of timeouts, leases and
retries pass in microseconds and the same seed gives the same trace:

* the store (``store.FaultyStore``): appends that fail before writing, fail after writing,
  are lost with an unknown outcome, are slow, or hang past a lease; fences, loads and
  snapshots that fail; store outages;
* the network between nodes (``network.Network``): requests and replies lost, requests
  duplicated and reordered, nodes partitioned;
* the elector (``Simulation.elect``): shards moved between nodes, re-elected in place, nodes
  paused past their lease (their owners deposed mid-batch), nodes crashed (owners dropped,
  writes in flight landing or not) and restarted, each takeover with a higher epoch;
* clients: a seeded workload of transfers (same and cross shard), deposits, withdrawals,
  batches with linked chains, holds (create, capture, release, expiry), wallet creations,
  reads, and idempotency keys used again (same payload; other amount, source, destination,
  wallet or hold), each retried with its key while the answer is transient; and red
  envelopes through each node's real ``Envelopes`` (``op_envelope_create``,
  ``op_envelope_grab``: FIXED, LUCKY and EXCLUSIVE envelopes, some expiring during the run
  and refunded by the owners' sweep, grabbed singly and in ``grab_many`` batches by several
  receivers, with retries of a grab's key, second keys for a receiver, more receivers than
  shares, ineligible receivers, and reads).

The oracle (``oracle.Oracle``) folds every durable batch as it lands and checks the invariants
after each one; clients report every definitive answer to it. At the end the faults heal,
everything drains, and the end state is checked (see ``Simulation.check_end``).

Each seed also draws which faults are on and how often (swarm testing): a seed that never
loses a reply explores other interleavings than one that loses many.

Why three nodes rather than one router over local owners: the faults then sit where they sit
in production, on the wire between nodes (a coordinator and an owner on one node call each
other directly, as they do in ``ledgerd``), and the code on both ends of that wire is the real
one: the router's retries on ``NotOwner`` and lost connections, stale ownership views, the
node's takeovers, losses and releases, and per-node leases (a paused node loses every shard at
once, as under SIGSTOP). Each seed draws the router's retry deadline (50 ms to 2 s), so many
lost messages reach the coordinator and the client as SHARD_UNAVAILABLE.

What a step costs: the oracle folds each durable batch once (its own books, incrementally),
and the simulation keeps one running ``ShardState`` fold and a small digest per batch and
shard (to check snapshots against the journal they claim to summarize); the whole journal is
replayed from scratch only at the end. About 0.3 s of CPU per seed.

What the harness changes in the code under test, and why (no file of it is edited):
``ledger.constants.SNAPSHOT_EVERY_BATCHES`` is lowered per seed so that snapshots, truncation
and loads from snapshots happen in short runs; ``COMPACTION_IN_PROCESS`` is turned off and the
loop's default executor runs ``asyncio.to_thread`` work inline (a worker process or thread
would finish at a moment no seed decides); each ``Node``'s router is rebuilt with the seed's
retry deadline (``Node`` fixes it at 10 s); a node crash stops its owners and cancels every
task the node started (found through a task factory), since ``Node`` has no crash.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import hashlib
import logging
import random
import weakref
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from coordinator.coordinator import Coordinator, TransferItem, key_shard_of, transfer_id_for
from coordinator.envelopes import EnvelopeRules, Envelopes, GrabItem
from ledger import constants as ledger_constants
from ledger.core import codec, split
from ledger.core.ids import envelope_id_for, grab_key
from ledger.core.invariants import InvariantViolation
from ledger.core.model import (
    KIND_DEPOSIT, KIND_TRANSFER, KIND_WITHDRAWAL, settlement_wallet_id,
)
from ledger.core.shard import ShardState
from ledger.core import audit
from ledger.core.step import fold, fold_batch
from ledger.core.status import Outcome, Status
from ledger.node import Node
from ledger.store.port import JournalBatch
from shard_router.hashing import shard_of
from shard_router.ownership import OwnerInfo
from shard_router.router import Router
from tests.sim.network import NetFaults, Network, NodeOwnership, NodeTransport
from tests.sim.oracle import Execution, Oracle
from tests.sim.store import FaultyStore, StoreFaults
from tests.sim.vtime import VirtualClockLoop

CALLER = "sim"
# Virtual time 0 is this wall-clock instant (ms): hold and chain deadlines look real.
EPOCH_MS = 1_700_000_000_000
# After the faults heal, clients must finish and credits drain within these (virtual s).
CONVERGE_S_MAX = 300.0
DRAIN_S_MAX = 120.0
# The fault phase ends when every client is done or after this long (virtual s).
FAULT_PHASE_S_MAX = 90.0
# A run (setup included) that has not ended after this long has failed (virtual s).
RUN_S_MAX = 60.0 + FAULT_PHASE_S_MAX + CONVERGE_S_MAX + DRAIN_S_MAX + 30.0

_NODE: contextvars.ContextVar[str | None] = contextvars.ContextVar("sim_node", default=None)

NEMESIS_KINDS = ("move", "reelect", "pause", "crash", "partition", "outage")
# What clients do, and how often (relative weights).
WORKLOAD = {"transfer": 30, "deposit_or_withdraw": 8, "batch": 12, "hold": 12, "reuse": 20,
            "create_wallet": 4, "read": 6, "envelope_create": 3, "envelope_grab": 5}
# Envelope expiries (ms): the short ones expire during the run (the owners' sweep refunds
# what is left); 0 is the longest (a day), which outlives every run.
ENVELOPE_EXPIRY_MS = (1_000, 4_000, 0, 0, 0)
# The drain waits until no envelope with money left expires within this of its end (ms), so
# every refund due by the end check was made and its credit delivered.
ENVELOPE_SETTLE_MS = 5_000


@dataclass
class SimConfig:
    """Everything one seed decides before it runs."""

    seed: int
    shard_count: int = 4
    node_count: int = 3
    clients: int = 5
    ops_per_client: int = 14
    think_s_max: float = 0.3  # a client's pause between two requests, at most
    # A credit applied before its debit is durable fails the run at once (else only the
    # damage it does is checked: see ``Oracle``).
    strict_durability: bool = True
    router_deadline_ms: int = 300
    snapshot_every_batches: int = 2_000
    store: StoreFaults = field(default_factory=StoreFaults)
    net: NetFaults = field(default_factory=NetFaults)
    nemesis_interval_s: float = 1.5
    nemesis: dict[str, float] = field(default_factory=lambda: dict.fromkeys(NEMESIS_KINDS, 1.0))
    workload: dict[str, float] = field(default_factory=lambda: dict(WORKLOAD))
    # How long key records stay in owner memory (ms): short ones make retries of spilled
    # keys (answered from the store's key rows) part of the run.
    idempotency_memory_ms: int = 600_000

    @classmethod
    def from_seed(cls, seed: int) -> "SimConfig":
        rng = random.Random(f"config/{seed}")

        def maybe(low: float, high: float, on: float = 0.7) -> float:
            return rng.uniform(low, high) if rng.random() < on else 0.0

        store = StoreFaults(
            append_unavailable=maybe(0.01, 0.04), append_unknown_written=maybe(0.003, 0.02),
            append_unknown_lost=maybe(0.003, 0.02), append_slow=rng.uniform(0.03, 0.2),
            append_timeout_unavailable=maybe(0.01, 0.05),
            append_hang=maybe(0.002, 0.01, 0.5), fence_unavailable=maybe(0.02, 0.15),
            load_unavailable=maybe(0.02, 0.15), snapshot_unavailable=maybe(0.05, 0.3, 0.4),
            delay_s_max=rng.choice([0.002, 0.01]))
        net = NetFaults(lose_request=maybe(0.01, 0.06), lose_reply=maybe(0.01, 0.06),
                        duplicate=maybe(0.01, 0.06), reorder=maybe(0.05, 0.3))
        return cls(
            seed=seed, shard_count=rng.choice([3, 4, 5, 6]), node_count=3,
            clients=rng.choice([5, 7, 9]), ops_per_client=rng.choice([8, 12, 16]),
            think_s_max=rng.choice([0.05, 0.3]),
            router_deadline_ms=rng.choice([50, 300, 2_000]),
            snapshot_every_batches=rng.choice([4, 16, 64]), store=store, net=net,
            nemesis_interval_s=rng.choice([0.5, 1.5, 4.0]),
            nemesis={k: rng.choice([0.0, 1.0, 2.0]) for k in NEMESIS_KINDS},
            idempotency_memory_ms=rng.choice([500, 2_000, 600_000]))


@dataclass
class SimNode:
    node_id: str
    ownership: NodeOwnership
    node: Node
    coordinator: Coordinator
    envelopes: Envelopes
    incarnation: int = 0
    alive: bool = True
    paused: bool = False


def _digest(state: ShardState) -> tuple:
    """What a snapshot must agree on with the journal it claims to summarize."""
    return (tuple(sorted((w.wallet_id, w.balance_minor, w.held_minor, w.version)
                         for w in state.wallets.values())),
            tuple(sorted((d, tuple(sorted(items))) for d, items in state.outbox.items())),
            tuple(sorted(state.outbox_last_seq.items())),
            tuple(sorted(state.inbox_applied.items())),
            tuple(sorted((h.hold_id, h.state) for h in state.holds.values())),
            tuple(sorted(state.chains)), len(state.transfers), len(state.idempotency),
            len(state.claims),
            tuple(sorted((e.envelope_id, e.funded_at_ms, e.left_minor, e.left_shares,
                          e.refunded_minor, e.refund_transfer_id, e.closed_at_ms)
                         for e in state.envelopes.values())),
            tuple(sorted((g.envelope_id, g.position, g.receiver_wallet_id, g.amount_minor)
                         for grabs in state.grabs.values() for g in grabs.values())),
            # The audit chain's head: the owner's live chaining, every replay and every
            # snapshot must agree on it (``ledger.core.audit``).
            (state.audit_seq, state.audit_head))


class _TraceHandler(logging.Handler):
    def __init__(self, sim: "Simulation") -> None:
        super().__init__(logging.WARNING)
        self._sim = sim

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        line = f"{record.name}: {message}"
        if "stops serving: " in message:
            reason = message.split("stops serving: ", 1)[1].split(":", 1)[0]
            self._sim.count(f"owner stopped: {reason}")
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            line += f" ({type(exc).__name__}: {exc})"
        self._sim.log(line)


class Simulation:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        seed = config.seed
        self.rng = random.Random(f"nemesis/{seed}")
        self.workload_rng = random.Random(f"workload/{seed}")
        self.trace: list[str] = []
        self.counts: dict[str, int] = {}
        self.oracle = Oracle(self._violated, config.strict_durability)
        self.store = FaultyStore(random.Random(f"store/{seed}"), StoreFaults(),
                                 self._on_batch, self._on_snapshot, self.log, self._on_hang)
        self.network = Network(self, random.Random(f"net/{seed}"), NetFaults())
        self.nodes: dict[str, SimNode] = {}
        self.assigned: dict[int, tuple[str, int]] = {}
        self.epochs: dict[int, int] = {}
        self._reelecting: set[int] = set()
        self._tasks: set[asyncio.Task] = set()
        self._node_tasks: dict[str, weakref.WeakSet] = {}
        self.folds: dict[int, ShardState] = {}
        self.digests: dict[int, list[tuple]] = {}
        self.background_errors: list[str] = []
        self.healing = False
        self.failure: str | None = None
        self._failed: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        # The workload's view of the ledger: wallets it may use, and what it did before.
        self.wallets: dict[str, list[str]] = {"CNY": [], "USD": []}
        self.singles: list[tuple[str, TransferItem]] = []
        self.holds: list[dict] = []
        self.captures: list[dict] = []
        self.releases: list[tuple[str, str]] = []
        self.creations: list[tuple[str, str, str]] = []
        # Envelopes created (answered OK): their terms, and the grabs tried on them.
        self.envelope_plans: list[dict] = []
        self.created_envelopes: list[dict] = []
        self._keys = 0
        self.ops_done = 0
        self.retries = 0

    # --- plumbing -----------------------------------------------------------------------

    def now_s(self) -> float:
        return self.loop.time() if self.loop is not None else 0.0

    def clock_ms(self) -> int:
        return EPOCH_MS + int(self.now_s() * 1000)

    def log(self, line: str) -> None:
        self.trace.append(f"{self.now_s():9.4f} {line}")

    def count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def _violated(self, message: str) -> None:
        self.log(f"VIOLATION {message}")
        if self.failure is None:
            self.failure = message
            if self._failed is not None:
                self._failed.set()

    def spawn(self, coro: Awaitable, node: str | None = None) -> asyncio.Task:
        """A kept task (optionally belonging to a node: it dies with the node)."""
        token = _NODE.set(node)
        try:
            task = asyncio.ensure_future(coro)
        finally:
            _NODE.reset(token)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self._violated(f"simulation task failed: {type(exc).__name__}: {exc}")

    def _task_factory(self, loop, coro, context=None):
        task = (asyncio.Task(coro, loop=loop) if context is None
                else asyncio.Task(coro, loop=loop, context=context))
        node = _NODE.get() if context is None else context.get(_NODE)
        if node is not None:
            self._node_tasks.setdefault(node, weakref.WeakSet()).add(task)
        return task

    def _exception_handler(self, loop, context) -> None:
        # Exceptions of tasks nobody awaited: reported at garbage collection, so kept out of
        # the trace (their timing is not deterministic) and listed apart.
        exc = context.get("exception")
        self.background_errors.append(f"{context.get('message')}: {exc!r}")

    # --- durable state, as it lands -----------------------------------------------------

    def _on_batch(self, shard: int, batch: JournalBatch) -> None:
        self.log(f"append shard {shard} #{batch.seq} epoch {batch.epoch}")
        self.oracle.on_append(shard, batch)
        state = self.folds.setdefault(shard, ShardState(shard))
        try:
            # The running fold checks nothing about batch numbers: the oracle does.
            fold_batch(state, batch)
        except InvariantViolation as exc:
            self._violated(f"shard {shard}: journal batch {batch.seq} cannot be replayed: {exc}")
            return
        digests = self.digests.setdefault(shard, [_digest(ShardState(shard))])
        digests.append(_digest(state))

    def _on_snapshot(self, shard: int, seq: int, snapshot: bytes) -> None:
        digests = self.digests.get(shard, [_digest(ShardState(shard))])
        self.count("snapshot")
        if seq >= len(digests):
            self._violated(f"shard {shard}: snapshot at batch {seq}, past the journal head "
                           f"{len(digests) - 1}")
            return
        if _digest(codec.snapshot_loads(snapshot)) != digests[seq]:
            self._violated(f"shard {shard}: snapshot saved as 'after batch {seq}' is not the "
                           f"state after batch {seq} of the journal")

    # --- the elector --------------------------------------------------------------------

    def _eligible(self) -> list[str]:
        return [n for n, node in self.nodes.items() if node.alive and not node.paused]

    async def _on_node(self, node_id: str, call: Callable[[], Awaitable]) -> None:
        token = _NODE.set(node_id)
        try:
            await call()
        finally:
            _NODE.reset(token)

    async def elect(self, shard: int, node_id: str) -> None:
        """Give ``shard`` to ``node_id`` with a new, higher epoch (a won election)."""
        epoch = self.epochs[shard] = self.epochs.get(shard, 0) + 1
        self.assigned[shard] = (node_id, epoch)
        self.log(f"elect shard {shard} epoch {epoch} on {node_id}")
        info = OwnerInfo(shard, node_id, "sim", node_id, epoch)
        for node in self.nodes.values():
            self.loop.call_later(self.rng.uniform(0, 0.05), node.ownership.learn, info)
        node = self.nodes[node_id]
        await self._on_node(node_id, lambda: node.ownership.listener(shard, epoch))

    async def _lose(self, node_id: str, shard: int) -> None:
        node = self.nodes[node_id]
        await self._on_node(node_id, lambda: node.ownership.listener(shard, 0))

    async def _release(self, node_id: str, shard: int) -> None:
        """A node gave a shard up (its owner stopped, or failed to start): elect again."""
        if self.assigned.get(shard, ("", 0))[0] != node_id or shard in self._reelecting:
            return
        self._reelecting.add(shard)
        self.spawn(self._reelect_later(shard, self.assigned[shard]))

    async def _reelect_later(self, shard: int, was: tuple[str, int],
                             delay_s: tuple[float, float] = (0.02, 0.5)) -> None:
        try:
            await asyncio.sleep(self.rng.uniform(*delay_s))
            if self.assigned.get(shard) != was:
                return
            eligible = self._eligible()
            if was[0] in eligible and self.rng.random() < 0.5:
                target = was[0]
            else:
                target = self.rng.choice(eligible)
            self.count("re-election")
            await self.elect(shard, target)
        finally:
            self._reelecting.discard(shard)

    def _new_node(self, node_id: str, incarnation: int) -> SimNode:
        ownership = NodeOwnership(node_id, self.config.shard_count, self._release)
        for shard, (owner_node, epoch) in self.assigned.items():
            ownership.learn(OwnerInfo(shard, owner_node, "sim", owner_node, epoch))
        transport = NodeTransport(self.network, node_id)
        node = Node(self.store, ownership, transport, clock_ms=self.clock_ms,
                    idempotency_memory_ms=self.config.idempotency_memory_ms)
        # The node's router, with the seed's retry deadline (owners are given node.router).
        node.router = Router(node_id, node.owners, ownership, transport,
                             retry_deadline_ms=self.config.router_deadline_ms)
        coordinator = Coordinator(node.router, self.store, self.config.shard_count,
                                  clock_ms=self.clock_ms)
        # The envelope seeds come from the workload's generator: a seed stays a trace.
        envelopes = Envelopes(coordinator, node.router, self.store, self.config.shard_count,
                              clock_ms=self.clock_ms,
                              new_seed=lambda: self.workload_rng.getrandbits(63))
        return SimNode(node_id, ownership, node, coordinator, envelopes, incarnation)

    async def _start_node(self, node_id: str, incarnation: int) -> None:
        sim_node = self.nodes[node_id] = self._new_node(node_id, incarnation)
        await self._on_node(node_id, sim_node.node.start)

    # --- the nemesis --------------------------------------------------------------------

    async def nemesis(self) -> None:
        kinds = [k for k in NEMESIS_KINDS if self.config.nemesis.get(k)]
        weights = [self.config.nemesis[k] for k in kinds]
        while kinds and not self.healing:
            await asyncio.sleep(self.rng.expovariate(1 / self.config.nemesis_interval_s))
            if self.healing:
                return
            kind = self.rng.choices(kinds, weights)[0]
            await getattr(self, "_nemesis_" + kind)()

    def _down_count(self) -> int:
        return sum(1 for n in self.nodes.values() if not n.alive or n.paused)

    def _unserved(self) -> list[int]:
        unserved = []
        for shard, (node_id, _) in sorted(self.assigned.items()):
            owner = self.nodes[node_id].node.owners.get(shard)
            if owner is None or not owner.serving:
                unserved.append(shard)
        return unserved

    def _note_mid_batch(self, shards: list[int]) -> None:
        """Count owners deposed while their append is in flight."""
        for shard in shards:
            if self.store.appending.get(shard):
                self.count("deposed mid-batch")

    async def _nemesis_move(self) -> None:
        shard = self.rng.randrange(self.config.shard_count)
        old, _ = self.assigned[shard]
        targets = [n for n in self._eligible() if n != old]
        if not targets or shard in self._reelecting:
            return
        target = self.rng.choice(targets)
        self.count("move")
        self.log(f"nemesis: move shard {shard} {old} -> {target}")
        self._note_mid_batch([shard])
        self._reelecting.add(shard)
        try:
            if self.nodes[old].alive:
                await self._lose(old, shard)
            await self.elect(shard, target)
        finally:
            self._reelecting.discard(shard)

    async def _nemesis_reelect(self) -> None:
        shard = self.rng.randrange(self.config.shard_count)
        node_id, _ = self.assigned[shard]
        if node_id not in self._eligible() or shard in self._reelecting:
            return
        self.count("re-elect in place")
        self.log(f"nemesis: re-elect shard {shard} in place on {node_id}")
        await self.elect(shard, node_id)

    async def _nemesis_pause(self) -> None:
        """The node stops renewing its lease (paused, or cut from the elector): its owners
        lose their lease at once, mid-batch or not, and are deposed."""
        eligible = self._eligible()
        if self._down_count() or len(eligible) < 2:
            return
        node_id = self.rng.choice(eligible)
        self.pause(node_id)

    def pause(self, node_id: str) -> None:
        node = self.nodes[node_id]
        if node.paused or not node.alive:
            return
        self.count("pause")
        self.log(f"nemesis: pause {node_id} past its lease")
        self._note_mid_batch([s for s, (n, _) in self.assigned.items() if n == node_id])
        node.paused = True
        node.ownership.lease_ok = False
        for shard, (owner, _) in sorted(self.assigned.items()):
            if owner == node_id:
                self._reelecting.add(shard)
                self.spawn(self._reelect_later(shard, self.assigned[shard], (0.0, 0.3)))
        self.spawn(self._resume_later(node_id, node.incarnation))

    async def _resume_later(self, node_id: str, incarnation: int) -> None:
        await asyncio.sleep(self.rng.uniform(0.5, 4.0))
        await self.resume(node_id, incarnation)

    async def resume(self, node_id: str, incarnation: int) -> None:
        node = self.nodes[node_id]
        if not node.paused or node.incarnation != incarnation:
            return
        self.log(f"{node_id} resumes: its lost shards are reported lost")
        for shard in range(self.config.shard_count):
            if self.assigned.get(shard, ("", 0))[0] != node_id:
                await self._lose(node_id, shard)
        node.paused = False
        node.ownership.lease_ok = True

    def _on_hang(self, shard: int, epoch: int) -> None:
        """An append hangs: sometimes the node hangs with it, past its lease."""
        owner_node, owner_epoch = self.assigned.get(shard, ("", 0))
        if (owner_epoch == epoch and not self.healing and self.rng.random() < 0.7
                and self._down_count() == 0 and len(self._eligible()) >= 2):
            self.pause(owner_node)

    async def _nemesis_crash(self) -> None:
        eligible = self._eligible()
        if self._down_count() or len(eligible) < 2:
            return
        await self.crash(self.rng.choice(eligible))

    async def crash(self, node_id: str) -> None:
        node = self.nodes[node_id]
        self.count("crash")
        self.log(f"nemesis: crash {node_id}")
        self._note_mid_batch([s for s, (n, _) in self.assigned.items() if n == node_id])
        node.alive = False
        node.ownership.lease_ok = False
        node.incarnation += 1
        current = asyncio.current_task()
        for owner in list(node.node.owners.values()):
            await owner.stop("node crashed")
        for task in list(self._node_tasks.pop(node_id, ())):
            if task is not current and not task.done():
                task.cancel()
        for shard, (owner, _) in sorted(self.assigned.items()):
            if owner == node_id:
                self._reelecting.add(shard)
                self.spawn(self._reelect_later(shard, self.assigned[shard], (0.2, 2.0)))
        self.spawn(self._restart_later(node_id, node.incarnation))

    async def _restart_later(self, node_id: str, incarnation: int) -> None:
        await asyncio.sleep(self.rng.uniform(0.3, 3.0))
        await self.restart(node_id, incarnation)

    async def restart(self, node_id: str, incarnation: int) -> None:
        if self.nodes[node_id].alive or self.nodes[node_id].incarnation != incarnation:
            return
        self.log(f"{node_id} restarts")
        await self._start_node(node_id, incarnation)

    async def _nemesis_partition(self) -> None:
        node_id = self.rng.choice(sorted(self.nodes))
        seconds = self.rng.uniform(0.2, 2.0)
        self.count("partition")
        self.log(f"nemesis: partition {node_id} for {seconds:.2f}s")
        self.network.partitioned.add(node_id)
        self.spawn(self._heal_partition_later(node_id, seconds))

    async def _heal_partition_later(self, node_id: str, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self.network.partitioned.discard(node_id)

    async def _nemesis_outage(self) -> None:
        self.count("store outage")
        self.store.outage(self.rng.uniform(0.05, 1.0))

    async def heal(self) -> None:
        """Every fault ends: nodes come back, the store and network behave."""
        self.healing = True
        self.log("heal")
        self.store.faults = StoreFaults()
        self.store.outage_until_s = 0.0
        self.network.faults = NetFaults()
        self.network.partitioned.clear()
        for node_id, node in sorted(self.nodes.items()):
            if not node.alive:
                await self.restart(node_id, node.incarnation)
            elif node.paused:
                await self.resume(node_id, node.incarnation)

    # --- clients ------------------------------------------------------------------------

    def _key(self) -> str:
        self._keys += 1
        return f"k{self._keys}"

    async def _attempt(self, call: Callable[[Coordinator], Awaitable],
                       via: str = "coordinator") -> object | None:
        """One try through a random live node's coordinator (or ``via`` another of its
        services: "envelopes"); None if that node died."""
        live = sorted(n for n, node in self.nodes.items() if node.alive)
        node_id = self.workload_rng.choice(live)
        task = self.spawn(call(getattr(self.nodes[node_id], via)), node=node_id)
        await asyncio.wait([task])
        if task.cancelled():
            return None
        return task.result()

    async def request(self, label: str, call: Callable, via: str = "coordinator"):
        """Send until the answer is definitive (the client library's retry, same key)."""
        while True:
            result = await self._attempt(call, via)
            outcomes = result if isinstance(result, list) else [result]
            if result is not None and all(not o.status.transient() for o in outcomes):
                self.log(f"client {label}: " + ",".join(o.status.name for o in outcomes))
                return result
            self.retries += 1
            await asyncio.sleep(self.workload_rng.uniform(0.02, 0.3))

    def _funded(self, currency: str) -> list[str]:
        return self.wallets[currency]

    def _plan(self, key: str, item: TransferItem) -> tuple[Execution, str]:
        """The execution and transfer id the ledger must record for ``item`` (as planned by
        the coordinator: settlement sub-accounts of the wallet's shard, id from the key)."""
        if item.kind == KIND_DEPOSIT:
            shard = shard_of(item.to_wallet_id, self.config.shard_count)
            source, target = settlement_wallet_id(item.currency, shard), item.to_wallet_id
        elif item.kind == KIND_WITHDRAWAL:
            shard = shard_of(item.from_wallet_id, self.config.shard_count)
            source, target = item.from_wallet_id, settlement_wallet_id(item.currency, shard)
        else:
            shard = shard_of(item.from_wallet_id, self.config.shard_count)
            source, target = item.from_wallet_id, item.to_wallet_id
        return (("move", (item.kind, source, target, item.amount_minor, item.currency,
                          item.memo)), transfer_id_for(shard, CALLER, key))

    def _answered_items(self, items: list[TransferItem], outcomes: list[Outcome]) -> None:
        for item, outcome in zip(items, outcomes):
            execution, transfer_id = self._plan(item.idempotency_key, item)
            self.oracle.answered(CALLER, item.idempotency_key, execution, outcome, transfer_id)

    def _amount(self) -> int:
        return self.workload_rng.choice([1, 7, 50, 120, 400, 900, 2_500, 6_000])

    def _pair(self, same_shard: bool | None = None) -> tuple[str, str, str] | None:
        rng = self.workload_rng
        currency = rng.choice(["CNY", "CNY", "USD"])
        wallets = self._funded(currency)
        if len(wallets) < 2:
            return None
        source = rng.choice(wallets)
        shards = self.config.shard_count
        choices = [w for w in wallets if w != source]
        if same_shard is not None:
            narrowed = [w for w in choices
                        if (shard_of(w, shards) == shard_of(source, shards)) == same_shard]
            choices = narrowed or choices
        return source, rng.choice(choices), currency

    async def op_transfer(self) -> None:
        pair = self._pair(self.workload_rng.random() < 0.3)
        if pair is None:
            return
        source, target, currency = pair
        key = self._key()
        item = TransferItem(key, source, target, self._amount(), currency)
        self.singles.append((key, item))
        outcome = await self.request(key, lambda c: c.transfer(CALLER, item))
        self._answered_items([item], [outcome])

    async def op_deposit_or_withdraw(self) -> None:
        rng = self.workload_rng
        currency = rng.choice(["CNY", "USD"])
        wallet = rng.choice(self._funded(currency))
        key = self._key()
        amount = self._amount()
        if rng.random() < 0.5:
            item = TransferItem(key, "", wallet, amount, currency, kind=KIND_DEPOSIT)
            call = lambda c: c.deposit(CALLER, key, wallet, amount, currency)  # noqa: E731
        else:
            item = TransferItem(key, wallet, "", amount, currency, kind=KIND_WITHDRAWAL)
            call = lambda c: c.withdraw(CALLER, key, wallet, amount, currency)  # noqa: E731
        self.singles.append((key, item))
        outcome = await self.request(key, call)
        self._answered_items([item], [outcome])

    async def op_batch(self) -> None:
        """Independent items and linked chains in one BatchTransfer."""
        rng = self.workload_rng
        items: list[TransferItem] = []
        for _ in range(rng.randint(2, 5)):
            pair = self._pair(rng.random() < 0.3)
            if pair is None:
                return
            items.append(TransferItem(self._key(), pair[0], pair[1], self._amount(), pair[2]))
        # Link runs of items into chains: item i linked means it chains with item i + 1.
        linked = [rng.random() < 0.5 for _ in items[:-1]] + [False]
        items = [dataclasses.replace(it, linked=flag) for it, flag in zip(items, linked)]
        label = f"batch {items[0].idempotency_key}..{items[-1].idempotency_key}"
        outcomes = await self.request(label, lambda c: c.batch_transfer(CALLER, items))
        self._answered_items(items, outcomes)
        self._check_chains(items, outcomes)

    def _check_chains(self, items: list[TransferItem], outcomes: list[Outcome]) -> None:
        chain: list[Outcome] = []
        for item, outcome in zip(items, outcomes):
            chain.append(outcome)
            if not item.linked:
                if len(chain) > 1 and len({o.ok for o in chain}) > 1:
                    self.oracle.fail(f"linked chain answered partly OK: "
                                     f"{[o.status.name for o in chain]}")
                chain = []

    async def op_hold(self) -> None:
        """Create a hold, then capture (all or part), release, or let it expire."""
        rng = self.workload_rng
        currency = rng.choice(["CNY", "USD"])
        wallet = rng.choice(self._funded(currency))
        amount, timeout_ms = self._amount(), rng.choice([300, 1_500, 5_000])
        key = self._key()
        hold_id = transfer_id_for(shard_of(wallet, self.config.shard_count), CALLER, key, "h")
        outcome = await self.request(key, lambda c: c.create_hold(
            CALLER, key, wallet, amount, currency, timeout_ms))
        self.oracle.answered(CALLER, key, ("hold", (wallet, amount, currency, timeout_ms)),
                             outcome)
        if not outcome.ok:
            return
        if outcome.value.hold_id != hold_id:
            self.oracle.fail(f"hold of key {key} answered as {outcome.value.hold_id}")
        hold = dict(key=key, hold_id=hold_id, wallet=wallet, amount=amount, currency=currency,
                    timeout_ms=timeout_ms)
        self.holds.append(hold)
        await asyncio.sleep(rng.uniform(0, timeout_ms * 1.2 / 1000))
        roll = rng.random()
        if roll < 0.5:
            targets = [w for w in self._funded(currency) if w != wallet]
            part = rng.choice([0, 0, max(1, amount // 3), amount])
            await self.capture(dict(key=self._key(), hold=hold, to=rng.choice(targets),
                                    amount=part))
        elif roll < 0.8:
            await self.release(self._key(), hold)

    async def capture(self, capture: dict) -> None:
        hold, key = capture["hold"], capture["key"]
        self.captures.append(capture)
        outcome = await self.request(key, lambda c: c.capture_hold(
            CALLER, key, hold["hold_id"], capture["amount"], capture["to"]))
        resolved = capture["amount"] or hold["amount"]
        transfer_id = transfer_id_for(shard_of(hold["wallet"], self.config.shard_count),
                                      CALLER, key)
        self.oracle.answered(CALLER, key, ("capture", (hold["hold_id"], capture["to"],
                                                       resolved, "")), outcome,
                             transfer_id if outcome.ok else "")

    async def release(self, key: str, hold: dict) -> None:
        self.releases.append((key, hold["hold_id"]))
        outcome = await self.request(key, lambda c: c.release_hold(CALLER, key,
                                                                   hold["hold_id"]))
        self.oracle.answered(CALLER, key, ("release", (hold["hold_id"],)), outcome)

    async def op_create_wallet(self) -> None:
        rng = self.workload_rng
        wallet = f"u{self._keys + 1}"
        currency = rng.choice(["CNY", "USD"])
        if self.creations and rng.random() < 0.4:
            key = rng.choice(self.creations)[0]  # the same key, another wallet
        else:
            key = self._key()
        self.creations.append((key, wallet, currency))
        outcome = await self.request(key, lambda c: c.create_wallet(CALLER, key, wallet,
                                                                    currency))
        self.oracle.answered(CALLER, key, ("wallet", (wallet, currency, False)), outcome)
        if outcome.ok and not outcome.replayed:
            self.wallets[currency].append(wallet)

    async def op_read(self) -> None:
        wallet = self.workload_rng.choice(self._funded("CNY") + self._funded("USD"))
        # As the API reads (with the risk view): the answer crosses nodes as codec bytes.
        outcome = await self.request(f"read {wallet}",
                                     lambda c: c.get_wallet(wallet, with_risk=True))
        if outcome.ok:
            read, _ = outcome.value
            self.oracle.read(wallet, read.version, read.balance_minor)

    async def op_reuse(self) -> None:
        """Send an earlier request's idempotency key again: with the same payload, or with
        another amount, source wallet (preferably on the key's own shard), destination,
        wallet, or hold."""
        rng = self.workload_rng
        shards = self.config.shard_count
        roll = rng.random()
        if roll < 0.6 and self.singles:
            key, item = rng.choice(self.singles)
            key_shard = key_shard_of(CALLER, key, shards)
            variant = rng.choice(["same", "amount", "source", "source", "target"])
            wallets = [w for w in self._funded(item.currency)
                       if w not in (item.from_wallet_id, item.to_wallet_id)]
            if variant == "amount":
                item = dataclasses.replace(item, amount_minor=item.amount_minor + 1)
            elif variant == "source" and wallets and item.kind == KIND_TRANSFER:
                on_key_shard = [w for w in wallets if shard_of(w, shards) == key_shard]
                item = dataclasses.replace(item, from_wallet_id=rng.choice(on_key_shard
                                                                           or wallets))
            elif variant == "target" and wallets and item.kind == KIND_TRANSFER:
                item = dataclasses.replace(item, to_wallet_id=rng.choice(wallets))
            self.count(f"reuse {variant}")
            outcome = await self.request(f"reuse {key}", lambda c: c.transfer(CALLER, item))
            self._answered_items([item], [outcome])
        elif roll < 0.75 and self.holds:
            hold = dict(rng.choice(self.holds))
            others = [w for w in self._funded(hold["currency"]) if w != hold["wallet"]]
            if rng.random() < 0.7 and others:
                hold["wallet"] = rng.choice(others)
            key = hold["key"]
            self.count("reuse hold")
            outcome = await self.request(f"reuse {key}", lambda c: c.create_hold(
                CALLER, key, hold["wallet"], hold["amount"], hold["currency"],
                hold["timeout_ms"]))
            self.oracle.answered(CALLER, key, ("hold", (hold["wallet"], hold["amount"],
                                                        hold["currency"],
                                                        hold["timeout_ms"])), outcome)
        elif roll < 0.9 and self.captures:
            capture = dict(rng.choice(self.captures))
            variant = rng.choice(["same", "explicit", "target", "hold"])
            if variant == "explicit" and capture["amount"] == 0:
                capture["amount"] = capture["hold"]["amount"]
            elif variant == "target":
                others = [w for w in self._funded(capture["hold"]["currency"])
                          if w not in (capture["to"], capture["hold"]["wallet"])]
                capture["to"] = rng.choice(others) if others else capture["to"]
            elif variant == "hold":
                capture["hold"] = rng.choice(self.holds)
            if capture["to"] == capture["hold"]["wallet"]:
                return
            self.count(f"reuse capture {variant}")
            await self.capture(capture)
        elif self.releases and self.holds:
            key, _ = rng.choice(self.releases)
            self.count("reuse release")
            await self.release(key, rng.choice(self.holds))

    async def op_envelope_create(self) -> None:
        """Create (and fund) a red envelope; sometimes send an earlier create's key again,
        with the same terms (the same envelope, its seed too) or other ones (refused)."""
        rng = self.workload_rng
        if self.envelope_plans and rng.random() < 0.15:
            plan = dict(rng.choice(self.envelope_plans))
            variant = rng.choice(["same", "same", "total", "expiry"])
            if variant == "total":
                plan["total"] += 1
            elif variant == "expiry":
                plan["expiry_ms"] += 1
            self.count(f"envelope reuse {variant}")
        else:
            currency = rng.choice(["CNY", "CNY", "USD"])
            wallets = self._funded(currency)
            sender = rng.choice(wallets)
            kind = rng.choice([split.KIND_FIXED, split.KIND_LUCKY, split.KIND_LUCKY,
                               split.KIND_EXCLUSIVE])
            shares = 1 if kind == split.KIND_EXCLUSIVE else rng.randint(1, 10)
            others = [w for w in wallets if w != sender]
            plan = dict(key=self._key(), sender=sender, currency=currency, kind=kind,
                        shares=shares,
                        total=max(shares, rng.choice([1, 10, 99, 500, 1_200, 4_000])),
                        expiry_ms=rng.choice(ENVELOPE_EXPIRY_MS),
                        receiver=rng.choice(others) if kind == split.KIND_EXCLUSIVE else "",
                        memo=rng.choice(["", "hny"]))
            self.envelope_plans.append(plan)
        await self.create_envelope(plan)

    async def create_envelope(self, plan: dict) -> None:
        key = plan["key"]
        outcome = await self.request(f"envelope {key}", lambda e: e.create(
            CALLER, key, plan["sender"], plan["total"], plan["shares"], plan["kind"],
            plan["currency"], plan["expiry_ms"], plan["memo"], plan["receiver"]),
            via="envelopes")
        envelope_id = envelope_id_for(CALLER, key)
        funding_id = transfer_id_for(shard_of(plan["sender"], self.config.shard_count),
                                     CALLER, key)
        expiry_ms = plan["expiry_ms"] or EnvelopeRules().expiry_ms_max
        self.count(f"envelope create {outcome.status.name}")
        self.oracle.envelope_answered(
            CALLER, key, envelope_id, (plan["sender"], plan["currency"], plan["kind"],
                                       plan["total"], plan["shares"], plan["receiver"],
                                       plan["memo"], expiry_ms), outcome, funding_id)
        if outcome.ok and not any(e["envelope_id"] == envelope_id
                                  for e in self.created_envelopes):
            envelope = outcome.value[0]
            self.count("envelope created")
            self.created_envelopes.append(dict(
                envelope_id=envelope_id, currency=envelope.currency, kind=envelope.kind,
                shares=envelope.shares, sender=envelope.sender_wallet_id,
                receiver=envelope.receiver_wallet_id, grabs=[]))

    async def op_envelope_grab(self) -> None:
        """Grab an envelope created before: several receivers (more than its shares, at
        times), singly or in one ``grab_many``; with them, at times, a retry of an earlier
        grab's key (the same amount again), a second key for a receiver who grabbed
        (ENVELOPE_ALREADY_GRABBED), an earlier key for another receiver (reused), a
        receiver of another currency; then, at times, a read of the envelope."""
        rng = self.workload_rng
        if not self.created_envelopes:
            await self.op_envelope_create()
            return
        recent = self.created_envelopes[-3:]
        env = rng.choice(recent if rng.random() < 0.7 else self.created_envelopes)
        tried = {receiver for _, receiver in env["grabs"]}
        wallets = self._funded(env["currency"])
        if env["kind"] == split.KIND_EXCLUSIVE and rng.random() < 0.6:
            fresh = [env["receiver"]]
        else:
            fresh = [w for w in wallets if w not in tried] or list(wallets)
            rng.shuffle(fresh)
            fresh = fresh[:rng.randint(1, min(env["shares"] + 2, 6))]
        items = [GrabItem(self._key(), env["envelope_id"], r) for r in fresh]
        earlier = list(env["grabs"])
        if earlier and rng.random() < 0.4:
            key, receiver = rng.choice(earlier)
            items.append(GrabItem(key, env["envelope_id"], receiver))
            self.count("grab retry same key")
        if earlier and rng.random() < 0.25:
            _, receiver = rng.choice(earlier)
            items.append(GrabItem(self._key(), env["envelope_id"], receiver))
            self.count("grab second key")
        if earlier and rng.random() < 0.1:
            key, receiver = rng.choice(earlier)
            others = [w for w in wallets if w != receiver]
            if others:
                items.append(GrabItem(key, env["envelope_id"], rng.choice(others)))
                self.count("grab key reused")
        if rng.random() < 0.05:
            other = "USD" if env["currency"] == "CNY" else "CNY"
            items.append(GrabItem(self._key(), env["envelope_id"],
                                  rng.choice(self._funded(other))))
            self.count("grab other currency")
        # One key at most once per call (the same key twice in one call is in flight).
        seen: set[str] = set()
        items = [it for it in items
                 if not (it.idempotency_key in seen or seen.add(it.idempotency_key))]
        env["grabs"].extend((it.idempotency_key, it.receiver_wallet_id) for it in items
                            if (it.idempotency_key, it.receiver_wallet_id) not in earlier)
        for it in items:
            self.oracle.grab_sending(CALLER, grab_key(it.envelope_id, it.idempotency_key),
                                     it.receiver_wallet_id)
        if len(items) > 1 and rng.random() < 0.5:
            self.count("grab_many")
            label = f"grab_many {items[0].idempotency_key}..{items[-1].idempotency_key}"
            outcomes = await self.request(label, lambda e: e.grab_many(CALLER, items),
                                          via="envelopes")
            self._answered_grabs(items, outcomes)
        else:
            for item in items:
                outcome = await self.request(f"grab {item.idempotency_key}", lambda e, item=item:
                                             e.grab(CALLER, item), via="envelopes")
                self._answered_grabs([item], [outcome])
        if rng.random() < 0.3:
            view = await self.request(f"read {env['envelope_id']}", lambda e: e.get(
                env["envelope_id"]), via="envelopes")
            if view.ok:
                v = view.value
                self.oracle.envelope_read(v.envelope, v.grabs, v.luckiest,
                                          not v.next_page_token)
            else:
                self.oracle.fail(f"read of envelope {env['envelope_id']}: {view.status.name}")

    def _answered_grabs(self, items: list[GrabItem], outcomes: list[Outcome]) -> None:
        now = self.clock_ms()
        for item, outcome in zip(items, outcomes):
            if outcome.status is Status.ENVELOPE_SOLD_OUT:
                self.count("grab sold out")
            self.oracle.grab_answered(CALLER, grab_key(item.envelope_id, item.idempotency_key),
                                      item.envelope_id, item.receiver_wallet_id, outcome, now)

    async def client(self, number: int) -> None:
        rng = self.workload_rng
        ops = [(getattr(self, "op_" + name), weight)
               for name, weight in self.config.workload.items() if weight]
        for _ in range(self.config.ops_per_client):
            await asyncio.sleep(rng.uniform(0, self.config.think_s_max))
            op = rng.choices([o for o, _ in ops], [w for _, w in ops])[0]
            await op()
            self.ops_done += 1

    async def setup(self) -> None:
        """Wallets and their first deposits, before any fault."""
        shards = self.config.shard_count
        plan = [(f"w{i}", "CNY") for i in range(2 * shards)] + [
            (f"x{i}", "USD") for i in range(shards)]
        for wallet, currency in plan:
            key = self._key()
            outcome = await self.request(key, lambda c, key=key, wallet=wallet, currency=currency:
                                         c.create_wallet(CALLER, key, wallet, currency))
            self.oracle.answered(CALLER, key, ("wallet", (wallet, currency, False)), outcome)
            self.wallets[currency].append(wallet)
        for wallet, currency in plan:
            key = self._key()
            item = TransferItem(key, "", wallet, self.workload_rng.choice([2_000, 8_000]),
                                currency, kind=KIND_DEPOSIT)
            outcome = await self.request(key, lambda c, key=key, wallet=wallet, item=item,
                                         currency=currency: c.deposit(
                CALLER, key, wallet, item.amount_minor, currency))
            self._answered_items([item], [outcome])

    # --- the run ------------------------------------------------------------------------

    async def main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop.set_task_factory(self._task_factory)
        self.loop.set_exception_handler(self._exception_handler)
        self._failed = asyncio.Event()
        work = self.spawn(self._run())
        failed = asyncio.ensure_future(self._failed.wait())
        await asyncio.wait([work, failed], timeout=RUN_S_MAX,
                           return_when=asyncio.FIRST_COMPLETED)
        failed.cancel()
        if not work.done() and self.failure is None:
            self._violated(f"the run did not end within {RUN_S_MAX:.0f}s virtual; shards "
                           f"without a serving owner: {self._unserved()}")
        self.store.inert = True
        if self.failure is None and work.done() and work.exception() is not None:
            exc = work.exception()
            self.failure = f"the run raised {type(exc).__name__}: {exc}"

    async def _run(self) -> None:
        for i in range(self.config.node_count):
            await self._start_node(f"n{i}", 0)
        for shard in range(self.config.shard_count):
            await self.elect(shard, f"n{shard % self.config.node_count}")
        await self.setup()
        self.log("faults on")
        self.store.faults = self.config.store
        self.network.faults = self.config.net
        nemesis = self.spawn(self.nemesis())
        clients = [self.spawn(self.client(i)) for i in range(self.config.clients)]
        await asyncio.wait(clients, timeout=FAULT_PHASE_S_MAX)
        await self.heal()
        await nemesis
        healed_at = self.now_s()
        done, pending = await asyncio.wait(clients, timeout=CONVERGE_S_MAX)
        if pending:
            self._violated(f"{len(pending)} clients still retrying {CONVERGE_S_MAX:.0f}s after "
                           f"the faults healed; shards without a serving owner: "
                           f"{self._unserved()}")
            return
        while self.oracle.in_doubt(self.clock_ms() + ENVELOPE_SETTLE_MS):
            if self.now_s() - healed_at > CONVERGE_S_MAX + DRAIN_S_MAX:
                self._violated(f"still in doubt after draining: "
                               f"{self.oracle.in_doubt(self.clock_ms())[:3]}")
                return
            await asyncio.sleep(0.5)
        await asyncio.sleep(3.0)  # acknowledgements and sweeps settle
        await self.check_end()

    async def check_end(self) -> None:
        """After healing and draining: nothing in doubt, every acknowledged request executed
        once and nothing else, balances = replay of acknowledged requests, every envelope
        adding up (and refunded if it expired with money left), and each shard's serving
        owner, the journal replayed from scratch, the journal replayed from its snapshot,
        and the oracle all agree (wallets and envelopes)."""
        self.oracle.final({}, self.clock_ms())
        for shard in range(self.config.shard_count):
            node_id, epoch = self.assigned[shard]
            owner = self.nodes[node_id].node.owners.get(shard)
            for _ in range(200):
                if (owner is not None and owner.serving
                        and not self.store.busy.get(shard)):
                    break
                await asyncio.sleep(0.05)
                owner = self.nodes[node_id].node.owners.get(shard)
            if owner is None or not owner.serving or owner.epoch != epoch:
                self.oracle.fail(f"shard {shard}: no serving owner of epoch {epoch} after "
                                 f"healing")
                continue
            journal = self.store.journals[shard]
            replayed = ShardState(shard)
            fold(replayed, journal.history)
            replayed.check()
            if _digest(owner.state) != _digest(replayed):
                self.oracle.fail(f"shard {shard}: the serving owner's state differs from its "
                                 f"journal replayed")
            if _digest(self.folds[shard]) != _digest(replayed):
                self.oracle.fail(f"shard {shard}: replay differs from the running fold")
            loaded = await self.store.load(shard)
            from_snapshot = (codec.snapshot_loads(loaded.snapshot) if loaded.snapshot
                             else ShardState(shard))
            fold(from_snapshot, loaded.batches)
            if _digest(from_snapshot) != _digest(replayed):
                self.oracle.fail(f"shard {shard}: snapshot + tail differs from the journal")
            # The audit rows the owners wrote (and replays rewrote) form one intact chain that
            # ends at the head the journal gives.
            for problem in audit.check_chain(
                    shard, await self.store.read_audit(shard, 0, 1 << 40),
                    audit.AuditHead(replayed.audit_seq, replayed.audit_head)):
                self.oracle.fail(f"shard {shard}: audit chain, batch {problem.seq}: "
                                 f"{problem.what}")
            for wallet in replayed.wallets.values():
                found = self.oracle.wallets.get(wallet.wallet_id)
                if found is None or (found.balance, found.held) != (wallet.balance_minor,
                                                                    wallet.held_minor):
                    self.oracle.fail(f"wallet {wallet.wallet_id}: journal replay and oracle "
                                     f"disagree")
            for envelope in replayed.envelopes.values():
                known = self.oracle.envelopes.get(envelope.envelope_id)
                grabs = sorted((g.position, g.receiver_wallet_id, g.amount_minor)
                               for g in replayed.grabs.get(envelope.envelope_id, {}).values())
                if known is None or (
                        bool(envelope.funded_at_ms), envelope.left_minor, envelope.left_shares,
                        envelope.refunded_minor, envelope.refund_transfer_id, grabs) != (
                        known.funded, known.left, known.left_shares, known.refunded,
                        known.refund_transfer_id,
                        sorted((g.position, g.receiver_wallet_id, g.amount_minor)
                               for g in known.grabs.values())):
                    self.oracle.fail(f"envelope {envelope.envelope_id}: journal replay and "
                                     f"oracle disagree")

    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.trace).encode()).hexdigest()


@dataclass
class Result:
    seed: int
    config: SimConfig
    failure: str | None
    trace: list[str]
    counts: dict[str, int]
    net_counts: dict[str, int]
    store_counts: dict[str, int]
    appends: int
    ops_done: int
    retries: int
    background_errors: list[str]
    virtual_s: float

    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.trace).encode()).hexdigest()

    def explain(self, lines: int = 60) -> str:
        return (f"seed {self.seed} failed at {self.virtual_s:.3f}s virtual: {self.failure}\n"
                f"replay it: .venv/bin/python -m tests.sim {self.seed} [--trace]\n"
                f"config: {self.config}\nlast trace lines:\n"
                + "\n".join(self.trace[-lines:]))


def simulate(seed: int, config: SimConfig | None = None) -> Result:
    """Run one seed to its end (its own virtual-clock event loop) and return what it found."""
    config = config or SimConfig.from_seed(seed)
    sim = Simulation(config)
    # Snapshots often enough to be exercised, and built inline: a worker process would
    # finish at a moment no seed decides (and costs a process start per compaction).
    patches = {"SNAPSHOT_EVERY_BATCHES": config.snapshot_every_batches,
               "COMPACTION_IN_PROCESS": False}
    saved_constants = {name: getattr(ledger_constants, name) for name in patches
                       if hasattr(ledger_constants, name)}
    for name in saved_constants:
        setattr(ledger_constants, name, patches[name])
    loggers = [logging.getLogger(name) for name in ("ledger", "shard_router", "coordinator")]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    handler = _TraceHandler(sim)
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.WARNING)
        lg.propagate = False
    try:
        with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
            runner.run(sim.main())
            virtual_s = sim.now_s()
    finally:
        for name, value in saved_constants.items():
            setattr(ledger_constants, name, value)
        for lg, (level, propagate) in zip(loggers, saved):
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate
    return Result(seed, config, sim.failure, sim.trace, {**sim.counts, **sim.oracle.envelope_counts},
                  dict(sim.network.counts), dict(sim.store.counts), sim.oracle.appends,
                  sim.ops_done, sim.retries,
                  sim.background_errors, virtual_s)


__all__ = ["SimConfig", "Simulation", "Result", "simulate"]
