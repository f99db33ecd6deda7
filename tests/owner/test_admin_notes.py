"""Admin actions made outside a shard's journal (takeovers, shard map changes, policy and
certificate changes) reach the shard's audit chain: ``ShardOwner.note_admin`` and the
takeover note ``ledger.node.Node`` builds.

The note rides in the owner's next batch (no append of its own on a busy shard), goes alone
once it waited ``ADMIN_NOTE_LINGER_S`` on an idle one, survives a failed append, and a shard
map change is recorded once per shard however often the shard is taken over afterwards.
"""

from __future__ import annotations

import asyncio

from ledger import constants as K
from ledger.core import audit
from ledger.core.model import CreateWallet, NoteAdmin
from ledger.core.shard import ShardState
from ledger.node import Node
from ledger.store.port import StoreUnavailable
from shard_router.ownership import HomeChange
from tests.owner.memstore import settle


def note(action: str = "PolicyReloaded", detail: str = "sha256:ab") -> NoteAdmin:
    return NoteAdmin(action, "spiffe://redledger/node/n1", "policy-x", detail, "", 1_000)


async def records(ledger, shard: int = 0) -> list[audit.AuditRecord]:
    rows = await ledger.store.read_audit(shard)
    return [r for row in rows for r in audit.decode_records(row.records)]


async def test_a_note_rides_in_the_next_batch(ledger):
    owner = await ledger.start(0)
    owner.note_admin(note())
    before = ledger.store.appends
    created = await owner.submit(CreateWallet("t", "w-a", "a", "CNY", False, 1_000))
    assert created.ok
    assert ledger.store.appends == before + 1  # one append carried both
    got = await records(ledger)
    assert [r.method for r in got] == ["PolicyReloaded", "CreateWallet"]
    assert got[0].principal == "spiffe://redledger/node/n1" and got[0].detail == "sha256:ab"
    assert got[0].subject == "policy-x" and got[0].outcome == "OK"
    # Replayed from the journal, the chain head is the one the live owner holds.
    replayed = await ledger.start(0, epoch=2)
    assert (replayed.state.audit_seq, replayed.state.audit_head) == (
        owner.state.audit_seq, owner.state.audit_head)


async def test_an_idle_shard_journals_its_note_after_the_linger(ledger, monkeypatch):
    monkeypatch.setattr(K, "ADMIN_NOTE_LINGER_S", 0.01)
    owner = await ledger.start(0)
    before = ledger.store.appends
    owner.note_admin(note())
    await settle()
    assert ledger.store.appends == before  # not before the linger ends
    loop = asyncio.get_running_loop()
    give_up = loop.time() + 10
    while ledger.store.appends == before:
        assert loop.time() < give_up, "the lingering note was never journaled"
        await asyncio.sleep(0.01)
    assert [r.method for r in await records(ledger)] == ["PolicyReloaded"]
    assert not owner._admin_notes and owner._notes_timer is None


async def test_a_failed_append_keeps_the_note_for_the_next_batch(ledger):
    owner = await ledger.start(0)
    owner.note_admin(note())
    gate = ledger.store.gate(0, owner.state.seq + 1,
                             error=StoreUnavailable("the store is down"))
    gate.release.set()
    failed = await owner.submit(CreateWallet("t", "w-a", "a", "CNY", False, 1_000))
    assert not failed.ok  # answered UNAVAILABLE: nothing was written
    assert await records(ledger) == []
    await settle()
    created = await owner.submit(CreateWallet("t", "w-a", "a", "CNY", False, 1_000))
    assert created.ok, created
    assert [r.method for r in await records(ledger)] == ["PolicyReloaded", "CreateWallet"]


async def test_a_note_that_cannot_be_built_is_dropped_and_the_shard_serves_on(ledger, caplog):
    owner = await ledger.start(0)

    def broken(state, now_ms):
        raise KeyError("a bug in a note")

    owner.note_admin(broken)
    owner.note_admin(note())
    created = await owner.submit(CreateWallet("t", "w-a", "a", "CNY", False, 1_000))
    assert created.ok and owner.serving and not ledger.stopped
    assert [r.method for r in await records(ledger)] == ["PolicyReloaded", "CreateWallet"]
    assert any("admin note not built" in r.getMessage() for r in caplog.records)


class MovedOwnership:
    """The parts of the ownership port a takeover note reads: a shard moved to r2."""

    node_id, region = "n2", "r2"

    def __init__(self, change: HomeChange | None) -> None:
        self.change = change

    def home_change(self, shard: int) -> HomeChange | None:
        return self.change

    def owner(self, shard: int):
        return None


def test_a_takeover_records_the_map_change_once_then_plain_takeovers():
    change = HomeChange("c1", "spiffe://redledger/operator/ops", "MoveShard", "r1", "r2",
                        5_000, "rack maintenance")
    node = Node(store=None, ownership=MovedOwnership(change), principal="node:n2")
    build = node._takeover_note(7, epoch=41)
    state = ShardState(7)
    first = build(state, 6_000)
    assert (first.action, first.principal, first.change_id, first.subject) == (
        "MoveShard", "spiffe://redledger/operator/ops", "c1", "n2")
    assert "r1 -> r2" in first.detail and "rack maintenance" in first.detail
    assert "epoch 41" in first.detail
    # Once the chain holds the change, the next takeover is recorded as what it is.
    state.admin_change = "c1"
    again = build(state, 7_000)
    assert (again.action, again.principal, again.change_id) == ("TakeOver", "node:n2", "")
    # A change that moved the shard elsewhere is the next home's to record, not ours.
    away = HomeChange("c2", "spiffe://redledger/operator/ops", "MoveShard", "r2", "r3", 8_000)
    node.ownership.change = away
    state.admin_change = "c1"
    assert build(state, 9_000).action == "TakeOver"
