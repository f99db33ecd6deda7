"""The ledger under test: ``ledgerd dev`` (embedded store) or ``ledgerd node`` on Cassandra +
etcd (one node per region), as its own processes, started and stopped by the bench like an
operator would; or a ledger already running (``--target``)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading

from clients.bench.envelopes import ENVELOPE_TOTAL_MAX_MINOR, shares_max_needed
from clients.localcluster import LocalCluster

# Ports of the cluster the bench starts when none is given: apart from `make services`
# (9042/7000/2379/2380) and the test cluster (29042/27000/33791/33801).
BENCH_CQL_PORT = 39142
BENCH_STORAGE_PORT = 37100
BENCH_ETCD_CLIENT_PORT = 43891
BENCH_ETCD_PEER_PORT = 43901
# How long the ledger may take to exit after SIGTERM before it is killed (s).
LEDGER_STOP_TIMEOUT_S = 60


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The ledger under test, and the cluster it runs on if the bench started it.

    * embedded: one ``ledgerd dev``;
    * cassandra, one region: Cassandra + etcd (``clients.localcluster``) and one
      ``ledgerd node --single-region-dev`` (keyspace {r1: 1});
    * cassandra, ``--regions r1,r2,r3``: one Cassandra datacenter per region (127.0.0.1-3)
      and one ``ledgerd node`` per region on the durable commit path (serial quorum across
      regions, one replica per region); the bench's traffic goes to the first region's node;
    * ``--target HOST:PORT``: a ledger that is already running; nothing is started.

    Every node the bench starts serves /metrics on a free port (``metrics_urls``); its pid
    (``ledger_pids``) and the cluster's Cassandra pids (``store_pids``) are what the bench
    reads CPU from.
    """

    def __init__(self, args) -> None:
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="ledger-bench-")
        self.procs: list[subprocess.Popen] = []
        self.cluster: LocalCluster | None = None
        self.target: str = args.target or ""
        self.ledger_pids: list[int] = list(args.ledger_pid or [])
        self.store_pids: list[int] = list(args.store_pid or [])
        self.metrics_urls: list[str] = list(args.metrics or [])
        self.cassandra: str | None = args.cassandra
        self.etcd: str | None = args.etcd

    @property
    def regions(self) -> list[str]:
        return self.args.regions.split(",") if self.args.regions else ["r1"]

    def start(self) -> None:
        """Start what the arguments ask for and wait for every ledger's serving line."""
        args = self.args
        if args.target:
            return
        if args.backend == "embedded":
            self._launch(["dev", "--data-dir", self.tmp, "--shards", str(args.shards),
                          *self._envelope_flags()])
            return
        if not args.cassandra:
            print(f"starting Cassandra + etcd (clients.localcluster), regions "
                  f"{','.join(self.regions)} ...", file=sys.stderr)
            self.cluster = LocalCluster(os.path.join(self.tmp, "cluster"), regions=self.regions,
                                        cql_port=BENCH_CQL_PORT,
                                        storage_port=BENCH_STORAGE_PORT,
                                        etcd_client_port=BENCH_ETCD_CLIENT_PORT,
                                        etcd_peer_port=BENCH_ETCD_PEER_PORT,
                                        heap_mb=args.heap_mb)
            self.cluster.start()
            self.cassandra = f"{self.cluster.contact_points[self.regions[0]]}:{BENCH_CQL_PORT}"
            self.etcd = self.cluster.etcd_endpoint
            status = self.cluster.status()
            self.store_pids += [status[name]["pid"] for name in status
                                if name.startswith("cassandra-") and status[name].get("pid")]
        keyspace = f"bench_{os.getpid()}"
        for i, region in enumerate(self.regions):
            contact = (f"{self.cluster.contact_points[region]}:{BENCH_CQL_PORT}"
                       if self.cluster else self.cassandra)
            cmd = ["node", "--region", region, "--regions", ",".join(self.regions),
                   "--cassandra", str(contact), "--etcd", str(self.etcd),
                   "--keyspace", keyspace, "--shards", str(args.shards)]
            if len(self.regions) == 1:
                # One region ({r1: 1}): accepted for a benchmark, not for production.
                cmd.append("--single-region-dev")
            self._launch([*cmd, *self._envelope_flags()], first=i == 0)

    def _envelope_flags(self) -> list[str]:
        """Red-envelope rules that let the bench's envelopes exist: the hot envelope has one
        share per receiver (10,000 by default; the ledger's default allows 100) of 1.00."""
        return ["--envelope-shares-max", str(shares_max_needed(self.args)),
                "--envelope-total-max-minor", str(ENVELOPE_TOTAL_MAX_MINOR)]

    def _launch(self, cmd: list[str], first: bool = True) -> None:
        """Start one ledgerd with a free gRPC port and a free metrics port."""
        port, metrics_port = free_port(), free_port()
        full = [sys.executable, "-m", "ledger.cli.ledgerd", *cmd, "--port", str(port),
                "--metrics-port", str(metrics_port), "--log-level", "WARNING"]
        proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        self.procs.append(proc)
        assert proc.stdout is not None  # stdout=PIPE
        # Warnings may come before the serving line (e.g. a one-region keyspace's replication
        # warning, stderr being merged): show them, and wait for the line or the exit.
        while "serving" not in (line := proc.stdout.readline()):
            if not line:
                raise SystemExit(f"ledger did not start (exit status {proc.wait()})")
            print(f"ledgerd: {line.rstrip()}", file=sys.stderr)
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        self.ledger_pids.append(proc.pid)
        self.metrics_urls.append(f"http://127.0.0.1:{metrics_port}/metrics")
        if first:
            self.target = f"127.0.0.1:{port}"

    def stop(self) -> None:
        """SIGTERM the ledgers, stop the cluster the bench started, remove its files."""
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=LEDGER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.cluster is not None:
            self.cluster.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)
