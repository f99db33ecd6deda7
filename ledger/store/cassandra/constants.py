"""Limits and fixed values of the Cassandra adapter, each with its unit and what happens when
it is hit."""

from __future__ import annotations

# Client-side deadline of one statement, in seconds. Longer than the server's own timeouts
# (write_request_timeout 2 s, cas_contention_timeout 1 s) so that the coordinator's answer,
# which says what kind of timeout happened, normally arrives before the driver gives up.
REQUEST_TIMEOUT_S_DEFAULT = 10.0
# Row-upsert requests (batches) of one append or write_rows call kept in flight at once; the
# rest wait for a slot. Bounds the driver's request queue and Cassandra's native-transport
# queue.
ROWS_IN_FLIGHT_MAX = 64
# Journal batches read per round trip by load/read_journal. A batch is one group commit (up
# to a few hundred KB), so pages are counted in batches, not bytes.
JOURNAL_PAGE_BATCHES = 64
# Spans of JOURNAL_PAGE_BATCHES batch numbers a takeover's load reads at once (it knows the
# head from its fence, so the pages need not wait for each other).
LOAD_SPANS_IN_FLIGHT = 8
# Bytes of one snapshot part: one mutation each, far below Cassandra's limit (half the commit
# log segment: 16 MiB by default), and a size where a QUORUM insert costs little more per byte
# than a larger one (notes: ~62 inserts/s of 1 MB, about 60 MB/s, on one node here).
SNAPSHOT_PART_BYTES = 1024 * 1024
# Parts of one snapshot written at once, and read per round trip (a read answers at most
# this many MiB).
SNAPSHOT_PARTS_IN_FLIGHT = 4
SNAPSHOT_PARTS_PER_READ = 4
# Loads of a snapshot (and of a shard) started again because a newer snapshot replaced the one
# being read, before giving up with StoreUnavailable.
SNAPSHOT_LOAD_ATTEMPTS_MAX = 5
# Estimated payload bytes of one multi-partition batch of row upserts. Cassandra refuses such
# batches above batch_size_fail_threshold (50 KiB by default) and logs a rate-limited
# warning above batch_size_warn_threshold (5 KiB); 16 KiB keeps far from the refusal while
# packing about a hundred rows per request.
ROWS_BATCH_BYTES_MAX = 16 * 1024
# Entries / wallets read per round trip by list_entries / scan_wallets.
ROWS_PAGE_MAX = 1000
# Batch numbers per partition of ``audit_chain`` (a shard's audit rows are partitioned by
# (shard, seq // this)). A row holds the records of one group commit (~150-250 B per record,
# up to a few hundred records), so a full partition stays in the tens of MiB, under the
# ~100 MiB past which Cassandra partitions get slow to compact and repair.
AUDIT_BUCKET_BATCHES = 1000
# CAS attempts of one fence before giving up with StoreUnavailable. A retry happens only when
# another fencer changed the epoch between our read and our CAS, or a CAS timed out (the next
# SERIAL read then settles it).
FENCE_ATTEMPTS_MAX = 16
# Sends of one append's journal row before its outcome is reported unknown. The row is a plain
# (non-Paxos) write keyed by (shard, seq, writer epoch), so sending the identical row again is
# idempotent: a timed-out append is settled by a resend that succeeds, not by a serial read.
APPEND_SENDS_MAX = 3
# Largest CQL bigint: the open end of the (seq, writer_epoch) ranges the journal reads page by.
BIGINT_MAX = (1 << 63) - 1
# A takeover's or a warm-up's reads and its fence (``driver.hedged``) are sent again to a node
# of another region when the first has not answered within this long (s), and once more after
# as long again (at most HEDGE_EXTRA_MAX extra sends). A region's node restarted a minute
# earlier lacks what was written while it was down and took 10 s and more to answer these
# reads in the kill-region drill (its coordinator repairing what it reads); the other regions
# hold a quorum without it. A takeover's reads take 20-500 ms under load otherwise.
HEDGE_DELAY_S = 0.5
HEDGE_EXTRA_MAX = 2
# ``CassandraStore.catching_up`` reads the other datacenters' pending hints at most this often
# (s), each read bounded by the timeout (s).
CATCH_UP_CHECK_S = 1.0
CATCH_UP_CHECK_TIMEOUT_S = 2.0
# Hint files count as a backlog (the region is catching up) once their oldest is this old (s).
# Under load a healthy node drops a mutation now and then, and its hint is delivered within a
# dispatch or two (files are flushed every 10 s); an outage leaves files minutes old, and they
# stay that old while they are replayed (watched in a kill-region drill: 4-6 files, the
# oldest 1-3 min old, for about a minute after the node was back).
CATCH_UP_BACKLOG_S = 30.0
# Delay between attempts to reconnect to a Cassandra node that went away (s).
RECONNECT_DELAY_S = 1.0
# Journal batches of one shard whose rows may wait for the materializer. An append past it
# waits for the rows to catch up (backpressure), so the lag of the views stays bounded.
ROWS_LAG_BATCHES_MAX = 64
# Pause before the materializer retries rows that failed to write (s). Rows are idempotent
# upserts; they are retried until written or the store closes (then replay rewrites them).
ROWS_RETRY_BACKOFF_S = 0.2
# The row writer raises a shard's rows mark (``views.py``) with its rows at most this often
# (s): one more statement per shard per second at most, and a failover's new owner writes
# again at most about this much of the rows (a planned hand-over flushes them all).
ROWS_MARK_EVERY_S = 1.0
# Write timestamp of a materialized row: the journal position (batch ``seq``) of the batch
# that produced it, plus this base. Cassandra keeps, per cell, the write with the highest
# timestamp, so a row of an older batch (a deposed owner's late row writer, a replay) can never
# overwrite a row of a newer batch, whatever order the writes arrive in. Every view row
# belongs to one shard (a wallet and its entries to the wallet's shard, a transfer to the
# shard that decided it), and batch numbers of a shard only grow (they continue across owners),
# so the order is total per row. The base (2**60 us, far beyond any wall-clock time in
# microseconds, about 1.8e15 today) makes every journal-stamped write win over rows that an
# older version of this adapter wrote with the driver's wall-clock timestamps, so an existing
# keyspace converges as rows are rewritten (appends, replays) instead of freezing. The flip
# side: a hand-made repair through cqlsh without ``USING TIMESTAMP`` above the base is
# silently ignored; repair views by replay (a new owner rewrites the rows after the latest
# snapshot) or in a fresh keyspace. Nothing else writes these tables. Cassandra 5's optional
# guardrail ``maximum_timestamp_fail_threshold`` must stay unset (it is by default).
ROW_TIMESTAMP_BASE = 1 << 60


# Lifetime of key record and claim rows (s): past every idempotency retention window a node
# accepts (``ledgerd --idempotency-retention-h`` is at most IDEMPOTENCY_RETENTION_H_MAX).
KEY_ROWS_TTL_S = 8 * 24 * 3600
