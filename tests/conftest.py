"""Shared fixtures. One real Cassandra + etcd per test session (started by the project's own
``clients.localcluster``), never one per test; tests that use them are marked ``real``."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Ports of the session's servers: apart from `make services` (9042/2379) so both can run.
TEST_CQL_PORT = int(os.environ.get("LEDGER_TEST_CQL_PORT", "29042"))
TEST_STORAGE_PORT = int(os.environ.get("LEDGER_TEST_STORAGE_PORT", "27000"))
TEST_ETCD_PORT = int(os.environ.get("LEDGER_TEST_ETCD_PORT", "33791"))
TEST_ETCD_PEER_PORT = int(os.environ.get("LEDGER_TEST_ETCD_PEER_PORT", "33801"))
TEST_REGIONS = os.environ.get("LEDGER_TEST_REGIONS", "r1,r2,r3").split(",")
# Heap per Cassandra node (MB). 512 MB ran out during a full run: every test keyspace adds
# tables held in the heap (the node crashed on OutOfMemoryError); tests also drop theirs.
TEST_HEAP_MB = int(os.environ.get("LEDGER_TEST_HEAP_MB", "1024"))
# Development only: a run directory whose cluster is started if needed and left running after
# the session, so several pytest runs (or several developers' runs) share one cluster. CI
# leaves it unset and gets a fresh cluster that is stopped at the end.
KEEP_CLUSTER_DIR = os.environ.get("LEDGER_TEST_KEEP_CLUSTER_DIR", "")
# Seconds the session's cluster gets between SIGTERM and SIGKILL at the end of the run.
SESSION_STOP_TIMEOUT_S = 1.0


@pytest.fixture(scope="session")
def local_cluster():
    """A real Cassandra (one datacenter per region) and etcd (one member per region, on the
    region's address: a region's loss in a drill takes its member too, as in a deployment)
    on loopback for the session. ``etcd_endpoint`` lists every member."""
    from clients.localcluster import LocalCluster

    keep = bool(KEEP_CLUSTER_DIR)
    run_dir = (Path(KEEP_CLUSTER_DIR) if keep
               else Path(tempfile.mkdtemp(prefix="ledger-test-cluster-")))
    cluster = LocalCluster(run_dir, regions=TEST_REGIONS, etcd_client_port=TEST_ETCD_PORT,
                           etcd_peer_port=TEST_ETCD_PEER_PORT, cql_port=TEST_CQL_PORT,
                           storage_port=TEST_STORAGE_PORT, heap_mb=TEST_HEAP_MB,
                           etcd_per_region=True)
    if keep:
        cluster.start()  # idempotent: starts only what is not running
        yield cluster
        return
    try:
        cluster.start()
        yield cluster
    finally:
        # The run directory is deleted next: nothing to drain (a graceful stop of three
        # Cassandra nodes took 24 s of the suite's wall time).
        cluster.stop(timeout=SESSION_STOP_TIMEOUT_S)
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def keyspaces(local_cluster):
    """Ledger keyspaces on the session cluster, lent per test and reset between loans
    (``tests/keyspaces.py``: a reset costs ~3 s, a fresh keyspace ~15 s plus its drop)."""
    from tests.keyspaces import KeyspacePool

    region = local_cluster.regions[0]
    pool = KeyspacePool(local_cluster.contact_points[region], local_cluster.cql_port)
    try:
        yield pool
    finally:
        # A kept cluster outlives the session: drop what the pool made. A fresh one is
        # deleted with its run directory.
        pool.close(drop=bool(KEEP_CLUSTER_DIR))


@pytest.fixture(scope="session")
def etcd_endpoint(request) -> str:
    """The etcd of the shared cluster, or ``LEDGER_TEST_ETCD_ENDPOINT`` (an etcd of your own)."""
    override = os.environ.get("LEDGER_TEST_ETCD_ENDPOINT")
    if override:
        return override
    return request.getfixturevalue("local_cluster").etcd_endpoint


# Suites whose assertions are about lease timing (who reports a loss before whom gains, a
# stall noticed before the lease runs out) run first, on the fresh session cluster: after
# the chaos drills and the Cassandra end-to-end tiers, the loaded etcd and test process made
# their event order flip in two of two CI runs (2026-11-27), though the module passes
# repeatedly on its own, also beside two busy CPU hogs. Order only; nothing is skipped.
TIMING_FIRST = ("tests/integration/test_etcd_ownership.py",)


def pytest_collection_modifyitems(session, config, items):
    first = [i for i in items if i.nodeid.startswith(TIMING_FIRST)]
    if first:
        rest = [i for i in items if not i.nodeid.startswith(TIMING_FIRST)]
        items[:] = first + rest


def pytest_collection_finish(session):
    session.config._ledger_real_count = sum(
        1 for item in session.items if item.get_closest_marker("real"))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    passed = [r for r in terminalreporter.stats.get("passed", [])
              if "real" in getattr(r, "keywords", {})]
    terminalreporter.write_line(
        f"tests against real Cassandra/etcd: {len(passed)} passed "
        f"of {getattr(config, '_ledger_real_count', 0)} collected")


async def assert_replicated_in(store, keyspace: str, regions: list[str]) -> None:
    """The keyspace really keeps one replica in each of ``regions`` (read back from the
    cluster's schema, not from what was asked for)."""
    import asyncio

    row = (await asyncio.to_thread(
        store._session.execute,
        "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = %s",
        [keyspace])).one()
    options = row["replication"] if isinstance(row, dict) else row.replication
    replication = {k: v for k, v in dict(options).items() if k != "class"}
    assert replication == {r: "1" for r in regions}, replication
