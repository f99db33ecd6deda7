"""Cassandra adapter of the storage port: the production store of shard journals.

Layout (keyspace ``ledger`` by default, replicated with NetworkTopologyStrategy, one datacenter
per region):

* ``journal``: one partition per shard. Static columns ``epoch`` (the writer epoch, i.e. the
  fencing token) and ``head`` (the last batch number); one clustering row per batch ``seq``
  holding the ``writer_epoch`` and the codec-encoded ``events``. Every change of the static
  columns is a lightweight transaction (Paxos), so "who may append" and "which batch is next"
  are decided by a serial quorum, never by a plain write.
* ``snapshot_parts`` and ``snapshot_marks``: snapshots of each shard, stored in parts of
  ``SNAPSHOT_PART_BYTES`` (a snapshot is far larger than one mutation may be) and counted only
  once their completion mark is written. The journal batches a complete snapshot covers are
  then deleted with one range tombstone (``truncate_journal``); the static epoch and head stay.
* ``wallets``, ``shard_wallets``, ``wallet_entries``, ``transfers``: rows materialized from the
  journal with plain (non-LWT) upserts, each stamped ``USING TIMESTAMP`` with the journal
  position of its batch (``ROW_TIMESTAMP_BASE``), so an older batch's row never overwrites a
  newer one. They are views: the journal is the system of record, and a new owner writes the
  rows of the batches it replays again.

Driver I/O runs on cassandra-driver's own event-loop thread; results reach asyncio through
``loop.call_soon_threadsafe`` from the driver's callbacks, so no call blocks the event loop and
no thread is spent per call.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import threading
from typing import Any, Iterable, Sequence

from cassandra import ConsistencyLevel, OperationTimedOut, RequestExecutionException
from cassandra import protocol as cql_protocol
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable, Session
from cassandra.connection import ConnectionBusy, ConnectionException
from cassandra.pool import NoConnectionsAvailable
from cassandra.policies import (ConstantReconnectionPolicy, DCAwareRoundRobinPolicy,
                                RetryPolicy, TokenAwarePolicy)
from cassandra.query import BatchStatement, BatchType, PreparedStatement, Statement, dict_factory

from ledger import failpoints
from ledger.core.model import Entry, Transfer, Wallet
from ledger.store.bridge import settle as _settle
from ledger.store.port import (Fenced, JournalBatch, LoadedShard, PositionedRow, Row,
                               StoreUnavailable, UnknownOutcome, rows_at)
from ledger.store.replication import (ReplicationVerdict, UnsafeReplication, check_replication,
                                      default_replication, parse_replication)

log = logging.getLogger("ledger.store.cassandra")

# --- Limits (each with its unit and what happens when it is hit) --------------------------

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
# CAS attempts of one fence before giving up with StoreUnavailable. A retry happens only when
# another fencer changed the epoch under us, or a CAS timed out and was found not applied.
FENCE_ATTEMPTS_MAX = 16
# Delay between attempts to reconnect to a Cassandra node that went away (s).
RECONNECT_DELAY_S = 1.0
# Attempts of the SERIAL read that resolves a CAS timeout before reporting UnknownOutcome.
RESOLVE_ATTEMPTS_MAX = 3
# Journal batches of one shard whose rows may wait for the materializer. An append past it
# waits for the rows to catch up (backpressure), so the lag of the views stays bounded.
ROWS_LAG_BATCHES_MAX = 64
# Pause before the materializer retries rows that failed to write (s). Rows are idempotent
# upserts; they are retried until written or the store closes (then replay rewrites them).
ROWS_RETRY_BACKOFF_S = 0.2
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


def _row_timestamp(seq: int) -> int:
    """The write timestamp of the rows of batch ``seq`` (see ``ROW_TIMESTAMP_BASE``)."""
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ValueError(f"a row's journal position must be a batch number >= 0, got {seq!r}")
    return ROW_TIMESTAMP_BASE + seq

_WALLET_COLS = ("wallet_id", "currency", "balance_minor", "held_minor", "version",
                "allow_negative", "frozen", "created_at_ms")
_ENTRY_COLS = ("wallet_id", "version", "transfer_id", "kind", "amount_minor",
               "balance_after_minor", "counterparty_wallet_id", "currency", "at_ms")
_TRANSFER_COLS = ("transfer_id", "kind", "from_wallet_id", "to_wallet_id", "amount_minor",
                  "currency", "memo", "caller", "idempotency_key", "created_at_ms", "state",
                  "status", "status_field", "status_detail", "credited")

# Driver errors that say "the request did not (or may not) complete": coordinator-side
# timeouts, failures and overload (typed or raw protocol messages), client-side deadlines,
# broken connections. Validation errors (InvalidRequest, ...) are bugs and are not caught.
_DRIVER_ERRORS = (NoHostAvailable, RequestExecutionException, OperationTimedOut,
                  ConnectionException, OSError, cql_protocol.RequestExecutionException,
                  cql_protocol.ServerError)


def _schema(keyspace: str, replication: dict[str, int]) -> list[str]:
    repl = ", ".join(["'class': 'NetworkTopologyStrategy'"]
                     + [f"'{dc}': {n}" for dc, n in sorted(replication.items())])
    ks = keyspace
    return [
        f"CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {{{repl}}}",
        # The journal partition of a shard grows by one row per group commit; a batch row is
        # never updated, so compaction only merges immutable rows.
        f"""CREATE TABLE IF NOT EXISTS {ks}.journal (
              shard int, seq bigint,
              epoch bigint static, head bigint static,
              writer_epoch bigint, events blob,
              PRIMARY KEY ((shard), seq)) WITH CLUSTERING ORDER BY (seq ASC)""",
        # A snapshot is written in parts, each one mutation far below the 16 MiB limit, then
        # marked complete by one small row; only marked snapshots count. Parts are keyed by the
        # snapshot's digest, so two saves of one seq with different bytes never mix. Older
        # snapshots of a shard go with one range delete per table. (Keyspaces made before
        # these tables also have a ``snapshots`` table; it is no longer read.)
        f"""CREATE TABLE IF NOT EXISTS {ks}.snapshot_parts (
              shard int, seq bigint, digest blob, part int, data blob,
              PRIMARY KEY ((shard), seq, digest, part))
              WITH CLUSTERING ORDER BY (seq DESC, digest ASC, part ASC)""",
        f"""CREATE TABLE IF NOT EXISTS {ks}.snapshot_marks (
              shard int, seq bigint, digest blob, parts int, size bigint,
              PRIMARY KEY ((shard), seq)) WITH CLUSTERING ORDER BY (seq DESC)""",
        f"""CREATE TABLE IF NOT EXISTS {ks}.wallets (
              wallet_id text PRIMARY KEY, shard int, currency text, balance_minor bigint,
              held_minor bigint, version bigint, allow_negative boolean, frozen boolean,
              created_at_ms bigint)""",
        # The same wallet rows again, one partition per shard, so that reconciliation can read
        # a shard's wallets with a few sequential page reads instead of one read per wallet.
        f"""CREATE TABLE IF NOT EXISTS {ks}.shard_wallets (
              shard int, wallet_id text, currency text, balance_minor bigint,
              held_minor bigint, version bigint, allow_negative boolean, frozen boolean,
              created_at_ms bigint,
              PRIMARY KEY ((shard), wallet_id)) WITH CLUSTERING ORDER BY (wallet_id ASC)""",
        f"""CREATE TABLE IF NOT EXISTS {ks}.wallet_entries (
              wallet_id text, version bigint, transfer_id text, kind text,
              amount_minor bigint, balance_after_minor bigint, counterparty_wallet_id text,
              currency text, at_ms bigint,
              PRIMARY KEY ((wallet_id), version)) WITH CLUSTERING ORDER BY (version ASC)""",
        f"""CREATE TABLE IF NOT EXISTS {ks}.transfers (
              transfer_id text PRIMARY KEY, shard int, kind text, from_wallet_id text,
              to_wallet_id text, amount_minor bigint, currency text, memo text, caller text,
              idempotency_key text, created_at_ms bigint, state text, status int,
              status_field text, status_detail text, credited boolean)""",
    ]


def _snapshot_digest(snapshot: bytes) -> bytes:
    return hashlib.sha256(snapshot).digest()[:16]


def _snapshot_split(snapshot: bytes, part_bytes: int) -> tuple[bytes, list[bytes]]:
    """(digest, parts) of a snapshot; run in a worker thread (hashing 40 MB takes ~0.1 s)."""
    return _snapshot_digest(snapshot), [snapshot[i:i + part_bytes]
                                        for i in range(0, len(snapshot), part_bytes)] or [b""]


def _snapshot_consistency(write: int, serial: int) -> int:
    """Consistency of snapshot parts, marks and journal truncation.

    They delete journal batches, so they must be as durable as an append: QUORUM (all
    datacenters) with SERIAL appends, LOCAL_QUORUM with LOCAL_SERIAL; the configured write
    consistency if it is stronger still.
    """
    if write in (ConsistencyLevel.ALL, ConsistencyLevel.EACH_QUORUM, ConsistencyLevel.QUORUM):
        return write
    return (ConsistencyLevel.QUORUM if serial == ConsistencyLevel.SERIAL
            else ConsistencyLevel.LOCAL_QUORUM)


def _consistency(value: int | str) -> int:
    """Accept ``ConsistencyLevel.QUORUM`` or its name (``"QUORUM"``), as configuration does."""
    if isinstance(value, str):
        return ConsistencyLevel.name_to_value[value.upper()]
    return value


class _MissingKeyspace(Exception):
    """connect: the keyspace is not there (reported as StoreUnavailable)."""


def _unquoted(keyspace: str) -> str:
    """The name ``system_schema`` stores: CQL folds unquoted names to lower case."""
    return keyspace[1:-1] if keyspace.startswith('"') else keyspace.lower()


def _replication_verdict(cluster: Cluster, options: dict, serial_consistency: int | str,
                         write_consistency: int | str,
                         regions: list[str] | None) -> ReplicationVerdict:
    """Judge the keyspace's replication as read back from ``system_schema.keyspaces``."""
    strategy, replicas = parse_replication(options)
    nodes: dict[str, int] = {}
    for host in cluster.metadata.all_hosts():
        if host.datacenter:
            nodes[host.datacenter] = nodes.get(host.datacenter, 0) + 1
    return check_replication(
        replicas, strategy=strategy, regions=regions, nodes=nodes or None,
        serial_consistency=ConsistencyLevel.value_to_name[_consistency(serial_consistency)],
        commit_consistency=ConsistencyLevel.value_to_name[_consistency(write_consistency)])


