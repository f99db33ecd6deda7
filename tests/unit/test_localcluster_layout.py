"""The local cluster's run directory keeps its layout, so clusters started by earlier versions
of the tooling (``ledger/localcluster.py``) are still found, reported and stopped: the state
file is read (keys it does not know are ignored), PID files and logs sit where they did, and a
recorded PID counts only while its command line names the service's directory. No servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from clients.localcluster import STATE_FILE, LocalCluster
from clients.localcluster.cassandra import node_command, write_node_config
from clients.localcluster.etcd import etcd_command
from clients.localcluster.fetch import CassandraDist


def test_state_file_of_an_earlier_version_is_read(tmp_path):
    (tmp_path / STATE_FILE).write_text(json.dumps({
        "regions": ["r1", "r2", "r3"], "etcd_client_port": 33791, "etcd_peer_port": 33801,
        "cql_port": 29042, "storage_port": 27000, "heap_mb": 1024, "jmx_base_port": None,
        "cluster_name": "redledger", "commitlog_sync": "periodic",
        "commitlog_sync_period_ms": 10000, "written_by_a_later_version": True}))
    cluster = LocalCluster.from_run_dir(tmp_path)
    assert cluster.regions == ["r1", "r2", "r3"]
    assert cluster.contact_points == {"r1": "127.0.0.1", "r2": "127.0.0.2", "r3": "127.0.0.3"}
    assert (cluster.cql_port, cluster.etcd_endpoint) == (29042, "127.0.0.1:33791")
    status = cluster.status()
    assert set(status) == {"etcd", "cassandra-r1", "cassandra-r2", "cassandra-r3"}
    assert not any(s["running"] for s in status.values())
    assert status["cassandra-r2"]["address"] == "127.0.0.2:29042"


def test_pid_files_and_logs_where_earlier_versions_wrote_them(tmp_path):
    cluster = LocalCluster(tmp_path, regions=["r1"])
    assert cluster._etcds["ledger"].pid_file == tmp_path.resolve() / "etcd" / "etcd.pid"
    node = cluster._nodes["r1"]
    assert node.pid_file == tmp_path.resolve() / "cassandra-r1" / "cassandra-r1.pid"
    assert node.log_file == tmp_path.resolve() / "cassandra-r1" / "logs" / "stdout.log"


def test_a_recorded_pid_counts_only_if_its_command_line_names_the_service(tmp_path):
    cluster = LocalCluster(tmp_path, regions=["r1"])
    node = cluster._nodes["r1"]
    node.dir.mkdir(parents=True)
    # This test's own process: alive, but not the node (a reused PID).
    node.pid_file.write_text(f"{os.getpid()}\n")
    assert not node.running()
    # The child says it runs before the check: Popen returns once exec has closed the
    # child's copy of its error pipe, which the kernel does before it sets up the new
    # command line, so /proc/PID/cmdline can still be empty then (failed once in CI).
    proc = subprocess.Popen([sys.executable, "-c",
                             "import sys; print('up', flush=True); sys.stdin.read()",
                             str(node.dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"up\n"
        node.pid_file.write_text(f"{proc.pid}\n")
        assert node.running()
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
        proc.stdout.close()
    assert not node.running()


def test_node_and_etcd_command_lines_name_their_directories(tmp_path):
    lib = tmp_path / "dist" / "lib"
    lib.mkdir(parents=True)
    (lib / "jamm-0.4.0.jar").write_text("")
    node_dir = tmp_path / "run" / "cassandra-r2"
    conf = write_node_config(node_dir, region="r2", address="127.0.0.2", cluster_name="c",
                             storage_port=27000, cql_port=29042, commitlog_sync="periodic",
                             commitlog_sync_period_ms=10000)
    yaml = json.loads((conf / "cassandra.yaml").read_text())
    assert (yaml["listen_address"], yaml["native_transport_port"]) == ("127.0.0.2", 29042)
    assert yaml["seed_provider"][0]["parameters"][0]["seeds"] == "127.0.0.1:27000"
    assert (conf / "cassandra-rackdc.properties").read_text() == "dc=r2\nrack=rack1\n"
    cmd = node_command(CassandraDist("5.0.9", tmp_path / "dist", "maven"), "java", node_dir, 512)
    assert str(node_dir) in " ".join(cmd) and cmd[-1].endswith("CassandraDaemon")
    assert "-Xmx512m" in cmd and "-javaagent:" + str(lib / "jamm-0.4.0.jar") in cmd
    etcd_dir = tmp_path / "run" / "etcd" / "data"
    assert str(etcd_dir) in etcd_command("etcd", etcd_dir, 33791, 33801)


def test_one_etcd_member_per_region_on_the_regions_addresses(tmp_path):
    """Every region's member on its own address with the same ports, in its own directory;
    ``--etcd`` gets them all; each member's command names the whole cluster."""
    cluster = LocalCluster(tmp_path, regions=["r1", "r2", "r3"], etcd_client_port=33791,
                           etcd_peer_port=33801, etcd_per_region=True)
    assert cluster.etcd_endpoint == "127.0.0.1:33791,127.0.0.2:33791,127.0.0.3:33791"
    assert cluster.etcd_member_of("r2") == "127.0.0.2:33791"
    assert set(cluster.status()) == {"etcd-r1", "etcd-r2", "etcd-r3", "cassandra-r1",
                                     "cassandra-r2", "cassandra-r3"}
    assert cluster._etcds["r3"].pid_file == tmp_path.resolve() / "etcd-r3" / "etcd-r3.pid"
    command = etcd_command("etcd", tmp_path / "d", 33791, 33801, name="r2", host="127.0.0.2",
                           members={"r1": "127.0.0.1", "r2": "127.0.0.2", "r3": "127.0.0.3"},
                           token="redledger")
    flags = dict(zip(command[1::2], command[2::2]))
    assert flags["--name"] == "r2"
    assert flags["--listen-client-urls"] == "http://127.0.0.2:33791"
    assert flags["--initial-cluster"] == ("r1=http://127.0.0.1:33801,r2=http://127.0.0.2:33801,"
                                          "r3=http://127.0.0.3:33801")
    # Recorded, so that `stop` and `status` in another process find the members.
    cluster._save_state()
    again = LocalCluster.from_run_dir(tmp_path)
    assert again.etcd_per_region and again.etcd_endpoint == cluster.etcd_endpoint
    # One region: one member, as before.
    assert not LocalCluster(tmp_path / "one", regions=["r1"], etcd_per_region=True).etcd_per_region
