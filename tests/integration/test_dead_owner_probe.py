"""A crashed owner's shards are granted again at once, not after its lease's TTL
(``EtcdOwnership.report_unreachable``), on a real etcd.

A node whose call to an owner failed probes the owner's address; when every probe connection
is refused (the host is up, nothing listens: the process is gone), it revokes the owner's
lease. Here each node's "server" is a plain TCP listener on its published address, and the
lease TTL is 30 s, so a takeover that waited for the TTL would not come within the test's
bounds. Proves:

  * a crashed owner (keep-alives stopped, as ``abandon`` does, and its listener closed) that
    is reported unreachable loses its lease, and the other node wins every one of its shards
    with a higher epoch;
  * an owner whose address still accepts connections keeps its lease and shards (a call that
    failed for another reason, a slow or paused process, is left to the lease), and an owner
    reported twice at once is probed once;
  * the router reports the address of an owner its call could not reach.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from clients.harness import free_port
from ledger.core.status import Status
from shard_router.etcd import EtcdOwnership
from shard_router.router import Router

SHARDS = 6
LEASE_TTL_S = 30.0  # far longer than any wait below: only a revocation frees the shards
GRACE_S = 0.5
SETTLE_TIMEOUT_S = 15.0


class Listener:
    """A TCP listener standing in for a node's gRPC port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server: asyncio.AbstractServer | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def open(self) -> None:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()
        self.server = await asyncio.start_server(accept, "127.0.0.1", self.port)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


class Node:
    def __init__(self, endpoint: str, prefix: str, name: str) -> None:
        self.listener = Listener()
        self.gained: dict[int, int] = {}
        self.changed = asyncio.Event()
        self.ownership = EtcdOwnership(
            endpoint, name, "r1", self.listener.address, ["r1"], shard_count=SHARDS,
            lease_ttl_s=LEASE_TTL_S, takeover_grace_s=GRACE_S, prefix=prefix,
            rebalance=False)

    async def on_change(self, shard: int, epoch: int) -> None:
        if epoch:
            self.gained[shard] = epoch
        else:
            self.gained.pop(shard, None)
        self.changed.set()

    async def start(self) -> None:
        await self.listener.open()
        await self.ownership.start(self.on_change)

    async def wait(self, predicate, what: str) -> None:
        async with asyncio.timeout(SETTLE_TIMEOUT_S):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


async def _two_nodes(etcd_endpoint: str) -> tuple[Node, Node]:
    prefix = f"/test-dead-{uuid.uuid4().hex[:8]}"
    first = Node(etcd_endpoint, prefix, "n1")
    await first.start()
    await first.wait(lambda: len(first.gained) == SHARDS, "n1 owns every shard")
    second = Node(etcd_endpoint, prefix, "n2")
    await second.start()
    # n2 sees n1 own them all (no rebalance): the state a crash would interrupt.
    await second.wait(lambda: all(second.ownership.owner(s) is not None
                                  and second.ownership.owner(s).node_id == "n1"
                                  for s in range(SHARDS)), "n2 sees n1's ownership")
    return first, second


@pytest.mark.real
async def test_a_crashed_owner_is_revoked_and_its_shards_taken_at_once(etcd_endpoint):
    first, second = await _two_nodes(etcd_endpoint)
    try:
        epochs = dict(first.gained)
        await first.ownership.abandon()  # keep-alives stop, no revoke: a crash
        await first.listener.close()     # and nothing listens on its port any more
        probe = second.ownership.report_unreachable(first.listener.address)
        assert probe is not None
        assert await probe is True
        assert second.ownership.dead_owner_revocations == 1
        await second.wait(lambda: len(second.gained) == SHARDS, "n2 owns every shard")
        assert all(second.gained[s] > epochs[s] for s in range(SHARDS))
    finally:
        await second.ownership.close()
        await second.listener.close()


@pytest.mark.real
async def test_an_owner_that_accepts_connections_keeps_its_lease(etcd_endpoint):
    first, second = await _two_nodes(etcd_endpoint)
    try:
        epochs = dict(first.gained)
        probe = second.ownership.report_unreachable(first.listener.address)
        assert probe is not None
        # A second report while the first probe runs starts none.
        assert second.ownership.report_unreachable(first.listener.address) is None
        assert await probe is False
        assert second.ownership.dead_owner_revocations == 0
        assert first.ownership.lease_valid() and first.gained == epochs
        # No owner at an address: nothing to probe.
        assert second.ownership.report_unreachable("127.0.0.1:1") is None
    finally:
        await second.ownership.close()
        await first.ownership.close()
        await second.listener.close()
        await first.listener.close()


class _Refusing:
    """A transport whose every call fails as a call to a dead peer does."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def execute(self, address, shard, commands, wait_credit, deadline=None):
        self.calls.append(address)
        raise ConnectionError(f"{address}: UNAVAILABLE")


class _Ownership:
    def __init__(self, address: str) -> None:
        self.reported: list[str] = []
        self._address = address

    def owner(self, shard: int):
        from shard_router.ownership import OwnerInfo
        return OwnerInfo(shard=shard, node_id="other", region="r1", address=self._address,
                         epoch=1)

    def report_unreachable(self, address: str) -> None:
        self.reported.append(address)


async def test_the_router_reports_an_owner_it_could_not_reach():
    ownership = _Ownership("127.0.0.1:7")
    transport = _Refusing()
    router = Router("me", {}, ownership, transport, retry_deadline_ms=50)  # type: ignore[arg-type]
    outcomes = await router.execute(0, ["command"])
    assert [o.status for o in outcomes] == [Status.SHARD_UNAVAILABLE]
    assert transport.calls and ownership.reported == transport.calls