def _enforce_replication(keyspace: str, verdict: ReplicationVerdict,
                         serial_consistency: int | str, required: bool) -> None:
    """Refuse (durable mode) or log a keyspace that cannot survive a region loss."""
    if verdict.survives_region_loss:
        log.info("keyspace %s: %s", keyspace, verdict.describe())
        return
    if _consistency(serial_consistency) != ConsistencyLevel.SERIAL:
        log.warning("keyspace %s (local durability mode, RPO > 0 by choice): %s", keyspace,
                    verdict.describe())
        return
    if not required:
        log.warning("keyspace %s: %s. Accepted for single-region development only: an "
                    "acknowledged transfer is NOT safe from the loss of a region", keyspace,
                    verdict.describe())
        return
    raise UnsafeReplication(
        f"keyspace {keyspace}: {verdict.describe()}. The durable mode serves only a keyspace "
        f"that keeps acknowledged transfers through the loss of a region. "
        f"Fix: ALTER KEYSPACE {keyspace} WITH replication = {{'class': "
        f"'NetworkTopologyStrategy', ...}} so that no datacenter holds a quorum and losing "
        f"any one leaves a quorum (e.g. one replica in each of three regions), then run a "
        f"full repair; or, for single-region development only, --single-region-dev "
        f"(require_region_survival=False)")


class _NoBlindRetryPolicy(RetryPolicy):
    """The driver's default policy, except that it never re-sends a non-idempotent statement.

    The default retries any statement on the next node after a connection error. For an
    append (a CAS) that could run the same proposal twice; the second run would then find its
    own batch and look like a lost race. The adapter resolves such outcomes itself.
    """

    def on_request_error(self, query, consistency, error, retry_num):
        if query is not None and not query.is_idempotent:
            return self.RETHROW, None
        return super().on_request_error(query, consistency, error, retry_num)

    def on_write_timeout(self, query, consistency, write_type, required_responses,
                         received_responses, retry_num):
        if query is not None and not query.is_idempotent:
            return self.RETHROW, None
        return super().on_write_timeout(query, consistency, write_type, required_responses,
                                        received_responses, retry_num)

    def on_unavailable(self, query, consistency, required_replicas, alive_replicas,
                       retry_num):
        # Unavailable is not proof that a CAS did nothing: the commit phase checks liveness
        # again after the proposal was accepted. Never re-send; resolve instead.
        if query is not None and not query.is_idempotent:
            return self.RETHROW, None
        return super().on_unavailable(query, consistency, required_replicas, alive_replicas,
                                      retry_num)


class _Fanout:
    """Runs many independent statements with at most ``concurrency`` in flight.

    The next statement is started from the driver callback of a finished one, so a call with
    many statements costs neither an asyncio task nor a thread per statement. Driver callbacks
    run on the driver's thread (or inline, when a response is already there), hence the
    re-entrant lock. A statement refused because the connection is busy was not sent; it is
    started again after a short pause, until the deadline. Any other error stops launching,
    and the future fails once everything in flight has finished, so that no write of this
    call is still running when the caller hears of the failure.
    """

    def __init__(self, session: Session, loop: asyncio.AbstractEventLoop,
                 statements: Sequence[Statement], concurrency: int, timeout_s: float):
        self._session = session
        self._loop = loop
        self._statements = statements
        self._next = 0
        self._in_flight = 0
        self._concurrency = concurrency
        self._timeout_s = timeout_s
        self._deadline = loop.time() + timeout_s
        self._error: BaseException | None = None
        self._settled = False
        self._lock = threading.RLock()
        self.future: asyncio.Future = loop.create_future()

    def start(self) -> asyncio.Future:
        with self._lock:
            while self._in_flight < self._concurrency and self._launch_next():
                pass
            self._finish_if_done()
        return self.future

    def _launch_next(self) -> bool:
        # Lock held.
        if self._error is not None or self._next >= len(self._statements):
            return False
        statement = self._statements[self._next]
        self._next += 1
        self._in_flight += 1
        self._send(statement, 0)
        return True

    def _send(self, statement: Statement, busy_count: int) -> None:
        # Lock held; the statement is counted in flight.
        try:
            response = self._session.execute_async(statement, timeout=self._timeout_s)
        except Exception as exc:  # e.g. the session is shut down
            self._on_error(exc, statement, busy_count)
            return
        response.add_callbacks(self._on_done, self._on_error,
                               errback_args=(statement, busy_count))

    def _resend(self, statement: Statement, busy_count: int) -> None:
        with self._lock:
            if self._error is not None:
                self._in_flight -= 1
                self._finish_if_done()
            else:
                self._send(statement, busy_count)

    def _on_done(self, _rows: Any) -> None:
        with self._lock:
            self._in_flight -= 1
            self._launch_next()
            self._finish_if_done()

    def _on_error(self, exc: BaseException, statement: Statement, busy_count: int) -> None:
        with self._lock:
            if (_connection_busy(exc) and self._error is None
                    and self._loop.time() < self._deadline):
                # Still counted in flight while it waits for its next try.
                _call_threadsafe(self._loop, self._loop.call_later, _busy_pause_s(busy_count),
                                 self._resend, statement, busy_count + 1)
                return
            self._in_flight -= 1
            if self._error is None:
                self._error = exc
            self._finish_if_done()

    def _finish_if_done(self) -> None:
        # Lock held.
        if self._settled or self._in_flight:
            return
        if self._error is not None or self._next >= len(self._statements):
            self._settled = True
            _call_threadsafe(self._loop, _settle, self.future, None, self._error)


