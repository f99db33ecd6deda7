"""The ledger under test: ``ledgerd dev`` (embedded store) or ``ledgerd node`` on Cassandra +
etcd, as its own process, started and stopped by the bench like an operator would."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading

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
    """The ledger process under test (and the cluster it runs on, if the bench started it)."""

    def __init__(self, args) -> None:
        self.args = args
        self.port = free_port()
        self.tmp = tempfile.mkdtemp(prefix="ledger-bench-")
        self.proc: subprocess.Popen | None = None
        self.cluster: LocalCluster | None = None

    def start(self) -> None:
        """Start the ledger (and a one-region cluster unless ``--cassandra`` names one) and
        wait for its serving line."""
        args = self.args
        if args.backend == "embedded":
            cmd = [sys.executable, "-m", "ledger.cli.ledgerd", "dev", "--port", str(self.port),
                   "--data-dir", self.tmp, "--shards", str(args.shards), "--log-level", "WARNING"]
        else:
            if args.cassandra:
                self.cassandra, self.etcd = args.cassandra, args.etcd
            else:
                print("starting Cassandra + etcd (clients.localcluster) ...", file=sys.stderr)
                self.cluster = LocalCluster(os.path.join(self.tmp, "cluster"), regions=["r1"],
                                            cql_port=BENCH_CQL_PORT,
                                            storage_port=BENCH_STORAGE_PORT,
                                            etcd_client_port=BENCH_ETCD_CLIENT_PORT,
                                            etcd_peer_port=BENCH_ETCD_PEER_PORT,
                                            heap_mb=args.heap_mb)
                self.cluster.start()
                self.cassandra = f"{self.cluster.contact_points['r1']}:{BENCH_CQL_PORT}"
                self.etcd = self.cluster.etcd_endpoint
            cmd = [sys.executable, "-m", "ledger.cli.ledgerd", "node", "--region", "r1",
                   "--port", str(self.port), "--cassandra", self.cassandra, "--etcd", self.etcd,
                   "--keyspace", f"bench_{os.getpid()}", "--shards", str(args.shards),
                   # One region ({r1: 1}): accepted for a benchmark, not for production.
                   "--single-region-dev", "--log-level", "WARNING"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        assert self.proc.stdout is not None  # stdout=PIPE
        line = self.proc.stdout.readline()
        if "serving" not in line:
            raise SystemExit(f"ledger did not start: {line}{self.proc.stdout.read()}")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def stop(self) -> None:
        """SIGTERM the ledger, stop the cluster the bench started, remove its files."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=LEDGER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.cluster is not None:
            self.cluster.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

