"""Keyspace and tables of the Cassandra adapter, and the check of the keyspace's replication.

Layout (keyspace ``ledger`` by default, replicated with NetworkTopologyStrategy, one datacenter
per region):

* ``epoch_journal``: one partition per shard. Static columns ``epoch`` (the writer epoch, i.e.
  the fencing token) and ``starts`` (per epoch, the batch number its run starts after); one
  clustering row per batch ``(seq, writer_epoch)`` holding the codec-encoded ``events``
  (``journal.py``; which rows count is explained there and in ``coordinator/PROTOCOL.md``).
* ``snapshot_parts`` and ``snapshot_marks``: snapshots of each shard, in parts, counted only
  once their completion mark is written (``journal.py``).
* ``wallets``, ``shard_wallets``, ``wallet_entries``, ``transfers``, ``envelopes``,
  ``envelopes_by_sender``, ``grabs``, ``grabs_by_receiver``: rows materialized from the journal
  (``views.py``); ``rows_marks``: per shard, the batch up to which they are all written.

Every statement is ``CREATE ... IF NOT EXISTS`` and all of them run at every connect that
creates the schema, so a keyspace made by an older build gets the tables added since.

The replication a node serves with is the one the keyspace really has, read back from
``system_schema.keyspaces`` (``CREATE ... IF NOT EXISTS`` keeps an existing keyspace as it
is), and judged by ``ledger.store.replication``.
"""

from __future__ import annotations

import logging

from cassandra import ConsistencyLevel
from cassandra.cluster import Cluster, Session

from ledger.store.cassandra.driver import consistency as _consistency
from ledger.store.replication import (ReplicationVerdict, UnsafeReplication, check_replication,
                                      default_replication, parse_replication)

log = logging.getLogger("ledger.store.cassandra")

# Deadline of one DDL statement or schema read at connect (s): DDL waits for schema agreement.
SCHEMA_TIMEOUT_S_MIN = 60.0


def schema_ddl(keyspace: str, replication: dict[str, int]) -> list[str]:
    repl = ", ".join(["'class': 'NetworkTopologyStrategy'"]
                     + [f"'{dc}': {n}" for dc, n in sorted(replication.items())])
    ks = keyspace
    return [
        f"CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {{{repl}}}",
        # The journal partition of a shard grows by one row per group commit; a batch row is
        # never updated, so compaction only merges immutable rows. Rows are keyed by the
        # writer epoch too, so a deposed owner's late row can never overwrite the row of the
        # same number that a newer epoch wrote; which of them counts is decided by the
        # static ``starts`` (epoch -> the last batch number before its own first batch),
        # written once per epoch by the fencing lightweight transaction (``journal.py``).
        # (Keyspaces made before epoch-keyed rows also have a ``journal`` table; it is no
        # longer read.)
        f"""CREATE TABLE IF NOT EXISTS {ks}.epoch_journal (
              shard int, seq bigint, writer_epoch bigint,
              epoch bigint static, starts map<bigint, bigint> static,
              events blob,
              PRIMARY KEY ((shard), seq, writer_epoch))
              WITH CLUSTERING ORDER BY (seq ASC, writer_epoch ASC)""",
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
        # Red envelopes: the latest row of each envelope, and a sender's envelopes in order
        # of creation (key columns only: the envelope rows are read from ``envelopes``).
        f"""CREATE TABLE IF NOT EXISTS {ks}.envelopes (
              envelope_id text PRIMARY KEY, shard int, sender_wallet_id text, currency text,
              kind text, total_minor bigint, shares bigint, min_share_minor bigint,
              receiver_wallet_id text, memo text, seed bigint, caller text,
              idempotency_key text, funding_transfer_id text, created_at_ms bigint,
              expires_at_ms bigint, funded_at_ms bigint, left_minor bigint,
              left_shares bigint, refunded_minor bigint, refund_transfer_id text,
              closed_at_ms bigint)""",
        f"""CREATE TABLE IF NOT EXISTS {ks}.envelopes_by_sender (
              sender_wallet_id text, created_at_ms bigint, envelope_id text,
              PRIMARY KEY ((sender_wallet_id), created_at_ms, envelope_id))
              WITH CLUSTERING ORDER BY (created_at_ms ASC, envelope_id ASC)""",
        # The grabs of an envelope by position, and a receiver's grabs in time order (whole
        # rows: a grab never changes, so the copy never goes stale).
        f"""CREATE TABLE IF NOT EXISTS {ks}.grabs (
              envelope_id text, position bigint, receiver_wallet_id text, amount_minor bigint,
              transfer_id text, caller text, idempotency_key text, at_ms bigint,
              PRIMARY KEY ((envelope_id), position)) WITH CLUSTERING ORDER BY (position ASC)""",
        f"""CREATE TABLE IF NOT EXISTS {ks}.grabs_by_receiver (
              receiver_wallet_id text, at_ms bigint, envelope_id text, position bigint,
              amount_minor bigint, transfer_id text, caller text, idempotency_key text,
              PRIMARY KEY ((receiver_wallet_id), at_ms, envelope_id))
              WITH CLUSTERING ORDER BY (at_ms ASC, envelope_id ASC)""",
        # Key records and claims (ledger.core.spilled): one partition per key, read by key
        # when a retry's key left owner memory; expired by TTL (KEY_ROWS_TTL_S).
        f"""CREATE TABLE IF NOT EXISTS {ks}.idempotency_keys (
              shard int, caller text, idempotency_key text, kind text, record blob,
              PRIMARY KEY ((shard, caller, idempotency_key), kind))""",
        # The audit chain (ledger.core.audit): one row per journal batch with audit records,
        # never updated, never truncated. Partitioned by shard and a bucket of batch numbers
        # (AUDIT_BUCKET_BATCHES) so that no partition grows without bound.
        f"""CREATE TABLE IF NOT EXISTS {ks}.audit_chain (
              shard int, bucket bigint, seq bigint, epoch bigint, at_ms bigint,
              prev_seq bigint, prev_hash text, records blob, hash text,
              PRIMARY KEY ((shard, bucket), seq)) WITH CLUSTERING ORDER BY (seq ASC)""",
        # The rows mark of each shard: the batch up to which every row of the shard's views
        # is written (``views.py``, "The rows mark"), so that a new owner writes again only
        # the rows of the batches after it. Stamped with that batch's position, like the rows:
        # a late, lower mark never replaces a higher one.
        f"""CREATE TABLE IF NOT EXISTS {ks}.rows_marks (
              shard int PRIMARY KEY, seq bigint)""",
    ]



