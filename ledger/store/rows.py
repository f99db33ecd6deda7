"""The materialized rows both stores hold: their types, their columns, and which one wins.

A journal batch changes some rows of the views (wallets, wallet history, transfers, red
envelopes and their grabs). The pure core emits them as ``(kind, value)`` pairs while it
evolves a shard (``ShardState.evolve``); the stores write them (``JournalStore.append``,
``write_rows``). This module is what the SQLite and Cassandra adapters share about them:

* the row types, tagged by kind (``WalletRow``, ``EntryRow``, ``TransferRow``,
  ``EnvelopeRow``, ``GrabRow``, ``AuditRowOf``), and the same with the journal position of the batch that
  produced them (``PositionedRow``);
* the column order of each table, which is also the field order of the model dataclass a
  read rebuilds (``Wallet(*row)``);
* ``latest_rows``: of several rows with one key, the one of the highest journal position
  wins, and among those the last. A store writes only the winners.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, NamedTuple, TypeAlias

from ledger.core.audit import AuditRow
from ledger.core.model import Entry, Envelope, Grab, Transfer, Wallet

WALLET = "wallet"
ENTRY = "entry"
TRANSFER = "transfer"
# A red envelope (mutable: the latest row of an envelope id wins, as for wallets) and one grab
# of it (immutable: keyed by (envelope id, position), written once).
ENVELOPE = "envelope"
GRAB = "grab"
# Key records of money movements decided on the shard, and key claims made on it: the rows a
# retry is answered from once they left owner memory (``ledger.core.spilled``).
IDEM = "idem"
CLAIM = "claim"
# The audit row of a batch (``ledger.core.audit``): keyed by (shard, batch seq), written once,
# never changed and never truncated (compaction drops journal batches, not audit rows).
AUDIT = "audit"

RowKind: TypeAlias = Literal["wallet", "entry", "transfer", "envelope", "grab", "idem",
                             "claim", "audit"]
WalletRow: TypeAlias = tuple[Literal["wallet"], Wallet]
EntryRow: TypeAlias = tuple[Literal["entry"], Entry]
TransferRow: TypeAlias = tuple[Literal["transfer"], Transfer]
EnvelopeRow: TypeAlias = tuple[Literal["envelope"], Envelope]
GrabRow: TypeAlias = tuple[Literal["grab"], Grab]
AuditRowOf: TypeAlias = tuple[Literal["audit"], AuditRow]
# One row of a view as the core emits it.
Row: TypeAlias = WalletRow | EntryRow | TransferRow | EnvelopeRow | GrabRow | AuditRowOf
# A row with the journal position (batch ``seq``) of the batch that produced it.
PositionedRow: TypeAlias = tuple[RowKind, Wallet | Entry | Transfer | Envelope | Grab | AuditRow,
                                 int]

# Columns of each view, in the field order of its model dataclass.
WALLET_COLS = ("wallet_id", "currency", "balance_minor", "held_minor", "version",
               "allow_negative", "frozen", "created_at_ms")
ENTRY_COLS = ("wallet_id", "version", "transfer_id", "kind", "amount_minor",
              "balance_after_minor", "counterparty_wallet_id", "currency", "at_ms")
TRANSFER_COLS = ("transfer_id", "kind", "from_wallet_id", "to_wallet_id", "amount_minor",
                 "currency", "memo", "caller", "idempotency_key", "created_at_ms", "state",
                 "status", "status_field", "status_detail", "credited")
ENVELOPE_COLS = ("envelope_id", "sender_wallet_id", "currency", "kind", "total_minor", "shares",
                 "min_share_minor", "receiver_wallet_id", "memo", "seed", "caller",
                 "idempotency_key", "funding_transfer_id", "created_at_ms", "expires_at_ms",
                 "funded_at_ms", "left_minor", "left_shares", "refunded_minor",
                 "refund_transfer_id", "closed_at_ms")
GRAB_COLS = ("envelope_id", "position", "receiver_wallet_id", "amount_minor", "transfer_id",
             "caller", "idempotency_key", "at_ms")
AUDIT_COLS = ("shard", "seq", "epoch", "at_ms", "prev_seq", "prev_hash", "records", "hash")


def rows_at(rows: Iterable[Row | PositionedRow], seq: int | None) -> list[PositionedRow]:
    """``write_rows``' rows as (kind, value, seq): a row's own seq, else ``seq``.

    Raises:
        ValueError: a row has no position and ``seq`` is None.
    """
    out: list[PositionedRow] = []
    for row in rows:
        if len(row) == 3:
            out.append(row)
        elif seq is None:
            raise ValueError("write_rows needs the journal position of its rows: pass seq= "
                             "(the batch the rows are as of) or (kind, value, seq) rows")
        else:
            out.append((row[0], row[1], seq))
    return out


@dataclass(slots=True)
class LatestRows:
    """The rows to write, one per key, each with the position it is stamped with."""

    wallets: dict[str, tuple[Wallet, int]] = field(default_factory=dict)
    entries: dict[tuple[str, int], tuple[Entry, int]] = field(default_factory=dict)
    transfers: dict[str, tuple[Transfer, int]] = field(default_factory=dict)
    envelopes: dict[str, tuple[Envelope, int]] = field(default_factory=dict)
    # (envelope id, position) -> (Grab, position); a grab is written once, never changed.
    grabs: dict[tuple[str, int], tuple[Grab, int]] = field(default_factory=dict)
    # (kind, caller, key) -> (IdempotencyRecord, position); written once, never changed.
    keys: dict[tuple[str, str, str], tuple[object, int]] = field(default_factory=dict)
    # (shard, seq) -> (AuditRow, position); written once, never changed.
    audits: dict[tuple[int, int], tuple[AuditRow, int]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.wallets or self.entries or self.transfers or self.envelopes
                    or self.grabs or self.keys or self.audits)


def latest_rows(rows: Iterable[PositionedRow]) -> LatestRows:
    """Keep, per key, the row of the highest position; among equal positions, the last.

    Keys: a wallet by its id, an entry by (wallet id, version), a transfer by its id, an
    envelope by its id, a grab by (envelope id, position).

    Raises:
        ValueError: a row of an unknown kind (a programmer error).
    """
    out = LatestRows()

    def keep(table: dict, key: object, value: object, seq: int) -> None:
        held = table.get(key)
        if held is None or held[1] <= seq:
            table[key] = (value, seq)

    for kind, value, seq in rows:
        if kind == WALLET:
            keep(out.wallets, value.wallet_id, value, seq)  # type: ignore[union-attr]
        elif kind == ENTRY:
            keep(out.entries, (value.wallet_id, value.version), value,  # type: ignore[union-attr]
                 seq)
        elif kind == TRANSFER:
            keep(out.transfers, value.transfer_id, value, seq)  # type: ignore[union-attr]
        elif kind == ENVELOPE:
            keep(out.envelopes, value.envelope_id, value, seq)  # type: ignore[union-attr]
        elif kind == GRAB:
            keep(out.grabs, (value.envelope_id, value.position),  # type: ignore[union-attr]
                 value, seq)
        elif kind == IDEM or kind == CLAIM:
            keep(out.keys, (kind, value.caller, value.idempotency_key),  # type: ignore[union-attr]
                 value, seq)
        elif kind == AUDIT:
            keep(out.audits, (value.shard, value.seq), value, seq)  # type: ignore[union-attr]
        else:
            raise ValueError(f"unknown row kind {kind!r}")
    return out


class KeyedRows(NamedTuple):
    """``last_of_each_key``'s answer: the rows of one position, the last one per key."""

    wallets: dict[str, Wallet]
    entries: list[Entry]
    transfers: dict[str, Transfer]
    envelopes: dict[str, Envelope]
    grabs: dict[tuple[str, int], Grab]
    keys: list  # (kind, IdempotencyRecord): written once each, never updated
    audits: list  # AuditRow: one per batch at most, written once

    def size(self) -> int:
        """How many rows there are to write."""
        return sum(len(rows) for rows in self)


