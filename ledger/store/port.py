"""The storage port: what a shard owner needs from a store, and the errors it may raise.

Every adapter (``sqlite``, ``cassandra``) implements ``JournalStore`` and passes the same
contract suite (``tests/contract``). The journal of a shard is a sequence of batches numbered
1, 2, 3, ... without gaps; each batch holds the codec-encoded events of one group commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

from ledger.core.model import Entry, Transfer, Wallet


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


Row = tuple[str, Wallet | Entry | Transfer]


class JournalStore(Protocol):
    """Durable, epoch-fenced journals per shard, with snapshots and materialized views."""

    async def fence(self, shard: int, epoch: int) -> int:
        """Make ``epoch`` the shard's writer epoch; return the last batch number.

        After this returns, appends by any lower epoch are refused with ``Fenced``, including
        appends already in flight that have not been applied yet. Calling it again with the
        same epoch is harmless.

        Raises:
            Fenced: a higher epoch is already recorded.
            StoreUnavailable, UnknownOutcome.
        """
        ...

    async def load(self, shard: int) -> LoadedShard:
        """Read the latest snapshot and every batch after it, in order."""
        ...

    async def append(self, shard: int, epoch: int, seq: int, events: bytes,
                     rows: Iterable[Row]) -> None:
        """Durably append batch ``seq`` (the last batch number plus one) written by ``epoch``.

        The batch is durable when this returns (in the Cassandra adapter: accepted by a
        serial quorum spanning regions). ``rows`` are the materialized rows the batch
        changes. They are views: an adapter may write them in the same transaction (SQLite)
        or behind the journal, in journal order per shard and with a bounded lag
        (Cassandra); ``save_snapshot`` writes them first, and on load the rows of batches
        after the snapshot are written again.

        Raises:
            Fenced: ``epoch`` is not the recorded epoch, or batch ``seq`` exists.
            UnknownOutcome: the append timed out and a serial read could not tell.
            StoreUnavailable: nothing was written.
        """
        ...

    async def journal_position(self, shard: int) -> tuple[int, int, int]:
        """(writer epoch, last batch number, batch number of the latest snapshot)."""
        ...

    async def flush_rows(self, shard: int, seq: int) -> None:
        """Return once the rows of the shard's batches up to ``seq`` are written."""
        ...

    async def write_rows(self, shard: int, rows: Iterable[Row]) -> None:
        """Upsert materialized rows (idempotent; used when replaying after a load)."""
        ...

    async def save_snapshot(self, shard: int, seq: int, snapshot: bytes) -> None:
        """Store a snapshot of the state after batch ``seq``. Older snapshots may be dropped."""
        ...

    async def read_journal(self, shard: int, after_seq: int = 0,
                           limit: int = 1000) -> list[JournalBatch]:
        """Batches with number greater than ``after_seq``, in order, at most ``limit``."""
        ...

    async def list_entries(self, wallet_id: str, after_version: int,
                           limit: int) -> list[Entry]:
        """Materialized history of a wallet, versions ascending, after ``after_version``."""
        ...

    async def get_transfer(self, transfer_id: str) -> Transfer | None:
        """The materialized transfer row, or None."""
        ...

    async def scan_wallets(self, shard: int) -> list[Wallet]:
        """Every materialized wallet row of a shard (reconciliation)."""
        ...

    async def close(self) -> None:
        ...
