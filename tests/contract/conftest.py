"""Adapters under the storage contract suite: every test runs once per adapter.

``sqlite`` gets a fresh file per test. ``cassandra`` shares one store per session (schema
creation takes seconds) in a keyspace of its own on the session's real cluster
(``local_cluster``); tests stay apart because each one draws fresh shard numbers and ids
from its ``StoreCase``.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field

import pytest

# Shard numbers handed out to tests; far above the 256 real shards so they look synthetic.
_SHARD_NUMBERS = itertools.count(10_000)


@dataclass
class StoreCase:
    """One test's store, plus fresh names so tests sharing a store do not see each other."""

    store: object
    adapter: str
    prefix: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def shard(self) -> int:
        """A shard number no other test of this session uses."""
        return next(_SHARD_NUMBERS)

    def id(self, name: str) -> str:
        """A wallet or transfer id unique to this test."""
        return f"{self.prefix}-{name}"


@pytest.fixture
def fresh_shard() -> int:
    """A shard number no other test of this session uses (for adapter-specific tests)."""
    return next(_SHARD_NUMBERS)


@pytest.fixture(scope="session")
async def cassandra_store(local_cluster):
    """A ``CassandraStore`` on the session cluster, in a keyspace of its own."""
    from ledger.store.cassandra import CassandraStore

    region = "r1"
    store = await CassandraStore.connect(
        [local_cluster.contact_points[region]], local_cluster.cql_port, local_dc=region,
        keyspace=f"contract_{uuid.uuid4().hex[:8]}", replication={region: 1})
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def sqlite_store(tmp_path):
    """A ``SqliteStore`` on a fresh file."""
    try:
        from ledger.store.sqlite import SqliteStore
    except ImportError as exc:
        pytest.skip(f"sqlite adapter not importable yet (ledger.store.sqlite): {exc}")
    store = await SqliteStore.open(tmp_path / "ledger.db")
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(params=[pytest.param("sqlite"),
                        pytest.param("cassandra", marks=pytest.mark.real)])
def case(request) -> StoreCase:
    """The store under test, one per adapter.

    A plain (synchronous) fixture that asks for the adapter's own fixture by name, so a
    sqlite run never starts the Cassandra cluster, and async fixtures are set up by
    pytest-asyncio rather than from inside a running event loop.
    """
    return StoreCase(request.getfixturevalue(f"{request.param}_store"), request.param)
