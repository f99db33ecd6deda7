"""Journal appends that fail while the process lives on, under cross-shard traffic, on real
``ledgerd node`` processes, Cassandra and etcd: the real-Cassandra regression for defect 1 of
issue 7 (credits left an owner before their debit was durable).

The failpoint kind "fault" of ``ledger.runtime.failpoints`` makes a store call fail without killing
anything:

* ``owner.append_unavailable@<n>+<k>``: the n-th journal append of the process and the k after
  it fail before writing (StoreUnavailable): the owner answers the batch UNAVAILABLE, reloads
  its shard from the journal and serves on;
* ``owner.append_unknown@<n>+<k>``: those appends are written, then reported as an unknown
  outcome (UnknownOutcome): the owner gives the shard up, and the next owner replays the
  journal, which holds the batch.

Two owner nodes of one region serve 16 wallets spread over every shard. Once the bank
workload is set up, one node is restarted with the fault armed and the test waits until each
node owns its half of the shards (rendezvous placement), so credits cross between a faulty
owner and a healthy one. Then the bank workload and a transfer load beside it
(``clients.load``: Transfer and BatchTransfer calls at a few hundred transfers a second on
wallets of its own, so that owners always have commands queued when a batch fails: the
window defect 1 needed) run through both nodes, every request retried with its own key until
answered, until the faults have happened and transfers have been acknowledged after them.
Proves, for each kind:

* the faults really happened (the nodes' logs name each injected fault) and the processes
  lived on (never killed, still serving at the end);
* no money created or lost: final balances equal the initial ones plus the acknowledged
  transfers exactly (the bank's replay check, and the same check on the load's wallets),
  nothing below zero, the books balance;
* every acknowledged transfer is COMMITTED once with its amount and wallets (GetTransfer), and
  reconcile of the keyspace is clean and counts exactly one commit per acknowledged transfer
  and per funding deposit, judged as if the recovery timeout had passed (nothing in doubt).

Against defect 1, measured on the pre-fix owner (e4366be with the fault points wired): the
fault as wired raises before anything is awaited, and then the pre-fix owner passes too (the
credits of the failing batch are not read in the instant before it fails; seen in one run
with 30 faults and two with 10).
With the fault taking as long as a failing append does (``await asyncio.sleep(0.05)`` before
the raise; a CAS timeout resolved as not applied takes seconds) this test failed on the
pre-fix owner (credits left, the receiver applied them, the reloaded sender reused their
outbox numbers: bank and load replay checks off, ``total 159973 != 160000``) and passes on the
fixed one. A single store round trip or a bare yield before the raise was not enough.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

import pytest

from clients.bank import BankConfig, BankWorkload
from clients.chaos import OwnerWatcher
from clients.load import LoadConfig, LoadWorkload
from clients.harness import Deployment
from ledger.core.constants import RECOVERY_TIMEOUT_MS
from ledger.reconcile import reconcile
from shard_router import shard_of
from shard_router.placement import preferred_node
from tests.crash.test_failpoints import start_deployment, start_node

pytestmark = [pytest.mark.real, pytest.mark.timeout(300)]

SHARDS = 8
NODES = 2
WALLETS = 16
PREFIX = "af"  # its 16 wallets span all 8 shards
# The load beside the bank: transfers/s (a quarter as single calls), items per batch call.
LOAD_RATE = 300.0
LOAD_BATCH = 50
LOAD_WALLETS = 64
# The faults start at this append of the restarted process: by then bank and load traffic
# flow steadily (about 10 s of it here), so owners have commands queued when a batch fails.
FAULT_FROM_APPEND = 200
# How long the restarted node may take to get its shards back (s).
PLACEMENT_DEADLINE_S = 60.0
# How long the faults may take to happen, and the workload to acknowledge ACKED_AFTER_MIN
# transfers after the last of them (s).
FAULTS_DEADLINE_S = 90.0
ACKED_AFTER_MIN = 100
POLL_S = 0.2


@dataclass(frozen=True)
class FaultCase:
    failpoint: str
    extra: int  # the n-th append and this many more fail

    @property
    def spec(self) -> str:
        return f"{self.failpoint}@{FAULT_FROM_APPEND}+{self.extra}"

    @property
    def count(self) -> int:
        return self.extra + 1


CASES = [
    # Thirty appends in a row fail before writing: every owner that hits one reloads.
    FaultCase("owner.append_unavailable", 29),
    # Three appends are written but answered as unknown: their owners give their shards up.
    FaultCase("owner.append_unknown", 2),
]


def injected(log_path, failpoint: str) -> int:
    if not log_path.exists():
        return 0
    return len(re.findall(rf"failpoint {re.escape(failpoint)}: injecting a fault",
                          log_path.read_text(errors="replace")))


@pytest.mark.parametrize("case", CASES, ids=[c.failpoint for c in CASES])
async def test_append_faults_under_cross_shard_traffic(local_cluster, keyspaces, tmp_path, case):
    region = local_cluster.regions[0]
    keyspace = await keyspaces.take({region: 1}, "faults")
    deployment = Deployment(local_cluster, regions=[region], nodes_per_region=NODES,
                            shards=SHARDS, log_dir=tmp_path,
                            keyspace=keyspace.name)
    bank = None
    load = None
    store = None
    started = time.monotonic()
    try:
        start_deployment(deployment)
        bank = BankWorkload(deployment.addresses, BankConfig(
            wallets=WALLETS, workers=12, readers=1, amount_max=50, prefix=PREFIX, seed=11))
        assert {shard_of(w, SHARDS) for w in bank.wallets} == set(range(SHARDS))
        load = LoadWorkload(deployment.addresses, LoadConfig(
            rate=LOAD_RATE, single_share=0.25, single_concurrency=16, batch_size=LOAD_BATCH,
            batch_inflight=4, wallets=LOAD_WALLETS, prefix=f"{PREFIX}-load", seed=12))
        await load.setup()
        await bank.setup()

        # Restart one node with the fault armed (it counts its appends from its start; a
        # clean stop gives its shards up at once) and wait until each node owns the shards
        # rendezvous placement gives it: half of them have a faulty owner.
        faulty, healthy = deployment.nodes
        faulty.stop()
        await asyncio.to_thread(start_node, faulty, case.spec)
        want = {s: preferred_node(s, [n.node_id for n in deployment.nodes])
                for s in range(SHARDS)}
        assert {faulty.node_id, healthy.node_id} == set(want.values()), want
        watcher = OwnerWatcher(local_cluster.etcd_endpoint, deployment.prefix, time.monotonic())
        try:
            deadline = time.monotonic() + PLACEMENT_DEADLINE_S
            while True:
                await watcher.poll_once()
                owners = {s: o[0] for s, o in watcher.owners.items()}
                if owners == want:
                    break
                assert time.monotonic() < deadline, (owners, want)
                await asyncio.sleep(POLL_S)
        finally:
            await watcher.stop()
        logs = [tmp_path / f"{node.node_id}.log" for node in deployment.nodes]

        stop = asyncio.Event()
        load.t0 = bank.t0 = time.monotonic()
        workload = asyncio.create_task(bank.run(stop))
        traffic = asyncio.create_task(load.run(stop))
        try:
            # Until the faulty node has had every fault it was armed with, then until enough
            # transfers were acknowledged after that.
            deadline = time.monotonic() + FAULTS_DEADLINE_S
            while injected(logs[0], case.failpoint) < case.count:
                assert time.monotonic() < deadline, (
                    f"faults injected: {[injected(p, case.failpoint) for p in logs]}")
                assert not workload.done() and not traffic.done()
                await asyncio.sleep(POLL_S)
            faults_done = time.monotonic() - bank.t0
            while sum(1 for op in bank.result.ops
                      if op.result == "ok" and op.finished > faults_done) < ACKED_AFTER_MIN:
                assert time.monotonic() < deadline, "too few transfers acknowledged after " \
                                                    "the faults"
                await asyncio.sleep(POLL_S)
        finally:
            stop.set()
            await asyncio.gather(workload, traffic)
        run_s = time.monotonic() - bank.t0

        counts_run = bank.result.counts()
        load_run = load.counts()
        await bank.settle()
        await load.settle()
        problems = await bank.check()
        problems += await load.check()
        counts = bank.result.counts()
        load_counts = load.counts()
        assert problems == [], problems[:20]
        assert counts["unknown"] == 0 and load_counts["unknown"] == 0, (counts, load_counts)
        assert load.lost == [] and load_counts["ok"] > 0, load_counts
        cross = sum(1 for op in bank.result.ops if op.result == "ok"
                    and shard_of(op.src, SHARDS) != shard_of(op.dst, SHARDS))
        assert cross >= ACKED_AFTER_MIN // 2, cross

        # The processes lived on: never killed, still serving, each fault at most as armed.
        faults = [injected(p, case.failpoint) for p in logs]
        assert faults == [case.count, 0], faults
        for node, log_path in zip(deployment.nodes, logs):
            assert node.alive, f"{node.node_id} exited: {node.proc.returncode}"
            assert "killing process" not in log_path.read_text(errors="replace")

        from ledger.store.cassandra import CassandraStore
        store = await CassandraStore.connect(**deployment.store_args(), create_schema=False)
        report = await reconcile(store, SHARDS,
                                 now_ms=time.time_ns() // 1_000_000 + RECOVERY_TIMEOUT_MS + 1)
        assert report.clean, report.findings[:20]
        # One commit per funding deposit and per acknowledged transfer, bank and load.
        assert report.transfers_committed == (WALLETS + counts["ok"] + LOAD_WALLETS
                                              + load_counts["ok"]), (
            report.transfers_committed, counts, load_counts)
        assert report.in_transit.get("CNY", 0) == 0, report.in_transit
        print(f"{case.spec}: faults injected per node {faults}, {run_s:.0f} s of traffic, "
              f"bank run {counts_run} final {counts}, {cross} cross-shard acknowledged, "
              f"load run {load_run} final {load_counts} ({load.settled} settled after), "
              f"test {time.monotonic() - started:.0f} s")
    finally:
        if bank is not None:
            await bank.close()
        if load is not None:
            await load.close()
        if store is not None:
            await store.close()
        await asyncio.to_thread(deployment.stop)
        await keyspaces.give_back(keyspace)
