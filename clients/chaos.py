"""``ledger-chaos``: fault drills of a real deployment under the bank workload (Jepsen style).

    ledger-chaos [SCENARIO ...] [--regions r1,r2,r3] [--seconds N] [--out DIR]
                 [--cassandra-ports CQL[,STORAGE]] [--etcd-ports CLIENT[,PEER]]
                 [--run-dir DIR] [--keep-cluster] [--keep-data] [--seed N]
                 [--nodes-per-region N] [--coordinators N] [--shards N]
                 [--load RATE] [--load-single-share F] [--load-batch N] [--load-wallets N]

Scenarios (default: every one but ``random``):

* ``kill-owner``: SIGKILL a ledger node that owns shards; restart it after the hold.
* ``pause-owner``: SIGSTOP an owner longer than its lease, then SIGCONT. Its shards must be
  taken over under higher epochs while it sleeps; once awake it must neither append (a direct
  append with its old epoch is refused by the journal fence, and no batch of its old epoch
  appears after the takeover) nor answer as owner (its log shows it stepping down).
* ``kill-coordinator``: SIGKILL the coordinator-only node(s) while clients use them.
* ``kill-cassandra-node``: SIGKILL one region's Cassandra node; restart it after the hold.
* ``kill-region``: SIGKILL every process of one region (its ledger nodes and its Cassandra
  node); measures the time from the kill until every shard it owned answers GetWallet again,
  owned by another region, through a surviving node.
* ``restart-etcd``: stop etcd longer than a lease, start it again.
* ``random``: a seeded mix of three of the above, one after the other.

Each scenario starts a fresh ``Deployment`` (its own keyspace and etcd prefix) on the running
``LocalCluster`` (started here unless one is running in ``--run-dir``), runs the bank workload
through every node, warms up, injects its fault while the workload runs, heals (restarts what
was killed), waits until every shard is served again, keeps the workload running for a
recovery window, then settles every unanswered request, runs the bank's replay check, checks
that writer epochs never go back in any journal, and reconciles the store.

With ``--load RATE`` a transfer load (``clients.load``) runs beside the bank on wallets of its
own: concurrent ``Transfer`` calls and ``BatchTransfer`` calls at RATE transfers a second
together (``--load-single-share`` of it as single calls), every request resent with its key
until answered. After the run every acknowledged load transfer is read back with
``GetTransfer`` (COMMITTED, its amount and wallets: otherwise it is *lost*), the load's
wallets must hold their initial balances plus the acknowledged transfers, and reconcile must
count exactly one commit per funding deposit and acknowledged transfer (bank and load: nothing
committed twice, nothing committed that was refused). Per fault window the report gives the
load's acknowledged transfers during the window, how many of them are lost (must be 0), and
the longest gap without an acknowledged transfer.

Verdict: PASS iff the bank check found no problem (no acknowledged transfer lost, none applied
twice, nothing left unanswered), reconcile is clean, the journals are fenced, and the fault was
observed to happen. Output in ``--out``: ``report.json`` (per scenario: verdict, fault windows,
counts, measured failover/recovery times, problems, reconcile summary) and ``chaos.html`` (one
self-contained page, inline SVG: acknowledged transfers per second and latency p50/p99 per
second, fault windows shaded), plus the nodes' logs. Exit code 0 iff every scenario passed.

Library use (tests): ``await run_drills(cluster, ["kill-owner"], DrillConfig(out_dir=...))``
on an already running cluster; every Cassandra node and etcd it stopped is running again when
it returns.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import inspect
import json
import math
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clients.bank import BankConfig, BankWorkload
from clients.harness import Deployment, NodeProcess
from clients.ledger_client import LedgerClient, LedgerError
from clients.load import LoadConfig, LoadWorkload
from shard_router.hashing import shard_of

SCENARIOS = ("kill-owner", "pause-owner", "kill-coordinator", "kill-cassandra-node",
             "kill-region", "restart-etcd")
ALL_SCENARIOS = SCENARIOS + ("random",)

# --- Limits and timings (each with its unit) ------------------------------------------------

# Failover target of a whole region (s), with lease 3 s and grace 1 s. Reported, not a verdict:
# a loaded 2-core machine can miss it without anything being wrong.
FAILOVER_TARGET_S = 10.0
# How long a drill waits for shards to be served again before it reports a problem (s).
SERVED_TIMEOUT_S = 90.0
# Poll period of the served-again probe and of the etcd owner watcher (s).
PROBE_PERIOD_S = 0.2
WATCH_PERIOD_S = 0.2
# Deadline of one probe GetWallet (s): short, so a dead target does not hide recovery.
PROBE_CALL_TIMEOUT_S = 1.5
# The workload keeps running at least this long after everything is served again (s).
RECOVERY_MIN_S = 5.0
# Faults of ``random``.
RANDOM_STEPS = 3
RANDOM_GAP_S = 3.0
# Time bound of settle + check (s).
SETTLE_TIMEOUT_S = 120.0
# A killed ledger node is started again until it serves, for at most this long (s), with
# this pause between attempts (s): ``ledgerd node`` exits when its Cassandra node cannot be
# reached, which happens for a while after that node restarted on a loaded machine.
NODE_RESTART_TIMEOUT_S = 240.0
NODE_RESTART_PAUSE_S = 2.0
# Log lines of a paused owner that show it stepping down (or, if it did, appending).
STEP_DOWN_RE = re.compile(r"stops serving|gives up|lost shard|Fenced|lease no longer valid|"
                          r"keep-alives late|append failed")


@dataclass
class DrillConfig:
    """What every scenario of a run uses."""

    out_dir: Path = Path("chaos-out")
    seconds: float = 30.0            # workload time per scenario (warm-up included), at least
    warmup_s: float = 5.0
    hold_s: float | None = None      # how long a fault lasts; default seconds / 3
    nodes_per_region: int = 1
    coordinators: int = 1            # coordinator-only nodes, spread over the regions
    shards: int = 16
    lease_ttl_s: float = 3.0
    takeover_grace_s: float = 1.0
    wallets: int = 24
    workers: int = 8
    seed: int = 1
    keep_data: bool = False          # keep a passed drill's keyspace (failed ones are kept)
    # Transfer load beside the bank (clients.load); 0 = none.
    load_rate: float = 0.0           # transfers/s, Transfer + BatchTransfer items together
    load_single_share: float = 0.2   # share of load_rate sent as single Transfer calls
    load_single_concurrency: int = 32
    load_batch: int = 200            # items per BatchTransfer call
    load_batch_inflight: int = 4
    load_wallets: int = 256

    @property
    def fault_hold_s(self) -> float:
        return self.hold_s if self.hold_s is not None else max(5.0, self.seconds / 3)


@dataclass
class FaultWindow:
    fault: str
    target: str
    start_s: float             # seconds since the workload's t0
    end_s: float | None = None
    notes: dict = field(default_factory=dict)


@dataclass
class ScenarioReport:
    name: str
    verdict: str = "FAIL"
    deployment: dict = field(default_factory=dict)
    windows: list[FaultWindow] = field(default_factory=list)
    counts_run: dict = field(default_factory=dict)     # at the end of the run
    counts_final: dict = field(default_factory=dict)   # after settle
    measured: dict = field(default_factory=dict)
    evidence: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    reconcile: dict = field(default_factory=dict)
    ownership_changes: list = field(default_factory=list)
    series: dict = field(default_factory=dict)         # per-second figures (see _series)
    duration_s: float = 0.0
    ops_plot: list = field(default_factory=list)       # (started, finished, result), for the picture
    load: dict = field(default_factory=dict)           # the transfer load's figures (--load)
    load_plot: list = field(default_factory=list)      # (started, finished, result) of load ops

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("ops_plot")
        out.pop("load_plot")
        return out


@dataclass
class RunReport:
    scenarios: list[ScenarioReport]
    config: dict
    commit_path: dict
    started_at: str
    git_commit: str
    report_path: Path | None = None
    html_path: Path | None = None

    @property
    def passed(self) -> bool:
        return all(s.verdict == "PASS" for s in self.scenarios)


# ---------------------------------------------------------------------------------------------
# Observation: etcd owners, probes.
# ---------------------------------------------------------------------------------------------


class OwnerWatcher:
    """Polls the deployment's owner keys in etcd; keeps the current owners and every change.

    Polling (not a watch) keeps this independent of the code under test and survives etcd
    restarts: an unreachable etcd is recorded as such and polling goes on.
    """

    def __init__(self, endpoint: str, prefix: str, t0: float) -> None:
        import pyetcd

        host, _, port = endpoint.rpartition(":")
        self._client = pyetcd.MultiEndpointEtcd3Client(
            endpoints=[pyetcd.Endpoint(host or "127.0.0.1", int(port), secure=False,
                                       time_retry=0.0)], timeout=2.0)
        self._root = prefix.rstrip("/") + "/owner/"
        self.t0 = t0
        self.owners: dict[int, tuple[str, str, int]] = {}  # shard -> (node, region, epoch)
        self.changes: list[tuple[float, int, str | None, str | None, int]] = []
        self.unreachable: list[float] = []
        self._task: asyncio.Task | None = None

    def _read(self) -> dict[int, tuple[str, str, int]]:
        response = self._client.get_prefix_response(self._root)
        out = {}
        for kv in response.kvs:
            shard = int(kv.key.decode().rsplit("/", 1)[1])
            doc = json.loads(kv.value)
            out[shard] = (str(doc["node_id"]), str(doc.get("region", "")), kv.create_revision)
        return out

    async def poll_once(self) -> None:
        try:
            now_owners = await asyncio.to_thread(self._read)
        except Exception:  # etcd away (restart drill) or slow: note it, poll again
            self.unreachable.append(time.monotonic() - self.t0)
            return
        t = time.monotonic() - self.t0
        for shard in sorted(set(now_owners) | set(self.owners)):
            old, new = self.owners.get(shard), now_owners.get(shard)
            if old != new:
                self.changes.append((round(t, 3), shard, new[0] if new else None,
                                     new[1] if new else None, new[2] if new else 0))
        self.owners = now_owners

    async def _loop(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(WATCH_PERIOD_S)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="chaos-owner-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        try:
            self._client.close()
        except Exception:  # closing a channel that failed may raise; nothing to do
            pass

    def shards_of(self, node_id: str) -> dict[int, int]:
        return {s: epoch for s, (node, _, epoch) in self.owners.items() if node == node_id}


def probe_wallets(shards: int) -> dict[int, str]:
    """One wallet id per shard (read with GetWallet to tell whether the shard is served)."""
    out: dict[int, str] = {}
    i = 0
    while len(out) < shards:
        wallet = f"probe-{i}"
        out.setdefault(shard_of(wallet, shards), wallet)
        i += 1
    return out


# ---------------------------------------------------------------------------------------------
# One scenario.
# ---------------------------------------------------------------------------------------------


class Drill:
    """A deployment under the bank workload, faults injected into it, and what was seen."""

    def __init__(self, cluster, name: str, config: DrillConfig, rng: random.Random) -> None:
        self.cluster = cluster
        self.name = name
        self.config = config
        self.rng = rng
        self.regions = list(cluster.regions)
        self.report = ScenarioReport(name)
        self.log_dir = config.out_dir / "logs" / name
        if self.log_dir.exists():
            shutil.rmtree(self.log_dir, ignore_errors=True)
        self.deployment = Deployment(
            cluster, self.regions, nodes_per_region=config.nodes_per_region,
            shards=config.shards, lease_ttl_s=config.lease_ttl_s,
            takeover_grace_s=config.takeover_grace_s, log_dir=self.log_dir,
            coordinators_per_region=1 if config.coordinators else 0)
        # Deployment places coordinators per region; keep the first ``coordinators`` of them,
        # spread over the regions.
        kept = self.deployment.coordinators[:config.coordinators]
        self.deployment.nodes = [n for n in self.deployment.nodes
                                 if n.role == "full" or n in kept]
        self.workload: BankWorkload | None = None
        self.load: LoadWorkload | None = None
        self.watcher: OwnerWatcher | None = None
        self.probes = probe_wallets(config.shards)
        self._probe_clients: dict[str, LedgerClient] = {}
        self._cassandra_down: set[str] = set()
        self._etcd_down = False
        self._probe_turn = 0
        self._pause_check: tuple[dict[int, int], dict[int, int]] | None = None

    # -- helpers -----------------------------------------------------------------------------

    def t(self) -> float:
        assert self.workload is not None
        return round(time.monotonic() - self.workload.t0, 3)

    def problem(self, text: str) -> None:
        self.report.problems.append(f"{self.name}: {text}")

    def _client(self, node: NodeProcess) -> LedgerClient:
        client = self._probe_clients.get(node.address)
        if client is None:
            client = LedgerClient(node.address, caller="chaos-probe",
                                  timeout_s=PROBE_CALL_TIMEOUT_S, retries=False)
            self._probe_clients[node.address] = client
        return client

    def live_nodes(self, exclude: frozenset[str] | set[str] = frozenset()) -> list[NodeProcess]:
        return [n for n in self.deployment.nodes if n.alive and n.node_id not in exclude
                and n.region not in self._cassandra_down]

    async def _probe(self, node: NodeProcess, shard: int) -> bool:
        try:
            await self._client(node).get_wallet(self.probes[shard])
            return True
        except (LedgerError, Exception):
            return False

    async def wait_served(self, shards: list[int], *, since: float,
                          exclude_nodes: frozenset[str] | set[str] = frozenset(),
                          exclude_regions: frozenset[str] | set[str] = frozenset(),
                          epochs_above: dict[int, int] | None = None,
                          want_regions: dict[int, str] | None = None,
                          timeout_s: float = SERVED_TIMEOUT_S) -> dict:
        """Wait until every shard answers GetWallet through a surviving node while etcd shows
        an owner outside ``exclude_nodes``/``exclude_regions`` (with a higher epoch than in
        ``epochs_above``). Returns when each shard was first seen so, and the slowest."""
        assert self.watcher is not None
        served: dict[int, float] = {}
        owners: dict[int, list] = {}
        deadline = time.monotonic() + timeout_s
        pending = list(shards)
        while pending and time.monotonic() < deadline:
            await self.watcher.poll_once()
            via = [n for n in self.live_nodes(exclude_nodes)
                   if n.region not in exclude_regions]
            if not via:
                await asyncio.sleep(PROBE_PERIOD_S)
                continue
            ready = []
            for shard in pending:
                owner = self.watcher.owners.get(shard)
                if owner is None or owner[0] in exclude_nodes or owner[1] in exclude_regions:
                    continue
                if epochs_above and owner[2] <= epochs_above.get(shard, 0):
                    continue
                if want_regions and owner[1] != want_regions.get(shard, owner[1]):
                    continue
                ready.append((shard, owner))
            if ready:
                # Round robin over the surviving nodes (not the seeded rng: the faults'
                # targets must not depend on how many probe rounds ran).
                self._probe_turn += 1
                node = via[self._probe_turn % len(via)]
                oks = await asyncio.gather(*(self._probe(node, s) for s, _ in ready))
                now = self.t()
                for (shard, owner), ok in zip(ready, oks):
                    if ok:
                        served[shard] = now
                        owners[shard] = list(owner)
                pending = [s for s in pending if s not in served]
            if pending:
                await asyncio.sleep(PROBE_PERIOD_S)
        return {"served_at": served, "owners": owners, "pending": pending,
                "slowest_s": (round(max(served.values()) - since, 3)
                              if served and not pending else None)}

    async def wait_all_served(self, since: float, what: str) -> float | None:
        result = await self.wait_served(list(range(self.config.shards)), since=since)
        if result["pending"]:
            self.problem(f"{what}: shards {result['pending']} not served again within "
                         f"{SERVED_TIMEOUT_S:.0f} s")
            return None
        return result["slowest_s"]

    async def restore_homes(self, since: float, what: str) -> float | None:
        """Put every shard's home back to its default region and wait until a node of that
        region serves it: ``ledgerctl failback`` for every region at once.

        Failovers are sticky (a region that takes shards over becomes their home until an
        operator moves them back), and ``Deployment.start`` starts one node before the others,
        which then takes every shard over; each drill starts from, and after a heal returns
        to, the default placement (shard s homed in regions[s % len(regions)]).
        """
        from shard_router.etcd import EtcdOwnership, default_home

        homes = {s: default_home(s, self.regions) for s in range(self.config.shards)}
        view = EtcdOwnership(self.cluster.etcd_endpoint, f"chaos-view-{id(self)}", "-", "",
                             self.regions, shard_count=self.config.shards,
                             prefix=self.deployment.prefix, campaign=False)

        async def ignore(shard: int, epoch: int) -> None:
            return None

        await view.start(ignore)
        try:
            mapping = {p.shard: homes[p.shard] for p in view.placements()
                       if p.home_region != homes[p.shard]}
            if mapping:
                await view.set_homes(mapping)
        finally:
            await view.close()
        result = await self.wait_served(list(homes), since=since, want_regions=homes)
        if result["pending"]:
            self.problem(f"{what}: shards {result['pending']} not back in their home regions "
                         f"within {SERVED_TIMEOUT_S:.0f} s")
            return None
        return result["slowest_s"]

    def owners_now(self) -> dict[str, dict[int, int]]:
        assert self.watcher is not None
        out: dict[str, dict[int, int]] = {}
        for shard, (node, _, epoch) in self.watcher.owners.items():
            out.setdefault(node, {})[shard] = epoch
        return out

    def pick_owner(self) -> tuple[NodeProcess, dict[int, int]]:
        owned = self.owners_now()
        candidates = [n for n in self.deployment.owners if n.alive and owned.get(n.node_id)]
        if not candidates:
            raise RuntimeError("no live node owns a shard")
        node = self.rng.choice(candidates)
        return node, dict(owned[node.node_id])

    def open_window(self, fault: str, target: str, **notes) -> FaultWindow:
        window = FaultWindow(fault, target, self.t(), notes=notes)
        self.report.windows.append(window)
        return window

    # -- faults ------------------------------------------------------------------------------

    async def fault_kill_owner(self) -> None:
        node, shards = self.pick_owner()
        window = self.open_window("kill-owner", node.node_id, shards=sorted(shards),
                                  epochs_before={str(s): e for s, e in shards.items()})
        node.kill()
        served = await self.wait_served(sorted(shards), since=window.start_s,
                                        exclude_nodes={node.node_id}, epochs_above=shards)
        self._record_failover(window, served, "failover_s")
        await self._hold_until(window.start_s + self.config.fault_hold_s)
        await self.restart_node(node, window)
        window.end_s = self.t()
        window.notes["restart_s"] = round(window.end_s - (window.start_s
                                                          + self.config.fault_hold_s), 3)

    async def fault_pause_owner(self) -> None:
        node, shards = self.pick_owner()
        log_path = self.log_dir / f"{node.node_id}.log"
        window = self.open_window("pause-owner", node.node_id, shards=sorted(shards),
                                  epochs_before={str(s): e for s, e in shards.items()})
        node.pause()
        served = await self.wait_served(sorted(shards), since=window.start_s,
                                        exclude_nodes={node.node_id}, epochs_above=shards)
        self._record_failover(window, served, "failover_s")
        # Paused at least a lease plus a grace period plus slack, so its lease is surely gone.
        pause_min_s = self.config.lease_ttl_s + self.config.takeover_grace_s + 2.0
        await self._hold_until(window.start_s + max(pause_min_s, self.config.fault_hold_s))
        old_batches = await self._batches_by_epoch(shards)
        log_offset = log_path.stat().st_size if log_path.exists() else 0
        node.resume()
        window.end_s = self.t()
        # Give the woken node time to notice (watchdog, lease check, fenced appends).
        await asyncio.sleep(self.config.lease_ttl_s)
        assert self.watcher is not None
        await self.watcher.poll_once()
        after = self.watcher.shards_of(node.node_id)
        stale = {s: e for s, e in after.items() if s in shards and e <= shards[s]}
        lines = []
        if log_path.exists():
            # The node's own log, read once after the pause window: a short local read that the
            # drill's timing does not depend on, so a worker thread would buy nothing.
            with open(log_path, errors="replace") as f:  # noqa: ASYNC230
                f.seek(log_offset)
                lines = [ln.rstrip() for ln in f if STEP_DOWN_RE.search(ln)]
        probe = await self._stale_append_probe(shards)
        evidence = {
            "paused_node": node.node_id, "paused_s": round(window.end_s - window.start_s, 3),
            "epochs_before": {str(s): e for s, e in shards.items()},
            "owners_while_paused": {str(s): o for s, o in served["owners"].items()},
            "epochs_changed": (not served["pending"]
                               and all(served["owners"][s][2] > e for s, e in shards.items())),
            "old_epoch_batches_at_resume": {str(s): n for s, n in old_batches.items()},
            "owns_after_resume": {str(s): e for s, e in after.items()},
            # Every shard the node owned when paused, and who owns it once it is awake.
            "owners_after_resume": {str(s): list(self.watcher.owners[s]) if s in
                                    self.watcher.owners else None for s in sorted(shards)},
            "log_after_resume": lines[:40],
            "stale_append_probe": probe,
        }
        self.report.evidence["pause-owner"] = evidence
        self._pause_check = (shards, old_batches)
        if not evidence["epochs_changed"]:
            self.problem("paused owner's shards were not taken over with higher epochs")
        if stale:
            self.problem(f"after resume the paused node still holds old epochs {stale}")
        if not probe.get("refused"):
            self.problem(f"an append with the paused owner's old epoch was not refused: {probe}")

    async def _batches_by_epoch(self, shards: dict[int, int]) -> dict[int, int]:
        """Per shard: journal batches written by the given (old) epoch."""
        store = await self._store()
        try:
            out = {}
            for shard, epoch in shards.items():
                batches = await self._read_all(store, shard)
                out[shard] = sum(1 for b in batches if b.epoch == epoch)
            return out
        finally:
            await store.close()

    async def _stale_append_probe(self, shards: dict[int, int]) -> dict:
        """Append an empty batch to a former shard with the paused owner's old epoch: this is
        what its stale write looks like to the journal, and the fence must refuse it."""
        from ledger.core import codec
        from ledger.store.port import Fenced

        shard, epoch = sorted(shards.items())[0]
        store = await self._store()
        try:
            batches = await self._read_all(store, shard)
            seq = (batches[-1].seq if batches else 0) + 1
            try:
                await store.append(shard, epoch, seq, codec.dumps([]), [])
            except Fenced as exc:
                return {"shard": shard, "epoch": epoch, "seq": seq, "refused": True,
                        "error": str(exc)}
            except Exception as exc:  # unreachable store etc.: not a proof either way
                return {"shard": shard, "epoch": epoch, "seq": seq, "refused": False,
                        "error": f"{type(exc).__name__}: {exc}"}
            return {"shard": shard, "epoch": epoch, "seq": seq, "refused": False,
                    "error": "APPLIED: the stale epoch could append"}
        finally:
            await store.close()

    async def fault_kill_coordinator(self) -> None:
        victims = [n for n in self.deployment.coordinators if n.alive]
        if not victims:
            self.problem("kill-coordinator: no coordinator-only node in this deployment")
            return
        window = self.open_window("kill-coordinator", ",".join(n.node_id for n in victims))
        for node in victims:
            node.kill()
        await self._hold_until(window.start_s + self.config.fault_hold_s)
        for node in victims:
            await self.restart_node(node, window)
        window.end_s = self.t()

    async def fault_kill_cassandra_node(self, region: str | None = None) -> None:
        region = region or self.rng.choice(self.regions)
        owned = self.owners_now()
        shards = {s: e for n in self.deployment.in_region(region)
                  for s, e in owned.get(n.node_id, {}).items()}
        window = self.open_window("kill-cassandra-node", f"cassandra-{region}",
                                  shards=sorted(shards))
        self._cassandra_down.add(region)
        await asyncio.to_thread(self.cluster.kill_region, region)
        await self._hold_until(window.start_s + self.config.fault_hold_s)
        # Which of the region's shards were served during the fault, and by whom.
        served = await self.wait_served(sorted(shards), since=window.start_s, timeout_s=1.0)
        window.notes["served_during_fault"] = sorted(served["served_at"])
        restart_at = self.t()
        await asyncio.to_thread(self.cluster.start_region, region)
        self._cassandra_down.discard(region)
        window.end_s = self.t()
        window.notes["cassandra_restart_s"] = round(window.end_s - restart_at, 3)

    async def fault_kill_region(self, region: str | None = None) -> None:
        region = region or self.rng.choice(self.regions)
        nodes = [n for n in self.deployment.in_region(region) if n.alive]
        owned = self.owners_now()
        shards = {s: e for n in nodes for s, e in owned.get(n.node_id, {}).items()}
        window = self.open_window("kill-region", region, nodes=[n.node_id for n in nodes],
                                  shards=sorted(shards))
        for node in nodes:
            node.kill()
        self._cassandra_down.add(region)
        await asyncio.to_thread(self.cluster.kill_region, region)
        window.notes["kill_took_s"] = round(self.t() - window.start_s, 3)
        served = await self.wait_served(sorted(shards), since=window.start_s,
                                        exclude_regions={region}, epochs_above=shards)
        self._record_failover(window, served, "failover_s")
        self.report.evidence["kill-region"] = {
            "region": region, "shards": sorted(shards),
            "owners_during_fault": {str(s): o for s, o in served["owners"].items()},
            "served_elsewhere": (not served["pending"] and bool(shards) and all(
                o[1] != region for o in served["owners"].values())),
        }
        if not shards:
            self.problem(f"kill-region: region {region} owned no shard when killed")
        await self._hold_until(window.start_s + self.config.fault_hold_s)
        heal_at = self.t()
        await asyncio.to_thread(self.cluster.start_region, region)
        self._cassandra_down.discard(region)
        window.notes["cassandra_restart_s"] = round(self.t() - heal_at, 3)
        for node in nodes:
            await self.restart_node(node, window)
        window.end_s = self.t()
        window.notes["heal_s"] = round(window.end_s - heal_at, 3)

    async def fault_restart_etcd(self) -> None:
        window = self.open_window("restart-etcd", "etcd")
        self._etcd_down = True
        await asyncio.to_thread(self.cluster.stop_etcd)
        # Down longer than a lease: every node must notice it lost its shards.
        await self._hold_until(window.start_s + max(self.config.lease_ttl_s + 2.0,
                                                    min(self.config.fault_hold_s, 8.0)))
        await asyncio.to_thread(self.cluster.start_etcd)
        self._etcd_down = False
        window.end_s = self.t()
        recovered = await self.wait_all_served(window.end_s, "restart-etcd")
        window.notes["recovery_after_start_s"] = recovered
        if recovered is not None:
            self.report.measured.setdefault("recovery_s", []).append(recovered)

    async def restart_node(self, node: NodeProcess, window: FaultWindow) -> None:
        """Start a killed node again, as a supervisor would: a node whose Cassandra is not
        reachable yet (just restarted, machine loaded) exits at once, so try a few times."""
        deadline = time.monotonic() + NODE_RESTART_TIMEOUT_S
        attempt = 0
        while True:
            attempt += 1
            try:
                await asyncio.to_thread(node.start)
                return
            except RuntimeError as exc:
                window.notes.setdefault("restart_failures", []).append(
                    f"{node.node_id} attempt {attempt} at {self.t():.1f} s: {exc}")
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(NODE_RESTART_PAUSE_S)

    def _record_failover(self, window: FaultWindow, served: dict, key: str) -> None:
        window.notes["served_again_s"] = served["slowest_s"]
        window.notes["owners_during_fault"] = {str(s): o for s, o in served["owners"].items()}
        if served["pending"]:
            self.problem(f"{window.fault} {window.target}: shards {served['pending']} not "
                         f"served elsewhere within {SERVED_TIMEOUT_S:.0f} s")
        else:
            self.report.measured.setdefault(key, []).append(served["slowest_s"])

    async def _hold_until(self, t_s: float) -> None:
        remaining = t_s - self.t()
        if remaining > 0:
            await asyncio.sleep(remaining)

    # -- the run -----------------------------------------------------------------------------

    async def _store(self):
        from ledger.store.cassandra import CassandraStore

        region = next((r for r in self.regions if r not in self._cassandra_down),
                      self.regions[0])
        return await CassandraStore.connect(
            [self.cluster.contact_points[r] for r in self.regions
             if r not in self._cassandra_down],
            port=self.cluster.cql_port, local_dc=region, keyspace=self.deployment.keyspace,
            create_schema=False, require_region_survival=len(self.regions) > 1)

    @staticmethod
    async def _read_all(store, shard: int) -> list:
        out: list = []
        after = 0
        while True:
            page = await store.read_journal(shard, after, 500)
            out.extend(page)
            if len(page) < 500:
                return out
            after = page[-1].seq

    async def run(self, steps: list[str]) -> ScenarioReport:
        config, report = self.config, self.report
        started = time.monotonic()
        report.deployment = {
            "name": self.deployment.name, "keyspace": self.deployment.keyspace,
            "regions": self.regions, "shards": config.shards,
            "nodes": [{"id": n.node_id, "region": n.region, "role": n.role,
                       "address": n.address} for n in self.deployment.nodes],
            "lease_ttl_s": config.lease_ttl_s, "takeover_grace_s": config.takeover_grace_s,
            "steps": steps,
        }
        try:
            await asyncio.to_thread(self.deployment.start)
            self.workload = BankWorkload(
                self.deployment.addresses,
                BankConfig(wallets=config.wallets, workers=config.workers,
                           seed=self.rng.randrange(1 << 30), prefix=f"bank-{self.name}"),
                caller="chaos")
            for wallet in self.probes.values():
                await self.workload.client.call(lambda c, w=wallet: c.create_wallet(
                    w, "CNY", idempotency_key=f"create-{w}"))
            self.watcher = OwnerWatcher(self.cluster.etcd_endpoint, self.deployment.prefix,
                                        self.workload.t0)
            await self.watcher.poll_once()
            self.watcher.start()
            placed = await self.restore_homes(0.0, "initial placement")
            report.measured["initial_placement_s"] = placed
            if config.load_rate > 0:
                self.load = LoadWorkload(self.deployment.addresses, LoadConfig(
                    rate=config.load_rate, single_share=config.load_single_share,
                    single_concurrency=config.load_single_concurrency,
                    batch_size=config.load_batch, batch_inflight=config.load_batch_inflight,
                    wallets=config.load_wallets, prefix=f"load-{self.name}",
                    seed=self.rng.randrange(1 << 30)), caller="chaos-load")
                await self.load.setup()
            await self.workload.setup()
            if self.load is not None:
                self.load.t0 = self.workload.t0  # one clock for the report
            # Times of the report count from the workload's start; what happened before it
            # (deployment start, initial placement) has negative times.
            shift = self.workload.t0 - self.watcher.t0
            self.watcher.t0 = self.workload.t0
            self.watcher.changes = [(round(c[0] - shift, 3), *c[1:])
                                    for c in self.watcher.changes]
            stop = asyncio.Event()
            load = asyncio.create_task(self.workload.run(stop))
            traffic = (asyncio.create_task(self.load.run(stop)) if self.load is not None
                       else None)
            try:
                await self._hold_until(config.warmup_s)
                for i, step in enumerate(steps):
                    if i:
                        await asyncio.sleep(RANDOM_GAP_S)
                    await getattr(self, "fault_" + step.replace("-", "_"))()
                    healed_at = self.t()
                    healed = await self.wait_all_served(healed_at, f"after {step}")
                    report.measured.setdefault("all_served_after_heal_s", []).append(healed)
                    # Failback (an operator's `ledgerctl failback`): timed from the heal.
                    window = self.open_window("failback", "default homes")
                    back = await self.restore_homes(healed_at, f"failback after {step}")
                    window.end_s = self.t()
                    report.measured.setdefault("failback_s", []).append(back)
                await self._hold_until(max(config.seconds, self.t() + RECOVERY_MIN_S))
            finally:
                stop.set()
                await load
                if traffic is not None:
                    await traffic
                report.counts_run = self.workload.result.counts()
                report.ops_plot = [(op.started, op.finished, op.result)
                                   for op in self.workload.result.ops]
                if self.load is not None:
                    report.load["counts_run"] = self.load.counts()
            await self.workload.settle(timeout_s=SETTLE_TIMEOUT_S)
            report.problems.extend(await self.workload.check())
            report.counts_final = self.workload.result.counts()
            if self.load is not None:
                await self.load.settle(timeout_s=SETTLE_TIMEOUT_S)
                report.problems.extend(f"{self.name}: {p}" for p in await self.load.check())
            await self._verify_store()
        except Exception as exc:
            report.problems.append(f"{self.name}: drill error {type(exc).__name__}: {exc}")
            for window in report.windows:
                if window.end_s is None and self.workload is not None:
                    window.end_s = self.t()
        finally:
            await self._teardown()
        if report.reconcile.get("clean") and not report.problems and not self.config.keep_data:
            await self._drop_keyspace()
        report.duration_s = round(time.monotonic() - started, 1)
        if self.watcher is not None:
            report.ownership_changes = [list(c) for c in self.watcher.changes]
        report.series = _series(report.ops_plot)
        if self.load is not None:
            report.load_plot = [(op.started, op.finished, op.result) for op in self.load.ops]
            report.load.update(self.load.figures())
            report.load["series"] = _series(report.load_plot)
        self._summarize()
        report.verdict = "PASS" if not report.problems and report.reconcile.get("clean") \
            else "FAIL"
        return report

    async def _verify_store(self) -> None:
        """Reconcile, check that epochs never go back along any journal, and (pause-owner)
        that the paused owner's old epoch appended nothing after it was taken over."""
        from ledger.reconcile import reconcile

        store = await self._store()
        try:
            result = await reconcile(store, self.config.shards)
            self.report.reconcile = result.to_json()
            if not result.clean:
                self.problem(f"reconcile found {len(result.findings)} findings")
            # Exactly once, counted by the store: one commit per funding deposit and per
            # acknowledged transfer, and nothing else (every request was answered by now).
            assert self.workload is not None
            expected = len(self.workload.wallets) + self.workload.result.counts()["ok"]
            if self.load is not None:
                expected += len(self.load.wallets) + self.load.counts()["ok"]
            self.report.evidence["commits_expected"] = expected
            self.report.evidence["commits_in_journals"] = result.transfers_committed
            if result.transfers_committed != expected:
                self.problem(f"the journals hold {result.transfers_committed} committed "
                             f"transfers, the acknowledged ones (and funding deposits) are "
                             f"{expected}")
            fenced = True
            for shard in range(self.config.shards):
                batches = await self._read_all(store, shard)
                epochs = [b.epoch for b in batches]
                if any(b < a for a, b in zip(epochs, epochs[1:])):
                    fenced = False
                    self.problem(f"shard {shard}: writer epochs go back along the journal")
            self.report.evidence["journal_epochs_monotonic"] = fenced
            if self._pause_check is not None:
                shards, at_resume = self._pause_check
                late = 0
                for shard, epoch in shards.items():
                    batches = await self._read_all(store, shard)
                    now = sum(1 for b in batches if b.epoch == epoch)
                    if now != at_resume[shard]:
                        late += now - at_resume[shard]
                        self.problem(f"shard {shard}: old epoch {epoch} appended "
                                     f"{now - at_resume[shard]} batches after resume")
                self.report.evidence["pause-owner"]["old_epoch_appends_after_resume"] = late
        finally:
            await store.close()

    async def _teardown(self) -> None:
        if self.watcher is not None:
            await self.watcher.stop()
        if self.workload is not None:
            await self.workload.close()
        if self.load is not None:
            await self.load.close()
        for client in self._probe_clients.values():
            await client.close()
        await asyncio.to_thread(self.deployment.stop)
        # Leave the cluster as it was found: every Cassandra node and etcd serving.
        await asyncio.to_thread(self.cluster.start)
        self._cassandra_down.clear()

    async def _drop_keyspace(self) -> None:
        """Drop a passed drill's keyspace: every keyspace adds tables that a restarting
        Cassandra node opens, so a long-lived cluster would restart slower and slower."""
        from ledger.localcluster import cql_query

        try:
            await asyncio.to_thread(cql_query, self.cluster.contact_points[self.regions[0]],
                                    self.cluster.cql_port,
                                    f"DROP KEYSPACE IF EXISTS {self.deployment.keyspace}",
                                    60.0)
        except Exception as exc:  # best effort: a leftover keyspace harms nothing
            self.report.evidence["keyspace_drop_failed"] = f"{type(exc).__name__}: {exc}"

    def _summarize(self) -> None:
        report = self.report
        for key, values in list(report.measured.items()):
            if isinstance(values, list):
                values = [v for v in values if v is not None]
                report.measured[key] = {"each": values,
                                        "max": max(values) if values else None}
        failover = report.measured.get("failover_s")
        if failover and failover["max"] is not None:
            report.measured["failover_target_s"] = FAILOVER_TARGET_S
            report.measured["failover_within_target"] = failover["max"] <= FAILOVER_TARGET_S
        lost_bank = set(self.workload.result.lost) if self.workload is not None else set()
        report.measured["lost"] = len(lost_bank) + (len(self.load.lost) if self.load else 0)
        for window in report.windows:
            end = window.end_s if window.end_s is not None else window.start_s
            window.notes["ack_gap_max_s"] = _ack_gap(report.ops_plot, window.start_s,
                                                     end + RECOVERY_MIN_S)
            if self.workload is not None:
                window.notes["lost"] = sum(
                    1 for op in self.workload.result.ops if op.key in lost_bank
                    and window.start_s <= op.finished <= end)
            if self.load is not None:
                lost = set(self.load.lost)
                acked = [op for op in self.load.ops
                         if op.result == "ok" and window.start_s <= op.finished <= end]
                window.notes["load_acked"] = len(acked)
                window.notes["load_lost"] = sum(1 for op in acked if op.key in lost)
                window.notes["lost"] += window.notes["load_lost"]
                window.notes["load_ack_gap_max_s"] = _ack_gap(
                    report.load_plot, window.start_s, end + RECOVERY_MIN_S)
                window.notes["any_ack_gap_max_s"] = _ack_gap(
                    report.ops_plot + report.load_plot, window.start_s, end + RECOVERY_MIN_S)
            lat = sorted((f - s) * 1000 for s, f, r in report.ops_plot
                         if r != "unknown" and window.start_s <= s <= end)
            window.notes["latency_ms_p99_in_window"] = (round(_pct(lat, 0.99), 1)
                                                        if lat else None)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(q * len(values)))]


