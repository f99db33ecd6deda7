"""clients.localcluster against REAL Cassandra 5.0 and etcd: the session's shared cluster
(tests/conftest.py), so this also proves the fixture every other real test stands on. The
kill/restart tests leave the cluster running and healthy for the tests after them.
"""

from __future__ import annotations

import base64
import json
import urllib.request

import pytest

from clients.localcluster import LocalCluster, cql_query
from tests.conftest import TEST_CQL_PORT as CQL
from tests.conftest import TEST_ETCD_PORT as ETCD_CLIENT

pytestmark = [pytest.mark.real, pytest.mark.timeout(600)]


@pytest.fixture
def cluster(local_cluster):
    return local_cluster


def _etcd(c: LocalCluster, op: str, body: dict) -> dict:
    # etcd's v3 HTTP/JSON gateway: keys and values are base64 in JSON.
    # Any member answers for the cluster: the first (r1's, with a member per region).
    member = c.etcd_endpoint.split(",")[0]
    req = urllib.request.Request(f"http://{member}/v3/kv/{op}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _etcd_services(c: LocalCluster) -> set[str]:
    return {f"etcd-{r}" for r in c.regions} if c.etcd_per_region else {"etcd"}


def test_layout(cluster: LocalCluster):
    assert cluster.contact_points["r1"] == "127.0.0.1"
    if len(cluster.regions) > 1:
        # One etcd member per region, on the region's address (tests/conftest.py).
        assert cluster.etcd_per_region
        assert cluster.etcd_endpoint == ",".join(
            f"{cluster.contact_points[r]}:{ETCD_CLIENT}" for r in cluster.regions)
        assert cluster.etcd_member_of("r2") == f"{cluster.contact_points['r2']}:{ETCD_CLIENT}"
    else:
        assert cluster.etcd_endpoint == f"127.0.0.1:{ETCD_CLIENT}"


def test_cql_with_driver(cluster: LocalCluster):
    from cassandra.cluster import Cluster

    cl = Cluster([cluster.contact_points["r1"]], port=CQL)
    try:
        s = cl.connect()
        row = s.execute("SELECT release_version, data_center FROM system.local").one()
        assert row.release_version.startswith("5.0.")
        assert row.data_center == "r1"  # dc name == region name
        s.execute("CREATE KEYSPACE IF NOT EXISTS lc_test WITH replication = "
                  "{'class': 'NetworkTopologyStrategy', 'r1': 1}")
        s.execute("CREATE TABLE IF NOT EXISTS lc_test.kv (k text PRIMARY KEY, v int)")
        assert s.execute("INSERT INTO lc_test.kv (k, v) VALUES ('a', 1) IF NOT EXISTS").one().applied
        assert not s.execute("INSERT INTO lc_test.kv (k, v) VALUES ('a', 2) IF NOT EXISTS").one().applied
    finally:
        cl.shutdown()
    # paxos v2 really is in effect, and the readiness query (cql_query) reads it too.
    assert cql_query("127.0.0.1", CQL, "SELECT value FROM system_views.settings "
                                       "WHERE name = 'paxos_variant'") == [("v2",)]


def test_etcd_put_get_and_restart(cluster: LocalCluster):
    _etcd(cluster, "put", {"key": _b64("/lc/k"), "value": _b64("v1")})
    got = _etcd(cluster, "range", {"key": _b64("/lc/k")})
    assert base64.b64decode(got["kvs"][0]["value"]) == b"v1"
    cluster.stop_etcd()
    status = cluster.status()
    assert not any(status[name]["running"] for name in _etcd_services(cluster))
    cluster.start_etcd()
    got = _etcd(cluster, "range", {"key": _b64("/lc/k")})  # data survives a restart
    assert base64.b64decode(got["kvs"][0]["value"]) == b"v1"


def test_status(cluster: LocalCluster):
    st = cluster.status()
    assert set(st) == _etcd_services(cluster) | {f"cassandra-{r}" for r in cluster.regions}
    for name, s in st.items():
        assert s["running"], name
        assert s["pid"] > 0 and s["rss_mb"] > 0
    assert st["cassandra-r1"]["address"] == f"127.0.0.1:{CQL}"


def test_kill_and_restart_region(cluster: LocalCluster):
    # SIGKILL, like a crashed machine; the node comes back on the same data directory. With
    # the periodic commit log (Cassandra's default) the newest unsynced writes of a killed
    # node may be gone - the ledger relies on replication across regions for those - but the
    # schema is synced when it changes, so the keyspace and table are there.
    region = cluster.regions[-1]
    host = cluster.contact_points[region]
    cluster.kill_region(region)
    assert not cluster.status()[f"cassandra-{region}"]["running"]
    cluster.start_region(region)
    assert cql_query(host, CQL, "SELECT table_name FROM system_schema.tables WHERE "
                                "keyspace_name = 'lc_test'") == [("kv",)]
    cluster.start()  # idempotent: everything runs already
    assert all(s["running"] for s in cluster.status().values())