def last_of_each_key(rows: Iterable[Row]) -> KeyedRows:
    """Rows of ONE position (one append): per key the last row wins, as ``latest_rows``
    decides among equal positions (entries are kept in order, and the store's INSERT OR
    REPLACE lets the last of a key win). The embedded store's write path, once per append
    for every row of it: a plain loop, without the positioned copy and the call per row that
    ``latest_rows`` costs. (ledger-bench, embedded batch: 2,155-2,208/s with the general form,
    2,188-2,273/s with this loop, 1,940-2,454/s before the store split; the difference is
    within the runs' noise, so the saving is per row, not a measured throughput gain.)

    Raises:
        ValueError: a row of an unknown kind (a programmer error).
    """
    wallets: dict[str, Wallet] = {}
    entries: list[Entry] = []
    transfers: dict[str, Transfer] = {}
    envelopes: dict[str, Envelope] = {}
    grabs: dict[tuple[str, int], Grab] = {}
    keys: list = []
    audits: list = []
    for kind, value in rows:
        if kind == WALLET:
            wallets[value.wallet_id] = value  # type: ignore[union-attr,assignment]
        elif kind == ENTRY:
            entries.append(value)  # type: ignore[arg-type]
        elif kind == TRANSFER:
            transfers[value.transfer_id] = value  # type: ignore[union-attr,assignment]
        elif kind == ENVELOPE:
            envelopes[value.envelope_id] = value  # type: ignore[union-attr,assignment]
        elif kind == GRAB:
            grab: Grab = value  # type: ignore[assignment]
            grabs[(grab.envelope_id, grab.position)] = grab
        elif kind == IDEM or kind == CLAIM:
            keys.append((kind, value))
        elif kind == AUDIT:
            audits.append(value)
        else:
            raise ValueError(f"unknown row kind {kind!r}")
    return KeyedRows(wallets, entries, transfers, envelopes, grabs, keys, audits)