def _ack_gap(ops: list, start: float, end: float) -> float:
    """Longest stretch of [start, end] without an acknowledged transfer (s)."""
    acks = sorted(f for _, f, r in ops if r == "ok" and start <= f <= end)
    points = [start, *acks, end]
    return round(max(b - a for a, b in zip(points, points[1:])), 3)


def _series(ops: list) -> dict:
    """Per second of the run: acknowledged transfers, refusals, unanswered, latency p50/p99
    (ms) of the answered requests that finished in that second."""
    if not ops:
        return {"seconds": 0, "ok": [], "refused": [], "unknown": [], "p50_ms": [],
                "p99_ms": []}
    end = int(math.ceil(max(max(f, s) for s, f, _ in ops))) + 1
    ok, refused, unknown = [0] * end, [0] * end, [0] * end
    lat: list[list[float]] = [[] for _ in range(end)]
    for s, f, r in ops:
        if r == "unknown" or f <= 0:
            unknown[min(end - 1, int(s))] += 1
            continue
        sec = min(end - 1, int(f))
        (ok if r == "ok" else refused)[sec] += 1
        lat[sec].append((f - s) * 1000)
    p50 = [round(_pct(sorted(v), 0.5), 1) if v else None for v in lat]
    p99 = [round(_pct(sorted(v), 0.99), 1) if v else None for v in lat]
    return {"seconds": end, "ok": ok, "refused": refused, "unknown": unknown,
            "p50_ms": p50, "p99_ms": p99}


