"""Joining etcd rides out a moment of unavailability (``EtcdOwnership.start``).

A CI run of the kill-owner drill failed because ``ledgerctl restore-homes`` gave up on its
first etcd call ("cannot join etcd ... ConnectionFailedError"), with every member up: a
loaded machine's etcd answers UNAVAILABLE for a moment (a leader election, a connection
dropped). Here a loopback proxy in front of the session's real etcd drops its first
connections: a node and an operator's read-only view both join once it lets them through,
and a join whose bound is shorter than the outage fails with ``EtcdOwnershipError``.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from clients.harness import free_port
from shard_router.endpoints import parse_endpoints
from shard_router.etcd import EtcdOwnership, EtcdOwnershipError

pytestmark = pytest.mark.real

SHARDS = 4
# Connections the proxy drops before it forwards: each is one failed etcd call.
DROPPED = 2
JOIN_TIMEOUT_S = 20.0


class FlakyProxy:
    """A TCP proxy to etcd that closes its first ``drop`` connections at once."""

    def __init__(self, target: str, drop: int) -> None:
        self.host, self.port = parse_endpoints(target)[0]  # one member is enough
        self.drop = drop
        self.dropped = 0
        self.forwarded = 0
        self.listen_port = free_port()
        self._server: asyncio.AbstractServer | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.listen_port}"

    async def __aenter__(self) -> FlakyProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.listen_port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._pipes:
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.dropped < self.drop:
            self.dropped += 1
            writer.close()
            return
        self.forwarded += 1
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            dst.close()


def _ownership(endpoint: str, prefix: str, *, campaign: bool,
               join_timeout_s: float = JOIN_TIMEOUT_S) -> EtcdOwnership:
    return EtcdOwnership(endpoint, f"n-{uuid.uuid4().hex[:6]}", "r1", "127.0.0.1:1", ["r1"],
                         shard_count=SHARDS, lease_ttl_s=3.0, takeover_grace_s=0.5,
                         prefix=prefix, campaign=campaign, join_timeout_s=join_timeout_s)


async def _ignore(shard: int, epoch: int) -> None:
    return None


@pytest.mark.parametrize("campaign", [True, False], ids=["node", "operator-view"])
async def test_a_join_retries_while_etcd_drops_connections(etcd_endpoint, campaign):
    prefix = f"/test-join-{uuid.uuid4().hex[:8]}"
    async with FlakyProxy(etcd_endpoint, drop=DROPPED) as proxy:
        ownership = _ownership(proxy.endpoint, prefix, campaign=campaign)
        await ownership.start(_ignore)
        try:
            assert proxy.dropped == DROPPED and proxy.forwarded >= 1
            # Joined for real: the shard map is there, read through the proxy.
            assert sorted(p.shard for p in ownership.placements()) == list(range(SHARDS))
        finally:
            await ownership.close()


async def test_a_join_gives_up_after_its_bound(etcd_endpoint):
    prefix = f"/test-join-{uuid.uuid4().hex[:8]}"
    async with FlakyProxy(etcd_endpoint, drop=1_000_000) as proxy:
        ownership = _ownership(proxy.endpoint, prefix, campaign=False, join_timeout_s=0.5)
        with pytest.raises(EtcdOwnershipError, match="cannot join etcd"):
            await ownership.start(_ignore)
        assert proxy.dropped >= 1 and proxy.forwarded == 0