def _connection_busy(exc: BaseException) -> bool:
    """True if the driver refused to send because every connection was full.

    The libev connection refuses new requests while the socket's send buffer is full (large
    group commits fill it quickly) and the pool refuses when all stream ids are taken. The
    request never left the client, so trying again later is safe even for a CAS.
    """
    if not isinstance(exc, NoHostAvailable) or not exc.errors:
        return False
    return all(isinstance(e, (ConnectionBusy, NoConnectionsAvailable))
               for e in exc.errors.values())


def _never_sent(exc: BaseException) -> bool:
    """True if no node received the request, so a CAS cannot have been proposed.

    The driver raises NoHostAvailable when its query plan is exhausted. For a non-idempotent
    statement that happens only before sending (_NoBlindRetryPolicy never moves an answered
    request to the next host), so the per-host errors are client-side connection errors;
    anything else in there is treated as unknown, defensively.
    """
    if not isinstance(exc, NoHostAvailable) or not exc.errors:
        return False
    return all(isinstance(e, (ConnectionBusy, NoConnectionsAvailable, ConnectionException))
               for e in exc.errors.values())


def _busy_pause_s(busy_count: int) -> float:
    # 1 ms, doubling up to 50 ms: the socket drains at loopback/LAN speed.
    return min(0.001 * (2 ** busy_count), 0.05)


