"""Change data capture: every committed journal batch of chosen shards, in journal order per
shard, from a position, then live (``LedgerService.WatchChanges``, ``ledgerctl tail``).

What a consumer gets, and why it can trust it:

* **Only durable, counted batches.** A shard's batches are read from the store's journal
  (``read_journal``: the batches that count, in order) and only up to the shard owner's
  durable head (``ShardOwner.durable_seq``, or ``GetHead`` on a remote owner): a batch whose
  append is still in flight, or one a deposed owner wrote after it was fenced, is never sent.
  So nothing leaves that its journal does not hold durably, and a batch once sent is never
  taken back.
* **No gap, no reordering within a shard.** Each shard is read strictly after the last seq
  sent; a read that does not start right after it (the batches were compacted into a
  snapshot) ends the stream with ``Compacted`` rather than skip them.
* **Resume.** The batch's ``seq`` is the shard's resume token: reconnect with the last seq
  seen per shard and the stream continues after it. A consumer that saw a batch twice (it
  crashed before saving its position) dedupes by (shard, seq). An owner that crashes or
  moves changes nothing: the next owner serves the same journal, and the stream follows
  whichever owner serves the shard.
* **Live.** A stream that has caught up waits for the next durable append of a shard owned
  in this process (woken at once) or asks a remote owner for its head every
  ``REMOTE_POLL_S``; with many shards it looks at local heads every ``LOCAL_POLL_S``.

Not streamed: the state before the oldest batch still in the journal (a snapshot; start
from balances read with ``GetWallet`` and follow from there), and nothing is filtered (a
consumer wanting one wallet filters the events).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Protocol

from coordinator.ports import ShardExecutor
from ledger.core import codec
from ledger.core.model import GetHead

# Batches read from the journal per store call.
WATCH_PAGE_BATCHES = 200
# A caught-up stream over several shards looks at the local owners' heads this often (s).
LOCAL_POLL_S = 0.05
# ... and asks a remote owner for its head at most this often (s).
REMOTE_POLL_S = 0.5
# A caught-up stream of one local shard waits this long for its next append before it
# looks again (the owner may have stopped or moved) (s).
LOCAL_WAIT_S = 1.0


class Compacted(Exception):
    """The batches after the asked position were compacted into a snapshot: they cannot be
    streamed (resume after ``kept_from - 1``, from balances read then)."""

    def __init__(self, shard: int, after_seq: int, kept_from: int) -> None:
        super().__init__(f"shard {shard}: batches after {after_seq} are no longer in the "
                         f"journal (compacted into a snapshot; the oldest kept is "
                         f"{kept_from or 'none'}); resume after {max(kept_from - 1, 0)}")
        self.shard, self.after_seq, self.kept_from = shard, after_seq, kept_from


@dataclass(frozen=True)
class Change:
    """One committed journal batch of one shard."""

    shard: int
    seq: int
    epoch: int
    events: list


class Journal(Protocol):
    async def read_journal(self, shard: int, after_seq: int = 0,
                           limit: int = 1000) -> list: ...


class HeadOwner(Protocol):
    @property
    def durable_seq(self) -> int: ...

    async def wait_appended(self, after_seq: int, timeout_s: float) -> None: ...


def event_json(event: Any) -> str:
    """An event's fields as JSON (nested records as objects), keys in declaration order."""
    return json.dumps(dataclasses.asdict(event), separators=(",", ":"), default=list)


class ChangeFeed:
    """Streams committed batches (``watch``). ``local_owner(shard)`` gives the serving owner
    of a shard in this process, or None (then the shard's head is asked through
    ``executor``)."""

    def __init__(self, executor: ShardExecutor, journal: Journal,
                 local_owner: Callable[[int], HeadOwner | None]) -> None:
        self._executor = executor
        self._journal = journal
        self._local_owner = local_owner

    async def head(self, shard: int) -> int | None:
        """The shard's durable journal head, or None if no owner answered now."""
        owner = self._local_owner(shard)
        if owner is not None:
            return owner.durable_seq
        loop = asyncio.get_running_loop()
        outcome = (await self._executor.execute(shard, [GetHead()],
                                                deadline=loop.time() + REMOTE_POLL_S * 4))[0]
        return outcome.value if outcome.ok else None

    async def watch(self, shards: list[int], positions: dict[int, int],
                    follow: bool) -> AsyncIterator[Change]:
        """Every committed batch of ``shards`` after ``positions`` (a shard not in it starts
        at its oldest kept batch), in order per shard; shards are served in turns, a page
        each. Without ``follow`` it ends once every shard reached the head it had when the
        stream began.

        Raises:
            Compacted: a shard's batches after its position are no longer in the journal.
        """
        loop = asyncio.get_running_loop()
        pos: dict[int, int | None] = {s: positions.get(s) for s in shards}
        end: dict[int, int] = {}
        if not follow:
            for s in shards:
                head = await self.head(s)
                while head is None:  # no owner right now: wait for the next one
                    await asyncio.sleep(REMOTE_POLL_S)
                    head = await self.head(s)
                end[s] = head
        asked_at: dict[int, float] = {}
        while True:
            idle = True
            for s in shards:
                if not follow and (pos[s] or 0) >= end[s]:
                    continue
                if self._local_owner(s) is None:
                    if loop.time() - asked_at.get(s, -REMOTE_POLL_S) < REMOTE_POLL_S:
                        continue
                    asked_at[s] = loop.time()
                head = await self.head(s)
                if head is None:
                    continue  # the shard is between owners: look again next turn
                if not follow:
                    head = min(head, end[s])
                at = pos[s]
                if (at or 0) >= head:
                    continue
                batches = await self._journal.read_journal(
                    s, at or 0, min(WATCH_PAGE_BATCHES, head - (at or 0)))
                first = batches[0].seq if batches else 0
                if at is not None and first != at + 1:
                    raise Compacted(s, at, first)
                if not batches:  # a new consumer, and a snapshot holds every batch: none kept
                    pos[s] = head
                    continue
                for batch in batches:
                    if batch.seq > head:
                        break
                    yield Change(s, batch.seq, batch.epoch, codec.loads(batch.events))
                    pos[s] = batch.seq
                    idle = False
            if not follow and all((pos[s] or 0) >= end[s] for s in shards):
                return
            if idle:
                await self._wait(shards, pos)

    async def _wait(self, shards: list[int], pos: dict[int, int | None]) -> None:
        if len(shards) == 1:
            owner = self._local_owner(shards[0])
            if owner is not None:
                await owner.wait_appended(pos[shards[0]] or 0, LOCAL_WAIT_S)
                return
        local = any(self._local_owner(s) is not None for s in shards)
        await asyncio.sleep(LOCAL_POLL_S if local else REMOTE_POLL_S / 5)
