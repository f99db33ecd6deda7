"""Routes shard commands to the shard's owner: this node's owner object, or a remote node.

Every shard command is safe to send again (Posts and wallet creations are idempotent by key,
credits by outbox sequence, acknowledgements and reads trivially), so when an owner is not
serving - moving, fenced, or its node is down - the router retries on whoever owns the shard
next, until a deadline, and only then answers SHARD_UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from ledger import constants as K
from ledger.core.status import Outcome, Status
from ledger.owner import UNAVAILABLE, ShardOwner
from shard_router.ownership import Ownership


class NotOwner(Exception):
    """The remote node does not serve the shard (any more)."""


class RemoteTransport(Protocol):
    async def execute(self, address: str, shard: int, commands: list,
                      wait_credit: bool) -> list[Outcome]:
        """Run commands on the owner at ``address``.

        Raises:
            NotOwner: that node does not serve the shard.
            ConnectionError: the node could not be reached (nothing was executed, or the
                commands ran and the answer was lost: both are safe to retry).
        """
        ...


class Router:
    """``ShardExecutor`` over local owners and remote nodes."""

    def __init__(self, node_id: str, owners: dict[int, ShardOwner], ownership: Ownership,
                 transport: RemoteTransport | None = None,
                 retry_deadline_ms: int = K.SHARD_RETRY_DEADLINE_MS) -> None:
        self._node_id = node_id
        self._owners = owners
        self._ownership = ownership
        self._transport = transport
        self._retry_deadline_s = retry_deadline_ms / 1000

    async def execute(self, shard: int, commands: list, wait_credit: bool = False
                      ) -> list[Outcome]:
        loop = asyncio.get_running_loop()  # loop time: simulations run it on a virtual clock
        deadline = loop.time() + self._retry_deadline_s
        backoff_s = K.SHARD_RETRY_BACKOFF_MS / 1000
        while True:
            outcomes = await self._try(shard, commands, wait_credit)
            if outcomes is not None:
                return outcomes
            if loop.time() + backoff_s > deadline:
                return [UNAVAILABLE] * len(commands)
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 0.5)

    async def _try(self, shard: int, commands: list, wait_credit: bool) -> list[Outcome] | None:
        owner = self._owners.get(shard)
        if owner is not None and owner.serving:
            outcomes = await owner.submit_many(commands, wait_credit)
            # All-unavailable means the owner stopped under us: route again.
            if all(o.status is Status.SHARD_UNAVAILABLE for o in outcomes):
                return None
            return outcomes
        info = self._ownership.owner(shard)
        if info is None or info.node_id == self._node_id or self._transport is None:
            return None
        try:
            outcomes = await self._transport.execute(info.address, shard, commands, wait_credit)
        except (NotOwner, ConnectionError):
            return None
        if all(o.status is Status.SHARD_UNAVAILABLE for o in outcomes):
            return None  # that owner stopped under us: route again
        return outcomes