class MissingKeyspace(Exception):
    """connect: the keyspace is not there (reported as StoreUnavailable)."""


def _unquoted(keyspace: str) -> str:
    """The name ``system_schema`` stores: CQL folds unquoted names to lower case."""
    return keyspace[1:-1] if keyspace.startswith('"') else keyspace.lower()


def replication_verdict(cluster: Cluster, options: dict, serial_consistency: int | str,
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


def enforce_replication(keyspace: str, verdict: ReplicationVerdict,
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


def create_and_read_replication(session: Session, keyspace: str, local_dc: str,
                                replication: dict[str, int] | None, regions: list[str] | None,
                                create_schema: bool, timeout_s: float) -> dict:
    """Create the keyspace and tables if asked, then read the keyspace's replication options.

    Blocking (DDL waits for schema agreement): run it in a worker thread, never on the event
    loop.

    Raises:
        MissingKeyspace: the keyspace does not exist.
        A driver error: the cluster refused or could not be reached.
    """
    timeout_s = max(timeout_s, SCHEMA_TIMEOUT_S_MIN)
    if create_schema:
        for ddl in schema_ddl(keyspace, replication or default_replication(local_dc, regions)):
            session.execute(ddl, timeout=timeout_s)
    # What the keyspace really has: CREATE ... IF NOT EXISTS keeps an existing one.
    found = session.execute(
        "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = %s",
        (_unquoted(keyspace),), timeout=timeout_s).one()
    if found is None:
        raise MissingKeyspace(f"keyspace {keyspace} does not exist (create it with "
                              f"a node that creates the schema, or ledgerd node)")
    _refuse_old_journal(session, keyspace, timeout_s)
    return dict(found["replication"])


class OldJournalFormat(Exception):
    """The keyspace holds a journal in the table appends used before epoch-keyed rows."""


def _refuse_old_journal(session: Session, keyspace: str, timeout_s: float) -> None:
    """Refuse a keyspace whose journal is in the old ``journal`` table (one CAS per append).

    Journals now live in ``epoch_journal``; nothing reads the old table, so serving such a
    keyspace would start every shard from an empty journal: the ledger would forget its
    money. There is no migration yet: say so instead.

    Raises:
        OldJournalFormat: the old table exists and holds a row.
    """
    exists = session.execute(
        "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s AND "
        "table_name = 'journal'", (_unquoted(keyspace),), timeout=timeout_s).one()
    if exists is None:
        return
    if session.execute(f"SELECT shard FROM {keyspace}.journal LIMIT 1",
                       timeout=timeout_s).one() is not None:
        raise OldJournalFormat(
            f"keyspace {keyspace} holds journals in the old table {keyspace}.journal (a CAS "
            f"per append); this build reads {keyspace}.epoch_journal only and has no "
            f"migration: serve it with the build that wrote it")
