"""The naive baselines: the same transfers done the naive way against the same kind of store,
from the bench process: one transaction per balance change (SQLite: one durable transaction
per transfer; Cassandra: one lightweight transaction per balance change). The ratio
batch/naive shows what single-writer shards with group commit buy.

The naive red envelope (``naive-envelope``): the envelope is one row; each grab is one
transaction on it (SQLite: a durable transaction that reads what is left, draws, updates and
records the grab; Cassandra: one lightweight transaction ``UPDATE ... IF left_shares = ?``),
then each credit is one more (the receiver's balance). The ratio hot-envelope/naive-envelope
shows what serializing an envelope's grabs in its shard owner, with group commit, buys.
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

from clients.bench.envelopes import SHARE_MINOR
from clients.bench.workloads import FUND_MINOR, Result, random_pair

# Threads of the naive baselines at most: SQLite serializes writers anyway, and more
# Cassandra threads than this only queue on the 2 cores.
NAIVE_SQLITE_THREADS_MAX = 8
NAIVE_CASSANDRA_THREADS_MAX = 16
# Deadline of the baseline's schema statements (s).
NAIVE_DDL_TIMEOUT_S = 60
# Rows the Cassandra baseline inserts concurrently while setting up.
NAIVE_SETUP_CONCURRENCY = 64


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
    result = Result("naive cassandra LWT")
    cluster, session = _naive_session(cassandra, regions)
    insert = session.prepare("INSERT INTO naive_bench.balances (id, balance) VALUES (?, ?)")
    for w in wallets:
        session.execute(insert, (w, FUND_MINOR))
    t0 = time.monotonic()
    deadline = t0 + args.seconds
    lock = threading.Lock()
    change = _balance_change(session)

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
    _drop(cluster, session)
    return result



def _naive_session(cassandra: str, regions: list[str] | None):
    """(cluster, session) on the baseline's own keyspace ``naive_bench`` (with its balances
    table), replicated one replica per region like the ledger under test."""
    from cassandra.cluster import Cluster
    from cassandra.policies import DCAwareRoundRobinPolicy

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
    return cluster, session


def _balance_change(session):
    """``change(wallet_id, delta)``: one balance change as a lightweight transaction (a
    SERIAL read, then ``UPDATE ... IF balance = <read>``, again until it applies); returns
    the compare-and-set attempts it took."""
    from cassandra import ConsistencyLevel

    read = session.prepare("SELECT balance FROM naive_bench.balances WHERE id = ?")
    read.consistency_level = ConsistencyLevel.SERIAL
    cas = session.prepare("UPDATE naive_bench.balances SET balance = ? WHERE id = ? "
                          "IF balance = ?")
    cas.consistency_level = ConsistencyLevel.QUORUM
    cas.serial_consistency_level = ConsistencyLevel.SERIAL

    def change(wallet_id: str, delta: int) -> int:
        attempts = 0
        while True:
            attempts += 1
            (balance,) = session.execute(read, (wallet_id,)).one()
            if session.execute(cas, (balance + delta, wallet_id, balance)).one()[0]:
                return attempts
    return change


def _drop(cluster, session) -> None:
    try:
        session.execute("DROP KEYSPACE naive_bench", timeout=NAIVE_DDL_TIMEOUT_S)
    except Exception as exc:  # leftover keyspace: harmless, recreated next run
        print(f"(could not drop naive_bench: {exc})", file=sys.stderr)
    cluster.shutdown()


# --- the naive red envelope ------------------------------------------------------------------

# The naive envelope: LUCKY, 1.00 a share on average, drawn by the double-mean rule (as the
# ledger draws: uniform between the minimum and twice the mean of what is left) from a
# random generator of its own, seeded by --seed.
NAIVE_SHARE_MIN_MINOR = 1


def double_mean_share(rng: random.Random, left_shares: int, left_minor: int,
                      min_minor: int = NAIVE_SHARE_MIN_MINOR) -> int:
    """One LUCKY share: the last share takes what is left; any other is uniform in [min,
    2 x the mean left - min], and never leaves less than the minimum for the others."""
    if left_shares == 1:
        return left_minor
    upper = min(2 * left_minor // left_shares - min_minor,
                left_minor - min_minor * (left_shares - 1))
    return rng.randint(min_minor, max(min_minor, upper))


class _NaiveEnvelope:
    """What the threads of a naive envelope run share: the receivers still to grab, the
    figures, and the grabs (for the check)."""

    def __init__(self, name: str, receivers: list[str], args) -> None:
        self.result = Result(name, family="envelope")
        self.queue = list(reversed(receivers))
        self.shares = len(receivers)
        self.total = self.shares * SHARE_MINOR
        self.lock = threading.Lock()
        self.amounts: dict[int, tuple[str, int]] = {}   # position -> (receiver, amount)
        self.last_credit = 0.0
        self.rng = random.Random(args.seed)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.seconds

    def next_receiver(self) -> str | None:
        with self.lock:
            if not self.queue or time.monotonic() >= self.deadline:
                return None
            return self.queue.pop()

    def draw(self, left_shares: int, left_minor: int) -> tuple[int, int]:
        """(position, amount) of the next grab (threads share the generator: locked)."""
        with self.lock:
            amount = double_mean_share(self.rng, left_shares, left_minor)
        return self.shares - left_shares, amount

    def grabbed(self, position: int, receiver: str, amount: int, latency_ms: float) -> None:
        with self.lock:
            self.amounts[position] = (receiver, amount)
            r = self.result
            r.committed += 1
            r.latencies_ms.append(latency_ms)
            r.samples.append((time.monotonic() - self.t0, latency_ms, 1))

    def credited(self) -> None:
        with self.lock:
            self.last_credit = time.monotonic() - self.t0

    def run(self, worker, threads: int) -> None:
        pool = [threading.Thread(target=worker) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        self.result.seconds = time.monotonic() - self.t0

    def finish(self, left_minor: int, left_shares: int, balances: dict[str, int],
               extra: dict) -> Result:
        """The row's envelope fields and the check: positions 0..n-1 once each, one grab per
        receiver, the amounts and what is left summing to the total, every receiver's
        balance its amount."""
        r = self.result
        grabbed = len(self.amounts)
        all_done = left_shares == 0 and grabbed == self.shares
        problems = []
        if sorted(self.amounts) != list(range(grabbed)):
            problems.append("positions are not 0..n-1")
        if len({rcv for rcv, _ in self.amounts.values()}) != grabbed:
            problems.append("a receiver grabbed twice")
        total = sum(a for _, a in self.amounts.values())
        if total + left_minor != self.total or grabbed + left_shares != self.shares:
            problems.append(f"grabbed {total} + left {left_minor} != total {self.total}")
        wrong = sum(1 for rcv, a in self.amounts.values() if balances.get(rcv) != a)
        if wrong:
            problems.append(f"{wrong} receivers' balances differ from their grabs")
        credited_s = self.last_credit if all_done else None
        check = "; ".join(problems) if problems else (
            f"{grabbed} grabs, sums = total, balances = grabs"
            + ("" if all_done else f" (time-bounded: {left_shares} shares left after "
                                   f"{r.seconds:.0f} s)"))
        r.fields.update({"envelopes": 1, "receivers": self.shares, "grabs": grabbed,
                         "credited_s": round(credited_s, 3) if credited_s else None,
                         "credits_per_s": round(grabbed / credited_s, 1) if credited_s
                         else round(grabbed / r.seconds, 1) if r.seconds else None,
                         "correct": not problems, "check": check, **extra})
        return r


def naive_envelope_sqlite(receivers: list[str], args) -> Result:
    """The naive red envelope on SQLite: the envelope is a row; each grab is one durable
    transaction on it (read what is left, draw, update it, record the grab), then its credit
    is one more (the receiver's balance), from ``min(--clients, 8)`` threads, until every
    receiver grabbed or ``--seconds`` passed. Latency: the grab's transaction (its answer);
    ``credited_s``: until the last credit committed."""
    naive = _NaiveEnvelope("naive-envelope sqlite", receivers, args)
    path = os.path.join(tempfile.mkdtemp(prefix="ledger-naive-"), "naive.sqlite3")
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE envelope (id TEXT PRIMARY KEY, left_shares INT, left_minor INT)")
    db.execute("CREATE TABLE grabs (position INT PRIMARY KEY, receiver TEXT UNIQUE, "
               "amount INT)")
    db.execute("CREATE TABLE balances (id TEXT PRIMARY KEY, balance INTEGER NOT NULL)")
    db.executemany("INSERT INTO balances VALUES (?, 0)", [(w,) for w in receivers])
    db.execute("INSERT INTO envelope VALUES ('e', ?, ?)", (naive.shares, naive.total))
    db.commit()
    db.close()
    naive.t0 = time.monotonic()
    naive.deadline = naive.t0 + args.seconds

    def worker() -> None:
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        conn.execute("PRAGMA synchronous=FULL")
        while (receiver := naive.next_receiver()) is not None:
            started = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            left_shares, left_minor = conn.execute(
                "SELECT left_shares, left_minor FROM envelope WHERE id = 'e'").fetchone()
            if left_shares == 0:
                conn.execute("COMMIT")
                break
            position, amount = naive.draw(left_shares, left_minor)
            conn.execute("UPDATE envelope SET left_shares = ?, left_minor = ? WHERE id = 'e'",
                         (left_shares - 1, left_minor - amount))
            conn.execute("INSERT INTO grabs VALUES (?, ?, ?)", (position, receiver, amount))
            conn.execute("COMMIT")
            naive.grabbed(position, receiver, amount, (time.perf_counter() - started) * 1000)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE balances SET balance = balance + ? WHERE id = ?",
                         (amount, receiver))
            conn.execute("COMMIT")
            naive.credited()
        conn.close()
    naive.run(worker, min(args.clients, NAIVE_SQLITE_THREADS_MAX))
    db = sqlite3.connect(path)
    left_shares, left_minor = db.execute(
        "SELECT left_shares, left_minor FROM envelope").fetchone()
    balances = dict(db.execute("SELECT id, balance FROM balances WHERE balance > 0"))
    db.close()
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    return naive.finish(left_minor, left_shares, balances,
                        {"transactions_per_grab": 2})


def naive_envelope_cassandra(cassandra: str, receivers: list[str], args,
                             regions: list[str] | None = None) -> Result:
    """The naive red envelope on Cassandra: the envelope is a row; each grab is one
    lightweight transaction on it (a SERIAL read of what is left, the draw, then
    ``UPDATE ... IF left_shares = <read>``, again until it applies), then the grab's row
    (a plain write: its position is the winner's own), then the credit, one more
    lightweight transaction on the receiver's balance (as ``naive_cassandra``). From
    ``min(--clients, 16)`` threads, until every receiver grabbed or ``--seconds`` passed.
    The one-grab-per-receiver rule would cost another LWT in a real naive service; here the
    receivers are distinct by construction. ``cas_per_grab``: compare-and-set attempts per
    grab, the hot row's contention."""
    from cassandra import ConsistencyLevel
    from cassandra.concurrent import execute_concurrent_with_args

    naive = _NaiveEnvelope("naive-envelope LWT", receivers, args)
    cluster, session = _naive_session(cassandra, regions)
    session.execute("CREATE TABLE IF NOT EXISTS naive_bench.envelopes (id text PRIMARY KEY, "
                    "left_shares int, left_minor bigint)", timeout=NAIVE_DDL_TIMEOUT_S)
    session.execute("CREATE TABLE IF NOT EXISTS naive_bench.grabs (envelope_id text, "
                    "position int, receiver text, amount bigint, "
                    "PRIMARY KEY (envelope_id, position))", timeout=NAIVE_DDL_TIMEOUT_S)
    insert = session.prepare("INSERT INTO naive_bench.balances (id, balance) VALUES (?, 0)")
    execute_concurrent_with_args(session, insert, [(w,) for w in receivers],
                                 concurrency=NAIVE_SETUP_CONCURRENCY)
    envelope_id = f"naive-{args.run_id}"
    session.execute("INSERT INTO naive_bench.envelopes (id, left_shares, left_minor) "
                    "VALUES (%s, %s, %s)", (envelope_id, naive.shares, naive.total))
    read = session.prepare("SELECT left_shares, left_minor FROM naive_bench.envelopes "
                           "WHERE id = ?")
    read.consistency_level = ConsistencyLevel.SERIAL
    cas = session.prepare("UPDATE naive_bench.envelopes SET left_shares = ?, left_minor = ? "
                          "WHERE id = ? IF left_shares = ?")
    cas.consistency_level = ConsistencyLevel.QUORUM
    cas.serial_consistency_level = ConsistencyLevel.SERIAL
    record = session.prepare("INSERT INTO naive_bench.grabs (envelope_id, position, "
                             "receiver, amount) VALUES (?, ?, ?, ?)")
    record.consistency_level = ConsistencyLevel.QUORUM
    change = _balance_change(session)
    attempts = [0, 0]  # grab CAS attempts, credit CAS attempts

    def worker() -> None:
        while (receiver := naive.next_receiver()) is not None:
            started = time.perf_counter()
            tries = 0
            while True:
                tries += 1
                left_shares, left_minor = session.execute(read, (envelope_id,)).one()
                if left_shares == 0:
                    return
                position, amount = naive.draw(left_shares, left_minor)
                if session.execute(cas, (left_shares - 1, left_minor - amount, envelope_id,
                                         left_shares)).one()[0]:
                    break
            session.execute(record, (envelope_id, position, receiver, amount))
            naive.grabbed(position, receiver, amount, (time.perf_counter() - started) * 1000)
            credit_tries = change(receiver, amount)
            naive.credited()
            with naive.lock:
                attempts[0] += tries
                attempts[1] += credit_tries
    naive.run(worker, min(args.clients, NAIVE_CASSANDRA_THREADS_MAX))
    left_shares, left_minor = session.execute(read, (envelope_id,)).one()
    balances = {w: b for w, b in session.execute(
        "SELECT id, balance FROM naive_bench.balances") if b}
    grabbed = max(1, len(naive.amounts))
    _drop(cluster, session)
    return naive.finish(left_minor, left_shares, balances,
                        {"cas_per_grab": round(attempts[0] / grabbed, 2),
                         "cas_per_credit": round(attempts[1] / grabbed, 2)})
