"""A call for a shard in the middle of a hand-over is answered the moment the new owner serves.

Why: a planned drain under load left each moved shard without an acknowledged transfer for
2-4 s while its takeover took 0.1-0.9 s (README, "Planned drain"): callers slept out their
retry backoff (25, 50, ... 500 ms) whatever happened meanwhile, and a node named the new owner
sent calls back ("not owner") until its replay was done.

* ``Node.serving_owner``: the node taking a shard over holds the call until the owner serves
  (the shard service's ``Execute`` and the local router path use it); a takeover that fails,
  or a loss that supersedes it, ends the wait with None.
* ``Router``: a retry wakes when the route changes (``route_changed``: an owner key appeared
  or went, or a local owner serves) instead of sleeping out its backoff.
"""

from __future__ import annotations

import asyncio

from ledger import constants as K
from ledger.core.model import CreateWallet
from ledger.node import Node
from shard_router import router as router_module
from shard_router.router import Router
from tests.owner.memstore import settle
from tests.owner.test_takeover_slots import CalledOwnership, HeldLoads

# A bound for awaits that must not hang; far below the backoff the router test sets.
NO_HANG_S = 5.0


async def test_a_call_waits_for_the_shard_this_node_is_taking_over():
    store, ownership = HeldLoads(), CalledOwnership()
    node = Node(store, ownership)
    await node.start()
    try:
        await ownership.listener(3, 7)
        await settle()
        assert store.loading == 1
        # Not serving yet: a caller that may wait is held, one that may not is sent back.
        assert await node.serving_owner(3, 0.0) is None
        waiting = asyncio.ensure_future(node.serving_owner(3, 60.0))
        await settle()
        assert not waiting.done()
        store.release.set()
        owner = await asyncio.wait_for(waiting, NO_HANG_S)
        assert owner is node.owners[3] and owner.serving and owner.epoch == 7
        made = await owner.submit(CreateWallet("t", "k", "w", "CNY", False, 1))
        assert made.ok, made
        # A shard the node does not take over is not waited for.
        assert await asyncio.wait_for(node.serving_owner(4, 60.0), NO_HANG_S) is None
    finally:
        await node.close()


async def test_a_takeover_superseded_by_a_loss_ends_the_wait():
    store, ownership = HeldLoads(), CalledOwnership()
    node = Node(store, ownership)
    await node.start()
    try:
        # Other takeovers hold every slot: shard 5's gain waits for one.
        for shard in range(100, 100 + K.TAKEOVERS_CONCURRENT_MAX):
            await ownership.listener(shard, 7)
        await ownership.listener(5, 7)
        await settle()
        waiting = asyncio.ensure_future(node.serving_owner(5, 60.0))
        await settle()
        await asyncio.wait_for(ownership.listener(5, 0), NO_HANG_S)  # lost before it served
        store.release.set()
        assert await asyncio.wait_for(waiting, NO_HANG_S) is None
        assert await node.wait_serving(K.TAKEOVERS_CONCURRENT_MAX, timeout_s=NO_HANG_S)
        assert 5 not in node.owners
    finally:
        await node.close()


class _Owner:
    """A serving owner that answers every command ok."""

    serving = True

    def __init__(self) -> None:
        self.calls = 0

    async def submit_many(self, commands, wait_credit=False, deadline=None):
        from ledger.core.status import ok
        self.calls += 1
        return [ok(None) for _ in commands]


class _NoOwnerYet(CalledOwnership):
    """No owner named; counts how often the router looked."""

    def __init__(self) -> None:
        super().__init__()
        self.looked = 0
        self.looked_event = asyncio.Event()

    def owner(self, shard: int):
        self.looked += 1
        self.looked_event.set()
        return None


async def test_a_retry_wakes_when_the_route_changes_not_after_its_backoff(monkeypatch):
    # A backoff far longer than the test's bound: only the wake can finish the call in time.
    monkeypatch.setattr(router_module, "SHARD_RETRY_BACKOFF_MS", 600_000)
    monkeypatch.setattr(router_module, "SHARD_RETRY_BACKOFF_MAX_MS", 600_000)
    ownership, owners = _NoOwnerYet(), {}
    router = Router("n1", owners, ownership, retry_deadline_ms=3_600_000)
    call = asyncio.ensure_future(router.execute(9, ["cmd"]))
    await asyncio.wait_for(ownership.looked_event.wait(), NO_HANG_S)
    await settle()
    assert not call.done() and ownership.looked == 1  # waiting out its backoff
    owner = _Owner()
    owners[9] = owner
    router.route_changed()
    outcomes = await asyncio.wait_for(call, NO_HANG_S)
    assert [o.ok for o in outcomes] == [True] and owner.calls == 1
