"""The local cluster: etcd and one Cassandra node per region, all on loopback.

Everything lives under one run directory::

    <run_dir>/cluster.json                 how the cluster was started (ports, regions, ...)
    <run_dir>/etcd/etcd.pid, data/, logs/stdout.log          (one member for all regions)
    <run_dir>/etcd-<region>/etcd-<region>.pid, data/, logs/   (or one member per region)
    <run_dir>/cassandra-<region>/cassandra-<region>.pid, conf/, data/, ..., logs/

so ``stop`` and ``status`` in another process (or by a later version of this package) find
what ``start`` launched.

Measured on the project's 2-core machine (OpenJDK 17, Cassandra 5.0.9 from the Maven
fallback, etcd 3.4.23), downloads cached, heap 512 MB, fresh run dir, other clusters sharing
the cores: etcd + 1 node ready in 10-16 s; etcd + 3 nodes in 36-64 s; RSS ~940-950 MB per
node, etcd ~24 MB; stopping 3 nodes + etcd ~12 s (SIGTERM drain); etcd healthy 0.2-1.9 s
after launch; kill_region + start_region of one node ~10-13 s; `start` when all runs 0.5 s.
The first run adds the Maven fetch (~25 s with an empty ~/.m2) and the etcd packages (~20 s).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Iterable, Sequence

from clients.localcluster import cassandra as cassandra_node
from clients.localcluster.cassandra import CqlError, cql_query
from clients.localcluster.constants import (CASSANDRA_START_TIMEOUT_S, CASSANDRA_STOP_TIMEOUT_S,
                                            CQL_POLL_S, ETCD_POLL_S, ETCD_START_TIMEOUT_S,
                                            ETCD_STOP_TIMEOUT_S, HEAP_MB_DEFAULT, REGIONS_MAX,
                                            STATE_FILE)
from clients.localcluster.etcd import etcd_command, etcd_healthy
from clients.localcluster.fetch import (CassandraDist, cache_dir, ensure_cassandra, ensure_etcd,
                                        ensure_java)
from clients.localcluster.process import LocalClusterError, Service, log, port_open, tail


def default_run_dir() -> Path:
    """``$LEDGER_RUN_DIR``, or ``run`` in the download cache."""
    return Path(os.environ.get("LEDGER_RUN_DIR") or cache_dir() / "run").expanduser()


class LocalCluster:
    """etcd + one Cassandra node per region, all on loopback, all under ``run_dir``.

    Region i (0-based) runs its node on 127.0.0.(i+1) with the datacenter named after the
    region; etcd runs on 127.0.0.1, or (``etcd_per_region``) a member of one etcd cluster runs
    on each region's address, so that a region's loss (``kill_region``) takes its member.
    Every method that starts something is idempotent: what already runs is left alone.
    """

    def __init__(self, run_dir: str | Path | None = None, regions: Sequence[str] = ("r1",),
                 etcd_client_port: int = 2379, etcd_peer_port: int = 2380,
                 cql_port: int = 9042, storage_port: int = 7000,
                 heap_mb: int = HEAP_MB_DEFAULT, jmx_base_port: int | None = None,
                 cluster_name: str = "redledger",
                 start_timeout: float = CASSANDRA_START_TIMEOUT_S,
                 cassandra_version: str | None = None, commitlog_sync: str = "periodic",
                 commitlog_sync_period_ms: int = 10000, etcd_per_region: bool = False):
        # `start_timeout` keeps its name (no `_s`) because run directories written by earlier
        # versions may record it; it is in seconds, per node.
        self.run_dir = Path(run_dir or default_run_dir()).expanduser().resolve()
        self.regions = list(regions)
        if not self.regions or len(set(self.regions)) != len(self.regions):
            raise ValueError(f"regions must be non-empty and unique: {self.regions}")
        if len(self.regions) > REGIONS_MAX:
            raise ValueError(f"at most {REGIONS_MAX} regions (127.0.0.1 .. 127.0.0.{REGIONS_MAX})")
        for r in self.regions:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", r):
                raise ValueError(f"region name must be a plain identifier (it is the dc name): {r!r}")
        self.etcd_client_port = etcd_client_port
        self.etcd_peer_port = etcd_peer_port
        self.cql_port = cql_port
        self.storage_port = storage_port
        self.heap_mb = heap_mb
        self.jmx_base_port = jmx_base_port
        self.cluster_name = cluster_name
        self.start_timeout = start_timeout
        self.cassandra_version = cassandra_version
        if commitlog_sync not in cassandra_node.COMMITLOG_SYNC_MODES:
            raise ValueError(f"commitlog_sync must be periodic, batch or group: {commitlog_sync!r}")
        self.commitlog_sync = commitlog_sync
        self.commitlog_sync_period_ms = commitlog_sync_period_ms
        self.contact_points: dict[str, str] = {r: f"127.0.0.{i + 1}" for i, r in enumerate(self.regions)}
        # One etcd member per region (on the region's address, the same ports), so that a
        # region's loss takes its member too; or one member on 127.0.0.1 for them all.
        self.etcd_per_region = etcd_per_region and len(self.regions) > 1
        self._etcd_hosts: dict[str, str] = (dict(self.contact_points) if self.etcd_per_region
                                            else {"ledger": "127.0.0.1"})
        self._etcds: dict[str, Service] = {
            member: Service("etcd" if not self.etcd_per_region else f"etcd-{member}",
                            self.run_dir / ("etcd" if not self.etcd_per_region
                                            else f"etcd-{member}"),
                            f"{host}:{etcd_client_port}")
            for member, host in self._etcd_hosts.items()}
        # Every member's client endpoint, as ``--etcd`` takes them.
        self.etcd_endpoint = ",".join(svc.address for svc in self._etcds.values())
        self._nodes = {r: Service(f"cassandra-{r}", self.run_dir / f"cassandra-{r}",
                                  f"{self.contact_points[r]}:{cql_port}") for r in self.regions}
        self._dist: CassandraDist | None = None

    # ---- state file: lets `stop`/`status` in another process find what `start` launched ----

    def _state(self) -> dict:
        return {"regions": self.regions, "etcd_client_port": self.etcd_client_port,
                "etcd_peer_port": self.etcd_peer_port, "cql_port": self.cql_port,
                "storage_port": self.storage_port, "heap_mb": self.heap_mb,
                "jmx_base_port": self.jmx_base_port, "cluster_name": self.cluster_name,
                "commitlog_sync": self.commitlog_sync,
                "commitlog_sync_period_ms": self.commitlog_sync_period_ms,
                "etcd_per_region": self.etcd_per_region}

    def _save_state(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self._state(), indent=2) + "\n")
        os.replace(tmp, self.run_dir / STATE_FILE)

    @classmethod
    def from_run_dir(cls, run_dir: str | Path | None = None, **overrides) -> "LocalCluster":
        """The cluster recorded in ``run_dir/cluster.json`` (defaults if there is none).

        Args:
            run_dir: The run directory; default ``default_run_dir()``.
            **overrides: Constructor arguments that win over the recorded ones (None = keep).
        """
        rd = Path(run_dir or default_run_dir()).expanduser()
        kwargs: dict = {}
        try:
            kwargs = json.loads((rd / STATE_FILE).read_text())
        except (OSError, ValueError):
            pass
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        # Ignore keys that a newer or older version of this package may have written.
        known = set(inspect.signature(cls).parameters) - {"run_dir"}
        return cls(rd, **{k: v for k, v in kwargs.items() if k in known})

    # ---- etcd ----

    def _launch_etcd(self, member: str) -> None:
        svc = self._etcds[member]
        if svc.running():
            return
        etcd, _ = ensure_etcd()
        host = self._etcd_hosts[member]
        for port in (self.etcd_client_port, self.etcd_peer_port):
            if port_open(host, port):
                raise LocalClusterError(f"{host}:{port} is already in use by another process")
        data = svc.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        data.chmod(0o700)  # etcd warns (and newer versions refuse) otherwise
        if self.etcd_per_region:
            svc.launch(etcd_command(etcd, data, self.etcd_client_port, self.etcd_peer_port,
                                    name=member, host=host, members=self._etcd_hosts,
                                    token=self.cluster_name))
        else:
            svc.launch(etcd_command(etcd, data, self.etcd_client_port, self.etcd_peer_port))

    def _wait_etcd(self, members: Iterable[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for member in members:
            svc = self._etcds[member]
            while not etcd_healthy(svc.address):
                if not svc.running():
                    raise LocalClusterError(f"{svc.name} exited during startup\n{tail(svc.log_file)}")
                if time.monotonic() > deadline:
                    raise LocalClusterError(f"{svc.name} not healthy after {timeout:.0f}s\n"
                                            f"{tail(svc.log_file)}")
                time.sleep(ETCD_POLL_S)

    def start_etcd(self, timeout: float = ETCD_START_TIMEOUT_S) -> None:
        """Start every etcd member not running (all before waiting: a member of several is
        healthy only once a quorum runs); wait until each is healthy (``timeout`` in s).

        Raises:
            LocalClusterError: a port is taken, a member exited, or one is not healthy in time.
        """
        for member in self._etcds:
            self._launch_etcd(member)
        self._wait_etcd(self._etcds, timeout)

    def stop_etcd(self, timeout: float = ETCD_STOP_TIMEOUT_S) -> None:
        """SIGTERM every etcd member, SIGKILL after ``timeout`` seconds; their data stays."""
        for svc in self._etcds.values():
            svc.stop(timeout)

    def etcd_member_of(self, region: str) -> str | None:
        """The client endpoint of ``region``'s own etcd member (None: one member for all)."""
        svc = self._etcds.get(region) if self.etcd_per_region else None
        return svc.address if svc is not None else None

    # ---- Cassandra ----

    def _dist_or_fetch(self) -> CassandraDist:
        if self._dist is None:
            self._dist = ensure_cassandra(version=self.cassandra_version)
        return self._dist

    def _node_failure(self, region: str, why: str) -> LocalClusterError:
        d = self._nodes[region].dir / "logs"
        return LocalClusterError(f"cassandra {region}: {why}\n{tail(d / 'system.log')}\n"
                                 f"{tail(d / 'stdout.log', 20)}")

    def _cql_ok(self, region: str) -> bool:
        try:
            cql_query(self.contact_points[region], self.cql_port,
                      "SELECT release_version FROM system.local")
            return True
        except CqlError:
            return False

    def visible_dcs(self, region: str) -> set[str]:
        """Datacenters the node of ``region`` knows (its own + system.peers).

        Raises:
            CqlError: the node could not be asked.
        """
        return cassandra_node.visible_dcs(self.contact_points[region], self.cql_port)

    def _launch_node(self, region: str) -> None:
        svc = self._nodes[region]
        if svc.running():
            return
        addr = self.contact_points[region]
        for port in (self.cql_port, self.storage_port):
            if port_open(addr, port):
                raise LocalClusterError(f"{addr}:{port} is already in use by another process "
                                        f"(another cluster running? try `python -m clients.localcluster status`)")
        cassandra_node.write_node_config(
            svc.dir, region=region, address=addr, cluster_name=self.cluster_name,
            storage_port=self.storage_port, cql_port=self.cql_port,
            commitlog_sync=self.commitlog_sync,
            commitlog_sync_period_ms=self.commitlog_sync_period_ms)
        jmx_port = (self.jmx_base_port + self.regions.index(region)
                    if self.jmx_base_port is not None else None)
        cmd = cassandra_node.node_command(self._dist_or_fetch(), ensure_java(), svc.dir,
                                          self.heap_mb, jmx_port)
        log(f"starting cassandra {region} on {addr}:{self.cql_port}")
        svc.launch(cmd)

    def _wait_cql(self, region: str, deadline: float) -> None:
        svc = self._nodes[region]
        while not self._cql_ok(region):
            if not svc.running():
                raise self._node_failure(region, "process exited during startup")
            if time.monotonic() > deadline:
                raise self._node_failure(region, "CQL port not answering in time")
            time.sleep(CQL_POLL_S)

    def _wait_dcs(self, regions: Iterable[str], deadline: float) -> None:
        want = set(self.regions)
        for region in regions:
            while True:
                try:
                    seen = self.visible_dcs(region)
                except CqlError:
                    seen = set()
                if want <= seen:
                    break
                if not self._nodes[region].running():
                    raise self._node_failure(region, "process exited while waiting for gossip")
                if time.monotonic() > deadline:
                    raise self._node_failure(region, f"sees datacenters {sorted(seen)}, want {sorted(want)}")
                time.sleep(CQL_POLL_S)

    def start_region(self, region: str) -> None:
        """(Re)start the node of ``region`` on its existing data dir; wait until it serves CQL
        and knows every datacenter.

        Raises:
            LocalClusterError: the node exited or was not ready within ``start_timeout``.
        """
        deadline = time.monotonic() + self.start_timeout
        if self.etcd_per_region:
            self._launch_etcd(region)
            self._wait_etcd([region], ETCD_START_TIMEOUT_S)
        self._launch_node(region)
        self._wait_cql(region, deadline)
        self._wait_dcs([region], deadline)

    def kill_region(self, region: str, etcd: bool = True) -> None:
        """SIGKILL the node of ``region`` (a crash, not a clean shutdown), and its etcd
        member when each region has one (unless ``etcd`` is False: the Cassandra node alone);
        data stays."""
        self._nodes[region].kill()
        if etcd and self.etcd_per_region:
            self._etcds[region].kill()

    def pause_cassandra(self, region: str) -> None:
        """SIGSTOP the Cassandra node of ``region``: it keeps its connections and answers
        nothing (a node that is up but far too slow) until ``resume_cassandra``."""
        self._signal_node(region, signal.SIGSTOP)

    def resume_cassandra(self, region: str) -> None:
        """SIGCONT the Cassandra node of ``region`` (after ``pause_cassandra``)."""
        self._signal_node(region, signal.SIGCONT)

    def _signal_node(self, region: str, sig: int) -> None:
        pid = self._nodes[region].pid()
        if pid is None or not self._nodes[region].running():
            raise LocalClusterError(f"cassandra {region} is not running")
        os.kill(pid, sig)

    def stop_region(self, region: str, timeout: float = CASSANDRA_STOP_TIMEOUT_S) -> None:
        """SIGTERM the node of ``region``, SIGKILL after ``timeout`` seconds; data stays."""
        self._nodes[region].stop(timeout)

    # ---- whole cluster ----

    def start(self) -> None:
        """Start whatever is not running (etcd first, then nodes one at a time) and wait
        until all is ready. Idempotent.

        Raises:
            LocalClusterError: something could not be installed or started in time.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._save_state()
        t0 = time.monotonic()
        self.start_etcd()
        log(f"etcd healthy at {self.etcd_endpoint} ({time.monotonic() - t0:.1f}s)")
        deadline = time.monotonic() + self.start_timeout * len(self.regions)
        # One at a time: simultaneous joins race for tokens/schema, and 2 cores are the limit.
        for region in self.regions:
            t1 = time.monotonic()
            self._launch_node(region)
            self._wait_cql(region, deadline)
            log(f"cassandra {region} serves CQL at {self._nodes[region].address} "
                f"({time.monotonic() - t1:.1f}s)")
        self._wait_dcs(self.regions, deadline)
        log(f"cluster ready: regions {self.regions}, {time.monotonic() - t0:.1f}s")

    def stop(self, timeout: float = CASSANDRA_STOP_TIMEOUT_S) -> None:
        """Stop all nodes and etcd: SIGTERM, then SIGKILL after ``timeout`` seconds; waits
        for every process to exit.

        Raises:
            LocalClusterError: a process survived SIGKILL (the others are stopped anyway).
        """
        errors = []
        # SIGTERM every node first: each drains for several seconds, in parallel is faster.
        for svc in self._nodes.values():
            pid = svc.pid()
            if pid is not None and svc.running():
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for region in reversed(self.regions):
            try:
                self._nodes[region].stop(timeout)
            except LocalClusterError as e:
                errors.append(str(e))
        for svc in self._etcds.values():
            try:
                svc.stop(ETCD_STOP_TIMEOUT_S)
            except LocalClusterError as e:
                errors.append(str(e))
        if errors:
            raise LocalClusterError("; ".join(errors))

    def status(self) -> dict[str, dict]:
        """{"etcd": {...}, "cassandra-r1": {...}, ...}; each running/pid/address/rss_mb."""
        out = {svc.name: svc.status() for svc in self._etcds.values()}
        for region in self.regions:
            out[self._nodes[region].name] = self._nodes[region].status()
        return out

    def env(self) -> dict[str, str]:
        """The environment variables that point ``ledgerd``/``ledgerctl`` at this cluster."""
        return {
            "LEDGER_REGIONS": ",".join(self.regions),
            "LEDGER_CASSANDRA_CONTACT_POINTS": ",".join(f"{r}={h}" for r, h in self.contact_points.items()),
            "LEDGER_CASSANDRA_PORT": str(self.cql_port),
            "LEDGER_ETCD_ENDPOINT": self.etcd_endpoint,
        }

    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
