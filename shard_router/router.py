"""Routes shard commands to the shard's owner: this node's owner object, or a remote node.

Every shard command is safe to send again (Posts and wallet creations are idempotent by key,
credits by outbox sequence, acknowledgements and reads trivially), so when an owner is not
serving - moving, fenced, or its node is down - the router retries on whoever owns the shard
next, until the call's deadline, and only then answers SHARD_UNAVAILABLE.

A retry waits for the route to change rather than only for its backoff: the ownership cache
reports every owner key that appears or goes (``on_owner_change``, where the ownership has
it), and this node's takeovers report when they serve, so a call waiting out a shard's
hand-over tries again the moment a new owner is named. A node named owner that is still
taking the shard over holds the call until it serves (``await_takeover``) instead of sending
it back. The backoff stays the bound of each wait. (A planned drain under load, before:
the router slept 25, 50, ... 500 ms between attempts whatever happened meanwhile.) A call
that could not reach a remote owner is reported to the ownership (``report_unreachable``),
which frees the shards of an owner whose process is gone without waiting out its lease.

Deadlines are points on the event loop's clock (``loop.time()``, monotonic; a simulation runs
it virtually). A call's deadline bounds every attempt: the wait for a local owner's answer,
the gRPC timeout of a node-to-node call (the time left), and the retries. No attempt starts
after it. A call without one (an owner's own traffic) retries for ``retry_deadline_ms``.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Mapping, Protocol

from ledger.core.outcomes import UNAVAILABLE
from ledger.core.status import Outcome, Status
from shard_router.constants import (SHARD_RETRY_BACKOFF_MAX_MS, SHARD_RETRY_BACKOFF_MS,
                                     SHARD_RETRY_DEADLINE_MS, TAKEOVER_WAIT_S_MAX)
from shard_router.ownership import Ownership


class NotOwner(Exception):
    """The remote node does not serve the shard (any more)."""


class LocalOwner(Protocol):
    """The router's view of a shard owner in this process (``ledger.owner.ShardOwner``)."""

    @property
    def serving(self) -> bool:
        """True while the owner takes commands; it may stop at any await."""
        ...

    async def submit_many(self, commands: list, wait_credit: bool = False,
                          deadline: float | None = None) -> list[Outcome]:
        """Run ``commands`` in order; answer once their batch is durable.

        Args:
            commands: Shard commands, applied in list order.
            wait_credit: Hold the answer of a committed cross-shard Post until its credit
                leg landed (bounded), so that it says ``credited=True``.
            deadline: Loop time after which a command not yet started is not started, and
                the answer is not waited for; None for the owner's own bound.

        Returns:
            One outcome per command. All ``SHARD_UNAVAILABLE`` when the owner stopped or
            the deadline passed first: nothing is refused, the commands may or may not have
            been applied, and a retry on the next owner is answered from the journal.
        """
        ...

    def submit_nowait(self, commands: list,
                      deadline: float | None = None) -> asyncio.Future | list[Outcome]:
        """``submit_many`` without ``wait_credit``, as a future (or the outcomes at once)."""
        ...

    def wallet_currency(self, wallet_id: str) -> str | None | bool:
        """The wallet's currency in the owner's durable state, False if it has none, None
        if the owner cannot tell now."""
        ...

    @property
    def durable_seq(self) -> int:
        """The last journal batch the owner holds durably."""
        ...

    async def wait_appended(self, after_seq: int, timeout_s: float) -> None:
        """Return once a batch after ``after_seq`` is durable, the owner stops, or the
        timeout passes."""
        ...


class RemoteTransport(Protocol):
    async def execute(self, address: str, shard: int, commands: list,
                      wait_credit: bool, deadline: float | None = None) -> list[Outcome]:
        """Run commands on the owner at ``address``.

        Args:
            deadline: Loop time by which the answer is due (the call's gRPC timeout is the
                time left); None for the transport's own timeout.

        Raises:
            NotOwner: that node does not serve the shard.
            ConnectionError: the node could not be reached, or did not answer by the
                deadline (nothing was executed, or the commands ran and the answer was
                lost: both are safe to retry).
        """
        ...


