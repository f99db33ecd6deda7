"""The drills: a deployment under the bank workload (and optionally a transfer load), faults
injected into it (SIGKILL, SIGSTOP, a Cassandra node or a whole region killed, etcd stopped),
healed, and what was seen recorded into a ``ScenarioReport``.

A drill sees the ledger only from outside: through the client library (the workloads and
the served-again probes), through etcd's owner keys (``observe``), through ``ledgerctl`` for
what only the store shows (``clients.chaos.ledgerctl``), and through process control
(``clients.harness`` for ledger nodes, ``clients.localcluster`` for Cassandra and etcd).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import time

from clients.bank import BankConfig, BankWorkload
from clients.chaos import checks
from clients.chaos import ledgerctl
from clients.chaos.constants import (DRAIN_LIBRARY_CALLERS, DRAIN_LOAD_RATE,
                                     DROP_KEYSPACE_TIMEOUT_S, FAILBACK_TIMEOUT_S, FAULTS,
                                     HOT_ENVELOPE_STEPS, NODE_RESTART_PAUSE_S,
                                     NODE_RESTART_TIMEOUT_S, PROBE_CALL_TIMEOUT_S,
                                     RANDOM_GAP_S, RANDOM_STEPS, RECOVERY_MIN_S,
                                     REFUND_TIMEOUT_S, SERVED_POLL_S, SERVED_TIMEOUT_S,
                                     SETTLE_TIMEOUT_S, STEP_DOWN_LINES_MAX, STEP_DOWN_RE)
from clients.chaos.envelope import HotEnvelope
from clients.chaos.model import DrillConfig, FaultWindow, ScenarioReport
from clients.chaos.observe import OwnerWatcher
from clients.harness import Deployment, NodeProcess
from clients.localcluster.etcd import etcd_leader
from clients import LedgerClient, LedgerError
from clients.load import LoadConfig, LoadWorkload
from clients.localcluster import cql_query


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
        self.hot = name == "hot-envelope"
        # The hot envelope's shares and total are above ledgerd's defaults: every node of
        # its deployment (and every restart of one) gets rules that allow them.
        node_args = (["--envelope-shares-max", str(config.envelope_shares),
                      "--envelope-total-max-minor", str(config.envelope_total_minor)]
                     if self.hot else [])
        if config.catch_up_wait_s is not None:
            node_args += ["--catch-up-wait-s", str(config.catch_up_wait_s)]
        self.deployment = Deployment(
            cluster, self.regions, nodes_per_region=config.nodes_per_region,
            shards=config.shards, lease_ttl_s=config.lease_ttl_s,
            takeover_grace_s=config.takeover_grace_s, log_dir=self.log_dir,
            coordinators_per_region=1 if config.coordinators else 0, node_args=node_args)
        # Deployment places coordinators per region; keep the first ``coordinators`` of them,
        # spread over the regions.
        kept = self.deployment.coordinators[:config.coordinators]
        self.deployment.nodes = [n for n in self.deployment.nodes
                                 if n.role == "full" or n in kept]
        self.workload: BankWorkload | None = None
        self.load: LoadWorkload | None = None
        self.envelope: HotEnvelope | None = None
        self.watcher: OwnerWatcher | None = None
        self.probes = ledgerctl.probe_wallets(config.shards)
        self._probe_clients: dict[str, LedgerClient] = {}
        self._cassandra_down: set[str] = set()
        self._etcd_down = False
        self._probe_turn = 0
        self._pause_check: tuple[dict[int, int], dict[int, int]] | None = None
        # drain-region: each drain's window and the shards it moved (gaps measured after).
        self._drains: list[tuple[FaultWindow, list[int]]] = []

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
        ``epochs_above``). Returns when each shard was first seen so, and the slowest.

        Each shard is probed on its own (one task per shard: a probe as soon as etcd, read
        every SERVED_POLL_S, shows an eligible owner, again SERVED_POLL_S after a failed one),
        and is served at the moment its own probe answered: a slow or failed probe of one
        shard does not delay the time noted for another, nor a whole round.
        """
        assert self.watcher is not None
        watcher = self.watcher
        served: dict[int, float] = {}
        owners: dict[int, list] = {}
        deadline = time.monotonic() + timeout_s

        def eligible(shard: int) -> tuple | None:
            owner = watcher.owners.get(shard)
            if owner is None or owner[0] in exclude_nodes or owner[1] in exclude_regions:
                return None
            if epochs_above and owner[2] <= epochs_above.get(shard, 0):
                return None
            if want_regions and owner[1] != want_regions.get(shard, owner[1]):
                return None
            return owner

        polled = asyncio.Condition()

        async def poll() -> None:
            while time.monotonic() < deadline:
                await watcher.poll_once()
                async with polled:
                    polled.notify_all()
                await asyncio.sleep(SERVED_POLL_S)

        async def probe(shard: int) -> None:
            while time.monotonic() < deadline:
                owner = eligible(shard)
                via = [n for n in self.live_nodes(exclude_nodes)
                       if n.region not in exclude_regions]
                if owner is None or not via:
                    async with polled:  # until etcd is read again
                        await polled.wait()
                    continue
                # Round robin over the surviving nodes (not the seeded rng: the faults'
                # targets must not depend on how many probes ran).
                self._probe_turn += 1
                if await self._probe(via[self._probe_turn % len(via)], shard):
                    served[shard] = self.t()
                    owners[shard] = list(owner)
                    return
                await asyncio.sleep(SERVED_POLL_S)

        await watcher.poll_once()
        poller = asyncio.ensure_future(poll())
        try:
            await asyncio.gather(*(probe(s) for s in shards))
        finally:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
        pending = [s for s in shards if s not in served]
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
        region serves it: ``ledgerctl restore-homes``, a failback of every region at once.

        Failovers are sticky (a region that takes shards over becomes their home until an
        operator moves them back), and ``Deployment.start`` starts one node before the others,
        which then takes every shard over; each drill starts from, and after a heal returns
        to, the default placement (shard s homed in regions[s % len(regions)]).
        """
        placed = await ledgerctl.run_json(
            ["restore-homes", *ledgerctl.etcd_args(self.cluster.etcd_endpoint,
                                                  self.deployment.prefix, self.regions,
                                                  self.config.shards)])
        homes = {int(shard): region for shard, region in placed["homes"].items()}
        result = await self.wait_served(list(homes), since=since, want_regions=homes,
                                        timeout_s=FAILBACK_TIMEOUT_S)
        if result["pending"]:
            self.problem(f"{what}: shards {result['pending']} not back in their home regions "
                         f"within {FAILBACK_TIMEOUT_S:.0f} s")
            return None
        return result["slowest_s"]

    def owners_now(self) -> dict[str, dict[int, int]]:
        assert self.watcher is not None
        out: dict[str, dict[int, int]] = {}
        for shard, (node, _, epoch) in self.watcher.owners.items():
            out.setdefault(node, {})[shard] = epoch
        return out

    def pick_owner(self) -> tuple[NodeProcess, dict[int, int]]:
        """A live node that owns shards (hot-envelope: the one that owns the envelope's
        shard), and the shards it owns with their epochs."""
        owned = self.owners_now()
        candidates = [n for n in self.deployment.owners if n.alive and owned.get(n.node_id)]
        if self.envelope is not None:
            assert self.watcher is not None
            owner = self.watcher.owners.get(self.envelope.shard)
            candidates = [n for n in candidates if owner and n.node_id == owner[0]]
            if not candidates:
                raise RuntimeError(f"no live node owns the envelope's shard "
                                   f"{self.envelope.shard} (etcd says {owner})")
        if not candidates:
            raise RuntimeError("no live node owns a shard")
        node = self.rng.choice(candidates)
        return node, dict(owned[node.node_id])

    def envelope_region(self) -> str | None:
        """hot-envelope: the region whose node owns the envelope's shard now."""
        if self.envelope is None:
            return None
        assert self.watcher is not None
        owner = self.watcher.owners.get(self.envelope.shard)
        if owner is None:
            raise RuntimeError(f"the envelope's shard {self.envelope.shard} has no owner")
        return owner[1]

    def open_window(self, fault: str, target: str, **notes) -> FaultWindow:
        if self.envelope is not None and fault != "failback":
            notes["envelope_shard"] = self.envelope.shard
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
            "log_after_resume": lines[:STEP_DOWN_LINES_MAX],
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
        journal = await self._journal(sorted(shards))
        return {shard: checks.batches_of_epoch(journal, shard, epoch)
                for shard, epoch in shards.items()}

    async def _stale_append_probe(self, shards: dict[int, int]) -> dict:
        """Append an empty batch to a former shard with the paused owner's old epoch
        (``ledgerctl fence-check``): this is what its stale write looks like to the journal,
        and the fence must refuse it."""
        shard, epoch = sorted(shards.items())[0]
        try:
            return await ledgerctl.run_json(["fence-check", *self._store_args(),
                                             "--shard", str(shard), "--epoch", str(epoch)],
                                            ok_codes=(0, 1, 2))
        except ledgerctl.LedgerctlError as exc:  # not a proof either way
            return {"shard": shard, "epoch": epoch, "refused": False,
                    "error": f"{type(exc).__name__}: {exc}"}

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
        await asyncio.to_thread(self.cluster.kill_region, region, False)
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
        region = region or self.envelope_region() or self.rng.choice(self.regions)
        nodes = [n for n in self.deployment.in_region(region) if n.alive]
        owned = self.owners_now()
        shards = {s: e for n in nodes for s, e in owned.get(n.node_id, {}).items()}
        window = self.open_window("kill-region", region, nodes=[n.node_id for n in nodes],
                                  shards=sorted(shards))
        member = self.cluster.etcd_member_of(region)
        if member is not None:
            # The region's etcd member goes with it: was it the Raft leader?
            status = await asyncio.to_thread(etcd_leader, member)
            window.notes["etcd_member"] = member
            window.notes["etcd_leader_lost"] = status is not None and status[0] == status[1]
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

    async def fault_drain_region(self) -> None:
        """A planned drain of one region and its return, under load (issue 11): ``ledgerctl
        failover --from R --to S`` (S the next region), held, then ``ledgerctl failback
        --region R``. Times until every moved shard is served in S, and back in R, are
        noted; the longest stretch without an acknowledged transfer on the moved shards is
        measured after the run (``_drain_gaps``), and any error that reached a caller using
        the client library's retries is a problem."""
        owned = self.owners_now()
        by_region: dict[str, dict[int, int]] = {}
        for node in self.deployment.owners:
            for shard, epoch in owned.get(node.node_id, {}).items():
                by_region.setdefault(node.region, {})[shard] = epoch
        if not by_region:
            raise RuntimeError("no region owns a shard")
        region = self.rng.choice(sorted(by_region))
        dst = self.regions[(self.regions.index(region) + 1) % len(self.regions)]
        shards = by_region[region]
        window = self.open_window("drain-region", region, to=dst, shards=sorted(shards),
                                  epochs_before={str(s): e for s, e in shards.items()})
        etcd = ledgerctl.etcd_args(self.cluster.etcd_endpoint, self.deployment.prefix,
                                   self.regions, self.config.shards)
        moved = await ledgerctl.run_json(
            ["failover", "--from", region, "--to", dst, "--reason", "drill: drain", *etcd],
            ok_codes=(0,))
        window.notes["failover_reported_s"] = moved["served_after_s"]
        drained = await self.wait_served(sorted(shards), since=window.start_s,
                                         want_regions={s: dst for s in shards},
                                         epochs_above=shards)
        window.notes["drained_s"] = drained["slowest_s"]
        if drained["pending"]:
            self.problem(f"drain-region {region}: shards {drained['pending']} not served in "
                         f"{dst} within the timeout")
        await self._hold_until(window.start_s + self.config.fault_hold_s)
        back_at = self.t()
        window.notes["failback_at_s"] = back_at
        returned = await ledgerctl.run_json(
            ["failback", "--region", region, "--reason", "drill: return", *etcd],
            ok_codes=(0,))
        window.notes["failback_reported_s"] = returned["served_after_s"]
        back = await self.wait_served(sorted(shards), since=back_at,
                                      want_regions={s: region for s in shards})
        window.notes["returned_s"] = back["slowest_s"]
        if back["pending"]:
            self.problem(f"drain-region {region}: shards {back['pending']} not back in "
                         f"{region} within the timeout")
        window.end_s = self.t()
        self._drains.append((window, sorted(shards)))

    def _drain_gaps(self, ops: list, shard_of: dict[str, int] | None) -> None:
        """Per drain: the longest stretch without an acknowledged transfer (bank and load)
        debiting a moved shard, from the failover until the failback's shards serve, and
        per shard; the same figures over an equally long calm stretch before it (what the
        load's own spacing gives); and the library callers' errors (any is a problem)."""
        if self.load is not None and self.load.library_errors:
            errors = self.load.library_errors
            self.problem(f"drain-region: {len(errors)} errors reached callers using the "
                         f"client library's retries, first {errors[:3]}")
        for window, shards in self._drains:
            end = window.end_s if window.end_s is not None else self.t()
            if self.load is not None:
                window.notes["library_errors"] = sum(
                    1 for e in self.load.library_errors if window.start_s <= e[0] <= end)
            if shard_of is None:
                continue  # the lookup failed: a problem says so already
            during = checks.shard_ack_gaps(ops, shard_of, shards, window.start_s, end)
            calm_from = max(0.0, window.start_s - (end - window.start_s))
            calm = checks.shard_ack_gaps(ops, shard_of, shards, calm_from, window.start_s)
            window.notes["moved_ack_gap_s"] = during["any_s"]
            window.notes["moved_shard_ack_gap_max_s"] = during["max_s"]
            window.notes["moved_shard_ack_gap_s"] = during["per_shard_s"]
            window.notes["calm_moved_ack_gap_s"] = calm["any_s"]
            window.notes["calm_shard_ack_gap_max_s"] = calm["max_s"]
            self.report.measured.setdefault("drain_gap_s", []).append(during["any_s"])

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

    def _store_args(self) -> list[str]:
        """``ledgerctl`` flags for this deployment's keyspace, read through a region whose
        Cassandra node is up."""
        region = next((r for r in self.regions if r not in self._cassandra_down),
                      self.regions[0])
        return ledgerctl.store_args(self.cluster.contact_points[region], self.cluster.cql_port,
                                    region, self.deployment.keyspace, self.config.shards)

    async def _journal(self, shards: list[int] | None = None) -> dict:
        """``ledgerctl journal --json``: writer epochs along the journals of ``shards``
        (default every shard)."""
        only = [arg for shard in (shards or []) for arg in ("--shard", str(shard))]
        return await ledgerctl.run_json(["journal", *self._store_args(), *only])

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
            drain = self.name == "drain-region"
            load_rate = config.load_rate or (DRAIN_LOAD_RATE if drain else 0.0)
            if load_rate > 0:
                callers = max(config.load_library_callers,
                              DRAIN_LIBRARY_CALLERS if drain else 0)
                self.load = LoadWorkload(self.deployment.addresses, LoadConfig(
                    rate=load_rate, single_share=config.load_single_share,
                    library_callers=callers,
                    single_concurrency=config.load_single_concurrency,
                    batch_size=config.load_batch, batch_inflight=config.load_batch_inflight,
                    wallets=config.load_wallets, prefix=f"load-{self.name}",
                    seed=self.rng.randrange(1 << 30)), caller="chaos-load")
                await self.load.setup()
            if self.hot:
                self.envelope = HotEnvelope(
                    self.deployment.addresses, config, prefix=f"env-{self.name}",
                    seed=self.rng.randrange(1 << 30))
                await self.envelope.setup_wallets()
            await self.workload.setup()
            if self.load is not None:
                self.load.t0 = self.workload.t0  # one clock for the report
            if self.envelope is not None:
                # Created last, so that its expiry counts from the start of the workloads.
                await self.envelope.create()
                self.envelope.t0 = self.workload.t0
                escrow = self.envelope.escrow_wallet_id
                self.envelope.shard = (await ledgerctl.shard_of([escrow], config.shards))[escrow]
                report.envelope.update(self.envelope.figures())
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
            grabbing = (asyncio.create_task(self.envelope.run(stop))
                        if self.envelope is not None else None)
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
                if self.envelope is not None and grabbing is not None:
                    # The grabbers stop by themselves before the expiry; then the owners'
                    # sweep must refund the rest (the bank keeps running meanwhile).
                    await grabbing
                    if not await self.envelope.wait_refunded(REFUND_TIMEOUT_S):
                        self.problem(f"the envelope was not REFUNDED within "
                                     f"{REFUND_TIMEOUT_S:.0f} s after its expiry")
                    report.envelope["last_heal_s"] = max(
                        (w.end_s for w in report.windows
                         if w.fault != "failback" and w.end_s is not None), default=None)
                    report.envelope["expired_after_last_heal"] = (
                        report.envelope["last_heal_s"] is not None
                        and self.envelope.expires_at_s() > report.envelope["last_heal_s"])
            finally:
                stop.set()
                await load
                if traffic is not None:
                    await traffic
                if grabbing is not None:
                    await grabbing
                report.counts_run = self.workload.result.counts()
                report.ops_plot = [(op.started, op.finished, op.result)
                                   for op in self.workload.result.ops]
                if self.load is not None:
                    report.load["counts_run"] = self.load.counts()
                if self.envelope is not None:
                    report.envelope["counts_run"] = self.envelope.counts()
                    report.envelope_plot = [(op.started, op.finished, op.result)
                                            for op in self.envelope.ops]
            await self.workload.settle(timeout_s=SETTLE_TIMEOUT_S)
            report.problems.extend(await self.workload.check())
            report.counts_final = self.workload.result.counts()
            if self.load is not None:
                await self.load.settle(timeout_s=SETTLE_TIMEOUT_S)
                report.problems.extend(f"{self.name}: {p}" for p in await self.load.check())
            if self.envelope is not None:
                await self.envelope.settle(timeout_s=SETTLE_TIMEOUT_S)
                report.problems.extend(f"{self.name}: envelope: {p}"
                                       for p in await self.envelope.check())
                report.evidence["hot-envelope"] = self.envelope.evidence
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
        report.series = checks.series(report.ops_plot)
        if self.load is not None:
            report.load_plot = [(op.started, op.finished, op.result) for op in self.load.ops]
            report.load.update(self.load.figures())
            report.load["series"] = checks.series(report.load_plot)
        if self.envelope is not None:
            report.envelope.update(self.envelope.figures())
            report.envelope["series"] = checks.series(report.envelope_plot)
        ops = self._transfer_ops()
        shards: dict[str, int] | None = None
        if ops and (self.watcher is not None or self._drains):
            try:  # one lookup of the debited wallets' shards for both uses below
                shards = await ledgerctl.shard_of(sorted({op.src for op in ops}),
                                                  self.config.shards)
            except Exception as exc:  # the picture loses its lines, the drains their gaps
                report.problems.append(f"{self.name}: shards of the wallets not read: {exc}")
        if shards is not None and self.watcher is not None:
            await self._series_by_region(report, ops, shards)
        if self._drains:
            self._drain_gaps(ops, shards)
        checks.summarize(
            report,
            self.workload.result.ops if self.workload is not None else [],
            self.workload.result.lost if self.workload is not None else (),
            self.load.ops if self.load is not None else None,
            self.load.lost if self.load is not None else ())
        report.verdict = checks.verdict(report)
        return report

    def _transfer_ops(self) -> list:
        """The bank's and the load's requests (objects with ``src``, ``finished``,
        ``result``)."""
        ops: list = list(self.workload.result.ops if self.workload is not None else [])
        if self.load is not None:
            ops.extend(self.load.ops)
        return ops

    async def _series_by_region(self, report: ScenarioReport, ops: list,
                                shards: dict[str, int]) -> None:
        """Acknowledged transfers per second by committing region (bank and load together),
        for the picture's per-region lines."""
        assert self.watcher is not None
        report.series["by_region"] = checks.by_region(
            ops, self.watcher.changes, shards, report.series.get("seconds") or 0)

    async def _verify_store(self) -> None:
        """Reconcile, check that epochs never go back along any journal, and (pause-owner)
        that the paused owner's old epoch appended nothing after it was taken over."""
        result = await ledgerctl.run_json(["reconcile", *self._store_args()])
        self.report.reconcile = result
        if not result["clean"]:
            self.problem(f"reconcile found {len(result['findings'])} findings")
        # Exactly once, counted by the store: one commit per funding deposit and per
        # acknowledged transfer, and nothing else (every request was answered by now).
        assert self.workload is not None
        expected = len(self.workload.wallets) + self.workload.result.counts()["ok"]
        if self.load is not None:
            expected += len(self.load.wallets) + self.load.counts()["ok"]
        if self.envelope is not None:
            expected += self.envelope.expected_commits()
            await self._envelope_show()
        self.report.evidence["commits_expected"] = expected
        self.report.evidence["commits_in_journals"] = result["transfers_committed"]
        problem = checks.commit_count_problem(expected, result["transfers_committed"])
        if problem:
            self.problem(problem)
        journal = await self._journal()
        epoch_problems = checks.epoch_problems(journal)
        for text in epoch_problems:
            self.problem(text)
        self.report.evidence["journal_epochs_monotonic"] = not epoch_problems
        if self._pause_check is not None:
            shards, at_resume = self._pause_check
            late, problems = checks.late_appends(shards, at_resume, journal)
            for text in problems:
                self.problem(text)
            self.report.evidence["pause-owner"]["old_epoch_appends_after_resume"] = late

    async def _envelope_show(self) -> None:
        """``ledgerctl envelope show ID``: the envelope as its shard's journal has it; exit 0
        iff it adds up. Its figures, and whether they agree with GetEnvelope, as evidence."""
        assert self.envelope is not None
        try:
            code, doc = await ledgerctl.run_json_code(
                ["envelope", "show", self.envelope.envelope_id, *self._store_args()])
        except ledgerctl.LedgerctlError as exc:
            self.problem(f"ledgerctl envelope show failed: {exc}")
            self.report.evidence["envelope_show"] = {"exit_code": None, "error": str(exc)}
            return
        e = doc["envelope"]
        grabs = self.report.evidence.get("hot-envelope", {}).get("grabs", {})
        refund = self.report.evidence.get("hot-envelope", {}).get("refund", {})
        shown = {"exit_code": code, "shard": doc["shard"], "source": doc["source"],
                 "state": doc["state"], "grabs": len(doc["grabs"]),
                 "credits": {c: sum(1 for g in doc["grabs"] if g["credit"] == c)
                             for c in sorted({g["credit"] for g in doc["grabs"]})},
                 "refunded_minor": e["refunded_minor"], "left_minor": e["left_minor"],
                 "escrow_minor": doc["escrow_minor"], "problems": doc["problems"]}
        shown["agrees_with_get_envelope"] = (
            shown["grabs"] == grabs.get("grabs_in_ledger")
            and shown["refunded_minor"] == refund.get("refunded_minor")
            and shown["shard"] == self.envelope.shard)
        self.report.evidence["envelope_show"] = shown
        if code != 0:
            self.problem(f"ledgerctl envelope show exited {code}: {doc['problems'][:5]}")
        if not shown["agrees_with_get_envelope"]:
            self.problem(f"ledgerctl envelope show disagrees with GetEnvelope: {shown}")

    async def _teardown(self) -> None:
        if self.watcher is not None:
            await self.watcher.stop()
        if self.workload is not None:
            await self.workload.close()
        if self.load is not None:
            await self.load.close()
        if self.envelope is not None:
            await self.envelope.close()
        for client in self._probe_clients.values():
            await client.close()
        await asyncio.to_thread(self.deployment.stop)
        # Leave the cluster as it was found: every Cassandra node and etcd serving.
        await asyncio.to_thread(self.cluster.start)
        self._cassandra_down.clear()

    async def _drop_keyspace(self) -> None:
        """Drop a passed drill's keyspace: every keyspace adds tables that a restarting
        Cassandra node opens, so a long-lived cluster would restart slower and slower."""
        try:
            await asyncio.to_thread(cql_query, self.cluster.contact_points[self.regions[0]],
                                    self.cluster.cql_port,
                                    f"DROP KEYSPACE IF EXISTS {self.deployment.keyspace}",
                                    DROP_KEYSPACE_TIMEOUT_S)
        except Exception as exc:  # best effort: a leftover keyspace harms nothing
            self.report.evidence["keyspace_drop_failed"] = f"{type(exc).__name__}: {exc}"


def plan_steps(name: str, rng: random.Random, config: DrillConfig) -> list[str]:
    """The faults of scenario ``name``: itself, for ``hot-envelope`` its two faults (aimed
    at the envelope's shard when they happen), or for ``random`` a seeded mix."""
    if name == "hot-envelope":
        return list(HOT_ENVELOPE_STEPS)
    if name != "random":
        return [name]
    choices = [s for s in FAULTS if s != "kill-coordinator" or config.coordinators]
    return [rng.choice(choices) for _ in range(RANDOM_STEPS)]

