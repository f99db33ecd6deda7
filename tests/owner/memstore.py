"""An in-memory ``JournalStore`` for owner-level tests: no threads, no I/O, so a test that
lets the event loop run until nothing is ready sees one deterministic interleaving.

It keeps the port's contract (epoch fencing, gap-free batch numbers, snapshots) and lets a
test hold an append at the door and decide how it ends (``gate``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ledger.store.port import Fenced, JournalBatch, LoadedShard


@dataclass
class Gate:
    """Holds one append: ``entered`` is set when it arrives; it proceeds on ``release``.
    With ``error`` set it then raises that error; ``write_first`` writes the batch before
    raising (an append that landed but whose answer was lost)."""

    entered: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None
    write_first: bool = False


class MemStore:
    def __init__(self) -> None:
        self.epochs: dict[int, int] = {}
        self.journals: dict[int, list[JournalBatch]] = {}
        self.snapshots: dict[int, tuple[int, bytes]] = {}
        self.rows: dict[int, list] = {}
        self.gates: dict[tuple[int, int], Gate] = {}
        self.appends = 0

    def gate(self, shard: int, seq: int, **kwargs) -> Gate:
        gate = Gate(**kwargs)
        self.gates[(shard, seq)] = gate
        return gate

    async def fence(self, shard: int, epoch: int) -> int:
        recorded = self.epochs.get(shard, 0)
        if recorded > epoch:
            raise Fenced(f"shard {shard}: epoch {recorded} recorded, {epoch} is stale")
        self.epochs[shard] = epoch
        return len(self.journals.get(shard, []))

    async def load(self, shard: int) -> LoadedShard:
        snap_seq, snap = self.snapshots.get(shard, (0, None))
        batches = [b for b in self.journals.get(shard, []) if b.seq > snap_seq]
        return LoadedShard(snap, snap_seq, batches)

    async def probe_fence(self, shard: int) -> None:
        return None

    async def load_after(self, shard: int, seq: int, basis) -> LoadedShard | None:
        journal = self.journals.get(shard, [])
        if len(journal) < seq:
            return None
        return LoadedShard(None, seq, journal[seq:], len(journal))

    def _write(self, shard: int, epoch: int, seq: int, events: bytes, rows) -> None:
        journal = self.journals.setdefault(shard, [])
        if self.epochs.get(shard) != epoch or len(journal) != seq - 1:
            raise Fenced(f"shard {shard}: append of {seq} by epoch {epoch} refused")
        journal.append(JournalBatch(seq, epoch, bytes(events)))
        self.rows.setdefault(shard, []).extend(rows)
        self.appends += 1

    async def append(self, shard: int, epoch: int, seq: int, events: bytes, rows) -> None:
        gate = self.gates.pop((shard, seq), None)
        if gate is not None:
            gate.entered.set()
            await gate.release.wait()
            if gate.write_first:
                self._write(shard, epoch, seq, events, list(rows))
            if gate.error is not None:
                raise gate.error
            if gate.write_first:
                return
        self._write(shard, epoch, seq, events, list(rows))

    async def journal_position(self, shard: int) -> tuple[int, int, int]:
        return (self.epochs.get(shard, 0), len(self.journals.get(shard, [])),
                self.snapshots.get(shard, (0, None))[0])

    async def flush_rows(self, shard: int, seq: int) -> None:
        return None

    async def mark_rows(self, shard: int, seq: int) -> None:
        return None

    async def write_rows(self, shard: int, rows, *args, **kwargs) -> None:
        self.rows.setdefault(shard, []).extend(rows)

    async def save_snapshot(self, shard: int, seq: int, snapshot: bytes) -> None:
        if seq >= self.snapshots.get(shard, (0, b""))[0]:
            self.snapshots[shard] = (seq, bytes(snapshot))

    async def read_journal(self, shard: int, after_seq: int = 0, limit: int = 1000):
        return [b for b in self.journals.get(shard, []) if b.seq > after_seq][:limit]

    async def list_entries(self, wallet_id: str, after_version: int, limit: int):
        return []

    async def get_transfer(self, transfer_id: str):
        return None

    async def load_keys(self, shard: int, keys: dict) -> dict:
        """The latest key rows and transfer rows of ``shard`` (rows of later batches win)."""
        records: dict = {}
        transfers: dict = {}
        for kind, value, *_ in self.rows.get(shard, []):
            if kind in ("idem", "claim"):
                records[(kind, value.caller, value.idempotency_key)] = value
            elif kind == "transfer":
                transfers[value.transfer_id] = value
        found = {}
        for (caller, key), transfer_id in keys.items():
            record = records.get(("idem", caller, key))
            if record is not None:
                transfer_id = record.target[len("transfer:"):]
            transfer = transfers.get(transfer_id)
            found[(caller, key)] = (record, records.get(("claim", caller, key)), transfer)
        return found

    async def expire_keys(self, shard: int, before_ms: int) -> None:
        self.rows[shard] = [r for r in self.rows.get(shard, []) if r[0] not in (
            "idem", "claim") or r[1].created_at_ms >= before_ms]

    async def read_audit(self, shard: int, after_seq: int = 0, limit: int = 1000):
        """The shard's audit rows (the last written per batch), ascending ``seq``."""
        latest = {value.seq: value for kind, value, *_ in self.rows.get(shard, [])
                  if kind == "audit"}
        return [latest[s] for s in sorted(latest) if s > after_seq][:limit]

    async def scan_wallets(self, shard: int):
        return []

    def _envelope_rows(self) -> tuple[dict, dict]:
        """The latest envelope per id and the grabs per (envelope id, position), over every
        shard's rows (rows of later batches win, as in ``load_keys``)."""
        envelopes: dict = {}
        grabs: dict = {}
        for rows in self.rows.values():
            for kind, value, *_ in rows:
                if kind == "envelope":
                    envelopes[value.envelope_id] = value
                elif kind == "grab":
                    grabs[(value.envelope_id, value.position)] = value
        return envelopes, grabs

    async def get_envelope(self, envelope_id: str):
        envelope = self._envelope_rows()[0].get(envelope_id)
        return envelope.copy() if envelope is not None else None

    async def list_grabs(self, envelope_id: str, after_position: int, limit: int):
        grabs = self._envelope_rows()[1]
        return [grabs[k] for k in sorted(grabs) if k[0] == envelope_id
                and k[1] > after_position][:limit]

    async def list_envelopes_sent(self, wallet_id: str, after, limit: int):
        found = sorted((v for v in self._envelope_rows()[0].values()
                        if v.sender_wallet_id == wallet_id
                        and (after is None or (v.created_at_ms, v.envelope_id) > tuple(after))),
                       key=lambda v: (v.created_at_ms, v.envelope_id))
        return [v.copy() for v in found[:limit]]

    async def list_grabs_received(self, wallet_id: str, after, limit: int):
        return sorted((g for g in self._envelope_rows()[1].values()
                       if g.receiver_wallet_id == wallet_id
                       and (after is None or (g.at_ms, g.envelope_id) > tuple(after))),
                      key=lambda g: (g.at_ms, g.envelope_id))[:limit]

    async def close(self) -> None:
        return None


async def settle(rounds: int = 200) -> None:
    """Let every ready callback run. With ``MemStore`` and in-process peers nothing waits on
    a thread or a socket, so after this the system is quiet unless a timer is pending."""
    for _ in range(rounds):
        await asyncio.sleep(0)
