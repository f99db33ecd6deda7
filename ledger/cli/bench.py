"""``ledger-bench``: throughput and latency of the ledger, with a naive baseline in the same run.

    ledger-bench [--backend embedded|cassandra] [--seconds 10] [--wallets 10000]
                 [--batch 2000] [--batches-in-flight 2] [--clients 32]

The ledger runs as its own process (``ledgerd dev``, or ``ledgerd node`` on Cassandra + etcd
started by ``ledger.localcluster``); this process is the load generator, through gRPC.
Workloads:

* batch:  BatchTransfer calls of ``--batch`` random transfers (almost all cross-shard);
          committed transfers per second and per-call latency.
* single: ``--clients`` concurrent clients each sending one Transfer at a time.
* naive:  the same transfers done the naive way against the same kind of store, from this
          process: one transaction per balance change (SQLite: one durable transaction per
          transfer; Cassandra: one lightweight transaction per balance change). The ratio
          batch/naive shows what single-writer shards with group commit buy.

Figures are printed as a table (and ``--json``). Nothing is asserted: this is a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from clients import LedgerClient
from ledger.ledgerpb import ledger_pb2 as pb

if TYPE_CHECKING:
    from ledger.localcluster import LocalCluster

CURRENCY = "CNY"
FUND_MINOR = 10**12


@dataclass
class Result:
    name: str
    committed: int = 0
    refused: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def per_s(self) -> float:
        return self.committed / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def row(self) -> dict:
        return {"workload": self.name, "committed": self.committed, "refused": self.refused,
                "seconds": round(self.seconds, 2), "per_s": round(self.per_s, 1),
                "p50_ms": round(self.pct(0.50), 2), "p99_ms": round(self.pct(0.99), 2)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the server under test ----------------------------------------------------------------

class Server:
    def __init__(self, args) -> None:
        self.args = args
        self.port = free_port()
        self.tmp = tempfile.mkdtemp(prefix="ledger-bench-")
        self.proc: subprocess.Popen | None = None
        self.cluster: LocalCluster | None = None

    def start(self) -> None:
        args = self.args
        if args.backend == "embedded":
            cmd = [sys.executable, "-m", "ledger.cli.ledgerd", "dev", "--port", str(self.port),
                   "--data-dir", self.tmp, "--shards", str(args.shards), "--log-level", "WARNING"]
        else:
            from ledger.localcluster import LocalCluster
            if args.cassandra:
                self.cassandra, self.etcd = args.cassandra, args.etcd
            else:
                print("starting Cassandra + etcd (ledger.localcluster) ...", file=sys.stderr)
                self.cluster = LocalCluster(os.path.join(self.tmp, "cluster"), regions=["r1"],
                                            cql_port=39142, storage_port=37100,
                                            etcd_client_port=43891, etcd_peer_port=43901,
                                            heap_mb=args.heap_mb)
                self.cluster.start()
                self.cassandra = f"{self.cluster.contact_points['r1']}:39142"
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
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.cluster is not None:
            self.cluster.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


# --- workloads through the ledger ---------------------------------------------------------

async def setup_wallets(client: LedgerClient, wallets: list[str]) -> None:
    sem = asyncio.Semaphore(64)

    async def one(w: str) -> None:
        async with sem:
            await client.create_wallet(w, CURRENCY, idempotency_key="c-" + w)
            await client.deposit(w, FUND_MINOR, CURRENCY, idempotency_key="d-" + w)
    await asyncio.gather(*(one(w) for w in wallets))


def random_pair(rng: random.Random, wallets: list[str]) -> tuple[str, str]:
    a, b = rng.sample(wallets, 2)
    return a, b


async def run_batch(client: LedgerClient, wallets: list[str], args, rng) -> Result:
    result = Result("batch")
    counter = 0

    def make_batch() -> list[pb.TransferRequest]:
        nonlocal counter
        items = []
        for _ in range(args.batch):
            a, b = random_pair(rng, wallets)
            counter += 1
            items.append(pb.TransferRequest(idempotency_key=f"b{counter}", from_wallet_id=a,
                                            to_wallet_id=b, amount_minor=1, currency=CURRENCY))
        return items

    pool = [make_batch() for _ in range(args.batches_in_flight * 3)]
    deadline = time.monotonic() + args.seconds

    async def worker() -> None:
        while time.monotonic() < deadline:
            items = pool.pop() if pool else make_batch()
            started = time.perf_counter()
            response = await client.batch_transfer(items)
            result.latencies_ms.append((time.perf_counter() - started) * 1000)
            for r in response.results:
                if r.status == pb.RESULT_STATUS_OK:
                    result.committed += 1
                else:
                    result.refused += 1
    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(args.batches_in_flight)))
    result.seconds = time.monotonic() - started
    return result


async def run_single(client: LedgerClient, wallets: list[str], args, rng) -> Result:
    result = Result(f"single x{args.clients}")
    deadline = time.monotonic() + args.seconds
    counter = 0

    async def worker() -> None:
        nonlocal counter
        while time.monotonic() < deadline:
            a, b = random_pair(rng, wallets)
            counter += 1
            started = time.perf_counter()
            try:
                await client.transfer(a, b, 1, CURRENCY, idempotency_key=f"s{counter}")
                result.committed += 1
            except Exception:
                result.refused += 1
            result.latencies_ms.append((time.perf_counter() - started) * 1000)
    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(args.clients)))
    result.seconds = time.monotonic() - started
    return result


# --- the naive baseline -------------------------------------------------------------------

def naive_sqlite(wallets: list[str], args, rng) -> Result:
    """One durable SQLite transaction per transfer, from ``--clients`` threads."""
    result = Result("naive sqlite")
    path = os.path.join(tempfile.mkdtemp(prefix="ledger-naive-"), "naive.sqlite3")
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE balances (id TEXT PRIMARY KEY, balance INTEGER NOT NULL)")
    db.execute("CREATE TABLE transfers (id TEXT PRIMARY KEY, src TEXT, dst TEXT, amount INT)")
    db.executemany("INSERT INTO balances VALUES (?, ?)", [(w, FUND_MINOR) for w in wallets])
    db.commit()
    db.close()
    deadline = time.monotonic() + args.seconds
    lock = threading.Lock()
    counter = iter(range(10**12))

    def worker(seed: int) -> None:
        local = random.Random(seed)
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        conn.execute("PRAGMA synchronous=FULL")
        while time.monotonic() < deadline:
            a, b = random_pair(local, wallets)
            started = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            (balance,) = conn.execute("SELECT balance FROM balances WHERE id = ?",
                                      (a,)).fetchone()
            if balance >= 1:
                conn.execute("UPDATE balances SET balance = balance - 1 WHERE id = ?", (a,))
                conn.execute("UPDATE balances SET balance = balance + 1 WHERE id = ?", (b,))
                conn.execute("INSERT INTO transfers VALUES (?, ?, ?, 1)",
                             (f"n{next(counter)}", a, b))
            conn.execute("COMMIT")
            with lock:
                result.committed += 1
                result.latencies_ms.append((time.perf_counter() - started) * 1000)
        conn.close()
    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(min(args.clients, 8))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.monotonic() - started
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    return result


def naive_cassandra(server: Server, wallets: list[str], args) -> Result:
    """Each balance change is its own lightweight transaction (read, then CAS), like a naive
    service that keeps balances in Cassandra rows and guards them with Paxos."""
    from cassandra import ConsistencyLevel
    from cassandra.cluster import Cluster
    from cassandra.policies import DCAwareRoundRobinPolicy

    result = Result("naive cassandra LWT")
    host, _, port = server.cassandra.partition(":")
    # TCP_NODELAY as in the ledger's store: without it, the driver's multi-packet requests
    # wait for delayed ACKs (~40 ms each) and the baseline would look far worse than it is.
    cluster = Cluster([host], port=int(port), load_balancing_policy=DCAwareRoundRobinPolicy("r1"),
                      protocol_version=5,
                      sockopts=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    session = cluster.connect()
    session.execute("CREATE KEYSPACE IF NOT EXISTS naive_bench WITH replication = "
                    "{'class': 'NetworkTopologyStrategy', 'r1': 1}", timeout=60)
    session.execute("CREATE TABLE IF NOT EXISTS naive_bench.balances "
                    "(id text PRIMARY KEY, balance bigint)", timeout=60)
    insert = session.prepare("INSERT INTO naive_bench.balances (id, balance) VALUES (?, ?)")
    for w in wallets:
        session.execute(insert, (w, FUND_MINOR))
    read = session.prepare("SELECT balance FROM naive_bench.balances WHERE id = ?")
    read.consistency_level = ConsistencyLevel.SERIAL
    cas = session.prepare("UPDATE naive_bench.balances SET balance = ? WHERE id = ? "
                          "IF balance = ?")
    cas.consistency_level = ConsistencyLevel.QUORUM
    cas.serial_consistency_level = ConsistencyLevel.SERIAL
    deadline = time.monotonic() + args.seconds
    lock = threading.Lock()

    def change(wallet_id: str, delta: int) -> None:
        while True:
            (balance,) = session.execute(read, (wallet_id,)).one()
            if session.execute(cas, (balance + delta, wallet_id, balance)).one()[0]:
                return

    def worker(seed: int) -> None:
        local = random.Random(seed)
        while time.monotonic() < deadline:
            a, b = random_pair(local, wallets)
            started = time.perf_counter()
            change(a, -1)
            change(b, +1)
            with lock:
                result.committed += 1
                result.latencies_ms.append((time.perf_counter() - started) * 1000)
    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(min(args.clients, 16))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.monotonic() - started
    try:
        session.execute("DROP KEYSPACE naive_bench", timeout=60)
    except Exception as exc:  # leftover keyspace: harmless, recreated next run
        print(f"(could not drop naive_bench: {exc})", file=sys.stderr)
    cluster.shutdown()
    return result


# --- main ---------------------------------------------------------------------------------

async def measure(server: Server, args) -> list[Result]:
    rng = random.Random(args.seed)
    wallets = [f"bw{i}" for i in range(args.wallets)]
    async with LedgerClient(f"127.0.0.1:{server.port}", caller="bench", timeout_s=120) as client:
        t0 = time.monotonic()
        await setup_wallets(client, wallets)
        print(f"set up {len(wallets)} wallets in {time.monotonic() - t0:.1f} s",
              file=sys.stderr)
        results = []
        print("batch ...", file=sys.stderr)
        results.append(await run_batch(client, wallets, args, rng))
        print("single ...", file=sys.stderr)
        results.append(await run_single(client, wallets, args, rng))
    print("naive ...", file=sys.stderr)
    if args.backend == "embedded":
        results.append(naive_sqlite(wallets, args, rng))
    else:
        results.append(await asyncio.to_thread(naive_cassandra, server, wallets, args))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ledger-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["embedded", "cassandra"], default="embedded")
    parser.add_argument("--seconds", type=float, default=10.0, help="per workload")
    parser.add_argument("--wallets", type=int, default=10_000)
    parser.add_argument("--shards", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2_000)
    parser.add_argument("--batches-in-flight", type=int, default=2)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--heap-mb", type=int, default=1024)
    parser.add_argument("--cassandra", default=None, help="use running servers: HOST:PORT")
    parser.add_argument("--etcd", default=None, help="with --cassandra: HOST:PORT")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    server = Server(args)
    try:
        server.start()
        results = asyncio.run(measure(server, args))
    finally:
        server.stop()
    naive = results[-1].per_s
    rows = [r.row() | {"x_naive": round(r.per_s / naive, 2) if naive else None}
            for r in results]
    if args.json:
        print(json.dumps({"backend": args.backend, "nproc": os.cpu_count(),
                          "args": vars(args), "results": rows}, indent=2))
        return 0
    print(f"\nledger-bench: backend={args.backend}, {args.shards} shards, {args.wallets} "
          f"wallets, {os.cpu_count()} cores, {args.seconds:.0f} s per workload")
    print(f"{'workload':<22}{'committed':>10}{'per s':>10}{'p50 ms':>10}{'p99 ms':>10}"
          f"{'x naive':>9}")
    for r in rows:
        print(f"{r['workload']:<22}{r['committed']:>10}{r['per_s']:>10.0f}{r['p50_ms']:>10.1f}"
              f"{r['p99_ms']:>10.1f}{r['x_naive']:>9.2f}")
    print(f"(batch: {args.batch} transfers per BatchTransfer call, {args.batches_in_flight} "
          f"calls in flight; latencies are per call)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
