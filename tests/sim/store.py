"""An in-memory ``JournalStore`` (``ledger/store/port.py``) that fails the way a real one does.

Journals are kept per shard as the encoded batches the owner appends, fenced exactly as the
port says: ``fence`` records the highest epoch and refuses lower ones; an append is applied
only if its epoch is the recorded one and its batch number the next one, checked at the
moment it is applied (after its delay), so a fence that lands while an append is in flight
refuses it. Faults, drawn from the simulation's seeded generator:

* ``append_unavailable``: the append fails before writing (``StoreUnavailable``);
* ``append_unknown_written``: the batch is written, then the answer is ``UnknownOutcome``;
* ``append_unknown_lost``: nothing is written and the answer is ``UnknownOutcome``;
* ``append_slow``: the append takes a random virtual while;
* ``append_timeout_unavailable``: the append takes a while, then fails without writing (a
  timed-out write resolved as not applied: the owner's state ran ahead of the journal the
  whole time);
* ``append_hang``: the append takes longer than a lease; the simulation may depose the owner
  meanwhile (``on_hang``), whose append is then fenced, or lands and finds its lease gone;
* ``fence_unavailable`` / ``load_unavailable``: a takeover or reload step fails transiently;
* ``snapshot_unavailable``: saving a snapshot fails;
* an outage: every call fails for a while (``outage``).

An append whose caller is cancelled mid-flight (its process "crashed") lands or not, at random:
a write that left the process is not taken back by its death.

Every applied batch is handed to the oracle before the append returns: the invariants are
checked on what is durable, after every append.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ledger.core.model import Entry, Envelope, Grab, Transfer, Wallet
from ledger.store.port import (
    Fenced, JournalBatch, LoadedShard, Row, StoreUnavailable, UnknownOutcome,
)


@dataclass
class StoreFaults:
    """Probabilities per call (0..1) and delays (virtual seconds)."""

    append_unavailable: float = 0.0
    append_unknown_written: float = 0.0
    append_unknown_lost: float = 0.0
    append_slow: float = 0.0
    append_timeout_unavailable: float = 0.0
    append_hang: float = 0.0
    fence_unavailable: float = 0.0
    load_unavailable: float = 0.0
    snapshot_unavailable: float = 0.0
    delay_s_max: float = 0.002  # every call takes up to this long
    slow_s_max: float = 0.3
    hang_s: tuple[float, float] = (3.0, 12.0)


@dataclass
class _Journal:
    epoch: int = 0
    head: int = 0
    # The batches not truncated: seq -> batch (from the first kept batch to ``head``).
    batches: dict[int, JournalBatch] = field(default_factory=dict)
    # Every batch ever appended, truncated or not: what the simulation checks against.
    history: list[JournalBatch] = field(default_factory=list)
    snapshot: tuple[int, bytes] | None = None


class FaultyStore:
    """``JournalStore`` in memory, with the faults of ``StoreFaults``."""

    def __init__(self, rng: random.Random, faults: StoreFaults,
                 on_batch: Callable[[int, JournalBatch], None],
                 on_snapshot: Callable[[int, int, bytes], None],
                 log: Callable[[str], None],
                 on_hang: Callable[[int, int], None] = lambda shard, epoch: None) -> None:
        self._rng = rng
        self.faults = faults
        self._on_batch = on_batch
        self._on_snapshot = on_snapshot
        self._log = log
        self._on_hang = on_hang
        self.journals: dict[int, _Journal] = {}
        self.outage_until_s = 0.0
        self.inert = False  # set after the run: late writes of cancelled tasks are ignored
        # Calls in progress per shard: while none is, the serving owner's state is durable.
        self.busy: dict[int, int] = {}
        self.appending: dict[int, int] = {}  # appends in flight per shard
        self.counts: dict[str, int] = {}  # faults injected, by kind
        self.wallet_rows: dict[str, tuple[int, Wallet]] = {}
        self.entry_rows: dict[tuple[str, int], Entry] = {}
        self.transfer_rows: dict[str, Transfer] = {}
        self.key_rows: dict[tuple, object] = {}
        # envelope id -> (position, envelope): a row of an older position never replaces it.
        self.envelope_rows: dict[str, tuple[int, Envelope]] = {}
        self.grab_rows: dict[tuple[str, int], Grab] = {}
        # (shard, seq) -> AuditRow: the audit chain (checked at the end of a run).
        self.audit_rows: dict[tuple[int, int], object] = {}

    def _count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def _journal(self, shard: int) -> _Journal:
        return self.journals.setdefault(shard, _Journal())

    async def _delay(self, seconds: float) -> None:
        await asyncio.sleep(seconds if seconds > 0 else 0)

    def _roll(self, p: float) -> bool:
        return p > 0 and self._rng.random() < p

    def _down(self) -> bool:
        return asyncio.get_running_loop().time() < self.outage_until_s

    def outage(self, seconds: float) -> None:
        self._count("outage")
        self.outage_until_s = asyncio.get_running_loop().time() + seconds
        self._log(f"store outage for {seconds:.2f}s")

    # --- the port -----------------------------------------------------------------------

    async def fence(self, shard: int, epoch: int) -> int:
        with self._busy(shard):
            return await self._fence(shard, epoch)

    async def load(self, shard: int) -> LoadedShard:
        with self._busy(shard):
            return await self._load(shard)

    async def append(self, shard: int, epoch: int, seq: int, events: bytes,
                     rows: Iterable[Row]) -> None:
        with self._busy(shard):
            self.appending[shard] = self.appending.get(shard, 0) + 1
            try:
                await self._append(shard, epoch, seq, events, rows)
            finally:
                self.appending[shard] -= 1

    @contextlib.contextmanager
    def _busy(self, shard: int):
        self.busy[shard] = self.busy.get(shard, 0) + 1
        try:
            yield
        finally:
            self.busy[shard] -= 1

    async def _fence(self, shard: int, epoch: int) -> int:
        await self._delay(self._rng.uniform(0, self.faults.delay_s_max))
        if self._down() or self._roll(self.faults.fence_unavailable):
            self._count("fence_unavailable")
            self._log(f"fault: fence of shard {shard} epoch {epoch} unavailable")
            raise StoreUnavailable("simulated: fence failed")
        journal = self._journal(shard)
        if journal.epoch > epoch:
            raise Fenced(f"shard {shard}: epoch {journal.epoch} recorded, {epoch} is stale")
        journal.epoch = epoch
        return journal.head

    async def _load(self, shard: int) -> LoadedShard:
        await self._delay(self._rng.uniform(0, self.faults.delay_s_max))
        if self._down() or self._roll(self.faults.load_unavailable):
            self._count("load_unavailable")
            self._log(f"fault: load of shard {shard} unavailable")
            raise StoreUnavailable("simulated: load failed")
        journal = self._journal(shard)
        snapshot_seq, snapshot = journal.snapshot or (0, None)
        return LoadedShard(snapshot, snapshot_seq, [journal.batches[s] for s in range(
            snapshot_seq + 1, journal.head + 1)])

    async def load_after(self, shard: int, seq: int,
                         basis: tuple[tuple[int, int], ...]) -> LoadedShard | None:
        """The port's ``load_after``: every stored batch counts (as in SQLite)."""
        with self._busy(shard):
            await self._delay(self._rng.uniform(0, self.faults.delay_s_max))
            if self._down() or self._roll(self.faults.load_unavailable):
                self._count("load_unavailable")
                raise StoreUnavailable("simulated: load failed")
            journal = self._journal(shard)
            if journal.head < seq or any(s not in journal.batches
                                         for s in range(seq + 1, journal.head + 1)):
                return None
            return LoadedShard(None, seq, [journal.batches[s] for s in range(
                seq + 1, journal.head + 1)], journal.head)

    async def probe_fence(self, shard: int) -> None:
        await self._delay(self._rng.uniform(0, self.faults.delay_s_max))
        if self._down():
            raise StoreUnavailable("simulated: store outage")

    async def load_snapshot(self, shard: int) -> tuple[int, bytes | None]:
        await self._delay(self._rng.uniform(0, self.faults.delay_s_max))
        if self._down():
            raise StoreUnavailable("simulated: store outage")
        return self._journal(shard).snapshot or (0, None)

    async def _append(self, shard: int, epoch: int, seq: int, events: bytes,
                     rows: Iterable[Row]) -> None:
        rows = list(rows)
        f = self.faults
        rng = self._rng
        roll = rng.random()
        kind = "ok"
        for name in ("append_unavailable", "append_unknown_written", "append_unknown_lost",
                     "append_slow", "append_timeout_unavailable", "append_hang"):
            p = getattr(f, name)
            if roll < p:
                kind = name
                break
            roll -= p
        if self._down():
            kind = "append_unavailable"
        delay = rng.uniform(0, f.delay_s_max)
        if kind in ("append_slow", "append_timeout_unavailable"):
            delay += rng.uniform(0, f.slow_s_max)
        elif kind == "append_hang":
            delay += rng.uniform(*f.hang_s)
        if kind != "ok":
            self._count(kind)
            self._log(f"fault: {kind} shard {shard} batch {seq} epoch {epoch}"
                      + (f" ({delay:.2f}s)" if delay > 0.01 else ""))
        if kind == "append_hang":
            self._on_hang(shard, epoch)
        if kind in ("append_unavailable", "append_timeout_unavailable"):
            await self._delay(delay)
            raise StoreUnavailable("simulated: append not written")
        try:
            await self._delay(delay)
        except asyncio.CancelledError:
            # The writer died with the write in flight: it reached the store, or it did not.
            if rng.random() < 0.5 and not self.inert:
                try:
                    self._apply(shard, epoch, seq, events, rows)
                    self._count("append_landed_after_writer_died")
                    self._log(f"append of shard {shard} batch {seq} landed after its "
                              f"writer was cancelled")
                except Fenced:
                    pass
            raise
        if kind == "append_unknown_lost":
            raise UnknownOutcome("simulated: append timed out, not written")
        self._apply(shard, epoch, seq, events, rows)
        if kind == "append_unknown_written":
            raise UnknownOutcome("simulated: append timed out, written")

    def _apply(self, shard: int, epoch: int, seq: int, events: bytes, rows: list[Row]) -> None:
        journal = self._journal(shard)
        if journal.epoch != epoch or journal.head != seq - 1:
            raise Fenced(f"shard {shard}: append of batch {seq} by epoch {epoch} refused "
                         f"(epoch {journal.epoch}, head {journal.head})")
        batch = JournalBatch(seq, epoch, events)
        journal.batches[seq] = batch
        journal.history.append(batch)
        journal.head = seq
        self._write_rows(shard, rows, seq)
        if not self.inert:
            self._on_batch(shard, batch)

    async def journal_position(self, shard: int) -> tuple[int, int, int]:
        journal = self._journal(shard)
        return journal.epoch, journal.head, (journal.snapshot or (0, b""))[0]

    async def flush_rows(self, shard: int, seq: int) -> None:
        """Rows are written with their batch: nothing is ever pending."""

    async def mark_rows(self, shard: int, seq: int) -> None:
        """No rows mark (``rows_seq`` 0): a replay writes every row again, as on SQLite."""

    async def write_rows(self, shard: int, rows: Iterable, seq: int | None = None) -> None:
        with self._busy(shard):
            await self._delay(self._rng.uniform(0, self.faults.delay_s_max))
            self._write_rows(shard, list(rows), seq)

    def _write_rows(self, shard: int, rows: list, seq: int | None = None) -> None:
        # Views only: the simulation checks journals, not rows (no position ordering here,
        # but for envelopes, whose reads a test may check: a row's own position, else
        # ``seq``; a row without either counts as the newest).
        for row in rows:
            kind, value = row[0], row[1]
            if kind == "envelope":
                position = row[2] if len(row) == 3 else seq
                held = self.envelope_rows.get(value.envelope_id)
                if position is None or held is None or held[0] <= position:
                    at = position if position is not None else (held[0] if held else 0)
                    self.envelope_rows[value.envelope_id] = (at, value.copy())
            elif kind == "grab":
                self.grab_rows[(value.envelope_id, value.position)] = value
            elif kind == "wallet":
                self.wallet_rows[value.wallet_id] = (shard, value)
            elif kind == "transfer":
                self.transfer_rows[value.transfer_id] = value
            elif kind in ("idem", "claim"):
                self.key_rows[(shard, value.caller, value.idempotency_key, kind)] = value
            elif kind == "audit":
                self.audit_rows[(shard, value.seq)] = value
            else:
                self.entry_rows[(value.wallet_id, value.version)] = value

    async def load_keys(self, shard: int, keys: dict) -> dict:
        await self._delay(self._rng.uniform(0, self.faults.delay_s_max))
        if self._down() or self._roll(self.faults.load_unavailable):
            self._count("load_keys_unavailable")
            raise StoreUnavailable("simulated: key rows not read")
        found = {}
        for (caller, key), transfer_id in keys.items():
            record = self.key_rows.get((shard, caller, key, "idem"))
            claim = self.key_rows.get((shard, caller, key, "claim"))
            if record is not None and record.target.startswith("transfer:"):
                transfer_id = record.target[len("transfer:"):]
            transfer = self.transfer_rows.get(transfer_id) if transfer_id else None
            if record is not None or claim is not None or transfer is not None:
                self._count("spilled_key_found")  # a retry answered from the store
            found[(caller, key)] = (record, claim, transfer)
        return found

    async def read_audit(self, shard: int, after_seq: int = 0, limit: int = 1000) -> list:
        return [self.audit_rows[k] for k in sorted(self.audit_rows)
                if k[0] == shard and k[1] > after_seq][:limit]

    async def expire_keys(self, shard: int, before_ms: int) -> None:
        for k in [k for k, r in self.key_rows.items()
                  if k[0] == shard and r.created_at_ms < before_ms]:
            del self.key_rows[k]

    async def save_snapshot(self, shard: int, seq: int, snapshot: bytes) -> bool:
        await self._delay(self._rng.uniform(0, self.faults.delay_s_max))
        if self._down() or self._roll(self.faults.snapshot_unavailable):
            self._count("snapshot_unavailable")
            self._log(f"fault: snapshot of shard {shard} at {seq} unavailable")
            raise StoreUnavailable("simulated: snapshot failed")
        if self.inert:
            return False
        self._on_snapshot(shard, seq, snapshot)
        journal = self._journal(shard)
        if journal.snapshot is not None and journal.snapshot[0] >= seq:
            return False  # never replaces a newer snapshot
        journal.snapshot = (seq, snapshot)
        return True

    async def truncate_journal(self, shard: int, through_seq: int) -> None:
        await self._delay(self._rng.uniform(0, self.faults.delay_s_max))
        if self._down():
            raise StoreUnavailable("simulated: store outage")
        journal = self._journal(shard)
        if journal.snapshot is None or journal.snapshot[0] < through_seq:
            raise ValueError(f"shard {shard}: no complete snapshot at {through_seq} or above")
        for seq in [s for s in journal.batches if s <= through_seq]:
            del journal.batches[seq]

    async def read_journal(self, shard: int, after_seq: int = 0,
                           limit: int = 1000) -> list[JournalBatch]:
        journal = self._journal(shard)
        first = max(after_seq + 1, min(journal.batches, default=journal.head + 1))
        return [journal.batches[s] for s in range(first, min(journal.head, first + limit - 1)
                                                  + 1)]

    async def list_entries(self, wallet_id: str, after_version: int,
                           limit: int) -> list[Entry]:
        found = []
        version = after_version + 1
        while len(found) < limit and (wallet_id, version) in self.entry_rows:
            found.append(self.entry_rows[(wallet_id, version)])
            version += 1
        return found

    async def get_transfer(self, transfer_id: str) -> Transfer | None:
        row = self.transfer_rows.get(transfer_id)
        return row.copy() if row is not None else None

    async def get_envelope(self, envelope_id: str) -> Envelope | None:
        held = self.envelope_rows.get(envelope_id)
        return held[1].copy() if held is not None else None

    async def list_grabs(self, envelope_id: str, after_position: int,
                         limit: int) -> list[Grab]:
        return sorted((g for (e, p), g in self.grab_rows.items()
                       if e == envelope_id and p > after_position),
                      key=lambda g: g.position)[:limit]

    async def list_envelopes_sent(self, wallet_id: str, after: tuple[int, str] | None,
                                  limit: int) -> list[Envelope]:
        found = sorted((v for _, v in self.envelope_rows.values()
                        if v.sender_wallet_id == wallet_id
                        and (after is None or (v.created_at_ms, v.envelope_id) > after)),
                       key=lambda v: (v.created_at_ms, v.envelope_id))
        return [v.copy() for v in found[:limit]]

    async def list_grabs_received(self, wallet_id: str, after: tuple[int, str] | None,
                                  limit: int) -> list[Grab]:
        return sorted((g for g in self.grab_rows.values()
                       if g.receiver_wallet_id == wallet_id
                       and (after is None or (g.at_ms, g.envelope_id) > after)),
                      key=lambda g: (g.at_ms, g.envelope_id))[:limit]

    async def scan_wallets(self, shard: int) -> list[Wallet]:
        return sorted((w.copy() for s, w in self.wallet_rows.values() if s == shard),
                      key=lambda w: w.wallet_id)

    async def close(self) -> None:
        pass
