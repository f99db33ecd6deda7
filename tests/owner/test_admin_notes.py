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
    """The parts of the ownership port a takeover note reads: shard 7's home changes."""

    node_id, region = "n2", "r2"

    def __init__(self, changes: list[HomeChange]) -> None:
        self.changes = changes

    def home_changes(self, shard: int) -> list[HomeChange]:
        return list(self.changes)

    def owner(self, shard: int):
        return None


OPS = "spiffe://redledger/operator/ops"


def test_a_takeover_records_each_map_change_once_then_itself():
    move = HomeChange("c1", OPS, "MoveShard", "r1", "r2", 5_000, "rack maintenance")
    node = Node(store=None, ownership=MovedOwnership([move]), principal="node:n2")
    build = node._takeover_note(7, epoch=41)
    state = ShardState(7)
    first = build(state, 6_000)
    assert [(n.action, n.principal, n.change_id) for n in first] == [
        ("MoveShard", OPS, "c1"), ("TakeOver", "node:n2", "")]
    assert first[0].subject == "shard 7" and first[0].detail == (
        "home r1 -> r2 at 5000; reason: rack maintenance")
    assert first[1].subject == "n2" and "epoch 41" in first[1].detail
    # Once the chain holds the change, the next takeover records only itself.
    state.admin_change = "c1"
    assert [n.action for n in build(state, 7_000)] == ["TakeOver"]
    # Moved away and back before this owner journaled anything: both changes, in order.
    node.ownership.changes = [
        move, HomeChange("c2", OPS, "Failover", "r2", "r3", 8_000),
        HomeChange("c3", OPS, "Failback", "r3", "r2", 9_000)]
    assert [(n.action, n.change_id) for n in build(state, 9_500)] == [
        ("Failover", "c2"), ("Failback", "c3"), ("TakeOver", "")]
    # The recorded one no longer kept in the map: every kept change is recorded.
    state.admin_change = "c0"
    assert [n.change_id for n in build(state, 9_500)] == ["c1", "c2", "c3", ""]


async def test_notes_of_one_builder_go_in_one_batch_in_order(ledger):
    owner = await ledger.start(0)
    owner.note_admin(lambda state, now_ms: [note("MoveShard"), note("TakeOver")])
    created = await owner.submit(CreateWallet("t", "w-a", "a", "CNY", False, 1_000))
    assert created.ok
    assert [r.method for r in await records(ledger)] == ["MoveShard", "TakeOver",
                                                         "CreateWallet"]
    assert not owner._admin_notes