class Router:
    """The shard executor (``coordinator.ports.ShardExecutor``, ``ledger.owner``'s peers)
    over local owners and remote nodes."""

    def __init__(self, node_id: str, owners: Mapping[int, LocalOwner], ownership: Ownership,
                 transport: RemoteTransport | None = None,
                 retry_deadline_ms: int = SHARD_RETRY_DEADLINE_MS,
                 await_takeover: Callable[[int, float], Awaitable[LocalOwner | None]]
                 | None = None) -> None:
        """Args:
            await_takeover: ``(shard, wait_s)``: this node's owner of the shard once it
                serves, waiting up to ``wait_s`` if the node is taking the shard over; None
                when it does not serve it (``ledger.node.Node.serving_owner``).
        """
        self._node_id = node_id
        self._owners = owners
        self._ownership = ownership
        self._transport = transport
        self._retry_deadline_s = retry_deadline_ms / 1000
        self._await_takeover = await_takeover
        # Set (and replaced) whenever a route may have changed: a retry waits on it.
        self._route_changed = asyncio.Event()
        hook = getattr(ownership, "on_owner_change", None)
        if hook is not None:
            hook(self.route_changed)
        # Told of an owner that a call could not reach, an ownership that can (etcd) probes
        # it and frees the shards of a crashed process at once (``report_unreachable``).
        self._report_unreachable: Callable[[str], object] | None = getattr(
            ownership, "report_unreachable", None)

    def route_changed(self) -> None:
        """A shard's owner changed (named, gone, or now serving here): wake the retries."""
        changed, self._route_changed = self._route_changed, asyncio.Event()
        changed.set()

    def local_owner(self, shard: int) -> LocalOwner | None:
        """This node's owner of ``shard`` if it serves it now, else None."""
        owner = self._owners.get(shard)
        return owner if owner is not None and owner.serving else None

    async def execute(self, shard: int, commands: list, wait_credit: bool = False,
                      deadline: float | None = None) -> list[Outcome]:
        """Run ``commands`` on the owner of ``shard``, retrying while it has none.

        Args:
            deadline: Loop time after which no attempt starts (None: ``retry_deadline_ms``
                from now).

        Returns:
            One outcome per command; all ``SHARD_UNAVAILABLE`` when no owner answered by
            the deadline.
        """
        loop = asyncio.get_running_loop()  # loop time: simulations run it on a virtual clock
        retry_until = (deadline if deadline is not None
                       else loop.time() + self._retry_deadline_s)
        backoff_s = SHARD_RETRY_BACKOFF_MS / 1000
        while True:
            if deadline is not None and loop.time() >= deadline:
                return [UNAVAILABLE] * len(commands)  # not started: the caller gave up
            changed = self._route_changed  # taken before the attempt: no change is missed
            outcomes = await self._try(shard, commands, wait_credit, deadline)
            if outcomes is not None:
                return outcomes
            if loop.time() + backoff_s > retry_until:
                return [UNAVAILABLE] * len(commands)
            if not changed.is_set():
                try:
                    await asyncio.wait_for(changed.wait(), backoff_s)
                except asyncio.TimeoutError:
                    pass
            backoff_s = min(backoff_s * 2, SHARD_RETRY_BACKOFF_MAX_MS / 1000)

    async def execute_many(self, groups: Mapping[int, list],
                           deadline: float | None = None) -> dict[int, list[Outcome]]:
        """``execute`` on many shards at once (``{shard: commands}``), without credit waits.

        Shards whose owner is in this process and serving get their commands queued at once,
        and the call awaits one future per shard: no task or coroutine per shard, which on a
        batch that touches every shard of the node is most of a round's overhead. A shard
        with no local owner, or whose owner stopped under the call (all SHARD_UNAVAILABLE),
        goes through ``execute`` (routing, remote nodes, retries), so the outcomes are
        those ``execute`` would give.
        """
        answers: dict[int, list[Outcome]] = {}
        waiting: dict[int, asyncio.Future] = {}
        slow: list[int] = []
        for shard, commands in groups.items():
            owner = self._owners.get(shard)
            if owner is None or not owner.serving:
                slow.append(shard)
                continue
            queued = owner.submit_nowait(commands, deadline)
            if isinstance(queued, list):
                answers[shard] = queued
            else:
                waiting[shard] = queued
        if waiting:
            await asyncio.wait(waiting.values())
            for shard, future in waiting.items():
                answers[shard] = future.result()
        for shard, outcomes in answers.items():
            if all(o.status is Status.SHARD_UNAVAILABLE for o in outcomes) and (
                    deadline is None or asyncio.get_running_loop().time() < deadline):
                slow.append(shard)  # the owner stopped under us: route again
        if len(slow) == 1:
            answers[slow[0]] = await self.execute(slow[0], groups[slow[0]], deadline=deadline)
        elif slow:
            for shard, outcomes in zip(slow, await asyncio.gather(*(
                    self.execute(shard, groups[shard], deadline=deadline) for shard in slow))):
                answers[shard] = outcomes
        return answers

    def wallet_currency(self, shard: int, wallet_id: str) -> str | None | bool:
        """A wallet's currency from its shard's owner in this process, read from its durable
        state without a step: the currency, False if there is no such wallet, None if no
        local owner can tell now (the caller asks the shard the journaled way)."""
        owner = self._owners.get(shard)
        return None if owner is None else owner.wallet_currency(wallet_id)

    async def _try(self, shard: int, commands: list, wait_credit: bool,
                   deadline: float | None) -> list[Outcome] | None:
        owner: LocalOwner | None = self._owners.get(shard)
        info = None
        if owner is None or not owner.serving:
            owner = None
            info = self._ownership.owner(shard)
            if info is not None and info.node_id == self._node_id \
                    and self._await_takeover is not None:
                # Named owner, still taking the shard over: wait for it here.
                wait_s = TAKEOVER_WAIT_S_MAX
                if deadline is not None:
                    wait_s = min(wait_s, deadline - asyncio.get_running_loop().time())
                owner = await self._await_takeover(shard, wait_s)
                if owner is None:
                    return None
        if owner is not None:
            outcomes = await owner.submit_many(commands, wait_credit, deadline)
            # All-unavailable means the owner stopped under us (or the deadline passed,
            # which the caller's loop sees): route again.
            if all(o.status is Status.SHARD_UNAVAILABLE for o in outcomes):
                return None
            return outcomes
        if info is None or info.node_id == self._node_id or self._transport is None:
            return None
        try:
            outcomes = await self._transport.execute(info.address, shard, commands,
                                                     wait_credit, deadline)
        except NotOwner:
            return None
        except ConnectionError:
            if self._report_unreachable is not None:
                self._report_unreachable(info.address)
            return None
        if all(o.status is Status.SHARD_UNAVAILABLE for o in outcomes):
            return None  # that owner stopped under us: route again
        return outcomes
