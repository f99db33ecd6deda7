"""A shard given up by its owner on a failure comes back: on the embedded default (one node,
no elector) ``LocalOwnership.release`` grants it again with the next epoch."""

from __future__ import annotations

from ledger.node import Node
from shard_router.local import LocalOwnership
from tests.owner.memstore import MemStore


async def test_abdicated_shard_is_served_again_with_a_higher_epoch():
    store = MemStore()
    node = Node(store, LocalOwnership(2, epoch=5))
    await node.start()
    try:
        assert await node.wait_serving(2, 10)
        first = node.owners[1]
        await first._abdicate("test: a background loop failed")
        assert not first.serving
        # Waits on the node's ownership transitions (no polling): true once shard 1 is
        # taken over again and both shards serve.
        assert await node.wait_serving(2, 10)
        assert node.owners[1].epoch == 6 and store.epochs[1] == 6
        assert node.ownership.owner(1).epoch == 6
    finally:
        await node.close()
