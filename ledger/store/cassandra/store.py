"""``CassandraStore``: the storage port on Cassandra, put together from its parts.

The parts (``ledger/store/cassandra/``): ``schema`` (keyspace and tables, the replication
check), ``driver`` (the driver bridge: callbacks to asyncio, statement options, driver
errors), ``journal`` (fence, append, load, snapshots, truncation) and ``views`` (the
materialized rows, their writer and their reads). This class connects, wires them, and
answers the port by delegating.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
import time
from typing import Any, Awaitable, Callable, Iterable

from cassandra import ConsistencyLevel
from cassandra.cluster import Cluster, Session

from ledger.core.audit import AuditRow
from ledger.core.model import Entry, Envelope, Grab, Transfer, Wallet
from ledger.store.cassandra.constants import (CATCH_UP_BACKLOG_S, CATCH_UP_CHECK_S,
                                               CATCH_UP_CHECK_TIMEOUT_S,
                                               REQUEST_TIMEOUT_S_DEFAULT)
from ledger.store.cassandra.driver import (DRIVER_ERRORS, Driver, consistency as _consistency,
                                           new_cluster)
from ledger.store.cassandra.journal import Journal
from ledger.store.cassandra.schema import (MissingKeyspace, OldJournalFormat,
                                           create_and_read_replication,
                                           enforce_replication, replication_verdict)
from ledger.store.cassandra.views import Views
from ledger.store.port import JournalBatch, LoadedShard, StoreUnavailable
from ledger.store.replication import ReplicationVerdict, UnsafeReplication
from ledger.store.rows import PositionedRow, Row


log = logging.getLogger("ledger.store.cassandra")


def hints_for(local_dc: str, holder_dc: str, rows: Iterable[dict[str, Any]],
              now: datetime.datetime) -> list[str]:
    """What ``catching_up`` says of one node's ``system_views.pending_hints`` rows: the hint
    files it holds for nodes of ``local_dc`` whose oldest is ``CATCH_UP_BACKLOG_S`` old or
    more (a backlog of an outage, not a mutation dropped a moment ago under load, which the
    next hint dispatch delivers), one line per node they are for. ``now``: UTC, naive, as
    Cassandra's timestamps come."""
    out = []
    backlog_from = now - datetime.timedelta(seconds=CATCH_UP_BACKLOG_S)
    for row in rows:
        if row.get("dc") != local_dc or not row.get("files"):
            continue
        if row.get("oldest") is not None and row["oldest"] > backlog_from:
            continue
        since = f" since {row['oldest']:%H:%M:%S}" if row.get("oldest") is not None else ""
        out.append(f"{holder_dc} holds {row['files']} hint file(s) for {row['address']}{since}")
    return out


