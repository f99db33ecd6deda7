"""Real Apache Cassandra 5.0.x and etcd on loopback for development, tests, drills and
benchmarks, with no hand steps. Not part of the ledger: the ledger only needs servers to talk
to; this package fetches, configures, starts, kills and stops them.

Used by ``make services`` (``python -m clients.localcluster start|stop|status|env|fetch``), by
the pytest session fixture (``LocalCluster(...).start()``), by ``ledger-chaos`` and by
``ledger-bench``. Modules, one job each:

* ``fetch``: the binaries (Cassandra from Maven Central, etcd and a JDK from Debian), cached
  in ``${LEDGER_CACHE_DIR:-~/.cache/redledger}``, never in the repository;
* ``cassandra``: one node's configuration and command line, and CQL queries (through the
  ``cassandra-driver``) for readiness and housekeeping;
* ``etcd``: the etcd member's command line and health check;
* ``process``: detached processes with PID files, found again by later processes;
* ``cluster``: ``LocalCluster``, the whole thing under one run directory;
* ``cli``: the command line.
"""

from clients.localcluster.cassandra import CqlError, cql_query
from clients.localcluster.cluster import LocalCluster, default_run_dir
from clients.localcluster.constants import STATE_FILE
from clients.localcluster.fetch import cache_dir, ensure_cassandra, ensure_etcd, ensure_java
from clients.localcluster.process import LocalClusterError

__all__ = ["STATE_FILE", "CqlError", "LocalCluster", "LocalClusterError", "cache_dir",
           "cql_query", "default_run_dir", "ensure_cassandra", "ensure_etcd", "ensure_java"]
