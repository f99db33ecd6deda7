"""The storage port: what a shard owner needs from a store, and the errors it may raise.

Every adapter (``sqlite``, ``cassandra``) implements ``JournalStore`` and passes the same
contract suite (``tests/contract``). The journal of a shard is a sequence of batches numbered
1, 2, 3, ... without gaps; each batch holds the codec-encoded events of one group commit.
Snapshots (``save_snapshot``) bound what a new owner replays; the batches a complete snapshot
covers may then be truncated (``truncate_journal``), so the journal's first batch is the one
after the latest snapshot, or 1 (``ledger.compaction``). The audit rows of the batches
(``ledger.core.audit``, ``read_audit``) are never truncated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

from ledger.core.audit import AuditRow
from ledger.core.model import Entry, Envelope, Grab, IdempotencyRecord, Transfer, Wallet
# The row types live with the code both adapters share about rows; they are named here too
# because the port's signatures use them.
from ledger.store.rows import PositionedRow, Row, rows_at

__all__ = ["Fenced", "JournalBatch", "JournalStore", "LoadedShard", "PositionedRow", "Row",
           "StoreError", "StoreUnavailable", "UnknownOutcome", "rows_at"]


class StoreError(Exception):
    """Base of the errors a store raises."""


class Fenced(StoreError):
    """The shard's recorded epoch is newer than the writer's, or the batch number is taken.

    The writer has been deposed. It must stop serving the shard at once and never retry the
    write: its in-memory state may be ahead of the journal.
    """


class UnknownOutcome(StoreError):
    """A write may or may not have been applied (a CAS timeout that could not be resolved).

    The caller must not report success or failure on a guess; it stops serving the shard and
    lets the next load (replay) tell what the journal holds.
    """


class StoreUnavailable(StoreError):
    """The store could not be reached; nothing was written."""


@dataclass(slots=True, frozen=True)
class JournalBatch:
    seq: int
    epoch: int
    events: bytes  # ledger.core.codec encoding of a list of events


@dataclass(slots=True, frozen=True)
class LoadedShard:
    """What a new owner reads before serving: the latest snapshot and the batches after it."""

    snapshot: bytes | None
    snapshot_seq: int
    batches: list[JournalBatch]
    # A batch up to which every row of the shard's batches is known to be written, never above
    # the last batch loaded; 0 when not known. A replay writes again only the rows of the
    # batches after it (``ledger.compaction.replay``). Cassandra keeps it as the rows mark
    # (``ledger.store.cassandra.views``), SQLite in its table ``rows_marks`` (its writer
    # thread writes rows behind the journal too, ``ledger.store.sqlite``).
    rows_seq: int = 0
    # What decided which journal rows count when this load read them: Cassandra's fenced
    # epochs, each with the batch its run starts after, as sorted (epoch, start) pairs; ()
    # where every stored batch counts (SQLite). ``load_after`` compares it with the basis of
    # the moment: a caller that folded these batches may continue from them only if no run
    # starting below its last batch appeared since.
    basis: tuple[tuple[int, int], ...] = ()


class JournalStore(Protocol):
    """Durable, epoch-fenced journals per shard, with snapshots and materialized views."""

    async def fence(self, shard: int, epoch: int) -> int:
        """Make ``epoch`` the shard's writer epoch; return the last batch number.

        After this returns, appends by any lower epoch are refused with ``Fenced``, including
        appends already in flight that have not been applied yet, and no batch a lower epoch
        writes later is ever part of a load. (SQLite checks the epoch in the append's
        transaction. Cassandra records the epoch and the batch its run starts after with one
        lightweight transaction, and its appends are plain writes: a lower epoch's late row
        may be written but never counts, and its writer is answered ``Fenced`` because the
        store acknowledges an append only while the node's lease holds and no newer fence
        started on the same store object: ``coordinator/PROTOCOL.md``, "Fencing".) Calling
        it again with the same epoch is harmless.

        Raises:
            Fenced: a higher epoch is already recorded.
            StoreUnavailable, UnknownOutcome.
        """
        ...

    async def load(self, shard: int) -> LoadedShard:
        """Read the latest complete snapshot and every batch after it, in order.

        The batches run without gaps from the snapshot's ``seq + 1`` to the journal head. A
        snapshot saved and a journal truncated while the load runs (another owner's
        compaction) do not make it fail or miss batches: it starts again from the newer
        snapshot (a bounded number of times).

        Raises:
            StoreUnavailable: the store could not be reached, or the read kept racing
                truncations, or came back incomplete.
        """
        ...

    async def load_after(self, shard: int, seq: int,
                         basis: tuple[tuple[int, int], ...]) -> LoadedShard | None:
        """The batches after ``seq``, for a caller that folded an earlier ``load`` (whose
        ``basis`` it passes) up to batch ``seq``: a warm standby (``ledger.node.Node``,
        "warm standbys") that takes the shard over and replays only the tail.

        Returns ``LoadedShard(None, seq, batches, rows_seq, basis)`` with the batches from
        ``seq + 1`` to the journal head, without gaps, and the basis of this read; or None
        when the caller's fold is no longer a prefix of the journal, and it must ``load``
        afresh: a run of an epoch now starts below ``seq`` (a fence since then read a lower
        head: a batch the caller folded may not count), the head is below ``seq``, or the
        batches after ``seq`` are truncated (a newer snapshot covers them). ``rows_seq`` as
        for ``load`` (SQLite writes every waiting row before it reads, so it answers the
        last batch unless a crash lost rows).

        Raises:
            StoreUnavailable: the store could not be reached, or the read came back
                incomplete.
        """
        ...

    async def probe_fence(self, shard: int) -> None:
        """The reads a ``fence`` of ``shard`` starts with, writing nothing: return if the store
        can do them now. A warm standby (``ledger.node``) checks so before it says it is ready:
        a store just back from a crash served the journal's plain reads before its Paxos
        reads, and a takeover whose fence failed gave the shard up, won it again and failed
        again, the shard unserved for 80 s. (Cassandra: the SERIAL read of the fence state, a
        Paxos round that completes any fencing CAS in flight and harms no owner, whose
        appends are plain writes; SQLite: a read of the head.)

        Raises:
            StoreUnavailable: a read failed or timed out.
        """
        ...

    async def load_snapshot(self, shard: int) -> tuple[int, bytes | None]:
        """(seq, bytes) of the latest complete snapshot, or (0, None) if there is none.

        Raises:
            StoreUnavailable: the store could not be reached, or the snapshot's parts were
                dropped under the read more often than retried (a newer one replaced it).
        """
        ...

    async def append(self, shard: int, epoch: int, seq: int, events: bytes,
                     rows: Iterable[Row]) -> None:
        """Durably append batch ``seq`` (the last batch number plus one) written by ``epoch``.

        The batch is durable when this returns (in the Cassandra adapter: written at QUORUM,
        a quorum spanning regions, while the node's lease held). ``rows`` are the materialized rows the batch
        changes. They are views: an adapter may write them in the same transaction or
        behind the journal, in journal order per shard and with a bounded lag (both
        adapters do the latter), each stamped with position ``seq`` so that a late write of an older
        batch (a deposed owner's row writer) never replaces a newer row; ``save_snapshot``
        writes them first, and on load the rows of batches after the snapshot are written
        again. If rows cannot be written for a reason other than the store being
        unreachable, later appends of the shard fail with ``StoreUnavailable`` until the
        shard is fenced again; they never wait forever.

        Raises:
            Fenced: ``epoch`` is not the recorded epoch, or batch ``seq`` exists.
            UnknownOutcome: the append timed out and a serial read could not tell.
            StoreUnavailable: nothing was written.
        """
        ...

    async def journal_position(self, shard: int) -> tuple[int, int, int]:
        """(writer epoch, last batch number, batch number of the latest complete snapshot)."""
        ...

    async def flush_rows(self, shard: int, seq: int) -> None:
        """Return once the rows of the shard's batches up to ``seq`` are written (and, where
        the store keeps one, a later ``load``'s ``rows_seq`` is at least ``seq``)."""
        ...

    async def mark_rows(self, shard: int, seq: int) -> None:
        """Record that every row of the shard's batches up to ``seq`` is written (a replay
        wrote the rows after ``LoadedShard.rows_seq``), so that the next load's ``rows_seq``
        is at least ``seq``. A store without a mark does nothing.

        Raises:
            StoreUnavailable: the mark could not be written.
        """
        ...

    async def write_rows(self, shard: int, rows: Iterable[Row | PositionedRow],
                         seq: int | None = None) -> None:
        """Upsert materialized rows as of journal batch ``seq`` (used by replay after a load).

        Each row carries a journal position: its own third element, else ``seq``. ``seq``
        may be the last batch replayed so far: a row then states its key's value as of that
        batch, which is true for every row the batches up to ``seq`` produced. An adapter
        must never let a row of an older position replace one of a newer position of the
        same key (a deposed owner's late writes, replays of older batches): Cassandra
        stamps each upsert with its position as the write timestamp; SQLite writes every
        waiting row first (one writer thread, in append order) and skips rows at or below
        the shard's rows mark. Idempotent.

        Raises:
            ValueError: a row has no position (neither its own nor ``seq``).
            StoreUnavailable: some rows could not be written (others may have been).
        """
        ...

    async def save_snapshot(self, shard: int, seq: int, snapshot: bytes) -> bool:
        """Store a snapshot of the state after batch ``seq``, then drop older snapshots.

        ``snapshot`` may be far larger than one store write may be (Cassandra refuses a
        mutation above 16 MiB): an adapter stores it in parts, and the snapshot counts
        (for ``load``, ``load_snapshot``, ``truncate_journal``) only once every part and,
        last, a small completion marker are durable, as durable as a journal append. A save
        that fails midway leaves the previous snapshot in force; its parts are garbage that a
        later save drops. The rows of the batches up to ``seq`` are written first (they are
        views; once the journal before the snapshot is truncated, no replay rewrites them).

        A snapshot never replaces a newer one: if a complete snapshot at ``seq`` or above
        exists (a deposed owner's late save), nothing is written and False is returned.
        Two saves of one ``seq`` hold the same state (snapshots are built from the durable
        journal and encoded deterministically); either may win.

        Returns:
            True if the snapshot is complete and the latest.

        Raises:
            StoreUnavailable: the store could not be reached (some parts may be written).
        """
        ...

    async def truncate_journal(self, shard: int, through_seq: int) -> None:
        """Delete the journal batches numbered ``through_seq`` and below.

        Only batches a complete snapshot covers may go: ``through_seq`` must not exceed the
        latest complete snapshot's ``seq``. The shard's epoch and head stay. Idempotent.

        Raises:
            ValueError: no complete snapshot at ``through_seq`` or above.
            StoreUnavailable: the store could not be reached (some batches may be deleted,
                always the oldest first or all at once, never leaving a hole).
        """
        ...

    async def read_journal(self, shard: int, after_seq: int = 0,
                           limit: int = 1000) -> list[JournalBatch]:
        """Batches with number greater than ``after_seq``, in order, at most ``limit``.

        Batches up to the latest complete snapshot may have been truncated: a reader that
        wants the whole history starts from ``load_snapshot`` and reads after its ``seq``
        (``ledger.reconcile`` does); reading from 0 returns what is left.
        """
        ...

    async def read_audit(self, shard: int, after_seq: int = 0,
                         limit: int = 1000) -> list[AuditRow]:
        """One page of the shard's audit rows (``ledger.core.audit``): ``seq`` ascending,
        each greater than ``after_seq``, at most ``limit``; shorter than ``limit`` (or
        empty): the last page. The next page starts after the last ``seq`` of this one.

        Audit rows are written with the rows of their batch (``append``: a view, so in
        Cassandra behind the journal, readable once ``flush_rows`` of their batch returned)
        and never truncated: they outlive the journal batches they came from. A store keeps
        what was written; it does not check the chain (``ledgerctl audit verify`` does).

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        ...

    async def list_entries(self, wallet_id: str, after_version: int,
                           limit: int) -> list[Entry]:
        """Materialized history of a wallet, versions ascending, after ``after_version``."""
        ...

    async def get_transfer(self, transfer_id: str) -> Transfer | None:
        """The materialized transfer row, or None."""
        ...

    async def load_keys(self, shard: int, keys: dict[tuple[str, str], str]) -> dict[
            tuple[str, str], tuple[IdempotencyRecord | None, IdempotencyRecord | None,
                                   Transfer | None]]:
        """For each (caller, idempotency key) of ``shard``: its stored key record ("idem"
        rows: captures), its stored claim ("claim" rows), and a transfer row: the one the
        record names, else the one of the transfer id given for the key (the id a money
        movement decided on this shard under that key has); None where there is none.

        Read as durably as an append is written (a new owner in another region must see
        what the old one spilled). Raises StoreUnavailable.
        """
        ...

    async def expire_keys(self, shard: int, before_ms: int) -> None:
        """Delete the key rows of ``shard`` created before ``before_ms`` (past retention).
        A store that expires them by itself (a TTL) may do nothing."""
        ...

    async def scan_wallets(self, shard: int) -> list[Wallet]:
        """Every materialized wallet row of a shard (reconciliation)."""
        ...

    # Red envelopes: "envelope" rows (the latest row of an envelope id wins, as for wallets:
    # a row of an older position never replaces a newer one) and "grab" rows (one per
    # (envelope id, position), written once, never changed). Like every view they are
    # readable once ``flush_rows`` of their batch returned. A page holds at most ``limit``
    # rows; one shorter than ``limit`` (or empty) is the last. Integer columns (``seed``
    # included) are signed 64-bit in both stores.

    async def get_envelope(self, envelope_id: str) -> Envelope | None:
        """The materialized envelope row (its latest state), or None.

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        ...

    async def list_grabs(self, envelope_id: str, after_position: int,
                         limit: int) -> list[Grab]:
        """One page of an envelope's grabs: positions ascending, each greater than
        ``after_position`` (-1 for the first page), at most ``limit``. The next page starts
        after the last position of this one.

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        ...

    async def list_envelopes_sent(self, wallet_id: str, after: tuple[int, str] | None,
                                  limit: int) -> list[Envelope]:
        """One page of the envelopes whose ``sender_wallet_id`` is ``wallet_id``, ordered by
        (``created_at_ms``, ``envelope_id``) ascending, each strictly after ``after`` (None for
        the first page), at most ``limit``. The next page starts after the
        (``created_at_ms``, ``envelope_id``) of the last envelope of this one. Each envelope
        is its latest row.

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        ...

    async def list_grabs_received(self, wallet_id: str, after: tuple[int, str] | None,
                                  limit: int) -> list[Grab]:
        """One page of the grabs whose ``receiver_wallet_id`` is ``wallet_id``, ordered by
        (``at_ms``, ``envelope_id``) ascending, each strictly after ``after`` (None for the
        first page), at most ``limit``. The next page starts after the (``at_ms``,
        ``envelope_id``) of the last grab of this one. The pair must identify one grab of
        the wallet (a wallet grabs an envelope at most once): two grabs of one envelope by
        one wallet at the same ``at_ms`` would share a key of this listing.

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        ...

    async def close(self) -> None:
        ...
