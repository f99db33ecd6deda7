"""A failback with warm standbys, end to end on a real etcd: two ``Node``s (one per region,
``EtcdOwnership`` each, one SQLite store between them). r1's shards are served in r2 until
r1's node starts; it warms them, r2's node lets go once it is warm, and r1's takeovers replay
nothing but what followed the warm-up.

Why end to end: the placement rules and the node were each tested alone, and the first
kill-region drill with them still replayed every journal in full. The reconcile right after
the win, before the gain reached the node, dropped the standby (``shard_router.etcd``: the
standbys of shards just won are kept).
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from ledger.core.model import CreateWallet
from ledger.node import Node
from ledger.store.sqlite import SqliteStore
from shard_router.etcd import EtcdOwnership

SHARDS = 4
REGIONS = ["r1", "r2"]
WAIT_S = 30.0


def _node(store: SqliteStore, etcd_endpoint: str, prefix: str, node_id: str,
          region: str) -> Node:
    """A node of ``region`` on the shared store, under etcd ``prefix``."""
    return Node(store, EtcdOwnership(etcd_endpoint, node_id, region, f"{node_id}.test:1",
                                     REGIONS, shard_count=SHARDS, lease_ttl_s=3.0,
                                     takeover_grace_s=1.0, prefix=prefix))


@pytest.mark.real
async def test_a_failback_takes_over_from_warm_standbys(etcd_endpoint, tmp_path):
    store = await SqliteStore.open(tmp_path / "ledger.db")
    prefix = f"/test-warm/{uuid.uuid4().hex[:12]}"
    r2 = _node(store, etcd_endpoint, prefix, "b", "r2")
    r1 = _node(store, etcd_endpoint, prefix, "a", "r1")
    try:
        await r2.start()
        assert await r2.wait_serving(SHARDS, WAIT_S), "r2's node to serve every shard"
        for shard, owner in r2.owners.items():
            for i in range(10):
                made = await owner.submit(CreateWallet("t", f"k{shard}-{i}", f"w{shard}-{i}",
                                                       "CNY", False, 1))
                assert made.ok, made
        await r1.start()  # r1's shards (0 and 2) go home to it
        assert await r1.wait_serving(2, WAIT_S), "r1's shards to go home"
        assert set(r1.owners) == {0, 2}
        for shard in (0, 2):
            t = r1.owners[shard].takeover_timings
            assert t.get("warm_seq") == 10 and t["batches"] == 0, (shard, t)
            assert len(r1.owners[shard].state.wallets) == 10
        assert set(r2.owners) == {1, 3}
    finally:
        await r1.close()
        await r2.close()
        await store.close()


@pytest.mark.real
async def test_a_failover_takes_over_from_the_standbys_that_followed_the_journal(
        etcd_endpoint, tmp_path):
    """Failover standbys end to end: r2's node follows r1's shards while r1's node serves
    them (``placement``, "Failover standby"); when r1's node goes, r2's takeovers continue
    from those standbys (a few batches) instead of loading every journal."""
    store = await SqliteStore.open(tmp_path / "ledger.db")
    prefix = f"/test-standby/{uuid.uuid4().hex[:12]}"
    r1 = _node(store, etcd_endpoint, prefix, "a", "r1")
    r2 = _node(store, etcd_endpoint, prefix, "b", "r2")
    closed = False
    try:
        await r1.start()
        await r2.start()
        assert await r1.wait_serving(2, WAIT_S) and await r2.wait_serving(2, WAIT_S)
        assert set(r1.owners) == {0, 2}
        for shard in (0, 2):
            for i in range(10):
                made = await r1.owners[shard].submit(CreateWallet(
                    "t", f"k{shard}-{i}", f"w{shard}-{i}", "CNY", False, 1))
                assert made.ok, made
        # r2 follows them (every WARM_FOLLOW_S): polled, the follows are not hooked.
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while not all((w := r2._warm.get(s)) is not None and w.state.seq == 10
                      for s in (0, 2)):
            assert asyncio.get_running_loop().time() < deadline, "r2 to follow r1's shards"
            await asyncio.sleep(0.1)
        made = await r1.owners[0].submit(CreateWallet("t", "k-tail", "w-tail", "CNY", False, 1))
        assert made.ok, made
        await r1.close()  # r1's node goes: its shards fail over to r2 at once
        closed = True
        assert await r2.wait_serving(SHARDS, WAIT_S), "r2 to take r1's shards over"
        for shard, wallets in ((0, 11), (2, 10)):
            t = r2.owners[shard].takeover_timings
            assert t.get("warm_seq", -1) >= 10 and t["batches"] <= 1, (shard, t)
            assert len(r2.owners[shard].state.wallets) == wallets
    finally:
        if not closed:
            await r1.close()
        await r2.close()
        await store.close()
