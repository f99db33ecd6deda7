"""Cassandra adapter of the storage port: the production store of shard journals.

One module per seam:

* ``schema``: keyspace and tables (DDL, replication), and the check that the keyspace's real
  replication survives the loss of a region;
* ``driver``: the driver bridge (cassandra-driver's callbacks to asyncio futures, the
  consistency and idempotence of each statement, the retry policy, which driver errors mean
  "did not or may not complete");
* ``journal``: fence, append (one CAS per batch), the resolution of lost CAS answers, load,
  snapshots in parts, truncation;
* ``views``: the materialized rows (wallets, history, transfers) stamped with their journal
  position, the per-shard row writer behind the journal, and the row reads;
* ``store``: ``CassandraStore``, which connects and wires them;
* ``constants``: every limit, with its unit and what happens when it is hit.
"""

from ledger.store.cassandra.constants import ROW_TIMESTAMP_BASE, SNAPSHOT_PART_BYTES
from ledger.store.cassandra.store import CassandraStore

__all__ = ["CassandraStore", "ROW_TIMESTAMP_BASE", "SNAPSHOT_PART_BYTES"]
