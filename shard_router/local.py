"""In-process ``Ownership`` for the embedded default (``ledgerd dev``): one node owns every shard.

There is no elector, so nothing can depose this node; the epoch is given by the caller (for
example one more than the highest epoch the journal has seen), so that a restarted dev node
still fences out whatever ran before it.
"""

from __future__ import annotations

import asyncio

from shard_router.ownership import HomeChange, OwnerInfo, OwnershipListener, ShardPlacement

# Pause before a shard given up by its owner (after a failure) is granted again, doubling per
# release of that shard up to the maximum (s): a shard whose owner keeps failing does not
# spin, and one that failed once is back at once.
REGRANT_PAUSE_S = 0.05
REGRANT_PAUSE_MAX_S = 5.0


class LocalOwnership:
    """Owns all ``shard_count`` shards with one ``epoch`` from ``start()`` until ``close()``.

    Args:
        shard_count: Number of virtual shards.
        epoch: The fencing token every shard is served with; must be positive.
        node_id: This node's id.
        region: The only region; it is every shard's home.
    """

    def __init__(self, shard_count: int, epoch: int, node_id: str = "dev",
                 region: str = "dev") -> None:
        if shard_count <= 0:
            raise ValueError("shard_count must be positive")
        if epoch <= 0:
            raise ValueError("epoch must be positive (0 means 'lost' to listeners)")
        self.node_id = node_id
        self.region = region
        self._shard_count = shard_count
        self._epoch = epoch
        self._listener: OwnershipListener | None = None
        self._owned = False
        self._epochs: dict[int, int] = {}  # shards re-granted after a release
        self._releases: dict[int, int] = {}

    async def start(self, listener: OwnershipListener) -> None:
        """Report the gain of every shard, in shard order, and return when all are reported."""
        if self._listener is not None:
            raise RuntimeError("start() called twice")
        self._listener = listener
        self._owned = True
        for shard in range(self._shard_count):
            await listener(shard, self._epoch)

    async def close(self) -> None:
        """Report the loss of every shard. Calling it again does nothing."""
        if not self._owned or self._listener is None:
            return
        self._owned = False
        for shard in range(self._shard_count):
            await self._listener(shard, 0)

    async def release(self, shard: int) -> None:
        """Give ``shard`` up after its owner stopped on a failure, and grant it again with
        the next epoch (after a pause that doubles per release), so that a new owner
        fences the journal, replays it and serves: the single-node form of a failover."""
        if not 0 <= shard < self._shard_count:
            raise ValueError(f"shard {shard} out of range 0..{self._shard_count - 1}")
        if not self._owned or self._listener is None:
            return
        count = self._releases[shard] = self._releases.get(shard, 0) + 1
        await asyncio.sleep(min(REGRANT_PAUSE_S * 2 ** (count - 1), REGRANT_PAUSE_MAX_S))
        if not self._owned:
            return
        epoch = self._epochs[shard] = self._epochs.get(shard, self._epoch) + 1
        await self._listener(shard, epoch)

    def lease_valid(self) -> bool:
        """Always True: there is no lease, and nothing can depose the only node (a restarted
        node is fenced out of the journal by its higher epoch instead)."""
        return True

    def owner(self, shard: int) -> OwnerInfo | None:
        if not self._owned or not 0 <= shard < self._shard_count:
            return None
        return OwnerInfo(shard=shard, node_id=self.node_id, region=self.region, address="",
                         epoch=self._epochs.get(shard, self._epoch))

    def placements(self) -> list[ShardPlacement]:
        return [ShardPlacement(shard=s, home_region=self.region)
                for s in range(self._shard_count)]

    def home_changes(self, shard: int) -> list[HomeChange]:
        return []  # one region: no shard ever changes home
