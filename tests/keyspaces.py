"""Test keyspaces on the session cluster, reused instead of created and dropped per test.

Why: on the three-region test cluster a fresh ledger keyspace costs ~15 s (its 14 DDL
statements each wait for schema agreement) and dropping it ~3 s more; about fifty tests make
one, which was over a third of ``make test``. Handing a used keyspace to the next test costs
~3 s instead: every table but the journal is truncated, and ``epoch_journal`` is dropped and
created again. Measured on the session cluster (2026-11-27, ``/tmp/reset.py`` of that
session): fresh keyspace 15.0-15.4 s to connect, reset 2.8-2.9 s, connect to the reset one
0.18 s.

Why the journal is recreated rather than truncated: it is the one table written with
lightweight transactions (the fencing ``IF epoch = ...``), and Cassandra keeps Paxos state per
(table id, partition) in ``system.paxos``, which TRUNCATE leaves alone. A proposal the last
test left accepted but uncommitted (a node killed mid-fence) could otherwise be completed into
the next test's empty journal. A recreated table has a new id, so no old Paxos state applies.

What a test may rely on: the keyspace it takes has every table of the schema, all empty, and
no node of an earlier test still writes to it (a test gives a keyspace back only after every
server and node process on it stopped). A keyspace whose reset fails (a region down, a table
missing) is dropped, best effort, and the test gets a fresh name instead, created by whichever
store connects first, as before.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from dataclasses import dataclass

log = logging.getLogger("tests.keyspaces")

# Deadline of one TRUNCATE or DDL statement (s): both wait on every replica.
STATEMENT_TIMEOUT_S = 60.0
JOURNAL_TABLE = "epoch_journal"


@dataclass(frozen=True)
class TestKeyspace:
    """A keyspace lent to one test. ``tag`` differs on every loan: use it where a name must be
    new per test (an etcd prefix), since the keyspace name itself comes back."""

    __test__ = False  # not a pytest test class

    name: str
    tag: str


class KeyspacePool:
    """Keyspaces of the session cluster, lent to tests and reset between loans."""

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._lock = threading.Lock()
        self._free: dict[tuple, list[str]] = {}
        self._replication: dict[str, dict[str, int]] = {}
        self._loans = 0
        self._cluster = None
        self._session = None

    async def take(self, replication: dict[str, int], prefix: str) -> TestKeyspace:
        """An empty keyspace with ``replication`` (an earlier test's, reset, or a new name
        that the first store connecting with ``create_schema`` creates)."""
        return await asyncio.to_thread(self._take, dict(replication), prefix)

    async def give_back(self, keyspace: TestKeyspace | str) -> None:
        """Return a keyspace once nothing uses it any more (every server and node on it
        stopped). It is reset when next taken, not now."""
        name = keyspace.name if isinstance(keyspace, TestKeyspace) else keyspace
        with self._lock:
            replication = self._replication.get(name)
            if replication is not None:
                self._free.setdefault(_kind(replication), []).append(name)

    def close(self, drop: bool) -> None:
        """Drop every keyspace the pool made (``drop``: a cluster that outlives the session),
        then close the pool's connection."""
        try:
            if drop:
                for name in list(self._replication):
                    self._drop_quietly(name)
        finally:
            if self._cluster is not None:
                self._cluster.shutdown()

    def _take(self, replication: dict[str, int], prefix: str) -> TestKeyspace:
        with self._lock:
            self._loans += 1
            tag = str(self._loans)
            free = self._free.get(_kind(replication), [])
            name = free.pop() if free else None
        if name is not None:
            try:
                self._reset(name, replication)
                return TestKeyspace(name, f"{name}-{tag}")
            except Exception as exc:  # noqa: BLE001 - any failure: a fresh keyspace instead
                log.warning("keyspace %s could not be reset (%s): dropped, a fresh one instead",
                            name, exc)
                self._drop_quietly(name)
                with self._lock:
                    self._replication.pop(name, None)
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        with self._lock:
            self._replication[name] = replication
        return TestKeyspace(name, f"{name}-{tag}")

    def _reset(self, name: str, replication: dict[str, int]) -> None:
        from ledger.store.cassandra.schema import schema_ddl

        session = self._connect()
        ddl = schema_ddl(name, replication)
        wanted = {t for t in map(_table_of, ddl) if t is not None}
        tables = {row[0] for row in session.execute(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s", [name],
            timeout=STATEMENT_TIMEOUT_S)}
        if not wanted <= tables:
            raise RuntimeError(f"tables missing: {sorted(wanted - tables)}")
        truncating = [session.execute_async(f"TRUNCATE {name}.{table}",
                                            timeout=STATEMENT_TIMEOUT_S)
                      for table in sorted(tables) if table != JOURNAL_TABLE]
        session.execute(f"DROP TABLE {name}.{JOURNAL_TABLE}", timeout=STATEMENT_TIMEOUT_S)
        session.execute(next(d for d in ddl if _table_of(d) == JOURNAL_TABLE),
                        timeout=STATEMENT_TIMEOUT_S)
        for pending in truncating:
            pending.result()

    def _drop_quietly(self, name: str) -> None:
        try:
            self._connect().execute(f"DROP KEYSPACE IF EXISTS {name}",
                                    timeout=STATEMENT_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - a leftover keyspace only costs memory
            log.warning("keyspace %s not dropped: %s", name, exc)

    def _connect(self):
        with self._lock:
            if self._session is None:
                from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
                from cassandra.policies import WhiteListRoundRobinPolicy

                profile = ExecutionProfile(
                    load_balancing_policy=WhiteListRoundRobinPolicy([self._host]),
                    request_timeout=STATEMENT_TIMEOUT_S)
                self._cluster = Cluster([self._host], port=self._port,
                                        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
                                        protocol_version=5)
                self._session = self._cluster.connect()
            return self._session


def _kind(replication: dict[str, int]) -> tuple:
    return tuple(sorted(replication.items()))


def _table_of(ddl: str) -> str | None:
    """``ks.table`` of a ``CREATE TABLE`` statement, or None (the keyspace's own)."""
    head = ddl.split("(", 1)[0]
    if "CREATE TABLE" not in head:
        return None
    return head.split()[-1].split(".", 1)[1]