class CassandraStore:
    """``JournalStore`` on an Apache Cassandra cluster (one datacenter per region).

    Build it with ``await CassandraStore.connect(...)``; close it with ``await close()``.

    Consistency (all configurable, defaults chosen for RPO = 0 across regions):

    * ``serial_consistency`` (default SERIAL): the Paxos rounds of ``fence`` (one per
      takeover; appends are plain writes) and its SERIAL reads. SERIAL is a quorum of ALL
      replicas across datacenters, so two regions can never both record an epoch.
      LOCAL_SERIAL saves the cross-region round trips, but two regions could then each fence
      the same shard, because their local quorums do not intersect. Use it only with a
      single region (the local durability mode pairs it with LOCAL_QUORUM writes).
    * ``write_consistency`` (default QUORUM): the appends (one plain write of the batch's
      row), the commit phase of the fencing CAS, and the row upserts. QUORUM across
      datacenters with one replica in each of three regions puts an appended batch on two
      regions before ``append`` returns, so the loss of any one region loses no acknowledged
      batch (RPO = 0) and the next owner's QUORUM head read sees it. LOCAL_QUORUM (local
      mode) keeps it in one region (RPO > 0).
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
        """Use ``connect``; this wires an already connected session (and prepares every
        statement: blocking, so ``connect`` runs it in a worker thread)."""
        self._cluster = cluster
        self._session = session
        self._keyspace = keyspace
        serial_cl = _consistency(serial_consistency)
        if serial_cl not in (ConsistencyLevel.SERIAL, ConsistencyLevel.LOCAL_SERIAL):
            raise ValueError("serial_consistency must be SERIAL or LOCAL_SERIAL")
        write_cl, read_cl = _consistency(write_consistency), _consistency(read_consistency)
        self._timeout_s = request_timeout_s
        self._local_dc = local_dc
        self._caught_up_check: tuple[float, str | None] = (-math.inf, None)
        self._shut = False
        self._driver = Driver(session, keyspace, serial_cl, request_timeout_s)
        self._views = Views(self._driver, cluster, local_dc, write_consistency=write_cl,
                            read_consistency=read_cl)
        self._journal = Journal(self._driver, self._views, write_consistency=write_cl,
                                read_consistency=read_cl)

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
        cluster = new_cluster(contact_points, port, local_dc, request_timeout_s)
        regions = list(regions) if regions is not None else None

        def _blocking_connect() -> tuple[Session, dict]:
            # Connecting and DDL (which waits for schema agreement) block; they happen once,
            # in a worker thread, never on the event loop.
            session = cluster.connect()
            return session, create_and_read_replication(
                session, keyspace, local_dc, replication, regions, create_schema,
                request_timeout_s)

        try:
            session, options = await asyncio.to_thread(_blocking_connect)
            verdict = replication_verdict(cluster, options, serial_consistency,
                                          write_consistency, regions)
            enforce_replication(keyspace, verdict, serial_consistency, require_region_survival)
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
            if isinstance(exc, (MissingKeyspace, OldJournalFormat)):
                raise StoreUnavailable(str(exc)) from None
            raise StoreUnavailable(f"cannot connect to Cassandra at {contact_points}:{port}: "
                                   f"{exc}") from exc

    # --- health of this region's Cassandra ------------------------------------------

    async def catching_up(self) -> str | None:
        """Why this region's Cassandra nodes are not caught up with the others, or None.

        Another node holding hints for a node of ``local_dc`` (``system_views.pending_hints``,
        read on each node of the other datacenters) means writes it missed (it was down, or
        dropped them while overloaded) are still to be replayed to it: such a node answered
        reads after 10 s and more and dropped most mutations sent to it in the kill-region
        drill, so a failback onto it stopped every acknowledgement. A planned move waits for
        it (``ledger.node``, warm standbys). A node that cannot be asked counts as not
        holding hints: this only ever delays a move. Cached for ``CATCH_UP_CHECK_S``.
        """
        checked_at, reason = self._caught_up_check
        if time.monotonic() - checked_at < CATCH_UP_CHECK_S:
            return reason
        # ``is_up`` is None for a host the driver has not connected to yet: a node started
        # with its own region's contact point alone sees the other regions' nodes so at
        # first (and its checks said "caught up" in the drills). Only a host known down is
        # skipped; a host that does not answer is skipped below.
        hosts = [h for h in self._cluster.metadata.all_hosts()
                 if h.is_up is not False and h.datacenter != self._local_dc]

        def ask(host) -> list[str]:
            rows = self._session.execute(
                "SELECT address, dc, files, oldest FROM system_views.pending_hints",
                host=host, timeout=CATCH_UP_CHECK_TIMEOUT_S)
            now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
            return hints_for(self._local_dc, host.datacenter, rows, now)

        found: list[str] = []
        for host in hosts:
            try:
                found += await asyncio.to_thread(ask, host)
            except DRIVER_ERRORS as exc:
                log.debug("pending hints not read on %s: %s", host, exc)
        reason = "; ".join(found) or None
        self._caught_up_check = (time.monotonic(), reason)
        return reason

    # --- the journal (``journal.py``) ---------------------------------------------------

    def bind_lease(self, lease_valid: Callable[[], bool],
                   confirm: Callable[[int, int], Awaitable[bool]] | None = None) -> None:
        """Acknowledge appends only while ``lease_valid()`` holds (the node's ownership lease).

        Appends are plain writes, not compare-and-set: what keeps a deposed owner from
        acknowledging a batch that its successor's head read did not see is that it answers
        only while its lease is valid, and etcd grants the shard to a successor only after
        that lease expired (``coordinator/PROTOCOL.md``, "Fencing"). ``ledgerd node`` binds
        its etcd lease here; without it (tools, tests) only this store's own fences depose.
        With ``confirm`` (``EtcdOwnership.confirm_held``), a write that ended while the node
        was suspended waits for etcd's answer instead of being refused at once.
        """
        self._journal.bind_lease(lease_valid, confirm)

    async def fence(self, shard: int, epoch: int) -> int:
        """See ``JournalStore.fence`` and ``Journal.fence``."""
        return await self._journal.fence(shard, epoch)

    async def append(self, shard: int, epoch: int, seq: int, events: bytes,
                     rows: Iterable[Row]) -> None:
        """See ``JournalStore.append`` and ``Journal.append``."""
        await self._journal.append(shard, epoch, seq, events, rows)

    async def journal_position(self, shard: int) -> tuple[int, int, int]:
        """See ``JournalStore.journal_position``."""
        return await self._journal.journal_position(shard)

    async def load(self, shard: int) -> LoadedShard:
        """See ``JournalStore.load`` and ``Journal.load``."""
        return await self._journal.load(shard)

    async def load_after(self, shard: int, seq: int,
                         basis: tuple[tuple[int, int], ...]) -> LoadedShard | None:
        """See ``JournalStore.load_after`` and ``Journal.load_after``."""
        return await self._journal.load_after(shard, seq, basis)

    async def probe_fence(self, shard: int) -> None:
        """See ``JournalStore.probe_fence`` and ``Journal.probe_fence``."""
        await self._journal.probe_fence(shard)

    async def load_snapshot(self, shard: int) -> tuple[int, bytes | None]:
        """See ``JournalStore.load_snapshot`` and ``Journal.load_snapshot``."""
        return await self._journal.load_snapshot(shard)

    async def read_journal(self, shard: int, after_seq: int = 0,
                           limit: int = 1000) -> list[JournalBatch]:
        """See ``JournalStore.read_journal``."""
        return await self._journal.read_journal(shard, after_seq, limit)

    async def save_snapshot(self, shard: int, seq: int, snapshot: bytes) -> bool:
        """See ``JournalStore.save_snapshot`` and ``Journal.save_snapshot``."""
        return await self._journal.save_snapshot(shard, seq, snapshot)

    async def truncate_journal(self, shard: int, through_seq: int) -> None:
        """See ``JournalStore.truncate_journal`` and ``Journal.truncate_journal``."""
        await self._journal.truncate_journal(shard, through_seq)

    # --- the views (``views.py``) -------------------------------------------------------

    async def flush_rows(self, shard: int, seq: int) -> None:
        """See ``JournalStore.flush_rows`` and ``Views.flush``."""
        await self._views.flush(shard, seq)

    async def mark_rows(self, shard: int, seq: int) -> None:
        """See ``JournalStore.mark_rows`` and ``Views.mark``."""
        await self._views.mark(shard, seq)

    async def write_rows(self, shard: int, rows: Iterable[Row | PositionedRow],
                         seq: int | None = None) -> None:
        """See ``JournalStore.write_rows`` and ``Views.write_rows``."""
        await self._views.write_rows(shard, rows, seq)

    async def read_audit(self, shard: int, after_seq: int = 0,
                         limit: int = 1000) -> list[AuditRow]:
        """See ``JournalStore.read_audit`` and ``Views.read_audit`` (which reads bucket
        after bucket up to the journal head's)."""
        _, head, _ = await self._journal.journal_position(shard)
        return await self._views.read_audit(shard, after_seq, limit, head)

    async def list_entries(self, wallet_id: str, after_version: int,
                           limit: int) -> list[Entry]:
        """See ``JournalStore.list_entries``."""
        return await self._views.list_entries(wallet_id, after_version, limit)

    async def load_keys(self, shard: int, keys: dict[tuple[str, str], str]) -> dict:
        return await self._views.load_keys(shard, keys)

    async def expire_keys(self, shard: int, before_ms: int) -> None:
        """Key rows expire by their TTL (KEY_ROWS_TTL_S): nothing to do."""

    async def get_transfer(self, transfer_id: str) -> Transfer | None:
        """See ``JournalStore.get_transfer``."""
        return await self._views.get_transfer(transfer_id)

    async def scan_wallets(self, shard: int) -> list[Wallet]:
        """See ``JournalStore.scan_wallets``."""
        return await self._views.scan_wallets(shard)

    async def get_envelope(self, envelope_id: str) -> Envelope | None:
        """See ``JournalStore.get_envelope``."""
        return await self._views.get_envelope(envelope_id)

    async def list_grabs(self, envelope_id: str, after_position: int,
                         limit: int) -> list[Grab]:
        """See ``JournalStore.list_grabs``."""
        return await self._views.list_grabs(envelope_id, after_position, limit)

    async def list_envelopes_sent(self, wallet_id: str, after: tuple[int, str] | None,
                                  limit: int) -> list[Envelope]:
        """See ``JournalStore.list_envelopes_sent`` and ``Views.list_envelopes_sent``."""
        return await self._views.list_envelopes_sent(wallet_id, after, limit)

    async def list_grabs_received(self, wallet_id: str, after: tuple[int, str] | None,
                                  limit: int) -> list[Grab]:
        """See ``JournalStore.list_grabs_received``."""
        return await self._views.list_grabs_received(wallet_id, after, limit)

    async def close(self) -> None:
        """Write pending rows (bounded wait), then shut the driver down. Idempotent."""
        await self._views.close(self._timeout_s)
        if not self._shut:
            self._shut = True
            await asyncio.to_thread(self._cluster.shutdown)