def _call_threadsafe(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        # The loop was closed while the driver was still answering: nobody is waiting.
        pass


class CassandraStore:
    """``JournalStore`` on an Apache Cassandra cluster (one datacenter per region).

    Build it with ``await CassandraStore.connect(...)``; close it with ``await close()``.

    Consistency (all configurable, defaults chosen for RPO = 0 across regions):

    * ``serial_consistency`` (default SERIAL): the Paxos phase of ``fence`` and ``append``,
      and the reads that resolve a CAS timeout. SERIAL is a quorum of ALL replicas across
      datacenters, so with one replica in each of three regions an appended batch is on two
      regions before ``append`` returns and the loss of any one region loses no
      acknowledged batch (RPO = 0), while the remaining two still form a quorum and keep
      accepting appends. LOCAL_SERIAL would save one cross-region round trip per Paxos phase
      (roughly halving append latency), but a batch would then be on the local region only:
      losing that region loses every batch not yet replicated (RPO > 0, up to the hint and
      replication lag), and worse, two regions could each fence and append the same shard,
      because their local quorums do not intersect. Use it only with a single region.
    * ``write_consistency`` (default QUORUM): the commit phase of the Paxos round (the moment
      the batch becomes visible to non-serial reads) and the row upserts. Once the Paxos
      proposal is accepted the batch is durable whatever this level is; QUORUM makes it
      visible to the QUORUM reads of ``load`` and ``read_journal`` at once.
    * ``read_consistency`` (default QUORUM): journal pages, snapshots and rows. QUORUM reads
      with QUORUM writes intersect, so a read sees every acknowledged write.
    """

    # What ``connect`` found about the keyspace's replication (ledger.store.replication).
    replication_verdict: ReplicationVerdict | None = None

    def __init__(self, cluster: Cluster, session: Session, keyspace: str, local_dc: str, *,
                 serial_consistency: int | str = ConsistencyLevel.SERIAL,
                 write_consistency: int | str = ConsistencyLevel.QUORUM,
                 read_consistency: int | str = ConsistencyLevel.QUORUM,
                 request_timeout_s: float = REQUEST_TIMEOUT_S_DEFAULT) -> None:
        """Use ``connect``; this wires an already connected session."""
        self._cluster = cluster
        self._session = session
        self._keyspace = keyspace
        self._local_dc = local_dc
        self._serial_cl = _consistency(serial_consistency)
        self._write_cl = _consistency(write_consistency)
        self._read_cl = _consistency(read_consistency)
        if self._serial_cl not in (ConsistencyLevel.SERIAL, ConsistencyLevel.LOCAL_SERIAL):
            raise ValueError("serial_consistency must be SERIAL or LOCAL_SERIAL")
        self._timeout_s = request_timeout_s
        self._closed = False
        # Rows waiting to be materialized, per shard, in journal order, and the writer task
        # of each shard (one at a time per shard, so a later row never lands before an
        # earlier one of the same key).
        self._rows_pending: dict[int, list[tuple[int, list]]] = {}
        self._rows_writer: dict[int, asyncio.Task] = {}
        self._rows_done: dict[int, int] = {}
        # The error that stopped a shard's row writer (not a driver error: a bug, e.g. a value
        # the driver cannot encode). Appends of the shard then fail with StoreUnavailable
        # instead of waiting for rows that will never be written; the next fence clears it.
        self._rows_failed: dict[int, BaseException] = {}
        self._rows_changed = asyncio.Condition()
        self._prepare_all()

    # --- construction -----------------------------------------------------------------

    @classmethod
    async def connect(cls, contact_points: list[str], port: int, local_dc: str,
                      keyspace: str = "ledger", replication: dict[str, int] | None = None,
                      create_schema: bool = True, *,
                      serial_consistency: int | str = ConsistencyLevel.SERIAL,
                      write_consistency: int | str = ConsistencyLevel.QUORUM,
                      read_consistency: int | str = ConsistencyLevel.QUORUM,
                      request_timeout_s: float = REQUEST_TIMEOUT_S_DEFAULT,
                      regions: Iterable[str] | None = None,
                      require_region_survival: bool = True) -> "CassandraStore":
        """Connect to the cluster, create the schema if asked, check the keyspace's
        replication, and prepare every statement.

        Args:
            contact_points: Addresses of some nodes (any datacenter).
            port: The CQL native transport port.
            local_dc: The datacenter of this process's region. Requests go to its nodes
                first (token-aware within the datacenter); other datacenters take part only
                through the consistency levels.
            keyspace: Keyspace holding the tables.
            replication: Datacenter -> replica count for ``CREATE KEYSPACE``; one replica
                per datacenter of ``regions`` (``{local_dc: 1}`` without ``regions``) when
                omitted. Ignored for an existing keyspace: what counts is the replication
                the keyspace really has, read back from ``system_schema.keyspaces``.
            create_schema: Create keyspace and tables if missing (``IF NOT EXISTS``).
            serial_consistency: SERIAL (default) or LOCAL_SERIAL; see the class docstring.
            write_consistency: Commit consistency of appends and consistency of row writes.
            read_consistency: Consistency of journal, snapshot and row reads.
            request_timeout_s: Client-side deadline of one statement.
            regions: The datacenters of every region of the deployment. Each must hold
                replicas of the keyspace (checked), and they make the default replication.
            require_region_survival: In the durable mode (``serial_consistency`` SERIAL),
                refuse a keyspace whose replication cannot keep an acknowledged batch
                through the loss of any one region (``ledger.store.replication``). False is
                for single-region development and tests (``{r1: 1}``) and for tools that
                only report it (``ledgerctl``): a warning is logged instead. In the local
                durability mode (LOCAL_SERIAL) nothing is refused; the verdict is logged.
                The verdict is kept as ``store.replication_verdict`` either way.

        Raises:
            UnsafeReplication: durable mode, ``require_region_survival``, and the keyspace
                cannot survive a region loss (the message says why). Not transient.
            StoreUnavailable: the cluster could not be reached, the schema not created, or
                the keyspace does not exist (``create_schema=False``).
        """
        profile = ExecutionProfile(
            # Requests go to the local datacenter; when its node is down they fall back to one
            # node of each other datacenter. The commit path is a cross-region quorum anyway,
            # so a region whose Cassandra died can keep serving through its neighbours
            # (measured in the kill-cassandra-node drill: without this, the region's shards
            # were unavailable for the whole outage).
            load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(
                local_dc=local_dc, used_hosts_per_remote_dc=1)),
            retry_policy=_NoBlindRetryPolicy(),
            # Rows come back as dicts because the answer to a CAS that was not applied has
            # columns that depend on what was found; reads then map names to dataclasses.
            row_factory=dict_factory,
            request_timeout=request_timeout_s,
        )
        cluster = Cluster(contact_points=list(contact_points), port=port,
                          execution_profiles={EXEC_PROFILE_DEFAULT: profile},
                          # A restarted node is tried again every second, not after the
                          # driver's exponential backoff (which kept a healed region away
                          # for ~30 s in the drills).
                          reconnection_policy=ConstantReconnectionPolicy(
                              RECONNECT_DELAY_S, max_attempts=None),
                          # Cassandra 5 speaks v5; naming it skips the driver's downgrade
                          # dance (and its warning) on every connect.
                          protocol_version=5,
                          # The driver writes a request in 4 KB chunks. Without TCP_NODELAY,
                          # Nagle holds the last chunk until the server ACKs the previous one,
                          # which the server delays by up to 40 ms: every request of 4-200 KB
                          # (any group commit) took ~45 ms instead of ~3 ms on loopback.
                          sockopts=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])

        regions = list(regions) if regions is not None else None

        def _blocking_connect() -> tuple[Session, dict]:
            # Connecting and DDL (which waits for schema agreement) block; they happen once,
            # in a worker thread, never on the event loop.
            session = cluster.connect()
            if create_schema:
                for ddl in _schema(keyspace, replication
                                   or default_replication(local_dc, regions)):
                    session.execute(ddl, timeout=max(request_timeout_s, 60.0))
            # What the keyspace really has: CREATE ... IF NOT EXISTS keeps an existing one.
            found = session.execute(
                "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = %s",
                (_unquoted(keyspace),), timeout=max(request_timeout_s, 60.0)).one()
            if found is None:
                raise _MissingKeyspace(f"keyspace {keyspace} does not exist (create it with "
                                       f"a node that creates the schema, or ledgerd node)")
            return session, dict(found["replication"])

        try:
            session, options = await asyncio.to_thread(_blocking_connect)
            verdict = _replication_verdict(cluster, options, serial_consistency,
                                           write_consistency, regions)
            _enforce_replication(keyspace, verdict, serial_consistency, require_region_survival)
            store = await asyncio.to_thread(
                cls, cluster, session, keyspace, local_dc, serial_consistency=serial_consistency,
                write_consistency=write_consistency, read_consistency=read_consistency,
                request_timeout_s=request_timeout_s)
            store.replication_verdict = verdict
            return store
        except Exception as exc:
            await asyncio.to_thread(cluster.shutdown)
            if isinstance(exc, (ValueError, UnsafeReplication)):
                raise
            if isinstance(exc, _MissingKeyspace):
                raise StoreUnavailable(str(exc)) from None
            raise StoreUnavailable(f"cannot connect to Cassandra at {contact_points}:{port}: "
                                   f"{exc}") from exc

    def _prepare(self, cql: str, consistency: int, *, idempotent: bool) -> PreparedStatement:
        # Consistency, serial consistency and idempotence are stated on every statement
        # (bound statements inherit them), never left to session defaults.
        statement = self._session.prepare(cql.format(ks=self._keyspace))
        statement.consistency_level = consistency
        statement.serial_consistency_level = self._serial_cl
        statement.is_idempotent = idempotent
        # Reads page by key (``seq > ?``, ``version > ?``, ``wallet_id > ?``, each with a
        # LIMIT), so driver paging is never needed and stays off.
        statement.fetch_size = None
        return statement

    def _prepare_all(self) -> None:
        w, r, s = self._write_cl, self._read_cl, self._serial_cl
        # --- journal: every change of the static columns is a CAS ---
        self._q_head_serial = self._prepare(
            "SELECT epoch, head FROM {ks}.journal WHERE shard = ? LIMIT 1", s, idempotent=True)
        self._q_head = self._prepare(
            "SELECT epoch, head FROM {ks}.journal WHERE shard = ? LIMIT 1", r, idempotent=True)
        self._q_fence_new = self._prepare(
            "UPDATE {ks}.journal SET epoch = ?, head = 0 WHERE shard = ? IF epoch = null",
            w, idempotent=False)
        self._q_fence = self._prepare(
            "UPDATE {ks}.journal SET epoch = ? WHERE shard = ? IF epoch < ?",
            w, idempotent=False)
        self._q_advance = self._prepare(
            "UPDATE {ks}.journal SET head = ? WHERE shard = ? IF head = ? AND epoch = ?",
            w, idempotent=False)
        self._q_insert_batch = self._prepare(
            "INSERT INTO {ks}.journal (shard, seq, writer_epoch, events) VALUES (?, ?, ?, ?)",
            w, idempotent=False)
        self._q_batch_serial = self._prepare(
            "SELECT writer_epoch, events FROM {ks}.journal WHERE shard = ? AND seq = ?",
            s, idempotent=True)
        self._q_journal = self._prepare(
            "SELECT seq, writer_epoch, events FROM {ks}.journal WHERE shard = ? AND seq > ? "
            "LIMIT ?", r, idempotent=True)
        # --- snapshots and truncation (as durable as an append: see _snapshot_consistency) ---
        d = _snapshot_consistency(w, s)
        self._q_snapshot_part_put = self._prepare(
            "INSERT INTO {ks}.snapshot_parts (shard, seq, digest, part, data) "
            "VALUES (?, ?, ?, ?, ?)", d, idempotent=True)
        self._q_snapshot_mark_put = self._prepare(
            "INSERT INTO {ks}.snapshot_marks (shard, seq, digest, parts, size) "
            "VALUES (?, ?, ?, ?, ?)", d, idempotent=True)
        self._q_snapshot_parts_drop_older = self._prepare(
            "DELETE FROM {ks}.snapshot_parts WHERE shard = ? AND seq < ?", d, idempotent=True)
        self._q_snapshot_marks_drop_older = self._prepare(
            "DELETE FROM {ks}.snapshot_marks WHERE shard = ? AND seq < ?", d, idempotent=True)
        self._q_snapshot_mark_latest = self._prepare(
            "SELECT seq, digest, parts, size FROM {ks}.snapshot_marks WHERE shard = ? LIMIT 1",
            r, idempotent=True)
        self._q_snapshot_parts = self._prepare(
            "SELECT part, data FROM {ks}.snapshot_parts WHERE shard = ? AND seq = ? "
            "AND digest = ? AND part >= ? LIMIT ?", r, idempotent=True)
        self._q_journal_truncate = self._prepare(
            "DELETE FROM {ks}.journal WHERE shard = ? AND seq <= ?", d, idempotent=True)
        # --- rows ---
        # Every row upsert is stamped with its batch's journal position (ROW_TIMESTAMP_BASE).
        self._q_wallet_put = self._prepare(
            "INSERT INTO {ks}.wallets (shard, " + ", ".join(_WALLET_COLS) + ") VALUES ("
            + ", ".join("?" * (len(_WALLET_COLS) + 1)) + ") USING TIMESTAMP ?",
            w, idempotent=True)
        self._q_shard_wallet_put = self._prepare(
            "INSERT INTO {ks}.shard_wallets (shard, " + ", ".join(_WALLET_COLS) + ") VALUES ("
            + ", ".join("?" * (len(_WALLET_COLS) + 1)) + ") USING TIMESTAMP ?",
            w, idempotent=True)
        self._q_entry_put = self._prepare(
            "INSERT INTO {ks}.wallet_entries (" + ", ".join(_ENTRY_COLS) + ") VALUES ("
            + ", ".join("?" * len(_ENTRY_COLS)) + ") USING TIMESTAMP ?", w, idempotent=True)
        self._q_transfer_put = self._prepare(
            "INSERT INTO {ks}.transfers (shard, " + ", ".join(_TRANSFER_COLS) + ") VALUES ("
            + ", ".join("?" * (len(_TRANSFER_COLS) + 1)) + ") USING TIMESTAMP ?",
            w, idempotent=True)
        self._q_entries = self._prepare(
            "SELECT " + ", ".join(_ENTRY_COLS) + " FROM {ks}.wallet_entries "
            "WHERE wallet_id = ? AND version > ? LIMIT ?", r, idempotent=True)
        self._q_transfer = self._prepare(
            "SELECT " + ", ".join(_TRANSFER_COLS) + " FROM {ks}.transfers WHERE transfer_id = ?",
            r, idempotent=True)
        self._q_shard_wallets = self._prepare(
            "SELECT " + ", ".join(_WALLET_COLS) + " FROM {ks}.shard_wallets "
            "WHERE shard = ? AND wallet_id > ? LIMIT ?", r, idempotent=True)

    # --- driver bridge ----------------------------------------------------------------

    def _start(self, statement: Statement, params: Sequence[Any] | None) -> asyncio.Future:
        """Start one statement; the returned future resolves on the event loop.

        The driver calls back on its own I/O thread; ``call_soon_threadsafe`` hands the
        result over to the loop that awaits it.
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        response = self._session.execute_async(statement, params, timeout=self._timeout_s)
        response.add_callbacks(
            lambda rows: _call_threadsafe(loop, _settle, future, rows, None),
            lambda exc: _call_threadsafe(loop, _settle, future, None, exc))
        return future

    async def _run(self, statement: Statement, params: Sequence[Any] | None = None) -> Any:
        """Run one statement; wait and resend while the driver's connections are full."""
        deadline = asyncio.get_running_loop().time() + self._timeout_s
        busy_count = 0
        while True:
            try:
                return await self._start(statement, params)
            except NoHostAvailable as exc:
                if not _connection_busy(exc) or asyncio.get_running_loop().time() >= deadline:
                    raise
            # Back-pressure, not synchronization: the request was not sent.
            await asyncio.sleep(_busy_pause_s(busy_count))
            busy_count += 1

    async def _read(self, statement: Statement, params: Sequence[Any]) -> list[dict]:
        """Run a read; driver failures become ``StoreUnavailable`` (a read writes nothing)."""
        try:
            rows = await self._run(statement, params)
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailable(f"read failed: {type(exc).__name__}: {exc}") from exc
        return list(rows or ())

    async def _write_all(self, statements: Sequence[Statement]) -> None:
        if not statements:
            return
        fanout = _Fanout(self._session, asyncio.get_running_loop(), statements,
                         ROWS_IN_FLIGHT_MAX, self._timeout_s)
        await fanout.start()

    # --- fencing ----------------------------------------------------------------------

    async def fence(self, shard: int, epoch: int) -> int:
        """Make ``epoch`` the shard's writer epoch; return the last batch number.

        One CAS installs the epoch if the recorded one is lower (or, on a new shard, if there
        is none). Being a Paxos round, it first completes any proposal of a deposed writer
        still in flight; after it, no lower epoch can append. A SERIAL read then learns the
        head, which only this epoch (or a higher one, which deposes us) can move from then
        on, so the head is exact. The CAS deliberately does not condition on the head: a
        deposed writer that keeps appending would otherwise make every attempt fail (the
        contract suite's fence-racing test starved such a version of this method).

        Raises:
            Fenced: a higher epoch is already recorded.
            StoreUnavailable: the store could not be reached, or other fencers kept winning.
                The epoch may be installed already; fencing again with it is safe.
            UnknownOutcome: a CAS timed out and the resolving read failed too.
        """
        self._rows_forget_failure(shard)
        statement = self._q_fence.bind((epoch, shard, epoch))
        for _ in range(FENCE_ATTEMPTS_MAX):
            try:
                result = await self._run(statement)
            except _DRIVER_ERRORS as exc:
                if _never_sent(exc):
                    raise StoreUnavailable(f"fence of shard {shard}: {exc}") from exc
                # Unknown outcome: a SERIAL read completes any round still in flight, so what
                # it returns is final. Setting an epoch is idempotent: go on from there.
                recorded, head = await self._resolve_head(shard, exc)
            else:
                found = result[0] if result else {}
                if found.get("[applied]"):
                    recorded, head = await self._serial_head(shard)
                else:
                    recorded, head = found.get("epoch"), None
            if recorded is not None and recorded > epoch:
                raise Fenced(f"shard {shard}: epoch {recorded} recorded, {epoch} is stale")
            if recorded == epoch:
                if head is None:
                    recorded, head = await self._serial_head(shard)
                    if recorded != epoch:
                        continue  # a higher fencer came in between; the loop reports it
                return head or 0
            if recorded is None:
                # A shard never fenced has no epoch to compare with: initialize it.
                statement = self._q_fence_new.bind((epoch, shard))
            else:
                # Another, lower epoch won in between (or the new-shard CAS lost a race).
                statement = self._q_fence.bind((epoch, shard, epoch))
        raise StoreUnavailable(f"fence of shard {shard}: still contended after "
                               f"{FENCE_ATTEMPTS_MAX} attempts")

    async def _serial_head(self, shard: int) -> tuple[int | None, int | None]:
        rows = await self._read(self._q_head_serial, (shard,))
        return (rows[0]["epoch"], rows[0]["head"]) if rows else (None, None)

    async def _resolve_head(self, shard: int,
                            cause: BaseException) -> tuple[int | None, int | None]:
        last: BaseException = cause
        for _ in range(RESOLVE_ATTEMPTS_MAX):
            try:
                rows = list(await self._run(self._q_head_serial, (shard,)) or ())
            except _DRIVER_ERRORS as exc:
                last = exc
                continue
            return (rows[0]["epoch"], rows[0]["head"]) if rows else (None, None)
        raise UnknownOutcome(f"shard {shard}: fence timed out ({cause!r}) and the SERIAL "
                             f"read could not resolve it ({last!r})") from cause

    # --- the journal ------------------------------------------------------------------

    async def append(self, shard: int, epoch: int, seq: int, events: bytes,
                     rows: Iterable[Row]) -> None:
        """Durably append batch ``seq`` written by ``epoch``, then write its ``rows``.

        The append is ONE conditional batch on the shard's partition: ``head = seq`` if
        ``head = seq - 1 AND epoch = <epoch>``, plus the batch row. A deposed writer (stale
        epoch) or a second writer of the same number (head moved) cannot append.

        Raises:
            Fenced: ``epoch`` is not the recorded epoch, or batch ``seq`` is taken (the
                message says what was found).
            UnknownOutcome: the append timed out and SERIAL reads could not tell whether it
                was applied; or it was applied but its rows could not be written (the batch
                is durable, so reporting failure would be wrong; replay writes the rows).
            StoreUnavailable: nothing was written.
        """
        if seq < 1:
            raise ValueError(f"batch numbers start at 1, got {seq}")
        events = bytes(events)
        rows = list(rows)
        batch = BatchStatement(batch_type=BatchType.UNLOGGED,
                               consistency_level=self._write_cl,
                               serial_consistency_level=self._serial_cl)
        # Not idempotent as a statement: run twice, the second run fails its condition.
        batch.is_idempotent = False
        batch.add(self._q_advance, (seq, shard, seq - 1, epoch))
        batch.add(self._q_insert_batch, (shard, seq, epoch, events))
        await self._rows_room(shard)
        try:
            result = await self._run(batch)
        except _DRIVER_ERRORS as exc:
            if _never_sent(exc):
                raise StoreUnavailable(f"append of shard {shard} batch {seq}: {exc}") from exc
            # A CAS timeout (WriteTimeout with write_type CAS, or the client's own deadline),
            # Unavailable, or a broken connection: the proposal may still be applied later.
            await self._resolve_append(shard, epoch, seq, events, exc)
        else:
            # The CAS was sent exactly once (the retry policy never re-sends it), so "not
            # applied" means someone else holds the epoch or the number, never ourselves.
            if not (result and result[0].get("[applied]")):
                found: dict = next((r for r in (result or ()) if "epoch" in r or "head" in r), {})
                raise self._refused(shard, epoch, seq, found)
        # The batch is durable: its rows are views, written behind the commit path (a row
        # write costs more than the journal append, and it needs no serial quorum).
        self._rows_enqueue(shard, seq, rows)

    # --- the materializer ----------------------------------------------------------------

    async def _rows_room(self, shard: int) -> None:
        """Wait while the shard's rows lag too far behind its journal.

        Raises:
            StoreUnavailable: the shard's row writer stopped on an error (before anything of
                the append is written, so the caller's batch is simply not appended).
        """
        self._raise_if_rows_failed(shard)
        pending = self._rows_pending.get(shard)
        if pending and len(pending) >= ROWS_LAG_BATCHES_MAX:
            async with self._rows_changed:
                await self._rows_changed.wait_for(
                    lambda: len(self._rows_pending.get(shard, ())) < ROWS_LAG_BATCHES_MAX
                    or self._closed or shard in self._rows_failed)
            self._raise_if_rows_failed(shard)

    def _raise_if_rows_failed(self, shard: int) -> None:
        failure = self._rows_failed.get(shard)
        if failure is not None:
            raise StoreUnavailable(
                f"shard {shard}: the row writer stopped on {type(failure).__name__}: "
                f"{failure}; appends are refused until the shard is fenced and loaded again "
                f"(its replay rewrites the rows)") from failure

    def _rows_forget_failure(self, shard: int) -> None:
        """A new owner (or a reload) is fencing the shard: start the rows afresh.

        The rows still pending after a failure are dropped: their batches come after the
        latest snapshot (``save_snapshot`` flushes rows first, and ``flush_rows`` fails while
        the writer is stopped), so the replay that follows the fence writes them again.
        """
        if self._rows_failed.pop(shard, None) is not None:
            self._rows_pending.pop(shard, None)

    def _rows_enqueue(self, shard: int, seq: int, rows: list) -> None:
        self._rows_pending.setdefault(shard, []).append((seq, rows))
        if shard in self._rows_failed:
            return  # kept for nobody: the next fence drops them and replay rewrites them
        writer = self._rows_writer.get(shard)
        if writer is None or writer.done():
            self._rows_writer[shard] = asyncio.create_task(self._rows_drain(shard),
                                                           name=f"rows-{shard}")

    async def _rows_drain(self, shard: int) -> None:
        """Write the shard's pending rows, oldest first, coalescing what is queued.

        Driver errors (timeouts, unavailable replicas) are retried until the rows are written
        or the store closes. Any other error is a bug (e.g. a value the driver cannot encode)
        and would fail the same way again: it is logged with the shard and recorded, so the
        shard's appends fail with StoreUnavailable at once (``_rows_room``) and ``flush_rows``
        raises, instead of everything waiting forever for rows that are never written.
        """
        try:
            while not self._closed:
                pending = self._rows_pending.get(shard)
                if not pending:
                    return
                taken = list(pending)
                # Each row carries the position of the batch that produced it.
                rows = [(kind, value, seq) for seq, batch_rows in taken
                        for kind, value in batch_rows]
                try:
                    await self._write_all(self._row_statements(shard, rows))
                except _DRIVER_ERRORS as exc:
                    log.warning("shard %d: rows not written yet (%s); retrying", shard, exc)
                    await asyncio.sleep(ROWS_RETRY_BACKOFF_S)
                    continue
                del pending[:len(taken)]
                async with self._rows_changed:
                    self._rows_done[shard] = max(self._rows_done.get(shard, 0), taken[-1][0])
                    self._rows_changed.notify_all()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("shard %d: the row writer stopped: %s: %s; the shard's appends are "
                      "refused until it is fenced and loaded again", shard,
                      type(exc).__name__, exc, exc_info=exc)
            async with self._rows_changed:
                self._rows_failed[shard] = exc
                self._rows_changed.notify_all()

    async def flush_rows(self, shard: int, seq: int) -> None:
        """Wait until the rows of the shard's batches up to ``seq`` are written.

        Raises:
            StoreUnavailable: the shard's row writer stopped before writing them.
        """
        def written() -> bool:
            pending = self._rows_pending.get(shard)
            return self._closed or not pending or pending[0][0] > seq

        async with self._rows_changed:
            await self._rows_changed.wait_for(
                lambda: written() or shard in self._rows_failed)
        if not written():
            self._raise_if_rows_failed(shard)

    @staticmethod
    def _refused(shard: int, epoch: int, seq: int, found: dict) -> Fenced:
        """Explain a CAS that was not applied, from the values it found."""
        recorded, head = found.get("epoch"), found.get("head")
        if recorded is None:
            what = "no epoch recorded (the shard was never fenced)"
        elif recorded != epoch:
            what = f"epoch {recorded} recorded"
        else:
            what = f"head is {head}, so batch {seq} is taken or out of order"
        return Fenced(f"shard {shard}: append of batch {seq} by epoch {epoch} refused: {what}")

    async def _resolve_append(self, shard: int, epoch: int, seq: int, events: bytes,
                              cause: BaseException) -> None:
        """Decide a timed-out append with a SERIAL read of batch ``seq``.

        A read at SERIAL runs a Paxos round on the partition: it completes any proposal
        accepted by a quorum and supersedes one accepted by fewer (Paxos v2, and v1 since
        CASSANDRA-12126), so once it returns, the proposal can no longer be applied and the
        answer is final. Returns if the batch is there (success).

        Raises:
            Fenced: another writer's batch holds ``seq``.
            StoreUnavailable: the batch is not there and never will be.
            UnknownOutcome: every resolving read failed.
        """
        last: BaseException = cause
        for _ in range(RESOLVE_ATTEMPTS_MAX):
            try:
                rows = list(await self._run(self._q_batch_serial, (shard, seq)) or ())
            except _DRIVER_ERRORS as exc:
                last = exc
                continue
            if not rows:
                raise StoreUnavailable(f"append of shard {shard} batch {seq} timed out "
                                       f"({type(cause).__name__}) and was not applied")
            if rows[0]["writer_epoch"] == epoch and rows[0]["events"] == events:
                return
            raise Fenced(f"shard {shard}: batch {seq} is held by epoch "
                         f"{rows[0]['writer_epoch']} (append by epoch {epoch} timed out)")
        raise UnknownOutcome(f"shard {shard} batch {seq}: append timed out ({cause!r}) and "
                             f"the SERIAL read could not resolve it ({last!r})") from cause

    async def journal_position(self, shard: int) -> tuple[int, int, int]:
        """(epoch, last batch number, batch number of the latest snapshot) of a shard."""
        heads, snaps = await asyncio.gather(self._read(self._q_head, (shard,)),
                                            self._read(self._q_snapshot_mark_latest, (shard,)))
        epoch = (heads[0]["epoch"] or 0) if heads else 0
        head = (heads[0]["head"] or 0) if heads else 0
        return epoch, head, (snaps[0]["seq"] if snaps else 0)

    async def load(self, shard: int) -> LoadedShard:
        """Read the latest complete snapshot and every batch after it, in order, page by page.

        The head is read along and the batches are checked to run without gaps from the
        snapshot up to at least that head, so a read that missed batches fails loudly
        instead of handing the new owner a shortened journal. If the journal starts after
        the snapshot read (another owner's compaction saved a newer snapshot and truncated
        the journal meanwhile), the load starts again from the newer snapshot.

        Raises:
            StoreUnavailable: the store could not be reached, the journal read came back
                incomplete, or it raced truncations ``SNAPSHOT_LOAD_ATTEMPTS_MAX`` times.
        """
        for _ in range(SNAPSHOT_LOAD_ATTEMPTS_MAX):
            head_rows = await self._read(self._q_head, (shard,))
            snapshot_seq, snapshot = await self.load_snapshot(shard)
            head = (head_rows[0]["head"] if head_rows else None) or 0
            batches: list[JournalBatch] = []
            after = snapshot_seq
            while True:
                page = await self.read_journal(shard, after, JOURNAL_PAGE_BATCHES)
                batches.extend(page)
                if len(page) < JOURNAL_PAGE_BATCHES:
                    break
                after = page[-1].seq
            if ((not batches and head > snapshot_seq)
                    or (batches and batches[0].seq > snapshot_seq + 1)):
                # The first batches after the snapshot are missing: truncated under us if a
                # newer snapshot covers them now (load again from it), else a broken read.
                newer, _ = await self._latest_mark_seq(shard)
                if newer > snapshot_seq:
                    continue
            expected = snapshot_seq + 1
            for batch in batches:
                if batch.seq != expected:
                    raise StoreUnavailable(f"shard {shard}: journal read has a gap before "
                                           f"batch {batch.seq} (expected {expected})")
                expected += 1
            if expected - 1 < head:
                raise StoreUnavailable(f"shard {shard}: journal read ended at batch "
                                       f"{expected - 1}, head is {head}")
            return LoadedShard(snapshot, snapshot_seq, batches)
        raise StoreUnavailable(f"shard {shard}: the journal was truncated under every one of "
                               f"{SNAPSHOT_LOAD_ATTEMPTS_MAX} loads")

    async def _latest_mark_seq(self, shard: int) -> tuple[int, dict | None]:
        rows = await self._read(self._q_snapshot_mark_latest, (shard,))
        return (rows[0]["seq"], rows[0]) if rows else (0, None)

    async def load_snapshot(self, shard: int) -> tuple[int, bytes | None]:
        """(seq, bytes) of the latest complete snapshot, or (0, None).

        Reads the newest completion mark, then its parts (``SNAPSHOT_PARTS_PER_READ`` per
        round trip), and checks their number, size and digest. Parts dropped under the read
        (a newer snapshot completed meanwhile) make it start again from the newer mark.

        Raises:
            StoreUnavailable: the store could not be reached, the parts kept vanishing, or
                they do not match their mark (a damaged snapshot is never loaded).
        """
        for _ in range(SNAPSHOT_LOAD_ATTEMPTS_MAX):
            seq, mark = await self._latest_mark_seq(shard)
            if mark is None:
                return 0, None
            digest, count = mark["digest"], mark["parts"]
            parts: list[bytes] = []
            while len(parts) < count:
                rows = await self._read(self._q_snapshot_parts, (
                    shard, seq, digest, len(parts),
                    min(SNAPSHOT_PARTS_PER_READ, count - len(parts))))
                if not rows or rows[0]["part"] != len(parts):
                    break
                parts.extend(r["data"] for r in rows)
            if len(parts) < count:
                newer, _ = await self._latest_mark_seq(shard)
                if newer > seq:
                    continue  # replaced while we read it: read the newer one
                raise StoreUnavailable(f"shard {shard}: snapshot {seq} is marked complete "
                                       f"with {count} parts, but only {len(parts)} were read")
            snapshot = b"".join(parts)
            found = await asyncio.to_thread(_snapshot_digest, snapshot)
            if len(snapshot) != mark["size"] or found != digest:
                raise StoreUnavailable(f"shard {shard}: snapshot {seq} does not match its "
                                       f"mark ({len(snapshot)} bytes, {mark['size']} marked)")
            return seq, snapshot
        raise StoreUnavailable(f"shard {shard}: snapshots kept being replaced during "
                               f"{SNAPSHOT_LOAD_ATTEMPTS_MAX} reads")

    async def read_journal(self, shard: int, after_seq: int = 0,
                           limit: int = 1000) -> list[JournalBatch]:
        """Batches numbered above ``after_seq``, in order, at most ``limit``.

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        out: list[JournalBatch] = []
        while len(out) < limit:
            page_max = min(limit - len(out), JOURNAL_PAGE_BATCHES)
            rows = await self._read(self._q_journal, (shard, after_seq, page_max))
            out.extend(JournalBatch(r["seq"], r["writer_epoch"], r["events"]) for r in rows)
            if len(rows) < page_max:
                break
            after_seq = rows[-1]["seq"]
        return out

    async def save_snapshot(self, shard: int, seq: int, snapshot: bytes) -> bool:
        """Store a snapshot after batch ``seq`` in parts, mark it complete, drop older ones.

        Order: the rows of the batches up to ``seq`` (views: once the journal before the
        snapshot is truncated, no replay rewrites them), the parts (``SNAPSHOT_PART_BYTES``
        each, ``SNAPSHOT_PARTS_IN_FLIGHT`` at a time), then the completion mark, then one
        range delete of older parts and marks. A failure before the mark leaves the previous
        snapshot in force (the parts are garbage the next save's range delete drops); one
        after it leaves a complete snapshot. Parts and mark are written at QUORUM (in the
        local durability mode LOCAL_QUORUM): as durable as a journal append, because the
        journal they cover is deleted next.

        Returns:
            False if a complete snapshot at ``seq`` or above exists (nothing is written).

        Raises:
            StoreUnavailable: the store could not be reached (some parts may be written).
        """
        await self.flush_rows(shard, seq)
        latest, _ = await self._latest_mark_seq(shard)
        if latest >= seq:
            return False
        digest, parts = await asyncio.to_thread(_snapshot_split, bytes(snapshot),
                                                SNAPSHOT_PART_BYTES)
        statements = [self._q_snapshot_part_put.bind((shard, seq, digest, i, part))
                      for i, part in enumerate(parts)]
        try:
            await _Fanout(self._session, asyncio.get_running_loop(), statements,
                          SNAPSHOT_PARTS_IN_FLIGHT, self._timeout_s).start()
            if failpoints.fault("store.snapshot_before_marker"):
                raise StoreUnavailable(f"failpoint: snapshot of shard {shard} at {seq}: parts "
                                       f"written, mark not")
            await self._run(self._q_snapshot_mark_put,
                            (shard, seq, digest, len(parts), len(snapshot)))
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailable(f"snapshot of shard {shard} at {seq}: "
                                   f"{type(exc).__name__}: {exc}") from exc
        try:
            await self._run(self._q_snapshot_marks_drop_older, (shard, seq))
            await self._run(self._q_snapshot_parts_drop_older, (shard, seq))
        except _DRIVER_ERRORS as exc:  # the snapshot is complete; the next save drops them
            log.warning("shard %d: older snapshots not dropped yet: %s", shard, exc)
        return True

    async def truncate_journal(self, shard: int, through_seq: int) -> None:
        """Delete the batches numbered ``through_seq`` and below: ONE range tombstone.

        The static epoch and head are not touched (a range delete of clustering rows leaves
        the partition's static row). Reads start after the latest snapshot (``seq > ?``), so
        they seek past the tombstoned range instead of scanning it.

        Raises:
            ValueError: no complete snapshot at ``through_seq`` or above.
            StoreUnavailable: the store could not be reached.
        """
        latest, _ = await self._latest_mark_seq(shard)
        if latest < through_seq:
            raise ValueError(f"shard {shard}: no complete snapshot covers batch {through_seq} "
                             f"(latest: {latest or 'none'}); the journal stays")
        try:
            await self._run(self._q_journal_truncate, (shard, through_seq))
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailable(f"truncation of shard {shard} through {through_seq}: "
                                   f"{type(exc).__name__}: {exc}") from exc

    # --- materialized rows ------------------------------------------------------------

    def _row_statements(self, shard: int,
                        rows: Iterable[tuple[str, Any, int]]) -> list[Statement]:
        """Upserts for ``rows`` (kind, value, batch seq), packed into few requests.

        Every upsert is stamped ``USING TIMESTAMP`` with its batch's journal position
        (``_row_timestamp``), so a row of an older batch never overwrites one of a newer
        batch, whatever order requests arrive in. Of rows with one key, the one of the
        highest batch wins, and among those the last.

        The Python driver spends about 0.25 ms of CPU per request, which dominated appends
        with rows (300 rows: 52 ms of client CPU as single statements). So rows are packed
        into UNLOGGED batches: a batch is not atomic across partitions, which views do not
        need (each upsert is idempotent), but it is one request. Each batch holds upserts
        for partitions with the same first local replica, so the coordinator the token-aware
        policy picks for it owns them all, and stays below ``ROWS_BATCH_BYTES_MAX``, under
        the server's multi-partition batch limit. The shard's ``shard_wallets`` rows share a
        partition and go as one single-partition batch, which has no size limit but the
        mutation size.
        """
        wallets: dict[str, tuple[Wallet, int]] = {}
        entries: dict[tuple[str, int], tuple[Entry, int]] = {}
        transfers: dict[str, tuple[Transfer, int]] = {}

        def keep(table: dict, key: Any, value: Any, seq: int) -> None:
            held = table.get(key)
            if held is None or held[1] <= seq:
                table[key] = (value, seq)

        for kind, value, seq in rows:
            ts = _row_timestamp(seq)
            if kind == "wallet":
                keep(wallets, value.wallet_id, value, ts)
            elif kind == "entry":
                keep(entries, (value.wallet_id, value.version), value, ts)
            elif kind == "transfer":
                keep(transfers, value.transfer_id, value, ts)
            else:
                raise ValueError(f"unknown row kind {kind!r}")
        upserts: list[tuple[PreparedStatement, tuple, int]] = []
        wallet_values = [(shard, w.wallet_id, w.currency, w.balance_minor, w.held_minor,
                          w.version, w.allow_negative, w.frozen, w.created_at_ms, ts)
                         for w, ts in wallets.values()]
        for v in wallet_values:
            upserts.append((self._q_wallet_put, v, 80 + len(v[1]) + len(v[2])))
        for e, ts in entries.values():
            upserts.append((self._q_entry_put,
                            (e.wallet_id, e.version, e.transfer_id, e.kind, e.amount_minor,
                             e.balance_after_minor, e.counterparty_wallet_id, e.currency,
                             e.at_ms, ts),
                            100 + len(e.wallet_id) + len(e.transfer_id)
                            + len(e.counterparty_wallet_id) + len(e.kind) + len(e.currency)))
        for t, ts in transfers.values():
            upserts.append((self._q_transfer_put,
                            (shard, t.transfer_id, t.kind, t.from_wallet_id, t.to_wallet_id,
                             t.amount_minor, t.currency, t.memo, t.caller, t.idempotency_key,
                             t.created_at_ms, t.state, t.status, t.status_field,
                             t.status_detail, t.credited, ts),
                            160 + sum(len(x) for x in (
                                t.transfer_id, t.kind, t.from_wallet_id, t.to_wallet_id,
                                t.currency, t.memo, t.caller, t.idempotency_key, t.state,
                                t.status_field, t.status_detail))))
        statements: list[Statement] = []
        if wallet_values:
            by_shard = self._new_rows_batch()
            for v in wallet_values:
                by_shard.add(self._q_shard_wallet_put, v)
            statements.append(by_shard)
        open_batches: dict[Any, tuple[BatchStatement, list[int]]] = {}
        for prepared, values, size in upserts:
            bound = prepared.bind(values)
            replica = self._first_local_replica(bound.routing_key)
            batch, used = open_batches.get(replica, (None, [0]))
            if batch is None or used[0] + size > ROWS_BATCH_BYTES_MAX:
                batch, used = self._new_rows_batch(), [0]
                open_batches[replica] = (batch, used)
                statements.append(batch)
            batch.add(bound)
            used[0] += size
        return statements

    def _new_rows_batch(self) -> BatchStatement:
        batch = BatchStatement(batch_type=BatchType.UNLOGGED, consistency_level=self._write_cl,
                               serial_consistency_level=self._serial_cl)
        batch.is_idempotent = True  # upserts of whole rows: running one twice changes nothing
        return batch

    def _first_local_replica(self, routing_key: bytes | None) -> Any:
        if routing_key is None:
            return None
        for host in self._cluster.metadata.get_replicas(self._keyspace, routing_key):
            if host.datacenter == self._local_dc:
                return host.endpoint
        return None

    async def write_rows(self, shard: int, rows: Iterable[Row | PositionedRow],
                         seq: int | None = None) -> None:
        """Upsert materialized rows as of journal batch ``seq``, concurrently (idempotent;
        used by replay). Each upsert is stamped with its row's position (its own third
        element, else ``seq``), so it never replaces a row of a newer batch.

        Raises:
            ValueError: a row has no position.
            StoreUnavailable: some rows could not be written (others may have been).
        """
        positioned = rows_at(rows, seq)
        try:
            await self._write_all(self._row_statements(shard, positioned))
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailable(f"rows of shard {shard}: {type(exc).__name__}: "
                                   f"{exc}") from exc

    async def list_entries(self, wallet_id: str, after_version: int,
                           limit: int) -> list[Entry]:
        """A wallet's entries with version above ``after_version``, ascending, at most ``limit``.

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        out: list[Entry] = []
        while len(out) < limit:
            page_max = min(limit - len(out), ROWS_PAGE_MAX)
            rows = await self._read(self._q_entries, (wallet_id, after_version, page_max))
            out.extend(Entry(*(r[c] for c in _ENTRY_COLS)) for r in rows)
            if len(rows) < page_max:
                break
            after_version = rows[-1]["version"]
        return out

    async def get_transfer(self, transfer_id: str) -> Transfer | None:
        """The materialized transfer, or None.

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        rows = await self._read(self._q_transfer, (transfer_id,))
        return Transfer(*(rows[0][c] for c in _TRANSFER_COLS)) if rows else None

    async def scan_wallets(self, shard: int) -> list[Wallet]:
        """Every materialized wallet of ``shard``, ordered by wallet id.

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        out: list[Wallet] = []
        after = ""
        while True:
            rows = await self._read(self._q_shard_wallets, (shard, after, ROWS_PAGE_MAX))
            out.extend(Wallet(*(r[c] for c in _WALLET_COLS)) for r in rows)
            if len(rows) < ROWS_PAGE_MAX:
                return out
            after = rows[-1]["wallet_id"]

    async def close(self) -> None:
        """Write pending rows (bounded wait), then shut the driver down. Idempotent."""
        writers = [t for t in self._rows_writer.values() if not t.done()]
        if writers and not self._closed:
            await asyncio.wait(writers, timeout=self._timeout_s)
        async with self._rows_changed:
            self._closed = True
            self._rows_changed.notify_all()
        for task in self._rows_writer.values():
            task.cancel()
        if not getattr(self, "_shut", False):
            self._shut = True
            await asyncio.to_thread(self._cluster.shutdown)


__all__ = ["CassandraStore"]
