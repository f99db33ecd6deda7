"""The naive baselines: the same transfers done the naive way against the same kind of store,
from the bench process: one transaction per balance change (SQLite: one durable transaction
per transfer; Cassandra: one lightweight transaction per balance change). The ratio
batch/naive shows what single-writer shards with group commit buy.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import sqlite3
import sys
import tempfile
import threading
import time

from clients.bench.workloads import FUND_MINOR, Result, random_pair

# Threads of the naive baselines at most: SQLite serializes writers anyway, and more
# Cassandra threads than this only queue on the 2 cores.
NAIVE_SQLITE_THREADS_MAX = 8
NAIVE_CASSANDRA_THREADS_MAX = 16
# Deadline of the baseline's schema statements (s).
NAIVE_DDL_TIMEOUT_S = 60


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
    t0 = time.monotonic()
    deadline = t0 + args.seconds
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
            latency_ms = (time.perf_counter() - started) * 1000
            with lock:
                result.committed += 1
                result.latencies_ms.append(latency_ms)
                result.samples.append((time.monotonic() - t0, latency_ms, 1))
        conn.close()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(min(args.clients, NAIVE_SQLITE_THREADS_MAX))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.monotonic() - t0
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    return result


def naive_cassandra(cassandra: str, wallets: list[str], args,
                    regions: list[str] | None = None) -> Result:
    """Each balance change is its own lightweight transaction (read, then CAS), like a naive
    service that keeps balances in Cassandra rows and guards them with Paxos.

    Args:
        cassandra: HOST:PORT of the Cassandra node the ledger under test uses.
        wallets: The wallet ids (funded here in a keyspace of the baseline's own).
        args: The bench's arguments (``seconds``, ``clients``).
        regions: The datacenters to replicate to, one replica each (default: r1 only); the
            first is the local one. On three regions a QUORUM write and a SERIAL round span
            regions, like the ledger's durable commit path: the same price on both sides.
    """
    from cassandra import ConsistencyLevel
    from cassandra.cluster import Cluster
    from cassandra.policies import DCAwareRoundRobinPolicy

    result = Result("naive cassandra LWT")
    host, _, port = cassandra.partition(":")
    regions = regions or ["r1"]
    replication = ", ".join(f"'{dc}': 1" for dc in regions)
    # TCP_NODELAY as in the ledger's store: without it, the driver's multi-packet requests
    # wait for delayed ACKs (~40 ms each) and the baseline would look far worse than it is.
    cluster = Cluster([host], port=int(port),
                      load_balancing_policy=DCAwareRoundRobinPolicy(regions[0]),
                      protocol_version=5,
                      sockopts=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    session = cluster.connect()
    session.execute("CREATE KEYSPACE IF NOT EXISTS naive_bench WITH replication = "
                    f"{{'class': 'NetworkTopologyStrategy', {replication}}}",
                    timeout=NAIVE_DDL_TIMEOUT_S)
    session.execute("CREATE TABLE IF NOT EXISTS naive_bench.balances "
                    "(id text PRIMARY KEY, balance bigint)", timeout=NAIVE_DDL_TIMEOUT_S)
    insert = session.prepare("INSERT INTO naive_bench.balances (id, balance) VALUES (?, ?)")
    for w in wallets:
        session.execute(insert, (w, FUND_MINOR))
    read = session.prepare("SELECT balance FROM naive_bench.balances WHERE id = ?")
    read.consistency_level = ConsistencyLevel.SERIAL
    cas = session.prepare("UPDATE naive_bench.balances SET balance = ? WHERE id = ? "
                          "IF balance = ?")
    cas.consistency_level = ConsistencyLevel.QUORUM
    cas.serial_consistency_level = ConsistencyLevel.SERIAL
    t0 = time.monotonic()
    deadline = t0 + args.seconds
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
            latency_ms = (time.perf_counter() - started) * 1000
            with lock:
                result.committed += 1
                result.latencies_ms.append(latency_ms)
                result.samples.append((time.monotonic() - t0, latency_ms, 1))
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(min(args.clients, NAIVE_CASSANDRA_THREADS_MAX))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.monotonic() - t0
    try:
        session.execute("DROP KEYSPACE naive_bench", timeout=NAIVE_DDL_TIMEOUT_S)
    except Exception as exc:  # leftover keyspace: harmless, recreated next run
        print(f"(could not drop naive_bench: {exc})", file=sys.stderr)
    cluster.shutdown()
    return result

