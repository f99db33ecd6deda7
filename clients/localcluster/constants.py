"""Limits and timings of the development/test cluster, each with its unit and what happens
when it is hit. The ledger's own limits live in ``ledger/constants.py``; these only bound how
long this tooling waits for real servers on loopback."""

# The file in a run directory that records how its cluster was started, so that `stop` and
# `status` in another process (or a newer version of this package) find what `start` launched.
STATE_FILE = "cluster.json"

# How long one Cassandra node may take to serve CQL and see every datacenter (s); past it
# `start` raises LocalClusterError with the node's log tail. A cold node on a loaded 2-core
# machine was measured at up to ~64 s for three nodes, so this is generous on purpose.
CASSANDRA_START_TIMEOUT_S = 240.0
# How long etcd may take to answer /health after launch (s); then LocalClusterError.
ETCD_START_TIMEOUT_S = 30.0
# SIGTERM drain of a Cassandra node before SIGKILL (s): it flushes memtables meanwhile.
CASSANDRA_STOP_TIMEOUT_S = 60.0
# SIGTERM drain of etcd before SIGKILL (s).
ETCD_STOP_TIMEOUT_S = 15.0
# Default SIGTERM drain of any service before SIGKILL (s).
SERVICE_STOP_TIMEOUT_S = 30.0
# How long a SIGKILLed process may take to disappear (s); past it LocalClusterError.
SIGKILL_WAIT_S = 15.0

# Poll periods of the readiness loops (s).
CQL_POLL_S = 0.5
ETCD_POLL_S = 0.1
PROCESS_POLL_S = 0.2

# Deadline of one readiness query (connect + query) over CQL (s).
CQL_QUERY_TIMEOUT_S = 5.0
# Deadline of one etcd /health request (s).
ETCD_HEALTH_TIMEOUT_S = 1.0
# Deadline of one metadata request to Maven Central (s) and of one download (s).
HTTP_TIMEOUT_S = 30.0
DOWNLOAD_TIMEOUT_S = 60.0
# Port probe before a launch (s): a port that answers means another process holds it.
PORT_PROBE_TIMEOUT_S = 0.5

# Log tails carried in errors: the last lines of the last bytes of a log file.
LOG_TAIL_LINES = 40
LOG_TAIL_BYTES = 64 * 1024

# Region i runs on 127.0.0.(i+1); the loopback block gives 250 usable addresses.
REGIONS_MAX = 250
# Default Java heap of one Cassandra node (MB).
HEAP_MB_DEFAULT = 512
