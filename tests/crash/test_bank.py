"""The Jepsen-style bank under random SIGKILLs of real ``ledgerd node`` processes.

Three owner nodes in one region serve 20 wallets spread over at least four shards (same-shard
and cross-shard transfers both happen). Workers transfer random amounts between random wallets
while a reader reads every balance; meanwhile a seeded fault schedule SIGKILLs a random node
every few seconds and restarts it a moment later, so shards keep changing owners (lease
expiry, takeover, journal replay) under load. Every request is retried with its own
idempotency key on any node until it gets a definitive answer.

Proves, for a run that really had several kills and hundreds of acknowledged transfers:
the replay check (initial balances plus acknowledged transfers equal the final balances,
exactly), no balance ever read below zero, every acknowledged transfer recorded COMMITTED with
its amount, no refused transfer committed on retry, the books balance, and reconciliation of
the keyspace is clean with exactly one commit per acknowledged transfer (and per initial
deposit), judged as if the recovery timeout had already passed.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from clients.bank import BankConfig, BankWorkload
from clients.harness import Deployment
from ledger.core.constants import RECOVERY_TIMEOUT_MS
from ledger.reconcile import reconcile
from shard_router import shard_of
from tests.crash.test_failpoints import start_deployment, start_node

pytestmark = [pytest.mark.real, pytest.mark.timeout(420)]

SHARDS = 16
NODES = 3
WALLETS = 20
SHARDS_SPANNED_MIN = 4
RUN_S = 25.0
RUN_S_MAX = 60.0
FAULT_SEED = 20240211
# A kill every KILL_EVERY_S (uniform), the victim restarted RESTART_AFTER_S later (uniform).
KILL_EVERY_S = (2.0, 4.5)
RESTART_AFTER_S = (0.5, 3.0)
KILLS_MIN = 4
ACKNOWLEDGED_MIN = 200


class FaultSchedule:
    """Seeded SIGKILLs of live nodes, each restarted after a seeded delay. At least one node
    always stays up, so the ledger keeps a place to take shards over."""

    def __init__(self, deployment: Deployment, seed: int) -> None:
        self.deployment = deployment
        self.rng = random.Random(seed)
        self.kills: list[tuple[float, str]] = []
        self.restarts: list[asyncio.Task] = []
        self._restarting: set[str] = set()
        self.failed_starts = 0

    async def run(self, stop: asyncio.Event, t0: float) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.rng.uniform(*KILL_EVERY_S))
                return
            except asyncio.TimeoutError:
                pass
            alive = [n for n in self.deployment.nodes
                     if n.alive and n.node_id not in self._restarting]
            if len(alive) < 2:
                continue
            victim = self.rng.choice(alive)
            delay_s = self.rng.uniform(*RESTART_AFTER_S)
            await asyncio.to_thread(victim.kill)
            self.kills.append((time.monotonic() - t0, victim.node_id))
            self._restarting.add(victim.node_id)
            self.restarts.append(asyncio.create_task(self._restart(victim, delay_s)))

    async def _restart(self, node, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        try:
            self.failed_starts += await asyncio.to_thread(start_node, node)
        finally:
            self._restarting.discard(node.node_id)

    async def finish(self) -> None:
        """Wait for every restart in progress; they must all have succeeded."""
        await asyncio.gather(*self.restarts)
        dead = [n.node_id for n in self.deployment.nodes if not n.alive]
        assert not dead, f"nodes not running after the run: {dead}"


async def test_bank_survives_random_sigkills(local_cluster, keyspaces, tmp_path):
    region = local_cluster.regions[0]
    keyspace = await keyspaces.take({region: 1}, "bank")
    deployment = Deployment(local_cluster, regions=[region], nodes_per_region=NODES,
                            shards=SHARDS, log_dir=tmp_path,
                            keyspace=keyspace.name)
    bank = None
    store = None
    faults = FaultSchedule(deployment, FAULT_SEED)
    try:
        start_deployment(deployment)
        bank = BankWorkload(deployment.addresses, BankConfig(
            wallets=WALLETS, workers=16, readers=2, amount_max=50, prefix="bank", seed=7))
        spanned = {shard_of(w, SHARDS) for w in bank.wallets}
        assert len(spanned) >= SHARDS_SPANNED_MIN, spanned
        await bank.setup()

        stop = asyncio.Event()
        t0 = time.monotonic()
        workload = asyncio.create_task(bank.run(stop))
        chaos = asyncio.create_task(faults.run(stop, t0))
        # The run lasts RUN_S; on a loaded machine it goes on (bounded) until the workload has
        # had enough acknowledged transfers to mean something.
        await asyncio.sleep(RUN_S)  # the length of the run, not a synchronization
        deadline = t0 + RUN_S_MAX
        # A bounded poll of the workload's progress, not a synchronization: no event marks
        # "enough acknowledged transfers", and the deadline caps it.
        while (sum(1 for op in bank.result.ops if op.result == "ok") < ACKNOWLEDGED_MIN  # noqa: ASYNC110
               and time.monotonic() < deadline):
            await asyncio.sleep(0.5)
        stop.set()
        run_s = time.monotonic() - t0
        await asyncio.gather(workload, chaos)
        await faults.finish()

        await bank.settle()
        counts = bank.result.counts()
        problems = await bank.check()
        assert problems == [], problems[:20]
        assert len(faults.kills) >= KILLS_MIN, faults.kills
        assert counts["ok"] >= ACKNOWLEDGED_MIN, counts
        assert counts["unknown"] == 0, counts
        assert bank.result.reads, "the reader never read all balances"
        cross = sum(1 for op in bank.result.ops if op.result == "ok"
                    and shard_of(op.src, SHARDS) != shard_of(op.dst, SHARDS))
        assert cross >= ACKNOWLEDGED_MIN // 2, cross

        from ledger.store.cassandra import CassandraStore
        store = await CassandraStore.connect(**deployment.store_args(), create_schema=False)
        report = await reconcile(store, SHARDS,
                                 now_ms=time.time_ns() // 1_000_000 + RECOVERY_TIMEOUT_MS + 1)
        assert report.clean, report.findings[:20]
        # One commit per initial deposit and per acknowledged transfer: nothing unacknowledged
        # or refused was committed, nothing acknowledged was committed twice.
        assert report.transfers_committed == WALLETS + counts["ok"], (
            report.transfers_committed, counts)
        print(f"bank: {run_s:.0f} s of faults, {counts}, {len(faults.kills)} kills {faults.kills}, "
              f"{len(bank.result.reads)} reads, {cross} cross-shard acknowledged, "
              f"{faults.failed_starts} failed starts")
    finally:
        for task in faults.restarts:
            if not task.done():
                await asyncio.gather(task, return_exceptions=True)
        if bank is not None:
            await bank.close()
        if store is not None:
            await store.close()
        await asyncio.to_thread(deployment.stop)
        await keyspaces.give_back(keyspace)
