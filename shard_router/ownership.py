"""The ownership port: who owns which shard, with which epoch (fencing token).

At most one node owns a shard at a time, as far as the elector can tell. A lease or lock is
not mutual exclusion by itself (a paused owner may wake after its lease expired), so every
journal append also carries the epoch and the store refuses stale ones (``Fenced``). Epochs of
a shard only ever increase.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol


@dataclass(slots=True, frozen=True)
class OwnerInfo:
    shard: int
    node_id: str
    region: str
    address: str  # host:port of the node's gRPC server ("" for in-process)
    epoch: int


@dataclass(slots=True, frozen=True)
class ShardPlacement:
    """The shard map's entry: the region a shard lives in when all is well."""

    shard: int
    home_region: str


# Called when this node gains (epoch > 0) or loses (epoch == 0) a shard.
OwnershipListener = Callable[[int, int], Awaitable[None]]


class Ownership(Protocol):
    """Elects shard owners and publishes the shard map and owners to every node."""

    node_id: str
    region: str

    async def start(self, listener: OwnershipListener) -> None:
        """Join: register this node, start campaigning for the shards it should own, and
        call ``listener`` on every gain or loss of a shard by this node. Losses are reported
        before the lease can expire at the elector (a local deadline), so a node stops
        serving before anyone else may start."""
        ...

    async def close(self) -> None:
        """Give up every shard (listener called with epoch 0) and leave."""
        ...

    def owner(self, shard: int) -> OwnerInfo | None:
        """The current owner as last seen (a cache kept fresh by watches; no round trip)."""
        ...

    def placements(self) -> list[ShardPlacement]:
        ...
