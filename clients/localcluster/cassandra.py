"""One Cassandra node's configuration and command line, and CQL queries for readiness.

Layout: region i (0-based) runs a node on 127.0.0.(i+1) whose datacenter is the region's
name (GossipingPropertyFileSnitch), seeded from 127.0.0.1, with the same ports on every
address. JMX is off unless a JMX port is given.

Durability caveats seen on 5.0.9: with commitlog_sync=periodic (10 s) a SIGKILL loses that
node's acknowledged writes newer than the last sync (commitlog_sync="batch" keeps them). The
default here is Cassandra's own (periodic, 10 s): the ledger's durability comes from
replication across regions (a journal append is acknowledged by a serial quorum of
datacenters, so losing one region loses nothing). Measured: one journal append (Paxos v2 LWT)
p50 ~3-4 ms with periodic, 23 ms with batch and 76 ms with group (15 ms window), because every
Paxos step then waits for an fsync. -Dcassandra.unsafesystem=true is NOT used because after a
SIGKILL it loses tables created before the kill.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

from clients.localcluster.constants import CQL_QUERY_TIMEOUT_S
from clients.localcluster.fetch import CassandraDist

COMMITLOG_SYNC_MODES = ("periodic", "batch", "group")

_LOGBACK = """<configuration scan="false">
  <!-- INFO to a rolling-free file: the packaged default is DEBUG to the console (slow). -->
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>{log}</file>
    <encoder><pattern>%-5level [%thread] %date{{ISO8601}} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <logger name="org.apache.cassandra" level="INFO"/>
  <logger name="com.thinkaurelius.thrift" level="ERROR"/>
  <root level="WARN"><appender-ref ref="FILE"/></root>