# ---------------------------------------------------------------------------------------------
# The picture.
# ---------------------------------------------------------------------------------------------

_FAULT_COLORS = {"kill-owner": "#e4572e", "pause-owner": "#f3a712", "kill-coordinator": "#8e6c8a",
                 "kill-cassandra-node": "#29335c", "kill-region": "#a8201a",
                 "restart-etcd": "#669bbc", "failback": "#5c946e"}
_W, _H, _ML, _MR, _MT, _MB = 960, 230, 64, 16, 22, 34


def _svg_frame(duration: float, windows: list[FaultWindow], y_label: str,
               y_ticks: list[tuple[float, str]], y_of) -> list[str]:
    pw, ph = _W - _ML - _MR, _H - _MT - _MB

    def x(t: float) -> float:
        return _ML + pw * max(0.0, min(t, duration)) / duration

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect x="{_ML}" y="{_MT}" width="{pw}" height="{ph}" fill="#fafafa" '
           f'stroke="#ccc"/>']
    for w in windows:
        end = w.end_s if w.end_s is not None else w.start_s + 0.5
        color = _FAULT_COLORS.get(w.fault, "#999")
        out.append(f'<rect x="{x(w.start_s):.1f}" y="{_MT}" '
                   f'width="{max(2.0, x(end) - x(w.start_s)):.1f}" height="{ph}" '
                   f'fill="{color}" fill-opacity="0.18"><title>{html.escape(w.fault)} '
                   f'{html.escape(w.target)} {w.start_s:.1f}-{end:.1f} s</title></rect>')
        out.append(f'<text x="{x(w.start_s) + 3:.1f}" y="{_MT + 12}" fill="{color}">'
                   f'{html.escape(w.fault)} {html.escape(w.target)}</text>')
        served = w.notes.get("served_again_s")
        if served is not None:
            xs = x(w.start_s + served)
            out.append(f'<line x1="{xs:.1f}" y1="{_MT}" x2="{xs:.1f}" y2="{_MT + ph}" '
                       f'stroke="{color}" stroke-dasharray="4 3"><title>served again '
                       f'{served:.2f} s after the fault</title></line>')
    for value, label in y_ticks:
        y = y_of(value)
        out.append(f'<line x1="{_ML}" y1="{y:.1f}" x2="{_ML + pw}" y2="{y:.1f}" stroke="#e6e6e6"/>'
                   f'<text x="{_ML - 4}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    step = max(1, int(math.ceil(duration / 12 / 5.0)) * 5)
    for t in range(0, int(duration) + 1, step):
        out.append(f'<text x="{x(t):.1f}" y="{_MT + ph + 14}" text-anchor="middle">{t}</text>')
    out.append(f'<text x="{_ML + pw / 2}" y="{_H - 4}" text-anchor="middle">seconds since '
               f'the workload started</text>')
    out.append(f'<text x="12" y="{_MT + ph / 2}" transform="rotate(-90 12 {_MT + ph / 2})" '
               f'text-anchor="middle">{html.escape(y_label)}</text>')
    return out


def throughput_svg(report: ScenarioReport, series: dict | None = None,
                   label: str = "acknowledged transfers / s") -> str:
    """Acknowledged and refused transfers per second: the bank's, or another ``series``
    (the load's) on the same time axis."""
    s = series if series is not None else report.series
    duration = max(1.0, float(max(report.series.get("seconds") or 1, s.get("seconds") or 1)))
    peak = max([*s.get("ok", []), *s.get("refused", []), 1])
    top = _nice(peak)
    ph, pw = _H - _MT - _MB, _W - _ML - _MR

    def y(v: float) -> float:
        return _MT + ph - ph * v / top

    out = _svg_frame(duration, report.windows, label,
                     [(top * i / 4, f"{top * i / 4:g}") for i in range(5)], y)
    bw = pw / duration
    for sec, (ok, ref) in enumerate(zip(s["ok"], s["refused"])):
        x0 = _ML + sec * bw
        if ok:
            out.append(f'<rect x="{x0 + 0.5:.1f}" y="{y(ok):.1f}" width="{max(1.0, bw - 1):.1f}" '
                       f'height="{y(0) - y(ok):.1f}" fill="#2a9d8f"><title>{sec}-{sec + 1} s: '
                       f'{ok} ok, {ref} refused</title></rect>')
        if ref:
            out.append(f'<rect x="{x0 + 0.5:.1f}" y="{y(ok + ref):.1f}" '
                       f'width="{max(1.0, bw - 1):.1f}" height="{y(ok) - y(ok + ref):.1f}" '
                       f'fill="#bbb"/>')
    for sec, n in enumerate(s["unknown"]):
        if n:
            out.append(f'<text x="{_ML + (sec + 0.5) * bw:.1f}" y="{_MT + 24}" fill="#d00" '
                       f'text-anchor="middle">?{n}</text>')
    out.append(_legend([("#2a9d8f", "acknowledged (ok)"), ("#bbb", "refused"),
                        ("#d00", "?n unanswered during the run")]))
    out.append("</svg>")
    return "\n".join(out)


def latency_svg(report: ScenarioReport) -> str:
    s = report.series
    duration = max(1.0, float(s.get("seconds") or 1))
    ops = report.ops_plot
    lats = [(f - st) * 1000 for st, f, r in ops if r != "unknown" and f > 0]
    lo, hi = 1.0, _nice(max([*lats, 10.0]), log=True)
    ph = _H - _MT - _MB
    span = math.log10(hi) - math.log10(lo)

    def y(v: float) -> float:
        v = max(lo, min(hi, v))
        return _MT + ph - ph * (math.log10(v) - math.log10(lo)) / span

    ticks = [(10 ** k, _ms_label(10 ** k)) for k in range(0, int(math.log10(hi)) + 1)]
    out = _svg_frame(duration, report.windows, "latency (ms, log)", ticks, y)
    pw = _W - _ML - _MR

    def x(t: float) -> float:
        return _ML + pw * max(0.0, min(t, duration)) / duration

    # Every request as a dot (Jepsen style), thinned deterministically above 15000.
    step = max(1, len(ops) // 15000)
    for st, f, r in ops[::step]:
        if r == "unknown" or f <= 0:
            out.append(f'<circle cx="{x(st):.1f}" cy="{_MT + 3}" r="2" fill="#d00"/>')
        else:
            color = "#7fb8da" if r == "ok" else "#bbb"
            out.append(f'<circle cx="{x(f):.1f}" cy="{y((f - st) * 1000):.1f}" r="1.2" '
                       f'fill="{color}"/>')
    for key, color in (("p50_ms", "#1f77b4"), ("p99_ms", "#ff7f0e")):
        # One line per run of seconds with answers: a second without any is a gap.
        runs: list[list[str]] = [[]]
        for sec, v in enumerate(s[key]):
            if v is None:
                runs.append([])
            else:
                runs[-1].append(f"{x(sec + 0.5):.1f},{y(v):.1f}")
        for points in runs:
            if len(points) == 1:
                cx, cy = points[0].split(",")
                out.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{color}"/>')
            elif points:
                out.append(f'<polyline points="{" ".join(points)}" fill="none" '
                           f'stroke="{color}" stroke-width="1.8"/>')
    out.append(_legend([("#1f77b4", "p50 per second"), ("#ff7f0e", "p99 per second"),
                        ("#7fb8da", "one acknowledged request"), ("#bbb", "one refusal"),
                        ("#d00", "unanswered during the run")]))
    out.append("</svg>")
    return "\n".join(out)


def _legend(items: list[tuple[str, str]]) -> str:
    parts: list[str] = []
    x: float = _ML + 4
    for color, label in items:
        parts.append(f'<rect x="{x}" y="{_MT - 14}" width="10" height="8" fill="{color}"/>'
                     f'<text x="{x + 13}" y="{_MT - 6}">{html.escape(label)}</text>')
        x += 20 + 6.2 * len(label)
    return "".join(parts)


def _nice(value: float, log: bool = False) -> float:
    if log:
        return 10 ** math.ceil(math.log10(max(value, 1.0)))
    magnitude = 10 ** math.floor(math.log10(max(value, 1.0)))
    for m in (1, 2, 2.5, 5, 10):
        if m * magnitude >= value:
            return m * magnitude
    return 10 * magnitude


def _ms_label(ms: float) -> str:
    return f"{ms / 1000:g} s" if ms >= 1000 else f"{ms:g} ms"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def render_html(run: RunReport) -> str:
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>ledger-chaos</title>",
             "<style>body{font-family:sans-serif;margin:20px;color:#222}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;"
             "padding:3px 8px;text-align:left}.PASS{color:#fff;background:#2a9d8f}"
             ".FAIL{color:#fff;background:#c0392b}.v{padding:2px 8px;border-radius:3px}"
             "pre{background:#f5f5f5;padding:6px;font-size:12px;white-space:pre-wrap}</style>"
             "</head><body>",
             f"<h1>ledger-chaos {html.escape(run.started_at)}</h1>",
             f"<p>commit {html.escape(run.git_commit)}; commit path: journal CAS at "
             f"<b>{html.escape(run.commit_path['journal_cas_serial_consistency'])}</b>, commit "
             f"at <b>{html.escape(run.commit_path['commit_consistency'])}</b>, reads at "
             f"{html.escape(run.commit_path['read_consistency'])}. Shaded bands are fault "
             f"windows (from the fault to its heal); a dashed line marks when every shard of "
             f"the failed owner answered again through another node.</p>",
             "<table><tr><th>scenario</th><th>verdict</th><th>ok</th><th>refused</th>"
             "<th>unknown (run / final)</th><th>failover s</th><th>load ok (ok/s)</th>"
             "<th>load acked in fault</th><th>lost</th><th>longest gap s (load / bank)</th>"
             "<th>reconcile</th></tr>"]
    for s in run.scenarios:
        fo = (s.measured.get("failover_s") or {}).get("max")
        faults = [w for w in s.windows if w.fault != "failback"]
        load = s.load or {}
        load_cell = (f"{load['counts']['ok']} ({load['ok_per_s']})" if load.get("counts")
                     else "-")
        in_fault = (", ".join(str(w.notes.get("load_acked", "-")) for w in faults)
                    if load else "-")
        gaps = ", ".join(f"{_fmt(w.notes.get('load_ack_gap_max_s'))} / "
                         f"{_fmt(w.notes.get('ack_gap_max_s'))}" for w in faults) or "-"
        parts.append(
            f"<tr><td><a href='#{s.name}'>{s.name}</a></td><td><span class='v {s.verdict}'>"
            f"{s.verdict}</span></td><td>{s.counts_final.get('ok', '-')}</td>"
            f"<td>{s.counts_final.get('refused', '-')}</td>"
            f"<td>{s.counts_run.get('unknown', '-')} / {s.counts_final.get('unknown', '-')}</td>"
            f"<td>{'-' if fo is None else f'{fo:.2f}'}</td><td>{load_cell}</td>"
            f"<td>{in_fault}</td><td>{s.measured.get('lost', '-')}</td><td>{gaps}</td>"
            f"<td>{'clean' if s.reconcile.get('clean') else 'NOT clean'}</td></tr>")
    parts.append("</table>")
    for s in run.scenarios:
        parts.append(f"<h2 id='{s.name}'>{html.escape(s.name)} <span class='v {s.verdict}'>"
                     f"{s.verdict}</span></h2>")
        parts.append(throughput_svg(s))
        parts.append("<br>")
        if s.load.get("series"):
            parts.append(throughput_svg(s, s.load["series"],
                                        "load: acknowledged transfers / s"))
            parts.append("<br>")
        parts.append(latency_svg(s))
        rows = "".join(
            f"<tr><td>{html.escape(w.fault)}</td><td>{html.escape(w.target)}</td>"
            f"<td>{w.start_s:.2f}</td><td>{'-' if w.end_s is None else f'{w.end_s:.2f}'}</td>"
            f"<td>{html.escape(json.dumps({k: v for k, v in w.notes.items() if k not in ('owners_during_fault', 'epochs_before')}))}</td></tr>"
            for w in s.windows)
        parts.append("<table><tr><th>fault</th><th>target</th><th>start s</th><th>end s</th>"
                     f"<th>notes</th></tr>{rows}</table>")
        if s.load:
            figures = {k: v for k, v in s.load.items() if k != "series"}
            parts.append(f"<pre>load: {html.escape(json.dumps(figures))}</pre>")
        parts.append(f"<pre>measured: {html.escape(json.dumps(s.measured))}\n"
                     f"problems: {html.escape(json.dumps(s.problems[:20], indent=1))}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Runs.
# ---------------------------------------------------------------------------------------------


def commit_path_consistency() -> dict:
    """The consistency levels of the commit path: the defaults of ``CassandraStore``, which
    ``ledgerd node`` does not override."""
    from ledger.store.cassandra import CassandraStore

    params = inspect.signature(CassandraStore.connect).parameters

    def name(p: str) -> str:
        from cassandra import ConsistencyLevel

        value = params[p].default
        return value if isinstance(value, str) else ConsistencyLevel.value_to_name[value]

    return {"journal_cas_serial_consistency": name("serial_consistency"),
            "commit_consistency": name("write_consistency"),
            "read_consistency": name("read_consistency"),
            "source": "ledger.store.cassandra.CassandraStore.connect defaults (ledgerd node "
                      "sets none): the append is one LWT (Paxos at SERIAL across datacenters, "
                      "commit at QUORUM); a CAS timeout is resolved with a SERIAL read"}


def plan_steps(name: str, rng: random.Random, config: DrillConfig) -> list[str]:
    if name != "random":
        return [name]
    choices = [s for s in SCENARIOS if s != "kill-coordinator" or config.coordinators]
    return [rng.choice(choices) for _ in range(RANDOM_STEPS)]


async def run_drills(cluster, scenarios: list[str], config: DrillConfig) -> RunReport:
    """Run ``scenarios`` one after the other on a running ``cluster``; write the report and
    the picture into ``config.out_dir``."""
    for name in scenarios:
        if name not in ALL_SCENARIOS:
            raise ValueError(f"unknown scenario {name!r}; known: {', '.join(ALL_SCENARIOS)}")
    config.out_dir = Path(config.out_dir)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)
    run = RunReport([], {k: (str(v) if isinstance(v, Path) else v)
                         for k, v in asdict(config).items()},
                    commit_path_consistency(), time.strftime("%Y-%m-%d %H:%M:%S"),
                    _git_commit())
    for name in scenarios:
        drill = Drill(cluster, name, config, random.Random(rng.randrange(1 << 30)))
        report = await drill.run(plan_steps(name, drill.rng, config))
        run.scenarios.append(report)
        print(summary_line(report), flush=True)
        _write(run)
    return run


def _write(run: RunReport) -> None:
    out = Path(run.config["out_dir"])
    run.report_path = out / "report.json"
    run.html_path = out / "chaos.html"
    doc = {"passed": run.passed, "started_at": run.started_at, "git_commit": run.git_commit,
           "commit_path": run.commit_path, "config": run.config,
           "scenarios": [s.to_json() for s in run.scenarios]}
    tmp = run.report_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(run.report_path)
    run.html_path.write_text(render_html(run))


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def summary_line(s: ScenarioReport) -> str:
    c = s.counts_final or {}
    parts = [f"{s.name:<20} {s.verdict}", f"ok={c.get('ok', 0)} refused={c.get('refused', 0)} "
             f"unknown={s.counts_run.get('unknown', 0)}->{c.get('unknown', 0)}"]
    for key in ("failover_s", "recovery_s", "all_served_after_heal_s"):
        m = s.measured.get(key)
        if m and m.get("max") is not None:
            parts.append(f"{key}={m['max']:.2f}")
    gaps = [w.notes.get("ack_gap_max_s") for w in s.windows]
    if gaps:
        parts.append("ack_gap_max_s=" + ",".join(f"{g:.1f}" for g in gaps if g is not None))
    if s.load.get("counts"):
        faults = [w for w in s.windows if w.fault != "failback"]
        parts.append(f"load ok={s.load['counts']['ok']} ({s.load['ok_per_s']}/s) "
                     f"acked_in_fault=" + ",".join(str(w.notes.get("load_acked"))
                                                   for w in faults)
                     + " load_gap_s=" + ",".join(_fmt(w.notes.get("load_ack_gap_max_s"))
                                                 for w in faults))
    parts.append(f"lost={s.measured.get('lost', '-')}")
    parts.append("reconcile=" + ("clean" if s.reconcile.get("clean") else "NOT-clean"))
    parts.append(f"{s.duration_s:.0f}s")
    text = "  ".join(parts)
    for problem in s.problems[:5]:
        text += f"\n    problem: {problem}"
    return text


def _ports(text: str | None, defaults: tuple[int, int]) -> tuple[int, int]:
    if not text:
        return defaults
    values = [int(p) for p in text.split(",") if p]
    return (values[0], values[1] if len(values) > 1 else defaults[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ledger-chaos", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help=f"any of {', '.join(ALL_SCENARIOS)} (default: all but random)")
    parser.add_argument("--regions", default="r1,r2,r3")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="workload time per scenario, warm-up included (at least)")
    parser.add_argument("--out", default="chaos-out", help="report.json, chaos.html, logs")
    parser.add_argument("--cassandra-ports", default=None, metavar="CQL[,STORAGE]",
                        help="default 19042,17000")
    parser.add_argument("--etcd-ports", default=None, metavar="CLIENT[,PEER]",
                        help="default 12379,12380")
    parser.add_argument("--run-dir", default=None,
                        help="cluster directory; a cluster running there is reused "
                             "(default: a new temporary one)")
    parser.add_argument("--keep-cluster", action="store_true",
                        help="leave the cluster running at the end")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep-data", action="store_true",
                        help="keep the keyspaces of passed drills (failed ones are always kept)")
    parser.add_argument("--nodes-per-region", type=int, default=1)
    parser.add_argument("--coordinators", type=int, default=1,
                        help="coordinator-only nodes in all (spread over regions)")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--heap-mb", type=int, default=512)
    parser.add_argument("--load", type=float, default=0.0, metavar="RATE",
                        help="transfer load beside the bank: RATE transfers/s through "
                             "Transfer and BatchTransfer, every acknowledged one checked "
                             "(default 0: none)")
    parser.add_argument("--load-single-share", type=float, default=0.2,
                        help="share of the load sent as single Transfer calls")
    parser.add_argument("--load-singles", type=int, default=32,
                        help="single Transfer calls in flight at most")
    parser.add_argument("--load-batch", type=int, default=200,
                        help="items per BatchTransfer call")
    parser.add_argument("--load-batch-inflight", type=int, default=4,
                        help="BatchTransfer calls in flight at most")
    parser.add_argument("--load-wallets", type=int, default=256)
    args = parser.parse_args(argv)
    scenarios = args.scenarios or list(SCENARIOS)
    for name in scenarios:
        if name not in ALL_SCENARIOS:
            parser.error(f"unknown scenario {name!r}; known: {', '.join(ALL_SCENARIOS)}")
    from ledger.localcluster import STATE_FILE, LocalCluster

    cql, storage = _ports(args.cassandra_ports, (19042, 17000))
    etcd_client, etcd_peer = _ports(args.etcd_ports, (12379, 12380))
    regions = [r for r in args.regions.split(",") if r]
    temporary = args.run_dir is None
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="ledger-chaos-"))
    if not temporary and (run_dir / STATE_FILE).exists():
        cluster = LocalCluster.from_run_dir(run_dir)
        if cluster.regions != regions:
            parser.error(f"the cluster in {run_dir} has regions {cluster.regions}")
    else:
        cluster = LocalCluster(run_dir, regions=regions, cql_port=cql, storage_port=storage,
                               etcd_client_port=etcd_client, etcd_peer_port=etcd_peer,
                               heap_mb=args.heap_mb)
    config = DrillConfig(out_dir=Path(args.out), seconds=args.seconds, seed=args.seed,
                         nodes_per_region=args.nodes_per_region,
                         coordinators=args.coordinators, shards=args.shards,
                         keep_data=args.keep_data, load_rate=args.load,
                         load_single_share=args.load_single_share,
                         load_single_concurrency=args.load_singles,
                         load_batch=args.load_batch,
                         load_batch_inflight=args.load_batch_inflight,
                         load_wallets=args.load_wallets)
    print(f"cluster in {run_dir}: starting (or reusing)", file=sys.stderr, flush=True)
    run: RunReport | None = None
    try:
        cluster.start()
        run = asyncio.run(run_drills(cluster, scenarios, config))
    finally:
        if not args.keep_cluster:
            cluster.stop()
            if temporary:
                shutil.rmtree(run_dir, ignore_errors=True)
    print(f"report: {run.report_path}\npicture: {run.html_path}")
    print("PASS" if run.passed else "FAIL")
    return 0 if run.passed else 1


if __name__ == "__main__":
    sys.exit(main())
