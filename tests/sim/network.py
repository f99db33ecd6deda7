"""Simulated nodes' network and elector views: what the real ``Router`` sees of other nodes.

``NodeTransport`` is the ``RemoteTransport`` of one node's real ``Router``. A command list
sent to another node crosses a network that loses requests (nothing executed), loses replies
(executed, the caller cannot know), duplicates requests (the copy runs later, on whoever owns
the shard then), delays and so reorders them, and cuts partitioned or dead nodes off. The
receiving side does what ``ShardOwnerServicer.Execute`` does: it runs the commands on its
owner of the shard, or answers "not the owner". Commands and answers cross as codec bytes, as
on the real wire, so nothing is shared between nodes by reference.

``NodeOwnership`` is one node's view of the shard map (``shard_router.ownership.Ownership``):
it is updated by the simulation's elector after a random delay, so routers act on stale views
too, and it carries the node's lease.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable

from ledger.core import codec
from ledger.core.status import Outcome, Status
from shard_router.ownership import OwnerInfo, OwnershipListener, ShardPlacement
from shard_router.router import NotOwner

if TYPE_CHECKING:
    from tests.sim.simulator import Simulation


@dataclass
class NetFaults:
    """Probabilities per remote call (0..1) and delays (virtual seconds)."""

    lose_request: float = 0.0
    lose_reply: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0  # a call is held back by up to reorder_s_max
    latency_s: tuple[float, float] = (0.0005, 0.003)
    reorder_s_max: float = 0.3


def encode_outcomes(outcomes: list[Outcome]) -> bytes:
    return codec.dumps([[int(o.status), o.field, o.detail, o.value, o.replayed]
                        for o in outcomes])


def decode_outcomes(data: bytes) -> list[Outcome]:
    return [Outcome(Status(s), f, d, v, r) for s, f, d, v, r in codec.loads(data)]


class Network:
    def __init__(self, sim: "Simulation", rng: random.Random, faults: NetFaults) -> None:
        self._sim = sim
        self._rng = rng
        self.faults = faults
        self.partitioned: set[str] = set()
        self.counts: dict[str, int] = {}

    def _count(self, kind: str, line: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self._sim.log(f"net: {kind} {line}")

    def _delay_s(self) -> float:
        f = self.faults
        delay = self._rng.uniform(*f.latency_s)
        if f.reorder and self._rng.random() < f.reorder:
            delay += self._rng.uniform(0, f.reorder_s_max)
            self.counts["delayed"] = self.counts.get("delayed", 0) + 1
        return delay

    def _cut(self, src: str, dst: str) -> bool:
        return src != dst and (src in self.partitioned or dst in self.partitioned)

    async def send(self, src: str, dst: str, shard: int, commands: list,
                   wait_credit: bool, deadline: float | None = None) -> list[Outcome]:
        sim, rng, f = self._sim, self._rng, self.faults
        target = sim.nodes.get(dst)
        source = sim.nodes[src]
        if target is None:
            raise ConnectionError(f"{dst}: no such node")
        src_life, dst_life = source.incarnation, target.incarnation
        wire = codec.dumps(commands)
        what = f"{src}->{dst} shard {shard} {','.join(type(c).__name__ for c in commands)}"
        await asyncio.sleep(self._delay_s())
        if not (source.alive and target.alive) or dst_life != target.incarnation:
            raise ConnectionError(f"{dst}: unreachable")
        if self._cut(src, dst):
            self._count("partitioned", what)
            raise ConnectionError(f"{dst}: partitioned")
        if f.lose_request and rng.random() < f.lose_request:
            self._count("lost request", what)
            raise ConnectionError(f"{dst}: request lost")
        if f.duplicate and rng.random() < f.duplicate:
            self._count("duplicated", what)
            sim.spawn(self._duplicate(dst, shard, wire), node=dst)
        owner = target.node.owners.get(shard)
        if owner is None or not owner.serving:
            info = target.ownership.owner(shard)
            raise NotOwner(info.address if info else "")
        outcomes = await owner.submit_many(list(codec.loads(wire)), wait_credit, deadline)
        reply = encode_outcomes(outcomes)
        await asyncio.sleep(self._delay_s())
        if (not (source.alive and target.alive) or src_life != source.incarnation
                or dst_life != target.incarnation or self._cut(src, dst)):
            raise ConnectionError(f"{dst}: connection lost")
        if f.lose_reply and rng.random() < f.lose_reply:
            self._count("lost reply", what)
            raise ConnectionError(f"{dst}: reply lost")
        return decode_outcomes(reply)

    async def _duplicate(self, dst: str, shard: int, wire: bytes) -> None:
        """The copy of a request arrives later, at whoever owns the shard on ``dst`` then."""
        await asyncio.sleep(self._rng.uniform(0, self.faults.reorder_s_max))
        target = self._sim.nodes[dst]
        owner = target.node.owners.get(shard) if target.alive else None
        if owner is not None and owner.serving:
            await owner.submit_many(list(codec.loads(wire)))


class NodeTransport:
    """The ``RemoteTransport`` of one node: addresses are node ids."""

    def __init__(self, network: Network, node_id: str) -> None:
        self._network = network
        self._node_id = node_id

    async def execute(self, address: str, shard: int, commands: list,
                      wait_credit: bool, deadline: float | None = None) -> list[Outcome]:
        return await self._network.send(self._node_id, address, shard, commands, wait_credit,
                                        deadline)


class NodeOwnership:
    """One node's view of the shard map and its lease (``Ownership`` port)."""

    def __init__(self, node_id: str, shard_count: int,
                 release: Callable[[str, int], Awaitable[None]]) -> None:
        self.node_id = node_id
        self.region = "sim"
        self._shard_count = shard_count
        self._release = release
        self.listener: OwnershipListener | None = None
        self.view: dict[int, OwnerInfo] = {}
        self.lease_ok = True

    async def start(self, listener: OwnershipListener) -> None:
        self.listener = listener

    async def close(self) -> None:
        pass

    def owner(self, shard: int) -> OwnerInfo | None:
        return self.view.get(shard)

    def placements(self) -> list[ShardPlacement]:
        return [ShardPlacement(s, self.region) for s in range(self._shard_count)]

    def home_changes(self, shard: int) -> list:
        return []  # homes never change here

    def lease_valid(self) -> bool:
        """False from the moment the node's lease may have expired at the elector."""
        return self.lease_ok

    def learn(self, info: OwnerInfo) -> None:
        """A watch event: the view moves forward only (a late event changes nothing)."""
        known = self.view.get(info.shard)
        if known is None or known.epoch < info.epoch:
            self.view[info.shard] = info

    async def release(self, shard: int) -> None:
        await self._release(self.node_id, shard)
