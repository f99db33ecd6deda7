"""Adapters under the storage contract suite: every test runs once per adapter.

``sqlite`` gets a fresh file per test. ``cassandra`` shares one store per session (schema
creation takes seconds) in a keyspace of its own on the session's real cluster
(``local_cluster``); tests stay apart because each one draws fresh shard numbers and ids
from its ``StoreCase``. ``cassandra_3dc`` (the commit-path tests only, ``COMMIT_PATH_TESTS``)
is a session store whose keyspace keeps one replica in each of three datacenters, at the
durable consistency: the journal CAS at SERIAL and its commit at QUORUM span regions.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from dataclasses import dataclass, field

import pytest

from tests.conftest import assert_replicated_in

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

    from clients.localcluster import cql_query

    region = "r1"
    keyspace = f"contract_{uuid.uuid4().hex[:8]}"
    store = await CassandraStore.connect(
        [local_cluster.contact_points[region]], local_cluster.cql_port, local_dc=region,
        keyspace=keyspace, replication={region: 1},
        require_region_survival=False)  # one datacenter: a test keyspace, not RPO 0
    try:
        yield store
    finally:
        await store.close()
        # Every keyspace's tables live in the shared cluster's heap: drop what we made.
        await asyncio.to_thread(cql_query, local_cluster.contact_points[region],
                                local_cluster.cql_port, f"DROP KEYSPACE IF EXISTS {keyspace}",
                                60.0)


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


# The commit path on three datacenters: these tests (fencing, appends, load) also run against
# ``cassandra_3dc_store``, a keyspace with one replica in each of three regions, at the
# consistency of production (journal CAS at SERIAL, commit at QUORUM: a quorum of all
# replicas across datacenters). Not every test: the others exercise rows and reads, which
# the datacenter count does not change, and the suite's time matters.
COMMIT_PATH_TESTS = (
    "test_fence_", "test_append", "test_appends_", "test_stale_epoch_",
    "test_a_taken_batch_number_", "test_a_gap_in_batch_numbers_", "test_of_two_writers_",
    "test_a_fence_racing_appends_", "test_load_",
)


@pytest.fixture(scope="session")
async def cassandra_3dc_store(local_cluster):
    """A ``CassandraStore`` whose keyspace spans three datacenters ({r1: 1, r2: 1, r3: 1}),
    connected from r1 with the default (durable) consistency: SERIAL / QUORUM."""
    from clients.localcluster import cql_query
    from ledger.store.cassandra import CassandraStore

    regions = list(local_cluster.regions)[:3]
    keyspace = f"contract3_{uuid.uuid4().hex[:8]}"
    store = await CassandraStore.connect(
        [local_cluster.contact_points[r] for r in regions], local_cluster.cql_port,
        local_dc=regions[0], keyspace=keyspace, replication={r: 1 for r in regions})
    await assert_replicated_in(store, keyspace, regions)
    try:
        yield store
    finally:
        await store.close()
        await asyncio.to_thread(cql_query, local_cluster.contact_points[regions[0]],
                                local_cluster.cql_port, f"DROP KEYSPACE IF EXISTS {keyspace}",
                                60.0)


def pytest_generate_tests(metafunc):
    """Adapters of ``case``: sqlite and cassandra for every test; cassandra_3dc too for the
    commit-path tests when the session cluster has three regions."""
    if "case" not in metafunc.fixturenames:
        return
    from tests.conftest import TEST_REGIONS

    params = [pytest.param("sqlite"), pytest.param("cassandra", marks=pytest.mark.real)]
    if (len(TEST_REGIONS) >= 3
            and metafunc.function.__name__.startswith(COMMIT_PATH_TESTS)):
        params.append(pytest.param("cassandra_3dc", marks=pytest.mark.real))
    metafunc.parametrize("case", params, indirect=True)


@pytest.fixture
def case(request) -> StoreCase:
    """The store under test, one per adapter.

    A plain (synchronous) fixture that asks for the adapter's own fixture by name, so a
    sqlite run never starts the Cassandra cluster, and async fixtures are set up by
    pytest-asyncio rather than from inside a running event loop.
    """
    return StoreCase(request.getfixturevalue(f"{request.param}_store"), request.param)
