"""Run a real deployment on loopback: Cassandra + etcd (``clients.localcluster``) and
``ledgerd node`` processes per region, which tests and drills can kill, pause and restart.

Used by the crash tests, ``ledger-chaos`` and ``ledger-bench``. Every process is a real
process; a kill is a real SIGKILL, a pause a real SIGSTOP.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

# How long a node may take to print that it serves (s): a takeover replays journals.
NODE_START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class NodeProcess:
    """One ``ledgerd node`` process."""

    node_id: str
    region: str
    regions: list[str]
    cassandra: str  # host:port of the region's Cassandra node
    etcd: str
    keyspace: str
    prefix: str
    shards: int
    lease_ttl_s: float = 3.0
    takeover_grace_s: float = 1.0
    env: dict = field(default_factory=dict)
    log_dir: Path | None = None
    role: str = "full"  # or "coordinator": serves the API, owns no shards
    extra_args: list[str] = field(default_factory=list)  # more ``ledgerd node`` flags
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    started_at: float = 0.0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, wait: bool = True, failpoint: str | None = None) -> None:
        env = {**os.environ, **self.env}
        env.pop("LEDGER_FAILPOINT", None)
        if failpoint:
            env["LEDGER_FAILPOINT"] = failpoint
        cmd = [sys.executable, "-m", "ledger.cli.ledgerd", "node", "--region", self.region,
               "--regions", ",".join(self.regions), "--node-id", self.node_id,
               "--port", str(self.port), "--cassandra", self.cassandra, "--etcd", self.etcd,
               "--keyspace", self.keyspace, "--etcd-prefix", self.prefix,
               "--shards", str(self.shards), "--lease-ttl-s", str(self.lease_ttl_s),
               "--takeover-grace-s", str(self.takeover_grace_s),
               "--replication", ",".join(f"{r}=1" for r in self.regions),
               # One region cannot survive a region loss: a durable node refuses that
               # unless told it is a single-region (test) deployment.
               *(["--single-region-dev"] if len(self.regions) == 1 else []),
               "--role", self.role,
               "--log-level", env.get("LEDGER_LOG_LEVEL", "WARNING"), *self.extra_args]
        # stdout carries only the serving line; logs go to a file (or nowhere).
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log: IO[str] | int = open(self.log_dir / f"{self.node_id}.log", "a")
        else:
            log = subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                     env=env, start_new_session=True)
        self.started_at = time.monotonic()
        if wait:
            self.wait_serving()

    def wait_serving(self) -> None:
        """Block until the node printed its serving line (it then answers gRPC)."""
        assert self.proc is not None and self.proc.stdout is not None
        stdout = self.proc.stdout
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(NODE_START_TIMEOUT_S)
        line = result[0] if result else ""
        if "serving" not in line:
            self.kill()
            raise RuntimeError(f"node {self.node_id} did not start: {line!r}")
        # Keep draining stdout so the process never blocks on a full pipe.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.alive:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL: no cleanup, the lease is not revoked (others wait for its TTL)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM: a clean shutdown (gives shards up at once)."""
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()


class Deployment:
    """``nodes_per_region`` ledger nodes in each region of a running ``LocalCluster``;
    ``node_args`` are more ``ledgerd node`` flags for every node (``--envelope-shares-max
    2000``), kept for its restarts. ``keyspace``: serve that one (made by the first node if
    it does not exist) instead of a new ``ledger_<name>``."""

    def __init__(self, cluster, regions: list[str] | None = None, nodes_per_region: int = 1,
                 shards: int = 16, cql_port: int | None = None, lease_ttl_s: float = 3.0,
                 takeover_grace_s: float = 1.0, log_dir: Path | None = None,
                 name: str | None = None, coordinators_per_region: int = 0,
                 node_args: list[str] | None = None, keyspace: str | None = None) -> None:
        self.cluster = cluster
        self.regions = list(regions or cluster.regions)
        self.shards = shards
        self.name = name or "d" + uuid.uuid4().hex[:8]
        self.keyspace = keyspace or f"ledger_{self.name}"
        self.prefix = f"/{self.name}"
        port = cql_port or getattr(cluster, "cql_port", 9042)
        self.nodes: list[NodeProcess] = []
        for region in self.regions:
            for i in range(nodes_per_region):
                self.nodes.append(NodeProcess(
                    f"{region}-n{i}", region, self.regions,
                    f"{cluster.contact_points[region]}:{port}", cluster.etcd_endpoint,
                    self.keyspace, self.prefix, shards, lease_ttl_s, takeover_grace_s,
                    log_dir=log_dir, extra_args=list(node_args or [])))
            for i in range(coordinators_per_region):
                self.nodes.append(NodeProcess(
                    f"{region}-c{i}", region, self.regions,
                    f"{cluster.contact_points[region]}:{port}", cluster.etcd_endpoint,
                    self.keyspace, self.prefix, shards, lease_ttl_s, takeover_grace_s,
                    log_dir=log_dir, role="coordinator", extra_args=list(node_args or [])))

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes]

    def in_region(self, region: str) -> list[NodeProcess]:
        return [n for n in self.nodes if n.region == region]

    @property
    def owners(self) -> list[NodeProcess]:
        return [n for n in self.nodes if n.role == "full"]

    @property
    def coordinators(self) -> list[NodeProcess]:
        return [n for n in self.nodes if n.role == "coordinator"]

    def start(self) -> None:
        # The first node creates the keyspace and the shard map; the rest join after it.
        first, rest = self.nodes[0], self.nodes[1:]
        first.start()
        for node in rest:
            node.start(wait=False)
        for node in rest:
            node.wait_serving()

    def stop(self, drop_keyspace: bool = False) -> None:
        """Stop every node; optionally drop the deployment's keyspace. A long-lived test
        cluster holds every keyspace's tables in its heap, so tests drop what they made."""
        for node in self.nodes:
            node.stop()
        if drop_keyspace:
            from clients.localcluster import cql_query
            region = self.regions[0]
            try:
                cql_query(self.cluster.contact_points[region],
                          getattr(self.cluster, "cql_port", 9042),
                          f"DROP KEYSPACE IF EXISTS {self.keyspace}", 60.0)
            except Exception:  # best effort: a leftover keyspace only costs memory
                pass

    def store_args(self) -> dict:
        region = self.regions[0]
        return dict(contact_points=[self.cluster.contact_points[region]],
                    port=getattr(self.cluster, "cql_port", 9042), local_dc=region,
                    keyspace=self.keyspace, regions=list(self.regions),
                    require_region_survival=len(self.regions) > 1)
