"""A node replays at most ``TAKEOVERS_CONCURRENT_MAX`` shards at once, and a gain that waited
for its turn while the shard was lost again starts no owner.

Why: a node that takes over a failed region's shards all at once replays them all at once; on
2 cores every one of them then serves only when the slowest is done, and its lease keep-alives
starve meanwhile (drills at load: the node gave every shard up and ownership flapped). The
node's ownership listener here is called by the test, as an elector would call it.
"""

from __future__ import annotations

import asyncio

from ledger import constants as K
from ledger.node import Node
from tests.owner.memstore import MemStore, settle


class HeldLoads(MemStore):
    """Every ``load`` waits until the test lets it go; counts the loads running at once."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.loading = 0
        self.loading_max = 0
        self.loaded: list[int] = []

    async def load(self, shard: int):
        self.loading += 1
        self.loading_max = max(self.loading_max, self.loading)
        try:
            await self.release.wait()
            self.loaded.append(shard)
            return await super().load(shard)
        finally:
            self.loading -= 1


class CalledOwnership:
    """The elector's side, driven by the test: ``listener(shard, epoch)`` reports a change."""

    node_id = "n1"
    region = "r1"

    def __init__(self) -> None:
        self.listener = None
        self.released: list[int] = []

    async def start(self, listener) -> None:
        self.listener = listener

    async def close(self) -> None:
        return None

    async def release(self, shard: int) -> None:
        self.released.append(shard)

    def lease_valid(self) -> bool:
        return True

    def owner(self, shard: int):
        return None

    def placements(self):
        return []

    def home_changes(self, shard: int) -> list:
        return []  # homes never change here


async def test_takeovers_run_a_few_at_a_time_and_a_lost_gain_starts_nothing():
    store, ownership = HeldLoads(), CalledOwnership()
    node = Node(store, ownership)
    await node.start()
    shards = list(range(K.TAKEOVERS_CONCURRENT_MAX + 3))
    for shard in shards:
        await ownership.listener(shard, 7)
    await settle()
    assert store.loading == K.TAKEOVERS_CONCURRENT_MAX  # the others wait for a slot

    # The last shard is lost while its gain still waits: the loss completes at once, and
    # the gain, when its turn comes, must not start an owner for an epoch it no longer has.
    lost = shards[-1]
    await asyncio.wait_for(ownership.listener(lost, 0), 1.0)

    store.release.set()
    assert await node.wait_serving(len(shards) - 1, timeout_s=5.0)
    assert store.loading_max == K.TAKEOVERS_CONCURRENT_MAX
    assert sorted(node.owners) == shards[:-1]
    assert lost not in store.loaded
    assert all(node.owners[s].serving and node.owners[s].epoch == 7 for s in shards[:-1])
    await node.close()


async def test_a_takeover_superseded_while_it_runs_reports_its_own_wait(caplog):
    """The takeover's log line and ``ledger_takeover_duration_seconds`` count from the report
    of *its* gain. A loss of the shard reported while the takeover ran (a node shutting
    down mid-takeover) was taken for its start: the line said "waited -625 ms for a slot"."""
    import logging
    import re

    store, ownership = HeldLoads(), CalledOwnership()
    node = Node(store, ownership)
    await node.start()
    await ownership.listener(0, 7)
    await settle()
    assert store.loading == 1
    loss = asyncio.ensure_future(ownership.listener(0, 0))  # waits for the takeover's lock
    await settle()
    with caplog.at_level(logging.INFO, logger="ledger.node"):
        store.release.set()
        await asyncio.wait_for(loss, 5.0)
    waits = [int(m.group(1)) for r in caplog.records
             if (m := re.search(r"shard 0 epoch 7 serving after .*waited (-?\d+) ms for a slot",
                                r.getMessage()))]
    assert waits and all(w >= 0 for w in waits), waits
    assert 0 not in node.owners
    await node.close()