</configuration>
"""


def write_node_config(directory: Path, *, region: str, address: str, cluster_name: str,
                      storage_port: int, cql_port: int, commitlog_sync: str,
                      commitlog_sync_period_ms: int) -> Path:
    """Write ``cassandra.yaml``, the rack/dc properties and logback.xml of one node.

    Args:
        directory: The node's own directory; data, commit log, hints and logs go below it.
        region: The region, which is also the node's datacenter name.
        address: The loopback address the node listens on.
        cluster_name: Every node of one cluster shares it.
        storage_port: Gossip/streaming port (the same on every address).
        cql_port: Native protocol port (the same on every address).
        commitlog_sync: ``periodic``, ``batch`` or ``group``.
        commitlog_sync_period_ms: The period (periodic) or window (group).

    Returns:
        The node's ``conf`` directory.
    """
    for sub in ("data", "commitlog", "hints", "saved_caches", "cdc_raw", "logs", "conf"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    # JSON is valid YAML: no quoting pitfalls, and 5.0 rejects unknown keys, so keep it lean.
    yaml = {
        "cluster_name": cluster_name,
        "partitioner": "org.apache.cassandra.dht.Murmur3Partitioner",
        "num_tokens": 16,
        "endpoint_snitch": "GossipingPropertyFileSnitch",
        "listen_address": address,
        "rpc_address": address,
        "storage_port": storage_port,
        "native_transport_port": cql_port,
        "start_native_transport": True,
        "seed_provider": [{"class_name": "org.apache.cassandra.locator.SimpleSeedProvider",
                           "parameters": [{"seeds": f"127.0.0.1:{storage_port}"}]}],
        "data_file_directories": [str(directory / "data")],
        "commitlog_directory": str(directory / "commitlog"),
        "hints_directory": str(directory / "hints"),
        "saved_caches_directory": str(directory / "saved_caches"),
        "cdc_raw_directory": str(directory / "cdc_raw"),
        "commitlog_sync": commitlog_sync,
        "auto_bootstrap": False,      # fresh nodes with no data: nothing to stream
        "auto_snapshot": False,       # truncate/drop in tests would otherwise snapshot
        "concurrent_compactors": 1,
        "storage_compatibility_mode": "NONE",  # fresh cluster: 5.0 formats, no 4.x peers
        "paxos_variant": "v2",        # cheaper LWTs (fewer round trips) than 5.0's default v1
        "authenticator": "AllowAllAuthenticator",
        "authorizer": "AllowAllAuthorizer",
        "dynamic_snitch": True,
    }
    # periodic: a SIGKILL (kill_region) loses acknowledged writes newer than the last sync
    # (replay stops at the last sync marker; seen on 5.0.9), as in a real crash.
    # batch/group: a write is acknowledged only after its commit log fsync.
    if commitlog_sync == "periodic":
        yaml["commitlog_sync_period"] = f"{commitlog_sync_period_ms}ms"
    elif commitlog_sync == "group":
        yaml["commitlog_sync_group_window"] = f"{commitlog_sync_period_ms}ms"
    conf = directory / "conf"
    (conf / "cassandra.yaml").write_text(json.dumps(yaml, indent=1) + "\n")
    (conf / "cassandra-rackdc.properties").write_text(f"dc={region}\nrack=rack1\n")
    (conf / "logback.xml").write_text(_LOGBACK.format(log=directory / "logs" / "system.log"))
    return conf


def node_command(dist: CassandraDist, java: str, directory: Path, heap_mb: int,
                 jmx_port: int | None = None) -> list[str]:
    """The command line of one node whose configuration ``write_node_config`` wrote.

    The node's directory appears in the command line; that is how a later process tells the
    node's PID from a reused one.
    """
    conf = directory / "conf"
    cmd = [
        java,
        f"-Xms{heap_mb}m", f"-Xmx{heap_mb}m",
        "-XX:+UseG1GC", "-XX:+ParallelRefProcEnabled", "-XX:MaxGCPauseMillis=300",
        "-XX:+CrashOnOutOfMemoryError", "-XX:+PerfDisableSharedMem",
        f"-javaagent:{dist.jamm_jar()}",
        "-Djdk.attach.allowAttachSelf=true",
        "-Djava.net.preferIPv4Stack=true",
        "-Dio.netty.tryReflectionSetAccessible=true",
        "-Dio.netty.allocator.useCacheForAllThreads=true",
        "-Dio.netty.allocator.maxOrder=11",
        *dist.module_flags(),
        "-Dcassandra-foreground=yes",
        f"-Dcassandra.config=file://{conf / 'cassandra.yaml'}",
        f"-Dcassandra-rackdc.properties=file://{conf / 'cassandra-rackdc.properties'}",
        f"-Dlogback.configurationFile=file://{conf / 'logback.xml'}",
        f"-Dcassandra.logdir={directory / 'logs'}",
        f"-Dcassandra.storagedir={directory}",
        # Fast start: do not wait for gossip to settle / ring delay; create roles at once.
        "-Dcassandra.skip_wait_for_gossip_to_settle=0",
        "-Dcassandra.ring_delay_ms=1000",
        "-Dcassandra.superuser_setup_delay_ms=0",
        # NOT -Dcassandra.unsafesystem=true: it skips the flush of system_schema on schema
        # changes, and after a SIGKILL (kill_region) the replayed schema is not loaded:
        # tables created before the kill are "unconfigured" after restart (seen on 5.0.9).
    ]
    if jmx_port is not None:
        cmd.append(f"-Dcassandra.jmx.local.port={jmx_port}")
    cmd += ["-cp", f"{conf}:{dist.lib}/*", "org.apache.cassandra.service.CassandraDaemon"]
    return cmd


class CqlError(Exception):
    """A CQL query could not be run: the node is unreachable, or it refused the query."""


def cql_query(host: str, port: int, query: str,
              timeout_s: float = CQL_QUERY_TIMEOUT_S) -> list[tuple]:
    """Run one query on the node at ``host:port`` only, at consistency ONE.

    A short-lived driver session, pinned to that one node (a readiness check asks a given node
    what it sees, not whichever node the driver would pick), without schema and token metadata
    (not needed, and slow to fetch on a loaded machine).

    Args:
        host: The node's address.
        port: Its CQL port.
        query: One CQL statement.
        timeout_s: Deadline of connecting, and separately of the query itself.

    Returns:
        The rows as plain tuples (empty for statements that return none).

    Raises:
        CqlError: the node could not be reached or answered with an error.
    """
    # The driver is imported here, not at module level: `status`/`stop` and the process
    # helpers do not need it, and importing it costs a noticeable fraction of a second.
    from cassandra import ConsistencyLevel, DriverException
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable
    from cassandra.connection import ConnectionException
    from cassandra.policies import WhiteListRoundRobinPolicy
    from cassandra.protocol import ErrorMessage
    from cassandra.query import SimpleStatement, tuple_factory

    profile = ExecutionProfile(load_balancing_policy=WhiteListRoundRobinPolicy([host]),
                               consistency_level=ConsistencyLevel.ONE,
                               row_factory=tuple_factory, request_timeout=timeout_s)
    cluster = Cluster([host], port=port, protocol_version=5,
                      execution_profiles={EXEC_PROFILE_DEFAULT: profile},
                      connect_timeout=timeout_s, control_connection_timeout=timeout_s,
                      schema_metadata_enabled=False, token_metadata_enabled=False,
                      # As in the ledger's store: without it a multi-packet request waits
                      # for a delayed ACK.
                      sockopts=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    try:
        session = cluster.connect()
        statement = SimpleStatement(query, consistency_level=ConsistencyLevel.ONE,
                                    is_idempotent=False)
        return [tuple(row) for row in session.execute(statement, timeout=timeout_s)]
    except (DriverException, NoHostAvailable, ConnectionException, ErrorMessage, OSError) as exc:
        raise CqlError(f"{host}:{port}: {type(exc).__name__}: {exc}") from exc
    finally:
        cluster.shutdown()


def visible_dcs(host: str, port: int) -> set[str]:
    """Datacenters the node at ``host:port`` knows: its own and its peers'.

    Raises:
        CqlError: the node could not be asked.
    """
    local = cql_query(host, port, "SELECT data_center FROM system.local")
    peers = cql_query(host, port, "SELECT data_center FROM system.peers")
    return {r[0] for r in local + peers if r[0]}
